//! The arguments Stable Diffusion steps accept, typed and checked.
//!
//! Names and defaults follow diffusers' `StableDiffusionPipeline.__call__` and
//! `StableDiffusionImg2ImgPipeline.__call__`. An argument we do not support is refused by
//! name with the list of accepted ones, never silently ignored.

use serde_json::{Map, Value};

/// Arguments both pipelines accept.
const COMMON_ARGUMENTS: &[&str] = &[
    "prompt",
    "negative_prompt",
    "num_inference_steps",
    "guidance_scale",
    "num_images_per_prompt",
    "output_type",
];
/// Only text-to-image.
const TXT2IMG_ARGUMENTS: &[&str] = &["height", "width", "latents"];
/// Only image-to-image.
const IMG2IMG_ARGUMENTS: &[&str] = &["image", "strength"];

/// Which pipeline a step runs, as named by `configuration.component_type`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipelineKind {
    TextToImage,
    ImageToImage,
}

impl PipelineKind {
    /// The pipeline types that run, by their diffusers class names.
    pub const SUPPORTED: &'static [&'static str] =
        &["StableDiffusionPipeline", "StableDiffusionImg2ImgPipeline"];

    pub fn from_type(component_type: &str) -> Option<Self> {
        match component_type {
            "StableDiffusionPipeline" => Some(PipelineKind::TextToImage),
            "StableDiffusionImg2ImgPipeline" => Some(PipelineKind::ImageToImage),
            _ => None,
        }
    }

    /// Argument names this pipeline accepts.
    pub fn accepted_arguments(self) -> Vec<&'static str> {
        let specific = match self {
            PipelineKind::TextToImage => TXT2IMG_ARGUMENTS,
            PipelineKind::ImageToImage => IMG2IMG_ARGUMENTS,
        };
        COMMON_ARGUMENTS.iter().chain(specific).copied().collect()
    }

    pub fn name(self) -> &'static str {
        match self {
            PipelineKind::TextToImage => "StableDiffusionPipeline",
            PipelineKind::ImageToImage => "StableDiffusionImg2ImgPipeline",
        }
    }
}

/// Classes diffusers resolves from a model folder's `model_index.json`, and the kind of
/// pipeline each asks for (`None`: the folder's own class decides).
const AUTO_CLASSES: &[(&str, Option<PipelineKind>)] = &[
    ("DiffusionPipeline", None),
    ("AutoPipelineForText2Image", Some(PipelineKind::TextToImage)),
    (
        "AutoPipelineForImage2Image",
        Some(PipelineKind::ImageToImage),
    ),
];

/// The `_class_name`s of Stable Diffusion 1.x/2.x folders (diffusers' "stable-diffusion"
/// entry of its auto-pipeline mappings).
const SD_FOLDER_CLASSES: &[&str] = &[
    "StableDiffusionPipeline",
    "StableDiffusionImg2ImgPipeline",
    "StableDiffusionInpaintPipeline",
];

/// Whether `component_type` is one diffusers resolves from `model_index.json`.
pub fn is_auto_class(component_type: &str) -> bool {
    let class = component_type
        .strip_prefix("diffusers.")
        .unwrap_or(component_type);
    AUTO_CLASSES.iter().any(|(name, _)| *name == class)
}

/// The pipeline a `component_type` names (bare, or as `diffusers.Name`), or why it
/// cannot run. An auto class (`DiffusionPipeline`, `AutoPipelineFor*`) gives the kind it
/// asks for; [`resolve_auto_class`] checks the model folder when it is loaded.
pub fn pipeline_kind(component_type: &str) -> Result<PipelineKind, String> {
    let class = component_type
        .strip_prefix("diffusers.")
        .unwrap_or(component_type);
    if let Some(kind) = PipelineKind::from_type(class) {
        return Ok(kind);
    }
    if let Some((_, kind)) = AUTO_CLASSES.iter().find(|(name, _)| *name == class) {
        return Ok(kind.unwrap_or(PipelineKind::TextToImage));
    }
    let supported = PipelineKind::SUPPORTED.join(", ");
    if class.contains('.') {
        return Err(format!("pipeline class `{component_type}` is not supported: dw runs diffusers' own pipelines, not Python code from other modules; supported: {supported}"));
    }
    Err(format!(
        "pipeline class `{class}` is not supported yet; supported: {supported}"
    ))
}

