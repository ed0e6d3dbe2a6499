//! Thin wrappers over the Linux system calls the parent and the workers share: futex wait/wake
//! on a shared (not process-private) word, memfd creation and sealing, eventfds, notify lines, pidfds,
//! `poll`, signal dispositions.
//!
//! Calls whose failure the caller acts on return `io::Result` built from `errno`. Wake-ups and
//! waits (futex, eventfd) return nothing: a failed wake or a spurious return is harmless, since
//! every waiter re-checks its condition. Code that runs between `fork` and `exec`
//! (`process`), the worker's boot checks (`worker::boot`) and the test failpoints call `libc`
//! directly, where a wrapper would hide what is async-signal-safe.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::AtomicU32;
use std::time::Duration;

/// A CPU affinity mask of any size: machines with more than `CPU_SETSIZE` (1024) CPUs have
/// masks longer than a `cpu_set_t`, which the kernel refuses (`EINVAL`) to fill or to take.
pub(crate) struct CpuMask {
    words: Vec<libc::c_ulong>,
}

/// Bits per mask word.
const MASK_BITS: usize = libc::c_ulong::BITS as usize;
/// The largest mask tried (CPU numbers up to 2^20): a bound on the growing loop below.
const MASK_MAX_CPUS: usize = 1 << 20;

impl CpuMask {
    fn zeroed(cpus: usize) -> CpuMask {
        // At least a cpu_set_t's worth, so a kernel built for 1024 CPUs accepts it.
        let n = cpus.max(libc::CPU_SETSIZE as usize).div_ceil(MASK_BITS);
        CpuMask { words: vec![0; n] }
    }

    /// Every CPU a mask as long as this one can name (the kernel keeps those the thread's
    /// cpuset allows).
    pub(crate) fn all_like(&self) -> CpuMask {
        CpuMask {
            words: vec![!0; self.words.len()],
        }
    }

    /// The calling thread's CPU set (the process's, unless the thread changed its own), read
    /// with a mask grown until the kernel takes it; `None` if it cannot be read.
    pub(crate) fn of_this_thread() -> Option<CpuMask> {
        let mut cpus = libc::CPU_SETSIZE as usize;
        while cpus <= MASK_MAX_CPUS {
            let mut mask = CpuMask::zeroed(cpus);
            // SAFETY: the pointer and length describe `mask.words`, a live, writable buffer of
            // whole `c_ulong` words (see `CpuMask::apply`); the kernel writes at most that
            // many bytes.
            let r = unsafe {
                libc::sched_getaffinity(
                    0,
                    mask.bytes(),
                    mask.words.as_mut_ptr().cast::<libc::cpu_set_t>(),
                )
            };
            if r == 0 {
                return Some(mask);
            }
            // EINVAL: the kernel's mask is longer than ours; try twice the size.
            if io::Error::last_os_error().raw_os_error() != Some(libc::EINVAL) {
                break;
            }
            cpus *= 2;
        }
        None
    }

    /// The mask in bytes, as `sched_{get,set}affinity` take it.
    fn bytes(&self) -> usize {
        self.words.len() * size_of::<libc::c_ulong>()
    }

    /// The CPUs set in the mask, ascending.
    fn cpus(&self) -> Vec<usize> {
        (0..self.words.len() * MASK_BITS)
            .filter(|&c| self.words[c / MASK_BITS] & (1 << (c % MASK_BITS)) != 0)
            .collect()
    }

    /// The mask for a `0,1,5` list (the worker's `STATEFUL_POOL_CPUS`); `None` if malformed,
    /// empty or beyond any mask the kernel takes.
    pub(crate) fn from_list(list: &str) -> Option<CpuMask> {
        let cpus = list
            .split(',')
            .map(|p| p.trim().parse::<usize>().ok())
            .collect::<Option<Vec<usize>>>()?;
        CpuMask::from_cpus(&cpus)
    }

