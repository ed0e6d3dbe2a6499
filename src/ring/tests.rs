//! Tests of the ring code over heap memory: unit and threaded stress tests (also run under
//! Miri, which cannot map shared memory: `cargo +nightly miri test --lib -- ring::tests`), and
//! loom model tests (`RUSTFLAGS="--cfg stateful_pool_loom" cargo test --lib --release -- loom`).

use super::bytes::{ByteRing, ByteRingHeader};
use super::mpmc::HeapMpmc;
use crate::slot::outcome::KIND_OK;

/// 64-aligned heap storage for a byte ring, shareable between threads.
struct HeapByteRing {
    hdr: Box<ByteRingHeader>,
    data: *mut u8,
    cap: usize,
    flags: Box<[crate::sync::AtomicU32]>,
}

impl HeapByteRing {
    fn new(cap: usize) -> Self {
        assert_eq!(cap % 64, 0);
        let layout = std::alloc::Layout::from_size_align(cap, 64).unwrap();
        // SAFETY: non-zero size (cap >= 64 in every test).
        let data = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!data.is_null());
        HeapByteRing {
            hdr: Box::new(ByteRingHeader::new()),
            data,
            cap,
            flags: (0..cap / 32)
                .map(|_| crate::sync::AtomicU32::new(0))
                .collect(),
        }
    }

    fn ring(&self) -> ByteRing<'_> {
        // SAFETY: `data` is a live, 64-aligned allocation of `cap` bytes owned by `self`;
        // tests follow the single-producer protocol.
        unsafe { ByteRing::with_flags(&self.hdr, self.data, self.cap as u64, &self.flags) }
    }
}

impl Drop for HeapByteRing {
    fn drop(&mut self) {
        let layout = std::alloc::Layout::from_size_align(self.cap, 64).unwrap();
        // SAFETY: allocated in `new` with this layout, freed once.
        unsafe { std::alloc::dealloc(self.data, layout) };
    }
}

// SAFETY: the buffer is only accessed through `ByteRing`, whose protocol the tests follow.
unsafe impl Send for HeapByteRing {}
// SAFETY: as for Send.
unsafe impl Sync for HeapByteRing {}

#[cfg(not(stateful_pool_loom))]
mod std_tests {
    use super::*;
    use std::sync::atomic::{AtomicUsize, Ordering};

    const COUNT: u32 = if cfg!(miri) { 200 } else { 50_000 };

    #[test]
    fn has_ready_follows_the_cell_at_head_lap_after_lap() {
        let q = HeapMpmc::with_capacity(2);
        let r = q.ring();
        assert!(!r.has_ready());
        for v in 0..10 {
            r.push(v).unwrap();
            assert!(r.has_ready(), "lap {v}: a pushed value is ready");
            r.push(v + 100).unwrap();
            assert_eq!(r.pop(None), Some(v));
            assert!(r.has_ready(), "lap {v}: the second value is ready");
            assert_eq!(r.pop(None), Some(v + 100));
            assert!(!r.has_ready(), "lap {v}: empty again");
        }
    }

    #[test]
    fn mpmc_smoke_full_and_empty() {
        let q = HeapMpmc::with_capacity(3);
        let r = q.ring();
        assert_eq!(r.capacity(), 4);
        assert_eq!(r.pop(None), None);
        for v in 0..4 {
            r.push(v).unwrap();
        }
        assert_eq!(r.push(9), Err(9));
        assert_eq!(r.len(), 4);
        for v in 0..4 {
            assert_eq!(r.pop(None), Some(v));
        }
        assert!(r.is_empty());
        // Many laps.
        for v in 0..100 {
            r.push(v).unwrap();
            assert_eq!(r.pop(None), Some(v));
        }
    }

    #[test]
    fn pop_head_if_takes_only_an_accepted_head() {
        let q = HeapMpmc::with_capacity(4);
        let r = q.ring();
        assert_eq!(r.pop_head_if(|_| true), None, "empty");
        for v in [10, 11, 12] {
            r.push(v).unwrap();
        }
        // Only the head is ever looked at: 11 behind a declined 10 stays.
        assert_eq!(r.pop_head_if(|v| v == 11), None);
        assert_eq!(r.len(), 3);
        assert_eq!(r.pop_head_if(|v| v == 10), Some(10));
        assert_eq!(r.pop_head_if(|v| v == 11), Some(11));
        // The cells it released serve the next laps, with ordinary pops beside it.
        for v in 0..40 {
            r.push(v).unwrap();
            let got = if v % 2 == 0 {
                r.pop_head_if(|_| true)
            } else {
                r.pop(None)
            };
            assert_eq!(got, Some(if v == 0 { 12 } else { v - 1 }));
        }
        assert_eq!(r.pop(None), Some(39));
        assert!(r.is_empty());
    }

    #[test]
    fn mpmc_every_item_exactly_once_across_threads() {
        const THREADS: u32 = 4;
        let q = HeapMpmc::with_capacity(16);
        let seen: Vec<AtomicUsize> = (0..COUNT * THREADS).map(|_| AtomicUsize::new(0)).collect();
        let popped = AtomicUsize::new(0);
        let claims: Vec<crate::sync::AtomicU64> = (0..THREADS)
            .map(|_| crate::sync::AtomicU64::new(0))
            .collect();
        std::thread::scope(|s| {
            for t in 0..THREADS {
                let q = &q;
                s.spawn(move || {
                    for i in 0..COUNT {
                        let mut v = t * COUNT + i;
                        while let Err(back) = q.ring().push(v) {
                            v = back;
                            std::thread::yield_now();
                        }
                    }
                });
            }
            for claim in &claims {
                let (q, seen, popped) = (&q, &seen, &popped);
                s.spawn(move || {
                    while popped.load(Ordering::SeqCst) < (COUNT * THREADS) as usize {
                        match q.ring().pop(Some(claim)) {
                            Some(v) => {
                                seen[v as usize].fetch_add(1, Ordering::SeqCst);
                                popped.fetch_add(1, Ordering::SeqCst);
                            }
                            None => std::thread::yield_now(),
                        }
                    }
                });
            }
        });
        assert!(seen.iter().all(|c| c.load(Ordering::SeqCst) == 1));
        assert!(claims.iter().all(|c| c.load(Ordering::SeqCst) == 0));
    }

