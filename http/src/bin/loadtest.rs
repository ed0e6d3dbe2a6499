//! `loadtest`: the service under load, through the pool and directly (the same handler calling
//! the same preprocessing and model code in-process, no pool), side by side in one run: closed
//! loops at 1, 8 and 100 connections and open loops at fixed rates. Uses `oha` (`cargo install
//! oha`) when it is installed, else this crate's own generator (said in the output). Prints a
//! Markdown table with the pool's overhead per request, and writes the numbers (JSON) and a
//! plot (SVG) into `--out`.
//!
//! Everything runs on the loopback and stops by itself.

use bytes::Bytes;
use clap::Parser;
use plotters::prelude::*;
use serde::{Deserialize, Serialize};
use stateful_pool_http::client::{self, Live, LoadSpec, Shape};
use stateful_pool_http::instance::{Instance, find_program, service_program};
use stateful_pool_http::samples;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::Arc;
use std::time::Duration;

/// Load-tests the service through the pool and directly, side by side.
#[derive(Debug, Parser)]
#[command(name = "loadtest", version, about)]
struct Args {
    /// Seconds per load point.
    #[arg(long, default_value_t = 5.0)]
    duration_s: f64,
    /// Closed-loop connection counts.
    #[arg(long, value_delimiter = ',', default_value = "1,8,100")]
    connections: Vec<usize>,
    /// Open-loop rates (requests per second); default: 25, 50 and 75 % of the pool's
    /// throughput at 8 connections.
    #[arg(long, value_delimiter = ',')]
    rates: Vec<f64>,
    /// Side of the request image (64: a small request, a PNG of a few hundred bytes).
    #[arg(long, default_value_t = samples::DEFAULT_SIDE)]
    side: u32,
    /// Use this crate's generator even when oha is installed.
    #[arg(long)]
    no_oha: bool,
    /// Folder for the JSON results and the SVG plot.
    #[arg(long, default_value = "benches/results/http")]
    out: PathBuf,
    /// Only redraw the plot from this JSON file of an earlier run (written beside it).
    #[arg(long)]
    replot: Option<PathBuf>,
    /// Extra flags for both service instances (e.g. `--worker-cpus=1`).
    #[arg(long, allow_hyphen_values = true)]
    service_flag: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Point {
    mode: String,
    load: String,
    connections: Option<usize>,
    rate: Option<f64>,
    generator: String,
    ok_per_s: f64,
    p50_us: f64,
    p99_us: f64,
    errors: u64,
}

fn main() -> ExitCode {
    let a = Args::parse();
    if !(a.duration_s > 0.0 && a.duration_s <= 300.0) {
        eprintln!("error: --duration-s must be in (0, 300]");
        return ExitCode::from(2);
    }
    if let Some(json) = &a.replot {
        let r = std::fs::read(json)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Vec<Point>>(&b).map_err(|e| e.to_string()))
            .and_then(|pts| plot(&pts, &json.with_extension("svg")).map_err(|e| e.to_string()));
        return match r {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: {e}");
                ExitCode::FAILURE
            }
        };
    }
    match run(&a) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::FAILURE
        }
    }
}

/// oha on `PATH`, or where `cargo install` puts it.
fn oha() -> Option<PathBuf> {
    let cargo_bin: Vec<PathBuf> = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin"))
        .into_iter()
        .collect();
    find_program("oha", &cargo_bin)
}

