//! The pool's dynamic-batching policy ([`BatchPolicy`]) and its counters ([`BatchStats`]).
//! Workers form the batches (`worker::batching`); the policy lives in the segment header, so
//! a change reaches every worker before its next batch.

use super::Pool;
use crate::error::BuildError;
use crate::shm::layout::{BATCH_CAP, SegmentHeader, batch_flags};
use crate::worker::Worker;
use std::sync::atomic::Ordering;
use std::time::Duration;

/// How a pool's workers batch tasks that callers submit independently, for workers whose
/// [`execute_batch`](crate::Worker::execute_batch) runs many tasks for little more than the
/// cost of one (a model's forward pass on a GPU).
///
/// - `max_batch`: the most tasks in one step (1 to 64; 1 is no batching, the default).
/// - `max_delay`: how long a free worker may wait for a fuller batch, counted from the
///   **oldest** waiting task's submission. The default, zero, is work-conserving: a worker
///   that becomes free takes whatever is queued, up to `max_batch`, at once, and a lone
///   request never waits for company. Even with a delay, a worker never waits while another
///   worker of the pool is idle and could take the tasks. (A task submitted before batching
///   was switched on counts from when a worker took it.) Waiting for company is not
///   execution: a task's execution timeout starts when its batch step does.
///
/// Batches form from the shared queue, so several batching workers balance as single tasks
/// do, and a worker takes tasks only while it is free. This is not
/// [`Pool::batch`](crate::Pool::batch), where one caller packs many tasks into one slot
/// (cheaper per task, but the caller must have them all at hand); both can be used together.
///
/// ```
/// # use std::time::Duration;
/// use stateful_pool::BatchPolicy;
/// let p = BatchPolicy::new(32).max_delay(Duration::from_millis(2));
/// assert_eq!(p.max_batch(), 32);
/// ```
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BatchPolicy {
    max_batch: usize,
    max_delay: Duration,
    from_first_taken: bool,
    ignore_idle: bool,
    when_saturated: bool,
}

impl Default for BatchPolicy {
    fn default() -> Self {
        BatchPolicy::none()
    }
}

impl BatchPolicy {
    /// No batching: each task runs on its own (`execute`).
    pub fn none() -> Self {
        BatchPolicy {
            max_batch: 1,
            max_delay: Duration::ZERO,
            from_first_taken: false,
            ignore_idle: false,
            when_saturated: false,
        }
    }

    /// Batches of up to `max_batch` tasks, formed from whatever is queued when a worker is
    /// free (no waiting).
    pub fn new(max_batch: usize) -> Self {
        BatchPolicy {
            max_batch,
            ..BatchPolicy::none()
        }
    }

    /// Lets a free worker wait up to `d` (from the oldest waiting task's submission) for a
    /// fuller batch, unless another worker is idle. A task with a
    /// [`deadline`](crate::TaskOptions::deadline) is held at most halfway from its submission
    /// to that deadline (the wait ends at the first such point among the tasks held), so it
    /// keeps half of its caller's time to run even when the deadline is shorter than the
    /// delay. With `max_batch` 1 (no batching) there is no batch to fill, and the delay has
    /// no effect: tasks never wait for company.
    pub fn max_delay(mut self, d: Duration) -> Self {
        self.max_delay = d;
        self
    }

    /// Waits for a fuller batch (up to [`max_delay`](Self::max_delay)) only while the load
    /// fills batches: when the worker's previous batch was full. Under light load every
    /// batch is partial and nobody waits (work-conserving, lowest latency); at saturation a
    /// free worker waits for a full batch (most throughput). Recommended with a delay for
    /// services that run near capacity (see BENCHMARKS.md, W7).
    pub fn only_when_saturated(mut self, yes: bool) -> Self {
        self.when_saturated = yes;
        self
    }

    /// Other systems' rules, for comparisons (the W7 benchmark): count the delay from the
    /// first task the worker took (mpservice's `batch_wait_time`) instead of from the oldest
    /// task's submission.
    pub fn delay_from_first_taken(mut self, yes: bool) -> Self {
        self.from_first_taken = yes;
        self
    }

    /// Other systems' rules, for comparisons: wait for a fuller batch even while another
    /// worker is idle (Triton's and mpservice's batchers do).
    pub fn wait_while_others_idle(mut self, yes: bool) -> Self {
        self.ignore_idle = yes;
        self
    }

    /// The most tasks in one batch.
    pub fn max_batch(&self) -> usize {
        self.max_batch
    }

    /// The longest a free worker waits for a fuller batch.
    pub fn delay(&self) -> Duration {
        self.max_delay
    }

