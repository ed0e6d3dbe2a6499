//! Completion queues: how an event loop (epoll, poll, libuv, asio) waits for many tasks with no
//! thread parked per task.
//!
//! A queue is a FIFO of `(user_data, task handle)` pairs plus an eventfd. `sp_task_notify`
//! registers a [`Waker`] on the task (`TaskHandle::wake_when_finished`); the pool's reactor
//! thread calls it when the task finishes, and it pushes the pair and bumps the eventfd. The
//! event loop watches the descriptor, pops pairs with `sp_completion_queue_next` and collects
//! each task with `sp_task_poll` (which then returns at once).
//!
//! The descriptor is readable exactly while the queue holds entries: the push and the
//! eventfd write happen under the queue's lock, and a pop that empties the queue drains the
//! eventfd under the same lock. So a level-triggered poll never misses an entry, and a
//! readable descriptor with an empty queue happens only if the counter overflowed (never, at
//! 2^64 - 2 entries).

use crate::handles::Table;
use crate::host::{TASKS, sp_task};
use crate::{Fail, guard, sp_status};
use std::collections::VecDeque;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::task::{Wake, Waker};

/// A completion queue (a handle; 0 is none).
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct sp_completion_queue {
    /// The handle's value (opaque).
    pub id: u64,
}

/// A queue of finished tasks and the eventfd that says it is not empty.
struct Cq {
    fd: OwnedFd,
    queue: Mutex<VecDeque<(u64, u64)>>,
}

impl Cq {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<(u64, u64)>> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Appends a completion and makes the descriptor readable. Non-blocking: one short lock and
    /// one `write` to a non-blocking eventfd (it runs on the pool's reactor thread).
    fn push(&self, user_data: u64, task: u64) {
        let mut q = self.lock();
        q.push_back((user_data, task));
        let one: u64 = 1;
        // SAFETY: writes 8 bytes from a local to our own open eventfd. It can only fail with
        // EAGAIN at a counter of 2^64 - 2, when the descriptor is readable anyway.
        unsafe { libc::write(self.fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    }

    /// Takes the oldest completion; once the queue is empty the descriptor is no longer
    /// readable.
    fn pop(&self) -> Option<(u64, u64)> {
        let mut q = self.lock();
        let r = q.pop_front();
        if q.is_empty() {
            let mut n: u64 = 0;
            // SAFETY: reads 8 bytes into a local from our own non-blocking eventfd (EAGAIN if
            // already zero): resets its counter.
            unsafe { libc::read(self.fd.as_raw_fd(), (&mut n as *mut u64).cast(), 8) };
        }
        r
    }
}

/// The waker registered on one task: pushes `(user_data, task)` to its queue, once.
struct Notify {
    cq: Weak<Cq>,
    user_data: u64,
    task: u64,
    fired: AtomicBool,
}

impl Wake for Notify {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if self.fired.swap(true, Ordering::AcqRel) {
            return;
        }
        // A queue freed meanwhile drops the completion.
        if let Some(cq) = self.cq.upgrade() {
            cq.push(self.user_data, self.task);
        }
    }
}

static CQS: Table<Arc<Cq>> = Table::new(7, "completion queue");

/// Creates a completion queue; `*out` receives its handle. Thread-safe.
///
/// Thread rules: a queue may be used from many threads at once (`sp_task_notify` from any,
/// `sp_completion_queue_next` from any; each completion is popped once). Completions are
/// pushed from the pool's own reactor thread, which never blocks on the queue for long.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_completion_queue_new(out: *mut sp_completion_queue) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        crate::handles::check_not_forked()?;
        // SAFETY: plain syscall; the result is checked below.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Fail::new(
                sp_status::SP_BUILD_FAILED,
                format!("eventfd failed: {}", std::io::Error::last_os_error()),
            ));
        }
        // SAFETY: a descriptor we just opened and own.
        let fd = unsafe { OwnedFd::from_raw_fd(fd) };
        let id = CQS.insert(Arc::new(Cq {
            fd,
            queue: Mutex::new(VecDeque::new()),
        }));
        // SAFETY: checked non-null above; the caller promises it is writable.
        unsafe { out.write(sp_completion_queue { id }) };
        Ok(())
    })
}

