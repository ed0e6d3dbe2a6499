//! The completion ring: a single-producer byte ring that carries one worker's results back to
//! the parent. The worker serialises each result straight into the ring (no intermediate
//! buffer); the parent copies it out, checks the copy, and releases the record, possibly out of
//! order.
//!
//! # Protocol
//!
//! Positions are `u64` byte counts that never wrap; the byte at position `p` lives at
//! `p % capacity`. Every record starts on a 32-byte boundary with a 32-byte [`RecordHeader`]
//! `{len, kind, slot, released, task}` followed by `len` bytes of data padded to 32, so archived
//! data is 32-aligned (rkyv needs 16). A record never wraps: if it does not fit before the end,
//! the producer first writes a *pad* record (kind [`KIND_PAD`], already released) up to the end.
//!
//! - The worker (only writer of `tail`) waits until `capacity - (tail - head) >= needed`, writes
//!   data and header, then Release-stores `tail`.
//! - The parent (only writer of `head`, under a parent-local lock) Release-stores `released = 1`
//!   in a record once its caller is done with the bytes, then advances `head` over the
//!   contiguous released records below `tail`, and Release-stores `head`.
//! - The worker's Acquire load of `head` orders the parent's reads of a record before the
//!   worker's overwrite of the same bytes one lap later.
//!
//! The parent never trusts the ring: counters are checked (`head <= tail <= head + cap`,
//! aligned), every walk is bounded by the number of record positions, a record is released
//! only if its header names the slot and task the parent expects, and a corrupt ring is an
//! error ([`Corrupt`]) that gets its worker replaced, never a panic or a loop.

use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};

/// Record kind of filler up to the end of the ring (the task outcome kinds are in
/// `crate::slot::outcome`; none of them is 4).
pub(crate) const KIND_PAD: u32 = 4;

/// The alignment of every record (and so of its data, which follows a header of this size).
pub(crate) const REC_ALIGN: u64 = 32;
/// Size of a record header.
pub(crate) const REC_HDR: u64 = 32;

/// Rounds `n` up to a multiple of [`REC_ALIGN`].
#[inline]
pub(crate) const fn align_rec(n: u64) -> u64 {
    (n + REC_ALIGN - 1) & !(REC_ALIGN - 1)
}

/// Counters of a byte ring, `#[repr(C)]`, valid when zeroed.
#[repr(C)]
#[derive(Debug)]
pub(crate) struct ByteRingHeader {
    head: CachePadded<AtomicU64>,
    tail: CachePadded<AtomicU64>,
}

impl ByteRingHeader {
    /// Zeroed memory is a valid header too (that is how shared memory gets one).
    #[cfg(test)]
    pub(crate) fn new() -> Self {
        ByteRingHeader {
            head: CachePadded(AtomicU64::new(0)),
            tail: CachePadded(AtomicU64::new(0)),
        }
    }

    /// Test hook: what a misbehaving worker could write.
    #[cfg(test)]
    pub(crate) fn set(&self, head: u64, tail: u64) {
        self.head.store(head, Ordering::SeqCst);
        self.tail.store(tail, Ordering::SeqCst);
    }
}

/// The header in front of each record's data: `len`, `kind`, `slot` and `task` are plain words
/// the producer writes before publishing `tail` (so the consumer reads them after its Acquire);
/// the fourth word is the `released` flag, an atomic (see [`ByteRing::released`]). `slot` and
/// `task` name the task the record answers: the parent releases a record only after checking
/// them against its own record of the slot's task, never on a worker's say-so.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RecordHeader {
    pub(crate) len: u32,
    pub(crate) kind: u32,
    pub(crate) slot: u32,
    released: u32,
    pub(crate) task: u64,
    _pad: u64,
}

/// A completion ring whose counters or records make no sense (a worker wrote garbage): the
/// parent stops trusting the seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Corrupt;

