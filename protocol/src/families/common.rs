//! Arguments several families' pipelines take with the same name, type, default and range
//! in diffusers (`prompt`, `num_inference_steps`, `output_type`...), declared once.

use crate::workflow::{ArgDefault, ArgSpec, ArgType, OutputType};

/// An image side in pixels.
pub const SIDE: ArgType = ArgType::Integer { min: 8, max: 16384 };
/// A fraction of something, such as `strength`.
pub const FRACTION: ArgType = ArgType::Number { min: 0.0, max: 1.0 };
/// A scale or score with no upper bound.
pub const NON_NEGATIVE: ArgType = ArgType::Number {
    min: 0.0,
    max: f64::MAX,
};

pub const PROMPT: ArgSpec = ArgSpec::new("prompt", ArgType::Prompts, ArgDefault::Required);
pub const NEGATIVE_PROMPT: ArgSpec =
    ArgSpec::new("negative_prompt", ArgType::Text, ArgDefault::Unset);
pub const NUM_INFERENCE_STEPS: ArgSpec = ArgSpec::new(
    "num_inference_steps",
    ArgType::Integer { min: 1, max: 1000 },
    ArgDefault::Integer(50),
);
pub const NUM_IMAGES_PER_PROMPT: ArgSpec = ArgSpec::new(
    "num_images_per_prompt",
    ArgType::Integer { min: 1, max: 64 },
    ArgDefault::Integer(1),
);
pub const OUTPUT_TYPE: ArgSpec = ArgSpec::new(
    "output_type",
    ArgType::OutputType,
    ArgDefault::Output(OutputType::Image),
);

/// Text to image's size and initial noise.
pub const HEIGHT: ArgSpec = ArgSpec::new("height", SIDE, ArgDefault::Unset);
pub const WIDTH: ArgSpec = ArgSpec::new("width", SIDE, ArgDefault::Unset);
pub const LATENTS: ArgSpec = ArgSpec::new("latents", ArgType::Latents, ArgDefault::Unset);

/// `guidance_scale` with a family's default.
pub const fn guidance_scale(default: f64) -> ArgSpec {
    ArgSpec::new("guidance_scale", NON_NEGATIVE, ArgDefault::Number(default))
}

/// `strength` with a family's default.
pub const fn strength(default: f64) -> ArgSpec {
    ArgSpec::new("strength", FRACTION, ArgDefault::Number(default))
}
