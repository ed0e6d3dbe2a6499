// Written by an independent black-box tester from the issues and docs (2026-12-07).
//! Black-box tests: maps and streams.
stateful_pool::worker_hook!();
mod common;
use common::*;
use futures_util::StreamExt;
use stateful_pool::{ErrorPolicy, MapError, TaskError, TaskOptions};
use std::time::Duration;

fn step(id: u32, fail: bool) -> Cmd {
    Cmd::Step {
        id,
        started: String::new(),
        gate: String::new(),
        fail,
    }
}

#[test]
fn ub_len_tracks_consumption_unordered_batched() {
    watchdog(120, || {
        const N: usize = 200;
        let c = Counters::new("len", N);
        let pool = pool_with(&c, 2, 16);
        for (batch, unordered) in [(1, false), (1, true), (7, false), (7, true)] {
            let m = pool
                .map((0..N as u32).map(|i| Cmd::TickSlow(i, (i * 31) % 300)))
                .window(8)
                .batch(batch);
            let mut m = if unordered {
                m.unordered()
            } else {
                m.ordered()
            };
            let mut seen = [false; N];
            for k in 0..N {
                assert_eq!(m.len(), N - k, "batch {batch} unordered {unordered}");
                assert_eq!(m.size_hint(), (N - k, Some(N - k)));
                let v = m.next().unwrap().unwrap().value as usize / 3;
                assert!(!seen[v]);
                seen[v] = true;
                if !unordered {
                    assert_eq!(v, k);
                }
            }
            assert_eq!(m.len(), 0);
            assert!(m.next().is_none());
        }
    });
}

#[test]
fn ub_empty_and_inexact_inputs() {
    watchdog(60, || {
        let c = Counters::new("empty", 64);
        let pool = pool_with(&c, 1, 8);
        let m = pool.map(Vec::<Cmd>::new());
        assert_eq!(m.len(), 0);
        assert_eq!(m.count(), 0);
        let inexact = (0..40u32).filter(|i| i % 2 == 0).map(Cmd::Tick);
        let mut m = pool.map(inexact).window(4);
        let (lo, hi) = m.size_hint();
        assert!(lo <= 20 && hi.is_none_or(|h| h >= 20), "{lo} {hi:?}");
        let mut n = 0;
        while let Some(r) = m.next() {
            r.unwrap();
            n += 1;
            let (lo, hi) = m.size_hint();
            assert!(
                lo <= 20 - n && hi.is_none_or(|h| h >= 20 - n),
                "after {n}: {lo} {hi:?}"
            );
        }
        assert_eq!(n, 20);
    });
}

#[test]
fn ub_window_zero_and_batch_zero_do_not_hang() {
    watchdog(60, || {
        let c = Counters::new("wz", 64);
        let pool = pool_with(&c, 1, 8);
        let v: Vec<_> = pool.map((0..10u32).map(Cmd::Tick)).window(0).collect();
        assert_eq!(v.len(), 10);
        let v: Vec<_> = pool.map((0..10u32).map(Cmd::Tick)).batch(0).collect();
        assert_eq!(v.len(), 10);
        for (i, r) in v.into_iter().enumerate() {
            assert_eq!(r.unwrap().value, i as u64 * 3);
        }
    });
}

#[test]
fn ub_unordered_indexed_and_with_inputs() {
    watchdog(120, || {
        const N: usize = 150;
        let c = Counters::new("idx", N);
        let pool = pool_with(&c, 3, 16);
        let inputs: Vec<Cmd> = (0..N as u32)
            .map(|i| Cmd::TickSlow(i, (i * 7919) % 500))
            .collect();
        let mut seen = vec![0; N];
        for (i, r) in pool.map(inputs.iter()).unordered().indexed().window(10) {
            assert_eq!(r.unwrap().value, i as u64 * 3);
            seen[i] += 1;
        }
        assert!(seen.iter().all(|&s| s == 1));
        let mut seen = vec![0; N];
        for (inp, r) in pool.map(inputs.clone()).unordered().with_inputs().batch(4) {
            let Cmd::TickSlow(i, _) = inp else { panic!() };
            assert_eq!(r.unwrap().value, i as u64 * 3);
            seen[i as usize] += 1;
        }
        assert!(seen.iter().all(|&s| s == 1));
        // every input ran exactly twice in total
        for i in 0..N {
            assert_eq!(c.get(i), 2, "input {i}");
        }
    });
}