fn run(a: &Args) -> Result<(), String> {
    let program = service_program();
    let start = |mode: &str| {
        // Capacity for the largest closed loop (the default 64 would answer 503 beyond it).
        let capacity = a.connections.iter().max().copied().unwrap_or(1).max(64) * 2;
        let mut args: Vec<String> = [
            "--listen",
            "127.0.0.1:0",
            "--mode",
            mode,
            "--instance",
            mode,
            "--capacity",
            &capacity.to_string(),
        ]
        .map(String::from)
        .to_vec();
        args.extend(a.service_flag.iter().cloned());
        Instance::start(&program, &args, Duration::from_secs(60))
    };
    let direct = start("direct")?;
    let pool = start("pool")?;
    let body = samples::png(0, a.side);
    std::fs::create_dir_all(&a.out).map_err(|e| format!("{}: {e}", a.out.display()))?;
    let body_file = a.out.join(format!("request-{}px.png", a.side));
    std::fs::write(&body_file, &body).map_err(|e| e.to_string())?;
    let oha = if a.no_oha { None } else { oha() };
    let generator = if oha.is_some() { "oha" } else { "loadgen" };
    println!(
        "service: {} (release build?), request: a {}×{} PNG of {} bytes, generator: {generator}{}",
        program.display(),
        a.side,
        a.side,
        body.len(),
        if oha.is_none() {
            " (oha is not installed: `cargo install oha`)"
        } else {
            ""
        }
    );
    let rt = tokio::runtime::Runtime::new().map_err(|e| e.to_string())?;
    let secs = a.duration_s;
    let measure = |addr: SocketAddr, mode: &'static str, shape: Shape| -> Result<Point, String> {
        let (connections, rate, load) = match shape {
            Shape::Closed { connections } => (
                Some(connections),
                None,
                format!("closed, {connections} conn"),
            ),
            Shape::Open { rate, .. } => (None, Some(rate), format!("open, {rate:.0}/s")),
        };
        let (ok_per_s, p50_us, p99_us, errors) = match &oha {
            Some(oha) => run_oha(oha, addr, &body_file, shape, secs)?,
            None => {
                let mut spec = LoadSpec::closed(
                    addr,
                    "/predict",
                    Bytes::from(body.clone()),
                    1,
                    Duration::from_secs_f64(secs),
                );
                spec.shape = shape;
                let r = rt.block_on(client::run(spec, Arc::new(Live::default())))?;
                (
                    r.ok_per_s,
                    r.latency.p50_us,
                    r.latency.p99_us,
                    r.failed() + r.dropped,
                )
            }
        };
        let p = Point {
            mode: mode.to_string(),
            load,
            connections,
            rate,
            generator: generator.to_string(),
            ok_per_s,
            p50_us,
            p99_us,
            errors,
        };
        println!(
            "  {:<7} {:<18} {:>8.0} req/s   p50 {:>8.0} µs   p99 {:>8.0} µs   errors {}",
            p.mode, p.load, p.ok_per_s, p.p50_us, p.p99_us, p.errors
        );
        Ok(p)
    };
    // Warm both up.
    let warm = Duration::from_secs_f64(secs.min(1.0));
    for inst in [&direct, &pool] {
        let spec = LoadSpec::closed(inst.addr, "/predict", Bytes::from(body.clone()), 8, warm);
        rt.block_on(client::run(spec, Arc::new(Live::default())))?;
    }
    let mut points = Vec::new();
    for &c in &a.connections {
        for (inst, mode) in [(&direct, "direct"), (&pool, "pool")] {
            points.push(measure(inst.addr, mode, Shape::Closed { connections: c })?);
        }
    }
    let rates = if a.rates.is_empty() {
        let at8 = points
            .iter()
            .find(|p| p.mode == "pool" && p.connections == Some(8))
            .map_or(400.0, |p| p.ok_per_s);
        [0.25, 0.5, 0.75]
            .map(|f| (at8 * f / 10.0).round().max(1.0) * 10.0)
            .to_vec()
    } else {
        a.rates.clone()
    };
    for &r in &rates {
        for (inst, mode) in [(&direct, "direct"), (&pool, "pool")] {
            let shape = Shape::Open {
                rate: r,
                max_outstanding: 1000,
            };
            points.push(measure(inst.addr, mode, shape)?);
        }
    }
    let mut direct = direct;
    let mut pool = pool;
    let _ = direct.terminate(Duration::from_secs(10));
    let _ = pool.terminate(Duration::from_secs(10));

    print_table(&points);
    let json = a.out.join("loadtest.json");
    std::fs::write(
        &json,
        serde_json::to_string_pretty(&points).unwrap_or_default(),
    )
    .map_err(|e| e.to_string())?;
    let svg = a.out.join("loadtest.svg");
    plot(&points, &svg).map_err(|e| format!("plotting: {e}"))?;
    println!("\nwrote {} and {}", json.display(), svg.display());
    Ok(())
}

