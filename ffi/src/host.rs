//! The host side: create a pool, spawn workers, submit tasks (copied, or written in place into
//! a loaned buffer), wait for results (blocking, with a timeout, or polling), read them in place,
//! shut down.

use crate::handles::{Table, check_not_forked, watch_forks};
use crate::worker::CWorker;
use crate::{Fail, guard, input_bytes, sp_status, write_out};
use stateful_pool::{
    BatchPolicy, BuildError, Loan, Pool, RestartPolicy, ResultRef, SpawnError, SpawnOptions,
    SubmitError, TaskError, TaskHandle, WorkerError,
};
use std::ffi::{CStr, c_char};
use std::sync::Arc;
use std::time::Duration;

/// A pool (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_pool {
    /// The handle's value (opaque).
    pub id: u64,
}

/// A submitted task (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_task {
    /// The handle's value (opaque).
    pub id: u64,
}

/// A task's result or a spawn's output: bytes to read with `sp_result_bytes`, then release with
/// `sp_result_free` (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_result {
    /// The handle's value (opaque).
    pub id: u64,
}

/// A writable buffer in the pool's shared memory, sent with a task as its payload (a handle;
/// 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_loan {
    /// The handle's value (opaque).
    pub id: u64,
}

/// A byte range given by the caller (spawn arguments for `sp_pool_spawn_many`).
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_bytes {
    /// The bytes (may be NULL if `len` is 0).
    pub data: *const u8,
    /// Their length.
    pub len: usize,
}

/// Pool options. Zero in any field means the library's default; fill with
/// `sp_pool_options_init` (or `= {0}`) and set what you need.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_pool_options {
    /// Task slots: the bound on tasks queued or running (default 256).
    pub queue_size: usize,
    /// Worker seats (default 16).
    pub max_workers: usize,
    /// Bytes of a task slot's inline area; larger tasks go to the arena (default 1024).
    pub slot_bytes: usize,
    /// Bytes of the shared arena for large tasks and loans (default 64 MiB).
    pub task_arena_bytes: usize,
    /// Bytes of each worker's completion ring; a result may take up to half (default 4 MiB).
    pub result_ring_bytes: usize,
    /// Largest task or loan accepted, in bytes (default and upper bound: the arena size, or
    /// a slot's inline area if that is larger; a loan is capped by the arena). A task is
    /// measured as it travels: its bytes padded to a multiple of 4, plus 8 bytes of framing
    /// (so with 2000 the largest task is 1992 bytes); a loan is measured as it is. A larger
    /// value is lowered to the bound.
    pub max_task_bytes: usize,
    /// Bytes for each worker's spawn arguments and output (default 64 KiB).
    pub spawn_area_bytes: usize,
    /// Limit on a worker's spawn step, in milliseconds (default 120 s).
    pub spawn_timeout_ms: u64,
    /// How long shutdown waits for running tasks before killing workers, ms (default 30 s).
    pub shutdown_timeout_ms: u64,
    /// Default execution timeout of every task, ms (0: none).
    pub task_timeout_ms: u64,
    /// Default retries of a task whose worker died (0: none; only for idempotent tasks).
    pub task_retries: u32,
    /// Path of the worker program (NUL-terminated); NULL: this program, which must then call
    /// `sp_init` first thing in `main`.
    pub program: *const c_char,
    /// Restarts of one worker seat allowed within `restart_window_ms` before the seat is marked
    /// failed. 0: the default (5); negative: never restart (a dead worker's seat fails at once).
    pub max_restarts: i64,
    /// The sliding window restarts are counted in, ms (0: the default, 60 s).
    pub restart_window_ms: u64,
    /// Delay before the second restart within the window, ms, doubling after (0: the default,
    /// 50 ms; negative: no delay).
    pub restart_backoff_initial_ms: i64,
    /// Upper bound of the restart delay, ms (0: the default, 2 s; negative: no delay).
    pub restart_backoff_max_ms: i64,
    /// Whether a worker whose task panicked (in a Rust worker) is replaced by a fresh one.
    /// 0: the default (no, it keeps serving); positive: yes; negative: no.
    pub restart_on_panic: i32,
    /// Dynamic batching: the most tasks a worker runs in one batch step (its
    /// `execute_batch` callback, or `execute` on each). 0 or 1: no batching (the default);
    /// at most 64.
    pub max_batch: usize,
    /// How long a free worker may wait for a fuller batch, counted from the oldest waiting
    /// task's submission, in microseconds (0: never wait; it never waits while another
    /// worker is idle either).
    pub max_batch_delay_us: u64,
    /// A seat marked failed (out of restarts) is started again this long after, in ms, with
    /// the same spawn arguments and its restart budget afresh, again while the fault lasts
    /// (0: never, the default: it stays failed until a spawn fills it). Added in ABI version 4.
    pub revive_after_ms: u64,
}

pub(crate) type CPool = Pool<CWorker>;

