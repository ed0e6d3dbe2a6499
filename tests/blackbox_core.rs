// Written by an independent black-box tester from the issues and docs (2026-12-07).
//! Black-box tests: core API, sizes and limits, shutdown, spawn errors.
mod common;
use common::*;
use stateful_pool::{
    BuildError, Pool, SpawnError, SubmitError, TaskError, WaitTimeoutError, WorkerError,
};
use std::sync::Arc;
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

fn archived_len<T>(v: &T) -> usize
where
    T: for<'a> rkyv::Serialize<
            rkyv::api::high::HighSerializer<
                rkyv::util::AlignedVec,
                rkyv::ser::allocator::ArenaHandle<'a>,
                rkyv::rancor::Error,
            >,
        >,
{
    rkyv::to_bytes::<rkyv::rancor::Error>(v).unwrap().len()
}

fn test_pool(workers: usize) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(32)
        .build()
        .unwrap();
    for i in 0..workers {
        pool.spawn(&Spawn::ok(&format!("w{i}"))).unwrap();
    }
    pool
}

#[test]
fn ub_result_size_boundary_matches_documented_bound() {
    watchdog(120, || {
        let ring = 64 * 1024;
        let pool = Pool::<TinyWorker>::builder()
            .queue_size(8)
            .result_ring_bytes(ring)
            .build()
            .unwrap();
        pool.spawn(&()).unwrap();
        let max = ring / 2 - 32;
        // find n around the boundary
        let mut checked = 0;
        for n in (max - 24)..(max + 24) {
            let alen = archived_len(&tiny_output(n as u64));
            let r = pool.execute(&(n as u64));
            if alen <= max {
                let v =
                    r.unwrap_or_else(|e| panic!("n={n} archive {alen} <= max {max} failed: {e}"));
                assert_eq!(v, tiny_output(n as u64));
            } else {
                match r {
                    Err(TaskError::ResultTooLarge { len, max: m, .. }) => {
                        assert_eq!(m, max, "documented max");
                        assert_eq!(len, alen, "len is the archive length");
                    }
                    other => panic!("n={n} archive {alen} > {max}: {other:?}"),
                }
            }
            checked += 1;
        }
        assert_eq!(checked, 48);
        // worker still serves
        assert_eq!(pool.execute(&5u64).unwrap(), tiny_output(5));
    });
}

#[test]
fn ub_default_result_bound_is_2mib_minus_32() {
    watchdog(120, || {
        let pool = Pool::<TinyWorker>::builder().queue_size(4).build().unwrap();
        pool.spawn(&()).unwrap();
        let max = 2 * 1024 * 1024 - 32;
        // largest n whose archive fits
        let mut n = max - 8;
        while archived_len(&tiny_output(n as u64 + 1)) <= max {
            n += 1;
        }
        assert_eq!(pool.execute(&(n as u64)).unwrap().len(), n);
        match pool.execute(&(n as u64 + 8)) {
            Err(TaskError::ResultTooLarge { max: m, .. }) => assert_eq!(m, max),
            other => panic!("{:?}", other.map(|v| v.len())),
        }
    });
}

#[test]
fn ub_task_size_boundary_and_max_task_bytes() {
    watchdog(120, || {
        let limit = 8192;
        let pool = Pool::<TestWorker>::builder()
            .queue_size(8)
            .max_task_bytes(limit)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        assert_eq!(pool.max_task_bytes(), limit);
        for n in (limit - 40)..(limit + 8) {
            let t = Cmd::SumVec(vec![1u8; n]);
            let alen = archived_len(&t);
            let r = pool.execute(&t);
            if alen <= limit {
                assert_eq!(r.unwrap().value, n as u64, "n={n}");
            } else {
                match r {
                    Err(TaskError::Submit(SubmitError::PayloadTooLarge { len, max })) => {
                        assert_eq!(max, limit);
                        assert_eq!(len, alen);
                    }
                    other => panic!("n={n} alen={alen}: {other:?}"),
                }
            }
            // try_submit and submit agree
            let r2 = pool.try_submit(&t);
            assert_eq!(r2.is_ok(), alen <= limit, "try_submit n={n}");
            if let Ok(h) = r2 {
                h.wait().unwrap();
            }
        }
        // loans
        let l = pool.loan(limit).unwrap();
        assert_eq!(l.len(), limit);
        drop(l);
        match pool.loan(limit + 1) {
            Err(SubmitError::PayloadTooLarge { len, max }) => {
                assert_eq!(len, limit + 1);
                assert_eq!(max, limit);
            }
            other => panic!("{:?}", other.map(|l| l.len())),
        }
        match pool.try_loan(limit + 1) {
            Err(SubmitError::PayloadTooLarge { .. }) => {}
            other => panic!("{:?}", other.map(|l| l.len())),
        }
    });
}

