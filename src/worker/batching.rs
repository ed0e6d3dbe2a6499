//! Dynamic batching on the worker side: a free worker takes whatever is queued, up to the
//! pool's `max_batch`, runs it as one [`Worker::execute_batch`] step, and publishes one
//! outcome per task, each in its own slot, exactly as single tasks are published.
//!
//! Forming a batch (ARCHITECTURE.md, *Dynamic batching*):
//! - tasks come from the shared queue, one pop at a time, so several batching workers balance
//!   as single tasks do, and a worker only ever takes tasks while it is free (no hoarding);
//! - with no delay (the default) the worker runs at once with what it got: a lone task never
//!   waits for company;
//! - with a delay it waits for more, up to the delay counted from the *oldest* task's
//!   submission, but stops as soon as another worker is idle (it could take them).
//!
//! Every task taken stays findable should the worker die: the pop records it in
//! `current_slot`/`current_task` (the pop window, as for single tasks), and once claimed it
//! moves into the seat's `BatchCtl` list (entry first, then the window cleared). Each entry
//! is cleared only after its task's outcome is published, so the supervisor answers exactly
//! the unpublished ones (`slot::held_by_dead_worker`, entry by entry).

use super::main_loop::{Server, Task, error_kind, panic_message, recycle};
use super::{BatchTask, Worker, WorkerContext};
use crate::failpoint;
use crate::ring::mpmc::MpmcRing;
use crate::ring::wait::wait_on_marked;
use crate::shm::layout::{BATCH_CAP, BatchCtl, WorkerCtl, batch_flags, ctl_state, parked};
use crate::slot::outcome::{KIND_CANCELLED, KIND_ERR, KIND_EXPIRED, KIND_PANIC};
use crate::slot::{RawOutcome, SlotHeader, bits};
use crate::sys::mono_ns;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// The longest single wait while filling a batch: idle workers and the delay are re-checked
/// at least this often.
const FILL_SLICE: Duration = Duration::from_micros(500);

