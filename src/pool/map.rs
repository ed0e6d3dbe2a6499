//! Lazy maps over a pool: push a large or endless input through the workers with a bounded
//! number of tasks in flight, and read the results in input order or as they finish.
//!
//! [`Pool::map`](crate::Pool::map) gives an [`Iterator`] ([`Map`]);
//! [`Pool::map_stream`](crate::Pool::map_stream) and [`Pool::map_async`](crate::Pool::map_async)
//! give a [`futures_core::Stream`] ([`MapStream`]) for async servers. Both are configured the
//! same way, before iterating:
//!
//! - [`window`](Map::window): at most this many of the map's tasks are in flight (queued,
//!   running, or finished and not yet yielded), so an endless input uses bounded memory. The
//!   input is pulled only to refill the window.
//! - [`batch`](Map::batch): up to `n` consecutive inputs per task slot (one hand-off for all).
//! - [`unordered`](Map::unordered): results as they finish instead of in input order.
//! - [`on_error`](Map::on_error): an [`ErrorPolicy`].
//! - [`indexed`](Map::indexed) / [`with_inputs`](Map::with_inputs): each result comes with its
//!   input's position, or with the input itself.
//! - [`task_options`](Map::task_options): a timeout and retries for every task of the map.
//!
//! When the input's length is known the map's is too: `Map` is an [`ExactSizeIterator`] over an
//! exact-size input, so any progress bar can show it. Only while every input will get its
//! item: after [`on_error`](Map::on_error) (a policy that may end the map early) the length is
//! a [`Hint`] and `len()` is gone, so a progress bar cannot promise items that never come.
//!
//! Several maps and individual submits can share one pool from different threads: each map
//! collects only its own tasks' results. A map never blocks waiting for a free task slot while
//! it holds tasks of its own (it collects those first), and pulls more input only while a slot
//! is free, so maps sharing a small queue cannot deadlock one another, even nested (a map whose
//! input is another map of the same pool).
//!
//! The iterator form pulls input before it yields: an input iterator that blocks until the
//! map's consumer has seen earlier results (flow control through a channel, say) would wait
//! forever. Use the stream form for such inputs: a stream's pending input does not hold back
//! results that are ready.

use super::Pool;
use super::arena::Block;
use super::handle::{BatchHandle, TaskHandle};
use super::options::TaskOptions;
use super::shared::Shared;
use crate::codec::ArchivesAs;
use crate::error::{SubmitError, TaskError};
use crate::worker::Worker;
use futures_core::Stream;
use std::collections::VecDeque;
use std::fmt;
use std::marker::PhantomData;
use std::pin::Pin;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::task::{Context, Poll, Wake, Waker};

/// What a map does when a task fails (the seed's exception behaviours).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum ErrorPolicy {
    /// Every input gets its result, errors included: the map runs to the end of the input.
    #[default]
    Deferred,
    /// The first error is yielded at once, and the map ends: its tasks that no worker has
    /// started are cancelled (they never run), and the results of those running are
    /// discarded. "At once" means when the map notices the failure, even ahead of earlier
    /// inputs' results in an ordered map: those not yet yielded are discarded too. (A
    /// service [stream](crate::service::ServiceStream) differs here: an ordered stream
    /// reaches an error in input order, after the items before it.)
    Immediate,
    /// On the first error the map stops taking input and cancels its tasks that no worker has
    /// started, waits for those already running to finish (their results are discarded), then
    /// yields the error and ends. When the error arrives, none of the map's tasks is running.
    /// As under `Immediate`, results not yet yielded when the map notices the error are
    /// discarded, earlier inputs' in an ordered map included.
    /// (A cancelled task that no worker has claimed is answered at once: the error does not
    /// wait for the tasks queued ahead of the map's.) An ordered service
    /// [stream](crate::service::ServiceStream) reaches an error in input order, as under
    /// `Immediate`: until then it keeps its window full.
    WaitOthers,
}

/// A map's task that did not produce a value: which input it was, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("map input {index}: {error}")]
pub struct MapError {
    /// Position of the input in the map's input (0-based).
    pub index: usize,
    /// Why the task failed (or could not be submitted).
    #[source]
    pub error: TaskError,
}

mod sealed {
    pub trait Sealed {}
    impl Sealed for super::Plain {}
    impl Sealed for super::Indexed {}
    impl Sealed for super::WithInputs {}
}

/// The shape of a map's items: [`Plain`], [`Indexed`] or [`WithInputs`].
pub trait Shape<In, Out>: sealed::Sealed {
    /// What the map yields.
    type Item;
    /// Whether the map keeps each input until its result is yielded.
    #[doc(hidden)]
    const KEEP_INPUT: bool;
    /// Builds an item.
    #[doc(hidden)]
    fn item(index: usize, input: Option<In>, result: Result<Out, MapError>) -> Self::Item;
}

/// Items are `Result<Output, MapError>` (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Plain;

/// Items are `(index, Result<Output, MapError>)`: the input's position beside its result.
#[derive(Debug, Clone, Copy, Default)]
pub struct Indexed;

/// Items are `(input, Result<Output, MapError>)`: the input itself beside its result
/// (mpservice's `return_x`).
#[derive(Debug, Clone, Copy, Default)]
pub struct WithInputs;

/// The map's length is exact (over an exact-size input): every input gets its item, so
/// [`Map`] is an [`ExactSizeIterator`]. The default.
#[derive(Debug, Clone, Copy, Default)]
pub struct Exact;

