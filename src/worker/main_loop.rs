//! The worker process's main loop: run the spawn step, then pop tasks from the shared queue,
//! execute them in place, and write each result straight into this worker's completion ring.
//!
//! Internal protocol state is never left half-updated by a user panic: user code (spawn,
//! execute, `Serialize` of the output) runs under `catch_unwind`, and a panic becomes that
//! step's error record.

use super::boot::{WorkerProcess, protocol_hash};
use super::{TaskContext, Worker, WorkerContext};
use crate::codec::{self, EncodeError};
use crate::failpoint;
use crate::ring::bytes::{ByteRing, Reservation};
use crate::ring::mpmc::{MpmcCell, MpmcRing};
use crate::ring::wait::{spin_until, wait_on_marked};
use crate::shm::layout::{
    FLAG_RESTART_ON_PANIC, RING_HDR, SlotTimes, WorkerCtl, ctl_state, hold, parked,
};
use crate::slot::outcome::{
    KIND_BAD_TASK, KIND_CANCELLED, KIND_ERR, KIND_EXPIRED, KIND_NO_SPACE, KIND_OK, KIND_PANIC,
    KIND_POISONED, KIND_TOO_LARGE, LEN_IN_HEADER, REC_INLINE, WORD_BYTES,
};
use crate::slot::{RawOutcome, SlotHeader, TASK_IN_HEADER, bits};
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::Ordering;
use std::time::Duration;

/// The outcome kind and message of an error a worker step returned: `KIND_POISONED` for a
/// [`Poisoned`](super::Poisoned) one, else `KIND_ERR`.
pub(crate) fn error_kind(e: &(dyn std::error::Error + Send + Sync + 'static)) -> (u32, String) {
    if let Some(p) = e.downcast_ref::<TaskPanicked>() {
        return (KIND_PANIC, p.0.clone());
    }
    match e.downcast_ref::<super::Poisoned>() {
        Some(p) => (KIND_POISONED, p.message().to_string()),
        None => (KIND_ERR, error_message(e)),
    }
}

/// An error's message: its `Display`, run under `catch_unwind`, so that a `Display` that
/// panics gives a text naming that panic instead of unwinding through the code answering the
/// task (a worker thread of a thread stage, a server's caller, a worker process's loop).
pub(crate) fn error_message(e: &dyn std::fmt::Display) -> String {
    catch_unwind(AssertUnwindSafe(|| e.to_string()))
        .unwrap_or_else(|p| format!("(the error's Display panicked: {})", panic_message(&*p)))
}

/// A panic in one task of a batch step, caught around that task alone (the default
/// [`Worker::execute_batch`](super::Worker::execute_batch)), carried as that task's error: it
/// is answered as a panic ([`TaskError::Panicked`](crate::TaskError)), and fails no other task
/// of the step. The message is [`panic_message`]'s (with the worker's backtrace, if captured).
#[derive(Debug)]
pub(crate) struct TaskPanicked(pub(crate) String);

impl std::fmt::Display for TaskPanicked {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "task panicked: {}", self.0)
    }
}

impl std::error::Error for TaskPanicked {}

/// Runs one task, turning a panic into its [`TaskPanicked`] error.
pub(crate) fn catch_task_panic<T>(
    f: impl FnOnce() -> Result<T, crate::BoxError>,
) -> Result<T, crate::BoxError> {
    catch_unwind(AssertUnwindSafe(f))
        .unwrap_or_else(|p| Err(Box::new(TaskPanicked(panic_message(&*p)))))
}

/// Hands a published output back to the worker ([`Worker::recycle`]); a panic in it is
/// ignored (the outcome is already published).
pub(super) fn recycle<W: Worker>(state: &mut W, out: W::Output) {
    let _ = catch_unwind(AssertUnwindSafe(|| state.recycle(out)));
}

/// Turns a panic payload into its message; in a worker process, followed by the backtrace
/// the panic hook captured (see [`capture_backtraces`]) after [`BACKTRACE_MARK`].
pub(crate) fn panic_message(p: &(dyn std::any::Any + Send)) -> String {
    let mut m = if let Some(s) = p.downcast_ref::<&str>() {
        (*s).to_string()
    } else if let Some(s) = p.downcast_ref::<String>() {
        s.clone()
    } else {
        "panic with a non-string payload".to_string()
    };
    if let Some(bt) = LAST_BACKTRACE.take() {
        m.push_str(BACKTRACE_MARK);
        m.push_str(&bt);
    }
    m
}

/// Separates a panic's message from the worker's backtrace in the message a worker sends.
const BACKTRACE_MARK: &str = "\n\nworker backtrace:\n";

/// Splits what [`panic_message`] made into the message and the backtrace, if one was sent.
pub(crate) fn split_backtrace(message: String) -> (String, Option<String>) {
    match message.split_once(BACKTRACE_MARK) {
        Some((m, bt)) => (m.to_string(), Some(bt.to_string())),
        None => (message, None),
    }
}

thread_local! {
    static LAST_BACKTRACE: std::cell::Cell<Option<String>> = const { std::cell::Cell::new(None) };
}

