//! The seed's experiment (seeds 000/001, "Benchmark"): 100 concurrent clients send requests to a
//! server with 2 workers; each request's work takes a heavy-tailed, variable time (a calibrated
//! CPU loop stands in for the model). Three servers:
//!
//! - `threads_random`: worker threads, each request sent to a random one (its own queue);
//! - `processes_random`: worker processes (two one-worker pools), random dispatch;
//! - `shared_queue`: our pool, one queue that the next idle worker pulls from.
//!
//! 5 runs each (interleaved), throughput and latency (mean, p50, p99) with their standard
//! deviation across runs. Writes `target/bench-report/dispatch.md` and `dispatch.svg`.
//!
//! A second configuration runs the same with 8 clients (about the same number of requests per
//! run), where a random queue can run dry while the other is long.
//!
//! Run: `cargo bench --bench dispatch` (full: 100 clients × 40 requests per run), or quick:
//! `STATEFUL_POOL_BENCH_QUICK=1 cargo bench --bench dispatch` (× 12).

#[path = "support/mod.rs"]
mod support;

use hdrhistogram::Histogram;
use stateful_pool::Pool;
use std::sync::mpsc;
use std::time::Instant;
use support::*;

stateful_pool::worker_hook!();

/// The seed's client count, and a second configuration with few clients, where queues can run
/// dry and dispatch matters more for throughput.
const CLIENT_COUNTS: [usize; 2] = [100, 8];
const RUNS: usize = 5;

/// A request's work in µs: a bounded Pareto (shape 1.5) from 300 µs to 20 ms, mean ≈ 0.85 ms.
fn work_us(rng: &mut Rng) -> u64 {
    let (lo, hi, a) = (300.0f64, 20_000.0f64, 1.5f64);
    let u = rng.f64();
    let x = lo / (1.0 - u * (1.0 - (lo / hi).powf(a))).powf(1.0 / a);
    x as u64
}

/// One server: handles one request (blocking the calling client thread until answered).
trait Server: Sync {
    fn call(&self, client_rng: &mut Rng, us: u64) -> u64;
}

/// A request to a worker thread: the work (µs) and where to answer.
type Request = (u64, mpsc::Sender<u64>);

/// Worker threads, each with its own queue; a request goes to a random one.
struct ThreadsRandom {
    queues: Vec<std::sync::Mutex<mpsc::Sender<Request>>>,
}

impl ThreadsRandom {
    fn new(n: usize) -> (Self, Vec<std::thread::JoinHandle<()>>) {
        let mut queues = Vec::new();
        let mut threads = Vec::new();
        for _ in 0..n {
            let (tx, rx) = mpsc::channel::<Request>();
            queues.push(std::sync::Mutex::new(tx));
            threads.push(std::thread::spawn(move || {
                while let Ok((us, reply)) = rx.recv() {
                    let _ = reply.send(burn_us(us));
                }
            }));
        }
        (ThreadsRandom { queues }, threads)
    }
}

impl Server for ThreadsRandom {
    fn call(&self, rng: &mut Rng, us: u64) -> u64 {
        let w = (rng.next_u64() % self.queues.len() as u64) as usize;
        let (tx, rx) = mpsc::channel();
        self.queues[w].lock().unwrap().send((us, tx)).unwrap();
        rx.recv().unwrap()
    }
}

/// Worker processes with random dispatch: one single-worker pool per process (each with its
/// own queue), so only the dispatch differs from the shared-queue server.
struct ProcessesRandom(Vec<Pool<Burner>>);

impl Server for ProcessesRandom {
    fn call(&self, rng: &mut Rng, us: u64) -> u64 {
        let w = (rng.next_u64() % self.0.len() as u64) as usize;
        self.0[w].execute(&us).unwrap()
    }
}

/// Our pool: one shared queue, 2 workers.
struct SharedQueue(Pool<Burner>);

impl Server for SharedQueue {
    fn call(&self, _: &mut Rng, us: u64) -> u64 {
        self.0.execute(&us).unwrap()
    }
}

