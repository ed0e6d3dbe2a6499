//! Races on the submit path (a submit under way marked on its own slot, per-slot task ids,
//! the reactor's untimed idle sleep): submits with every verb racing `close` / `close_now`,
//! bursts of `.await`s on a pool whose reactor just went to sleep with no timer, task ids on
//! small queues, dropped or cancelled handles racing shutdown and slot reuse, a task whose
//! serialisation fails or panics mid-submit, and futures dropped part-way.
//!
//! Every lap's outcome is checked against the documented one, whatever the interleaving: a
//! refused submit gets `SubmitError::Shutdown`; a submit that began after the shutdown began
//! (`is_closing()` already true) is refused; every accepted task is answered once (`Ok` with
//! its value, or `Cancelled` where an immediate shutdown or a cancel allows it); each task ran
//! exactly as often as its answer says (a counter per task id, incremented by the worker).
//! Timing is randomised (the seed is printed; `SUBMIT_RACES_SEED` replays it), never used to
//! decide an outcome.
mod common;
use common::*;
use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{
    BatchPolicy, BoxError, Pool, SubmitError, TaskContext, TaskError, TaskHandle, Worker,
    WorkerContext,
};
use std::collections::HashSet;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering::SeqCst};
use std::sync::{Arc, Barrier, Mutex};
use std::task::{Context, Poll, Wake, Waker};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

// ---------------------------------------------------------------------------------------------
// The worker: counts each run of each task id in a shared counters file, reports the task id it
// saw, hashes its payload, and can watch for its cancellation.

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
/// A task: count a run of `id`, maybe sleep or watch for a cancel.
pub struct Job {
    /// Counter index (unique per task within a lap).
    pub id: u32,
    /// Sleep this long (µs) before answering; with `until_cancelled`, the longest watch.
    pub sleep_us: u32,
    /// Watch `TaskContext::is_cancelled` (every 100 µs) for at most `sleep_us`.
    pub until_cancelled: bool,
}

impl Job {
    fn new(id: u32, sleep_us: u32) -> Job {
        Job {
            id,
            sleep_us,
            until_cancelled: false,
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
/// A task's answer.
pub struct Ans {
    /// `id * 3`.
    pub value: u64,
    /// `TaskContext::task_id` as the worker saw it.
    pub task_id: u64,
    /// `hash_bytes` of the payload (0 with none).
    pub payload: u64,
    /// Whether `is_cancelled` said so before the answer.
    pub saw_cancel: bool,
}

/// The worker (its counters file mapped).
pub struct RaceWorker {
    counters: memmap2::MmapMut,
}

impl Worker for RaceWorker {
    /// The counters file.
    type SpawnArgs = String;
    type SpawnOutput = ();
    type Task = Job;
    type Output = Ans;

    fn spawn(path: String, _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)?;
        // SAFETY: a test-owned file every process maps shared; accessed only atomically.
        let counters = unsafe { memmap2::MmapMut::map_mut(&f)? };
        Ok((RaceWorker { counters }, ()))
    }

    fn execute(&mut self, job: &ArchivedJob, ctx: &TaskContext<'_>) -> Result<Ans, BoxError> {
        let id = job.id.to_native();
        let words = self.counters.len() / 4;
        if id as usize >= words {
            return Err(format!("id {id} out of range").into());
        }
        // SAFETY: in bounds, 4-aligned (page-aligned map), every process only touches the
        // words atomically.
        let c = unsafe {
            &*(self.counters.as_mut_ptr().add(id as usize * 4)
                as *const std::sync::atomic::AtomicU32)
        };
        c.fetch_add(1, SeqCst);
        let us = job.sleep_us.to_native() as u64;
        if job.until_cancelled {
            let end = Instant::now() + Duration::from_micros(us);
            while !ctx.is_cancelled() && Instant::now() < end {
                std::thread::sleep(Duration::from_micros(100));
            }
        } else if us > 0 {
            std::thread::sleep(Duration::from_micros(us));
        }
        let p = ctx.payload();
        Ok(Ans {
            value: id as u64 * 3,
            task_id: ctx.task_id(),
            payload: if p.is_empty() { 0 } else { hash_bytes(p) },
            saw_cancel: ctx.is_cancelled(),
        })
    }
}

type P = Pool<RaceWorker>;

fn race_pool(counters: &Counters, queue: usize, workers: usize, batching: bool) -> P {
    let mut b = Pool::<RaceWorker>::builder()
        .queue_size(queue)
        .max_workers(4);
    if batching {
        b = b.batch_policy(BatchPolicy::new(4));
    }
    let pool = b.build().expect("build pool");
    let path = counters.path.to_string_lossy().into_owned();
    for r in pool.spawn_n(&path, workers) {
        r.expect("spawn");
    }
    pool
}

// ---------------------------------------------------------------------------------------------
// Randomness (timing only) and helpers.

struct Rng(u64);

impl Rng {
    fn new(seed: u64) -> Rng {
        Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1)
    }
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.0 = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
    fn chance(&mut self, pct: u64) -> bool {
        self.below(100) < pct
    }
}

fn seed(test: &str) -> u64 {
    let s = std::env::var("SUBMIT_RACES_SEED")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap()
                .as_nanos() as u64
        });
    eprintln!("{test}: seed {s} (SUBMIT_RACES_SEED={s} to replay the choices)");
    s
}

/// Varies timing: nothing, a yield, a short spin, or a short sleep (never synchronisation).
fn jitter(rng: &mut Rng, max_us: u64) {
    match rng.below(4) {
        0 => {}
        1 => std::thread::yield_now(),
        2 => {
            let end = Instant::now() + Duration::from_micros(rng.below(max_us + 1));
            while Instant::now() < end {
                std::hint::spin_loop();
            }
        }
        _ => std::thread::sleep(Duration::from_micros(rng.below(max_us + 1))),
    }
}

/// A waker that records that it was called and unparks the driving thread.
struct Flag {
    woken: AtomicBool,
    thread: std::thread::Thread,
}

impl Wake for Flag {
    fn wake(self: Arc<Self>) {
        self.woken.store(true, SeqCst);
        self.thread.unpark();
    }
}

/// Drives `fut` to completion on this thread, failing (with which of the two) if it is not
/// done within `bound`: never resolved, or resolved but its waker was never called (a lost
/// wake-up: the only poll after the last wake-up found it ready).
fn drive<F: Future>(fut: F, bound: Duration, what: &str) -> F::Output {
    let mut fut = std::pin::pin!(fut);
    let flag = Arc::new(Flag {
        woken: AtomicBool::new(false),
        thread: std::thread::current(),
    });
    let waker = Waker::from(flag.clone());
    let mut cx = Context::from_waker(&waker);
    let end = Instant::now() + bound;
    loop {
        flag.woken.store(false, SeqCst);
        if let Poll::Ready(v) = fut.as_mut().poll(&mut cx) {
            return v;
        }
        while !flag.woken.load(SeqCst) {
            let now = Instant::now();
            if now >= end {
                match fut.as_mut().poll(&mut cx) {
                    Poll::Ready(_) => {
                        panic!("{what}: ready after {bound:?}, but its waker was never called")
                    }
                    Poll::Pending => panic!("{what}: not resolved within {bound:?}"),
                }
            }
            std::thread::park_timeout(end - now);
        }
    }
}

const BOUND: Duration = Duration::from_secs(30);

/// What a task's counter must read once its pool is shut down.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Fate {
    /// Refused, or answered `Cancelled`: never ran.
    NotRun,
    /// Answered `Ok`: ran exactly once.
    Ran,
    /// Dropped unanswered: at most once.
    AtMostOnce,
}

