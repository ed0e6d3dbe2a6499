//! `stateful-pool-http`: the HTTP inference service. `--help` lists the settings.

use clap::Parser;
use stateful_pool_http::backend::Backend;
use stateful_pool_http::config::Config;
use stateful_pool_http::routes::{App, router};
use stateful_pool_http::samples;
use stateful_pool_http::sys::pin_current_thread;
use std::io::Write;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

fn main() -> ExitCode {
    // Worker processes re-execute this program and branch off here: keep it first.
    stateful_pool::init();
    let cfg = Config::parse();
    if let Err(e) = cfg.validate() {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    if let Some(dir) = &cfg.write_samples {
        return match write_samples(dir) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("error: writing samples into {}: {e}", dir.display());
                ExitCode::FAILURE
            }
        };
    }
    let backend = match Backend::start(&cfg) {
        Ok(b) => b,
        Err(e) => {
            eprintln!("error: cannot start the service's workers: {e}");
            return ExitCode::FAILURE;
        }
    };
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.worker_threads(cfg.http_threads).enable_all();
    if !cfg.http_cpus.is_empty() {
        if let Err(e) = pin_current_thread(&cfg.http_cpus) {
            eprintln!("error: --http-cpus: {e}");
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
            eprintln!("error: cannot start the HTTP runtime: {e}");
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
    println!(
        "wrote {} samples of {px}×{px} and large.png (1024×1024) into {}",
        samples::COUNT,
        dir.display(),
        px = samples::DEFAULT_SIDE
    );
    Ok(())
}

/// Serves until SIGTERM or Ctrl-C, then drains: `/healthz` fails, the listener closes,
/// requests in flight finish (bounded by `--drain-ms`), and the workers stop.
async fn serve(app: Arc<App>) -> ExitCode {
    let listener = match tokio::net::TcpListener::bind(app.cfg.listen).await {
        Ok(l) => l,
        Err(e) => {
            eprintln!("error: cannot listen on {}: {e}", app.cfg.listen);
            return ExitCode::FAILURE;
        }
    };
    let addr = listener.local_addr().map_or(app.cfg.listen, |a| a);
    println!(
        "listening on http://{addr} ({:?} mode, capacity {}, pid {})",
        app.cfg.mode,
        app.cfg.capacity,
        std::process::id()
    );
    let _ = std::io::stdout().flush();

    let stop = Arc::new(tokio::sync::Notify::new());
    let server = {
        let stop = stop.clone();
        axum::serve(listener, router(app.clone()))
            .with_graceful_shutdown(async move { stop.notified().await })
    };
    let mut serving = tokio::spawn(async move { server.await });
    let signal = shutdown_signal();
    tokio::select! {
        r = &mut serving => {
            eprintln!("error: the HTTP server stopped: {r:?}");
            return ExitCode::FAILURE;
        }
        name = signal => println!("{name}: draining (up to {:?})", app.cfg.drain()),
    }
    let began = Instant::now();
    app.draining.store(true, Ordering::SeqCst);
    stop.notify_one();
    let drained = tokio::time::timeout(app.cfg.drain(), serving).await.is_ok();
    let left = app.cfg.drain().saturating_sub(began.elapsed());
    let app2 = app.clone();
    let report = tokio::task::spawn_blocking(move || app2.backend.shutdown(left))
        .await
        .unwrap_or_else(|e| format!("shutdown failed: {e}"));
    println!(
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

/// Resolves with the signal's name at SIGTERM or SIGINT.
async fn shutdown_signal() -> &'static str {
    use tokio::signal::unix::{SignalKind, signal};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        // Without signal handlers the service runs until killed.
        return std::future::pending().await;
    };
    tokio::select! {
        _ = term.recv() => "SIGTERM",
        _ = int.recv() => "SIGINT",
    }
}
