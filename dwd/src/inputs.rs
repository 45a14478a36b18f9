//! A step's inputs from disk or from earlier steps: initial latents from a `.safetensors`
//! file, and images from PNG/JPEG/WebP files or from an earlier step's outputs.

use std::path::{Path, PathBuf};

use candle_core::{DType, Device, Tensor};
use protocol::workflow::ImageSource;

use crate::fanout::Artifact;
use crate::fetch::Fetcher;
use crate::pipelines::RgbImage;

/// A problem with a step's input, phrased for the user.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct InputError(String);

impl InputError {
    pub fn new(message: impl Into<String>) -> Self {
        InputError(message.into())
    }
}

/// The images an earlier step's result gave a run: one image, or a run's batch.
pub fn bound_images(artifact: &Artifact) -> Result<Vec<RgbImage>, InputError> {
    match artifact {
        Artifact::Image(image) => Ok(vec![image.as_ref().clone()]),
        Artifact::Images(images) if !images.is_empty() => {
            Ok(images.iter().map(|i| i.as_ref().clone()).collect())
        }
        other => Err(InputError(format!(
            "`image` takes images, but the step it refers to produced {}{}",
            other.describe(),
            match other {
                Artifact::Latents(_) => " (drop its `output_type: \"{latent}\"`)",
                _ => "",
            }
        ))),
    }
}

/// Resolves a path written in a workflow against the workflow's folder.
pub fn resolve_path(base_dir: &Path, written: &str) -> PathBuf {
    let path = Path::new(written);
    if path.is_absolute() {
        path.to_path_buf()
    } else {
        base_dir.join(path)
    }
}

