//! A bounded HTTP load generator for the loopback: a closed loop (N connections, each sending
//! its next request when the last one is answered) or an open loop (requests sent at a fixed
//! rate whatever the answers, latency counted from each request's scheduled time, so a stall
//! is not hidden by the requests it delayed: no coordinated omission).
//!
//! Every run stops by itself: at its duration or its request count, whichever comes first,
//! and each request has a timeout. It only ever targets loopback addresses.

use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::Request;
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use serde::Serialize;
use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// How requests are sent.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Shape {
    /// `connections` loops, each sending a request when its previous one was answered.
    Closed {
        /// Concurrent connections.
        connections: usize,
    },
    /// `rate` requests per second on a fixed schedule, at most `max_outstanding` unanswered
    /// at once (a request that would exceed it is counted as dropped, not sent).
    Open {
        /// Requests per second.
        rate: f64,
        /// Bound on unanswered requests.
        max_outstanding: usize,
    },
}

/// One load run.
#[derive(Debug, Clone)]
pub struct LoadSpec {
    /// The target: must be a loopback address.
    pub addr: SocketAddr,
    /// The request path, e.g. `/predict`.
    pub path: String,
    /// The request body (sent with `POST`; an empty body sends `GET`).
    pub body: Bytes,
    /// Extra request headers.
    pub headers: Vec<(String, String)>,
    /// Closed or open loop.
    pub shape: Shape,
    /// Longest run.
    pub duration: Duration,
    /// Most requests sent.
    pub max_requests: u64,
    /// Longest wait for one answer (counted as a timeout after).
    pub request_timeout: Duration,
}

impl LoadSpec {
    /// A closed-loop `POST` of `body` to `path` at `addr` over `connections`, for `duration`.
    pub fn closed(
        addr: SocketAddr,
        path: &str,
        body: Bytes,
        connections: usize,
        duration: Duration,
    ) -> Self {
        LoadSpec {
            addr,
            path: path.to_string(),
            body,
            headers: vec![("content-type".into(), "image/png".into())],
            shape: Shape::Closed { connections },
            duration,
            max_requests: u64::MAX,
            request_timeout: Duration::from_secs(30),
        }
    }
}

/// Counters a caller can watch while a run goes on.
#[derive(Debug, Default)]
pub struct Live {
    /// Requests sent.
    pub sent: AtomicU64,
    /// Answered 2xx.
    pub ok: AtomicU64,
    /// Answered otherwise, failed to connect, or timed out.
    pub failed: AtomicU64,
    /// Set to stop the run early.
    pub stop: AtomicBool,
}

/// Latency percentiles of the successful requests, in microseconds.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct Latency {
    /// Median.
    pub p50_us: f64,
    /// 90th percentile.
    pub p90_us: f64,
    /// 99th percentile.
    pub p99_us: f64,
    /// Largest.
    pub max_us: f64,
}

/// What a run saw.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Report {
    /// Requests sent.
    pub sent: u64,
    /// Answered 2xx.
    pub ok: u64,
    /// Answers by status code.
    pub by_status: BTreeMap<u16, u64>,
    /// Requests that failed below HTTP (refused, reset, closed).
    pub transport_errors: u64,
    /// Requests not answered within the request timeout.
    pub timeouts: u64,
    /// Open loop: requests not sent because too many were outstanding.
    pub dropped: u64,
    /// Wall time of the run, in seconds.
    pub elapsed_s: f64,
    /// Successful answers per second.
    pub ok_per_s: f64,
    /// Latency of the successful answers.
    pub latency: Latency,
    /// Successful answers by the `x-server` header (set by a load balancer), else
    /// `x-instance` (set by the service).
    pub ok_by_server: BTreeMap<String, u64>,
    /// Failed answers and errors by the same headers (`-` when there was no answer).
    pub failed_by_server: BTreeMap<String, u64>,
    /// The first failure of each kind, as the client saw it (status and the start of the
    /// body, or the transport error).
    pub failure_samples: BTreeMap<String, String>,
    /// When failures completed, in seconds from the start of the load (the first 100): where
    /// in a scenario they happened.
    pub failure_times_s: Vec<f64>,
}

impl Report {
    /// Requests that did not succeed.
    pub fn failed(&self) -> u64 {
        self.sent - self.ok
    }
}

struct Agg {
    report: Report,
    /// The load's start (for `failure_times_s`).
    start: Instant,
    hist: hdrhistogram::Histogram<u64>,
}

