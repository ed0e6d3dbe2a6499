//! Leaks under churn, and fate-sharing with the parent. One test function runs every check in
//! sequence: counting processes, fds and mappings needs a binary where nothing else runs.
//!
//! - The parent is SIGKILLed (a child process of this test, building its pool from a
//!   short-lived thread): every worker exits within a second, nothing appears in `/dev/shm`.
//! - 1,000 worker kills and restarts, then 1,000 pool create/drop cycles (`STATEFUL_POOL_CHURN`
//!   sets the count): no zombie, and fds, mappings and threads back to their baseline.

mod common;
use common::*;
use stateful_pool::{Pool, RestartPolicy, WorkerState};
use std::io::BufRead;
use std::time::Instant;

stateful_pool::worker_hook!();

const PARENT_ENV: &str = "STATEFUL_POOL_TEST_PARENT_ROLE";

/// Not a test of its own: the body of the "parent" process that `churn_and_parent_death`
/// starts (and kills). Without the environment variable it does nothing.
#[test]
fn parent_role() {
    if std::env::var_os(PARENT_ENV).is_none() {
        return;
    }
    // Build the pool and spawn from a thread that exits right away: the workers must stay
    // alive after it (PR_SET_PDEATHSIG follows the thread that forked them).
    let pool = std::thread::spawn(|| {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        pool.spawn(&Spawn::ok("a")).unwrap();
        pool.spawn(&Spawn::ok("b")).unwrap();
        pool
    })
    .join()
    .unwrap();
    assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
    let pids: Vec<String> = pool.workers().iter().map(|w| w.pid.to_string()).collect();
    println!("PIDS {}", pids.join(" "));
    loop {
        std::thread::park();
    }
}

fn count_dir(path: &str) -> usize {
    std::fs::read_dir(path).map(|d| d.count()).unwrap_or(0)
}

fn maps() -> usize {
    std::fs::read_to_string("/proc/self/maps")
        .map(|m| m.lines().count())
        .unwrap_or(0)
}

/// Our children that are zombies (exited, never reaped).
fn zombie_children() -> Vec<u32> {
    let me = std::process::id();
    let mut z = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let mut f = rest.split_whitespace();
        let state = f.next().unwrap_or("");
        let ppid: u32 = f.next().and_then(|p| p.parse().ok()).unwrap_or(0);
        if ppid == me && state == "Z" {
            z.push(pid);
        }
    }
    z
}

fn dev_shm() -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir("/dev/shm")
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn churn_count() -> usize {
    std::env::var("STATEFUL_POOL_CHURN")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000)
}

fn parent_death() {
    let shm_before = dev_shm();
    let mut parent = std::process::Command::new(std::env::current_exe().unwrap())
        .args(["parent_role", "--exact", "--nocapture", "--test-threads=1"])
        .env(PARENT_ENV, "1")
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    // Kill the parent whatever happens below, so a failing check leaves no orphan.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = parent.stdout.take().unwrap();
    let mut parent = KillOnDrop(parent);
    let mut line = String::new();
    let mut out = std::io::BufReader::new(stdout);
    // libtest prints "test parent_role ... " first, on the same line.
    while !line.contains("PIDS ") {
        line.clear();
        assert!(
            out.read_line(&mut line).unwrap() > 0,
            "the parent role exited early"
        );
    }
    let at = line.find("PIDS ").unwrap() + 5;
    let pids: Vec<u32> = line[at..]
        .split_whitespace()
        .map(|p| p.parse().unwrap())
        .collect();
    assert_eq!(pids.len(), 2);
    assert!(
        pids.iter().all(|&p| !process_gone(p)),
        "workers died with their spawning thread"
    );
    parent.0.kill().unwrap(); // SIGKILL
    parent.0.wait().unwrap();
    let t0 = Instant::now();
    assert!(
        wait_until(30, || pids.iter().all(|&p| process_gone(p))),
        "workers outlived their parent"
    );
    // How fast is measured, not asserted (BENCHMARKS.md): PDEATHSIG makes it milliseconds.
    eprintln!(
        "workers gone {:?} after the parent was killed",
        t0.elapsed()
    );
    assert_eq!(dev_shm(), shm_before, "something was left in /dev/shm");
}

