//! The parent's half of the slot protocol (`crate::slot` has the shared half and the state
//! machine): taking a free slot, writing and queueing a task, waiting for its outcome,
//! cancelling or detaching it, publishing outcomes the parent decides, and retiring the slot
//! exactly once.
//!
//! Every slot is retired exactly once, by whoever owns it: the handle that collects the result,
//! or, if the handle was dropped first (detached), the reactor, arbitrated by
//! [`Arbiter`](crate::slot::Arbiter).

use super::arena::Block;
use super::options::TaskOptions;
use super::shared::Shared;
use crate::codec::sealed::Plain;
use crate::error::{SubmitError, TaskError};
use crate::ring::wait::{spin_until, spin_within, wait_on};
use crate::slot::outcome::{KIND_CANCELLED, WORD_BYTES};
use crate::slot::{Arbiter, RawOutcome, TASK_IN_HEADER, bits};
use crate::sys::futex_wait;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU32, AtomicU64, Ordering};
use std::task::Waker;
use std::time::{Duration, Instant};

/// The error for an arena block whose memory could not be reserved.
/// Where a submitted task's archive comes from.
enum TaskSrc<'a, T> {
    /// Serialise this value into the slot (or an arena block if it does not fit).
    Encode(&'a T),
    /// Already archived in this arena block: `(offset, len, block len)`.
    Placed((u64, u64, u64)),
}

pub(crate) fn no_space(bytes: u64, e: &std::io::Error) -> SubmitError {
    SubmitError::NoSpace {
        bytes,
        errno: e.raw_os_error().unwrap_or(0),
    }
}

/// Parent-local facts about a slot.
#[derive(Debug, Default)]
pub(crate) struct SlotMeta {
    /// Id of the task now in the slot (the parent's own copy: never read from shared memory).
    task_id: AtomicU64,
    /// Arena block holding the task archive (len 0: inline).
    task_blk: (AtomicU64, AtomicU64),
    /// Arena block holding a loaned payload (len 0: none).
    pay_blk: (AtomicU64, AtomicU64),
    /// Waker of the future awaiting this slot.
    pub(super) waker: Mutex<Option<Waker>>,
    /// Handle vs reactor: who retires the slot.
    pub(super) arb: Arbiter,
    /// Where the slot is: [`FREE`] (on the free list), [`SUBMITTING`] (taken by a submit that
    /// has not yet queued its task or given the slot back), or [`QUEUED`] (its task queued,
    /// until the slot is retired). A submit announces itself with the SeqCst swap to
    /// `SUBMITTING`, before it reads `closing` and the reactor's idle flag: the Dekker pairs
    /// with `Shared::quiesce_submits` and the reactor's idle check (`reactor.rs`), which read
    /// this word after their own SeqCst writes.
    pub(super) phase: AtomicU8,
    /// The task's execution time limit in nanoseconds (0: none); read by the supervisor.
    pub(crate) timeout_ns: AtomicU64,
    /// How many more times the task may be re-run if its worker dies.
    pub(crate) retries_left: AtomicU32,
    /// From when the task's answer may be settled without a worker (`sys::mono_ns`; 0:
    /// never): its [deadline](crate::TaskOptions::deadline), or 1 once its caller cancelled
    /// it before any worker claimed it ([`Shared::cancel`]). The one word a collect reads for
    /// this on its fast path (the parent's own: the slot's `SlotTimes` are in shared memory,
    /// for the worker).
    pub(super) settle_at: AtomicU64,
    /// The answer, once settled without a worker (`SETTLED_*`; 0: not settled). Sticky until
    /// the next task: a worker that pops the task later skips it and publishes `Cancelled`,
    /// which must not change what the caller is told.
    pub(super) settled: AtomicU8,
    /// The caller cancelled the task after a worker had claimed it (the worker may still
    /// answer it `Cancelled`: that answer is the caller's cancel, not a deadline's). Reset
    /// with `settled`.
    pub(super) cancel_late: AtomicBool,
    /// The time from the task's submit to its deadline (the `Timeout`'s `after`).
    pub(super) budget_ns: AtomicU64,
    /// The reactor's alarm for a future waiting on this task: the deadline, until the reactor
    /// wakes the future for it (then 0).
    pub(super) alarm_ns: AtomicU64,
    /// Who has the task's ring record: `task_id << 3 | RES_*` (see `results`).
    pub(super) res: AtomicU64,
    /// A result the reactor moved out of the ring before its caller collected it.
    pub(super) spill: Mutex<Option<rkyv::util::AlignedVec<16>>>,
    /// The parent published this task's outcome (a worker cannot claim the parent's outcomes:
    /// died, timed out, no workers, broken).
    pub(super) by_parent: AtomicBool,
    /// The seat (+ 1) the task was offered to alone (a broadcast); 0 for the shared queue.
    pub(crate) directed_to: AtomicU32,
    /// When the task was submitted (feature `tracing`: its time to collection is reported).
    #[cfg(feature = "tracing")]
    submitted: Mutex<Option<Instant>>,
}

impl SlotMeta {
    /// Id of the task now in the slot.
    #[inline]
    pub(crate) fn task_id(&self) -> u64 {
        self.task_id.load(Ordering::Relaxed)
    }
}

impl Shared {
    /// Parent-local facts of a slot.
    pub(crate) fn meta(&self, slot: u32) -> &SlotMeta {
        &self.meta[slot as usize]
    }

    // ---- submission ----

