//! The [`Worker`] trait users implement, the contexts their steps receive, and the worker
//! process's main loop.

pub(crate) mod batching;
pub(crate) mod boot;
pub(crate) mod func;
pub(crate) mod main_loop;

use crate::codec::Message;
use rkyv::Archived;

/// The error type a worker's steps may return: anything that converts into a boxed error
/// (`?` on any `std::error::Error`, or `"message".into()`).
pub type BoxError = Box<dyn std::error::Error + Send + Sync + 'static>;

/// A stateful worker: built once inside its own process by [`spawn`](Worker::spawn), then asked
/// to [`execute`](Worker::execute) many tasks with `&mut self`.
///
/// The four associated types are user types deriving rkyv's `Archive`, `Serialize` and
/// `Deserialize` (see [`Message`]). A task arrives *archived*: `execute` reads it in place in
/// shared memory, with no copy and no deserialisation.
///
/// # Example
///
/// ```
/// use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
///
/// struct Square { gpu_ids: Vec<u32> }
///
/// impl Worker for Square {
///     type SpawnArgs = Vec<u32>;   // the GPU ids this worker owns
///     type SpawnOutput = String;   // a greeting for whoever spawned it
///     type Task = i64;
///     type Output = i64;
///
///     fn spawn(gpu_ids: Vec<u32>, _ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
///         let msg = format!("ready on GPUs {gpu_ids:?}");
///         Ok((Square { gpu_ids }, msg))
///     }
///
///     fn execute(&mut self, task: &rkyv::Archived<i64>, _ctx: &TaskContext<'_>) -> Result<i64, BoxError> {
///         let v = task.to_native();
///         v.checked_mul(v).ok_or_else(|| "overflow".into())
///     }
/// }
/// ```
pub trait Worker: Sized + 'static {
    /// Arguments of the spawn step (e.g. the GPU ids a worker owns).
    type SpawnArgs: Message;
    /// What the spawn step returns to whoever spawned the worker.
    type SpawnOutput: Message;
    /// A task.
    type Task: Message;
    /// A task's result.
    type Output: Message;

    /// Runs once, inside the new worker process, with this worker's own arguments; builds the
    /// worker's state (load a model, open an index, …). An `Err` or a panic fails the
    /// corresponding `Pool::spawn` call and the process exits.
    ///
    /// The process may already have a second thread while this runs: with
    /// [`reserve_memory`](crate::PoolBuilder::reserve_memory) (the default), the first worker
    /// of a seat reserves its completion ring's memory on a short-lived thread (named
    /// `sp-reserve`, every signal blocked) beside this step, joined before the worker reports
    /// ready. So do not rely on being single-threaded here (`std::env::set_var`, `fork`
    /// without `exec`); do such things before `stateful_pool::init()` hands over, or in a
    /// program of your own.
    fn spawn(
        args: Self::SpawnArgs,
        ctx: &WorkerContext,
    ) -> Result<(Self, Self::SpawnOutput), BoxError>;

    /// Runs for every task this worker takes. `task` is the archived task, read in place in
    /// shared memory. An `Err` becomes that task's [`TaskError::Failed`](crate::TaskError)
    /// carrying the message, and the worker keeps serving. A panic becomes
    /// [`TaskError::Panicked`](crate::TaskError), and the worker keeps serving too, unless
    /// [`PoolBuilder::restart_on_panic`](crate::PoolBuilder::restart_on_panic) is on (then it
    /// is replaced by a fresh one).
    /// Returning a [`Poisoned`] error fails the task and replaces the worker.
    fn execute(
        &mut self,
        task: &Archived<Self::Task>,
        ctx: &TaskContext<'_>,
    ) -> Result<Self::Output, BoxError>;

    /// Takes back an output once it has been written into shared memory (the default drops
    /// it). A worker whose outputs own buffers can keep one here and fill it again for the
    /// next task, so that producing an output allocates nothing (the C ABI's workers do).
    fn recycle(&mut self, output: Self::Output) {
        drop(output);
    }

    /// Runs several tasks in one step, when the pool batches
    /// ([`PoolBuilder::batch_policy`](crate::PoolBuilder::batch_policy)): up to `max_batch`
    /// tasks that callers submitted independently, each read in place with its own context
    /// (task id, payload, deadline). Return one outcome per task, in order: a GPU model runs
    /// them as one forward pass. While batching is on (`max_batch` above 1, in a pool or a
    /// [`Threads`](crate::service::Threads) stage), every queued task goes through this method, a lone
    /// one as a batch of one; [`broadcast`](crate::Pool::broadcast) tasks and packed
    /// [`Pool::batch`](crate::Pool::batch) calls do not. The default runs [`execute`](Self::execute) on each in turn,
    /// each with its own outcome: a panic in one `execute` fails only that task (as
    /// [`TaskError::Panicked`](crate::TaskError)), the others of the step still run, and under
    /// the restart-on-panic policy the worker is replaced after the step.
    ///
    /// A wrong number of outcomes fails every task of the batch with a message saying so. An
    /// `Err` of the whole step fails each task with its message (a [`Poisoned`] one replaces
    /// the worker); a panic that escapes an override fails each task of the step as
    /// [`TaskError::Panicked`](crate::TaskError) and replaces the worker as a panic in
    /// `execute` does. Tasks cancelled or past their deadline before the step starts are not
    /// in the batch.
    ///
    /// ```
    /// # use stateful_pool::{BatchTask, BoxError, TaskContext, Worker, WorkerContext};
    /// struct Model;
    /// impl Worker for Model {
    ///     type SpawnArgs = ();
    ///     type SpawnOutput = ();
    ///     type Task = Vec<f32>;
    ///     type Output = f32;
    ///     fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> { Ok((Model, ())) }
    ///     fn execute(&mut self, x: &rkyv::Archived<Vec<f32>>, _: &TaskContext<'_>) -> Result<f32, BoxError> {
    ///         Ok(x.iter().map(|v| v.to_native()).sum())
    ///     }
    ///     fn execute_batch(&mut self, batch: &[BatchTask<'_, Vec<f32>>]) -> Result<Vec<Result<f32, BoxError>>, BoxError> {
    ///         // One pass over the whole batch (a real model stacks the inputs into a matrix).
    ///         Ok(batch.iter().map(|t| Ok(t.task.iter().map(|v| v.to_native()).sum())).collect())
    ///     }
    /// }
    /// ```
    #[allow(clippy::type_complexity)]
    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Self::Task>],
    ) -> Result<Vec<Result<Self::Output, BoxError>>, BoxError> {
        Ok(batch
            .iter()
            .map(|t| main_loop::catch_task_panic(|| self.execute(t.task, &t.ctx)))
            .collect())
    }
}

