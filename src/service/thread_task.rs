//! A thread stage's task handle ([`ThreadTask`]) and its lazy map ([`ThreadMap`]): the
//! pool's task API on [`Threads`].

use super::exec::block_on_until;
use super::thread::Call;
use super::thread::Threads;
use super::timer::Sleep;
use crate::MapError;
use crate::codec::ArchivesAs;
use crate::error::{TaskError, WaitTimeoutError};
use crate::slot::bits;
use crate::worker::Worker;
use std::collections::VecDeque;
use std::future::Future;
use std::pin::Pin;
use std::sync::atomic::{AtomicU8, Ordering};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

/// A task queued on a thread stage ([`Threads::submit`]): wait for its outcome (blocking,
/// bounded, or at once), `.await` it (it is a [`Future`]), or cancel it. Dropping it cancels
/// the task if no thread has taken it.
#[must_use = "dropping a handle cancels its task unless a thread has taken it"]
pub struct ThreadTask<O> {
    call: Call<O>,
    /// The answer this handle settled itself, before any thread's claim (the task then
    /// never runs): `CANCELLED` by its cancel, `EXPIRED` at its deadline; 0 for none.
    settled: AtomicU8,
    /// The task's deadline, while no thread has claimed it (see `Threads::submit_before`).
    deadline: Option<Instant>,
    /// When it was queued (a timeout's `after`).
    queued_at: Instant,
    /// Wakes a waiting caller at the deadline.
    alarm: Option<Sleep>,
}

/// `ThreadTask::settled`: the handle's own cancel won.
const CANCELLED: u8 = 1;
/// `ThreadTask::settled`: the deadline passed before any thread claimed the task.
const EXPIRED: u8 = 2;

impl<O> std::fmt::Debug for ThreadTask<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadTask")
            .field("task_id", &self.call.id)
            .finish_non_exhaustive()
    }
}

impl<O> ThreadTask<O> {
    pub(super) fn new(call: Call<O>, deadline: Option<Instant>) -> Self {
        ThreadTask {
            call,
            settled: AtomicU8::new(0),
            deadline,
            queued_at: Instant::now(),
            alarm: None,
        }
    }

    /// Adds the caller's `CANCELLED` to the job's word; `true` if no thread had claimed the
    /// task (nor answered it otherwise): it will never run, and this handle answers it.
    /// With `only_unclaimed` the word is left as it is for a claimed task (a deadline passing
    /// is no cancel: the running task must not see `is_cancelled`).
    fn settle(&self, only_unclaimed: bool) -> bool {
        let state = &self.call.state;
        if !only_unclaimed {
            return state.fetch_or(bits::CANCELLED, Ordering::AcqRel) & bits::CLAIMED == 0;
        }
        // Only this handle and the job's thread change the word, each once: a few tries.
        state
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |w| {
                (w & bits::CLAIMED == 0).then_some(w | bits::CANCELLED)
            })
            .is_ok()
    }

    /// The task's id, unique within its stage.
    pub fn task_id(&self) -> u64 {
        self.call.id
    }

    /// Cancels the task. If no thread has taken it, it never runs and collecting it returns
    /// [`TaskError::Cancelled`] at once; if a thread runs it already, the task sees
    /// [`TaskContext::is_cancelled`](crate::TaskContext::is_cancelled) and its outcome is
    /// still delivered. (One atomic order decides between the cancel and a thread's claim.)
    pub fn cancel(&self) {
        if self.settle(false) {
            // First answer stands (a deadline that settled it already).
            let _ =
                self.settled
                    .compare_exchange(0, CANCELLED, Ordering::Relaxed, Ordering::Relaxed);
        }
    }

    /// Blocks until the task's outcome.
    pub fn wait(mut self) -> Result<O, TaskError> {
        loop {
            if let Some(r) = block_on_until(Pin::new(&mut self), None) {
                return r;
            }
        }
    }

    /// Blocks up to `timeout` for the task's outcome; on a timeout the handle comes back
    /// ([`WaitTimeoutError::Timeout`]) to wait again, or to drop.
    pub fn wait_timeout(mut self, timeout: Duration) -> Result<O, WaitTimeoutError<Self>> {
        let until = crate::deadline::at_or_never(Instant::now(), timeout);
        match block_on_until(Pin::new(&mut self), Some(until)) {
            Some(r) => r.map_err(WaitTimeoutError::Task),
            None => Err(WaitTimeoutError::Timeout(self)),
        }
    }

    /// The task's outcome if it is there, else the handle back at once.
    pub fn try_wait(self) -> Result<O, WaitTimeoutError<Self>> {
        self.wait_timeout(Duration::ZERO)
    }
}

