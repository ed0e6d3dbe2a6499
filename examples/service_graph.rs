//! A service graph in the seed's shape, `W1 → ensemble(W2, seq(W3, W4)) → combine`, with real
//! work, behind a server: calls from many threads, a stream, a deadline, stats, shutdown.
//!
//! - W1 `Tokenize` (threads): splits a document into lower-case word hashes.
//! - W2 `Stats` (processes): word count, distinct words, mean word-hash bucket.
//! - W3 `Embed` (processes, pinned to CPU 0 when allowed): a 64-dimensional hashed bag of
//!   words; its output goes to W4 archived, without a copy through this process's heap.
//! - W4 `Normalize` (processes): L2-normalises the embedding and reports its top dimensions.
//! - `combine` (local): joins both branches into a summary line.
//!
//! Run: `cargo run --release --example service_graph`
use rkyv::Archived;
use stateful_pool::service::{Process, Server, Threads, ensemble, local, seq};
use stateful_pool::{BoxError, Pool, SpawnOptions, TaskContext, Worker, WorkerContext};
use std::sync::Arc;
use std::time::Duration;

fn hash(w: &str) -> u32 {
    // FNV-1a.
    w.bytes().fold(0x811c9dc5u32, |h, b| {
        (h ^ b as u32).wrapping_mul(0x01000193)
    })
}

struct Tokenize;
impl Worker for Tokenize {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = String;
    type Output = Vec<u32>;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Tokenize, ()))
    }
    fn execute(
        &mut self,
        doc: &Archived<String>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<u32>, BoxError> {
        let words: Vec<u32> = doc
            .split(|c: char| !c.is_alphanumeric())
            .filter(|w| !w.is_empty())
            .map(|w| hash(&w.to_lowercase()))
            .collect();
        if words.is_empty() {
            return Err("empty document".into());
        }
        Ok(words)
    }
}

struct Stats;
impl Worker for Stats {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Vec<u32>;
    type Output = (u32, u32, f64);
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Stats, ()))
    }
    fn execute(
        &mut self,
        w: &Archived<Vec<u32>>,
        _: &TaskContext<'_>,
    ) -> Result<(u32, u32, f64), BoxError> {
        let mut v: Vec<u32> = w.iter().map(|x| x.to_native()).collect();
        let n = v.len() as u32;
        let mean = v.iter().map(|&x| (x % 1000) as f64).sum::<f64>() / n as f64;
        v.sort_unstable();
        v.dedup();
        Ok((n, v.len() as u32, mean))
    }
}

const DIM: usize = 64;

struct Embed;
impl Worker for Embed {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Vec<u32>;
    type Output = Vec<f32>;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Embed, ()))
    }
    fn execute(
        &mut self,
        w: &Archived<Vec<u32>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<f32>, BoxError> {
        let mut e = vec![0f32; DIM];
        for h in w.iter() {
            let h = h.to_native();
            let sign = if h & 0x8000_0000 != 0 { -1.0 } else { 1.0 };
            e[(h as usize) % DIM] += sign;
        }
        Ok(e)
    }
}

struct Normalize;
impl Worker for Normalize {
    type SpawnArgs = ();
    type SpawnOutput = ();
    type Task = Vec<f32>;
    type Output = Vec<(u32, f32)>;
    fn spawn(_: (), _: &WorkerContext) -> Result<(Self, ()), BoxError> {
        Ok((Normalize, ()))
    }
    fn execute(
        &mut self,
        e: &Archived<Vec<f32>>,
        _: &TaskContext<'_>,
    ) -> Result<Vec<(u32, f32)>, BoxError> {
        let norm = e
            .iter()
            .map(|x| x.to_native().powi(2))
            .sum::<f32>()
            .sqrt()
            .max(1e-9);
        let mut top: Vec<(u32, f32)> = e
            .iter()
            .enumerate()
            .map(|(i, x)| (i as u32, x.to_native() / norm))
            .collect();
        top.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
        top.truncate(3);
        Ok(top)
    }
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    stateful_pool::init();

    let tokenize = Threads::<Tokenize>::new("Tokenize");
    tokenize.spawn(&())?;
    tokenize.spawn(&())?;
    let stats = Pool::<Stats>::new()?;
    stats
        .spawn_n(&(), 2)
        .into_iter()
        .collect::<Result<Vec<_>, _>>()?;
    let embed = Pool::<Embed>::new()?;
    // Pinned to CPU 0 (every thread of the worker inherits it), with OMP_NUM_THREADS & co. = 1.
    let pinned = SpawnOptions::new().cpus([0]).thread_env_from_cpus(true);
    if let Err(e) = embed.spawn_with(&(), &pinned) {
        println!("not pinned ({e}); spawning Embed unpinned");
        embed.spawn(&())?;
    }
    let normalize = Pool::<Normalize>::new()?;
    normalize.spawn(&())?;

    let graph = seq((
        tokenize,
        ensemble((
            Process::new("Stats", stats),
            seq((
                Process::new("Embed", embed),
                Process::new("Normalize", normalize),
            )),
        )),
        local(
            "combine",
            |((n, distinct, mean), top): ((u32, u32, f64), Vec<(u32, f32)>)| {
                let dims: Vec<String> = top.iter().map(|(d, v)| format!("d{d}={v:+.2}")).collect();
                Ok(format!(
                    "{n} words, {distinct} distinct, bucket mean {mean:.0}; top {}",
                    dims.join(" ")
                ))
            },
        ),
    ));
    let server = Arc::new(Server::new(graph, 64).timeout(Duration::from_secs(30)));

    println!(
        "{}",
        server.call("The quick brown fox jumps over the lazy dog".into())?
    );

    // Many callers at once.
    let docs: Vec<String> = (0..200)
        .map(|i| {
            format!(
                "document {i}: {}",
                "lorem ipsum dolor sit amet ".repeat(1 + i % 7)
            )
        })
        .collect();
    std::thread::scope(|s| {
        for chunk in docs.chunks(50) {
            let server = server.clone();
            s.spawn(move || {
                for d in chunk {
                    server.call(d.clone()).expect("a summary");
                }
            });
        }
    });

    // A stream, inputs beside outputs; an empty document fails in Tokenize, named.
    let inputs = vec![
        "alpha beta".to_string(),
        "   ".to_string(),
        "gamma".to_string(),
    ];
    for (doc, r) in futures_executor::block_on_stream(
        server
            .stream(futures_util::stream::iter(inputs))
            .with_inputs(),
    ) {
        match r {
            Ok(s) => println!("{doc:?} -> {s}"),
            Err(e) => println!("{doc:?} -> error: {e}"),
        }
    }

    for s in server.stats().stages {
        println!(
            "{:<28} {:<8} workers {:?} done {:>4} failed {} p50 {:?} p99 {:?}",
            s.path, s.kind, s.live_workers, s.done, s.failed, s.execute.p50, s.execute.p99
        );
    }
    let report = server.shutdown(Duration::from_secs(10));
    println!("shutdown: drained {}", report.drained);
    Ok(())
}
