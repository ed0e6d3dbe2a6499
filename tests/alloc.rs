//! No heap allocation per task on the hot path submit → execute → result, in the parent and in
//! the worker. Counted, not timed: after warm-up the counts must not grow at all.

mod common;
use common::*;
use stateful_pool::{Pool, WaitStrategy};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;
use std::sync::atomic::Ordering;

stateful_pool::worker_hook!();

struct Counting;

thread_local! {
    static THREAD_ALLOCS: Cell<u64> = const { Cell::new(0) };
    static THREAD_BYTES: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + l.size() as u64));
        // SAFETY: same contract as ours.
        unsafe { System.alloc(l) }
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        // SAFETY: same contract as ours.
        unsafe { System.dealloc(p, l) }
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, n: usize) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
        let _ = THREAD_BYTES.try_with(|c| c.set(c.get() + n as u64));
        // SAFETY: same contract as ours.
        unsafe { System.realloc(p, l, n) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn thread_allocs() -> u64 {
    THREAD_ALLOCS.with(|c| c.get())
}

#[test]
fn the_task_hot_path_allocates_nothing_per_task() {
    watchdog(120, || {
        for wait in [WaitStrategy::default(), WaitStrategy::Park] {
            let pool = Pool::<TestWorker>::builder()
                .wait_strategy(wait)
                .build()
                .unwrap();
            pool.spawn(&Spawn::ok("alloc")).unwrap();
            // Warm up: thread-local arenas, lazily initialised statics.
            for i in 0..1000 {
                pool.execute(&Cmd::Echo(i)).unwrap();
                pool.submit(&Cmd::Echo(i)).unwrap().wait().unwrap();
            }
            let worker_before = pool.execute(&Cmd::Allocs).unwrap().value;
            let parent_before = thread_allocs();
            const N: u64 = 5000;
            for i in 0..N {
                let out = pool.execute(&Cmd::Echo(i)).unwrap();
                assert_eq!(out.value, i);
                let h = pool.submit(&Cmd::Echo(i)).unwrap();
                assert_eq!(h.wait().unwrap().value, i);
            }
            let parent_allocs = thread_allocs() - parent_before;
            let worker_after = pool.execute(&Cmd::Allocs).unwrap().value;
            // The `Allocs` probe itself is one task; Echo's `Out` has an empty Vec (no alloc).
            let worker_allocs = worker_after - worker_before;
            println!(
                "{wait:?}: {parent_allocs} parent allocations, {worker_allocs} worker allocations over {} tasks",
                2 * N
            );
            assert_eq!(parent_allocs, 0, "parent allocated on the hot path");
            assert_eq!(worker_allocs, 0, "worker allocated on the hot path");
        }
    });
}

/// Makes a vector of `n` bytes (byte i = i % 251).
struct Make;

impl stateful_pool::Worker for Make {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u32;
    type Output = Vec<u8>;

    fn spawn(
        _: (),
        _: &stateful_pool::WorkerContext,
    ) -> Result<(Self, ()), stateful_pool::BoxError> {
        Ok((Make, ()))
    }

    fn execute(
        &mut self,
        n: &rkyv::Archived<u32>,
        _: &stateful_pool::TaskContext<'_>,
    ) -> Result<Vec<u8>, stateful_pool::BoxError> {
        Ok((0..n.to_native()).map(|i| (i % 251) as u8).collect())
    }
}

/// Sums the bytes, reading them in place.
struct Sum;

impl stateful_pool::Worker for Sum {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Vec<u8>;
    type Output = u64;

    fn spawn(
        _: (),
        _: &stateful_pool::WorkerContext,
    ) -> Result<(Self, ()), stateful_pool::BoxError> {
        Ok((Sum, ()))
    }

    fn execute(
        &mut self,
        v: &rkyv::Archived<Vec<u8>>,
        _: &stateful_pool::TaskContext<'_>,
    ) -> Result<u64, stateful_pool::BoxError> {
        Ok(v.iter().map(|&b| b as u64).sum())
    }
}

#[test]
fn a_large_item_passes_between_process_stages_without_touching_the_parents_heap() {
    use stateful_pool::service::{Process, Server, local, seq};
    watchdog(120, || {
        const N: u32 = 8 << 20;
        let expected: u64 = (0..N).map(|i| (i % 251) as u64).sum();
        let pools = || {
            let make = Pool::<Make>::builder()
                .result_ring_bytes(64 << 20)
                .build()
                .unwrap();
            make.spawn(&()).unwrap();
            let sum = Pool::<Sum>::builder()
                .task_arena_bytes(64 << 20)
                .max_task_bytes(32 << 20)
                .build()
                .unwrap();
            sum.spawn(&()).unwrap();
            (Process::new("Make", make), Process::new("Sum", sum))
        };
        // Process to process: the archive goes from Make's ring into Sum's arena.
        let (make, sum) = pools();
        let direct = Server::new(seq((make, sum)), 4);
        assert_eq!(direct.call(N).unwrap(), expected); // warm-up
        let before = THREAD_BYTES.with(|c| c.get());
        for _ in 0..3 {
            assert_eq!(direct.call(N).unwrap(), expected);
        }
        let direct_bytes = THREAD_BYTES.with(|c| c.get()) - before;
        // Through a stage in the parent: decoded there, then encoded again.
        let (make, sum) = pools();
        let through = Server::new(seq((make, local("pass", |v: Vec<u8>| Ok(v)), sum)), 4);
        assert_eq!(through.call(N).unwrap(), expected);
        let before = THREAD_BYTES.with(|c| c.get());
        for _ in 0..3 {
            assert_eq!(through.call(N).unwrap(), expected);
        }
        let through_bytes = THREAD_BYTES.with(|c| c.get()) - before;
        assert!(
            through_bytes >= 3 * N as u64,
            "the comparison path should decode each item ({through_bytes} bytes)"
        );
        assert!(
            direct_bytes < 1 << 20,
            "3 items of {N} bytes cost the parent's heap {direct_bytes} bytes"
        );
    });
}
