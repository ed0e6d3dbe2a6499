//! Launching worker processes (the supervisor owns them afterwards: it reaps them and kills them
//! through their pidfds).
//!
//! Workers are started by *executing a program* (by default `/proc/self/exe`, the running
//! binary), never by a bare `fork`: a fork of a multi-threaded parent may only call
//! async-signal-safe functions, and CUDA state does not survive a fork. Between fork and exec the
//! child only moves the segment's memfd to fd 3 and its notify line to the supervisor to fd 4, marks every
//! other descriptor above stderr close-on-exec, and sets `PR_SET_PDEATHSIG`, all
//! async-signal-safe. The worker gets a process group of its own, so a terminal's Ctrl-C
//! (SIGINT to the foreground group) reaches the parent only, which then shuts the pool down.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so launches happen on
//! the pool's long-lived supervisor thread, never on a caller's thread.

use crate::worker::boot::{BOOT_ENV, NOTIFY_FD, SEGMENT_FD};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// The lowest descriptor a worker does not inherit: 0-2 are stdio, 3 and 4 the worker's.
const FIRST_PRIVATE_FD: libc::c_uint = 5;

/// Starts `program` as a worker with the segment on fd 3, its end of its notify line to the
/// supervisor (`sys::notify_line`) on fd 4,
/// `boot` and `env` in its environment, in a process group of its own. It inherits no other
/// descriptor than stdin (`/dev/null`), stdout and stderr.
pub(crate) fn launch(
    program: &Path,
    segment: BorrowedFd<'_>,
    notify: BorrowedFd<'_>,
    boot: &str,
    env: &[(String, String)],
) -> io::Result<Child> {
    let seg_raw = segment.as_raw_fd();
    let notify_raw = notify.as_raw_fd();
    // The bound of the fallback loop in `cloexec_from`, read here: the closure may not
    // allocate or do anything but plain system calls.
    let fd_limit = open_files_limit();
    // The CPU set, parsed here: the closure may not allocate.
    let cpus = match env
        .iter()
        .rev()
        .find(|(k, _)| k == crate::worker::boot::CPUS_ENV)
    {
        Some((_, list)) => Some(crate::sys::CpuMask::from_list(list).ok_or_else(|| {
            io::Error::new(io::ErrorKind::InvalidInput, format!("bad CPU set {list:?}"))
        })?),
        None => None,
    };
    let mut cmd = Command::new(program);
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .env(BOOT_ENV, boot)
        .stdin(Stdio::null())
        .process_group(0);
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (fcntl, dup2, close, close_range, prctl, sched_setaffinity),
    // allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Duplicate both fds above the targets first, so neither dup2 can clobber the other
            // (e.g. the notify line sitting on fd 3); dup2 also clears FD_CLOEXEC on the targets.
            let seg = libc::fcntl(seg_raw, libc::F_DUPFD, 16);
            let notify = libc::fcntl(notify_raw, libc::F_DUPFD, 16);
            if seg < 0
                || notify < 0
                || libc::dup2(seg, SEGMENT_FD) < 0
                || libc::dup2(notify, NOTIFY_FD) < 0
            {
                return Err(io::Error::last_os_error());
            }
            libc::close(seg);
            libc::close(notify);
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
    cmd.spawn()
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

/// The program a worker runs by default: this very binary.
pub(crate) fn current_program() -> std::path::PathBuf {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().unwrap_or_else(|_| proc_exe.to_path_buf())
    }
}
