//! `dwctl run`: validate the workflow here, send it to the daemon, show its progress, and
//! write the outputs it hands over.

use crate::stdout::outln;
use std::io::IsTerminal;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressStyle};
use protocol::frame::encode;
use protocol::message::{
    ClientMessage, ElementType, ErrorKind, LogLevel, Outcome, OutputDescriptor, RunError, RunPlan,
    RunRequest, RunSummary, ServerMessage,
};
use protocol::paths::DaemonPaths;
use protocol::shm::MappedOutput;
use protocol::units::KeepAlive;
use protocol::workflow::results::is_plain_file_name;
use protocol::workflow::Workflow;
use serde_json::json;

use crate::connection::{died, Connection};
use crate::exit::{
    exit_code_for, Failure, EXIT_CANCELLED, EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNREACHABLE,
};
use crate::files::{write_bytes, write_image, write_tensor, PngText, RgbView};
use crate::human::human_bytes;

/// What `run` was asked to do.
#[derive(Clone)]
pub struct RunOptions {
    pub workflow: PathBuf,
    pub assignments: Vec<String>,
    /// Seeds to pin, by step name (`--from`).
    pub seeds: Vec<(String, u64)>,
    /// What the workflow file must still be (`--from`).
    pub recorded: Option<crate::recall::Recorded>,
    pub output_dir: PathBuf,
    pub json: bool,
    pub timeout: Option<Duration>,
    pub start_daemon: bool,
    pub keep_alive: Option<KeepAlive>,
    pub dry_run: bool,
    /// Print nothing but errors (and the `--json` object).
    pub quiet: bool,
    /// Show each output image in the terminal.
    pub preview: bool,
}

impl RunOptions {
    /// Options to run `target`, writing into `output_dir`, with progress shown and nothing
    /// else asked for.
    pub fn new(
        target: crate::recall::Recalled,
        output_dir: PathBuf,
        keep_alive: Option<KeepAlive>,
        start_daemon: bool,
        preview: bool,
    ) -> Self {
        RunOptions {
            workflow: target.workflow,
            assignments: target.assignments,
            seeds: target.seeds,
            recorded: target.recorded,
            output_dir,
            json: false,
            timeout: None,
            start_daemon,
            keep_alive,
            dry_run: false,
            quiet: false,
            preview,
        }
    }
}

/// With `DWCTL_TRACE` set, prints `dwctl trace <unix µs> <what>` to stderr at each phase of
/// a run (connect, handshake, each output's map, encode, sync and rename, the final frame),
/// so the client's share of a run's wall time can be broken down without a tracer.
pub fn trace(what: &str) {
    static ON: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    if *ON.get_or_init(|| std::env::var_os("DWCTL_TRACE").is_some()) {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default();
        eprintln!("dwctl trace {} {what}", now.as_micros());
    }
}

/// The caller's session: this process's parent (the shell, or make), so `dwctl cancel`
/// from the same shell finds the job.
pub fn session_id() -> u32 {
    nix::unistd::getppid().as_raw() as u32
}

/// One written output.
pub struct WrittenOutput {
    pub step: String,
    pub path: PathBuf,
    pub content_type: String,
    pub width: u64,
    pub height: u64,
    /// The pixels of an image output, kept when a preview was asked for.
    pub rgb: Option<Vec<u8>>,
}

/// How progress is shown: a bar on a terminal, one plain line per event otherwise.
enum Display {
    Bar(ProgressBar),
    Lines,
    Quiet,
}

impl Display {
    fn new(quiet: bool) -> Self {
        if quiet {
            Display::Quiet
        } else if std::io::stderr().is_terminal() {
            let bar = ProgressBar::new(0);
            // NO_COLOR: the same bar without bold text.
            let template = if no_color() {
                "{spinner} {prefix} {msg:10} [{bar:30}] {pos}/{len} {elapsed}"
            } else {
                "{spinner} {prefix:.bold} {msg:10} [{bar:30}] {pos}/{len} {elapsed}"
            };
            bar.set_style(
                ProgressStyle::with_template(template)
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
            );
            bar.enable_steady_tick(Duration::from_millis(100));
            Display::Bar(bar)
        } else {
            Display::Lines
        }
    }

