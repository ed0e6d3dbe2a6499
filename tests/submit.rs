//! The submit API: every verb × options × payload × batch, borrowed task forms (`&str`,
//! `&[u8]`), refused submits handing the loan back, and one variant per error cause.
mod common;
use common::*;
use futures_executor::block_on;
use stateful_pool::{FnWorker, Pool, Rejected, SubmitError, TaskError, TaskOptions};
use std::time::Duration;

stateful_pool::worker_hook!();

fn pool(workers: usize, queue: usize) -> Pool<TestWorker> {
    let pool = Pool::<TestWorker>::builder()
        .queue_size(queue)
        .build()
        .expect("build pool");
    for i in 0..workers {
        pool.spawn(&Spawn::ok(&format!("w{i}"))).expect("spawn");
    }
    pool
}

/// A loan of `len` bytes, byte `i` = `i % 251`; and what `Cmd::SumPayload` answers for it.
fn filled_loan(pool: &Pool<TestWorker>, len: usize) -> (stateful_pool::Loan, u64) {
    let mut loan = pool.loan(len).unwrap();
    for (i, b) in loan.as_mut_slice().iter_mut().enumerate() {
        *b = (i % 251) as u8;
    }
    let sum = (0..len).step_by(4096).map(|i| (i % 251) as u64).sum();
    (loan, sum)
}

#[derive(Debug, Clone, Copy)]
enum Verb {
    Submit,
    TrySubmit,
    SubmitTimeout,
    SubmitAsync,
    Execute,
    ExecuteAsync,
}

const VERBS: [Verb; 6] = [
    Verb::Submit,
    Verb::TrySubmit,
    Verb::SubmitTimeout,
    Verb::SubmitAsync,
    Verb::Execute,
    Verb::ExecuteAsync,
];

/// Runs one request through `verb`, without and with a payload, and returns the outcome.
macro_rules! run_verb {
    ($req:expr, $verb:expr) => {{
        let req = $req;
        match $verb {
            Verb::Submit => req.submit().map_err(SubmitError::from).unwrap().wait(),
            Verb::TrySubmit => req.try_submit().map_err(SubmitError::from).unwrap().wait(),
            Verb::SubmitTimeout => req
                .submit_timeout(Duration::from_secs(30))
                .map_err(SubmitError::from)
                .unwrap()
                .wait(),
            Verb::SubmitAsync => block_on(async {
                req.submit_async()
                    .await
                    .map_err(SubmitError::from)
                    .unwrap()
                    .await
            }),
            Verb::Execute => req.execute(),
            Verb::ExecuteAsync => block_on(req.execute_async()),
        }
    }};
}

