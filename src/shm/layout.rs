//! What lives where in a pool's segment. Both sides compute the same offsets from the same
//! [`Params`], which the parent stores in the header; a worker checks magic, version and total
//! length before it touches anything else.
//!
//! ```text
//! offset 0      SegmentHeader      magic, version, params, event counts, task-ring counters
//!               task cells         ring_cap × MpmcCell (16 B)        the task queue
//!               slot headers       n_slots × SlotHeader (64 B)       one per in-flight task
//!               worker controls    max_workers × WorkerCtl (128 B)   one per worker seat
//!               slot times         n_slots × SlotTimes (16 B)        submit time, deadline
//!               batch controls     max_workers × BatchCtl (896 B)    a worker's batch
//!               slot inline data   n_slots × slot_inline             small task archives, small outputs
//!               spawn areas        max_workers × spawn_area          spawn args, then output
//!               result rings       max_workers × (128 B + result_ring) completion rings
//!               task arena         arena                              large tasks and loans
//! ```
//! Every region starts on a 64-byte boundary; the total is rounded up to a page.

use super::segment::ShmSafe;
use crate::ring::bytes::ByteRingHeader;
use crate::ring::mpmc::{MpmcCell, MpmcHeader};
use crate::ring::wait::EventCount;
pub(crate) use crate::slot::SlotHeader;
use crate::sync::{AtomicU32, AtomicU64, CachePadded};

/// "SPOOLSHM" as a little-endian u64: the first word of every segment.
pub(crate) const MAGIC: u64 = u64::from_le_bytes(*b"SPOOLSHM");
/// Protocol version; bump on any layout or protocol change (5: tiny tasks and results in the
/// slot header words, `TASK_IN_HEADER` / `LEN_IN_HEADER`; 6: eventcounts count pending
/// wake-ups beside their sleepers).
pub(crate) const VERSION: u32 = 6;

/// Sizes that define a segment's layout.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Params {
    pub(crate) n_slots: u32,
    pub(crate) slot_inline: u32,
    pub(crate) max_workers: u32,
    pub(crate) spawn_area: u32,
    pub(crate) result_ring: u64,
    pub(crate) arena: u64,
}

/// The segment header.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct SegmentHeader {
    pub(crate) magic: u64,
    /// Stored last by the creator (Release); 0 means "not ready".
    pub(crate) version: AtomicU32,
    _pad0: u32,
    pub(crate) total_len: u64,
    /// Hash of the worker's four message types (`worker::boot::protocol_hash`): a worker
    /// speaking other messages refuses to serve.
    pub(crate) worker_type_hash: u64,
    pub(crate) params: Params,
    /// How long an idle worker spins before parking, in nanoseconds.
    pub(crate) worker_spin_ns: u64,
    /// Set (1) when the parent shuts down: workers finish the queue and exit.
    pub(crate) shutdown: AtomicU32,
    /// Behaviour flags (`FLAG_*`), written once before the segment is shared.
    pub(crate) flags: u32,
    /// Workers wait here for tasks; submitters notify.
    pub(crate) task_ready: CachePadded<EventCount>,
    /// The parent's reactor waits here; workers ring it for async/detached completions.
    pub(crate) doorbell: CachePadded<EventCount>,
    /// Workers wait here for room in their result ring; the parent notifies on release.
    pub(crate) space: CachePadded<EventCount>,
    /// Counters of the task queue.
    pub(crate) task_ring: MpmcHeader,
    /// The pool's batch policy, read by workers before each batch (changeable live).
    pub(crate) batch: CachePadded<BatchPolicyWords>,
}

/// The batch policy as workers read it (see `pool::batching::BatchPolicy`).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct BatchPolicyWords {
    /// Most tasks per batch; 0 or 1: no batching (each task on its own).
    pub(crate) max: AtomicU32,
    /// [`batch_flags`] bits.
    pub(crate) flags: AtomicU32,
    /// How long a free worker may wait for a fuller batch, in nanoseconds (0: never).
    pub(crate) delay_ns: AtomicU64,
}