/// What a result handle holds: a task's result (a private, aligned copy made when it was
/// collected, its slot then freed), or a spawn output.
pub(crate) enum Bytes {
    InPlace(ResultRef<Vec<u8>>),
    /// A spawn output, copied into 16-byte-aligned storage (as `sp_result_bytes` promises,
    /// whatever the allocator's own alignment for small blocks).
    Owned(rkyv::util::AlignedVec<16>),
}

impl Bytes {
    /// A spawn output's bytes, in aligned storage.
    pub(crate) fn owned(bytes: &[u8]) -> Bytes {
        let mut v = rkyv::util::AlignedVec::<16>::with_capacity(bytes.len());
        v.extend_from_slice(bytes);
        Bytes::Owned(v)
    }
}

pub(crate) static POOLS: Table<Arc<CPool>> = Table::new(1, "pool");
pub(crate) static TASKS: Table<TaskHandle<Vec<u8>>> = Table::new(2, "task");
pub(crate) static RESULTS: Table<Bytes> = Table::new(3, "result");
pub(crate) static LOANS: Table<Loan> = Table::new(4, "loan");

pub(crate) fn pool(p: sp_pool) -> Result<Arc<CPool>, Fail> {
    POOLS.with(p.id, |pool| pool.clone())
}

/// The body of every `_free`: a zero handle is a no-op (rustls-ffi style: cleanup paths need no
/// check); any other handle must be live.
pub(crate) fn free_handle<T>(table: &Table<T>, id: u64) -> Result<(), Fail> {
    if id == 0 {
        return Ok(());
    }
    table.remove(id).map(drop)
}

pub(crate) fn build_fail(e: BuildError) -> Fail {
    Fail::new(sp_status::SP_BUILD_FAILED, e.to_string())
}

pub(crate) fn spawn_fail(e: SpawnError) -> Fail {
    let status = match e {
        SpawnError::Shutdown => sp_status::SP_SHUTDOWN,
        SpawnError::ArgsTooLarge { .. } | SpawnError::OutputTooLarge { .. } => {
            sp_status::SP_TOO_LARGE
        }
        SpawnError::CpuNotAllowed { .. } => sp_status::SP_INVALID_ARGUMENT,
        _ => sp_status::SP_SPAWN_FAILED,
    };
    Fail::new(status, e.to_string())
}

pub(crate) fn submit_fail(e: SubmitError) -> Fail {
    let status = match e {
        SubmitError::QueueFull => sp_status::SP_QUEUE_FULL,
        SubmitError::Timeout => sp_status::SP_TIMEOUT,
        SubmitError::PayloadTooLarge { .. } => sp_status::SP_TOO_LARGE,
        SubmitError::Encode(_) => sp_status::SP_INVALID_ARGUMENT,
        SubmitError::Shutdown => sp_status::SP_SHUTDOWN,
        SubmitError::ForeignLoan => sp_status::SP_INVALID_ARGUMENT,
        SubmitError::NoWorkers => sp_status::SP_NO_WORKERS,
        SubmitError::Broken { .. } => sp_status::SP_SHUTDOWN,
        // A kind added later: the message says which.
        _ => sp_status::SP_INVALID_ARGUMENT,
    };
    Fail::new(status, e.to_string())
}

pub(crate) fn task_fail(e: TaskError) -> Fail {
    let status = match &e {
        TaskError::Submit(s) => return submit_fail(s.clone()),
        TaskError::Failed { .. } => sp_status::SP_TASK_FAILED,
        TaskError::Panicked { .. } => sp_status::SP_TASK_PANICKED,
        TaskError::ResultTooLarge { .. } => sp_status::SP_TOO_LARGE,
        TaskError::BadTask { .. } | TaskError::BadResult { .. } => sp_status::SP_BAD_DATA,
        TaskError::Cancelled => sp_status::SP_CANCELLED,
        TaskError::WorkerDied { .. } => sp_status::SP_WORKER_DIED,
        TaskError::Timeout { .. } => sp_status::SP_TASK_TIMED_OUT,
        TaskError::Poisoned { .. } => sp_status::SP_POISONED,
        TaskError::NoWorkers => sp_status::SP_NO_WORKERS,
        TaskError::PoolBroken => sp_status::SP_SHUTDOWN,
        // A kind added later: the message says which.
        _ => sp_status::SP_TASK_FAILED,
    };
    Fail::new(status, e.to_string())
}

/// The restart policy `o` asks for (0 in a field: the default's value).
fn restart_policy(o: &sp_pool_options) -> RestartPolicy {
    let d = RestartPolicy::default();
    let ms = |v: i64, default: Duration| match v {
        0 => default,
        v if v < 0 => Duration::ZERO,
        v => Duration::from_millis(v as u64),
    };
    RestartPolicy {
        max_restarts: match o.max_restarts {
            0 => d.max_restarts,
            v if v < 0 => 0,
            v => u32::try_from(v).unwrap_or(u32::MAX),
        },
        window: match o.restart_window_ms {
            0 => d.window,
            v => Duration::from_millis(v),
        },
        backoff_initial: ms(o.restart_backoff_initial_ms, d.backoff_initial),
        backoff_max: ms(o.restart_backoff_max_ms, d.backoff_max),
    }
}