    #[test]
    fn byte_ring_wraps_pads_and_releases_out_of_order() {
        let h = HeapByteRing::new(512);
        let r = h.ring();
        assert_eq!(r.max_record_len(), 224);
        assert!(r.try_reserve(225).is_err());
        let mut recs = Vec::new();
        for i in 0..3u8 {
            let res = r.try_reserve(100).unwrap().unwrap(); // 32 + 128 = 160 bytes each
            // SAFETY: 100 writable bytes reserved above.
            unsafe { std::ptr::write_bytes(r.data_ptr(&res), i + 1, 100) };
            recs.push(r.commit(res, 100, KIND_OK, i as u32, 10 + i as u64));
        }
        assert_eq!(r.used(), 480);
        // 32 bytes left but 100 needs 160: no room now.
        assert!(r.try_reserve(100).unwrap().is_none());
        // Release the middle one: head cannot move past the first.
        r.release(recs[1]);
        assert!(!r.advance().unwrap());
        r.release(recs[0]);
        assert!(r.advance().unwrap());
        assert_eq!(r.used(), 160);
        // Next record needs a pad to the end (32 bytes left at the end, 160 needed).
        let res = r.try_reserve(100).unwrap().unwrap();
        // SAFETY: 100 writable bytes reserved above.
        unsafe { std::ptr::write_bytes(r.data_ptr(&res), 9, 100) };
        let off = r.commit(res, 100, KIND_OK, 7, 77);
        assert_eq!(off, 0, "the record wrapped to the start");
        assert_eq!(r.used(), 160 + 32 + 160);
        // The third record is intact, and only its own slot and task can read it.
        assert!(r.record_data(recs[2], 2, 11, KIND_OK, 100).is_none());
        assert!(r.record_data(recs[2], 1, 12, KIND_OK, 100).is_none());
        assert!(r.record_data(recs[2], 2, 12, KIND_OK, 99).is_none());
        let p = r.record_data(recs[2], 2, 12, KIND_OK, 100).unwrap();
        // SAFETY: in range (checked by `record_data`), written above.
        let third = unsafe { std::slice::from_raw_parts(p, 100) };
        assert!(third.iter().all(|&b| b == 3));
        r.release(recs[2]);
        assert!(r.advance().unwrap()); // over record 3 and the pad
        r.release(off);
        assert!(r.advance().unwrap());
        assert_eq!(r.used(), 0);
        assert!(r.record_data(496, 7, 77, KIND_OK, 100).is_none());
        assert!(r.record_data(16, 7, 77, KIND_OK, 100).is_none());
    }

    #[test]
    fn byte_ring_consumer_survives_garbage_counters_and_headers() {
        let h = HeapByteRing::new(512);
        let r = h.ring();
        let res = r.try_reserve(40).unwrap().unwrap();
        let off = r.commit(res, 40, KIND_OK, 1, 1);
        // A record header claiming more than the ring: corrupt, not a loop or a panic.
        // SAFETY: the header is in our own heap buffer; test-only scribble.
        unsafe { (h.data.add(off as usize) as *mut u32).write(u32::MAX) };
        r.release(off);
        assert!(r.advance().is_err());
        assert!(r.sweep(|_, _| true).is_err());
        // Counters out of order or misaligned: corrupt.
        for (head, tail) in [
            (64u64, 32u64),
            (0, 4096),
            (3, 35),
            (u64::MAX - 31, u64::MAX),
        ] {
            h.hdr.set(head, tail);
            assert!(r.advance().is_err(), "{head} {tail}");
        }
        // Aligned, ordered counters just below `u64::MAX`, with a record that reaches past
        // `tail` and every other header an empty released record: `pos + size` would wrap to 0
        // and restart the walk from there (2^59 steps). It must be corrupt, at once.
        let top = u64::MAX - 31; // 2^64 - 32, a multiple of 32
        for rec in 0..512 / 32 {
            // SAFETY: record headers inside our own heap buffer; test-only scribble.
            unsafe { (h.data.add(rec * 32) as *mut u32).write(0) };
            h.flags[rec].store(1, crate::sync::Ordering::SeqCst);
        }
        let at = ((top - 32) % 512) as usize; // the record at `head`
        // SAFETY: as above.
        unsafe { (h.data.add(at) as *mut u32).write(32) }; // size 64 > tail - head = 32
        h.hdr.set(top - 32, top);
        assert!(r.advance().is_err());
        assert!(r.sweep(|_, _| true).is_err());
        // The same counters with an honest empty record: one step, to `tail`, no wrap.
        // SAFETY: as above.
        unsafe { (h.data.add(at) as *mut u32).write(0) };
        assert!(r.advance().unwrap());
        assert_eq!(r.used(), 0);
        // A reset makes the ring usable again.
        r.reset();
        assert_eq!(r.used(), 0);
        let res = r.try_reserve(40).unwrap().unwrap();
        let off = r.commit(res, 40, KIND_OK, 2, 2);
        r.release(off);
        assert!(r.advance().unwrap());
        assert_eq!(r.used(), 0);
    }