/// Bits of [`BatchPolicyWords::flags`].
pub(crate) mod batch_flags {
    /// Count the delay from the first task the worker took, not from the oldest task's
    /// submission (mpservice's rule; for comparison benchmarks).
    pub(crate) const FROM_FIRST_TAKEN: u32 = 1;
    /// Wait for a fuller batch even while another worker is idle (Triton's and mpservice's
    /// rule; for comparison benchmarks).
    pub(crate) const IGNORE_IDLE: u32 = 2;
    /// Wait for a fuller batch only while batches fill: when the worker's previous batch was
    /// full (saturation), never after a partial one (light load).
    pub(crate) const WHEN_SATURATED: u32 = 4;
}

/// Most tasks one dynamic batch can hold (the size of [`BatchCtl`]'s held list).
pub(crate) const BATCH_CAP: usize = 64;

/// When a task was submitted and by when it must start, in `CLOCK_MONOTONIC` nanoseconds
/// (system-wide, so both processes read the same clock); written by the parent at submit.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct SlotTimes {
    /// 0 if the pool was not batching when the task was submitted.
    pub(crate) submitted_ns: AtomicU64,
    /// 0: no deadline (see `bits::DEADLINE`).
    pub(crate) deadline_ns: AtomicU64,
}

/// One seat's dynamic batch: the tasks it holds beyond the pop window (`WorkerCtl::
/// current_slot`), for recovery, and its batch counters. Written by that worker.
#[repr(C, align(64))]
#[derive(Debug)]
pub(crate) struct BatchCtl {
    /// Slot + 1 of each task of the batch (0: none). Each entry follows the rule of
    /// `current_slot`/`current_task`: the slot is stored before the task id, both after the
    /// claim, and cleared (slot first) only after the task's outcome is published.
    pub(crate) held_slots: [AtomicU32; BATCH_CAP],
    /// Task id of each entry (0 until stored).
    pub(crate) held_tasks: [AtomicU64; BATCH_CAP],
    /// Batches run, and tasks in them.
    pub(crate) batches: AtomicU64,
    pub(crate) batched_tasks: AtomicU64,
    /// Batches per size bucket: 1, 2, 3–4, 5–8, 9–16, 17–32, 33–64 (the eighth is unused).
    pub(crate) size_hist: [AtomicU64; 8],
    /// Sum and maximum over batches of the oldest task's wait in the queue (submit to the
    /// batch's start), and of the batch's execute step, in nanoseconds.
    pub(crate) queue_ns: AtomicU64,
    pub(crate) max_queue_ns: AtomicU64,
    pub(crate) exec_ns: AtomicU64,
    pub(crate) max_exec_ns: AtomicU64,
    /// 1 while the held tasks run (from just before `execute_batch` until their outcomes are
    /// published): only then does the supervisor watch them for their execution timeout.
    /// Forming a batch (waiting for company) is not execution.
    pub(crate) started: AtomicU32,
}

/// Bits of [`WorkerCtl::hold`].
pub(crate) mod hold {
    /// A timeout kill is on its way: take no next task (wait for the kill or the withdrawal).
    pub(crate) const KILL: u32 = 1;
    /// Retire: finish the current task, take no next one, and exit normally (scale-down).
    pub(crate) const RETIRE: u32 = 2;
}

/// Values of [`WorkerCtl::parked`].
pub(crate) mod parked {
    /// Not parked.
    pub(crate) const NONE: u32 = 0;
    /// Counted as a sleeper on the header's `task_ready`.
    pub(crate) const TASK_READY: u32 = 1;
    /// Counted as a sleeper on the header's `space`.
    pub(crate) const SPACE: u32 = 2;
}

/// Worker seat states.
pub(crate) mod ctl_state {
    pub(crate) const EMPTY: u32 = 0;
    pub(crate) const STARTING: u32 = 1;
    pub(crate) const READY: u32 = 2;
    pub(crate) const FAILED: u32 = 3;
    pub(crate) const EXITED: u32 = 4;
    /// The worker published its last task's outcome and exits to be replaced (it declared
    /// itself poisoned, or a task panicked under the restart-on-panic policy).
    pub(crate) const RETIRING: u32 = 5;

