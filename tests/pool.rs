//! Behaviour of the pool API: spawn, execute, submit/wait/timeout/try, async on two executors,
//! errors and panics, large tasks and results, loans, cancellation, queue full, shutdown.

mod common;
use common::*;
use stateful_pool::{
    Pool, RestartPolicy, SpawnError, SpawnOptions, SubmitError, TaskError, WaitStrategy,
    WaitTimeoutError, WorkerError, WorkerState,
};
use std::sync::Arc;
use std::time::Duration;

stateful_pool::worker_hook!();

fn pool(workers: usize) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(64)
        .build()
        .expect("build pool");
    for i in 0..workers {
        let hello = pool.spawn(&Spawn::ok(&format!("w{i}"))).expect("spawn");
        assert!(
            hello.starts_with(&format!("w{i} ready as worker")),
            "{hello}"
        );
    }
    pool
}

#[test]
fn spawn_returns_the_spawn_value_and_execute_returns_the_result() {
    watchdog(60, || {
        let pool = pool(1);
        assert_eq!(pool.num_workers(), 1);
        let out = pool.execute(&Cmd::Echo(42)).unwrap();
        assert_eq!(out.value, 42);
        assert_eq!(out.worker, 0);
    });
}

#[test]
fn submit_spawn_starts_workers_concurrently_and_each_gets_its_own_args() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        let hs: Vec<_> = (0..3)
            .map(|i| pool.submit_spawn(&Spawn::ok(&format!("gpu{i}"))).unwrap())
            .collect();
        let mut hellos: Vec<String> = hs.into_iter().map(|h| h.wait().unwrap()).collect();
        hellos.sort();
        for (i, h) in hellos.iter().enumerate() {
            assert!(h.starts_with(&format!("gpu{i} ready")), "{h}");
        }
        assert_eq!(pool.num_workers(), 3);
        assert_eq!(pool.worker_pids().len(), 3);
        let outs = pool.spawn_many(&[Spawn::ok("a"), Spawn::ok("b")]);
        assert!(outs.iter().all(|o| o.is_ok()));
        assert_eq!(pool.num_workers(), 5);
    });
}

#[test]
fn handle_wait_timeout_and_try_wait() {
    watchdog(60, || {
        let pool = pool(1);
        let gate = gate_path("timeout");
        let h = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        let h = h
            .try_wait()
            .expect_err("not finished before the gate opens")
            .into_handle()
            .expect("a timeout hands the handle back");
        let h = match h.wait_timeout(Duration::from_millis(20)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            other => panic!("still not finished, yet: {other:?}"),
        };
        assert!(!h.is_finished());
        std::fs::write(&gate, b"").unwrap();
        let out = h.wait_timeout(Duration::from_secs(30)).expect("finished");
        assert_eq!(out.value, 1);
        let mut h = pool.submit(&Cmd::Echo(5)).unwrap();
        let out = loop {
            match h.try_wait() {
                Ok(r) => break r,
                Err(WaitTimeoutError::Timeout(back)) => {
                    std::thread::yield_now();
                    h = back;
                }
                Err(e) => panic!("{e}"),
            }
        };
        // A task that fails gives its error through the same shape.
        let failed = pool.submit(&Cmd::Fail("no".into())).unwrap();
        match failed.wait_timeout(Duration::from_secs(30)) {
            Err(WaitTimeoutError::Task(TaskError::Failed { message, .. })) => {
                assert!(message.contains("no"))
            }
            other => panic!("expected a task error, got {other:?}"),
        }
        assert_eq!(out.value, 5);
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn a_spawn_output_larger_than_the_spawn_area_is_a_clear_error_and_frees_the_seat() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .spawn_area_bytes(256)
            .worker_env(SPAWN_PAD_ENV, "4000")
            .build()
            .unwrap();
        for _ in 0..3 {
            match pool.spawn(&Spawn::ok("big")) {
                Err(SpawnError::OutputTooLarge {
                    worker: 0,
                    len,
                    max,
                }) => {
                    assert_eq!(max, 256);
                    assert!(len > 4000, "the archive's length: {len}");
                }
                other => panic!("expected OutputTooLarge, got {other:?}"),
            }
            // The seat is free again.
            assert_eq!(pool.num_workers(), 0);
            assert!(pool.worker_pids().is_empty());
        }
        let e = pool.spawn(&Spawn::ok("big")).unwrap_err().to_string();
        assert!(e.contains("spawn_area_bytes"), "{e}");
        // The same pool with room for the output (a pool of its own: the environment is the
        // pool's) serves.
        let roomy = Pool::<TestWorker>::builder()
            .max_workers(1)
            .spawn_area_bytes(8192)
            .worker_env(SPAWN_PAD_ENV, "4000")
            .build()
            .unwrap();
        let hello = roomy.spawn(&Spawn::ok("big")).unwrap();
        assert!(hello.len() > 4000);
        assert_eq!(roomy.execute(&Cmd::Echo(3)).unwrap().value, 3);
    });
}

