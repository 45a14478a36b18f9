//! End-to-end: FLUX.1 workflows as diffusers-workflow users write them
//! (`examples/flux/FluxDev.json` upstream: `component_type: "FluxPipeline"`,
//! `torch_dtype: "torch.bfloat16"`, `offload: "model"`), through `dwctl run` and the real
//! daemon on `tests/fixtures/tiny-flux`: the recorded run reproduces diffusers' image from
//! the reference latents; a seed alone (no latents file) reproduces the four images
//! diffusers-workflow makes on a CPU machine for two prompts times two images; arguments
//! FLUX does not take are refused by name.

use dw_tests::{max_level_difference, placements, png_pixels, repo_root, TestDaemon};

fn fixture(path: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures").join(path)
}

#[test]
fn the_flux_dev_workflow_reproduces_diffusers_image() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-flux-dev.json", |text| text);
    run.assert_code(0);
    let summary = run.json();
    let ours = summary["outputs"][0]["path"].as_str().unwrap();
    let diff = max_level_difference(
        &png_pixels(std::path::Path::new(ours)).2,
        &png_pixels(&fixture("tiny-flux/expected_flux.png")).2,
    );
    assert!(diff <= 1, "{diff} levels from diffusers");
    // Six components: two tokenizers, two text encoders, the transformer, the VAE.
    assert_eq!(summary["cache"]["misses"], 6, "{summary}");
}

/// diffusers-workflow on a machine without CUDA: one torch CPU generator seeded from the
/// workflow draws the four unpacked initial latents (prompt-major), packed as FLUX packs
/// them (`tests/fixtures/tiny-flux-seeded`, a copy of the shared torch-rng reference).
#[test]
fn a_seed_alone_gives_diffusers_flux_images_for_a_batch_of_prompts() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-flux-seeded.json", |text| text);
    run.assert_code(0);
    let out = daemon.output_dir();
    for k in 0..4 {
        let (_, _, ours) = png_pixels(&out.join(format!("tiny_flux_seeded-txt2img.0-0.{k}.png")));
        let (_, _, theirs) =
            png_pixels(&fixture(&format!("tiny-flux-seeded/shipped_call0_{k}.png")));
        let diff = max_level_difference(&ours, &theirs);
        assert!(diff <= 1, "image {k}: {diff} levels from diffusers");
    }
}

/// An argument of another family (SD's `eta`) is refused by name before anything loads,
/// with the arguments FluxPipeline takes.
#[test]
fn an_argument_flux_does_not_take_is_refused_by_name() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-flux-dev.json", |text| {
        text.replace(
            "\"max_sequence_length\": 32,",
            "\"max_sequence_length\": 32, \"eta\": 0.5,",
        )
    });
    assert_ne!(run.code, 0);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("`eta`") && text.contains("true_cfg_scale"),
        "{text}"
    );
}

/// `AutoPipelineForImage2Image` on a FLUX folder is `FluxImg2ImgPipeline`; from its seed the
/// run is the same image twice (the posterior sample and the added noise come from the
/// step's generator), 128x128 like its input.
#[test]
fn a_seeded_img2img_workflow_resolves_the_auto_class_and_is_deterministic() {
    let daemon = TestDaemon::new();
    let mut images = Vec::new();
    for _ in 0..2 {
        let run = daemon.run_edited_example("tiny-flux-img2img.json", |text| text);
        run.assert_code(0);
        let summary = run.json();
        let path = summary["outputs"][0]["path"].as_str().unwrap().to_string();
        let (width, height, pixels) = png_pixels(std::path::Path::new(&path));
        assert_eq!((width, height), (128, 128));
        images.push(pixels);
    }
    assert_eq!(images[0], images[1], "same seed, same image");
    let input = png_pixels(&fixture("tiny-flux/expected_flux.png")).2;
    assert_ne!(images[0], input, "the image was denoised");
}

/// diffusers resizes the input to `height` x `width`; dw does not resize, so an image of
/// another size is refused naming both sizes and the way to resize it.
#[test]
fn an_img2img_input_of_another_size_is_refused_with_the_size_wanted() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-flux-img2img.json", |text| {
        text.replace("\"width\": 128,", "\"width\": 256,")
    });
    assert_ne!(run.code, 0);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("is 128x128") && text.contains("256x128"),
        "{text}"
    );
}

