//! The slot protocol under faults and misbehaviour (issue 12): a worker killed at every
//! protocol step with every shape of result, followed by many laps of its seat's completion
//! ring; results nobody collects; and a hostile worker that writes garbage into what it shares.

stateful_pool::worker_hook!();

mod common;

use common::*;
use stateful_pool::{
    BatchPolicy, Pool, RestartPolicy, SpawnOptions, TaskError, TaskHandle, WaitTimeoutError,
};
use std::time::Duration;

/// The shapes a task's outcome can take on its way back.
#[derive(Debug, Clone, Copy)]
enum Shape {
    /// A small output, inline in the slot.
    Inline,
    /// An output larger than a slot: a completion-ring record.
    Record,
    /// An error message (a ring record).
    Error,
    /// A panic message (a ring record).
    Panic,
    /// An output larger than half the ring: `ResultTooLarge` (a small ring record).
    TooLarge,
}

/// Every failpoint of the worker's protocol, in order.
const POINTS: [&str; 5] = [
    "pop_mid",
    "after_claim",
    "mid_read",
    "after_result_write",
    "after_publish",
];

/// Every shape of outcome.
const SHAPES: [Shape; 5] = [
    Shape::Inline,
    Shape::Record,
    Shape::Error,
    Shape::Panic,
    Shape::TooLarge,
];

const RING: usize = 256 * 1024;
const BIG: u32 = 40_000;

fn task(shape: Shape, i: u64) -> Cmd {
    match shape {
        Shape::Inline => Cmd::Echo(i),
        Shape::Record => Cmd::MakeBytes(BIG + i as u32),
        Shape::Error => Cmd::Fail(format!("error {i} {}", "x".repeat(3000))),
        Shape::Panic => Cmd::Panic(format!("panic {i} {}", "y".repeat(3000))),
        Shape::TooLarge => Cmd::MakeBytes(RING as u32),
    }
}

/// Checks a task's answer against its shape; `Err(())` for a `WorkerDied`.
fn check(shape: Shape, i: u64, r: Result<Out, TaskError>, ctx: &str) -> Result<(), ()> {
    match (shape, r) {
        (_, Err(TaskError::WorkerDied { .. })) => return Err(()),
        (Shape::Inline, Ok(o)) => assert_eq!(o.value, i, "{ctx}"),
        (Shape::Record, Ok(o)) => {
            let n = (BIG + i as u32) as usize;
            assert_eq!(o.bytes.len(), n, "{ctx}");
            assert!(
                o.bytes
                    .iter()
                    .enumerate()
                    .all(|(k, &b)| b == (k % 251) as u8),
                "{ctx}"
            );
        }
        (Shape::Error, Err(TaskError::Failed { message, .. })) => {
            assert!(
                message.starts_with(&format!("error {i} ")),
                "{ctx}: {message:.40}"
            );
            assert_eq!(message.len(), format!("error {i} ").len() + 3000, "{ctx}");
        }
        (Shape::Panic, Err(TaskError::Panicked { message, .. })) => {
            assert!(
                message.starts_with(&format!("panic {i} ")),
                "{ctx}: {message:.40}"
            )
        }
        (Shape::TooLarge, Err(TaskError::ResultTooLarge { len, max, .. })) => {
            assert!(len > max, "{ctx}")
        }
        (_, other) => panic!("{ctx}: task {i} got {other:?}"),
    }
    Ok(())
}

/// One worker that dies at hit `hit` of failpoint `point` (in its first life only), with a
/// small completion ring, so that large results take the ring-record path.
fn matrix_pool(point: &str, batch: BatchPolicy, hit: u32) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(16)
        .max_workers(1)
        .result_ring_bytes(RING)
        .restart_on_panic(false)
        .batch_policy(batch)
        .worker_env("STATEFUL_POOL_FAILPOINTS", format!("{point}@{hit}/1"))
        .build()
        .unwrap();
    pool.spawn(&Spawn::ok("fp")).unwrap();
    pool
}

