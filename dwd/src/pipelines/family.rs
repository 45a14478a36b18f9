//! The seam between the engine and a pipeline family.
//!
//! A [`Family`] takes its components, loaded by the engine from the cache by their names in
//! `model_index.json`, and assembles a [`Pipeline`]; a pipeline runs one [`Request`] (typed
//! arguments, bound inputs) through a [`RunHost`] that carries the noise to draw and the
//! progress to report (and, through it, cancellation). The engine, loader and cache see
//! only these traits; a family's own code stays in its folder.

use std::any::Any;
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use protocol::families::ModelIndex;
use protocol::workflow::{Arguments, PipelineClass, SchedulerSpec};

use super::lora::{Adapter, LoraAdapter};
use super::noise::NoiseSource;
use super::placement::{HostWeights, Movable, Offload, Placed};
use super::PipelineError;

/// One family's implementation.
pub trait Family: Send + Sync {
    /// Its table in `protocol`: classes, components, arguments, schedulers.
    fn schema(&self) -> &'static protocol::families::Family;

    /// A pipeline from its loaded components.
    fn assemble(&self, parts: Parts) -> Result<Arc<dyn Pipeline>, PipelineError>;

    /// The dtype component `name` (in folder `dir`) is loaded in, for a pipeline running in
    /// `dtype`: the same, unless the family keeps a component in higher precision.
    fn component_dtype(&self, name: &str, dir: &std::path::Path, dtype: DType) -> DType {
        let _ = (name, dir);
        dtype
    }

    /// Whether its pipelines run with model offload (`offload: "model"`): take their large
    /// components as [`Placed`] and place each on the device only while it runs.
    fn offloads(&self) -> bool {
        false
    }
}

/// A loaded pipeline of any family.
pub trait Pipeline: Send + Sync {
    /// The scheduler class its checkpoint ships, used when a step names none.
    fn default_scheduler(&self) -> Option<&str>;

    /// About the most memory a run of `request` takes beyond the weights.
    fn activation_bytes(&self, request: &Request) -> Result<u64, PipelineError>;

    /// Runs `request`: f32 images (N, 3, H, W) in [0, 1] on the CPU, or the final latents
    /// when `output_type` asks for them.
    fn run(&self, request: &Request, host: RunHost<'_>) -> Result<Output, PipelineError>;
}

/// One run of a pipeline.
#[derive(Debug, Clone)]
pub struct Request {
    pub class: &'static PipelineClass,
    /// Checked against `class`, every `previous_result:` filled in.
    pub arguments: Arguments,
    /// Input images by argument name: f32 (images, 3, H, W) in [0, 1].
    pub images: HashMap<&'static str, Tensor>,
    /// An earlier step's latents given for an image argument that takes them
    /// (`ArgType::ImageOrLatents`), by argument name.
    pub latent_images: HashMap<&'static str, Tensor>,
    /// Initial latents, from a file or an earlier step.
    pub latents: Option<Tensor>,
    /// The step's `scheduler` block, if any.
    pub scheduler: Option<SchedulerSpec>,
    /// `configuration.vae.enable_slicing`.
    pub vae_slicing: bool,
    /// `configuration.vae.enable_tiling`.
    pub vae_tiling: bool,
}

impl Request {
    /// An argument the class gives a default, or `fallback` where it has none.
    pub fn integer(&self, name: &str, fallback: usize) -> usize {
        self.arguments.integer(name).unwrap_or(fallback)
    }

    pub fn number(&self, name: &str, fallback: f64) -> f64 {
        self.arguments.number(name).unwrap_or(fallback)
    }

    /// The scheduler class the step names, if any.
    pub fn scheduler_type(&self) -> Option<String> {
        self.scheduler.as_ref().map(|s| s.scheduler_type.clone())
    }

    /// The step's `from_config_args` for its scheduler (none when it names no scheduler).
    pub fn scheduler_overrides(&self) -> serde_json::Map<String, serde_json::Value> {
        self.scheduler
            .as_ref()
            .map(|s| s.from_config_args.clone())
            .unwrap_or_default()
    }
}

/// What a run gives back.
#[derive(Debug)]
pub enum Output {
    /// f32 (N, 3, H, W) in [0, 1], on the CPU.
    Images(Tensor),
    /// f32 latents, on the CPU.
    Latents(Tensor),
}

/// What a run may draw on: its noise, its notices and its progress reports. `progress` returns an
/// error when the run must stop (the job was cancelled); the pipeline returns it as is.
pub struct RunHost<'a> {
    pub noise: &'a mut dyn NoiseSource,
    /// Tells the user something about the run that is not an error (an argument this
    /// model ignores).
    pub notice: &'a mut dyn FnMut(String),
    pub progress: &'a mut dyn FnMut(Progress) -> Result<(), PipelineError>,
}

