//! Answers that need no worker: a task past its deadline (`TaskOptions::deadline`) or
//! cancelled (`TaskHandle::cancel`) before any worker claimed it is answered to its caller
//! there and then (`Timeout` at the deadline, `Cancelled` at once), whichever way it waits
//! (`execute`, `wait`, `wait_timeout`, `try_wait`, `wait_ref`, `.await`); the task then never
//! runs, its slot is reclaimed once a worker pops it, and the seat serves on. A task a worker
//! claimed in time runs to completion, and its caller gets its result.
//!
//! The worker is held on a gate file meanwhile, so "answered without a worker" is an
//! ordering, not a timing: every such answer arrives while the gate is still shut, which the
//! old behaviour (answered when a worker reaches the task) could never do.

mod common;
use common::*;
use stateful_pool::{NO_WORKER, Pool, TaskError, TaskHandle, WaitTimeoutError};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

/// Ticks of the expired tasks: ids `ROUND * 10 + k`.
const ROUNDS: u32 = 3;

fn expired(r: Result<impl std::fmt::Debug, TaskError>, what: &str) {
    match r {
        Err(TaskError::Timeout { worker, after }) => {
            assert_eq!(worker, NO_WORKER, "{what}: answered by the caller's wait");
            // From its submit to its deadline: at most the budget given (1 s at most in this
            // file; less where the submit waited for room, 0 if that used it all up).
            assert!(
                after <= Duration::from_secs(1),
                "{what}: the budget reported is {after:?}"
            );
        }
        other => panic!("{what}: expected Timeout at the deadline, got {other:?}"),
    }
}

/// One worker that counts its ticks, a queue of `slots`, and a runtime for the async waits.
fn one_worker(name: &str, slots: usize) -> (Counters, Pool<TestWorker>, tokio::runtime::Runtime) {
    let counters = Counters::new(name, 64);
    let pool = Pool::<TestWorker>::builder()
        .queue_size(slots)
        .build()
        .unwrap();
    pool.spawn(&counters.spawn_args("w")).unwrap();
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap();
    (counters, pool, rt)
}

/// Holds the only worker on a gate task: its handle, and the gate file that releases it.
fn hold(pool: &Pool<TestWorker>, name: &str) -> (TaskHandle<Out>, std::path::PathBuf) {
    let gate = gate_path(name);
    let blocker = pool
        .submit(&Cmd::Gate(gate.to_string_lossy().into_owned()))
        .unwrap();
    (blocker, gate)
}

#[test]
fn waiting_callers_are_answered_at_the_deadline_and_expired_tasks_never_run() {
    watchdog(240, || {
        // Fewer slots than the expired tasks of all rounds: their slots must come back.
        let (counters, pool, rt) = one_worker("deadline", 8);
        for round in 0..ROUNDS {
            let (blocker, gate) = hold(&pool, &format!("deadline-gate-{round}"));
            let id = |k: u32| round * 10 + k;
            let soon = || Instant::now() + Duration::from_millis(30);
            let cmds: Vec<Cmd> = (0..10).map(|k| Cmd::Tick(id(k))).collect();
            let task = |k: u32| pool.task(&cmds[k as usize]).deadline(soon());

            // execute: blocks until the deadline, then Timeout.
            expired(task(0).execute(), "execute");
            // wait, wait_ref, and a wait_timeout longer than the deadline.
            expired(task(1).submit().unwrap().wait(), "wait");
            expired(task(2).submit().unwrap().wait_ref(), "wait_ref");
            match task(3)
                .submit()
                .unwrap()
                .wait_timeout(Duration::from_secs(120))
            {
                Err(WaitTimeoutError::Task(e)) => expired(Err::<(), _>(e), "wait_timeout"),
                other => panic!("wait_timeout: {other:?}"),
            }
            // try_wait: pending before the deadline, Timeout once `is_finished` says so.
            let mut h = task(4).submit().unwrap();
            assert!(
                wait_until(60, || h.is_finished()),
                "is_finished at the deadline"
            );
            h = match h.try_wait() {
                Err(WaitTimeoutError::Task(e)) => {
                    expired(Err::<(), _>(e), "try_wait");
                    task(5).submit().unwrap()
                }
                other => panic!("try_wait after the deadline: {other:?}"),
            };
            // .await: the reactor wakes the future for the deadline; two at once, with
            // different deadlines.
            let later = pool
                .task(&cmds[6])
                .deadline(Instant::now() + Duration::from_millis(60))
                .submit()
                .unwrap();
            let (a, b) = rt.block_on(async { tokio::join!(h, later) });
            expired(a, "await");
            expired(b, "await, later deadline");

            // Still no worker has looked at any of them: the gate is shut until now.
            assert!(!blocker.is_finished());
            std::fs::write(&gate, b"").unwrap();
            assert_eq!(blocker.wait().unwrap().value, 1);
            // FIFO: this runs after the worker popped (and skipped) every expired task.
            assert_eq!(
                pool.execute(&Cmd::Tick(id(9))).unwrap().value,
                id(9) as u64 * 3
            );
            for k in 0..7 {
                assert_eq!(
                    counters.get(id(k) as usize),
                    0,
                    "round {round}: task {k} never ran"
                );
            }
            assert_eq!(counters.get(id(9) as usize), 1);
            let _ = std::fs::remove_file(&gate);
        }
        // Every slot came back: a full queue's worth of tasks runs at once.
        let hs: Vec<_> = (0..8)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
        assert_eq!(pool.stats().tasks_timed_out, 0, "no worker was killed");
    });
}