/// Three laps of the seat's ring and more: large outputs and messages, each checked.
fn laps(pool: &Pool<TestWorker>, ctx: &str) {
    let per_lap = RING / (BIG as usize + 64);
    for i in 0..(4 * per_lap as u64 + 4) {
        let shape = if i % 3 == 2 {
            Shape::Error
        } else {
            Shape::Record
        };
        let r = pool.execute(&task(shape, i)).map_err(|e| match e {
            TaskError::Submit(s) => panic!("{ctx}: submit failed: {s}"),
            e => e,
        });
        check(shape, i, r, &format!("{ctx}, lap task {i}")).expect("no death expected");
    }
}

/// Eight tasks submitted to a one-worker pool whose worker dies at the third hit of `point`:
/// exactly the task it held is lost (none for `after_publish`), every other is answered as
/// `check` expects, and the pool counts one death.
fn the_death_costs_one_task<W: stateful_pool::Worker>(
    pool: &Pool<W>,
    point: &str,
    ctx: &str,
    submit: impl Fn(u64) -> Result<TaskHandle<W::Output>, stateful_pool::SubmitError>,
    check: impl Fn(u64, Result<W::Output, TaskError>) -> Result<(), ()>,
) {
    let handles: Vec<_> = (0..8u64)
        .map(&submit)
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("{ctx}: submit failed: {e}"));
    let died = (0u64..)
        .zip(handles)
        .map(|(i, h)| check(i, h.wait()))
        .filter(Result::is_err)
        .count();
    let lost = if point == "after_publish" { 0 } else { 1 };
    assert_eq!(died, lost, "{ctx}: tasks lost to the death");
    assert_eq!(pool.stats().worker_deaths, 1, "{ctx}");
}

#[test]
fn a_worker_killed_at_any_step_with_any_result_shape_costs_only_its_task_and_its_seat_serves_on() {
    watchdog(600, || {
        for point in POINTS {
            for shape in SHAPES {
                let ctx = format!("{point} × {shape:?}");
                let pool = matrix_pool(point, BatchPolicy::none(), 3);
                the_death_costs_one_task(
                    &pool,
                    point,
                    &ctx,
                    |i| pool.submit(&task(shape, i)),
                    |i, r| check(shape, i, r, &ctx),
                );
                laps(&pool, &ctx);
                assert_eq!(pool.stats().worker_deaths, 1, "{ctx}: no further deaths");
            }
        }
    });
}

/// The outcome shapes of a task that travels in its slot header's word ([`TinyWorker`]).
#[derive(Debug, Clone, Copy)]
enum TinyShape {
    /// An empty output: the result travels in the header word too.
    Word,
    /// A small output, inline in the slot's data area.
    Inline,
    /// A large output: a ring record.
    Record,
    /// An error message.
    Error,
    /// A panic message.
    Panic,
    /// An output larger than half the ring.
    TooLarge,
}

const TINY_SHAPES: [TinyShape; 6] = [
    TinyShape::Word,
    TinyShape::Inline,
    TinyShape::Record,
    TinyShape::Error,
    TinyShape::Panic,
    TinyShape::TooLarge,
];

fn tiny_task(shape: TinyShape, i: u64) -> u64 {
    match shape {
        TinyShape::Word => i << 32,
        TinyShape::Inline => i << 32 | 40,
        TinyShape::Record => i << 32 | (BIG as u64 + i),
        TinyShape::Error => TINY_FAIL,
        TinyShape::Panic => TINY_PANIC,
        TinyShape::TooLarge => i << 32 | RING as u64,
    }
}

/// Checks a tiny task's answer; `Err(())` for a `WorkerDied`.
fn tiny_check(
    shape: TinyShape,
    i: u64,
    r: Result<Vec<u8>, TaskError>,
    ctx: &str,
) -> Result<(), ()> {
    match (shape, r) {
        (_, Err(TaskError::WorkerDied { .. })) => return Err(()),
        (TinyShape::Word | TinyShape::Inline | TinyShape::Record, Ok(o)) => {
            assert!(
                o == tiny_output(tiny_task(shape, i)),
                "{ctx}: task {i}: wrong output"
            )
        }
        (TinyShape::Error, Err(TaskError::Failed { message, .. })) => {
            assert_eq!(message.len(), "tiny error ".len() + 3000, "{ctx}")
        }
        (TinyShape::Panic, Err(TaskError::Panicked { message, .. })) => {
            assert!(message.starts_with("tiny panic "), "{ctx}: {message:.40}")
        }
        (TinyShape::TooLarge, Err(TaskError::ResultTooLarge { len, max, .. })) => {
            assert!(len > max, "{ctx}")
        }
        (_, other) => panic!("{ctx}: task {i} got {other:?}"),
    }
    Ok(())
}

