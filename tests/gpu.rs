//! GPU workers (feature `cuda`). Without a driver or GPU (CI) the GPU checks are skipped with a
//! message saying why, and what can be checked is: a spawn asking for a GPU fails clearly.
//! With a GPU: contexts on the right device, the model loaded once and reused, results equal to
//! a CPU reference, a bad ordinal refused, and a killed worker respawned with a fresh context.
#![cfg(feature = "cuda")]

stateful_pool::worker_hook!();

use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::cudarc::driver::{
    CudaContext, CudaFunction, CudaSlice, CudaStream, LaunchConfig, PushKernelArg,
};
use stateful_pool::{BoxError, Pool, SpawnError, SpawnOptions, TaskContext, Worker, WorkerContext};
use std::sync::Arc;
use std::time::{Duration, Instant};

#[derive(Archive, Serialize, Deserialize, Debug, Clone)]
struct Out {
    /// `x[i] * scale[i]` for the task's x.
    y: Vec<f32>,
    /// Device ordinal of the context in the worker process, and its name.
    ordinal: u32,
    device: String,
    /// Model uploads made by this worker process.
    uploads: u32,
    pid: u32,
    visible: String,
    pinned: bool,
}

const KERNEL: &str = r#"
extern "C" __global__ void scale(const float* s, const float* x, float* y, int n) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < n) y[i] = s[i] * x[i];
}
"#;

struct ScaleWorker {
    ctx: Arc<CudaContext>,
    stream: Arc<CudaStream>,
    func: CudaFunction,
    scale: CudaSlice<f32>,
    uploads: u32,
}

fn model(n: usize) -> Vec<f32> {
    (0..n).map(|i| 1.0 + (i % 7) as f32).collect()
}

impl Worker for ScaleWorker {
    type SpawnArgs = u32;
    type SpawnOutput = u32;
    type Task = Vec<f32>;
    type Output = Out;

    fn spawn(n: u32, ctx: &WorkerContext) -> Result<(Self, u32), BoxError> {
        let gpu = ctx.cuda().first().ok_or("no GPU context")?.clone();
        let stream = gpu.default_stream();
        let ptx = stateful_pool::cudarc::nvrtc::compile_ptx(KERNEL)?;
        let func = gpu.load_module(ptx)?.load_function("scale")?;
        let scale = stream.clone_htod(&model(n as usize))?;
        Ok((
            ScaleWorker {
                ctx: gpu,
                stream,
                func,
                scale,
                uploads: 1,
            },
            ctx.cuda().len() as u32,
        ))
    }

    fn execute(
        &mut self,
        x: &rkyv::Archived<Vec<f32>>,
        ctx: &TaskContext<'_>,
    ) -> Result<Out, BoxError> {
        let host: Vec<f32> = x.iter().map(|v| v.to_native()).collect();
        let xd = self.stream.clone_htod(&host)?;
        let mut yd = self.stream.alloc_zeros::<f32>(host.len())?;
        let n = host.len() as i32;
        let mut l = self.stream.launch_builder(&self.func);
        l.arg(&self.scale).arg(&xd).arg(&mut yd).arg(&n);
        // SAFETY: (const float*, const float*, float*, int) with n elements each.
        unsafe { l.launch(LaunchConfig::for_num_elems(n as u32)) }?;
        Ok(Out {
            y: self.stream.clone_dtoh(&yd)?,
            ordinal: self.ctx.ordinal() as u32,
            device: self.ctx.name()?,
            uploads: self.uploads,
            pid: ctx.worker().pid(),
            visible: std::env::var("CUDA_VISIBLE_DEVICES").unwrap_or_default(),
            pinned: ctx.worker().payload_pinned(),
        })
    }
}

/// Whether this machine can run the GPU checks; prints why not.
fn gpu_count() -> usize {
    // SAFETY: only probes whether libcuda can be loaded.
    if !unsafe { stateful_pool::cudarc::driver::sys::is_culib_present() } {
        eprintln!("SKIPPED GPU checks: no CUDA driver (libcuda.so) on this machine");
        return 0;
    }
    match CudaContext::device_count() {
        Ok(n) if n > 0 => n as usize,
        other => {
            eprintln!("SKIPPED GPU checks: the CUDA driver reports no usable GPU ({other:?})");
            0
        }
    }
}

