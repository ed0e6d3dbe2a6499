//! [`Pool`]: spawn stateful workers once, execute many tasks, from any number of threads or
//! async tasks.

pub(crate) mod arena;
pub(crate) mod batching;
pub(crate) mod builder;
pub(crate) mod events;
pub(crate) mod handle;
pub(crate) mod map;
pub(crate) mod options;
pub(crate) mod reactor;
pub(crate) mod results;
pub(crate) mod shared;
pub(crate) mod slots;
pub(crate) mod submit;
pub(crate) mod supervisor;

use self::arena::Block;
use self::builder::Config;
use self::events::{PoolStats, WorkerInfo};
use self::handle::{Loan, SpawnHandle, SpawnReply, TaskHandle};
use self::options::{SpawnOptions, TaskOptions};
use self::reactor::reactor_loop;
use self::shared::Shared;
use self::submit::{Submit, SubmitBatch};
use self::supervisor::{ReplyGuard, SupMsg, supervisor_loop};
use crate::codec::{self, ArchivesAs};
use crate::error::{BuildError, SpawnError, SubmitError, TaskError, WorkerError};
use crate::shm::layout::{FLAG_RESTART_ON_PANIC, Layout, Params};
use crate::worker::Worker;
use crate::worker::boot::{BOOT_ENV, Boot, RingReserve, entry_offset, fingerprint, protocol_hash};
use std::marker::PhantomData;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Sender, channel};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// How [`Pool::stop`] treats queued tasks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum StopMode {
    /// Workers finish every queued task first.
    Graceful,
    /// Queued tasks fail with `Cancelled`; running tasks finish.
    Immediate,
    /// Queued tasks fail with `Cancelled`; workers still running a task are killed at once
    /// (the task fails with `Cancelled`).
    Abort,
}

/// A pool of stateful worker processes of type `W`.
///
/// `Pool` is `Send + Sync`: share it by reference (scoped threads) or in an `Arc`. Dropping it
/// (or calling [`shutdown`](Self::shutdown)) stops new submissions, lets the workers finish
/// every task already queued, then stops them (killing any still running after the shutdown
/// timeout); [`shutdown_now`](Self::shutdown_now) cancels the queued tasks instead. Tasks left
/// with no live worker to run them complete with [`TaskError::Cancelled`]. Handles outlive the
/// pool: results computed before shutdown can still be collected.
///
/// # Faults
///
/// A worker process that dies (killed, crashed, `exit`ed, killed for a task past its timeout)
/// is noticed at once (the kernel's process-exit notification), the one task it was running
/// fails with [`TaskError::WorkerDied`] naming the worker, its pid and the signal or exit code
/// (or is re-run, for tasks submitted with retries), every other task is unaffected, and the
/// worker is restarted with the same spawn arguments under the
/// [`RestartPolicy`](crate::RestartPolicy). See [`stats`](Self::stats),
/// [`workers`](Self::workers) and [`PoolBuilder::on_event`](crate::PoolBuilder::on_event).
///
/// A program that uses a pool must call [`init`](crate::init) first thing in `main` (tests and
/// benches use [`worker_hook!`](crate::worker_hook) instead): workers are this same program,
/// re-executed, and `init` is where they branch off into serving.
#[derive(Debug)]
pub struct Pool<W: Worker> {
    shared: Arc<Shared>,
    sup_tx: Sender<SupMsg>,
    threads: Mutex<Vec<JoinHandle<()>>>,
    /// Serialises broadcasts: a worker has one offer word, free again once each broadcast has
    /// been answered.
    broadcasting: Mutex<()>,
    /// Set (and notified) when the shutdown sequence has finished.
    stopped: (Mutex<bool>, std::sync::Condvar),
    _w: PhantomData<fn() -> W>,
}

impl<W: Worker> Pool<W> {
    /// A builder to configure the pool.
    pub fn builder() -> builder::PoolBuilder<W> {
        builder::PoolBuilder::new()
    }

    /// A pool with the default settings.
    pub fn new() -> Result<Self, BuildError> {
        Self::builder().build()
    }

