//! The C ABI called as a C host would, through the exported functions: every function with bad
//! arguments (NULL, zero handles, forged, stale and freed handles, handles of the wrong kind,
//! zero-length and oversized buffers), double frees, worker-side errors, and many threads at once.
//! This test binary is also the worker program: its callbacks are registered before `main`.

mod common;
use common::*;
use stateful_pool_ffi::*;
use std::ffi::{CStr, c_void};
use std::ptr::{null, null_mut};

// ---- a worker written against the C ABI (Rust callbacks with C signatures) ----

unsafe extern "C-unwind" fn t_spawn(
    _: *mut c_void,
    info: *const sp_worker_info,
    args: *const u8,
    len: usize,
    state: *mut *mut c_void,
    reply: *mut sp_reply,
) -> i32 {
    // SAFETY: the library passes `len` readable bytes (or NULL with 0) and valid pointers.
    let args = if len == 0 {
        &[][..]
    } else {
        // SAFETY: the library passes `len` readable bytes.
        unsafe { std::slice::from_raw_parts(args, len) }
    };
    if let Some(path) = args.strip_prefix(b"gate:") {
        // Start only once the test opens the gate (at most 60 s).
        let path = std::path::Path::new(std::str::from_utf8(path).unwrap_or(""));
        let start = std::time::Instant::now();
        while !path.exists() && start.elapsed() < std::time::Duration::from_secs(60) {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
    }
    if args == b"big-output" {
        // A spawn output larger than the test's 256-byte spawn area.
        let big = vec![b'x'; 4096];
        // SAFETY: a valid reply and `big.len()` readable bytes.
        unsafe { sp_reply_write(reply, big.as_ptr(), big.len()) };
        return SP_WORKER_OK;
    }
    if args == b"refuse" {
        // SAFETY: a valid reply and a NUL-terminated message.
        unsafe { sp_reply_set_error(reply, c"refused to start".as_ptr()) };
        return SP_WORKER_ERROR;
    }
    // SAFETY: valid pointers from the library.
    unsafe {
        *state = Box::into_raw(Box::new(0u64)).cast();
        let info = &*info;
        let mut msg = format!("seat {}", info.index);
        if info.gpus_len > 0 {
            let gpus = std::slice::from_raw_parts(info.gpus, info.gpus_len);
            msg.push_str(&format!(" gpus {gpus:?}"));
        }
        sp_reply_write(reply, msg.as_ptr(), msg.len());
    }
    SP_WORKER_OK
}

unsafe extern "C-unwind" fn t_execute(
    state: *mut c_void,
    task: *const sp_task_info,
    reply: *mut sp_reply,
) -> i32 {
    // SAFETY: valid pointers from the library; `state` is our Box<u64>.
    unsafe {
        *(state as *mut u64) += 1;
        let t = &*task;
        let data = if t.len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(t.data, t.len)
        };
        match data {
            b"fail" => {
                sp_reply_set_error(reply, c"failing on purpose".as_ptr());
                SP_WORKER_ERROR
            }
            b"fail-silently" => 7,
            b"poison" => {
                sp_reply_set_error(reply, c"sticky device error".as_ptr());
                SP_WORKER_POISONED
            }
            b"never" => {
                // Runs until killed (a task timeout) or 60 s pass.
                std::thread::sleep(std::time::Duration::from_secs(60));
                SP_WORKER_OK
            }
            _ if data.starts_with(b"gate:") => {
                // Finishes only once the test creates the file (at most 60 s).
                let path = std::str::from_utf8(&data[5..]).unwrap_or("");
                let start = std::time::Instant::now();
                while !std::path::Path::new(path).exists()
                    && start.elapsed() < std::time::Duration::from_secs(60)
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
                sp_reply_write(reply, b"opened".as_ptr(), 6);
                SP_WORKER_OK
            }
            _ if data.starts_with(b"env:") => {
                let key = std::str::from_utf8(&data[4..]).unwrap_or("");
                let v = std::env::var(key).unwrap_or_else(|_| "<unset>".into());
                sp_reply_write(reply, v.as_ptr(), v.len());
                SP_WORKER_OK
            }
            _ if data.starts_with(b"alloc:") => {
                // The output written in place: "head" (sp_reply_write), then n bytes i % 251
                // (sp_reply_alloc), then "tail" (sp_reply_write).
                let n: usize = std::str::from_utf8(&data[6..]).unwrap().parse().unwrap();
                sp_reply_write(reply, b"head".as_ptr(), 4);
                let mut p = null_mut();
                if sp_reply_alloc(reply, n, &mut p) != SP_OK {
                    return SP_WORKER_ERROR;
                }
                for i in 0..n {
                    *p.add(i) = (i % 251) as u8;
                }
                sp_reply_write(reply, b"tail".as_ptr(), 4);
                SP_WORKER_OK
            }
            b"alloc-bad" => {
                let mut p = null_mut();
                let a = sp_reply_alloc(null_mut(), 4, &mut p);
                let b = sp_reply_alloc(reply, 4, null_mut());
                let c = sp_reply_alloc(reply, usize::MAX, &mut p);
                let d = sp_reply_alloc(reply, 0, &mut p);
                let s = format!("{a:?} {b:?} {c:?} {d:?} {}", p.is_null());
                sp_reply_write(reply, s.as_ptr(), s.len());
                SP_WORKER_OK
            }
            b"allocs" => {
                // This process's allocation count, formatted without allocating.
                let mut buf = [0u8; 20];
                let mut n = ALLOCS.load(std::sync::atomic::Ordering::Relaxed);
                let mut i = buf.len();
                loop {
                    i -= 1;
                    buf[i] = b'0' + (n % 10) as u8;
                    n /= 10;
                    if n == 0 {
                        break;
                    }
                }
                sp_reply_write(reply, buf[i..].as_ptr(), buf.len() - i);
                SP_WORKER_OK
            }
            b"payload-len" => {
                let s = t.payload_len.to_string();
                sp_reply_write(reply, s.as_ptr(), s.len());
                SP_WORKER_OK
            }
            other => {
                let mut v = b"echo:".to_vec();
                v.extend_from_slice(other);
                sp_reply_write(reply, v.as_ptr(), v.len());
                SP_WORKER_OK
            }
        }
    }
}

/// The batch step: each task answered "batch{n}:{its bytes}", except "fail" (fails alone);
/// "fail-batch" fails the whole step; anything else goes through `t_execute`'s behaviour only
/// when the pool does not batch.
unsafe extern "C-unwind" fn t_execute_batch(
    _state: *mut c_void,
    tasks: *const sp_task_info,
    n: usize,
    replies: *const *mut sp_reply,
    statuses: *mut i32,
) -> i32 {
    // SAFETY: the library passes `n` tasks, replies and statuses, valid during the call.
    unsafe {
        let tasks = std::slice::from_raw_parts(tasks, n);
        let replies = std::slice::from_raw_parts(replies, n);
        let statuses = std::slice::from_raw_parts_mut(statuses, n);
        for (i, t) in tasks.iter().enumerate() {
            let data = if t.len == 0 {
                &[][..]
            } else {
                std::slice::from_raw_parts(t.data, t.len)
            };
            if data == b"fail-batch" {
                sp_reply_set_error(replies[0], c"the whole batch failed".as_ptr());
                return SP_WORKER_ERROR;
            }
            if data.starts_with(b"gate:") {
                let path = std::str::from_utf8(&data[5..]).unwrap_or("");
                let _ = std::fs::write(format!("{path}.started"), b"");
                let start = std::time::Instant::now();
                while !std::path::Path::new(path).exists()
                    && start.elapsed() < std::time::Duration::from_secs(60)
                {
                    std::thread::sleep(std::time::Duration::from_millis(1));
                }
            }
            if data == b"fail" {
                sp_reply_set_error(replies[i], c"this one failed".as_ptr());
                statuses[i] = SP_WORKER_ERROR;
                continue;
            }
            let mut v = format!("batch{n}:").into_bytes();
            v.extend_from_slice(data);
            sp_reply_write(replies[i], v.as_ptr(), v.len());
        }
        SP_WORKER_OK
    }
}

unsafe extern "C-unwind" fn t_drop(state: *mut c_void) {
    // SAFETY: the Box our spawn made, dropped once.
    drop(unsafe { Box::from_raw(state as *mut u64) });
}

/// Allocations of this process (worker processes run this binary too).
static ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

struct Counting;

// SAFETY: forwards to the system allocator; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: std::alloc::Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: std::alloc::Layout) {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: std::alloc::Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn callbacks() -> sp_worker_callbacks {
    sp_worker_callbacks {
        user_data: null_mut(),
        spawn: Some(t_spawn),
        execute: Some(t_execute),
        drop: Some(t_drop),
        execute_batch: Some(t_execute_batch),
    }
}

