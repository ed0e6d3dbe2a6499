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

/// What the subscriber saw: each event's target, message and parent span (its name), and
/// each span's name, `worker` field, and whether it closed.
#[derive(Debug, Default)]
struct Seen {
    events: Vec<(String, String, Option<String>)>,
    /// By id - 1.
    spans: Vec<SpanSeen>,
}

#[derive(Debug)]
struct SpanSeen {
    name: &'static str,
    worker: Option<u64>,
    /// When it was closed, as a count of spans created by then.
    closed: Option<usize>,
}

/// A subscriber that keeps what it sees in a `Seen`.
struct Capture(Arc<Mutex<Seen>>);

struct Fields {
    message: String,
    worker: Option<u64>,
}

impl Visit for Fields {
    fn record_u64(&mut self, field: &Field, value: u64) {
        if field.name() == "worker" {
            self.worker = Some(value);
        }
    }
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            self.message = format!("{value:?}");
        }
    }
}

impl Subscriber for Capture {
    fn enabled(&self, _: &Metadata<'_>) -> bool {
        true
    }
    fn new_span(&self, a: &Attributes<'_>) -> Id {
        let mut f = Fields {
            message: String::new(),
            worker: None,
        };
        a.record(&mut f);
        let mut seen = self.0.lock().unwrap();
        seen.spans.push(SpanSeen {
            name: a.metadata().name(),
            worker: f.worker,
            closed: None,
        });
        Id::from_u64(seen.spans.len() as u64)
    }
    fn record(&self, _: &Id, _: &Record<'_>) {}
    fn record_follows_from(&self, _: &Id, _: &Id) {}
    fn event(&self, e: &Event<'_>) {
        let mut f = Fields {
            message: String::new(),
            worker: None,
        };
        e.record(&mut f);
        let target = e.metadata().target().to_string();
        let mut seen = self.0.lock().unwrap();
        let parent = e
            .parent()
            .map(|id| seen.spans[id.into_u64() as usize - 1].name.to_string());
        seen.events.push((target, f.message, parent));
    }
    fn enter(&self, _: &Id) {}
    fn exit(&self, _: &Id) {}
    fn try_close(&self, id: Id) -> bool {
        let mut seen = self.0.lock().unwrap();
        let created = seen.spans.len();
        seen.spans[id.into_u64() as usize - 1].closed = Some(created);
        true
    }
}

#[test]
fn the_pool_reports_worker_lives_and_task_timings() {
    let seen = Arc::new(Mutex::new(Seen::default()));
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
        let event = |m: &str| {
            seen.events
                .iter()
                .find(|(t, msg, _)| t == "stateful_pool" && msg.contains(m))
        };
        // Each worker's events are told in its spans: `spawn` (launch to ready) inside
        // `worker` (its process's life).
        for (m, span) in [
            ("worker process launched", Some("spawn")),
            ("worker ready", Some("spawn")),
            ("task done", None),
            ("worker died", Some("worker")),
            ("worker restarted", Some("worker")),
            ("worker retired", Some("worker")),
        ] {
            let Some((_, _, parent)) = event(m) else {
                panic!("no {m:?} event in {seen:?}")
            };
            if span.is_some() {
                assert_eq!(parent.as_deref(), span, "{m:?}");
            }
        }
        // Three worker processes (two spawned, one restarted), each with its spawn span, all
        // closed once the pool is gone.
        let named = |n: &str| {
            seen.spans
                .iter()
                .filter(|s| s.name == n)
                .collect::<Vec<_>>()
        };
        let (workers, spawns) = (named("worker"), named("spawn"));
        assert_eq!(workers.len(), 3, "{seen:?}");
        assert_eq!(spawns.len(), 3, "{seen:?}");
        for s in workers.iter().chain(&spawns) {
            assert!(s.closed.is_some() && s.worker.is_some(), "{s:?}");
        }
        // The killed worker's spans closed when it died, before its restart's opened.
        let restart = seen
            .spans
            .iter()
            .rposition(|s| s.name == "worker" && s.worker == Some(0))
            .unwrap();
        let first = seen
            .spans
            .iter()
            .position(|s| s.name == "worker" && s.worker == Some(0))
            .unwrap();
        assert!(first < restart);
        assert!(seen.spans[first].closed.unwrap() <= restart, "{seen:?}");
        let mut seats: Vec<u64> = workers.iter().filter_map(|s| s.worker).collect();
        seats.sort();
        assert_eq!(seats, [0, 0, 1], "the restart is seat 0's");
    });
}
