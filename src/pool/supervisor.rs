//! The pool's two threads.
//!
//! - The **supervisor** owns every worker process. It launches them (it must be one
//!   long-lived thread: a child's `PR_SET_PDEATHSIG` fires when the thread that forked it
//!   exits), watches start-ups, notices deaths, recovers what a dead worker held, restarts it
//!   under the restart policy, enforces task timeouts, and runs the shutdown sequence. It
//!   sleeps in `poll` on one pidfd per worker process (readable when the process exits: the
//!   kernel tells us, no polling) and on an eventfd that the pool and workers write to wake it.
//! - The **reactor** wakes futures and retires detached tasks. It parks on the segment's
//!   `doorbell`, which a worker rings only when it completes a slot someone asked the reactor to
//!   watch; an idle reactor costs nothing.
//!
//! # Recovering a dead worker's tasks
//!
//! A worker holds at most one task. Its control block says which: `current_slot` is stored
//! inside the queue pop before the queue cell is released, `current_task` right after, and both
//! are cleared after the outcome is published (slot first). On a death the supervisor:
//! 1. repairs the queue if the worker died inside a pop (`MpmcRing::repair` with its `claim`),
//!    which yields the slot it had won;
//! 2. takes `current_slot` if `current_task` is 0 (died right after the pop) or equals the
//!    slot's task id while the slot is not DONE (a stale claim on a slot already answered,
//!    possibly reused by a later task, is recognised and left alone);
//! 3. completes each such task with `WorkerDied` (or `Timeout`, if the supervisor killed it for
//!    that task), or queues it again if its retry policy allows.
//!
//! A task whose outcome was published before the death keeps that outcome: exactly once.

use super::events::{PoolEvent, StatCounters, WorkerState};
use super::handle::{SpawnOutcome, SpawnReply};
use super::shared::Shared;
use crate::error::{ExitCause, SpawnError};
use crate::process::launch;
use crate::ring::mpmc::Repair;
use crate::shm::layout::{ctl_state, parked};
use crate::slot::outcome::{
    KIND_BROKEN, KIND_CANCELLED, KIND_DIED, KIND_NO_WORKERS, KIND_PANIC, KIND_POISONED,
    KIND_TIMEOUT,
};
use crate::slot::{RawOutcome, bits, held_by_dead_worker};
use std::collections::VecDeque;
use std::os::fd::{AsFd, OwnedFd};
use std::path::PathBuf;
use std::process::Child;
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
        boot: String,
        /// Per-worker environment (GPUs, `SpawnOptions::env`).
        env: Vec<(String, String)>,
        reply: ReplyGuard,
    },
    /// Shut down: stop every worker (after the queue drains, or at once with `immediate`),
    /// answer whatever is left, reply, and exit.
    Shutdown { immediate: bool, done: Sender<()> },
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
    child: Option<Child>,
    pidfd: Option<OwnedFd>,
    pid: u32,
    phase: Phase,
    /// The spawn arguments' archive, kept for restarts.
    args: Vec<u8>,
    boot: String,
    /// The pool's worker environment, then this worker's own; kept for restarts.
    env: Vec<(String, String)>,
    /// When recent restarts happened (pruned to the policy's window).
    recent: VecDeque<Instant>,
    /// Task id last seen running and since when (timeouts).
    watch: (u64, Instant),
    kill: Option<KillReason>,
}