#[used]
#[unsafe(link_section = ".init_array")]
static WORKER_HOOK: extern "C" fn() = {
    extern "C" fn hook() {
        let cb = callbacks();
        // SAFETY: a valid callbacks struct; in a worker process this never returns.
        unsafe { sp_init(&cb) };
    }
    hook
};

// ---- helpers ----

use sp_status::*;

fn spawn(p: sp_pool, args: &[u8]) -> Result<String, (sp_status, String)> {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid pointers.
    let s = unsafe { sp_pool_spawn(p, args.as_ptr(), args.len(), &mut r, null_mut()) };
    if s != SP_OK {
        return Err((s, last_error()));
    }
    Ok(take(r))
}

fn submit(p: sp_pool, task: &[u8]) -> Result<sp_task, sp_status> {
    let mut t = sp_task { id: 0 };
    // SAFETY: valid pointers.
    match unsafe { sp_pool_submit(p, task.as_ptr(), task.len(), &mut t) } {
        SP_OK => Ok(t),
        s => Err(s),
    }
}

fn wait(t: sp_task) -> Result<String, (sp_status, String)> {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid out-pointer.
    match unsafe { sp_task_wait(t, &mut r) } {
        SP_OK => Ok(take(r)),
        s => Err((s, last_error())),
    }
}

fn execute(p: sp_pool, task: &[u8]) -> Result<String, (sp_status, String)> {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid pointers.
    match unsafe { sp_pool_execute(p, task.as_ptr(), task.len(), &mut r) } {
        SP_OK => Ok(take(r)),
        s => Err((s, last_error())),
    }
}

// ---- tests ----

#[test]
fn statuses_have_names_and_the_version_is_set() {
    watchdog(120, || {
        let name = |s: i32| {
            // SAFETY: static NUL-terminated strings.
            unsafe { CStr::from_ptr(sp_status_name(s)) }
                .to_str()
                .unwrap()
        };
        assert_eq!(name(0), "SP_OK");
        assert_eq!(name(5), "SP_QUEUE_FULL");
        assert_eq!(name(20), "SP_PANIC");
        assert_eq!(name(21), "SP_NO_SUCH_WORKER");
        assert_eq!(name(22), "SP_EMPTY");
        assert_eq!(name(23), "SP_UNKNOWN");
        assert_eq!(name(-1), "SP_UNKNOWN");
        assert_eq!(name(1000), "SP_UNKNOWN");
        // SAFETY: as above.
        let v = unsafe { CStr::from_ptr(sp_version()) }.to_str().unwrap();
        assert_eq!(v, env!("CARGO_PKG_VERSION"));
        assert_eq!(sp_abi_version(), SP_ABI_VERSION);
    });
}

