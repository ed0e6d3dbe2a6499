//! Faults: workers that die (killed, crashing, exiting, panicking, poisoned, hanging, at every
//! protocol step), crash loops, retries, shutdown modes, spawn failures, memory shortage.
//! Every test runs under a watchdog; none sleeps to synchronise.

mod common;
use common::*;
use stateful_pool::{
    BuildError, DeathReason, ExitCause, Pool, PoolEvent, RestartPolicy, SpawnError, SpawnOptions,
    SubmitError, TaskError, TaskOptions, WorkerState,
};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

type Events = Arc<Mutex<Vec<PoolEvent>>>;

fn builder(events: &Events) -> stateful_pool::PoolBuilder<TestWorker> {
    let ev = events.clone();
    Pool::<TestWorker>::builder()
        .queue_size(64)
        .on_event(move |e| ev.lock().unwrap().push(e.clone()))
}

fn pid_of(pool: &Pool<TestWorker>) -> u32 {
    pool.execute(&Cmd::Pid).unwrap().value as u32
}

fn sigkill(pid: u32) {
    // SAFETY: plain syscall on a pid we own (a worker of this test's pool).
    assert_eq!(unsafe { libc::kill(pid as i32, libc::SIGKILL) }, 0);
}

fn restarted(pool: &Pool<TestWorker>, n: u64) -> bool {
    wait_until(30, || {
        pool.stats().restarts >= n && pool.workers().iter().any(|w| w.state == WorkerState::Ready)
    })
}

#[test]
fn a_worker_killed_mid_task_fails_that_task_only_and_is_restarted_with_the_same_args() {
    watchdog(60, || {
        let events = Events::default();
        let pool = builder(&events).build().unwrap();
        pool.spawn(&Spawn::ok("solo")).unwrap();
        let pid = pid_of(&pool);
        let gate = gate_path("killed-mid-task");
        let running = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        // Wait until the worker has taken it (the queue is empty again), then queue more.
        assert!(wait_until(30, || pool.queued() == 0));
        let queued: Vec<_> = (0..10)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        let t0 = Instant::now();
        sigkill(pid);
        match running.wait() {
            Err(TaskError::WorkerDied {
                worker: 0,
                pid: p,
                cause: ExitCause::Signal(9),
            }) => assert_eq!(p, pid),
            other => panic!("expected WorkerDied by SIGKILL, got {other:?}"),
        }
        eprintln!("death noticed and answered in {:?}", t0.elapsed());
        // Every other task completes, exactly once, on the restarted worker.
        for (i, h) in queued.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
        let new_pid = pid_of(&pool);
        assert_ne!(new_pid, pid);
        // The new worker serves as soon as its spawn step is done; the supervisor records it
        // (state, restart count) when it next looks, which may be a moment later.
        assert!(wait_until(60, || {
            let w = &pool.workers()[0];
            w.state == WorkerState::Ready && w.restarts == 1
        }));
        let w = &pool.workers()[0];
        assert_eq!(
            (w.state, w.generation, w.restarts, w.pid),
            (WorkerState::Ready, 2, 1, new_pid)
        );
        // Same spawn arguments: the restarted worker has the same tag.
        let s = pool.stats();
        assert_eq!((s.worker_deaths, s.restarts, s.tasks_died), (1, 1, 1));
        // The event follows the state change (the supervisor emits it after).
        assert!(wait_until(60, || events.lock().unwrap().len() >= 2));
        let ev = events.lock().unwrap().clone();
        assert!(
            matches!(
                ev[0],
                PoolEvent::WorkerDied { worker: 0, pid: p, cause: ExitCause::Signal(9), reason: DeathReason::Crash, tasks_failed: 1, tasks_retried: 0 } if p == pid
            ),
            "{ev:?}"
        );
        assert!(
            matches!(
                ev[1],
                PoolEvent::WorkerRestarted {
                    worker: 0,
                    generation: 2,
                    ..
                }
            ),
            "{ev:?}"
        );
        let _ = std::fs::remove_file(gate);
    });
}