    /// A dead worker's forged words name the position a live consumer is popping (claim and
    /// CAS done, value not read yet), with a recorded value: `release_won` must wait, not
    /// free the cell under the live pop (a producer one lap later would overwrite the value it
    /// is about to read).
    #[test]
    fn release_won_waits_while_a_live_pop_shows_the_same_claim() {
        let q = HeapMpmc::with_capacity(2);
        let r = q.ring();
        r.push(7).unwrap();
        r.push(8).unwrap();
        let live_claim = crate::sync::AtomicU64::new(0);
        r.pop_and_die_after_cas(&live_claim); // paused mid-pop of position 0
        let c = live_claim.load(Ordering::SeqCst);
        assert_eq!(c, 1);
        assert!(!r.release_won(c, |x| live_claim.load(Ordering::SeqCst) == x));
        // Cell 0 still holds 7 for its popper (stamp `pos + 1`: full), so the next lap's
        // producer cannot reuse it yet.
        assert_eq!(r.seq_at(0), 1, "cell 0 was freed under the live pop");
        assert_eq!(r.pop(None), Some(8));
        // Once no live claim shows, the release goes through (here: as if that pop were the
        // forged one's own, released for it) and the ring works on.
        assert!(r.release_won(c, |_| false));
        assert_eq!(r.seq_at(0), 2);
        r.push(9).unwrap();
        r.push(10).unwrap();
        assert_eq!(r.pop(None), Some(9));
        assert_eq!(r.pop(None), Some(10));
    }

    #[test]
    fn byte_ring_reset_forgets_uncollected_records() {
        let h = HeapByteRing::new(512);
        let r = h.ring();
        let res = r.try_reserve(40).unwrap().unwrap();
        let off = r.commit(res, 40, KIND_OK, 5, 9);
        assert!(r.record_data(off, 5, 9, KIND_OK, 40).is_some());
        // A worker's garbage in the counters, then the reset its death brings: a late collect
        // of the old record must not match (the seat's next worker writes over those bytes).
        h.hdr.set(3, 35);
        assert!(r.advance().is_err());
        r.reset();
        assert!(r.record_data(off, 5, 9, KIND_OK, 40).is_none());
        assert_eq!(r.used(), 0);
    }

    #[test]
    fn byte_ring_producer_and_consumer_threads_agree_on_every_byte() {
        let h = HeapByteRing::new(2048);
        let r = h.ring();
        let n = COUNT / 4;
        let (tx, rx) = std::sync::mpsc::channel::<(u64, u64, u32)>();
        std::thread::scope(|s| {
            s.spawn(move || {
                for i in 0..n {
                    let len = (i as u64 * 37) % 300;
                    let res = loop {
                        if let Some(res) = r.try_reserve(len).unwrap() {
                            break res;
                        }
                        std::thread::yield_now();
                    };
                    // SAFETY: `len` writable bytes reserved.
                    unsafe { std::ptr::write_bytes(r.data_ptr(&res), i as u8, len as usize) };
                    let off = r.commit(res, len, KIND_OK, i, i as u64);
                    tx.send((off, len, i)).unwrap();
                }
            });
            s.spawn(move || {
                let mut held = Vec::new();
                for (k, (off, len, i)) in rx.iter().enumerate() {
                    let p = r.record_data(off, i, i as u64, KIND_OK, len).unwrap();
                    // SAFETY: published record, not yet released.
                    let b = unsafe { std::slice::from_raw_parts(p, len as usize) };
                    assert!(b.iter().all(|&x| x == i as u8), "record {i} corrupted");
                    held.push(off);
                    // Release in a scrambled order, two at a time (records are <= 352 bytes: two held plus a pad plus the next always fit in 2 KiB).
                    if k % 2 == 1 {
                        for off in held.drain(..).rev() {
                            r.release(off);
                        }
                        r.advance().unwrap();
                    }
                }
                for off in held {
                    r.release(off);
                }
                r.advance().unwrap();
            });
        });
        assert_eq!(r.used(), 0);
    }

