//! Services: typed composition, nesting, ensembles (fail-fast cancelling, collect-all),
//! switch routing, deadlines in a middle stage, capacity and `try_call`, dropped calls
//! cancelling, a worker killed in a middle stage, thread stages, streams, stats, backtraces,
//! and shutdown under load.
mod common;
use common::{gate_path, wait_until, watchdog};
use rkyv::{Archive, Deserialize, Serialize};
use stateful_pool::service::{
    Process, Server, ServiceError, StageExt, Threads, WithPayload, ensemble, ensemble_vec, local,
    seq, switch,
};
use stateful_pool::{
    BatchPolicy, BatchTask, BoxError, ErrorPolicy, Poisoned, Pool, TaskContext, TaskError, Worker,
    WorkerContext,
};
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

stateful_pool::worker_hook!();

/// What one stage does with an item, beside appending its name to the trail.
#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
enum Cmd {
    Fail(String),
    Panic(String),
    /// SIGKILLs its own process.
    Kill,
    /// Waits until this file exists (at most 60 s).
    Gate(String),
    /// Creates this file (a sign that the stage ran the item).
    Touch(String),
    /// Declares the worker poisoned.
    Poison,
    /// Makes the output's `pad` this many bytes (byte i = i % 251), so it leaves the worker
    /// as a ring record and, between process stages, is handed over archived.
    Grow(u32),
}

#[derive(Archive, Serialize, Deserialize, Debug, Clone, PartialEq)]
struct Msg {
    v: u64,
    trail: Vec<String>,
    /// Commands for the stage of this name.
    cmds: Vec<(String, Cmd)>,
    pad: Vec<u8>,
}

fn msg(v: u64) -> Msg {
    Msg {
        v,
        trail: Vec::new(),
        cmds: Vec::new(),
        pad: Vec::new(),
    }
}

fn with(mut m: Msg, stage: &str, c: Cmd) -> Msg {
    m.cmds.push((stage.to_string(), c));
    m
}

/// Each stage adds 1 and signs the trail; spawned with its name.
struct Step {
    name: String,
    spawns: u32,
}

fn wait_file(p: &str) {
    let end = Instant::now() + Duration::from_secs(60);
    while !Path::new(p).exists() && Instant::now() < end {
        std::thread::sleep(Duration::from_millis(1));
    }
}

impl Worker for Step {
    type SpawnArgs = String;
    type SpawnOutput = u32;
    type Task = Msg;
    type Output = Msg;

    fn spawn(name: String, ctx: &WorkerContext) -> Result<(Self, u32), BoxError> {
        Ok((Step { name, spawns: 1 }, ctx.pid()))
    }

    fn execute(&mut self, m: &ArchivedMsg, ctx: &TaskContext<'_>) -> Result<Msg, BoxError> {
        let mut out: Msg = rkyv::deserialize::<Msg, rkyv::rancor::Error>(m)?;
        for (stage, c) in out.cmds.clone() {
            if stage != self.name {
                continue;
            }
            match c {
                Cmd::Fail(s) => return Err(s.into()),
                Cmd::Panic(s) => panic!("{s}"),
                Cmd::Kill => {
                    // SAFETY: signalling our own process.
                    unsafe { libc::kill(libc::getpid(), libc::SIGKILL) };
                }
                Cmd::Gate(p) => wait_file(&p),
                Cmd::Touch(p) => {
                    std::fs::write(p, b"ran")?;
                }
                Cmd::Poison => return Err(Box::new(Poisoned::new("bad state"))),
                Cmd::Grow(n) => out.pad = (0..n).map(|i| (i % 251) as u8).collect(),
            }
        }
        // A payload (a `with_payload` stage) becomes the output's pad.
        if !ctx.payload().is_empty() {
            out.pad = ctx.payload().to_vec();
        }
        out.v += 1;
        out.trail
            .push(format!("{}@{}#{}", self.name, self.spawns, out.trail.len()));
        Ok(out)
    }

