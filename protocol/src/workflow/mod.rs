//! The diffusers-workflow JSON format: parsing, variables, validation and output naming.
//!
//! A workflow file has an `id`, optional `variables` (each default's JSON type is the
//! variable's type), an optional `seed`, and `steps`. Each step has a `name` and exactly one
//! of `pipeline`, `pipeline_reference`, `task` or `workflow` (only `pipeline` runs today), and
//! an optional `result`. `"variable:x"` anywhere in a step is replaced by the variable's
//! value; `"previous_result:step"` refers to an earlier step's output and is resolved when
//! the workflow runs.
//!
//! Parsing is the same in `dwctl validate` and in the daemon, and every error says
//! `file:line:column: what is wrong`, naming the offending value and what is accepted.

mod arguments;
mod positions;

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Path, PathBuf};

use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

pub use arguments::{
    ImageSource, OutputType, PipelineKind, PreviousResult, Prompts, StableDiffusionArguments,
};
pub use positions::{pointer_segment, Position, Positions};

/// Pipelines that can run.
pub const SUPPORTED_PIPELINES: &[&str] = PipelineKind::SUPPORTED;
/// Content types a step's result can be written as.
pub const SUPPORTED_CONTENT_TYPES: &[&str] = &["image/png", "image/jpeg"];
/// `torch_dtype` values and what they mean.
pub const SUPPORTED_DTYPES: &[&str] = &["torch.float32", "torch.float16", "torch.bfloat16"];

const TOP_LEVEL_KEYS: &[&str] = &["id", "variables", "seed", "steps", "description"];
const STEP_KEYS: &[&str] = &[
    "name",
    "seed",
    "result",
    "pipeline",
    "pipeline_reference",
    "task",
    "workflow",
];
const STEP_KINDS: &[&str] = &["pipeline", "pipeline_reference", "task", "workflow"];
const PIPELINE_KEYS: &[&str] = &[
    "configuration",
    "from_pretrained_arguments",
    "scheduler",
    "arguments",
    "seed",
    "shared_components",
    "reused_components",
];
/// Components a pipeline can share with later steps (`shared_components`) or take from an
/// earlier one (`reused_components`).
pub const SHAREABLE_COMPONENTS: &[&str] = &["tokenizer", "text_encoder", "unet", "vae"];
const CONFIGURATION_KEYS: &[&str] = &["pipeline_type"];
const FROM_PRETRAINED_KEYS: &[&str] = &["model_name", "torch_dtype", "variant", "use_safetensors"];
const SCHEDULER_KEYS: &[&str] = &["configuration", "from_config_args"];
const SCHEDULER_CONFIGURATION_KEYS: &[&str] = &["scheduler_type"];
const RESULT_KEYS: &[&str] = &["content_type", "file_base_name", "embed_metadata"];

/// An invalid workflow: where, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkflowError {
    pub file: PathBuf,
    pub position: Option<Position>,
    pub message: String,
}

impl fmt::Display for WorkflowError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.position {
            Some(p) => write!(
                f,
                "{}:{}:{}: {}",
                self.file.display(),
                p.line,
                p.column,
                self.message
            ),
            None => write!(f, "{}: {}", self.file.display(), self.message),
        }
    }
}

impl std::error::Error for WorkflowError {}

/// A parsed, validated workflow with its variables applied.
#[derive(Debug, Clone)]
pub struct Workflow {
    pub id: String,
    /// The file it came from; relative paths inside resolve against its directory.
    pub path: PathBuf,
    /// sha256 of the file's bytes, hex.
    pub sha256: String,
    /// Variables after command-line overrides.
    pub variables: BTreeMap<String, Value>,
    pub steps: Vec<Step>,
}

/// One step, with variables substituted.
#[derive(Debug, Clone)]
pub struct Step {
    pub name: String,
    pub index: usize,
    pub pipeline: PipelineStep,
    pub result: ResultSpec,
}

