//! The socket server: accept, check the peer, handshake, and serve one request per
//! connection.
//!
//! Every connection gets its own task, so a client that connects and says nothing, or
//! sends garbage, delays nobody else. `status`, `clear`, `cancel` and `ping` are answered at
//! once, even while a job runs; `run` queues a job and streams its events back, passing each
//! output's memfd with SCM_RIGHTS. A run's client that hangs up or sends `cancel` cancels
//! its job.

use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use protocol::fdpass::send_with_fd;
use protocol::frame::{body_read, encode, header_read, FrameError, HEADER_LEN};
use protocol::message::{
    ClientMessage, ErrorKind, MemoryReport, RunError, RunRequest, RunSummary, ServerMessage,
    StatusReport, WorkflowInfo,
};
use protocol::paths::DaemonPaths;
use protocol::workflow::{sha256_hex, Workflow};
use protocol::{PROTOCOL_VERSION, TOOL_VERSION};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, watch};

use crate::engine::Engine;
use crate::memory::{device_memory, resident_set_bytes};
use crate::queue::{CancelReason, CancelToken, JobEvent, JobOptions, JobQueue};

/// How long a new connection may take to say hello.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// What every connection task shares.
pub struct DaemonState {
    pub queue: JobQueue,
    /// Shared with the executor: its cache, device and memory policy.
    pub engine: Arc<Engine>,
    pub paths: DaemonPaths,
    pub device_name: String,
    pub started: Instant,
    pub uid: u32,
    /// True once shutting down ([`DaemonState::stop`] sets it with `send_replace`, which
    /// keeps the value even before anything subscribes: a signal can come before the
    /// accept loop starts).
    pub shutdown: watch::Sender<bool>,
}

impl DaemonState {
    /// Starts shutting down: the queue takes no new job (a run that still reaches the
    /// daemon is told it is shutting down, never queued) and cancels its jobs, and the
    /// accept loop stops.
    pub fn stop(&self) {
        self.queue.close();
        self.shutdown.send_replace(true);
    }
}

/// The daemon's flags in effect and where each came from, for `status`.
pub static SETTINGS: std::sync::OnceLock<Vec<protocol::message::Setting>> =
    std::sync::OnceLock::new();

/// The most connections served at once; more are told so and closed, so that no number
/// of clients can take every descriptor the daemon has.
pub const MAX_CONNECTIONS: usize = 256;

/// Accepts connections until shutdown is requested.
pub async fn serve(listener: UnixListener, state: Arc<DaemonState>) {
    let mut shutdown = state.shutdown.subscribe();
    let slots = Arc::new(tokio::sync::Semaphore::new(MAX_CONNECTIONS));
    loop {
        tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => {
                    let state = state.clone();
                    let slot = slots.clone().try_acquire_owned();
                    tokio::spawn(async move {
                        let Ok(_slot) = slot else {
                            refuse_busy(stream).await;
                            return;
                        };
                        if let Err(e) = handle_connection(stream, state).await {
                            tracing::debug!("connection ended: {e}");
                        }
                    });
                }
                Err(e) => {
                    tracing::warn!("accept failed: {e}");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
}

/// Tells a client over [`MAX_CONNECTIONS`] to come back later, and closes.
async fn refuse_busy(stream: UnixStream) {
    tracing::warn!("refused a connection: {MAX_CONNECTIONS} are open already");
    let (_, mut writer) = stream.into_split();
    let message = format!(
        "dwd is serving {MAX_CONNECTIONS} connections already; try again when some have finished"
    );
    let _ = send(&mut writer, &ServerMessage::Refused { message }).await;
}

/// Bytes of large frame bodies all connections together may hold while they arrive: each
/// frame is at most the frame limit (1 MiB), and senders beyond this wait for room before
/// anything is allocated for them, so 256 half-sent frames cannot hold 256 MiB.
pub const FRAME_MEMORY_BYTES: usize = 32 << 20;

/// Frames this small (every request but a large workflow) never wait for room: a hello or a
/// `ping` is answered however many large frames are arriving. At most [`MAX_CONNECTIONS`]
/// of them exist at once (16 MiB).
const SMALL_FRAME_BYTES: usize = 64 << 10;

/// The room left for frame bodies, in KiB.
static FRAME_MEMORY: tokio::sync::Semaphore =
    tokio::sync::Semaphore::const_new(FRAME_MEMORY_BYTES >> 10);

/// Room for a body of `len` bytes, held until it is dropped (none for a small frame).
async fn frame_memory(
    len: usize,
) -> Result<Option<tokio::sync::SemaphorePermit<'static>>, FrameError> {
    if len <= SMALL_FRAME_BYTES {
        return Ok(None);
    }
    let kib = u32::try_from(len.div_ceil(1024)).unwrap_or(u32::MAX);
    FRAME_MEMORY
        .acquire_many(kib)
        .await
        .map(Some)
        .map_err(|e| FrameError::Io(std::io::Error::other(e)))
}

/// Reads one frame, ending it as the blocking reader does ([`header_read`], [`body_read`]);
/// its body waits for room within [`FRAME_MEMORY_BYTES`] before it is allocated.
async fn read_message<T: serde::de::DeserializeOwned>(
    reader: &mut (impl AsyncRead + Unpin),
) -> Result<T, FrameError> {
    let mut header = [0u8; HEADER_LEN];
    let got = read_full(reader, &mut header).await?;
    let len = header_read(got, header)?;
    let _room = frame_memory(len).await?;
    let mut body = vec![0u8; len];
    let got = read_full(reader, &mut body).await?;
    body_read(got, &body)
}

/// Reads until `buf` is full or the stream ends; returns how many bytes were read.
async fn read_full(
    reader: &mut (impl AsyncRead + Unpin),
    buf: &mut [u8],
) -> std::io::Result<usize> {
    let mut filled = 0;
    while filled < buf.len() {
        match reader.read(&mut buf[filled..]).await? {
            0 => break,
            n => filled += n,
        }
    }
    Ok(filled)
}

async fn send(writer: &mut OwnedWriteHalf, message: &ServerMessage) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?).await?;
    Ok(())
}

