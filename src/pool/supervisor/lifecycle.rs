//! A worker's life as the supervisor runs it: launch (spawn arguments into the seat's area, a
//! fresh control block, the process), the start-up report (ready or failed, or past the spawn
//! timeout), restarts under the restart policy, and the "no workers left" state.

use super::*;

impl Sup {
    /// Takes the task offered to `seat` alone (a broadcast) if one is pending: its slot, if the
    /// parent really offered it there and it is unanswered (the word is worker-writable).
    pub(super) fn take_offer(&self, seat: u32) -> Option<u32> {
        let d = self.shared.ctl(seat).direct.swap(0, Ordering::SeqCst);
        let v = d.checked_sub(1)?;
        if v >= self.shared.n_slots()
            || self.shared.meta(v).directed_to.load(Ordering::Relaxed) != seat + 1
            || self.shared.slot(v).is_done()
        {
            return None;
        }
        Some(v)
    }

    /// A seat starts a new life or is freed: a task offered to its previous worker that no
    /// worker took is answered (`Cancelled`: nobody ran it), never carried over.
    fn drop_offer(&self, seat: u32) {
        if let Some(v) = self.take_offer(seat) {
            self.shared
                .complete_from_parent(v, RawOutcome::new(self.left_over(), seat, 0, 0));
        }
    }

    /// A retirement request (scale-down): a serving worker is told to leave after its current
    /// task (the `RETIRE` hold bit, and a wake-up in case it is parked); a seat waiting to
    /// restart is simply freed, and so is one starting up again (a restart or a revival: its
    /// process is killed); a failed seat's pending revival is cancelled. Past the shutdown
    /// timeout a worker that has not left is killed.
    pub(super) fn begin_retire(&mut self, seat: u32, done: Sender<bool>) {
        let shared = self.shared.clone();
        if self.seats.get(seat as usize).is_none() {
            let _ = done.send(false);
            return;
        }
        self.look_at_start_up(seat);
        if self.shutdown.is_none()
            && matches!(
                self.seats[seat as usize].phase,
                Phase::Starting { reply: None, .. }
            )
        {
            // A restart or revival still in its start-up (no spawn call waits on it).
            self.abandon_start_up(seat);
            let _ = done.send(true);
            return;
        }
        let s = &mut self.seats[seat as usize];
        match s.phase {
            Phase::Ready if s.child.is_some() && self.shutdown.is_none() => {
                let ctl = shared.ctl(seat);
                ctl.hold.fetch_or(hold::RETIRE, Ordering::SeqCst);
                crate::sys::futex_wake(&ctl.hold, i32::MAX);
                // Unconditionally: the sleeper count is in memory workers write.
                shared.header().task_ready.wake_all_unconditionally();
                match &mut s.retiring {
                    Some((_, waiters)) => waiters.push(done),
                    None => {
                        s.retiring = Some((
                            crate::deadline::at_or_never(
                                Instant::now(),
                                shared.cfg.shutdown_timeout,
                            ),
                            vec![done],
                        ))
                    }
                }
            }
            Phase::Backoff { .. } if self.shutdown.is_none() => {
                self.free_seat(seat, WorkerState::Stopped);
                let _ = done.send(true);
            }
            // Failed, waiting for its revival (and not taken by a spawn meanwhile): it will
            // not come back.
            Phase::Idle
                if s.revive_at.is_some()
                    && self.shutdown.is_none()
                    && !shared.lock_seats()[seat as usize].in_use =>
            {
                s.revive_at = None;
                shared.lock_seats()[seat as usize].state = WorkerState::Stopped;
                let _ = done.send(true);
            }
            _ => {
                let _ = done.send(false);
            }
        }
    }

    /// A retiring worker past its deadline is killed (its task, if any, is answered as at a
    /// shutdown).
    pub(super) fn check_retire_deadlines(&mut self) {
        let now = Instant::now();
        for s in &mut self.seats {
            if let Some((deadline, _)) = &s.retiring {
                if now >= *deadline && s.kill.is_none() && s.child.is_some() {
                    s.kill = Some(KillReason::Shutdown);
                    kill_process(s);
                }
            }
        }
    }

