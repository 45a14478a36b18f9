//! End-to-end: Stable Diffusion 3 workflows as diffusers-workflow users write them
//! (upstream `examples/archive/sd35.json`: `component_type: "StableDiffusion3Pipeline"`,
//! `torch_dtype: "torch.bfloat16"`, `offload: "model"`), through `dwctl run` and the real
//! daemon on `tests/fixtures/tiny-sd3`: the recorded CFG run reproduces diffusers' image
//! from the reference latents; `"text_encoder_3": null` in `from_pretrained_arguments`
//! (diffusers' `from_pretrained(..., text_encoder_3=None)`) runs without T5 and loads
//! nothing of it; nulling a component SD 3 needs is refused by name.

use dw_tests::{max_level_difference, placements, png_pixels, repo_root, TestDaemon};

fn fixture(path: &str) -> std::path::PathBuf {
    repo_root().join("tests/fixtures").join(path)
}

fn output_paths(run: &dw_tests::Run) -> Vec<String> {
    let summary = run.json();
    summary["outputs"]
        .as_array()
        .unwrap()
        .iter()
        .map(|o| o["path"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn the_sd3_workflow_reproduces_diffusers_image() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-sd3.json", |text| text);
    run.assert_code(0);
    let summary = run.json();
    let ours = &output_paths(&run)[0];
    let diff = max_level_difference(
        &png_pixels(std::path::Path::new(ours)).2,
        &png_pixels(&fixture("tiny-sd3/expected_sd3.png")).2,
    );
    assert!(diff <= 1, "{diff} levels from diffusers");
    // Eight components: three tokenizers, three text encoders, the transformer, the VAE.
    assert_eq!(summary["cache"]["misses"], 8, "{summary}");
}

/// Without T5 (and its tokenizer) six components load; from the seed, two images per
/// prompt, the same both times, and not the image T5 would have given.
#[test]
fn without_text_encoder_3_the_run_loads_no_t5_and_is_deterministic() {
    let daemon = TestDaemon::new();
    let first = daemon.run_edited_example("tiny-sd3-no-t5.json", |text| text);
    first.assert_code(0);
    assert_eq!(first.json()["cache"]["misses"], 6, "{}", first.stdout);
    let second = daemon.run_edited_example("tiny-sd3-no-t5.json", |text| text);
    second.assert_code(0);
    assert_eq!(second.json()["cache"]["misses"], 0, "{}", second.stdout);
    let pixels = |run: &dw_tests::Run| -> Vec<Vec<u8>> {
        output_paths(run)
            .iter()
            .map(|p| png_pixels(std::path::Path::new(p)).2)
            .collect()
    };
    let (a, b) = (pixels(&first), pixels(&second));
    assert_eq!(a.len(), 2, "num_images_per_prompt 2");
    assert_eq!(a, b, "same seed, same images");
    assert_ne!(a[0], a[1], "two draws, two images");

    let with_t5 = daemon.run_edited_example("tiny-sd3-no-t5.json", |text| {
        text.replace(
            "\"text_encoder_3\": null,\n          \"tokenizer_3\": null",
            "\"use_safetensors\": true",
        )
    });
    with_t5.assert_code(0);
    assert_ne!(pixels(&with_t5)[0], a[0], "T5's states change the image");
}

/// A component SD 3 cannot run without is refused by name, with where it is written and
/// what can be left out, before anything loads.
#[test]
fn nulling_a_component_sd3_needs_is_refused_by_name() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-sd3-no-t5.json", |text| {
        text.replace("\"text_encoder_3\": null", "\"text_encoder_2\": null")
    });
    assert_ne!(run.code, 0);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("tiny-sd3-no-t5.json:")
            && text.contains("`text_encoder_2`: null loads the pipeline without it, but a Stable Diffusion 3 pipeline needs it")
            && text.contains("tokenizer_3, text_encoder_3"),
        "{text}"
    );
}

/// A value other than null is a loaded object in Python; the workflow way is a block.
#[test]
fn a_component_in_from_pretrained_arguments_must_be_null() {
    let daemon = TestDaemon::new();
    let run = daemon.run_edited_example("tiny-sd3-no-t5.json", |text| {
        text.replace("\"text_encoder_3\": null", "\"text_encoder_3\": \"t5\"")
    });
    assert_ne!(run.code, 0);
    let text = format!("{}{}", run.stdout, run.stderr);
    assert!(
        text.contains("`text_encoder_3` in `from_pretrained_arguments` can only be null")
            && text.contains("give a `text_encoder_3` block"),
        "{text}"
    );
}

/// `AutoPipelineForImage2Image` on an SD 3 folder is `StableDiffusion3Img2ImgPipeline`;
/// from its seed the run is the same image twice (the posterior sample and the added noise
/// come from the step's generator), 128x128 like its input, and not the input.
#[test]
fn a_seeded_img2img_workflow_resolves_the_auto_class_and_is_deterministic() {
    let daemon = TestDaemon::new();
    let mut images = Vec::new();
    for _ in 0..2 {
        let run = daemon.run_edited_example("tiny-sd3-img2img.json", |text| text);
        run.assert_code(0);
        let (width, height, pixels) = png_pixels(std::path::Path::new(&output_paths(&run)[0]));
        assert_eq!((width, height), (128, 128));
        images.push(pixels);
    }
    assert_eq!(images[0], images[1], "same seed, same image");
    let input = png_pixels(&fixture("tiny-sd3/expected_sd3.png")).2;
    assert_ne!(images[0], input, "the image was denoised");
}

/// `offload` on SD 3 (the example has `"model"`): T5 is placed for each prompt set (the
/// prompts, then the negatives, as diffusers' hooks move it), then the transformer for the
/// steps, never two at once; `"sequential"` (blocks streamed to a GPU) and no offload give
/// the same image bit for bit.
#[test]
fn offload_places_t5_then_the_transformer_and_changes_no_pixel() {
    let daemon = TestDaemon::new();
    let pixels = |run: &dw_tests::Run| {
        run.assert_code(0);
        png_pixels(std::path::Path::new(&output_paths(run)[0])).2
    };
    let model = pixels(&daemon.run_edited_example("tiny-sd3.json", |text| text));
    let order = placements(&daemon.log());
    let expected: Vec<(bool, String)> = [
        (true, "text_encoder_3"),
        (false, "text_encoder_3"),
        (true, "text_encoder_3"),
        (false, "text_encoder_3"),
        (true, "transformer"),
        (false, "transformer"),
    ]
    .iter()
    .map(|(placed, name)| (*placed, name.to_string()))
    .collect();
    assert_eq!(order, expected);

    let sequential = daemon.run_edited_example("tiny-sd3.json", |text| {
        text.replace("\"offload\": \"model\"", "\"offload\": \"sequential\"")
    });
    assert_eq!(pixels(&sequential), model);
    assert_eq!(placements(&daemon.log()).len(), 12);

    let fresh = TestDaemon::new();
    let resident = fresh.run_edited_example("tiny-sd3.json", |text| {
        text.replace(",\n          \"offload\": \"model\"", "")
    });
    assert_eq!(pixels(&resident), model);
    assert!(placements(&fresh.log()).is_empty());
}