/// One task of a batch given to [`Worker::execute_batch`]: the archived task, read in place in
/// shared memory, and its own context.
pub struct BatchTask<'a, T: Message> {
    /// The task.
    pub task: &'a Archived<T>,
    /// Its context (task id, payload, deadline, cancellation).
    pub ctx: TaskContext<'a>,
}

impl<T: Message> std::fmt::Debug for BatchTask<'_, T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BatchTask")
            .field("ctx", &self.ctx)
            .finish_non_exhaustive()
    }
}

/// An error a worker returns from [`Worker::execute`] to declare itself unusable (a sticky CUDA
/// error, a corrupted native library): the task fails with
/// [`TaskError::Poisoned`](crate::TaskError::Poisoned), the process exits without running its
/// state's destructor, and the pool starts a fresh worker with the same spawn arguments.
///
/// ```
/// # use stateful_pool::{BoxError, Poisoned};
/// fn check(cuda_status: i32) -> Result<(), BoxError> {
///     if cuda_status == 700 {
///         return Err(Poisoned::new("CUDA error 700 (illegal address): context is unusable").into());
///     }
///     Ok(())
/// }
/// ```
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Poisoned(String);

impl Poisoned {
    /// A poison error with a message for the task's caller.
    pub fn new(message: impl Into<String>) -> Self {
        Poisoned(message.into())
    }

    /// The message.
    pub fn message(&self) -> &str {
        &self.0
    }
}

impl std::fmt::Display for Poisoned {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "worker poisoned: {}", self.0)
    }
}

impl std::error::Error for Poisoned {}

