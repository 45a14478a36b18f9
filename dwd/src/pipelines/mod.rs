//! Diffusion pipelines on candle, loaded from diffusers folders, one folder per family.
//!
//! A family ([`family::Family`]) assembles a pipeline from components the engine took from
//! the cache by their names in `model_index.json`; [`components`] says how each component
//! class is loaded. The building blocks families share (tokenizer, text encoder, UNet, VAE,
//! schedulers, noise) each have their own module. This module holds the registry of
//! families and what every part shares: the error type, reading `config.json` files and
//! finding and loading weight files.
//!
//! A new family is a folder here, its table in `protocol::families`, and a line in each
//! registry ([`FAMILIES`] here, `protocol::families::FAMILIES` there).

pub mod components;
pub mod diffusion;
pub mod family;
pub mod flux;
pub mod lora;
pub mod noise;
pub mod ops;
pub mod placement;
pub mod scheduler;
pub mod stable_diffusion;
pub mod stable_diffusion_3;
pub mod stable_diffusion_xl;
pub(crate) mod strict;
pub mod t5;
pub mod t5_tokenizer;
#[cfg(test)]
mod test_support;
#[cfg(test)]
mod tests {
    #[test]
    fn every_family_in_protocol_has_an_implementation_and_back() {
        for schema in protocol::families::families() {
            let family = super::family(schema.id)
                .unwrap_or_else(|| panic!("`{}` has no implementation", schema.id));
            assert!(std::ptr::eq(family.schema(), schema), "{}", schema.id);
        }
    }
}
#[cfg(debug_assertions)]
pub mod test_noise;
pub mod text_encoder;
pub mod tokenizer;
pub mod torch_cuda_rng;
pub mod torch_rng;
pub mod unet;
pub mod vae;
pub mod weights;

use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use candle_nn::VarBuilder;
use serde_json::{Map, Value};

pub use family::{Family, Output, Parts, Phase, Pipeline, Progress, Request, RunHost};
pub use noise::{GeneratorKind, GeneratorSetting, NoiseSource, ReplayNoise, StepGenerator};
pub use scheduler::{
    build_scheduler, calculate_shift, DdimScheduler, DpmSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler,
    FlowSchedule, LcmScheduler, PndmScheduler, PredictionType, Scheduler, SchedulerConfig,
    TimestepSpacing, UniPcMultistepScheduler, SUPPORTED_SCHEDULERS,
};
pub use stable_diffusion::{images_to_rgb8, GenerateArgs, RgbImage, StableDiffusionPipeline};
pub use stable_diffusion_xl::{StableDiffusionXlPipeline, StartImage, XlArgs};
pub use t5::{T5Config, T5Encoder};
pub use t5_tokenizer::T5Tokenizer;
pub use text_encoder::{TextEncoder, TextEncoderConfig};
pub use tokenizer::ClipTokenizer;
pub use torch_cuda_rng::{CudaGeometry, TorchCudaGenerator};
pub use torch_rng::TorchCpuGenerator;
pub use unet::{TextTime, TextTimeConfig, Unet, UnetConfig};
pub use vae::{LatentDistribution, Vae, VaeConfig};

/// Every family this daemon runs, one line each.
static FAMILIES: &[&dyn Family] = &[
    &stable_diffusion::StableDiffusion,
    &stable_diffusion_xl::StableDiffusionXl,
    &flux::Flux,
    &stable_diffusion_3::StableDiffusion3,
];

/// Families only test builds have.
#[cfg(debug_assertions)]
static TEST_FAMILIES: &[&dyn Family] = &[&test_noise::TestNoise];
#[cfg(not(debug_assertions))]
static TEST_FAMILIES: &[&dyn Family] = &[];

/// The implementation of the family `id` names (a `protocol::families::Family::id`).
pub fn family(id: &str) -> Option<&'static dyn Family> {
    FAMILIES
        .iter()
        .chain(TEST_FAMILIES)
        .copied()
        .find(|f| f.schema().id == id)
}

