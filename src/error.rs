//! Errors, one type per verb: building a pool, spawning a worker, submitting a task, and a
//! task's outcome.

use crate::pool::handle::Loan;
use std::time::Duration;

/// Building a [`Pool`](crate::Pool) failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
    /// The machine does not have the memory for the segment: the whole segment is compared
    /// with the memory available, and its fixed regions (queue, slots, control blocks) are
    /// reserved at creation, so a shortage shows up here rather than as a crash later.
    #[error(
        "cannot reserve {bytes} bytes of shared memory ({}); shrink the pool's queue_size, \
         task_arena_bytes or result_ring_bytes, or free memory",
        match available {
            Some(a) => format!("{a} bytes available"),
            None => "the reservation was refused".to_string(),
        }
    )]
    NoSpace {
        /// Size of the segment.
        bytes: u64,
        /// The memory the machine had available, in bytes, when that was known to be too
        /// little; `None` when the reservation itself was refused (`ENOSPC`, `ENOMEM`).
        available: Option<u64>,
    },
    /// A thread of the pool could not be started.
    #[error("cannot start a pool thread: {0}")]
    Thread(#[source] std::io::Error),
}

/// Why a worker could not be spawned.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
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
        "worker {worker} (pid {pid}) exited during start-up ({}); if it never started, \
         check that main() calls stateful_pool::init() (sp_init from C) first",
        cause.describe()
    )]
    Exited {
        /// Seat index of the worker.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How it ended (the message explains the library's own exit codes, such as 121: the
        /// worker program is a different binary).
        cause: ExitCause,
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
    /// The spawn step's output archive is larger than the spawn area
    /// ([`spawn_area_bytes`](crate::PoolBuilder::spawn_area_bytes)): the worker ran its spawn
    /// step, could not report, and exited; its state is dropped with the process.
    #[error(
        "worker {worker}: spawn output takes {len} bytes, more than the spawn area of {max} \
         bytes (raise PoolBuilder::spawn_area_bytes)"
    )]
    OutputTooLarge {
        /// Seat index of the worker.
        worker: usize,
        /// The output archive's length (more than `max`).
        len: usize,
        /// Spawn area size (PoolBuilder::spawn_area_bytes, rounded up to 64).
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
    /// Memory the worker needs could not be reserved (with
    /// [`reserve_memory`](crate::PoolBuilder::reserve_memory)): its seat's completion ring,
    /// which the worker reserves while its spawn step runs until one of the seat's workers has
    /// reported ready, or, for a worker given GPUs, the whole task arena (it pins it), reserved
    /// before the process starts. A shortage is this error, never a crash later. For the ring,
    /// the spawn step had already run and its state is dropped with the process.
    #[error("cannot reserve {bytes} bytes of shared memory for the worker's results: {source}")]
    NoSpace {
        /// Bytes asked for.
        bytes: u64,
        /// The OS error.
        #[source]
        source: std::io::Error,
    },
    /// A CPU of the worker's [CPU set](crate::SpawnOptions::cpus) is not one this process may
    /// run on.
    #[error("CPU {cpu} is not available to this process (it may use CPUs {allowed:?})")]
    CpuNotAllowed {
        /// The CPU asked for.
        cpu: usize,
        /// The CPUs this process may use.
        allowed: Vec<usize>,
    },
}

