//! Workers written in C: the program registers its spawn / execute / drop callbacks with
//! [`sp_init`], which (in a worker process) serves the pool with them and never returns.

use crate::{Fail, guard, input_bytes, sp_status};
use stateful_pool::{BatchTask, BoxError, Poisoned, TaskContext, Worker, WorkerContext};
use std::ffi::{CStr, c_char, c_void};
use std::sync::OnceLock;

/// `execute` (and `spawn`) succeeded: the reply's bytes are the output.
pub const SP_WORKER_OK: i32 = 0;
/// `execute` (or `spawn`) failed: the task fails with `SP_TASK_FAILED` (the spawn with
/// `SP_SPAWN_FAILED`), carrying the reply's error message; the worker keeps serving.
pub const SP_WORKER_ERROR: i32 = 1;
/// `execute` found the worker unusable (e.g. a sticky CUDA error): the task fails with
/// `SP_POISONED`, and the worker process is replaced by a fresh one (its `drop` is not run).
pub const SP_WORKER_POISONED: i32 = 2;

/// Who a worker is, as its callbacks see it.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_worker_info {
    /// The worker's seat index in the pool (stable across restarts of that seat).
    pub index: usize,
    /// How many times this seat has been started (1 for the first start).
    pub generation: u32,
    /// The worker's process id.
    pub pid: u32,
    /// The GPUs this worker owns (`sp_spawn_options.gpus`, as the machine numbers them); NULL
    /// if none. Valid during the callback.
    pub gpus: *const u32,
    /// Number of entries in `gpus`.
    pub gpus_len: usize,
}

/// One task, as `execute` sees it. The pointers are into shared memory, valid during the call.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_task_info {
    /// The task's bytes, read in place (16-byte aligned; NULL if empty).
    pub data: *const u8,
    /// Length of `data`.
    pub len: usize,
    /// The loaned payload submitted with the task (`sp_pool_submit_loan`), read in place;
    /// NULL if none.
    pub payload: *const u8,
    /// Length of `payload`.
    pub payload_len: usize,
    /// The task's pool-unique id.
    pub task_id: u64,
    /// The worker running it.
    pub worker: sp_worker_info,
}

/// Where a callback puts its output bytes or its error message. Valid only during the call it
/// is passed to.
#[derive(Debug, Default)]
pub struct sp_reply {
    bytes: Vec<u8>,
    error: Option<String>,
}

/// A C worker's callbacks (`spawn` and `execute` are required; `drop` may be NULL).
///
/// Callbacks must not throw: a C++ exception (or any unwind) that escapes one aborts the worker
/// process, which the pool handles as a worker death (`SP_WORKER_DIED` for the task). Catch
/// inside the callback and report the error through `sp_reply_set_error` instead.
#[repr(C)]
#[derive(Debug, Clone, Copy)]
pub struct sp_worker_callbacks {
    /// Passed to `spawn` as is.
    pub user_data: *mut c_void,
    /// The spawn step: runs once in the worker process with the spawn argument bytes. Store
    /// the worker's state in `*state` (it is passed to `execute` and `drop`), write the spawn
    /// output with `sp_reply_write`, return `SP_WORKER_OK`; or return `SP_WORKER_ERROR`
    /// (message with `sp_reply_set_error`).
    pub spawn: Option<
        unsafe extern "C-unwind" fn(
            user_data: *mut c_void,
            info: *const sp_worker_info,
            args: *const u8,
            args_len: usize,
            state: *mut *mut c_void,
            reply: *mut sp_reply,
        ) -> i32,
    >,
    /// The execute step: runs for every task this worker takes. Write the output with
    /// `sp_reply_write` and return `SP_WORKER_OK`, or return `SP_WORKER_ERROR` /
    /// `SP_WORKER_POISONED` (message with `sp_reply_set_error`).
    pub execute: Option<
        unsafe extern "C-unwind" fn(
            state: *mut c_void,
            task: *const sp_task_info,
            reply: *mut sp_reply,
        ) -> i32,
    >,
    /// Releases the worker's state when the worker stops normally (optional).
    pub drop: Option<unsafe extern "C-unwind" fn(state: *mut c_void)>,
    /// The batch step (optional; NULL: a batching pool calls `execute` on each task in turn).
    /// When the pool batches (`sp_pool_options.max_batch`, `sp_pool_set_batch_policy`), runs
    /// `n` (≥ 1) independently submitted tasks at once: `tasks[i]` is task `i` (pointers into
    /// shared memory, valid during the call), `replies[i]` its reply, `statuses[i]` its
    /// outcome (preset to `SP_WORKER_OK`; set `SP_WORKER_ERROR` with a message on
    /// `replies[i]` to fail that task alone, or `SP_WORKER_POISONED` to fail it and replace
    /// the worker after the batch). Return `SP_WORKER_OK`; or `SP_WORKER_ERROR` /
    /// `SP_WORKER_POISONED` to fail every task of the step with the message set on
    /// `replies[0]`.
    pub execute_batch: Option<
        unsafe extern "C-unwind" fn(
            state: *mut c_void,
            tasks: *const sp_task_info,
            n: usize,
            replies: *const *mut sp_reply,
            statuses: *mut i32,
        ) -> i32,
    >,
}