/// Checks that an auto class resolves, from `model_dir/model_index.json`, to `kind` (the
/// pipeline the step's arguments were read for).
pub fn check_auto_class(
    component_type: &str,
    kind: PipelineKind,
    model_dir: &std::path::Path,
) -> Result<(), String> {
    let index = model_dir.join("model_index.json");
    let text =
        crate::input::read_text_bounded(&index, crate::input::CONFIG_BYTES).map_err(|e| {
            format!(
                "`{component_type}` is resolved from {}, which cannot be read: {e}",
                index.display()
            )
        })?;
    let class = serde_json::from_str::<Value>(&text)
        .ok()
        .and_then(|v| v.get("_class_name")?.as_str().map(str::to_string))
        .ok_or_else(|| {
            format!(
                "{} has no `_class_name` to resolve `{component_type}` from",
                index.display()
            )
        })?;
    match resolve_auto_class(component_type, &class)? {
        resolved if resolved == kind => Ok(()),
        _ => Err(format!(
            "`{component_type}` resolves to another kind of pipeline than the step's arguments"
        )),
    }
}

/// What an auto class resolves to for a folder whose `model_index.json` names
/// `folder_class`, as diffusers resolves it; an error names the class it would need.
pub fn resolve_auto_class(
    component_type: &str,
    folder_class: &str,
) -> Result<PipelineKind, String> {
    let class = component_type
        .strip_prefix("diffusers.")
        .unwrap_or(component_type);
    let asked = AUTO_CLASSES
        .iter()
        .find(|(name, _)| *name == class)
        .map(|(_, kind)| *kind);
    match asked {
        Some(Some(kind)) if SD_FOLDER_CLASSES.contains(&folder_class) => Ok(kind),
        Some(None) if folder_class == "StableDiffusionPipeline" => Ok(PipelineKind::TextToImage),
        Some(None) if folder_class == "StableDiffusionImg2ImgPipeline" => Err(format!(
            "`{class}` resolves to `StableDiffusionImg2ImgPipeline` here, but its arguments were read as text to image; name `StableDiffusionImg2ImgPipeline` in `component_type`"
        )),
        Some(_) => Err(format!(
            "`{class}` resolves to `{folder_class}` from the model's model_index.json, which is not supported yet; supported: {}",
            PipelineKind::SUPPORTED.join(", ")
        )),
        None => Err(format!("`{class}` is not an auto pipeline class")),
    }
}

/// The class each component of a Stable Diffusion pipeline must be.
const SD_COMPONENTS: &[(&str, &str)] = &[
    ("vae", "AutoencoderKL"),
    ("unet", "UNet2DConditionModel"),
    ("text_encoder", "transformers.CLIPTextModel"),
    ("tokenizer", "transformers.CLIPTokenizer"),
];

/// Checks a component block (`"vae": {"configuration": {"component_type": ...}}`) against
/// the components a Stable Diffusion pipeline has.
pub fn check_component(slot: &str, component_type: &str) -> Result<(), String> {
    let Some((_, class)) = SD_COMPONENTS.iter().find(|(s, _)| *s == slot) else {
        let slots: Vec<&str> = SD_COMPONENTS.iter().map(|(s, _)| *s).collect();
        return Err(format!(
            "`{slot}` is not supported here: a Stable Diffusion pipeline has no `{slot}`; its components are {}",
            slots.join(", ")
        ));
    };
    let bare = |name: &str| name.strip_prefix("diffusers.").unwrap_or(name).to_string();
    if bare(component_type) == bare(class) {
        Ok(())
    } else {
        Err(format!(
            "component class `{component_type}` is not supported for `{slot}`; a Stable Diffusion `{slot}` is `{class}`"
        ))
    }
}

/// One prompt or several; diffusers accepts both.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Prompts(pub Vec<String>);

/// What the pipeline returns: decoded images, or the final latents (`"latent"`), which are
/// written as a `.safetensors` file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputType {
    Image,
    Latent,
}

/// Where an input image comes from.
#[derive(Debug, Clone, PartialEq)]
pub enum ImageSource {
    /// A file, as written (relative paths resolve against the workflow file), optionally
    /// resized to `size` (diffusers-workflow's `{"location": ..., "size": {...}}`).
    File {
        location: String,
        size: Option<(u32, u32)>,
    },
    /// An `http(s)` URL, fetched once into a cache.
    Url {
        url: String,
        size: Option<(u32, u32)>,
    },
    /// An earlier step's images: one run per image (fan-out).
    PreviousResult { reference: PreviousResult },
}