/// Why a worker could not be retired or replaced
/// ([`Pool::retire_worker`](crate::Pool::retire_worker),
/// [`Pool::replace_worker`](crate::Pool::replace_worker)).
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum WorkerError {
    /// No serving worker has this index (never spawned, already retired, failed, or still
    /// starting).
    #[error("no serving worker with index {index}")]
    NoSuchWorker {
        /// The index asked for.
        index: usize,
    },
    /// The pool is shutting down.
    #[error("the pool is shut down")]
    Shutdown,
    /// The replacement could not be started; the old worker keeps serving.
    #[error("the replacement worker could not start: {0}")]
    Spawn(#[from] SpawnError),
}

/// Why a task could not be submitted. Nothing was queued.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SubmitError {
    /// Every task slot is in use, or a task that needs the task arena finds no room there
    /// (`try_submit` only; `submit` waits, `submit_timeout` waits up to its bound).
    #[error("the task queue is full")]
    QueueFull,
    /// Waited for a free slot past the given timeout.
    #[error("timed out waiting for room in the task queue")]
    Timeout,
    /// The task's archive (or loaned payload) is larger than the configured maximum.
    #[error("task archive or payload of {len} bytes exceeds the maximum of {max} bytes")]
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
    /// The pool has no worker serving or starting: none was spawned, every one was retired,
    /// or every one failed for good (its restart budget ran out). Nothing could run the task.
    /// Spawn a new worker to serve again.
    #[error("no live worker (none spawned, all retired, or all failed past their restart budget)")]
    NoWorkers,
    /// The memory of an arena block (a large task or a loan) could not be reserved: the
    /// machine is short of memory. Nothing was queued; the pool serves on.
    #[error("cannot reserve {bytes} bytes of shared memory (errno {errno})")]
    NoSpace {
        /// Bytes asked for.
        bytes: u64,
        /// The OS error number (`ENOSPC`, `ENOMEM`, …).
        errno: i32,
    },
    /// The pool broke down (one of its threads failed, or a worker corrupted the shared task
    /// queue) and stopped its workers; build a new pool.
    #[error("the pool broke down: {reason}")]
    Broken {
        /// What happened.
        reason: String,
    },
}

/// The `worker` of a [`TaskError::Timeout`] that no worker answered: the task's deadline
/// passed while no worker held it, and the caller's wait answered it there and then.
pub const NO_WORKER: usize = usize::MAX;

fn timeout_message(worker: usize, after: &Duration) -> String {
    match worker {
        NO_WORKER => format!(
            "task timed out after {after:?}: its deadline passed before a worker started it"
        ),
        w => format!("worker {w}: task timed out after {after:?}"),
    }
}

/// A task did not produce a value.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TaskError {
    /// The task could not be submitted (from `execute`). Never `SubmitError::NoWorkers` or
    /// `SubmitError::Broken`: those become [`TaskError::NoWorkers`] and
    /// [`TaskError::PoolBroken`], so each cause has one variant to match.
    #[error(transparent)]
    Submit(SubmitError),
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
        /// The worker's backtrace at the panic, when backtraces are enabled the standard way
        /// in the worker's environment (`RUST_BACKTRACE=1`, e.g. through
        /// [`PoolBuilder::worker_env`](crate::PoolBuilder::worker_env)); `None` otherwise.
        backtrace: Option<String>,
    },
    /// The task's result archive is larger than a result may be: half of the worker's
    /// completion ring, less a 32-byte record header.
    #[error(
        "worker {worker}: result of {len} bytes exceeds the maximum of {max} bytes \
         (half of PoolBuilder::result_ring_bytes)"
    )]
    ResultTooLarge {
        /// Seat index of the worker.
        worker: usize,
        /// Length of the archive.
        len: usize,
        /// The maximum (half of PoolBuilder::result_ring_bytes, minus a 32-byte record header).
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
    /// The task was cancelled before a worker started it (or shutdown killed the worker that
    /// was running it), or it was not run: a task of a [`batch`](crate::Pool::batch) after one
    /// that made its worker leave (a panic under the restart-on-panic policy, or
    /// [`Poisoned`](crate::Poisoned)).
    #[error("the task was cancelled")]
    Cancelled,
    /// The worker process running the task died (a crash, a kill, an exit) before publishing
    /// its result. The task may or may not have run to completion (at-most-once semantics);
    /// tasks submitted with retries are re-run instead, until their retries run out.
    #[error("worker {worker} (pid {pid}) died while running the task: {cause}")]
    WorkerDied {
        /// Seat index of the worker.
        worker: usize,
        /// Its process id.
        pid: u32,
        /// How it ended.
        cause: ExitCause,
    },
    /// The task ran longer than its timeout, and its worker was killed (and restarted); or
    /// its [deadline](crate::TaskOptions::deadline) passed before a worker started it, and it
    /// did not run (then `after` is the time from its submit to its deadline and no worker was
    /// killed; `worker` is [`NO_WORKER`] when the caller's wait answered at the deadline, as
    /// it does when no worker had claimed the task). A task with retries whose worker died
    /// while running it is re-queued, so it may have partly run before it expired.
    #[error("{}", timeout_message(*worker, after))]
    Timeout {
        /// Seat index of the worker, or [`NO_WORKER`].
        worker: usize,
        /// The timeout applied (a zero timeout is applied as 1 ns), or the time from submit
        /// to the deadline (zero if it had already passed at submit).
        after: Duration,
    },
    /// The worker declared itself unusable while running the task
    /// ([`Poisoned`](crate::Poisoned)); it is restarted fresh.
    #[error("worker {worker} is poisoned: {message}")]
    Poisoned {
        /// Seat index of the worker.
        worker: usize,
        /// The worker's message.
        message: String,
    },
    /// No worker could run the task: the pool had none serving or starting when it was
    /// submitted, or every worker failed for good while it waited.
    #[error("no live worker to run the task (none spawned, or every worker failed)")]
    NoWorkers,
    /// The pool broke down while the task was in flight (one of its threads failed, or a
    /// worker corrupted the shared task queue); it stopped every worker and answered every
    /// unfinished task with this.
    #[error("the pool broke down before the task finished")]
    PoolBroken,
}

