//! The arguments a `StableDiffusionPipeline` step accepts, typed and checked.
//!
//! Names and defaults follow diffusers' `StableDiffusionPipeline.__call__`. An argument we do
//! not support is refused by name with the list of accepted ones, never silently ignored.

use serde_json::{Map, Value};

/// Accepted argument names, in the order the README documents them.
pub const ACCEPTED_ARGUMENTS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "height",
    "width",
    "num_images_per_prompt",
    "output_type",
];

/// One prompt or several; diffusers accepts both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompts(pub Vec<String>);

/// Typed `StableDiffusionPipeline` arguments.
#[derive(Debug, Clone, PartialEq)]
pub struct StableDiffusionArguments {
    pub prompt: Prompts,
    pub negative_prompt: Option<String>,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_images_per_prompt: usize,
}

/// A bad argument: which key, and what is wrong with it.
#[derive(Debug, Clone)]
pub struct ArgumentError {
    pub key: String,
    pub message: String,
}

/// A value that refers to an earlier step's output.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ArgumentValue {
    PreviousResult {
        step: String,
        property: Option<String>,
    },
}

impl ArgumentValue {
    /// Recognises `"previous_result:step"` and `"previous_result:step.prop"`.
    pub fn parse_reference(value: &Value) -> Option<ArgumentValue> {
        let reference = value.as_str()?.strip_prefix("previous_result:")?;
        let (step, property) = match reference.split_once('.') {
            Some((step, prop)) => (step.to_string(), Some(prop.to_string())),
            None => (reference.to_string(), None),
        };
        Some(ArgumentValue::PreviousResult { step, property })
    }
}

impl StableDiffusionArguments {
    /// Checks `arguments` (variables already substituted). `earlier_steps` are the names of
    /// the steps before this one, which `previous_result:` may refer to.
    pub fn from_json(
        arguments: &Map<String, Value>,
        earlier_steps: &[&str],
    ) -> Result<Self, ArgumentError> {
        for (key, value) in arguments {
            if !ACCEPTED_ARGUMENTS.contains(&key.as_str()) {
                return Err(err(key, format!(
                    "unknown or unsupported argument `{key}` for StableDiffusionPipeline; accepted: {}",
                    ACCEPTED_ARGUMENTS.join(", ")
                )));
            }
            if let Some(ArgumentValue::PreviousResult { step, .. }) =
                ArgumentValue::parse_reference(value)
            {
                if !earlier_steps.contains(&step.as_str()) {
                    let earlier = if earlier_steps.is_empty() {
                        "none".to_string()
                    } else {
                        earlier_steps.join(", ")
                    };
                    return Err(err(key, format!(
                        "`previous_result:{step}` refers to no earlier step; steps before this one: {earlier}"
                    )));
                }
                return Err(err(key, format!(
                    "`{key}` cannot take `previous_result:{step}`: step results are images, and `{key}` takes {}",
                    expected_type(key)
                )));
            }
        }
        let prompt = match arguments.get("prompt") {
            Some(Value::String(s)) => Prompts(vec![s.clone()]),
            Some(Value::Array(items)) if !items.is_empty() => Prompts(
                items
                    .iter()
                    .map(|v| {
                        v.as_str().map(str::to_string).ok_or_else(|| {
                            err(
                                "prompt",
                                format!("`prompt` list items must be strings, found {v}"),
                            )
                        })
                    })
                    .collect::<Result<_, _>>()?,
            ),
            Some(other) => {
                return Err(err(
                    "prompt",
                    format!(
                        "`prompt` must be a string or a non-empty list of strings, found {other}"
                    ),
                ))
            }
            None => return Err(err("", "missing `prompt` in `arguments`")),
        };
        let negative_prompt = match arguments.get("negative_prompt") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) => Some(s.clone()),
            Some(other) => {
                return Err(err(
                    "negative_prompt",
                    format!("`negative_prompt` must be a string, found {other}"),
                ))
            }
        };
        let num_inference_steps = integer(arguments, "num_inference_steps", 1, 1000)?.unwrap_or(50);
        let guidance_scale = match arguments.get("guidance_scale") {
            None => 7.5,
            Some(v) => v
                .as_f64()
                .filter(|g| g.is_finite() && *g >= 0.0)
                .ok_or_else(|| {
                    err(
                        "guidance_scale",
                        format!("`guidance_scale` must be a number >= 0, found {v}"),
                    )
                })?,
        };
        let height = integer(arguments, "height", 8, 16384)?;
        let width = integer(arguments, "width", 8, 16384)?;
        let num_images_per_prompt =
            integer(arguments, "num_images_per_prompt", 1, 64)?.unwrap_or(1);
        match arguments.get("output_type") {
            None | Some(Value::Null) => {}
            Some(Value::String(s)) if s == "pil" => {}
            Some(other) => {
                return Err(err(
                    "output_type",
                    format!("unsupported `output_type` {other}; accepted: \"pil\""),
                ))
            }
        }
        Ok(StableDiffusionArguments {
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            num_images_per_prompt,
        })
    }
}

fn err(key: &str, message: impl Into<String>) -> ArgumentError {
    ArgumentError {
        key: key.to_string(),
        message: message.into(),
    }
}

fn expected_type(key: &str) -> &'static str {
    match key {
        "prompt" => "text or a list of texts",
        "negative_prompt" | "output_type" => "text",
        "guidance_scale" => "a number",
        _ => "a whole number",
    }
}

fn integer(
    arguments: &Map<String, Value>,
    key: &str,
    min: u64,
    max: u64,
) -> Result<Option<usize>, ArgumentError> {
    match arguments.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_u64()
            .filter(|n| (min..=max).contains(n))
            .map(|n| Some(n as usize))
            .ok_or_else(|| {
                err(
                    key,
                    format!("`{key}` must be a whole number from {min} to {max}, found {v}"),
                )
            }),
    }
}
