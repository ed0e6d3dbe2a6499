//! The [`Stage`] trait every part of a service graph implements, the [`Item`] context that
//! travels with each input through it, and the per-stage [`StageStats`].

use super::error::ServiceError;
use super::gate::Gate;
use std::future::Future;
use std::pin::Pin;
use std::sync::Mutex;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// The future a stage returns for one item.
pub type StageFuture<'a, T> = Pin<Box<dyn Future<Output = Result<T, ServiceError>> + Send + 'a>>;

/// What travels with an item through the graph: its deadline, if it has one.
///
/// A stage that has not started an item whose deadline has passed skips it (a process stage's
/// worker answers it expired without running it), and the server fails the item with
/// [`ServiceError::Timeout`] the moment its deadline passes, wherever it is, freeing its
/// capacity at once.
#[derive(Debug, Clone, Copy)]
pub struct Item {
    pub(crate) deadline: Option<Instant>,
    pub(crate) since: Instant,
}

impl Default for Item {
    fn default() -> Self {
        Item::new()
    }
}

impl Item {
    /// An item with no deadline.
    pub fn new() -> Item {
        Item {
            deadline: None,
            since: Instant::now(),
        }
    }

    /// An item that must be done by `at`.
    pub fn with_deadline(at: Instant) -> Item {
        Item {
            deadline: Some(at),
            since: Instant::now(),
        }
    }

    /// An item that must be done `d` from now (no deadline if `d` is too long for an
    /// [`Instant`], such as `Duration::MAX`).
    pub fn with_timeout(d: Duration) -> Item {
        let now = Instant::now();
        Item {
            deadline: now.checked_add(d),
            since: now,
        }
    }

    /// The error for this item's deadline having passed in stage `path`.
    pub(crate) fn timeout(&self, path: Option<&str>) -> ServiceError {
        ServiceError::Timeout {
            stage: path.map(str::to_string),
            after: self
                .deadline
                .map_or(Duration::ZERO, |d| d.saturating_duration_since(self.since)),
        }
    }

    /// The item's deadline.
    pub fn deadline(&self) -> Option<Instant> {
        self.deadline
    }

    /// Whether the deadline has passed.
    pub fn expired(&self) -> bool {
        self.deadline.is_some_and(|d| Instant::now() >= d)
    }
}

/// One part of a service graph: takes an `In`, gives an `Out`. Implemented by the leaves
/// ([`Process`](super::Process) stages over a [`Pool`](crate::Pool), [`Threads`](super::Threads)
/// stages, [`Local`](super::Local) functions) and by the compositions
/// ([`seq`](super::seq), [`ensemble`](super::ensemble), [`switch`](super::switch)), which nest
/// freely. The compiler checks that each stage's output is the next one's input.
///
/// A stage's future may be dropped at any point: that cancels the item in every part of the
/// stage that has not started it.
pub trait Stage: Send + Sync + 'static {
    /// What the stage takes.
    type In: Send + 'static;
    /// What it gives.
    type Out: Send + 'static;

    /// Runs one item.
    fn run<'a>(&'a self, input: Self::In, item: &'a Item) -> StageFuture<'a, Self::Out>;

    /// Fixes the stage's path in its graph (`prefix` ends with `/` unless empty); a
    /// composition passes each member its own prefix. Called once, when a
    /// [`Server`](super::Server) is built over the graph.
    fn attach(&mut self, prefix: &str);

    /// Appends the statistics of this stage and every stage inside it, in graph order.
    fn report(&self, out: &mut Vec<StageStats>);

    /// Stops the stage once what it holds is done (its workers finish their queued tasks and
    /// leave), returning by `by`: a process worker still running a task then is killed (a
    /// task whose item was abandoned, say at its deadline, may run on after its item left).
    /// Called by the server's shutdown, in graph order, after intake stopped and the items in
    /// flight finished.
    fn close(&self, by: Instant) {
        let _ = by;
    }

    /// Stops the stage now, without waiting: queued tasks are cancelled, process workers are
    /// killed even in the middle of a task (threads, which cannot be, finish theirs), and
    /// items waiting at the stage's bound fail with [`ServiceError::Shutdown`].
    fn close_now(&self) {}

    /// Whether the stage takes an archived output of a process stage as its input without
    /// decoding it (process stages, and sequences that start with one). Plumbing for the
    /// zero-copy hand-off; not for implementors.
    #[doc(hidden)]
    fn __takes_archived(&self) -> bool {
        false
    }

    /// Runs one item that may arrive archived, and gives its output archived if
    /// `archived_out` and the stage can (the next stage takes it so). Plumbing for the
    /// zero-copy hand-off; not for implementors.
    #[doc(hidden)]
    fn __run_handoff<'a>(
        &'a self,
        input: super::handoff::Handoff<Self::In>,
        item: &'a Item,
        archived_out: bool,
    ) -> StageFuture<'a, super::handoff::Handoff<Self::Out>> {
        let _ = archived_out;
        Box::pin(async move {
            let x = input.into_value()?;
            self.run(x, item).await.map(super::handoff::Handoff::Value)
        })
    }
}