    /// The mask holding `cpus`; `None` if empty or beyond any mask the kernel takes (never for
    /// CPUs that [`allowed_cpus`] returned).
    pub(crate) fn from_cpus(cpus: &[usize]) -> Option<CpuMask> {
        let &max = cpus.iter().max()?;
        if max >= MASK_MAX_CPUS {
            return None;
        }
        let mut mask = CpuMask::zeroed(max + 1);
        for &c in cpus {
            mask.words[c / MASK_BITS] |= 1 << (c % MASK_BITS);
        }
        Some(mask)
    }

    /// Sets the calling thread's affinity to this mask. Async-signal-safe (one system call, no
    /// allocation): the fork launcher calls it between `fork` and `exec`; the `posix_spawn`
    /// launcher on the supervisor thread around the spawn (`process::Pinned`).
    pub(crate) fn apply(&self) -> io::Result<()> {
        // SAFETY: the pointer and length describe `self.words`, a live buffer of whole
        // `c_ulong` words (the kernel's mask unit; `cpu_set_t` is an array of them, so the
        // cast keeps its alignment); the kernel only reads it.
        let r = unsafe {
            libc::sched_setaffinity(
                0,
                self.bytes(),
                self.words.as_ptr().cast::<libc::cpu_set_t>(),
            )
        };
        if r < 0 {
            Err(io::Error::last_os_error())
        } else {
            Ok(())
        }
    }
}

/// The CPUs this process may run on (its affinity mask), ascending; empty if it cannot be read.
pub(crate) fn allowed_cpus() -> Vec<usize> {
    CpuMask::of_this_thread().map_or_else(Vec::new, |m| m.cpus())
}

/// `CLOCK_MONOTONIC` in nanoseconds: one clock for every process of the machine (what
/// `Instant` reads), so a time the parent stores in shared memory means the same to a worker.
pub(crate) fn mono_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `ts` is a live, writable timespec; CLOCK_MONOTONIC always exists on Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}

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
/// Its mode is set to 0600 all the same (it shows in `/proc/<pid>/fd`).
///
/// With `reserve`, every page is allocated now (`fallocate`), so running out of memory is an
/// error here rather than a SIGBUS or an OOM kill at first touch.
pub(crate) fn memfd_sealed(len: u64, reserve: u64) -> io::Result<OwnedFd> {
    // SAFETY: the name is a valid NUL-terminated C string; flags are valid memfd flags.
    let raw = check(unsafe {
        libc::memfd_create(
            c"stateful-pool".as_ptr(),
            libc::MFD_CLOEXEC | libc::MFD_ALLOW_SEALING,
        )
    })?;
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(raw) };
    // SAFETY: `fd` is a valid open memfd.
    check(unsafe { libc::fchmod(fd.as_raw_fd(), 0o600) })?;
    // SAFETY: `fd` is a valid open memfd.
    check(unsafe { libc::ftruncate(fd.as_raw_fd(), len as libc::off_t) })?;
    if reserve > 0 {
        reserve_range(fd.as_fd(), 0, reserve.min(len))?;
    }
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