struct RunResult {
    throughput: f64,
    mean_ms: f64,
    p50_ms: f64,
    p99_ms: f64,
    hist: Histogram<u64>,
}

/// One run: `clients` threads, each sending `per_client` requests back to back.
fn run(server: &dyn Server, clients: usize, per_client: usize, seed: u64) -> RunResult {
    let start = Instant::now();
    let hists: Vec<Histogram<u64>> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..clients)
            .map(|c| {
                s.spawn(move || {
                    let mut work = Rng::new(seed * 1000 + c as u64);
                    let mut pick = Rng::new(seed * 7919 + c as u64);
                    let mut h = histogram();
                    for _ in 0..per_client {
                        let us = work_us(&mut work);
                        let t0 = Instant::now();
                        server.call(&mut pick, us);
                        h.saturating_record(t0.elapsed().as_nanos() as u64);
                    }
                    h
                })
            })
            .collect();
        hs.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let elapsed = start.elapsed();
    let mut hist = histogram();
    for h in &hists {
        hist.add(h).unwrap();
    }
    RunResult {
        throughput: (clients * per_client) as f64 / elapsed.as_secs_f64(),
        mean_ms: hist.mean() / 1e6,
        p50_ms: hist.value_at_quantile(0.5) as f64 / 1e6,
        p99_ms: hist.value_at_quantile(0.99) as f64 / 1e6,
        hist,
    }
}

fn table(
    r: &mut Report,
    names: &[&str; 3],
    results: &[Vec<RunResult>],
    clients: usize,
    per_client: usize,
) {
    r.line(format!(
        "## The seed's dispatch experiment: {clients} clients ({} mode: {clients} clients × {per_client} requests per run, {RUNS} runs, 2 workers)\n",
        if quick() { "quick" } else { "full" }
    ));
    r.line("| server | throughput (req/s) | mean latency | p50 | p99 | throughput vs threads_random | vs processes_random |");
    r.line("|---|---|---|---|---|---|---|");
    let stat = |i: usize, f: fn(&RunResult) -> f64| {
        mean_std(&results[i].iter().map(f).collect::<Vec<_>>())
    };
    let base_t = stat(0, |x| x.throughput).0;
    let base_p = stat(1, |x| x.throughput).0;
    for (i, name) in names.iter().enumerate() {
        let t = stat(i, |x| x.throughput);
        let m = stat(i, |x| x.mean_ms);
        let p50 = stat(i, |x| x.p50_ms);
        let p99 = stat(i, |x| x.p99_ms);
        r.line(format!(
            "| {name} | {:.0} ± {:.0} | {:.2} ± {:.2} ms | {:.2} ± {:.2} ms | {:.2} ± {:.2} ms | {:.2}× | {:.2}× |",
            t.0, t.1, m.0, m.1, p50.0, p50.1, p99.0, p99.1, t.0 / base_t, t.0 / base_p
        ));
    }
    r.line("\n(mean ± standard deviation across the runs)\n");
}

fn mean_std(v: &[f64]) -> (f64, f64) {
    let n = v.len() as f64;
    let m = v.iter().sum::<f64>() / n;
    let var = v.iter().map(|x| (x - m).powi(2)).sum::<f64>() / (n - 1.0).max(1.0);
    (m, var.sqrt())
}

