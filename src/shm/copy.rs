//! Copies into shared memory, with non-temporal stores for large ones.
//!
//! A large task or result is written once and then read by another process, usually after the
//! writer has moved on to other work. An ordinary copy first reads every destination line into
//! the writer's cache (the read for ownership) and then evicts older lines to make room; once
//! the copy is bigger than a fair share of the last-level cache, that costs more than the copy.
//! Non-temporal (streaming) stores write whole lines straight to memory without reading them.
//! On the development VM (AMD EPYC, 32 MiB L3), into rotating destinations as the task arena's
//! blocks are: 1 MiB, ordinary 24–32 GB/s against streaming 17–20 GB/s; 4 MiB, 13–15 against
//! 17–18; 16 MiB, 7–9 against 11–15 (BENCHMARKS.md, *W3: streaming copies*).
//!
//! So a copy of at least [`threshold`] bytes (an eighth of the L3 cache, 1–64 MiB;
//! `STATEFUL_POOL_STREAM_COPY_MIN` overrides it, `off` disables streaming) streams, and a
//! smaller one is a plain `memcpy`. Each process (the parent, each worker) decides once, at its
//! first copy of 1 MiB or more. Streaming needs x86-64 (AVX2 when the CPU has it, SSE2
//! otherwise); elsewhere, and under Miri, every copy is a plain one.
//!
//! Only copies into shared memory that another process reads later come here: an rkyv
//! archive's large `write`s (a byte vector or a string: rkyv writes those in one piece; other
//! containers may be written element by element, and then never stream),
//! `Loan::copy_from_slice`, and a result copied into the next stage's loan. A private buffer
//! this process reads next (a thread stage's task, spawn arguments on their way to the spawn
//! area) is written with a plain copy.
//!
//! Streaming stores are weakly ordered: they may become visible after a later ordinary store,
//! even a `Release` one. A streaming copy therefore ends with `sfence`, so whatever publishes the
//! bytes afterwards (a slot state, a ring record's header) still follows them.

use std::sync::OnceLock;

/// The environment variable that overrides the threshold: a byte count (`8388608`, `8M`,
/// `8192K`), or `off`.
pub(crate) const STREAM_MIN_ENV: &str = "STATEFUL_POOL_STREAM_COPY_MIN";

/// The threshold is never below this (and copies below it never look it up).
const FLOOR: usize = 1 << 20;

/// Nor above this.
const CEILING: usize = 64 << 20;

/// The threshold when the L3 size cannot be read: an eighth of a 32 MiB L3.
const FALLBACK: usize = 4 << 20;

/// Copies `src` to `dst`, streaming when `src` is at least [`threshold`] bytes long.
///
/// # Safety
/// `dst..dst + src.len()` must be valid for writes and must not overlap `src`.
#[inline]
pub(crate) unsafe fn copy_into(src: &[u8], dst: *mut u8) {
    // SAFETY: passed on from our caller (this function's contract); a slice is readable.
    unsafe { copy_raw(src.as_ptr(), src.len(), dst) }
}

/// [`copy_into`] from raw memory: for a source in shared memory that another process may be
/// writing meanwhile (a worker's result), which must not become a Rust reference.
///
/// # Safety
/// `src..src + len` must be readable (its contents may change under the copy: they are copied
/// as bytes, never interpreted) and `dst..dst + len` writable, not overlapping it.
#[inline]
pub(crate) unsafe fn copy_raw(src: *const u8, len: usize, dst: *mut u8) {
    // Every small task and result comes through here: its copy stays inline in the writer.
    if len < FLOOR {
        // SAFETY: passed on from our caller (this function's contract).
        unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
        return;
    }
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { copy_with(src, len, dst, len >= threshold()) }
}

/// The size from which copies stream (`usize::MAX` when streaming is off or unavailable).
pub(crate) fn threshold() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        if !cfg!(all(target_arch = "x86_64", not(miri))) {
            return usize::MAX;
        }
        std::env::var(STREAM_MIN_ENV)
            .ok()
            .and_then(|v| parse_override(&v))
            .unwrap_or_else(|| from_cache(l3_cache()))
    })
}

/// The threshold an override asks for: `off` (or `0`) is `usize::MAX` (never stream); a size
/// (`parse_size`'s forms) is taken as it is, but at least 1 MiB (below that streaming never
/// pays). `None` if malformed: the default applies then.
fn parse_override(v: &str) -> Option<usize> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Some(usize::MAX);
    }
    match parse_size(v)? {
        0 => Some(usize::MAX),
        n => Some(n.max(FLOOR)),
    }
}

