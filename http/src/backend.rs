//! Where a request's inference runs: through the pool (a preprocessing stage, then a batching
//! model stage, behind a `Server`), or directly in the handler (the load test's baseline).

use crate::config::{Config, Mode};
use crate::model::{Mlp, Shape};
use crate::preprocess::{self, Preprocess};
use crate::reply::{BODY, Failure};
use axum::body::Body;
use http_body_util::BodyExt;
use ndarray::ArrayView1;
use stateful_pool::service::{Process, ProcessWithPayload, Seq, Server, WithPayload, seq};
use stateful_pool::{BatchPolicy, Pool, PoolBuilder, SpawnOptions, SubmitError, WaitStrategy};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The service graph: preprocessing, then the model; the features pass from one stage's
/// worker to the next one's through shared memory, never decoded in this process.
pub type Graph = Seq<(ProcessWithPayload<Preprocess>, Process<Mlp>)>;

/// The path of the preprocessing stage in [`Graph`].
pub const PREPROCESS_STAGE: &str = "seq[0]/preprocess";

/// The model stage's path in the service graph (direct mode names its steps the same way).
pub const MODEL_STAGE: &str = "seq[1]/model";

/// One request, as the HTTP front hands it over.
#[derive(Debug)]
pub struct Request {
    /// The body, still arriving.
    pub body: Body,
    /// Its length (from `Content-Length`, checked against the limit).
    pub len: usize,
    /// When the request arrived.
    pub arrived: Instant,
    /// Its deadline, counted from `arrived`.
    pub timeout: Duration,
    /// Longest time the body may take to arrive.
    pub body_timeout: Duration,
    /// A fault directive (tests; empty otherwise).
    pub fault: String,
}

/// Where inference runs.
pub enum Backend {
    /// Through the pool's stages.
    Pool {
        /// The server over [`Graph`] (boxed, as the model below: the variants differ in size).
        server: Box<Server<Graph>>,
        /// The preprocessing stage's pool (request bodies are loaned from its arena).
        preprocess: Arc<Pool<Preprocess>>,
    },
    /// In the handler.
    Direct {
        /// The model (boxed: its four arrays make it the larger variant).
        model: Box<Mlp>,
        /// The input images' side.
        side: u32,
    },
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Pool { .. } => f.write_str("Backend::Pool"),
            Backend::Direct { .. } => f.write_str("Backend::Direct"),
        }
    }
}

/// A stage pool's builder with failed workers revived after `--revive-after-ms` (0: never).
fn revived<W: stateful_pool::Worker>(b: PoolBuilder<W>, cfg: &Config) -> PoolBuilder<W> {
    match cfg.revive_after_ms {
        0 => b,
        ms => b.revive_failed_after(Duration::from_millis(ms)),
    }
}

impl Backend {
    /// Builds the backend `cfg` asks for: in pool mode, starts the worker processes (blocks
    /// until each has loaded its model).
    pub fn start(cfg: &Config) -> Result<Backend, Box<dyn std::error::Error + Send + Sync>> {
        let shape = Shape {
            inputs: 3 * (cfg.image_size as usize).pow(2),
            hidden: cfg.hidden,
            classes: cfg.classes,
        };
        if cfg.mode == Mode::Direct {
            return Ok(Backend::Direct {
                model: Box::new(Mlp::new(shape, cfg.seed)),
                side: cfg.image_size,
            });
        }
        let mut opts = SpawnOptions::new();
        if !cfg.worker_cpus.is_empty() {
            opts = opts
                .cpus(cfg.worker_cpus.iter().copied())
                .thread_env_from_cpus(true);
        }
        // The arena holds the bodies of requests in flight: as set, or 64 MiB (reserved as it
        // is first used), or room for four of the largest.
        let arena = match cfg.body_arena_bytes {
            0 => (64usize << 20)
                .max(4 * cfg.max_body_bytes)
                .next_power_of_two(),
            n => n,
        };
        let wait = match cfg.worker_spin_us {
            0 => WaitStrategy::Park,
            us => WaitStrategy::SpinThenPark {
                spin: Duration::from_micros(us),
            },
        };
        let preprocess = revived(
            Pool::<Preprocess>::builder()
                .queue_size(cfg.capacity)
                .worker_wait(wait)
                .task_arena_bytes(arena)
                .max_task_bytes(cfg.max_body_bytes),
            cfg,
        )
        .build()?;
        let faults = cfg
            .fault_injection
            .as_ref()
            .map(|d| d.display().to_string())
            .unwrap_or_default();
        for r in (0..cfg.preprocess_workers)
            .map(|_| preprocess.spawn_with(&(cfg.image_size, faults.clone()), &opts))
        {
            r?;
        }
        let policy = if cfg.max_batch > 1 {
            // Work-conserving: a worker waits for company only while its batches come full.
            BatchPolicy::new(cfg.max_batch)
                .max_delay(Duration::from_micros(cfg.batch_delay_us))
                .only_when_saturated(true)
        } else {
            BatchPolicy::none()
        };
        let model = revived(
            Pool::<Mlp>::builder()
                .queue_size(cfg.capacity)
                .worker_wait(wait)
                .batch_policy(policy),
            cfg,
        )
        .build()?;
        let args = (
            cfg.seed,
            shape.inputs as u32,
            shape.hidden as u32,
            shape.classes as u32,
        );
        for r in (0..cfg.model_workers).map(|_| model.spawn_with(&args, &opts)) {
            r?;
        }
        let preprocess = Arc::new(preprocess);
        let graph = seq((
            Process::new("preprocess", preprocess.clone()).with_payload(),
            Process::new("model", model),
        ));
        Ok(Backend::Pool {
            server: Box::new(Server::new(graph, cfg.capacity).timeout(cfg.timeout())),
            preprocess,
        })
    }