fn main() {
    // `cargo bench` passes `--bench`; nothing to parse.
    let per_client = if quick() { 12 } else { 40 };
    let mut r = Report::new("dispatch");
    let names = ["threads_random", "processes_random", "shared_queue"];

    let (threads, handles) = ThreadsRandom::new(2);
    let procs = ProcessesRandom(
        (0..2)
            .map(|_| {
                let p = Pool::<Burner>::builder().queue_size(128).build().unwrap();
                p.spawn(&()).unwrap();
                p
            })
            .collect(),
    );
    let shared = {
        let p = Pool::<Burner>::builder().queue_size(128).build().unwrap();
        for o in p.spawn_many([&(), &()]) {
            o.unwrap();
        }
        SharedQueue(p)
    };
    let servers: [&dyn Server; 3] = [&threads, &procs, &shared];

    // Warm-up, then per configuration RUNS rounds, the servers interleaved within each round.
    for s in servers {
        run(s, 8, 2, 999);
    }
    let mut all_results = Vec::new();
    for clients in CLIENT_COUNTS {
        // About the same number of requests per run in each configuration.
        let per_client = per_client * 100 / clients;
        let mut results: Vec<Vec<RunResult>> = (0..3).map(|_| Vec::new()).collect();
        for round in 0..RUNS {
            for (i, s) in servers.iter().enumerate() {
                let res = run(*s, clients, per_client, round as u64 + 1);
                println!(
                    "{clients} clients, run {} {:>16}: {:7.1} req/s, mean {:.2} ms, p50 {:.2} ms, p99 {:.2} ms",
                    round + 1,
                    names[i],
                    res.throughput,
                    res.mean_ms,
                    res.p50_ms,
                    res.p99_ms
                );
                results[i].push(res);
            }
        }
        table(&mut r, &names, &results, clients, per_client);
        all_results.push((clients, results));
    }
    drop(threads);
    for h in handles {
        let _ = h.join();
    }
    let svg = plot(&all_results);
    let dir = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("target/bench-report");
    let _ = std::fs::create_dir_all(&dir);
    let _ = std::fs::write(dir.join("dispatch.svg"), svg);
    r.write();
}

/// An SVG with one row per client count: throughput per server (bars, ± one standard
/// deviation), and each server's latency distribution (CDF over all runs, log time axis).
fn plot(rows: &[(usize, Vec<Vec<RunResult>>)]) -> String {
    let (w, h) = (960.0, 420.0 * rows.len() as f64);
    let mut s = format!(
        "<svg xmlns=\"http://www.w3.org/2000/svg\" width=\"{w}\" height=\"{h}\" font-family=\"sans-serif\" font-size=\"12\">\n\
         <rect width=\"100%\" height=\"100%\" fill=\"white\"/>\n"
    );
    for (k, (clients, results)) in rows.iter().enumerate() {
        plot_row(&mut s, 420.0 * k as f64, *clients, results);
    }
    s += "</svg>\n";
    s
}

/// A panel's title and its two axes; `(x0, y0, pw, ph)` is the plot area.
fn frame(s: &mut String, (x0, y0, pw, ph): (f64, f64, f64, f64), top: f64, title: &str) {
    *s += &format!(
        "<text x=\"{}\" y=\"{}\" text-anchor=\"middle\" font-size=\"14\">{title}</text>\n",
        x0 + pw / 2.0,
        top + 24.0
    );
    *s += &format!(
        "<line x1=\"{x0}\" y1=\"{}\" x2=\"{}\" y2=\"{}\" stroke=\"black\"/>\n",
        y0 + ph,
        x0 + pw,
        y0 + ph
    );
    *s += &format!(
        "<line x1=\"{x0}\" y1=\"{y0}\" x2=\"{x0}\" y2=\"{}\" stroke=\"black\"/>\n",
        y0 + ph
    );
}

