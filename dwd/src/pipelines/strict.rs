//! Strict weight loading: every tensor a model asks for must be in its files, and every
//! tensor its files hold must be used.
//!
//! A checkpoint whose names differ from what the model expects (another layout, a
//! truncated shard, a fine-tune with extra heads) otherwise either fails on the first
//! missing name or, worse, loads with a weight silently left out. The models built this
//! way (FLUX's transformer, T5) take their tensors through a [`VarBuilder`] whose backend
//! records each name it hands out; after the build, any name left over is an error naming
//! it.

use std::collections::{HashMap, HashSet};
use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};

use candle_core::{DType, Device, Shape, Tensor};
use candle_nn::var_builder::SimpleBackend;
use candle_nn::VarBuilder;

use super::{weight_files_variant, weights, InComponent, PipelineError};

/// A component's tensors, handed out by name and remembered.
struct Tracked {
    tensors: HashMap<String, Tensor>,
    taken: Arc<Mutex<HashSet<String>>>,
}

impl Tracked {
    fn take(&self, name: &str) -> candle_core::Result<Tensor> {
        let tensor =
            self.tensors
                .get(name)
                .ok_or_else(|| candle_core::Error::CannotFindTensor {
                    path: name.to_string(),
                })?;
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string());
        Ok(tensor.clone())
    }
}

impl SimpleBackend for Tracked {
    fn get(
        &self,
        shape: Shape,
        name: &str,
        _: candle_nn::Init,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        let tensor = self.take(name)?;
        if tensor.shape() != &shape {
            return Err(candle_core::Error::UnexpectedShape {
                msg: format!("weight `{name}`"),
                expected: shape,
                got: tensor.shape().clone(),
            });
        }
        tensor.to_device(device)?.to_dtype(dtype)
    }

    fn get_unchecked(
        &self,
        name: &str,
        dtype: DType,
        device: &Device,
    ) -> candle_core::Result<Tensor> {
        self.take(name)?.to_device(device)?.to_dtype(dtype)
    }

    fn contains_tensor(&self, name: &str) -> bool {
        self.tensors.contains_key(name)
    }
}

/// Reads a model component as [`super::load_component`] does, then refuses it if the
/// build left any tensor of its files unused. Returns the model and its weights' size.
pub(crate) fn load_component_strict<C, T>(
    dir: &Path,
    place: (Option<&str>, DType, &Device),
    component: &'static str,
    read_config: fn(&Path) -> Result<C, PipelineError>,
    build: fn(VarBuilder<'static>, C) -> candle_core::Result<T>,
) -> Result<(T, u64), PipelineError> {
    load_component_strict_keeping(dir, place, component, read_config, build)
        .map(|(model, bytes, _)| (model, bytes))
}

/// Like [`load_component_strict`], also giving back the tensors the model was built
/// from, by name (sharing their memory with the model), so that it can be built again
/// elsewhere ([`super::placement`]).
pub(crate) fn load_component_strict_keeping<C, T>(
    dir: &Path,
    (variant, dtype, device): (Option<&str>, DType, &Device),
    component: &'static str,
    read_config: fn(&Path) -> Result<C, PipelineError>,
    build: fn(VarBuilder<'static>, C) -> candle_core::Result<T>,
) -> Result<(T, u64, HashMap<String, Tensor>), PipelineError> {
    let config = read_config(dir)?;
    let files = weight_files_variant(dir, variant)?;
    let tensors = weights::load_tensors(&files, dtype, device, component)?;
    let kept = tensors.clone();
    let element_size = dtype.size_in_bytes() as u64;
    let bytes = tensors
        .values()
        .map(|tensor| tensor.elem_count() as u64 * element_size)
        .sum();
    let names: Vec<String> = tensors.keys().cloned().collect();
    let taken = Arc::new(Mutex::new(HashSet::new()));
    let backend = Tracked {
        tensors,
        taken: Arc::clone(&taken),
    };
    let vb = VarBuilder::from_backend(Box::new(backend), dtype, device.clone());
    let built = build(vb, config).in_component(component)?;
    let taken = taken.lock().unwrap_or_else(PoisonError::into_inner);
    let mut unused: Vec<&String> = names.iter().filter(|n| !taken.contains(*n)).collect();
    unused.sort();
    if let Some(first) = unused.first() {
        return Err(PipelineError::BadConfig {
            file: dir.to_path_buf(),
            problem: format!(
                "weight `{first}`{} is not part of this model: the checkpoint has another layout than its config.json describes",
                match unused.len() {
                    1 => String::new(),
                    n => format!(" (and {} more)", n - 1),
                }
            ),
        });
    }
    Ok((built, bytes, kept))
}
