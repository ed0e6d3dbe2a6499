//! The `py_stateful_map` seed's example, in Rust: four stateful workers, each initialised with
//! its own arguments, a lazy ordered map over 1,000 inputs with a progress bar (the map knows
//! its length), and errors kept in the results (the deferred policy).
//!
//! Run: `cargo run --release --example map_progress`
//!
//! Then the same input again, unordered, and with the immediate error policy.

use indicatif::{ProgressBar, ProgressIterator, ProgressStyle};
use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{BoxError, ErrorPolicy, Pool, TaskContext, Worker, WorkerContext};

/// Per-worker arguments (the seed's `worker_kwarg_dict_arr` entries).
#[derive(Archive, Serialize, Deserialize, Debug)]
struct WorkerArgs {
    proc_id: u32,
}

/// The seed's `SimpleArithmeticClassWorker`: a stateful worker that squares modulo 337
/// 100,000 times per input.
struct ArithmeticWorker {
    proc_id: u32,
    served: u64,
}

impl Worker for ArithmeticWorker {
    type SpawnArgs = WorkerArgs;
    type SpawnOutput = String;
    type Task = u64;
    type Output = u64;

    fn spawn(args: WorkerArgs, ctx: &WorkerContext) -> Result<(Self, String), BoxError> {
        let msg = format!("Init. process {} (pid {})", args.proc_id, ctx.pid());
        Ok((
            ArithmeticWorker {
                proc_id: args.proc_id,
                served: 0,
            },
            msg,
        ))
    }

    fn execute(
        &mut self,
        task: &rkyv::Archived<u64>,
        _: &TaskContext<'_>,
    ) -> Result<u64, BoxError> {
        let input = task.to_native();
        self.served += 1;
        if input == 4_440 {
            // One bad input, to show how errors travel.
            return Err(format!(
                "worker {} refuses input {input} (after {} tasks)",
                self.proc_id, self.served
            )
            .into());
        }
        let mut v = input;
        for _ in 0..100_000 {
            v = (v * v) % 337;
        }
        Ok(v)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init(); // workers branch off here: keep it first

    const N_TASKS: u64 = 1000;
    const N_WORKERS: u32 = 4;

    let pool = Pool::<ArithmeticWorker>::builder().queue_size(64).build()?;
    // One set of spawn arguments per worker, all started at once.
    let args: Vec<WorkerArgs> = (0..N_WORKERS)
        .map(|proc_id| WorkerArgs { proc_id })
        .collect();
    for hello in pool.spawn_many(&args) {
        println!("{}", hello?);
    }

    // A lazy input: nothing is materialised; at most `window` tasks are in flight. (A range of
    // u32 knows its exact length; std does not promise that for a range of u64.)
    let inputs = (0..N_TASKS as u32).map(|k| k as u64 * 10);
    let style = ProgressStyle::with_template("{bar:40} {pos}/{len} [{elapsed_precise}] {per_sec}")?;

    // 1. Ordered, deferred errors: every input gets its result; the bar knows the length.
    let mut total = 0;
    let mut errors = 0;
    for result in pool
        .map(inputs.clone())
        .window(32)
        .progress_with_style(style.clone())
    {
        match result {
            Ok(v) => total += v,
            Err(e) => {
                errors += 1;
                println!("Error: {e}");
            }
        }
    }
    println!("Total: {total} ({errors} error)");

    // 2. Unordered, each result beside its input's position.
    let bar = ProgressBar::new(N_TASKS).with_style(style);
    let mut unordered_total = 0;
    let mut out_of_order = 0;
    for (expected, (index, result)) in pool.map(inputs.clone()).unordered().indexed().enumerate() {
        bar.inc(1);
        out_of_order += usize::from(index != expected);
        unordered_total += result.unwrap_or(0);
    }
    bar.finish();
    assert_eq!(unordered_total, total);
    println!("Unordered total: {unordered_total} ({out_of_order} results came out of input order)");

    // 3. Immediate: the first error ends the map; its queued tasks are cancelled.
    let first_error = pool
        .map(inputs)
        .on_error(ErrorPolicy::Immediate)
        .collect::<Result<Vec<u64>, _>>()
        .unwrap_err();
    println!(
        "Immediate policy stopped at input {}: {}",
        first_error.index, first_error.error
    );
    Ok(())
}
