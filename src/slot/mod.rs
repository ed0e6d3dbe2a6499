//! The task slot protocol, in one place: the slot header that lives in shared memory, its state
//! word and every transition on it (prepare, claim, cancel, expire, publish, wait, detach,
//! retire, recover), the outcome a slot carries ([`outcome`]), and the rule that says which
//! task a dead worker held ([`held_by_dead_worker`]).
//!
//! ARCHITECTURE.md, *The slot protocol*, draws the state machine and gives the proof sketches;
//! this module is its code, written over the [`crate::sync`] facade so that loom checks the same
//! transitions the pool runs (`src/slot/tests.rs`).
//!
//! Who writes what: the parent writes the task fields and resets the state (`prepare`); the
//! worker that popped the slot writes `owner`, `CLAIMED` and the result fields, then `DONE`; the
//! parent may publish instead of a dead worker (`DONE` is set once, by `fetch_or`, and both
//! sides publish only a task they own). Waiters add `WAIT_THREAD` / `WAIT_REACTOR`, the caller
//! adds `CANCELLED`. A worker can write anything anywhere in the segment: the parent therefore
//! reads the result fields once, into a [`RawOutcome`], and validates that copy
//! ([`RawOutcome::decode`]) before acting on it.

pub(crate) mod outcome;
#[cfg(test)]
mod tests;

use crate::sync::{AtomicU32, AtomicU64, Ordering};
pub(crate) use outcome::RawOutcome;

/// The bits of a slot's state word (also its futex word).
pub(crate) mod bits {
    /// A worker popped the slot and owns the task.
    pub(crate) const CLAIMED: u32 = 1;
    /// The outcome is published (by the worker, or by the parent for a task no worker can
    /// finish). Set exactly once per task; stays set until the next `prepare`.
    pub(crate) const DONE: u32 = 2;
    /// The caller gave up on the task: a worker that has not started it skips it, and a dead
    /// worker's task is not retried.
    pub(crate) const CANCELLED: u32 = 4;
    /// A thread sleeps on this word: whoever publishes must `FUTEX_WAKE` it.
    pub(crate) const WAIT_THREAD: u32 = 8;
    /// The reactor watches this slot: whoever publishes must ring the doorbell.
    pub(crate) const WAIT_REACTOR: u32 = 16;
    /// The task archive is a batch (an archived `Vec` of tasks, run one after the other), and
    /// the result is the batch's outcome (`codec::BatchOut`). Set by `prepare`, never changed.
    pub(crate) const BATCH: u32 = 32;
    /// The task has a deadline (in its `SlotTimes`): a worker that would start it later
    /// answers it expired instead. Set by `prepare`, never changed.
    pub(crate) const DEADLINE: u32 = 64;
}

/// How many compare-exchanges [`SlotHeader::expire`] tries before leaving the task to its
/// worker.
const EXPIRE_TRIES: u32 = 16;

/// Bit of `task_len` meaning "the task archive is the `task_off` word itself" (see
/// [`SlotHeader::task_off`]); the low bits are its length.
pub(crate) const TASK_IN_HEADER: u32 = 1 << 31;

/// One task slot's header in shared memory.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct SlotHeader {
    /// The state word ([`bits`]).
    pub(crate) state: AtomicU32,
    /// `(worker index + 1) | generation << 16` of the worker that claimed it; 0 if none
    /// (informational: the parent never trusts it).
    pub(crate) owner: AtomicU32,
    /// Unique id of the task (parent-assigned, never reused).
    pub(crate) task_id: AtomicU64,
    /// Segment offset and length of the task archive; or, with [`TASK_IN_HEADER`] in
    /// `task_len`, the archive itself (at most [`outcome::WORD_BYTES`] bytes, in memory order)
    /// in `task_off`, so that a tiny task crosses in this header's cache line.
    pub(crate) task_off: AtomicU64,
    pub(crate) task_len: AtomicU32,
    pub(crate) result_len: AtomicU32,
    /// Segment offset and length of a loaned payload (length 0: none).
    pub(crate) payload_off: AtomicU64,
    pub(crate) payload_len: AtomicU64,
    /// Where the result is: a record offset in the worker's completion ring, or
    /// `REC_INLINE | offset` in the slot's own data area (see [`outcome`]).
    pub(crate) result_rec: AtomicU64,
    pub(crate) result_kind: AtomicU32,
    pub(crate) result_worker: AtomicU32,
}