/// A FLUX.1-Fill-shaped folder made from the tiny model: its transformer's `x_embedder`
/// widened from 64 to 384 input channels (packed latents, masked-image latents, mask), with
/// `out_channels` 64, as FLUX.1-Fill-dev's config has. The extra columns are small fixed
/// values, so the mask and the masked image change the result.
fn fill_model(daemon: &TestDaemon) -> std::path::PathBuf {
    let model = daemon.dir.path().join("tiny-flux-fill");
    dw_tests::copy_dir(&fixture("tiny-flux/model"), &model);
    let weights = model.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let embedder = tensors.tensor("x_embedder.weight").unwrap();
    let (rows, columns) = (embedder.shape()[0], embedder.shape()[1]);
    let mut widened = Vec::with_capacity(rows * 384 * 4);
    for (row, values) in embedder.data().chunks(columns * 4).enumerate() {
        widened.extend_from_slice(values);
        for column in columns..384 {
            let value = ((row * 384 + column) % 7) as f32 * 0.01 - 0.03;
            widened.extend_from_slice(&value.to_le_bytes());
        }
    }
    let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
    for (name, view) in tensors.tensors() {
        let view = match name.as_str() {
            "x_embedder.weight" => {
                safetensors::tensor::TensorView::new(view.dtype(), vec![rows, 384], &widened)
                    .unwrap()
            }
            _ => view,
        };
        views.push((name, view));
    }
    std::fs::write(
        &weights,
        safetensors::tensor::serialize(views, None).unwrap(),
    )
    .unwrap();
    let config = model.join("transformer/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    let text = text
        .replace("\"in_channels\": 64", "\"in_channels\": 384")
        .replace("\"out_channels\": null", "\"out_channels\": 64");
    std::fs::write(&config, text).unwrap();
    model
}

/// A fill workflow: the image and a mask (white: repaint), seeded; the same image twice,
/// another mask another image; the fill model refuses FluxPipeline, and the text-to-image
/// model refuses FluxFillPipeline, each naming the channels and the model to use.
#[test]
fn a_seeded_fill_workflow_repaints_the_masked_part_deterministically() {
    let daemon = TestDaemon::new();
    let model = fill_model(&daemon);
    let image = fixture("tiny-flux/expected_flux.png");
    let write_mask = |name: &str, white_left: bool| {
        let path = daemon.dir.path().join(name);
        let pixels: Vec<u8> = (0..128 * 128)
            .flat_map(|i| {
                let white = (i % 128 < 64) == white_left;
                [if white { 255 } else { 0 }; 3]
            })
            .collect();
        dw_tests::write_png(&path, 128, 128, &pixels);
        path
    };
    let left = write_mask("left.png", true);
    let right = write_mask("right.png", false);
    let run_fill = |class: &str, model: &std::path::Path, mask: Option<&std::path::Path>| {
        let workflow = daemon.dir.path().join("fill.json");
        let inputs = match mask {
            Some(mask) => format!(
                r#""image": "{}", "mask_image": "{}","#,
                image.display(),
                mask.display()
            ),
            None => String::new(),
        };
        let text = format!(
            r#"{{"id": "fill", "seed": 5, "steps": [{{"name": "main", "pipeline": {{
                "configuration": {{"component_type": "{class}"}},
                "from_pretrained_arguments": {{"model_name": "{model}", "torch_dtype": "torch.bfloat16"}},
                "arguments": {{"prompt": "a cat", {inputs}
                    "num_inference_steps": 3, "guidance_scale": 30, "height": 128, "width": 128,
                    "max_sequence_length": 32}}}},
                "result": {{"content_type": "image/png"}}}}]}}"#,
            model = model.display(),
        );
        std::fs::write(&workflow, text).unwrap();
        let out = daemon.output_dir();
        daemon.dwctl(&[
            "run",
            workflow.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
            "--json",
        ])
    };
    let pixels = |run: dw_tests::Run| {
        run.assert_code(0);
        let summary = run.json();
        let path = summary["outputs"][0]["path"].as_str().unwrap().to_string();
        png_pixels(std::path::Path::new(&path)).2
    };
    let first = pixels(run_fill("FluxFillPipeline", &model, Some(&left)));
    let again = pixels(run_fill("FluxFillPipeline", &model, Some(&left)));
    assert_eq!(first, again, "same seed and mask, same image");
    let other = pixels(run_fill("FluxFillPipeline", &model, Some(&right)));
    assert_ne!(first, other, "the mask changes the result");

    let refused = run_fill("FluxPipeline", &model, None);
    let text = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.code != 0 && text.contains("takes 384 input channels"),
        "{text}"
    );
    let refused = run_fill("FluxFillPipeline", &fixture("tiny-flux/model"), Some(&left));
    let text = format!("{}{}", refused.stdout, refused.stderr);
    assert!(
        refused.code != 0 && text.contains("FLUX.1-Fill-dev"),
        "{text}"
    );
}

