//! The family seam, proven end to end: `DwTestNoisePipeline` (a test-only family that loads
//! no weights and returns its noise) is added through the registries alone, and runs
//! through `dwctl run`, the daemon's queue, engine, loader and writer like any family:
//! resolved from a folder's `model_index.json` by `DiffusionPipeline` (as diffusers
//! resolves it), seeded, its arguments checked against its own table.

use std::path::{Path, PathBuf};

use dw_tests::{png_pixels, TestDaemon};

/// A model folder whose `model_index.json` names the test family's class.
fn noise_model(daemon: &TestDaemon) -> PathBuf {
    let dir = daemon.dir.path().join("noise-model");
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(
        dir.join("model_index.json"),
        r#"{"_class_name": "DwTestNoisePipeline", "_diffusers_version": "0.32.0"}"#,
    )
    .unwrap();
    dir
}

fn workflow(
    daemon: &TestDaemon,
    name: &str,
    class: &str,
    model: &Path,
    arguments: &str,
) -> PathBuf {
    let text = format!(
        r#"{{
  "id": "{name}",
  "steps": [{{
    "name": "noise",
    "pipeline": {{
      "configuration": {{"component_type": "{class}"}},
      "from_pretrained_arguments": {{"model_name": "{}"}},
      "arguments": {{{arguments}}},
      "seed": 7
    }},
    "result": {{"content_type": "image/png"}}
  }}]
}}"#,
        model.display()
    );
    let path = daemon.dir.path().join(format!("{name}.json"));
    std::fs::write(&path, text).unwrap();
    path
}

#[test]
fn an_auto_class_resolves_to_the_test_family_and_runs_through_dwctl() {
    let daemon = TestDaemon::new();
    let model = noise_model(&daemon);
    let args = r#""height": 8, "width": 12, "num_inference_steps": 3"#;
    let flow = workflow(&daemon, "auto", "DiffusionPipeline", &model, args);
    let first = daemon.run_json(&flow, &[]);
    first.assert_code(0);
    let outputs = first.json()["outputs"].as_array().unwrap().clone();
    assert_eq!(outputs.len(), 1);
    assert_eq!(
        (outputs[0]["width"].as_u64(), outputs[0]["height"].as_u64()),
        (Some(12), Some(8))
    );
    let path = PathBuf::from(outputs[0]["path"].as_str().unwrap());
    let (width, height, pixels) = png_pixels(&path);
    assert_eq!((width, height), (12, 8));
    assert!(
        pixels.iter().any(|&p| p != pixels[0]),
        "the noise is not flat"
    );

    // The same seed draws the same noise.
    let again = daemon.run_json(&flow, &[]);
    again.assert_code(0);
    let again_path = PathBuf::from(
        again.json()["outputs"][0]["path"]
            .as_str()
            .unwrap()
            .to_string(),
    );
    assert_eq!(png_pixels(&again_path).2, pixels);
}

#[test]
fn the_test_family_refuses_an_argument_its_table_lacks_by_name() {
    let daemon = TestDaemon::new();
    let model = noise_model(&daemon);
    let args = r#""guidance_scale": 3.0"#;
    let flow = workflow(&daemon, "strict", "DwTestNoisePipeline", &model, args);
    let run = daemon.run_json(&flow, &[]);
    run.assert_code(2);
    let message = run.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message
            .contains("unknown or unsupported argument `guidance_scale` for DwTestNoisePipeline"),
        "{message}"
    );
}
