//! What a component will take before it is loaded, read from its safetensors headers, so
//! the daemon can make room (or refuse) before loading anything.

use std::path::PathBuf;

use candle_core::DType;

use crate::pipelines::weights::read_header;
use crate::pipelines::PipelineError;

/// Bytes the tensors in `files` take once loaded as `dtype`: every element at `dtype`'s
/// size, read from the headers alone.
pub fn weights_bytes(files: &[PathBuf], dtype: DType) -> Result<u64, PipelineError> {
    let mut total = 0u64;
    for file in files {
        let (_, entries) = read_header(file)?;
        let elements: u64 = entries.iter().map(|e| e.elements as u64).sum();
        total = total.saturating_add(elements.saturating_mul(dtype.size_in_bytes() as u64));
    }
    Ok(total)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::Path;

    fn fixture(relative: &str) -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("../tests/fixtures/tiny-sd15/model")
            .join(relative)
    }

    #[test]
    fn the_size_from_the_header_matches_the_stored_f32_data() {
        let file = fixture("unet/diffusion_pytorch_model.safetensors");
        let bytes = std::fs::read(&file).unwrap();
        let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
        let data = bytes.len() as u64 - 8 - header;
        assert_eq!(
            weights_bytes(std::slice::from_ref(&file), DType::F32).unwrap(),
            data
        );
        assert_eq!(weights_bytes(&[file], DType::F16).unwrap(), data / 2);
    }

    #[test]
    fn a_truncated_file_is_refused_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let cut = dir.path().join("cut.safetensors");
        let bytes = std::fs::read(fixture("vae/diffusion_pytorch_model.safetensors")).unwrap();
        std::fs::write(&cut, &bytes[..bytes.len() / 2]).unwrap();
        let e = weights_bytes(&[cut], DType::F32).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors: truncated"), "{e}");
        let junk = dir.path().join("junk.safetensors");
        std::fs::write(&junk, b"not a safetensors file at all").unwrap();
        assert!(weights_bytes(&[junk], DType::F32)
            .unwrap_err()
            .to_string()
            .contains("not a safetensors file"));
    }
}
