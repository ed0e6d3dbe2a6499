//! The shutdown sequence (graceful or immediate) and killing every worker at its deadline or
//! when the pool breaks down.

use super::*;

impl Sup {
    /// Begins the shutdown: workers still running a task after `grace` are killed.
    pub(super) fn begin_shutdown(&mut self, immediate: bool, grace: Duration, done: Sender<()>) {
        let shared = self.shared.clone();
        let deadline = crate::deadline::at_or_never(Instant::now(), grace);
        self.shutdown = Some((deadline, done));
        if immediate {
            shared.fail_queued(self.left_over());
        }
        // Start-ups in progress are abandoned; back-offs are not restarted.
        for seat in 0..self.seats.len() as u32 {
            self.look_at_start_up(seat);
            match &self.seats[seat as usize].phase {
                Phase::Starting { .. } => self.abandon_start_up(seat),
                Phase::Backoff { .. } => self.free_seat(seat, WorkerState::Stopped),
                _ => {}
            }
        }
        let hdr = shared.header();
        hdr.shutdown.store(1, Ordering::SeqCst);
        // Whatever the sleeper counts say: they live in memory workers write (and a dead
        // worker's withdrawal is a best guess), and a wake missed here would leave a worker
        // asleep until the shutdown timeout kills it.
        hdr.task_ready.wake_all_unconditionally();
        hdr.space.wake_all_unconditionally();
    }

    /// Before a start-up of `seat` is abandoned: one that reported ready since the last look,
    /// and may already hold a task, is recorded as serving (then it is stopped as any serving
    /// worker is: a graceful stop lets it finish its task).
    pub(super) fn look_at_start_up(&mut self, seat: u32) {
        if matches!(self.seats[seat as usize].phase, Phase::Starting { .. })
            && matches!(
                self.shared.ctl(seat).state.load(Ordering::Acquire),
                ctl_state::READY | ctl_state::RETIRING | ctl_state::EXITED
            )
        {
            self.check_start(seat);
        }
    }

    /// Abandons `seat`'s start-up (a shutdown, or a retire of a restart or revival): kills and
    /// reaps its process, answers a spawn call waiting on it `Shutdown`, and frees the seat as
    /// `Stopped`.
    pub(super) fn abandon_start_up(&mut self, seat: u32) {
        let cause = self
            .reap_now(seat)
            .unwrap_or(ExitCause::Signal(libc::SIGKILL));
        // One that reported ready between the last look and the kill may have taken a task:
        // answered as a shutdown's leftover, not left for the final sweep.
        let pid = self.seats[seat as usize].pid;
        self.recover_tasks(seat, pid, cause, Some(KillReason::Shutdown));
        let s = &mut self.seats[seat as usize];
        if let Phase::Starting { reply: Some(r), .. } = std::mem::replace(&mut s.phase, Phase::Idle)
        {
            r.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
        }
        self.free_seat(seat, WorkerState::Stopped);
    }

    /// A `close_by` deadline passed: kill every worker that holds a task (running it, or
    /// forming a batch with it), which may be a task nobody waits for any more; idle workers
    /// go on leaving (their state's destructor runs) under the shutdown timeout. What a worker
    /// says it holds is only a hint here: one that lies is killed at that timeout instead.
    ///
    /// "Holds" is decided as for a dead worker (`slot::held_by_dead_worker`): a worker that has
    /// published its task's outcome but not yet cleared its words is idle, not busy; the last
    /// answer before a drained shutdown is often read in exactly that window.
    pub(super) fn kill_busy(&mut self) {
        let shared = &self.shared;
        let n_slots = shared.n_slots();
        let holds = |slot: u32, task: u64| {
            held_by_dead_worker(slot, task, n_slots, |s| {
                Some(shared.slot(s).state_and_task())
            })
            .is_some()
        };
        for seat in 0..self.seats.len() as u32 {
            let ctl = shared.ctl(seat);
            // The worker moves on while we read: a pair read twice alike is one it held (or
            // left) at one time; a pair that changed in between is a worker at work.
            let window = || {
                (
                    ctl.current_slot.load(Ordering::SeqCst),
                    ctl.current_task.load(Ordering::SeqCst),
                )
            };
            let (first, second) = (window(), window());
            let busy = first != second
                || holds(first.0, first.1)
                || shared.batch_ctl(seat).held().any(|(s, t)| holds(s, t));
            let s = &mut self.seats[seat as usize];
            if busy && s.child.is_some() {
                s.kill = Some(KillReason::Shutdown);
                kill_process(s);
            }
        }
    }

    /// The shutdown grace is over: kill every worker still running.
    pub(super) fn kill_all(&mut self) {
        self.killed_all = true;
        for s in &mut self.seats {
            if s.child.is_some() {
                s.kill = Some(KillReason::Shutdown);
                kill_process(s);
            }
        }
    }
}