/// A view of one byte ring: counters plus `capacity` data bytes at `data`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ByteRing<'a> {
    hdr: &'a ByteRingHeader,
    data: *mut u8,
    cap: u64,
    /// Where the `released` flags live: `None` = the fourth word of each record header (shared
    /// memory); `Some` = a side table of one atomic per record position (heap storage, the only
    /// form loom can model, since loom atomics cannot be cast from raw bytes).
    flags: Option<&'a [AtomicU32]>,
}

// SAFETY: the ring only hands out raw pointers; who may touch which bytes when is the protocol
// above, upheld by the producer/consumer roles. The counters are atomics.
unsafe impl Send for ByteRing<'_> {}
// SAFETY: as for Send.
unsafe impl Sync for ByteRing<'_> {}

/// Space the producer reserved for one record.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reservation {
    /// Ring position of the record header.
    pub(crate) pos: u64,
    /// Bytes of padding (a pad record) written before it, 0 if none.
    pad: u64,
    /// Bytes the record occupies (header + padded data).
    size: u64,
}

impl Reservation {
    /// Shrinks or grows an unpadded reservation to hold exactly `len` data bytes; the caller has
    /// checked that this much contiguous room was free (see the worker's fast path).
    pub(crate) fn with_len(self, len: u64) -> Reservation {
        debug_assert_eq!(self.pad, 0);
        Reservation {
            size: REC_HDR + align_rec(len),
            ..self
        }
    }

    /// Offset of the record header inside the ring's data area.
    pub(crate) fn record_offset(&self, cap: u64) -> u64 {
        (self.pos + self.pad) % cap
    }
}

impl<'a> ByteRing<'a> {
    /// A view over a header and `cap` data bytes.
    ///
    /// # Safety
    /// `data` must be valid for reads and writes of `cap` bytes for `'a`, aligned to
    /// [`REC_ALIGN`], and every process touching it must follow the protocol above. `cap` must
    /// be a multiple of [`REC_ALIGN`] and at least four records.
    pub(crate) unsafe fn new(hdr: &'a ByteRingHeader, data: *mut u8, cap: u64) -> Self {
        debug_assert!(cap % REC_ALIGN == 0 && cap >= 4 * REC_ALIGN);
        debug_assert!((data as usize) % REC_ALIGN as usize == 0);
        #[cfg(stateful_pool_loom)]
        panic!("under loom, use ByteRing::with_flags");
        #[cfg(not(stateful_pool_loom))]
        ByteRing {
            hdr,
            data,
            cap,
            flags: None,
        }
    }

    /// As [`new`](Self::new), with the `released` flags in a side table of `cap / REC_ALIGN`
    /// atomics.
    ///
    /// # Safety
    /// As for [`new`](Self::new).
    #[cfg(test)]
    pub(crate) unsafe fn with_flags(
        hdr: &'a ByteRingHeader,
        data: *mut u8,
        cap: u64,
        flags: &'a [AtomicU32],
    ) -> Self {
        assert_eq!(flags.len() as u64, cap / REC_ALIGN);
        ByteRing {
            hdr,
            data,
            cap,
            flags: Some(flags),
        }
    }

    /// The largest data length one record can carry: half the ring, less a header. Capping a
    /// record at half the ring guarantees it fits after waiting even when it needs a pad: if
    /// `off + size > cap` then `off > cap/2 >= size`, so `pad + size = cap - off + size < cap`.
    /// (A record of up to the whole ring could need more than the ring once padded, and its
    /// producer would wait forever.) Every path of the producer enforces this one bound.
    pub(crate) fn max_record_len(&self) -> u64 {
        (self.cap / 2) / REC_ALIGN * REC_ALIGN - REC_HDR
    }

    /// The header at `offset`, if `offset` is a record position inside the ring.
    fn record_ptr(&self, offset: u64) -> Option<*mut RecordHeader> {
        if offset % REC_ALIGN != 0 || offset.checked_add(REC_HDR)? > self.cap {
            return None;
        }
        // SAFETY: offset is aligned and the whole header is inside the data area (checked).
        Some(unsafe { self.data.add(offset as usize) as *mut RecordHeader })
    }

