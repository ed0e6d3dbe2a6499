//! The reactor: one parent thread per pool that wakes futures, retires the slots of dropped
//! handles, and moves uncollected results out of a completion ring whose worker needs room
//! (`results`, *Evacuation*). It parks on the segment's `doorbell`, which is rung only when a
//! slot it watches completes or a worker asks for room.
//!
//! The doorbell's sleeper count lives in shared memory, where a worker could zero it so that
//! its publish rings nobody; so while the reactor watches a slot it also looks every
//! [`REACTOR_LOOK`] on its own. While it watches nothing, there is nothing such a look could
//! rescue (a worker that withholds its own request for ring room only delays its own results,
//! as a worker that never answers does), so it sleeps with no timer at all: an idle pool's
//! parent then takes no wake-ups (a 1 s look cost ≈ 0.02 % of a core on a VM, where each
//! wake-up of a halted vCPU is charged ≈ 100–200 µs). Whoever gives it a slot to watch
//! ([`Shared::reactor_watch_started`]) wakes it out of that sleep. The two sides form a
//! Dekker pair (SeqCst): the reactor raises `reactor_untimed`, then looks for watched slots
//! again; a watcher stores its interest, then reads the flag. So either the reactor's second
//! look sees the interest, or the watcher sees the flag and wakes it.

use super::shared::Shared;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Shared {
    /// One pass of the reactor: wake futures and retire detached slots whose task is done,
    /// then serve workers waiting for ring room. Returns whether it did anything.
    pub(crate) fn reactor_scan(&self) -> bool {
        let mut did = false;
        for (i, meta) in self.meta.iter().enumerate() {
            if !meta.arb.watched(Ordering::Relaxed) {
                continue;
            }
            let Some(take) = meta.arb.reactor_take(self.slot(i as u32)) else {
                continue;
            };
            did = true;
            let waker = meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(w) = waker {
                w.wake();
            }
            if take.retire {
                self.retire(i as u32);
            }
        }
        did | self.evacuate()
    }

    /// Whether the reactor watches any slot (SeqCst loads: the reactor's half of the Dekker
    /// pair in the module docs).
    fn reactor_watching(&self) -> bool {
        self.meta.iter().any(|m| m.arb.watched(Ordering::SeqCst))
    }

    /// The supervisor's relay for workers waiting for completion-ring room: if any asks,
    /// wakes the reactor whatever the doorbell's sleeper count says (a worker repeats its
    /// request through the supervisor's eventfd when the doorbell alone did not get it room).
    pub(crate) fn relay_space_requests(&self) {
        if (0..self.n_seats()).any(|s| self.ctl(s).wants_space.load(Ordering::SeqCst) != 0) {
            self.header().doorbell.wake_all_unconditionally();
        }
    }

    /// A slot's interest was just stored (a future waits on it, or its handle was dropped):
    /// wakes the reactor if it sleeps with no periodic look. The watcher's half of the Dekker
    /// pair in the module docs; one load when the reactor is already watching something.
    pub(crate) fn reactor_watch_started(&self) {
        if self.reactor_untimed.load(Ordering::SeqCst) {
            self.header().doorbell.wake_all_unconditionally();
        }
    }
}

/// The reactor thread's body. A panic inside a pass (a future's waker panicked, or a bug)
/// breaks the pool, which stops its workers and answers every task, and the reactor keeps
/// running so that the futures of those answers are still woken.
pub(crate) fn reactor_loop(shared: Arc<Shared>) {
    loop {
        match catch_unwind(AssertUnwindSafe(|| run(&shared))) {
            Ok(()) => return,
            Err(p) => shared.declare_broken(format!(
                "the reactor thread panicked: {}",
                crate::worker::main_loop::panic_message(&*p)
            )),
        }
    }
}

/// How long the reactor sleeps at most between looks.
const REACTOR_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

fn run(shared: &Shared) {
    let hdr = shared.header();
    loop {
        let key = hdr.doorbell.prepare();
        let stop = shared.reactor_stop.load(Ordering::SeqCst);
        let did = shared.reactor_scan();
        if stop {
            hdr.doorbell.cancel(key);
            shared.reactor_scan();
            return;
        }
        if did {
            hdr.doorbell.cancel(key);
            continue;
        }
        if shared.reactor_watching() {
            // Bounded: the doorbell lives in shared memory, and a worker could zero its
            // sleeper count so that no notify wakes us; a periodic look keeps futures and
            // retirements moving.
            hdr.doorbell.wait(key, Some(REACTOR_LOOK));
            continue;
        }
        // Nothing watched: no timer (module docs). Flag first, then look again, so that an
        // interest stored before the flag went up is seen here and one stored after it wakes
        // us (through the key taken above, a wake-up after `prepare` ends the sleep at once).
        shared.reactor_untimed.store(true, Ordering::SeqCst);
        if shared.reactor_watching() {
            shared.reactor_untimed.store(false, Ordering::SeqCst);
            hdr.doorbell.cancel(key);
            continue;
        }
        hdr.doorbell.wait(key, None);
        shared.reactor_untimed.store(false, Ordering::SeqCst);
    }
}
