//! With the `tracing` feature the pool reports its workers' lives and each task's timing to
//! the service's subscriber (run: `cargo test --features tracing --test tracing`).

stateful_pool::worker_hook!();

mod common;

use common::*;
use stateful_pool::Pool;
use std::sync::{Arc, Mutex};
use tracing::field::{Field, Visit};
use tracing::span::{Attributes, Id, Record};
use tracing::{Event, Metadata, Subscriber};

/// A subscriber that keeps every event's target and message.
struct Capture(Arc<Mutex<Vec<(String, String)>>>);

struct Message(String);

impl Visit for Message {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.0 = format!("{value:?}");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, _: &Attributes<'_>) -> Id {
        Id::from_u64(1)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut m = Message(String::new());
        e.record(&mut m);
        let target = e.metadata().target().to_string();
        self.0.lock().unwrap().push((target, m.0));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
}

#[test]
fn the_pool_reports_worker_lives_and_task_timings() {
    let seen = Arc::new(Mutex::new(Vec::new()));
    // Global: the pool's own threads (the supervisor) report too.
    tracing::subscriber::set_global_default(Capture(seen.clone())).unwrap();
    watchdog(120, move || {
        let pool = Pool::<TestWorker>::builder().build().unwrap();
        for r in pool.spawn_n(&Spawn::ok("t"), 2) {
            r.unwrap();
        }
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
        let pid = pool.workers()[0].pid;
        // SAFETY: a plain kill(2) of our own worker process.
        unsafe { libc::kill(pid as i32, libc::SIGKILL) };
        assert!(wait_until(30, || pool.stats().restarts == 1));
        pool.retire_worker(1).unwrap();
        drop(pool);
        let seen = seen.lock().unwrap();
        let has = |m: &str| {
            seen.iter()
                .any(|(t, msg)| t == "stateful_pool" && msg.contains(m))
        };
        for m in [
            "worker process launched",
            "worker ready",
            "task done",
            "worker died",
            "worker restarted",
            "worker retired",
        ] {
            assert!(has(m), "no {m:?} event in {seen:?}");
        }
    });
}
