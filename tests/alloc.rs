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
}

// SAFETY: forwards to the system allocator; only counts.
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        ALLOCS.fetch_add(1, Ordering::Relaxed);
        let _ = THREAD_ALLOCS.try_with(|c| c.set(c.get() + 1));
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
