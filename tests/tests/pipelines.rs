//! End-to-end: the pipelines users run, through `dwctl run` and the real daemon: a run
//! from the reference latents reproduces diffusers' image, a checkpoint's own scheduler is
//! used when the workflow names none, latents can be written instead of images, and a
//! two-step workflow refines its first step's image with img2img.

use std::path::Path;

use dw_tests::{max_level_difference, png_pixels, repo_root, TestDaemon};

fn fixture(relative: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures").join(relative)
}

fn example(name: &str) -> String {
    repo_root()
        .join("examples")
        .join(name)
        .display()
        .to_string()
}

#[test]
fn a_run_from_the_reference_latents_reproduces_diffusers_images_for_each_scheduler() {
    let daemon = TestDaemon::new();
    for scheduler in [
        "DDIMScheduler",
        "EulerDiscreteScheduler",
        "DPMSolverMultistepScheduler",
    ] {
        let out = daemon.output_dir().join(scheduler);
        let run = daemon.dwctl(&[
            "run",
            &example("tiny-sd-reference.json"),
            &format!("scheduler={scheduler}"),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ]);
        run.assert_code(0);
        let path = out.join("tiny_sd_reference-main.0-0.0.png");
        let (_, _, ours) = png_pixels(&path);
        let (_, _, theirs) = png_pixels(&fixture(&format!("tiny-sd15/expected_{scheduler}.png")));
        let diff = max_level_difference(&ours, &theirs);
        assert!(
            diff <= 2,
            "{scheduler}: {diff} levels from diffusers' image"
        );
    }
}

#[test]
fn output_type_latent_writes_the_final_latents_as_safetensors() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-sd-reference.json").replace(
        "\"guidance_scale\": 7.5,",
        "\"guidance_scale\": 7.5, \"output_type\": \"{latent}\",",
    );
    let workflow = daemon.dir.path().join("latent.json");
    std::fs::write(&workflow, text).unwrap();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        daemon.output_dir().to_str().unwrap(),
        "--json",
    ]);
    run.assert_code(0);
    let summary = run.json();
    let output = &summary["outputs"][0];
    assert_eq!(output["content_type"], "application/x-safetensors");
    let path = Path::new(output["path"].as_str().unwrap());
    assert!(
        path.ends_with("tiny_sd_reference-main.0-0.0.safetensors"),
        "{}",
        path.display()
    );
    let bytes = std::fs::read(path).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let latents = tensors.tensor("latents").unwrap();
    assert_eq!(latents.shape(), &[1, 4, 32, 32]);
    assert_eq!(
        (output["width"].as_u64(), output["height"].as_u64()),
        (Some(32), Some(32))
    );
}

#[test]
fn a_two_step_workflow_refines_the_first_image_with_img2img() {
    let daemon = TestDaemon::new();
    let run = daemon.dwctl(&[
        "run",
        &example("tiny-sd-refine.json"),
        "-o",
        daemon.output_dir().to_str().unwrap(),
        "--json",
    ]);
    run.assert_code(0);
    let summary = run.json();
    let outputs = summary["outputs"].as_array().unwrap();
    let names: Vec<&str> = outputs
        .iter()
        .map(|o| {
            Path::new(o["path"].as_str().unwrap())
                .file_name()
                .unwrap()
                .to_str()
                .unwrap()
        })
        .collect();
    assert_eq!(
        names,
        [
            "tiny_sd_refine-generate.0-0.0.png",
            "tiny_sd_refine-refine.1-0.0.jpg"
        ]
    );
    assert_eq!(
        summary["cache"]["misses"], 4,
        "the img2img step reuses the first step's components"
    );
    assert_eq!(summary["cache"]["hits"], 4);
    let jpeg = std::fs::read(outputs[1]["path"].as_str().unwrap()).unwrap();
    assert_eq!(&jpeg[..2], &[0xFF, 0xD8]);
}

