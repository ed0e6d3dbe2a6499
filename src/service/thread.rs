//! A stage of worker threads: the same [`Worker`] type, run on threads of the parent, for
//! IO-bound work or work that needs no isolation.

use super::error::ServiceError;
use super::jobs::{Abandoned, JobQueue};
use super::stage::{Item, Meter, Stage, StageFuture, StageStats};
use super::thread_task::{ThreadMap, ThreadTask};
use crate::codec;
use crate::codec::ArchivesAs;
use crate::slot::bits;
use crate::slot::outcome::{KIND_PANIC, KIND_POISONED};
use crate::worker::main_loop::{error_kind, error_message, panic_message};
use crate::worker::{BatchTask, TaskContext, WorkerContext};
use crate::{SpawnError, SpawnOptions, TaskError, Worker};
use futures_channel::oneshot;
use rkyv::util::AlignedVec;
use std::panic::{AssertUnwindSafe, catch_unwind};
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

/// One task on its way to a thread.
struct Job<O> {
    task: AlignedVec<16>,
    deadline_ns: u64,
    deadline: Option<Instant>,
    queued_at: Instant,
    id: u64,
    /// The caller's `slot::bits::CANCELLED` once it gave up (read by
    /// `TaskContext::is_cancelled`) and the thread's `CLAIMED` once it took the job (or
    /// answered it without running it): one RMW order decides between them.
    state: Arc<AtomicU32>,
    reply: oneshot::Sender<Reply<O>>,
}

impl<O> Abandoned for Job<O> {
    fn abandoned(&self) -> bool {
        self.reply.is_canceled() || self.state.load(Ordering::Relaxed) & bits::CANCELLED != 0
    }
}

pub(super) struct Reply<O> {
    pub(super) result: Result<O, TaskError>,
    queued: Duration,
}

struct Inner<W: Worker> {
    queue: JobQueue<Job<W::Output>>,
    threads: Mutex<Vec<std::thread::JoinHandle<()>>>,
    /// Threads started and threads ended (their state dropped too), and a condvar signalled
    /// at each end: what [`Threads::shutdown`] waits on.
    ends: Mutex<(usize, usize)>,
    ended: Condvar,
    live: AtomicUsize,
    seats: AtomicUsize,
    max_batch: AtomicUsize,
    next_id: std::sync::atomic::AtomicU64,
}

/// Worker threads running a [`Worker`] type in this process: the same trait, the same task
/// outcomes ([`TaskError`]), the same dynamic batching
/// ([`Worker::execute_batch`] with up to [`max_batch`](Self::max_batch) queued tasks per
/// step, never waiting for company) and deadlines, without a process boundary. Each thread
/// holds its own worker state, made by [`spawn`](Self::spawn).
///
/// Use it directly, with a pool's task API ([`execute`](Self::execute),
/// [`execute_async`](Self::execute_async), [`submit`](Self::submit) for a [`ThreadTask`]
/// handle, [`submit_before`](Self::submit_before) with a deadline, [`map`](Self::map) for a
/// lazy ordered map), or as a stage in a service graph (its input is the worker's task type,
/// its output the worker's output, handed over without serialising it). A panic in a task fails that task and the
/// thread serves on; [`Poisoned`](crate::Poisoned) rebuilds the thread's state from its spawn arguments.
/// Threads cannot be killed: a task that never returns holds its thread, and a thread stage
/// has no task timeouts (deadlines still skip tasks that have not started).
pub struct Threads<W: Worker> {
    name: String,
    inner: Arc<Inner<W>>,
    meter: Meter,
}

