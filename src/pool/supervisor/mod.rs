//! The supervisor: the one long-lived parent thread that owns every worker process (it must be
//! one thread: a child's `PR_SET_PDEATHSIG` fires when the thread that started it exits). It
//! sleeps in `poll` on one pidfd per worker process (readable when the process exits: the
//! kernel tells us, no polling), on an eventfd that the pool's threads write to wake it, and on
//! each starting worker's notify line (`sys::notify_line`), which the worker signals once its
//! spawn step has reported.
//!
//! - [`lifecycle`]: launching workers, their start-up reports, restarts under the policy, and
//!   the "no workers left" state;
//! - [`recovery`]: a worker's death, what it held (ARCHITECTURE.md, *Faults and recovery*),
//!   queue repairs, and task timeouts;
//! - [`shutdown`]: the shutdown sequence, and the breakdown of the pool.
//!
//! A panic on this thread breaks the pool instead of hanging it: every worker is killed and
//! every unfinished task answered `TaskError::PoolBroken`.

mod lifecycle;
mod recovery;
mod shutdown;

use super::events::{DeathReason, PoolEvent, StatCounters, WorkerState};
use super::handle::{SpawnOutcome, SpawnReply};
use super::shared::Shared;
use crate::error::{ExitCause, SpawnError};
use crate::process::{Launcher, Recipe, launch, launch_with};
use crate::ring::mpmc::Repair;
use crate::shm::layout::{ctl_state, hold, parked};
use crate::slot::outcome::{
    KIND_CANCELLED, KIND_DIED, KIND_NO_SPACE, KIND_NO_WORKERS, KIND_PANIC, KIND_POISONED,
    KIND_TIMEOUT, KIND_TOO_LARGE,
};
use crate::slot::{RawOutcome, bits, held_by_dead_worker};
use crate::worker::boot::Boot;
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, Sender, TryRecvError};
use std::time::{Duration, Instant};

/// How often running tasks are checked against their timeouts (only while any task with a
/// timeout is in flight).
const TIMEOUT_TICK: Duration = Duration::from_millis(2);

/// A spawn caller's reply cell. If the message carrying it is dropped unanswered (the
/// supervisor is gone), the caller gets `SpawnError::Shutdown` instead of waiting forever.
#[derive(Debug)]
pub(crate) struct ReplyGuard(Option<Arc<SpawnReply>>);

impl ReplyGuard {
    pub(crate) fn new(r: Arc<SpawnReply>) -> Self {
        ReplyGuard(Some(r))
    }

    fn complete(mut self, o: SpawnOutcome) {
        if let Some(r) = self.0.take() {
            r.complete(o);
        }
    }
}

impl Drop for ReplyGuard {
    fn drop(&mut self) {
        if let Some(r) = self.0.take() {
            r.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
        }
    }
}

/// A request to the supervisor.
#[derive(Debug)]
pub(crate) enum SupMsg {
    /// Start a worker in `seat` (reserved by the caller) with these archived spawn arguments.
    Launch {
        seat: u32,
        args: Vec<u8>,
        /// The boot record; its `reserve_ring` is decided at each launch.
        boot: Boot,
        /// Per-worker environment (GPUs, `SpawnOptions::env`).
        env: Vec<(String, String)>,
        reply: ReplyGuard,
    },
    /// Shut down: stop every worker (after the queue drains, or at once with `immediate`;
    /// with `kill`, without the grace for running tasks), answer whatever is left, reply, and
    /// exit.
    Shutdown {
        immediate: bool,
        kill: bool,
        /// How long running tasks may go on before their workers are killed.
        grace: Duration,
        /// Sooner, for workers still running a task (`Pool::close_by`).
        busy_grace: Option<Duration>,
        done: Sender<()>,
    },
    /// Retire the worker of `seat`: it finishes its current task, takes no other, and exits;
    /// its seat is freed, not restarted. `done` gets `true` once it is gone, `false` if the
    /// seat has no serving worker.
    Retire { seat: u32, done: Sender<bool> },
}

/// Why the supervisor killed a worker.
#[derive(Debug, Clone, Copy)]
enum KillReason {
    Timeout {
        task_id: u64,
        after_ns: u64,
    },
    Shutdown,
    /// The worker wrote nonsense into its completion ring.
    Misbehaving,
}

/// A dead worker's queue pop that a live worker's claim held up (see `MpmcRing::repair`):
/// retried on every pass until it resolves. What the dead worker won is answered then.
#[derive(Debug, Clone, Copy)]
struct PendingRepair {
    seat: u32,
    claim: u64,
    pid: u32,
    cause: ExitCause,
}

