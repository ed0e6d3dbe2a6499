//! The service's configuration: flags, each also read from an environment variable.

use clap::{Parser, ValueEnum};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

/// Where a request's inference runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Mode {
    /// Through the pool: a preprocessing stage of worker processes, then a batching model
    /// stage of worker processes, behind a `stateful_pool::service::Server`.
    Pool,
    /// The same preprocessing and model code called in the HTTP handler, in this process (no
    /// pool, no batching): the baseline the load test measures the pool's cost against.
    Direct,
}

/// An HTTP inference service on stateful-pool: `POST /predict` with an image body (PNG or
/// JPEG) answers the model's class probabilities as JSON.
#[derive(Debug, Clone, Parser)]
#[command(name = "stateful-pool-http", version, about, long_about = None, args_override_self = true)]
pub struct Config {
    /// Address to listen on.
    #[arg(long, env = "SPH_LISTEN", default_value = "127.0.0.1:8080")]
    pub listen: SocketAddr,

    /// Where inference runs: `pool` (worker processes) or `direct` (in the handler; the
    /// load test's baseline).
    #[arg(long, env = "SPH_MODE", value_enum, default_value_t = Mode::Pool)]
    pub mode: Mode,

    /// A name for this instance, sent back in each response's `x-instance` header (to tell
    /// instances apart behind a load balancer).
    #[arg(long, env = "SPH_INSTANCE", default_value = "sph")]
    pub instance: String,

    /// Worker processes of the preprocessing stage (decode, resize).
    #[arg(long, env = "SPH_PREPROCESS_WORKERS", default_value_t = 1)]
    pub preprocess_workers: usize,

    /// Worker processes of the model stage.
    #[arg(long, env = "SPH_MODEL_WORKERS", default_value_t = 1)]
    pub model_workers: usize,

    /// The model stage's largest batch (1 turns batching off).
    #[arg(long, env = "SPH_MAX_BATCH", default_value_t = 32)]
    pub max_batch: usize,

    /// How long a model worker holding fewer than `max-batch` requests waits for more, in
    /// microseconds; only while its batches come full (under light load nobody waits).
    #[arg(long, env = "SPH_BATCH_DELAY_US", default_value_t = 200)]
    pub batch_delay_us: u64,

    /// How long a worker spins for its next task before it sleeps, in microseconds (longer:
    /// less latency at light load, more CPU burnt while idle-ish; 0 sleeps at once).
    #[arg(long, env = "SPH_WORKER_SPIN_US", default_value_t = 20)]
    pub worker_spin_us: u64,

    /// Requests in the service at once (anywhere in its stages); one more is answered 503
    /// with `Retry-After`. Set a load balancer's per-server `maxconn` to at most this (half
    /// leaves room for a balancer's overshoot: README, *Scaling out*). (A request
    /// whose body finds no room in the shared memory for bodies is answered 503 too: see
    /// `--body-arena-bytes`.)
    #[arg(long, env = "SPH_CAPACITY", default_value_t = 64)]
    pub capacity: usize,

    /// Shared memory for the bodies of the requests in flight, in bytes (reserved as it is
    /// first used). 0: 64 MiB, or four of the largest bodies if that is more. A request whose
    /// body finds no room (no free block that large, given the bodies in flight) is answered
    /// 503 with `Retry-After`; set it to a little over capacity × the usual body size to make
    /// that rare.
    #[arg(long, env = "SPH_BODY_ARENA_BYTES", default_value_t = 0)]
    pub body_arena_bytes: usize,

    /// A worker that dies is restarted at once, then with back-off; one that dies more than
    /// 5 times in a minute is marked failed (`/healthz` fails once a stage has no live worker,
    /// and its requests get 503). This long after, in milliseconds, a failed worker is
    /// started again with a fresh budget, so the instance recovers from a fault that
    /// outlasted the budget without a restart of its process. 0: never (a failed stage stays
    /// failed until the process restarts).
    #[arg(long, env = "SPH_REVIVE_AFTER_MS", default_value_t = 30_000)]
    pub revive_after_ms: u64,

    /// Longest time a request may take, in milliseconds; past it the answer is 504. A client
    /// may ask for less with the `x-timeout-ms` header.
    #[arg(long, env = "SPH_TIMEOUT_MS", default_value_t = 10_000)]
    pub timeout_ms: u64,

