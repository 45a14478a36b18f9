//! `dwctl watch`: run a workflow, then run it again whenever the workflow file or a file it
//! reads (latents, input images) changes.
//!
//! Changes are polled every 50 ms; a burst of changes within 200 ms makes one run. A change
//! while a run is in flight cancels that run and starts the new one. Each run prints one
//! line: the time, whether it found its models loaded, how long it took, and its outputs.
//! Ctrl-C cancels the run in flight and leaves with exit 0.

use crate::stdout::outln;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use protocol::frame::encode;
use protocol::message::{ClientMessage, Outcome};
use protocol::paths::DaemonPaths;
use protocol::workflow::{ImageSource, Workflow};

use crate::exit::{Failure, EXIT_CANCELLED, EXIT_FAILED, EXIT_OK};
use crate::run::{execute, RunOptions, RunOutcome};

/// How often files are checked.
const POLL: Duration = Duration::from_millis(50);
/// Changes closer together than this make one run.
const SETTLE: Duration = Duration::from_millis(200);

/// Size and modification time of each watched file (`None`: missing).
type Snapshot = Vec<(PathBuf, Option<(u64, SystemTime)>)>;

/// The files a run depends on: the workflow and the inputs it names.
fn watched_files(workflow: &Path, assignments: &[String]) -> Vec<PathBuf> {
    let mut files = vec![workflow.to_path_buf()];
    if let Ok(parsed) = Workflow::load(workflow, assignments) {
        let base = parsed.base_dir().to_path_buf();
        for step in parsed.steps.iter().filter_map(|s| s.pipeline()) {
            let args = &step.arguments;
            if let Some(latents) = args.latents() {
                files.push(base.join(latents));
            }
            for (_, image) in args.images() {
                if let ImageSource::File { location, .. } = image {
                    files.push(base.join(location));
                }
            }
        }
    }
    files
}

fn snapshot(files: &[PathBuf]) -> Snapshot {
    files
        .iter()
        .map(|f| {
            (
                f.clone(),
                std::fs::metadata(f)
                    .ok()
                    .and_then(|m| Some((m.len(), m.modified().ok()?))),
            )
        })
        .collect()
}

/// A run in flight on its own thread.
struct InFlight {
    thread: JoinHandle<Result<Option<RunOutcome>, Failure>>,
    /// The run's connection, to send `cancel` on, once it is submitted.
    stream: Arc<Mutex<Option<UnixStream>>>,
    /// Set when this run is to be cancelled (before or after it was submitted).
    cancel: Arc<AtomicBool>,
    started: Instant,
}

impl InFlight {
    fn start(paths: &DaemonPaths, options: &RunOptions) -> InFlight {
        let stream: Arc<Mutex<Option<UnixStream>>> = Arc::default();
        let cancel = Arc::new(AtomicBool::new(false));
        let (paths, options) = (paths.clone(), options.clone());
        let (slot, cancelled) = (stream.clone(), cancel.clone());
        let thread = std::thread::spawn(move || {
            execute(&paths, &options, &mut |socket| {
                let writer = socket
                    .try_clone()
                    .map_err(|e| Failure::new(EXIT_FAILED, format!("socket: {e}")))?;
                *slot.lock().unwrap_or_else(|p| p.into_inner()) = Some(writer);
                if cancelled.load(Ordering::SeqCst) {
                    send_cancel(&slot);
                }
                Ok(cancelled.clone())
            })
        });
        InFlight {
            thread,
            stream,
            cancel,
            started: Instant::now(),
        }
    }

    fn cancel(&self) {
        if !self.cancel.swap(true, Ordering::SeqCst) {
            send_cancel(&self.stream);
        }
    }
}

fn send_cancel(stream: &Mutex<Option<UnixStream>>) {
    if let Some(stream) = stream.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
        if let Ok(frame) = encode(&ClientMessage::Cancel {
            job_id: None,
            session: None,
        }) {
            let _ = stream.write_all(&frame);
        }
    }
}