#[test]
fn ub_deferred_errors_have_positions_unordered_and_batched() {
    watchdog(120, || {
        const N: usize = 60;
        let c = Counters::new("def", N);
        let pool = pool_with(&c, 2, 16);
        for (batch, unordered) in [(1, true), (5, false), (5, true)] {
            let m = pool
                .map((0..N as u32).map(|i| step(i, i % 7 == 3)))
                .batch(batch)
                .window(12);
            let m = if unordered { m.unordered() } else { m };
            let mut got = 0;
            for (i, r) in m.indexed() {
                got += 1;
                match r {
                    Ok(o) => {
                        assert!(i % 7 != 3);
                        assert_eq!(o.value, i as u64 * 3)
                    }
                    Err(MapError { index, error }) => {
                        assert_eq!(index, i);
                        assert_eq!(i % 7, 3);
                        match error {
                            TaskError::Failed { message, .. } => {
                                assert_eq!(message, format!("step {i} failed"))
                            }
                            e => panic!("{e:?}"),
                        }
                    }
                }
            }
            assert_eq!(got, N);
        }
    });
}

#[test]
fn ub_immediate_error_index_and_end() {
    watchdog(120, || {
        const N: usize = 400;
        let c = Counters::new("imm", N);
        let pool = pool_with(&c, 2, 16);
        for batch in [1usize, 4] {
            for unordered in [false, true] {
                let m = pool
                    .map((0..N as u32).map(|i| step(i, i == 10)))
                    .window(8)
                    .batch(batch)
                    .on_error(ErrorPolicy::Immediate);
                let m = if unordered { m.unordered() } else { m };
                let (lo, hi) = m.size_hint();
                assert!(lo <= 1, "lower bound {lo}");
                assert_eq!(hi, Some(N));
                let mut oks = 0;
                let mut err = None;
                for r in m {
                    match r {
                        Ok(_) => oks += 1,
                        Err(e) => {
                            assert!(err.is_none(), "second item after the error");
                            err = Some(e);
                        }
                    }
                }
                let e = err.expect("an error");
                assert_eq!(e.index, 10, "batch {batch} unordered {unordered}");
                // Ordered, nothing after input 10 is yielded before it, so the window bounds
                // what was taken. (Unordered, a worker preempted on input 10 lets the other
                // yield and refill the window meanwhile: no bound there.)
                if !unordered {
                    assert!(oks <= 10 + 8 * batch, "{oks}");
                }
            }
        }
    });
}

#[test]
fn ub_wait_others_no_task_running_when_error_arrives() {
    watchdog(120, || {
        let c = Counters::new("wo", 32);
        let pool = pool_with(&c, 2, 16);
        let gate = gate_path("wo-gate");
        let started = gate_path("wo-started");
        let g = gate.to_string_lossy().into_owned();
        let s = started.to_string_lossy().into_owned();
        let inputs = vec![
            Cmd::Step {
                id: 0,
                started: s.clone(),
                gate: g.clone(),
                fail: false,
            },
            step(1, true),
            step(2, false),
            step(3, false),
        ];
        let m = pool.map(inputs).window(2).on_error(ErrorPolicy::WaitOthers);
        // Input 0 is released once input 1 (the only other task that can finish while the
        // gate is shut) is answered: a worker counts a task done after publishing it.
        let items: Vec<_> = std::thread::scope(|s| {
            s.spawn(|| {
                assert!(wait_until(60, || started.exists()
                    && pool.tasks_done_per_worker().iter().sum::<u64>() >= 1));
                std::fs::write(&gate, b"").unwrap();
            });
            m.collect()
        });
        assert_eq!(items.len(), 1, "{items:?}");
        let e = items.into_iter().next().unwrap().unwrap_err();
        assert_eq!(e.index, 1);
        // the running one (0) finished before the error came
        assert_eq!(c.get(0), 1);
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&started);
    });
}

