//! [`PoolBuilder`]: sizes, limits and wait strategy of a pool.

use super::Pool;
use super::events::PoolEvent;
use crate::error::BuildError;
use crate::worker::Worker;
use std::marker::PhantomData;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// When a dead worker is restarted, and when the pool gives up on it.
///
/// A worker that dies (crash, kill, `exit`, task timeout, poisoned, or a panic under
/// [`PoolBuilder::restart_on_panic`]) is started again with the same spawn arguments. Restarts
/// back off exponentially: the first within the window is immediate, the next waits
/// `backoff_initial`, then twice that, up to `backoff_max`. A seat that needs more than
/// `max_restarts` restarts within `window` (or whose restart keeps failing) is marked failed;
/// the pool keeps serving with the rest.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RestartPolicy {
    /// Restarts allowed within `window` before the seat is marked failed.
    pub max_restarts: u32,
    /// The sliding window the restarts are counted in.
    pub window: Duration,
    /// Delay before the second restart within the window (doubling after).
    pub backoff_initial: Duration,
    /// Upper bound of the delay.
    pub backoff_max: Duration,
}

impl Default for RestartPolicy {
    /// 5 restarts per minute, backing off from 50 ms to 2 s.
    fn default() -> Self {
        RestartPolicy {
            max_restarts: 5,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(50),
            backoff_max: Duration::from_secs(2),
        }
    }
}

impl RestartPolicy {
    /// Never restart: a dead worker's seat is marked failed at once.
    pub fn never() -> Self {
        RestartPolicy {
            max_restarts: 0,
            ..Self::default()
        }
    }

    /// Always restart at once, without limit or back-off (chaos tests, churn).
    pub fn unlimited() -> Self {
        RestartPolicy {
            max_restarts: u32::MAX,
            window: Duration::from_secs(1),
            backoff_initial: Duration::ZERO,
            backoff_max: Duration::ZERO,
        }
    }

    /// The delay before a restart when `recent` restarts already happened in the window.
    pub(crate) fn delay(&self, recent: u32) -> Duration {
        if recent == 0 {
            return Duration::ZERO;
        }
        let factor = 1u32.checked_shl(recent - 1).unwrap_or(u32::MAX);
        self.backoff_initial
            .saturating_mul(factor)
            .min(self.backoff_max)
    }
}

/// A callback receiving [`PoolEvent`]s (on the pool's supervisor thread: keep it short).
#[derive(Clone)]
pub(crate) struct EventHook(pub(crate) Arc<dyn Fn(&PoolEvent) + Send + Sync>);

impl std::fmt::Debug for EventHook {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("<event hook>")
    }
}

/// How waiting sides (idle workers, callers waiting for a result) wait.
///
/// Spinning answers fastest when the other side is about to deliver, but on a machine where
/// processes outnumber cores a spinner steals the core its peer needs. So the spin is always
/// bounded (polling purely for its first 3 µs, then yielding the CPU between polls), then
/// the waiter parks on a futex and burns no CPU. A thread whose recent waits were each won
/// right after a yield that briefly let another thread run (the sign of a peer on its own
/// CPU, which a pure spin cannot see) skips the pure polling and yields at once, trying it
/// again every 16th wait.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WaitStrategy {
    /// Spin for up to `spin`, then park. The default is 20 µs.
    SpinThenPark {
        /// Spin budget before parking.
        spin: Duration,
    },
    /// Park at once (lowest CPU use, a futex wake on every hand-off).
    Park,
}

impl Default for WaitStrategy {
    fn default() -> Self {
        WaitStrategy::SpinThenPark {
            spin: Duration::from_micros(20),
        }
    }
}

impl WaitStrategy {
    pub(crate) fn spin(&self) -> Duration {
        match *self {
            WaitStrategy::SpinThenPark { spin } => spin,
            WaitStrategy::Park => Duration::ZERO,
        }
    }
}

