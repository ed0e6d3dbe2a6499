//! The HTTP routes (axum): `POST /predict`, `GET /healthz`, `GET /metrics` and
//! `GET /samples/{i}`.

use crate::backend::{Backend, Request, drain_refused};
use crate::config::Config;
use crate::metrics::{self, HttpMetrics};
use crate::reply::{Failure, Prediction};
use crate::samples;
use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// The status counted for a request whose client went away before its answer (nginx's
/// convention); its item was cancelled in every stage that had not started it.
pub const CLIENT_CLOSED: u16 = 499;

/// The status a response is counted as in the metrics when it differs from the one sent.
#[derive(Debug, Clone, Copy)]
struct CountedAs(u16);

/// The service's state, shared by the handlers.
#[derive(Debug)]
pub struct App {
    /// The configuration.
    pub cfg: Config,
    /// Where inference runs.
    pub backend: Backend,
    /// The HTTP front's counters.
    pub metrics: HttpMetrics,
    /// Set once a shutdown began: `/healthz` fails (requests are still served until the
    /// listener closes).
    pub draining: AtomicBool,
    /// Requests admitted (reading their body, or in the graph): one permit each, `capacity`
    /// in all, taken before a request's body is loaned shared memory, so slow clients cannot
    /// hold more of it than the capacity allows.
    pub admitted: Arc<tokio::sync::Semaphore>,
}

impl App {
    /// The state for `backend` under `cfg`.
    pub fn new(cfg: Config, backend: Backend) -> Arc<App> {
        let admitted = Arc::new(tokio::sync::Semaphore::new(cfg.capacity));
        Arc::new(App {
            cfg,
            backend,
            metrics: HttpMetrics::default(),
            draining: AtomicBool::new(false),
            admitted,
        })
    }

    fn answer(&self, r: Result<Response, Failure>) -> Response {
        match r {
            Ok(r) => r,
            Err(f) => {
                let retry = f.retry;
                // A client that went away is counted 499 but answered 400 (see
                // `Failure::client_closed`).
                let closed = f.status.as_u16() == CLIENT_CLOSED;
                let status = if closed {
                    StatusCode::BAD_REQUEST
                } else {
                    f.status
                };
                let mut resp = (status, Json(f.body)).into_response();
                if closed {
                    resp.extensions_mut().insert(CountedAs(CLIENT_CLOSED));
                }
                if retry {
                    resp.headers_mut().insert(
                        header::RETRY_AFTER,
                        HeaderValue::from(self.cfg.retry_after_s),
                    );
                }
                resp
            }
        }
    }
}

/// The service's routes over `app`. Every response the router makes, its own too (404 for an
/// unknown path, 405 for a wrong method, 400 for a query that does not parse), carries the
/// instance's name in `x-instance` (hyper's answers to unparsable HTTP never reach it). A body
/// sent to any other route than `POST /predict` is read and thrown away beside the answer
/// (bounded, as for a refused prediction), so a client that writes it all before reading gets
/// the answer (a 404, a 405), not a broken pipe.
pub fn router(app: Arc<App>) -> Router {
    let instance = HeaderValue::from_str(&app.cfg.instance).ok();
    let body_timeout = app.cfg.body_timeout();
    Router::new()
        .route("/predict", post(predict))
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/samples/{i}", get(sample))
        .with_state(app)
        .layer(axum::middleware::map_request(
            move |req: axum::extract::Request| async move {
                if req.method() == axum::http::Method::POST && req.uri().path() == "/predict" {
                    return req;
                }
                let (parts, body) = req.into_parts();
                drain_refused(body, body_timeout);
                axum::extract::Request::from_parts(parts, Body::empty())
            },
        ))
        .layer(axum::middleware::map_response(move |mut resp: Response| {
            let instance = instance.clone();
            async move {
                if let Some(v) = instance {
                    resp.headers_mut().insert("x-instance", v);
                }
                resp
            }
        }))
}

