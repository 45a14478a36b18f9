//! What client and daemon say to each other.
//!
//! A connection starts with [`ClientMessage::Hello`], answered by [`ServerMessage::Welcome`]
//! or [`ServerMessage::Refused`]. Then the client sends one request. `status`, `clear`,
//! `cancel`, `ping` and `shutdown` get one answer; `run` gets a stream: `accepted`, then any
//! number of `log`, `progress` and `output` frames, then exactly one `done`. Each `output`
//! frame travels with a file descriptor (see [`crate::fdpass`] and [`crate::shm`]).

use serde::{Deserialize, Serialize};

/// Everything a client can send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ClientMessage {
    Hello {
        protocol_version: u32,
        client_version: String,
    },
    Run(RunRequest),
    Status,
    Clear {
        model: Option<String>,
    },
    /// Cancel `job_id`, or else the latest job of `session` (the caller's shell).
    Cancel {
        job_id: Option<u64>,
        #[serde(default)]
        session: Option<u32>,
    },
    Ping,
    Shutdown,
}

/// A workflow to run. The client sends the file's text so that the daemon runs exactly what
/// the client validated and hashed; relative paths inside it resolve against `workflow_path`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunRequest {
    /// Absolute path of the workflow file.
    pub workflow_path: String,
    /// The file's contents.
    pub workflow_source: String,
    /// `NAME=VALUE` variable overrides, as typed on the command line.
    #[serde(default)]
    pub overrides: Vec<String>,
    /// The client's working directory, where a relative `model_name` is looked for first.
    #[serde(default)]
    pub cwd: Option<String>,
    /// Cancel the job if it has not finished this long after it was accepted.
    #[serde(default)]
    pub timeout_ms: Option<u64>,
    /// How long the components this run uses stay loaded once it ends: `None` for the
    /// daemon's `--keep-alive`, a negative value for forever, 0 to unload right away.
    #[serde(default)]
    pub keep_alive_ms: Option<i64>,
    /// Say what would be loaded and evicted, and whether it fits, without running.
    #[serde(default)]
    pub dry_run: bool,
    /// Who asked: the client's parent process (its shell), so `dwctl cancel` can find the
    /// caller's latest job.
    #[serde(default)]
    pub session: Option<u32>,
    /// Seeds to run steps with instead of their own (by step name): `dwctl run --from`
    /// repeats a run whose seed was drawn at random.
    #[serde(default)]
    pub seeds: Vec<(String, u64)>,
}

/// How often a running job's connection hears from the daemon at least.
pub const HEARTBEAT: std::time::Duration = std::time::Duration::from_secs(2);

/// Everything the daemon can send.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ServerMessage {
    Welcome {
        protocol_version: u32,
        daemon_version: String,
        pid: u32,
        device: String,
    },
    /// The handshake was refused; `message` says what to do.
    Refused {
        message: String,
    },
    /// A request could not be understood or served.
    Error {
        kind: ErrorKind,
        message: String,
    },
    Pong {
        pid: u32,
        uptime_ms: u64,
    },
    Status(StatusReport),
    Cleared {
        unloaded: u64,
        bytes_freed: u64,
    },
    CancelResult {
        cancelled: Vec<u64>,
        message: String,
    },
    ShuttingDown {
        message: String,
    },
    Accepted {
        job_id: u64,
        queue_position: u32,
    },
    Log {
        job_id: u64,
        level: LogLevel,
        message: String,
    },
    Progress {
        job_id: u64,
        step: String,
        phase: Phase,
        i: u32,
        n: u32,
    },
    /// Describes the memfd that travels with this frame.
    Output(OutputDescriptor),
    /// The answer to a dry run.
    Plan(RunPlan),
    Done(RunSummary),
    /// Sent during a run every [`HEARTBEAT`] when nothing else is, so a client can tell a
    /// slow step from a daemon that stopped answering.
    Heartbeat {
        job_id: u64,
    },
}

/// Why a request or a job did not succeed. Scripts match on these names.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorKind {
    /// The workflow file or its overrides are invalid (dwctl exits 2).
    InvalidWorkflow,
    /// The workflow was valid but failed while running (dwctl exits 1).
    Failed,
    /// A job panicked; the daemon caught it and kept serving (dwctl exits 1).
    Panicked,
    /// The job ran past its timeout and was cancelled (dwctl exits 1).
    Timeout,
    /// The job was cancelled by its client (dwctl exits 130).
    Cancelled,
    /// The daemon is shutting down (dwctl exits 3).
    ShuttingDown,
    /// The request was not understood: malformed frame, unknown request, no handshake.
    BadRequest,
    /// Client and daemon speak different protocol versions.
    VersionMismatch,
    /// The peer is another user.
    PermissionDenied,
    /// The models a run needs do not fit in the memory budget, even alone (dwctl exits 1).
    OverBudget,
    /// A model, component or file the workflow names is not there (dwctl exits 2).
    NotFound,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum LogLevel {
    Info,
    Warn,
}

/// What a job is doing.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Phase {
    Loading,
    Encoding,
    Denoising,
    Decoding,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Loading => "loading",
            Phase::Encoding => "encoding",
            Phase::Denoising => "denoising",
            Phase::Decoding => "decoding",
        }
    }
}

/// Element type of an output tensor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ElementType {
    U8,
    F32,
}

impl ElementType {
    pub fn size(self) -> usize {
        match self {
            ElementType::U8 => 1,
            ElementType::F32 => 4,
        }
    }
}

