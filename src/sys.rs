//! Thin, checked wrappers over the Linux system calls the crate needs: futex wait/wake on a
//! shared (not process-private) word, memfd creation and sealing.
//!
//! Every function returns `io::Result` built from `errno`; nothing else in the crate calls
//! `libc` for these.

use std::io;
use std::os::fd::{FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// Blocks while `*word == expected`, for at most `timeout`. Returns on a wake, a spurious wake,
/// a changed value (EAGAIN), a signal, or the timeout; callers always re-check their condition.
///
/// The futex is *shared* (no `FUTEX_PRIVATE_FLAG`): it is keyed by the backing page, so a wake
/// from another process that maps the same memory reaches us.
pub(crate) fn futex_wait(word: &AtomicU32, expected: u32, timeout: Option<Duration>) {
    let ts;
    let ts_ptr = match timeout {
        Some(d) => {
            ts = libc::timespec {
                tv_sec: d.as_secs().min(i64::MAX as u64) as libc::time_t,
                tv_nsec: d.subsec_nanos() as libc::c_long,
            };
            &ts as *const libc::timespec
        }
        None => std::ptr::null(),
    };
    // SAFETY: `word` is a valid, aligned u32 for the duration of the call (it is borrowed);
    // FUTEX_WAIT only reads it. `ts_ptr` is null or points to a live timespec on our stack.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAIT,
            expected,
            ts_ptr,
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

/// Wakes up to `n` waiters blocked in [`futex_wait`] on `word`, in any process.
pub(crate) fn futex_wake(word: &AtomicU32, n: i32) {
    // SAFETY: FUTEX_WAKE does not access the memory behind the address; the address is valid.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            libc::FUTEX_WAKE,
            n,
            std::ptr::null::<libc::timespec>(),
            std::ptr::null::<u32>(),
            0u32,
        );
    }
}

fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Creates an anonymous memory file of `len` bytes, sealed against shrinking or growing.
///
/// A memfd has no name in `/dev/shm` and is freed with its last fd or mapping, so no crash can
/// leak it; only holders of the fd can map it, so it is private to the pool by construction.
pub(crate) fn memfd_sealed(len: u64) -> io::Result<OwnedFd> {
    // SAFETY: the name is a valid NUL-terminated C string; flags are valid memfd flags.
    let raw = check(unsafe {
        libc::memfd_create(
            c"stateful-pool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    use std::os::fd::AsRawFd;
    // SAFETY: `fd` is a valid open memfd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    // SAFETY: `fd` is a valid open memfd created with MFD_ALLOW_SEALING.
    check(unsafe {
        libc::fcntl(
            fd.as_raw_fd(),
            libc::F_ADD_SEALS,
            libc::F_SEAL_SHRINK | libc::F_SEAL_GROW | libc::F_SEAL_SEAL,
        )
    })?;
    Ok(fd)
}