    fn line(&self, text: &str) {
        match self {
            Display::Bar(bar) => bar.println(text),
            Display::Lines => eprintln!("{text}"),
            Display::Quiet => {}
        }
    }

    fn progress(&self, step: &str, phase: &str, i: u32, n: u32) {
        match self {
            Display::Bar(bar) => {
                bar.set_prefix(step.to_string());
                bar.set_message(phase.to_string());
                bar.set_length(u64::from(n));
                bar.set_position(u64::from(i));
            }
            Display::Lines => eprintln!("[{step}] {phase} {i}/{n}"),
            Display::Quiet => {}
        }
    }

    fn finish(&self) {
        if let Display::Bar(bar) = self {
            bar.finish_and_clear();
        }
    }
}

/// Runs a workflow once, as `dwctl run` does; returns the exit code.
pub fn run(paths: &DaemonPaths, options: RunOptions) -> Result<u8, Failure> {
    let started = Instant::now();
    trace("start");
    if options.quiet || options.json {
        crate::connection::set_quiet();
    }
    let mut attempts = 0;
    let outcome = loop {
        attempts += 1;
        let Some(outcome) = execute(paths, &options, &mut |stream| watch_for_interrupt(stream))?
        else {
            return Ok(EXIT_OK);
        };
        // A daemon that was stopping (another shell's `dwctl stop`) took the job but never
        // ran it: wait for it to exit, and run on a fresh one.
        if options.start_daemon && attempts < 3 && never_ran_on_a_stopping_daemon(&outcome) {
            if !options.quiet && !options.json {
                eprintln!("dwctl: dwd is stopping; starting a fresh one when it has exited");
            }
            if crate::connection::wait_for_exit(paths) {
                continue;
            }
        }
        break outcome;
    };
    if let Some(code) = outcome.plan_code {
        return Ok(code);
    }
    let code = exit_code(&outcome.summary);
    if options.preview {
        show_previews(&outcome.outputs);
    }
    if options.json {
        outln!(
            "{}",
            json_summary(&outcome.summary, &outcome.outputs, outcome.job_id)
        );
    } else if !options.quiet || code != EXIT_OK {
        report(&outcome.summary, &outcome.outputs, started.elapsed());
    }
    trace("reported");
    Ok(code)
}

/// Whether the daemon was shutting down and the job never started (nothing ran, nothing was
/// written), so running it on a fresh daemon loses nothing.
fn never_ran_on_a_stopping_daemon(outcome: &RunOutcome) -> bool {
    let summary = &outcome.summary;
    let kind = summary.error.as_ref().map(|e| e.kind);
    kind == Some(ErrorKind::ShuttingDown)
        && summary.timings.run_ms == 0
        && outcome.outputs.is_empty()
}

/// What one run produced.
pub struct RunOutcome {
    pub job_id: u64,
    pub summary: RunSummary,
    pub outputs: Vec<WrittenOutput>,
    /// Set for a dry run: its exit code (the plan was printed).
    pub plan_code: Option<u8>,
}

