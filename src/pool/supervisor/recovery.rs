//! A worker's death: what it held (`slot::held_by_dead_worker` and the repair of a queue pop
//! it died in), how each held task is answered (died, timed out, cancelled, or retried), the
//! sleeper and ring records it left behind, and the task timeouts that kill workers.

use super::*;

impl Sup {
    /// The seat's process has exited (and is reaped).
    pub(super) fn on_exit(&mut self, seat: u32, cause: ExitCause) {
        let shared = self.shared.clone();
        let worker = seat as usize;
        let s = &mut self.seats[worker];
        s.forget_process();
        let pid = s.pid;
        let kill = s.kill.take();
        // A retried task may come back to this seat with the same id: its clock restarts.
        s.watch = (0, Instant::now());
        let phase = std::mem::replace(&mut s.phase, Phase::Idle);
        let ctl = shared.ctl(seat);
        let ctl_state_now = ctl.state.load(Ordering::Acquire);
        match phase {
            Phase::Starting { reply, .. } => {
                if ctl_state::reported(ctl_state_now) {
                    // It reported (and may have served and retired since), then died: handle
                    // the report first, as if seen before.
                    self.seats[worker].phase = Phase::Starting {
                        reply,
                        since: Instant::now(),
                    };
                    self.check_start(seat);
                    if !matches!(self.seats[worker].phase, Phase::Ready) {
                        return;
                    }
                    // Ready, and already dead: fall through to the death below.
                } else {
                    // It never reported ready, so it holds no task, unless it broke the
                    // protocol: answer what it claimed, if anything.
                    self.recover_tasks(seat, pid, cause, None);
                    match reply {
                        Some(r) => {
                            self.free_seat(seat, WorkerState::Empty);
                            r.complete(SpawnOutcome::Failed(SpawnError::Exited {
                                worker,
                                pid,
                                cause,
                            }));
                        }
                        None => self.restart_failed(
                            seat,
                            format!("the process exited during start-up ({})", cause.describe()),
                        ),
                    }
                    return;
                }
            }
            Phase::Ready => {}
            Phase::Idle | Phase::Backoff { .. } => return,
        }
        // A serving worker ended.
        let reason = match (kill, ctl_state_now) {
            (Some(KillReason::Timeout { .. }), _) => DeathReason::Timeout,
            (Some(KillReason::Shutdown), _) => DeathReason::Shutdown,
            (Some(KillReason::Misbehaving), _) => DeathReason::Misbehaving,
            (None, ctl_state::RETIRING) => match ctl.spawn_kind.load(Ordering::Relaxed) {
                KIND_POISONED => DeathReason::Poisoned,
                _ => DeathReason::Panic,
            },
            (None, ctl_state::EXITED) => DeathReason::Exit,
            // It ended with an exit status, not a signal, while it should have been serving:
            // an `exit()` in a task (or in a thread of the worker's), not a crash.
            (None, _) if matches!(cause, ExitCause::Exit(_)) => DeathReason::Exit,
            _ => DeathReason::Crash,
        };
        // No longer serving, before any of its tasks is answered: whoever sees such an answer
        // (a broadcast that killed every worker, say) must not count this worker as serving
        // (`num_workers`, and the seats a broadcast offers to). The state set here is
        // provisional: freeing the seat or scheduling its restart below sets the final one.
        let leaving = self.seats[worker].retiring.is_some()
            || self.shutdown.is_some()
            || shared.closing.load(Ordering::SeqCst);
        shared.lock_seats()[worker].state = if leaving {
            WorkerState::Stopped
        } else {
            WorkerState::Restarting
        };
        // A death (not a retirement, nor the normal end at shutdown) is counted before its
        // tasks are answered: a caller told `WorkerDied` must find it in the stats.
        let ended_normally = self.seats[worker].retiring.is_some()
            || (kill.is_none() && ctl_state_now == ctl_state::EXITED && self.shutdown.is_some());
        if !ended_normally {
            StatCounters::add(&shared.stats.worker_deaths, 1);
        }
        let (failed, retried) = self.recover_tasks(seat, pid, cause, kill);
        ctl.state.store(ctl_state::EXITED, Ordering::Release);
        if let Some((_, waiters)) = self.seats[worker].retiring.take() {
            // Retired on request (or killed past its retirement deadline): the seat is free.
            // Its event is still told in its spans, which close after it.
            let life = std::mem::take(&mut self.seats[worker].life);
            self.free_seat(seat, WorkerState::Stopped);
            self.emit_in(PoolEvent::WorkerRetired { worker, pid }, Some(&life));
            for w in waiters {
                let _ = w.send(true);
            }
            return;
        }
        if kill.is_none() && ctl_state_now == ctl_state::EXITED && self.shutdown.is_some() {
            // The normal end of a worker at shutdown (it left its loop and said so; an
            // `exit()` in a task during the shutdown is a death, reported below).
            self.free_seat(seat, WorkerState::Stopped);
            return;
        }
        self.emit(PoolEvent::WorkerDied {
            worker,
            pid,
            cause,
            reason,
            tasks_failed: failed,
            tasks_retried: retried,
        });
        // Its process is gone and reported: its spans close (a restart opens new ones).
        self.seats[worker].life = Default::default();
        if self.shutdown.is_some() || shared.closing.load(Ordering::SeqCst) {
            self.free_seat(seat, WorkerState::Stopped);
            return;
        }
        self.schedule_restart(seat);
    }

