//! End-to-end: a FIFO, a device or an oversized file named by a workflow fails that run at
//! once with the file named; it never blocks the daemon's executor, and the daemon keeps
//! serving.

use std::path::Path;
use std::time::{Duration, Instant};

use dw_tests::{example_text, TestDaemon};

fn fifo(path: &Path) {
    nix::unistd::mkfifo(path, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
}

#[test]
fn a_fifo_as_latents_fails_the_run_at_once_and_the_daemon_goes_on() {
    let daemon = TestDaemon::new();
    let pipe = daemon.dir.path().join("latents.safetensors");
    fifo(&pipe);
    let text = example_text("tiny-sd-reference.json");
    let marker = "\"latents\": \"";
    let start = text.find(marker).unwrap() + marker.len();
    let end = start + text[start..].find('"').unwrap();
    let flow = daemon.dir.path().join("fifo.json");
    std::fs::write(
        &flow,
        format!("{}{}{}", &text[..start], pipe.display(), &text[end..]),
    )
    .unwrap();
    let started = Instant::now();
    let run = daemon.run_json(&flow, &[]);
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "the run must not wait on the FIFO"
    );
    run.assert_code(2);
    let message = run.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(message.contains("is not a regular file"), "{message}");
    daemon.run_example(&[]).assert_code(0);
}

#[test]
fn a_fifo_or_an_oversized_file_as_the_workflow_is_refused_with_exit_2() {
    let daemon = TestDaemon::new();
    let pipe = daemon.dir.path().join("flow.json");
    fifo(&pipe);
    let check = daemon.dwctl(&["validate", pipe.to_str().unwrap()]);
    check.assert_code(2);
    assert!(
        check.stderr.contains("is not a regular file"),
        "{}",
        check.stderr
    );

    let big = daemon.dir.path().join("big.json");
    std::fs::write(&big, vec![b' '; 10 << 20]).unwrap();
    let run = daemon.dwctl(&["run", big.to_str().unwrap(), "--no-start"]);
    run.assert_code(2);
    assert!(
        run.stderr.contains("the limit for it is 524288"),
        "{}",
        run.stderr
    );
}

#[test]
fn a_device_as_an_input_image_is_refused() {
    let daemon = TestDaemon::new();
    let text = example_text("tiny-sd-refine.json")
        .replace("\"previous_result:generate\"", "\"/dev/zero\"");
    let flow = daemon.dir.path().join("device.json");
    std::fs::write(&flow, text).unwrap();
    let run = daemon.run_json(&flow, &[]);
    run.assert_code(2);
    let message = run.json()["error"]["message"].as_str().unwrap().to_string();
    assert!(
        message.contains("/dev/zero is not a regular file"),
        "{message}"
    );
}
