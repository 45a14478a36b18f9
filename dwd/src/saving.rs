//! Writing a step's results: each item of a run becomes output files named as
//! diffusers-workflow names them ([`protocol::workflow::results`]), handed to the client
//! through sealed memfds. Images go as pixels (the client encodes them), latents as f32
//! tensors, text and JSON as the bytes of the file.

use candle_core::{DType, Device, Tensor};
use protocol::message::{ElementType, OutputDescriptor};
use protocol::workflow::results::LATENTS_CONTENT_TYPE;
use protocol::workflow::{extension_for, ArtifactName, Step};
use serde_json::Value;

use crate::fanout::Artifact;
use crate::host::Host;
use crate::output::segment_with;
use crate::pipelines::RgbImage;

/// What every file of one run records about how it was made.
#[derive(Debug, Clone, Default)]
pub struct Metadata {
    /// AUTOMATIC1111 `parameters` text, one per image of the run (empty for non-images).
    pub parameters: Vec<String>,
    /// diffusers-workflow's JSON: `step_name`, `model_name`, `arguments`, and ours.
    pub dw: String,
}

/// Where a step's files go: the workflow they belong to and the step.
pub struct Destination<'a> {
    pub host: &'a dyn Host,
    pub workflow_id: &'a str,
    pub step: &'a Step,
}

impl Destination<'_> {
    /// Writes one run's item, if the step's `result` asks for files.
    pub fn save(&self, run: usize, item: &Artifact, metadata: &Metadata) -> Result<(), String> {
        let result = &self.step.result;
        let Some(content_type) = result.content_type.as_deref().filter(|_| result.save) else {
            return Ok(());
        };
        if content_type == "application/json" {
            let bytes = python_json(&json_of(item, content_type, &self.step.name)?);
            return self.send(
                name(run, None, None),
                content_type,
                ElementType::U8,
                vec![bytes.len() as u64],
                bytes.into_bytes(),
                metadata,
                0,
            );
        }
        match item {
            Artifact::Images(images) => images.iter().enumerate().try_for_each(|(j, image)| {
                self.image(name(run, Some(j), None), content_type, image, metadata, j)
            }),
            Artifact::Image(image) => {
                self.image(name(run, Some(0), None), content_type, image, metadata, 0)
            }
            Artifact::Map(members) => members.iter().try_for_each(|(key, member)| match member {
                Artifact::Image(image) => self.image(
                    name(run, Some(0), Some(key)),
                    content_type,
                    image,
                    metadata,
                    0,
                ),
                other => Err(mismatch(content_type, &self.step.name, other)),
            }),
            Artifact::Latents(latents) => self.latents(name(run, Some(0), None), latents, metadata),
            Artifact::Json(Value::String(text)) if content_type == "text/plain" => {
                let bytes = text.clone().into_bytes();
                self.send(
                    name(run, Some(0), None),
                    content_type,
                    ElementType::U8,
                    vec![bytes.len() as u64],
                    bytes,
                    metadata,
                    0,
                )
            }
            other => Err(mismatch(content_type, &self.step.name, other)),
        }
    }

    fn image(
        &self,
        at: ArtifactName,
        content_type: &str,
        image: &RgbImage,
        metadata: &Metadata,
        index: usize,
    ) -> Result<(), String> {
        if !content_type.starts_with("image/") {
            return Err(mismatch(
                content_type,
                &self.step.name,
                &Artifact::Image(image.clone().into()),
            ));
        }
        let shape = vec![image.height as u64, image.width as u64, 3];
        self.send(
            at,
            content_type,
            ElementType::U8,
            shape,
            image.pixels.clone(),
            metadata,
            index,
        )
    }

    /// Final latents, written by the client as `.safetensors`.
    fn latents(
        &self,
        at: ArtifactName,
        latents: &Tensor,
        metadata: &Metadata,
    ) -> Result<(), String> {
        let failed = |e: candle_core::Error| {
            format!(
                "step `{}`: cannot read the latents back: {e}",
                self.step.name
            )
        };
        let latents = latents
            .to_dtype(DType::F32)
            .and_then(|t| t.to_device(&Device::Cpu))
            .and_then(|t| t.contiguous())
            .map_err(failed)?;
        let values = latents
            .flatten_all()
            .and_then(|t| t.to_vec1::<f32>())
            .map_err(failed)?;
        let bytes: Vec<u8> = values.iter().flat_map(|v| v.to_le_bytes()).collect();
        let shape = latents.dims().iter().map(|&d| d as u64).collect();
        self.send(
            at,
            LATENTS_CONTENT_TYPE,
            ElementType::F32,
            shape,
            bytes,
            metadata,
            0,
        )
    }

    #[allow(clippy::too_many_arguments)]
    fn send(
        &self,
        at: ArtifactName,
        content_type: &str,
        element_type: ElementType,
        shape: Vec<u64>,
        bytes: Vec<u8>,
        metadata: &Metadata,
        index: usize,
    ) -> Result<(), String> {
        let step = self.step;
        let extension = extension_for(content_type).unwrap_or("bin");
        let base = step
            .result
            .base_name(self.workflow_id, &step.name, step.index);
        let segment =
            segment_with(&bytes).map_err(|e| format!("cannot create the output segment: {e}"))?;
        let descriptor = OutputDescriptor {
            job_id: self.host.job_id(),
            workflow_id: self.workflow_id.to_string(),
            step: step.name.clone(),
            step_index: step.index as u32,
            result_index: at.run as u32,
            artifact_index: at.artifact.unwrap_or(0) as u32,
            file_name: at.file_name(&base, extension),
            content_type: content_type.to_string(),
            element_type,
            shape,
            byte_len: bytes.len() as u64,
            embed_metadata: step.result.embed_metadata,
            parameters: bounded_text(
                metadata.parameters.get(index).cloned().unwrap_or_default(),
                MAX_METADATA_BYTES / 4,
            ),
            dw_metadata: metadata.dw.clone(),
        };
        self.host.output(descriptor, segment);
        Ok(())
    }
}