/// The registered callbacks (set once, by `sp_init`).
struct Registered(sp_worker_callbacks);

// SAFETY: the callbacks are plain function pointers; `user_data` is the C program's, handed
// back to its own `spawn` in the single thread that serves the worker. Sharing the struct between
// threads moves no Rust data.
unsafe impl Send for Registered {}
// SAFETY: as above; nothing in it is mutated after registration.
unsafe impl Sync for Registered {}

static CALLBACKS: OnceLock<Registered> = OnceLock::new();

/// The NULL field `sp_init` was given (nothing recorded then): a worker process still serves,
/// and its spawn step reports this instead of "no callbacks".
static INIT_NULL_FIELD: OnceLock<&'static str> = OnceLock::new();

/// The worker type of the C ABI's pools: bytes in, bytes out, behaviour from the registered C
/// callbacks (or a Rust worker program with the same `Vec<u8>` messages).
#[derive(Debug)]
pub struct CWorker {
    state: *mut c_void,
    callbacks: sp_worker_callbacks,
    /// The length of the last output: a new reply buffer starts with that capacity.
    last_output_len: usize,
    /// Reply buffers handed back after their output was written into shared memory
    /// ([`Worker::recycle`]): the next replies are built in them, so a worker whose outputs
    /// fit the buffers it has allocates nothing per task.
    spare: Vec<Vec<u8>>,
}

/// Reply buffers up to this capacity are kept for reuse.
const MAX_SPARE_BYTES: usize = 1 << 20;

impl CWorker {
    /// An empty reply, in a recycled buffer if there is one.
    fn reply(&mut self) -> sp_reply {
        let bytes = match self.spare.pop() {
            Some(mut b) => {
                b.clear();
                b
            }
            None => Vec::with_capacity(self.last_output_len),
        };
        sp_reply { bytes, error: None }
    }
}

fn info(ctx: &WorkerContext) -> sp_worker_info {
    sp_worker_info {
        index: ctx.index(),
        generation: ctx.generation(),
        pid: ctx.pid(),
        gpus: if ctx.gpu_ids().is_empty() {
            std::ptr::null()
        } else {
            ctx.gpu_ids().as_ptr()
        },
        gpus_len: ctx.gpu_ids().len(),
    }
}

fn reply_error(reply: &mut sp_reply, step: &str, rc: i32) -> String {
    reply
        .error
        .take()
        .unwrap_or_else(|| format!("{step} callback returned {rc}"))
}

impl Worker for CWorker {
    type SpawnArgs = Vec<u8>;
    type SpawnOutput = Vec<u8>;
    type Task = Vec<u8>;
    type Output = Vec<u8>;