#[test]
fn crashes_inside_execute_are_named_by_signal_or_exit_code() {
    watchdog(90, || {
        let events = Events::default();
        let pool = builder(&events)
            .restart_policy(RestartPolicy::unlimited())
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("crashy")).unwrap();
        let cases = [
            (Cmd::Abort, ExitCause::Signal(libc::SIGABRT)),
            (Cmd::Segfault, ExitCause::Signal(libc::SIGSEGV)),
            (Cmd::KillSelf, ExitCause::Signal(libc::SIGKILL)),
            (Cmd::Exit(3), ExitCause::Exit(3)),
            // A clean exit in the middle of a task is still a death.
            (Cmd::Exit(0), ExitCause::Exit(0)),
        ];
        let reasons = [
            DeathReason::Crash,
            DeathReason::Crash,
            DeathReason::Crash,
            DeathReason::Exit,
            DeathReason::Exit,
        ];
        for (i, (cmd, want)) in cases.clone().into_iter().enumerate() {
            let pid = pid_of(&pool);
            match pool.execute(&cmd) {
                Err(TaskError::WorkerDied {
                    worker: 0,
                    pid: p,
                    cause,
                }) => {
                    assert_eq!((p, cause), (pid, want), "{cmd:?}");
                    let msg = TaskError::WorkerDied {
                        worker: 0,
                        pid: p,
                        cause,
                    }
                    .to_string();
                    assert!(msg.contains(&pid.to_string()), "{msg}");
                }
                other => panic!("{cmd:?}: expected WorkerDied, got {other:?}"),
            }
            // The pool keeps serving (the next execute waits for the restart).
            assert_eq!(pool.execute(&Cmd::Echo(i as u64)).unwrap().value, i as u64);
        }
        assert_eq!(pool.stats().worker_deaths, 5);
        assert_eq!(pool.stats().tasks_died, 5);
        // A signal is a crash; an exit status while serving is an `exit()` in the task.
        let died: Vec<(ExitCause, DeathReason)> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                PoolEvent::WorkerDied { cause, reason, .. } => Some((*cause, *reason)),
                _ => None,
            })
            .collect();
        let want: Vec<_> = cases.iter().map(|c| c.1).zip(reasons).collect();
        assert_eq!(died, want);
    });
}

/// Issue 2: "an error … or a panic in it reaches that task's caller …; the worker keeps
/// serving": by default the same process, its state kept.
#[test]
fn by_default_a_panic_fails_its_task_and_the_worker_keeps_serving_with_its_state() {
    watchdog(60, || {
        let events = Events::default();
        let pool = builder(&events).build().unwrap();
        pool.spawn(&Spawn::ok("p")).unwrap();
        assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 0);
        let pid = pid_of(&pool);
        for round in 1..=3u64 {
            match pool.execute(&Cmd::Panic("boom".into())) {
                Err(TaskError::Panicked {
                    worker: 0, message, ..
                }) => assert_eq!(message, "boom"),
                other => panic!("expected Panicked, got {other:?}"),
            }
            // `Count` answers how many tasks this state ran before it: per round the panic,
            // the count and the pid check, after the first count and pid check.
            assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 3 * round);
            assert_eq!(pid_of(&pool), pid);
        }
        assert_eq!(pool.stats().restarts, 0);
        assert_eq!(pool.workers()[0].generation, 1);
        assert!(
            events.lock().unwrap().is_empty(),
            "{:?}",
            events.lock().unwrap()
        );
    });
}

#[test]
fn restart_on_panic_replaces_the_worker_and_a_poisoned_worker_is_replaced_too() {
    watchdog(60, || {
        let events = Events::default();
        let pool = builder(&events).restart_on_panic(true).build().unwrap();
        pool.spawn(&Spawn::ok("p")).unwrap();
        assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 0);
        let pid = pid_of(&pool);
        match pool.execute(&Cmd::Panic("torn state".into())) {
            Err(TaskError::Panicked {
                worker: 0, message, ..
            }) => assert_eq!(message, "torn state"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        // A fresh worker: new process, fresh state.
        assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 0);
        let pid2 = pid_of(&pool);
        assert_ne!(pid2, pid);
        match pool.execute(&Cmd::Poison("sticky CUDA error".into())) {
            Err(TaskError::Poisoned { worker: 0, message }) => {
                assert_eq!(message, "sticky CUDA error")
            }
            other => panic!("expected Poisoned, got {other:?}"),
        }
        assert_ne!(pid_of(&pool), pid2);
        assert_eq!(pool.workers()[0].generation, 3);
        let reasons: Vec<_> = events
            .lock()
            .unwrap()
            .iter()
            .filter_map(|e| match e {
                PoolEvent::WorkerDied {
                    reason,
                    tasks_failed,
                    ..
                } => Some((*reason, *tasks_failed)),
                _ => None,
            })
            .collect();
        // The task was answered before the worker retired: nothing failed with it.
        assert_eq!(
            reasons,
            [(DeathReason::Panic, 0), (DeathReason::Poisoned, 0)]
        );
    });
}

