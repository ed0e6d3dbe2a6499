//! The completion ring: a single-producer byte ring that carries one worker's results back to
//! the parent. The worker serialises each result straight into the ring (no intermediate
//! buffer); the parent reads it in place and releases it, possibly out of order.
//!
//! # Protocol
//!
//! Positions are `u64` byte counts that never wrap; the byte at position `p` lives at
//! `p % capacity`. Every record starts on a 16-byte boundary with a 16-byte [`RecordHeader`]
//! `{len, kind, slot, released}` followed by `len` bytes of data padded to 16, so archived data
//! is 16-aligned (rkyv's largest default alignment). A record never wraps: if it does not fit
//! before the end, the producer first writes a *pad* record (kind [`KIND_PAD`], already released)
//! up to the end.
//!
//! - The worker (only writer of `tail`) waits until `capacity - (tail - head) >= needed`, writes
//!   data and header, then Release-stores `tail`.
//! - The parent (only writer of `head`, under a parent-local lock) Release-stores `released = 1`
//!   in a record once its caller is done with the bytes, then advances `head` over the
//!   contiguous released records below `tail`, and Release-stores `head`.
//! - The worker's Acquire load of `head` orders the parent's reads of a record before the
//!   worker's overwrite of the same bytes one lap later.

use crate::sync::{AtomicU32, AtomicU64, CachePadded, Ordering};

/// Record kind: the data is the rkyv archive of the task's output.
pub(crate) const KIND_OK: u32 = 1;
/// Record kind: the data is a UTF-8 message of an error the worker's execute step returned.
pub(crate) const KIND_ERR: u32 = 2;
/// Record kind: the data is a UTF-8 message of a panic in the worker's execute step.
pub(crate) const KIND_PANIC: u32 = 3;
/// Record kind: filler up to the end of the ring.
pub(crate) const KIND_PAD: u32 = 4;
/// Record kind: the task did not validate; the data is the validator's message.
pub(crate) const KIND_BAD_TASK: u32 = 5;
/// Record kind: the output's archive did not fit the ring; the data is its length (u64 LE).
pub(crate) const KIND_TOO_LARGE: u32 = 6;
/// Slot-only outcome (no record): the task was cancelled before it started.
pub(crate) const KIND_CANCELLED: u32 = 7;

/// Bit of a slot's `result_rec` meaning "no ring record: the output archive is inline in the
/// slot's own data area, at the offset in the low bits" (small results; saves the ring's
/// cache-line hand-offs). The offset is past the task's own archive, which stays intact so a
/// task whose worker died can be re-run.
pub(crate) const REC_INLINE: u64 = 1 << 63;
/// Slot-only outcome: the worker running the task died; `result_rec` = its pid, `result_len` =
/// the encoded cause (see `ExitCause::encode`).
pub(crate) const KIND_DIED: u32 = 8;
/// Slot-only outcome: the task ran past its timeout and its worker was killed; `result_rec` =
/// the timeout in nanoseconds.
pub(crate) const KIND_TIMEOUT: u32 = 9;
/// Slot-only outcome: every worker has failed for good; nothing can run the task.
pub(crate) const KIND_NO_WORKERS: u32 = 10;
/// Record kind: the worker declared itself poisoned while running the task (and retires); the
/// data is the message.
pub(crate) const KIND_POISONED: u32 = 11;

/// Whether an outcome of `kind` at `rec` occupies a record in the worker's completion ring
/// (which retiring the slot must release).
pub(crate) fn has_ring_record(kind: u32, rec: u64) -> bool {
    matches!(
        kind,
        KIND_OK | KIND_ERR | KIND_PANIC | KIND_BAD_TASK | KIND_TOO_LARGE | KIND_POISONED
    ) && rec & REC_INLINE == 0
}

/// Size of a record header; also the alignment of every record.
pub(crate) const REC_ALIGN: u64 = 16;