/// Fills `opts` with the defaults (all zero: every field means "the library's default").
///
/// # Safety
///
/// `opts` must be NULL (refused with `SP_NULL_ARGUMENT`) or valid for a write of
/// `sp_pool_options`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_options_init(opts: *mut sp_pool_options) -> sp_status {
    guard(|| {
        let zero = sp_pool_options {
            queue_size: 0,
            max_workers: 0,
            slot_bytes: 0,
            task_arena_bytes: 0,
            result_ring_bytes: 0,
            max_task_bytes: 0,
            spawn_area_bytes: 0,
            spawn_timeout_ms: 0,
            shutdown_timeout_ms: 0,
            task_timeout_ms: 0,
            task_retries: 0,
            program: std::ptr::null(),
            max_restarts: 0,
            restart_window_ms: 0,
            restart_backoff_initial_ms: 0,
            restart_backoff_max_ms: 0,
            restart_on_panic: 0,
            max_batch: 0,
            max_batch_delay_us: 0,
            revive_after_ms: 0,
        };
        // SAFETY: the caller promises a writable struct (NULL is refused).
        unsafe { write_out(opts, zero, "opts") }
    })
}

/// Creates a pool with `opts` (NULL: all defaults) and no workers; `*out` receives its handle.
/// Thread-safe.
///
/// In the child of a `fork()` (without exec) of a process that created a pool, every call on
/// that pool, its tasks, results and loans returns `SP_SHUTDOWN`, and so does this function.
///
/// # Safety
///
/// `opts` must be NULL or point to a valid `sp_pool_options` (its `program` NULL or a
/// NUL-terminated string); `out` must be valid for a write.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_new(opts: *const sp_pool_options, out: *mut sp_pool) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        check_not_forked()?;
        watch_forks()?;
        let mut b = Pool::<CWorker>::builder();
        if !opts.is_null() {
            // SAFETY: non-null; the caller promises a valid struct.
            let o = unsafe { *opts };
            let nz = |v: usize| (v != 0).then_some(v);
            if let Some(v) = nz(o.queue_size) {
                b = b.queue_size(v);
            }
            if let Some(v) = nz(o.max_workers) {
                b = b.max_workers(v);
            }
            if let Some(v) = nz(o.slot_bytes) {
                b = b.slot_bytes(v);
            }
            if let Some(v) = nz(o.task_arena_bytes) {
                b = b.task_arena_bytes(v);
            }
            if let Some(v) = nz(o.result_ring_bytes) {
                b = b.result_ring_bytes(v);
            }
            if let Some(v) = nz(o.max_task_bytes) {
                b = b.max_task_bytes(v);
            }
            if let Some(v) = nz(o.spawn_area_bytes) {
                b = b.spawn_area_bytes(v);
            }
            if o.spawn_timeout_ms != 0 {
                b = b.spawn_timeout(Duration::from_millis(o.spawn_timeout_ms));
            }
            if o.shutdown_timeout_ms != 0 {
                b = b.shutdown_timeout(Duration::from_millis(o.shutdown_timeout_ms));
            }
            if o.task_timeout_ms != 0 {
                b = b.task_timeout(Duration::from_millis(o.task_timeout_ms));
            }
            if o.task_retries != 0 {
                b = b.task_retries(o.task_retries);
            }
            if o.max_restarts != 0
                || o.restart_window_ms != 0
                || o.restart_backoff_initial_ms != 0
                || o.restart_backoff_max_ms != 0
            {
                b = b.restart_policy(restart_policy(&o));
            }
            if o.restart_on_panic != 0 {
                b = b.restart_on_panic(o.restart_on_panic > 0);
            }
            if o.revive_after_ms != 0 {
                b = b.revive_failed_after(Duration::from_millis(o.revive_after_ms));
            }
            if Duration::from_micros(o.max_batch_delay_us) > MAX_BATCH_DELAY {
                return Err(Fail::new(
                    sp_status::SP_BUILD_FAILED,
                    format!(
                        "opts.max_batch_delay_us of {} is over an hour",
                        o.max_batch_delay_us
                    ),
                ));
            }
            if o.max_batch > 1 {
                b = b.batch_policy(batch_policy(o.max_batch, o.max_batch_delay_us));
            }
            if !o.program.is_null() {
                // SAFETY: non-null; the caller promises a NUL-terminated string.
                let p = unsafe { CStr::from_ptr(o.program) };
                let Ok(p) = p.to_str() else {
                    return Err(Fail::new(
                        sp_status::SP_INVALID_ARGUMENT,
                        "opts.program is not valid UTF-8",
                    ));
                };
                b = b.program(p);
            }
        }
        let pool = b.build().map_err(build_fail)?;
        let h = POOLS.insert(Arc::new(pool));
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_pool { id: h }) };
        Ok(())
    })
}

/// The longest batch delay accepted (as `BatchPolicy`'s own check).
const MAX_BATCH_DELAY: Duration = Duration::from_secs(3600);

fn batch_policy(max_batch: usize, delay_us: u64) -> BatchPolicy {
    if max_batch <= 1 {
        return BatchPolicy::none();
    }
    BatchPolicy::new(max_batch).max_delay(Duration::from_micros(delay_us))
}