/// Counts a request when it is answered, or as [`CLIENT_CLOSED`] when its client went away
/// first (the handler's future is dropped then).
struct Counted<'a> {
    app: &'a App,
    route: &'static str,
    since: Instant,
    code: Option<u16>,
}

impl Drop for Counted<'_> {
    fn drop(&mut self) {
        let code = self.code.unwrap_or(CLIENT_CLOSED);
        self.app
            .metrics
            .record(self.route, code, self.since.elapsed());
    }
}

async fn predict(State(app): State<Arc<App>>, headers: HeaderMap, body: Body) -> Response {
    let mut counted = Counted {
        app: &app,
        route: "/predict",
        since: Instant::now(),
        code: None,
    };
    let r = run_predict(&app, &headers, body, counted.since).await;
    let resp = app.answer(r);
    counted.code = Some(
        resp.extensions()
            .get::<CountedAs>()
            .map_or(resp.status().as_u16(), |c| c.0),
    );
    resp
}

/// A request that passed the checks on its head, holding one of the `--capacity` places.
struct Admitted {
    len: usize,
    timeout: Duration,
    _permit: tokio::sync::OwnedSemaphorePermit,
}

/// The checks on a request's head (its length, its deadline), then admission (before the body
/// is read into shared memory).
fn admit(app: &App, headers: &HeaderMap) -> Result<Admitted, Failure> {
    let cfg = &app.cfg;
    let len = content_length(headers)?;
    if len > cfg.max_body_bytes {
        return Err(Failure::too_large(len, cfg.max_body_bytes));
    }
    if len == 0 {
        return Err(Failure::bad_request("the body is empty: send an image"));
    }
    let timeout = match headers.get("x-timeout-ms") {
        None => cfg.timeout(),
        Some(v) => {
            let ms = v.to_str().ok().and_then(timeout_ms).ok_or_else(|| {
                Failure::bad_request("x-timeout-ms takes a number of milliseconds")
            })?;
            Duration::from_millis(ms).min(cfg.timeout())
        }
    };
    let permit = app
        .admitted
        .clone()
        .try_acquire_owned()
        .map_err(|_| Failure::full())?;
    Ok(Admitted {
        len,
        timeout,
        _permit: permit,
    })
}

async fn run_predict(
    app: &App,
    headers: &HeaderMap,
    body: Body,
    arrived: Instant,
) -> Result<Response, Failure> {
    let cfg = &app.cfg;
    let Admitted {
        len,
        timeout,
        _permit,
    } = match admit(app, headers) {
        Ok(a) => a,
        Err(f) => {
            // Refused on its head: answered at once, while the body is read and thrown away
            // beside it (bounded), so that a client still sending can read the answer rather
            // than a reset.
            drain_refused(body, cfg.body_timeout());
            return Err(f);
        }
    };
    let fault = match (&cfg.fault_injection, headers.get("x-fault")) {
        (Some(_), Some(v)) => v.to_str().unwrap_or_default().to_string(),
        _ => String::new(),
    };
    let probabilities = app
        .backend
        .infer(Request {
            body,
            len,
            arrived,
            timeout,
            body_timeout: cfg.body_timeout(),
            fault,
        })
        .await?;
    Ok(Json(Prediction::from_probabilities(probabilities)).into_response())
}

/// An `x-timeout-ms` value: a number of milliseconds (digits only); one too large for a
/// `u64` is as good as endless (the service's own limit caps it).
fn timeout_ms(v: &str) -> Option<u64> {
    let v = v.trim();
    if v.is_empty() || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(v.parse().unwrap_or(u64::MAX))
}

/// The body's declared length: the body goes straight into a buffer of that size in shared
/// memory, so a request without one (chunked) is refused.
fn content_length(headers: &HeaderMap) -> Result<usize, Failure> {
    match headers.get(header::CONTENT_LENGTH) {
        None => Err(Failure::length_required()),
        Some(v) => v
            .to_str()
            .ok()
            .and_then(declared_length)
            .ok_or_else(|| Failure::bad_request("Content-Length is not a number")),
    }
}

