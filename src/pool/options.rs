//! Options of one task ([`TaskOptions`]) and of one worker's spawn ([`SpawnOptions`]).

use std::time::{Duration, Instant};

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
    pub(crate) deadline: Option<Instant>,
    /// The task is a batch (set by the batch APIs, not by users).
    pub(crate) batch: bool,
    /// The task is for the worker in this seat only (a broadcast; set by `Pool::broadcast`).
    pub(crate) target: Option<u32>,
}

impl TaskOptions {
    /// The pool's defaults.
    pub fn new() -> Self {
        Self::default()
    }

    /// Limit on the task's execution time, counted from when a worker starts it (a zero
    /// limit is applied as 1 ns: the task times out as it starts).
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

    /// The latest time a worker may *start* the task: past it, the task is answered
    /// [`TaskError::Timeout`](crate::TaskError::Timeout) without running (a caller who has
    /// given up does not cost a worker, or a seat in a batch). The execution
    /// [`timeout`](Self::timeout) still applies once it runs.
    ///
    /// The answer comes at the deadline: a caller waiting on the task (`execute`, `wait`,
    /// `wait_timeout`, `wait_ref`, `.await`; `try_wait` and `is_finished` from then on) is
    /// answered `Timeout` there and then if no worker has claimed the task, with `worker`
    /// [`NO_WORKER`](crate::NO_WORKER) (its slot is reclaimed once a worker pops and skips
    /// it). A worker that claimed the task before its deadline runs it (a batching worker
    /// that holds it for a batch still answers it `Timeout` itself if the deadline passes
    /// before that batch starts); one that claims it later answers it `Timeout` itself. A
    /// future is woken for the deadline by the pool's reactor, within a millisecond or so.
    pub fn deadline(mut self, at: Instant) -> Self {
        self.deadline = Some(at);
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
    pub(crate) cpus: Vec<usize>,
    pub(crate) thread_env: bool,
}

/// The environment variables that size common thread pools (OpenMP, MKL, OpenBLAS, BLIS,
/// rayon, numexpr, Apple Accelerate/vecLib, tokio), set by
/// [`SpawnOptions::thread_env_from_cpus`].
pub const THREAD_ENV_VARS: [&str; 8] = [
    "OMP_NUM_THREADS",
    "MKL_NUM_THREADS",
    "OPENBLAS_NUM_THREADS",
    "BLIS_NUM_THREADS",
    "RAYON_NUM_THREADS",
    "NUMEXPR_NUM_THREADS",
    "VECLIB_MAXIMUM_THREADS",
    "TOKIO_WORKER_THREADS",
];

impl SpawnOptions {
    /// No GPUs, no extra environment.
    pub fn new() -> Self {
        Self::default()
    }

    /// The GPUs this worker owns, as the machine numbers them. The worker sees them as
    /// [`WorkerContext::gpu_ids`](crate::WorkerContext::gpu_ids); with the `cuda` feature it
    /// also gets a CUDA context on each, created in its own process before its spawn step
    /// ([`WorkerContext::cuda`](crate::WorkerContext)), and its payload arena is pinned; a GPU
    /// that does not exist then fails the spawn with a clear error. Without the feature the
    /// ids are only labels for the worker's own GPU code (nothing checks them, nothing is
    /// pinned).
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
    /// [`worker_env`](crate::PoolBuilder::worker_env)). A name that is empty or holds `=` or
    /// a NUL, or a value with a NUL, fails the spawn with
    /// [`SpawnError::Launch`](crate::SpawnError::Launch) (`InvalidInput`).
    pub fn env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.env.push((key.into(), value.into()));
        self
    }

    /// Pins the worker process to these CPUs (the seed's `[[0, 1], [2], None]`: one set per
    /// worker). The worker process has the set from its birth, before its program starts, so
    /// every thread it ever starts inherits it; restarts keep it. Each CPU is checked at
    /// spawn against the CPUs this process may use: one that is not allowed fails the spawn
    /// with [`SpawnError::CpuNotAllowed`](crate::SpawnError::CpuNotAllowed) naming it. An
    /// empty set means no pinning.
    pub fn cpus(mut self, cpus: impl IntoIterator<Item = usize>) -> Self {
        self.cpus = cpus.into_iter().collect();
        self.cpus.sort_unstable();
        self.cpus.dedup();
        self
    }

    /// Also sets the usual thread-count variables ([`THREAD_ENV_VARS`]: `OMP_NUM_THREADS`,
    /// `MKL_NUM_THREADS`, …) in the worker's environment to the size of its CPU set, so the
    /// libraries it loads do not start one thread per machine core.
    pub fn thread_env_from_cpus(mut self, yes: bool) -> Self {
        self.thread_env = yes;
        self
    }

    /// The CPUs set with [`cpus`](Self::cpus), sorted.
    pub fn cpu_ids(&self) -> &[usize] {
        &self.cpus
    }

    /// Checks the CPU set against the CPUs this process may run on.
    pub(crate) fn check_cpus(&self) -> Result<(), crate::SpawnError> {
        if self.cpus.is_empty() {
            return Ok(());
        }
        let allowed = crate::sys::allowed_cpus();
        match self.cpus.iter().find(|c| !allowed.contains(c)) {
            Some(&cpu) => Err(crate::SpawnError::CpuNotAllowed { cpu, allowed }),
            None => Ok(()),
        }
    }

    /// The GPUs set with [`gpus`](Self::gpus).
    pub fn gpu_ids(&self) -> &[u32] {
        &self.gpus
    }

    /// The environment the worker process gets for these options.
    pub(crate) fn process_env(&self) -> Vec<(String, String)> {
        let mut env = self.env.clone();
        if !self.cpus.is_empty() {
            let list = self
                .cpus
                .iter()
                .map(|c| c.to_string())
                .collect::<Vec<_>>()
                .join(",");
            env.push((crate::worker::boot::CPUS_ENV.to_string(), list));
            if self.thread_env {
                for k in THREAD_ENV_VARS {
                    env.push((k.to_string(), self.cpus.len().to_string()));
                }
            }
        }
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