#[test]
fn ub_map_async_with_inputs_and_stream_on_tokio() {
    watchdog(120, || {
        const N: usize = 100;
        let c = Counters::new("async", N);
        let pool = pool_with(&c, 2, 16);
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let mut s = pool
                .map_async((0..N as u32).map(Cmd::Tick))
                .with_inputs()
                .window(5);
            let mut k = 0;
            while let Some((inp, r)) = s.next().await {
                assert_eq!(inp, Cmd::Tick(k));
                assert_eq!(r.unwrap().value, k as u64 * 3);
                k += 1;
            }
            assert_eq!(k as usize, N);
            let st = futures_util::stream::iter((0..N as u32).map(Cmd::Tick));
            let mut s = pool.map_stream(st).unordered().batch(3);
            assert_eq!(futures_core::Stream::size_hint(&s), (N, Some(N)));
            let mut n = 0;
            while let Some(r) = s.next().await {
                r.unwrap();
                n += 1;
            }
            assert_eq!(n, N);
        });
    });
}

#[test]
fn ub_map_task_options_timeout_per_input() {
    watchdog(120, || {
        let c = Counters::new("mto", 16);
        let pool = pool_with(&c, 1, 8);
        let inputs = vec![Cmd::Tick(0), Cmd::SleepMs(20_000), Cmd::Tick(2)];
        let r: Vec<_> = pool
            .map(inputs)
            // Every input gets it: roomy, so that only the 20 s sleep runs past it.
            .task_options(TaskOptions::new().timeout(Duration::from_secs(5)))
            .collect();
        assert_eq!(r.len(), 3);
        assert!(r[0].is_ok());
        match &r[1] {
            Err(MapError {
                index: 1,
                error: TaskError::Timeout { .. },
            }) => {}
            other => panic!("{other:?}"),
        }
        assert_eq!(r[2].as_ref().unwrap().value, 6);
    });
}

#[test]
fn ub_map_worker_death_deferred_and_retries() {
    watchdog(120, || {
        let c = Counters::new("mdeath", 16);
        let pool = pool_with(&c, 2, 8);
        let r: Vec<_> = pool
            .map(vec![Cmd::Tick(0), Cmd::KillSelf, Cmd::Tick(2)])
            .collect();
        assert_eq!(r.len(), 3);
        match &r[1] {
            Err(MapError {
                index: 1,
                error: TaskError::WorkerDied { .. },
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(r[0].is_ok() && r[2].is_ok());
        // with retries, a die-once task succeeds
        let p = gate_path("dieonce");
        let r: Vec<_> = pool
            .map(vec![Cmd::DieOnce(p.to_string_lossy().into()), Cmd::Tick(3)])
            .task_options(TaskOptions::new().retries(1))
            .collect();
        assert_eq!(r[0].as_ref().unwrap().value, 1);
        assert_eq!(r[1].as_ref().unwrap().value, 9);
        let _ = std::fs::remove_file(&p);
    });
}

#[test]
fn ub_endless_input_bounded_in_flight() {
    watchdog(60, || {
        let c = Counters::new("endless", 4);
        let pool = pool_with(&c, 2, 32);
        let pulled = std::sync::atomic::AtomicUsize::new(0);
        let mut m = pool
            .map(std::iter::repeat_with(|| {
                pulled.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
                Cmd::Tick(0)
            }))
            .window(5)
            .unordered();
        for _ in 0..500 {
            m.next().unwrap().unwrap();
            assert!(m.in_flight() <= 5, "{}", m.in_flight());
            let p = pulled.load(std::sync::atomic::Ordering::SeqCst);
            assert!(p <= m.taken() && m.taken() <= 500 + 5, "{p} {}", m.taken());
        }
    });
}