    /// A copy of the header at `offset` (`None` if `offset` is not a record position). The
    /// words were published before `tail` (see the protocol); for the parent they are only
    /// claims of the worker, checked by the caller.
    pub(crate) fn read_record(&self, offset: u64) -> Option<RecordHeader> {
        let p = self.record_ptr(offset)?;
        // SAFETY: in bounds and aligned (record_ptr). Volatile reads of the plain words only
        // (never of the `released` word, which is accessed atomically): a misbehaving worker
        // may change them at any time, so we read each once and work on the copy.
        unsafe {
            Some(RecordHeader {
                len: std::ptr::addr_of!((*p).len).read_volatile(),
                kind: std::ptr::addr_of!((*p).kind).read_volatile(),
                slot: std::ptr::addr_of!((*p).slot).read_volatile(),
                released: 0,
                task: std::ptr::addr_of!((*p).task).read_volatile(),
                _pad: 0,
            })
        }
    }

    /// Writes the plain words of a record header (producer only, before publishing `tail`).
    fn write_record(&self, offset: u64, len: u32, kind: u32, slot: u32, task: u64) {
        let p = self
            .record_ptr(offset)
            .expect("the producer reserves aligned, in-bounds records");
        // SAFETY: the producer owns the bytes between `tail` and `head + cap`, which include
        // this header; we write the plain words (not the flag word, which is atomic).
        unsafe {
            std::ptr::addr_of_mut!((*p).len).write_volatile(len);
            std::ptr::addr_of_mut!((*p).kind).write_volatile(kind);
            std::ptr::addr_of_mut!((*p).slot).write_volatile(slot);
            std::ptr::addr_of_mut!((*p).task).write_volatile(task);
        }
    }