    /// Checks the ranges (the builder and [`Pool::set_batch_policy`] refuse others).
    pub(crate) fn check(&self) -> Result<(), BuildError> {
        if self.max_batch == 0 || self.max_batch > BATCH_CAP {
            return Err(BuildError::InvalidConfig(format!(
                "max_batch must be 1 to {BATCH_CAP}, not {}",
                self.max_batch
            )));
        }
        if self.max_delay > Duration::from_secs(3600) {
            return Err(BuildError::InvalidConfig(format!(
                "max_delay of {:?} is over an hour",
                self.max_delay
            )));
        }
        Ok(())
    }

    /// Stores the policy where workers read it.
    pub(crate) fn store(&self, hdr: &SegmentHeader) {
        let flags = if self.from_first_taken {
            batch_flags::FROM_FIRST_TAKEN
        } else {
            0
        } | if self.ignore_idle {
            batch_flags::IGNORE_IDLE
        } else {
            0
        } | if self.when_saturated {
            batch_flags::WHEN_SATURATED
        } else {
            0
        };
        hdr.batch.flags.store(flags, Ordering::Relaxed);
        hdr.batch
            .delay_ns
            .store(self.max_delay.as_nanos() as u64, Ordering::Relaxed);
        // Last: a worker that sees batching on sees the rest of the policy soon enough (it
        // is advisory; every value is valid).
        hdr.batch
            .max
            .store(self.max_batch as u32, Ordering::Release);
    }
}

/// Dynamic batching counters, summed over the pool's worker seats since the pool was built
/// ([`PoolStats::batching`](crate::PoolStats::batching)).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct BatchStats {
    /// Batch steps run.
    pub batches: u64,
    /// Tasks in them.
    pub tasks: u64,
    /// Batches by size: 1, 2, 3–4, 5–8, 9–16, 17–32, 33–64 tasks.
    pub sizes: [u64; 7],
    /// Sum over batches of the oldest task's wait in the queue, submit to the step's start.
    pub queue_delay_total: Duration,
    /// The longest such wait.
    pub queue_delay_max: Duration,
    /// Sum over batches of the execute step's time.
    pub execute_total: Duration,
    /// The longest execute step.
    pub execute_max: Duration,
}

impl BatchStats {
    /// The mean batch size (0 if none ran).
    pub fn mean_size(&self) -> f64 {
        if self.batches == 0 {
            0.0
        } else {
            self.tasks as f64 / self.batches as f64
        }
    }
}

impl<W: Worker> Pool<W> {
    /// Changes the batch policy of a live pool: each worker applies it from its next batch.
    /// Fails with [`BuildError::InvalidConfig`] for a policy out of range (as the builder).
    pub fn set_batch_policy(&self, policy: BatchPolicy) -> Result<(), BuildError> {
        policy.check()?;
        policy.store(self.shared.header());
        Ok(())
    }

    /// The batch policy in force.
    pub fn batch_policy(&self) -> BatchPolicy {
        let b = &self.shared.header().batch;
        let flags = b.flags.load(Ordering::Relaxed);
        BatchPolicy {
            max_batch: (b.max.load(Ordering::Acquire) as usize).max(1),
            max_delay: Duration::from_nanos(b.delay_ns.load(Ordering::Relaxed)),
            from_first_taken: flags & batch_flags::FROM_FIRST_TAKEN != 0,
            ignore_idle: flags & batch_flags::IGNORE_IDLE != 0,
            when_saturated: flags & batch_flags::WHEN_SATURATED != 0,
        }
    }

    /// The batch counters, summed over the seats. They are what workers wrote, so each is
    /// only a count (saturating sums, never trusted for anything else).
    pub(crate) fn batch_stats(&self) -> BatchStats {
        let mut s = BatchStats::default();
        let (mut q, mut qmax, mut e, mut emax) = (0u64, 0u64, 0u64, 0u64);
        for seat in 0..self.shared.n_seats() {
            let bc = self.shared.batch_ctl(seat);
            let g = |c: &std::sync::atomic::AtomicU64| c.load(Ordering::Relaxed);
            s.batches = s.batches.saturating_add(g(&bc.batches));
            s.tasks = s.tasks.saturating_add(g(&bc.batched_tasks));
            for (i, n) in s.sizes.iter_mut().enumerate() {
                *n = n.saturating_add(g(&bc.size_hist[i]));
            }
            q = q.saturating_add(g(&bc.queue_ns));
            qmax = qmax.max(g(&bc.max_queue_ns));
            e = e.saturating_add(g(&bc.exec_ns));
            emax = emax.max(g(&bc.max_exec_ns));
        }
        s.queue_delay_total = Duration::from_nanos(q);
        s.queue_delay_max = Duration::from_nanos(qmax);
        s.execute_total = Duration::from_nanos(e);
        s.execute_max = Duration::from_nanos(emax);
        s
    }
}
