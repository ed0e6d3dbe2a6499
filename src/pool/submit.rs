//! Submit requests: [`Submit`] (one task) and [`SubmitBatch`] (many tasks in one slot) carry a
//! task's options (timeout, retries) and payload, and end in one of the verbs every submit has:
//! blocking, non-blocking, bounded wait, async, and the same with the result awaited.
//!
//! | verb | waits for room in the queue | returns |
//! |---|---|---|
//! | `submit()` | as long as it takes | a handle |
//! | `try_submit()` | no: [`SubmitError::QueueFull`] | a handle |
//! | `submit_timeout(d)` | at most `d`: [`SubmitError::Timeout`] | a handle |
//! | `submit_async().await` | without blocking the thread | a handle |
//! | `execute()` / `execute_async().await` | as `submit` / `submit_async` | the result |
//!
//! Every combination of options, payload, batch and verb works. A refused submit fails with a
//! [`SubmitError`]; one that carried a [`Loan`] fails with a [`Rejected`] instead, which hands
//! the loan back.

use super::Pool;
use super::arena::Block;
use super::handle::{BatchHandle, Loan, TaskHandle};
use super::options::TaskOptions;
use crate::codec::sealed::Plain;
use crate::codec::{self, ArchivesAs, Encode};
use crate::error::{Rejected, SubmitError, TaskError};
use crate::worker::Worker;
use std::future::poll_fn;
use std::sync::atomic::Ordering;
use std::task::Poll;
use std::time::{Duration, Instant};

/// The option setters and the three blocking verbs, the same on [`Submit`] and
/// [`SubmitBatch`] (`$what`: "task" or "batch", for the docs; `$handle`: what a verb returns).
macro_rules! request_verbs {
    ($what:literal, $handle:ty) => {
        #[doc = concat!("Limit on the ", $what, "'s execution time, counted from when a worker")]
        /// starts it (past it, the worker is killed and it fails with
        /// [`TaskError::Timeout`]).
        pub fn timeout(mut self, d: Duration) -> Self {
            self.opts = self.opts.timeout(d);
            self
        }

        #[doc = concat!("Times the ", $what, " is re-run if its worker dies while running it")]
        /// (idempotent work only).
        pub fn retries(mut self, n: u32) -> Self {
            self.opts = self.opts.retries(n);
            self
        }

        #[doc = concat!("The latest time a worker may start the ", $what, " (see")]
        /// [`TaskOptions::deadline`]).
        pub fn deadline(mut self, at: Instant) -> Self {
            self.opts = self.opts.deadline(at);
            self
        }

        #[doc = concat!("All the ", $what, "'s options at once (replacing any set before).")]
        pub fn options(mut self, opts: TaskOptions) -> Self {
            self.opts = opts;
            self
        }

        #[doc = concat!("Queues the ", $what, ", waiting for room as long as it takes.")]
        pub fn submit(self) -> Result<$handle, P::Error> {
            self.send(Block::Until(None))
        }

        #[doc = concat!("Queues the ", $what, ", or fails at once with")]
        /// [`SubmitError::QueueFull`].
        pub fn try_submit(self) -> Result<$handle, P::Error> {
            self.send(Block::No)
        }

        #[doc = concat!("Queues the ", $what, ", waiting at most `wait` for room")]
        /// ([`SubmitError::Timeout`]); a `wait` too long for an `Instant` (`Duration::MAX`)
        /// waits as long as it takes.
        pub fn submit_timeout(self, wait: Duration) -> Result<$handle, P::Error> {
            self.send(Block::Until(crate::deadline::after(wait)))
        }
    };
}

