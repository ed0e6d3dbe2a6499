//! A stage of worker processes: a [`Pool`] in a service graph.

use super::error::ServiceError;
use super::handoff::{Handoff, Ready};
use super::stage::{Item, Meter, Stage, StageFuture, StageStats};
use crate::{Loan, Pool, TaskError, TaskHandle, TaskOptions, Worker, WorkerState};
use std::sync::Arc;
use std::time::Instant;

/// A stage whose items run as tasks on a [`Pool`]'s worker processes (each optionally pinned
/// to its CPUs with [`SpawnOptions::cpus`](crate::SpawnOptions::cpus), batching with the
/// pool's [`BatchPolicy`](crate::BatchPolicy)). Its input is the worker's task type, its
/// output the worker's output type.
///
/// The item's deadline travels with the task: a worker skips it if it passed before the task
/// started. A worker's death fails only the item it was running (or re-runs it, with
/// [`task_options`](Self::task_options) retries). The pool stays reachable through
/// [`pool`](Self::pool) (to spawn, retire or replace workers while the service runs).
pub struct Process<W: Worker> {
    name: String,
    pool: Arc<Pool<W>>,
    meter: Meter,
    opts: TaskOptions,
}

impl<W: Worker> std::fmt::Debug for Process<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Process")
            .field("path", &self.meter.path)
            .finish_non_exhaustive()
    }
}

impl<W: Worker> Process<W> {
    /// A stage named `name` (the last part of its path) over `pool`. Its bound on items in
    /// flight starts at the pool's queue size.
    pub fn new(name: &str, pool: impl Into<Arc<Pool<W>>>) -> Self {
        let pool = pool.into();
        let bound = pool.queue_size();
        Process {
            name: name.to_string(),
            pool,
            meter: Meter::new(name, bound),
            opts: TaskOptions::default(),
        }
    }

    /// At most `n` items in the stage at once (queued or running); more wait at its door,
    /// each until its deadline.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.meter = Meter::new(&self.meter.path, n);
        self
    }

    /// A timeout and retries for each of the stage's tasks (see [`TaskOptions`]). Each task
    /// also gets its item's deadline (the earlier one, if these options set a deadline too).
    pub fn task_options(mut self, opts: TaskOptions) -> Self {
        self.opts = opts;
        self
    }

    /// The stage's pool.
    pub fn pool(&self) -> &Arc<Pool<W>> {
        &self.pool
    }

    fn task_opts(&self, item: &Item) -> TaskOptions {
        match item.deadline {
            Some(d) => self
                .opts
                .deadline(self.opts.deadline.map_or(d, |o| o.min(d))),
            None => self.opts,
        }
    }

    /// Queues `input` on the pool (waiting for a free slot without blocking the thread).
    async fn submit(
        &self,
        input: W::Task,
        item: &Item,
    ) -> Result<TaskHandle<W::Output>, ServiceError>
    where
        W::Task: Sync,
    {
        self.pool
            .task(&input)
            .options(self.task_opts(item))
            .submit_async()
            .await
            .map_err(|e| self.stage_error(item, e.into(), None))
    }

    /// A task's failure as this stage's (see `Meter::fail`). `owner` is the finished task's
    /// owner word, when it was read: the process that ran the task is named even if it was
    /// replaced since (poisoned, panicked under the restart policy, killed at its timeout),
    /// not its successor. Otherwise the seat's current process.
    fn stage_error(&self, item: &Item, e: TaskError, owner: Option<u32>) -> ServiceError {
        self.meter.fail(item, e, |worker| {
            owner.and_then(|o| self.pool.pid_of_owner(o)).or_else(|| {
                self.pool
                    .worker_pids()
                    .into_iter()
                    .find(|&(i, _)| i == worker)
                    .map(|(_, p)| p)
            })
        })
    }

    /// Awaits a queued task's decoded outcome.
    async fn outcome(
        &self,
        handle: TaskHandle<W::Output>,
        item: &Item,
    ) -> Result<W::Output, ServiceError> {
        handle.finished().await;
        // One load per task; the seats are looked up only for an error.
        let owner = handle.owner();
        handle
            .wait()
            .map_err(|e| self.stage_error(item, e, Some(owner)))
    }

    /// Awaits a queued task's outcome: decoded, or left archived for the next stage when
    /// `archived_out`.
    async fn finish(
        &self,
        handle: TaskHandle<W::Output>,
        item: &Item,
        archived_out: bool,
    ) -> Result<Handoff<W::Output>, ServiceError> {
        if !archived_out {
            return self.outcome(handle, item).await.map(Handoff::Value);
        }
        handle.finished().await;
        match handle.output_len() {
            Some(len) => Ok(Handoff::Archived(Ready::new(handle, len, &self.meter.path))),
            None => {
                let owner = handle.owner();
                let e = handle.wait().err().unwrap_or(TaskError::PoolBroken);
                Err(self.stage_error(item, e, Some(owner)))
            }
        }
    }

    /// This stage taking each task with a payload written in place in the pool's shared
    /// memory ([`WithPayload`]): the input of a service whose requests carry bulk bytes (an
    /// uploaded image, a document), written once, straight from where they arrive into a
    /// [`Loan`] of this stage's pool, and read in place by the worker
    /// ([`TaskContext::payload`](crate::TaskContext::payload)).
    pub fn with_payload(self) -> ProcessWithPayload<W> {
        ProcessWithPayload(self)
    }
}

