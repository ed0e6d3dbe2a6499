//! Waiting without losing wake-ups, across processes: a futex *eventcount*, and the bounded
//! spin that comes before parking.
//!
//! # Protocol
//!
//! One word counts the waiters (`sleepers`, high half) and the wake-ups sent to them that none
//! has answered yet (`pending`, low half). A waiter reads `epoch`, announces itself
//! (`sleepers += 1`), re-checks its condition and only then sleeps with
//! `FUTEX_WAIT(epoch, read_value)`; when it leaves (woken, timed out, or it found its
//! condition true) it takes itself off the count: `sleepers -= 1` and `pending -= 1` if any is
//! pending, then re-checks its condition. A notifier first makes the condition true, then —
//! after a `SeqCst` fence — loads the word. If a waiter is counted, it claims a wake-up by CAS
//! on the word (`notify_one`: `pending += 1`; `notify_all`: `pending = sleepers`), bumps
//! `epoch` and calls `FUTEX_WAKE`. One exception: a `notify_one` that finds every counted
//! waiter with a wake-up pending skips, after re-reading the word with a read-modify-write so
//! that the waiter that leaves next synchronises with it. So a notify costs one load when
//! nobody sleeps (no syscall on the busy path), and a burst of `notify_one`s while a woken
//! worker is still on its way out of the kernel costs one `FUTEX_WAKE`, not one each.
//!
//! **The contract of `notify_one`:** it signals one condition shared by every waiter, which
//! whoever wakes drains (the task queue: a worker pops until it is empty before it waits
//! again). Conditions that differ per waiter use `notify_all` (never skipped) or
//! `wake_all_unconditionally`. And only the parent calls `notify_one`: a notifier that dies
//! between its claim and its `FUTEX_WAKE` leaves a claimed wake-up that nobody sends, which a
//! `notify_one` would then skip on, while a `notify_all` does not care.
//!
//! *No lost wake-up (proof sketch).* The waiter does `sleepers+=1; fence; load cond`; the
//! notifier does `store cond; fence; load word`. By the `SeqCst` fences at least one side sees
//! the other's write (Dekker). If the waiter sees the condition it does not sleep. Otherwise the
//! notifier sees the waiter counted.
//! - If it sends a wake-up: either the bump of `epoch` is before the waiter's `FUTEX_WAIT`,
//!   which then returns at once (`EAGAIN`, the word changed), or after it, and the
//!   `FUTEX_WAKE` wakes a sleeper (`notify_all`: every sleeper). The waiter read `epoch`
//!   before it counted itself, so no bump claimed once it was counted can be in its key.
//! - If a `notify_one` skips, every counted waiter has a wake-up pending. Each claimed wake-up
//!   makes at least one waiter leave after the claim (the one woken, or one whose
//!   `FUTEX_WAIT` finds `epoch` moved; possibly a waiter counted after the claim, with a key
//!   read before its bump), and each leaving takes one pending wake-up off the count. So some
//!   waiter leaves after the skip: its leaving CAS reads from the skip's read-modify-write, and
//!   its re-check sees the condition. Which waiter it is does not matter under the contract
//!   above: the condition is shared, and it drains it.
//!
//! A leaving that answers no wake-up only makes a later notify wake someone it need not have.
//! Spurious wake-ups are harmless: every caller loops on its condition.
//!
//! The word lives in shared memory, where a worker can write anything into it. Nothing here
//! loops on it without a bound: a notifier that keeps losing its CAS wakes unconditionally, and
//! a waiter that keeps losing its leaving CAS leaves the count too high (more wake-ups later,
//! never fewer).
//!
//! # Spinning
//!
//! On a 2-core machine a parent and two workers outnumber the cores; two pure spinners sharing a
//! core cost a scheduler tick (~ms) per hand-off. So every spin here is bounded by a time budget
//! (20 µs by default) and, past its first 3 µs, yields the CPU between polls; then it
//! parks. A thread whose peer seems to share its CPU yields from the start ([`SharedCore`]).

use crate::sync::{AtomicU32, AtomicU64, Ordering, fence};
use std::time::{Duration, Instant};

