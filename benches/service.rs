//! W8: the cost of composition (`../shared/docs/workloads.md`, issue "Services").
//!
//! - **Tiny items**, one caller back to back: round-trip p50/p99 of a bare `Pool::execute`
//!   (W1's round trip), of a one-stage server, a two-stage process pipeline and a two-member
//!   ensemble; and tasks/s with a window of 64 (a stream). Target: each extra stage adds at
//!   most one W1 round trip at p50.
//! - **16 MiB items**: GB/s through one process stage, through two (the output handed over
//!   archived, from the first pool's ring into the second pool's arena), and through two with
//!   a parent stage between them (decoded and re-encoded: the copy the hand-off avoids).
//! - **Four-stage pipeline** of stages that wait 200/400/200/200 µs per item (IO- or
//!   GPU-bound stages: they leave the CPU free): its throughput against its slowest stage
//!   alone. Target ≥ 0.9×.
//!
//! Run: `cargo bench --bench service`, or quick: `STATEFUL_POOL_BENCH_QUICK=1 cargo bench
//! --bench service`. Writes `target/bench-report/service.md`.

#[path = "support/mod.rs"]
mod support;

use stateful_pool::service::{Process, Server, Stage, ensemble, local, seq};
use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
use std::time::{Duration, Instant};
use support::*;

stateful_pool::worker_hook!();

/// Copies its input bytes to its output (a stage that transforms a large item).
struct Copy;

impl Worker for Copy {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Vec<u8>;
    type Output = Vec<u8>;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Copy, ()))
    }
    fn execute(
        &mut self,
        t: &rkyv::Archived<Vec<u8>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<u8>, BoxError> {
        Ok(t.as_slice().to_vec())
    }
}

/// Waits its spawn argument's microseconds per task.
struct Wait(u64);

impl Worker for Wait {
    type SpawnArgs = u64;
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;
    fn spawn(us: u64, _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Wait(us), ()))
    }
    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        std::thread::sleep(Duration::from_micros(self.0));
        Ok(t.to_native() + 1)
    }
}

fn echo(name: &str) -> Process<Echo> {
    let p = Pool::<Echo>::new().unwrap();
    p.spawn(&()).unwrap();
    Process::new(name, p)
}

fn copier(name: &str) -> Process<Copy> {
    let p = Pool::<Copy>::builder()
        .result_ring_bytes(80 << 20)
        .task_arena_bytes(80 << 20)
        .max_task_bytes(40 << 20)
        .build()
        .unwrap();
    p.spawn(&()).unwrap();
    Process::new(name, p)
}

fn waiter(name: &str, us: u64) -> Process<Wait> {
    let p = Pool::<Wait>::new().unwrap();
    p.spawn(&us).unwrap();
    Process::new(name, p)
}

/// p50 and p99 (ns) of `n` back-to-back calls.
fn round_trips(n: usize, mut f: impl FnMut(u64)) -> (f64, f64) {
    for i in 0..n / 10 {
        f(i as u64);
    }
    let mut h = histogram();
    for i in 0..n {
        let t = Instant::now();
        f(i as u64);
        let _ = h.record(t.elapsed().as_nanos() as u64);
    }
    let (p50, p99, _) = percentiles(&h);
    (p50, p99)
}

/// Items/s through `server` with a window of 64.
fn throughput<S: Stage>(server: &Server<S>, n: usize, make: impl Fn(u64) -> S::In) -> f64 {
    let t = Instant::now();
    let mut done = 0;
    for r in server.stream_iter((0..n as u64).map(make)) {
        r.expect("item");
        done += 1;
    }
    done as f64 / t.elapsed().as_secs_f64()
}

