//! Per-task options, batches, broadcasts, and the result sets that carry many outcomes at once.

use crate::handles::Table;
use crate::host::{TASKS, input_array, pool, sp_bytes, sp_pool, sp_task, submit_fail, task_fail};
use crate::{Fail, guard, input_bytes, sp_status};
use stateful_pool::{BatchHandle, TaskError, TaskOptions, WaitTimeoutError};
use std::ffi::{CString, c_char};
use std::time::Duration;

/// `flags` bit of `sp_pool_submit_with` and `sp_pool_submit_batch`: fail with `SP_QUEUE_FULL`
/// at once instead of waiting for room in the queue.
pub const SP_SUBMIT_TRY: i32 = 1;

/// Options of one task (or one batch), overriding the pool's defaults. All zero (`= {0}`) is
/// "the pool's defaults".
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub struct sp_task_options {
    /// Limit on the task's execution time, ms, counted from when a worker starts it; past it
    /// the task fails with `SP_TASK_TIMED_OUT` and its worker is restarted. 0: the pool's
    /// `task_timeout_ms`.
    pub timeout_ms: u64,
    /// Times the task is re-run if its worker dies while running it (only for idempotent
    /// work). Used only if `set_retries` is true.
    pub retries: u32,
    /// Whether `retries` overrides the pool's `task_retries` (false: the pool's default).
    pub set_retries: bool,
    /// The latest time a worker may start the task, ms after its submit; 0: none. Past it
    /// the task does not run: a caller waiting on it (wait, wait with a timeout, poll, a
    /// completion queue) gets `SP_TASK_TIMED_OUT` at that moment if no worker has claimed it,
    /// and a worker that claims it later answers the same. (A batch: the whole batch.)
    pub deadline_ms: u64,
}

/// A submitted batch of tasks (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_batch {
    /// The handle's value (opaque).
    pub id: u64,
}

/// Many outcomes at once: a finished batch's (one per task, in order) or a broadcast's (one
/// per worker). Read with `sp_result_set_len` / `sp_result_set_get`, release with
/// `sp_result_set_free` (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_result_set {
    /// The handle's value (opaque).
    pub id: u64,
}

/// One outcome in a result set. The pointers stay valid until `sp_result_set_free`.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_outcome {
    /// `SP_OK`, or why this task failed (`SP_TASK_FAILED`, `SP_WORKER_DIED`, …).
    pub status: sp_status,
    /// A broadcast's: the index of the worker this outcome is from. A batch's: `SIZE_MAX`.
    pub worker: usize,
    /// The result's bytes if `status` is `SP_OK` (NULL if empty or failed).
    pub data: *const u8,
    /// Length of `data`.
    pub len: usize,
    /// The error message if `status` is not `SP_OK`; an empty string otherwise (never NULL).
    pub message: *const c_char,
}

/// One outcome, owned by its set.
struct Outcome {
    status: sp_status,
    worker: usize,
    bytes: Vec<u8>,
    message: CString,
}

impl Outcome {
    fn new(worker: usize, r: Result<Vec<u8>, TaskError>) -> Self {
        match r {
            Ok(bytes) => Outcome {
                status: sp_status::SP_OK,
                worker,
                bytes,
                message: CString::default(),
            },
            Err(e) => {
                let f = task_fail(e);
                Outcome {
                    status: f.status,
                    worker,
                    bytes: Vec::new(),
                    message: CString::new(f.message.replace('\0', "\\0")).unwrap_or_default(),
                }
            }
        }
    }
}

static BATCHES: Table<BatchHandle<Vec<u8>>> = Table::new(5, "batch");
static SETS: Table<Vec<Outcome>> = Table::new(6, "result set");

/// The Rust options `o` describes (NULL: the defaults), or `None` for "no options at all".
///
/// # Safety
///
/// `o` must be NULL or point to a valid `sp_task_options`.
unsafe fn task_options(o: *const sp_task_options) -> Option<TaskOptions> {
    if o.is_null() {
        return None;
    }
    // SAFETY: non-null; the caller promises a valid struct.
    let o = unsafe { *o };
    if o.timeout_ms == 0 && !o.set_retries && o.deadline_ms == 0 {
        return None;
    }
    let mut t = TaskOptions::new();
    if o.timeout_ms != 0 {
        t = t.timeout(Duration::from_millis(o.timeout_ms));
    }
    if o.set_retries {
        t = t.retries(o.retries);
    }
    if o.deadline_ms != 0 {
        // A deadline past what an `Instant` holds is no deadline.
        if let Some(at) =
            std::time::Instant::now().checked_add(Duration::from_millis(o.deadline_ms))
        {
            t = t.deadline(at);
        }
    }
    Some(t)
}