#[test]
fn ub_no_arena_means_loans_fail_payload_too_large() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(8)
            .task_arena_bytes(0)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        match pool.loan(16) {
            Err(SubmitError::PayloadTooLarge { .. }) => {}
            other => panic!("{:?}", other.map(|l| l.len())),
        }
        // a task that does not fit the slot gets PayloadTooLarge
        let big = Cmd::SumVec(vec![1u8; 4096]);
        match pool.execute(&big) {
            Err(TaskError::Submit(SubmitError::PayloadTooLarge { .. })) => {}
            other => panic!("{other:?}"),
        }
        // a small one works
        assert_eq!(pool.execute(&Cmd::SumVec(vec![2u8; 10])).unwrap().value, 20);
    });
}

#[test]
fn ub_zero_length_loan_and_payload() {
    watchdog(60, || {
        let pool = test_pool(1);
        let loan = pool.loan(0).expect("zero-length loan");
        assert!(loan.is_empty());
        let out = pool.task(&Cmd::SumPayload).payload(loan).execute().unwrap();
        assert_eq!(out.value, 0);
        assert_eq!(u64::from_le_bytes(out.bytes[..8].try_into().unwrap()), 0);
    });
}

#[test]
fn ub_invalid_builder_settings_are_build_errors() {
    watchdog(60, || {
        for (name, b) in [
            ("queue_size(0)", Pool::<TestWorker>::builder().queue_size(0)),
            (
                "max_workers(0)",
                Pool::<TestWorker>::builder().max_workers(0),
            ),
        ] {
            match b.build() {
                Err(BuildError::InvalidConfig(_)) => {}
                Err(e) => panic!("{name}: other error {e}"),
                Ok(p) => {
                    // acceptable only if it is usable
                    let r = p.spawn(&Spawn::ok("x"));
                    panic!("{name}: build succeeded; spawn gives {r:?}");
                }
            }
        }
    });
}

#[test]
fn ub_no_capacity_and_args_too_large() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .spawn_area_bytes(4096)
            .build()
            .unwrap();
        let mut big = Spawn::ok("x");
        big.tag = "t".repeat(10_000);
        match pool.spawn(&big) {
            Err(SpawnError::ArgsTooLarge { len, max }) => {
                assert!(len > max, "{len} {max}");
            }
            other => panic!("{other:?}"),
        }
        pool.spawn(&Spawn::ok("a")).unwrap();
        match pool.spawn(&Spawn::ok("b")) {
            Err(SpawnError::NoCapacity { max }) => assert_eq!(max, 1),
            other => panic!("{other:?}"),
        }
        assert_eq!(pool.num_workers(), 1);
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
    });
}