#[test]
fn short_timeouts_do_not_spin_the_whole_caller_budget() {
    // A caller spin budget far longer than the timeouts: a wait or a submit with a zero or
    // short timeout must poll, not spin the budget out (a minute here) before it answers.
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(1)
            .caller_wait(WaitStrategy::SpinThenPark {
                spin: Duration::from_secs(60),
            })
            .build()
            .expect("build pool");
        pool.spawn(&Spawn::ok("w")).expect("spawn");
        let gate = gate_path("short-timeouts");
        let h = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        let t = std::time::Instant::now();
        let h = match h.wait_timeout(Duration::ZERO) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            other => panic!("not finished: {other:?}"),
        };
        let h = match h.wait_timeout(Duration::from_millis(10)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            other => panic!("not finished: {other:?}"),
        };
        // The queue's one slot is taken: a submit with a short wait times out.
        match pool.submit_timeout(&Cmd::Echo(1), Duration::from_millis(10)) {
            Err(SubmitError::Timeout) => {}
            other => panic!("expected a submit timeout, got {other:?}"),
        }
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "short timeouts took {:?}: they spun the caller's budget",
            t.elapsed()
        );
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(h.wait().unwrap().value, 1);
        assert_eq!(pool.execute(&Cmd::Echo(2)).unwrap().value, 2);
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn execute_errors_and_panics_reach_the_caller_and_the_worker_keeps_serving() {
    watchdog(60, || {
        // Keep the worker after a panic (the default replaces it: see tests/faults.rs).
        let pool = Pool::<TestWorker>::builder()
            .restart_on_panic(false)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("w0")).unwrap();
        match pool.execute(&Cmd::Fail("bad input 7".into())) {
            Err(TaskError::Failed { worker: 0, message }) => assert_eq!(message, "bad input 7"),
            other => panic!("expected Failed, got {other:?}"),
        }
        match pool.execute(&Cmd::Panic("boom 9".into())) {
            Err(TaskError::Panicked {
                worker: 0, message, ..
            }) => assert_eq!(message, "boom 9"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        // Same process, state intact: it counted both failed tasks.
        assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 2);
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
    });
}

#[test]
fn a_failing_spawn_step_fails_that_spawn_call_and_frees_the_seat() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .build()
            .unwrap();
        let e = pool
            .spawn(&Spawn {
                counters: String::new(),
                die_if_exists: String::new(),
                hang_ms: 0,
                tag: "x".into(),
                fail: true,
                panic: false,
                gate: String::new(),
            })
            .unwrap_err();
        match e {
            SpawnError::Failed { worker: 0, message } => assert_eq!(message, "refusing to start x"),
            other => panic!("expected Failed, got {other:?}"),
        }
        let e = pool
            .spawn(&Spawn {
                counters: String::new(),
                die_if_exists: String::new(),
                hang_ms: 0,
                tag: "y".into(),
                fail: false,
                panic: true,
                gate: String::new(),
            })
            .unwrap_err();
        match e {
            SpawnError::Panicked { message, .. } => assert_eq!(message, "spawn panic for y"),
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(pool.num_workers(), 0);
        // The single seat is free again.
        pool.spawn(&Spawn::ok("z")).unwrap();
        assert!(matches!(
            pool.spawn(&Spawn::ok("too many")),
            Err(SpawnError::NoCapacity { max: 1 })
        ));
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
    });
}

#[test]
fn async_api_works_on_a_plain_block_on() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        futures_executor::block_on(async {
            let hello = pool.spawn_async(&Spawn::ok("async")).await.unwrap();
            assert!(hello.starts_with("async ready"));
            assert_eq!(pool.execute_async(&Cmd::Echo(11)).await.unwrap().value, 11);
            let h = pool.submit(&Cmd::SleepMs(5)).unwrap();
            assert_eq!(h.await.unwrap().value, 0);
            let spawn = pool.submit_spawn(&Spawn::ok("second")).unwrap();
            assert!(spawn.await.unwrap().starts_with("second"));
        });
    });
}

#[test]
fn async_api_works_on_tokio_with_many_concurrent_futures() {
    watchdog(120, || {
        let pool = Arc::new(pool(2));
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .build()
            .unwrap();
        rt.block_on(async {
            let mut tasks = Vec::new();
            for i in 0..500u64 {
                let pool = pool.clone();
                tasks.push(tokio::spawn(async move {
                    let out = pool.execute_async(&Cmd::Echo(i)).await.unwrap();
                    assert_eq!(out.value, i);
                }));
            }
            for t in tasks {
                t.await.unwrap();
            }
            match pool.execute_async(&Cmd::Fail("async err".into())).await {
                Err(TaskError::Failed { message, .. }) => assert_eq!(message, "async err"),
                other => panic!("{other:?}"),
            }
        });
    });
}

