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
//! So a copy of at least [`threshold`] bytes (an eighth of the last-level cache, 1–64 MiB;
//! `STATEFUL_POOL_STREAM_COPY_MIN` overrides it, `off` disables streaming) streams, and a
//! smaller one is a plain `memcpy`. Streaming needs x86-64 (AVX2 when the CPU has it, SSE2
//! otherwise); elsewhere, and under Miri, every copy is a plain one.
//!
//! Streaming stores are weakly ordered: they may become visible after a later ordinary store,
//! even a `Release` one. A streaming copy therefore ends with `sfence`, so whatever publishes the
//! bytes afterwards (a slot state, a ring record's header) still follows them.

use std::sync::OnceLock;

/// The environment variable that overrides the threshold: a byte count, or `off`.
pub(crate) const STREAM_MIN_ENV: &str = "STATEFUL_POOL_STREAM_COPY_MIN";

/// The threshold is never below this (and copies below it never look it up).
const FLOOR: usize = 1 << 20;

/// Nor above this.
const CEILING: usize = 64 << 20;

/// The threshold when the cache size cannot be read: an eighth of a 32 MiB L3.
const FALLBACK: usize = 4 << 20;

/// Copies `src` to `dst`, streaming when `src` is at least [`threshold`] bytes long.
///
/// # Safety
/// `dst..dst + src.len()` must be valid for writes and must not overlap `src`.
pub(crate) unsafe fn copy_into(src: &[u8], dst: *mut u8) {
    let stream = src.len() >= FLOOR && src.len() >= threshold();
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { copy_with(src, dst, stream) }
}

/// The size from which copies stream (`usize::MAX` when streaming is off or unavailable).
pub(crate) fn threshold() -> usize {
    static T: OnceLock<usize> = OnceLock::new();
    *T.get_or_init(|| {
        if !cfg!(all(target_arch = "x86_64", not(miri))) {
            return usize::MAX;
        }
        match std::env::var(STREAM_MIN_ENV) {
            Ok(v) => parse_override(&v).unwrap_or_else(|| from_cache(last_level_cache())),
            Err(_) => from_cache(last_level_cache()),
        }
    })
}

/// The threshold an override asks for: `off` (or `0`) is `usize::MAX` (never stream); a byte
/// count is taken as it is, but at least 1 MiB (below that streaming never pays). `None` if
/// malformed (the default applies then).
fn parse_override(v: &str) -> Option<usize> {
    let v = v.trim();
    if v.eq_ignore_ascii_case("off") {
        return Some(usize::MAX);
    }
    match v.parse::<usize>().ok()? {
        0 => Some(usize::MAX),
        n => Some(n.max(FLOOR)),
    }
}

/// The threshold for a last-level cache of `llc` bytes (`None`: unknown).
fn from_cache(llc: Option<usize>) -> usize {
    llc.map_or(FALLBACK, |c| (c / 8).clamp(FLOOR, CEILING))
}