    /// Takes a free slot, waiting as `block` allows.
    fn acquire_slot(&self, block: Block) -> Result<u32, SubmitError> {
        let free = self.free_slots.ring();
        if let Some(s) = free.pop(None) {
            return Ok(self.announce(s));
        }
        let deadline = match block {
            Block::No if self.workerless() => return Err(SubmitError::NoWorkers),
            Block::No => return Err(SubmitError::QueueFull),
            Block::Until(d) => d,
        };
        let mut got = None;
        let ok = wait_on(
            &self.slot_freed,
            self.cfg.caller_wait.spin(),
            deadline,
            || {
                if self.closing.load(Ordering::SeqCst)
                    || self.broken.load(Ordering::SeqCst)
                    || self.workerless()
                {
                    return true;
                }
                got = free.pop(None);
                got.is_some()
            },
        );
        match got {
            Some(s) => Ok(self.announce(s)),
            None if !ok => Err(SubmitError::Timeout),
            None => Err(self.refusal().unwrap_or(if self.workerless() {
                SubmitError::NoWorkers
            } else {
                SubmitError::Shutdown
            })),
        }
    }

    /// A submit took `slot`: marks it `SUBMITTING` (SeqCst: the submit's half of the Dekker
    /// pairs in `SlotMeta::phase`), then wakes the reactor if it sleeps with no timer.
    #[inline]
    fn announce(&self, slot: u32) -> u32 {
        self.meta[slot as usize]
            .phase
            .swap(SUBMITTING, Ordering::SeqCst);
        self.reactor_wake_if_idle();
        slot
    }

    /// Why no task can be submitted now, if so: broken down, or shut down. (No worker is
    /// checked later, after the task's own checks.)
    #[inline]
    fn refusal(&self) -> Option<SubmitError> {
        // The usual answer, with no error built: two loads, inlined into every submit.
        if !self.broken.load(Ordering::SeqCst) && !self.closing.load(Ordering::SeqCst) {
            return None;
        }
        self.refusal_of_a_closed_pool()
    }

    /// [`refusal`](Self::refusal) once the pool is broken or closing.
    #[cold]
    #[inline(never)]
    fn refusal_of_a_closed_pool(&self) -> Option<SubmitError> {
        if let Some(reason) = self.broken_reason() {
            return Some(SubmitError::Broken { reason });
        }
        if self.closing.load(Ordering::SeqCst) {
            return Some(SubmitError::Shutdown);
        }
        None
    }

    /// Whether a free slot exists right now.
    pub(crate) fn has_free_slot(&self) -> bool {
        !self.free_slots.ring().is_empty()
    }

    /// Registers a waker to be woken when a slot is freed (async submit on a full queue).
    pub(crate) fn wait_slot_async(&self, waker: &Waker) {
        let mut w = self.slot_waiters.lock().unwrap_or_else(|e| e.into_inner());
        // A future re-polled while it waits registers once (a spinning caller re-polls often);
        // only the latest entries are compared, so many waiters cost no quadratic scan.
        if w.iter().rev().take(16).any(|x| x.will_wake(waker)) {
            return;
        }
        w.push(waker.clone());
        self.slot_waiters_n.store(w.len(), Ordering::SeqCst);
    }

    /// Submits a task: serialises it into its slot (or an arena block if it is too big) and
    /// queues it. `payload` is `(offset, len, block len)` of an arena block a loan filled.
    pub(crate) fn submit_with<T: crate::codec::Encode + Plain>(
        &self,
        task: &T,
        payload: Option<(u64, u64, u64)>,
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        self.submit_inner(TaskSrc::Encode(task), payload, block, opts)
    }

    /// Submits a task whose archive is already in an arena block (`(offset, len, block
    /// len)`, from a loan): the block passes to the slot on success and stays the caller's on
    /// an error. The worker validates the archive as it does every task.
    pub(crate) fn submit_placed(
        &self,
        placed: (u64, u64, u64),
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        self.submit_inner::<()>(TaskSrc::Placed(placed), None, block, opts)
    }