/// A worker can report ready, serve, retire and exit before the supervisor looks at it (a busy
/// or descheduled supervisor on a small machine): that is a worker that started and then died
/// serving, not a failed start-up. Made deterministic by holding the supervisor in the event
/// hook of another seat's death while the new worker does all of that.
#[test]
fn a_worker_that_retires_before_its_start_was_seen_started_and_then_died() {
    watchdog(120, || {
        let events = Events::default();
        let held = Arc::new(Mutex::new(()));
        let entered = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let (ev, hook_lock, hook_entered) = (events.clone(), held.clone(), entered.clone());
        let pool = Arc::new(
            Pool::<TestWorker>::builder()
                .queue_size(64)
                .on_event(move |e| {
                    if matches!(e, PoolEvent::WorkerDied { worker: 0, .. }) {
                        hook_entered.store(true, std::sync::atomic::Ordering::SeqCst);
                        drop(hook_lock.lock().unwrap_or_else(|e| e.into_inner()));
                    }
                    ev.lock().unwrap().push(e.clone());
                })
                .build()
                .unwrap(),
        );
        pool.spawn(&Spawn::ok("first")).unwrap();
        let first = pool.workers()[0].pid;
        // The second worker's start-up waits on a gate the test opens.
        let gate = gate_path("retire-before-seen");
        let spawner = {
            let pool = pool.clone();
            let args = Spawn {
                gate: gate.to_string_lossy().into(),
                ..Spawn::ok("second")
            };
            std::thread::spawn(move || pool.spawn(&args).map(|_| ()))
        };
        assert!(wait_until(60, || {
            let w = pool.workers();
            w.len() == 2 && w[1].state == WorkerState::Starting && w[1].pid != 0
        }));
        let second = pool.workers()[1].pid;
        // Hold the supervisor in the first worker's death.
        let guard = held.lock().unwrap();
        sigkill(first);
        assert!(wait_until(60, || entered.load(std::sync::atomic::Ordering::SeqCst)));
        // Unseen by the supervisor: the second worker reports ready, serves, retires, exits.
        std::fs::write(&gate, b"").unwrap();
        match pool.execute(&Cmd::Poison("gone before seen".into())) {
            Err(TaskError::Poisoned { worker: 1, message }) => {
                assert_eq!(message, "gone before seen")
            }
            other => panic!("expected Poisoned by worker 1, got {other:?}"),
        }
        assert!(wait_until(60, || process_gone(second)));
        drop(guard);
        // Its start succeeded; its death is a poisoned worker's, nothing failed with it.
        spawner.join().unwrap().unwrap();
        assert!(wait_until(60, || pool.num_workers() == 2));
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
        let events = events.lock().unwrap();
        let died: Vec<_> = events
            .iter()
            .filter_map(|e| match e {
                PoolEvent::WorkerDied {
                    worker,
                    reason,
                    tasks_failed,
                    ..
                } => Some((*worker, *reason, *tasks_failed)),
                _ => None,
            })
            .collect();
        assert!(died.contains(&(1, DeathReason::Poisoned, 0)), "{died:?}");
        assert!(
            !events
                .iter()
                .any(|e| matches!(e, PoolEvent::RestartFailed { .. })),
            "{events:?}"
        );
        let _ = std::fs::remove_file(gate);
    });
}