/// The size of one instance of the highest-level data or unified cache of CPU 0, from sysfs
/// (`sysconf(_SC_LEVEL3_CACHE_SIZE)` reports a whole socket's L3 on some AMD parts, where
/// each core complex has its own).
fn last_level_cache() -> Option<usize> {
    let mut best: Option<(u32, usize)> = None;
    for i in 0..16 {
        let dir = format!("/sys/devices/system/cpu/cpu0/cache/index{i}");
        let read = |f: &str| std::fs::read_to_string(format!("{dir}/{f}")).ok();
        let Some(level) = read("level").and_then(|l| l.trim().parse::<u32>().ok()) else {
            continue;
        };
        if read("type").is_some_and(|t| t.trim() == "Instruction") {
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

/// Parses sysfs's cache size (`32768K`, `32M`, `512`).
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

/// Copies `src` to `dst`, with streaming stores if `stream` (and the target has them).
///
/// # Safety
/// As for [`copy_into`].
unsafe fn copy_with(src: &[u8], dst: *mut u8, stream: bool) {
    #[cfg(all(target_arch = "x86_64", not(miri)))]
    if stream {
        // SAFETY: passed on from our caller (this function's contract).
        unsafe { x86::stream(src, dst) };
        return;
    }
    let _ = stream;
    // SAFETY: passed on from our caller (this function's contract).
    unsafe { std::ptr::copy_nonoverlapping(src.as_ptr(), dst, src.len()) };
}

#[cfg(all(target_arch = "x86_64", not(miri)))]
mod x86 {
    use std::arch::x86_64::{
        __m128i, __m256i, _mm_loadu_si128, _mm_sfence, _mm_stream_si128, _mm256_loadu_si256,
        _mm256_stream_si256,
    };

    /// Bytes per loop iteration: two lines.
    const STEP: usize = 128;

    /// The streaming copy: an ordinary copy up to the first 32-byte boundary of `dst`, then
    /// streaming stores of 128 bytes per iteration, an ordinary copy of the rest, and `sfence`.
    ///
    /// # Safety
    /// `dst..dst + src.len()` is valid for writes and does not overlap `src`.
    pub(super) unsafe fn stream(src: &[u8], dst: *mut u8) {
        let len = src.len();
        let head = dst.align_offset(32).min(len);
        let body = (len - head) / STEP * STEP;
        let s = src.as_ptr();
        // SAFETY: `head + body <= len`, so both parts lie inside `src` and inside the `dst`
        // region our caller vouches for; they do not overlap (our caller's contract).
        unsafe {
            std::ptr::copy_nonoverlapping(s, dst, head);
            if std::is_x86_feature_detected!("avx2") {
                avx2(s.add(head), dst.add(head), body);
            } else {
                sse2(s.add(head), dst.add(head), body);
            }
            std::ptr::copy_nonoverlapping(
                s.add(head + body),
                dst.add(head + body),
                len - head - body,
            );
            // Streaming stores are weakly ordered: make them visible before any later store
            // (the one that publishes these bytes to the reader).
            _mm_sfence();
        }
    }

    /// # Safety
    /// `src..src + len` readable, `dst..dst + len` writable, disjoint; `dst` 32-aligned; `len`
    /// a multiple of [`STEP`]; the CPU has AVX2.
    #[target_feature(enable = "avx2")]
    unsafe fn avx2(src: *const u8, dst: *mut u8, len: usize) {
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
    /// As for [`avx2`], less the AVX2 requirement (SSE2 is part of x86-64).
    pub(super) unsafe fn sse2(src: *const u8, dst: *mut u8, len: usize) {
        let mut i = 0;
        while i < len {
            // SAFETY: as in `avx2`: in bounds, stores 16-aligned (`dst` is 32-aligned).
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

    /// Every length and destination misalignment around the step gives an exact copy, with
    /// the bytes around the destination untouched, streaming or not.
    #[test]
    fn copies_are_exact_for_any_length_and_alignment() {
        let src: Vec<u8> = (0..5000u32).map(|i| (i * 7 + 3) as u8).collect();
        for stream in [false, true] {
            for len in (0..300).chain([1000, 4096, 4999]) {
                for mis in 0..40 {
                    let mut buf = vec![0xAAu8; len + 128];
                    let base = buf.as_mut_ptr().align_offset(64);
                    let start = (base + mis).min(buf.len() - len);
                    // SAFETY: `start + len <= buf.len()`; `src` is a separate vector.
                    unsafe { copy_with(&src[..len], buf.as_mut_ptr().add(start), stream) };
                    assert_eq!(&buf[start..start + len], &src[..len], "len {len} mis {mis}");
                    assert!(buf[..start].iter().all(|&b| b == 0xAA));
                    assert!(buf[start + len..].iter().all(|&b| b == 0xAA));
                }
            }
        }
    }

    #[cfg(all(target_arch = "x86_64", not(miri)))]
    #[test]
    fn the_sse2_body_copies_exactly() {
        let src: Vec<u8> = (0..1024u32).map(|i| (i * 13) as u8).collect();
        let mut buf = vec![0u8; 1024 + 64];
        let off = buf.as_mut_ptr().align_offset(32);
        // SAFETY: 32-aligned destination of 1024 bytes inside `buf`; 1024 is a multiple of the
        // step; SSE2 is part of x86-64.
        unsafe {
            x86::sse2(src.as_ptr(), buf.as_mut_ptr().add(off), 1024);
            std::arch::x86_64::_mm_sfence();
        }
        assert_eq!(&buf[off..off + 1024], &src[..]);
    }

    #[test]
    fn thresholds_come_from_the_cache_or_the_override() {
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
        assert_eq!(parse_override("0"), Some(usize::MAX));
        assert_eq!(parse_override(" 8388608 "), Some(8 << 20));
        assert_eq!(parse_override("1"), Some(FLOOR));
        assert_eq!(parse_override("lots"), None);
        // This machine's answer is a sane one (the sysfs read itself).
        let t = threshold();
        assert!(
            t == usize::MAX
                || (FLOOR..=CEILING).contains(&t)
                || std::env::var(STREAM_MIN_ENV).is_ok()
        );
    }
}
