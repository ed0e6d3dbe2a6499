//! `GET /metrics`: the HTTP front's request counters and latency histogram, and each stage's
//! counters from `Server::stats`, in the Prometheus (OpenMetrics) text format, encoded by the
//! `prometheus-client` crate.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::encoding::text::{encode_eof, encode_registry};
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;
use stateful_pool::service::{Percentiles, ServerStats};
use std::sync::atomic::AtomicU64;
use std::time::Duration;

/// The content type of the answer.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

// Routes are the router's own `&'static str`s: counting a request allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RequestLabels {
    route: &'static str,
    code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct RouteLabels {
    route: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StageLabels {
    stage: String,
    kind: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct OutcomeLabels {
    stage: String,
    outcome: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct QuantileLabels {
    stage: String,
    quantile: String,
}

/// The HTTP front's own metrics, kept for the life of the service.
#[derive(Debug)]
pub struct HttpMetrics {
    registry: Registry,
    requests: Family<RequestLabels, Counter>,
    duration: Family<RouteLabels, Histogram>,
    admitted: Gauge,
}

impl Default for HttpMetrics {
    fn default() -> Self {
        let mut registry = Registry::with_prefix("http");
        let requests = Family::<RequestLabels, Counter>::default();
        // 50 µs to about 6.5 s, doubling.
        let duration = Family::<RouteLabels, Histogram>::new_with_constructor(|| {
            Histogram::new(exponential_buckets(50e-6, 2.0, 18))
        });
        registry.register(
            "requests",
            "POST /predict requests answered, by route and status code (499: the client went away)",
            requests.clone(),
        );
        registry.register(
            "request_duration_seconds",
            "Time from a request's arrival to its answer, by route",
            duration.clone(),
        );
        let admitted = Gauge::default();
        registry.register(
            "admitted",
            "Requests holding one of the --capacity places: reading their body or in the service",
            admitted.clone(),
        );
        HttpMetrics {
            registry,
            requests,
            duration,
            admitted,
        }
    }
}

impl HttpMetrics {
    /// Counts one answered request.
    pub fn record(&self, route: &'static str, code: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels { route, code })
            .inc();
        self.duration
            .get_or_create(&RouteLabels { route })
            .observe(took.as_secs_f64());
    }

    /// The text of `GET /metrics`: these metrics (with `admitted` requests holding a place
    /// now), then the stages' (when there is a server).
    pub fn render(&self, admitted: usize, server: Option<&ServerStats>) -> String {
        self.admitted.set(admitted.min(i64::MAX as usize) as i64);
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = encode_registry(&mut out, &self.registry);
        if let Some(stats) = server {
            let _ = encode_registry(&mut out, &stage_registry(stats));
        }
        let _ = encode_eof(&mut out);
        out
    }
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// The stages' counters as a registry built for one scrape (they are read from the server
/// in one snapshot).
fn stage_registry(stats: &ServerStats) -> Registry {
    let mut reg = Registry::with_prefix("stateful_pool");
    let capacity = Gauge::<i64>::default();
    capacity.set(stats.capacity as i64);
    let in_flight = Gauge::<i64>::default();
    in_flight.set(stats.in_flight as i64);
    reg.register(
        "server_capacity",
        "Requests the service holds at once",
        capacity,
    );
    reg.register("server_in_flight", "Requests in the service now", in_flight);

    let stage_in_flight = Family::<StageLabels, Gauge>::default();
    let queued = Family::<StageLabels, Gauge>::default();
    let live = Family::<StageLabels, Gauge>::default();
    let bound = Family::<StageLabels, Gauge>::default();
    let items = Family::<OutcomeLabels, Counter>::default();
    let queue_delay = Family::<QuantileLabels, FloatGauge>::default();
    let execute = Family::<QuantileLabels, FloatGauge>::default();
    let batches = Family::<StageLabels, Counter>::default();
    let batch_tasks = Family::<StageLabels, Counter>::default();
    for s in &stats.stages {
        let l = StageLabels {
            stage: s.path.clone(),
            kind: s.kind.to_string(),
        };
        stage_in_flight.get_or_create(&l).set(s.in_flight as i64);
        bound.get_or_create(&l).set(s.max_in_flight as i64);
        queued.get_or_create(&l).set(s.queued as i64);
        if let Some(n) = s.live_workers {
            live.get_or_create(&l).set(n as i64);
        }
        for (outcome, n) in [
            ("done", s.done),
            ("failed", s.failed),
            ("expired", s.expired),
            ("cancelled", s.cancelled),
        ] {
            items
                .get_or_create(&OutcomeLabels {
                    stage: s.path.clone(),
                    outcome: outcome.into(),
                })
                .inc_by(n);
        }
        quantiles(&queue_delay, &s.path, &s.queue_delay);
        quantiles(&execute, &s.path, &s.execute);
        if let Some(b) = &s.batching {
            batches.get_or_create(&l).inc_by(b.batches);
            batch_tasks.get_or_create(&l).inc_by(b.tasks);
        }
    }
    reg.register(
        "stage_in_flight",
        "Items in the stage (queued, running, or waiting for its bound)",
        stage_in_flight,
    );
    reg.register(
        "stage_max_in_flight",
        "The stage's bound on items in flight",
        bound,
    );
    reg.register(
        "stage_queued",
        "Tasks waiting in the stage's queue for a worker",
        queued,
    );
    reg.register("stage_live_workers", "Workers serving the stage", live);
    reg.register(
        "stage_items",
        "Items that left the stage, by outcome",
        items,
    );
    reg.register(
        "stage_queue_delay_seconds",
        "Time from entering the stage to reaching a worker (quantiles over the stage's life)",
        queue_delay,
    );
    reg.register(
        "stage_execute_seconds",
        "Time from reaching the stage's workers to the output (quantiles over the stage's life)",
        execute,
    );
    reg.register("stage_batches", "Batches the stage's workers ran", batches);
    reg.register(
        "stage_batch_tasks",
        "Tasks in those batches (divide by batches for the mean batch size)",
        batch_tasks,
    );
    reg
}

fn quantiles(family: &Family<QuantileLabels, FloatGauge>, stage: &str, p: &Percentiles) {
    for (q, d) in [
        ("0.5", p.p50),
        ("0.9", p.p90),
        ("0.99", p.p99),
        ("1", p.max),
    ] {
        family
            .get_or_create(&QuantileLabels {
                stage: stage.to_string(),
                quantile: q.into(),
            })
            .set(d.as_secs_f64());
    }
}