    pub(crate) fn from_config(cfg: Config) -> Result<Self, BuildError> {
        if std::env::var_os(BOOT_ENV).is_some() {
            return Err(BuildError::InsideWorker);
        }
        if crate::sys::child_exits_unwatched() {
            // Children would be reaped by the kernel behind our back: a worker's pid could be
            // reused before we look at it, and its exit status would be lost.
            return Err(BuildError::InvalidConfig(
                "SIGCHLD is ignored (SIG_IGN or SA_NOCLDWAIT) in this process: the pool must \
                 reap its workers itself"
                    .into(),
            ));
        }
        let bad = |m: &str| Err(BuildError::InvalidConfig(m.to_string()));
        if cfg.queue_size == 0 || cfg.queue_size > (1 << 24) {
            return bad("queue_size must be in 1..=16777216");
        }
        if cfg.max_workers == 0 || cfg.max_workers > 4096 {
            return bad("max_workers must be in 1..=4096");
        }
        if cfg.result_ring_bytes < 4096 || cfg.result_ring_bytes > (1 << 32) {
            return bad("result_ring_bytes must be in 4 KiB..=4 GiB");
        }
        if cfg.spawn_area_bytes < 256 || cfg.spawn_area_bytes > (1 << 30) {
            return bad("spawn_area_bytes must be in 256..=1 GiB");
        }
        if cfg.slot_bytes > (1 << 24) {
            return bad("slot_bytes must be at most 16 MiB");
        }
        if let Some((k, _)) = cfg
            .worker_env
            .iter()
            .find(|(k, v)| !crate::process::env_var_ok(k, v))
        {
            return Err(BuildError::InvalidConfig(format!(
                "worker_env {k:?}: a name must be non-empty with no '=' or NUL, a value \
                 without NUL"
            )));
        }
        let up64 = |n: usize| n.div_ceil(64) * 64;
        let params = Params {
            n_slots: cfg.queue_size as u32,
            slot_inline: up64(cfg.slot_bytes.max(64)) as u32,
            max_workers: cfg.max_workers as u32,
            spawn_area: up64(cfg.spawn_area_bytes) as u32,
            result_ring: up64(cfg.result_ring_bytes) as u64,
            arena: (cfg.arena_bytes / 64 * 64) as u64,
        };
        // A task fits either its slot's inline area or an arena block: the largest one that
        // can be accepted at all is the larger of the two, and a limit the caller set holds
        // below it for every task, inline ones included.
        let largest_fit = (params.arena as usize).max(params.slot_inline as usize);
        let max_task_bytes = cfg
            .max_task_bytes
            .unwrap_or(largest_fit)
            .min(largest_fit)
            // Below bit 31 of the slot's `task_len`, which marks a task in the header word.
            .min(crate::slot::TASK_IN_HEADER as usize - 1);
        let Some(layout) = Layout::new(params) else {
            return bad("sizes overflow");
        };
        let bytes = layout.total as u64;
        if cfg.reserve_memory {
            if let Some(avail) = crate::sys::memory_available() {
                if bytes > avail {
                    return Err(BuildError::NoSpace {
                        bytes,
                        available: Some(avail),
                    });
                }
            }
        }
        let init = crate::shm::init::HeaderInit {
            protocol_hash: protocol_hash::<W>(),
            worker_spin_ns: cfg.worker_wait.spin().as_nanos().min(u64::MAX as u128) as u64,
            flags: if cfg.restart_on_panic {
                FLAG_RESTART_ON_PANIC
            } else {
                0
            },
        };
        let seg =
            crate::shm::init::create(&layout, init, cfg.reserve_memory).map_err(|e| {
                match e.raw_os_error() {
                    Some(libc::ENOSPC) | Some(libc::ENOMEM) | Some(libc::EFBIG) => {
                        BuildError::NoSpace {
                            bytes,
                            available: None,
                        }
                    }
                    _ => BuildError::Shm(e),
                }
            })?;
        let wake = crate::sys::eventfd().map_err(BuildError::Shm)?;

        let program = match &cfg.program {
            // Resolved now, against the current directory (never through PATH: an unrelated
            // program found there would be handed the segment). One that does not exist (yet)
            // is the spawn's error (`SpawnError::Launch`, naming it), as any program that
            // cannot start.
            Some(p) => std::fs::canonicalize(p)
                .or_else(|_| std::path::absolute(p))
                .map_err(|e| {
                    BuildError::InvalidConfig(format!("worker program {}: {e}", p.display()))
                })?,
            None => crate::process::current_program(),
        };
        cfg.batch.check()?;
        cfg.batch.store(seg.get(0));
        let shared = Arc::new(Shared::new(seg, layout, cfg, max_task_bytes, wake));
        let (tx, rx) = channel();
        let mut threads = Vec::new();
        let s = shared.clone();
        threads.push(
            std::thread::Builder::new()
                .name("stateful-pool-supervisor".into())
                .spawn(move || supervisor_loop(s, rx, program))
                .map_err(BuildError::Thread)?,
        );
        let s = shared.clone();
        match std::thread::Builder::new()
            .name("stateful-pool-reactor".into())
            .spawn(move || reactor_loop(s))
        {
            Ok(t) => threads.push(t),
            Err(e) => {
                let (done, _) = channel();
                let _ = tx.send(SupMsg::Shutdown {
                    immediate: true,
                    kill: false,
                    grace: shared.cfg.shutdown_timeout,
                    busy_grace: None,
                    done,
                });
                shared.wake_supervisor();
                for t in threads {
                    let _ = t.join();
                }
                return Err(BuildError::Thread(e));
            }
        }
        Ok(Pool {
            shared,
            sup_tx: tx,
            threads: Mutex::new(threads),
            broadcasting: Mutex::new(()),
            stopped: (Mutex::new(false), std::sync::Condvar::new()),
            _w: PhantomData,
        })
    }