#[test]
fn a_checkpoint_without_a_scheduler_override_runs_with_its_own_pndm_scheduler() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-sd-reference.json").replace(
            "\"scheduler\": {\n          \"configuration\": {\n            \"scheduler_type\": \"variable:scheduler\"\n          }\n        },\n",
            "",
        )
        .replace("\"variables\": {\n    \"scheduler\": \"DDIMScheduler\"\n  },\n", "");
    assert!(!text.contains("scheduler"), "{text}");
    let workflow = daemon.dir.path().join("pndm.json");
    std::fs::write(&workflow, text).unwrap();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        daemon.output_dir().to_str().unwrap(),
        "--json",
    ]);
    run.assert_code(0);
    let path = daemon.output_dir().join("tiny_sd_reference-main.0-0.0.png");
    let chunks = dw_tests::png_text_chunks(&path);
    let parameters = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(parameters.contains("Sampler: PLMS"), "{parameters}");
}

#[test]
fn latents_of_the_wrong_shape_exit_2_naming_both_shapes() {
    let daemon = TestDaemon::new();
    let text = dw_tests::example_text("tiny-sd-reference.json").replace(
        "\"guidance_scale\": 7.5,",
        "\"guidance_scale\": 7.5, \"height\": 32, \"width\": 32,",
    );
    let workflow = daemon.dir.path().join("shape.json");
    std::fs::write(&workflow, text).unwrap();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        daemon.output_dir().to_str().unwrap(),
    ]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("[1, 4, 16, 16]") && run.stderr.contains("[1, 4, 32, 32]"),
        "{}",
        run.stderr
    );
}

/// diffusers-workflow on a machine without CUDA: the step's seed (42) seeds one torch CPU
/// generator, which draws the four initial latents of two prompts times two images
/// (prompt-major) and, with Euler ancestral, a noise per step. From the seed alone — no
/// latents file — every image is diffusers' (`tests/fixtures/tiny-sd15-seeded`, a copy of
/// the shared torch-rng reference's PNGs) within one level.
#[test]
fn a_seed_alone_gives_diffusers_images_for_a_batch_of_prompts() {
    let daemon = TestDaemon::new();
    let model = fixture("tiny-sd15/model");
    for (case, scheduler) in [
        ("shipped", String::new()),
        (
            "EulerAncestralDiscreteScheduler",
            r#""scheduler": {"configuration": {"scheduler_type": "EulerAncestralDiscreteScheduler"}},"#
                .to_string(),
        ),
    ] {
        let workflow = daemon.dir.path().join(format!("{case}.json"));
        let text = r#"{"id": "seeded", "seed": 42, "steps": [{"name": "main", "pipeline": {
            "configuration": {"component_type": "StableDiffusionPipeline"},
            "from_pretrained_arguments": {"model_name": "MODEL"}, SCHEDULER
            "arguments": {"prompt": ["A photo of a cat sitting on the mat, rusty robot!",
                "a watercolor painting of a lighthouse on a rocky cliff at sunset"],
                "num_images_per_prompt": 2, "num_inference_steps": 4, "guidance_scale": 7.5}},
            "result": {"content_type": "image/png"}}]}"#
            .replace("MODEL", model.to_str().unwrap())
            .replace("SCHEDULER", &scheduler);
        std::fs::write(&workflow, text).unwrap();
        let out = daemon.output_dir().join(case);
        let run = daemon.dwctl(&["run", workflow.to_str().unwrap(), "-o", out.to_str().unwrap()]);
        run.assert_code(0);
        for k in 0..4 {
            let (_, _, ours) = png_pixels(&out.join(format!("seeded-main.0-0.{k}.png")));
            let (_, _, theirs) =
                png_pixels(&fixture(&format!("tiny-sd15-seeded/{case}_call0_{k}.png")));
            let diff = max_level_difference(&ours, &theirs);
            assert!(diff <= 1, "{case} image {k}: {diff} levels from diffusers");
        }
    }
}