    fn spawn(args: Vec<u8>, ctx: &WorkerContext) -> Result<(Self, Vec<u8>), BoxError> {
        let Some(Registered(cb)) = CALLBACKS.get() else {
            if let Some(field) = INIT_NULL_FIELD.get() {
                return Err(format!(
                    "no C worker callbacks: the worker program called sp_init with {field} \
                     NULL (SP_NULL_ARGUMENT)"
                )
                .into());
            }
            return Err("no C worker callbacks: the worker program must call \
                        sp_init(&callbacks) first thing in main"
                .into());
        };
        let (Some(spawn), Some(_)) = (cb.spawn, cb.execute) else {
            return Err("sp_worker_callbacks.spawn and .execute must not be NULL".into());
        };
        let info = info(ctx);
        let mut state: *mut c_void = std::ptr::null_mut();
        let mut reply = sp_reply::default();
        // SAFETY: the C program registered `spawn` with this signature; every pointer passed is
        // valid for the duration of the call (locals and `args`, which outlives it).
        let rc = unsafe {
            spawn(
                cb.user_data,
                &info,
                args.as_ptr(),
                args.len(),
                &mut state,
                &mut reply,
            )
        };
        if rc != SP_WORKER_OK {
            return Err(reply_error(&mut reply, "spawn", rc).into());
        }
        Ok((
            CWorker {
                state,
                callbacks: *cb,
                last_output_len: 0,
                spare: Vec::new(),
            },
            reply.bytes,
        ))
    }

    fn execute(
        &mut self,
        task: &rkyv::Archived<Vec<u8>>,
        ctx: &TaskContext<'_>,
    ) -> Result<Vec<u8>, BoxError> {
        let Some(execute) = self.callbacks.execute else {
            return Err("sp_worker_callbacks.execute is NULL".into());
        };
        let t = task_info(task, ctx);
        let mut reply = self.reply();
        // SAFETY: registered with this signature; `t`'s pointers are into the task's slot and
        // payload, which stay put until this task is answered, after the call.
        let rc = unsafe { execute(self.state, &t, &mut reply) };
        match rc {
            SP_WORKER_OK => {
                self.last_output_len = reply.bytes.len().min(MAX_SPARE_BYTES);
                Ok(reply.bytes)
            }
            SP_WORKER_POISONED => Err(Poisoned::new(reply_error(&mut reply, "execute", rc)).into()),
            _ => Err(reply_error(&mut reply, "execute", rc).into()),
        }
    }

    fn recycle(&mut self, output: Vec<u8>) {
        // Enough buffers for a full batch; more, and big ones (a rare large output must not
        // pin its memory for the worker's life), are dropped.
        if self.spare.len() < 64 && output.capacity() <= MAX_SPARE_BYTES {
            self.spare.push(output);
        }
    }

    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Vec<u8>>],
    ) -> Result<Vec<Result<Vec<u8>, BoxError>>, BoxError> {
        let Some(execute_batch) = self.callbacks.execute_batch else {
            return Ok(batch.iter().map(|t| self.execute(t.task, &t.ctx)).collect());
        };
        let infos: Vec<sp_task_info> = batch.iter().map(|t| task_info(t.task, &t.ctx)).collect();
        let mut replies: Vec<sp_reply> = batch.iter().map(|_| self.reply()).collect();
        let ptrs: Vec<*mut sp_reply> = replies.iter_mut().map(|r| r as *mut sp_reply).collect();
        let mut statuses = vec![SP_WORKER_OK; batch.len()];
        // SAFETY: registered with this signature; `infos` (pointers into the tasks' slots and
        // payloads, which stay put until the batch is answered), `ptrs` (each to a live reply
        // in `replies`, distinct) and `statuses` all hold `batch.len()` elements and outlive
        // the call.
        let rc = unsafe {
            execute_batch(
                self.state,
                infos.as_ptr(),
                infos.len(),
                ptrs.as_ptr(),
                statuses.as_mut_ptr(),
            )
        };
        drop(ptrs);
        if rc != SP_WORKER_OK {
            let msg = reply_error(&mut replies[0], "execute_batch", rc);
            return Err(if rc == SP_WORKER_POISONED {
                Poisoned::new(msg).into()
            } else {
                msg.into()
            });
        }
        Ok(replies
            .into_iter()
            .zip(statuses)
            .map(|(mut r, st)| match st {
                SP_WORKER_OK => {
                    self.last_output_len = r.bytes.len().min(MAX_SPARE_BYTES);
                    Ok(r.bytes)
                }
                // A task that finds the worker unusable replaces it, as from `execute`.
                SP_WORKER_POISONED => {
                    Err(Poisoned::new(reply_error(&mut r, "execute_batch", st)).into())
                }
                _ => Err(reply_error(&mut r, "execute_batch", st).into()),
            })
            .collect())
    }
}

