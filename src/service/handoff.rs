//! Zero-copy hand-off between process stages: when a process stage's output goes straight to
//! another process stage, the output's archive is copied once, from the first pool's
//! completion ring into a block of the second pool's task arena, and queued there as the
//! second stage's task, never decoded or re-encoded in the parent's heap. An rkyv archive of
//! stage A's output is an archive of stage B's input: the types are the same (the
//! composition's type check guarantees it), and B's worker validates it as it validates every
//! task, so a malformed output from a misbehaving A fails in B as a bad task.

use super::error::{ServiceError, StageError};
use crate::codec::Message;
use crate::{Loan, TaskError, TaskHandle};

/// An item between two stages (crate-internal plumbing; not an API).
#[doc(hidden)]
#[derive(Debug)]
pub enum Handoff<T> {
    /// A value.
    Value(T),
    /// A process stage's finished task whose output has not been decoded.
    Archived(Ready<T>),
}

/// A finished task with an output, held in its pool until it is copied or decoded.
#[doc(hidden)]
pub struct Ready<T> {
    out: Box<dyn ArchivedOutput<T>>,
    /// The producing stage (errors in the copy name it).
    path: String,
}

impl<T> std::fmt::Debug for Ready<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Ready")
            .field("path", &self.path)
            .field("len", &self.out.len())
            .finish()
    }
}

trait ArchivedOutput<T>: Send {
    fn len(&self) -> usize;
    fn into_loan(self: Box<Self>, loan: &mut Loan) -> Result<usize, TaskError>;
    fn decode(self: Box<Self>) -> Result<T, TaskError>;
}

impl<T: Message> ArchivedOutput<T> for (TaskHandle<T>, usize) {
    fn len(&self) -> usize {
        self.1
    }

    fn into_loan(self: Box<Self>, loan: &mut Loan) -> Result<usize, TaskError> {
        self.0.output_into(loan)
    }

    fn decode(self: Box<Self>) -> Result<T, TaskError> {
        self.0.wait()
    }
}

impl<T: Message> Ready<T> {
    /// A finished task of stage `path` whose output archive is `len` bytes.
    pub(crate) fn new(handle: TaskHandle<T>, len: usize, path: &str) -> Ready<T> {
        Ready {
            out: Box::new((handle, len)),
            path: path.to_string(),
        }
    }
}

impl<T> Ready<T> {
    /// The output archive's length.
    pub(crate) fn len(&self) -> usize {
        self.out.len()
    }

    fn fail(path: String, error: TaskError) -> ServiceError {
        let worker = match &error {
            TaskError::BadResult { worker, .. } => Some(*worker),
            _ => None,
        };
        StageError {
            path,
            worker,
            pid: None,
            error,
        }
        .into()
    }

    /// Copies the output archive into `loan`; its length.
    pub(crate) fn into_loan(self, loan: &mut Loan) -> Result<usize, ServiceError> {
        let Ready { out, path } = self;
        out.into_loan(loan).map_err(|e| Self::fail(path, e))
    }

    /// Decodes the output into a value (the path for a next stage that is not a process).
    pub(crate) fn decode(self) -> Result<T, ServiceError> {
        let Ready { out, path } = self;
        out.decode().map_err(|e| Self::fail(path, e))
    }
}

impl<T> Handoff<T> {
    /// The item as a value, decoding an archived output.
    pub(crate) fn into_value(self) -> Result<T, ServiceError> {
        match self {
            Handoff::Value(v) => Ok(v),
            Handoff::Archived(r) => r.decode(),
        }
    }
}
