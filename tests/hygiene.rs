//! Process hygiene of worker launch and entry: what a worker inherits (descriptors, process
//! group), what programs it starts inherit, and which programs may enter the worker loop through
//! `init()`. Every test runs under a watchdog; none sleeps to synchronise.

mod common;
use common::{wait_until, watchdog};
use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{
    BoxError, ExitCause, Pool, SpawnError, TaskContext, TaskError, Worker, WorkerContext,
    WorkerState,
};
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::Command;

stateful_pool::worker_hook!();

/// What a test asks a worker about itself.
#[derive(Archive, Serialize, Deserialize, Debug)]
enum Probe {
    /// The worker's open descriptors, one `N -> target` line each.
    Fds,
    /// `pid pgid` of the worker.
    Pgid,
    /// Runs `sh -c <script>` and returns its standard output.
    Shell(String),
    /// The worker's own `SigBlk:` line (read by the worker: a program it starts could catch
    /// it in the middle of its own `posix_spawn`, which blocks every signal for a moment).
    SigBlk,
}

struct Prober;

impl Worker for Prober {
    type SpawnArgs = u32;
    type SpawnOutput = u32;
    type Task = Probe;
    type Output = String;

    fn spawn(args: u32, _: &WorkerContext) -> Result<(Self, u32), BoxError> {
        Ok((Prober, args))
    }

    fn execute(&mut self, task: &ArchivedProbe, _: &TaskContext<'_>) -> Result<String, BoxError> {
        Ok(match task {
            ArchivedProbe::Fds => {
                let mut out = String::new();
                for e in std::fs::read_dir("/proc/self/fd")?.flatten() {
                    let target = std::fs::read_link(e.path()).unwrap_or_default();
                    out += &format!(
                        "{} -> {}\n",
                        e.file_name().to_string_lossy(),
                        target.display()
                    );
                }
                out
            }
            ArchivedProbe::SigBlk => std::fs::read_to_string("/proc/self/status")?
                .lines()
                .find(|l| l.starts_with("SigBlk:"))
                .unwrap_or_default()
                .to_string(),
            ArchivedProbe::Pgid => {
                // SAFETY: getpid and getpgid(0) have no preconditions.
                let (pid, pgid) = unsafe { (libc::getpid(), libc::getpgid(0)) };
                format!("{pid} {pgid}")
            }
            ArchivedProbe::Shell(script) => {
                let out = Command::new("sh").arg("-c").arg(script.as_str()).output()?;
                if !out.status.success() {
                    return Err(format!("{script:?}: {}", out.status).into());
                }
                String::from_utf8_lossy(&out.stdout).into_owned()
            }
        })
    }
}

fn builder() -> stateful_pool::PoolBuilder<Prober> {
    Pool::<Prober>::builder()
        .queue_size(8)
        .max_workers(2)
        .task_arena_bytes(1 << 20)
        .result_ring_bytes(1 << 16)
}

#[test]
fn programs_a_worker_starts_inherit_neither_the_segment_nor_the_notify_line() {
    watchdog(120, || {
        let pool = builder().build().unwrap();
        pool.spawn(&1).unwrap();
        // The worker itself closed fd 3 once it mapped the segment.
        let own = pool.execute(&Probe::Fds).unwrap();
        assert!(
            !own.contains("memfd:"),
            "the worker holds the memfd:\n{own}"
        );
        // A program it starts (through std's Command, like user code would) sees neither the
        // memfd nor the worker's notify line to the supervisor.
        let child = pool
            .execute(&Probe::Shell("ls -l /proc/$$/fd".into()))
            .unwrap();
        assert!(
            child.contains("pipe:"),
            "no listing of the child's fds:\n{child}"
        );
        assert!(
            !child.contains("memfd:"),
            "the child inherited the memfd:\n{child}"
        );
        assert!(
            !child.contains("eventfd") && !child.contains("socket:"),
            "the child inherited fd 4 (the worker's notify line):\n{child}"
        );
        // The worker holds its notify line itself (it signals the supervisor on it).
        assert!(
            own.contains("socket:"),
            "the worker has no notify line:\n{own}"
        );
    });
}