/// A FLUX.1-schnell-shaped folder made from the tiny model: no guidance embedder
/// (`guidance_embeds: false`, its weights gone) and schnell's shipped scheduler config
/// (static shift 1.0, no dynamic shifting).
fn schnell_model(daemon: &TestDaemon) -> std::path::PathBuf {
    let model = daemon.dir.path().join("tiny-flux-schnell");
    dw_tests::copy_dir(&fixture("tiny-flux/model"), &model);
    let weights = model.join("transformer/diffusion_pytorch_model.safetensors");
    let bytes = std::fs::read(&weights).unwrap();
    let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let kept: Vec<_> = tensors
        .tensors()
        .into_iter()
        .filter(|(name, _)| !name.starts_with("time_text_embed.guidance_embedder."))
        .collect();
    std::fs::write(
        &weights,
        safetensors::tensor::serialize(kept, None).unwrap(),
    )
    .unwrap();
    let config = model.join("transformer/config.json");
    let text = std::fs::read_to_string(&config).unwrap();
    std::fs::write(
        &config,
        text.replace("\"guidance_embeds\": true", "\"guidance_embeds\": false"),
    )
    .unwrap();
    let scheduler = model.join("scheduler/scheduler_config.json");
    let text = std::fs::read_to_string(&scheduler).unwrap();
    let text = text.replace("\"shift\": 3.0", "\"shift\": 1.0").replace(
        "\"use_dynamic_shifting\": true",
        "\"use_dynamic_shifting\": false",
    );
    std::fs::write(&scheduler, text).unwrap();
    model
}

/// A schnell workflow as diffusers-workflow users write one (`FluxPipeline`, bfloat16, few
/// steps, `guidance_scale` 0): it runs; the model has no guidance embedder, so
/// `guidance_scale` changes nothing, and a value other than the default says so.
#[test]
fn a_schnell_workflow_runs_and_ignores_guidance_with_a_notice() {
    let daemon = TestDaemon::new();
    let model = schnell_model(&daemon);
    let run_with = |guidance: &str, out: &str| {
        let text = dw_tests::example_text("tiny-flux-seeded.json")
            .replace(
                &format!("\"{}\"", fixture("tiny-flux/model").display()),
                &format!("\"{}\"", model.display()),
            )
            .replace(
                "\"guidance_scale\": 3.5",
                &format!("\"guidance_scale\": {guidance}"),
            )
            .replace(
                "\"num_images_per_prompt\": 2",
                "\"num_images_per_prompt\": 1",
            );
        let workflow = daemon.dir.path().join("schnell.json");
        std::fs::write(&workflow, text).unwrap();
        let out = daemon.dir.path().join(out);
        let run = daemon.dwctl(&[
            "run",
            workflow.to_str().unwrap(),
            "-o",
            out.to_str().unwrap(),
        ]);
        run.assert_code(0);
        let (_, _, pixels) = png_pixels(&out.join("tiny_flux_seeded-txt2img.0-0.0.png"));
        (run, pixels)
    };
    let (zero, zero_pixels) = run_with("0.0", "zero");
    assert!(
        zero.stderr.contains("`guidance_scale` 0 has no effect"),
        "{}",
        zero.stderr
    );
    let (_, five_pixels) = run_with("5.0", "five");
    assert_eq!(zero_pixels, five_pixels, "guidance is ignored");
}

