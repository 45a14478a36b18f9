//! The task commands dw runs, each as diffusers-workflow defines it (`dw/tasks/`). None
//! needs a model. A task takes one run's arguments and returns its value; a list adds one
//! result item per element, anything else one item.

use std::path::Path;
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::fanout::{Artifact, Run};
use crate::fetch::{is_url, Fetcher};
use crate::inputs::{load_image_file, InputError};
use crate::pipelines::RgbImage;

/// What a task returned: its result items.
pub type TaskOutput = Vec<Artifact>;

/// Runs `command` on one run's arguments (`input` holds an `inputs` item).
pub fn run(
    command: &str,
    run: &Run,
    base_dir: &Path,
    fetcher: &Fetcher,
) -> Result<TaskOutput, InputError> {
    let args = &run.arguments;
    match command {
        "gather_inputs" => Ok(gather_inputs(args)),
        "get_dict_value" => get_dict_value(args),
        "format_chat_message" => format_chat_message(args),
        "extract_sections" => extract_sections(args),
        "get_image_size" => {
            let image = image_argument(run, base_dir, fetcher)?;
            Ok(vec![Artifact::Json(
                json!({"width": image.width, "height": image.height}),
            )])
        }
        "crop_square" => {
            let image = image_argument(run, base_dir, fetcher)?;
            Ok(vec![Artifact::Image(Arc::new(crop_square(&image)))])
        }
        other => Err(InputError::new(format!("task `{other}` is not supported"))),
    }
}

/// `gather_inputs` returns what it was given: each `inputs` item, or the `arguments`.
fn gather_inputs(args: &Map<String, Value>) -> TaskOutput {
    let value = match args.get("input") {
        Some(input) if args.len() == 1 => input.clone(),
        _ => Value::Object(args.clone()),
    };
    items(value)
}

/// A list becomes one item per element (dw's `add_result`); strings lose surrounding
/// quotes and space, as dw stores them.
fn items(value: Value) -> TaskOutput {
    match value {
        Value::Array(list) => list.into_iter().map(|v| Artifact::Json(clean(v))).collect(),
        other => vec![Artifact::Json(clean(other))],
    }
}

fn clean(value: Value) -> Value {
    match value {
        Value::String(s) => Value::String(s.trim().trim_matches('"').trim().to_string()),
        other => other,
    }
}

fn text<'a>(args: &'a Map<String, Value>, key: &str, task: &str) -> Result<&'a str, InputError> {
    args.get(key).and_then(Value::as_str).ok_or_else(|| {
        InputError::new(format!(
            "task `{task}` needs `{key}` as text, found {}",
            args.get(key)
                .map(Value::to_string)
                .unwrap_or_else(|| "nothing".into())
        ))
    })
}

/// `get_dict_value(dict, key)`: the member, or null when it is missing.
fn get_dict_value(args: &Map<String, Value>) -> Result<TaskOutput, InputError> {
    let key = text(args, "key", "get_dict_value")?;
    let dict = args
        .get("dict")
        .and_then(Value::as_object)
        .ok_or_else(|| InputError::new("task `get_dict_value` needs `dict` as an object"))?;
    Ok(vec![Artifact::Json(clean(
        dict.get(key).cloned().unwrap_or(Value::Null),
    ))])
}

/// `format_chat_message(system_prompt, user_message)`: a chat for a text model.
fn format_chat_message(args: &Map<String, Value>) -> Result<TaskOutput, InputError> {
    let system = text(args, "system_prompt", "format_chat_message")?;
    let user = text(args, "user_message", "format_chat_message")?;
    Ok(vec![Artifact::Json(json!({"text_inputs": [
        {"role": "system", "content": system},
        {"role": "user", "content": user},
    ]}))])
}

/// `extract_sections(text, sections, keep_preamble=true)`: the labelled sections, in the
/// order `sections` names them, as `"Label: body"` joined by blank lines.
fn extract_sections(args: &Map<String, Value>) -> Result<TaskOutput, InputError> {
    let source = text(args, "text", "extract_sections")?;
    let sections: Vec<&str> = match args.get("sections") {
        None | Some(Value::Null) => Vec::new(),
        Some(Value::Array(items)) => items.iter().filter_map(Value::as_str).collect(),
        Some(other) => {
            return Err(InputError::new(format!(
                "task `extract_sections` needs `sections` as a list of labels, found {other}"
            )))
        }
    };
    let keep_preamble = args
        .get("keep_preamble")
        .and_then(Value::as_bool)
        .unwrap_or(true);
    Ok(vec![Artifact::Json(Value::String(sections_of(
        source,
        &sections,
        keep_preamble,
    )))])
}

/// Where each label starts: (line start, body start, label index), in text order.
fn label_starts(source: &str, sections: &[&str]) -> Vec<(usize, usize, usize)> {
    let mut starts = Vec::new();
    let mut offset = 0;
    for line in source.split_inclusive('\n') {
        let lower = line.to_lowercase();
        if let Some(index) = sections
            .iter()
            .position(|label| lower.starts_with(&format!("{}:", label.to_lowercase())))
        {
            starts.push((offset, offset + sections[index].len() + 1, index));
        }
        offset += line.len();
    }
    starts
}

