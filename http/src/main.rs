//! `stateful-pool-http`: the HTTP inference service. `--help` lists the settings.

use clap::Parser;
use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::server::graceful::GracefulShutdown;
use hyper_util::service::TowerToHyperService;
use stateful_pool_http::backend::Backend;
use stateful_pool_http::config::Config;
use stateful_pool_http::routes::{App, router};
use stateful_pool_http::samples;
use stateful_pool_http::sys::pin_current_thread;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

/// A line on stdout. A failed write (the reader of our output went away, a full disk) is
/// ignored: the log is not worth the service, and `println!` would panic mid-drain.
macro_rules! say {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stdout(), $($arg)*);
    }};
}

/// A line on stderr, likewise never a panic.
macro_rules! tell {
    ($($arg:tt)*) => {{
        let _ = writeln!(std::io::stderr(), $($arg)*);
    }};
}

fn main() -> ExitCode {
    // Worker processes re-execute this program and branch off here: keep it first.
    stateful_pool::init();
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        tell!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(dir) = &cfg.write_samples {
        return match write_samples(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                tell!("error: writing samples into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let backend = match Backend::start(&cfg) {
        Ok(b) => b,
        Err(e) => {
            tell!("error: cannot start the service's workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(cfg.http_threads).enable_all();
    if !cfg.http_cpus.is_empty() {
        if let Err(e) = pin_current_thread(&cfg.http_cpus) {
            tell!("error: --http-cpus: {e}");
            return ExitCode::from(2);
        }
        let cpus = cfg.http_cpus.clone();
        rt.on_thread_start(move || {
            // Checked on this thread above; a failure here leaves the thread unpinned.
            let _ = pin_current_thread(&cpus);
        });
    }
    let rt = match rt.build() {
        Ok(rt) => rt,
        Err(e) => {
            tell!("error: cannot start the HTTP runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    rt.block_on(serve(App::new(cfg, backend)))
}

fn write_samples(dir: &std::path::Path) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for i in 0..samples::COUNT {
        std::fs::write(
            dir.join(format!("{i}.png")),
            samples::png(i, samples::DEFAULT_SIDE),
        )?;
    }
    std::fs::write(dir.join("large.png"), samples::png(0, 1024))?;
    say!(
        "wrote {} samples of {px}×{px} and large.png (1024×1024) into {}",
        samples::COUNT,
        dir.display(),
        px = samples::DEFAULT_SIDE
    );
    Ok(())
}

/// Serves until SIGTERM or Ctrl-C, then drains: `/healthz` fails at once, requests are still
/// served for `--drain-delay-ms` (a balancer takes the instance out; a second signal ends
/// the delay), then the listener
/// closes, requests in flight finish (bounded by `--drain-ms`), and the workers stop.
async fn serve(app: Arc<App>) -> ExitCode {
    // Signal handlers first: a SIGTERM from the moment the service says it listens drains.
    let mut signals = match Signals::install() {
        Ok(s) => s,
        Err(e) => {
            tell!("error: cannot install the signal handlers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let listener = match tokio::net::TcpListener::bind(app.cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            tell!("error: cannot listen on {}: {e}", app.cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(app.cfg.listen, |a| a);
    if app.cfg.fault_injection.is_some() {
        tell!("warning: fault injection is on (a test setting): clients can crash workers");
    }
    say!(
        "listening on http://{addr} ({:?} mode, capacity {}, pid {})",
        app.cfg.mode,
        app.cfg.capacity,
        std::process::id()
    );
    let _ = std::io::stdout().flush();

    let stop = Arc::new(tokio::sync::Notify::new());
    let mut serving = tokio::spawn(accept_loop(listener, app.clone(), stop.clone()));
    tokio::select! {
        r = &mut serving => {
            tell!("error: the HTTP server stopped: {r:?}");
            return ExitCode::FAILURE;
        }
        name = signals.next() => say!(
            "{name}: draining (health check failing now; closing in {:?}, then up to {:?} for requests in flight)",
            app.cfg.drain_delay(),
            app.cfg.drain()
        ),
    }
    let began = Instant::now();
    app.draining.store(true, Ordering::SeqCst);
    tokio::select! {
        _ = tokio::time::sleep(app.cfg.drain_delay()) => {}
        name = signals.next() => say!("{name}: ending the drain delay now"),
    }
    stop.notify_one();
    let drained = matches!(
        tokio::time::timeout(app.cfg.drain(), serving).await,
        Ok(Ok(true))
    );
    let left = app.cfg.drain().saturating_sub(began.elapsed());
    let app2 = app.clone();
    let report = tokio::task::spawn_blocking(move || app2.backend.shutdown(left))
        .await
        .unwrap_or_else(|e| format!("shutdown failed: {e}"));
    say!(
        "stopped in {:?}: connections {}; workers: {report}",
        began.elapsed(),
        if drained {
            "drained"
        } else {
            "cut off at the drain limit"
        }
    );
    let _ = std::io::stdout().flush();
    ExitCode::SUCCESS
}

/// Accepts connections and serves each with hyper (HTTP/1.1, keep-alive, a timeout on reading
/// each request's head, which also closes idle connections) until `stop`; then stops
/// accepting and waits for the open connections to finish their requests. Resolves `true`
/// once they all have.
async fn accept_loop(
    listener: tokio::net::TcpListener,
    app: Arc<App>,
    stop: Arc<tokio::sync::Notify>,
) -> bool {
    let service = router(app.clone());
    let graceful = GracefulShutdown::new();
    let mut http = http1::Builder::new();
    http.timer(TokioTimer::new())
        .header_read_timeout(app.cfg.header_timeout());
    loop {
        let stream = tokio::select! {
            r = listener.accept() => match r {
                Ok((stream, _)) => stream,
                Err(e) => {
                    // Out of file descriptors and the like: the connection is lost, the
                    // service is not; try again shortly.
                    tell!("warning: accept: {e}");
                    tokio::time::sleep(Duration::from_millis(10)).await;
                    continue;
                }
            },
            _ = stop.notified() => break,
        };
        let _ = stream.set_nodelay(true);
        let svc = TowerToHyperService::new(service.clone());
        let conn = graceful.watch(http.serve_connection(TokioIo::new(stream), svc));
        tokio::spawn(async move {
            // A client that goes away mid-request is not the service's error.
            let _ = conn.await;
        });
    }
    drop(listener);
    graceful.shutdown().await;
    true
}

/// SIGTERM and SIGINT, caught from the moment this exists.
struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn install() -> std::io::Result<Signals> {
        use tokio::signal::unix::{SignalKind, signal};
        Ok(Signals {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    /// The next signal's name.
    async fn next(&mut self) -> &'static str {
        tokio::select! {
            _ = self.term.recv() => "SIGTERM",
            _ = self.int.recv() => "SIGINT",
        }
    }
}
