//! Chaos soak (reliability.md L1 and L2): 64 caller threads push tasks through 4 workers while
//! a chaos thread SIGKILLs a random worker every so often. Every task carries its id; workers
//! count executions in a shared file of counters.
//!
//! - L1 (at-most-once, the default): every id resolves exactly once, `Ok` with the right value
//!   or `WorkerDied`; no id executed twice; `Ok` ids executed exactly once.
//! - L2 (retries on): every id `Ok` exactly once, executed at least once.
//!
//! Both end with the pool still serving and one restart per kill. Sizes: `STATEFUL_POOL_SOAK`
//! tasks (default 200,000; the full run is 1,000,000), kills every `STATEFUL_POOL_SOAK_KILL_MS`
//! to twice that (default 40; the full run uses 200).

mod common;
use common::*;
use stateful_pool::{Pool, RestartPolicy, TaskError, WorkerState};
use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

const CALLERS: usize = 64;
const WORKERS: usize = 4;
/// Handles each caller keeps in flight.
const WINDOW: usize = 8;

fn env_or(key: &str, default: u64) -> u64 {
    std::env::var(key)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

struct Outcome {
    ok: u64,
    died: u64,
    kills: u64,
}

fn soak(retries: u32) -> Outcome {
    let n = env_or("STATEFUL_POOL_SOAK", 200_000) as usize;
    let kill_ms = env_or("STATEFUL_POOL_SOAK_KILL_MS", 40);
    let counters = Counters::new(&format!("soak-{retries}"), n);
    let pool = Arc::new(
        Pool::<TestWorker>::builder()
            .queue_size(CALLERS * WINDOW)
            .restart_policy(RestartPolicy::unlimited())
            .task_retries(retries)
            .build()
            .unwrap(),
    );
    for i in 0..WORKERS {
        pool.spawn(&counters.spawn_args(&format!("soak{i}")))
            .unwrap();
    }
    // Each id's outcome: 0 = unresolved, 1 = Ok, 2 = WorkerDied. Set exactly once.
    let resolved: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| AtomicU64::new(0)).collect());
    let done = Arc::new(AtomicBool::new(false));

    let chaos = {
        let (pool, done) = (pool.clone(), done.clone());
        std::thread::spawn(move || {
            let mut rng = 0x2545_f491_4f6c_dd1du64;
            let mut next = || {
                rng ^= rng << 13;
                rng ^= rng >> 7;
                rng ^= rng << 17;
                rng
            };
            let mut killed = HashSet::new();
            while !done.load(Ordering::SeqCst) {
                // The load pattern, not synchronisation: a kill every kill_ms..2*kill_ms.
                std::thread::sleep(Duration::from_millis(kill_ms + next() % (kill_ms + 1)));
                let ready: Vec<u32> = pool
                    .workers()
                    .iter()
                    .filter(|w| w.state == WorkerState::Ready && !killed.contains(&w.pid))
                    .map(|w| w.pid)
                    .collect();
                if ready.is_empty() || done.load(Ordering::SeqCst) {
                    continue;
                }
                let pid = ready[(next() % ready.len() as u64) as usize];
                if process_gone(pid) {
                    continue;
                }
                // SAFETY: plain syscall on one of our workers.
                if unsafe { libc::kill(pid as i32, libc::SIGKILL) } == 0 {
                    killed.insert(pid);
                }
            }
            killed.len() as u64
        })
    };

    let t0 = Instant::now();
    let callers: Vec<_> = (0..CALLERS)
        .map(|c| {
            let (pool, resolved) = (pool.clone(), resolved.clone());
            std::thread::spawn(move || {
                let ids: Vec<u32> = (c..n).step_by(CALLERS).map(|i| i as u32).collect();
                let mut inflight = std::collections::VecDeque::new();
                let settle = |id: u32, r: Result<common::Out, TaskError>| {
                    let v = match r {
                        Ok(o) => {
                            assert_eq!(o.value, id as u64 * 3, "wrong result for {id}");
                            1
                        }
                        Err(TaskError::WorkerDied { .. }) => 2,
                        Err(e) => panic!("task {id}: unexpected {e}"),
                    };
                    let prev = resolved[id as usize].swap(v, Ordering::SeqCst);
                    assert_eq!(prev, 0, "task {id} answered twice");
                };
                for id in ids {
                    // A few slower tasks so kills land mid-task as well as between tasks.
                    let cmd = if id % 16 == 0 {
                        Cmd::TickSlow(id, 200)
                    } else {
                        Cmd::Tick(id)
                    };
                    inflight.push_back((id, pool.submit(&cmd).unwrap()));
                    if inflight.len() >= WINDOW {
                        let (id, h) = inflight.pop_front().unwrap();
                        settle(id, h.wait());
                    }
                }
                for (id, h) in inflight {
                    settle(id, h.wait());
                }
            })
        })
        .collect();
    for c in callers {
        c.join().unwrap();
    }
    let elapsed = t0.elapsed();
    done.store(true, Ordering::SeqCst);
    let kills = chaos.join().unwrap();

    let (mut ok, mut died) = (0, 0);
    for id in 0..n {
        let execs = counters.get(id);
        match resolved[id].load(Ordering::SeqCst) {
            1 => {
                ok += 1;
                if retries == 0 {
                    assert_eq!(execs, 1, "Ok task {id} executed {execs} times");
                } else {
                    assert!(execs >= 1, "Ok task {id} never executed");
                }
            }
            2 => {
                died += 1;
                assert!(
                    execs <= 1,
                    "task {id} executed {execs} times (at-most-once)"
                );
            }
            v => panic!("task {id} unresolved ({v})"),
        }
    }
    // Every kill is one death and one restart; the pool still serves.
    assert!(wait_until(60, || {
        let s = pool.stats();
        s.worker_deaths == kills && s.restarts == kills && pool.num_workers() == WORKERS
    }));
    assert_eq!(pool.execute(&Cmd::Echo(42)).unwrap().value, 42);
    eprintln!(
        "soak (retries {retries}): {n} tasks in {elapsed:?}, {kills} kills, {ok} ok, {died} died, \
         stats {:?}",
        pool.stats()
    );
    Outcome { ok, died, kills }
}

#[test]
fn l1_chaos_soak_every_task_resolves_exactly_once_at_most_once_execution() {
    let o = watchdog(600, || soak(0));
    assert!(o.kills >= 1, "the chaos thread never killed anything");
    assert_eq!(o.ok + o.died, env_or("STATEFUL_POOL_SOAK", 200_000));
}

#[test]
fn l2_chaos_soak_with_retries_every_task_succeeds_exactly_once() {
    let o = watchdog(600, || soak(1_000));
    assert_eq!(o.died, 0);
    assert_eq!(o.ok, env_or("STATEFUL_POOL_SOAK", 200_000));
}
