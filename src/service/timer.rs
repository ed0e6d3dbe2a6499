//! Deadlines for service items: a future that completes at an instant, on any executor,
//! served by one process-wide timer thread.
//!
//! Every item with a deadline races its work against such a future, a few of them per item
//! (the server's and each leaf stage's), and almost all of them are dropped before they fire.
//! So registering and dropping must be cheap and must not wake anything: a registration wakes
//! the timer thread only when its instant is earlier than the one the thread sleeps until, and
//! a dropped timer is only forgotten (its heap entry is discarded when it comes up). The
//! thread wakes at most once per [`GRANULARITY`] for entries that come up together, and fires
//! a timer at most that late. (A general-purpose timer, e.g. `async-io`'s, wakes its thread at
//! every registration: two to three thread wake-ups per item.)

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::future::Future;
use std::pin::Pin;
use std::sync::{Condvar, Mutex, MutexGuard, OnceLock};
use std::task::{Context, Poll, Waker};
use std::time::{Duration, Instant};

/// How late a timer may fire, at most (timers that come up within it fire together).
pub(crate) const GRANULARITY: Duration = Duration::from_millis(1);

/// Dropped timers' heap entries beyond which the heap is rebuilt from the live ones.
const COMPACT_SLACK: usize = 4096;

struct State {
    /// (instant, id) of every registered timer, dropped ones included until they come up.
    heap: BinaryHeap<Reverse<(Instant, u64)>>,
    /// The live timers' wakers.
    wakers: HashMap<u64, Waker>,
    next_id: u64,
    /// The instant the thread sleeps until (`None`: until notified).
    armed: Option<Instant>,
    thread: bool,
}

struct Wheel {
    state: Mutex<State>,
    cv: Condvar,
}

fn wheel() -> &'static Wheel {
    static WHEEL: OnceLock<Wheel> = OnceLock::new();
    WHEEL.get_or_init(|| Wheel {
        state: Mutex::new(State {
            heap: BinaryHeap::new(),
            wakers: HashMap::new(),
            next_id: 0,
            armed: None,
            thread: false,
        }),
        cv: Condvar::new(),
    })
}

impl Wheel {
    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers (or updates the waker of) timer `id` at `at`; a new id if `id` is `None`.
    fn register(&'static self, id: Option<u64>, at: Instant, waker: &Waker) -> u64 {
        let mut s = self.lock();
        if let Some(id) = id {
            if let Some(w) = s.wakers.get_mut(&id) {
                if !w.will_wake(waker) {
                    let old = std::mem::replace(w, waker.clone());
                    // Dropped without the lock: it may own a task whose `Sleep` cancels.
                    drop(s);
                    drop(old);
                }
                return id;
            }
        }
        let id = s.next_id;
        s.next_id += 1;
        s.heap.push(Reverse((at, id)));
        s.wakers.insert(id, waker.clone());
        if s.heap.len() > 2 * s.wakers.len() + COMPACT_SLACK {
            let live = std::mem::take(&mut s.heap)
                .into_iter()
                .filter(|Reverse((_, id))| s.wakers.contains_key(id))
                .collect();
            s.heap = live;
        }
        if !s.thread {
            // It computes what to sleep until from the heap when it starts. Without it no
            // deadline would ever pass: failing to start it is a panic (as in async-io).
            std::thread::Builder::new()
                .name("stateful-pool-timer".into())
                .spawn(move || self.run())
                .expect("cannot start the service deadline timer thread");
            s.thread = true;
        }
        // Not for a timer within the granularity of what the thread already sleeps until.
        if s.armed
            .is_none_or(|a| at.checked_add(GRANULARITY).is_some_and(|t| t < a))
        {
            s.armed = Some(at);
            self.cv.notify_one();
        }
        id
    }

    fn cancel(&self, id: u64) {
        let mut s = self.lock();
        let w = s.wakers.remove(&id);
        // Dropped without the lock (see `register`).
        drop(s);
        drop(w);
    }

    /// The timer thread: fires what came up, then sleeps until the next entry (at least a
    /// granularity later) or a notification.
    fn run(&self) {
        let mut s = self.lock();
        let mut due = Vec::new();
        loop {
            let now = Instant::now();
            while let Some(&Reverse((at, id))) = s.heap.peek() {
                if at > now && s.wakers.contains_key(&id) {
                    break;
                }
                s.heap.pop();
                if at <= now {
                    if let Some(w) = s.wakers.remove(&id) {
                        due.push(w);
                    }
                }
            }
            let next = s
                .heap
                .peek()
                .map(|Reverse((at, _))| (*at).max(now + GRANULARITY));
            s.armed = next;
            if !due.is_empty() {
                drop(s);
                for w in due.drain(..) {
                    // A waker that panics must not take the timer thread down with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| w.wake()));
                }
                s = self.lock();
                continue;
            }
            s = match next {
                Some(at) => {
                    self.cv
                        .wait_timeout(s, at.saturating_duration_since(now))
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => self.cv.wait(s).unwrap_or_else(|e| e.into_inner()),
            };
        }
    }
}

/// A future that completes at an instant (at most [`GRANULARITY`] late).
#[derive(Debug)]
pub(crate) struct Sleep {
    at: Instant,
    id: Option<u64>,
}

impl Sleep {
    /// Completes at `at`.
    pub(crate) fn until(at: Instant) -> Sleep {
        Sleep { at, id: None }
    }
}

impl Future for Sleep {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let this = self.get_mut();
        if Instant::now() >= this.at {
            if let Some(id) = this.id.take() {
                wheel().cancel(id);
            }
            return Poll::Ready(());
        }
        this.id = Some(wheel().register(this.id, this.at, cx.waker()));
        Poll::Pending
    }
}

impl Drop for Sleep {
    fn drop(&mut self) {
        if let Some(id) = self.id {
            wheel().cancel(id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sleeps_end_in_order_and_dropped_ones_never_fire() {
        let t0 = Instant::now();
        futures_executor::block_on(Sleep::until(t0 + Duration::from_millis(30)));
        assert!(t0.elapsed() >= Duration::from_millis(30));
        // Many registered and dropped (as items that finish first), one kept: it still fires.
        for i in 0..10_000u64 {
            let mut s = Sleep::until(Instant::now() + Duration::from_secs(60 + i % 7));
            let waker = futures_util::task::noop_waker();
            assert!(
                Pin::new(&mut s)
                    .poll(&mut Context::from_waker(&waker))
                    .is_pending()
            );
        }
        let t1 = Instant::now();
        futures_executor::block_on(Sleep::until(t1 + Duration::from_millis(5)));
        assert!(t1.elapsed() >= Duration::from_millis(5));
        assert!(
            wheel().lock().wakers.len() < 100,
            "dropped timers were kept"
        );
        // A later timer does not hold up an earlier one registered after it.
        let far = Sleep::until(Instant::now() + Duration::from_secs(3600));
        let mut far = std::pin::pin!(far);
        let waker = futures_util::task::noop_waker();
        let _ = far.as_mut().poll(&mut Context::from_waker(&waker));
        let t2 = Instant::now();
        futures_executor::block_on(Sleep::until(t2 + Duration::from_millis(10)));
        assert!(t2.elapsed() < Duration::from_secs(30));
    }
}