fn main() {
    let quick = quick();
    let mut report = Report::new("service");
    let runs = if quick { 2_000 } else { 20_000 };

    // ---- tiny items ----
    report.line("### W8 tiny items (1 caller back to back; stream window 64)\n");
    report.line("| shape | p50 | p99 | p50 − W1 | items/s |");
    report.line("|---|---|---|---|---|");
    let bare = Pool::<Echo>::new().unwrap();
    bare.spawn(&()).unwrap();
    let (w1, w1_99) = round_trips(runs, |i| {
        bare.execute(&i).unwrap();
    });
    report.line(format!(
        "| bare pool (W1) | {} | {} | – | – |",
        fmt_ns(w1),
        fmt_ns(w1_99)
    ));
    // The same work without the service layer: two pools called one after the other, and
    // two pools called at once (the floor each shape has on this machine).
    let bare2 = Pool::<Echo>::new().unwrap();
    bare2.spawn(&()).unwrap();
    let (p50, p99) = round_trips(runs, |i| {
        let x = bare.execute(&i).unwrap();
        bare2.execute(&x).unwrap();
    });
    report.line(format!(
        "| bare: 2 pools in sequence | {} | {} | {} | – |",
        fmt_ns(p50),
        fmt_ns(p99),
        fmt_ns(p50 - w1)
    ));
    let (p50, p99) = round_trips(runs, |i| {
        let a = bare.submit(&i).unwrap();
        let b = bare2.submit(&i).unwrap();
        a.wait().unwrap();
        b.wait().unwrap();
    });
    report.line(format!(
        "| bare: 2 pools at once | {} | {} | {} | – |",
        fmt_ns(p50),
        fmt_ns(p99),
        fmt_ns(p50 - w1)
    ));
    drop(bare);
    drop(bare2);
    let mut row = |name: &str, p50: f64, p99: f64, tput: f64| {
        report.line(format!(
            "| {name} | {} | {} | {} ({:.2}× W1) | {:.0} |",
            fmt_ns(p50),
            fmt_ns(p99),
            fmt_ns(p50 - w1),
            (p50 - w1) / w1,
            tput
        ));
    };
    {
        let s = Server::new(echo("A"), 64);
        let (p50, p99) = round_trips(runs, |i| {
            s.call(i).unwrap();
        });
        row("1 stage", p50, p99, throughput(&s, runs * 5, |i| i));
    }
    {
        let s = Server::new(seq((echo("A"), echo("B"))), 64);
        let (p50, p99) = round_trips(runs, |i| {
            s.call(i).unwrap();
        });
        row("2-stage seq", p50, p99, throughput(&s, runs * 5, |i| i));
    }
    {
        let s = Server::new(ensemble((echo("A"), echo("B"))), 64);
        let (p50, p99) = round_trips(runs, |i| {
            s.call(i).unwrap();
        });
        row(
            "2-member ensemble",
            p50,
            p99,
            throughput(&s, runs * 5, |i| i),
        );
    }

    // ---- 16 MiB items ----
    const BIG: usize = 16 << 20;
    let item: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
    let n_big = if quick { 10 } else { 40 };
    report.line("\n### W8 16 MiB items (1 caller back to back)\n");
    report.line("| shape | GB/s (item size / round trip) | vs 1 stage |");
    report.line("|---|---|---|");
    let gbs = |f: &mut dyn FnMut()| {
        f();
        let t = Instant::now();
        for _ in 0..n_big {
            f();
        }
        (BIG * n_big) as f64 / t.elapsed().as_secs_f64() / 1e9
    };
    let one = {
        let s = Server::new(copier("A"), 4);
        gbs(&mut || assert_eq!(s.call(item.clone()).unwrap().len(), BIG))
    };
    // The input's clone is the caller's cost in every shape; compare shapes, not absolutes.
    report.line(format!("| 1 process stage | {one:.2} | 1.00× |"));
    let two = {
        let s = Server::new(seq((copier("A"), copier("B"))), 4);
        gbs(&mut || assert_eq!(s.call(item.clone()).unwrap().len(), BIG))
    };
    report.line(format!(
        "| 2 process stages (hand-off, no parent copy) | {two:.2} | {:.2}× |",
        two / one
    ));
    let through = {
        let s = Server::new(
            seq((
                copier("A"),
                local("parent", |v: Vec<u8>| Ok(v)),
                copier("B"),
            )),
            4,
        );
        gbs(&mut || assert_eq!(s.call(item.clone()).unwrap().len(), BIG))
    };
    report.line(format!(
        "| 2 process stages through the parent (decode + encode) | {through:.2} | {:.2}× |",
        through / one
    ));

    // ---- four-stage pipeline ----
    let n_pipe = if quick { 1_000 } else { 5_000 };
    report.line("\n### W8 four-stage pipeline (stages wait 200/400/200/200 µs; window 64)\n");
    let slowest = Server::new(waiter("slowest", 400), 64);
    let alone = throughput(&slowest, n_pipe, |i| i);
    drop(slowest);
    let pipe = Server::new(
        seq((
            waiter("s0", 200),
            waiter("s1", 400),
            waiter("s2", 200),
            waiter("s3", 200),
        )),
        64,
    );
    let four = throughput(&pipe, n_pipe, |i| i);
    report.line("| shape | items/s | vs slowest stage alone |");
    report.line("|---|---|---|");
    report.line(format!("| slowest stage alone | {alone:.0} | 1.00× |"));
    report.line(format!(
        "| 4-stage pipeline | {four:.0} | {:.2}× (target ≥ 0.9×) |",
        four / alone
    ));
    report.write();
}
