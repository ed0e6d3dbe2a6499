//! Handles on work in flight: [`TaskHandle`] (wait, wait with a timeout, try, or `.await`),
//! [`ResultRef`] (a result read in place), [`SpawnHandle`], and [`Loan`] (a payload buffer in
//! shared memory). None of them needs a particular async runtime: futures are woken by the
//! pool's own reactor thread.

use super::shared::Shared;
use crate::codec::{self, Message};
use crate::error::{SpawnError, TaskError, WaitTimeoutError};
use crate::slot::outcome::{KIND_CANCELLED, KIND_PANIC, KIND_POISONED};
use std::future::Future;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

/// A submitted task. Collect its result with [`wait`](Self::wait),
/// [`wait_timeout`](Self::wait_timeout) (and [`try_wait`](Self::try_wait), its zero-timeout
/// form), by `.await`ing it, or in place with [`wait_ref`](Self::wait_ref). To wait for many
/// tasks from an event loop that is not a Rust executor, see
/// [`wake_when_finished`](Self::wake_when_finished).
///
/// Dropping a handle without collecting cancels the task if no worker has started it (it will
/// never run); if it already started, its result is discarded and its slot reclaimed.
#[must_use = "dropping a TaskHandle cancels the task if it has not started"]
#[derive(Debug)]
pub struct TaskHandle<T: Message> {
    shared: Arc<Shared>,
    slot: u32,
    task_id: u64,
    taken: bool,
    _t: PhantomData<fn() -> T>,
}

impl<T: Message> TaskHandle<T> {
    pub(crate) fn new(shared: Arc<Shared>, slot: u32, task_id: u64) -> Self {
        TaskHandle {
            shared,
            slot,
            task_id,
            taken: false,
            _t: PhantomData,
        }
    }

    /// The task's slot (crate-internal).
    pub(crate) fn slot(&self) -> u32 {
        self.slot
    }

    /// The task's pool-unique id (as [`TaskContext::task_id`](crate::TaskContext::task_id)
    /// shows it to the worker): never reused, not consecutive.
    pub fn task_id(&self) -> u64 {
        self.task_id
    }

    /// Whether the result is ready (collecting it will not block): the task is done, or no
    /// worker has claimed it and it was [cancelled](Self::cancel) or its
    /// [deadline](crate::TaskOptions::deadline) has passed (collecting then answers
    /// [`TaskError::Cancelled`] or [`TaskError::Timeout`] at once).
    pub fn is_finished(&self) -> bool {
        self.taken || self.shared.is_done(self.slot) || self.shared.settled_early(self.slot)
    }

    /// Asks that the task not run: if no worker has started it yet, it never runs and
    /// completes with [`TaskError::Cancelled`] at once (collecting it does not wait for a
    /// worker to reach it); if one already has, it runs to completion and its outcome is
    /// delivered as usual (except that it is not retried: should its worker die, the outcome
    /// is `Cancelled`). The handle stays valid either way: wait on it to see which happened.
    /// Dropping the handle cancels too, but discards the outcome. (A cancelled task's slot
    /// is reclaimed once it leaves the queue: the supervisor takes cancelled tasks off its
    /// head, and a worker skips those it reaches.)
    pub fn cancel(&self) {
        // After a `.await` through `&mut` answered, the slot may hold another task already.
        if !self.taken {
            self.shared.cancel(self.slot);
        }
    }

