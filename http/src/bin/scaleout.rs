//! `scaleout`: several service instances behind HAProxy on the loopback, under load; one is
//! SIGKILLed mid-run and restarted. Reports the requests served and failed, and checks that
//! only requests in flight on the killed instance failed, that HAProxy marked it down and
//! routed around it, and that it was routed to again once restarted. Exits 0 when every check
//! passes, 1 when one fails, 2 when it cannot run (e.g. no haproxy).
//!
//! Everything it starts listens on 127.0.0.1 and is stopped before it exits; every wait and
//! the load itself are bounded in time.

use bytes::Bytes;
use clap::Parser;
use serde::Serialize;
use stateful_pool_http::client::{self, Live, LoadSpec, Report};
use stateful_pool_http::haproxy::{self, HaProxy, ServerStat};
use stateful_pool_http::instance::{Instance, service_program};
use stateful_pool_http::samples;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// Runs the scale-out scenario (see the program's documentation).
#[derive(Debug, Parser)]
#[command(name = "scaleout", version, about)]
struct Args {
    /// Service instances (each its own process and pools).
    #[arg(long, default_value_t = 2)]
    instances: usize,
    /// HAProxy's `maxconn` for each instance: requests beyond it wait in HAProxy's queue.
    /// Each instance is started with twice this capacity: HAProxy 2.6 can briefly send a
    /// server more than its `maxconn` after marking it down with requests in flight (seen:
    /// 14 for 8), and an instance's 503s are retried on another one (`retry-on 503`).
    #[arg(long, default_value_t = 8)]
    capacity: usize,
    /// Concurrent client connections to HAProxy (more than the instances take at once: the
    /// excess waits in HAProxy's queue).
    #[arg(long, default_value_t = 24)]
    connections: usize,
    /// Length of the load, in seconds (longer if the restarted instance takes longer to be
    /// routed to again; never more than this plus 60).
    #[arg(long, default_value_t = 20.0)]
    duration_s: f64,
    /// The model's input side (smaller is faster, e.g. for debug builds).
    #[arg(long, default_value_t = 32)]
    image_size: u32,
    /// The model's hidden width.
    #[arg(long, default_value_t = 256)]
    hidden: usize,
    /// The service program (default: `stateful-pool-http` beside this one).
    #[arg(long)]
    service: Option<PathBuf>,
    /// The haproxy program (default: found on PATH or in /usr/sbin).
    #[arg(long)]
    haproxy: Option<PathBuf>,
    /// Also write the report as JSON into this file.
    #[arg(long)]
    json: Option<PathBuf>,
}

/// What the scenario saw.
#[derive(Debug, Default, Serialize)]
struct Outcome {
    instances: usize,
    capacity: usize,
    connections: usize,
    /// Requests in flight on the killed instance when it was killed (HAProxy's count).
    in_flight_at_kill: u64,
    /// From the kill to HAProxy marking the instance down.
    detected_down_ms: f64,
    /// From the restart to HAProxy marking it up.
    back_up_ms: f64,
    /// Requests the killed instance took after its restart.
    served_after_restart: u64,
    /// The client's view.
    load: Report,
    checks: Vec<(String, bool)>,
}

/// The lowest port the kernel hands out as a connection's source port.
fn ephemeral_low() -> u16 {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|s| s.split_whitespace().next().and_then(|p| p.parse().ok()))
        .unwrap_or(32768)
}