/// Reserves (allocates) the memory of bytes `off..off + len` of a memfd, so that touching them
/// later can never fail (a shortage is this error now, not a SIGBUS then). A signal that
/// interrupts it (EINTR) is not a shortage: it is retried (what was allocated stays allocated,
/// so each retry has less to do).
pub(crate) fn reserve_range(fd: BorrowedFd<'_>, off: u64, len: u64) -> io::Result<()> {
    loop {
        // SAFETY: fallocate takes integers only; mode 0 allocates within the file's size.
        let r =
            unsafe { libc::fallocate(fd.as_raw_fd(), 0, off as libc::off_t, len as libc::off_t) };
        if r == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

/// A close-on-exec duplicate of `fd` numbered `min` or above (so that it cannot take a number
/// the caller still expects to find free or inherited, such as a worker's fd 4).
pub(crate) fn dup_cloexec_from(fd: BorrowedFd<'_>, min: libc::c_int) -> io::Result<OwnedFd> {
    // SAFETY: F_DUPFD_CLOEXEC takes an integer and returns a new fd or -1.
    let raw = check(unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_DUPFD_CLOEXEC, min) })?;
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Starts a thread with every blockable signal blocked: a helper thread that must not take the
/// process's signals (its handlers run on the threads that expect them) and whose system
/// calls are not interrupted by them. The calling thread's mask is unchanged afterwards.
pub(crate) fn spawn_signals_blocked<T: Send + 'static>(
    builder: std::thread::Builder,
    job: impl FnOnce() -> T + Send + 'static,
) -> io::Result<std::thread::JoinHandle<T>> {
    // SAFETY: an all-zero sigset_t is valid storage; sigfillset initialises it.
    let mut all: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `all` is a live sigset_t.
    unsafe { libc::sigfillset(&mut all) };
    // SAFETY: as above; pthread_sigmask writes the old mask here.
    let mut old: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: both pointers are live sigset_t values; this changes only this thread's mask
    // (SIGKILL and SIGSTOP cannot be blocked and are left alone by the kernel).
    let r = unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old) };
    if r != 0 {
        return Err(io::Error::from_raw_os_error(r));
    }
    // A new thread inherits the mask of the thread that creates it.
    let spawned = builder.spawn(job);
    // SAFETY: `old` is the mask read above; restores this thread's mask.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    spawned
}

/// Creates a non-blocking, close-on-exec eventfd (the supervisor's wake-up line for the pool's
/// own threads; never handed to a worker).
pub(crate) fn eventfd() -> io::Result<OwnedFd> {
    // SAFETY: eventfd takes an initial value and flags; no pointers.
    let raw = check(unsafe { libc::eventfd(0, libc::EFD_CLOEXEC | libc::EFD_NONBLOCK) })?;
    // SAFETY: `raw` is a freshly created fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(raw) })
}

/// Adds 1 to an eventfd's counter (wakes whoever polls it). Never blocks (the fd is ours and
/// non-blocking); a full counter (EAGAIN) already means "readable", so errors are ignored.
pub(crate) fn eventfd_signal(fd: BorrowedFd<'_>) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 on our stack to an fd we borrow.
    unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
}

/// Resets an eventfd's counter to 0 (non-blocking read).
pub(crate) fn eventfd_drain(fd: BorrowedFd<'_>) {
    let mut v: u64 = 0;
    // SAFETY: reads at most 8 bytes into a live u64 on our stack; the fd is non-blocking.
    unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
}

/// Creates one worker's *notify line* to the supervisor: a pair of connected datagram sockets,
/// close-on-exec. The supervisor keeps the first end (it polls and drains it); the worker gets
/// the second as its fd 4, and signals on it once its spawn step has reported.
///
/// One line per worker launch, never shared: a worker can do anything with what it holds
/// (clear `O_NONBLOCK`, `shutdown(2)` its end, flood it, close it), and with a line of its own
/// that only ever delays its own start-up report. An eventfd shared by every worker (one open
/// file description) let a hostile worker drain it before the supervisor looked, or clear its
/// `O_NONBLOCK` so that the supervisor's drain blocked for good. Sends and receives pass
/// `MSG_DONTWAIT`, so no file flag can make them block either.
pub(crate) fn notify_line() -> io::Result<(OwnedFd, OwnedFd)> {
    let mut fds = [0 as libc::c_int; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    check(unsafe {
        libc::socketpair(
            libc::AF_UNIX,
            libc::SOCK_DGRAM | libc::SOCK_CLOEXEC | libc::SOCK_NONBLOCK,
            0,
            fds.as_mut_ptr(),
        )
    })?;
    // SAFETY: two fresh fds that nothing else owns.
    Ok(unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) })
}