/// A cross-process eventcount over a `u32` futex word and a `u64` count (see the module docs).
#[repr(C)]
#[derive(Debug)]
pub(crate) struct EventCount {
    /// Bumped by a notifier that sends a wake-up; the futex word waiters sleep on.
    epoch: AtomicU32,
    /// High 32 bits: waiters between `prepare` and the end of `wait`/`cancel`. Low 32 bits:
    /// wake-ups sent that no waiter has answered by leaving yet (at most the waiters).
    count: AtomicU64,
    #[cfg(stateful_pool_loom)]
    model: FutexModel,
}

/// One waiter in [`EventCount`]'s count word.
const ONE_SLEEPER: u64 = 1 << 32;
/// The pending wake-ups' half of the count word.
const PENDING: u64 = u32::MAX as u64;
/// The most CAS attempts on the count word before giving up (on an honest pool, a CAS fails
/// only when another waiter or notifier made progress).
const CAS_TRIES: u32 = 64;

/// The key a waiter got from [`EventCount::prepare`]: the epoch it will sleep on.
#[derive(Debug, Clone, Copy)]
pub(crate) struct WaitKey(u32);

impl EventCount {
    /// A new eventcount with no sleepers (all zero, so zeroed shared memory is a valid one).
    pub(crate) fn new() -> Self {
        EventCount {
            epoch: AtomicU32::new(0),
            count: AtomicU64::new(0),
            #[cfg(stateful_pool_loom)]
            model: FutexModel::default(),
        }
    }

    /// Announces a waiter. The caller must then re-check its condition and call either
    /// [`cancel`](Self::cancel) or [`wait`](Self::wait) exactly once.
    pub(crate) fn prepare(&self) -> WaitKey {
        // The key first: a wake-up claimed for us once we are counted bumps `epoch` after this
        // read, so our `FUTEX_WAIT` cannot sleep through it (it returns, and we leave,
        // answering the wake-up). Read after the count, the key could already include the
        // bump, and the claimed wake-up would stay pending with nobody to answer it.
        let key = WaitKey(self.epoch.load(Ordering::SeqCst));
        self.count.fetch_add(ONE_SLEEPER, Ordering::SeqCst);
        // SYNC POINT: pairs with the fence in `notify_*` (Dekker: our sleepers increment vs.
        // the notifier's condition store).
        fence(Ordering::SeqCst);
        key
    }

    /// Withdraws a waiter that found its condition true after `prepare`.
    pub(crate) fn cancel(&self, _key: WaitKey) {
        self.leave();
    }

    /// Sleeps until notified (or a spurious wake, or the timeout), then withdraws the waiter.
    pub(crate) fn wait(&self, key: WaitKey, timeout: Option<Duration>) {
        self.sleep(key, timeout);
        self.leave();
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
        self.leave();
    }

    /// Takes one waiter off the count, and one pending wake-up if any (never more pending
    /// wake-ups than waiters). Bounded: if the word keeps changing under it (a hostile writer),
    /// it gives up, which leaves a count too high: that costs later notifies a wake-up each,
    /// never loses one.
    fn leave(&self) {
        let mut cur = self.count.load(Ordering::SeqCst);
        for _ in 0..CAS_TRIES {
            let sleepers = (cur >> 32).saturating_sub(1);
            let pending = (cur & PENDING).saturating_sub(1).min(sleepers);
            match self.count.compare_exchange(
                cur,
                (sleepers << 32) | pending,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => return,
                Err(now) => cur = now,
            }
        }
    }

    /// Number of counted sleepers (a snapshot, for tests).
    #[cfg(any(test, feature = "failpoints"))]
    #[allow(dead_code)]
    pub(crate) fn sleepers(&self) -> u32 {
        (self.count.load(Ordering::SeqCst) >> 32) as u32
    }

    /// Number of wake-ups sent and not yet answered (a snapshot, for tests).
    #[cfg(test)]
    pub(crate) fn pending(&self) -> u32 {
        (self.count.load(Ordering::SeqCst) & PENDING) as u32
    }