/// `offload: "model"` (the example has it): T5 and the transformer are loaded to host
/// memory and placed on the device one at a time, T5 for the prompts, then the
/// transformer for the steps, as diffusers' `enable_model_cpu_offload` moves them; the
/// image is the one of a run without offload, bit for bit, and so is `"sequential"`'s
/// (whose transformer blocks stream to a GPU one at a time; `parity_flux` checks the
/// streamed transformer). On the CPU the placements save nothing (host and device memory
/// are one) and the run says so, but they run, and are logged, in the order a GPU would
/// see them.
#[test]
fn offload_places_t5_then_the_transformer_one_at_a_time_and_changes_no_pixel() {
    let daemon = TestDaemon::new();
    let run = |daemon: &TestDaemon, edit: &dyn Fn(String) -> String| {
        let workflow = daemon.dir.path().join("flux-dev.json");
        std::fs::write(
            &workflow,
            edit(dw_tests::example_text("tiny-flux-dev.json")),
        )
        .unwrap();
        let run = dw_tests::Run::of(daemon.run_command(&workflow, &[]).output().unwrap());
        run.assert_code(0);
        let output = daemon.output_dir().join("tiny_flux_dev-txt2img.0-0.0.png");
        (run, png_pixels(&output).2)
    };
    let (offloaded, offloaded_pixels) = run(&daemon, &|text| text);
    assert!(
        offloaded
            .stderr
            .contains("`offload: \"model\"` saves no memory on cpu"),
        "{}",
        offloaded.stderr
    );
    let log = daemon.log();
    let order = placements(&log);
    let expected: Vec<(bool, String)> = [
        (true, "text_encoder_2"),
        (false, "text_encoder_2"),
        (true, "transformer"),
        (false, "transformer"),
    ]
    .iter()
    .map(|(placed, name)| (*placed, name.to_string()))
    .collect();
    assert_eq!(order, expected, "{log}");
    let status = daemon.status();
    let loaded = status["loaded"].as_array().unwrap();
    let device_of = |component: &str| {
        loaded
            .iter()
            .find(|c| c["component_type"] == component)
            .map(|c| c["device"].as_str().unwrap_or_default().to_string())
            .unwrap_or_default()
    };
    assert_eq!(
        device_of("transformer"),
        "cpu (offloaded; runs on cpu)",
        "{status}"
    );
    assert_eq!(device_of("text_encoder_2"), "cpu (offloaded; runs on cpu)");
    assert_eq!(device_of("vae"), "cpu");

    // "sequential" places the same way here (its blocks stream only to a GPU), from the
    // same host-held components.
    let (sequential, sequential_pixels) = run(&daemon, &|text| {
        text.replace("\"offload\": \"model\"", "\"offload\": \"sequential\"")
    });
    assert!(
        sequential
            .stderr
            .contains("`offload: \"sequential\"` saves no memory on cpu"),
        "{}",
        sequential.stderr
    );
    let order = placements(&daemon.log());
    assert_eq!(order[4..], expected[..], "{order:?}");
    assert_eq!(sequential_pixels, offloaded_pixels);

    // `exclude_from_cpu_offload` keeps the transformer resident: only T5 moves.
    let (_, kept_pixels) = run(&daemon, &|text| {
        text.replace(
            "\"offload\": \"model\"",
            "\"offload\": \"sequential\", \"exclude_from_cpu_offload\": [\"transformer\"]",
        )
    });
    let order = placements(&daemon.log());
    assert_eq!(order[8..], expected[..2], "{order:?}");
    assert_eq!(kept_pixels, offloaded_pixels);

    let fresh = TestDaemon::new();
    let (resident, resident_pixels) = run(&fresh, &|text| {
        text.replace(",\n          \"offload\": \"model\"", "")
    });
    assert!(!resident.stderr.contains("offload"), "{}", resident.stderr);
    assert!(placements(&fresh.log()).is_empty());
    assert_eq!(offloaded_pixels, resident_pixels);
}
