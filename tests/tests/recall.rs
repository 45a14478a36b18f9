//! `dwctl run --from IMAGE`: an output written with `embed_metadata` carries what made it,
//! and running from it makes the same image again, bit for bit, even when its seed was
//! drawn at random; a changed workflow is refused rather than giving another image.

use std::path::{Path, PathBuf};

use dw_tests::{example_text, png_pixels, TestDaemon};

/// The example without a seed (so each run draws one), embedding its metadata.
fn unseeded_workflow(daemon: &TestDaemon) -> PathBuf {
    let text = example_text("tiny-sd.json").replace("\"seed\": \"variable:seed\",", "");
    assert!(!text.contains("variable:seed"), "the example changed");
    let path = daemon.dir.path().join("unseeded.json");
    std::fs::write(&path, text).unwrap();
    path
}

fn only_output(run: &dw_tests::Run) -> PathBuf {
    let outputs = run.json()["outputs"].as_array().unwrap().clone();
    assert_eq!(outputs.len(), 1, "{outputs:?}");
    PathBuf::from(outputs[0]["path"].as_str().unwrap())
}

fn run_from(daemon: &TestDaemon, image: &Path, out: &str, extra: &[&str]) -> dw_tests::Run {
    let out = daemon.dir.path().join(out);
    let mut args = vec![
        "run",
        "--from",
        image.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    args.extend_from_slice(extra);
    daemon.dwctl(&args)
}

#[test]
fn running_from_an_output_makes_the_same_image_even_with_a_random_seed() {
    let daemon = TestDaemon::new();
    let flow = unseeded_workflow(&daemon);
    let first = daemon.run_json(&flow, &["prompt=a red fox", "num_inference_steps=3"]);
    let first_image = only_output(first.assert_code(0));
    let again = run_from(&daemon, &first_image, "again", &[]);
    let again_image = only_output(again.assert_code(0));
    assert_ne!(first_image, again_image);
    assert_eq!(png_pixels(&again_image), png_pixels(&first_image));

    // A change after --from is applied over the recorded values.
    let changed = run_from(&daemon, &first_image, "changed", &["prompt=a blue fox"]);
    let changed_image = only_output(changed.assert_code(0));
    assert_ne!(png_pixels(&changed_image).2, png_pixels(&first_image).2);
}

#[test]
fn a_workflow_edited_since_is_refused_by_name() {
    let daemon = TestDaemon::new();
    let flow = unseeded_workflow(&daemon);
    let image = only_output(daemon.run_json(&flow, &[]).assert_code(0));
    let edited = std::fs::read_to_string(&flow)
        .unwrap()
        .replace("rusty robot", "shiny robot");
    std::fs::write(&flow, edited).unwrap();
    let run = run_from(&daemon, &image, "again", &[]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("unseeded.json changed since")
            && run.stderr.contains("--from runs a workflow only as it was"),
        "{}",
        run.stderr
    );
}

#[test]
fn an_image_without_metadata_is_refused_saying_why() {
    let daemon = TestDaemon::new();
    let text = example_text("tiny-sd.json")
        .replace("\"embed_metadata\": true", "\"embed_metadata\": false");
    let flow = daemon.dir.path().join("plain.json");
    std::fs::write(&flow, text).unwrap();
    let image = only_output(daemon.run_json(&flow, &[]).assert_code(0));
    let run = run_from(&daemon, &image, "again", &[]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("did not set `embed_metadata`"),
        "{}",
        run.stderr
    );
}