    /// Tests: what a hostile worker can do (both words live in shared memory): zero the count,
    /// so that notifiers that trust it wake nobody, and put the futex word back to `epoch`, so
    /// that a sleeper whose key is that value misses the wake-ups sent since. Returns the
    /// futex word before.
    #[cfg(all(feature = "failpoints", not(stateful_pool_loom)))]
    pub(crate) fn tamper_for_tests(&self, epoch: Option<u32>) -> u32 {
        self.count.store(0, Ordering::SeqCst);
        match epoch {
            Some(e) => self.epoch.swap(e, Ordering::SeqCst),
            None => self.epoch.load(Ordering::SeqCst),
        }
    }

    /// Tests: what a notifier killed between its claim and its `FUTEX_WAKE` leaves behind.
    #[cfg(all(test, not(stateful_pool_loom)))]
    pub(crate) fn claim_without_waking_for_tests(&self) {
        self.count.fetch_add(1, Ordering::SeqCst);
    }

    /// Wakes one sleeper, if any, unless every sleeper already has a wake-up on its way. Costs
    /// one load when nobody sleeps. Only for a condition every waiter shares and whoever wakes
    /// drains, and only from the parent (module docs, *The contract of `notify_one`*).
    #[inline]
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

    /// Wakes every sleeper, if any (never skipped, whatever wake-ups are pending). Costs one
    /// load when nobody sleeps.
    pub(crate) fn notify_all(&self) {
        self.notify(i32::MAX);
    }

    #[inline]
    fn notify(&self, n: i32) {
        // SYNC POINT: pairs with the fence in `prepare`.
        fence(Ordering::SeqCst);
        let cur = self.count.load(Ordering::SeqCst);
        if cur >> 32 != 0 {
            self.send_wakeup(cur, n);
        }
    }

