//! End-to-end: diffusers-workflow's format as its users write it, through the real
//! binaries on the tiny SD 1.5 model. Each test names the diffusers-workflow source
//! (dkackman/diffusers-workflow) whose behaviour it pins down.

use std::path::{Path, PathBuf};

use dw_tests::{repo_root, Run, TestDaemon};
use serde_json::Value;

fn model() -> String {
    repo_root()
        .join("tests/fixtures/tiny-sd15/model")
        .display()
        .to_string()
}

/// Writes `text` (with `MODEL` standing for the tiny model's folder) as `name` in the
/// test's folder.
fn write(daemon: &TestDaemon, name: &str, text: &str) -> PathBuf {
    let path = daemon.dir.path().join(name);
    std::fs::write(&path, text.replace("MODEL", &model())).unwrap();
    path
}

fn run(daemon: &TestDaemon, workflow: &Path, extra: &[&str]) -> Run {
    daemon.run_json(workflow, extra)
}

/// The names of the files a run wrote, in order.
fn written(run: &Run) -> Vec<String> {
    run.output_names()
}

fn read_json(daemon: &TestDaemon, name: &str) -> Value {
    let text = std::fs::read_to_string(daemon.output_dir().join(name)).unwrap();
    serde_json::from_str(&text).unwrap()
}

const PIPELINE: &str = r#""configuration": {"component_type": "StableDiffusionPipeline"},
    "from_pretrained_arguments": {"model_name": "MODEL"},
    "scheduler": {"configuration": {"scheduler_type": "DDIMScheduler"}}"#;

// dw/previous_results.py get_iterations: one run per artifact of the referenced step;
// dw/result.py save: `{id}-{step}.{step_index}-{run}.{artifact}{ext}`; dw/step.py: a step
// without `result` is kept for later steps but never written.
#[test]
fn two_images_make_two_img2img_runs_and_an_unsaved_step_feeds_the_next() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "fan.json",
        &r#"{"id": "fan", "seed": 5, "steps": [
          {"name": "gen", "pipeline": {PIPELINE,
            "arguments": {"prompt": "a fox", "num_inference_steps": 2, "num_images_per_prompt": 2}}},
          {"name": "refine", "pipeline": {
            "configuration": {"component_type": "StableDiffusionImg2ImgPipeline"},
            "from_pretrained_arguments": {"model_name": "MODEL"},
            "arguments": {"prompt": "a fox", "image": "previous_result:gen", "strength": 0.5, "num_inference_steps": 4}},
           "result": {"content_type": "image/png"}}]}"#
            .replace("PIPELINE", PIPELINE),
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    assert_eq!(
        written(&result),
        ["fan-refine.1-0.0.png", "fan-refine.1-1.0.png"]
    );
    assert_eq!(
        result.json()["cache"]["misses"],
        4,
        "one model, loaded once"
    );
}

// tests/test_previous_results.py: several references multiply, the first varying
// slowest; dw/result.py writes a JSON result as one `-{run}.json` file per run.
#[test]
fn references_multiply_in_written_order_and_json_results_are_one_file_per_run() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "product.json",
        r#"{"id": "product", "steps": [
          {"name": "systems", "task": {"command": "gather_inputs", "inputs": ["s0", "s1"]}},
          {"name": "users", "task": {"command": "gather_inputs", "inputs": ["u0", "u1", "u2"]}},
          {"name": "chat", "task": {"command": "format_chat_message", "arguments": {
            "system_prompt": "previous_result:systems", "user_message": "previous_result:users"}},
           "result": {"content_type": "application/json"}}]}"#,
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    let names = written(&result);
    assert_eq!(names.len(), 6);
    assert_eq!(names[0], "product-chat.2-0.json");
    let pair = |i: usize| {
        let chat = read_json(&daemon, &format!("product-chat.2-{i}.json"));
        (
            chat["text_inputs"][0]["content"]
                .as_str()
                .unwrap()
                .to_string(),
            chat["text_inputs"][1]["content"]
                .as_str()
                .unwrap()
                .to_string(),
        )
    };
    assert_eq!(pair(0), ("s0".into(), "u0".into()));
    assert_eq!(pair(1), ("s0".into(), "u1".into()));
    assert_eq!(pair(3), ("s1".into(), "u0".into()));
    assert_eq!(pair(5), ("s1".into(), "u2".into()));
    assert_eq!(result.json()["cache"]["misses"], 0, "tasks load no model");
}