/// The matrix for tasks that travel in the slot header's word (8 archived bytes or fewer):
/// a worker killed at every step with every shape of outcome (an output in the header word
/// too) costs only its task, and its seat then serves laps of the ring in which header-word,
/// inline and ring-record outcomes follow one another in the same slots.
#[test]
fn a_tiny_task_worker_killed_at_any_step_costs_only_its_task_and_its_seat_serves_on() {
    watchdog(600, || {
        for point in POINTS {
            for shape in TINY_SHAPES {
                let ctx = format!("tiny: {point} × {shape:?}");
                let pool = Pool::<TinyWorker>::builder()
                    .queue_size(16)
                    .max_workers(1)
                    .result_ring_bytes(RING)
                    .restart_on_panic(false)
                    .worker_env("STATEFUL_POOL_FAILPOINTS", format!("{point}@3/1"))
                    .build()
                    .unwrap();
                pool.spawn(&()).unwrap();
                the_death_costs_one_task(
                    &pool,
                    point,
                    &ctx,
                    |i| pool.submit(&tiny_task(shape, i)),
                    |i, r| tiny_check(shape, i, r, &ctx),
                );
                let per_lap = RING / (BIG as usize + 64);
                for i in 0..(4 * per_lap as u64 + 4) {
                    let s = TINY_SHAPES[(i % 4) as usize];
                    let r = pool.execute(&tiny_task(s, i));
                    tiny_check(s, i, r, &format!("{ctx}, lap task {i}"))
                        .expect("no death expected");
                }
                assert_eq!(pool.stats().worker_deaths, 1, "{ctx}: no further deaths");
            }
        }
    });
}

/// The same matrix with dynamic batching on: the worker takes several queued tasks at once,
/// so a death costs its whole batch (at least one task, never a task of another batch), and
/// the seat then serves batches of large results and messages, lap after lap.
#[test]
fn a_batching_worker_killed_at_any_step_with_any_result_shape_costs_only_its_batch() {
    watchdog(600, || {
        for point in POINTS {
            for shape in SHAPES {
                let ctx = format!("batching: {point} × {shape:?}");
                // The second hit: some points are hit once per batch, and 8 tasks make at
                // least 2 batches of at most 4 (but only 2 if the worker wakes late).
                let pool = matrix_pool(point, BatchPolicy::new(4), 2);
                let handles: Vec<TaskHandle<Out>> = (0..8u64)
                    .map(|i| pool.submit(&task(shape, i)))
                    .collect::<Result<_, _>>()
                    .unwrap_or_else(|e| panic!("{ctx}: submit failed: {e}"));
                let mut died = 0;
                for (i, h) in handles.into_iter().enumerate() {
                    match (shape, h.wait()) {
                        // A panic fails its whole batch step, with the first panic's message.
                        (Shape::Panic, Err(TaskError::Panicked { message, .. })) => {
                            assert!(message.starts_with("panic "), "{ctx}: {message:.40}")
                        }
                        (_, r) => {
                            if check(shape, i as u64, r, &ctx).is_err() {
                                died += 1;
                            }
                        }
                    }
                }
                assert!(died <= 4, "{ctx}: {died} tasks lost, more than one batch");
                // `after_publish` is hit once per batch, after its answers: its death costs
                // no task (and may not be counted yet when the last answer is read).
                let deaths = pool.stats().worker_deaths;
                if point == "after_publish" {
                    assert!(
                        deaths <= 1 && died == 0,
                        "{ctx}: {deaths} deaths, {died} lost"
                    );
                } else {
                    assert!(died >= 1, "{ctx}: the death cost no task?");
                    assert_eq!(deaths, 1, "{ctx}");
                }
                laps_batched(&pool, &ctx);
                // (An `after_publish` death may come during the laps: it costs no task.)
                assert!(pool.stats().worker_deaths <= 1, "{ctx}: no further deaths");
            }
        }
    });
}

