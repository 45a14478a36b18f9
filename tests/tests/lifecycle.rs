//! End-to-end: the five commands a new user types, against the real binaries on a private
//! socket: a cold run starts the daemon and loads, a warm run loads nothing, status shows
//! what is loaded, clear unloads it, stop ends the daemon and removes its socket.

use std::path::Path;
use std::time::Duration;

use dw_tests::{daemons_on, png_pixels, png_text_chunks, process_alive, wait_until, TestDaemon};

#[test]
fn a_cold_run_starts_the_daemon_loads_and_writes_the_named_png() {
    let daemon = TestDaemon::new();
    assert!(daemon.pid().is_none());
    let run = daemon.run_example(&["prompt=a red fox"]);
    run.assert_code(0);
    let summary = run.json();
    assert_eq!(summary["ok"], true);
    assert_eq!(summary["error"], serde_json::Value::Null);
    assert_eq!(summary["workflow"]["id"], "tiny_sd");
    assert_eq!(summary["workflow"]["sha256"].as_str().unwrap().len(), 64);
    assert_eq!(
        summary["cache"]["misses"], 4,
        "tokenizer, text encoder, UNet and VAE are loaded"
    );
    assert!(
        summary["timings"]["run_ms"].as_u64().unwrap()
            >= summary["timings"]["load_ms"].as_u64().unwrap()
    );

    let outputs = summary["outputs"].as_array().unwrap();
    assert_eq!(outputs.len(), 1);
    let path = Path::new(outputs[0]["path"].as_str().unwrap());
    assert!(
        path.ends_with("out/tiny_sd-main.0-0.0.png"),
        "{}",
        path.display()
    );
    assert_eq!(
        (outputs[0]["width"].as_u64(), outputs[0]["height"].as_u64()),
        (Some(64), Some(64))
    );
    let (width, height, pixels) = png_pixels(&daemon.dir.path().join(path));
    assert_eq!((width, height, pixels.len()), (64, 64, 64 * 64 * 3));

    let chunks = png_text_chunks(&daemon.dir.path().join(path));
    let parameters = &chunks
        .iter()
        .find(|(k, _)| k == "parameters")
        .expect("a parameters chunk")
        .1;
    assert!(parameters.starts_with("a red fox\nNegative prompt: \nSteps: 4, Sampler: DDIM, CFG scale: 7.5, Seed: 42, Size: 64x64, Model: "), "{parameters}");
    let dw: serde_json::Value = serde_json::from_str(
        &chunks
            .iter()
            .find(|(k, _)| k == "dw")
            .expect("a dw chunk")
            .1,
    )
    .unwrap();
    assert_eq!(dw["workflow_id"], "tiny_sd");
    assert_eq!(dw["workflow_sha256"], summary["workflow"]["sha256"]);
    assert_eq!(dw["arguments"]["prompt"], "a red fox");
    assert!(
        daemon.pid().is_some(),
        "the daemon keeps running after the run"
    );
}

#[test]
fn a_warm_run_with_another_prompt_loads_nothing_and_runs_on_the_same_daemon() {
    let daemon = TestDaemon::new();
    daemon.run_example(&["prompt=a red fox"]).assert_code(0);
    let pid = daemon.pid().expect("daemon running");
    let warm = daemon.run_example(&["prompt=a blue fox"]);
    warm.assert_code(0);
    let summary = warm.json();
    assert_eq!(summary["cache"]["misses"], 0);
    assert_eq!(summary["cache"]["hits"], 4);
    assert_eq!(summary["timings"]["load_ms"], 0);
    assert_eq!(daemon.pid(), Some(pid));
}

#[test]
fn the_same_seed_gives_the_same_image_and_another_seed_a_different_one() {
    let daemon = TestDaemon::new();
    let image = |seed: &str| {
        let run = daemon.run_example(&[&format!("seed={seed}")]);
        run.assert_code(0);
        let path = daemon
            .dir
            .path()
            .join(run.json()["outputs"][0]["path"].as_str().unwrap());
        png_pixels(&path).2
    };
    let first = image("7");
    assert_eq!(image("7"), first);
    assert_ne!(image("8"), first);
}

