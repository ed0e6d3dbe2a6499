//! What the service answers: a prediction as JSON, or a failure with its HTTP status, a JSON
//! body naming the stage where it happened, and `Retry-After` when the client should retry.

use crate::backend::PREPROCESS_STAGE;
use crate::preprocess::BAD_IMAGE;
use axum::http::StatusCode;
use serde::{Deserialize, Serialize};
use stateful_pool::TaskError;
use stateful_pool::service::ServiceError;
use std::time::Duration;

/// Where a deadline passed while the request's body was still arriving (a 504's `stage`).
pub const BODY: &str = "body";

/// Where a deadline passed before the request entered the service graph (a 504's `stage`).
pub const ADMISSION: &str = "admission";

/// The answer to `POST /predict`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Prediction {
    /// The most likely class.
    pub class: usize,
    /// Each class's probability.
    pub probabilities: Vec<f32>,
}

impl Prediction {
    /// The prediction from the model's class probabilities.
    pub fn from_probabilities(probabilities: Vec<f32>) -> Prediction {
        let class = probabilities
            .iter()
            .enumerate()
            .max_by(|a, b| a.1.total_cmp(b.1))
            .map_or(0, |(i, _)| i);
        Prediction {
            class,
            probabilities,
        }
    }
}

/// The body of every error answer.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct ErrorBody {
    /// What went wrong.
    pub error: String,
    /// Where it happened: the stage's path in the service graph, or for a 504 also
    /// [`BODY`] or [`ADMISSION`]; absent when it happened in no stage.
    #[serde(skip_serializing_if = "Option::is_none", default)]
    pub stage: Option<String>,
}

/// A request that did not get a prediction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The HTTP status.
    pub status: StatusCode,
    /// The body.
    pub body: ErrorBody,
    /// Whether to tell the client when to retry (`Retry-After`).
    pub retry: bool,
}

impl Failure {
    fn new(status: StatusCode, error: impl Into<String>, stage: Option<String>) -> Failure {
        Failure {
            status,
            body: ErrorBody {
                error: error.into(),
                stage,
            },
            retry: false,
        }
    }

    /// 503 with `Retry-After`: the request did not run here (safe to retry, here later or on
    /// another instance).
    pub fn unavailable(msg: impl Into<String>, stage: Option<String>) -> Failure {
        Failure {
            retry: true,
            ..Self::new(StatusCode::SERVICE_UNAVAILABLE, msg, stage)
        }
    }

    /// 503: the service is at capacity.
    pub fn full() -> Failure {
        Self::unavailable("the service is at capacity", None)
    }

    /// 503: the shared memory for request bodies is full (requests in flight hold it all).
    pub fn no_room() -> Failure {
        Self::unavailable(
            "no room for the body in shared memory: the service is at capacity",
            None,
        )
    }

    /// 503: the service is shutting down.
    pub fn draining() -> Failure {
        Self::unavailable("the service is shutting down", None)
    }

    /// 413: the body is larger than the limit.
    pub fn too_large(len: usize, max: usize) -> Failure {
        Self::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("the body has {len} bytes; the limit is {max}"),
            None,
        )
    }

    /// 411: the request has no `Content-Length`.
    pub fn length_required() -> Failure {
        Self::new(
            StatusCode::LENGTH_REQUIRED,
            "a request needs a Content-Length (the body is written in place into shared memory)",
            None,
        )
    }

    /// 400: the request is malformed.
    pub fn bad_request(msg: impl Into<String>) -> Failure {
        Self::new(StatusCode::BAD_REQUEST, msg, None)
    }

    /// 499 (nginx's "client closed request"): the client went away mid-request. The status is
    /// for the metrics: on the wire it is a 400 (a client that only closed its sending side
    /// still reads the answer, and 499 is no HTTP status).
    pub fn client_closed(msg: impl Into<String>) -> Failure {
        Self::new(
            StatusCode::from_u16(crate::routes::CLIENT_CLOSED).unwrap_or(StatusCode::BAD_REQUEST),
            msg,
            None,
        )
    }

    /// 408: the client took too long to send its body.
    pub fn slow_client(limit: Duration) -> Failure {
        Self::new(
            StatusCode::REQUEST_TIMEOUT,
            format!("the body did not arrive within {limit:?}"),
            None,
        )
    }

    /// 504: the request's deadline passed in `stage`: a stage's path in the service graph,
    /// [`BODY`] while the request's body was still arriving, or [`ADMISSION`] before the
    /// request entered the graph.
    pub fn deadline(stage: Option<String>) -> Failure {
        Self::new(
            StatusCode::GATEWAY_TIMEOUT,
            "the request's deadline passed",
            stage,
        )
    }

    /// 500: the service failed the request.
    pub fn internal(msg: impl Into<String>, stage: Option<String>) -> Failure {
        Self::new(StatusCode::INTERNAL_SERVER_ERROR, msg, stage)
    }

    /// The answer for a call into the pool's server that failed.
    pub fn from_service(e: ServiceError) -> Failure {
        match e {
            ServiceError::Full { .. } => Failure::full(),
            ServiceError::Shutdown => Failure::draining(),
            // (No stage: it passed before the request entered the graph.)
            ServiceError::Timeout { stage, .. } => {
                Failure::deadline(Some(stage.unwrap_or_else(|| ADMISSION.to_string())))
            }
            ServiceError::Stage(se) => {
                // An input the preprocessing worker could not use is the client's fault.
                if let TaskError::Failed { message, .. } = &se.error {
                    if se.path == PREPROCESS_STAGE && message.starts_with(BAD_IMAGE) {
                        return Failure::bad_request(message.clone());
                    }
                }
                let path = se.path.clone();
                match &se.error {
                    // The request never ran: no worker to take it, or the service stopped
                    // (the drain limit) before it finished.
                    TaskError::NoWorkers => Failure::unavailable(se.to_string(), Some(path)),
                    TaskError::Cancelled => Failure::unavailable(
                        format!("the service is shutting down: {se}"),
                        Some(path),
                    ),
                    _ => Failure::internal(se.to_string(), Some(path)),
                }
            }
            other => {
                let stage = other.stage().map(str::to_string);
                Failure::internal(other.to_string(), stage)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use stateful_pool::service::StageError;

    fn stage_failure(error: TaskError) -> Failure {
        Failure::from_service(ServiceError::Stage(Box::new(StageError {
            path: "seq[1]/model".to_string(),
            worker: None,
            pid: None,
            error,
        })))
    }

    #[test]
    fn a_request_that_never_ran_is_a_503_to_retry_and_a_fault_a_500() {
        for e in [TaskError::NoWorkers, TaskError::Cancelled] {
            let f = stage_failure(e.clone());
            assert_eq!(f.status, StatusCode::SERVICE_UNAVAILABLE, "{e:?}");
            assert!(f.retry, "{e:?}");
            assert_eq!(f.body.stage.as_deref(), Some("seq[1]/model"));
        }
        let f = stage_failure(TaskError::Failed {
            worker: 0,
            message: "boom".into(),
        });
        assert_eq!(f.status, StatusCode::INTERNAL_SERVER_ERROR);
        assert!(!f.retry);
    }
}
