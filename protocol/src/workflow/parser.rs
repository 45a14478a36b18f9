//! Reads a workflow's JSON into [`Workflow`]: variables first, then each step, checking
//! every key against diffusers-workflow's schema ([`super::schema`]) and every value
//! against what dw runs. Errors say `file:line:column` and name the offending key or value.

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{Map, Value};

use super::arguments::{Arguments, PreviousResult};
use super::positions::{pointer_segment, Position, Positions};
use super::results::{content_type_refusal, extension_for, ResultSpec};
use super::schema::{self, Level, Remark};
use super::variables::{self, type_name, Given};
use super::{
    sha256_hex, Action, ChildWorkflow, ComponentSource, LoraSpec, Note, OmittedComponent,
    PipelineStep, ReferenceStep, SchedulerSpec, Step, TaskStep, Workflow, WorkflowError,
};
use crate::families::{self, PipelineClass};

const STEP_KINDS: &[&str] = &["pipeline", "pipeline_reference", "task", "workflow"];

/// `torch_dtype` values and what they mean.
pub const SUPPORTED_DTYPES: &[&str] = &["torch.float32", "torch.float16", "torch.bfloat16"];

pub(super) struct Parser<'a> {
    path: &'a Path,
    source: &'a str,
    positions: Positions,
    remarks: Vec<Remark>,
}

type Parsed<T> = Result<T, WorkflowError>;

impl<'a> Parser<'a> {
    pub(super) fn new(path: &'a Path, source: &'a str) -> Self {
        Parser {
            path,
            source,
            positions: Positions::default(),
            remarks: Vec::new(),
        }
    }

    fn error_at(&self, position: Option<Position>, message: impl Into<String>) -> WorkflowError {
        WorkflowError {
            file: self.path.to_path_buf(),
            position,
            pointer: None,
            message: message.into(),
        }
    }

    fn at_value(&self, pointer: &str, message: impl Into<String>) -> WorkflowError {
        WorkflowError {
            pointer: Some(pointer.to_string()),
            ..self.error_at(Some(self.positions.value(pointer)), message)
        }
    }

    fn at_key(&self, pointer: &str, message: impl Into<String>) -> WorkflowError {
        WorkflowError {
            pointer: Some(pointer.to_string()),
            ..self.error_at(Some(self.positions.key(pointer)), message)
        }
    }

    fn check(&mut self, level: &Level, object: &Map<String, Value>, pointer: &str) -> Parsed<()> {
        level
            .check(object, pointer, &mut self.remarks)
            .map_err(|refusal| self.at_key(&refusal.pointer, refusal.message))
    }

    pub(super) fn workflow(mut self, given: &[(String, Given)]) -> Parsed<Workflow> {
        let raw: Value = serde_json::from_str(self.source).map_err(|e| self.json_error(&e))?;
        self.positions = Positions::index(self.source);
        let raw_root = object(&raw).ok_or_else(|| {
            self.at_value(
                "",
                format!(
                    "the workflow must be a JSON object, found {}",
                    type_name(&raw)
                ),
            )
        })?;
        let variables = self.variables(raw_root.get("variables"), given)?;
        let root = self.substitute_all(raw_root, &variables)?;
        self.check(&schema::WORKFLOW, &root, "")?;
        let id = self.name_field(
            &root,
            "",
            "id",
            "every workflow needs an `id` string, used in output names",
        )?;
        let workflow_seed = self.seed(root.get("seed"), "/seed")?;
        let steps_list = self.steps_list(&root)?;
        let mut steps: Vec<Step> = Vec::with_capacity(steps_list.len());
        for (index, raw_step) in steps_list.iter().enumerate() {
            let step = self.step(
                raw_step,
                &format!("/steps/{index}"),
                index,
                workflow_seed,
                &steps,
            )?;
            steps.push(step);
        }
        let notes = self.notes();
        Ok(Workflow {
            id,
            path: self.path.to_path_buf(),
            sha256: sha256_hex(self.source.as_bytes()),
            variables,
            steps,
            notes,
            cwd: None,
        })
    }

    fn json_error(&self, e: &serde_json::Error) -> WorkflowError {
        let text = e.to_string();
        let message = text
            .rsplit_once(" at line ")
            .map(|(m, _)| m.to_string())
            .unwrap_or(text);
        self.error_at(
            Some(json_error_position(self.source, e)),
            format!("invalid JSON: {message}"),
        )
    }

    fn notes(&self) -> Vec<Note> {
        self.remarks
            .iter()
            .map(|r| Note {
                position: Some(self.positions.key(&r.pointer)),
                severity: r.severity,
                message: r.message.clone(),
            })
            .collect()
    }

    fn variables(
        &self,
        value: Option<&Value>,
        given: &[(String, Given)],
    ) -> Parsed<BTreeMap<String, Value>> {
        let mut variables = BTreeMap::new();
        if let Some(value) = value {
            let declared = object(value).ok_or_else(|| {
                self.at_value(
                    "/variables",
                    format!(
                        "`variables` must be a JSON object, found {}",
                        type_name(value)
                    ),
                )
            })?;
            variables.extend(declared.iter().map(|(k, v)| (k.clone(), v.clone())));
        }
        for (name, value) in given {
            let Some(default) = variables.get(name.as_str()) else {
                return Err(self.error_at(
                    None,
                    format!(
                        "unknown variable `{name}` given; declared variables: {}",
                        declared_list(&variables)
                    ),
                ));
            };
            let converted = variables::convert(default, value).map_err(|why| {
                self.at_value(
                    &format!("/variables/{}", pointer_segment(name)),
                    format!(
                        "variable `{name}` is {} (default {default}); the given {why}",
                        type_name(default)
                    ),
                )
            })?;
            variables.insert(name.clone(), converted);
        }
        Ok(variables)
    }

