//! Tasks and results that are plain numbers (`u8`…`u64`, `i8`…`i64`, `f32`, `f64`) skip rkyv's
//! serialiser and validator (`codec::plain`). They must arrive exactly as through rkyv: every
//! width, the extreme values, negative zero and NaN payloads, from every verb, in batches and
//! maps, and under the same size limit.

mod common;

use common::watchdog;
use stateful_pool::{FnWorker, Pool, SubmitError, TaskError};

stateful_pool::worker_hook!();

stateful_pool::task_fn! {
    /// An `f64`'s bits, and the number back: checks both directions bit for bit.
    fn F64Bits(x: f64) -> u64 {
        Ok(x.to_native().to_bits())
    }
}

stateful_pool::task_fn! {
    /// The `f32` with these bits, negated.
    fn NegF32(bits: u32) -> f32 {
        Ok(-f32::from_bits(bits.to_native()))
    }
}

stateful_pool::task_fn! {
    /// A byte, widened and negated.
    fn NegU8(x: u8) -> i16 {
        Ok(-(*x as i16))
    }
}

stateful_pool::task_fn! {
    /// An `i32` reinterpreted as a `u32`.
    fn I32AsU32(x: i32) -> u32 {
        Ok(x.to_native() as u32)
    }
}

stateful_pool::task_fn! {
    /// An `i64` minus one, wrapping, as an `i8` (its low byte).
    fn I64LowByte(x: i64) -> i8 {
        Ok(x.to_native().wrapping_sub(1) as i8)
    }
}

stateful_pool::task_fn! {
    /// A `u16` as an `f64`.
    fn U16AsF64(x: u16) -> f64 {
        Ok(x.to_native() as f64)
    }
}

fn pool<F: stateful_pool::TaskFn>() -> Pool<FnWorker<F>> {
    let pool = Pool::<FnWorker<F>>::builder().build().unwrap();
    pool.spawn(&()).unwrap();
    pool
}

#[test]
fn every_width_crosses_bit_for_bit_both_ways() {
    watchdog(120, || {
        let p = pool::<F64Bits>();
        let specials = [
            0.0,
            -0.0,
            1.5,
            f64::MIN_POSITIVE,
            f64::MAX,
            f64::NEG_INFINITY,
            f64::NAN,
            f64::from_bits(0x7ff8_dead_beef_0001), // a NaN with a payload
        ];
        for x in specials {
            assert_eq!(p.execute(&x).unwrap(), x.to_bits(), "{x:?}");
        }

        let p = pool::<NegF32>();
        for bits in [0u32, 0x8000_0000, 0x3fc0_0000, 0x7f80_0000, 0x7fc0_1234] {
            let want = (-f32::from_bits(bits)).to_bits();
            assert_eq!(p.execute(&bits).unwrap().to_bits(), want, "{bits:#x}");
        }

        let p = pool::<NegU8>();
        for x in [0u8, 1, 0x7f, 0x80, 0xff] {
            assert_eq!(p.execute(&x).unwrap(), -(x as i16));
        }

        let p = pool::<I32AsU32>();
        for x in [0i32, -1, i32::MIN, i32::MAX, 0x1234_5678] {
            assert_eq!(p.execute(&x).unwrap(), x as u32);
        }

        let p = pool::<I64LowByte>();
        for x in [0i64, i64::MIN, i64::MAX, 0x1_0000_0081] {
            assert_eq!(p.execute(&x).unwrap(), x.wrapping_sub(1) as i8);
        }

        let p = pool::<U16AsF64>();
        for x in [0u16, 1, u16::MAX] {
            assert_eq!(p.execute(&x).unwrap(), x as f64);
        }
    });
}

#[test]
fn plain_tasks_through_every_verb_batches_and_maps() {
    watchdog(120, || {
        let p = pool::<I32AsU32>();
        assert_eq!(p.submit(&-2).unwrap().wait().unwrap(), (-2i32) as u32);
        assert_eq!(p.try_submit(&7).unwrap().wait().unwrap(), 7);
        assert_eq!(p.task(&-3).retries(1).execute().unwrap(), (-3i32) as u32);
        assert_eq!(futures_executor::block_on(p.execute_async(&9)).unwrap(), 9);
        let r = p.submit(&5).unwrap().wait_ref().unwrap();
        assert_eq!(r.to_native(), 5);
        assert_eq!(p.broadcast(&4)[0].1, Ok(4));
        // A batch travels as one archive of a `Vec` (rkyv's path); its outputs are read back
        // the same way. Maps submit each element as a task of its own.
        let outs = p.batch(&[1, -1, i32::MIN]).execute().unwrap();
        let outs: Vec<u32> = outs.into_iter().map(Result::unwrap).collect();
        assert_eq!(outs, [1, u32::MAX, 0x8000_0000]);
        let mapped: Vec<u32> = p.map(-50..50).map(Result::unwrap).collect();
        let want: Vec<u32> = (-50..50).map(|x: i32| x as u32).collect();
        assert_eq!(mapped, want);
    });
}

/// A pool of one `F` worker with `queue` slots and tasks of at most `max` bytes.
fn limited<F: stateful_pool::TaskFn>(queue: usize, max: usize) -> Pool<FnWorker<F>> {
    let pool = Pool::<FnWorker<F>>::builder()
        .queue_size(queue)
        .max_task_bytes(max)
        .build()
        .unwrap();
    pool.spawn(&()).unwrap();
    pool
}

#[test]
fn a_plain_task_over_max_task_bytes_is_refused_and_the_slot_serves_on() {
    watchdog(60, || {
        // Two slots, eight refusals: a refusal that kept its slot would leave the next submits
        // with none (`try_submit` would say `QueueFull`, `execute` would wait for ever).
        let p = limited::<F64Bits>(2, 4);
        for _ in 0..4 {
            assert!(
                matches!(
                    p.execute(&1.0),
                    Err(TaskError::Submit(SubmitError::PayloadTooLarge {
                        len: 8,
                        max: 4
                    }))
                ),
                "an f64 archive is 8 bytes"
            );
            let r = p.try_submit(&2.0).map(drop);
            assert!(
                matches!(r, Err(SubmitError::PayloadTooLarge { len: 8, max: 4 })),
                "{r:?}"
            );
        }
        // A 4-byte task fits the same limit, lap after lap in one slot.
        let q = limited::<NegF32>(1, 4);
        for _ in 0..3 {
            assert_eq!(q.execute(&0x3fc0_0000).unwrap(), -1.5);
        }
    });
}