    fn execute_batch(
        &mut self,
        batch: &[BatchTask<'_, Msg>],
    ) -> Result<Vec<Result<Msg, BoxError>>, BoxError> {
        let n = batch.len();
        Ok(batch
            .iter()
            .map(|t| {
                self.execute(t.task, &t.ctx).map(|mut m| {
                    m.trail.push(format!("batch{n}"));
                    m
                })
            })
            .collect())
    }
}

fn pool(name: &str, workers: usize) -> Arc<Pool<Step>> {
    let p = Pool::<Step>::builder().queue_size(64).build().unwrap();
    for r in p.spawn_n(&name.to_string(), workers) {
        r.unwrap();
    }
    Arc::new(p)
}

fn process(name: &str) -> Process<Step> {
    Process::new(name, pool(name, 1))
}

fn threads(name: &str, n: usize) -> Threads<Step> {
    let t = Threads::<Step>::new(name);
    for _ in 0..n {
        t.spawn(&name.to_string()).unwrap();
    }
    t
}

fn names(m: &Msg) -> Vec<String> {
    m.trail
        .iter()
        .map(|t| t.split('@').next().unwrap().to_string())
        .collect()
}

fn stage_err(e: ServiceError) -> stateful_pool::service::StageError {
    match e {
        ServiceError::Stage(s) => *s,
        other => panic!("expected a stage error, got {other:?}"),
    }
}

#[test]
fn a_typed_pipeline_of_thread_process_and_local_stages_runs_in_order() {
    watchdog(120, || {
        let graph = seq((
            threads("A", 1),
            process("B"),
            local("len", |m: Msg| Ok(names(&m).join(">"))),
        ));
        let server = Server::new(graph, 8);
        assert_eq!(server.call(msg(0)).unwrap(), "A>B");
        let outs: Vec<String> = (0..20).map(|i| server.call(msg(i)).unwrap()).collect();
        assert!(outs.iter().all(|o| o == "A>B"));
        let s = server.stats();
        let paths: Vec<&str> = s.stages.iter().map(|s| s.path.as_str()).collect();
        assert_eq!(paths, ["seq[0]/A", "seq[1]/B", "seq[2]/len"]);
        assert!(s.stages.iter().all(|st| st.done == 21 && st.failed == 0));
        assert_eq!(s.stages[0].kind, "thread");
        assert_eq!(s.stages[1].kind, "process");
        assert_eq!(s.stages[1].live_workers, Some(1));
        assert_eq!(s.stages[1].execute.count, 21);
        assert!(server.healthy());
    });
}

#[test]
fn three_deep_nesting_names_the_failing_stage_and_its_worker() {
    watchdog(120, || {
        let c = process("C");
        let c_pid = c.pool().worker_pids()[0].1;
        let graph = seq((
            process("A"),
            ensemble((seq((process("B"), c)), process("D"))),
            local("combine", |(x, y): (Msg, Msg)| {
                Ok((names(&x).join(">"), names(&y).join(">")))
            }),
        ));
        let server = Server::new(graph, 8);
        let (x, y) = server.call(msg(1)).unwrap();
        assert_eq!(x, "A>B>C");
        assert_eq!(y, "A>D");

        let e = stage_err(
            server
                .call(with(msg(2), "C", Cmd::Fail("bad input".into())))
                .unwrap_err(),
        );
        assert_eq!(e.path, "seq[1]/ensemble[0]/seq[1]/C");
        assert_eq!(e.worker, Some(0));
        assert_eq!(e.pid, Some(c_pid));
        assert!(matches!(&e.error, TaskError::Failed { message, .. } if message == "bad input"));
        // The worker is named once, in the stage's part: `…/C#0 (pid N): task failed: …`.
        assert_eq!(
            e.to_string(),
            format!("seq[1]/ensemble[0]/seq[1]/C#0 (pid {c_pid}): task failed: bad input")
        );
        // The graph serves on.
        assert_eq!(server.call(msg(3)).unwrap().0, "A>B>C");
    });
}

#[test]
fn fail_fast_cancels_members_that_have_not_started_and_collect_all_keeps_every_outcome() {
    watchdog(120, || {
        let gate = gate_path("ff-gate");
        let mark = gate_path("ff-mark");
        let slow = process("S");
        // Hold S's only worker, so the ensemble's item waits in S's queue.
        let holder = slow
            .pool()
            .submit(&with(msg(0), "S", Cmd::Gate(gate.display().to_string())))
            .unwrap();
        let server = Server::new(ensemble((process("F"), slow)), 8);
        let item = with(
            with(msg(1), "F", Cmd::Fail("no".into())),
            "S",
            Cmd::Touch(mark.display().to_string()),
        );
        let e = stage_err(server.call(item).unwrap_err());
        assert_eq!(e.path, "ensemble[0]/F");
        assert_eq!(server.in_flight(), 0);
        std::fs::write(&gate, b"").unwrap();
        holder.wait().unwrap();
        // S's worker is free again: a task queued after the cancelled one runs, so the
        // cancelled one was passed over, never run.
        let s_pool = server.graph().members().1.pool().clone();
        s_pool.execute(&msg(9)).unwrap();
        assert!(!mark.exists(), "the cancelled member ran the item");
        let _ = std::fs::remove_file(&gate);

        // Collect-all: every member's outcome, in member order.
        let server = Server::new(ensemble((process("F"), process("G"))).collect_all(), 8);
        let (f, g) = server
            .call(with(msg(1), "F", Cmd::Fail("no".into())))
            .unwrap();
        assert_eq!(stage_err(f.unwrap_err()).path, "ensemble[0]/F");
        assert_eq!(names(&g.unwrap()), ["G"]);

        // A vector ensemble: outputs in member order.
        let members = vec![
            threads("X", 1).boxed(),
            process("Y").boxed(),
            threads("Z", 1).boxed(),
        ];
        let server = Server::new(ensemble_vec(members), 8);
        let outs = server.call(msg(5)).unwrap();
        let firsts: Vec<String> = outs.iter().map(|m| names(m)[0].clone()).collect();
        assert_eq!(firsts, ["X", "Y", "Z"]);
    });
}

#[test]
fn switch_routes_each_item_by_its_input() {
    watchdog(120, || {
        let graph = switch(
            |m: &Msg| m.v as usize,
            vec![process("Even").boxed(), threads("Odd", 1).boxed()],
        );
        let server = Server::new(
            seq((local("parity", |m: Msg| Ok(Msg { v: m.v % 2, ..m })), graph)),
            8,
        );
        for v in 0..10u64 {
            let out = server.call(msg(v)).unwrap();
            assert_eq!(names(&out), [if v % 2 == 0 { "Even" } else { "Odd" }]);
        }
        let stats = server.stats();
        assert_eq!(stats.stages[1].path, "seq[1]/switch[0]/Even");
        assert_eq!(stats.stages[1].done, 5);
        assert_eq!(stats.stages[2].done, 5);

        let bad = Server::new(
            switch(|m: &Msg| m.v as usize, vec![process("Only").boxed()]),
            4,
        );
        match bad.call(msg(3)).unwrap_err() {
            ServiceError::Route {
                stage,
                index,
                members,
            } => {
                assert_eq!((stage.as_str(), index, members), ("switch", 3, 1));
            }
            e => panic!("{e:?}"),
        }
        // A route that panics fails that item, named by the switch; the server serves on.
        let panicky = Server::new(
            switch(
                |m: &Msg| {
                    assert!(m.v != 7, "no route for 7");
                    0
                },
                vec![threads("P", 1).boxed()],
            ),
            2,
        );
        let e = stage_err(panicky.call(msg(7)).unwrap_err());
        assert_eq!(e.path, "switch");
        // No worker ran it: none is named (the route ran in this process).
        let want = format!(
            "switch (pid {}): task panicked: no route for 7",
            std::process::id()
        );
        assert!(e.to_string().starts_with(&want), "{e}");
        assert!(
            matches!(&e.error, TaskError::Panicked { message, .. } if message.contains("no route for 7")),
            "{:?}",
            e.error
        );
        assert_eq!(panicky.stats().in_flight, 0);
        assert_eq!(names(&panicky.call(msg(1)).unwrap()), ["P"]);
    });
}

#[test]
fn a_deadline_expiring_in_a_middle_stage_frees_capacity_at_once_and_the_stage_skips_the_item() {
    watchdog(120, || {
        let gate = gate_path("dl-gate");
        let mark_b = gate_path("dl-mark-b");
        let mark_c = gate_path("dl-mark-c");
        let b = process("B");
        let holder = b
            .pool()
            .submit(&with(msg(0), "B", Cmd::Gate(gate.display().to_string())))
            .unwrap();
        let server = Server::new(seq((process("A"), b, process("C"))), 4);
        let item = with(
            with(msg(1), "B", Cmd::Touch(mark_b.display().to_string())),
            "C",
            Cmd::Touch(mark_c.display().to_string()),
        );
        match server
            .call_timeout(item, Duration::from_secs(2))
            .unwrap_err()
        {
            // (2 s: stage A must have handed the item over by then, even on a loaded machine.)
            ServiceError::Timeout { stage, after } => {
                assert_eq!(stage.as_deref(), Some("seq[1]/B"));
                assert_eq!(after, Duration::from_secs(2));
            }
            e => panic!("{e:?}"),
        }
        assert_eq!(
            server.in_flight(),
            0,
            "capacity is freed when the deadline passes"
        );
        std::fs::write(&gate, b"").unwrap();
        holder.wait().unwrap();
        let b_pool = server.graph().members().1.pool().clone();
        b_pool.execute(&msg(9)).unwrap();
        assert!(!mark_b.exists(), "B ran an expired item");
        assert!(!mark_c.exists(), "C ran an expired item");
        assert_eq!(server.stats().stages[1].expired, 1);
        // Within the deadline, the same graph answers.
        assert_eq!(
            names(
                &server
                    .call_timeout(msg(2), Duration::from_secs(60))
                    .unwrap()
            ),
            ["A", "B", "C"]
        );
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn capacity_counts_items_anywhere_and_try_call_refuses_when_full() {
    watchdog(120, || {
        let gate = gate_path("cap-gate");
        let server = Arc::new(Server::new(seq((process("A"), threads("B", 2))), 2));
        let g = gate.display().to_string();
        let callers: Vec<_> = (0..2)
            .map(|i| {
                let server = server.clone();
                let g = g.clone();
                std::thread::spawn(move || server.call(with(msg(i), "B", Cmd::Gate(g))))
            })
            .collect();
        assert!(wait_until(60, || server.in_flight() == 2));
        assert_eq!(
            server.try_call(msg(5)).unwrap_err(),
            ServiceError::Full { capacity: 2 }
        );
        match server
            .call_timeout(msg(5), Duration::from_millis(50))
            .unwrap_err()
        {
            ServiceError::Timeout { stage: None, .. } => {}
            e => panic!("{e:?}"),
        }
        let refused = futures_executor::block_on(server.try_call_async(msg(5))).unwrap_err();
        assert_eq!(refused, ServiceError::Full { capacity: 2 });
        std::fs::write(&gate, b"").unwrap();
        for c in callers {
            assert_eq!(names(&c.join().unwrap().unwrap()), ["A", "B"]);
        }
        assert_eq!(server.in_flight(), 0);
        assert!(server.try_call(msg(6)).is_ok());
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn dropping_a_call_cancels_its_item_in_every_stage_that_has_not_started_it() {
    watchdog(120, || {
        let gate = gate_path("drop-gate");
        let mark = gate_path("drop-mark");
        let b = process("B");
        let holder = b
            .pool()
            .submit(&with(msg(0), "B", Cmd::Gate(gate.display().to_string())))
            .unwrap();
        let server = Server::new(seq((threads("A", 1), b)), 4);
        let item = with(msg(1), "B", Cmd::Touch(mark.display().to_string()));
        {
            let mut call = std::pin::pin!(server.call_async(item));
            // Drive it until it waits in B's queue (A is done, B's worker is held).
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            assert!(wait_until(60, || {
                assert!(call.as_mut().poll(&mut cx).is_pending());
                server.stats().stages[1].in_flight == 1 && server.stats().stages[0].done == 1
            }));
        } // dropped here
        assert_eq!(server.in_flight(), 0);
        // Counted where it was dropped, and only there: every item that left B has an outcome.
        let stats = server.stats();
        let (a, b) = (&stats.stages[0], &stats.stages[1]);
        assert_eq!((a.done, a.cancelled), (1, 0));
        assert_eq!((b.done, b.failed, b.expired, b.cancelled), (0, 0, 0, 1));
        std::fs::write(&gate, b"").unwrap();
        holder.wait().unwrap();
        let b_pool = server.graph().members().1.pool().clone();
        b_pool.execute(&msg(9)).unwrap();
        assert!(!mark.exists(), "a dropped call's item ran");
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn a_worker_killed_in_a_middle_stage_fails_only_its_item_naming_the_stage() {
    watchdog(180, || {
        let b = Process::new("B", pool("B", 2));
        let server = Arc::new(Server::new(seq((process("A"), b, threads("C", 2))), 32));
        let handles: Vec<_> = (0..24u64)
            .map(|i| {
                let server = server.clone();
                std::thread::spawn(move || {
                    let m = if i == 7 {
                        with(msg(i), "B", Cmd::Kill)
                    } else {
                        msg(i)
                    };
                    (i, server.call(m))
                })
            })
            .collect();
        for h in handles {
            let (i, r) = h.join().unwrap();
            if i == 7 {
                let e = stage_err(r.unwrap_err());
                assert_eq!(e.path, "seq[1]/B");
                assert!(matches!(e.error, TaskError::WorkerDied { .. }), "{e:?}");
                assert!(e.pid.is_some());
            } else {
                assert_eq!(names(&r.unwrap()), ["A", "B", "C"], "item {i}");
            }
        }
        let st = server.stats();
        assert_eq!(st.stages[1].failed, 1);
        assert_eq!(st.stages[1].done, 23);
        // The stage serves many more items afterwards (its worker restarted).
        for i in 0..50 {
            server.call(msg(i)).unwrap();
        }
        assert!(wait_until(60, || server.healthy()));
    });
}

#[test]
fn a_call_deadline_shorter_than_the_batch_delay_still_runs_the_call() {
    watchdog(120, || {
        // One idle worker waiting up to a minute for company: a lone call with a 4 s deadline
        // is held at most halfway to it, then runs, and answers well inside its deadline.
        let pool = Pool::<Step>::builder()
            .queue_size(64)
            .batch_policy(BatchPolicy::new(8).max_delay(Duration::from_secs(60)))
            .build()
            .unwrap();
        pool.spawn(&"M".to_string()).unwrap();
        let server = Server::new(Process::new("M", Arc::new(pool)), 8);
        for i in 0..2 {
            let m = server
                .call_timeout(msg(i), Duration::from_secs(4))
                .expect("the call ran before its deadline");
            assert_eq!(names(&m), ["M", "batch1"]);
        }
    });
}

#[test]
fn thread_stages_give_the_same_outcomes_batch_and_rebuild_a_poisoned_state() {
    watchdog(120, || {
        let t = threads("T", 1).max_batch(8);
        // While the stage batches, a lone task is a batch of one, as in a process pool.
        assert_eq!(names(&t.execute(&msg(1)).unwrap()), ["T", "batch1"]);
        match t.execute(&with(msg(1), "T", Cmd::Fail("nope".into()))) {
            Err(TaskError::Failed { worker: 0, message }) => assert_eq!(message, "nope"),
            r => panic!("{r:?}"),
        }
        match t.execute(&with(msg(1), "T", Cmd::Panic("boom".into()))) {
            Err(TaskError::Panicked { message, .. }) => assert_eq!(message, "boom"),
            r => panic!("{r:?}"),
        }
        // Poisoned: the state is rebuilt from the spawn arguments (spawns counts lives).
        assert!(matches!(
            t.execute(&with(msg(1), "T", Cmd::Poison)),
            Err(TaskError::Poisoned { .. })
        ));
        let after = t.execute(&msg(2)).unwrap();
        assert_eq!(names(&after), ["T", "batch1"]);
        // Without batching, `execute` itself.
        assert_eq!(names(&threads("U", 1).execute(&msg(3)).unwrap()), ["U"]);

        // Batching: tasks queued while the thread is busy run as one step.
        let gate = gate_path("tb-gate");
        let started = gate_path("tb-started");
        let server = Server::new(t, 64);
        std::thread::scope(|s| {
            let g = gate.display().to_string();
            // The first task marks that the thread runs it, then waits at the gate. (Waiting
            // for "nothing queued, one in flight" instead raced: that holds before the task
            // reaches the thread's queue, and on a loaded machine the thread could then take
            // it together with four of the next five, leaving the fifth to run alone.)
            let first = with(
                with(msg(0), "T", Cmd::Touch(started.display().to_string())),
                "T",
                Cmd::Gate(g),
            );
            let first = s.spawn(|| server.call(first));
            assert!(wait_until(60, || started.exists()));
            let rest: Vec<_> = (1..6)
                .map(|i| {
                    let server = &server;
                    s.spawn(move || server.call(msg(i)))
                })
                .collect();
            assert!(wait_until(60, || server.stats().stages[0].queued == 5));
            std::fs::write(&gate, b"").unwrap();
            first.join().unwrap().unwrap();
            for r in rest {
                let m = r.join().unwrap().unwrap();
                assert_eq!(m.trail.last().unwrap(), "batch5");
            }
        });
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&started);

        // No threads: a clear error, not a hang.
        let none = Threads::<Step>::new("none");
        assert_eq!(none.execute(&msg(1)).unwrap_err(), TaskError::NoWorkers);
    });
}

#[test]
fn streams_keep_order_or_not_carry_inputs_and_follow_the_error_policy() {
    watchdog(120, || {
        let server = Server::new(seq((process("A"), threads("B", 2))), 8);
        let outs: Vec<u64> = server
            .stream_iter((0..100).map(msg))
            .map(|r| r.unwrap().v)
            .collect();
        assert_eq!(outs, (2..102).collect::<Vec<_>>());

        let mut un: Vec<u64> = futures_executor::block_on_stream(
            server
                .stream(futures_util::stream::iter((0..50).map(msg)))
                .unordered()
                .window(4),
        )
        .map(|r| r.unwrap().v)
        .collect();
        un.sort();
        assert_eq!(un, (2..52).collect::<Vec<_>>());

        let inputs = (0..10).map(|i| {
            if i == 3 {
                with(msg(i), "B", Cmd::Fail("x".into()))
            } else {
                msg(i)
            }
        });
        let pairs: Vec<_> = futures_executor::block_on_stream(
            server
                .stream(futures_util::stream::iter(inputs))
                .with_inputs(),
        )
        .collect();
        assert_eq!(pairs.len(), 10);
        for (input, r) in &pairs {
            assert_eq!(r.is_err(), input.v == 3);
        }

        // Immediate: the error ends the stream.
        let inputs = (0..1000).map(|i| {
            if i == 3 {
                with(msg(i), "A", Cmd::Fail("x".into()))
            } else {
                msg(i)
            }
        });
        let got: Vec<_> = futures_executor::block_on_stream(
            server
                .stream(futures_util::stream::iter(inputs))
                .window(4)
                .on_error(ErrorPolicy::Immediate),
        )
        .collect();
        assert!(got.last().unwrap().is_err());
        assert!(got.len() <= 4, "{}", got.len());

        // An endless input with a bounded window, consumed in part.
        let endless = futures_util::stream::iter((0u64..).map(msg));
        let first: Vec<_> = futures_executor::block_on_stream(server.stream(endless).window(3))
            .take(10)
            .map(|r| r.unwrap().v)
            .collect();
        assert_eq!(first, (2..12).collect::<Vec<_>>());
        assert!(wait_until(60, || server.in_flight() == 0));
    });
}

#[test]
fn a_panicking_worker_reports_its_backtrace() {
    watchdog(120, || {
        let p = Pool::<Step>::builder()
            .worker_env("RUST_BACKTRACE", "1")
            .build()
            .unwrap();
        p.spawn(&"P".to_string()).unwrap();
        let server = Server::new(Process::new("P", p), 4);
        let e = stage_err(
            server
                .call(with(msg(1), "P", Cmd::Panic("kaboom".into())))
                .unwrap_err(),
        );
        assert!(matches!(&e.error, TaskError::Panicked { message, .. } if message == "kaboom"));
        let pid = e.pid.expect("a process stage names its worker's pid");
        assert_eq!(
            e.to_string(),
            format!("P#0 (pid {pid}): task panicked: kaboom")
        );
        let bt = e.backtrace().expect("a backtrace");
        assert!(bt.contains("execute"), "{bt}");
    });
}

#[test]
fn shutdown_under_load_drains_and_then_refuses() {
    watchdog(180, || {
        let server = Arc::new(Server::new(seq((threads("A", 2), process("B"))), 8));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let callers: Vec<_> = (0..4)
            .map(|_| {
                let server = server.clone();
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let (mut ok, mut refused) = (0u32, 0u32);
                    for i in 0..2000u64 {
                        match server.call(msg(i)) {
                            Ok(m) => {
                                assert_eq!(names(&m), ["A", "B"]);
                                ok += 1;
                            }
                            Err(ServiceError::Shutdown) => refused += 1,
                            Err(e) => panic!("{e:?}"),
                        }
                        if stop.load(std::sync::atomic::Ordering::Relaxed) && refused > 0 {
                            break;
                        }
                    }
                    (ok, refused)
                })
            })
            .collect();
        assert!(wait_until(60, || server.stats().stages[1].done >= 50));
        let report = server.shutdown(Duration::from_secs(60));
        stop.store(true, std::sync::atomic::Ordering::Relaxed);
        assert!(report.drained, "{report:?}");
        let mut total = 0;
        for c in callers {
            let (ok, _) = c.join().unwrap();
            total += ok;
        }
        assert_eq!(server.stats().stages[1].done, total as u64);
        assert_eq!(server.call(msg(1)).unwrap_err(), ServiceError::Shutdown);
        assert!(!server.healthy());
    });
}

#[test]
fn two_stages_on_one_small_pool_do_not_deadlock_on_the_hand_off() {
    watchdog(180, || {
        let p = Arc::new(Pool::<Step>::builder().queue_size(4).build().unwrap());
        for r in p.spawn_n(&"P".to_string(), 2) {
            r.unwrap();
        }
        let server = Arc::new(Server::new(
            seq((Process::new("A", p.clone()), Process::new("B", p.clone()))),
            64,
        ));
        let callers: Vec<_> = (0..16u64)
            .map(|c| {
                let server = server.clone();
                std::thread::spawn(move || {
                    for i in 0..50 {
                        let out = server.call(msg(c * 1000 + i)).unwrap();
                        assert_eq!(out.v, c * 1000 + i + 2);
                    }
                })
            })
            .collect();
        for c in callers {
            c.join().unwrap();
        }
    });
}

/// Large items between process stages take the hand-off (ring record → the next pool's
/// arena): a worker killed in the second stage fails only its item, and the same seats then
/// serve many more large items, so no arena block or ring record is lost.
#[test]
fn a_large_handed_off_item_survives_a_death_in_the_next_stage_for_many_laps() {
    watchdog(180, || {
        const BIG: u32 = 1 << 20;
        let big_pool = |name: &str| {
            let p = Pool::<Step>::builder()
                .queue_size(8)
                .result_ring_bytes(8 << 20)
                .task_arena_bytes(16 << 20)
                .max_task_bytes(4 << 20)
                .build()
                .unwrap();
            p.spawn(&name.to_string()).unwrap();
            Arc::new(p)
        };
        let (a, b) = (big_pool("A"), big_pool("B"));
        let server = Server::new(seq((Process::new("A", a), Process::new("B", b.clone()))), 8);
        let expect_pad: Vec<u8> = (0..BIG).map(|i| (i % 251) as u8).collect();
        for lap in 0..40u64 {
            let mut m = with(msg(lap), "A", Cmd::Grow(BIG));
            if lap == 5 || lap == 17 {
                m = with(m, "B", Cmd::Kill);
            }
            match server.call(m) {
                Ok(out) => {
                    assert!(lap != 5 && lap != 17);
                    assert_eq!(names(&out), ["A", "B"], "lap {lap}");
                    assert!(
                        out.pad == expect_pad,
                        "lap {lap}: the item changed on its way"
                    );
                }
                Err(e) => {
                    assert!(lap == 5 || lap == 17, "lap {lap}: {e}");
                    let e = stage_err(e);
                    assert_eq!(e.path, "seq[1]/B");
                    assert!(matches!(e.error, TaskError::WorkerDied { .. }), "{e:?}");
                }
            }
        }
        assert_eq!(b.stats().worker_deaths, 2);
        let st = server.stats();
        assert_eq!((st.stages[1].done, st.stages[1].failed), (38, 2));
    });
}

#[test]
fn a_payload_stage_reads_the_callers_loan_in_place_and_hands_its_output_on() {
    watchdog(120, || {
        // An arena of four 1 MiB payloads: a payload not given back (after a death, say)
        // would make a later `try_loan` fail within a few laps.
        let a = Pool::<Step>::builder()
            .queue_size(8)
            .task_arena_bytes(4 << 20)
            .build()
            .unwrap();
        a.spawn(&"A".to_string()).unwrap();
        let a = Arc::new(a);
        let server = Server::new(
            seq((Process::new("A", a.clone()).with_payload(), process("B"))),
            8,
        );
        for lap in 0..24u64 {
            // 1 MiB: the payload is loaned, the output leaves A as a ring record and reaches B
            // archived.
            let len = 1 << 20;
            let mut loan = a
                .try_loan(len)
                .expect("the arena has room: no payload leaked");
            for (i, b) in loan.as_mut_slice().iter_mut().enumerate() {
                *b = (i as u64 * 31 + lap) as u8;
            }
            let mut m = msg(lap);
            if lap % 6 == 5 {
                // The worker dies holding the payload: only this item fails, naming the
                // stage, and the payload's space comes back.
                m = with(m, "A", Cmd::Kill);
                let e = stage_err(server.call(WithPayload::new(m, loan)).unwrap_err());
                assert_eq!(e.path, "seq[0]/A");
                assert!(matches!(e.error, TaskError::WorkerDied { .. }), "{e}");
                continue;
            }
            let out = server.call(WithPayload::new(m, loan)).unwrap();
            assert_eq!(out.v, lap + 2);
            assert_eq!(names(&out), ["A", "B"]);
            assert_eq!(out.pad.len(), len);
            assert!(
                out.pad
                    .iter()
                    .enumerate()
                    .all(|(i, &b)| b == (i as u64 * 31 + lap) as u8)
            );
        }
        // A loan from another pool is refused, naming the stage; the stage serves on.
        let other = pool("other", 1);
        let e = stage_err(
            server
                .call(WithPayload::new(msg(0), other.loan(64).unwrap()))
                .unwrap_err(),
        );
        assert_eq!(e.path, "seq[0]/A");
        assert!(
            e.to_string().contains("another pool")
                || e.to_string().to_lowercase().contains("foreign"),
            "{e}"
        );
        let small = a.try_loan(3).unwrap();
        assert_eq!(
            server
                .call(WithPayload::new(msg(7), small))
                .unwrap()
                .pad
                .len(),
            3
        );
    });
}

/// `Duration::MAX` is the natural way to say "no limit": it means no deadline everywhere a
/// timeout is taken, never an `Instant` overflow panic.
#[test]
fn a_timeout_of_duration_max_means_no_deadline() {
    watchdog(120, || {
        let server = Server::new(seq((threads("A", 1), process("B"))), 8).timeout(Duration::MAX);
        assert_eq!(names(&server.call(msg(1)).unwrap()), ["A", "B"]);
        assert_eq!(
            names(&server.call_timeout(msg(2), Duration::MAX).unwrap()),
            ["A", "B"]
        );
        let outs: Vec<Msg> = futures_executor::block_on_stream(
            server
                .stream(futures_util::stream::iter((0..3).map(msg)))
                .timeout(Duration::MAX),
        )
        .map(Result::unwrap)
        .collect();
        assert_eq!(outs.len(), 3);
        let p = pool("P", 1);
        let h = p.task(&msg(3)).submit_timeout(Duration::MAX).unwrap();
        assert_eq!(names(&h.wait_timeout(Duration::MAX).unwrap()), ["P"]);
        server.shutdown(Duration::MAX);
    });
}

/// A stage error names the process that ran the item, even when that worker is replaced right
/// after (poisoned): never its successor, never `None`.
#[test]
fn a_poisoned_worker_is_named_by_its_own_pid_not_its_successors() {
    watchdog(120, || {
        let pool = pool("P", 1);
        let server = Server::new(Process::new("P", pool.clone()), 4);
        let mut last = 0;
        for round in 0..4 {
            // The poisoned worker is listed until the supervisor has seen it go: wait for its
            // successor.
            assert!(wait_until(60, || {
                let pids = pool.worker_pids();
                pids.len() == 1 && pids[0].1 != last
            }));
            let ran = pool.worker_pids()[0].1;
            last = ran;
            let e = stage_err(server.call(with(msg(round), "P", Cmd::Poison)).unwrap_err());
            assert!(
                matches!(e.error, TaskError::Poisoned { .. }),
                "{:?}",
                e.error
            );
            assert_eq!(e.pid, Some(ran), "round {round}");
        }
        assert!(wait_until(60, || pool.worker_pids().len() == 1));
        assert_eq!(names(&server.call(msg(9)).unwrap()), ["P"]);
    });
}

/// `unordered()` on a stream already under way keeps every item in flight: the outcomes held
/// back for order come out, and the item that held them back comes last.
#[test]
fn switching_a_running_stream_to_unordered_loses_nothing() {
    use futures_util::StreamExt;
    watchdog(120, || {
        let server = Server::new(threads("B", 4), 8);
        let gate = gate_path("unordered-midway");
        let g = gate.display().to_string();
        let inputs = (0..10).map(move |i| {
            if i == 1 {
                with(msg(i), "B", Cmd::Gate(g.clone()))
            } else {
                msg(i)
            }
        });
        let mut s = server.stream(futures_util::stream::iter(inputs)).window(4);
        let first = futures_executor::block_on(s.next()).unwrap().unwrap();
        assert_eq!(first.v, 1, "input 0 (each stage adds 1)");
        let mut s = s.unordered();
        let mut got = Vec::new();
        while got.len() < 8 {
            got.push(futures_executor::block_on(s.next()).unwrap().unwrap().v);
        }
        std::fs::write(&gate, b"").unwrap();
        got.push(futures_executor::block_on(s.next()).unwrap().unwrap().v);
        assert!(futures_executor::block_on(s.next()).is_none());
        assert_eq!(got.last(), Some(&2), "the gated input 1 comes last");
        got.sort();
        assert_eq!(got, (2..11).collect::<Vec<_>>());
        let _ = std::fs::remove_file(&gate);
    });
}

/// `with_inputs()` once a stream has taken input is refused with a clear panic (those inputs
/// were not kept), never a wrong item.
#[test]
fn with_inputs_after_a_stream_took_input_is_refused() {
    use futures_util::StreamExt;
    watchdog(60, || {
        let server = Server::new(threads("B", 2), 8);
        let mut s = server.stream(futures_util::stream::iter((0..4).map(msg)));
        assert_eq!(futures_executor::block_on(s.next()).unwrap().unwrap().v, 1);
        let refused = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            let _ = s.with_inputs();
        }));
        let message = refused.unwrap_err();
        let message = message
            .downcast_ref::<&str>()
            .map(|s| s.to_string())
            .or_else(|| message.downcast_ref::<String>().cloned())
            .unwrap();
        assert!(
            message.contains("before the stream is first polled"),
            "{message}"
        );
    });
}

/// Past its timeout, a shutdown stops every stage at once: process workers running an
/// abandoned item are killed without waiting for their pools' shutdown timeouts (30 s each
/// here), and the item fails instead of finishing later.
#[test]
fn a_shutdown_past_its_timeout_kills_running_items_at_once() {
    watchdog(120, || {
        let server = Arc::new(Server::new(ensemble((process("A"), process("B"))), 4));
        let gate = gate_path("never-opens-shutdown");
        let g = gate.display().to_string();
        let (ran_a, ran_b) = (gate_path("ran-a"), gate_path("ran-b"));
        let held = {
            let server = server.clone();
            let mut input = with(msg(0), "A", Cmd::Touch(ran_a.display().to_string()));
            input = with(input, "A", Cmd::Gate(g.clone()));
            input = with(input, "B", Cmd::Touch(ran_b.display().to_string()));
            input = with(input, "B", Cmd::Gate(g));
            std::thread::spawn(move || server.call(input))
        };
        // Both workers are running the item (not merely holding it queued).
        assert!(wait_until(60, || ran_a.exists() && ran_b.exists()));
        let started = Instant::now();
        let report = server.shutdown(Duration::from_millis(200));
        let took = started.elapsed();
        assert!(!report.drained);
        assert_eq!(report.abandoned, 1);
        // Generous: the old sequence waited 30 s per stage.
        assert!(took < Duration::from_secs(20), "shutdown took {took:?}");
        assert!(held.join().unwrap().is_err(), "an abandoned item fails");
        assert!(!gate.exists());
        let _ = std::fs::remove_file(ran_a);
        let _ = std::fs::remove_file(ran_b);
    });
}

/// A thread stage that was closed refuses to start more threads.
#[test]
fn a_closed_thread_stage_refuses_to_spawn() {
    watchdog(60, || {
        let t = threads("T", 1);
        t.close();
        assert!(matches!(
            t.spawn(&"T".to_string()),
            Err(stateful_pool::SpawnError::Shutdown)
        ));
    });
}

/// A thread stage on its own has the pool's task API: handles (blocking, bounded, at once,
/// awaited, cancelled), deadlines, and an ordered lazy map.
#[test]
fn a_thread_stage_has_handles_deadlines_cancels_and_a_map() {
    use stateful_pool::{MapError, SubmitError, WaitTimeoutError};
    watchdog(120, || {
        let t = threads("T", 1);
        assert_eq!(t.submit(&msg(1)).unwrap().wait().unwrap().v, 2);
        assert_eq!(
            futures_executor::block_on(t.submit(&msg(5)).unwrap())
                .unwrap()
                .v,
            6
        );

        // The only thread held at a gate, so what follows stays queued.
        let gate = gate_path("tt-gate");
        let started = gate_path("tt-started");
        let never_ran = gate_path("tt-never");
        let held = t
            .submit(&with(
                with(msg(0), "T", Cmd::Touch(started.display().to_string())),
                "T",
                Cmd::Gate(gate.display().to_string()),
            ))
            .unwrap();
        assert!(wait_until(30, || started.exists()));
        let queued = t.submit(&msg(10)).unwrap();
        let id = queued.task_id();
        let queued = match queued.try_wait() {
            Err(WaitTimeoutError::Timeout(h)) => h,
            r => panic!("{:?}", r.map(|m| m.v)),
        };
        let queued = match queued.wait_timeout(Duration::from_millis(20)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            r => panic!("{:?}", r.map(|m| m.v)),
        };
        assert_eq!(queued.task_id(), id);
        // Cancelled before a thread took it: answered at once, and never run.
        let cancelled = t
            .submit(&with(
                msg(0),
                "T",
                Cmd::Touch(never_ran.display().to_string()),
            ))
            .unwrap();
        cancelled.cancel();
        assert!(matches!(cancelled.wait(), Err(TaskError::Cancelled)));
        // Past its deadline when the thread reaches it: `Timeout`, not run.
        let late = t
            .submit_before(
                &with(msg(0), "T", Cmd::Touch(never_ran.display().to_string())),
                Some(Instant::now()),
            )
            .unwrap();
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(held.wait().unwrap().v, 1);
        assert_eq!(queued.wait().unwrap().v, 11);
        assert!(matches!(late.wait(), Err(TaskError::Timeout { .. })));
        assert!(!never_ran.exists());

        // An ordered map: every input its result, an error by its position.
        let inputs: Vec<Msg> = (0..20)
            .map(|i| match i {
                7 => with(msg(i), "T", Cmd::Fail("seven".into())),
                _ => msg(i),
            })
            .collect();
        let map = t.map(&inputs).window(4);
        assert_eq!(map.len(), 20);
        for (i, r) in map.enumerate() {
            match r {
                Err(MapError {
                    index: 7,
                    error: TaskError::Failed { message, .. },
                }) if i == 7 => assert_eq!(message, "seven"),
                Ok(m) if i != 7 => assert_eq!(m.v, i as u64 + 1),
                r => panic!("input {i}: {r:?}"),
            }
        }
        // No thread serving: refused at once.
        let empty = Threads::<Step>::new("E");
        assert!(matches!(empty.submit(&msg(1)), Err(SubmitError::NoWorkers)));
        let all: Vec<_> = empty.map([msg(1), msg(2)]).collect();
        assert!(
            all.iter().all(|r| matches!(
                r,
                Err(MapError {
                    error: TaskError::NoWorkers,
                    ..
                })
            )),
            "{all:?}"
        );
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&started);
    });
}

/// Task ids a `Mark` thread ran (thread stages run in this process).
static RAN: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

fn ran(id: u64) -> bool {
    RAN.lock().unwrap().contains(&id)
}

/// Records each task's id as it runs, after waiting for the task's gate file (if any).
struct Mark;

impl Worker for Mark {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = (u64, String);
    type Output = u64;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Mark, ()))
    }