impl<O> Future for ThreadTask<O> {
    type Output = Result<O, TaskError>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            match self.settled.load(Ordering::Relaxed) {
                CANCELLED => return Poll::Ready(Err(TaskError::Cancelled)),
                EXPIRED => {
                    let after = self.deadline.map_or(Duration::ZERO, |d| {
                        d.saturating_duration_since(self.queued_at)
                    });
                    return Poll::Ready(Err(TaskError::Timeout {
                        worker: crate::NO_WORKER,
                        after,
                    }));
                }
                _ => {}
            }
            if let Poll::Ready(reply) = Pin::new(&mut self.call).poll(cx) {
                return Poll::Ready(reply.result);
            }
            let Some(deadline) = self.deadline else {
                return Poll::Pending;
            };
            if Instant::now() < deadline {
                let this = &mut *self;
                let alarm = this.alarm.get_or_insert_with(|| Sleep::until(deadline));
                if Pin::new(alarm).poll(cx).is_pending() {
                    return Poll::Pending;
                }
            }
            // The deadline passed: answered `Timeout` here unless a thread claimed the task
            // in time (then it runs, and its outcome comes as usual).
            self.alarm = None;
            if self.settle(true) {
                let _ =
                    self.settled
                        .compare_exchange(0, EXPIRED, Ordering::Relaxed, Ordering::Relaxed);
            } else {
                self.deadline = None;
            }
        }
    }
}

/// A map input's task, or why it could not be queued.
type Queued<O> = Result<ThreadTask<O>, TaskError>;

/// A lazy, ordered map over a thread stage ([`Threads::map`]): an [`Iterator`] of
/// `Result<W::Output, MapError>`, one per input, in input order.
#[must_use = "a map does nothing until it is iterated"]
pub struct ThreadMap<'t, W: Worker, I> {
    threads: &'t Threads<W>,
    inputs: I,
    window: usize,
    /// The inputs taken and not yet yielded: their position and their task (or why it could
    /// not be queued).
    pending: VecDeque<(usize, Queued<W::Output>)>,
    taken: usize,
    done: bool,
}

impl<W: Worker, I> std::fmt::Debug for ThreadMap<'_, W, I> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ThreadMap")
            .field("window", &self.window)
            .field("taken", &self.taken)
            .field("in_flight", &self.pending.len())
            .finish_non_exhaustive()
    }
}

impl<'t, W: Worker, I: Iterator<Item: ArchivesAs<W::Task>>> ThreadMap<'t, W, I> {
    pub(super) fn new(threads: &'t Threads<W>, inputs: I) -> Self {
        ThreadMap {
            threads,
            inputs,
            window: 64,
            pending: VecDeque::new(),
            taken: 0,
            done: false,
        }
    }

    /// At most `n` of the map's tasks in flight (queued, running, or finished and not yet
    /// yielded); at least 1. The input is pulled only to refill the window.
    pub fn window(mut self, n: usize) -> Self {
        self.window = n.max(1);
        self
    }

    /// Inputs taken so far.
    pub fn taken(&self) -> usize {
        self.taken
    }
}

impl<W: Worker, I: Iterator<Item: ArchivesAs<W::Task>>> Iterator for ThreadMap<'_, W, I> {
    type Item = Result<W::Output, MapError>;

    fn next(&mut self) -> Option<Self::Item> {
        while !self.done && self.pending.len() < self.window {
            match self.inputs.next() {
                Some(input) => {
                    let task = self.threads.submit(&input).map_err(TaskError::from);
                    self.pending.push_back((self.taken, task));
                    self.taken += 1;
                }
                None => self.done = true,
            }
        }
        let (index, task) = self.pending.pop_front()?;
        Some(
            task.and_then(ThreadTask::wait)
                .map_err(|error| MapError { index, error }),
        )
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let (lo, hi) = if self.done {
            (0, Some(0))
        } else {
            self.inputs.size_hint()
        };
        let n = self.pending.len();
        (lo.saturating_add(n), hi.and_then(|h| h.checked_add(n)))
    }
}

impl<W: Worker, I: ExactSizeIterator<Item: ArchivesAs<W::Task>>> ExactSizeIterator
    for ThreadMap<'_, W, I>
{
}
