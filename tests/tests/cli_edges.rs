//! End-to-end: the command line's edges give the error the README promises, never a
//! panic: a closed standard output, absurd numbers, client-side failures under `--json`.

use std::os::unix::process::ExitStatusExt;
use std::process::Stdio;

use dw_tests::{example_workflow, TestDaemon};

// `dwctl status | head -1`: the reader goes away; dwctl dies of SIGPIPE like other tools.
#[test]
fn a_closed_standard_output_ends_dwctl_by_sigpipe_not_a_panic() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let (reader, writer) = nix::unistd::pipe().unwrap();
    drop(reader);
    let output = daemon
        .command(&["status"])
        .stdout(Stdio::from(writer))
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.signal(), Some(libc::SIGPIPE), "{stderr}");
    assert!(!stderr.contains("panicked"), "{stderr}");
}

#[test]
fn an_absurd_timeout_is_refused_with_the_accepted_range() {
    let daemon = TestDaemon::new();
    let run = daemon.dwctl(&[
        "run",
        example_workflow().to_str().unwrap(),
        "--timeout",
        "1e20",
    ]);
    run.assert_code(2);
    assert!(
        run.stderr
            .contains("--timeout must be a positive number of seconds, at most 31536000"),
        "{}",
        run.stderr
    );
    assert!(!run.stderr.contains("panicked"), "{}", run.stderr);
}

// Scripts read every outcome from stdout: client-side failures too.
#[test]
fn json_reports_client_side_failures_with_code_and_message() {
    let daemon = TestDaemon::new();
    let missing = daemon.dwctl(&["run", "/nonexistent/flow.json", "--json"]);
    missing.assert_code(2);
    let report = missing.json();
    assert_eq!(report["ok"], false);
    assert_eq!(report["error"]["code"], 2);
    assert!(report["error"]["message"]
        .as_str()
        .unwrap()
        .contains("/nonexistent/flow.json"));

    let bad_variable = daemon.dwctl(&[
        "run",
        example_workflow().to_str().unwrap(),
        "colour=red",
        "--json",
    ]);
    bad_variable.assert_code(2);
    assert_eq!(bad_variable.json()["error"]["kind"], "invalid");

    let unreachable = daemon.dwctl(&["status", "--json"]);
    unreachable.assert_code(3);
    assert_eq!(unreachable.json()["error"]["kind"], "unreachable");
}

// A 300 KB prompt echoed in an image's metadata used to push the output's frame past the
// 1 MiB limit and lose the run; metadata is now bounded.
#[test]
fn a_huge_prompt_still_writes_its_image_with_bounded_metadata() {
    let daemon = TestDaemon::new();
    let prompt = "a fox ".repeat(50_000);
    let text = dw_tests::example_text("tiny-sd.json").replace(
        "\"prompt\": \"A photo of a cat sitting on the mat, rusty robot!\"",
        &format!("\"prompt\": \"{prompt}\""),
    );
    assert!(text.len() > 300_000);
    let flow = daemon.dir.path().join("huge.json");
    std::fs::write(&flow, text).unwrap();
    let run = daemon.run_json(&flow, &[]);
    run.assert_code(0);
    let path = daemon.output_dir().join("tiny_sd-main.0-0.0.png");
    let chunks = dw_tests::png_text_chunks(&path);
    let parameters = &chunks.iter().find(|(k, _)| k == "parameters").unwrap().1;
    assert!(parameters.len() < 20_000, "{}", parameters.len());
    assert!(parameters.contains("more bytes)"));
}

// SD 1.5's scheduler config adds `steps_offset` 1 to "leading" timesteps, so 1000 steps
// reach timestep 1000, past the schedule (diffusers fails on it with an index error).
// `validate` used to accept it and the run to refuse it only after loading every weight;
// both now make the same check from the model folder's scheduler config.
#[test]
fn a_step_count_past_the_schedule_is_refused_by_validate_and_before_loading() {
    let daemon = TestDaemon::new();
    let flow = example_workflow();
    let flow = flow.to_str().unwrap();
    let validate = daemon.dwctl(&["validate", flow, "num_inference_steps=1000"]);
    validate.assert_code(2);
    for expected in [
        "`num_inference_steps` 1000 is too many for DDIMScheduler",
        "`steps_offset` 1",
        "use at most 999 steps",
    ] {
        assert!(validate.stderr.contains(expected), "{}", validate.stderr);
    }
    daemon
        .dwctl(&["validate", flow, "num_inference_steps=999"])
        .assert_code(0);

    let run = daemon.dwctl(&["run", flow, "num_inference_steps=1000"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("use at most 999 steps"),
        "{}",
        run.stderr
    );
    assert_eq!(daemon.status()["loaded"].as_array().unwrap().len(), 0);
}