#[test]
fn every_verb_takes_options_payload_and_batches() {
    watchdog(240, || {
        let pool = pool(2, 16);
        let opts = TaskOptions::new()
            .timeout(Duration::from_secs(60))
            .retries(1);
        for verb in VERBS {
            // One task, plain and with options.
            let out = run_verb!(pool.task(&Cmd::Echo(3)), verb).unwrap();
            assert_eq!(out.value, 3, "{verb:?}");
            let out = run_verb!(pool.task(&Cmd::Echo(4)).options(opts), verb).unwrap();
            assert_eq!(out.value, 4, "{verb:?}");
            // One task with options and a payload (large: it lives in the arena).
            let (loan, sum) = filled_loan(&pool, 1 << 20);
            let out = run_verb!(
                pool.task(&Cmd::SumPayload)
                    .timeout(Duration::from_secs(60))
                    .retries(1)
                    .payload(loan),
                verb
            )
            .unwrap();
            assert_eq!(out.value, sum, "{verb:?}");
            assert_eq!(out.bytes, (1u64 << 20).to_le_bytes(), "{verb:?}");
            // A batch with options and a payload: every task sees the payload.
            let (loan, sum) = filled_loan(&pool, 64 << 10);
            let tasks = [Cmd::SumPayload, Cmd::Echo(9), Cmd::SumPayload];
            let req = pool.batch(&tasks).options(opts).payload(loan);
            let outs = match verb {
                Verb::Submit => req.submit().unwrap().wait(),
                Verb::TrySubmit => req.try_submit().unwrap().wait(),
                Verb::SubmitTimeout => req.submit_timeout(Duration::from_secs(30)).unwrap().wait(),
                Verb::SubmitAsync => block_on(async { req.submit_async().await.unwrap().await }),
                Verb::Execute => req.execute(),
                Verb::ExecuteAsync => block_on(req.execute_async()),
            }
            .unwrap();
            let values: Vec<u64> = outs.into_iter().map(|o| o.unwrap().value).collect();
            assert_eq!(values, [sum, 9, sum], "{verb:?}");
            // A batch without a payload.
            let outs = match verb {
                Verb::ExecuteAsync => {
                    block_on(pool.batch(&[Cmd::Echo(1), Cmd::Echo(2)]).execute_async())
                }
                _ => pool.batch(&[Cmd::Echo(1), Cmd::Echo(2)]).execute(),
            }
            .unwrap();
            assert_eq!(outs.len(), 2);
        }
        // The shortcuts on the pool are the same requests.
        assert_eq!(pool.execute(&Cmd::Echo(5)).unwrap().value, 5);
        assert_eq!(pool.submit(&Cmd::Echo(6)).unwrap().wait().unwrap().value, 6);
        assert_eq!(
            pool.try_submit(&Cmd::Echo(7))
                .unwrap()
                .wait()
                .unwrap()
                .value,
            7
        );
        let h = pool
            .submit_timeout(&Cmd::Echo(8), Duration::from_secs(30))
            .unwrap();
        assert_eq!(h.wait().unwrap().value, 8);
        assert_eq!(
            block_on(pool.execute_async(&Cmd::Echo(9))).unwrap().value,
            9
        );
        let h = block_on(pool.submit_async(&Cmd::Echo(10))).unwrap();
        assert_eq!(h.wait().unwrap().value, 10);
    });
}

#[test]
fn the_per_task_timeout_of_a_request_applies() {
    watchdog(120, || {
        let pool = pool(1, 8);
        let gate = gate_path("submit-timeout");
        let err = pool
            .task(&Cmd::Gate(gate.to_string_lossy().into()))
            .timeout(Duration::from_millis(200))
            .execute()
            .unwrap_err();
        assert!(matches!(err, TaskError::Timeout { .. }), "{err}");
        // The worker was replaced; the pool serves on.
        assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
        let _ = std::fs::remove_file(gate);
    });
}

#[test]
fn a_refused_submit_hands_the_loan_back_filled() {
    watchdog(120, || {
        // One slot: a task held at a gate fills the queue.
        let pool = pool(1, 1);
        let gate = gate_path("submit-refused");
        let held = pool
            .submit(&Cmd::Gate(gate.to_string_lossy().into()))
            .unwrap();
        let (loan, sum) = filled_loan(&pool, 256 << 10);
        let r: Rejected = pool
            .task(&Cmd::SumPayload)
            .payload(loan)
            .try_submit()
            .unwrap_err();
        assert_eq!(r, SubmitError::QueueFull);
        let r: Rejected = match pool
            .task(&Cmd::SumPayload)
            .payload(r.into_loan().expect("the loan comes back"))
            .submit_timeout(Duration::from_millis(50))
        {
            Err(r) => r,
            Ok(_) => panic!("the queue has no room"),
        };
        assert_eq!(*r.error(), SubmitError::Timeout);
        // The same for a batch.
        let (error, loan) = pool
            .batch(&[Cmd::SumPayload])
            .payload(r.into_loan().unwrap())
            .try_submit()
            .unwrap_err()
            .into_parts();
        assert_eq!(error, SubmitError::QueueFull);
        let loan = loan.unwrap();
        assert_eq!(loan.len(), 256 << 10);
        assert!(
            loan.as_slice()
                .iter()
                .enumerate()
                .all(|(i, &b)| b == (i % 251) as u8),
            "the loan's contents are untouched"
        );
        // Once there is room, the same loan goes through.
        std::fs::write(&gate, b"").unwrap();
        assert_eq!(held.wait().unwrap().value, 1);
        let out = pool.task(&Cmd::SumPayload).payload(loan).execute().unwrap();
        assert_eq!(out.value, sum);
        // A loan from another pool is refused, and handed back too.
        let other = self::pool(0, 4);
        let foreign = other.loan(16).unwrap();
        let r = pool
            .task(&Cmd::SumPayload)
            .payload(foreign)
            .submit()
            .unwrap_err();
        assert_eq!(r, SubmitError::ForeignLoan);
        assert_eq!(r.into_loan().unwrap().len(), 16);
        // `?` turns a Rejected into a SubmitError or a TaskError.
        fn through_question_mark(pool: &Pool<TestWorker>) -> Result<(), TaskError> {
            let loan = pool.loan(8)?;
            pool.task(&Cmd::SumPayload).payload(loan).submit()?.wait()?;
            Ok(())
        }
        through_question_mark(&pool).unwrap();
        let _ = std::fs::remove_file(gate);
    });
}

