//! Entry points for the cargo-fuzz targets in `fuzz/` (feature `fuzzing`; not an API).
/// Feeds arbitrary bytes to the segment header check a worker runs before touching a
/// segment: it must never panic, and what it accepts must lie inside the mapping.
pub fn segment_header(data: &[u8]) {
    use crate::shm::layout::SegmentHeader;
    let n = size_of::<SegmentHeader>();
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    // SAFETY: SegmentHeader is plain integers and atomics, valid for any bytes.
    let mut h: SegmentHeader = unsafe { std::mem::zeroed() };
    let len = data.len().min(n);
    // SAFETY: copies at most `n` bytes into the header's own storage.
    unsafe {
        std::ptr::copy_nonoverlapping(data.as_ptr(), (&mut h as *mut SegmentHeader).cast(), len)
    };
    if mode & 1 == 0 {
        // Half the inputs get a correct magic and version, so the fuzzer spends its time on
        // the parameter and length checks behind them.
        h.magic = crate::shm::layout::MAGIC;
        h.version.store(
            crate::shm::layout::VERSION,
            std::sync::atomic::Ordering::Relaxed,
        );
    }
    let mapped = data.get(n..n + 8).map_or(1 << 20, |b| {
        u64::from_le_bytes(b.try_into().unwrap()) as usize
    });
    if let Ok(l) = h.check(mapped) {
        assert!(l.total <= mapped && l.arena <= l.total && l.result_rings <= l.arena);
    }
}

/// Feeds arbitrary bytes to archive validation for several task-like types (as a C host or
/// a mismatched binary could send): rejected or accepted, never undefined behaviour; what is
/// accepted deserialises.
pub fn archive(data: &[u8]) {
    let Some((&mode, data)) = data.split_first() else {
        return;
    };
    let mut aligned = rkyv::util::AlignedVec::<16>::with_capacity(data.len());
    if mode & 1 == 0 {
        // Half the inputs mutate a valid archive instead: the rest of the input is a list
        // of (position, xor) byte pairs applied to it, so the fuzzer explores archives
        // that get past the first checks.
        let sample: Vec<String> = vec![
            "short".into(),
            "a string long enough to be out of line".into(),
        ];
        let valid = rkyv::to_bytes::<rkyv::rancor::Error>(&sample).expect("serialises");
        aligned.extend_from_slice(&valid);
        for pair in data.chunks_exact(2) {
            let at = pair[0] as usize % aligned.len();
            aligned[at] ^= pair[1];
        }
    } else {
        aligned.extend_from_slice(data);
    }
    let b: &[u8] = &aligned;
    if crate::codec::access::<Vec<String>>(b).is_ok() {
        crate::codec::decode::<Vec<String>>(b).unwrap();
    }
    if crate::codec::access::<(u64, Option<Vec<u8>>)>(b).is_ok() {
        crate::codec::decode::<(u64, Option<Vec<u8>>)>(b).unwrap();
    }
    if crate::codec::access::<std::collections::HashMap<String, u32>>(b).is_ok() {
        crate::codec::decode::<std::collections::HashMap<String, u32>>(b).unwrap();
    }
}