#[test]
fn an_idle_worker_that_dies_fails_nothing_and_is_restarted() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("idle")).unwrap();
        pool.spawn(&Spawn::ok("idle")).unwrap();
        let before: Vec<u32> = pool.workers().iter().map(|w| w.pid).collect();
        sigkill(before[1]);
        assert!(restarted(&pool, 1));
        assert!(wait_until(30, || pool.num_workers() == 2));
        let after: Vec<u32> = pool.workers().iter().map(|w| w.pid).collect();
        assert_eq!(after[0], before[0]);
        assert_ne!(after[1], before[1]);
        assert_eq!(pool.stats().tasks_died, 0);
        let handles: Vec<_> = (0..20)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
    });
}

#[test]
fn a_task_past_its_timeout_fails_and_its_worker_is_replaced_others_unaffected() {
    watchdog(60, || {
        let events = Events::default();
        let pool = builder(&events).build().unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        let gate = gate_path("never-opened");
        let hung = pool
            .task(&Cmd::Gate(gate.to_string_lossy().into()))
            .timeout(Duration::from_millis(200))
            .submit()
            .unwrap();
        // The other worker keeps serving while one hangs.
        for i in 0..50 {
            assert_eq!(pool.execute(&Cmd::Echo(i)).unwrap().value, i);
        }
        match hung.wait() {
            Err(TaskError::Timeout { after, .. }) => assert_eq!(after, Duration::from_millis(200)),
            other => panic!("expected Timeout, got {other:?}"),
        }
        assert!(restarted(&pool, 1));
        assert!(wait_until(30, || pool.num_workers() == 2));
        assert_eq!(pool.stats().tasks_timed_out, 1);
        assert!(events.lock().unwrap().iter().any(|e| matches!(
            e,
            PoolEvent::WorkerDied {
                reason: DeathReason::Timeout,
                cause: ExitCause::Signal(9),
                ..
            }
        )));
        // Tasks that finish in time are untouched by their timeout.
        let opts = TaskOptions::new().timeout(Duration::from_secs(30));
        assert_eq!(
            pool.task(&Cmd::Echo(5))
                .options(opts)
                .execute()
                .unwrap()
                .value,
            5
        );

        // The pool default applies to every task.
        let pool2 = Pool::<TestWorker>::builder()
            .task_timeout(Duration::from_secs(1))
            .build()
            .unwrap();
        pool2.spawn(&Spawn::ok("c")).unwrap();
        assert!(matches!(
            pool2.execute(&Cmd::SleepMs(60_000)),
            Err(TaskError::Timeout { worker: 0, .. })
        ));
        assert_eq!(pool2.execute(&Cmd::Echo(1)).unwrap().value, 1);
    });
}

#[test]
fn retries_rerun_idempotent_tasks_and_are_off_by_default() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("r1")).unwrap();
        pool.spawn(&Spawn::ok("r2")).unwrap();
        // Default: at-most-once, the death is the task's outcome.
        let marker = gate_path("die-once-a");
        let cmd = Cmd::DieOnce(marker.to_string_lossy().into());
        assert!(matches!(
            pool.execute(&cmd),
            Err(TaskError::WorkerDied { .. })
        ));
        // With a retry, it runs again elsewhere and succeeds once.
        let marker2 = gate_path("die-once-b");
        let cmd = Cmd::DieOnce(marker2.to_string_lossy().into());
        let out = pool.task(&cmd).retries(1).execute().unwrap();
        assert_eq!(out.value, 1);
        let s = pool.stats();
        assert_eq!((s.tasks_retried, s.tasks_died, s.worker_deaths), (1, 1, 2));
        // The pool-wide default works the same way.
        let pool2 = Pool::<TestWorker>::builder()
            .task_retries(2)
            .build()
            .unwrap();
        pool2.spawn(&Spawn::ok("r3")).unwrap();
        let marker3 = gate_path("die-once-c");
        let cmd = Cmd::DieOnce(marker3.to_string_lossy().into());
        assert_eq!(pool2.execute(&cmd).unwrap().value, 1);
        for m in [marker, marker2, marker3] {
            let _ = std::fs::remove_file(m);
        }
    });
}