async fn handle_connection(stream: UnixStream, state: Arc<DaemonState>) -> Result<(), FrameError> {
    let peer_uid = stream.peer_cred().map(|c| c.uid()).ok();
    let (mut reader, mut writer) = stream.into_split();
    if peer_uid != Some(state.uid) {
        return refuse_stranger(peer_uid, &mut reader, &mut writer, &state).await;
    }
    if !handshake(&mut reader, &mut writer, &state).await? {
        return Ok(());
    }
    // A client that goes quiet after the handshake holds a descriptor: give it as long
    // as the handshake, then close.
    let request = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        read_message::<ClientMessage>(&mut reader),
    )
    .await
    {
        Err(_) | Ok(Err(FrameError::Closed)) => return Ok(()),
        Ok(Err(e)) => {
            return bad_request(&mut writer, format!("could not read the request: {e}")).await
        }
        Ok(Ok(request)) => request,
    };
    match request {
        ClientMessage::Run(run) => serve_run(run, reader, writer, &state).await,
        other => answer(other, &mut writer, &state).await,
    }
}

/// Tells another user's client that this daemon is not theirs.
async fn refuse_stranger(
    peer_uid: Option<u32>,
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    state: &DaemonState,
) -> Result<(), FrameError> {
    tracing::warn!(?peer_uid, "refused a connection from another user");
    let message = format!(
        "permission denied: this dwd belongs to uid {}; start your own daemon",
        state.uid
    );
    send(writer, &ServerMessage::Refused { message }).await?;
    // Let the stranger's hello arrive before closing, so it reads the refusal rather
    // than a broken pipe.
    let _ = tokio::time::timeout(
        Duration::from_secs(1),
        read_message::<ClientMessage>(reader),
    )
    .await;
    Ok(())
}

/// Reads the client's hello and answers it; `false` when the connection should close.
async fn handshake(
    reader: &mut OwnedReadHalf,
    writer: &mut OwnedWriteHalf,
    state: &DaemonState,
) -> Result<bool, FrameError> {
    let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, read_message::<ClientMessage>(reader))
        .await
    {
        Err(_) | Ok(Err(FrameError::Closed)) => return Ok(false),
        Ok(Err(e)) => {
            bad_request(writer, format!("could not read the handshake: {e}")).await?;
            return Ok(false);
        }
        Ok(Ok(message)) => message,
    };
    match hello {
        ClientMessage::Hello {
            protocol_version, ..
        } if protocol_version == PROTOCOL_VERSION => {}
        ClientMessage::Hello {
            protocol_version,
            client_version,
        } => {
            let message = format!(
                "dwd {TOOL_VERSION} (protocol {PROTOCOL_VERSION}) is running, dwctl is {client_version} (protocol {protocol_version}): run `dwctl stop`, then retry"
            );
            send(writer, &ServerMessage::Refused { message }).await?;
            return Ok(false);
        }
        other => {
            let message = format!("expected a hello first, got {}", request_name(&other));
            bad_request(writer, message).await?;
            return Ok(false);
        }
    }
    let welcome = ServerMessage::Welcome {
        protocol_version: PROTOCOL_VERSION,
        daemon_version: TOOL_VERSION.to_string(),
        pid: std::process::id(),
        device: state.device_name.clone(),
    };
    send(writer, &welcome).await?;
    Ok(true)
}