    /// The `released` flag of the record at `offset` (`None` if not a record position).
    fn released(&self, offset: u64) -> Option<&AtomicU32> {
        match self.flags {
            Some(f) => f.get((offset / REC_ALIGN) as usize),
            #[cfg(not(stateful_pool_loom))]
            None => {
                let p = self.record_ptr(offset)?;
                // SAFETY: the flag word is 4-byte aligned inside the record header, lives as
                // long as the mapping (`'a`), and is only ever accessed atomically.
                Some(unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*p).released)) })
            }
            #[cfg(stateful_pool_loom)]
            None => unreachable!("loom rings always have a flag table"),
        }
    }

    // ---- producer side (the worker) ----

    /// Tries to reserve room for a record with `len` data bytes. `Err(())` if it can never fit;
    /// `Ok(None)` if the ring is too full right now (wait for the consumer and retry).
    pub(crate) fn try_reserve(&self, len: u64) -> Result<Option<Reservation>, ()> {
        if len > self.max_record_len() {
            return Err(());
        }
        let size = REC_HDR + align_rec(len);
        let tail = self.hdr.tail.load(Ordering::Relaxed);
        let off = tail % self.cap;
        let pad = if off + size > self.cap {
            self.cap - off
        } else {
            0
        };
        // SYNC POINT: Acquire pairs with the consumer's Release store of `head`: its reads of
        // the records it released are done before we overwrite them.
        let head = self.hdr.head.load(Ordering::Acquire);
        let free = self.cap.saturating_sub(tail.wrapping_sub(head));
        if free < pad + size {
            return Ok(None);
        }
        Ok(Some(Reservation {
            pos: tail,
            pad,
            size,
        }))
    }

    /// Contiguous data bytes writable at a zero-length reservation without wrapping or waiting,
    /// capped at [`max_record_len`](Self::max_record_len) (so the bound on a result does not
    /// depend on how full the ring is).
    pub(crate) fn contiguous_room(&self, r: &Reservation) -> u64 {
        let off = r.record_offset(self.cap);
        let free = self.cap.saturating_sub(self.used());
        let till_end = self.cap - off;
        (free.min(till_end).saturating_sub(REC_HDR) & !(REC_ALIGN - 1)).min(self.max_record_len())
    }

    /// Pointer to the data area of a reservation (aligned, `len` bytes writable).
    pub(crate) fn data_ptr(&self, r: &Reservation) -> *mut u8 {
        let off = r.record_offset(self.cap) + REC_HDR;
        // SAFETY: `off + len <= cap` by construction of the reservation.
        unsafe { self.data.add(off as usize) }
    }

    /// Publishes a reserved record with `len` data bytes (already written), of `kind`, answering
    /// task `task` in slot `slot`. Returns the record's offset (for the consumer's `release`).
    pub(crate) fn commit(&self, r: Reservation, len: u64, kind: u32, slot: u32, task: u64) -> u64 {
        debug_assert!(REC_HDR + align_rec(len) <= r.size);
        if r.pad > 0 {
            let pad_off = r.pos % self.cap;
            self.write_record(pad_off, (r.pad - REC_HDR) as u32, KIND_PAD, u32::MAX, 0);
            if let Some(f) = self.released(pad_off) {
                f.store(1, Ordering::Relaxed);
            }
        }
        let offset = r.record_offset(self.cap);
        self.write_record(offset, len as u32, kind, slot, task);
        if let Some(f) = self.released(offset) {
            f.store(0, Ordering::Relaxed);
        }
        // SYNC POINT: data and headers visible to a consumer that Acquire-loads `tail` (the
        // head advance) or the task slot's state (the reader, published after this).
        self.hdr
            .tail
            .store(r.pos + r.pad + REC_HDR + align_rec(len), Ordering::Release);
        offset
    }

    /// Test builds: a hostile producer writes these counters.
    #[cfg(feature = "failpoints")]
    pub(crate) fn scribble_counters(&self, head: u64, tail: u64) {
        self.hdr.head.store(head, Ordering::SeqCst);
        self.hdr.tail.store(tail, Ordering::SeqCst);
    }

    /// Test builds: a hostile producer writes random words at random places of its ring.
    #[cfg(feature = "failpoints")]
    pub(crate) fn scribble_records(&self, mut rand: impl FnMut() -> u64) {
        for _ in 0..16 {
            let at = (rand() % (self.cap / 8)) * 8;
            // SAFETY: inside the ring's data area, 8-aligned (test-only scribbling).
            unsafe { self.data.add(at as usize).cast::<u64>().write(rand()) };
        }
    }

    // ---- consumer side (the parent) ----

    /// The data of the record at `offset` if its header says it answers task `task` in slot
    /// `slot` with `len` bytes of `kind`: a pointer to `len` bytes inside the ring. `None` if
    /// anything disagrees or is out of range (the record is not that task's).
    pub(crate) fn record_data(
        &self,
        offset: u64,
        slot: u32,
        task: u64,
        kind: u32,
        len: u64,
    ) -> Option<*const u8> {
        let h = self.read_record(offset)?;
        if h.slot != slot || h.task != task || h.kind != kind || h.len as u64 != len {
            return None;
        }
        if offset.checked_add(REC_HDR)?.checked_add(len)? > self.cap {
            return None;
        }
        // SAFETY: in range, checked above.
        Some(unsafe { self.data.add((offset + REC_HDR) as usize) as *const u8 })
    }

    /// Marks the record at `offset` released. The caller then calls [`advance`](Self::advance)
    /// under its lock. Never touch the record's bytes after this. Only for records the caller
    /// checked are its own (see [`record_data`](Self::record_data)).
    pub(crate) fn release(&self, offset: u64) {
        if let Some(f) = self.released(offset) {
            // SYNC POINT: our reads of the record are done before the head advance that
            // observes this flag (Acquire in `advance`), and so before the producer reuses the
            // bytes.
            f.store(1, Ordering::Release);
        }
    }

    /// The counters, checked: `head <= tail <= head + cap`, both aligned. `Err` if a worker
    /// wrote nonsense into them.
    fn span(&self) -> Result<(u64, u64), Corrupt> {
        // SYNC POINT: Acquire pairs with the producer's Release store of `tail`.
        let tail = self.hdr.tail.load(Ordering::Acquire);
        let head = self.hdr.head.load(Ordering::Relaxed);
        if head > tail || tail - head > self.cap || head % REC_ALIGN != 0 || tail % REC_ALIGN != 0 {
            return Err(Corrupt);
        }
        Ok((head, tail))
    }

    /// The record at position `pos` (below `tail`), checked to lie inside the ring without
    /// wrapping and before `tail`: its offset, header and full size.
    fn record_at(&self, pos: u64, tail: u64) -> Result<(u64, RecordHeader, u64), Corrupt> {
        let off = pos % self.cap;
        let h = self.read_record(off).ok_or(Corrupt)?;
        let size = REC_HDR + align_rec(h.len as u64);
        // `size > tail - pos`, not `pos + size > tail`: counters a worker set near `u64::MAX`
        // must not wrap the sum (a wrapped `head` would restart the walk from 0). `pos < tail`
        // in every caller, so each step moves at least `REC_HDR` and stays at or below `tail`.
        if off + size > self.cap || size > tail.saturating_sub(pos) {
            return Err(Corrupt);
        }
        Ok((off, h, size))
    }

    /// Moves `head` over contiguous released records. Only one thread may run this at a time
    /// (the parent holds a per-ring lock). Returns whether `head` moved; `Err` if the counters
    /// or a record header are nonsense. At most `cap / REC_ALIGN` steps, whatever the worker
    /// wrote.
    pub(crate) fn advance(&self) -> Result<bool, Corrupt> {
        let (start, tail) = self.span()?;
        let mut head = start;
        while head < tail {
            let (off, _, size) = self.record_at(head, tail)?;
            let released = self.released(off).ok_or(Corrupt)?;
            if released.load(Ordering::Acquire) == 0 {
                break;
            }
            head += size;
        }
        if head != start {
            // SYNC POINT: pairs with the producer's Acquire load of `head` in `try_reserve`.
            self.hdr.head.store(head, Ordering::Release);
            Ok(true)
        } else {
            Ok(false)
        }
    }

    /// Calls `f(offset, header)` for each record between `head` and `tail` that is not released
    /// yet (the parent's sweep of a dead worker's ring, and the evacuation of uncollected
    /// results); `f` returns whether to release it. Then advances `head`. Only under the ring's
    /// lock. Bounded by `cap / REC_ALIGN` records.
    pub(crate) fn sweep(
        &self,
        mut f: impl FnMut(u64, &RecordHeader) -> bool,
    ) -> Result<bool, Corrupt> {
        let (mut pos, tail) = self.span()?;
        while pos < tail {
            let (off, h, size) = self.record_at(pos, tail)?;
            let released = self.released(off).ok_or(Corrupt)?;
            if released.load(Ordering::Acquire) == 0 && f(off, &h) {
                released.store(1, Ordering::Release);
            }
            pos += size;
        }
        self.advance()
    }

    /// Forgets everything in the ring (`head = tail`, realigned): for a seat whose counters a
    /// worker corrupted, once that worker is dead and under the ring's lock. Every record
    /// header is zeroed, so a record a caller has yet to collect fails its header check from
    /// now on: the seat's next worker will write over those bytes, and a late collect must
    /// neither copy its records nor release one of them.
    pub(crate) fn reset(&self) {
        // SAFETY: `data` is valid for `cap` bytes (the view's invariant). The only other
        // writers are the seat's worker, dead (the caller's contract), and the parent's
        // releases, which take the lock the caller holds.
        unsafe { std::ptr::write_bytes(self.data, 0, self.cap as usize) };
        if let Some(flags) = self.flags {
            for f in flags {
                f.store(0, Ordering::Relaxed);
            }
        }
        let tail = self.hdr.tail.load(Ordering::Acquire);
        let at = align_rec(tail % self.cap);
        let at = if at >= self.cap { 0 } else { at };
        self.hdr.tail.store(at, Ordering::Release);
        self.hdr.head.store(at, Ordering::Release);
    }

    /// Bytes currently occupied (a snapshot; saturating, as the counters may be nonsense).
    pub(crate) fn used(&self) -> u64 {
        let tail = self.hdr.tail.load(Ordering::SeqCst);
        let head = self.hdr.head.load(Ordering::SeqCst);
        tail.saturating_sub(head)
    }
}
