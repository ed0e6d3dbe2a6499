//! Launching worker processes (the supervisor owns them afterwards: it reaps them through
//! [`Launched`] and kills them through their pidfds).
//!
//! Workers are started by *executing a program* (by default `/proc/self/exe`, the running
//! binary), never by a bare `fork`: a fork of a multi-threaded parent may only call
//! async-signal-safe functions, and CUDA state does not survive a fork. The child gets the
//! segment's memfd on fd 3 and its notify line to the supervisor on fd 4, `/dev/null` as stdin,
//! stdout and stderr as they are, no other descriptor of the parent, and a process group of its
//! own (a terminal's Ctrl-C, SIGINT to the foreground group, reaches the parent only, whose own
//! handling decides: a handler that drops the pool shuts it down gracefully).
//!
//! Two launchers do that:
//! - [`vfork`]: `posix_spawn`, which glibc runs as `clone(CLONE_VM | CLONE_VFORK)`: the child
//!   borrows the parent's memory until it executes the program, so nothing is copied. Used when
//!   the C library has `posix_spawn_file_actions_addclosefrom_np` (glibc 2.34 and later),
//!   looked up at run time, and can run it (`close_range`, or else `/proc/self/fd`).
//! - [`fork`]: `fork` then `exec` with a `pre_exec` step (std's `Command`), elsewhere. A fork
//!   copies the parent's page tables, which costs in proportion to the parent's memory: 0.3 ms
//!   from a small parent, 4.6 ms from one holding 100 MiB (BENCHMARKS.md, W5), where
//!   `posix_spawn` takes 0.1–0.15 ms from either.
//!
//! A spawned child has no step of its own between fork and exec: it gets its CPU set from the
//! launching thread (`Pinned`), and sets `PR_SET_PDEATHSIG` itself, first thing in
//! `worker::boot::enter` (then checks that its parent is still the pool's process). Both
//! launchers run on the pool's long-lived supervisor thread, never on a caller's thread:
//! `PR_SET_PDEATHSIG` fires when the *thread* that started the child exits.

mod fork;
mod vfork;

use std::io;
use std::os::fd::BorrowedFd;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::ExitStatus;

/// The lowest descriptor a worker does not inherit: 0-2 are stdio, 3 and 4 the worker's.
const FIRST_PRIVATE_FD: libc::c_uint = 5;

/// Which launcher [`launch`] uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Launcher {
    /// `posix_spawn` (no copy of the parent's memory).
    Spawn,
    /// `fork` + `exec` (the fallback).
    Fork,
}

impl Launcher {
    /// The launcher this process uses: [`Launcher::Spawn`] where the C library can close the
    /// parent's other descriptors in a spawned child, else [`Launcher::Fork`].
    pub(crate) fn best() -> Launcher {
        if vfork::available() {
            Launcher::Spawn
        } else {
            Launcher::Fork
        }
    }
}

/// What a worker launch needs: the program, the segment (fd 3 in the worker), the worker's end
/// of its notify line to the supervisor (`sys::notify_line`, fd 4), the boot string and the
/// extra environment (later entries win).
pub(crate) struct Recipe<'a> {
    /// The program to run (resolved already: never looked up in `PATH`).
    pub program: &'a Path,
    /// The pool's segment.
    pub segment: BorrowedFd<'a>,
    /// The worker's end of its notify line.
    pub notify: BorrowedFd<'a>,
    /// The boot string (`worker::boot::BOOT_ENV`).
    pub boot: &'a str,
    /// Extra environment variables.
    pub env: &'a [(String, String)],
}

/// Starts a worker as `recipe` says, in a process group of its own. It inherits no other
/// descriptor than stdin (`/dev/null`), stdout, stderr and fds 3 and 4.
pub(crate) fn launch(recipe: &Recipe<'_>) -> io::Result<Launched> {
    launch_with(Launcher::best(), recipe)
}

/// Whether a worker's process can have the environment variable `k=v`: a name that is not
/// empty and holds no `=` or NUL, a value with no NUL.
pub(crate) fn env_var_ok(k: &str, v: &str) -> bool {
    !k.is_empty() && !k.contains(['=', '\0']) && !v.contains('\0')
}