/// Answers a request other than `run`.
async fn answer(
    request: ClientMessage,
    writer: &mut OwnedWriteHalf,
    state: &DaemonState,
) -> Result<(), FrameError> {
    let reply = match request {
        ClientMessage::Status => ServerMessage::Status(status(state)),
        ClientMessage::Clear { model } => clear(state, model.as_deref()),
        ClientMessage::Cancel { job_id, session } => {
            let cancelled = state.queue.cancel(job_id, session);
            let message = cancel_message(state, &cancelled, job_id);
            ServerMessage::CancelResult { cancelled, message }
        }
        ClientMessage::Ping => ServerMessage::Pong {
            pid: std::process::id(),
            uptime_ms: state.started.elapsed().as_millis() as u64,
        },
        ClientMessage::Shutdown => {
            tracing::info!("shutdown requested by a client");
            let message = "dwd is shutting down".to_string();
            send(writer, &ServerMessage::ShuttingDown { message }).await?;
            state.stop();
            return Ok(());
        }
        ClientMessage::Hello { .. } | ClientMessage::Run(_) => {
            let message = format!("{} sent out of turn", request_name(&request));
            return bad_request(writer, message).await;
        }
    };
    send(writer, &reply).await
}

/// Unloads `model`'s components, or everything (and the spare output segments).
fn clear(state: &DaemonState, model: Option<&str>) -> ServerMessage {
    let cleared = state.engine.cache.clear(model);
    if model.is_none() {
        let spares = crate::output::release_spares();
        tracing::debug!(bytes = spares, "released the spare output segments");
    }
    tracing::info!(
        unloaded = cleared.unloaded,
        bytes_freed = cleared.bytes_freed,
        "cleared the cache"
    );
    ServerMessage::Cleared {
        unloaded: cleared.unloaded,
        bytes_freed: cleared.bytes_freed,
    }
}

/// What `dwctl cancel` prints: what was cancelled, or why nothing was.
fn cancel_message(state: &DaemonState, cancelled: &[u64], job_id: Option<u64>) -> String {
    match (cancelled, job_id) {
        ([], Some(id)) => format!("no job {id} is queued or running"),
        ([], None) => {
            let jobs = state.queue.snapshot();
            if jobs.is_empty() {
                return "no job is queued or running".to_string();
            }
            let list: Vec<String> = jobs
                .iter()
                .map(|j| format!("{} ({}, {})", j.job_id, j.workflow_id, j.state))
                .collect();
            format!(
                "no job from this shell is queued or running; jobs: {}; give a JOB_ID",
                list.join(", ")
            )
        }
        (ids, _) => {
            let ids: Vec<String> = ids.iter().map(u64::to_string).collect();
            format!("cancelled job {}", ids.join(", "))
        }
    }
}

async fn bad_request(writer: &mut OwnedWriteHalf, message: String) -> Result<(), FrameError> {
    tracing::debug!("bad request: {message}");
    send(
        writer,
        &ServerMessage::Error {
            kind: ErrorKind::BadRequest,
            message,
        },
    )
    .await
}

fn request_name(message: &ClientMessage) -> &'static str {
    match message {
        ClientMessage::Hello { .. } => "hello",
        ClientMessage::Run(_) => "run",
        ClientMessage::Status => "status",
        ClientMessage::Clear { .. } => "clear",
        ClientMessage::Cancel { .. } => "cancel",
        ClientMessage::Ping => "ping",
        ClientMessage::Shutdown => "shutdown",
    }
}