/// A free loopback port below the ephemeral range, so that no outgoing connection (health
/// checks, the load) takes it as its source port while an instance is down: a killed
/// instance restarts on its own port.
fn free_port() -> Result<SocketAddr, String> {
    let high = ephemeral_low().max(12_000);
    let span = (high - 10_000) as u32;
    // Each call starts further along (and a port once given is never given again).
    static CALLS: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seed = std::process::id()
        .wrapping_mul(2_654_435_761)
        .wrapping_add(CALLS.fetch_add(1, Ordering::Relaxed).wrapping_mul(104_729));
    for k in 0..span.min(2_000) {
        let port = 10_000 + ((seed.wrapping_add(k * 7_919)) % span) as u16;
        static GIVEN: std::sync::Mutex<Vec<u16>> = std::sync::Mutex::new(Vec::new());
        let mut given = GIVEN.lock().unwrap_or_else(|e| e.into_inner());
        if given.contains(&port) {
            continue;
        }
        if let Ok(l) = TcpListener::bind(("127.0.0.1", port)) {
            given.push(port);
            return l.local_addr().map_err(|e| e.to_string());
        }
    }
    Err("no free port below the ephemeral range".into())
}

/// Starts an instance on a port of its own (another one if that one was taken meanwhile).
fn start_instance(
    program: &std::path::Path,
    args: impl Fn(SocketAddr) -> Vec<String>,
) -> Result<Instance, String> {
    let mut last = String::new();
    for _ in 0..5 {
        match Instance::start(program, &args(free_port()?), Duration::from_secs(60)) {
            Ok(i) => return Ok(i),
            Err(e) if e.contains("cannot listen") => last = e,
            Err(e) => return Err(e),
        }
    }
    Err(last)
}

/// Polls HAProxy's statistics until `cond` holds for server `name`, for at most `within`.
async fn wait_for(
    stats: SocketAddr,
    name: &str,
    within: Duration,
    cond: impl Fn(&ServerStat) -> bool,
) -> Result<ServerStat, String> {
    let deadline = Instant::now() + within;
    let mut last = None;
    while Instant::now() < deadline {
        if let Ok(all) = haproxy::server_stats(stats).await {
            if let Some(s) = all.into_iter().find(|s| s.name == name) {
                if cond(&s) {
                    return Ok(s);
                }
                last = Some(s);
            }
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    Err(format!(
        "{name} did not reach the state within {within:?} (last seen: {last:?})"
    ))
}

fn main() -> ExitCode {
    let a = Args::parse();
    if a.instances < 2 || a.capacity == 0 || a.connections == 0 {
        eprintln!("error: needs at least 2 instances, a capacity and connections");
        return ExitCode::from(2);
    }
    if !(a.duration_s > 0.0 && a.duration_s <= 600.0) {
        eprintln!("error: --duration-s must be in (0, 600]");
        return ExitCode::from(2);
    }
    let Some(hap) = a.haproxy.clone().or_else(haproxy::find) else {
        eprintln!("error: haproxy is not installed (apt-get install haproxy)");
        return ExitCode::from(2);
    };
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(2);
        }
    };
    match rt.block_on(scenario(&a, &hap)) {
        Ok(o) => {
            print_outcome(&o);
            if let Some(p) = &a.json {
                let _ = std::fs::write(p, serde_json::to_string_pretty(&o).unwrap_or_default());
            }
            if o.checks.iter().all(|c| c.1) {
                ExitCode::SUCCESS
            } else {
                ExitCode::FAILURE
            }
        }
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(2)
        }
    }
}

