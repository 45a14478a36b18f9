//! Parity of the CLIP text encoders' other outputs with transformers, on the SDXL-shaped
//! fixture in `tests/fixtures/tiny-sdxl` (a copy of the shared SDXL reference, see
//! `tests/fixtures/REFERENCE.md`): `hidden_states[-2]` of a
//! `CLIPTextModel` (quick_gelu) and of a `CLIPTextModelWithProjection` (erf gelu), and the
//! latter's projected pooled `text_embeds`, which SDXL and SD 3 take.

mod common;
use common::{assert_close, token_rows, Fixture};

use candle_core::{DType, Device};
use dwd::pipelines::TextEncoder;

/// The reference README's tolerance for text encoders.
const CLIP_TOLERANCE: f32 = 1e-5;

fn fixture() -> Fixture {
    Fixture::new("tiny-sdxl")
}

fn encoder(name: &str) -> TextEncoder {
    TextEncoder::load(&fixture().model_dir().join(name), DType::F32, &Device::Cpu).unwrap()
}

#[test]
fn the_penultimate_hidden_state_matches_transformers() {
    let reference = fixture().tensors("expected.safetensors");
    let ids = token_rows(&reference["clip_ids"]);
    let output = encoder("text_encoder").encode_all(&ids).unwrap();
    assert_close(
        "text_encoder hidden_states[-2]",
        &output.penultimate,
        &reference["te1_penultimate"],
        CLIP_TOLERANCE,
    );
    assert!(
        output.text_embeds.is_none(),
        "a CLIPTextModel has no projection"
    );
}

#[test]
fn the_projected_pooled_output_and_penultimate_state_of_a_projection_model_match() {
    let reference = fixture().tensors("expected.safetensors");
    let ids = token_rows(&reference["clip2_ids"]);
    let output = encoder("text_encoder_2").encode_all(&ids).unwrap();
    assert_close(
        "text_encoder_2 hidden_states[-2]",
        &output.penultimate,
        &reference["te2_penultimate"],
        CLIP_TOLERANCE,
    );
    let text_embeds = output.text_embeds.expect("a projection model projects");
    assert_close(
        "text_encoder_2 text_embeds",
        &text_embeds,
        &reference["te2_text_embeds"],
        CLIP_TOLERANCE,
    );
}

#[test]
fn encode_is_the_last_hidden_state_of_encode_all() {
    let reference = fixture().tensors("expected.safetensors");
    let ids = token_rows(&reference["clip_ids"]);
    let encoder = encoder("text_encoder");
    let all = encoder.encode_all(&ids).unwrap();
    assert_close(
        "last_hidden_state",
        &encoder.encode(&ids).unwrap(),
        &all.last_hidden_state,
        0.0,
    );
}
