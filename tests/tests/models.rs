//! End-to-end: where models come from and how a GPU-minded workflow runs on the CPU: a hub
//! id found in the Hugging Face cache offline, `variant` weight files, half precision
//! upcast with a notice, a missing variant named with the places searched, and the tiny
//! SD 2.x (v-prediction) model at a non-square size.

use std::path::{Path, PathBuf};

use dw_tests::{png_pixels, repo_root, TestDaemon};

fn fixture_model(name: &str) -> PathBuf {
    repo_root().join("tests/fixtures").join(name).join("model")
}

/// Copies a model folder, renaming each weight file with `rename`.
fn copy_model(from: &Path, to: &Path, rename: &dyn Fn(&str) -> String) {
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            std::fs::create_dir_all(&target).unwrap();
            copy_model(&entry.path(), &target, rename);
        } else {
            let name = entry.file_name().to_string_lossy().into_owned();
            std::fs::copy(entry.path(), to.join(rename(&name))).unwrap();
        }
    }
}

fn workflow(
    daemon: &TestDaemon,
    name: &str,
    pipeline_extra: &str,
    model: &str,
    arguments: &str,
) -> PathBuf {
    let text = format!(
        r#"{{"id": "{name}", "seed": 3, "steps": [{{"name": "main", "pipeline": {{
            "configuration": {{"component_type": "StableDiffusionPipeline"}},
            "from_pretrained_arguments": {{"model_name": "{model}"{pipeline_extra}}},
            "scheduler": {{"configuration": {{"scheduler_type": "DDIMScheduler"}}}},
            "arguments": {{{arguments}}}}},
            "result": {{"content_type": "image/png", "embed_metadata": true}}}}]}}"#
    );
    let path = daemon.dir.path().join(format!("{name}.json"));
    std::fs::write(&path, text).unwrap();
    path
}

fn run(daemon: &TestDaemon, workflow: &Path, env: &[(&str, &Path)]) -> dw_tests::Run {
    let mut command = daemon.run_command(workflow, &["--json"]);
    command.envs(env.iter().copied());
    dw_tests::Run::of(command.output().unwrap())
}

#[test]
fn a_hub_id_runs_from_the_hugging_face_cache_without_a_network() {
    let daemon = TestDaemon::new();
    let hf_home = daemon.dir.path().join("hf");
    let repo = hf_home.join("hub/models--tiny-org--tiny-sd");
    let snapshot = repo.join("snapshots/0123abcd");
    std::fs::create_dir_all(&snapshot).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "0123abcd").unwrap();
    copy_model(&fixture_model("tiny-sd15"), &snapshot, &|n| n.to_string());
    let flow = workflow(
        &daemon,
        "hub",
        "",
        "tiny-org/tiny-sd",
        r#""prompt": "a fox", "num_inference_steps": 2"#,
    );
    let result = run(&daemon, &flow, &[("HF_HOME", &hf_home)]);
    result.assert_code(0);
    let status = daemon.status();
    assert!(
        status["loaded"][0]["model"]
            .as_str()
            .unwrap()
            .ends_with("snapshots/0123abcd"),
        "{status}"
    );
}

#[test]
fn variant_weights_are_loaded_and_a_missing_variant_is_named() {
    let daemon = TestDaemon::new();
    let model = daemon.dir.path().join("fp16-model");
    std::fs::create_dir_all(&model).unwrap();
    copy_model(&fixture_model("tiny-sd15"), &model, &|n| {
        n.replace(".safetensors", ".fp16.safetensors")
    });
    let args = r#""prompt": "a fox", "num_inference_steps": 2"#;
    let flow = workflow(
        &daemon,
        "variant",
        r#", "variant": "fp16""#,
        model.to_str().unwrap(),
        args,
    );
    run(&daemon, &flow, &[]).assert_code(0);

    let plain = workflow(&daemon, "plain", "", model.to_str().unwrap(), args);
    let result = run(&daemon, &plain, &[]);
    // A missing weight file is `not_found`, which exits 2 like other missing inputs.
    result.assert_code(2);
    assert_eq!(result.json()["error"]["kind"], "not_found");
    let message = result.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains(
            "diffusion_pytorch_model.safetensors or diffusion_pytorch_model.safetensors.index.json"
        ),
        "{message}"
    );
    assert!(
        message.contains(&model.join("text_encoder").display().to_string()),
        "{message}"
    );
    assert!(message.starts_with("step `main`: loading "), "{message}");
}