/// A dead worker's won pop whose cell could not be released yet (`MpmcRing::release_won`):
/// a live worker showed the same claim. The value is accounted for (the dead worker had
/// recorded it in `current_slot`); only the cell waits. While it waits, its claim counts as
/// live for every other repair, so a second dead worker with the same claim cannot take the
/// value a second time.
#[derive(Debug, Clone, Copy)]
struct PendingRelease {
    seat: u32,
    claim: u64,
}

#[derive(Debug)]
enum Phase {
    /// Nothing running; the seat is free or failed.
    Idle,
    /// The process runs its spawn step. `reply` is the user's spawn call (none for restarts).
    Starting {
        reply: Option<ReplyGuard>,
        since: Instant,
    },
    Ready,
    /// Dead; relaunch at `at`.
    Backoff {
        at: Instant,
    },
}

#[derive(Debug)]
struct SupSeat {
    child: Option<crate::process::Launched>,
    pidfd: Option<OwnedFd>,
    /// Our end of the worker's notify line (`sys::notify_line`), until its start-up reported.
    line: Option<OwnedFd>,
    pid: u32,
    phase: Phase,
    /// The spawn arguments' archive, kept for restarts.
    args: Vec<u8>,
    /// The boot record, kept for restarts (its `reserve_ring` is decided at each launch).
    boot: Boot,
    /// The pool's worker environment, then this worker's own; kept for restarts.
    env: Vec<(String, String)>,
    /// When recent restarts happened (pruned to the policy's window).
    recent: VecDeque<Instant>,
    /// Task id last seen running and since when (timeouts).
    watch: (u64, Instant),
    kill: Option<KillReason>,
    /// Being retired: by when it must be gone (else it is killed), and who waits for it.
    retiring: Option<(Instant, Vec<Sender<bool>>)>,
    /// A failed seat to start again then (`PoolBuilder::revive_failed_after`).
    revive_at: Option<Instant>,
    /// The `tracing` spans of its process (empty without the feature); they close when the
    /// process is gone and its events are out.
    life: crate::telemetry::Life,
}

impl SupSeat {
    /// The seat's process is gone (reaped, or never started): lets go of everything that
    /// named it, its child handle, pidfd and notify line together.
    fn forget_process(&mut self) {
        self.child = None;
        self.pidfd = None;
        self.line = None;
    }
}

struct Sup {
    shared: Arc<Shared>,
    program: PathBuf,
    seats: Vec<SupSeat>,
    shutdown: Option<(Instant, Sender<()>)>,
    /// During a shutdown: when workers still running a task are killed, before the shutdown's
    /// own deadline (`Pool::close_by`); idle ones go on leaving under the shutdown timeout.
    busy_kill_at: Option<Instant>,
    killed_all: bool,
    pending_repairs: Vec<PendingRepair>,
    pending_releases: Vec<PendingRelease>,
}

pub(crate) fn supervisor_loop(shared: Arc<Shared>, rx: Receiver<SupMsg>, program: PathBuf) {
    let n = shared.layout.params.max_workers as usize;
    let now = Instant::now();
    let mut sup = Sup {
        shared,
        program,
        seats: (0..n)
            .map(|_| SupSeat {
                child: None,
                pidfd: None,
                line: None,
                pid: 0,
                phase: Phase::Idle,
                args: Vec::new(),
                boot: Boot::default(),
                env: Vec::new(),
                recent: VecDeque::new(),
                life: Default::default(),
                watch: (0, now),
                kill: None,
                retiring: None,
                revive_at: None,
            })
            .collect(),
        shutdown: None,
        busy_kill_at: None,
        killed_all: false,
        pending_repairs: Vec::new(),
        pending_releases: Vec::new(),
    };
    // A panic on this thread must not leave tasks hanging: stop every worker, answer
    // everything, and let the pool refuse new work.
    let ended = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| sup.run(&rx)));
    if let Err(p) = ended {
        sup.shared.declare_broken(format!(
            "the supervisor thread panicked: {}",
            crate::worker::main_loop::panic_message(&*p)
        ));
        for s in &mut sup.seats {
            kill_process(s);
            if let Some(mut c) = s.child.take() {
                let _ = c.wait();
            }
            s.forget_process();
        }
    }
    // Every worker process is gone: whatever was not finished never will be. After a
    // breakdown, first wait out the submits in progress (each now sees the pool broken, or
    // has pushed its task), so that none queues a task after this last answer.
    if sup.shared.broken.load(Ordering::SeqCst) {
        sup.shared.quiesce_submits();
    }
    sup.shared.cancel_unfinished(sup.left_over());
    if let Some((_, done)) = sup.shutdown.take() {
        let _ = done.send(());
    }
    // Answer any spawn that raced with shutdown and is still in the channel.
    while let Ok(m) = rx.try_recv() {
        if let SupMsg::Launch { seat, reply, .. } = m {
            sup.free_seat(seat, WorkerState::Empty);
            reply.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
        }
    }
}