struct Sup {
    shared: Arc<Shared>,
    program: PathBuf,
    seats: Vec<SupSeat>,
    shutdown: Option<(Instant, Sender<()>)>,
    killed_all: bool,
    pending_repairs: Vec<PendingRepair>,
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
                pid: 0,
                phase: Phase::Idle,
                args: Vec::new(),
                boot: String::new(),
                env: Vec::new(),
                recent: VecDeque::new(),
                watch: (0, now),
                kill: None,
            })
            .collect(),
        shutdown: None,
        killed_all: false,
        pending_repairs: Vec::new(),
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
            s.pidfd = None;
        }
    }
    // Every worker process is gone: whatever was not finished never will be.
    let kind = if sup.shared.broken.load(Ordering::SeqCst) {
        KIND_BROKEN
    } else {
        KIND_CANCELLED
    };
    sup.shared.cancel_unfinished(kind);
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
    /// The supervisor's loop, until every worker is gone after a shutdown (or a breakdown).
    fn run(&mut self, rx: &Receiver<SupMsg>) {
        let sup = self;
        loop {
            crate::sys::eventfd_drain(sup.shared.wake.as_fd());
            loop {
                match rx.try_recv() {
                    Ok(m) => sup.on_message(m),
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => {
                        // The pool is gone without a shutdown (it cannot be: stop() always sends
                        // one); shut down anyway.
                        if sup.shutdown.is_none() {
                            let (tx, _rx) = std::sync::mpsc::channel();
                            sup.begin_shutdown(false, tx);
                        }
                        break;
                    }
                }
            }
            if sup.shared.broken.load(Ordering::SeqCst) && sup.shutdown.is_none() {
                // A breakdown: stop everything now; the tasks are answered once the workers are gone.
                let (tx, _rx) = std::sync::mpsc::channel();
                sup.begin_shutdown(true, tx);
                sup.kill_all();
            }
            sup.check_all();
            sup.retry_repairs();
            if sup.shared.no_workers.load(Ordering::SeqCst) && sup.shutdown.is_none() {
                // A submit raced with the "no workers" declaration: answer what it queued.
                sup.shared.fail_queued(KIND_NO_WORKERS);
            }
            if let Some((deadline, _)) = &sup.shutdown {
                if sup.seats.iter().all(|s| s.child.is_none()) {
                    break;
                }
                if Instant::now() >= *deadline && !sup.killed_all {
                    sup.kill_all();
                }
            }
            let timeout = sup.next_timeout();
            let mut fds = vec![sup.shared.wake.as_fd()];
            fds.extend(
                sup.seats
                    .iter()
                    .filter_map(|s| s.pidfd.as_ref().map(|f| f.as_fd())),
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
            SupMsg::Shutdown { immediate, done } => self.begin_shutdown(immediate, done),
        }
    }

    /// Writes the spawn arguments into the seat's area, resets its control block for a new
    /// life and launches the process.
    fn start(&mut self, seat: u32, reply: Option<ReplyGuard>) {
        let shared = &self.shared;
        let s = &mut self.seats[seat as usize];
        let cap = shared.layout.params.spawn_area as usize;
        let len = s.args.len().min(cap);
        let area = shared
            .seg
            .bytes_ptr(shared.layout.spawn_area_off(seat), len);
        // SAFETY: the seat's spawn area belongs to the parent while no process of this seat
        // runs (the previous one is reaped, the next not yet launched); `len` fits the area.
        unsafe { std::ptr::copy_nonoverlapping(s.args.as_ptr(), area, len) };
        let ctl = shared.ctl(seat);
        ctl.spawn_args_len.store(len as u64, Ordering::Relaxed);
        ctl.spawn_out_len.store(0, Ordering::Relaxed);
        ctl.spawn_kind.store(0, Ordering::Relaxed);
        ctl.claim.store(0, Ordering::Relaxed);
        ctl.current_slot.store(u32::MAX, Ordering::Relaxed);
        ctl.current_task.store(0, Ordering::Relaxed);
        ctl.tasks_done.store(0, Ordering::Relaxed);
        ctl.parked.store(parked::NONE, Ordering::Relaxed);
        ctl.wants_space.store(0, Ordering::Relaxed);
        ctl.hold.store(0, Ordering::Relaxed);
        ctl.generation.fetch_add(1, Ordering::Relaxed);
        // SYNC POINT: the launch (fork/exec) orders these stores before anything the worker does.
        ctl.state.store(ctl_state::STARTING, Ordering::Release);
        s.kill = None;
        let restart = reply.is_none();
        match launch(
            &self.program,
            shared.seg.fd(),
            shared.wake.as_fd(),
            &s.boot,
            &s.env,
        ) {
            Ok(child) => {
                s.pid = child.id();
                s.pidfd = crate::sys::pidfd_open(child.id()).ok();
                s.child = Some(child);
                ctl.pid.store(s.pid, Ordering::Relaxed);
                s.phase = Phase::Starting {
                    reply,
                    since: Instant::now(),
                };
                let pid = s.pid;
                let mut seats = shared.lock_seats();
                seats[seat as usize].state = WorkerState::Starting;
                seats[seat as usize].pid = pid;
            }
            Err(source) => {
                ctl.state.store(ctl_state::EMPTY, Ordering::Release);
                if restart {
                    let message = format!("cannot start the worker process: {source}");
                    self.restart_failed(seat, message);
                } else {
                    self.free_seat(seat, WorkerState::Empty);
                    if let Some(r) = reply {
                        r.complete(SpawnOutcome::Failed(SpawnError::Launch {
                            worker: seat as usize,
                            source,
                        }));
                    }
                }
            }
        }
    }

    fn free_seat(&mut self, seat: u32, state: WorkerState) {
        let s = &mut self.seats[seat as usize];
        s.phase = Phase::Idle;
        s.child = None;
        s.pidfd = None;
        self.shared
            .ctl(seat)
            .state
            .store(ctl_state::EMPTY, Ordering::Release);
        let mut seats = self.shared.lock_seats();
        seats[seat as usize].in_use = false;
        seats[seat as usize].state = state;
    }

    fn emit(&self, e: PoolEvent) {
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
        }
        if self.shared.timed_in_flight.load(Ordering::SeqCst) != 0 {
            self.check_timeouts();
        }
    }

    /// A start-up reported ready or failed (or ran out of time).
    fn check_start(&mut self, seat: u32) {
        let shared = self.shared.clone();
        let ctl = shared.ctl(seat);
        let worker = seat as usize;
        match ctl.state.load(Ordering::Acquire) {
            ctl_state::READY => {
                let s = &mut self.seats[seat as usize];
                let Phase::Starting { reply, .. } = std::mem::replace(&mut s.phase, Phase::Ready)
                else {
                    return;
                };
                let pid = s.pid;
                {
                    let mut seats = shared.lock_seats();
                    seats[worker].state = WorkerState::Ready;
                    seats[worker].pid = pid;
                }
                shared.no_workers.store(false, Ordering::SeqCst);
                match reply {
                    Some(r) => r.complete(SpawnOutcome::Ready(spawn_report(&shared, seat))),
                    None => {
                        StatCounters::add(&shared.stats.restarts, 1);
                        shared.lock_seats()[worker].restarts += 1;
                        self.emit(PoolEvent::WorkerRestarted {
                            worker,
                            pid,
                            generation: ctl.generation.load(Ordering::Relaxed),
                        });
                    }
                }
            }
            ctl_state::FAILED => {
                let message = String::from_utf8_lossy(&spawn_report(&shared, seat)).into_owned();
                let panicked = ctl.spawn_kind.load(Ordering::Relaxed) == KIND_PANIC;
                // The worker exits right after reporting: reap it now.
                self.reap_now(seat);
                let s = &mut self.seats[seat as usize];
                let Phase::Starting { reply, .. } = std::mem::replace(&mut s.phase, Phase::Idle)
                else {
                    return;
                };
                match reply {
                    Some(r) => {
                        self.free_seat(seat, WorkerState::Empty);
                        r.complete(SpawnOutcome::Failed(if panicked {
                            SpawnError::Panicked { worker, message }
                        } else {
                            SpawnError::Failed { worker, message }
                        }));
                    }
                    None => {
                        let what = if panicked { "panicked" } else { "failed" };
                        self.restart_failed(seat, format!("spawn step {what}: {message}"));
                    }
                }
            }
            _ => {
                let Phase::Starting { since, .. } = &self.seats[seat as usize].phase else {
                    return;
                };
                if since.elapsed() > shared.cfg.spawn_timeout {
                    self.reap_now(seat);
                    let s = &mut self.seats[seat as usize];
                    let Phase::Starting { reply, .. } =
                        std::mem::replace(&mut s.phase, Phase::Idle)
                    else {
                        return;
                    };
                    let after = shared.cfg.spawn_timeout;
                    match reply {
                        Some(r) => {
                            self.free_seat(seat, WorkerState::Empty);
                            r.complete(SpawnOutcome::Failed(SpawnError::Timeout { worker, after }));
                        }
                        None => self.restart_failed(
                            seat,
                            format!("spawn step did not finish within {after:?}"),
                        ),
                    }
                }
            }
        }
    }

    /// Kills the seat's process (if still running) and reaps it.
    fn reap_now(&mut self, seat: u32) {
        let s = &mut self.seats[seat as usize];
        if let Some(child) = s.child.as_mut() {
            if !matches!(child.try_wait(), Ok(Some(_))) {
                kill_process(s);
                if let Some(child) = s.child.as_mut() {
                    let _ = child.wait();
                }
            }
        }
        s.child = None;
        s.pidfd = None;
    }

    /// The seat's process has exited (and is reaped).
    fn on_exit(&mut self, seat: u32, cause: ExitCause) {
        let shared = self.shared.clone();
        let worker = seat as usize;
        let s = &mut self.seats[worker];
        s.child = None;
        s.pidfd = None;
        let pid = s.pid;
        let kill = s.kill.take();
        // A retried task may come back to this seat with the same id: its clock restarts.
        s.watch = (0, Instant::now());
        let phase = std::mem::replace(&mut s.phase, Phase::Idle);
        let ctl = shared.ctl(seat);
        let ctl_state_now = ctl.state.load(Ordering::Acquire);
        match phase {
            Phase::Starting { reply, .. } => {
                if ctl_state_now == ctl_state::READY || ctl_state_now == ctl_state::FAILED {
                    // It reported, then died: handle the report first, as if seen before.
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
                    let status = describe(cause);
                    match reply {
                        Some(r) => {
                            self.free_seat(seat, WorkerState::Empty);
                            r.complete(SpawnOutcome::Failed(SpawnError::Exited {
                                worker,
                                pid,
                                status,
                            }));
                        }
                        None => self.restart_failed(
                            seat,
                            format!("the process exited during start-up ({status})"),
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
            (Some(KillReason::Timeout { .. }), _) => "timeout",
            (Some(KillReason::Shutdown), _) => "shutdown",
            (Some(KillReason::Misbehaving), _) => "misbehaving",
            (None, ctl_state::RETIRING) => match ctl.spawn_kind.load(Ordering::Relaxed) {
                KIND_POISONED => "poisoned",
                _ => "panic",
            },
            (None, ctl_state::EXITED) => "exit",
            _ => "crash",
        };
        let (failed, retried) = self.recover_tasks(seat, pid, cause, kill);
        ctl.state.store(ctl_state::EXITED, Ordering::Release);
        if reason == "exit" && self.shutdown.is_some() {
            // The normal end of a worker at shutdown.
            self.free_seat(seat, WorkerState::Stopped);
            return;
        }
        StatCounters::add(&shared.stats.worker_deaths, 1);
        self.emit(PoolEvent::WorkerDied {
            worker,
            pid,
            cause,
            reason,
            tasks_failed: failed,
            tasks_retried: retried,
        });
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
    fn recover_tasks(
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
        let claim = ctl.claim.load(Ordering::SeqCst);
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
        ctl.claim.store(0, Ordering::Relaxed);
        ctl.current_slot.store(u32::MAX, Ordering::Relaxed);
        ctl.current_task.store(0, Ordering::Relaxed);
        let (mut failed, mut retried) = (0, 0);
        for slot in held {
            if self.answer_held(slot, seat, pid, cause, kill) {
                retried += 1;
            } else {
                failed += 1;
            }
        }
        // Only after the held task is answered or requeued: every record it left is an orphan.
        shared.sweep_dead_seat(seat);
        (failed, retried)
    }

    /// Asks the task queue whether a dead worker's pop (intent `claim`) left a task in a cell.
    fn repair(&self, seat: u32, claim: u64) -> Repair {
        let shared = &self.shared;
        // A live worker with the same intent: the winner, about to release the cell, or a
        // loser, about to withdraw its claim. (A dead one not yet recovered still counts: its
        // own recovery comes first.)
        let live_claim = |c: u64| {
            (0..shared.n_seats()).filter(|&i| i != seat).any(|i| {
                let w = shared.ctl(i);
                w.claim.load(Ordering::SeqCst) == c
                    && w.state.load(Ordering::Acquire) == ctl_state::READY
            })
        };
        shared.task_ring().repair(claim, live_claim)
    }

    /// Retries the queue repairs a live claim held up (each converges once that worker runs).
    fn retry_repairs(&mut self) {
        if self.pending_repairs.is_empty() {
            return;
        }
        for p in std::mem::take(&mut self.pending_repairs) {
            match self.repair(p.seat, p.claim) {
                Repair::Deferred => self.pending_repairs.push(p),
                Repair::Taken(v) if v < self.shared.n_slots() => {
                    let _ = self.answer_held(v, p.seat, p.pid, p.cause, None);
                }
                _ => {}
            }
        }
    }

    /// Answers a task a dead worker held: `Timeout` if we killed it for this task,
    /// `Cancelled` at shutdown or if its caller cancelled, a retry if its budget allows, else
    /// `WorkerDied`. Returns whether it was requeued.
    fn answer_held(
        &mut self,
        slot: u32,
        seat: u32,
        pid: u32,
        cause: ExitCause,
        kill: Option<KillReason>,
    ) -> bool {
        let shared = self.shared.clone();
        let sh = shared.slot(slot);
        let meta = shared.meta(slot);
        let this_task = sh.task_id.load(Ordering::Relaxed);
        let cancelled = sh.state.load(Ordering::Acquire) & bits::CANCELLED != 0;
        let parent = |kind, rec, len| RawOutcome::new(kind, seat, rec, len);
        match kill {
            Some(KillReason::Timeout { task_id, after_ns }) if task_id == this_task => {
                StatCounters::add(&shared.stats.tasks_timed_out, 1);
                shared.complete_from_parent(slot, parent(KIND_TIMEOUT, after_ns, 0));
                return false;
            }
            Some(KillReason::Shutdown) => {
                shared.complete_from_parent(slot, parent(KIND_CANCELLED, 0, 0));
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
                StatCounters::add(&shared.stats.tasks_retried, 1);
                // A retried task may be alone in the queue with no live worker left: the
                // supervisor's loop drains it while `no_workers` holds.
                return true;
            }
        }
        StatCounters::add(&shared.stats.tasks_died, 1);
        shared.complete_from_parent(slot, parent(KIND_DIED, pid as u64, cause.encode()));
        false
    }

    /// Starts the seat again after its back-off, or marks it failed if it is out of restarts.
    fn schedule_restart(&mut self, seat: u32) {
        let policy = self.shared.cfg.restart;
        let now = Instant::now();
        let s = &mut self.seats[seat as usize];
        while s
            .recent
            .front()
            .is_some_and(|&t| now.saturating_duration_since(t) > policy.window)
        {
            s.recent.pop_front();
        }
        let recent = s.recent.len() as u32;
        if recent >= policy.max_restarts {
            self.free_seat(seat, WorkerState::Failed);
            StatCounters::add(&self.shared.stats.failed_workers, 1);
            self.emit(PoolEvent::WorkerFailed {
                worker: seat as usize,
                restarts: recent,
            });
            self.check_no_workers();
            return;
        }
        let at = now + policy.delay(recent);
        s.recent.push_back(at);
        s.phase = Phase::Backoff { at };
        self.shared.lock_seats()[seat as usize].state = WorkerState::Restarting;
    }

    fn restart_failed(&mut self, seat: u32, message: String) {
        self.seats[seat as usize].phase = Phase::Idle;
        self.emit(PoolEvent::RestartFailed {
            worker: seat as usize,
            message,
        });
        if self.shutdown.is_some() {
            self.free_seat(seat, WorkerState::Stopped);
        } else {
            self.schedule_restart(seat);
        }
    }

    /// If no seat is serving, starting or about to restart, the pool has no workers left:
    /// fail the queue and refuse new tasks until a spawn succeeds.
    fn check_no_workers(&mut self) {
        let alive = self.seats.iter().any(|s| !matches!(s.phase, Phase::Idle));
        if alive || self.shutdown.is_some() {
            return;
        }
        self.emit(PoolEvent::NoWorkersLeft);
        self.shared.no_workers.store(true, Ordering::SeqCst);
        self.shared.fail_queued(KIND_NO_WORKERS);
    }

    fn check_timeouts(&mut self) {
        let shared = self.shared.clone();
        let n_slots = shared.layout.params.n_slots;
        let now = Instant::now();
        for seat in 0..self.seats.len() as u32 {
            let s = &mut self.seats[seat as usize];
            if !matches!(s.phase, Phase::Ready) || s.kill.is_some() {
                continue;
            }
            let ctl = shared.ctl(seat);
            let tid = ctl.current_task.load(Ordering::Relaxed);
            let slot = ctl.current_slot.load(Ordering::Relaxed);
            if tid == 0 || slot >= n_slots {
                s.watch = (0, now);
                continue;
            }
            if s.watch.0 != tid {
                s.watch = (tid, now);
                continue;
            }
            let meta = shared.meta(slot);
            let limit = meta.timeout_ns.load(Ordering::Relaxed);
            if limit == 0 || meta.task_id() != tid {
                continue;
            }
            if now.saturating_duration_since(s.watch.1) >= Duration::from_nanos(limit) {
                // Hold the worker before the kill, then check it is still on this task
                // (SeqCst both sides, Dekker with the worker's `current_task` clear and `hold`
                // check): either we see it moved on, and withdraw, or it sees the hold and
                // takes no next task for the kill to land on.
                ctl.hold.store(1, Ordering::SeqCst);
                if ctl.current_task.load(Ordering::SeqCst) != tid {
                    ctl.hold.store(0, Ordering::SeqCst);
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

    fn begin_shutdown(&mut self, immediate: bool, done: Sender<()>) {
        let shared = self.shared.clone();
        let deadline = Instant::now() + shared.cfg.shutdown_timeout;
        self.shutdown = Some((deadline, done));
        if immediate {
            shared.fail_queued(KIND_CANCELLED);
        }
        // Start-ups in progress are abandoned; back-offs are not restarted.
        for seat in 0..self.seats.len() as u32 {
            match &self.seats[seat as usize].phase {
                Phase::Starting { .. } => {
                    self.reap_now(seat);
                    let s = &mut self.seats[seat as usize];
                    if let Phase::Starting { reply: Some(r), .. } =
                        std::mem::replace(&mut s.phase, Phase::Idle)
                    {
                        r.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
                    }
                    self.free_seat(seat, WorkerState::Stopped);
                }
                Phase::Backoff { .. } => self.free_seat(seat, WorkerState::Stopped),
                _ => {}
            }
        }
        let hdr = shared.header();
        hdr.shutdown.store(1, Ordering::SeqCst);
        hdr.task_ready.notify_all();
        hdr.space.notify_all();
    }

    /// The shutdown grace is over: kill every worker still running.
    fn kill_all(&mut self) {
        self.killed_all = true;
        for s in &mut self.seats {
            if s.child.is_some() {
                s.kill = Some(KillReason::Shutdown);
                kill_process(s);
            }
        }
    }

    /// How long `poll` may sleep: until the nearest back-off, spawn deadline, timeout check or
    /// shutdown deadline.
    fn next_timeout(&self) -> Option<Duration> {
        let now = Instant::now();
        let mut next: Option<Instant> = None;
        let mut at = |t: Instant| next = Some(next.map_or(t, |n| n.min(t)));
        for s in &self.seats {
            match &s.phase {
                Phase::Backoff { at: t } => at(*t),
                Phase::Starting { since, .. } => {
                    at(*since + self.shared.cfg.spawn_timeout);
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

fn describe(cause: ExitCause) -> String {
    use crate::worker::boot::exit_code;
    match cause {
        ExitCause::Signal(_) => cause.to_string(),
        ExitCause::Exit(code) => match exit_code::meaning(code) {
            Some(m) => format!("exit code {code}: {m}"),
            None => format!("exit code {code}"),
        },
    }
}

/// A copy of what a worker that reported READY or FAILED wrote in its spawn area: the spawn
/// output's archive, or the failure message.
fn spawn_report(shared: &Shared, seat: u32) -> Vec<u8> {
    let ctl = shared.ctl(seat);
    let len = (ctl.spawn_out_len.load(Ordering::Relaxed) as usize)
        .min(shared.layout.params.spawn_area as usize);
    let ptr = shared
        .seg
        .bytes_ptr(shared.layout.spawn_area_off(seat), len);
    // SAFETY: the worker wrote these bytes before its Release store of READY/FAILED, which the
    // caller Acquired; it never writes the area again in this life, and `len` is clamped to the
    // area.
    unsafe { std::slice::from_raw_parts(ptr, len) }.to_vec()
}
