//! The parent's side of one pool, independent of the worker type: the segment, slot
//! bookkeeping, submission, waiting, result release, and the reactor.
//!
//! # A task's walk
//!
//! 1. *Acquire a slot*: pop an index from the parent's free-slot list (a heap MPMC ring).
//! 2. *Write the task*: serialise the archive into the slot's inline area, or (if it overflows)
//!    measure it and serialise into an arena block; fill the slot header; `state = 0`.
//! 3. *Queue it*: push the slot index on the shared task ring (Release) and notify
//!    `task_ready` (one load if no worker sleeps).
//! 4. A worker pops it, sets `CLAIMED`, reads the archive in place, executes, writes the result
//!    into its completion ring, fills the slot's result fields and sets `DONE` (Release); it
//!    wakes a sleeping caller (`WAIT_THREAD`) or rings the reactor (`WAIT_REACTOR`).
//! 5. The caller (spinning, parked on the slot's futex, or woken by the reactor) validates
//!    the result in place, decodes or borrows it, then *retires* the slot: releases the result
//!    record, frees arena blocks, and returns the index to the free list.
//!
//! Every slot is retired exactly once, by whoever owns it: the handle that collects the result,
//! or — if the handle was dropped first (detached) — the reactor, arbitrated by a
//! compare-exchange of the slot's `detached` word from that task's id to 0.

use super::arena::{Arena, Block};
use super::builder::Config;
use super::events::{StatCounters, TaskOptions, WorkerState};
use crate::error::SubmitError;
use crate::ring::bytes::{ByteRing, KIND_CANCELLED, has_ring_record};
use crate::ring::mpmc::{HeapMpmc, MpmcCell, MpmcRing};
use crate::ring::wait::{EventCount, spin_until, wait_on};
use crate::shm::layout::{Layout, RING_HDR, SegmentHeader, SlotHeader, WorkerCtl, slot_state};
use crate::shm::segment::Segment;
use crate::sys::{futex_wait, futex_wake};
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;
use std::time::Instant;

/// Parent-local facts about a slot.
#[derive(Debug, Default)]
pub(crate) struct SlotMeta {
    /// Id of the task now in the slot.
    task_id: AtomicU64,
    /// Arena block holding the task archive (len 0: inline).
    task_blk: (AtomicU64, AtomicU64),
    /// Arena block holding a loaned payload (len 0: none).
    pay_blk: (AtomicU64, AtomicU64),
    /// Waker of the future awaiting this slot.
    waker: Mutex<Option<Waker>>,
    /// Task id the reactor should look at when the slot completes (0: none).
    interest: AtomicU64,
    /// Id of a task whose handle was dropped (0: none): the reactor retires the slot when that
    /// task completes. Holding the id (not a bool) keeps a slow reactor pass from retiring a
    /// later task that reused the slot.
    detached: AtomicU64,
    /// Taken from the free list and not yet returned. Read only by shutdown's cancel pass, which
    /// runs after `quiesce_submits` (SeqCst on `active_submits`) has ordered every submit's
    /// store before it, so the stores can be Relaxed.
    in_use: AtomicBool,
    /// The task's execution time limit in nanoseconds (0: none); read by the supervisor.
    pub(crate) timeout_ns: AtomicU64,
    /// How many more times the task may be re-run if its worker dies.
    pub(crate) retries_left: AtomicU32,
}

impl SlotMeta {
    /// Id of the task now in the slot.
    pub(crate) fn task_id(&self) -> u64 {
        self.task_id.load(Ordering::Relaxed)
    }
}

/// A worker seat, as the parent tracks it (the supervisor owns the process itself).
#[derive(Debug, Clone)]
pub(crate) struct Seat {
    /// Taken by a spawn (a live, starting, restarting worker); free seats can be spawned into.
    pub(crate) in_use: bool,
    pub(crate) state: WorkerState,
    pub(crate) pid: u32,
    pub(crate) restarts: u64,
}

impl Default for Seat {
    fn default() -> Self {
        Seat {
            in_use: false,
            state: WorkerState::Empty,
            pid: 0,
            restarts: 0,
        }
    }
}

