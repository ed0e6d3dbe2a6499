//! The launcher of choice: `posix_spawn`, which glibc runs as `clone(CLONE_VM | CLONE_VFORK)`
//! on a stack of its own, so the parent's memory is neither copied nor torn down again by the
//! child's `exec`. The child's descriptors are set up by file actions (stdin from `/dev/null`,
//! the segment to fd 3, the notify line to fd 4, everything from fd 5 up closed); its process
//! group, signal mask and SIGPIPE disposition by spawn attributes.
//!
//! Closing the parent's other descriptors needs `posix_spawn_file_actions_addclosefrom_np`
//! (glibc 2.34): it is looked up at run time, so that the program still loads on an older C
//! library, which gets the [`super::fork`] launcher instead; so does a system where glibc
//! could not run it (neither `close_range` nor `/proc/self/fd`).

use crate::worker::boot::{BOOT_ENV, NOTIFY_FD, SEGMENT_FD};
use std::collections::HashMap;
use std::ffi::{CString, OsString};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::sync::OnceLock;

/// `posix_spawn_file_actions_addclosefrom_np`'s signature.
type AddCloseFrom =
    unsafe extern "C" fn(*mut libc::posix_spawn_file_actions_t, libc::c_int) -> libc::c_int;

/// The C library's `posix_spawn_file_actions_addclosefrom_np`, if it has one.
fn add_close_from() -> Option<AddCloseFrom> {
    static FOUND: OnceLock<Option<AddCloseFrom>> = OnceLock::new();
    *FOUND.get_or_init(|| {
        // SAFETY: dlsym only looks a NUL-terminated name up among the loaded objects.
        let p = unsafe {
            libc::dlsym(
                libc::RTLD_DEFAULT,
                c"posix_spawn_file_actions_addclosefrom_np".as_ptr(),
            )
        };
        // SAFETY: the C library's function of this name has exactly this signature (glibc's
        // <spawn.h>: `int (posix_spawn_file_actions_t *, int)`).
        (!p.is_null()).then(|| unsafe { std::mem::transmute::<*mut libc::c_void, AddCloseFrom>(p) })
    })
}

/// Whether this launcher can be used here: the C library has
/// `posix_spawn_file_actions_addclosefrom_np`, and that can work. glibc runs it with
/// `close_range` (Linux 5.9), or else by listing `/proc/self/fd`; with neither, every spawn
/// would fail with an error that reads like a missing program.
pub(super) fn available() -> bool {
    static USABLE: OnceLock<bool> = OnceLock::new();
    *USABLE.get_or_init(|| {
        // SAFETY: close_range of the one descriptor number `u32::MAX`, which is never open:
        // it closes nothing, and fails (ENOSYS, or EPERM under seccomp) where the call is missing.
        let close_range =
            unsafe { libc::syscall(libc::SYS_close_range, u32::MAX, u32::MAX, 0 as libc::c_uint) }
                == 0;
        add_close_from().is_some()
            && (close_range || std::path::Path::new("/proc/self/fd").is_dir())
    })
}

/// Checks a `posix_spawn*` return value (an error number, not `-1` and `errno`).
fn check(r: libc::c_int) -> io::Result<()> {
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::from_raw_os_error(r))
    }
}

/// A C string from bytes that must not hold a NUL.
fn c_string(bytes: Vec<u8>, what: &str) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            format!("{what} holds a NUL byte"),
        )
    })
}

/// The child's environment: ours, with `env` and the boot variable set on top (a later entry
/// of `env` wins over an earlier one), as `KEY=VALUE` strings.
fn environment(boot: &str, env: &[(String, String)]) -> io::Result<Vec<CString>> {
    let mut set: HashMap<&str, &str> = HashMap::new();
    for (k, v) in env {
        set.insert(k, v);
    }
    set.insert(BOOT_ENV, boot);
    let mut out = Vec::new();
    for (k, v) in std::env::vars_os() {
        if k.to_str().is_some_and(|k| set.contains_key(k)) {
            continue;
        }
        let mut kv: OsString = k;
        kv.push("=");
        kv.push(v);
        out.push(c_string(kv.into_vec(), "an environment variable")?);
    }
    for (k, v) in set {
        out.push(c_string(
            format!("{k}={v}").into_bytes(),
            "an environment variable",
        )?);
    }
    Ok(out)
}

/// The spawn's file actions, destroyed on drop (boxed: POSIX does not promise that the C
/// library keeps no pointer into them, so they do not move).
struct Actions(Box<libc::posix_spawn_file_actions_t>);

impl Actions {
    /// Initialised, empty.
    fn new() -> io::Result<Actions> {
        // SAFETY: all-zero bytes are valid storage for the C struct; init initialises it
        // before any other use.
        let mut a: Box<libc::posix_spawn_file_actions_t> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: `a` is storage we own; only on success does it become an `Actions`, whose
        // drop destroys it.
        check(unsafe { libc::posix_spawn_file_actions_init(&mut *a) })?;
        Ok(Actions(a))
    }
}