/// Latency percentiles over a stage's items so far.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Percentiles {
    /// Samples counted.
    pub count: u64,
    /// Median.
    pub p50: Duration,
    /// 90th percentile.
    pub p90: Duration,
    /// 99th percentile.
    pub p99: Duration,
    /// Largest.
    pub max: Duration,
}

/// One stage's counters ([`Server::stats`](super::Server::stats) returns every stage's).
#[derive(Debug, Clone, Default, PartialEq)]
#[non_exhaustive]
pub struct StageStats {
    /// The stage's path in the graph (see [`StageError::path`](super::StageError)).
    pub path: String,
    /// `"process"`, `"thread"` or `"local"` (compositions report their members' stats).
    pub kind: &'static str,
    /// Workers serving (process or thread stages; `None` for the others).
    pub live_workers: Option<usize>,
    /// Tasks waiting in the stage's queue for a worker (process and thread stages). Tasks
    /// whose items left (cancelled, past their deadline) are not counted, though a worker
    /// still skips them when it reaches them. A process stage counts every task waiting in
    /// its pool, also those submitted to the pool directly.
    pub queued: usize,
    /// Items in the stage now (queued, running, or waiting for the stage's bound).
    pub in_flight: usize,
    /// The stage's bound on items in flight.
    pub max_in_flight: usize,
    /// Items that left the stage with an output.
    pub done: u64,
    /// Items that failed in it.
    pub failed: u64,
    /// Items whose deadline passed in it (skipped, or abandoned while running).
    pub expired: u64,
    /// Items dropped while in it (their call or stream was dropped, or another member of an
    /// ensemble failed first), started or not: a task no worker had started is cancelled
    /// (never run); one already running runs on, its output discarded. `done`, `failed`,
    /// `expired` and `cancelled` add up to every item that left the stage.
    pub cancelled: u64,
    /// Time from entering the stage to being handed to a worker (waiting for the stage's
    /// bound and, for thread stages, in the queue). An item handed over archived from the
    /// previous process stage took its place before it left that stage: 0 here.
    pub queue_delay: Percentiles,
    /// Time from being queued for the stage's workers to the output: includes the wait in
    /// their queue (for thread stages that wait is also in `queue_delay`; for a batching
    /// process stage, see the pool's batching counters for the worker's own split).
    pub execute: Percentiles,
    /// A batching process stage's batch sizes, queue delay and execute time, as its workers
    /// count them.
    pub batching: Option<crate::BatchStats>,
}

/// Counts an item waiting for a place for as long as it lives (the wait may be dropped).
struct Waiting<'a>(&'a std::sync::atomic::AtomicUsize);