/// Changes a live pool's dynamic batching (as `sp_pool_options.max_batch` and
/// `max_batch_delay_us`): each worker applies it from its next batch. `max_batch` 0 or 1 turns
/// batching off; above 64, or a delay over an hour, is `SP_INVALID_ARGUMENT`. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn sp_pool_set_batch_policy(
    pool_h: sp_pool,
    max_batch: usize,
    max_batch_delay_us: u64,
) -> sp_status {
    guard(|| {
        let p = pool(pool_h)?;
        // The delay's bound holds whatever `max_batch` (a policy that turns batching off keeps
        // no delay, so its own check would not see one).
        if Duration::from_micros(max_batch_delay_us) > MAX_BATCH_DELAY {
            return Err(Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                format!("max_batch_delay_us of {max_batch_delay_us} is over an hour"),
            ));
        }
        p.set_batch_policy(batch_policy(max_batch, max_batch_delay_us))
            .map_err(|e| Fail::new(sp_status::SP_INVALID_ARGUMENT, e.to_string()))
    })
}

/// Starts a worker process with the spawn argument bytes `args` and blocks until its spawn step
/// returned. `*out` receives the spawn output's bytes as a result handle (free it with
/// `sp_result_free`); `*worker_index`, if not NULL, the worker's seat index. Thread-safe: spawns
/// from several threads start concurrently. `SP_TOO_LARGE` if the arguments or the spawn output
/// do not fit the spawn area (`spawn_area_bytes`); `SP_SPAWN_FAILED` if the spawn step failed.
///
/// # Safety
///
/// `args` must point to `args_len` readable bytes (NULL if 0); `out` must be writable;
/// `worker_index` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_spawn(
    pool_h: sp_pool,
    args: *const u8,
    args_len: usize,
    out: *mut sp_result,
    worker_index: *mut usize,
) -> sp_status {
    // SAFETY: the same contract, with no options (NULL is allowed for them).
    unsafe { sp_pool_spawn_with(pool_h, args, args_len, std::ptr::null(), out, worker_index) }
}

/// Starts `n` workers at once, worker `i` with the argument bytes `args[i]`, and waits for all
/// of them. `outs[i]` receives worker `i`'s spawn output (a result handle, or 0 if it failed)
/// and `statuses[i]` its status. Returns `SP_OK` if every spawn succeeded, else the first
/// failure's status (and its message). Thread-safe.
///
/// # Safety
///
/// `args` must point to `n` `sp_bytes` (each valid as for `sp_pool_spawn`); `outs` and
/// `statuses` must each be writable for `n` elements.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_spawn_many(
    pool_h: sp_pool,
    args: *const sp_bytes,
    n: usize,
    outs: *mut sp_result,
    statuses: *mut sp_status,
) -> sp_status {
    guard(|| {
        // The handle is checked even when there is nothing to spawn.
        let _ = pool(pool_h)?;
        if n == 0 {
            return Ok(());
        }
        if args.is_null() || outs.is_null() || statuses.is_null() {
            return Err(Fail::null("args, outs or statuses"));
        }
        if n > (isize::MAX as usize) / size_of::<sp_bytes>() {
            return Err(Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                "n is out of range",
            ));
        }
        let p = pool(pool_h)?;
        // SAFETY: non-null; the caller promises `n` elements.
        let args = unsafe { std::slice::from_raw_parts(args, n) };
        let mut handles = Vec::with_capacity(n);
        for a in args {
            // SAFETY: the caller promises each element describes readable bytes.
            let r = unsafe { input_bytes(a.data, a.len, "args[i]") }
                .and_then(|b| p.submit_spawn(&b.to_vec()).map_err(spawn_fail));
            handles.push(r);
        }
        let mut first: Option<Fail> = None;
        for (i, h) in handles.into_iter().enumerate() {
            let r = h.and_then(|h| h.wait().map_err(spawn_fail));
            let (id, status) = match r {
                Ok(bytes) => (RESULTS.insert(Bytes::owned(&bytes)), sp_status::SP_OK),
                Err(f) => {
                    let s = f.status;
                    first.get_or_insert(f);
                    (0, s)
                }
            };
            // SAFETY: i < n; the caller promises `n` writable elements in each array.
            unsafe {
                outs.add(i).write(sp_result { id });
                statuses.add(i).write(status);
            }
        }
        match first {
            Some(f) => Err(f),
            None => Ok(()),
        }
    })
}

/// How many workers are serving now (spawned and not dead). Thread-safe.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_num_workers(pool_h: sp_pool, out: *mut usize) -> sp_status {
    guard(|| {
        let n = pool(pool_h)?.num_workers();
        // SAFETY: the caller promises a writable out-pointer (NULL is refused).
        unsafe { write_out(out, n, "out") }
    })
}

