//! What SDXL's UNet is conditioned on, as diffusers' `encode_prompt` and
//! `_get_add_time_ids` compute it.
//!
//! - **Text**: each prompt through both CLIP encoders (the first may be absent, as in the
//!   refiner); their penultimate hidden states concatenated on the feature axis, and the
//!   projected pooled output of `text_encoder_2`. Without a `negative_prompt`, a folder
//!   with `force_zeros_for_empty_prompt` gives zero negative embeddings; otherwise the
//!   negative prompt (`""` when absent) is encoded the same way.
//! - **Time ids**: `original_size`, `crops_coords_top_left` and `target_size` (the refiner,
//!   `requires_aesthetics_score`: the aesthetic score in place of the target size), for the
//!   prompt rows and for the negative rows.

use std::sync::Arc;

use candle_core::{DType, Device, Tensor};

use super::super::diffusion::repeat_rows;
use super::super::lora::{self, ActiveAdapters};
use super::super::{ClipTokenizer, InComponent, PipelineError, TextEncoder, TextTimeConfig};

/// Token sequence length of both CLIP encoders.
pub const MAX_TOKENS: usize = 77;
const COMPONENT: &str = "text encoders";

/// One CLIP tokenizer and its encoder.
#[derive(Debug, Clone)]
pub struct ClipPair {
    pub tokenizer: Arc<ClipTokenizer>,
    pub encoder: Arc<TextEncoder>,
}

/// SDXL's text encoders: `text_encoder` (absent in the refiner) and `text_encoder_2`.
#[derive(Debug, Clone)]
pub struct TextEncoders {
    pub first: Option<ClipPair>,
    pub second: ClipPair,
}

/// The prompts of one request, as diffusers takes them.
#[derive(Debug, Clone, Default)]
pub struct PromptTexts {
    pub prompts: Vec<String>,
    /// For `text_encoder_2`; the prompt when absent.
    pub prompt_2: Option<String>,
    pub negative_prompt: Option<String>,
    /// For `text_encoder_2`; the negative prompt when absent.
    pub negative_prompt_2: Option<String>,
}

/// Embeddings in UNet batch order: with guidance, every negative row first, then every
/// prompt row; each prompt's rows repeated for its images, together.
#[derive(Debug)]
pub struct TextConditioning {
    /// (rows, 77, text_encoder width + text_encoder_2 width).
    pub hidden: Tensor,
    /// (rows, projection width).
    pub pooled: Tensor,
}

/// The LoRA branches each text encoder runs with.
#[derive(Debug, Default)]
pub struct EncoderAdapters {
    pub first: Option<Arc<ActiveAdapters>>,
    pub second: Option<Arc<ActiveAdapters>>,
}

impl TextEncoders {
    /// The width of `text_encoder_2`'s projection (the pooled embedding).
    pub fn projection_dim(&self) -> Result<usize, PipelineError> {
        self.second
            .encoder
            .projection_dim()
            .ok_or_else(no_projection)
    }

    /// The conditioning for `texts`, each prompt repeated `images_per_prompt` times, with
    /// the negative rows first when `guided`.
    pub fn encode(
        &self,
        texts: &PromptTexts,
        images_per_prompt: usize,
        guided: bool,
        force_zeros_for_empty_prompt: bool,
        adapters: &EncoderAdapters,
    ) -> Result<TextConditioning, PipelineError> {
        let count = texts.prompts.len();
        // diffusers: `prompt_2 = prompt_2 or prompt`, so an empty one falls back too.
        let second: Vec<String> = match non_empty(&texts.prompt_2) {
            Some(prompt_2) => vec![prompt_2.to_string(); count],
            None => texts.prompts.clone(),
        };
        let positive = self.encode_texts(&texts.prompts, &second, adapters)?;
        let (hidden, pooled) = if !guided {
            (positive.hidden, positive.pooled)
        } else {
            let negative = match (&texts.negative_prompt, force_zeros_for_empty_prompt) {
                (None, true) => TextConditioning {
                    hidden: positive.hidden.zeros_like().in_component(COMPONENT)?,
                    pooled: positive.pooled.zeros_like().in_component(COMPONENT)?,
                },
                (negative, _) => {
                    let negative = negative.clone().unwrap_or_default();
                    let negative_2 = non_empty(&texts.negative_prompt_2)
                        .map_or_else(|| negative.clone(), str::to_string);
                    self.encode_texts(&vec![negative; count], &vec![negative_2; count], adapters)?
                }
            };
            let cat = |a: &Tensor, b: &Tensor| Tensor::cat(&[a, b], 0).in_component(COMPONENT);
            (
                cat(&negative.hidden, &positive.hidden)?,
                cat(&negative.pooled, &positive.pooled)?,
            )
        };
        let repeat = |xs: &Tensor| repeat_rows(xs, images_per_prompt).in_component(COMPONENT);
        Ok(TextConditioning {
            hidden: repeat(&hidden)?,
            pooled: repeat(&pooled)?,
        })
    }

