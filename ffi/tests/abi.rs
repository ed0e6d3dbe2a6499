//! The C ABI called as a C host would, through the exported functions: every function with bad
//! arguments (NULL, zero handles, forged, stale and freed handles, handles of the wrong kind,
//! zero-length and oversized buffers), double frees, worker-side errors, and many threads at once.
//! This test binary is also the worker program: its callbacks are registered before `main`.

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
    if args == b"refuse" {
        // SAFETY: a valid reply and a NUL-terminated message.
        unsafe { sp_reply_set_error(reply, c"refused to start".as_ptr()) };
        return SP_WORKER_ERROR;
    }
    // SAFETY: valid pointers from the library.
    unsafe {
        *state = Box::into_raw(Box::new(0u64)).cast();
        let msg = format!("seat {}", (*info).index);
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

unsafe extern "C-unwind" fn t_drop(state: *mut c_void) {
    // SAFETY: the Box our spawn made, dropped once.
    drop(unsafe { Box::from_raw(state as *mut u64) });
}

fn callbacks() -> sp_worker_callbacks {
    sp_worker_callbacks {
        user_data: null_mut(),
        spawn: Some(t_spawn),
        execute: Some(t_execute),
        drop: Some(t_drop),
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

/// Runs `f` on a thread and fails the test if it does not finish within `secs` (a hang becomes
/// a failure instead of stalling CI).
fn watchdog(secs: u64, f: impl FnOnce() + Send + 'static) {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        f();
        let _ = tx.send(());
    });
    match rx.recv_timeout(std::time::Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
            if let Err(p) = t.join() {
                std::panic::resume_unwind(p)
            }
        }
        Err(_) => panic!("watchdog: test did not finish within {secs} s"),
    }
}

use sp_status::*;

fn last_error() -> String {
    // SAFETY: sp_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(sp_last_error()) }
        .to_string_lossy()
        .into_owned()
}

fn new_pool(f: impl FnOnce(&mut sp_pool_options)) -> sp_pool {
    let mut o = std::mem::MaybeUninit::<sp_pool_options>::uninit();
    // SAFETY: writable storage; initialised by the call.
    let mut o = unsafe {
        assert_eq!(sp_pool_options_init(o.as_mut_ptr()), SP_OK);
        o.assume_init()
    };
    f(&mut o);
    let mut p = sp_pool { id: 0 };
    assert_eq!(
        // SAFETY: valid pointers.
        unsafe { sp_pool_new(&o, &mut p) },
        SP_OK,
        "{}",
        last_error()
    );
    p
}

fn spawn(p: sp_pool, args: &[u8]) -> Result<String, (sp_status, String)> {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid pointers.
    let s = unsafe { sp_pool_spawn(p, args.as_ptr(), args.len(), &mut r, null_mut()) };
    if s != SP_OK {
        return Err((s, last_error()));
    }
    Ok(take(r))
}

/// Reads a result's bytes as text and frees it.
fn take(r: sp_result) -> String {
    let (mut d, mut n) = (null(), 0usize);
    // SAFETY: valid out-pointers.
    assert_eq!(unsafe { sp_result_bytes(r, &mut d, &mut n) }, SP_OK);
    let s = if n == 0 {
        String::new()
    } else {
        // SAFETY: the library returned `n` bytes at `d`, valid until the free below.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(d, n) }).into_owned()
    };
    assert_eq!(sp_result_free(r), SP_OK);
    s
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
            assert_eq!(
                sp_pool_spawn(p, big.as_ptr(), 1000, &mut r, null_mut()),
                SP_TOO_LARGE
            );
            assert_eq!(sp_pool_loan(p, 10_000, &mut l), SP_TOO_LARGE);
            // Zero-length loan.
            assert_eq!(sp_pool_loan(p, 0, &mut l), SP_INVALID_ARGUMENT);
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

            // Shutdown cancels what no worker ran; submits after it are refused.
            assert_eq!(sp_pool_shutdown(p, 1), SP_OK);
            assert_eq!(wait(t1).unwrap_err().0, SP_CANCELLED);
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
        // SAFETY: valid structs.
        unsafe {
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