/// `HH:MM:SS` in local time.
fn clock() -> String {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs() as libc::time_t)
        .unwrap_or(0);
    // SAFETY: localtime_r writes only into the tm we pass it.
    let mut tm: libc::tm = unsafe { std::mem::zeroed() };
    if unsafe { libc::localtime_r(&now, &mut tm) }.is_null() {
        return "--:--:--".to_string();
    }
    format!("{:02}:{:02}:{:02}", tm.tm_hour, tm.tm_min, tm.tm_sec)
}

/// The one line a finished run prints.
fn describe(
    result: Result<Option<RunOutcome>, Failure>,
    took: Duration,
    superseded: bool,
) -> String {
    let time = clock();
    let seconds = format!("{:.2} s", took.as_secs_f64());
    match result {
        Ok(Some(outcome)) => {
            let summary = &outcome.summary;
            match summary.outcome {
                Outcome::Finished => {
                    let how = if summary.cache.misses == 0 {
                        "warm".to_string()
                    } else {
                        format!("loaded {}", summary.cache.misses)
                    };
                    let paths: Vec<String> = outcome
                        .outputs
                        .iter()
                        .map(|o| o.path.display().to_string())
                        .collect();
                    format!("{time}  {how}  {seconds}  {}", paths.join(" "))
                }
                Outcome::Cancelled if superseded => format!("{time}  cancelled: a file changed"),
                Outcome::Cancelled => format!("{time}  cancelled"),
                Outcome::Failed => {
                    let message = summary
                        .error
                        .as_ref()
                        .map(|e| e.message.as_str())
                        .unwrap_or("failed");
                    format!("{time}  error: {message}")
                }
            }
        }
        Ok(None) => format!("{time}  nothing ran"),
        Err(failure) if superseded && failure.code == EXIT_CANCELLED => {
            format!("{time}  cancelled: a file changed")
        }
        Err(failure) => format!("{time}  error: {}", failure.message),
    }
}

/// Watches until Ctrl-C; returns the exit code.
pub fn watch(paths: &DaemonPaths, mut options: RunOptions) -> Result<u8, Failure> {
    options.quiet = true;
    options.json = false;
    let stop = Arc::new(AtomicBool::new(false));
    signal_hook::flag::register(signal_hook::consts::SIGINT, stop.clone())
        .map_err(|e| Failure::new(EXIT_FAILED, format!("cannot watch for Ctrl-C: {e}")))?;
    let mut files = watched_files(&options.workflow, &options.assignments);
    let mut last = snapshot(&files);
    // Run once at the start.
    let mut changed_at = Some(Instant::now() - SETTLE);
    let mut in_flight: Option<InFlight> = None;
    let mut superseded = false;
    eprintln!(
        "watching {} file(s) of {}; Ctrl-C to stop",
        files.len(),
        options.workflow.display()
    );
    loop {
        if stop.load(Ordering::SeqCst) {
            if let Some(run) = in_flight.take() {
                run.cancel();
                let _ = run.thread.join();
            }
            eprintln!("stopped watching");
            return Ok(EXIT_OK);
        }
        let now = snapshot(&files);
        if now != last {
            last = now;
            changed_at = Some(Instant::now());
            if let Some(run) = &in_flight {
                run.cancel();
                superseded = true;
            }
        }
        if in_flight
            .as_ref()
            .is_some_and(|run| run.thread.is_finished())
        {
            if let Some(run) = in_flight.take() {
                let took = run.started.elapsed();
                let result = run.thread.join().unwrap_or_else(|_| {
                    Err(Failure::new(EXIT_FAILED, "the run's thread panicked"))
                });
                if let Ok(Some(outcome)) = &result {
                    if options.preview {
                        crate::run::show_previews(&outcome.outputs);
                    }
                }
                outln!("{}", describe(result, took, superseded));
                superseded = false;
            }
        }
        if in_flight.is_none() && changed_at.is_some_and(|at| at.elapsed() >= SETTLE) {
            changed_at = None;
            files = watched_files(&options.workflow, &options.assignments);
            last = snapshot(&files);
            in_flight = Some(InFlight::start(paths, &options));
        }
        std::thread::sleep(POLL);
    }
}