impl<W: Worker> std::fmt::Debug for Threads<W> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Threads")
            .field("path", &self.meter.path)
            .field("live", &self.inner.live.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl<W: Worker> Threads<W> {
    /// A thread stage named `name`, with no threads yet ([`spawn`](Self::spawn) adds them),
    /// batching off, and a bound of 1024 items in flight.
    pub fn new(name: &str) -> Self {
        Threads {
            name: name.to_string(),
            inner: Arc::new(Inner {
                queue: JobQueue::new(),
                threads: Mutex::new(Vec::new()),
                ends: Mutex::new((0, 0)),
                ended: Condvar::new(),
                live: AtomicUsize::new(0),
                seats: AtomicUsize::new(0),
                max_batch: AtomicUsize::new(1),
                next_id: std::sync::atomic::AtomicU64::new(1),
            }),
            meter: Meter::new(name, 1024),
        }
    }

    /// At most `n` items in the stage at once; more wait at its door, each until its deadline.
    pub fn max_in_flight(mut self, n: usize) -> Self {
        self.meter = Meter::new(&self.meter.path, n);
        self
    }

    /// Up to `n` queued tasks (1..=64) per [`Worker::execute_batch`] step. A thread takes what
    /// is queued when it is free and never waits for more. With `n` above 1 every step goes
    /// through `execute_batch`, a lone task as a batch of one (as in a batching pool); with 1
    /// (the default), through [`Worker::execute`]. A value outside 1..=64 is refused by the
    /// next [`spawn`](Self::spawn) ([`SpawnError::Launch`] with `InvalidInput`), as a
    /// batching pool's [`BatchPolicy`](crate::BatchPolicy) is refused when it is set.
    pub fn max_batch(self, n: usize) -> Self {
        self.inner.max_batch.store(n, Ordering::Relaxed);
        self
    }

    /// Starts one worker thread with `args` and waits for its spawn step.
    pub fn spawn(&self, args: &W::SpawnArgs) -> Result<W::SpawnOutput, SpawnError> {
        self.spawn_with(args, &SpawnOptions::default())
    }

    /// Starts one worker thread with `args` and the options that apply to a thread, and waits
    /// for its spawn step:
    /// - [`cpus`](SpawnOptions::cpus) pins the thread (before its spawn step, so a state
    ///   rebuilt after [`Poisoned`](crate::Poisoned) stays on them), checked as for a process: a CPU this
    ///   process may not use fails with [`SpawnError::CpuNotAllowed`] before the thread
    ///   starts, and a pinning the kernel refuses in the new thread (say, the CPU went
    ///   offline meanwhile) with [`SpawnError::Launch`] carrying the OS error;
    /// - [`gpus`](SpawnOptions::gpus) become its [`WorkerContext::gpu_ids`], as labels for its
    ///   own GPU code (a thread stage creates no CUDA contexts and pins nothing).
    ///
    /// The environment options ([`env`](SpawnOptions::env),
    /// [`visible_devices_only`](SpawnOptions::visible_devices_only),
    /// [`thread_env_from_cpus`](SpawnOptions::thread_env_from_cpus)) belong to a process and
    /// are refused ([`SpawnError::Launch`] with `InvalidInput`): use a process stage for them.
    pub fn spawn_with(
        &self,
        args: &W::SpawnArgs,
        opts: &SpawnOptions,
    ) -> Result<W::SpawnOutput, SpawnError> {
        let index = self.inner.seats.load(Ordering::Relaxed);
        let refuse = |what: &str| SpawnError::Launch {
            worker: index,
            source: std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!("a thread stage cannot set {what}: it belongs to the whole process"),
            ),
        };
        if !opts.env.is_empty() {
            return Err(refuse("environment variables"));
        }
        if opts.visible_only {
            return Err(refuse("CUDA_VISIBLE_DEVICES (visible_devices_only)"));
        }
        if opts.thread_env {
            return Err(refuse("thread-count variables (thread_env_from_cpus)"));
        }
        let max_batch = self.inner.max_batch.load(Ordering::Relaxed);
        if !(1..=64).contains(&max_batch) {
            return Err(SpawnError::Launch {
                worker: index,
                source: std::io::Error::new(
                    std::io::ErrorKind::InvalidInput,
                    format!("max_batch({max_batch}): a thread stage takes 1..=64 tasks per step"),
                ),
            });
        }
        opts.check_cpus()?;
        // `None` for no pinning: the CPUs are allowed ones now, which a mask always holds.
        let cpus = crate::sys::CpuMask::from_cpus(opts.cpu_ids());
        let gpus = opts.gpus.clone();
        if !self.inner.queue.lock().open {
            return Err(SpawnError::Shutdown);
        }
        let index = self.inner.seats.fetch_add(1, Ordering::Relaxed);
        let args = codec::encode_owned(args).map_err(|e| SpawnError::Encode(e.message()))?;
        let (tx, rx) = std::sync::mpsc::channel();
        let inner = self.inner.clone();
        // Counted before the thread exists, so its end never comes first.
        self.inner.ends.lock().unwrap_or_else(|e| e.into_inner()).0 += 1;
        let ended = Ended(self.inner.clone());
        let h = std::thread::Builder::new()
            .name(format!("{}#{index}", self.name))
            .spawn(move || {
                // Dropped last, after the worker's state (or here, if the spawn failed).
                let _ended = ended;
                serve::<W>(index, args, Placement { cpus, gpus }, inner, tx)
            })
            .map_err(|source| SpawnError::Launch {
                worker: index,
                source,
            })?;
        self.inner
            .threads
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(h);
        rx.recv().unwrap_or(Err(SpawnError::Shutdown))
    }

    /// Threads serving now.
    pub fn num_workers(&self) -> usize {
        self.inner.live.load(Ordering::SeqCst)
    }

    /// Runs a task on a worker thread and blocks for its result. The task is a `&W::Task` or
    /// any form that archives the same ([`ArchivesAs`]: `&str` for a `String` task), as for a
    /// pool.
    pub fn execute<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<W::Output, TaskError> {
        super::exec::block_on(self.execute_async(task))
    }

    /// Runs a task on a worker thread and resolves to its result (any executor). Dropping the
    /// future before a thread took the task cancels it.
    pub async fn execute_async<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<W::Output, TaskError> {
        self.send(task, None)?.await.result
    }

    /// Queues `task` and returns a handle at once: wait on it (blocking, bounded, or
    /// non-blocking), `.await` it, or cancel it, as a pool's
    /// [`TaskHandle`](crate::TaskHandle). Fails at once with
    /// [`SubmitError::NoWorkers`](crate::SubmitError::NoWorkers) while no thread serves, and
    /// with `Shutdown` once the stage is closed ([`close`](Self::close),
    /// [`shutdown`](Self::shutdown)). (A thread stage's queue has no bound: a
    /// submit never waits for room.)
    pub fn submit<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
    ) -> Result<ThreadTask<W::Output>, crate::SubmitError> {
        self.submit_before(task, None)
    }

    /// As [`submit`](Self::submit), with a deadline: a task no thread has started by then is
    /// answered [`TaskError::Timeout`] instead of run, and a caller waiting on its handle
    /// gets that answer at the deadline, even while every thread is busy (a running task is
    /// not stopped: threads cannot be killed, and its outcome is delivered when it ends).
    pub fn submit_before<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
        deadline: Option<Instant>,
    ) -> Result<ThreadTask<W::Output>, crate::SubmitError> {
        match self.send(task, deadline) {
            Ok(call) => Ok(ThreadTask::new(call, deadline)),
            Err(TaskError::Submit(e)) => Err(e),
            Err(TaskError::NoWorkers) => Err(crate::SubmitError::NoWorkers),
            Err(e) => Err(crate::SubmitError::Broken {
                reason: e.to_string(),
            }),
        }
    }

    /// Runs `inputs` through the threads lazily, in input order, with at most
    /// [`window`](ThreadMap::window) tasks in flight (64 by default), so an endless input
    /// uses bounded memory. Every input gets its result (`Result<W::Output, MapError>`, the
    /// error naming the input's position). Inputs may be in any form `submit` accepts. For
    /// unordered results and the other error policies, run the stage behind a
    /// [`Server`](super::Server) and use its [`stream`](super::Server::stream).
    pub fn map<I>(&self, inputs: I) -> ThreadMap<'_, W, I::IntoIter>
    where
        I: IntoIterator<Item: ArchivesAs<W::Task>>,
    {
        ThreadMap::new(self, inputs.into_iter())
    }

    /// Queues `task`; the returned future resolves to its outcome.
    fn send<A: ?Sized + ArchivesAs<W::Task>>(
        &self,
        task: &A,
        deadline: Option<Instant>,
    ) -> Result<Call<W::Output>, TaskError> {
        let bytes = codec::encode_owned(&task.enc())
            .map_err(|e| TaskError::Submit(crate::SubmitError::Encode(e.message())))?;
        let (tx, rx) = oneshot::channel();
        let state = Arc::new(AtomicU32::new(0));
        let deadline_ns = deadline.map_or(0, |d| {
            let left = d.saturating_duration_since(Instant::now()).as_nanos();
            crate::sys::mono_ns().saturating_add(left.min(u64::MAX as u128) as u64)
        });
        let id = self.inner.next_id.fetch_add(1, Ordering::Relaxed);
        let job = Job {
            task: bytes,
            deadline_ns,
            deadline,
            queued_at: Instant::now(),
            id,
            state: state.clone(),
            reply: tx,
        };
        // Under the queue's lock, as the last thread's exit (`Live::drop`): a job is either
        // queued while a thread lives, or refused here; never queued to no thread.
        let mut q = self.inner.queue.lock();
        // Closed first: after `close` the threads finish the queue and leave, and a submit
        // then is refused for the closing, whether they have left yet or not.
        if !q.open {
            return Err(TaskError::Submit(crate::SubmitError::Shutdown));
        }
        if self.inner.live.load(Ordering::SeqCst) == 0 {
            return Err(TaskError::NoWorkers);
        }
        q.push(job);
        drop(q);
        self.inner.queue.job_added();
        Ok(Call { rx, state, id })
    }

    /// Stops intake; the threads finish what is queued and exit. Does not wait for them.
    pub fn close(&self) {
        self.inner.queue.close(false);
    }

    /// Stops intake, cancels what is queued (answered `Cancelled`), and waits up to 10 s for
    /// the threads to finish the tasks they are running and exit (a thread still running a
    /// task then is left to finish on its own: threads cannot be killed).
    pub fn shutdown(&self) {
        self.close_and_cancel();
        let hs = std::mem::take(&mut *self.inner.threads.lock().unwrap_or_else(|e| e.into_inner()));
        let deadline = Instant::now() + Duration::from_secs(10);
        // Every thread counts itself ended as the very last thing it does (`Ended`).
        let mut ends = self.inner.ends.lock().unwrap_or_else(|e| e.into_inner());
        while ends.1 < ends.0 {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            ends = self
                .inner
                .ended
                .wait_timeout(ends, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        drop(ends);
        for h in hs {
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }

    /// Stops intake and answers what is queued `Cancelled`; the running tasks go on.
    fn close_and_cancel(&self) {
        for j in self.inner.queue.close(true) {
            // Answered here: a later cancel by its handle must not change the answer.
            j.state.fetch_or(bits::CLAIMED, Ordering::AcqRel);
            let _ = j.reply.send(Reply {
                result: Err(TaskError::Cancelled),
                queued: j.queued_at.elapsed(),
            });
        }
    }

    /// A task's failure as this stage's (see `Meter::fail`); the pid is this process's.
    fn stage_error(&self, item: &Item, e: TaskError) -> ServiceError {
        self.meter.fail(item, e, |_| Some(std::process::id()))
    }
}

impl<W: Worker> Drop for Threads<W> {
    /// Stops intake; the threads finish what is queued and exit on their own.
    fn drop(&mut self) {
        self.close();
    }
}

/// A queued task's reply; dropping it before a thread took the task cancels the task.
pub(super) struct Call<O> {
    rx: oneshot::Receiver<Reply<O>>,
    /// The job's word: `CANCELLED` from the caller's side, `CLAIMED` from the thread's.
    pub(super) state: Arc<AtomicU32>,
    /// The task's id (per stage).
    pub(super) id: u64,
}

impl<O> std::future::Future for Call<O> {
    type Output = Reply<O>;

    fn poll(
        mut self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Reply<O>> {
        std::pin::Pin::new(&mut self.rx).poll(cx).map(|r| {
            r.unwrap_or_else(|_| Reply {
                result: Err(TaskError::NoWorkers),
                queued: Duration::ZERO,
            })
        })
    }
}

impl<O> Drop for Call<O> {
    fn drop(&mut self) {
        self.state.fetch_or(bits::CANCELLED, Ordering::Relaxed);
    }
}

/// Where a worker thread runs: the CPUs it is pinned to, the GPUs it is told about.
struct Placement {
    cpus: Option<crate::sys::CpuMask>,
    gpus: Vec<u32>,
}

/// A worker thread: its spawn step, then tasks until the queue closes.
fn serve<W: Worker>(
    index: usize,
    args: AlignedVec<16>,
    placement: Placement,
    inner: Arc<Inner<W>>,
    spawned: std::sync::mpsc::Sender<Result<W::SpawnOutput, SpawnError>>,
) {
    if let Some(mask) = &placement.cpus {
        // The calling thread only (sched_setaffinity on thread id 0).
        if let Err(source) = mask.apply() {
            let _ = spawned.send(Err(SpawnError::Launch {
                worker: index,
                source,
            }));
            return;
        }
    }
    let wctx = WorkerContext {
        index,
        generation: 1,
        pid: std::process::id(),
        gpus: placement.gpus,
        #[cfg(feature = "cuda")]
        cuda: Vec::new(),
        payload_pinned: false,
    };
    let start = |wctx: &WorkerContext| -> Result<(W, W::SpawnOutput), SpawnError> {
        let a = codec::decode::<W::SpawnArgs>(&args).map_err(SpawnError::Encode)?;
        match catch_unwind(AssertUnwindSafe(|| W::spawn(a, wctx))) {
            Ok(Ok(v)) => Ok(v),
            Ok(Err(e)) => Err(SpawnError::Failed {
                worker: index,
                message: error_message(&e),
            }),
            Err(p) => Err(SpawnError::Panicked {
                worker: index,
                message: panic_message(&*p),
            }),
        }
    };
    let mut state = match start(&wctx) {
        Ok((s, out)) => {
            inner.live.fetch_add(1, Ordering::SeqCst);
            let _ = spawned.send(Ok(out));
            s
        }
        Err(e) => {
            let _ = spawned.send(Err(e));
            return;
        }
    };
    drop(spawned);
    // Counts this thread out however it leaves (a panic outside a task's `catch_unwind`
    // included).
    let _live = Live(&inner);
    let mut jobs: Vec<Job<W::Output>> = Vec::new();
    // Jobs of callers that gave up are dropped unanswered on the way (nobody listens).
    while let Some(max) = inner.queue.take(
        || inner.max_batch.load(Ordering::Relaxed).clamp(1, 64),
        &mut jobs,
    ) {
        let now = Instant::now();
        let poisoned = run_jobs(&mut state, &wctx, &mut jobs, now, max > 1);
        jobs.clear();
        if poisoned {
            drop(state);
            match start(&wctx) {
                Ok((s, _)) => state = s,
                Err(_) => break,
            }
        }
    }
}

/// A started thread, counted ended when dropped (at the very end of the thread, or with the
/// closure of a thread that could not be started).
struct Ended<W: Worker>(Arc<Inner<W>>);

impl<W: Worker> Drop for Ended<W> {
    fn drop(&mut self) {
        self.0.ends.lock().unwrap_or_else(|e| e.into_inner()).1 += 1;
        self.0.ended.notify_all();
    }
}

/// A serving thread, counted in `live` until it is dropped.
struct Live<'a, W: Worker>(&'a Inner<W>);

impl<W: Worker> Drop for Live<'_, W> {
    fn drop(&mut self) {
        let inner = self.0;
        // Under the queue's lock (see `Threads::send`): no job can be queued between the
        // count reaching 0 and the queue being emptied.
        let mut q = inner.queue.lock();
        if inner.live.fetch_sub(1, Ordering::SeqCst) == 1 {
            // The last thread: nobody will take what is still queued. Answered after the
            // lock is let go (an answer wakes its caller, whose executor may call back in).
            let left = q.take_all();
            drop(q);
            for j in left {
                // Answered here: a later cancel by its handle must not change the answer.
                j.state.fetch_or(bits::CLAIMED, Ordering::AcqRel);
                let _ = j.reply.send(Reply {
                    result: Err(TaskError::NoWorkers),
                    queued: j.queued_at.elapsed(),
                });
            }
        }
    }
}

/// Runs the ready jobs as one step and answers each: through `execute_batch` whenever the
/// stage batches (a lone job as a batch of one, as a process pool does), else `execute`.
/// Returns whether the worker declared itself poisoned.
fn run_jobs<W: Worker>(
    state: &mut W,
    wctx: &WorkerContext,
    jobs: &mut Vec<Job<W::Output>>,
    now: Instant,
    batching: bool,
) -> bool {
    let index = wctx.index;
    // The claim: one RMW order on each job's word with its caller's cancel
    // (`ThreadTask::cancel`), so exactly one of them decides. A job cancelled first is
    // dropped unanswered: its handle answered `Cancelled` itself.
    jobs.retain(|j| j.state.fetch_or(bits::CLAIMED, Ordering::AcqRel) & bits::CANCELLED == 0);
    // Expired jobs first: answered, never run.
    let mut live = Vec::with_capacity(jobs.len());
    for j in jobs.drain(..) {
        if j.deadline.is_some_and(|d| now >= d) {
            let after = j
                .deadline
                .map_or(Duration::ZERO, |d| d.saturating_duration_since(j.queued_at));
            let _ = j.reply.send(Reply {
                result: Err(TaskError::Timeout {
                    worker: index,
                    after,
                }),
                queued: now.saturating_duration_since(j.queued_at),
            });
        } else {
            live.push(j);
        }
    }
    if live.is_empty() {
        return false;
    }
    let mut poisoned = false;
    // An error is classified as a worker process classifies it (`error_kind`).
    let mut outcome = |r: Result<W::Output, crate::BoxError>| match r {
        Ok(o) => Ok(o),
        Err(e) => Err(match error_kind(&*e) {
            (KIND_PANIC, message) => TaskError::panicked(index, message),
            (KIND_POISONED, message) => {
                poisoned = true;
                TaskError::Poisoned {
                    worker: index,
                    message,
                }
            }
            (_, message) => TaskError::Failed {
                worker: index,
                message,
            },
        }),
    };
    let archived: Result<Vec<_>, String> = live
        .iter()
        .map(|j| codec::access::<W::Task>(&j.task))
        .collect();
    let results: Vec<Result<W::Output, TaskError>> = match archived {
        Err(m) => live
            .iter()
            .map(|_| {
                Err(TaskError::BadTask {
                    worker: index,
                    message: m.clone(),
                })
            })
            .collect(),
        Ok(tasks) => {
            fn ctx<'j, O>(wctx: &'j WorkerContext, j: &'j Job<O>) -> TaskContext<'j> {
                TaskContext {
                    worker: wctx,
                    task_id: j.id,
                    payload: &[],
                    state: &j.state,
                    deadline_ns: j.deadline_ns,
                }
            }
            if live.len() == 1 && !batching {
                let r = catch_unwind(AssertUnwindSafe(|| {
                    state.execute(tasks[0], &ctx(wctx, &live[0]))
                }));
                vec![match r {
                    Ok(r) => outcome(r),
                    Err(p) => Err(TaskError::panicked(index, panic_message(&*p))),
                }]
            } else {
                let batch: Vec<BatchTask<'_, W::Task>> = tasks
                    .iter()
                    .copied()
                    .zip(&live)
                    .map(|(t, j)| BatchTask {
                        task: t,
                        ctx: ctx(wctx, j),
                    })
                    .collect();
                let whole = |e: TaskError| live.iter().map(|_| Err(e.clone())).collect();
                match catch_unwind(AssertUnwindSafe(|| state.execute_batch(&batch))) {
                    Ok(Ok(v)) if v.len() == live.len() => v.into_iter().map(&mut outcome).collect(),
                    Ok(Ok(v)) => whole(TaskError::Failed {
                        worker: index,
                        message: format!(
                            "execute_batch returned {} outcomes for a batch of {} tasks",
                            v.len(),
                            live.len()
                        ),
                    }),
                    Ok(Err(e)) => match outcome(Err(e)) {
                        Err(e) => whole(e),
                        Ok(_) => unreachable!("outcome of an Err is an Err"),
                    },
                    Err(p) => whole(TaskError::panicked(index, panic_message(&*p))),
                }
            }
        }
    };
    for (j, r) in live.into_iter().zip(results) {
        let _ = j.reply.send(Reply {
            result: r,
            queued: now.saturating_duration_since(j.queued_at),
        });
    }
    poisoned
}

impl<W: Worker> Stage for Threads<W>
where
    W::Task: Sync,
{
    type In = W::Task;
    type Out = W::Output;

    fn run<'a>(&'a self, input: W::Task, item: &'a Item) -> StageFuture<'a, W::Output> {
        let entered = Instant::now();
        Box::pin(self.meter.admit(item, false, async move {
            // Queue delay: the wait for the stage's bound, then the time in the queue.
            let at_bound = entered.elapsed();
            let call = self
                .send(&input, item.deadline)
                .map_err(|e| self.stage_error(item, e))?;
            drop(input);
            let reply = call.await;
            self.meter.queued_for(at_bound + reply.queued);
            reply.result.map_err(|e| self.stage_error(item, e))
        }))
    }

    fn attach(&mut self, prefix: &str) {
        self.meter.attach(prefix, &self.name);
    }

    fn report(&self, out: &mut Vec<StageStats>) {
        let mut s = self.meter.stats("thread");
        s.live_workers = Some(self.num_workers());
        s.queued = self.inner.queue.lock().waiting();
        out.push(s);
    }

    fn close(&self, _by: Instant) {
        // Threads cannot be stopped: they finish what is queued (nothing, once the server
        // drained, but tasks of abandoned items, which they skip) and exit on their own.
        Threads::close(self);
    }

    fn close_now(&self) {
        self.meter.close();
        // Not `shutdown`: a server abandoning its items does not wait for running threads,
        // which cannot be stopped (each finishes its task on its own).
        self.close_and_cancel();
    }
}
