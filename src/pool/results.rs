//! Results, across the trust boundary: from a slot's published outcome to the caller.
//!
//! A worker maps the whole segment and can write anything at any time, so the parent never
//! reads a result where the worker can still change it:
//! - the outcome words are read once and checked ([`RawOutcome::decode`]);
//! - a ring record is used only if its header names this slot and this task (the parent's own
//!   task id, never the worker's);
//! - the bytes are copied into private memory first, and only the copy is validated and
//!   decoded (copy, then validate);
//! - a record is released only after those checks, so a worker cannot make the parent release
//!   another task's record;
//! - copies out of a ring, releases and sweeps of that ring hold the ring's (parent-local)
//!   lock, so the parent's own writes into a ring (the `released` flags) never overlap a copy
//!   another of its threads is making, however a worker garbles the record headers.
//!
//! **Evacuation.** A worker that needs room in its completion ring while earlier results sit
//! there uncollected (their callers hold the handles and wait on something else, perhaps this
//! very result) flags `wants_space` and rings the doorbell. The reactor then copies every
//! published, uncollected record of that ring to the heap (the slot's `spill`) and releases it.
//! The result's owner finds it there. So a worker never waits for ring space that only a caller
//! could free. Who has a record is one word per slot, `res = task_id << 3 | RES_*`, changed only
//! by compare-exchange: the collecting caller, the reactor and retirement each take the record
//! exactly once.

use super::shared::Shared;
use crate::error::{ExitCause, TaskError};
use crate::ring::bytes::{ByteRing, RecordHeader};
use crate::slot::outcome::{
    KIND_BAD_TASK, KIND_ERR, KIND_OK, KIND_PANIC, KIND_POISONED, KIND_TOO_LARGE, Published,
    WORD_BYTES,
};
use rkyv::util::AlignedVec;
use std::sync::atomic::Ordering;

/// Nobody has touched the task's ring record yet.
const RES_UNREAD: u64 = 0;
/// Its caller is copying it out.
const RES_READING: u64 = 1;
/// The reactor is moving it to the heap.
const RES_EVACUATING: u64 = 2;
/// The reactor moved it to the slot's `spill`.
const RES_EVACUATED: u64 = 3;
/// Collected or dropped: the record is released (or never was this task's).
const RES_TAKEN: u64 = 4;

/// Inline results up to this size are copied to the stack.
const SMALL: usize = 256;

/// A stack buffer for small results, aligned as archives need.
#[repr(C, align(16))]
struct Small([u8; SMALL]);

/// Scratch buffers bigger than this are not kept between results.
const SCRATCH_KEEP: usize = 4 << 20;

thread_local! {
    /// The private copy of a result, reused so collecting allocates nothing per task (taken
    /// out while in use: a re-entrant collect finds none and uses a fresh buffer).
    static SCRATCH: std::cell::Cell<Option<AlignedVec<16>>> = const { std::cell::Cell::new(None) };
}

/// Where a result is copied: a private buffer, or memory the caller provides.
enum Dest<'b> {
    Buf(&'b mut AlignedVec<16>),
    /// `cap` writable bytes at `ptr`, `len` of them written.
    Raw {
        ptr: *mut u8,
        cap: usize,
        len: usize,
    },
}

