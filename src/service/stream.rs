//! [`Server::stream`]: a possibly endless input through the graph, with a bounded window,
//! ordered or unordered, inputs beside outputs, and the map engine's error policies.

use super::error::ServiceError;
use super::server::Server;
use super::stage::{Item, Stage};
use crate::ErrorPolicy;
use futures_core::Stream;
use futures_util::stream::{FuturesUnordered, StreamExt};
use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

/// Items are the outputs: `Result<Out, ServiceError>` (the default).
#[derive(Debug, Clone, Copy, Default)]
pub struct Outputs;

/// Items are `(input, Result<Out, ServiceError>)`: each input beside its outcome.
#[derive(Debug, Clone, Copy, Default)]
pub struct WithInputs;

type ItemFuture<'s, I, O> =
    Pin<Box<dyn Future<Output = (Option<I>, Result<O, ServiceError>)> + Send + 's>>;

/// The items in flight: every future runs in one `FuturesUnordered`, numbered in input order;
/// an ordered window holds back outcomes that finish ahead of an earlier input's. So switching
/// to unordered mid-way keeps every item in flight (and yields those held back first).
struct Window<F: Future> {
    running: FuturesUnordered<Numbered<F>>,
    ordered: bool,
    /// The number the next launched item gets.
    next_in: u64,
    /// The number of the next item to yield (ordered).
    next_out: u64,
    /// Finished ahead of their turn (ordered), or before a switch to unordered.
    done: std::collections::BTreeMap<u64, F::Output>,
}

/// A future with its position in the input.
struct Numbered<F> {
    n: u64,
    f: F,
}

impl<F: Future + Unpin> Future for Numbered<F> {
    type Output = (u64, F::Output);

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        let n = self.n;
        Pin::new(&mut self.f).poll(cx).map(|o| (n, o))
    }
}

impl<F: Future + Unpin> Window<F> {
    fn new() -> Self {
        Window {
            running: FuturesUnordered::new(),
            ordered: true,
            next_in: 0,
            next_out: 0,
            done: Default::default(),
        }
    }

    /// Items launched and not yet yielded (running, or finished and held back).
    fn len(&self) -> usize {
        self.running.len() + self.done.len()
    }

    fn push(&mut self, f: F) {
        let n = self.next_in;
        self.next_in += 1;
        self.running.push(Numbered { n, f });
    }

    fn clear(&mut self) {
        self.running.clear();
        self.done.clear();
    }

