//! The parent's state of one pool, shared by the pool, its handles and its two threads: the
//! segment and its geometry, the parent-local side of every slot and seat, and the flags that
//! stop intake. What happens to a slot lives in [`slots`](super::slots) (submission, waiting,
//! retirement), what happens to a result in [`results`](super::results), and the reactor in
//! [`reactor`](super::reactor).

use super::arena::Arena;
use super::builder::Config;
use super::events::{StatCounters, WorkerState};
use super::slots::SlotMeta;
use crate::ring::bytes::ByteRing;
use crate::ring::mpmc::{HeapMpmc, MpmcCell, MpmcRing};
use crate::ring::wait::EventCount;
use crate::shm::layout::{BatchCtl, Layout, RING_HDR, SegmentHeader, SlotTimes, WorkerCtl};
use crate::shm::segment::Segment;
use crate::slot::SlotHeader;
use crate::worker::boot::RingReserve;
use std::os::fd::{AsFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Mutex, MutexGuard};
use std::task::Waker;

/// What a worker was spawned with: its archived spawn arguments and its environment.
pub(crate) type SpawnRecipe = (Vec<u8>, Vec<(String, String)>);

/// A worker seat, as the parent's API reports it (the supervisor owns the process itself, and
/// the worker's control block in shared memory is the protocol's view).
#[derive(Debug, Clone)]
pub(crate) struct Seat {
    /// Taken by a spawn (a live, starting, restarting worker); free seats can be spawned into.
    pub(crate) in_use: bool,
    pub(crate) state: WorkerState,
    pub(crate) pid: u32,
    pub(crate) restarts: u64,
    /// The archived spawn arguments and per-worker environment of its last spawn (for
    /// `Pool::replace_worker`).
    pub(crate) spawned_with: Option<SpawnRecipe>,
    /// `(generation, pid)` of its last few launches, newest last: which process ran a task
    /// whose worker has since been replaced (`Shared::pid_of_owner`).
    pub(crate) launches: std::collections::VecDeque<(u32, u32)>,
}

impl Seat {
    /// Launches remembered per seat: a task's outcome is collected long before its seat has
    /// been relaunched this many times.
    const LAUNCHES_KEPT: usize = 4;

    /// Records a launch of generation `generation` as process `pid`.
    pub(crate) fn launched(&mut self, generation: u32, pid: u32) {
        if self.launches.len() == Self::LAUNCHES_KEPT {
            self.launches.pop_front();
        }
        self.launches.push_back((generation, pid));
    }
}

impl Default for Seat {
    fn default() -> Self {
        Seat {
            in_use: false,
            state: WorkerState::Empty,
            pid: 0,
            restarts: 0,
            spawned_with: None,
            launches: Default::default(),
        }
    }
}