/// [`launch`] with a given launcher (the tests run both).
pub(crate) fn launch_with(how: Launcher, recipe: &Recipe<'_>) -> io::Result<Launched> {
    // The same environment for either launcher (std's `Command` would take names the C
    // library's `KEY=VALUE` strings cannot hold).
    for (k, v) in recipe.env {
        if !env_var_ok(k, v) {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "environment variable {k:?}: a name must be non-empty with no '=' or NUL, \
                     a value without NUL"
                ),
            ));
        }
    }
    // The worker's CPU set (`SpawnOptions::cpus`), parsed before the launch: the fork
    // launcher's child may not allocate.
    let cpus = match recipe
        .env
        .iter()
        .rev()
        .find(|(k, _)| k == crate::worker::boot::CPUS_ENV)
    {
        Some((_, list)) => Some(crate::sys::CpuMask::from_list(list).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad CPU set {list:?}"))
        })?),
        None => None,
    };
    let pid = match how {
        Launcher::Spawn => {
            // A spawned child has no step of its own before its exec: it inherits the CPU set
            // of the thread that starts it, so this thread takes the set for the spawn.
            let _pinned = cpus.as_ref().map(Pinned::new).transpose()?;
            vfork::launch(recipe)
        }
        Launcher::Fork => fork::launch(recipe, cpus),
    }
    // The OS error alone ("No such file or directory") does not say which file.
    .map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("worker program {}: {e}", recipe.program.display()),
        )
    })?;
    Ok(Launched { pid, status: None })
}

/// The calling thread runs on a given CPU set until this is dropped, when its own set comes
/// back. A child it starts meanwhile has the set from birth: its dynamic loader, and every
/// thread its program ever starts, including those of libraries initialised before `main`.
///
/// The supervisor thread is the only one that launches, and it does nothing else in between.
/// Restoring the thread's own set makes it the thread's requested set on Linux 6.2 and later:
/// the thread (and the unpinned workers it starts) no longer widens by itself when its cpuset
/// grows. Workers get the pool's CPUs as they were when it started either way.
struct Pinned {
    /// The thread's own set.
    before: crate::sys::CpuMask,
}

impl Pinned {
    fn new(mask: &crate::sys::CpuMask) -> io::Result<Pinned> {
        // Unreadable, it could not be restored: the thread, and every worker it launches
        // later, would keep this worker's set.
        let before = crate::sys::CpuMask::of_this_thread()
            .ok_or_else(|| io::Error::other("cannot read the launching thread's CPU set"))?;
        mask.apply()?;
        Ok(Pinned { before })
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // The old set fails only if no CPU of it is left in the thread's cpuset (changed
        // meanwhile): then every CPU the cpuset allows, never the worker's set.
        if self.before.apply().is_err() {
            let _ = self.before.all_like().apply();
        }
    }
}

/// A launched worker process, reaped by its pid: our child, so its pid is not reused before we
/// reap it, and once reaped it is never used again.
#[derive(Debug)]
pub(crate) struct Launched {
    pid: libc::pid_t,
    /// How it ended, once reaped.
    status: Option<ExitStatus>,
}

impl Launched {
    /// Its process id.
    pub(crate) fn id(&self) -> u32 {
        self.pid as u32
    }

    /// How it ended, without blocking: `None` while it runs.
    pub(crate) fn try_wait(&mut self) -> io::Result<Option<ExitStatus>> {
        self.reap(libc::WNOHANG)
    }

