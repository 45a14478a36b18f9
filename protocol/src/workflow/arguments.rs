//! Pipeline call arguments, typed and checked against a pipeline class's schema.
//!
//! Each family declares its arguments once ([`crate::families`]): name, type, default and
//! range, following the diffusers `__call__` it mirrors. [`Arguments::check`] reads a step's
//! `arguments` against that schema, the same way in `dwctl validate` and in the daemon; an
//! argument the class does not take is refused by name with the list of accepted ones,
//! never silently ignored.

use std::collections::BTreeMap;

use serde_json::{Map, Value};

use crate::families::PipelineClass;

/// What an argument takes.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgType {
    /// One prompt or a non-empty list of prompts (diffusers accepts both).
    Prompts,
    /// A string.
    Text,
    /// A whole number from `min` to `max`.
    Integer { min: u64, max: u64 },
    /// A finite number from `min` to `max` (`f64::MAX`: no upper bound).
    Number { min: f64, max: f64 },
    /// `output_type`, in diffusers-workflow's braces.
    OutputType,
    /// The path of a `.safetensors` file holding initial noise.
    Latents,
    /// An input image: a path, `{"location": ..., "size": ...}`, a URL or
    /// `"previous_result:step"`.
    Image,
    /// An input image as for `Image`, or an earlier step's latents through
    /// `"previous_result:step"` (SDXL's img2img takes a base step's latents as `image`).
    ImageOrLatents,
    /// Two whole numbers from `min` to `max`, written `[a, b]` (diffusers' `(height, width)`
    /// and `(top, left)` tuples).
    Pair { min: u64, max: u64 },
    /// A list of 1 to `max_len` finite numbers from `min` to `max` (FLUX's `sigmas`).
    Numbers { min: f64, max: f64, max_len: usize },
    /// A list of 1 to `max_len` whole numbers from `min` to `max` (SD 3's
    /// `skip_guidance_layers`).
    Integers { min: u64, max: u64, max_len: usize },
    /// diffusers' `cross_attention_kwargs` / `joint_attention_kwargs` as workflows use
    /// them: `{"scale": s}`, the factor on every active LoRA's weight, read as a number.
    AttentionScale,
}

impl ArgType {
    /// Whether it takes an input image (and so may fan out over an earlier step's images).
    pub fn is_image(&self) -> bool {
        matches!(self, ArgType::Image | ArgType::ImageOrLatents)
    }
}

/// What an argument is when a step does not give it.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ArgDefault {
    /// The step must give it.
    Required,
    /// Absent: the pipeline decides (diffusers' `None`).
    Unset,
    Integer(u64),
    Number(f64),
    Output(OutputType),
}

/// One argument of a pipeline class.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ArgSpec {
    pub name: &'static str,
    pub ty: ArgType,
    pub default: ArgDefault,
}

impl ArgSpec {
    pub const fn new(name: &'static str, ty: ArgType, default: ArgDefault) -> Self {
        ArgSpec { name, ty, default }
    }
}

/// A checked argument value.
#[derive(Debug, Clone, PartialEq)]
pub enum ArgValue {
    Prompts(Prompts),
    Text(String),
    Integer(usize),
    Number(f64),
    Output(OutputType),
    Latents(String),
    Image(ImageSource),
    Pair(usize, usize),
    Numbers(Vec<f64>),
    Integers(Vec<usize>),
}

/// A step's arguments, checked against its class, defaults filled in.
#[derive(Debug, Clone, PartialEq)]
pub struct Arguments {
    values: BTreeMap<&'static str, ArgValue>,
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

impl Arguments {
    /// Checks `arguments` (variables already substituted) against `class`. A
    /// `previous_result:` value other than an image is checked once it is known, when the
    /// step runs.
    pub fn check(
        arguments: &Map<String, Value>,
        class: &PipelineClass,
    ) -> Result<Self, ArgumentError> {
        if let Some(key) = arguments.keys().find(|k| class.argument(k).is_none()) {
            return Err(err(
                key,
                format!(
                    "unknown or unsupported argument `{key}` for {}; accepted: {}",
                    class.name,
                    class.argument_names().join(", ")
                ),
            ));
        }
        let mut values = BTreeMap::new();
        for spec in class.argument_specs() {
            let given = arguments.get(spec.name).filter(|v| !v.is_null());
            let deferred =
                given.is_some_and(|v| !spec.ty.is_image() && PreviousResult::parse(v).is_some());
            let value = match given {
                _ if deferred => continue,
                Some(value) => typed(spec, value)?,
                None => match default_value(spec, class)? {
                    Some(value) => value,
                    None => continue,
                },
            };
            values.insert(spec.name, value);
        }
        Ok(Arguments { values })
    }