    // ---- spawning ----

    /// Starts a worker process with `args` and blocks until its spawn step returned; gives
    /// back the spawn step's value.
    pub fn spawn(&self, args: &W::SpawnArgs) -> Result<W::SpawnOutput, SpawnError> {
        self.submit_spawn(args)?.wait()
    }

    /// Starts a worker process with `args`; returns at once with a handle to wait on (or
    /// `.await`). Several workers started this way start concurrently.
    pub fn submit_spawn(
        &self,
        args: &W::SpawnArgs,
    ) -> Result<SpawnHandle<W::SpawnOutput>, SpawnError> {
        self.submit_spawn_with(args, &SpawnOptions::default())
    }

    /// Starts a worker process with `args` and per-worker [`SpawnOptions`] (its GPUs, extra
    /// environment), and blocks until its spawn step returned. With the `cuda` feature, the
    /// worker's CUDA contexts are created in its own process before its spawn step; a machine
    /// without a driver or without the GPU fails the spawn with a message saying so.
    pub fn spawn_with(
        &self,
        args: &W::SpawnArgs,
        opts: &SpawnOptions,
    ) -> Result<W::SpawnOutput, SpawnError> {
        self.submit_spawn_with(args, opts)?.wait()
    }

    /// As [`spawn_with`](Self::spawn_with), returning a handle at once.
    pub fn submit_spawn_with(
        &self,
        args: &W::SpawnArgs,
        opts: &SpawnOptions,
    ) -> Result<SpawnHandle<W::SpawnOutput>, SpawnError> {
        let shared = &self.shared;
        if shared.closing.load(Ordering::SeqCst) {
            return Err(SpawnError::Shutdown);
        }
        let cap = shared.layout.params.spawn_area as usize;
        let len = codec::encoded_len(args).map_err(|e| SpawnError::Encode(e.message()))?;
        if len > cap {
            return Err(SpawnError::ArgsTooLarge { len, max: cap });
        }
        let mut buf = vec![0u8; len];
        // SAFETY: `buf` is our own, `len` bytes long.
        unsafe { codec::encode_into_private(args, buf.as_mut_ptr(), len) }
            .map_err(|e| SpawnError::Encode(e.message()))?;
        opts.check_cpus()?;
        if cfg!(feature = "cuda") && !opts.gpus.is_empty() {
            // A GPU worker pins the whole payload arena (registering it touches every page):
            // reserve it all first, so a shortage is this error, not a SIGBUS in the worker.
            let end = shared.layout.arena as u64 + shared.layout.params.arena;
            shared
                .reserve_arena(end)
                .map_err(|source| SpawnError::NoSpace {
                    bytes: shared.layout.params.arena,
                    source,
                })?;
        }
        self.submit_spawn_archived(buf, opts.process_env())
    }

    /// Starts a worker from archived spawn arguments and its environment.
    fn submit_spawn_archived(
        &self,
        buf: Vec<u8>,
        env: Vec<(String, String)>,
    ) -> Result<SpawnHandle<W::SpawnOutput>, SpawnError> {
        let shared = &self.shared;
        if shared.closing.load(Ordering::SeqCst) {
            return Err(SpawnError::Shutdown);
        }
        let seat = {
            let mut seats = shared.lock_seats();
            // A free seat that is not a failed one first: a failed seat may be waiting for its
            // revival (`PoolBuilder::revive_failed_after`), which a spawn into it replaces.
            let Some(i) = seats
                .iter()
                .position(|s| !s.in_use && s.state != events::WorkerState::Failed)
                .or_else(|| seats.iter().position(|s| !s.in_use))
            else {
                return Err(SpawnError::NoCapacity { max: seats.len() });
            };
            shared.set_seat_in_use(&mut seats, i, true);
            seats[i].spawned_with = Some((buf.clone(), env.clone()));
            i as u32
        };
        let reply = Arc::new(SpawnReply::default());
        let boot = Boot {
            seat,
            parent_pid: std::process::id(),
            entry: entry_offset::<W>(),
            fingerprint: fingerprint(),
            // Decided by the supervisor at each launch (`Shared::ring_reserve`).
            reserve_ring: RingReserve::No,
        };
        let sent = self.sup_tx.send(SupMsg::Launch {
            seat,
            args: buf,
            boot,
            env,
            reply: ReplyGuard::new(reply.clone()),
        });
        if sent.is_err() {
            shared.set_seat_in_use(&mut shared.lock_seats(), seat as usize, false);
            return Err(SpawnError::Shutdown);
        }
        shared.wake_supervisor();
        Ok(SpawnHandle {
            reply,
            seat: seat as usize,
            _o: PhantomData,
        })
    }