/// A task about to be submitted, with its options: made by [`Pool::task`], configured with
/// [`timeout`](Self::timeout), [`retries`](Self::retries), [`options`](Self::options) and
/// [`payload`](Self::payload), sent by one of its verbs.
///
/// ```no_run
/// # use stateful_pool::{Pool, FnWorker};
/// # use std::time::Duration;
/// # stateful_pool::task_fn! { fn Len(s: String, _ctx) -> u64 { Ok(s.as_str().len() as u64) } }
/// # fn demo(pool: &Pool<FnWorker<Len>>) -> Result<(), Box<dyn std::error::Error>> {
/// let mut loan = pool.loan(4)?;
/// loan.as_mut_slice().copy_from_slice(b"data");
/// let handle = pool
///     .task("resize")                    // a &str for a String task
///     .timeout(Duration::from_secs(5))   // execution limit
///     .retries(2)                        // re-run if its worker dies
///     .payload(loan)                     // read in place by the worker
///     .try_submit()?;                    // or submit / submit_timeout / submit_async / execute…
/// let n = handle.wait()?;
/// # let _ = n; Ok(()) }
/// ```
///
/// Without a payload the verbs fail with a [`SubmitError`]; with one, with a [`Rejected`]
/// that hands the loan back (it converts into `SubmitError` with `?`).
#[must_use = "a Submit does nothing until one of its verbs (submit, try_submit, …) is called"]
pub struct Submit<'p, 'a, W: Worker, A: ?Sized, P: Payload = NoPayload> {
    pool: &'p Pool<W>,
    task: &'a A,
    opts: TaskOptions,
    payload: P,
}

/// Whether a request carries a [`Loan`]: [`NoPayload`], or a `Loan`. It decides the error
/// type of the request's verbs ([`SubmitError`], or [`Rejected`] with the loan handed back).
/// Sealed.
pub trait Payload: sealed::Sealed + std::fmt::Debug {
    /// What a refused submit returns.
    type Error: Into<SubmitError> + Into<TaskError> + std::error::Error;
}

/// A request without a payload (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct NoPayload;

impl Payload for NoPayload {
    type Error = SubmitError;
}

impl Payload for Loan {
    type Error = Rejected;
}

mod sealed {
    use super::*;

    pub trait Sealed {
        fn into_loan(self) -> Option<Loan>;
        fn refused(error: SubmitError, loan: Option<Loan>) -> <Self as Payload>::Error
        where
            Self: Payload;
    }

    impl Sealed for NoPayload {
        fn into_loan(self) -> Option<Loan> {
            None
        }
        fn refused(error: SubmitError, _: Option<Loan>) -> SubmitError {
            error
        }
    }

    impl Sealed for Loan {
        fn into_loan(self) -> Option<Loan> {
            Some(self)
        }
        fn refused(error: SubmitError, loan: Option<Loan>) -> Rejected {
            Rejected { error, loan }
        }
    }
}

impl<W: Worker, A: ?Sized, P: Payload> std::fmt::Debug for Submit<'_, '_, W, A, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Submit")
            .field("options", &self.opts)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

impl<'p, 'a, W: Worker, A: ?Sized + ArchivesAs<W::Task>> Submit<'p, 'a, W, A> {
    pub(crate) fn new(pool: &'p Pool<W>, task: &'a A) -> Self {
        Submit {
            pool,
            task,
            opts: TaskOptions::default(),
            payload: NoPayload,
        }
    }

    /// Sends a loaned buffer with the task; the worker reads it in place as
    /// [`TaskContext::payload`](crate::TaskContext::payload). If the submit is refused, the
    /// loan comes back in the [`Rejected`] error.
    pub fn payload(self, loan: Loan) -> Submit<'p, 'a, W, A, Loan> {
        Submit {
            pool: self.pool,
            task: self.task,
            opts: self.opts,
            payload: loan,
        }
    }
}

impl<'p, 'a, W: Worker, A: ?Sized + ArchivesAs<W::Task>, P: Payload> Submit<'p, 'a, W, A, P> {
    request_verbs!("task", TaskHandle<W::Output>);

    /// Queues the task without blocking the thread: if the queue is full, the future waits
    /// for room. Works on any executor.
    pub async fn submit_async(self) -> Result<TaskHandle<W::Output>, P::Error> {
        let Submit {
            pool,
            task,
            opts,
            payload,
        } = self;
        let mut payload = payload.into_loan();
        let enc = task.enc();
        let r = pool.send_async(&enc, &mut payload, opts).await;
        finish::<W, P, _>(pool, r, payload, TaskHandle::new)
    }