// dw/variables.py get_value: a list splits on commas, booleans take yes/no, numbers
// convert by the default's type; dw/variables.py replace_variables: whole values only.
#[test]
fn command_line_values_convert_by_the_defaults_type() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "vars.json",
        r#"{"id": "vars", "variables": {"tags": ["x"], "fast": false, "n": 1, "label": "a"},
          "steps": [{"name": "echo", "task": {"command": "gather_inputs", "arguments": {
            "tags": "variable:tags", "fast": "variable:fast", "n": "variable:n",
            "text": "label is variable:label"}},
           "result": {"content_type": "application/json"}}]}"#,
    );
    let result = run(&daemon, &flow, &["tags=a fox, a cat", "fast=yes", "n=3"]);
    result.assert_code(0);
    let echoed = read_json(&daemon, "vars-echo.0-0.json");
    assert_eq!(echoed["tags"], serde_json::json!(["a fox", "a cat"]));
    assert_eq!(echoed["fast"], true);
    assert_eq!(echoed["n"], 3);
    assert_eq!(echoed["text"], "label is variable:label");

    let bad = run(&daemon, &flow, &["n=2.5"]);
    bad.assert_code(2);
    assert!(
        bad.stderr
            .contains("variable `n` is an integer (default 1); the given `2.5` is not an integer"),
        "{}",
        bad.stderr
    );
}

// dw/workflow.py: a pipeline_reference runs the named step's loaded pipeline again.
#[test]
fn a_pipeline_reference_runs_the_earlier_pipeline_without_loading_it_again() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "reference.json",
        &r#"{"id": "ref", "seed": 1, "steps": [
          {"name": "first", "pipeline": {PIPELINE,
            "arguments": {"prompt": "a fox", "num_inference_steps": 2}},
           "result": {"content_type": "image/png"}},
          {"name": "again", "pipeline_reference": {"reference_name": "first",
            "arguments": {"prompt": "a cat", "num_inference_steps": 2}},
           "result": {"content_type": "image/jpeg"}}]}"#
            .replace("PIPELINE", PIPELINE),
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    assert_eq!(
        written(&result),
        ["ref-first.0-0.0.png", "ref-again.1-0.0.jpg"]
    );
    assert_eq!(result.json()["cache"]["misses"], 4);
    assert_eq!(result.json()["cache"]["hits"], 0);
}

// dw/workflow.py: a `workflow` step runs the child with its arguments as variables; the
// child writes under its own id, and its last step's results are the step's own.
#[test]
fn a_child_workflow_writes_under_its_own_id_and_again_under_the_parent_step() {
    let daemon = TestDaemon::new();
    write(
        &daemon,
        "child.json",
        r#"{"id": "child", "variables": {"who": "nobody"}, "steps": [
          {"name": "greet", "task": {"command": "extract_sections", "arguments": {
            "text": "variable:who", "sections": []}},
           "result": {"content_type": "text/plain"}}]}"#,
    );
    let parent = write(
        &daemon,
        "parent.json",
        r#"{"id": "parent", "steps": [
          {"name": "names", "task": {"command": "gather_inputs", "inputs": ["fox", "cat"]}},
          {"name": "sub", "workflow": {"path": "child.json", "arguments": {"who": "previous_result:names"}},
           "result": {"content_type": "text/plain"}}]}"#,
    );
    let result = run(&daemon, &parent, &[]);
    result.assert_code(0);
    assert_eq!(
        written(&result),
        [
            "child-greet.0-0.0.txt",
            "parent-sub.1-0.0.txt",
            "child-greet.0-0.0.txt",
            "parent-sub.1-1.0.txt"
        ]
    );
    let text = |name: &str| std::fs::read_to_string(daemon.output_dir().join(name)).unwrap();
    assert_eq!(text("parent-sub.1-0.0.txt"), "fox");
    assert_eq!(text("parent-sub.1-1.0.txt"), "cat");
    assert_eq!(
        text("child-greet.0-0.0.txt"),
        "cat",
        "the last run wins, as in dw"
    );
}