    /// Runs `task` once on every serving worker (reload weights, change a setting, clear a
    /// cache) and returns each worker's outcome by its index. Each worker runs it before the
    /// next task it would take from the queue (after the one it is running, if any). A worker
    /// that dies before answering gives `WorkerDied` (never a retry: a broadcast is for that
    /// worker); one that leaves without taking it gives `Cancelled`. Blocks until every worker
    /// has answered; concurrent broadcasts run one after the other.
    pub fn broadcast<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Vec<(usize, Result<W::Output, TaskError>)> {
        let _one = self.broadcasting.lock().unwrap_or_else(|e| e.into_inner());
        let serving: Vec<usize> = self
            .shared
            .lock_seats()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.in_use && s.state == events::WorkerState::Ready)
            .map(|(i, _)| i)
            .collect();
        let enc = task.enc();
        let mut sent: std::collections::VecDeque<(usize, TaskHandle<W::Output>)> =
            Default::default();
        let mut out = Vec::with_capacity(serving.len());
        for i in serving {
            let opts = TaskOptions {
                target: Some(i as u32),
                retries: Some(0),
                ..TaskOptions::default()
            };
            // Each offer holds a slot until it is collected: with no slot free, collect an
            // earlier offer (each runs before its worker's next queued task, so it finishes)
            // rather than wait for a slot that only this call could free. With none of ours
            // outstanding, waiting is safe.
            let r = loop {
                let block = if sent.is_empty() {
                    Block::Until(None)
                } else {
                    Block::No
                };
                match self.send(&enc, &mut None, block, opts) {
                    Err(SubmitError::QueueFull) if !sent.is_empty() => {
                        let (j, h) = sent.pop_front().expect("not empty");
                        out.push((j, h.wait()));
                    }
                    r => break r,
                }
            };
            match r {
                Ok((slot, id)) => {
                    let h = TaskHandle::new(self.shared.clone(), slot, id);
                    self.shared.confirm_offer(i as u32, h.slot());
                    sent.push_back((i, h));
                }
                Err(e) => out.push((i, Err(TaskError::from(e)))),
            }
        }
        out.extend(sent.into_iter().map(|(i, h)| (i, h.wait())));
        out.sort_by_key(|&(i, _)| i);
        out
    }

    /// Retires worker `index` (scale down): it finishes the task it is running, takes no
    /// other, runs its state's destructor and exits; its seat is freed, not restarted. Tasks
    /// queued go to the other workers (if it was the last one, they fail with `NoWorkers`, as
    /// new submits do). Blocks until the worker is gone; one that does not finish its task
    /// within the pool's shutdown timeout is killed (that task is answered `Cancelled`). A
    /// seat waiting to restart, or starting up again (a restart, or a revival), is freed at
    /// once; a failed seat waiting for its revival
    /// ([`PoolBuilder::revive_failed_after`](crate::PoolBuilder::revive_failed_after)) answers
    /// `Ok` and is not revived. Any other seat with no worker answers `NoSuchWorker`.
    pub fn retire_worker(&self, index: usize) -> Result<(), WorkerError> {
        if self.is_closing() {
            return Err(WorkerError::Shutdown);
        }
        if index >= self.shared.n_seats() as usize {
            return Err(WorkerError::NoSuchWorker { index });
        }
        let (done, gone) = channel();
        if self
            .sup_tx
            .send(SupMsg::Retire {
                seat: index as u32,
                done,
            })
            .is_err()
        {
            return Err(WorkerError::Shutdown);
        }
        self.shared.wake_supervisor();
        match gone.recv() {
            Ok(true) => Ok(()),
            Ok(false) => Err(WorkerError::NoSuchWorker { index }),
            Err(_) => Err(WorkerError::Shutdown),
        }
    }

    /// Replaces worker `index` with a fresh one started from the same spawn arguments and
    /// options (a rolling restart: reload a model, recover from a slow leak): the new worker
    /// is started in a free seat and serves before the old one is retired
    /// ([`retire_worker`](Self::retire_worker)), so the pool never serves with one worker
    /// fewer and no task is lost. Needs a free seat (`PoolBuilder::max_workers`). Returns the
    /// new worker's spawn output; if it cannot start, the old worker keeps serving.
    pub fn replace_worker(&self, index: usize) -> Result<W::SpawnOutput, WorkerError> {
        if self.is_closing() {
            return Err(WorkerError::Shutdown);
        }
        let spawned_with = {
            let seats = self.shared.lock_seats();
            match seats.get(index) {
                Some(s) if s.in_use && s.state == events::WorkerState::Ready => {
                    s.spawned_with.clone()
                }
                _ => None,
            }
        };
        let Some((args, env)) = spawned_with else {
            return Err(WorkerError::NoSuchWorker { index });
        };
        let out = self.submit_spawn_archived(args, env)?.wait()?;
        match self.retire_worker(index) {
            // The old worker left on its own meanwhile (died, retired): replaced all the same.
            Ok(()) | Err(WorkerError::NoSuchWorker { .. }) => Ok(out),
            Err(e) => Err(e),
        }
    }

    /// Starts a worker; the future resolves to its spawn output. Works on any executor.
    pub async fn spawn_async(&self, args: &W::SpawnArgs) -> Result<W::SpawnOutput, SpawnError> {
        self.submit_spawn(args)?.await
    }

    /// Starts one worker per element of `args` (one set of spawn arguments per worker, e.g.
    /// its GPU ids), concurrently, and waits for all of them. Returns each spawn's outcome in
    /// order. For one shared set of arguments, see [`spawn_n`](Self::spawn_n).
    pub fn spawn_many<'a>(
        &self,
        args: impl IntoIterator<Item = &'a W::SpawnArgs>,
    ) -> Vec<Result<W::SpawnOutput, SpawnError>> {
        let handles: Vec<_> = args.into_iter().map(|a| self.submit_spawn(a)).collect();
        handles
            .into_iter()
            .map(|h| h.and_then(|h| h.wait()))
            .collect()
    }

    /// Starts `n` workers with the same `args`, concurrently, and waits for all of them.
    /// Returns each spawn's outcome (by the order they were started).
    pub fn spawn_n(
        &self,
        args: &W::SpawnArgs,
        n: usize,
    ) -> Vec<Result<W::SpawnOutput, SpawnError>> {
        self.spawn_many(std::iter::repeat_n(args, n))
    }

    /// Number of workers whose spawn step has finished and that are serving.
    pub fn num_workers(&self) -> usize {
        self.shared
            .lock_seats()
            .iter()
            .filter(|s| s.state == events::WorkerState::Ready)
            .count()
    }

    /// Process ids of the serving workers, by seat (seats recorded as
    /// [`Ready`](crate::WorkerState::Ready): a restarted worker may serve a moment before it is
    /// listed, see [`WorkerState::Starting`](crate::WorkerState::Starting)).
    pub fn worker_pids(&self) -> Vec<(usize, u32)> {
        self.shared
            .lock_seats()
            .iter()
            .enumerate()
            .filter(|(_, s)| s.state == events::WorkerState::Ready)
            .map(|(i, s)| (i, s.pid))
            .collect()
    }

    /// Tasks each worker seat's current process has completed so far (index = seat): one
    /// entry per seat up to [`PoolBuilder::max_workers`](crate::PoolBuilder::max_workers),
    /// 0 for a seat never used.
    pub fn tasks_done_per_worker(&self) -> Vec<u64> {
        (0..self.shared.layout.params.max_workers)
            .map(|i| self.shared.ctl(i).tasks_done.load(Ordering::Relaxed))
            .collect()
    }

    /// Every worker seat that was ever used: state, pid, lives, restarts (a snapshot).
    pub fn workers(&self) -> Vec<WorkerInfo> {
        let seats = self.shared.lock_seats().clone();
        seats
            .into_iter()
            .enumerate()
            .filter(|(_, s)| s.in_use || s.state != events::WorkerState::Empty)
            .map(|(i, s)| {
                let ctl = self.shared.ctl(i as u32);
                WorkerInfo {
                    index: i,
                    state: s.state,
                    pid: s.pid,
                    generation: ctl.generation.load(Ordering::Relaxed),
                    restarts: s.restarts,
                    tasks_done: ctl.tasks_done.load(Ordering::Relaxed),
                }
            })
            .collect()
    }

    /// Counters of worker deaths, restarts, failed seats, and tasks that died, timed out or
    /// were retried.
    pub fn stats(&self) -> PoolStats {
        let mut s = self.shared.stats.snapshot();
        s.batching = self.batch_stats();
        s
    }

    /// Test hook (feature `failpoints`, not an API): the sleepers counted on the segment's
    /// `task_ready` and `space` eventcounts.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __sleepers(&self) -> (u32, u32) {
        let h = self.shared.header();
        (h.task_ready.sleepers(), h.space.sleepers())
    }

    /// Test hook (feature `failpoints`, not an API): whether the reactor sleeps with no
    /// periodic look (nothing in flight when it last looked, and no submit since).
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __reactor_sleeps_untimed(&self) -> bool {
        self.shared.reactor_untimed.load(Ordering::SeqCst)
    }

    /// Test hook (feature `failpoints`, not an API): what a hostile worker can do to the
    /// doorbell: zero its sleeper count (no publish or request for room wakes the reactor
    /// through it) and put its futex word back to `epoch` (a sleep on it misses wake-ups).
    /// Returns the word's value before.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __tamper_with_doorbell(&self, epoch: Option<u32>) -> u32 {
        self.shared.header().doorbell.tamper_for_tests(epoch)
    }

    /// Test hook (feature `failpoints`, not an API): bytes of memory the segment holds now,
    /// and the size of one seat's completion ring.
    #[cfg(feature = "failpoints")]
    #[doc(hidden)]
    pub fn __segment_memory(&self) -> (u64, u64) {
        let meta = std::fs::File::from(
            self.shared
                .seg
                .fd()
                .try_clone_to_owned()
                .expect("duplicate the segment fd"),
        )
        .metadata()
        .expect("stat the segment");
        use std::os::unix::fs::MetadataExt;
        (
            meta.blocks() * 512,
            self.shared.layout.result_ring_stride as u64,
        )
    }

    // ---- tasks ----

    /// A request to run `task`, to configure (timeout, retries, payload) and send with one of
    /// its verbs: `submit`, `try_submit`, `submit_timeout`, `submit_async`, `execute`,
    /// `execute_async` (see [`Submit`]). The task may be a `&W::Task` or a borrowed form
    /// that archives the same ([`ArchivesAs`]: a `&str` for a `String` task, a `&[u8]` for a
    /// `Vec<u8>` one).
    pub fn task<'p, 'a, A: ?Sized + ArchivesAs<W::Task>>(
        &'p self,
        task: &'a A,
    ) -> Submit<'p, 'a, W, A> {
        Submit::new(self, task)
    }

    /// A request to run `tasks` as one batch: one slot, one queue hand-off and one answer
    /// holding each task's outcome, so tiny tasks cost far less each; an error fails only its
    /// own task, and so does a panic while the worker keeps serving after panics (the
    /// default). A task that makes the worker leave (a [`Poisoned`](crate::Poisoned) error,
    /// or a panic under
    /// [`PoolBuilder::restart_on_panic`](crate::PoolBuilder::restart_on_panic)`(true)`)
    /// fails with its own error, and the tasks after it in the batch are not run on that
    /// worker: each is answered
    /// [`TaskError::Cancelled`](crate::TaskError::Cancelled) (a map with
    /// [`ErrorPolicy::Deferred`](crate::ErrorPolicy::Deferred) runs them again). Configured and
    /// sent as [`task`](Self::task)'s request is (see [`SubmitBatch`]). The tasks may be in any
    /// form that archives as the task type ([`ArchivesAs`]): owned tasks, references to them,
    /// or borrowed forms (`&["a", "b"]` for a `String` task).
    pub fn batch<'p, 'a, T: ArchivesAs<W::Task>>(
        &'p self,
        tasks: &'a [T],
    ) -> SubmitBatch<'p, 'a, W, T> {
        SubmitBatch::new(self, tasks)
    }

    /// Runs `task` on the next free worker and blocks for its result
    /// (`self.task(task).execute()`).
    pub fn execute<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<W::Output, TaskError> {
        self.task(task).execute()
    }

    /// Queues `task` (waiting for room if the queue is full) and returns a handle at once
    /// (`self.task(task).submit()`).
    pub fn submit<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<TaskHandle<W::Output>, SubmitError> {
        self.task(task).submit()
    }

    /// Queues `task`, or fails at once with [`SubmitError::QueueFull`] if the queue is full.
    pub fn try_submit<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<TaskHandle<W::Output>, SubmitError> {
        self.task(task).try_submit()
    }

    /// Queues `task`, waiting at most `wait` for room ([`SubmitError::Timeout`]).
    pub fn submit_timeout<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
        wait: Duration,
    ) -> Result<TaskHandle<W::Output>, SubmitError> {
        self.task(task).submit_timeout(wait)
    }

    /// Queues `task` without blocking the thread: if the queue is full, the future waits for
    /// room. Works on any executor.
    pub async fn submit_async<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<TaskHandle<W::Output>, SubmitError> {
        self.task(task).submit_async().await
    }

    /// Runs `task` and resolves to its result, without blocking the thread. Works on any
    /// executor (tokio, smol, `futures::executor::block_on`, …). Dropping the future cancels
    /// the task if no worker has started it, as dropping its handle does.
    pub async fn execute_async<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<W::Output, TaskError> {
        self.task(task).execute_async().await
    }

    // ---- large payloads ----

    /// Lends a writable buffer of `len` bytes in shared memory, waiting for room in the task
    /// arena. Fill it, then send it with a task (`pool.task(&t).payload(loan).submit()`, see
    /// [`Submit::payload`]): the worker reads it in place. Fails with [`SubmitError::PayloadTooLarge`] above
    /// `max_task_bytes`, and with [`SubmitError::Shutdown`] once the pool is shutting down.
    pub fn loan(&self, len: usize) -> Result<Loan, SubmitError> {
        self.loan_block(len, Block::Until(None))
    }

    /// As [`loan`](Self::loan), but fails with [`SubmitError::QueueFull`] instead of waiting.
    pub fn try_loan(&self, len: usize) -> Result<Loan, SubmitError> {
        self.loan_block(len, Block::No)
    }

    fn loan_block(&self, len: usize, block: Block) -> Result<Loan, SubmitError> {
        let shared = &self.shared;
        // (No arena at all: not even an empty loan fits, and waiting would not help.)
        let arena = shared.layout.params.arena;
        if len > shared.max_task_bytes || arena == 0 || len as u64 > arena {
            return Err(SubmitError::PayloadTooLarge {
                len,
                max: shared.max_task_bytes.min(arena as usize),
            });
        }
        if shared.closing.load(Ordering::SeqCst) {
            return Err(SubmitError::Shutdown);
        }
        match shared
            .arena
            .alloc(len as u64, block, || shared.closing.load(Ordering::SeqCst))
        {
            Some((off, blk)) => {
                if let Err(e) = shared.reserve_arena(off + blk) {
                    shared.arena.free(off, blk);
                    return Err(slots::no_space(blk, &e));
                }
                Ok(Loan {
                    shared: shared.clone(),
                    off,
                    len: len as u64,
                    blk,
                    sent: false,
                })
            }
            None if shared.closing.load(Ordering::SeqCst) => Err(SubmitError::Shutdown),
            None => Err(SubmitError::QueueFull),
        }
    }

    /// The number of task slots ([`PoolBuilder::queue_size`](crate::PoolBuilder::queue_size)):
    /// tasks queued, running, or finished and not yet collected, at most.
    pub fn queue_size(&self) -> usize {
        self.shared.n_slots() as usize
    }

    /// Tasks queued and not yet taken by a worker (a snapshot). Tasks already answered
    /// without a worker are not counted, though they hold their slots until they leave the
    /// queue (the supervisor takes them off its head; a worker skips those it reaches):
    /// cancelled or dropped ones, and those whose deadline passed once a wait on them (or the
    /// reactor, for an awaited one) has answered `Timeout`. A batch counts once.
    /// Scans the slots (for statistics, not for a hot loop).
    pub fn queued(&self) -> usize {
        self.shared.waiting_tasks()
    }

    /// The largest task archive a submit accepts, in bytes
    /// ([`PoolBuilder::max_task_bytes`](crate::PoolBuilder::max_task_bytes), capped by the
    /// larger of the task arena and a slot's inline area). A loan is also capped by the arena
    /// alone.
    pub fn max_task_bytes(&self) -> usize {
        self.shared.max_task_bytes
    }

    // ---- shutdown ----

    /// Stops the pool: new submissions fail, workers finish every queued task and exit
    /// (killed after the shutdown timeout), and the pool's threads stop. Same as dropping it.
    /// No worker is restarted during a shutdown: a worker that dies meanwhile answers its
    /// task `WorkerDied`, and once no worker is left the tasks still queued complete with
    /// [`Cancelled`](crate::TaskError::Cancelled).
    pub fn shutdown(self) {
        drop(self);
    }

    /// Stops the pool at once: queued tasks fail with [`TaskError::Cancelled`], running tasks
    /// finish (killed after the shutdown timeout, failing with `Cancelled`), and the pool's
    /// threads stop.
    pub fn shutdown_now(self) {
        self.stop(StopMode::Immediate, self.shared.cfg.shutdown_timeout);
    }

    /// The process a finished task's owner word names (`TaskHandle::owner`), if the parent
    /// launched it.
    pub(crate) fn pid_of_owner(&self, owner: u32) -> Option<u32> {
        self.shared.pid_of_owner(owner)
    }

    /// Whether the pool is shutting down or shut down ([`close`](Self::close),
    /// [`close_now`](Self::close_now), or a drop under way): submissions fail with
    /// [`SubmitError::Shutdown`] and [`broadcast`](Self::broadcast) reaches no worker.
    pub fn is_closing(&self) -> bool {
        self.shared.closing.load(Ordering::SeqCst)
    }

    /// As [`shutdown`](Self::shutdown), through a shared reference (for a pool shared in an
    /// `Arc`, or driven through the C ABI): returns once the workers are stopped, and every
    /// task the pool accepted is answered by then. Later calls, and the drop, do nothing more.
    /// Submissions fail with [`SubmitError::Shutdown`] from the moment the shutdown begins,
    /// whatever the verb (`try_submit`, a short `submit_timeout` and `try_loan` included), and
    /// so do those already waiting for room then.
    pub fn close(&self) {
        self.stop(StopMode::Graceful, self.shared.cfg.shutdown_timeout);
    }

    /// As [`close`](Self::close), but workers still running a task at `by` are killed then
    /// (if that comes before the shutdown timeout): a server's shutdown, which must return
    /// by its own deadline even when a worker runs a task whose item was abandoned. Idle
    /// workers leave as in `close` (their state's destructor runs), bounded by the shutdown
    /// timeout.
    pub(crate) fn close_by(&self, by: std::time::Instant) {
        let left = by.saturating_duration_since(std::time::Instant::now());
        self.stop_with(
            StopMode::Graceful,
            self.shared.cfg.shutdown_timeout,
            Some(left),
        );
    }

    /// As [`shutdown_now`](Self::shutdown_now), through a shared reference.
    pub fn close_now(&self) {
        self.stop(StopMode::Immediate, self.shared.cfg.shutdown_timeout);
    }

    /// As [`close_now`](Self::close_now), without the shutdown timeout's grace: workers still
    /// running a task are killed at once (a server abandoning its items).
    pub(crate) fn abort(&self) {
        self.stop(StopMode::Abort, Duration::ZERO);
    }

    /// The shutdown sequence; runs once (a concurrent or later call waits until the first
    /// has finished). Bounded: the supervisor kills workers still running after `grace`
    /// (the shutdown timeout, or less).
    fn stop(&self, mode: StopMode, grace: Duration) {
        self.stop_with(mode, grace, None);
    }

    /// [`stop`](Self::stop), and with `busy_grace`, workers still running a task after it
    /// are killed then.
    fn stop_with(&self, mode: StopMode, grace: Duration, busy_grace: Option<Duration>) {
        let shared = &self.shared;
        if shared.closing.swap(true, Ordering::SeqCst) {
            let (done, cv) = &self.stopped;
            let mut d = done.lock().unwrap_or_else(|e| e.into_inner());
            while !*d {
                d = cv.wait(d).unwrap_or_else(|e| e.into_inner());
            }
            return;
        }
        // From here no submit can start; wait out those in progress so every task that will
        // ever be queued is queued before the workers are told to drain.
        shared.quiesce_submits();
        let (done_tx, done_rx) = channel();
        let sent = self.sup_tx.send(SupMsg::Shutdown {
            immediate: mode != StopMode::Graceful,
            kill: mode == StopMode::Abort,
            grace,
            busy_grace,
            done: done_tx,
        });
        shared.wake_supervisor();
        if sent.is_ok() {
            // Returns when the supervisor has stopped every worker, or if it died (the sender
            // is dropped with it).
            let _ = done_rx.recv();
        }
        // The supervisor answered everything left; if it died instead, do it here.
        shared.cancel_unfinished(shared.left_over());
        shared.reactor_stop.store(true, Ordering::SeqCst);
        // Unconditionally: the sleeper count is in shared memory, a worker may have zeroed it.
        shared.header().doorbell.wake_all_unconditionally();
        // And out of its idle sleep, on the parent-local bell.
        shared.ring_reactor_bell();
        let threads = std::mem::take(&mut *self.threads.lock().unwrap_or_else(|e| e.into_inner()));
        for t in threads {
            let _ = t.join();
        }
        let (done, cv) = &self.stopped;
        *done.lock().unwrap_or_else(|e| e.into_inner()) = true;
        cv.notify_all();
    }
}

