//! Errors, one type per verb: building a pool, spawning a worker, submitting a task, and a
//! task's outcome.

use std::time::Duration;

/// Building a [`Pool`](crate::Pool) failed.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A builder setting is out of range.
    #[error("invalid pool configuration: {0}")]
    InvalidConfig(String),
    /// The shared-memory segment could not be created or mapped.
    #[error("cannot create the shared-memory segment: {0}")]
    Shm(#[source] std::io::Error),
    /// This process was started as a worker: `stateful_pool::init()` (or
    /// `stateful_pool::worker_hook!()`) must run before anything builds a pool.
    #[error(
        "this process is a stateful-pool worker, but its program built a Pool instead of \
         serving: call stateful_pool::init() first thing in main (or use worker_hook!())"
    )]
    InsideWorker,
    /// A thread of the pool could not be started.
    #[error("cannot start a pool thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a worker could not be spawned.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    /// The worker's spawn step returned an error.
    #[error("worker {worker}: spawn step failed: {message}")]
    Failed {
        /// Seat index of the worker.
        worker: usize,
        /// The error's message.
        message: String,
    },
    /// The worker's spawn step panicked.
    #[error("worker {worker}: spawn step panicked: {message}")]
    Panicked {
        /// Seat index of the worker.
        worker: usize,
        /// The panic message.
        message: String,
    },
    /// The worker process could not be started.
    #[error("worker {worker}: cannot start the worker process: {source}")]
    Launch {
        /// Seat index of the worker.
        worker: usize,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// The worker process exited before its spawn step finished.
    #[error(
        "worker {worker} (pid {pid}) exited during start-up ({status}); if it never started, \
         check that main() calls stateful_pool::init() first"
    )]
    Exited {
        /// Seat index of the worker.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How it ended.
        status: String,
    },
    /// The spawn step did not finish within the spawn timeout.
    #[error("worker {worker}: spawn step did not finish within {after:?}")]
    Timeout {
        /// Seat index of the worker.
        worker: usize,
        /// The timeout.
        after: Duration,
    },
    /// Every worker seat (`max_workers`) is taken.
    #[error("all {max} worker seats are in use (raise PoolBuilder::max_workers)")]
    NoCapacity {
        /// The configured maximum.
        max: usize,
    },
    /// The spawn arguments' archive does not fit the spawn area.
    #[error("spawn arguments take {len} bytes, more than the spawn area of {max} bytes")]
    ArgsTooLarge {
        /// Archive length.
        len: usize,
        /// Spawn area size (PoolBuilder::spawn_area_bytes).
        max: usize,
    },
    /// The spawn output could not be validated or decoded.
    #[error("worker {worker}: bad spawn output: {message}")]
    BadOutput {
        /// Seat index of the worker.
        worker: usize,
        /// What was wrong.
        message: String,
    },
    /// An argument or output failed to serialise.
    #[error("cannot serialise spawn arguments: {0}")]
    Encode(String),
    /// The pool is shutting down.
    #[error("the pool is shut down")]
    Shutdown,
}

/// Why a task could not be submitted. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SubmitError {
    /// Every task slot is in use (`try_submit` only; `submit` waits).
    #[error("the task queue is full")]
    QueueFull,
    /// Waited for a free slot past the given timeout.
    #[error("timed out waiting for room in the task queue")]
    Timeout,
    /// The task's archive (or loaned payload) is larger than the configured maximum.
    #[error("task of {len} bytes exceeds the maximum of {max} bytes")]
    PayloadTooLarge {
        /// Length of the archive or payload.
        len: usize,
        /// The configured maximum (PoolBuilder::max_task_bytes).
        max: usize,
    },
    /// The task's `Serialize` impl failed.
    #[error("cannot serialise the task: {0}")]
    Encode(String),
    /// The pool is shutting down.
    #[error("the pool is shut down")]
    Shutdown,
    /// The loan belongs to another pool.
    #[error("the loan was made by another pool")]
    ForeignLoan,
}

/// A task did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TaskError {
    /// The task could not be submitted (from `execute`).
    #[error(transparent)]
    Submit(#[from] SubmitError),
    /// The worker's execute step returned an error.
    #[error("worker {worker}: task failed: {message}")]
    Failed {
        /// Seat index of the worker that ran it.
        worker: usize,
        /// The error's message.
        message: String,
    },
    /// The worker's execute step panicked (the worker keeps serving).
    #[error("worker {worker}: task panicked: {message}")]
    Panicked {
        /// Seat index of the worker that ran it.
        worker: usize,
        /// The panic message.
        message: String,
    },
    /// The task's result archive is larger than the worker's completion ring.
    #[error("worker {worker}: result of {len} bytes exceeds the maximum of {max} bytes")]
    ResultTooLarge {
        /// Seat index of the worker.
        worker: usize,
        /// Length of the archive.
        len: usize,
        /// The maximum (half of PoolBuilder::result_ring_bytes, minus a 16-byte header).
        max: usize,
    },
    /// The worker could not read the task (an invalid archive, e.g. from a mismatched sender).
    #[error("worker {worker}: invalid task: {message}")]
    BadTask {
        /// Seat index of the worker.
        worker: usize,
        /// What validation said.
        message: String,
    },
    /// The result bytes did not validate as the expected type.
    #[error("invalid result from worker {worker}: {message}")]
    BadResult {
        /// Seat index of the worker.
        worker: usize,
        /// What validation said.
        message: String,
    },
    /// The task was cancelled before a worker started it.
    #[error("the task was cancelled")]
    Cancelled,
}