/// `dwctl validate` on `text`: exit code and stderr.
fn validate(daemon: &TestDaemon, text: &str) -> Run {
    let flow = write(daemon, "check.json", text);
    daemon.dwctl(&["validate", flow.to_str().unwrap()])
}

// dw/workflow_schema.json: every key has a fate; what dw cannot do is refused by name.
#[test]
fn what_dw_does_not_build_is_refused_by_name_and_runtime_keys_are_noted() {
    let daemon = TestDaemon::new();
    let flux = validate(
        &daemon,
        r#"{"id": "f", "steps": [{"name": "s", "pipeline": {
          "configuration": {"component_type": "FluxKontextPipeline", "offload": "model"},
          "from_pretrained_arguments": {"model_name": "black-forest-labs/FLUX.1-Kontext-dev"},
          "arguments": {"prompt": "x"}}}]}"#,
    );
    flux.assert_code(2);
    assert!(
        flux.stderr
            .contains("pipeline class `FluxKontextPipeline` is not supported yet"),
        "{}",
        flux.stderr
    );

    let lora = validate(
        &daemon,
        r#"{"id": "l", "steps": [{"name": "s", "pipeline": {
          "configuration": {"component_type": "StableDiffusion3Pipeline"},
          "from_pretrained_arguments": {"model_name": "stabilityai/stable-diffusion-3.5-medium"},
          "loras": [{"model_name": "x", "revision": "main"}], "arguments": {"prompt": "x"}}}]}"#,
    );
    lora.assert_code(2);
    assert!(
        lora.stderr.contains(
            "check.json:4:41: `revision` is not supported: dw reads the snapshot the hub cache's refs/main names and never downloads"
        ),
        "{}",
        lora.stderr
    );

    let video = validate(
        &daemon,
        r#"{"id": "v", "steps": [{"name": "s", "task": {"command": "gather_inputs", "inputs": [1]},
          "result": {"content_type": "video/mp4"}}]}"#,
    );
    video.assert_code(2);
    assert!(
        video
            .stderr
            .contains("content_type `video/mp4` is not supported"),
        "{}",
        video.stderr
    );

    let tuned = validate(
        &daemon,
        r#"{"id": "t", "steps": [{"name": "s", "pipeline": {
          "configuration": {"component_type": "StableDiffusionPipeline", "enable_attention_slicing": true,
            "unet": {"attn_processor_type": "diffusers.models.attention_processor.AttnProcessor2_0"}},
          "from_pretrained_arguments": {"model_name": "MODEL", "safety_checker": null},
          "arguments": {"prompt": "x"}}}]}"#,
    );
    tuned.assert_code(0);
    assert!(
        tuned
            .stderr
            .contains("note: `enable_attention_slicing` only tunes PyTorch's runtime"),
        "{}",
        tuned.stderr
    );
    assert!(
        tuned
            .stderr
            .contains("note: `attn_processor_type` only tunes"),
        "{}",
        tuned.stderr
    );
}

// Linting where no models are: a missing model is a warning unless --require-models.
#[test]
fn validate_warns_about_a_missing_model_unless_models_are_required() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "missing.json",
        r#"{"id": "m", "steps": [{"name": "s", "pipeline": {
          "configuration": {"component_type": "StableDiffusionPipeline"},
          "from_pretrained_arguments": {"model_name": "nobody/no-such-model"},
          "arguments": {"prompt": "x"}}}]}"#,
    );
    let lint = daemon.dwctl(&["validate", flow.to_str().unwrap()]);
    lint.assert_code(0);
    assert!(
        lint.stderr
            .contains(":3:55: warning: model `nobody/no-such-model` not found; searched: "),
        "{}",
        lint.stderr
    );
    let strict = daemon.dwctl(&["validate", flow.to_str().unwrap(), "--require-models"]);
    strict.assert_code(2);
    assert!(
        strict
            .stderr
            .contains("model `nobody/no-such-model` not found"),
        "{}",
        strict.stderr
    );
}