/// What a C callback sees of one task.
fn task_info(task: &rkyv::Archived<Vec<u8>>, ctx: &TaskContext<'_>) -> sp_task_info {
    let data = task.as_slice();
    let payload = ctx.payload();
    let ptr_or_null = |s: &[u8]| {
        if s.is_empty() {
            std::ptr::null()
        } else {
            s.as_ptr()
        }
    };
    sp_task_info {
        data: ptr_or_null(data),
        len: data.len(),
        payload: ptr_or_null(payload),
        payload_len: payload.len(),
        task_id: ctx.task_id(),
        worker: info(ctx.worker()),
    }
}

impl Drop for CWorker {
    fn drop(&mut self) {
        if let Some(d) = self.callbacks.drop {
            // SAFETY: the C program's own destructor, given the state its spawn produced, once.
            unsafe { d(self.state) };
        }
    }
}

/// Call first thing in `main` of any program that a pool may start as a worker (by default,
/// the host program itself), **before any other thread starts** (a hard requirement: in a
/// worker it removes an environment variable, a data race with threads reading the
/// environment; C++ static initialisers must not start threads either). `callbacks` are this
/// program's C worker (NULL if it has none, e.g. a host whose workers are another program).
///
/// In a process started as a worker, this serves the pool and never returns, not even with an
/// error: whatever goes wrong inside ends the worker process (an internal panic aborts it), which
/// the pool sees as a worker death. So a status it returns is always the host's, never a
/// worker's. Otherwise it records the callbacks and returns `SP_OK` at once,
/// `SP_NULL_ARGUMENT` if `spawn` or `execute` is NULL (nothing is recorded), or
/// `SP_INVALID_ARGUMENT` if called again with other callbacks.
///
/// # Safety
///
/// `callbacks`, if not NULL, must point to a valid `sp_worker_callbacks`; its functions must
/// have the documented signatures and `user_data` must stay valid for the process's life.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_init(callbacks: *const sp_worker_callbacks) -> sp_status {
    guard(|| {
        let mut status = Ok(());
        if !callbacks.is_null() {
            // SAFETY: non-null; the caller promises a valid struct.
            let cb = unsafe { *callbacks };
            // Both are required: a worker without them could only fail every spawn, later and
            // far from the mistake.
            if cb.spawn.is_none() || cb.execute.is_none() {
                let field = if cb.spawn.is_none() {
                    "callbacks->spawn"
                } else {
                    "callbacks->execute"
                };
                let _ = INIT_NULL_FIELD.set(field);
                status = Err(Fail::null(field));
            } else {
                status = record(cb);
            }
        }
        // In a worker process this serves and never returns, whatever `status` is: a status
        // returned is always the host's (a worker given NULL callbacks fails its spawn step,
        // saying so).
        stateful_pool::serve::<CWorker>();
        status
    })
}

/// Records `cb` as this process's C worker; refuses other callbacks than those recorded.
fn record(cb: sp_worker_callbacks) -> Result<(), Fail> {
    let stored = CALLBACKS.get_or_init(|| Registered(cb));
    let same = stored.0.spawn.map(|f| f as usize) == cb.spawn.map(|f| f as usize)
        && stored.0.execute.map(|f| f as usize) == cb.execute.map(|f| f as usize)
        && stored.0.drop.map(|f| f as usize) == cb.drop.map(|f| f as usize)
        && stored.0.execute_batch.map(|f| f as usize) == cb.execute_batch.map(|f| f as usize)
        && stored.0.user_data == cb.user_data;
    if same {
        Ok(())
    } else {
        Err(Fail::new(
            sp_status::SP_INVALID_ARGUMENT,
            "sp_init was already called with other callbacks",
        ))
    }
}

