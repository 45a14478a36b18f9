//! The diffusers-workflow JSON format: parsing, variables, validation and output naming.
//!
//! diffusers-workflow's own files are the contract (`dw/workflow_schema.json`, its code and
//! its examples): a workflow has an `id`, optional `variables` (each default's JSON type
//! is the variable's type), an optional `seed`, and `steps`. Each step has a `name` and
//! exactly one of `pipeline` (its class in `configuration.component_type`),
//! `pipeline_reference`, `workflow` or `task`, and an optional `result`. Every key of dw's
//! schema has a fate here ([`schema`]): implemented, accepted as runtime-only with a note,
//! or refused by name. `"variable:x"` values are replaced by the variable's value;
//! `"previous_result:step"` values name an earlier step's results and fan out when the
//! workflow runs.
//!
//! Parsing is the same in `dwctl validate` and in the daemon, and every error says
//! `file:line:column: what is wrong`, naming the offending value and what is accepted.

mod arguments;
mod parser;
mod positions;
pub mod results;
pub mod schema;
pub mod tasks;
pub mod variables;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use crate::families::PipelineClass;
pub use arguments::{
    ArgDefault, ArgSpec, ArgType, ArgValue, ArgumentError, Arguments, ImageSource, OutputType,
    PreviousResult, Prompts,
};
pub use parser::SUPPORTED_DTYPES;
pub use positions::{pointer_segment, Position, Positions};
pub use results::{extension_for, ArtifactName, ResultSpec};
pub use schema::Severity;
pub use variables::Given;

/// The most runs one step may fan out to, as diffusers-workflow caps it.
pub const MAX_RUNS_PER_STEP: usize = 10_000;

/// An invalid workflow: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowError {
    pub file: PathBuf,
    pub position: Option<Position>,
    /// The JSON pointer of the offending key or value, where the error is about one.
    pub pointer: Option<String>,
    pub message: String,
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write_located(f, &self.file, self.position, &self.message)
    }
}

impl std::error::Error for WorkflowError {}

fn write_located(
    f: &mut fmt::Formatter<'_>,
    file: &Path,
    position: Option<Position>,
    message: &str,
) -> fmt::Result {
    match position {
        Some(p) => write!(f, "{}:{}:{}: {message}", file.display(), p.line, p.column),
        None => write!(f, "{}: {message}", file.display()),
    }
}

/// Something about a valid workflow worth saying: a runtime-only key, or a key outside
/// dw's schema that is ignored.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Note {
    pub position: Option<Position>,
    pub severity: Severity,
    pub message: String,
}

/// A parsed, validated workflow with its variables applied.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub id: String,
    /// The file it came from; relative paths inside resolve against its directory.
    pub path: PathBuf,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
    /// Variables after the given values are applied.
    pub variables: BTreeMap<String, Value>,
    pub steps: Vec<Step>,
    /// Notes to show before a run (info and warnings).
    pub notes: Vec<Note>,
    /// The working directory of whoever asked for the run, where a relative `model_name`
    /// is looked for first (as diffusers' `from_pretrained` does).
    pub cwd: Option<PathBuf>,
}

impl Workflow {
    /// Runs step `name`'s pipeline with `seed`; `false` when no step has that name.
    pub fn pin_seed(&mut self, name: &str, seed: u64) -> bool {
        let Some(step) = self.steps.iter_mut().find(|s| s.name == name) else {
            return false;
        };
        step.seed = Some(seed);
        match &mut step.action {
            Action::Pipeline(p) => p.seed = Some(seed),
            Action::Reference(r) => r.seed = Some(seed),
            _ => {}
        }
        true
    }

    /// A note as `file:line:column: warning: ...`.
    pub fn note_text(&self, note: &Note) -> String {
        let label = match note.severity {
            Severity::Info => "note",
            Severity::Warning => "warning",
        };
        let message = format!("{label}: {}", note.message);
        WorkflowError {
            file: self.path.clone(),
            position: note.position,
            pointer: None,
            message,
        }
        .to_string()
    }
}

/// One step, with variables substituted.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub index: usize,
    /// The step's `seed`, else the workflow's.
    pub seed: Option<u64>,
    pub action: Action,
    pub result: ResultSpec,
    /// Drop this step's pipeline from the cache once the step is done.
    pub release_pipeline: bool,
    /// Drop task models once the step is done (dw's tasks here load none).
    pub release_models: bool,
}