/// The map's length is only a hint: an error policy set with `on_error` may end it early, so
/// [`Map`] is not an [`ExactSizeIterator`]. Its `size_hint` keeps the exact upper bound,
/// but under [`Immediate`](ErrorPolicy::Immediate) or [`WaitOthers`](ErrorPolicy::WaitOthers)
/// its lower bound is at most 1 (the next item may be the error that ends the map).
#[derive(Debug, Clone, Copy, Default)]
pub struct Hint;

impl<In, Out> Shape<In, Out> for Plain {
    type Item = Result<Out, MapError>;
    const KEEP_INPUT: bool = false;
    fn item(_: usize, _: Option<In>, result: Result<Out, MapError>) -> Self::Item {
        result
    }
}

impl<In, Out> Shape<In, Out> for Indexed {
    type Item = (usize, Result<Out, MapError>);
    const KEEP_INPUT: bool = false;
    fn item(index: usize, _: Option<In>, result: Result<Out, MapError>) -> Self::Item {
        (index, result)
    }
}

impl<In, Out> Shape<In, Out> for WithInputs {
    type Item = (In, Result<Out, MapError>);
    const KEEP_INPUT: bool = true;
    fn item(_: usize, input: Option<In>, result: Result<Out, MapError>) -> Self::Item {
        (
            input.expect("a WithInputs map keeps every input until its result is yielded"),
            result,
        )
    }
}

/// Wakes a map that waits for any of its tasks: the pool's reactor wakes it when a registered
/// task finishes. A blocked iterator sleeps on the condition variable; a stream's task waker is
/// woken too.
#[derive(Debug, Default)]
struct Notify {
    state: Mutex<NotifyState>,
    cv: Condvar,
}

#[derive(Debug, Default)]
struct NotifyState {
    epoch: u64,
    task: Option<Waker>,
}

impl Notify {
    fn epoch(&self) -> u64 {
        self.state.lock().unwrap_or_else(|e| e.into_inner()).epoch
    }

    /// Blocks until a wake-up after `epoch` was read.
    fn wait_past(&self, epoch: u64) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        while s.epoch == epoch {
            s = self.cv.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }

    fn set_task(&self, w: &Waker) {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        match &s.task {
            Some(old) if old.will_wake(w) => {}
            _ => s.task = Some(w.clone()),
        }
    }
}

impl Wake for Notify {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        let task = {
            let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
            s.epoch = s.epoch.wrapping_add(1);
            s.task.clone()
        };
        self.cv.notify_all();
        if let Some(t) = task {
            t.wake();
        }
    }
}

/// A submitted task or batch of the map, until its outcome is collected.
enum Pending<T: crate::Message> {
    One(TaskHandle<T>),
    Batch(BatchHandle<T>),
}

impl<T: crate::Message> Pending<T> {
    fn is_finished(&self) -> bool {
        match self {
            Pending::One(h) => h.is_finished(),
            Pending::Batch(h) => h.is_finished(),
        }
    }

    fn cancel(&self) {
        match self {
            Pending::One(h) => h.cancel(),
            Pending::Batch(h) => h.cancel(),
        }
    }

    fn register(&self, waker: &Waker) -> bool {
        match self {
            Pending::One(h) => h.wake_when_finished(waker),
            Pending::Batch(h) => h.inner.wake_when_finished(waker),
        }
    }

    fn block_until_done(&self) {
        match self {
            Pending::One(h) => h.block_until_done(),
            Pending::Batch(h) => h.inner.block_until_done(),
        }
    }
}

/// One input of the map, from submission until its result is yielded.
struct Item<T, In> {
    index: usize,
    input: Option<In>,
    result: Option<Result<T, TaskError>>,
}

/// One submission of the map (a task, or a batch of consecutive inputs).
struct Entry<T: crate::Message, In> {
    /// The inputs, in order; their results once collected.
    items: VecDeque<Item<T, In>>,
    /// The task or batch, until its outcome is collected.
    pending: Option<Pending<T>>,
    /// Whether the map's waker is registered on `pending`.
    registered: bool,
    /// The first item `pending` answers: the earlier ones were answered by an earlier run.
    from: usize,
    /// Whether the items from `from` on were not run (their worker retired after a panic or
    /// a poisoning earlier in the batch) and wait to be sent again (`pending` is `None`).
    rerun: bool,
    /// Whether not-run items may be sent again: a batch of a `Deferred` map, whose inputs it
    /// keeps.
    may_rerun: bool,
}

impl<T: crate::Message, In> Entry<T, In> {
    fn new(items: VecDeque<Item<T, In>>, pending: Option<Pending<T>>, may_rerun: bool) -> Self {
        Entry {
            items,
            pending,
            registered: false,
            from: 0,
            rerun: false,
            may_rerun,
        }
    }

    /// Collects the outcome if the submission has finished; whether the entry is resolved.
    fn resolve(&mut self) -> bool {
        match &self.pending {
            None => return !self.rerun,
            Some(p) if !p.is_finished() => return false,
            Some(_) => {}
        }
        let from = self.from;
        match self.pending.take().expect("checked above") {
            Pending::One(h) => {
                if let Some(item) = self.items.get_mut(from) {
                    item.result = Some(h.wait());
                }
            }
            Pending::Batch(h) => match h.wait() {
                Ok(outs) if outs.len() == self.items.len() - from => {
                    for (item, r) in self.items.iter_mut().skip(from).zip(outs) {
                        item.result = Some(r);
                    }
                    if let Some(k) = self.not_run_from() {
                        for item in self.items.iter_mut().skip(k) {
                            item.result = None;
                        }
                        self.from = k;
                        self.rerun = true;
                        self.registered = false;
                        return false;
                    }
                }
                other => {
                    // The batch failed as a whole (or, never from our workers, answered the
                    // wrong number of tasks): every input it carried gets that outcome.
                    let e = other.err().unwrap_or_else(|| TaskError::BadResult {
                        worker: usize::MAX,
                        message: format!(
                            "a batch of {} tasks was answered with another count",
                            self.items.len() - from
                        ),
                    });
                    for item in self.items.iter_mut().skip(from) {
                        item.result = Some(Err(e.clone()));
                    }
                }
            },
        }
        true
    }

