//! Composition: [`seq`] (each stage's output is the next one's input), [`ensemble`] (every
//! member gets the item; outputs in member order), [`switch`] (each item goes to the member a
//! function of it picks). Compositions are stages themselves, so they nest freely, and the
//! compiler checks every connection's types.
//!
//! Paths: a composition's members are named `seq[i]`, `ensemble[i]`, `switch[i]` under the
//! composition's own prefix, so a leaf two levels down reads `seq[1]/ensemble[0]/Model`.

use super::error::ServiceError;
use super::handoff::Handoff;
use super::stage::{Item, Stage, StageFuture, StageStats};
use futures_util::future::{join_all, try_join_all};
use std::marker::PhantomData;
use std::time::Instant;

/// A stage behind a box, for members chosen at run time ([`ensemble_vec`], [`switch`]).
pub type BoxStage<I, O> = Box<dyn Stage<In = I, Out = O>>;

impl<I: Send + 'static, O: Send + 'static> Stage for BoxStage<I, O> {
    type In = I;
    type Out = O;

    fn run<'a>(&'a self, input: I, item: &'a Item) -> StageFuture<'a, O> {
        (**self).run(input, item)
    }

    fn attach(&mut self, prefix: &str) {
        (**self).attach(prefix)
    }

    fn report(&self, out: &mut Vec<StageStats>) {
        (**self).report(out)
    }

    fn close(&self, by: Instant) {
        (**self).close(by)
    }

    fn close_now(&self) {
        (**self).close_now()
    }

    fn __takes_archived(&self) -> bool {
        (**self).__takes_archived()
    }

    fn __run_handoff<'a>(
        &'a self,
        input: Handoff<I>,
        item: &'a Item,
        archived_out: bool,
    ) -> StageFuture<'a, Handoff<O>> {
        (**self).__run_handoff(input, item, archived_out)
    }
}

/// Chaining and boxing for any stage.
pub trait StageExt: Stage + Sized {
    /// This stage, then `next` on its output: `a.then(b)` is `seq((a, b))`.
    fn then<N: Stage<In = Self::Out>>(self, next: N) -> Seq<(Self, N)> {
        seq((self, next))
    }

    /// This stage behind a box (to mix stage types in [`ensemble_vec`] or [`switch`]).
    fn boxed(self) -> BoxStage<Self::In, Self::Out> {
        Box::new(self)
    }
}

impl<S: Stage> StageExt for S {}

// ---- seq ----

/// Stages in sequence (made by [`seq`]).
#[derive(Debug)]
pub struct Seq<T>(T);

/// Stages in sequence, given as a tuple of 2 to 6 stages: the first gets the item, each next
/// one the previous one's output; the last one's output is the sequence's. An error anywhere
/// ends the item there.
///
/// ```
/// use stateful_pool::service::{Server, local, seq};
/// let parse = local("parse", |s: String| Ok(s.trim().parse::<u32>()?));
/// let double = local("double", |x: u32| Ok(x * 2));
/// let show = local("show", |x: u32| Ok(format!("={x}")));
/// let server = Server::new(seq((parse, seq((double, show)))), 8); // nests freely
/// assert_eq!(server.call(" 21 ".to_string()).unwrap(), "=42");
/// ```
///
/// A stage whose input is not the previous stage's output does not compile:
///
/// ```compile_fail
/// use stateful_pool::service::{Server, local, seq};
/// let parse = local("parse", |s: String| Ok(s.trim().parse::<u32>()?));
/// let shout = local("shout", |s: String| Ok(s.to_uppercase())); // takes a String, not a u32
/// let server = Server::new(seq((parse, shout)), 8);
/// ```
pub fn seq<T>(stages: T) -> Seq<T>
where
    Seq<T>: Stage,
{
    Seq(stages)
}

impl<T> Seq<T> {
    /// The stages, as the tuple given to [`seq`].
    pub fn members(&self) -> &T {
        &self.0
    }
}