/// Tasks settled without a worker (past their deadline, cancelled, their handles dropped)
/// give their queue places back while the only worker stays busy: the supervisor takes them
/// off the head of the queue. A full queue of them, then a full queue of new tasks, all while
/// the gate is shut; none of the settled ones ever runs.
#[test]
fn settled_tasks_give_their_places_back_while_every_worker_is_busy() {
    watchdog(240, || {
        let (counters, pool, _rt) = one_worker("settled-places", 4);
        let (blocker, gate) = hold(&pool, "settled-places-gate");
        // The blocker holds one place: 3 left. Three kinds of settling, a lap each.
        let soon = || Instant::now() + Duration::from_millis(30);
        for lap in 0..3u32 {
            let hs: Vec<_> = (0..3)
                .map(|k| {
                    let t = Cmd::Tick(lap * 10 + k);
                    let req = pool.task(&t);
                    match lap {
                        0 => req.deadline(soon()).submit().unwrap(),
                        _ => req.submit().unwrap(),
                    }
                })
                .collect();
            assert!(matches!(
                pool.try_submit(&Cmd::Echo(0)).map(drop),
                Err(stateful_pool::SubmitError::QueueFull)
            ));
            match lap {
                // Past their deadline: collected as `Timeout`.
                0 => {
                    for h in hs {
                        expired(h.wait(), "queued past its deadline");
                    }
                }
                // Cancelled, then collected as `Cancelled`.
                1 => {
                    for h in hs {
                        h.cancel();
                        assert!(matches!(h.wait(), Err(TaskError::Cancelled)));
                    }
                }
                // Dropped uncollected.
                _ => drop(hs),
            }
            // Their places come back without the worker: new tasks fit (the supervisor takes
            // them off the queue's head, and the reactor retires their slots).
            let fits: Vec<_> = (0..3)
                .map(|k| {
                    let mut h = None;
                    assert!(
                        wait_until(60, || {
                            h = pool.try_submit(&Cmd::Echo(k)).ok();
                            h.is_some()
                        }),
                        "lap {lap}: place {k} came back"
                    );
                    h.unwrap()
                })
                .collect();
            // …and those are cancelled in turn, to leave the places for the next lap.
            drop(fits);
            assert!(!blocker.is_finished(), "the worker is still held");
        }
        // Large tasks (archives in the task arena) and a batch: their arena space comes back
        // too. Two 20 MiB tasks hold 40 of the arena's 64 MiB; three fit only once both left.
        let big = Cmd::SumVec(vec![1; 20 << 20]);
        let large: Vec<_> = (0..2)
            .map(|_| pool.task(&big).deadline(soon()).submit().unwrap())
            .collect();
        let batch = pool
            .batch(&[Cmd::Tick(40), Cmd::Tick(41)])
            .deadline(soon())
            .submit()
            .unwrap();
        for h in large {
            expired(h.wait(), "a large task past its deadline");
        }
        match batch.wait() {
            Err(TaskError::Timeout { .. }) => {}
            other => panic!("a batch past its deadline: {other:?}"),
        }
        let fits: Vec<_> = (0..3)
            .map(|k| {
                let mut h = None;
                assert!(
                    wait_until(60, || {
                        h = pool.try_submit(&big).ok();
                        h.is_some()
                    }),
                    "large task {k}: its place and arena space came back"
                );
                h.unwrap()
            })
            .collect();
        drop(fits);
        assert!(!blocker.is_finished(), "the worker is still held");
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(blocker.wait().unwrap().value, 1);
        for id in (0..30).chain([40, 41]) {
            assert_eq!(counters.get(id), 0, "settled task {id} never ran");
        }
        // The seat serves on, with every place.
        let hs: Vec<_> = (0..4)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
        let _ = std::fs::remove_file(&gate);
    });
}

