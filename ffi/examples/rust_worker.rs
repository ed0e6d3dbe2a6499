//! A worker written in Rust for C hosts: its messages are bytes (`Vec<u8>`), the C ABI's, so a C
//! host can name this program as its pool's worker program (`sp_pool_options.program`). It
//! upper-cases each task's text.
//!
//! Built by `cargo build -p stateful-pool-ffi --example rust_worker`; run by
//! `ffi/examples/drive_rust_worker.c`.

use stateful_pool::{BoxError, TaskContext, Worker, WorkerContext};

struct Upper {
    name: String,
}

impl Worker for Upper {
    type SpawnArgs = Vec<u8>;
    type SpawnOutput = Vec<u8>;
    type Task = Vec<u8>;
    type Output = Vec<u8>;

    fn spawn(args: Vec<u8>, ctx: &WorkerContext) -> Result<(Self, Vec<u8>), BoxError> {
        let name = String::from_utf8(args)?;
        let hello = format!("rust worker {name} ready (seat {})", ctx.index());
        Ok((Upper { name }, hello.into_bytes()))
    }

    fn execute(
        &mut self,
        task: &rkyv::Archived<Vec<u8>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<u8>, BoxError> {
        let text = task.as_slice(); // read in place in shared memory
        if text.is_empty() {
            return Err(format!("worker {} got an empty task", self.name).into());
        }
        Ok(text.to_ascii_uppercase())
    }
}

fn main() {
    // Serve if a pool started this program; otherwise say what it is for.
    stateful_pool::serve::<Upper>();
    eprintln!(
        "rust_worker: a stateful-pool worker program; a pool starts it (see drive_rust_worker.c)"
    );
    std::process::exit(2);
}
