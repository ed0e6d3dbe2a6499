//! A worker for tests: each task is a command that exercises one behaviour.
#![allow(dead_code, unreachable_pub)]

use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
use std::time::{Duration, Instant};

mod wait;
#[allow(unused_imports)] // each test binary uses what it needs
pub use wait::{wait_until, watchdog};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Spawn {
    pub tag: String,
    pub fail: bool,
    pub panic: bool,
    /// Path of a file of u32 execution counters (one per task id) that `Tick` increments;
    /// empty: none.
    pub counters: String,
    /// Exit the process (code 7) in the spawn step if this file exists.
    pub die_if_exists: String,
    /// Sleep this long in the spawn step (milliseconds).
    pub hang_ms: u64,
    /// Wait in the spawn step until this file exists (checked every millisecond, at most
    /// 60 s); empty: no wait. Checked before `fail`.
    pub gate: String,
}

impl Spawn {
    pub fn ok(tag: &str) -> Self {
        Spawn {
            tag: tag.into(),
            fail: false,
            panic: false,
            counters: String::new(),
            die_if_exists: String::new(),
            hang_ms: 0,
            gate: String::new(),
        }
    }
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub enum Cmd {
    /// Returns the value.
    Echo(u64),
    /// Returns an error with this message.
    Fail(String),
    /// Panics with this message.
    Panic(String),
    /// Sleeps this many milliseconds, then returns 0.
    SleepMs(u64),
    /// Waits until this file exists (checked every millisecond, at most 60 s), then returns 1.
    Gate(String),
    /// Returns the sum of the bytes of this vector.
    SumVec(Vec<u8>),
    /// Returns a vector of this many bytes (`Out::Bytes`), byte i = i % 251.
    MakeBytes(u32),
    /// Returns the sum of every 4096th byte of the loaned payload, and its length.
    SumPayload,
    /// Returns how many tasks this worker executed before this one.
    Count,
    /// Returns the number of heap allocations this worker process made so far.
    Allocs,
    /// Returns this worker's process id.
    Pid,
    /// Aborts the process (SIGABRT).
    Abort,
    /// Dereferences a null pointer (SIGSEGV).
    Segfault,
    /// Calls `exit` with this code.
    Exit(i32),
    /// Sends SIGKILL to itself.
    KillSelf,
    /// Declares the worker poisoned with this message.
    Poison(String),
    /// Increments execution counter `id` (see `Spawn::counters`) and returns `id * 3`.
    Tick(u32),
    /// Creates file `.0`, then watches `TaskContext::is_cancelled` (every millisecond, at most
    /// 60 s): returns 1 once it says cancelled, 0 if it never did.
    UntilCancelled(String),
    /// As `Tick`, but first sleeps this many microseconds.
    TickSlow(u32, u32),
    /// If this file does not exist: creates it and SIGKILLs itself; else returns 1.
    DieOnce(String),
    /// Returns the value of this environment variable in the worker (`Out::bytes`), and
    /// `Out::value` 1 if it is set.
    Env(String),
    /// Returns the CPUs this worker process may run on (its affinity), one byte each.
    Cpus,
    /// Returns the worker's GPU ids (`Out::bytes`, one byte each) and whether its payload arena
    /// is pinned (`Out::value`).
    GpuIds,
    /// Creates file `started` (if not empty), waits until file `gate` exists (if not empty;
    /// checked every millisecond, at most 60 s), increments counter `id`, then fails with
    /// "step {id} failed" if `fail`, else returns `id * 3`.
    Step {
        id: u32,
        started: String,
        gate: String,
        fail: bool,
    },
    /// Returns [`hash_bytes`] of this vector.
    HashVec(Vec<u8>),
    /// Returns [`hash_bytes`] of the loaned payload.
    HashPayload,
}

/// A position-dependent hash of `b` (FNV-1a over 8-byte words, then the tail bytes): a
/// swapped, shifted or missing chunk changes it, unlike a sum.
pub fn hash_bytes(b: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    let mut words = b.chunks_exact(8);
    for w in &mut words {
        h = (h ^ u64::from_le_bytes(w.try_into().unwrap())).wrapping_mul(0x0000_0100_0000_01b3);
    }
    for &x in words.remainder() {
        h = (h ^ x as u64).wrapping_mul(0x0000_0100_0000_01b3);
    }
    h ^ b.len() as u64
}

impl Cmd {
    /// A `Step` that only counts (no files) and returns `id * 3`.
    pub fn step(id: u32) -> Cmd {
        Cmd::Step {
            id,
            started: String::new(),
            gate: String::new(),
            fail: false,
        }
    }
}

/// Waits until `path` exists (checked every millisecond), at most 60 s.
fn wait_for_file(path: &str) -> Result<(), BoxError> {
    let start = Instant::now();
    while !std::path::Path::new(path).exists() {
        if start.elapsed() > Duration::from_secs(60) {
            return Err(format!("{path} never appeared").into());
        }
        std::thread::sleep(Duration::from_millis(1));
    }
    Ok(())
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Out {
    pub worker: u32,
    pub value: u64,
    pub bytes: Vec<u8>,
}

pub struct TestWorker {
    pub tag: String,
    pub index: usize,
    pub gpus: Vec<u32>,
    pub pinned: bool,
    pub executed: u64,
    pub counters: Option<memmap2::MmapMut>,
}

impl Worker for TestWorker {
    type SpawnArgs = Spawn;
    type SpawnOutput = String;
    type Task = Cmd;
    type Output = Out;

    fn spawn(args: Spawn, ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
        if !args.gate.is_empty() {
            wait_for_file(&args.gate)?;
        }
        if args.fail {
            return Err(format!("refusing to start {}", args.tag).into());
        }
        if args.panic {
            panic!("spawn panic for {}", args.tag);
        }
        std::thread::sleep(Duration::from_millis(args.hang_ms));
        if !args.die_if_exists.is_empty() && std::path::Path::new(&args.die_if_exists).exists() {
            std::process::exit(7);
        }
        let counters = if args.counters.is_empty() {
            None
        } else {
            let f = std::fs::OpenOptions::new()
                .read(true)
                .write(true)
                .open(&args.counters)?;
            // SAFETY: a test-owned file every process maps shared; accessed only atomically.
            Some(unsafe { memmap2::MmapMut::map_mut(&f)? })
        };
        let mut hello = format!("{} ready as worker {}", args.tag, ctx.index());
        if let Ok(n) = std::env::var(SPAWN_PAD_ENV) {
            hello.push_str(&"x".repeat(n.parse().unwrap_or(0)));
        }
        Ok((
            TestWorker {
                tag: args.tag,
                index: ctx.index(),
                gpus: ctx.gpu_ids().to_vec(),
                pinned: ctx.payload_pinned(),
                executed: 0,
                counters,
            },
            hello,
        ))
    }

    fn execute(&mut self, task: &ArchivedCmd, ctx: &TaskContext<'_>) -> Result<Out, BoxError> {
        let before = self.executed;
        self.executed += 1;
        let worker = ctx.worker().index() as u32;
        let out = |value: u64| Out {
            worker,
            value,
            bytes: Vec::new(),
        };
        Ok(match task {
            ArchivedCmd::Echo(v) => out(v.to_native()),
            ArchivedCmd::Fail(m) => return Err(m.as_str().to_string().into()),
            ArchivedCmd::Panic(m) => panic!("{}", m.as_str()),
            ArchivedCmd::SleepMs(ms) => {
                std::thread::sleep(Duration::from_millis(ms.to_native()));
                out(0)
            }
            ArchivedCmd::Gate(path) => {
                let start = Instant::now();
                while !std::path::Path::new(path.as_str()).exists() {
                    if start.elapsed() > Duration::from_secs(60) {
                        return Err("gate never opened".into());
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                out(1)
            }
            ArchivedCmd::SumVec(v) => out(v.iter().map(|&b| b as u64).sum()),
            ArchivedCmd::MakeBytes(n) => Out {
                worker,
                value: n.to_native() as u64,
                bytes: (0..n.to_native()).map(|i| (i % 251) as u8).collect(),
            },
            ArchivedCmd::SumPayload => {
                let p = ctx.payload();
                let sum = p.iter().step_by(4096).map(|&b| b as u64).sum::<u64>();
                Out {
                    worker,
                    value: sum,
                    bytes: (p.len() as u64).to_le_bytes().to_vec(),
                }
            }
            ArchivedCmd::Count => out(before),
            ArchivedCmd::Allocs => out(alloc_count()),
            ArchivedCmd::Pid => out(std::process::id() as u64),
            ArchivedCmd::Abort => std::process::abort(),
            ArchivedCmd::Segfault => {
                // SAFETY: none: this is the point (a crash inside execute).
                unsafe { std::ptr::null_mut::<u64>().write_volatile(1) };
                out(0)
            }
            ArchivedCmd::Exit(c) => std::process::exit(c.to_native()),
            ArchivedCmd::KillSelf => {
                // SAFETY: plain syscalls.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                out(0)
            }
            ArchivedCmd::Poison(m) => {
                return Err(stateful_pool::Poisoned::new(m.as_str()).into());
            }
            ArchivedCmd::Tick(id) => out(self.tick(id.to_native())),
            ArchivedCmd::UntilCancelled(started) => {
                std::fs::write(started.as_str(), b"")?;
                let start = Instant::now();
                while !ctx.is_cancelled() && start.elapsed() < Duration::from_secs(60) {
                    std::thread::sleep(Duration::from_millis(1));
                }
                out(ctx.is_cancelled() as u64)
            }
            ArchivedCmd::DieOnce(path) => {
                let p = std::path::Path::new(path.as_str());
                if !p.exists() {
                    std::fs::write(p, b"died")?;
                    // SAFETY: plain syscalls.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                out(1)
            }
            ArchivedCmd::Cpus => Out {
                worker,
                value: 0,
                bytes: allowed_cpus().into_iter().map(|c| c as u8).collect(),
            },
            ArchivedCmd::Env(key) => match std::env::var(key.as_str()) {
                Ok(v) => Out {
                    worker,
                    value: 1,
                    bytes: v.into_bytes(),
                },
                Err(_) => out(0),
            },
            ArchivedCmd::GpuIds => Out {
                worker,
                value: self.pinned as u64,
                bytes: self.gpus.iter().map(|&g| g as u8).collect(),
            },
            ArchivedCmd::Step {
                id,
                started,
                gate,
                fail,
            } => {
                if !started.is_empty() {
                    std::fs::write(started.as_str(), b"started")?;
                }
                if !gate.is_empty() {
                    wait_for_file(gate.as_str())?;
                }
                let v = self.tick(id.to_native());
                if *fail {
                    return Err(format!("step {id} failed").into());
                }
                out(v)
            }
            ArchivedCmd::HashVec(v) => out(hash_bytes(v.as_slice())),
            ArchivedCmd::HashPayload => out(hash_bytes(ctx.payload())),
            ArchivedCmd::TickSlow(id, us) => {
                std::thread::sleep(Duration::from_micros(us.to_native() as u64));
                out(self.tick(id.to_native()))
            }
        })
    }
}

/// Set in the workers' environment to a path `P`: a worker's state, when dropped (it leaves
/// its loop: retired, or at shutdown), creates `P.dropping-{index}` and waits until `P.release`
/// exists (at most 60 s).
pub const DROP_GATE_ENV: &str = "STATEFUL_POOL_TEST_DROP_GATE";

/// Set in a worker's environment: its spawn output (the hello) gets this many bytes more.
pub const SPAWN_PAD_ENV: &str = "STATEFUL_POOL_TEST_SPAWN_PAD";

impl Drop for TestWorker {
    fn drop(&mut self) {
        if let Ok(p) = std::env::var(DROP_GATE_ENV) {
            let _ = std::fs::write(format!("{p}.dropping-{}", self.index), b"");
            let _ = wait_for_file(&format!("{p}.release"));
        }
    }
}

impl TestWorker {
    fn tick(&mut self, id: u32) -> u64 {
        let m = self
            .counters
            .as_mut()
            .expect("spawned without a counters file");
        let words = m.len() / 4;
        assert!((id as usize) < words, "tick id out of range");
        // SAFETY: in bounds, 4-aligned (page-aligned map), and every process only touches the
        // words atomically.
        let a = unsafe {
            &*(m.as_mut_ptr().add(id as usize * 4) as *const std::sync::atomic::AtomicU32)
        };
        a.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        id as u64 * 3
    }
}

/// A file of `n` zeroed u32 counters, mapped in the test process too.
pub struct Counters {
    pub path: std::path::PathBuf,
    pub map: memmap2::MmapMut,
}

impl Counters {
    pub fn new(name: &str, n: usize) -> Self {
        let path = gate_path(name);
        let f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(&path)
            .unwrap();
        f.set_len((n * 4) as u64).unwrap();
        // SAFETY: our own fresh file.
        let map = unsafe { memmap2::MmapMut::map_mut(&f).unwrap() };
        Counters { path, map }
    }

    pub fn get(&self, id: usize) -> u32 {
        // SAFETY: as in `TestWorker::tick`.
        let a = unsafe { &*(self.map.as_ptr().add(id * 4) as *const std::sync::atomic::AtomicU32) };
        a.load(std::sync::atomic::Ordering::SeqCst)
    }

    pub fn spawn_args(&self, tag: &str) -> Spawn {
        Spawn {
            counters: self.path.to_string_lossy().into_owned(),
            ..Spawn::ok(tag)
        }
    }
}

impl Drop for Counters {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.path);
    }
}

/// Whether process `pid` is gone (no such process, or a zombie waiting to be reaped by
/// someone else).
pub fn process_gone(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Err(_) => true,
        Ok(s) => s
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|c| c == 'Z' || c == 'X'),
    }
}

/// The CPUs this process may run on (its affinity mask), ascending.
pub fn allowed_cpus() -> Vec<usize> {
    // SAFETY: an all-zero cpu_set_t is a valid empty set; sched_getaffinity writes into ours.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut set) != 0 {
            return Vec::new();
        }
        (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &set))
            .collect()
    }
}

