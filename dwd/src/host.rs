//! What the engine reports to while it runs a workflow, and how it learns it must stop.
//!
//! The engine knows nothing of jobs, queues or connections: it logs, reports progress,
//! hands over outputs and asks whether to stop through a [`Host`]. The queue's `Job` is the
//! host of a real run; tests can bring their own.

use protocol::message::{LogLevel, OutputDescriptor, Phase};
use protocol::shm::SealedSegment;

/// Why a run was stopped early.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CancelReason {
    /// The client asked (Ctrl-C, `dwctl cancel`) or hung up.
    Client,
    /// The job ran past the timeout its client gave.
    Timeout,
    /// The daemon is shutting down.
    Shutdown,
}

/// Where a run's events go.
pub trait Host: Sync {
    /// The id outputs are tagged with.
    fn job_id(&self) -> u64;

    fn log(&self, level: LogLevel, message: String);

    /// `i` of `n` in `phase` of `step`.
    fn progress(&self, step: &str, phase: Phase, i: u32, n: u32);

    /// An output, its bytes in a sealed segment.
    fn output(&self, descriptor: OutputDescriptor, segment: SealedSegment);

    /// Why the run must stop, once it must.
    fn cancelled(&self) -> Option<CancelReason>;
}