/// A task whose worker claimed it before its deadline: the deadline passes while it runs,
/// and the caller, woken at the deadline, finds it claimed and waits on for its result.
#[test]
fn a_task_claimed_before_its_deadline_runs_and_its_caller_gets_the_result() {
    watchdog(240, || {
        let (counters, pool, rt) = one_worker("claimed", 64);
        for (lap, asynchronous) in [(0, false), (1, true), (2, false), (3, true)] {
            let started = gate_path(&format!("claimed-started-{lap}"));
            let gate = gate_path(&format!("claimed-gate-{lap}"));
            let deadline = Instant::now() + Duration::from_secs(2);
            let h = pool
                .task(&Cmd::Step {
                    id: lap,
                    started: started.to_string_lossy().into_owned(),
                    gate: gate.to_string_lossy().into_owned(),
                    fail: false,
                })
                .deadline(deadline)
                .submit()
                .unwrap();
            // Opens the gate once the task has started and its deadline has passed (the
            // event under test: waiting for the deadline itself).
            let opener = {
                let (started, gate) = (started.clone(), gate.clone());
                std::thread::spawn(move || {
                    let ran = wait_until(60, || started.exists());
                    while Instant::now() <= deadline + Duration::from_millis(20) {
                        std::thread::sleep(Duration::from_millis(5));
                    }
                    std::fs::write(&gate, b"").unwrap();
                    ran
                })
            };
            let r = if asynchronous {
                rt.block_on(h)
            } else {
                h.wait()
            };
            let ran = opener.join().unwrap();
            // On a starved machine the worker may reach it only after the deadline: then it
            // never ran, answered expired by the caller or by the worker. Either way, one
            // consistent answer.
            match r {
                Ok(out) => {
                    assert!(ran, "lap {lap}: a result means it ran");
                    assert_eq!(counters.get(lap as usize), 1, "lap {lap}: it ran once");
                    assert_eq!(out.value, lap as u64 * 3);
                }
                Err(TaskError::Timeout { .. }) => {
                    assert!(!ran, "lap {lap}: it ran, yet the caller got Timeout");
                }
                Err(e) => panic!("lap {lap}: {e}"),
            }
            for p in [&started, &gate] {
                let _ = std::fs::remove_file(p);
            }
        }
        assert_eq!(pool.execute(&Cmd::Echo(5)).unwrap().value, 5);
    });
}

/// A cancelled task that no worker has claimed is answered `Cancelled` at once, however its
/// caller collects it, and never runs; a batch too.
#[test]
fn a_cancelled_task_no_worker_has_claimed_is_answered_at_once() {
    watchdog(240, || {
        let (counters, pool, rt) = one_worker("cancelled", 8);
        for round in 0..ROUNDS {
            let (blocker, gate) = hold(&pool, &format!("cancel-gate-{round}"));
            let id = |k: u32| round * 10 + k;
            let cmds: Vec<Cmd> = (0..10).map(|k| Cmd::Tick(id(k))).collect();
            let cancelled = |k: u32| {
                let h = pool.submit(&cmds[k as usize]).unwrap();
                h.cancel();
                assert!(h.is_finished(), "round {round}: task {k} is settled");
                h
            };
            assert_eq!(cancelled(0).wait().unwrap_err(), TaskError::Cancelled);
            assert_eq!(cancelled(1).wait_ref().unwrap_err(), TaskError::Cancelled);
            match cancelled(2).wait_timeout(Duration::from_secs(120)) {
                Err(WaitTimeoutError::Task(TaskError::Cancelled)) => {}
                other => panic!("wait_timeout: {other:?}"),
            }
            match cancelled(3).try_wait() {
                Err(WaitTimeoutError::Task(TaskError::Cancelled)) => {}
                other => panic!("try_wait: {other:?}"),
            }
            assert_eq!(rt.block_on(cancelled(4)).unwrap_err(), TaskError::Cancelled);
            let batch = pool.batch(&cmds[5..7]).submit().unwrap();
            batch.cancel();
            assert!(batch.is_finished());
            assert_eq!(batch.wait().unwrap_err(), TaskError::Cancelled);

            assert!(
                !blocker.is_finished(),
                "all answered while the worker was held"
            );
            std::fs::write(&gate, b"").unwrap();
            assert_eq!(blocker.wait().unwrap().value, 1);
            assert_eq!(pool.execute(&cmds[9]).unwrap().value, id(9) as u64 * 3);
            for k in 0..7 {
                assert_eq!(
                    counters.get(id(k) as usize),
                    0,
                    "round {round}: task {k} never ran"
                );
            }
            let _ = std::fs::remove_file(&gate);
        }
        // A task cancelled while it runs still answers with its result.
        let started = gate_path("cancel-running-started");
        let gate = gate_path("cancel-running-gate");
        let h = pool
            .submit(&Cmd::Step {
                id: 60,
                started: started.to_string_lossy().into_owned(),
                gate: gate.to_string_lossy().into_owned(),
                fail: false,
            })
            .unwrap();
        assert!(wait_until(60, || started.exists()));
        h.cancel();
        assert!(
            !h.is_finished(),
            "a running task is not settled by a cancel"
        );
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(h.wait().unwrap().value, 180);
        for p in [&started, &gate] {
            let _ = std::fs::remove_file(p);
        }
    });
}