    /// Where the items that the batch's worker did not run begin, if they are to be sent
    /// again: a run of `Cancelled` to the end, right after a panic or a poisoning (the worker
    /// retired there). Each rerun answers at least that item, so reruns end.
    fn not_run_from(&self) -> Option<usize> {
        if !self.may_rerun {
            return None;
        }
        let first_cancelled = self
            .items
            .iter()
            .rposition(|i| !matches!(i.result, Some(Err(TaskError::Cancelled))))?
            + 1;
        let retired = matches!(
            self.items[first_cancelled - 1].result,
            Some(Err(TaskError::Panicked { .. } | TaskError::Poisoned { .. }))
        );
        // (A batch's inputs are always kept: `submit_stash`.)
        (retired && first_cancelled > self.from && first_cancelled < self.items.len())
            .then_some(first_cancelled)
    }

    /// Whether a resolved entry holds a failed input.
    fn has_error(&self) -> bool {
        self.items.iter().any(|i| matches!(i.result, Some(Err(_))))
    }
}

/// What the engine hands out: the input's position, the input (if kept) and the outcome.
type Raw<T, In> = (usize, Option<In>, Result<T, TaskError>);

fn raw<T, In>(i: Item<T, In>) -> Raw<T, In> {
    (
        i.index,
        i.input,
        i.result.unwrap_or(Err(TaskError::Cancelled)),
    )
}

/// The state machine shared by [`Map`] and [`MapStream`]; the input is pulled by them.
struct Engine<W: Worker, In> {
    shared: Arc<Shared>,
    window: usize,
    /// Inputs per submission (1: one task each; more: batches of consecutive inputs).
    batch: usize,
    ordered: bool,
    policy: ErrorPolicy,
    opts: TaskOptions,
    keep_inputs: bool,
    /// Inputs pulled so far (the next input's position).
    pulled: usize,
    /// Submissions in flight, in input order (ordered maps resolve them in place; unordered
    /// maps move resolved inputs to `ready`).
    entries: VecDeque<Entry<W::Output, In>>,
    /// Resolved inputs waiting to be yielded (unordered maps).
    ready: VecDeque<Item<W::Output, In>>,
    /// Inputs held in `entries` and `ready`.
    held: usize,
    /// Inputs pulled but not yet submitted (the queue was full, or a batch is being gathered):
    /// the first one's position and the inputs, consecutive.
    stash: Option<(usize, Vec<In>)>,
    /// The input is exhausted (or the map stopped taking input).
    input_done: bool,
    /// `WaitOthers`: the first error, yielded once the map's running tasks have finished.
    failure: Option<Raw<W::Output, In>>,
    finished: bool,
    notify: Arc<Notify>,
    waker: Waker,
    /// Emptied buffers kept for reuse, so the steady state allocates nothing per input.
    spare_inputs: Vec<In>,
    spare_items: Vec<VecDeque<Item<W::Output, In>>>,
}

impl<W: Worker, In: ArchivesAs<W::Task>> Engine<W, In> {
    fn new(shared: Arc<Shared>, keep_inputs: bool) -> Self {
        let window = shared.layout.params.n_slots as usize;
        let notify = Arc::new(Notify::default());
        Engine {
            shared,
            window,
            batch: 1,
            ordered: true,
            policy: ErrorPolicy::Deferred,
            opts: TaskOptions::default(),
            keep_inputs,
            pulled: 0,
            entries: VecDeque::new(),
            ready: VecDeque::new(),
            held: 0,
            stash: None,
            input_done: false,
            failure: None,
            finished: false,
            waker: Waker::from(notify.clone()),
            notify,
            spare_inputs: Vec::new(),
            spare_items: Vec::new(),
        }
    }

    /// Keeps an emptied item buffer for reuse.
    fn recycle(&mut self, mut items: VecDeque<Item<W::Output, In>>) {
        if self.spare_items.len() < 64 {
            items.clear();
            self.spare_items.push(items);
        }
    }

    fn stashed(&self) -> usize {
        self.stash.as_ref().map_or(0, |s| s.1.len())
    }

    fn taking_input(&self) -> bool {
        !self.input_done && !self.finished && self.failure.is_none()
    }

    /// Back to input order (after `unordered`): unordered collecting moves resolved inputs to
    /// `ready`, so put everything held back in order.
    fn set_ordered(&mut self) {
        if !self.ordered {
            // (Unordered collecting also swap-removes entries: sort even if `ready` is empty.)
            let ready: Vec<_> = self.ready.drain(..).collect();
            for item in ready {
                self.entries
                    .push_back(Entry::new(VecDeque::from([item]), None, false));
            }
            let mut all: Vec<_> = self.entries.drain(..).collect();
            all.sort_by_key(|e| e.items.front().map_or(0, |i| i.index));
            self.entries = all.into();
        }
        self.ordered = true;
    }

    fn set_keep_inputs(&mut self, keep: bool) {
        assert!(
            self.pulled == 0 || !keep || self.keep_inputs,
            "with_inputs() must be called before the map is first iterated"
        );
        self.keep_inputs = keep;
    }

