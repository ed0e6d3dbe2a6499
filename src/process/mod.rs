//! Starting and reaping worker processes.
//!
//! Workers are started by *executing a program* (by default `/proc/self/exe`, the running
//! binary), never by a bare `fork`: a fork of a multi-threaded parent may only call
//! async-signal-safe functions, and CUDA state does not survive a fork. Between fork and exec the
//! child only moves the segment's memfd to fd 3 and sets `PR_SET_PDEATHSIG`, both
//! async-signal-safe.
//!
//! `PR_SET_PDEATHSIG` fires when the *thread* that forked the child exits, so launches happen on
//! the pool's long-lived supervisor thread, never on a caller's thread.

use crate::worker::boot::{BOOT_ENV, NOTIFY_FD, SEGMENT_FD};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};

/// Starts `program` as a worker with the segment on fd 3, the supervisor's eventfd on fd 4,
/// `boot` and `env` in its environment.
pub(crate) fn launch(
    program: &Path,
    segment: BorrowedFd<'_>,
    notify: BorrowedFd<'_>,
    boot: &str,
    env: &[(String, String)],
) -> io::Result<Child> {
    let seg_raw = segment.as_raw_fd();
    let notify_raw = notify.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.envs(env.iter().map(|(k, v)| (k, v)))
        .env(BOOT_ENV, boot)
        .stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (fcntl, dup2, close, prctl, getppid), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            // Duplicate both fds above the targets first, so neither dup2 can clobber the other
            // (e.g. the eventfd sitting on fd 3); dup2 also clears FD_CLOEXEC on the targets.
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

/// The program a worker runs by default: this very binary.
pub(crate) fn current_program() -> std::path::PathBuf {
    let proc_exe = Path::new("/proc/self/exe");
    if proc_exe.exists() {
        proc_exe.to_path_buf()
    } else {
        std::env::current_exe().unwrap_or_else(|_| proc_exe.to_path_buf())
    }
}
