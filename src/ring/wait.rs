//! Waiting without losing wake-ups, across processes: a futex *eventcount*, and the bounded
//! spin that comes before parking.
//!
//! # Protocol
//!
//! A waiter announces itself (`sleepers += 1`), reads `epoch`, re-checks its condition and only
//! then sleeps with `FUTEX_WAIT(epoch, read_value)`. A notifier first makes the condition true,
//! then — after a `SeqCst` fence — loads `sleepers`; only if someone sleeps does it bump `epoch`
//! and call `FUTEX_WAKE`. So a notify costs one load when nobody sleeps (no syscall on the busy
//! path).
//!
//! *No lost wake-up (proof sketch).* The waiter does `sleepers+=1; fence; load cond`; the
//! notifier does `store cond; fence; load sleepers`. By the `SeqCst` fences at least one side sees
//! the other's write (Dekker). If the waiter sees the condition it does not sleep. Otherwise the
//! notifier sees `sleepers > 0` and bumps `epoch`: either the bump is before the waiter's
//! `FUTEX_WAIT`, which then returns at once (`EAGAIN`, the word changed), or after it, and the
//! `FUTEX_WAKE` wakes it. Spurious wake-ups are harmless: every caller loops on its condition.
//!
//! # Spinning
//!
//! On a 2-core machine a parent and two workers outnumber the cores; two pure spinners sharing a
//! core cost a scheduler tick (~ms) per hand-off. So every spin here is bounded by a time budget
//! (20 µs by default) and, past its first 3 µs, yields the CPU between polls; then it
//! parks.

use crate::sync::{AtomicU32, Ordering, fence};
use std::time::{Duration, Instant};

/// A cross-process eventcount over two `u32` words (see the module docs).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct EventCount {
    /// Bumped by a notifier that saw a sleeper; the futex word waiters sleep on.
    epoch: AtomicU32,
    /// Number of waiters between `prepare` and the end of `wait`/`cancel`.
    sleepers: AtomicU32,
    #[cfg(stateful_pool_loom)]
    model: FutexModel,
}

/// The key a waiter got from [`EventCount::prepare`]: the epoch it will sleep on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitKey(u32);

impl EventCount {
    /// A new eventcount with no sleepers (all zero, so zeroed shared memory is a valid one).
    pub(crate) fn new() -> Self {
        EventCount {
            epoch: AtomicU32::new(0),
            sleepers: AtomicU32::new(0),
            #[cfg(stateful_pool_loom)]
            model: FutexModel::default(),
        }
    }

    /// Announces a waiter. The caller must then re-check its condition and call either
    /// [`cancel`](Self::cancel) or [`wait`](Self::wait) exactly once.
    pub(crate) fn prepare(&self) -> WaitKey {
        self.sleepers.fetch_add(1, Ordering::SeqCst);
        // SYNC POINT: pairs with the fence in `notify_*` (Dekker: our sleepers increment vs.
        // the notifier's condition store).
        fence(Ordering::SeqCst);
        WaitKey(self.epoch.load(Ordering::SeqCst))
    }

    /// Withdraws a waiter that found its condition true after `prepare`.
    pub(crate) fn cancel(&self, _key: WaitKey) {
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleeps until notified (or a spurious wake, or the timeout), then withdraws the waiter.
    pub(crate) fn wait(&self, key: WaitKey, timeout: Option<Duration>) {
        self.sleep(key, timeout);
        self.sleepers.fetch_sub(1, Ordering::SeqCst);
    }

    /// Sleeps until notified (or a spurious wake, or the timeout) without withdrawing the
    /// waiter: the caller then calls [`cancel`](Self::cancel).
    pub(crate) fn sleep(&self, key: WaitKey, timeout: Option<Duration>) {
        self.futex_wait(key.0, timeout);
    }

    /// Withdraws a sleeper that died counted (a worker killed while parked; the supervisor
    /// knows it from the worker's `parked` word). Saturates at zero: the count lives in shared
    /// memory and is only a hint for notifiers.
    pub(crate) fn withdraw_dead_sleeper(&self) {
        let _ = self
            .sleepers
            .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |n| n.checked_sub(1));
    }

    /// Number of counted sleepers (a snapshot, for tests).
    #[cfg(any(test, feature = "failpoints"))]
    #[allow(dead_code)]
    pub(crate) fn sleepers(&self) -> u32 {
        self.sleepers.load(Ordering::SeqCst)
    }

    /// Wakes one sleeper, if any. Costs one load when nobody sleeps.
    pub(crate) fn notify_one(&self) {
        self.notify(1);
    }

    /// Wakes every sleeper whatever the sleeper count says (for a count another process could
    /// have falsified).
    #[cfg(not(stateful_pool_loom))]
    pub(crate) fn wake_all_unconditionally(&self) {
        fence(Ordering::SeqCst);
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.futex_wake(i32::MAX);
    }

    /// Wakes every sleeper, if any. Costs one load when nobody sleeps.
    pub(crate) fn notify_all(&self) {
        self.notify(i32::MAX);
    }

    #[inline]
    fn notify(&self, n: i32) {
        // SYNC POINT: pairs with the fence in `prepare`.
        fence(Ordering::SeqCst);
        if self.sleepers.load(Ordering::SeqCst) != 0 {
            self.epoch.fetch_add(1, Ordering::SeqCst);
            self.futex_wake(n);
        }
    }

