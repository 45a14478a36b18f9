//! Feeds arbitrary UTF-8 text to the workflow parser as the contents of `fuzz.json`
//! (input that is not UTF-8 is skipped). When the first line contains `=` and more lines
//! follow, it is split off and its `;`-separated parts are passed as `NAME=VALUE`
//! overrides, as typed on the command line.
//!
//! Checks that:
//! - parsing never panics;
//! - every error's text starts with `fuzz.json`, followed by `:line:column: ` when the
//!   error has a position and by `: ` when it has none;
//! - a position has line and column >= 1, its line is at most one past the text's last
//!   line, and its column at most one past the end of that line (in characters);
//! - a workflow that parses has an id, at least one step, uniquely named steps, and the
//!   sha256 of the text it came from.

#![no_main]

use std::path::Path;

use libfuzzer_sys::fuzz_target;
use protocol::workflow::{sha256_hex, Position, Workflow};

fuzz_target!(|data: &[u8]| {
    let Ok(input) = std::str::from_utf8(data) else {
        return;
    };
    let (overrides, text): (Vec<String>, &str) = match input.split_once('\n') {
        Some((first, rest)) if first.contains('=') => {
            (first.split(';').map(str::to_string).collect(), rest)
        }
        _ => (Vec::new(), input),
    };

    match Workflow::parse(Path::new("fuzz.json"), text, &overrides) {
        Ok(workflow) => {
            assert!(
                !workflow.id.trim().is_empty(),
                "a workflow parsed without an id"
            );
            assert!(
                !workflow.steps.is_empty(),
                "a workflow parsed without steps"
            );
            for (i, step) in workflow.steps.iter().enumerate() {
                assert_eq!(step.index, i);
                assert!(
                    workflow.steps[..i].iter().all(|s| s.name != step.name),
                    "two steps named {:?}",
                    step.name
                );
                check_position(text, step.pipeline.model_name_at, "model_name_at");
            }
            assert_eq!(workflow.sha256, sha256_hex(text.as_bytes()));
        }
        Err(error) => {
            let shown = error.to_string();
            assert!(shown.starts_with("fuzz.json"), "{shown}");
            match error.position {
                Some(position) => {
                    check_position(text, position, &shown);
                    let prefix = format!("fuzz.json:{}:{}: ", position.line, position.column);
                    assert!(shown.starts_with(&prefix), "{shown}");
                }
                None => assert!(shown.starts_with("fuzz.json: "), "{shown}"),
            }
        }
    }
});

/// Checks that `position` lies inside `text` or just past the end of one of its lines.
fn check_position(text: &str, position: Position, what: &str) {
    let Position { line, column } = position;
    assert!(
        line >= 1 && column >= 1,
        "position {line}:{column} of {what:?}"
    );
    let lines = text.lines().count();
    assert!(
        line <= lines + 1,
        "line {line} of a text of {lines} lines: {what:?}"
    );
    // Lines as the parser counts them: separated by '\n' only, so a '\r' is a column.
    let line_chars = text
        .split('\n')
        .nth(line - 1)
        .map_or(0, |l| l.chars().count());
    assert!(
        column <= line_chars + 1,
        "column {column} on line {line} of {line_chars} characters: {what:?}"
    );
}
