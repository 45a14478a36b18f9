//! Stable Diffusion 1.x and 2.x: diffusers' `StableDiffusionPipeline` and
//! `StableDiffusionImg2ImgPipeline`, with the arguments and defaults of their `__call__`.

use super::{ComponentSpec, Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType, OutputType};

const ID: &str = "stable_diffusion";

/// Arguments both pipelines take, in diffusers' order.
const COMMON: &[ArgSpec] = &[
    ArgSpec::new("prompt", ArgType::Prompts, ArgDefault::Required),
    ArgSpec::new("negative_prompt", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new(
        "num_inference_steps",
        ArgType::Integer { min: 1, max: 1000 },
        ArgDefault::Integer(50),
    ),
    ArgSpec::new(
        "guidance_scale",
        ArgType::Number {
            min: 0.0,
            max: f64::MAX,
        },
        ArgDefault::Number(7.5),
    ),
    ArgSpec::new(
        "num_images_per_prompt",
        ArgType::Integer { min: 1, max: 64 },
        ArgDefault::Integer(1),
    ),
    ArgSpec::new(
        "output_type",
        ArgType::OutputType,
        ArgDefault::Output(OutputType::Image),
    ),
];

const SIDE: ArgType = ArgType::Integer { min: 8, max: 16384 };

/// Only text to image.
const TEXT_TO_IMAGE: &[ArgSpec] = &[
    ArgSpec::new("height", SIDE, ArgDefault::Unset),
    ArgSpec::new("width", SIDE, ArgDefault::Unset),
    ArgSpec::new("latents", ArgType::Latents, ArgDefault::Unset),
];

/// Only image to image.
const IMAGE_TO_IMAGE: &[ArgSpec] = &[
    ArgSpec::new("image", ArgType::Image, ArgDefault::Required),
    ArgSpec::new(
        "strength",
        ArgType::Number { min: 0.0, max: 1.0 },
        ArgDefault::Number(0.8),
    ),
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
    schedulers: super::SCHEDULERS,
};