    /// The next outcome to yield; `Ready(None)` when nothing is in flight.
    fn poll_next(&mut self, cx: &mut Context<'_>) -> Poll<Option<F::Output>> {
        loop {
            let held = if self.ordered {
                self.done.remove(&self.next_out)
            } else {
                self.done.pop_first().map(|(_, o)| o)
            };
            if let Some(o) = held {
                self.next_out += 1;
                return Poll::Ready(Some(o));
            }
            match self.running.poll_next_unpin(cx) {
                Poll::Ready(Some((n, o))) if !self.ordered || n == self.next_out => {
                    self.next_out += 1;
                    return Poll::Ready(Some(o));
                }
                Poll::Ready(Some((n, o))) => {
                    self.done.insert(n, o);
                }
                // (Ordered: every number below `next_in` was yielded, runs, or is in `done`;
                // with nothing running, `done` is empty, or holds `next_out`, taken above.)
                Poll::Ready(None) => return Poll::Ready(None),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

/// A stream of a [`Server`]'s outputs for a stream of inputs (made by [`Server::stream`]).
///
/// At most [`window`](Self::window) inputs are in flight (each also takes a place in the
/// server's capacity, waiting for one); the input is pulled only to refill the window, so
/// an endless input uses bounded memory. Results come in input order, or as they finish with
/// [`unordered`](Self::unordered). Errors follow the [`ErrorPolicy`]:
/// [`Deferred`](ErrorPolicy::Deferred) (each input gets its result; the default),
/// [`Immediate`](ErrorPolicy::Immediate) (the first error is yielded as soon as the stream
/// reaches it, and the stream ends; the items in flight are dropped, which cancels them
/// wherever they have not started; in an ordered stream an error is reached in input order,
/// after the items before it),
/// or [`WaitOthers`](ErrorPolicy::WaitOthers) (on the first error the stream stops taking
/// input, lets the items in flight finish, discards their results, then yields the error and
/// ends).
#[must_use = "a stream does nothing unless polled"]
pub struct ServiceStream<'s, S: Stage, St, K = Outputs> {
    server: &'s Server<S>,
    inputs: Option<St>,
    window: Window<ItemFuture<'s, S::In, S::Out>>,
    size: usize,
    policy: ErrorPolicy,
    timeout: Option<Duration>,
    /// An error held back by `WaitOthers` until the window drains.
    held: Option<(Option<S::In>, ServiceError)>,
    stopped: bool,
    ended: bool,
    _k: std::marker::PhantomData<K>,
}

impl<S: Stage, St, K> std::fmt::Debug for ServiceStream<'_, S, St, K> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServiceStream")
            .field("in_flight", &self.window.len())
            .field("window", &self.size)
            .field("policy", &self.policy)
            .finish_non_exhaustive()
    }
}

/// What a stream yields for one input: its outcome, with or without the input.
pub trait StreamShape<I, O>: Send + 'static {
    /// The item type.
    type Item;
    /// What is kept of the input until its outcome is yielded.
    #[doc(hidden)]
    fn keep(input: &I) -> Option<I>;
    /// Builds an item.
    #[doc(hidden)]
    fn item(input: Option<I>, r: Result<O, ServiceError>) -> Self::Item;
}

impl<I, O> StreamShape<I, O> for Outputs {
    type Item = Result<O, ServiceError>;
    fn keep(_: &I) -> Option<I> {
        None
    }
    fn item(_: Option<I>, r: Result<O, ServiceError>) -> Self::Item {
        r
    }
}

impl<I: Clone, O> StreamShape<I, O> for WithInputs {
    type Item = (I, Result<O, ServiceError>);
    fn keep(input: &I) -> Option<I> {
        Some(input.clone())
    }
    fn item(input: Option<I>, r: Result<O, ServiceError>) -> Self::Item {
        (
            input.expect("a WithInputs stream keeps every input until its outcome"),
            r,
        )
    }
}

impl<S: Stage> Server<S> {
    /// Runs every input of `inputs` (any [`Stream`], possibly endless) through the graph:
    /// see [`ServiceStream`]. The window starts at the server's capacity.
    pub fn stream<St: Stream<Item = S::In> + Unpin>(&self, inputs: St) -> ServiceStream<'_, S, St> {
        ServiceStream {
            server: self,
            inputs: Some(inputs),
            window: Window::new(),
            size: self.capacity(),
            policy: ErrorPolicy::Deferred,
            timeout: None,
            held: None,
            stopped: false,
            ended: false,
            _k: std::marker::PhantomData,
        }
    }

    /// [`stream`](Self::stream) over an iterator, as a blocking iterator (each `next` drives
    /// the window on the calling thread).
    pub fn stream_iter<I>(
        &self,
        inputs: I,
    ) -> futures_executor::BlockingStream<
        ServiceStream<'_, S, futures_util::stream::Iter<I::IntoIter>>,
    >
    where
        I: IntoIterator<Item = S::In>,
    {
        futures_executor::block_on_stream(self.stream(futures_util::stream::iter(inputs)))
    }
}

