//! `tracing` events (feature `tracing`): what the pool tells a service's subscriber. Target
//! `stateful_pool`; every event carries the worker's seat (`worker`) and, where known, its pid.
//!
//! - `PoolEvent`s as they happen (deaths and restart failures at WARN, a failed seat, no
//!   workers left and a breakdown at ERROR, the rest at INFO);
//! - a worker process launched (DEBUG);
//! - each task's time from submit to collection (DEBUG, `task_id`, `micros`).
//!
//! Without the feature every function here is an empty inline function.

use super::pool::events::PoolEvent;

/// Reports a pool event.
#[inline]
pub(crate) fn pool_event(e: &PoolEvent) {
    #[cfg(feature = "tracing")]
    match e {
        PoolEvent::WorkerDied {
            worker,
            pid,
            cause,
            reason,
            tasks_failed,
            tasks_retried,
        } => tracing::warn!(
            target: "stateful_pool",
            worker, pid, %cause, reason = reason.as_str(), tasks_failed, tasks_retried,
            "worker died"
        ),
        PoolEvent::WorkerRestarted {
            worker,
            pid,
            generation,
        } => tracing::info!(target: "stateful_pool", worker, pid, generation, "worker restarted"),
        PoolEvent::RestartFailed { worker, message } => {
            tracing::warn!(target: "stateful_pool", worker, %message, "restart failed")
        }
        PoolEvent::WorkerRetired { worker, pid } => {
            tracing::info!(target: "stateful_pool", worker, pid, "worker retired")
        }
        PoolEvent::WorkerFailed { worker, restarts } => tracing::error!(
            target: "stateful_pool",
            worker, restarts,
            "worker failed: out of restarts"
        ),
        PoolEvent::WorkerReviving { worker } => {
            tracing::info!(target: "stateful_pool", worker, "failed worker revived: starting")
        }
        PoolEvent::NoWorkersLeft => {
            tracing::error!(target: "stateful_pool", "no worker left: tasks fail with NoWorkers")
        }
        #[allow(unreachable_patterns)]
        _ => tracing::info!(target: "stateful_pool", event = ?e, "pool event"),
    }
    #[cfg(not(feature = "tracing"))]
    let _ = e;
}

/// A worker process was launched into `worker` (a first start or a restart).
#[inline]
pub(crate) fn launched(worker: u32, pid: u32) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "stateful_pool", worker, pid, "worker process launched");
    #[cfg(not(feature = "tracing"))]
    let _ = (worker, pid);
}

/// A worker finished its spawn step and serves.
#[inline]
pub(crate) fn ready(worker: u32, pid: u32) {
    #[cfg(feature = "tracing")]
    tracing::info!(target: "stateful_pool", worker, pid, "worker ready");
    #[cfg(not(feature = "tracing"))]
    let _ = (worker, pid);
}

/// The pool broke down.
#[inline]
pub(crate) fn broken(reason: &str) {
    #[cfg(feature = "tracing")]
    tracing::error!(target: "stateful_pool", %reason, "pool broke down");
    #[cfg(not(feature = "tracing"))]
    let _ = reason;
}

/// A task's outcome was collected `micros` after its submit.
#[cfg_attr(not(feature = "tracing"), allow(dead_code))]
#[inline]
pub(crate) fn task_done(task_id: u64, worker: u32, micros: u64, ok: bool) {
    #[cfg(feature = "tracing")]
    tracing::debug!(target: "stateful_pool", task_id, worker, micros, ok, "task done");
    #[cfg(not(feature = "tracing"))]
    let _ = (task_id, worker, micros, ok);
}
