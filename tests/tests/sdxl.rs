//! End-to-end: SDXL workflows as diffusers-workflow users write them
//! (`examples/archive/sdxl.json`, `sdxl_refiner.json` upstream), through `dwctl run` and
//! the real daemon on `tests/fixtures/tiny-sdxl`: the recorded Euler runs reproduce
//! diffusers' images from the reference latents; a base step hands its latents to a
//! refiner step (`denoising_end` / `denoising_start`, `output_type: "{latent}"`,
//! `previous_result`) sharing `text_encoder_2` and the VAE, which load once; the seeded
//! Turbo (`AutoPipelineForText2Image`, Euler a) and refiner img2img runs reproduce
//! diffusers' images; arguments SDXL does not take, or takes in another shape, are refused
//! by name.

use std::path::Path;

use dw_tests::{max_level_difference, png_pixels, repo_root, TestDaemon};

fn example(name: &str) -> String {
    repo_root()
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

/// The largest difference between our PNG and diffusers', in 8-bit levels.
fn levels_from_reference(ours: &Path, reference: &str) -> u8 {
    let reference = repo_root().join("tests/fixtures/tiny-sdxl").join(reference);
    max_level_difference(&png_pixels(ours).2, &png_pixels(&reference).2)
}

/// Writes the text of an example workflow as `name` in the daemon's folder, its relative
/// model paths made absolute.
fn write_workflow(daemon: &TestDaemon, name: &str, text: &str) -> std::path::PathBuf {
    let path = daemon.dir.path().join(name);
    let text = text.replace(
        "\"../tests/",
        &format!("\"{}/tests/", repo_root().display()),
    );
    std::fs::write(&path, text).unwrap();
    path
}

/// Runs an example workflow's text and gives the summary.
fn run_text(daemon: &TestDaemon, name: &str, text: &str) -> serde_json::Value {
    let workflow = write_workflow(daemon, name, text);
    let out = daemon.output_dir();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    run.assert_code(0);
    run.json()
}

fn output_path(summary: &serde_json::Value, index: usize) -> std::path::PathBuf {
    summary["outputs"][index]["path"].as_str().unwrap().into()
}

#[test]
fn the_recorded_euler_runs_reproduce_diffusers_images() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-sdxl-reference.json");
    let summary = run_text(&daemon, "zeros.json", &text);
    let diff = levels_from_reference(&output_path(&summary, 0), "expected_euler.png");
    assert!(
        diff <= 1,
        "no negative prompt: {diff} levels from diffusers"
    );

    let with_negative = text.replace(
        "\"guidance_scale\": 5.0,",
        "\"guidance_scale\": 5.0, \"negative_prompt\": \"blurry, low quality\",",
    );
    let summary = run_text(&daemon, "negative.json", &with_negative);
    let diff = levels_from_reference(&output_path(&summary, 0), "expected_euler_negative.png");
    assert!(diff <= 1, "negative prompt: {diff} levels from diffusers");
    assert_eq!(
        summary["cache"]["misses"], 0,
        "the second run is warm: {summary}"
    );
}

#[test]
fn a_base_step_hands_its_latents_to_a_refiner_that_shares_its_components() {
    let daemon = TestDaemon::new();
    let summary = run_text(
        &daemon,
        "refiner.json",
        &dw_tests::example_text("tiny-sdxl-refiner.json"),
    );
    let outputs = summary["outputs"].as_array().unwrap();
    assert_eq!(
        outputs.len(),
        1,
        "the base step's latents are not written: {summary}"
    );
    let (width, height, _) = png_pixels(&output_path(&summary, 0));
    assert_eq!((width, height), (128, 128));
    // Base: both tokenizers and encoders, unet, vae. Refiner: its own tokenizer_2 and
    // unet; text_encoder_2 and the vae are the base's.
    assert_eq!(summary["cache"]["misses"], 8, "{summary}");
    assert_eq!(summary["cache"]["hits"], 2, "{summary}");
    let loaded = daemon.status()["loaded"].as_array().unwrap().clone();
    for shared in ["text_encoder_2", "vae"] {
        let copies = loaded
            .iter()
            .filter(|c| c["component_type"] == shared)
            .count();
        assert_eq!(copies, 1, "`{shared}` is loaded once");
    }
    let unets = loaded.iter().filter(|c| c["component_type"] == "unet");
    assert_eq!(unets.count(), 2, "base and refiner UNets");
}

/// Turbo draws a noise per ancestral step after the reference latents, the refiner a VAE
/// posterior sample and img2img's added noise: from the workflow's seed, through torch's
/// generator, they are the draws diffusers made, so the images match too.
#[test]
fn seeded_turbo_and_refiner_runs_draw_diffusers_noise_and_match_its_images() {
    let daemon = TestDaemon::new();
    for (example, reference) in [
        ("tiny-sdxl-turbo.json", "expected_turbo.png"),
        ("tiny-sdxl-img2img.json", "expected_refiner.png"),
    ] {
        let summary = run_text(&daemon, example, &dw_tests::example_text(example));
        let diff = levels_from_reference(&output_path(&summary, 0), reference);
        assert!(diff <= 1, "{example}: {diff} levels from diffusers");
    }
}

#[test]
fn the_turbo_workflow_resolves_the_auto_class_and_runs_two_steps() {
    let daemon = TestDaemon::new();
    let run = daemon.dwctl(&[
        "run",
        &example("tiny-sdxl-turbo.json"),
        "-o",
        daemon.output_dir().to_str().unwrap(),
    ]);
    run.assert_code(0);
    assert!(
        run.stderr.contains("[main] denoising 1/2"),
        "two steps: {}",
        run.stderr
    );
}

#[test]
fn arguments_sdxl_takes_in_another_shape_are_refused_by_name() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-sdxl-reference.json");
    let prompt =
        "\"prompt\": \"a watercolor painting of a lighthouse on a rocky cliff at sunset\",";
    for (replacement, message) in [
        (
            "\"prompt\": \"a lighthouse\", \"original_size\": 1024,",
            "`original_size` must be two whole numbers from 1 to 16384, as [a, b], found 1024",
        ),
        (
            "\"prompt\": \"a lighthouse\", \"strength\": 0.5,",
            "unknown or unsupported argument `strength` for StableDiffusionXLPipeline",
        ),
        (
            "\"prompt\": [\"a\", \"b\"], \"prompt_2\": \"c\",",
            "prompt_2: is one text, for 2 prompts",
        ),
    ] {
        let workflow = write_workflow(&daemon, "bad.json", &text.replace(prompt, replacement));
        let run = daemon.dwctl(&["run", workflow.to_str().unwrap()]);
        run.assert_code(2);
        assert!(
            run.stderr.contains(message),
            "{replacement}: {}",
            run.stderr
        );
    }
}
