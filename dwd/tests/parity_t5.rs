//! Parity of FLUX's T5 text encoder (`text_encoder_2`, transformers' `T5EncoderModel`) and
//! its tokenizer (`tokenizer_2`, `T5TokenizerFast`) with transformers, on
//! `tests/fixtures/tiny-flux`: the prompt's ids and the seven edge cases of
//! `expected.json`'s `tokenizer_cases` (case, spacing, punctuation, emoji, full-width
//! letters and ligatures, typed special tokens, truncation), each padded to 32; the
//! encoder's `last_hidden_state` for the prompt's ids (no mask, as FLUX calls it); and the
//! strict loading of its weights: a tensor the model does not use, or one it lacks, is
//! refused by name, while the tied embedding may be stored under either name or both.

mod common;
use common::{assert_close, token_rows, Fixture};

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use candle_core::{DType, Device};
use dwd::pipelines::{T5Encoder, T5Tokenizer};

/// Text encoders: 1e-5, as for CLIP.
const TEXT_TOLERANCE: f32 = 1e-5;
/// FLUX's `max_sequence_length` in the fixture.
const MAX_LEN: usize = 32;

fn fixture() -> Fixture {
    Fixture::new("tiny-flux")
}

fn encoder_dir() -> PathBuf {
    fixture().model_dir().join("text_encoder_2")
}

fn tokenizer() -> T5Tokenizer {
    T5Tokenizer::load(&fixture().model_dir().join("tokenizer_2")).unwrap()
}

#[test]
fn the_prompt_tokenizes_as_transformers_does() {
    let expected = fixture().json("expected.json");
    let prompt = expected["prompt"].as_str().unwrap();
    assert_eq!(
        expected["max_sequence_length"].as_u64(),
        Some(MAX_LEN as u64)
    );
    let reference = fixture().tensors("expected.safetensors");
    let ids = tokenizer().encode_padded(prompt, MAX_LEN).unwrap();
    assert_eq!(vec![ids], token_rows(&reference["t5_ids"]));
}

#[test]
fn every_tricky_case_tokenizes_as_transformers_does() {
    let expected = fixture().json("expected.json");
    let cases = expected["tokenizer_cases"].as_array().unwrap();
    let reference = token_rows(&fixture().tensors("expected.safetensors")["t5_tricky_ids"]);
    assert_eq!(cases.len(), 7);
    assert_eq!(reference.len(), cases.len());
    let tokenizer = tokenizer();
    for (case, want) in cases.iter().zip(&reference) {
        let text = case.as_str().unwrap();
        let got = tokenizer.encode_padded(text, MAX_LEN).unwrap();
        assert_eq!(&got, want, "{text:?}");
    }
}

#[test]
fn the_encoder_matches_transformers_without_a_mask() {
    let reference = fixture().tensors("expected.safetensors");
    let encoder = T5Encoder::load(&encoder_dir(), DType::F32, &Device::Cpu).unwrap();
    assert_eq!((encoder.d_model(), encoder.dtype()), (48, DType::F32));
    let weights = std::fs::metadata(encoder_dir().join("model.safetensors"))
        .unwrap()
        .len();
    assert!(encoder.bytes() > 0 && encoder.bytes() <= weights);
    let out = encoder.encode(&token_rows(&reference["t5_ids"])).unwrap();
    assert_close(
        "T5 last_hidden_state",
        &out,
        &reference["t5_out"],
        TEXT_TOLERANCE,
    );
}

/// Under model offload T5 is built again from its host copy's tensors where it runs;
/// built so (here on the CPU), it still matches transformers.
#[test]
fn the_encoder_rebuilt_from_its_offloaded_tensors_matches_transformers() {
    let reference = fixture().tensors("expected.safetensors");
    let host = T5Encoder::load_host(&encoder_dir(), None, DType::F32).unwrap();
    let encoder = host.rebuilt_on(&Device::Cpu).unwrap();
    assert!(encoder.bytes() > 0);
    let out = encoder.encode(&token_rows(&reference["t5_ids"])).unwrap();
    assert_close(
        "rebuilt T5 last_hidden_state",
        &out,
        &reference["t5_out"],
        TEXT_TOLERANCE,
    );
}