/// Worker processes only: a panic hook that keeps the panicking thread's backtrace for
/// [`panic_message`], when backtraces are enabled the standard way (`RUST_BACKTRACE` or
/// `RUST_LIB_BACKTRACE`), then runs the previous hook. Without them nothing is captured.
pub(crate) fn capture_backtraces() {
    let prev = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let bt = std::backtrace::Backtrace::capture();
        if bt.status() == std::backtrace::BacktraceStatus::Captured {
            LAST_BACKTRACE.set(Some(bt.to_string()));
        }
        prev(info);
    }));
}

/// Entry point of a worker process serving worker type `W`. Never returns.
pub(crate) fn run<W: Worker>(mut wp: WorkerProcess) -> ! {
    let ring_reservation = wp.ring_reservation.take();
    let hdr = wp.header();
    let layout = wp.layout;
    let ctl = wp.seg.get::<WorkerCtl>(layout.ctl_off(wp.seat));
    capture_backtraces();
    // SAFETY: getpid has no preconditions.
    let pid = unsafe { libc::getpid() } as u32;
    ctl.pid.store(pid, Ordering::Relaxed);
    let spawn_off = layout.spawn_area_off(wp.seat);
    let spawn_cap = layout.params.spawn_area as usize;

    let fail = |kind: u32, msg: &str| -> ! {
        let bytes = msg.as_bytes();
        let n = bytes.len().min(spawn_cap);
        let dst = wp.seg.bytes_ptr(spawn_off, n);
        // SAFETY: the spawn area belongs to this worker while its seat is STARTING; `n` is
        // within it; the source is our own string.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), dst, n) };
        ctl.spawn_out_len.store(n as u64, Ordering::Relaxed);
        ctl.spawn_kind.store(kind, Ordering::Relaxed);
        ctl.state.store(ctl_state::FAILED, Ordering::Release);
        wp.notify_parent();
        std::process::exit(1)
    };

    if hdr.worker_type_hash != protocol_hash::<W>() {
        fail(
            KIND_ERR,
            &format!(
                "worker type mismatch: this process serves {} (messages {})",
                std::any::type_name::<W>(),
                std::any::type_name::<(W::SpawnArgs, W::SpawnOutput, W::Task, W::Output)>()
            ),
        )
    }

    // GPUs: contexts created here, in this process, never inherited; the payload arena pinned.
    #[cfg(feature = "cuda")]
    let (cuda, pinned) = if wp.gpus.0.is_empty() {
        (Vec::new(), None)
    } else {
        let cuda = match crate::gpu::open(&wp.gpus.0, wp.gpus.1) {
            Ok(c) => c,
            Err(e) => fail(KIND_ERR, &e),
        };
        let arena_len = layout.params.arena as usize;
        let arena_ptr = wp.seg.bytes_ptr(layout.arena, arena_len);
        // SAFETY: the arena stays mapped for the whole life of this process (the segment is
        // never unmapped before exit, and `pinned` is dropped before the exit below).
        let pinned = match unsafe { crate::gpu::Pinned::register(&cuda[0], arena_ptr, arena_len) } {
            Ok(p) => Some(p),
            Err(e) => {
                eprintln!(
                    "stateful-pool worker {}: {e}; payload copies will be pageable",
                    wp.seat
                );
                None
            }
        };
        (cuda, pinned)
    };
    #[cfg(feature = "cuda")]
    let payload_pinned = pinned.is_some();
    #[cfg(not(feature = "cuda"))]
    let payload_pinned = false;
    let wctx = WorkerContext {
        index: wp.seat as usize,
        generation: ctl.generation.load(Ordering::Relaxed),
        pid,
        gpus: wp.gpus.0.clone(),
        #[cfg(feature = "cuda")]
        cuda,
        payload_pinned,
    };
    failpoint::configure(wctx.generation);

    // ---- the spawn step ----
    let args_len = ctl.spawn_args_len.load(Ordering::Acquire) as usize;
    if args_len > spawn_cap {
        fail(KIND_ERR, "spawn arguments length out of range")
    }
    let args_ptr = wp.seg.bytes_ptr(spawn_off, args_len);
    // SAFETY: the parent wrote `args_len` bytes of spawn arguments here before launching us and
    // does not touch the area until we report; the slice ends before we overwrite the area.
    let args_bytes = unsafe { std::slice::from_raw_parts(args_ptr as *const u8, args_len) };
    let args = match codec::decode::<W::SpawnArgs>(args_bytes) {
        Ok(a) => a,
        Err(e) => fail(KIND_ERR, &format!("invalid spawn arguments: {e}")),
    };
    let (mut state, output) = match catch_unwind(AssertUnwindSafe(|| W::spawn(args, &wctx))) {
        Ok(Ok(v)) => v,
        Ok(Err(e)) => fail(KIND_ERR, &error_message(&e)),
        Err(p) => fail(KIND_PANIC, &panic_message(&*p)),
    };
    let out_ptr = wp.seg.bytes_ptr(spawn_off, spawn_cap);
    let encoded = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: the seat's spawn area is this worker's while it is STARTING; the arguments
        // read from it were already deserialised into owned values.
        unsafe { codec::encode_into(&output, out_ptr, spawn_cap) }
    }));
    match encoded {
        Ok(Ok(n)) => ctl.spawn_out_len.store(n as u64, Ordering::Relaxed),
        Ok(Err(EncodeError::Overflow)) => {
            // The report is the archive's length, in decimal (the supervisor parses it into
            // `SpawnError::OutputTooLarge`); 0 if measuring it fails.
            let len = catch_unwind(AssertUnwindSafe(|| codec::encoded_len(&output)))
                .ok()
                .and_then(Result::ok)
                .unwrap_or(0);
            fail(KIND_TOO_LARGE, &len.to_string())
        }
        Ok(Err(EncodeError::Failed(m))) => {
            fail(KIND_ERR, &format!("cannot serialise spawn output: {m}"))
        }
        Err(p) => fail(KIND_PANIC, &panic_message(&*p)),
    }
    drop(output);
    // The completion ring's memory, reserved beside the spawn step: nothing is written there
    // before this succeeds (tasks come only after READY).
    if let Some(r) = ring_reservation {
        if let Err(e) = r.finish() {
            let errno = e.raw_os_error().unwrap_or(libc::EIO);
            fail(KIND_NO_SPACE, &errno.to_string())
        }
    }
    ctl.spawn_kind.store(KIND_OK, Ordering::Relaxed);
    // SYNC POINT: spawn output visible to the supervisor's Acquire load of the state.
    ctl.state.store(ctl_state::READY, Ordering::Release);
    wp.notify_parent();

    // ---- serve ----
    let ring = MpmcRing::new(
        &hdr.task_ring,
        wp.seg.slice::<MpmcCell>(layout.task_cells, layout.ring_cap),
    );
    let slots = wp
        .seg
        .slice::<SlotHeader>(layout.slots, layout.params.n_slots as usize);
    let ring_off = layout.result_ring_off(wp.seat);
    // SAFETY: this seat's completion ring: header at `ring_off`, `result_ring` data bytes after
    // the 128-byte header (64-aligned by the layout); this process is its only producer.
    let results = unsafe {
        ByteRing::new(
            wp.seg.get(ring_off),
            wp.seg
                .bytes_ptr(ring_off + RING_HDR, layout.params.result_ring as usize),
            layout.params.result_ring,
        )
    };
    let spin = Duration::from_nanos(hdr.worker_spin_ns);
    let owner_tag = (wp.seat + 1) | (wctx.generation << 16);
    let server = Server {
        wp: &wp,
        ctl,
        results,
        spin,
        restart_on_panic: hdr.flags & FLAG_RESTART_ON_PANIC != 0,
        last_batch_full: std::cell::Cell::new(false),
        scratch: std::cell::RefCell::new(rkyv::util::AlignedVec::with_capacity(
            layout.params.slot_inline as usize,
        )),
        #[cfg(feature = "failpoints")]
        hostile: (
            failpoint::hostile::mask(),
            failpoint::hostile::Rng(std::cell::Cell::new(0x2545_f491_4f6c_dd1d ^ pid as u64)),
        ),
    };

    loop {
        // A timeout kill is on its way for the task we just finished: take nothing more (the
        // kill would land on an innocent task) until it lands or the supervisor withdraws it.
        // Asked to retire (scale-down): leave the loop as at shutdown, after the task we had.
        let h = ctl.hold.load(Ordering::SeqCst);
        if h & hold::KILL != 0 {
            crate::sys::futex_wait(&ctl.hold, h, Some(Duration::from_millis(10)));
            continue;
        }
        // A task for this worker alone (a broadcast) comes first, even when retiring: recorded
        // in `current_slot` before the offer is cleared, so a death in between leaves it
        // findable (the supervisor checks both words).
        let direct = ctl.direct.load(Ordering::Acquire);
        let from_queue = direct == 0;
        let popped = if direct != 0 {
            ctl.current_slot.store(direct - 1, Ordering::Relaxed);
            ctl.direct.store(0, Ordering::Release);
            Some(direct - 1)
        } else if h & hold::RETIRE != 0 {
            break;
        } else {
            // The pop records the slot in `current_slot` before releasing the queue cell (see
            // `MpmcRing::pop_tracked`), so a death at any step leaves the claim findable.
            ring.pop_tracked(&ctl.claim, &ctl.current_slot, || failpoint::hit("pop_mid"))
        };
        let Some(slot) = popped else {
            // Idle: a worker filling a batch stops waiting for company while we are.
            ctl.idle.store(1, Ordering::Relaxed);
            let mark = Some((&ctl.parked, parked::TASK_READY));
            let other = || {
                hdr.shutdown.load(Ordering::Acquire) != 0
                    || ctl.hold.load(Ordering::SeqCst) & hold::RETIRE != 0
                    || ctl.direct.load(Ordering::Acquire) != 0
            };
            // Spinning, poll the cell the next pop takes (`has_ready`: never the line every
            // push writes). Before sleeping, and after each wake, ask whether anything is
            // queued at all (`tail`): a value pushed behind a cell whose producer has not
            // finished must not leave this worker asleep, since its wake-up may have been
            // spent on a worker that found that cell still empty.
            let mut ready = false;
            let spun = spin_until(spin, || {
                ready = ring.has_ready();
                ready || other()
            });
            if !spun {
                wait_on_marked(&hdr.task_ready, Duration::ZERO, None, mark, || {
                    !ring.is_empty() || other()
                });
            }
            // Queued, but the cell at `head` is not filled yet (`head_unfilled`): give the
            // CPU up rather than loop at full speed, since with a zero spin budget, or with
            // `other()` true (shutdown), nothing else in this loop yields. Not asked when the
            // spin saw the cell filled, the usual case.
            if !ready && ring.head_unfilled() {
                std::thread::yield_now();
            }
            ctl.idle.store(0, Ordering::Relaxed);
            if hdr.shutdown.load(Ordering::Acquire) != 0
                && ring.is_empty()
                && ctl.direct.load(Ordering::Acquire) == 0
            {
                break;
            }
            continue;
        };
        let Some(sh) = slots.get(slot as usize) else {
            // A corrupt index cannot come from our parent; skip it rather than crash.
            ctl.current_slot.store(u32::MAX, Ordering::Relaxed);
            continue;
        };
        // The claim first: it brings the header's line over for writing in one transfer, and
        // the task fields are then read from our own cache.
        let prev = sh.claim(owner_tag);
        // Which task this is: the supervisor compares it with the slot's task id to tell our
        // task from a later one that reused the slot after we published (until it is stored,
        // `current_task == 0` and `current_slot` alone names the slot: see
        // `slot::held_by_dead_worker`).
        let task_id = sh.task_id.load(Ordering::Relaxed);
        ctl.current_task.store(task_id, Ordering::Relaxed);
        failpoint::hit("after_claim");
        let task = Task {
            slot,
            id: task_id,
            sh,
        };
        let retire = if prev & bits::CANCELLED != 0 {
            server.publish(&task, RawOutcome::new(KIND_CANCELLED, wp.seat, 0, 0));
            None
        } else if server.expired(&task, prev) {
            server.publish(&task, RawOutcome::new(KIND_EXPIRED, wp.seat, 0, 0));
            None
        } else if prev & bits::BATCH != 0 {
            server.serve_batch(&mut state, &wctx, &task)
        } else if from_queue && hdr.batch.max.load(Ordering::Relaxed) > 1 {
            server.serve_dynamic(&mut state, &wctx, task, &ring, slots, owner_tag)
        } else {
            server.serve_one(&mut state, &wctx, &task)
        };
        failpoint::hit("after_publish");
        #[cfg(feature = "failpoints")]
        if server.hostile.0 != 0 {
            server.misbehave_after(slot, &ring);
        }
        ctl.tasks_done.fetch_add(1, Ordering::Relaxed);
        // Order matters (see `slot::held_by_dead_worker`): the slot first, then the task id;
        // SeqCst pairs with the supervisor's `hold` handshake (it stores `hold`, then reads
        // `current_task`; we store `current_task`, then read `hold`).
        ctl.current_slot.store(u32::MAX, Ordering::Release);
        ctl.current_task.store(0, Ordering::SeqCst);
        if let Some(kind) = retire {
            // Poisoned, or panicked under the restart policy: the outcome is published; leave
            // without running the state's destructor (it may be what is broken) and let the
            // supervisor start a fresh worker.
            ctl.spawn_kind.store(kind, Ordering::Relaxed);
            ctl.state.store(ctl_state::RETIRING, Ordering::Release);
            std::process::exit(0);
        }
    }
    // The state's destructor is user code: a panic in it ends the process (exit code 1) rather
    // than unwind out of the worker loop.
    if std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || drop(state))).is_err() {
        std::process::exit(1);
    }
    // Unregister the pinned arena before the process (and its mapping) goes away.
    #[cfg(feature = "cuda")]
    drop(pinned);
    ctl.state.store(ctl_state::EXITED, Ordering::Release);
    std::process::exit(0)
}

