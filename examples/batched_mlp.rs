//! Worker-side dynamic batching with a real batched computation: each worker holds a small MLP
//! (512 → 2048 → 16, 4 MiB of weights), and many concurrent callers each send one input.
//! Without batching every request multiplies one row by the weights (reading all 4 MiB for
//! one row); with batching a worker stacks whatever is queued into one matrix and runs one
//! matrix multiply (ndarray, on `matrixmultiply`) for all of them.
//!
//! Run: `cargo run --release --example batched_mlp` (about 10 s). Prints throughput and
//! latency with and without batching, and checks that both give the same answers.

use ndarray::{Array1, Array2, ArrayView1, Axis};
use stateful_pool::{BatchPolicy, BatchTask, BoxError, Pool, TaskContext, Worker, WorkerContext};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

const INPUT: usize = 512;
const HIDDEN: usize = 2048;
const OUTPUT: usize = 16;

/// A deterministic pseudo-random number in [-0.05, 0.05) (so every worker holds the same
/// model, as if loaded from the same file).
fn weight(state: &mut u64) -> f32 {
    *state ^= *state << 13;
    *state ^= *state >> 7;
    *state ^= *state << 17;
    ((*state >> 40) as f32 / (1u64 << 24) as f32 - 0.5) * 0.1
}

/// The model a worker loads once in its spawn step.
struct Mlp {
    w1: Array2<f32>,
    b1: Array1<f32>,
    w2: Array2<f32>,
    b2: Array1<f32>,
}

impl Mlp {
    fn load(seed: u64) -> Mlp {
        let mut s = seed | 1;
        Mlp {
            w1: Array2::from_shape_simple_fn((INPUT, HIDDEN), || weight(&mut s)),
            b1: Array1::from_shape_simple_fn(HIDDEN, || weight(&mut s)),
            w2: Array2::from_shape_simple_fn((HIDDEN, OUTPUT), || weight(&mut s)),
            b2: Array1::from_shape_simple_fn(OUTPUT, || weight(&mut s)),
        }
    }

    /// Forward pass of a batch: `x` is `batch × INPUT`, the result `batch × OUTPUT`.
    fn forward(&self, x: &Array2<f32>) -> Array2<f32> {
        let mut h = x.dot(&self.w1) + &self.b1;
        h.mapv_inplace(|v| v.max(0.0));
        h.dot(&self.w2) + &self.b2
    }
}

impl Worker for Mlp {
    type SpawnArgs = u64;
    type SpawnOutput = ();
    type Task = Vec<f32>;
    type Output = Vec<f32>;

    fn spawn(seed: u64, _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Mlp::load(seed), ()))
    }

    fn execute(
        &mut self,
        x: &rkyv::Archived<Vec<f32>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<f32>, BoxError> {
        let row = input_row(x)?;
        let out = self.forward(&row.insert_axis(Axis(0)).to_owned());
        Ok(out.row(0).to_vec())
    }

    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Vec<f32>>],
    ) -> Result<Vec<Result<Vec<f32>, BoxError>>, BoxError> {
        // Stack the inputs (a bad one fails alone), one matrix multiply for all.
        let mut x = Array2::<f32>::zeros((batch.len(), INPUT));
        let mut ok = vec![true; batch.len()];
        for (i, t) in batch.iter().enumerate() {
            match input_row(t.task) {
                Ok(row) => x.row_mut(i).assign(&row),
                Err(_) => ok[i] = false,
            }
        }
        let y = self.forward(&x);
        Ok(ok
            .iter()
            .enumerate()
            .map(|(i, &good)| {
                if good {
                    Ok(y.row(i).to_vec())
                } else {
                    Err(format!("an input must have {INPUT} features").into())
                }
            })
            .collect())
    }
}

/// The archived input as a row (archived `f32`s are little-endian, as on this machine's
/// layout; converted one by one so any platform reads them right).
fn input_row(x: &rkyv::Archived<Vec<f32>>) -> Result<Array1<f32>, BoxError> {
    if x.len() != INPUT {
        return Err(format!("an input must have {INPUT} features, not {}", x.len()).into());
    }
    Ok(x.iter().map(|v| v.to_native()).collect())
}

fn input(k: usize) -> Vec<f32> {
    let mut s = k as u64 * 7919 + 1;
    (0..INPUT).map(|_| weight(&mut s) * 10.0).collect()
}

struct Run {
    tasks_per_s: f64,
    p50: Duration,
    p99: Duration,
}

/// `callers` threads send `per_caller` requests each, back to back.
fn serve(pool: &Pool<Mlp>, callers: usize, per_caller: usize) -> Run {
    let start = Instant::now();
    let next = AtomicUsize::new(0);
    let mut lat: Vec<Duration> = std::thread::scope(|s| {
        let hs: Vec<_> = (0..callers)
            .map(|_| {
                s.spawn(|| {
                    (0..per_caller)
                        .map(|_| {
                            let k = next.fetch_add(1, Ordering::Relaxed);
                            let x = input(k % 1000);
                            let t = Instant::now();
                            let y = pool.execute(&x).expect("inference");
                            assert_eq!(y.len(), OUTPUT);
                            t.elapsed()
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        hs.into_iter().flat_map(|h| h.join().unwrap()).collect()
    });
    let secs = start.elapsed().as_secs_f64();
    lat.sort();
    Run {
        tasks_per_s: lat.len() as f64 / secs,
        p50: lat[lat.len() / 2],
        p99: lat[lat.len() * 99 / 100],
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init();
    let pool = Pool::<Mlp>::builder().queue_size(256).build()?;
    for r in pool.spawn_n(&42, 2) {
        r?;
    }
    let callers = 32;
    let per_caller = 40;
    println!(
        "MLP {INPUT}→{HIDDEN}→{OUTPUT}, 2 workers, {callers} concurrent callers, {per_caller} requests each"
    );

    // The same answers either way (one input alone, then inside a batch).
    let probe = input(7);
    let alone = pool.execute(&probe)?;

    pool.set_batch_policy(BatchPolicy::none())?;
    let _ = serve(&pool, 4, 5); // warm-up
    let plain = serve(&pool, callers, per_caller);
    println!(
        "  no batching:        {:>7.0} requests/s   p50 {:>8.2?}   p99 {:>8.2?}",
        plain.tasks_per_s, plain.p50, plain.p99
    );

    pool.set_batch_policy(BatchPolicy::new(32))?;
    let before = pool.stats().batching;
    let batched = serve(&pool, callers, per_caller);
    let after = pool.stats().batching;
    let mean = (after.tasks - before.tasks) as f64 / (after.batches - before.batches).max(1) as f64;
    println!(
        "  batching (max 32):  {:>7.0} requests/s   p50 {:>8.2?}   p99 {:>8.2?}   mean batch {mean:.1}",
        batched.tasks_per_s, batched.p50, batched.p99
    );
    println!(
        "  batching serves {:.1}× the requests per second",
        batched.tasks_per_s / plain.tasks_per_s
    );

    // A lone request under the batching policy is not kept waiting for company.
    let t = Instant::now();
    let in_batch = pool.execute(&probe)?;
    println!("  a lone request with batching on: {:.2?}", t.elapsed());
    let diff = alone
        .iter()
        .zip(&in_batch)
        .map(|(a, b)| (a - b).abs())
        .fold(0.0f32, f32::max);
    assert!(diff < 1e-3, "batched and single answers differ by {diff}");
    println!("  same answer batched and alone (max difference {diff:.1e})");
    let _: ArrayView1<f32> = ArrayView1::from(&in_batch[..]);
    Ok(())
}