    fn execute(
        &mut self,
        t: &rkyv::Archived<(u64, String)>,
        _: &TaskContext<'_>,
    ) -> Result<u64, BoxError> {
        if !t.1.is_empty() {
            wait_file(t.1.as_str());
        }
        let id = t.0.to_native();
        RAN.lock().unwrap().push(id);
        Ok(id)
    }
}

fn marks(n: usize, max_batch: usize) -> Threads<Mark> {
    let t = Threads::<Mark>::new("M").max_batch(max_batch);
    for _ in 0..n {
        t.spawn(&()).unwrap();
    }
    t
}

/// A thread-stage handle's deadline answers a waiting caller at the deadline while every
/// thread is busy, blocking or awaited; the task then never runs.
#[test]
fn a_thread_task_past_its_deadline_is_answered_then_and_never_runs() {
    use stateful_pool::WaitTimeoutError;
    watchdog(120, || {
        let t = marks(1, 1);
        let gate = gate_path("td-gate");
        let g = gate.display().to_string();
        let held = t.submit(&(100, g)).unwrap();
        let soon = || Some(Instant::now() + Duration::from_millis(50));
        let late = t.submit_before(&(101, String::new()), soon()).unwrap();
        match late.wait() {
            Err(TaskError::Timeout { after, .. }) => assert!(after <= Duration::from_millis(50)),
            r => panic!("{r:?}"),
        }
        let late = t.submit_before(&(102, String::new()), soon()).unwrap();
        assert!(matches!(
            futures_executor::block_on(late),
            Err(TaskError::Timeout { .. })
        ));
        // A bounded wait shorter than the deadline times out first and gives the handle back.
        let later = t
            .submit_before(
                &(103, String::new()),
                Some(Instant::now() + Duration::from_secs(60)),
            )
            .unwrap();
        let later = match later.wait_timeout(Duration::from_millis(20)) {
            Err(WaitTimeoutError::Timeout(h)) => h,
            r => panic!("{r:?}"),
        };
        // A deadline far enough out: the task is claimed in time and runs.
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(held.wait().unwrap(), 100);
        assert_eq!(later.wait().unwrap(), 103);
        assert!(!ran(101) && !ran(102));
        // A closed stage refuses, whether its threads have left yet or not.
        t.close();
        assert!(matches!(
            t.submit(&(106, String::new())),
            Err(stateful_pool::SubmitError::Shutdown)
        ));
        let _ = std::fs::remove_file(&gate);
    });
}

