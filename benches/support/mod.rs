//! Shared pieces of the benches: the workers under test, the baselines (spin and futex
//! ping-pong floors, a pipe-fed worker process, in-process worker threads with channels), CPU-time
//! readings, a seeded PRNG and percentile histograms.
#![allow(dead_code, unreachable_pub, missing_docs)]

use hdrhistogram::Histogram;
use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};
use std::io::{Read, Write};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// Quick mode (`STATEFUL_POOL_BENCH_QUICK=1`): fewer samples and shorter runs, so every bench
/// together fits in a few minutes on a 2-core machine.
pub fn quick() -> bool {
    std::env::var_os("STATEFUL_POOL_BENCH_QUICK").is_some_and(|v| v != "0")
}

// ---- workers under test ----

/// W1/W2/W6: returns the integer.
pub struct Echo;

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

/// The W3 read: the sum of every 4096th byte.
pub fn sparse_sum(b: &[u8]) -> u64 {
    b.iter().step_by(4096).map(|&x| x as u64).sum()
}

/// W3: sums every 4096th byte of the task's bytes, or of its loaned payload if it has one.
/// Spawned with `false` (a diagnostic), it returns the length instead, reading nothing.
pub struct PayloadSum {
    read: bool,
}

impl Worker for PayloadSum {
    type SpawnArgs = bool;
    type SpawnOutput = ();
    type Task = Vec<u8>;
    type Output = u64;
    fn spawn(read: bool, _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((PayloadSum { read }, ()))
    }
    fn execute(
        &mut self,
        t: &rkyv::Archived<Vec<u8>>,
        ctx: &TaskContext<'_>,
    ) -> Result<u64, BoxError> {
        let p = ctx.payload();
        let bytes = if p.is_empty() { t.as_slice() } else { p };
        Ok(if self.read {
            sparse_sum(bytes)
        } else {
            bytes.len() as u64
        })
    }
}

/// W4: sleeps the task's number of microseconds. W5: its spawn step sleeps the given ms.
pub struct Sleeper;

impl Worker for Sleeper {
    type SpawnArgs = u64;
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;
    fn spawn(ms: u64, _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        std::thread::sleep(Duration::from_millis(ms));
        Ok((Sleeper, ()))
    }
    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        std::thread::sleep(Duration::from_micros(t.to_native()));
        Ok(t.to_native())
    }
}

/// The seed's experiment: burns the task's number of microseconds of CPU (a calibrated loop).
pub struct Burner;

impl Worker for Burner {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Burner, ()))
    }
    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        Ok(burn_us(t.to_native()))
    }
}

/// Burns `us` microseconds of CPU in this thread (spinning on the clock, so the time is right
/// whatever the CPU's speed); returns a value that depends on the work.
pub fn burn_us(us: u64) -> u64 {
    let end = Instant::now() + Duration::from_micros(us);
    let mut x = us | 1;
    while Instant::now() < end {
        for _ in 0..64 {
            x = x
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
        }
    }
    std::hint::black_box(x)
}

// ---- a seeded PRNG (SplitMix64) ----

/// A small seeded generator, so every run and every system sees the same schedule.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Self {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in [0, 1).
    pub fn f64(&mut self) -> f64 {
        (self.next_u64() >> 11) as f64 / (1u64 << 53) as f64
    }
}

// ---- latency histograms ----

/// Nanosecond latencies, 3 significant digits.
pub fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 60_000_000_000, 3).unwrap()
}

/// `p50 / p99 / p99.9` of a histogram, formatted.
pub fn percentiles(h: &Histogram<u64>) -> (f64, f64, f64) {
    (
        h.value_at_quantile(0.5) as f64,
        h.value_at_quantile(0.99) as f64,
        h.value_at_quantile(0.999) as f64,
    )
}

pub fn fmt_ns(ns: f64) -> String {
    if ns >= 1e6 {
        format!("{:.2} ms", ns / 1e6)
    } else if ns >= 1e3 {
        format!("{:.2} µs", ns / 1e3)
    } else {
        format!("{ns:.0} ns")
    }
}

// ---- CPU time ----

/// CPU time this process has used (all threads).
pub fn self_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// CPU time every thread of this process but the calling one has run so far (each thread's
/// `/proc/self/task/<tid>/schedstat`): a pool's own threads, without the thread that measures
/// them (whose own wake-up from a sleep is charged ≈ 100–200 µs on a VM).
pub fn other_threads_cpu() -> Duration {
    // SAFETY: gettid has no preconditions.
    let me = unsafe { libc::gettid() }.to_string();
    std::fs::read_dir("/proc/self/task")
        .map(|dir| {
            dir.filter_map(|e| e.ok())
                .filter(|e| e.file_name().to_string_lossy() != me)
                .filter_map(|e| std::fs::read_to_string(e.path().join("schedstat")).ok())
                .filter_map(|s| s.split_whitespace().next()?.parse::<u64>().ok())
                .map(Duration::from_nanos)
                .sum()
        })
        .unwrap_or_default()
}

