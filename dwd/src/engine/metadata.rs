//! What a pipeline run records about itself: dw's JSON (model, arguments, seed and its
//! generator, scheduler) and, for each image, the AUTOMATIC1111 `parameters` text image tools read.

use serde_json::json;

use super::context::StepContext;
use super::pipeline::PreparedPipeline;
use crate::fanout::Run;
use crate::pipelines::Request;
use crate::saving::Metadata;

/// The scheduler a step names when it names none and its checkpoint ships none.
const FALLBACK_SCHEDULER: &str = "DDIMScheduler";

/// The seed a run drew from, and which of torch's generators drew it.
pub(super) struct Seeding {
    pub seed: u64,
    pub generator: String,
}

/// Metadata of one pipeline run, with a `parameters` text for each of `sizes` (the images'
/// width and height, in output order).
pub(super) fn pipeline_metadata(
    context: &StepContext<'_>,
    prepared: &PreparedPipeline,
    request: &Request,
    seeding: &Seeding,
    run: &Run,
    sizes: &[(usize, usize)],
) -> Metadata {
    let seed = seeding.seed;
    let scheduler_type = request
        .scheduler
        .as_ref()
        .map(|s| s.scheduler_type.as_str())
        .or(prepared.pipeline.default_scheduler())
        .unwrap_or(FALLBACK_SCHEDULER)
        .to_string();
    let mut metadata = context.metadata(json!({
        "model_name": prepared.model_name,
        "arguments": run.arguments,
        "seed": seed,
        "generator": seeding.generator,
        "scheduler": scheduler_type,
    }));
    let arguments = &request.arguments;
    let per_prompt = request.integer("num_images_per_prompt", 1).max(1);
    metadata.parameters = sizes
        .iter()
        .enumerate()
        .map(|(i, &(width, height))| {
            let prompt = arguments.prompts().get(i / per_prompt);
            a1111_parameters(&Generation {
                prompt: prompt.map(String::as_str).unwrap_or(""),
                negative: arguments.text("negative_prompt").unwrap_or(""),
                steps: request.integer("num_inference_steps", 0),
                scheduler_type: &scheduler_type,
                cfg: request.number("guidance_scale", 0.0),
                seed,
                width,
                height,
                model: &prepared.model_name,
            })
        })
        .collect();
    metadata
}

/// What an image's AUTOMATIC1111 `parameters` text records.
struct Generation<'a> {
    prompt: &'a str,
    negative: &'a str,
    steps: usize,
    scheduler_type: &'a str,
    cfg: f64,
    seed: u64,
    width: usize,
    height: usize,
    model: &'a str,
}

/// The AUTOMATIC1111 `parameters` text that image tools read.
fn a1111_parameters(g: &Generation<'_>) -> String {
    format!(
        "{}\nNegative prompt: {}\nSteps: {}, Sampler: {}, CFG scale: {}, Seed: {}, Size: {}x{}, Model: {}",
        g.prompt,
        g.negative,
        g.steps,
        sampler_name(g.scheduler_type),
        g.cfg,
        g.seed,
        g.width,
        g.height,
        g.model
    )
}

/// AUTOMATIC1111's name for a diffusers scheduler class.
fn sampler_name(scheduler_type: &str) -> &str {
    match scheduler_type {
        "DDIMScheduler" => "DDIM",
        "PNDMScheduler" => "PLMS",
        "EulerDiscreteScheduler" => "Euler",
        "EulerAncestralDiscreteScheduler" => "Euler a",
        "DPMSolverMultistepScheduler" => "DPM++ 2M",
        "UniPCMultistepScheduler" => "UniPC",
        "LCMScheduler" => "LCM",
        other => other,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parameters_follow_the_automatic1111_layout() {
        let text = a1111_parameters(&Generation {
            prompt: "a fox",
            negative: "blurry",
            steps: 4,
            scheduler_type: "DDIMScheduler",
            cfg: 7.5,
            seed: 42,
            width: 64,
            height: 48,
            model: "tiny",
        });
        assert_eq!(
            text,
            "a fox\nNegative prompt: blurry\nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x48, Model: tiny"
        );
    }
}