/// Laps of the ring in batches: four large outputs or messages submitted together, each
/// checked.
fn laps_batched(pool: &Pool<TestWorker>, ctx: &str) {
    let per_lap = RING / (BIG as usize + 64);
    let n = 4 * per_lap as u64 + 4;
    for group in (0..n).collect::<Vec<_>>().chunks(4) {
        let shapes: Vec<Shape> = group
            .iter()
            .map(|i| {
                if i % 3 == 2 {
                    Shape::Error
                } else {
                    Shape::Record
                }
            })
            .collect();
        let handles: Vec<_> = group
            .iter()
            .zip(&shapes)
            .map(|(&i, &s)| pool.submit(&task(s, i)).unwrap())
            .collect();
        for ((&i, &s), h) in group.iter().zip(&shapes).zip(handles) {
            check(s, i, h.wait(), &format!("{ctx}, batched lap task {i}"))
                .expect("no death expected");
        }
    }
}

#[test]
fn results_nobody_collects_never_block_the_worker() {
    watchdog(300, || {
        // The audit's M1: one worker, three results of 1.5 MB in a 4 MiB ring; the caller
        // holds the first two handles and waits on the third.
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .result_ring_bytes(4 << 20)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("m1")).unwrap();
        let n = 1_500_000u32;
        let h1 = pool.submit(&Cmd::MakeBytes(n)).unwrap();
        let h2 = pool.submit(&Cmd::MakeBytes(n + 1)).unwrap();
        let h3 = pool.submit(&Cmd::MakeBytes(n + 2)).unwrap();
        assert_eq!(h3.wait().unwrap().bytes.len(), (n + 2) as usize);
        let o1 = h1.wait().unwrap();
        let o2 = h2.wait().unwrap();
        assert_eq!(o1.bytes.len(), n as usize);
        assert_eq!(o2.bytes.len(), (n + 1) as usize);
        assert!(
            o2.bytes
                .iter()
                .enumerate()
                .all(|(k, &b)| b == (k % 251) as u8)
        );

        // Many results collected in reverse order (a queue of 256, 32 KB each: twice the ring).
        let pool = Pool::<TestWorker>::builder()
            .queue_size(256)
            .max_workers(2)
            .result_ring_bytes(4 << 20)
            .build()
            .unwrap();
        for r in pool.spawn_n(&Spawn::ok("rev"), 2) {
            r.unwrap();
        }
        let handles: Vec<_> = (0..256u32)
            .map(|i| pool.submit(&Cmd::MakeBytes(32_000 + i)).unwrap())
            .collect();
        for (i, h) in handles.into_iter().enumerate().rev() {
            assert_eq!(h.wait().unwrap().bytes.len(), 32_000 + i);
        }

        // Dropping a pool while large results sit uncollected: the workers still finish, and
        // the handles (which outlive the pool) still get their results.
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .result_ring_bytes(1 << 20)
            .shutdown_timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("drop")).unwrap();
        let handles: Vec<_> = (0..6u32)
            .map(|i| pool.submit(&Cmd::MakeBytes(400_000 + i)).unwrap())
            .collect();
        drop(pool);
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().bytes.len(), 400_000 + i);
        }
    });
}

#[test]
fn wait_ref_results_are_private_copies_that_can_be_held() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .result_ring_bytes(256 * 1024)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("ref")).unwrap();
        // Hold many in-place results at once: far more than the ring could pin.
        let held: Vec<_> = (0..40u32)
            .map(|i| {
                pool.submit(&Cmd::MakeBytes(50_000 + i))
                    .unwrap()
                    .wait_ref()
                    .unwrap()
            })
            .collect();
        for (i, r) in held.iter().enumerate() {
            assert_eq!(r.bytes.len(), 50_000 + i);
            assert_eq!(r.to_owned().unwrap().bytes.len(), 50_000 + i);
        }
    });
}