/// CPU time process `pid` has run so far (`/proc/<pid>/schedstat`, nanoseconds).
pub fn proc_cpu(pid: u32) -> Duration {
    std::fs::read_to_string(format!("/proc/{pid}/schedstat"))
        .ok()
        .and_then(|s| s.split_whitespace().next()?.parse::<u64>().ok())
        .map(Duration::from_nanos)
        .unwrap_or_default()
}

// ---- baseline: a pipe-fed worker process (this binary, re-executed) ----

const PIPE_WORKER_ENV: &str = "STATEFUL_POOL_BENCH_PIPE_WORKER";

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
    let mut stdin = std::io::BufReader::new(std::io::stdin().lock());
    let mut stdout = std::io::BufWriter::new(std::io::stdout().lock());
    let mut len = [0u8; 4];
    let mut buf = rkyv::util::AlignedVec::<16>::new();
    loop {
        if stdin.read_exact(&mut len).is_err() {
            std::process::exit(0)
        }
        let n = u32::from_le_bytes(len) as usize;
        buf.resize(n, 0);
        stdin.read_exact(&mut buf).unwrap();
        let v: u64 = rkyv::from_bytes::<u64, rkyv::rancor::Error>(&buf).unwrap();
        let out = rkyv::to_bytes::<rkyv::rancor::Error>(&v).unwrap();
        stdout.write_all(&(out.len() as u32).to_le_bytes()).unwrap();
        stdout.write_all(&out).unwrap();
        // Answer at once when no more input is buffered (a round trip must not wait).
        if stdin.buffer().is_empty() {
            stdout.flush().unwrap();
        }
    }
}

/// A worker process fed over pipes: rkyv to a `Vec`, a length prefix, `write`; what a Rust user
/// would write without a shared-memory pool.
pub struct PipeWorker {
    child: std::process::Child,
    stdin: std::process::ChildStdin,
    stdout: std::process::ChildStdout,
}

