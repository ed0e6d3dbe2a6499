//! A worker for tests: each task is a command that exercises one behaviour.
#![allow(dead_code, unreachable_pub)]

use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
use std::time::{Duration, Instant};

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Spawn {
    pub tag: String,
    pub fail: bool,
    pub panic: bool,
}

impl Spawn {
    pub fn ok(tag: &str) -> Self {
        Spawn {
            tag: tag.into(),
            fail: false,
            panic: false,
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
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
pub struct Out {
    pub worker: u32,
    pub value: u64,
    pub bytes: Vec<u8>,
}

pub struct TestWorker {
    pub tag: String,
    pub executed: u64,
}

impl Worker for TestWorker {
    type SpawnArgs = Spawn;
    type SpawnOutput = String;
    type Task = Cmd;
    type Output = Out;

    fn spawn(args: Spawn, ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
        if args.fail {
            return Err(format!("refusing to start {}", args.tag).into());
        }
        if args.panic {
            panic!("spawn panic for {}", args.tag);
        }
        let hello = format!("{} ready as worker {}", args.tag, ctx.index());
        Ok((
            TestWorker {
                tag: args.tag,
                executed: 0,
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
        })
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

/// Runs `f` on a thread and fails the test if it does not finish within `secs` (a hang becomes
/// a failure instead of stalling CI).
pub fn watchdog<T: Send + 'static>(secs: u64, f: impl FnOnce() -> T + Send + 'static) -> T {
    let (tx, rx) = std::sync::mpsc::channel();
    let t = std::thread::spawn(move || {
        let r = f();
        let _ = tx.send(());
        r
    });
    match rx.recv_timeout(Duration::from_secs(secs)) {
        Ok(()) => t.join().unwrap(),
        Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => match t.join() {
            Ok(v) => v,
            Err(p) => std::panic::resume_unwind(p),
        },
        Err(_) => panic!("watchdog: test did not finish within {secs} s"),
    }
}
