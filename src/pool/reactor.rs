//! The reactor: one parent thread per pool that wakes futures, retires the slots of dropped
//! handles, and moves uncollected results out of a completion ring whose worker needs room
//! (`results`, *Evacuation*). It parks on the segment's `doorbell`, which is rung only when a
//! slot it watches completes or a worker asks for room.
//!
//! The doorbell's sleeper count and futex word live in shared memory, where a worker could
//! zero the count (so that its publish rings nobody) or put the word back after a wake-up (so
//! that a sleep on it misses the wake-up). So while anything is in flight (a task submitted
//! and not retired, a submit under way, a worker asking for room) the reactor also looks every
//! [`REACTOR_LOOK`] on its own. With nothing in flight it has nothing to do: no future can be
//! waiting, no handle dropped, no result sits in a ring. Then it sleeps with no timer, on a
//! parent-local futex word (`reactor_bell`) no worker can reach, so an idle pool's parent takes
//! no wake-ups at all (a 1 s look cost ≈ 0.02 % of a core on a VM, which charges each wake-up of
//! a halted vCPU 100–200 µs). The next submit wakes it ([`Shared::reactor_wake_if_idle`]), and
//! so does stopping the pool. The submit and the reactor form a Dekker pair (SeqCst): the
//! reactor raises `reactor_untimed`, then looks for anything in flight (each slot's `phase`);
//! a submit that took a slot marks it (a SeqCst swap of its `phase`), then reads the flag. So
//! either the reactor sees the slot taken, or the submit sees the flag and rings the bell,
//! taking the flag down itself. (A submit still waiting for a free slot needs no reactor:
//! every slot is taken then, which the reactor sees.)

use super::shared::Shared;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::Arc;
use std::sync::atomic::Ordering;

impl Shared {
    /// One pass of the reactor: wake futures and retire detached slots whose task is done,
    /// wake the futures of tasks whose deadline has come (their poll answers them if no worker
    /// has claimed them: `Shared::try_settle`), then serve workers waiting for ring room.
    /// Returns whether it did anything, and the earliest deadline still to come among the
    /// watched tasks (`sys::mono_ns`), which the reactor's sleep must not pass.
    pub(crate) fn reactor_scan(&self) -> (bool, Option<u64>) {
        let mut did = false;
        let mut next_alarm: Option<u64> = None;
        let mut now = 0;
        for (i, meta) in self.meta.iter().enumerate() {
            if !meta.arb.watched(Ordering::Relaxed) {
                continue;
            }
            let Some(take) = meta.arb.reactor_take(self.slot(i as u32)) else {
                let alarm = meta.alarm_ns.load(Ordering::Relaxed);
                if alarm == 0 {
                    continue;
                }
                if now == 0 {
                    now = crate::sys::mono_ns();
                }
                if now < alarm {
                    next_alarm = Some(next_alarm.map_or(alarm, |n| n.min(alarm)));
                } else if meta.alarm_ns.swap(0, Ordering::Relaxed) != 0
                    && self.settled_early(i as u32)
                {
                    // Once per task, and only if no worker claimed it in time (this decides
                    // it: the waiter then finds it settled).
                    did = true;
                    self.wake_settled(i as u32);
                }
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
        (did | self.evacuate(), next_alarm)
    }

    /// Whether anything is in flight, so that the reactor must keep looking every
    /// [`REACTOR_LOOK`]: a slot taken (by a submit under way, or its task not yet retired), a
    /// watched slot, a worker asking for room. The reactor's half of the Dekker pair in the
    /// module docs.
    fn reactor_has_work(&self) -> bool {
        // SeqCst: the reactor's half of the Dekker pair with a submit's announcement (the
        // swap of its slot's `phase`, then its load of `reactor_untimed`).
        self.meta.iter().any(|m| {
            m.phase.load(Ordering::SeqCst) != super::slots::FREE || m.arb.watched(Ordering::SeqCst)
        }) || (0..self.n_seats()).any(|s| self.ctl(s).wants_space.load(Ordering::SeqCst) != 0)
    }

    /// A submit took its slot (after the SeqCst swap of its `phase`): wakes the reactor if
    /// it sleeps with no periodic look. One load while the reactor is awake or looking; the
    /// submit that finds the flag up takes it down and rings the bell.
    #[inline]
    pub(crate) fn reactor_wake_if_idle(&self) {
        if self.reactor_untimed.load(Ordering::SeqCst)
            && self.reactor_untimed.swap(false, Ordering::SeqCst)
        {
            self.ring_reactor_bell();
        }
    }

    /// Wakes the reactor out of its idle sleep (parent-local word: no worker can undo it).
    pub(crate) fn ring_reactor_bell(&self) {
        self.reactor_bell.fetch_add(1, Ordering::SeqCst);
        crate::sys::futex_wake(&self.reactor_bell, 1);
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
        let (did, alarm) = shared.reactor_scan();
        if stop {
            hdr.doorbell.cancel(key);
            shared.reactor_scan();
            return;
        }
        if did {
            hdr.doorbell.cancel(key);
            continue;
        }
        if shared.reactor_has_work() {
            // Bounded: the doorbell lives in shared memory, and a worker could zero its
            // sleeper count so that no notify wakes us; a periodic look keeps futures,
            // retirements and evacuations moving. A watched task's deadline comes sooner.
            let look = alarm.map_or(REACTOR_LOOK, |at| {
                let left = at.saturating_sub(crate::sys::mono_ns());
                REACTOR_LOOK.min(std::time::Duration::from_nanos(left.max(1)))
            });
            hdr.doorbell.wait(key, Some(look));
            continue;
        }
        hdr.doorbell.cancel(key);
        // Nothing in flight: sleep on the parent-local bell with no timer (module docs). The
        // bell's value first, then the flag, then one more look, so that a submit (or a stop)
        // that the look misses finds the flag up and rings after our read of the bell, which
        // ends the sleep at once.
        let bell = shared.reactor_bell.load(Ordering::SeqCst);
        shared.reactor_untimed.store(true, Ordering::SeqCst);
        if shared.reactor_has_work() || shared.reactor_stop.load(Ordering::SeqCst) {
            shared.reactor_untimed.store(false, Ordering::SeqCst);
            continue;
        }
        crate::sys::futex_wait(&shared.reactor_bell, bell, None);
        shared.reactor_untimed.store(false, Ordering::SeqCst);
    }
}
