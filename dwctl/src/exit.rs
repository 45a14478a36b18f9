//! Exit codes, as documented in `--help` and the README, and the error that carries one.

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
