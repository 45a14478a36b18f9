//! Exit codes, as documented in `--help` and the README, and the error that carries one.

use protocol::message::ErrorKind;

/// The workflow ran and its outputs are written.
pub const EXIT_OK: u8 = 0;
/// The workflow failed while running (or an output could not be written).
pub const EXIT_FAILED: u8 = 1;
/// Bad usage, or an invalid workflow or variable.
pub const EXIT_INVALID: u8 = 2;
/// The daemon is unreachable, refused us, or died.
pub const EXIT_UNREACHABLE: u8 = 3;
/// Cancelled (Ctrl-C).
pub const EXIT_CANCELLED: u8 = 130;

/// A failure with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: u8,
    pub message: String,
}

impl Failure {
    pub fn new(code: u8, message: impl Into<String>) -> Self {
        Failure {
            code,
            message: message.into(),
        }
    }
}

/// The exit code for a daemon's error kind: the one table the README prints.
pub fn exit_code_for(kind: ErrorKind) -> u8 {
    match kind {
        ErrorKind::InvalidWorkflow | ErrorKind::NotFound => EXIT_INVALID,
        ErrorKind::Failed | ErrorKind::Panicked | ErrorKind::Timeout | ErrorKind::OverBudget => {
            EXIT_FAILED
        }
        ErrorKind::BadRequest => EXIT_FAILED,
        ErrorKind::Cancelled => EXIT_CANCELLED,
        ErrorKind::ShuttingDown | ErrorKind::VersionMismatch | ErrorKind::PermissionDenied => {
            EXIT_UNREACHABLE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every kind the protocol has, as it is written on the wire.
    const KINDS: &[ErrorKind] = &[
        ErrorKind::InvalidWorkflow,
        ErrorKind::NotFound,
        ErrorKind::Failed,
        ErrorKind::Panicked,
        ErrorKind::Timeout,
        ErrorKind::OverBudget,
        ErrorKind::BadRequest,
        ErrorKind::Cancelled,
        ErrorKind::ShuttingDown,
        ErrorKind::VersionMismatch,
        ErrorKind::PermissionDenied,
    ];

    #[test]
    fn the_readme_lists_every_error_kind_with_its_exit_code() {
        let readme = include_str!("../../README.md");
        for kind in KINDS {
            let name = serde_json::to_value(kind).expect("a kind serializes");
            let row = format!(
                "| `{}` | {} |",
                name.as_str().unwrap_or(""),
                exit_code_for(*kind)
            );
            assert!(readme.contains(&row), "README.md should have the row {row}");
        }
    }
}