/// Wakes whoever polls the other end of a notify line. Never blocks; a full queue (EAGAIN)
/// already means "readable", so errors are ignored.
pub(crate) fn notify_line_signal(fd: BorrowedFd<'_>) {
    let one = [1u8];
    // SAFETY: sends 1 byte from a live array on our stack on an fd we borrow.
    unsafe {
        libc::send(
            fd.as_raw_fd(),
            one.as_ptr().cast(),
            1,
            libc::MSG_DONTWAIT | libc::MSG_NOSIGNAL,
        )
    };
}

/// Empties the receiving end of a notify line (bounded: a sender that keeps sending only makes
/// the next `poll` return at once).
pub(crate) fn notify_line_drain(fd: BorrowedFd<'_>) {
    let mut buf = [0u8; 64];
    for _ in 0..256 {
        // SAFETY: receives at most 64 bytes into a live array on our stack.
        let n = unsafe {
            libc::recv(
                fd.as_raw_fd(),
                buf.as_mut_ptr().cast(),
                buf.len(),
                libc::MSG_DONTWAIT,
            )
        };
        if n < 0 {
            return;
        }
    }
}

/// Opens a pidfd for a child process that has not been reaped yet.
pub(crate) fn pidfd_open(pid: u32) -> io::Result<OwnedFd> {
    // SAFETY: pidfd_open takes a pid and flags; no pointers.
    let r = unsafe { libc::syscall(libc::SYS_pidfd_open, pid as libc::pid_t, 0) };
    if r < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(r as libc::c_int) })
}

/// Sends `sig` to the process behind `pidfd` (never to a recycled pid).
pub(crate) fn pidfd_kill(pidfd: BorrowedFd<'_>, sig: i32) -> io::Result<()> {
    // SAFETY: pidfd_send_signal with a null siginfo and no flags.
    let r = unsafe {
        libc::syscall(
            libc::SYS_pidfd_send_signal,
            pidfd.as_raw_fd(),
            sig,
            std::ptr::null::<libc::siginfo_t>(),
            0u32,
        )
    };
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(())
    }
}

/// Waits until one of `fds` is readable or `timeout` passes (`None`: forever); returns the
/// readable flags, one per fd. EINTR counts as "nothing ready".
pub(crate) fn poll_readable(fds: &[BorrowedFd<'_>], timeout: Option<Duration>) -> Vec<bool> {
    let mut pfds: Vec<libc::pollfd> = fds
        .iter()
        .map(|fd| libc::pollfd {
            fd: fd.as_raw_fd(),
            events: libc::POLLIN,
            revents: 0,
        })
        .collect();
    let ms = match timeout {
        None => -1,
        // Round up so a short timeout does not become a busy loop of 0 ms polls.
        Some(d) => d.as_micros().div_ceil(1000).min(i32::MAX as u128) as libc::c_int,
    };
    // SAFETY: `pfds` is a valid array of `pfds.len()` pollfds on our heap.
    let r = unsafe { libc::poll(pfds.as_mut_ptr(), pfds.len() as libc::nfds_t, ms) };
    if r <= 0 {
        return vec![false; fds.len()];
    }
    pfds.iter().map(|p| p.revents != 0).collect()
}

/// Memory this process may still commit, in bytes: the smaller of the system's
/// `MemAvailable` and the room left under this process's cgroup (v2) memory limit. `None` if
/// neither can be read.
pub(crate) fn memory_available() -> Option<u64> {
    let meminfo = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemAvailable:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
            .map(|kb| kb * 1024)
    });
    let cgroup = std::fs::read_to_string("/proc/self/cgroup")
        .ok()
        .and_then(|c| {
            c.lines()
                .find_map(|l| l.strip_prefix("0::"))
                .map(|p| p.trim().to_string())
        })
        .and_then(|path| {
            let dir = std::path::Path::new("/sys/fs/cgroup").join(path.trim_start_matches('/'));
            let max = std::fs::read_to_string(dir.join("memory.max")).ok()?;
            let max: u64 = max.trim().parse().ok()?; // "max" = no limit
            let cur: u64 = std::fs::read_to_string(dir.join("memory.current"))
                .ok()?
                .trim()
                .parse()
                .ok()?;
            Some(max.saturating_sub(cur))
        });
    match (meminfo, cgroup) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether this process has SIGCHLD set to be ignored (`SIG_IGN`) or `SA_NOCLDWAIT`: its
