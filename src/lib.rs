//! # stateful-pool
//!
//! A pool of **stateful worker processes**: spawn each worker once (load a model onto its GPUs,
//! open a big index, warm up an engine), then execute many tasks on it from any number of
//! threads or async tasks, at the lowest latency we can reach.
//!
//! Tasks and results are [rkyv](https://docs.rs/rkyv) archives written directly into a
//! shared-memory segment and carried by lock-free rings: a bounded task queue that the next idle
//! worker pulls from, and one completion ring per worker back to the parent. Workers read tasks
//! in place; the parent copies each result out of shared memory and validates the copy before
//! it reads it, so nothing a worker does afterwards can change it. Large payloads are written
//! once into a buffer loaned from shared memory ([`Pool::loan`]).
//!
//! ## Quick start
//!
//! ```no_run
//! use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
//!
//! struct Square { gpu_ids: Vec<u32> }
//!
//! impl Worker for Square {
//!     type SpawnArgs = Vec<u32>;
//!     type SpawnOutput = String;
//!     type Task = i64;
//!     type Output = String;
//!
//!     // Runs once, in the worker's own process.
//!     fn spawn(gpu_ids: Vec<u32>, _: &WorkerContext) -> Result<(Self, String), BoxError> {
//!         let msg = format!("Worker initialized on GPU: {gpu_ids:?}");
//!         Ok((Square { gpu_ids }, msg))
//!     }
//!
//!     // Runs for every task; `task` is read in place in shared memory.
//!     fn execute(&mut self, task: &rkyv::Archived<i64>, _: &TaskContext<'_>) -> Result<String, BoxError> {
//!         let v = task.to_native();
//!         Ok(format!("Square of {v} is {} (GPU {:?})", v * v, self.gpu_ids))
//!     }
//! }
//!
//! fn main() -> Result<(), Box<dyn std::error::Error>> {
//!     stateful_pool::init(); // workers branch off here; must come first
//!
//!     let pool = Pool::<Square>::builder().queue_size(100).build()?;
//!     println!("{}", pool.spawn(&vec![0, 1])?);
//!     println!("{}", pool.execute(&100)?);
//!     Ok(())
//! } // dropping the pool finishes queued tasks and stops the workers
//! ```
//!
//! ## Submitting, batching, faults
//!
//! Every submit is a request ([`Pool::task`], or [`Pool::batch`] for many tasks in one slot)
//! with its options, sent by one of six verbs: `submit`, `try_submit`, `submit_timeout`,
//! `submit_async`, `execute`, `execute_async`. A task may be given in any form that archives as
//! the task type ([`ArchivesAs`]: a `&str` for a `String` task, a `&[u8]` for `Vec<u8>`).
//!
//! ```no_run
//! # use stateful_pool::{BatchPolicy, FnWorker, Pool};
//! # stateful_pool::task_fn! { fn Len(s: String, _ctx) -> u64 { Ok(s.as_str().len() as u64) } }
//! # fn demo(pool: &Pool<FnWorker<Len>>) -> Result<(), Box<dyn std::error::Error>> {
//! use std::time::Duration;
//! let n = pool.execute("a &str for a String task")?;
//! let handle = pool
//!     .task("with options")
//!     .timeout(Duration::from_secs(5)) // kill and restart the worker past 5 s of running
//!     .retries(1)                      // idempotent: re-run once if its worker dies
//!     .try_submit()?;                  // fail at once if the queue is full
//! let each = pool.batch(&["a".to_string(), "bb".to_string()]).execute()?;
//! // Workers run independently submitted tasks together (`Worker::execute_batch`).
//! pool.set_batch_policy(BatchPolicy::new(32))?;
//! # let _ = (n, handle, each); Ok(()) }
//! ```
//!
//! A worker that dies (crash, kill, timeout) costs only the tasks it held, which fail with
//! [`TaskError::WorkerDied`] (or run again under their retries), and is restarted; see
//! [`Pool`] and `ARCHITECTURE.md`, *Faults and recovery*.
//!
//! ## How a worker process starts
//!
//! A worker is the running program re-executed (never a bare `fork`, which is unsafe in a
//! multi-threaded parent and breaks CUDA). The re-executed program must reach [`init`] before
//! doing anything else; there it maps the pool's segment and serves, and never returns. In
//! `cargo test` integration tests and benches, where you do not write `main`, put
//! [`worker_hook!()`](worker_hook) at the top level of the test file instead.
//!
//! ## Large payloads
//!
//! A byte vector or string of several MiB in a task or result is copied into shared memory
//! once, with non-temporal stores from an eighth of the L3 cache up (4 MiB on a 32 MiB L3),
//! which skip reading the cold destination into the cache: W3's copying submit at 16 MiB ran
//! at 1.18× a plain `memcpy`, against 0.93× without (`BENCHMARKS.md`). Other containers may be
//! archived element by element and are copied as usual. [`Loan::copy_from_slice`] fills a loan
//! the same way. The environment variable `STATEFUL_POOL_STREAM_COPY_MIN` moves the threshold
//! (a size such as `8M`, at least 1 MiB) or turns streaming off (`off`). Each process reads it
//! once, at its first large copy: the parent, and each worker from its own environment (so
//! [`SpawnOptions::env`] can set it per worker).
//!
//! See `ARCHITECTURE.md` for the shared-memory layout and the ring protocols.