/// Cancels racing the threads' claims: each handle gets exactly one answer, its result or
/// `Cancelled` (never `NoWorkers`), and a task answered `Cancelled` never ran; with and
/// without batching.
#[test]
fn thread_task_cancels_racing_claims_answer_once() {
    watchdog(120, || {
        for (base, max_batch) in [(10_000u64, 1), (20_000, 4)] {
            let t = marks(2, max_batch);
            let hs: Vec<_> = (0..400u64)
                .map(|i| {
                    let h = t.submit(&(base + i, String::new())).unwrap();
                    if i % 2 == 0 {
                        h.cancel();
                    }
                    (base + i, h)
                })
                .collect();
            let mut cancelled = 0;
            for (id, h) in hs {
                match h.wait() {
                    Ok(v) => assert_eq!(v, id),
                    Err(TaskError::Cancelled) => {
                        assert_eq!((id - base) % 2, 0, "{id} was not cancelled");
                        cancelled += 1;
                    }
                    Err(e) => panic!("{id}: {e}"),
                }
            }
            // What the threads still have queued is skipped; a last task on each thread
            // after it, then the check.
            for i in 0..2 {
                t.execute(&(base + 1000 + i, String::new())).unwrap();
            }
            t.shutdown();
            let ran_cancelled = (0..400u64)
                .filter(|i| i % 2 == 0)
                .filter(|i| ran(base + i))
                .count();
            // Each cancelled task either ran (its cancel came late) or was answered
            // `Cancelled`, never both.
            assert_eq!(
                ran_cancelled + cancelled,
                200,
                "{ran_cancelled} + {cancelled}"
            );
        }
    });
}