/// Everything that can go wrong while loading or running a pipeline.
#[derive(Debug, thiserror::Error)]
pub enum PipelineError {
    /// A file the component needs is not there.
    #[error("missing file {file} in {}", dir.display())]
    MissingFile { file: String, dir: PathBuf },
    /// A file exists but could not be read.
    #[error("cannot read {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// A configuration file is malformed or holds an impossible value.
    #[error("bad config {}: {problem}", file.display())]
    BadConfig { file: PathBuf, problem: String },
    /// A tensor operation failed inside one component.
    #[error("{component}: {source}")]
    Candle {
        component: &'static str,
        #[source]
        source: candle_core::Error,
    },
    /// The checkpoint or the request asks for something this implementation cannot do.
    #[error("unsupported {key} = {found}; supported: {supported}")]
    Unsupported {
        key: String,
        found: String,
        supported: String,
    },
    /// A request argument is out of range or inconsistent.
    #[error("invalid {name}: {problem}")]
    InvalidArgument { name: String, problem: String },
    /// The caller asked to stop.
    #[error("cancelled")]
    Cancelled,
}

impl PipelineError {
    pub(crate) fn unsupported(
        key: impl Into<String>,
        found: impl Into<String>,
        supported: impl Into<String>,
    ) -> Self {
        Self::Unsupported {
            key: key.into(),
            found: found.into(),
            supported: supported.into(),
        }
    }

    pub(crate) fn invalid(name: impl Into<String>, problem: impl Into<String>) -> Self {
        Self::InvalidArgument {
            name: name.into(),
            problem: problem.into(),
        }
    }
}

