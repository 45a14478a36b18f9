//! Stable Diffusion 3 and 3.5: diffusers' `StableDiffusion3Pipeline` and
//! `StableDiffusion3Img2ImgPipeline`, with the arguments and defaults of their `__call__`.
//!
//! Three text encoders: CLIP-L and CLIP-G (`text_encoder`, `text_encoder_2`) and T5
//! (`text_encoder_3`), which may be left out (a folder listing it as null, or
//! `"text_encoder_3": null` in `from_pretrained_arguments`, as diffusers takes it): its
//! place is then zeros, the usual way to run SD 3 in less memory.

use super::common::{
    guidance_scale, strength, FRACTION, HEIGHT, LATENTS, NEGATIVE_PROMPT, NON_NEGATIVE,
    NUM_IMAGES_PER_PROMPT, OUTPUT_TYPE, PROMPT, WIDTH,
};
use super::{ComponentSpec, Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType};

const ID: &str = "stable_diffusion_3";

/// Arguments both pipelines take, in diffusers' order.
const COMMON: &[ArgSpec] = &[
    PROMPT,
    ArgSpec::new("prompt_2", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new("prompt_3", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new(
        "num_inference_steps",
        ArgType::Integer { min: 1, max: 1000 },
        ArgDefault::Integer(28),
    ),
    ArgSpec::new(
        "sigmas",
        ArgType::Numbers {
            min: 0.0,
            max: 1.0,
            max_len: 1000,
        },
        ArgDefault::Unset,
    ),
    guidance_scale(7.0),
    NEGATIVE_PROMPT,
    ArgSpec::new("negative_prompt_2", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new("negative_prompt_3", ArgType::Text, ArgDefault::Unset),
    NUM_IMAGES_PER_PROMPT,
    OUTPUT_TYPE,
    ArgSpec::new(
        "max_sequence_length",
        ArgType::Integer { min: 1, max: 512 },
        ArgDefault::Integer(256),
    ),
    ArgSpec::new(
        "joint_attention_kwargs",
        ArgType::AttentionScale,
        ArgDefault::Unset,
    ),
];

/// Only text to image: the size and skip-layer guidance (SD 3.5 medium's).
const TEXT_TO_IMAGE: &[ArgSpec] = &[
    HEIGHT,
    WIDTH,
    LATENTS,
    ArgSpec::new(
        "skip_guidance_layers",
        ArgType::Integers {
            min: 0,
            max: 1000,
            max_len: 100,
        },
        ArgDefault::Unset,
    ),
    ArgSpec::new(
        "skip_layer_guidance_scale",
        NON_NEGATIVE,
        ArgDefault::Number(2.8),
    ),
    ArgSpec::new(
        "skip_layer_guidance_stop",
        FRACTION,
        ArgDefault::Number(0.2),
    ),
    ArgSpec::new(
        "skip_layer_guidance_start",
        FRACTION,
        ArgDefault::Number(0.01),
    ),
];

/// Only image to image.
const IMAGE_TO_IMAGE: &[ArgSpec] = &[
    HEIGHT,
    WIDTH,
    ArgSpec::new("image", ArgType::Image, ArgDefault::Required),
    strength(0.6),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "Stable Diffusion 3",
    classes: &[
        PipelineClass {
            name: "StableDiffusion3Pipeline",
            family: ID,
            task: Task::TextToImage,
            arguments: &[COMMON, TEXT_TO_IMAGE],
        },
        PipelineClass {
            name: "StableDiffusion3Img2ImgPipeline",
            family: ID,
            task: Task::ImageToImage,
            arguments: &[COMMON, IMAGE_TO_IMAGE],
        },
    ],
    // diffusers' "stable-diffusion-3" entry of its auto-pipeline mappings.
    folder_classes: &[
        "StableDiffusion3Pipeline",
        "StableDiffusion3Img2ImgPipeline",
        "StableDiffusion3InpaintPipeline",
    ],
    components: &[
        ComponentSpec::required("tokenizer", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder", "transformers.CLIPTextModelWithProjection"),
        ComponentSpec::required("tokenizer_2", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder_2", "transformers.CLIPTextModelWithProjection"),
        ComponentSpec::optional("tokenizer_3", "transformers.T5TokenizerFast"),
        ComponentSpec::optional("text_encoder_3", "transformers.T5EncoderModel"),
        ComponentSpec::required("transformer", "SD3Transformer2DModel"),
        ComponentSpec::required("vae", "AutoencoderKL"),
    ],
    schedulers: super::FLOW_SCHEDULERS,
    loras: true,
};