    /// The prompts; empty while they wait for an earlier step's result.
    pub fn prompts(&self) -> &[String] {
        match self.values.get("prompt") {
            Some(ArgValue::Prompts(p)) => &p.0,
            _ => &[],
        }
    }

    pub fn text(&self, name: &str) -> Option<&str> {
        match self.values.get(name)? {
            ArgValue::Text(s) => Some(s),
            _ => None,
        }
    }

    pub fn integer(&self, name: &str) -> Option<usize> {
        match self.values.get(name)? {
            ArgValue::Integer(n) => Some(*n),
            _ => None,
        }
    }

    pub fn number(&self, name: &str) -> Option<f64> {
        match self.values.get(name)? {
            ArgValue::Number(n) => Some(*n),
            _ => None,
        }
    }

    /// `output_type`; images when the class has none.
    pub fn output_type(&self) -> OutputType {
        match self.values.get("output_type") {
            Some(ArgValue::Output(o)) => *o,
            _ => OutputType::Image,
        }
    }

    /// The latents file, as written.
    pub fn latents(&self) -> Option<&str> {
        self.values.values().find_map(|v| match v {
            ArgValue::Latents(path) => Some(path.as_str()),
            _ => None,
        })
    }

    /// The input images by argument name.
    pub fn images(&self) -> impl Iterator<Item = (&'static str, &ImageSource)> {
        self.values.iter().filter_map(|(name, v)| match v {
            ArgValue::Image(source) => Some((*name, source)),
            _ => None,
        })
    }

    /// A `[a, b]` pair, such as `original_size`.
    pub fn pair(&self, name: &str) -> Option<(usize, usize)> {
        match self.values.get(name)? {
            ArgValue::Pair(a, b) => Some((*a, *b)),
            _ => None,
        }
    }

    /// A list of numbers, such as `sigmas`.
    pub fn numbers(&self, name: &str) -> Option<&[f64]> {
        match self.values.get(name)? {
            ArgValue::Numbers(values) => Some(values),
            _ => None,
        }
    }

    /// A list of whole numbers, such as `skip_guidance_layers`.
    pub fn integers(&self, name: &str) -> Option<&[usize]> {
        match self.values.get(name)? {
            ArgValue::Integers(values) => Some(values),
            _ => None,
        }
    }