/// Validates, submits and follows one run, writing its outputs. `on_submitted` gets the
/// connection's stream once the job is queued (to cancel it from elsewhere) and returns a
/// flag that tells whether the caller interrupted it. Progress is shown unless `quiet`
/// or `json`; the final report is the caller's.
pub fn execute(
    paths: &DaemonPaths,
    options: &RunOptions,
    on_submitted: &mut dyn FnMut(&UnixStream) -> Result<Arc<AtomicBool>, Failure>,
) -> Result<Option<RunOutcome>, Failure> {
    let (workflow, request) = prepare(options)?;
    trace("validated");
    let mut connection = Connection::open(paths, options.start_daemon)?;
    trace("welcomed");
    connection
        .send(&ClientMessage::Run(request))
        .map_err(|e| died(paths, e))?;
    if options.dry_run {
        return dry_run(paths, &mut connection, options.json).map(Some);
    }
    let interrupted = on_submitted(connection.reader.stream())?;
    let display = Display::new(options.json || options.quiet);
    display.line(&format!(
        "running `{}` ({} step(s)) on dwd pid {} ({})",
        workflow.id,
        workflow.steps.len(),
        connection.daemon_pid,
        connection.daemon_device
    ));
    let writer = OutputWriter::start(options.output_dir.clone(), options.preview)?;
    let mut follow = Follow {
        display,
        writer,
        job_id: 0,
    };
    let summary = loop {
        let message = match connection.receive() {
            Ok(message) => message,
            Err(_) if interrupted.load(Ordering::SeqCst) => {
                return Err(follow.abandon(Failure::new(EXIT_CANCELLED, "cancelled")))
            }
            Err(e) => return Err(follow.abandon(died(paths, e))),
        };
        if let Some(summary) = follow.handle(message, &mut connection)? {
            break summary;
        }
    };
    let outputs = follow.writer.finish(&follow.display);
    follow.display.finish();
    Ok(Some(RunOutcome {
        job_id: follow.job_id,
        summary,
        outputs: outputs?,
        plan_code: None,
    }))
}

/// Reads and validates the workflow here first (errors come back at once, with the path
/// as the user typed it), makes the output folder, and builds the request.
fn prepare(options: &RunOptions) -> Result<(Workflow, RunRequest), Failure> {
    let workflow_path = std::path::absolute(&options.workflow)
        .map_err(|e| Failure::new(EXIT_INVALID, format!("{}: {e}", options.workflow.display())))?;
    let source = protocol::workflow::read_source(&workflow_path)
        .map_err(|e| Failure::new(EXIT_INVALID, e.to_string()))?;
    if let Some(recorded) = &options.recorded {
        recorded.check(&options.workflow, &source)?;
    }
    let workflow = Workflow::parse(&options.workflow, &source, &options.assignments)
        .map_err(|e| Failure::new(EXIT_INVALID, e.to_string()))?;
    std::fs::create_dir_all(&options.output_dir).map_err(|e| {
        let dir = options.output_dir.display();
        Failure::new(
            EXIT_FAILED,
            format!("cannot create the output directory {dir}: {e}"),
        )
    })?;
    let request = RunRequest {
        workflow_path: workflow_path.display().to_string(),
        workflow_source: source,
        overrides: options.assignments.clone(),
        cwd: std::env::current_dir()
            .ok()
            .map(|dir| dir.display().to_string()),
        timeout_ms: options.timeout.map(|t| t.as_millis() as u64),
        keep_alive_ms: options.keep_alive.map(KeepAlive::to_ms),
        session: Some(session_id()),
        dry_run: options.dry_run,
        seeds: options.seeds.clone(),
    };
    Ok((workflow, request))
}

/// A dry run's answer: the plan, printed, or why there is none.
fn dry_run(
    paths: &DaemonPaths,
    connection: &mut Connection,
    json: bool,
) -> Result<RunOutcome, Failure> {
    match connection.receive().map_err(|e| died(paths, e))? {
        ServerMessage::Plan(plan) => Ok(RunOutcome {
            job_id: 0,
            summary: plan_summary(&plan),
            outputs: Vec::new(),
            plan_code: Some(report_plan(&plan, json)),
        }),
        ServerMessage::Error { kind, message } => Err(Failure::new(exit_code_for(kind), message)),
        ServerMessage::Refused { message } => Err(Failure::new(EXIT_INVALID, message)),
        other => Err(Failure::new(
            EXIT_FAILED,
            format!("unexpected answer to a dry run: {other:?}"),
        )),
    }
}

/// A submitted run being followed: progress shown, outputs written as they come.
struct Follow {
    display: Display,
    writer: OutputWriter,
    job_id: u64,
}