#[test]
fn a_batch_encodes_each_row_as_alone_and_bad_ids_are_errors() {
    let encoder = T5Encoder::load(&encoder_dir(), DType::F32, &Device::Cpu).unwrap();
    let rows = token_rows(&fixture().tensors("expected.safetensors")["t5_tricky_ids"]);
    let batch = encoder.encode(&rows[..2]).unwrap();
    let second = encoder.encode(&rows[1..2]).unwrap();
    assert_close(
        "second row",
        &batch.get(1).unwrap(),
        &second.get(0).unwrap(),
        1e-6,
    );
    let error = encoder.encode(&[vec![768]]).unwrap_err().to_string();
    assert!(error.contains("768"), "{error}");
    assert!(encoder.encode(&[vec![1, 2], vec![1]]).is_err());
    assert!(encoder.encode(&[]).is_err());
}

/// A copy of the encoder's folder whose weights are the fixture's, changed by `edit`.
fn edited_copy(
    edit: impl FnOnce(&mut HashMap<String, (Vec<usize>, Vec<u8>)>),
) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(
        encoder_dir().join("config.json"),
        dir.path().join("config.json"),
    )
    .unwrap();
    let bytes = std::fs::read(encoder_dir().join("model.safetensors")).unwrap();
    let file = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut tensors: HashMap<String, (Vec<usize>, Vec<u8>)> = file
        .tensors()
        .into_iter()
        .map(|(name, view)| {
            assert_eq!(view.dtype(), safetensors::Dtype::F32);
            (name, (view.shape().to_vec(), view.data().to_vec()))
        })
        .collect();
    edit(&mut tensors);
    write_f32_tensors(dir.path(), &tensors);
    dir
}

fn write_f32_tensors(dir: &Path, tensors: &HashMap<String, (Vec<usize>, Vec<u8>)>) {
    let views = tensors.iter().map(|(name, (shape, data))| {
        let view =
            safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape.clone(), data);
        (name.clone(), view.unwrap())
    });
    let bytes = safetensors::serialize(views, None).unwrap();
    std::fs::write(dir.join("model.safetensors"), bytes).unwrap();
}

#[test]
fn a_weight_the_model_does_not_use_is_refused_by_name() {
    let extra = "encoder.block.0.layer.0.SelfAttention.q.bias";
    let dir = edited_copy(|tensors| {
        tensors.insert(extra.to_string(), (vec![64], vec![0; 64 * 4]));
    });
    let error = T5Encoder::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains(extra), "{error}");
}

#[test]
fn a_weight_the_model_lacks_is_refused_by_name() {
    let missing = "encoder.block.1.layer.1.DenseReluDense.wi_1.weight";
    let dir = edited_copy(|tensors| {
        tensors.remove(missing).unwrap();
    });
    let error = T5Encoder::load(dir.path(), DType::F32, &Device::Cpu)
        .unwrap_err()
        .to_string();
    assert!(error.contains(missing), "{error}");
}

/// transformers may save the tied embedding as `shared.weight`, as
/// `encoder.embed_tokens.weight`, or as both; each loads and encodes the same.
#[test]
fn the_tied_embedding_is_read_under_either_name_or_both() {
    let reference = fixture().tensors("expected.safetensors");
    let ids = token_rows(&reference["t5_ids"]);
    let renamed = edited_copy(|tensors| {
        let shared = tensors.remove("shared.weight").unwrap();
        tensors.insert("encoder.embed_tokens.weight".to_string(), shared);
    });
    let both = edited_copy(|tensors| {
        let shared = tensors["shared.weight"].clone();
        tensors.insert("encoder.embed_tokens.weight".to_string(), shared);
    });
    for dir in [renamed, both] {
        let encoder = T5Encoder::load(dir.path(), DType::F32, &Device::Cpu).unwrap();
        let out = encoder.encode(&ids).unwrap();
        assert_close(
            "T5 with a renamed embedding",
            &out,
            &reference["t5_out"],
            TEXT_TOLERANCE,
        );
    }
}
