//! Dynamic batching: workers run independently submitted tasks as one `execute_batch` step.
//! Per-task outcomes, a wrong outcome count, a panic and a death mid-batch, cancelled and
//! expired tasks dropped, the delay bound, no hoarding with two workers, and a policy change
//! on a live pool.
mod common;
use common::{gate_path, process_gone, wait_until, watchdog};
use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{
    BatchHandle, BatchPolicy, BatchTask, BoxError, BuildError, Pool, TaskContext, TaskError,
    TaskHandle, Worker, WorkerContext,
};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
enum Job {
    /// Answers the value.
    Echo(u64),
    /// Fails with this message (only this task).
    Fail(String),
    /// Creates file `.0`, then waits (at most 60 s) until file `.1` exists; answers 1.
    Gate(String, String),
    /// The step returns one outcome too few.
    Short,
    /// The whole step panics.
    PanicAll,
    /// The worker SIGKILLs itself in the step.
    KillAll,
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Done {
    value: u64,
    /// Tasks in the step that ran it (0: run on its own by `execute`).
    batch: u32,
    /// Task id of the first task of that step.
    first: u64,
    worker: u32,
}

struct Batcher;

fn gate(started: &str, gate: &str) {
    let _ = std::fs::write(started, b"");
    let end = Instant::now() + Duration::from_secs(60);
    while !std::path::Path::new(gate).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Worker for Batcher {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Job;
    type Output = Done;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Batcher, ()))
    }

    fn execute(&mut self, t: &ArchivedJob, ctx: &TaskContext<'_>) -> Result<Done, BoxError> {
        let worker = ctx.worker().index() as u32;
        let done = |value| Done {
            value,
            batch: 0,
            first: ctx.task_id(),
            worker,
        };
        match t {
            ArchivedJob::Echo(v) => Ok(done(v.to_native())),
            ArchivedJob::Fail(m) => Err(m.as_str().into()),
            ArchivedJob::Gate(s, g) => {
                gate(s, g);
                Ok(done(1))
            }
            _ => Ok(done(0)),
        }
    }

    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Job>],
    ) -> Result<Vec<Result<Done, BoxError>>, BoxError> {
        let n = batch.len() as u32;
        let first = batch[0].ctx.task_id();
        let worker = batch[0].ctx.worker().index() as u32;
        for t in batch {
            match t.task {
                ArchivedJob::Gate(s, g) => gate(s, g),
                ArchivedJob::PanicAll => panic!("the whole batch panicked"),
                ArchivedJob::KillAll => {
                    // SAFETY: kill/getpid have no preconditions.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                _ => {}
            }
        }
        let done = |value| Done {
            value,
            batch: n,
            first,
            worker,
        };
        let mut outs: Vec<Result<Done, BoxError>> = batch
            .iter()
            .map(|t| match t.task {
                ArchivedJob::Echo(v) => Ok(done(v.to_native())),
                ArchivedJob::Fail(m) => Err(m.as_str().into()),
                _ => Ok(done(1)),
            })
            .collect();
        if batch.iter().any(|t| matches!(t.task, ArchivedJob::Short)) {
            outs.pop();
        }
        Ok(outs)
    }
}

fn pool(workers: usize, policy: BatchPolicy) -> Pool<Batcher> {
    let pool = Pool::<Batcher>::builder()
        .queue_size(128)
        .batch_policy(policy)
        .build()
        .unwrap();
    for r in pool.spawn_n(&(), workers) {
        r.unwrap();
    }
    pool
}

/// Holds the worker that takes it until `open`: a gate task and its two files.
struct Held {
    handle: TaskHandle<Done>,
    gate: std::path::PathBuf,
}

impl Held {
    fn new(pool: &Pool<Batcher>, name: &str) -> Held {
        let started = gate_path(&format!("{name}-started"));
        let gate = gate_path(&format!("{name}-gate"));
        let handle = pool
            .submit(&Job::Gate(
                started.to_string_lossy().into(),
                gate.to_string_lossy().into(),
            ))
            .unwrap();
        assert!(wait_until(60, || started.exists()), "the gate task started");
        let _ = std::fs::remove_file(started);
        Held { handle, gate }
    }

    fn open(self) -> Done {
        std::fs::write(&self.gate, b"").unwrap();
        let d = self.handle.wait().unwrap();
        let _ = std::fs::remove_file(&self.gate);
        d
    }
}

