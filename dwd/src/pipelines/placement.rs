//! Offload, diffusers-workflow's `offload: "model"` (diffusers'
//! `enable_model_cpu_offload`): a large component lives in host memory and is on the
//! device only while it runs; and `"sequential"` (`enable_sequential_cpu_offload`), where a
//! transformer's blocks are, each only while it runs.
//!
//! An offloaded component is loaded to the CPU with its tensors kept by name
//! ([`HostWeights`]); placing it on the device builds the same model from those tensors
//! there (each copied once), and dropping the placed model frees the device's copy. A
//! pipeline places each large component for its phase — the text encoders, then the
//! denoiser, one at a time — so the device holds at most one of them, plus what is
//! resident. Where the device is the CPU, host and device memory are one: placing hands
//! out the host model itself, and offload saves nothing (the engine says so), but the
//! placements run, and are logged, in the same order.
//!
//! Every placement and release is logged (`tracing`, target `dwd::placement`), which is
//! how a run's placements can be seen and checked.

use std::collections::HashMap;
use std::ops::Deref;
use std::path::Path;
use std::sync::Arc;

use candle_core::{DType, Device, Tensor};
use candle_nn::VarBuilder;

use super::lora::{adaptable_modules, LoraModules};
use super::strict::load_component_strict_keeping;
use super::{InComponent, PipelineError};

/// How a step asks its large components to be placed (`configuration.offload`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Offload {
    /// All on the device, loaded once.
    #[default]
    None,
    /// `"model"`: in host memory, each on the device while it runs.
    Model,
    /// `"sequential"`: as `Model`, and a transformer's blocks each only while it runs.
    Sequential,
}

impl Offload {
    /// From `configuration.offload` (the parser accepts only these two values).
    pub fn from_option(value: Option<&str>) -> Self {
        match value {
            Some("model") => Offload::Model,
            Some("sequential") => Offload::Sequential,
            _ => Offload::None,
        }
    }
}

/// A transformer's blocks built one at a time on the device from host tensors
/// (sequential offload): the model keeps this in place of its block list.
pub struct BlockStream {
    pub vb: VarBuilder<'static>,
}

impl std::fmt::Debug for BlockStream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BlockStream({:?})", self.vb.device())
    }
}

/// Loads a model with LoRA-adaptable layers for offload: strictly, to the CPU in `dtype`,
/// giving the model, its weights' bytes, its adaptable layers and its tensors by name.
pub(crate) fn load_adaptable_host<C, T>(
    dir: &Path,
    (variant, dtype): (Option<&str>, DType),
    component: &'static str,
    read_config: fn(&Path) -> Result<C, PipelineError>,
    build: fn(VarBuilder<'static>, C) -> candle_core::Result<T>,
) -> Result<(T, u64, LoraModules, HashMap<String, Tensor>), PipelineError> {
    let (loaded, modules) = adaptable_modules(|| {
        load_component_strict_keeping(
            dir,
            (variant, dtype, &Device::Cpu),
            component,
            read_config,
            build,
        )
    });
    let (model, bytes, tensors) = loaded?;
    Ok((model, bytes, modules, tensors))
}

/// A model that can be built again on another device from the tensors it was built from.
pub trait Movable: Sized + Send + Sync + 'static {
    /// The same model with its weights taken from `tensors` (by the names it was built
    /// from) onto `device`.
    fn rebuilt(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self>;
    /// The model on `device` for sequential offload: what it can build piece by piece as
    /// it runs (a transformer's blocks) left to be built then; by default, all of it now.
    fn streamed(
        &self,
        tensors: &HashMap<String, Tensor>,
        device: &Device,
    ) -> candle_core::Result<Self> {
        self.rebuilt(tensors, device)
    }
    /// Bytes its weights hold.
    fn weight_bytes(&self) -> u64;
}

/// An offloaded component: the model built on the CPU, and its tensors by name (sharing
/// that model's memory).
pub struct HostWeights<T> {
    host: Arc<T>,
    tensors: HashMap<String, Tensor>,
}

impl<T: Movable> HostWeights<T> {
    pub fn new(host: T, tensors: HashMap<String, Tensor>) -> Self {
        Self {
            host: Arc::new(host),
            tensors,
        }
    }

    /// The model built again from the kept tensors, on `device` (what placing it on a GPU
    /// does).
    pub fn rebuilt_on(&self, device: &Device) -> candle_core::Result<T> {
        self.host.rebuilt(&self.tensors, device)
    }

    /// The model on `device` for sequential offload (see [`Movable::streamed`]).
    pub fn streamed_on(&self, device: &Device) -> candle_core::Result<T> {
        self.host.streamed(&self.tensors, device)
    }
}

/// A pipeline's hold on one of its components: resident where the pipeline runs, or
/// offloaded to host memory.
pub enum Placed<T> {
    Resident(Arc<T>),
    Offloaded(Arc<HostWeights<T>>),
}

impl<T: std::fmt::Debug> std::fmt::Debug for Placed<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placed::Resident(model) => f.debug_tuple("Resident").field(model).finish(),
            Placed::Offloaded(host) => f.debug_tuple("Offloaded").field(&host.host).finish(),
        }
    }
}

