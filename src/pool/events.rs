//! What the pool tells its user about faults: [`PoolEvent`]s (through
//! [`PoolBuilder::on_event`](crate::PoolBuilder::on_event)), counters ([`PoolStats`]), and each
//! worker seat's state ([`WorkerInfo`]). Also [`TaskOptions`], the per-task fault settings.

use crate::error::ExitCause;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Something that happened to the pool's workers, reported as it happens.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum PoolEvent {
    /// A worker process ended while it should have been serving.
    WorkerDied {
        /// Seat index.
        worker: usize,
        /// Process id.
        pid: u32,
        /// How it ended.
        cause: ExitCause,
        /// Why, when the pool knows better than the exit status: `"timeout"` (the pool killed
        /// it for a task past its timeout), `"poisoned"`, `"panic"` (it retired after a panic),
        /// or `"crash"`.
        reason: &'static str,
        /// Tasks it held that failed with [`TaskError::WorkerDied`](crate::TaskError) (or
        /// `Timeout`).
        tasks_failed: usize,
        /// Tasks it held that were queued again under their retry policy.
        tasks_retried: usize,
    },
    /// A dead worker's replacement finished its spawn step and serves.
    WorkerRestarted {
        /// Seat index.
        worker: usize,
        /// The new process id.
        pid: u32,
        /// Lives of this seat so far (1 = the first start).
        generation: u32,
    },
    /// A restart attempt failed (its spawn step failed, or the process could not start).
    RestartFailed {
        /// Seat index.
        worker: usize,
        /// What went wrong.
        message: String,
    },
    /// The seat ran out of restarts: it is marked failed and the pool serves without it.
    WorkerFailed {
        /// Seat index.
        worker: usize,
        /// Restarts spent within the window.
        restarts: u32,
    },
    /// No worker is left alive: queued and new tasks fail with `NoWorkers` until a worker is
    /// spawned again.
    NoWorkersLeft,
}

/// Counters of the pool's fault handling since it was built.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes that ended while they should have been serving.
    pub worker_deaths: u64,
    /// Replacements that finished their spawn step.
    pub restarts: u64,
    /// Seats marked failed after running out of restarts.
    pub failed_workers: u64,
    /// Tasks that failed because their worker died (`WorkerDied`).
    pub tasks_died: u64,
    /// Tasks that failed their timeout (`Timeout`).
    pub tasks_timed_out: u64,
    /// Re-runs of tasks whose worker died, under their retry policy.
    pub tasks_retried: u64,
}

#[derive(Debug, Default)]
pub(crate) struct StatCounters {
    pub(crate) worker_deaths: AtomicU64,
    pub(crate) restarts: AtomicU64,
    pub(crate) failed_workers: AtomicU64,
    pub(crate) tasks_died: AtomicU64,
    pub(crate) tasks_timed_out: AtomicU64,
    pub(crate) tasks_retried: AtomicU64,
}

impl StatCounters {
    pub(crate) fn add(c: &AtomicU64, n: u64) {
        c.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn snapshot(&self) -> PoolStats {
        let g = |c: &AtomicU64| c.load(Ordering::Relaxed);
        PoolStats {
            worker_deaths: g(&self.worker_deaths),
            restarts: g(&self.restarts),
            failed_workers: g(&self.failed_workers),
            tasks_died: g(&self.tasks_died),
            tasks_timed_out: g(&self.tasks_timed_out),
            tasks_retried: g(&self.tasks_retried),
        }
    }
}

/// The state of a worker seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Never used, or freed after a failed spawn.
    Empty,
    /// Its process is starting (first start or a restart).
    Starting,
    /// Serving tasks.
    Ready,
    /// Dead; waiting out its back-off before the restart.
    Restarting,
    /// Out of restarts; the pool serves without it.
    Failed,
    /// Stopped by shutdown.
    Stopped,
}