/// Runs `n` tasks through a pool with one honest seat and one hostile seat (misbehaviours
/// `mask`, see `failpoint::hostile`): every task gets exactly one answer, the honest seat's
/// answers are all correct, and no pool thread fails.
fn survive_hostile(mask: u32, n: u64, batching: bool) {
    let policy = RestartPolicy {
        max_restarts: 10_000,
        window: Duration::from_secs(60),
        backoff_initial: Duration::from_millis(1),
        backoff_max: Duration::from_millis(1),
    };
    let pool = Pool::<TestWorker>::builder()
        .queue_size(16)
        .max_workers(2)
        .result_ring_bytes(64 * 1024)
        .restart_policy(policy)
        .batch_policy(if batching {
            BatchPolicy::new(8)
        } else {
            BatchPolicy::none()
        })
        .build()
        .unwrap();
    pool.spawn(&Spawn::ok("honest")).unwrap();
    pool.spawn_with(
        &Spawn::ok("hostile"),
        &SpawnOptions::new().env("STATEFUL_POOL_HOSTILE", mask.to_string()),
    )
    .unwrap();
    let (mut honest_ok, mut other) = (0, 0);
    let mut i = 0u64;
    while i < n {
        let batch: Vec<(u64, TaskHandle<Out>)> = (i..(i + 16).min(n))
            .map(|k| {
                let cmd = match k % 4 {
                    0 | 1 => Cmd::Echo(k),
                    2 => Cmd::MakeBytes(3000 + k as u32),
                    _ => Cmd::Fail(format!("f{k}")),
                };
                (k, pool.submit(&cmd).unwrap())
            })
            .collect();
        for (k, h) in batch {
            match (k % 4, h.wait()) {
                (0 | 1, Ok(o)) if o.worker == 0 => {
                    assert_eq!(o.value, k, "honest echo");
                    honest_ok += 1;
                }
                (2, Ok(o)) if o.worker == 0 => {
                    assert_eq!(o.bytes.len(), 3000 + k as usize, "honest bytes");
                    assert!(
                        o.bytes
                            .iter()
                            .enumerate()
                            .all(|(j, &b)| b == (j % 251) as u8)
                    );
                    honest_ok += 1;
                }
                (3, Err(TaskError::Failed { worker: 0, message })) => {
                    assert_eq!(message, format!("f{k}"), "honest error");
                    honest_ok += 1;
                }
                (_, Err(TaskError::PoolBroken)) => panic!("mask {mask}: the pool broke down"),
                (_, Err(TaskError::Submit(e))) => panic!("mask {mask}: submit failed: {e}"),
                // Anything else came from the hostile seat (or is its garbage): one answer.
                _ => other += 1,
            }
        }
        i += 16;
    }
    eprintln!("mask {mask}: {honest_ok} honest answers, {other} others");
    assert!(
        honest_ok > 0,
        "mask {mask}: the honest worker served nothing"
    );
    // The pool still serves, and its counters (summed from what workers wrote) are numbers.
    for k in 0..20 {
        let _ = pool.execute(&Cmd::Echo(k));
    }
    // (Summing garbage counters saturates instead of overflowing: this must not panic.)
    let _ = pool.stats();
}

#[test]
fn a_hostile_worker_cannot_hurt_the_parent_or_other_seats() {
    watchdog(600, || {
        use stateful_pool_hostile::*;
        for mask in [
            LIE,
            REWRITE,
            COUNTERS,
            RECORDS,
            CLAIMS,
            LIE | REWRITE | COUNTERS | RECORDS | CLAIMS,
        ] {
            survive_hostile(mask, 400, false);
        }
    });
}

/// The same with dynamic batching: a hostile worker also forges its batch block (held
/// entries naming other seats' slots, `started`, counters); every task still gets exactly one
/// answer, the honest seat's are right, and `stats()` stays a number.
#[test]
fn a_hostile_batching_worker_cannot_hurt_the_parent_or_other_seats() {
    watchdog(600, || {
        use stateful_pool_hostile::*;
        for mask in [CLAIMS, LIE | REWRITE | COUNTERS | RECORDS | CLAIMS] {
            survive_hostile(mask, 400, true);
        }
    });
}