    /// Sends `tasks` as one task (one input) or one batch.
    fn send<'t>(
        &self,
        tasks: impl ExactSizeIterator<Item = &'t In> + Clone,
        block: Block,
    ) -> Result<Pending<W::Output>, SubmitError>
    where
        In: 't,
    {
        let len = tasks.len();
        if len == 1 {
            let task = tasks.clone().next().expect("one task");
            return self
                .shared
                .submit_with(&task.enc(), None, block, self.opts)
                .map(|(slot, id)| Pending::One(TaskHandle::new(self.shared.clone(), slot, id)));
        }
        let mut opts = self.opts;
        opts.batch = true;
        // The batch runs as one task: it gets each input's time limit, once per input.
        opts.timeout = opts
            .timeout
            .or(self.shared.cfg.task_timeout)
            .map(|d| d.saturating_mul(len.min(u32::MAX as usize) as u32));
        let batch = crate::codec::batch_of::<W::Task, In>(tasks);
        self.shared
            .submit_with(&batch, None, block, opts)
            .map(|(slot, id)| {
                Pending::Batch(BatchHandle {
                    inner: TaskHandle::new(self.shared.clone(), slot, id),
                    len,
                })
            })
    }

    /// Submits the stashed inputs as one task (one input) or one batch. A batch too large for
    /// a task goes in smaller pieces (each input still gets its own result; an input too
    /// large alone gets that error): the inputs not sent stay stashed. `false` if the queue
    /// was full (with `Block::No`): they all stay stashed.
    fn submit_stash(&mut self, block: Block) -> bool {
        let Some((first, mut inputs)) = self.stash.take() else {
            return true;
        };
        let mut n = inputs.len();
        let r = loop {
            match self.send(inputs[..n].iter(), block) {
                Err(SubmitError::PayloadTooLarge { .. }) if n > 1 => n = n.div_ceil(2),
                r => break r,
            }
        };
        let (pending, error) = match r {
            Ok(p) => (Some(p), None),
            Err(SubmitError::QueueFull) if matches!(block, Block::No) => {
                self.stash = Some((first, inputs));
                return false;
            }
            // A refused submit is these inputs' result. The map goes on: under `Deferred`
            // every input gets its item (`len()` holds), and later inputs of a pool that shut
            // down are refused at once (no slot is taken, nothing waits).
            Err(e) => (None, Some(TaskError::from(e))),
        };
        let rest = (n < inputs.len()).then(|| inputs.split_off(n));
        // A batch's inputs are kept (whatever the shape) so that those its worker did not run
        // can be sent again.
        let keep = self.keep_inputs || n > 1;
        let mut items = self.spare_items.pop().unwrap_or_default();
        items.extend(inputs.drain(..).enumerate().map(|(k, input)| Item {
            index: first + k,
            input: keep.then_some(input),
            result: error.clone().map(Err),
        }));
        self.spare_inputs = inputs;
        let may_rerun = n > 1 && self.policy == ErrorPolicy::Deferred;
        self.entries
            .push_back(Entry::new(items, pending, may_rerun));
        self.held += n;
        if let Some(rest) = rest {
            self.stash = Some((first + n, rest));
        }
        true
    }

    /// Sends again the inputs of batches whose worker did not run them (see
    /// `Entry::not_run_from`), in input order. `false` if the queue was full (with
    /// `Block::No`): the rest wait for the next call.
    fn send_reruns(&mut self, block: Block) -> bool {
        for i in 0..self.entries.len() {
            if !self.entries[i].rerun {
                continue;
            }
            let e = &self.entries[i];
            let tasks: Vec<&In> = e
                .items
                .iter()
                .skip(e.from)
                .filter_map(|i| i.input.as_ref())
                .collect();
            let r = self.send(tasks.iter().copied(), block);
            let e = &mut self.entries[i];
            match r {
                Ok(p) => e.pending = Some(p),
                Err(SubmitError::QueueFull) if matches!(block, Block::No) => return false,
                Err(err) => {
                    let err = TaskError::from(err);
                    for item in e.items.iter_mut().skip(e.from) {
                        item.result = Some(Err(err.clone()));
                    }
                }
            }
            e.rerun = false;
            e.registered = false;
        }
        true
    }

    /// Sends the inputs that collecting just found not run (without waiting for a slot);
    /// whether any were sent (go round again). Otherwise, with nothing in flight whose
    /// completion would wake a stream, it waits for a freed slot (`cx`).
    fn send_found_reruns(&mut self, cx: Option<&mut Context<'_>>) -> bool {
        if self.batch == 1 || !self.entries.iter().any(|e| e.rerun) {
            return false;
        }
        if self.send_reruns(Block::No) {
            return true;
        }
        if let Some(cx) = cx {
            if !self.in_flight() {
                self.wait_slot(cx);
            }
        }
        false
    }

    /// Whether any of the map's submissions is in flight (holds a slot).
    fn in_flight(&self) -> bool {
        self.entries.iter().any(|e| e.pending.is_some())
    }

    /// Inputs per submission: the batch size, capped by the window.
    fn batch_cap(&self) -> usize {
        self.batch.min(self.window).max(1)
    }

    /// Whether the stash is a full batch.
    fn stash_full(&self) -> bool {
        // (The window bound matters only for the rest of a batch sent in pieces.)
        self.stashed() >= self.batch_cap() || self.held + self.stashed() >= self.window
    }

    /// Whether to pull another input: the stash is a batch being gathered, or there is room in
    /// the window for a whole new batch (refilling in whole batches, not one input at a time).
    fn room_to_pull(&self) -> bool {
        if self.stash.is_some() {
            !self.stash_full()
        } else {
            self.held + self.batch_cap() <= self.window
        }
    }

    /// Adds a pulled input to the stash.
    fn push_input(&mut self, input: In) {
        let index = self.pulled;
        self.pulled += 1;
        match &mut self.stash {
            Some((_, v)) => v.push(input),
            None => {
                let mut v = std::mem::take(&mut self.spare_inputs);
                v.push(input);
                self.stash = Some((index, v));
            }
        }
    }

    /// Fills the window from a blocking iterator.
    fn fill_sync(&mut self, inputs: &mut impl Iterator<Item = In>) {
        // (Only batches have reruns.) Waits for a slot only with nothing of its own in flight.
        if self.batch > 1 {
            let block = if self.in_flight() {
                Block::No
            } else {
                Block::Until(None)
            };
            if !self.send_reruns(block) {
                return;
            }
        }
        loop {
            if self.stash.is_some() && (self.stash_full() || !self.taking_input()) {
                // The queue-full rule: with nothing of its own in flight the map may wait for a
                // slot (it holds nothing anyone waits for); otherwise it keeps the inputs and
                // goes to collect its own results, which frees slots.
                let block = if self.held == 0 {
                    Block::Until(None)
                } else {
                    Block::No
                };
                if !self.submit_stash(block) {
                    return;
                }
                continue;
            }
            if !self.taking_input() || !self.room_to_pull() {
                return;
            }
            // Holding tasks of our own and no slot free: collect before pulling more input.
            // Pulling could run code that waits for a slot of this same pool (an input
            // iterator that is itself a map, or submits), which only our collecting can free.
            if self.held > 0 && self.stash.is_none() && !self.shared.has_free_slot() {
                return;
            }
            match inputs.next() {
                Some(x) => self.push_input(x),
                None => self.input_done = true,
            }
        }
    }

    /// Fills the window from a stream; returns without waiting if the input is not ready (a
    /// partial batch is then sent as it is).
    fn fill_async<S: Stream<Item = In> + ?Sized>(
        &mut self,
        mut inputs: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) {
        if self.batch > 1 && !self.send_reruns(Block::No) {
            if !self.in_flight() {
                self.wait_slot(cx);
            }
            return;
        }
        loop {
            let mut input_pending = false;
            while self.taking_input() && self.room_to_pull() {
                match inputs.as_mut().poll_next(cx) {
                    Poll::Ready(Some(x)) => self.push_input(x),
                    Poll::Ready(None) => self.input_done = true,
                    Poll::Pending => {
                        input_pending = true;
                        break;
                    }
                }
            }
            if self.stash.is_none() {
                return;
            }
            // Never block a thread in a stream: on a full queue, collect our own results if we
            // have some in flight, else wait for a free slot asynchronously.
            if self.submit_stash(Block::No) {
                if input_pending || !self.taking_input() {
                    return;
                }
                continue;
            }
            // With something in flight, its completion wakes the map; without (results
            // ready to yield, or inputs waiting to be sent again), a freed slot must.
            if !self.in_flight() {
                self.wait_slot(cx);
            }
            return;
        }
    }

    /// Has the task woken when a slot frees up.
    fn wait_slot(&self, cx: &mut Context<'_>) {
        self.shared.wait_slot_async(cx.waker());
        if self.shared.has_free_slot() || self.shared.closing.load(Ordering::SeqCst) {
            // A slot is free, so the arena was full (a large task), and the arena has no
            // async waiters: come back soon, as `submit_async` does, instead of retrying in
            // place.
            cx.waker().wake_by_ref();
        }
    }

    /// The ordered, deferred map: only the oldest input matters, and it is waited for on its
    /// own slot (no wake-up counter).
    fn fast_ordered(&self) -> bool {
        self.ordered
            && self.policy == ErrorPolicy::Deferred
            && self.failure.is_none()
            && !self.entries.front().is_some_and(|e| e.rerun)
    }

    /// Pops the front entry's first input (ordered maps), if resolved.
    fn pop_front_item(&mut self) -> Option<Raw<W::Output, In>> {
        let front = self.entries.front_mut()?;
        if !front.resolve() {
            return None;
        }
        let item = front.items.pop_front();
        if front.items.is_empty() {
            if let Some(e) = self.entries.pop_front() {
                self.recycle(e.items);
            }
        }
        let item = item?;
        self.held -= 1;
        Some(raw(item))
    }

    /// A result to yield now, if there is one (collecting finished tasks on the way).
    fn next_ready(&mut self) -> Option<Raw<W::Output, In>> {
        if self.finished {
            return None;
        }
        if self.failure.is_some() {
            // WaitOthers: resolve what is still running; yield the error once nothing is.
            for e in self.entries.iter_mut() {
                e.resolve();
            }
            if self.entries.iter().all(|e| e.pending.is_none()) {
                self.entries.clear();
                self.ready.clear();
                self.held = 0;
                self.finished = true;
                return self.failure.take();
            }
            return None;
        }
        if self.fast_ordered() {
            return self.pop_front_item();
        }
        // Collect every finished submission; act on the first error (policy), route the rest.
        let mut i = 0;
        while i < self.entries.len() {
            if !self.entries[i].resolve() {
                i += 1;
                continue;
            }
            if self.policy != ErrorPolicy::Deferred && self.entries[i].has_error() {
                let e = self.entries.remove(i).expect("in range");
                return self.fail(e);
            }
            if self.ordered {
                i += 1;
            } else {
                let mut e = self.entries.swap_remove_back(i).expect("in range");
                self.ready.extend(e.items.drain(..));
                self.recycle(e.items);
            }
        }
        if self.ordered {
            // The front may have finished since the scan above looked at it: an error there
            // is still the policy's (yielded as the map's last item), never a plain item.
            if self.policy != ErrorPolicy::Deferred
                && self
                    .entries
                    .front_mut()
                    .is_some_and(|e| e.resolve() && e.has_error())
            {
                let e = self.entries.pop_front().expect("checked above");
                return self.fail(e);
            }
            return self.pop_front_item();
        }
        let item = self.ready.pop_front()?;
        self.held -= 1;
        Some(raw(item))
    }

    /// The first error under `Immediate` or `WaitOthers` (in entry `e`, already removed).
    fn fail(&mut self, e: Entry<W::Output, In>) -> Option<Raw<W::Output, In>> {
        self.stash = None;
        self.input_done = true;
        self.ready.clear();
        let first_error = e
            .items
            .into_iter()
            .find(|i| matches!(i.result, Some(Err(_))))
            .expect("the entry has an error");
        let raw = raw(first_error);
        match self.policy {
            ErrorPolicy::WaitOthers => {
                for e in self.entries.iter_mut() {
                    if let Some(p) = &e.pending {
                        p.cancel();
                    }
                }
                // Results are discarded; keep only what is still running, to wait for it.
                self.entries.retain(|e| e.pending.is_some());
                self.held = self.entries.iter().map(|e| e.items.len()).sum();
                self.failure = Some(raw);
                self.next_ready()
            }
            _ => {
                // Dropping the handles cancels what has not started and discards the rest.
                self.entries.clear();
                self.held = 0;
                self.finished = true;
                Some(raw)
            }
        }
    }

    /// Nothing left to yield, ever.
    fn exhausted(&mut self) -> bool {
        if !self.finished
            && self.held == 0
            && self.stash.is_none()
            && self.failure.is_none()
            && self.input_done
        {
            self.finished = true;
        }
        self.finished
    }

    /// Registers the map's waker on every submission not yet registered; `true` if one of them
    /// has already finished (no need to sleep).
    fn register_all(&mut self) -> bool {
        let mut done = false;
        for e in self.entries.iter_mut() {
            if let (Some(p), false) = (&e.pending, e.registered) {
                e.registered = true;
                done |= p.register(&self.waker);
            }
        }
        done
    }

    /// Blocks until one of the map's tasks may have finished. `epoch` was read before the
    /// caller last looked for finished tasks, so a wake-up in between is not lost.
    fn wait_sync(&mut self, epoch: u64) {
        if self.fast_ordered() {
            if let Some(p) = self.entries.front().and_then(|e| e.pending.as_ref()) {
                // The direct path: spin, then park on the task's own slot.
                p.block_until_done();
            }
            // (No epoch was read on this path: never sleep on the counter.)
            return;
        }
        if self.register_all() {
            return;
        }
        self.notify.wait_past(epoch);
    }

    fn next_sync(&mut self, inputs: &mut impl Iterator<Item = In>) -> Option<Raw<W::Output, In>> {
        loop {
            self.fill_sync(inputs);
            // The ordered, deferred map waits on its oldest task's own slot and needs no
            // wake-up counter (a mutex round trip per item saved).
            let epoch = if self.fast_ordered() {
                0
            } else {
                self.notify.epoch()
            };
            if let Some(r) = self.next_ready() {
                return Some(r);
            }
            if self.exhausted() {
                return None;
            }
            if !self.in_flight() {
                // Nothing in flight (all resolved, or inputs waiting for room): go round
                // again, which submits (blocking if we hold nothing) or yields.
                continue;
            }
            if self.send_found_reruns(None) {
                continue;
            }
            self.wait_sync(epoch);
        }
    }

    fn poll_next<S: Stream<Item = In> + ?Sized>(
        &mut self,
        mut inputs: Pin<&mut S>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Raw<W::Output, In>>> {
        self.notify.set_task(cx.waker());
        loop {
            self.fill_async(inputs.as_mut(), cx);
            if let Some(r) = self.next_ready() {
                return Poll::Ready(Some(r));
            }
            if self.exhausted() {
                return Poll::Ready(None);
            }
            if self.send_found_reruns(Some(cx)) {
                continue;
            }
            if self.register_all() {
                continue;
            }
            return Poll::Pending;
        }
    }

    /// Items still to come, given the unread input's size hint.
    fn size_hint(&self, input: impl FnOnce() -> (usize, Option<usize>)) -> (usize, Option<usize>) {
        if self.finished {
            return (0, Some(0));
        }
        if self.failure.is_some() {
            return (1, Some(1));
        }
        // A stopping policy may end the map at its first error: only that item is sure.
        let sure = |n: usize| {
            if self.policy == ErrorPolicy::Deferred {
                n
            } else {
                n.min(1)
            }
        };
        let held = self.held + self.stashed();
        if !self.taking_input() {
            return (sure(held), Some(held));
        }
        let input = input();
        (
            sure(input.0.saturating_add(held)),
            input.1.and_then(|n| n.checked_add(held)),
        )
    }
}

