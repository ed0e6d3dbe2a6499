//! W1's round trip for an instruction counter: one worker (W1's `Echo`) returns a `u64`,
//! `N` times in a row (env `N`, default 20,000), through `Pool::execute`.
//!
//! Timings on a shared 2-vCPU VM move by 2–3× with the machine's mode; instruction counts do
//! not. `benches/count_instructions.sh` runs this program under callgrind, once with the
//! caller counted (its worker running natively) and once with the worker counted (through a
//! `WORKER_PROGRAM` wrapper that starts the worker under callgrind), each at two values of
//! `N`; the difference divided by the difference in `N` is the instructions one round trip
//! costs each side, start-up and shutdown cancelling out.
//!
//! Run alone (`cargo bench --bench instructions`) it prints the mean round trip: a quick A/B
//! of two builds run alternately, but `benches/workloads.rs` is where W1 is timed beside its
//! floors.

#[path = "support/mod.rs"]
mod support;

use stateful_pool::{Pool, WaitStrategy};
use std::path::PathBuf;
use std::time::{Duration, Instant};
use support::Echo;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    // Launched as the worker program (below): serve, then exit.
    stateful_pool::serve::<Echo>();
    let n: u64 = match std::env::var("N") {
        Ok(s) => s.parse()?,
        Err(_) => 20_000,
    };
    // The worker program: this executable by its real path (a process under valgrind cannot
    // start `/proc/self/exe`, which is valgrind), or the wrapper the script passes.
    let program = match std::env::var_os("WORKER_PROGRAM") {
        Some(p) => PathBuf::from(p),
        None => std::env::current_exe()?,
    };
    // The worker spins between tasks, as it does in W1 back to back: a caller slowed down by
    // callgrind would otherwise find it parked each time and count a futex wake-up per task
    // (the default spin, 20 µs, is shorter than the counted caller's round trip).
    let pool = Pool::<Echo>::builder()
        .program(program)
        .worker_wait(WaitStrategy::SpinThenPark {
            spin: Duration::from_millis(50),
        })
        .build()?;
    pool.spawn(&())?;
    let start = Instant::now();
    let mut sum = 0u64;
    for i in 0..n {
        let out = pool.execute(&i)?;
        assert_eq!(out, i, "the worker echoes its task");
        sum = sum.wrapping_add(out);
    }
    let elapsed = start.elapsed();
    pool.shutdown();
    println!(
        "{n} round trips, {:.0} ns each on average (checksum {sum})",
        elapsed.as_nanos() as f64 / n.max(1) as f64
    );
    Ok(())
}
