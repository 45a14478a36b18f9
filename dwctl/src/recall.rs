//! `dwctl run --from IMAGE`: runs again the workflow an output was made by, as it was.
//!
//! An output written with `result.embed_metadata` carries dw's metadata (the PNG `dw`
//! text chunk): the workflow's path and SHA-256, its variables and the step's seed. From
//! them this rebuilds the run: the same file (refused if it changed since, since it would
//! not make the same image), the same variables as `NAME=VALUE`, and the step's seed
//! pinned, so that a run whose seed was drawn at random comes out the same too.

use std::path::{Path, PathBuf};

use serde_json::{Map, Value};

use crate::exit::{Failure, EXIT_INVALID};

/// What a run is made from again.
#[derive(Debug, Clone, PartialEq)]
pub struct Recalled {
    pub workflow: PathBuf,
    pub assignments: Vec<String>,
    /// (step, seed) to run with.
    pub seeds: Vec<(String, u64)>,
    /// What the workflow file must still be, when it comes from an image.
    pub recorded: Option<Recorded>,
}

impl Recalled {
    /// A workflow and variables as given on the command line: nothing pinned or recorded.
    pub fn given(workflow: PathBuf, assignments: Vec<String>) -> Self {
        Recalled {
            workflow,
            assignments,
            seeds: Vec::new(),
            recorded: None,
        }
    }
}

/// The workflow file as an image recorded it.
#[derive(Debug, Clone, PartialEq)]
pub struct Recorded {
    pub image: PathBuf,
    pub sha256: String,
}

impl Recorded {
    /// Checks the workflow's text, as the run reads it, against the recorded digest: an
    /// edited workflow would not make the same image.
    pub fn check(&self, workflow: &Path, source: &str) -> Result<(), Failure> {
        let now = protocol::workflow::sha256_hex(source.as_bytes());
        if now == self.sha256 {
            return Ok(());
        }
        Err(Failure::new(
            EXIT_INVALID,
            format!(
                "{} changed since {} was made (SHA-256 {} then, {now} now): --from runs a workflow only as it was",
                workflow.display(),
                self.image.display(),
                self.sha256
            ),
        ))
    }
}

/// Reads what made `image` from its metadata; the run checks that the workflow file is
/// still the one it records ([`Recorded::check`]) when it reads it.
pub fn recall(image: &Path) -> Result<Recalled, Failure> {
    let invalid = |message: String| Failure::new(EXIT_INVALID, message);
    let metadata = dw_metadata(image).map_err(|e| invalid(format!("{}: {e}", image.display())))?;
    let text = |key: &str| metadata.get(key).and_then(Value::as_str);
    let (Some(path), Some(sha256)) = (text("workflow_path"), text("workflow_sha256")) else {
        return Err(invalid(format!(
            "{}: its metadata does not say which workflow made it (written by an older dw?)",
            image.display()
        )));
    };
    let variables = metadata.get("variables").and_then(Value::as_object);
    let assignments = assignments(variables.unwrap_or(&Map::new()))
        .map_err(|e| invalid(format!("{}: {e}", image.display())))?;
    let seeds = match (
        text("step_name"),
        metadata.get("seed").and_then(Value::as_u64),
    ) {
        (Some(step), Some(seed)) => vec![(step.to_string(), seed)],
        _ => Vec::new(),
    };
    Ok(Recalled {
        workflow: PathBuf::from(path),
        assignments,
        seeds,
        recorded: Some(Recorded {
            image: image.to_path_buf(),
            sha256: sha256.to_string(),
        }),
    })
}

/// The recorded variables as the `NAME=VALUE` a command line gives: text as it is, other
/// values as JSON (which the variable's type reads back).
fn assignments(variables: &Map<String, Value>) -> Result<Vec<String>, String> {
    variables
        .iter()
        .map(|(name, value)| match value {
            Value::String(text) => Ok(format!("{name}={text}")),
            Value::Object(_) => Err(format!(
                "variable `{name}` holds an object, which NAME=VALUE cannot give back"
            )),
            other => Ok(format!("{name}={other}")),
        })
        .collect()
}

/// The `dw` text chunk of a PNG, as JSON.
fn dw_metadata(image: &Path) -> Result<Map<String, Value>, String> {
    let (file, _) = protocol::input::open_regular(image).map_err(|e| e.to_string())?;
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().map_err(|e| {
        format!("not a PNG dw can read ({e}); --from reads the metadata of PNG outputs")
    })?;
    let info = reader.info();
    let latin1 = info
        .uncompressed_latin1_text
        .iter()
        .find(|c| c.keyword == "dw")
        .map(|c| c.text.clone());
    let utf8 = || {
        info.utf8_text
            .iter()
            .find(|c| c.keyword == "dw")
            .and_then(|c| c.get_text().ok())
    };
    let text = latin1.or_else(utf8).ok_or_else(|| {
        "it holds no dw metadata: its step's result did not set `embed_metadata`".to_string()
    })?;
    match serde_json::from_str(&text) {
        Ok(Value::Object(map)) => Ok(map),
        _ => Err("its dw metadata is not a JSON object (truncated?)".to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn variables_come_back_as_the_command_line_gives_them() {
        let variables =
            json!({"prompt": "a fox", "steps": 4, "cfg": 7.5, "fast": true, "sizes": [1, 2]});
        let got = assignments(variables.as_object().unwrap()).unwrap();
        assert_eq!(
            got,
            [
                "prompt=a fox",
                "steps=4",
                "cfg=7.5",
                "fast=true",
                "sizes=[1,2]"
            ]
        );
        let nested = json!({"o": {"a": 1}});
        assert!(assignments(nested.as_object().unwrap()).is_err());
    }
}
