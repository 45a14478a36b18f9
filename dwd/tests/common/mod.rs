//! Helpers the parity tests share: the reference fixtures, and comparing tensors with
//! diffusers' references.

// Each test file uses a different subset of these helpers.
#![allow(dead_code)]

pub mod merge;

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use dwd::pipelines::{PipelineError, Progress};
use serde_json::Value;

/// A reference fixture under `tests/fixtures/` (such as `tiny-sd15`): a saved diffusers
/// model and the tensors and JSON diffusers computed from it.
pub struct Fixture(PathBuf);

impl Fixture {
    pub fn new(name: &str) -> Self {
        Self(
            PathBuf::from(env!("CARGO_MANIFEST_DIR"))
                .join("../tests/fixtures")
                .join(name),
        )
    }

    pub fn dir(&self) -> &Path {
        &self.0
    }

    /// The diffusers pipeline folder.
    pub fn model_dir(&self) -> PathBuf {
        self.0.join("model")
    }

    /// The tensors of one of the fixture's safetensors files.
    pub fn tensors(&self, file: &str) -> HashMap<String, Tensor> {
        candle_core::safetensors::load(self.0.join(file), &Device::Cpu).unwrap()
    }

    /// One of the fixture's JSON files.
    pub fn json(&self, file: &str) -> Value {
        let text = std::fs::read_to_string(self.0.join(file)).unwrap();
        serde_json::from_str(&text).unwrap()
    }
}

/// Token ids as rows of u32, from the i64 tensors the references store.
pub fn token_rows(tensor: &Tensor) -> Vec<Vec<u32>> {
    tensor
        .to_vec2::<i64>()
        .unwrap()
        .into_iter()
        .map(|row| {
            row.into_iter()
                .map(|id| u32::try_from(id).unwrap())
                .collect()
        })
        .collect()
}

/// The largest absolute difference between two tensors of one shape.
pub fn max_abs_diff(got: &Tensor, want: &Tensor) -> f32 {
    assert_eq!(got.dims(), want.dims(), "shapes differ");
    (got.to_dtype(DType::F32).unwrap() - want.to_dtype(DType::F32).unwrap())
        .unwrap()
        .abs()
        .unwrap()
        .flatten_all()
        .unwrap()
        .max(0)
        .unwrap()
        .to_scalar::<f32>()
        .unwrap()
}

/// Fails when `got` and `want` differ by more than `tolerance`; the measured difference is
/// written to the captured test output (`--nocapture` shows it).
pub fn assert_close(what: &str, got: &Tensor, want: &Tensor, tolerance: f32) {
    let diff = max_abs_diff(got, want);
    eprintln!("{what}: max abs diff {diff:e} (tolerance {tolerance:e})");
    assert!(
        diff <= tolerance,
        "{what}: max abs diff {diff:e} exceeds {tolerance:e}"
    );
}

/// A progress callback that never cancels.
pub fn no_progress() -> impl FnMut(Progress) -> Result<(), PipelineError> {
    |_| Ok(())
}

/// Copies a folder tree (a model folder to edit in a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), &target).unwrap();
        }
    }
}
