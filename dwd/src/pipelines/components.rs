//! How each component class is loaded, by its diffusers (or transformers) class name.
//!
//! Families name their components' classes in their `protocol` tables; this is the one
//! place that says which files make up a component of a class (for the cache key and the
//! memory estimate) and how it is loaded. A class shared by several families (a VAE, a
//! CLIP text encoder) is loaded the same way for all of them, and the cache shares it.

use std::any::Any;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use candle_core::{DType, Device};

use super::flux::FluxTransformer;
use super::lora::LoraAdapter;
use super::stable_diffusion_3::Sd3Transformer;
use super::{
    weight_files_variant, ClipTokenizer, PipelineError, T5Encoder, T5Tokenizer, TextEncoder, Unet,
    Vae,
};

/// A loaded component, as the cache holds it.
pub type Loaded = Arc<dyn Any + Send + Sync>;

/// Loads a component to host memory for model offload: its folder, variant and dtype.
pub type LoadToHost = fn(&Path, Option<&str>, DType) -> Result<Loaded, PipelineError>;

/// The class name LoRA adapters are cached under.
pub const LORA_CLASS: &str = "lora";

/// How one component class is found on disk and loaded.
pub struct ComponentLoader {
    pub class: &'static str,
    /// Whether it has weights (in the pipeline's dtype); a tokenizer has none.
    pub weighted: bool,
    /// The files it is read from (its identity) and, of those, its weight files.
    pub files: fn(&Path, Option<&str>) -> Result<ComponentFiles, PipelineError>,
    pub load: fn(&Path, Option<&str>, DType, &Device) -> Result<Loaded, PipelineError>,
    /// For the large components model offload moves (`offload: "model"`): loads it to
    /// host memory as a [`super::placement::HostWeights`], placed on the device only while it runs.
    pub offload: Option<LoadToHost>,
}

/// What a component is read from.
#[derive(Debug, Clone)]
pub struct ComponentFiles {
    pub all: Vec<PathBuf>,
    pub weights: Vec<PathBuf>,
}

/// Every component class dw loads.
pub static LOADERS: &[ComponentLoader] = &[
    ComponentLoader {
        class: "transformers.CLIPTokenizer",
        weighted: false,
        files: tokenizer_files,
        load: |dir, _, _, _| Ok(Arc::new(ClipTokenizer::load(dir)?)),
        offload: None,
    },
    ComponentLoader {
        class: "transformers.CLIPTextModel",
        weighted: true,
        files: model_files,
        load: text_encoder,
        offload: None,
    },
    // The same encoder, with the `text_projection` its weights hold.
    ComponentLoader {
        class: "transformers.CLIPTextModelWithProjection",
        weighted: true,
        files: model_files,
        load: text_encoder,
        offload: None,
    },
    ComponentLoader {
        class: "transformers.T5TokenizerFast",
        weighted: false,
        files: t5_tokenizer_files,
        load: |dir, _, _, _| Ok(Arc::new(T5Tokenizer::load(dir)?)),
        offload: None,
    },
    ComponentLoader {
        class: "transformers.T5EncoderModel",
        weighted: true,
        files: model_files,
        load: |dir, variant, dtype, device| {
            Ok(Arc::new(T5Encoder::load_variant(
                dir, variant, dtype, device,
            )?))
        },
        offload: Some(|dir, variant, dtype| {
            Ok(Arc::new(T5Encoder::load_host(dir, variant, dtype)?))
        }),
    },
    ComponentLoader {
        class: "UNet2DConditionModel",
        weighted: true,
        files: model_files,
        load: |dir, variant, dtype, device| {
            Ok(Arc::new(Unet::load_variant(dir, variant, dtype, device)?))
        },
        offload: None,
    },
    ComponentLoader {
        class: "FluxTransformer2DModel",
        weighted: true,
        files: model_files,
        load: |dir, variant, dtype, device| {
            Ok(Arc::new(FluxTransformer::load_variant(
                dir, variant, dtype, device,
            )?))
        },
        offload: Some(|dir, variant, dtype| {
            Ok(Arc::new(FluxTransformer::load_host(dir, variant, dtype)?))
        }),
    },
    ComponentLoader {
        class: "SD3Transformer2DModel",
        weighted: true,
        files: model_files,
        load: |dir, variant, dtype, device| {
            Ok(Arc::new(Sd3Transformer::load_variant(
                dir, variant, dtype, device,
            )?))
        },
        offload: Some(|dir, variant, dtype| {
            Ok(Arc::new(Sd3Transformer::load_host(dir, variant, dtype)?))
        }),
    },
    // A LoRA file (the loader's "folder" is the file itself), read as f32 on the CPU and
    // placed on the device by each run that uses it.
    ComponentLoader {
        class: LORA_CLASS,
        weighted: false,
        files: |file, _| {
            Ok(ComponentFiles {
                all: vec![file.to_path_buf()],
                weights: vec![file.to_path_buf()],
            })
        },
        load: |file, _, _, _| Ok(Arc::new(LoraAdapter::load(file)?)),
        offload: None,
    },
    ComponentLoader {
        class: "AutoencoderKL",
        weighted: true,
        files: model_files,
        load: |dir, variant, dtype, device| {
            Ok(Arc::new(Vae::load_variant(dir, variant, dtype, device)?))
        },
        offload: None,
    },
];