impl Server<'_> {
    /// This seat's batch block.
    pub(super) fn batch_ctl(&self) -> &BatchCtl {
        self.wp.seg.get(self.wp.layout.batch_ctl_off(self.wp.seat))
    }

    /// Moves a claimed task from the pop window into entry `k` of the batch list: the entry
    /// first (slot, then task id), then the window cleared (slot, then task id).
    fn hold(&self, k: usize, t: &Task<'_>) {
        let bc = self.batch_ctl();
        bc.held_slots[k].store(t.slot + 1, Ordering::Relaxed);
        bc.held_tasks[k].store(t.id, Ordering::SeqCst);
        self.clear_window();
    }

    /// Clears the pop window (slot, then task id: the recovery rule's order).
    fn clear_window(&self) {
        self.ctl.current_slot.store(u32::MAX, Ordering::Release);
        self.ctl.current_task.store(0, Ordering::SeqCst);
    }

    /// Clears entry `k` once its task's outcome is published (slot first, as the recovery
    /// rule requires; SeqCst pairs with the supervisor's timeout handshake).
    fn release(&self, k: usize) {
        let bc = self.batch_ctl();
        bc.held_slots[k].store(0, Ordering::Release);
        bc.held_tasks[k].store(0, Ordering::SeqCst);
    }

    /// Whether another serving worker is waiting for a task.
    fn another_idle(&self) -> bool {
        let layout = &self.wp.layout;
        (0..layout.params.max_workers)
            .filter(|&i| i != self.wp.seat)
            .any(|i| {
                let c = self.wp.seg.get::<WorkerCtl>(layout.ctl_off(i));
                c.idle.load(Ordering::Relaxed) == 1
                    && c.state.load(Ordering::Relaxed) == ctl_state::READY
            })
    }

    /// When `t` was submitted (`now` if the pool was not batching then).
    fn submitted(&self, t: &Task<'_>, now: u64) -> u64 {
        match self.times(t.slot).submitted_ns.load(Ordering::Relaxed) {
            0 => now,
            s => s.min(now),
        }
    }

    /// The time by which the wait for company must end for `t`, submitted at `submitted`:
    /// halfway from then to its deadline, so waiting takes at most half of the caller's time
    /// and the task has the other half to run (`u64::MAX` for a task without a deadline). The
    /// words are the caller's to write: a wrong one only shortens this worker's wait.
    fn start_by(&self, t: &Task<'_>, submitted: u64) -> u64 {
        match self.deadline_ns(t, t.sh.state.load(Ordering::Relaxed)) {
            0 => u64::MAX,
            d => submitted.saturating_add(d.saturating_sub(submitted) / 2),
        }
    }

    /// Forms a batch starting with `first` (popped from the shared queue and claimed, held in
    /// the pop window), runs it, and publishes each task's outcome. Returns `Some(kind)` if
    /// the worker must retire afterwards.
    pub(super) fn serve_dynamic<'s, W: Worker>(
        &self,
        state: &mut W,
        wctx: &WorkerContext,
        first: Task<'s>,
        ring: &MpmcRing<'_>,
        slots: &'s [SlotHeader],
        owner_tag: u32,
    ) -> Option<u32> {
        let hdr = self.wp.header();
        let max = (hdr.batch.max.load(Ordering::Relaxed) as usize).clamp(1, BATCH_CAP);
        let delay_ns = hdr.batch.delay_ns.load(Ordering::Relaxed);
        let flags = hdr.batch.flags.load(Ordering::Relaxed);
        let taken_ns = mono_ns();
        let mut oldest = self.submitted(&first, taken_ns);
        // A task whose caller set a deadline is held for company at most halfway to it: it
        // must neither expire on an idle worker nor be left no time to run.
        let mut start_by = self.start_by(&first, oldest);
        self.hold(0, &first);
        let mut members = Vec::with_capacity(max);
        members.push(first);
        // A batch task (one caller's packed `Pool::batch`) popped while forming: it stays in
        // the pop window and is served on its own after this batch.
        let mut packed = None;
        while members.len() < max {
            if self.ctl.hold.load(Ordering::SeqCst) != 0
                || self.ctl.direct.load(Ordering::Acquire) != 0
                || hdr.shutdown.load(Ordering::Acquire) != 0
            {
                break;
            }
            let popped = ring.pop_tracked(&self.ctl.claim, &self.ctl.current_slot, || {
                failpoint::hit("pop_mid")
            });
            if let Some(slot) = popped {
                let Some(sh) = slots.get(slot as usize) else {
                    self.ctl.current_slot.store(u32::MAX, Ordering::Relaxed);
                    continue;
                };
                let id = sh.task_id.load(Ordering::Relaxed);
                self.ctl.current_task.store(id, Ordering::Relaxed);
                let prev = sh.claim(owner_tag);
                failpoint::hit("after_claim");
                let t = Task { slot, id, sh };
                if prev & bits::CANCELLED != 0 {
                    self.publish(&t, RawOutcome::new(KIND_CANCELLED, self.wp.seat, 0, 0));
                    self.clear_window();
                    continue;
                }
                if prev & bits::BATCH != 0 {
                    packed = Some(t);
                    break;
                }
                let submitted = self.submitted(&t, mono_ns());
                oldest = oldest.min(submitted);
                start_by = start_by.min(self.start_by(&t, submitted));
                self.hold(members.len(), &t);
                members.push(t);
                continue;
            }
            // Nothing queued: run now, or wait a little for a fuller batch.
            if delay_ns == 0 {
                break;
            }
            let base = if flags & batch_flags::FROM_FIRST_TAKEN != 0 {
                taken_ns
            } else {
                oldest
            };
            let until = base.saturating_add(delay_ns).min(start_by);
            let now = mono_ns();
            if now >= until
                || (flags & batch_flags::WHEN_SATURATED != 0 && !self.last_batch_full.get())
                || (flags & batch_flags::IGNORE_IDLE == 0 && self.another_idle())
            {
                break;
            }
            let slice = Duration::from_nanos(until - now).min(FILL_SLICE);
            let mark = Some((&self.ctl.parked, parked::TASK_READY));
            let woke = wait_on_marked(
                &hdr.task_ready,
                self.spin.min(slice),
                Some(Instant::now() + slice),
                mark,
                || {
                    !ring.is_empty()
                        || self.ctl.hold.load(Ordering::SeqCst) != 0
                        || self.ctl.direct.load(Ordering::Acquire) != 0
                        || hdr.shutdown.load(Ordering::Acquire) != 0
                },
            );
            // Queued, but the cell at `head` is not filled yet (`head_unfilled`): yield rather
            // than loop at full speed. Not after a slice that timed out (nothing queued: the
            // delay goes on, or runs out).
            if woke && ring.head_unfilled() {
                std::thread::yield_now();
            }
        }
        self.last_batch_full.set(members.len() >= max);
        let n = members.len() as u64;
        let retire = self.run_batch(state, wctx, members, oldest);
        // The main loop counts one task; the batch was `n`.
        self.ctl.tasks_done.fetch_add(n - 1, Ordering::Relaxed);
        if let Some(t) = packed {
            // Still in the pop window, claimed: run it, unless the worker must retire (then
            // it is answered "not run", as the rest of a batch is after a poisoning), or it was
            // cancelled or its deadline passed meanwhile.
            let st = t.sh.state.load(Ordering::Acquire);
            let seat = self.wp.seat;
            return match retire {
                Some(kind) => {
                    self.publish(&t, RawOutcome::new(KIND_CANCELLED, seat, 0, 0));
                    Some(kind)
                }
                None if st & bits::CANCELLED != 0 => {
                    self.publish(&t, RawOutcome::new(KIND_CANCELLED, seat, 0, 0));
                    None
                }
                None if self.expired(&t, st) => {
                    self.publish(&t, RawOutcome::new(KIND_EXPIRED, seat, 0, 0));
                    None
                }
                None => {
                    // A timeout kill may be on its way for the batch just run (the supervisor
                    // saw it started before it ended): start nothing under it. The kill lands
                    // while this task waits, never started (recovery queues it again as such),
                    // or the supervisor withdraws it.
                    self.wait_out_kill();
                    self.serve_batch(state, wctx, &t)
                }
            };
        }
        retire
    }

    /// Runs the batch `members` (held in entries `0..len`) and publishes each outcome.
    fn run_batch<W: Worker>(
        &self,
        state: &mut W,
        wctx: &WorkerContext,
        members: Vec<Task<'_>>,
        oldest: u64,
    ) -> Option<u32> {
        let seat = self.wp.seat;
        // Tasks cancelled or past their deadline before the step starts are not run.
        let mut live = Vec::with_capacity(members.len());
        for (k, t) in members.into_iter().enumerate() {
            let st = t.sh.state.load(Ordering::Acquire);
            if st & bits::CANCELLED != 0 {
                self.publish(&t, RawOutcome::new(KIND_CANCELLED, seat, 0, 0));
                self.release(k);
            } else if self.expired(&t, st) {
                self.publish(&t, RawOutcome::new(KIND_EXPIRED, seat, 0, 0));
                self.release(k);
            } else {
                live.push((k, t));
            }
        }
        let mut items = Vec::with_capacity(live.len());
        let mut opened = Vec::with_capacity(live.len());
        for (k, t) in &live {
            match self.open::<W::Task>(wctx, t) {
                Some((task, ctx, inline_from)) => {
                    items.push(BatchTask { task, ctx });
                    opened.push((*k, t, inline_from));
                }
                // Answered BadTask by `open`.
                None => self.release(*k),
            }
        }
        if items.is_empty() {
            return None;
        }
        failpoint::hit("mid_read");
        // From here the batch runs: the supervisor watches its execution limits (SeqCst pairs
        // with its timeout handshake).
        let bc = self.batch_ctl();
        bc.started.store(1, Ordering::SeqCst);
        let start = mono_ns();
        let r = catch_unwind(AssertUnwindSafe(|| state.execute_batch(&items)));
        let exec = mono_ns().saturating_sub(start);
        drop(items);
        self.count(opened.len(), start.saturating_sub(oldest), exec);
        let whole = |kind: u32, msg: &str| {
            for &(k, t, _) in &opened {
                self.write_message(t, kind, msg);
                self.release(k);
            }
            self.retires_after(kind)
        };
        let retire = match r {
            Ok(Ok(outs)) if outs.len() == opened.len() => {
                let mut retire = None;
                for ((k, t, inline_from), out) in opened.iter().zip(outs) {
                    match out {
                        Ok(o) => {
                            self.write_output(t, *inline_from, &o);
                            recycle(state, o);
                        }
                        Err(e) => {
                            let (kind, msg) = error_kind(&*e);
                            self.write_message(t, kind, &msg);
                            retire = retire.or(self.retires_after(kind));
                        }
                    }
                    self.release(*k);
                }
                retire
            }
            Ok(Ok(outs)) => whole(
                KIND_ERR,
                &format!(
                    "execute_batch returned {} outcomes for a batch of {} tasks",
                    outs.len(),
                    opened.len()
                ),
            ),
            Ok(Err(e)) => {
                let (kind, msg) = error_kind(&*e);
                whole(kind, &msg)
            }
            Err(p) => whole(KIND_PANIC, &panic_message(&*p)),
        };
        bc.started.store(0, Ordering::SeqCst);
        retire
    }

    /// Adds one batch to the seat's counters.
    fn count(&self, n: usize, queue_ns: u64, exec_ns: u64) {
        let bc = self.batch_ctl();
        bc.batches.fetch_add(1, Ordering::Relaxed);
        bc.batched_tasks.fetch_add(n as u64, Ordering::Relaxed);
        // Buckets 1, 2, 3–4, 5–8, …, 33–64.
        let bucket = (usize::BITS - (n.max(1) - 1).leading_zeros()) as usize;
        bc.size_hist[bucket.min(6)].fetch_add(1, Ordering::Relaxed);
        bc.queue_ns.fetch_add(queue_ns, Ordering::Relaxed);
        bc.max_queue_ns.fetch_max(queue_ns, Ordering::Relaxed);
        bc.exec_ns.fetch_add(exec_ns, Ordering::Relaxed);
        bc.max_exec_ns.fetch_max(exec_ns, Ordering::Relaxed);
    }
}