    /// The class probabilities for the image in `req`'s body.
    pub async fn infer(&self, req: Request) -> Result<Vec<f32>, Failure> {
        match self {
            Backend::Pool { server, preprocess } => {
                let mut loan = match preprocess.try_loan(req.len) {
                    Ok(l) => l,
                    Err(e) => {
                        let f = match e {
                            SubmitError::PayloadTooLarge { len, max } => {
                                Failure::too_large(len, max)
                            }
                            SubmitError::Shutdown => Failure::draining(),
                            SubmitError::QueueFull | SubmitError::NoSpace { .. } => {
                                Failure::no_room()
                            }
                            e => Failure::internal(e.to_string(), None),
                        };
                        // Refused before the body was read: let the client finish sending it
                        // (bounded), so that it can read the answer.
                        drain_refused(req.body, req.body_timeout);
                        return Err(f);
                    }
                };
                let limit = BodyLimit::of(&req);
                read_body_into(req.body, loan.as_mut_slice(), limit).await?;
                let left = req
                    .timeout
                    .checked_sub(req.arrived.elapsed())
                    .ok_or_else(|| Failure::deadline(Some(BODY.to_string())))?;
                let input = WithPayload::new(req.fault, loan);
                server
                    .try_call_async_timeout(input, left)
                    .await
                    .map_err(Failure::from_service)
            }
            Backend::Direct { model, side } => {
                let mut body = vec![0u8; req.len];
                let limit = BodyLimit::of(&req);
                read_body_into(req.body, &mut body, limit).await?;
                // The same deadline as through the pool, looked at after each step (a step
                // in this thread cannot be cut short): 504 naming the step it passed in.
                let (arrived, timeout) = (req.arrived, req.timeout);
                let check = |stage: &str| match arrived.elapsed() >= timeout {
                    true => Err(Failure::deadline(Some(stage.to_string()))),
                    false => Ok(()),
                };
                check(BODY)?;
                let x = preprocess::features(&body, *side).map_err(Failure::bad_request)?;
                check(PREPROCESS_STAGE)?;
                let p = model
                    .predict(ArrayView1::from(&x))
                    .map_err(|e| Failure::internal(e, None))?;
                check(MODEL_STAGE)?;
                Ok(p)
            }
        }
    }

    /// Whether every stage has a live worker (always, directly).
    pub fn healthy(&self) -> bool {
        match self {
            Backend::Pool { server, .. } => server.healthy() && !server.is_closing(),
            Backend::Direct { .. } => true,
        }
    }

    /// Stops taking requests, waits up to `drain` for those in flight, and stops the workers.
    pub fn shutdown(&self, drain: Duration) -> String {
        match self {
            Backend::Pool { server, .. } => format!("{:?}", server.shutdown(drain)),
            Backend::Direct { .. } => "direct mode: nothing to stop".into(),
        }
    }
}

/// How long a body may take: until the body timeout, or until the request's deadline if that
/// comes first (then running out is a 504, not a 408). Both count from the request's arrival,
/// so the comparison is between the two settings, and a tie (the defaults) is the body's: a
/// slow body is a 408.
#[derive(Debug, Clone, Copy)]
struct BodyLimit {
    /// What is left of the earlier of the two.
    limit: Duration,
    /// The request's deadline comes before the body timeout.
    deadline_first: bool,
    /// The body timeout as set (for the 408's message).
    body_timeout: Duration,
}