/// The misbehaviour bits of `STATEFUL_POOL_HOSTILE` (src/failpoint.rs).
mod stateful_pool_hostile {
    pub(crate) const LIE: u32 = 1;
    pub(crate) const REWRITE: u32 = 2;
    pub(crate) const COUNTERS: u32 = 4;
    pub(crate) const RECORDS: u32 = 8;
    pub(crate) const CLAIMS: u32 = 16;
}

#[test]
fn a_worker_killed_while_parked_leaves_no_sleeper_behind() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("idle")).unwrap();
        // The idle worker parks (counted once on `task_ready`).
        assert!(
            wait_until(30, || pool.__sleepers().0 == 1),
            "{:?}",
            pool.__sleepers()
        );
        for round in 0..5 {
            let pid = pool.workers()[0].pid;
            // SAFETY: a plain kill(2) of our own worker process.
            unsafe { libc::kill(pid as i32, libc::SIGKILL) };
            assert!(wait_until(30, || {
                let w = &pool.workers()[0];
                w.pid != pid && w.state == stateful_pool::WorkerState::Ready
            }));
            // The dead one's count was withdrawn: only the new worker is counted.
            assert!(
                wait_until(30, || pool.__sleepers().0 == 1),
                "round {round}: {:?}",
                pool.__sleepers()
            );
        }
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
    });
}

#[test]
fn a_timeout_kill_never_lands_on_the_next_task() {
    watchdog(300, || {
        // Tasks that run close to their limit: some time out, and their worker is killed. A
        // kill must hit only the task that ran too long, never the next one the worker took:
        // no task may end `WorkerDied`.
        let pool = Pool::<TestWorker>::builder()
            .queue_size(32)
            .task_timeout(Duration::from_millis(20))
            .restart_policy(RestartPolicy {
                max_restarts: 10_000,
                window: Duration::from_secs(60),
                backoff_initial: Duration::from_millis(1),
                backoff_max: Duration::from_millis(1),
            })
            .build()
            .unwrap();
        for r in pool.spawn_n(&Spawn::ok("t"), 2) {
            r.unwrap();
        }
        let (mut ok, mut timed_out) = (0, 0);
        for round in 0..10u64 {
            let handles: Vec<_> = (0..16u64)
                .map(|i| pool.submit(&Cmd::SleepMs(12 + (i + round) % 16)).unwrap())
                .collect();
            for h in handles {
                match h.wait() {
                    Ok(_) => ok += 1,
                    Err(TaskError::Timeout { .. }) => timed_out += 1,
                    Err(e) => panic!("a kill hit an innocent task: {e}"),
                }
            }
        }
        eprintln!("{ok} finished, {timed_out} timed out");
        assert!(ok > 0);
    });
}

#[test]
fn the_result_bound_does_not_depend_on_how_full_the_ring_is() {
    watchdog(120, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .result_ring_bytes(RING)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("bound")).unwrap();
        // 0.7 of the ring: above the bound (half the ring), refused on an empty ring and on a
        // part-full one alike.
        let big = (RING as u32 * 7) / 10;
        for round in 0..3 {
            match pool.execute(&Cmd::MakeBytes(big)) {
                Err(TaskError::ResultTooLarge { len, max, .. }) => {
                    assert!(len > big as usize && max < RING / 2, "round {round}")
                }
                other => panic!("round {round}: {other:?}"),
            }
            let keep = pool.submit(&Cmd::MakeBytes(20_000)).unwrap();
            assert_eq!(keep.wait().unwrap().bytes.len(), 20_000);
        }
        // Just under the bound: accepted.
        let max = RING / 2 - 32;
        let n = (max - 64) as u32; // the archive adds a few bytes of its own
        assert_eq!(
            pool.execute(&Cmd::MakeBytes(n)).unwrap().bytes.len(),
            n as usize
        );
    });
}

/// A waker whose `wake` panics: it makes the pool's reactor thread panic.
fn panicking_waker() -> std::task::Waker {
    use std::task::{RawWaker, RawWakerVTable, Waker};
    fn clone(_: *const ()) -> RawWaker {
        RawWaker::new(std::ptr::null(), &VTABLE)
    }
    fn wake(_: *const ()) {
        panic!("a waker that panics");
    }
    fn drop(_: *const ()) {}
    static VTABLE: RawWakerVTable = RawWakerVTable::new(clone, wake, wake, drop);
    // SAFETY: every vtable function ignores the (null) data pointer.
    unsafe { Waker::from_raw(RawWaker::new(std::ptr::null(), &VTABLE)) }
}