#[test]
fn each_error_cause_has_one_variant() {
    watchdog(60, || {
        // No worker: the submit error and the task error say the same thing, one way each.
        let pool = pool(0, 4);
        assert_eq!(
            pool.submit(&Cmd::Echo(1)).unwrap_err(),
            SubmitError::NoWorkers
        );
        assert_eq!(pool.execute(&Cmd::Echo(1)), Err(TaskError::NoWorkers));
        assert_eq!(
            pool.batch(&[Cmd::Echo(1)]).execute().unwrap_err(),
            TaskError::NoWorkers
        );
        assert_eq!(
            TaskError::from(SubmitError::Broken { reason: "x".into() }),
            TaskError::PoolBroken
        );
        assert_eq!(
            TaskError::from(SubmitError::QueueFull),
            TaskError::Submit(SubmitError::QueueFull)
        );
    });
}

stateful_pool::task_fn! {
    /// The length of a string task.
    fn Len(s: String, _ctx) -> u64 {
        Ok(s.as_str().len() as u64)
    }
}

stateful_pool::task_fn! {
    /// The sum of a byte-vector task.
    fn ByteSum(v: Vec<u8>, _ctx) -> u64 {
        Ok(v.iter().map(|&b| b as u64).sum())
    }
}

#[test]
fn borrowed_forms_stand_in_for_owned_tasks() {
    watchdog(120, || {
        let strings = Pool::<FnWorker<Len>>::builder().build().unwrap();
        strings.spawn(&()).unwrap();
        // A &str for a String task, through every kind of verb, and the owned form still works.
        assert_eq!(strings.execute("hello").unwrap(), 5);
        assert_eq!(strings.submit("four").unwrap().wait().unwrap(), 4);
        assert_eq!(strings.task("abc").retries(1).execute().unwrap(), 3);
        assert_eq!(block_on(strings.execute_async("ab")).unwrap(), 2);
        assert_eq!(strings.execute(&"owned".to_string()).unwrap(), 5);
        let long = "x".repeat(10_000);
        assert_eq!(strings.execute(long.as_str()).unwrap(), 10_000);
        let answers = strings.broadcast("each");
        assert_eq!(answers.len(), 1);
        assert_eq!(answers[0].1, Ok(4));

        let bytes = Pool::<FnWorker<ByteSum>>::builder().build().unwrap();
        bytes.spawn(&()).unwrap();
        // A &[u8] for a Vec<u8> task, small (inline) and large (arena).
        assert_eq!(bytes.execute(&[1u8, 2, 3][..]).unwrap(), 6);
        let big = vec![1u8; 3 << 20];
        assert_eq!(bytes.execute(&big[..]).unwrap(), 3 << 20);
        assert_eq!(bytes.execute(&big).unwrap(), 3 << 20);
        // A byte array, as a literal is.
        assert_eq!(bytes.execute(b"\x01\x02").unwrap(), 3);
        assert_eq!(bytes.execute(&[4u8; 4]).unwrap(), 16);

        // The same forms one level down: a batch's elements and a map's inputs.
        let sums =
            |r: Vec<Result<u64, TaskError>>| r.into_iter().map(Result::unwrap).collect::<Vec<_>>();
        assert_eq!(
            sums(
                strings
                    .batch(&["a", "bb", long.as_str()])
                    .execute()
                    .unwrap()
            ),
            [1, 2, 10_000]
        );
        let owned = ["abc".to_string(), "de".to_string()];
        assert_eq!(sums(strings.batch(&owned).execute().unwrap()), [3, 2]);
        assert_eq!(
            sums(strings.batch(&[&owned[0], &owned[1]]).execute().unwrap()),
            [3, 2]
        );
        assert_eq!(
            sums(block_on(strings.batch(&["xyz"]).execute_async()).unwrap()),
            [3]
        );
        let lens: Vec<u64> = strings
            .map(["a", "bb", "ccc"])
            .map(Result::unwrap)
            .collect();
        assert_eq!(lens, [1, 2, 3]);
        let lens: Vec<u64> = strings.map(owned.iter()).map(Result::unwrap).collect();
        assert_eq!(lens, [3, 2]);
        // Batched inputs, and a batch that its worker could not finish sent again.
        let lens: Vec<u64> = strings
            .map(vec!["a"; 50])
            .batch(8)
            .map(Result::unwrap)
            .collect();
        assert_eq!(lens, [1; 50]);
        let slices: Vec<&[u8]> = vec![&[1, 2], &[3], &big[..]];
        assert_eq!(
            sums(bytes.batch(&slices).execute().unwrap()),
            [3, 3, 3 << 20]
        );
        assert_eq!(
            sums(bytes.batch(&[[1u8, 1], [2, 2]]).execute().unwrap()),
            [2, 4]
        );
        let totals: Vec<u64> = bytes.map(slices).map(Result::unwrap).collect();
        assert_eq!(totals, [3, 3, 3 << 20]);
        // Byte-string literals (`&[u8; N]`) as elements and inputs.
        assert_eq!(
            sums(bytes.batch(&[b"\x01", b"\x02"]).execute().unwrap()),
            [1, 2]
        );
        let totals: Vec<u64> = bytes
            .map([b"\x05\x05", b"\x01\x01"])
            .map(Result::unwrap)
            .collect();
        assert_eq!(totals, [10, 2]);
    });
}