/// Submits `jobs` while a gate task holds the only worker, then opens the gate: they run as
/// one batch. Their outcomes, in order.
fn queued_behind_a_gate(
    pool: &Pool<Batcher>,
    name: &str,
    jobs: &[Job],
) -> Vec<Result<Done, TaskError>> {
    let held = Held::new(pool, name);
    let handles: Vec<_> = jobs.iter().map(|j| pool.submit(j).unwrap()).collect();
    assert_eq!(held.open().batch, 1, "the gate task ran alone");
    handles.into_iter().map(|h| h.wait()).collect()
}

/// The values of a packed batch whose tasks all succeeded, in order.
fn packed_values(packed: BatchHandle<Done>) -> Vec<u64> {
    let outcomes = packed.wait().unwrap();
    outcomes.into_iter().map(|r| r.unwrap().value).collect()
}

#[test]
fn queued_tasks_run_as_one_batch_each_with_its_own_outcome() {
    watchdog(120, || {
        let pool = pool(1, BatchPolicy::new(16));
        let jobs = [
            Job::Echo(1),
            Job::Fail("task two is bad".into()),
            Job::Echo(3),
            Job::Echo(4),
        ];
        let outs = queued_behind_a_gate(&pool, "own-outcome", &jobs);
        let firsts: Vec<u64> = outs.iter().flatten().map(|d| d.first).collect();
        assert!(
            firsts.windows(2).all(|w| w[0] == w[1]),
            "one step: {outs:?}"
        );
        for (i, o) in outs.iter().enumerate() {
            match (i, o) {
                (1, Err(TaskError::Failed { message, .. })) => {
                    assert_eq!(message, "task two is bad")
                }
                (_, Ok(d)) => {
                    assert_eq!(d.batch, 4, "every queued task in the batch: {outs:?}");
                    assert_eq!(d.value, [1, 0, 3, 4][i]);
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        let s = pool.stats().batching;
        assert_eq!(s.batches, 2, "{s:?}");
        assert_eq!(s.tasks, 5);
        assert_eq!(
            s.sizes[0] + s.sizes[2],
            2,
            "a batch of 1 and one of 4: {s:?}"
        );
        assert!(s.execute_max > Duration::ZERO);
    });
}

#[test]
fn a_wrong_outcome_count_fails_every_task_of_that_batch_and_only_those() {
    watchdog(120, || {
        let pool = pool(1, BatchPolicy::new(16));
        for r in queued_behind_a_gate(&pool, "short", &[Job::Echo(1), Job::Short, Job::Echo(3)]) {
            match r {
                Err(TaskError::Failed { message, .. }) => {
                    assert!(message.contains("2 outcomes for a batch of 3"), "{message}")
                }
                other => panic!("expected the batch to fail, got {other:?}"),
            }
        }
        assert_eq!(pool.execute(&Job::Echo(9)).unwrap().value, 9);
    });
}

#[test]
fn a_panic_fails_each_task_of_the_step_and_restart_on_panic_replaces_the_worker() {
    watchdog(120, || {
        let pool = Pool::<Batcher>::builder()
            .queue_size(128)
            .batch_policy(BatchPolicy::new(16))
            .restart_on_panic(true)
            .build()
            .unwrap();
        pool.spawn(&()).unwrap();
        let pid = pool.worker_pids()[0].1;
        for r in queued_behind_a_gate(&pool, "panic", &[Job::Echo(1), Job::PanicAll, Job::Echo(3)])
        {
            match r {
                Err(TaskError::Panicked { message, .. }) => {
                    assert!(message.contains("the whole batch panicked"), "{message}")
                }
                other => panic!("expected Panicked, got {other:?}"),
            }
        }
        // Replaced by a fresh worker, which serves.
        assert!(wait_until(60, || process_gone(pid)));
        assert!(wait_until(60, || pool.stats().restarts >= 1));
        assert_eq!(pool.execute(&Job::Echo(5)).unwrap().value, 5);

        // By default the same worker serves on after the step's panic.
        let kept = self::pool(1, BatchPolicy::new(16));
        let pid = kept.worker_pids()[0].1;
        for r in queued_behind_a_gate(&kept, "panic2", &[Job::Echo(1), Job::PanicAll]) {
            assert!(matches!(r, Err(TaskError::Panicked { .. })), "{r:?}");
        }
        assert_eq!(kept.execute(&Job::Echo(5)).unwrap().value, 5);
        assert_eq!(kept.worker_pids()[0].1, pid);
        assert_eq!(kept.stats().restarts, 0);
    });
}

/// A worker that keeps the default `execute_batch` (each task's `execute` in turn); its
/// `PanicAll` panics in that task's `execute` alone.
struct DefaultBatcher;

impl Worker for DefaultBatcher {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Job;
    type Output = Done;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((DefaultBatcher, ()))
    }

    fn execute(&mut self, t: &ArchivedJob, ctx: &TaskContext<'_>) -> Result<Done, BoxError> {
        if let ArchivedJob::PanicAll = t {
            panic!("only this task panicked");
        }
        Batcher.execute(t, ctx)
    }
}

/// With the default `execute_batch`, a panic fails only the task whose `execute` panicked:
/// the tasks of other callers in the same step, before and after it, get their own results,
/// and the worker keeps serving (the default: no restart on panic).
#[test]
fn with_the_default_execute_batch_a_panic_fails_only_its_own_task() {
    watchdog(120, || {
        let pool = Pool::<DefaultBatcher>::builder()
            .queue_size(16)
            .batch_policy(BatchPolicy::new(16))
            .build()
            .unwrap();
        pool.spawn(&()).unwrap();
        let pid = pool.worker_pids()[0].1;
        let started = gate_path("default-panic-started");
        let gate = gate_path("default-panic-gate");
        let held = pool
            .submit(&Job::Gate(
                started.to_string_lossy().into(),
                gate.to_string_lossy().into(),
            ))
            .unwrap();
        assert!(wait_until(60, || started.exists()), "the gate task started");
        let handles: Vec<_> = [Job::Echo(1), Job::PanicAll, Job::Echo(3)]
            .iter()
            .map(|j| pool.submit(j).unwrap())
            .collect();
        std::fs::write(&gate, b"").unwrap();
        held.wait().unwrap();
        let _ = std::fs::remove_file(&started);
        let _ = std::fs::remove_file(&gate);
        let outs: Vec<_> = handles.into_iter().map(|h| h.wait()).collect();
        assert_eq!(outs[0].as_ref().map(|d| d.value).ok(), Some(1), "{outs:?}");
        match &outs[1] {
            Err(TaskError::Panicked { message, .. }) => {
                assert!(message.contains("only this task panicked"), "{message}")
            }
            other => panic!("expected Panicked, got {other:?}"),
        }
        assert_eq!(outs[2].as_ref().map(|d| d.value).ok(), Some(3), "{outs:?}");
        // The three ran as one step (after the gate task's step of one).
        let b = pool.stats().batching;
        assert_eq!((b.batches, b.tasks), (2, 4), "{b:?}");
        // The same worker serves on.
        assert_eq!(pool.execute(&Job::Echo(5)).unwrap().value, 5);
        assert_eq!(pool.worker_pids()[0].1, pid);
        assert_eq!(pool.stats().restarts, 0);
    });
}

#[test]
fn a_worker_killed_mid_batch_fails_or_retries_that_batch_only() {
    watchdog(180, || {
        let pool = pool(1, BatchPolicy::new(16));
        for lap in 0..3u64 {
            let held = Held::new(&pool, &format!("kill-{lap}"));
            let plain: Vec<_> = (0..3)
                .map(|i| pool.submit(&Job::Echo(lap * 10 + i)).unwrap())
                .collect();
            let retried = pool
                .task(&Job::Echo(lap * 10 + 7))
                .retries(1)
                .submit()
                .unwrap();
            let killer = pool.submit(&Job::KillAll).unwrap();
            held.open();
            for h in plain {
                assert!(
                    matches!(h.wait(), Err(TaskError::WorkerDied { .. })),
                    "lap {lap}: a task of the killed batch fails"
                );
            }
            assert!(matches!(killer.wait(), Err(TaskError::WorkerDied { .. })));
            // Re-run on the restarted worker, alone (its batch mates are gone).
            let d = retried.wait().unwrap();
            assert_eq!(d.value, lap * 10 + 7);
            // The seat serves on, in batches.
            assert_eq!(
                pool.execute(&Job::Echo(100 + lap)).unwrap().value,
                100 + lap
            );
        }
        assert!(pool.stats().tasks_retried >= 3);
    });
}

#[test]
fn cancelled_and_expired_tasks_are_dropped_before_the_step() {
    watchdog(120, || {
        let pool = pool(1, BatchPolicy::new(16));
        let held = Held::new(&pool, "drop");
        let deadline = Instant::now() + Duration::from_millis(30);
        let expired = pool
            .task(&Job::Echo(1))
            .deadline(deadline)
            .submit()
            .unwrap();
        let cancelled = pool.submit(&Job::Echo(2)).unwrap();
        let kept = pool
            .task(&Job::Echo(3))
            .deadline(Instant::now() + Duration::from_secs(3600))
            .submit()
            .unwrap();
        cancelled.cancel();
        // Wait for the deadline itself (the event under test), then let the worker go.
        while Instant::now() <= deadline + Duration::from_millis(5) {
            std::thread::sleep(Duration::from_millis(5));
        }
        held.open();
        assert!(
            matches!(expired.wait(), Err(TaskError::Timeout { .. })),
            "past its deadline: not run"
        );
        assert_eq!(cancelled.wait(), Err(TaskError::Cancelled));
        let d = kept.wait().unwrap();
        assert_eq!(
            (d.value, d.batch),
            (3, 1),
            "the step saw only the live task"
        );
    });
}

#[test]
fn a_free_worker_waits_at_most_the_delay_and_never_while_another_is_idle() {
    watchdog(180, || {
        // One worker: a lone task waits for company, about the delay, and no longer.
        let delay = Duration::from_millis(200);
        let pool = pool(1, BatchPolicy::new(32).max_delay(delay));
        let d = pool.execute(&Job::Echo(1)).unwrap();
        assert_eq!(d.batch, 1);
        let s = pool.stats().batching;
        assert!(
            s.queue_delay_max >= delay,
            "it waited for company: {:?}",
            s.queue_delay_max
        );
        assert!(s.queue_delay_max < delay + Duration::from_secs(20));
        drop(pool);
        // Two workers and a long delay: the other worker is idle, so nobody waits.
        let pool = pool_two_idle();
        let t = Instant::now();
        assert_eq!(pool.execute(&Job::Echo(2)).unwrap().value, 2);
        assert!(
            t.elapsed() < Duration::from_secs(100),
            "waited for company while a worker was idle"
        );
    });
}

#[test]
fn a_deadline_shorter_than_the_delay_ends_the_wait_for_company() {
    watchdog(180, || {
        // One idle worker, a delay far longer than the task's deadline: the worker stops
        // waiting for company before the deadline, so the lone task runs instead of expiring.
        let pool = pool(1, BatchPolicy::new(8).max_delay(Duration::from_secs(60)));
        let t = Instant::now();
        let d = pool
            .task(&Job::Echo(7))
            .deadline(Instant::now() + Duration::from_secs(4))
            .execute()
            .expect("the lone task ran before its deadline");
        assert_eq!((d.value, d.batch), (7, 1));
        assert!(
            t.elapsed() < Duration::from_secs(30),
            "the wait ended long before the 60 s delay: {:?}",
            t.elapsed()
        );
        // A task without a deadline held with it: the earliest deadline among the members
        // ends the wait for both. (The gate task itself runs under a policy without a delay:
        // alone, with no deadline, it would wait the whole 60 s for company.)
        pool.set_batch_policy(BatchPolicy::new(8)).unwrap();
        let held = Held::new(&pool, "deadline-company");
        pool.set_batch_policy(BatchPolicy::new(8).max_delay(Duration::from_secs(60)))
            .unwrap();
        let plain = pool.submit(&Job::Echo(1)).unwrap();
        let timed = pool
            .task(&Job::Echo(2))
            .deadline(Instant::now() + Duration::from_secs(10))
            .submit()
            .unwrap();
        held.open();
        let t = Instant::now();
        let (a, b) = (plain.wait().unwrap(), timed.wait().unwrap());
        assert_eq!((a.value, b.value, a.batch, b.batch), (1, 2, 2, 2));
        assert!(t.elapsed() < Duration::from_secs(30), "{:?}", t.elapsed());
    });
}

#[test]
fn only_when_saturated_waits_after_full_batches_only() {
    watchdog(180, || {
        // A long delay, one worker: a lone task after a partial batch is not kept waiting.
        let pool = pool(
            1,
            BatchPolicy::new(4)
                .max_delay(Duration::from_secs(300))
                .only_when_saturated(true),
        );
        let t = Instant::now();
        assert_eq!(pool.execute(&Job::Echo(1)).unwrap().value, 1);
        assert!(
            t.elapsed() < Duration::from_secs(100),
            "waited after a partial batch"
        );
        // A full batch (four queued behind a gate), then a lone task: now the worker waits
        // for company (bounded by the delay), so the task's queue delay is long. Close the
        // pool instead of waiting out 300 s: the task in the forming batch is still answered.
        let held = Held::new(&pool, "saturated");
        let full: Vec<_> = (0..4)
            .map(|i| pool.submit(&Job::Echo(i)).unwrap())
            .collect();
        held.open();
        for h in full {
            assert_eq!(h.wait().unwrap().batch, 4);
        }
        let lone = pool.submit(&Job::Echo(9)).unwrap();
        // It waits for company: not finished a good while later.
        assert!(
            lone.wait_timeout(Duration::from_millis(300))
                .is_err_and(|e| e.is_timeout())
        );
        assert_eq!(
            pool.batch_policy(),
            BatchPolicy::new(4)
                .max_delay(Duration::from_secs(300))
                .only_when_saturated(true)
        );
        drop(pool);
    });
}

fn pool_two_idle() -> Pool<Batcher> {
    let pool = pool(2, BatchPolicy::new(32).max_delay(Duration::from_secs(300)));
    // Both workers reach their wait (each marks itself idle there).
    assert!(wait_until(60, || pool.workers().len() == 2));
    pool
}

#[test]
fn a_busy_worker_hoards_nothing() {
    watchdog(120, || {
        let pool = pool(2, BatchPolicy::new(16));
        let held = Held::new(&pool, "hoard");
        let busy = held_worker(&pool, &held);
        // Everything submitted now is run by the free worker while the other is held.
        for round in 0..5u64 {
            let hs: Vec<_> = (0..6)
                .map(|i| pool.submit(&Job::Echo(round * 10 + i)).unwrap())
                .collect();
            for h in hs {
                let d = h.wait().unwrap();
                assert_ne!(d.worker, busy, "a task went to the held worker");
            }
        }
        held.open();
    });
}

/// The seat index of the worker running `held` (the one whose tasks_done lags).
fn held_worker(pool: &Pool<Batcher>, _held: &Held) -> u32 {
    // The free worker answers this one; the held one cannot.
    let free = pool.execute(&Job::Echo(0)).unwrap().worker;
    1 - free
}

#[test]
fn the_policy_changes_on_a_live_pool() {
    watchdog(120, || {
        let pool = pool(1, BatchPolicy::none());
        assert_eq!(pool.batch_policy(), BatchPolicy::none());
        let run_queued = |n: u64| -> Vec<Done> {
            let held = Held::new(&pool, "policy");
            let hs: Vec<_> = (0..n)
                .map(|i| pool.submit(&Job::Echo(i)).unwrap())
                .collect();
            held.open();
            hs.into_iter().map(|h| h.wait().unwrap()).collect()
        };
        // No batching: each task on its own.
        assert!(run_queued(4).iter().all(|d| d.batch == 0));
        pool.set_batch_policy(BatchPolicy::new(3)).unwrap();
        assert_eq!(pool.batch_policy().max_batch(), 3);
        let outs = run_queued(7);
        assert!(
            outs.iter().all(|d| d.batch >= 1 && d.batch <= 3),
            "{outs:?}"
        );
        assert!(outs.iter().any(|d| d.batch == 3), "{outs:?}");
        pool.set_batch_policy(BatchPolicy::none()).unwrap();
        assert!(run_queued(3).iter().all(|d| d.batch == 0));
        // Out of range: refused, the policy in force is kept.
        for bad in [BatchPolicy::new(0), BatchPolicy::new(65)] {
            assert!(matches!(
                pool.set_batch_policy(bad),
                Err(BuildError::InvalidConfig(_))
            ));
        }
        assert!(matches!(
            Pool::<Batcher>::builder()
                .batch_policy(BatchPolicy::new(1000))
                .build(),
            Err(BuildError::InvalidConfig(_))
        ));
        assert_eq!(pool.batch_policy(), BatchPolicy::none());
    });
}

#[test]
fn callers_packed_batches_and_dynamic_batches_mix() {
    watchdog(120, || {
        let pool = pool(1, BatchPolicy::new(8));
        let held = Held::new(&pool, "mix");
        let single = pool.submit(&Job::Echo(1)).unwrap();
        let packed = pool.batch(&[Job::Echo(2), Job::Echo(3)]).submit().unwrap();
        let after = pool.submit(&Job::Echo(4)).unwrap();
        held.open();
        assert_eq!(single.wait().unwrap().value, 1);
        let p = packed_values(packed);
        assert_eq!(p, [2, 3]);
        assert_eq!(after.wait().unwrap().value, 4);
    });
}

#[test]
fn a_hung_batch_is_killed_by_its_smallest_limit_and_waiting_for_company_is_not_running() {
    watchdog(180, || {
        let pool = pool(1, BatchPolicy::new(8));
        let held = Held::new(&pool, "hung");
        let never = gate_path("never-opens");
        let limited = pool
            .task(&Job::Echo(1))
            .timeout(Duration::from_millis(300))
            .submit()
            .unwrap();
        let unlimited = pool.submit(&Job::Echo(2)).unwrap();
        // The hung task writes this marker when it starts; removed at the end.
        let started = gate_path("never-started");
        let hang = pool
            .submit(&Job::Gate(
                started.to_string_lossy().into(),
                never.to_string_lossy().into(),
            ))
            .unwrap();
        held.open();
        // The batch hangs: killed at the smallest limit among its tasks.
        assert!(
            matches!(limited.wait(), Err(TaskError::Timeout { .. })),
            "the task whose limit passed"
        );
        assert!(matches!(
            unlimited.wait(),
            Err(TaskError::WorkerDied { .. })
        ));
        assert!(matches!(hang.wait(), Err(TaskError::WorkerDied { .. })));
        let _ = std::fs::remove_file(&started);
        assert_eq!(pool.execute(&Job::Echo(3)).unwrap().value, 3);
        drop(pool);

        // One worker waiting 3 s for company: a 1.5 s execution limit is not spent waiting.
        let pool = self::pool(1, BatchPolicy::new(8).max_delay(Duration::from_secs(3)));
        let d = pool
            .task(&Job::Echo(4))
            .timeout(Duration::from_millis(1500))
            .execute()
            .unwrap();
        assert_eq!((d.value, d.batch), (4, 1));
        assert!(pool.stats().batching.queue_delay_max >= Duration::from_secs(3));
        assert_eq!(pool.stats().worker_deaths, 0);
    });
}

#[test]
fn a_hung_batch_kill_times_out_only_tasks_past_their_own_limit_and_spares_a_packed_task() {
    watchdog(180, || {
        let pool = pool(1, BatchPolicy::new(8));
        let held = Held::new(&pool, "hung-key");
        let never = gate_path("never-opens-key");
        // The batch's key (its first task) has no limit of its own; the kill comes at the
        // second task's.
        let unlimited = pool.submit(&Job::Echo(1)).unwrap();
        let limited = pool
            .task(&Job::Echo(2))
            .timeout(Duration::from_millis(300))
            .submit()
            .unwrap();
        // The hung task writes this marker when it starts; removed at the end.
        let started = gate_path("never-started-key");
        let hang = pool
            .submit(&Job::Gate(
                started.to_string_lossy().into(),
                never.to_string_lossy().into(),
            ))
            .unwrap();
        // A caller's packed batch behind them: popped while the batch forms, it waits in the
        // pop window to run after it, so it has not started when the kill lands.
        let packed = pool.batch(&[Job::Echo(3), Job::Echo(4)]).submit().unwrap();
        held.open();
        assert!(
            matches!(limited.wait(), Err(TaskError::Timeout { .. })),
            "the task whose limit passed"
        );
        let key = unlimited.wait();
        assert!(
            matches!(key, Err(TaskError::WorkerDied { .. })),
            "the key task had no limit: it died with the batch, it did not time out: {key:?}"
        );
        assert!(matches!(hang.wait(), Err(TaskError::WorkerDied { .. })));
        let _ = std::fs::remove_file(&started);
        // Never started: it runs on the restarted worker, without a retry budget.
        let p = packed_values(packed);
        assert_eq!(p, [3, 4]);
        let stats = pool.stats();
        assert_eq!(stats.tasks_timed_out, 1);
        assert_eq!(stats.worker_deaths, 1);
    });
}