/// Per-worker settings of a spawn (`sp_pool_spawn_with`): the GPUs the worker owns and extra
/// environment variables of its process. Restarts of the worker reuse them, and so does
/// `sp_pool_replace_worker`. All zero (`= {0}`) is "no GPUs, no extra environment".
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_spawn_options {
    /// The worker's GPUs, as the machine numbers them (`gpus_len` of them; NULL if 0). The worker
    /// sees them as its GPU ids; with the library's `cuda` feature it gets a CUDA context on
    /// each, and a GPU it cannot open fails the spawn (`SP_SPAWN_FAILED`). Each at most once.
    pub gpus: *const u32,
    /// Number of entries in `gpus`.
    pub gpus_len: usize,
    /// Also restrict the worker process's view to its GPUs (`CUDA_VISIBLE_DEVICES`).
    pub visible_devices_only: bool,
    /// Environment variables for the worker's process, each a NUL-terminated UTF-8
    /// `"KEY=VALUE"` string (the key non-empty; the value may be empty or hold more `=`);
    /// `env_len` of them; NULL if 0. Applied after the pool's own worker environment.
    pub env: *const *const c_char,
    /// Number of entries in `env`.
    pub env_len: usize,
    /// The CPUs to pin the worker process to (`cpus_len` of them; NULL if 0: not pinned),
    /// applied before its program starts, so every thread of it inherits the set; kept
    /// across restarts. A CPU this process may not use fails the spawn with
    /// `SP_INVALID_ARGUMENT` naming it.
    pub cpus: *const usize,
    /// Number of entries in `cpus`.
    pub cpus_len: usize,
    /// Also set `OMP_NUM_THREADS`, `MKL_NUM_THREADS` and the like to the size of the CPU set.
    pub thread_env_from_cpus: bool,
}

/// Checks `n` elements at `ptr` (NULL only if `n` is 0) and returns them as a slice.
///
/// # Safety
///
/// If `n > 0` and `ptr` is not NULL, it must point to `n` readable `T`s that outlive `'a`.
pub(crate) unsafe fn input_array<'a, T>(
    ptr: *const T,
    n: usize,
    what: &str,
) -> Result<&'a [T], Fail> {
    if n == 0 {
        return Ok(&[]);
    }
    if ptr.is_null() {
        return Err(Fail::null(what));
    }
    if n > (isize::MAX as usize) / size_of::<T>().max(1) {
        return Err(Fail::new(
            sp_status::SP_INVALID_ARGUMENT,
            format!("{what}: count {n} is out of range"),
        ));
    }
    // SAFETY: non-null, the byte length fits in isize, and the caller promises `n` elements.
    Ok(unsafe { std::slice::from_raw_parts(ptr, n) })
}

/// The Rust spawn options `o` describes, every field checked.
///
/// # Safety
///
/// `o`'s arrays as documented on `sp_spawn_options`.
unsafe fn spawn_options(o: &sp_spawn_options) -> Result<SpawnOptions, Fail> {
    // SAFETY: the caller promises `gpus_len` readable ordinals.
    let gpus = unsafe { input_array(o.gpus, o.gpus_len, "opts.gpus") }?;
    for (i, g) in gpus.iter().enumerate() {
        if gpus[..i].contains(g) {
            return Err(Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                format!("opts.gpus lists GPU {g} twice"),
            ));
        }
    }
    // SAFETY: the caller promises `cpus_len` readable CPU numbers.
    let cpus = unsafe { input_array(o.cpus, o.cpus_len, "opts.cpus") }?;
    let mut so = SpawnOptions::new()
        .gpus(gpus.iter().copied())
        .visible_devices_only(o.visible_devices_only)
        .cpus(cpus.iter().copied())
        .thread_env_from_cpus(o.thread_env_from_cpus);
    // SAFETY: the caller promises `env_len` readable string pointers.
    let env = unsafe { input_array(o.env, o.env_len, "opts.env") }?;
    for (i, &e) in env.iter().enumerate() {
        if e.is_null() {
            return Err(Fail::null(&format!("opts.env[{i}]")));
        }
        // SAFETY: non-null; the caller promises a NUL-terminated string.
        let e = unsafe { CStr::from_ptr(e) }.to_str().map_err(|_| {
            Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                format!("opts.env[{i}] is not valid UTF-8"),
            )
        })?;
        match e.split_once('=') {
            Some((k, v)) if !k.is_empty() => so = so.env(k, v),
            _ => {
                return Err(Fail::new(
                    sp_status::SP_INVALID_ARGUMENT,
                    format!("opts.env[{i}] = {e:?} is not of the form KEY=VALUE"),
                ));
            }
        }
    }
    Ok(so)
}