    #[test]
    fn eventcount_notify_without_sleepers_is_cheap_and_wait_is_woken() {
        use super::super::wait::{EventCount, wait_on};
        use std::sync::atomic::AtomicBool;
        let ec = EventCount::new();
        ec.notify_one();
        ec.notify_all();
        let flag = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                wait_on(&ec, std::time::Duration::ZERO, None, || {
                    flag.load(Ordering::SeqCst)
                })
            });
            flag.store(true, Ordering::SeqCst);
            ec.notify_all();
            assert!(waiter.join().unwrap());
        });
        let never = AtomicBool::new(false);
        let deadline = std::time::Instant::now() + std::time::Duration::from_millis(5);
        assert!(!wait_on(
            &ec,
            std::time::Duration::ZERO,
            Some(deadline),
            || never.load(Ordering::SeqCst)
        ));
    }

    #[test]
    fn eventcount_sends_one_wakeup_per_waiter_not_per_notify() {
        use super::super::wait::EventCount;
        let ec = EventCount::new();
        // Two waiters counted (neither sleeps: `prepare` alone counts them).
        let (a, b) = (ec.prepare(), ec.prepare());
        assert_eq!((ec.sleepers(), ec.pending()), (2, 0));
        ec.notify_one();
        assert_eq!(ec.pending(), 1, "one wake-up sent");
        ec.notify_one();
        assert_eq!(ec.pending(), 2, "the second waiter gets its own");
        for _ in 0..100 {
            ec.notify_one();
        }
        assert_eq!(ec.pending(), 2, "a burst sends no more than one per waiter");
        // Leaving takes one waiter and one pending wake-up off the count each.
        ec.cancel(a);
        assert_eq!((ec.sleepers(), ec.pending()), (1, 1));
        ec.cancel(b);
        assert_eq!((ec.sleepers(), ec.pending()), (0, 0));
        // A waiter that leaves without having been woken takes a pending wake-up meant for
        // another: the other's next notify wakes again (an extra wake-up, never a lost one).
        let (a, b) = (ec.prepare(), ec.prepare());
        ec.notify_one();
        ec.cancel(a);
        assert_eq!((ec.sleepers(), ec.pending()), (1, 0));
        ec.notify_one();
        assert_eq!(ec.pending(), 1);
        ec.cancel(b);
        // notify_all claims a wake-up for every waiter at once.
        let (a, b) = (ec.prepare(), ec.prepare());
        ec.notify_all();
        assert_eq!(ec.pending(), 2);
        ec.notify_all();
        assert_eq!(ec.pending(), 2);
        ec.cancel(a);
        ec.cancel(b);
        // A dead sleeper's withdrawal is a leaving too, and never goes below zero.
        let _a = ec.prepare();
        ec.notify_one();
        ec.withdraw_dead_sleeper();
        ec.withdraw_dead_sleeper();
        assert_eq!((ec.sleepers(), ec.pending()), (0, 0));
    }

    #[test]
    fn eventcount_notify_all_wakes_past_a_claim_its_notifier_never_sent() {
        // A worker that rings the doorbell (`notify_all`) and is killed between its claim and
        // its `FUTEX_WAKE` leaves a wake-up pending that nobody sends. A later `notify_all`
        // must wake the sleeper anyway (found by review: it skipped, and the reactor slept
        // until its own timeout).
        use super::super::wait::{EventCount, wait_on};
        use std::sync::atomic::AtomicBool;
        use std::time::{Duration, Instant};
        let ec = EventCount::new();
        let flag = AtomicBool::new(false);
        std::thread::scope(|s| {
            let waiter = s.spawn(|| {
                let t0 = Instant::now();
                wait_on(
                    &ec,
                    Duration::ZERO,
                    Some(t0 + Duration::from_secs(120)),
                    || flag.load(Ordering::SeqCst),
                );
                t0.elapsed()
            });
            while ec.sleepers() == 0 {
                std::thread::yield_now();
            }
            ec.claim_without_waking_for_tests();
            assert_eq!((ec.sleepers(), ec.pending()), (1, 1));
            flag.store(true, Ordering::SeqCst);
            ec.notify_all();
            let took = waiter.join().unwrap();
            assert!(
                took < Duration::from_secs(60),
                "the waiter slept until its timeout ({took:?})"
            );
        });
        assert_eq!((ec.sleepers(), ec.pending()), (0, 0));
    }

    #[test]
    fn eventcount_many_waiters_and_notifiers_lose_no_wakeup() {
        // Waiters that each need a token, notifiers that each add one and notify once: every
        // waiter finishes (a lost wake-up would hang a waiter; the test harness's timeout and
        // the bounded wait below turn that into a failure).
        use super::super::wait::{EventCount, wait_on};
        use std::sync::atomic::AtomicU32;
        const WAITERS: usize = 4;
        const ROUNDS: u32 = 2_000;
        let ec = EventCount::new();
        let tokens = AtomicU32::new(0);
        let take = || {
            tokens
                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| t.checked_sub(1))
                .is_ok()
        };
        std::thread::scope(|s| {
            for _ in 0..WAITERS {
                s.spawn(|| {
                    for _ in 0..ROUNDS {
                        let deadline =
                            std::time::Instant::now() + std::time::Duration::from_secs(60);
                        assert!(
                            wait_on(&ec, std::time::Duration::ZERO, Some(deadline), take),
                            "a waiter was never woken for its token"
                        );
                    }
                });
            }
            for _ in 0..2 {
                s.spawn(|| {
                    for _ in 0..(WAITERS as u32 * ROUNDS / 2) {
                        tokens.fetch_add(1, Ordering::SeqCst);
                        ec.notify_one();
                    }
                });
            }
        });
        assert_eq!(tokens.load(Ordering::SeqCst), 0);
        assert_eq!((ec.sleepers(), ec.pending()), (0, 0));
    }

    /// The shared-core guess: only waits won by a first yield that let another thread run for
    /// a moment build the streak; any other ending ends it; once suspected, every `REPROBE`th
    /// wait spins again.
    #[test]
    fn the_shared_core_guess_needs_switching_yields_and_reprobes() {
        use crate::ring::wait::{REPROBE, SHARED_AFTER, SWITCHED, SWITCHED_MAX, SharedCore};
        use std::time::Duration;
        let mut streak = 0;
        for _ in 0..SHARED_AFTER {
            assert_eq!(SharedCore::decide(streak, 0), (false, 0));
            streak = SharedCore::next(streak, Some(SWITCHED));
        }
        assert_eq!(streak, SHARED_AFTER);
        // Suspected: skip, except every REPROBE-th wait.
        let (mut since, mut skipped) = (0, 0);
        for _ in 0..REPROBE * 3 {
            let (skip, s) = SharedCore::decide(streak, since);
            since = s;
            skipped += skip as u32;
        }
        assert_eq!(skipped, (REPROBE as u32 - 1) * 3);
        // What ends it: any other ending, a quick yield (nothing else ran), a long one (a
        // third thread's time slice).
        assert_eq!(SharedCore::next(streak, None), 0);
        assert_eq!(SharedCore::next(streak, Some(Duration::from_nanos(200))), 0);
        assert_eq!(
            SharedCore::next(streak, Some(SWITCHED_MAX + Duration::from_micros(1))),
            0
        );
        assert_eq!(SharedCore::next(streak, Some(SWITCHED_MAX)), streak + 1);
        assert_eq!(SharedCore::next(u8::MAX, Some(SWITCHED)), u8::MAX);
    }

    /// Two threads on one CPU hand a counter back and forth through `spin_until` (the shape
    /// of a caller and its worker that the scheduler put on one CPU): every hand-off arrives,
    /// in order, whether the pure spin is skipped or not.
    #[test]
    #[cfg_attr(miri, ignore = "pins threads to a CPU (sched_setaffinity) and spins")]
    fn spinners_sharing_one_cpu_hand_off_every_value() {
        use crate::ring::wait::spin_until;
        use std::sync::atomic::{AtomicU64, Ordering};
        use std::time::{Duration, Instant};
        // SAFETY: sched_getcpu has no preconditions.
        let Ok(cpu) = usize::try_from(unsafe { libc::sched_getcpu() }) else {
            eprintln!("SKIPPED: sched_getcpu is not available here");
            return;
        };
        let pin = move || {
            // SAFETY: a zeroed cpu_set_t is valid; CPU_SET writes inside it (cpu < CPU_SETSIZE:
            // it came from the kernel); the call only reads it.
            let rc = unsafe {
                let mut set: libc::cpu_set_t = std::mem::zeroed();
                libc::CPU_SET(cpu, &mut set);
                libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set)
            };
            assert_eq!(
                rc,
                0,
                "pinning to CPU {cpu}: {}",
                std::io::Error::last_os_error()
            );
        };
        const ROUNDS: u64 = 2_000;
        // Generous: on a loaded machine each hand-off can wait for a scheduler tick.
        let deadline = Instant::now() + Duration::from_secs(60);
        let turn = AtomicU64::new(0);
        std::thread::scope(|s| {
            for side in 0..2u64 {
                let turn = &turn;
                s.spawn(move || {
                    pin();
                    for r in 0..ROUNDS {
                        let mine = 2 * r + side;
                        while !spin_until(Duration::from_micros(20), || {
                            turn.load(Ordering::Acquire) == mine
                        }) {
                            assert!(Instant::now() < deadline, "hand-off {mine} never came");
                            std::thread::yield_now();
                        }
                        turn.store(mine + 1, Ordering::Release);
                    }
                });
            }
        });
        assert_eq!(turn.load(Ordering::Relaxed), 2 * ROUNDS);
    }
}