/// Settings of a pool, as given to the builder.
#[derive(Debug, Clone)]
pub(crate) struct Config {
    pub(crate) queue_size: usize,
    pub(crate) slot_bytes: usize,
    pub(crate) max_workers: usize,
    pub(crate) result_ring_bytes: usize,
    pub(crate) arena_bytes: usize,
    pub(crate) max_task_bytes: Option<usize>,
    pub(crate) spawn_area_bytes: usize,
    pub(crate) worker_wait: WaitStrategy,
    pub(crate) caller_wait: WaitStrategy,
    pub(crate) spawn_timeout: Duration,
    pub(crate) shutdown_timeout: Duration,
    pub(crate) program: Option<PathBuf>,
    pub(crate) restart: RestartPolicy,
    pub(crate) revive_after: Option<Duration>,
    pub(crate) restart_on_panic: bool,
    pub(crate) task_timeout: Option<Duration>,
    pub(crate) task_retries: u32,
    pub(crate) on_event: Option<EventHook>,
    pub(crate) worker_env: Vec<(String, String)>,
    pub(crate) reserve_memory: bool,
    pub(crate) batch: super::batching::BatchPolicy,
    /// Test hook (feature `failpoints`): later reservations fail (bit 1: seats' rings, bit 2:
    /// the arena), as on a machine out of memory.
    pub(crate) fail_reserve: u32,
    /// Test hook (feature `failpoints`): workers are launched by the fork fallback.
    pub(crate) fork_launcher: bool,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            queue_size: 256,
            slot_bytes: 1024,
            max_workers: 16,
            result_ring_bytes: 4 << 20,
            arena_bytes: 64 << 20,
            max_task_bytes: None,
            spawn_area_bytes: 64 << 10,
            worker_wait: WaitStrategy::default(),
            caller_wait: WaitStrategy::default(),
            spawn_timeout: Duration::from_secs(120),
            shutdown_timeout: Duration::from_secs(30),
            program: None,
            restart: RestartPolicy::default(),
            revive_after: None,
            restart_on_panic: false,
            task_timeout: None,
            task_retries: 0,
            on_event: None,
            worker_env: Vec::new(),
            reserve_memory: true,
            batch: super::batching::BatchPolicy::none(),
            fail_reserve: 0,
            fork_launcher: false,
        }
    }
}

/// Builds a [`Pool`]. Every setting has a default; `build` validates them.
///
/// ```no_run
/// # use stateful_pool::{Pool, Worker, WaitStrategy};
/// # fn f<W: Worker>() -> Result<(), stateful_pool::BuildError> {
/// let pool = Pool::<W>::builder()
///     .queue_size(1024)                 // tasks in flight at once
///     .max_workers(8)
///     .max_task_bytes(32 << 20)         // larger tasks are rejected with a clear error
///     .wait_strategy(WaitStrategy::Park)
///     .build()?;
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct PoolBuilder<W: Worker> {
    cfg: Config,
    _w: PhantomData<fn() -> W>,
}

impl<W: Worker> Default for PoolBuilder<W> {
    fn default() -> Self {
        Self::new()
    }
}

impl<W: Worker> PoolBuilder<W> {
    /// A builder with the defaults.
    pub fn new() -> Self {
        PoolBuilder {
            cfg: Config::default(),
            _w: PhantomData,
        }
    }

    /// Tasks that can be in flight (submitted and not yet collected) at once; a submit beyond
    /// it waits (`submit`) or fails with `QueueFull` (`try_submit`). Default 256.
    pub fn queue_size(mut self, n: usize) -> Self {
        self.cfg.queue_size = n;
        self
    }

    /// Bytes of each task slot's inline area (rounded up to 64). Task archives up to this size
    /// are written into the slot; larger ones go to the task arena. Default 1 KiB.
    pub fn slot_bytes(mut self, n: usize) -> Self {
        self.cfg.slot_bytes = n;
        self
    }

    /// Most workers alive at once (each has a seat with its own completion ring). Default 16.
    pub fn max_workers(mut self, n: usize) -> Self {
        self.cfg.max_workers = n;
        self
    }

    /// Bytes of each worker's completion ring; a result archive may be up to half of this minus
    /// a 32-byte record header, whatever the ring holds at the time (larger ones fail with
    /// `TaskError::ResultTooLarge`). Results that fit a task slot travel inline in the slot
    /// instead. Results nobody has collected yet never block a worker: the pool moves them out
    /// of the ring when the worker needs the room. Default 4 MiB, reserved by the seat's worker
    /// as it starts (see [`reserve_memory`](Self::reserve_memory)).
    pub fn result_ring_bytes(mut self, n: usize) -> Self {
        self.cfg.result_ring_bytes = n;
        self
    }

    /// Bytes of the task arena shared by large tasks and loans (rounded down to 64 bytes).
    /// Default 64 MiB, reserved in 4 MiB steps as it is first used (see
    /// [`reserve_memory`](Self::reserve_memory)). Under 64 means no arena: every task must fit
    /// its slot, and loans fail with [`SubmitError::PayloadTooLarge`](crate::SubmitError::PayloadTooLarge).
    pub fn task_arena_bytes(mut self, n: usize) -> Self {
        self.cfg.arena_bytes = n;
        self
    }

    /// Largest task archive or loan accepted, whether the task fits its slot or needs the
    /// arena; larger ones fail with
    /// [`SubmitError::PayloadTooLarge`](crate::SubmitError::PayloadTooLarge). Default and
    /// upper bound: the task arena size, or a slot's inline area
    /// ([`slot_bytes`](Self::slot_bytes)) if that is larger (a loan is capped by the arena);
    /// a larger `n` is lowered to that bound ([`Pool::max_task_bytes`](crate::Pool::max_task_bytes)
    /// reads the value in force).
    pub fn max_task_bytes(mut self, n: usize) -> Self {
        self.cfg.max_task_bytes = Some(n);
        self
    }

