//! Helpers shared by the C ABI's test binaries (each binary is also its own worker program and
//! registers its callbacks itself).
#![allow(dead_code, unreachable_pub)]

use stateful_pool_ffi::sp_status::*;
use stateful_pool_ffi::*;
use std::ffi::CStr;
use std::ptr::null;

// The bounded waits of the main crate's tests, shared as a file.
#[path = "../../../tests/common/wait.rs"]
mod wait;
#[allow(unused_imports)] // each test binary uses what it needs
pub use wait::{wait_until, watchdog};

/// This thread's last error message.
pub fn last_error() -> String {
    // SAFETY: sp_last_error returns a valid NUL-terminated string.
    unsafe { CStr::from_ptr(sp_last_error()) }
        .to_string_lossy()
        .into_owned()
}

/// A pool with the default options as `f` changes them (no worker yet).
pub fn new_pool(f: impl FnOnce(&mut sp_pool_options)) -> sp_pool {
    let mut o = std::mem::MaybeUninit::<sp_pool_options>::uninit();
    // SAFETY: writable storage; initialised by the call.
    let mut o = unsafe {
        assert_eq!(sp_pool_options_init(o.as_mut_ptr()), SP_OK);
        o.assume_init()
    };
    f(&mut o);
    let mut p = sp_pool { id: 0 };
    assert_eq!(
        // SAFETY: valid pointers.
        unsafe { sp_pool_new(&o, &mut p) },
        SP_OK,
        "{}",
        last_error()
    );
    p
}

/// A result's bytes as text; frees the result.
pub fn take(r: sp_result) -> String {
    let (mut d, mut n) = (null(), 0usize);
    // SAFETY: valid out-pointers.
    assert_eq!(unsafe { sp_result_bytes(r, &mut d, &mut n) }, SP_OK);
    // Every result's bytes are 16-byte aligned, spawn outputs included (whatever the
    // allocator does for small blocks).
    assert_eq!(d as usize % 16, 0, "result bytes at {d:?}");
    let s = if n == 0 {
        String::new()
    } else {
        // SAFETY: the library returned `n` bytes at `d`, valid until the free below.
        String::from_utf8_lossy(unsafe { std::slice::from_raw_parts(d, n) }).into_owned()
    };
    assert_eq!(sp_result_free(r), SP_OK);
    s
}

/// Whether `fd` becomes readable within `timeout_ms`.
pub fn poll_readable(fd: i32, timeout_ms: i32) -> bool {
    let mut pfd = libc::pollfd {
        fd,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd.
    let n = unsafe { libc::poll(&mut pfd, 1, timeout_ms) };
    assert!(n >= 0, "poll failed");
    n == 1 && pfd.revents & libc::POLLIN != 0
}