/// A `pipeline` step.
#[derive(Debug, Clone)]
pub struct PipelineStep {
    pub pipeline_type: String,
    pub kind: PipelineKind,
    /// `model_name` as written: a folder (relative to the workflow file) or a hub id.
    pub model_name: String,
    /// Where `model_name` is written, for errors found when the model is resolved.
    pub model_name_at: Position,
    pub torch_dtype: String,
    pub variant: Option<String>,
    pub scheduler: Option<SchedulerSpec>,
    /// The most specific of the pipeline's, the step's and the workflow's `seed`.
    pub seed: Option<u64>,
    pub arguments: StableDiffusionArguments,
    /// The arguments as JSON after variable substitution (recorded in output metadata).
    pub arguments_json: Map<String, Value>,
    /// Components this step offers to later steps (`shared_components`).
    pub shared_components: Vec<String>,
    /// Components taken from the earlier step that shared them: (component, step name).
    pub reused_components: Vec<(String, String)>,
}

/// A scheduler chosen in the workflow, built from the checkpoint's config with overrides.
#[derive(Debug, Clone)]
pub struct SchedulerSpec {
    pub scheduler_type: String,
    pub from_config_args: Map<String, Value>,
}

/// How a step's outputs are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSpec {
    pub content_type: String,
    pub file_base_name: String,
    pub embed_metadata: bool,
}

impl Default for ResultSpec {
    fn default() -> Self {
        ResultSpec {
            content_type: "image/png".into(),
            file_base_name: String::new(),
            embed_metadata: true,
        }
    }
}

impl ResultSpec {
    /// File extension for the content type.
    pub fn extension(&self) -> &'static str {
        extension_for(&self.content_type)
    }
}

/// File extension for a content type the client writes.
pub fn extension_for(content_type: &str) -> &'static str {
    match content_type {
        "image/jpeg" => "jpg",
        "application/x-safetensors" => "safetensors",
        _ => "png",
    }
}

/// diffusers-workflow's output name:
/// `{file_base_name}{workflow_id}-{step_name}.{step_index}-{result_index}.{artifact_index}.{ext}`.
pub fn output_file_name(
    file_base_name: &str,
    workflow_id: &str,
    step_name: &str,
    step_index: u32,
    result_index: u32,
    artifact_index: u32,
    extension: &str,
) -> String {
    format!("{file_base_name}{workflow_id}-{step_name}.{step_index}-{result_index}.{artifact_index}.{extension}")
}

/// sha256 of `bytes` as lowercase hex.
pub fn sha256_hex(bytes: &[u8]) -> String {
    let digest = Sha256::digest(bytes);
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

impl Workflow {
    /// Reads and parses a workflow file, applying `NAME=VALUE` overrides.
    pub fn load(path: &Path, overrides: &[String]) -> Result<Workflow, WorkflowError> {
        let source = std::fs::read_to_string(path).map_err(|e| WorkflowError {
            file: path.to_path_buf(),
            position: None,
            message: format!("cannot read the workflow file: {e}"),
        })?;
        Workflow::parse(path, &source, overrides)
    }

    /// Parses workflow text that came from `path`, applying `NAME=VALUE` overrides.
    pub fn parse(
        path: &Path,
        source: &str,
        overrides: &[String],
    ) -> Result<Workflow, WorkflowError> {
        Parser::new(path, source).workflow(overrides)
    }

    /// The directory relative paths in this workflow resolve against.
    pub fn base_dir(&self) -> &Path {
        self.path.parent().unwrap_or(Path::new("."))
    }
}

/// Which JSON type a variable has, from its default.
fn type_name(value: &Value) -> &'static str {
    match value {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_i64() || n.is_u64() => "an integer",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// Converts a command-line value to the type of the variable's default.
fn convert_override(default: &Value, raw: &str) -> Result<Value, String> {
    let expected = type_name(default);
    let fail = |hint: &str| format!("`{raw}` is not {expected}{hint}");
    match default {
        Value::String(_) => Ok(Value::String(raw.to_string())),
        Value::Bool(_) => match raw.to_ascii_lowercase().as_str() {
            "true" | "1" | "yes" | "on" => Ok(Value::Bool(true)),
            "false" | "0" | "no" | "off" => Ok(Value::Bool(false)),
            _ => Err(fail(" (use true or false)")),
        },
        Value::Number(n) if n.is_i64() || n.is_u64() => raw
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| fail(" (a whole number such as 20)")),
        Value::Number(_) => raw
            .trim()
            .parse::<f64>()
            .ok()
            .filter(|f| f.is_finite())
            .and_then(serde_json::Number::from_f64)
            .map(Value::Number)
            .ok_or_else(|| fail(" (a number such as 7.5)")),
        Value::Array(_) | Value::Object(_) | Value::Null => {
            let parsed: Value =
                serde_json::from_str(raw).map_err(|e| fail(&format!(" (as JSON: {e})")))?;
            if default.is_null()
                || std::mem::discriminant(&parsed) == std::mem::discriminant(default)
            {
                Ok(parsed)
            } else {
                Err(fail(&format!(", it is {}", type_name(&parsed))))
            }
        }
    }
}

struct Parser<'a> {
    path: &'a Path,
    source: &'a str,
    positions: Positions,
}