impl<W: Worker> Drop for Pool<W> {
    fn drop(&mut self) {
        self.stop(StopMode::Graceful, self.shared.cfg.shutdown_timeout);
    }
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;

    fn assert_send_sync<T: Send + Sync>() {}

    struct Nop;
    impl Worker for Nop {
        type SpawnArgs = ();
        type SpawnOutput = ();
        type Task = u64;
        type Output = u64;
        fn spawn(_: (), _: &crate::WorkerContext) -> Result<(Self, ()), crate::BoxError> {
            Ok((Nop, ()))
        }
        fn execute(
            &mut self,
            t: &rkyv::Archived<u64>,
            _: &crate::TaskContext<'_>,
        ) -> Result<u64, crate::BoxError> {
            Ok(t.to_native())
        }
    }

    #[test]
    fn pool_and_handles_are_send_and_sync() {
        assert_send_sync::<Pool<Nop>>();
        fn assert_send<T: Send>() {}
        assert_send::<TaskHandle<u64>>();
        assert_send::<SpawnHandle<u64>>();
        assert_send::<Loan>();
    }

    #[test]
    fn invalid_configs_are_rejected() {
        for b in [
            Pool::<Nop>::builder().queue_size(0),
            Pool::<Nop>::builder().max_workers(0),
            Pool::<Nop>::builder().result_ring_bytes(16),
            Pool::<Nop>::builder().worker_env("A=B", "x"),
            Pool::<Nop>::builder().worker_env("", "x"),
            Pool::<Nop>::builder().worker_env("K", "a\0b"),
        ] {
            assert!(matches!(b.build(), Err(BuildError::InvalidConfig(_))));
        }
    }

    #[test]
    fn tasks_for_a_pool_with_no_worker_coming_are_refused() {
        let pool = Pool::<Nop>::builder().queue_size(4).build().unwrap();
        assert_eq!(pool.submit(&1).unwrap_err(), SubmitError::NoWorkers);
        assert_eq!(pool.try_submit(&1).unwrap_err(), SubmitError::NoWorkers);
        assert_eq!(pool.queued(), 0);
        pool.shutdown();
    }
}