#[test]
fn workers_inherit_no_other_descriptor_of_the_parent() {
    watchdog(120, || {
        let path = std::env::temp_dir().join(format!("stateful-pool-leak-{}", std::process::id()));
        let file = std::fs::File::create(&path).unwrap();
        // An inheritable copy, as a C host's `open` without O_CLOEXEC makes (F_DUPFD does not
        // set close-on-exec), numbered well above the worker's own fds.
        // SAFETY: duplicates a descriptor we own; the copy is closed below.
        let leaked = unsafe { libc::fcntl(file.as_raw_fd(), libc::F_DUPFD, 100) };
        assert!(leaked >= 100);
        // SAFETY: F_GETFD on the descriptor just made.
        let flags = unsafe { libc::fcntl(leaked, libc::F_GETFD) };
        assert_eq!(flags & libc::FD_CLOEXEC, 0);
        let pool = builder().build().unwrap();
        pool.spawn(&1).unwrap();
        let fds = pool.execute(&Probe::Fds).unwrap();
        drop(pool);
        // SAFETY: closes the copy made above, which nothing else owns.
        unsafe { libc::close(leaked) };
        drop(file);
        let _ = std::fs::remove_file(&path);
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        assert!(
            !fds.contains(&name),
            "the worker inherited the parent's file:\n{fds}"
        );
        assert!(!fds.contains(&format!("{leaked} ->")), "{fds}");
        // Its stdio is there (the listing worked).
        assert!(fds.contains("0 -> /dev/null"), "{fds}");
    });
}

#[test]
fn workers_run_in_their_own_process_group() {
    watchdog(120, || {
        let pool = builder().build().unwrap();
        pool.spawn(&1).unwrap();
        let reply = pool.execute(&Probe::Pgid).unwrap();
        let (pid, pgid) = reply.split_once(' ').unwrap();
        let (pid, pgid): (i32, i32) = (pid.parse().unwrap(), pgid.parse().unwrap());
        // SAFETY: getpgrp has no preconditions.
        let ours = unsafe { libc::getpgrp() };
        assert_eq!(pgid, pid, "the worker leads a group of its own");
        assert_ne!(
            pgid, ours,
            "a terminal's SIGINT to our group would reach the worker"
        );
    });
}

#[test]
fn both_launchers_give_workers_the_same_start() {
    watchdog(120, || {
        // A host that blocks a signal (as one that `sigwait`s) on the thread that builds the
        // pool: the pool's supervisor thread inherits the mask, its workers must not.
        // SAFETY: all-zero storage that sigemptyset initialises; pthread_sigmask takes
        // initialised sets.
        let usr2 = unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGUSR2);
            assert_eq!(
                libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()),
                0
            );
            set
        };
        for fork in [false, true] {
            let what = if fork {
                "fork launcher"
            } else {
                "default launcher"
            };
            let b = builder();
            let pool = if fork { b.__fork_launcher() } else { b }.build().unwrap();
            pool.spawn(&1).unwrap();
            pool.spawn(&2).unwrap();
            for _ in 0..4 {
                let status = pool.execute(&Probe::SigBlk).unwrap();
                assert_eq!(status.trim(), "SigBlk:\t0000000000000000", "{what}");
                let fds = pool.execute(&Probe::Fds).unwrap();
                assert!(fds.contains("0 -> /dev/null"), "{what}: {fds}");
                assert!(!fds.contains("memfd:"), "{what}: {fds}");
                assert!(fds.contains("socket:"), "{what}: {fds}");
                let reply = pool.execute(&Probe::Pgid).unwrap();
                let (pid, pgid) = reply.split_once(' ').unwrap();
                assert_eq!(pid, pgid, "{what}: a group of its own");
            }
            // A worker killed mid-task is restarted by the same launcher, and serves the same.
            match pool.execute(&Probe::Shell("kill -9 $PPID".into())) {
                Err(TaskError::WorkerDied { .. }) => {}
                r => panic!("{what}: {r:?}"),
            }
            assert!(
                wait_until(60, || pool.stats().restarts == 1
                    && pool.workers().iter().all(|w| w.state == WorkerState::Ready)),
                "{what}: {:?}",
                pool.workers()
            );
            for _ in 0..4 {
                let status = pool.execute(&Probe::SigBlk).unwrap();
                assert_eq!(status.trim(), "SigBlk:\t0000000000000000", "{what}");
            }
        }
        // SAFETY: `usr2` is an initialised set.
        unsafe { libc::pthread_sigmask(libc::SIG_UNBLOCK, &usr2, std::ptr::null_mut()) };
    });
}