#[test]
fn a_bounded_look_keeps_a_completion_queue_registration() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 8);
        assert!(spawn(p, b"ok").is_ok());
        let gate = gate_path("cq-look");
        let mut cq = sp_completion_queue { id: 0 };
        let (mut ud, mut t2) = (0u64, sp_task { id: 0 });
        // SAFETY: (whole block) valid pointers.
        unsafe {
            assert_eq!(sp_completion_queue_new(&mut cq), SP_OK);
            let t = submit(p, format!("gate:{}", gate.display()).as_bytes()).unwrap();
            assert_eq!(sp_task_notify(t, cq, 42), SP_OK);
            // A quick look and a poll: not finished, and the registration stays.
            let mut r = sp_result { id: 0 };
            assert_eq!(sp_task_wait_timeout(t, 0, &mut r), SP_TIMEOUT);
            assert_eq!(sp_task_wait_timeout(t, 5, &mut r), SP_TIMEOUT);
            assert_eq!(sp_task_poll(t, &mut r), SP_PENDING);
            open_gate(&gate);
            let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
            let got = loop {
                match sp_completion_queue_next(cq, &mut ud, &mut t2) {
                    SP_OK => break true,
                    SP_EMPTY if std::time::Instant::now() < end => {
                        std::thread::sleep(std::time::Duration::from_millis(1))
                    }
                    _ => break false,
                }
            };
            assert!(got, "the completion reached the queue");
            assert_eq!((ud, t2), (42, t));
            assert_eq!(wait(t).unwrap(), "opened");
            assert_eq!(sp_completion_queue_free(cq), SP_OK);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn null_zero_forged_and_wrong_kind_handles_are_error_codes() {
    watchdog(120, || {
        let (mut d, mut n, mut dm) = (null(), 0usize, null_mut());
        let mut r = sp_result { id: 0 };
        let mut t = sp_task { id: 0 };
        let mut l = sp_loan { id: 0 };
        let mut count = 0usize;
        let zero = sp_pool { id: 0 };
        let forged = sp_pool {
            id: 0x0100_0001_0000_0063,
        };
        // SAFETY: (whole block) every pointer passed is valid or NULL, as the API allows.
        unsafe {
            assert_eq!(sp_pool_options_init(null_mut()), SP_NULL_ARGUMENT);
            assert_eq!(sp_pool_new(null(), null_mut()), SP_NULL_ARGUMENT);
            for p in [zero, forged] {
                let want = if p.id == 0 {
                    SP_NULL_ARGUMENT
                } else {
                    SP_INVALID_HANDLE
                };
                assert_eq!(sp_pool_spawn(p, null(), 0, &mut r, null_mut()), want);
                assert_eq!(
                    sp_pool_spawn_many(
                        p,
                        &sp_bytes {
                            data: null(),
                            len: 0
                        },
                        1,
                        &mut r,
                        &mut SP_OK
                    ),
                    want
                );
                assert_eq!(sp_pool_num_workers(p, &mut count), want);
                assert_eq!(sp_pool_submit(p, null(), 0, &mut t), want);
                assert_eq!(sp_pool_try_submit(p, null(), 0, &mut t), want);
                assert_eq!(sp_pool_execute(p, null(), 0, &mut r), want);
                assert_eq!(sp_pool_loan(p, 16, &mut l), want);
                assert_eq!(sp_pool_try_loan(p, 16, &mut l), want);
                assert_eq!(sp_pool_submit_loan(p, null(), 0, l, &mut t), want);
                assert_eq!(sp_pool_shutdown(p, 0), want);
                // Freeing a zero handle is a no-op; a forged one is an error.
                let free_want = if p.id == 0 { SP_OK } else { want };
                assert_eq!(sp_pool_free(p), free_want);
            }
            assert!(
                last_error().contains("not a live pool handle"),
                "{}",
                last_error()
            );
            assert_eq!(sp_task_wait(sp_task { id: 0 }, &mut r), SP_NULL_ARGUMENT);
            assert_eq!(sp_task_wait(sp_task { id: 77 }, &mut r), SP_INVALID_HANDLE);
            assert_eq!(
                sp_task_wait_timeout(sp_task { id: 77 }, 1, &mut r),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_task_poll(sp_task { id: 77 }, &mut r), SP_INVALID_HANDLE);
            assert_eq!(sp_task_cancel(sp_task { id: 77 }), SP_INVALID_HANDLE);
            assert_eq!(sp_task_free(sp_task { id: 0 }), SP_OK);
            assert_eq!(sp_loan_free(sp_loan { id: 0 }), SP_OK);
            assert_eq!(
                sp_result_bytes(sp_result { id: 9 }, &mut d, &mut n),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_result_free(sp_result { id: 0 }), SP_OK);
            assert_eq!(
                sp_loan_data(sp_loan { id: 5 }, &mut dm, &mut n),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_loan_free(sp_loan { id: 5 }), SP_INVALID_HANDLE);
            assert_eq!(sp_reply_write(null_mut(), null(), 0), SP_NULL_ARGUMENT);
            assert_eq!(
                sp_reply_set_error(null_mut(), c"x".as_ptr()),
                SP_NULL_ARGUMENT
            );
            // The same misuse again: still only error codes.
            assert_eq!(sp_pool_free(forged), SP_INVALID_HANDLE);
        }

        // A live pool handle used as another kind, and other kinds as a pool.
        let p = new_pool(|_| {});
        // SAFETY: valid pointers.
        unsafe {
            assert_eq!(
                sp_task_wait(sp_task { id: p.id }, &mut r),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_result_free(sp_result { id: p.id }), SP_INVALID_HANDLE);
            assert_eq!(sp_loan_free(sp_loan { id: p.id }), SP_INVALID_HANDLE);
            assert_eq!(sp_pool_loan(p, 64, &mut l), SP_OK);
            assert_eq!(sp_pool_free(sp_pool { id: l.id }), SP_INVALID_HANDLE);
            assert_eq!(sp_loan_free(l), SP_OK);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn bad_buffers_and_options_are_refused() {
    watchdog(120, || {
        let mut p = sp_pool { id: 0 };
        let mut o = std::mem::MaybeUninit::<sp_pool_options>::uninit();
        let mut t = sp_task { id: 0 };
        let mut l = sp_loan { id: 0 };
        let mut r = sp_result { id: 0 };
        // SAFETY: (whole block) pointers valid or NULL as noted; lengths deliberately wrong
        // where a NULL pointer makes them unreadable (the library must refuse before reading).
        unsafe {
            assert_eq!(sp_pool_options_init(o.as_mut_ptr()), SP_OK);
            let mut opts = o.assume_init();
            opts.queue_size = 1 << 30;
            assert_eq!(sp_pool_new(&opts, &mut p), SP_BUILD_FAILED);
            assert!(last_error().contains("queue_size"), "{}", last_error());
            opts.queue_size = 0;
            let bad = [0xffu8, 0xfe, 0];
            opts.program = bad.as_ptr().cast();
            assert_eq!(sp_pool_new(&opts, &mut p), SP_INVALID_ARGUMENT);
            opts.program = null();
            opts.queue_size = 2;
            opts.max_task_bytes = 4096;
            opts.spawn_area_bytes = 256;
            assert_eq!(sp_pool_new(&opts, &mut p), SP_OK);

            // NULL data with a length; an absurd length; NULL out-pointers.
            assert_eq!(sp_pool_submit(p, null(), 10, &mut t), SP_NULL_ARGUMENT);
            assert_eq!(
                sp_pool_submit(p, [1u8].as_ptr(), usize::MAX, &mut t),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(
                sp_pool_submit(p, [1u8].as_ptr(), 1, null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_pool_spawn(p, null(), 3, &mut r, null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_pool_spawn(p, null(), 0, null_mut(), null_mut()),
                SP_NULL_ARGUMENT
            );
            // Oversized task, spawn arguments and loan.
            let big = vec![7u8; 10_000];
            assert_eq!(
                sp_pool_submit(p, big.as_ptr(), big.len(), &mut t),
                SP_TOO_LARGE
            );
            assert!(
                last_error().contains("exceeds the maximum of 4096"),
                "{}",
                last_error()
            );
            // A task counts as it travels: its bytes padded to 4, plus 8 bytes of framing.
            match submit(p, &[b'x'; 4088]) {
                Ok(t) => assert_eq!(sp_task_free(t), SP_OK),
                Err(s) => assert_ne!(s, SP_TOO_LARGE, "{}", last_error()),
            }
            assert_eq!(submit(p, &[b'x'; 4089]).unwrap_err(), SP_TOO_LARGE);
            assert_eq!(
                sp_pool_spawn(p, big.as_ptr(), 1000, &mut r, null_mut()),
                SP_TOO_LARGE
            );
            assert_eq!(sp_pool_loan(p, 10_000, &mut l), SP_TOO_LARGE);
            // A spawn output larger than the spawn area: too large as well, and the seat is
            // free again.
            let (status, message) = spawn(p, b"big-output").unwrap_err();
            assert_eq!(status, SP_TOO_LARGE, "{message}");
            assert!(message.contains("spawn area of 256 bytes"), "{message}");
            // Zero-length loan; a length over SIZE_MAX / 2.
            assert_eq!(sp_pool_loan(p, 0, &mut l), SP_INVALID_ARGUMENT);
            assert_eq!(sp_pool_loan(p, usize::MAX, &mut l), SP_INVALID_ARGUMENT);
            assert_eq!(
                sp_pool_try_loan(p, usize::MAX / 2 + 1, &mut l),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(sp_loan_data(l, null_mut(), null_mut()), SP_NULL_ARGUMENT);

            // No worker and none coming: a submit is refused at once.
            assert_eq!(submit(p, b"early").unwrap_err(), SP_NO_WORKERS);
            // A worker that is starting (its spawn waits on a gate that never opens): tasks
            // are accepted and wait for it.
            let gate = std::env::temp_dir().join(format!("sp-abi-gate-{}", std::process::id()));
            let gated = format!("gate:{}", gate.display());
            let spawner = std::thread::spawn(move || spawn(p, gated.as_bytes()));
            // (Until the spawn has taken its seat a submit is still refused: retry, bounded.)
            let started = std::time::Instant::now();
            let t1 = loop {
                match submit(p, b"a") {
                    Ok(t) => break t,
                    Err(SP_NO_WORKERS) => {
                        assert!(started.elapsed() < std::time::Duration::from_secs(60));
                        std::thread::yield_now();
                    }
                    Err(e) => panic!("submit: {e:?}"),
                }
            };

            // A loan sent is consumed; the handle is dead after, sent or not.
            assert_eq!(sp_pool_try_loan(p, 64, &mut l), SP_OK);
            let mut t3 = sp_task { id: 0 };
            assert_eq!(sp_pool_submit_loan(p, null(), 0, l, &mut t3), SP_OK);
            assert_eq!(sp_loan_free(l), SP_INVALID_HANDLE);
            assert_eq!(
                sp_pool_submit_loan(p, null(), 0, l, &mut t3),
                SP_INVALID_HANDLE
            );
            // A full queue (2 slots, the worker still starting): try_submit says so at once.
            assert_eq!(
                sp_pool_try_submit(p, b"c".as_ptr(), 1, &mut t),
                SP_QUEUE_FULL
            );
            // Polling and waiting with a timeout leave the task handle valid.
            assert_eq!(sp_task_poll(t1, &mut r), SP_PENDING);
            assert_eq!(sp_task_wait_timeout(t1, 1, &mut r), SP_TIMEOUT);
            assert_eq!(sp_task_wait(t1, null_mut()), SP_NULL_ARGUMENT);
            // Cancel keeps the handle; free drops it; a second free is an error code.
            assert_eq!(sp_task_cancel(t1), SP_OK);
            assert_eq!(sp_task_free(t3), SP_OK);
            assert_eq!(sp_task_free(t3), SP_INVALID_HANDLE);
            // A cancelled task that no worker has claimed is answered at once (the only
            // worker is still starting), even by a wait with no time at all.
            assert_eq!(sp_task_wait_timeout(t1, 0, &mut r), SP_CANCELLED);

            // Shutdown abandons the start-up; submits after it are refused.
            assert_eq!(sp_pool_shutdown(p, 1), SP_OK);
            // The start-up it abandoned answers its spawn call.
            assert!(spawner.join().unwrap().is_err());
            assert_eq!(submit(p, b"late").unwrap_err(), SP_SHUTDOWN);
            assert_eq!(sp_pool_free(p), SP_OK);
            assert_eq!(sp_pool_free(p), SP_INVALID_HANDLE);
            assert_eq!(submit(p, b"after free").unwrap_err(), SP_INVALID_HANDLE);
        }
    });
}

#[test]
fn results_are_read_in_place_and_freed_exactly_once() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 8);
        assert_eq!(spawn(p, b"w").unwrap(), "seat 0");
        let t = submit(p, b"hello").unwrap();
        let mut r = sp_result { id: 0 };
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { sp_task_wait(t, &mut r) }, SP_OK);
        let (mut d, mut n) = (null(), 0usize);
        // SAFETY: valid out-pointers.
        unsafe {
            assert_eq!(sp_result_bytes(r, &mut d, &mut n), SP_OK);
            assert_eq!(std::slice::from_raw_parts(d, n), b"echo:hello");
            assert_eq!(d as usize % 16, 0, "results are 16-byte aligned");
            assert_eq!(
                sp_task_wait(t, &mut r),
                SP_INVALID_HANDLE,
                "a task is waited once"
            );
        }
        assert_eq!(sp_result_free(r), SP_OK);
        assert_eq!(sp_result_free(r), SP_INVALID_HANDLE, "double free");
        assert_eq!(
            // SAFETY: valid out-pointers.
            unsafe { sp_result_bytes(r, &mut d, &mut n) },
            SP_INVALID_HANDLE
        );
        // An empty task and an empty result are fine.
        assert_eq!(execute(p, b"").unwrap(), "echo:");
        // A loaned payload reaches the worker in place.
        let mut l = sp_loan { id: 0 };
        let (mut data, mut len) = (null_mut(), 0usize);
        let mut t = sp_task { id: 0 };
        // SAFETY: valid pointers; the loan's buffer is ours to write until sent.
        unsafe {
            assert_eq!(sp_pool_loan(p, 100_000, &mut l), SP_OK);
            assert_eq!(sp_loan_data(l, &mut data, &mut len), SP_OK);
            assert_eq!(len, 100_000);
            std::ptr::write_bytes(data, 1, len);
            assert_eq!(
                sp_pool_submit_loan(p, b"payload-len".as_ptr(), 11, l, &mut t),
                SP_OK
            );
        }
        assert_eq!(wait(t).unwrap(), "100000");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn a_refused_submit_loan_leaves_the_loan_with_the_caller() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 8);
        let other = new_pool(|o| o.queue_size = 8);
        assert!(spawn(p, b"ok").is_ok());
        let mut l = sp_loan { id: 0 };
        let (mut data, mut len) = (null_mut(), 0usize);
        let mut t = sp_task { id: 0 };
        // SAFETY: valid pointers; the loan's buffer is ours to write until sent.
        unsafe {
            assert_eq!(sp_pool_loan(p, 4096, &mut l), SP_OK);
            assert_eq!(sp_loan_data(l, &mut data, &mut len), SP_OK);
            std::ptr::write_bytes(data, 7, len);
            // Another pool's submit refuses it, and `*out` stays as it was.
            assert_eq!(
                sp_pool_submit_loan(other, b"payload-len".as_ptr(), 11, l, &mut t),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(t.id, 0, "no output on failure");
            // Still the caller's, still filled.
            let (mut d2, mut n2) = (null_mut(), 0usize);
            assert_eq!(sp_loan_data(l, &mut d2, &mut n2), SP_OK);
            assert_eq!((d2, n2), (data, len));
            assert!(std::slice::from_raw_parts(d2, n2).iter().all(|&b| b == 7));
            // The right pool takes it; then the handle is spent.
            assert_eq!(
                sp_pool_submit_loan(p, b"payload-len".as_ptr(), 11, l, &mut t),
                SP_OK
            );
            assert_eq!(wait(t).unwrap(), "4096");
            assert_eq!(sp_loan_free(l), SP_INVALID_HANDLE);
            // After shutdown: refused, and the loan can still be freed by its owner.
            let mut l2 = sp_loan { id: 0 };
            assert_eq!(sp_pool_loan(p, 64, &mut l2), SP_OK);
            assert_eq!(sp_pool_shutdown(p, 0), SP_OK);
            assert_eq!(
                sp_pool_submit_loan(p, b"x".as_ptr(), 1, l2, &mut t),
                SP_SHUTDOWN
            );
            assert_eq!(sp_loan_free(l2), SP_OK);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
        assert_eq!(sp_pool_free(other), SP_OK);
    });
}

#[test]
fn a_c_worker_runs_batches_through_its_batch_callback() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 32;
            o.max_batch = 8;
        });
        assert!(spawn(p, b"ok").is_ok());
        // Hold the worker, queue four tasks, release: they run as one batch.
        let gate = gate_path("c-batch");
        let g = format!("gate:{}", gate.display());
        let started = std::path::PathBuf::from(format!("{}.started", gate.display()));
        let held = submit(p, g.as_bytes()).unwrap();
        // Its batch step has started (alone): what is queued now forms the next batch.
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !started.exists() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        assert!(started.exists(), "the gate task started");
        let ts: Vec<sp_task> = [&b"a"[..], b"fail", b"c", b"d"]
            .iter()
            .map(|t| submit(p, t).unwrap())
            .collect();
        open_gate(&gate);
        assert_eq!(wait(held).unwrap(), format!("batch1:{g}"));
        let outs: Vec<_> = ts.into_iter().map(wait).collect();
        let batch_size = |s: &str| s.split(':').next().unwrap().to_string();
        let ok: Vec<&String> = outs.iter().filter_map(|o| o.as_ref().ok()).collect();
        assert_eq!(ok.len(), 3, "{outs:?}");
        assert!(ok.iter().all(|o| o.starts_with("batch")), "{outs:?}");
        let (st, msg) = outs[1].clone().unwrap_err();
        assert_eq!(st, SP_TASK_FAILED);
        assert!(msg.contains("this one failed"), "{msg}");
        assert!(
            ok.iter().all(|o| batch_size(o) == "batch4"),
            "one step of the four queued tasks: {outs:?}"
        );
        let _ = std::fs::remove_file(&started);
        let _ = std::fs::remove_file(&gate);
        // A whole-step failure fails every task of it.
        let gate2 = gate_path("c-batch-2");
        let g2 = format!("gate:{}", gate2.display());
        let started2 = std::path::PathBuf::from(format!("{}.started", gate2.display()));
        let held = submit(p, g2.as_bytes()).unwrap();
        let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
        while !started2.exists() && std::time::Instant::now() < end {
            std::thread::sleep(std::time::Duration::from_millis(1));
        }
        let ts: Vec<sp_task> = [&b"x"[..], b"fail-batch"]
            .iter()
            .map(|t| submit(p, t).unwrap())
            .collect();
        open_gate(&gate2);
        let _ = wait(held);
        let _ = std::fs::remove_file(&started2);
        let _ = std::fs::remove_file(&gate2);
        for t in ts {
            let (st, msg) = wait(t).unwrap_err();
            assert_eq!(st, SP_TASK_FAILED);
            assert!(msg.contains("the whole batch failed"), "{msg}");
        }
        // Off, on a live pool: tasks go through `execute` again.
        assert_eq!(sp_pool_set_batch_policy(p, 1, 0), SP_OK);
        assert_eq!(execute(p, b"z").unwrap(), "echo:z");
        assert_eq!(sp_pool_set_batch_policy(p, 65, 0), SP_INVALID_ARGUMENT);
        // The delay's bound holds also for a policy that turns batching off.
        assert_eq!(
            sp_pool_set_batch_policy(p, 0, 3_600_000_001),
            SP_INVALID_ARGUMENT
        );
        assert_eq!(
            sp_pool_set_batch_policy(sp_pool { id: 0 }, 8, 0),
            SP_NULL_ARGUMENT
        );
        assert_eq!(sp_pool_set_batch_policy(p, 4, 100), SP_OK);
        assert!(execute(p, b"z").unwrap().starts_with("batch"));
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn a_c_worker_output_costs_no_allocation_per_task() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 8);
        assert!(spawn(p, b"ok").is_ok());
        let count = |p| execute(p, b"allocs").unwrap().parse::<u64>().unwrap();
        // Warm up: the reply buffers reach their size and are recycled from then on.
        for _ in 0..200 {
            assert_eq!(execute(p, b"alloc:100").unwrap().len(), 108);
        }
        let before = count(p);
        for _ in 0..500 {
            assert_eq!(execute(p, b"alloc:100").unwrap().len(), 108);
        }
        let after = count(p);
        // The "allocs" task itself is one more task; a handful is slack, not one per task.
        assert!(
            after - before <= 5,
            "{} allocations in the worker for 500 tasks",
            after - before
        );
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn worker_errors_come_back_as_statuses_with_messages() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 8);
        let e = spawn(p, b"refuse").unwrap_err();
        assert_eq!(e.0, SP_SPAWN_FAILED);
        assert!(e.1.contains("refused to start"), "{}", e.1);
        assert!(spawn(p, b"ok").is_ok());
        let e = execute(p, b"fail").unwrap_err();
        assert_eq!(e.0, SP_TASK_FAILED);
        assert!(e.1.contains("failing on purpose"), "{}", e.1);
        let e = execute(p, b"fail-silently").unwrap_err();
        assert_eq!(e.0, SP_TASK_FAILED);
        assert!(e.1.contains("execute callback returned 7"), "{}", e.1);
        // Poison: the task fails, the worker is replaced, and the pool serves on.
        let e = execute(p, b"poison").unwrap_err();
        assert_eq!(e.0, SP_POISONED);
        assert!(e.1.contains("sticky device error"), "{}", e.1);
        assert_eq!(execute(p, b"again").unwrap(), "echo:again");
        // Spawn many: per-worker statuses, the first failure returned.
        let args = [
            sp_bytes {
                data: b"a".as_ptr(),
                len: 1,
            },
            sp_bytes {
                data: b"refuse".as_ptr(),
                len: 6,
            },
        ];
        let mut outs = [sp_result { id: 0 }; 2];
        let mut statuses = [SP_OK; 2];
        // SAFETY: arrays of 2.
        let s = unsafe {
            sp_pool_spawn_many(
                p,
                args.as_ptr(),
                2,
                outs.as_mut_ptr(),
                statuses.as_mut_ptr(),
            )
        };
        assert_eq!(s, SP_SPAWN_FAILED);
        assert_eq!(statuses, [SP_OK, SP_SPAWN_FAILED]);
        assert!(take(outs[0]).starts_with("seat "));
        assert_eq!(outs[1].id, 0);
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn many_host_threads_share_a_pool() {
    watchdog(120, || {
        let p = new_pool(|o| o.queue_size = 64);
        for _ in 0..2 {
            spawn(p, b"w").unwrap();
        }
        std::thread::scope(|s| {
            for th in 0..8 {
                s.spawn(move || {
                    for i in 0..300 {
                        let task = format!("{th}-{i}");
                        let t = submit(p, task.as_bytes()).unwrap();
                        assert_eq!(wait(t).unwrap(), format!("echo:{task}"));
                    }
                });
            }
        });
        let mut n = 0usize;
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { sp_pool_num_workers(p, &mut n) }, SP_OK);
        assert_eq!(n, 2);
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn sp_init_refuses_other_callbacks_once_registered() {
    watchdog(120, || {
        let same = callbacks();
        let mut other = callbacks();
        other.drop = None;
        let mut no_execute = callbacks();
        no_execute.execute = None;
        // SAFETY: valid structs.
        unsafe {
            // Required callbacks missing: refused before anything is recorded.
            assert_eq!(sp_init(&no_execute), SP_NULL_ARGUMENT);
            assert_eq!(sp_init(&same), SP_OK);
            assert_eq!(sp_init(null()), SP_OK);
            assert_eq!(sp_init(&other), SP_INVALID_ARGUMENT);
        }
    });
}

#[test]
fn a_forked_child_finds_the_parents_pools_shut_down() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 8;
            o.max_workers = 1;
        });
        assert_eq!(spawn(p, b"").unwrap(), "seat 0");
        // SAFETY: the child calls only the library's functions (which check for the fork before
        // taking any lock) and `_exit`.
        let pid = unsafe { libc::fork() };
        assert!(pid >= 0, "fork failed");
        if pid == 0 {
            let mut n = 0usize;
            let mut t = sp_task { id: 0 };
            let mut q = sp_pool { id: 0 };
            // SAFETY: valid pointers; `_exit` ends the child without running the parent's
            // atexit handlers or destructors.
            unsafe {
                let statuses = [
                    sp_pool_num_workers(p, &mut n),
                    sp_pool_submit(p, b"x".as_ptr(), 1, &mut t),
                    sp_pool_free(p),
                    sp_pool_new(null(), &mut q),
                ];
                let code = match statuses.iter().position(|&s| s != SP_SHUTDOWN) {
                    None => 0,
                    Some(i) => 10 + i as i32,
                };
                libc::_exit(code)
            }
        }
        let mut status = 0;
        // SAFETY: waits for the child forked above.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(libc::WIFEXITED(status), "child status {status:#x}");
        assert_eq!(
            libc::WEXITSTATUS(status),
            0,
            "10 + the index of the first call that was not SP_SHUTDOWN in the child"
        );
        // The parent's pool is untouched.
        assert_eq!(execute(p, b"after fork").unwrap(), "echo:after fork");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

// ---- per-task options, batches, spawn options, restarts, broadcast, completion queues ----

/// A path that does not exist yet, unique to this test process and `name`: a gate a task or
/// spawn waits on until the test creates the file.
fn gate_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("sp-abi-{}-{name}", std::process::id()))
}