/// children are then reaped by the kernel, and a pid may be reused before the parent looks.
pub(crate) fn child_exits_unwatched() -> bool {
    // SAFETY: a zeroed sigaction is a valid out-parameter; querying (act = NULL) changes
    // nothing.
    let mut old: libc::sigaction = unsafe { std::mem::zeroed() };
    // SAFETY: signum is valid, act is NULL (query only), oldact points to our local.
    if unsafe { libc::sigaction(libc::SIGCHLD, std::ptr::null(), &mut old) } != 0 {
        return false;
    }
    old.sa_sigaction == libc::SIG_IGN || old.sa_flags & libc::SA_NOCLDWAIT != 0
}

#[cfg(all(test, not(stateful_pool_loom), not(miri)))]
mod tests {
    use super::*;

    #[test]
    fn cpu_masks_of_any_size() {
        let m = CpuMask::from_list("0, 1,5").unwrap();
        assert_eq!(m.cpus(), [0, 1, 5]);
        assert_eq!(
            m.bytes(),
            libc::CPU_SETSIZE as usize / 8,
            "at least a cpu_set_t"
        );
        // Beyond a cpu_set_t: the mask grows to hold it.
        let m = CpuMask::from_list("3,2000").unwrap();
        assert_eq!(m.cpus(), [3, 2000]);
        assert!(m.bytes() * 8 > 2000);
        for bad in ["", "x", "1,,2", "-1", "1048576", "99999999999999999999999"] {
            assert!(CpuMask::from_list(bad).is_none(), "{bad:?}");
        }
        assert_eq!(CpuMask::from_cpus(&[2000, 3]).unwrap().cpus(), [3, 2000]);
        assert!(CpuMask::from_cpus(&[]).is_none());
        assert!(CpuMask::from_cpus(&[1 << 20]).is_none());
        let allowed = allowed_cpus();
        assert!(!allowed.is_empty());
        assert!(allowed.windows(2).all(|w| w[0] < w[1]));
        // The current mask, applied again, is accepted (the kernel takes the longer mask).
        let list = allowed
            .iter()
            .map(|c| c.to_string())
            .collect::<Vec<_>>()
            .join(",");
        std::thread::spawn(move || {
            let m = CpuMask::from_list(&list).unwrap();
            m.apply().unwrap();
            assert_eq!(allowed_cpus(), allowed);
            let big = CpuMask::from_list(&format!("{list},4000")).unwrap();
            big.apply()
                .expect("bits beyond the machine's CPUs are ignored");
            // No CPU this machine has: the kernel refuses.
            assert!(CpuMask::from_list("4000").unwrap().apply().is_err());
        })
        .join()
        .unwrap();
    }

