//! Stable Diffusion 1.x and 2.x: diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`, with the arguments and defaults of their `__call__`.

use super::common::{
    guidance_scale, strength, HEIGHT, LATENTS, NEGATIVE_PROMPT, NUM_IMAGES_PER_PROMPT,
    NUM_INFERENCE_STEPS, OUTPUT_TYPE, PROMPT, WIDTH,
};
use super::{ComponentSpec, Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType};

const ID: &str = "stable_diffusion";

/// Arguments both pipelines take, in diffusers' order.
const COMMON: &[ArgSpec] = &[
    PROMPT,
    NEGATIVE_PROMPT,
    NUM_INFERENCE_STEPS,
    guidance_scale(7.5),
    NUM_IMAGES_PER_PROMPT,
    OUTPUT_TYPE,
    ArgSpec::new(
        "cross_attention_kwargs",
        ArgType::AttentionScale,
        ArgDefault::Unset,
    ),
];

/// Only text to image.
const TEXT_TO_IMAGE: &[ArgSpec] = &[HEIGHT, WIDTH, LATENTS];

/// Only image to image.
const IMAGE_TO_IMAGE: &[ArgSpec] = &[
    ArgSpec::new("image", ArgType::Image, ArgDefault::Required),
    strength(0.8),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "Stable Diffusion",
    classes: &[
        PipelineClass {
            name: "StableDiffusionPipeline",
            family: ID,
            task: Task::TextToImage,
            arguments: &[COMMON, TEXT_TO_IMAGE],
        },
        PipelineClass {
            name: "StableDiffusionImg2ImgPipeline",
            family: ID,
            task: Task::ImageToImage,
            arguments: &[COMMON, IMAGE_TO_IMAGE],
        },
    ],
    // diffusers' "stable-diffusion" entry of its auto-pipeline mappings.
    folder_classes: &[
        "StableDiffusionPipeline",
        "StableDiffusionImg2ImgPipeline",
        "StableDiffusionInpaintPipeline",
    ],
    components: &[
        ComponentSpec::required("tokenizer", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder", "transformers.CLIPTextModel"),
        ComponentSpec::required("unet", "UNet2DConditionModel"),
        ComponentSpec::required("vae", "AutoencoderKL"),
    ],
    schedulers: super::NOISE_SCHEDULERS,
    loras: true,
};