// A child workflow is checked with its parent: a mistake in it is found before any run.
#[test]
fn validate_checks_child_workflows_too() {
    let daemon = TestDaemon::new();
    write(
        &daemon,
        "child.json",
        r#"{"id": "child", "variables": {"n": 1}, "steps": [{"name": "s",
          "task": {"command": "upscale", "arguments": {}}}]}"#,
    );
    let parent = write(
        &daemon,
        "parent.json",
        r#"{"id": "parent", "steps": [{"name": "sub", "workflow": {"path": "child.json", "arguments": {"n": 2}}}]}"#,
    );
    let lint = daemon.dwctl(&["validate", parent.to_str().unwrap()]);
    lint.assert_code(2);
    assert!(
        lint.stderr
            .contains("child.json:2:31: task `upscale` is not supported"),
        "{}",
        lint.stderr
    );
    assert!(
        lint.stderr.contains("(child workflow of step `sub`)"),
        "{}",
        lint.stderr
    );
}

/// A loopback HTTP server that answers every request with `body`; the count of requests
/// it served.
fn serve_image(body: Vec<u8>) -> (String, std::sync::Arc<std::sync::atomic::AtomicUsize>) {
    use std::io::{BufRead, BufReader, Write};
    use std::sync::atomic::{AtomicUsize, Ordering};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/in.png", listener.local_addr().unwrap());
    let hits = std::sync::Arc::new(AtomicUsize::new(0));
    let counted = hits.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming().take(4) {
            let Ok(mut stream) = stream else { continue };
            counted.fetch_add(1, Ordering::SeqCst);
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut line = String::new();
            while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                line.clear();
            }
            let head = format!(
                "HTTP/1.1 200 OK\r\nContent-Type: image/png\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = stream.write_all(head.as_bytes());
            let _ = stream.write_all(&body);
        }
    });
    (url, hits)
}

// dw/arguments.py fetch_image: an http(s) URL is an image input; dw fetches it once.
#[test]
fn an_image_url_is_fetched_once_into_the_cache() {
    let daemon = TestDaemon::new();
    let png =
        std::fs::read(repo_root().join("tests/fixtures/tiny-sd15/expected_DDIMScheduler.png"))
            .unwrap();
    let (url, hits) = serve_image(png);
    let flow = write(
        &daemon,
        "url.json",
        &r#"{"id": "url", "seed": 2, "steps": [{"name": "refine", "pipeline": {
            "configuration": {"component_type": "StableDiffusionImg2ImgPipeline"},
            "from_pretrained_arguments": {"model_name": "MODEL"},
            "arguments": {"prompt": "a fox", "image": "URL", "strength": 0.5, "num_inference_steps": 2}},
           "result": {"content_type": "image/png"}}]}"#
            .replace("URL", &url),
    );
    let cache = daemon.dir.path().join("cache");
    let run_once = || {
        let mut command = daemon.run_command(&flow, &["--json"]);
        command.env("XDG_CACHE_HOME", &cache);
        Run::of(command.output().unwrap()).assert_code(0);
    };
    run_once();
    run_once();
    assert_eq!(hits.load(std::sync::atomic::Ordering::SeqCst), 1);
    assert!(daemon.output_dir().join("url-refine.0-0.0.png").is_file());
    assert_eq!(
        std::fs::read_dir(cache.join("dw/images")).unwrap().count(),
        1
    );
}