impl<'a> Waiting<'a> {
    fn new(n: &'a std::sync::atomic::AtomicUsize) -> Self {
        n.fetch_add(1, Ordering::Relaxed);
        Waiting(n)
    }
}

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// The counters a leaf stage keeps: its bound, its outcomes, its latency histograms.
#[derive(Debug)]
pub(crate) struct Meter {
    pub(crate) path: String,
    pub(crate) gate: Gate,
    /// Items waiting for a place at `gate` (counted in `in_flight`).
    waiting: std::sync::atomic::AtomicUsize,
    done: AtomicU64,
    failed: AtomicU64,
    expired: AtomicU64,
    cancelled: AtomicU64,
    queue: Mutex<hdrhistogram::Histogram<u64>>,
    exec: Mutex<hdrhistogram::Histogram<u64>>,
}

fn histogram() -> hdrhistogram::Histogram<u64> {
    // Nanoseconds, 1 µs to 1 hour, 2 significant digits: a few kB per stage.
    hdrhistogram::Histogram::new_with_bounds(1_000, 3_600_000_000_000, 2)
        .unwrap_or_else(|_| hdrhistogram::Histogram::new(2).expect("2 digits is valid"))
}

impl Meter {
    pub(crate) fn new(name: &str, max_in_flight: usize) -> Meter {
        Meter {
            path: name.to_string(),
            gate: Gate::new(max_in_flight),
            waiting: Default::default(),
            done: AtomicU64::new(0),
            failed: AtomicU64::new(0),
            expired: AtomicU64::new(0),
            cancelled: AtomicU64::new(0),
            queue: Mutex::new(histogram()),
            exec: Mutex::new(histogram()),
        }
    }

    /// Sets the path from the stage's name and its place.
    pub(crate) fn attach(&mut self, prefix: &str, name: &str) {
        self.path = format!("{prefix}{name}");
    }

    fn record(h: &Mutex<hdrhistogram::Histogram<u64>>, d: Duration) {
        let ns = d.as_nanos().clamp(1_000, 3_600_000_000_000) as u64;
        let _ = h.lock().unwrap_or_else(|e| e.into_inner()).record(ns);
    }

    pub(crate) fn queued_for(&self, d: Duration) {
        Self::record(&self.queue, d);
    }

    /// Counts an item's end: its outcome, and the time since it was handed to the workers.
    pub(crate) fn finished<T>(&self, r: &Result<T, ServiceError>, exec: Duration) {
        match r {
            Ok(_) => {
                self.done.fetch_add(1, Ordering::Relaxed);
                Self::record(&self.exec, exec);
            }
            Err(ServiceError::Timeout { .. }) => {
                self.expired.fetch_add(1, Ordering::Relaxed);
            }
            Err(_) => {
                self.failed.fetch_add(1, Ordering::Relaxed);
            }
        }
    }

    pub(crate) fn expired(&self) {
        self.expired.fetch_add(1, Ordering::Relaxed);
    }

    fn percentiles(h: &Mutex<hdrhistogram::Histogram<u64>>) -> Percentiles {
        let h = h.lock().unwrap_or_else(|e| e.into_inner());
        let q = |p: f64| Duration::from_nanos(h.value_at_quantile(p));
        Percentiles {
            count: h.len(),
            p50: q(0.5),
            p90: q(0.9),
            p99: q(0.99),
            max: Duration::from_nanos(h.max()),
        }
    }

    /// The stats this meter can fill; the stage adds its workers and queue.
    pub(crate) fn stats(&self, kind: &'static str) -> StageStats {
        StageStats {
            path: self.path.clone(),
            kind,
            live_workers: None,
            queued: 0,
            in_flight: self.gate.in_use() + self.waiting.load(Ordering::Relaxed),
            max_in_flight: self.gate.capacity(),
            done: self.done.load(Ordering::Relaxed),
            failed: self.failed.load(Ordering::Relaxed),
            expired: self.expired.load(Ordering::Relaxed),
            cancelled: self.cancelled.load(Ordering::Relaxed),
            queue_delay: Self::percentiles(&self.queue),
            execute: Self::percentiles(&self.exec),
            batching: None,
        }
    }
}