    /// `first` through `text_encoder` and `second` through `text_encoder_2`: penultimate
    /// states side by side, and the second encoder's projected pooled output.
    fn encode_texts(
        &self,
        first: &[String],
        second: &[String],
        adapters: &EncoderAdapters,
    ) -> Result<TextConditioning, PipelineError> {
        let ids = |tokenizer: &ClipTokenizer, texts: &[String]| {
            texts
                .iter()
                .map(|text| tokenizer.encode_padded(text, MAX_TOKENS))
                .collect::<Result<Vec<_>, _>>()
        };
        let mut states = Vec::with_capacity(2);
        if let Some(pair) = &self.first {
            let ids = ids(&pair.tokenizer, first)?;
            let output =
                lora::with_adapters(adapters.first.as_ref(), || pair.encoder.encode_all(&ids))?;
            states.push(output.penultimate);
        }
        let ids = ids(&self.second.tokenizer, second)?;
        let output = lora::with_adapters(adapters.second.as_ref(), || {
            self.second.encoder.encode_all(&ids)
        })?;
        states.push(output.penultimate);
        let pooled = output.text_embeds.ok_or_else(no_projection)?;
        Ok(TextConditioning {
            hidden: Tensor::cat(&states, 2).in_component(COMPONENT)?,
            pooled,
        })
    }
}

/// Python's truthiness of an optional text: `None` and `""` are both absent.
fn non_empty(text: &Option<String>) -> Option<&str> {
    text.as_deref().filter(|t| !t.is_empty())
}

fn no_projection() -> PipelineError {
    PipelineError::invalid(
        "text_encoder_2",
        "has no text_projection; SDXL takes the pooled output of a CLIPTextModelWithProjection",
    )
}

/// The micro-conditioning arguments, `None` where diffusers' default applies.
#[derive(Debug, Clone, Copy, Default)]
pub struct MicroConditioning {
    pub original_size: Option<(usize, usize)>,
    pub crops_coords_top_left: Option<(usize, usize)>,
    pub target_size: Option<(usize, usize)>,
    pub negative_original_size: Option<(usize, usize)>,
    pub negative_crops_coords_top_left: Option<(usize, usize)>,
    pub negative_target_size: Option<(usize, usize)>,
    /// Image to image only.
    pub aesthetic_score: f64,
    pub negative_aesthetic_score: f64,
}

/// Which time ids a pipeline builds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TimeIdLayout {
    /// `StableDiffusionXLPipeline`: the negative rows take their own sizes only when both
    /// `negative_original_size` and `negative_target_size` are given.
    TextToImage,
    /// `StableDiffusionXLImg2ImgPipeline`: every negative size defaults to its positive one.
    ImageToImage { requires_aesthetics_score: bool },
}

/// The time ids of the prompt rows and of the negative rows, for an image of `size`
/// (height, width), checked against what the UNet's added embedding takes.
pub fn time_ids(
    micro: &MicroConditioning,
    layout: TimeIdLayout,
    size: (usize, usize),
    unet: TextTimeConfig,
    projection_dim: usize,
) -> Result<(Vec<f32>, Vec<f32>), PipelineError> {
    let original = micro.original_size.unwrap_or(size);
    let crops = micro.crops_coords_top_left.unwrap_or((0, 0));
    let target = micro.target_size.unwrap_or(size);
    let ids = |a: (usize, usize), b: (usize, usize), tail: &[f64]| -> Vec<f32> {
        let mut ids = vec![a.0 as f32, a.1 as f32, b.0 as f32, b.1 as f32];
        ids.extend(tail.iter().map(|v| *v as f32));
        ids
    };
    let pair = |p: (usize, usize)| [p.0 as f64, p.1 as f64];
    let (positive, negative) = match layout {
        TimeIdLayout::TextToImage => {
            let positive = ids(original, crops, &pair(target));
            let negative = match (micro.negative_original_size, micro.negative_target_size) {
                (Some(original), Some(target)) => {
                    let crops = micro.negative_crops_coords_top_left.unwrap_or((0, 0));
                    ids(original, crops, &pair(target))
                }
                _ => positive.clone(),
            };
            (positive, negative)
        }
        TimeIdLayout::ImageToImage {
            requires_aesthetics_score,
        } => {
            let negative_original = micro.negative_original_size.unwrap_or(original);
            let negative_crops = micro.negative_crops_coords_top_left.unwrap_or(crops);
            match requires_aesthetics_score {
                true => (
                    ids(original, crops, &[micro.aesthetic_score]),
                    ids(
                        negative_original,
                        negative_crops,
                        &[micro.negative_aesthetic_score],
                    ),
                ),
                false => {
                    let negative_target = micro.negative_target_size.unwrap_or(target);
                    (
                        ids(original, crops, &pair(target)),
                        ids(negative_original, negative_crops, &pair(negative_target)),
                    )
                }
            }
        }
    };
    check_width(positive.len(), layout, unet, projection_dim)?;
    Ok((positive, negative))
}

