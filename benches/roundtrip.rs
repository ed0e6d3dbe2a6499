//! Minimal round-trip and throughput benches, each beside its baselines in the same run.
//!
//! - `roundtrip/*` (workload W1): one worker, one caller, a u64 echoed back, back to back.
//!   - `floor_spin`: two processes ping-pong a word in shared memory, both spinning: the floor.
//!   - `floor_futex`: the same, both parking on a shared futex every time: the floor of a
//!     round trip that must wake a sleeping peer.
//!   - `pool_default`: `Pool::execute` with default settings (bounded spin, then park).
//!   - `pool_parked`: `WaitStrategy::Park` on both sides: every round trip wakes a parked
//!     worker and a parked caller (compare with `floor_futex`).
//!   - `pipe_pool`: a worker process fed over pipes, rkyv to a Vec then write, what a user
//!     would write without us.
//! - `throughput/*` (W2-like): 2 workers, 10,000 tiny tasks per iteration, pipelined through
//!   submit handles, and through `Pool::map` (ordered and unordered, window 1,000); versus the
//!   pipe pool writing each task separately.
//!
//! Run: `cargo bench --bench roundtrip` (about 2 minutes). Results: BENCHMARKS.md.

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use stateful_pool::{BoxError, Pool, TaskContext, WaitStrategy, Worker, WorkerContext};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

// ---- the worker under test ----

struct Echo;

impl Worker for Echo {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Echo, ()))
    }
    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        Ok(t.to_native())
    }
}

// ---- baseline: a pipe-fed worker process (re-executed self) ----

const PIPE_WORKER_ENV: &str = "ROUNDTRIP_BENCH_PIPE_WORKER";

#[used]
#[unsafe(link_section = ".init_array")]
static PIPE_WORKER_HOOK: extern "C" fn() = {
    extern "C" fn hook() {
        if std::env::var_os(PIPE_WORKER_ENV).is_some() {
            pipe_worker_main();
        }
    }
    hook
};

/// Reads length-prefixed rkyv archives of u64 from stdin, answers each with the same.
fn pipe_worker_main() -> ! {
    let mut stdin = std::io::stdin().lock();
    let mut stdout = std::io::stdout().lock();
    let mut len = [0u8; 4];
    let mut buf = rkyv::util::AlignedVec::<16>::new();
    while stdin.read_exact(&mut len).is_ok() {
        let n = u32::from_le_bytes(len) as usize;
        buf.resize(n, 0);
        stdin.read_exact(&mut buf).unwrap();
        let v: u64 = rkyv::from_bytes::<u64, rkyv::rancor::Error>(&buf).unwrap();
        let out = rkyv::to_bytes::<rkyv::rancor::Error>(&v).unwrap();
        stdout.write_all(&(out.len() as u32).to_le_bytes()).unwrap();
        stdout.write_all(&out).unwrap();
        stdout.flush().unwrap();
    }
    std::process::exit(0)
}

struct PipeWorker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
}

impl PipeWorker {
    fn start() -> Self {
        let mut child = Command::new("/proc/self/exe")
            .env(PIPE_WORKER_ENV, "1")
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap();
        let stdin = child.stdin.take().unwrap();
        let stdout = child.stdout.take().unwrap();
        PipeWorker {
            child,
            stdin,
            stdout,
        }
    }

    fn send(&mut self, v: u64) {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&v).unwrap();
        self.stdin
            .write_all(&(bytes.len() as u32).to_le_bytes())
            .unwrap();
        self.stdin.write_all(&bytes).unwrap();
    }

    fn recv(&mut self) -> u64 {
        let mut len = [0u8; 4];
        self.stdout.read_exact(&mut len).unwrap();
        let mut buf = rkyv::util::AlignedVec::<16>::new();
        buf.resize(u32::from_le_bytes(len) as usize, 0);
        self.stdout.read_exact(&mut buf).unwrap();
        rkyv::from_bytes::<u64, rkyv::rancor::Error>(&buf).unwrap()
    }
}