/// What a worker knows about itself, given to [`Worker::spawn`].
#[derive(Debug, Clone)]
pub struct WorkerContext {
    pub(crate) index: usize,
    pub(crate) generation: u32,
    pub(crate) pid: u32,
    pub(crate) gpus: Vec<u32>,
    #[cfg(feature = "cuda")]
    pub(crate) cuda: Vec<std::sync::Arc<cudarc::driver::CudaContext>>,
    pub(crate) payload_pinned: bool,
}

impl WorkerContext {
    /// The worker's seat index in the pool (0-based, stable across restarts of that seat).
    pub fn index(&self) -> usize {
        self.index
    }

    /// How many times this seat has been started (1 for the first start).
    pub fn generation(&self) -> u32 {
        self.generation
    }

    /// The worker's process id.
    pub fn pid(&self) -> u32 {
        self.pid
    }

    /// The GPUs this worker was spawned with ([`SpawnOptions::gpus`](crate::SpawnOptions::gpus)),
    /// as the machine numbers them; empty if none.
    pub fn gpu_ids(&self) -> &[u32] {
        &self.gpus
    }

    /// One CUDA context per assigned GPU, in the order of [`gpu_ids`](Self::gpu_ids), created
    /// in this worker process before its spawn step (feature `cuda`). A fresh process after a
    /// restart gets fresh contexts.
    #[cfg(feature = "cuda")]
    pub fn cuda(&self) -> &[std::sync::Arc<cudarc::driver::CudaContext>] {
        &self.cuda
    }

    /// Whether the shared-memory payload arena is registered as page-locked (pinned) host
    /// memory in this process, so host-to-device copies from
    /// [`TaskContext::payload`] run at pinned speed with no staging copy. True for a worker
    /// with GPUs under the `cuda` feature, unless the driver refused (e.g. `ulimit -l`).
    pub fn payload_pinned(&self) -> bool {
        self.payload_pinned
    }
}

/// What [`Worker::execute`] gets besides the task: who runs it, and a loaned payload.
#[derive(Debug)]
pub struct TaskContext<'a> {
    pub(crate) worker: &'a WorkerContext,
    pub(crate) task_id: u64,
    pub(crate) payload: &'a [u8],
    /// The task slot's state word (its `CANCELLED` bit), read by `is_cancelled`.
    pub(crate) state: &'a std::sync::atomic::AtomicU32,
    /// The task's deadline in `CLOCK_MONOTONIC` ns (0: none).
    pub(crate) deadline_ns: u64,
}

impl TaskContext<'_> {
    /// The worker running the task.
    pub fn worker(&self) -> &WorkerContext {
        self.worker
    }

    /// The task's pool-unique id (never reused; not consecutive). The tasks of one batch
    /// ([`Pool::batch`](crate::Pool::batch)) share the batch's id.
    pub fn task_id(&self) -> u64 {
        self.task_id
    }

    /// The payload the caller wrote in place through a [`Loan`](crate::Loan), read in place in
    /// shared memory (16-byte aligned). Empty if the task was submitted without one.
    pub fn payload(&self) -> &[u8] {
        self.payload
    }

    /// Whether the caller has given up on this task while it runs (it dropped the handle, or
    /// called [`TaskHandle::cancel`](crate::TaskHandle::cancel), or a map's error policy
    /// cancelled it). A long task can check this now and then and return early; its outcome
    /// is then discarded or delivered as the caller asked. One atomic load.
    pub fn is_cancelled(&self) -> bool {
        self.state.load(std::sync::atomic::Ordering::Relaxed) & crate::slot::bits::CANCELLED != 0
    }

    /// The latest time the caller wanted the task started
    /// ([`TaskOptions::deadline`](crate::TaskOptions::deadline)), if it gave one; a task
    /// that is already running may use it to cut its work short.
    pub fn deadline(&self) -> Option<std::time::Instant> {
        if self.deadline_ns == 0 {
            return None;
        }
        let now = crate::sys::mono_ns();
        let now_i = std::time::Instant::now();
        Some(if self.deadline_ns >= now {
            now_i + std::time::Duration::from_nanos(self.deadline_ns - now)
        } else {
            now_i
                .checked_sub(std::time::Duration::from_nanos(now - self.deadline_ns))
                .unwrap_or(now_i)
        })
    }
}
