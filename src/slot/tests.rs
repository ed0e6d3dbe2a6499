//! Tests of the slot protocol. The loom models (`--cfg stateful_pool_loom`, see
//! ARCHITECTURE.md, *Testing the concurrent code*) run the very transitions the pool runs, over
//! heap memory: detach vs reactor vs DONE, cancel vs claim, a deadline's expiry vs claim, a
//! worker dying at each step while its slot is retired and reused, the parent draining the
//! queue while the supervisor repairs a dead worker's pop, and a submit racing a shutdown.

#[cfg(not(stateful_pool_loom))]
mod plain {
    use super::super::*;

    #[test]
    fn a_dead_workers_held_task_is_found_only_while_it_is_unanswered() {
        let slot = |st: u32, task: u64| move |_| Some((st, task));
        // Died right after the pop (task id not yet recorded): held unless answered.
        assert_eq!(
            held_by_dead_worker(3, 0, 8, slot(bits::CLAIMED, 5)),
            Some(3)
        );
        assert_eq!(held_by_dead_worker(3, 0, 8, slot(bits::DONE, 5)), None);
        // Recorded: held iff the slot still carries that task and is not done.
        assert_eq!(
            held_by_dead_worker(3, 5, 8, slot(bits::CLAIMED, 5)),
            Some(3)
        );
        assert_eq!(held_by_dead_worker(3, 5, 8, slot(bits::CLAIMED, 6)), None);
        assert_eq!(
            held_by_dead_worker(3, 5, 8, slot(bits::DONE | bits::CLAIMED, 5)),
            None
        );
        // Nothing held, or a slot index out of range (a worker wrote garbage).
        assert_eq!(held_by_dead_worker(u32::MAX, 5, 8, slot(0, 5)), None);
        assert_eq!(held_by_dead_worker(8, 5, 8, slot(0, 5)), None);
    }

    #[test]
    fn publish_reports_whom_to_wake() {
        let sh = SlotHeader::new();
        sh.prepare(1, (0, 0), (0, 0), 0);
        assert_eq!(sh.announce_sleeper(), Some(bits::WAIT_THREAD));
        let a = Arbiter::default();
        assert!(!a.watch(&sh, 1));
        let w = sh.publish(RawOutcome::new(outcome::KIND_OK, 0, 0, 0));
        assert!(w.thread && w.reactor);
        assert_eq!(sh.announce_sleeper(), None);
        assert_eq!(
            a.reactor_take(&sh),
            Some(ReactorTake {
                task_id: 1,
                retire: false
            })
        );
        assert_eq!(a.reactor_take(&sh), None);
    }
}