/// Dropping a thread map part way cancels the inputs no thread has taken.
#[test]
fn dropping_a_thread_map_cancels_its_queued_inputs() {
    watchdog(120, || {
        let t = marks(1, 1);
        let gate = gate_path("tm-gate");
        let inputs: Vec<(u64, String)> = (0..50u64)
            .map(|i| {
                (
                    30_000 + i,
                    if i == 1 {
                        gate.display().to_string()
                    } else {
                        String::new()
                    },
                )
            })
            .collect();
        let mut map = t.map(&inputs).window(8);
        assert_eq!(map.next().unwrap().unwrap(), 30_000);
        drop(map);
        std::fs::write(&gate, b"").unwrap();
        // FIFO on one thread: once this ran, every input before it was run or skipped.
        t.execute(&(30_999, String::new())).unwrap();
        // (Input 1 may have been taken before the drop, and then runs: it holds the only
        // thread at its gate until after the drop, so nothing after it can have been.)
        assert!(
            (2..50).all(|i| !ran(30_000 + i)),
            "{:?}",
            RAN.lock().unwrap()
        );
        let _ = std::fs::remove_file(&gate);
    });
}

#[test]
fn a_thread_stage_refuses_a_batch_size_out_of_range_at_spawn() {
    watchdog(60, || {
        for n in [0, 65, usize::MAX] {
            let t = Threads::<Step>::new("B").max_batch(n);
            match t.spawn(&"B".to_string()) {
                Err(stateful_pool::SpawnError::Launch { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
                    assert!(source.to_string().contains("max_batch"), "{source}");
                }
                r => panic!("max_batch({n}): {:?}", r.map(|_| ())),
            }
            assert_eq!(t.num_workers(), 0);
        }
        let t = Threads::<Step>::new("B").max_batch(64);
        t.spawn(&"B".to_string()).unwrap();
        assert_eq!(names(&t.execute(&msg(1)).unwrap()), ["B", "batch1"]);
    });
}

/// Where a thread runs: its CPU affinity and the GPU ids its context was given.
struct Placed {
    gpus: Vec<u32>,
}

impl Worker for Placed {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u8;
    type Output = (Vec<u64>, Vec<u32>);

    fn spawn(_: (), ctx: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((
            Placed {
                gpus: ctx.gpu_ids().to_vec(),
            },
            (),
        ))
    }

    fn execute(&mut self, _: &u8, _: &TaskContext<'_>) -> Result<(Vec<u64>, Vec<u32>), BoxError> {
        let cpus = common::allowed_cpus()
            .into_iter()
            .map(|c| c as u64)
            .collect();
        Ok((cpus, self.gpus.clone()))
    }
}

/// A thread stage pins each thread to its CPU set and hands it its GPU ids; a CPU this
/// process may not use, and the options that belong to a process, are refused.
#[test]
fn thread_stage_workers_run_on_their_cpus_with_their_gpu_ids() {
    use stateful_pool::{SpawnError, SpawnOptions};
    watchdog(60, || {
        let allowed = common::allowed_cpus();
        let first = allowed[0];
        let t = Threads::<Placed>::new("placed");
        t.spawn_with(&(), &SpawnOptions::new().cpus([first]).gpus([3, 1]))
            .unwrap();
        for _ in 0..4 {
            let (cpus, gpus) = t.execute(&0).unwrap();
            assert_eq!(
                cpus,
                [first as u64],
                "the worker thread runs on its CPU only"
            );
            assert_eq!(gpus, [3, 1]);
        }
        // The calling thread is not pinned by it.
        assert_eq!(common::allowed_cpus(), allowed);
        match t.spawn_with(&(), &SpawnOptions::new().cpus([100_000])) {
            Err(SpawnError::CpuNotAllowed { cpu: 100_000, .. }) => {}
            other => panic!("expected CpuNotAllowed, got {other:?}"),
        }
        for opts in [
            SpawnOptions::new().env("A", "1"),
            SpawnOptions::new().gpus([0]).visible_devices_only(true),
            SpawnOptions::new().cpus([first]).thread_env_from_cpus(true),
        ] {
            match t.spawn_with(&(), &opts) {
                Err(SpawnError::Launch { source, .. }) => {
                    assert_eq!(source.kind(), std::io::ErrorKind::InvalidInput);
                    assert!(source.to_string().contains("process"), "{source}");
                }
                other => panic!("expected a refusal, got {other:?}"),
            }
        }
        assert_eq!(t.num_workers(), 1);
        // An unpinned thread beside it sees the whole set.
        let free = Threads::<Placed>::new("free");
        free.spawn(&()).unwrap();
        assert_eq!(
            free.execute(&0).unwrap().0,
            allowed.iter().map(|&c| c as u64).collect::<Vec<_>>()
        );
    });
}

/// A stage's `in_flight` counts the items waiting for its bound too, and its queue delay
/// includes that wait (a thread stage's as well as a process stage's).
#[test]
fn a_stage_counts_and_times_the_items_waiting_at_its_bound() {
    watchdog(120, || {
        let gate = gate_path("bound-gate");
        let g = gate.display().to_string();
        let ran = gate_path("bound-ran");
        let server = Arc::new(Server::new(threads("T", 2).max_in_flight(1), 8));
        let call = |input: Msg| {
            let server = server.clone();
            std::thread::spawn(move || server.call(input))
        };
        // Input 0 takes the bound first and holds it (running, behind the gate).
        let mut first = with(msg(0), "T", Cmd::Touch(ran.display().to_string()));
        first = with(first, "T", Cmd::Gate(g));
        let mut callers = vec![call(first)];
        assert!(wait_until(60, || ran.exists()));
        callers.extend((1..3).map(|i| call(msg(i))));
        assert!(wait_until(60, || server.in_flight() == 3));
        assert!(wait_until(60, || server.stats().stages[0].in_flight == 3));
        let waited = Instant::now();
        // Both others wait at the bound while input 0 holds it; release it once time passed.
        while waited.elapsed() < Duration::from_millis(50) {
            std::thread::yield_now();
        }
        std::fs::write(&gate, b"").unwrap();
        for c in callers {
            assert_eq!(names(&c.join().unwrap().unwrap()), ["T"]);
        }
        let stats = server.stats();
        assert_eq!(stats.stages[0].in_flight, 0);
        assert!(
            stats.stages[0].queue_delay.max >= Duration::from_millis(40),
            "{:?}",
            stats.stages[0].queue_delay
        );
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&ran);
    });
}