/// A `Content-Length` value: one number, or a list of the same number repeated (RFC 9110,
/// 8.6, which hyper accepts as such); anything else is `None`. A number too large for a
/// `usize` is `usize::MAX`: a body too large (413), not a malformed header. (Where `usize` has
/// 64 bits, hyper refuses a value past `u64::MAX` itself, with a 400, before this runs.)
fn declared_length(v: &str) -> Option<usize> {
    let mut n = None;
    for part in v.split(',') {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return None;
        }
        let this: usize = part.parse().unwrap_or(usize::MAX);
        if n.is_some_and(|n| n != this) {
            return None;
        }
        n = Some(this);
    }
    n
}

async fn healthz(State(app): State<Arc<App>>) -> Response {
    let (code, text) = if app.draining.load(Ordering::SeqCst) {
        (StatusCode::SERVICE_UNAVAILABLE, "draining\n")
    } else if app.backend.healthy() {
        (StatusCode::OK, "ok\n")
    } else {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "a stage has no live worker\n",
        )
    };
    app.answer(Ok((code, text).into_response()))
}

async fn metrics(State(app): State<Arc<App>>) -> Response {
    let stats = match &app.backend {
        Backend::Pool { server, .. } => Some(server.stats()),
        Backend::Direct { .. } => None,
    };
    // Places taken: requests still reading their body hold one too, before the graph sees them.
    let admitted = app
        .cfg
        .capacity
        .saturating_sub(app.admitted.available_permits());
    let text = app.metrics.render(admitted, stats.as_ref());
    app.answer(Ok(
        ([(header::CONTENT_TYPE, metrics::CONTENT_TYPE)], text).into_response()
    ))
}

/// `?size=N`: the sample's side in pixels.
#[derive(Debug, Deserialize)]
struct SampleQuery {
    size: Option<u32>,
}

async fn sample(
    State(app): State<Arc<App>>,
    Path(i): Path<String>,
    Query(q): Query<SampleQuery>,
) -> Response {
    let i = i
        .trim_end_matches(".png")
        .parse::<usize>()
        .ok()
        .filter(|&i| i < samples::COUNT)
        .ok_or_else(|| {
            Failure::bad_request(format!("samples are numbered 0 to {}", samples::COUNT - 1))
        });
    let side = q.size.unwrap_or(samples::DEFAULT_SIDE);
    let r = match i {
        Err(f) => Err(f),
        Ok(_) if side == 0 || side > samples::MAX_SIDE => Err(Failure::bad_request(format!(
            "size must be 1 to {}",
            samples::MAX_SIDE
        ))),
        // Encoding a large PNG takes a while: off the HTTP threads.
        Ok(i) => match tokio::task::spawn_blocking(move || samples::png(i, side)).await {
            Ok(png) => Ok(([(header::CONTENT_TYPE, "image/png")], png).into_response()),
            Err(e) => Err(Failure::internal(e.to_string(), None)),
        },
    };
    app.answer(r)
}

#[cfg(test)]
mod tests {
    use super::{declared_length, timeout_ms};

    #[test]
    fn an_x_timeout_ms_is_digits_and_a_huge_one_is_endless() {
        assert_eq!(timeout_ms("250"), Some(250));
        assert_eq!(timeout_ms(" 0 "), Some(0));
        assert_eq!(timeout_ms("99999999999999999999"), Some(u64::MAX));
        for bad in ["", "-5", "1.5", "abc", "5ms"] {
            assert_eq!(timeout_ms(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn a_content_length_is_one_number_or_the_same_number_repeated() {
        assert_eq!(declared_length("42"), Some(42));
        assert_eq!(declared_length(" 42 "), Some(42));
        assert_eq!(declared_length("5, 5"), Some(5));
        assert_eq!(declared_length("5,5,5"), Some(5));
        for bad in ["", "5, 6", "-1", "+5", "5,", "abc"] {
            assert_eq!(declared_length(bad), None, "{bad:?}");
        }
        assert_eq!(declared_length("99999999999999999999999"), Some(usize::MAX));
    }
}