    /// Finds the task the dead worker of `seat` held (`slot::held_by_dead_worker`, and the
    /// queue repair of a pop it died in) and completes it with `WorkerDied`/`Timeout`/
    /// `Cancelled`, or queues it again under its retry policy; withdraws a sleeper it left
    /// counted; releases the records it left orphaned in its ring. Returns (failed, retried).
    pub(super) fn recover_tasks(
        &mut self,
        seat: u32,
        pid: u32,
        cause: ExitCause,
        kill: Option<KillReason>,
    ) -> (usize, usize) {
        let shared = self.shared.clone();
        let ctl = shared.ctl(seat);
        let hdr = shared.header();
        match ctl.parked.swap(parked::NONE, Ordering::SeqCst) {
            parked::TASK_READY => hdr.task_ready.withdraw_dead_sleeper(),
            parked::SPACE => hdr.space.withdraw_dead_sleeper(),
            _ => {}
        }
        let mut held: Vec<u32> = Vec::with_capacity(2);
        let cur = ctl.current_slot.load(Ordering::SeqCst);
        let tid = ctl.current_task.load(Ordering::SeqCst);
        let n_slots = shared.n_slots();
        if let Some(slot) =
            held_by_dead_worker(cur, tid, n_slots, |s| Some(shared.slot(s).state_and_task()))
        {
            held.push(slot);
        }
        // The tasks of a dynamic batch it was forming or running: each entry by the same rule.
        // Those of a batch that had started ran (for the timeout rule in `answer_held`).
        let bc = shared.batch_ctl(seat);
        let batch_started = bc.started.load(Ordering::SeqCst) != 0;
        let mut ran_in_batch: Vec<u32> = Vec::new();
        for (s, t) in bc.held() {
            if let Some(slot) =
                held_by_dead_worker(s, t, n_slots, |s| Some(shared.slot(s).state_and_task()))
            {
                if batch_started {
                    ran_in_batch.push(slot);
                }
                if !held.contains(&slot) {
                    held.push(slot);
                }
            }
        }
        bc.clear_held();
        // A task offered to this worker alone that it had not taken yet (so it never ran).
        // A worker that left on purpose (retired, or ended at shutdown: it reported EXITED)
        // leaves it `Cancelled`, as a freed seat does; one that died answers it with its death
        // (a broadcast is never retried).
        // (A slot already held is answered once, below, whatever the worker's `state` says.)
        if let Some(v) = self.take_offer(seat).filter(|v| !held.contains(v)) {
            if ctl.state.load(Ordering::Acquire) == ctl_state::EXITED {
                shared.complete_from_parent(v, RawOutcome::new(self.left_over(), seat, 0, 0));
            } else {
                held.push(v);
            }
        }
        let claim = ctl.claim.load(Ordering::SeqCst);
        if claim != 0 && cur < n_slots {
            // It won this pop: `current_slot` is stored only after a won CAS (and cleared
            // after each task), so the value is accounted for above. If it died before
            // releasing the cell, release it now (answering the value again would answer the
            // task twice). Unless a live worker shows the same claim: then that one may be
            // the winner, mid-pop (the dead worker's words may be forged), and the release
            // waits until that claim is withdrawn or released.
            if !shared
                .task_ring()
                .release_won(claim, |c| self.live_claim(seat, c, false))
            {
                self.pending_releases.push(PendingRelease { seat, claim });
            }
        } else {
            match self.repair(seat, claim) {
                Repair::Taken(v) if v < n_slots && !held.contains(&v) => held.push(v),
                Repair::Deferred => self.pending_repairs.push(PendingRepair {
                    seat,
                    claim,
                    pid,
                    cause,
                }),
                _ => {}
            }
        }
        ctl.claim.store(0, Ordering::Relaxed);
        ctl.current_slot.store(u32::MAX, Ordering::Relaxed);
        ctl.current_task.store(0, Ordering::Relaxed);
        let (mut failed, mut retried) = (0, 0);
        for slot in held {
            let in_batch = ran_in_batch.contains(&slot);
            if self.answer_held(slot, seat, pid, cause, kill, in_batch) {
                retried += 1;
            } else {
                failed += 1;
            }
        }
        // Only after the held task is answered or requeued: every record it left is an orphan.
        shared.sweep_dead_seat(seat);
        (failed, retried)
    }