impl Step {
    /// Whether this step offers `component` to later steps.
    pub fn shares(&self, component: &str) -> bool {
        match &self.action {
            Action::Pipeline(p) => p.shared_components.iter().any(|c| c == component),
            _ => false,
        }
    }

    /// The pipeline this step runs, if it is a `pipeline` step.
    pub fn pipeline(&self) -> Option<&PipelineStep> {
        match &self.action {
            Action::Pipeline(p) => Some(p),
            _ => None,
        }
    }
}

/// What a step does.
#[derive(Debug, Clone)]
pub enum Action {
    Pipeline(Box<PipelineStep>),
    Reference(ReferenceStep),
    Workflow(ChildWorkflow),
    Task(TaskStep),
}

/// A `pipeline` step.
#[derive(Debug, Clone)]
pub struct PipelineStep {
    /// `configuration.component_type` as written.
    pub component_type: String,
    /// The class it names; for an auto class, the class it is read as until its model
    /// folder says otherwise.
    pub class: &'static PipelineClass,
    /// `model_name` as written: a folder (relative to the workflow file) or a hub id.
    pub model_name: String,
    /// Where `model_name` is written, for errors found when the model is resolved.
    pub model_name_at: Position,
    pub torch_dtype: String,
    pub variant: Option<String>,
    pub scheduler: Option<SchedulerSpec>,
    /// The most specific of the pipeline's, the step's and the workflow's `seed`.
    pub seed: Option<u64>,
    pub arguments: Arguments,
    /// The arguments as JSON after variable substitution; `previous_result:` values are
    /// filled in per run.
    pub arguments_json: Map<String, Value>,
    /// Components this step offers to later steps (`shared_components`).
    pub shared_components: Vec<String>,
    /// Components taken from the earlier step that shared them: (component, step name).
    pub reused_components: Vec<(String, String)>,
    /// Components loaded from another model than the pipeline's (`"vae": {...}`).
    pub components: Vec<ComponentSource>,
    /// Components `from_pretrained_arguments` sets to null, to run without.
    pub omitted_components: Vec<OmittedComponent>,
    /// `loras`, in list order.
    pub loras: Vec<LoraSpec>,
    pub options: PipelineOptions,
}

/// One LoRA of a pipeline's `loras` list, as diffusers-workflow's `load_loras` reads it:
/// `load_lora_weights(model_name, adapter_name=..., weight_name=..., subfolder=...)`, then
/// `set_adapters(names, adapter_weights=scales)` for the whole list.
#[derive(Debug, Clone, PartialEq)]
pub struct LoraSpec {
    /// A folder (relative to the workflow file), a `.safetensors` file, or a hub id.
    pub model_name: String,
    pub model_name_at: Position,
    /// The file in that folder; diffusers' guess when absent.
    pub weight_name: Option<String>,
    pub subfolder: Option<String>,
    /// `adapter_name`, else the LoRA's index in the list (`"0"`, `"1"`, ...).
    pub adapter_name: String,
    /// `scale` (the adapter's weight), default 1.0.
    pub scale: f64,
}

/// A component a pipeline is loaded without (`"text_encoder_3": null` in its
/// `from_pretrained_arguments`), and where that is written.
#[derive(Debug, Clone, PartialEq)]
pub struct OmittedComponent {
    pub name: String,
    pub at: Position,
}

impl PipelineStep {
    /// Components this step takes from elsewhere than its model's folder: component blocks
    /// and components reused from an earlier step.
    pub fn supplied_components(&self) -> Vec<&str> {
        let blocks = self.components.iter().map(|c| c.slot.as_str());
        blocks
            .chain(self.reused_components.iter().map(|(name, _)| name.as_str()))
            .collect()
    }
}

/// What `configuration` asks of a pipeline beyond its class.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct PipelineOptions {
    /// `offload`: "model" or "sequential".
    pub offload: Option<String>,
    /// `exclude_from_cpu_offload`: components that stay on the device under sequential
    /// offload.
    pub exclude_from_cpu_offload: Vec<String>,
    pub group_offload: bool,
    /// `device` as written.
    pub device: Option<String>,
    /// `no_generator`: draw unseeded noise.
    pub no_generator: bool,
    /// `vae.enable_slicing`: decode one image at a time.
    pub vae_slicing: bool,
    /// `vae.enable_tiling`: decode in overlapping tiles.
    pub vae_tiling: bool,
}

