//! What a step needs loaded: its model folder, its components keyed by their weights, what
//! each will take in memory, and taking them from the cache, making room first.
//!
//! Both a run and a dry run go through [`plan_step`]; only a run then calls
//! [`load_pipeline`]. Room is made, or the run refused with the sizes, before anything is
//! loaded.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Instant;

use candle_core::{DType, Device};
use protocol::message::PlannedComponent;
use protocol::workflow::{
    check_auto_class, is_auto_class, PipelineStep, Position, Step, Workflow, WorkflowError,
};

use crate::budget::weights_bytes;
use crate::cache::{ComponentCache, ComponentKey, Evicted, FileIdentity, Lookup};
use crate::models::{hub_cache_dir, resolve_model};
use crate::pipelines::{
    self, ClipTokenizer, PipelineError, SchedulerConfig, StableDiffusionPipeline, TextEncoder,
    Unet, Vae,
};

/// The components of a Stable Diffusion pipeline, in loading order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ComponentKind {
    Tokenizer,
    TextEncoder,
    Unet,
    Vae,
}

impl ComponentKind {
    pub const ALL: [ComponentKind; 4] = [
        ComponentKind::Tokenizer,
        ComponentKind::TextEncoder,
        ComponentKind::Unet,
        ComponentKind::Vae,
    ];

    /// Its folder in a diffusers model, and its name in workflows and status.
    pub fn name(self) -> &'static str {
        match self {
            ComponentKind::Tokenizer => "tokenizer",
            ComponentKind::TextEncoder => "text_encoder",
            ComponentKind::Unet => "unet",
            ComponentKind::Vae => "vae",
        }
    }
}

/// Why a step cannot be planned or loaded.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The workflow points at something that is not there (exit 2).
    #[error("{0}")]
    Invalid(String),
    /// A file is missing, unreadable or malformed, or loading failed (exit 1).
    #[error("{0}")]
    Failed(String),
    /// The job was cancelled between two components.
    #[error("cancelled")]
    Cancelled,
}

/// One component a step needs.
#[derive(Debug, Clone)]
pub struct PlannedLoad {
    pub kind: ComponentKind,
    /// The component's folder.
    pub dir: PathBuf,
    pub key: ComponentKey,
    /// Bytes once loaded (from the safetensors headers).
    pub bytes: u64,
}