#[test]
fn ub_after_close_every_verb_says_shutdown_and_handles_outlive() {
    watchdog(60, || {
        let pool = test_pool(1);
        let h = pool.submit(&Cmd::Echo(9)).unwrap();
        pool.close();
        assert!(pool.is_closing());
        assert!(matches!(
            pool.submit(&Cmd::Echo(1)),
            Err(SubmitError::Shutdown)
        ));
        assert!(matches!(
            pool.try_submit(&Cmd::Echo(1)),
            Err(SubmitError::Shutdown)
        ));
        assert!(matches!(
            pool.submit_timeout(&Cmd::Echo(1), Duration::from_millis(1)),
            Err(SubmitError::Shutdown)
        ));
        match pool.execute(&Cmd::Echo(1)) {
            Err(TaskError::Submit(SubmitError::Shutdown)) => {}
            other => panic!("execute after close: {other:?}"),
        }
        assert!(matches!(pool.loan(8), Err(SubmitError::Shutdown)));
        assert!(matches!(pool.try_loan(8), Err(SubmitError::Shutdown)));
        match pool.spawn(&Spawn::ok("late")) {
            Err(SpawnError::Shutdown) => {}
            other => panic!("spawn after close: {other:?}"),
        }
        match pool.retire_worker(0) {
            Err(WorkerError::Shutdown) | Err(WorkerError::NoSuchWorker { .. }) => {}
            other => panic!("retire after close: {other:?}"),
        }
        drop(pool);
        assert_eq!(h.wait().unwrap().value, 9);
    });
}

#[test]
fn ub_shutdown_finishes_queued_and_shutdown_now_cancels_them() {
    watchdog(120, || {
        // graceful
        let gate = gate_path("g1");
        let pool = test_pool(1);
        let first = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        let queued: Vec<_> = (0..10)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        let g = gate.clone();
        let opener = std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            std::fs::write(&g, b"").unwrap();
        });
        pool.shutdown();
        opener.join().unwrap();
        assert_eq!(first.wait().unwrap().value, 1);
        for (i, h) in queued.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
        let _ = std::fs::remove_file(&gate);

        // immediate
        let gate = gate_path("g2");
        let pool = test_pool(1);
        let started = gate_path("s2");
        let first = pool
            .submit(&Cmd::Step {
                id: 0,
                started: started.to_string_lossy().into(),
                gate: gate.to_string_lossy().into(),
                fail: false,
            })
            .unwrap();
        let queued: Vec<_> = (0..10)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        assert!(wait_until(30, || started.exists()));
        // The gate opens once the queued tasks are answered (cancelled), not on a timer: a
        // worker freed earlier would run them.
        std::thread::scope(|s| {
            s.spawn(|| {
                assert!(wait_until(60, || queued.iter().all(|h| h.is_finished())));
                std::fs::write(&gate, b"").unwrap();
            });
            pool.shutdown_now();
        });
        // The running one finishes (its outcome is not the point here).
        let _ = first.wait();
        for h in queued {
            match h.wait() {
                Err(TaskError::Cancelled) => {}
                other => panic!("queued under shutdown_now: {other:?}"),
            }
        }
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&started);
    });
}

#[test]
fn ub_many_threads_mixed_verbs() {
    watchdog(180, || {
        let pool = Arc::new(test_pool(2));
        let mut ts = Vec::new();
        for t in 0..6u64 {
            let p = pool.clone();
            ts.push(std::thread::spawn(move || {
                for i in 0..300u64 {
                    let v = t * 1_000_000 + i;
                    match i % 5 {
                        0 => assert_eq!(p.execute(&Cmd::Echo(v)).unwrap().value, v),
                        1 => assert_eq!(p.submit(&Cmd::Echo(v)).unwrap().wait().unwrap().value, v),
                        2 => {
                            let h = p.submit(&Cmd::Echo(v)).unwrap();
                            let mut h = h;
                            let end = Instant::now() + Duration::from_secs(60);
                            loop {
                                match h.try_wait() {
                                    Ok(o) => {
                                        assert_eq!(o.value, v);
                                        break;
                                    }
                                    Err(WaitTimeoutError::Timeout(hh)) => h = hh,
                                    Err(e) => panic!("{e:?}"),
                                }
                                assert!(Instant::now() < end, "no answer in 60 s");
                                std::thread::yield_now();
                            }
                        }
                        3 => {
                            let o =
                                futures_executor::block_on(p.execute_async(&Cmd::Echo(v))).unwrap();
                            assert_eq!(o.value, v);
                        }
                        _ => {
                            let h = p
                                .submit(&Cmd::HashVec(vec![(v % 251) as u8; 3000]))
                                .unwrap();
                            let r = h.wait_ref().unwrap();
                            assert_eq!(
                                r.value.to_native(),
                                hash_bytes(&vec![(v % 251) as u8; 3000])
                            );
                        }
                    }
                }
            }));
        }
        for t in ts {
            t.join().unwrap();
        }
    });
}

