//! Batches: many tasks in one slot, run in order by one worker, answered together.

stateful_pool::worker_hook!();

mod common;

use common::*;
use stateful_pool::{Pool, SubmitError, TaskError};

fn pool(restart_on_panic: bool) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(8)
        .restart_on_panic(restart_on_panic)
        .build()
        .unwrap();
    pool.spawn(&Spawn::ok("b")).unwrap();
    pool
}

#[test]
fn a_batch_answers_every_task_in_order_each_with_its_own_outcome() {
    watchdog(60, || {
        let pool = pool(false);
        let tasks = vec![
            Cmd::Echo(1),
            Cmd::Fail("no".into()),
            Cmd::Panic("boom".into()),
            Cmd::Echo(4),
        ];
        let outs = pool.batch(&tasks).execute().unwrap();
        assert_eq!(outs.len(), 4);
        assert_eq!(outs[0].as_ref().unwrap().value, 1);
        assert!(matches!(&outs[1], Err(TaskError::Failed { message, .. }) if message == "no"));
        assert!(
            matches!(&outs[2], Err(TaskError::Panicked { message, .. }) if message.contains("boom"))
        );
        assert_eq!(
            outs[3].as_ref().unwrap().value,
            4,
            "a panic fails only its task (keep policy)"
        );
        // Tasks by reference, and an empty batch.
        let refs: Vec<&Cmd> = tasks.iter().filter(|c| matches!(c, Cmd::Echo(_))).collect();
        let outs = pool.batch(&refs).execute().unwrap();
        assert_eq!(
            outs.iter()
                .map(|o| o.as_ref().unwrap().value)
                .collect::<Vec<_>>(),
            vec![1, 4]
        );
        assert!(pool.batch::<Cmd>(&[]).execute().unwrap().is_empty());
    });
}

#[test]
fn each_task_of_many_batches_runs_exactly_once() {
    watchdog(60, || {
        const N: usize = 2000;
        let counters = Counters::new("batch-once", N);
        let pool = Pool::<TestWorker>::builder()
            .queue_size(32)
            .build()
            .unwrap(); // 20 batches held at once
        for r in pool.spawn_n(&counters.spawn_args("b"), 2) {
            r.unwrap();
        }
        let tasks: Vec<Cmd> = (0..N as u32).map(Cmd::Tick).collect();
        let handles: Vec<_> = tasks
            .chunks(100)
            .map(|c| pool.batch(c).submit().unwrap())
            .collect();
        let mut k = 0u64;
        for h in handles {
            assert_eq!(h.len(), 100);
            for o in h.wait().unwrap() {
                assert_eq!(o.unwrap().value, k * 3);
                k += 1;
            }
        }
        assert_eq!(k, N as u64);
        for i in 0..N {
            assert_eq!(counters.get(i), 1);
        }
    });
}

#[test]
fn a_panic_or_poison_in_a_batch_retires_the_worker_after_answering() {
    watchdog(60, || {
        let pool = pool(true);
        let before = pool.execute(&Cmd::Pid).unwrap().value;
        let outs = pool
            .batch(&[Cmd::Echo(1), Cmd::Panic("p".into()), Cmd::Echo(3)])
            .execute()
            .unwrap();
        assert_eq!(outs[0].as_ref().unwrap().value, 1);
        assert!(matches!(outs[1], Err(TaskError::Panicked { .. })));
        assert_eq!(
            outs[2],
            Err(TaskError::Cancelled),
            "not run after the worker retired"
        );
        let outs = pool
            .batch(&[Cmd::Poison("sticky".into()), Cmd::Echo(2)])
            .execute()
            .unwrap();
        assert!(
            matches!(&outs[0], Err(TaskError::Poisoned { message, .. }) if message == "sticky")
        );
        assert_eq!(outs[1], Err(TaskError::Cancelled));
        // Replaced, and serving.
        let after = pool.execute(&Cmd::Pid).unwrap().value;
        assert_ne!(before, after);
        assert_eq!(
            pool.batch(&[Cmd::Echo(9)]).execute().unwrap()[0]
                .as_ref()
                .unwrap()
                .value,
            9
        );
    });
}

#[test]
fn a_worker_dying_mid_batch_fails_the_batch_as_a_whole() {
    watchdog(60, || {
        let pool = pool(true);
        let e = pool
            .batch(&[Cmd::Echo(1), Cmd::KillSelf, Cmd::Echo(3)])
            .execute()
            .unwrap_err();
        assert!(matches!(e, TaskError::WorkerDied { .. }), "{e}");
        assert_eq!(
            pool.execute(&Cmd::Echo(5)).unwrap().value,
            5,
            "restarted and serving"
        );
    });
}

#[test]
fn batches_obey_the_queue_and_size_limits_and_await() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(2)
            .max_task_bytes(4096)
            .build()
            .unwrap();
        // The worker is still starting (its spawn step waits on a gate): two batches fill the
        // queue.
        let gate = gate_path("batch-limits");
        let spawning = pool
            .submit_spawn(&Spawn {
                gate: gate.to_string_lossy().into(),
                ..Spawn::ok("late")
            })
            .unwrap();
        let a = pool.batch(&[Cmd::Echo(1)]).submit().unwrap();
        let b = pool
            .batch(&[Cmd::Echo(2), Cmd::Echo(3)])
            .try_submit()
            .unwrap();
        assert_eq!(
            pool.batch(&[Cmd::Echo(4)]).try_submit().unwrap_err(),
            SubmitError::QueueFull
        );
        let big: Vec<Cmd> = (0..2000).map(Cmd::Echo).collect();
        assert!(matches!(
            pool.batch(&big).try_submit(),
            Err(SubmitError::PayloadTooLarge { max: 4096, .. }) | Err(SubmitError::QueueFull)
        ));
        std::fs::write(&gate, b"").unwrap();
        spawning.wait().unwrap();
        let _ = std::fs::remove_file(&gate);
        let got = futures_executor::block_on(async { (a.await, b.await) });
        assert_eq!(got.0.unwrap()[0].as_ref().unwrap().value, 1);
        assert_eq!(got.1.unwrap().len(), 2);
        let big_ok = pool.batch(&big).try_submit();
        assert!(matches!(
            big_ok,
            Err(SubmitError::PayloadTooLarge { max: 4096, .. })
        ));
    });
}

#[test]
fn a_batch_wakes_a_registered_waker_when_it_finishes() {
    struct Flag(std::sync::atomic::AtomicBool, std::thread::Thread);
    impl std::task::Wake for Flag {
        fn wake(self: std::sync::Arc<Self>) {
            self.0.store(true, std::sync::atomic::Ordering::SeqCst);
            self.1.unpark();
        }
    }
    watchdog(60, || {
        let pool = pool(true);
        let flag = std::sync::Arc::new(Flag(
            std::sync::atomic::AtomicBool::new(false),
            std::thread::current(),
        ));
        let waker = std::task::Waker::from(flag.clone());
        let h = pool
            .batch(&[Cmd::SleepMs(50), Cmd::Echo(2)])
            .submit()
            .unwrap();
        if !h.wake_when_finished(&waker) {
            // Woken from the pool's reactor (bounded: the watchdog).
            while !flag.0.load(std::sync::atomic::Ordering::SeqCst) {
                std::thread::park_timeout(std::time::Duration::from_millis(100));
            }
        }
        assert!(h.is_finished());
        let outs = h.wait().unwrap();
        assert_eq!(outs[1].as_ref().unwrap().value, 2);
    });
}