#[test]
fn tasks_larger_than_a_slot_and_large_results_work() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .slot_bytes(256)
            .result_ring_bytes(8 << 20)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("big")).unwrap();
        let v: Vec<u8> = (0..3_000_000u32).map(|i| (i % 7) as u8).collect();
        let expect: u64 = v.iter().map(|&b| b as u64).sum();
        assert_eq!(pool.execute(&Cmd::SumVec(v)).unwrap().value, expect);
        // Many results, each a sizeable share of the ring, so the ring wraps several times.
        for round in 0..6 {
            let n = 1_500_000 + round * 1000;
            let out = pool.execute(&Cmd::MakeBytes(n)).unwrap();
            assert_eq!(out.bytes.len(), n as usize);
            assert!(
                out.bytes
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i % 251) as u8)
            );
        }
        // Read in place, without deserialising.
        let r = pool
            .submit(&Cmd::MakeBytes(4096))
            .unwrap()
            .wait_ref()
            .unwrap();
        assert_eq!(r.bytes.len(), 4096);
        assert_eq!(r.bytes[300], (300 % 251) as u8);
        drop(r);
    });
}

/// Copies into shared memory stream from a few MiB; above 64 MiB (the threshold's ceiling)
/// they stream on any x86-64 machine unless `STATEFUL_POOL_STREAM_COPY_MIN=off`, and the
/// worker here is told to stream from 1 MiB (the variable, through its own environment).
/// Tasks, results and loans filled with `Loan::copy_from_slice` arrive intact at such sizes,
/// with odd lengths (the copy's unaligned tail), checked with a position-dependent hash or byte
/// by byte, and the worker keeps serving small tasks afterwards.
#[test]
fn tasks_results_and_loans_cross_intact_at_streaming_sizes() {
    watchdog(180, || {
        let n = (64 << 20) + 77;
        let pool = Pool::<TestWorker>::builder()
            .task_arena_bytes(72 << 20)
            .result_ring_bytes(24 << 20)
            .build()
            .unwrap();
        pool.spawn_with(
            &Spawn::ok("stream"),
            &SpawnOptions::new().env("STATEFUL_POOL_STREAM_COPY_MIN", "1M"),
        )
        .unwrap();
        let v: Vec<u8> = (0..n as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8)
            .collect();
        let expect = hash_bytes(&v);
        assert_eq!(
            pool.execute(&Cmd::HashVec(v.clone())).unwrap().value,
            expect
        );
        let mut loan = pool.loan(n).unwrap();
        loan.copy_from_slice(&v);
        assert_eq!(loan.as_slice(), &v[..]);
        let out = pool
            .task(&Cmd::HashPayload)
            .payload(loan)
            .execute()
            .unwrap();
        assert_eq!(out.value, expect);
        drop(v);
        let n = (8 << 20) + 77;
        let out = pool.execute(&Cmd::MakeBytes(n as u32)).unwrap();
        assert_eq!(out.bytes.len(), n);
        assert!(
            out.bytes
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8)
        );
        for k in 0..50 {
            assert_eq!(pool.execute(&Cmd::Echo(k)).unwrap().value, k);
        }
    });
}

#[test]
#[should_panic(expected = "source length differs")]
fn filling_a_loan_from_a_slice_of_another_length_panics() {
    let pool = Pool::<TestWorker>::builder().build().unwrap();
    let mut loan = pool.loan(100).unwrap();
    loan.copy_from_slice(&[0u8; 99]);
}

#[test]
fn oversized_tasks_and_results_get_clear_errors() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .slot_bytes(128)
            .max_task_bytes(1 << 20)
            .result_ring_bytes(64 << 10)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("small")).unwrap();
        match pool.submit(&Cmd::SumVec(vec![1; 2 << 20])) {
            Err(SubmitError::PayloadTooLarge { len, max }) => {
                assert!(len > 2 << 20);
                assert_eq!(max, 1 << 20);
            }
            other => panic!("expected PayloadTooLarge, got {other:?}"),
        }
        assert!(matches!(
            pool.loan(2 << 20),
            Err(SubmitError::PayloadTooLarge { .. })
        ));
        match pool.execute(&Cmd::MakeBytes(100_000)) {
            Err(TaskError::ResultTooLarge {
                worker: 0,
                len,
                max,
            }) => {
                assert!(len > 100_000);
                assert_eq!(max, (32 << 10) - 32);
            }
            other => panic!("expected ResultTooLarge, got {other:?}"),
        }
        // The worker is fine.
        assert_eq!(pool.execute(&Cmd::Echo(8)).unwrap().value, 8);
    });
}

#[test]
fn a_loaned_16_mib_payload_is_read_in_place() {
    watchdog(60, || {
        let pool = pool(1);
        let mut loan = pool.loan(16 << 20).unwrap();
        assert_eq!(loan.len(), 16 << 20);
        assert_eq!(loan.as_mut_slice().as_ptr() as usize % 64, 0);
        for (i, b) in loan.as_mut_slice().iter_mut().enumerate() {
            *b = (i / 4096 % 200) as u8;
        }
        let expect: u64 = (0..(16 << 20) / 4096).map(|k| (k % 200) as u64).sum();
        let out = pool.task(&Cmd::SumPayload).payload(loan).execute().unwrap();
        assert_eq!(out.value, expect);
        assert_eq!(
            u64::from_le_bytes(out.bytes[..8].try_into().unwrap()),
            16 << 20
        );
        // An unsent loan gives its space back; the arena serves the next loan.
        drop(pool.loan(32 << 20).unwrap());
        let loan = pool.loan(48 << 20).unwrap();
        drop(loan);
    });
}

