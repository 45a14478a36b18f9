//! End-to-end: a long run can be cancelled by Ctrl-C, by its client going away, by its
//! timeout, or by the daemon shutting down, and the daemon keeps its models afterwards
//! (except when it is the one stopping).

use std::io::{BufRead, BufReader};
use std::process::Child;
use std::time::Duration;

use dw_tests::{example_workflow, process_alive, wait_until, Run, TestDaemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

/// Far more denoising steps than any test waits for.
const LONG: &str = "num_inference_steps=500";

/// Starts a long run and returns once it is denoising; the caller waits for the child.
#[allow(clippy::zombie_processes)]
fn start_long_run(
    daemon: &TestDaemon,
    extra: &[&str],
) -> (Child, BufReader<std::process::ChildStderr>) {
    let workflow = example_workflow();
    let out = daemon.output_dir();
    let mut args = vec![
        "run",
        workflow.to_str().unwrap(),
        LONG,
        "-o",
        out.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    let mut child = daemon.spawn(&args);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "dwctl ended before denoising; log:\n{}",
            daemon.log()
        );
        if line.contains("denoising 1/500") {
            return (child, stderr);
        }
    }
}

fn rest(mut stderr: BufReader<std::process::ChildStderr>) -> String {
    let mut text = String::new();
    let _ = std::io::Read::read_to_string(&mut stderr, &mut text);
    text
}

fn signal(child: &Child, signal: Signal) {
    kill(Pid::from_raw(child.id() as i32), signal).unwrap();
}

/// After cleaning up, dwctl ends by SIGINT itself (as Ctrl-C ends other tools), so a
/// calling shell or make sees a signal death and stops too; a shell shows it as 130.
#[test]
fn ctrl_c_cancels_the_job_ends_by_sigint_and_the_models_stay_loaded() {
    use std::os::unix::process::ExitStatusExt;
    let daemon = TestDaemon::new();
    let (mut child, stderr) = start_long_run(&daemon, &[]);
    signal(&child, Signal::SIGINT);
    let status = child.wait().unwrap();
    let text = rest(stderr);
    assert_eq!(
        status.signal(),
        Some(Signal::SIGINT as i32),
        "{status:?} {text}"
    );
    assert!(text.contains("cancelled"), "{text}");
    let status = daemon.status();
    assert_eq!(status["queue"], serde_json::json!([]));
    assert_eq!(status["loaded"].as_array().unwrap().len(), 4);
    let next = daemon.run_example(&[]);
    next.assert_code(0);
    assert_eq!(next.json()["cache"]["misses"], 0);
}

#[test]
fn a_killed_client_cancels_its_job_and_the_next_run_starts_at_once() {
    let daemon = TestDaemon::new();
    let (mut child, _stderr) = start_long_run(&daemon, &[]);
    signal(&child, Signal::SIGKILL);
    child.wait().unwrap();
    wait_until(
        "the orphaned job is cancelled",
        Duration::from_secs(30),
        || daemon.status()["queue"] == serde_json::json!([]),
    );
    assert!(
        daemon.log().contains("cancelling its job"),
        "{}",
        daemon.log()
    );
    let next = daemon.run_example(&[]);
    next.assert_code(0);
    assert_eq!(next.json()["cache"]["misses"], 0);
}

#[test]
fn a_run_past_its_timeout_is_cancelled_with_exit_1_and_says_so() {
    let daemon = TestDaemon::new();
    let workflow = example_workflow();
    let run = daemon.dwctl(&[
        "run",
        workflow.to_str().unwrap(),
        LONG,
        "--timeout",
        "2",
        "--json",
    ]);
    run.assert_code(1);
    let summary = run.json();
    assert_eq!(summary["error"]["kind"], "timeout");
    assert!(
        summary["error"]["message"]
            .as_str()
            .unwrap()
            .contains("timed out after 2 s"),
        "{}",
        run.stdout
    );
    daemon.dwctl(&["ping"]).assert_code(0);
}

#[test]
fn sigterm_to_the_daemon_mid_run_tells_the_client_exit_3_and_removes_the_socket() {
    let daemon = TestDaemon::new();
    let (mut child, stderr) = start_long_run(&daemon, &[]);
    let pid = daemon.pid().expect("daemon running");
    kill(Pid::from_raw(pid), Signal::SIGTERM).unwrap();
    let status = child.wait().unwrap();
    let text = rest(stderr);
    assert_eq!(status.code(), Some(3), "{text}");
    assert!(text.contains("shutting down"), "{text}");
    wait_until("the daemon exits", Duration::from_secs(30), || {
        !process_alive(pid)
    });
    assert!(!daemon.socket.exists());
    assert!(daemon.log().contains("dwd stopped"), "{}", daemon.log());
}

// A stopped daemon (SIGSTOP) sends nothing, not even heartbeats: the client gives up after
// its silence limit with exit 3 instead of waiting forever.
#[test]
fn a_stopped_daemon_makes_the_client_give_up_after_its_silence_limit() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    daemon.signal(nix::sys::signal::Signal::SIGSTOP);
    let started = std::time::Instant::now();
    let output = daemon
        .example_command(&[])
        .env("DWCTL_SILENCE_SECS", "5")
        .output()
        .unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGCONT);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(3), "{stderr}");
    assert!(stderr.contains("sent nothing for 5 s"), "{stderr}");
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
}

/// Starts a run of 150 steps (several seconds on the tiny model) that later jobs queue
/// behind.
fn long_job(daemon: &TestDaemon) -> std::process::Child {
    let child = daemon
        .example_command(&["num_inference_steps=150"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(std::time::Duration::from_millis(500));
    child
}

// While a long job runs, a client queued behind it hears heartbeats and keeps waiting.
#[test]
fn a_client_queued_behind_a_long_job_keeps_waiting_on_heartbeats() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let long = long_job(&daemon);
    let waited = std::time::Instant::now();
    let output = daemon
        .example_command(&[])
        .env("DWCTL_SILENCE_SECS", "5")
        .output()
        .unwrap();
    assert!(
        waited.elapsed() > std::time::Duration::from_secs(5),
        "the queued client must have waited past its silence limit for this to prove anything"
    );
    Run::of(long.wait_with_output().unwrap()).assert_code(0);
    Run::of(output).assert_code(0);
}

// `--timeout` counts the wait in the queue: a job still waiting when it passes is answered
// at once instead of when its turn comes.
#[test]
fn a_timeout_that_passes_in_the_queue_ends_the_wait_at_once() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let long = long_job(&daemon);
    let waited = std::time::Instant::now();
    let queued = daemon
        .example_command(&["--timeout", "1.5"])
        .output()
        .unwrap();
    let elapsed = waited.elapsed();
    let long = long.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&queued.stderr);
    assert_eq!(queued.status.code(), Some(1), "{stderr}");
    assert!(stderr.contains("while waiting in the queue"), "{stderr}");
    assert!(elapsed < std::time::Duration::from_secs(6), "{elapsed:?}");
    Run::of(long).assert_code(0);
}