#[test]
fn status_reports_the_daemon_and_each_loaded_component() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let status = daemon.status();
    assert_eq!(status["pid"].as_i64().map(|p| p as i32), daemon.pid());
    assert_eq!(status["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(status["device"], "cpu");
    assert_eq!(status["socket"], daemon.socket.display().to_string());
    assert_eq!(status["log_file"], daemon.log_file().display().to_string());
    assert_eq!(status["runs"], 1);
    assert_eq!(status["queue"], serde_json::json!([]));
    assert!(status["memory"]["rss_bytes"].as_u64().unwrap() > 0);
    assert_eq!(
        status["memory"]["device_used_bytes"],
        serde_json::Value::Null
    );
    let loaded = status["loaded"].as_array().unwrap();
    let mut types: Vec<&str> = loaded
        .iter()
        .map(|c| c["component_type"].as_str().unwrap())
        .collect();
    types.sort();
    assert_eq!(types, ["text_encoder", "tokenizer", "unet", "vae"]);
    let unet = loaded
        .iter()
        .find(|c| c["component_type"] == "unet")
        .unwrap();
    assert_eq!(
        unet["bytes"],
        safetensors_data_bytes("unet/diffusion_pytorch_model.safetensors"),
        "UNet bytes are its tensors' sizes"
    );
    assert!(unet["model"]
        .as_str()
        .unwrap()
        .ends_with("tests/fixtures/tiny-sd15/model"));
    assert_eq!(unet["dtype"], "f32");
    assert_eq!(unet["hits"], 0);
    assert!(unet["last_used_unix"].as_u64().unwrap() > 1_700_000_000);

    let text = daemon.dwctl(&["status"]);
    text.assert_code(0);
    assert!(
        text.stdout.contains("loaded  4 component(s)"),
        "{}",
        text.stdout
    );
    assert!(text
        .stdout
        .contains(&daemon.log_file().display().to_string()));
}

#[test]
fn clear_unloads_everything_reports_the_bytes_and_the_next_run_loads_again() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let loaded_bytes: u64 = daemon.status()["loaded"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["bytes"].as_u64().unwrap())
        .sum();
    let clear = daemon.dwctl(&["clear", "--json"]);
    clear.assert_code(0);
    assert_eq!(
        clear.json(),
        serde_json::json!({"unloaded": 4, "bytes_freed": loaded_bytes})
    );
    assert_eq!(daemon.status()["loaded"], serde_json::json!([]));
    let again = daemon.run_example(&[]);
    again.assert_code(0);
    assert_eq!(again.json()["cache"]["misses"], 4);
    let human = daemon.dwctl(&["clear"]);
    assert!(
        human.stdout.starts_with("unloaded 4 component(s), freed "),
        "{}",
        human.stdout
    );
}

#[test]
fn stop_ends_the_daemon_and_removes_its_socket() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let pid = daemon.pid().expect("running");
    let stop = daemon.dwctl(&["stop"]);
    stop.assert_code(0);
    assert!(
        stop.stdout.contains(&format!("dwd (pid {pid}) stopped")),
        "{}",
        stop.stdout
    );
    assert!(!process_alive(pid));
    assert!(!daemon.socket.exists());
    let again = daemon.dwctl(&["stop"]);
    again.assert_code(0);
    assert!(again.stdout.contains("not running"));
}

#[test]
fn ping_answers_when_running_and_exits_3_when_not() {
    let daemon = TestDaemon::new();
    let down = daemon.dwctl(&["ping"]);
    down.assert_code(3);
    assert!(down.stderr.contains("no dwd is running"), "{}", down.stderr);
    daemon.run_example(&[]).assert_code(0);
    let up = daemon.dwctl(&["ping"]);
    up.assert_code(0);
    assert!(up.stdout.starts_with("pong from dwd"), "{}", up.stdout);
}

#[test]
fn run_with_no_start_fails_with_exit_3_instead_of_starting_a_daemon() {
    let daemon = TestDaemon::new();
    let run = daemon.run_example(&["--no-start"]);
    run.assert_code(3);
    assert!(daemon.pid().is_none());
}

#[test]
fn eight_clients_starting_at_once_end_with_exactly_one_daemon() {
    let daemon = TestDaemon::new();
    let workflow = dw_tests::example_workflow();
    let children: Vec<_> = (0..8)
        .map(|i| {
            let out = daemon.dir.path().join(format!("out{i}"));
            daemon.spawn(&[
                "run",
                workflow.to_str().unwrap(),
                "-o",
                out.to_str().unwrap(),
                "--json",
            ])
        })
        .collect();
    for child in children {
        let output = child.wait_with_output().unwrap();
        assert!(
            output.status.success(),
            "{}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert_eq!(
        daemons_on(&daemon.socket).len(),
        1,
        "log:\n{}",
        daemon.log()
    );
    assert_eq!(daemon.status()["runs"], 8);
}

#[test]
fn a_second_daemon_on_the_same_socket_refuses_to_start_and_names_the_first() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let pid = daemon.pid().unwrap();
    let second = std::process::Command::new(dw_tests::bin_dir().join("dwd"))
        .args(["--socket", daemon.socket.to_str().unwrap(), "--foreground"])
        .output()
        .unwrap();
    assert_eq!(second.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("already running (pid {pid})")),
        "{stderr}"
    );
    daemon.dwctl(&["ping"]).assert_code(0);
}

