//! The reactor: one parent thread per pool that wakes futures, retires the slots of dropped
//! handles, and moves uncollected results out of a completion ring whose worker needs room
//! (`results`, *Evacuation*). It parks on the segment's `doorbell`, which is rung only when a
//! slot it watches completes or a worker asks for room, so an idle reactor costs nothing.

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
            if !meta.arb.watched() {
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
        // Bounded: the doorbell lives in shared memory, and a worker could zero its sleeper
        // count so that no notify wakes us; a periodic look keeps futures and retirements
        // moving (and costs nothing measurable when idle).
        hdr.doorbell.wait(key, Some(REACTOR_LOOK));
    }
}
