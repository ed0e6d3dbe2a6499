//! Services: stages of worker processes or threads, composed in sequence, as ensembles or
//! behind a switch, nested freely, with a [`Server`] in front (mpservice's servlets and
//! server, built on the pool, its batching workers and its deadlines).
//!
//! - **Stages** (the leaves): [`Process`] runs a [`Pool`](crate::Pool)'s worker processes
//!   (each optionally pinned to CPUs with [`SpawnOptions::cpus`](crate::SpawnOptions::cpus),
//!   batching under the pool's [`BatchPolicy`](crate::BatchPolicy)); [`Threads`] runs the same
//!   [`Worker`](crate::Worker) type on threads of this process; [`local`] applies a function
//!   in the parent (glue, or an ensemble's combine step). Process and thread stages have a
//!   bound on items in flight (`max_in_flight`); a local stage runs in its caller and has none.
//!   [`Process::with_payload`] makes a process stage whose items carry bulk bytes written in
//!   place into the pool's shared memory ([`WithPayload`]: an uploaded file, read by the
//!   worker as its task's payload).
//! - **Composition** ([`seq`], [`ensemble`], [`ensemble_vec`], [`switch`]): typed, so a
//!   stage's output must be the next stage's input or the program does not compile.
//! - **The [`Server`]**: `call` (blocking), `try_call` (fails at once when full),
//!   `call_timeout`, `call_async`, and `stream` (possibly endless input, ordered or not,
//!   inputs beside outputs, error policies, a window). Its capacity counts items anywhere in
//!   the graph; a deadline travels with each item; dropping a call cancels its item wherever
//!   it has not started.
//! - **Errors** ([`ServiceError`], [`StageError`]) name where they happened: the stage path
//!   (`seq[1]/ensemble[0]/Model`), the worker and its pid, the kind and message, and the
//!   worker's backtrace when it panicked (with `RUST_BACKTRACE=1` in the worker's
//!   environment). A worker's death fails only the item it was running in that stage.
//! - **Observability**: [`Server::stats`] returns each stage's queue depth, items in flight,
//!   queue-delay and execute-time percentiles, and batch sizes, in one call.
//! - **Shutdown**: [`Server::shutdown`] stops intake, drains, then closes the stages in graph
//!   order, bounded.
//!
//! ```no_run
//! use stateful_pool::service::{Process, Server, Threads, ensemble, local, seq, StageExt};
//! # use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
//! # struct Tokenize; struct Embed; struct Classify;
//! # impl Worker for Tokenize { type SpawnArgs = (); type SpawnOutput = (); type Task = String; type Output = Vec<u32>;
//! #   fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> { Ok((Tokenize, ())) }
//! #   fn execute(&mut self, t: &rkyv::Archived<String>, _: &TaskContext<'_>) -> Result<Vec<u32>, BoxError> { Ok(t.bytes().map(u32::from).collect()) } }
//! # impl Worker for Embed { type SpawnArgs = (); type SpawnOutput = (); type Task = Vec<u32>; type Output = Vec<f32>;
//! #   fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> { Ok((Embed, ())) }
//! #   fn execute(&mut self, t: &rkyv::Archived<Vec<u32>>, _: &TaskContext<'_>) -> Result<Vec<f32>, BoxError> { Ok(t.iter().map(|x| x.to_native() as f32).collect()) } }
//! # impl Worker for Classify { type SpawnArgs = (); type SpawnOutput = (); type Task = Vec<u32>; type Output = u32;
//! #   fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> { Ok((Classify, ())) }
//! #   fn execute(&mut self, t: &rkyv::Archived<Vec<u32>>, _: &TaskContext<'_>) -> Result<u32, BoxError> { Ok(t.len() as u32) } }
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! stateful_pool::init();
//! let tokenize = Threads::<Tokenize>::new("Tokenize");
//! tokenize.spawn(&())?;
//! let embed = Pool::<Embed>::new()?;
//! embed.spawn_n(&(), 2);
//! let classify = Pool::<Classify>::new()?;
//! classify.spawn(&())?;
//! let graph = seq((
//!     tokenize,
//!     ensemble((Process::new("Embed", embed), Process::new("Classify", classify))),
//!     local("combine", |(v, c): (Vec<f32>, u32)| Ok(v.len() as u32 + c)),
//! ));
//! let server = Server::new(graph, 64);
//! let n: u32 = server.call("hello".to_string())?;
//! # let _ = n; Ok(()) }
//! ```

mod compose;
mod error;
mod exec;
mod gate;
mod handoff;
mod jobs;
mod local;
mod process;
mod server;
mod stage;
mod stream;
mod thread;
mod thread_task;
mod timer;

pub use compose::{
    BoxStage, CollectAll, Ensemble, FailFast, Seq, StageExt, Switch, ensemble, ensemble_vec, seq,
    switch,
};
pub use error::{ServiceError, StageError};
#[doc(hidden)]
pub use handoff::{Handoff, Ready};
pub use local::{Local, local};
pub use process::{Process, ProcessWithPayload, WithPayload};
pub use server::{Server, ServerStats, ShutdownReport};
pub use stage::{Item, Percentiles, Stage, StageFuture, StageStats};
pub use stream::{Outputs, ServiceStream, StreamShape, WithInputs};
pub use thread::Threads;
pub use thread_task::{ThreadMap, ThreadTask};