    /// Asks the pool to wake `waker` once the task finishes, without collecting anything;
    /// returns `true` if it has already finished (then the result can be collected at once).
    /// "Finishes" is [`is_finished`](Self::is_finished)'s: the task is done, or it is
    /// [cancelled](Self::cancel) before any worker claimed it (the cancel wakes the waker),
    /// or its [deadline](crate::TaskOptions::deadline) passed before any worker claimed it
    /// (woken at the deadline, within a millisecond or so; a task claimed in time wakes it
    /// when done). One waker per handle: a later call replaces an earlier one,
    /// as with [`Future::poll`]. The waker is called from the pool's reactor thread, so it
    /// must be cheap and must not block (push to a queue, write to an eventfd, …).
    ///
    /// This is how an event loop that is not a Rust executor (epoll, libuv, asio, the C ABI's
    /// completion queue) waits for many tasks with no thread parked per task.
    pub fn wake_when_finished(&self, waker: &Waker) -> bool {
        // Settled before the registration: nothing to register (settling wakes and drops
        // the waker, so a later completion must not find one). Settled after it: the settle
        // woke it, or will, and the look after says so.
        self.taken
            || self.shared.settled_early(self.slot)
            || self.shared.register_waker(self.slot, self.task_id, waker)
            || self.shared.settled_early(self.slot)
    }

    /// For the C ABI, not an API: blocks until the task finishes or `timeout` passes, without
    /// collecting and without touching the handle's registered waker (a C event loop's
    /// completion-queue registration must survive a bounded look). Whether it finished.
    #[doc(hidden)]
    pub fn __finished_within(&self, timeout: Duration) -> bool {
        self.shared
            .wait_settled(self.slot, crate::deadline::after(timeout))
    }

    /// The finished task's owner word: which launch of which seat claimed it (one load; see
    /// `Shared::pid_of_owner`, which turns it into a process id when one is wanted).
    pub(crate) fn owner(&self) -> u32 {
        self.shared
            .slot(self.slot)
            .owner
            .load(std::sync::atomic::Ordering::Relaxed)
    }

    /// Resolves once the task is done (published, not merely past its deadline), without
    /// collecting its result (any executor).
    pub(crate) async fn finished(&self) {
        std::future::poll_fn(|cx| {
            if self
                .shared
                .register_waker(self.slot, self.task_id, cx.waker())
            {
                std::task::Poll::Ready(())
            } else {
                std::task::Poll::Pending
            }
        })
        .await
    }

    /// The length of the finished task's output archive, or `None` if it ended in an error.
    pub(crate) fn output_len(&self) -> Option<usize> {
        self.shared.ok_len(self.slot)
    }

    /// Copies the finished task's output archive into `loan` (another pool's arena, where
    /// that pool's worker validates it as its task) and frees the slot. Returns its length.
    pub(crate) fn output_into(mut self, loan: &mut Loan) -> Result<usize, TaskError> {
        self.taken = true;
        let dst = loan.as_mut_slice();
        // SAFETY: the loan's block is ours alone until it is submitted; `dst.len()` bytes of
        // it are writable, and nothing reads them until this returns.
        let r = unsafe {
            self.shared
                .copy_output_into(self.slot, dst.as_mut_ptr(), dst.len())
        };
        let worker = self.shared.slot(self.slot).outcome().worker as usize;
        self.shared.retire(self.slot);
        r.map_err(|m| TaskError::BadResult {
            worker,
            message: m.to_string(),
        })
    }

    /// Blocks until the task finishes (or is answered at its deadline), without collecting.
    pub(crate) fn block_until_done(&self) {
        self.shared.wait_settled(self.slot, None);
    }

    /// Waits for the task until `until`: whether it finished (`Ok(false)`: not yet). A task
    /// whose deadline passed before a worker claimed it is answered here, at the deadline
    /// (`Err`, the handle spent).
    fn wait_until(&mut self, until: Option<std::time::Instant>) -> Result<bool, TaskError> {
        self.shared
            .wait_collect(self.slot, self.task_id, until)
            .inspect_err(|_| self.taken = true)
    }

    /// Blocks until the task finishes and returns its result. A task with a
    /// [deadline](crate::TaskOptions::deadline) that no worker has claimed by then is answered
    /// [`TaskError::Timeout`] at the deadline (it never runs).
    pub fn wait(mut self) -> Result<T, TaskError> {
        self.wait_until(None)?;
        self.take()
    }

