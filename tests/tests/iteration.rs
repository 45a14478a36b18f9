//! End-to-end: the iteration loop. `dwctl watch` reruns on changes (one run per burst, a
//! change mid-run cancels and restarts), `dwctl cancel` stops the caller's job, `dwctl logs`
//! prints the daemon's log, completions are generated, and `dwd --idle-exit` leaves no
//! daemon behind.

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, ChildStdout};
use std::sync::mpsc::{channel, Receiver};
use std::time::Duration;

use dw_tests::{example_workflow, process_alive, wait_until, TestDaemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// A workflow copy the test can edit, with the model path made absolute.
fn editable_workflow(daemon: &TestDaemon, steps: u32) -> std::path::PathBuf {
    let text = dw_tests::example_text("tiny-sd.json").replace(
        "\"num_inference_steps\": 4",
        &format!("\"num_inference_steps\": {steps}"),
    );
    let path = daemon.dir.path().join("flow.json");
    std::fs::write(&path, text).unwrap();
    path
}

/// Lines `dwctl watch` prints on stdout, as they come.
fn lines_of(stdout: ChildStdout) -> Receiver<String> {
    let (tx, rx) = channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    rx
}

fn next_line(lines: &Receiver<String>) -> String {
    lines
        .recv_timeout(Duration::from_secs(60))
        .expect("a line from dwctl watch within 60 s")
}

fn touch_prompt(path: &Path, prompt: &str) {
    let text = std::fs::read_to_string(path).unwrap();
    let start = text.find("\"prompt\": \"").unwrap() + "\"prompt\": \"".len();
    let end = start + text[start..].find('"').unwrap();
    std::fs::write(path, format!("{}{prompt}{}", &text[..start], &text[end..])).unwrap();
}

fn stop(mut watch: Child) {
    kill(Pid::from_raw(watch.id() as i32), Signal::SIGINT).unwrap();
    let status = watch.wait().unwrap();
    assert_eq!(status.code(), Some(0), "Ctrl-C leaves watch cleanly");
}

#[test]
fn watch_runs_once_then_on_each_change_and_a_burst_makes_one_run() {
    let daemon = TestDaemon::new();
    let flow = editable_workflow(&daemon, 2);
    let out = daemon.output_dir();
    let mut watch = daemon.spawn(&["watch", flow.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let lines = lines_of(watch.stdout.take().unwrap());
    let first = next_line(&lines);
    assert!(
        first.contains("loaded 4") && first.ends_with("tiny_sd-main.0-0.0.png"),
        "{first}"
    );

    touch_prompt(&flow, "a blue fox");
    let second = next_line(&lines);
    assert!(second.contains("  warm  "), "{second}");

    for prompt in ["a", "b", "c", "d", "e"] {
        touch_prompt(&flow, prompt);
        std::thread::sleep(Duration::from_millis(20));
    }
    let burst = next_line(&lines);
    assert!(burst.contains("  warm  "), "{burst}");
    assert!(
        lines.recv_timeout(Duration::from_secs(2)).is_err(),
        "a burst of changes makes one run"
    );
    stop(watch);
    assert_eq!(daemon.status()["runs"], 3);
}

#[test]
fn a_change_during_a_run_cancels_it_and_starts_the_new_one() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let flow = editable_workflow(&daemon, 400);
    let out = daemon.output_dir();
    let mut watch = daemon.spawn(&["watch", flow.to_str().unwrap(), "-o", out.to_str().unwrap()]);
    let lines = lines_of(watch.stdout.take().unwrap());
    wait_until(
        "the first run is denoising",
        Duration::from_secs(30),
        || {
            daemon.status()["queue"]
                .as_array()
                .is_some_and(|q| !q.is_empty())
        },
    );
    let text = std::fs::read_to_string(&flow)
        .unwrap()
        .replace("\"num_inference_steps\": 400", "\"num_inference_steps\": 2");
    std::fs::write(&flow, text).unwrap();
    let cancelled = next_line(&lines);
    assert!(
        cancelled.ends_with("cancelled: a file changed"),
        "{cancelled}"
    );
    let rerun = next_line(&lines);
    assert!(rerun.contains("  warm  "), "{rerun}");
    stop(watch);
}

#[test]
fn cancel_stops_the_latest_job_from_this_shell() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let workflow = example_workflow();
    let out = daemon.output_dir();
    let run = daemon.spawn(&[
        "run",
        workflow.to_str().unwrap(),
        "num_inference_steps=500",
        "-o",
        out.to_str().unwrap(),
        "--json",
    ]);
    wait_until("the job is running", Duration::from_secs(30), || {
        daemon.status()["queue"]
            .as_array()
            .is_some_and(|q| !q.is_empty())
    });
    // Both dwctl processes are children of this test process: one "shell".
    let cancel = daemon.dwctl(&["cancel"]);
    cancel.assert_code(0);
    assert!(
        cancel.stdout.starts_with("cancelled job 2"),
        "{}",
        cancel.stdout
    );
    let output = run.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(130));
    let none = daemon.dwctl(&["cancel"]);
    none.assert_code(1);
    assert!(
        none.stderr.contains("no job is queued or running"),
        "{}",
        none.stderr
    );
    let missing = daemon.dwctl(&["cancel", "99"]);
    missing.assert_code(1);
    assert!(
        missing.stderr.contains("no job 99 is queued or running"),
        "{}",
        missing.stderr
    );
}

