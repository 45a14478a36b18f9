//! Parity of the image tasks with diffusers-workflow's own functions (Pillow 13, OpenCV 5,
//! qrcode 8) on the fixtures made by `tests/fixtures/make_task_fixtures.py`: every output
//! pixel equal.

use std::path::{Path, PathBuf};

use dwd::fanout::{Artifact, Run};
use dwd::fetch::Fetcher;
use dwd::pipelines::RgbImage;
use dwd::tasks::{self, Places};
use serde_json::{Map, Value};

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/tasks")
}

fn expected(file: &str) -> RgbImage {
    let image = image::open(fixtures().join(file)).unwrap().to_rgb8();
    RgbImage {
        width: image.width() as usize,
        height: image.height() as usize,
        pixels: image.into_raw(),
    }
}

/// Runs `task` on `arguments` (with `image` set to `input`) in the fixture folder.
fn run_task(
    task: &str,
    arguments: &Value,
    input: Option<&str>,
) -> Result<Vec<Artifact>, dwd::inputs::InputError> {
    let mut arguments: Map<String, Value> = arguments.as_object().cloned().unwrap();
    if let Some(input) = input {
        arguments.insert("image".into(), Value::String(input.into()));
    }
    let places = Places {
        workflow_dir: fixtures(),
        cwd: fixtures(),
    };
    let run = Run {
        arguments,
        bound: Default::default(),
    };
    tasks::run(task, &run, &places, &Fetcher::default())
}

fn run_case(case: &Value) -> Vec<Artifact> {
    run_task(
        case["task"].as_str().unwrap(),
        &case["arguments"],
        case["input"].as_str(),
    )
    .unwrap()
}

fn assert_same(name: &str, got: &RgbImage, want: &RgbImage) {
    assert_eq!(
        (got.width, got.height),
        (want.width, want.height),
        "{name}: size"
    );
    let differing = got
        .pixels
        .iter()
        .zip(&want.pixels)
        .filter(|(a, b)| a != b)
        .count();
    assert_eq!(differing, 0, "{name}: {differing} channel values differ");
}

#[test]
fn every_image_task_gives_diffusers_workflows_pixels() {
    let manifest: Value =
        serde_json::from_str(&std::fs::read_to_string(fixtures().join("manifest.json")).unwrap())
            .unwrap();
    let mut checked = 0;
    for case in manifest["cases"].as_array().unwrap() {
        let outputs = case["outputs"].as_object().cloned().unwrap_or_default();
        if outputs.is_empty() {
            continue;
        }
        let name = format!("{} {} {}", case["task"], case["case"], case["input"]);
        let items = run_case(case);
        assert_eq!(items.len(), 1, "{name}");
        for (key, output) in &outputs {
            let want = expected(output["file"].as_str().unwrap());
            let got = match (&items[0], key.as_str()) {
                (Artifact::Image(image), "image") => image.clone(),
                (Artifact::Map(members), key) => match members.get(key) {
                    Some(Artifact::Image(image)) => image.clone(),
                    other => panic!("{name}: {key} is {other:?}"),
                },
                (other, key) => panic!("{name}: {key} from {other:?}"),
            };
            assert_same(&format!("{name} {key}"), &got, &want);
            checked += 1;
        }
    }
    assert!(checked >= 40, "only {checked} outputs checked");
}

// dw's resize_resample: round(32 / 64) is 0, and Pillow refuses a 0-pixel size.
#[test]
fn a_resize_to_nothing_is_an_error_not_an_empty_image() {
    let arguments = serde_json::json!({"resolution": 32});
    let e = run_task("resize_resample", &arguments, Some("input_wide.png")).unwrap_err();
    assert!(e.to_string().contains("would make a 64x0 image"), "{e}");
}