impl Follow {
    /// Handles one frame; the summary once the run is done.
    fn handle(
        &mut self,
        message: ServerMessage,
        connection: &mut Connection,
    ) -> Result<Option<RunSummary>, Failure> {
        match message {
            ServerMessage::Accepted {
                job_id,
                queue_position,
            } => {
                self.job_id = job_id;
                if queue_position > 0 {
                    let line = format!("job {job_id} queued behind {queue_position} job(s)");
                    self.display.line(&line);
                }
            }
            ServerMessage::Log { level, message, .. } => {
                let prefix = match level {
                    LogLevel::Warn => "warning: ",
                    LogLevel::Info => "",
                };
                self.display.line(&format!("dwd: {prefix}{message}"));
            }
            ServerMessage::Progress {
                step, phase, i, n, ..
            } => self.display.progress(&step, phase.as_str(), i, n),
            ServerMessage::Output(descriptor) => self.output(descriptor, connection)?,
            ServerMessage::Done(summary) => {
                trace("done frame");
                return Ok(Some(summary));
            }
            ServerMessage::Heartbeat { .. } => {}
            ServerMessage::Error { kind, message }
                if kind == ErrorKind::ShuttingDown && self.job_id == 0 =>
            {
                // Refused before it was queued: a summary, so that the caller may retry.
                let error = RunError::new(kind, format!("dwd: {message}"));
                return Ok(Some(RunSummary::failed(0, Default::default(), error, 0)));
            }
            ServerMessage::Error { kind, message } => {
                let failure = Failure::new(exit_code_for(kind), format!("dwd: {message}"));
                return Err(self.abandon(failure));
            }
            other => self
                .display
                .line(&format!("dwd sent an unexpected message: {other:?}")),
        }
        Ok(None)
    }

    /// Hands an output and its shared memory to the writer.
    fn output(
        &mut self,
        descriptor: OutputDescriptor,
        connection: &mut Connection,
    ) -> Result<(), Failure> {
        trace("output frame");
        let Some(fd) = connection.reader.take_fd() else {
            return Err(Failure::new(
                EXIT_FAILED,
                format!(
                    "dwd sent output of step `{}` without its shared memory",
                    descriptor.step
                ),
            ));
        };
        if self.writer.write(descriptor, fd) {
            return Ok(());
        }
        // The writer stopped at a failed output: say which, and stop here.
        self.display.finish();
        Err(self
            .writer
            .finish(&self.display)
            .err()
            .unwrap_or_else(|| Failure::new(EXIT_FAILED, "the output writer stopped early")))
    }

    /// Stops following: what was written stays, and `failure` is the result.
    fn abandon(&mut self, failure: Failure) -> Failure {
        self.display.finish();
        let _ = self.writer.finish(&self.display);
        failure
    }
}

/// Writes outputs on a thread of its own, in the order they arrive, while the main thread
/// goes on reading frames: encoding, `fdatasync` and the rename of one output overlap the
/// daemon's own work after it has handed the output over (freeing the run's memory, the
/// next output, the final frame). [`OutputWriter::finish`] waits for every file, so a run
/// still reports success only once each of its files is synced and under its final name.
struct OutputWriter {
    queue: Option<std::sync::mpsc::Sender<(OutputDescriptor, std::os::fd::OwnedFd)>>,
    thread: Option<std::thread::JoinHandle<Result<Vec<WrittenOutput>, Failure>>>,
}

impl OutputWriter {
    fn start(dir: PathBuf, keep_pixels: bool) -> Result<Self, Failure> {
        let (queue, received) =
            std::sync::mpsc::channel::<(OutputDescriptor, std::os::fd::OwnedFd)>();
        let thread = std::thread::Builder::new()
            .name("dwctl-writer".to_string())
            .spawn(move || {
                let mut written = Vec::new();
                for (descriptor, fd) in received {
                    written.push(write_output(&dir, &descriptor, fd, keep_pixels)?);
                    trace("output written");
                }
                Ok(written)
            })
            .map_err(|e| Failure::new(EXIT_FAILED, format!("cannot start a writer thread: {e}")))?;
        Ok(OutputWriter {
            queue: Some(queue),
            thread: Some(thread),
        })
    }

