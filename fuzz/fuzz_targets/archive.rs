//! Arbitrary bytes as task archives (what a C host or a mismatched binary could send):
//! validation rejects them or they decode; never undefined behaviour.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stateful_pool::__fuzz::archive(data);
});