#[test]
fn a_stale_socket_left_by_a_killed_daemon_does_not_block_a_new_one() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let pid = daemon.pid().unwrap();
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(pid),
        nix::sys::signal::Signal::SIGKILL,
    )
    .unwrap();
    wait_until("the daemon is gone", Duration::from_secs(10), || {
        !process_alive(pid)
    });
    assert!(
        daemon.socket.exists(),
        "kill -9 leaves the socket file behind"
    );
    let run = daemon.run_example(&[]);
    run.assert_code(0);
    assert_ne!(daemon.pid(), Some(pid));
}

#[test]
fn the_socket_directory_and_socket_are_private() {
    use std::os::unix::fs::PermissionsExt;
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let mode = |p: &Path| std::fs::metadata(p).unwrap().permissions().mode() & 0o777;
    assert_eq!(mode(daemon.socket.parent().unwrap()), 0o700);
    assert_eq!(mode(&daemon.socket), 0o600);
}

/// Bytes of tensor data in a fixture safetensors file: the file less its header.
fn safetensors_data_bytes(relative: &str) -> u64 {
    let bytes = std::fs::read(
        dw_tests::repo_root()
            .join("tests/fixtures/tiny-sd15/model")
            .join(relative),
    )
    .unwrap();
    let header = u64::from_le_bytes(bytes[..8].try_into().unwrap());
    bytes.len() as u64 - 8 - header
}

// One daemon per socket: removing its socket (or its lock file) could let a second daemon
// start beside an orphaned first; the first now notices and stops.
#[test]
fn a_daemon_whose_socket_or_lock_is_removed_stops_and_one_daemon_remains() {
    for victim in ["socket", "lock"] {
        let daemon = TestDaemon::new();
        daemon.run_example(&[]).assert_code(0);
        let first = daemon.pid().unwrap();
        let path = match victim {
            "socket" => daemon.socket.clone(),
            _ => daemon.lock_file(),
        };
        std::fs::remove_file(&path).unwrap();
        dw_tests::wait_until(
            "the orphaned daemon to stop",
            Duration::from_secs(10),
            || !dw_tests::process_alive(first),
        );
        daemon.run_example(&[]).assert_code(0);
        assert_eq!(dw_tests::daemons_on(&daemon.socket).len(), 1, "{victim}");
    }
}

// SIGHUP reopens the log (after a rotation) instead of killing the daemon.
#[test]
fn sighup_reopens_the_log_and_the_daemon_keeps_serving() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let pid = daemon.pid().unwrap();
    let rotated = daemon.log_file().with_extension("log.1");
    std::fs::rename(daemon.log_file(), &rotated).unwrap();
    daemon.signal(nix::sys::signal::Signal::SIGHUP);
    dw_tests::wait_until("a fresh log", Duration::from_secs(10), || {
        daemon.log_file().exists()
    });
    daemon.run_example(&[]).assert_code(0);
    assert!(dw_tests::process_alive(pid));
    assert!(daemon.log().contains("job accepted"), "{}", daemon.log());
}

// A run that meets a daemon that is stopping waits for it to exit and starts a fresh one.
#[test]
fn a_run_during_another_shells_stop_waits_and_starts_a_fresh_daemon() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let first = daemon.pid().unwrap();
    let long = daemon
        .example_command(&["num_inference_steps=150"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(800));
    let stop = daemon.spawn(&["stop"]);
    std::thread::sleep(Duration::from_millis(100));
    let run = daemon.run_example(&[]);
    let _ = long.wait_with_output();
    let stop = stop.wait_with_output().unwrap();
    assert_eq!(
        stop.status.code(),
        Some(0),
        "stop: {}",
        String::from_utf8_lossy(&stop.stderr)
    );
    run.assert_code(0);
    assert!(!dw_tests::process_alive(first));
    assert_eq!(dw_tests::daemons_on(&daemon.socket).len(), 1);
}

// systemd's Type=notify: READY=1 once connections are served, STOPPING=1 on the way out.
#[test]
fn under_systemd_the_daemon_reports_ready_and_stopping() {
    let dir = tempfile::tempdir().unwrap();
    let notify = dir.path().join("notify.sock");
    let listener = std::os::unix::net::UnixDatagram::bind(&notify).unwrap();
    listener
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    let socket = dir.path().join("run/dwd.sock");
    let mut daemon = std::process::Command::new(dw_tests::bin_dir().join("dwd"))
        .args(["--foreground", "--socket"])
        .arg(&socket)
        .env("NOTIFY_SOCKET", &notify)
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut buffer = [0u8; 256];
    let n = listener.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..n], b"READY=1\n");
    assert!(std::os::unix::net::UnixStream::connect(&socket).is_ok());
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(daemon.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    let n = listener.recv(&mut buffer).unwrap();
    assert_eq!(&buffer[..n], b"STOPPING=1\n");
    assert!(daemon.wait().unwrap().success());
}