/// Attaches the component name to candle errors.
pub(crate) trait InComponent<T> {
    fn in_component(self, component: &'static str) -> Result<T, PipelineError>;
}

impl<T> InComponent<T> for candle_core::Result<T> {
    fn in_component(self, component: &'static str) -> Result<T, PipelineError> {
        self.map_err(|source| PipelineError::Candle {
            component,
            source: without_backtrace(source),
        })
    }
}

/// candle attaches a backtrace to errors when RUST_BACKTRACE is set; users get the error
/// itself, and the backtrace stays out of their messages.
fn without_backtrace(error: candle_core::Error) -> candle_core::Error {
    match error {
        candle_core::Error::WithBacktrace { inner, .. } => without_backtrace(*inner),
        other => other,
    }
}

/// Weight file names diffusers and transformers write, single-file first.
const WEIGHT_FILE_NAMES: [&str; 2] = ["diffusion_pytorch_model.safetensors", "model.safetensors"];

/// The safetensors files a component's weights live in: the single file diffusers or
/// transformers writes, or the shards listed by its `*.safetensors.index.json`.
pub fn weight_files(component_dir: &Path) -> Result<Vec<PathBuf>, PipelineError> {
    weight_files_variant(component_dir, None)
}

/// Like [`weight_files`], for a `variant` such as `fp16`: diffusers names those files
/// `diffusion_pytorch_model.fp16.safetensors`, or shards them under
/// `diffusion_pytorch_model.safetensors.index.fp16.json`. A missing variant is an error
/// naming the files looked for; it never falls back to other weights silently.
pub fn weight_files_variant(
    component_dir: &Path,
    variant: Option<&str>,
) -> Result<Vec<PathBuf>, PipelineError> {
    let mut looked_for = Vec::new();
    for name in WEIGHT_FILE_NAMES {
        let (single, index) = match variant {
            None => (name.to_string(), format!("{name}.index.json")),
            Some(v) => {
                let stem = name.trim_end_matches(".safetensors");
                (
                    format!("{stem}.{v}.safetensors"),
                    format!("{name}.index.{v}.json"),
                )
            }
        };
        if component_dir.join(&single).is_file() {
            return Ok(vec![component_dir.join(single)]);
        }
        if component_dir.join(&index).is_file() {
            return sharded_weight_files(component_dir, &component_dir.join(index));
        }
        looked_for.push(single);
        looked_for.push(index);
    }
    Err(PipelineError::MissingFile {
        file: looked_for.join(" or "),
        dir: component_dir.to_path_buf(),
    })
}

fn sharded_weight_files(component_dir: &Path, index: &Path) -> Result<Vec<PathBuf>, PipelineError> {
    let index_json = read_json_object(index)?;
    let weight_map = index_json
        .get("weight_map")
        .and_then(Value::as_object)
        .ok_or_else(|| PipelineError::BadConfig {
            file: index.to_path_buf(),
            problem: "no `weight_map` object".to_string(),
        })?;
    let mut files: Vec<PathBuf> = Vec::new();
    for shard in weight_map.values() {
        let shard = shard.as_str().ok_or_else(|| PipelineError::BadConfig {
            file: index.to_path_buf(),
            problem: format!("`weight_map` value {shard} is not a file name"),
        })?;
        let path = component_dir.join(shard);
        if !files.contains(&path) {
            if !path.is_file() {
                return Err(PipelineError::MissingFile {
                    file: shard.to_string(),
                    dir: component_dir.to_path_buf(),
                });
            }
            files.push(path);
        }
    }
    Ok(files)
}

/// Reads a component's weight files into tensors (see [`weights`]: one copy, no mapped
/// pages); returns the variable builder and the size the tensors take once loaded as
/// `dtype`.
pub(crate) fn load_weights(
    component_dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
    component: &'static str,
) -> Result<(VarBuilder<'static>, u64), PipelineError> {
    let files = weight_files_variant(component_dir, variant)?;
    let tensors = weights::load_tensors(&files, dtype, device, component)?;
    // As the budget counts it (`budget::weights_bytes`): every element at `dtype`'s size.
    let element_size = dtype.size_in_bytes() as u64;
    let bytes = tensors
        .values()
        .map(|tensor| tensor.elem_count() as u64 * element_size)
        .sum();
    Ok((VarBuilder::from_tensors(tensors, dtype, device), bytes))
}

/// Reads a model component from its folder: its config with `read_config`, its weights
/// (the `variant`'s, when one is asked for) in `dtype` on `device`, then builds it with
/// `build`. Returns the component and the size of its weights.
pub(crate) fn load_component<C, T>(
    dir: &Path,
    (variant, dtype, device): (Option<&str>, DType, &Device),
    component: &'static str,
    read_config: fn(&Path) -> Result<C, PipelineError>,
    build: fn(VarBuilder<'static>, C) -> candle_core::Result<T>,
) -> Result<(T, u64), PipelineError> {
    let config = read_config(dir)?;
    let (vb, bytes) = load_weights(dir, variant, dtype, device, component)?;
    let built = build(vb, config).in_component(component)?;
    Ok((built, bytes))
}

/// Reads a JSON file that must hold an object.
pub(crate) fn read_json_object(path: &Path) -> Result<Map<String, Value>, PipelineError> {
    let text = read_text(path)?;
    match serde_json::from_str::<Value>(&text) {
        Ok(Value::Object(map)) => Ok(map),
        Ok(_) => Err(PipelineError::BadConfig {
            file: path.to_path_buf(),
            problem: "not a JSON object".to_string(),
        }),
        Err(error) => Err(PipelineError::BadConfig {
            file: path.to_path_buf(),
            problem: error.to_string(),
        }),
    }
}

/// Reads a text file, telling a missing file apart from an unreadable one.
pub(crate) fn read_text(path: &Path) -> Result<String, PipelineError> {
    protocol::input::read_text_bounded(path, protocol::input::CONFIG_BYTES).map_err(|source| {
        if source.kind() == std::io::ErrorKind::NotFound {
            missing_file(path)
        } else {
            PipelineError::Io {
                path: path.to_path_buf(),
                source,
            }
        }
    })
}

fn missing_file(path: &Path) -> PipelineError {
    PipelineError::MissingFile {
        file: path
            .file_name()
            .map(|name| name.to_string_lossy().into_owned())
            .unwrap_or_default(),
        dir: path.parent().map(Path::to_path_buf).unwrap_or_default(),
    }
}

/// Typed access to a `config.json` object, with errors naming the file and the key.
///
/// A key that is absent or `null` takes the default given by the caller, as diffusers does
/// for keys a saved config lacks.
pub(crate) struct ConfigJson {
    file: PathBuf,
    map: Map<String, Value>,
}

impl ConfigJson {
    pub(crate) fn load(file: PathBuf) -> Result<Self, PipelineError> {
        let map = read_json_object(&file)?;
        Ok(Self { file, map })
    }

    pub(crate) fn file(&self) -> &Path {
        &self.file
    }

    pub(crate) fn bad(&self, key: &str, problem: impl std::fmt::Display) -> PipelineError {
        PipelineError::BadConfig {
            file: self.file.clone(),
            problem: format!("key `{key}`: {problem}"),
        }
    }

    /// The raw value, `None` when absent or `null`.
    pub(crate) fn value(&self, key: &str) -> Option<&Value> {
        self.map.get(key).filter(|value| !value.is_null())
    }

    pub(crate) fn contains_key(&self, key: &str) -> bool {
        self.map.contains_key(key)
    }

    pub(crate) fn usize_or(&self, key: &str, default: usize) -> Result<usize, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => self.as_usize(key, value),
        }
    }