/// One worker seat, as [`Pool::workers`](crate::Pool::workers) reports it.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub struct WorkerInfo {
    /// Seat index.
    pub index: usize,
    /// Its state.
    pub state: WorkerState,
    /// Process id of its current (or last) process, 0 if none.
    pub pid: u32,
    /// Lives so far (1 = the first start).
    pub generation: u32,
    /// Restarts so far (all time).
    pub restarts: u64,
    /// Tasks its current process completed.
    pub tasks_done: u64,
}

/// Fault settings of one task, overriding the pool's defaults
/// ([`PoolBuilder::task_timeout`](crate::PoolBuilder::task_timeout),
/// [`PoolBuilder::task_retries`](crate::PoolBuilder::task_retries)).
///
/// ```
/// # use std::time::Duration;
/// let opts = stateful_pool::TaskOptions::new()
///     .timeout(Duration::from_secs(5)) // fail (and restart the worker) past 5 s of running
///     .retries(2);                     // idempotent: re-run up to twice if its worker dies
/// ```
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TaskOptions {
    pub(crate) timeout: Option<Duration>,
    pub(crate) retries: Option<u32>,
    /// The task is a batch (set by the batch APIs, not by users).
    pub(crate) batch: bool,
}

impl TaskOptions {
    /// The pool's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limit on the task's execution time, counted from when a worker starts it.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Times the task is re-run if its worker dies while running it (only for idempotent
    /// work: the task may have partly or fully run before the death).
    pub fn retries(mut self, n: u32) -> Self {
        self.retries = Some(n);
        self
    }
}

/// Per-worker settings of a spawn ([`Pool::spawn_with`](crate::Pool::spawn_with)): the GPUs
/// the worker owns and extra environment variables. Restarts of the worker reuse them.
///
/// ```
/// let opts = stateful_pool::SpawnOptions::new()
///     .gpus([0, 1])                  // this worker's GPUs (physical ordinals)
///     .visible_devices_only(true)    // and CUDA_VISIBLE_DEVICES=0,1 in its process
///     .env("OMP_NUM_THREADS", "4");
/// assert_eq!(opts.gpu_ids(), &[0, 1]);
/// ```
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SpawnOptions {
    pub(crate) gpus: Vec<u32>,
    pub(crate) visible_only: bool,
    pub(crate) env: Vec<(String, String)>,
}

impl SpawnOptions {
    /// No GPUs, no extra environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The GPUs this worker owns, as the machine numbers them. The worker sees them as
    /// [`WorkerContext::gpu_ids`](crate::WorkerContext::gpu_ids); with the `cuda` feature it
    /// also gets a CUDA context on each, created in its own process before its spawn step
    /// ([`WorkerContext::cuda`](crate::WorkerContext)), and its payload arena is pinned.
    pub fn gpus(mut self, ids: impl IntoIterator<Item = u32>) -> Self {
        self.gpus = ids.into_iter().collect();
        self
    }

    /// Restricts the worker process's view to its GPUs (`CUDA_VISIBLE_DEVICES` set to them, in
    /// the order given). Inside the process, CUDA then numbers them `0..n`; the contexts the
    /// runtime creates follow that mapping, and `gpu_ids()` still reports the machine's
    /// numbers, so context `i` is on GPU `gpu_ids()[i]` either way.
    pub fn visible_devices_only(mut self, yes: bool) -> Self {
        self.visible_only = yes;
        self
    }

    /// An environment variable for this worker's process (after the pool's
    /// [`worker_env`](crate::PoolBuilder::worker_env)).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// The GPUs set with [`gpus`](Self::gpus).
    pub fn gpu_ids(&self) -> &[u32] {
        &self.gpus
    }

    /// The environment the worker process gets for these options.
    pub(crate) fn process_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !self.gpus.is_empty() {
            let list = self
                .gpus
                .iter()
                .map(|g| g.to_string())
                .collect::<Vec<_>>()
                .join(",");
            let tag = if self.visible_only { "visible:" } else { "" };
            env.push((
                crate::worker::boot::GPUS_ENV.to_string(),
                format!("{tag}{list}"),
            ));
            if self.visible_only {
                env.push(("CUDA_VISIBLE_DEVICES".to_string(), list));
            }
        }
        env
    }
}