impl Dest<'_> {
    fn len(&self) -> usize {
        match self {
            Dest::Buf(b) => b.len(),
            Dest::Raw { len, .. } => *len,
        }
    }

    /// Appends `len` bytes at `src` (shared memory a worker may be writing) with a raw copy.
    ///
    /// # Safety
    /// `src..src + len` must lie inside the mapped segment; for `Raw`, `ptr..ptr + cap` must
    /// be valid for writes (the contract of `copy_output_into`).
    unsafe fn copy_from(&mut self, src: *const u8, n: usize) -> Result<(), &'static str> {
        match self {
            // SAFETY: passed on (this function's contract).
            Dest::Buf(b) => unsafe { Shared::copy_out(b, src, n) },
            Dest::Raw { ptr, cap, len } => {
                if n > *cap - *len {
                    return Err("the result is larger than its destination");
                }
                // SAFETY: `len + n <= cap` bytes of the destination are writable (checked
                // above, and the caller's contract); the source lies in the segment (read as
                // raw bytes: a worker may be writing it), the destination in another pool's
                // arena block (a loan): no overlap with a live ring record (the destination
                // block is ours alone). Large copies stream (`shm::copy`): the next stage's
                // worker reads them, later.
                unsafe { crate::shm::copy::copy_raw(src, n, ptr.add(*len)) };
                *len += n;
            }
        }
        Ok(())
    }

    /// Takes the copy the reactor made (moved out of the ring under pressure).
    fn take_spill(&mut self, spill: AlignedVec<16>) -> Result<(), &'static str> {
        match self {
            Dest::Buf(b) => {
                **b = spill;
                Ok(())
            }
            // SAFETY: `spill` is our private buffer, inside the address space; `copy_from`
            // bounds the copy by the destination's capacity.
            Dest::Raw { .. } => unsafe { self.copy_from(spill.as_ptr(), spill.len()) },
        }
    }
}

/// What the parent makes of a record it finds in a completion ring.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fate {
    /// The published, uncollected result of its slot's current task.
    Published,
    /// Its slot's current task, not published yet (its worker is between commit and publish).
    Unpublished,
    /// Nobody will ever read it: its slot has moved on, or published something else, or the
    /// header is nonsense.
    Orphan,
}

impl Shared {
    /// Calls `f` with the task's outcome in `slot` (which the caller observed `DONE`): the
    /// output's archive as a private, 16-aligned copy (not yet validated as the output type:
    /// `f` does that on the copy), or the task's error.
    pub(crate) fn with_result<R>(
        &self,
        slot: u32,
        f: impl FnOnce(Result<&[u8], TaskError>) -> R,
    ) -> R {
        // Small inline results (the common case for tiny tasks) are copied to the stack; a
        // tiny one came in the header words already read.
        let raw = self.slot(slot).outcome();
        let published = self.decode(raw);
        if let Published::Word { bytes, len } = published {
            /// The word, aligned as archives need.
            #[repr(C, align(16))]
            struct Word([u8; WORD_BYTES]);
            let word = Word(bytes);
            self.inline_taken(slot);
            return f(Ok(&word.0[..len]));
        }
        if let Published::Inline { at, len } = published {
            if len <= SMALL {
                let mut small = std::mem::MaybeUninit::<Small>::uninit();
                let dst = small.as_mut_ptr().cast::<u8>();
                // SAFETY: `at + len <= slot_inline` (decode): the source lies in this slot's
                // data area; the destination is our stack buffer of `SMALL >= len` bytes. The
                // worker may still write the source: only this copy is used.
                unsafe { std::ptr::copy_nonoverlapping(self.inline_ptr(slot, at, len), dst, len) };
                self.inline_taken(slot);
                // SAFETY: the first `len` bytes were just written.
                return f(Ok(unsafe { std::slice::from_raw_parts(dst, len) }));
            }
        }
        let mut buf = SCRATCH.take().unwrap_or_default();
        let r = self.read_result(slot, raw, &mut buf, f);
        if buf.capacity() <= SCRATCH_KEEP {
            SCRATCH.set(Some(buf));
        }
        r
    }

    /// Appends `len` bytes at `src` (shared memory a worker may be writing) to `buf`, with a
    /// raw copy: no reference to the shared bytes is ever formed, and only the copy is used.
    ///
    /// # Safety
    /// `src..src + len` must lie inside the mapped segment.
    unsafe fn copy_out(buf: &mut AlignedVec<16>, src: *const u8, len: usize) {
        buf.reserve(len);
        let at = buf.len();
        // SAFETY: `reserve` made room for `len` more bytes at `at`; the source is inside the
        // mapping (the caller's contract) and cannot overlap our private buffer.
        unsafe {
            std::ptr::copy_nonoverlapping(src, buf.as_mut_ptr().add(at), len);
            buf.set_len(at + len);
        }
    }