    /// Replaces `variable:` references everywhere but in `variables` itself.
    fn substitute_all(
        &self,
        root: &Map<String, Value>,
        variables: &BTreeMap<String, Value>,
    ) -> Parsed<Map<String, Value>> {
        let mut out = Map::new();
        for (key, value) in root {
            let pointer = format!("/{}", pointer_segment(key));
            let value = if key == "variables" {
                value.clone()
            } else {
                variables::substitute(value, &pointer, variables).map_err(|(at, name)| {
                    self.at_value(
                        &at,
                        format!(
                        "unknown variable `{name}` in \"variable:{name}\"; declared variables: {}",
                        declared_list(variables)
                    ),
                    )
                })?
            };
            out.insert(key.clone(), value);
        }
        self.refuse_constants(&Value::Object(out.clone()), "")?;
        Ok(out)
    }

    /// `"constant:NAME"` names a Python object diffusers-workflow imports; dw cannot.
    fn refuse_constants(&self, value: &Value, pointer: &str) -> Parsed<()> {
        match value {
            Value::String(s) if s.starts_with("constant:") => Err(self.at_value(pointer, format!(
                "`{s}` is not supported: a `constant:` reference names a Python object, which dw cannot import; write its value instead"
            ))),
            Value::Array(items) => items
                .iter()
                .enumerate()
                .try_for_each(|(i, v)| self.refuse_constants(v, &format!("{pointer}/{i}"))),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                self.refuse_constants(v, &format!("{pointer}/{}", pointer_segment(k)))
            }),
            _ => Ok(()),
        }
    }

    /// A non-empty string that becomes part of output file names.
    fn name_field(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        key: &str,
        why: &str,
    ) -> Parsed<String> {
        let at = format!("{pointer}/{key}");
        let name = match object.get(key) {
            Some(Value::String(s)) if !s.trim().is_empty() => s.clone(),
            Some(other) => {
                return Err(self.at_value(
                    &at,
                    format!("`{key}` must be a non-empty string, found {other}"),
                ))
            }
            None => return Err(self.at_value(pointer, format!("missing `{key}`: {why}"))),
        };
        if name.contains('/') || name.contains('\\') || name.contains("..") || name.len() > 200 {
            return Err(self.at_value(&at, format!(
                "`{key}` {name:?} may not contain `/`, `\\` or `..` or pass 200 bytes: it becomes part of output file names"
            )));
        }
        Ok(name)
    }

    fn steps_list<'v>(&self, root: &'v Map<String, Value>) -> Parsed<&'v Vec<Value>> {
        match root.get("steps") {
            Some(Value::Array(items)) if !items.is_empty() => Ok(items),
            Some(Value::Array(_)) => Err(self.at_value(
                "/steps",
                "`steps` is empty: a workflow needs at least one step",
            )),
            Some(other) => Err(self.at_value(
                "/steps",
                format!(
                    "`steps` must be a list of steps, found {}",
                    type_name(other)
                ),
            )),
            None => Err(self.at_value(
                "",
                "missing `steps`: a workflow needs a list of at least one step",
            )),
        }
    }

    fn seed(&self, value: Option<&Value>, pointer: &str) -> Parsed<Option<u64>> {
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

    fn flag(&self, object: &Map<String, Value>, pointer: &str, key: &str) -> Parsed<bool> {
        match object.get(key) {
            None | Some(Value::Null) => Ok(false),
            Some(Value::Bool(b)) => Ok(*b),
            Some(other) => Err(self.at_value(
                &format!("{pointer}/{key}"),
                format!("`{key}` must be true or false, found {other}"),
            )),
        }
    }

    fn step(
        &mut self,
        value: &Value,
        pointer: &str,
        index: usize,
        workflow_seed: Option<u64>,
        earlier: &[Step],
    ) -> Parsed<Step> {
        let step = object(value).ok_or_else(|| {
            self.at_value(
                pointer,
                format!("a step must be a JSON object, found {}", type_name(value)),
            )
        })?;
        self.check(&schema::STEP, step, pointer)?;
        let name = self.name_field(
            step,
            pointer,
            "name",
            "every step needs one (it names its outputs and `previous_result:` refers to it)",
        )?;
        if earlier.iter().any(|s| s.name == name) {
            return Err(self.at_value(
                &format!("{pointer}/name"),
                format!("a step named `{name}` already exists; step names must be unique"),
            ));
        }
        let kind = self.step_kind(step, pointer, &name)?;
        let seed = self
            .seed(step.get("seed"), &format!("{pointer}/seed"))?
            .or(workflow_seed);
        let at = format!("{pointer}/{kind}");
        let action = match kind {
            "pipeline" => {
                Action::Pipeline(Box::new(self.pipeline(&step[kind], &at, seed, earlier)?))
            }
            "pipeline_reference" => {
                Action::Reference(self.reference(&step[kind], &at, seed, earlier)?)
            }
            "workflow" => Action::Workflow(self.child_workflow(&step[kind], &at, earlier)?),
            _ => Action::Task(self.task(&step[kind], &at, earlier)?),
        };
        Ok(Step {
            name,
            index,
            seed,
            action,
            result: self.result(step.get("result"), &format!("{pointer}/result"))?,
            release_pipeline: self.flag(step, pointer, "release_pipeline")?,
            release_models: self.flag(step, pointer, "release_models")?,
        })
    }

    fn step_kind(
        &self,
        step: &Map<String, Value>,
        pointer: &str,
        name: &str,
    ) -> Parsed<&'static str> {
        let kinds: Vec<&'static str> = STEP_KINDS
            .iter()
            .copied()
            .filter(|k| step.contains_key(*k))
            .collect();
        match kinds.as_slice() {
            [kind] => Ok(kind),
            [] => Err(self.at_value(
                pointer,
                format!(
                    "step `{name}` has none of {}; a step has exactly one",
                    STEP_KINDS.join(", ")
                ),
            )),
            [first, second, ..] => Err(self.at_key(
                &format!("{pointer}/{second}"),
                format!(
                    "step `{name}` has both `{first}` and `{second}`; a step has exactly one of {}",
                    STEP_KINDS.join(", ")
                ),
            )),
        }
    }

    fn object<'v>(
        &self,
        value: &'v Value,
        pointer: &str,
        what: &str,
    ) -> Parsed<&'v Map<String, Value>> {
        object(value).ok_or_else(|| {
            self.at_value(
                pointer,
                format!("{what} must be a JSON object, found {}", type_name(value)),
            )
        })
    }

    fn required<'v>(
        &self,
        object: &'v Map<String, Value>,
        pointer: &str,
        key: &str,
        what: &str,
    ) -> Parsed<&'v Value> {
        object
            .get(key)
            .ok_or_else(|| self.at_value(pointer, format!("missing `{key}`: {what}")))
    }

    /// A required member that must be a non-empty string.
    fn required_string(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        key: &str,
        what: &str,
    ) -> Parsed<String> {
        let value = self.required(object, pointer, key, what)?;
        self.string(value, &format!("{pointer}/{key}"), key)
    }

    fn string(&self, value: &Value, pointer: &str, key: &str) -> Parsed<String> {
        match value {
            Value::String(s) if !s.is_empty() => Ok(s.clone()),
            other => Err(self.at_value(
                pointer,
                format!("`{key}` must be a non-empty string, found {other}"),
            )),
        }
    }

    fn pipeline(
        &mut self,
        value: &Value,
        pointer: &str,
        step_seed: Option<u64>,
        earlier: &[Step],
    ) -> Parsed<PipelineStep> {
        let pipeline = self.object(value, pointer, "`pipeline`")?;
        let config_ptr = format!("{pointer}/configuration");
        let configuration = self.required(
            pipeline,
            pointer,
            "configuration",
            "a pipeline names its class in `configuration.component_type`",
        )?;
        let configuration = self.object(configuration, &config_ptr, "`configuration`")?;
        let (component_type, class) = self.pipeline_class(configuration, &config_ptr)?;
        self.check(&schema::PIPELINE, pipeline, pointer)?;
        self.check(&schema::CONFIGURATION, configuration, &config_ptr)?;
        let fp_ptr = format!("{pointer}/from_pretrained_arguments");
        let from_pretrained = self.required(
            pipeline,
            pointer,
            "from_pretrained_arguments",
            "it holds the `model_name` to load",
        )?;
        let from_pretrained =
            self.object(from_pretrained, &fp_ptr, "`from_pretrained_arguments`")?;
        let model = self.model_source(from_pretrained, &fp_ptr, false)?;
        let omitted_components =
            self.omitted_components(from_pretrained, &fp_ptr, &component_type, class)?;
        let options = self.configuration(configuration, &config_ptr, &model.torch_dtype)?;
        let scheduler = match pipeline.get("scheduler") {
            None => None,
            Some(value) => Some(self.scheduler(class, value, &format!("{pointer}/scheduler"))?),
        };
        let seed = self
            .seed(pipeline.get("seed"), &format!("{pointer}/seed"))?
            .or(step_seed);
        let (class, arguments, arguments_json) =
            self.pipeline_arguments(pipeline, pointer, &component_type, class, earlier)?;
        let shared_components = [
            self.component_list(
                pipeline.get("shared_components"),
                &format!("{pointer}/shared_components"),
                "shared",
            )?,
            self.component_list(
                configuration.get("shared_components"),
                &format!("{config_ptr}/shared_components"),
                "shared",
            )?,
        ]
        .concat();
        let reused_components = self.reused(pipeline, configuration, pointer, earlier)?;
        let components = self.components(class, pipeline, pointer, &model.torch_dtype)?;
        let loras = self.loras(pipeline.get("loras"), pointer, &component_type, class)?;
        Ok(PipelineStep {
            component_type,
            class,
            model_name: model.model_name.unwrap_or_default(),
            model_name_at: self.positions.value(&format!("{fp_ptr}/model_name")),
            torch_dtype: model.torch_dtype,
            variant: model.variant,
            scheduler,
            seed,
            arguments,
            arguments_json,
            shared_components,
            reused_components,
            components,
            omitted_components,
            loras,
            options,
        })
    }

    /// A pipeline's arguments, checked against its class. An auto class is checked against
    /// each class it may resolve to, and read as the first that takes them, until the
    /// model's folder says which it is.
    fn pipeline_arguments(
        &self,
        pipeline: &Map<String, Value>,
        pointer: &str,
        component_type: &str,
        class: &'static PipelineClass,
        earlier: &[Step],
    ) -> Parsed<(&'static PipelineClass, Arguments, Map<String, Value>)> {
        let first = match self.arguments(pipeline, pointer, class, earlier) {
            Ok((arguments, json)) => return Ok((class, arguments, json)),
            Err(e) if !families::is_auto_class(component_type) => return Err(e),
            Err(e) => e,
        };
        let candidates = families::auto_candidates(component_type);
        let mut failures = Vec::with_capacity(candidates.len());
        for candidate in &candidates {
            match self.arguments(pipeline, pointer, candidate, earlier) {
                Ok((arguments, json)) => return Ok((candidate, arguments, json)),
                Err(e) => failures.push((*candidate, e)),
            }
        }
        // No class takes them: the error worth showing is that of a class that knows every
        // argument written (a value is wrong), else the written class's (a name is unknown).
        let written: Vec<&str> = pipeline
            .get("arguments")
            .and_then(Value::as_object)
            .map(|arguments| arguments.keys().map(String::as_str).collect())
            .unwrap_or_default();
        let knows_all = |c: &PipelineClass| written.iter().all(|key| c.argument(key).is_some());
        let names = candidates
            .iter()
            .map(|c| c.name)
            .collect::<Vec<_>>()
            .join(", ");
        let (e, why) = match failures.into_iter().find(|(c, _)| knows_all(c)) {
            Some((c, e)) => (
                e,
                format!("{} is the one that takes every argument written", c.name),
            ),
            None => (
                first,
                format!(
                    "none of them takes every argument written; shown for {}",
                    class.name
                ),
            ),
        };
        Err(WorkflowError {
            message: format!(
                "{} (`{component_type}` may be any of {names} until its model's class is known; {why})",
                e.message
            ),
            ..e
        })
    }

    /// `configuration.component_type`: a class name, bare or as `diffusers.Name`.
    fn pipeline_class(
        &self,
        configuration: &Map<String, Value>,
        pointer: &str,
    ) -> Parsed<(String, &'static PipelineClass)> {
        let at = format!("{pointer}/component_type");
        let written = match configuration.get("component_type") {
            Some(Value::String(s)) => s.clone(),
            Some(other) => return Err(self.at_value(&at, format!("`component_type` must be a class name such as \"StableDiffusionPipeline\", found {other}"))),
            None => return Err(self.at_value(pointer, format!(
                "missing `component_type`: the pipeline class to run; supported: {}",
                families::supported_classes().join(", ")
            ))),
        };
        let class =
            families::pipeline_class(&written).map_err(|message| self.at_value(&at, message))?;
        Ok((written, class))
    }

    fn configuration(
        &mut self,
        configuration: &Map<String, Value>,
        pointer: &str,
        pipeline_dtype: &str,
    ) -> Parsed<super::PipelineOptions> {
        let offload = match configuration.get("offload") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if s == "model" || s == "sequential" => Some(s.clone()),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{pointer}/offload"),
                    format!("`offload` must be \"model\" or \"sequential\", found {other}"),
                ))
            }
        };
        let device = match configuration.get("device") {
            None | Some(Value::Null) => None,
            Some(value) => Some(self.device(value, &format!("{pointer}/device"))?),
        };
        let vae_ptr = format!("{pointer}/vae");
        let mut options = super::PipelineOptions {
            offload,
            exclude_from_cpu_offload: self.component_list(
                configuration.get("exclude_from_cpu_offload"),
                &format!("{pointer}/exclude_from_cpu_offload"),
                "kept on the device",
            )?,
            group_offload: configuration.contains_key("group_offload"),
            device,
            no_generator: self.flag(configuration, pointer, "no_generator")?,
            vae_slicing: false,
            vae_tiling: false,
        };
        for (slot, level) in [
            ("vae", &schema::CONFIGURATION_VAE),
            ("unet", &schema::CONFIGURATION_UNET),
            ("transformer", &schema::CONFIGURATION_TRANSFORMER),
            ("text_encoder", &schema::CONFIGURATION_TEXT_ENCODER),
        ] {
            if let Some(value) = configuration.get(slot) {
                let at = format!("{pointer}/{slot}");
                let block = self.object(value, &at, &format!("`configuration.{slot}`"))?;
                self.check(level, block, &at)?;
                if let Some(dtype) = block.get("torch_dtype") {
                    self.same_dtype(dtype, &format!("{at}/torch_dtype"), slot, pipeline_dtype)?;
                }
            }
        }
        if let Some(Value::Object(vae)) = configuration.get("vae") {
            options.vae_slicing = self.flag(vae, &vae_ptr, "enable_slicing")?;
            options.vae_tiling = self.flag(vae, &vae_ptr, "enable_tiling")?;
        }
        Ok(options)
    }

    fn device(&self, value: &Value, pointer: &str) -> Parsed<String> {
        match value.as_str() {
            Some(s) if s == "cpu" || s == "cuda" || s.strip_prefix("cuda:").is_some_and(|n| n.parse::<u32>().is_ok()) => Ok(s.to_string()),
            Some(s @ "mps") => Err(self.at_value(pointer, format!("`device` \"{s}\" is not supported: dw runs on the CPU and on CUDA; accepted: cpu, cuda, cuda:N"))),
            _ => Err(self.at_value(pointer, format!("`device` must be \"cpu\", \"cuda\" or \"cuda:N\", found {value}"))),
        }
    }

    /// A component's own `torch_dtype`: dw runs a pipeline in one dtype, so it must be the
    /// pipeline's.
    fn same_dtype(
        &self,
        value: &Value,
        pointer: &str,
        slot: &str,
        pipeline_dtype: &str,
    ) -> Parsed<()> {
        let dtype = self.dtype(value, pointer)?;
        if dtype == pipeline_dtype {
            return Ok(());
        }
        Err(self.at_value(pointer, format!(
            "`{slot}` asks for {dtype} but the pipeline runs in {pipeline_dtype}: dw runs a pipeline in one dtype"
        )))
    }

    fn dtype(&self, value: &Value, pointer: &str) -> Parsed<String> {
        match value.as_str() {
            Some(s) if SUPPORTED_DTYPES.contains(&s) => Ok(s.to_string()),
            _ => Err(self.at_value(
                pointer,
                format!(
                    "unsupported `torch_dtype` {value}; accepted: {}",
                    SUPPORTED_DTYPES.join(", ")
                ),
            )),
        }
    }

    fn model_source(
        &mut self,
        object: &Map<String, Value>,
        pointer: &str,
        component: bool,
    ) -> Parsed<ModelSource> {
        // A pipeline's component names are read by `omitted_components`.
        let known: Map<String, Value> = object
            .iter()
            .filter(|(key, _)| component || !schema::COMPONENT_SLOTS.contains(&key.as_str()))
            .map(|(key, value)| (key.clone(), value.clone()))
            .collect();
        self.check(&schema::FROM_PRETRAINED, &known, pointer)?;
        let model_name = match object.get("model_name") {
            Some(value) => Some(self.string(value, &format!("{pointer}/model_name"), "model_name")?),
            None if component => None,
            None => return Err(self.at_value(pointer, "missing `model_name`: a diffusers folder (relative to the workflow file) or a hub id")),
        };
        let torch_dtype = match object.get("torch_dtype") {
            None | Some(Value::Null) => "torch.float32".to_string(),
            Some(value) => self.dtype(value, &format!("{pointer}/torch_dtype"))?,
        };
        let variant = match object.get("variant") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{pointer}/variant"),
                    format!("`variant` must be a string such as \"fp16\", found {other}"),
                ))
            }
        };
        let subfolder = match object.get("subfolder") {
            None | Some(Value::Null) => None,
            Some(_) if !component => return Err(self.at_key(&format!("{pointer}/subfolder"), "`subfolder` names a component's folder inside its model; a pipeline loads from the model's top folder")),
            Some(Value::String(s)) if !s.contains("..") && !s.starts_with('/') => Some(s.clone()),
            Some(other) => return Err(self.at_value(&format!("{pointer}/subfolder"), format!("`subfolder` must be a folder name inside the model, found {other}"))),
        };
        Ok(ModelSource {
            model_name,
            torch_dtype,
            variant,
            subfolder,
        })
    }

    /// The `loras` list: each LoRA's file, name and weight, as diffusers-workflow reads
    /// them (`adapter_name` defaults to the index, `scale` to 1.0 and may be a number
    /// written as text, as Python's `float()` takes it). A family without LoRAs yet is
    /// refused here when the class is known, else once its folder says which it is.
    fn loras(
        &mut self,
        value: Option<&Value>,
        pointer: &str,
        component_type: &str,
        class: &PipelineClass,
    ) -> Parsed<Vec<LoraSpec>> {
        let Some(value) = value else {
            return Ok(Vec::new());
        };
        let at = format!("{pointer}/loras");
        let Value::Array(items) = value else {
            return Err(self.at_value(
                &at,
                format!(
                    "`loras` must be a list of LoRAs, each {{\"model_name\": ...}}, found {}",
                    type_name(value)
                ),
            ));
        };
        if items.len() > MAX_LORAS {
            return Err(self.at_value(
                &at,
                format!(
                    "`loras` lists {} LoRAs; at most {MAX_LORAS} run on one pipeline",
                    items.len()
                ),
            ));
        }
        if !items.is_empty() && !families::is_auto_class(component_type) {
            if let Some(family) = families::family(class.family).filter(|f| !f.loras) {
                return Err(self.at_key(&at, families::loras_refusal(family)));
            }
        }
        let mut loras: Vec<LoraSpec> = Vec::with_capacity(items.len());
        for (index, item) in items.iter().enumerate() {
            let lora = self.lora(item, &format!("{at}/{index}"), index)?;
            if let Some(first) = loras
                .iter()
                .position(|l| l.adapter_name == lora.adapter_name)
            {
                return Err(self.at_value(
                    &format!("{at}/{index}/adapter_name"),
                    format!("adapter name `{}` is already LoRA {first}'s; diffusers refuses a name twice", lora.adapter_name),
                ));
            }
            loras.push(lora);
        }
        Ok(loras)
    }

    /// One entry of `loras`.
    fn lora(&mut self, value: &Value, at: &str, index: usize) -> Parsed<LoraSpec> {
        let object = self.object(value, at, "a LoRA")?;
        self.check(&schema::LORA, object, at)?;
        let model_name = self.required(
            object,
            at,
            "model_name",
            "it names the LoRA's folder, file or hub id",
        )?;
        let model_name = self.string(model_name, &format!("{at}/model_name"), "model_name")?;
        let inner = |parser: &Self, key: &str| -> Parsed<Option<String>> {
            match object.get(key) {
                None | Some(Value::Null) => Ok(None),
                Some(Value::String(s)) if !s.is_empty() && !s.contains("..") && !s.starts_with('/') => Ok(Some(s.clone())),
                Some(other) => Err(parser.at_value(&format!("{at}/{key}"), format!("`{key}` must name a file or folder inside the LoRA's folder, found {other}"))),
            }
        };
        let weight_name = inner(self, "weight_name")?;
        let subfolder = inner(self, "subfolder")?;
        let adapter_name = match object.get("adapter_name") {
            None | Some(Value::Null) => index.to_string(),
            Some(Value::String(s)) if !s.is_empty() => s.clone(),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{at}/adapter_name"),
                    format!("`adapter_name` must be a non-empty string, found {other}"),
                ))
            }
        };
        let scale = match object.get("scale") {
            None | Some(Value::Null) => 1.0,
            Some(value) => self.lora_scale(value, &format!("{at}/scale"))?,
        };
        Ok(LoraSpec {
            model_name,
            model_name_at: self.positions.value(&format!("{at}/model_name")),
            weight_name,
            subfolder,
            adapter_name,
            scale,
        })
    }

    /// A LoRA's `scale`: a finite number, or text Python's `float()` reads as one.
    fn lora_scale(&self, value: &Value, at: &str) -> Parsed<f64> {
        let number = match value {
            Value::Number(n) => n.as_f64(),
            Value::String(s) => s.trim().parse::<f64>().ok(),
            _ => None,
        };
        number.filter(|n| n.is_finite()).ok_or_else(|| {
            self.at_value(
                at,
                format!("`scale` must be a finite number (or text of one), found {value}"),
            )
        })
    }

    /// Components a pipeline's `from_pretrained_arguments` sets to null
    /// (`"text_encoder_3": null`): diffusers then loads the pipeline without them. Only
    /// null can be written there (a loaded object is Python's); a class known here is
    /// checked now, an auto class once its folder says which it is.
    fn omitted_components(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        component_type: &str,
        class: &PipelineClass,
    ) -> Parsed<Vec<OmittedComponent>> {
        let mut omitted = Vec::new();
        for (key, value) in object {
            if !schema::COMPONENT_SLOTS.contains(&key.as_str()) {
                continue;
            }
            let at = format!("{pointer}/{key}");
            if !value.is_null() {
                return Err(self.at_value(&at, format!("`{key}` in `from_pretrained_arguments` can only be null, which loads the pipeline without it; to load it from another model, give a `{key}` block beside `configuration`")));
            }
            omitted.push(OmittedComponent {
                name: key.clone(),
                at: self.positions.key(&at),
            });
        }
        if !families::is_auto_class(component_type) {
            if let Some(family) = families::family(class.family) {
                for component in &omitted {
                    families::check_omitted(family, &component.name)
                        .map_err(|m| self.at_key(&format!("{pointer}/{}", component.name), m))?;
                }
            }
        }
        Ok(omitted)
    }

    /// Component blocks beside `configuration` (`"vae": {...}`): where a component is
    /// loaded from instead of the pipeline's own folder.
    fn components(
        &mut self,
        class: &PipelineClass,
        pipeline: &Map<String, Value>,
        pointer: &str,
        pipeline_dtype: &str,
    ) -> Parsed<Vec<ComponentSource>> {
        let mut sources = Vec::new();
        for slot in schema::COMPONENT_SLOTS {
            let Some(value) = pipeline.get(*slot) else {
                continue;
            };
            let at = format!("{pointer}/{slot}");
            let block = self.object(value, &at, &format!("`{slot}`"))?;
            self.check(&schema::COMPONENT, block, &at)?;
            let config = self.required(
                block,
                &at,
                "configuration",
                "a component names its class in `configuration.component_type`",
            )?;
            let config_ptr = format!("{at}/configuration");
            let config = self.object(config, &config_ptr, "the component's `configuration`")?;
            self.check(&schema::COMPONENT_CONFIGURATION, config, &config_ptr)?;
            let written = self.required_string(
                config,
                &config_ptr,
                "component_type",
                "the component's class",
            )?;
            families::check_component(class, slot, &written)
                .map_err(|m| self.at_value(&format!("{config_ptr}/component_type"), m))?;
            let fp_ptr = format!("{at}/from_pretrained_arguments");
            let fp = self.object(
                self.required(
                    block,
                    &at,
                    "from_pretrained_arguments",
                    "it holds the `model_name` to load the component from",
                )?,
                &fp_ptr,
                "`from_pretrained_arguments`",
            )?;
            let model = self.model_source(fp, &fp_ptr, true)?;
            if let Some(dtype) = fp.get("torch_dtype") {
                self.same_dtype(
                    dtype,
                    &format!("{fp_ptr}/torch_dtype"),
                    slot,
                    pipeline_dtype,
                )?;
            }
            let Some(model_name) = model.model_name else {
                return Err(self.at_value(
                    &fp_ptr,
                    format!("`{slot}` needs a `model_name` to load from"),
                ));
            };
            sources.push(ComponentSource {
                slot: slot.to_string(),
                model_name,
                subfolder: model.subfolder,
                at: self.positions.value(&format!("{fp_ptr}/model_name")),
            });
        }
        Ok(sources)
    }

    fn reused(
        &self,
        pipeline: &Map<String, Value>,
        configuration: &Map<String, Value>,
        pointer: &str,
        earlier: &[Step],
    ) -> Parsed<Vec<(String, String)>> {
        let mut reused = Vec::new();
        for (object, at) in [
            (pipeline, format!("{pointer}/reused_components")),
            (
                configuration,
                format!("{pointer}/configuration/reused_components"),
            ),
        ] {
            for name in self.component_list(object.get("reused_components"), &at, "shared")? {
                let sharer = earlier.iter().rev().find(|s| s.shares(&name)).ok_or_else(|| {
                    self.at_value(&at, format!(
                        "`reused_components` names `{name}`, which no earlier step lists in `shared_components`; shared so far: {}",
                        shared_so_far(earlier)
                    ))
                })?;
                reused.push((name, sharer.name.clone()));
            }
        }
        Ok(reused)
    }

    fn arguments(
        &self,
        object: &Map<String, Value>,
        pointer: &str,
        class: &'static PipelineClass,
        earlier: &[Step],
    ) -> Parsed<(Arguments, Map<String, Value>)> {
        let args_ptr = format!("{pointer}/arguments");
        let json = self.required(
            object,
            pointer,
            "arguments",
            "the pipeline's call arguments, at least a `prompt`",
        )?;
        let json = self.object(json, &args_ptr, "`arguments`")?.clone();
        self.check_references(&Value::Object(json.clone()), &args_ptr, earlier)?;
        let typed = Arguments::check(&json, class).map_err(|e| {
            self.at_value(
                &format!("{args_ptr}/{}", pointer_segment(&e.key)),
                e.message,
            )
        })?;
        Ok((typed, json))
    }

    /// Every `previous_result:` inside `value` must name an earlier step.
    fn check_references(&self, value: &Value, pointer: &str, earlier: &[Step]) -> Parsed<()> {
        match value {
            Value::String(_) => match PreviousResult::parse(value) {
                Some(reference) => reference
                    .resolve(earlier.iter().map(|s| s.name.as_str()))
                    .map(|_| ())
                    .map_err(|m| self.at_value(pointer, m)),
                None => Ok(()),
            },
            Value::Array(items) => items.iter().enumerate().try_for_each(|(i, v)| {
                self.check_references(v, &format!("{pointer}/{i}"), earlier)
            }),
            Value::Object(map) => map.iter().try_for_each(|(k, v)| {
                self.check_references(v, &format!("{pointer}/{}", pointer_segment(k)), earlier)
            }),
            _ => Ok(()),
        }
    }

    fn reference(
        &mut self,
        value: &Value,
        pointer: &str,
        seed: Option<u64>,
        earlier: &[Step],
    ) -> Parsed<ReferenceStep> {
        let reference = self.object(value, pointer, "`pipeline_reference`")?;
        self.check(&schema::PIPELINE_REFERENCE, reference, pointer)?;
        let at = format!("{pointer}/reference_name");
        let name = self.required_string(
            reference,
            pointer,
            "reference_name",
            "the name of an earlier `pipeline` step",
        )?;
        let target = earlier.iter().find_map(|s| match &s.action {
            Action::Pipeline(p) if s.name == name && !s.release_pipeline => Some(p),
            _ => None,
        });
        let Some(target) = target else {
            return Err(self.at_value(&at, format!(
                "`reference_name` `{name}` names no earlier `pipeline` step that keeps its pipeline; pipeline steps so far: {}",
                pipeline_steps(earlier)
            )));
        };
        let (arguments, arguments_json) =
            self.arguments(reference, pointer, target.class, earlier)?;
        Ok(ReferenceStep {
            reference_name: name,
            class: target.class,
            seed,
            arguments,
            arguments_json,
        })
    }

    fn child_workflow(
        &mut self,
        value: &Value,
        pointer: &str,
        earlier: &[Step],
    ) -> Parsed<ChildWorkflow> {
        let child = self.object(value, pointer, "`workflow`")?;
        self.check(&schema::WORKFLOW_REFERENCE, child, pointer)?;
        let at = format!("{pointer}/path");
        let path = self.required_string(
            child,
            pointer,
            "path",
            "the child workflow's file, relative to this one",
        )?;
        if path.starts_with("builtin:") {
            return Err(self.at_value(&at, format!("`{path}` is not supported: diffusers-workflow's built-in workflows run models dw does not build; give a file path")));
        }
        let arguments = match child.get("arguments") {
            None | Some(Value::Null) => Map::new(),
            Some(value) => self
                .object(value, &format!("{pointer}/arguments"), "`arguments`")?
                .clone(),
        };
        self.check_references(
            &Value::Object(arguments.clone()),
            &format!("{pointer}/arguments"),
            earlier,
        )?;
        Ok(ChildWorkflow {
            path,
            path_at: self.positions.value(&at),
            arguments,
        })
    }

    fn task(&mut self, value: &Value, pointer: &str, earlier: &[Step]) -> Parsed<TaskStep> {
        let task = self.object(value, pointer, "`task`")?;
        self.check(&schema::TASK, task, pointer)?;
        let at = format!("{pointer}/command");
        let command = self.required_string(task, pointer, "command", "the task to run")?;
        super::tasks::check(&command).map_err(|m| self.at_value(&at, m))?;
        let arguments = match task.get("arguments") {
            None | Some(Value::Null) => None,
            Some(value) => Some(
                self.object(value, &format!("{pointer}/arguments"), "`arguments`")?
                    .clone(),
            ),
        };
        let inputs = match task.get("inputs") {
            None | Some(Value::Null) => None,
            Some(Value::Array(items)) => Some(items.clone()),
            Some(other) => {
                return Err(self.at_value(
                    &format!("{pointer}/inputs"),
                    format!(
                        "`inputs` must be a list (one run per item), found {}",
                        type_name(other)
                    ),
                ))
            }
        };
        if arguments.is_none() && inputs.is_none() {
            return Err(self.at_value(
                pointer,
                format!("task `{command}` needs `arguments` or `inputs`"),
            ));
        }
        if let Some(arguments) = &arguments {
            self.check_references(
                &Value::Object(arguments.clone()),
                &format!("{pointer}/arguments"),
                earlier,
            )?;
        }
        Ok(TaskStep {
            command,
            arguments,
            inputs,
        })
    }

    /// A list of component names (for sharing, or for keeping on the device: `purpose`).
    fn component_list(
        &self,
        value: Option<&Value>,
        pointer: &str,
        purpose: &str,
    ) -> Parsed<Vec<String>> {
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
                Some(name) if families::component_names().contains(&name) => Ok(name.to_string()),
                _ => Err(self.at_value(
                    &format!("{pointer}/{i}"),
                    format!(
                        "component {item} cannot be {purpose}: pipelines have {}",
                        families::component_names().join(", ")
                    ),
                )),
            })
            .collect()
    }

    fn scheduler(
        &mut self,
        class: &PipelineClass,
        value: &Value,
        pointer: &str,
    ) -> Parsed<SchedulerSpec> {
        let scheduler = self.object(value, pointer, "`scheduler`")?;
        self.check(&schema::SCHEDULER, scheduler, pointer)?;
        let config_ptr = format!("{pointer}/configuration");
        let configuration = self.required(
            scheduler,
            pointer,
            "configuration",
            "the scheduler's `configuration` holds its `scheduler_type`",
        )?;
        let configuration = self.object(
            configuration,
            &config_ptr,
            "the scheduler's `configuration`",
        )?;
        self.check(&schema::SCHEDULER_CONFIGURATION, configuration, &config_ptr)?;
        let scheduler_type = match configuration.get("scheduler_type") {
            Some(Value::String(s)) => s.strip_prefix("diffusers.").unwrap_or(s).to_string(),
            _ => return Err(self.at_value(&config_ptr, "the scheduler's `configuration` needs a `scheduler_type` string, e.g. \"DDIMScheduler\"")),
        };
        let schedulers = families::family(class.family).map_or(&[][..], |f| f.schedulers);
        if !schedulers.contains(&scheduler_type.as_str()) {
            return Err(self.at_value(
                &format!("{config_ptr}/scheduler_type"),
                format!(
                    "scheduler `{scheduler_type}` is not supported for {}; supported: {}",
                    class.name,
                    schedulers.join(", ")
                ),
            ));
        }
        let from_config_args = match scheduler.get("from_config_args") {
            None => Map::new(),
            Some(value) => unbrace_types(self.object(
                value,
                &format!("{pointer}/from_config_args"),
                "`from_config_args`",
            )?),
        };
        Ok(SchedulerSpec {
            scheduler_type,
            from_config_args,
        })
    }

    fn result(&mut self, value: Option<&Value>, pointer: &str) -> Parsed<ResultSpec> {
        let mut spec = ResultSpec::default();
        let Some(value) = value else { return Ok(spec) };
        let result = self.object(value, pointer, "`result`")?;
        self.check(&schema::RESULT, result, pointer)?;
        spec.content_type = match result.get("content_type") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if extension_for(s).is_some() => Some(s.clone()),
            Some(Value::String(s)) => {
                return Err(
                    self.at_value(&format!("{pointer}/content_type"), content_type_refusal(s))
                )
            }
            Some(other) => {
                return Err(self.at_value(
                    &format!("{pointer}/content_type"),
                    format!("`content_type` must be a string such as \"image/png\", found {other}"),
                ))
            }
        };
        spec.save = match result.get("save") {
            None | Some(Value::Null) => true,
            Some(_) => self.flag(result, pointer, "save")?,
        };
        spec.embed_metadata = self.flag(result, pointer, "embed_metadata")?;
        if let Some(base) = result.get("file_base_name") {
            match base {
                Value::String(s) if s.contains('/') || s.contains('\\') || s.contains("..") => {
                    return Err(self.at_value(&format!("{pointer}/file_base_name"), format!("`file_base_name` {s:?} may not contain `/`, `\\` or `..`: outputs stay inside the output directory")))
                }
                Value::String(s) => spec.file_base_name = s.clone(),
                other => return Err(self.at_value(&format!("{pointer}/file_base_name"), format!("`file_base_name` must be a string, found {other}"))),
            }
        }
        Ok(spec)
    }
}

