//! Black-box tests of answers settled without a worker: a task past its
//! `TaskOptions::deadline` that no worker has claimed is answered `Timeout { worker: NO_WORKER }`
//! at the deadline, and a task cancelled before any worker claimed it is answered `Cancelled`
//! at once, however the caller collects; neither ever runs, and their slots (and loans) come
//! back once a worker pops and skips them.
//!
//! Ordering, not timing: a worker is held on a gate file while the answers are expected, and
//! "answered without a worker" means "answered while the gate is still shut". Sleeps are used
//! only to let a deadline itself pass.

stateful_pool::worker_hook!();

mod common;
use common::*;
use stateful_pool::{
    ErrorPolicy, NO_WORKER, Pool, RestartPolicy, SubmitError, TaskError, TaskOptions,
    WaitTimeoutError,
};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

// ---- helpers ----

fn count(c: &Count) -> usize {
    c.0.load(Ordering::SeqCst)
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// A gate file (shut until opened) and its cleanup.
struct Gate(PathBuf);

impl Gate {
    fn new(name: &str) -> Self {
        Gate(gate_path(name))
    }
    fn cmd(&self) -> Cmd {
        Cmd::Gate(s(&self.0))
    }
    fn open(&self) {
        std::fs::write(&self.0, b"").unwrap();
    }
    fn shut(&self) {
        let _ = std::fs::remove_file(&self.0);
    }
    fn path(&self) -> String {
        s(&self.0)
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

/// A held task: a `Step` that creates `started` once a worker runs it and waits on `gate`.
struct Held {
    started: PathBuf,
    gate: Gate,
}

impl Held {
    fn new(name: &str) -> Self {
        Held {
            started: gate_path(&format!("{name}-started")),
            gate: Gate::new(&format!("{name}-gate")),
        }
    }
    fn cmd(&self, id: u32) -> Cmd {
        Cmd::Step {
            id,
            started: s(&self.started),
            gate: self.gate.path(),
            fail: false,
        }
    }
    fn wait_started(&self) {
        assert!(
            wait_until(60, || self.started.exists()),
            "the held task never started"
        );
    }
}

impl Drop for Held {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.started);
    }
}

#[track_caller]
fn expect_timeout_no_worker<T: std::fmt::Debug>(r: Result<T, TaskError>, what: &str) {
    match r {
        Err(TaskError::Timeout { worker, .. }) => {
            assert_eq!(
                worker, NO_WORKER,
                "{what}: answered by the caller, not a worker"
            )
        }
        other => panic!("{what}: expected Timeout {{ worker: NO_WORKER }}, got {other:?}"),
    }
}

#[track_caller]
fn expect_timeout_any<T: std::fmt::Debug>(r: Result<T, TaskError>, what: &str) {
    match r {
        Err(TaskError::Timeout { .. }) => {}
        other => panic!("{what}: expected Timeout, got {other:?}"),
    }
}

#[track_caller]
fn wt<T: std::fmt::Debug, H>(
    r: Result<T, WaitTimeoutError<H>>,
    what: &str,
) -> Result<T, TaskError> {
    match r {
        Ok(v) => Ok(v),
        Err(WaitTimeoutError::Task(e)) => Err(e),
        Err(WaitTimeoutError::Timeout(_)) => panic!("{what}: the wait ran out, not answered"),
        Err(_) => panic!("{what}: an unknown WaitTimeoutError"),
    }
}

fn soon(ms: u64) -> Instant {
    Instant::now() + Duration::from_millis(ms)
}

/// Runs `f` on a thread and returns its result if it arrives within `secs`, else `None`
/// (the thread is left to finish on its own).
fn within<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> Option<T> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    rx.recv_timeout(Duration::from_secs(secs)).ok()
}

fn tick_pool(counters: &Counters, queue: usize) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(queue)
        .build()
        .unwrap();
    pool.spawn(&counters.spawn_args("bb")).unwrap();
    pool
}