    /// Where an inline result lies (`at + len` checked against the slot's area by `decode`).
    fn inline_ptr(&self, slot: u32, at: usize, len: usize) -> *const u8 {
        self.seg
            .bytes_ptr(self.layout.slot_data_off(slot) + at, len)
            .cast_const()
    }

    /// An inline result has been copied: no ring record to let go at retirement. A plain
    /// store (this caller owns the slot): should a misbehaving worker have shown the reactor a
    /// ring record for this task meanwhile, the reactor's own compare-exchange from
    /// `EVACUATING` fails on the changed word and its copy is never handed to anyone.
    fn inline_taken(&self, slot: u32) {
        let meta = self.meta(slot);
        meta.res
            .store(meta.task_id() << 3 | RES_TAKEN, Ordering::Relaxed);
    }

    /// The general path of [`with_result`](Self::with_result), for the outcome words `raw`
    /// it read once (every decision below is taken on that one copy).
    fn read_result<R>(
        &self,
        slot: u32,
        raw: crate::slot::RawOutcome,
        buf: &mut AlignedVec<16>,
        f: impl FnOnce(Result<&[u8], TaskError>) -> R,
    ) -> R {
        buf.clear();
        let worker = raw.worker as usize;
        let bad = |message: &str| TaskError::BadResult {
            worker,
            message: message.to_string(),
        };
        let by_parent = self.meta(slot).by_parent.load(Ordering::Relaxed);
        let kind = match self.decode(raw) {
            Published::NoWorkers
            | Published::Broken
            | Published::Died { .. }
            | Published::Timeout { .. }
                if !by_parent =>
            {
                return f(Err(bad(
                    "a worker claimed an outcome only the parent gives",
                )));
            }
            Published::Inline { at, len } => {
                // SAFETY: `at + len <= slot_inline` (decode), so the bytes lie in this slot's
                // data area.
                unsafe { Self::copy_out(buf, self.inline_ptr(slot, at, len), len) };
                self.inline_taken(slot);
                KIND_OK
            }
            Published::Word { bytes, len } => {
                buf.extend_from_slice(&bytes[..len]);
                self.inline_taken(slot);
                KIND_OK
            }
            Published::Record {
                kind,
                seat,
                off,
                len,
            } => match self.copy_record(slot, kind, seat, off, len, &mut Dest::Buf(buf)) {
                // (A copy the reactor made may be of another length if a worker changed its
                // outcome words meanwhile: only a copy of the published length is used.)
                Ok(()) if buf.len() as u64 == len => kind,
                Ok(()) => return f(Err(bad("the result changed after it was published"))),
                Err(m) => return f(Err(bad(m))),
            },
            Published::Cancelled => return f(Err(TaskError::Cancelled)),
            Published::NoWorkers => return f(Err(TaskError::NoWorkers)),
            Published::Broken => return f(Err(TaskError::PoolBroken)),
            Published::Died { worker, pid, cause } => {
                return f(Err(TaskError::WorkerDied {
                    worker: worker as usize,
                    pid,
                    cause: ExitCause::decode(cause),
                }));
            }
            Published::Timeout { worker, after_ns } => {
                return f(Err(TaskError::Timeout {
                    worker: worker as usize,
                    after: std::time::Duration::from_nanos(after_ns),
                }));
            }
            Published::Expired { worker } => {
                // The budget the caller gave (submit to deadline); the words are the parent's
                // own, but in shared memory: only shown, never trusted for anything else.
                let t = self.times(slot);
                let after = t
                    .deadline_ns
                    .load(Ordering::Relaxed)
                    .saturating_sub(t.submitted_ns.load(Ordering::Relaxed));
                return f(Err(TaskError::Timeout {
                    worker: worker as usize,
                    after: std::time::Duration::from_nanos(after),
                }));
            }
            Published::Invalid(m) => return f(Err(bad(m))),
        };
        let message = || String::from_utf8_lossy(buf).into_owned();
        let e = match kind {
            KIND_OK => return f(Ok(&buf[..])),
            KIND_ERR => TaskError::Failed {
                worker,
                message: message(),
            },
            KIND_PANIC => TaskError::panicked(worker, message()),
            KIND_BAD_TASK => TaskError::BadTask {
                worker,
                message: message(),
            },
            KIND_POISONED => TaskError::Poisoned {
                worker,
                message: message(),
            },
            KIND_TOO_LARGE => match buf.get(..8).and_then(|b| <[u8; 8]>::try_from(b).ok()) {
                Some(n) => TaskError::ResultTooLarge {
                    worker,
                    len: u64::from_le_bytes(n) as usize,
                    max: self.max_result_len() as usize,
                },
                None => bad("malformed too-large record"),
            },
            _ => bad("unknown result kind"),
        };
        f(Err(e))
    }