    /// Queues one output; false when the writer has already stopped at a failure.
    fn write(&mut self, descriptor: OutputDescriptor, fd: std::os::fd::OwnedFd) -> bool {
        self.queue
            .as_ref()
            .is_some_and(|queue| queue.send((descriptor, fd)).is_ok())
    }

    /// Waits until every queued output is written (or one failed) and says which were.
    fn finish(&mut self, display: &Display) -> Result<Vec<WrittenOutput>, Failure> {
        self.queue = None;
        let Some(thread) = self.thread.take() else {
            return Ok(Vec::new());
        };
        let written = thread
            .join()
            .unwrap_or_else(|_| Err(Failure::new(EXIT_FAILED, "the output writer panicked")))?;
        for output in &written {
            display.line(&format!("wrote {}", output.path.display()));
        }
        Ok(written)
    }
}

/// Set once the user pressed Ctrl-C: a cancelled run then ends by SIGINT, as tools do.
static INTERRUPTED_BY_USER: AtomicBool = AtomicBool::new(false);

/// Whether this run was interrupted with Ctrl-C.
pub fn interrupted_by_user() -> bool {
    INTERRUPTED_BY_USER.load(Ordering::SeqCst)
}

/// Ends the process by SIGINT (its default action), so that a calling shell or make sees
/// the signal and stops too, rather than a plain exit status.
pub fn die_of_sigint() -> ! {
    let _ = std::io::Write::flush(&mut std::io::stdout());
    let _ = signal_hook::low_level::emulate_default_handler(signal_hook::consts::SIGINT);
    // Only reached where the signal could not be raised.
    std::process::exit(i32::from(EXIT_CANCELLED))
}

/// Sends `cancel` on the first Ctrl-C (the daemon then ends the job and says so); a second
/// Ctrl-C ends dwctl at once, by the signal.
fn watch_for_interrupt(stream: &UnixStream) -> Result<Arc<AtomicBool>, Failure> {
    let interrupted = Arc::new(AtomicBool::new(false));
    let mut writer = stream
        .try_clone()
        .map_err(|e| Failure::new(EXIT_UNREACHABLE, format!("socket: {e}")))?;
    let mut signals = signal_hook::iterator::Signals::new([signal_hook::consts::SIGINT])
        .map_err(|e| Failure::new(EXIT_FAILED, format!("cannot watch for Ctrl-C: {e}")))?;
    let flag = interrupted.clone();
    std::thread::spawn(move || {
        for _ in signals.forever() {
            INTERRUPTED_BY_USER.store(true, Ordering::SeqCst);
            if flag.swap(true, Ordering::SeqCst) {
                die_of_sigint();
            }
            eprintln!("\ndwctl: cancelling (Ctrl-C again to quit at once)");
            if let Ok(frame) = encode(&ClientMessage::Cancel {
                job_id: None,
                session: None,
            }) {
                let _ = std::io::Write::write_all(&mut writer, &frame);
            }
        }
    });
    Ok(interrupted)
}