    /// Largest request body, in bytes; larger ones are answered 413.
    #[arg(long, env = "SPH_MAX_BODY_BYTES", default_value_t = 8 << 20)]
    pub max_body_bytes: usize,

    /// Longest time a client may take to send a request's head, in milliseconds, and longest
    /// an idle keep-alive connection stays open; past it the connection is closed.
    #[arg(long, env = "SPH_HEADER_TIMEOUT_MS", default_value_t = 10_000)]
    pub header_timeout_ms: u64,

    /// Longest time a client may take to send its body, in milliseconds; a slower one is
    /// answered 408 (or 504 if the request's deadline comes first).
    #[arg(long, env = "SPH_BODY_TIMEOUT_MS", default_value_t = 10_000)]
    pub body_timeout_ms: u64,

    /// The model's input images are resized to `image-size × image-size` RGB.
    #[arg(long, env = "SPH_IMAGE_SIZE", default_value_t = 32)]
    pub image_size: u32,

    /// Width of the model's hidden layer.
    #[arg(long, env = "SPH_HIDDEN", default_value_t = 256)]
    pub hidden: usize,

    /// Classes the model scores.
    #[arg(long, env = "SPH_CLASSES", default_value_t = 10)]
    pub classes: usize,

    /// Seed of the model's weights (every worker loads the same model).
    #[arg(long, env = "SPH_SEED", default_value_t = 42)]
    pub seed: u64,

    /// Threads of the HTTP runtime (tokio).
    #[arg(long, env = "SPH_HTTP_THREADS", default_value_t = 2)]
    pub http_threads: usize,

    /// CPUs to pin the HTTP runtime's threads to (comma-separated, e.g. `0`); default: any.
    #[arg(long, env = "SPH_HTTP_CPUS", value_delimiter = ',')]
    pub http_cpus: Vec<usize>,

    /// CPUs to pin the worker processes to (comma-separated, e.g. `1`); default: any. A CPU
    /// this process may not use is an error at start-up.
    #[arg(long, env = "SPH_WORKER_CPUS", value_delimiter = ',')]
    pub worker_cpus: Vec<usize>,

    /// After SIGTERM or Ctrl-C, how long to keep serving while `/healthz` already answers 503,
    /// in milliseconds: time for a load balancer or a Kubernetes readiness probe to take the
    /// instance out before it stops accepting. A second signal ends the delay.
    #[arg(long, env = "SPH_DRAIN_DELAY_MS", default_value_t = 0)]
    pub drain_delay_ms: u64,

    /// Longest time SIGTERM or Ctrl-C waits for requests in flight to finish, in
    /// milliseconds, counted after `--drain-delay-ms`. A request still running then is
    /// answered 503 (its item is cancelled).
    #[arg(long, env = "SPH_DRAIN_MS", default_value_t = 10_000)]
    pub drain_ms: u64,

    /// Seconds a client is told to wait (`Retry-After`) when the service is full.
    #[arg(long, env = "SPH_RETRY_AFTER_S", default_value_t = 1)]
    pub retry_after_s: u64,

    /// Writes the generated sample images as PNG files into this folder, then exits.
    #[arg(long, env = "SPH_WRITE_SAMPLES")]
    pub write_samples: Option<PathBuf>,

    /// Tests only: honour the `x-fault` request header (`sleep=MS`, `panic`, `exit`, `fail`,
    /// `mark=NAME`, which creates the file NAME in this folder when the preprocessing worker
    /// starts the request, `hold=NAME`, which waits until the file NAME exists there, at most
    /// 60 s). Refused unless the service listens on a loopback address.
    #[arg(long, hide = true)]
    pub fault_injection: Option<PathBuf>,
}

/// The largest `--body-arena-bytes`.
pub const MAX_BODY_ARENA: usize = 64 << 30;

/// The widest hidden layer, and the most classes, the settings accept.
pub const MAX_LAYER: usize = 1 << 16;

/// The most model weights (floats) the settings accept: 1 GiB of them.
pub const MAX_WEIGHTS: usize = 1 << 28;

impl Config {
    /// The default deadline of a request.
    pub fn timeout(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
    }

    /// The longest time a client may take to send its body.
    pub fn body_timeout(&self) -> Duration {
        Duration::from_millis(self.body_timeout_ms)
    }

    /// The longest time a client may take to send a request's head.
    pub fn header_timeout(&self) -> Duration {
        Duration::from_millis(self.header_timeout_ms)
    }