fn check_counters(counters: &Counters, n: usize, fates: &[(u32, Fate)], lap: &str) {
    let mut seen = vec![None; n];
    for &(id, f) in fates {
        assert!(
            seen[id as usize].is_none(),
            "{lap}: id {id} used twice (test bug)"
        );
        seen[id as usize] = Some(f);
    }
    for (id, f) in seen.iter().enumerate() {
        let c = counters.get(id);
        match f {
            None => assert_eq!(c, 0, "{lap}: id {id} was never submitted but ran {c} times"),
            Some(Fate::NotRun) => {
                assert_eq!(
                    c, 0,
                    "{lap}: id {id} was refused or Cancelled but ran {c} times"
                )
            }
            Some(Fate::Ran) => assert_eq!(c, 1, "{lap}: id {id} answered Ok but ran {c} times"),
            Some(Fate::AtMostOnce) => {
                assert!(c <= 1, "{lap}: id {id} (handle dropped) ran {c} times")
            }
        }
    }
}

/// The outcome of one collected task (`Ok` with the right value, `Cancelled` where allowed).
fn judge(
    r: Result<Ans, TaskError>,
    job: &Job,
    tid: Option<u64>,
    payload: u64,
    cancel_ok: bool,
    what: &str,
) -> Fate {
    match r {
        Ok(a) => {
            assert_eq!(
                a.value,
                job.id as u64 * 3,
                "{what}: wrong answer {a:?} for {job:?}"
            );
            if let Some(t) = tid {
                assert_eq!(
                    a.task_id, t,
                    "{what}: the worker saw task id {} but the handle says {t}",
                    a.task_id
                );
            }
            assert_eq!(a.payload, payload, "{what}: payload hash");
            Fate::Ran
        }
        Err(TaskError::Cancelled) if cancel_ok => Fate::NotRun,
        Err(e) => {
            panic!("{what}: accepted task {job:?} answered {e:?} (cancel allowed: {cancel_ok})")
        }
    }
}

// ---------------------------------------------------------------------------------------------
// 1. Every verb racing close / close_now.

#[derive(Clone, Copy, Debug, PartialEq)]
enum CloseMode {
    Close,
    CloseNow,
    /// close and close_now from two threads at once.
    Both,
    /// close from two threads at once.
    CloseTwice,
}

/// State shared by one lap's threads.
struct Lap {
    pool: Arc<P>,
    /// `Cancelled` is a documented answer for an accepted task (an immediate shutdown).
    cancel_ok: bool,
    /// Set once a `close`/`close_now` call has returned: every accepted task is answered.
    closed: AtomicBool,
    refusals: AtomicUsize,
    accepted: AtomicUsize,
    name: String,
}

/// A submit refused: must be `Shutdown`, or (`soft_ok`: `try_submit`, a short
/// `submit_timeout`, `try_loan`) `QueueFull` / `Timeout` while the pool is not yet known to be
/// closing (`strict`: `is_closing()` said so before the call, or an earlier submit on this
/// thread was refused `Shutdown`). Whether it was a `Shutdown`.
fn refused(lap: &Lap, e: &SubmitError, what: &str, soft_ok: bool, strict: bool) -> bool {
    match e {
        SubmitError::Shutdown => {
            lap.refusals.fetch_add(1, SeqCst);
            true
        }
        SubmitError::QueueFull | SubmitError::Timeout if soft_ok && !strict => false,
        e => panic!(
            "{}: {what} refused with {e:?}, expected Shutdown (closing known before: {strict})",
            lap.name
        ),
    }
}

/// Checks what a submit attempt gave against what was known before it started.
fn accepted(lap: &Lap, closing_before: bool, refused_before: bool, what: &str) {
    lap.accepted.fetch_add(1, SeqCst);
    assert!(
        !closing_before,
        "{}: {what} began after is_closing() said true, yet was accepted",
        lap.name
    );
    assert!(
        !refused_before,
        "{}: {what} was accepted after an earlier submit on this thread was refused Shutdown",
        lap.name
    );
}

/// After a `close` returned, an accepted task must already be answered.
fn finished_if_closed<T: stateful_pool::Message>(lap: &Lap, h: &TaskHandle<T>, what: &str) {
    if lap.closed.load(SeqCst) {
        assert!(
            h.is_finished(),
            "{}: {what}: accepted, and a close() has returned, but the task is not finished",
            lap.name
        );
    }
}

const PER_THREAD_IDS: u32 = 4000;