impl<W: Worker, In> fmt::Debug for Engine<W, In> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Map")
            .field("window", &self.window)
            .field("batch", &self.batch)
            .field("ordered", &self.ordered)
            .field("policy", &self.policy)
            .field("pulled", &self.pulled)
            .field("in_flight", &self.held)
            .field("finished", &self.finished)
            .finish_non_exhaustive()
    }
}

/// An engine's output as the item of shape `S`.
fn item<S: Shape<In, Out>, In, Out>((index, input, r): Raw<Out, In>) -> S::Item {
    S::item(index, input, r.map_err(|error| MapError { index, error }))
}

/// The configuration methods, the same on [`Map`] and [`MapStream`].
macro_rules! map_options {
    ($ty:ident, $input:ident) => {
        /// At most `n` of this map's tasks in flight (queued, running, or finished and not
        /// yet yielded); at least 1. Default: the pool's `queue_size`. Each of them holds a
        /// task slot until the map yields it, so a loop body that itself submits to the same
        /// pool and waits for the result needs a window below the queue size (room for its
        /// own tasks), or it may wait for a slot that only the map's next item would free.
        pub fn window(mut self, n: usize) -> Self {
            self.engine.window = n.max(1);
            self
        }

        /// Sends up to `n` consecutive inputs per task slot, as one batch (see
        /// [`Pool::batch`]): one queue hand-off and one answer for all of them, for
        /// much higher throughput of tiny tasks. Each input still gets its own result, in the
        /// same order and with the same error policies. The batch is one task to the fault
        /// handling: if its worker dies, every input in it fails (or re-runs, with retries),
        /// and its time limit is the per-task one ([`task_options`](Self::task_options) or
        /// the pool's) times its number of inputs. A batch is at most the
        /// [`window`](Self::window): with `batch(8).window(2)` batches hold 2 inputs. Default
        /// 1 (no batching).
        pub fn batch(mut self, n: usize) -> Self {
            self.engine.batch = n.max(1);
            self
        }

        /// Results as they finish, not in input order.
        pub fn unordered(mut self) -> Self {
            self.engine.ordered = false;
            self
        }

        /// Results in input order (the default).
        pub fn ordered(mut self) -> Self {
            self.engine.set_ordered();
            self
        }

        /// What to do when a task fails (default [`ErrorPolicy::Deferred`]). With a policy
        /// that may end the map early, its length becomes a hint ([`Hint`]: no longer an
        /// `ExactSizeIterator`).
        pub fn on_error(mut self, policy: ErrorPolicy) -> $ty<W, $input, S, Hint> {
            self.engine.policy = policy;
            $ty {
                engine: self.engine,
                inputs: self.inputs,
                _s: PhantomData,
            }
        }

        /// Timeout, retry and deadline settings for every task of the map (a
        /// [`batch`](Self::batch) of `k` inputs gets `k` times the timeout; a task no worker
        /// has claimed by the deadline is answered `Timeout` at the deadline).
        pub fn task_options(mut self, opts: TaskOptions) -> Self {
            self.engine.opts = opts;
            self
        }

        /// Yields `(index, result)`: each result beside its input's position.
        pub fn indexed(mut self) -> $ty<W, $input, Indexed, L> {
            self.engine.set_keep_inputs(false);
            $ty {
                engine: self.engine,
                inputs: self.inputs,
                _s: PhantomData,
            }
        }

        /// Yields `(input, result)`: each result beside the input it came from. Call before
        /// iterating.
        ///
        /// # Panics
        ///
        /// If the map has already taken input.
        pub fn with_inputs(mut self) -> $ty<W, $input, WithInputs, L> {
            self.engine.set_keep_inputs(true);
            $ty {
                engine: self.engine,
                inputs: self.inputs,
                _s: PhantomData,
            }
        }

        /// Inputs taken so far.
        pub fn taken(&self) -> usize {
            self.engine.pulled
        }

        /// The map's inputs in flight now: submitted, and not yet yielded or discarded.
        pub fn in_flight(&self) -> usize {
            self.engine.held
        }
    };
}