    /// Runs the task and blocks for its result.
    pub fn execute(self) -> Result<W::Output, TaskError> {
        // What `submit()?.wait()` does, without the handle: the caller blocks right here until
        // the task finishes, so nothing can drop or cancel it in between, and the pool's
        // reference count is left alone (two atomic read-modify-writes per task).
        let shared = &self.pool.shared;
        let (slot, task_id) = self
            .queue(Block::Until(None))
            .map_err(Into::<TaskError>::into)?;
        shared.wait_collect(slot, task_id, None)?;
        shared.take_result(slot)
    }

    /// Runs the task and resolves to its result, without blocking the thread.
    pub async fn execute_async(self) -> Result<W::Output, TaskError> {
        self.submit_async()
            .await
            .map_err(Into::<TaskError>::into)?
            .await
    }

    fn send(self, block: Block) -> Result<TaskHandle<W::Output>, P::Error> {
        let shared = &self.pool.shared;
        self.queue(block)
            .map(|(slot, id)| TaskHandle::new(shared.clone(), slot, id))
    }

    /// Queues the task: its slot and task id, or the refusal (with the loan handed back).
    fn queue(self, block: Block) -> Result<(u32, u64), P::Error> {
        let mut payload = self.payload.into_loan();
        self.pool
            .send(&self.task.enc(), &mut payload, block, self.opts)
            .map_err(|e| P::refused(e, payload))
    }
}

/// Many tasks to be submitted as one batch (one slot, one hand-off, one answer holding each
/// task's outcome): made by [`Pool::batch`], with the same options and verbs as [`Submit`].
/// The batch counts as one task for the timeout, retries (the whole batch re-runs) and
/// cancellation; its payload, if any, is seen by each of its tasks.
#[must_use = "a SubmitBatch does nothing until one of its verbs (submit, try_submit, …) is called"]
pub struct SubmitBatch<'p, 'a, W: Worker, T, P: Payload = NoPayload> {
    pool: &'p Pool<W>,
    tasks: &'a [T],
    opts: TaskOptions,
    payload: P,
}

impl<W: Worker, T, P: Payload> std::fmt::Debug for SubmitBatch<'_, '_, W, T, P> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SubmitBatch")
            .field("len", &self.tasks.len())
            .field("options", &self.opts)
            .field("payload", &self.payload)
            .finish_non_exhaustive()
    }
}

/// What one batch's outcome is: each task's, in order; the outer error is the batch's as a
/// whole.
pub(crate) type BatchResult<O> = Result<Vec<Result<O, TaskError>>, TaskError>;

impl<'p, 'a, W: Worker, T: ArchivesAs<W::Task>> SubmitBatch<'p, 'a, W, T> {
    pub(crate) fn new(pool: &'p Pool<W>, tasks: &'a [T]) -> Self {
        SubmitBatch {
            pool,
            tasks,
            opts: TaskOptions::default(),
            payload: NoPayload,
        }
    }

    /// Sends a loaned buffer with the batch; each of its tasks sees it as
    /// [`TaskContext::payload`](crate::TaskContext::payload). If the submit is refused, the
    /// loan comes back in the [`Rejected`] error.
    pub fn payload(self, loan: Loan) -> SubmitBatch<'p, 'a, W, T, Loan> {
        SubmitBatch {
            pool: self.pool,
            tasks: self.tasks,
            opts: self.opts,
            payload: loan,
        }
    }
}

impl<'p, 'a, W: Worker, T: ArchivesAs<W::Task>, P: Payload> SubmitBatch<'p, 'a, W, T, P> {
    request_verbs!("batch", BatchHandle<W::Output>);

    /// Queues the batch without blocking the thread.
    pub async fn submit_async(self) -> Result<BatchHandle<W::Output>, P::Error> {
        let len = self.tasks.len();
        let SubmitBatch {
            pool,
            tasks,
            mut opts,
            payload,
        } = self;
        let mut payload = payload.into_loan();
        opts.batch = true;
        let enc = codec::batch_of::<W::Task, T>(tasks.iter());
        let r = pool.send_async(&enc, &mut payload, opts).await;
        finish::<W, P, _>(pool, r, payload, |s, slot, id| {
            BatchHandle::new(TaskHandle::new(s, slot, id), len)
        })
    }

    /// Runs the batch and blocks for every outcome, in order.
    pub fn execute(self) -> BatchResult<W::Output> {
        self.submit().map_err(Into::<TaskError>::into)?.wait()
    }