fn sections_of(source: &str, sections: &[&str], keep_preamble: bool) -> String {
    let starts = label_starts(source, sections);
    if sections.is_empty() || starts.is_empty() {
        return source.trim().to_string();
    }
    let mut bodies: Vec<Option<String>> = vec![None; sections.len()];
    for (n, &(_, body_start, index)) in starts.iter().enumerate() {
        let end = starts.get(n + 1).map(|s| s.0).unwrap_or(source.len());
        if bodies[index].is_none() {
            bodies[index] = Some(first_paragraph(&source[body_start..end]));
        }
    }
    let mut parts = Vec::new();
    let preamble = source[..starts[0].0].trim();
    if keep_preamble && !preamble.is_empty() {
        parts.push(preamble.to_string());
    }
    for (label, body) in sections.iter().zip(bodies) {
        if let Some(body) = body {
            parts.push(format!("{label}: {body}"));
        }
    }
    parts.join("\n\n")
}

/// The body up to the first blank line, trimmed.
fn first_paragraph(body: &str) -> String {
    let body = body.trim_start();
    let mut end = body.len();
    let mut offset = 0;
    let mut previous_blank_end = None;
    for line in body.split_inclusive('\n') {
        if offset > 0 && line.trim().is_empty() && previous_blank_end.is_none() {
            previous_blank_end = Some(offset);
        }
        offset += line.len();
    }
    if let Some(at) = previous_blank_end {
        end = at;
    }
    body[..end].trim().to_string()
}

/// A task's `image`: an earlier step's image, a file, or a URL.
fn image_argument(
    run: &Run,
    base_dir: &Path,
    fetcher: &Fetcher,
) -> Result<Arc<RgbImage>, InputError> {
    if let Some(bound) = run.bound.get("image") {
        return match bound {
            Artifact::Image(image) => Ok(image.clone()),
            other => Err(InputError::new(format!(
                "`image` is {}, not an image",
                other.describe()
            ))),
        };
    }
    let location = match run.arguments.get("image") {
        Some(Value::String(location)) => location.as_str(),
        Some(Value::Object(map)) => map
            .get("location")
            .and_then(Value::as_str)
            .ok_or_else(|| InputError::new("`image` needs a `location`"))?,
        _ => return Err(InputError::new("this task needs an `image`")),
    };
    let path = if is_url(location) {
        fetcher.fetch(location)?.display().to_string()
    } else {
        location.to_string()
    };
    Ok(Arc::new(load_image_file(base_dir, &path, None)?))
}

/// `crop_square`: the centred square as large as the shorter side.
fn crop_square(image: &RgbImage) -> RgbImage {
    let side = image.width.min(image.height);
    let left = (image.width - side) / 2;
    let top = (image.height - side) / 2;
    let mut pixels = Vec::with_capacity(side * side * 3);
    for row in top..top + side {
        let start = (row * image.width + left) * 3;
        pixels.extend_from_slice(&image.pixels[start..start + side * 3]);
    }
    RgbImage {
        width: side,
        height: side,
        pixels,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn args(value: Value) -> Map<String, Value> {
        value.as_object().cloned().unwrap()
    }

    fn only(output: TaskOutput) -> Value {
        match output.as_slice() {
            [Artifact::Json(v)] => v.clone(),
            other => panic!("{other:?}"),
        }
    }

    // dw/tasks/text_sections.py: declared order, case-insensitive labels, cut at a blank line.
    #[test]
    fn extract_sections_keeps_declared_order_and_the_preamble() {
        let source = "Intro text.\nstyle: oil paint\n\nignored\nSubject: a fox\nmore fox\n";
        let out = only(
            extract_sections(&args(
                json!({"text": source, "sections": ["Subject", "Style"]}),
            ))
            .unwrap(),
        );
        assert_eq!(
            out,
            json!("Intro text.\n\nSubject: a fox\nmore fox\n\nStyle: oil paint")
        );
        let none =
            only(extract_sections(&args(json!({"text": " plain ", "sections": ["X"]}))).unwrap());
        assert_eq!(none, json!("plain"));
    }

    // dw/tasks/format_messages.py
    #[test]
    fn chat_messages_and_dict_values_are_shaped_as_dw_shapes_them() {
        let chat = only(
            format_chat_message(&args(json!({"system_prompt": "s", "user_message": "u"}))).unwrap(),
        );
        assert_eq!(
            chat,
            json!({"text_inputs": [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]})
        );
        let value =
            only(get_dict_value(&args(json!({"dict": {"a": " \"x\" "}, "key": "a"}))).unwrap());
        assert_eq!(value, json!("x"));
        let missing = only(get_dict_value(&args(json!({"dict": {}, "key": "a"}))).unwrap());
        assert_eq!(missing, Value::Null);
    }

    // dw/tasks/gather.py gather_inputs: lists become one item each.
    #[test]
    fn gather_inputs_returns_what_it_was_given() {
        let out = gather_inputs(&args(json!({"input": ["a", "b"]})));
        assert_eq!(out.len(), 2);
        let out = gather_inputs(&args(json!({"prompt": "p", "n": 2})));
        assert_eq!(only(out), json!({"prompt": "p", "n": 2}));
    }

    // dw/tasks/image_utils.py crop_square: (W-s)//2, (H-s)//2.
    #[test]
    fn crop_square_takes_the_centre() {
        let image = RgbImage {
            width: 5,
            height: 2,
            pixels: (0..30).collect(),
        };
        let out = crop_square(&image);
        assert_eq!((out.width, out.height), (2, 2));
        assert_eq!(out.pixels[..3], [3, 4, 5]);
        assert_eq!(out.pixels[6..9], [18, 19, 20]);
    }
}
