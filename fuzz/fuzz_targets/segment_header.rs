//! Arbitrary bytes as a segment header (what a worker maps before trusting anything): the
//! check must refuse or accept without panicking, and what it accepts must fit the mapping.
#![no_main]
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    stateful_pool::__fuzz::segment_header(data);
});
