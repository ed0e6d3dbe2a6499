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

use crate::worker::boot::{BOOT_ENV, SEGMENT_FD};
use std::io;
use std::os::fd::{AsRawFd, BorrowedFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

/// Starts `program` as a worker with the segment on fd 3 and `boot` in its environment.
pub(crate) fn launch(program: &Path, segment: BorrowedFd<'_>, boot: &str) -> io::Result<Child> {
    let raw = segment.as_raw_fd();
    let mut cmd = Command::new(program);
    cmd.env(BOOT_ENV, boot).stdin(Stdio::null());
    // SAFETY: the closure runs between fork and exec in the child and calls only
    // async-signal-safe functions (fcntl, dup2, prctl), allocating nothing.
    unsafe {
        cmd.pre_exec(move || {
            if raw == SEGMENT_FD {
                // dup2(3, 3) would keep FD_CLOEXEC: clear it instead.
                if libc::fcntl(SEGMENT_FD, libc::F_SETFD, 0) < 0 {
                    return Err(io::Error::last_os_error());
                }
            } else if libc::dup2(raw, SEGMENT_FD) < 0 {
                return Err(io::Error::last_os_error());
            }
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

/// Waits up to `timeout` for `child` to exit (via a pidfd, no polling loop); `Ok(true)` if it
/// exited (and is reaped).
pub(crate) fn wait_timeout(child: &mut Child, timeout: Duration) -> io::Result<bool> {
    if child.try_wait()?.is_some() {
        return Ok(true);
    }
    // SAFETY: pidfd_open takes a pid and flags; the child is not reaped yet (try_wait said so),
    // so the pid still names it.
    let pidfd = unsafe { libc::syscall(libc::SYS_pidfd_open, child.id() as libc::pid_t, 0) };
    if pidfd < 0 {
        return Err(io::Error::last_os_error());
    }
    let pidfd = pidfd as libc::c_int;
    let mut pfd = libc::pollfd {
        fd: pidfd,
        events: libc::POLLIN,
        revents: 0,
    };
    let ms = timeout.as_millis().min(i32::MAX as u128) as libc::c_int;
    // SAFETY: `pfd` is a valid pollfd array of length 1 on our stack.
    let r = unsafe { libc::poll(&mut pfd, 1, ms) };
    // SAFETY: we own `pidfd` and close it once.
    unsafe { libc::close(pidfd) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(child.try_wait()?.is_some())
}

/// Describes how a process ended, for error messages.
pub(crate) fn describe_status(status: std::process::ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    if let Some(sig) = status.signal() {
        format!("killed by signal {sig}")
    } else if let Some(code) = status.code() {
        format!("exit code {code}")
    } else {
        format!("{status}")
    }
}