/// The parent's state of one pool.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) seg: Segment,
    pub(crate) layout: Layout,
    pub(crate) cfg: Config,
    pub(crate) max_task_bytes: usize,
    pub(super) free_slots: HeapMpmc,
    pub(super) slot_freed: Box<EventCount>,
    pub(super) meta: Box<[SlotMeta]>,
    pub(crate) arena: Arena,
    /// One per seat: serialises advancing (and sweeping) that seat's completion ring.
    pub(super) ring_locks: Box<[Mutex<()>]>,
    /// One per seat: the parent found the seat's completion ring corrupt; the supervisor kills
    /// its worker and resets the ring.
    pub(super) seat_corrupt: Box<[AtomicBool]>,
    /// Set when shutdown begins: new submits and spawns fail.
    pub(crate) closing: AtomicBool,
    pub(super) slot_waiters: Mutex<Vec<Waker>>,
    pub(super) slot_waiters_n: AtomicUsize,
    pub(crate) reactor_stop: AtomicBool,
    /// The reactor sleeps on `reactor_bell` with no periodic look (nothing is in flight): the
    /// next submit must wake it (`reactor.rs`).
    pub(crate) reactor_untimed: AtomicBool,
    /// The futex word of the reactor's idle sleep: parent-local, so no worker can touch it.
    pub(crate) reactor_bell: AtomicU32,
    pub(crate) seats: Mutex<Vec<Seat>>,
    /// Seats taken (serving, starting, or waiting to restart), kept beside `seats` so that a
    /// submit can tell "no worker and none coming" without the lock.
    seats_in_use: AtomicUsize,
    /// Identifies this pool (loans must come back to the pool that made them).
    pub(crate) id: u64,
    /// The supervisor's wake-up line for the pool's own threads (an eventfd it polls; never
    /// handed to a worker: each worker has a notify line of its own, `sys::notify_line`).
    pub(crate) wake: OwnedFd,
    /// Set while every worker has failed for good: submits fail fast with `NoWorkers`.
    pub(crate) no_workers: AtomicBool,
    /// Set when a queued task was settled without a worker (cancelled, past its deadline):
    /// the supervisor takes such tasks off the head of the queue, so they stop holding
    /// places while every worker is busy (`Shared::take_settled_heads`).
    pub(crate) settled_queued: AtomicBool,
    /// Set when the pool broke down (see [`Shared::declare_broken`]).
    pub(crate) broken: AtomicBool,
    broken_reason: Mutex<Option<String>>,
    /// Tasks with a timeout submitted and not yet retired (the supervisor watches the clock
    /// only while this is non-zero).
    pub(crate) timed_in_flight: AtomicUsize,
    pub(crate) stats: StatCounters,
    /// Which seats' completion rings are reserved (with `reserve_memory`; see
    /// [`Shared::ring_reserve`]). Flags of their own, not under `arena_reserved`'s lock: the
    /// supervisor sets them and must never wait behind an arena `fallocate`.
    rings_reserved: Box<[AtomicBool]>,
    /// The arena is reserved from its start up to this segment offset (with `reserve_memory`;
    /// see [`Shared::reserve_arena`]).
    arena_reserved: Mutex<u64>,
}