    /// How long a shutdown keeps serving with `/healthz` failing.
    pub fn drain_delay(&self) -> Duration {
        Duration::from_millis(self.drain_delay_ms)
    }

    /// The longest time a shutdown waits for requests in flight.
    pub fn drain(&self) -> Duration {
        Duration::from_millis(self.drain_ms)
    }

    /// Checks values clap cannot: the ones that must not be zero.
    pub fn validate(&self) -> Result<(), String> {
        let positive = [
            ("--preprocess-workers", self.preprocess_workers),
            ("--model-workers", self.model_workers),
            ("--max-batch", self.max_batch),
            ("--capacity", self.capacity),
            ("--image-size", self.image_size as usize),
            ("--hidden", self.hidden),
            ("--classes", self.classes),
            ("--http-threads", self.http_threads),
            ("--max-body-bytes", self.max_body_bytes),
        ];
        for (flag, v) in positive {
            if v == 0 {
                return Err(format!("{flag} must be at least 1"));
            }
        }
        if self.max_body_bytes > 1 << 30 {
            return Err("--max-body-bytes must be at most 1 GiB".into());
        }
        if self.body_arena_bytes != 0
            && !(self.max_body_bytes..=MAX_BODY_ARENA).contains(&self.body_arena_bytes)
        {
            return Err(format!(
                "--body-arena-bytes must be 0 (automatic) or from --max-body-bytes ({}) to {} \
                 GiB",
                self.max_body_bytes,
                MAX_BODY_ARENA >> 30
            ));
        }
        if self.header_timeout_ms == 0 || self.body_timeout_ms == 0 || self.timeout_ms == 0 {
            return Err(
                "--timeout-ms, --header-timeout-ms and --body-timeout-ms must be at least 1".into(),
            );
        }
        if !self
            .instance
            .bytes()
            .all(|b| b == b' ' || b.is_ascii_graphic())
        {
            return Err(format!(
                "--instance {:?} cannot be sent in a header (visible ASCII and spaces only)",
                self.instance
            ));
        }
        for (flag, v) in [("--hidden", self.hidden), ("--classes", self.classes)] {
            if v > MAX_LAYER {
                return Err(format!("{flag} must be at most {MAX_LAYER}"));
            }
        }
        if self.fault_injection.is_some() && !self.listen.ip().is_loopback() {
            return Err(
                "fault injection (a test setting) is only allowed on a loopback address".into(),
            );
        }
        if self.image_size > 256 {
            return Err("--image-size must be at most 256".into());
        }
        // The model's weights, in floats: inputs × hidden + hidden × classes (each bounded
        // above, so no overflow).
        let inputs = (self.image_size as usize).pow(2) * 3;
        let weights = inputs * self.hidden + self.hidden * self.classes;
        if weights > MAX_WEIGHTS {
            return Err(format!(
                "the model would need {} MiB of weights (--image-size, --hidden, --classes); at \
                 most {} MiB",
                (weights * 4) >> 20,
                (MAX_WEIGHTS * 4) >> 20
            ));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::Config;
    use clap::Parser;

    fn check(args: &[&str]) -> Result<(), String> {
        let mut all = vec!["stateful-pool-http"];
        all.extend_from_slice(args);
        Config::try_parse_from(all)
            .map_err(|e| e.to_string())?
            .validate()
    }

    #[test]
    fn values_clap_cannot_check_are_refused_with_the_flag_named() {
        assert_eq!(check(&[]), Ok(()));
        for (args, flag) in [
            (&["--timeout-ms", "0"][..], "--timeout-ms"),
            (&["--instance", "a\nb"], "--instance"),
            (&["--instance", "a\tb"], "--instance"),
            (&["--instance", "caf\u{20ac}"], "--instance"),
            (&["--hidden", "100000000"], "--hidden"),
            (&["--classes", "4294967306"], "--classes"),
            (&["--image-size", "256", "--hidden", "8192"], "--hidden"),
            (&["--body-arena-bytes", "1000"], "--body-arena-bytes"),
            (&["--capacity", "0"], "--capacity"),
        ] {
            let e = check(args).expect_err(&format!("{args:?} accepted"));
            assert!(e.contains(flag), "{args:?}: {e}");
        }
        assert_eq!(check(&["--body-arena-bytes", "1073741824"]), Ok(()));
        assert_eq!(check(&["--image-size", "8", "--hidden", "65536"]), Ok(()));
        assert_eq!(check(&["--classes", "65536"]), Ok(()));
    }
}