fn kill_churn(n: usize) {
    let pool = Pool::<TestWorker>::builder()
        .restart_policy(RestartPolicy::unlimited())
        .build()
        .unwrap();
    pool.spawn(&Spawn::ok("churn")).unwrap();
    assert_eq!(pool.execute(&Cmd::Echo(0)).unwrap().value, 0);
    let (fds0, maps0, threads0) = (
        count_dir("/proc/self/fd"),
        maps(),
        count_dir("/proc/self/task"),
    );
    for i in 0..n {
        let w = pool.workers()[0].clone();
        assert_eq!(w.state, WorkerState::Ready);
        // SAFETY: plain syscall on our own worker's pid.
        assert_eq!(unsafe { libc::kill(w.pid as i32, libc::SIGKILL) }, 0);
        assert!(
            wait_until(30, || {
                pool.stats().restarts == i as u64 + 1
                    && pool.workers()[0].state == WorkerState::Ready
            }),
            "restart {i} did not happen"
        );
    }
    assert_eq!(pool.execute(&Cmd::Echo(7)).unwrap().value, 7);
    let s = pool.stats();
    assert_eq!(
        (s.worker_deaths, s.restarts, s.tasks_died),
        (n as u64, n as u64, 0)
    );
    assert_eq!(zombie_children(), Vec::<u32>::new());
    assert_eq!(
        count_dir("/proc/self/fd"),
        fds0,
        "fds leaked over {n} restarts"
    );
    assert_eq!(maps(), maps0, "mappings leaked over {n} restarts");
    assert!(count_dir("/proc/self/task") <= threads0, "threads leaked");
}

fn create_drop_churn(n: usize) {
    let small = || {
        Pool::<TestWorker>::builder()
            .queue_size(4)
            .max_workers(1)
            .result_ring_bytes(4096)
            .task_arena_bytes(64 << 10)
            .spawn_area_bytes(4096)
            .build()
            .unwrap()
    };
    // Warm up (first-use allocations of the runtime), then take the baseline.
    drop(small());
    let (fds0, maps0, threads0) = (
        count_dir("/proc/self/fd"),
        maps(),
        count_dir("/proc/self/task"),
    );
    let shm0 = dev_shm();
    let mut pids = Vec::new();
    for i in 0..n {
        let pool = small();
        pool.spawn(&Spawn::ok("c")).unwrap();
        assert_eq!(pool.execute(&Cmd::Echo(i as u64)).unwrap().value, i as u64);
        if i % 100 == 0 {
            pids.push(pool.workers()[0].pid);
        }
        drop(pool);
    }
    assert!(pids.iter().all(|&p| process_gone(p)));
    assert_eq!(zombie_children(), Vec::<u32>::new());
    assert_eq!(
        count_dir("/proc/self/fd"),
        fds0,
        "fds leaked over {n} pools"
    );
    assert_eq!(maps(), maps0, "mappings leaked over {n} pools");
    assert!(count_dir("/proc/self/task") <= threads0, "threads leaked");
    assert_eq!(dev_shm(), shm0);
}

#[test]
fn churn_and_parent_death() {
    if std::env::var_os(PARENT_ENV).is_some() {
        return;
    }
    watchdog(600, || {
        parent_death();
        let n = churn_count();
        let t = Instant::now();
        kill_churn(n);
        eprintln!("{n} kills and restarts in {:?}", t.elapsed());
        let t = Instant::now();
        create_drop_churn(n);
        eprintln!("{n} pool create/drop cycles in {:?}", t.elapsed());
    });
}