    /// Whether a starting worker has sent its start-up report: READY or FAILED, or a state
    /// only reachable after READY (it served, then retired or exited before the supervisor
    /// looked). STARTING, EMPTY or a value no worker writes: not reported.
    pub(crate) fn reported(state: u32) -> bool {
        matches!(state, READY | FAILED | EXITED | RETIRING)
    }
}

/// Header flag: a worker whose task panicked retires and is restarted fresh.
pub(crate) const FLAG_RESTART_ON_PANIC: u32 = 1;

/// One worker seat's control block: written by that worker (and the parent between lives).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct WorkerCtl {
    pub(crate) state: AtomicU32,
    pub(crate) generation: AtomicU32,
    pub(crate) pid: AtomicU32,
    /// Record kind of the spawn step's outcome (`KIND_OK`, `KIND_ERR`, `KIND_PANIC`).
    pub(crate) spawn_kind: AtomicU32,
    pub(crate) spawn_args_len: AtomicU64,
    pub(crate) spawn_out_len: AtomicU64,
    /// Intent record of the task-queue pop in progress (see `ring::mpmc`).
    pub(crate) claim: AtomicU64,
    /// Slot the worker holds, `u32::MAX` if none: stored inside the pop (before the ring cell
    /// is released) and cleared after the outcome is published.
    pub(crate) current_slot: AtomicU32,
    _pad: u32,
    pub(crate) tasks_done: AtomicU64,
    /// Id of the task in `current_slot`, stored right after the pop (0 until then); cleared
    /// after `current_slot`. Tells a slot's current task from a later one that reused it.
    pub(crate) current_task: AtomicU64,
    /// Which eventcount the worker is counted as a sleeper on ([`parked`]), so the supervisor
    /// can withdraw a sleeper that died parked. Set after `prepare`, cleared before the sleeper
    /// count drops.
    pub(crate) parked: AtomicU32,
    /// Set by the worker while it waits for room in its completion ring: the parent's reactor
    /// then moves uncollected results out of the ring (see `pool::shared::evacuate`).
    pub(crate) wants_space: AtomicU32,
    /// Set by the supervisor ([`hold`] bits): before a timeout kill (the worker must not take
    /// another task: it waits for the kill or the withdrawal, so the kill never lands on an
    /// innocent next task), or to retire the worker (it exits after its current task).
    pub(crate) hold: AtomicU32,
    /// A task for this worker alone (a broadcast): its slot + 1, 0 if none. The parent sets
    /// it; the worker records the slot in `current_slot`, then clears it, and runs the task
    /// before anything from the shared queue.
    pub(crate) direct: AtomicU32,
    /// 1 while the worker waits for a task (nothing to run): a worker filling a batch does
    /// not wait for more tasks while another one is idle.
    pub(crate) idle: AtomicU32,
    _pad2: u32,
    _reserved: [u64; 5],
}

// SAFETY: all of these are #[repr(C)], hold only integers and atomics (no pointers), are valid
// for every bit pattern, and are mutated only through atomics once shared (the header's plain
// fields are written once before the segment is shared).
unsafe impl ShmSafe for SegmentHeader {}
// SAFETY: as above.
unsafe impl ShmSafe for SlotHeader {}
// SAFETY: as above.
unsafe impl ShmSafe for WorkerCtl {}
// SAFETY: as above.
unsafe impl ShmSafe for SlotTimes {}
// SAFETY: as above.
unsafe impl ShmSafe for BatchCtl {}
// SAFETY: as above.
unsafe impl ShmSafe for MpmcCell {}
// SAFETY: as above.
unsafe impl ShmSafe for ByteRingHeader {}

const fn up(n: usize, a: usize) -> usize {
    n.div_ceil(a) * a
}

/// Offsets of every region, computed from [`Params`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Layout {
    pub(crate) params: Params,
    pub(crate) ring_cap: usize,
    pub(crate) task_cells: usize,
    pub(crate) slots: usize,
    pub(crate) ctls: usize,
    pub(crate) slot_times: usize,
    pub(crate) batch_ctls: usize,
    pub(crate) slot_data: usize,
    pub(crate) spawn_areas: usize,
    pub(crate) result_rings: usize,
    pub(crate) result_ring_stride: usize,
    pub(crate) arena: usize,
    pub(crate) total: usize,
}