impl SlotHeader {
    /// A zeroed header (what a fresh segment holds); for heap models in tests.
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        SlotHeader {
            state: AtomicU32::new(0),
            owner: AtomicU32::new(0),
            task_id: AtomicU64::new(0),
            task_off: AtomicU64::new(0),
            task_len: AtomicU32::new(0),
            result_len: AtomicU32::new(0),
            payload_off: AtomicU64::new(0),
            payload_len: AtomicU64::new(0),
            result_rec: AtomicU64::new(0),
            result_kind: AtomicU32::new(0),
            result_worker: AtomicU32::new(0),
        }
    }

    /// Parent, at submit: fills in a new task and resets the state (last, Release) to `kind`
    /// (`BATCH` and `DEADLINE` bits, or 0). The slot came off the free list, so no worker
    /// holds it and no waiter watches it.
    #[inline]
    pub(crate) fn prepare(&self, task_id: u64, task: (u64, u32), payload: (u64, u64), kind: u32) {
        self.task_id.store(task_id, Ordering::Relaxed);
        self.task_off.store(task.0, Ordering::Relaxed);
        self.task_len.store(task.1, Ordering::Relaxed);
        self.payload_off.store(payload.0, Ordering::Relaxed);
        self.payload_len.store(payload.1, Ordering::Relaxed);
        self.owner.store(0, Ordering::Relaxed);
        self.result_kind.store(0, Ordering::Relaxed);
        // SYNC POINT: Release, so that a supervisor that Acquires this state (checking a dead
        // worker's stale claim) sees the new task id, never the previous task's. The task ring
        // push publishes all of it to the worker.
        debug_assert_eq!(kind & !(bits::BATCH | bits::DEADLINE), 0);
        self.state.store(kind, Ordering::Release);
    }

    /// Worker, right after its pop: takes the task. Returns the previous state (check
    /// `CANCELLED` and `BATCH`). The first touch of the header's line is this RMW (expecting
    /// a plain task that nobody waits on yet), so the line comes over once, for writing; read
    /// the task fields after it.
    #[inline]
    pub(crate) fn claim(&self, owner: u32) -> u32 {
        let prev = fetch_or_from(&self.state, 0, bits::CLAIMED);
        self.owner.store(owner, Ordering::Relaxed);
        prev
    }

    /// Parent, putting a dead worker's task back in the queue (retry): undoes the claim and
    /// keeps the waiter bits.
    pub(crate) fn unclaim(&self) {
        self.owner.store(0, Ordering::Relaxed);
        self.state.fetch_and(!bits::CLAIMED, Ordering::AcqRel);
    }

    /// Caller: asks that the task not run (or not be retried). Returns whether no worker had
    /// claimed it (and it was not done): then none ever will run it, since a claim that comes
    /// later sees `CANCELLED` (one RMW order on the word).
    pub(crate) fn cancel(&self) -> bool {
        self.state.fetch_or(bits::CANCELLED, Ordering::AcqRel) & (bits::CLAIMED | bits::DONE) == 0
    }

    /// Parent, once the task's deadline has passed: marks a task that no worker has claimed
    /// `CANCELLED`, so that none will run it (the worker that pops it answers `Cancelled`, to a
    /// slot the caller then hands to the reactor, as a dropped handle's). Returns `false`, and
    /// changes nothing, if a worker has claimed the task or it is done: that worker answers
    /// it. One RMW decides against the claim's: either the claim sees `CANCELLED`, or this sees
    /// `CLAIMED`. Bounded: a worker could keep changing the word to fail every compare-exchange,
    /// so after a few tries the task is left to its worker (which answers it expired).
    pub(crate) fn expire(&self) -> bool {
        let mut cur = self.state.load(Ordering::Relaxed);
        for _ in 0..EXPIRE_TRIES {
            if cur & (bits::CLAIMED | bits::DONE) != 0 {
                return false;
            }
            match self.state.compare_exchange_weak(
                cur,
                cur | bits::CANCELLED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            ) {
                Ok(_) => return true,
                Err(now) => cur = now,
            }
        }
        false
    }

    /// Whether the task is `CANCELLED` with no worker's claim and not done: nobody will run it,
    /// and whoever pops it answers it `Cancelled`.
    pub(crate) fn is_takeable(&self) -> bool {
        self.state_bits() & (bits::CANCELLED | bits::CLAIMED | bits::DONE) == bits::CANCELLED
    }

    /// The state word's bits (Acquire).
    pub(crate) fn state_bits(&self) -> u32 {
        self.state.load(Ordering::Acquire)
    }

    /// Whether the outcome is published (Acquire: the result fields are then visible).
    pub(crate) fn is_done(&self) -> bool {
        self.state.load(Ordering::Acquire) & bits::DONE != 0
    }

    /// Publishes `o` (worker: its own task; parent: a task whose worker is dead, or that no
    /// worker took). Returns who must be woken.
    #[inline]
    pub(crate) fn publish(&self, o: RawOutcome) -> Wake {
        self.result_worker.store(o.worker, Ordering::Relaxed);
        self.result_rec.store(o.rec, Ordering::Relaxed);
        self.result_len.store(o.len, Ordering::Relaxed);
        self.result_kind.store(o.kind, Ordering::Relaxed);
        // SYNC POINT: the result (ring record and the fields above) is visible to whoever
        // Acquires DONE. One RMW, so waiter flags and DONE are totally ordered: either we see a
        // waiter's flag and wake it, or the waiter sees DONE and does not sleep.
        // Expecting the common state (claimed, nobody waiting yet): see `fetch_or_from`.
        Wake::after(fetch_or_from(&self.state, bits::CLAIMED, bits::DONE))
    }

    /// A blocking caller about to sleep: sets `WAIT_THREAD`. Returns the state it must sleep on
    /// (`prev | WAIT_THREAD`), or `None` if the task is already done.
    pub(crate) fn announce_sleeper(&self) -> Option<u32> {
        let prev = self.state.fetch_or(bits::WAIT_THREAD, Ordering::AcqRel);
        (prev & bits::DONE == 0).then_some(prev | bits::WAIT_THREAD)
    }

    /// Reads the published outcome. Call only after [`is_done`](Self::is_done) returned true.
    /// The values are whatever the publisher (possibly a misbehaving worker) wrote: validate
    /// with [`RawOutcome::decode`].
    #[inline]
    pub(crate) fn outcome(&self) -> RawOutcome {
        RawOutcome {
            kind: self.result_kind.load(Ordering::Relaxed),
            worker: self.result_worker.load(Ordering::Relaxed),
            rec: self.result_rec.load(Ordering::Relaxed),
            len: self.result_len.load(Ordering::Relaxed),
        }
    }
}

