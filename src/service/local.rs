//! A stage that runs a function in the parent, inline in the item's future: glue between
//! stages, an ensemble's combine step, a cheap check.

use super::error::{ServiceError, StageError};
use super::stage::{Item, Meter, Stage, StageFuture, StageStats};
use crate::{BoxError, TaskError};
use std::marker::PhantomData;

/// A function as a stage (made by [`local`](super::local)). It runs on whichever thread polls
/// the item (the caller's, or the executor's), so it should be quick; heavy work belongs in a
/// [`Threads`](super::Threads) or [`Process`](super::Process) stage. An `Err` or a panic fails
/// the item, naming the stage. A running function is not interrupted, and it runs inside the
/// call's own future, so nothing fails the call while it runs: an item's deadline is checked
/// before it starts, a later stage skips an item that expired meanwhile, but a slow *last*
/// stage can answer `Ok` after the deadline.
pub struct Local<I, O, F> {
    name: String,
    f: F,
    meter: Meter,
    _io: PhantomData<fn(I) -> O>,
}

impl<I, O, F> std::fmt::Debug for Local<I, O, F> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Local")
            .field("path", &self.meter.path)
            .finish_non_exhaustive()
    }
}

/// A stage named `name` that applies `f` to each item in the parent.
pub fn local<I, O, F>(name: &str, f: F) -> Local<I, O, F>
where
    F: Fn(I) -> Result<O, BoxError> + Send + Sync + 'static,
{
    Local {
        name: name.to_string(),
        f,
        meter: Meter::new(name, usize::MAX),
        _io: PhantomData,
    }
}

impl<I, O, F> Stage for Local<I, O, F>
where
    I: Send + 'static,
    O: Send + 'static,
    F: Fn(I) -> Result<O, BoxError> + Send + Sync + 'static,
{
    type In = I;
    type Out = O;

    fn run<'a>(&'a self, input: I, item: &'a Item) -> StageFuture<'a, O> {
        Box::pin(self.meter.admit(item, false, async move {
            let fail = |error| -> ServiceError {
                StageError {
                    path: self.meter.path.clone(),
                    worker: None,
                    pid: Some(std::process::id()),
                    error,
                }
                .into()
            };
            match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| (self.f)(input))) {
                Ok(Ok(o)) => Ok(o),
                Ok(Err(e)) => Err(fail(TaskError::Failed {
                    worker: 0,
                    message: crate::worker::main_loop::error_message(&e),
                })),
                Err(p) => Err(fail(TaskError::panicked(
                    0,
                    crate::worker::main_loop::panic_message(&*p),
                ))),
            }
        }))
    }

    fn attach(&mut self, prefix: &str) {
        self.meter.attach(prefix, &self.name);
    }

    fn report(&self, out: &mut Vec<StageStats>) {
        out.push(self.meter.stats("local"));
    }
}
