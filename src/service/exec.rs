//! The blocking calls' executor: polls the item's future on the caller's thread, re-polling
//! for a short while before parking (as a pool's own blocking wait spins before it sleeps),
//! so a blocking call through a graph does not pay a reactor wake-up per stage.
//!
//! A task handle's poll first checks the slot's state word, so a re-poll finds a finished
//! task at the cost of a load, without the reactor. Past the spin budget the thread parks
//! until the future's waker (the pool's reactor, a timer, a gate) unparks it.

use std::future::Future;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::task::{Context, Poll, Wake, Waker};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// How long a blocking call re-polls before it parks.
const SPIN: Duration = Duration::from_micros(100);

struct Unpark {
    thread: Thread,
    woken: AtomicBool,
}

impl Wake for Unpark {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.thread.unpark();
    }
}

/// Runs `f` to completion on this thread.
pub(crate) fn block_on<F: Future>(f: F) -> F::Output {
    let mut f = std::pin::pin!(f);
    loop {
        if let Some(v) = block_on_until(f.as_mut(), None) {
            return v;
        }
    }
}

/// Runs `f` on this thread until it completes (`Some`) or `until` passes (`None`: `f` can be
/// polled again later).
pub(crate) fn block_on_until<F: Future>(
    mut f: std::pin::Pin<&mut F>,
    until: Option<Instant>,
) -> Option<F::Output> {
    let unpark = Arc::new(Unpark {
        thread: std::thread::current(),
        woken: AtomicBool::new(false),
    });
    let waker = Waker::from(unpark.clone());
    let mut cx = Context::from_waker(&waker);
    // The spin budget runs from the start of each wait (the call, or a real wake-up), not
    // from each re-poll: past it the thread parks until the future's waker unparks it.
    let mut spin_until = Instant::now() + SPIN;
    loop {
        if let Poll::Ready(v) = f.as_mut().poll(&mut cx) {
            return Some(v);
        }
        let mut spins = 0u32;
        loop {
            if unpark.woken.swap(false, Ordering::Acquire) {
                spin_until = Instant::now() + SPIN;
                break;
            }
            let now = Instant::now();
            if until.is_some_and(|u| now >= u) {
                return None;
            }
            if now < spin_until {
                spins += 1;
                if spins % 16 == 0 {
                    // Re-poll now and then: a finished task is seen without its wake-up.
                    break;
                }
                std::hint::spin_loop();
                continue;
            }
            match until {
                Some(u) => std::thread::park_timeout(u.saturating_duration_since(now)),
                None => std::thread::park(),
            }
        }
    }
}