impl PipeWorker {
    pub fn start() -> Self {
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

    /// Writes one task (one `write` per task: no batching).
    pub fn send(&mut self, v: u64) {
        let bytes = rkyv::to_bytes::<rkyv::rancor::Error>(&v).unwrap();
        let mut msg = Vec::with_capacity(4 + bytes.len());
        msg.extend_from_slice(&(bytes.len() as u32).to_le_bytes());
        msg.extend_from_slice(&bytes);
        self.stdin.write_all(&msg).unwrap();
    }

    pub fn recv(&mut self) -> u64 {
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

// ---- baseline: worker threads with channels (no IPC at all) ----

/// `n` worker threads pulling `(id, value)` jobs from one shared channel and answering on one
/// result channel: the in-process reference.
pub struct ThreadPool {
    jobs: Option<mpsc::Sender<u64>>,
    pub results: mpsc::Receiver<u64>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl ThreadPool {
    pub fn new(n: usize, work: fn(u64) -> u64) -> Self {
        let (jtx, jrx) = mpsc::channel::<u64>();
        let (rtx, rrx) = mpsc::channel();
        let jrx = std::sync::Arc::new(std::sync::Mutex::new(jrx));
        let threads = (0..n)
            .map(|_| {
                let jrx = jrx.clone();
                let rtx = rtx.clone();
                std::thread::spawn(move || {
                    loop {
                        let job = jrx.lock().unwrap().recv();
                        let Ok(v) = job else { return };
                        if rtx.send(work(v)).is_err() {
                            return;
                        }
                    }
                })
            })
            .collect();
        ThreadPool {
            jobs: Some(jtx),
            results: rrx,
            threads,
        }
    }

    pub fn send(&self, v: u64) {
        self.jobs.as_ref().unwrap().send(v).unwrap();
    }
}

impl Drop for ThreadPool {
    fn drop(&mut self) {
        self.jobs.take();
        for t in self.threads.drain(..) {
            let _ = t.join();
        }
    }
}

// ---- floors: ping-pong between two processes over one shared word ----

/// Runs `f` with this thread (and so every thread and process it starts meanwhile: a pool's
/// reactor, supervisor and workers, a forked floor) allowed on one CPU only, the one it runs on;
/// restores the thread's CPU set afterwards. Parked round trips then compare like with like: a
/// futex wake-up that switches tasks on one CPU costs a few µs, one that must wake a halted
/// vCPU tens of µs, and which of the two a run gets otherwise depends on where the scheduler
/// happened to place the two sides.
pub fn on_one_cpu<R>(f: impl FnOnce() -> R) -> R {
    // SAFETY: plain syscalls on this thread's own CPU set, through a zeroed, properly sized
    // `cpu_set_t` on our stack.
    unsafe {
        let mut old: libc::cpu_set_t = std::mem::zeroed();
        let size = std::mem::size_of::<libc::cpu_set_t>();
        assert_eq!(libc::sched_getaffinity(0, size, &mut old), 0);
        let cpu = libc::sched_getcpu().max(0) as usize;
        let mut one: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut one);
        assert_eq!(libc::sched_setaffinity(0, size, &one), 0);
        let r = f();
        assert_eq!(libc::sched_setaffinity(0, size, &old), 0);
        r
    }
}

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

/// One zero-filled page of anonymous memory shared with the children this process forks
/// (the caller unmaps it).
fn shared_page() -> *mut libc::c_void {
    // SAFETY: anonymous shared mapping of one page, no address hint; checked for failure.
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
    p
}

/// Runs `iters` round trips between this process and a forked child over one shared word: the
/// parent writes an odd value, the child answers with the next even one. `park`: each side
/// sleeps on the futex (and wakes the other) instead of spinning. Each round trip's time goes
/// into `hist` if given.
pub fn ping_pong(iters: u64, park: bool, hist: Option<&mut Histogram<u64>>) -> Duration {
    ping_pong_padded(iters, park, Duration::ZERO, hist)
}

/// [`ping_pong`], each round trip stretched to at least `pad` by spinning on the clock after the
/// answer arrived: the spin floor made as long as the pool's round trip, so that it meets the
/// machine's own stalls (a VM's vCPU preempted by its host, timer interrupts) as often per
/// round trip as the pool does. Its p99 is what the environment alone does to a round trip of
/// that length.
pub fn ping_pong_padded(
    iters: u64,
    park: bool,
    pad: Duration,
    mut hist: Option<&mut Histogram<u64>>,
) -> Duration {
    let p = shared_page();
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
        let t0 = (hist.is_some() || !pad.is_zero()).then(Instant::now);
        word.store(v + 1, Ordering::Release);
        if park {
            futex(word, libc::FUTEX_WAKE, 1);
        }
        wait_while(word, v + 1);
        v += 2;
        if !pad.is_zero() {
            let t0 = t0.expect("a padded ping-pong is timed");
            while t0.elapsed() < pad {
                std::hint::spin_loop();
            }
        }
        if let (Some(h), Some(t0)) = (hist.as_deref_mut(), t0) {
            h.saturating_record(t0.elapsed().as_nanos() as u64);
        }
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

/// The pool's task path with no code around it: the same cache lines, atomic operations and
/// order as one round trip of a tiny task (`u64` in, `u64` out), between this process and a
/// forked child, in a page of shared memory. A floor for the protocol's design, beside the
/// spin floor (one line there and back): the pool's p50 over this one is what its code costs
/// (encoding, checks, bookkeeping), this one over the spin floor what the protocol's line
/// traffic costs.
///
/// Per round trip, as in the pool: the caller writes the task word and resets the state in the
/// slot header's line (`prepare`), reads the queue cell's stamp, moves the queue's tail by CAS
/// and fills the cell (`push`), then polls the header for `DONE`; the child polls the cell it
/// will pop (`has_ready`), takes it (CAS on the head, cell released), claims the slot (CAS on
/// the state), reads the task word, writes the result word and publishes (CAS); the caller
/// reads the result. 64 cells of 16 bytes, as the W1 pool's queue.
pub fn protocol_skeleton(iters: u64, mut hist: Option<&mut Histogram<u64>>) -> Duration {
    #[repr(C, align(64))]
    struct Line([AtomicU64; 8]);
    // Layout (64-byte lines): 0 the slot header (state, task word, result word), 1 the tail,
    // 2 the head, 3.. the 64 cells (stamp, value), 4 to a line.
    const CELLS: u64 = 64;
    const STOP: u64 = u64::MAX;
    const CLAIMED: u64 = 1;
    const DONE: u64 = 2;
    let p = shared_page();
    // SAFETY: page-aligned, zero-filled, 19 lines of 64 bytes fit in the page; lives until the
    // munmap below.
    let lines = unsafe { std::slice::from_raw_parts(p as *const Line, 19) };
    let (hdr, tail, head) = (&lines[0].0, &lines[1].0[0], &lines[2].0[0]);
    let cell = |pos: u64| {
        let i = (pos % CELLS) as usize;
        let line = &lines[3 + i / 4].0;
        (&line[(i % 4) * 2], &line[(i % 4) * 2 + 1])
    };
    for pos in 0..CELLS {
        cell(pos).0.store(pos, Ordering::Relaxed);
    }
    // SAFETY: the child only uses atomics and _exit (async-signal-safe).
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        loop {
            let h = head.load(Ordering::Relaxed);
            let (seq, value) = cell(h);
            while seq.load(Ordering::Acquire) != h + 1 {
                std::hint::spin_loop();
            }
            if head
                .compare_exchange(h, h + 1, Ordering::SeqCst, Ordering::Relaxed)
                .is_err()
            {
                continue;
            }
            let v = value.load(Ordering::Relaxed);
            seq.store(h + CELLS, Ordering::Release);
            if v == STOP {
                // SAFETY: _exit is async-signal-safe.
                unsafe { libc::_exit(0) };
            }
            let _ = hdr[0].compare_exchange(0, CLAIMED, Ordering::AcqRel, Ordering::Relaxed);
            let task = hdr[1].load(Ordering::Relaxed);
            hdr[2].store(task, Ordering::Relaxed);
            let _ = hdr[0].compare_exchange(
                CLAIMED,
                CLAIMED | DONE,
                Ordering::AcqRel,
                Ordering::Relaxed,
            );
        }
    }
    let push = |v: u64| {
        let t = tail.load(Ordering::Relaxed);
        let (seq, value) = cell(t);
        while seq.load(Ordering::Acquire) != t {
            std::hint::spin_loop();
        }
        tail.compare_exchange(t, t + 1, Ordering::SeqCst, Ordering::Relaxed)
            .expect("one producer");
        value.store(v, Ordering::Relaxed);
        seq.store(t + 1, Ordering::Release);
    };
    let start = Instant::now();
    for i in 0..iters {
        let t0 = hist.is_some().then(Instant::now);
        hdr[1].store(i, Ordering::Relaxed);
        hdr[0].store(0, Ordering::Release);
        push(0);
        while hdr[0].load(Ordering::Acquire) & DONE == 0 {
            std::hint::spin_loop();
        }
        assert_eq!(hdr[2].load(Ordering::Relaxed), i);
        if let (Some(h), Some(t0)) = (hist.as_deref_mut(), t0) {
            h.saturating_record(t0.elapsed().as_nanos() as u64);
        }
    }
    let t = start.elapsed();
    push(STOP);
    // SAFETY: reap our child; then unmap the page nobody uses any more.
    unsafe {
        libc::waitpid(pid, std::ptr::null_mut(), 0);
        libc::munmap(p, 4096);
    }
    t
}

/// Processes that each keep a core busy (a plain busy loop) until dropped: W6's load.
pub struct BusyLoops(Vec<libc::pid_t>);

impl BusyLoops {
    pub fn start(n: usize) -> Self {
        let pids = (0..n)
            .map(|_| {
                // SAFETY: the child only spins and is killed by the parent.
                let pid = unsafe { libc::fork() };
                if pid == 0 {
                    let mut x = 0u64;
                    loop {
                        x = std::hint::black_box(x.wrapping_add(1));
                    }
                }
                pid
            })
            .collect();
        BusyLoops(pids)
    }
}

impl Drop for BusyLoops {
    fn drop(&mut self) {
        for &pid in &self.0 {
            // SAFETY: our own children.
            unsafe {
                libc::kill(pid, libc::SIGKILL);
                libc::waitpid(pid, std::ptr::null_mut(), 0);
            }
        }
    }
}

/// A summary line collector: benches append markdown rows; printed at the end and written to
/// `target/bench-report/<name>.md`.
pub struct Report {
    name: &'static str,
    lines: Vec<String>,
}

impl Report {
    pub fn new(name: &'static str) -> Self {
        Report {
            name,
            lines: Vec::new(),
        }
    }
    pub fn line(&mut self, s: impl Into<String>) {
        let s = s.into();
        println!("{s}");
        self.lines.push(s);
    }
    pub fn write(&self) {
        let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report");
        let _ = std::fs::create_dir_all(&dir);
        let path = dir.join(format!("{}.md", self.name));
        let _ = std::fs::write(&path, self.lines.join("\n") + "\n");
        println!("\n(report written to {})", path.display());
    }
}