/// A lazy map of a pool over an iterator: see [`Pool::map`] and the [module docs](crate::map).
///
/// Dropping it cancels its tasks that no worker has started and discards the others' results.
#[must_use = "a Map does nothing until iterated; dropping it cancels its tasks"]
pub struct Map<W: Worker, I: Iterator, S = Plain, L = Exact> {
    engine: Engine<W, I::Item>,
    inputs: I,
    _s: PhantomData<fn() -> (S, L)>,
}

impl<W: Worker, I> Map<W, I, Plain>
where
    I: Iterator<Item: ArchivesAs<W::Task>>,
{
    pub(crate) fn new(shared: Arc<Shared>, inputs: I) -> Self {
        Map {
            engine: Engine::new(shared, false),
            inputs,
            _s: PhantomData,
        }
    }
}

impl<W: Worker, I, S, L> Map<W, I, S, L>
where
    I: Iterator<Item: ArchivesAs<W::Task>>,
    S: Shape<I::Item, W::Output>,
{
    map_options!(Map, I);
}

impl<W: Worker, I, S, L> Iterator for Map<W, I, S, L>
where
    I: Iterator<Item: ArchivesAs<W::Task>>,
    S: Shape<I::Item, W::Output>,
{
    type Item = S::Item;

    fn next(&mut self) -> Option<S::Item> {
        self.engine.next_sync(&mut self.inputs).map(item::<S, _, _>)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.engine.size_hint(|| self.inputs.size_hint())
    }
}

