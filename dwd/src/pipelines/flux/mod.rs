//! The FLUX.1 family: `FluxPipeline` from a diffusers folder with `tokenizer`/`text_encoder`
//! (CLIP, whose pooled output conditions every block), `tokenizer_2`/`text_encoder_2` (T5,
//! whose states are the text tokens), `transformer`, `vae` (16 channels, shifted and
//! scaled latents) and `scheduler` (flow matching).
//!
//! [`transformer`] is the model, built from [`blocks`] and [`embeddings`].

pub mod blocks;
pub mod embeddings;
pub mod transformer;

pub use transformer::{FluxConfig, FluxInputs, FluxTransformer};
