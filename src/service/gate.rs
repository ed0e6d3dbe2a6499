//! A counting gate: at most `cap` holders at once, waited for blocking or async, with a
//! deadline. The server's capacity and each stage's bound on items in flight are gates.
//!
//! A holder is a [`Permit`]; dropping it frees the place and wakes one waiter. Waiting is
//! `event_listener`'s: a listener is registered before the count is read again, so a place
//! freed between the failed attempt and the registration is never missed.

use event_listener::{Event, IntoNotification, Listener};
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Instant;

/// At most `cap` permits out at once.
#[derive(Debug)]
pub(crate) struct Gate {
    used: AtomicUsize,
    cap: usize,
    /// Set by [`close`](Gate::close): waits end with [`Refused::Closed`].
    closed: AtomicBool,
    freed: Event,
    /// Notified when the last permit is given back.
    idle: Event,
}

/// Why [`Gate::acquire`] gave no place.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refused {
    /// The deadline passed first.
    Deadline,
    /// The gate was closed (its server or stage is shutting down).
    Closed,
}

/// One place in a [`Gate`], given back on drop.
#[derive(Debug)]
pub(crate) struct Permit<'a>(&'a Gate);

impl Drop for Permit<'_> {
    fn drop(&mut self) {
        if self.0.used.fetch_sub(1, Ordering::SeqCst) == 1 {
            self.0.idle.notify(usize::MAX);
        }
        // One *more* listener: a plain `notify(1)` is a no-op while an earlier notified
        // listener has not run yet, and two places freed at once must wake two waiters.
        self.0.freed.notify(1.additional());
    }
}

impl Gate {
    /// A gate with `cap` places (`cap` ≥ 1; 0 is taken as 1).
    pub(crate) fn new(cap: usize) -> Gate {
        Gate {
            used: AtomicUsize::new(0),
            cap: cap.max(1),
            closed: AtomicBool::new(false),
            freed: Event::new(),
            idle: Event::new(),
        }
    }

    /// The number of places.
    pub(crate) fn capacity(&self) -> usize {
        self.cap
    }

    /// Places taken now.
    pub(crate) fn in_use(&self) -> usize {
        self.used.load(Ordering::SeqCst)
    }

    /// Waits (blocking) until no permit is out, or `deadline`; whether none is out.
    pub(crate) fn wait_idle(&self, deadline: Instant) -> bool {
        loop {
            if self.in_use() == 0 {
                return true;
            }
            let l = self.idle.listen();
            if self.in_use() == 0 {
                return true;
            }
            if l.wait_deadline(deadline).is_none() && Instant::now() >= deadline {
                return self.in_use() == 0;
            }
        }
    }

    /// A place if one is free now.
    pub(crate) fn try_acquire(&self) -> Option<Permit<'_>> {
        let mut cur = self.used.load(Ordering::SeqCst);
        while cur < self.cap {
            match self
                .used
                .compare_exchange_weak(cur, cur + 1, Ordering::SeqCst, Ordering::SeqCst)
            {
                Ok(_) => return Some(Permit(self)),
                Err(now) => cur = now,
            }
        }
        None
    }

    /// Ends every wait for a place, now and later, with [`Refused::Closed`]; places already
    /// out stay out until dropped, and [`try_acquire`](Self::try_acquire) still works (its
    /// callers check their own shutdown flag).
    pub(crate) fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
        self.freed.notify(usize::MAX);
    }

    /// Waits (async, any executor) for a place until `deadline` or until the gate is closed.
    pub(crate) async fn acquire(&self, deadline: Option<Instant>) -> Result<Permit<'_>, Refused> {
        loop {
            if self.closed.load(Ordering::SeqCst) {
                return Err(Refused::Closed);
            }
            if let Some(p) = self.try_acquire() {
                return Ok(p);
            }
            let l = self.freed.listen();
            // After the listener: a `close` or a freed place from here on notifies it.
            if self.closed.load(Ordering::SeqCst) {
                return Err(Refused::Closed);
            }
            if let Some(p) = self.try_acquire() {
                drop(l);
                self.freed.notify(1.additional());
                return Ok(p);
            }
            if until(deadline, l).await.is_none() {
                return self.try_acquire().ok_or(Refused::Deadline);
            }
        }
    }
}