/// Typed Stable Diffusion arguments (text-to-image and image-to-image).
#[derive(Debug, Clone, PartialEq)]
pub struct StableDiffusionArguments {
    pub prompt: Prompts,
    pub negative_prompt: Option<String>,
    pub num_inference_steps: usize,
    pub guidance_scale: f64,
    pub height: Option<usize>,
    pub width: Option<usize>,
    pub num_images_per_prompt: usize,
    pub output_type: OutputType,
    /// A `.safetensors` file with the initial noise (one tensor, or one named `latents`).
    pub latents: Option<String>,
    /// The image to start from (image-to-image only).
    pub image: Option<ImageSource>,
    /// How much of the image to replace, 0..=1 (image-to-image; diffusers' default 0.8).
    pub strength: f64,
}

/// A bad argument: which key, and what is wrong with it.
#[derive(Debug, Clone)]
pub struct ArgumentError {
    pub key: String,
    pub message: String,
}

/// A `"previous_result:REF"` reference, as written; which step and property it names
/// depends on the steps before it (step names may contain dots).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PreviousResult {
    pub reference: String,
}

impl PreviousResult {
    /// Recognises a whole `"previous_result:..."` string.
    pub fn parse(value: &Value) -> Option<PreviousResult> {
        let reference = value.as_str()?.strip_prefix("previous_result:")?;
        Some(PreviousResult {
            reference: reference.to_string(),
        })
    }

    /// The step and property this names among `earlier` step names, as diffusers-workflow
    /// resolves it (`dw/previous_results.py`): a whole step name, else the longest step
    /// name followed by `.` and a property.
    pub fn resolve<'a>(
        &self,
        earlier: impl Iterator<Item = &'a str> + Clone,
    ) -> Result<(String, Option<String>), String> {
        let reference = self.reference.as_str();
        if earlier.clone().any(|name| name == reference) {
            return Ok((reference.to_string(), None));
        }
        let step = earlier
            .clone()
            .filter(|name| {
                reference
                    .strip_prefix(name)
                    .is_some_and(|rest| rest.starts_with('.') && rest.len() > 1)
            })
            .max_by_key(|name| name.len());
        match step {
            Some(step) => Ok((
                step.to_string(),
                Some(reference[step.len() + 1..].to_string()),
            )),
            None => {
                let names: Vec<&str> = earlier.collect();
                let names = if names.is_empty() {
                    "none".to_string()
                } else {
                    names.join(", ")
                };
                Err(format!("`previous_result:{reference}` refers to no earlier step; steps before this one: {names}"))
            }
        }
    }
}

impl StableDiffusionArguments {
    /// Checks `arguments` (variables already substituted) for `kind`. A
    /// `previous_result:` value other than an `image` is checked once it is known, when the
    /// step runs.
    pub fn from_json(
        arguments: &Map<String, Value>,
        kind: PipelineKind,
    ) -> Result<Self, ArgumentError> {
        let accepted = kind.accepted_arguments();
        if let Some(key) = arguments.keys().find(|k| !accepted.contains(&k.as_str())) {
            return Err(err(
                key,
                format!(
                    "unknown or unsupported argument `{key}` for {}; accepted: {}",
                    kind.name(),
                    accepted.join(", ")
                ),
            ));
        }
        let deferred: Map<String, Value> = arguments
            .iter()
            .filter(|(k, v)| *k == "image" || PreviousResult::parse(v).is_none())
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let prompt_deferred = deferred.len() != arguments.len()
            && !deferred.contains_key("prompt")
            && arguments.contains_key("prompt");
        Self::typed(&deferred, kind, prompt_deferred)
    }