/// The task being served: its slot, id and header.
pub(super) struct Task<'a> {
    pub(super) slot: u32,
    pub(super) id: u64,
    pub(super) sh: &'a SlotHeader,
}

pub(super) struct Server<'a> {
    pub(super) wp: &'a WorkerProcess,
    pub(super) ctl: &'a WorkerCtl,
    pub(super) results: ByteRing<'a>,
    pub(super) spin: Duration,
    pub(super) restart_on_panic: bool,
    /// Whether this worker's previous dynamic batch was full (see `batch_flags::WHEN_SATURATED`).
    pub(super) last_batch_full: std::cell::Cell<bool>,
    /// Where a small output is serialised first (a slot's inline size, allocated once): one of
    /// at most 8 bytes then goes into the slot header's word, a larger one is copied into the
    /// slot. So the worker writes a slot's data area only for an output that goes there.
    pub(super) scratch: std::cell::RefCell<rkyv::util::AlignedVec<16>>,
    /// Test builds: the hostile mask and its random numbers.
    #[cfg(feature = "failpoints")]
    pub(super) hostile: (u32, failpoint::hostile::Rng),
}

/// What became of one attempt to serialise an output into a region.
enum Encoded {
    /// Written: this many bytes.
    Written(usize),
    /// Did not fit.
    Overflow,
    /// Failed (or panicked); the task was answered with the message.
    Reported,
}

