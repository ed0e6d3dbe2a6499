//! The fallback launcher, where [`super::vfork`] cannot run (a C library without
//! `posix_spawn_file_actions_addclosefrom_np`, i.e. glibc before 2.34 or musl; or neither
//! `close_range` nor `/proc/self/fd`): `fork` of the supervisor thread, then `exec` (std's
//! `Command` with a `pre_exec` step). A fork copies the parent's page tables, so it costs time in
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
    // Copies numbered above the targets, made here rather than in the child: std's `Command`
    // sets the child's stdin up before the `pre_exec` step, which would clobber a segment or
    // line sitting on fd 0; and no `dup2` below can clobber the source of the other.
    let seg = crate::sys::dup_cloexec_from(recipe.segment, FIRST_PRIVATE_FD as libc::c_int)?;
    let line = crate::sys::dup_cloexec_from(recipe.notify, FIRST_PRIVATE_FD as libc::c_int)?;
    let (seg_raw, line_raw) = (seg.as_raw_fd(), line.as_raw_fd());
    // Every free descriptor below 5 taken for the spawn, so that std's pipe that reports a
    // failed exec cannot get fd 3 or 4 (the child's `dup2`s would close it, and write a failed
    // exec's error into the segment).
    let _low = fill_low_fds();
    // The bound of the fallback loop in `cloexec_from`, read here: the closure may not
    // allocate or do anything but plain system calls.
    let fd_limit = open_files_limit();
    let mut cmd = Command::new(recipe.program);
    cmd.envs(recipe.env.iter().map(|(k, v)| (k, v)))
        .env(BOOT_ENV, recipe.boot)
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (dup2, sched_setaffinity, close_range or fcntl, prctl,
    // sigemptyset, sigprocmask), allocating nothing; `none` is all-zero storage that
    // sigemptyset initialises.
    unsafe {
        cmd.pre_exec(move || {
            // dup2 clears FD_CLOEXEC on the targets; the copies close at the exec.
            if libc::dup2(seg_raw, SEGMENT_FD) < 0 || libc::dup2(line_raw, NOTIFY_FD) < 0 {
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
            // No blocked signals: std's `Command` passes the launching thread's mask on, and
            // the supervisor thread's mask (inherited from whoever built the pool, e.g. a host
            // that blocks SIGTERM for `sigwait`) is not the worker's. Last, so that a pending
            // signal has no time to run the host's handler in this child before the exec.
            let mut none: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut none);
            if libc::sigprocmask(libc::SIG_SETMASK, &none, std::ptr::null_mut()) < 0 {
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
            // Not `~0`: gVisor refuses a last descriptor above `INT_MAX`.
            libc::c_int::MAX as libc::c_uint,
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

/// Opens `/dev/null` into every free descriptor number below 5 (each `open` takes the lowest
/// free number); the ones that landed there, to be held until the spawn is done.
fn fill_low_fds() -> Vec<std::os::fd::OwnedFd> {
    let mut held = Vec::new();
    while let Ok(f) = std::fs::File::open("/dev/null") {
        let fd = std::os::fd::OwnedFd::from(f);
        if fd.as_raw_fd() >= FIRST_PRIVATE_FD as libc::c_int {
            break;
        }
        held.push(fd);
    }
    held
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