    pub fn image(&self, name: &str) -> Option<&ImageSource> {
        match self.values.get(name)? {
            ArgValue::Image(source) => Some(source),
            _ => None,
        }
    }
}

/// A given value, typed as `spec` asks.
fn typed(spec: &ArgSpec, value: &Value) -> Result<ArgValue, ArgumentError> {
    let name = spec.name;
    Ok(match spec.ty {
        ArgType::Prompts => ArgValue::Prompts(prompts(name, value)?),
        ArgType::Text => match value {
            Value::String(s) => ArgValue::Text(s.clone()),
            other => {
                return Err(err(
                    name,
                    format!("`{name}` must be a string, found {other}"),
                ))
            }
        },
        ArgType::Integer { min, max } => ArgValue::Integer(integer(name, value, min, max)?),
        ArgType::Number { min, max } => ArgValue::Number(number(name, value, min, max)?),
        ArgType::OutputType => ArgValue::Output(output_type(value)?),
        ArgType::Latents => match value {
            Value::String(s) if !s.is_empty() => ArgValue::Latents(s.clone()),
            other => {
                return Err(err(
                    name,
                    format!("`{name}` must be the path of a .safetensors file, found {other}"),
                ))
            }
        },
        ArgType::Image | ArgType::ImageOrLatents => ArgValue::Image(image_source(name, value)?),
        ArgType::Pair { min, max } => {
            let (first, second) = pair(name, value, min, max)?;
            ArgValue::Pair(first, second)
        }
        ArgType::Numbers { min, max, max_len } => {
            ArgValue::Numbers(numbers(name, value, (min, max), max_len)?)
        }
        ArgType::Integers { min, max, max_len } => {
            ArgValue::Integers(integers(name, value, (min, max), max_len)?)
        }
        ArgType::AttentionScale => ArgValue::Number(attention_scale(name, value)?),
    })
}

/// `{"scale": s}`: the one key dw reads of diffusers' attention kwargs.
fn attention_scale(name: &str, value: &Value) -> Result<f64, ArgumentError> {
    let Value::Object(map) = value else {
        return Err(err(
            name,
            format!("`{name}` must be an object such as {{\"scale\": 0.6}}, found {value}"),
        ));
    };
    if let Some(other) = map.keys().find(|k| k.as_str() != "scale") {
        return Err(err(name, format!("`{name}` key `{other}` is not read: dw reads only `scale`, the factor on the LoRAs' weights")));
    }
    match map.get("scale") {
        Some(scale) => number(name, scale, f64::MIN, f64::MAX),
        None => Ok(1.0),
    }
}

/// An absent argument's default, or the error for a required one.
fn default_value(spec: &ArgSpec, class: &PipelineClass) -> Result<Option<ArgValue>, ArgumentError> {
    Ok(match spec.default {
        ArgDefault::Required if spec.ty.is_image() => {
            return Err(err("", format!("{} needs an `{}`: a file path, {{\"location\": path}}, or \"previous_result:step\"", class.name, spec.name)))
        }
        ArgDefault::Required => return Err(err("", format!("missing `{}` in `arguments`", spec.name))),
        ArgDefault::Unset => None,
        ArgDefault::Integer(n) => Some(ArgValue::Integer(n as usize)),
        ArgDefault::Number(n) => Some(ArgValue::Number(n)),
        ArgDefault::Output(o) => Some(ArgValue::Output(o)),
    })
}

fn prompts(name: &str, value: &Value) -> Result<Prompts, ArgumentError> {
    match value {
        Value::String(s) => Ok(Prompts(vec![s.clone()])),
        Value::Array(items) if !items.is_empty() => items
            .iter()
            .map(|v| {
                v.as_str().map(str::to_string).ok_or_else(|| {
                    err(
                        name,
                        format!("`{name}` list items must be strings, found {v}"),
                    )
                })
            })
            .collect::<Result<_, _>>()
            .map(Prompts),
        other => Err(err(
            name,
            format!("`{name}` must be a string or a non-empty list of strings, found {other}"),
        )),
    }
}

fn output_type(value: &Value) -> Result<OutputType, ArgumentError> {
    match value {
        Value::String(s) if s == "{pil}" || s == "{np}" => Ok(OutputType::Image),
        Value::String(s) if s == "{latent}" => Ok(OutputType::Latent),
        Value::String(s) if ["pil", "np", "latent"].contains(&s.as_str()) => Err(err("output_type", format!(
            "`output_type` \"{s}\" would be read as a Python type name by diffusers-workflow (every `*_type` value is); write \"{{{s}}}\""
        ))),
        other => Err(err("output_type", format!("unsupported `output_type` {other}; accepted: \"{{pil}}\", \"{{np}}\" (both write images), \"{{latent}}\" (writes .safetensors)"))),
    }
}

fn image_source(name: &str, value: &Value) -> Result<ImageSource, ArgumentError> {
    if let Some(reference) = PreviousResult::parse(value) {
        return Ok(ImageSource::PreviousResult { reference });
    }
    let (location, size) = match value {
        Value::String(s) => (s.clone(), None),
        Value::Object(map) => {
            for key in map.keys() {
                if key != "location" && key != "size" {
                    return Err(err(name, format!("unknown key `{key}` in `{name}`; accepted: location, size")));
                }
            }
            let location = map
                .get("location")
                .and_then(Value::as_str)
                .ok_or_else(|| err(name, format!("`{name}` needs a `location` string (a file path)")))?
                .to_string();
            let size = match map.get("size") {
                None | Some(Value::Null) => None,
                Some(Value::Object(size)) => {
                    let side = |side: &str| size.get(side).and_then(Value::as_u64).filter(|n| (8..=16384).contains(n)).map(|n| n as u32);
                    match (side("width"), side("height")) {
                        (Some(w), Some(h)) => Some((w, h)),
                        _ => return Err(err(name, format!("`{name}.size` needs whole-number `width` and `height` from 8 to 16384, found {}", Value::Object(size.clone())))),
                    }
                }
                Some(other) => return Err(err(name, format!("`{name}.size` must be {{\"width\": W, \"height\": H}}, found {other}"))),
            };
            (location, size)
        }
        other => return Err(err(name, format!("`{name}` must be a file path, {{\"location\": path}} or \"previous_result:step\", found {other}"))),
    };
    if let Some(rest) = location
        .strip_prefix("http://")
        .or_else(|| location.strip_prefix("https://"))
    {
        if rest.split('/').next().is_none_or(str::is_empty) {
            return Err(err(name, format!("`{name}` {location:?} names no host")));
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

fn integer(key: &str, v: &Value, min: u64, max: u64) -> Result<usize, ArgumentError> {
    v.as_u64()
        .filter(|n| (min..=max).contains(n))
        .map(|n| n as usize)
        .ok_or_else(|| {
            err(
                key,
                format!("`{key}` must be a whole number from {min} to {max}, found {v}"),
            )
        })
}

fn pair(key: &str, v: &Value, min: u64, max: u64) -> Result<(usize, usize), ArgumentError> {
    let in_range = |item: &Value| item.as_u64().filter(|n| (min..=max).contains(n));
    let both = match v.as_array().map(Vec::as_slice) {
        Some([a, b]) => in_range(a).zip(in_range(b)),
        _ => None,
    };
    both.map(|(a, b)| (a as usize, b as usize)).ok_or_else(|| {
        err(
            key,
            format!("`{key}` must be two whole numbers from {min} to {max}, as [a, b], found {v}"),
        )
    })
}

fn numbers(
    key: &str,
    v: &Value,
    (min, max): (f64, f64),
    max_len: usize,
) -> Result<Vec<f64>, ArgumentError> {
    let in_range = |item: &Value| {
        item.as_f64()
            .filter(|n| n.is_finite() && (min..=max).contains(n))
    };
    let values: Option<Vec<f64>> = match v.as_array() {
        Some(items) if (1..=max_len).contains(&items.len()) => items.iter().map(in_range).collect(),
        _ => None,
    };
    values.ok_or_else(|| {
        err(
            key,
            format!(
                "`{key}` must be a list of 1 to {max_len} numbers from {min} to {max}, found {v}"
            ),
        )
    })
}

fn integers(
    key: &str,
    v: &Value,
    (min, max): (u64, u64),
    max_len: usize,
) -> Result<Vec<usize>, ArgumentError> {
    let in_range = |item: &Value| {
        item.as_u64()
            .filter(|n| (min..=max).contains(n))
            .map(|n| n as usize)
    };
    let values: Option<Vec<usize>> = match v.as_array() {
        Some(items) if (1..=max_len).contains(&items.len()) => items.iter().map(in_range).collect(),
        _ => None,
    };
    values.ok_or_else(|| {
        err(
            key,
            format!("`{key}` must be a list of 1 to {max_len} whole numbers from {min} to {max}, found {v}"),
        )
    })
}

fn number(key: &str, v: &Value, min: f64, max: f64) -> Result<f64, ArgumentError> {
    v.as_f64()
        .filter(|n| n.is_finite() && (min..=max).contains(n))
        .ok_or_else(|| {
            let range = if max == f64::MAX {
                format!(">= {min}")
            } else {
                format!("from {min} to {max}")
            };
            err(key, format!("`{key}` must be a number {range}, found {v}"))
        })
}
