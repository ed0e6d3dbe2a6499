//! The C ABI's cost on a round trip: the same tiny task (8 bytes) on one spawned worker, run
//! through the Rust API (`Pool::execute`) and through the C functions (`sp_pool_execute` +
//! `sp_result_free`), in one run, and the ratio of the two.
//!
//! Both pools' workers are this binary serving the same Rust worker (`Echo`, whose four message
//! types are `Vec<u8>`, so it serves the C ABI's pools too): the difference is only the host
//! side (handle tables, result copy into a result handle, the `guard`).
//!
//! Run: `cargo bench -p stateful-pool-ffi --bench c_roundtrip`, or quick (≈ 10 s):
//! `STATEFUL_POOL_BENCH_QUICK=1 cargo bench -p stateful-pool-ffi --bench c_roundtrip`.

use criterion::{Criterion, criterion_group, criterion_main};
use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
use stateful_pool_ffi::*;
use std::ptr::null_mut;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Echoes its task.
struct Echo;

impl Worker for Echo {
    type SpawnArgs = Vec<u8>;
    type SpawnOutput = Vec<u8>;
    type Task = Vec<u8>;
    type Output = Vec<u8>;

    fn spawn(_: Vec<u8>, _: &WorkerContext) -> Result<(Self, Vec<u8>), BoxError> {
        Ok((Echo, Vec::new()))
    }

    fn execute(
        &mut self,
        task: &rkyv::Archived<Vec<u8>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<u8>, BoxError> {
        Ok(task.as_slice().to_vec())
    }
}

// In a worker process started by either pool, serve `Echo` (before `main`, before any thread).
#[used]
#[unsafe(link_section = ".init_array")]
static WORKER_HOOK: extern "C" fn() = {
    extern "C" fn hook() {
        stateful_pool::serve::<Echo>();
    }
    hook
};

fn quick() -> bool {
    std::env::var_os("STATEFUL_POOL_BENCH_QUICK").is_some()
}

/// Seconds per round trip of each side, from the measured iterations.
static PER_ITER: Mutex<Vec<(&'static str, f64)>> = Mutex::new(Vec::new());

fn record(name: &'static str, total: Duration, n: u64) {
    PER_ITER
        .lock()
        .unwrap()
        .push((name, total.as_secs_f64() / n as f64));
}

fn roundtrip(c: &mut Criterion) {
    let task = 42u64.to_le_bytes().to_vec();

    let rust: Pool<Echo> = Pool::builder()
        .queue_size(16)
        .max_workers(1)
        .build()
        .unwrap();
    rust.spawn(&Vec::new()).unwrap();

    let mut cpool = sp_pool { id: 0 };
    let mut opts = std::mem::MaybeUninit::<sp_pool_options>::uninit();
    // SAFETY: writable storage, initialised by the call; valid pointers after.
    unsafe {
        assert_eq!(sp_pool_options_init(opts.as_mut_ptr()), sp_status::SP_OK);
        let mut opts = opts.assume_init();
        opts.queue_size = 16;
        opts.max_workers = 1;
        assert_eq!(sp_pool_new(&opts, &mut cpool), sp_status::SP_OK);
        let mut hello = sp_result { id: 0 };
        assert_eq!(
            sp_pool_spawn(cpool, std::ptr::null(), 0, &mut hello, null_mut()),
            sp_status::SP_OK
        );
        assert_eq!(sp_result_free(hello), sp_status::SP_OK);
    }

    let mut g = c.benchmark_group("roundtrip_8B");
    if quick() {
        g.sample_size(10)
            .warm_up_time(Duration::from_millis(300))
            .measurement_time(Duration::from_secs(2));
    } else {
        g.sample_size(30)
            .warm_up_time(Duration::from_secs(1))
            .measurement_time(Duration::from_secs(5));
    }
    g.bench_function("rust_execute", |b| {
        b.iter_custom(|n| {
            let start = Instant::now();
            for _ in 0..n {
                let out = rust.execute(&task).unwrap();
                assert_eq!(out.len(), 8);
            }
            let t = start.elapsed();
            record("rust", t, n);
            t
        })
    });
    g.bench_function("c_sp_pool_execute", |b| {
        b.iter_custom(|n| {
            let start = Instant::now();
            for _ in 0..n {
                let mut r = sp_result { id: 0 };
                // SAFETY: valid pointers; the result is freed at once.
                unsafe {
                    assert_eq!(
                        sp_pool_execute(cpool, task.as_ptr(), task.len(), &mut r),
                        sp_status::SP_OK
                    );
                    assert_eq!(sp_result_free(r), sp_status::SP_OK);
                }
            }
            let t = start.elapsed();
            record("c", t, n);
            t
        })
    });
    g.finish();
    assert_eq!(sp_pool_free(cpool), sp_status::SP_OK);
    drop(rust);

    // The median per-iteration time of each side's samples, and their ratio.
    let all = PER_ITER.lock().unwrap();
    let median = |name: &str| {
        let mut v: Vec<f64> = all.iter().filter(|x| x.0 == name).map(|x| x.1).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        v[v.len() / 2]
    };
    let (r, cc) = (median("rust"), median("c"));
    println!(
        "\nround trip (8-byte task, one worker), median of samples: Rust Pool::execute {:.2} µs, \
         C sp_pool_execute + sp_result_free {:.2} µs, C / Rust = {:.3}",
        r * 1e6,
        cc * 1e6,
        cc / r
    );
}

criterion_group!(benches, roundtrip);
criterion_main!(benches);