/// Exact over an exact-size input, as long as no error policy was set (a policy that may end
/// the map early makes the length a [`Hint`]).
impl<W: Worker, I, S> ExactSizeIterator for Map<W, I, S, Exact>
where
    I: ExactSizeIterator<Item: ArchivesAs<W::Task>>,
    S: Shape<I::Item, W::Output>,
{
}

impl<W: Worker, I, S, L> std::iter::FusedIterator for Map<W, I, S, L>
where
    I: Iterator<Item: ArchivesAs<W::Task>>,
    S: Shape<I::Item, W::Output>,
{
}

impl<W: Worker, I: Iterator, S, L> fmt::Debug for Map<W, I, S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.engine.fmt(f)
    }
}

/// A lazy map of a pool over a stream of inputs, itself a [`Stream`] of results: see
/// [`Pool::map_stream`] and the [module docs](crate::map). Works on any executor; it never blocks a
/// thread.
///
/// Dropping it cancels its tasks that no worker has started and discards the others' results.
#[must_use = "a MapStream does nothing until polled; dropping it cancels its tasks"]
pub struct MapStream<W: Worker, St: Stream, S = Plain, L = Exact> {
    engine: Engine<W, St::Item>,
    inputs: Pin<Box<St>>,
    _s: PhantomData<fn() -> (S, L)>,
}