    /// With waiters counted in `cur`: claims a wake-up (one, or one per waiter for `n > 1`)
    /// and sends it; a `notify_one` (`n == 1`) skips if every waiter already has one pending.
    #[cold]
    fn send_wakeup(&self, mut cur: u64, n: i32) {
        let mut latest = false;
        for _ in 0..CAS_TRIES {
            let (sleepers, pending) = (cur >> 32, cur & PENDING);
            if sleepers <= pending {
                // Every waiter has a wake-up claimed. A `notify_all` sends its own anyway
                // (conditions may differ per waiter: module docs), with nothing to claim; only
                // a `notify_one` may skip.
                if n != 1 {
                    break;
                }
                if latest {
                    return;
                }
                // SYNC POINT: skip only on the word's latest value, read by a read-modify-write:
                // a waiter that leaves later reads the count from this write (release sequence)
                // and so sees the condition the caller made true when it re-checks.
                cur = self.count.fetch_add(0, Ordering::SeqCst);
                latest = true;
                continue;
            }
            let claimed = if n == 1 { pending + 1 } else { sleepers };
            match self.count.compare_exchange(
                cur,
                (sleepers << 32) | claimed,
                Ordering::SeqCst,
                Ordering::SeqCst,
            ) {
                Ok(_) => break,
                Err(now) => (cur, latest) = (now, false),
            }
        }
        // Claimed, or the word kept changing (a hostile writer): wake anyway, which costs a
        // syscall and never loses a wake-up.
        self.epoch.fetch_add(1, Ordering::SeqCst);
        self.futex_wake(n);
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
///
/// A thread whose recent waits were each won by its first yield, a yield that let another
/// thread run for a moment, skips the pure spin (see [`SharedCore`]): its peer is probably on
/// its CPU, and spinning would only delay it.
#[inline]
pub(crate) fn spin_until(budget: Duration, mut cond: impl FnMut() -> bool) -> bool {
    if cond() {
        return true;
    }
    if budget.is_zero() {
        return false;
    }
    let start = Instant::now();
    let shared_core = SharedCore::suspected();
    let pure = if shared_core {
        Duration::ZERO
    } else {
        (budget / 2).min(PURE_SPIN)
    };
    // Until the first yield, how this wait ends is evidence for the guess; after it, the
    // first yield has already been recorded.
    let mut first_yield = true;
    loop {
        if !shared_core || !first_yield {
            for _ in 0..32 {
                crate::sync::spin_hint();
                if cond() {
                    if first_yield {
                        SharedCore::record(None);
                    }
                    return true;
                }
            }
        }
        let elapsed = start.elapsed();
        if elapsed >= budget {
            if first_yield {
                SharedCore::record(None);
            }
            return false;
        }
        if elapsed >= pure {
            let before = first_yield.then(Instant::now);
            std::thread::yield_now();
            let won = cond();
            if let Some(before) = before {
                SharedCore::record(won.then(|| before.elapsed()));
            }
            if won {
                return true;
            }
            first_yield = false;
        }
    }
}

/// Whether this thread's peer seems to share its CPU, from how its recent spins ended (a
/// thread-local guess, never shared memory).
///
/// When the scheduler puts a waiting caller and the worker it waits for on one CPU (it can
/// keep them there for seconds on a 2-vCPU machine while the other vCPU idles), a pure spin
/// cannot succeed: the peer runs only once we yield. Both sides then burned [`PURE_SPIN`] per
/// hand-off: 12.6–14.1 µs per W1 round trip on the development VM, against 8.9–9.8 µs for a
/// pool that parks (`BENCHMARKS.md`, *W1 on one CPU*). The sign of it: the wait is won right
/// after the first yield, and that yield took between [`SWITCHED`] (another thread ran, which
/// a yield with nothing else to run, ≈ 0.2 µs, does not) and [`SWITCHED_MAX`] (longer means a
/// third thread had the CPU for a time slice, while the peer may well be elsewhere). After
/// [`SHARED_AFTER`] such waits in a row the pure spin is skipped, except on every
/// [`REPROBE`]th wait, which spins as before. Any other ending of a wait that reached its spin
/// (won while polling, a first yield too quick or too long or not winning, the budget spent
/// first) ends the guess; waits won by their first check are not counted either way.
pub(crate) struct SharedCore;

/// Consecutive waits won by a switching first yield before the pure spin is skipped.
pub(crate) const SHARED_AFTER: u8 = 4;
/// While the pure spin is skipped, every this many waits spin as before, to notice a change.
pub(crate) const REPROBE: u8 = 16;
/// A yield that took at least this long let another thread run.
pub(crate) const SWITCHED: Duration = Duration::from_micros(1);
/// A yield that took longer than this gave the CPU to a thread for a time slice: not the
/// short hand-off of a peer that answers and yields back.
pub(crate) const SWITCHED_MAX: Duration = Duration::from_micros(50);

#[cfg(not(stateful_pool_loom))]
thread_local! {
    /// (waits won by a switching first yield, in a row; waits since the last reprobe).
    static SHARED_CORE: std::cell::Cell<(u8, u8)> = const { std::cell::Cell::new((0, 0)) };
}

impl SharedCore {
    /// Whether this wait should skip its pure spin.
    fn suspected() -> bool {
        #[cfg(not(stateful_pool_loom))]
        {
            SHARED_CORE.with(|c| {
                let (streak, since) = c.get();
                let (skip, since) = Self::decide(streak, since);
                c.set((streak, since));
                skip
            })
        }
        #[cfg(stateful_pool_loom)]
        false
    }

    /// The decision for a wait, and the new reprobe counter.
    pub(crate) fn decide(streak: u8, since: u8) -> (bool, u8) {
        if streak < SHARED_AFTER {
            return (false, 0);
        }
        let since = since.wrapping_add(1) % REPROBE;
        (since != 0, since)
    }

    /// Records how a wait that reached its spin ended: `Some(took)` if its first yield won it,
    /// that yield having taken `took`; `None` for any other ending.
    fn record(first_yield_won: Option<Duration>) {
        #[cfg(not(stateful_pool_loom))]
        SHARED_CORE.with(|c| {
            let (streak, since) = c.get();
            c.set((Self::next(streak, first_yield_won), since));
        });
        #[cfg(stateful_pool_loom)]
        let _ = first_yield_won;
    }

    /// The new streak after a wait that ended as [`record`](Self::record) describes.
    pub(crate) fn next(streak: u8, first_yield_won: Option<Duration>) -> u8 {
        match first_yield_won {
            Some(t) if (SWITCHED..=SWITCHED_MAX).contains(&t) => streak.saturating_add(1),
            _ => 0,
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
                    // Every waiter re-checks after it leaves the count (its leaving may have
                    // taken a pending wake-up meant for this condition).
                    return cond();
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