impl TaskError {
    /// What happened, without the worker's name (for a message that names the worker
    /// itself, as [`StageError`](crate::service::StageError)'s does): `task panicked: boom`
    /// where `Display` says `worker 2: task panicked: boom`.
    pub(crate) fn what(&self) -> String {
        match self {
            TaskError::Failed { message, .. } => format!("task failed: {message}"),
            TaskError::Panicked { message, .. } => format!("task panicked: {message}"),
            TaskError::ResultTooLarge { len, max, .. } => {
                format!("result of {len} bytes exceeds the maximum of {max} bytes")
            }
            TaskError::BadTask { message, .. } => format!("invalid task: {message}"),
            TaskError::BadResult { message, .. } => format!("invalid result: {message}"),
            TaskError::WorkerDied { cause, .. } => {
                format!("died while running the task: {cause}")
            }
            TaskError::Timeout { after, .. } => format!("task timed out after {after:?}"),
            TaskError::Poisoned { message, .. } => format!("worker is poisoned: {message}"),
            e => e.to_string(),
        }
    }

    /// A panic outcome from a worker's message, which carries the worker's backtrace after
    /// the message when one was captured (`worker::main_loop::split_backtrace`).
    pub(crate) fn panicked(worker: usize, message: String) -> TaskError {
        let (message, backtrace) = crate::worker::main_loop::split_backtrace(message);
        TaskError::Panicked {
            worker,
            message,
            backtrace,
        }
    }
}

impl From<SubmitError> for TaskError {
    /// A submit failure as a task's outcome; the causes `TaskError` has its own variant for
    /// (`NoWorkers`, `Broken`) map to it.
    fn from(e: SubmitError) -> TaskError {
        match e {
            SubmitError::NoWorkers => TaskError::NoWorkers,
            SubmitError::Broken { .. } => TaskError::PoolBroken,
            e => TaskError::Submit(e),
        }
    }
}

/// A refused submit from a [`Submit`](crate::Submit) or [`SubmitBatch`](crate::SubmitBatch)
/// request: why, and the [`Loan`] it carried, handed back unsent (fill it once, try again
/// later or elsewhere). The task itself was only borrowed, so it is still the caller's.
///
/// It converts into [`SubmitError`] and [`TaskError`] (so `?` works in functions returning
/// either), and compares equal to the `SubmitError` it holds.
#[derive(Debug)]
pub struct Rejected {
    pub(crate) error: SubmitError,
    pub(crate) loan: Option<Loan>,
}

impl Rejected {
    /// Why the submit was refused.
    pub fn error(&self) -> &SubmitError {
        &self.error
    }

    /// The loan the request carried, if any, still filled as the caller left it.
    pub fn into_loan(self) -> Option<Loan> {
        self.loan
    }

    /// The reason and the loan.
    pub fn into_parts(self) -> (SubmitError, Option<Loan>) {
        (self.error, self.loan)
    }
}

impl std::fmt::Display for Rejected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        self.error.fmt(f)
    }
}

impl std::error::Error for Rejected {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        self.error.source()
    }
}

impl From<Rejected> for SubmitError {
    fn from(r: Rejected) -> SubmitError {
        r.error
    }
}

impl From<Rejected> for TaskError {
    fn from(r: Rejected) -> TaskError {
        r.error.into()
    }
}