// dw's configuration.vae.enable_tiling calls diffusers' enable_tiling(): the decode runs in
// overlapping tiles, which changes the pixels of an image larger than one tile (the
// decoder itself is checked against diffusers in dwd/tests/parity.rs).
#[test]
fn vae_tiling_decodes_in_tiles_when_the_workflow_asks() {
    let daemon = TestDaemon::new();
    let flow = |tiling: bool| {
        write(
            &daemon,
            &format!("tiles-{tiling}.json"),
            &r#"{"id": "tiles", "seed": 4, "steps": [{"name": "gen", "pipeline": {
              "configuration": {"component_type": "StableDiffusionPipeline", "vae": {"enable_tiling": TILING, "enable_slicing": true}},
              "from_pretrained_arguments": {"model_name": "MODEL"},
              "arguments": {"prompt": "a fox", "num_inference_steps": 2, "height": 80, "width": 96}},
             "result": {"content_type": "image/png", "file_base_name": "TILING_"}}]}"#
                .replace("TILING", &tiling.to_string()),
        )
    };
    run(&daemon, &flow(false), &[]).assert_code(0);
    run(&daemon, &flow(true), &[]).assert_code(0);
    let (w, h, plain) =
        dw_tests::png_pixels(&daemon.output_dir().join("false_tiles-gen.0-0.0.png"));
    let (tw, th, tiled) =
        dw_tests::png_pixels(&daemon.output_dir().join("true_tiles-gen.0-0.0.png"));
    assert_eq!((w, h, tw, th), (96, 80, 96, 80));
    assert_ne!(plain, tiled, "tiling changes a decode larger than one tile");
}

// dw/pipeline_processors/pipeline.py: one generator per step, shared by all its runs, so
// two runs of the same prompt continue one stream of noise and differ; dw/step.py and
// dw/result.py: embedded metadata is dw's JSON (step_name, model_name, arguments).
#[test]
fn runs_of_a_step_share_its_generator_and_metadata_is_dws_json() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "stream.json",
        &r#"{"id": "stream", "seed": 9, "steps": [
          {"name": "prompts", "task": {"command": "gather_inputs", "inputs": ["a fox", "a fox"]}},
          {"name": "gen", "pipeline": {PIPELINE,
            "arguments": {"prompt": "previous_result:prompts", "num_inference_steps": 2}},
           "result": {"content_type": "image/png", "embed_metadata": true}}]}"#
            .replace("PIPELINE", PIPELINE),
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    assert_eq!(
        written(&result),
        ["stream-gen.1-0.0.png", "stream-gen.1-1.0.png"]
    );
    let (_, _, first) = dw_tests::png_pixels(&daemon.output_dir().join("stream-gen.1-0.0.png"));
    let (_, _, second) = dw_tests::png_pixels(&daemon.output_dir().join("stream-gen.1-1.0.png"));
    assert_ne!(
        first, second,
        "the second run draws the generator's next noise"
    );
    let chunks = dw_tests::png_text_chunks(&daemon.output_dir().join("stream-gen.1-1.0.png"));
    let dw: Value =
        serde_json::from_str(&chunks.iter().find(|(k, _)| k == "dw").unwrap().1).unwrap();
    assert_eq!(dw["step_name"], "gen");
    assert_eq!(dw["model_name"], model());
    assert_eq!(dw["arguments"]["prompt"], "a fox");
    assert_eq!(dw["seed"], 9);
    let parameters = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(
        parameters.starts_with("a fox\nNegative prompt: \nSteps: 2, Sampler: DDIM"),
        "{parameters}"
    );
}