    /// The signal mask of the calling thread.
    fn mask() -> libc::sigset_t {
        // SAFETY: zeroed storage for a sigset_t, filled by pthread_sigmask (a null new set
        // only reads the mask).
        let mut m: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, std::ptr::null(), &mut m) };
        m
    }

    fn blocked(m: &libc::sigset_t, sig: libc::c_int) -> bool {
        // SAFETY: `m` is an initialised sigset_t.
        unsafe { libc::sigismember(m, sig) == 1 }
    }

    #[test]
    fn helper_thread_blocks_signals_and_leaves_the_caller_alone() {
        let before = mask();
        let h = spawn_signals_blocked(std::thread::Builder::new(), || {
            let m = mask();
            [
                libc::SIGINT,
                libc::SIGTERM,
                libc::SIGUSR1,
                libc::SIGCHLD,
                libc::SIGALRM,
            ]
            .iter()
            .all(|&s| blocked(&m, s))
        })
        .unwrap();
        assert!(h.join().unwrap(), "the helper thread takes signals");
        let after = mask();
        for s in [libc::SIGINT, libc::SIGTERM, libc::SIGUSR1, libc::SIGALRM] {
            assert_eq!(blocked(&before, s), blocked(&after, s), "signal {s}");
        }
    }

    #[test]
    fn duplicate_lands_above_the_floor_and_closes_on_exec() {
        let fd = eventfd().unwrap();
        let dup = dup_cloexec_from(fd.as_fd(), 50).unwrap();
        assert!(dup.as_raw_fd() >= 50);
        // SAFETY: F_GETFD on an fd we own.
        let flags = unsafe { libc::fcntl(dup.as_raw_fd(), libc::F_GETFD) };
        assert!(flags & libc::FD_CLOEXEC != 0);
        // Both name the same file: a signal on one is seen on the other.
        eventfd_signal(dup.as_fd());
        let mut v: u64 = 0;
        // SAFETY: reads 8 bytes into a live u64; the fd is non-blocking.
        let n = unsafe { libc::read(fd.as_raw_fd(), (&mut v as *mut u64).cast(), 8) };
        assert_eq!((n, v), (8, 1));
    }

    #[test]
    fn a_notify_line_never_blocks_whatever_the_worker_does_with_its_end() {
        let (rx, tx) = notify_line().unwrap();
        // A hostile worker clears O_NONBLOCK on its end and fills the queue: signals and
        // drains still return at once.
        // SAFETY: F_SETFL on an fd we own.
        unsafe { libc::fcntl(tx.as_raw_fd(), libc::F_SETFL, 0) };
        for _ in 0..10_000 {
            notify_line_signal(tx.as_fd());
        }
        notify_line_drain(rx.as_fd());
        notify_line_drain(rx.as_fd());
        // Readable again after one more signal; nothing reaches the sender's own receive
        // queue.
        notify_line_signal(tx.as_fd());
        let mut v = [0u8; 8];
        // SAFETY: as above.
        let n = unsafe { libc::recv(tx.as_raw_fd(), v.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) };
        assert_eq!(n, -1);
        // SAFETY: as above.
        let n = unsafe { libc::recv(rx.as_raw_fd(), v.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) };
        assert_eq!(n, 1);
        // It shuts its end down: the supervisor's end does not turn readable for good (a
        // datagram pair passes no shutdown on), so the supervisor's `poll` does not spin.
        // SAFETY: shutdown, recv and poll on fds we own, into live buffers on our stack.
        unsafe {
            libc::shutdown(tx.as_raw_fd(), libc::SHUT_RDWR);
            // Empty, however many datagrams this host's buffers let through above.
            for _ in 0..1_000_000 {
                if libc::recv(rx.as_raw_fd(), v.as_mut_ptr().cast(), 8, libc::MSG_DONTWAIT) < 0 {
                    break;
                }
            }
            let mut p = libc::pollfd {
                fd: rx.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            };
            assert_eq!(libc::poll(&mut p, 1, 0), 0, "revents {:#x}", p.revents);
        }
    }

    #[test]
    fn reserve_range_allocates_within_the_file() {
        let fd = memfd_sealed(1 << 20, 0).unwrap();
        reserve_range(fd.as_fd(), 4096, 64 << 10).unwrap();
        // SAFETY: a zeroed stat filled by fstat on an fd we own.
        let mut st: libc::stat = unsafe { std::mem::zeroed() };
        // SAFETY: as above.
        assert_eq!(unsafe { libc::fstat(fd.as_raw_fd(), &mut st) }, 0);
        assert!(st.st_blocks * 512 >= 64 << 10, "{} blocks", st.st_blocks);
        // Beyond the (sealed) size: an error, not a crash.
        assert!(reserve_range(fd.as_fd(), 1 << 20, 4096).is_err());
    }
}