#[test]
fn the_queue_bound_is_enforced_try_submit_fails_and_submit_waits() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().queue_size(4).build().unwrap();
        pool.spawn(&Spawn::ok("q")).unwrap();
        let gate = gate_path("full");
        let g = gate.to_string_lossy().to_string();
        let hs: Vec<_> = (0..4)
            .map(|_| pool.submit(&Cmd::Gate(g.clone())).unwrap())
            .collect();
        assert_eq!(
            pool.try_submit(&Cmd::Echo(1)).unwrap_err(),
            SubmitError::QueueFull
        );
        assert_eq!(
            pool.submit_timeout(&Cmd::Echo(1), Duration::from_millis(10))
                .unwrap_err(),
            SubmitError::Timeout
        );
        std::thread::scope(|s| {
            let blocked = s.spawn(|| pool.submit(&Cmd::Echo(77)).unwrap().wait().unwrap());
            std::fs::write(&gate, b"").unwrap();
            for h in hs {
                assert_eq!(h.wait().unwrap().value, 1);
            }
            assert_eq!(blocked.join().unwrap().value, 77);
        });
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn dropping_a_handle_before_the_task_starts_means_it_never_runs() {
    watchdog(60, || {
        let pool = pool(1);
        let gate = gate_path("cancel");
        let g = gate.to_string_lossy().to_string();
        let blocker = pool.submit(&Cmd::Gate(g)).unwrap();
        for i in 0..10 {
            drop(pool.submit(&Cmd::Echo(i)).unwrap());
        }
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(blocker.wait().unwrap().value, 1);
        // Only the gate task and this one ran: the ten dropped tasks were skipped.
        assert_eq!(pool.execute(&Cmd::Count).unwrap().value, 1);
        // Dropped after start: the result is discarded and the slot reused (64 slots, 200 tasks).
        for i in 0..200 {
            drop(pool.submit(&Cmd::Echo(i)).unwrap());
        }
        assert_eq!(pool.execute(&Cmd::Echo(5)).unwrap().value, 5);
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn shutdown_finishes_queued_tasks_and_then_rejects_new_work() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .wait_strategy(WaitStrategy::Park)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        let hs: Vec<_> = (0..20)
            .map(|_| pool.submit(&Cmd::SleepMs(5)).unwrap())
            .collect();
        let pids: Vec<u32> = pool.worker_pids().iter().map(|p| p.1).collect();
        pool.shutdown();
        for h in hs {
            assert_eq!(
                h.wait().unwrap().value,
                0,
                "queued tasks complete on shutdown"
            );
        }
        for pid in pids {
            // Reaped: the pid no longer names our child.
            let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
            assert!(!stat.contains(") Z "), "worker {pid} left a zombie");
        }
    });
}

#[test]
fn a_pool_is_shared_by_reference_across_threads() {
    watchdog(60, || {
        let pool = pool(2);
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let pool = &pool;
                s.spawn(move || {
                    for i in 0..200 {
                        let v = t * 1000 + i;
                        assert_eq!(pool.execute(&Cmd::Echo(v)).unwrap().value, v);
                    }
                });
            }
        });
    });
}

#[test]
fn spawns_racing_shutdown_all_resolve() {
    watchdog(120, || {
        for _ in 0..3 {
            let pool = Pool::<TestWorker>::builder()
                .max_workers(4)
                .build()
                .unwrap();
            let handles: Vec<_> = (0..4)
                .map(|i| pool.submit_spawn(&Spawn::ok(&format!("r{i}"))).unwrap())
                .collect();
            pool.shutdown();
            for h in handles {
                match h.wait() {
                    Ok(hello) => assert!(hello.starts_with('r')),
                    Err(SpawnError::Shutdown) => {}
                    Err(e) => panic!("unexpected spawn outcome: {e}"),
                }
            }
        }
    });
}