fn pool() -> Pool<ScaleWorker> {
    Pool::<ScaleWorker>::builder().build().unwrap()
}

#[test]
fn asking_for_a_gpu_without_one_fails_the_spawn_clearly() {
    if gpu_count() > 0 {
        // The GPU path is covered below; here: an ordinal past the last GPU.
        let p = pool();
        let e = p
            .spawn_with(&16, &SpawnOptions::new().gpus([999]))
            .unwrap_err();
        assert!(
            matches!(&e, SpawnError::Failed { message, .. } if message.contains("GPU 999 does not exist")),
            "{e}"
        );
        assert_eq!(p.num_workers(), 0);
        return;
    }
    let p = pool();
    let e = p
        .spawn_with(&16, &SpawnOptions::new().gpus([0]))
        .unwrap_err();
    let SpawnError::Failed { message, .. } = &e else {
        panic!("expected a spawn failure, got {e}");
    };
    // SAFETY: as in gpu_count.
    if !unsafe { stateful_pool::cudarc::driver::sys::is_culib_present() } {
        assert!(message.contains("no CUDA driver"), "{message}");
    }
    assert_eq!(p.num_workers(), 0, "no worker left behind");
    // The pool is still usable: a spawn without GPUs reaches the worker's own spawn step.
    let e = p.spawn(&16).unwrap_err();
    assert!(e.to_string().contains("no GPU context"), "{e}");
}

#[test]
fn gpu_workers_hold_contexts_on_their_gpus_load_once_and_compute_right() {
    let n = gpu_count();
    if n == 0 {
        return;
    }
    let p = pool();
    for gpu in 0..n.min(2) as u32 {
        assert_eq!(
            p.spawn_with(&4096, &SpawnOptions::new().gpus([gpu]))
                .unwrap(),
            1
        );
    }
    let x: Vec<f32> = (0..4096).map(|i| i as f32 * 0.5).collect();
    let want: Vec<f32> = x.iter().zip(model(4096)).map(|(a, b)| a * b).collect();
    let mut ordinals = std::collections::BTreeSet::new();
    for _ in 0..20 {
        let o = p.execute(&x).unwrap();
        assert_eq!(o.y, want, "GPU result equals the CPU reference");
        assert_eq!(o.uploads, 1, "model uploaded once per worker and reused");
        assert!(!o.device.is_empty());
        assert!(o.pinned, "payload arena pinned");
        ordinals.insert(o.ordinal);
    }
    eprintln!("contexts seen on ordinals {ordinals:?}");
    assert!(ordinals.iter().all(|&o| (o as usize) < n));
}

#[test]
fn visible_devices_only_renumbers_inside_the_worker() {
    let n = gpu_count();
    if n == 0 {
        return;
    }
    let last = n as u32 - 1;
    let p = pool();
    p.spawn_with(
        &64,
        &SpawnOptions::new().gpus([last]).visible_devices_only(true),
    )
    .unwrap();
    let o = p.execute(&vec![1.0; 64]).unwrap();
    assert_eq!(o.visible, last.to_string());
    assert_eq!(
        o.ordinal, 0,
        "the only visible device is ordinal 0 inside the worker"
    );
}

#[test]
fn a_killed_gpu_worker_comes_back_with_a_fresh_context() {
    if gpu_count() == 0 {
        return;
    }
    let p = pool();
    p.spawn_with(&256, &SpawnOptions::new().gpus([0])).unwrap();
    let x = vec![2.0f32; 256];
    let before = p.execute(&x).unwrap();
    // SAFETY: killing our own worker process.
    unsafe { libc::kill(before.pid as i32, libc::SIGKILL) };
    let end = Instant::now() + Duration::from_secs(60);
    let after = loop {
        if let Ok(o) = p.execute(&x) {
            if o.pid != before.pid {
                break o;
            }
        }
        assert!(Instant::now() < end, "the GPU worker was not restarted");
        std::thread::sleep(Duration::from_millis(10));
    };
    assert_eq!(after.y, before.y);
    assert_eq!(after.uploads, 1, "a fresh process loaded its own model");
    assert_eq!(p.stats().restarts, 1);
}