#[cfg(stateful_pool_loom)]
pub(crate) mod loom_tests {
    use super::*;
    use crate::ring::mpmc::Repair;
    use crate::ring::wait::{EventCount, spin_until, wait_on};
    use crate::sync::{AtomicU32, AtomicU64, Ordering};
    use loom::sync::Arc;
    use loom::sync::atomic::AtomicBool;

    /// loom::model with the branch budget tokio's CI uses: the rings spin (bounded, with a
    /// yield under loom) while a peer is mid-operation, which costs branches.
    fn model(f: impl Fn() + Sync + Send + 'static) {
        let mut b = loom::model::Builder::new();
        b.max_branches = 100_000;
        b.check(f);
    }

    #[test]
    fn loom_mpmc_two_producers_two_consumers() {
        // Two threads, each a producer and then a consumer (with the crash-intent record):
        // pushes race with pushes, pops race with pops and with pushes.
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            let claims = Arc::new([AtomicU64::new(0), AtomicU64::new(0)]);
            let threads: Vec<_> = (0..2u32)
                .map(|t| {
                    let (q, claims) = (q.clone(), claims.clone());
                    loom::thread::spawn(move || {
                        q.ring().push(t).unwrap();
                        q.ring().pop(Some(&claims[t as usize]))
                    })
                })
                .collect();
            let mut got: Vec<u32> = threads
                .into_iter()
                .filter_map(|c| c.join().unwrap())
                .collect();
            while let Some(v) = q.ring().pop(None) {
                got.push(v);
            }
            got.sort();
            assert_eq!(got, vec![0, 1], "every value exactly once");
            assert_eq!(claims[0].load(Ordering::SeqCst), 0);
            assert_eq!(claims[1].load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn loom_mpmc_two_producers_one_consumer_thread() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            let producers: Vec<_> = (0..2u32)
                .map(|t| {
                    let q = q.clone();
                    loom::thread::spawn(move || q.ring().push(t).unwrap())
                })
                .collect();
            let first = q.ring().pop(None);
            for p in producers {
                p.join().unwrap();
            }
            let mut got: Vec<u32> = first.into_iter().collect();
            while let Some(v) = q.ring().pop(None) {
                got.push(v);
            }
            got.sort();
            assert_eq!(got, vec![0, 1]);
        });
    }

    #[test]
    fn loom_pop_head_if_races_a_pop_and_a_push_losing_nothing() {
        // The supervisor's conditional pop of the head against a worker's tracked pop and a
        // producer's push (which may wrap into the cell just released): every value is taken
        // exactly once, and a declined head stays for the others.
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            q.ring().push(0).unwrap();
            q.ring().push(1).unwrap();
            let (q2, q3) = (q.clone(), q.clone());
            let claim = Arc::new(AtomicU64::new(0));
            let c2 = claim.clone();
            let worker = loom::thread::spawn(move || q2.ring().pop(Some(&c2)));
            let producer = loom::thread::spawn(move || q3.ring().push(2).is_ok());
            let took = q.ring().pop_head_if(|v| v != 1);
            let mut got: Vec<u32> = took.into_iter().collect();
            got.extend(worker.join().unwrap());
            let pushed = producer.join().unwrap();
            while let Some(v) = q.ring().pop(None) {
                got.push(v);
            }
            got.sort();
            let want: Vec<u32> = if pushed { vec![0, 1, 2] } else { vec![0, 1] };
            assert_eq!(got, want, "every value exactly once");
            assert_ne!(took, Some(1), "a declined value is never taken");
            assert_eq!(claim.load(Ordering::SeqCst), 0);
        });
    }

    #[test]
    fn loom_mpmc_wraps_around_with_concurrent_consumer() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            let q2 = q.clone();
            let consumer = loom::thread::spawn(move || {
                let mut got = Vec::new();
                for _ in 0..2 {
                    if let Some(v) = q2.ring().pop(None) {
                        got.push(v);
                    }
                }
                got
            });
            let mut pushed = 0;
            for v in 0..3u32 {
                if q.ring().push(v).is_ok() {
                    pushed += 1;
                }
            }
            let mut got = consumer.join().unwrap();
            while let Some(v) = q.ring().pop(None) {
                got.push(v);
            }
            // FIFO, nothing lost or duplicated.
            assert_eq!(got.len(), pushed);
            assert!(got.windows(2).all(|w| w[0] < w[1]));
        });
    }

    #[test]
    fn loom_mpmc_dead_consumer_is_repaired() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            q.ring().push(7).unwrap();
            q.ring().push(8).unwrap();
            // A consumer "dies" right after winning its CAS (simulated inside the ring module).
            let claim = AtomicU64::new(0);
            q.ring().pop_and_die_after_cas(&claim);
            let live = {
                let q = q.clone();
                loom::thread::spawn(move || q.ring().pop(None))
            };
            let repaired = q.ring().repair(claim.load(Ordering::SeqCst), |_| false);
            assert_eq!(repaired, Repair::Taken(7));
            assert_eq!(live.join().unwrap(), Some(8));
            // Not wedged: a full lap of pushes and pops works.
            for v in 0..2 {
                q.ring().push(v).unwrap();
            }
            assert_eq!(q.ring().pop(None), Some(0));
            assert_eq!(q.ring().pop(None), Some(1));
        });
    }

    /// A worker's pop answers `None` on a cell not yet filled (without reading `tail`); a
    /// worker that polls again until it gets a value gets the value a concurrent producer
    /// pushed, once, with the intent record cleared.
    #[test]
    fn loom_tracked_pop_polls_a_concurrent_push() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            let producer = {
                let q = q.clone();
                loom::thread::spawn(move || q.ring().push(5).unwrap())
            };
            let claim = AtomicU64::new(0);
            let current = AtomicU32::new(u32::MAX);
            let got = loop {
                if let Some(v) = q.ring().pop_tracked(&claim, &current, || {}) {
                    break v;
                }
                loom::thread::yield_now();
            };
            producer.join().unwrap();
            assert_eq!(got, 5);
            assert_eq!(current.load(Ordering::SeqCst), 5);
            assert_eq!(claim.load(Ordering::SeqCst), 0);
            assert!(q.ring().is_empty());
            assert_eq!(q.ring().pop_tracked(&claim, &current, || {}), None);
        });
    }

    /// A dead consumer's stale intent (it stored `claim` for position 0 and died before its
    /// CAS) must never let the supervisor steal the value a live consumer is popping at that
    /// position: the value is delivered exactly once, to one of them.
    #[test]
    fn loom_stale_claim_never_steals_from_a_live_pop() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            q.ring().push(7).unwrap();
            let dead_claim = 1u64; // intent for position 0, CAS never made
            let live_claim = Arc::new(AtomicU64::new(0));
            let live_current = Arc::new(AtomicU32::new(u32::MAX));
            let live = {
                let (q, c, cur) = (q.clone(), live_claim.clone(), live_current.clone());
                loom::thread::spawn(move || q.ring().pop_tracked(&c, &cur, || {}))
            };
            let repaired = loop {
                match q
                    .ring()
                    .repair(dead_claim, |c| live_claim.load(Ordering::SeqCst) == c)
                {
                    Repair::Deferred => loom::thread::yield_now(),
                    r => break r,
                }
            };
            let popped = live.join().unwrap();
            match (popped, repaired) {
                (Some(7), Repair::Nothing) => {
                    assert_eq!(live_current.load(Ordering::SeqCst), 7)
                }
                other => panic!("delivered {other:?}"),
            }
        });
    }

    /// A ring holding 7 and 8, and a live consumer popping one of them (with its intent
    /// record, which the supervisor's `live_claim` looks at).
    pub(crate) fn two_values_and_a_live_pop() -> (
        Arc<HeapMpmc>,
        Arc<AtomicU64>,
        loom::thread::JoinHandle<Option<u32>>,
    ) {
        let q = Arc::new(HeapMpmc::with_capacity(2));
        q.ring().push(7).unwrap();
        q.ring().push(8).unwrap();
        let claim = Arc::new(AtomicU64::new(0));
        let live = {
            let (q, c) = (q.clone(), claim.clone());
            loom::thread::spawn(move || {
                let current = AtomicU32::new(u32::MAX);
                q.ring().pop_tracked(&c, &current, || {})
            })
        };
        (q, claim, live)
    }

    /// Not wedged: a full lap of pushes and pops works.
    pub(crate) fn a_lap_works(q: &HeapMpmc) {
        q.ring().push(1).unwrap();
        q.ring().push(2).unwrap();
        assert_eq!(q.ring().pop(None), Some(1));
        assert_eq!(q.ring().pop(None), Some(2));
    }

    /// The audit's H4: two consumers race for the same position; the winner dies right after
    /// its CAS while the loser's claim still shows the same position. The repair must wait for
    /// the loser to withdraw (never skip for good), and every value is delivered exactly once.
    #[test]
    fn loom_live_losers_claim_defers_but_never_blocks_repair() {
        model(|| {
            let (q, live_claim, live) = two_values_and_a_live_pop();
            let dead_claim = AtomicU64::new(0);
            q.ring().pop_and_die_after_cas_racing(&dead_claim);
            let repaired = loop {
                match q.ring().repair(dead_claim.load(Ordering::SeqCst), |c| {
                    live_claim.load(Ordering::SeqCst) == c
                }) {
                    Repair::Deferred => loom::thread::yield_now(),
                    r => break r,
                }
            };
            let popped = live.join().unwrap().expect("two values, two consumers");
            let Repair::Taken(taken) = repaired else {
                panic!("the dead consumer's value was not repaired: {repaired:?}")
            };
            let mut both = [popped, taken];
            both.sort();
            assert_eq!(both, [7, 8]);
            a_lap_works(&q);
        });
    }

    /// The review's case: the winner records its value (`current_slot`) and dies before
    /// releasing the cell, while a loser's claim shows the same position. The supervisor
    /// releases the cell without taking the value (`release_won`): each value is delivered
    /// exactly once (the dead one's through its record), and the ring keeps working.
    #[test]
    fn loom_a_winner_that_recorded_its_value_is_released_not_answered_twice() {
        model(|| {
            let (q, live_claim, live) = two_values_and_a_live_pop();
            let dead_claim = AtomicU64::new(0);
            let dead_current = AtomicU32::new(u32::MAX);
            q.ring()
                .pop_and_die_after_recording(&dead_claim, &dead_current);
            // The supervisor: the dead worker recorded a value, so it won; release its cell
            // (waiting while the live loser's claim shows the same position).
            let c = dead_claim.load(Ordering::SeqCst);
            while !q
                .ring()
                .release_won(c, |c| live_claim.load(Ordering::SeqCst) == c)
            {
                loom::thread::yield_now();
            }
            let popped = live.join().unwrap().expect("two values, two consumers");
            let mut both = [popped, dead_current.load(Ordering::SeqCst)];
            both.sort();
            assert_eq!(both, [7, 8]);
            a_lap_works(&q);
        });
    }

    /// A dead worker's forged words claim the position a live consumer is popping, with a
    /// recorded value: in every interleaving the supervisor's deferred release converges (it
    /// waits only while the live claim shows), the live pop delivers its value, and the ring
    /// keeps working. (That the release waits rather than frees the cell under the paused pop
    /// is pinned down step by step by `release_won_waits_while_a_live_pop_shows_the_same_claim`.)
    #[test]
    fn loom_a_forged_won_claim_never_releases_a_live_pop() {
        model(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            q.ring().push(7).unwrap();
            let live_claim = Arc::new(AtomicU64::new(0));
            let live = {
                let (q, c) = (q.clone(), live_claim.clone());
                loom::thread::spawn(move || {
                    let current = AtomicU32::new(u32::MAX);
                    q.ring().pop_tracked(&c, &current, || {})
                })
            };
            // The forged words: position 0 (claim 1), as if it had won it.
            while !q
                .ring()
                .release_won(1, |c| live_claim.load(Ordering::SeqCst) == c)
            {
                loom::thread::yield_now();
            }
            // A producer, after the release, fills the next cell and then cell 0 again (one
            // lap later): a cell released under the live pop would let it overwrite the value
            // that pop is about to read. Done right, the second push waits for the live pop.
            q.ring().push(9).unwrap();
            while q.ring().push(10).is_err() {
                // Full until the live pop takes 7.
                loom::thread::yield_now();
            }
            assert_eq!(live.join().unwrap(), Some(7));
            assert_eq!(q.ring().pop(None), Some(9));
            assert_eq!(q.ring().pop(None), Some(10));
            a_lap_works(&q);
        });
    }

    #[test]
    fn loom_eventcount_has_no_lost_wakeup() {
        model(|| {
            let ec = Arc::new(EventCount::new());
            let flag = Arc::new(AtomicBool::new(false));
            let (ec2, flag2) = (ec.clone(), flag.clone());
            let waiter = loom::thread::spawn(move || {
                loop {
                    let key = ec2.prepare();
                    if flag2.load(Ordering::SeqCst) {
                        ec2.cancel(key);
                        return;
                    }
                    ec2.wait(key, None);
                }
            });
            flag.store(true, Ordering::Relaxed);
            ec.notify_one();
            waiter.join().unwrap();
        });
    }

    #[test]
    fn loom_eventcount_wakes_every_waiter_that_needs_it() {
        // Two waiters each need a token; two notifiers each add one and `notify_one`. The
        // futex model wakes exactly one sleeper per wake-up, so a notify skipped because a
        // wake-up looked pending when none was (a lost wake-up) is a loom deadlock.
        let mut b = loom::model::Builder::new();
        b.max_branches = 100_000;
        b.preemption_bound = Some(2);
        b.check(|| {
            let ec = Arc::new(EventCount::new());
            let tokens = Arc::new(AtomicU32::new(0));
            let waiters: Vec<_> = (0..2)
                .map(|_| {
                    let (ec, tokens) = (ec.clone(), tokens.clone());
                    loom::thread::spawn(move || {
                        wait_on(&ec, std::time::Duration::ZERO, None, || {
                            tokens
                                .fetch_update(Ordering::SeqCst, Ordering::SeqCst, |t| {
                                    t.checked_sub(1)
                                })
                                .is_ok()
                        })
                    })
                })
                .collect();
            let notifier = {
                let (ec, tokens) = (ec.clone(), tokens.clone());
                loom::thread::spawn(move || {
                    tokens.fetch_add(1, Ordering::SeqCst);
                    ec.notify_one();
                })
            };
            tokens.fetch_add(1, Ordering::SeqCst);
            ec.notify_one();
            notifier.join().unwrap();
            for w in waiters {
                assert!(w.join().unwrap());
            }
            assert_eq!(ec.sleepers(), 0);
        });
    }

    #[test]
    fn loom_eventcount_notify_all_is_not_skipped_for_a_stolen_wakeup() {
        // A (the main thread) and B wait for "my own flag, or a shared token". N1 adds a
        // token + notify_one. N2 takes a token if there is one (a third consumer), then sets
        // A's flag + notify_all. B is released by A once A has finished.
        let mut b = loom::model::Builder::new();
        b.max_branches = 1_000_000;
        b.preemption_bound = Some(
            std::env::var("EC_PB")
                .ok()
                .and_then(|v| v.parse().ok())
                .unwrap_or(3),
        );
        b.check(|| {
            let ec = Arc::new(EventCount::new());
            let tokens = Arc::new(AtomicU32::new(0));
            let flags = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
            fn take(t: &AtomicU32) -> bool {
                t.fetch_update(Ordering::SeqCst, Ordering::SeqCst, |x| x.checked_sub(1))
                    .is_ok()
            }
            let bw = {
                let (ec, tokens, flags) = (ec.clone(), tokens.clone(), flags.clone());
                loom::thread::spawn(move || {
                    wait_on(&ec, std::time::Duration::ZERO, None, || {
                        flags[1].load(Ordering::SeqCst) || take(&tokens)
                    })
                })
            };
            let n1 = {
                let (ec, tokens) = (ec.clone(), tokens.clone());
                loom::thread::spawn(move || {
                    tokens.fetch_add(1, Ordering::SeqCst);
                    ec.notify_one();
                })
            };
            let n2 = {
                let (ec, tokens, flags) = (ec.clone(), tokens.clone(), flags.clone());
                loom::thread::spawn(move || {
                    let _ = take(&tokens);
                    flags[0].store(true, Ordering::SeqCst);
                    ec.notify_all();
                })
            };
            assert!(wait_on(&ec, std::time::Duration::ZERO, None, || {
                flags[0].load(Ordering::SeqCst) || take(&tokens)
            }));
            flags[1].store(true, Ordering::SeqCst);
            ec.notify_all();
            n1.join().unwrap();
            n2.join().unwrap();
            assert!(bw.join().unwrap());
        });
    }

    #[test]
    fn loom_idle_consumers_polling_cells_miss_no_push() {
        // The worker's idle wait: spin on `has_ready` (one cell, never `tail`), then park on
        // the eventcount asking `is_empty`. Two producers (one of them this thread) push and
        // `notify_one`, two consumers take one value each. The futex model wakes exactly one
        // sleeper per `notify_one`, so a wake-up spent on a consumer that went back to sleep
        // (the second push completing before the first) is a loom deadlock. One preemption is
        // enough for that interleaving (a producer stopped between its `tail` CAS and its
        // stamp); four threads with two would take loom many minutes.
        let mut b = loom::model::Builder::new();
        b.max_branches = 100_000;
        b.preemption_bound = Some(1);
        b.check(|| {
            let q = Arc::new(HeapMpmc::with_capacity(2));
            let ec = Arc::new(EventCount::new());
            let consumers: Vec<_> = (0..2)
                .map(|_| {
                    let (q, ec) = (q.clone(), ec.clone());
                    loom::thread::spawn(move || {
                        let r = q.ring();
                        let (claim, current) = (AtomicU64::new(0), AtomicU32::new(u32::MAX));
                        loop {
                            // The worker's pop: `None` on a cell not filled yet, even if a
                            // later position is (it does not read `tail`).
                            if let Some(v) = r.pop_tracked(&claim, &current, || {}) {
                                return v;
                            }
                            // (The real worker's spin and pop are bounded in time; in the
                            // model, let the producers run.)
                            loom::thread::yield_now();
                            if !spin_until(std::time::Duration::ZERO, || r.has_ready()) {
                                wait_on(&ec, std::time::Duration::ZERO, None, || !r.is_empty());
                            }
                        }
                    })
                })
                .collect();
            // Both consumers idle first (a yield is not a preemption), so the one preemption
            // the model allows can stop a producer mid-push.
            while ec.sleepers() < 2 {
                loom::thread::yield_now();
            }
            let producer = {
                let (q, ec) = (q.clone(), ec.clone());
                loom::thread::spawn(move || {
                    q.ring().push(8).unwrap();
                    ec.notify_one();
                })
            };
            q.ring().push(7).unwrap();
            ec.notify_one();
            producer.join().unwrap();
            let mut got: Vec<u32> = consumers.into_iter().map(|c| c.join().unwrap()).collect();
            got.sort();
            assert_eq!(got, [7, 8]);
        });
    }

    #[test]
    fn loom_byte_ring_release_and_reuse() {
        model(|| {
            // 128 bytes: two 64-byte records fit, the third must wait for a release.
            let h = Arc::new(HeapByteRing::new(128));
            let (tx, rx) = loom::sync::mpsc::channel();
            let hp = h.clone();
            let producer = loom::thread::spawn(move || {
                let ring = hp.ring();
                for i in 0..3u32 {
                    let res = loop {
                        if let Some(r) = ring.try_reserve(20).unwrap() {
                            break r;
                        }
                        loom::thread::yield_now();
                    };
                    let off = ring.commit(res, 20, KIND_OK, i, i as u64);
                    tx.send(off).unwrap();
                }
            });
            let ring = h.ring();
            for _ in 0..3 {
                let off = rx.recv().unwrap();
                ring.release(off);
                ring.advance().unwrap();
            }
            producer.join().unwrap();
            assert_eq!(ring.used(), 0);
        });
    }
}
