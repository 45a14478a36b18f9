//! What a step needs loaded: its model folder, its pipeline class (an auto class resolved
//! from the folder's `model_index.json`), its family's components by their names in
//! `model_index.json`, keyed by their weights, what each will take in memory, and taking
//! them from the cache, making room first.
//!
//! Both a run and a dry run go through [`plan_step`]; only a run then calls
//! [`load_pipeline`]. Room is made, or the run refused with the sizes, before anything is
//! loaded. Nothing here knows a family: the family's table lists its components, and
//! [`components`](crate::pipelines::components) says how each class is loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use protocol::families::{self, ComponentSpec, FolderComponentError};
use protocol::message::PlannedComponent;
use protocol::workflow::{
    LoraSpec, PipelineClass, PipelineStep, Position, Step, Workflow, WorkflowError,
};

use crate::budget::weights_bytes;
use crate::cache::{ComponentCache, ComponentKey, Evicted, FileIdentity, Lookup};
use crate::failure::JobError;
use crate::models::{hub_cache_dir, resolve_model};
use crate::pipelines::components::{self, ComponentLoader};
use crate::pipelines::placement::Offload;
use crate::pipelines::{self, Parts, Pipeline, PipelineError};

/// One component a step needs.
#[derive(Clone)]
pub struct PlannedLoad {
    pub spec: &'static ComponentSpec,
    pub loader: &'static ComponentLoader,
    /// The component's folder.
    pub dir: PathBuf,
    /// The dtype it is loaded in (its family may keep it above the pipeline's).
    pub dtype: DType,
    pub key: ComponentKey,
    /// Bytes once loaded (from the safetensors headers).
    pub bytes: u64,
    /// For a LoRA: the name it is loaded under and its weight.
    pub adapter: Option<(String, f64)>,
    /// Loaded to host memory for model offload, placed on the device while it runs.
    pub offloaded: bool,
}

/// Everything resolved for a step before loading.
#[derive(Clone)]
pub struct StepPlan {
    pub model_dir: PathBuf,
    /// Its `model_index.json`, read once for the whole step.
    pub index: families::ModelIndex,
    /// The class that runs: the one written, or what an auto class resolves to.
    pub class: &'static PipelineClass,
    pub dtype: DType,
    /// Set when the requested dtype was replaced (half precision on the CPU).
    pub dtype_notice: Option<String>,
    pub components: Vec<PlannedLoad>,
    /// How its large components are placed (`configuration.offload`, where the family
    /// builds it).
    pub offload: Offload,
}

/// Where a step's components are planned: its place in the workflow and the device.
pub struct PlanContext<'a> {
    pub workflow: &'a Workflow,
    pub step: &'a Step,
    pub spec: &'a PipelineStep,
    pub device: &'a Device,
    pub device_name: &'a str,
    /// Model folders of earlier steps, for `reused_components`.
    pub model_dirs: &'a HashMap<String, PathBuf>,
}

/// The dtype a step runs in: its `torch_dtype`, or f32 where the device does not run half
/// precision well, with the notice to show.
pub fn dtype_for(torch_dtype: &str, device: &Device) -> (DType, Option<String>) {
    let asked = match torch_dtype {
        "torch.float16" => DType::F16,
        "torch.bfloat16" => DType::BF16,
        _ => DType::F32,
    };
    if asked != DType::F32 && device.is_cpu() {
        return (
            DType::F32,
            Some(format!(
                "{torch_dtype} is slow or unsupported on the CPU; running in float32 instead"
            )),
        );
    }
    (asked, None)
}