    /// Waits for it to end.
    pub(crate) fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(st) = self.reap(0)? {
                return Ok(st);
            }
        }
    }

    /// Sends it SIGKILL, unless it has been reaped (then its pid may be someone else's).
    pub(crate) fn kill(&mut self) -> io::Result<()> {
        if self.status.is_some() {
            return Ok(());
        }
        // SAFETY: kill takes integers only; the pid is our unreaped child's.
        if unsafe { libc::kill(self.pid, libc::SIGKILL) } < 0 {
            return Err(io::Error::last_os_error());
        }
        Ok(())
    }

    /// One `waitpid` with `flags` (retried if a signal interrupts it).
    fn reap(&mut self, flags: libc::c_int) -> io::Result<Option<ExitStatus>> {
        if let Some(st) = self.status {
            return Ok(Some(st));
        }
        let mut raw: libc::c_int = 0;
        loop {
            // SAFETY: waitpid writes one int into storage we own; the pid is our child's.
            let r = unsafe { libc::waitpid(self.pid, &mut raw, flags) };
            if r == self.pid {
                let st = ExitStatus::from_raw(raw);
                self.status = Some(st);
                return Ok(Some(st));
            }
            if r == 0 {
                return Ok(None);
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}

/// The program a worker runs by default: this very binary.
pub(crate) fn current_program() -> std::path::PathBuf {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().unwrap_or_else(|_| proc_exe.to_path_buf())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::{AsFd, FromRawFd, OwnedFd};
    use std::time::{Duration, Instant};

    /// A recipe for `program` with the boot string `the-boot`.
    fn recipe<'a>(
        program: &'a Path,
        seg: &'a OwnedFd,
        line: &'a OwnedFd,
        env: &'a [(String, String)],
    ) -> Recipe<'a> {
        Recipe {
            program,
            segment: seg.as_fd(),
            notify: line.as_fd(),
            boot: "the-boot",
            env,
        }
    }

    /// Launches, retrying (bounded) while the script is "text busy": a `fork` by another
    /// test of this binary can hold a copy of the descriptor it was written through until its
    /// child's exec.
    fn launch_retrying(how: Launcher, r: &Recipe<'_>) -> Launched {
        let until = Instant::now() + Duration::from_secs(30);
        loop {
            match launch_with(how, r) {
                Err(e) if e.raw_os_error() == Some(libc::ETXTBSY) && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(5))
                }
                other => return other.unwrap(),
            }
        }
    }

    /// A `/proc/<pid>/status` field.
    fn status_field(pid: u32, name: &str) -> String {
        let s = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap();
        s.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
            .unwrap()
            .trim()
            .to_string()
    }

    #[test]
    fn both_launchers_give_the_worker_its_fds_group_signals_env_and_cpus() {
        let dir = std::env::temp_dir().join(format!("sp-launch-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let script = dir.join("w.sh");
        std::fs::write(&script, "#!/bin/sh\nexec sleep 60\n").unwrap();
        std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o755))
            .unwrap();
        let seg = crate::sys::memfd_sealed(4096, 0).unwrap();
        let (_ours, theirs) = crate::sys::notify_line().unwrap();
        // A descriptor without O_CLOEXEC, as a careless C host leaves them.
        let mut p = [0; 2];
        // SAFETY: pipe writes two fds into our array.
        assert_eq!(unsafe { libc::pipe(p.as_mut_ptr()) }, 0);
        // SAFETY: both were just created and are owned by nothing else.
        let leaked = unsafe { (OwnedFd::from_raw_fd(p[0]), OwnedFd::from_raw_fd(p[1])) };
        let cpu = *crate::sys::allowed_cpus().last().unwrap();
        let own_cpus = crate::sys::allowed_cpus();
        let mut launchers = vec![Launcher::Fork];
        if vfork::available() {
            launchers.push(Launcher::Spawn);
        } else {
            eprintln!(
                "SKIPPED the posix_spawn launcher: it cannot run here (no posix_spawn_file_actions_addclosefrom_np, or neither close_range nor /proc/self/fd)"
            );
        }
        for how in launchers {
            let env = [
                ("SP_LAUNCH_TEST".to_string(), "first".to_string()),
                (crate::worker::boot::CPUS_ENV.to_string(), cpu.to_string()),
                ("SP_LAUNCH_TEST".to_string(), "second".to_string()),
            ];
            let mut child = launch_retrying(how, &recipe(&script, &seg, &theirs, &env));
            let pid = child.id();
            // Wait (bounded) for the script to have become `sleep`, for that exec to have set
            // up its environment (comm changes first) and for the dynamic loader to have closed
            // the files it opens while it loads `sleep`'s libraries (fd 5 for a moment): a
            // leaked descriptor stays, so it still fails the check once the wait runs out.
            let read_fds = || {
                let mut fds: Vec<u32> = std::fs::read_dir(format!("/proc/{pid}/fd"))
                    .map(|d| {
                        d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                            .collect()
                    })
                    .unwrap_or_default();
                fds.sort();
                fds
            };
            let until = Instant::now() + Duration::from_secs(10);
            let (environ, fds) = loop {
                let comm = std::fs::read_to_string(format!("/proc/{pid}/comm"));
                let environ = std::fs::read(format!("/proc/{pid}/environ")).unwrap_or_default();
                let fds = read_fds();
                let settled = comm.is_ok_and(|c| c == "sleep\n") && !environ.is_empty();
                if settled && (fds == [0, 1, 2, 3, 4] || Instant::now() >= until) {
                    break (environ, fds);
                }
                assert!(Instant::now() < until, "{how:?}: the child never ran sleep");
                std::thread::sleep(Duration::from_millis(1));
            };
            assert_eq!(
                fds,
                [0, 1, 2, 3, 4],
                "{how:?}: only stdio, the segment, the line"
            );
            let link = |fd: u32| std::fs::read_link(format!("/proc/{pid}/fd/{fd}")).unwrap();
            assert_eq!(link(0), Path::new("/dev/null"), "{how:?}");
            assert!(
                link(3).to_str().unwrap().contains("memfd:stateful-pool"),
                "{how:?}"
            );
            assert!(link(4).to_str().unwrap().starts_with("socket:"), "{how:?}");
            // SAFETY: getpgid takes a pid only.
            let pgid = unsafe { libc::getpgid(pid as i32) };
            assert_eq!(pgid, pid as i32, "{how:?}: a group of its own");
            // (With a signal blocked on the launching thread: `tests/hygiene.rs`.)
            assert_eq!(status_field(pid, "SigBlk"), "0000000000000000", "{how:?}");
            let ign = u64::from_str_radix(&status_field(pid, "SigIgn"), 16).unwrap();
            assert_eq!(
                ign & (1 << (libc::SIGPIPE - 1)),
                0,
                "{how:?}: SIGPIPE not ignored"
            );
            assert_eq!(
                status_field(pid, "Cpus_allowed_list"),
                cpu.to_string(),
                "{how:?}"
            );
            let vars: Vec<&[u8]> = environ.split(|&b| b == 0).collect();
            let boot = format!("{}=the-boot", crate::worker::boot::BOOT_ENV);
            assert!(vars.contains(&boot.as_bytes()), "{how:?}");
            assert!(
                vars.contains(&&b"SP_LAUNCH_TEST=second"[..]),
                "{how:?}: the last wins"
            );
            assert!(!vars.contains(&&b"SP_LAUNCH_TEST=first"[..]), "{how:?}");
            assert!(
                vars.iter().any(|v| v.starts_with(b"PATH=")),
                "{how:?}: ours inherited"
            );
            // The launching thread keeps its own CPU set.
            assert_eq!(crate::sys::allowed_cpus(), own_cpus, "{how:?}");
            assert_eq!(child.try_wait().unwrap(), None, "{how:?}");
            child.kill().unwrap();
            let st = child.wait().unwrap();
            assert_eq!(
                std::os::unix::process::ExitStatusExt::signal(&st),
                Some(libc::SIGKILL),
                "{how:?}"
            );
            // Reaped: the status is kept, and no signal goes to a pid that may be reused.
            assert_eq!(child.try_wait().unwrap(), Some(st));
            child.kill().unwrap();
        }
        drop(leaked);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn a_missing_program_is_the_launch_error() {
        let seg = crate::sys::memfd_sealed(4096, 0).unwrap();
        let (_ours, theirs) = crate::sys::notify_line().unwrap();
        // With a CPU set too: a launch that fails gives the launching thread its own set back.
        let own = crate::sys::allowed_cpus();
        let env = [(
            crate::worker::boot::CPUS_ENV.to_string(),
            own.last().unwrap().to_string(),
        )];
        let program = Path::new("/nonexistent/stateful-pool-worker");
        for how in [Launcher::Fork, Launcher::best()] {
            let e = launch_with(how, &recipe(program, &seg, &theirs, &env)).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::NotFound, "{how:?}: {e}");
            assert!(e.to_string().contains(&*program.to_string_lossy()), "{e}");
            assert_eq!(crate::sys::allowed_cpus(), own, "{how:?}");
        }
        // Malformed input, refused before anything starts.
        for (k, v) in [("A=B", "x"), ("", "x"), ("K", "a\0b")] {
            let env = [(k.to_string(), v.to_string())];
            let r = recipe(Path::new("/bin/true"), &seg, &theirs, &env);
            let e = launch_with(Launcher::best(), &r).unwrap_err();
            assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{k:?}={v:?}: {e}");
        }
        let env = [(crate::worker::boot::CPUS_ENV.to_string(), "x".to_string())];
        let r = recipe(Path::new("/bin/true"), &seg, &theirs, &env);
        let e = launch_with(Launcher::best(), &r).unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::InvalidInput, "{e}");
    }
}