#[test]
fn a_float16_workflow_runs_on_the_cpu_in_float32_with_a_notice() {
    let daemon = TestDaemon::new();
    let model = fixture_model("tiny-sd15");
    let flow = workflow(
        &daemon,
        "half",
        r#", "torch_dtype": "torch.float16""#,
        model.to_str().unwrap(),
        r#""prompt": "a fox", "num_inference_steps": 2"#,
    );
    let output = daemon
        .command(&[
            "run",
            flow.to_str().unwrap(),
            "-o",
            daemon.output_dir().to_str().unwrap(),
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains(
            "torch.float16 is slow or unsupported on the CPU; running in float32 instead"
        ),
        "{stderr}"
    );
    assert_eq!(daemon.status()["loaded"][0]["dtype"], "f32");
}

#[test]
fn the_tiny_sd2_model_reproduces_diffusers_at_a_non_square_size() {
    let daemon = TestDaemon::new();
    let sd2 = repo_root().join("tests/fixtures/tiny-sd2");
    let latents = sd2.join("latents.safetensors");
    let arguments = format!(
        r#""prompt": "a rusty robot holding a candle on the beach", "negative_prompt": "blurry painting",
           "num_inference_steps": 4, "guidance_scale": 5.0, "height": 64, "width": 48,
           "latents": "{}""#,
        latents.display()
    );
    let flow = workflow(
        &daemon,
        "sd2",
        "",
        fixture_model("tiny-sd2").to_str().unwrap(),
        &arguments,
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    let (width, height, ours) = png_pixels(&daemon.output_dir().join("sd2-main.0-0.0.png"));
    assert_eq!((width, height), (48, 64));
    let (_, _, theirs) = png_pixels(&sd2.join("expected_DDIMScheduler.png"));
    let diff = ours
        .iter()
        .zip(&theirs)
        .map(|(a, b)| a.abs_diff(*b))
        .max()
        .unwrap();
    assert!(diff <= 2, "{diff} levels from diffusers' image");
}

#[test]
fn several_prompts_and_images_per_prompt_make_one_file_each() {
    let daemon = TestDaemon::new();
    let flow = workflow(
        &daemon,
        "many",
        "",
        fixture_model("tiny-sd15").to_str().unwrap(),
        r#""prompt": ["a fox", "a cat"], "num_images_per_prompt": 2, "num_inference_steps": 2"#,
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    let names = result.output_names();
    assert_eq!(
        names,
        [
            "many-main.0-0.0.png",
            "many-main.0-0.1.png",
            "many-main.0-0.2.png",
            "many-main.0-0.3.png"
        ]
    );
    let prompt_of = |i: usize| {
        let chunks = dw_tests::png_text_chunks(&daemon.output_dir().join(&names[i]));
        chunks
            .into_iter()
            .find(|(k, _)| k == "parameters")
            .unwrap()
            .1
            .lines()
            .next()
            .unwrap()
            .to_string()
    };
    assert_eq!(
        [prompt_of(0), prompt_of(1), prompt_of(2), prompt_of(3)],
        ["a fox", "a fox", "a cat", "a cat"]
    );
}

/// A component is found by its name in the folder's `model_index.json`, as diffusers finds
/// it: a folder that lists its `vae` as another class is refused naming both classes, by
/// `validate` before the run and by the daemon before it loads anything.
#[test]
fn a_folder_listing_a_component_as_another_class_is_refused_by_name() {
    let daemon = TestDaemon::new();
    let model = daemon.dir.path().join("odd-vae");
    std::fs::create_dir_all(&model).unwrap();
    copy_model(&fixture_model("tiny-sd15"), &model, &|n| n.to_string());
    let index = model.join("model_index.json");
    let text = std::fs::read_to_string(&index).unwrap();
    std::fs::write(
        &index,
        text.replace("\"AutoencoderKL\"", "\"AutoencoderTiny\""),
    )
    .unwrap();
    let args = r#""prompt": "a fox", "num_inference_steps": 2"#;
    let flow = workflow(&daemon, "odd", "", model.to_str().unwrap(), args);
    let expected = "lists `vae` as `AutoencoderTiny`; a Stable Diffusion `vae` is `AutoencoderKL`";

    let validate = daemon.dwctl(&["validate", flow.to_str().unwrap()]);
    validate.assert_code(2);
    assert!(validate.stderr.contains(expected), "{}", validate.stderr);

    let result = run(&daemon, &flow, &[]);
    result.assert_code(2);
    let summary = result.json();
    assert_eq!(summary["error"]["kind"], "invalid_workflow");
    assert!(
        summary["error"]["message"]
            .as_str()
            .unwrap()
            .contains(expected),
        "{summary}"
    );
    assert_eq!(summary["cache"]["misses"], 0, "nothing was loaded");
}