    /// Waits at most `timeout` for the result. If the task has not finished by then, the
    /// handle comes back in [`WaitTimeoutError::Timeout`], to wait again (or drop to cancel);
    /// a task that finished without a value gives [`WaitTimeoutError::Task`] (as does one
    /// whose deadline passed before a worker claimed it: see [`wait`](Self::wait)).
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<T, WaitTimeoutError<Self>> {
        if self.wait_until(crate::deadline::after(timeout))? {
            Ok(self.take()?)
        } else {
            Err(WaitTimeoutError::Timeout(self))
        }
    }

    /// The result if the task has finished, without waiting: the same as
    /// [`wait_timeout`](Self::wait_timeout) with a zero timeout.
    pub fn try_wait(mut self) -> Result<T, WaitTimeoutError<Self>> {
        if let Some(e) = self.settled() {
            Err(WaitTimeoutError::Task(e))
        } else if self.shared.is_done(self.slot) {
            Ok(self.take()?)
        } else {
            Err(WaitTimeoutError::Timeout(self))
        }
    }

    /// The task's answer if it is settled without a worker (cancelled before any worker
    /// claimed it, or past its deadline with no worker on it): the slot goes to the reactor,
    /// the handle is spent.
    fn settled(&mut self) -> Option<TaskError> {
        let e = self.shared.try_settle(self.slot, self.task_id)?;
        self.taken = true;
        Some(e)
    }

    /// Blocks until the task finishes and returns its result as a validated archive, without
    /// deserialising it: a [`ResultRef`] derefs to `T`'s archived form. The archive is a
    /// private copy of what the worker wrote (one memcpy): the parent never reads a result in
    /// memory a worker can still write, so nothing a worker does after publishing can change
    /// it. The task's slot is free again as soon as this returns.
    pub fn wait_ref(mut self) -> Result<ResultRef<T>, TaskError> {
        self.wait_until(None)?;
        self.taken = true;
        let r = self.shared.with_result(self.slot, |bytes| {
            let bytes = bytes?;
            let worker = self.shared.slot(self.slot).outcome().worker as usize;
            codec::access::<T>(bytes)
                .map_err(|message| TaskError::BadResult { worker, message })?;
            let mut buf = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
            buf.extend_from_slice(bytes);
            Ok(ResultRef {
                buf,
                _t: PhantomData,
            })
        });
        self.shared.retire(self.slot);
        r
    }

    fn take(&mut self) -> Result<T, TaskError> {
        debug_assert!(!self.taken);
        self.taken = true;
        self.shared.take_result(self.slot)
    }
}

impl Shared {
    /// Decodes the outcome of the finished task in `slot` and retires the slot: what
    /// collecting a handle does, also called by `execute` for the handle it never builds.
    pub(crate) fn take_result<T: Message>(&self, slot: u32) -> Result<T, TaskError> {
        let r = self.with_result(slot, |bytes| {
            codec::decode::<T>(bytes?).map_err(|message| TaskError::BadResult {
                worker: self.slot(slot).outcome().worker as usize,
                message,
            })
        });
        self.retire(slot);
        r
    }
}

impl<T: Message> Future for TaskHandle<T> {
    type Output = Result<T, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        assert!(!this.taken, "TaskHandle polled after it completed");
        // A settled answer first (cancelled or expired with no worker on it): a worker that
        // pops the task later publishes `Cancelled`, which is not what the caller is told.
        if let Some(e) = this.settled() {
            return Poll::Ready(Err(e));
        }
        if this.shared.is_done(this.slot)
            || this
                .shared
                .register_waker(this.slot, this.task_id, cx.waker())
        {
            return Poll::Ready(this.take());
        }
        // The reactor wakes us at the task's deadline: answered then if no worker has it.
        match this.settled() {
            Some(e) => Poll::Ready(Err(e)),
            None => Poll::Pending,
        }
    }
}

impl<T: Message> Drop for TaskHandle<T> {
    fn drop(&mut self) {
        if !self.taken {
            self.shared.detach(self.slot, self.task_id);
        }
    }
}