/// Queues a run and streams its events until its `done`; cancels it if the client leaves.
async fn serve_run(
    request: RunRequest,
    reader: OwnedReadHalf,
    mut writer: OwnedWriteHalf,
    state: &DaemonState,
) -> Result<(), FrameError> {
    let workflow = match parse_workflow(&request) {
        Ok(workflow) => workflow,
        Err(summary) => return send(&mut writer, &ServerMessage::Done(*summary)).await,
    };
    if request.dry_run {
        let message = match state.engine.plan(&workflow) {
            Ok(plan) => ServerMessage::Plan(plan),
            Err(e) => ServerMessage::Error {
                kind: e.kind(),
                message: e.to_string(),
            },
        };
        return send(&mut writer, &message).await;
    }
    let workflow_id = workflow.id.clone();
    let (events_tx, events) = mpsc::unbounded_channel();
    let options = JobOptions {
        timeout_ms: request.timeout_ms,
        keep_alive_ms: request.keep_alive_ms,
        session: request.session,
    };
    let Ok((job_id, queue_position, cancel)) = state.queue.submit(workflow, options, events_tx)
    else {
        let message = "dwd is shutting down and accepts no new jobs".to_string();
        let kind = ErrorKind::ShuttingDown;
        return send(&mut writer, &ServerMessage::Error { kind, message }).await;
    };
    tracing::info!(job = job_id, workflow = %workflow_id, path = %request.workflow_path, "job accepted");
    let accepted = ServerMessage::Accepted {
        job_id,
        queue_position,
    };
    send(&mut writer, &accepted)
        .await
        .inspect_err(|_| cancel.cancel(CancelReason::Client))?;
    let stream = RunStream {
        job_id,
        workflow_id,
        timeout_ms: request.timeout_ms,
        cancel,
        reader,
        writer,
        client_gone: false,
    };
    stream.serve(events, state).await
}

/// The request's workflow, parsed as it was sent, or the summary of why it is invalid.
fn parse_workflow(request: &RunRequest) -> Result<Workflow, Box<RunSummary>> {
    let path = Path::new(&request.workflow_path);
    match Workflow::parse(path, &request.workflow_source, &request.overrides) {
        Ok(mut workflow) => {
            for (step, seed) in &request.seeds {
                // A step the workflow no longer has keeps nothing to pin.
                workflow.pin_seed(step, *seed);
            }
            workflow.cwd = request.cwd.as_ref().map(std::path::PathBuf::from);
            Ok(workflow)
        }
        Err(e) => {
            let workflow = WorkflowInfo {
                id: String::new(),
                path: request.workflow_path.clone(),
                sha256: sha256_hex(request.workflow_source.as_bytes()),
            };
            let error = RunError {
                pointer: e.pointer.clone(),
                ..RunError::new(ErrorKind::InvalidWorkflow, e.to_string())
            };
            Err(Box::new(RunSummary::failed(0, workflow, error, 0)))
        }
    }
}

/// A queued job's connection: its events go out, a `cancel` or a hang-up comes in.
struct RunStream {
    job_id: u64,
    workflow_id: String,
    timeout_ms: Option<u64>,
    cancel: CancelToken,
    reader: OwnedReadHalf,
    writer: OwnedWriteHalf,
    /// The client hung up: the job is cancelled, its events are drained unsent.
    client_gone: bool,
}

impl RunStream {
    /// Streams the job's events until its `done`, with a heartbeat while it is quiet.
    async fn serve(
        mut self,
        mut events: mpsc::UnboundedReceiver<JobEvent>,
        state: &DaemonState,
    ) -> Result<(), FrameError> {
        // `--timeout` counts the wait in the queue too: a job still waiting when it passes
        // is answered at once (the executor skips it when its turn comes).
        let deadline = self
            .timeout_ms
            .map(|ms| tokio::time::Instant::now() + Duration::from_millis(ms));
        let mut deadline_seen = false;
        let mut heartbeat = tokio::time::interval(protocol::message::HEARTBEAT);
        heartbeat.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            let gone = self.client_gone;
            tokio::select! {
                _ = sleep_until_some(deadline), if !gone && !deadline_seen => {
                    deadline_seen = true;
                    if state.queue.is_waiting(self.job_id) {
                        return self.timed_out_waiting().await;
                    }
                }
                _ = heartbeat.tick(), if !gone => {
                    let beat = ServerMessage::Heartbeat { job_id: self.job_id };
                    if send(&mut self.writer, &beat).await.is_err() {
                        self.hung_up("client went away");
                    }
                }
                event = events.recv() => {
                    heartbeat.reset();
                    let Some(event) = event else { return Ok(()) };
                    if self.forward(event).await {
                        return Ok(());
                    }
                }
                message = read_message::<ClientMessage>(&mut self.reader), if !gone => {
                    self.client_said(message);
                }
            }
        }
    }

    /// Sends one event on (unless the client is gone); `true` once the job is done.
    async fn forward(&mut self, event: JobEvent) -> bool {
        let done = matches!(event, JobEvent::Done(_));
        if let JobEvent::Done(summary) = &event {
            log_done(self.job_id, summary);
        }
        if !self.client_gone {
            if let Err(e) = send_event(&mut self.writer, self.job_id, event).await {
                self.hung_up(&format!("client went away ({e})"));
            }
        }
        done
    }

    fn client_said(&mut self, message: Result<ClientMessage, FrameError>) {
        match message {
            Ok(ClientMessage::Cancel { .. }) => {
                tracing::info!(job = self.job_id, "cancel requested by its client");
                self.cancel.cancel(CancelReason::Client);
            }
            Ok(other) => tracing::debug!(
                job = self.job_id,
                "ignoring {} during a run",
                request_name(&other)
            ),
            Err(e) => self.hung_up(&format!("client disconnected ({e})")),
        }
    }

    fn hung_up(&mut self, why: &str) {
        tracing::info!(job = self.job_id, "{why}; cancelling its job");
        self.cancel.cancel(CancelReason::Client);
        self.client_gone = true;
    }

    /// Answers a job whose timeout passed while it waited in the queue.
    async fn timed_out_waiting(mut self) -> Result<(), FrameError> {
        self.cancel.cancel(CancelReason::Timeout);
        let timeout_ms = self.timeout_ms.unwrap_or(0);
        let summary = timed_out_in_queue(self.job_id, &self.workflow_id, timeout_ms);
        send(&mut self.writer, &ServerMessage::Done(summary)).await
    }
}

