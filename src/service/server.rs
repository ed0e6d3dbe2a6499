//! The [`Server`]: the front door of a service graph, with a capacity, deadlines, blocking
//! and async calls, streams, statistics and a graceful shutdown.

use super::error::ServiceError;
use super::gate::{Gate, Refused, until};
use super::stage::{Item, Stage, StageStats};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The front of a service graph (any [`Stage`]: a single stage or a composition).
///
/// - **Capacity** counts items anywhere in the graph, from the moment a call is admitted
///   until its output (or error) is handed back. [`call`](Self::call) and
///   [`call_async`](Self::call_async) wait for room (until the item's deadline, if any);
///   [`try_call`](Self::try_call) fails at once with [`ServiceError::Full`].
/// - **Deadlines** travel with each item ([`call_timeout`](Self::call_timeout), or the
///   server's default [`timeout`](Self::timeout)): a stage that has not started an expired
///   item skips it, and the moment the deadline passes the call fails with
///   [`ServiceError::Timeout`] naming the stage, and its capacity is free again. (A task a
///   worker is running is not interrupted: its result is discarded. A [`local`](super::local)
///   stage runs inside the call's own future, so nothing can fail the call while it runs.)
/// - **Cancellation**: dropping a call's future cancels the item at every stage that has not
///   started it.
/// - **Streams**: [`stream`](Self::stream) runs a possibly endless input through the graph
///   with a bounded window, ordered or not, with the map engine's
///   [error policies](crate::ErrorPolicy).
/// - **Observability**: [`stats`](Self::stats) returns every stage's counters in one call;
///   [`healthy`](Self::healthy) says whether every worker stage has a live worker.
/// - **Shutdown**: [`shutdown`](Self::shutdown) stops intake (calls waiting for room are
///   answered [`ServiceError::Shutdown`] at once), lets the items in flight finish
///   (bounded), then closes the stages in graph order.
/// - **Calling back in**: a stage whose work calls this server (or a thread stage that calls
///   its own [`Threads::execute`](super::Threads::execute)) needs a place for the inner call
///   while its outer item holds one; with every place (or every thread) held by outer items,
///   the inner calls wait for ever unless they have a deadline. Give such calls a deadline,
///   or send them to a separate server.
pub struct Server<S: Stage> {
    graph: S,
    capacity: Gate,
    closing: AtomicBool,
    timeout: Option<Duration>,
}

impl<S: Stage> std::fmt::Debug for Server<S> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Server")
            .field("capacity", &self.capacity.capacity())
            .field("in_flight", &self.capacity.in_use())
            .field("closing", &self.closing.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

/// A server's counters ([`Server::stats`]).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct ServerStats {
    /// The server's capacity.
    pub capacity: usize,
    /// Items in the graph now.
    pub in_flight: usize,
    /// Every stage's counters, in graph order.
    pub stages: Vec<StageStats>,
}

/// How a [`Server::shutdown`] went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub struct ShutdownReport {
    /// Every item in flight finished within the timeout.
    pub drained: bool,
    /// Items still in flight at the timeout (their stages were stopped at once; they fail).
    pub abandoned: usize,
}

impl<S: Stage> Server<S> {
    /// A server over `graph` taking at most `capacity` items at once (at least 1). Fixes the
    /// stage paths of the graph (see [`StageError`](super::StageError)).
    pub fn new(mut graph: S, capacity: usize) -> Self {
        graph.attach("");
        Server {
            graph,
            capacity: Gate::new(capacity),
            closing: AtomicBool::new(false),
            timeout: None,
        }
    }