#[test]
fn spawn_options_give_a_worker_its_gpus_and_environment_across_restarts() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .worker_env("FROM_POOL", "p")
            .build()
            .unwrap();
        let opts = SpawnOptions::new()
            .gpus([3, 1])
            .visible_devices_only(true)
            .env("FROM_SPAWN", "s");
        if cfg!(feature = "cuda") {
            // With the cuda feature, GPUs 3 and 1 must exist: here that is a spawn error.
            let e = pool.spawn_with(&Spawn::ok("g"), &opts).unwrap_err();
            assert!(matches!(e, SpawnError::Failed { .. }), "{e}");
            return;
        }
        pool.spawn_with(&Spawn::ok("g"), &opts).unwrap();
        let check = |pool: &Pool<TestWorker>| {
            let ids = pool.execute(&Cmd::GpuIds).unwrap();
            assert_eq!(ids.bytes, vec![3, 1], "gpu_ids in the worker's order");
            assert_eq!(ids.value, 0, "nothing pinned without the cuda feature");
            let env = |k: &str| pool.execute(&Cmd::Env(k.into())).unwrap();
            assert_eq!(env("CUDA_VISIBLE_DEVICES").bytes, b"3,1");
            assert_eq!(env("FROM_SPAWN").bytes, b"s");
            assert_eq!(env("FROM_POOL").bytes, b"p");
            assert_eq!(env("STATEFUL_POOL_GPUS").value, 0, "consumed at start-up");
        };
        check(&pool);
        // A restarted worker keeps its options.
        let pid = pool.execute(&Cmd::Pid).unwrap().value;
        let _ = pool.execute(&Cmd::KillSelf);
        assert!(wait_until(30, || pool
            .worker_pids()
            .iter()
            .any(|&(_, p)| p as u64 != pid)));
        check(&pool);
        // A worker spawned without options has none.
        let plain = Pool::<TestWorker>::new().unwrap();
        plain.spawn(&Spawn::ok("plain")).unwrap();
        assert!(plain.execute(&Cmd::GpuIds).unwrap().bytes.is_empty());
        let inherited = std::env::var_os("CUDA_VISIBLE_DEVICES").is_some() as u64;
        assert_eq!(
            plain
                .execute(&Cmd::Env("CUDA_VISIBLE_DEVICES".into()))
                .unwrap()
                .value,
            inherited
        );
    });
}

#[test]
fn a_running_task_sees_its_cancellation() {
    watchdog(120, || {
        let pool = pool(1);
        let started = gate_path("cancel-started");
        let h = pool
            .submit(&Cmd::UntilCancelled(started.to_string_lossy().into()))
            .unwrap();
        assert!(wait_until(60, || started.exists()));
        h.cancel();
        // It ran (it had started), saw the cancellation and returned early.
        assert_eq!(h.wait().unwrap().value, 1);
        let _ = std::fs::remove_file(started);
    });
}

#[test]
fn a_task_for_a_pool_with_no_worker_coming_fails_at_once() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        // Nothing spawned: a clear error, not a wait forever.
        assert!(matches!(
            pool.execute(&Cmd::Echo(1)),
            Err(TaskError::NoWorkers)
        ));
        // Tasks queued while the only spawn is starting wait for it.
        let gate = gate_path("no-workers-spawn");
        let spawning = pool
            .submit_spawn(&Spawn {
                gate: gate.to_string_lossy().into(),
                ..Spawn::ok("slow")
            })
            .unwrap();
        let queued = pool.submit(&Cmd::Echo(2)).unwrap();
        std::fs::write(&gate, b"").unwrap();
        spawning.wait().unwrap();
        assert_eq!(queued.wait().unwrap().value, 2);
        // The worker serves: a failed second spawn takes nothing away.
        assert!(
            pool.spawn(&Spawn {
                fail: true,
                ..Spawn::ok("bad")
            })
            .is_err()
        );
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);

        // A pool whose only spawn fails: the tasks queued meanwhile are answered NoWorkers.
        let lone = Pool::<TestWorker>::builder().build().unwrap();
        let gate2 = gate_path("no-workers-doomed");
        let spawning = lone
            .submit_spawn(&Spawn {
                gate: gate2.to_string_lossy().into(),
                fail: true,
                ..Spawn::ok("doomed")
            })
            .unwrap();
        let queued: Vec<_> = (0..3)
            .map(|i| lone.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        std::fs::write(&gate2, b"").unwrap();
        assert!(spawning.wait().is_err());
        for h in queued {
            assert_eq!(h.wait(), Err(TaskError::NoWorkers));
        }
        for g in [gate, gate2] {
            let _ = std::fs::remove_file(g);
        }
        assert!(matches!(
            lone.submit(&Cmd::Echo(9)),
            Err(SubmitError::NoWorkers)
        ));
    });
}

#[test]
fn workers_can_be_retired_and_replaced_without_losing_tasks() {
    watchdog(120, || {
        let pool = pool(2);
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid).collect();
        // A task in progress on some worker while worker 0 is retired.
        let started = gate_path("retire-started");
        let long = pool
            .submit(&Cmd::UntilCancelled(started.to_string_lossy().into()))
            .unwrap();
        assert!(wait_until(60, || started.exists()));
        let pool = Arc::new(pool);
        let retiring = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.retire_worker(0))
        };
        // Meanwhile tasks keep coming; every one is served (once the long task ends, since
        // the worker that stays may be the one running it).
        let handles: Vec<_> = (0..20)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        long.cancel();
        assert_eq!(long.wait().unwrap().value, 1);
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
        retiring.join().unwrap().unwrap();
        assert_eq!(pool.num_workers(), 1);
        assert_eq!(pool.stats().worker_deaths, 0, "a retirement is not a death");
        assert!(wait_until(30, || process_gone(pids[0])));
        // Retiring a seat with no worker is a clear error.
        assert!(matches!(
            pool.retire_worker(0),
            Err(WorkerError::NoSuchWorker { index: 0 })
        ));
        assert!(matches!(
            pool.retire_worker(999),
            Err(WorkerError::NoSuchWorker { index: 999 })
        ));
        // A rolling restart of worker 1: the new one serves before the old one leaves.
        let hello = pool.replace_worker(1).unwrap();
        assert!(hello.contains("ready as worker 0"), "{hello}");
        assert_eq!(pool.num_workers(), 1);
        assert!(wait_until(30, || process_gone(pids[1])));
        assert_eq!(pool.execute(&Cmd::Echo(7)).unwrap().value, 7);
        // Retiring the last worker: new work is refused at once.
        pool.retire_worker(0).unwrap();
        assert!(matches!(
            pool.execute(&Cmd::Echo(8)),
            Err(TaskError::NoWorkers)
        ));
        let _ = std::fs::remove_file(started);
    });
}