/// One submitting thread: random verbs until it has been refused a few times (or a cap).
fn submitter(lap: &Lap, t: u32, mut rng: Rng) -> Vec<(u32, Fate)> {
    let pool = &*lap.pool;
    let mut next_id = t * PER_THREAD_IDS;
    let end_id = next_id + PER_THREAD_IDS - 8;
    let mut fates = Vec::new();
    let mut held: Vec<(TaskHandle<Ans>, Job)> = Vec::new();
    let mut refusals = 0;
    let mut refused_before = false;
    let cancel_ok = lap.cancel_ok;
    macro_rules! take {
        ($n:expr) => {{
            let id = next_id;
            next_id += $n;
            id
        }};
    }
    while refusals < 3 && next_id < end_id {
        let verb = rng.below(13);
        let sleep_us = if rng.chance(20) {
            rng.below(300) as u32
        } else {
            0
        };
        let closing_before = pool.is_closing();
        let strict = closing_before || refused_before;
        let what = format!("thread {t} verb {verb}");
        let mut was_refused = false;
        match verb {
            0 => {
                let job = Job::new(take!(1), sleep_us);
                match pool.execute(&job) {
                    Err(TaskError::Submit(e)) => {
                        assert!(refused(lap, &e, &what, false, strict));
                        was_refused = true;
                        fates.push((job.id, Fate::NotRun));
                    }
                    r => {
                        accepted(lap, closing_before, refused_before, &what);
                        fates.push((job.id, judge(r, &job, None, 0, cancel_ok, &what)));
                    }
                }
            }
            1 | 2 | 3 | 11 => {
                let job = Job::new(take!(1), sleep_us);
                let r = match verb {
                    1 => pool.submit(&job),
                    2 => pool.try_submit(&job),
                    3 => pool.submit_timeout(&job, Duration::from_secs(20)),
                    _ => pool.submit_timeout(&job, Duration::from_micros(rng.below(2000))),
                };
                match r {
                    Err(e) => {
                        was_refused = refused(lap, &e, &what, matches!(verb, 2 | 11), strict);
                        fates.push((job.id, Fate::NotRun));
                    }
                    Ok(h) => {
                        accepted(lap, closing_before, refused_before, &what);
                        finished_if_closed(lap, &h, &what);
                        assert_ne!(h.task_id(), 0, "{what}: task id 0");
                        if rng.chance(40) && held.len() < 3 {
                            held.push((h, job));
                        } else {
                            let tid = h.task_id();
                            let r = if rng.chance(50) {
                                h.wait()
                            } else {
                                drive(h, BOUND, &what)
                            };
                            fates.push((job.id, judge(r, &job, Some(tid), 0, cancel_ok, &what)));
                        }
                    }
                }
            }
            4 => {
                let job = Job::new(take!(1), sleep_us);
                match drive(pool.submit_async(&job), BOUND, &what) {
                    Err(e) => {
                        was_refused = refused(lap, &e, &what, false, strict);
                        fates.push((job.id, Fate::NotRun));
                    }
                    Ok(h) => {
                        accepted(lap, closing_before, refused_before, &what);
                        finished_if_closed(lap, &h, &what);
                        let tid = h.task_id();
                        let r = drive(h, BOUND, &what);
                        fates.push((job.id, judge(r, &job, Some(tid), 0, cancel_ok, &what)));
                    }
                }
            }
            5 => {
                let job = Job::new(take!(1), sleep_us);
                match drive(pool.execute_async(&job), BOUND, &what) {
                    Err(TaskError::Submit(e)) => {
                        assert!(refused(lap, &e, &what, false, strict));
                        was_refused = true;
                        fates.push((job.id, Fate::NotRun));
                    }
                    r => {
                        accepted(lap, closing_before, refused_before, &what);
                        fates.push((job.id, judge(r, &job, None, 0, cancel_ok, &what)));
                    }
                }
            }
            6 | 7 => {
                let n = 1 + rng.below(4) as u32;
                let base = take!(n);
                let jobs: Vec<Job> = (0..n).map(|k| Job::new(base + k, sleep_us / 4)).collect();
                let r = if verb == 6 {
                    pool.batch(&jobs).submit()
                } else {
                    drive(pool.batch(&jobs).submit_async(), BOUND, &what)
                };
                match r {
                    Err(e) => {
                        was_refused = refused(lap, &e, &what, false, strict);
                        fates.extend(jobs.iter().map(|j| (j.id, Fate::NotRun)));
                    }
                    Ok(h) => {
                        accepted(lap, closing_before, refused_before, &what);
                        if lap.closed.load(SeqCst) {
                            assert!(
                                h.is_finished(),
                                "{what}: batch unfinished after close returned"
                            );
                        }
                        let tid = h.task_id();
                        assert_ne!(tid, 0);
                        let r = if verb == 6 {
                            h.wait()
                        } else {
                            drive(h, BOUND, &what)
                        };
                        match r {
                            Ok(outs) => {
                                assert_eq!(outs.len(), jobs.len());
                                for (o, j) in outs.into_iter().zip(&jobs) {
                                    // Inner task ids are not checked here (see `task_ids_*`).
                                    fates.push((j.id, judge(o, j, None, 0, cancel_ok, &what)));
                                }
                            }
                            Err(TaskError::Cancelled) if cancel_ok => {
                                fates.extend(jobs.iter().map(|j| (j.id, Fate::NotRun)));
                            }
                            Err(e) => panic!("{}: {what}: batch answered {e:?}", lap.name),
                        }
                    }
                }
            }
            8 | 12 => {
                // A loaned payload (`loan`, or `try_loan`).
                let job = Job::new(take!(1), sleep_us);
                let len = 64 + rng.below(8192) as usize;
                let l = if verb == 8 {
                    pool.loan(len)
                } else {
                    pool.try_loan(len)
                };
                match l {
                    Err(e) => {
                        was_refused =
                            refused(lap, &e, &format!("{what} (loan)"), verb == 12, strict);
                        fates.push((job.id, Fate::NotRun));
                    }
                    Ok(mut loan) => {
                        let salt = rng.next() as u8;
                        for (i, b) in loan.as_mut_slice().iter_mut().enumerate() {
                            *b = (i as u8).wrapping_mul(7).wrapping_add(salt);
                        }
                        let hash = hash_bytes(loan.as_slice());
                        let closing_before = pool.is_closing();
                        let strict = closing_before || refused_before;
                        match pool.task(&job).payload(loan).submit() {
                            Err(rej) => {
                                let (e, loan) = rej.into_parts();
                                was_refused = refused(lap, &e, &what, false, strict);
                                let loan = loan.expect("a refused request hands its loan back");
                                assert_eq!(
                                    hash_bytes(loan.as_slice()),
                                    hash,
                                    "{what}: loan changed"
                                );
                                fates.push((job.id, Fate::NotRun));
                            }
                            Ok(h) => {
                                accepted(lap, closing_before, refused_before, &what);
                                finished_if_closed(lap, &h, &what);
                                let tid = h.task_id();
                                let r = h.wait();
                                fates.push((
                                    job.id,
                                    judge(r, &job, Some(tid), hash, cancel_ok, &what),
                                ));
                            }
                        }
                    }
                }
            }
            _ => {
                // Collect a held handle (any order), or cancel-free wait on the oldest.
                if !held.is_empty() {
                    let i = rng.below(held.len() as u64) as usize;
                    let (h, job) = held.swap_remove(i);
                    let tid = h.task_id();
                    let r = drive(h, BOUND, &what);
                    fates.push((job.id, judge(r, &job, Some(tid), 0, cancel_ok, &what)));
                }
                jitter(&mut rng, 50);
                continue;
            }
        }
        if was_refused {
            refusals += 1;
            refused_before = true;
        }
        if rng.chance(10) {
            jitter(&mut rng, 100);
        }
    }
    for (h, job) in held {
        let tid = h.task_id();
        let r = drive(h, BOUND, "held handle");
        fates.push((
            job.id,
            judge(r, &job, Some(tid), 0, cancel_ok, "held handle"),
        ));
    }
    fates
}

/// The same from async tasks on a tokio runtime (two worker threads).
fn tokio_submitters(lap: Arc<Lap>, t0: u32, seed: u64) -> Vec<(u32, Fate)> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_time()
        .build()
        .unwrap();
    rt.block_on(async move {
        let mut tasks = Vec::new();
        for k in 0..3u32 {
            let lap = lap.clone();
            let mut rng = Rng::new(seed ^ (k as u64 + 77));
            tasks.push(tokio::spawn(async move {
                let t = t0 + k;
                let mut next_id = t * PER_THREAD_IDS;
                let end_id = next_id + PER_THREAD_IDS - 8;
                let mut fates = Vec::new();
                let mut refusals = 0;
                let mut refused_before = false;
                let to = Duration::from_secs(30);
                while refusals < 3 && next_id < end_id {
                    let what = format!("tokio task {t}");
                    let closing_before = lap.pool.is_closing();
                    let job = Job::new(next_id, if rng.chance(20) { 100 } else { 0 });
                    next_id += 1;
                    if rng.chance(50) {
                        let r = tokio::time::timeout(to, lap.pool.submit_async(&job))
                            .await
                            .unwrap_or_else(|_| panic!("{what}: submit_async hung"));
                        match r {
                            Err(e) => {
                                if refused(&lap, &e, &what, false, closing_before || refused_before)
                                {
                                    refusals += 1;
                                    refused_before = true;
                                }
                                fates.push((job.id, Fate::NotRun));
                            }
                            Ok(h) => {
                                accepted(&lap, closing_before, refused_before, &what);
                                let tid = h.task_id();
                                let r = tokio::time::timeout(to, h)
                                    .await
                                    .unwrap_or_else(|_| panic!("{what}: .await on a handle hung"));
                                fates.push((
                                    job.id,
                                    judge(r, &job, Some(tid), 0, lap.cancel_ok, &what),
                                ));
                            }
                        }
                    } else {
                        let r = tokio::time::timeout(to, lap.pool.execute_async(&job))
                            .await
                            .unwrap_or_else(|_| panic!("{what}: execute_async hung"));
                        match r {
                            Err(TaskError::Submit(e)) => {
                                assert!(refused(
                                    &lap,
                                    &e,
                                    &what,
                                    false,
                                    closing_before || refused_before
                                ));
                                refusals += 1;
                                refused_before = true;
                                fates.push((job.id, Fate::NotRun));
                            }
                            r => {
                                accepted(&lap, closing_before, refused_before, &what);
                                fates.push((job.id, judge(r, &job, None, 0, lap.cancel_ok, &what)));
                            }
                        }
                    }
                    if rng.chance(20) {
                        tokio::task::yield_now().await;
                    }
                }
                fates
            }));
        }
        let mut all = Vec::new();
        for t in tasks {
            all.extend(t.await.expect("tokio task panicked"));
        }
        all
    })
}