/// `max_task_bytes` holds for every task, also one small enough for its slot's inline area,
/// from every verb; the pool serves on.
#[test]
fn max_task_bytes_holds_for_tasks_that_fit_their_slot() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(4)
            .max_task_bytes(64)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("small")).unwrap();
        assert_eq!(pool.max_task_bytes(), 64);
        let task = Cmd::SumVec(vec![1; 500]); // ≈ 510 bytes: fits a 1 KiB slot
        let too_large = |r: &Result<_, SubmitError>| matches!(r, Err(SubmitError::PayloadTooLarge { len, max: 64 }) if *len > 64);
        let r = pool.submit(&task).map(drop);
        assert!(too_large(&r), "{r:?}");
        let r = pool.try_submit(&task).map(drop);
        assert!(too_large(&r), "{r:?}");
        let r = pool.submit_timeout(&task, Duration::from_secs(1)).map(drop);
        assert!(too_large(&r), "{r:?}");
        assert!(matches!(
            pool.execute(&task),
            Err(TaskError::Submit(SubmitError::PayloadTooLarge {
                max: 64,
                ..
            }))
        ));
        let r = pool.batch(&[Cmd::Echo(1), task.clone()]).submit().map(drop);
        assert!(too_large(&r), "{r:?}");
        // Small enough: accepted, and every refused one left its slot free.
        assert_eq!(pool.execute(&Cmd::SumVec(vec![1; 20])).unwrap().value, 20);
        for i in 0..8 {
            assert_eq!(pool.execute(&Cmd::Echo(i)).unwrap().value, i);
        }
    });
}