/// Allocation counting, for the no-allocation test (the test binary installs the allocator).
pub static ALLOCS: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);

pub fn alloc_count() -> u64 {
    ALLOCS.load(std::sync::atomic::Ordering::Relaxed)
}

/// A unique path in the temp dir for gates.
pub fn gate_path(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!(
        "stateful-pool-gate-{}-{name}-{}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap()
            .as_nanos()
    ))
}

/// A worker whose task is one `u64`, so every task travels in its slot header's word (tasks of
/// at most 8 archived bytes), and whose output is a byte vector of a length the task picks: an
/// empty one also travels in the header word; longer ones inline in the slot or as ring
/// records. What it does with task `v`:
/// - `TINY_FAIL`: an error message of 3,000+ bytes; `TINY_PANIC`: a panic, as long;
/// - otherwise: `v as u32` bytes, byte `k` = `(k + (v >> 32)) % 251`.
pub struct TinyWorker;

/// [`TinyWorker`]'s task that fails.
pub const TINY_FAIL: u64 = u64::MAX;
/// [`TinyWorker`]'s task that panics.
pub const TINY_PANIC: u64 = u64::MAX - 1;

/// What [`TinyWorker`] answers task `v` with (not for `TINY_FAIL` / `TINY_PANIC`).
pub fn tiny_output(v: u64) -> Vec<u8> {
    let salt = (v >> 32) as usize;
    (0..v as u32 as usize)
        .map(|k| ((k + salt) % 251) as u8)
        .collect()
}

