//! The pool's two threads.
//!
//! - The **supervisor** launches worker processes (it must be one long-lived thread: a
//!   child's `PR_SET_PDEATHSIG` fires when the thread that forked it exits) and watches each
//!   start-up until the worker reports ready, reports a failed spawn step, exits, or times out.
//!   It parks on the segment's `lifecycle` eventcount, which workers ring when they report; it
//!   re-checks unfinished start-ups every 10 ms to notice a process that died before reporting.
//! - The **reactor** wakes futures and retires detached tasks. It parks on the segment's
//!   `doorbell`, which a worker rings only when it completes a slot someone asked the reactor to
//!   watch; an idle reactor costs nothing.

use super::handle::{SpawnOutcome, SpawnReply};
use super::shared::Shared;
use crate::error::SpawnError;
use crate::process::{describe_status, launch};
use crate::ring::bytes::KIND_PANIC;
use crate::shm::layout::ctl_state;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::time::{Duration, Instant};

/// A request to the supervisor.
#[derive(Debug)]
pub(crate) enum SupMsg {
    /// Launch the worker of `seat` (its control block and spawn area are prepared).
    Launch {
        seat: u32,
        boot: String,
        reply: Arc<SpawnReply>,
    },
    /// Reply once every earlier message is handled (shutdown uses it so that every worker
    /// process that will ever exist is known before it reaps them).
    Sync(std::sync::mpsc::Sender<()>),
    /// Finish pending start-ups as failed and exit.
    Stop,
}

struct Pending {
    seat: u32,
    reply: Arc<SpawnReply>,
    started: Instant,
}

pub(crate) fn supervisor_loop(shared: Arc<Shared>, rx: Receiver<SupMsg>, program: PathBuf) {
    let hdr = shared.header();
    let mut pending: Vec<Pending> = Vec::new();
    let mut stop = false;
    loop {
        let key = hdr.lifecycle.prepare();
        let mut progressed = false;
        loop {
            match rx.try_recv() {
                Ok(SupMsg::Sync(done)) => {
                    let _ = done.send(());
                }
                Ok(SupMsg::Launch { reply, seat, .. }) if shared.closing.load(Ordering::SeqCst) => {
                    progressed = true;
                    free_seat(&shared, seat);
                    reply.complete(SpawnOutcome::Failed(SpawnError::Shutdown));
                }
                Ok(SupMsg::Launch { seat, boot, reply }) => {
                    progressed = true;
                    match launch(&program, shared.seg.fd(), &boot) {
                        Ok(child) => {
                            shared.ctl(seat).pid.store(child.id(), Ordering::Relaxed);
                            shared.lock_seats()[seat as usize].child = Some(child);
                            pending.push(Pending {
                                seat,
                                reply,
                                started: Instant::now(),
                            });
                        }
                        Err(source) => {
                            free_seat(&shared, seat);
                            reply.complete(SpawnOutcome::Failed(SpawnError::Launch {
                                worker: seat as usize,
                                source,
                            }));
                        }
                    }
                }
                Ok(SupMsg::Stop) | Err(TryRecvError::Disconnected) => {
                    stop = true;
                    break;
                }
                Err(TryRecvError::Empty) => break,
            }
        }
        pending.retain(|p| {
            let done = check_start(&shared, p, stop);
            progressed |= done;
            !done
        });
        if stop && pending.is_empty() {
            hdr.lifecycle.cancel(key);
            return;
        }
        if progressed {
            hdr.lifecycle.cancel(key);
            continue;
        }
        let timeout = if pending.is_empty() {
            None
        } else {
            Some(Duration::from_millis(10))
        };
        hdr.lifecycle.wait(key, timeout);
    }
}

fn free_seat(shared: &Shared, seat: u32) {
    let mut seats = shared.lock_seats();
    let s = &mut seats[seat as usize];
    s.in_use = false;
    s.child = None;
    shared
        .ctl(seat)
        .state
        .store(ctl_state::EMPTY, Ordering::Release);
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

/// Checks one start-up; returns whether it is finished (and replied to).
fn check_start(shared: &Shared, p: &Pending, stop: bool) -> bool {
    let ctl = shared.ctl(p.seat);
    let worker = p.seat as usize;
    match ctl.state.load(Ordering::Acquire) {
        ctl_state::READY => {
            p.reply
                .complete(SpawnOutcome::Ready(spawn_report(shared, p.seat)));
            true
        }
        ctl_state::FAILED => {
            let message = String::from_utf8_lossy(&spawn_report(shared, p.seat)).into_owned();
            let err = if ctl.spawn_kind.load(Ordering::Relaxed) == KIND_PANIC {
                SpawnError::Panicked { worker, message }
            } else {
                SpawnError::Failed { worker, message }
            };
            reap(shared, p.seat, Duration::from_secs(5));
            free_seat(shared, p.seat);
            p.reply.complete(SpawnOutcome::Failed(err));
            true
        }
        _ => {
            let exited = {
                let mut seats = shared.lock_seats();
                match seats[p.seat as usize].child.as_mut().map(|c| c.try_wait()) {
                    Some(Ok(Some(status))) => {
                        Some((describe_status(status), ctl.pid.load(Ordering::Relaxed)))
                    }
                    Some(Err(e)) => Some((format!("cannot wait for it: {e}"), 0)),
                    _ => None,
                }
            };
            if let Some((status, pid)) = exited {
                free_seat(shared, p.seat);
                p.reply.complete(SpawnOutcome::Failed(SpawnError::Exited {
                    worker,
                    pid,
                    status,
                }));
                return true;
            }
            let timed_out = p.started.elapsed() > shared.cfg.spawn_timeout;
            if timed_out || stop {
                reap(shared, p.seat, Duration::ZERO);
                free_seat(shared, p.seat);
                p.reply.complete(SpawnOutcome::Failed(if stop {
                    SpawnError::Shutdown
                } else {
                    SpawnError::Timeout {
                        worker,
                        after: shared.cfg.spawn_timeout,
                    }
                }));
                return true;
            }
            false
        }
    }
}

/// Waits up to `grace` for the seat's process to exit, then kills it; always reaps it.
pub(crate) fn reap(shared: &Shared, seat: u32, grace: Duration) {
    let child = shared.lock_seats()[seat as usize].child.take();
    if let Some(mut child) = child {
        if !matches!(crate::process::wait_timeout(&mut child, grace), Ok(true)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

pub(crate) fn reactor_loop(shared: Arc<Shared>) {
    let hdr = shared.header();
    loop {
        let key = hdr.doorbell.prepare();
        let stop = shared.reactor_stop.load(Ordering::SeqCst);
        let did = shared.reactor_scan();
        if stop {
            hdr.doorbell.cancel(key);
            shared.reactor_scan();
            return;
        }
        if did {
            hdr.doorbell.cancel(key);
            continue;
        }
        hdr.doorbell.wait(key, None);
    }
}
