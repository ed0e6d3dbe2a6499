//! W7: worker-side dynamic batching (`../shared/docs/workloads.md`, issue "Batching workers").
//!
//! A calibrated "model" whose batch of `b` tasks costs `2 ms + 0.1 ms × b` (a spin on the
//! clock, so the cost is the same whatever else the machine runs), `max_batch` 32, 2 workers.
//! Four batch rules in the same run:
//!
//! - `none`: no batching (each task costs 2.1 ms);
//! - `mpservice`: wait up to 10 ms from the first task the worker took, even if another worker
//!   is idle (mpservice's `batch_wait_time`);
//! - `triton`: wait up to 5 ms from the oldest task's submission, even if another worker is
//!   idle (Triton's `max_queue_delay`);
//! - `ours`: the default, work-conserving (a free worker takes what is queued, up to 32, and
//!   never waits);
//! - `ours_5ms`: up to 5 ms from the oldest task's submission (Triton's knob), but never while
//!   the other worker is idle, so a lone request is not kept waiting;
//! - `ours_sat`: as `ours_5ms`, but waiting only while batches fill (the worker's previous
//!   batch was full): work-conserving under light load, full batches at saturation.
//!
//! Closed loop with 1, 8 and 64 callers (each runs `execute` back to back), and open loop
//! (Poisson arrivals, latency from each request's scheduled time, so a backlog counts) at 20,
//! 50, 80 and 95 % of the batched capacity (2 × 32 tasks per 5.2 ms ≈ 12.3 k tasks/s).
//! Prints a table, checks the targets, and writes `target/bench-report/batching.md` and
//! `batching.svg` (plotters).
//!
//! Run: `cargo bench --bench batching` (≈ 3 minutes), or quick:
//! `STATEFUL_POOL_BENCH_QUICK=1 cargo bench --bench batching` (≈ 1 minute).

use hdrhistogram::Histogram;
use stateful_pool::{BatchPolicy, BatchTask, BoxError, Pool, TaskContext, Worker, WorkerContext};
use std::fmt::Write as _;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

const MAX_BATCH: usize = 32;
const WORKERS: usize = 2;
const FIXED: Duration = Duration::from_millis(2);
const PER_TASK: Duration = Duration::from_micros(100);

/// The cost of a batch of `b` tasks.
fn cost(b: usize) -> Duration {
    FIXED + PER_TASK * b as u32
}

/// The ideal batched capacity, tasks per second.
fn capacity() -> f64 {
    WORKERS as f64 * MAX_BATCH as f64 / cost(MAX_BATCH).as_secs_f64()
}

fn burn(d: Duration) {
    let end = Instant::now() + d;
    while Instant::now() < end {
        std::hint::spin_loop();
    }
}

/// The calibrated model.
struct Model;

impl Worker for Model {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Model, ()))
    }
    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        burn(cost(1));
        Ok(t.to_native())
    }
    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, u64>],
    ) -> Result<Vec<Result<u64, BoxError>>, BoxError> {
        burn(cost(batch.len()));
        Ok(batch.iter().map(|t| Ok(t.task.to_native())).collect())
    }
}

#[derive(Clone, Copy)]
struct Rule {
    name: &'static str,
    policy: fn() -> BatchPolicy,
}

/// The delay `ours` and `triton` use.
const DELAY: Duration = Duration::from_millis(5);

const RULES: [Rule; 6] = [
    Rule {
        name: "none",
        policy: BatchPolicy::none,
    },
    Rule {
        name: "mpservice",
        policy: || {
            BatchPolicy::new(MAX_BATCH)
                .max_delay(Duration::from_millis(10))
                .delay_from_first_taken(true)
                .wait_while_others_idle(true)
        },
    },
    Rule {
        name: "triton",
        policy: || {
            BatchPolicy::new(MAX_BATCH)
                .max_delay(DELAY)
                .wait_while_others_idle(true)
        },
    },
    Rule {
        name: "ours",
        policy: || BatchPolicy::new(MAX_BATCH),
    },
    Rule {
        name: "ours_5ms",
        policy: || BatchPolicy::new(MAX_BATCH).max_delay(DELAY),
    },
    Rule {
        name: "ours_sat",
        policy: || {
            BatchPolicy::new(MAX_BATCH)
                .max_delay(DELAY)
                .only_when_saturated(true)
        },
    },
];