#[test]
fn logs_print_the_daemons_log_and_follow_it() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let logs = daemon.dwctl(&["logs", "-n", "100"]);
    logs.assert_code(0);
    assert!(
        logs.stdout.contains("dwd started") && logs.stdout.contains("job done"),
        "{}",
        logs.stdout
    );

    let mut follow = daemon.spawn(&["logs", "-f", "-n", "0"]);
    let lines = lines_of(follow.stdout.take().unwrap());
    std::thread::sleep(Duration::from_millis(300));
    daemon.run_example(&[]).assert_code(0);
    let mut seen = String::new();
    while !seen.contains("job done") {
        seen.push_str(&next_line(&lines));
    }
    follow.kill().unwrap();
    let _ = follow.wait();
}

#[test]
fn completions_are_generated_for_bash_zsh_and_fish() {
    let daemon = TestDaemon::new();
    for (shell, needle) in [
        ("bash", "complete -F"),
        ("zsh", "#compdef dwctl"),
        ("fish", "complete -c dwctl"),
    ] {
        let run = daemon.dwctl(&["completions", shell]);
        run.assert_code(0);
        assert!(
            run.stdout.contains(needle) && run.stdout.contains("watch"),
            "{shell}: {}",
            &run.stdout[..run.stdout.len().min(200)]
        );
    }
    daemon
        .dwctl(&["completions", "powershell-ish"])
        .assert_code(2);
}

#[test]
fn idle_exit_leaves_no_daemon_behind() {
    let daemon = TestDaemon::new();
    daemon.start(&["--idle-exit", "3s"]);
    wait_until(
        "the daemon has written its pid",
        Duration::from_secs(10),
        || daemon.pid().is_some(),
    );
    let pid = daemon.pid().expect("running");
    let run = daemon.run_example(&["--no-start"]);
    run.assert_code(0);
    assert_eq!(
        daemon.pid(),
        Some(pid),
        "the run went to the idle-exit daemon"
    );
    wait_until("the idle daemon exits", Duration::from_secs(15), || {
        !process_alive(pid)
    });
    assert!(!daemon.socket.exists());
    assert!(
        daemon.log().contains("(--idle-exit); stopping"),
        "{}",
        daemon.log()
    );
}

#[test]
fn quiet_runs_print_nothing_but_errors() {
    let daemon = TestDaemon::new();
    let workflow = example_workflow();
    let out = daemon.output_dir();
    let ok = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--quiet",
    ]);
    ok.assert_code(0);
    assert!(
        ok.stdout.is_empty() && ok.stderr.is_empty(),
        "stdout {:?} stderr {:?}",
        ok.stdout,
        ok.stderr
    );
    let bad = daemon.dwctl(&["run", workflow.to_str().unwrap(), "colour=red", "--quiet"]);
    bad.assert_code(2);
    assert!(bad.stderr.contains("unknown variable `colour`"));
}
