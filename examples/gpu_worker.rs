//! GPU workers (feature `cuda`): each worker loads "a model" (a weight matrix) onto its GPU once,
//! in its spawn step, then serves matrix-vector products whose input vector arrives as a loaned
//! payload in shared memory: the worker copies it to the GPU straight from the pinned
//! shared-memory payload (no staging copy), runs an NVRTC-compiled kernel and returns the
//! result, which the caller checks against a CPU reference. Then the same with dynamic
//! batching: a worker stacks the inputs of up to 32 queued tasks and serves them with one
//! host-to-device copy, one kernel launch and one copy back (`execute_batch`). It ends by
//! measuring host-to-device bandwidth from the pinned payload against pageable memory.
//!
//! Run: `cargo run --release --features cuda --example gpu_worker [N_GPUS]`
//!
//! On a machine without a CUDA driver or GPU it says so and runs the CPU path instead.

use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use stateful_pool::{
    BatchPolicy, BatchTask, BoxError, Poisoned, Pool, SpawnOptions, TaskContext, Worker,
    WorkerContext,
};
use std::sync::Arc;
use std::time::Instant;

/// The "model": an `n × n` matrix generated from `seed`.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, Copy)]
struct Model {
    n: u32,
    seed: u64,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
enum Job {
    /// y = W · x, x being the payload (n little-endian f32).
    MatVec,
    /// Host-to-device bandwidth of the payload (pinned) and of a pageable copy of it, GB/s.
    Bandwidth,
}

#[derive(Archive, Serialize, Deserialize, Debug)]
struct Answer {
    y: Vec<f32>,
    /// How many times this worker process uploaded its model (1: once, at spawn).
    uploads: u32,
    /// Tasks in the kernel launch that computed `y` (1: alone).
    batch: u32,
    device: String,
    pinned_gbps: f64,
    pageable_gbps: f64,
}

fn weights(m: Model) -> Vec<f32> {
    let mut s = m.seed;
    (0..(m.n as usize * m.n as usize))
        .map(|_| {
            s = s
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            ((s >> 40) as f32 / (1u64 << 24) as f32) - 0.5
        })
        .collect()
}

fn matvec_cpu(w: &[f32], x: &[f32]) -> Vec<f32> {
    let n = x.len();
    (0..n)
        .map(|i| (0..n).map(|j| w[i * n + j] * x[j]).sum())
        .collect()
}

const KERNEL: &str = r#"
extern "C" __global__ void matvec(const float* w, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) {
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += w[i * n + j] * x[j];
        y[i] = acc;
    }
}

// One launch for a batch: x and y hold `b` vectors of n, one after the other.
extern "C" __global__ void matvec_batched(const float* w, const float* x, float* y, int n, int b) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t < n * b) {
        int k = t / n, i = t % n;
        float acc = 0.0f;
        for (int j = 0; j < n; j++) acc += w[i * n + j] * x[k * n + j];
        y[t] = acc;
    }
}
"#;

struct GpuWorker {
    stream: Arc<CudaStream>,
    func: CudaFunction,
    batched: CudaFunction,
    weights: CudaSlice<f32>,
    n: usize,
    uploads: u32,
    device: String,
}

/// A CUDA error inside a task leaves the context in an unknown state: report it as poisoned,
/// so the pool replaces this worker with a fresh process and context.
fn cuda<T, E: std::fmt::Display>(r: Result<T, E>) -> Result<T, BoxError> {
    r.map_err(|e| Poisoned::new(format!("CUDA error: {e}")).into())
}

impl Worker for GpuWorker {
    type SpawnArgs = Model;
    type SpawnOutput = String;
    type Task = Job;
    type Output = Answer;

    fn spawn(model: Model, ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
        let gpu: &Arc<CudaContext> = ctx.cuda().first().ok_or("spawn this worker with a GPU")?;
        let stream = gpu.default_stream();
        let ptx = stateful_pool::cudarc::nvrtc::compile_ptx(KERNEL)?;
        let module = gpu.load_module(ptx)?;
        let func = module.load_function("matvec")?;
        let batched = module.load_function("matvec_batched")?;
        let weights = stream.clone_htod(&weights(model))?; // the model goes up once
        let device = gpu.name()?;
        let msg = format!(
            "worker {} (pid {}) on GPU {:?} ({device}): model of {}×{} loaded, payloads pinned: {}",
            ctx.index(),
            ctx.pid(),
            ctx.gpu_ids(),
            model.n,
            model.n,
            ctx.payload_pinned()
        );
        Ok((
            GpuWorker {
                stream,
                func,
                batched,
                weights,
                n: model.n as usize,
                uploads: 1,
                device,
            },
            msg,
        ))
    }

