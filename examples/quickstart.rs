//! The seed's SquareWorker, in Rust: spawn two workers (each given a list of GPU ids), run one
//! blocking execute, then submit many tasks from several threads and print every result.
//!
//! Run: `cargo run --release --example quickstart`

use stateful_pool::{BoxError, Pool, TaskContext, Worker, WorkerContext};
use std::time::Duration;

/// A worker whose state is the GPU ids it was given at spawn (a real one would load a model
/// onto them; see `examples/gpu_worker.rs`, feature `cuda`).
struct SquareWorker {
    gpu_ids: Vec<u32>,
    served: u64,
}

impl Worker for SquareWorker {
    type SpawnArgs = Vec<u32>;
    type SpawnOutput = String;
    type Task = i64;
    type Output = String;

    fn spawn(gpu_ids: Vec<u32>, ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
        let msg = format!(
            "Worker {} (pid {}) initialized on GPU: {gpu_ids:?}",
            ctx.index(),
            ctx.pid()
        );
        Ok((SquareWorker { gpu_ids, served: 0 }, msg))
    }

    fn execute(
        &mut self,
        task: &rkyv::Archived<i64>,
        ctx: &TaskContext<'_>,
    ) -> Result<String, BoxError> {
        let value = task.to_native();
        // Simulate uneven work, as the seed's random sleep does (deterministic here).
        std::thread::sleep(Duration::from_millis(1 + (value as u64 * 7) % 10));
        self.served += 1;
        let square = value.checked_mul(value).ok_or("overflow")?;
        Ok(format!(
            "[Execute] Square of {value} is {square} (computed on GPU: {:?}, worker {}, its task #{})",
            self.gpu_ids,
            ctx.worker().index(),
            self.served
        ))
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init(); // worker processes branch off here

    let pool = Pool::<SquareWorker>::builder().queue_size(100).build()?;

    // Spawn two workers concurrently, each owning two GPU ids; print what their spawn returned.
    let spawns = [vec![0, 1], vec![2, 3]].map(|ids| pool.submit_spawn(&ids));
    for s in spawns {
        println!("{}", s?.wait()?);
    }

    // One blocking call.
    println!("{}", pool.execute(&100)?);

    // Many tasks from several caller threads at once; the next free worker takes the next task.
    std::thread::scope(|scope| {
        for t in 0..4i64 {
            let pool = &pool;
            scope.spawn(move || {
                let handles: Vec<_> = (0..5)
                    .map(|i| pool.submit(&(t * 100 + i)).expect("submit"))
                    .collect();
                for h in handles {
                    println!("thread {t}: {}", h.wait().expect("task"));
                }
            });
        }
    });

    println!("tasks per worker: {:?}", &pool.tasks_done_per_worker()[..2]);
    Ok(())
} // the pool is dropped here: workers finish and exit
