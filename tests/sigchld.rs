//! A process that ignores SIGCHLD cannot build a pool (its children would be reaped behind its
//! back, and a worker's pid could be reused before the pool looks at it). Alone in its own
//! test binary: it changes a process-wide signal disposition.

stateful_pool::worker_hook!();

mod common;

use common::*;
use stateful_pool::{BuildError, Pool};

#[test]
fn a_pool_refuses_to_build_where_sigchld_is_ignored() {
    // SAFETY: sets SIGCHLD's disposition for this test process (nothing else runs here).
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_IGN) };
    match Pool::<TestWorker>::builder().build() {
        Err(BuildError::InvalidConfig(m)) => assert!(m.contains("SIGCHLD"), "{m}"),
        other => panic!("expected InvalidConfig, got {:?}", other.map(|_| ())),
    }
    // SAFETY: as above, back to the default.
    unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let pool = Pool::<TestWorker>::builder().build().unwrap();
    pool.spawn(&Spawn::ok("ok")).unwrap();
    assert_eq!(pool.execute(&Cmd::Echo(1)).unwrap().value, 1);
}