    fn execute(&mut self, job: &ArchivedJob, ctx: &TaskContext<'_>) -> Result<Answer, BoxError> {
        let payload = ctx.payload(); // in shared memory, pinned: copied to the GPU directly
        let mut answer = Answer {
            y: Vec::new(),
            uploads: self.uploads,
            batch: 1,
            device: self.device.clone(),
            pinned_gbps: 0.0,
            pageable_gbps: 0.0,
        };
        match job {
            ArchivedJob::MatVec => {
                if payload.len() != self.n * 4 {
                    return Err(format!("expected {} payload bytes", self.n * 4).into());
                }
                let x: CudaSlice<u8> = cuda(self.stream.clone_htod(payload))?;
                let mut y = cuda(self.stream.alloc_zeros::<f32>(self.n))?;
                let n = self.n as i32;
                let mut launch = self.stream.launch_builder(&self.func);
                launch.arg(&self.weights).arg(&x).arg(&mut y).arg(&n);
                // SAFETY: the kernel's parameters are (const float*, const float*, float*, int):
                // `weights` holds n·n floats, `x` n floats (4n bytes), `y` n floats.
                cuda(unsafe { launch.launch(LaunchConfig::for_num_elems(self.n as u32)) })?;
                answer.y = cuda(self.stream.clone_dtoh(&y))?;
            }
            ArchivedJob::Bandwidth => {
                let mut dev = cuda(self.stream.alloc_zeros::<u8>(payload.len()))?;
                let pageable = payload.to_vec();
                let time = |src: &[u8], dev: &mut CudaSlice<u8>| -> Result<f64, BoxError> {
                    cuda(self.stream.memcpy_htod(src, dev))?; // warm-up
                    cuda(self.stream.synchronize())?;
                    let t = Instant::now();
                    for _ in 0..10 {
                        cuda(self.stream.memcpy_htod(src, dev))?;
                    }
                    cuda(self.stream.synchronize())?;
                    Ok(10.0 * src.len() as f64 / t.elapsed().as_secs_f64() / 1e9)
                };
                answer.pinned_gbps = time(payload, &mut dev)?;
                answer.pageable_gbps = time(&pageable, &mut dev)?;
            }
        }
        Ok(answer)
    }