// dw/workflow.py: release_pipeline unloads the step's pipeline once it is done; offload
// has no effect on a CPU and says so, as dw does.
#[test]
fn release_pipeline_unloads_after_the_step_and_offload_is_a_notice_on_cpu() {
    let daemon = TestDaemon::new();
    let flow = write(
        &daemon,
        "release.json",
        r#"{"id": "release", "seed": 1, "steps": [
          {"name": "gen", "release_pipeline": true, "pipeline": {
            "configuration": {"component_type": "StableDiffusionPipeline", "offload": "model"},
            "from_pretrained_arguments": {"model_name": "MODEL"},
            "arguments": {"prompt": "a fox", "num_inference_steps": 2}}}]}"#,
    );
    let out = daemon.output_dir();
    let result = daemon.dwctl(&["run", flow.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    result.assert_code(0);
    assert!(
        result
            .stderr
            .contains("`offload: \"model\"` has no effect on cpu"),
        "{}",
        result.stderr
    );
    assert_eq!(daemon.status()["loaded"].as_array().unwrap().len(), 0);
}

// A Stable Diffusion 1.5 file as diffusers-workflow users write it (a hub id, float16, a
// list variable from the command line, dw's output name with its file_base_name prefix)
// runs unmodified; the hub id resolves to the hub cache, the model here being the tiny one.
#[test]
fn an_sd15_file_as_dw_users_write_it_runs_unmodified() {
    let daemon = TestDaemon::new();
    let hf_home = daemon.dir.path().join("hf");
    let repo = hf_home.join("hub/models--some-org--sd15");
    std::fs::create_dir_all(repo.join("snapshots")).unwrap();
    std::fs::create_dir_all(repo.join("refs")).unwrap();
    std::fs::write(repo.join("refs/main"), "abc").unwrap();
    std::os::unix::fs::symlink(model(), repo.join("snapshots/abc")).unwrap();
    let flow = write(
        &daemon,
        "sd15.json",
        r#"{
    "variables": {"prompt": "an apple", "num_images_per_prompt": 1},
    "id": "test_job",
    "steps": [{
        "name": "main",
        "pipeline": {
            "configuration": {"component_type": "StableDiffusionPipeline"},
            "from_pretrained_arguments": {"model_name": "some-org/sd15", "torch_dtype": "torch.float16"},
            "arguments": {"prompt": "variable:prompt", "num_inference_steps": 3,
                          "num_images_per_prompt": "variable:num_images_per_prompt"}
        },
        "result": {"content_type": "image/jpeg", "file_base_name": "test_image"}
    }]
}"#,
    );
    let mut command = daemon.run_command(&flow, &["prompt=a pear", "num_images_per_prompt=2"]);
    command.env("HF_HOME", &hf_home);
    let run = Run::of(command.output().unwrap());
    run.assert_code(0);
    let stderr = &run.stderr;
    assert!(
        stderr.contains("torch.float16 is slow or unsupported on the CPU"),
        "{stderr}"
    );
    for name in [
        "test_imagetest_job-main.0-0.0.jpg",
        "test_imagetest_job-main.0-0.1.jpg",
    ] {
        assert!(daemon.output_dir().join(name).is_file(), "{name}");
    }
}

// diffusers resolves DiffusionPipeline and AutoPipelineFor* from model_index.json: an SD
// folder runs; a folder of a class dw does not build is refused naming that class.
#[test]
fn auto_pipeline_classes_resolve_from_the_model_folder() {
    let daemon = TestDaemon::new();
    let flow = |class: &str, model: &str| {
        write(
            &daemon,
            &format!("{class}.json"),
            &r#"{"id": "auto", "seed": 3, "steps": [{"name": "gen", "pipeline": {
              "configuration": {"component_type": "CLASS"},
              "from_pretrained_arguments": {"model_name": "FOLDER"},
              "arguments": {"prompt": "a fox", "num_inference_steps": 2}},
             "result": {"content_type": "image/png"}}]}"#
                .replace("CLASS", class)
                .replace("FOLDER", model),
        )
    };
    run(&daemon, &flow("DiffusionPipeline", &model()), &[]).assert_code(0);
    run(&daemon, &flow("AutoPipelineForText2Image", &model()), &[]).assert_code(0);

    let xl = daemon.dir.path().join("xl-model");
    std::fs::create_dir_all(&xl).unwrap();
    for part in ["tokenizer", "text_encoder", "unet", "vae", "scheduler"] {
        std::os::unix::fs::symlink(Path::new(&model()).join(part), xl.join(part)).unwrap();
    }
    std::fs::write(
        xl.join("model_index.json"),
        r#"{"_class_name": "StableDiffusionXLInpaintPipeline"}"#,
    )
    .unwrap();
    let refused = run(
        &daemon,
        &flow("DiffusionPipeline", xl.to_str().unwrap()),
        &[],
    );
    refused.assert_code(2);
    let message = refused.json()["error"]["message"]
        .as_str()
        .unwrap()
        .to_string();
    assert!(
        message.contains("`DiffusionPipeline` resolves to `StableDiffusionXLInpaintPipeline`"),
        "{message}"
    );
}

