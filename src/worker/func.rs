//! Stateless workers: a task function instead of the four associated types of [`Worker`].
//!
//! The py_stateful_map seed allows plain functions where no per-worker state is needed. Here a
//! function is a type implementing [`TaskFn`] (usually written with the [`task_fn!`] macro),
//! and [`FnWorker`] turns it into a worker whose spawn step takes and returns `()`.
//!
//! [`task_fn!`]: crate::task_fn

use super::{BoxError, TaskContext, Worker, WorkerContext};
use crate::codec::Message;
use rkyv::Archived;
use std::marker::PhantomData;

/// A task function: what a stateless worker does with each task. Usually written with
/// [`task_fn!`](crate::task_fn).
pub trait TaskFn: 'static {
    /// A task.
    type Task: Message;
    /// A task's result.
    type Output: Message;
    /// Runs one task (read in place in shared memory).
    fn call(task: &Archived<Self::Task>, ctx: &TaskContext<'_>) -> Result<Self::Output, BoxError>;
}

/// A worker with no state that runs the task function `F`: spawn it with `()` and it answers
/// every task with `F::call`.
///
/// ```no_run
/// use stateful_pool::{FnWorker, Pool};
///
/// stateful_pool::task_fn! {
///     /// Squares a number.
///     pub fn Square(x: i64) -> i64 {
///         Ok(x.to_native() * x.to_native())
///     }
/// }
///
/// fn main() -> Result<(), Box<dyn std::error::Error>> {
///     stateful_pool::init();
///     let pool = Pool::<FnWorker<Square>>::builder().build()?;
///     for r in pool.spawn_n(&(), 2) {
///         r?;
///     }
///     assert_eq!(pool.execute(&7)?, 49);
///     Ok(())
/// }
/// ```
#[derive(Debug)]
pub struct FnWorker<F: TaskFn>(PhantomData<fn() -> F>);

impl<F: TaskFn> Worker for FnWorker<F> {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = F::Task;
    type Output = F::Output;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((FnWorker(PhantomData), ()))
    }

    fn execute(
        &mut self,
        task: &Archived<F::Task>,
        ctx: &TaskContext<'_>,
    ) -> Result<F::Output, BoxError> {
        F::call(task, ctx)
    }
}

/// Defines a task function (a [`TaskFn`]) for a stateless [`FnWorker`]: a unit type named as
/// the function, whose body gets the archived task (read in place) under the parameter's name
/// and, optionally, the [`TaskContext`] under a second name, and returns
/// `Result<Output, BoxError>`.
///
/// ```
/// stateful_pool::task_fn! {
///     /// Counts the bytes of a message.
///     pub fn CountBytes(msg: String, ctx) -> u64 {
///         let _ = ctx.task_id();
///         Ok(msg.as_str().len() as u64)
///     }
/// }
/// ```
#[macro_export]
macro_rules! task_fn {
    ($(#[$meta:meta])* $vis:vis fn $name:ident($task:ident: $task_ty:ty, $ctx:ident) -> $out:ty $body:block) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, Default)]
        $vis struct $name;

        impl $crate::TaskFn for $name {
            type Task = $task_ty;
            type Output = $out;
            fn call(
                $task: &$crate::__rkyv::Archived<$task_ty>,
                $ctx: &$crate::TaskContext<'_>,
            ) -> ::core::result::Result<$out, $crate::BoxError> $body
        }
    };
    ($(#[$meta:meta])* $vis:vis fn $name:ident($task:ident: $task_ty:ty) -> $out:ty $body:block) => {
        $crate::task_fn! {
            $(#[$meta])* $vis fn $name($task: $task_ty, _ctx) -> $out $body
        }
    };
}