/// A task's result as a validated archive (see [`TaskHandle::wait_ref`]): derefs to the
/// archived output, read without deserialising. It owns its bytes (a private copy of the
/// worker's), so it can be kept as long as you like.
#[derive(Debug)]
pub struct ResultRef<T: Message> {
    buf: rkyv::util::AlignedVec<16>,
    _t: PhantomData<fn() -> T>,
}

impl<T: Message> ResultRef<T> {
    /// The raw archive bytes.
    pub fn bytes(&self) -> &[u8] {
        &self.buf
    }

    /// Deserialises the archived output into an owned value.
    pub fn to_owned(&self) -> Result<T, TaskError> {
        codec::decode::<T>(&self.buf).map_err(|message| TaskError::BadResult {
            worker: usize::MAX,
            message,
        })
    }
}

impl<T: Message> std::ops::Deref for ResultRef<T> {
    type Target = T::Archived;
    fn deref(&self) -> &T::Archived {
        // SAFETY: the bytes were validated as `T::Archived` when the ResultRef was made, and
        // they are private memory that nothing can change since (the ResultRef owns them).
        unsafe { rkyv::access_unchecked::<T::Archived>(&self.buf) }
    }
}

/// How a spawn ended, as the supervisor reports it.
#[derive(Debug)]
pub(crate) enum SpawnOutcome {
    /// Ready: the spawn output's archive bytes.
    Ready(Vec<u8>),
    Failed(SpawnError),
}

/// A one-shot cell the supervisor fills when a spawn ends.
#[derive(Debug, Default)]
pub(crate) struct SpawnReply {
    state: Mutex<(Option<SpawnOutcome>, Option<Waker>)>,
    cv: Condvar,
}

impl SpawnReply {
    pub(crate) fn complete(&self, o: SpawnOutcome) {
        let waker = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.0 = Some(o);
            s.1.take()
        };
        self.cv.notify_all();
        if let Some(w) = waker {
            w.wake();
        }
    }
}

/// A worker being spawned. [`wait`](Self::wait) for (or `.await`) the value its spawn step
/// returned.
#[must_use = "a SpawnHandle carries the spawn step's outcome"]
#[derive(Debug)]
pub struct SpawnHandle<O: Message> {
    pub(crate) reply: Arc<SpawnReply>,
    pub(crate) seat: usize,
    pub(crate) _o: PhantomData<fn() -> O>,
}

impl<O: Message> SpawnHandle<O> {
    /// The seat index of the worker being spawned.
    pub fn worker_index(&self) -> usize {
        self.seat
    }

    /// Blocks until the worker is ready and returns its spawn output.
    pub fn wait(self) -> Result<O, SpawnError> {
        let mut s = self.reply.state.lock().unwrap_or_else(|e| e.into_inner());
        loop {
            if let Some(o) = s.0.take() {
                drop(s);
                return self.finish(o);
            }
            s = self.reply.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn finish(&self, o: SpawnOutcome) -> Result<O, SpawnError> {
        match o {
            SpawnOutcome::Ready(bytes) => {
                // Copy into 16-aligned memory: a Vec<u8> is only 1-aligned.
                let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
                aligned.extend_from_slice(&bytes);
                codec::decode::<O>(&aligned).map_err(|message| SpawnError::BadOutput {
                    worker: self.seat,
                    message,
                })
            }
            SpawnOutcome::Failed(e) => Err(e),
        }
    }
}

impl<O: Message> Future for SpawnHandle<O> {
    type Output = Result<O, SpawnError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let mut s = this.reply.state.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(o) = s.0.take() {
            drop(s);
            return Poll::Ready(this.finish(o));
        }
        s.1 = Some(cx.waker().clone());
        Poll::Pending
    }
}

/// A writable buffer in the pool's shared memory, to be sent with a task as its payload
/// ([`Submit::payload`](crate::Submit::payload)): the caller writes the data
/// once, in place, and the worker reads it in place
/// ([`TaskContext::payload`](crate::TaskContext::payload)). Zero copies.
///
/// The buffer is 64-byte aligned. Its initial contents are unspecified (earlier data or zeros).
/// Dropping an unsent loan returns its space.
#[must_use = "dropping a Loan returns its buffer unsent"]
#[derive(Debug)]
pub struct Loan {
    pub(crate) shared: Arc<Shared>,
    pub(crate) off: u64,
    pub(crate) len: u64,
    pub(crate) blk: u64,
    pub(crate) sent: bool,
}

impl Loan {
    /// Length of the buffer in bytes (as requested).
    pub fn len(&self) -> usize {
        self.len as usize
    }