impl<'a> Parser<'a> {
    fn new(path: &'a Path, source: &'a str) -> Self {
        Parser {
            path,
            source,
            positions: Positions::default(),
        }
    }

    fn error_at(&self, position: Option<Position>, message: impl Into<String>) -> WorkflowError {
        WorkflowError {
            file: self.path.to_path_buf(),
            position,
            message: message.into(),
        }
    }

    fn at_value(&self, pointer: &str, message: impl Into<String>) -> WorkflowError {
        self.error_at(Some(self.positions.value(pointer)), message)
    }

    fn at_key(&self, pointer: &str, message: impl Into<String>) -> WorkflowError {
        self.error_at(Some(self.positions.key(pointer)), message)
    }

    fn workflow(mut self, overrides: &[String]) -> Result<Workflow, WorkflowError> {
        let root: Value = serde_json::from_str(self.source).map_err(|e| {
            let text = e.to_string();
            let message = text
                .rsplit_once(" at line ")
                .map(|(m, _)| m.to_string())
                .unwrap_or(text);
            self.error_at(
                Some(json_error_position(self.source, &e)),
                format!("invalid JSON: {message}"),
            )
        })?;
        self.positions = Positions::index(self.source);
        let root = self.object(&root, "", "the workflow")?;
        self.known_keys(root, "", TOP_LEVEL_KEYS)?;

        let id = match root.get("id") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(other) => {
                return Err(self.at_value(
                    "/id",
                    format!("`id` must be a non-empty string, found {other}"),
                ))
            }
            None => {
                return Err(self.at_value(
                    "",
                    "missing `id`: every workflow needs an `id` string, used in output names",
                ))
            }
        };
        if id.contains('/') || id.contains("..") {
            return Err(self.at_value(
                "/id",
                format!(
                    "`id` {id:?} may not contain `/` or `..`: it becomes part of output file names"
                ),
            ));
        }
        let workflow_seed = self.seed(root.get("seed"), "/seed")?;
        let variables = self.variables(root.get("variables"), overrides)?;
        let steps_value = root.get("steps").ok_or_else(|| {
            self.at_value(
                "",
                "missing `steps`: a workflow needs a list of at least one step",
            )
        })?;
        let steps_list = match steps_value {
            Value::Array(items) if !items.is_empty() => items,
            Value::Array(_) => {
                return Err(self.at_value(
                    "/steps",
                    "`steps` is empty: a workflow needs at least one step",
                ))
            }
            other => {
                return Err(self.at_value(
                    "/steps",
                    format!(
                        "`steps` must be a list of steps, found {}",
                        type_name(other)
                    ),
                ))
            }
        };