fn write_output(
    dir: &Path,
    descriptor: &OutputDescriptor,
    fd: std::os::fd::OwnedFd,
    keep_pixels: bool,
) -> Result<WrittenOutput, Failure> {
    let failed = |message: String| Failure::new(EXIT_FAILED, message);
    let mapped = map_output(descriptor, fd)?;
    let path = dir.join(&descriptor.file_name);
    let bytes = mapped.bytes();
    let mut rgb = None;
    let (width, height) = match (descriptor.element_type, &descriptor.shape[..]) {
        (ElementType::U8, [_]) if !descriptor.content_type.starts_with("image/") => {
            write_bytes(&path, bytes).map_err(failed)?;
            (0, 0)
        }
        (ElementType::U8, [height, width, 3]) => {
            let image = RgbView {
                width: *width as u32,
                height: *height as u32,
                pixels: bytes,
            };
            write_rgb(&path, descriptor, &image).map_err(failed)?;
            rgb = keep_pixels.then(|| bytes.to_vec());
            (*width, *height)
        }
        (ElementType::F32, [.., height, width]) => {
            let metadata = descriptor
                .embed_metadata
                .then_some(("dw", descriptor.dw_metadata.as_str()));
            write_tensor(&path, "latents", &descriptor.shape, bytes, metadata).map_err(failed)?;
            (*width, *height)
        }
        _ => {
            return Err(failed(format!(
                "output of step `{}` is a {:?} tensor of shape {:?}, which dwctl cannot write",
                descriptor.step, descriptor.element_type, descriptor.shape
            )))
        }
    };
    Ok(WrittenOutput {
        step: descriptor.step.clone(),
        path,
        content_type: descriptor.content_type.clone(),
        width,
        height,
        rgb,
    })
}

/// Maps an output's shared memory once its descriptor is checked: its size matches its
/// shape, and its file name stays inside the output directory.
fn map_output(
    descriptor: &OutputDescriptor,
    fd: std::os::fd::OwnedFd,
) -> Result<MappedOutput, Failure> {
    let failed = |message: String| Failure::new(EXIT_FAILED, message);
    let expected_len =
        descriptor.shape.iter().product::<u64>() * descriptor.element_type.size() as u64;
    if expected_len != descriptor.byte_len {
        return Err(failed(format!(
            "output of step `{}` announces {} bytes for shape {:?}; expected {expected_len}",
            descriptor.step, descriptor.byte_len, descriptor.shape
        )));
    }
    if !is_plain_file_name(&descriptor.file_name) {
        return Err(failed(format!(
            "the daemon named an output {:?}, which is not a plain file name; nothing was written",
            descriptor.file_name
        )));
    }
    MappedOutput::map(fd, descriptor.byte_len as usize).map_err(|e| {
        failed(format!(
            "cannot map the output of step `{}`: {e}",
            descriptor.step
        ))
    })
}

/// Writes an RGB image in the descriptor's format, with its metadata when it asks.
fn write_rgb(
    path: &Path,
    descriptor: &OutputDescriptor,
    image: &RgbView<'_>,
) -> Result<(), String> {
    let text = PngText {
        parameters: &descriptor.parameters,
        dw: &descriptor.dw_metadata,
    };
    let metadata = descriptor.embed_metadata.then_some(&text);
    write_image(path, &descriptor.content_type, image, metadata)
}

fn exit_code(summary: &RunSummary) -> u8 {
    match (summary.outcome, summary.error.as_ref().map(|e| e.kind)) {
        (Outcome::Finished, _) => EXIT_OK,
        (Outcome::Cancelled, _) => EXIT_CANCELLED,
        (_, Some(kind)) => exit_code_for(kind),
        (_, None) => EXIT_FAILED,
    }
}

fn seconds(ms: u64) -> String {
    format!("{:.2} s", ms as f64 / 1000.0)
}

fn report(summary: &RunSummary, outputs: &[WrittenOutput], wall: Duration) {
    let t = summary.timings;
    match summary.outcome {
        Outcome::Finished => {
            let reuse = if summary.cache.misses == 0 {
                "reused the loaded pipeline, nothing loaded".to_string()
            } else {
                format!(
                    "loaded {} component(s) in {}",
                    summary.cache.misses,
                    seconds(t.load_ms)
                )
            };
            eprintln!(
                "done: {} output(s) in {} (compute {}, denoise+decode {}); {reuse}",
                outputs.len(),
                seconds(wall.as_millis() as u64),
                seconds(t.run_ms),
                seconds(t.run_ms.saturating_sub(t.load_ms)),
            );
        }
        Outcome::Cancelled => eprintln!("cancelled (job {})", summary.job_id),
        Outcome::Failed => {
            if let Some(error) = &summary.error {
                eprintln!("error: {}", error.message);
            }
        }
    }
}