/// Size of the header in front of each completion ring's data.
pub(crate) const RING_HDR: usize = 128;

impl Layout {
    /// Computes the layout; `None` if the sizes overflow.
    pub(crate) fn new(p: Params) -> Option<Layout> {
        let n_slots = p.n_slots as usize;
        let workers = p.max_workers as usize;
        let ring_cap = n_slots.max(1).next_power_of_two();
        let mut at = up(size_of::<SegmentHeader>(), 64);
        let task_cells = at;
        at = at.checked_add(ring_cap.checked_mul(size_of::<MpmcCell>())?)?;
        at = up(at, 64);
        let slots = at;
        at = at.checked_add(n_slots.checked_mul(size_of::<SlotHeader>())?)?;
        let ctls = at;
        at = at.checked_add(workers.checked_mul(size_of::<WorkerCtl>())?)?;
        let slot_times = at;
        at = at.checked_add(n_slots.checked_mul(size_of::<SlotTimes>())?)?;
        at = up(at, 64);
        let batch_ctls = at;
        at = at.checked_add(workers.checked_mul(size_of::<BatchCtl>())?)?;
        at = up(at, 64);
        let slot_data = at;
        at = at.checked_add(n_slots.checked_mul(p.slot_inline as usize)?)?;
        let spawn_areas = at;
        at = at.checked_add(workers.checked_mul(p.spawn_area as usize)?)?;
        let result_rings = at;
        let result_ring_stride = RING_HDR.checked_add(usize::try_from(p.result_ring).ok()?)?;
        at = at.checked_add(workers.checked_mul(result_ring_stride)?)?;
        let arena = at;
        at = at.checked_add(usize::try_from(p.arena).ok()?)?;
        let total = up(at, 4096);
        Some(Layout {
            params: p,
            ring_cap,
            task_cells,
            slots,
            ctls,
            slot_times,
            batch_ctls,
            slot_data,
            spawn_areas,
            result_rings,
            result_ring_stride,
            arena,
            total,
        })
    }

    pub(crate) fn ctl_off(&self, worker: u32) -> usize {
        self.ctls + worker as usize * size_of::<WorkerCtl>()
    }

    pub(crate) fn slot_times_off(&self, slot: u32) -> usize {
        self.slot_times + slot as usize * size_of::<SlotTimes>()
    }

    pub(crate) fn batch_ctl_off(&self, worker: u32) -> usize {
        self.batch_ctls + worker as usize * size_of::<BatchCtl>()
    }

    pub(crate) fn slot_data_off(&self, slot: u32) -> usize {
        self.slot_data + slot as usize * self.params.slot_inline as usize
    }

    pub(crate) fn spawn_area_off(&self, worker: u32) -> usize {
        self.spawn_areas + worker as usize * self.params.spawn_area as usize
    }

    pub(crate) fn result_ring_off(&self, worker: u32) -> usize {
        self.result_rings + worker as usize * self.result_ring_stride
    }
}

impl SegmentHeader {
    /// A header for a new segment, version still 0 (not ready).
    pub(crate) fn new(
        layout: &Layout,
        worker_type_hash: u64,
        worker_spin_ns: u64,
        flags: u32,
    ) -> Self {
        SegmentHeader {
            magic: MAGIC,
            version: AtomicU32::new(0),
            _pad0: 0,
            total_len: layout.total as u64,
            worker_type_hash,
            params: layout.params,
            worker_spin_ns,
            shutdown: AtomicU32::new(0),
            flags,
            task_ready: CachePadded(EventCount::new()),
            doorbell: CachePadded(EventCount::new()),
            space: CachePadded(EventCount::new()),
            task_ring: MpmcHeader::new(),
            batch: CachePadded(BatchPolicyWords {
                max: AtomicU32::new(0),
                flags: AtomicU32::new(0),
                delay_ns: AtomicU64::new(0),
            }),
        }
    }
}

