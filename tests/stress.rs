//! Load: many callers, every result checked against its input; and load balance: an idle
//! worker takes the next task while another is busy.

mod common;
use common::*;
use stateful_pool::Pool;
use std::collections::HashSet;

stateful_pool::worker_hook!();

#[test]
fn eight_callers_ten_thousand_tasks_each_over_three_workers() {
    const THREADS: u64 = 8;
    const PER_THREAD: u64 = 10_000;
    watchdog(600, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(128)
            .build()
            .unwrap();
        for i in 0..3 {
            pool.spawn(&Spawn::ok(&format!("s{i}"))).unwrap();
        }
        let per_worker = std::thread::scope(|s| {
            let threads: Vec<_> = (0..THREADS)
                .map(|t| {
                    let pool = &pool;
                    s.spawn(move || {
                        let mut seen = HashSet::new();
                        let mut per_worker = [0u64; 3];
                        // Pipelined: keep up to 8 tasks of this caller in flight.
                        let mut inflight = std::collections::VecDeque::new();
                        for i in 0..PER_THREAD {
                            let v = t << 32 | i;
                            inflight.push_back((v, pool.submit(&Cmd::Echo(v)).unwrap()));
                            if inflight.len() == 8 {
                                let (v, h) = inflight.pop_front().unwrap();
                                let out = h.wait().unwrap();
                                assert_eq!(out.value, v, "result crossed between tasks");
                                assert!(seen.insert(v), "result answered twice");
                                per_worker[out.worker as usize] += 1;
                            }
                        }
                        for (v, h) in inflight {
                            let out = h.wait().unwrap();
                            assert_eq!(out.value, v, "result crossed between tasks");
                            assert!(seen.insert(v), "result answered twice");
                            per_worker[out.worker as usize] += 1;
                        }
                        assert_eq!(seen.len() as u64, PER_THREAD, "a result was lost");
                        per_worker
                    })
                })
                .collect();
            let mut total = [0u64; 3];
            for t in threads {
                for (w, n) in t.join().unwrap().iter().enumerate() {
                    total[w] += n;
                }
            }
            total
        });
        assert_eq!(per_worker.iter().sum::<u64>(), THREADS * PER_THREAD);
        // The workers' own counters agree with what callers saw (a worker counts a task just
        // after publishing it, so the last count may land a moment after the last answer).
        assert!(
            wait_until(30, || pool.tasks_done_per_worker()[..3] == per_worker[..]),
            "{:?} vs {per_worker:?}",
            pool.tasks_done_per_worker()
        );
        println!("tasks per worker: {per_worker:?}");
    });
}

#[test]
fn an_idle_worker_takes_the_next_task_while_another_is_busy() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        let gate = gate_path("balance");
        // A long task (held until we open the gate) occupies one worker...
        let long = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        // ...and 50 short tasks queued behind it all complete on the other worker, without
        // waiting for the long one (which is still running when they are all done).
        let shorts: Vec<_> = (0..50)
            .map(|i| pool.submit(&Cmd::Echo(i)).unwrap())
            .collect();
        let workers: HashSet<u32> = shorts
            .into_iter()
            .map(|h| h.wait().unwrap().worker)
            .collect();
        assert!(
            !long.is_finished(),
            "the long task cannot finish before its gate opens"
        );
        assert_eq!(workers.len(), 1, "short tasks all ran on the free worker");
        std::fs::write(&gate, b"").unwrap();
        let long_worker = long.wait().unwrap().worker;
        assert!(!workers.contains(&long_worker));
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn handles_dropped_at_every_stage_leave_no_slot_behind() {
    use std::future::Future;
    use std::task::{Context, Poll, Waker};
    watchdog(300, || {
        const SLOTS: usize = 16;
        let pool = Pool::<TestWorker>::builder()
            .queue_size(SLOTS)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("d0")).unwrap();
        pool.spawn(&Spawn::ok("d1")).unwrap();
        std::thread::scope(|s| {
            for t in 0..4u64 {
                let pool = &pool;
                s.spawn(move || {
                    let mut cx = Context::from_waker(Waker::noop());
                    for i in 0..2000u64 {
                        let v = t * 10_000 + i;
                        let mut h = pool.submit(&Cmd::Echo(v)).unwrap();
                        match i % 4 {
                            0 => drop(h), // likely before the task starts
                            1 => {
                                // Registered with the reactor, then abandoned.
                                match std::pin::Pin::new(&mut h).poll(&mut cx) {
                                    Poll::Ready(r) => assert_eq!(r.unwrap().value, v),
                                    Poll::Pending => drop(h),
                                }
                            }
                            2 => {
                                // Abandoned after it finished.
                                while !h.is_finished() {
                                    std::thread::yield_now();
                                }
                                drop(h);
                            }
                            _ => assert_eq!(h.wait().unwrap().value, v),
                        }
                    }
                });
            }
        });
        // Every slot came back exactly once: all of them can be taken (waiting for the reactor
        // to retire the last detached ones; a leaked slot would hang here and trip the
        // watchdog), and not one more.
        let gate = gate_path("drops");
        let g = gate.to_string_lossy().to_string();
        let held: Vec<_> = (0..SLOTS)
            .map(|_| pool.submit(&Cmd::Gate(g.clone())).unwrap())
            .collect();
        assert_eq!(
            pool.try_submit(&Cmd::Echo(0)).unwrap_err(),
            stateful_pool::SubmitError::QueueFull,
            "a slot was returned twice"
        );
        std::fs::write(&gate, b"").unwrap();
        for h in held {
            assert_eq!(h.wait().unwrap().value, 1);
        }
        let _ = std::fs::remove_file(&gate);
    });
}
