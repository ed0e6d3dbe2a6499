//! The few system calls the crate makes itself (each `unsafe` block is here): pinning the
//! HTTP runtime's threads to CPUs, and asking a child process to stop.

/// Restricts the calling thread to `cpus`. Errors name the CPU set that was refused.
pub fn pin_current_thread(cpus: &[usize]) -> Result<(), String> {
    // SAFETY: cpu_set_t is a plain bit array, valid when zeroed.
    let mut set: libc::cpu_set_t = unsafe { std::mem::zeroed() };
    let max = 8 * std::mem::size_of::<libc::cpu_set_t>();
    for &c in cpus {
        if c >= max {
            return Err(format!("CPU {c} is out of range"));
        }
        // SAFETY: `c` is below the set's bit count, checked above.
        unsafe { libc::CPU_SET(c, &mut set) };
    }
    // SAFETY: `set` is a valid, initialised cpu_set_t and the size passed is its size; pid 0
    // is the calling thread.
    let rc = unsafe { libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) };
    if rc != 0 {
        return Err(format!(
            "cannot pin to CPUs {cpus:?}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// Sends SIGTERM to `child` (which must not have been reaped yet).
pub fn terminate(child: &std::process::Child) {
    // SAFETY: kill(2) has no memory-safety preconditions. The pid is the caller's own child,
    // not yet reaped (documented precondition; `Instance::terminate` checks it with
    // `try_wait` first), so the pid cannot have been reused by another process.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGTERM) };
}

/// Sends SIGTERM to process `pid` (for a caller that owns the process and has not reaped it:
/// tests that stop a service they started).
pub fn terminate_pid(pid: u32) {
    // SAFETY: as in `terminate`: no memory-safety preconditions; the caller owns the
    // unreaped process, so the pid names it.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGTERM) };
}