/// The threshold for an L3 cache of `l3` bytes (`None`: unknown).
fn from_cache(l3: Option<usize>) -> usize {
    l3.map_or(FALLBACK, |c| (c / 8).clamp(FLOOR, CEILING))
}

/// The size of one instance of CPU 0's level-3 (or higher) data or unified cache, from sysfs
/// (`sysconf(_SC_LEVEL3_CACHE_SIZE)` reports a whole socket's L3 on some AMD parts, where each
/// core complex has its own). `None` where sysfs shows no such level (some VMs show only L1 and
/// L2: an L2-sized threshold would stream copies that stay in the L3).
fn l3_cache() -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for i in 0..16 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let Some(level) = read("level").and_then(|l| l.trim().parse::<u32>().ok()) else {
            continue;
        };
        if level < 3 || read("type").is_some_and(|t| t.trim() == "Instruction") {
            continue;
        }
        if let Some(size) = read("size").and_then(|s| parse_size(&s)) {
            if best.is_none_or(|(l, _)| level > l) {
                best = Some((level, size));
            }
        }
    }
    best.map(|(_, size)| size)
}

/// Parses a size: bytes, or with a `K`, `M` or `G` suffix (sysfs writes `32768K`).
fn parse_size(s: &str) -> Option<usize> {
    let s = s.trim();
    let (num, unit) = match s.as_bytes().last()? {
        b'K' | b'k' => (&s[..s.len() - 1], 1 << 10),
        b'M' | b'm' => (&s[..s.len() - 1], 1 << 20),
        b'G' | b'g' => (&s[..s.len() - 1], 1 << 30),
        _ => (s, 1),
    };
    num.parse::<usize>().ok()?.checked_mul(unit)
}