    /// Whether a worker other than `seat`'s shows intent `claim`: a live one (the winner of
    /// that position, about to release the cell, or a loser, about to withdraw its claim; a
    /// dead one not yet recovered still counts: its own recovery comes first), or, with
    /// `releases`, a dead one whose won pop still waits for its cell's release
    /// (`pending_releases`: the value is accounted for, so no repair may take it). A release
    /// itself waits only for workers' claims, so two of them never wait for each other.
    fn live_claim(&self, seat: u32, claim: u64, releases: bool) -> bool {
        let shared = &self.shared;
        (releases
            && self
                .pending_releases
                .iter()
                .any(|p| p.seat != seat && p.claim == claim))
            || (0..shared.n_seats()).filter(|&i| i != seat).any(|i| {
                let w = shared.ctl(i);
                w.claim.load(Ordering::SeqCst) == claim
                    && w.state.load(Ordering::Acquire) == ctl_state::READY
            })
    }

    /// Asks the task queue whether a dead worker's pop (intent `claim`) left a task in a cell.
    pub(super) fn repair(&self, seat: u32, claim: u64) -> Repair {
        self.shared
            .task_ring()
            .repair(claim, |c| self.live_claim(seat, c, true))
    }

    /// Retries the queue repairs a live claim held up (each converges once that worker runs).
    pub(super) fn retry_repairs(&mut self) {
        // Releases first: a repair with the same claim waits for them (see `live_claim`).
        let mut i = 0;
        while i < self.pending_releases.len() {
            let p = self.pending_releases[i];
            let done = self
                .shared
                .task_ring()
                .release_won(p.claim, |c| self.live_claim(p.seat, c, false));
            if done {
                self.pending_releases.swap_remove(i);
            } else {
                i += 1;
            }
        }
        if self.pending_repairs.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.pending_repairs) {
            match self.repair(p.seat, p.claim) {
                Repair::Deferred => self.pending_repairs.push(p),
                Repair::Taken(v) if v < self.shared.n_slots() => {
                    // Nobody popped it (it sat in the dead worker's cell): unless something
                    // already answered it, it is the dead worker's to answer.
                    let st = self.shared.slot(v).state.load(Ordering::Acquire);
                    if st & (bits::CLAIMED | bits::DONE) == 0 {
                        let _ = self.answer_held(v, p.seat, p.pid, p.cause, None, false);
                    }
                }
                _ => {}
            }
        }
    }

    /// Answers a task a dead worker held: `Timeout` if we killed it for this task (or it ran
    /// in the same started batch, `in_batch`, and its own limit had passed too), `Cancelled`
    /// at shutdown or if its caller cancelled, a retry if its budget allows, else
    /// `WorkerDied`. Returns whether it was requeued.
    pub(super) fn answer_held(
        &mut self,
        slot: u32,
        seat: u32,
        pid: u32,
        cause: ExitCause,
        kill: Option<KillReason>,
        in_batch: bool,
    ) -> bool {
        let shared = self.shared.clone();
        let sh = shared.slot(slot);
        if sh.is_done() {
            // Already answered (a slot the dead worker's words named twice, or one it marked
            // done before dying): answering or requeueing it again would answer it twice.
            return false;
        }
        let meta = shared.meta(slot);
        let this_task = sh.task_id.load(Ordering::Relaxed);
        let cancelled = sh.state.load(Ordering::Acquire) & bits::CANCELLED != 0;
        let parent = |kind, rec, len| RawOutcome::new(kind, seat, rec, len);
        let own_limit = meta.timeout_ns.load(Ordering::Relaxed);
        match kill {
            // The single task it was killed for, or a task of the started batch it was killed
            // for whose own limit had passed (the kill's limit is the smallest of the batch's:
            // the batch's key task may have none).
            Some(KillReason::Timeout { task_id, after_ns })
                if (task_id == this_task && !in_batch)
                    || (in_batch && own_limit != 0 && own_limit <= after_ns) =>
            {
                StatCounters::add(&shared.stats.tasks_timed_out, 1);
                shared.complete_from_parent(slot, parent(KIND_TIMEOUT, after_ns, 0));
                return false;
            }
            // Held, but neither that task nor in that batch: never started (a worker under a
            // kill hold starts nothing; a packed task parked in the pop window waits for the
            // hold to go). It goes back to the queue as it was, its retry budget untouched
            // (if the queue refuses it, it is answered below).
            Some(KillReason::Timeout { task_id, .. })
                if task_id != this_task
                    && !in_batch
                    && !cancelled
                    && self.shutdown.is_none()
                    && shared.requeue(slot) =>
            {
                return true;
            }
            Some(KillReason::Shutdown) => {
                shared.complete_from_parent(slot, parent(self.left_over(), 0, 0));
                return false;
            }
            _ if cancelled => {
                shared.complete_from_parent(slot, parent(KIND_CANCELLED, 0, 0));
                return false;
            }
            _ => {}
        }
        let left = meta.retries_left.load(Ordering::Relaxed);
        if left > 0 && self.shutdown.is_none() {
            meta.retries_left.store(left - 1, Ordering::Relaxed);
            if shared.requeue(slot) {
                // A retried task may be alone in the queue with no live worker left: the
                // supervisor's loop drains it while `no_workers` holds.
                return true;
            }
        }
        StatCounters::add(&shared.stats.tasks_died, 1);
        shared.complete_from_parent(slot, parent(KIND_DIED, pid as u64, cause.encode()));
        false
    }

    pub(super) fn check_timeouts(&mut self) {
        let shared = self.shared.clone();
        let n_slots = shared.layout.params.n_slots;
        let now = Instant::now();
        for seat in 0..self.seats.len() as u32 {
            let s = &mut self.seats[seat as usize];
            if !matches!(s.phase, Phase::Ready) || s.kill.is_some() {
                continue;
            }
            let ctl = shared.ctl(seat);
            let Some((tid, limit)) = running(&shared, seat, n_slots) else {
                s.watch = (0, now);
                continue;
            };
            if s.watch.0 != tid {
                s.watch = (tid, now);
                continue;
            }
            if limit == 0 {
                continue;
            }
            if now.saturating_duration_since(s.watch.1) >= Duration::from_nanos(limit) {
                // Hold the worker before the kill, then check it is still on this task
                // (SeqCst both sides, Dekker with the worker's clear of its task words and its
                // `hold` check): either we see it moved on, and withdraw, or it sees the hold
                // and takes no next task for the kill to land on.
                ctl.hold.fetch_or(hold::KILL, Ordering::SeqCst);
                if running(&shared, seat, n_slots).map(|r| r.0) != Some(tid) {
                    ctl.hold.fetch_and(!hold::KILL, Ordering::SeqCst);
                    crate::sys::futex_wake(&ctl.hold, i32::MAX);
                    s.watch = (0, now);
                    continue;
                }
                s.kill = Some(KillReason::Timeout {
                    task_id: tid,
                    after_ns: limit,
                });
                kill_process(s);
            }
        }
    }
}