macro_rules! seq_impl {
    (@next $self:ident $i:tt) => {
        $self.0.$i.__takes_archived()
    };
    ([$($s:ident $i:tt),+], $f:ident, $l:ident, [$($n:ident: $p:ident),+]) => {
        impl<$($s: Stage),+> Stage for Seq<($($s,)+)>
        where
            $($n: Stage<In = $p::Out>),+
        {
            type In = $f::In;
            type Out = $l::Out;

            fn run<'a>(&'a self, input: Self::In, item: &'a Item) -> StageFuture<'a, Self::Out> {
                Box::pin(async move {
                    self.__run_handoff(Handoff::Value(input), item, false)
                        .await?
                        .into_value()
                })
            }

            fn __takes_archived(&self) -> bool {
                self.0.0.__takes_archived()
            }

            /// Each member hands its output to the next archived when both are process
            /// stages (the zero-copy hand-off); the last member's as the caller asks.
            fn __run_handoff<'a>(
                &'a self,
                input: Handoff<Self::In>,
                item: &'a Item,
                archived_out: bool,
            ) -> StageFuture<'a, Handoff<Self::Out>> {
                let wants = [$(seq_impl!(@next self $i)),+];
                Box::pin(async move {
                    let x = input;
                    $(let x = self.0.$i.__run_handoff(
                        x,
                        item,
                        wants.get($i + 1).copied().unwrap_or(archived_out),
                    ).await?;)+
                    Ok(x)
                })
            }

            fn attach(&mut self, prefix: &str) {
                $(self.0.$i.attach(&format!("{prefix}seq[{}]/", $i));)+
            }

            fn report(&self, out: &mut Vec<StageStats>) {
                $(self.0.$i.report(out);)+
            }

            fn close(&self, by: Instant) {
                $(self.0.$i.close(by);)+
            }

            fn close_now(&self) {
                $(self.0.$i.close_now();)+
            }
        }
    };
}

seq_impl!([A 0, B 1], A, B, [B: A]);
seq_impl!([A 0, B 1, C 2], A, C, [B: A, C: B]);
seq_impl!([A 0, B 1, C 2, D 3], A, D, [B: A, C: B, D: C]);
seq_impl!([A 0, B 1, C 2, D 3, E 4], A, E, [B: A, C: B, D: C, E: D]);
seq_impl!([A 0, B 1, C 2, D 3, E 4, F 5], A, F, [B: A, C: B, D: C, E: D, F: E]);

// ---- ensemble ----

/// Ensemble mode: the first error ends the item, and members that have not started it are
/// cancelled (the default).
#[derive(Debug, Clone, Copy)]
pub struct FailFast;

/// Ensemble mode: every member runs the item to its end; each member's outcome is kept.
#[derive(Debug, Clone, Copy)]
pub struct CollectAll;

/// Every member gets a copy of the item, concurrently; made by [`ensemble`] (a tuple of
/// members of any stage types, outputs as a tuple) or [`ensemble_vec`] (boxed members of one
/// output type, outputs as a `Vec`). Outputs come in member order.
///
/// By default [`FailFast`]: the first member error fails the item at once, and the members
/// still working on it are dropped, which cancels the item wherever it has not started
/// (process and thread stages answer it cancelled without running it). With
/// [`collect_all`](Ensemble::collect_all) every member finishes and the output holds each
/// member's `Result`; but the item's deadline is the whole item's: once it passes in a member
/// ([`ServiceError::Timeout`] naming that member's stage), the item fails with it, as in any
/// other stage. Add a combine step with [`StageExt::then`] and a [`local`](super::local)
/// stage.
#[derive(Debug)]
pub struct Ensemble<T, M = FailFast> {
    members: T,
    _mode: PhantomData<M>,
}

/// A member's failure at the item's deadline ([`ServiceError::Timeout`]), which a
/// collect-all ensemble passes on as its own: the deadline is the whole item's, so past it the
/// item fails, whatever the other members gave.
fn deadline_error<T>(r: &Result<T, ServiceError>) -> Option<ServiceError> {
    match r {
        Err(e @ ServiceError::Timeout { .. }) => Some(e.clone()),
        _ => None,
    }
}

