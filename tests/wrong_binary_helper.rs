//! Not a test of its own: a program that links this library and calls `stateful_pool::init()`,
//! but is another binary than `tests/hygiene.rs`, which points a pool at it and expects the
//! worker to refuse to start (exit code 121). Run directly (as `cargo test` does), it does
//! nothing.

fn main() {
    stateful_pool::init();
}