    /// Bytes reserved per worker for its spawn arguments and spawn output. Default 64 KiB.
    pub fn spawn_area_bytes(mut self, n: usize) -> Self {
        self.cfg.spawn_area_bytes = n;
        self
    }

    /// How idle workers wait for tasks and callers wait for results.
    pub fn wait_strategy(mut self, w: WaitStrategy) -> Self {
        self.cfg.worker_wait = w;
        self.cfg.caller_wait = w;
        self
    }

    /// How idle workers wait for tasks (overrides [`wait_strategy`](Self::wait_strategy)).
    ///
    /// The default spins 20 µs before parking, and a worker that has parked costs the next
    /// submitter a futex wake-up (a few µs on bare metal, tens of µs on some VMs, where it
    /// reaches a halted vCPU). If each worker's tasks arrive every few tens to hundreds of µs
    /// and the machine has a core to spare per worker, a spin that covers that gap
    /// (`SpinThenPark { spin: Duration::from_micros(200) }`) takes the wake-ups off the
    /// submitters' path, for that much CPU per gap. With more workers than spare cores, longer
    /// spins take the submitters' CPU instead; and where workers read large payloads, moving
    /// those bytes between the cores costs more than the wake-up (`BENCHMARKS.md`, W3).
    pub fn worker_wait(mut self, w: WaitStrategy) -> Self {
        self.cfg.worker_wait = w;
        self
    }

    /// How callers wait for results (overrides [`wait_strategy`](Self::wait_strategy)).
    pub fn caller_wait(mut self, w: WaitStrategy) -> Self {
        self.cfg.caller_wait = w;
        self
    }

    /// How long a worker's start-up and spawn step may take. Default 120 s.
    pub fn spawn_timeout(mut self, d: Duration) -> Self {
        self.cfg.spawn_timeout = d;
        self
    }

    /// How long shutdown waits for workers to finish the queue and exit before killing them.
    /// Default 30 s.
    pub fn shutdown_timeout(mut self, d: Duration) -> Self {
        self.cfg.shutdown_timeout = d;
        self
    }

    /// Runs workers from this program instead of the current executable. Either it is this very
    /// executable file (a hard link or another path to it; not a copy) whose `main` calls
    /// [`init`](crate::init), or it is any program whose `main` calls
    /// [`serve::<W>()`](crate::serve) for this pool's worker type. A different binary that calls
    /// `init()` is refused at start-up (exit code 121,
    /// [`SpawnError::Exited`](crate::SpawnError::Exited)). A relative path is resolved
    /// against the current directory when the pool is built (never looked up in `PATH`). A
    /// program that does not exist or cannot be executed fails each spawn with
    /// [`SpawnError::Launch`](crate::SpawnError::Launch), whose message names it.
    pub fn program(mut self, path: impl Into<PathBuf>) -> Self {
        self.cfg.program = Some(path.into());
        self
    }

    /// When dead workers are restarted. Default: [`RestartPolicy::default`].
    pub fn restart_policy(mut self, p: RestartPolicy) -> Self {
        self.cfg.restart = p;
        self
    }

    /// Starts a seat marked failed (out of restarts under the [`RestartPolicy`]) again `d`
    /// after it failed, with the same spawn arguments and options and its restart budget
    /// afresh: a long-running service recovers from a fault that outlasted the budget (a
    /// device reset, a dependency down for a while) without a restart of the process. A seat
    /// that fails again is revived again `d` after that, so a lasting fault costs one
    /// restart budget (up to `max_restarts + 1` start-ups, with their back-offs) per cycle of
    /// `d` plus the time the budget took. `d` is at least 100 ms (a shorter one is raised to
    /// it: a revival loop with no delay would be a crash loop). Meanwhile the seat reads
    /// [`WorkerState::Failed`](crate::WorkerState::Failed), and with no other worker tasks
    /// fail with `NoWorkers` at once, as without revival; the revived worker serves once its
    /// spawn step succeeds ([`PoolEvent::WorkerReviving`](crate::PoolEvent::WorkerReviving), then
    /// [`PoolEvent::WorkerRestarted`](crate::PoolEvent::WorkerRestarted)). A spawn goes to
    /// another free seat if there is one, and into this one only if not (then it replaces
    /// the revival); retiring the seat ([`Pool::retire_worker`](crate::Pool::retire_worker))
    /// or a shutdown cancels the revival. Default: off (a failed seat stays failed until a
    /// spawn fills it).
    pub fn revive_failed_after(mut self, d: Duration) -> Self {
        self.cfg.revive_after = Some(d.max(Duration::from_millis(100)));
        self
    }

