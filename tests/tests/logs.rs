//! Where the daemon's log lives and how big it may grow: the default daemon logs under
//! `$XDG_STATE_HOME/dw/` (the runtime directory is a small tmpfs that goes at logout),
//! `dwctl` reads it from there, and the log rotates at `--log-max`.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use dw_tests::{bin_dir, example_workflow, Run, TestDaemon};

/// `dwctl` as a user without `DWD_SOCKET` runs it: the default socket under
/// `$XDG_RUNTIME_DIR`, the state under `$XDG_STATE_HOME`, both inside `home`.
fn default_dwctl(home: &Path, args: &[&str]) -> Run {
    let output = Command::new(bin_dir().join("dwctl"))
        .args(args)
        .env_remove("DWD_SOCKET")
        .env_remove("DWD_LOG_FILE")
        .env("XDG_RUNTIME_DIR", home.join("run"))
        .env("XDG_STATE_HOME", home.join("state"))
        .current_dir(home)
        .stdin(Stdio::null())
        .output()
        .expect("run dwctl");
    Run::of(output)
}

/// Stops the default daemon of `home` when the test ends, however it ends.
struct StopOnDrop(PathBuf);

impl Drop for StopOnDrop {
    fn drop(&mut self) {
        let _ = default_dwctl(&self.0, &["stop"]);
    }
}

#[test]
fn the_default_daemon_logs_under_the_state_directory_and_dwctl_reads_it_there() {
    let home = tempfile::tempdir().unwrap();
    std::fs::create_dir(home.path().join("run")).unwrap();
    let _stop = StopOnDrop(home.path().to_path_buf());
    let out = home.path().join("out");
    let workflow = example_workflow();
    let args = [
        "run",
        workflow.to_str().unwrap(),
        "-o",
        out.to_str().unwrap(),
        "--json",
    ];
    default_dwctl(home.path(), &args).assert_code(0);

    let log = home.path().join("state/dw/dwd.log");
    let text = std::fs::read_to_string(&log).unwrap();
    assert!(text.contains("job accepted"), "{text}");
    assert!(!home.path().join("run/dwd/dwd.log").exists());
    let status = default_dwctl(home.path(), &["status", "--json"]);
    assert_eq!(
        status.assert_code(0).json()["log_file"],
        log.to_str().unwrap()
    );
    let logs = default_dwctl(home.path(), &["logs", "-n", "50"]);
    assert!(logs.assert_code(0).stdout.contains("job accepted"));
}

#[test]
fn the_log_rotates_at_its_cap_keeping_one_older_file() {
    let daemon = TestDaemon::new();
    daemon.start(&["--log-max", "1KiB"]);
    for _ in 0..6 {
        daemon.run_example(&[]).assert_code(0);
    }
    let old = daemon.log_file().with_extension("log.1");
    assert!(old.exists(), "no rotation: {}", daemon.log());
    for file in [&old, &daemon.log_file()] {
        let len = std::fs::metadata(file).unwrap().len();
        assert!(len <= 1024 + 512, "{} has {len} bytes", file.display());
    }
    assert!(daemon.log().contains("INFO"), "the fresh log is written to");
}