stateful_pool::task_fn! {
    /// A stateless task function: the length of a string, or an error for an empty one.
    fn StrLen(s: String, ctx) -> u64 {
        if s.is_empty() {
            return Err(format!("task {} is empty", ctx.task_id()).into());
        }
        Ok(s.as_str().len() as u64)
    }
}

#[test]
fn a_stateless_function_serves_as_a_worker() {
    watchdog(60, || {
        let pool = Pool::<stateful_pool::FnWorker<StrLen>>::builder()
            .build()
            .unwrap();
        for r in pool.spawn_n(&(), 2) {
            r.unwrap();
        }
        assert_eq!(pool.execute(&"hello".to_string()).unwrap(), 5);
        assert!(matches!(
            pool.execute(&String::new()),
            Err(TaskError::Failed { .. })
        ));
        let total: u64 = pool
            .map((0..50).map(|i| "x".repeat(i)).filter(|s| !s.is_empty()))
            .map(|r| r.unwrap())
            .sum();
        assert_eq!(total, (1..50).sum::<usize>() as u64);
    });
}

/// The pool stops counting a dead worker as serving before it answers any of its tasks: a
/// caller that got `WorkerDied` (or a broadcast that killed every worker) never sees the dead
/// worker in `num_workers` or `workers` as ready, and a broadcast right after does not offer
/// to it. (Found in a full local test run: a broadcast sent right after one that killed all
/// three workers was offered to a seat whose death was still being handled, and came back
/// `Cancelled`.) The event hook holds the supervisor right after the answers, on the
/// `WorkerDied` event, to keep that moment open for as long as the test looks.
#[test]
fn a_dead_worker_stops_counting_before_its_task_is_answered() {
    watchdog(120, || {
        let held = Arc::new(std::sync::Mutex::new(()));
        let hook_lock = held.clone();
        let pool = Pool::<TestWorker>::builder()
            .restart_policy(RestartPolicy::never())
            .on_event(move |e| {
                if matches!(e, stateful_pool::PoolEvent::WorkerDied { .. }) {
                    drop(hook_lock.lock().unwrap_or_else(|e| e.into_inner()));
                }
            })
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("w")).unwrap();
        let guard = held.lock().unwrap();
        assert!(matches!(
            pool.execute(&Cmd::KillSelf),
            Err(TaskError::WorkerDied { .. })
        ));
        assert_eq!(pool.num_workers(), 0);
        assert_ne!(pool.workers()[0].state, WorkerState::Ready);
        drop(guard);
        assert!(wait_until(30, || pool.workers()[0].state == WorkerState::Failed));
        assert!(pool.broadcast(&Cmd::Echo(1)).is_empty());
    });
}

#[test]
fn a_broadcast_reaches_every_serving_worker_once() {
    watchdog(120, || {
        let pool = pool(3);
        let answers = pool.broadcast(&Cmd::Pid);
        assert_eq!(answers.len(), 3);
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid).collect();
        for (i, r) in &answers {
            let o = r.as_ref().unwrap();
            assert_eq!(o.worker as usize, *i, "answered by the worker it was for");
            assert_eq!(o.value as u32, pids[*i]);
        }
        // A busy worker answers after its current task; the others at once.
        let started = gate_path("broadcast-busy");
        let long = pool
            .submit(&Cmd::UntilCancelled(started.to_string_lossy().into()))
            .unwrap();
        assert!(wait_until(60, || started.exists()));
        let pool = Arc::new(pool);
        let b = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.broadcast(&Cmd::Echo(5)))
        };
        long.cancel();
        assert_eq!(long.wait().unwrap().value, 1);
        let answers = b.join().unwrap();
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|(_, r)| r.as_ref().unwrap().value == 5));
        // Workers that die on it answer WorkerDied (never retried elsewhere), then serve again.
        let answers = pool.broadcast(&Cmd::KillSelf);
        assert!(
            answers
                .iter()
                .all(|(_, r)| matches!(r, Err(TaskError::WorkerDied { .. })))
        );
        assert!(wait_until(60, || pool.num_workers() == 3));
        let answers = pool.broadcast(&Cmd::Echo(6));
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|(_, r)| r.as_ref().unwrap().value == 6));
        let _ = std::fs::remove_file(started);
    });
}