/// One output tensor, handed over in a sealed memfd.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct OutputDescriptor {
    pub job_id: u64,
    pub workflow_id: String,
    pub step: String,
    pub step_index: u32,
    pub result_index: u32,
    pub artifact_index: u32,
    /// The file to write inside the output directory, named as diffusers-workflow names
    /// it; the client writes it only if it is a plain file name.
    pub file_name: String,
    /// `image/png`, `image/jpeg`, `image/webp`, `text/plain`, `application/json`, or
    /// `application/x-safetensors` for plain tensors.
    pub content_type: String,
    pub element_type: ElementType,
    /// Row-major shape; images are `[height, width, channels]`.
    pub shape: Vec<u64>,
    /// Bytes of tensor data at the start of the memfd.
    pub byte_len: u64,
    /// Whether the generation parameters belong in the written file.
    pub embed_metadata: bool,
    /// AUTOMATIC1111-style `parameters` text.
    pub parameters: String,
    /// JSON: the step's resolved arguments, the workflow id and its sha256.
    pub dw_metadata: String,
}

/// The end of a run.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunSummary {
    pub job_id: u64,
    pub outcome: Outcome,
    pub workflow: WorkflowInfo,
    pub timings: Timings,
    pub cache: CacheCounts,
    pub error: Option<RunError>,
}

impl RunSummary {
    /// The summary of a job that failed with `error` before it ran (or without running):
    /// nothing loaded, nothing timed but `total_ms`.
    pub fn failed(job_id: u64, workflow: WorkflowInfo, error: RunError, total_ms: u64) -> Self {
        RunSummary {
            job_id,
            outcome: Outcome::Failed,
            workflow,
            timings: Timings {
                total_ms,
                ..Timings::default()
            },
            cache: CacheCounts::default(),
            error: Some(error),
        }
    }
}

impl RunError {
    pub fn new(kind: ErrorKind, message: impl Into<String>) -> Self {
        RunError {
            kind,
            message: message.into(),
            pointer: None,
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Outcome {
    Finished,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct WorkflowInfo {
    pub id: String,
    pub path: String,
    pub sha256: String,
}

/// Milliseconds. `run_ms` is the time the job spent computing in the daemon; `load_ms` the
/// part of it spent loading weights; `total_ms` from acceptance to the end (queueing included).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct Timings {
    pub load_ms: u64,
    pub run_ms: u64,
    pub total_ms: u64,
}

/// Model components found already loaded (hits) or loaded for this run (misses).
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub struct CacheCounts {
    pub hits: u64,
    pub misses: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunError {
    pub kind: ErrorKind,
    pub message: String,
    /// Where in the workflow file the offending value is (a JSON pointer), when known.
    #[serde(default)]
    pub pointer: Option<String>,
}

/// The answer to `status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct StatusReport {
    pub pid: u32,
    pub version: String,
    pub device: String,
    pub uptime_s: u64,
    pub socket: String,
    pub log_file: String,
    /// Log lines that could not be written (a full disk) since the daemon started.
    #[serde(default)]
    pub log_dropped_lines: u64,
    /// The daemon's flags as they are in effect, and where each value came from.
    #[serde(default)]
    pub settings: Vec<Setting>,
    /// Jobs finished since start, whatever their outcome.
    pub runs: u64,
    pub queue: Vec<QueuedJob>,
    pub loaded: Vec<LoadedComponent>,
    pub memory: MemoryReport,
}

/// One of the daemon's settings: its flag, value and where the value came from (`flag`,
/// `env` or `default`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Setting {
    pub name: String,
    pub value: String,
    pub source: String,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QueuedJob {
    pub job_id: u64,
    pub workflow_id: String,
    /// `running` or `queued`.
    pub state: String,
    /// 0 for the running job, then 1, 2, ... in the order they will run.
    pub position: u32,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LoadedComponent {
    /// Resolved location of the model folder.
    pub model: String,
    /// `unet`, `vae`, `text_encoder`, `tokenizer`.
    pub component_type: String,
    pub dtype: String,
    pub device: String,
    pub bytes: u64,
    pub hits: u64,
    pub last_used_unix: u64,
    /// When it is unloaded if unused until then; `None`: kept until cleared.
    #[serde(default)]
    pub keep_until_unix: Option<u64>,
    /// Whether a running job holds it (it cannot be evicted then).
    #[serde(default)]
    pub in_use: bool,
    /// The workflows (`id:step`) that have used it.
    #[serde(default)]
    pub users: Vec<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MemoryReport {
    pub rss_bytes: u64,
    pub device_used_bytes: Option<u64>,
    pub device_total_bytes: Option<u64>,
    /// Bytes loaded components may take (`--memory-budget`).
    #[serde(default)]
    pub budget_bytes: u64,
    /// What set the budget: `--memory-budget`, or a share of physical memory, a cgroup's
    /// limit or the device's memory.
    #[serde(default)]
    pub budget_source: String,
    /// Bytes the loaded components take.
    #[serde(default)]
    pub loaded_bytes: u64,
    /// Process memory (device memory on a GPU) measured right after the last load; runs
    /// are compared with it to warn about growth.
    #[serde(default)]
    pub baseline_bytes: Option<u64>,
}

/// What a run would load and evict (`dwctl run --dry-run`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct RunPlan {
    pub workflow: WorkflowInfo,
    pub components: Vec<PlannedComponent>,
    /// Bytes that would be loaded.
    pub load_bytes: u64,
    /// Idle components that would be unloaded first to make room, least recently used first.
    pub evict: Vec<PlannedComponent>,
    pub budget_bytes: u64,
    /// Bytes loaded now.
    pub loaded_bytes: u64,
    pub fits: bool,
    /// Why it does not fit, when it does not.
    pub message: Option<String>,
}

/// One component of a plan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PlannedComponent {
    pub step: String,
    pub model: String,
    pub component_type: String,
    pub dtype: String,
    pub bytes: u64,
    /// Already loaded (nothing to do).
    pub loaded: bool,
}
