//! Plain numbers archived and read without rkyv's serialiser and validator.
//!
//! A task or a result that is one integer or float (`u8`…`u64`, `i8`…`i64`, `f32`, `f64`) has
//! an archive that is just that number in rkyv's archived type (`Archived<u64>`: its byte
//! order and alignment, whatever rkyv's features say), and every bit pattern of it is valid.
//! rkyv's generic path still sets up a serialiser (arena, sharing map) or a validator
//! (subtree ranges, sharing map) for it: ≈ 100–145 instructions each time, four times per
//! round trip, about a third of a tiny task's code (BENCHMARKS.md, *W1: instructions per
//! round trip*). Here the type is recognised by its `TypeId` (a comparison the compiler folds
//! away in each instance, so other types pay nothing), the archive is written by rkyv's own
//! `Archive::resolve`, and the read checks exactly what rkyv's `access` checks for such a
//! root: the length and the alignment of the last `size_of` bytes.
//!
//! The bytes are rkyv's, byte for byte, and the reads accept exactly what rkyv accepts
//! (unit tests below compare both for every type, at every length and misalignment), so a
//! worker and a caller may use either path for the same archive.

use rkyv::rancor::{BoxedError, Strategy};
use rkyv::{Archive, Archived, Deserialize, Place};
use std::any::TypeId;
use std::mem::{MaybeUninit, align_of, size_of};

/// A plain number's archive: at most 8 bytes, the header word a tiny task or result travels
/// in.
#[derive(Debug, Clone, Copy)]
pub struct Word {
    /// The archive, in its first `len` bytes (zeros after).
    pub bytes: [u8; 8],
    /// The archive's length.
    pub len: usize,
}

/// Runs `$body` with the type `$t` standing for `T` if `T` is one of the plain numbers (and
/// returns its value from the enclosing function); evaluates to `None` otherwise.
macro_rules! for_plain {
    ($T:ty, |$t:ident| $body:block) => {{
        for_plain!(@each $T, $t, $body, u8, u16, u32, u64, i8, i16, i32, i64, f32, f64);
        None
    }};
    (@each $T:ty, $t:ident, $body:block, $($ty:ty),*) => {
        $(
            if TypeId::of::<$T>() == TypeId::of::<$ty>() {
                #[allow(dead_code)]
                type $t = $ty;
                return $body;
            }
        )*
    };
}

/// `value`'s archive if `T` is a plain number: the bytes rkyv would write at the start of an
/// aligned buffer.
#[inline(always)]
pub(crate) fn archive<T: 'static>(value: &T) -> Option<Word> {
    for_plain!(T, |P| {
        // SAFETY: `T` is `P` (their `TypeId`s are equal), so the reference is to a `P`.
        let v: &P = unsafe { &*(value as *const T).cast::<P>() };
        Some(resolve(v))
    })
}

/// rkyv's archive of one plain number `v` (its resolver is `()`).
#[inline(always)]
fn resolve<P: Archive<Resolver = ()>>(v: &P) -> Word {
    // The word holds it: true of every type `for_plain!` lists, under every rkyv feature.
    const { assert!(size_of::<P::Archived>() <= 8) };
    let mut out = MaybeUninit::<P::Archived>::zeroed();
    // SAFETY: `out` is aligned for `P::Archived`, dereferenceable, and all its bytes are
    // initialised (zeroed), as `Place::new_unchecked` requires; position 0 is where the root
    // of an archive of one primitive goes (no padding before it, nothing after).
    let place = unsafe { Place::new_unchecked(0, out.as_mut_ptr()) };
    v.resolve((), place);
    let len = size_of::<P::Archived>();
    let mut bytes = [0u8; 8];
    // SAFETY: `len <= 8` (asserted at compile time above); `out` holds `len` initialised
    // bytes, and `bytes` is ours.
    unsafe { std::ptr::copy_nonoverlapping(out.as_ptr().cast::<u8>(), bytes.as_mut_ptr(), len) };
    Word { bytes, len }
}

/// The archived number at the end of `bytes` if `T` is a plain number and rkyv would accept
/// `bytes` as its archive (at least `size_of` bytes, the root aligned); `None` otherwise, and
/// the caller asks rkyv (which then reports the error, or handles another type).
#[inline(always)]
pub(crate) fn access<T: Archive + 'static>(bytes: &[u8]) -> Option<&T::Archived> {
    for_plain!(T, |P| {
        let size = size_of::<T::Archived>();
        let pos = bytes.len().checked_sub(size)?;
        // SAFETY: `pos + size == bytes.len()`: in bounds.
        let ptr = unsafe { bytes.as_ptr().add(pos) };
        if ptr.addr() % align_of::<T::Archived>() != 0 {
            return None;
        }
        // SAFETY: `T` is a plain number, so `T::Archived` is its archived form (an integer or
        // a float in rkyv's byte order), for which every bit pattern is valid; `size` bytes
        // from `ptr` lie inside `bytes`, aligned (checked above), and the reference borrows
        // `bytes`.
        Some(unsafe { &*ptr.cast::<T::Archived>() })
    })
}