/// A CLIP text encoder, with or without a projection.
fn text_encoder(
    dir: &Path,
    variant: Option<&str>,
    dtype: DType,
    device: &Device,
) -> Result<Loaded, PipelineError> {
    Ok(Arc::new(TextEncoder::load_variant(
        dir, variant, dtype, device,
    )?))
}

/// The loader of `class`.
pub fn loader(class: &str) -> Option<&'static ComponentLoader> {
    LOADERS.iter().find(|l| l.class == class)
}

/// A CLIP tokenizer's `tokenizer.json` (or vocabulary and merges), and the optional files
/// that change it.
fn tokenizer_files(dir: &Path, _: Option<&str>) -> Result<ComponentFiles, PipelineError> {
    let json = dir.join("tokenizer.json");
    let main = match json.is_file() {
        true => vec![json],
        false => vec![dir.join("vocab.json"), dir.join("merges.txt")],
    };
    Ok(with_special_token_files(dir, main))
}

/// A T5 tokenizer's `tokenizer.json` (the only file it is read from), and the optional
/// files that name its special tokens.
fn t5_tokenizer_files(dir: &Path, _: Option<&str>) -> Result<ComponentFiles, PipelineError> {
    Ok(with_special_token_files(
        dir,
        vec![dir.join("tokenizer.json")],
    ))
}

/// A tokenizer's files: `main`, then whichever of the files naming special tokens exist.
fn with_special_token_files(dir: &Path, mut all: Vec<PathBuf>) -> ComponentFiles {
    all.extend(
        ["special_tokens_map.json", "tokenizer_config.json"]
            .map(|f| dir.join(f))
            .into_iter()
            .filter(|p| p.is_file()),
    );
    ComponentFiles {
        all,
        weights: Vec::new(),
    }
}

/// A model's weights (the variant's, when one is asked for) and its `config.json`.
fn model_files(dir: &Path, variant: Option<&str>) -> Result<ComponentFiles, PipelineError> {
    let weights = weight_files_variant(dir, variant)?;
    let mut all = weights.clone();
    all.push(dir.join("config.json"));
    Ok(ComponentFiles { all, weights })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_component_class_a_family_names_has_a_loader() {
        for family in protocol::families::families() {
            for component in family.components {
                assert!(
                    loader(component.class).is_some(),
                    "{}: `{}` is `{}`, which nothing loads",
                    family.id,
                    component.name,
                    component.class
                );
            }
        }
    }
}