impl Drop for Actions {
    fn drop(&mut self) {
        // SAFETY: initialised by `Actions::new` (an `Actions` exists only then); destroyed
        // once, here.
        unsafe { libc::posix_spawn_file_actions_destroy(&mut *self.0) };
    }
}

/// The spawn's attributes, destroyed on drop (boxed, as [`Actions`]).
struct Attrs(Box<libc::posix_spawnattr_t>);

impl Attrs {
    /// Initialised, with no flags.
    fn new() -> io::Result<Attrs> {
        // SAFETY: as in `Actions::new`.
        let mut a: Box<libc::posix_spawnattr_t> = Box::new(unsafe { std::mem::zeroed() });
        // SAFETY: as in `Actions::new`.
        check(unsafe { libc::posix_spawnattr_init(&mut *a) })?;
        Ok(Attrs(a))
    }
}

impl Drop for Attrs {
    fn drop(&mut self) {
        // SAFETY: initialised by `Attrs::new`; destroyed once, here.
        unsafe { libc::posix_spawnattr_destroy(&mut *self.0) };
    }
}

/// Starts a worker as `recipe` says (see [`super::launch`]; the program is never looked up in
/// `PATH`: the builder resolved it); its process id.
pub(super) fn launch(recipe: &super::Recipe<'_>) -> io::Result<libc::pid_t> {
    let Some(close_from) = add_close_from().filter(|_| available()) else {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "posix_spawn_file_actions_addclosefrom_np is missing or cannot run here",
        ));
    };
    // Close-on-exec copies numbered above every target, so that no `dup2` below clobbers the
    // source of another (e.g. the notify line sitting on fd 3). The child closes them (fd 5 up)
    // before its exec; ours close when they drop, after the spawn.
    let seg = crate::sys::dup_cloexec_from(recipe.segment, super::FIRST_PRIVATE_FD as libc::c_int)?;
    let line = crate::sys::dup_cloexec_from(recipe.notify, super::FIRST_PRIVATE_FD as libc::c_int)?;
    let prog = c_string(
        recipe.program.as_os_str().as_bytes().to_vec(),
        "the worker program's path",
    )?;
    let envp_owned = environment(recipe.boot, recipe.env)?;
    let mut envp: Vec<*mut libc::c_char> =
        envp_owned.iter().map(|s| s.as_ptr().cast_mut()).collect();
    envp.push(std::ptr::null_mut());
    let argv: [*mut libc::c_char; 2] = [prog.as_ptr().cast_mut(), std::ptr::null_mut()];
    let mut actions = Actions::new()?;
    let mut attrs = Attrs::new()?;
    // SAFETY: every call gets the initialised, boxed actions and attributes and plain integers or
    // NUL-terminated strings that outlive the spawn; glibc copies the path it is given.
    unsafe {
        check(libc::posix_spawn_file_actions_addopen(
            &mut *actions.0,
            0,
            c"/dev/null".as_ptr(),
            libc::O_RDONLY,
            0,
        ))?;
        // dup2 clears FD_CLOEXEC on the target, so fds 3 and 4 survive the exec.
        check(libc::posix_spawn_file_actions_adddup2(
            &mut *actions.0,
            seg.as_raw_fd(),
            SEGMENT_FD,
        ))?;
        check(libc::posix_spawn_file_actions_adddup2(
            &mut *actions.0,
            line.as_raw_fd(),
            NOTIFY_FD,
        ))?;
        // Everything else the parent holds (a C host's sockets and files opened without
        // O_CLOEXEC) stays out of the worker.
        check(close_from(
            &mut *actions.0,
            super::FIRST_PRIVATE_FD as libc::c_int,
        ))?;
        // A group of its own; no blocked signals (the supervisor thread's mask is not the
        // worker's); SIGPIPE back to its default, as std's `Command` does (Rust programs
        // ignore it, and an ignored disposition would survive the exec).
        let mut none: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut none);
        let mut pipe: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut pipe);
        libc::sigaddset(&mut pipe, libc::SIGPIPE);
        check(libc::posix_spawnattr_setflags(
            &mut *attrs.0,
            (libc::POSIX_SPAWN_SETPGROUP
                | libc::POSIX_SPAWN_SETSIGMASK
                | libc::POSIX_SPAWN_SETSIGDEF) as libc::c_short,
        ))?;
        check(libc::posix_spawnattr_setpgroup(&mut *attrs.0, 0))?;
        check(libc::posix_spawnattr_setsigmask(&mut *attrs.0, &none))?;
        check(libc::posix_spawnattr_setsigdefault(&mut *attrs.0, &pipe))?;
    }
    let mut pid: libc::pid_t = 0;
    // SAFETY: `prog`, `argv` and `envp` are NUL-terminated strings and null-terminated arrays
    // of them, alive until the call returns (glibc's posix_spawn returns after the child's exec
    // or its failure); `actions` and `attrs` are initialised (they exist only then).
    check(unsafe {
        libc::posix_spawn(
            &mut pid,
            prog.as_ptr(),
            &*actions.0,
            &*attrs.0,
            argv.as_ptr(),
            envp.as_ptr(),
        )
    })?;
    drop((seg, line));
    Ok(pid)
}