/// `word.fetch_or(bits, AcqRel)`, written as a compare-and-swap loop that starts from `guess`
/// instead of from a load. x86 has no fetch-or that returns the old value, so `fetch_or`
/// compiles to a load and then a CAS loop: two transfers of a line that the other side is
/// polling (the caller spins on the state word while the worker claims and publishes). Starting
/// from the likely value makes the first access the locked CAS, which takes the line for
/// writing at once; a wrong guess costs one failed CAS, which returns the actual value.
fn fetch_or_from(word: &AtomicU32, guess: u32, bits: u32) -> u32 {
    let mut cur = guess;
    loop {
        match word.compare_exchange_weak(cur, cur | bits, Ordering::AcqRel, Ordering::Relaxed) {
            Ok(prev) => return prev,
            Err(now) => cur = now,
        }
    }
}

/// Whom a publish must wake, from the state bits it replaced.
#[derive(Debug, Clone, Copy)]
#[must_use]
pub(crate) struct Wake {
    /// A thread sleeps on the state word (`FUTEX_WAKE` it).
    pub(crate) thread: bool,
    /// The reactor watches the slot (ring the doorbell).
    pub(crate) reactor: bool,
}

impl Wake {
    fn after(prev: u32) -> Wake {
        Wake {
            thread: prev & bits::WAIT_THREAD != 0,
            reactor: prev & bits::WAIT_REACTOR != 0,
        }
    }

    /// Wakes them: the slot's futex and the segment's doorbell.
    #[cfg(not(stateful_pool_loom))]
    pub(crate) fn run(self, sh: &SlotHeader, doorbell: &crate::ring::wait::EventCount) {
        if self.thread {
            crate::sys::futex_wake(&sh.state, i32::MAX);
        }
        if self.reactor {
            doorbell.notify_all();
        }
    }
}

/// The parent-local half of a slot's arbitration between its handle and the reactor: who
/// retires the slot, exactly once per task. Both words hold *task ids* (never reused), so a slow
/// reactor pass that looked at task X can never act on task Y that has since reused the slot.
#[derive(Debug, Default)]
pub(crate) struct Arbiter {
    /// Task id the reactor should look at when the slot completes (0: none).
    interest: AtomicU64,
    /// Id of a task whose handle was dropped (0: none): the reactor retires the slot when that
    /// task completes.
    detached: AtomicU64,
}

/// What the reactor must do for a slot it claimed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ReactorTake {
    /// The task it claimed.
    pub(crate) task_id: u64,
    /// Whether it must also retire the slot (the handle was dropped).
    pub(crate) retire: bool,
}