/// Loads initial latents: the only tensor in the file, or the one named `latents`, as f32.
pub fn load_latents(path: &Path) -> Result<Tensor, InputError> {
    let bytes = protocol::input::read_bounded(path, protocol::input::LATENTS_BYTES)
        .map_err(|e| InputError(format!("cannot read latents from {}: {e}", path.display())))?;
    let tensors = candle_core::safetensors::load_buffer(&bytes, &Device::Cpu)
        .map_err(|e| InputError(format!("cannot read latents from {}: {e}", path.display())))?;
    let tensor = if let Some(t) = tensors.get("latents") {
        t.clone()
    } else if tensors.len() == 1 {
        tensors
            .into_values()
            .next()
            .ok_or_else(|| InputError(format!("{} holds no tensor", path.display())))?
    } else {
        let mut names: Vec<&String> = tensors.keys().collect();
        names.sort();
        return Err(InputError(format!(
            "{} holds {} tensors ({}); it needs exactly one, or one named `latents`",
            path.display(),
            names.len(),
            names
                .iter()
                .map(|n| n.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        )));
    };
    tensor
        .to_dtype(DType::F32)
        .map_err(|e| InputError(format!("latents in {}: {e}", path.display())))
}

/// Loads the image a file `source` names, as RGB (an earlier step's images are bound to
/// the run instead; see [`bound_images`]).
pub fn load_images(
    source: &ImageSource,
    base_dir: &Path,
    fetcher: &Fetcher,
) -> Result<Vec<RgbImage>, InputError> {
    match source {
        ImageSource::Url { url, size } => {
            let path = fetcher.fetch(url)?;
            Ok(vec![load_image_file(
                base_dir,
                &path.display().to_string(),
                *size,
            )?])
        }
        ImageSource::PreviousResult { reference } => Err(InputError(format!(
            "`previous_result:{}` gave this run no image",
            reference.reference
        ))),
        ImageSource::File { location, size } => {
            Ok(vec![load_image_file(base_dir, location, *size)?])
        }
    }
}

/// Loads an image file (relative to `base_dir`) as RGB, resized to `size` when given.
pub fn load_image_file(
    base_dir: &Path,
    location: &str,
    size: Option<(u32, u32)>,
) -> Result<RgbImage, InputError> {
    let path = resolve_path(base_dir, location);
    let bytes = protocol::input::read_bounded(&path, protocol::input::IMAGE_BYTES)
        .map_err(|e| InputError(format!("cannot open image {}: {e}", path.display())))?;
    let undecodable = |e: image::ImageError| {
        InputError(format!(
            "cannot decode image {} (PNG, JPEG and WebP are read): {e}",
            path.display()
        ))
    };
    let mut decoder = image::ImageReader::new(std::io::Cursor::new(bytes))
        .with_guessed_format()
        .map_err(|e| InputError(format!("cannot read image {}: {e}", path.display())))?
        .into_decoder()
        .map_err(undecodable)?;
    // diffusers' load_image applies the EXIF orientation (exif_transpose), as cameras and
    // phones record it.
    let orientation = image::ImageDecoder::orientation(&mut decoder).map_err(undecodable)?;
    let mut decoded = image::DynamicImage::from_decoder(decoder).map_err(undecodable)?;
    decoded.apply_orientation(orientation);
    let decoded = match size {
        Some((width, height)) => {
            decoded.resize_exact(width, height, image::imageops::FilterType::Lanczos3)
        }
        None => decoded,
    };
    let rgb = decoded.to_rgb8();
    Ok(RgbImage {
        width: rgb.width() as usize,
        height: rgb.height() as usize,
        pixels: rgb.into_raw(),
    })
}

/// Images as one f32 tensor (N, 3, H, W) in [0, 1]; all must share one size.
pub fn images_to_tensor(images: &[RgbImage]) -> Result<Tensor, InputError> {
    let first = images
        .first()
        .ok_or_else(|| InputError("no input image".to_string()))?;
    if let Some(other) = images
        .iter()
        .find(|i| (i.width, i.height) != (first.width, first.height))
    {
        return Err(InputError(format!(
            "input images differ in size ({}x{} and {}x{}); give them one size",
            first.width, first.height, other.width, other.height
        )));
    }
    let data: Vec<u8> = images
        .iter()
        .flat_map(|i| i.pixels.iter().copied())
        .collect();
    let tensor = Tensor::from_vec(
        data,
        (images.len(), first.height, first.width, 3),
        &Device::Cpu,
    )
    .and_then(|t| t.permute((0, 3, 1, 2)))
    .and_then(|t| t.to_dtype(DType::F32))
    .and_then(|t| t / 255.0)
    .map_err(|e| InputError(format!("cannot convert the input image: {e}")))?;
    Ok(tensor)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    #[test]
    fn latents_load_from_a_file_with_one_tensor_or_one_named_latents() {
        let dir = tempfile::tempdir().unwrap();
        let one = dir.path().join("one.safetensors");
        let t = Tensor::ones((1, 4, 2, 2), DType::F32, &Device::Cpu).unwrap();
        candle_core::safetensors::save(&HashMap::from([("noise".to_string(), t.clone())]), &one)
            .unwrap();
        assert_eq!(load_latents(&one).unwrap().dims(), &[1, 4, 2, 2]);

        let two = dir.path().join("two.safetensors");
        candle_core::safetensors::save(
            &HashMap::from([("a".to_string(), t.clone()), ("b".to_string(), t.clone())]),
            &two,
        )
        .unwrap();
        let e = load_latents(&two).unwrap_err().to_string();
        assert!(e.contains("holds 2 tensors (a, b)"), "{e}");
        candle_core::safetensors::save(
            &HashMap::from([("latents".to_string(), t.clone()), ("b".to_string(), t)]),
            &two,
        )
        .unwrap();
        assert!(load_latents(&two).is_ok());
    }

    #[test]
    fn a_truncated_latents_file_is_an_error_naming_it() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("cut.safetensors");
        std::fs::write(&path, b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\"").unwrap();
        let e = load_latents(&path).unwrap_err().to_string();
        assert!(e.contains("cut.safetensors"), "{e}");
    }

    #[test]
    fn an_image_file_loads_as_rgb_and_can_be_resized() {
        let fixture = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tiny-sd15");
        let source = ImageSource::File {
            location: "expected_DDIMScheduler.png".into(),
            size: None,
        };
        let images = load_images(&source, &fixture, &Fetcher::default()).unwrap();
        assert_eq!(
            (images[0].width, images[0].height, images[0].pixels.len()),
            (64, 64, 64 * 64 * 3)
        );
        let resized = ImageSource::File {
            location: "expected_DDIMScheduler.png".into(),
            size: Some((32, 16)),
        };
        let images = load_images(&resized, &fixture, &Fetcher::default()).unwrap();
        assert_eq!((images[0].width, images[0].height), (32, 16));
        let tensor = images_to_tensor(&images).unwrap();
        assert_eq!(tensor.dims(), &[1, 3, 16, 32]);
    }

    // diffusers.utils.load_image: ImageOps.exif_transpose, so an image a phone recorded as
    // rotated loads upright.
    #[test]
    fn the_exif_orientation_of_an_input_image_is_applied() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("rotated.png");
        // A 2x1 image: red then blue, with EXIF orientation 6 (rotate 90° clockwise).
        let exif = b"MM\0*\0\0\0\x08\0\x01\x01\x12\0\x03\0\0\0\x01\0\x06\0\0\0\0\0\0".to_vec();
        let file = std::fs::File::create(&path).unwrap();
        let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), 2, 1);
        encoder.set_color(png::ColorType::Rgb);
        let mut writer = encoder.write_header().unwrap();
        writer.write_chunk(png::chunk::eXIf, &exif).unwrap();
        writer.write_image_data(&[255, 0, 0, 0, 0, 255]).unwrap();
        writer.finish().unwrap();
        let image = load_image_file(dir.path(), "rotated.png", None).unwrap();
        assert_eq!((image.width, image.height), (1, 2));
        assert_eq!(image.pixels, [255, 0, 0, 0, 0, 255]);
    }

    #[test]
    fn a_missing_image_or_a_result_that_is_not_images_is_named() {
        let source = ImageSource::File {
            location: "nope.png".into(),
            size: None,
        };
        let e = load_images(&source, Path::new("/tmp"), &Fetcher::default())
            .unwrap_err()
            .to_string();
        assert!(e.contains("/tmp/nope.png"), "{e}");
        let text = Artifact::Json(serde_json::json!("a fox"));
        let e = bound_images(&text).unwrap_err().to_string();
        assert!(e.contains("produced text"), "{e}");
    }
}