/// Whether `flags` asks for a non-blocking submit; unknown bits are refused.
fn try_flag(flags: i32) -> Result<bool, Fail> {
    if flags & !SP_SUBMIT_TRY != 0 {
        return Err(Fail::new(
            sp_status::SP_INVALID_ARGUMENT,
            format!("unknown flags {flags:#x} (only SP_SUBMIT_TRY is defined)"),
        ));
    }
    Ok(flags & SP_SUBMIT_TRY != 0)
}

/// Queues a task made of a copy of `len` bytes at `task`, with its own options `opts` (NULL:
/// the pool's defaults) and `flags` (0: wait for room if the queue is full; `SP_SUBMIT_TRY`:
/// fail with `SP_QUEUE_FULL` at once). `*out` receives the task handle, as from
/// `sp_pool_submit`. Thread-safe.
///
/// # Safety
///
/// `task` must point to `len` readable bytes (NULL if 0); `opts` NULL or a valid
/// `sp_task_options`; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_submit_with(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    opts: *const sp_task_options,
    flags: i32,
    out: *mut sp_task,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let try_only = try_flag(flags)?;
        // SAFETY: the caller promises NULL or a valid struct.
        let opts = unsafe { task_options(opts) };
        let p = pool(pool_h)?;
        // SAFETY: the caller promises `len` readable bytes.
        let bytes = unsafe { input_bytes(task, len, "task") }?;
        let req = p.task(bytes).options(opts.unwrap_or_default());
        let h = if try_only {
            req.try_submit()
        } else {
            req.submit()
        }
        .map_err(submit_fail)?;
        let id = TASKS.insert(h);
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_task { id }) };
        Ok(())
    })
}

/// Queues `n` (> 0) tasks as one batch: `tasks[i]` is a copy of task `i`'s bytes. The next free
/// worker runs them one after the other and answers them together (one slot and one hand-off
/// for all: tiny tasks cost far less each). An error fails only its own task. The batch counts
/// as one task for `opts` (timeout, retries: the whole batch re-runs) and cancellation; if its
/// worker dies, the whole batch fails. `flags` as for `sp_pool_submit_with`. `*out` receives the
/// batch handle: wait on it (`sp_batch_wait`), or free it to cancel. Thread-safe.
///
/// # Safety
///
/// `tasks` must point to `n` `sp_bytes`, each describing readable bytes (NULL if its `len` is
/// 0); `opts` NULL or a valid `sp_task_options`; `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_submit_batch(
    pool_h: sp_pool,
    tasks: *const sp_bytes,
    n: usize,
    opts: *const sp_task_options,
    flags: i32,
    out: *mut sp_batch,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        if n == 0 {
            return Err(Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                "a batch needs at least one task",
            ));
        }
        let try_only = try_flag(flags)?;
        // SAFETY: the caller promises NULL or a valid struct.
        let opts = unsafe { task_options(opts) };
        let p = pool(pool_h)?;
        // SAFETY: the caller promises `n` elements.
        let tasks = unsafe { input_array(tasks, n, "tasks") }?;
        let owned = tasks
            .iter()
            .enumerate()
            .map(|(i, t)| {
                // SAFETY: the caller promises each element describes readable bytes.
                unsafe { input_bytes(t.data, t.len, &format!("tasks[{i}]")) }.map(<[u8]>::to_vec)
            })
            .collect::<Result<Vec<Vec<u8>>, Fail>>()?;
        let req = p.batch(&owned).options(opts.unwrap_or_default());
        let h = if try_only {
            req.try_submit()
        } else {
            req.submit()
        }
        .map_err(submit_fail)?;
        let id = BATCHES.insert(h);
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_batch { id }) };
        Ok(())
    })
}

/// Stores a finished batch's outcomes as a set and writes its handle.
fn finish_batch(
    out: *mut sp_result_set,
    r: Result<Vec<Result<Vec<u8>, TaskError>>, TaskError>,
) -> Result<(), Fail> {
    let outs = r.map_err(task_fail)?;
    let set = outs
        .into_iter()
        .map(|r| Outcome::new(usize::MAX, r))
        .collect();
    let id = SETS.insert(set);
    // SAFETY: the exported callers checked `out` non-null; their contract makes it writable.
    unsafe { out.write(sp_result_set { id }) };
    Ok(())
}

/// Blocks until the batch finishes. `SP_OK`: `*out` receives a result set with each task's
/// outcome, in order (each may have failed on its own). Otherwise the batch failed as a whole
/// (its worker died, it timed out, was cancelled, …) and the status says why. Either way the
/// batch handle is consumed. Use from one thread at a time per batch.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_batch_wait(batch: sp_batch, out: *mut sp_result_set) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let h = BATCHES.remove(batch.id)?;
        finish_batch(out, h.wait())
    })
}

