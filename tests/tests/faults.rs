//! End-to-end: faults. A daemon killed mid-run, a job that panics, a full disk, and other
//! users: what the client sees, and that the next run still works.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::process::Stdio;
use std::time::{Duration, Instant};

use dw_tests::{example_workflow, process_alive, wait_until, TestDaemon};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;

#[test]
fn a_daemon_killed_mid_run_makes_the_client_exit_3_at_once_and_the_next_run_starts_a_fresh_one() {
    let daemon = TestDaemon::new();
    let workflow = example_workflow();
    let out = daemon.output_dir();
    let mut child = daemon.spawn(&[
        "run",
        workflow.to_str().unwrap(),
        "num_inference_steps=500",
        "-o",
        out.to_str().unwrap(),
    ]);
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    while !line.contains("denoising 1/500") {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "dwctl ended early"
        );
    }
    let pid = daemon.pid().expect("daemon running");
    kill(Pid::from_raw(pid), Signal::SIGKILL).unwrap();
    let killed_at = Instant::now();
    let status = child.wait().unwrap();
    let waited = killed_at.elapsed();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    assert_eq!(status.code(), Some(3), "{rest}");
    assert!(
        waited < Duration::from_secs(1),
        "the client noticed after {waited:?}"
    );
    assert!(
        rest.contains("the daemon closed the connection (it stopped or died)"),
        "{rest}"
    );

    wait_until("the killed daemon is gone", Duration::from_secs(10), || {
        !process_alive(pid)
    });
    let next = daemon.run_example(&[]);
    next.assert_code(0);
    assert_ne!(daemon.pid(), Some(pid));
}

#[cfg(debug_assertions)]
#[test]
fn a_panicking_job_fails_with_exit_1_and_the_daemon_keeps_serving_with_its_models() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let panicked = daemon.run_example(&["prompt=__dwd_test_panic__"]);
    panicked.assert_code(1);
    let error = &panicked.json()["error"];
    assert_eq!(error["kind"], "panicked");
    assert!(
        error["message"]
            .as_str()
            .unwrap()
            .contains("a test asked this job to panic"),
        "{error}"
    );
    let after = daemon.run_example(&[]);
    after.assert_code(0);
    assert_eq!(
        after.json()["cache"]["misses"],
        0,
        "the cache survived the panic"
    );
}

#[test]
fn a_full_disk_fails_the_run_with_exit_1_naming_the_file_and_leaves_no_partial_output() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    let out = daemon.dir.path().join("full");
    let workflow = example_workflow();
    let mut command = daemon.command(&[
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
    ]);
    // SAFETY: only async-signal-safe calls between fork and exec.
    unsafe {
        command.pre_exec(|| {
            // Writes past 4 KiB fail with EFBIG, as on a full disk (the output PNG is ~12 KiB).
            libc::signal(libc::SIGXFSZ, libc::SIG_IGN);
            let limit = libc::rlimit {
                rlim_cur: 4096,
                rlim_max: 4096,
            };
            if libc::setrlimit(libc::RLIMIT_FSIZE, &limit) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(())
        });
    }
    let output = command
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    assert!(
        stderr.contains("tiny_sd-main.0-0.0.png") && stderr.contains("File too large"),
        "{stderr}"
    );
    let left: Vec<_> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    assert!(
        left.is_empty(),
        "nothing may be left in the output folder: {left:?}"
    );
    daemon.dwctl(&["ping"]).assert_code(0);
}

/// Runs `dwctl ping` against the daemon as the user `nobody`.
fn ping_as_nobody(daemon: &TestDaemon) -> std::process::Output {
    std::process::Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
        .arg(dw_tests::bin_dir().join("dwctl"))
        .args(["--socket", daemon.socket.to_str().unwrap(), "ping"])
        .env("HOME", "/nonexistent")
        .output()
        .unwrap()
}

#[test]
fn another_user_is_refused_by_the_socket_permissions_and_by_the_daemon_itself() {
    if !nix::unistd::getuid().is_root()
        || std::process::Command::new("setpriv")
            .arg("--version")
            .output()
            .is_err()
    {
        eprintln!("skipped: needs root and setpriv to act as another user");
        return;
    }
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
    // dwctl must be reachable by nobody for this test; the binaries live under target/.
    let blocked = ping_as_nobody(&daemon);
    assert_eq!(
        blocked.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&blocked.stderr)
    );
    assert!(
        String::from_utf8_lossy(&blocked.stderr).contains("ermission denied"),
        "{}",
        String::from_utf8_lossy(&blocked.stderr)
    );

    // Open the directory and socket up: dwctl now refuses the socket itself (another user
    // could have planted it), and the daemon's own peer check refuses a raw connection.
    for path in [
        daemon.dir.path(),
        daemon.socket.parent().unwrap(),
        daemon.socket.as_path(),
    ] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o777)).unwrap();
    }
    let refused = ping_as_nobody(&daemon);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(3), "{stderr}");
    assert!(
        stderr.contains("can be written by group or others"),
        "{stderr}"
    );
    let python = std::path::Path::new("/usr/bin/python3");
    if python.exists() {
        let raw = std::process::Command::new("setpriv")
            .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--"])
            .arg(python)
            .args([
                "-c",
                "import socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); s.recv(4096)",
                daemon.socket.to_str().unwrap(),
            ])
            .output()
            .unwrap();
        assert!(
            raw.status.success(),
            "{}",
            String::from_utf8_lossy(&raw.stderr)
        );
        assert!(daemon
            .log()
            .contains("refused a connection from another user"));
    } else {
        eprintln!("skipped the raw connection: no /usr/bin/python3 to make it as another user");
    }
    for path in [daemon.dir.path(), daemon.socket.parent().unwrap()] {
        std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o700)).unwrap();
    }
    std::fs::set_permissions(&daemon.socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    daemon.dwctl(&["ping"]).assert_code(0);
}

// A log on a full disk used to deadlock the daemon (a failed write, then the panic hook
// waiting on the log's own lock): lines are dropped and counted instead.
#[test]
fn a_log_on_a_full_disk_drops_lines_and_the_daemon_keeps_working() {
    let daemon = TestDaemon::new();
    daemon.start(&["--log-file", "/dev/full"]);
    daemon.run_example(&[]).assert_code(0);
    let status = daemon.status();
    assert!(
        status["log_dropped_lines"].as_u64().unwrap() > 0,
        "{status}"
    );
    daemon.run_example(&[]).assert_code(0);
}