/// The most LoRAs one pipeline takes: each is a cached component and a branch on every
/// layer it targets.
const MAX_LORAS: usize = 16;

/// What `from_pretrained_arguments` says about where and how to load.
struct ModelSource {
    model_name: Option<String>,
    torch_dtype: String,
    variant: Option<String>,
    subfolder: Option<String>,
}

/// diffusers-workflow reads every `*_type` / `*_dtype` value as a Python type name unless
/// it is written in braces, which it strips (`"algorithm_type": "{dpmsolver++}"`); dw
/// strips them the same way and also takes the bare value diffusers' config holds.
fn unbrace_types(arguments: &Map<String, Value>) -> Map<String, Value> {
    arguments
        .iter()
        .map(|(key, value)| {
            let typed = key.ends_with("_type") || key.ends_with("_dtype") || key == "dtype";
            let value = match value.as_str() {
                Some(text) if typed && text.starts_with('{') && text.ends_with('}') => {
                    Value::String(text.trim_matches(|c| c == '{' || c == '}').to_string())
                }
                _ => value.clone(),
            };
            (key.clone(), value)
        })
        .collect()
}

fn object(value: &Value) -> Option<&Map<String, Value>> {
    value.as_object()
}

fn shared_so_far(earlier: &[Step]) -> String {
    let sharing: Vec<String> = earlier
        .iter()
        .filter_map(|s| match &s.action {
            Action::Pipeline(p) => Some((s, p)),
            _ => None,
        })
        .flat_map(|(s, p)| {
            p.shared_components
                .iter()
                .map(move |c| format!("{c} (from `{}`)", s.name))
        })
        .collect();
    if sharing.is_empty() {
        "none".to_string()
    } else {
        sharing.join(", ")
    }
}

fn pipeline_steps(earlier: &[Step]) -> String {
    let names: Vec<&str> = earlier
        .iter()
        .filter(|s| matches!(s.action, Action::Pipeline(_)))
        .map(|s| s.name.as_str())
        .collect();
    if names.is_empty() {
        "none".to_string()
    } else {
        names.join(", ")
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