impl<W: Worker> Stage for Process<W>
where
    W::Task: Sync,
{
    type In = W::Task;
    type Out = W::Output;

    fn run<'a>(&'a self, input: W::Task, item: &'a Item) -> StageFuture<'a, W::Output> {
        Box::pin(self.meter.admit(item, true, async move {
            let handle = self.submit(input, item).await?;
            self.outcome(handle, item).await
        }))
    }

    fn __takes_archived(&self) -> bool {
        true
    }

    fn __run_handoff<'a>(
        &'a self,
        input: Handoff<W::Task>,
        item: &'a Item,
        archived_out: bool,
    ) -> StageFuture<'a, Handoff<W::Output>> {
        // An archived output holds a slot of the previous stage's pool: it may wait here only
        // with a place taken, else (the stage is full) it is decoded first, freeing that slot
        // (a full stage must never wait on slots its own waiters hold, e.g. when both stages
        // share one pool).
        let (input, place) = match input {
            Handoff::Archived(ready) => match self.meter.gate.try_acquire() {
                Some(p) => (Ok(Handoff::Archived(ready)), Some(p)),
                None => (ready.decode().map(Handoff::Value), None),
            },
            v => (Ok(v), None),
        };
        Box::pin(self.meter.admit_with(place, item, true, async move {
            let input = input?;
            let handle = match input {
                Handoff::Value(x) => self.submit(x, item).await?,
                Handoff::Archived(ready) => match self.pool.try_loan(ready.len()) {
                    Ok(mut loan) => {
                        let len = ready.into_loan(&mut loan)?;
                        self.pool
                            .send_placed_async(loan, len, self.task_opts(item))
                            .await
                            .map_err(|e| self.stage_error(item, e.into(), None))?
                    }
                    // No room in the arena right now: decode and queue it the usual way
                    // (which waits for room without blocking the thread).
                    Err(_) => self.submit(ready.decode()?, item).await?,
                },
            };
            self.finish(handle, item, archived_out).await
        }))
    }

    fn attach(&mut self, prefix: &str) {
        self.meter.attach(prefix, &self.name);
    }

    fn report(&self, out: &mut Vec<StageStats>) {
        let mut s = self.meter.stats("process");
        s.live_workers = Some(
            self.pool
                .workers()
                .iter()
                .filter(|w| w.state == WorkerState::Ready)
                .count(),
        );
        s.queued = self.pool.queued();
        let b = self.pool.stats().batching;
        if b.batches > 0 {
            s.batching = Some(b);
        }
        out.push(s);
    }

    fn close(&self, by: Instant) {
        self.pool.close_by(by);
    }

    fn close_now(&self) {
        self.meter.close();
        self.pool.abort();
    }
}

/// A task and its payload: the input of a [`ProcessWithPayload`] stage. The loan must come
/// from that stage's pool ([`Pool::loan`] or [`Pool::try_loan`] on
/// [`Process::pool`]); one from another pool fails the item with
/// [`SubmitError::ForeignLoan`](crate::SubmitError::ForeignLoan).
#[derive(Debug)]
pub struct WithPayload<T> {
    /// The task (archived into the task slot as usual).
    pub task: T,
    /// The bulk bytes, already written in place; the worker reads them as
    /// [`TaskContext::payload`](crate::TaskContext::payload).
    pub payload: Loan,
}

impl<T> WithPayload<T> {
    /// `task` with `payload`.
    pub fn new(task: T, payload: Loan) -> Self {
        WithPayload { task, payload }
    }
}

/// A [`Process`] stage whose items carry a payload in the pool's shared memory (see
/// [`Process::with_payload`]). Everything else (bounds, deadlines, statistics, the zero-copy
/// hand-off of its output to a next process stage) is the process stage's.
pub struct ProcessWithPayload<W: Worker>(Process<W>);

impl<W: Worker> std::fmt::Debug for ProcessWithPayload<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_tuple("ProcessWithPayload").field(&self.0).finish()
    }
}

impl<W: Worker> ProcessWithPayload<W> {
    /// The stage's pool (where the payloads must be loaned).
    pub fn pool(&self) -> &Arc<Pool<W>> {
        &self.0.pool
    }

    /// Queues the task with its payload (waiting for a free slot without blocking the thread).
    async fn submit(
        &self,
        input: WithPayload<W::Task>,
        item: &Item,
    ) -> Result<TaskHandle<W::Output>, ServiceError>
    where
        W::Task: Sync,
    {
        let p = &self.0;
        p.pool
            .task(&input.task)
            .options(p.task_opts(item))
            .payload(input.payload)
            .submit_async()
            .await
            .map_err(|e| p.stage_error(item, e.into(), None))
    }
}

impl<W: Worker> Stage for ProcessWithPayload<W>
where
    W::Task: Sync,
{
    type In = WithPayload<W::Task>;
    type Out = W::Output;

    fn run<'a>(&'a self, input: Self::In, item: &'a Item) -> StageFuture<'a, W::Output> {
        Box::pin(self.0.meter.admit(item, true, async move {
            let handle = self.submit(input, item).await?;
            self.0.outcome(handle, item).await
        }))
    }

    fn __run_handoff<'a>(
        &'a self,
        input: Handoff<Self::In>,
        item: &'a Item,
        archived_out: bool,
    ) -> StageFuture<'a, Handoff<W::Output>> {
        Box::pin(self.0.meter.admit(item, true, async move {
            let handle = self.submit(input.into_value()?, item).await?;
            self.0.finish(handle, item, archived_out).await
        }))
    }

    fn attach(&mut self, prefix: &str) {
        self.0.attach(prefix);
    }

    fn report(&self, out: &mut Vec<StageStats>) {
        self.0.report(out);
    }

    fn close(&self, by: Instant) {
        self.0.close(by);
    }

    fn close_now(&self) {
        self.0.close_now();
    }
}