impl Agg {
    fn record(&mut self, outcome: Outcome, latency: Duration, live: &Live) {
        let failed = match &outcome {
            Outcome::Answered { status, .. } => !(200..300).contains(status),
            Outcome::Transport(_) | Outcome::Timeout => true,
        };
        if failed && self.report.failure_times_s.len() < 100 {
            let at = self.start.elapsed().as_secs_f64();
            self.report.failure_times_s.push(at);
        }
        match outcome {
            Outcome::Answered {
                status,
                server,
                body,
            } => {
                *self.report.by_status.entry(status).or_default() += 1;
                if (200..300).contains(&status) {
                    self.report.ok += 1;
                    live.ok.fetch_add(1, Ordering::Relaxed);
                    let _ = self.hist.record(latency.as_micros().max(1) as u64);
                    *self.report.ok_by_server.entry(server).or_default() += 1;
                } else {
                    live.failed.fetch_add(1, Ordering::Relaxed);
                    self.report
                        .failure_samples
                        .entry(format!("{status} from {server}"))
                        .or_insert_with(|| {
                            String::from_utf8_lossy(&body[..body.len().min(200)]).into_owned()
                        });
                    *self.report.failed_by_server.entry(server).or_default() += 1;
                }
            }
            Outcome::Transport(e) => {
                self.report
                    .failure_samples
                    .entry("transport".into())
                    .or_insert(e);
                self.report.transport_errors += 1;
                live.failed.fetch_add(1, Ordering::Relaxed);
                *self.report.failed_by_server.entry("-".into()).or_default() += 1;
            }
            Outcome::Timeout => {
                self.report.timeouts += 1;
                live.failed.fetch_add(1, Ordering::Relaxed);
                *self.report.failed_by_server.entry("-".into()).or_default() += 1;
            }
        }
    }
}

enum Outcome {
    Answered {
        status: u16,
        server: String,
        body: Bytes,
    },
    Transport(String),
    Timeout,
}

type HttpClient = Client<HttpConnector, Full<Bytes>>;

async fn one(client: &HttpClient, spec: &LoadSpec, uri: &hyper::Uri) -> Outcome {
    let mut req = Request::builder()
        .method(if spec.body.is_empty() { "GET" } else { "POST" })
        .uri(uri.clone());
    for (k, v) in &spec.headers {
        req = req.header(k, v);
    }
    let req = match req.body(Full::new(spec.body.clone())) {
        Ok(r) => r,
        Err(e) => return Outcome::Transport(e.to_string()),
    };
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
        let status = resp.status().as_u16();
        let h = resp.headers();
        let header = |name: &str| h.get(name).and_then(|v| v.to_str().ok());
        let server = match (header("x-server"), header("x-instance")) {
            (Some(lb), Some(inst)) if lb != inst => format!("{lb} (answered by {inst})"),
            (Some(name), _) | (None, Some(name)) => name.to_string(),
            (None, None) => "-".to_string(),
        };
        // Read the whole answer: the request is done when its last byte arrived.
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| format!("{e:?}"))?
            .to_bytes();
        Ok::<_, String>(Outcome::Answered {
            status,
            server,
            body,
        })
    };
    match tokio::time::timeout(spec.request_timeout, exchange).await {
        Ok(Ok(o)) => o,
        Ok(Err(e)) => Outcome::Transport(e),
        Err(_) => Outcome::Timeout,
    }
}

