//! An HTTP inference service on stateful-pool, and the tools to load-test it and scale it out.
//!
//! The service (`stateful-pool-http`, in `main.rs`) puts axum in front of a two-stage service
//! graph: a [`preprocess`] stage of worker processes (decode and resize an uploaded image,
//! read in place in shared memory) and a batching [`model`] stage (a two-layer perceptron run
//! on whole batches). A request's body is written straight from the socket into a loan in the
//! preprocessing pool's shared memory; the features go from one stage's worker to the next
//! through shared memory too. See [`routes`] for the HTTP surface and [`reply`] for how each
//! outcome maps to a status code.
//!
//! The tools: [`client`] is a bounded, loopback-only HTTP load generator (closed loop with N
//! connections, or open loop at a fixed rate), used by the `loadgen`, `loadtest` and
//! `scaleout` programs and by the tests; [`instance`] starts and stops the service as a child
//! process; [`haproxy`] writes an HAProxy configuration and reads its statistics.

pub mod backend;
pub mod client;
pub mod config;
pub mod haproxy;
pub mod instance;
pub mod metrics;
pub mod model;
pub mod preprocess;
pub mod reply;
pub mod routes;
pub mod samples;
pub mod sys;