fn json_summary(summary: &RunSummary, outputs: &[WrittenOutput], job_id: u64) -> serde_json::Value {
    json!({
        "ok": summary.outcome == Outcome::Finished,
        "job_id": if summary.job_id != 0 { summary.job_id } else { job_id },
        "workflow": {"id": summary.workflow.id, "path": summary.workflow.path, "sha256": summary.workflow.sha256},
        "outputs": outputs.iter().map(|o| json!({
            "step": o.step, "path": o.path.display().to_string(), "content_type": o.content_type,
            "width": o.width, "height": o.height,
        })).collect::<Vec<_>>(),
        "timings": {"load_ms": summary.timings.load_ms, "run_ms": summary.timings.run_ms, "total_ms": summary.timings.total_ms},
        "cache": {"hits": summary.cache.hits, "misses": summary.cache.misses},
        "error": summary.error.as_ref().map(|e| json!({"kind": e.kind, "message": e.message, "pointer": e.pointer})),
    })
}

/// Prints a dry run's plan; exit 0 when it fits, 1 when it does not.
fn report_plan(plan: &RunPlan, json: bool) -> u8 {
    if json {
        match serde_json::to_value(plan) {
            Ok(value) => outln!("{value}"),
            Err(e) => eprintln!("dwctl: {e}"),
        }
    } else {
        outln!(
            "dry run of `{}` ({}): nothing is loaded or run",
            plan.workflow.id,
            plan.workflow.path
        );
        outln!(
            "  {:<12} {:<14} {:>6} {:>10}  {:<6} MODEL",
            "STEP",
            "COMPONENT",
            "DTYPE",
            "BYTES",
            "STATE"
        );
        for c in &plan.components {
            let state = if c.loaded { "loaded" } else { "load" };
            outln!(
                "  {:<12} {:<14} {:>6} {:>10}  {:<6} {}",
                c.step,
                c.component_type,
                c.dtype,
                human_bytes(c.bytes),
                state,
                c.model
            );
        }
        outln!(
            "would load {}; loaded now {}; budget {}",
            human_bytes(plan.load_bytes),
            human_bytes(plan.loaded_bytes),
            human_bytes(plan.budget_bytes)
        );
        for e in &plan.evict {
            outln!(
                "would first unload {} of {} ({}), idle and least recently used",
                e.component_type,
                e.model,
                human_bytes(e.bytes)
            );
        }
        match &plan.message {
            None => outln!("fits"),
            Some(message) => outln!("does not fit: {message}"),
        }
    }
    if plan.fits {
        EXIT_OK
    } else {
        EXIT_FAILED
    }
}

/// Whether the user asked for no colour (https://no-color.org).
pub fn no_color() -> bool {
    std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty())
}

/// A placeholder summary for a dry run (nothing ran).
fn plan_summary(plan: &RunPlan) -> RunSummary {
    RunSummary {
        job_id: 0,
        outcome: Outcome::Finished,
        workflow: plan.workflow.clone(),
        timings: Default::default(),
        cache: Default::default(),
        error: None,
    }
}

/// Shows each image output in the terminal (`--preview`).
pub fn show_previews(outputs: &[WrittenOutput]) {
    let protocol = crate::preview::detect();
    let (cols, rows) = crate::preview::terminal_cells();
    let mut out = std::io::stdout().lock();
    for output in outputs {
        if let Some(rgb) = &output.rgb {
            if let Err(e) = crate::preview::show(
                &mut out,
                protocol,
                output.width as u32,
                output.height as u32,
                rgb,
                cols,
                rows.saturating_sub(2),
            ) {
                eprintln!("dwctl: cannot show {}: {e}", output.path.display());
            }
        }
    }
}