    /// Whether the buffer is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The buffer, to fill.
    pub fn as_mut_slice(&mut self) -> &mut [u8] {
        let p = self
            .shared
            .seg
            .bytes_ptr(self.off as usize, self.len as usize);
        // SAFETY: the arena block belongs to this loan alone until it is submitted (which
        // consumes the loan) or dropped; no honest worker touches it before the submit
        // publishes it; u8 has no invalid values. (A hostile worker can write anywhere in the
        // mapping, this block included: the trust model, ARCHITECTURE.md, gives up the
        // correctness of data in flight against such a worker, and bytes are all valid `u8`s,
        // so what it can change is the payload's content, not the parent's memory safety.)
        unsafe { std::slice::from_raw_parts_mut(p, self.len as usize) }
    }

    /// Fills the buffer with `src`, as the pool's own copying submit copies a task: a copy of
    /// several MiB uses non-temporal stores, which skip reading the destination into the cache
    /// first (W3's copying submit at 16 MiB: 1.18× a `memcpy`, against 0.93× without;
    /// ARCHITECTURE.md, *Copies into shared memory*). A smaller copy is a plain `memcpy`.
    ///
    /// # Panics
    /// If `src.len()` differs from [`len`](Self::len), as [`slice::copy_from_slice`] does.
    pub fn copy_from_slice(&mut self, src: &[u8]) {
        assert_eq!(
            src.len(),
            self.len(),
            "Loan::copy_from_slice: source length differs from the loan's"
        );
        let dst = self.as_mut_slice();
        // SAFETY: `dst` is this loan's block, `src.len()` bytes long and writable (see
        // `as_mut_slice`). `src` cannot overlap it: an unsent loan's block is its alone (no
        // other loan, task or result uses those bytes), and the only views into it borrow the
        // loan (`as_slice`, `as_mut_slice`), which `&mut self` rules out while `src` lives.
        unsafe { crate::shm::copy::copy_into(src, dst.as_mut_ptr()) };
    }

    /// The buffer, to read back.
    pub fn as_slice(&self) -> &[u8] {
        let p = self
            .shared
            .seg
            .bytes_ptr(self.off as usize, self.len as usize);
        // SAFETY: as in `as_mut_slice`.
        unsafe { std::slice::from_raw_parts(p, self.len as usize) }
    }