#[test]
fn a_panic_in_a_pool_thread_answers_every_task_instead_of_hanging() {
    watchdog(120, || {
        use std::future::Future;
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        for r in pool.spawn_n(&Spawn::ok("b"), 2) {
            r.unwrap();
        }
        // A task that would never finish on its own (it holds one worker; the other is free).
        let gate = gate_path("never-opened-broken");
        let stuck: Vec<_> = (0..1)
            .map(|_| {
                pool.submit(&Cmd::Gate(gate.to_string_lossy().into()))
                    .unwrap()
            })
            .collect();
        // A future polled with a waker that panics: when its task completes, the reactor wakes
        // it and panics.
        let open = gate_path("opened-later-broken");
        let mut fut = Box::pin(
            pool.submit(&Cmd::Gate(open.to_string_lossy().into()))
                .unwrap(),
        );
        let waker = panicking_waker();
        let mut cx = std::task::Context::from_waker(&waker);
        assert!(fut.as_mut().poll(&mut cx).is_pending());
        std::fs::write(&open, b"").unwrap();
        // The pool breaks down: the stuck tasks are answered, new work is refused.
        for h in stuck {
            assert!(matches!(h.wait(), Err(TaskError::PoolBroken)));
        }
        match pool.submit(&Cmd::Echo(2)) {
            Err(stateful_pool::SubmitError::Broken { reason }) => {
                assert!(reason.contains("reactor"), "{reason}")
            }
            other => panic!("expected Broken, got {:?}", other.map(|_| ())),
        }
        // The polled task finished before the breakdown: its result is still there.
        assert_eq!(futures_executor::block_on(fut).unwrap().value, 1);
        let _ = std::fs::remove_file(open);
    });
}

#[test]
fn a_worker_that_corrupts_the_shared_queue_cannot_hang_the_parent() {
    watchdog(600, || {
        // A worker that writes garbage into the task queue's cells can lose or duplicate queued
        // tasks of any seat; the parent must still never hang or panic: every task gets an
        // answer (its result, an error, or `PoolBroken` once the pool gives up on the queue).
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .max_workers(2)
            .task_timeout(Duration::from_secs(5))
            // A worker spinning on a garbled queue never sees it empty: shutdown kills it
            // after this grace.
            .shutdown_timeout(Duration::from_secs(2))
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("honest")).unwrap();
        pool.spawn_with(
            &Spawn::ok("hostile"),
            &SpawnOptions::new().env("STATEFUL_POOL_HOSTILE", "32"),
        )
        .unwrap();
        let (mut ok, mut failed, mut broken, mut refused) = (0, 0, 0, 0);
        let mut closed = false;
        for round in 0..12u64 {
            let mut handles = Vec::new();
            for k in 0..16u64 {
                match pool.submit(&Cmd::Echo(round * 16 + k)) {
                    Ok(h) => handles.push((k, h)),
                    // Refused once the pool broke down (or was closed below): a clear error.
                    Err(
                        stateful_pool::SubmitError::Broken { .. }
                        | stateful_pool::SubmitError::Shutdown,
                    ) => refused += 1,
                    Err(e) => panic!("submit: {e}"),
                }
            }
            for (k, h) in handles {
                // Bounded: a task lost from the queue is answered when the pool shuts down (or
                // breaks down), never left waiting.
                let r = if closed {
                    h.wait().map_err(WaitTimeoutError::Task)
                } else {
                    h.wait_timeout(Duration::from_secs(3))
                };
                match r {
                    Ok(o) => {
                        assert_eq!(o.value, round * 16 + k);
                        ok += 1
                    }
                    Err(WaitTimeoutError::Task(TaskError::PoolBroken)) => broken += 1,
                    Err(WaitTimeoutError::Timeout(h)) => {
                        // Lost in the garbled queue: shutting the pool down answers it.
                        pool.close_now();
                        closed = true;
                        assert!(h.wait().is_err());
                        failed += 1;
                    }
                    Err(_) => failed += 1,
                }
            }
        }
        eprintln!("{ok} answered, {failed} failed, {broken} after a breakdown, {refused} refused");
        assert_eq!(ok + failed + broken + refused, 12 * 16);
        drop(pool);
    });
}