fn name(run: usize, artifact: Option<usize>, key: Option<&str>) -> ArtifactName {
    ArtifactName {
        run,
        artifact,
        key: key.map(str::to_string),
    }
}

fn json_of(item: &Artifact, content_type: &str, step: &str) -> Result<Value, String> {
    match item {
        Artifact::Json(value) => Ok(value.clone()),
        other => Err(mismatch(content_type, step, other)),
    }
}

fn mismatch(content_type: &str, step: &str, got: &Artifact) -> String {
    format!(
        "step `{step}` produced {}, which cannot be written as `{content_type}`; change the step's `result.content_type`",
        got.describe()
    )
}

/// The most bytes of metadata one output carries: the frame that describes it must stay
/// far below the protocol's 1 MiB, however long the prompt.
pub const MAX_METADATA_BYTES: usize = 64 << 10;

/// `text`, cut at a character boundary to at most `limit` bytes with a note of how much
/// was left out.
pub fn bounded_text(text: String, limit: usize) -> String {
    if text.len() <= limit {
        return text;
    }
    let mut cut = limit.saturating_sub(64);
    while !text.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}… ({} more bytes)", &text[..cut], text.len() - cut)
}

/// `value` with every string longer than `limit` bytes shortened, for metadata.
pub fn bounded_json(value: &Value, limit: usize) -> Value {
    match value {
        Value::String(s) => Value::String(bounded_text(s.clone(), limit)),
        Value::Array(items) => Value::Array(items.iter().map(|v| bounded_json(v, limit)).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), bounded_json(v, limit)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// JSON as Python's `json.dumps(value, indent=4)` writes it (what diffusers-workflow
/// writes): four-space indents and non-ASCII characters as `\uXXXX`.
pub fn python_json(value: &Value) -> String {
    let mut bytes = Vec::new();
    let formatter = serde_json::ser::PrettyFormatter::with_indent(b"    ");
    let mut serializer = serde_json::Serializer::with_formatter(&mut bytes, formatter);
    // Serialising a `Value` into memory cannot fail.
    let _ = serde::Serialize::serialize(value, &mut serializer);
    let text = String::from_utf8_lossy(&bytes);
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        if c.is_ascii() {
            out.push(c);
        } else {
            let mut units = [0u16; 2];
            for unit in c.encode_utf16(&mut units) {
                out.push_str(&format!("\\u{unit:04x}"));
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    // dw/result.py writes json.dumps(item, indent=4): ensure_ascii, four spaces.
    #[test]
    fn long_metadata_is_cut_at_a_character_boundary_with_a_note() {
        let text = "é".repeat(1000);
        let cut = bounded_text(text.clone(), 300);
        assert!(cut.len() <= 300 + 32, "{}", cut.len());
        assert!(cut.ends_with("more bytes)"), "{cut}");
        assert_eq!(bounded_text("short".into(), 300), "short");
        let json = bounded_json(&json!({"prompt": text, "n": 1}), 300);
        assert!(json["prompt"].as_str().unwrap().len() < 400);
        assert_eq!(json["n"], 1);
    }

    #[test]
    fn json_results_are_written_as_python_writes_them() {
        let text = python_json(&json!({"width": 64, "name": "café 🦊", "list": []}));
        assert_eq!(
            text,
            "{\n    \"width\": 64,\n    \"name\": \"caf\\u00e9 \\ud83e\\udd8a\",\n    \"list\": []\n}"
        );
    }
}
