//! Which of torch's generators a seed draws from (`dwd --generator`): the CPU's by default
//! on a machine without CUDA, as diffusers-workflow seeds it there; a named GPU's on any
//! machine; recorded in the image metadata; and a wrong choice refused with what to write.

use std::process::{Command, Stdio};

use dw_tests::{bin_dir, png_pixels, png_text_chunks, repo_root, TestDaemon};

/// A seeded one-image run of the tiny SD 1.5 model, writing its metadata.
fn seeded_workflow(daemon: &TestDaemon) -> std::path::PathBuf {
    let model = repo_root().join("tests/fixtures/tiny-sd15/model");
    let workflow = daemon.dir.path().join("seeded.json");
    let text = r#"{"id": "seeded", "seed": 42, "steps": [{"name": "main", "pipeline": {
        "configuration": {"component_type": "StableDiffusionPipeline"},
        "from_pretrained_arguments": {"model_name": "MODEL"},
        "arguments": {"prompt": "a red fox", "num_inference_steps": 2}},
        "result": {"content_type": "image/png", "embed_metadata": true}}]}"#
        .replace("MODEL", model.to_str().unwrap());
    std::fs::write(&workflow, text).unwrap();
    workflow
}

/// The generator the image's dw metadata names, and its pixels.
fn run_seeded(daemon: &TestDaemon) -> (String, Vec<u8>) {
    let workflow = seeded_workflow(daemon);
    daemon.run_json(&workflow, &[]).assert_code(0);
    let image = daemon.output_dir().join("seeded-main.0-0.0.png");
    let chunks = png_text_chunks(&image);
    let dw = chunks
        .iter()
        .find(|(key, _)| key == "dw")
        .expect("a dw chunk");
    let metadata: serde_json::Value = serde_json::from_str(&dw.1).unwrap();
    let generator = metadata["generator"].as_str().unwrap().to_string();
    (generator, png_pixels(&image).2)
}

#[test]
fn the_cpu_generator_is_the_default_and_a_named_gpus_can_be_chosen() {
    let cpu = TestDaemon::new();
    let (generator, cpu_pixels) = run_seeded(&cpu);
    assert_eq!(generator, "cpu");

    let gpu = TestDaemon::new();
    gpu.start(&["--generator", "cuda:132x2048"]);
    let (generator, gpu_pixels) = run_seeded(&gpu);
    assert_eq!(generator, "cuda:132x2048");
    assert_ne!(
        cpu_pixels, gpu_pixels,
        "CUDA's Philox noise is not the CPU's"
    );
    let status = gpu.dwctl(&["status"]);
    assert!(
        status.stdout.contains("--generator cuda:132x2048 (flag)"),
        "{}",
        status.stdout
    );
}

#[test]
fn a_generator_this_machine_cannot_give_is_refused_with_what_to_write() {
    if !std::path::Path::new("/dev/nvidia0").exists() {
        let daemon = TestDaemon::new();
        let output = Command::new(bin_dir().join("dwd"))
            .arg("--socket")
            .arg(daemon.dir.path().join("gpu.sock"))
            .args(["--foreground", "--generator", "cuda"])
            .stdin(Stdio::null())
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(1));
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(
            stderr.contains("name the GPU whose noise you want, such as cuda:132x2048"),
            "{stderr}"
        );
    } else {
        eprintln!("skipped the no-GPU refusal: this machine has a GPU");
    }
    let daemon = TestDaemon::new();
    let output = Command::new(bin_dir().join("dwd"))
        .arg("--socket")
        .arg(daemon.dir.path().join("bad.sock"))
        .args(["--generator", "cuda:lots"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("`lots` is not a GPU geometry"), "{stderr}");
}
