//! dwd: the daemon that keeps diffusion pipelines loaded and runs workflows sent to it.
//!
//! The path a job takes is visible in the module names: [`server`] (accept, handshake,
//! per-connection task) -> [`queue`] (jobs, cancellation; a job is the engine's [`host`])
//! -> [`engine`] (workflow: steps, results; fails with a typed [`failure`]) ->
//! [`loading`] (a step's components by name, from the [`cache`]) -> [`pipelines`] (one
//! folder per family behind one trait, and the blocks they share), with [`models`] (where a
//! model's folder is) and [`inputs`] (latents and images a step reads) beside it ->
//! [`saving`] and [`output`] (shared-memory handoff).

pub mod budget;
pub mod cache;
pub mod engine;
pub mod failure;
pub mod fanout;
pub mod fetch;
pub mod host;
pub mod imaging;
pub mod inputs;
pub mod loading;
pub mod logging;
pub mod memory;
pub use protocol::models;
pub mod output;
pub mod pipelines;
pub mod qr;
pub mod queue;
pub mod saving;
pub mod server;
pub mod tasks;
pub mod warm_up;