/// An ensemble of a tuple of 2 to 4 stages that take the same input (`Clone`): see
/// [`Ensemble`].
pub fn ensemble<T>(members: T) -> Ensemble<T>
where
    Ensemble<T>: Stage,
{
    Ensemble {
        members,
        _mode: PhantomData,
    }
}

/// An ensemble of any number of boxed stages with one input and one output type: see
/// [`Ensemble`]. Its output is a `Vec` in member order.
pub fn ensemble_vec<I, O>(members: Vec<BoxStage<I, O>>) -> Ensemble<Vec<BoxStage<I, O>>>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    Ensemble {
        members,
        _mode: PhantomData,
    }
}

impl<T, M> Ensemble<T, M> {
    /// The members, as given to [`ensemble`] or [`ensemble_vec`].
    pub fn members(&self) -> &T {
        &self.members
    }
}

impl<T> Ensemble<T, FailFast> {
    /// Every member runs the item to its end; the output holds each member's `Result`
    /// (but a deadline that passes fails the whole item: see [`Ensemble`]).
    pub fn collect_all(self) -> Ensemble<T, CollectAll> {
        Ensemble {
            members: self.members,
            _mode: PhantomData,
        }
    }
}

macro_rules! ensemble_members {
    ($($i:tt),+) => {
        fn attach(&mut self, prefix: &str) {
            $(self.members.$i.attach(&format!("{prefix}ensemble[{}]/", $i));)+
        }

        fn report(&self, out: &mut Vec<StageStats>) {
            $(self.members.$i.report(out);)+
        }

        fn close(&self, by: Instant) {
            $(self.members.$i.close(by);)+
        }

        fn close_now(&self) {
            $(self.members.$i.close_now();)+
        }
    };
}

macro_rules! ensemble_impl {
    ($first:ident $fi:tt, $($s:ident $i:tt $last:tt),+) => {
        impl<$first: Stage, $($s: Stage<In = $first::In>),+> Stage for Ensemble<($first, $($s,)+), FailFast>
        where
            $first::In: Clone + Sync,
        {
            type In = $first::In;
            type Out = ($first::Out, $($s::Out,)+);

            fn run<'a>(&'a self, input: Self::In, item: &'a Item) -> StageFuture<'a, Self::Out> {
                Box::pin(async move {
                    futures_util::try_join!(
                        self.members.$fi.run(input.clone(), item),
                        $(self.members.$i.run(ensemble_impl!(@input input $last), item)),+
                    )
                })
            }

            ensemble_members!($fi, $($i),+);
        }

        impl<$first: Stage, $($s: Stage<In = $first::In>),+> Stage for Ensemble<($first, $($s,)+), CollectAll>
        where
            $first::In: Clone + Sync,
        {
            type In = $first::In;
            type Out = (Result<$first::Out, ServiceError>, $(Result<$s::Out, ServiceError>,)+);

            fn run<'a>(&'a self, input: Self::In, item: &'a Item) -> StageFuture<'a, Self::Out> {
                Box::pin(async move {
                    let r = futures_util::join!(
                        self.members.$fi.run(input.clone(), item),
                        $(self.members.$i.run(ensemble_impl!(@input input $last), item)),+
                    );
                    match deadline_error(&r.$fi)$(.or_else(|| deadline_error(&r.$i)))+ {
                        Some(e) => Err(e),
                        None => Ok(r),
                    }
                })
            }

            ensemble_members!($fi, $($i),+);
        }
    };
    (@input $x:ident last) => { $x };
    (@input $x:ident more) => { $x.clone() };
}

ensemble_impl!(A 0, B 1 last);
ensemble_impl!(A 0, B 1 more, C 2 last);
ensemble_impl!(A 0, B 1 more, C 2 more, D 3 last);