impl<'s, S: Stage, St: Stream<Item = S::In> + Unpin, K: StreamShape<S::In, S::Out>>
    ServiceStream<'s, S, St, K>
{
    /// At most `n` inputs in flight (at least 1).
    pub fn window(mut self, n: usize) -> Self {
        self.size = n.max(1);
        self
    }

    /// Results as they finish instead of in input order. Mid-way too: nothing in flight is
    /// lost, and the results held back for order come first.
    pub fn unordered(mut self) -> Self {
        self.window.ordered = false;
        self
    }

    /// What to do when an item fails (see [`ServiceStream`]).
    pub fn on_error(mut self, policy: ErrorPolicy) -> Self {
        self.policy = policy;
        self
    }

    /// A deadline for each item: `d` after it enters the window.
    pub fn timeout(mut self, d: Duration) -> Self {
        self.timeout = Some(d);
        self
    }

    /// Each input beside its outcome: items become `(input, Result<Out, ServiceError>)`.
    /// Call before polling.
    ///
    /// # Panics
    ///
    /// If the stream has already been polled (the inputs it took were not kept).
    pub fn with_inputs(self) -> ServiceStream<'s, S, St, WithInputs>
    where
        S::In: Clone + Sync,
    {
        assert!(
            self.window.next_in == 0,
            "with_inputs() must be called before the stream is first polled"
        );
        ServiceStream {
            server: self.server,
            inputs: self.inputs,
            window: self.window,
            size: self.size,
            policy: self.policy,
            timeout: self.timeout,
            held: None,
            stopped: self.stopped,
            ended: false,
            _k: std::marker::PhantomData,
        }
    }

    /// Items in flight now.
    pub fn in_flight(&self) -> usize {
        self.window.len()
    }

    fn launch(&mut self, input: S::In) {
        let server = self.server;
        let item = match self.timeout.or(server.timeout_default()) {
            Some(d) => Item::with_timeout(d),
            None => Item::new(),
        };
        let kept = K::keep(&input);
        self.window.push(Box::pin(async move {
            (kept, server.run(input, item, true).await)
        }));
    }
}

impl<S: Stage, St, K> Stream for ServiceStream<'_, S, St, K>
where
    St: Stream<Item = S::In> + Unpin,
    K: StreamShape<S::In, S::Out>,
{
    type Item = K::Item;

    fn poll_next(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<K::Item>> {
        let this = self.get_mut();
        loop {
            if this.ended {
                return Poll::Ready(None);
            }
            // Refill the window from the input (not after an error under WaitOthers, nor once
            // the server is shutting down).
            if this.server.is_closing() {
                this.stopped = true;
            }
            while !this.stopped && this.window.len() < this.size {
                let Some(inputs) = this.inputs.as_mut() else {
                    break;
                };
                match Pin::new(inputs).poll_next(cx) {
                    Poll::Ready(Some(x)) => this.launch(x),
                    Poll::Ready(None) => {
                        this.inputs = None;
                        break;
                    }
                    Poll::Pending => break,
                }
            }
            match this.window.poll_next(cx) {
                Poll::Ready(Some((input, r))) => {
                    let e = match r {
                        Ok(o) => {
                            if this.held.is_some() {
                                continue; // draining under WaitOthers: discarded
                            }
                            return Poll::Ready(Some(K::item(input, Ok(o))));
                        }
                        Err(e) => e,
                    };
                    match this.policy {
                        ErrorPolicy::Deferred => return Poll::Ready(Some(K::item(input, Err(e)))),
                        ErrorPolicy::Immediate => {
                            this.window.clear();
                            this.ended = true;
                            return Poll::Ready(Some(K::item(input, Err(e))));
                        }
                        ErrorPolicy::WaitOthers => {
                            this.stopped = true;
                            if this.held.is_none() {
                                this.held = Some((input, e));
                            }
                        }
                    }
                }
                Poll::Ready(None) => {
                    if let Some((input, e)) = this.held.take() {
                        this.ended = true;
                        return Poll::Ready(Some(K::item(input, Err(e))));
                    }
                    if this.inputs.is_none() || this.stopped {
                        this.ended = true;
                        return Poll::Ready(None);
                    }
                    // The input is pending and nothing is in flight: its waker is registered.
                    return Poll::Pending;
                }
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: Stage, St: Unpin, K> Unpin for ServiceStream<'_, S, St, K> {}