/// Every way of collecting, rotated by `k`: the answer of a task that is, or is about to be,
/// settled without a worker.
fn collect_by(
    k: u32,
    h: stateful_pool::TaskHandle<Out>,
    rt: &tokio::runtime::Runtime,
) -> Result<u64, TaskError> {
    match k % 6 {
        0 => h.wait().map(|o| o.value),
        1 => h.wait_ref().map(|r| r.value.to_native()),
        2 => wt(h.wait_timeout(Duration::from_secs(60)), "wait_timeout").map(|o| o.value),
        3 => {
            assert!(wait_until(60, || h.is_finished()), "is_finished never true");
            wt(h.try_wait(), "try_wait after is_finished").map(|o| o.value)
        }
        4 => rt.block_on(h).map(|o| o.value),
        _ => {
            let (c, w) = counting_waker();
            if !h.wake_when_finished(&w) {
                assert!(wait_until(60, || count(&c) >= 1), "never woken");
            }
            assert!(h.is_finished(), "woken, yet not finished");
            wt(h.try_wait(), "try_wait after the wake").map(|o| o.value)
        }
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_time()
        .build()
        .unwrap()
}

// ---- tests ----

/// Many laps on one seat with a 3-slot queue: behind a held task, one task expires and one is
/// cancelled (each collected a different way each lap), both answered while the gate is shut;
/// then a normal task runs (its submit needs a slot the skipped tasks give back). Expired and
/// cancelled tasks never run.
#[test]
fn bb_many_laps_one_seat_mix_of_expired_cancelled_and_normal() {
    watchdog(300, || {
        const LAPS: u32 = 60;
        let counters = Counters::new("bb-laps", (LAPS * 4) as usize);
        let pool = tick_pool(&counters, 3);
        let rt = rt();
        for lap in 0..LAPS {
            let gate = Gate::new(&format!("bb-laps-{lap}"));
            let blocker = pool.submit(&gate.cmd()).unwrap();
            let id = |k: u32| lap * 4 + k;
            let exp = pool
                .task(&Cmd::Tick(id(0)))
                .deadline(soon(5 + (lap % 4) as u64 * 5))
                .submit()
                .unwrap();
            let can = pool.submit(&Cmd::Tick(id(1))).unwrap();
            // The queue is full now (3 slots).
            assert!(matches!(
                pool.try_submit(&Cmd::Tick(id(3))),
                Err(SubmitError::QueueFull)
            ));
            let t0 = Instant::now();
            let deadline_of_exp = t0; // only a lower bound for the check below
            if lap % 2 == 0 {
                can.cancel();
                assert!(can.is_finished(), "lap {lap}: cancelled task is finished");
                assert_eq!(
                    collect_by(lap, can, &rt).unwrap_err(),
                    TaskError::Cancelled,
                    "lap {lap}"
                );
                expect_timeout_no_worker(collect_by(lap + 1, exp, &rt), &format!("lap {lap}"));
            } else {
                expect_timeout_no_worker(collect_by(lap, exp, &rt), &format!("lap {lap}"));
                can.cancel();
                assert_eq!(
                    collect_by(lap + 3, can, &rt).unwrap_err(),
                    TaskError::Cancelled,
                    "lap {lap}"
                );
            }
            let _ = deadline_of_exp;
            assert!(
                !blocker.is_finished(),
                "lap {lap}: answered while the worker was held"
            );
            gate.open();
            assert_eq!(blocker.wait().unwrap().value, 1);
            // A slot must come back for this (bounded: 30 s).
            let normal = pool
                .task(&Cmd::Tick(id(2)))
                .submit_timeout(Duration::from_secs(30))
                .expect("a slot of a skipped task came back");
            assert_eq!(normal.wait().unwrap().value, id(2) as u64 * 3);
            assert_eq!(
                counters.get(id(0) as usize),
                0,
                "lap {lap}: expired task ran"
            );
            assert_eq!(
                counters.get(id(1) as usize),
                0,
                "lap {lap}: cancelled task ran"
            );
            assert_eq!(
                counters.get(id(2) as usize),
                1,
                "lap {lap}: normal task ran once"
            );
        }
        // All three slots are free at the end.
        let hs: Vec<_> = (0..3)
            .map(|i| {
                pool.task(&Cmd::Echo(i))
                    .submit_timeout(Duration::from_secs(30))
                    .unwrap()
            })
            .collect();
        for (i, h) in hs.into_iter().enumerate() {
            assert_eq!(h.wait().unwrap().value, i as u64);
        }
    });
}

/// An answer at the deadline never comes before it, whichever way the caller waits.
#[test]
fn bb_never_answered_before_the_deadline() {
    watchdog(240, || {
        let counters = Counters::new("bb-early", 64);
        let pool = tick_pool(&counters, 16);
        let held = Held::new("bb-early");
        let blocker = pool.submit(&held.cmd(63)).unwrap();
        held.wait_started();
        let rt = rt();
        for k in 0..12u32 {
            let at = soon(20 + 7 * k as u64);
            let r = if k % 6 == 5 {
                pool.task(&Cmd::Tick(k))
                    .deadline(at)
                    .execute()
                    .map(|o| o.value)
            } else {
                collect_by(
                    k,
                    pool.task(&Cmd::Tick(k)).deadline(at).submit().unwrap(),
                    &rt,
                )
            };
            let now = Instant::now();
            expect_timeout_no_worker(r, &format!("method {k}"));
            assert!(
                now >= at,
                "method {}: answered {:?} before its deadline",
                k % 6,
                at - now
            );
        }
        // An async execute too.
        let at = soon(30);
        let r = rt.block_on(pool.task(&Cmd::Tick(20)).deadline(at).execute_async());
        assert!(
            Instant::now() >= at,
            "execute_async answered before the deadline"
        );
        expect_timeout_no_worker(r, "execute_async");
        assert!(!blocker.is_finished());
        held.gate.open();
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 0..21 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// A deadline already in the past at submit: answered at once (while the worker is held), and
/// never run; with an idle worker it never runs either.
#[test]
fn bb_a_deadline_already_past_at_submit() {
    watchdog(120, || {
        let counters = Counters::new("bb-past", 16);
        let pool = tick_pool(&counters, 8);
        let held = Held::new("bb-past");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let past = Instant::now() - Duration::from_millis(50);
        let r = pool.task(&Cmd::Tick(0)).deadline(past).execute();
        eprintln!("deadline in the past: {r:?}");
        expect_timeout_no_worker(r, "execute, deadline past");
        let h = pool.task(&Cmd::Tick(1)).deadline(past).submit().unwrap();
        assert!(h.is_finished(), "a past deadline is finished at once");
        match h.try_wait() {
            Err(WaitTimeoutError::Task(e)) => expect_timeout_no_worker(Err::<(), _>(e), "try_wait"),
            other => panic!(
                "try_wait on a past deadline: {:?}",
                other
                    .map(|o| o.value)
                    .map_err(|e| matches!(e, WaitTimeoutError::Timeout(_)))
            ),
        }
        let h = pool.task(&Cmd::Tick(2)).deadline(past).submit().unwrap();
        let (c, w) = counting_waker();
        assert!(h.wake_when_finished(&w), "already finished");
        let _ = c;
        drop(h);
        assert!(!blocker.is_finished());
        held.gate.open();
        blocker.wait().unwrap();
        // An idle worker: the task may reach it first, but past its deadline it never runs.
        for k in 3..10u32 {
            let r = pool.task(&Cmd::Tick(k)).deadline(past).execute();
            expect_timeout_any(r, "idle worker, deadline past");
        }
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 0..10 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// The race of a deadline against an idle worker's claim, many laps: each task either runs
/// once and its caller gets the result, or never runs and its caller gets `Timeout`; and
/// whenever `is_finished` says true, `try_wait` does not come back pending.
#[test]
fn bb_claim_versus_expiry_race_gives_one_consistent_answer() {
    watchdog(300, || {
        const LAPS: u32 = 400;
        let counters = Counters::new("bb-race", LAPS as usize);
        let pool = tick_pool(&counters, 4);
        let rt = rt();
        let mut outcomes = Vec::new();
        for lap in 0..LAPS {
            let at = Instant::now() + Duration::from_micros((lap % 13) as u64 * 40);
            let h = pool.task(&Cmd::Tick(lap)).deadline(at).submit().unwrap();
            let r = match lap % 3 {
                0 => {
                    // Spin on is_finished; once true, collecting must not pend.
                    let end = Instant::now() + Duration::from_secs(30);
                    while !h.is_finished() {
                        assert!(Instant::now() < end, "lap {lap}: never finished");
                        std::hint::spin_loop();
                    }
                    match h.try_wait() {
                        Ok(o) => Ok(o.value),
                        Err(WaitTimeoutError::Task(e)) => Err(e),
                        Err(WaitTimeoutError::Timeout(_)) => {
                            panic!("lap {lap}: is_finished was true, yet try_wait pends")
                        }
                        Err(_) => panic!("unknown"),
                    }
                }
                1 => h.wait().map(|o| o.value),
                _ => rt.block_on(h).map(|o| o.value),
            };
            outcomes.push(r);
        }
        // FIFO on the one worker: everything before this has been popped.
        pool.execute(&Cmd::Echo(0)).unwrap();
        let (mut ran, mut expired) = (0, 0);
        for (lap, r) in outcomes.into_iter().enumerate() {
            let c = counters.get(lap);
            match r {
                Ok(v) => {
                    assert_eq!(v, lap as u64 * 3);
                    assert_eq!(c, 1, "lap {lap}: a result, so it ran once");
                    ran += 1;
                }
                Err(TaskError::Timeout { .. }) => {
                    assert_eq!(c, 0, "lap {lap}: answered Timeout, yet it ran {c} times");
                    expired += 1;
                }
                Err(e) => panic!("lap {lap}: {e:?}"),
            }
        }
        eprintln!("race: {ran} ran, {expired} expired");
    });
}

/// Loans sent with tasks that expire, are cancelled, or are dropped after expiry come back:
/// an arena that holds one loan at a time serves many laps.
#[test]
fn bb_loans_of_expired_and_cancelled_tasks_come_back() {
    watchdog(300, || {
        const LAPS: u32 = 24;
        const LOAN: usize = 600 << 10;
        let counters = Counters::new("bb-loans", 8);
        let pool = Pool::<TestWorker>::builder()
            .queue_size(4)
            .task_arena_bytes(1 << 20)
            .build()
            .unwrap();
        pool.spawn(&counters.spawn_args("loans")).unwrap();
        let rt = rt();
        let take_loan = |lap: u32| {
            let mut got = None;
            assert!(
                wait_until(30, || {
                    got = pool.try_loan(LOAN).ok();
                    got.is_some()
                }),
                "lap {lap}: the arena's space never came back"
            );
            let mut l = got.unwrap();
            l.as_mut_slice().fill((lap % 251) as u8);
            l
        };
        for lap in 0..LAPS {
            let gate = Gate::new(&format!("bb-loans-{lap}"));
            let blocker = pool.submit(&gate.cmd()).unwrap();
            let loan = take_loan(lap);
            // Only one such loan fits: a second is refused while the first is out.
            assert!(
                pool.try_loan(LOAN).is_err(),
                "lap {lap}: the arena holds one loan"
            );
            let req = pool.task(&Cmd::SumPayload).payload(loan);
            match lap % 4 {
                0 => {
                    let h = req.deadline(soon(5)).submit().unwrap();
                    expect_timeout_no_worker(collect_by(lap, h, &rt), "loan, expired");
                }
                1 => {
                    let h = req.submit().unwrap();
                    h.cancel();
                    assert_eq!(collect_by(lap, h, &rt).unwrap_err(), TaskError::Cancelled);
                }
                2 => {
                    // Expired, seen finished, then dropped uncollected.
                    let h = req.deadline(soon(5)).submit().unwrap();
                    assert!(wait_until(60, || h.is_finished()));
                    drop(h);
                }
                _ => {
                    // Expired and executed synchronously.
                    expect_timeout_no_worker(
                        req.deadline(soon(5)).execute().map(|o| o.value),
                        "loan, execute",
                    );
                }
            }
            assert!(!blocker.is_finished(), "lap {lap}: answered while held");
            gate.open();
            blocker.wait().unwrap();
        }
        // A normal loaned task still reads its payload right.
        let mut l = take_loan(7);
        l.as_mut_slice().fill(3);
        let out = pool.task(&Cmd::HashPayload).payload(l).execute().unwrap();
        assert_eq!(out.value, hash_bytes(&vec![3u8; LOAN]));
    });
}

/// Batches: a batch past its deadline is answered `Timeout` as a whole at the deadline, a
/// cancelled one `Cancelled` at once, whichever way collected; none of their tasks runs.
#[test]
fn bb_batches_settled_without_a_worker() {
    watchdog(240, || {
        let counters = Counters::new("bb-batch", 64);
        let pool = tick_pool(&counters, 8);
        let rt = rt();
        for lap in 0..4u32 {
            let held = Held::new(&format!("bb-batch-{lap}"));
            let blocker = pool.submit(&held.cmd(63)).unwrap();
            held.wait_started();
            let ids = |k: u32| lap * 12 + k * 3;
            let cmds = |k: u32| -> Vec<Cmd> { (0..3).map(|j| Cmd::Tick(ids(k) + j)).collect() };
            // wait
            let b = pool.batch(&cmds(0)).deadline(soon(10)).submit().unwrap();
            expect_timeout_no_worker(b.wait(), "batch wait");
            // .await
            let b = pool.batch(&cmds(1)).deadline(soon(10)).submit().unwrap();
            expect_timeout_no_worker(rt.block_on(b), "batch await");
            // wake_when_finished + try_wait
            let b = pool.batch(&cmds(2)).deadline(soon(10)).submit().unwrap();
            let (c, w) = counting_waker();
            if !b.wake_when_finished(&w) {
                assert!(wait_until(60, || count(&c) >= 1), "batch never woken");
            }
            assert!(b.is_finished());
            match b.try_wait() {
                Err(WaitTimeoutError::Task(e)) => {
                    expect_timeout_no_worker(Err::<(), _>(e), "batch try_wait")
                }
                Err(WaitTimeoutError::Timeout(_)) => panic!("batch try_wait pends after the wake"),
                Err(_) => panic!("unknown"),
                Ok(v) => panic!("batch ran: {} outcomes", v.len()),
            }
            // cancel on another thread, wait_timeout here.
            let b = pool.batch(&cmds(3)).submit().unwrap();
            let (c2, w2) = counting_waker();
            assert!(!b.wake_when_finished(&w2));
            std::thread::scope(|sc| {
                sc.spawn(|| b.cancel());
            });
            assert_eq!(count(&c2), 1, "the cancel woke the batch's waker");
            assert!(b.is_finished());
            match b.wait_timeout(Duration::from_secs(60)) {
                Err(WaitTimeoutError::Task(TaskError::Cancelled)) => {}
                Err(WaitTimeoutError::Task(e)) => panic!("batch cancel: {e:?}"),
                Err(WaitTimeoutError::Timeout(_)) => panic!("batch cancel: pends"),
                Err(_) => panic!("unknown"),
                Ok(_) => panic!("cancelled batch ran"),
            }
            // execute (sync) of a batch with a deadline
            expect_timeout_no_worker(
                pool.batch(&cmds(0)).deadline(soon(5)).execute(),
                "batch execute",
            );
            assert!(!blocker.is_finished(), "lap {lap}: answered while held");
            held.gate.open();
            blocker.wait().unwrap();
            pool.execute(&Cmd::Echo(0)).unwrap();
            for k in 0..12 {
                assert_eq!(
                    counters.get((lap * 12 + k) as usize),
                    0,
                    "lap {lap}: tick {k} ran"
                );
            }
        }
    });
}

/// A cancel on one thread, the wait on another (handles are `Send`), and a waker woken by the
/// cancel. A later `wake_when_finished` replaces the earlier waker: only the last one is woken
/// at a deadline.
#[test]
fn bb_cancel_on_one_thread_wait_on_another_and_wakers() {
    watchdog(240, || {
        let counters = Counters::new("bb-xthread", 64);
        let pool = Arc::new(tick_pool(&counters, 32));
        let held = Held::new("bb-xthread");
        let blocker = pool.submit(&held.cmd(63)).unwrap();
        held.wait_started();
        // Cancelled on this thread, collected on others.
        let mut waiters = Vec::new();
        let mut counts = Vec::new();
        for k in 0..8u32 {
            let h = pool.submit(&Cmd::Tick(k)).unwrap();
            let (c, w) = counting_waker();
            assert!(!h.wake_when_finished(&w));
            h.cancel();
            assert_eq!(count(&c), 1, "task {k}: woken by the cancel");
            counts.push(c);
            waiters.push(std::thread::spawn(move || h.wait().map(|o| o.value)));
        }
        for (k, t) in waiters.into_iter().enumerate() {
            assert_eq!(
                t.join().unwrap().unwrap_err(),
                TaskError::Cancelled,
                "task {k}"
            );
        }
        // Sent to another thread first, cancelled there, then sent back and collected.
        let h = pool.submit(&Cmd::Tick(20)).unwrap();
        let h = std::thread::spawn(move || {
            h.cancel();
            h
        })
        .join()
        .unwrap();
        assert!(h.is_finished());
        assert_eq!(h.wait().unwrap_err(), TaskError::Cancelled);
        // A waker replaced: only the second is woken at the deadline.
        let h = pool
            .task(&Cmd::Tick(21))
            .deadline(soon(500))
            .submit()
            .unwrap();
        let (a, wa) = counting_waker();
        let (b, wb) = counting_waker();
        assert!(!h.wake_when_finished(&wa));
        assert!(!h.wake_when_finished(&wb));
        assert!(
            wait_until(60, || count(&b) >= 1),
            "the later waker is woken"
        );
        assert_eq!(count(&a), 0, "the replaced waker is not woken");
        // A cancelled uncollected handle, registered, while the gate opens and a worker skips
        // the task: no second wake.
        let late = pool.submit(&Cmd::Tick(22)).unwrap();
        let (lc, lw) = counting_waker();
        assert!(!late.wake_when_finished(&lw));
        late.cancel();
        assert_eq!(count(&lc), 1);
        assert!(!blocker.is_finished(), "all answered while held");
        held.gate.open();
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        // Give the reactor a chance to (wrongly) wake again: a second flush.
        pool.execute(&Cmd::Echo(1)).unwrap();
        eprintln!(
            "wakes after the worker skipped: cancelled {:?}, deadline {}, late {}",
            counts.iter().map(|c| count(c)).collect::<Vec<_>>(),
            count(&b),
            count(&lc)
        );
        assert_eq!(late.wait().unwrap_err(), TaskError::Cancelled);
        expect_timeout_no_worker(h.wait(), "after the waker swap");
        for k in [0, 1, 2, 3, 4, 5, 6, 7, 20, 21, 22] {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// A task settled without a worker (cancelled, or expired) whose handle is kept uncollected
/// with a registered waker: the waker is woken once when it settles, and not again when a
/// worker later pops and skips the task (ARCHITECTURE.md: the reactor "wakes the future
/// once"; a one-shot waker such as a completion queue would take a second wake for a second
/// completion).
#[test]
fn bb_a_settled_tasks_waker_is_not_woken_again_when_a_worker_skips_it() {
    watchdog(120, || {
        let counters = Counters::new("bb-rewake", 8);
        let pool = tick_pool(&counters, 8);
        let held = Held::new("bb-rewake");
        let blocker = pool.submit(&held.cmd(7)).unwrap();
        held.wait_started();
        let cancelled = pool.submit(&Cmd::Tick(0)).unwrap();
        let (cc, cw) = counting_waker();
        assert!(!cancelled.wake_when_finished(&cw));
        cancelled.cancel();
        assert_eq!(count(&cc), 1, "woken by the cancel");
        let expired = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(500))
            .submit()
            .unwrap();
        let (ec, ew) = counting_waker();
        assert!(!expired.wake_when_finished(&ew));
        assert!(wait_until(60, || count(&ec) == 1), "woken at the deadline");
        held.gate.open();
        blocker.wait().unwrap();
        // FIFO, one worker: both were popped and skipped before this runs.
        pool.execute(&Cmd::Echo(0)).unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        let (c, e) = (count(&cc), count(&ec));
        assert_eq!(cancelled.wait().unwrap_err(), TaskError::Cancelled);
        expect_timeout_no_worker(expired.wait(), "expired");
        assert_eq!(
            (c, e),
            (1, 1),
            "wakes of (cancelled, expired): woken again when the worker skipped them"
        );
    });
}

/// A `wait_timeout` shorter than the deadline hands the handle back; waiting again then gets
/// `Timeout` at the deadline. Handles with registered wakers, and futures cut short by a
/// tokio timeout, dropped before their deadlines: the reactor keeps answering the others.
#[test]
fn bb_short_waits_and_handles_dropped_before_their_deadline() {
    watchdog(120, || {
        let counters = Counters::new("bb-short", 64);
        let pool = tick_pool(&counters, 64);
        let held = Held::new("bb-short");
        let blocker = pool.submit(&held.cmd(63)).unwrap();
        held.wait_started();
        let at = soon(1000);
        let h = pool.task(&Cmd::Tick(0)).deadline(at).submit().unwrap();
        let h = match h.wait_timeout(Duration::from_millis(1)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            other => panic!(
                "a 1 ms wait on a 1 s deadline: {:?}",
                other.map(|o| o.value).is_ok()
            ),
        };
        assert!(!h.is_finished() || Instant::now() >= at);
        expect_timeout_no_worker(h.wait(), "wait after a short wait");
        assert!(Instant::now() >= at);
        // Registered, then dropped before the deadline.
        let mut counts = Vec::new();
        for k in 1..21u32 {
            let h = pool
                .task(&Cmd::Tick(k))
                .deadline(soon(50))
                .submit()
                .unwrap();
            let (c, w) = counting_waker();
            // Not asserted unfinished: on a stalled machine the 50 ms may already be over.
            let _ = h.wake_when_finished(&w);
            counts.push(c);
            drop(h);
        }
        // Futures cut short by a tokio timeout (their handles dropped, so cancelled).
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let survivors = rt.block_on(async {
            let mut cut = 0;
            for k in 21..31u32 {
                let h = pool
                    .task(&Cmd::Tick(k))
                    .deadline(soon(60_000))
                    .submit()
                    .unwrap();
                if tokio::time::timeout(Duration::from_millis(5), h)
                    .await
                    .is_err()
                {
                    cut += 1;
                }
            }
            let a = pool
                .task(&Cmd::Tick(31))
                .deadline(soon(40))
                .submit()
                .unwrap();
            let b = pool
                .task(&Cmd::Tick(32))
                .deadline(soon(80))
                .submit()
                .unwrap();
            let (a, b) = tokio::join!(a, b);
            (cut, a, b)
        });
        assert_eq!(survivors.0, 10);
        expect_timeout_no_worker(survivors.1, "a");
        expect_timeout_no_worker(survivors.2, "b");
        std::thread::sleep(Duration::from_millis(60)); // let the dropped ones' deadlines pass
        let after = soon(500);
        let (c, w) = counting_waker();
        let h = pool.task(&Cmd::Tick(40)).deadline(after).submit().unwrap();
        assert!(!h.wake_when_finished(&w));
        assert!(wait_until(30, || count(&c) == 1), "a later waker is woken");
        eprintln!(
            "wakes of dropped handles' wakers: {:?}",
            counts.iter().map(|c| count(c)).collect::<Vec<_>>()
        );
        assert!(!blocker.is_finished());
        held.gate.open();
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 0..41 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// Cancel and deadline on one task: the first settled answer stands, whichever comes first.
#[test]
fn bb_first_settled_answer_stands() {
    watchdog(120, || {
        let counters = Counters::new("bb-first", 16);
        let pool = tick_pool(&counters, 8);
        let held = Held::new("bb-first");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        // Cancelled, then its deadline passes: Cancelled.
        let a = pool
            .task(&Cmd::Tick(0))
            .deadline(soon(20))
            .submit()
            .unwrap();
        a.cancel();
        std::thread::sleep(Duration::from_millis(40)); // let the deadline pass
        assert!(a.is_finished());
        assert_eq!(
            a.wait().unwrap_err(),
            TaskError::Cancelled,
            "cancel came first"
        );
        // Expired (seen by is_finished), then cancelled: Timeout.
        let b = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(10))
            .submit()
            .unwrap();
        assert!(wait_until(60, || b.is_finished()));
        b.cancel();
        expect_timeout_no_worker(b.wait(), "deadline came first");
        // Expired but nobody looked, then cancelled: either answer, but a settled one.
        let c = pool
            .task(&Cmd::Tick(2))
            .deadline(soon(10))
            .submit()
            .unwrap();
        std::thread::sleep(Duration::from_millis(30)); // let the deadline pass
        c.cancel();
        assert!(c.is_finished());
        let r = c.wait();
        eprintln!("expired unobserved, then cancelled: {r:?}");
        assert!(matches!(
            r,
            Err(TaskError::Cancelled)
                | Err(TaskError::Timeout {
                    worker: NO_WORKER,
                    ..
                })
        ));
        // Cancelling twice is harmless.
        let d = pool.submit(&Cmd::Tick(3)).unwrap();
        d.cancel();
        d.cancel();
        assert_eq!(d.wait().unwrap_err(), TaskError::Cancelled);
        assert!(!blocker.is_finished());
        held.gate.open();
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 0..4 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// A handle whose `.await` (through `&mut`) answered is spent: cancelling it, asking
/// `is_finished` or dropping it later does not touch the next task in its slot (a one-slot
/// queue, so the next task must reuse it).
#[test]
fn bb_a_spent_handle_leaves_the_reused_slot_alone() {
    watchdog(120, || {
        let counters = Counters::new("bb-spent", 16);
        let pool = tick_pool(&counters, 1);
        let rt = rt();
        for lap in 0..6u32 {
            // A: settled without a worker (expired) or run normally.
            let mut a = if lap % 2 == 0 {
                pool.task(&Cmd::Echo(7)).submit().unwrap()
            } else {
                // A past deadline: settled at once (the worker may or may not reach it).
                pool.task(&Cmd::Echo(7))
                    .deadline(Instant::now() - Duration::from_millis(1))
                    .submit()
                    .unwrap()
            };
            let ra = rt.block_on(&mut a);
            if lap % 2 == 0 {
                assert_eq!(ra.unwrap().value, 7);
            } else {
                expect_timeout_any(ra, "a past deadline");
            }
            assert!(a.is_finished(), "a spent handle is finished");
            // B: the one slot's next task, held until we say so.
            let held = Held::new(&format!("bb-spent-{lap}"));
            let b = pool
                .task(&held.cmd(lap))
                .submit_timeout(Duration::from_secs(30))
                .expect("the one slot came back");
            held.wait_started();
            a.cancel();
            let _ = a.is_finished();
            drop(a);
            assert!(
                !b.is_finished(),
                "lap {lap}: the spent handle settled its successor"
            );
            held.gate.open();
            assert_eq!(b.wait().unwrap().value, lap as u64 * 3, "lap {lap}");
            assert_eq!(counters.get(lap as usize), 1);
        }
        // A queued successor (not yet claimed) is not cancelled by a spent handle either.
        let gate = Gate::new("bb-spent-q");
        let pool2 = Pool::<TestWorker>::builder().queue_size(2).build().unwrap();
        pool2.spawn(&counters.spawn_args("spent2")).unwrap();
        let blocker = pool2.submit(&gate.cmd()).unwrap();
        let mut a = pool2
            .task(&Cmd::Tick(10))
            .deadline(soon(5))
            .submit()
            .unwrap();
        expect_timeout_no_worker(rt.block_on(&mut a), "queued, expired");
        gate.open();
        blocker.wait().unwrap();
        gate.shut();
        let blocker = pool2
            .task(&gate.cmd())
            .submit_timeout(Duration::from_secs(30))
            .unwrap();
        let b = pool2
            .task(&Cmd::Tick(11))
            .submit_timeout(Duration::from_secs(30))
            .unwrap();
        a.cancel();
        drop(a);
        gate.open();
        blocker.wait().unwrap();
        assert_eq!(
            b.wait().unwrap().value,
            33,
            "the successor was not cancelled"
        );
        assert_eq!(counters.get(10), 0);
        assert_eq!(counters.get(11), 1);
    });
}

/// Many concurrent futures on a multi-threaded tokio runtime, with different deadlines, some
/// cancelled on a plain thread before they are awaited, registered far-deadline-first: each
/// is answered at (not before) its own deadline while the worker is held, and a far deadline
/// does not hold back nearer ones. The one with a far deadline is claimed in time and runs.
#[test]
fn bb_many_async_futures_with_different_deadlines() {
    watchdog(240, || {
        const N: u32 = 48;
        let counters = Counters::new("bb-async", 64);
        let pool = Arc::new(tick_pool(&counters, 64));
        let held = Held::new("bb-async");
        let blocker = pool.submit(&held.cmd(63)).unwrap();
        held.wait_started();
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        // Far deadline first, registered with the reactor before the others.
        let far = pool
            .task(&Cmd::Tick(60))
            .deadline(soon(120_000))
            .submit()
            .unwrap();
        let far = rt.spawn(far);
        let mut futs = Vec::new();
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        for k in 0..N {
            // Later tasks get earlier deadlines: the reactor must shorten its sleep.
            let at = soon(30 + ((N - k) as u64 * 11) % 400);
            let h = pool.task(&Cmd::Tick(k)).deadline(at).submit().unwrap();
            if k % 5 == 0 {
                let tx = tx.clone();
                std::thread::spawn(move || {
                    h.cancel();
                    let _ = tx.send((k, h));
                });
                continue;
            }
            futs.push(rt.spawn(async move {
                let r = h.await;
                (k, at, Instant::now(), r)
            }));
        }
        drop(tx);
        let cancelled = rt.spawn(async move {
            let mut out = Vec::new();
            while let Some((k, h)) = rx.recv().await {
                out.push((k, h.await));
            }
            out
        });
        let all = rt.block_on(async {
            let mut v = Vec::new();
            for f in futs {
                v.push(f.await.unwrap());
            }
            v
        });
        for (k, at, when, r) in all {
            expect_timeout_no_worker(r, &format!("future {k}"));
            assert!(when >= at, "future {k} answered before its deadline");
        }
        let c = rt.block_on(cancelled).unwrap();
        assert_eq!(c.len(), (N as usize).div_ceil(5));
        for (k, r) in c {
            assert_eq!(r.unwrap_err(), TaskError::Cancelled, "cancelled future {k}");
        }
        assert!(!far.is_finished(), "the far deadline is still pending");
        assert!(
            !blocker.is_finished(),
            "all answered while the worker was held"
        );
        held.gate.open();
        blocker.wait().unwrap();
        let r = rt.block_on(far).unwrap();
        assert_eq!(r.unwrap().value, 180, "claimed in time: it runs");
        for k in 0..N as usize {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
        assert_eq!(counters.get(60), 1);
    });
}

/// A near deadline registered after a far one, by a blocking caller and by a waker: answered
/// while the far one is still pending (the reactor's sleep shortens).
#[test]
fn bb_a_near_deadline_after_a_far_one_is_not_held_back() {
    watchdog(120, || {
        let counters = Counters::new("bb-nearfar", 8);
        let pool = tick_pool(&counters, 8);
        let held = Held::new("bb-nearfar");
        let blocker = pool.submit(&held.cmd(7)).unwrap();
        held.wait_started();
        let far = pool
            .task(&Cmd::Tick(0))
            .deadline(soon(60_000))
            .submit()
            .unwrap();
        let (fc, fw) = counting_waker();
        assert!(!far.wake_when_finished(&fw));
        let near = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(500))
            .submit()
            .unwrap();
        let (nc, nw) = counting_waker();
        assert!(!near.wake_when_finished(&nw));
        assert!(
            wait_until(30, || count(&nc) == 1),
            "the near deadline's waker never woke"
        );
        assert_eq!(count(&fc), 0);
        assert!(!far.is_finished());
        expect_timeout_no_worker(wt(near.try_wait(), "near, woken"), "near");
        held.gate.open();
        blocker.wait().unwrap();
        assert!(
            wait_until(30, || count(&fc) >= 1),
            "the far one woken at completion"
        );
        assert_eq!(count(&fc), 1, "the far one woken once");
        assert_eq!(far.wait().unwrap().value, 0);
    });
}

/// A task with retries whose worker died while running it is re-queued; if its deadline has
/// passed and no worker claims it (the restart is held in its spawn step), it is answered
/// `Timeout` without a worker, by `is_finished` and by a waiting caller. Tasks with deadlines
/// or cancels submitted while the seat restarts are answered too, and never run.
#[test]
fn bb_deadlines_and_cancels_while_the_only_worker_restarts() {
    watchdog(240, || {
        let counters = Counters::new("bb-restart", 16);
        let spawn_gate = Gate::new("bb-restart-spawn");
        spawn_gate.open();
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .build()
            .unwrap();
        pool.spawn(&Spawn {
            gate: spawn_gate.path(),
            ..counters.spawn_args("restart")
        })
        .unwrap();
        // The next start of the seat will wait in its spawn step.
        spawn_gate.shut();
        let marker = gate_path("bb-restart-died");
        let at = soon(1500);
        let retried = pool
            .task(&Cmd::DieOnce(s(&marker)))
            .retries(3)
            .deadline(at)
            .submit()
            .unwrap();
        let claimed = wait_until(60, || marker.exists());
        // Queued while the seat restarts (held in its spawn step).
        let exp = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(20))
            .submit()
            .unwrap();
        let can = pool.submit(&Cmd::Tick(2)).unwrap();
        let can2 = pool.submit(&Cmd::Tick(3)).unwrap();
        can.cancel();
        assert_eq!(can.wait().unwrap_err(), TaskError::Cancelled);
        expect_timeout_no_worker(exp.wait(), "expired while the seat restarts");
        // Cancel on another thread while this one is about to collect.
        std::thread::scope(|sc| {
            sc.spawn(|| can2.cancel());
        });
        assert!(can2.is_finished());
        assert_eq!(
            wt(can2.try_wait(), "cancelled")
                .map(|o| o.value)
                .unwrap_err(),
            TaskError::Cancelled
        );
        if claimed {
            // Its worker died running it; re-queued; the deadline passes with no worker.
            let r = within(20, move || retried.wait().map(|o| o.value));
            let answered_while_shut = r.is_some();
            spawn_gate.open();
            eprintln!("retried task past its deadline, re-queued: {r:?}");
            match r {
                Some(r) => expect_timeout_no_worker(r, "re-queued past its deadline"),
                None => panic!(
                    "a re-queued task past its deadline, with no worker to claim it, was not \
                     answered at the deadline (still waiting 20 s later)"
                ),
            }
            assert!(answered_while_shut);
        } else {
            spawn_gate.open();
            expect_timeout_any(retried.wait(), "never claimed");
        }
        spawn_gate.open();
        assert!(wait_until(60, || pool.num_workers() == 1));
        assert_eq!(pool.execute(&Cmd::Tick(4)).unwrap().value, 12);
        for k in 1..4 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
        let _ = std::fs::remove_file(&marker);
    });
}

/// Same as above, but `is_finished`/`try_wait` instead of a blocked waiter: the re-queued
/// task past its deadline is finished once no worker holds it.
#[test]
fn bb_a_requeued_task_past_its_deadline_is_finished() {
    watchdog(240, || {
        let counters = Counters::new("bb-requeue", 16);
        let spawn_gate = Gate::new("bb-requeue-spawn");
        spawn_gate.open();
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .build()
            .unwrap();
        pool.spawn(&Spawn {
            gate: spawn_gate.path(),
            ..counters.spawn_args("requeue")
        })
        .unwrap();
        spawn_gate.shut();
        let marker = gate_path("bb-requeue-died");
        let at = soon(1500);
        let retried = pool
            .task(&Cmd::DieOnce(s(&marker)))
            .retries(3)
            .deadline(at)
            .submit()
            .unwrap();
        let claimed = wait_until(60, || marker.exists());
        if claimed {
            while Instant::now() <= at + Duration::from_millis(20) {
                std::thread::sleep(Duration::from_millis(5)); // let the deadline pass
            }
            let fin = wait_until(10, || retried.is_finished());
            spawn_gate.open();
            assert!(
                fin,
                "re-queued past its deadline with no worker: is_finished stayed false"
            );
            match retried.try_wait() {
                Err(WaitTimeoutError::Task(e)) => {
                    expect_timeout_any(Err::<(), _>(e), "re-queued, try_wait")
                }
                Err(WaitTimeoutError::Timeout(_)) => panic!("finished, yet pending"),
                Err(_) => panic!("unknown"),
                Ok(o) => panic!("ran after its deadline: {}", o.value),
            }
        } else {
            spawn_gate.open();
        }
        assert!(wait_until(60, || pool.num_workers() == 1));
        pool.execute(&Cmd::Echo(0)).unwrap();
        let _ = std::fs::remove_file(&marker);
    });
}

/// A task that keeps killing its worker, with retries and a deadline, among expired and
/// cancelled tasks: the expired and cancelled ones are answered (`Timeout`, `Cancelled`) and
/// never run, and the killer ends `WorkerDied` once its retries are spent.
#[test]
fn bb_a_killer_with_retries_among_settled_tasks() {
    watchdog(240, || {
        let counters = Counters::new("bb-killer", 32);
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .restart_policy(RestartPolicy::unlimited())
            .build()
            .unwrap();
        pool.spawn(&counters.spawn_args("killer")).unwrap();
        let rt = rt();
        for lap in 0..3u32 {
            let killer = pool
                .task(&Cmd::KillSelf)
                .retries(2)
                .deadline(soon(30_000))
                .submit()
                .unwrap();
            let mut settled = Vec::new();
            for k in 0..4u32 {
                let id = lap * 8 + k;
                let h = if k % 2 == 0 {
                    pool.task(&Cmd::Tick(id))
                        .deadline(soon(10))
                        .submit()
                        .unwrap()
                } else {
                    let h = pool.submit(&Cmd::Tick(id)).unwrap();
                    h.cancel();
                    h
                };
                settled.push((k, h));
            }
            let mut got = Vec::new();
            for (k, h) in settled {
                got.push((k, collect_by(k + lap, h, &rt)));
            }
            let r = killer.wait();
            assert!(
                matches!(r, Err(TaskError::WorkerDied { .. })),
                "lap {lap}: killer: {r:?}"
            );
            pool.execute(&Cmd::Echo(0)).unwrap();
            for (k, r) in got {
                let c = counters.get((lap * 8 + k) as usize);
                match r {
                    // A restarted worker may claim it within its 10 ms, or before the cancel
                    // on a stalled machine: then it runs.
                    Ok(v) => {
                        assert_eq!(v, (lap * 8 + k) as u64 * 3);
                        assert_eq!(c, 1, "lap {lap}: {k}: a result, so it ran once");
                    }
                    Err(TaskError::Timeout { .. }) if k % 2 == 0 => {
                        assert_eq!(c, 0, "lap {lap}: {k}: Timeout, yet it ran")
                    }
                    Err(TaskError::Cancelled) if k % 2 == 1 => {
                        assert_eq!(c, 0, "lap {lap}: {k}: Cancelled, yet it ran")
                    }
                    other => panic!("lap {lap}: task {k}: {other:?}"),
                }
            }
        }
        assert!(pool.stats().tasks_retried >= 6, "{:?}", pool.stats());
    });
}

/// A task with retries claimed in time, whose worker is killed after its deadline passed while
/// it ran: it is re-queued past its deadline, and with the seat's restart held in its spawn
/// step no worker claims it. A caller blocked in `wait` since before the deadline, and one
/// asking `is_finished`, are answered `Timeout` (it never runs again).
#[test]
fn bb_killed_after_its_deadline_and_requeued_with_no_worker() {
    watchdog(240, || {
        let counters = Counters::new("bb-killreq", 16);
        let spawn_gate = Gate::new("bb-killreq-spawn");
        spawn_gate.open();
        let pool = Arc::new(
            Pool::<TestWorker>::builder()
                .queue_size(16)
                .build()
                .unwrap(),
        );
        pool.spawn(&Spawn {
            gate: spawn_gate.path(),
            ..counters.spawn_args("killreq")
        })
        .unwrap();
        let held = Held::new("bb-killreq");
        let at = soon(2000);
        let a = pool
            .task(&held.cmd(1))
            .retries(2)
            .deadline(at)
            .submit()
            .unwrap();
        let b = pool
            .task(&held.cmd(2))
            .retries(2)
            .deadline(at)
            .submit()
            .unwrap();
        held.wait_started();
        // `a` was claimed in time (it started): a waiter blocks in `wait` on it.
        let (tx, rx) = std::sync::mpsc::channel();
        let waiter = std::thread::spawn(move || {
            let r = a.wait().map(|o| o.value);
            let _ = tx.send(());
            r
        });
        while Instant::now() <= at + Duration::from_millis(50) {
            std::thread::sleep(Duration::from_millis(5)); // let the deadline pass
        }
        // `b`, queued behind, expired without a worker.
        expect_timeout_no_worker(
            wt(b.wait_timeout(Duration::from_secs(30)), "b"),
            "b, queued behind",
        );
        spawn_gate.shut();
        let pid = pool.worker_pids()[0].1;
        // SAFETY: a plain syscall on our own worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let answered = rx.recv_timeout(Duration::from_secs(20)).is_ok();
        spawn_gate.open();
        held.gate.open();
        let r = waiter.join().unwrap();
        eprintln!("re-queued past its deadline: answered while no worker: {answered}, {r:?}");
        assert!(
            answered,
            "a re-queued task past its deadline with no worker to claim it: its blocked \
             caller was not answered (waited 20 s)"
        );
        expect_timeout_any(r, "re-queued past its deadline");
        assert!(wait_until(60, || pool.num_workers() == 1));
        pool.execute(&Cmd::Echo(0)).unwrap();
        assert_eq!(counters.get(1), 0, "it never completed a run");
        assert_eq!(counters.get(2), 0);
    });
}

fn killed_requeued_round(mode: &str) -> (bool, String) {
    let counters = Counters::new(&format!("bb-killreq-{mode}"), 16);
    let spawn_gate = Gate::new(&format!("bb-killreq-{mode}-spawn"));
    spawn_gate.open();
    let pool = Pool::<TestWorker>::builder()
        .queue_size(16)
        .build()
        .unwrap();
    pool.spawn(&Spawn {
        gate: spawn_gate.path(),
        ..counters.spawn_args("killreq")
    })
    .unwrap();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .unwrap();
    let held = Held::new(&format!("bb-killreq-{mode}"));
    let at = soon(2000);
    let a = pool
        .task(&held.cmd(1))
        .retries(2)
        .deadline(at)
        .submit()
        .unwrap();
    held.wait_started();
    let (c, w) = counting_waker();
    let (fut, a) = if mode == "future" {
        (Some(rt.spawn(a)), None)
    } else {
        assert!(!a.wake_when_finished(&w));
        (None, Some(a))
    };
    while Instant::now() <= at + Duration::from_millis(50) {
        std::thread::sleep(Duration::from_millis(5)); // let the deadline pass
    }
    assert_eq!(count(&c), 0, "no wake at a claimed task's deadline");
    spawn_gate.shut();
    let pid = pool.worker_pids()[0].1;
    // SAFETY: a plain syscall on our own worker.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let done = wait_until(20, || match &fut {
        Some(f) => f.is_finished(),
        None => count(&c) >= 1,
    });
    spawn_gate.open();
    held.gate.open();
    let r = match (fut, a) {
        (Some(f), _) => rt.block_on(f).unwrap().map(|o| o.value),
        (None, Some(a)) => a.wait().map(|o| o.value),
        _ => unreachable!(),
    };
    assert!(matches!(r, Err(TaskError::Timeout { .. })), "{mode}: {r:?}");
    assert!(wait_until(60, || pool.num_workers() == 1));
    (done, format!("{r:?}"))
}

/// As above, for a future (`.await` on tokio) and for a `wake_when_finished` waker registered
/// before the deadline: answered (woken) once the task is re-queued past its deadline with no
/// worker to claim it.
#[test]
fn bb_killed_after_its_deadline_and_requeued_future_and_waker_are_answered() {
    watchdog(240, || {
        let mut bad = Vec::new();
        for mode in ["future", "waker"] {
            let (done, r) = killed_requeued_round(mode);
            eprintln!("{mode}: answered while no worker: {done}; finally {r}");
            if !done {
                bad.push(mode);
            }
        }
        assert!(
            bad.is_empty(),
            "not answered while no worker could claim the task: {bad:?}"
        );
    });
}

/// As above, asked with `is_finished` / `try_wait` instead of a blocked `wait`.
#[test]
fn bb_killed_after_its_deadline_and_requeued_is_finished_with_no_worker() {
    watchdog(240, || {
        let counters = Counters::new("bb-killreq2", 16);
        let spawn_gate = Gate::new("bb-killreq2-spawn");
        spawn_gate.open();
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .build()
            .unwrap();
        pool.spawn(&Spawn {
            gate: spawn_gate.path(),
            ..counters.spawn_args("killreq2")
        })
        .unwrap();
        let held = Held::new("bb-killreq2");
        let at = soon(2000);
        let a = pool
            .task(&held.cmd(1))
            .retries(2)
            .deadline(at)
            .submit()
            .unwrap();
        held.wait_started();
        while Instant::now() <= at + Duration::from_millis(50) {
            std::thread::sleep(Duration::from_millis(5)); // let the deadline pass
        }
        assert!(
            !a.is_finished(),
            "claimed in time and running: not finished"
        );
        spawn_gate.shut();
        let pid = pool.worker_pids()[0].1;
        // SAFETY: a plain syscall on our own worker.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        let fin = wait_until(20, || a.is_finished());
        let r = if fin {
            Some(a.try_wait().map(|o| o.value))
        } else {
            None
        };
        spawn_gate.open();
        held.gate.open();
        eprintln!("killed past its deadline, re-queued: is_finished {fin}");
        assert!(
            fin,
            "re-queued past its deadline with no worker: is_finished stayed false 20 s"
        );
        match r.unwrap() {
            Err(WaitTimeoutError::Task(e)) => expect_timeout_no_worker(Err::<(), _>(e), "try_wait"),
            Err(WaitTimeoutError::Timeout(_)) => panic!("is_finished, yet try_wait pends"),
            Err(_) => panic!("unknown"),
            Ok(v) => panic!("ran: {v}"),
        }
        assert!(wait_until(60, || pool.num_workers() == 1));
        pool.execute(&Cmd::Echo(0)).unwrap();
        assert_eq!(counters.get(1), 0);
    });
}

/// A shutdown with expired and cancelled tasks still queued: answers already settled stay as
/// they were (`Timeout { NO_WORKER }`, `Cancelled`), handles outlive the pool, nothing runs.
#[test]
fn bb_shutdown_now_keeps_settled_answers() {
    watchdog(240, || {
        let counters = Counters::new("bb-shutnow", 16);
        let pool = Pool::<TestWorker>::builder()
            .queue_size(16)
            .shutdown_timeout(Duration::from_millis(300))
            .build()
            .unwrap();
        pool.spawn(&counters.spawn_args("shutnow")).unwrap();
        let held = Held::new("bb-shutnow");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let seen = pool
            .task(&Cmd::Tick(0))
            .deadline(soon(10))
            .submit()
            .unwrap();
        assert!(wait_until(60, || seen.is_finished()));
        let unseen = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(10))
            .submit()
            .unwrap();
        let cancelled = pool.submit(&Cmd::Tick(2)).unwrap();
        cancelled.cancel();
        let queued = pool.submit(&Cmd::Tick(3)).unwrap();
        let (wc, ww) = counting_waker();
        assert!(!queued.wake_when_finished(&ww));
        std::thread::sleep(Duration::from_millis(30)); // let `unseen`'s deadline pass
        pool.shutdown_now();
        expect_timeout_no_worker(seen.wait(), "expired, seen before the shutdown");
        assert_eq!(cancelled.wait().unwrap_err(), TaskError::Cancelled);
        let u = unseen.wait();
        eprintln!("expired, unseen, then shutdown_now: {u:?}");
        assert!(matches!(
            u,
            Err(TaskError::Timeout { .. }) | Err(TaskError::Cancelled)
        ));
        assert_eq!(queued.wait().unwrap_err(), TaskError::Cancelled);
        assert!(
            count(&wc) >= 1,
            "the queued task's waker was woken by the shutdown"
        );
        assert_eq!(
            blocker.wait().unwrap_err(),
            TaskError::Cancelled,
            "killed at the timeout"
        );
        for k in 0..4 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// A graceful close with expired tasks queued: the workers finish the queue (skipping the
/// expired and cancelled ones), and the answers settled before stay.
#[test]
fn bb_graceful_close_with_expired_tasks_queued() {
    watchdog(240, || {
        let counters = Counters::new("bb-close", 16);
        let pool = Arc::new(tick_pool(&counters, 16));
        let held = Held::new("bb-close");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let seen = pool
            .task(&Cmd::Tick(0))
            .deadline(soon(10))
            .submit()
            .unwrap();
        assert!(wait_until(60, || seen.is_finished()));
        let unseen = pool
            .task(&Cmd::Tick(1))
            .deadline(soon(10))
            .submit()
            .unwrap();
        let cancelled = pool.submit(&Cmd::Tick(2)).unwrap();
        cancelled.cancel();
        let normal = pool.submit(&Cmd::Tick(3)).unwrap();
        std::thread::sleep(Duration::from_millis(30)); // let `unseen`'s deadline pass
        let closer = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.close())
        };
        assert!(wait_until(60, || pool.is_closing()));
        // Answered while closing, before the gate opens.
        expect_timeout_no_worker(unseen.wait(), "expired, collected during the close");
        held.gate.open();
        closer.join().unwrap();
        expect_timeout_no_worker(seen.wait(), "expired, seen before the close");
        assert_eq!(cancelled.wait().unwrap_err(), TaskError::Cancelled);
        assert_eq!(normal.wait().unwrap().value, 9, "the queue was finished");
        assert_eq!(blocker.wait().unwrap().value, 45);
        for k in 0..3 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
        assert_eq!(counters.get(3), 1);
    });
}

/// A broadcast waits for a held worker; expired and cancelled tasks queued meanwhile are
/// answered without it, and the broadcast still reaches it, before the queued tasks.
#[test]
fn bb_broadcast_past_settled_tasks() {
    watchdog(120, || {
        let counters = Counters::new("bb-bcast", 16);
        let pool = Arc::new(tick_pool(&counters, 16));
        let held = Held::new("bb-bcast");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let exp = pool
            .task(&Cmd::Tick(0))
            .deadline(soon(10))
            .submit()
            .unwrap();
        let can = pool.submit(&Cmd::Tick(1)).unwrap();
        let b = {
            let pool = pool.clone();
            std::thread::spawn(move || pool.broadcast(&Cmd::Tick(5)))
        };
        can.cancel();
        assert_eq!(can.wait().unwrap_err(), TaskError::Cancelled);
        expect_timeout_no_worker(exp.wait(), "expired behind a broadcast");
        assert!(!b.is_finished());
        held.gate.open();
        let out = b.join().unwrap();
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].1.as_ref().unwrap().value, 15);
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        assert_eq!(
            (counters.get(0), counters.get(1), counters.get(5)),
            (0, 0, 1)
        );
    });
}

/// Handles dropped after their answer was settled (expired or cancelled), many of them in a
/// small queue: the slots come back once the worker skips them.
#[test]
fn bb_dropping_settled_handles_gives_slots_back() {
    watchdog(240, || {
        let counters = Counters::new("bb-drop", 256);
        let pool = tick_pool(&counters, 4);
        for lap in 0..30u32 {
            let gate = Gate::new(&format!("bb-drop-{lap}"));
            let blocker = pool
                .task(&gate.cmd())
                .submit_timeout(Duration::from_secs(30))
                .expect("slots came back");
            let mut hs = Vec::new();
            for k in 0..3u32 {
                let id = lap * 3 + k;
                let h = match (lap + k) % 3 {
                    0 => pool
                        .task(&Cmd::Tick(id))
                        .deadline(soon(3))
                        .submit()
                        .unwrap(),
                    1 => {
                        let h = pool.submit(&Cmd::Tick(id)).unwrap();
                        h.cancel();
                        h
                    }
                    _ => pool
                        .task(&Cmd::Tick(id))
                        .deadline(Instant::now() - Duration::from_millis(1))
                        .submit()
                        .unwrap(),
                };
                hs.push(h);
            }
            for h in &hs {
                assert!(wait_until(60, || h.is_finished()), "lap {lap}");
            }
            drop(hs);
            assert!(!blocker.is_finished());
            gate.open();
            blocker.wait().unwrap();
        }
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 0..90 {
            assert_eq!(counters.get(k), 0, "task {k} ran");
        }
    });
}

/// A map under `WaitOthers`: its first error is yielded once its own running task is done,
/// without waiting for other callers' tasks queued ahead of its cancelled ones. Two workers:
/// one held by another caller, one running the map's failing input, after which it takes
/// another caller's held task queued ahead of the map's other inputs.
#[test]
fn bb_map_wait_others_does_not_wait_for_tasks_queued_ahead() {
    watchdog(240, || {
        let counters = Counters::new("bb-map", 64);
        let pool = Arc::new(
            Pool::<TestWorker>::builder()
                .queue_size(32)
                .build()
                .unwrap(),
        );
        pool.spawn(&counters.spawn_args("m1")).unwrap();
        pool.spawn(&counters.spawn_args("m2")).unwrap();
        let other1 = Held::new("bb-map-o1");
        let o1 = pool.submit(&other1.cmd(40)).unwrap();
        other1.wait_started();
        let other2 = Gate::new("bb-map-o2");
        let failing = Held::new("bb-map-fail");
        let fail_cmd = Cmd::Step {
            id: 41,
            started: s(&failing.started),
            gate: failing.gate.path(),
            fail: true,
        };
        let outside = Arc::new(std::sync::Mutex::new(Vec::new()));
        let (tx, rx) = std::sync::mpsc::channel();
        let mapper = {
            let pool = pool.clone();
            let outside = outside.clone();
            let other2_cmd = other2.cmd();
            std::thread::spawn(move || {
                let p2 = pool.clone();
                let inputs = (0..8u32).map(move |i| {
                    if i == 1 {
                        // Another caller's task, queued after the map's first input and
                        // ahead of its others.
                        outside
                            .lock()
                            .unwrap()
                            .push(pool.submit(&other2_cmd).unwrap());
                    }
                    if i == 0 {
                        fail_cmd.clone()
                    } else {
                        Cmd::Tick(i)
                    }
                });
                let mut m = p2.map(inputs).window(8).on_error(ErrorPolicy::WaitOthers);
                let first = m.next();
                let _ = tx.send(());
                let rest: Vec<_> = m.collect();
                (
                    first.map(|r| r.map(|o| o.value).map_err(|e| (e.index, e.error))),
                    rest.len(),
                )
            })
        };
        failing.wait_started();
        assert!(wait_until(60, || outside.lock().unwrap().len() == 1));
        failing.gate.open();
        let got = rx.recv_timeout(Duration::from_secs(20));
        let still_shut = !other2.0.exists() && !other1.gate.0.exists();
        other1.gate.open();
        other2.open();
        assert!(
            got.is_ok() && still_shut,
            "the map's error waited for other callers' tasks"
        );
        let (first, rest) = mapper.join().unwrap();
        match first {
            Some(Err((0, TaskError::Failed { message, .. }))) => {
                assert!(message.contains("step 41 failed"), "{message}")
            }
            other => panic!("first item: {other:?}"),
        }
        assert_eq!(rest, 0, "the map ended");
        o1.wait().unwrap();
        let o2 = outside.lock().unwrap().pop().unwrap();
        assert_eq!(o2.wait().unwrap().value, 1);
        pool.execute(&Cmd::Echo(0)).unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 1..8 {
            assert_eq!(counters.get(k), 0, "map input {k} ran after the cancel");
        }
    });
}

/// A map whose error comes from a submit (an input too large): under `WaitOthers` it ends at
/// once, its earlier tasks (queued behind another caller's held task) cancelled without a
/// worker.
#[test]
fn bb_map_wait_others_submit_error_behind_a_held_worker() {
    watchdog(120, || {
        let counters = Counters::new("bb-map2", 16);
        let pool = Arc::new(
            Pool::<TestWorker>::builder()
                .queue_size(16)
                .task_arena_bytes(4096)
                .build()
                .unwrap(),
        );
        pool.spawn(&counters.spawn_args("m")).unwrap();
        let held = Held::new("bb-map2");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let p = pool.clone();
        let r = within(20, move || {
            let inputs = vec![
                Cmd::Tick(1),
                Cmd::Tick(2),
                Cmd::SumVec(vec![1; 100_000]),
                Cmd::Tick(3),
            ];
            let mut m = p.map(inputs).window(4).on_error(ErrorPolicy::WaitOthers);
            let first = m
                .next()
                .map(|r| r.map(|o| o.value).map_err(|e| (e.index, e.error)));
            let n = m.count();
            (first, n)
        });
        let shut = !blocker.is_finished();
        held.gate.open();
        let (first, n) = r.expect("the map's error waited for the held worker");
        assert!(shut);
        match first {
            Some(Err((2, TaskError::Submit(SubmitError::PayloadTooLarge { .. })))) => {}
            other => panic!("first item: {other:?}"),
        }
        assert_eq!(n, 0);
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 1..4 {
            assert_eq!(counters.get(k), 0, "input {k} ran");
        }
    });
}

fn map_deadline_round(mode: &'static str, base: u32) {
    let counters = Counters::new(&format!("bb-mapdl-{mode}"), 64);
    let pool = Arc::new(tick_pool(&counters, 16));
    let held = Held::new(&format!("bb-mapdl-{mode}"));
    let blocker = pool.submit(&held.cmd(63)).unwrap();
    held.wait_started();
    let opts = TaskOptions::new().deadline(soon(40));
    let p = pool.clone();
    let r = within(20, move || -> Vec<Result<u64, TaskError>> {
        let inputs: Vec<Cmd> = (0..6).map(|k| Cmd::Tick(base + k)).collect();
        let conv =
            |r: Result<Out, stateful_pool::MapError>| r.map(|o| o.value).map_err(|e| e.error);
        match mode {
            "ordered" => p.map(inputs).task_options(opts).map(conv).collect(),
            "unordered" => p
                .map(inputs)
                .unordered()
                .task_options(opts)
                .map(conv)
                .collect(),
            "batched" => p
                .map(inputs)
                .batch(3)
                .task_options(opts)
                .map(conv)
                .collect(),
            "stream-tokio" => {
                let rt = rt();
                rt.block_on(async {
                    use futures_util::StreamExt;
                    p.map_stream(futures_util::stream::iter(inputs))
                        .task_options(opts)
                        .map(conv)
                        .collect::<Vec<_>>()
                        .await
                })
            }
            _ => futures_executor::block_on_stream(
                p.map_stream(futures_util::stream::iter(inputs))
                    .task_options(opts),
            )
            .map(conv)
            .collect(),
        }
    });
    let shut = !blocker.is_finished();
    held.gate.open();
    let r = r.unwrap_or_else(|| panic!("{mode}: the map waited for the held worker (20 s)"));
    assert!(shut);
    assert_eq!(r.len(), 6, "{mode}");
    for (k, x) in r.into_iter().enumerate() {
        expect_timeout_no_worker(x, &format!("{mode} input {k}"));
    }
    blocker.wait().unwrap();
    pool.execute(&Cmd::Echo(0)).unwrap();
    for k in 0..6 {
        assert_eq!(counters.get((base + k) as usize), 0, "{mode}: task {k} ran");
    }
}

/// A map whose tasks carry a deadline (`task_options`): behind a held worker every input is
/// answered `Timeout` at its deadline (ordered, unordered, batched iterator), and none runs.
#[test]
fn bb_map_with_a_deadline_in_its_task_options() {
    watchdog(240, || {
        for (i, mode) in ["ordered", "unordered", "batched"].into_iter().enumerate() {
            map_deadline_round(mode, i as u32 * 10);
        }
    });
}

/// As above, for a map stream (`Pool::map_stream`) driven by `futures_executor`: its inputs'
/// deadlines pass behind a held worker.
#[test]
fn bb_map_stream_with_a_deadline_answers_at_the_deadline() {
    watchdog(120, || map_deadline_round("stream", 0));
}

/// As above, the stream driven by tokio.
#[test]
fn bb_map_stream_on_tokio_with_a_deadline_answers_at_the_deadline() {
    watchdog(120, || map_deadline_round("stream-tokio", 0));
}

/// A map stream under `WaitOthers` whose error comes from a submit, behind a held worker: it
/// ends without waiting for the worker (its queued tasks cancelled).
#[test]
fn bb_map_stream_wait_others_submit_error_behind_a_held_worker() {
    watchdog(120, || {
        let counters = Counters::new("bb-mapst2", 16);
        let pool = Arc::new(
            Pool::<TestWorker>::builder()
                .queue_size(16)
                .task_arena_bytes(4096)
                .build()
                .unwrap(),
        );
        pool.spawn(&counters.spawn_args("m")).unwrap();
        let held = Held::new("bb-mapst2");
        let blocker = pool.submit(&held.cmd(15)).unwrap();
        held.wait_started();
        let p = pool.clone();
        let r = within(20, move || {
            let inputs = vec![
                Cmd::Tick(1),
                Cmd::Tick(2),
                Cmd::SumVec(vec![1; 100_000]),
                Cmd::Tick(3),
            ];
            let items: Vec<_> = futures_executor::block_on_stream(
                p.map_stream(futures_util::stream::iter(inputs))
                    .window(4)
                    .on_error(ErrorPolicy::WaitOthers),
            )
            .map(|r| r.map(|o| o.value).map_err(|e| (e.index, e.error)))
            .collect();
            items
        });
        let shut = !blocker.is_finished();
        held.gate.open();
        let items = r.expect("the stream's error waited for the held worker");
        assert!(shut);
        assert_eq!(items.len(), 1, "{items:?}");
        assert!(
            matches!(
                items[0],
                Err((2, TaskError::Submit(SubmitError::PayloadTooLarge { .. })))
            ),
            "{items:?}"
        );
        blocker.wait().unwrap();
        pool.execute(&Cmd::Echo(0)).unwrap();
        for k in 1..4 {
            assert_eq!(counters.get(k), 0, "input {k} ran");
        }
    });
}

/// A task claimed in time runs and its caller gets the result, however it waits, even though
/// its deadline passes while it runs; many laps, each way of collecting.
#[test]
fn bb_claimed_in_time_runs_whatever_the_wait() {
    watchdog(300, || {
        let counters = Counters::new("bb-claimed", 32);
        let pool = tick_pool(&counters, 4);
        let rt = rt();
        for lap in 0..12u32 {
            let held = Held::new(&format!("bb-claimed-{lap}"));
            let at = soon(100);
            let h = pool.task(&held.cmd(lap)).deadline(at).submit().unwrap();
            let claimed = wait_until(60, || held.started.exists());
            let opener = {
                let gate = held.gate.0.clone();
                std::thread::spawn(move || {
                    while Instant::now() <= at + Duration::from_millis(30) {
                        std::thread::sleep(Duration::from_millis(5)); // let the deadline pass
                    }
                    std::fs::write(gate, b"").unwrap();
                })
            };
            let r = collect_by(lap, h, &rt);
            opener.join().unwrap();
            if claimed {
                assert_eq!(r.unwrap(), lap as u64 * 3, "lap {lap}");
                assert_eq!(counters.get(lap as usize), 1);
            }
        }
    });
}