/// diffusers' check that the time ids and pooled embedding fill the UNet's added
/// embedding exactly; a refiner folder without `requires_aesthetics_score` (or a base
/// folder with it) is named.
fn check_width(
    ids: usize,
    layout: TimeIdLayout,
    unet: TextTimeConfig,
    projection_dim: usize,
) -> Result<(), PipelineError> {
    let passed = unet.time_embed_dim * ids + projection_dim;
    if passed == unet.input_dim {
        return Ok(());
    }
    let hint = match layout {
        TimeIdLayout::ImageToImage {
            requires_aesthetics_score,
        } if passed.abs_diff(unet.input_dim) == unet.time_embed_dim => format!(
            "; this UNet expects `requires_aesthetics_score: {}` in model_index.json (a refiner has it, a base model does not)",
            !requires_aesthetics_score
        ),
        _ => String::new(),
    };
    Err(PipelineError::invalid(
        "unet",
        format!(
            "its added embedding takes {} values (projection_class_embeddings_input_dim), but {ids} time ids of {} and a pooled embedding of {projection_dim} make {passed}{hint}",
            unet.input_dim, unet.time_embed_dim
        ),
    ))
}

/// Time ids in UNet batch order: `rows` rows, the negative ones first when `guided`.
pub fn time_id_rows(
    (positive, negative): (&[f32], &[f32]),
    rows: usize,
    guided: bool,
    device: &Device,
) -> Result<Tensor, PipelineError> {
    let mut values = Vec::with_capacity(positive.len() * rows * 2);
    if guided {
        (0..rows).for_each(|_| values.extend_from_slice(negative));
    }
    (0..rows).for_each(|_| values.extend_from_slice(positive));
    let total = if guided { 2 * rows } else { rows };
    Tensor::from_vec(values, (total, positive.len()), device)
        .and_then(|ids| ids.to_dtype(DType::F32))
        .in_component(COMPONENT)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BASE: TextTimeConfig = TextTimeConfig {
        time_embed_dim: 8,
        input_dim: 88,
    };
    const REFINER: TextTimeConfig = TextTimeConfig {
        time_embed_dim: 8,
        input_dim: 80,
    };

    #[test]
    fn text_to_image_ids_default_to_the_image_size_and_negatives_copy_them() {
        let micro = MicroConditioning {
            crops_coords_top_left: Some((16, 32)),
            negative_original_size: Some((512, 512)),
            ..Default::default()
        };
        let (positive, negative) =
            time_ids(&micro, TimeIdLayout::TextToImage, (128, 96), BASE, 40).unwrap();
        assert_eq!(positive, [128.0, 96.0, 16.0, 32.0, 128.0, 96.0]);
        // Only negative_original_size: diffusers needs both sizes to use them.
        assert_eq!(negative, positive);
    }

    #[test]
    fn the_refiner_takes_aesthetic_scores_in_place_of_the_target_size() {
        let micro = MicroConditioning {
            aesthetic_score: 6.0,
            negative_aesthetic_score: 2.5,
            ..Default::default()
        };
        let layout = TimeIdLayout::ImageToImage {
            requires_aesthetics_score: true,
        };
        let (positive, negative) = time_ids(&micro, layout, (128, 128), REFINER, 40).unwrap();
        assert_eq!(positive, [128.0, 128.0, 0.0, 0.0, 6.0]);
        assert_eq!(negative, [128.0, 128.0, 0.0, 0.0, 2.5]);
    }

    #[test]
    fn a_refiner_unet_without_requires_aesthetics_score_is_named() {
        let layout = TimeIdLayout::ImageToImage {
            requires_aesthetics_score: false,
        };
        let micro = MicroConditioning::default();
        let error = time_ids(&micro, layout, (128, 128), REFINER, 40).unwrap_err();
        assert!(
            error
                .to_string()
                .contains("`requires_aesthetics_score: true`"),
            "{error}"
        );
    }

    #[test]
    fn rows_put_every_negative_row_first() {
        let rows = time_id_rows((&[1.0, 2.0], &[3.0, 4.0]), 2, true, &Device::Cpu).unwrap();
        assert_eq!(
            rows.to_vec2::<f32>().unwrap(),
            [[3.0, 4.0], [3.0, 4.0], [1.0, 2.0], [1.0, 2.0]]
        );
    }
}