/// Runs `f` while another thread keeps doing to the doorbell what a hostile worker could: it
/// zeroes the sleeper count (no notify that trusts it reaches the reactor) and puts the futex
/// word back to its first value (a sleep on that key misses the wake-ups sent since).
fn with_tampered_doorbell<R>(pool: &Pool<TestWorker>, f: impl FnOnce() -> R) -> R {
    let stop = std::sync::atomic::AtomicBool::new(false);
    let pinned = pool.__tamper_with_doorbell(None);
    std::thread::scope(|s| {
        s.spawn(|| {
            while !stop.load(std::sync::atomic::Ordering::SeqCst) {
                pool.__tamper_with_doorbell(Some(pinned));
                std::thread::sleep(Duration::from_micros(200));
            }
        });
        let r = f();
        stop.store(true, std::sync::atomic::Ordering::SeqCst);
        r
    })
}

/// With nothing in flight, the reactor sleeps with no timer (an idle pool takes no wake-ups)
/// on a word no worker can reach; the next submit wakes it. While tasks are in flight it looks
/// every second, so futures complete and dropped handles' slots are retired even while the
/// doorbell is tampered with as a hostile worker could.
#[test]
fn an_idle_reactor_sleeps_untimed_and_in_flight_work_survives_a_tampered_doorbell() {
    watchdog(180, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("untimed")).unwrap();
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
        assert!(wait_until(30, || pool.__reactor_sleeps_untimed()));
        for round in 0..10u64 {
            let cmd = Cmd::Echo(round);
            let fut = pool.task(&cmd).execute_async();
            assert_eq!(futures_executor::block_on(fut).unwrap().value, round);
            // Nothing in flight any more: back to the untimed sleep.
            assert!(
                wait_until(30, || pool.__reactor_sleeps_untimed()),
                "round {round}"
            );
        }
        with_tampered_doorbell(&pool, || {
            for round in 0..4u64 {
                // The reactor may be in its untimed sleep here: the submit wakes it.
                let cmd = Cmd::SleepMs(5 + round);
                let fut = pool.task(&cmd).execute_async();
                assert_eq!(futures_executor::block_on(fut).unwrap().value, 0);
                // A dropped handle: the reactor retires its slot when the task completes.
                drop(pool.submit(&Cmd::SleepMs(2)).unwrap());
            }
        });
        // Every slot came back: once nothing is in flight the reactor sleeps untimed again
        // (the dropped handles' slots are retired by then), and as many tasks as the queue
        // has slots fit at once.
        assert!(wait_until(30, || pool.__reactor_sleeps_untimed()));
        let n = pool.queue_size();
        let handles: Vec<_> = (0..n as u64)
            .map(|i| pool.try_submit(&Cmd::Echo(i)).unwrap())
            .collect();
        for (i, h) in handles.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
    });
}

/// A worker that needs completion-ring room while its earlier results sit uncollected asks
/// the reactor to move them out. With the doorbell tampered with, its request still gets
/// through: with tasks in flight the reactor looks every second.
#[test]
fn a_request_for_ring_room_survives_a_tampered_doorbell() {
    watchdog(180, || {
        let pool = Pool::<TestWorker>::builder()
            .max_workers(1)
            .result_ring_bytes(256 * 1024)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("room")).unwrap();
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
        assert!(wait_until(30, || pool.__reactor_sleeps_untimed()));
        with_tampered_doorbell(&pool, || {
            // 40 results of 50 kB: far more than the ring holds, none collected until the last.
            let handles: Vec<_> = (0..40u32)
                .map(|i| pool.submit(&Cmd::MakeBytes(50_000 + i)).unwrap())
                .collect();
            for (i, h) in handles.into_iter().enumerate().rev() {
                assert_eq!(h.wait().unwrap().bytes.len(), 50_000 + i);
            }
        });
    });
}