async fn scenario(a: &Args, hap: &std::path::Path) -> Result<Outcome, String> {
    let program = a.service.clone().unwrap_or_else(service_program);
    let args = |name: &str, listen: SocketAddr| -> Vec<String> {
        [
            "--listen",
            &listen.to_string(),
            "--instance",
            name,
            "--capacity",
            &(a.capacity * 2).to_string(),
            "--image-size",
            &a.image_size.to_string(),
            "--hidden",
            &a.hidden.to_string(),
            "--drain-ms",
            "3000",
        ]
        .map(String::from)
        .to_vec()
    };
    let ready = Duration::from_secs(60);
    let mut instances = Vec::new();
    for i in 0..a.instances {
        let name = format!("s{i}");
        let inst = start_instance(&program, |addr| args(&name, addr))?;
        println!("started {name} on {} (pid {})", inst.addr, inst.pid());
        instances.push((name, inst));
    }
    let servers: Vec<(String, SocketAddr)> =
        instances.iter().map(|(n, i)| (n.clone(), i.addr)).collect();
    let (front, stats) = (free_port()?, free_port()?);
    let dir = std::env::temp_dir().join(format!("sph-scaleout-{}", std::process::id()));
    std::fs::create_dir_all(&dir).map_err(|e| e.to_string())?;
    let cfg = haproxy::config(front, stats, &servers, a.capacity);
    let mut lb = HaProxy::start(hap, &dir, &cfg, stats)?;
    let lb_log = dir.join("haproxy.log");
    println!(
        "haproxy on {front} (statistics on http://{stats}/stats), leastconn, maxconn {}",
        a.capacity
    );
    for (name, _) in &servers {
        if let Err(e) = wait_for(stats, name, Duration::from_secs(20), ServerStat::is_up).await {
            let log = std::fs::read_to_string(&lb_log).unwrap_or_default();
            return Err(format!("{e}\nhaproxy's output:\n{log}"));
        }
    }

    // The load: bounded by a cap; stopped once the scenario has played out.
    let live = Arc::new(Live::default());
    let cap = Duration::from_secs_f64(a.duration_s + 60.0);
    let spec = LoadSpec::closed(
        front,
        "/predict",
        Bytes::from(samples::png(0, 64)),
        a.connections,
        cap,
    );
    let load = tokio::spawn(client::run(spec, live.clone()));
    let start = Instant::now();
    let planned = Duration::from_secs_f64(a.duration_s);

    // Kill s0 a quarter into the run, while it holds requests.
    let (victim, _) = &servers[0];
    tokio::time::sleep(planned / 4).await;
    let before = wait_for(stats, victim, Duration::from_secs(10), |s| s.current > 0).await?;
    instances[0].1.kill();
    let killed_at = Instant::now();
    let kill_s = (killed_at - start).as_secs_f64();
    println!(
        "{:>6.2} s: SIGKILLed {victim} holding {} requests ({} served so far)",
        start.elapsed().as_secs_f64(),
        before.current,
        live.ok.load(Ordering::Relaxed)
    );
    let down = wait_for(stats, victim, Duration::from_secs(10), ServerStat::is_down).await;
    let detected_down_ms = killed_at.elapsed().as_secs_f64() * 1e3;
    let down_s = start.elapsed().as_secs_f64();
    let mut outcome = Outcome {
        instances: a.instances,
        capacity: a.capacity,
        connections: a.connections,
        in_flight_at_kill: before.current,
        detected_down_ms,
        ..Outcome::default()
    };
    outcome.checks.push((
        format!("HAProxy marked {victim} down after its kill"),
        down.is_ok(),
    ));
    println!(
        "{:>6.2} s: HAProxy marked {victim} down ({detected_down_ms:.0} ms after the kill)",
        start.elapsed().as_secs_f64()
    );

    // Let the others carry the load for a while, then restart it on the same address.
    tokio::time::sleep(planned / 4).await;
    let total_before = haproxy::server_stats(stats)
        .await?
        .into_iter()
        .find(|s| &s.name == victim)
        .map_or(0, |s| s.total);
    let restarted_at = Instant::now();
    instances[0].1 = Instance::start(&program, &args(victim, servers[0].1), ready)?;
    println!(
        "{:>6.2} s: restarted {victim} (pid {})",
        start.elapsed().as_secs_f64(),
        instances[0].1.pid()
    );
    let up = wait_for(stats, victim, Duration::from_secs(20), ServerStat::is_up).await;
    outcome.back_up_ms = restarted_at.elapsed().as_secs_f64() * 1e3;
    outcome.checks.push((
        format!("HAProxy marked {victim} up after its restart"),
        up.is_ok(),
    ));
    let routed = wait_for(stats, victim, Duration::from_secs(20), |s| {
        s.total > total_before
    })
    .await;
    outcome.checks.push((
        format!("HAProxy routed requests to {victim} again"),
        routed.is_ok(),
    ));
    println!(
        "{:>6.2} s: {victim} up again ({:.0} ms after the restart)",
        start.elapsed().as_secs_f64(),
        outcome.back_up_ms
    );

    // Run out the planned time (the restarted instance takes its share), then stop.
    let left = planned.saturating_sub(start.elapsed()).max(planned / 8);
    tokio::time::sleep(left).await;
    live.stop.store(true, Ordering::Relaxed);
    let report = load
        .await
        .map_err(|e| format!("the load task failed: {e}"))??;
    let after = haproxy::server_stats(stats).await?;
    outcome.served_after_restart = after
        .iter()
        .find(|s| &s.name == victim)
        .map_or(0, |s| s.total.saturating_sub(total_before));

    // Only requests caught by the kill may fail: the ones the killed instance held and the
    // ones HAProxy was handing it in that instant (HAProxy cuts those client connections:
    // hyper's `IncompleteMessage`). So every failure comes from the victim or is a cut-off
    // connection, and completes between the kill and HAProxy marking it down (with 0.1 s for
    // the two clocks and 1 s for the connections to close); nothing fails before, nor after
    // (the restart included). At most one request per client connection can be caught.
    let failed = report.failed();
    let caught = |t: &f64| *t >= kill_s - 0.1 && *t <= down_s + 1.0;
    outcome.checks.push((
        format!(
            "only requests in flight on {victim} failed ({failed} failed, all from {victim} or \
             cut off, all at its kill ({kill_s:.2}-{down_s:.2} s); at most one per connection, \
             {})",
            a.connections
        ),
        failed <= a.connections as u64
            && report.failure_times_s.iter().all(caught)
            && report
                .failed_by_server
                .keys()
                .all(|k| k == victim || k == "-"),
    ));
    outcome.checks.push((
        "every instance served requests".into(),
        servers
            .iter()
            .all(|(n, _)| report.ok_by_server.get(n).copied().unwrap_or(0) > 0),
    ));
    outcome
        .checks
        .push(("no request timed out".into(), report.timeouts == 0));
    outcome.load = report;

    lb.stop(Duration::from_secs(5));
    for (name, inst) in &mut instances {
        if let Err(e) = inst.terminate(Duration::from_secs(10)) {
            eprintln!("warning: stopping {name}: {e}");
        }
    }
    let _ = std::fs::remove_dir_all(&dir);
    Ok(outcome)
}

