//! The Stable Diffusion 3 family: `StableDiffusion3Pipeline` (SD 3 medium, SD 3.5 large,
//! large-turbo and medium) from a diffusers folder with two CLIP encoders with projections,
//! an optional T5 (`text_encoder_3`), the MMDiT `transformer`, a shifted 16-channel `vae`
//! and a flow-match `scheduler`.
//!
//! [`transformer`] is the model.

pub mod transformer;

pub use transformer::{Sd3Config, Sd3Inputs, Sd3Transformer};