#[derive(Clone, Copy, PartialEq)]
enum Load {
    Closed(usize),
    Open(f64),
}

impl Load {
    fn label(&self) -> String {
        match self {
            Load::Closed(c) => format!("closed {c}"),
            Load::Open(f) => format!("open {:.0}%", f * 100.0),
        }
    }
}

struct Point {
    rule: &'static str,
    load: Load,
    tasks_per_s: f64,
    p50: Duration,
    p99: Duration,
    mean_batch: f64,
}

fn quick() -> bool {
    std::env::var_os("STATEFUL_POOL_BENCH_QUICK").is_some_and(|v| v != "0")
}

fn histogram() -> Histogram<u64> {
    Histogram::new_with_bounds(1, 600_000_000_000, 3).unwrap()
}

/// Closed loop: `callers` threads, each running `execute` back to back for `run`.
fn closed(pool: &Pool<Model>, callers: usize, run: Duration) -> (f64, Histogram<u64>) {
    let stop = AtomicBool::new(false);
    let done = AtomicU64::new(0);
    let start = Instant::now();
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..callers)
            .map(|i| {
                let (stop, done) = (&stop, &done);
                s.spawn(move || {
                    let mut h = histogram();
                    // Bounded: the run's time, and a generous count.
                    for k in 0..1_000_000u64 {
                        if stop.load(Ordering::Relaxed) {
                            break;
                        }
                        let t = Instant::now();
                        let v = pool.execute(&(i as u64 * 1_000_000 + k)).expect("task");
                        assert_eq!(v, i as u64 * 1_000_000 + k);
                        h.record(t.elapsed().as_nanos() as u64).unwrap();
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    h
                })
            })
            .collect();
        std::thread::sleep(run);
        stop.store(true, Ordering::Relaxed);
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    let mut all = histogram();
    for h in hists {
        all.add(h).unwrap();
    }
    (done.load(Ordering::Relaxed) as f64 / secs, all)
}

/// Open loop: Poisson arrivals at `rate` per second for `run`; each request's latency counts
/// from its scheduled arrival (a backlog shows). Requests are awaited on a small runtime, so
/// no thread is parked per request.
fn open(pool: &Arc<Pool<Model>>, rate: f64, run: Duration) -> (f64, Histogram<u64>) {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .build()
        .unwrap();
    let (tx, rx) = std::sync::mpsc::channel::<u64>();
    let start = Instant::now();
    let mut next = start;
    let mut rng = 0x9e37_79b9_7f4a_7c15u64;
    let mut n = 0u64;
    let max = (rate * run.as_secs_f64() * 1.5) as u64 + 10;
    while next < start + run && n < max {
        // Exponential inter-arrival time.
        rng ^= rng << 13;
        rng ^= rng >> 7;
        rng ^= rng << 17;
        let u = ((rng >> 11) as f64 + 0.5) / (1u64 << 53) as f64;
        next += Duration::from_secs_f64(-u.ln() / rate);
        // Sleep through long gaps (the model's workers need the CPU), spin the last stretch.
        let gap = next.saturating_duration_since(Instant::now());
        if gap > Duration::from_micros(300) {
            std::thread::sleep(gap - Duration::from_micros(200));
        }
        while Instant::now() < next {
            std::hint::spin_loop();
        }
        let scheduled = next;
        let (pool, tx) = (pool.clone(), tx.clone());
        let id = n;
        // Submit here, in arrival order (a full queue then delays the generator, and the
        // lateness is in the latency since it counts from `scheduled`).
        let h = pool.submit(&id).expect("submit");
        rt.spawn(async move {
            let v = h.await.expect("task");
            assert_eq!(v, id);
            let _ = tx.send(scheduled.elapsed().as_nanos() as u64);
        });
        n += 1;
    }
    drop(tx);
    let mut h = histogram();
    // Bounded: every request sends one value; the sender side is gone once all are done.
    for v in rx.iter().take(n as usize) {
        h.record(v.max(1)).unwrap();
    }
    let secs = start.elapsed().as_secs_f64();
    rt.shutdown_timeout(Duration::from_secs(10));
    (n as f64 / secs, h)
}