impl Meter {
    /// A task's failure as this stage's: its path, the worker the outcome names and that
    /// worker's pid (`pid_of`, unless the outcome carries it). A `Timeout` once the item's
    /// deadline has passed is the deadline's doing: [`ServiceError::Timeout`] naming the stage.
    pub(crate) fn fail(
        &self,
        item: &Item,
        e: crate::TaskError,
        pid_of: impl FnOnce(usize) -> Option<u32>,
    ) -> ServiceError {
        use crate::TaskError as E;
        if matches!(e, E::Timeout { .. }) && item.expired() {
            return item.timeout(Some(&self.path));
        }
        let (worker, pid) = match &e {
            E::Timeout { worker, .. } if *worker == crate::NO_WORKER => (None, None),
            E::WorkerDied { worker, pid, .. } => (Some(*worker), Some(*pid)),
            E::Failed { worker, .. }
            | E::Panicked { worker, .. }
            | E::ResultTooLarge { worker, .. }
            | E::BadTask { worker, .. }
            | E::BadResult { worker, .. }
            | E::Timeout { worker, .. }
            | E::Poisoned { worker, .. } => (Some(*worker), pid_of(*worker)),
            _ => (None, None),
        };
        super::error::StageError {
            path: self.path.clone(),
            worker,
            pid,
            error: e,
        }
        .into()
    }

    /// Ends the waits at the stage's bound ([`ServiceError::Shutdown`]): the stage is being
    /// stopped now.
    pub(crate) fn close(&self) {
        self.gate.close();
    }

    /// Runs a leaf stage's `body` for `item` under the stage's bound and the item's deadline:
    /// waits for a place (until the deadline), then runs the body until the deadline. Past
    /// the deadline the body is dropped (cancelling what it had not started) and the item
    /// fails with [`ServiceError::Timeout`] naming this stage. With `count_wait`, the wait for
    /// a place counts as queue delay (stages that measure their queue themselves pass false).
    pub(crate) async fn admit<T>(
        &self,
        item: &Item,
        count_wait: bool,
        body: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        self.admit_with(None, item, count_wait, body).await
    }

    /// As [`admit`](Self::admit), with a place already taken (`Some`) or to wait for.
    pub(crate) async fn admit_with<T>(
        &self,
        place: Option<super::gate::Permit<'_>>,
        item: &Item,
        count_wait: bool,
        body: impl Future<Output = Result<T, ServiceError>>,
    ) -> Result<T, ServiceError> {
        // Counts the item as cancelled if this future is dropped before it ends.
        let left = Dropped(&self.cancelled);
        let t0 = Instant::now();
        let _place = match place {
            Some(p) => p,
            None => {
                let _waiting = Waiting::new(&self.waiting);
                match self.gate.acquire(item.deadline).await {
                    Ok(p) => p,
                    Err(super::gate::Refused::Deadline) => {
                        std::mem::forget(left);
                        self.expired();
                        return Err(item.timeout(Some(&self.path)));
                    }
                    // The stage was stopped (`close_now`): counted as cancelled (`left`).
                    Err(super::gate::Refused::Closed) => return Err(ServiceError::Shutdown),
                }
            }
        };
        if count_wait {
            self.queued_for(t0.elapsed());
        }
        let t1 = Instant::now();
        let r = match super::gate::until(item.deadline, body).await {
            Some(r) => r,
            None => Err(item.timeout(Some(&self.path))),
        };
        std::mem::forget(left);
        self.finished(&r, t1.elapsed());
        r
    }
}

/// Adds one to its counter when dropped: an item whose stage future was dropped unfinished
/// (forgotten once the item leaves the stage with an outcome).
struct Dropped<'a>(&'a AtomicU64);

impl Drop for Dropped<'_> {
    fn drop(&mut self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
}
