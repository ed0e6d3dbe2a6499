//! `tracing` spans and events (feature `tracing`): what the pool tells a service's
//! subscriber. Target `stateful_pool`; every event carries the worker's seat (`worker`) and,
//! where known, its pid.
//!
//! - a span `worker` (INFO, `worker`, `pid`) for each worker process's life, from its launch
//!   to its death or retirement, with a child span `spawn` (INFO, `worker`, `pid`, `restart`)
//!   from the launch to the end of its spawn step: the span's duration is the spawn's (or a
//!   restart's) time. The events about a worker are recorded in its span;
//! - `PoolEvent`s as they happen (deaths and restart failures at WARN, a failed seat, no
//!   workers left and a breakdown at ERROR, the rest at INFO);
//! - a worker process launched (DEBUG) and ready (INFO);
//! - each task's time from submit to collection (DEBUG, `task_id`, `micros`).
//!
//! Without the feature every function here is an empty inline function, and [`Life`] is
//! empty.

use super::pool::events::PoolEvent;

/// The spans of one worker process (its life, and its spawn until it is ready); kept by its
/// seat in the supervisor. Dropping it closes them.
#[derive(Debug, Default)]
pub(crate) struct Life {
    #[cfg(feature = "tracing")]
    worker: Option<tracing::Span>,
    #[cfg(feature = "tracing")]
    spawn: Option<tracing::Span>,
}

/// Reports a pool event, inside the span of the worker it is about (`life`), if any.
#[inline]
pub(crate) fn pool_event(e: &PoolEvent, life: Option<&Life>) {
    // The worker's span is the event's parent, named explicitly: the supervisor thread that
    // reports it is in no span of its own.
    #[cfg(feature = "tracing")]
    let parent = life.and_then(|l| l.worker.as_ref()).and_then(|s| s.id());
    #[cfg(not(feature = "tracing"))]
    let _ = life;
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
            target: "stateful_pool", parent: parent.clone(),
            worker, pid, %cause, reason = reason.as_str(), tasks_failed, tasks_retried,
            "worker died"
        ),
        PoolEvent::WorkerRestarted {
            worker,
            pid,
            generation,
        } => {
            tracing::info!(target: "stateful_pool", parent: parent.clone(), worker, pid, generation, "worker restarted")
        }
        PoolEvent::RestartFailed { worker, message } => {
            tracing::warn!(target: "stateful_pool", parent: parent.clone(), worker, %message, "restart failed")
        }
        PoolEvent::WorkerRetired { worker, pid } => {
            tracing::info!(target: "stateful_pool", parent: parent.clone(), worker, pid, "worker retired")
        }
        PoolEvent::WorkerFailed { worker, restarts } => tracing::error!(
            target: "stateful_pool", parent: parent.clone(),
            worker, restarts,
            "worker failed: out of restarts"
        ),
        PoolEvent::WorkerReviving { worker } => {
            tracing::info!(target: "stateful_pool", parent: parent.clone(), worker, "failed worker revived: starting")
        }
        PoolEvent::NoWorkersLeft => {
            tracing::error!(target: "stateful_pool", parent: parent.clone(), "no worker left: tasks fail with NoWorkers")
        }
        #[allow(unreachable_patterns)]
        _ => tracing::info!(target: "stateful_pool", parent: parent, event = ?e, "pool event"),
    }
    #[cfg(not(feature = "tracing"))]
    let _ = e;
}

/// A worker process was launched into `worker` (a first start, or a restart): its spans open.
#[inline]
pub(crate) fn launched(worker: u32, pid: u32, restart: bool) -> Life {
    #[cfg(feature = "tracing")]
    {
        // Parentless: a worker's life is not part of whatever the supervisor thread was in.
        let life =
            tracing::info_span!(target: "stateful_pool", parent: None, "worker", worker, pid);
        let spawn = tracing::info_span!(target: "stateful_pool", parent: &life, "spawn", worker, pid, restart);
        tracing::debug!(target: "stateful_pool", parent: &spawn, worker, pid, "worker process launched");
        Life {
            worker: Some(life),
            spawn: Some(spawn),
        }
    }
    #[cfg(not(feature = "tracing"))]
    {
        let _ = (worker, pid, restart);
        Life::default()
    }
}

/// A worker finished its spawn step and serves: its `spawn` span closes.
#[inline]
pub(crate) fn ready(life: &mut Life, worker: u32, pid: u32) {
    #[cfg(feature = "tracing")]
    if let Some(spawn) = life.spawn.take() {
        tracing::info!(target: "stateful_pool", parent: &spawn, worker, pid, "worker ready");
    }
    #[cfg(not(feature = "tracing"))]
    let _ = (life, worker, pid);
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