/// The parent's state of one pool, shared by the pool, its handles and its threads.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) seg: Segment,
    pub(crate) layout: Layout,
    pub(crate) cfg: Config,
    pub(crate) max_task_bytes: usize,
    free_slots: HeapMpmc,
    slot_freed: Box<EventCount>,
    meta: Box<[SlotMeta]>,
    pub(crate) arena: Arena,
    ring_locks: Box<[Mutex<()>]>,
    next_task_id: AtomicU64,
    /// Set when shutdown begins: new submits and spawns fail.
    pub(crate) closing: AtomicBool,
    /// Submits between their `closing` check and their push.
    active_submits: AtomicUsize,
    slot_waiters: Mutex<Vec<Waker>>,
    slot_waiters_n: AtomicUsize,
    pub(crate) reactor_stop: AtomicBool,
    pub(crate) seats: Mutex<Vec<Seat>>,
    /// Identifies this pool (loans must come back to the pool that made them).
    pub(crate) id: u64,
    /// The supervisor's wake-up line (an eventfd it polls; workers get a copy as fd 4).
    pub(crate) wake: OwnedFd,
    /// Set while every worker has failed for good: submits fail fast with `NoWorkers`.
    pub(crate) no_workers: AtomicBool,
    /// Tasks with a timeout submitted and not yet retired (the supervisor watches the clock
    /// only while this is non-zero).
    pub(crate) timed_in_flight: AtomicUsize,
    pub(crate) stats: StatCounters,
}

static NEXT_POOL_ID: AtomicU64 = AtomicU64::new(1);

impl Shared {
    pub(crate) fn new(
        seg: Segment,
        layout: Layout,
        cfg: Config,
        max_task_bytes: usize,
        wake: OwnedFd,
    ) -> Shared {
        let n = layout.params.n_slots as usize;
        let free_slots = HeapMpmc::with_capacity(n);
        for i in 0..n as u32 {
            free_slots
                .ring()
                .push(i)
                .expect("free list holds every slot");
        }
        let arena = Arena::new(layout.arena as u64, layout.params.arena);
        Shared {
            free_slots,
            slot_freed: Box::new(EventCount::new()),
            meta: (0..n).map(|_| SlotMeta::default()).collect(),
            arena,
            ring_locks: (0..layout.params.max_workers)
                .map(|_| Mutex::new(()))
                .collect(),
            next_task_id: AtomicU64::new(1),
            closing: AtomicBool::new(false),
            active_submits: AtomicUsize::new(0),
            slot_waiters: Mutex::new(Vec::new()),
            slot_waiters_n: AtomicUsize::new(0),
            reactor_stop: AtomicBool::new(false),
            seats: Mutex::new(
                (0..layout.params.max_workers)
                    .map(|_| Seat::default())
                    .collect(),
            ),
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            wake,
            no_workers: AtomicBool::new(false),
            timed_in_flight: AtomicUsize::new(0),
            stats: StatCounters::default(),
            seg,
            layout,
            cfg,
            max_task_bytes,
        }
    }

    pub(crate) fn header(&self) -> &SegmentHeader {
        self.seg.get(0)
    }

    pub(crate) fn slot(&self, slot: u32) -> &SlotHeader {
        self.seg
            .get(self.layout.slots + slot as usize * size_of::<SlotHeader>())
    }

    pub(crate) fn ctl(&self, seat: u32) -> &WorkerCtl {
        self.seg
            .get(self.layout.ctls + seat as usize * size_of::<WorkerCtl>())
    }

