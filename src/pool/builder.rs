//! [`PoolBuilder`]: sizes, limits and wait strategy of a pool.

use super::Pool;
use crate::error::BuildError;
use crate::worker::Worker;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::time::Duration;

/// How waiting sides (idle workers, callers waiting for a result) wait.
///
/// Spinning answers fastest when the other side is about to deliver, but on a machine where
/// processes outnumber cores a spinner steals the core its peer needs. So the spin is always
/// bounded (yielding in its second half), then the waiter parks on a futex and burns no CPU.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin for up to `spin`, then park. The default is 20 µs.
    SpinThenPark {
        /// Spin budget before parking.
        spin: Duration,
    },
    /// Park at once (lowest CPU use, a futex wake on every hand-off).
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::SpinThenPark {
            spin: Duration::from_micros(20),
        }
    }
}

impl WaitStrategy {
    pub(crate) fn spin(&self) -> Duration {
        match *self {
            WaitStrategy::SpinThenPark { spin } => spin,
            WaitStrategy::Park => Duration::ZERO,
        }
    }
}

/// Settings of a pool, as given to the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) queue_size: usize,
    pub(crate) slot_bytes: usize,
    pub(crate) max_workers: usize,
    pub(crate) result_ring_bytes: usize,
    pub(crate) arena_bytes: usize,
    pub(crate) max_task_bytes: Option<usize>,
    pub(crate) spawn_area_bytes: usize,
    pub(crate) worker_wait: WaitStrategy,
    pub(crate) caller_wait: WaitStrategy,
    pub(crate) spawn_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) program: Option<PathBuf>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_size: 256,
            slot_bytes: 1024,
            max_workers: 16,
            result_ring_bytes: 4 << 20,
            arena_bytes: 64 << 20,
            max_task_bytes: None,
            spawn_area_bytes: 64 << 10,
            worker_wait: WaitStrategy::default(),
            caller_wait: WaitStrategy::default(),
            spawn_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
            program: None,
        }
    }
}

/// Builds a [`Pool`]. Every setting has a default; `build` validates them.
///
/// ```no_run
/// # use stateful_pool::{Pool, Worker, WaitStrategy};
/// # fn f<W: Worker>() -> Result<(), stateful_pool::BuildError> {
/// let pool = Pool::<W>::builder()
///     .queue_size(1024)                 // tasks in flight at once
///     .max_workers(8)
///     .max_task_bytes(32 << 20)         // larger tasks are rejected with a clear error
///     .wait_strategy(WaitStrategy::Park)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PoolBuilder<W: Worker> {
    cfg: Config,
    _w: PhantomData<fn() -> W>,
}

impl<W: Worker> Default for PoolBuilder<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Worker> PoolBuilder<W> {
    /// A builder with the defaults.
    pub fn new() -> Self {
        PoolBuilder {
            cfg: Config::default(),
            _w: PhantomData,
        }
    }

    /// Tasks that can be in flight (submitted and not yet collected) at once; a submit beyond
    /// it waits (`submit`) or fails with `QueueFull` (`try_submit`). Default 256.
    pub fn queue_size(mut self, n: usize) -> Self {
        self.cfg.queue_size = n;
        self
    }

    /// Bytes of each task slot's inline area (rounded up to 64). Task archives up to this size
    /// are written into the slot; larger ones go to the task arena. Default 1 KiB.
    pub fn slot_bytes(mut self, n: usize) -> Self {
        self.cfg.slot_bytes = n;
        self
    }

    /// Most workers alive at once (each has a seat with its own completion ring). Default 16.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.cfg.max_workers = n;
        self
    }

    /// Bytes of each worker's completion ring; a result archive may be up to half of this minus
    /// 16 bytes (larger ones fail with `TaskError::ResultTooLarge`). Results that fit a task
    /// slot travel inline in the slot instead. Default 4 MiB, committed only as it is used.
    pub fn result_ring_bytes(mut self, n: usize) -> Self {
        self.cfg.result_ring_bytes = n;
        self
    }

    /// Bytes of the task arena shared by large tasks and loans. Default 64 MiB, committed
    /// only as it is used.
    pub fn task_arena_bytes(mut self, n: usize) -> Self {
        self.cfg.arena_bytes = n;
        self
    }

    /// Largest task archive or loan accepted; larger ones fail with
    /// [`SubmitError::PayloadTooLarge`](crate::SubmitError::PayloadTooLarge). Default and
    /// upper bound: the task arena size.
    pub fn max_task_bytes(mut self, n: usize) -> Self {
        self.cfg.max_task_bytes = Some(n);
        self
    }

    /// Bytes reserved per worker for its spawn arguments and spawn output. Default 64 KiB.
    pub fn spawn_area_bytes(mut self, n: usize) -> Self {
        self.cfg.spawn_area_bytes = n;
        self
    }

    /// How idle workers wait for tasks and callers wait for results.
    pub fn wait_strategy(mut self, w: WaitStrategy) -> Self {
        self.cfg.worker_wait = w;
        self.cfg.caller_wait = w;
        self
    }

    /// How idle workers wait for tasks (overrides [`wait_strategy`](Self::wait_strategy)).
    pub fn worker_wait(mut self, w: WaitStrategy) -> Self {
        self.cfg.worker_wait = w;
        self
    }

    /// How callers wait for results (overrides [`wait_strategy`](Self::wait_strategy)).
    pub fn caller_wait(mut self, w: WaitStrategy) -> Self {
        self.cfg.caller_wait = w;
        self
    }

    /// How long a worker's start-up and spawn step may take. Default 120 s.
    pub fn spawn_timeout(mut self, d: Duration) -> Self {
        self.cfg.spawn_timeout = d;
        self
    }

    /// How long shutdown waits for workers to finish the queue and exit before killing them.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// Runs workers from this program instead of the current executable. It must be the same
    /// binary (a copy or hard link of it), since workers enter through the current binary's
    /// code; a different binary is refused at start-up with a clear error.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.program = Some(path.into());
        self
    }

    /// Creates the shared-memory segment and the pool's threads. No worker runs yet: call
    /// [`Pool::spawn`].
    pub fn build(self) -> Result<Pool<W>, BuildError> {
        Pool::from_config(self.cfg)
    }
}