/// What seat `seat` is running, for its timeout: the task id that keys it (the single task,
/// or the first task of a dynamic batch that has started) and the smallest execution limit
/// among its tasks, in ns (0: none). Only tasks whose slot still holds that task id count.
fn running(shared: &Shared, seat: u32, n_slots: u32) -> Option<(u64, u64)> {
    let ctl = shared.ctl(seat);
    let limit_of = |slot: u32, tid: u64| {
        let meta = shared.meta(slot);
        if meta.task_id() == tid {
            meta.timeout_ns.load(Ordering::Relaxed)
        } else {
            0
        }
    };
    // A running batch first: a packed task held back in the pop window meanwhile has not
    // started. A batch being formed is not running (its tasks wait for company).
    let bc = shared.batch_ctl(seat);
    if bc.started.load(Ordering::SeqCst) == 0 {
        let tid = ctl.current_task.load(Ordering::SeqCst);
        let slot = ctl.current_slot.load(Ordering::Relaxed);
        return (tid != 0 && slot < n_slots).then(|| (tid, limit_of(slot, tid)));
    }
    let mut key = None;
    let mut limit = 0u64;
    for (slot, tid) in bc.held() {
        if tid == 0 || slot >= n_slots {
            continue;
        }
        key.get_or_insert(tid);
        match limit_of(slot, tid) {
            0 => {}
            l if limit == 0 || l < limit => limit = l,
            _ => {}
        }
    }
    key.map(|k| (k, limit))
}
