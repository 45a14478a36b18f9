//! Why a run failed, by kind, so that the client decides by code and never by message.
//!
//! Each kind travels over the protocol as an [`ErrorKind`] code plus its message (and, for
//! bad input, where in the file); `dwctl` maps codes to exit codes from one table.

use protocol::message::ErrorKind;

use crate::host::CancelReason;
use crate::pipelines::PipelineError;

/// Why a job stopped before finishing.
#[derive(Debug, thiserror::Error)]
pub enum JobError {
    /// It was cancelled (by its client, its timeout or shutdown).
    #[error("cancelled")]
    Cancelled(CancelReason),
    /// The workflow asks for something it cannot have.
    #[error("{message}")]
    Refused {
        message: String,
        /// The JSON pointer of the offending value, where one is known.
        pointer: Option<String>,
    },
    /// A model, component or file is not there; the message names it and where it was
    /// looked for.
    #[error("{0}")]
    NotFound(String),
    /// It would not fit in memory; the message gives the estimate and the budget.
    #[error("{0}")]
    OverBudget(String),
    /// Loading or running failed for another reason.
    #[error("{0}")]
    Internal(String),
}

impl JobError {
    pub fn refused(message: impl Into<String>) -> Self {
        JobError::Refused {
            message: message.into(),
            pointer: None,
        }
    }

    /// The protocol code this is reported with (a cancellation's depends on its reason).
    pub fn kind(&self) -> ErrorKind {
        match self {
            JobError::Cancelled(CancelReason::Client) => ErrorKind::Cancelled,
            JobError::Cancelled(CancelReason::Timeout) => ErrorKind::Timeout,
            JobError::Cancelled(CancelReason::Shutdown) => ErrorKind::ShuttingDown,
            JobError::Refused { .. } => ErrorKind::InvalidWorkflow,
            JobError::NotFound(_) => ErrorKind::NotFound,
            JobError::OverBudget(_) => ErrorKind::OverBudget,
            JobError::Internal(_) => ErrorKind::Failed,
        }
    }

    /// The same error with `context` (the file and step) in front of its message.
    pub fn within(self, context: &str) -> Self {
        let prefix = |m: String| format!("{context}: {m}");
        match self {
            JobError::Refused { message, pointer } => JobError::Refused {
                message: prefix(message),
                pointer,
            },
            JobError::NotFound(m) => JobError::NotFound(prefix(m)),
            JobError::OverBudget(m) => JobError::OverBudget(prefix(m)),
            JobError::Internal(m) => JobError::Internal(prefix(m)),
            cancelled => cancelled,
        }
    }

    /// A pipeline's error: a missing file is not found, a bad argument refused.
    pub fn from_pipeline(e: PipelineError, cancelled: impl FnOnce() -> CancelReason) -> Self {
        match e {
            PipelineError::Cancelled => JobError::Cancelled(cancelled()),
            PipelineError::MissingFile { .. } => JobError::NotFound(e.to_string()),
            PipelineError::Unsupported { .. } | PipelineError::InvalidArgument { .. } => {
                JobError::refused(e.to_string())
            }
            other => JobError::Internal(other.to_string()),
        }
    }
}