/// A call dropped while its task runs leaves that task running in its worker (an orphan). A
/// shutdown that then finds nothing in flight ("drained") still returns by its timeout: the
/// orphan's worker is killed then, not after the pool's (here 120 s) shutdown timeout.
#[test]
fn a_drained_shutdown_returns_by_its_timeout_while_a_worker_runs_an_abandoned_task() {
    watchdog(120, || {
        let p = Pool::<Step>::builder()
            .queue_size(8)
            .shutdown_timeout(Duration::from_secs(120))
            .build()
            .unwrap();
        p.spawn(&"A".to_string()).unwrap();
        let server = Server::new(seq((process("B0"), Process::new("A", Arc::new(p)))), 4);
        let gate = gate_path("orphan-never-opens");
        let ran = gate_path("orphan-ran");
        let mut item = with(msg(0), "A", Cmd::Touch(ran.display().to_string()));
        item = with(item, "A", Cmd::Gate(gate.display().to_string()));
        {
            let mut call = std::pin::pin!(server.call_async(item));
            let waker = futures_util::task::noop_waker();
            let mut cx = std::task::Context::from_waker(&waker);
            // Driven until A's worker runs the task, then dropped: the task goes on.
            assert!(wait_until(60, || {
                assert!(call.as_mut().poll(&mut cx).is_pending());
                ran.exists()
            }));
        }
        assert_eq!(server.in_flight(), 0);
        let started = Instant::now();
        let report = server.shutdown(Duration::from_millis(300));
        let took = started.elapsed();
        assert!(report.drained);
        assert_eq!(report.abandoned, 0);
        assert!(took < Duration::from_secs(30), "shutdown took {took:?}");
        assert!(!gate.exists());
        let _ = std::fs::remove_file(ran);
    });
}