/// Copies `len` bytes from `src` to `dst`, with streaming stores if `stream` (and the target
/// has them).
///
/// # Safety
/// As for [`copy_raw`].
unsafe fn copy_with(src: *const u8, len: usize, dst: *mut u8, stream: bool) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if stream {
        // SAFETY: passed on from our caller (this function's contract).
        unsafe { x86::stream(src, len, dst, std::is_x86_feature_detected!("avx2")) };
        return;
    }
    let _ = stream;
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { std::ptr::copy_nonoverlapping(src, dst, len) };
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128, _mm256_loadu_si256,
        _mm256_stream_si256,
    };

    /// Bytes per loop iteration: two lines.
    const STEP: usize = 128;

    /// The streaming copy: an ordinary copy up to the first line (64-byte) boundary of `dst`,
    /// so that every streamed line is written whole; streaming stores of [`STEP`] bytes per
    /// iteration (AVX2 if `avx2`, else SSE2); an ordinary copy of the rest; `sfence`.
    ///
    /// # Safety
    /// `src..src + len` readable, `dst..dst + len` writable, not overlapping; if `avx2`, the
    /// CPU has AVX2.
    pub(super) unsafe fn stream(src: *const u8, len: usize, dst: *mut u8, avx2: bool) {
        let head = dst.align_offset(64).min(len);
        let body = (len - head) / STEP * STEP;
        // SAFETY: `head + body <= len`, so the three parts lie inside `src..src + len` and
        // `dst..dst + len`, which do not overlap (our caller's contract). The body's
        // destination `dst + head` is 64-aligned whenever `body > 0` (`align_offset` gave the
        // distance to the boundary, and `body > 0` means it was not cut to `len`), `body` is
        // a multiple of STEP, and `avx2` is only true where the CPU has AVX2 (our contract):
        // what `avx2_body` and `sse2_body` require.
        unsafe {
            std::ptr::copy_nonoverlapping(src, dst, head);
            if avx2 {
                avx2_body(src.add(head), dst.add(head), body);
            } else {
                sse2_body(src.add(head), dst.add(head), body);
            }
            let done = head + body;
            std::ptr::copy_nonoverlapping(src.add(done), dst.add(done), len - done);
            // Streaming stores are weakly ordered: make them visible before any later store
            // (the one that publishes these bytes to the reader).
            _mm_sfence();
        }
    }

    /// # Safety
    /// `src..src + len` readable, `dst..dst + len` writable, disjoint; `dst` 32-aligned if
    /// `len > 0`; `len` a multiple of [`STEP`]; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2_body(src: *const u8, dst: *mut u8, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: `i + STEP <= len` (len is a multiple of STEP), so every load reads inside
            // `src` and every store writes inside `dst`, at a 32-aligned address (`dst` is, and
            // `i` and the offsets are multiples of 32); unaligned loads need no alignment.
            unsafe {
                let p = src.add(i);
                let q = dst.add(i);
                let a = _mm256_loadu_si256(p.cast::<__m256i>());
                let b = _mm256_loadu_si256(p.add(32).cast::<__m256i>());
                let c = _mm256_loadu_si256(p.add(64).cast::<__m256i>());
                let d = _mm256_loadu_si256(p.add(96).cast::<__m256i>());
                _mm256_stream_si256(q.cast::<__m256i>(), a);
                _mm256_stream_si256(q.add(32).cast::<__m256i>(), b);
                _mm256_stream_si256(q.add(64).cast::<__m256i>(), c);
                _mm256_stream_si256(q.add(96).cast::<__m256i>(), d);
            }
            i += STEP;
        }
    }

    /// # Safety
    /// As for [`avx2_body`], with `dst` 16-aligned and no AVX2 needed (SSE2 is part of x86-64).
    unsafe fn sse2_body(src: *const u8, dst: *mut u8, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: as in `avx2_body`: in bounds, every store 16-aligned.
            unsafe {
                let p = src.add(i);
                let q = dst.add(i);
                for k in (0..STEP).step_by(16) {
                    let v = _mm_loadu_si128(p.add(k).cast::<__m128i>());
                    _mm_stream_si128(q.add(k).cast::<__m128i>(), v);
                }
            }
            i += STEP;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Copies `src` into a fresh buffer at `mis` bytes past a 64-byte boundary with `copy`,
    /// and checks the copy and that the bytes around it are untouched.
    fn check(src: &[u8], mis: usize, copy: impl Fn(*const u8, usize, *mut u8)) {
        let len = src.len();
        let mut buf = vec![0xAAu8; len + 128];
        let base = buf.as_mut_ptr().align_offset(64);
        let start = base + mis;
        copy(src.as_ptr(), len, buf[start..].as_mut_ptr());
        assert_eq!(&buf[start..start + len], src, "len {len} mis {mis}");
        assert!(buf[..start].iter().all(|&b| b == 0xAA));
        assert!(buf[start + len..].iter().all(|&b| b == 0xAA));
    }

    /// Every length and destination misalignment around the step and the line gives an exact
    /// copy, with the bytes around the destination untouched: plain, streaming with AVX2 where
    /// the CPU has it, and streaming with SSE2.
    #[test]
    fn copies_are_exact_for_any_length_and_alignment() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for len in (0..300).chain([1000, 4096, 4999]) {
            for mis in 0..64 {
                for stream in [false, true] {
                    // SAFETY: `check` hands a destination with `len` writable bytes, apart
                    // from the source.
                    check(&src[..len], mis, |s, n, d| unsafe {
                        copy_with(s, n, d, stream)
                    });
                }
                #[cfg(all(target_arch = "x86_64", not(miri)))]
                // SAFETY: as above; SSE2 is part of x86-64, so `avx2 = false` needs nothing.
                check(&src[..len], mis, |s, n, d| unsafe {
                    x86::stream(s, n, d, false)
                });
            }
        }
    }

    #[test]
    fn thresholds_come_from_the_l3_or_the_override() {
        assert_eq!(from_cache(Some(32 << 20)), 4 << 20);
        assert_eq!(from_cache(Some(2 << 20)), FLOOR);
        assert_eq!(from_cache(Some(4 << 30)), CEILING);
        assert_eq!(from_cache(None), FALLBACK);
        assert_eq!(parse_size("32768K\n"), Some(32 << 20));
        assert_eq!(parse_size("32M"), Some(32 << 20));
        assert_eq!(parse_size("512"), Some(512));
        assert_eq!(parse_size("K"), None);
        assert_eq!(parse_size("x"), None);
        assert_eq!(parse_override("off"), Some(usize::MAX));
        assert_eq!(parse_override("OFF "), Some(usize::MAX));
        assert_eq!(parse_override("0"), Some(usize::MAX));
        assert_eq!(parse_override(" 8388608 "), Some(8 << 20));
        assert_eq!(parse_override("8M"), Some(8 << 20));
        assert_eq!(parse_override("8192k"), Some(8 << 20));
        assert_eq!(parse_override("1"), Some(FLOOR));
        assert_eq!(parse_override("lots"), None);
        // This machine's answer (the sysfs read itself) is a sane one.
        if std::env::var(STREAM_MIN_ENV).is_err() && cfg!(target_arch = "x86_64") {
            assert!((FLOOR..=CEILING).contains(&threshold()));
        }
    }
}