fn open_gate(path: &std::path::Path) {
    std::fs::write(path, b"").unwrap();
}

/// Reads a result set into `(status, worker, text)` triples and frees it.
fn read_set(set: sp_result_set) -> Vec<(sp_status, usize, String)> {
    let mut n = 0usize;
    // SAFETY: valid out-pointers; the pointers read stay valid until the free below.
    unsafe {
        assert_eq!(sp_result_set_len(set, &mut n), SP_OK);
        let v = (0..n)
            .map(|i| {
                let mut o = std::mem::zeroed::<sp_outcome>();
                assert_eq!(sp_result_set_get(set, i, &mut o), SP_OK);
                assert!(!o.message.is_null());
                let text = if o.status == SP_OK {
                    if o.len == 0 {
                        String::new()
                    } else {
                        String::from_utf8_lossy(std::slice::from_raw_parts(o.data, o.len))
                            .into_owned()
                    }
                } else {
                    CStr::from_ptr(o.message).to_string_lossy().into_owned()
                };
                (o.status, o.worker, text)
            })
            .collect();
        assert_eq!(sp_result_set_free(set), SP_OK);
        assert_eq!(sp_result_set_free(set), SP_INVALID_HANDLE);
        v
    }
}

#[test]
fn outputs_are_written_only_on_success() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 2;
            o.max_workers = 1;
        });
        spawn(p, b"").unwrap();
        let gate = gate_path("outputs");
        let gated = format!("gate:{}", gate.display());
        const MARK: u64 = 0xdead_beef;
        let mut t = sp_task { id: MARK };
        let mut r = sp_result { id: MARK };
        let mut l = sp_loan { id: MARK };
        let mut b = sp_batch { id: MARK };
        let mut set = sp_result_set { id: MARK };
        let mut cq = sp_completion_queue { id: MARK };
        let mut n = MARK as usize;
        let mut ud = MARK;
        let (mut d, mut dm) = (std::ptr::dangling::<u8>(), std::ptr::dangling_mut::<u8>());
        let forged_task = sp_task {
            id: 0x0200_0001_0000_0042,
        };
        // SAFETY: (whole block) valid out-pointers; the calls are meant to fail.
        unsafe {
            let forged = sp_pool {
                id: 0x0100_0001_0000_0063,
            };
            assert_eq!(sp_pool_submit(forged, null(), 0, &mut t), SP_INVALID_HANDLE);
            assert_eq!(
                sp_pool_execute(forged, null(), 0, &mut r),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_pool_loan(p, 0, &mut l), SP_INVALID_ARGUMENT);
            assert_eq!(sp_pool_num_workers(forged, &mut n), SP_INVALID_HANDLE);
            assert_eq!(sp_task_wait(forged_task, &mut r), SP_INVALID_HANDLE);
            assert_eq!(sp_task_poll(forged_task, &mut r), SP_INVALID_HANDLE);
            assert_eq!(
                sp_result_bytes(sp_result { id: 9 }, &mut d, &mut n),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_loan_data(sp_loan { id: 9 }, &mut dm, &mut n),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_pool_submit_batch(p, null(), 0, null(), 0, &mut b),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(
                sp_pool_broadcast(forged, null(), 0, &mut set),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_batch_wait(sp_batch { id: 9 }, &mut set),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_pool_spawn_with(forged, null(), 0, null(), &mut r, &mut n),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_pool_replace_worker(p, 3, &mut r), SP_NO_SUCH_WORKER);
            assert_eq!(
                sp_completion_queue_fd(cq, &mut (n as i32)),
                SP_INVALID_HANDLE
            );
            // A pending task: poll is SP_PENDING and writes nothing.
            assert_eq!(
                sp_pool_submit(p, gated.as_ptr(), gated.len(), &mut t),
                SP_OK
            );
            let live = t;
            t = sp_task { id: MARK };
            let mut pending = sp_result { id: MARK };
            assert_eq!(sp_task_poll(live, &mut pending), SP_PENDING);
            assert_eq!(pending.id, MARK);
            assert_eq!(sp_task_wait_timeout(live, 0, &mut pending), SP_TIMEOUT);
            assert_eq!(pending.id, MARK);
            // An empty completion queue.
            let mut q = sp_completion_queue { id: 0 };
            assert_eq!(sp_completion_queue_new(&mut q), SP_OK);
            assert_eq!(sp_completion_queue_next(q, &mut ud, &mut t), SP_EMPTY);
            assert_eq!(sp_completion_queue_free(q), SP_OK);
            cq = q;
            open_gate(&gate);
            assert_eq!(wait(live).unwrap(), "opened");
        }
        assert_eq!(
            (
                t.id,
                r.id,
                l.id,
                b.id,
                set.id,
                n,
                ud,
                d as usize,
                dm as usize
            ),
            (
                MARK,
                MARK,
                MARK,
                MARK,
                MARK,
                MARK as usize,
                MARK,
                std::ptr::dangling::<u8>() as usize,
                std::ptr::dangling::<u8>() as usize
            )
        );
        assert_ne!(cq.id, MARK);
        assert_eq!(sp_pool_free(p), SP_OK);
        // Only now: a gate task that has not seen the gate yet would wait for it until the
        // shutdown timeout.
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn per_task_options_set_a_timeout_and_flags_are_checked() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 1;
            o.max_workers = 1;
        });
        spawn(p, b"").unwrap();
        let mut t = sp_task { id: 0 };
        let opts = sp_task_options {
            timeout_ms: 300,
            retries: 0,
            set_retries: true,
            deadline_ms: 0,
        };
        // SAFETY: (whole block) valid pointers, or NULL where the API allows it.
        unsafe {
            // NULL options: as sp_pool_submit.
            assert_eq!(
                sp_pool_submit_with(p, b"a".as_ptr(), 1, null(), 0, &mut t),
                SP_OK
            );
            assert_eq!(wait(t).unwrap(), "echo:a");
            // All-zero options are the defaults (and may be combined with SP_SUBMIT_TRY).
            let zero = sp_task_options::default();
            assert_eq!(
                sp_pool_submit_with(p, b"b".as_ptr(), 1, &zero, SP_SUBMIT_TRY, &mut t),
                SP_OK
            );
            // The queue (one slot) is full until that task is collected.
            let mut t2 = sp_task { id: 0 };
            assert_eq!(
                sp_pool_submit_with(p, b"c".as_ptr(), 1, null(), SP_SUBMIT_TRY, &mut t2),
                SP_QUEUE_FULL
            );
            assert_eq!(t2.id, 0);
            assert_eq!(wait(t).unwrap(), "echo:b");
            // A timeout: the task is killed with its worker (which is restarted).
            assert_eq!(
                sp_pool_submit_with(p, b"never".as_ptr(), 5, &opts, 0, &mut t),
                SP_OK
            );
            let (s, msg) = wait(t).unwrap_err();
            assert_eq!(s, SP_TASK_TIMED_OUT, "{msg}");
            assert_eq!(execute(p, b"after").unwrap(), "echo:after");
            // Non-blocking and with options at once (a limit no stall reaches).
            let roomy = sp_task_options {
                timeout_ms: 60_000,
                ..opts
            };
            assert_eq!(
                sp_pool_submit_with(p, b"x".as_ptr(), 1, &roomy, SP_SUBMIT_TRY, &mut t2),
                SP_OK
            );
            assert_eq!(wait(t2).unwrap(), "echo:x");
            t2 = sp_task { id: 0 };
            // Bad arguments.
            assert_eq!(
                sp_pool_submit_with(p, b"x".as_ptr(), 1, null(), 6, &mut t2),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(
                sp_pool_submit_with(p, null(), 3, null(), 0, &mut t2),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_pool_submit_with(p, b"x".as_ptr(), 1, null(), 0, null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_pool_submit_with(sp_pool { id: 0 }, null(), 0, null(), 0, &mut t2),
                SP_NULL_ARGUMENT
            );
            assert_eq!(t2.id, 0);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn batches_give_each_tasks_outcome_and_wait_with_a_timeout() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 4;
            o.max_workers = 1;
        });
        spawn(p, b"").unwrap();
        let gate = gate_path("batch");
        let gate_task = format!("gate:{}", gate.display());
        let bytes = |s: &[u8]| sp_bytes {
            data: s.as_ptr(),
            len: s.len(),
        };
        let mut b = sp_batch { id: 0 };
        let mut set = sp_result_set { id: 0 };
        // SAFETY: (whole block) valid pointers, or NULL where the API allows it.
        unsafe {
            let tasks = [bytes(b"a"), bytes(b"fail"), bytes(b""), bytes(b"b")];
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), tasks.len(), null(), 0, &mut b),
                SP_OK
            );
            assert_eq!(sp_batch_wait(b, &mut set), SP_OK);
            assert_eq!(sp_batch_wait(b, &mut set), SP_INVALID_HANDLE);
            let got = read_set(set);
            assert_eq!(got.len(), 4);
            assert_eq!(got[0], (SP_OK, usize::MAX, "echo:a".to_string()));
            assert_eq!(got[1].0, SP_TASK_FAILED);
            assert!(got[1].2.contains("failing on purpose"), "{}", got[1].2);
            assert_eq!(got[2], (SP_OK, usize::MAX, "echo:".to_string()));
            assert_eq!(got[3], (SP_OK, usize::MAX, "echo:b".to_string()));

            // A gated batch, with options: times out while waiting, then finishes.
            let opts = sp_task_options {
                timeout_ms: 60_000,
                retries: 0,
                set_retries: false,
                deadline_ms: 0,
            };
            let tasks = [bytes(gate_task.as_bytes()), bytes(b"c")];
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, &opts, 0, &mut b),
                SP_OK
            );
            set = sp_result_set { id: 0 };
            assert_eq!(sp_batch_wait_timeout(b, 1, &mut set), SP_TIMEOUT);
            assert_eq!(set.id, 0);
            assert_eq!(sp_batch_wait_timeout(b, 0, &mut set), SP_TIMEOUT);
            open_gate(&gate);
            assert_eq!(sp_batch_wait_timeout(b, 60_000, &mut set), SP_OK);
            let got = read_set(set);
            assert_eq!(got[0].2, "opened");
            assert_eq!(got[1].2, "echo:c");
            assert_eq!(sp_batch_free(b), SP_INVALID_HANDLE);

            // Cancel and free.
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, null(), 0, &mut b),
                SP_OK
            );
            assert_eq!(sp_batch_cancel(b), SP_OK);
            assert_eq!(sp_batch_free(b), SP_OK);
            assert_eq!(sp_batch_free(b), SP_INVALID_HANDLE);
            assert_eq!(sp_batch_free(sp_batch { id: 0 }), SP_OK);
            assert_eq!(sp_result_set_free(sp_result_set { id: 0 }), SP_OK);

            // Bad arguments.
            let mut b2 = sp_batch { id: 0 };
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 0, null(), 0, &mut b2),
                SP_INVALID_ARGUMENT
            );
            assert_eq!(
                sp_pool_submit_batch(p, null(), 2, null(), 0, &mut b2),
                SP_NULL_ARGUMENT
            );
            let holey = [
                bytes(b"a"),
                sp_bytes {
                    data: null(),
                    len: 3,
                },
            ];
            assert_eq!(
                sp_pool_submit_batch(p, holey.as_ptr(), 2, null(), 0, &mut b2),
                SP_NULL_ARGUMENT
            );
            assert!(last_error().contains("tasks[1]"), "{}", last_error());
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, null(), 8, &mut b2),
                SP_INVALID_ARGUMENT
            );
            // Non-blocking with options: fine.
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, &opts, SP_SUBMIT_TRY, &mut b2),
                SP_OK
            );
            assert_eq!(sp_batch_free(b2), SP_OK);
            b2 = sp_batch { id: 0 };
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, null(), 0, null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(b2.id, 0);
            let forged = sp_batch {
                id: 0x0500_0001_0000_0077,
            };
            assert_eq!(sp_batch_wait(forged, &mut set), SP_INVALID_HANDLE);
            assert_eq!(
                sp_batch_wait_timeout(forged, 1, &mut set),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_batch_cancel(forged), SP_INVALID_HANDLE);
            assert_eq!(
                sp_batch_wait(sp_batch { id: 0 }, &mut set),
                SP_NULL_ARGUMENT
            );
            // A task handle is not a batch handle.
            let t = submit(p, b"t").unwrap();
            assert_eq!(sp_batch_cancel(sp_batch { id: t.id }), SP_INVALID_HANDLE);
            assert_eq!(wait(t).unwrap(), "echo:t");
            // A set: index past the end, NULL out, forged.
            let one = [bytes(b"z")];
            assert_eq!(
                sp_pool_submit_batch(p, one.as_ptr(), 1, null(), SP_SUBMIT_TRY, &mut b),
                SP_OK
            );
            assert_eq!(sp_batch_wait(b, &mut set), SP_OK);
            let mut o = std::mem::zeroed::<sp_outcome>();
            assert_eq!(sp_result_set_get(set, 1, &mut o), SP_INVALID_ARGUMENT);
            assert_eq!(sp_result_set_get(set, 0, null_mut()), SP_NULL_ARGUMENT);
            assert_eq!(sp_result_set_len(set, null_mut()), SP_NULL_ARGUMENT);
            let mut n = 0;
            assert_eq!(
                sp_result_set_len(
                    sp_result_set {
                        id: 0x0600_0001_0000_0005
                    },
                    &mut n
                ),
                SP_INVALID_HANDLE
            );
            assert_eq!(read_set(set)[0].2, "echo:z");
        }
        assert_eq!(sp_pool_free(p), SP_OK);
        // Only now: a task that saw no gate yet would wait for it until the shutdown timeout.
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn spawn_options_carry_gpus_and_environment_and_bad_ones_are_refused() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 4;
            o.max_workers = 2;
        });
        let gpus = [3u32, 1];
        let env = [c"SP_ABI_A=hello".as_ptr(), c"SP_ABI_B=x=y".as_ptr()];
        let opts = sp_spawn_options {
            gpus: gpus.as_ptr(),
            gpus_len: 2,
            visible_devices_only: false,
            env: env.as_ptr(),
            env_len: 2,
            cpus: null(),
            cpus_len: 0,
            thread_env_from_cpus: false,
        };
        let mut r = sp_result { id: 0 };
        let mut index = usize::MAX;
        // SAFETY: (whole block) valid pointers, or NULL where the API allows it.
        unsafe {
            assert_eq!(
                sp_pool_spawn_with(p, null(), 0, &opts, &mut r, &mut index),
                SP_OK,
                "{}",
                last_error()
            );
            assert_eq!(index, 0);
            assert_eq!(take(r), "seat 0 gpus [3, 1]");
            assert_eq!(execute(p, b"env:SP_ABI_A").unwrap(), "hello");
            assert_eq!(execute(p, b"env:SP_ABI_B").unwrap(), "x=y");
            // NULL options: as sp_pool_spawn.
            assert_eq!(
                sp_pool_spawn_with(p, null(), 0, null(), &mut r, null_mut()),
                SP_OK
            );
            assert_eq!(take(r), "seat 1");

            let bad = |o: sp_spawn_options, want: sp_status, msg: &str| {
                let mut r = sp_result { id: 0 };
                assert_eq!(
                    sp_pool_spawn_with(p, null(), 0, &o, &mut r, null_mut()),
                    want
                );
                assert!(last_error().contains(msg), "{msg}: {}", last_error());
                assert_eq!(r.id, 0);
            };
            bad(
                sp_spawn_options {
                    gpus: null(),
                    ..opts
                },
                SP_NULL_ARGUMENT,
                "opts.gpus",
            );
            bad(
                sp_spawn_options {
                    env: null(),
                    ..opts
                },
                SP_NULL_ARGUMENT,
                "opts.env",
            );
            let dup = [2u32, 2];
            bad(
                sp_spawn_options {
                    gpus: dup.as_ptr(),
                    ..opts
                },
                SP_INVALID_ARGUMENT,
                "GPU 2 twice",
            );
            bad(
                sp_spawn_options {
                    cpus: null(),
                    cpus_len: 1,
                    ..opts
                },
                SP_NULL_ARGUMENT,
                "opts.cpus",
            );
            let far = [0usize, 4000];
            bad(
                sp_spawn_options {
                    cpus: far.as_ptr(),
                    cpus_len: 2,
                    ..opts
                },
                SP_INVALID_ARGUMENT,
                "CPU 4000",
            );
            let non_utf8 = [0xffu8, b'=', b'x', 0];
            for (e, want, msg) in [
                (null(), SP_NULL_ARGUMENT, "opts.env[1]"),
                (c"NOEQUALS".as_ptr(), SP_INVALID_ARGUMENT, "KEY=VALUE"),
                (c"=value".as_ptr(), SP_INVALID_ARGUMENT, "KEY=VALUE"),
                (non_utf8.as_ptr().cast(), SP_INVALID_ARGUMENT, "UTF-8"),
            ] {
                let env = [c"OK=1".as_ptr(), e];
                bad(
                    sp_spawn_options {
                        env: env.as_ptr(),
                        ..opts
                    },
                    want,
                    msg,
                );
            }
            assert_eq!(
                sp_pool_spawn_with(p, null(), 0, &opts, null_mut(), null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_pool_spawn_with(sp_pool { id: 0 }, null(), 0, &opts, &mut r, null_mut()),
                SP_NULL_ARGUMENT
            );
            // No free seat: a spawn failure, nothing written.
            let mut r2 = sp_result { id: 0 };
            assert_eq!(
                sp_pool_spawn_with(p, null(), 0, null(), &mut r2, &mut index),
                SP_SPAWN_FAILED
            );
            assert_eq!((r2.id, index), (0, 0));
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// Waits (bounded) until the pool serves `n` workers.
fn wait_workers(p: sp_pool, n: usize) {
    let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
    loop {
        let mut k = 0usize;
        // SAFETY: valid out-pointer.
        assert_eq!(unsafe { sp_pool_num_workers(p, &mut k) }, SP_OK);
        if k == n {
            return;
        }
        assert!(std::time::Instant::now() < end, "{k} workers, not {n}");
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

#[test]
fn the_restart_policy_comes_from_the_pool_options() {
    watchdog(120, || {
        // Never restart: a poisoned worker's seat fails and the pool has no workers left.
        let never = new_pool(|o| {
            o.max_workers = 1;
            o.max_restarts = -1;
            o.restart_on_panic = -1;
        });
        spawn(never, b"").unwrap();
        assert_eq!(execute(never, b"poison").unwrap_err().0, SP_POISONED);
        wait_workers(never, 0);
        assert_eq!(sp_pool_free(never), SP_OK);
        // Explicit values: restarted (the first restart has no delay).
        let some = new_pool(|o| {
            o.max_workers = 1;
            o.max_restarts = 3;
            o.restart_window_ms = 10_000;
            o.restart_backoff_initial_ms = -1;
            o.restart_backoff_max_ms = 100;
            o.restart_on_panic = 1;
        });
        spawn(some, b"").unwrap();
        assert_eq!(execute(some, b"poison").unwrap_err().0, SP_POISONED);
        assert_eq!(execute(some, b"again").unwrap(), "echo:again");
        assert_eq!(sp_pool_free(some), SP_OK);
        // Never restarted, but revived: the failed seat starts again after 50 ms, twice.
        let revived = new_pool(|o| {
            o.max_workers = 1;
            o.max_restarts = -1;
            o.restart_on_panic = -1;
            o.revive_after_ms = 50;
        });
        spawn(revived, b"").unwrap();
        for lap in 0..2 {
            assert_eq!(
                execute(revived, b"poison").unwrap_err().0,
                SP_POISONED,
                "lap {lap}"
            );
            // Tasks find no worker until the revived one serves.
            let end = std::time::Instant::now() + std::time::Duration::from_secs(60);
            loop {
                match execute(revived, b"back") {
                    Ok(out) => break assert_eq!(out, "echo:back", "lap {lap}"),
                    Err((SP_NO_WORKERS, _)) => {
                        assert!(std::time::Instant::now() < end, "lap {lap}: never revived");
                        std::thread::sleep(std::time::Duration::from_millis(5));
                    }
                    Err(e) => panic!("lap {lap}: {e:?}"),
                }
            }
        }
        assert_eq!(sp_pool_free(revived), SP_OK);
    });
}

#[test]
fn broadcast_retire_and_replace_workers() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 8;
            o.max_workers = 3;
        });
        spawn(p, b"").unwrap();
        spawn(p, b"").unwrap();
        let mut set = sp_result_set { id: 0 };
        let mut r = sp_result { id: 0 };
        // SAFETY: (whole block) valid pointers, or NULL where the API allows it.
        unsafe {
            assert_eq!(sp_pool_broadcast(p, b"bc".as_ptr(), 2, &mut set), SP_OK);
            let mut got = read_set(set);
            got.sort_by_key(|g| g.1);
            assert_eq!(
                got,
                vec![
                    (SP_OK, 0, "echo:bc".to_string()),
                    (SP_OK, 1, "echo:bc".to_string())
                ]
            );
            assert_eq!(sp_pool_broadcast(p, b"fail".as_ptr(), 4, &mut set), SP_OK);
            let got = read_set(set);
            assert!(
                got.iter()
                    .all(|g| g.0 == SP_TASK_FAILED && g.2.contains("on purpose"))
            );

            assert_eq!(sp_pool_retire_worker(p, 1), SP_OK);
            assert_eq!(sp_pool_retire_worker(p, 1), SP_NO_SUCH_WORKER);
            assert_eq!(sp_pool_retire_worker(p, 99), SP_NO_SUCH_WORKER);
            assert!(last_error().contains("99"), "{}", last_error());
            wait_workers(p, 1);
            assert_eq!(sp_pool_broadcast(p, b"one".as_ptr(), 3, &mut set), SP_OK);
            assert_eq!(read_set(set), vec![(SP_OK, 0, "echo:one".to_string())]);

            assert_eq!(
                sp_pool_replace_worker(p, 0, &mut r),
                SP_OK,
                "{}",
                last_error()
            );
            let out = take(r);
            assert!(out.starts_with("seat ") && out != "seat 0", "{out}");
            wait_workers(p, 1);
            assert_eq!(execute(p, b"still").unwrap(), "echo:still");
            r = sp_result { id: 0 };
            assert_eq!(sp_pool_replace_worker(p, 0, &mut r), SP_NO_SUCH_WORKER);
            assert_eq!(sp_pool_replace_worker(p, 42, &mut r), SP_NO_SUCH_WORKER);
            assert_eq!(sp_pool_replace_worker(p, 1, null_mut()), SP_NULL_ARGUMENT);
            assert_eq!(r.id, 0);
            assert_eq!(sp_pool_broadcast(p, null(), 1, &mut set), SP_NULL_ARGUMENT);
            assert_eq!(
                sp_pool_broadcast(p, null(), 0, null_mut()),
                SP_NULL_ARGUMENT
            );
            let forged = sp_pool {
                id: 0x0100_0001_0000_0063,
            };
            assert_eq!(
                sp_pool_broadcast(forged, null(), 0, &mut set),
                SP_INVALID_HANDLE
            );
            assert_eq!(sp_pool_retire_worker(forged, 0), SP_INVALID_HANDLE);
            assert_eq!(
                sp_pool_retire_worker(sp_pool { id: 0 }, 0),
                SP_NULL_ARGUMENT
            );
            assert_eq!(sp_pool_replace_worker(forged, 0, &mut r), SP_INVALID_HANDLE);

            // Shut down: every worker verb says so.
            assert_eq!(sp_pool_shutdown(p, 0), SP_OK);
            assert_eq!(sp_pool_retire_worker(p, 0), SP_SHUTDOWN);
            assert_eq!(sp_pool_replace_worker(p, 0, &mut r), SP_SHUTDOWN);
            assert_eq!(r.id, 0);
            set = sp_result_set { id: 0 };
            assert_eq!(sp_pool_broadcast(p, null(), 0, &mut set), SP_SHUTDOWN);
            assert_eq!(set.id, 0, "no set on an error");
            // Nothing to spawn still checks the handle.
            let no_outs = null_mut();
            assert_eq!(
                sp_pool_spawn_many(forged, null(), 0, no_outs, null_mut()),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_pool_spawn_many(sp_pool { id: 0 }, null(), 0, no_outs, null_mut()),
                SP_NULL_ARGUMENT
            );
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

#[test]
fn a_completion_queue_drives_many_tasks_from_one_descriptor() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 64;
            o.max_workers = 2;
        });
        spawn(p, b"").unwrap();
        spawn(p, b"").unwrap();
        let mut cq = sp_completion_queue { id: 0 };
        let mut fd = -1;
        let gate = gate_path("cq");
        // SAFETY: (whole block) valid pointers, or NULL where the API allows it.
        unsafe {
            assert_eq!(sp_completion_queue_new(&mut cq), SP_OK);
            assert_eq!(sp_completion_queue_fd(cq, &mut fd), SP_OK);
            assert!(fd >= 0);
            assert!(!poll_readable(fd, 0), "readable while empty");
            const N: u64 = 50;
            let mut tasks = std::collections::HashMap::new();
            for i in 0..N {
                let t = submit(p, format!("{i}").as_bytes()).unwrap();
                assert_eq!(sp_task_notify(t, cq, 1000 + i), SP_OK);
                tasks.insert(1000 + i, t);
            }
            let mut seen = 0;
            while seen < N {
                assert!(poll_readable(fd, 60_000), "no completion within 60 s");
                let (mut ud, mut t) = (0u64, sp_task { id: 0 });
                loop {
                    match sp_completion_queue_next(cq, &mut ud, &mut t) {
                        SP_OK => {}
                        SP_EMPTY => break,
                        s => panic!("{s:?}: {}", last_error()),
                    }
                    assert_eq!(tasks.remove(&ud), Some(t), "user data {ud}");
                    let mut r = sp_result { id: 0 };
                    assert_eq!(sp_task_poll(t, &mut r), SP_OK, "finished when popped");
                    assert_eq!(take(r), format!("echo:{}", ud - 1000));
                    seen += 1;
                }
            }
            assert!(tasks.is_empty());
            assert!(!poll_readable(fd, 0), "readable once drained");

            // Already finished: pushed at once. A failed task completes too.
            let t = submit(p, b"fail").unwrap();
            assert_eq!(sp_task_notify(t, cq, 7), SP_OK);
            assert!(poll_readable(fd, 60_000));
            let (mut ud, mut t2) = (0u64, sp_task { id: 0 });
            assert_eq!(sp_completion_queue_next(cq, &mut ud, &mut t2), SP_OK);
            assert_eq!((ud, t2), (7, t));
            assert_eq!(sp_task_notify(t, cq, 8), SP_OK);
            assert!(poll_readable(fd, 0));
            assert_eq!(sp_completion_queue_next(cq, &mut ud, &mut t2), SP_OK);
            assert_eq!((ud, t2), (8, t));
            assert_eq!(wait(t).unwrap_err().0, SP_TASK_FAILED);

            // A freed task never completes into the queue; a freed queue drops completions.
            let slow = submit(p, format!("gate:{}", gate.display()).as_bytes()).unwrap();
            assert_eq!(sp_task_notify(slow, cq, 9), SP_OK);
            assert_eq!(sp_task_free(slow), SP_OK);
            let mut cq2 = sp_completion_queue { id: 0 };
            assert_eq!(sp_completion_queue_new(&mut cq2), SP_OK);
            let slow2 = submit(p, format!("gate:{}", gate.display()).as_bytes()).unwrap();
            assert_eq!(sp_task_notify(slow2, cq2, 10), SP_OK);
            assert_eq!(sp_completion_queue_free(cq2), SP_OK);
            open_gate(&gate);
            assert_eq!(wait(slow2).unwrap(), "opened");
            assert_eq!(execute(p, b"flush").unwrap(), "echo:flush");
            assert_eq!(sp_completion_queue_next(cq, &mut ud, &mut t2), SP_EMPTY);

            // Bad arguments.
            let forged = sp_completion_queue {
                id: 0x0700_0001_0000_0033,
            };
            let live = submit(p, b"x").unwrap();
            assert_eq!(sp_completion_queue_new(null_mut()), SP_NULL_ARGUMENT);
            assert_eq!(sp_completion_queue_fd(cq, null_mut()), SP_NULL_ARGUMENT);
            assert_eq!(sp_completion_queue_fd(forged, &mut fd), SP_INVALID_HANDLE);
            assert_eq!(sp_completion_queue_fd(cq2, &mut fd), SP_INVALID_HANDLE);
            assert_eq!(sp_task_notify(live, forged, 1), SP_INVALID_HANDLE);
            assert_eq!(
                sp_task_notify(live, sp_completion_queue { id: 0 }, 1),
                SP_NULL_ARGUMENT
            );
            assert_eq!(sp_task_notify(sp_task { id: 0 }, cq, 1), SP_NULL_ARGUMENT);
            assert_eq!(
                sp_task_notify(sp_task { id: cq.id }, cq, 1),
                SP_INVALID_HANDLE
            );
            assert_eq!(
                sp_completion_queue_next(cq, null_mut(), &mut t2),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_completion_queue_next(cq, &mut ud, null_mut()),
                SP_NULL_ARGUMENT
            );
            assert_eq!(
                sp_completion_queue_next(forged, &mut ud, &mut t2),
                SP_INVALID_HANDLE
            );
            assert_eq!(wait(live).unwrap(), "echo:x");
            assert_eq!(sp_completion_queue_free(forged), SP_INVALID_HANDLE);
            assert_eq!(
                sp_completion_queue_free(sp_completion_queue { id: 0 }),
                SP_OK
            );
            assert_eq!(sp_completion_queue_free(cq), SP_OK);
            assert_eq!(sp_completion_queue_free(cq), SP_INVALID_HANDLE);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
        // Only now: the freed gate task may still be waiting for the gate (see above).
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn a_worker_writes_its_output_in_place_with_sp_reply_alloc() {
    watchdog(120, || {
        let p = new_pool(|o| {
            o.queue_size = 4;
            o.max_workers = 1;
        });
        spawn(p, b"").unwrap();
        for n in [0usize, 1, 100, 100, 70_000, 10] {
            let mut r = sp_result { id: 0 };
            let task = format!("alloc:{n}");
            assert_eq!(
                // SAFETY: valid pointers.
                unsafe { sp_pool_execute(p, task.as_ptr(), task.len(), &mut r) },
                SP_OK,
                "{}",
                last_error()
            );
            let (mut d, mut len) = (null(), 0usize);
            // SAFETY: valid out-pointers; the bytes are read before the free.
            unsafe {
                assert_eq!(sp_result_bytes(r, &mut d, &mut len), SP_OK);
                let b = std::slice::from_raw_parts(d, len);
                assert_eq!(len, n + 8);
                assert_eq!(&b[..4], b"head");
                assert_eq!(&b[n + 4..], b"tail");
                assert!(
                    b[4..n + 4]
                        .iter()
                        .enumerate()
                        .all(|(i, &x)| x == (i % 251) as u8)
                );
            }
            assert_eq!(sp_result_free(r), SP_OK);
        }
        assert_eq!(
            execute(p, b"alloc-bad").unwrap(),
            "SP_NULL_ARGUMENT SP_NULL_ARGUMENT SP_TOO_LARGE SP_OK true"
        );
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}