    /// Whether a worker whose task panicked is replaced by a fresh one. The task fails with
    /// [`TaskError::Panicked`](crate::TaskError::Panicked) either way. Default `false`: the
    /// worker keeps serving, its state as the panic left it (an expensive state, a loaded
    /// model, is not rebuilt for one bad task; a thread stage does the same). Turn it on when
    /// a panic may leave the state half-updated and a fresh one is worth its spawn step; a
    /// worker can also ask for that itself, task by task, by returning
    /// [`Poisoned`](crate::Poisoned).
    pub fn restart_on_panic(mut self, yes: bool) -> Self {
        self.cfg.restart_on_panic = yes;
        self
    }

    /// Default limit on a task's execution time, counted from when a worker starts it. A task
    /// past it fails with [`TaskError::Timeout`](crate::TaskError::Timeout) and its worker is
    /// killed and restarted. Checked every few milliseconds. Default: none. Per task:
    /// [`TaskOptions::timeout`](crate::TaskOptions::timeout).
    pub fn task_timeout(mut self, d: Duration) -> Self {
        self.cfg.task_timeout = Some(d);
        self
    }

    /// Default number of times a task whose worker died is re-run on another (or the
    /// restarted) worker. Default 0 (at-most-once): only set it for idempotent work. Per
    /// task: [`TaskOptions::retries`](crate::TaskOptions::retries).
    pub fn task_retries(mut self, n: u32) -> Self {
        self.cfg.task_retries = n;
        self
    }

    /// Calls `f` for every [`PoolEvent`] (a worker died, restarted, failed; a task timed
    /// out). It runs on the pool's supervisor thread: keep it short and do not call back into
    /// the pool's spawn or shutdown from it. An event is reported after the tasks it is
    /// about were answered, so a caller holding a `WorkerDied` may not have seen its
    /// `WorkerDied` event yet: wait for the event (bounded) rather than read it at once.
    /// [`Pool::stats`](crate::Pool::stats) counts a fault *before* any task it touched is
    /// answered.
    pub fn on_event(mut self, f: impl Fn(&PoolEvent) + Send + Sync + 'static) -> Self {
        self.cfg.on_event = Some(EventHook(Arc::new(f)));
        self
    }

    /// Sets an environment variable for worker processes (e.g. `CUDA_VISIBLE_DEVICES`,
    /// `RUST_LOG`). A name that is empty or holds `=` or a NUL, or a value with a NUL, fails
    /// [`build`](Self::build) with [`BuildError::InvalidConfig`](crate::BuildError::InvalidConfig).
    pub fn worker_env(mut self, key: impl Into<String>, value: impl Into<String>) -> Self {
        self.cfg.worker_env.push((key.into(), value.into()));
        self
    }

    /// Whether the segment's memory is reserved before anyone can touch it (default `true`),
    /// so a shortage of memory is always an error, never a crash (SIGBUS) when a page is
    /// first touched: the queue, slots and control blocks at `build()`
    /// ([`BuildError::NoSpace`]), each seat's completion ring until one of the seat's workers
    /// has reported ready (by the worker, while its spawn step runs, before it reports ready:
    /// [`SpawnError::NoSpace`](crate::SpawnError::NoSpace)), and the task arena in 4 MiB
    /// steps as large tasks and loans first reach it
    /// ([`SubmitError::NoSpace`](crate::SubmitError::NoSpace)). So a pool costs memory for
    /// the workers it has and the arena it has used, not for `max_workers`. With `false`
    /// pages are committed as they are used, unchecked.
    pub fn reserve_memory(mut self, yes: bool) -> Self {
        self.cfg.reserve_memory = yes;
        self
    }

    /// Test hook (feature `failpoints`, not an API): the lazy reservations fail with `ENOSPC`
    /// (bit 1: a seat's completion ring, at spawn; bit 2: the task arena, at submit or loan).
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __fail_reservations(mut self, bits: u32) -> Self {
        self.cfg.fail_reserve = bits;
        self
    }

    /// Test hook (feature `failpoints`, not an API): workers are launched by the fallback
    /// launcher (`fork` + `exec`) instead of `posix_spawn`.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __fork_launcher(mut self) -> Self {
        self.cfg.fork_launcher = true;
        self
    }

    /// How workers batch independently submitted tasks into one
    /// [`execute_batch`](crate::Worker::execute_batch) step (default: no batching). Change
    /// it on a live pool with [`Pool::set_batch_policy`].
    pub fn batch_policy(mut self, policy: super::batching::BatchPolicy) -> Self {
        self.cfg.batch = policy;
        self
    }

    /// Creates the shared-memory segment and the pool's threads. No worker runs yet: call
    /// [`Pool::spawn`].
    pub fn build(self) -> Result<Pool<W>, BuildError> {
        Pool::from_config(self.cfg)
    }
}