/// Resolves a step's model and class, and keys and sizes its family's components.
pub fn plan_step(context: &PlanContext<'_>) -> Result<StepPlan, JobError> {
    let spec = context.spec;
    let model_dir = resolve_at(context.workflow, &spec.model_name, spec.model_name_at)?;
    let index = families::ModelIndex::read(&model_dir);
    let class = families::class_for_folder(&spec.component_type, spec.class, &index)
        .map_err(|message| refused_at(context.workflow, spec.model_name_at, message))?;
    let family = families::family(class.family)
        .ok_or_else(|| JobError::Internal(format!("`{}` has no family", class.name)))?;
    let implementation = pipelines::family(class.family)
        .ok_or_else(|| JobError::Internal(format!("`{}` has no implementation", class.name)))?;
    let supplied = spec.supplied_components();
    families::check_folder_components(family, &index, &supplied).map_err(|e| {
        let step = &context.step.name;
        match e {
            FolderComponentError::Missing(m) => JobError::NotFound(format!("step `{step}`: {m}")),
            FolderComponentError::WrongClass(m) => JobError::refused(format!("step `{step}`: {m}")),
        }
    })?;
    let (dtype, dtype_notice) = dtype_for(&spec.torch_dtype, context.device);
    let offload = match implementation.offloads() {
        true => Offload::from_option(spec.options.offload.as_deref()),
        false => Offload::None,
    };
    let mut omitted = families::omitted_components(family, &index, &supplied);
    omitted.extend(asked_omitted(context, family, &supplied)?);
    let components = family
        .components
        .iter()
        .filter(|component| !omitted.contains(&component.name))
        .map(|component| {
            let dir_dtype = |dir: &Path| implementation.component_dtype(component.name, dir, dtype);
            let kept = offload == Offload::Sequential
                && spec
                    .options
                    .exclude_from_cpu_offload
                    .iter()
                    .any(|c| c == component.name);
            let offloaded = offload != Offload::None && !kept;
            plan_component(context, component, &model_dir, &dir_dtype, offloaded)
        })
        .collect::<Result<Vec<_>, _>>()?;
    let components = components
        .into_iter()
        .chain(plan_loras(context, family)?)
        .collect();
    Ok(StepPlan {
        model_dir,
        index,
        class,
        dtype,
        dtype_notice,
        components,
        offload,
    })
}

/// The components the step's `from_pretrained_arguments` sets to null, checked against
/// the family its class resolved to and against the components it gives elsewhere.
fn asked_omitted(
    context: &PlanContext<'_>,
    family: &'static families::Family,
    supplied: &[&str],
) -> Result<Vec<&'static str>, JobError> {
    let mut names = Vec::new();
    for asked in &context.spec.omitted_components {
        let refuse = |message: String| refused_at(context.workflow, asked.at, message);
        families::check_omitted(family, &asked.name).map_err(refuse)?;
        if supplied.contains(&asked.name.as_str()) {
            return Err(refuse(format!(
                "`{}` is null in `from_pretrained_arguments` and also given by the step; leave out one of them",
                asked.name
            )));
        }
        if let Some(component) = family.components.iter().find(|c| c.name == asked.name) {
            names.push(component.name);
        }
    }
    Ok(names)
}