/// The queue's descriptor, `*out`: an eventfd that is readable (`POLLIN`/`EPOLLIN`) while
/// completions are pending. Watch it level-triggered (or, edge-triggered, pop until `SP_EMPTY`
/// each time it fires); do not read, write or close it (it belongs to the queue and is closed by
/// `sp_completion_queue_free`). Thread-safe.
///
/// # Safety
///
/// `out` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_completion_queue_fd(
    cq: sp_completion_queue,
    out: *mut i32,
) -> sp_status {
    guard(|| {
        if out.is_null() {
            return Err(Fail::null("out"));
        }
        let fd = CQS.with(cq.id, |q| q.fd.as_raw_fd())?;
        // SAFETY: checked non-null; the caller promises it is writable.
        unsafe { out.write(fd) };
        Ok(())
    })
}

/// Asks that `(user_data, task)` be pushed to `cq` once the task finishes (at once if it
/// already has). Nothing is collected: after popping the pair, collect the result with
/// `sp_task_poll` (which returns at once) or free the task. One registration per task: a later
/// call replaces an earlier one that has not fired yet; a call on a task that has already
/// finished pushes it again. A bounded look at the task (`sp_task_wait_timeout`,
/// `sp_task_poll`) keeps the registration. If the task handle is freed, or consumed by a
/// blocking `sp_task_wait`, before it finishes, nothing is pushed (or, in a narrow race with
/// its completion, a handle that is already dead, which `sp_task_poll` reports as
/// `SP_INVALID_HANDLE`); if the queue is freed first, its
/// completions are dropped. Fails with `SP_BUSY` while another thread is inside a bounded wait
/// on the task, `SP_INVALID_HANDLE` while one blocks in `sp_task_wait`. Thread-safe.
#[unsafe(no_mangle)]
pub extern "C" fn sp_task_notify(
    task: sp_task,
    cq: sp_completion_queue,
    user_data: u64,
) -> sp_status {
    guard(|| {
        let q = CQS.with(cq.id, |q| q.clone())?;
        let notify = Arc::new(Notify {
            cq: Arc::downgrade(&q),
            user_data,
            task: task.id,
            fired: AtomicBool::new(false),
        });
        let waker = Waker::from(notify.clone());
        let finished = TASKS.with(task.id, |h| h.wake_when_finished(&waker))?;
        if finished {
            notify.wake_by_ref();
        }
        Ok(())
    })
}

/// Pops the oldest completion without blocking: `*user_data` and `*task` receive what
/// `sp_task_notify` registered (the task handle is still the caller's: collect or free it).
/// `SP_EMPTY` if none is pending (nothing is written). Thread-safe.
///
/// # Safety
///
/// `user_data` and `task` must be writable.
#[unsafe(no_mangle)]
pub unsafe extern "C" fn sp_completion_queue_next(
    cq: sp_completion_queue,
    user_data: *mut u64,
    task: *mut sp_task,
) -> sp_status {
    guard(|| {
        if user_data.is_null() || task.is_null() {
            return Err(Fail::null("user_data or task"));
        }
        let q = CQS.with(cq.id, |q| q.clone())?;
        let Some((u, t)) = q.pop() else {
            return Err(Fail::new(sp_status::SP_EMPTY, "no completion is pending"));
        };
        // SAFETY: both checked non-null; the caller promises they are writable.
        unsafe {
            user_data.write(u);
            task.write(sp_task { id: t });
        }
        Ok(())
    })
}

/// Frees the queue and closes its descriptor (remove it from your epoll set first). Pending
/// and future completions of tasks registered on it are dropped; the tasks themselves are
/// unaffected. A zero handle is a no-op (`SP_OK`).
#[unsafe(no_mangle)]
pub extern "C" fn sp_completion_queue_free(cq: sp_completion_queue) -> sp_status {
    guard(|| crate::host::free_handle(&CQS, cq.id))
}