impl BodyLimit {
    fn of(req: &Request) -> BodyLimit {
        BodyLimit::at(req.timeout, req.body_timeout, req.arrived.elapsed())
    }

    fn at(timeout: Duration, body_timeout: Duration, elapsed: Duration) -> BodyLimit {
        let deadline_first = timeout < body_timeout;
        BodyLimit {
            limit: timeout.min(body_timeout).saturating_sub(elapsed),
            deadline_first,
            body_timeout,
        }
    }
}

/// The most of a refused request's body that is read and thrown away (see [`drain_refused`]).
pub const DRAIN_MAX_BYTES: usize = 64 << 20;

/// Reads and discards, on a task of its own, the body of a request refused before its body
/// was read (413, 411, 503, a bad header, a route that takes no body), at most
/// [`DRAIN_MAX_BYTES`] and for at most `within`; the answer goes out at once beside it. A client that writes its whole body before
/// it reads (most simple clients do) would otherwise find the connection closed under it
/// (hyper closes a connection whose body is left unread, and closing a socket with unread data
/// sends a reset): it would see a broken pipe or a reset, not the answer. A body over the
/// bound, or slower, is left unread and the connection closed: the answer is then the client's
/// to catch while it writes.
pub fn drain_refused(body: Body, within: Duration) {
    if axum::body::HttpBody::is_end_stream(&body) {
        return;
    }
    let drain = async {
        let mut body = body;
        let mut seen = 0usize;
        while let Some(Ok(frame)) = body.frame().await {
            if let Some(data) = frame.data_ref() {
                seen = seen.saturating_add(data.len());
                if seen > DRAIN_MAX_BYTES {
                    return;
                }
            }
        }
    };
    tokio::spawn(async move {
        let _ = tokio::time::timeout(within, drain).await;
    });
}

/// Reads the body into `dst`, which is exactly as long as its `Content-Length` says (hyper
/// enforces that length on the connection).
async fn read_body_into(body: Body, dst: &mut [u8], limit: BodyLimit) -> Result<(), Failure> {
    let fill = async {
        let mut body = body;
        let mut at = 0usize;
        while let Some(frame) = body.frame().await {
            // The connection failed or closed mid-body: the client went away.
            let frame =
                frame.map_err(|e| Failure::client_closed(format!("reading the body: {e}")))?;
            if let Ok(data) = frame.into_data() {
                let end = at
                    .checked_add(data.len())
                    .filter(|&e| e <= dst.len())
                    .ok_or_else(|| {
                        Failure::bad_request("the body is longer than its Content-Length")
                    })?;
                dst[at..end].copy_from_slice(&data);
                at = end;
            }
        }
        if at != dst.len() {
            return Err(Failure::bad_request(format!(
                "the body ended after {at} of its {} bytes",
                dst.len()
            )));
        }
        Ok(())
    };
    match tokio::time::timeout(limit.limit, fill).await {
        Ok(r) => r,
        Err(_) if limit.deadline_first => Err(Failure::deadline(Some(BODY.to_string()))),
        Err(_) => Err(Failure::slow_client(limit.body_timeout)),
    }
}

#[cfg(test)]
mod tests {
    use super::BodyLimit;
    use std::time::Duration;

    const S: Duration = Duration::from_secs(1);

    #[test]
    fn a_slow_body_is_a_408_when_the_two_limits_are_equal_as_by_default() {
        let l = BodyLimit::at(10 * S, 10 * S, Duration::from_micros(40));
        assert!(!l.deadline_first);
        assert_eq!(l.limit, 10 * S - Duration::from_micros(40));
    }

    #[test]
    fn the_earlier_limit_decides_and_both_count_from_arrival() {
        let deadline = BodyLimit::at(2 * S, 10 * S, S / 2);
        assert!(deadline.deadline_first);
        assert_eq!(deadline.limit, S * 3 / 2);
        let body = BodyLimit::at(10 * S, 3 * S, S);
        assert!(!body.deadline_first);
        assert_eq!(body.limit, 2 * S);
        assert_eq!(body.body_timeout, 3 * S);
        // Past both: nothing left, not an underflow.
        assert_eq!(BodyLimit::at(S, S, 5 * S).limit, Duration::ZERO);
    }
}