    /// The inputs of every `MatVec` task in the batch are stacked and served with one upload,
    /// one launch and one download; other jobs run on their own.
    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Job>],
    ) -> Result<Vec<Result<Answer, BoxError>>, BoxError> {
        let n = self.n;
        let stacked: Vec<usize> = (0..batch.len())
            .filter(|&k| {
                matches!(batch[k].task, ArchivedJob::MatVec)
                    && batch[k].ctx.payload().len() == n * 4
            })
            .collect();
        let mut ys = Vec::new();
        if !stacked.is_empty() {
            let b = stacked.len();
            let mut host = Vec::with_capacity(b * n * 4);
            for &k in &stacked {
                host.extend_from_slice(batch[k].ctx.payload());
            }
            let x: CudaSlice<u8> = cuda(self.stream.clone_htod(&host))?; // one upload
            let mut y = cuda(self.stream.alloc_zeros::<f32>(n * b))?;
            let (ni, bi) = (n as i32, b as i32);
            let mut launch = self.stream.launch_builder(&self.batched);
            launch
                .arg(&self.weights)
                .arg(&x)
                .arg(&mut y)
                .arg(&ni)
                .arg(&bi);
            // SAFETY: the kernel's parameters are (const float*, const float*, float*, int,
            // int): `weights` holds n·n floats, `x` b·n floats (4bn bytes), `y` b·n floats.
            cuda(unsafe { launch.launch(LaunchConfig::for_num_elems((n * b) as u32)) })?;
            ys = cuda(self.stream.clone_dtoh(&y))?; // one download
        }
        Ok(batch
            .iter()
            .enumerate()
            .map(|(k, t)| match stacked.iter().position(|&s| s == k) {
                Some(pos) => Ok(Answer {
                    y: ys[pos * n..(pos + 1) * n].to_vec(),
                    uploads: self.uploads,
                    batch: stacked.len() as u32,
                    device: self.device.clone(),
                    pinned_gbps: 0.0,
                    pageable_gbps: 0.0,
                }),
                None => self.execute(t.task, &t.ctx),
            })
            .collect())
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init(); // workers branch off here: keep it first

    let n_gpus: u32 = std::env::args().nth(1).map_or(Ok(1), |s| s.parse())?;
    let model = Model { n: 1024, seed: 7 };
    let w = weights(model);
    let x: Vec<f32> = (0..model.n).map(|i| (i % 17) as f32 * 0.25 - 2.0).collect();
    let reference = matvec_cpu(&w, &x);

    let pool = Pool::<GpuWorker>::builder()
        .task_arena_bytes(256 << 20)
        .build()?;
    let mut spawned = 0;
    for gpu in 0..n_gpus {
        match pool.spawn_with(&model, &SpawnOptions::new().gpus([gpu])) {
            Ok(msg) => {
                println!("{msg}");
                spawned += 1;
            }
            Err(e) => {
                println!("No usable GPU for worker {gpu}: {e}");
                break;
            }
        }
    }
    if spawned == 0 {
        println!("Running the CPU path instead.");
        let t = Instant::now();
        let y = matvec_cpu(&w, &x);
        println!(
            "CPU: y[0..4] = {:?} ({} × {} in {:.2?})",
            &y[..4],
            model.n,
            model.n,
            t.elapsed()
        );
        return Ok(());
    }

    // Tasks: the input vector is written once, in place, into a loaned payload.
    for round in 0..8 {
        let mut loan = pool.loan(x.len() * 4)?;
        for (dst, v) in loan.as_mut_slice().chunks_exact_mut(4).zip(&x) {
            dst.copy_from_slice(&v.to_le_bytes());
        }
        let a = pool.task(&Job::MatVec).payload(loan).execute()?;
        let err =
            a.y.iter()
                .zip(&reference)
                .map(|(g, c)| (g - c).abs() / c.abs().max(1.0))
                .fold(0.0f32, f32::max);
        println!(
            "task {round}: {} results, max relative error vs CPU {err:.2e}, model uploads in this worker: {} ({})",
            a.y.len(),
            a.uploads,
            a.device
        );
        assert!(err < 1e-3, "GPU result differs from the CPU reference");
        assert_eq!(a.uploads, 1, "the model is uploaded once per worker");
    }

    // The same work, 64 tasks in flight: one by one, then batched by the workers.
    let check = |y: &[f32]| {
        y.iter()
            .zip(&reference)
            .map(|(g, c)| (g - c).abs() / c.abs().max(1.0))
            .fold(0.0f32, f32::max)
    };
    for policy in [BatchPolicy::none(), BatchPolicy::new(32)] {
        pool.set_batch_policy(policy)?;
        let t = Instant::now();
        let handles = (0..64)
            .map(|_| {
                let mut loan = pool.loan(x.len() * 4)?;
                for (dst, v) in loan.as_mut_slice().chunks_exact_mut(4).zip(&x) {
                    dst.copy_from_slice(&v.to_le_bytes());
                }
                Ok(pool.task(&Job::MatVec).payload(loan).submit()?)
            })
            .collect::<Result<Vec<_>, Box<dyn std::error::Error>>>()?;
        let mut biggest = 0;
        for h in handles {
            let a = h.wait()?;
            assert!(
                check(&a.y) < 1e-3,
                "GPU result differs from the CPU reference"
            );
            biggest = biggest.max(a.batch);
        }
        println!(
            "64 tasks, max_batch {:>2}: {:>8.2?} ({:.0} tasks/s), largest kernel launch served {biggest} tasks",
            policy.max_batch(),
            t.elapsed(),
            64.0 / t.elapsed().as_secs_f64()
        );
    }
    pool.set_batch_policy(BatchPolicy::none())?;

    // Host-to-device bandwidth: 64 MiB from the pinned shared-memory payload vs pageable.
    let mut loan = pool.loan(64 << 20)?;
    loan.as_mut_slice().fill(1);
    let a = pool.task(&Job::Bandwidth).payload(loan).execute()?;
    println!(
        "host-to-device, 64 MiB: pinned shared-memory payload {:.1} GB/s, pageable copy {:.1} GB/s ({:.2}×)",
        a.pinned_gbps,
        a.pageable_gbps,
        a.pinned_gbps / a.pageable_gbps
    );
    Ok(())
}
