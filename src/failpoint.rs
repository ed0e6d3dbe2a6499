//! Failpoints: named places in the worker's protocol where a test can make the worker process
//! die (SIGKILL to itself), to check that every task still resolves exactly once.
//!
//! Compiled in only with the `failpoints` cargo feature (the crate's own tests turn it on);
//! otherwise [`hit`] is an empty inline function.
//!
//! A test sets `STATEFUL_POOL_FAILPOINTS` in the workers' environment
//! ([`PoolBuilder::worker_env`](crate::PoolBuilder::worker_env)) to a comma-separated list of
//! `name@n` or `name@n/g`: die at the `n`-th hit of `name` (1-based), only in the worker's
//! `g`-th life (generation) if `/g` is given.
//!
//! The names, in the order a task meets them: `pop_mid` (inside the queue pop, after winning
//! the position and before releasing the cell), `after_claim` (the slot is claimed, the task not
//! yet read), `mid_read` (the task is validated, not yet executed), `after_result_write` (the
//! result is written, not yet published), `after_publish` (published, before the worker clears
//! its claim on the slot).

/// The environment variable read by workers.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) const ENV: &str = "STATEFUL_POOL_FAILPOINTS";

#[cfg(feature = "failpoints")]
mod imp {
    use std::sync::Mutex;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicBool, Ordering};

    struct Point {
        name: String,
        at: u64,
        hits: u64,
    }

    static POINTS: OnceLock<Option<Mutex<Vec<Point>>>> = OnceLock::new();
    /// Whether any failpoint is set in this process: the one load an unarmed `hit` costs (the
    /// benchmarks are built with this feature too, so an unarmed worker must stay as fast as
    /// a release build's).
    static ARMED: AtomicBool = AtomicBool::new(false);

    /// Reads the configuration (once, at worker start-up).
    pub(crate) fn configure(generation: u32) {
        let points = POINTS.get_or_init(|| {
            let spec = std::env::var(super::ENV).ok()?;
            let mut v = Vec::new();
            for item in spec.split(',').filter(|s| !s.is_empty()) {
                let (name, rest) = item.split_once('@')?;
                let (at, g) = match rest.split_once('/') {
                    Some((a, g)) => (a.parse().ok()?, Some(g.parse::<u32>().ok()?)),
                    None => (rest.parse().ok()?, None),
                };
                if g.is_none_or(|g| g == generation) {
                    v.push(Point {
                        name: name.to_string(),
                        at,
                        hits: 0,
                    });
                }
            }
            Some(Mutex::new(v))
        });
        ARMED.store(points.is_some(), Ordering::Relaxed);
    }

    /// Dies here if the configuration says so.
    #[inline(always)]
    pub(crate) fn hit(name: &str) {
        if ARMED.load(Ordering::Relaxed) {
            hit_armed(name);
        }
    }

    #[cold]
    #[inline(never)]
    fn hit_armed(name: &str) {
        let Some(Some(points)) = POINTS.get() else {
            return;
        };
        let mut points = points.lock().unwrap_or_else(|e| e.into_inner());
        for p in points.iter_mut().filter(|p| p.name == name) {
            p.hits += 1;
            if p.hits == p.at {
                // SAFETY: getpid and kill have no memory-safety preconditions.
                unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
            }
        }
    }
}

#[cfg(feature = "failpoints")]
pub(crate) use imp::{configure, hit};

/// Reads the configuration (no-op without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn configure(_generation: u32) {}

/// A failpoint (no-op without the `failpoints` feature).
#[cfg(not(feature = "failpoints"))]
#[inline(always)]
pub(crate) fn hit(_name: &str) {}

/// The environment variable that makes a worker *hostile* (test builds only): a bit mask of
/// the misbehaviours of [`Hostile`], so tests can check that the parent survives a worker
/// that writes garbage into the memory it shares.
#[cfg_attr(not(feature = "failpoints"), allow(dead_code))]
pub(crate) const HOSTILE_ENV: &str = "STATEFUL_POOL_HOSTILE";

/// Misbehaviours of a hostile test worker (see `worker::main_loop`).
#[cfg(feature = "failpoints")]
pub(crate) mod hostile {
    /// Every other task, publish random outcome words instead of the honest ones.
    pub(crate) const LIE: u32 = 1;
    /// After publishing, overwrite the result (slot words, inline bytes, record bytes) while
    /// the parent may be reading it.
    pub(crate) const REWRITE: u32 = 2;
    /// Every third task, write random counters into its completion ring's header.
    pub(crate) const COUNTERS: u32 = 4;
    /// After each task, scribble random bytes over its completion ring's records.
    pub(crate) const RECORDS: u32 = 8;
    /// After each task, write random values into its claim, current slot and current task.
    pub(crate) const CLAIMS: u32 = 16;
    /// Every eighth task, write random values into a cell of the shared task queue.
    pub(crate) const CELLS: u32 = 32;

    /// The mask for this worker process (0: honest).
    pub(crate) fn mask() -> u32 {
        std::env::var(super::HOSTILE_ENV)
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(0)
    }

    /// A small xorshift generator.
    #[derive(Debug)]
    pub(crate) struct Rng(pub(crate) std::cell::Cell<u64>);

    impl Rng {
        pub(crate) fn next(&self) -> u64 {
            let mut x = self.0.get();
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            self.0.set(x);
            x
        }
    }
}