/// Why a segment header is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub(crate) enum HeaderError {
    /// Another magic number or protocol version: a different program or version made it.
    #[error(
        "protocol mismatch: segment has magic {found_magic:#x} version {found_version}, this \
         binary speaks {expected_magic:#x} v{expected_version}"
    )]
    ProtocolMismatch {
        expected_magic: u64,
        found_magic: u64,
        expected_version: u32,
        found_version: u32,
    },
    /// The sizes in the header overflow or are out of range.
    #[error("segment parameters out of range")]
    BadParams,
    /// The header's total length disagrees with its parameters or the mapping.
    #[error(
        "segment length mismatch: header says {header} bytes, its parameters {layout}, the \
         mapping has {mapped}"
    )]
    BadLength {
        header: u64,
        layout: u64,
        mapped: u64,
    },
}

impl SegmentHeader {
    /// Checks a header found in a mapping of `mapped` bytes before anything else in the
    /// segment is touched: magic, version, parameters in range, lengths consistent. Returns the
    /// layout every offset is then computed from.
    pub(crate) fn check(&self, mapped: usize) -> Result<Layout, HeaderError> {
        let found_version = self.version.load(std::sync::atomic::Ordering::Acquire);
        if self.magic != MAGIC || found_version != VERSION {
            return Err(HeaderError::ProtocolMismatch {
                expected_magic: MAGIC,
                found_magic: self.magic,
                expected_version: VERSION,
                found_version,
            });
        }
        let p = self.params;
        // The same bounds the builder enforces.
        if p.n_slots == 0
            || p.n_slots > 1 << 24
            || p.max_workers == 0
            || p.max_workers > 4096
            || p.slot_inline % 64 != 0
            || p.spawn_area % 64 != 0
            || p.result_ring % 64 != 0
            || p.result_ring < 128
            || p.arena % 64 != 0
        {
            return Err(HeaderError::BadParams);
        }
        let layout = Layout::new(p).ok_or(HeaderError::BadParams)?;
        if layout.total as u64 != self.total_len || layout.total > mapped {
            return Err(HeaderError::BadLength {
                header: self.total_len,
                layout: layout.total as u64,
                mapped: mapped as u64,
            });
        }
        Ok(layout)
    }
}