/// Spawns one worker from `program`; retries the launch while the file is busy being written
/// (ETXTBSY: another test's fork may hold a descriptor of a freshly written file for a moment).
fn spawn_from(program: &Path) -> Result<u32, SpawnError> {
    let pool = builder().program(program).build().unwrap();
    let mut tries = 0;
    loop {
        match pool.spawn(&7) {
            Err(SpawnError::Launch { source, .. })
                if source.raw_os_error() == Some(libc::ETXTBSY) && tries < 100 =>
            {
                tries += 1;
                std::thread::yield_now();
            }
            r => return r,
        }
    }
}

fn assert_refused_as_another_binary(r: Result<u32, SpawnError>, what: &str) {
    match r {
        Err(e @ SpawnError::Exited { cause, .. }) => {
            assert_eq!(cause, ExitCause::Exit(121), "{what}: {e}");
            let status = e.to_string();
            assert!(status.contains("different binary"), "{what}: {status}");
            assert!(status.contains("serve::<W>()"), "{what}: {status}");
        }
        Ok(_) => panic!("{what}: a worker started from another binary through init()"),
        Err(e) => panic!("{what}: expected SpawnError::Exited, got {e}"),
    }
}

/// The newest `wrong_binary_helper-*` test binary next to this one (cargo builds it with every
/// test target: `cargo test`, or `cargo test --test hygiene --test wrong_binary_helper`).
fn helper_binary() -> PathBuf {
    let me = std::env::current_exe().unwrap();
    let dir = me.parent().unwrap();
    std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .filter(|e| {
            let n = e.file_name().to_string_lossy().into_owned();
            n.starts_with("wrong_binary_helper-") && !n.contains('.')
        })
        .max_by_key(|e| e.metadata().and_then(|m| m.modified()).ok())
        .map(|e| e.path())
        .unwrap_or_else(|| {
            panic!(
                "no wrong_binary_helper test binary in {}: run `cargo test --test hygiene \
                 --test wrong_binary_helper` (plain `cargo test` builds it too)",
                dir.display()
            )
        })
}

#[test]
fn only_the_parents_own_executable_may_enter_through_init() {
    watchdog(300, || {
        let me = std::env::current_exe().unwrap();
        let dir = me.parent().unwrap();
        let tag = std::process::id();

        // Another path to the same file (a hard link) is the same executable.
        let link = dir.join(format!("hygiene-link-{tag}"));
        let _ = std::fs::remove_file(&link);
        match std::fs::hard_link(&me, &link) {
            Ok(()) => {
                let r = spawn_from(&link);
                let _ = std::fs::remove_file(&link);
                assert_eq!(r.unwrap(), 7, "a hard link to the parent's executable");
            }
            Err(e) => eprintln!("skipping the hard-link case: {e}"),
        }

        // A byte-for-byte copy is another file: it would even pass the old fingerprint check,
        // and is refused. Copied by `cp`, so no descriptor of ours is open for writing on it.
        let copy = dir.join(format!("hygiene-copy-{tag}"));
        let cp = Command::new("cp").arg(&me).arg(&copy).status().unwrap();
        assert!(cp.success());
        let r = spawn_from(&copy);
        let _ = std::fs::remove_file(&copy);
        assert_refused_as_another_binary(r, "a copy of the parent's executable");

        // Another program that links this library and calls `init()`.
        assert_refused_as_another_binary(spawn_from(&helper_binary()), "another test binary");
    });
}