fn main() {
    stateful_pool::init();
    if std::env::args().any(|a| a == "--list") {
        println!("batching: bench");
        return;
    }
    let run = if quick() {
        Duration::from_millis(1500)
    } else {
        Duration::from_secs(5)
    };
    let loads = [
        Load::Closed(1),
        Load::Closed(8),
        Load::Closed(64),
        Load::Open(0.20),
        Load::Open(0.50),
        Load::Open(0.80),
        Load::Open(0.95),
    ];
    let mut points = Vec::new();
    for rule in RULES {
        let pool = Arc::new(
            Pool::<Model>::builder()
                .queue_size(1024)
                .max_workers(WORKERS)
                .batch_policy((rule.policy)())
                .build()
                .expect("pool"),
        );
        for r in pool.spawn_n(&(), WORKERS) {
            r.expect("spawn");
        }
        // Warm up.
        let _ = closed(&pool, 4, Duration::from_millis(200));
        for load in loads {
            let before = pool.stats().batching;
            let (tput, h) = match load {
                Load::Closed(c) => closed(&pool, c, run),
                Load::Open(f) => open(&pool, f * capacity(), run),
            };
            let after = pool.stats().batching;
            let batches = after.batches - before.batches;
            let mean_batch = if batches == 0 {
                1.0
            } else {
                (after.tasks - before.tasks) as f64 / batches as f64
            };
            let p = Point {
                rule: rule.name,
                load,
                tasks_per_s: tput,
                p50: Duration::from_nanos(h.value_at_quantile(0.50)),
                p99: Duration::from_nanos(h.value_at_quantile(0.99)),
                mean_batch,
            };
            eprintln!(
                "{:>10} {:>10}: {:>8.0} tasks/s  p50 {:>9.2?}  p99 {:>9.2?}  mean batch {:.1}",
                p.rule,
                load.label(),
                p.tasks_per_s,
                p.p50,
                p.p99,
                p.mean_batch
            );
            points.push(p);
        }
        drop(pool);
    }
    let report = report(&points, &loads);
    println!("{report}");
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("batching.md"), &report);
    if let Err(e) = plot(&points, &loads, &dir.join("batching.svg")) {
        eprintln!("plot failed: {e}");
    }
}

fn find<'a>(points: &'a [Point], rule: &str, load: Load) -> &'a Point {
    points
        .iter()
        .find(|p| p.rule == rule && p.load == load)
        .expect("measured")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1e3
}

fn report(points: &[Point], loads: &[Load]) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "## W7: dynamic batching ({} mode)\n\nModel: 2 ms + 0.1 ms × batch, max_batch {MAX_BATCH}, \
         {WORKERS} workers; batched capacity {:.0} tasks/s.\n",
        if quick() { "quick" } else { "full" },
        capacity()
    );
    let _ = writeln!(
        s,
        "| load | rule | tasks/s | p50 ms | p99 ms | mean batch |\n|---|---|---|---|---|---|"
    );
    for &load in loads {
        for rule in RULES {
            let p = find(points, rule.name, load);
            let _ = writeln!(
                s,
                "| {} | {} | {:.0} | {:.2} | {:.2} | {:.1} |",
                load.label(),
                rule.name,
                p.tasks_per_s,
                ms(p.p50),
                ms(p.p99),
                p.mean_batch
            );
        }
    }
    // The targets, for our default and for the saturation-aware rule.
    let none1 = find(points, "none", Load::Closed(1));
    let none64 = find(points, "none", Load::Closed(64));
    let _ = writeln!(s, "\n| rule | target | measured | met |\n|---|---|---|---|");
    let yes = |b: bool| if b { "yes" } else { "no" };
    for (ours_name, delay) in [("ours", Duration::ZERO), ("ours_sat", DELAY)] {
        let ours1 = find(points, ours_name, Load::Closed(1));
        let ours64 = find(points, ours_name, Load::Closed(64));
        let ours80 = find(points, ours_name, Load::Open(0.80));
        let bound = delay + cost(MAX_BATCH) * 2;
        let r = ms(ours1.p50) / ms(none1.p50);
        let _ = writeln!(
            s,
            "| {ours_name} | 1 caller: p50 within 5 % of no batching | {r:.3}× | {} |",
            yes(r <= 1.05)
        );
        let ideal = ours64.tasks_per_s / capacity();
        let _ = writeln!(
            s,
            "| {ours_name} | 64 callers: ≥ 0.9× the ideal {:.0}/s | {ideal:.2}× | {} |",
            capacity(),
            yes(ideal >= 0.9)
        );
        let vs = ours64.tasks_per_s / none64.tasks_per_s;
        let _ = writeln!(
            s,
            "| {ours_name} | 64 callers: ≥ 8× no batching | {vs:.1}× | {} |",
            yes(vs >= 8.0)
        );
        let _ = writeln!(
            s,
            "| {ours_name} | open 80 %: p99 ≤ max_delay + 2 × full batch ({:.1} ms) | {:.2} ms | {} |",
            ms(bound),
            ms(ours80.p99),
            yes(ours80.p99 <= bound)
        );
        for &load in loads {
            if matches!(load, Load::Closed(1)) && ours_name == "ours_sat" {
                continue;
            }
            let ours = find(points, ours_name, load);
            let best_other = ["mpservice", "triton"]
                .iter()
                .map(|r| find(points, r, load).p99)
                .min()
                .unwrap();
            let _ = writeln!(
                s,
                "| {ours_name} | {}: p99 ahead of mpservice's and Triton's rules | {:.2} vs {:.2} ms | {} |",
                load.label(),
                ms(ours.p99),
                ms(best_other),
                yes(ours.p99 <= best_other)
            );
        }
    }
    s
}

