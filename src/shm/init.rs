//! Creating a pool's segment: the memfd, its reservation, and every region's initial state,
//! written before anyone else can map it (nobody has the fd yet), with the header's version
//! stored last.

use super::layout::{Layout, SegmentHeader, VERSION, WorkerCtl};
use super::segment::Segment;
use crate::ring::mpmc::MpmcCell;
use std::io;
use std::sync::atomic::Ordering;

/// What the header records besides the layout.
#[derive(Debug, Clone, Copy)]
pub(crate) struct HeaderInit {
    /// Hash of the worker's message types (`worker::boot::protocol_hash`).
    pub(crate) protocol_hash: u64,
    /// How long idle workers spin before parking, in nanoseconds.
    pub(crate) worker_spin_ns: u64,
    /// `FLAG_*` bits.
    pub(crate) flags: u32,
}

/// Creates and initialises a segment for `layout`. With `reserve`, the memory of every region
/// before the completion rings (header, queue, slots, controls, spawn areas) is reserved now;
/// each seat's ring by its worker as it starts, and the task arena as it is
/// first allocated from (`Shared::ring_reserve`, then the worker; `Shared::reserve_arena`).
pub(crate) fn create(layout: &Layout, init: HeaderInit, reserve: bool) -> io::Result<Segment> {
    let seg = Segment::create(layout.total, if reserve { layout.result_rings } else { 0 })?;
    let hdr_ptr = seg.base() as *mut SegmentHeader;
    // SAFETY: the mapping is fresh, private to us, page-aligned and at least a header long
    // (the layout starts with it); no reference into it exists yet.
    unsafe {
        hdr_ptr.write(SegmentHeader::new(
            layout,
            init.protocol_hash,
            init.worker_spin_ns,
            init.flags,
        ))
    };
    for i in 0..layout.ring_cap {
        let p = seg.bytes_ptr(
            layout.task_cells + i * size_of::<MpmcCell>(),
            size_of::<MpmcCell>(),
        ) as *mut MpmcCell;
        // SAFETY: in bounds (bytes_ptr checked), 16-aligned (the region is 64-aligned, cells
        // are 16 bytes), not yet shared.
        unsafe { p.write(MpmcCell::new(i as u64)) };
    }
    for i in 0..layout.params.max_workers as usize {
        let off = layout.ctl_off(i as u32);
        let p = seg.bytes_ptr(off, size_of::<WorkerCtl>()) as *mut WorkerCtl;
        // SAFETY: as above, for the worker control blocks.
        unsafe { p.write(WorkerCtl::new()) };
    }
    // Slot headers and rings are valid all-zero. Publish: version last.
    seg.get::<SegmentHeader>(0)
        .version
        .store(VERSION, Ordering::Release);
    Ok(seg)
}