    fn submit_inner<T: crate::codec::Encode + Plain>(
        &self,
        task: TaskSrc<'_, T>,
        payload: Option<(u64, u64, u64)>,
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        if let Some(e) = self.refusal() {
            return Err(e);
        }
        let slot = self.acquire_slot(block)?;
        // Again, now that the slot is announced: a shutdown that began since either sees it
        // (and waits for its push) or is seen here.
        if let Some(e) = self.refusal() {
            return Err(self.abort_submit(slot, e));
        }
        let inline_off = self.layout.slot_data_off(slot);
        let inline_cap = self.layout.params.slot_inline as usize;
        let meta = &self.meta[slot as usize];
        let (task_off, task_len, placed) = match task {
            TaskSrc::Placed(p) => (p.0, p.1, Some(p)),
            TaskSrc::Encode(task) => match task.plain() {
                // A plain number goes straight into the header word (`codec::plain`:
                // rkyv's bytes without rkyv's serialiser), as a tiny archive would below.
                Some(w) => {
                    if w.len > self.max_task_bytes {
                        return Err(self.too_large(slot, w.len));
                    }
                    (
                        u64::from_ne_bytes(w.bytes),
                        w.len as u64 | TASK_IN_HEADER as u64,
                        None,
                    )
                }
                None => {
                    // The user's `Serialize` runs here: one that panics must not leave the slot
                    // taken (`SUBMITTING` for ever would hang the pool's shutdown).
                    let encoded = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                        self.encode_task(slot, task, inline_off, inline_cap, block)
                    }));
                    let (off, len) = match encoded {
                        Ok(r) => r?,
                        Err(panic) => {
                            self.give_back(slot);
                            std::panic::resume_unwind(panic);
                        }
                    };
                    if off == inline_off as u64 && len <= WORD_BYTES as u64 {
                        // A tiny task travels in its slot header's own line (written below by
                        // `prepare`): the worker never reads the data area for it, so that line
                        // stays in this thread's cache.
                        let mut word = [0u8; WORD_BYTES];
                        // SAFETY: the slot's inline area (at least 64 bytes) is ours alone until
                        // the push; its first `len <= 8` bytes were just written.
                        unsafe {
                            std::ptr::copy_nonoverlapping(
                                self.seg.bytes_ptr(inline_off, WORD_BYTES),
                                word.as_mut_ptr(),
                                WORD_BYTES,
                            )
                        };
                        (u64::from_ne_bytes(word), len | TASK_IN_HEADER as u64, None)
                    } else {
                        (off, len, None)
                    }
                }
            },
        };
        // Checked after the size checks (a task too large is that, whatever the workers), and
        // before anything is queued.
        if self.workerless() {
            return Err(self.abort_submit(slot, SubmitError::NoWorkers));
        }
        if let Some((off, _, blk)) = placed {
            meta.task_blk.0.store(off, Ordering::Relaxed);
            meta.task_blk.1.store(blk, Ordering::Relaxed);
        }
        // Pool-unique without a shared counter: the slot's previous id plus the number of
        // slots (ids of slot `s` are `s + 1 + k * n_slots`), never reused, never 0.
        let task_id = match meta.task_id() {
            0 => slot as u64 + 1,
            prev => prev + self.n_slots() as u64,
        };
        let (pay_off, pay_len) = match payload {
            Some((off, len, blk)) => {
                meta.pay_blk.0.store(off, Ordering::Relaxed);
                meta.pay_blk.1.store(blk, Ordering::Relaxed);
                (off, len)
            }
            None => (0, 0),
        };
        // Times only when something reads them: a batching pool (queue delay, the oldest
        // task's wait) or a deadline. Always stored: stale values must not outlive a task.
        let batching = self.header().batch.max.load(Ordering::Relaxed) > 1;
        // The time left is read before the clock it is added to, so the deadline in shared
        // memory is never earlier than the caller's `Instant` (a preemption in between moves
        // it later, not earlier: nothing is answered `Timeout` before its deadline).
        let left = opts
            .deadline
            .map(|d| d.saturating_duration_since(Instant::now()).as_nanos());
        let submitted_ns = if batching || left.is_some() {
            crate::sys::mono_ns()
        } else {
            0
        };
        let deadline_ns =
            left.map(|left| submitted_ns.saturating_add(left.min(u64::MAX as u128) as u64));
        let times = self.times(slot);
        times.submitted_ns.store(submitted_ns, Ordering::Relaxed);
        // A load first, as in `retire`: most tasks have no deadline and were not cancelled,
        // and neither was the last.
        let own = deadline_ns.unwrap_or(0);
        if own != 0 || meta.settle_at.load(Ordering::Relaxed) != 0 {
            meta.settle_at.store(own, Ordering::Relaxed);
            meta.settled.store(0, Ordering::Relaxed);
            meta.cancel_late.store(false, Ordering::Relaxed);
            meta.alarm_ns.store(own, Ordering::Relaxed);
            meta.budget_ns
                .store(own.saturating_sub(submitted_ns), Ordering::Relaxed);
        }
        times
            .deadline_ns
            .store(deadline_ns.unwrap_or(0), Ordering::Relaxed);
        let kind = if opts.batch { bits::BATCH } else { 0 }
            | if deadline_ns.is_some() {
                bits::DEADLINE
            } else {
                0
            };
        self.slot(slot).prepare(
            task_id,
            (task_off, task_len as u32),
            (pay_off, pay_len),
            kind,
        );
        meta.task_id.store(task_id, Ordering::Relaxed);
        #[cfg(feature = "tracing")]
        {
            *meta.submitted.lock().unwrap_or_else(|e| e.into_inner()) = Some(Instant::now());
        }
        meta.res.store(task_id << 3, Ordering::Relaxed);
        meta.by_parent.store(false, Ordering::Relaxed);
        meta.directed_to
            .store(opts.target.map_or(0, |s| s + 1), Ordering::Relaxed);
        let timeout = opts.timeout.or(self.cfg.task_timeout);
        let timeout_ns = timeout.map_or(0, |d| d.as_nanos().clamp(1, u64::MAX as u128) as u64);
        meta.timeout_ns.store(timeout_ns, Ordering::Relaxed);
        if timeout_ns != 0 {
            self.timed_in_flight.fetch_add(1, Ordering::SeqCst);
            self.wake_supervisor();
        }
        meta.retries_left.store(
            opts.retries.unwrap_or(self.cfg.task_retries),
            Ordering::Relaxed,
        );
        if let Some(seat) = opts.target {
            // SYNC POINT: the Release store of the offer publishes the slot contents written
            // above to the worker's Acquire load of `direct`. The broadcaster serialises offers
            // per pool, so the word is free (taken by the worker, or cleared by its recovery).
            self.ctl(seat).direct.store(slot + 1, Ordering::Release);
            meta.phase.store(QUEUED, Ordering::Release);
            // Unconditionally (rare: broadcasts): a missed wake would hold the broadcast until
            // the next task arrives.
            self.header().task_ready.wake_all_unconditionally();
            return Ok((slot, task_id));
        }
        // SYNC POINT: the push's Release store of the cell stamp publishes the slot contents
        // written above to the worker's Acquire in pop.
        if self.task_ring().push(slot).is_err() {
            // The ring has room for every slot, so a push that cannot proceed means a worker
            // corrupted the shared queue (or a consumer stalls it past all patience).
            let reason = "the shared task queue stopped accepting tasks (a worker corrupted it)";
            self.declare_broken(reason);
            // The loan's block stays with the caller's `Loan`, which frees it on this error.
            meta.pay_blk.1.store(0, Ordering::Relaxed);
            if placed.is_some() {
                meta.task_blk.1.store(0, Ordering::Relaxed);
            }
            self.retire(slot);
            return Err(SubmitError::Broken {
                reason: reason.into(),
            });
        }
        // Release: `quiesce_submits` Acquires it, then the shutdown sees the task queued.
        // Nobody else can give the slot back before this submit returns its handle.
        meta.phase.store(QUEUED, Ordering::Release);
        self.header().task_ready.notify_one();
        // The supervisor may have declared "no workers" and drained the queue between our
        // check above and the push (SeqCst both sides: it sees our push, or we see its flag).
        // It drains again when woken: only the supervisor pops on the parent's behalf, so a
        // parent pop never races its queue repair.
        if self.workerless() {
            self.wake_supervisor();
        }
        Ok((slot, task_id))
    }

    /// Gives `slot` back, refusing a task whose archive of `len` bytes exceeds
    /// `max_task_bytes` (the limit holds for every task, also one that fits its slot).
    #[cold]
    fn too_large(&self, slot: u32, len: usize) -> SubmitError {
        self.abort_submit(
            slot,
            SubmitError::PayloadTooLarge {
                len,
                max: self.max_task_bytes,
            },
        )
    }

    /// Writes `task`'s archive into `slot`'s inline area, or an arena block when it does not
    /// fit (recorded in the slot's meta to be freed at retirement). On an error the slot is
    /// given back.
    fn encode_task<T: crate::codec::Encode>(
        &self,
        slot: u32,
        task: &T,
        inline_off: usize,
        inline_cap: usize,
        block: Block,
    ) -> Result<(u64, u64), SubmitError> {
        use crate::codec::{EncodeError, encode_into, encoded_len};
        let meta = &self.meta[slot as usize];
        // SAFETY: the slot came off the free list, so its inline area is ours alone until the
        // push publishes it (no worker holds it, no caller reads it).
        let first =
            unsafe { encode_into(task, self.seg.bytes_ptr(inline_off, inline_cap), inline_cap) };
        Ok(match first {
            // The limit holds for every task, also one that fits its slot's inline area.
            Ok(n) if n > self.max_task_bytes => return Err(self.too_large(slot, n)),
            Ok(n) => (inline_off as u64, n as u64),
            Err(EncodeError::Overflow) => {
                let len = match encoded_len(task) {
                    Ok(n) => n,
                    Err(e) => return Err(self.abort_submit(slot, encode_err(e))),
                };
                if len > self.max_task_bytes {
                    return Err(self.too_large(slot, len));
                }
                let Some((off, blk)) = self.arena.alloc(len as u64, block, || {
                    self.closing.load(Ordering::SeqCst) || self.broken.load(Ordering::SeqCst)
                }) else {
                    let e = self.refusal().unwrap_or(match block {
                        Block::No => SubmitError::QueueFull,
                        Block::Until(_) => SubmitError::Timeout,
                    });
                    return Err(self.abort_submit(slot, e));
                };
                if let Err(e) = self.reserve_arena(off + blk) {
                    self.arena.free(off, blk);
                    return Err(self.abort_submit(slot, no_space(blk, &e)));
                }
                // Recorded first: a `Serialize` that panics leaves it for the caller to free.
                meta.task_blk.0.store(off, Ordering::Relaxed);
                meta.task_blk.1.store(blk, Ordering::Relaxed);
                // SAFETY: a fresh arena block of at least `len` bytes, ours alone until the
                // push publishes it.
                match unsafe { encode_into(task, self.seg.bytes_ptr(off as usize, len), len) } {
                    Ok(n) => (off, n as u64),
                    Err(e) => return Err(self.abort_submit(slot, encode_err(e))),
                }
            }
            Err(e) => return Err(self.abort_submit(slot, encode_err(e))),
        })
    }

    /// Supervisor thread only: takes every task still in the queue and completes it with
    /// `kind` (no worker will run them). Safe against workers popping at the same time: each
    /// task goes to whoever pops it. Bounded by the number of slots.
    pub(crate) fn fail_queued(&self, kind: u32) -> usize {
        let ring = self.task_ring();
        let mut n = 0;
        for _ in 0..=self.layout.ring_cap {
            let Some(slot) = ring.pop(None) else { break };
            if slot < self.n_slots() {
                self.complete_from_parent(slot, RawOutcome::new(kind, u32::MAX, 0, 0));
                n += 1;
            }
        }
        n
    }

    /// Publishes an outcome the parent decided (no ring record): cancelled, worker died, timed
    /// out, no workers, broken. The caller owns the slot's task (it popped it, or its worker is
    /// dead).
    pub(crate) fn complete_from_parent(&self, slot: u32, o: RawOutcome) {
        // Before DONE: a reader that Acquires DONE sees it.
        self.meta[slot as usize]
            .by_parent
            .store(true, Ordering::Relaxed);
        let sh = self.slot(slot);
        sh.publish(o).run(sh, &self.header().doorbell);
    }

    /// Puts a task whose worker died back in the queue, for another worker to run (its retry
    /// policy allowed it), counted in `tasks_retried`. Waiter bits are kept; the claim is
    /// undone. Returns `false` (and leaves the task unanswered, for the caller to answer) if
    /// the queue refuses it, or if the task was offered to one worker alone.
    pub(crate) fn requeue(&self, slot: u32) -> bool {
        if self.meta(slot).directed_to.load(Ordering::Relaxed) != 0 {
            // A task offered to one worker alone (a broadcast) never goes to the shared queue:
            // any worker could pop it, one that already ran it included.
            return false;
        }
        self.slot(slot).unclaim();
        // Counted before the push: the task's next worker may answer it before this thread
        // runs again, and a caller holding that answer must find the retry in the stats. (A
        // push fails only on a corrupted queue; the count is then taken back.)
        self.stats.tasks_retried.fetch_add(1, Ordering::Relaxed);
        if self.task_ring().push(slot).is_err() {
            self.stats.tasks_retried.fetch_sub(1, Ordering::Relaxed);
            return false;
        }
        self.header().task_ready.notify_one();
        // Back in the queue past its deadline: its answer is settled now (nobody holds it),
        // so wake whoever waits on it to look (a blocked caller's slice, a future).
        let at = self.meta(slot).settle_at.load(Ordering::Relaxed);
        if at > 1 && crate::sys::mono_ns() >= at {
            crate::sys::futex_wake(&self.slot(slot).state, i32::MAX);
            if self.settled_early(slot) {
                self.wake_settled(slot);
            }
        }
        true
    }

    /// A submit gives up before queueing: gives the slot back ([`give_back`](Self::give_back))
    /// and returns `e`.
    fn abort_submit(&self, slot: u32, e: SubmitError) -> SubmitError {
        self.give_back(slot);
        e
    }

    /// Gives back a slot taken by a submit that queued nothing, with the arena block its
    /// task was encoded into, if any (recorded in `task_blk` as soon as it was taken; a
    /// loan's block is recorded only after the last point where a submit gives up, so it
    /// stays the caller's).
    fn give_back(&self, slot: u32) {
        let meta = &self.meta[slot as usize];
        let blk = meta.task_blk.1.swap(0, Ordering::Relaxed);
        if blk != 0 {
            self.arena
                .free(meta.task_blk.0.load(Ordering::Relaxed), blk);
        }
        self.release_slot(slot);
    }

    /// After offering the task in `slot` to `seat` alone: if the seat has meanwhile been freed
    /// (its worker failed for good, or retired), takes the offer back and answers it
    /// `Cancelled`, unless the supervisor's own sweep of the seat got it first (see
    /// `Sup::free_seat`, which marks the seat free before it sweeps).
    pub(crate) fn confirm_offer(&self, seat: u32, slot: u32) {
        let free = !self.lock_seats()[seat as usize].in_use;
        if free
            && self
                .ctl(seat)
                .direct
                .compare_exchange(slot + 1, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_ok()
        {
            self.complete_from_parent(slot, RawOutcome::new(KIND_CANCELLED, seat, 0, 0));
        }
    }

    /// Wakes every submit waiting for a free slot (it re-checks why it may not go on).
    pub(crate) fn wake_submitters(&self) {
        self.slot_freed.notify_all();
        self.wake_slot_waiters();
    }

    /// Waits (as shutdown, after raising `closing`) until no submit is between taking its
    /// slot and queueing its task (or giving the slot back). A submit that took its slot
    /// later sees `closing` and gives it back.
    pub(crate) fn quiesce_submits(&self) {
        self.slot_freed.notify_all();
        self.arena.wake_all();
        self.wake_slot_waiters();
        while self
            .meta
            .iter()
            .any(|m| m.phase.load(Ordering::SeqCst) == SUBMITTING)
        {
            std::thread::yield_now();
        }
    }

    // ---- completion ----

    /// Whether the task in `slot` has finished.
    pub(crate) fn is_done(&self, slot: u32) -> bool {
        self.slot(slot).is_done()
    }

    /// Waits until `slot` is done: spin, then park on the slot's state word. `false` on
    /// timeout.
    fn wait_done(&self, slot: u32, until: Option<Instant>) -> bool {
        self.wait_done_or_woken(slot, until, false)
    }

    /// [`wait_done`](Self::wait_done), also returning `false` at the first wake-up of its
    /// sleep (`woken_ends`) that did not bring `DONE` (a requeue past the deadline wakes it).
    fn wait_done_or_woken(&self, slot: u32, until: Option<Instant>, woken_ends: bool) -> bool {
        let sh = self.slot(slot);
        let spin = spin_within(self.cfg.caller_wait.spin(), until);
        if spin_until(spin, || sh.is_done()) {
            return true;
        }
        loop {
            let Some(sleep_on) = sh.announce_sleeper() else {
                return true;
            };
            let timeout = match until {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return false,
                },
                None => None,
            };
            // Bounded sleeps: the `WAIT_THREAD` flag is in shared memory, and a worker could
            // clear it so that the publish does not wake us; we then look again each second.
            let timeout = Some(timeout.map_or(SLEEP_LOOK, |t| t.min(SLEEP_LOOK)));
            futex_wait(&sh.state, sleep_on, timeout);
            if sh.is_done() {
                return true;
            }
            if woken_ends {
                return false;
            }
        }
    }

    /// Waits for a task a worker claimed before its deadline: until it is done, or `until`,
    /// or its answer settles after all (its worker died and the task went back to the queue
    /// past its deadline: the requeue wakes this wait, and each sleep is also cut at
    /// [`SLEEP_LOOK`] to look again).
    fn wait_claimed(&self, slot: u32, until: Option<Instant>) -> Waited {
        loop {
            if self.settle(slot) != 0 {
                return Waited::Settled;
            }
            let slice = Instant::now() + SLEEP_LOOK;
            let end = until.map_or(slice, |u| u.min(slice));
            if self.wait_done_or_woken(slot, Some(end), true) {
                return Waited::Done;
            }
            if until.is_some_and(|u| Instant::now() >= u) {
                return match self.settle(slot) {
                    0 => Waited::TimedOut,
                    _ => Waited::Settled,
                };
            }
        }
    }

    /// [`wait_done`](Self::wait_done) for a task whose answer settles at `settle_at`
    /// (`SlotMeta::settle_at`, not 0): until it is done, or `until`, or `settle_at`.
    fn wait_settling(&self, slot: u32, until: Option<Instant>, settle_at: u64) -> Waited {
        let left = settle_at.saturating_sub(crate::sys::mono_ns());
        let at = crate::deadline::at_or_never(Instant::now(), Duration::from_nanos(left));
        match until {
            Some(u) if u < at => match self.wait_done(slot, Some(u)) {
                true => Waited::Done,
                false => Waited::TimedOut,
            },
            _ => match self.wait_done(slot, Some(at)) {
                true => Waited::Done,
                false => Waited::Settled,
            },
        }
    }

    /// Whether the task's answer is settled without a worker: its caller cancelled it before
    /// any worker claimed it, or its deadline has passed with no worker on it (then this
    /// decides it: `SlotHeader::expire`, a compare-exchange against the claim). Settled is
    /// for good: collecting then answers at once ([`Self::try_settle`]). One parent-local
    /// load for other tasks.
    pub(crate) fn settled_early(&self, slot: u32) -> bool {
        self.meta(slot).settle_at.load(Ordering::Relaxed) != 0 && self.settle(slot) != 0
    }

    /// The settled answer (`SETTLED_*`), deciding a passed deadline; 0 if none (yet).
    fn settle(&self, slot: u32) -> u8 {
        let meta = self.meta(slot);
        let decided = meta.settled.load(Ordering::Acquire);
        if decided != 0 {
            return decided;
        }
        let at = meta.settle_at.load(Ordering::Relaxed);
        if at <= 1 || crate::sys::mono_ns() < at {
            return 0;
        }
        if !self.slot(slot).expire() {
            return self.settled_by_another(slot);
        }
        // Another thread may have settled it meanwhile (a cancel: keep the first answer).
        let decided = record_timeout(meta);
        // Recorded: the task is `CANCELLED` and unclaimed, off the queue's head with it (only
        // now, so that whoever sees it answered finds the answer recorded).
        self.settled_in_queue();
        decided
    }

    /// `settle` found the task, past its deadline, no longer expirable. If it is done and
    /// `CANCELLED`, and its caller did not cancel it after a worker's claim, the `CANCELLED`
    /// came from the deadline (another thread's `expire`, whose record of `Timeout` may still
    /// be on its way) or from a cancel before any claim (which records `Cancelled`), and
    /// whoever popped it skipped it (a worker, which sets `CLAIMED` as it skips, or the
    /// supervisor): the answer is the recorded one, or `Timeout`, recorded here (first one
    /// stands). No waiting. Otherwise whatever is recorded (0: the outcome answers).
    fn settled_by_another(&self, slot: u32) -> u8 {
        let meta = self.meta(slot);
        let st = self.slot(slot).state_bits();
        if st & (bits::DONE | bits::CANCELLED) != bits::DONE | bits::CANCELLED
            || meta.cancel_late.load(Ordering::Acquire)
        {
            return meta.settled.load(Ordering::Acquire);
        }
        record_timeout(meta)
    }

    /// Collecting task `task_id`, if its answer is settled without a worker
    /// ([`Self::settled_early`]): `Cancelled` or `Timeout`. The slot goes to the reactor, as a
    /// dropped handle's does: the worker that pops the task skips it. `None` if nothing is
    /// settled (a worker has the task, or it is not cancelled and its deadline has not
    /// passed). Call once per task, from the path that consumes its handle.
    pub(crate) fn try_settle(&self, slot: u32, task_id: u64) -> Option<TaskError> {
        let meta = self.meta(slot);
        if meta.settle_at.load(Ordering::Relaxed) == 0 {
            return None;
        }
        let e = match self.settle(slot) {
            0 => return None,
            SETTLED_CANCELLED => TaskError::Cancelled,
            _ => TaskError::Timeout {
                worker: crate::error::NO_WORKER,
                after: Duration::from_nanos(meta.budget_ns.load(Ordering::Relaxed)),
            },
        };
        self.detach(slot, task_id);
        Some(e)
    }

    /// Waits until collecting `slot`'s task will not block, or until `until` (then `false`):
    /// the task is done, or its answer is settled without a worker
    /// ([`Self::settled_early`]).
    pub(crate) fn wait_settled(&self, slot: u32, until: Option<Instant>) -> bool {
        let at = self.meta(slot).settle_at.load(Ordering::Relaxed);
        if at == 0 {
            return self.wait_done(slot, until);
        }
        if self.settle(slot) != 0 {
            return true;
        }
        match self.wait_settling(slot, until, at) {
            Waited::Done => true,
            Waited::TimedOut => false,
            // Settled now, or a worker claimed it in time: that worker answers it.
            Waited::Settled => !matches!(self.wait_claimed(slot, until), Waited::TimedOut),
        }
    }

    /// Waits for task `task_id` in `slot` until it is done (`Ok(true)`), or until `until`
    /// (`Ok(false)`). A task whose answer is settled without a worker (cancelled before any
    /// worker claimed it, or past its deadline with no worker on it, now or while this waits)
    /// is answered at once ([`Self::try_settle`]: `Err`, the slot handed to the reactor).
    pub(crate) fn wait_collect(
        &self,
        slot: u32,
        task_id: u64,
        until: Option<Instant>,
    ) -> Result<bool, TaskError> {
        let at = self.meta(slot).settle_at.load(Ordering::Relaxed);
        if at == 0 {
            return Ok(self.wait_done(slot, until));
        }
        if let Some(e) = self.try_settle(slot, task_id) {
            return Err(e);
        }
        let waited = match self.wait_settling(slot, until, at) {
            // A worker has it, or the deadline settles it now (`wait_claimed` looks first).
            Waited::Settled => self.wait_claimed(slot, until),
            w => w,
        };
        match waited {
            Waited::TimedOut => Ok(false),
            // Done may follow a settle (by the reactor for a waker registered on this task,
            // or by a requeue): the worker that skipped the task published `Cancelled`, and
            // the settled answer stands.
            Waited::Done | Waited::Settled => self.try_settle(slot, task_id).map_or(Ok(true), Err),
        }
    }

    /// The task's answer is settled without a worker: wakes the waker registered on `slot`,
    /// if any, and drops it (the worker that skips the task later must not wake it again;
    /// once settled, nothing registers anew: `wake_when_finished` and `poll` answer first).
    /// Outside the lock: a waker may collect at once.
    pub(crate) fn wake_settled(&self, slot: u32) {
        let waker = self
            .meta(slot)
            .waker
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take();
        if let Some(w) = waker {
            w.wake();
        }
    }

    /// Registers `waker` for `slot` (task `task_id`); returns whether the task is already done.
    pub(crate) fn register_waker(&self, slot: u32, task_id: u64, waker: &Waker) -> bool {
        let meta = &self.meta[slot as usize];
        let fresh = {
            let mut w = meta.waker.lock().unwrap_or_else(|e| e.into_inner());
            match &*w {
                Some(old) if old.will_wake(waker) => false,
                _ => {
                    *w = Some(waker.clone());
                    true
                }
            }
        };
        let done = meta.arb.watch(self.slot(slot), task_id);
        if fresh && !done && meta.alarm_ns.load(Ordering::Relaxed) != 0 {
            // The reactor may be asleep for its longest look: have it set its timer for this
            // task's deadline (`reactor_scan`).
            self.header().doorbell.notify_all();
        }
        done
    }

    /// Marks the task in `slot` cancelled while its handle lives on: a worker that pops it
    /// answers `Cancelled` instead of running it, and so does the supervisor if it would have
    /// re-queued it. The caller holds the task's uncollected handle, so the slot is still this
    /// task's (nobody else can retire it) and the bit lands on the right task.
    pub(crate) fn cancel(&self, slot: u32) {
        if !self.slot(slot).cancel() {
            // A worker has it (or it is done): a `Cancelled` it may answer is this cancel's.
            self.meta(slot).cancel_late.store(true, Ordering::Release);
            return;
        }
        // No worker had claimed it: it never runs, and its answer is `Cancelled` now (unless
        // its deadline settled it first). Wake whoever waits for it to finish.
        let meta = self.meta(slot);
        if meta
            .settled
            .compare_exchange(0, SETTLED_CANCELLED, Ordering::AcqRel, Ordering::Relaxed)
            .is_ok()
        {
            meta.settle_at.store(1, Ordering::Relaxed);
        }
        self.wake_settled(slot);
        self.settled_in_queue();
    }

    /// The handle of `slot` was dropped before collecting: cancel the task if it has not
    /// started, and make sure the slot is retired exactly once.
    pub(crate) fn detach(&self, slot: u32, task_id: u64) {
        let meta = &self.meta[slot as usize];
        meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        if meta.arb.detach(self.slot(slot), task_id) {
            self.retire(slot);
        } else if self.slot(slot).is_takeable() {
            // Cancelled by the detach before any worker claimed it (or, if the reactor
            // retired the slot and a submit reused it meanwhile, a needless look).
            self.settled_in_queue();
        }
    }

    /// Supervisor thread only: takes the tasks settled without a worker (`CANCELLED`, not
    /// claimed: cancelled, past their deadline, or their handles dropped) off the head of the
    /// queue and answers them `Cancelled`, as the worker that popped them would (a caller's
    /// settled answer stands; a detached slot goes to the reactor, which retires it). Without
    /// this, such tasks hold their places until a worker reaches them, which a worker busy
    /// for long does not. Stops at the first task that is not settled (tasks behind it wait
    /// for a worker, as before); bounded by the queue's capacity.
    pub(crate) fn take_settled_heads(&self) -> usize {
        if !self.settled_queued.swap(false, Ordering::SeqCst) {
            return 0;
        }
        let ring = self.task_ring();
        let mut n = 0;
        for _ in 0..=self.layout.ring_cap {
            let takeable = |slot: u32| {
                slot < self.n_slots()
                    && self.meta[slot as usize].phase.load(Ordering::SeqCst) == QUEUED
                    && self.slot(slot).is_takeable()
            };
            let Some(slot) = ring.pop_head_if(takeable) else {
                break;
            };
            self.complete_from_parent(slot, RawOutcome::new(KIND_CANCELLED, u32::MAX, 0, 0));
            n += 1;
        }
        n
    }

    /// Releases everything `slot` holds and returns it to the free list. Exactly once per task.
    pub(crate) fn retire(&self, slot: u32) {
        self.forget_result(slot);
        let meta = &self.meta[slot as usize];
        #[cfg(feature = "tracing")]
        if let Some(t) = meta
            .submitted
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .take()
        {
            let o = self.slot(slot).outcome();
            let micros = t.elapsed().as_micros().min(u64::MAX as u128) as u64;
            let ok = o.kind == crate::slot::outcome::KIND_OK;
            crate::telemetry::task_done(meta.task_id(), o.worker, micros, ok);
        }
        // Loads first, and a store only where there is something to reset: these words are
        // written only by the submit that filled the slot and by this retirement (exactly once
        // per task), so nothing can change them in between. A swap each would be a locked
        // instruction that waits for every store before it to leave the core (four of them
        // were ≈ 4 % of W2's caller time).
        if meta.timeout_ns.load(Ordering::Relaxed) != 0 {
            meta.timeout_ns.store(0, Ordering::Relaxed);
            self.timed_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        // A waker is only ever stored together with the reactor's interest (and the reactor
        // takes it when it clears the interest), so synchronous callers skip the waker lock.
        if meta.arb.clear() {
            meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        for blk in [&meta.task_blk, &meta.pay_blk] {
            let len = blk.1.load(Ordering::Relaxed);
            if len != 0 {
                blk.1.store(0, Ordering::Relaxed);
                self.arena.free(blk.0.load(Ordering::Relaxed), len);
            }
        }
        self.release_slot(slot);
    }

    #[inline]
    fn release_slot(&self, slot: u32) {
        // The slot's state keeps DONE until the next submit resets it: a supervisor checking a
        // dead worker's stale claim on this slot must never mistake it for a task in progress.
        self.meta[slot as usize]
            .phase
            .store(FREE, Ordering::Relaxed);
        if self.free_slots.ring().push(slot).is_err() {
            unreachable!("the parent-local free list has room for every slot");
        }
        self.slot_freed.notify_all();
        if self.slot_waiters_n.load(Ordering::SeqCst) != 0 {
            self.wake_slot_waiters();
        }
    }

    pub(super) fn wake_slot_waiters(&self) {
        let wakers = {
            let mut w = self.slot_waiters.lock().unwrap_or_else(|e| e.into_inner());
            self.slot_waiters_n.store(0, Ordering::SeqCst);
            std::mem::take(&mut *w)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// After every worker is gone: tasks still queued or claimed will never run; answer them
    /// (`Cancelled`, or `kind`) so no caller waits forever.
    pub(crate) fn cancel_unfinished(&self, kind: u32) {
        let ring = self.task_ring();
        for _ in 0..=self.layout.ring_cap {
            if ring.pop(None).is_none() {
                break;
            }
        }
        for i in 0..self.n_slots() {
            let done = self.slot(i).is_done();
            // `QUEUED` only: a slot still `SUBMITTING` now belongs to a submit that began too
            // late, which sees `closing` (or `broken`) and gives it back.
            let queued = self.meta[i as usize].phase.load(Ordering::SeqCst) == QUEUED;
            if queued && !done {
                self.complete_from_parent(i, RawOutcome::new(kind, u32::MAX, 0, 0));
            }
        }
        self.header().doorbell.notify_all();
    }
}

/// `SlotMeta::phase`: on the free list.
pub(super) const FREE: u8 = 0;
/// `SlotMeta::phase`: taken by a submit that is still writing, or giving it back.
pub(super) const SUBMITTING: u8 = 1;
/// `SlotMeta::phase`: its task is queued (or offered to one worker), until retirement.
pub(super) const QUEUED: u8 = 2;

/// Records `Timeout` as the task's settled answer, unless one is recorded already (the first
/// stands); returns the answer that stands.
fn record_timeout(meta: &SlotMeta) -> u8 {
    match meta
        .settled
        .compare_exchange(0, SETTLED_TIMEOUT, Ordering::AcqRel, Ordering::Acquire)
    {
        Ok(_) => SETTLED_TIMEOUT,
        Err(first) => first,
    }
}

/// `SlotMeta::settled`: the deadline passed with no worker on the task.
const SETTLED_TIMEOUT: u8 = 1;
/// `SlotMeta::settled`: its caller cancelled it before any worker claimed it.
const SETTLED_CANCELLED: u8 = 2;

/// How a wait for a task whose answer may settle without a worker ended.
enum Waited {
    /// The task is done.
    Done,
    /// The caller's time ran out.
    TimedOut,
    /// The time its answer settles came first.
    Settled,
}

/// How long a blocked caller sleeps at most between looks at its slot.
const SLEEP_LOOK: std::time::Duration = std::time::Duration::from_secs(1);

fn encode_err(e: crate::codec::EncodeError) -> SubmitError {
    SubmitError::Encode(e.message())
}