/// A component loaded from its own model folder.
#[derive(Debug, Clone)]
pub struct ComponentSource {
    /// `vae`, `unet`, `text_encoder`, `tokenizer`.
    pub slot: String,
    pub model_name: String,
    pub subfolder: Option<String>,
    pub at: Position,
}

/// A `pipeline_reference` step: an earlier step's pipeline, run with new arguments.
#[derive(Debug, Clone)]
pub struct ReferenceStep {
    pub reference_name: String,
    pub class: &'static PipelineClass,
    pub seed: Option<u64>,
    pub arguments: Arguments,
    pub arguments_json: Map<String, Value>,
}

/// A `workflow` step: a child workflow file run with `arguments` as its variables.
#[derive(Debug, Clone)]
pub struct ChildWorkflow {
    /// As written, relative to the parent's file.
    pub path: String,
    pub path_at: Position,
    pub arguments: Map<String, Value>,
}

/// A `task` step.
#[derive(Debug, Clone)]
pub struct TaskStep {
    pub command: String,
    pub arguments: Option<Map<String, Value>>,
    /// One run per item, when given.
    pub inputs: Option<Vec<Value>>,
}

/// A scheduler chosen in the workflow, built from the checkpoint's config with overrides.
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    pub scheduler_type: String,
    pub from_config_args: Map<String, Value>,
}

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Workflow {
    /// Reads and parses a workflow file, applying `NAME=VALUE` values from a command line.
    pub fn load(path: &Path, assignments: &[String]) -> Result<Workflow, WorkflowError> {
        let source = read_source(path)?;
        Workflow::parse(path, &source, assignments)
    }

    /// Parses workflow text that came from `path`, applying `NAME=VALUE` values.
    pub fn parse(
        path: &Path,
        source: &str,
        assignments: &[String],
    ) -> Result<Workflow, WorkflowError> {
        let given = parse_assignments(path, assignments)?;
        Workflow::parse_with(path, source, &given)
    }

    /// Parses workflow text with variable values already split from their names (a parent
    /// workflow passes JSON values).
    pub fn parse_with(
        path: &Path,
        source: &str,
        given: &[(String, Given)],
    ) -> Result<Workflow, WorkflowError> {
        parser::Parser::new(path, source).workflow(given)
    }

    /// The directory relative paths in this workflow resolve against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }

    /// Where this workflow's `model_name`s are looked for.
    pub fn model_places<'a>(&'a self, hub_cache: Option<&'a Path>) -> crate::models::Places<'a> {
        crate::models::Places {
            cwd: self.cwd.as_deref(),
            workflow_dir: self.base_dir(),
            hub_cache,
        }
    }
}

/// The most bytes a workflow file may have (diffusers-workflow allows 50 MiB; a file that
/// large would not fit the daemon's frames anyway).
pub const MAX_WORKFLOW_BYTES: u64 = 512 * 1024;

/// Reads a workflow file, refusing anything but a regular file of bounded size.
pub fn read_source(path: &Path) -> Result<String, WorkflowError> {
    let fail = |message: String| WorkflowError {
        file: path.to_path_buf(),
        position: None,
        pointer: None,
        message,
    };
    crate::input::read_text_bounded(path, MAX_WORKFLOW_BYTES)
        .map_err(|e| fail(format!("cannot read the workflow file: {e}")))
}

/// Splits `NAME=VALUE` assignments typed on a command line.
pub fn parse_assignments(
    path: &Path,
    assignments: &[String],
) -> Result<Vec<(String, Given)>, WorkflowError> {
    assignments
        .iter()
        .map(|raw| match raw.split_once('=') {
            Some((name, value)) if !name.trim().is_empty() => {
                Ok((name.trim().to_string(), Given::Text(value.to_string())))
            }
            _ => Err(WorkflowError {
                file: path.to_path_buf(),
                position: None,
                pointer: None,
                message: format!("`{raw}` is not a variable assignment: write NAME=VALUE, e.g. prompt=\"a red fox\""),
            }),
        })
        .collect()
}

#[cfg(test)]
mod tests;