/// Kills the worker at each protocol step (failpoints) while 8 tasks are in flight: every task
/// resolves exactly once, the failed one (if any) with `WorkerDied`, and the queue keeps
/// working afterwards.
#[test]
fn death_at_every_protocol_step_resolves_every_task_exactly_once() {
    watchdog(120, || {
        for (point, lost) in [
            ("pop_mid", 1),
            ("after_claim", 1),
            ("mid_read", 1),
            ("after_result_write", 1),
            ("after_publish", 0),
        ] {
            for retries in [0, 1] {
                eprintln!("failpoint {point}, retries {retries}");
                let pool = Pool::<TestWorker>::builder()
                    .queue_size(8)
                    .worker_env("STATEFUL_POOL_FAILPOINTS", format!("{point}@3/1"))
                    .task_retries(retries)
                    .build()
                    .unwrap();
                pool.spawn(&Spawn::ok("fp")).unwrap();
                let mut died = 0;
                let handles: Vec<_> = (0..8u64)
                    .map(|i| pool.submit(&Cmd::Echo(i)))
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|e| panic!("{point}: submit failed: {e}"));
                for (i, h) in handles.into_iter().enumerate() {
                    match h.wait() {
                        Ok(o) => assert_eq!(o.value, i as u64, "{point}"),
                        Err(TaskError::WorkerDied { .. }) => died += 1,
                        Err(e) => panic!("{point}: unexpected {e}"),
                    }
                }
                let want = if retries > 0 { 0 } else { lost };
                assert_eq!(
                    died, want,
                    "{point} (retries {retries}): tasks lost to the death"
                );
                assert_eq!(pool.stats().worker_deaths, 1, "{point}");
                // The queue still works, across several laps past the repaired cell.
                for i in 0..40u64 {
                    assert_eq!(pool.execute(&Cmd::Echo(i)).unwrap().value, i, "{point}");
                }
            }
        }
    });
}

/// With `revive_failed_after`, a seat that ran out of restarts is started again after the
/// delay (its budget afresh), again and again while the fault lasts, and serves once it is
/// gone; tasks meanwhile fail `NoWorkers` at once. A spawn meanwhile takes another seat (it
/// adds a worker, the revival still comes). Retiring the seat during a revived start-up stops
/// it for good.
#[test]
fn a_failed_seat_is_revived_after_its_delay_and_serves_again() {
    watchdog(120, || {
        let events = Events::default();
        let policy = RestartPolicy {
            max_restarts: 1,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(10),
            backoff_max: Duration::from_millis(10),
        };
        let pool = builder(&events)
            .restart_policy(policy)
            .revive_failed_after(Duration::from_millis(100))
            .build()
            .unwrap();
        let marker = gate_path("revive-fault");
        let gate = gate_path("revive-gate");
        std::fs::write(&gate, b"").unwrap();
        let args = Spawn {
            die_if_exists: marker.to_string_lossy().into(),
            gate: gate.to_string_lossy().into(),
            ..Spawn::ok("revived")
        };
        pool.spawn(&args).unwrap();
        let revivals = || {
            let ev = events.lock().unwrap();
            ev.iter()
                .filter(|e| matches!(e, PoolEvent::WorkerReviving { worker: 0 }))
                .count()
        };
        for lap in 0..2 {
            // Every start dies in its spawn step while the marker exists.
            std::fs::write(&marker, b"x").unwrap();
            assert!(matches!(
                pool.execute(&Cmd::KillSelf),
                Err(TaskError::WorkerDied { .. })
            ));
            let before = revivals();
            // Revived and failing again, at least twice: the fault outlasts the revivals.
            assert!(wait_until(60, || revivals() >= before + 2), "lap {lap}");
            assert_eq!(pool.execute(&Cmd::Echo(1)), Err(TaskError::NoWorkers));
            // The fault is gone: the next revival serves, with the same spawn arguments.
            std::fs::remove_file(&marker).unwrap();
            assert!(wait_until(60, || pool.workers()[0].state == WorkerState::Ready));
            assert_eq!(pool.execute(&Cmd::Echo(7)).unwrap().value, 7);
        }
        assert!(wait_until(60, || matches!(
            events.lock().unwrap().last(),
            Some(PoolEvent::WorkerRestarted { worker: 0, .. })
        )));
        // Failed again; a spawn meanwhile goes to a free seat that is not the failed one.
        std::fs::write(&marker, b"x").unwrap();
        assert!(matches!(
            pool.execute(&Cmd::KillSelf),
            Err(TaskError::WorkerDied { .. })
        ));
        assert!(wait_until(60, || pool.workers()[0].state == WorkerState::Failed));
        pool.spawn(&Spawn::ok("extra")).unwrap();
        assert_eq!(pool.workers()[1].state, WorkerState::Ready);
        // Revived starts now wait in their spawn step (the gate is gone) instead of dying:
        // the seat is caught starting up (one of those, or one that passed the gate just
        // before and is about to die) and retired.
        std::fs::remove_file(&gate).unwrap();
        assert!(wait_until(60, || pool.workers()[0].state == WorkerState::Starting));
        pool.retire_worker(0).unwrap();
        assert_eq!(pool.workers()[0].state, WorkerState::Stopped);
        let after = revivals();
        // Absence can only be waited for: ten times the revival delay.
        std::thread::sleep(Duration::from_secs(1));
        assert_eq!(revivals(), after);
        assert_eq!(pool.workers()[0].state, WorkerState::Stopped);
        assert_eq!(pool.num_workers(), 1);
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
        let _ = std::fs::remove_file(&marker);
    });
}

