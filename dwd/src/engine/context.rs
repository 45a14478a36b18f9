//! The step being run: where it sits in its workflow, what earlier steps gave, and the
//! host its events go to.

use serde_json::{json, Map, Value};

use protocol::message::LogLevel;
use protocol::workflow::{Step, Workflow};

use crate::failure::JobError;
use crate::fanout::{self, Artifact, Run, StepResults};
use crate::host::{CancelReason, Host};
use crate::saving::{bounded_json, Destination, Metadata, MAX_METADATA_BYTES};

/// The step being run, and where it sits.
pub(super) struct StepContext<'a> {
    pub host: &'a dyn Host,
    pub workflow: &'a Workflow,
    pub step: &'a Step,
    pub results: &'a StepResults,
    /// How deep in child workflows.
    pub depth: usize,
}

impl StepContext<'_> {
    pub fn log(&self, level: LogLevel, message: String) {
        self.host.log(level, message);
    }

    /// `file: step `name``, the prefix of this step's messages.
    pub fn place(&self) -> String {
        format!(
            "{}: step `{}`",
            self.workflow.path.display(),
            self.step.name
        )
    }

    /// A refusal of this step's input: `file: step `name`: what`.
    pub fn refused(&self, e: impl std::fmt::Display) -> JobError {
        JobError::refused(format!("{}: {e}", self.place()))
    }

    /// Stops the run if it must stop.
    pub fn check_cancelled(&self) -> Result<(), JobError> {
        match self.host.cancelled() {
            Some(reason) => Err(JobError::Cancelled(reason)),
            None => Ok(()),
        }
    }

    /// Why the run stopped, for an error that says it was cancelled.
    pub fn cancel_reason(&self) -> CancelReason {
        self.host.cancelled().unwrap_or(CancelReason::Client)
    }

    pub fn runs(&self, template: &Map<String, Value>) -> Result<Vec<Run>, JobError> {
        fanout::runs(template, self.results).map_err(|e| self.refused(e))
    }

    pub fn save(&self, run: usize, item: &Artifact, metadata: &Metadata) -> Result<(), JobError> {
        let destination = Destination {
            host: self.host,
            workflow_id: &self.workflow.id,
            step: self.step,
        };
        destination
            .save(run, item, metadata)
            .map_err(|e| JobError::Internal(format!("{}: {e}", self.workflow.path.display())))
    }

    /// diffusers-workflow's metadata JSON (`step_name`, plus `extra`), with ours: the
    /// workflow's path, digest and variables, which `dwctl run --from` runs again.
    pub fn metadata(&self, extra: Value) -> Metadata {
        let mut dw = json!({
            "step_name": self.step.name,
            "workflow_id": self.workflow.id,
            "workflow_sha256": self.workflow.sha256,
            "workflow_path": self.workflow.path.display().to_string(),
            "variables": self.workflow.variables,
        });
        if let (Value::Object(dw), Value::Object(extra)) = (&mut dw, extra) {
            dw.extend(extra);
        }
        Metadata {
            parameters: Vec::new(),
            dw: bounded_json(&dw, MAX_METADATA_BYTES / 8).to_string(),
        }
    }
}
