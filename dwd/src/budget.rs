//! What a component will take before it is loaded, read from its safetensors headers, so
//! the daemon can make room (or refuse) before loading anything.

use std::io::Read;
use std::path::{Path, PathBuf};

use candle_core::DType;

/// Largest safetensors header we read (the format allows 100 MB).
const MAX_HEADER_BYTES: u64 = 100 * 1024 * 1024;

/// A weight file whose header cannot be read.
#[derive(Debug, thiserror::Error)]
#[error("{}: {problem}", path.display())]
pub struct HeaderError {
    pub path: PathBuf,
    pub problem: String,
}

/// Bytes the tensors in `files` take once loaded as `dtype`.
pub fn weights_bytes(files: &[PathBuf], dtype: DType) -> Result<u64, HeaderError> {
    let mut total = 0u64;
    for file in files {
        total += tensor_elements(file)?.saturating_mul(dtype.size_in_bytes() as u64);
    }
    Ok(total)
}

/// The number of elements of all tensors in one safetensors file, from its header alone.
fn tensor_elements(path: &Path) -> Result<u64, HeaderError> {
    let fail = |problem: String| HeaderError {
        path: path.to_path_buf(),
        problem,
    };
    let (mut file, _) =
        protocol::input::open_regular(path).map_err(|e| fail(format!("cannot open: {e}")))?;
    let file_len = file
        .metadata()
        .map_err(|e| fail(format!("cannot stat: {e}")))?
        .len();
    let mut len = [0u8; 8];
    file.read_exact(&mut len)
        .map_err(|_| fail("truncated: shorter than a safetensors header".into()))?;
    let header_len = u64::from_le_bytes(len);
    if header_len > MAX_HEADER_BYTES || header_len + 8 > file_len {
        return Err(fail(format!("not a safetensors file, or truncated (header of {header_len} bytes in a file of {file_len})")));
    }
    let mut header = vec![0u8; header_len as usize];
    file.read_exact(&mut header)
        .map_err(|e| fail(format!("cannot read the header: {e}")))?;
    let header: serde_json::Map<String, serde_json::Value> = serde_json::from_slice(&header)
        .map_err(|e| fail(format!("malformed safetensors header: {e}")))?;
    let mut elements = 0u64;
    let mut data_end = 0u64;
    for (name, info) in header
        .iter()
        .filter(|(name, _)| name.as_str() != "__metadata__")
    {
        let shape = info
            .get("shape")
            .and_then(|s| s.as_array())
            .ok_or_else(|| fail(format!("tensor `{name}` has no shape")))?;
        elements += shape
            .iter()
            .map(|d| d.as_u64().unwrap_or(0))
            .product::<u64>();
        let end = info
            .get("data_offsets")
            .and_then(|o| o.get(1))
            .and_then(|e| e.as_u64())
            .unwrap_or(0);
        data_end = data_end.max(end);
    }
    if 8 + header_len + data_end > file_len {
        return Err(fail(format!(
            "truncated: its tensors need {} bytes, the file has {file_len}",
            8 + header_len + data_end
        )));
    }
    Ok(elements)
}

#[cfg(test)]
mod tests {
    use super::*;

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