impl<T> Clone for Placed<T> {
    fn clone(&self) -> Self {
        match self {
            Placed::Resident(model) => Placed::Resident(Arc::clone(model)),
            Placed::Offloaded(host) => Placed::Offloaded(Arc::clone(host)),
        }
    }
}

impl<T: Movable> Placed<T> {
    /// The model for what does not run it (its config, its sizes, its LoRA layers): the
    /// resident one, or the host copy.
    pub fn model(&self) -> &T {
        match self {
            Placed::Resident(model) => model,
            Placed::Offloaded(host) => &host.host,
        }
    }

    /// What placing it adds to the device for a phase: its weights when offloaded.
    pub fn placed_bytes(&self) -> u64 {
        match self {
            Placed::Resident(_) => 0,
            Placed::Offloaded(host) => host.host.weight_bytes(),
        }
    }

    /// The model on `device` for as long as the returned hold lives: the resident model as
    /// it is, or the offloaded one built there (`name` names it in the placement log).
    pub fn on(&self, device: &Device, name: &'static str) -> Result<OnDevice<T>, PipelineError> {
        self.place(device, name, false)
    }

    /// Like [`Placed::on`]; with `stream` (sequential offload), an offloaded model builds
    /// the pieces it can stream (a transformer's blocks) on the device only while each runs.
    pub fn place(
        &self,
        device: &Device,
        name: &'static str,
        stream: bool,
    ) -> Result<OnDevice<T>, PipelineError> {
        let host = match self {
            Placed::Resident(model) => {
                return Ok(OnDevice {
                    model: Arc::clone(model),
                    offloaded: None,
                })
            }
            Placed::Offloaded(host) => host,
        };
        let model = match (device.is_cpu(), stream) {
            (true, _) => Arc::clone(&host.host),
            (false, false) => Arc::new(host.rebuilt_on(device).in_component(name)?),
            (false, true) => Arc::new(host.streamed_on(device).in_component(name)?),
        };
        let bytes = model.weight_bytes();
        let how = match stream && !device.is_cpu() {
            true => ", its blocks streamed one at a time",
            false => "",
        };
        tracing::info!(
            target: "dwd::placement",
            "placed {name} on {} ({bytes} bytes{how})",
            device_name(device)
        );
        Ok(OnDevice {
            model,
            offloaded: Some((name, device_name(device))),
        })
    }
}

/// A component placed for one phase of a run; an offloaded one leaves the device when this
/// is dropped.
pub struct OnDevice<T> {
    model: Arc<T>,
    offloaded: Option<(&'static str, String)>,
}

impl<T> Deref for OnDevice<T> {
    type Target = T;

    fn deref(&self) -> &T {
        &self.model
    }
}

impl<T> Drop for OnDevice<T> {
    fn drop(&mut self) {
        if let Some((name, device)) = &self.offloaded {
            tracing::info!(target: "dwd::placement", "released {name} from {device}");
        }
    }
}

fn device_name(device: &Device) -> String {
    match device {
        Device::Cpu => "cpu".to_string(),
        Device::Cuda(_) => "cuda".to_string(),
        Device::Metal(_) => "metal".to_string(),
    }
}