    /// Writes the spawn arguments into the seat's area, resets its control block for a new
    /// life and launches the process.
    pub(super) fn start(&mut self, seat: u32, reply: Option<ReplyGuard>) {
        self.drop_offer(seat);
        let shared = &self.shared;
        let s = &mut self.seats[seat as usize];
        // A spawn into a seat that waited for its revival replaces the revival.
        s.revive_at = None;
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
        ctl.idle.store(0, Ordering::Relaxed);
        shared.batch_ctl(seat).clear_held();
        let generation = ctl
            .generation
            .fetch_add(1, Ordering::Relaxed)
            .wrapping_add(1);
        // SYNC POINT: the launch (spawn/exec) orders these stores before anything the worker does.
        ctl.state.store(ctl_state::STARTING, Ordering::Release);
        s.kill = None;
        let restart = reply.is_none();
        // The seat's completion ring: reserved by the worker until one has reported ready.
        s.boot.reserve_ring = shared.ring_reserve(seat);
        let boot = s.boot.encode();
        // The worker's own notify line (`sys::notify_line`): we keep one end, it gets the other.
        let launched = crate::sys::notify_line().and_then(|(line, theirs)| {
            let recipe = Recipe {
                program: &self.program,
                segment: shared.seg.fd(),
                notify: theirs.as_fd(),
                boot: &boot,
                env: &s.env,
            };
            if shared.cfg.fork_launcher {
                launch_with(Launcher::Fork, &recipe)
            } else {
                launch(&recipe)
            }
            .map(|child| (child, line))
        });
        match launched {
            Ok((child, line)) => {
                s.line = Some(line);
                s.pid = child.id();
                s.pidfd = crate::sys::pidfd_open(child.id()).ok();
                s.life = crate::telemetry::launched(seat, child.id(), restart);
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
                seats[seat as usize].launched(generation, pid);
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

    pub(super) fn free_seat(&mut self, seat: u32, state: WorkerState) {
        let s = &mut self.seats[seat as usize];
        s.phase = Phase::Idle;
        s.forget_process();
        s.life = Default::default();
        self.shared
            .ctl(seat)
            .state
            .store(ctl_state::EMPTY, Ordering::Release);
        {
            let mut seats = self.shared.lock_seats();
            self.shared
                .set_seat_in_use(&mut seats, seat as usize, false);
            seats[seat as usize].state = state;
        }
        // After the seat is marked free: a broadcaster that saw it in use made its offer
        // before, so it is answered here; one that sees it free takes its offer back.
        self.drop_offer(seat);
    }

    /// A start-up reported ready or failed (or ran out of time).
    pub(super) fn check_start(&mut self, seat: u32) {
        let shared = self.shared.clone();
        let ctl = shared.ctl(seat);
        let worker = seat as usize;
        match ctl.state.load(Ordering::Acquire) {
            // A worker that reported ready may serve, retire and exit before this look:
            // RETIRING and EXITED imply READY came first.
            ctl_state::READY | ctl_state::RETIRING | ctl_state::EXITED => {
                let s = &mut self.seats[seat as usize];
                let Phase::Starting { reply, .. } = std::mem::replace(&mut s.phase, Phase::Ready)
                else {
                    return;
                };
                // Its one report is in: the notify line has served (a worker that kept
                // signalling on it would only keep waking us).
                s.line = None;
                let pid = s.pid;
                let restarted = reply.is_none();
                // Everything a caller may check once it sees the seat `Ready` is in place
                // before: submits accepted again, the restart counted.
                shared.seat_reserved(seat);
                shared.no_workers.store(false, Ordering::SeqCst);
                if restarted {
                    StatCounters::add(&shared.stats.restarts, 1);
                }
                {
                    let mut seats = shared.lock_seats();
                    seats[worker].state = WorkerState::Ready;
                    seats[worker].pid = pid;
                    if restarted {
                        seats[worker].restarts += 1;
                    }
                }
                crate::telemetry::ready(&mut self.seats[worker].life, seat, pid);
                match reply {
                    Some(r) => r.complete(SpawnOutcome::Ready(spawn_report(&shared, seat))),
                    None => {
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
                let kind = ctl.spawn_kind.load(Ordering::Relaxed);
                let panicked = kind == KIND_PANIC;
                // The worker could not reserve its ring: the OS error it sent (checked: any
                // other text is an I/O error of unknown kind).
                let no_space = (kind == KIND_NO_SPACE).then(|| match message.parse::<i32>() {
                    Ok(errno) if errno > 0 && errno < 4096 => {
                        std::io::Error::from_raw_os_error(errno)
                    }
                    _ => {
                        let shown: String = message.chars().take(40).collect();
                        std::io::Error::other(format!("unreadable OS error {shown:?}"))
                    }
                });
                // The spawn output did not fit the spawn area: the worker sent the archive's
                // length (checked: a length that would have fitted, 0 when the worker could not
                // measure it, or anything else is reported as a plain failure).
                let area = shared.layout.params.spawn_area as usize;
                let too_large = (kind == KIND_TOO_LARGE)
                    .then(|| message.parse::<usize>().ok())
                    .flatten()
                    .filter(|&len| len > area);
                let message = if kind == KIND_TOO_LARGE && too_large.is_none() {
                    format!("spawn output does not fit the spawn area of {area} bytes")
                } else {
                    message
                };
                // The worker exits right after reporting: reap it now. It never reported
                // ready, so it holds no task, unless it broke the protocol: answer what it
                // claimed, if anything.
                let cause = self
                    .reap_now(seat)
                    .unwrap_or(ExitCause::Signal(libc::SIGKILL));
                let pid = self.seats[seat as usize].pid;
                self.recover_tasks(seat, pid, cause, None);
                let s = &mut self.seats[seat as usize];
                let Phase::Starting { reply, .. } = std::mem::replace(&mut s.phase, Phase::Idle)
                else {
                    return;
                };
                match reply {
                    Some(r) => {
                        self.free_seat(seat, WorkerState::Empty);
                        r.complete(SpawnOutcome::Failed(if let Some(source) = no_space {
                            SpawnError::NoSpace {
                                bytes: shared.layout.result_ring_stride as u64,
                                source,
                            }
                        } else if let Some(len) = too_large {
                            SpawnError::OutputTooLarge {
                                worker,
                                len,
                                max: area,
                            }
                        } else if panicked {
                            // The worker's backtrace (if it sent one) stays in its stderr.
                            let (message, _) = crate::worker::main_loop::split_backtrace(message);
                            SpawnError::Panicked { worker, message }
                        } else {
                            SpawnError::Failed { worker, message }
                        }));
                    }
                    None => {
                        let why = match no_space {
                            Some(e) => format!("cannot reserve the completion ring: {e}"),
                            None if panicked => format!("spawn step panicked: {message}"),
                            None if too_large.is_some() => format!(
                                "spawn output of {message} bytes does not fit the spawn area of \
                                 {area} bytes"
                            ),
                            None => format!("spawn step failed: {message}"),
                        };
                        self.restart_failed(seat, why);
                    }
                }
            }
            _ => {
                let Phase::Starting { since, .. } = &self.seats[seat as usize].phase else {
                    return;
                };
                if since.elapsed() > shared.cfg.spawn_timeout {
                    // Looked at once more, just before the kill: a report that came in since
                    // is taken.
                    if ctl_state::reported(ctl.state.load(Ordering::Acquire)) {
                        return self.check_start(seat);
                    }
                    let cause = self
                        .reap_now(seat)
                        .unwrap_or(ExitCause::Signal(libc::SIGKILL));
                    // The kill is final. A worker that reported ready between that look and
                    // the kill may have taken a task: it is a started worker that died, and
                    // `on_exit` answers what it held. One that never reported holds nothing,
                    // unless it broke the protocol: whatever it claimed is answered too.
                    if ctl_state::reported(ctl.state.load(Ordering::Acquire)) {
                        return self.on_exit(seat, cause);
                    }
                    let pid = self.seats[seat as usize].pid;
                    self.recover_tasks(seat, pid, cause, None);
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

    /// Kills the seat's process (if still running) and reaps it; how it ended, if there was a
    /// process to reap.
    pub(super) fn reap_now(&mut self, seat: u32) -> Option<ExitCause> {
        let s = &mut self.seats[seat as usize];
        let mut status = None;
        if let Some(child) = s.child.as_mut() {
            status = match child.try_wait() {
                Ok(Some(st)) => Some(st),
                _ => {
                    kill_process(s);
                    s.child.as_mut().and_then(|c| c.wait().ok())
                }
            };
        }
        s.forget_process();
        status.map(ExitCause::from_status)
    }

    /// Starts the seat again after its back-off, or marks it failed if it is out of restarts.
    pub(super) fn schedule_restart(&mut self, seat: u32) {
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
            if let Some(d) = self.shared.cfg.revive_after {
                self.seats[seat as usize].revive_at = Some(crate::deadline::at_or_never(now, d));
            }
            StatCounters::add(&self.shared.stats.failed_workers, 1);
            self.emit(PoolEvent::WorkerFailed {
                worker: seat as usize,
                restarts: recent,
            });
            self.check_no_workers();
            return;
        }
        let at = crate::deadline::at_or_never(now, policy.delay(recent));
        s.recent.push_back(at);
        s.phase = Phase::Backoff { at };
        self.shared.lock_seats()[seat as usize].state = WorkerState::Restarting;
    }

    /// A failed seat's revival is due: starts it again as a restart, its budget afresh,
    /// unless a spawn took the seat meanwhile or the pool is shutting down.
    pub(super) fn revive(&mut self, seat: u32) {
        let s = &mut self.seats[seat as usize];
        s.revive_at = None;
        if self.shutdown.is_some()
            || self.shared.closing.load(Ordering::SeqCst)
            || !matches!(s.phase, Phase::Idle)
        {
            return;
        }
        {
            let mut seats = self.shared.lock_seats();
            let taken = seats[seat as usize].in_use;
            if taken || seats[seat as usize].state != WorkerState::Failed {
                return;
            }
            self.shared.set_seat_in_use(&mut seats, seat as usize, true);
            seats[seat as usize].state = WorkerState::Restarting;
        }
        s.recent.clear();
        self.emit(PoolEvent::WorkerReviving {
            worker: seat as usize,
        });
        self.start(seat, None);
    }

    pub(super) fn restart_failed(&mut self, seat: u32, message: String) {
        self.seats[seat as usize].phase = Phase::Idle;
        self.emit(PoolEvent::RestartFailed {
            worker: seat as usize,
            message,
        });
        // The failed start's process (if any) is done with: its spans close before the
        // back-off, not at the next launch.
        self.seats[seat as usize].life = Default::default();
        if self.shutdown.is_some() {
            self.free_seat(seat, WorkerState::Stopped);
        } else {
            self.schedule_restart(seat);
        }
    }

    /// If no seat is serving, starting or about to restart, the pool has no workers left:
    /// fail the queue and refuse new tasks until a spawn succeeds.
    pub(super) fn check_no_workers(&mut self) {
        let alive = self.seats.iter().any(|s| !matches!(s.phase, Phase::Idle));
        if alive || self.shutdown.is_some() {
            return;
        }
        self.emit(PoolEvent::NoWorkersLeft);
        self.shared.no_workers.store(true, Ordering::SeqCst);
        self.shared.fail_queued(KIND_NO_WORKERS);
    }
}

/// A copy of what a worker that reported READY or FAILED wrote in its spawn area: the spawn
/// output's archive, or the failure message.
pub(super) fn spawn_report(shared: &Shared, seat: u32) -> Vec<u8> {
    let ctl = shared.ctl(seat);
    let len = (ctl.spawn_out_len.load(Ordering::Relaxed) as usize)
        .min(shared.layout.params.spawn_area as usize);
    let ptr = shared
        .seg
        .bytes_ptr(shared.layout.spawn_area_off(seat), len);
    // A raw copy, never a `&[u8]` over the area: an honest worker wrote these bytes before its
    // Release store of READY/FAILED (which the caller Acquired) and never writes them again in
    // this life, but a misbehaving one may, and Rust references must not see bytes change.
    let mut out = vec![0u8; len];
    // SAFETY: `ptr` is valid for `len` bytes (`bytes_ptr` bounds-checks, `len` is clamped to
    // the seat's spawn area), `out` owns `len` bytes, and the two cannot overlap (heap vs the
    // shared mapping).
    unsafe { std::ptr::copy_nonoverlapping(ptr, out.as_mut_ptr(), len) };
    out
}
