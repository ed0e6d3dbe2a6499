// Written by an independent black-box tester from the issues and docs (2026-12-07).
//! Black-box tests: edge values (huge durations, arena full, tiny queues).
mod common;
use common::*;
use stateful_pool::{Pool, RestartPolicy, SubmitError, TaskError, TaskOptions, WaitTimeoutError};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

fn pool1() -> Pool<TestWorker> {
    let p = Pool::<TestWorker>::builder().queue_size(4).build().unwrap();
    p.spawn(&Spawn::ok("a")).unwrap();
    p
}

#[test]
fn ub_submit_timeout_duration_max() {
    watchdog(60, || {
        let p = pool1();
        let h = p.submit_timeout(&Cmd::Echo(1), Duration::MAX).unwrap();
        assert_eq!(h.wait().unwrap().value, 1);
        let h = p.task(&Cmd::Echo(2)).submit_timeout(Duration::MAX).unwrap();
        assert_eq!(h.wait().unwrap().value, 2);
    });
}

#[test]
fn ub_wait_timeout_duration_max() {
    watchdog(60, || {
        let p = pool1();
        let h = p.submit(&Cmd::Echo(3)).unwrap();
        match h.wait_timeout(Duration::MAX) {
            Ok(o) => assert_eq!(o.value, 3),
            Err(e) => panic!("{:?}", e.is_timeout()),
        }
        let b = p.batch(&[Cmd::Echo(1), Cmd::Echo(2)]).submit().unwrap();
        assert_eq!(b.wait_timeout(Duration::MAX).ok().unwrap().len(), 2);
    });
}

#[test]
fn ub_task_timeout_duration_max() {
    watchdog(60, || {
        let p = pool1();
        let o = p.task(&Cmd::Echo(4)).timeout(Duration::MAX).execute();
        assert_eq!(o.unwrap().value, 4);
        let o = p
            .task(&Cmd::Echo(5))
            .options(TaskOptions::new().timeout(Duration::MAX))
            .execute();
        assert_eq!(o.unwrap().value, 5);
        assert_eq!(p.execute(&Cmd::Echo(6)).unwrap().value, 6);
    });
}

#[test]
fn ub_pool_task_timeout_duration_max() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .task_timeout(Duration::MAX)
            .build()
            .unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        assert_eq!(p.execute(&Cmd::Echo(4)).unwrap().value, 4);
    });
}

#[test]
fn ub_builder_huge_timeouts() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .spawn_timeout(Duration::MAX)
            .shutdown_timeout(Duration::MAX)
            .build()
            .unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        assert_eq!(p.execute(&Cmd::Echo(4)).unwrap().value, 4);
        drop(p);
    });
}

#[test]
fn ub_restart_policy_huge_values() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .restart_policy(RestartPolicy {
                max_restarts: u32::MAX,
                window: Duration::MAX,
                backoff_initial: Duration::ZERO,
                backoff_max: Duration::ZERO,
            })
            .build()
            .unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        for _ in 0..3 {
            assert!(wait_until(20, || p.num_workers() == 1));
            assert!(matches!(
                p.execute(&Cmd::KillSelf),
                Err(TaskError::WorkerDied { .. })
            ));
        }
        assert!(wait_until(20, || p.num_workers() == 1));
        assert_eq!(p.execute(&Cmd::Echo(4)).unwrap().value, 4);
    });
}

#[test]
fn ub_revive_huge_delay() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .restart_policy(RestartPolicy::never())
            .revive_failed_after(Duration::MAX)
            .build()
            .unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        assert!(matches!(
            p.execute(&Cmd::KillSelf),
            Err(TaskError::WorkerDied { .. })
        ));
        assert!(wait_until(20, || matches!(
            p.execute(&Cmd::Echo(1)),
            Err(TaskError::NoWorkers)
        )));
        p.spawn(&Spawn::ok("b")).unwrap();
        assert_eq!(p.execute(&Cmd::Echo(4)).unwrap().value, 4);
    });
}

#[test]
fn ub_far_future_deadline() {
    watchdog(60, || {
        let p = pool1();
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        assert_eq!(
            p.task(&Cmd::Echo(7)).deadline(far).execute().unwrap().value,
            7
        );
        let far = Instant::now() + Duration::from_secs(100 * 365 * 24 * 3600);
        let h = p.task(&Cmd::Echo(8)).deadline(far).submit().unwrap();
        assert_eq!(futures_executor::block_on(h).unwrap().value, 8);
    });
}

