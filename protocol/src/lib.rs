//! The contract shared by `dwd` and `dwctl`.
//!
//! - [`frame`]: length-prefixed MessagePack frames and their size limit.
//! - [`input`]: reading the files a workflow names: regular files only, bounded.
//! - [`message`]: what client and daemon say to each other (handshake, requests, run events).
//! - [`models`]: where a workflow's `model_name` points (a folder, or the hub cache).
//! - [`paths`]: where the socket, lock and log files live.
//! - [`families`]: the pipeline classes each family serves, its components and arguments.
//! - [`fdpass`]: sending and receiving frames that carry a file descriptor (SCM_RIGHTS).
//! - [`shm`]: sealed memfd segments that carry output tensors from the daemon to the client.
//! - [`units`]: durations and sizes as users type them (keep-alive, memory budget).
//! - [`workflow`]: the diffusers-workflow JSON format, parsed and validated the same way on
//!   both sides, so `dwctl validate` needs no daemon.

pub mod families;
pub mod fdpass;
pub mod frame;
pub mod input;
pub mod message;
pub mod models;
pub mod paths;
pub mod shm;
pub mod units;
pub mod workflow;

/// Bumped whenever a message changes in a way an older peer cannot read.
pub const PROTOCOL_VERSION: u32 = 3;

/// The version of the dw tools this crate was built with.
pub const TOOL_VERSION: &str = env!("CARGO_PKG_VERSION");
