//! What a call into a service can end in: refused at the door, out of time, shut down, or a
//! stage's failure named by its place in the graph.

use crate::error::TaskError;
use std::time::Duration;

/// A stage failed an item: where in the graph, on which worker, and why.
///
/// The path names the stage from the root of the graph, e.g. `seq[1]/ensemble[0]/Model`;
/// [`Display`](std::fmt::Display) adds the worker (when one ran the item) and what happened,
/// e.g. `seq[1]/ensemble[0]/Model#2 (pid 4242): task panicked: …` for a process stage, or
/// `seq[2]/combine (pid 4000): task failed: …` for a parent function (the parent's pid, no
/// worker). A panic's backtrace (when the
/// worker had `RUST_BACKTRACE=1`) is not in that line: [`backtrace`](Self::backtrace) has
/// it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StageError {
    /// The stage's path in the graph.
    pub path: String,
    /// The worker (seat or thread index) that ran the item, when one did.
    pub worker: Option<usize>,
    /// That worker's process id, when known (a thread stage's is the parent's).
    pub pid: Option<u32>,
    /// What happened: the task's outcome as the stage's pool or threads reported it (kind and
    /// message; for a panic, the worker's backtrace too: see [`backtrace`](Self::backtrace)).
    pub error: TaskError,
}

impl StageError {
    /// The worker's backtrace, when the task panicked and backtraces are enabled in the
    /// worker's environment (`RUST_BACKTRACE=1`).
    pub fn backtrace(&self) -> Option<&str> {
        match &self.error {
            TaskError::Panicked { backtrace, .. } => backtrace.as_deref(),
            _ => None,
        }
    }
}

impl std::fmt::Display for StageError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.path)?;
        if let Some(w) = self.worker {
            write!(f, "#{w}")?;
        }
        if let Some(p) = self.pid {
            write!(f, " (pid {p})")?;
        }
        // The worker is named above: the task's outcome without its own `worker N:` prefix.
        write!(f, ": {}", self.error.what())
    }
}

impl std::error::Error for StageError {
    fn source(&self) -> Option<&(dyn std::error::Error + 'static)> {
        Some(&self.error)
    }
}

/// Why a call into a [`Server`](super::Server) (or a stage run directly) did not produce an
/// output.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ServiceError {
    /// The server's capacity (items anywhere in the graph) is taken: `try_call` refuses at
    /// once, and a stream or call never sees this (they wait for room).
    #[error("the service is at capacity ({capacity} items in flight)")]
    Full {
        /// The server's capacity.
        capacity: usize,
    },
    /// The item's deadline passed: waiting for room, queued in a stage (which then skips it
    /// and frees its capacity at once), or running.
    #[error("deadline passed after {after:?}{}", match stage {
        Some(p) => format!(" in stage {p}"),
        None => " before the item entered the graph".to_string(),
    })]
    Timeout {
        /// The stage the item was in, or `None` if it passed before the item entered the
        /// graph (while it waited for room at the door, or already when the call was made).
        stage: Option<String>,
        /// Time from the call to the deadline.
        after: Duration,
    },
    /// A stage failed the item.
    #[error(transparent)]
    Stage(Box<StageError>),
    /// A [`switch`](super::switch)'s route picked a member it does not have.
    #[error("{stage}: the route picked member {index}, but there are {members}")]
    Route {
        /// The switch's path.
        stage: String,
        /// The index the route returned.
        index: usize,
        /// The number of members.
        members: usize,
    },
    /// The server is shutting down (or shut down): no new items are taken.
    #[error("the service is shut down")]
    Shutdown,
}

impl ServiceError {
    /// The stage path where the item failed or ran out of time, if it was in one.
    pub fn stage(&self) -> Option<&str> {
        match self {
            ServiceError::Stage(e) => Some(&e.path),
            ServiceError::Timeout { stage, .. } => stage.as_deref(),
            ServiceError::Route { stage, .. } => Some(stage),
            _ => None,
        }
    }
}

impl From<StageError> for ServiceError {
    fn from(e: StageError) -> Self {
        ServiceError::Stage(Box::new(e))
    }
}