/// As `sp_pool_spawn`, with per-worker options `opts` (NULL: none): the worker's GPUs, CPU set
/// and extra environment. Nothing is started if an option is malformed: a NULL array with a
/// nonzero count (`SP_NULL_ARGUMENT`), an environment entry that is not UTF-8 `KEY=VALUE` or a
/// GPU listed twice (`SP_INVALID_ARGUMENT`); `sp_last_error` says which. `*out` receives the
/// spawn output, `*worker_index` (if not NULL) the worker's seat. Thread-safe.
///
/// # Safety
///
/// `args` must point to `args_len` readable bytes (NULL if 0); `opts` NULL or a valid
/// `sp_spawn_options` whose arrays hold their counts of elements; `out` writable;
/// `worker_index` NULL or writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_spawn_with(
    pool_h: sp_pool,
    args: *const u8,
    args_len: usize,
    opts: *const sp_spawn_options,
    out: *mut sp_result,
    worker_index: *mut usize,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let p = pool(pool_h)?;
        let so = if opts.is_null() {
            SpawnOptions::new()
        } else {
            // SAFETY: non-null; the caller promises a valid struct with valid arrays.
            unsafe { spawn_options(&*opts) }?
        };
        // SAFETY: the caller promises `args_len` readable bytes.
        let args = unsafe { input_bytes(args, args_len, "args") }?.to_vec();
        let handle = p.submit_spawn_with(&args, &so).map_err(spawn_fail)?;
        let index = handle.worker_index();
        let output = handle.wait().map_err(spawn_fail)?;
        let h = RESULTS.insert(Bytes::owned(&output));
        if !worker_index.is_null() {
            // SAFETY: non-null; the caller promises it is writable.
            unsafe { worker_index.write(index) };
        }
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_result { id: h }) };
        Ok(())
    })
}

pub(crate) fn worker_fail(e: WorkerError) -> Fail {
    let message = e.to_string();
    let status = match e {
        WorkerError::NoSuchWorker { .. } => sp_status::SP_NO_SUCH_WORKER,
        WorkerError::Shutdown => sp_status::SP_SHUTDOWN,
        WorkerError::Spawn(s) => spawn_fail(s).status,
        // A kind added later: the message says which.
        _ => sp_status::SP_INVALID_ARGUMENT,
    };
    Fail::new(status, message)
}

/// Retires worker `index` (scale down): it finishes the task it is running, takes no other,
/// runs its `drop` callback and exits; its seat is freed, not restarted. Queued tasks go to the
/// other workers. Blocks until the worker is gone (one that does not finish its task within the
/// shutdown timeout is killed). `SP_NO_SUCH_WORKER` if no serving worker has that index.
/// Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn sp_pool_retire_worker(pool_h: sp_pool, index: usize) -> sp_status {
    guard(|| pool(pool_h)?.retire_worker(index).map_err(worker_fail))
}

/// Replaces worker `index` with a fresh one started from the same spawn arguments and options
/// (a rolling restart): the new worker starts in a free seat and serves before the old one is
/// retired, so no task is lost. Needs a free seat (`max_workers`). `*out` receives the new
/// worker's spawn output. `SP_NO_SUCH_WORKER` if no serving worker has that index; a spawn
/// failure's status (`SP_SPAWN_FAILED`, …) if the new one cannot start (the old one keeps
/// serving). Thread-safe.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_replace_worker(
    pool_h: sp_pool,
    index: usize,
    out: *mut sp_result,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let output = pool(pool_h)?.replace_worker(index).map_err(worker_fail)?;
        let h = RESULTS.insert(Bytes::owned(&output));
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_result { id: h }) };
        Ok(())
    })
}

/// How a task is queued: waiting for room, failing at once if full, or with a loaned payload.
enum Submit {
    Wait,
    Try,
    WithLoan(sp_loan),
}

fn submit_common(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    out: *mut sp_task,
    how: Submit,
) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::null("out"));
    }
    let p = pool(pool_h)?;
    // SAFETY: the exported callers' contract: `len` readable bytes at `task`.
    let bytes = unsafe { input_bytes(task, len, "task") }?;
    let h = match how {
        Submit::Wait => p.submit(bytes),
        Submit::Try => p.try_submit(bytes),
        Submit::WithLoan(l) => {
            // Checked out, not removed: a refused submit hands the loan back, and the handle
            // stays the caller's (outputs and consumed inputs only on success).
            let loan = LOANS.check_out(l.id)?;
            match p.task(bytes).payload(loan).submit() {
                Ok(h) => {
                    LOANS.retire(l.id);
                    Ok(h)
                }
                Err(r) => {
                    let (e, loan) = r.into_parts();
                    match loan {
                        Some(loan) => LOANS.put_back(l.id, loan),
                        None => LOANS.retire(l.id),
                    }
                    Err(e)
                }
            }
        }
    }
    .map_err(submit_fail)?;
    let id = TASKS.insert(h);
    // SAFETY: checked non-null above; the caller promises it is writable.
    unsafe { out.write(sp_task { id }) };
    Ok(())
}

/// Queues a task made of a copy of `len` bytes at `task` (written once, into shared memory),
/// waiting for room if the queue is full. `*out` receives the task handle: wait on it, or free
/// it to cancel. An empty task (`len` 0) is allowed. Thread-safe.
///
/// # Safety
///
/// `task` must point to `len` readable bytes (may be NULL if 0); `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_submit(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    out: *mut sp_task,
) -> sp_status {
    guard(|| submit_common(pool_h, task, len, out, Submit::Wait))
}