#[test]
fn every_close_returns_only_once_the_workers_are_stopped() {
    watchdog(120, || {
        let pool = Arc::new(pool(2));
        let pids: Vec<u32> = pool.workers().iter().map(|w| w.pid).collect();
        let closers: Vec<_> = (0..4)
            .map(|_| {
                let pool = pool.clone();
                let pids = pids.clone();
                std::thread::spawn(move || {
                    pool.close();
                    // Whichever call ran the shutdown, every caller sees it finished.
                    assert!(pids.iter().all(|&p| process_gone(p)));
                    assert!(matches!(
                        pool.submit(&Cmd::Echo(1)),
                        Err(SubmitError::Shutdown)
                    ));
                })
            })
            .collect();
        for c in closers {
            c.join().unwrap();
        }
    });
}

#[test]
fn cpu_sets_pin_workers_before_they_start_and_a_disallowed_cpu_is_refused() {
    watchdog(120, || {
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        // One worker per allowed CPU (at most two), started in parallel, each pinned.
        let sets: Vec<Vec<usize>> = allowed.iter().take(2).map(|&c| vec![c]).collect();
        let handles: Vec<_> = sets
            .iter()
            .map(|set| {
                pool.submit_spawn_with(
                    &Spawn::ok("pinned"),
                    &SpawnOptions::new()
                        .cpus(set.iter().copied())
                        .thread_env_from_cpus(true),
                )
                .unwrap()
            })
            .collect();
        for h in handles {
            h.wait().unwrap();
        }
        for _ in 0..2 {
            // Every worker reads its own affinity: exactly its set. Its thread pools are told
            // the set's size.
            for w in pool.workers() {
                let out = pool.broadcast(&Cmd::Cpus);
                let (_, r) = out.iter().find(|(i, _)| *i == w.index).unwrap();
                let cpus: Vec<usize> = r
                    .as_ref()
                    .unwrap()
                    .bytes
                    .iter()
                    .map(|&c| c as usize)
                    .collect();
                assert_eq!(cpus.len(), 1, "pinned to one CPU: {cpus:?}");
                assert!(sets.contains(&cpus), "{cpus:?} is one of {sets:?}");
            }
            let env = pool.broadcast(&Cmd::Env("OMP_NUM_THREADS".into()));
            assert!(env.iter().all(|(_, r)| r.as_ref().unwrap().bytes == b"1"));
            // A restarted worker keeps its set.
            let pid = pool.worker_pids()[0].1;
            // SAFETY: kill has no memory-safety preconditions; `pid` is our worker.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert!(wait_until(60, || process_gone(pid)));
            assert!(wait_until(60, || {
                let pids = pool.worker_pids();
                pids.len() == sets.len() && pids.iter().all(|&(_, p)| p != pid)
            }));
        }
        // A CPU this process may not use: refused before anything starts, naming it.
        let bad = 4000;
        assert!(!allowed.contains(&bad));
        match pool.spawn_with(
            &Spawn::ok("bad"),
            &SpawnOptions::new().cpus([allowed[0], bad]),
        ) {
            Err(e @ SpawnError::CpuNotAllowed { cpu: 4000, .. }) => {
                assert!(e.to_string().contains("CPU 4000"), "{e}")
            }
            other => panic!("expected CpuNotAllowed, got {other:?}"),
        }
        assert_eq!(pool.num_workers(), sets.len());
        // No set: not pinned.
        let free = Pool::<TestWorker>::builder().build().unwrap();
        free.spawn_with(&Spawn::ok("free"), &SpawnOptions::new().cpus([]))
            .unwrap();
        let cpus = free.execute(&Cmd::Cpus).unwrap().bytes;
        assert_eq!(cpus.len(), allowed.len().min(256));
    });
}

/// A broadcast offered to a worker that is leaving (retired: it has left its loop and is
/// running its state's destructor) is answered `Cancelled`, as the docs say ("one that leaves
/// without taking it"), not `WorkerDied`: the worker never took it, and a retirement is not a
/// death.
/// Broadcasts, from another thread, a step that creates the file `ran` on each worker that
/// runs it; the thread returns the broadcast's outcomes.
fn broadcast_marking(
    pool: &Arc<Pool<TestWorker>>,
    ran: &std::path::Path,
) -> std::thread::JoinHandle<Vec<(usize, Result<Out, TaskError>)>> {
    let pool = pool.clone();
    let ran = ran.to_string_lossy().into_owned();
    std::thread::spawn(move || {
        pool.broadcast(&Cmd::Step {
            id: 1,
            started: ran,
            gate: String::new(),
            fail: false,
        })
    })
}