/// Which part of the generation is running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Encoding,
    Denoising,
    Decoding,
}

/// Reported before each phase and before every denoising step: `step` of `total`
/// (0-based; encoding and decoding are a single step).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    pub phase: Phase,
    pub step: usize,
    pub total: usize,
}

/// A pipeline's loaded components by their names in `model_index.json`, and where it runs.
pub struct Parts {
    pub model_dir: PathBuf,
    /// The folder's `model_index.json`, as read when the step was planned.
    pub index: ModelIndex,
    pub device: Device,
    pub dtype: DType,
    components: HashMap<&'static str, Arc<dyn Any + Send + Sync>>,
    /// The step's LoRAs, in `loras` order.
    pub adapters: Vec<Adapter>,
    /// How the step places its large components (where the family builds offload).
    pub offload: Offload,
}

impl Parts {
    pub fn new(model_dir: PathBuf, index: ModelIndex, device: Device, dtype: DType) -> Self {
        Parts {
            model_dir,
            index,
            device,
            dtype,
            components: HashMap::new(),
            adapters: Vec::new(),
            offload: Offload::None,
        }
    }

    /// A LoRA loaded for the step, under its adapter name and at its weight.
    pub fn add_adapter(
        &mut self,
        name: &str,
        weight: f64,
        lora: Arc<dyn Any + Send + Sync>,
    ) -> Result<(), PipelineError> {
        let lora = lora
            .downcast::<LoraAdapter>()
            .map_err(|_| PipelineError::invalid(name, "was not loaded as a LoRA"))?;
        self.adapters.push(Adapter {
            name: name.to_string(),
            weight,
            lora,
        });
        Ok(())
    }

    pub fn insert(&mut self, name: &'static str, component: Arc<dyn Any + Send + Sync>) {
        self.components.insert(name, component);
    }

    /// The component named `name`, as the type its family expects.
    pub fn take<T: Any + Send + Sync>(&mut self, name: &str) -> Result<Arc<T>, PipelineError> {
        self.take_optional(name)?
            .ok_or_else(|| PipelineError::invalid(name, "this pipeline's component was not loaded"))
    }

    /// Whether the component `name` was loaded (and not yet taken).
    pub fn has(&self, name: &str) -> bool {
        self.components.contains_key(name)
    }

    /// A component that model offload may have left in host memory: resident, or
    /// offloaded.
    pub fn take_placed<T: Movable>(&mut self, name: &str) -> Result<Placed<T>, PipelineError> {
        self.take_optional_placed(name)?
            .ok_or_else(|| PipelineError::invalid(name, "this pipeline's component was not loaded"))
    }

    /// An optional component that offload may have left in host memory; `None` when the
    /// folder or the step goes without it.
    pub fn take_optional_placed<T: Movable>(
        &mut self,
        name: &str,
    ) -> Result<Option<Placed<T>>, PipelineError> {
        let Some(component) = self.components.remove(name) else {
            return Ok(None);
        };
        let component = match component.downcast::<T>() {
            Ok(resident) => return Ok(Some(Placed::Resident(resident))),
            Err(other) => other,
        };
        component
            .downcast::<HostWeights<T>>()
            .map(|host| Some(Placed::Offloaded(host)))
            .map_err(|_| {
                PipelineError::invalid(name, "loaded as another class than this family expects")
            })
    }

    /// An optional component: `None` when the folder goes without it.
    pub fn take_optional<T: Any + Send + Sync>(
        &mut self,
        name: &str,
    ) -> Result<Option<Arc<T>>, PipelineError> {
        let Some(component) = self.components.remove(name) else {
            return Ok(None);
        };
        component.downcast::<T>().map(Some).map_err(|_| {
            PipelineError::invalid(name, "loaded as another class than this family expects")
        })
    }
}