#[test]
fn a_crash_loop_uses_up_its_budget_then_tasks_fail_fast_until_a_new_spawn() {
    watchdog(60, || {
        let events = Events::default();
        let policy = RestartPolicy {
            max_restarts: 2,
            window: Duration::from_secs(60),
            backoff_initial: Duration::from_millis(20),
            backoff_max: Duration::from_millis(100),
        };
        let pool = builder(&events).restart_policy(policy).build().unwrap();
        let marker = gate_path("crash-loop");
        let args = Spawn {
            die_if_exists: marker.to_string_lossy().into(),
            ..Spawn::ok("loop")
        };
        pool.spawn(&args).unwrap();
        // From now on every start dies in its spawn step.
        std::fs::write(&marker, b"x").unwrap();
        assert!(matches!(
            pool.execute(&Cmd::KillSelf),
            Err(TaskError::WorkerDied { .. })
        ));
        // Tasks queued while it restarts fail once the budget is gone; they never hang.
        let pending = pool.submit(&Cmd::Echo(1));
        if let Ok(h) = pending {
            assert_eq!(h.wait(), Err(TaskError::NoWorkers));
        } else {
            assert_eq!(pending.unwrap_err(), SubmitError::NoWorkers);
        }
        // One variant for one cause: a refused submit and an abandoned task read the same.
        assert_eq!(pool.execute(&Cmd::Echo(2)), Err(TaskError::NoWorkers));
        assert_eq!(pool.workers()[0].state, WorkerState::Failed);
        assert_eq!(pool.stats().failed_workers, 1);
        {
            let ev = events.lock().unwrap();
            let fails = ev
                .iter()
                .filter(|e| matches!(e, PoolEvent::RestartFailed { .. }))
                .count();
            assert_eq!(fails, 2, "{ev:?}");
            assert!(ev.iter().any(|e| matches!(
                e,
                PoolEvent::WorkerFailed {
                    worker: 0,
                    restarts: 2
                }
            )));
            assert!(
                matches!(ev.last(), Some(PoolEvent::NoWorkersLeft)),
                "{ev:?}"
            );
        }
        // A new spawn serves again.
        std::fs::remove_file(&marker).unwrap();
        pool.spawn(&Spawn::ok("fresh")).unwrap();
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);

        // A spawn step that fails on every restart from the start: same end.
        let pool = Pool::<TestWorker>::builder()
            .restart_policy(RestartPolicy::never())
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("once")).unwrap();
        assert!(matches!(
            pool.execute(&Cmd::Abort),
            Err(TaskError::WorkerDied { .. })
        ));
        assert!(wait_until(30, || pool.stats().failed_workers == 1));
        assert_eq!(pool.execute(&Cmd::Echo(1)), Err(TaskError::NoWorkers));
    });
}

#[test]
fn shutdown_now_cancels_queued_tasks_and_running_ones_finish() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("s")).unwrap();
        let gate = gate_path("shutdown-now");
        let running = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        assert!(wait_until(30, || pool.queued() == 0));
        let queued: Vec<_> = (0..5)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        let stopper = std::thread::spawn(move || pool.shutdown_now());
        // The queued tasks are cancelled while the running one still blocks the worker.
        for h in queued {
            assert_eq!(h.wait(), Err(TaskError::Cancelled));
        }
        std::fs::write(&gate, b"open").unwrap();
        assert_eq!(running.wait().unwrap().value, 1);
        stopper.join().unwrap();
        let _ = std::fs::remove_file(gate);
    });
}