/// Kills the seat's process through its pidfd (never by a pid that may have been reused), or
/// through the unreaped child handle if there is no pidfd.
fn kill_process(s: &mut SupSeat) {
    if let Some(fd) = &s.pidfd {
        let _ = crate::sys::pidfd_kill(fd.as_fd(), libc::SIGKILL);
    } else if let Some(c) = s.child.as_mut() {
        // Not yet reaped by us, so its pid cannot have been reused.
        let _ = c.kill();
    }
}

impl Sup {
    /// How tasks the workers will never finish are answered (`Shared::left_over`).
    fn left_over(&self) -> u32 {
        self.shared.left_over()
    }

    /// The supervisor's loop, until every worker is gone after a shutdown (or a breakdown).
    fn run(&mut self, rx: &Receiver<SupMsg>) {
        let sup = self;
        loop {
            crate::sys::eventfd_drain(sup.shared.wake.as_fd());
            for line in sup.seats.iter().filter_map(|s| s.line.as_ref()) {
                crate::sys::notify_line_drain(line.as_fd());
            }
            loop {
                match rx.try_recv() {
                    Ok(m) => sup.on_message(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // The pool is gone without a shutdown (it cannot be: stop() always sends
                        // one); shut down anyway.
                        if sup.shutdown.is_none() {
                            let (tx, _rx) = std::sync::mpsc::channel();
                            sup.begin_shutdown(false, sup.shared.cfg.shutdown_timeout, tx);
                        }
                        break;
                    }
                }
            }
            if sup.shared.broken.load(Ordering::SeqCst) && sup.shutdown.is_none() {
                // A breakdown: stop everything now; the tasks are answered once the workers are gone.
                let (tx, _rx) = std::sync::mpsc::channel();
                sup.begin_shutdown(true, Duration::ZERO, tx);
                sup.kill_all();
            }
            sup.check_all();
            sup.check_retire_deadlines();
            sup.retry_repairs();
            sup.shared.take_settled_heads();
            if sup.shared.workerless() && sup.shutdown.is_none() {
                // No worker left or coming (or a submit raced with that): answer what is
                // queued, nothing would ever run it, and wake submitters waiting for a slot.
                sup.shared.fail_queued(KIND_NO_WORKERS);
                sup.shared.wake_submitters();
            }
            if let Some((deadline, _)) = &sup.shutdown {
                if sup.seats.iter().all(|s| s.child.is_none()) {
                    break;
                }
                if Instant::now() >= *deadline && !sup.killed_all {
                    sup.kill_all();
                }
                if sup.busy_kill_at.is_some_and(|t| Instant::now() >= t) {
                    sup.busy_kill_at = None;
                    sup.kill_busy();
                }
            }
            let timeout = sup.next_timeout();
            let mut fds = vec![sup.shared.wake.as_fd()];
            fds.extend(
                sup.seats
                    .iter()
                    .filter_map(|s| s.pidfd.as_ref().map(|f| f.as_fd())),
            );
            fds.extend(
                sup.seats
                    .iter()
                    .filter_map(|s| s.line.as_ref().map(|f| f.as_fd())),
            );
            crate::sys::poll_readable(&fds, timeout);
        }
    }

    fn on_message(&mut self, m: SupMsg) {
        match m {
            SupMsg::Launch {
                seat,
                args,
                boot,
                env,
                reply,
            } => {
                if self.shutdown.is_some() || self.shared.closing.load(Ordering::SeqCst) {
                    self.free_seat(seat, WorkerState::Empty);
                    reply.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
                    return;
                }
                let s = &mut self.seats[seat as usize];
                s.args = args;
                s.boot = boot;
                s.env = self.shared.cfg.worker_env.clone();
                s.env.extend(env);
                s.recent.clear();
                self.start(seat, Some(reply));
            }
            SupMsg::Shutdown {
                immediate,
                kill,
                grace,
                busy_grace,
                done,
            } => {
                self.begin_shutdown(immediate, grace, done);
                self.busy_kill_at =
                    busy_grace.map(|g| crate::deadline::at_or_never(Instant::now(), g));
                if kill {
                    self.kill_all();
                }
            }
            SupMsg::Retire { seat, done } => self.begin_retire(seat, done),
        }
    }