impl BatchCtl {
    /// Empties the held list (between lives of the seat, and after a recovery).
    pub(crate) fn clear_held(&self) {
        self.started.store(0, std::sync::atomic::Ordering::Relaxed);
        for k in 0..BATCH_CAP {
            self.held_slots[k].store(0, std::sync::atomic::Ordering::Relaxed);
            self.held_tasks[k].store(0, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// The entries that name a slot: `(slot, task id)` pairs, `slot` as the worker wrote it
    /// (minus one; the caller checks it).
    pub(crate) fn held(&self) -> impl Iterator<Item = (u32, u64)> + '_ {
        (0..BATCH_CAP).filter_map(|k| {
            let s = self.held_slots[k].load(std::sync::atomic::Ordering::SeqCst);
            let t = self.held_tasks[k].load(std::sync::atomic::Ordering::SeqCst);
            (s != 0).then(|| (s - 1, t))
        })
    }
}

impl WorkerCtl {
    pub(crate) fn new() -> Self {
        WorkerCtl {
            state: AtomicU32::new(ctl_state::EMPTY),
            generation: AtomicU32::new(0),
            pid: AtomicU32::new(0),
            spawn_kind: AtomicU32::new(0),
            spawn_args_len: AtomicU64::new(0),
            spawn_out_len: AtomicU64::new(0),
            claim: AtomicU64::new(0),
            current_slot: AtomicU32::new(u32::MAX),
            _pad: 0,
            tasks_done: AtomicU64::new(0),
            current_task: AtomicU64::new(0),
            parked: AtomicU32::new(parked::NONE),
            wants_space: AtomicU32::new(0),
            hold: AtomicU32::new(0),
            direct: AtomicU32::new(0),
            idle: AtomicU32::new(0),
            _pad2: 0,
            _reserved: [0; 5],
        }
    }
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    #[test]
    fn struct_sizes_are_fixed() {
        assert_eq!(size_of::<SlotHeader>(), 64);
        assert_eq!(size_of::<WorkerCtl>(), 128);
        assert_eq!(size_of::<MpmcCell>(), 16);
        assert!(size_of::<ByteRingHeader>() <= RING_HDR);
        assert_eq!(align_of::<SegmentHeader>(), 64);
        assert_eq!(size_of::<SegmentHeader>(), 512);
        assert_eq!(size_of::<SlotTimes>(), 16);
        assert_eq!(size_of::<BatchCtl>(), 896);
    }

    fn good_header() -> (SegmentHeader, usize) {
        let l = Layout::new(Params {
            n_slots: 16,
            slot_inline: 1024,
            max_workers: 2,
            spawn_area: 4096,
            result_ring: 1 << 16,
            arena: 1 << 20,
        })
        .unwrap();
        let h = SegmentHeader::new(&l, 7, 0, 0);
        h.version
            .store(VERSION, std::sync::atomic::Ordering::Release);
        (h, l.total)
    }

    #[test]
    fn header_check_accepts_ours_and_names_every_mismatch() {
        let (h, total) = good_header();
        assert_eq!(h.check(total).unwrap().total, total);
        assert!(matches!(
            h.check(total - 1),
            Err(HeaderError::BadLength { .. })
        ));
        h.version
            .store(VERSION + 1, std::sync::atomic::Ordering::Relaxed);
        let e = h.check(total).unwrap_err();
        assert_eq!(
            e,
            HeaderError::ProtocolMismatch {
                expected_magic: MAGIC,
                found_magic: MAGIC,
                expected_version: VERSION,
                found_version: VERSION + 1
            }
        );
        assert!(e.to_string().contains("protocol mismatch"), "{e}");
        let (mut h, total) = good_header();
        h.magic ^= 1;
        assert!(matches!(
            h.check(total),
            Err(HeaderError::ProtocolMismatch { .. })
        ));
        let (mut h, total) = good_header();
        h.params.max_workers = 0;
        assert_eq!(h.check(total).unwrap_err(), HeaderError::BadParams);
        let (mut h, total) = good_header();
        h.params.arena = u64::MAX / 64 * 64;
        assert!(h.check(total).is_err());
    }

    /// Random headers (the in-tree smoke version of the cargo-fuzz target): `check` never
    /// panics, and whatever it accepts lies inside the mapping.
    #[test]
    fn header_check_survives_random_bytes() {
        let (good, total) = good_header();
        let mut rng = 0x9e37_79b9_7f4a_7c15u64;
        for i in 0..20_000 {
            // SAFETY: SegmentHeader is plain integers and atomics, valid for any bytes.
            let mut h: SegmentHeader = unsafe { std::mem::zeroed() };
            // SAFETY: copying a valid header's bytes over a same-typed value.
            unsafe { std::ptr::copy_nonoverlapping(&good, &mut h, 1) };
            let bytes = (&mut h as *mut SegmentHeader).cast::<u8>();
            // Flip a few random bytes (half the time anywhere, half in the params).
            for _ in 0..(1 + i % 4) {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                let at = (rng % 96) as usize;
                // SAFETY: `at` < 96 < size_of::<SegmentHeader>().
                unsafe { *bytes.add(at) = (rng >> 32) as u8 };
            }
            if let Ok(l) = h.check(total) {
                assert!(l.total <= total && l.arena <= l.total);
            }
        }
    }

    #[test]
    fn regions_are_aligned_and_ordered() {
        let l = Layout::new(Params {
            n_slots: 100,
            slot_inline: 1024,
            max_workers: 3,
            spawn_area: 4096,
            result_ring: 1 << 16,
            arena: 1 << 20,
        })
        .unwrap();
        assert_eq!(l.ring_cap, 128);
        for off in [
            l.task_cells,
            l.slots,
            l.ctls,
            l.slot_data,
            l.spawn_areas,
            l.result_rings,
            l.arena,
        ] {
            assert_eq!(off % 64, 0);
        }
        assert!(l.task_cells < l.slots && l.slots < l.ctls && l.ctls < l.slot_data);
        assert!(
            l.slot_data < l.spawn_areas
                && l.spawn_areas < l.result_rings
                && l.result_rings < l.arena
        );
        assert_eq!(l.total % 4096, 0);
        assert!(l.total >= l.arena + (1 << 20));
    }
}