    fn typed(
        arguments: &Map<String, Value>,
        kind: PipelineKind,
        prompt_deferred: bool,
    ) -> Result<Self, ArgumentError> {
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
            None if prompt_deferred => Prompts(Vec::new()),
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
        let guidance_scale = number(arguments, "guidance_scale", 0.0, f64::MAX)?.unwrap_or(7.5);
        let height = integer(arguments, "height", 8, 16384)?;
        let width = integer(arguments, "width", 8, 16384)?;
        let num_images_per_prompt =
            integer(arguments, "num_images_per_prompt", 1, 64)?.unwrap_or(1);
        let output_type = match arguments.get("output_type") {
            None | Some(Value::Null) => OutputType::Image,
            Some(Value::String(s)) if s == "{pil}" || s == "{np}" => OutputType::Image,
            Some(Value::String(s)) if s == "{latent}" => OutputType::Latent,
            Some(Value::String(s)) if ["pil", "np", "latent"].contains(&s.as_str()) => return Err(err("output_type", format!(
                "`output_type` \"{s}\" would be read as a Python type name by diffusers-workflow (every `*_type` value is); write \"{{{s}}}\""
            ))),
            Some(other) => return Err(err("output_type", format!("unsupported `output_type` {other}; accepted: \"{{pil}}\", \"{{np}}\" (both write images), \"{{latent}}\" (writes .safetensors)"))),
        };
        let latents = match arguments.get("latents") {
            None | Some(Value::Null) => None,
            Some(Value::String(s)) if !s.is_empty() => Some(s.clone()),
            Some(other) => {
                return Err(err(
                    "latents",
                    format!("`latents` must be the path of a .safetensors file, found {other}"),
                ))
            }
        };
        let image = match arguments.get("image") {
            None | Some(Value::Null) => None,
            Some(value) => Some(image_source(value)?),
        };
        if kind == PipelineKind::ImageToImage && image.is_none() {
            return Err(err("", "StableDiffusionImg2ImgPipeline needs an `image`: a file path, {\"location\": path}, or \"previous_result:step\""));
        }
        let strength = number(arguments, "strength", 0.0, 1.0)?.unwrap_or(0.8);
        Ok(StableDiffusionArguments {
            prompt,
            negative_prompt,
            num_inference_steps,
            guidance_scale,
            height,
            width,
            num_images_per_prompt,
            output_type,
            latents,
            image,
            strength,
        })
    }
}

fn image_source(value: &Value) -> Result<ImageSource, ArgumentError> {
    if let Some(reference) = PreviousResult::parse(value) {
        return Ok(ImageSource::PreviousResult { reference });
    }
    let (location, size) = match value {
        Value::String(s) => (s.clone(), None),
        Value::Object(map) => {
            for key in map.keys() {
                if key != "location" && key != "size" {
                    return Err(err("image", format!("unknown key `{key}` in `image`; accepted: location, size")));
                }
            }
            let location = map
                .get("location")
                .and_then(Value::as_str)
                .ok_or_else(|| err("image", "`image` needs a `location` string (a file path)"))?
                .to_string();
            let size = match map.get("size") {
                None | Some(Value::Null) => None,
                Some(Value::Object(size)) => {
                    let side = |name: &str| size.get(name).and_then(Value::as_u64).filter(|n| (8..=16384).contains(n)).map(|n| n as u32);
                    match (side("width"), side("height")) {
                        (Some(w), Some(h)) => Some((w, h)),
                        _ => return Err(err("image", format!("`image.size` needs whole-number `width` and `height` from 8 to 16384, found {}", Value::Object(size.clone())))),
                    }
                }
                Some(other) => return Err(err("image", format!("`image.size` must be {{\"width\": W, \"height\": H}}, found {other}"))),
            };
            (location, size)
        }
        other => return Err(err("image", format!("`image` must be a file path, {{\"location\": path}} or \"previous_result:step\", found {other}"))),
    };
    if let Some(rest) = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))
    {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(err("image", format!("`image` {location:?} names no host")));
        }
        return Ok(ImageSource::Url {
            url: location,
            size,
        });
    }
    Ok(ImageSource::File { location, size })
}

fn err(key: &str, message: impl Into<String>) -> ArgumentError {
    ArgumentError {
        key: key.to_string(),
        message: message.into(),
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

fn number(
    arguments: &Map<String, Value>,
    key: &str,
    min: f64,
    max: f64,
) -> Result<Option<f64>, ArgumentError> {
    match arguments.get(key) {
        None | Some(Value::Null) => Ok(None),
        Some(v) => v
            .as_f64()
            .filter(|n| n.is_finite() && (min..=max).contains(n))
            .map(Some)
            .ok_or_else(|| {
                let range = if max == f64::MAX {
                    format!(">= {min}")
                } else {
                    format!("from {min} to {max}")
                };
                err(key, format!("`{key}` must be a number {range}, found {v}"))
            }),
    }
}