/// `wake_when_finished` wakes when the task can be collected without blocking, and only
/// then: at a cancel of a task no worker has claimed (at once), at the deadline of one no
/// worker has claimed, and at the completion of one a worker claimed in time (not at its
/// deadline).
#[test]
fn wake_when_finished_wakes_for_settled_answers_and_not_for_a_claimed_tasks_deadline() {
    watchdog(240, || {
        let (counters, pool, _rt) = one_worker("wakes", 64);
        // Claimed in time: its deadline passes while it runs, and nobody is woken for it.
        let started = gate_path("wakes-started");
        let gate = gate_path("wakes-gate");
        let deadline = Instant::now() + Duration::from_millis(2000);
        let running = pool
            .task(&Cmd::Step {
                id: 1,
                started: started.to_string_lossy().into_owned(),
                gate: gate.to_string_lossy().into_owned(),
                fail: false,
            })
            .deadline(deadline)
            .submit()
            .unwrap();
        assert!(wait_until(60, || started.exists()));
        let (ran_count, ran_waker) = counting_waker();
        // Queued behind it: one cancelled, one with a deadline.
        let cancelled = pool.submit(&Cmd::Tick(2)).unwrap();
        let (c_count, c_waker) = counting_waker();
        assert!(!cancelled.wake_when_finished(&c_waker));
        let expiring = pool
            .task(&Cmd::Tick(3))
            .deadline(Instant::now() + Duration::from_millis(1000))
            .submit()
            .unwrap();
        let (e_count, e_waker) = counting_waker();
        assert!(!expiring.wake_when_finished(&e_waker));
        let claimed_in_time = !running.wake_when_finished(&ran_waker);

        cancelled.cancel();
        assert_eq!(
            c_count.0.load(Ordering::SeqCst),
            1,
            "the cancel woke it at once"
        );
        assert!(cancelled.is_finished());
        assert!(
            wait_until(60, || e_count.0.load(Ordering::SeqCst) == 1),
            "woken at its deadline"
        );
        assert!(expiring.is_finished());
        // Past the running task's deadline (the event under test), with a margin for the
        // reactor's look: its waker stays silent while it runs.
        while Instant::now() <= deadline + Duration::from_millis(300) {
            std::thread::sleep(Duration::from_millis(10));
        }
        if claimed_in_time {
            assert_eq!(
                ran_count.0.load(Ordering::SeqCst),
                0,
                "no wake at a claimed task's deadline"
            );
            assert!(!running.is_finished());
        }
        std::fs::write(&gate, b"").unwrap();
        assert!(
            wait_until(60, || ran_count.0.load(Ordering::SeqCst) >= 1),
            "woken at completion"
        );
        assert_eq!(running.wait().unwrap().value, 3);
        assert_eq!(cancelled.wait().unwrap_err(), TaskError::Cancelled);
        expired(expiring.wait(), "after wake_when_finished");
        assert_eq!(counters.get(2) + counters.get(3), 0, "neither ran");
        for p in [&started, &gate] {
            let _ = std::fs::remove_file(p);
        }
    });
}

/// Tasks with a deadline that a worker claims in time take the collect's slower path (the
/// deadline is watched while they run): their results arrive whole, small (inline in the
/// slot) or large (a ring record of 1 MiB), however collected, lap after lap.
#[test]
fn results_of_every_size_arrive_whole_for_tasks_with_a_deadline() {
    watchdog(240, || {
        let (_counters, pool, rt) = one_worker("sizes", 8);
        let far = || Instant::now() + Duration::from_secs(120);
        for lap in 0..3 {
            for n in [0u32, 100, 1 << 20] {
                let want: Vec<u8> = (0..n).map(|i| (i % 251) as u8).collect();
                let cmd = Cmd::MakeBytes(n);
                let out = pool.task(&cmd).deadline(far()).execute().unwrap();
                assert_eq!(out.bytes, want, "lap {lap}, {n} bytes: execute");
                let h = pool.task(&cmd).deadline(far()).submit().unwrap();
                assert_eq!(h.wait().unwrap().bytes, want, "lap {lap}, {n} bytes: wait");
                let h = pool.task(&cmd).deadline(far()).submit().unwrap();
                let r = h.wait_ref().unwrap().to_owned().unwrap();
                assert_eq!(r.bytes, want, "lap {lap}, {n} bytes: wait_ref");
                let h = pool.task(&cmd).deadline(far()).submit().unwrap();
                assert_eq!(
                    rt.block_on(h).unwrap().bytes,
                    want,
                    "lap {lap}, {n} bytes: await"
                );
            }
        }
    });
}