impl Worker for TinyWorker {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u64;
    type Output = Vec<u8>;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((TinyWorker, ()))
    }

    fn execute(
        &mut self,
        v: &rkyv::Archived<u64>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<u8>, BoxError> {
        match v.to_native() {
            TINY_FAIL => Err(format!("tiny error {}", "x".repeat(3000)).into()),
            TINY_PANIC => panic!("tiny panic {}", "y".repeat(3000)),
            v => Ok(tiny_output(v)),
        }
    }
}

/// A waker that counts its wake-ups (for `wake_when_finished` tests).
pub struct Count(pub std::sync::atomic::AtomicUsize);

impl std::task::Wake for Count {
    fn wake(self: std::sync::Arc<Self>) {
        self.0.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
    }
}

/// A counting waker, and its counter.
pub fn counting_waker() -> (std::sync::Arc<Count>, std::task::Waker) {
    let c = std::sync::Arc::new(Count(std::sync::atomic::AtomicUsize::new(0)));
    (c.clone(), std::task::Waker::from(c))
}

/// A pool of `workers` test workers counting into `counters`, every spawn checked.
pub fn pool_with(
    counters: &Counters,
    workers: usize,
    queue: usize,
) -> stateful_pool::Pool<TestWorker> {
    let pool = stateful_pool::Pool::<TestWorker>::builder()
        .queue_size(queue)
        .build()
        .unwrap();
    for r in pool.spawn_n(&counters.spawn_args("map"), workers) {
        r.unwrap();
    }
    assert_eq!(pool.num_workers(), workers);
    pool
}