    #[cfg(not(stateful_pool_loom))]
    fn futex_wait(&self, expected: u32, timeout: Option<Duration>) {
        crate::sys::futex_wait(&self.epoch, expected, timeout);
    }

    #[cfg(not(stateful_pool_loom))]
    fn futex_wake(&self, n: i32) {
        crate::sys::futex_wake(&self.epoch, n);
    }

    #[cfg(stateful_pool_loom)]
    fn futex_wait(&self, expected: u32, _timeout: Option<Duration>) {
        // A futex modelled exactly: the value check and the sleep are atomic w.r.t. wake,
        // and there are no spurious wake-ups, so a lost wake-up shows up as a loom deadlock.
        let guard = self.model.lock.lock().unwrap();
        if self.epoch.load(Ordering::SeqCst) == expected {
            drop(self.model.cv.wait(guard).unwrap());
        }
    }

    #[cfg(stateful_pool_loom)]
    fn futex_wake(&self, n: i32) {
        // As the kernel does: `FUTEX_WAKE(1)` wakes one sleeper, so a wake-up spent on a
        // waiter that goes back to sleep shows up as a loom deadlock.
        let _guard = self.model.lock.lock().unwrap();
        if n == 1 {
            self.model.cv.notify_one();
        } else {
            self.model.cv.notify_all();
        }
    }
}

#[cfg(stateful_pool_loom)]
#[derive(Debug, Default)]
struct FutexModel {
    lock: loom::sync::Mutex<()>,
    cv: loom::sync::Condvar,
}

/// How long a spin polls without yielding (at most half its budget): about four W1 round trips
/// on the benchmark VM, or eighteen `sched_yield`s (≈ 165 ns each when no other thread wants
/// the core). Past it, the spin yields between polls, so a thread that shares our core (the
/// one we wait for, on a machine where threads outnumber cores) runs, at the price of noticing
/// the event up to one yield later. A trade-off, measured (BENCHMARKS.md, 2026-12-05, against
/// yielding only in the second half of the 20 µs budget): 1 µs gave W2 +8 % through handles
/// and +15 % through an unordered map but cost W1 +6 % at p50 and p99 (a worker's wait for
/// the next task is often just over 1 µs); 3 µs keeps W1 within noise (+3 %) and W2 +2 % /
/// +8 %.
pub(crate) const PURE_SPIN: Duration = Duration::from_micros(3);

/// Spins on `cond` for at most `budget`: pure spin hints for the first [`PURE_SPIN`] (or half
/// the budget if that is shorter), then yielding the CPU between polls (so a peer that shares
/// our core can run). Returns whether `cond` became true.
#[inline]
pub(crate) fn spin_until(budget: Duration, mut cond: impl FnMut() -> bool) -> bool {
    if cond() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let pure = (budget / 2).min(PURE_SPIN);
    loop {
        for _ in 0..32 {
            crate::sync::spin_hint();
            if cond() {
                return true;
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= budget {
            return false;
        }
        if elapsed >= pure {
            std::thread::yield_now();
            if cond() {
                return true;
            }
        }
    }
}

/// The spin budget `spin`, cut to what is left before `deadline`: a wait with a zero or short
/// timeout is a poll, not a spin of the whole budget.
pub(crate) fn spin_within(spin: Duration, deadline: Option<Instant>) -> Duration {
    match deadline {
        Some(d) => spin.min(d.saturating_duration_since(Instant::now())),
        None => spin,
    }
}

/// Waits until `cond` holds: bounded spin, then park on `ec` with no lost wake-ups. Returns
/// `false` if `deadline` passed first.
pub(crate) fn wait_on(
    ec: &EventCount,
    spin: Duration,
    deadline: Option<Instant>,
    cond: impl FnMut() -> bool,
) -> bool {
    wait_on_marked(ec, spin, deadline, None, cond)
}

/// As [`wait_on`], and while counted as a sleeper, `mark.0` holds `mark.1` (stored after the
/// count goes up, cleared before it goes down): a worker's `parked` word, from which the
/// supervisor can withdraw the sleeper of a worker killed while parked.
pub(crate) fn wait_on_marked(
    ec: &EventCount,
    spin: Duration,
    deadline: Option<Instant>,
    mark: Option<(&AtomicU32, u32)>,
    mut cond: impl FnMut() -> bool,
) -> bool {
    if spin_until(spin_within(spin, deadline), &mut cond) {
        return true;
    }
    let set = |v: u32| {
        if let Some((m, _)) = mark {
            m.store(v, Ordering::SeqCst);
        }
    };
    let parked = mark.map_or(0, |m| m.1);
    loop {
        let key = ec.prepare();
        set(parked);
        if cond() {
            set(0);
            ec.cancel(key);
            return true;
        }
        let timeout = match deadline {
            Some(d) => match d.checked_duration_since(Instant::now()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => {
                    set(0);
                    ec.cancel(key);
                    return false;
                }
            },
            None => None,
        };
        ec.sleep(key, timeout);
        set(0);
        ec.cancel(key);
        if cond() {
            return true;
        }
    }
}