#[test]
fn a_broadcast_offered_to_a_retiring_worker_is_cancelled_not_a_death() {
    watchdog(120, || {
        let gate = gate_path("bcast-drop");
        let counters = Counters::new("bcast-retire", 4);
        let pool = Pool::<TestWorker>::builder()
            .worker_env(DROP_GATE_ENV, gate.to_string_lossy().as_ref())
            .build()
            .unwrap();
        let args = Spawn {
            counters: counters.path.to_string_lossy().into(),
            ..Spawn::ok("w")
        };
        for r in pool.spawn_many([&args, &args]) {
            r.unwrap();
        }
        let pool = Arc::new(pool);
        let retiring = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.retire_worker(0))
        };
        // Worker 0 has left its loop (its seat still counts as serving until it exits).
        let dropping = format!("{}.dropping-0", gate.to_string_lossy());
        assert!(wait_until(60, || std::path::Path::new(&dropping).exists()));
        let ran = gate_path("bcast-ran");
        let broadcast = broadcast_marking(&pool, &ran);
        // Worker 1 ran it: offers go out in seat order, so worker 0's was made before.
        assert!(wait_until(60, || ran.exists()));
        let release = format!("{}.release", gate.to_string_lossy());
        std::fs::write(&release, b"").unwrap();
        let results = broadcast.join().unwrap();
        retiring.join().unwrap().unwrap();
        assert_eq!(results.len(), 2, "{results:?}");
        for (i, r) in results {
            match i {
                0 => assert!(matches!(r, Err(TaskError::Cancelled)), "{r:?}"),
                _ => assert_eq!(r.unwrap().value, 3),
            }
        }
        let stats = pool.stats();
        assert_eq!(stats.worker_deaths, 0, "a retirement is not a death");
        assert_eq!(stats.tasks_died, 0);
        // The pool's own shutdown drops worker 1's state too: let it through.
        drop(pool);
        for p in [
            dropping,
            release,
            format!("{}.dropping-1", gate.to_string_lossy()),
        ] {
            let _ = std::fs::remove_file(p);
        }
        let _ = std::fs::remove_file(ran);
    });
}

/// A worker killed for another task's timeout while a broadcast was offered to it: the
/// broadcast is answered `WorkerDied` (it is for that worker), never put on the shared queue,
/// where the restarted worker (or any other) would run it.
#[test]
fn a_broadcast_offered_to_a_worker_killed_for_a_timeout_is_not_requeued() {
    watchdog(120, || {
        let pool = Arc::new(Pool::<TestWorker>::builder().build().unwrap());
        pool.spawn(&Spawn::ok("w")).unwrap();
        let gate = gate_path("bcast-timeout");
        // Runs until it is killed (its gate never opens within the timeout).
        let hung = pool
            .task(&Cmd::Gate(gate.to_string_lossy().into()))
            .timeout(Duration::from_secs(4))
            .submit()
            .unwrap();
        assert!(wait_until(60, || pool.queued() == 0), "the worker took it");
        let ran = gate_path("bcast-timeout-ran");
        let broadcast = broadcast_marking(&pool, &ran);
        assert!(matches!(hung.wait(), Err(TaskError::Timeout { .. })));
        let results = broadcast.join().unwrap();
        assert_eq!(results.len(), 1, "{results:?}");
        assert!(
            matches!(results[0], (0, Err(TaskError::WorkerDied { .. }))),
            "{results:?}"
        );
        // The restarted worker serves, and never ran the broadcast.
        assert_eq!(pool.execute(&Cmd::Echo(7)).unwrap().value, 7);
        let ran_anyway = ran.exists();
        let _ = std::fs::remove_file(&ran);
        assert!(!ran_anyway, "the broadcast ran after its worker was killed");
        let s = pool.stats();
        assert_eq!((s.tasks_timed_out, s.tasks_retried), (1, 0));
        let _ = std::fs::remove_file(gate);
    });
}

/// A broadcast to more workers than there are free slots (a small queue, or slots held by the
/// caller's own uncollected handles) collects its earlier offers to make room instead of
/// waiting for a slot only it could free.
#[test]
fn a_broadcast_to_more_workers_than_free_slots_completes() {
    /// Three workers on a queue of `queue` slots.
    fn three_on(queue: usize) -> Pool<TestWorker> {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(queue)
            .max_workers(3)
            .build()
            .unwrap();
        for r in pool.spawn_n(&Spawn::ok("bc"), 3) {
            r.unwrap();
        }
        pool
    }
    watchdog(120, || {
        let pool = three_on(1);
        let answers = pool.broadcast(&Cmd::Echo(7));
        let seats: Vec<usize> = answers.iter().map(|(i, _)| *i).collect();
        assert_eq!(seats, [0, 1, 2]);
        assert!(answers.iter().all(|(_, r)| r.as_ref().unwrap().value == 7));
        // One of two slots held by the caller's own uncollected handle.
        let pool = three_on(2);
        let held = pool.submit(&Cmd::Echo(1)).unwrap();
        let answers = pool.broadcast(&Cmd::Echo(8));
        assert_eq!(answers.len(), 3);
        assert!(answers.iter().all(|(_, r)| r.as_ref().unwrap().value == 8));
        assert_eq!(held.wait().unwrap().value, 1);
    });
}
