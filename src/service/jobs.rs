//! The queue between a [`Threads`](super::Threads) stage and its worker threads: a mutex, a
//! condvar, and a sweep that drops the jobs of callers who gave up.
//!
//! A caller that gives up (its deadline passed, its future was dropped) frees its places in
//! the server and the stage at once, but its job is still queued: a thread drops it when it
//! reaches it. While every thread is held by long tasks (or one that never returns), new
//! callers keep queueing, so a queue that never dropped abandoned jobs would grow with the
//! arrival rate times how long the threads stay busy. [`State::push`] therefore sweeps them
//! out whenever the queue has doubled since the last sweep or since a thread last took from
//! it: amortised O(1) per push, and the queue holds at most about twice the jobs whose
//! callers still wait (at least [`SWEEP_MIN`]).

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard};

/// The queue length below which no sweep runs.
const SWEEP_MIN: usize = 64;

/// Whether a job's caller still waits for it.
pub(crate) trait Abandoned {
    /// True once nobody waits for the job's answer.
    fn abandoned(&self) -> bool;
}

/// Jobs on their way to the threads, and whether the stage still takes them.
pub(crate) struct JobQueue<J> {
    state: Mutex<State<J>>,
    ready: Condvar,
}

/// The queue's contents, under its lock ([`JobQueue::lock`]).
pub(crate) struct State<J> {
    jobs: VecDeque<J>,
    /// False once the stage stopped taking jobs (the threads leave when it is empty).
    pub(crate) open: bool,
    /// The length at which the next push sweeps out abandoned jobs.
    sweep_at: usize,
}

impl<J: Abandoned> State<J> {
    /// Queues `job` (the caller holds the lock and wakes a thread with
    /// [`JobQueue::job_added`]); sweeps out abandoned jobs first if the queue has doubled.
    pub(crate) fn push(&mut self, job: J) {
        if self.jobs.len() >= self.sweep_at {
            self.jobs.retain(|j| !j.abandoned());
            self.sweep_at = (2 * self.jobs.len()).max(SWEEP_MIN);
        }
        self.jobs.push_back(job);
    }

    /// Takes every queued job (closing or failing the stage).
    pub(crate) fn take_all(&mut self) -> VecDeque<J> {
        std::mem::take(&mut self.jobs)
    }

    /// Jobs whose callers still wait.
    pub(crate) fn waiting(&self) -> usize {
        self.jobs.iter().filter(|j| !j.abandoned()).count()
    }
}

impl<J: Abandoned> JobQueue<J> {
    /// An empty, open queue.
    pub(crate) fn new() -> Self {
        JobQueue {
            state: Mutex::new(State {
                jobs: VecDeque::new(),
                open: true,
                sweep_at: SWEEP_MIN,
            }),
            ready: Condvar::new(),
        }
    }

    /// The queue's state, locked (a poisoned lock is taken over: every change to the state
    /// is a single push, retain or take, so a panic cannot leave it half-changed).
    pub(crate) fn lock(&self) -> MutexGuard<'_, State<J>> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Wakes one thread for a job just pushed.
    pub(crate) fn job_added(&self) {
        self.ready.notify_one();
    }

    /// Stops taking jobs and wakes every thread (they take what is left, then leave).
    /// Returns what was queued if `take` (to be answered by the caller), else nothing.
    pub(crate) fn close(&self, take: bool) -> VecDeque<J> {
        let mut s = self.lock();
        s.open = false;
        let left = if take { s.take_all() } else { VecDeque::new() };
        drop(s);
        self.ready.notify_all();
        left
    }

    /// A thread's wait for work: blocks until a job is queued, then moves up to `max()` jobs
    /// (asked once there is work) whose callers still wait into `out`; abandoned ones on the
    /// way are dropped. Returns the `max` it used, or `None` once the queue is closed and
    /// empty: the thread leaves.
    pub(crate) fn take(&self, max: impl Fn() -> usize, out: &mut Vec<J>) -> Option<usize> {
        let mut s = self.lock();
        loop {
            let max = if s.jobs.is_empty() { 1 } else { max().max(1) };
            while out.len() < max {
                match s.jobs.pop_front() {
                    Some(j) if j.abandoned() => drop(j),
                    Some(j) => out.push(j),
                    None => break,
                }
            }
            // The queue shrank: the next sweep comes when it has doubled from here, so the
            // abandoned jobs never outnumber about twice the live ones.
            s.sweep_at = s.sweep_at.min((2 * s.jobs.len()).max(SWEEP_MIN));
            if !out.is_empty() {
                return Some(max);
            }
            if !s.open {
                return None;
            }
            s = self.ready.wait(s).unwrap_or_else(|e| e.into_inner());
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct J(Arc<AtomicBool>);

    impl Abandoned for J {
        fn abandoned(&self) -> bool {
            self.0.load(Ordering::Relaxed)
        }
    }

    #[test]
    fn abandoned_jobs_never_pile_up_while_no_thread_takes_any() {
        let q = JobQueue::new();
        let mut live = Vec::new();
        for i in 0..100_000 {
            let flag = Arc::new(AtomicBool::new(false));
            q.lock().push(J(flag.clone()));
            // One caller in a hundred still waits; the others gave up at once.
            if i % 100 == 0 {
                live.push(flag);
            } else {
                flag.store(true, Ordering::Relaxed);
            }
            assert!(
                q.lock().jobs.len() <= (2 * live.len()).max(SWEEP_MIN) + 1,
                "the queue grew past twice its waiting jobs"
            );
        }
        assert_eq!(q.lock().waiting(), live.len());
        // A thread gets only jobs whose callers wait, in order, and leaves once closed.
        let mut out = Vec::new();
        assert_eq!(q.take(|| usize::MAX, &mut out), Some(usize::MAX));
        assert_eq!(out.len(), live.len());
        assert!(out.iter().zip(&live).all(|(j, f)| Arc::ptr_eq(&j.0, f)));
        assert!(q.close(true).is_empty());
        out.clear();
        assert_eq!(q.take(|| 8, &mut out), None);
    }

    #[test]
    fn a_waiting_thread_is_woken_by_a_push_and_by_the_close() {
        let q = JobQueue::new();
        std::thread::scope(|s| {
            let t = s.spawn(|| {
                let mut out = Vec::new();
                let first = q.take(|| 4, &mut out);
                let n = out.len();
                out.clear();
                (first, n, q.take(|| 4, &mut out))
            });
            q.lock().push(J(Arc::new(AtomicBool::new(false))));
            q.job_added();
            // Whether the thread took the job before or after this, the close ends its
            // second wait.
            let left = q.close(false);
            assert!(left.is_empty());
            let (first, n, second) = t.join().unwrap();
            assert_eq!(first, Some(4));
            assert_eq!(n, 1);
            assert_eq!(second, None);
        });
    }
}