/// As `sp_pool_submit`, but fails with `SP_QUEUE_FULL` at once instead of waiting. Thread-safe.
///
/// # Safety
///
/// As for `sp_pool_submit`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_try_submit(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    out: *mut sp_task,
) -> sp_status {
    guard(|| submit_common(pool_h, task, len, out, Submit::Try))
}

/// Runs a task and blocks for its result: `sp_pool_submit` then `sp_task_wait`. Thread-safe.
///
/// # Safety
///
/// `task` must point to `len` readable bytes (may be NULL if 0); `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_execute(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    out: *mut sp_result,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let p = pool(pool_h)?;
        // SAFETY: the caller promises `len` readable bytes.
        let bytes = unsafe { input_bytes(task, len, "task") }?;
        let h = p.submit(bytes).map_err(submit_fail)?;
        let r = h.wait_ref().map_err(task_fail)?;
        let id = RESULTS.insert(Bytes::InPlace(r));
        // SAFETY: checked non-null above.
        unsafe { out.write(sp_result { id }) };
        Ok(())
    })
}

/// Lends a writable buffer of `len` bytes (> 0) in the pool's shared memory, waiting for room.
/// Fill it through `sp_loan_data`, then send it with `sp_pool_submit_loan`: the worker reads it
/// in place, with no copy. Thread-safe.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_loan(pool_h: sp_pool, len: usize, out: *mut sp_loan) -> sp_status {
    guard(|| loan_common(pool_h, len, out, false))
}

/// As `sp_pool_loan`, but fails with `SP_QUEUE_FULL` at once if there is no room.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_try_loan(
    pool_h: sp_pool,
    len: usize,
    out: *mut sp_loan,
) -> sp_status {
    guard(|| loan_common(pool_h, len, out, true))
}

fn loan_common(pool_h: sp_pool, len: usize, out: *mut sp_loan, try_only: bool) -> Result<(), Fail> {
    if out.is_null() {
        return Err(Fail::null("out"));
    }
    if len == 0 {
        return Err(Fail::new(
            sp_status::SP_INVALID_ARGUMENT,
            "a loan must be at least 1 byte long",
        ));
    }
    if len > isize::MAX as usize {
        return Err(Fail::new(
            sp_status::SP_INVALID_ARGUMENT,
            format!("a loan of {len} bytes is over SIZE_MAX / 2"),
        ));
    }
    let p = pool(pool_h)?;
    let loan = if try_only {
        p.try_loan(len)
    } else {
        p.loan(len)
    }
    .map_err(submit_fail)?;
    let id = LOANS.insert(loan);
    // SAFETY: checked non-null above; the exported callers' contract makes it writable.
    unsafe { out.write(sp_loan { id }) };
    Ok(())
}

/// The loan's buffer: `*data` receives its address (64-byte aligned) and `*len` its length.
/// The buffer is the caller's to write until the loan is sent or freed. Use from one thread at
/// a time.
///
/// # Safety
///
/// `data` and `len` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_loan_data(
    loan: sp_loan,
    data: *mut *mut u8,
    len: *mut usize,
) -> sp_status {
    guard(|| {
        if data.is_null() || len.is_null() {
            return Err(Fail::null("data or len"));
        }
        let (p, n) = LOANS.with(loan.id, |l| {
            let s = l.as_mut_slice();
            (s.as_mut_ptr(), s.len())
        })?;
        // SAFETY: both checked non-null; the caller promises they are writable.
        unsafe {
            data.write(p);
            len.write(n);
        }
        Ok(())
    })
}

/// Returns an unsent loan's space; the handle is dead afterwards. Use from one thread at a time.
/// A zero handle is a no-op (`SP_OK`).
#[unsafe(no_mangle)]
pub extern "C" fn sp_loan_free(loan: sp_loan) -> sp_status {
    guard(|| free_handle(&LOANS, loan.id))
}

/// Queues a task made of a copy of `len` bytes at `task`, with the loan as its payload (the
/// worker reads it in place). Waits for room if the queue is full. On success the loan handle
/// is consumed (the task owns the buffer now); on any failure it stays the caller's, still
/// filled: submit it again, or free it. Thread-safe.
///
/// # Safety
///
/// As for `sp_pool_submit`.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_submit_loan(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    loan: sp_loan,
    out: *mut sp_task,
) -> sp_status {
    guard(|| submit_common(pool_h, task, len, out, Submit::WithLoan(loan)))
}

fn finish(out: *mut sp_result, r: Result<ResultRef<Vec<u8>>, TaskError>) -> Result<(), Fail> {
    let r = r.map_err(task_fail)?;
    let id = RESULTS.insert(Bytes::InPlace(r));
    // SAFETY: the exported callers checked `out` non-null; their contract makes it writable.
    unsafe { out.write(sp_result { id }) };
    Ok(())
}

/// Blocks until the task finishes. On success `*out` receives its result (read the bytes in
/// place with `sp_result_bytes`, release with `sp_result_free`); on failure the status says why
/// (`SP_TASK_FAILED`, `SP_WORKER_DIED`, …) and `sp_last_error` gives the message. Either way the
/// task handle is consumed. Use from one thread at a time per task.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_task_wait(task: sp_task, out: *mut sp_result) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let h = TASKS.remove(task.id)?;
        finish(out, h.wait_ref())
    })
}

