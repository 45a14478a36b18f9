//! How a step's results are written, and what the files are called.
//!
//! As diffusers-workflow does it (`dw/result.py`): nothing is written unless the step has
//! a `result` with a `content_type` and `save` is not false (an unsaved step still feeds
//! later ones); files are named `{file_base_name}{workflow_id}-{step}.{step_index}`, then
//! `-{run}.{artifact}{ext}` for images and text, `-{run}.json` for JSON results (one file
//! per run), and a result that is an object of images (a border and its mask) adds
//! `-{key}` per image. Indices count from 0. Metadata is embedded only when
//! `embed_metadata` is true.

/// Content types a result can be written as, with their extensions (Python's `mimetypes`,
/// which dw uses, gives these on Linux).
pub const CONTENT_TYPES: &[(&str, &str)] = &[
    ("image/png", "png"),
    ("image/jpeg", "jpg"),
    ("image/webp", "webp"),
    ("text/plain", "txt"),
    ("application/json", "json"),
];

/// Content types dw's schema allows that dw cannot write, and why.
pub const REFUSED_CONTENT_TYPES: &[(&str, &str)] = &[
    (
        "video/",
        "dw runs image pipelines; video output is not built",
    ),
    (
        "audio/",
        "dw runs image pipelines; audio output is not built",
    ),
    ("image/gif", "animated GIF output is not built"),
];

/// The content type final latents are written as (`output_type: "{latent}"`).
pub const LATENTS_CONTENT_TYPE: &str = "application/x-safetensors";

/// How a step's outputs are written.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ResultSpec {
    /// `None`: nothing is written (no `result`, or no `content_type`).
    pub content_type: Option<String>,
    /// dw's `save` (default true).
    pub save: bool,
    pub file_base_name: String,
    /// dw's default is false.
    pub embed_metadata: bool,
}

impl Default for ResultSpec {
    /// A step without a `result`: nothing is written.
    fn default() -> Self {
        ResultSpec {
            content_type: None,
            save: true,
            file_base_name: String::new(),
            embed_metadata: false,
        }
    }
}

impl ResultSpec {
    /// Whether anything of this step is written.
    pub fn writes(&self) -> bool {
        self.save && self.content_type.is_some()
    }

    /// `{file_base_name}{workflow_id}-{step}.{step_index}`: what every output file name of
    /// the step starts with.
    pub fn base_name(&self, workflow_id: &str, step: &str, step_index: usize) -> String {
        format!("{}{workflow_id}-{step}.{step_index}", self.file_base_name)
    }
}

/// The extension for a content type this side writes, if it is one.
pub fn extension_for(content_type: &str) -> Option<&'static str> {
    if content_type == LATENTS_CONTENT_TYPE {
        return Some("safetensors");
    }
    CONTENT_TYPES
        .iter()
        .find(|(t, _)| *t == content_type)
        .map(|(_, e)| *e)
}

/// Why a content type cannot be written, in words that name it.
pub fn content_type_refusal(content_type: &str) -> String {
    let accepted: Vec<&str> = CONTENT_TYPES.iter().map(|(t, _)| *t).collect();
    match REFUSED_CONTENT_TYPES
        .iter()
        .find(|(prefix, _)| content_type.starts_with(prefix))
    {
        Some((_, why)) => format!(
            "content_type `{content_type}` is not supported: {why}; accepted: {}",
            accepted.join(", ")
        ),
        None => format!(
            "content_type `{content_type}` is not supported; accepted: {}",
            accepted.join(", ")
        ),
    }
}

/// Where one artifact of a run goes, relative to the output directory.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArtifactName {
    pub run: usize,
    /// `None` for a JSON result, which is one file per run.
    pub artifact: Option<usize>,
    /// The key of an image inside an object result (`bordered_image`, `mask`).
    pub key: Option<String>,
}

impl ArtifactName {
    /// The file name under `base` (see [`ResultSpec::base_name`]) with `extension`.
    pub fn file_name(&self, base: &str, extension: &str) -> String {
        let mut name = match self.artifact {
            Some(artifact) => format!("{base}-{}.{artifact}", self.run),
            None => format!("{base}-{}", self.run),
        };
        if let Some(key) = &self.key {
            name.push('-');
            name.push_str(key);
        }
        format!("{name}.{extension}")
    }
}

/// Whether `name` is a plain file name that stays inside the directory it is joined to:
/// no separators, no `..`, not empty, not hidden by a leading dot alone.
pub fn is_plain_file_name(name: &str) -> bool {
    !name.is_empty()
        && name != "."
        && name != ".."
        && !name.contains('/')
        && !name.contains('\\')
        && !name.contains('\0')
        && !name.contains("..")
}

#[cfg(test)]
mod tests {
    use super::*;

    // dw/result.py save(): `{name}-{i}.{j}{ext}`, JSON `{name}-{i}{ext}`, dict keys `-{key}`;
    // file_base_name is a prefix (tests/test_result.py expects `custom_output-0.json`).
    #[test]
    fn names_follow_diffusers_workflow() {
        let spec = ResultSpec {
            content_type: Some("image/png".into()),
            file_base_name: "fox_".into(),
            ..ResultSpec::default()
        };
        let base = spec.base_name("wf", "gen", 1);
        assert_eq!(base, "fox_wf-gen.1");
        let image = ArtifactName {
            run: 2,
            artifact: Some(0),
            key: None,
        };
        assert_eq!(image.file_name(&base, "png"), "fox_wf-gen.1-2.0.png");
        let json = ArtifactName {
            run: 0,
            artifact: None,
            key: None,
        };
        assert_eq!(json.file_name(&base, "json"), "fox_wf-gen.1-0.json");
        let mask = ArtifactName {
            run: 0,
            artifact: Some(0),
            key: Some("mask".into()),
        };
        assert_eq!(mask.file_name(&base, "png"), "fox_wf-gen.1-0.0-mask.png");
    }

    #[test]
    fn without_a_content_type_or_with_save_false_nothing_is_written() {
        assert!(!ResultSpec::default().writes());
        let unsaved = ResultSpec {
            content_type: Some("image/png".into()),
            save: false,
            ..ResultSpec::default()
        };
        assert!(!unsaved.writes());
        assert!(!ResultSpec::default().embed_metadata);
    }

    #[test]
    fn video_and_audio_are_refused_by_name() {
        let e = content_type_refusal("video/mp4");
        assert!(e.starts_with("content_type `video/mp4` is not supported: dw runs image pipelines; video output is not built"), "{e}");
        assert_eq!(extension_for("image/webp"), Some("webp"));
        assert_eq!(extension_for("video/mp4"), None);
    }

    #[test]
    fn only_plain_names_are_file_names() {
        assert!(is_plain_file_name("wf-gen.0-0.0.png"));
        for bad in ["", "..", "a/b", "../x", "a\\b", "x..y"] {
            assert!(!is_plain_file_name(bad), "{bad}");
        }
    }
}