#[test]
fn drop_is_bounded_by_the_shutdown_timeout_even_with_a_hung_task() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .shutdown_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("h")).unwrap();
        let hung = pool.submit(&Cmd::SleepMs(600_000)).unwrap();
        assert!(wait_until(30, || pool.queued() == 0));
        let queued = pool.submit(&Cmd::Echo(1)).unwrap();
        drop(pool);
        assert_eq!(hung.wait(), Err(TaskError::Cancelled));
        assert_eq!(queued.wait(), Err(TaskError::Cancelled));
    });
}

#[test]
fn failed_spawns_report_clearly_and_leave_no_process_and_the_pool_usable() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(2)
            .spawn_timeout(Duration::from_secs(5))
            .build()
            .unwrap();
        let err = pool
            .spawn(&Spawn {
                hang_ms: 30_000,
                ..Spawn::ok("slow")
            })
            .unwrap_err();
        assert!(matches!(err, SpawnError::Timeout { .. }), "{err}");
        let marker = gate_path("exit-in-spawn");
        std::fs::write(&marker, b"x").unwrap();
        let err = pool
            .spawn(&Spawn {
                die_if_exists: marker.to_string_lossy().into(),
                ..Spawn::ok("exits")
            })
            .unwrap_err();
        match &err {
            SpawnError::Exited { pid, cause, .. } => {
                assert_eq!(*cause, ExitCause::Exit(7), "{err}");
                assert!(wait_until(30, || process_gone(*pid)));
            }
            other => panic!("expected Exited, got {other}"),
        }
        let _ = std::fs::remove_file(marker);
        // An environment variable no process can have: refused by either launcher alike.
        let err = pool
            .spawn_with(&Spawn::ok("bad-env"), &SpawnOptions::new().env("A=B", "x"))
            .unwrap_err();
        match &err {
            SpawnError::Launch { source, .. } => {
                assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput, "{err}")
            }
            other => panic!("expected Launch, got {other}"),
        }
        // Nothing left running, every seat free again.
        assert_eq!(pool.num_workers(), 0);
        assert!(pool.workers().iter().all(|w| w.state == WorkerState::Empty));
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        assert_eq!(pool.execute(&Cmd::Echo(4)).unwrap().value, 4);

        // A worker program that does not exist: the spawn fails, naming it, and nothing
        // is left behind.
        let missing = Pool::<TestWorker>::builder()
            .program("/nonexistent/stateful-pool-worker")
            .build()
            .unwrap();
        for _ in 0..2 {
            let err = missing.spawn(&Spawn::ok("x")).unwrap_err();
            match &err {
                SpawnError::Launch { source, .. } => {
                    assert_eq!(source.kind(), std::io::ErrorKind::NotFound, "{err}");
                    assert!(
                        err.to_string()
                            .contains("/nonexistent/stateful-pool-worker"),
                        "{err}"
                    );
                }
                other => panic!("expected Launch, got {other}"),
            }
            assert_eq!(missing.num_workers(), 0);
            assert!(
                missing
                    .workers()
                    .iter()
                    .all(|w| w.state == WorkerState::Empty)
            );
        }
        assert!(matches!(
            missing.execute(&Cmd::Echo(1)),
            Err(TaskError::NoWorkers)
        ));
    });
}

#[test]
fn too_little_memory_is_a_clear_error_at_build_time() {
    let Err(err) = Pool::<TestWorker>::builder()
        .task_arena_bytes(1 << 46) // 64 TiB: more than any test machine has
        .build()
    else {
        panic!("a 64 TiB pool was built");
    };
    assert!(matches!(err, BuildError::NoSpace { .. }), "{err}");
    assert!(err.to_string().contains("cannot reserve"), "{err}");
}