        let mut steps: Vec<Step> = Vec::with_capacity(steps_list.len());
        for (index, raw) in steps_list.iter().enumerate() {
            let pointer = format!("/steps/{index}");
            let substituted = self.substitute(raw, &pointer, &variables)?;
            let step = self.step(&substituted, &pointer, index, workflow_seed, &steps)?;
            steps.push(step);
        }
        Ok(Workflow {
            id,
            path: self.path.to_path_buf(),
            sha256: sha256_hex(self.source.as_bytes()),
            variables,
            steps,
        })
    }

    fn object<'v>(
        &self,
        value: &'v Value,
        pointer: &str,
        what: &str,
    ) -> Result<&'v Map<String, Value>, WorkflowError> {
        value.as_object().ok_or_else(|| {
            self.at_value(
                pointer,
                format!("{what} must be a JSON object, found {}", type_name(value)),
            )
        })
    }

    fn known_keys(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        accepted: &[&str],
    ) -> Result<(), WorkflowError> {
        for key in object.keys() {
            if !accepted.contains(&key.as_str()) {
                return Err(self.at_key(
                    &format!("{pointer}/{}", pointer_segment(key)),
                    format!(
                        "unknown or unsupported key `{key}`; accepted here: {}",
                        accepted.join(", ")
                    ),
                ));
            }
        }
        Ok(())
    }

    fn seed(&self, value: Option<&Value>, pointer: &str) -> Result<Option<u64>, WorkflowError> {
        match value {
            None | Some(Value::Null) => Ok(None),
            Some(Value::Number(n)) => match (n.as_u64(), n.as_i64()) {
                (Some(u), _) => Ok(Some(u)),
                // diffusers-workflow (torch) accepts negative seeds; keep their bits.
                (None, Some(i)) => Ok(Some(i as u64)),
                _ => {
                    Err(self.at_value(pointer, format!("`seed` must be a whole number, found {n}")))
                }
            },
            Some(other) => Err(self.at_value(
                pointer,
                format!("`seed` must be a whole number, found {other}"),
            )),
        }
    }

    fn variables(
        &self,
        value: Option<&Value>,
        overrides: &[String],
    ) -> Result<BTreeMap<String, Value>, WorkflowError> {
        let mut variables = BTreeMap::new();
        if let Some(value) = value {
            for (name, default) in self.object(value, "/variables", "`variables`")? {
                variables.insert(name.clone(), default.clone());
            }
        }
        for raw in overrides {
            let Some((name, text)) = raw.split_once('=') else {
                return Err(self.error_at(None, format!("`{raw}` is not a variable assignment: write NAME=VALUE, e.g. prompt=\"a red fox\"")));
            };
            let name = name.trim();
            let Some(default) = variables.get(name) else {
                return Err(self.error_at(
                    None,
                    format!(
                    "unknown variable `{name}` given on the command line; declared variables: {}",
                    declared_list(&variables)
                ),
                ));
            };
            let converted = convert_override(default, text).map_err(|why| {
                self.at_value(
                    &format!("/variables/{}", pointer_segment(name)),
                    format!(
                        "variable `{name}` is {} (default {default}); the command line's {why}",
                        type_name(default)
                    ),
                )
            })?;
            variables.insert(name.to_string(), converted);
        }
        Ok(variables)
    }

    /// Replaces every `"variable:x"` string inside `value`.
    fn substitute(
        &self,
        value: &Value,
        pointer: &str,
        variables: &BTreeMap<String, Value>,
    ) -> Result<Value, WorkflowError> {
        Ok(match value {
            Value::String(s) => match s.strip_prefix("variable:") {
                Some(name) => variables.get(name).cloned().ok_or_else(|| {
                    self.at_value(
                        pointer,
                        format!(
                            "unknown variable `{name}` in {s:?}; declared variables: {}",
                            declared_list(variables)
                        ),
                    )
                })?,
                None => value.clone(),
            },
            Value::Array(items) => Value::Array(
                items
                    .iter()
                    .enumerate()
                    .map(|(i, v)| self.substitute(v, &format!("{pointer}/{i}"), variables))
                    .collect::<Result<_, _>>()?,
            ),
            Value::Object(map) => Value::Object(
                map.iter()
                    .map(|(k, v)| {
                        Ok((
                            k.clone(),
                            self.substitute(
                                v,
                                &format!("{pointer}/{}", pointer_segment(k)),
                                variables,
                            )?,
                        ))
                    })
                    .collect::<Result<_, WorkflowError>>()?,
            ),
            other => other.clone(),
        })
    }

    fn step(
        &self,
        value: &Value,
        pointer: &str,
        index: usize,
        workflow_seed: Option<u64>,
        earlier: &[Step],
    ) -> Result<Step, WorkflowError> {
        let step = self.object(value, pointer, "a step")?;
        self.known_keys(step, pointer, STEP_KEYS)?;
        let name = match step.get("name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(other) => return Err(self.at_value(&format!("{pointer}/name"), format!("a step's `name` must be a non-empty string, found {other}"))),
            None => return Err(self.at_value(pointer, "this step has no `name`; every step needs one (it names its outputs and `previous_result:` refers to it)")),
        };
        if name.contains('/') || name.contains("..") {
            return Err(self.at_value(&format!("{pointer}/name"), format!("step name {name:?} may not contain `/` or `..`: it becomes part of output file names")));
        }
        if earlier.iter().any(|s| s.name == name) {
            return Err(self.at_value(
                &format!("{pointer}/name"),
                format!("a step named `{name}` already exists; step names must be unique"),
            ));
        }
        let kinds: Vec<&str> = STEP_KINDS
            .iter()
            .copied()
            .filter(|k| step.contains_key(*k))
            .collect();
        match kinds.as_slice() {
            [] => {
                return Err(self.at_value(
                    pointer,
                    format!(
                        "step `{name}` has none of {}; a step has exactly one",
                        STEP_KINDS.join(", ")
                    ),
                ))
            }
            [_] => {}
            [first, second, ..] => {
                return Err(self.at_key(
                    &format!("{pointer}/{second}"),
                    format!(
                    "step `{name}` has both `{first}` and `{second}`; a step has exactly one of {}",
                    STEP_KINDS.join(", ")
                ),
                ))
            }
        }
        let kind = kinds[0];
        if kind != "pipeline" {
            return Err(self.at_key(
                &format!("{pointer}/{kind}"),
                format!("`{kind}` steps are not supported yet; supported: pipeline"),
            ));
        }
        let step_seed = self
            .seed(step.get("seed"), &format!("{pointer}/seed"))?
            .or(workflow_seed);
        let pipeline = self.pipeline(
            &step["pipeline"],
            &format!("{pointer}/pipeline"),
            step_seed,
            earlier,
        )?;
        let result = self.result(step.get("result"), &format!("{pointer}/result"))?;
        Ok(Step {
            name,
            index,
            pipeline,
            result,
        })
    }

    fn pipeline(
        &self,
        value: &Value,
        pointer: &str,
        inherited_seed: Option<u64>,
        earlier: &[Step],
    ) -> Result<PipelineStep, WorkflowError> {
        let pipeline = self.object(value, pointer, "`pipeline`")?;
        self.known_keys(pipeline, pointer, PIPELINE_KEYS)?;

        let config_ptr = format!("{pointer}/configuration");
        let configuration = pipeline.get("configuration").ok_or_else(|| {
            self.at_value(
                pointer,
                "`pipeline` needs a `configuration` with a `pipeline_type`",
            )
        })?;
        let configuration = self.object(configuration, &config_ptr, "`configuration`")?;
        self.known_keys(configuration, &config_ptr, CONFIGURATION_KEYS)?;
        let pipeline_type = match configuration.get("pipeline_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{config_ptr}/pipeline_type"),
                    format!("`pipeline_type` must be a string, found {other}"),
                ))
            }
            None => {
                return Err(self.at_value(
                    &config_ptr,
                    format!(
                        "missing `pipeline_type`; supported: {}",
                        SUPPORTED_PIPELINES.join(", ")
                    ),
                ))
            }
        };
        let Some(kind) = PipelineKind::from_type(&pipeline_type) else {
            return Err(self.at_value(
                &format!("{config_ptr}/pipeline_type"),
                format!(
                    "pipeline type `{pipeline_type}` is not supported; supported: {}",
                    SUPPORTED_PIPELINES.join(", ")
                ),
            ));
        };

        let fp_ptr = format!("{pointer}/from_pretrained_arguments");
        let from_pretrained = pipeline.get("from_pretrained_arguments").ok_or_else(|| {
            self.at_value(
                pointer,
                "`pipeline` needs `from_pretrained_arguments` with a `model_name`",
            )
        })?;
        let from_pretrained =
            self.object(from_pretrained, &fp_ptr, "`from_pretrained_arguments`")?;
        self.known_keys(from_pretrained, &fp_ptr, FROM_PRETRAINED_KEYS)?;
        let model_name = match from_pretrained.get("model_name") {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(other) => return Err(self.at_value(&format!("{fp_ptr}/model_name"), format!("`model_name` must be a folder or a hub id, found {other}"))),
            None => return Err(self.at_value(&fp_ptr, "missing `model_name`: a diffusers folder (relative to the workflow file) or a hub id")),
        };
        let torch_dtype = match from_pretrained.get("torch_dtype") {
            None => "torch.float32".to_string(),
            Some(Value::String(s)) if SUPPORTED_DTYPES.contains(&s.as_str()) => s.clone(),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{fp_ptr}/torch_dtype"),
                    format!(
                        "unsupported `torch_dtype` {other}; accepted: {}",
                        SUPPORTED_DTYPES.join(", ")
                    ),
                ))
            }
        };
        let variant = match from_pretrained.get("variant") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{fp_ptr}/variant"),
                    format!("`variant` must be a string such as \"fp16\", found {other}"),
                ))
            }
        };

        let scheduler = match pipeline.get("scheduler") {
            None => None,
            Some(value) => Some(self.scheduler(value, &format!("{pointer}/scheduler"))?),
        };
        let seed = self
            .seed(pipeline.get("seed"), &format!("{pointer}/seed"))?
            .or(inherited_seed);

        let args_ptr = format!("{pointer}/arguments");
        let arguments_json = match pipeline.get("arguments") {
            Some(value) => self.object(value, &args_ptr, "`arguments`")?.clone(),
            None => {
                return Err(self.at_value(
                    pointer,
                    "`pipeline` needs `arguments` (at least a `prompt`)",
                ))
            }
        };
        let arguments = StableDiffusionArguments::from_json(
            &arguments_json,
            kind,
            earlier
                .iter()
                .map(|s| s.name.as_str())
                .collect::<Vec<_>>()
                .as_slice(),
        )
        .map_err(|e| {
            self.at_value(
                &format!("{args_ptr}/{}", pointer_segment(&e.key)),
                e.message,
            )
        })?;

        let shared_components = self.component_list(
            pipeline.get("shared_components"),
            &format!("{pointer}/shared_components"),
        )?;
        let mut reused_components = Vec::new();
        let reused_ptr = format!("{pointer}/reused_components");
        for name in self.component_list(pipeline.get("reused_components"), &reused_ptr)? {
            let Some(sharer) = earlier
                .iter()
                .rev()
                .find(|s| s.pipeline.shared_components.contains(&name))
            else {
                let sharing: Vec<String> = earlier
                    .iter()
                    .flat_map(|s| {
                        s.pipeline
                            .shared_components
                            .iter()
                            .map(move |c| format!("{c} (from `{}`)", s.name))
                    })
                    .collect();
                let sharing = if sharing.is_empty() {
                    "none".to_string()
                } else {
                    sharing.join(", ")
                };
                return Err(self.at_value(&reused_ptr, format!("`reused_components` names `{name}`, which no earlier step lists in `shared_components`; shared so far: {sharing}")));
            };
            reused_components.push((name, sharer.name.clone()));
        }
        let model_name_at = self.positions.value(&format!("{fp_ptr}/model_name"));
        Ok(PipelineStep {
            shared_components,
            reused_components,
            pipeline_type,
            kind,
            model_name,
            model_name_at,
            torch_dtype,
            variant,
            scheduler,
            seed,
            arguments,
            arguments_json,
        })
    }

    fn component_list(
        &self,
        value: Option<&Value>,
        pointer: &str,
    ) -> Result<Vec<String>, WorkflowError> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        let items = value.as_array().ok_or_else(|| {
            self.at_value(
                pointer,
                format!("must be a list of component names, found {value}"),
            )
        })?;
        items
            .iter()
            .enumerate()
            .map(|(i, item)| match item.as_str() {
                Some(name) if SHAREABLE_COMPONENTS.contains(&name) => Ok(name.to_string()),
                _ => Err(self.at_value(
                    &format!("{pointer}/{i}"),
                    format!(
                        "unknown component {item}; these can be shared: {}",
                        SHAREABLE_COMPONENTS.join(", ")
                    ),
                )),
            })
            .collect()
    }

    fn scheduler(&self, value: &Value, pointer: &str) -> Result<SchedulerSpec, WorkflowError> {
        let scheduler = self.object(value, pointer, "`scheduler`")?;
        self.known_keys(scheduler, pointer, SCHEDULER_KEYS)?;
        let config_ptr = format!("{pointer}/configuration");
        let configuration = scheduler.get("configuration").ok_or_else(|| {
            self.at_value(
                pointer,
                "`scheduler` needs a `configuration` with a `scheduler_type`",
            )
        })?;
        let configuration = self.object(
            configuration,
            &config_ptr,
            "the scheduler's `configuration`",
        )?;
        self.known_keys(configuration, &config_ptr, SCHEDULER_CONFIGURATION_KEYS)?;
        let scheduler_type = match configuration.get("scheduler_type") {
            Some(Value::String(s)) => s.clone(),
            _ => return Err(self.at_value(&config_ptr, "the scheduler's `configuration` needs a `scheduler_type` string, e.g. \"DDIMScheduler\"")),
        };
        let from_config_args = match scheduler.get("from_config_args") {
            None => Map::new(),
            Some(value) => self
                .object(
                    value,
                    &format!("{pointer}/from_config_args"),
                    "`from_config_args`",
                )?
                .clone(),
        };
        Ok(SchedulerSpec {
            scheduler_type,
            from_config_args,
        })
    }

    fn result(&self, value: Option<&Value>, pointer: &str) -> Result<ResultSpec, WorkflowError> {
        let mut spec = ResultSpec::default();
        let Some(value) = value else { return Ok(spec) };
        let result = self.object(value, pointer, "`result`")?;
        self.known_keys(result, pointer, RESULT_KEYS)?;
        if let Some(content_type) = result.get("content_type") {
            match content_type {
                Value::String(s) if SUPPORTED_CONTENT_TYPES.contains(&s.as_str()) => {
                    spec.content_type = s.clone()
                }
                other => {
                    return Err(self.at_value(
                        &format!("{pointer}/content_type"),
                        format!(
                            "unsupported `content_type` {other}; accepted: {}",
                            SUPPORTED_CONTENT_TYPES.join(", ")
                        ),
                    ))
                }
            }
        }
        if let Some(base) = result.get("file_base_name") {
            match base {
                Value::String(s) if s.contains('/') || s.contains('\\') || s.contains("..") => {
                    return Err(self.at_value(&format!("{pointer}/file_base_name"), format!("`file_base_name` {s:?} may not contain `/`, `\\` or `..`: outputs stay inside the output directory")))
                }
                Value::String(s) => spec.file_base_name = s.clone(),
                other => return Err(self.at_value(&format!("{pointer}/file_base_name"), format!("`file_base_name` must be a string, found {other}"))),
            }
        }
        if let Some(embed) = result.get("embed_metadata") {
            spec.embed_metadata = embed.as_bool().ok_or_else(|| {
                self.at_value(
                    &format!("{pointer}/embed_metadata"),
                    format!("`embed_metadata` must be true or false, found {embed}"),
                )
            })?;
        }
        Ok(spec)
    }
}

/// Where serde_json says a syntax error is, as a [`Position`]. serde_json counts columns in
/// bytes, and reports column 0 when the text ends right after a newline; positions count
/// characters from 1.
fn json_error_position(source: &str, error: &serde_json::Error) -> Position {
    let line = error.line().max(1);
    let text = source.split('\n').nth(line - 1).unwrap_or("");
    let bytes = &text.as_bytes()[..error.column().min(text.len())];
    Position {
        line,
        column: String::from_utf8_lossy(bytes).chars().count().max(1),
    }
}

fn declared_list(variables: &BTreeMap<String, Value>) -> String {
    if variables.is_empty() {
        "none (add a `variables` object to the workflow)".to_string()
    } else {
        variables
            .keys()
            .map(String::as_str)
            .collect::<Vec<_>>()
            .join(", ")
    }
}

#[cfg(test)]
mod tests;