/// The plain number archived in `bytes`, as [`access`] reads it, deserialised.
#[inline(always)]
pub(crate) fn decode<T: Archive + 'static>(bytes: &[u8]) -> Option<T> {
    for_plain!(T, |P| {
        let a = access::<T>(bytes)?;
        // SAFETY: `T` is `P`, so `T::Archived` is `P::Archived`.
        let a: &Archived<P> = unsafe { &*(a as *const T::Archived).cast::<Archived<P>>() };
        // A primitive deserialises with any deserialiser and cannot fail.
        let v: P =
            Deserialize::<P, Strategy<(), BoxedError>>::deserialize(a, Strategy::wrap(&mut ()))
                .ok()?;
        // SAFETY: `P` is `T`; `v` is moved out exactly once.
        Some(unsafe { std::mem::transmute_copy::<P, T>(&v) })
    })
}

#[cfg(all(test, not(stateful_pool_loom)))]
mod tests {
    use super::*;
    use crate::codec::Message;
    use rkyv::util::AlignedVec;

    /// rkyv's own archive of `v` (the generic path this module stands in for).
    fn rkyv_bytes<T: Message>(v: &T) -> AlignedVec<16> {
        crate::codec::encode_owned(v).unwrap()
    }

    fn check<T: Message + Copy + std::fmt::Debug>(values: &[T]) {
        for v in values {
            let w = archive(v).expect("a plain number");
            let theirs = rkyv_bytes(v);
            assert_eq!(&w.bytes[..w.len], &theirs[..], "archive of {v:?}");
            assert!(w.bytes[w.len..].iter().all(|&b| b == 0));
            // Every length and misalignment around it: the fast read accepts exactly what
            // rkyv accepts, and reads the same number.
            let mut buf = AlignedVec::<16>::with_capacity(64);
            buf.resize(64, 0xA5);
            // (Fewer under Miri, which runs this module's unsafe reads far slower.)
            let (starts, lens) = if cfg!(miri) {
                (0..3, 7..=9usize)
            } else {
                (0..16, 0..=24usize)
            };
            for start in starts {
                for len in lens.clone() {
                    buf[start + len.saturating_sub(w.len)..start + len]
                        .copy_from_slice(&w.bytes[..w.len.min(len)]);
                    let bytes = &buf[start..start + len];
                    let fast = access::<T>(bytes);
                    let slow = rkyv::access::<T::Archived, BoxedError>(bytes).ok();
                    let at = |a: Option<&T::Archived>| a.map(|a| a as *const T::Archived);
                    assert_eq!(at(fast), at(slow), "{v:?}, offset {start}, length {len}");
                    if let Some(a) = fast {
                        let d = decode::<T>(bytes).unwrap();
                        let r: T = rkyv::deserialize::<T, BoxedError>(a).unwrap();
                        // Compared as bits (a NaN is not equal to itself).
                        let bits = |x: &T| archive(x).unwrap().bytes;
                        assert_eq!(bits(&d), bits(&r), "{d:?} vs {r:?}");
                        assert_eq!(bits(&d), bits(v));
                    } else {
                        assert!(decode::<T>(bytes).is_none());
                    }
                }
            }
        }
    }

    #[test]
    fn plain_numbers_archive_and_read_exactly_as_rkyv() {
        check(&[0u8, 1, 0x7f, 0xff]);
        check(&[0u16, 1, 0x1234, u16::MAX]);
        check(&[0u32, 1, 0x1234_5678, u32::MAX]);
        check(&[0u64, 1, 0x0102_0304_0506_0708, u64::MAX]);
        check(&[0i8, -1, i8::MIN, i8::MAX]);
        check(&[0i16, -1, i16::MIN, i16::MAX]);
        check(&[0i32, -1, i32::MIN, i32::MAX]);
        check(&[0i64, -1, i64::MIN, i64::MAX]);
        check(&[
            0.0f32,
            -0.0,
            1.5,
            f32::MIN_POSITIVE,
            f32::INFINITY,
            f32::NAN,
        ]);
        check(&[
            0.0f64,
            -0.0,
            1.5,
            f64::MIN_POSITIVE,
            f64::NEG_INFINITY,
            f64::NAN,
        ]);
    }

    #[test]
    fn other_types_take_rkyvs_path() {
        assert!(archive(&true).is_none());
        assert!(archive(&'x').is_none());
        assert!(archive(&7usize).is_none());
        assert!(archive(&-7isize).is_none());
        assert!(archive(&7u128).is_none());
        assert!(archive(&-7i128).is_none());
        assert!(archive(&std::num::NonZeroU64::new(7).unwrap()).is_none());
        assert!(archive(&Some(7u64)).is_none());
        assert!(archive(&(1u32, 2u32)).is_none());
        assert!(archive(&String::from("hi")).is_none());
        assert!(access::<bool>(&[1]).is_none());
        assert!(decode::<char>(&[0, 0, 0, 0]).is_none());
    }
}