/// Runs `f` until `deadline`: its output, or `None` if the deadline came first (then `f` is
/// dropped, which cancels whatever it had not started).
pub(crate) async fn until<F: Future>(deadline: Option<Instant>, f: F) -> Option<F::Output> {
    use futures_util::future::{Either, select};
    let Some(d) = deadline else {
        return Some(f.await);
    };
    if Instant::now() >= d {
        return None;
    }
    let f = std::pin::pin!(f);
    match select(f, super::timer::Sleep::until(d)).await {
        Either::Left((v, _)) => Some(v),
        Either::Right(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_gate_holds_at_most_its_capacity_and_frees_on_drop() {
        let g = Gate::new(2);
        let a = g.try_acquire().unwrap();
        let _b = g.try_acquire().unwrap();
        assert!(g.try_acquire().is_none());
        assert_eq!(g.in_use(), 2);
        drop(a);
        assert!(g.try_acquire().is_some());
    }

    #[test]
    fn waits_end_at_the_deadline_or_when_a_place_frees() {
        let g = Gate::new(1);
        let p = g.try_acquire().unwrap();
        let soon = Instant::now() + Duration::from_millis(20);
        assert!(matches!(
            futures_executor::block_on(g.acquire(Some(soon))),
            Err(Refused::Deadline)
        ));
        assert!(matches!(
            futures_executor::block_on(g.acquire(Some(Instant::now()))),
            Err(Refused::Deadline)
        ));
        std::thread::scope(|s| {
            s.spawn(|| {
                let q = futures_executor::block_on(g.acquire(None));
                assert!(q.is_ok());
            });
            drop(p);
        });
        assert!(g.wait_idle(Instant::now() + Duration::from_secs(60)));
        let got = futures_executor::block_on(g.acquire(None));
        assert!(got.is_ok());
    }

    #[test]
    fn two_places_freed_at_once_wake_two_waiters() {
        for _ in 0..200 {
            let g = Gate::new(2);
            let (a, b) = (g.try_acquire().unwrap(), g.try_acquire().unwrap());
            let (tx, rx) = std::sync::mpsc::channel();
            std::thread::scope(|s| {
                for _ in 0..2 {
                    let (g, tx) = (&g, tx.clone());
                    s.spawn(move || {
                        let p = futures_executor::block_on(g.acquire(None));
                        tx.send(()).unwrap();
                        // Hold the place a moment, so the other waiter needs its own.
                        std::thread::park_timeout(Duration::from_millis(1));
                        drop(p);
                    });
                }
                drop(a);
                drop(b);
                for _ in 0..2 {
                    rx.recv_timeout(Duration::from_secs(60))
                        .expect("a waiter was left asleep with a place free");
                }
            });
        }
    }

    #[test]
    fn closing_ends_every_wait_at_once_and_places_out_stay_out() {
        let g = Gate::new(1);
        let p = g.try_acquire().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::scope(|s| {
            for _ in 0..3 {
                let (g, tx) = (&g, tx.clone());
                s.spawn(move || {
                    // Registered or not yet: either way the close reaches it.
                    let r = futures_executor::block_on(g.acquire(None));
                    tx.send(matches!(r, Err(Refused::Closed))).unwrap();
                });
            }
            g.close();
            for _ in 0..3 {
                let closed = rx
                    .recv_timeout(Duration::from_secs(60))
                    .expect("a waiter slept through the close");
                assert!(closed);
            }
        });
        assert_eq!(g.in_use(), 1);
        assert!(matches!(
            futures_executor::block_on(g.acquire(None)),
            Err(Refused::Closed)
        ));
        drop(p);
        assert!(g.wait_idle(Instant::now() + Duration::from_secs(60)));
    }
}
