//! End-to-end: bad input gets a precise message and the documented exit code, and the
//! daemon keeps serving (and keeps its models) afterwards.

use std::path::PathBuf;

use dw_tests::{example_workflow, TestDaemon};

fn write(daemon: &TestDaemon, name: &str, text: &str) -> PathBuf {
    let path = daemon.dir.path().join(name);
    std::fs::write(&path, text).unwrap();
    path
}

/// The example's text with its model path made absolute, so a copy runs from anywhere.
fn example_text() -> String {
    dw_tests::example_text("tiny-sd.json")
}

#[test]
fn invalid_json_exits_2_with_file_line_and_column_without_a_daemon() {
    let daemon = TestDaemon::new();
    let path = write(
        &daemon,
        "broken.json",
        "{\n  \"id\": \"x\",\n  \"steps\": [\n}\n",
    );
    let run = daemon.dwctl(&["run", path.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains(&format!("{}:4:1: invalid JSON", path.display())),
        "{}",
        run.stderr
    );
    assert!(
        daemon.pid().is_none(),
        "an invalid workflow does not start a daemon"
    );
}

#[test]
fn an_unknown_variable_exits_2_and_lists_the_declared_ones() {
    let daemon = TestDaemon::new();
    let run = daemon.run_example(&["colour=red"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("unknown variable `colour`"),
        "{}",
        run.stderr
    );
    assert!(run.stderr.contains("declared variables: guidance_scale, negative_prompt, num_inference_steps, prompt, seed"), "{}", run.stderr);
}

#[test]
fn a_value_that_does_not_convert_exits_2_naming_variable_type_and_value() {
    let daemon = TestDaemon::new();
    let run = daemon.run_example(&["num_inference_steps=lots"]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("variable `num_inference_steps` is an integer (default 4)"),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr.contains("`lots` is not an integer"),
        "{}",
        run.stderr
    );
}

#[test]
fn validate_needs_no_daemon_and_reports_ok_or_the_error() {
    let daemon = TestDaemon::new();
    let ok = daemon.dwctl(&["validate", example_workflow().to_str().unwrap(), "prompt=x"]);
    ok.assert_code(0);
    assert!(
        ok.stdout
            .contains("ok: workflow `tiny_sd`, 1 step(s): main (StableDiffusionPipeline"),
        "{}",
        ok.stdout
    );
    let text = example_text().replace(
        "\"negative_prompt\": \"variable:negative_prompt\",",
        "\"negative_prompt\": \"variable:negativ\",",
    );
    let bad = write(&daemon, "bad.json", &text);
    let run = daemon.dwctl(&["validate", bad.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("unknown variable `negativ`"),
        "{}",
        run.stderr
    );
    assert!(daemon.pid().is_none());
}

#[test]
fn a_missing_model_folder_exits_2_naming_where_it_is_written_and_where_it_was_searched() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let model = dw_tests::repo_root().join("tests/fixtures/tiny-sd15/model");
    let text = example_text().replace(model.to_str().unwrap(), "./no-such-model");
    let path = write(&daemon, "missing.json", &text);
    let run = daemon.dwctl(&["run", path.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr.contains(&format!("{}:18:", path.display())),
        "{}",
        run.stderr
    );
    assert!(
        run.stderr
            .contains("model `./no-such-model` not found; searched:"),
        "{}",
        run.stderr
    );
    // The daemon is still serving, with its models.
    let warm = daemon.run_example(&[]);
    warm.assert_code(0);
    assert_eq!(warm.json()["cache"]["misses"], 0);
}

/// The family's scheduler list is checked when the file is read, so dwctl refuses the
/// workflow itself, naming where, before the daemon loads anything.
/// (dw/pipeline_processors/pipeline.py: `scheduler.configuration.scheduler_type` names the
/// class whose `from_config` builds the step's scheduler from the checkpoint's config.)
#[test]
fn an_unsupported_scheduler_exits_2_and_lists_the_supported_ones() {
    let daemon = TestDaemon::new();
    let text = example_text().replace("\"DDIMScheduler\"", "\"FancyScheduler\"");
    let path = write(&daemon, "sched.json", &text);
    let run = daemon.dwctl(&["run", path.to_str().unwrap(), "--json"]);
    run.assert_code(2);
    let summary = run.json();
    assert_eq!(summary["ok"], false);
    assert_eq!(summary["error"]["kind"], "invalid");
    let message = summary["error"]["message"].as_str().unwrap();
    assert!(
        message.contains("sched.json:")
            && message.contains("scheduler `FancyScheduler` is not supported")
            && message.contains("DDIMScheduler"),
        "{message}"
    );
}

#[test]
fn an_unwritable_output_directory_exits_1_naming_the_path() {
    let daemon = TestDaemon::new();
    let blocker = write(&daemon, "file-not-dir", "x");
    let out = blocker.join("sub");
    let run = daemon.dwctl(&[
        "run",
        example_workflow().to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    run.assert_code(1);
    assert!(
        run.stderr.contains(&out.display().to_string()),
        "{}",
        run.stderr
    );
}

#[test]
fn a_bad_timeout_is_a_usage_error() {
    let daemon = TestDaemon::new();
    let run = daemon.run_example(&["--timeout=-3"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("--timeout must be a positive number"),
        "{}",
        run.stderr
    );
}

/// A copy of the tiny model whose `component/file` is rewritten by `change`.
fn broken_model(
    daemon: &TestDaemon,
    component_file: &str,
    change: impl Fn(Vec<u8>) -> Vec<u8>,
) -> PathBuf {
    let model = daemon.dir.path().join("broken-model");
    let source = dw_tests::repo_root().join("tests/fixtures/tiny-sd15/model");
    for component in ["tokenizer", "text_encoder", "unet", "vae", "scheduler"] {
        std::fs::create_dir_all(model.join(component)).unwrap();
        for entry in std::fs::read_dir(source.join(component)).unwrap() {
            let entry = entry.unwrap();
            std::fs::copy(entry.path(), model.join(component).join(entry.file_name())).unwrap();
        }
    }
    let target = model.join(component_file);
    std::fs::write(&target, change(std::fs::read(&target).unwrap())).unwrap();
    model
}

fn run_on_model(daemon: &TestDaemon, model: &std::path::Path) -> dw_tests::Run {
    let default_model = dw_tests::repo_root().join("tests/fixtures/tiny-sd15/model");
    let text = example_text().replace(default_model.to_str().unwrap(), model.to_str().unwrap());
    let path = write(daemon, "broken.json", &text);
    daemon.dwctl(&[
        "run",
        path.to_str().unwrap(),
        "-o",
        daemon.output_dir().to_str().unwrap(),
        "--json",
    ])
}

#[test]
fn a_truncated_weight_file_fails_with_exit_1_naming_it_and_the_daemon_keeps_its_models() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let model = broken_model(
        &daemon,
        "unet/diffusion_pytorch_model.safetensors",
        |bytes| bytes[..bytes.len() / 3].to_vec(),
    );
    let run = run_on_model(&daemon, &model);
    run.assert_code(1);
    let message = run.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("unet/diffusion_pytorch_model.safetensors: truncated"),
        "{message}"
    );
    let warm = daemon.run_example(&[]);
    warm.assert_code(0);
    assert_eq!(warm.json()["cache"]["misses"], 0);
}

#[test]
fn a_weight_of_the_wrong_shape_fails_with_exit_1_naming_the_tensor() {
    let daemon = TestDaemon::new();
    let model = broken_model(&daemon, "text_encoder/model.safetensors", |bytes| {
        let tensors = safetensors::SafeTensors::deserialize(&bytes).unwrap();
        let mut views: Vec<(String, safetensors::tensor::TensorView)> = Vec::new();
        for (name, view) in tensors.tensors() {
            let view = if name.ends_with("final_layer_norm.weight") {
                safetensors::tensor::TensorView::new(view.dtype(), vec![16, 2], view.data())
                    .unwrap()
            } else {
                view
            };
            views.push((name, view));
        }
        safetensors::tensor::serialize(views, None).unwrap()
    });
    let run = run_on_model(&daemon, &model);
    run.assert_code(1);
    let message = run.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("final_layer_norm.weight") && message.contains("[16, 2]"),
        "{message}"
    );
    daemon.dwctl(&["ping"]).assert_code(0);
}

#[test]
fn a_file_base_name_that_escapes_the_output_folder_exits_2() {
    let daemon = TestDaemon::new();
    let text = example_text().replace(
        "\"content_type\": \"image/png\"",
        "\"content_type\": \"image/png\", \"file_base_name\": \"../escape-\"",
    );
    let path = write(&daemon, "escape.json", &text);
    let run = daemon.dwctl(&["run", path.to_str().unwrap()]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("outputs stay inside the output directory"),
        "{}",
        run.stderr
    );
}