    pub(crate) fn required_usize(&self, key: &str) -> Result<usize, PipelineError> {
        match self.value(key) {
            None => Err(self.bad(key, "missing")),
            Some(value) => self.as_usize(key, value),
        }
    }

    pub(crate) fn f64_or(&self, key: &str, default: f64) -> Result<f64, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_f64()
                .ok_or_else(|| self.bad(key, format!("expected a number, got {value}"))),
        }
    }

    pub(crate) fn bool_or(&self, key: &str, default: bool) -> Result<bool, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_bool()
                .ok_or_else(|| self.bad(key, format!("expected true or false, got {value}"))),
        }
    }

    pub(crate) fn str_or<'a>(
        &'a self,
        key: &str,
        default: &'a str,
    ) -> Result<&'a str, PipelineError> {
        match self.value(key) {
            None => Ok(default),
            Some(value) => value
                .as_str()
                .ok_or_else(|| self.bad(key, format!("expected a string, got {value}"))),
        }
    }

    pub(crate) fn usize_list(&self, key: &str) -> Result<Vec<usize>, PipelineError> {
        let value = self.value(key).ok_or_else(|| self.bad(key, "missing"))?;
        let items = value
            .as_array()
            .ok_or_else(|| self.bad(key, format!("expected a list, got {value}")))?;
        items.iter().map(|item| self.as_usize(key, item)).collect()
    }

    pub(crate) fn string_list(&self, key: &str) -> Result<Vec<String>, PipelineError> {
        let value = self.value(key).ok_or_else(|| self.bad(key, "missing"))?;
        let items = value
            .as_array()
            .ok_or_else(|| self.bad(key, format!("expected a list, got {value}")))?;
        items
            .iter()
            .map(|item| {
                item.as_str()
                    .map(str::to_string)
                    .ok_or_else(|| self.bad(key, format!("expected strings, got {item}")))
            })
            .collect()
    }

    /// An integer that applies to every block, or one integer per block.
    pub(crate) fn usize_per_block(
        &self,
        key: &str,
        default: usize,
        blocks: usize,
    ) -> Result<Vec<usize>, PipelineError> {
        match self.value(key) {
            None => Ok(vec![default; blocks]),
            Some(Value::Array(_)) => {
                let values = self.usize_list(key)?;
                if values.len() != blocks {
                    return Err(self.bad(
                        key,
                        format!("has {} entries for {blocks} blocks", values.len()),
                    ));
                }
                Ok(values)
            }
            Some(value) => Ok(vec![self.as_usize(key, value)?; blocks]),
        }
    }

    fn as_usize(&self, key: &str, value: &Value) -> Result<usize, PipelineError> {
        value
            .as_u64()
            .and_then(|number| usize::try_from(number).ok())
            .ok_or_else(|| self.bad(key, format!("expected a non-negative integer, got {value}")))
    }

    /// Fails with [`PipelineError::Unsupported`] unless the key is absent, `null`, or one of
    /// the accepted values.
    pub(crate) fn require_one_of(
        &self,
        key: &str,
        accepted: &[Value],
        supported: &str,
    ) -> Result<(), PipelineError> {
        match self.value(key) {
            None => Ok(()),
            Some(value) if accepted.contains(value) => Ok(()),
            Some(value) => Err(PipelineError::unsupported(
                key,
                value.to_string(),
                supported,
            )),
        }
    }
}