fn print_outcome(o: &Outcome) {
    let r = &o.load;
    println!(
        "\n{} instances behind HAProxy (maxconn {} each), {} client connections, {:.1} s:",
        o.instances, o.capacity, o.connections, r.elapsed_s
    );
    println!(
        "  requests sent {}, served {} ({:.0}/s), failed {} {:?}",
        r.sent,
        r.ok,
        r.ok_per_s,
        r.failed(),
        r.by_status
    );
    println!("  served by instance: {:?}", r.ok_by_server);
    println!("  failed by instance: {:?}", r.failed_by_server);
    if r.failed() > 0 {
        let times: Vec<String> = r
            .failure_times_s
            .iter()
            .map(|t| format!("{t:.2}"))
            .collect();
        println!("  failures at (s into the load): {}", times.join(", "));
        for (what, sample) in &r.failure_samples {
            println!("  first failure of kind {what:?}: {sample}");
        }
    }
    println!(
        "  latency of served requests: p50 {:.0} µs, p99 {:.0} µs, max {:.0} µs",
        r.latency.p50_us, r.latency.p99_us, r.latency.max_us
    );
    println!(
        "  killed instance: held {} requests, marked down in {:.0} ms, up {:.0} ms after its restart, served {} after it",
        o.in_flight_at_kill, o.detected_down_ms, o.back_up_ms, o.served_after_restart
    );
    for (what, ok) in &o.checks {
        println!("  [{}] {what}", if *ok { "ok" } else { "FAILED" });
    }
}