impl Arbiter {
    /// A future waits on task `task_id` (its waker is stored first): asks the reactor to watch
    /// the slot. Returns whether the task is already done (then the future collects itself).
    pub(crate) fn watch(&self, sh: &SlotHeader, task_id: u64) -> bool {
        self.interest.store(task_id, Ordering::SeqCst);
        sh.state.fetch_or(bits::WAIT_REACTOR, Ordering::AcqRel) & bits::DONE != 0
    }

    /// The handle of task `task_id` is dropped without collecting: cancels the task if it has
    /// not started and hands the retirement to the reactor. Returns `true` if the caller must
    /// retire the slot now (the task is already done and nobody else will).
    pub(crate) fn detach(&self, sh: &SlotHeader, task_id: u64) -> bool {
        // While `detached` is unset only this handle may retire the slot, so this fetch_or
        // lands on our own task's state word, never on a successor's.
        let prev = sh
            .state
            .fetch_or(bits::WAIT_REACTOR | bits::CANCELLED, Ordering::AcqRel);
        if prev & bits::DONE != 0 {
            return true;
        }
        self.detached.store(task_id, Ordering::SeqCst);
        self.interest.store(task_id, Ordering::SeqCst);
        // DONE may have landed between the fetch_or above and the stores: the publisher then
        // rang the doorbell before the reactor could see our interest. Re-check with an RMW (a
        // later DONE reads from it, so its doorbell happens after our stores) and arbitrate.
        sh.state.fetch_or(0, Ordering::AcqRel) & bits::DONE != 0
            && self
                .detached
                .compare_exchange(task_id, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
    }

    /// The reactor's look at a slot: if a task it was asked to watch is done, claims it (one
    /// compare-exchange of the id) and says whether to retire the slot too.
    pub(crate) fn reactor_take(&self, sh: &SlotHeader) -> Option<ReactorTake> {
        let id = self.interest.load(Ordering::SeqCst);
        if id == 0 || !sh.is_done() {
            return None;
        }
        self.interest
            .compare_exchange(id, 0, Ordering::SeqCst, Ordering::Relaxed)
            .ok()?;
        let retire = self
            .detached
            .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok();
        Some(ReactorTake {
            task_id: id,
            retire,
        })
    }

    /// At retirement: clears the reactor's interest. Returns whether there was one (then a
    /// waker may be stored and must be dropped). `detached` needs no reset: every arbiter
    /// compare-exchanges it from a specific task id, and ids are never reused.
    pub(crate) fn clear(&self) -> bool {
        // Nothing to clear (the common case: a synchronous caller, or the reactor took the
        // interest already): one load, no locked instruction. Only this slot's handle sets an
        // interest, and it is the one retiring (or handed the retirement to the reactor, which
        // cleared the interest first), so a zero cannot turn into an interest meanwhile.
        if self.interest.load(Ordering::SeqCst) == 0 {
            return false;
        }
        self.interest.swap(0, Ordering::SeqCst) != 0
    }

    /// Whether the reactor has anything to look at here: `Relaxed` for a cheap pre-check in
    /// its scan, `SeqCst` where the answer decides whether it may sleep with no timer.
    pub(crate) fn watched(&self, order: Ordering) -> bool {
        self.interest.load(order) != 0
    }
}

/// Which slot a dead worker held, from its control block's `current_slot` and `current_task`
/// (read after the death; see ARCHITECTURE.md, *Recovering a dead worker's task*).
///
/// - `current_task == 0`: it died between the pop and recording the task id (which follows its
///   claim). Only its worker answers a task, so the slot still holds that task, unless the
///   slot is `DONE` (then the words are the leftovers of a finished task; harmless hardening).
/// - otherwise the slot is held iff it is not `DONE` *and* its task id is `current_task`: the
///   worker clears its words only after publishing, and in between the caller may have retired
///   the slot and a new task reused it. The id (read after an Acquire of the state, which
///   `prepare` Release-stores after the id) tells the two apart.
pub(crate) fn held_by_dead_worker(
    current_slot: u32,
    current_task: u64,
    n_slots: u32,
    slot: impl Fn(u32) -> Option<(u32, u64)>,
) -> Option<u32> {
    if current_slot >= n_slots {
        return None;
    }
    let (state, task_id) = slot(current_slot)?;
    if state & bits::DONE != 0 {
        return None;
    }
    (current_task == 0 || task_id == current_task).then_some(current_slot)
}

impl SlotHeader {
    /// The `(state, task id)` pair [`held_by_dead_worker`] compares, read in that order.
    pub(crate) fn state_and_task(&self) -> (u32, u64) {
        let st = self.state.load(Ordering::Acquire);
        (st, self.task_id.load(Ordering::Relaxed))
    }
}