/// Runs `spec`, updating `live` as it goes; stops at the duration, the request count, or
/// `live.stop`.
pub async fn run(spec: LoadSpec, live: Arc<Live>) -> Result<Report, String> {
    if !spec.addr.ip().is_loopback() {
        return Err(format!(
            "{} is not a loopback address: this load generator only targets this machine",
            spec.addr
        ));
    }
    let uri: hyper::Uri = format!("http://{}{}", spec.addr, spec.path)
        .parse()
        .map_err(|e| format!("bad path {:?}: {e}", spec.path))?;
    let mut connector = HttpConnector::new();
    connector.set_nodelay(true);
    let client: HttpClient = Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(usize::MAX)
        .build(connector);
    let start = Instant::now();
    let agg = Arc::new(Mutex::new(Agg {
        report: Report::default(),
        start,
        hist: hdrhistogram::Histogram::new_with_bounds(1, 600_000_000, 3)
            .map_err(|e| e.to_string())?,
    }));
    let spec = Arc::new(spec);
    let end = start + spec.duration;
    let budget = Arc::new(AtomicU64::new(spec.max_requests));
    let take = move |budget: &AtomicU64, live: &Live| {
        !live.stop.load(Ordering::Relaxed)
            && Instant::now() < end
            && budget
                .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1))
                .is_ok()
    };
    match spec.shape {
        Shape::Closed { connections } => {
            let mut tasks = tokio::task::JoinSet::new();
            for _ in 0..connections.max(1) {
                let (client, spec, uri, agg, live, budget) = (
                    client.clone(),
                    spec.clone(),
                    uri.clone(),
                    agg.clone(),
                    live.clone(),
                    budget.clone(),
                );
                tasks.spawn(async move {
                    while take(&budget, &live) {
                        live.sent.fetch_add(1, Ordering::Relaxed);
                        let t = Instant::now();
                        let o = one(&client, &spec, &uri).await;
                        lock(&agg).record(o, t.elapsed(), &live);
                    }
                });
            }
            while tasks.join_next().await.is_some() {}
        }
        Shape::Open {
            rate,
            max_outstanding,
        } => {
            if !(rate > 0.0 && rate.is_finite()) {
                return Err(format!("the rate must be positive, not {rate}"));
            }
            let outstanding = Arc::new(AtomicU64::new(0));
            let mut tasks = tokio::task::JoinSet::new();
            let mut k = 0u64;
            'sending: while take(&budget, &live) {
                let at = start + Duration::from_secs_f64(k as f64 / rate);
                k += 1;
                if at >= end {
                    break;
                }
                // Sleep to the send time in short steps, so a stop is seen within 50 ms.
                loop {
                    let now = Instant::now();
                    if now >= at {
                        break;
                    }
                    if live.stop.load(Ordering::Relaxed) {
                        break 'sending;
                    }
                    tokio::time::sleep_until(at.min(now + Duration::from_millis(50)).into()).await;
                }
                if outstanding.load(Ordering::Relaxed) >= max_outstanding as u64 {
                    lock(&agg).report.dropped += 1;
                    continue;
                }
                outstanding.fetch_add(1, Ordering::Relaxed);
                live.sent.fetch_add(1, Ordering::Relaxed);
                let (client, spec, uri, agg, live, outstanding) = (
                    client.clone(),
                    spec.clone(),
                    uri.clone(),
                    agg.clone(),
                    live.clone(),
                    outstanding.clone(),
                );
                tasks.spawn(async move {
                    let o = one(&client, &spec, &uri).await;
                    // From the scheduled time: a late send counts against the service.
                    lock(&agg).record(o, at.elapsed(), &live);
                    outstanding.fetch_sub(1, Ordering::Relaxed);
                });
                // Reap finished tasks as we go (the set stays as large as the outstanding).
                while tasks.try_join_next().is_some() {}
            }
            while tasks.join_next().await.is_some() {}
        }
    }
    let elapsed = start.elapsed().as_secs_f64();
    let mut agg = lock(&agg);
    let h = &agg.hist;
    let latency = if h.is_empty() {
        Latency::default()
    } else {
        Latency {
            p50_us: h.value_at_quantile(0.5) as f64,
            p90_us: h.value_at_quantile(0.9) as f64,
            p99_us: h.value_at_quantile(0.99) as f64,
            max_us: h.max() as f64,
        }
    };
    let mut report = std::mem::take(&mut agg.report);
    report.sent = live.sent.load(Ordering::Relaxed);
    report.elapsed_s = elapsed;
    report.ok_per_s = report.ok as f64 / elapsed.max(1e-9);
    report.latency = latency;
    Ok(report)
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// One request (for tests and probes): `GET` when `body` is empty, else `POST`. Answers the
/// status, the headers and the body.
pub async fn request(
    addr: SocketAddr,
    path: &str,
    body: Bytes,
    headers: &[(&str, &str)],
    timeout: Duration,
) -> Result<(u16, hyper::HeaderMap, Bytes), String> {
    if !addr.ip().is_loopback() {
        return Err(format!("{addr} is not a loopback address"));
    }
    let client: HttpClient = Client::builder(TokioExecutor::new()).build(HttpConnector::new());
    let mut req = Request::builder()
        .method(if body.is_empty() { "GET" } else { "POST" })
        .uri(format!("http://{addr}{path}"));
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let req = req.body(Full::new(body)).map_err(|e| e.to_string())?;
    let exchange = async {
        let resp = client.request(req).await.map_err(|e| e.to_string())?;
        let status = resp.status().as_u16();
        let headers = resp.headers().clone();
        let body = resp
            .into_body()
            .collect()
            .await
            .map_err(|e| e.to_string())?
            .to_bytes();
        Ok((status, headers, body))
    };
    tokio::time::timeout(timeout, exchange)
        .await
        .map_err(|_| format!("no answer from {addr}{path} within {timeout:?}"))?
}
