//! Black-box tests of the C ABI's cancel (and, last, `sp_task_options::deadline_ms`): a task
//! (or batch) cancelled before any worker claimed it finishes with `SP_CANCELLED` at once, however it is collected (`sp_task_wait`,
//! `sp_task_wait_timeout` with 0 or a long timeout, `sp_task_poll`, a completion queue), never
//! runs, and its slot and loan come back. The only worker is held on a gate file meanwhile, so
//! "at once" is an ordering (answered while the gate is shut), not a timing.
//! This test binary is also the worker program: its callbacks are registered before `main`.

mod common;
use common::*;
use stateful_pool_ffi::*;
use std::ffi::c_void;
use std::path::{Path, PathBuf};
use std::ptr::{null, null_mut};
use std::time::{Duration, Instant};

// ---- the worker ----

unsafe extern "C-unwind" fn w_spawn(
    _: *mut c_void,
    _info: *const sp_worker_info,
    _args: *const u8,
    _len: usize,
    state: *mut *mut c_void,
    reply: *mut sp_reply,
) -> i32 {
    // SAFETY: valid pointers from the library.
    unsafe {
        *state = null_mut();
        sp_reply_write(reply, b"up".as_ptr(), 2);
    }
    SP_WORKER_OK
}

fn wait_file(path: &str) {
    let start = Instant::now();
    while !Path::new(path).exists() && start.elapsed() < Duration::from_secs(60) {
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// "gate:P": creates "P.started", waits for P, answers "opened". "touch:P": creates P (it ran),
/// answers "ran". Anything else: "echo:" + the bytes.
unsafe extern "C-unwind" fn w_execute(
    _state: *mut c_void,
    task: *const sp_task_info,
    reply: *mut sp_reply,
) -> i32 {
    // SAFETY: valid pointers from the library.
    unsafe {
        let t = &*task;
        let data = if t.len == 0 {
            &[][..]
        } else {
            std::slice::from_raw_parts(t.data, t.len)
        };
        if let Some(p) = data.strip_prefix(b"gate:") {
            let p = std::str::from_utf8(p).unwrap_or("");
            let _ = std::fs::write(format!("{p}.started"), b"");
            wait_file(p);
            sp_reply_write(reply, b"opened".as_ptr(), 6);
        } else if let Some(p) = data.strip_prefix(b"touch:") {
            let p = std::str::from_utf8(p).unwrap_or("");
            let _ = std::fs::write(p, b"");
            sp_reply_write(reply, b"ran".as_ptr(), 3);
        } else {
            let mut v = b"echo:".to_vec();
            v.extend_from_slice(data);
            sp_reply_write(reply, v.as_ptr(), v.len());
        }
        SP_WORKER_OK
    }
}

fn callbacks() -> sp_worker_callbacks {
    sp_worker_callbacks {
        user_data: null_mut(),
        spawn: Some(w_spawn),
        execute: Some(w_execute),
        drop: None,
        execute_batch: None,
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

/// A pool with the options `f` sets and one worker.
fn pool_with_worker(f: impl FnOnce(&mut sp_pool_options)) -> sp_pool {
    let p = new_pool(f);
    let mut r = sp_result { id: 0 };
    // SAFETY: valid pointers.
    let s = unsafe { sp_pool_spawn(p, b"w".as_ptr(), 1, &mut r, null_mut()) };
    assert_eq!(s, SP_OK, "{}", last_error());
    assert_eq!(sp_result_free(r), SP_OK);
    p
}

fn submit(p: sp_pool, task: &[u8]) -> sp_task {
    let mut t = sp_task { id: 0 };
    // SAFETY: valid pointers.
    let s = unsafe { sp_pool_submit(p, task.as_ptr(), task.len(), &mut t) };
    assert_eq!(s, SP_OK, "{}", last_error());
    t
}

fn wait(t: sp_task) -> Result<String, sp_status> {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid out-pointer.
    match unsafe { sp_task_wait(t, &mut r) } {
        SP_OK => Ok(take(r)),
        s => Err(s),
    }
}

fn execute(p: sp_pool, task: &[u8]) -> String {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid pointers.
    let s = unsafe { sp_pool_execute(p, task.as_ptr(), task.len(), &mut r) };
    assert_eq!(s, SP_OK, "{}", last_error());
    take(r)
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!(
        "sp-bb-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ))
}

/// A gate task's file, held until `open`.
struct Gate(PathBuf);

impl Gate {
    fn new(name: &str) -> Self {
        Gate(tmp(name))
    }
    fn task(&self) -> Vec<u8> {
        format!("gate:{}", self.0.display()).into_bytes()
    }
    fn started(&self) -> bool {
        Path::new(&format!("{}.started", self.0.display())).exists()
    }
    fn open(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
        let _ = std::fs::remove_file(format!("{}.started", self.0.display()));
    }
}

/// Holds the pool's only worker on a fresh gate (returns once it runs).
fn hold(p: sp_pool, name: &str) -> (Gate, sp_task) {
    let g = Gate::new(name);
    let t = submit(p, &g.task());
    assert!(
        wait_until(60, || g.started()),
        "the gate task never started"
    );
    (g, t)
}

fn pending(t: sp_task) -> bool {
    let mut r = sp_result { id: 0 };
    // SAFETY: valid out-pointer.
    unsafe { sp_task_wait_timeout(t, 0, &mut r) == SP_TIMEOUT }
}

// ---- tests ----

/// Laps on one seat with an 8-slot queue: five cancelled tasks each lap, collected every way
/// (wait, wait_timeout 0 and 60 s, poll, free), all answered `SP_CANCELLED` while the worker
/// is held; none runs; the slots come back lap after lap.
#[test]
fn bb_abi_cancel_answers_at_once_however_collected() {
    watchdog(240, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let mut markers = Vec::new();
        for lap in 0..20 {
            let (gate, blocker) = hold(p, &format!("laps-{lap}"));
            let mut ts = Vec::new();
            for k in 0..5 {
                let m = tmp(&format!("ran-{lap}-{k}"));
                ts.push(submit(p, format!("touch:{}", m.display()).as_bytes()));
                markers.push(m);
            }
            for &t in &ts {
                assert_eq!(sp_task_cancel(t), SP_OK);
            }
            let mut r = sp_result { id: 0 };
            // SAFETY: (whole block) valid out-pointers.
            unsafe {
                assert_eq!(sp_task_wait(ts[0], &mut r), SP_CANCELLED, "lap {lap}: wait");
                assert!(!last_error().is_empty(), "a message for SP_CANCELLED");
                assert_eq!(
                    sp_task_wait_timeout(ts[1], 0, &mut r),
                    SP_CANCELLED,
                    "lap {lap}: wait_timeout 0"
                );
                assert_eq!(
                    sp_task_wait_timeout(ts[2], 60_000, &mut r),
                    SP_CANCELLED,
                    "lap {lap}: wait_timeout 60 s"
                );
                assert_eq!(sp_task_poll(ts[3], &mut r), SP_CANCELLED, "lap {lap}: poll");
                // Consumed handles are dead.
                assert_eq!(sp_task_poll(ts[3], &mut r), SP_INVALID_HANDLE);
            }
            assert_eq!(sp_task_free(ts[4]), SP_OK);
            assert_eq!(r.id, 0, "no result written");
            assert!(
                pending(blocker),
                "lap {lap}: answered while the worker was held"
            );
            gate.open();
            assert_eq!(wait(blocker).unwrap(), "opened");
        }
        assert_eq!(execute(p, b"flush"), "echo:flush");
        for m in &markers {
            assert!(!m.exists(), "a cancelled task ran: {}", m.display());
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// A completion queue registration on a task that is then cancelled: the pair is pushed at
/// once (the descriptor becomes readable while the worker is held), and `sp_task_poll` answers
/// `SP_CANCELLED`.
#[test]
fn bb_abi_cancel_pushes_a_registered_completion_at_once() {
    watchdog(120, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let (gate, blocker) = hold(p, "cq");
        let mut cq = sp_completion_queue { id: 0 };
        let mut fd = -1;
        let (mut ud, mut t2) = (0u64, sp_task { id: 0 });
        let m = tmp("cq-ran");
        // SAFETY: (whole block) valid pointers.
        unsafe {
            assert_eq!(sp_completion_queue_new(&mut cq), SP_OK);
            assert_eq!(sp_completion_queue_fd(cq, &mut fd), SP_OK);
            let t = submit(p, format!("touch:{}", m.display()).as_bytes());
            assert_eq!(sp_task_notify(t, cq, 5), SP_OK);
            assert!(!poll_readable(fd, 0));
            assert_eq!(sp_task_cancel(t), SP_OK);
            assert!(poll_readable(fd, 30_000), "the cancel pushed no completion");
            assert_eq!(sp_completion_queue_next(cq, &mut ud, &mut t2), SP_OK);
            assert_eq!((ud, t2), (5, t));
            let mut r = sp_result { id: 0 };
            assert_eq!(sp_task_poll(t, &mut r), SP_CANCELLED);
            assert!(pending(blocker), "answered while the worker was held");
            gate.open();
            assert_eq!(wait(blocker).unwrap(), "opened");
            assert_eq!(execute(p, b"flush"), "echo:flush");
            assert_eq!(execute(p, b"flush"), "echo:flush");
            assert_eq!(
                sp_completion_queue_next(cq, &mut ud, &mut t2),
                SP_EMPTY,
                "a second completion of a collected task"
            );
            assert_eq!(sp_completion_queue_free(cq), SP_OK);
        }
        assert!(!m.exists(), "the cancelled task ran");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// A cancelled task registered on a completion queue and left there, uncollected, while the
/// worker pops and skips it: exactly one completion is pushed for it.
#[test]
fn bb_abi_a_cancelled_task_completes_into_the_queue_once() {
    watchdog(120, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let (gate, blocker) = hold(p, "cq-once");
        let mut cq = sp_completion_queue { id: 0 };
        let (mut ud, mut t2) = (0u64, sp_task { id: 0 });
        // SAFETY: (whole block) valid pointers.
        unsafe {
            assert_eq!(sp_completion_queue_new(&mut cq), SP_OK);
            let t = submit(p, b"x");
            assert_eq!(sp_task_notify(t, cq, 9), SP_OK);
            assert_eq!(sp_task_cancel(t), SP_OK);
            gate.open();
            assert_eq!(wait(blocker).unwrap(), "opened");
            // FIFO, one worker: it has popped and skipped `t` before these run.
            assert_eq!(execute(p, b"flush"), "echo:flush");
            assert_eq!(execute(p, b"flush"), "echo:flush");
            let mut pushed = 0;
            loop {
                match sp_completion_queue_next(cq, &mut ud, &mut t2) {
                    SP_OK => {
                        assert_eq!((ud, t2), (9, t));
                        pushed += 1;
                    }
                    SP_EMPTY => break,
                    s => panic!("{s:?}"),
                }
                assert!(pushed < 10);
            }
            let mut r = sp_result { id: 0 };
            assert_eq!(sp_task_poll(t, &mut r), SP_CANCELLED);
            assert_eq!(pushed, 1, "completions pushed for one cancelled task");
            assert_eq!(sp_completion_queue_free(cq), SP_OK);
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// Cancel on one thread, wait on another: a thread blocked in a bounded wait is answered
/// `SP_CANCELLED` when another thread's cancel gets through (or the cancel says `SP_BUSY`,
/// the documented answer for a handle in use); a handle cancelled on one thread and handed to
/// another is answered at once there.
#[test]
fn bb_abi_cancel_on_one_thread_wait_on_another() {
    watchdog(120, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let (gate, blocker) = hold(p, "xthread");
        // Handed over after the cancel.
        let t = submit(p, b"a");
        assert_eq!(sp_task_cancel(t), SP_OK);
        let got = std::thread::spawn(move || {
            let mut r = sp_result { id: 0 };
            // SAFETY: valid out-pointer.
            unsafe { sp_task_wait_timeout(t, 30_000, &mut r) }
        })
        .join()
        .unwrap();
        assert_eq!(got, SP_CANCELLED);
        // Cancelled while another thread waits on it.
        let t = submit(p, b"b");
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let _ = tx.send(());
            let mut r = sp_result { id: 0 };
            // SAFETY: valid out-pointer.
            let s = unsafe { sp_task_wait_timeout(t, 5_000, &mut r) };
            (s, Instant::now())
        });
        rx.recv().unwrap();
        let mut statuses = Vec::new();
        let end = Instant::now() + Duration::from_secs(10);
        loop {
            let s = sp_task_cancel(t);
            statuses.push(s);
            if s == SP_OK || Instant::now() > end || waiter.is_finished() {
                break;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        let cancelled_at = Instant::now();
        let (s, at) = waiter.join().unwrap();
        let last = *statuses.last().unwrap();
        eprintln!(
            "cancel during another thread's wait: {} tries, last {last:?}; waiter {s:?} {:?} after",
            statuses.len(),
            at.saturating_duration_since(cancelled_at)
        );
        for s in &statuses {
            assert!(matches!(s, SP_OK | SP_BUSY), "cancel during a wait: {s:?}");
        }
        if s == SP_TIMEOUT {
            // Every cancel during the wait was refused SP_BUSY (the handle was in use): the
            // cancel can only land once the wait is over.
            assert!(statuses[..statuses.len() - 1].iter().all(|&x| x == SP_BUSY));
            if last != SP_OK {
                assert_eq!(sp_task_cancel(t), SP_OK);
            }
            assert_eq!(wait(t).unwrap_err(), SP_CANCELLED);
        } else {
            assert_eq!(last, SP_OK);
            assert_eq!(s, SP_CANCELLED, "the waiter saw the cancel");
        }
        assert!(pending(blocker), "answered while the worker was held");
        gate.open();
        assert_eq!(wait(blocker).unwrap(), "opened");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// A batch cancelled before any worker claimed it: `SP_CANCELLED` from a zero-timeout look and
/// from `sp_batch_wait`, while the worker is held; none of its tasks runs.
#[test]
fn bb_abi_batch_cancel_answers_at_once() {
    watchdog(120, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let (gate, blocker) = hold(p, "batch");
        let m1 = tmp("batch-ran-1");
        let m2 = tmp("batch-ran-2");
        let t1 = format!("touch:{}", m1.display()).into_bytes();
        let t2 = format!("touch:{}", m2.display()).into_bytes();
        let tasks = [
            sp_bytes {
                data: t1.as_ptr(),
                len: t1.len(),
            },
            sp_bytes {
                data: t2.as_ptr(),
                len: t2.len(),
            },
        ];
        // SAFETY: (whole block) valid pointers.
        unsafe {
            let mut b = sp_batch { id: 0 };
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, null(), 0, &mut b),
                SP_OK
            );
            assert_eq!(sp_batch_cancel(b), SP_OK);
            let mut set = sp_result_set { id: 0 };
            assert_eq!(
                sp_batch_wait_timeout(b, 0, &mut set),
                SP_CANCELLED,
                "a zero look"
            );
            let mut b2 = sp_batch { id: 0 };
            assert_eq!(
                sp_pool_submit_batch(p, tasks.as_ptr(), 2, null(), 0, &mut b2),
                SP_OK
            );
            assert_eq!(sp_batch_cancel(b2), SP_OK);
            assert_eq!(sp_batch_wait(b2, &mut set), SP_CANCELLED);
            assert_eq!(set.id, 0);
        }
        assert!(pending(blocker), "answered while the worker was held");
        gate.open();
        assert_eq!(wait(blocker).unwrap(), "opened");
        assert_eq!(execute(p, b"flush"), "echo:flush");
        assert!(!m1.exists() && !m2.exists(), "a cancelled batch ran");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// A cancel on a task a worker is running: it runs on, and its caller gets its result.
#[test]
fn bb_abi_cancel_of_a_running_task_gets_its_result() {
    watchdog(120, || {
        let p = pool_with_worker(|o| o.queue_size = 4);
        let (gate, t) = hold(p, "running");
        assert_eq!(sp_task_cancel(t), SP_OK);
        assert!(pending(t), "a running task is not settled by a cancel");
        gate.open();
        assert_eq!(wait(t).unwrap(), "opened");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// Loans sent with cancelled tasks come back: an arena that holds one such loan at a time
/// serves many laps.
#[test]
fn bb_abi_loans_of_cancelled_tasks_come_back() {
    watchdog(240, || {
        const LOAN: usize = 600 << 10;
        let p = pool_with_worker(|o| {
            o.queue_size = 4;
            o.task_arena_bytes = 1 << 20;
        });
        for lap in 0..16 {
            let (gate, blocker) = hold(p, &format!("loan-{lap}"));
            let mut l = sp_loan { id: 0 };
            assert!(
                // SAFETY: valid out-pointer.
                wait_until(30, || unsafe { sp_pool_try_loan(p, LOAN, &mut l) } == SP_OK),
                "lap {lap}: the arena's space never came back"
            );
            let mut l2 = sp_loan { id: 0 };
            // SAFETY: valid pointers.
            unsafe {
                assert_eq!(sp_pool_try_loan(p, LOAN, &mut l2), SP_QUEUE_FULL);
                let mut t = sp_task { id: 0 };
                assert_eq!(sp_pool_submit_loan(p, b"x".as_ptr(), 1, l, &mut t), SP_OK);
                assert_eq!(sp_task_cancel(t), SP_OK);
                let mut r = sp_result { id: 0 };
                if lap % 2 == 0 {
                    assert_eq!(sp_task_wait_timeout(t, 0, &mut r), SP_CANCELLED);
                } else {
                    assert_eq!(sp_task_free(t), SP_OK);
                }
            }
            assert!(pending(blocker));
            gate.open();
            assert_eq!(wait(blocker).unwrap(), "opened");
        }
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}

/// `deadline_ms`: tasks and a batch that no worker has claimed by their deadline are answered
/// `SP_TASK_TIMED_OUT` at the deadline, however collected, while the only worker is held; none
/// runs; a task a worker claims in time runs.
#[test]
fn abi_a_deadline_no_worker_meets_is_answered_at_the_deadline() {
    watchdog(240, || {
        let p = pool_with_worker(|o| o.queue_size = 8);
        let opts = sp_task_options {
            deadline_ms: 30,
            ..Default::default()
        };
        let submit_by = |task: &[u8]| {
            let mut t = sp_task { id: 0 };
            // SAFETY: valid pointers.
            let s = unsafe { sp_pool_submit_with(p, task.as_ptr(), task.len(), &opts, 0, &mut t) };
            assert_eq!(s, SP_OK, "{}", last_error());
            t
        };
        let mut markers = Vec::new();
        for lap in 0..3 {
            let (gate, blocker) = hold(p, &format!("deadline-{lap}"));
            let ts: Vec<sp_task> = (0..3)
                .map(|k| {
                    let m = tmp(&format!("late-{lap}-{k}"));
                    let t = submit_by(format!("touch:{}", m.display()).as_bytes());
                    markers.push(m);
                    t
                })
                .collect();
            let mut r = sp_result { id: 0 };
            // SAFETY: (whole block) valid pointers.
            unsafe {
                assert_eq!(
                    sp_task_wait(ts[0], &mut r),
                    SP_TASK_TIMED_OUT,
                    "lap {lap}: wait"
                );
                assert_eq!(
                    sp_task_wait_timeout(ts[1], 60_000, &mut r),
                    SP_TASK_TIMED_OUT,
                    "lap {lap}: wait_timeout"
                );
                let mut polled = SP_PENDING;
                assert!(wait_until(60, || {
                    polled = sp_task_poll(ts[2], &mut r);
                    polled != SP_PENDING
                }));
                assert_eq!(polled, SP_TASK_TIMED_OUT, "lap {lap}: poll");
                let m = tmp(&format!("late-batch-{lap}"));
                let touch = format!("touch:{}", m.display());
                let tasks = [sp_bytes {
                    data: touch.as_ptr(),
                    len: touch.len(),
                }];
                markers.push(m);
                let mut b = sp_batch { id: 0 };
                assert_eq!(
                    sp_pool_submit_batch(p, tasks.as_ptr(), 1, &opts, 0, &mut b),
                    SP_OK
                );
                let mut set = sp_result_set { id: 0 };
                assert_eq!(
                    sp_batch_wait(b, &mut set),
                    SP_TASK_TIMED_OUT,
                    "lap {lap}: batch"
                );
            }
            assert!(
                pending(blocker),
                "lap {lap}: answered while the worker was held"
            );
            gate.open();
            assert_eq!(wait(blocker).unwrap(), "opened");
        }
        assert_eq!(execute(p, b"flush"), "echo:flush");
        for m in &markers {
            assert!(!m.exists(), "an expired task ran: {}", m.display());
        }
        // A far deadline: the idle worker claims the task in time, and it runs.
        let far = sp_task_options {
            deadline_ms: 60_000,
            ..Default::default()
        };
        let mut t = sp_task { id: 0 };
        // SAFETY: valid pointers.
        let s = unsafe { sp_pool_submit_with(p, b"x".as_ptr(), 1, &far, 0, &mut t) };
        assert_eq!(s, SP_OK);
        assert_eq!(wait(t).unwrap(), "echo:x");
        assert_eq!(sp_pool_free(p), SP_OK);
    });
}
