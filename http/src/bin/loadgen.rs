//! `loadgen`: a bounded HTTP load generator for the loopback, closed or open loop, printing
//! a JSON report (see `stateful_pool_http::client`).
//!
//! `loadgen --connections 8 --duration-s 10` (closed loop), or `loadgen --rate 500` (open
//! loop); the body is a generated sample image unless `--body FILE` is given.

use bytes::Bytes;
use clap::Parser;
use stateful_pool_http::client::{self, Live, LoadSpec, Shape};
use stateful_pool_http::samples;
use std::net::SocketAddr;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

/// Sends requests to a service on this machine and reports throughput, latency percentiles
/// and errors as JSON.
#[derive(Debug, Parser)]
#[command(name = "loadgen", version, about)]
struct Args {
    /// The target (a loopback address).
    #[arg(long, default_value = "127.0.0.1:8080")]
    target: SocketAddr,
    /// The path to POST to.
    #[arg(long, default_value = "/predict")]
    path: String,
    /// Closed loop: concurrent connections.
    #[arg(long, default_value_t = 8)]
    connections: usize,
    /// Open loop: requests per second (overrides --connections).
    #[arg(long)]
    rate: Option<f64>,
    /// Open loop: most unanswered requests at once (more are counted as dropped).
    #[arg(long, default_value_t = 1000)]
    max_outstanding: usize,
    /// Longest run, in seconds.
    #[arg(long, default_value_t = 10.0)]
    duration_s: f64,
    /// Most requests sent.
    #[arg(long, default_value_t = 10_000_000)]
    max_requests: u64,
    /// The request body: this file (default: generated sample 0).
    #[arg(long)]
    body: Option<std::path::PathBuf>,
    /// Side of the generated sample, in pixels.
    #[arg(long, default_value_t = samples::DEFAULT_SIDE)]
    side: u32,
}

fn main() -> ExitCode {
    let a = Args::parse();
    let body = match &a.body {
        Some(p) => match std::fs::read(p) {
            Ok(b) => b,
            Err(e) => {
                eprintln!("error: reading {}: {e}", p.display());
                return ExitCode::from(2);
            }
        },
        None => samples::png(0, a.side),
    };
    if !(a.duration_s > 0.0 && a.duration_s <= 3600.0) {
        eprintln!("error: --duration-s must be in (0, 3600]");
        return ExitCode::from(2);
    }
    if a.rate.is_none() && a.connections == 0 {
        eprintln!("error: --connections must be at least 1");
        return ExitCode::from(2);
    }
    let mut spec = LoadSpec::closed(
        a.target,
        &a.path,
        Bytes::from(body),
        a.connections,
        Duration::from_secs_f64(a.duration_s),
    );
    spec.max_requests = a.max_requests;
    if let Some(rate) = a.rate {
        spec.shape = Shape::Open {
            rate,
            max_outstanding: a.max_outstanding,
        };
    }
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(client::run(spec, Arc::new(Live::default()))) {
        Ok(r) => {
            println!("{}", serde_json::to_string_pretty(&r).unwrap_or_default());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}