/// Callers waiting for a place in a full server are answered `Shutdown` when it shuts down,
/// even if the item holding the place never finishes (a thread stage's task cannot be
/// stopped).
#[test]
fn callers_waiting_for_a_place_are_answered_when_the_server_shuts_down() {
    watchdog(120, || {
        let gate = gate_path("place-holder-gate");
        let g = gate.display().to_string();
        let server = Arc::new(Server::new(threads("T", 1), 1));
        let holder = {
            let server = server.clone();
            let item = with(msg(0), "T", Cmd::Gate(g));
            std::thread::spawn(move || server.call(item))
        };
        assert!(wait_until(60, || server.in_flight() == 1));
        let (tx, rx) = std::sync::mpsc::channel();
        let waiters: Vec<_> = (0..3)
            .map(|i| {
                let (server, tx) = (server.clone(), tx.clone());
                std::thread::spawn(move || tx.send(server.call(msg(i))).unwrap())
            })
            .collect();
        let report = server.shutdown(Duration::from_millis(100));
        assert!(!report.drained);
        for _ in 0..3 {
            let r = rx
                .recv_timeout(Duration::from_secs(60))
                .expect("a caller waiting for a place was never answered");
            assert!(matches!(r, Err(ServiceError::Shutdown)), "{r:?}");
        }
        for w in waiters {
            w.join().unwrap();
        }
        // The holder's thread finishes once its gate opens.
        std::fs::write(&gate, b"").unwrap();
        let _ = holder.join().unwrap();
        let _ = std::fs::remove_file(&gate);
    });
}