/// Runs oha for one load point: (ok/s, p50 µs, p99 µs, errors).
fn run_oha(
    oha: &Path,
    addr: SocketAddr,
    body: &Path,
    shape: Shape,
    secs: f64,
) -> Result<(f64, f64, f64, u64), String> {
    let mut cmd = Command::new(oha);
    cmd.args([
        "--no-tui",
        "--output-format",
        "json",
        "-m",
        "POST",
        "-T",
        "image/png",
        "-z",
    ])
    .arg(format!("{secs}s"))
    .arg("-D")
    .arg(body);
    match shape {
        Shape::Closed { connections } => {
            cmd.args(["-c", &connections.to_string()]);
        }
        Shape::Open { rate, .. } => {
            // Enough connections that the rate, not the connections, limits; latency counted
            // from each request's scheduled time.
            cmd.args(["-c", "100", "-q", &rate.to_string(), "--latency-correction"]);
        }
    }
    cmd.arg(format!("http://{addr}/predict"));
    let out = cmd.output().map_err(|e| format!("running oha: {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "oha failed: {}",
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    let v: serde_json::Value =
        serde_json::from_slice(&out.stdout).map_err(|e| format!("oha's JSON: {e}"))?;
    let codes = v["statusCodeDistribution"]
        .as_object()
        .cloned()
        .unwrap_or_default();
    let ok: u64 = codes
        .iter()
        .filter(|(k, _)| k.starts_with('2'))
        .map(|(_, n)| n.as_u64().unwrap_or(0))
        .sum();
    let bad: u64 = codes
        .iter()
        .filter(|(k, _)| !k.starts_with('2'))
        .map(|(_, n)| n.as_u64().unwrap_or(0))
        .sum();
    // oha's own "aborted due to deadline" are the requests cut off at the end of the run.
    let errors: u64 = v["errorDistribution"]
        .as_object()
        .map(|m| {
            m.iter()
                .filter(|(k, _)| !k.contains("deadline"))
                .map(|(_, n)| n.as_u64().unwrap_or(0))
                .sum()
        })
        .unwrap_or(0);
    let total = v["summary"]["total"].as_f64().unwrap_or(secs);
    let p = |q: &str| v["latencyPercentiles"][q].as_f64().unwrap_or(f64::NAN) * 1e6;
    Ok((ok as f64 / total, p("p50"), p("p99"), bad + errors))
}

fn print_table(points: &[Point]) {
    println!(
        "\n| load | direct req/s | pool req/s | direct p50 | pool p50 | pool − direct p50 | direct p99 | pool p99 | errors (direct/pool) |"
    );
    println!("|---|---|---|---|---|---|---|---|---|");
    for pair in points.chunks(2) {
        let [d, p] = pair else { continue };
        println!(
            "| {} | {:.0} | {:.0} | {:.0} µs | {:.0} µs | {:+.0} µs | {:.0} µs | {:.0} µs | {}/{} |",
            d.load,
            d.ok_per_s,
            p.ok_per_s,
            d.p50_us,
            p.p50_us,
            p.p50_us - d.p50_us,
            d.p99_us,
            p.p99_us,
            d.errors,
            p.errors
        );
    }
}

fn plot(points: &[Point], file: &Path) -> Result<(), Box<dyn std::error::Error>> {
    let root = SVGBackend::new(file, (1000, 420)).into_drawing_area();
    root.fill(&WHITE)?;
    let (left, right) = root.split_horizontally(500);
    let series = |mode: &str, closed: bool, pick: fn(&Point) -> f64| -> Vec<(f64, f64)> {
        points
            .iter()
            .filter(|p| p.mode == mode && p.connections.is_some() == closed)
            .map(|p| {
                (
                    p.connections
                        .map_or_else(|| p.rate.unwrap_or(0.0), |c| c as f64),
                    pick(p) / 1000.0,
                )
            })
            .collect()
    };
    let ymax = points.iter().map(|p| p.p99_us / 1000.0).fold(1.0, f64::max) * 1.5;
    for (area, closed, title, xlabel) in [
        (
            &left,
            true,
            "closed loop: latency vs connections",
            "connections (log)",
        ),
        (
            &right,
            false,
            "open loop: latency vs offered rate",
            "requests per second",
        ),
    ] {
        let xs: Vec<f64> = series("pool", closed, |p| p.p50_us)
            .iter()
            .map(|x| x.0)
            .collect();
        if xs.is_empty() {
            continue;
        }
        let (x0, x1) = (
            xs.iter().cloned().fold(f64::MAX, f64::min),
            xs.iter().cloned().fold(0.0, f64::max),
        );
        let mut builder = ChartBuilder::on(area);
        let chart = builder
            .caption(title, ("sans-serif", 16))
            .margin(10)
            .x_label_area_size(35)
            .y_label_area_size(50);
        macro_rules! draw {
            ($c:expr) => {{
                let mut c = $c;
                c.configure_mesh()
                    .x_desc(xlabel)
                    .y_desc("latency (ms)")
                    .draw()?;
                for (mode, pick, color, label) in [
                    (
                        "direct",
                        (|p: &Point| p.p50_us) as fn(&Point) -> f64,
                        BLUE,
                        "direct p50",
                    ),
                    ("direct", |p: &Point| p.p99_us, CYAN, "direct p99"),
                    ("pool", |p: &Point| p.p50_us, RED, "pool p50"),
                    ("pool", |p: &Point| p.p99_us, MAGENTA, "pool p99"),
                ] {
                    c.draw_series(LineSeries::new(
                        series(mode, closed, pick),
                        color.stroke_width(2),
                    ))?
                    .label(label)
                    .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 15, y)], color));
                }
                c.configure_series_labels()
                    .border_style(BLACK)
                    .background_style(WHITE)
                    .draw()?;
            }};
        }
        if closed {
            draw!(chart.build_cartesian_2d(
                (x0.max(1.0)..x1.max(2.0)).log_scale(),
                (0.1..ymax).log_scale()
            )?);
        } else {
            draw!(chart.build_cartesian_2d(x0 * 0.9..x1 * 1.1, (0.1..ymax).log_scale())?);
        }
    }
    root.present()?;
    Ok(())
}