/// A pool built without an arena refuses every loan at once as too large (waiting could never
/// help), and still runs tasks that fit their slots.
#[test]
fn a_pool_without_an_arena_refuses_loans_as_too_large() {
    watchdog(60, || {
        let pool = Pool::<TestWorker>::builder()
            .queue_size(4)
            .task_arena_bytes(0)
            .build()
            .unwrap();
        pool.spawn(&Spawn::ok("noarena")).unwrap();
        for r in [pool.loan(0), pool.try_loan(0), pool.loan(100)] {
            assert!(
                matches!(r, Err(SubmitError::PayloadTooLarge { max: 0, .. })),
                "{r:?}"
            );
        }
        assert_eq!(pool.execute(&Cmd::Echo(3)).unwrap().value, 3);
        // The largest task it takes is one that fits a slot's inline area.
        let max = pool.max_task_bytes();
        assert!(max >= 64, "{max}");
        let big = pool.submit(&Cmd::SumVec(vec![1; 10_000]));
        assert!(
            matches!(big, Err(SubmitError::PayloadTooLarge { max: m, .. }) if m == max),
            "{:?}",
            big.err()
        );
    });
}

/// A field whose `Serialize` panics when it is `true` (archived as a `bool`).
#[derive(Debug)]
struct Bomb(bool);

impl rkyv::Archive for Bomb {
    type Archived = bool;
    type Resolver = ();
    fn resolve(&self, _: (), out: rkyv::Place<Self::Archived>) {
        self.0.resolve((), out)
    }
}

impl<S: rkyv::rancor::Fallible + ?Sized> rkyv::Serialize<S> for Bomb {
    fn serialize(&self, _: &mut S) -> Result<(), S::Error> {
        if self.0 {
            panic!("this task cannot be serialised");
        }
        Ok(())
    }
}

impl<D: rkyv::rancor::Fallible + ?Sized> rkyv::Deserialize<Bomb, D> for bool {
    fn deserialize(&self, _: &mut D) -> Result<Bomb, D::Error> {
        Ok(Bomb(*self))
    }
}

/// A task with a bulk part (so a large one goes to an arena block) and a `Bomb`.
#[derive(rkyv::Archive, rkyv::Serialize, rkyv::Deserialize, Debug)]
struct Fragile {
    bulk: Vec<u8>,
    bomb: Bomb,
}

stateful_pool::task_fn! {
    /// The length of a fragile task's bulk.
    fn FragileLen(t: Fragile, _ctx) -> u64 {
        Ok(t.bulk.len() as u64)
    }
}

/// A task whose `Serialize` panics: the panic reaches the submitting caller, and the slot
/// (and an arena block, for a large task) goes back: a one-slot pool serves on for many
/// laps, and shuts down (the shutdown waits for no abandoned submit).
#[test]
fn a_task_whose_serialiser_panics_gives_its_slot_back() {
    watchdog(120, || {
        let pool = Pool::<FnWorker<FragileLen>>::builder()
            .queue_size(1)
            .task_arena_bytes(1 << 20)
            .build()
            .unwrap();
        pool.spawn(&()).unwrap();
        for lap in 0..20 {
            // Small (encoded in the slot) and large (an arena block of 600 KiB of 1 MiB).
            let len = if lap % 2 == 0 { 8 } else { 600 << 10 };
            let bad = Fragile {
                bulk: vec![1; len],
                bomb: Bomb(true),
            };
            let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                let _ = pool.submit(&bad);
            }));
            assert!(caught.is_err(), "lap {lap}");
            let good = Fragile {
                bulk: vec![2; len],
                bomb: Bomb(false),
            };
            assert_eq!(pool.execute(&good).unwrap(), len as u64, "lap {lap}");
        }
        pool.shutdown();
    });
}