/// The arena is reserved in steps of this much (or to its end): one `fallocate` per step.
const ARENA_RESERVE_STEP: u64 = 4 << 20;

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
        let seats = layout.params.max_workers as usize;
        Shared {
            free_slots,
            slot_freed: Box::new(EventCount::new()),
            meta: (0..n).map(|_| SlotMeta::default()).collect(),
            arena,
            ring_locks: (0..seats).map(|_| Mutex::new(())).collect(),
            seat_corrupt: (0..seats).map(|_| AtomicBool::new(false)).collect(),
            closing: AtomicBool::new(false),
            slot_waiters: Mutex::new(Vec::new()),
            slot_waiters_n: AtomicUsize::new(0),
            reactor_stop: AtomicBool::new(false),
            reactor_untimed: AtomicBool::new(false),
            reactor_bell: AtomicU32::new(0),
            seats: Mutex::new((0..seats).map(|_| Seat::default()).collect()),
            seats_in_use: AtomicUsize::new(0),
            id: NEXT_POOL_ID.fetch_add(1, Ordering::Relaxed),
            wake,
            no_workers: AtomicBool::new(false),
            settled_queued: AtomicBool::new(false),
            broken: AtomicBool::new(false),
            broken_reason: Mutex::new(None),
            timed_in_flight: AtomicUsize::new(0),
            stats: StatCounters::default(),
            rings_reserved: (0..seats).map(|_| AtomicBool::new(false)).collect(),
            arena_reserved: Mutex::new(layout.arena as u64),
            seg,
            layout,
            cfg,
            max_task_bytes,
        }
    }

    #[inline]
    pub(crate) fn header(&self) -> &SegmentHeader {
        self.seg.get(0)
    }

    /// Slots holding a task no worker has claimed and nobody has settled (cancelled,
    /// detached, expired): [`Pool::queued`](crate::Pool::queued). A snapshot of words a
    /// worker can write, for statistics only.
    pub(crate) fn waiting_tasks(&self) -> usize {
        use crate::slot::bits;
        (0..self.n_slots())
            .filter(|&i| {
                self.meta[i as usize].phase.load(Ordering::Relaxed) == super::slots::QUEUED
                    && self.slot(i).state.load(Ordering::Acquire)
                        & (bits::CLAIMED | bits::DONE | bits::CANCELLED)
                        == 0
            })
            .count()
    }

    /// The header of `slot` (the caller has a slot index it made or checked).
    #[inline]
    pub(crate) fn slot(&self, slot: u32) -> &SlotHeader {
        self.seg
            .get(self.layout.slots + slot as usize * size_of::<SlotHeader>())
    }

    /// What a worker starting in seat `seat` must do about its completion ring's memory: with
    /// `reserve_memory`, reserve it until one of the seat's workers has reported ready
    /// ([`RingReserve::Yes`]), so that a shortage fails that spawn (`SpawnError::NoSpace`),
    /// never a worker writing a result later. The worker reserves it on a thread of its own
    /// while its spawn step runs, off the start-up path; [`seat_reserved`](Self::seat_reserved)
    /// records that it did.
    pub(crate) fn ring_reserve(&self, seat: u32) -> RingReserve {
        if !self.cfg.reserve_memory {
            return RingReserve::No;
        }
        if self.rings_reserved[seat as usize].load(Ordering::Acquire) {
            RingReserve::No
        } else if self.cfg.fail_reserve & 1 != 0 {
            RingReserve::FailForTest
        } else {
            RingReserve::Yes
        }
    }

    /// A worker of seat `seat` reported ready: its ring's memory is reserved (it was asked to,
    /// or an earlier worker was).
    pub(crate) fn seat_reserved(&self, seat: u32) {
        if self.cfg.reserve_memory {
            self.rings_reserved[seat as usize].store(true, Ordering::Release);
        }
    }

    /// Reserves the arena's memory up to segment offset `end` (rounded up to a step), before
    /// an arena block there is handed out (with `reserve_memory`; a no-op otherwise). The
    /// caller frees its block on an error.
    pub(crate) fn reserve_arena(&self, end: u64) -> std::io::Result<()> {
        if !self.cfg.reserve_memory {
            return Ok(());
        }
        let mut arena_end = self
            .arena_reserved
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        if end <= *arena_end {
            return Ok(());
        }
        if self.cfg.fail_reserve & 2 != 0 {
            return Err(std::io::Error::from_raw_os_error(libc::ENOSPC));
        }
        let limit = self.layout.arena as u64 + self.layout.params.arena;
        let to = (end.div_ceil(ARENA_RESERVE_STEP) * ARENA_RESERVE_STEP).min(limit);
        self.seg
            .reserve(*arena_end as usize, (to - *arena_end) as usize)?;
        *arena_end = to;
        Ok(())
    }

    /// The submit time and deadline of `slot`'s task.
    #[inline]
    pub(crate) fn times(&self, slot: u32) -> &SlotTimes {
        self.seg.get(self.layout.slot_times_off(slot))
    }

    /// Seat `seat`'s batch block.
    pub(crate) fn batch_ctl(&self, seat: u32) -> &BatchCtl {
        self.seg.get(self.layout.batch_ctl_off(seat))
    }

    #[inline]
    pub(crate) fn ctl(&self, seat: u32) -> &WorkerCtl {
        self.seg.get(self.layout.ctl_off(seat))
    }

    #[inline]
    pub(crate) fn n_slots(&self) -> u32 {
        self.layout.params.n_slots
    }

    pub(crate) fn n_seats(&self) -> u32 {
        self.layout.params.max_workers
    }

    #[inline]
    pub(crate) fn task_ring(&self) -> MpmcRing<'_> {
        MpmcRing::new(
            &self.header().task_ring,
            self.seg
                .slice::<MpmcCell>(self.layout.task_cells, self.layout.ring_cap),
        )
    }

    /// The completion ring of `seat` (`None` if out of range), for the consumer half of its
    /// protocol.
    pub(crate) fn result_ring(&self, seat: u32) -> Option<ByteRing<'_>> {
        if seat >= self.n_seats() {
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

    /// The process that claimed a task, from the slot's `owner` word (read once the task
    /// finished, before it was collected). That word is a worker's, so it is only a key into
    /// the parent's own record of the seat's recent launches: a wrong word gives `None`, never
    /// a pid the parent did not launch into that seat.
    pub(crate) fn pid_of_owner(&self, owner: u32) -> Option<u32> {
        let seat = (owner & 0xffff).checked_sub(1)? as usize;
        let generation = owner >> 16;
        self.lock_seats()
            .get(seat)?
            .launches
            .iter()
            .rev()
            .find(|&&(g, _)| g & 0xffff == generation)
            .map(|&(_, pid)| pid)
    }

    pub(crate) fn lock_seats(&self) -> MutexGuard<'_, Vec<Seat>> {
        self.seats.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Takes or frees seat `i` (the caller holds the seats' lock).
    pub(crate) fn set_seat_in_use(&self, seats: &mut [Seat], i: usize, in_use: bool) {
        if seats[i].in_use != in_use {
            seats[i].in_use = in_use;
            if in_use {
                self.seats_in_use.fetch_add(1, Ordering::SeqCst);
            } else {
                self.seats_in_use.fetch_sub(1, Ordering::SeqCst);
            }
        }
    }

    /// Whether no worker serves and none is starting or waiting to restart: a task would wait
    /// forever, so it is refused (`NoWorkers`) instead.
    #[inline]
    pub(crate) fn workerless(&self) -> bool {
        self.no_workers.load(Ordering::SeqCst) || self.seats_in_use.load(Ordering::SeqCst) == 0
    }

    /// Wakes the supervisor thread.
    pub(crate) fn wake_supervisor(&self) {
        crate::sys::eventfd_signal(self.wake.as_fd());
    }

    /// A queued task was just settled without a worker: has the supervisor look at the
    /// head of the queue (one wake-up per look, however many settle meanwhile).
    pub(crate) fn settled_in_queue(&self) {
        if !self.settled_queued.swap(true, Ordering::SeqCst) {
            self.wake_supervisor();
        }
    }

    /// The parent found seat `seat`'s completion ring corrupt (its worker wrote garbage into
    /// it): the supervisor replaces the worker as misbehaving and resets the ring.
    pub(crate) fn seat_misbehaved(&self, seat: u32) {
        if let Some(f) = self.seat_corrupt.get(seat as usize) {
            f.store(true, Ordering::SeqCst);
            self.wake_supervisor();
        }
    }

    /// The pool cannot go on (a pool thread panicked, or the shared task queue stopped moving):
    /// submits fail from now on, and the supervisor stops every worker and answers every
    /// unfinished task `TaskError::PoolBroken`. The first reason is kept.
    pub(crate) fn declare_broken(&self, reason: impl Into<String>) {
        {
            let mut r = self.broken_reason.lock().unwrap_or_else(|e| e.into_inner());
            if r.is_none() {
                let reason = reason.into();
                crate::telemetry::broken(&reason);
                *r = Some(reason);
            }
        }
        self.broken.store(true, Ordering::SeqCst);
        self.wake_supervisor();
    }

    /// How tasks that no worker will finish are answered: `Cancelled` at a shutdown,
    /// `PoolBroken` after a breakdown.
    pub(crate) fn left_over(&self) -> u32 {
        if self.broken.load(Ordering::SeqCst) {
            crate::slot::outcome::KIND_BROKEN
        } else {
            crate::slot::outcome::KIND_CANCELLED
        }
    }

    /// Why the pool broke down, if it did.
    pub(crate) fn broken_reason(&self) -> Option<String> {
        if !self.broken.load(Ordering::SeqCst) {
            return None;
        }
        self.broken_reason
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}
