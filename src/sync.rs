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

/// A bounded wait on another party's progress: spins a little, then yields, and gives up after
/// about a second. Every loop that waits on something another process writes uses one, so a
/// process that died or wrote garbage can never make its peer spin forever. Under loom every
/// step yields and the budget is never spent (loom bounds the schedules itself).
#[derive(Debug, Default)]
pub(crate) struct Patience {
    steps: u32,
    #[cfg(not(stateful_pool_loom))]
    since: Option<std::time::Instant>,
}

/// How long a [`Patience`] lasts.
#[cfg(not(stateful_pool_loom))]
const PATIENCE: std::time::Duration = std::time::Duration::from_secs(1);

impl Patience {
    /// A fresh budget.
    pub(crate) fn new() -> Self {
        Patience::default()
    }

    /// Waits one step; `false` once the budget is spent.
    #[inline]
    pub(crate) fn step(&mut self) -> bool {
        self.steps = self.steps.saturating_add(1);
        #[cfg(stateful_pool_loom)]
        {
            loom::thread::yield_now();
            true
        }
        #[cfg(not(stateful_pool_loom))]
        {
            if self.steps < 64 {
                std::hint::spin_loop();
                return true;
            }
            std::thread::yield_now();
            if self.steps % 64 != 0 {
                return true;
            }
            let since = *self.since.get_or_insert_with(std::time::Instant::now);
            since.elapsed() < PATIENCE
        }
    }
}