// dw/tasks/gather.py gather_images: the files a glob matches (from the working directory)
// and then the URLs, one result item each; dw/tasks/image_utils.py get_image_size gives an
// object whose members later steps take by name.
#[test]
fn gathered_images_fan_out_into_later_tasks() {
    let daemon = TestDaemon::new();
    let pictures = daemon.dir.path().join("pictures");
    std::fs::create_dir(&pictures).unwrap();
    let fixture = repo_root().join("tests/fixtures/tasks");
    std::fs::copy(fixture.join("input_wide.png"), pictures.join("a.png")).unwrap();
    std::fs::copy(fixture.join("input_tall.png"), pictures.join("b.png")).unwrap();
    let flow = write(
        &daemon,
        "gather.json",
        r#"{"id": "gather", "steps": [
          {"name": "images", "task": {"command": "gather_images", "arguments": {"glob": "pictures/*.png"}},
           "result": {"content_type": "image/png"}},
          {"name": "size", "task": {"command": "get_image_size", "arguments": {"image": "previous_result:images"}},
           "result": {"content_type": "application/json"}},
          {"name": "widths", "task": {"command": "gather_inputs", "arguments": {"width": "previous_result:size.width"}},
           "result": {"content_type": "application/json"}}]}"#,
    );
    let result = run(&daemon, &flow, &[]);
    result.assert_code(0);
    assert_eq!(
        written(&result),
        [
            "gather-images.0-0.0.png",
            "gather-images.0-1.0.png",
            "gather-size.1-0.json",
            "gather-size.1-1.json",
            "gather-widths.2-0.json",
            "gather-widths.2-1.json"
        ]
    );
    assert_eq!(
        read_json(&daemon, "gather-size.1-1.json"),
        serde_json::json!({"width": 40, "height": 61})
    );
    assert_eq!(
        read_json(&daemon, "gather-widths.2-0.json"),
        serde_json::json!({"width": 77})
    );
}

// dw/pipeline_processors/pipeline.py: a component block beside `configuration` loads
// that component from its own model (and subfolder) instead of the pipeline's.
#[test]
fn a_component_block_loads_that_component_from_another_model() {
    let daemon = TestDaemon::new();
    let other = daemon.dir.path().join("other-vae");
    std::fs::create_dir(&other).unwrap();
    std::os::unix::fs::symlink(Path::new(&model()).join("vae"), other.join("weights")).unwrap();
    let flow = write(
        &daemon,
        "component.json",
        &r#"{"id": "component", "seed": 1, "steps": [{"name": "gen", "pipeline": {
          "configuration": {"component_type": "StableDiffusionPipeline"},
          "vae": {"configuration": {"component_type": "AutoencoderKL"},
                  "from_pretrained_arguments": {"model_name": "OTHER", "subfolder": "weights"}},
          "from_pretrained_arguments": {"model_name": "MODEL"},
          "arguments": {"prompt": "a fox", "num_inference_steps": 2}},
         "result": {"content_type": "image/png"}}]}"#
            .replace("OTHER", other.to_str().unwrap()),
    );
    run(&daemon, &flow, &[]).assert_code(0);
    let loaded = daemon.status()["loaded"].as_array().unwrap().clone();
    let vae = loaded
        .iter()
        .find(|c| c["component_type"] == "vae")
        .unwrap();
    assert!(
        vae["model"].as_str().unwrap().ends_with("other-vae"),
        "{vae}"
    );
    let unet = loaded
        .iter()
        .find(|c| c["component_type"] == "unet")
        .unwrap();
    assert!(
        unet["model"].as_str().unwrap().ends_with("tiny-sd15/model"),
        "{unet}"
    );
}