/// Rounds `n` up to a multiple of 16.
#[inline]
pub(crate) const fn align16(n: u64) -> u64 {
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
}

/// The header in front of each record's data: `len`, `kind` and `slot` are plain words the
/// producer writes before publishing `tail` (so the consumer reads them after its Acquire);
/// the fourth word is the `released` flag, an atomic (see [`ByteRing::released`]).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
struct RecordHeader {
    len: u32,
    kind: u32,
    slot: u32,
    released: u32,
}

/// A view of one byte ring: counters plus `capacity` data bytes at `data`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct ByteRing<'a> {
    hdr: &'a ByteRingHeader,
    data: *mut u8,
    cap: u64,
    /// Where the `released` flags live: `None` = the fourth word of each record header (shared
    /// memory); `Some` = a side table of one atomic per 16-byte position (heap storage, the only
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
            size: REC_ALIGN + align16(len),
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
    /// `data` must be valid for reads and writes of `cap` bytes for `'a`, 16-aligned, and every
    /// process touching it must follow the protocol above. `cap` must be a multiple of 16.
    pub(crate) unsafe fn new(hdr: &'a ByteRingHeader, data: *mut u8, cap: u64) -> Self {
        debug_assert!(cap % REC_ALIGN == 0 && cap >= 2 * REC_ALIGN);
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

    /// As [`new`](Self::new), with the `released` flags in a side table of `cap / 16` atomics.
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

    /// Capacity in bytes.
    pub(crate) fn capacity(&self) -> u64 {
        self.cap
    }

    /// The largest data length one record can carry: half the ring, less a header. Capping a
    /// record at half the ring guarantees it fits after waiting even when it needs a pad: if
    /// `off + size > cap` then `off > cap/2 >= size`, so `pad + size = cap - off + size < cap`.
    /// (A record of up to the whole ring could need more than the ring once padded, and its
    /// producer would wait forever.)
    pub(crate) fn max_record_len(&self) -> u64 {
        (self.cap / 2) / REC_ALIGN * REC_ALIGN - REC_ALIGN
    }

    fn record_ptr(&self, offset: u64) -> *mut RecordHeader {
        assert!(offset % REC_ALIGN == 0 && offset + REC_ALIGN <= self.cap);
        // SAFETY: offset is 16-aligned and inside the data area (asserted above).
        unsafe { self.data.add(offset as usize) as *mut RecordHeader }
    }

    /// Reads the plain words of a record header (published before `tail`, see the protocol).
    fn read_record(&self, offset: u64) -> RecordHeader {
        // SAFETY: in bounds and aligned (record_ptr); the producer wrote these words before its
        // Release store of `tail`, which the caller Acquired, and does not rewrite them until
        // the record is released and `head` passes it.
        unsafe { self.record_ptr(offset).read_volatile() }
    }

    /// Writes the plain words of a record header (producer only, before publishing `tail`).
    fn write_record(&self, offset: u64, len: u32, kind: u32, slot: u32) {
        let p = self.record_ptr(offset);
        // SAFETY: the producer owns the bytes between `tail` and `head + cap`, which include
        // this header; we write the three plain words (not the flag word, which is atomic).
        unsafe {
            std::ptr::addr_of_mut!((*p).len).write_volatile(len);
            std::ptr::addr_of_mut!((*p).kind).write_volatile(kind);
            std::ptr::addr_of_mut!((*p).slot).write_volatile(slot);
        }
    }

    /// The `released` flag of the record at `offset`.
    fn released(&self, offset: u64) -> &AtomicU32 {
        match self.flags {
            Some(f) => &f[(offset / REC_ALIGN) as usize],
            #[cfg(not(stateful_pool_loom))]
            None => {
                let p = self.record_ptr(offset);
                // SAFETY: the flag word is 4-byte aligned inside the record header, lives as
                // long as the mapping (`'a`), and is only ever accessed atomically.
                unsafe { AtomicU32::from_ptr(std::ptr::addr_of_mut!((*p).released)) }
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
        let size = REC_ALIGN + align16(len);
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
        let free = self.cap - (tail - head);
        if free < pad + size {
            return Ok(None);
        }
        Ok(Some(Reservation {
            pos: tail,
            pad,
            size,
        }))
    }

    /// Pointer to the data area of a reservation (16-aligned, `len` bytes writable).
    pub(crate) fn data_ptr(&self, r: &Reservation) -> *mut u8 {
        let off = r.record_offset(self.cap) + REC_ALIGN;
        // SAFETY: `off + len <= cap` by construction of the reservation.
        unsafe { self.data.add(off as usize) }
    }

    /// Publishes a reserved record with `len` data bytes (already written), of `kind`, answering
    /// task slot `slot`. Returns the record's offset (for the consumer's `release`).
    pub(crate) fn commit(&self, r: Reservation, len: u64, kind: u32, slot: u32) -> u64 {
        debug_assert!(REC_ALIGN + align16(len) <= r.size);
        if r.pad > 0 {
            let pad_off = r.pos % self.cap;
            self.write_record(pad_off, (r.pad - REC_ALIGN) as u32, KIND_PAD, u32::MAX);
            self.released(pad_off).store(1, Ordering::Relaxed);
        }
        let offset = r.record_offset(self.cap);
        self.write_record(offset, len as u32, kind, slot);
        self.released(offset).store(0, Ordering::Relaxed);
        // SYNC POINT: data and headers visible to a consumer that Acquire-loads `tail` (the
        // head advance) or the task slot's state (the reader, published after this).
        self.hdr
            .tail
            .store(r.pos + r.pad + REC_ALIGN + align16(len), Ordering::Release);
        offset
    }

    // ---- consumer side (the parent) ----

    /// The data bytes of the record at `offset` whose header says `len` bytes, checked to lie
    /// inside the ring. `None` if the numbers are out of range (a corrupt slot).
    pub(crate) fn data(&self, offset: u64, len: u64) -> Option<*const u8> {
        if offset % REC_ALIGN != 0 || offset.checked_add(REC_ALIGN + len)? > self.cap {
            return None;
        }
        // SAFETY: in range, checked above.
        Some(unsafe { self.data.add((offset + REC_ALIGN) as usize) as *const u8 })
    }

    /// Marks the record at `offset` released. The caller then calls [`advance`](Self::advance)
    /// under its lock. Never touch the record's bytes after this.
    pub(crate) fn release(&self, offset: u64) {
        // SYNC POINT: our reads of the record are done before the head advance that observes
        // this flag (Acquire in `advance`), and so before the producer reuses the bytes.
        self.released(offset).store(1, Ordering::Release);
    }

    /// Moves `head` over contiguous released records. Only one thread may run this at a time
    /// (the parent holds a per-ring lock). Returns whether `head` moved.
    pub(crate) fn advance(&self) -> bool {
        // SYNC POINT: Acquire pairs with the producer's Release store of `tail`.
        let tail = self.hdr.tail.load(Ordering::Acquire);
        let start = self.hdr.head.load(Ordering::Relaxed);
        let mut head = start;
        while head < tail {
            let off = head % self.cap;
            if self.released(off).load(Ordering::Acquire) == 0 {
                break;
            }
            head += REC_ALIGN + align16(self.read_record(off).len as u64);
        }
        if head != start {
            // SYNC POINT: pairs with the producer's Acquire load of `head` in `try_reserve`.
            self.hdr.head.store(head, Ordering::Release);
            true
        } else {
            false
        }
    }

    /// Bytes currently occupied (a snapshot).
    pub(crate) fn used(&self) -> u64 {
        self.hdr.tail.load(Ordering::SeqCst) - self.hdr.head.load(Ordering::SeqCst)
    }
}
