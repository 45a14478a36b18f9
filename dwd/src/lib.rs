//! dwd: the daemon that keeps diffusion pipelines loaded and runs workflows sent to it.
//!
//! The path a job takes is visible in the module names: `server` (accept, handshake,
//! per-connection task) -> `queue` (jobs, cancellation) -> `engine` (workflow: variables,
//! steps, results) -> `pipelines` (stable diffusion, schedulers, tokenizer) with `cache`
//! (loaded components) beside it -> `output` (shared-memory handoff).

pub mod pipelines;