/// The `Stage` methods of a composition over a `Vec` of boxed members named `$kind[i]`.
macro_rules! vec_members {
    ($kind:literal) => {
        fn attach(&mut self, prefix: &str) {
            self.attach_self(prefix);
            for (i, m) in self.members.iter_mut().enumerate() {
                m.attach(&format!("{prefix}{}[{i}]/", $kind));
            }
        }

        fn report(&self, out: &mut Vec<StageStats>) {
            self.members.iter().for_each(|m| m.report(out));
        }

        fn close(&self, by: Instant) {
            self.members.iter().for_each(|m| m.close(by));
        }

        fn close_now(&self) {
            self.members.iter().for_each(|m| m.close_now());
        }
    };
}

impl<I, O> Stage for Ensemble<Vec<BoxStage<I, O>>, FailFast>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    type In = I;
    type Out = Vec<O>;

    fn run<'a>(&'a self, input: I, item: &'a Item) -> StageFuture<'a, Vec<O>> {
        let runs: Vec<_> = self
            .members
            .iter()
            .map(|m| m.run(input.clone(), item))
            .collect();
        Box::pin(try_join_all(runs))
    }

    vec_members!("ensemble");
}

impl<I, O> Stage for Ensemble<Vec<BoxStage<I, O>>, CollectAll>
where
    I: Clone + Send + Sync + 'static,
    O: Send + 'static,
{
    type In = I;
    type Out = Vec<Result<O, ServiceError>>;

    fn run<'a>(&'a self, input: I, item: &'a Item) -> StageFuture<'a, Self::Out> {
        let runs: Vec<_> = self
            .members
            .iter()
            .map(|m| m.run(input.clone(), item))
            .collect();
        Box::pin(async move {
            let r = join_all(runs).await;
            match r.iter().find_map(deadline_error) {
                Some(e) => Err(e),
                None => Ok(r),
            }
        })
    }

    vec_members!("ensemble");
}

// ---- switch ----

/// Routes each item to one member, picked by a function of the input (made by [`switch`]).
pub struct Switch<I, O, R> {
    route: R,
    members: Vec<BoxStage<I, O>>,
    path: String,
}

impl<I, O, R> std::fmt::Debug for Switch<I, O, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Switch")
            .field("path", &self.path)
            .field("members", &self.members.len())
            .finish_non_exhaustive()
    }
}

/// A switch: `route(&input)` picks the member (an index into `members`) that runs the item.
/// An index out of range fails the item with [`ServiceError::Route`]; a route that panics
/// fails it with a [`StageError`](super::StageError) at the switch's path (a `Panicked`
/// error).
pub fn switch<I, O, R>(route: R, members: Vec<BoxStage<I, O>>) -> Switch<I, O, R>
where
    R: Fn(&I) -> usize + Send + Sync + 'static,
{
    Switch {
        route,
        members,
        path: "switch".to_string(),
    }
}

impl<I, O, R> Stage for Switch<I, O, R>
where
    I: Send + 'static,
    O: Send + 'static,
    R: Fn(&I) -> usize + Send + Sync + 'static,
{
    type In = I;
    type Out = O;

    fn run<'a>(&'a self, input: I, item: &'a Item) -> StageFuture<'a, O> {
        // A route that panics fails the item (named by the switch's path), as a local
        // stage's panic does: it must not unwind through the caller's call or stream.
        let i =
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.route)(&input))) {
                Ok(i) => i,
                Err(p) => {
                    let e = super::error::StageError {
                        path: self.path.clone(),
                        worker: None,
                        pid: Some(std::process::id()),
                        error: crate::TaskError::panicked(
                            0,
                            crate::worker::main_loop::panic_message(&*p),
                        ),
                    };
                    return Box::pin(async move { Err(e.into()) });
                }
            };
        match self.members.get(i) {
            Some(m) => m.run(input, item),
            None => {
                let e = ServiceError::Route {
                    stage: self.path.clone(),
                    index: i,
                    members: self.members.len(),
                };
                Box::pin(async move { Err(e) })
            }
        }
    }

    vec_members!("switch");
}

impl<I, O, R> Switch<I, O, R> {
    fn attach_self(&mut self, prefix: &str) {
        self.path = format!("{prefix}switch");
    }
}

impl<T, M> Ensemble<T, M> {
    /// An ensemble has no path of its own (only its members do).
    fn attach_self(&mut self, _prefix: &str) {}
}
