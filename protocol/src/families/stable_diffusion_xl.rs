//! Stable Diffusion XL: diffusers' `StableDiffusionXLPipeline` (base 1.0, its fine-tunes,
//! Turbo and Lightning-style few-step runs) and `StableDiffusionXLImg2ImgPipeline`
//! (img2img and the refiner), with the arguments and defaults of their `__call__`.
//!
//! A refiner folder lists no `tokenizer`/`text_encoder` (`[null, null]` in
//! `model_index.json`) and runs on `text_encoder_2` alone.

use super::common::{
    guidance_scale, strength, FRACTION, HEIGHT, LATENTS, NEGATIVE_PROMPT, NON_NEGATIVE,
    NUM_IMAGES_PER_PROMPT, NUM_INFERENCE_STEPS, OUTPUT_TYPE, PROMPT, WIDTH,
};
use super::{ComponentSpec, Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType};

const ID: &str = "stable_diffusion_xl";

/// `original_size`, `target_size`: (height, width).
const SIZE: ArgType = ArgType::Pair { min: 1, max: 16384 };
/// `crops_coords_top_left`: (top, left).
const CROP: ArgType = ArgType::Pair { min: 0, max: 16384 };

/// Arguments both pipelines take, in diffusers' order.
const COMMON: &[ArgSpec] = &[
    PROMPT,
    ArgSpec::new("prompt_2", ArgType::Text, ArgDefault::Unset),
    NUM_INFERENCE_STEPS,
    ArgSpec::new("denoising_end", FRACTION, ArgDefault::Unset),
    guidance_scale(5.0),
    NEGATIVE_PROMPT,
    ArgSpec::new("negative_prompt_2", ArgType::Text, ArgDefault::Unset),
    NUM_IMAGES_PER_PROMPT,
    OUTPUT_TYPE,
    ArgSpec::new("guidance_rescale", NON_NEGATIVE, ArgDefault::Number(0.0)),
    ArgSpec::new("original_size", SIZE, ArgDefault::Unset),
    ArgSpec::new("crops_coords_top_left", CROP, ArgDefault::Unset),
    ArgSpec::new("target_size", SIZE, ArgDefault::Unset),
    ArgSpec::new("negative_original_size", SIZE, ArgDefault::Unset),
    ArgSpec::new("negative_crops_coords_top_left", CROP, ArgDefault::Unset),
    ArgSpec::new("negative_target_size", SIZE, ArgDefault::Unset),
    ArgSpec::new(
        "cross_attention_kwargs",
        ArgType::AttentionScale,
        ArgDefault::Unset,
    ),
];

/// Only text to image.
const TEXT_TO_IMAGE: &[ArgSpec] = &[HEIGHT, WIDTH, LATENTS];

/// Only image to image (and the refiner).
const IMAGE_TO_IMAGE: &[ArgSpec] = &[
    ArgSpec::new("image", ArgType::ImageOrLatents, ArgDefault::Required),
    strength(0.3),
    ArgSpec::new("denoising_start", FRACTION, ArgDefault::Unset),
    ArgSpec::new("aesthetic_score", NON_NEGATIVE, ArgDefault::Number(6.0)),
    ArgSpec::new(
        "negative_aesthetic_score",
        NON_NEGATIVE,
        ArgDefault::Number(2.5),
    ),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "Stable Diffusion XL",
    classes: &[
        PipelineClass {
            name: "StableDiffusionXLPipeline",
            family: ID,
            task: Task::TextToImage,
            arguments: &[COMMON, TEXT_TO_IMAGE],
        },
        PipelineClass {
            name: "StableDiffusionXLImg2ImgPipeline",
            family: ID,
            task: Task::ImageToImage,
            arguments: &[COMMON, IMAGE_TO_IMAGE],
        },
    ],
    // diffusers' "stable-diffusion-xl" entry of its auto-pipeline mappings.
    folder_classes: &[
        "StableDiffusionXLPipeline",
        "StableDiffusionXLImg2ImgPipeline",
        "StableDiffusionXLInpaintPipeline",
    ],
    components: &[
        ComponentSpec::optional("tokenizer", "transformers.CLIPTokenizer"),
        ComponentSpec::optional("text_encoder", "transformers.CLIPTextModel"),
        ComponentSpec::required("tokenizer_2", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder_2", "transformers.CLIPTextModelWithProjection"),
        ComponentSpec::required("unet", "UNet2DConditionModel"),
        ComponentSpec::required("vae", "AutoencoderKL"),
    ],
    schedulers: super::NOISE_SCHEDULERS,
    loras: true,
};