impl Drop for PipeWorker {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

// ---- baseline: ping-pong between two processes over shared memory ----

fn futex(word: &AtomicU32, op: i32, val: u32) {
    // SAFETY: `word` is a valid aligned u32 in a MAP_SHARED mapping; no timeout pointer.
    unsafe {
        libc::syscall(
            libc::SYS_futex,
            word.as_ptr(),
            op,
            val,
            std::ptr::null::<libc::timespec>(),
            0usize,
            0u32,
        );
    }
}

/// Runs `iters` round trips between this process and a forked child over one shared word:
/// the parent writes an odd value, the child answers with the next even one. `park`: each side
/// sleeps on the futex (and wakes the other) instead of spinning.
fn ping_pong(iters: u64, park: bool) -> Duration {
    // SAFETY: anonymous shared mapping of one page; checked for failure below.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            4096,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(p, libc::MAP_FAILED);
    // SAFETY: page-aligned, zero-filled, lives until munmap below.
    let word = unsafe { &*(p as *const AtomicU32) };
    const STOP: u32 = u32::MAX;
    let wait_while = |w: &AtomicU32, v: u32| {
        while w.load(Ordering::Acquire) == v {
            if park {
                futex(w, libc::FUTEX_WAIT, v);
            } else {
                std::hint::spin_loop();
            }
        }
    };
    // SAFETY: the child only uses atomics, futex syscalls and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        let mut seen = 0;
        loop {
            wait_while(word, seen);
            let v = word.load(Ordering::Acquire);
            if v == STOP {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            word.store(v + 1, Ordering::Release);
            if park {
                futex(word, libc::FUTEX_WAKE, 1);
            }
            seen = v + 1;
        }
    }
    let mut v = 0u32;
    let start = Instant::now();
    for _ in 0..iters {
        word.store(v + 1, Ordering::Release);
        if park {
            futex(word, libc::FUTEX_WAKE, 1);
        }
        wait_while(word, v + 1);
        v += 2;
    }
    let t = start.elapsed();
    word.store(STOP, Ordering::Release);
    futex(word, libc::FUTEX_WAKE, 1);
    // SAFETY: reap our child; then unmap the page nobody uses any more.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::munmap(p, 4096);
    }
    t
}

// ---- benches ----

fn roundtrip(c: &mut Criterion) {
    let mut g = c.benchmark_group("roundtrip");
    g.sample_size(30).measurement_time(Duration::from_secs(3));
    g.bench_function("floor_spin", |b| b.iter_custom(|n| ping_pong(n, false)));
    g.bench_function("floor_futex", |b| b.iter_custom(|n| ping_pong(n, true)));
    for (name, wait) in [
        ("pool_default", WaitStrategy::default()),
        ("pool_parked", WaitStrategy::Park),
    ] {
        let pool = Pool::<Echo>::builder().wait_strategy(wait).build().unwrap();
        pool.spawn(&()).unwrap();
        for i in 0..1000 {
            pool.execute(&i).unwrap();
        }
        g.bench_function(name, |b| {
            let mut i = 0u64;
            b.iter(|| {
                i += 1;
                assert_eq!(pool.execute(&i).unwrap(), i);
            })
        });
    }
    let mut pw = PipeWorker::start();
    g.bench_function("pipe_pool", |b| {
        let mut i = 0u64;
        b.iter(|| {
            i += 1;
            pw.send(i);
            assert_eq!(pw.recv(), i);
        })
    });
    g.finish();
}

fn throughput(c: &mut Criterion) {
    const TASKS: u64 = 10_000;
    let mut g = c.benchmark_group("throughput");
    g.sample_size(10)
        .measurement_time(Duration::from_secs(5))
        .throughput(Throughput::Elements(TASKS));
    let pool = Pool::<Echo>::builder().queue_size(1024).build().unwrap();
    pool.spawn(&()).unwrap();
    pool.spawn(&()).unwrap();
    g.bench_function(BenchmarkId::new("pool_submit_handles", TASKS), |b| {
        let mut inflight = std::collections::VecDeque::with_capacity(1024);
        b.iter(|| {
            for i in 0..TASKS {
                if inflight.len() == 1000 {
                    let h: stateful_pool::TaskHandle<u64> = inflight.pop_front().unwrap();
                    h.wait().unwrap();
                }
                inflight.push_back(pool.submit(&i).unwrap());
            }
            for h in inflight.drain(..) {
                h.wait().unwrap();
            }
        })
    });
    g.bench_function(BenchmarkId::new("pool_map_ordered", TASKS), |b| {
        b.iter(|| {
            let n = pool
                .map(0..TASKS)
                .window(1000)
                .filter(Result::is_ok)
                .count();
            assert_eq!(n, TASKS as usize);
        })
    });
    g.bench_function(BenchmarkId::new("pool_map_unordered", TASKS), |b| {
        b.iter(|| {
            let n = pool
                .map(0..TASKS)
                .window(1000)
                .unordered()
                .filter(Result::is_ok)
                .count();
            assert_eq!(n, TASKS as usize);
        })
    });
    drop(pool);
    let mut ws = [PipeWorker::start(), PipeWorker::start()];
    g.bench_function(BenchmarkId::new("pipe_pool_each_write", TASKS), |b| {
        b.iter(|| {
            // Keep up to 64 tasks in flight per worker (pipes buffer them), round robin.
            let mut sent = [0u64; 2];
            let mut recvd = [0u64; 2];
            for i in 0..TASKS {
                let w = (i % 2) as usize;
                if sent[w] - recvd[w] == 64 {
                    ws[w].recv();
                    recvd[w] += 1;
                }
                ws[w].send(i);
                sent[w] += 1;
            }
            for w in 0..2 {
                while recvd[w] < sent[w] {
                    ws[w].recv();
                    recvd[w] += 1;
                }
            }
        })
    });
    g.finish();
}

criterion_group!(benches, roundtrip, throughput);
criterion_main!(benches);