/// As `sp_task_wait`, waiting at most `timeout_ms` milliseconds: `SP_TIMEOUT` if the task has not
/// finished by then, and the task handle stays valid (wait again, poll, or free it).
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_task_wait_timeout(
    task: sp_task,
    timeout_ms: u64,
    out: *mut sp_result,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let h = TASKS.check_out(task.id)?;
        if !h.__finished_within(Duration::from_millis(timeout_ms)) {
            TASKS.put_back(task.id, h);
            return Err(Fail::new(
                sp_status::SP_TIMEOUT,
                format!("the task did not finish within {timeout_ms} ms"),
            ));
        }
        TASKS.retire(task.id);
        finish(out, h.wait_ref())
    })
}

/// Returns at once: `SP_PENDING` if the task has not finished (the handle stays valid), else as
/// `sp_task_wait` (the handle is consumed).
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_task_poll(task: sp_task, out: *mut sp_result) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let finished = TASKS.with(task.id, |h| h.is_finished())?;
        if !finished {
            return Err(Fail::new(
                sp_status::SP_PENDING,
                "the task has not finished",
            ));
        }
        let h = TASKS.remove(task.id)?;
        finish(out, h.wait_ref())
    })
}

/// Asks that the task not run if no worker has started it (it then finishes with
/// `SP_CANCELLED` at once: waiting on it does not wait for a worker to reach it); a running
/// task runs on. The handle stays valid: wait on it or free it. Like every call on a task
/// handle, it answers `SP_BUSY` while another thread is inside a call on the same handle
/// (such as `sp_task_wait_timeout`): it cannot release a thread blocked in a wait on it.
#[unsafe(no_mangle)]
pub extern "C" fn sp_task_cancel(task: sp_task) -> sp_status {
    guard(|| TASKS.with(task.id, |h| h.cancel()))
}

/// Drops a task handle without collecting: the task is cancelled if no worker has started it,
/// else its result is discarded. The handle is dead afterwards. A zero handle is a no-op
/// (`SP_OK`), so cleanup paths need no check.
#[unsafe(no_mangle)]
pub extern "C" fn sp_task_free(task: sp_task) -> sp_status {
    guard(|| free_handle(&TASKS, task.id))
}

/// The result's bytes, in place: `*data` receives their address (NULL if empty; 16-byte
/// aligned) and `*len` their length. They stay valid and unchanged until `sp_result_free`.
/// Many threads may read the bytes; free from one.
///
/// # Safety
///
/// `data` and `len` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_result_bytes(
    result: sp_result,
    data: *mut *const u8,
    len: *mut usize,
) -> sp_status {
    guard(|| {
        if data.is_null() || len.is_null() {
            return Err(Fail::null("data or len"));
        }
        let (p, n) = RESULTS.with(result.id, |r| {
            let s: &[u8] = match r {
                Bytes::InPlace(r) => r.as_slice(),
                Bytes::Owned(v) => v.as_slice(),
            };
            (
                if s.is_empty() {
                    std::ptr::null()
                } else {
                    s.as_ptr()
                },
                s.len(),
            )
        })?;
        // SAFETY: both checked non-null; the caller promises they are writable.
        unsafe {
            data.write(p);
            len.write(n);
        }
        Ok(())
    })
}

/// Releases a result (its bytes, a private copy: the task's slot in shared memory was freed when
/// the result was collected). The handle is dead
/// afterwards; freeing it again gives `SP_INVALID_HANDLE`. A zero handle is a no-op (`SP_OK`).
#[unsafe(no_mangle)]
pub extern "C" fn sp_result_free(result: sp_result) -> sp_status {
    guard(|| free_handle(&RESULTS, result.id))
}

/// Stops the pool: new submissions fail with `SP_SHUTDOWN`; with `immediate` 0 the workers
/// finish every queued task first, otherwise queued tasks are cancelled; returns when the
/// workers have stopped (killed after the shutdown timeout). The handle stays valid until
/// `sp_pool_free`. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn sp_pool_shutdown(pool_h: sp_pool, immediate: i32) -> sp_status {
    guard(|| {
        let p = pool(pool_h)?;
        if immediate != 0 {
            p.close_now();
        } else {
            p.close();
        }
        Ok(())
    })
}

/// Shuts the pool down gracefully (if not done yet) and frees it; the handle is dead afterwards.
/// Tasks and results already obtained stay valid. Calls still running on other threads with this
/// handle are not waited for: the pool is closed, so a submit or spawn blocked there ends with
/// `SP_SHUTDOWN` (or `SP_SPAWN_FAILED`). A zero handle is a no-op (`SP_OK`).
#[unsafe(no_mangle)]
pub extern "C" fn sp_pool_free(pool_h: sp_pool) -> sp_status {
    guard(|| {
        if pool_h.id == 0 {
            return Ok(());
        }
        let p = POOLS.remove(pool_h.id)?;
        p.close();
        drop(p);
        Ok(())
    })
}