/// Where one component comes from, its key and its size.
fn plan_component(
    context: &PlanContext<'_>,
    component: &'static ComponentSpec,
    model_dir: &Path,
    dtype_in: &dyn Fn(&Path) -> DType,
    offload: bool,
) -> Result<PlannedLoad, JobError> {
    let loader = components::loader(component.class).ok_or_else(|| {
        JobError::Internal(format!(
            "no loader for `{}` ({})",
            component.name, component.class
        ))
    })?;
    let variant = context.spec.variant.as_deref();
    let (source, dir) = component_folder(context, component.name, model_dir)?;
    let dtype = dtype_in(&dir);
    let failed = |e: String| {
        JobError::Internal(format!(
            "loading {} of {}: {e}",
            component.name,
            source.display()
        ))
    };
    let files = (loader.files)(&dir, variant).map_err(|e| match e {
        PipelineError::MissingFile { .. } => JobError::NotFound(format!(
            "step `{}`: loading {} of {}: {e}",
            context.step.name,
            component.name,
            source.display()
        )),
        other => failed(other.to_string()),
    })?;
    let identities = files
        .all
        .iter()
        .map(|p| FileIdentity::of(p).map_err(|e| failed(format!("{}: {e}", p.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    let bytes = weights_bytes(&files.weights, dtype).map_err(|e| failed(e.to_string()))?;
    let offloaded = offload && loader.offload.is_some();
    let device = match offloaded {
        true => format!("cpu (offloaded; runs on {})", context.device_name),
        false => context.device_name.to_string(),
    };
    let key = ComponentKey {
        component_type: component.name,
        class: component.class,
        model: source,
        dtype: match loader.weighted {
            true => format!("{dtype:?}").to_lowercase(),
            false => "-".to_string(),
        },
        device,
        variant: variant.filter(|_| loader.weighted).map(str::to_string),
        adapters: Vec::new(),
        files: identities,
        host: offloaded && !context.device.is_cpu(),
    };
    Ok(PlannedLoad {
        spec: component,
        loader,
        dir,
        dtype,
        key,
        bytes,
        adapter: None,
        offloaded,
    })
}

/// What a LoRA is cached as: one component of its own, whatever pipeline uses it.
static LORA: ComponentSpec = ComponentSpec::optional("lora", components::LORA_CLASS);

/// The step's LoRAs, each a component keyed by its file: refused on a family without
/// LoRAs, found as diffusers' `load_lora_weights` finds them.
fn plan_loras(
    context: &PlanContext<'_>,
    family: &'static families::Family,
) -> Result<Vec<PlannedLoad>, JobError> {
    let loras = &context.spec.loras;
    if let Some(first) = loras.first().filter(|_| !family.loras) {
        return Err(refused_at(
            context.workflow,
            first.model_name_at,
            families::loras_refusal(family),
        ));
    }
    loras.iter().map(|lora| plan_lora(context, lora)).collect()
}

fn plan_lora(context: &PlanContext<'_>, lora: &LoraSpec) -> Result<PlannedLoad, JobError> {
    let file = lora_file(context, lora)?;
    let loader = components::loader(components::LORA_CLASS)
        .ok_or_else(|| JobError::Internal("no loader for LoRAs".to_string()))?;
    let identity = FileIdentity::of(&file).map_err(|e| {
        JobError::NotFound(format!(
            "LoRA `{}`: {}: {e}",
            lora.adapter_name,
            file.display()
        ))
    })?;
    let failed = |e: PipelineError| JobError::refused(format!("LoRA `{}`: {e}", lora.adapter_name));
    let bytes = weights_bytes(std::slice::from_ref(&file), DType::F32).map_err(failed)?;
    let key = ComponentKey {
        component_type: LORA.name,
        class: LORA.class,
        model: file.clone(),
        dtype: "f32".to_string(),
        device: "cpu".to_string(),
        variant: None,
        adapters: Vec::new(),
        files: vec![identity],
        host: false,
    };
    Ok(PlannedLoad {
        spec: &LORA,
        loader,
        dir: file,
        dtype: DType::F32,
        key,
        bytes,
        adapter: Some((lora.adapter_name.clone(), lora.scale)),
        offloaded: false,
    })
}

/// The LoRA's file: `model_name` a folder or hub id (then `subfolder` and `weight_name`,
/// or the one `.safetensors` file there, preferring `pytorch_lora_weights.safetensors`, as
/// diffusers guesses), or a `.safetensors` file itself.
fn lora_file(context: &PlanContext<'_>, lora: &LoraSpec) -> Result<PathBuf, JobError> {
    let (folder, named_file) = match (
        &lora.weight_name,
        lora.model_name.strip_suffix(".safetensors"),
    ) {
        (None, Some(_)) => {
            let path = Path::new(&lora.model_name);
            let parent = path.parent().map(|p| p.to_string_lossy().into_owned());
            let parent = parent
                .filter(|p| !p.is_empty())
                .unwrap_or_else(|| ".".to_string());
            let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
            (parent, name)
        }
        _ => (lora.model_name.clone(), lora.weight_name.clone()),
    };
    let root = resolve_at(context.workflow, &folder, lora.model_name_at)?;
    let dir = match &lora.subfolder {
        Some(sub) => root.join(sub),
        None => root,
    };
    let refuse = |message: String| refused_at(context.workflow, lora.model_name_at, message);
    let file = match named_file {
        Some(name) => dir.join(name),
        None => guess_lora_file(&dir).map_err(refuse)?,
    };
    if !file.is_file() {
        return Err(JobError::NotFound(format!(
            "LoRA `{}`: no file {}",
            lora.adapter_name,
            file.display()
        )));
    }
    Ok(file)
}

/// diffusers' guess of a LoRA's file when no `weight_name` is given: the folder's one
/// `.safetensors` file (leaving out schedulers', optimizers' and checkpoints'), or
/// `pytorch_lora_weights.safetensors` among several.
fn guess_lora_file(dir: &Path) -> Result<PathBuf, String> {
    const PREFERRED: &str = "pytorch_lora_weights.safetensors";
    let entries = std::fs::read_dir(dir)
        .map_err(|e| format!("cannot list the LoRA folder {}: {e}", dir.display()))?;
    let mut files: Vec<String> = entries
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|name| name.ends_with(".safetensors"))
        .filter(|name| {
            !["scheduler", "optimizer", "checkpoint"]
                .iter()
                .any(|x| name.contains(x))
        })
        .collect();
    files.sort();
    if files.iter().any(|name| name == PREFERRED) {
        return Ok(dir.join(PREFERRED));
    }
    match files.as_slice() {
        [one] => Ok(dir.join(one)),
        [] => Err(format!(
            "{} holds no .safetensors LoRA file; name it with `weight_name`",
            dir.display()
        )),
        several => Err(format!(
            "{} holds several .safetensors files ({}); name one with `weight_name`",
            dir.display(),
            several.join(", ")
        )),
    }
}

/// Where a component comes from (the model it belongs to) and its folder: a component
/// block's own model (and subfolder), the model of the step that shared it, or the
/// pipeline's model.
fn component_folder(
    context: &PlanContext<'_>,
    name: &str,
    model_dir: &Path,
) -> Result<(PathBuf, PathBuf), JobError> {
    let spec = context.spec;
    if let Some(component) = spec.components.iter().find(|c| c.slot == name) {
        let root = resolve_at(context.workflow, &component.model_name, component.at)?;
        let dir = match &component.subfolder {
            Some(sub) => root.join(sub),
            None => root.clone(),
        };
        return Ok((root, dir));
    }
    let source = spec
        .reused_components
        .iter()
        .find(|(reused, _)| reused == name)
        .and_then(|(_, sharer)| context.model_dirs.get(sharer).cloned())
        .unwrap_or_else(|| model_dir.to_path_buf());
    let dir = source.join(name);
    Ok((source, dir))
}

/// Resolves a `model_name` written at `at` in the workflow; a model that is not there is
/// not found, with the places searched.
fn resolve_at(workflow: &Workflow, model_name: &str, at: Position) -> Result<PathBuf, JobError> {
    let hub = hub_cache_dir();
    resolve_model(model_name, &workflow.model_places(hub.as_deref())).map_err(|e| {
        JobError::NotFound(
            WorkflowError {
                file: workflow.path.clone(),
                position: Some(at),
                pointer: None,
                message: e.to_string(),
            }
            .to_string(),
        )
    })
}

/// A refusal of the value written at `at`.
fn refused_at(workflow: &Workflow, at: Position, message: String) -> JobError {
    JobError::refused(
        WorkflowError {
            file: workflow.path.clone(),
            position: Some(at),
            pointer: None,
            message,
        }
        .to_string(),
    )
}

/// Components of `plans` that are not loaded yet, each once, and the bytes they need.
pub fn missing(plans: &[&StepPlan], cache: &ComponentCache) -> (Vec<ComponentKey>, u64) {
    let mut keys: Vec<ComponentKey> = Vec::new();
    let mut needed = 0;
    for load in plans.iter().flat_map(|p| &p.components) {
        if !cache.contains(&load.key) && !keys.contains(&load.key) {
            keys.push(load.key.clone());
            if !load.key.host {
                needed += load.bytes;
            }
        }
    }
    (keys, needed)
}

/// Every key `plans` use (kept while making room).
pub fn all_keys(plans: &[&StepPlan]) -> Vec<ComponentKey> {
    plans
        .iter()
        .flat_map(|p| p.components.iter().map(|c| c.key.clone()))
        .collect()
}

/// A planned component as a dry run reports it.
pub fn planned_component(
    step: &str,
    load: &PlannedLoad,
    cache: &ComponentCache,
) -> PlannedComponent {
    PlannedComponent {
        step: step.to_string(),
        model: load.key.model.display().to_string(),
        component_type: load.spec.name.to_string(),
        dtype: load.key.dtype.clone(),
        bytes: load.bytes,
        loaded: cache.contains(&load.key),
    }
}

/// An evicted component as a dry run reports it.
pub fn evicted_component(evicted: &Evicted) -> PlannedComponent {
    PlannedComponent {
        step: String::new(),
        model: evicted.key.model.display().to_string(),
        component_type: evicted.key.component_type.to_string(),
        dtype: evicted.key.dtype.clone(),
        bytes: evicted.bytes,
        loaded: true,
    }
}

/// Load statistics of one step.
#[derive(Debug, Default, Clone, Copy)]
pub struct LoadCounts {
    pub hits: u64,
    pub misses: u64,
    pub load_ms: u64,
}

/// Takes the step's components from the cache, loading the missing ones, and assembles the
/// pipeline with its family. `before_each(i, n)` runs before each component (progress,
/// cancellation).
pub fn load_pipeline(
    plan: &StepPlan,
    cache: &ComponentCache,
    device: &Device,
    user: &str,
    counts: &mut LoadCounts,
    before_each: &mut dyn FnMut(usize, usize) -> Result<(), JobError>,
) -> Result<Arc<dyn Pipeline>, JobError> {
    let failed = |e: PipelineError| {
        JobError::from_pipeline(e, || crate::host::CancelReason::Client)
            .within(&format!("loading {}", plan.model_dir.display()))
    };
    let family = pipelines::family(plan.class.family).ok_or_else(|| {
        JobError::Internal(format!("`{}` has no implementation", plan.class.family))
    })?;
    let mut parts = Parts::new(
        plan.model_dir.clone(),
        plan.index.clone(),
        device.clone(),
        plan.dtype,
    );
    parts.offload = plan.offload;
    let count = plan.components.len();
    for (i, load) in plan.components.iter().enumerate() {
        before_each(i, count)?;
        let component = take(cache, load, device, user, counts).map_err(failed)?;
        match &load.adapter {
            Some((name, weight)) => parts
                .add_adapter(name, *weight, component)
                .map_err(failed)?,
            None => parts.insert(load.spec.name, component),
        }
    }
    family.assemble(parts).map_err(failed)
}

/// One component from the cache, loaded when it is missing.
fn take(
    cache: &ComponentCache,
    load: &PlannedLoad,
    device: &Device,
    user: &str,
    counts: &mut LoadCounts,
) -> Result<components::Loaded, PipelineError> {
    let started = Instant::now();
    let variant = load.key.variant.as_deref();
    let (value, lookup) = cache.get_or_load_any(load.key.clone(), user, || {
        let loaded = match load.loader.offload.filter(|_| load.offloaded) {
            Some(to_host) => to_host(&load.dir, variant, load.dtype),
            None => (load.loader.load)(&load.dir, variant, load.dtype, device),
        };
        loaded.map(|v| (v, load.bytes))
    })?;
    match lookup {
        Lookup::Hit => counts.hits += 1,
        Lookup::Miss => {
            counts.misses += 1;
            counts.load_ms += started.elapsed().as_millis() as u64;
        }
    }
    Ok(value)
}
