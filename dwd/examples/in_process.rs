//! The in-process baseline for benchmarks: the same pipeline `dwd` runs, loaded and called
//! directly, with no daemon, socket or shared memory. Prints one JSON line per call.
//!
//! Usage: cargo run --release -p dwd --example in_process -- MODEL_DIR SIZE STEPS WARM_RUNS

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use candle_core::{DType, Device};
use dwd::pipelines::{images_to_rgb8, GenerateArgs, StableDiffusionPipeline};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let usage = "usage: in_process MODEL_DIR SIZE STEPS WARM_RUNS";
    let model = PathBuf::from(args.get(1).context(usage)?);
    let size: usize = args.get(2).context(usage)?.parse()?;
    let steps: usize = args.get(3).context(usage)?.parse()?;
    let warm_runs: usize = args.get(4).context(usage)?.parse()?;

    // The same allocator settings as the daemon, so the comparison is like for like.
    dwd::memory::tune_allocator();
    let started = Instant::now();
    let pipeline = StableDiffusionPipeline::load(&model, DType::F32, &Device::Cpu)?;
    let load_ms = started.elapsed().as_millis();
    let generate = GenerateArgs {
        prompts: vec!["a fox".to_string()],
        num_inference_steps: steps,
        height: Some(size),
        width: Some(size),
        scheduler_type: Some("DDIMScheduler".to_string()),
        seed: 1,
        ..GenerateArgs::default()
    };
    for run in 0..=warm_runs {
        let started = Instant::now();
        let images = pipeline.generate(&generate, &mut |_| Ok(()))?;
        let rgb = images_to_rgb8(&images)?;
        std::hint::black_box(rgb);
        let run_ms = started.elapsed().as_millis();
        let kind = if run == 0 { "cold" } else { "warm" };
        let load = if run == 0 { load_ms } else { 0 };
        println!(
            "{{\"kind\": \"{kind}\", \"load_ms\": {load}, \"run_ms\": {run_ms}, \"total_ms\": {}}}",
            load + run_ms
        );
    }
    Ok(())
}
