//! Lock-free structures that work across processes: the task queue ([`mpmc`]), the
//! completion rings ([`bytes`]) and the wait/wake eventcount ([`wait`]). Each is a view over
//! storage that may be shared memory or the heap, with atomics from [`crate::sync`], so loom and
//! Miri run the same code. See ARCHITECTURE.md for the protocols and their proof sketches.

pub(crate) mod bytes;
pub(crate) mod mpmc;
pub(crate) mod wait;

#[cfg(test)]
pub(crate) mod tests;