#[test]
fn memory_reserved_as_it_is_needed_fails_clearly_and_the_pool_serves_on() {
    watchdog(120, || {
        // A seat's completion ring cannot be reserved: the spawn fails, nothing is started,
        // the seat stays free.
        let pool = Pool::<TestWorker>::builder()
            .__fail_reservations(1)
            .build()
            .unwrap();
        for _ in 0..2 {
            match pool.spawn(&Spawn::ok("no-ring")) {
                Err(e @ SpawnError::NoSpace { .. }) => {
                    assert!(e.to_string().contains("cannot reserve"), "{e}");
                    let os = std::error::Error::source(&e)
                        .and_then(|s| s.downcast_ref::<std::io::Error>())
                        .and_then(|s| s.raw_os_error());
                    assert_eq!(os, Some(libc::ENOSPC), "{e}");
                }
                other => panic!("expected SpawnError::NoSpace, got {other:?}"),
            }
            assert_eq!(pool.num_workers(), 0);
            assert!(pool.workers().iter().all(|w| w.state == WorkerState::Empty));
        }
        drop(pool);
        // The worker reserves its seat's ring while its spawn step runs: once it is ready the
        // segment holds the ring's memory; a restarted worker in the same seat serves large
        // results at once. Without the reservation, nothing is held for the ring.
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        let (before, ring) = pool.__segment_memory();
        pool.spawn(&Spawn::ok("ring")).unwrap();
        let (after, _) = pool.__segment_memory();
        // (Its first page may be shared with a region `build` reserved.)
        assert!(
            after + 4096 >= before + ring,
            "{before} + ring {ring} > {after}"
        );
        sigkill(pool.workers()[0].pid);
        assert!(wait_until(60, || {
            let w = &pool.workers()[0];
            w.restarts == 1 && w.state == WorkerState::Ready
        }));
        let big = pool.execute(&Cmd::MakeBytes(ring as u32 / 3)).unwrap();
        assert_eq!(big.bytes.len() as u64, ring / 3);
        // Nothing new is held for the ring the restarted worker writes into.
        let now = pool.__segment_memory().0;
        assert!(
            now < after + ring / 2,
            "{now} after a restart, {after} before"
        );
        drop(pool);
        let pool = Pool::<TestWorker>::builder()
            .reserve_memory(false)
            .build()
            .unwrap();
        let (before, _) = pool.__segment_memory();
        pool.spawn(&Spawn::ok("lazy")).unwrap();
        assert!(pool.__segment_memory().0 < before + ring / 2);
        drop(pool);
        // The arena cannot grow: large tasks and loans fail with NoSpace; small tasks (in
        // their slot) are served.
        let pool = Pool::<TestWorker>::builder()
            .__fail_reservations(2)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("no-arena")).unwrap();
        assert!(matches!(
            pool.submit(&Cmd::SumVec(vec![1; 100_000])),
            Err(SubmitError::NoSpace { .. })
        ));
        assert!(matches!(
            pool.loan(1 << 20),
            Err(SubmitError::NoSpace { .. })
        ));
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
        drop(pool);
        // Reserved as needed: large tasks and loans well past the first step work.
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("grow")).unwrap();
        let big = vec![1u8; 9 << 20];
        assert_eq!(pool.execute(&Cmd::SumVec(big)).unwrap().value, 9 << 20);
        let mut loan = pool.loan(20 << 20).unwrap();
        loan.as_mut_slice().fill(1);
        let out = pool.task(&Cmd::SumPayload).payload(loan).execute().unwrap();
        assert_eq!(out.value, (20u64 << 20) / 4096);
    });
}

#[test]
fn the_segment_is_private_to_its_owner() {
    let pool = Pool::<TestWorker>::builder().build().unwrap();
    let mut seen = 0;
    for entry in std::fs::read_dir("/proc/self/fd").unwrap().flatten() {
        let Ok(target) = std::fs::read_link(entry.path()) else {
            continue;
        };
        if target.to_string_lossy().contains("memfd:stateful-pool") {
            use std::os::unix::fs::PermissionsExt;
            let meta = std::fs::metadata(entry.path()).unwrap();
            assert_eq!(meta.permissions().mode() & 0o777, 0o600, "{target:?}");
            seen += 1;
        }
    }
    assert!(seen >= 1);
    // And nothing is ever created in /dev/shm: the segment has no name to guess or open.
    drop(pool);
}