fn one_close_lap(lap_no: usize, rng: &mut Rng) -> (usize, usize) {
    let threads = 4 + rng.below(5) as u32; // 4..=8
    let n = (threads + 3) as usize * PER_THREAD_IDS as usize;
    let counters = Counters::new("close-race", n);
    let queue = [1, 1, 2, 2, 3, 4, 8, 64][rng.below(8) as usize];
    let workers = 1 + rng.below(2) as usize;
    let mode = match rng.below(6) {
        0 | 1 => CloseMode::Close,
        2 | 3 => CloseMode::CloseNow,
        4 => CloseMode::Both,
        _ => CloseMode::CloseTwice,
    };
    let with_tokio = rng.chance(40);
    let name = format!(
        "lap {lap_no} ({mode:?}, queue {queue}, {workers} workers, {threads} threads, tokio {with_tokio})"
    );
    let pool = Arc::new(race_pool(&counters, queue, workers, false));
    let lap = Arc::new(Lap {
        pool: pool.clone(),
        cancel_ok: matches!(mode, CloseMode::CloseNow | CloseMode::Both),
        closed: AtomicBool::new(false),
        refusals: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        name: name.clone(),
    });
    let delay_us = if rng.chance(80) {
        rng.below(3000)
    } else {
        rng.below(30_000)
    };
    if rng.chance(20) {
        // Start from a reactor asleep with no timer (bounded look; timing only).
        wait_until(5, || pool.__reactor_sleeps_untimed());
    }
    let mut subs = Vec::new();
    for t in 0..threads {
        let lap = lap.clone();
        let r = Rng::new(rng.next());
        subs.push(std::thread::spawn(move || submitter(&lap, t, r)));
    }
    let tok = with_tokio.then(|| {
        let lap = lap.clone();
        let s = rng.next();
        std::thread::spawn(move || tokio_submitters(lap, threads, s))
    });
    let closers: Vec<_> = {
        let kinds: Vec<bool> = match mode {
            CloseMode::Close => vec![false],
            CloseMode::CloseNow => vec![true],
            CloseMode::Both => vec![false, true],
            CloseMode::CloseTwice => vec![false, false],
        };
        kinds
            .into_iter()
            .map(|now| {
                let lap = lap.clone();
                let d = delay_us + rng.below(300);
                std::thread::spawn(move || {
                    std::thread::sleep(Duration::from_micros(d));
                    if now {
                        lap.pool.close_now();
                    } else {
                        lap.pool.close();
                    }
                    assert!(lap.pool.is_closing());
                    lap.closed.store(true, SeqCst);
                })
            })
            .collect()
    };
    let mut fates = Vec::new();
    for s in subs {
        fates.extend(s.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    }
    if let Some(t) = tok {
        fates.extend(t.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    }
    for c in closers {
        c.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
    }
    // Every submit after the close is refused, with every verb, and a second close is a no-op.
    assert!(
        matches!(pool.submit(&Job::new(0, 0)), Err(SubmitError::Shutdown)),
        "{name}"
    );
    assert!(
        matches!(pool.try_submit(&Job::new(0, 0)), Err(SubmitError::Shutdown)),
        "{name}"
    );
    assert!(
        matches!(
            pool.execute(&Job::new(0, 0)),
            Err(TaskError::Submit(SubmitError::Shutdown))
        ),
        "{name}"
    );
    pool.close();
    check_counters(&counters, n, &fates, &name);
    let (a, r) = (lap.accepted.load(SeqCst), lap.refusals.load(SeqCst));
    drop(lap);
    drop(pool);
    (a, r)
}

#[test]
fn every_verb_racing_close_is_answered_once_or_refused_shutdown() {
    let s = seed("close race");
    watchdog(240, move || {
        let mut rng = Rng::new(s);
        let start = Instant::now();
        let (mut acc, mut refd, mut laps) = (0, 0, 0);
        // At least 10 laps whatever the machine's speed, then as many as 10 s allow.
        while laps < 10 || (laps < 2000 && start.elapsed() < Duration::from_secs(10)) {
            let (a, r) = one_close_lap(laps, &mut rng);
            acc += a;
            refd += r;
            laps += 1;
        }
        eprintln!(
            "close race: {laps} laps in {:?}, {acc} accepted, {refd} refused",
            start.elapsed()
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 1b. A submit waiting for room when the shutdown begins (every slot held by uncollected
// handles) is answered Shutdown, with every waiting verb; the close does not wait for it.

#[test]
fn submits_waiting_for_room_are_refused_when_the_pool_closes() {
    let s = seed("waiting for room");
    watchdog(120, move || {
        let mut rng = Rng::new(s);
        for lap_no in 0..100 {
            let counters = Counters::new("room", 64);
            let queue = 1 + rng.below(2) as usize;
            let pool = Arc::new(race_pool(&counters, queue, 1, false));
            let mut fates = Vec::new();
            // Fill every slot with a task nobody collects yet.
            let held: Vec<_> = (0..queue as u32)
                .map(|i| {
                    let j = Job::new(i, 0);
                    (pool.submit(&j).unwrap(), j)
                })
                .collect();
            let started = Arc::new(AtomicUsize::new(0));
            let waiters: Vec<_> = (0..4u32)
                .map(|k| {
                    let pool = pool.clone();
                    let started = started.clone();
                    std::thread::spawn(move || {
                        let job = Job::new(10 + k, 0);
                        started.fetch_add(1, SeqCst);
                        let what = format!("waiter {k}");
                        let r: Result<(), SubmitError> = match k {
                            0 => pool.submit(&job).map(drop),
                            1 => pool.submit_timeout(&job, Duration::from_secs(40)).map(drop),
                            2 => drive(pool.submit_async(&job), Duration::from_secs(40), &what)
                                .map(drop),
                            _ => match drive(
                                pool.execute_async(&job),
                                Duration::from_secs(40),
                                &what,
                            ) {
                                Err(TaskError::Submit(e)) => Err(e),
                                Ok(_) => Ok(()),
                                Err(e) => panic!("{what}: {e:?}"),
                            },
                        };
                        match r {
                            Err(SubmitError::Shutdown) => {}
                            other => panic!("{what}: expected Shutdown, got {other:?}"),
                        }
                        (job.id, Fate::NotRun)
                    })
                })
                .collect();
            // Let the waiters reach their wait (timing only: any moment must do).
            while started.load(SeqCst) < 4 {
                std::thread::yield_now();
            }
            jitter(&mut rng, 2000);
            let t0 = Instant::now();
            if rng.chance(50) {
                pool.close();
            } else {
                pool.close_now();
            }
            let closed_in = t0.elapsed();
            assert!(
                closed_in < Duration::from_secs(20),
                "lap {lap_no}: close took {closed_in:?} with submits waiting for room"
            );
            for w in waiters {
                fates.push(w.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
            }
            // The held tasks were queued before the close: answered by now (Ok, or Cancelled
            // if a close_now swept them before a worker took them).
            for (h, j) in held {
                assert!(
                    h.is_finished(),
                    "lap {lap_no}: a queued task unfinished after close"
                );
                let r = h.wait();
                fates.push((j.id, judge(r, &j, None, 0, true, "held")));
            }
            check_counters(&counters, 64, &fates, &format!("room lap {lap_no}"));
        }
    });
}

// ---------------------------------------------------------------------------------------------
// 2. Idle reactor: bursts of awaits right as the reactor goes to sleep with no timer.

fn burst_op(pool: &P, id: u32, kind: u64, what: &str) {
    let job = Job::new(id, 0);
    let b = Duration::from_secs(20);
    match kind {
        0 => {
            let a = drive(pool.execute_async(&job), b, what).unwrap();
            assert_eq!(a.value, id as u64 * 3, "{what}");
        }
        1 => {
            let h = drive(pool.submit_async(&job), b, what).unwrap();
            let tid = h.task_id();
            let a = drive(h, b, what).unwrap();
            assert_eq!((a.value, a.task_id), (id as u64 * 3, tid), "{what}");
        }
        2 => {
            // A blocking submit (it may wait for room), then an await.
            let h = pool.submit(&job).unwrap();
            let tid = h.task_id();
            let a = drive(h, b, what).unwrap();
            assert_eq!((a.value, a.task_id), (id as u64 * 3, tid), "{what}");
        }
        3 => {
            let jobs = [Job::new(id, 0)];
            let h = drive(pool.batch(&jobs).submit_async(), b, what).unwrap();
            let outs = drive(h, b, what).unwrap();
            assert_eq!(outs.len(), 1);
            assert_eq!(
                outs.into_iter().next().unwrap().unwrap().value,
                id as u64 * 3
            );
        }
        5 => {
            // A non-Rust event loop's way: a waker registered on the handle.
            let h = pool.submit(&job).unwrap();
            let (count, waker) = counting_waker();
            if !h.wake_when_finished(&waker) {
                assert!(
                    wait_until(20, || count.0.load(SeqCst) >= 1),
                    "{what}: wake_when_finished's waker never called (finished: {})",
                    h.is_finished()
                );
            }
            assert!(h.is_finished(), "{what}: woken but not finished");
            assert_eq!(h.wait().unwrap().value, id as u64 * 3, "{what}");
        }
        _ => {
            // try_submit while it is full, else a wait-free look until done, then an await.
            let h = loop {
                match pool.try_submit(&job) {
                    Ok(h) => break h,
                    Err(SubmitError::QueueFull) => std::thread::yield_now(),
                    Err(e) => panic!("{what}: {e:?}"),
                }
            };
            let a = drive(h, b, what).unwrap();
            assert_eq!(a.value, id as u64 * 3, "{what}");
        }
    }
}

#[test]
fn awaits_after_the_reactor_went_idle_all_resolve() {
    let s = seed("idle reactor");
    watchdog(240, move || {
        let start = Instant::now();
        // Two pools side by side (queue 1 and 2), each with its own cycle of idle and burst.
        let cycles = Arc::new(AtomicUsize::new(0));
        let untimed_seen = Arc::new(AtomicUsize::new(0));
        let groups: Vec<_> = [(1usize, 1usize), (2, 1), (2, 2)]
            .into_iter()
            .enumerate()
            .map(|(g, (queue, workers))| {
                let cycles = cycles.clone();
                let untimed_seen = untimed_seen.clone();
                std::thread::spawn(move || {
                    let mut rng = Rng::new(s ^ (g as u64 * 0x51));
                    let counters = Counters::new("idle", 1 << 16);
                    let pool = Arc::new(race_pool(&counters, queue, workers, false));
                    const B: usize = 4;
                    let go = Arc::new(Barrier::new(B + 1));
                    let done = Arc::new(Barrier::new(B + 1));
                    let stop = Arc::new(AtomicBool::new(false));
                    let next_id = Arc::new(AtomicU64::new(1));
                    let bursters: Vec<_> = (0..B)
                        .map(|k| {
                            let (pool, go, done, stop, next_id) =
                                (pool.clone(), go.clone(), done.clone(), stop.clone(), next_id.clone());
                            let mut rng = Rng::new(s ^ ((g * 16 + k) as u64 + 3));
                            std::thread::spawn(move || loop {
                                go.wait();
                                if stop.load(SeqCst) {
                                    return;
                                }
                                for _ in 0..3 {
                                    let id = next_id.fetch_add(1, SeqCst) as u32;
                                    let kind = rng.below(6);
                                    burst_op(&pool, id, kind, &format!("group {g} burster {k} op {kind} id {id}"));
                                }
                                done.wait();
                            })
                        })
                        .collect();
                    let mut c = 0;
                    let mut deadline_ids = Vec::new();
                    // At least 3 cycles whatever the machine's speed (each is bounded).
                    while c < 3 || (c < 60 && start.elapsed() < Duration::from_secs(15)) {
                        // Wait (polling, bounded) for the reactor's untimed sleep, then at once
                        // a submit and an await from here, and release the bursters.
                        let t0 = Instant::now();
                        let mut untimed = false;
                        // A tight look in some cycles (to land in the reactor's last look
                        // before its sleep), a polite one in the others.
                        let tight = rng.chance(30);
                        while t0.elapsed() < Duration::from_secs(5) {
                            if pool.__reactor_sleeps_untimed() {
                                untimed = true;
                                break;
                            }
                            if tight {
                                std::hint::spin_loop();
                            } else {
                                std::thread::sleep(Duration::from_micros(200));
                            }
                        }
                        if untimed {
                            untimed_seen.fetch_add(1, SeqCst);
                        }
                        let id = next_id.fetch_add(1, SeqCst) as u32;
                        let what = format!("group {g} cycle {c} main id {id} (untimed {untimed})");
                        if queue == 2 && workers == 1 && rng.chance(30) {
                            // A task with a deadline behind a longer one on the only worker:
                            // never claimed in time, so its await is answered Timeout at its
                            // deadline (the reactor's alarm), whatever the timing.
                            // (Unless this thread stalled past the long task's 100 ms
                            // between the two submits: then `late` may be claimed in time.)
                            let t0 = Instant::now();
                            let long = pool.submit(&Job::new(id, 100_000)).unwrap();
                            let id2 = next_id.fetch_add(1, SeqCst) as u32;
                            let dl = Instant::now() + Duration::from_millis(20);
                            let late = pool.task(&Job::new(id2, 0)).deadline(dl).submit().unwrap();
                            go.wait();
                            match drive(late, Duration::from_secs(20), &what) {
                                Err(TaskError::Timeout { .. }) => deadline_ids.push(id2),
                                Ok(a) if dl >= t0 + Duration::from_millis(100) => {
                                    assert_eq!(a.value, id2 as u64 * 3, "{what}");
                                }
                                other => panic!("{what}: a task behind a 100 ms one with a 20 ms deadline: {other:?}"),
                            }
                            let a = drive(long, Duration::from_secs(20), &what).unwrap();
                            assert_eq!(a.value, id as u64 * 3);
                            done.wait();
                            c += 1;
                            cycles.fetch_add(1, SeqCst);
                            continue;
                        }
                        let h = if rng.chance(50) {
                            Some(pool.submit(&Job::new(id, 0)).unwrap())
                        } else {
                            None
                        };
                        go.wait();
                        match h {
                            Some(h) => {
                                let tid = h.task_id();
                                let a = drive(h, Duration::from_secs(20), &what).unwrap();
                                assert_eq!((a.value, a.task_id), (id as u64 * 3, tid), "{what}");
                            }
                            None => {
                                let a = drive(pool.execute_async(&Job::new(id, 0)), Duration::from_secs(20), &what)
                                    .unwrap();
                                assert_eq!(a.value, id as u64 * 3, "{what}");
                            }
                        }
                        done.wait();
                        c += 1;
                        cycles.fetch_add(1, SeqCst);
                    }
                    stop.store(true, SeqCst);
                    go.wait();
                    for b in bursters {
                        b.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
                    }
                    let ids = next_id.load(SeqCst) as usize;
                    pool.close();
                    let fates: Vec<_> = (1..ids)
                        .map(|i| {
                            let f = if deadline_ids.contains(&(i as u32)) { Fate::NotRun } else { Fate::Ran };
                            (i as u32, f)
                        })
                        .collect();
                    check_counters(&counters, 1 << 16, &fates, &format!("idle group {g}"));
                })
            })
            .collect();
        for g in groups {
            g.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
        }
        let (c, u) = (cycles.load(SeqCst), untimed_seen.load(SeqCst));
        eprintln!(
            "idle reactor: {c} cycles ({u} right after an untimed sleep began) in {:?}",
            start.elapsed()
        );
        assert!(
            u >= 2,
            "the reactor was seen sleeping untimed only {u} times of {c}"
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 3. Task ids on small queues.

/// Collects a handle: `Ok` with the job's value, and the task id the worker saw is the
/// handle's.
fn collect_checked(h: TaskHandle<Ans>, job: &Job, what: &str) {
    let tid = h.task_id();
    let a = h.wait().unwrap_or_else(|e| panic!("{what}: {e:?}"));
    assert_eq!(a.value, job.id as u64 * 3, "{what}");
    assert_eq!(
        a.task_id, tid,
        "{what}: worker saw {} for handle {tid}",
        a.task_id
    );
}

#[test]
fn task_ids_are_unique_nonzero_and_what_the_worker_sees() {
    let s = seed("task ids");
    watchdog(240, move || {
        let start = Instant::now();
        let mut total = 0usize;
        for (round, &(queue, batching)) in [
            (1, false),
            (2, false),
            (3, false),
            (5, false),
            (2, true),
            (3, true),
        ]
        .iter()
        .cycle()
        .take(12)
        .enumerate()
        {
            let counters = Counters::new("ids", 1 << 16);
            let pool = Arc::new(race_pool(&counters, queue, 2, batching));
            let all_ids = Arc::new(Mutex::new(HashSet::new()));
            let ts: Vec<_> = (0..4u32)
                .map(|t| {
                    let pool = pool.clone();
                    let all_ids = all_ids.clone();
                    let mut rng = Rng::new(s ^ ((round * 8) as u64 + t as u64));
                    std::thread::spawn(move || {
                        let what = format!("queue {queue} batching {batching} thread {t}");
                        let new_id = |id: u64| {
                            assert_ne!(id, 0, "{what}: task id 0");
                            assert!(
                                all_ids.lock().unwrap().insert(id),
                                "{what}: task id {id} given twice"
                            );
                        };
                        let mut held: Vec<(TaskHandle<Ans>, Job)> = Vec::new();
                        let mut next = t * 12000;
                        let mut n = 0;
                        for _ in 0..1500 {
                            let action = rng.below(8);
                            match action {
                                0..=3 => {
                                    let job = Job::new(next, if rng.chance(10) { 50 } else { 0 });
                                    next += 1;
                                    // Never block for room while holding handles (that
                                    // would wait on ourselves): try, and make room if full.
                                    let h = loop {
                                        if held.is_empty() {
                                            break if rng.chance(50) {
                                                pool.submit(&job).unwrap()
                                            } else {
                                                drive(pool.submit_async(&job), BOUND, &what)
                                                    .unwrap()
                                            };
                                        }
                                        match pool.try_submit(&job) {
                                            Ok(h) => break h,
                                            Err(SubmitError::QueueFull) => {
                                                let (h, job) = held.swap_remove(0);
                                                collect_checked(h, &job, &what);
                                            }
                                            Err(e) => panic!("{what}: {e:?}"),
                                        }
                                    };
                                    new_id(h.task_id());
                                    n += 1;
                                    if held.len() < queue && rng.chance(60) {
                                        held.push((h, job));
                                    } else {
                                        let tid = h.task_id();
                                        let a = h.wait().unwrap();
                                        assert_eq!(a.value, job.id as u64 * 3);
                                        assert_eq!(
                                            a.task_id, tid,
                                            "{what}: worker saw {} for handle {tid}",
                                            a.task_id
                                        );
                                    }
                                }
                                4 | 5 => {
                                    for (h, job) in held.drain(..) {
                                        collect_checked(h, &job, &what);
                                    }
                                }
                                _ => {}
                            }
                            match action {
                                4 => {
                                    // A packed batch: one id for the whole batch.
                                    let k = 1 + rng.below(3) as u32;
                                    let jobs: Vec<Job> =
                                        (0..k).map(|i| Job::new(next + i, 0)).collect();
                                    next += k;
                                    let h = pool.batch(&jobs).submit().unwrap();
                                    let tid = h.task_id();
                                    new_id(tid);
                                    n += 1;
                                    for (o, j) in h.wait().unwrap().into_iter().zip(&jobs) {
                                        let a = o.unwrap();
                                        assert_eq!(a.value, j.id as u64 * 3);
                                        assert_eq!(
                                            a.task_id, tid,
                                            "{what}: a batch's task saw id {} for batch {tid}",
                                            a.task_id
                                        );
                                    }
                                }
                                5 => {
                                    // Dropped or cancelled handles (slots reused at once).
                                    let job = Job::new(next, 0);
                                    next += 1;
                                    let h = pool.submit(&job).unwrap();
                                    new_id(h.task_id());
                                    n += 1;
                                    if rng.chance(50) {
                                        drop(h);
                                    } else {
                                        let tid = h.task_id();
                                        h.cancel();
                                        match h.wait() {
                                            Ok(a) => assert_eq!(a.task_id, tid, "{what}"),
                                            Err(TaskError::Cancelled) => {}
                                            Err(e) => panic!("{what}: {e:?}"),
                                        }
                                    }
                                }
                                _ => {
                                    if !held.is_empty() {
                                        let i = rng.below(held.len() as u64) as usize;
                                        let (h, job) = held.swap_remove(i);
                                        let tid = h.task_id();
                                        let a = drive(h, BOUND, &what).unwrap();
                                        assert_eq!(a.value, job.id as u64 * 3);
                                        assert_eq!(
                                            a.task_id, tid,
                                            "{what}: worker saw {} for handle {tid}",
                                            a.task_id
                                        );
                                    }
                                }
                            }
                        }
                        for (h, job) in held {
                            let tid = h.task_id();
                            let a = h.wait().unwrap();
                            assert_eq!(a.value, job.id as u64 * 3);
                            assert_eq!(a.task_id, tid, "{what}");
                        }
                        n
                    })
                })
                .collect();
            for t in ts {
                total += t.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            }
        }
        eprintln!("task ids: {total} submits checked in {:?}", start.elapsed());
    });
}

// ---------------------------------------------------------------------------------------------
// 4. Dropped handles and cancels racing shutdown and slot reuse.

fn one_cancel_lap(lap_no: usize, rng: &mut Rng) {
    let threads = 4u32;
    let n = threads as usize * 1000;
    let counters = Counters::new("cancel-race", n);
    let queue = 1 + rng.below(2) as usize;
    let workers = 1 + rng.below(2) as usize;
    let now = rng.chance(50);
    let name = format!("cancel lap {lap_no} (queue {queue}, {workers} workers, close_now {now})");
    let pool = Arc::new(race_pool(&counters, queue, workers, false));
    let lap = Arc::new(Lap {
        pool: pool.clone(),
        cancel_ok: now,
        closed: AtomicBool::new(false),
        refusals: AtomicUsize::new(0),
        accepted: AtomicUsize::new(0),
        name: name.clone(),
    });
    let subs: Vec<_> = (0..threads)
        .map(|t| {
            let lap = lap.clone();
            let mut rng = Rng::new(rng.next());
            std::thread::spawn(move || {
                let pool = &*lap.pool;
                let mut fates = Vec::new();
                let mut refusals = 0;
                let mut refused_before = false;
                for i in 0..900u32 {
                    if refusals >= 3 {
                        break;
                    }
                    let action = rng.below(7);
                    let watch = matches!(action, 0..=3) && rng.chance(30);
                    let job = Job {
                        id: t * 1000 + i,
                        sleep_us: if watch {
                            10_000_000
                        } else {
                            rng.below(200) as u32
                        },
                        until_cancelled: watch,
                    };
                    let what = format!("{} thread {t} action {action} {job:?}", lap.name);
                    let closing_before = pool.is_closing();
                    let h = match pool.submit(&job) {
                        Err(e) => {
                            assert!(refused(
                                &lap,
                                &e,
                                &what,
                                false,
                                closing_before || refused_before
                            ));
                            refusals += 1;
                            refused_before = true;
                            fates.push((job.id, Fate::NotRun));
                            continue;
                        }
                        Ok(h) => h,
                    };
                    accepted(&lap, closing_before, refused_before, &what);
                    let tid = h.task_id();
                    let fate = match action {
                        0 => {
                            drop(h);
                            Fate::AtMostOnce
                        }
                        1 => {
                            jitter(&mut rng, 300);
                            drop(h);
                            Fate::AtMostOnce
                        }
                        2 | 3 => {
                            if action == 3 {
                                jitter(&mut rng, 300);
                            }
                            h.cancel();
                            if rng.chance(30) {
                                h.cancel();
                            }
                            let r = if rng.chance(50) {
                                h.wait()
                            } else {
                                drive(h, BOUND, &what)
                            };
                            if let Ok(a) = &r {
                                if watch {
                                    assert!(
                                        a.saw_cancel,
                                        "{what}: ran to its 10 s cap without seeing its cancel"
                                    );
                                }
                            }
                            // A cancelled task is answered Cancelled (not run) or ran as usual.
                            judge(r, &job, Some(tid), 0, true, &what)
                        }
                        4 => {
                            // A waker, then a cancel: once finished, the waker is called.
                            let (count, waker) = counting_waker();
                            let already = h.wake_when_finished(&waker);
                            if rng.chance(50) {
                                h.cancel();
                            }
                            let done = wait_until(30, || h.is_finished());
                            assert!(done, "{what}: never finished");
                            if !already {
                                assert!(
                                    wait_until(30, || count.0.load(SeqCst) >= 1),
                                    "{what}: finished but its waker was never called"
                                );
                            }
                            judge(h.wait(), &job, Some(tid), 0, true, &what)
                        }
                        _ => judge(h.wait(), &job, Some(tid), 0, lap.cancel_ok, &what),
                    };
                    fates.push((job.id, fate));
                }
                fates
            })
        })
        .collect();
    let d = rng.below(5000);
    let closer = {
        let lap = lap.clone();
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_micros(d));
            if now {
                lap.pool.close_now();
            } else {
                lap.pool.close();
            }
            lap.closed.store(true, SeqCst);
        })
    };
    let mut fates = Vec::new();
    for s in subs {
        fates.extend(s.join().unwrap_or_else(|p| std::panic::resume_unwind(p)));
    }
    closer
        .join()
        .unwrap_or_else(|p| std::panic::resume_unwind(p));
    check_counters(&counters, n, &fates, &name);
}

#[test]
fn dropped_and_cancelled_handles_racing_close_and_slot_reuse() {
    let s = seed("cancel race");
    watchdog(240, move || {
        let mut rng = Rng::new(s);
        let start = Instant::now();
        let mut laps = 0;
        while laps < 1000 && start.elapsed() < Duration::from_secs(8) {
            one_cancel_lap(laps, &mut rng);
            laps += 1;
        }
        eprintln!("cancel race: {laps} laps in {:?}", start.elapsed());
    });
}

/// Handles outlive the pool: waits, awaits, cancels and drops on another thread while the pool
/// is dropped, shut down (graceful or now) or closed.
#[test]
fn handles_used_while_the_pool_is_dropped_or_shut_down() {
    let s = seed("handles vs drop");
    watchdog(240, move || {
        let mut rng = Rng::new(s);
        let start = Instant::now();
        let mut laps = 0;
        while laps < 1000 && start.elapsed() < Duration::from_secs(8) {
            let counters = Counters::new("outlive", 64);
            let queue = 1 + rng.below(3) as usize;
            let pool = race_pool(&counters, queue, 1 + rng.below(2) as usize, false);
            let how = rng.below(4); // drop, shutdown, shutdown_now, close then drop
            let cancel_ok = how == 2;
            let name = format!("outlive lap {laps} (queue {queue}, how {how})");
            let jobs: Vec<Job> = (0..queue as u32)
                .map(|i| Job::new(i, rng.below(500) as u32))
                .collect();
            let handles: Vec<_> = jobs.iter().map(|j| pool.submit(j).unwrap()).collect();
            let mut r2 = Rng::new(rng.next());
            let name2 = name.clone();
            let user = std::thread::spawn(move || {
                let mut fates = Vec::new();
                for (h, j) in handles.into_iter().zip(jobs) {
                    let tid = h.task_id();
                    let what = format!("{name2} {j:?}");
                    jitter(&mut r2, 300);
                    let f = match r2.below(5) {
                        0 => {
                            drop(h);
                            Fate::AtMostOnce
                        }
                        1 => {
                            h.cancel();
                            judge(h.wait(), &j, Some(tid), 0, true, &what)
                        }
                        2 => judge(drive(h, BOUND, &what), &j, Some(tid), 0, cancel_ok, &what),
                        3 => {
                            let mut h = h;
                            let end = Instant::now() + BOUND;
                            loop {
                                match h.try_wait() {
                                    Ok(a) => {
                                        break judge(Ok(a), &j, Some(tid), 0, cancel_ok, &what);
                                    }
                                    Err(stateful_pool::WaitTimeoutError::Timeout(back)) => {
                                        assert!(Instant::now() < end, "{what}: never finished");
                                        std::thread::yield_now();
                                        h = back;
                                    }
                                    Err(stateful_pool::WaitTimeoutError::Task(e)) => {
                                        break judge(Err(e), &j, Some(tid), 0, cancel_ok, &what);
                                    }
                                    Err(e) => panic!("{what}: {e:?}"),
                                }
                            }
                        }
                        _ => judge(h.wait(), &j, Some(tid), 0, cancel_ok, &what),
                    };
                    fates.push((j.id, f));
                }
                fates
            });
            jitter(&mut rng, 1000);
            match how {
                0 => drop(pool),
                1 => pool.shutdown(),
                2 => pool.shutdown_now(),
                _ => {
                    pool.close();
                    drop(pool);
                }
            }
            let fates = user.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            check_counters(&counters, 64, &fates, &name);
            laps += 1;
        }
        eprintln!("handles vs drop: {laps} laps in {:?}", start.elapsed());
    });
}

// ---------------------------------------------------------------------------------------------
// 5. A caller's task whose serialisation panics (or fails) in the middle of a submit: the
// submit under way must not stay marked, or every later shutdown waits for it forever (and
// the slot is lost, and the reactor never sleeps untimed).

/// Serialises a `u64` as rkyv does, except that it panics for [`SER_PANIC`] and fails for
/// [`SER_FAIL`].
pub struct Touchiness;

const SER_PANIC: u64 = 0xDEAD;
const SER_FAIL: u64 = 0xFA11;

#[derive(Debug)]
struct SerFailed;
impl std::fmt::Display for SerFailed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("this task refuses to be serialised")
    }
}
impl std::error::Error for SerFailed {}

impl rkyv::with::ArchiveWith<u64> for Touchiness {
    type Archived = rkyv::Archived<u64>;
    type Resolver = ();
    fn resolve_with(field: &u64, r: (), out: rkyv::Place<Self::Archived>) {
        rkyv::Archive::resolve(field, r, out)
    }
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::with::SerializeWith<u64, S> for Touchiness
where
    S::Error: rkyv::rancor::Source,
{
    fn serialize_with(field: &u64, _: &mut S) -> Result<(), S::Error> {
        match *field {
            SER_PANIC => panic!("a Serialize impl that panics (on purpose)"),
            SER_FAIL => Err(<S::Error as rkyv::rancor::Source>::new(SerFailed)),
            _ => Ok(()),
        }
    }
}

impl<D: rkyv::rancor::Fallible + ?Sized> rkyv::with::DeserializeWith<rkyv::Archived<u64>, u64, D>
    for Touchiness
{
    fn deserialize_with(a: &rkyv::Archived<u64>, _: &mut D) -> Result<u64, D::Error> {
        Ok(a.to_native())
    }
}

/// A `u64` task whose serialisation panics for [`SER_PANIC`] and fails for [`SER_FAIL`].
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy, PartialEq)]
pub struct Touchy(#[rkyv(with = Touchiness)] pub u64);

stateful_pool::task_fn! {
    /// Echoes a `Touchy` task's value.
    fn TouchyEcho(v: Touchy, _ctx) -> u64 {
        Ok(v.0.to_native())
    }
}

type TP = Pool<stateful_pool::FnWorker<TouchyEcho>>;

/// Submits `bad` through verb `verb`; returns whether it panicked (else the refusal).
fn submit_touchy(pool: &TP, verb: u64, bad: u64) -> Result<SubmitError, ()> {
    let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| -> SubmitError {
        let t = Touchy(bad);
        let what = format!("verb {verb} value {bad:#x}");
        match verb {
            0 => pool.submit(&t).map(drop).expect_err(&what),
            1 => pool.try_submit(&t).map(drop).expect_err(&what),
            2 => pool
                .submit_timeout(&t, Duration::from_secs(5))
                .map(drop)
                .expect_err(&what),
            3 => drive(pool.submit_async(&t), BOUND, &what)
                .map(drop)
                .expect_err(&what),
            4 => match pool.execute(&t) {
                Err(TaskError::Submit(e)) => e,
                other => panic!("{what}: {other:?}"),
            },
            5 => pool
                .batch(&[Touchy(1), t, Touchy(2)])
                .submit()
                .map(drop)
                .expect_err(&what),
            _ => {
                let loan = pool.loan(4096).unwrap();
                pool.task(&t)
                    .payload(loan)
                    .submit()
                    .map(drop)
                    .map_err(|r| r.into_parts().0)
                    .expect_err(&what)
            }
        }
    }));
    r.map_err(|_| ())
}

fn touchy_pool(queue: usize) -> Arc<TP> {
    let pool = Arc::new(
        Pool::<stateful_pool::FnWorker<TouchyEcho>>::builder()
            .queue_size(queue)
            .build()
            .unwrap(),
    );
    pool.spawn(&()).unwrap();
    pool
}

/// Closes `pool` on another thread: whether `close()` returned within `secs`. (A close that
/// never returns is left behind, with its pool.)
fn close_returns_within(pool: &Arc<TP>, secs: u64) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    let p = pool.clone();
    std::thread::spawn(move || {
        p.close();
        let _ = tx.send(());
    });
    rx.recv_timeout(Duration::from_secs(secs)).is_ok()
}

/// A task whose serialisation fails (an `Err` from its `Serialize`), through every verb:
/// refused `Encode`, and the pool is as before (every slot free, the reactor back to its
/// untimed sleep, the close returns).
#[test]
fn a_submit_whose_task_serialisation_fails_does_not_wedge_the_pool() {
    watchdog(120, || {
        for verb in 0..7u64 {
            for queue in [1usize, 2] {
                let what = format!("verb {verb} queue {queue}");
                let pool = touchy_pool(queue);
                match submit_touchy(&pool, verb, SER_FAIL) {
                    Ok(SubmitError::Encode(m)) => assert!(m.contains("refuses"), "{what}: {m}"),
                    other => panic!("{what}: {other:?}"),
                }
                let hs: Vec<_> = (0..queue as u64)
                    .map(|i| {
                        pool.submit_timeout(&Touchy(100 + i), Duration::from_secs(10))
                            .unwrap_or_else(|e| {
                                panic!("{what}: a later submit: {e:?} (a slot lost)")
                            })
                    })
                    .collect();
                for (i, h) in hs.into_iter().enumerate() {
                    assert_eq!(h.wait().unwrap(), 100 + i as u64, "{what}");
                }
                assert!(
                    wait_until(10, || pool.__reactor_sleeps_untimed()),
                    "{what}: the reactor never sleeps untimed again"
                );
                assert!(close_returns_within(&pool, 20), "{what}: close() hangs");
            }
        }
    });
}

/// DEFECT (fails): a task whose `Serialize` panics inside `submit` (caught by the caller, as a
/// server framework catching a request's panic would) leaves its slot marked as a submit
/// under way: the slot is never free again, and `close()` (so also `shutdown` and the drop)
/// waits for that submit forever, spinning. Documented: the shutdown is bounded ("graceful or
/// immediate; bounded either way", "Drop is bounded by shutdown_timeout plus a kill, whatever
/// the workers do"). Every submit verb does the same (`submit`, `try_submit`,
/// `submit_timeout`, `submit_async`, `execute`, `batch(..).submit()`, with a payload), on
/// queue sizes 1 and 2; a serialisation that returns `Err` is fine (the test above).
#[test]
fn a_submit_whose_task_serialisation_panics_does_not_wedge_the_pool() {
    watchdog(120, || {
        let pool = touchy_pool(2);
        assert!(
            submit_touchy(&pool, 0, SER_PANIC).is_err(),
            "the Serialize impl panics"
        );
        // Both slots are free again: two tasks are accepted without waiting.
        let first = pool.try_submit(&Touchy(1)).expect("a first slot");
        let second = pool.try_submit(&Touchy(2));
        let slot_lost = second.is_err();
        assert_eq!(first.wait().unwrap(), 1);
        if let Ok(h) = second {
            assert_eq!(h.wait().unwrap(), 2);
        }
        let closes = close_returns_within(&pool, 20);
        assert!(
            closes && !slot_lost,
            "after a panic in a task's Serialize during submit: close() returned within 20 s: \
             {closes}; the panicked submit's slot came back: {}",
            !slot_lost
        );
    });
}

// ---------------------------------------------------------------------------------------------
// 6. Futures dropped part-way: a `submit_async` waiting for room, or woken for a slot and never
// polled again, and an `execute_async` waiting for its result: nothing stays taken.

/// Polls `fut` once with a waker that counts.
fn poll_once<F: Future + Unpin>(fut: &mut F) -> (Poll<F::Output>, Arc<Count>) {
    let (count, waker) = counting_waker();
    let mut cx = Context::from_waker(&waker);
    (std::pin::Pin::new(fut).poll(&mut cx), count)
}

#[test]
fn futures_dropped_part_way_leave_no_slot_taken() {
    let s = seed("dropped futures");
    watchdog(120, move || {
        let mut rng = Rng::new(s);
        for lap in 0..20 {
            let counters = Counters::new("dropped-futures", 64);
            let queue = 1 + rng.below(2) as usize;
            let pool = race_pool(&counters, queue, 1, false);
            let what = format!("lap {lap} queue {queue}");
            let mut fates = Vec::new();
            // Fill the queue; then a submit_async that must wait for room.
            let held: Vec<_> = (0..queue as u32)
                .map(|i| (pool.submit(&Job::new(i, 0)).unwrap(), Job::new(i, 0)))
                .collect();
            let job = Job::new(20, 0);
            let mut fut = Box::pin(pool.submit_async(&job));
            let (p, count) = poll_once(&mut fut);
            let dropped_fut_id;
            match p {
                Poll::Pending => {
                    if rng.chance(50) {
                        // Free a slot: the future is woken (bounded look) but never polled again.
                        let mut held = held.into_iter();
                        let (h, j) = held.next().unwrap();
                        fates.push((j.id, judge(h.wait(), &j, None, 0, false, &what)));
                        let woken = wait_until(20, || count.0.load(SeqCst) >= 1);
                        assert!(
                            woken,
                            "{what}: a freed slot did not wake the future waiting for room"
                        );
                        jitter(&mut rng, 200);
                        drop(fut);
                        // Not polled again: never queued.
                        dropped_fut_id = Some(job.id);
                        for (h, j) in held {
                            fates.push((j.id, judge(h.wait(), &j, None, 0, false, &what)));
                        }
                    } else {
                        drop(fut);
                        dropped_fut_id = Some(job.id);
                        for (h, j) in held {
                            fates.push((j.id, judge(h.wait(), &j, None, 0, false, &what)));
                        }
                    }
                }
                Poll::Ready(r) => panic!(
                    "{what}: the queue was full, yet the submit answered {:?}",
                    r.map(|h| h.task_id())
                ),
            }
            if let Some(id) = dropped_fut_id {
                fates.push((id, Fate::NotRun));
            }
            // An execute_async dropped while its task is queued or running.
            let j = Job::new(30, rng.below(3000) as u32);
            {
                let mut ex = Box::pin(pool.execute_async(&j));
                let _ = poll_once(&mut ex);
                jitter(&mut rng, 1000);
            }
            fates.push((j.id, Fate::AtMostOnce));
            // Every slot is free again (bounded: a leak would time out here).
            let hs: Vec<_> = (0..queue as u32)
                .map(|i| {
                    let j = Job::new(40 + i, 0);
                    let h = pool
                        .submit_timeout(&j, Duration::from_secs(20))
                        .unwrap_or_else(|e| panic!("{what}: a slot never came back: {e:?}"));
                    (h, j)
                })
                .collect();
            for (h, j) in hs {
                let tid = h.task_id();
                fates.push((j.id, judge(h.wait(), &j, Some(tid), 0, false, &what)));
            }
            assert!(
                wait_until(20, || pool.__reactor_sleeps_untimed()),
                "{what}: the reactor never sleeps untimed again"
            );
            pool.shutdown();
            check_counters(&counters, 64, &fates, &what);
        }
    });
}