fn plot(
    points: &[Point],
    loads: &[Load],
    path: &std::path::Path,
) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    let root = SVGBackend::new(path, (900, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(450);
    let opens: Vec<f64> = loads
        .iter()
        .filter_map(|l| match l {
            Load::Open(f) => Some(*f * 100.0),
            _ => None,
        })
        .collect();
    let colors = [BLACK, RED, BLUE, GREEN, MAGENTA, CYAN];
    // Left: open-loop p99 (log scale) against offered load.
    let max_p99 = points
        .iter()
        .map(|p| ms(p.p99))
        .fold(1.0f64, f64::max)
        .max(10.0);
    let mut chart = ChartBuilder::on(&left)
        .caption("open loop: p99 latency", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(50)
        .build_cartesian_2d(15.0f64..100.0, (1.0f64..max_p99 * 1.5).log_scale())?;
    chart
        .configure_mesh()
        .x_desc("offered load, % of batched capacity")
        .y_desc("p99, ms")
        .draw()?;
    for (rule, color) in RULES.iter().zip(colors) {
        let series: Vec<(f64, f64)> = opens
            .iter()
            .map(|&f| {
                (
                    f,
                    ms(find(points, rule.name, Load::Open(f / 100.0)).p99).max(1.0),
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(rule.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    // Right: closed-loop throughput against callers.
    let max_t = points.iter().map(|p| p.tasks_per_s).fold(1.0f64, f64::max);
    let mut chart = ChartBuilder::on(&right)
        .caption("closed loop: throughput", ("sans-serif", 16))
        .margin(10)
        .x_label_area_size(35)
        .y_label_area_size(60)
        .build_cartesian_2d((1u32..64u32).log_scale(), 0.0f64..max_t * 1.15)?;
    chart
        .configure_mesh()
        .x_desc("concurrent callers")
        .y_desc("tasks/s")
        .draw()?;
    for (rule, color) in RULES.iter().zip(colors) {
        let series: Vec<(u32, f64)> = [1u32, 8, 64]
            .iter()
            .map(|&c| {
                (
                    c,
                    find(points, rule.name, Load::Closed(c as usize)).tasks_per_s,
                )
            })
            .collect();
        chart
            .draw_series(LineSeries::new(series.clone(), color.stroke_width(2)))?
            .label(rule.name)
            .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
        chart.draw_series(series.iter().map(|&p| Circle::new(p, 3, color.filled())))?;
    }
    chart
        .configure_series_labels()
        .position(SeriesLabelPosition::UpperLeft)
        .border_style(BLACK)
        .background_style(WHITE)
        .draw()?;
    root.present()?;
    Ok(())
}