/// Everything resolved for a step before loading.
#[derive(Debug, Clone)]
pub struct StepPlan {
    pub model_dir: PathBuf,
    pub dtype: DType,
    /// Set when the requested dtype was replaced (half precision on the CPU).
    pub dtype_notice: Option<String>,
    pub components: Vec<PlannedLoad>,
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

/// Resolves a step's model and keys and sizes its components. `model_dirs` holds the
/// folders of earlier steps, for `reused_components`.
pub fn plan_step(
    workflow: &Workflow,
    step: &Step,
    spec: &PipelineStep,
    device: &Device,
    device_name: &str,
    model_dirs: &HashMap<String, PathBuf>,
) -> Result<StepPlan, LoadError> {
    let model_dir = resolve_at(workflow, &spec.model_name, spec.model_name_at)?;
    if is_auto_class(&spec.component_type) {
        check_auto_class(&spec.component_type, spec.kind, &model_dir).map_err(|message| {
            LoadError::Invalid(
                WorkflowError {
                    file: workflow.path.clone(),
                    position: Some(spec.model_name_at),
                    message,
                }
                .to_string(),
            )
        })?;
    }
    let (dtype, dtype_notice) = dtype_for(&spec.torch_dtype, device);
    let failed = |what: String| {
        LoadError::Failed(format!(
            "step `{}`: loading {}: {what}",
            step.name,
            model_dir.display()
        ))
    };
    let mut components = Vec::with_capacity(4);
    for kind in ComponentKind::ALL {
        let (source, dir) = component_folder(workflow, spec, kind, &model_dir, model_dirs)?;
        let (files, weights) = component_files(kind, &dir, spec.variant.as_deref())
            .map_err(|e| failed(e.to_string()))?;
        let files = files
            .iter()
            .map(|p| FileIdentity::of(p).map_err(|e| failed(format!("{}: {e}", p.display()))))
            .collect::<Result<Vec<_>, _>>()?;
        let component_dtype = match kind {
            ComponentKind::Tokenizer => "-".to_string(),
            _ => format!("{dtype:?}").to_lowercase(),
        };
        let key = ComponentKey {
            component_type: kind.name(),
            model: source,
            dtype: component_dtype,
            device: device_name.to_string(),
            files,
        };
        let bytes = weights_bytes(&weights, dtype).map_err(|e| failed(e.to_string()))?;
        components.push(PlannedLoad {
            kind,
            dir,
            key,
            bytes,
        });
    }
    Ok(StepPlan {
        model_dir,
        dtype,
        dtype_notice,
        components,
    })
}

/// Where a component comes from (the model it belongs to) and its folder: a component
/// block's own model (and subfolder), the model of the step that shared it, or the
/// pipeline's model.
fn component_folder(
    workflow: &Workflow,
    spec: &PipelineStep,
    kind: ComponentKind,
    model_dir: &Path,
    model_dirs: &HashMap<String, PathBuf>,
) -> Result<(PathBuf, PathBuf), LoadError> {
    if let Some(component) = spec.components.iter().find(|c| c.slot == kind.name()) {
        let root = resolve_at(workflow, &component.model_name, component.at)?;
        let dir = match &component.subfolder {
            Some(sub) => root.join(sub),
            None => root.clone(),
        };
        return Ok((root, dir));
    }
    let source = spec
        .reused_components
        .iter()
        .find(|(name, _)| name == kind.name())
        .and_then(|(_, sharer)| model_dirs.get(sharer).cloned())
        .unwrap_or_else(|| model_dir.to_path_buf());
    let dir = source.join(kind.name());
    Ok((source, dir))
}

/// The files that identify a component (for the cache key) and its weight files.
fn component_files(
    kind: ComponentKind,
    dir: &Path,
    variant: Option<&str>,
) -> Result<(Vec<PathBuf>, Vec<PathBuf>), PipelineError> {
    if kind == ComponentKind::Tokenizer {
        let mut files = vec![dir.join("vocab.json"), dir.join("merges.txt")];
        files.extend(
            ["special_tokens_map.json", "tokenizer_config.json"]
                .map(|f| dir.join(f))
                .into_iter()
                .filter(|p| p.is_file()),
        );
        return Ok((files, Vec::new()));
    }
    let weights = pipelines::weight_files_variant(dir, variant)?;
    let mut files = weights.clone();
    files.push(dir.join("config.json"));
    Ok((files, weights))
}

/// Resolves a `model_name` written at `at` in the workflow.
fn resolve_at(workflow: &Workflow, model_name: &str, at: Position) -> Result<PathBuf, LoadError> {
    let hub = hub_cache_dir();
    resolve_model(model_name, &workflow.model_places(hub.as_deref())).map_err(|e| {
        LoadError::Invalid(
            WorkflowError {
                file: workflow.path.clone(),
                position: Some(at),
                message: e.to_string(),
            }
            .to_string(),
        )
    })
}

/// Components of `plans` that are not loaded yet, each once, and the bytes they need.
pub fn missing(plans: &[&StepPlan], cache: &ComponentCache) -> (Vec<ComponentKey>, u64) {
    let mut keys: Vec<ComponentKey> = Vec::new();
    let mut needed = 0;
    for load in plans.iter().flat_map(|p| &p.components) {
        if !cache.contains(&load.key) && !keys.contains(&load.key) {
            keys.push(load.key.clone());
            needed += load.bytes;
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
        component_type: load.kind.name().to_string(),
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
/// pipeline. `before_each` runs before each component (progress, cancellation).
pub fn load_pipeline(
    plan: &StepPlan,
    cache: &ComponentCache,
    device: &Device,
    variant: Option<&str>,
    user: &str,
    counts: &mut LoadCounts,
    before_each: &mut dyn FnMut(usize) -> Result<(), LoadError>,
) -> Result<StableDiffusionPipeline, LoadError> {
    let dtype = plan.dtype;
    let failed =
        |e: PipelineError| LoadError::Failed(format!("loading {}: {e}", plan.model_dir.display()));
    let [tokenizer, text_encoder, unet, vae] = &plan.components[..] else {
        return Err(LoadError::Failed(
            "a Stable Diffusion pipeline has four components".to_string(),
        ));
    };
    before_each(0)?;
    let tokenizer: Arc<ClipTokenizer> = take(cache, tokenizer, user, counts, || {
        ClipTokenizer::load(&tokenizer.dir).map(|t| (t, 0))
    })
    .map_err(failed)?;
    before_each(1)?;
    let text_encoder: Arc<TextEncoder> = take(cache, text_encoder, user, counts, || {
        TextEncoder::load_variant(&text_encoder.dir, variant, dtype, device)
            .map(|m| (m, text_encoder.bytes))
    })
    .map_err(failed)?;
    before_each(2)?;
    let unet: Arc<Unet> = take(cache, unet, user, counts, || {
        Unet::load_variant(&unet.dir, variant, dtype, device).map(|m| (m, unet.bytes))
    })
    .map_err(failed)?;
    before_each(3)?;
    let vae: Arc<Vae> = take(cache, vae, user, counts, || {
        Vae::load_variant(&vae.dir, variant, dtype, device).map(|m| (m, vae.bytes))
    })
    .map_err(failed)?;
    let scheduler = SchedulerConfig::load(&plan.model_dir.join("scheduler")).map_err(failed)?;
    Ok(StableDiffusionPipeline {
        tokenizer,
        text_encoder,
        unet,
        vae,
        scheduler,
        device: device.clone(),
        dtype,
    })
}

fn take<T: Send + Sync + 'static>(
    cache: &ComponentCache,
    load: &PlannedLoad,
    user: &str,
    counts: &mut LoadCounts,
    loader: impl FnOnce() -> Result<(T, u64), PipelineError>,
) -> Result<Arc<T>, PipelineError> {
    let started = Instant::now();
    let (value, lookup) = cache.get_or_load(load.key.clone(), user, loader)?;
    match lookup {
        Lookup::Hit => counts.hits += 1,
        Lookup::Miss => {
            counts.misses += 1;
            counts.load_ms += started.elapsed().as_millis() as u64;
        }
    }
    Ok(value)
}
