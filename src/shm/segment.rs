//! A shared-memory segment: an anonymous sealed memfd mapped `MAP_SHARED` with memmap2.
//!
//! The parent creates it and keeps its fd (it hands it to every worker it launches); a worker
//! receives the fd across `exec`, maps the same pages and closes the fd at once, so no program
//! the worker's own code starts inherits access to the pool's memory.
//! Everything inside is addressed by offset from the base ([`Segment::get`]), never by pointer,
//! because each process maps the segment at its own address.

use memmap2::{MmapOptions, MmapRaw};
use std::fs::File;
use std::io;
use std::os::fd::{AsFd, BorrowedFd, OwnedFd};

/// Types that may be placed in shared memory and viewed through `&T` by any process.
///
/// # Safety
/// Implementors must be `#[repr(C)]`, contain no pointers or references (offsets only), be valid
/// for every bit pattern including all zeros, and mutate only through atomics (so a shared `&T`
/// across processes is sound).
pub(crate) unsafe trait ShmSafe {}

/// A mapped memfd segment.
#[derive(Debug)]
pub(crate) struct Segment {
    map: MmapRaw,
    /// The memfd: the parent's segment keeps it; a worker's has none (closed once mapped).
    fd: Option<OwnedFd>,
}

impl Segment {
    /// Creates a zero-filled segment of `len` bytes (sealed against resizing), its first
    /// `reserve` bytes' memory reserved up front (the rest with [`reserve`](Self::reserve)).
    pub(crate) fn create(len: usize, reserve: usize) -> io::Result<Segment> {
        let fd = crate::sys::memfd_sealed(len as u64, reserve as u64)?;
        let map = MmapOptions::new().len(len).map_raw(&fd)?;
        Ok(Segment { map, fd: Some(fd) })
    }

    /// Maps an existing segment whose fd this process received (the worker side), then closes
    /// the fd: the mapping keeps the memory alive, and a worker never needs the fd again.
    pub(crate) fn open(fd: OwnedFd) -> io::Result<Segment> {
        let file = File::from(fd);
        let len = file.metadata()?.len() as usize;
        if len == 0 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "empty segment"));
        }
        let map = MmapOptions::new().len(len).map_raw(&file)?;
        drop(file);
        Ok(Segment { map, fd: None })
    }

    /// Reserves the memory of bytes `off..off + len` (clamped to the segment), so that
    /// touching them can never fail later. Parent only (a worker's segment has no fd).
    pub(crate) fn reserve(&self, off: usize, len: usize) -> io::Result<()> {
        let Some(fd) = &self.fd else {
            return Err(io::Error::other("a worker's segment cannot reserve memory"));
        };
        let end = off.saturating_add(len).min(self.len());
        if end <= off {
            return Ok(());
        }
        crate::sys::reserve_range(fd.as_fd(), off as u64, (end - off) as u64)
    }

    /// Base address of the mapping in this process.
    #[inline]
    pub(crate) fn base(&self) -> *mut u8 {
        self.map.as_mut_ptr()
    }

    /// Length in bytes.
    #[inline]
    pub(crate) fn len(&self) -> usize {
        self.map.len()
    }

    /// The memfd of a segment this process created (the parent's, which launches workers
    /// with it). Panics on a worker's segment, whose fd was closed once mapped: a bug.
    pub(crate) fn fd(&self) -> BorrowedFd<'_> {
        self.fd
            .as_ref()
            .expect("only the parent's segment keeps its memfd")
            .as_fd()
    }

    /// A shared view of the `T` at `offset`. Panics if it is out of bounds or misaligned — a
    /// layout bug, never a data-dependent condition.
    pub(crate) fn get<T: ShmSafe>(&self, offset: usize) -> &T {
        assert!(
            offset
                .checked_add(size_of::<T>())
                .is_some_and(|end| end <= self.len()),
            "shared-memory access out of bounds"
        );
        assert!(
            offset % align_of::<T>() == 0,
            "misaligned shared-memory access"
        );
        // SAFETY: in bounds and aligned (checked above); `T: ShmSafe` is valid for any bytes and
        // is mutated only through atomics, so a shared reference is sound while mapped, and the
        // mapping lives as long as `self`.
        unsafe { &*(self.base().add(offset) as *const T) }
    }

    /// A shared view of `n` consecutive `T`s at `offset` (same checks as [`get`](Self::get)).
    pub(crate) fn slice<T: ShmSafe>(&self, offset: usize, n: usize) -> &[T] {
        assert!(
            n.checked_mul(size_of::<T>())
                .and_then(|b| b.checked_add(offset))
                .is_some_and(|end| end <= self.len()),
            "shared-memory access out of bounds"
        );
        assert!(
            offset % align_of::<T>() == 0,
            "misaligned shared-memory access"
        );
        // SAFETY: as in `get`, for each of the `n` elements.
        unsafe { std::slice::from_raw_parts(self.base().add(offset) as *const T, n) }
    }

    /// Raw pointer to `len` bytes at `offset`, bounds-checked. Who may read or write them when
    /// is decided by the protocol that hands the region out.
    #[inline]
    pub(crate) fn bytes_ptr(&self, offset: usize, len: usize) -> *mut u8 {
        assert!(
            offset.checked_add(len).is_some_and(|end| end <= self.len()),
            "shared-memory access out of bounds"
        );
        // SAFETY: in bounds, checked above.
        unsafe { self.base().add(offset) }
    }
}