    /// Reports `e` (to `tracing`, inside the spans of the worker it is about, and to the
    /// event hook).
    fn emit(&self, e: PoolEvent) {
        let worker = match &e {
            PoolEvent::WorkerDied { worker, .. }
            | PoolEvent::WorkerRestarted { worker, .. }
            | PoolEvent::RestartFailed { worker, .. }
            | PoolEvent::WorkerRetired { worker, .. }
            | PoolEvent::WorkerFailed { worker, .. }
            | PoolEvent::WorkerReviving { worker } => Some(*worker),
            _ => None,
        };
        let life = worker.and_then(|w| self.seats.get(w)).map(|s| &s.life);
        self.emit_in(e, life);
    }

    /// [`emit`](Self::emit) inside the spans `life` (of a process its seat no longer holds).
    fn emit_in(&self, e: PoolEvent, life: Option<&crate::telemetry::Life>) {
        crate::telemetry::pool_event(&e, life);
        if let Some(h) = &self.shared.cfg.on_event {
            let f = &h.0;
            let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| f(&e)));
        }
    }

    /// Everything that may have happened since the last look: start-ups reporting, processes
    /// exiting, back-offs expiring, tasks running past their timeouts.
    fn check_all(&mut self) {
        for seat in 0..self.seats.len() as u32 {
            if self.shared.seat_corrupt[seat as usize].swap(false, Ordering::SeqCst) {
                let s = &mut self.seats[seat as usize];
                if s.child.is_some() {
                    // Its recovery resets the ring once the process is gone.
                    s.kill.get_or_insert(KillReason::Misbehaving);
                    kill_process(s);
                } else {
                    self.shared.sweep_dead_seat(seat);
                }
            }
            if matches!(self.seats[seat as usize].phase, Phase::Starting { .. }) {
                self.check_start(seat);
            }
            let exited = match self.seats[seat as usize]
                .child
                .as_mut()
                .map(|c| c.try_wait())
            {
                Some(Ok(Some(status))) => Some(ExitCause::from_status(status)),
                Some(Err(_)) => Some(ExitCause::Exit(-1)),
                _ => None,
            };
            if let Some(cause) = exited {
                self.on_exit(seat, cause);
            }
            if let Phase::Backoff { at } = self.seats[seat as usize].phase {
                if Instant::now() >= at {
                    if self.shutdown.is_some() {
                        self.free_seat(seat, WorkerState::Stopped);
                    } else {
                        self.start(seat, None);
                    }
                }
            }
            if self.seats[seat as usize]
                .revive_at
                .is_some_and(|t| Instant::now() >= t)
            {
                self.revive(seat);
            }
        }
        if self.shared.timed_in_flight.load(Ordering::SeqCst) != 0 {
            self.check_timeouts();
        }
    }

    /// How long `poll` may sleep: until the nearest back-off, spawn deadline, timeout check or
    /// shutdown deadline.
    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.seats {
            if let Some((deadline, _)) = &s.retiring {
                if s.kill.is_none() {
                    at(*deadline);
                }
            }
            if let Some(t) = s.revive_at {
                at(t);
            }
            match &s.phase {
                Phase::Backoff { at: t } => at(*t),
                Phase::Starting { since, .. } => {
                    at(crate::deadline::at_or_never(
                        *since,
                        self.shared.cfg.spawn_timeout,
                    ));
                    // A process that has no pidfd (pidfd_open failed) is checked now and then.
                    if s.pidfd.is_none() {
                        at(now + Duration::from_millis(10));
                    }
                }
                Phase::Ready if s.pidfd.is_none() => at(now + Duration::from_millis(10)),
                _ => {}
            }
        }
        if self.shared.timed_in_flight.load(Ordering::SeqCst) != 0 {
            at(now + TIMEOUT_TICK);
        }
        if !self.pending_repairs.is_empty() || !self.pending_releases.is_empty() {
            // A deferred queue repair resolves as soon as the other worker runs: ask again
            // soon (nothing else may wake us).
            at(now + Duration::from_millis(1));
        }
        if let (Some(t), Some(_)) = (self.busy_kill_at, &self.shutdown) {
            at(t);
        }
        if let Some((deadline, _)) = &self.shutdown {
            at(if self.killed_all {
                now + Duration::from_millis(10)
            } else {
                *deadline
            });
        }
        next.map(|t| t.saturating_duration_since(now))
    }
}