/// Appends `len` bytes to the reply's output. Call from inside a `spawn` or `execute` callback,
/// on the reply it was given.
///
/// # Safety
///
/// `reply` must be the pointer the callback received (valid during the call only); `data` must
/// point to `len` readable bytes (may be NULL if `len` is 0).
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_reply_write(
    reply: *mut sp_reply,
    data: *const u8,
    len: usize,
) -> sp_status {
    guard(|| {
        if reply.is_null() {
            return Err(Fail::null("reply"));
        }
        // SAFETY: the caller promises `len` readable bytes at `data`.
        let bytes = unsafe { input_bytes(data, len, "data") }?;
        // SAFETY: non-null; the caller passes the reply of the running callback, which we own
        // and nobody else touches during the call.
        let reply = unsafe { &mut *reply };
        reply.bytes.extend_from_slice(bytes);
        Ok(())
    })
}

/// Appends `len` bytes to the reply's output and gives their address in `*out`, for the
/// callback to write its output straight into (no buffer of its own, no copy through
/// `sp_reply_write`). The bytes start zeroed. `*out` stays valid until the next
/// `sp_reply_alloc` or `sp_reply_write` on this reply, or the callback's return. May be mixed
/// with `sp_reply_write` (each appends). `len` 0 gives NULL. The reply's buffer is sized from
/// the worker's previous output and recycled, so a worker whose outputs have similar sizes
/// allocates nothing per task. `SP_TOO_LARGE` if the memory cannot be had.
///
/// # Safety
///
/// `reply` as for `sp_reply_write`; `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_reply_alloc(
    reply: *mut sp_reply,
    len: usize,
    out: *mut *mut u8,
) -> sp_status {
    guard(|| {
        if reply.is_null() || out.is_null() {
            return Err(Fail::null("reply or out"));
        }
        // SAFETY: as in `sp_reply_write`.
        let reply = unsafe { &mut *reply };
        if len == 0 {
            // SAFETY: checked non-null; the caller promises it is writable.
            unsafe { out.write(std::ptr::null_mut()) };
            return Ok(());
        }
        let too_large = || {
            Fail::new(
                sp_status::SP_TOO_LARGE,
                format!("cannot grow the reply by {len} bytes"),
            )
        };
        if len > (isize::MAX as usize) - reply.bytes.len() {
            return Err(too_large());
        }
        reply.bytes.try_reserve(len).map_err(|_| too_large())?;
        let start = reply.bytes.len();
        reply.bytes.resize(start + len, 0);
        // SAFETY: checked non-null; the caller promises it is writable. The pointer is to the
        // `len` bytes just appended, inside the reply's buffer.
        unsafe { out.write(reply.bytes.as_mut_ptr().add(start)) };
        Ok(())
    })
}

/// Sets the reply's error message (used when the callback returns `SP_WORKER_ERROR` or
/// `SP_WORKER_POISONED`).
///
/// # Safety
///
/// `reply` as for `sp_reply_write`; `message` must be a NUL-terminated string.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_reply_set_error(
    reply: *mut sp_reply,
    message: *const c_char,
) -> sp_status {
    guard(|| {
        if reply.is_null() {
            return Err(Fail::null("reply"));
        }
        if message.is_null() {
            return Err(Fail::null("message"));
        }
        // SAFETY: non-null; the caller promises a NUL-terminated string.
        let msg = unsafe { CStr::from_ptr(message) }
            .to_string_lossy()
            .into_owned();
        // SAFETY: as in `sp_reply_write`.
        unsafe { &mut *reply }.error = Some(msg);
        Ok(())
    })
}