#[cfg(stateful_pool_loom)]
mod models {
    use super::super::outcome::{KIND_CANCELLED, KIND_DIED, KIND_OK};
    use super::super::*;
    use crate::ring::mpmc::Repair;
    use crate::ring::tests::loom_tests::{a_lap_works, two_values_and_a_live_pop};
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicUsize;

    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.preemption_bound = Some(2);
        b.check(f);
    }

    /// A worker that claims the slot's task and runs it (counting in `ran`) unless it was
    /// cancelled, then publishes.
    fn claim_and_run(sh: &Arc<SlotHeader>, ran: &Arc<AtomicUsize>) -> loom::thread::JoinHandle<()> {
        let (sh, ran) = (sh.clone(), ran.clone());
        loom::thread::spawn(move || {
            let prev = sh.claim(1);
            let kind = if prev & bits::CANCELLED != 0 {
                KIND_CANCELLED
            } else {
                ran.fetch_add(1, Ordering::SeqCst);
                KIND_OK
            };
            let _ = sh.publish(RawOutcome::new(kind, 0, 0, 0));
        })
    }

    fn spin_until(cond: impl Fn() -> bool) {
        while !cond() {
            loom::thread::yield_now();
        }
    }

    /// The submit/shutdown handshake on a slot's `phase` (`pool/slots.rs`): a submit marks its
    /// slot (a SeqCst swap), then reads `closing`; a shutdown raises `closing` (a SeqCst
    /// swap), waits while any slot is mid-submit, then sweeps what is queued. A submit that
    /// is accepted has its task seen by the sweep; one the sweep could miss is refused.
    ///
    /// The two SeqCst loads of the real code are read-modify-writes here: loom models a
    /// SeqCst load as an Acquire one, which may read a stale value (tokio-rs/loom#180), so it
    /// cannot check a Dekker pair of plain SeqCst loads. In the C++/Rust model all four
    /// operations are in one total order, and an RMW reads what a SeqCst load would read in
    /// that order; this model checks the rest of the handshake (the order of its steps). It
    /// fails if the submit does not re-check `closing` after marking its slot.
    #[test]
    fn loom_a_submit_racing_a_shutdown_is_refused_or_swept() {
        use loom::sync::atomic::{AtomicBool, AtomicU8};
        const FREE: u8 = 0;
        const SUBMITTING: u8 = 1;
        const QUEUED: u8 = 2;
        model(|| {
            let phase = Arc::new(AtomicU8::new(FREE));
            let closing = Arc::new(AtomicBool::new(false));
            let queued = Arc::new(AtomicBool::new(false));
            let submit = {
                let (phase, closing, queued) = (phase.clone(), closing.clone(), queued.clone());
                loom::thread::spawn(move || {
                    phase.swap(SUBMITTING, Ordering::SeqCst);
                    if closing.fetch_or(false, Ordering::SeqCst) {
                        phase.store(FREE, Ordering::Relaxed);
                        return false;
                    }
                    queued.store(true, Ordering::Relaxed);
                    phase.store(QUEUED, Ordering::Release);
                    true
                })
            };
            closing.swap(true, Ordering::SeqCst);
            // The look decides whether there is a submit to wait for; waiting for it is
            // joining it here (its remaining steps are bounded), then the sweep.
            let (accepted, swept) = if phase.fetch_add(0, Ordering::SeqCst) == SUBMITTING {
                let accepted = submit.join().unwrap();
                (accepted, queued.load(Ordering::Relaxed))
            } else {
                let swept = queued.load(Ordering::Relaxed);
                (submit.join().unwrap(), swept)
            };
            assert!(
                !accepted || swept,
                "an accepted task was queued after the sweep"
            );
        });
    }

    /// A handle is dropped (detach) while its worker publishes and the reactor scans: the slot
    /// is retired exactly once, by the handle or by the reactor.
    #[test]
    fn loom_detach_vs_reactor_vs_done_retires_once() {
        model(|| {
            let sh = Arc::new(SlotHeader::new());
            let arb = Arc::new(Arbiter::default());
            let retired = Arc::new(AtomicUsize::new(0));
            sh.prepare(7, (0, 0), (0, 0), 0);
            sh.claim(1);
            let worker = {
                let sh = sh.clone();
                loom::thread::spawn(move || {
                    let _ = sh.publish(RawOutcome::new(KIND_OK, 0, 0, 0));
                })
            };
            let reactor = {
                let (sh, arb, retired) = (sh.clone(), arb.clone(), retired.clone());
                loom::thread::spawn(move || {
                    // Two passes: the doorbell may ring before or after the detach.
                    for _ in 0..2 {
                        if let Some(t) = arb.reactor_take(&sh) {
                            assert_eq!(t.task_id, 7);
                            if t.retire {
                                retired.fetch_add(1, Ordering::SeqCst);
                            }
                        }
                        loom::thread::yield_now();
                    }
                })
            };
            if arb.detach(&sh, 7) {
                retired.fetch_add(1, Ordering::SeqCst);
            }
            worker.join().unwrap();
            reactor.join().unwrap();
            // The reactor's last word: a pass after everything settled.
            if let Some(t) = arb.reactor_take(&sh) {
                if t.retire {
                    retired.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert_eq!(retired.load(Ordering::SeqCst), 1);
        });
    }

    /// A caller cancels while a worker claims: either the worker sees the cancellation and
    /// answers `Cancelled` without running, or it runs; exactly one outcome either way. A
    /// cancel that saw no claim (the parent then answers `Cancelled` itself) means it never
    /// runs.
    #[test]
    fn loom_cancel_vs_claim_answers_once() {
        model(|| {
            let sh = Arc::new(SlotHeader::new());
            let ran = Arc::new(AtomicUsize::new(0));
            sh.prepare(3, (0, 0), (0, 0), 0);
            let worker = claim_and_run(&sh, &ran);
            // `true`: no worker had claimed it, so the caller answers `Cancelled` at once.
            let settled = sh.cancel();
            spin_until(|| sh.is_done());
            let o = sh.outcome();
            worker.join().unwrap();
            if settled {
                assert_eq!(o.kind, KIND_CANCELLED, "settled by the cancel: never ran");
            }
            match o.kind {
                KIND_OK => assert_eq!(ran.load(Ordering::SeqCst), 1),
                KIND_CANCELLED => assert_eq!(ran.load(Ordering::SeqCst), 0),
                k => panic!("kind {k}"),
            }
            assert!(sh.state.load(Ordering::SeqCst) & bits::CANCELLED != 0);
        });
    }

    /// The caller's wait reaches the task's deadline while a worker pops and claims it (and
    /// the reactor scans): either the caller expires it (answers `Timeout` itself and hands
    /// the slot over, as a dropped handle does) and the worker skips it, or the worker claimed
    /// it first and its outcome is the caller's. The task runs at most once, the caller gets
    /// exactly one answer, and the slot is retired exactly once.
    #[test]
    fn loom_expire_vs_claim_answers_once_and_retires_once() {
        model(|| {
            let sh = Arc::new(SlotHeader::new());
            let arb = Arc::new(Arbiter::default());
            let ran = Arc::new(AtomicUsize::new(0));
            let retired = Arc::new(AtomicUsize::new(0));
            sh.prepare(9, (0, 0), (0, 0), bits::DEADLINE);
            let worker = claim_and_run(&sh, &ran);
            let reactor = {
                let (sh, arb, retired) = (sh.clone(), arb.clone(), retired.clone());
                loom::thread::spawn(move || {
                    if let Some(t) = arb.reactor_take(&sh) {
                        if t.retire {
                            retired.fetch_add(1, Ordering::SeqCst);
                        }
                    }
                })
            };
            let expired = sh.expire();
            if expired {
                // The pool's `expire`: the caller answers Timeout and detaches.
                if arb.detach(&sh, 9) {
                    retired.fetch_add(1, Ordering::SeqCst);
                }
            } else {
                // A worker has it: wait for its answer and retire as a collect does.
                spin_until(|| sh.is_done());
                assert_eq!(sh.outcome().kind, KIND_OK);
                retired.fetch_add(1, Ordering::SeqCst);
            }
            worker.join().unwrap();
            reactor.join().unwrap();
            if let Some(t) = arb.reactor_take(&sh) {
                if t.retire {
                    retired.fetch_add(1, Ordering::SeqCst);
                }
            }
            assert_eq!(ran.load(Ordering::SeqCst), usize::from(!expired));
            assert_eq!(retired.load(Ordering::SeqCst), 1);
            assert!(sh.is_done());
        });
    }

    /// A worker serves task 1 and dies after step `k` of its protocol (1: popped, 2: claimed,
    /// 3: task id recorded, 4: published, 5: all done); meanwhile its caller collects as soon as the task is done and reuses the slot
    /// for task 2. The supervisor, after the death, applies the recovery rule: task 1 is
    /// answered exactly once (by the worker or by the supervisor), and task 2 is never touched.
    #[test]
    fn loom_a_worker_dying_at_each_step_is_answered_once() {
        for k in 1..=5u32 {
            model(move || {
                let sh = Arc::new(SlotHeader::new());
                let current_slot = Arc::new(AtomicU32::new(u32::MAX));
                let current_task = Arc::new(AtomicU64::new(0));
                let answers = Arc::new(AtomicUsize::new(0));
                sh.prepare(1, (0, 0), (0, 0), 0);
                let worker = {
                    let (sh, cs, ct) = (sh.clone(), current_slot.clone(), current_task.clone());
                    loom::thread::spawn(move || {
                        let steps: [&dyn Fn(); 5] = [
                            &|| cs.store(0, Ordering::Relaxed),
                            // The worker's order: the claim, then the task id it read after it.
                            &|| {
                                sh.claim(1);
                            },
                            &|| ct.store(sh.task_id.load(Ordering::Relaxed), Ordering::Relaxed),
                            &|| {
                                let _ = sh.publish(RawOutcome::new(KIND_OK, 0, 0, 0));
                            },
                            &|| {
                                cs.store(u32::MAX, Ordering::Release);
                                ct.store(0, Ordering::SeqCst);
                            },
                        ];
                        for step in steps.iter().take(k as usize) {
                            step();
                        }
                    })
                };
                // The caller: collects task 1 once done and reuses the slot for task 2.
                let caller = {
                    let (sh, answers) = (sh.clone(), answers.clone());
                    loom::thread::spawn(move || {
                        spin_until(|| sh.is_done());
                        assert_eq!(sh.task_id.load(Ordering::Relaxed), 1);
                        answers.fetch_add(1, Ordering::SeqCst);
                        sh.prepare(2, (0, 0), (0, 0), 0);
                    })
                };
                worker.join().unwrap();
                // The supervisor sees the death (after the worker's last step).
                let held = held_by_dead_worker(
                    current_slot.load(Ordering::SeqCst),
                    current_task.load(Ordering::SeqCst),
                    1,
                    |_| Some(sh.state_and_task()),
                );
                if let Some(_slot) = held {
                    // Publishes for the task it found: must be task 1, unanswered.
                    assert_eq!(sh.task_id.load(Ordering::Relaxed), 1);
                    let _ = sh.publish(RawOutcome::new(KIND_DIED, 0, 0, 0));
                }
                caller.join().unwrap();
                assert_eq!(answers.load(Ordering::SeqCst), 1);
                // Published by the worker (k >= 4) or else by the supervisor, never both.
                assert_eq!(held.is_some(), k < 4, "step {k}");
                // Task 2 is untouched: not done.
                assert_eq!(sh.task_id.load(Ordering::Relaxed), 2);
                assert!(!sh.is_done());
            });
        }
    }

    /// A worker died inside its pop while a live worker pops and the supervisor (the only
    /// parent thread that pops the shared queue) repairs the dead pop and then drains the
    /// queue: every queued value is delivered exactly once.
    #[test]
    fn loom_parent_drain_and_repair_deliver_each_value_once() {
        model(|| {
            let (q, live_claim, live) = two_values_and_a_live_pop();
            let dead_claim = AtomicU64::new(0);
            q.ring().pop_and_die_after_cas_racing(&dead_claim);
            let mut got = Vec::new();
            loop {
                match q.ring().repair(dead_claim.load(Ordering::SeqCst), |c| {
                    live_claim.load(Ordering::SeqCst) == c
                }) {
                    Repair::Deferred => loom::thread::yield_now(),
                    Repair::Taken(v) => {
                        got.push(v);
                        break;
                    }
                    Repair::Nothing => break,
                }
            }
            while let Some(v) = q.ring().pop(None) {
                got.push(v);
            }
            if let Some(v) = live.join().unwrap() {
                got.push(v);
            }
            got.sort();
            assert_eq!(got, [7, 8]);
            a_lap_works(&q);
        });
    }
}