    /// Runs the batch and resolves to every outcome, in order, without blocking the thread.
    pub async fn execute_async(self) -> BatchResult<W::Output> {
        self.submit_async()
            .await
            .map_err(Into::<TaskError>::into)?
            .await
    }

    fn send(self, block: Block) -> Result<BatchHandle<W::Output>, P::Error> {
        let len = self.tasks.len();
        let mut opts = self.opts;
        opts.batch = true;
        let mut payload = self.payload.into_loan();
        let enc = codec::batch_of::<W::Task, T>(self.tasks.iter());
        let r = self.pool.send(&enc, &mut payload, block, opts);
        finish::<W, P, _>(self.pool, r, payload, |s, slot, id| {
            BatchHandle::new(TaskHandle::new(s, slot, id), len)
        })
    }
}

/// Wraps a submit's outcome: a handle made by `make`, or the error (with the loan handed
/// back, if the request had one).
fn finish<W: Worker, P: Payload, H>(
    pool: &Pool<W>,
    r: Result<(u32, u64), SubmitError>,
    payload: Option<Loan>,
    make: impl FnOnce(std::sync::Arc<super::shared::Shared>, u32, u64) -> H,
) -> Result<H, P::Error> {
    match r {
        Ok((slot, id)) => Ok(make(pool.shared.clone(), slot, id)),
        Err(error) => Err(P::refused(error, payload)),
    }
}

impl<W: Worker> Pool<W> {
    /// Queues an encoded task. The loan in `payload` passes to the slot only if the submit
    /// succeeds (it is taken out of the option then); on an error it stays with the caller.
    pub(crate) fn send<E: Encode + Plain>(
        &self,
        task: &E,
        payload: &mut Option<Loan>,
        block: Block,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        if let Some(l) = payload.as_ref() {
            if l.shared.id != self.shared.id {
                return Err(SubmitError::ForeignLoan);
            }
        }
        let parts = payload.as_ref().map(|l| (l.off, l.len, l.blk));
        let r = self.shared.submit_with(task, parts, block, opts)?;
        if let Some(l) = payload.take() {
            let _ = l.into_parts();
        }
        Ok(r)
    }

    /// Queues a task whose archive the caller wrote into `loan` (its first `len` bytes), as
    /// the task itself rather than a payload; waits for a free slot without blocking the
    /// thread. The worker validates the archive as it does every task. On an error the loan
    /// is dropped (its block freed).
    pub(crate) async fn send_placed_async(
        &self,
        loan: Loan,
        len: usize,
        opts: TaskOptions,
    ) -> Result<TaskHandle<W::Output>, SubmitError> {
        if loan.shared.id != self.shared.id {
            return Err(SubmitError::ForeignLoan);
        }
        let parts = (loan.off, (len as u64).min(loan.len), loan.blk);
        let (slot, id) = self
            .until_slot(|| self.shared.submit_placed(parts, Block::No, opts))
            .await?;
        let _ = loan.into_parts();
        Ok(TaskHandle::new(self.shared.clone(), slot, id))
    }

    /// As [`send`](Self::send) without blocking the thread: while the queue is full, the
    /// future waits for a slot to free up.
    async fn send_async<E: Encode + Plain>(
        &self,
        task: &E,
        payload: &mut Option<Loan>,
        opts: TaskOptions,
    ) -> Result<(u32, u64), SubmitError> {
        self.until_slot(|| self.send(task, payload, Block::No, opts))
            .await
    }

    /// Repeats a non-blocking submit attempt while the queue is full, waiting (without
    /// blocking the thread) for a slot to free up between attempts.
    async fn until_slot(
        &self,
        mut attempt: impl FnMut() -> Result<(u32, u64), SubmitError>,
    ) -> Result<(u32, u64), SubmitError> {
        poll_fn(|cx| match attempt() {
            Err(SubmitError::QueueFull) => {
                self.shared.wait_slot_async(cx.waker());
                if self.shared.has_free_slot() || self.shared.closing.load(Ordering::SeqCst) {
                    cx.waker().wake_by_ref();
                }
                Poll::Pending
            }
            other => Poll::Ready(other),
        })
        .await
    }
}