    /// The length of the task's output archive, if its outcome (which the caller observed
    /// `DONE`) is an output rather than an error. Only a hint for sizing a destination:
    /// [`copy_output_into`](Self::copy_output_into) reads the words again and checks.
    pub(crate) fn ok_len(&self, slot: u32) -> Option<usize> {
        match self.decode(self.slot(slot).outcome()) {
            Published::Inline { len, .. } | Published::Word { len, .. } => Some(len),
            Published::Record {
                kind: KIND_OK, len, ..
            } => Some(len as usize),
            _ => None,
        }
    }

    /// Copies the task's output archive into `cap` bytes at `dst` instead of a private
    /// buffer (a hand-off into another pool's arena, which that pool's worker validates), and
    /// lets the record go. Returns its length, or what was wrong: the outcome is not an
    /// output, or it is larger than `cap` (a worker changed it since `ok_len`). On an error
    /// the output is not consumed unless the message says so; the caller fails the task.
    ///
    /// # Safety
    /// `dst..dst + cap` must be valid for writes and not read by anyone until this returns.
    pub(crate) unsafe fn copy_output_into(
        &self,
        slot: u32,
        dst: *mut u8,
        cap: usize,
    ) -> Result<usize, &'static str> {
        let mut d = Dest::Raw {
            ptr: dst,
            cap,
            len: 0,
        };
        match self.decode(self.slot(slot).outcome()) {
            Published::Inline { at, len } => {
                // SAFETY: `at + len <= slot_inline` (decode): the source lies in this slot's
                // data area; `copy_from` checks `len` against `cap`.
                unsafe { d.copy_from(self.inline_ptr(slot, at, len), len) }?;
                self.inline_taken(slot);
            }
            Published::Word { bytes, len } => {
                // SAFETY: `bytes` is our own copy, `len <= WORD_BYTES` of it; `copy_from`
                // checks `len` against `cap`.
                unsafe { d.copy_from(bytes.as_ptr(), len) }?;
                self.inline_taken(slot);
            }
            Published::Record {
                kind: KIND_OK,
                seat,
                off,
                len,
            } => {
                self.copy_record(slot, KIND_OK, seat, off, len, &mut d)?;
                if d.len() as u64 != len {
                    return Err("the result changed after it was published");
                }
            }
            _ => return Err("the outcome is not an output"),
        }
        Ok(d.len())
    }

    /// The largest result archive a worker can return (half a completion ring, less a header).
    pub(crate) fn max_result_len(&self) -> u64 {
        self.result_ring(0).map_or(0, |r| r.max_record_len())
    }

    fn decode(&self, raw: crate::slot::RawOutcome) -> Published {
        raw.decode(
            self.layout.params.slot_inline as u64,
            self.n_seats(),
            self.layout.params.result_ring,
        )
    }

    /// Copies the ring record of the task in `slot` into `buf` and releases it, or takes the
    /// copy the reactor already made. The record must carry this slot and task in its header.
    fn copy_record(
        &self,
        slot: u32,
        kind: u32,
        seat: u32,
        off: u64,
        len: u64,
        buf: &mut Dest<'_>,
    ) -> Result<(), &'static str> {
        let meta = self.meta(slot);
        let task = meta.task_id();
        let tag = task << 3;
        let ring = self
            .result_ring(seat)
            .ok_or("result names a worker seat out of range")?;
        match meta.res.compare_exchange(
            tag | RES_UNREAD,
            tag | RES_READING,
            Ordering::AcqRel,
            Ordering::Acquire,
        ) {
            Ok(_) => {
                // Under the ring's lock: the parent's only writes into a ring (the `released`
                // flags, by a release or a sweep) never overlap this copy, even when a worker's
                // garbage makes records overlap.
                let g = self.ring_locks[seat as usize]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                let r = match ring.record_data(off, slot, task, kind, len) {
                    Some(p) => {
                        // SAFETY: `record_data` checked that `len` bytes at `p` lie in the ring.
                        let copied = unsafe { buf.copy_from(p, len as usize) };
                        // Released whether or not the copy fit: the record is consumed.
                        ring.release(off);
                        Ok((ring.advance(), copied))
                    }
                    None => Err("the result record does not belong to this task"),
                };
                drop(g);
                meta.res.store(tag | RES_TAKEN, Ordering::Release);
                r.and_then(|(moved, copied)| {
                    self.after_advance(seat, moved);
                    copied
                })
            }
            Err(_) => match self.await_evacuation(slot, tag) {
                Some(spill) => buf.take_spill(spill),
                None => Err("the result was already collected"),
            },
        }
    }

    /// If the reactor moved (or is moving) the result of task `tag >> 3` out of the ring, waits
    /// for it (a memcpy on a parent thread) and takes the copy.
    fn await_evacuation(&self, slot: u32, tag: u64) -> Option<AlignedVec<16>> {
        let meta = self.meta(slot);
        loop {
            let cur = meta.res.load(Ordering::Acquire);
            if cur == tag | RES_EVACUATING {
                std::thread::yield_now();
                continue;
            }
            if cur != tag | RES_EVACUATED {
                return None;
            }
            let spill = meta.spill.lock().unwrap_or_else(|e| e.into_inner()).take();
            meta.res.store(tag | RES_TAKEN, Ordering::Release);
            return spill;
        }
    }

    /// After a head advance: wake a worker waiting for room, or flag a corrupt ring.
    fn after_advance(&self, seat: u32, moved: Result<bool, crate::ring::bytes::Corrupt>) {
        match moved {
            Ok(true) => self.header().space.notify_all(),
            Ok(false) => {}
            Err(_) => self.seat_misbehaved(seat),
        }
    }

    /// At retirement: whatever the task's result still holds (a ring record nobody read, a
    /// spilled copy) is let go.
    pub(super) fn forget_result(&self, slot: u32) {
        let meta = self.meta(slot);
        let task = meta.task_id();
        let tag = task << 3;
        if meta.res.load(Ordering::Acquire) == tag | RES_TAKEN {
            // The common case: collected, nothing left.
            return;
        }
        let sh = self.slot(slot);
        if sh.is_done()
            && meta
                .res
                .compare_exchange(
                    tag | RES_UNREAD,
                    tag | RES_TAKEN,
                    Ordering::AcqRel,
                    Ordering::Acquire,
                )
                .is_ok()
        {
            if let Published::Record {
                kind,
                seat,
                off,
                len,
            } = self.decode(sh.outcome())
            {
                if let Some(ring) = self.result_ring(seat) {
                    let moved = {
                        let _g = self.ring_locks[seat as usize]
                            .lock()
                            .unwrap_or_else(|e| e.into_inner());
                        ring.record_data(off, slot, task, kind, len).map(|_| {
                            ring.release(off);
                            ring.advance()
                        })
                    };
                    if let Some(moved) = moved {
                        self.after_advance(seat, moved);
                    }
                }
            }
            return;
        }
        drop(self.await_evacuation(slot, tag));
    }

    /// What the record at `off` in seat `seat`'s ring is to the parent (see [`Fate`]).
    fn fate(&self, seat: u32, off: u64, h: &RecordHeader) -> Fate {
        if h.slot >= self.n_slots() {
            return Fate::Orphan;
        }
        // The parent's own record of the slot's task: a record of an earlier task of this slot
        // was retired without being released (nobody will read it again).
        if self.meta(h.slot).task_id() != h.task {
            return Fate::Orphan;
        }
        let sh = self.slot(h.slot);
        if !sh.is_done() {
            return Fate::Unpublished;
        }
        let o = sh.outcome();
        if o.worker == seat && o.rec == off && o.kind == h.kind && o.len == h.len {
            Fate::Published
        } else {
            Fate::Orphan
        }
    }

    /// The reactor's evacuation pass (module docs): for each seat whose worker waits for ring
    /// room, moves the published, uncollected results to the heap and releases them (and any
    /// orphan records). Returns whether it released anything (a pass that could not, because
    /// a caller was copying a record out, leaves the reactor free to sleep: the caller's
    /// release wakes the worker).
    pub(crate) fn evacuate(&self) -> bool {
        let mut did = false;
        for seat in 0..self.n_seats() {
            let ctl = self.ctl(seat);
            if ctl.wants_space.load(Ordering::SeqCst) == 0 {
                continue;
            }
            let Some(ring) = self.result_ring(seat) else {
                continue;
            };
            let swept = {
                let _g = self.ring_locks[seat as usize]
                    .lock()
                    .unwrap_or_else(|e| e.into_inner());
                ring.sweep(|off, h| {
                    let release = match self.fate(seat, off, h) {
                        Fate::Orphan => true,
                        Fate::Unpublished => false,
                        Fate::Published => self.spill(seat, &ring, off, h),
                    };
                    did |= release;
                    release
                })
            };
            ctl.wants_space.store(0, Ordering::SeqCst);
            if swept.is_err() {
                self.seat_misbehaved(seat);
            }
            self.header().space.notify_all();
        }
        did
    }

    /// Moves one published record to its slot's `spill`, if nobody else has it. Returns whether
    /// it did (the record may then be released).
    fn spill(&self, _seat: u32, ring: &ByteRing<'_>, off: u64, h: &RecordHeader) -> bool {
        let meta = self.meta(h.slot);
        let tag = h.task << 3;
        if meta
            .res
            .compare_exchange(
                tag | RES_UNREAD,
                tag | RES_EVACUATING,
                Ordering::AcqRel,
                Ordering::Acquire,
            )
            .is_err()
        {
            return false;
        }
        let Some(p) = ring.record_data(off, h.slot, h.task, h.kind, h.len as u64) else {
            meta.res.store(tag | RES_UNREAD, Ordering::Release);
            return false;
        };
        let mut v = AlignedVec::<16>::new();
        // SAFETY: `record_data` checked that `h.len` bytes at `p` lie in the ring.
        unsafe { Self::copy_out(&mut v, p, h.len as usize) };
        *meta.spill.lock().unwrap_or_else(|e| e.into_inner()) = Some(v);
        // A compare-exchange: nothing else may move the word while it is EVACUATING, but if a
        // misbehaving worker's games did, the copy is simply dropped at retirement.
        meta.res
            .compare_exchange(
                tag | RES_EVACUATING,
                tag | RES_EVACUATED,
                Ordering::AcqRel,
                Ordering::Relaxed,
            )
            .is_ok()
    }

    /// Supervisor, after a worker died: releases every record in its ring that nobody will
    /// read (it died between committing a record and publishing it, or the record belongs to a
    /// task that was answered otherwise), so the seat's next worker finds the ring moving. A
    /// ring whose counters or headers are nonsense is reset.
    pub(crate) fn sweep_dead_seat(&self, seat: u32) {
        let Some(ring) = self.result_ring(seat) else {
            return;
        };
        let _g = self.ring_locks[seat as usize]
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        let swept = ring.sweep(|off, h| self.fate(seat, off, h) != Fate::Published);
        if swept.is_err() {
            ring.reset();
        }
        self.ctl(seat).wants_space.store(0, Ordering::SeqCst);
    }
}
