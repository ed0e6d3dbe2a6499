//! The atomics facade: `std` atomics normally, loom's under `--cfg stateful_pool_loom`.
//!
//! Every lock-free structure in this crate takes its atomics from here, so loom model tests
//! (`RUSTFLAGS="--cfg stateful_pool_loom" cargo test --lib loom`) and Miri run the very same ring code over
//! heap memory that the pool runs over shared memory.

#[cfg(stateful_pool_loom)]
pub(crate) use loom::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};
#[cfg(not(stateful_pool_loom))]
pub(crate) use std::sync::atomic::{AtomicU32, AtomicU64, Ordering, fence};

/// A hint inside a spin loop; under loom it yields so the model can make progress.
#[inline]
pub(crate) fn spin_hint() {
    #[cfg(stateful_pool_loom)]
    loom::thread::yield_now();
    #[cfg(not(stateful_pool_loom))]
    std::hint::spin_loop();
}

/// Pads and aligns a value to 64 bytes (one cache line) so producer and consumer counters never
/// share a line. `#[repr(C, align(64))]` keeps the layout fixed for shared memory.
#[repr(C, align(64))]
#[derive(Debug, Default)]
pub(crate) struct CachePadded<T>(pub(crate) T);

impl<T> std::ops::Deref for CachePadded<T> {
    type Target = T;
    fn deref(&self) -> &T {
        &self.0
    }
}