#![warn(missing_docs, missing_debug_implementations)]
// Under loom only the rings are compiled (the pool needs real processes): the rest is unused.
#![cfg_attr(stateful_pool_loom, allow(dead_code, unused))]

pub(crate) mod sync;

#[cfg(not(stateful_pool_loom))]
mod codec;
/// Deadlines from user-given durations, without overflow.
mod deadline;
#[cfg(not(stateful_pool_loom))]
mod error;
#[cfg(not(stateful_pool_loom))]
mod failpoint;
#[cfg(all(feature = "cuda", not(stateful_pool_loom)))]
mod gpu;
#[cfg(not(stateful_pool_loom))]
mod pool;
#[cfg(not(stateful_pool_loom))]
mod process;
pub(crate) mod ring;
#[cfg(not(stateful_pool_loom))]
pub mod service;
#[cfg(not(stateful_pool_loom))]
mod shm;
/// The task slot protocol: state word, transitions, outcomes.
pub(crate) mod slot;
#[cfg(not(stateful_pool_loom))]
mod sys;
#[cfg(not(stateful_pool_loom))]
mod telemetry;
#[cfg(not(stateful_pool_loom))]
mod worker;

#[cfg(not(stateful_pool_loom))]
pub use codec::ArchivesAs;
#[cfg(not(stateful_pool_loom))]
pub use codec::{Message, ShmWriter};
#[cfg(not(stateful_pool_loom))]
pub use error::{
    BuildError, ExitCause, NO_WORKER, Rejected, SpawnError, SubmitError, TaskError,
    WaitTimeoutError, WorkerError,
};
#[cfg(not(stateful_pool_loom))]
pub use pool::Pool;
#[cfg(not(stateful_pool_loom))]
pub use pool::batching::{BatchPolicy, BatchStats};
#[cfg(not(stateful_pool_loom))]
pub use pool::builder::{PoolBuilder, RestartPolicy, WaitStrategy};
#[cfg(not(stateful_pool_loom))]
pub use pool::events::{DeathReason, PoolEvent, PoolStats, WorkerInfo, WorkerState};
#[cfg(not(stateful_pool_loom))]
pub use pool::handle::{BatchHandle, Loan, ResultRef, SpawnHandle, TaskHandle};
#[cfg(not(stateful_pool_loom))]
pub use pool::map::{ErrorPolicy, Map, MapError, MapStream};
#[cfg(not(stateful_pool_loom))]
pub use pool::options::{SpawnOptions, THREAD_ENV_VARS, TaskOptions};
#[cfg(not(stateful_pool_loom))]
pub use pool::submit::{NoPayload, Payload, Submit, SubmitBatch};

/// Lazy maps over a pool: [`Pool::map`] (an iterator) and [`Pool::map_stream`] /
/// [`Pool::map_async`] (a [`Stream`](futures_core::Stream)), ordered or unordered, with a
/// bounded window of tasks in flight, an exact length for progress bars, and
/// [error policies](ErrorPolicy).
///
/// Every option works on both forms:
/// - [`window(n)`](Map::window): at most `n` of the map's tasks in flight (queued, running, or
///   finished and not yet yielded), so an endless input uses bounded memory; the input is
///   pulled only to refill the window. Default: the pool's `queue_size`.
/// - [`batch(n)`](Map::batch): up to `n` consecutive inputs per task slot, one hand-off for all
///   of them (tiny tasks run several times faster), each input still with its own result.
/// - [`unordered()`](Map::unordered): results as they finish instead of in input order.
/// - [`on_error(policy)`](Map::on_error): [`ErrorPolicy::Deferred`] (every input gets its
///   result), [`Immediate`](ErrorPolicy::Immediate) or [`WaitOthers`](ErrorPolicy::WaitOthers).
/// - [`indexed()`](Map::indexed) / [`with_inputs()`](Map::with_inputs): each result beside its
///   input's position, or beside the input itself.
/// - [`task_options(opts)`](Map::task_options): a timeout and retries for every task.
///
/// Over an exact-size input, [`Map`] is an [`ExactSizeIterator`], so any progress bar can show
/// it. Several maps and individual submits can share a pool from different threads: each map
/// collects only its own tasks, and a map never waits for a free task slot while it holds
/// finished results of its own (it yields those first), so maps sharing a small queue cannot
/// deadlock one another.
#[cfg(not(stateful_pool_loom))]
pub mod map {
    pub use crate::pool::map::{
        ErrorPolicy, Exact, Hint, Indexed, IterStream, Map, MapError, MapStream, Plain, Shape,
        WithInputs,
    };
}
/// The cudarc crate this build uses (feature `cuda`), so workers name the same types as the
/// contexts [`WorkerContext::cuda`] hands them.
#[cfg(all(feature = "cuda", not(stateful_pool_loom)))]
pub use cudarc;
#[cfg(not(stateful_pool_loom))]
pub use worker::func::{FnWorker, TaskFn};
#[cfg(not(stateful_pool_loom))]
pub use worker::{BatchTask, BoxError, Poisoned, TaskContext, Worker, WorkerContext};

