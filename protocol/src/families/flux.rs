//! FLUX.1: diffusers' `FluxPipeline` (dev, schnell and their fine-tunes),
//! `FluxImg2ImgPipeline` and `FluxFillPipeline` (inpainting and outpainting with
//! FLUX.1-Fill), with the arguments and defaults of their `__call__`.
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

/// The prompts every FLUX pipeline takes: CLIP's and T5's.
const PROMPTS: &[ArgSpec] = &[
    PROMPT,
    ArgSpec::new("prompt_2", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new(
        "joint_attention_kwargs",
        ArgType::AttentionScale,
        ArgDefault::Unset,
    ),
];

/// True classifier-free guidance (text to image and image to image).
const TRUE_CFG: &[ArgSpec] = &[
    NEGATIVE_PROMPT,
    ArgSpec::new("negative_prompt_2", ArgType::Text, ArgDefault::Unset),
    ArgSpec::new("true_cfg_scale", NON_NEGATIVE, ArgDefault::Number(1.0)),
];

/// Size, schedule, batch and output, as every FLUX pipeline takes them.
const SHAPE: &[ArgSpec] = &[
    HEIGHT,
    WIDTH,
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

/// `num_inference_steps` with a pipeline's default.
const fn steps(default: u64) -> ArgSpec {
    ArgSpec::new(
        "num_inference_steps",
        NUM_INFERENCE_STEPS.ty,
        ArgDefault::Integer(default),
    )
}

/// An input image; diffusers resizes it to `height` x `width`, dw takes it at that size
/// (see the pipeline).
const IMAGE: ArgSpec = ArgSpec::new("image", ArgType::Image, ArgDefault::Required);

const TEXT_TO_IMAGE: &[ArgSpec] = &[steps(28), guidance_scale(3.5)];

const IMAGE_TO_IMAGE: &[ArgSpec] = &[steps(28), IMAGE, strength(0.6), guidance_scale(7.0)];

/// Fill: the image, and a mask whose white pixels are repainted.
const FILL: &[ArgSpec] = &[
    steps(50),
    IMAGE,
    ArgSpec::new("mask_image", ArgType::Image, ArgDefault::Required),
    strength(1.0),
    guidance_scale(30.0),
];

pub static FAMILY: Family = Family {
    id: ID,
    title: "FLUX.1",
    classes: &[
        PipelineClass {
            name: "FluxPipeline",
            family: ID,
            task: Task::TextToImage,
            arguments: &[PROMPTS, TRUE_CFG, SHAPE, TEXT_TO_IMAGE],
        },
        PipelineClass {
            name: "FluxImg2ImgPipeline",
            family: ID,
            task: Task::ImageToImage,
            arguments: &[PROMPTS, TRUE_CFG, SHAPE, IMAGE_TO_IMAGE],
        },
        PipelineClass {
            name: "FluxFillPipeline",
            family: ID,
            task: Task::Fill,
            arguments: &[PROMPTS, SHAPE, FILL],
        },
    ],
    // diffusers' "flux" entry of its auto-pipeline mappings, and FLUX.1-Fill's folders.
    folder_classes: &[
        "FluxPipeline",
        "FluxImg2ImgPipeline",
        "FluxInpaintPipeline",
        "FluxFillPipeline",
    ],
    components: &[
        ComponentSpec::required("tokenizer", "transformers.CLIPTokenizer"),
        ComponentSpec::required("text_encoder", "transformers.CLIPTextModel"),
        ComponentSpec::required("tokenizer_2", "transformers.T5TokenizerFast"),
        ComponentSpec::required("text_encoder_2", "transformers.T5EncoderModel"),
        ComponentSpec::required("transformer", "FluxTransformer2DModel"),
        ComponentSpec::required("vae", "AutoencoderKL"),
    ],
    schedulers: super::FLOW_SCHEDULERS,
    loras: true,
};