impl PartialEq<SubmitError> for Rejected {
    fn eq(&self, other: &SubmitError) -> bool {
        self.error == *other
    }
}

/// Why a wait with a time limit ([`TaskHandle::wait_timeout`](crate::TaskHandle::wait_timeout),
/// [`try_wait`](crate::TaskHandle::try_wait), and the same on
/// [`BatchHandle`](crate::BatchHandle)) returned without a value. Handles have this one shape
/// for every bounded wait.
#[derive(Debug)]
#[non_exhaustive]
pub enum WaitTimeoutError<H> {
    /// The task had not finished in time: the handle, to wait again (or drop to cancel).
    Timeout(H),
    /// The task finished without a value.
    Task(TaskError),
}

impl<H> WaitTimeoutError<H> {
    /// The handle back, if the wait timed out.
    pub fn into_handle(self) -> Option<H> {
        match self {
            WaitTimeoutError::Timeout(h) => Some(h),
            WaitTimeoutError::Task(_) => None,
        }
    }

    /// Whether the wait timed out (the task is still running or queued).
    pub fn is_timeout(&self) -> bool {
        matches!(self, WaitTimeoutError::Timeout(_))
    }
}

impl<H> std::fmt::Display for WaitTimeoutError<H> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            WaitTimeoutError::Timeout(_) => f.write_str("the task has not finished yet"),
            WaitTimeoutError::Task(e) => e.fmt(f),
        }
    }
}

impl<H: std::fmt::Debug> std::error::Error for WaitTimeoutError<H> {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        match self {
            WaitTimeoutError::Timeout(_) => None,
            WaitTimeoutError::Task(e) => Some(e),
        }
    }
}

impl<H> From<TaskError> for WaitTimeoutError<H> {
    fn from(e: TaskError) -> Self {
        WaitTimeoutError::Task(e)
    }
}

/// How a worker process ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum ExitCause {
    /// Killed by this signal (e.g. 9 = SIGKILL, 11 = SIGSEGV, 6 = SIGABRT).
    Signal(i32),
    /// Exited with this status code (an `exit()` inside a task is a death too).
    Exit(i32),
}

impl ExitCause {
    pub(crate) fn from_status(status: std::process::ExitStatus) -> ExitCause {
        use std::os::unix::process::ExitStatusExt;
        match (status.signal(), status.code()) {
            (Some(sig), _) => ExitCause::Signal(sig),
            (None, Some(code)) => ExitCause::Exit(code),
            (None, None) => ExitCause::Exit(-1),
        }
    }

    /// Packs the cause into a slot's 32-bit field: bit 31 set = signal.
    pub(crate) fn encode(self) -> u32 {
        match self {
            ExitCause::Signal(s) => (1 << 31) | (s as u32 & 0xffff),
            ExitCause::Exit(c) => c as u32 & 0xffff,
        }
    }

    pub(crate) fn decode(v: u32) -> ExitCause {
        if v & (1 << 31) != 0 {
            ExitCause::Signal((v & 0xffff) as i32)
        } else {
            ExitCause::Exit((v & 0xffff) as i16 as i32)
        }
    }
}

impl ExitCause {
    /// The cause in words, with what the library's own exit codes mean (e.g. 121: the worker
    /// program is a different binary).
    pub(crate) fn describe(self) -> String {
        use crate::worker::boot::exit_code;
        match self {
            ExitCause::Signal(_) => self.to_string(),
            ExitCause::Exit(code) => match exit_code::meaning(code) {
                Some(m) => format!("exit code {code}: {m}"),
                None => format!("exit code {code}"),
            },
        }
    }
}

impl std::fmt::Display for ExitCause {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match *self {
            ExitCause::Signal(s) => {
                let name = match s {
                    1 => "SIGHUP",
                    2 => "SIGINT",
                    4 => "SIGILL",
                    6 => "SIGABRT",
                    7 => "SIGBUS",
                    8 => "SIGFPE",
                    9 => "SIGKILL",
                    11 => "SIGSEGV",
                    13 => "SIGPIPE",
                    15 => "SIGTERM",
                    _ => "",
                };
                if name.is_empty() {
                    write!(f, "killed by signal {s}")
                } else {
                    write!(f, "killed by signal {s} ({name})")
                }
            }
            ExitCause::Exit(c) => write!(f, "exited with code {c}"),
        }
    }
}