    pub(crate) fn task_ring(&self) -> MpmcRing<'_> {
        MpmcRing::new(
            &self.header().task_ring,
            self.seg
                .slice::<MpmcCell>(self.layout.task_cells, self.layout.ring_cap),
        )
    }

    pub(crate) fn result_ring(&self, seat: u32) -> Option<ByteRing<'_>> {
        if seat >= self.layout.params.max_workers {
            return None;
        }
        let off = self.layout.result_ring_off(seat);
        let cap = self.layout.params.result_ring;
        // SAFETY: the seat's completion ring lies at `off` (header) and `off + 128` (data,
        // 64-aligned) by the layout; the parent only uses the consumer half of the protocol.
        Some(unsafe {
            ByteRing::new(
                self.seg.get(off),
                self.seg.bytes_ptr(off + RING_HDR, cap as usize),
                cap,
            )
        })
    }

    pub(crate) fn lock_seats(&self) -> MutexGuard<'_, Vec<Seat>> {
        self.seats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes the supervisor thread.
    pub(crate) fn wake_supervisor(&self) {
        crate::sys::eventfd_signal(self.wake.as_fd());
    }

    // ---- submission ----

    /// Takes a free slot, waiting as `block` allows.
    fn acquire_slot(&self, block: Block) -> Result<u32, SubmitError> {
        let free = self.free_slots.ring();
        if let Some(s) = free.pop(None) {
            self.meta[s as usize].in_use.store(true, Ordering::Relaxed);
            return Ok(s);
        }
        let deadline = match block {
            Block::No => return Err(SubmitError::QueueFull),
            Block::Until(d) => d,
        };
        let mut got = None;
        let ok = wait_on(
            &self.slot_freed,
            self.cfg.caller_wait.spin(),
            deadline,
            || {
                if self.closing.load(Ordering::SeqCst) {
                    return true;
                }
                got = free.pop(None);
                got.is_some()
            },
        );
        match got {
            Some(s) => {
                self.meta[s as usize].in_use.store(true, Ordering::Relaxed);
                Ok(s)
            }
            None if !ok => Err(SubmitError::Timeout),
            None => Err(SubmitError::Shutdown),
        }
    }

    /// Whether a free slot exists right now.
    pub(crate) fn has_free_slot(&self) -> bool {
        !self.free_slots.ring().is_empty()
    }

    /// Registers a waker to be woken when a slot is freed (async submit on a full queue).
    pub(crate) fn wait_slot_async(&self, waker: &Waker) {
        let mut w = self.slot_waiters.lock().unwrap_or_else(|e| e.into_inner());
        w.push(waker.clone());
        self.slot_waiters_n.store(w.len(), Ordering::SeqCst);
    }

    /// Submits a task: serialises it into its slot (or an arena block if it is too big) and
    /// queues it. `payload` is `(offset, len, block len)` of an arena block a loan filled.
    pub(crate) fn submit_with<T: crate::codec::Encode>(
        &self,
        task: &T,
        payload: Option<(u64, u64, u64)>,
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        self.active_submits.fetch_add(1, Ordering::SeqCst);
        let r = self.submit_inner(task, payload, block, opts);
        self.active_submits.fetch_sub(1, Ordering::SeqCst);
        r
    }

    fn submit_inner<T: crate::codec::Encode>(
        &self,
        task: &T,
        payload: Option<(u64, u64, u64)>,
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        use crate::codec::{EncodeError, encode_into, encoded_len};
        if self.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::Shutdown);
        }
        if self.no_workers.load(Ordering::SeqCst) {
            return Err(SubmitError::NoWorkers);
        }
        let slot = self.acquire_slot(block)?;
        let inline_off = self.layout.slot_data_off(slot);
        let inline_cap = self.layout.params.slot_inline as usize;
        let meta = &self.meta[slot as usize];
        let (task_off, task_len) =
            match encode_into(task, self.seg.bytes_ptr(inline_off, inline_cap), inline_cap) {
                Ok(n) => (inline_off as u64, n as u64),
                Err(EncodeError::Overflow) => {
                    let len = match encoded_len(task) {
                        Ok(n) => n,
                        Err(e) => return Err(self.abort_submit(slot, encode_err(e))),
                    };
                    if len > self.max_task_bytes {
                        return Err(self.abort_submit(
                            slot,
                            SubmitError::PayloadTooLarge {
                                len,
                                max: self.max_task_bytes,
                            },
                        ));
                    }
                    let Some((off, blk)) = self
                        .arena
                        .alloc(len as u64, block, || self.closing.load(Ordering::SeqCst))
                    else {
                        let e = match block {
                            _ if self.closing.load(Ordering::SeqCst) => SubmitError::Shutdown,
                            Block::No => SubmitError::QueueFull,
                            Block::Until(_) => SubmitError::Timeout,
                        };
                        return Err(self.abort_submit(slot, e));
                    };
                    match encode_into(task, self.seg.bytes_ptr(off as usize, len), len) {
                        Ok(n) => {
                            meta.task_blk.0.store(off, Ordering::Relaxed);
                            meta.task_blk.1.store(blk, Ordering::Relaxed);
                            (off, n as u64)
                        }
                        Err(e) => {
                            self.arena.free(off, blk);
                            return Err(self.abort_submit(slot, encode_err(e)));
                        }
                    }
                }
                Err(e) => return Err(self.abort_submit(slot, encode_err(e))),
            };
        let task_id = self.next_task_id.fetch_add(1, Ordering::Relaxed);
        let sh = self.slot(slot);
        sh.task_id.store(task_id, Ordering::Relaxed);
        sh.task_off.store(task_off, Ordering::Relaxed);
        sh.task_len.store(task_len as u32, Ordering::Relaxed);
        let (pay_off, pay_len) = match payload {
            Some((off, len, blk)) => {
                meta.pay_blk.0.store(off, Ordering::Relaxed);
                meta.pay_blk.1.store(blk, Ordering::Relaxed);
                (off, len)
            }
            None => (0, 0),
        };
        sh.payload_off.store(pay_off, Ordering::Relaxed);
        sh.payload_len.store(pay_len, Ordering::Relaxed);
        sh.owner.store(0, Ordering::Relaxed);
        sh.result_kind.store(0, Ordering::Relaxed);
        // Release: a supervisor that Acquires this state (checking a dead worker's claim) sees
        // the new task id, never the previous task's.
        let initial = if opts.batch { slot_state::BATCH } else { 0 };
        sh.state.store(initial, Ordering::Release);
        meta.task_id.store(task_id, Ordering::Relaxed);
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
        // SYNC POINT: the push's Release store of the cell stamp publishes the slot contents
        // written above to the worker's Acquire in pop.
        if self.task_ring().push(slot).is_err() {
            unreachable!("the task ring has room for every slot");
        }
        self.header().task_ready.notify_one();
        // The supervisor may have declared "no workers" and drained the queue between our
        // check above and the push (SeqCst both sides: it sees our push, or we see its flag).
        if self.no_workers.load(Ordering::SeqCst) {
            self.fail_queued(crate::ring::bytes::KIND_NO_WORKERS);
        }
        Ok((slot, task_id))
    }

    /// Takes every task still in the queue and completes it with `kind` (no worker will run
    /// them). Safe against workers popping at the same time: each task goes to whoever pops it.
    pub(crate) fn fail_queued(&self, kind: u32) -> usize {
        let ring = self.task_ring();
        let mut n = 0;
        while let Some(slot) = ring.pop(None) {
            if slot < self.layout.params.n_slots {
                self.complete_from_parent(slot, kind, u32::MAX, 0, 0);
                n += 1;
            }
        }
        n
    }

    /// Publishes an outcome the parent decided (no ring record): cancelled, worker died, timed
    /// out, no workers. The caller owns the slot's task (it popped it, or its worker is dead).
    pub(crate) fn complete_from_parent(
        &self,
        slot: u32,
        kind: u32,
        worker: u32,
        rec: u64,
        len: u32,
    ) {
        let sh = self.slot(slot);
        sh.result_worker.store(worker, Ordering::Relaxed);
        sh.result_rec.store(rec, Ordering::Relaxed);
        sh.result_len.store(len, Ordering::Relaxed);
        sh.result_kind.store(kind, Ordering::Relaxed);
        // SYNC POINT: as in the worker's publish, the fields above are visible to whoever
        // Acquires DONE.
        let prev = sh.state.fetch_or(slot_state::DONE, Ordering::AcqRel);
        if prev & slot_state::WAIT_THREAD != 0 {
            futex_wake(&sh.state, i32::MAX);
        }
        if prev & slot_state::WAIT_REACTOR != 0 {
            self.header().doorbell.notify_all();
        }
    }

    /// Puts a task whose worker died back in the queue, for another worker to run (its retry
    /// policy allowed it). Waiter bits are kept; the claim is undone.
    pub(crate) fn requeue(&self, slot: u32) {
        let sh = self.slot(slot);
        sh.owner.store(0, Ordering::Relaxed);
        sh.state.fetch_and(!slot_state::CLAIMED, Ordering::AcqRel);
        if self.task_ring().push(slot).is_err() {
            unreachable!("the task ring has room for every slot");
        }
        self.header().task_ready.notify_one();
    }

    /// Parent-local facts of a slot (for the supervisor).
    pub(crate) fn meta(&self, slot: u32) -> &SlotMeta {
        &self.meta[slot as usize]
    }

    fn abort_submit(&self, slot: u32, e: SubmitError) -> SubmitError {
        self.release_slot(slot);
        e
    }

    /// Waits (as shutdown) until no submit is between its `closing` check and its push.
    pub(crate) fn quiesce_submits(&self) {
        self.slot_freed.notify_all();
        self.arena.wake_all();
        self.wake_slot_waiters();
        while self.active_submits.load(Ordering::SeqCst) != 0 {
            std::thread::yield_now();
        }
    }

    // ---- completion ----

    /// Whether the task in `slot` has finished.
    pub(crate) fn is_done(&self, slot: u32) -> bool {
        self.slot(slot).state.load(Ordering::Acquire) & slot_state::DONE != 0
    }

    /// Waits until `slot` is done: spin, then park on the slot's state word. `false` on
    /// timeout.
    pub(crate) fn wait_done(&self, slot: u32, deadline: Option<Instant>) -> bool {
        let st = &self.slot(slot).state;
        let done = || st.load(Ordering::Acquire) & slot_state::DONE != 0;
        if spin_until(self.cfg.caller_wait.spin(), done) {
            return true;
        }
        loop {
            let prev = st.fetch_or(slot_state::WAIT_THREAD, Ordering::AcqRel);
            if prev & slot_state::DONE != 0 {
                return true;
            }
            let timeout = match deadline {
                Some(d) => match d.checked_duration_since(Instant::now()) {
                    Some(left) if !left.is_zero() => Some(left),
                    _ => return false,
                },
                None => None,
            };
            futex_wait(st, prev | slot_state::WAIT_THREAD, timeout);
            if done() {
                return true;
            }
        }
    }

    /// Registers `waker` for `slot` (task `task_id`); returns whether the task is already done.
    pub(crate) fn register_waker(&self, slot: u32, task_id: u64, waker: &Waker) -> bool {
        let meta = &self.meta[slot as usize];
        {
            let mut w = meta.waker.lock().unwrap_or_else(|e| e.into_inner());
            match &*w {
                Some(old) if old.will_wake(waker) => {}
                _ => *w = Some(waker.clone()),
            }
        }
        meta.interest.store(task_id, Ordering::SeqCst);
        let prev = self
            .slot(slot)
            .state
            .fetch_or(slot_state::WAIT_REACTOR, Ordering::AcqRel);
        prev & slot_state::DONE != 0
    }

    /// Marks the task in `slot` cancelled while its handle lives on: a worker that pops it
    /// answers `Cancelled` instead of running it, and so does the supervisor if it would have
    /// re-queued it. The caller holds the task's uncollected handle, so the slot is still this
    /// task's (nobody else can retire it) and the bit lands on the right task.
    pub(crate) fn cancel(&self, slot: u32) {
        self.slot(slot)
            .state
            .fetch_or(slot_state::CANCELLED, Ordering::AcqRel);
    }

    /// The handle of `slot` was dropped before collecting: cancel the task if it has not
    /// started, and make sure the slot is retired exactly once.
    pub(crate) fn detach(&self, slot: u32, task_id: u64) {
        let meta = &self.meta[slot as usize];
        meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        let st = &self.slot(slot).state;
        // While `detached` is unset only this handle may retire the slot, so this fetch_or
        // lands on our own task's state word, never on a successor's.
        let prev = st.fetch_or(
            slot_state::WAIT_REACTOR | slot_state::CANCELLED,
            Ordering::AcqRel,
        );
        if prev & slot_state::DONE != 0 {
            self.retire(slot);
            return;
        }
        meta.detached.store(task_id, Ordering::SeqCst);
        meta.interest.store(task_id, Ordering::SeqCst);
        // DONE may have landed between the fetch_or above and the stores: the worker then rang
        // the doorbell before the reactor could see our interest. Re-check (an RMW, so a later
        // DONE reads from it and its doorbell happens after our stores) and arbitrate.
        if st.fetch_or(0, Ordering::AcqRel) & slot_state::DONE != 0
            && meta
                .detached
                .compare_exchange(task_id, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
        {
            self.retire(slot);
        }
    }

    /// Releases everything `slot` holds and returns it to the free list. Exactly once per task.
    pub(crate) fn retire(&self, slot: u32) {
        let sh = self.slot(slot);
        let kind = sh.result_kind.load(Ordering::Relaxed);
        let rec = sh.result_rec.load(Ordering::Relaxed);
        if has_ring_record(kind, rec) {
            let seat = sh.result_worker.load(Ordering::Relaxed);
            if let Some(ring) = self.result_ring(seat) {
                if rec % 16 == 0 && rec + 16 <= ring.capacity() {
                    ring.release(rec);
                    let moved = {
                        let _g = self.ring_locks[seat as usize]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        ring.advance()
                    };
                    if moved {
                        self.header().space.notify_all();
                    }
                }
            }
        }
        let meta = &self.meta[slot as usize];
        if meta.timeout_ns.swap(0, Ordering::Relaxed) != 0 {
            self.timed_in_flight.fetch_sub(1, Ordering::SeqCst);
        }
        // A waker is only ever stored together with `interest` (and the reactor takes it when it
        // clears `interest`), so synchronous callers skip the waker lock entirely.
        if meta.interest.swap(0, Ordering::SeqCst) != 0 {
            meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
        }
        // `detached` needs no reset: every arbiter compare-exchanges it from a specific task id,
        // and ids are never reused, so a stale id can never match.
        for blk in [&meta.task_blk, &meta.pay_blk] {
            let len = blk.1.swap(0, Ordering::Relaxed);
            if len != 0 {
                self.arena.free(blk.0.load(Ordering::Relaxed), len);
            }
        }
        self.release_slot(slot);
    }

    fn release_slot(&self, slot: u32) {
        // The slot's state keeps DONE until the next submit resets it: a supervisor checking a
        // dead worker's stale claim on this slot must never mistake it for a task in progress.
        self.meta[slot as usize]
            .in_use
            .store(false, Ordering::Relaxed);
        if self.free_slots.ring().push(slot).is_err() {
            unreachable!("the free list has room for every slot");
        }
        self.slot_freed.notify_all();
        if self.slot_waiters_n.load(Ordering::SeqCst) != 0 {
            self.wake_slot_waiters();
        }
    }

    fn wake_slot_waiters(&self) {
        let wakers = {
            let mut w = self.slot_waiters.lock().unwrap_or_else(|e| e.into_inner());
            self.slot_waiters_n.store(0, Ordering::SeqCst);
            std::mem::take(&mut *w)
        };
        for w in wakers {
            w.wake();
        }
    }

    /// One pass of the reactor: wake futures and retire detached slots whose task is done.
    /// Returns whether it did anything.
    pub(crate) fn reactor_scan(&self) -> bool {
        let mut did = false;
        for (i, meta) in self.meta.iter().enumerate() {
            let id = meta.interest.load(Ordering::SeqCst);
            if id == 0 || !self.is_done(i as u32) {
                continue;
            }
            if meta
                .interest
                .compare_exchange(id, 0, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            did = true;
            let waker = meta.waker.lock().unwrap_or_else(|e| e.into_inner()).take();
            if let Some(w) = waker {
                w.wake();
            }
            if meta
                .detached
                .compare_exchange(id, 0, Ordering::AcqRel, Ordering::Relaxed)
                .is_ok()
            {
                self.retire(i as u32);
            }
        }
        did
    }

    /// After every worker is gone: tasks still queued or claimed will never run; answer them
    /// `Cancelled` so no caller waits forever.
    pub(crate) fn cancel_unfinished(&self) {
        let ring = self.task_ring();
        while ring.pop(None).is_some() {}
        for i in 0..self.layout.params.n_slots {
            let st = self.slot(i).state.load(Ordering::Acquire);
            let in_use = self.meta[i as usize].in_use.load(Ordering::SeqCst);
            if in_use && st & slot_state::DONE == 0 {
                self.complete_from_parent(i, KIND_CANCELLED, u32::MAX, 0, 0);
            }
        }
        self.header().doorbell.notify_all();
    }
}

fn encode_err(e: crate::codec::EncodeError) -> SubmitError {
    match e {
        crate::codec::EncodeError::Failed(m) => SubmitError::Encode(m),
        crate::codec::EncodeError::Overflow => SubmitError::Encode("archive overflow".into()),
    }
}