impl Server<'_> {
    /// Runs one task and publishes its outcome. Returns `Some(kind)` if the worker must retire
    /// afterwards (`KIND_POISONED`, or `KIND_PANIC` under the restart-on-panic policy).
    fn serve_one<W: Worker>(
        &self,
        state: &mut W,
        wctx: &WorkerContext,
        t: &Task<'_>,
    ) -> Option<u32> {
        // (`None`: the task was answered BadTask; nothing to retire for.)
        let (task, tctx, inline_from) = self.open::<W::Task>(wctx, t)?;
        match self.run(state, task, &tctx) {
            Ok(out) => {
                self.write_output(t, inline_from, &out);
                recycle(state, out);
                None
            }
            Err((kind, message)) => {
                self.write_message(t, kind, &message);
                self.retires_after(kind)
            }
        }
    }

    /// Runs one task, catching its panic: the output, or the outcome kind (`KIND_ERR`,
    /// `KIND_POISONED`, `KIND_PANIC`) and message.
    fn run<W: Worker>(
        &self,
        state: &mut W,
        task: &rkyv::Archived<W::Task>,
        tctx: &TaskContext<'_>,
    ) -> Result<W::Output, (u32, String)> {
        match catch_unwind(AssertUnwindSafe(|| state.execute(task, tctx))) {
            Ok(Ok(out)) => Ok(out),
            Ok(Err(e)) => Err(error_kind(&*e)),
            Err(p) => Err((KIND_PANIC, panic_message(&*p))),
        }
    }

    /// Waits while a timeout kill is held over this worker (`hold::KILL`): until it lands, or
    /// the supervisor withdraws it. Nothing may start meanwhile: the kill would land on it.
    pub(super) fn wait_out_kill(&self) {
        loop {
            let h = self.ctl.hold.load(Ordering::SeqCst);
            if h & hold::KILL == 0 {
                return;
            }
            crate::sys::futex_wait(&self.ctl.hold, h, Some(Duration::from_millis(10)));
        }
    }

    /// Whether the task has a deadline that has passed (checked just before it would start).
    #[inline]
    pub(super) fn expired(&self, t: &Task<'_>, state: u32) -> bool {
        let d = self.deadline_ns(t, state);
        d != 0 && crate::sys::mono_ns() > d
    }

    /// The task's deadline (`mono_ns`), or 0 for none, given its slot's `state` word.
    #[inline]
    pub(super) fn deadline_ns(&self, t: &Task<'_>, state: u32) -> u64 {
        if state & bits::DEADLINE == 0 {
            return 0;
        }
        self.times(t.slot).deadline_ns.load(Ordering::Relaxed)
    }

    /// The submit time and deadline words of `slot` (an index the caller checked).
    #[inline]
    pub(super) fn times(&self, slot: u32) -> &SlotTimes {
        self.wp.seg.get(self.wp.layout.slot_times_off(slot))
    }

    /// Whether a task outcome of `kind` makes the worker retire: a poisoning, or a panic under
    /// the restart-on-panic policy.
    pub(super) fn retires_after(&self, kind: u32) -> Option<u32> {
        match kind {
            KIND_POISONED => Some(kind),
            KIND_PANIC if self.restart_on_panic => Some(kind),
            _ => None,
        }
    }

    /// Runs a batch: each task in order, each outcome kept (an error or a panic fails only its
    /// own task), published together as one result. If a task poisons the worker, or panics
    /// under the restart-on-panic policy, the rest are answered "not run" and the worker
    /// retires after publishing.
    pub(super) fn serve_batch<W: Worker>(
        &self,
        state: &mut W,
        wctx: &WorkerContext,
        t: &Task<'_>,
    ) -> Option<u32> {
        // (`None`: the task was answered BadTask; nothing to retire for.)
        let (tasks, tctx, inline_from) = self.open::<Vec<W::Task>>(wctx, t)?;
        let mut retire = None;
        let mut outs = Vec::with_capacity(tasks.len());
        for task in tasks.iter() {
            if retire.is_some() {
                outs.push(Err((
                    KIND_CANCELLED,
                    "not run: the worker retired during this batch".to_string(),
                )));
                continue;
            }
            let r = self.run(state, task, &tctx);
            if let Err((kind, _)) = &r {
                retire = self.retires_after(*kind);
            }
            outs.push(r);
        }
        let out: codec::BatchOut<W::Output> = (wctx.index as u32, outs);
        self.write_output(t, inline_from, &out);
        retire
    }

    /// The slot's task archive, validated as `T`, its context, and where an inline result may
    /// start; `None` (with the task answered `BadTask`) if it is out of range or invalid.
    pub(super) fn open<'s, T: crate::Message>(
        &'s self,
        wctx: &'s WorkerContext,
        t: &Task<'_>,
    ) -> Option<(&'s T::Archived, TaskContext<'s>, usize)> {
        let (task_bytes, payload, inline_from) = self.task_bytes(t)?;
        let task = match codec::access::<T>(task_bytes) {
            Ok(a) => a,
            Err(e) => {
                self.write_message(t, KIND_BAD_TASK, &e);
                return None;
            }
        };
        failpoint::hit("mid_read");
        let state = &self.slot_header(t.slot).state;
        let deadline_ns = self.deadline_ns(t, state.load(Ordering::Relaxed));
        let tctx = TaskContext {
            worker: wctx,
            task_id: t.id,
            payload,
            state,
            deadline_ns,
        };
        Some((task, tctx, inline_from))
    }

    /// The header of `slot` (an index the pop returned and the caller checked).
    #[inline]
    fn slot_header(&self, slot: u32) -> &SlotHeader {
        let layout = &self.wp.layout;
        self.wp
            .seg
            .get::<SlotHeader>(layout.slots + slot as usize * size_of::<SlotHeader>())
    }

    /// The task's archive and payload in shared memory, and where an inline result may start;
    /// `None` (with the task answered `BadTask`) if the slot points outside the segment.
    #[inline]
    fn task_bytes(&self, t: &Task<'_>) -> Option<(&[u8], &[u8], usize)> {
        let seg = &self.wp.seg;
        let sh = t.sh;
        let task_off = sh.task_off.load(Ordering::Relaxed) as usize;
        let task_len = sh.task_len.load(Ordering::Relaxed);
        let in_header = task_len & TASK_IN_HEADER != 0;
        let task_len = (task_len & !TASK_IN_HEADER) as usize;
        let pay_off = sh.payload_off.load(Ordering::Relaxed) as usize;
        let pay_len = sh.payload_len.load(Ordering::Relaxed) as usize;
        let in_range =
            |off: usize, len: usize| off.checked_add(len).is_some_and(|e| e <= seg.len());
        let task_ok = if in_header {
            task_len <= WORD_BYTES
        } else {
            in_range(task_off, task_len)
        };
        if !task_ok || !in_range(pay_off, pay_len) {
            self.write_message(t, KIND_BAD_TASK, "task location out of range");
            return None;
        }
        let task_ptr = if in_header {
            // A tiny task is the `task_off` word itself (8 bytes, 16-aligned in the header).
            sh.task_off.as_ptr().cast_const().cast::<u8>()
        } else {
            seg.bytes_ptr(task_off, task_len).cast_const()
        };
        // SAFETY: `task_len` bytes at `task_ptr` lie in the segment (checked above, or within
        // the header word). The slot's task bytes (and payload) were written by the parent
        // before it pushed the slot index (Release) that our pop Acquired; the parent does not
        // touch them until we publish DONE, after our last use of these slices.
        let task_bytes = unsafe { std::slice::from_raw_parts(task_ptr, task_len) };
        // SAFETY: as above, for the loaned payload.
        let payload =
            unsafe { std::slice::from_raw_parts(seg.bytes_ptr(pay_off, pay_len), pay_len) };
        // An inline result goes after the task's own archive (if that is inline too), which
        // must stay intact: a task whose worker dies may be re-run from it.
        let inline_from = if !in_header && task_off == self.wp.layout.slot_data_off(t.slot) {
            task_len.next_multiple_of(16)
        } else {
            0
        };
        Some((task_bytes, payload, inline_from))
    }

    /// Reserves `len` data bytes in the completion ring, waiting for room if needed. While it
    /// waits it flags `wants_space` and rings the parent's doorbell: the reactor then moves
    /// results nobody has collected yet out of the ring, so the wait never depends on a caller
    /// collecting (the caller may be the one waiting for *this* result). `None` if `len` can
    /// never fit.
    fn reserve(&self, len: u64) -> Option<Reservation> {
        let hdr = self.wp.header();
        match self.results.try_reserve(len) {
            Ok(Some(r)) => return Some(r),
            Ok(None) => {}
            Err(()) => return None,
        }
        loop {
            self.ctl.wants_space.store(1, Ordering::SeqCst);
            hdr.doorbell.notify_all();
            let mut got = None;
            let mark = Some((&self.ctl.parked, parked::SPACE));
            // Bounded: the reactor clears `wants_space` after each pass; if that pass could not
            // make room (a caller was copying a record out), we ask again.
            let _ = wait_on_marked(
                &hdr.space,
                self.spin,
                Some(std::time::Instant::now() + Duration::from_millis(50)),
                mark,
                || {
                    if let Ok(Some(r)) = self.results.try_reserve(len) {
                        got = Some(r);
                        return true;
                    }
                    self.ctl.wants_space.load(Ordering::SeqCst) == 0
                },
            );
            if got.is_some() {
                self.ctl.wants_space.store(0, Ordering::Relaxed);
                return got;
            }
        }
    }

    /// Serialises `out` into `cap` bytes at `ptr`, answering the task with the message if
    /// serialisation fails or panics.
    fn encode_or_report<T: crate::Message>(
        &self,
        t: &Task<'_>,
        out: &T,
        ptr: *mut u8,
        cap: usize,
    ) -> Encoded {
        // SAFETY: the callers pass a region this worker owns right now: its private scratch
        // buffer, or a reservation in its own completion ring.
        match catch_unwind(AssertUnwindSafe(|| unsafe {
            codec::encode_into(out, ptr, cap)
        })) {
            Ok(Ok(n)) => Encoded::Written(n),
            Ok(Err(EncodeError::Overflow)) => Encoded::Overflow,
            Ok(Err(EncodeError::Failed(m))) => {
                self.write_message(t, KIND_ERR, &format!("cannot serialise output: {m}"));
                Encoded::Reported
            }
            Err(p) => {
                self.write_message(t, KIND_PANIC, &panic_message(&*p));
                Encoded::Reported
            }
        }
    }

    pub(super) fn write_output<T: crate::Message>(
        &self,
        t: &Task<'_>,
        inline_from: usize,
        out: &T,
    ) {
        // A plain number: rkyv's bytes without rkyv's serialiser (`codec::plain`), into the
        // header word as a tiny output below would go.
        if let Some(w) = codec::plain::archive(out) {
            self.publish_word(t, w.bytes, w.len);
            return;
        }
        // Fastest path: a small output, serialised in the scratch buffer, then either the
        // slot header's `rec` word (at most 8 bytes: it travels in the header's own line, which
        // the parent reads anyway to see DONE) or the task's own slot, after the task archive.
        let layout = &self.wp.layout;
        let cap = (layout.params.slot_inline as usize).saturating_sub(inline_from);
        let mut scratch = self.scratch.borrow_mut();
        scratch.reserve(cap);
        let src = scratch.as_mut_ptr();
        match self.encode_or_report(t, out, src, cap) {
            Encoded::Written(n) if n <= WORD_BYTES => {
                let mut word = [0u8; WORD_BYTES];
                // SAFETY: `n <= WORD_BYTES` bytes were just written at `src` (our scratch);
                // `word` is ours. (A full word, the common case, as a constant-size copy: one
                // load and one store, where a variable length calls `memcpy`.)
                unsafe {
                    if n == WORD_BYTES {
                        std::ptr::copy_nonoverlapping(src, word.as_mut_ptr(), WORD_BYTES)
                    } else {
                        std::ptr::copy_nonoverlapping(src, word.as_mut_ptr(), n)
                    }
                };
                self.publish_word(t, word, n);
                return;
            }
            Encoded::Written(n) => {
                let dst = self
                    .wp
                    .seg
                    .bytes_ptr(layout.slot_data_off(t.slot) + inline_from, cap);
                // SAFETY: `n <= cap` bytes written at `src` (our scratch); `dst` is this task's
                // slot data area past the task archive, `cap` bytes inside the segment, which
                // this worker owns until it publishes. The two never overlap.
                unsafe { std::ptr::copy_nonoverlapping(src, dst, n) };
                let rec = REC_INLINE | inline_from as u64;
                self.publish(t, RawOutcome::new(KIND_OK, self.wp.seat, rec, n as u32));
                return;
            }
            Encoded::Reported => return,
            Encoded::Overflow => {}
        }
        drop(scratch);
        // Fast path: serialise straight into whatever contiguous room the ring has now (never
        // more than the bound every path enforces, `max_record_len`).
        if let Ok(Some(r)) = self.results.try_reserve(0) {
            let room = self.results.contiguous_room(&r) as usize;
            if room > 0 {
                let ptr = self.results.data_ptr(&r);
                match self.encode_or_report(t, out, ptr, room) {
                    Encoded::Written(n) => {
                        let r = r.with_len(n as u64);
                        self.commit_and_publish(t, r, n as u64, KIND_OK);
                        return;
                    }
                    Encoded::Reported => return,
                    Encoded::Overflow => {}
                }
            }
        }
        // Slow path: measure, wait for exactly that much room, write.
        let len = match catch_unwind(AssertUnwindSafe(|| codec::encoded_len(out))) {
            Ok(Ok(n)) => n as u64,
            Ok(Err(e)) => {
                let m = match e {
                    EncodeError::Failed(m) => m,
                    EncodeError::Overflow => "overflow while counting".into(),
                };
                self.write_message(t, KIND_ERR, &format!("cannot serialise output: {m}"));
                return;
            }
            Err(p) => {
                self.write_message(t, KIND_PANIC, &panic_message(&*p));
                return;
            }
        };
        if len > self.results.max_record_len() {
            self.write_bytes(t, KIND_TOO_LARGE, &len.to_le_bytes());
            return;
        }
        let r = self.reserve(len).expect("checked against max_record_len");
        let ptr = self.results.data_ptr(&r);
        match self.encode_or_report(t, out, ptr, len as usize) {
            Encoded::Written(n) => self.commit_and_publish(t, r, n as u64, KIND_OK),
            Encoded::Reported => {}
            Encoded::Overflow => {
                self.write_message(t, KIND_ERR, "output changed size while serialising")
            }
        }
    }

    /// Publishes an output of `len <= 8` bytes in the slot header's `rec` word (the parent
    /// reads it from the outcome words it copies anyway).
    #[inline]
    fn publish_word(&self, t: &Task<'_>, word: [u8; WORD_BYTES], len: usize) {
        let rec = u64::from_ne_bytes(word);
        let o = RawOutcome::new(KIND_OK, self.wp.seat, rec, len as u32 | LEN_IN_HEADER);
        self.publish(t, o);
    }

    pub(super) fn write_message(&self, t: &Task<'_>, kind: u32, msg: &str) {
        let max = (self.results.max_record_len() as usize).min(64 * 1024);
        let mut end = msg.len().min(max);
        while !msg.is_char_boundary(end) {
            end -= 1;
        }
        self.write_bytes(t, kind, &msg.as_bytes()[..end]);
    }

    fn write_bytes(&self, t: &Task<'_>, kind: u32, bytes: &[u8]) {
        let r = self
            .reserve(bytes.len() as u64)
            .expect("small records always fit the ring");
        // SAFETY: the reservation gives us `bytes.len()` writable bytes in our own ring.
        unsafe {
            std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.results.data_ptr(&r), bytes.len())
        };
        self.commit_and_publish(t, r, bytes.len() as u64, kind);
    }

    /// Publishes a written ring record (its header names the slot and task), then the outcome.
    fn commit_and_publish(&self, t: &Task<'_>, r: Reservation, len: u64, kind: u32) {
        let off = self.results.commit(r, len, kind, t.slot, t.id);
        self.publish(t, RawOutcome::new(kind, self.wp.seat, off, len as u32));
    }

    /// Publishes the outcome in the slot and wakes whoever waits for it.
    #[inline]
    pub(super) fn publish(&self, t: &Task<'_>, o: RawOutcome) {
        failpoint::hit("after_result_write");
        #[cfg(feature = "failpoints")]
        let o = if self.hostile.0 != 0 {
            self.maybe_lie(o)
        } else {
            o
        };
        t.sh.publish(o).run(t.sh, &self.wp.header().doorbell);
    }

    /// Test builds: a hostile worker's lie about its outcome (`hostile::LIE`).
    #[cfg(feature = "failpoints")]
    #[cold]
    fn maybe_lie(&self, o: RawOutcome) -> RawOutcome {
        use failpoint::hostile;
        let (mask, rng) = &self.hostile;
        if mask & hostile::LIE == 0 || rng.next() % 2 == 0 {
            return o;
        }
        let r = rng.next();
        let n_seats = self.wp.layout.params.max_workers as u64;
        RawOutcome::new(
            (r % 14) as u32,
            if r & 0x100 != 0 {
                (r >> 9) as u32 % (n_seats as u32 + 1)
            } else {
                rng.next() as u32
            },
            match r >> 60 {
                0..=5 => rng.next() & !31 & (self.wp.layout.params.result_ring - 1),
                6..=9 => REC_INLINE | (rng.next() % 2048),
                _ => rng.next(),
            },
            match (r >> 9) & 3 {
                0 | 1 => (rng.next() % 4096) as u32,
                // A result "in the header", of any claimed length.
                2 => LEN_IN_HEADER | (rng.next() % 16) as u32,
                _ => rng.next() as u32,
            },
        )
    }

    /// Test builds: what a hostile worker does after a task (see `failpoint::hostile`).
    #[cfg(feature = "failpoints")]
    #[cold]
    fn misbehave_after(&self, slot: u32, queue: &MpmcRing<'_>) {
        let t = Task {
            slot,
            id: 0,
            sh: self.slot_header(slot),
        };
        use failpoint::hostile;
        // (Called only for a hostile worker: the caller checked the mask.)
        let (mask, rng) = &self.hostile;
        if mask & hostile::REWRITE != 0 {
            let layout = &self.wp.layout;
            let cap = layout.params.slot_inline as usize;
            let p = self.wp.seg.bytes_ptr(layout.slot_data_off(t.slot), cap);
            for i in (0..cap).step_by(8) {
                // SAFETY: inside this slot's data area (test-only scribbling; the parent must
                // cope with it).
                unsafe { p.add(i).cast::<u64>().write_unaligned(rng.next()) };
            }
            t.sh.result_len.store(rng.next() as u32, Ordering::Relaxed);
            t.sh.result_rec.store(rng.next(), Ordering::Relaxed);
        }
        if mask & hostile::COUNTERS != 0 && rng.next() % 3 == 0 {
            self.results.scribble_counters(rng.next(), rng.next());
        }
        if mask & hostile::RECORDS != 0 {
            self.results.scribble_records(|| rng.next());
        }
        if mask & hostile::CELLS != 0 && rng.next() % 8 == 0 {
            queue.scribble(rng.next(), rng.next());
        }
        if mask & hostile::CLAIMS != 0 {
            // The batch block too: forged held entries (other seats' slots, live task ids
            // among them), a forged `started`, garbage counters.
            let bc = self.batch_ctl();
            for k in 0..4 {
                let e = (rng.next() as usize) % bc.held_slots.len();
                bc.held_slots[e].store(rng.next() as u32 % 64, Ordering::Relaxed);
                bc.held_tasks[e].store(rng.next() % 64, Ordering::Relaxed);
                let _ = k;
            }
            bc.started.store(rng.next() as u32 & 1, Ordering::Relaxed);
            bc.batches.store(rng.next(), Ordering::Relaxed);
            bc.size_hist[(rng.next() % 8) as usize].store(rng.next(), Ordering::Relaxed);
            bc.max_queue_ns.store(rng.next(), Ordering::Relaxed);
            self.ctl.claim.store(rng.next() % 64, Ordering::Relaxed);
            self.ctl
                .current_slot
                .store(rng.next() as u32 % 64, Ordering::Relaxed);
            self.ctl
                .current_task
                .store(rng.next() % 64, Ordering::Relaxed);
        }
    }
}
