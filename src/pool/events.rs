//! What the pool tells its user about faults: [`PoolEvent`]s (through
//! [`PoolBuilder::on_event`](crate::PoolBuilder::on_event)), counters ([`PoolStats`]), and each
//! worker seat's state ([`WorkerInfo`]).

use crate::error::ExitCause;
use std::sync::atomic::{AtomicU64, Ordering};

/// Why a worker process ended, as far as the pool knows (beside its [`ExitCause`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum DeathReason {
    /// It died on its own: a crash, a signal from outside, an `abort`.
    Crash,
    /// It exited by itself while it should have been serving (an `exit()` in a task).
    Exit,
    /// The pool killed it: a task ran past its timeout.
    Timeout,
    /// It declared itself unusable ([`Poisoned`](crate::Poisoned)) and retired.
    Poisoned,
    /// A task panicked under the restart-on-panic policy, and it retired.
    Panic,
    /// The pool killed it for corrupting shared memory it must not write.
    Misbehaving,
    /// The pool killed it at shutdown, past the shutdown timeout.
    Shutdown,
}

impl DeathReason {
    /// The reason as one lowercase word (`"crash"`, `"timeout"`, …), for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            DeathReason::Crash => "crash",
            DeathReason::Exit => "exit",
            DeathReason::Timeout => "timeout",
            DeathReason::Poisoned => "poisoned",
            DeathReason::Panic => "panic",
            DeathReason::Misbehaving => "misbehaving",
            DeathReason::Shutdown => "shutdown",
        }
    }
}

impl std::fmt::Display for DeathReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

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
        /// Why, when the pool knows better than the exit status.
        reason: DeathReason,
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
    /// A worker was retired on request ([`Pool::retire_worker`](crate::Pool::retire_worker)):
    /// it finished its task and exited, and its seat is free.
    WorkerRetired {
        /// Seat index.
        worker: usize,
        /// Its process id.
        pid: u32,
    },
    /// The seat ran out of restarts: it is marked failed and the pool serves without it (until
    /// its revival, with [`PoolBuilder::revive_failed_after`](crate::PoolBuilder::revive_failed_after)).
    WorkerFailed {
        /// Seat index.
        worker: usize,
        /// Restarts spent within the window.
        restarts: u32,
    },
    /// A failed seat is started again, its restart budget afresh
    /// ([`PoolBuilder::revive_failed_after`](crate::PoolBuilder::revive_failed_after));
    /// [`WorkerRestarted`](Self::WorkerRestarted) follows once it serves.
    WorkerReviving {
        /// Seat index.
        worker: usize,
    },
    /// No worker is left alive: queued and new tasks fail with `NoWorkers` until a worker is
    /// spawned again (or a failed one revived).
    NoWorkersLeft,
}

/// Counters of the pool's fault handling since it was built.
///
/// A fault is counted before any task it touched is answered: once a caller holds a
/// `WorkerDied`, a `Timeout` from a kill, or the answer of a retried task, the stats it reads
/// next include that death, timeout or retry.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct PoolStats {
    /// Worker processes that ended while they should have been serving.
    pub worker_deaths: u64,
    /// Replacements that finished their spawn step.
    pub restarts: u64,
    /// Times a seat was marked failed after running out of restarts (a seat that is revived
    /// and fails again counts again).
    pub failed_workers: u64,
    /// Tasks that failed because their worker died (`WorkerDied`).
    pub tasks_died: u64,
    /// Tasks that ran past their execution timeout (`Timeout`; their worker was killed).
    /// Tasks answered `Timeout` because their deadline passed before they started are not
    /// counted here.
    pub tasks_timed_out: u64,
    /// Re-runs of tasks whose worker died, under their retry policy.
    pub tasks_retried: u64,
    /// Dynamic batching ([`BatchPolicy`](crate::BatchPolicy)): batch sizes, queue delay and
    /// execute time per batch.
    pub batching: super::batching::BatchStats,
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
            batching: Default::default(),
        }
    }
}

/// The state of a worker seat.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum WorkerState {
    /// Never used, or freed after a failed spawn.
    Empty,
    /// Its process is starting (first start or a restart). A worker whose spawn step has just
    /// finished may already be serving tasks while its seat still reads `Starting`: the
    /// supervisor records it as `Ready` (and counts the restart) when it next looks, usually
    /// within a millisecond. A spawn call returns only after that.
    Starting,
    /// Serving tasks.
    Ready,
    /// Dead; waiting out its back-off before the restart.
    Restarting,
    /// Out of restarts; the pool serves without it (until its revival, if the pool revives
    /// failed seats).
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