/// A thread stage whose only thread is held: calls that give up (deadline) free their places
/// at once, their jobs are dropped from the queue rather than piling up, and none of them
/// runs once the thread is free again.
#[test]
fn a_held_thread_stage_drops_the_jobs_of_callers_that_gave_up() {
    watchdog(180, || {
        let gate = gate_path("held-thread-gate");
        let started = gate_path("held-thread-started");
        let mark = gate_path("gave-up-mark");
        let server = Arc::new(Server::new(threads("T", 1).max_in_flight(4), 8));
        let holder = {
            let server = server.clone();
            let item = with(
                with(msg(0), "T", Cmd::Touch(started.display().to_string())),
                "T",
                Cmd::Gate(gate.display().to_string()),
            );
            std::thread::spawn(move || server.call(item))
        };
        // The thread runs the holder's item (not merely: the item is in the server, which
        // holds before its job is queued, so a later item could overtake it).
        assert!(wait_until(60, || started.exists()));
        assert!(wait_until(60, || server.stats().stages[0].queued == 0
            && server.in_flight() == 1));
        for i in 0..300 {
            let item = with(msg(i), "T", Cmd::Touch(mark.display().to_string()));
            let r = server.call_timeout(item, Duration::from_millis(1));
            assert!(matches!(r, Err(ServiceError::Timeout { .. })), "{r:?}");
        }
        let s = &server.stats().stages[0];
        assert_eq!(s.queued, 0, "jobs of callers that gave up count as queued");
        assert_eq!(server.in_flight(), 1);
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(holder.join().unwrap().unwrap().v, 1);
        // The thread serves on; none of the abandoned items ran.
        assert_eq!(server.call(msg(7)).unwrap().v, 8);
        assert!(!mark.exists(), "an item whose caller gave up ran");
        let _ = std::fs::remove_file(&gate);
        let _ = std::fs::remove_file(&started);
    });
}

/// An error whose `Display` panics: the item fails naming that panic; the stage serves on.
#[derive(Debug)]
struct Unprintable;

impl std::fmt::Display for Unprintable {
    fn fmt(&self, _: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        panic!("this error cannot be printed")
    }
}

impl std::error::Error for Unprintable {}

struct Grumpy;

impl Worker for Grumpy {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = u64;
    type Output = u64;

    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Grumpy, ()))
    }

    fn execute(&mut self, t: &rkyv::Archived<u64>, _: &TaskContext<'_>) -> Result<u64, BoxError> {
        match t.to_native() {
            0 => Err(Box::new(Unprintable)),
            v => Ok(v),
        }
    }
}

#[test]
fn an_error_whose_display_panics_fails_its_item_and_the_stage_serves_on() {
    watchdog(120, || {
        let t = Threads::<Grumpy>::new("G");
        t.spawn(&()).unwrap();
        let server = Server::new(
            seq((
                t,
                local("L", |v: u64| match v {
                    1 => Err(Box::new(Unprintable) as BoxError),
                    v => Ok(v),
                }),
            )),
            4,
        );
        for lap in 0..3 {
            for (input, stage) in [(0, "seq[0]/G"), (1, "seq[1]/L")] {
                let e = stage_err(server.call(input).unwrap_err());
                assert_eq!(e.path, stage, "lap {lap}");
                let message = match &e.error {
                    TaskError::Failed { message, .. } => message.clone(),
                    other => panic!("expected Failed, got {other:?}"),
                };
                assert!(
                    message.contains("this error cannot be printed"),
                    "{message}"
                );
            }
            assert_eq!(server.call(5).unwrap(), 5);
        }
        assert_eq!(server.graph().members().0.num_workers(), 1);
    });
}

/// `queued` counts the items still waiting for a worker: after three queued calls are
/// dropped, a stage whose one worker is held reports none queued (their tasks hold a slot
/// or a queue place until the worker skips them, but nobody waits for them), for thread and
/// process stages alike, and never more than its items in flight.
#[test]
fn queued_counts_only_items_still_waiting_for_a_worker() {
    watchdog(120, || {
        for kind in ["thread", "process"] {
            let stage = match kind {
                "thread" => threads("Q", 1).boxed(),
                _ => process("Q").boxed(),
            };
            let server = Server::new(stage, 8);
            let gate = gate_path(&format!("queued-gate-{kind}"));
            let started = gate_path(&format!("queued-started-{kind}"));
            std::thread::scope(|sc| {
                let held = with(msg(0), "Q", Cmd::Touch(started.display().to_string()));
                let held = with(held, "Q", Cmd::Gate(gate.display().to_string()));
                let holder = sc.spawn(|| server.call(held));
                assert!(wait_until(60, || started.exists()));
                {
                    let mut calls: Vec<_> = (1..4)
                        .map(|i| Box::pin(server.call_async(msg(i))))
                        .collect();
                    let waker = futures_util::task::noop_waker();
                    let mut cx = std::task::Context::from_waker(&waker);
                    assert!(wait_until(60, || {
                        for c in calls.iter_mut() {
                            assert!(c.as_mut().poll(&mut cx).is_pending());
                        }
                        server.stats().stages[0].queued == 3
                    }));
                } // the three queued calls are dropped
                let st = &server.stats().stages[0];
                assert_eq!((st.queued, st.in_flight, st.cancelled), (0, 1, 3), "{kind}");
                std::fs::write(&gate, b"").unwrap();
                assert_eq!(holder.join().unwrap().unwrap().v, 1);
            });
            assert_eq!(server.call(msg(9)).unwrap().v, 10, "{kind}");
            let _ = std::fs::remove_file(&gate);
            let _ = std::fs::remove_file(&started);
        }
    });
}

/// A collect-all ensemble keeps each member's outcome, but the deadline is the whole item's:
/// once it passes in a member, the call fails with `Timeout` naming that member's stage.
#[test]
fn a_collect_all_ensemble_fails_the_call_at_its_deadline() {
    watchdog(120, || {
        let gate = gate_path("collect-all-deadline");
        let server = Server::new(
            ensemble((threads("A", 1), threads("B", 1))).collect_all(),
            4,
        );
        let item = with(msg(0), "B", Cmd::Gate(gate.display().to_string()));
        // 2 s: member A (no gate) has answered by then, even on a loaded machine.
        let r = server.call_timeout(item, Duration::from_secs(2));
        std::fs::write(&gate, b"").unwrap();
        match r {
            Err(ServiceError::Timeout { stage, .. }) => {
                assert_eq!(stage.as_deref(), Some("ensemble[1]/B"))
            }
            other => panic!("expected a Timeout, got {other:?}"),
        }
        // A member's own failure is still kept as that member's outcome.
        let item = with(msg(0), "A", Cmd::Fail("no".into()));
        let (a, b) = server.call(item).unwrap();
        assert!(a.is_err());
        assert_eq!(b.unwrap().v, 1);
        let _ = std::fs::remove_file(&gate);
    });
}

/// A drained shutdown with no time left kills only workers still running a task: an idle
/// worker leaves as in any graceful stop, and its state's destructor runs.
#[test]
fn a_drained_shutdown_lets_idle_workers_run_their_destructors() {
    watchdog(120, || {
        let gate = gate_path("idle-drop-gate");
        let g = gate.display().to_string();
        let pool = Pool::<common::TestWorker>::builder()
            .worker_env(common::DROP_GATE_ENV, g.as_str())
            .build()
            .unwrap();
        pool.spawn(&common::Spawn::ok("idle")).unwrap();
        let server = Arc::new(Server::new(Process::new("P", Arc::new(pool)), 4));
        assert_eq!(server.call(common::Cmd::Echo(5)).unwrap().value, 5);
        let closing = {
            let server = server.clone();
            std::thread::spawn(move || server.shutdown(Duration::ZERO))
        };
        // The worker's destructor started (it waits for the release file): not killed.
        assert!(wait_until(60, || Path::new(&format!("{g}.dropping-0")).exists()));
        std::fs::write(format!("{g}.release"), b"").unwrap();
        let report = closing.join().unwrap();
        assert!(report.drained);
        let _ = std::fs::remove_file(format!("{g}.dropping-0"));
        let _ = std::fs::remove_file(format!("{g}.release"));
    });
}