fn log_done(job_id: u64, summary: &RunSummary) {
    let error = summary.error.as_ref().map_or("", |e| e.message.as_str());
    tracing::info!(
        job = job_id,
        outcome = ?summary.outcome,
        run_ms = summary.timings.run_ms,
        load_ms = summary.timings.load_ms,
        error,
        "job done"
    );
}

/// Sleeps until `deadline`, or forever without one.
async fn sleep_until_some(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(deadline) => tokio::time::sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}

/// The answer to a job whose `--timeout` passed while it waited for its turn.
fn timed_out_in_queue(job_id: u64, workflow_id: &str, timeout_ms: u64) -> RunSummary {
    let workflow = WorkflowInfo {
        id: workflow_id.to_string(),
        ..WorkflowInfo::default()
    };
    let message = format!(
        "timed out after {} s (--timeout) while waiting in the queue, and was cancelled",
        timeout_ms as f64 / 1000.0
    );
    let error = RunError::new(ErrorKind::Timeout, message);
    RunSummary::failed(job_id, workflow, error, timeout_ms)
}

async fn send_event(
    writer: &mut OwnedWriteHalf,
    job_id: u64,
    event: JobEvent,
) -> Result<(), FrameError> {
    let message = match event {
        JobEvent::Log { level, message } => ServerMessage::Log {
            job_id,
            level,
            message,
        },
        JobEvent::Progress { step, phase, i, n } => ServerMessage::Progress {
            job_id,
            step,
            phase,
            i,
            n,
        },
        JobEvent::Done(summary) => ServerMessage::Done(summary),
        JobEvent::Output {
            descriptor,
            segment,
        } => {
            let bytes = encode(&ServerMessage::Output(descriptor))?;
            let socket: &UnixStream = writer.as_ref();
            let sent = loop {
                socket.writable().await?;
                match socket.try_io(tokio::io::Interest::WRITABLE, || {
                    send_with_fd(socket.as_raw_fd(), &bytes, segment.fd())
                }) {
                    Ok(n) => break n,
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => continue,
                    Err(e) => return Err(FrameError::Io(e)),
                }
            };
            writer.write_all(&bytes[sent..]).await?;
            // Unmapping and freeing the pages is the background thread's work.
            crate::output::retire(segment);
            return Ok(());
        }
    };
    send(writer, &message).await
}

fn status(state: &DaemonState) -> StatusReport {
    let engine = &state.engine;
    let device = device_memory(&engine.device);
    StatusReport {
        pid: std::process::id(),
        version: TOOL_VERSION.to_string(),
        device: state.device_name.clone(),
        uptime_s: state.started.elapsed().as_secs(),
        socket: state.paths.socket.display().to_string(),
        log_file: state.paths.log.display().to_string(),
        log_dropped_lines: crate::logging::dropped_lines(),
        settings: SETTINGS.get().cloned().unwrap_or_default(),
        runs: state.queue.runs(),
        queue: state.queue.snapshot(),
        loaded: engine.cache.report(),
        memory: MemoryReport {
            rss_bytes: resident_set_bytes(),
            device_used_bytes: device.map(|(used, _)| used),
            device_total_bytes: device.map(|(_, total)| total),
            budget_bytes: engine.cache.budget(),
            budget_source: engine.budget_source.clone(),
            loaded_bytes: engine.cache.loaded_bytes(),
            baseline_bytes: engine.baseline.get(),
        },
    }
}