#[test]
fn ub_large_payload_loan_and_large_result_roundtrip() {
    watchdog(120, || {
        let pool = test_pool(1);
        let n = 16 * 1024 * 1024;
        let mut loan = pool.loan(n).unwrap();
        let data: Vec<u8> = (0..n).map(|i| (i * 7 % 253) as u8).collect();
        loan.copy_from_slice(&data);
        let out = pool
            .task(&Cmd::HashPayload)
            .payload(loan)
            .execute()
            .unwrap();
        assert_eq!(out.value, hash_bytes(&data));
        // 1.9 MiB result, default ring
        let r = pool.execute(&Cmd::MakeBytes(1_900_000)).unwrap();
        assert_eq!(r.bytes.len(), 1_900_000);
        assert!(
            r.bytes
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8)
        );
        // a 4 MiB task by copying
        let v: Vec<u8> = (0..4 * 1024 * 1024).map(|i| (i % 13) as u8).collect();
        assert_eq!(
            pool.execute(&Cmd::HashVec(v.clone())).unwrap().value,
            hash_bytes(&v)
        );
    });
}

#[test]
fn ub_uncollected_large_results_in_any_order() {
    watchdog(120, || {
        let pool = test_pool(1);
        let hs: Vec<_> = (0..6)
            .map(|_| pool.submit(&Cmd::MakeBytes(1_500_000)).unwrap())
            .collect();
        for h in hs.into_iter().rev() {
            assert_eq!(h.wait().unwrap().bytes.len(), 1_500_000);
        }
    });
}

#[test]
fn ub_execute_without_workers_is_noworkers_and_loan_comes_back() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        match pool.execute(&Cmd::Echo(1)) {
            Err(TaskError::NoWorkers) => {}
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            pool.submit(&Cmd::Echo(1)),
            Err(SubmitError::NoWorkers)
        ));
        let mut loan = pool.loan(100).unwrap();
        loan.as_mut_slice()[0] = 42;
        let r = pool.task(&Cmd::SumPayload).payload(loan).submit();
        let rej = r.expect_err("must fail");
        assert_eq!(rej, SubmitError::NoWorkers);
        let back = rej.into_loan().expect("loan handed back");
        assert_eq!(back.as_slice()[0], 42);
        assert_eq!(back.len(), 100);
    });
}