    /// A deadline for every call that does not bring its own: `d` after the call.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    pub(crate) fn timeout_default(&self) -> Option<Duration> {
        self.timeout
    }

    /// The graph.
    pub fn graph(&self) -> &S {
        &self.graph
    }

    /// The server's capacity.
    pub fn capacity(&self) -> usize {
        self.capacity.capacity()
    }

    /// Items in the graph now.
    pub fn in_flight(&self) -> usize {
        self.capacity.in_use()
    }

    fn item(&self, timeout: Option<Duration>) -> Item {
        match timeout.or(self.timeout) {
            Some(d) => Item::with_timeout(d),
            None => Item::new(),
        }
    }

    /// Runs one item: admission (waiting for room until the deadline, or not at all), then
    /// the graph until the deadline.
    pub(crate) async fn run(
        &self,
        input: S::In,
        item: Item,
        wait: bool,
    ) -> Result<S::Out, ServiceError> {
        if self.closing.load(Ordering::SeqCst) {
            return Err(ServiceError::Shutdown);
        }
        let _place = if wait {
            match self.capacity.acquire(item.deadline).await {
                Ok(p) => p,
                Err(Refused::Deadline) => return Err(item.timeout(None)),
                Err(Refused::Closed) => return Err(ServiceError::Shutdown),
            }
        } else {
            self.capacity.try_acquire().ok_or(ServiceError::Full {
                capacity: self.capacity.capacity(),
            })?
        };
        // Admitted after shutdown began: not taken (shutdown counts on intake having stopped).
        if self.closing.load(Ordering::SeqCst) {
            return Err(ServiceError::Shutdown);
        }
        match until(item.deadline, self.graph.run(input, &item)).await {
            Some(r) => r,
            None => Err(item.timeout(None)),
        }
    }

    /// Runs `input` through the graph and blocks for its output; waits for room first.
    pub fn call(&self, input: S::In) -> Result<S::Out, ServiceError> {
        super::exec::block_on(self.run(input, self.item(None), true))
    }

    /// As [`call`](Self::call), but fails at once with [`ServiceError::Full`] when the
    /// capacity is taken.
    pub fn try_call(&self, input: S::In) -> Result<S::Out, ServiceError> {
        super::exec::block_on(self.run(input, self.item(None), false))
    }

    /// As [`call`](Self::call), with a deadline `timeout` from now for the whole call
    /// (waiting for room included).
    pub fn call_timeout(&self, input: S::In, timeout: Duration) -> Result<S::Out, ServiceError> {
        super::exec::block_on(self.run(input, self.item(Some(timeout)), true))
    }

    /// Runs `input` through the graph without blocking the thread (any executor). Dropping
    /// the future cancels the item wherever it has not started.
    pub async fn call_async(&self, input: S::In) -> Result<S::Out, ServiceError> {
        self.run(input, self.item(None), true).await
    }

    /// As [`call_async`](Self::call_async), with a deadline `timeout` from now.
    pub async fn call_async_timeout(
        &self,
        input: S::In,
        timeout: Duration,
    ) -> Result<S::Out, ServiceError> {
        self.run(input, self.item(Some(timeout)), true).await
    }

    /// As [`call_async`](Self::call_async), but fails at once with [`ServiceError::Full`]
    /// when the capacity is taken (for a front that answers "busy", e.g. HTTP 503).
    pub async fn try_call_async(&self, input: S::In) -> Result<S::Out, ServiceError> {
        self.run(input, self.item(None), false).await
    }

    /// As [`try_call_async`](Self::try_call_async), with a deadline `timeout` from now.
    pub async fn try_call_async_timeout(
        &self,
        input: S::In,
        timeout: Duration,
    ) -> Result<S::Out, ServiceError> {
        self.run(input, self.item(Some(timeout)), false).await
    }

    /// Every stage's counters, in graph order, with the server's own.
    pub fn stats(&self) -> ServerStats {
        let mut stages = Vec::new();
        self.graph.report(&mut stages);
        ServerStats {
            capacity: self.capacity.capacity(),
            in_flight: self.capacity.in_use(),
            stages,
        }
    }

    /// Whether every process and thread stage has at least one live worker (and the server
    /// takes calls).
    pub fn healthy(&self) -> bool {
        !self.closing.load(Ordering::SeqCst)
            && self
                .stats()
                .stages
                .iter()
                .all(|s| s.live_workers.is_none_or(|n| n > 0))
    }

    /// Whether shutdown has begun.
    pub fn is_closing(&self) -> bool {
        self.closing.load(Ordering::SeqCst)
    }

    /// Stops intake (new calls, and calls still waiting for room, fail with
    /// [`ServiceError::Shutdown`]; streams stop taking input), waits up to `timeout` for the
    /// items in flight to finish, then closes the stages in graph order (each finishes what
    /// it holds and stops its workers, by the same deadline: a process worker still running
    /// the task of an item abandoned earlier, say at its deadline, is killed then). Items still
    /// in flight at the timeout are abandoned: every stage is stopped at once, queued tasks
    /// are cancelled and process workers still running one are killed without waiting for
    /// their pools' shutdown timeouts, so those items fail. (A thread stage's running task
    /// cannot be stopped: it finishes on its own. Its item, counted as abandoned in the
    /// report, is answered only when that task ends, after this returned: with the task's
    /// outcome, or the error of a later stage, closed by then.) Bounded: returns within about
    /// `timeout` when it drains, and shortly after it otherwise.
    pub fn shutdown(&self, timeout: Duration) -> ShutdownReport {
        self.closing.store(true, Ordering::SeqCst);
        // Callers waiting for a place: answered `Shutdown` now, not when a place frees.
        self.capacity.close();
        let deadline = crate::deadline::at_or_never(Instant::now(), timeout);
        let drained = self.capacity.wait_idle(deadline);
        let abandoned = if drained { 0 } else { self.capacity.in_use() };
        if drained {
            // By the same deadline: a process worker may still run the task of an item
            // abandoned earlier (its call timed out or was dropped); it is killed then.
            self.graph.close(deadline);
        } else {
            self.graph.close_now();
        }
        ShutdownReport { drained, abandoned }
    }
}