    /// Hands the block over to a submitted task (which frees it when retired).
    pub(crate) fn into_parts(mut self) -> (u64, u64, u64) {
        self.sent = true;
        (self.off, self.len, self.blk)
    }
}

impl Drop for Loan {
    fn drop(&mut self) {
        if !self.sent {
            self.shared.arena.free(self.off, self.blk);
            // An async submit that found the arena full waits on the slot waiters: the
            // space is back, let it try again.
            self.shared.wake_submitters();
        }
    }
}

/// A submitted batch ([`Pool::batch`](crate::Pool::batch)): many tasks in one
/// slot, run one after the other by one worker, answered together. Collect with
/// [`wait`](Self::wait) (or `.await`): the outer `Result` is the batch's fate as a whole (its
/// worker died, it timed out, it was cancelled, it could not be read); inside, each task's own
/// outcome, in order.
///
/// Dropping it cancels the batch if no worker has started it.
#[must_use = "dropping a BatchHandle cancels the batch if it has not started"]
#[derive(Debug)]
pub struct BatchHandle<O: Message> {
    pub(crate) inner: TaskHandle<codec::BatchOut<O>>,
    pub(crate) len: usize,
}

/// Each task's outcome in a finished batch.
fn unbatch<O: Message>(
    r: Result<codec::BatchOut<O>, TaskError>,
    len: usize,
) -> Result<Vec<Result<O, TaskError>>, TaskError> {
    let (worker, outs) = r?;
    let worker = worker as usize;
    if outs.len() != len {
        return Err(TaskError::BadResult {
            worker,
            message: format!("{} outcomes for a batch of {len} tasks", outs.len()),
        });
    }
    Ok(outs
        .into_iter()
        .map(|x| {
            x.map_err(|(kind, message)| match kind {
                KIND_PANIC => TaskError::panicked(worker, message),
                KIND_POISONED => TaskError::Poisoned { worker, message },
                KIND_CANCELLED => TaskError::Cancelled,
                _ => TaskError::Failed { worker, message },
            })
        })
        .collect())
}

impl<O: Message> BatchHandle<O> {
    pub(crate) fn new(inner: TaskHandle<codec::BatchOut<O>>, len: usize) -> Self {
        BatchHandle { inner, len }
    }

    /// How many tasks the batch holds.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether the batch is empty.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The batch's pool-unique id (one id for the whole batch).
    pub fn task_id(&self) -> u64 {
        self.inner.task_id()
    }

    /// Whether the whole batch has finished.
    pub fn is_finished(&self) -> bool {
        self.inner.is_finished()
    }

    /// Asks the pool to wake `waker` once the whole batch finishes, without collecting; `true`
    /// if it already has (see [`TaskHandle::wake_when_finished`]).
    pub fn wake_when_finished(&self, waker: &Waker) -> bool {
        self.inner.wake_when_finished(waker)
    }

    /// Asks that the batch not run if no worker has started it (see [`TaskHandle::cancel`]).
    pub fn cancel(&self) {
        self.inner.cancel()
    }

    /// Blocks until the batch finishes; each task's outcome in order.
    pub fn wait(self) -> Result<Vec<Result<O, TaskError>>, TaskError> {
        let len = self.len;
        unbatch(self.inner.wait(), len)
    }

    /// Waits at most `timeout` for the batch (the shape of
    /// [`TaskHandle::wait_timeout`]): each task's outcome in order, or the handle back in
    /// [`WaitTimeoutError::Timeout`].
    pub fn wait_timeout(
        self,
        timeout: Duration,
    ) -> Result<Vec<Result<O, TaskError>>, WaitTimeoutError<Self>> {
        let len = self.len;
        match self.inner.wait_timeout(timeout) {
            Ok(r) => Ok(unbatch(Ok(r), len)?),
            Err(WaitTimeoutError::Timeout(inner)) => {
                Err(WaitTimeoutError::Timeout(BatchHandle { inner, len }))
            }
            Err(WaitTimeoutError::Task(e)) => Err(WaitTimeoutError::Task(e)),
        }
    }

    /// The outcomes if the batch has finished, without waiting (a zero-timeout
    /// [`wait_timeout`](Self::wait_timeout)).
    pub fn try_wait(self) -> Result<Vec<Result<O, TaskError>>, WaitTimeoutError<Self>> {
        if !self.inner.is_finished() {
            return Err(WaitTimeoutError::Timeout(self));
        }
        self.wait_timeout(Duration::ZERO)
    }
}

impl<O: Message> Future for BatchHandle<O> {
    type Output = Result<Vec<Result<O, TaskError>>, TaskError>;

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let this = self.get_mut();
        let len = this.len;
        Pin::new(&mut this.inner).poll(cx).map(|r| unbatch(r, len))
    }
}