/// rkyv, as the [`task_fn!`] macro names it (not an API).
#[doc(hidden)]
pub use rkyv as __rkyv;

/// Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`; not an API).
#[cfg(all(feature = "fuzzing", not(stateful_pool_loom)))]
#[doc(hidden)]
#[path = "fuzz.rs"]
pub mod __fuzz;

/// Turns this process into a worker if the pool launched it as one; otherwise returns at once
/// (a single environment lookup).
///
/// Call it first thing in `main`, before doing work: a worker process runs your program's code
/// up to this call. It **must run before any other thread starts** (a hard requirement: it
/// removes an environment variable, which is a data race with any thread reading the
/// environment). In a worker it never returns: it serves tasks until the pool shuts down, then
/// exits the process; should anything unwind inside it, the worker aborts rather than return
/// into your `main`.
///
/// It serves only pools of this very executable file: the worker checks that it runs the
/// parent's executable (device, inode, size, mtime of `/proc/self/exe`) before entering the
/// code the parent named. Started by a pool of another binary, it exits with code 121, which
/// the pool reports as [`SpawnError::Exited`]; a separate worker program calls [`serve`]
/// instead. A program running with elevated privileges (setuid, setgid, file capabilities)
/// refuses to be a worker (exit code 124).
#[cfg(not(stateful_pool_loom))]
pub fn init() {
    let Some(boot) = std::env::var_os(worker::boot::BOOT_ENV) else {
        return;
    };
    let boot = boot.to_string_lossy().into_owned();
    // SAFETY: `init` is documented to run before any other thread starts (first in `main`, or
    // from `worker_hook!`'s constructor, before `main`), so nothing reads the environment
    // concurrently. Removing the variable lets a worker build pools of its own.
    unsafe { std::env::remove_var(worker::boot::BOOT_ENV) };
    worker::boot::enter(&boot, worker::boot::Entry::Named)
}

/// Turns this process into a worker serving `W` if a pool launched it; otherwise returns at
/// once. For a dedicated worker program (set with
/// [`PoolBuilder::program`](crate::PoolBuilder::program)), which may be another binary than the
/// pool's: it serves the pool if its message types (`SpawnArgs`, `SpawnOutput`, `Task`,
/// `Output`) are the pool worker's, and refuses the segment otherwise. This is how a worker
/// written in Rust serves a C host: the C ABI's workers exchange `Vec<u8>` messages.
///
/// Call it first thing in `main`, before any other thread starts, like [`init`] (a hard
/// requirement, for the same reason). In a worker it never returns, like [`init`].
///
/// ```no_run
/// # use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
/// # struct Upper;
/// # impl Worker for Upper {
/// #     type SpawnArgs = Vec<u8>; type SpawnOutput = Vec<u8>; type Task = Vec<u8>; type Output = Vec<u8>;
/// #     fn spawn(_: Vec<u8>, _: &WorkerContext) -> Result<(Self, Vec<u8>), BoxError> { Ok((Upper, vec![])) }
/// #     fn execute(&mut self, t: &rkyv::Archived<Vec<u8>>, _: &TaskContext<'_>) -> Result<Vec<u8>, BoxError> {
/// #         Ok(t.as_slice().to_ascii_uppercase())
/// #     }
/// # }
/// fn main() {
///     stateful_pool::serve::<Upper>();
///     eprintln!("this program is a worker; a pool starts it");
/// }
/// ```
#[cfg(not(stateful_pool_loom))]
pub fn serve<W: Worker>() {
    let Some(boot) = std::env::var_os(worker::boot::BOOT_ENV) else {
        return;
    };
    let boot = boot.to_string_lossy().into_owned();
    // SAFETY: as in `init`: documented to run before any other thread starts.
    unsafe { std::env::remove_var(worker::boot::BOOT_ENV) };
    worker::boot::enter(
        &boot,
        worker::boot::Entry::Direct(worker::main_loop::run::<W>),
    )
}

/// Makes a binary whose `main` you do not write (a `cargo test` integration test, a criterion
/// bench) able to serve as a worker: expands to a constructor that calls [`init`] before `main`.
///
/// ```no_run
/// // tests/my_pool.rs
/// stateful_pool::worker_hook!();
///
/// #[test]
/// fn it_works() { /* build a Pool, spawn, execute */ }
/// # fn main() {}
/// ```
#[macro_export]
macro_rules! worker_hook {
    () => {
        #[used]
        #[unsafe(link_section = ".init_array")]
        static __STATEFUL_POOL_WORKER_HOOK: extern "C" fn() = {
            extern "C" fn __stateful_pool_worker_hook() {
                $crate::init();
            }
            __stateful_pool_worker_hook
        };
    };
}