#[test]
fn ub_wait_timeout_returns_handle_and_later_wait_gets_value() {
    watchdog(60, || {
        let pool = test_pool(1);
        let gate = gate_path("wt");
        let h = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        let h = match h.wait_timeout(Duration::from_millis(20)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            other => panic!("{:?}", other.map(|o| o.value)),
        };
        assert!(!h.is_finished());
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(h.wait().unwrap().value, 1);
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn ub_task_timeout_and_deadline() {
    watchdog(120, || {
        let pool = test_pool(1);
        let t0 = Instant::now();
        match pool
            .task(&Cmd::SleepMs(20_000))
            .timeout(Duration::from_millis(200))
            .execute()
        {
            Err(TaskError::Timeout { worker, after }) => {
                assert_eq!(worker, 0);
                assert_eq!(after, Duration::from_millis(200));
            }
            other => panic!("{other:?}"),
        }
        assert!(t0.elapsed() < Duration::from_secs(15));
        // worker restarted and serves
        assert_eq!(pool.execute(&Cmd::Echo(4)).unwrap().value, 4);
        // deadline already passed
        match pool
            .task(&Cmd::Echo(1))
            .deadline(Instant::now() - Duration::from_millis(1))
            .execute()
        {
            Err(TaskError::Timeout { after, .. }) => assert_eq!(after, Duration::ZERO),
            other => panic!("past deadline: {other:?}"),
        }
    });
}

#[test]
fn ub_errors_name_worker_and_message() {
    watchdog(60, || {
        let pool = test_pool(1);
        match pool.execute(&Cmd::Fail("bad thing 123".into())) {
            Err(e @ TaskError::Failed { .. }) => {
                let s = e.to_string();
                assert!(s.contains("bad thing 123"), "{s}");
                assert!(s.contains('0'), "{s}");
            }
            other => panic!("{other:?}"),
        }
        match pool.execute(&Cmd::Panic("panic msg 77".into())) {
            Err(TaskError::Panicked {
                worker, message, ..
            }) => {
                assert_eq!(worker, 0);
                assert!(message.contains("panic msg 77"), "{message}");
            }
            other => panic!("{other:?}"),
        }
        let long = "L".repeat(100_000);
        match pool.execute(&Cmd::Fail(long.clone())) {
            Err(TaskError::Failed { message, .. }) => assert!(message.contains(&long[..1000])),
            other => panic!("{other:?}"),
        }
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
    });
}

#[test]
fn ub_spawn_failures() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(2)
            .build()
            .unwrap();
        let mut a = Spawn::ok("f");
        a.fail = true;
        match pool.spawn(&a) {
            Err(SpawnError::Failed { message, .. }) => {
                assert!(message.contains("refusing to start f"))
            }
            other => panic!("{other:?}"),
        }
        let mut a = Spawn::ok("p");
        a.panic = true;
        match pool.spawn(&a) {
            Err(SpawnError::Panicked { message, .. }) => {
                assert!(message.contains("spawn panic for p"))
            }
            other => panic!("{other:?}"),
        }
        let die = gate_path("die");
        std::fs::write(&die, b"").unwrap();
        let mut a = Spawn::ok("d");
        a.die_if_exists = die.to_string_lossy().into();
        match pool.spawn(&a) {
            Err(SpawnError::Exited { cause, .. }) => {
                assert_eq!(cause, stateful_pool::ExitCause::Exit(7))
            }
            other => panic!("{other:?}"),
        }
        let _ = std::fs::remove_file(&die);
        // seats are freed: two spawns fit
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        assert_eq!(pool.num_workers(), 2);
        // spawn timeout
        let pool2 = Pool::<TestWorker>::builder()
            .spawn_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        let mut a = Spawn::ok("slow");
        a.hang_ms = 5000;
        match pool2.spawn(&a) {
            Err(SpawnError::Timeout { .. }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(pool2.num_workers(), 0);
        // a program that does not exist
        let pool3 = Pool::<TestWorker>::builder()
            .program("/nonexistent/prog-xyz")
            .build()
            .unwrap();
        match pool3.spawn(&Spawn::ok("x")) {
            Err(e @ SpawnError::Launch { .. }) => {
                assert!(e.to_string().contains("prog-xyz"), "{e}")
            }
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn ub_retire_unknown_and_failed_seat() {
    watchdog(60, || {
        let pool = test_pool(1);
        assert!(matches!(
            pool.retire_worker(5),
            Err(WorkerError::NoSuchWorker { index: 5 })
        ));
        assert!(matches!(
            pool.replace_worker(7),
            Err(WorkerError::NoSuchWorker { index: 7 })
        ));
        pool.retire_worker(0).unwrap();
        assert_eq!(pool.num_workers(), 0);
        assert!(matches!(
            pool.retire_worker(0),
            Err(WorkerError::NoSuchWorker { .. })
        ));
        match pool.execute(&Cmd::Echo(1)) {
            Err(TaskError::NoWorkers) => {}
            other => panic!("{other:?}"),
        }
    });
}

#[test]
fn ub_broadcast_on_empty_and_after_close() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        let r = pool.broadcast(&Cmd::Echo(1));
        assert!(r.is_empty(), "{:?}", r.len());
        let pool = test_pool(2);
        let r = pool.broadcast(&Cmd::Count);
        assert_eq!(r.len(), 2);
        pool.close();
        let r = pool.broadcast(&Cmd::Echo(1));
        assert!(r.is_empty());
    });
}

#[test]
fn ub_empty_batch() {
    watchdog(60, || {
        let pool = test_pool(1);
        let empty: [Cmd; 0] = [];
        let r = pool.batch(&empty).execute();
        match r {
            Ok(v) => assert!(v.is_empty()),
            Err(e) => panic!("empty batch: {e}"),
        }
    });
}
