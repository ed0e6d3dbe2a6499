//! What happens when a worker crashes: the task it was running fails with an error naming the
//! worker, its pid and the signal; every other task completes; the worker is restarted with its
//! spawn arguments; a task submitted with retries runs again instead of failing; a hung task
//! times out and its worker is replaced.
//!
//! ```sh
//! cargo run --release --example crash_recovery
//! ```

use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::{BoxError, Pool, PoolEvent, TaskContext, Worker, WorkerContext};
use std::time::Duration;

#[derive(Archive, Serialize, Deserialize, Debug)]
enum Job {
    /// Square a number.
    Square(i64),
    /// Crash the worker (a null-pointer write: SIGSEGV), as a buggy native library would.
    Crash,
    /// Crash only the first time (the marker file records that it happened): an idempotent task
    /// that a retry rescues.
    CrashOnce(String),
    /// Never finish.
    Hang,
}

struct Squarer {
    tasks: u64,
}

impl Worker for Squarer {
    type SpawnArgs = String;
    type SpawnOutput = u32;
    type Task = Job;
    type Output = i64;

    fn spawn(name: String, ctx: &WorkerContext) -> Result<(Self, u32), BoxError> {
        println!(
            "  [{name}] worker {} started (pid {}, life {})",
            ctx.index(),
            ctx.pid(),
            ctx.generation()
        );
        Ok((Squarer { tasks: 0 }, ctx.pid()))
    }

    fn execute(&mut self, job: &ArchivedJob, _: &TaskContext<'_>) -> Result<i64, BoxError> {
        self.tasks += 1;
        match job {
            ArchivedJob::Square(v) => Ok(v.to_native() * v.to_native()),
            ArchivedJob::Crash => {
                // SAFETY: none; crashing is the point of this task.
                unsafe { std::ptr::null_mut::<i64>().write_volatile(1) };
                unreachable!()
            }
            ArchivedJob::CrashOnce(marker) => {
                if std::fs::metadata(marker.as_str()).is_err() {
                    std::fs::write(marker.as_str(), b"crashed once")?;
                    std::process::abort();
                }
                Ok(-1)
            }
            ArchivedJob::Hang => loop {
                std::thread::sleep(Duration::from_secs(1));
            },
        }
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init();

    let pool = Pool::<Squarer>::builder()
        .queue_size(64)
        .on_event(|e| match e {
            PoolEvent::WorkerDied {
                worker,
                pid,
                cause,
                reason,
                ..
            } => println!("  event: worker {worker} (pid {pid}) died: {cause} [{reason}]"),
            PoolEvent::WorkerRestarted {
                worker,
                pid,
                generation,
            } => println!("  event: worker {worker} restarted as pid {pid} (life {generation})"),
            other => println!("  event: {other:?}"),
        })
        .build()?;
    pool.spawn(&"a".to_string())?;
    pool.spawn(&"b".to_string())?;

    println!("1. A crash fails only the task that caused it:");
    let crash = pool.submit(&Job::Crash)?;
    let squares: Vec<_> = (1..=10)
        .map(|v| pool.submit(&Job::Square(v)))
        .collect::<Result<_, _>>()?;
    println!("  crash task: {}", crash.wait().unwrap_err());
    let results: Vec<i64> = squares
        .into_iter()
        .map(|h| h.wait())
        .collect::<Result<_, _>>()?;
    println!("  the other 10 tasks: {results:?}");

    println!("2. With a retry, an idempotent task survives its worker's crash:");
    let marker = std::env::temp_dir().join(format!("crash-once-{}", std::process::id()));
    let _ = std::fs::remove_file(&marker);
    let out = pool
        .task(&Job::CrashOnce(marker.to_string_lossy().into_owned()))
        .retries(1)
        .execute()?;
    println!("  result after one retry: {out}");
    let _ = std::fs::remove_file(&marker);

    println!("3. A hung task times out, and its worker is replaced:");
    let err = pool
        .task(&Job::Hang)
        .timeout(Duration::from_millis(300))
        .execute()
        .unwrap_err();
    println!("  hung task: {err}");

    println!("4. Still serving: 7² = {}", pool.execute(&Job::Square(7))?);
    let s = pool.stats();
    println!(
        "  stats: {} deaths, {} restarts, {} tasks died, {} retried, {} timed out",
        s.worker_deaths, s.restarts, s.tasks_died, s.tasks_retried, s.tasks_timed_out
    );
    Ok(())
}