/// As `sp_batch_wait`, waiting at most `timeout_ms` milliseconds (0: just look): `SP_TIMEOUT` if
/// the batch has not finished by then, and the batch handle stays valid.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_batch_wait_timeout(
    batch: sp_batch,
    timeout_ms: u64,
    out: *mut sp_result_set,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let h = BATCHES.check_out(batch.id)?;
        match h.wait_timeout(Duration::from_millis(timeout_ms)) {
            Ok(r) => {
                BATCHES.retire(batch.id);
                finish_batch(out, Ok(r))
            }
            Err(WaitTimeoutError::Timeout(h)) => {
                BATCHES.put_back(batch.id, h);
                Err(Fail::new(
                    sp_status::SP_TIMEOUT,
                    format!("the batch did not finish within {timeout_ms} ms"),
                ))
            }
            Err(e) => {
                BATCHES.retire(batch.id);
                let e = match e {
                    WaitTimeoutError::Task(e) => e,
                    other => TaskError::BadResult {
                        worker: usize::MAX,
                        message: other.to_string(),
                    },
                };
                finish_batch(out, Err(e))
            }
        }
    })
}

/// Asks that the batch not run if no worker has started it (it then fails with
/// `SP_CANCELLED` at once, as `sp_task_cancel`'s task does). The handle stays valid.
#[unsafe(no_mangle)]
pub extern "C" fn sp_batch_cancel(batch: sp_batch) -> sp_status {
    guard(|| BATCHES.with(batch.id, |h| h.cancel()))
}

/// Drops a batch handle without collecting (the batch is cancelled if no worker has started
/// it). The handle is dead afterwards. A zero handle is a no-op (`SP_OK`).
#[unsafe(no_mangle)]
pub extern "C" fn sp_batch_free(batch: sp_batch) -> sp_status {
    guard(|| crate::host::free_handle(&BATCHES, batch.id))
}

/// Runs the task (a copy of `len` bytes at `task`) once on every serving worker (reload weights,
/// change a setting) and blocks until each has answered; `*out` receives a result set with one
/// outcome per worker (`sp_outcome.worker` says which; empty if no worker serves). A worker
/// runs it before the next queued task it would take. Concurrent broadcasts run one after the
/// other. `SP_SHUTDOWN` once the pool is shutting down. A task over `max_task_bytes` does not
/// fail the call: each worker's outcome is `SP_TOO_LARGE` (and with no worker serving, the
/// set is empty). Thread-safe.
///
/// # Safety
///
/// `task` must point to `len` readable bytes (NULL if 0); `out` writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_pool_broadcast(
    pool_h: sp_pool,
    task: *const u8,
    len: usize,
    out: *mut sp_result_set,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let p = pool(pool_h)?;
        if p.is_closing() {
            return Err(Fail::new(sp_status::SP_SHUTDOWN, "the pool is shut down"));
        }
        // SAFETY: the caller promises `len` readable bytes.
        let bytes = unsafe { input_bytes(task, len, "task") }?.to_vec();
        let set = p
            .broadcast(&bytes)
            .into_iter()
            .map(|(w, r)| Outcome::new(w, r))
            .collect();
        let id = SETS.insert(set);
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_result_set { id }) };
        Ok(())
    })
}

/// The number of outcomes in the set.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_result_set_len(set: sp_result_set, out: *mut usize) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let n = SETS.with(set.id, |s| s.len())?;
        // SAFETY: checked non-null; the caller promises it is writable.
        unsafe { out.write(n) };
        Ok(())
    })
}

/// Outcome `index` of the set (`SP_INVALID_ARGUMENT` past the end): its status, worker, result
/// bytes or error message, read in place until `sp_result_set_free`. Many threads may read a
/// set; free it from one.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_result_set_get(
    set: sp_result_set,
    index: usize,
    out: *mut sp_outcome,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let o = SETS.with(set.id, |s| {
            s.get(index).map(|o| sp_outcome {
                status: o.status,
                worker: o.worker,
                data: if o.bytes.is_empty() {
                    std::ptr::null()
                } else {
                    o.bytes.as_ptr()
                },
                len: o.bytes.len(),
                message: o.message.as_ptr(),
            })
        })?;
        let Some(o) = o else {
            return Err(Fail::new(
                sp_status::SP_INVALID_ARGUMENT,
                format!("index {index} is past the end of the result set"),
            ));
        };
        // SAFETY: checked non-null; the caller promises it is writable.
        unsafe { out.write(o) };
        Ok(())
    })
}

/// Releases a result set; the pointers read from it die with it. A zero handle is a no-op
/// (`SP_OK`); freeing twice gives `SP_INVALID_HANDLE`.
#[unsafe(no_mangle)]
pub extern "C" fn sp_result_set_free(set: sp_result_set) -> sp_status {
    guard(|| crate::host::free_handle(&SETS, set.id))
}
