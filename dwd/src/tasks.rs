//! The task commands dw runs, each as diffusers-workflow defines it (`dw/tasks/`). None
//! needs a model. A task takes one run's arguments and returns its value; a list adds one
//! result item per element, anything else one item.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde_json::{json, Map, Value};

use crate::fanout::{Artifact, Run};
use crate::fetch::{is_url, Fetcher};
use crate::imaging::{canny, Filter, Pixels};
use crate::inputs::{load_image_file, InputError};
use crate::pipelines::RgbImage;

/// What a task returned: its result items.
pub type TaskOutput = Vec<Artifact>;

/// Runs `command` on one run's arguments (`input` holds an `inputs` item).
/// Where a task's relative paths go: images beside the workflow, globs from the working
/// directory (as in dw).
pub struct Places {
    pub workflow_dir: PathBuf,
    pub cwd: PathBuf,
}

pub fn run(
    command: &str,
    run: &Run,
    places: &Places,
    fetcher: &Fetcher,
) -> Result<TaskOutput, InputError> {
    let base_dir = places.workflow_dir.as_path();
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
        "canny_cv" => {
            let image = Pixels::from_rgb(image_argument(run, base_dir, fetcher)?.as_ref());
            let (low, high) = (
                number(args, "low_threshold", 100.0)?,
                number(args, "high_threshold", 200.0)?,
            );
            Ok(vec![Artifact::Image(Arc::new(
                canny(&image, low, high).into_rgb(),
            ))])
        }
        "qr_code" => Ok(vec![Artifact::Image(Arc::new(qr_code(args)?.into_rgb()))]),
        "gather_images" => gather_images(args, places, fetcher),
        "strip_exif" => {
            // Pixels only: dw's copy drops metadata, which decoded pixels never carry.
            let image = image_argument(run, base_dir, fetcher)?;
            Ok(vec![Artifact::Image(image)])
        }
        "resize_center_crop" | "resize_rescale" | "resize_resample" | "resize_bucket" => {
            let image = Pixels::from_rgb(image_argument(run, base_dir, fetcher)?.as_ref());
            let resized = resize_task(command, &image, args)?;
            Ok(vec![Artifact::Image(Arc::new(resized.into_rgb()))])
        }
        "add_border_and_mask" | "add_border_and_mask_with_size" => {
            let image = Pixels::from_rgb(image_argument(run, base_dir, fetcher)?.as_ref());
            let (bordered, mask) = match command {
                "add_border_and_mask" => add_border_and_mask(&image, &Zoom::from_args(args)?),
                _ => add_border_and_mask_with_size(&image, args)?,
            };
            let members = [
                (
                    "bordered_image".to_string(),
                    Artifact::Image(Arc::new(bordered.into_rgb())),
                ),
                (
                    "mask".to_string(),
                    Artifact::Image(Arc::new(mask.into_rgb())),
                ),
            ];
            Ok(vec![Artifact::Map(members.into_iter().collect())])
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

/// The most images one `gather_images` run gathers.
pub const MAX_GATHERED_IMAGES: usize = 256;

/// `gather_images(glob, urls)`: the files a glob pattern matches (relative to the working
/// directory, as in dw; sorted by name here, where dw takes the file system's order), then
/// the URLs in order, one result item per image.
fn gather_images(
    args: &Map<String, Value>,
    places: &Places,
    fetcher: &Fetcher,
) -> Result<TaskOutput, InputError> {
    let mut locations: Vec<String> = Vec::new();
    if let Some(pattern) = args.get("glob").filter(|v| !v.is_null()) {
        let pattern = pattern
            .as_str()
            .ok_or_else(|| InputError::new("`glob` must be a pattern such as \"images/*.png\""))?;
        let rooted = places.cwd.join(pattern);
        let matches = glob::glob(&rooted.to_string_lossy())
            .map_err(|e| InputError::new(format!("`glob` {pattern:?}: {e}")))?;
        let mut files: Vec<PathBuf> = matches
            .filter_map(Result::ok)
            .filter(|p| p.is_file())
            .collect();
        files.sort();
        locations.extend(files.iter().map(|p| p.display().to_string()));
    }
    match args.get("urls") {
        None | Some(Value::Null) => {}
        Some(Value::Array(urls)) => {
            for url in urls {
                match url.as_str() {
                    Some(url) if is_url(url) => locations.push(url.to_string()),
                    _ => {
                        return Err(InputError::new(format!(
                            "`urls` holds {url}, which is not an http(s) URL"
                        )))
                    }
                }
            }
        }
        Some(other) => {
            return Err(InputError::new(format!(
                "`urls` must be a list of URLs, found {other}"
            )))
        }
    }
    if locations.is_empty() {
        return Err(InputError::new("`gather_images` found no images (check `glob`, which is relative to the working directory, and `urls`)"));
    }
    if locations.len() > MAX_GATHERED_IMAGES {
        return Err(InputError::new(format!(
            "`gather_images` found {} images; the limit is {MAX_GATHERED_IMAGES}",
            locations.len()
        )));
    }
    locations
        .iter()
        .map(|location| {
            let path = if is_url(location) {
                fetcher.fetch(location)?.display().to_string()
            } else {
                location.clone()
            };
            Ok(Artifact::Image(Arc::new(load_image_file(
                &places.workflow_dir,
                &path,
                None,
            )?)))
        })
        .collect()
}

/// `qr_code(qr_code_contents, height=768, width=768)`: error correction H, 10-pixel
/// modules, a 4-module border, black on white, then `resize_resample` to the larger side.
fn qr_code(args: &Map<String, Value>) -> Result<Pixels, InputError> {
    let contents = text(args, "qr_code_contents", "qr_code")?;
    let modules = crate::qr::modules(contents.as_bytes(), qrcode::EcLevel::H)
        .map_err(|e| InputError::new(format!("task `qr_code`: {e}")))?;
    let side = (modules.len() + 8) * 10;
    let mut image = Pixels::filled(side, side, 1, 255);
    let dark = Pixels::filled(10, 10, 1, 0);
    for (row, line) in modules.iter().enumerate() {
        for (col, &is_dark) in line.iter().enumerate() {
            if is_dark {
                image.paste(&dark, (col + 4) * 10, (row + 4) * 10);
            }
        }
    }
    let resolution = size(args, "height", 768.0)?.max(size(args, "width", 768.0)?);
    let mut resample = Map::new();
    resample.insert("resolution".to_string(), json!(resolution));
    resize_task("resize_resample", &image, &resample)
}

/// A number argument, or its default.
fn number(args: &Map<String, Value>, key: &str, default: f64) -> Result<f64, InputError> {
    match args.get(key) {
        None | Some(Value::Null) => Ok(default),
        Some(value) => value
            .as_f64()
            .filter(|v| v.is_finite())
            .ok_or_else(|| InputError::new(format!("`{key}` must be a number, found {value}"))),
    }
}

/// A size argument (pixels), or its default; bounded so no task allocates without limit.
fn size(args: &Map<String, Value>, key: &str, default: f64) -> Result<f64, InputError> {
    let value = number(args, key, default)?;
    if !(1.0..=16384.0).contains(&value) {
        return Err(InputError::new(format!(
            "`{key}` must be from 1 to 16384, found {value}"
        )));
    }
    Ok(value)
}

/// Python's `round`: halves to even.
fn round(value: f64) -> f64 {
    value.round_ties_even()
}

/// The four resizing tasks of `dw/tasks/image_utils.py`.
fn resize_task(
    command: &str,
    image: &Pixels,
    args: &Map<String, Value>,
) -> Result<Pixels, InputError> {
    let (w, h) = (image.width as f64, image.height as f64);
    let out = match command {
        "resize_center_crop" => {
            let side = w.min(h);
            let cropped = image.crop_rounded(
                (w - side) / 2.0,
                (h - side) / 2.0,
                (w + side) / 2.0,
                (h + side) / 2.0,
            );
            let (width, height) = (size(args, "width", 768.0)?, size(args, "height", 768.0)?);
            return Ok(cropped.resize(width as usize, height as usize, Filter::Bicubic));
        }
        "resize_rescale" => (
            size(args, "width", 768.0)?,
            size(args, "height", 768.0)?,
            Filter::Bicubic,
        ),
        "resize_resample" => {
            let k = size(args, "resolution", 1024.0)? / w.min(h);
            (
                round(w * k / 64.0) * 64.0,
                round(h * k / 64.0) * 64.0,
                Filter::Lanczos,
            )
        }
        _ => {
            let (width, height) = bucket(w, h, args)?;
            (width, height, Filter::Lanczos)
        }
    };
    let (width, height, filter) = out;
    if !(1.0..=16384.0).contains(&width) || !(1.0..=16384.0).contains(&height) {
        return Err(InputError::new(format!(
            "`{command}` would make a {width}x{height} image"
        )));
    }
    Ok(image.resize(width as usize, height as usize, filter))
}

/// `resize_bucket`'s size: the closest ratio (first on a tie), its short side at
/// `resolution`, both sides aligned.
fn bucket(w: f64, h: f64, args: &Map<String, Value>) -> Result<(f64, f64), InputError> {
    const RATIOS: [(f64, f64); 9] = [
        (1., 1.),
        (4., 3.),
        (3., 4.),
        (3., 2.),
        (2., 3.),
        (16., 9.),
        (9., 16.),
        (21., 9.),
        (9., 21.),
    ];
    let ratios: Vec<(f64, f64)> = match args.get("ratios") {
        None | Some(Value::Null) => RATIOS.to_vec(),
        Some(Value::Array(pairs)) => pairs
            .iter()
            .map(|pair| match pair.as_array().map(Vec::as_slice) {
                Some([a, b]) => a.as_f64().zip(b.as_f64()).filter(|(_, b)| *b > 0.0),
                _ => None,
            })
            .collect::<Option<Vec<_>>>()
            .filter(|r| !r.is_empty())
            .ok_or_else(|| InputError::new("`ratios` must be a list of [width, height] pairs"))?,
        Some(other) => {
            return Err(InputError::new(format!(
                "`ratios` must be a list of [width, height] pairs, found {other}"
            )))
        }
    };
    let (resolution, alignment) = (
        size(args, "resolution", 1024.0)?,
        size(args, "alignment", 64.0)?,
    );
    let input = w / h;
    let mut best = ratios[0];
    for ratio in &ratios[1..] {
        if (ratio.0 / ratio.1 - input).abs() < (best.0 / best.1 - input).abs() {
            best = *ratio;
        }
    }
    let ratio = best.0 / best.1;
    let short = round(resolution / alignment) * alignment;
    Ok(if ratio >= 1.0 {
        (round(short * ratio / alignment) * alignment, short)
    } else {
        (short, round(short / ratio / alignment) * alignment)
    })
}

/// `add_border_and_mask`'s arguments: padding per side as a share of the image.
struct Zoom {
    all: f64,
    left: f64,
    right: f64,
    up: f64,
    down: f64,
    overlap: f64,
}

impl Zoom {
    fn from_args(args: &Map<String, Value>) -> Result<Zoom, InputError> {
        let zoom = Zoom {
            all: number(args, "zoom_all", 1.0)?,
            left: number(args, "zoom_left", 0.0)?,
            right: number(args, "zoom_right", 0.0)?,
            up: number(args, "zoom_up", 0.0)?,
            down: number(args, "zoom_down", 0.0)?,
            overlap: number(args, "overlap", 0.0)?,
        };
        let sides = [zoom.all, zoom.left, zoom.right, zoom.up, zoom.down];
        if sides.iter().any(|z| !(0.0..=16.0).contains(z)) || !(0.0..=1.0).contains(&zoom.overlap) {
            return Err(InputError::new(
                "zoom values must be from 0 to 16 and `overlap` from 0 to 1",
            ));
        }
        Ok(zoom)
    }
}

/// `add_border_and_mask`: the image on a black canvas grown by the zooms (each side a
/// multiple of 32), and a mask white over the border, black over the image inset by
/// `overlap`.
fn add_border_and_mask(image: &Pixels, zoom: &Zoom) -> (Pixels, Pixels) {
    let (w, h) = (image.width as f64, image.height as f64);
    let extra = if zoom.all > 1.0 {
        (zoom.all - 1.0) / 2.0
    } else {
        0.0
    };
    let pad = |size: f64, share: f64| {
        (size * share).trunc()
            + if extra > 0.0 {
                (size * extra).trunc()
            } else {
                0.0
            }
    };
    let (left, right, top, bottom) = (
        pad(w, zoom.left),
        pad(w, zoom.right),
        pad(h, zoom.up),
        pad(h, zoom.down),
    );
    let (overlap_x, overlap_y) = ((w * zoom.overlap).trunc(), (h * zoom.overlap).trunc());
    let new_width = (32.0 * round((w + left + right) / 32.0)) as usize;
    let new_height = (32.0 * round((h + top + bottom) / 32.0)) as usize;
    let mut bordered = Pixels::filled(new_width, new_height, 3, 0);
    bordered.paste(image, left as usize, top as usize);
    let mut mask = Pixels::filled(new_width, new_height, 1, 255);
    let hole = Pixels::filled(
        (w - 2.0 * overlap_x).max(0.0) as usize,
        (h - 2.0 * overlap_y).max(0.0) as usize,
        1,
        0,
    );
    mask.paste(
        &hole,
        (left + overlap_x) as usize,
        (top + overlap_y) as usize,
    );
    (bordered, mask)
}

/// `add_border_and_mask_with_size`: the image fitted inside `width` x `height` (each a
/// multiple of 32), centred with borders.
fn add_border_and_mask_with_size(
    image: &Pixels,
    args: &Map<String, Value>,
) -> Result<(Pixels, Pixels), InputError> {
    let width = 32.0
        * round(
            size(args, "width", f64::NAN).map_err(|_| {
                InputError::new(
                    "task `add_border_and_mask_with_size` needs `width` from 1 to 16384",
                )
            })? / 32.0,
        );
    let height = 32.0
        * round(
            size(args, "height", f64::NAN).map_err(|_| {
                InputError::new(
                    "task `add_border_and_mask_with_size` needs `height` from 1 to 16384",
                )
            })? / 32.0,
        );
    let overlap = number(args, "overlap", 0.0)?;
    let aspect = image.width as f64 / image.height as f64;
    let (new_width, new_height) = if aspect > width / height {
        (width, (width / aspect).trunc())
    } else {
        ((height * aspect).trunc(), height)
    };
    if new_width < 1.0 || new_height < 1.0 {
        return Err(InputError::new(format!(
            "the image does not fit in {width}x{height}"
        )));
    }
    let resized = image.resize(new_width as usize, new_height as usize, Filter::Lanczos);
    let left = ((width - new_width) / 2.0).floor();
    let top = ((height - new_height) / 2.0).floor();
    let zoom = Zoom {
        all: 1.0,
        left: left / new_width,
        right: (width - new_width - left) / new_width,
        up: top / new_height,
        down: (height - new_height - top) / new_height,
        overlap,
    };
    Ok(add_border_and_mask(&resized, &zoom))
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