impl<W: Worker, St> MapStream<W, St, Plain>
where
    St: Stream<Item: ArchivesAs<W::Task>>,
{
    pub(crate) fn new(shared: Arc<Shared>, inputs: St) -> Self {
        MapStream {
            engine: Engine::new(shared, false),
            inputs: Box::pin(inputs),
            _s: PhantomData,
        }
    }
}

impl<W: Worker, St, S, L> MapStream<W, St, S, L>
where
    St: Stream<Item: ArchivesAs<W::Task>>,
    S: Shape<St::Item, W::Output>,
{
    map_options!(MapStream, St);
}

impl<W: Worker, St, S, L> Stream for MapStream<W, St, S, L>
where
    St: Stream<Item: ArchivesAs<W::Task>>,
    S: Shape<St::Item, W::Output>,
{
    type Item = S::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<S::Item>> {
        let this = self.get_mut();
        this.engine
            .poll_next(this.inputs.as_mut(), cx)
            .map(|r| r.map(item::<S, _, _>))
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.engine.size_hint(|| self.inputs.size_hint())
    }
}

// The stream never pins its fields in place (the input stream is boxed and pinned on its own;
// kept inputs and results are plain values moved in and out), so it can move freely.
impl<W: Worker, St: Stream, S, L> Unpin for MapStream<W, St, S, L> {}

impl<W: Worker, St: Stream, S, L> fmt::Debug for MapStream<W, St, S, L> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.engine.fmt(f)
    }
}

/// An iterator as a [`Stream`] that is always ready (see [`Pool::map_async`]).
#[derive(Debug, Clone)]
pub struct IterStream<I>(I);

impl<I: Iterator + Unpin> Stream for IterStream<I> {
    type Item = I::Item;

    fn poll_next(self: Pin<&mut Self>, _: &mut Context<'_>) -> Poll<Option<I::Item>> {
        Poll::Ready(self.get_mut().0.next())
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        self.0.size_hint()
    }
}

impl<W: Worker> Pool<W> {
    /// Runs every input of `inputs` through the pool, lazily: returns an iterator of results
    /// that pulls inputs only to keep at most [`window`](Map::window) tasks in flight (the
    /// pool's `queue_size` by default), so a huge or endless input uses bounded memory.
    ///
    /// Results come in input order unless [`unordered`](Map::unordered); each is a
    /// `Result<W::Output, MapError>`, the error naming the failing input's position. See the
    /// [`map` module](crate::map) for the options and [`ErrorPolicy`] for what happens on an
    /// error. Inputs may be in any form that archives as the task type
    /// ([`ArchivesAs`](crate::ArchivesAs)): owned tasks, references to them, or borrowed forms
    /// (`&str`s for a `String` task, `&[u8]`s for `Vec<u8>`).
    ///
    /// ```no_run
    /// # use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
    /// # struct Square;
    /// # impl Worker for Square {
    /// #     type SpawnArgs = (); type SpawnOutput = (); type Task = i64; type Output = i64;
    /// #     fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> { Ok((Square, ())) }
    /// #     fn execute(&mut self, t: &rkyv::Archived<i64>, _: &TaskContext<'_>) -> Result<i64, BoxError> {
    /// #         Ok(t.to_native() * t.to_native())
    /// #     }
    /// # }
    /// # fn main() -> Result<(), Box<dyn std::error::Error>> {
    /// stateful_pool::init();
    /// let pool = Pool::<Square>::new()?;
    /// pool.spawn_n(&(), 4);
    /// // (std knows the length of a range of i32, not of i64.)
    /// let squares = pool.map((0..1000i32).map(i64::from)).window(64);
    /// assert_eq!(squares.len(), 1000); // exact: a progress bar can use it
    /// let total: i64 = squares.map(|r| r.unwrap()).sum();
    /// # Ok(()) }
    /// ```
    pub fn map<I>(&self, inputs: I) -> Map<W, I::IntoIter>
    where
        I: IntoIterator<Item: ArchivesAs<W::Task>>,
    {
        Map::new(self.shared.clone(), inputs.into_iter())
    }

    /// As [`map`](Self::map), for async code: the inputs come from a [`Stream`] and the
    /// results are a [`Stream`] ([`MapStream`]), with the same options. It never blocks a
    /// thread, and works on any executor. The stream does not borrow the pool.
    pub fn map_stream<St>(&self, inputs: St) -> MapStream<W, St>
    where
        St: Stream<Item: ArchivesAs<W::Task>>,
    {
        MapStream::new(self.shared.clone(), inputs)
    }

    /// As [`map_stream`](Self::map_stream), over an iterator of inputs.
    pub fn map_async<I>(&self, inputs: I) -> MapStream<W, IterStream<I::IntoIter>>
    where
        I: IntoIterator<Item: ArchivesAs<W::Task>, IntoIter: Unpin>,
    {
        MapStream::new(self.shared.clone(), IterStream(inputs.into_iter()))
    }
}