#[test]
fn ub_arena_full_try_submit_and_try_loan() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .queue_size(8)
            .task_arena_bytes(8 << 20)
            .build()
            .unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        assert_eq!(p.max_task_bytes(), 8 << 20);
        let l1 = p.loan(6 << 20).unwrap();
        match p.try_loan(6 << 20) {
            Err(SubmitError::QueueFull) => {}
            other => panic!("{:?}", other.map(|l| l.len())),
        }
        let big = Cmd::SumVec(vec![1u8; 5 << 20]);
        match p.try_submit(&big) {
            Err(SubmitError::QueueFull) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        match p.submit_timeout(&big, Duration::from_millis(50)) {
            Err(SubmitError::Timeout) => {}
            other => panic!("{:?}", other.map(|_| ())),
        }
        // a blocked loan() is released when the first loan drops
        let t = std::thread::scope(|s| {
            let h = s.spawn(|| p.loan(6 << 20).map(|l| l.len()));
            std::thread::sleep(Duration::from_millis(100));
            drop(l1);
            h.join().unwrap()
        });
        assert_eq!(t.unwrap(), 6 << 20);
        // repeated max loans never leak space
        for _ in 0..50 {
            let l = p.try_loan(8 << 20).expect("space came back");
            drop(l);
        }
        // large tasks in a loop (arena reused)
        for _ in 0..20 {
            assert_eq!(p.execute(&big).unwrap().value, 5 << 20);
        }
    });
}

#[test]
fn ub_max_task_bytes_clamped_and_tiny() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder()
            .task_arena_bytes(1 << 20)
            .max_task_bytes(1 << 40)
            .build()
            .unwrap();
        assert_eq!(p.max_task_bytes(), 1 << 20);
        let p = Pool::<TestWorker>::builder()
            .task_arena_bytes(1000)
            .build()
            .unwrap();
        assert_eq!(
            p.max_task_bytes(),
            1024,
            "slot inline area is larger than arena rounded down 960"
        );
    });
}

#[test]
fn ub_queue_size_one_many_threads() {
    watchdog(120, || {
        let p = Pool::<TestWorker>::builder().queue_size(1).build().unwrap();
        p.spawn_n(&Spawn::ok("a"), 2).into_iter().for_each(|r| {
            r.unwrap();
        });
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let p = &p;
                s.spawn(move || {
                    for i in 0..200 {
                        let v = t * 1000 + i;
                        assert_eq!(p.execute(&Cmd::Echo(v)).unwrap().value, v);
                    }
                });
            }
        });
        let v: Vec<_> = p.map((0..50u64).map(Cmd::Echo)).collect();
        assert_eq!(v.len(), 50);
        for (i, r) in v.into_iter().enumerate() {
            assert_eq!(r.unwrap().value, i as u64);
        }
    });
}

#[test]
fn ub_spawn_n_zero_and_spawn_many_empty() {
    watchdog(30, || {
        let p = Pool::<TestWorker>::builder().build().unwrap();
        assert!(p.spawn_n(&Spawn::ok("a"), 0).is_empty());
        assert!(p.spawn_many(&[]).is_empty());
        assert_eq!(p.num_workers(), 0);
    });
}

#[test]
fn ub_dropped_execute_async_after_start_reclaims_slot() {
    watchdog(60, || {
        let p = Pool::<TestWorker>::builder().queue_size(2).build().unwrap();
        p.spawn(&Spawn::ok("a")).unwrap();
        let gate = gate_path("ea");
        for _ in 0..3 {
            {
                let gc = Cmd::Gate(gate.to_string_lossy().into());
                let mut f1 = Box::pin(p.execute_async(&gc));
                let mut f2 = Box::pin(p.execute_async(&gc));
                let w = futures_util::task::noop_waker();
                let mut cx = std::task::Context::from_waker(&w);
                assert!(f1.as_mut().poll(&mut cx).is_pending());
                assert!(f2.as_mut().poll(&mut cx).is_pending());
                assert!(wait_until(10, || p.queued() <= 1));
            }
            std::fs::write(&gate, b"").unwrap();
            let h1 = p
                .submit_timeout(&Cmd::Echo(1), Duration::from_secs(20))
                .unwrap();
            let h2 = p
                .submit_timeout(&Cmd::Echo(2), Duration::from_secs(20))
                .unwrap();
            assert_eq!(h1.wait().unwrap().value, 1);
            assert_eq!(h2.wait().unwrap().value, 2);
            std::fs::remove_file(&gate).unwrap();
        }
    });
}

#[test]
fn ub_try_wait_after_deadline_and_is_finished() {
    watchdog(60, || {
        let p = pool1();
        let gate = gate_path("dl");
        let blocker = p.submit(&Cmd::Gate(gate.to_string_lossy().into())).unwrap();
        let h = p
            .task(&Cmd::Echo(1))
            .deadline(Instant::now() + Duration::from_millis(100))
            .submit()
            .unwrap();
        assert!(wait_until(10, || h.is_finished()));
        match h.try_wait() {
            Err(WaitTimeoutError::Task(TaskError::Timeout { worker, .. })) => {
                assert_eq!(worker, stateful_pool::NO_WORKER)
            }
            other => panic!("{:?}", other.map(|o| o.value)),
        }
        std::fs::write(&gate, b"").unwrap();
        blocker.wait().unwrap();
        let _ = std::fs::remove_file(&gate);
    });
}
