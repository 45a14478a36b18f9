//! The command line itself: help that teaches the exit codes, and usage errors that exit 2.

use std::process::Command;

fn dwctl(args: &[&str]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_dwctl"))
        .args(args)
        .output()
        .unwrap()
}

#[test]
fn help_documents_every_command_and_the_exit_codes() {
    let output = dwctl(&["--help"]);
    assert!(output.status.success());
    let help = String::from_utf8_lossy(&output.stdout);
    for needle in [
        "run",
        "status",
        "clear",
        "stop",
        "ping",
        "validate",
        "--socket",
        "130  cancelled",
        "3    the daemon is unreachable",
    ] {
        assert!(help.contains(needle), "--help lacks {needle:?}:\n{help}");
    }
    let run_help = String::from_utf8_lossy(&dwctl(&["run", "--help"]).stdout).into_owned();
    for needle in [
        "NAME=VALUE",
        "--output-dir",
        "--json",
        "--timeout",
        "--no-start",
        "Exit codes",
    ] {
        assert!(
            run_help.contains(needle),
            "run --help lacks {needle:?}:\n{run_help}"
        );
    }
}

#[test]
fn an_unknown_command_or_a_missing_argument_exits_2() {
    assert_eq!(dwctl(&["frobnicate"]).status.code(), Some(2));
    assert_eq!(dwctl(&["run"]).status.code(), Some(2));
}

#[test]
fn a_missing_workflow_file_exits_2_naming_it() {
    let output = dwctl(&["validate", "/nonexistent/flow.json"]);
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("/nonexistent/flow.json: cannot read the workflow file"),
        "{stderr}"
    );
}
