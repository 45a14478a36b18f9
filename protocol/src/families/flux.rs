//! FLUX.1: diffusers' `FluxPipeline` (dev, schnell and their fine-tunes) and
//! `FluxImg2ImgPipeline`, with the arguments and defaults of their `__call__`.
//!
//! `guidance_scale` is the *embedded* guidance of FLUX.1-dev (one model call per step);
//! `true_cfg_scale` above 1 with a `negative_prompt` adds real classifier-free guidance (two
//! calls per step). schnell has no guidance embedder: it ignores `guidance_scale`.

use super::common::{
    guidance_scale, strength, HEIGHT, LATENTS, NEGATIVE_PROMPT, NON_NEGATIVE,
    NUM_IMAGES_PER_PROMPT, NUM_INFERENCE_STEPS, OUTPUT_TYPE, PROMPT, WIDTH,
};
use super::{ComponentSpec, Family, PipelineClass, Task};
use crate::workflow::{ArgDefault, ArgSpec, ArgType};

const ID: &str = "flux";

/// T5's longest prompt in FLUX (diffusers refuses more than 512 tokens).
pub const MAX_SEQUENCE_LENGTH: u64 = 512;

/// Arguments both pipelines take, in diffusers' order.
const COMMON: &[ArgSpec] = &[
    PROMPT,
    ArgSpec::new("prompt_2", ArgType::Text, ArgDefault::Unset),
    NEGATIVE_PROMPT,
    ArgSpec::new("negative_prompt_2", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new("true_cfg_scale", NON_NEGATIVE, ArgDefault::Number(1.0)),
    HEIGHT,
    WIDTH,
    ArgSpec::new(
        "num_inference_steps",
        NUM_INFERENCE_STEPS.ty,
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
    NUM_IMAGES_PER_PROMPT,
    LATENTS,
    OUTPUT_TYPE,
    ArgSpec::new(
        "max_sequence_length",
        ArgType::Integer {
            min: 1,
            max: MAX_SEQUENCE_LENGTH,
        },
        ArgDefault::Integer(512),
    ),
];

/// Only text to image.
const TEXT_TO_IMAGE: &[ArgSpec] = &[guidance_scale(3.5)];

/// Only image to image: the image is resized to `height` x `width` by diffusers; dw takes
/// it at that size (see the pipeline).
const IMAGE_TO_IMAGE: &[ArgSpec] = &[
    ArgSpec::new("image", ArgType::Image, ArgDefault::Required),
    strength(0.6),
    guidance_scale(7.0),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "FLUX.1",
    classes: &[
        PipelineClass {
            name: "FluxPipeline",
            family: ID,
            task: Task::TextToImage,
            arguments: &[COMMON, TEXT_TO_IMAGE],
        },
        PipelineClass {
            name: "FluxImg2ImgPipeline",
            family: ID,
            task: Task::ImageToImage,
            arguments: &[COMMON, IMAGE_TO_IMAGE],
        },
    ],
    // diffusers' "flux" entry of its auto-pipeline mappings.
    folder_classes: &["FluxPipeline", "FluxImg2ImgPipeline", "FluxInpaintPipeline"],
    components: &[
        ComponentSpec::required("tokenizer", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder", "transformers.CLIPTextModel"),
        ComponentSpec::required("tokenizer_2", "transformers.T5TokenizerFast"),
        ComponentSpec::required("text_encoder_2", "transformers.T5EncoderModel"),
        ComponentSpec::required("transformer", "FluxTransformer2DModel"),
        ComponentSpec::required("vae", "AutoencoderKL"),
    ],
    schedulers: super::FLOW_SCHEDULERS,
};
