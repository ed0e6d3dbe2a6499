//! The fallback launcher, for a C library without `posix_spawn_file_actions_addclosefrom_np`
//! (glibc before 2.34, musl): `fork` of the supervisor thread, then `exec` (std's `Command`
//! with a `pre_exec` step). A fork copies the parent's page tables, so it costs time in
//! proportion to the parent's memory (BENCHMARKS.md, W5); [`super::vfork`] does not.

use super::FIRST_PRIVATE_FD;
use crate::worker::boot::{BOOT_ENV, NOTIFY_FD, SEGMENT_FD};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};

/// Starts a worker as `recipe` says (see [`super::launch`]); its process id.
pub(super) fn launch(
    recipe: &super::Recipe<'_>,
    cpus: Option<crate::sys::CpuMask>,
) -> io::Result<libc::pid_t> {
    let seg_raw = recipe.segment.as_raw_fd();
    let notify_raw = recipe.notify.as_raw_fd();
    // The bound of the fallback loop in `cloexec_from`, read here: the closure may not
    // allocate or do anything but plain system calls.
    let fd_limit = open_files_limit();
    let mut cmd = Command::new(recipe.program);
    cmd.envs(recipe.env.iter().map(|(k, v)| (k, v)))
        .env(BOOT_ENV, recipe.boot)
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (fcntl, dup2, close, sigemptyset, sigprocmask, close_range,
    // prctl, sched_setaffinity), allocating nothing; `none` is all-zero storage that
    // sigemptyset initialises.
    unsafe {
        cmd.pre_exec(move || {
            // Duplicate both fds above the targets first, so neither dup2 can clobber the other
            // (e.g. the notify line sitting on fd 3); dup2 also clears FD_CLOEXEC on the targets.
            let seg = libc::fcntl(seg_raw, libc::F_DUPFD, FIRST_PRIVATE_FD as libc::c_int);
            let line = libc::fcntl(notify_raw, libc::F_DUPFD, FIRST_PRIVATE_FD as libc::c_int);
            if seg < 0
                || line < 0
                || libc::dup2(seg, SEGMENT_FD) < 0
                || libc::dup2(line, NOTIFY_FD) < 0
            {
                return Err(io::Error::last_os_error());
            }
            libc::close(seg);
            libc::close(line);
            // No blocked signals: std's `Command` passes the launching thread's mask on, and
            // the supervisor thread's mask (inherited from whoever built the pool, e.g. a host
            // that blocks SIGTERM for `sigwait`) is not the worker's.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 {
                return Err(io::Error::last_os_error());
            }
            // The worker's CPU set, before its program (and any thread of it) starts.
            if let Some(mask) = &cpus {
                mask.apply()?;
            }
            // Everything else the parent holds (a C host's sockets and files opened without
            // O_CLOEXEC) stays out of the worker. Close-on-exec rather than closed: std's own
            // pipe that reports a failed exec to the parent must live until the exec.
            cloexec_from(FIRST_PRIVATE_FD, fd_limit);
            if libc::prctl(
                libc::PR_SET_PDEATHSIG,
                libc::SIGKILL as libc::c_ulong,
                0,
                0,
                0,
            ) < 0
            {
                return Err(io::Error::last_os_error());
            }
            Ok(())
        });
    }
    // The supervisor reaps the process by its pid (`super::Launched`); std's handle is only
    // dropped, which neither waits for nor kills it.
    Ok(cmd.spawn()?.id() as libc::pid_t)
}

/// Marks every descriptor from `first` up close-on-exec. Async-signal-safe: plain system calls,
/// no allocation. `close_range(CLOSE_RANGE_CLOEXEC)` (Linux 5.11) does it in one call; older
/// kernels get one `fcntl` per descriptor number below `limit`.
fn cloexec_from(first: libc::c_uint, limit: libc::c_uint) {
    // SAFETY: close_range takes integers only; with CLOSE_RANGE_CLOEXEC it closes nothing.
    let r = unsafe {
        libc::syscall(
            libc::SYS_close_range,
            first,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC,
        )
    };
    if r == 0 {
        return;
    }
    for fd in first..limit {
        // SAFETY: fcntl on a descriptor number: one that is not open fails with EBADF, and
        // FD_CLOEXEC is the only descriptor flag, so setting it loses nothing.
        unsafe { libc::fcntl(fd as libc::c_int, libc::F_SETFD, libc::FD_CLOEXEC) };
    }
}

/// The soft limit on open files: no descriptor of this process is numbered at or above it
/// (unless the limit was lowered after opening it).
fn open_files_limit() -> libc::c_uint {
    let mut rl = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes one `rlimit` into storage we own.
    let ok = unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut rl) } == 0;
    if ok {
        rl.rlim_cur.min(libc::c_uint::MAX as libc::rlim_t) as libc::c_uint
    } else {
        1 << 16
    }
}