fn plot_row(out: &mut String, top: f64, clients: usize, results: &[Vec<RunResult>]) {
    let mut s = String::new();
    let colors = ["#d62728", "#ff7f0e", "#1f77b4"];
    let labels = [
        ("threads", "random dispatch"),
        ("processes", "random dispatch"),
        ("shared queue", "(stateful-pool)"),
    ];
    // Panel 1: throughput bars.
    let (x0, y0, pw, ph) = (60.0, top + 40.0, 300.0, 300.0);
    let tp: Vec<(f64, f64)> = results
        .iter()
        .map(|rs| mean_std(&rs.iter().map(|x| x.throughput).collect::<Vec<_>>()))
        .collect();
    let max = tp.iter().map(|(m, sd)| m + sd).fold(0.0, f64::max) * 1.15;
    frame(
        &mut s,
        (x0, y0, pw, ph),
        top,
        &format!("{clients} clients: throughput (requests/s, mean ± sd of 5 runs)"),
    );
    for k in 0..=4 {
        let v = max * k as f64 / 4.0;
        let y = y0 + ph - ph * k as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{:.0}</text>\n",
            x0 - 4.0,
            y + 4.0,
            v
        );
        s += &format!(
            "<line x1=\"{x0}\" y1=\"{y}\" x2=\"{}\" y2=\"{y}\" stroke=\"#ddd\"/>\n",
            x0 + pw
        );
    }
    for (i, (m, sd)) in tp.iter().enumerate() {
        let bw = pw / 3.0 * 0.6;
        let cx = x0 + pw / 3.0 * (i as f64 + 0.5);
        let bh = ph * m / max;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"{bw}\" height=\"{bh}\" fill=\"{}\"/>\n",
            cx - bw / 2.0,
            y0 + ph - bh,
            colors[i]
        );
        let (ya, yb) = (y0 + ph - ph * (m + sd) / max, y0 + ph - ph * (m - sd) / max);
        s += &format!(
            "<line x1=\"{cx}\" y1=\"{ya}\" x2=\"{cx}\" y2=\"{yb}\" stroke=\"black\" stroke-width=\"2\"/>\n"
        );
        s += &format!(
            "<text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\">{}</text>\n\
             <text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\" font-size=\"10\">{}</text>\n",
            y0 + ph + 16.0,
            labels[i].0,
            y0 + ph + 29.0,
            labels[i].1
        );
        s += &format!(
            "<text x=\"{cx}\" y=\"{}\" text-anchor=\"middle\">{:.0}</text>\n",
            y0 + ph - bh - 6.0,
            m
        );
    }
    // Panel 2: latency CDFs, log x axis from 0.1 ms to 1 s.
    let (x0, y0, pw, ph) = (470.0, top + 40.0, 450.0, 300.0);
    let (lmin, lmax) = (0.1f64.log10(), 1000f64.log10());
    let xs = |ms: f64| x0 + pw * ((ms.max(0.1).log10() - lmin) / (lmax - lmin)).clamp(0.0, 1.0);
    frame(
        &mut s,
        (x0, y0, pw, ph),
        top,
        &format!("{clients} clients: latency distribution (CDF of all requests, all runs)"),
    );
    for ms in [0.1, 1.0, 10.0, 100.0, 1000.0] {
        let x = xs(ms);
        s += &format!(
            "<line x1=\"{x}\" y1=\"{y0}\" x2=\"{x}\" y2=\"{}\" stroke=\"#ddd\"/>\n",
            y0 + ph
        );
        s += &format!(
            "<text x=\"{x}\" y=\"{}\" text-anchor=\"middle\">{ms} ms</text>\n",
            y0 + ph + 16.0
        );
    }
    for k in 0..=4 {
        let y = y0 + ph - ph * k as f64 / 4.0;
        s += &format!(
            "<text x=\"{}\" y=\"{}\" text-anchor=\"end\">{}%</text>\n",
            x0 - 4.0,
            y + 4.0,
            k * 25
        );
    }
    for (i, rs) in results.iter().enumerate() {
        let mut all = histogram();
        for r in rs {
            all.add(&r.hist).unwrap();
        }
        let mut pts = String::new();
        for q in 0..=200 {
            let q = q as f64 / 200.0;
            let ms = all.value_at_quantile(q) as f64 / 1e6;
            pts += &format!("{:.1},{:.1} ", xs(ms), y0 + ph - ph * q);
        }
        s += &format!(
            "<polyline fill=\"none\" stroke=\"{}\" stroke-width=\"2\" points=\"{pts}\"/>\n",
            colors[i]
        );
        let ly = y0 + 14.0 + 16.0 * i as f64;
        s += &format!(
            "<rect x=\"{}\" y=\"{}\" width=\"12\" height=\"4\" fill=\"{}\"/>\n",
            x0 + 10.0,
            ly - 4.0,
            colors[i]
        );
        s += &format!(
            "<text x=\"{}\" y=\"{ly}\">{} {}</text>\n",
            x0 + 28.0,
            labels[i].0,
            labels[i].1
        );
    }
    out.push_str(&s);
}
