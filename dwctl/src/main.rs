//! `dwctl`: the short-lived client of the dw daemon. It validates workflows, starts `dwd`
//! when none is running, sends work to it and writes the outputs it hands back.

mod connection;
mod exit;
mod files;
mod human;
mod preview;
mod recall;
mod run;
mod stdout;
mod validate;
mod watch;

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use clap::{Parser, Subcommand};
use protocol::message::{ClientMessage, MemoryReport, ServerMessage, StatusReport};
use protocol::paths::DaemonPaths;
use serde_json::json;

use connection::Connection;
use exit::{Failure, EXIT_FAILED, EXIT_INVALID, EXIT_OK, EXIT_UNREACHABLE};
use human::{human_bytes, human_duration};
use protocol::units::KeepAlive;
use stdout::outln;

const EXIT_CODES: &str = "\
Exit codes:
  0    done
  1    the workflow failed while running (or an output could not be written)
  2    bad usage, or an invalid workflow or variable
  3    the daemon is unreachable, refused the connection, or died
  130  cancelled (Ctrl-C)";

/// Run diffusers-workflow JSON workflows on a warm dw daemon.
///
/// The first `dwctl run` starts `dwd`, which loads the pipeline and keeps it loaded; later
/// runs of any workflow on the same model skip loading.
#[derive(Parser, Debug)]
#[command(version, about, long_about, after_help = EXIT_CODES)]
struct Cli {
    /// Daemon socket [default: $DWD_SOCKET, else $XDG_RUNTIME_DIR/dwd/dwd.sock, else
    /// /tmp/dwd-$UID/dwd.sock].
    #[arg(long, global = true, value_name = "PATH")]
    socket: Option<PathBuf>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a workflow and write its outputs.
    ///
    /// Example: dwctl run examples/tiny-sd.json prompt="a red fox" -o renders
    ///
    /// Again, from an output: dwctl run --from renders/tiny_sd-main.0-0.0.png steps=30
    #[command(after_help = EXIT_CODES)]
    Run {
        /// The workflow file (diffusers-workflow JSON).
        #[arg(required_unless_present = "from", value_name = "WORKFLOW")]
        workflow: Option<PathBuf>,
        /// Variable overrides, NAME=VALUE, converted to the type of the variable's default.
        #[arg(value_name = "NAME=VALUE")]
        assignments: Vec<String>,
        /// Directory the outputs are written to (created if missing).
        #[arg(short, long, default_value = "outputs", value_name = "DIR")]
        output_dir: PathBuf,
        /// Print one JSON object describing the run on stdout at the end.
        #[arg(long)]
        json: bool,
        /// Cancel the run if it takes longer than this many seconds (exit 1).
        #[arg(long, value_name = "SECS")]
        timeout: Option<f64>,
        /// Fail (exit 3) instead of starting a daemon when none is running.
        #[arg(long)]
        no_start: bool,
        /// How long this run's models stay loaded after it: 30m, 90s, 0 (unload right
        /// after), forever [default: the daemon's --keep-alive].
        #[arg(long, value_name = "DURATION", value_parser = KeepAlive::parse)]
        keep_alive: Option<KeepAlive>,
        /// Say what would be loaded (with sizes), what would be unloaded to make room, and
        /// whether it fits the memory budget; load and run nothing. Exit 0 if it fits, 1 if not.
        #[arg(long)]
        dry_run: bool,
        /// Run again the workflow an output PNG was made by (its step's result set
        /// `embed_metadata`): the same file, as it was then, with the same variables and the
        /// step's seed; NAME=VALUE after it changes variables.
        #[arg(long, value_name = "IMAGE")]
        from: Option<PathBuf>,
        /// Print nothing but errors (and the --json object): for scripts and Makefiles.
        #[arg(short, long)]
        quiet: bool,
        /// Show each image in the terminal after it is written (kitty, iTerm2 or sixel
        /// graphics where the terminal has them, also through tmux; colour half-blocks
        /// otherwise; DWCTL_PREVIEW=kitty|iterm2|sixel|blocks to choose).
        #[arg(long)]
        preview: bool,
    },
    /// Run a workflow, then again whenever it or a file it reads (latents, input images)
    /// changes; a change during a run cancels it and starts over. One line per run.
    /// Ctrl-C stops watching.
    ///
    /// Example, in a tmux pane beside your editor:
    ///   dwctl watch examples/tiny-sd.json prompt="a red fox" --preview
    #[command(after_help = EXIT_CODES)]
    Watch {
        /// The workflow file (diffusers-workflow JSON).
        workflow: PathBuf,
        /// Variable overrides, NAME=VALUE.
        #[arg(value_name = "NAME=VALUE")]
        assignments: Vec<String>,
        /// Directory the outputs are written to (created if missing).
        #[arg(short, long, default_value = "outputs", value_name = "DIR")]
        output_dir: PathBuf,
        /// Show each image in the terminal after each run (see `run --preview`).
        #[arg(long)]
        preview: bool,
        /// How long the models stay loaded after each run [default: the daemon's].
        #[arg(long, value_name = "DURATION", value_parser = KeepAlive::parse)]
        keep_alive: Option<KeepAlive>,
        /// Fail (exit 3) instead of starting a daemon when none is running.
        #[arg(long)]
        no_start: bool,
    },
    /// Cancel a queued or running job: JOB_ID (see `dwctl status`), or by default the
    /// latest job started from this shell.
    Cancel { job_id: Option<u64> },
    /// Print the daemon's log (its last lines), and with -f keep printing what it adds.
    Logs {
        /// Keep printing new lines as they are written (Ctrl-C to stop).
        #[arg(short, long)]
        follow: bool,
        /// How many of the last lines to print first.
        #[arg(short = 'n', long, default_value_t = 50, value_name = "N")]
        lines: usize,
    },
    /// Print a shell completion script: `dwctl completions bash > /etc/bash_completion.d/dwctl`,
    /// `dwctl completions zsh > "${fpath[1]}/_dwctl"`, `dwctl completions fish >
    /// ~/.config/fish/completions/dwctl.fish`.
    Completions { shell: clap_complete::Shell },
    /// Show the daemon: pid, version, device, uptime, socket, log, loaded models, queue.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Unload every loaded model (or those of one model folder) and say how much was freed.
    Clear {
        /// Only unload components of this model (its folder path or folder name).
        model: Option<String>,
        /// Print JSON: {"unloaded", "bytes_freed"}.
        #[arg(long)]
        json: bool,
    },
    /// Stop the daemon (waits until it has exited and removed its socket).
    Stop,
    /// Check that the daemon answers, and how fast.
    Ping,
    /// Check a workflow file and its NAME=VALUE overrides without running it (no daemon).
    #[command(after_help = EXIT_CODES)]
    Validate {
        workflow: PathBuf,
        #[arg(value_name = "NAME=VALUE")]
        assignments: Vec<String>,
        /// Fail (exit 2) when a model the workflow names is not on this machine; without
        /// it a missing model is only a warning, so workflows can be checked where no
        /// models are.
        #[arg(long)]
        require_models: bool,
    },
}

/// The longest `--timeout`: a year.
const MAX_TIMEOUT_SECS: f64 = 365.0 * 24.0 * 3600.0;

fn main() -> ExitCode {
    let cli = Cli::parse();
    let paths = DaemonPaths::resolve(cli.socket.as_deref());
    let json = wants_json(&cli.command);
    let code = match dispatch(cli.command, &paths) {
        Ok(code) => code,
        Err(failure) => {
            eprintln!("dwctl: {}", failure.message);
            if json {
                // Scripts read every outcome from stdout, client-side failures included.
                outln!("{}", failure_json(&failure));
            }
            failure.code
        }
    };
    if code == exit::EXIT_CANCELLED && run::interrupted_by_user() {
        // Everything is reported and written: end as Ctrl-C ends other tools.
        run::die_of_sigint();
    }
    ExitCode::from(code)
}

/// Whether the command was asked for JSON output.
fn wants_json(command: &Command) -> bool {
    matches!(
        command,
        Command::Run { json: true, .. }
            | Command::Status { json: true }
            | Command::Clear { json: true, .. }
    )
}

/// A failure as `--json` reports it: `{"ok": false, "error": {"code", "kind", "message"}}`.
fn failure_json(failure: &Failure) -> serde_json::Value {
    let kind = match failure.code {
        EXIT_INVALID => "invalid",
        EXIT_UNREACHABLE => "unreachable",
        exit::EXIT_CANCELLED => "cancelled",
        _ => "failed",
    };
    json!({"ok": false, "error": {"code": failure.code, "kind": kind, "message": failure.message}})
}

fn dispatch(command: Command, paths: &DaemonPaths) -> Result<u8, Failure> {
    match command {
        Command::Run {
            workflow,
            assignments,
            output_dir,
            json,
            timeout,
            no_start,
            keep_alive,
            dry_run,
            from,
            quiet,
            preview,
        } => {
            let timeout = timeout.map(checked_timeout).transpose()?;
            let target = what_to_run(workflow, assignments, from)?;
            let start = !no_start;
            let options = run::RunOptions::new(target, output_dir, keep_alive, start, preview);
            run::run(
                paths,
                run::RunOptions {
                    json,
                    timeout,
                    dry_run,
                    quiet,
                    ..options
                },
            )
        }
        Command::Watch {
            workflow,
            assignments,
            output_dir,
            preview,
            keep_alive,
            no_start,
        } => {
            let target = recall::Recalled::given(workflow, assignments);
            let start = !no_start;
            let options = run::RunOptions::new(target, output_dir, keep_alive, start, preview);
            watch::watch(paths, options)
        }
        Command::Status { json } => status(paths, json),
        Command::Clear { model, json } => clear(paths, model, json),
        Command::Stop => stop(paths),
        Command::Cancel { job_id } => cancel(paths, job_id),
        Command::Logs { follow, lines } => logs(paths, follow, lines),
        Command::Completions { shell } => {
            let mut command = <Cli as clap::CommandFactory>::command();
            clap_complete::generate(shell, &mut command, "dwctl", &mut std::io::stdout());
            Ok(EXIT_OK)
        }
        Command::Ping => ping(paths),
        Command::Validate {
            workflow,
            assignments,
            require_models,
        } => validate::validate(&workflow, &assignments, require_models),
    }
}

/// The workflow, variables and pinned seeds a `run` asks for: as given, or recalled from
/// an output with `--from` (where the positional arguments are all NAME=VALUE).
fn what_to_run(
    workflow: Option<PathBuf>,
    assignments: Vec<String>,
    from: Option<PathBuf>,
) -> Result<recall::Recalled, Failure> {
    let Some(image) = from else {
        let workflow =
            workflow.ok_or_else(|| Failure::new(EXIT_INVALID, "give a workflow file"))?;
        return Ok(recall::Recalled::given(workflow, assignments));
    };
    let given: Vec<String> = workflow
        .map(|w| w.to_string_lossy().into_owned())
        .into_iter()
        .chain(assignments)
        .collect();
    if let Some(odd) = given.iter().find(|a| !a.contains('=')) {
        return Err(Failure::new(
            EXIT_INVALID,
            format!("with --from, give only NAME=VALUE changes, not `{odd}`: the workflow is the one the image records"),
        ));
    }
    let recalled = recall::recall(&image)?;
    // Later assignments win, so the user's changes override the recorded values.
    let assignments = recalled.assignments.into_iter().chain(given).collect();
    Ok(recall::Recalled {
        assignments,
        ..recalled
    })
}

/// `--timeout` as a duration: positive, and at most a year.
fn checked_timeout(secs: f64) -> Result<Duration, Failure> {
    if secs > 0.0 && secs <= MAX_TIMEOUT_SECS {
        return Ok(Duration::from_secs_f64(secs));
    }
    Err(Failure::new(
        EXIT_INVALID,
        format!("--timeout must be a positive number of seconds, at most {MAX_TIMEOUT_SECS} (a year), got {secs}"),
    ))
}

fn unexpected(answer: ServerMessage) -> Failure {
    match answer {
        ServerMessage::Error { message, .. } | ServerMessage::Refused { message } => {
            Failure::new(EXIT_FAILED, format!("dwd: {message}"))
        }
        other => Failure::new(
            EXIT_FAILED,
            format!("unexpected answer from dwd: {other:?}"),
        ),
    }
}

fn status(paths: &DaemonPaths, json: bool) -> Result<u8, Failure> {
    let connection = Connection::open(paths, false)?;
    let report = match connection.request(&ClientMessage::Status, paths)? {
        ServerMessage::Status(report) => report,
        other => return Err(unexpected(other)),
    };
    if json {
        let value =
            serde_json::to_value(&report).map_err(|e| Failure::new(EXIT_FAILED, e.to_string()))?;
        outln!("{value}");
    } else {
        print_status(&report);
    }
    Ok(EXIT_OK)
}

fn print_status(report: &StatusReport) {
    outln!(
        "dwd {} (pid {}) on {}, up {}",
        report.version,
        report.pid,
        report.device,
        human_duration(report.uptime_s)
    );
    outln!("socket  {}", report.socket);
    outln!("log     {}", report.log_file);
    let changed: Vec<String> = report
        .settings
        .iter()
        .filter(|s| s.source != "default")
        .map(|s| format!("{} {} ({})", s.name, s.value, s.source))
        .collect();
    if !changed.is_empty() {
        outln!("settings {}", changed.join(", "));
    }
    if report.log_dropped_lines > 0 {
        outln!(
            "        {} log line(s) could not be written (is its disk full?)",
            report.log_dropped_lines
        );
    }
    outln!("{}", memory_line(&report.memory));
    outln!("runs    {} finished", report.runs);
    if report.queue.is_empty() {
        outln!("queue   empty");
    }
    for job in &report.queue {
        outln!(
            "queue   job {} ({}) {} #{}",
            job.job_id,
            job.workflow_id,
            job.state,
            job.position
        );
    }
    print_loaded(report);
}

/// `memory  R resident; device U used of T; models L of a B budget (source); ...`.
fn memory_line(memory: &MemoryReport) -> String {
    let mut line = format!("memory  {} resident", human_bytes(memory.rss_bytes));
    if let (Some(used), Some(total)) = (memory.device_used_bytes, memory.device_total_bytes) {
        let (used, total) = (human_bytes(used), human_bytes(total));
        line.push_str(&format!("; device {used} used of {total}"));
    }
    line.push_str(&format!(
        "; models {} of a {} budget",
        human_bytes(memory.loaded_bytes),
        human_bytes(memory.budget_bytes)
    ));
    if !memory.budget_source.is_empty() {
        line.push_str(&format!(" ({})", memory.budget_source));
    }
    if let Some(baseline) = memory.baseline_bytes {
        let baseline = human_bytes(baseline);
        line.push_str(&format!("; {baseline} right after the last load"));
    }
    line
}

/// The loaded components, one row each.
fn print_loaded(report: &StatusReport) {
    if report.loaded.is_empty() {
        outln!("loaded  nothing");
        return;
    }
    outln!(
        "loaded  {} component(s), {}:",
        report.loaded.len(),
        human_bytes(report.memory.loaded_bytes)
    );
    outln!(
        "  {:<14} {:>10} {:>5} {:>6}  {:<10} {:<16} {:<22} MODEL",
        "COMPONENT",
        "BYTES",
        "HITS",
        "DTYPE",
        "LAST USED",
        "STAYS",
        "USED BY"
    );
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    for c in &report.loaded {
        let ago = format!(
            "{} ago",
            human_duration(now.saturating_sub(c.last_used_unix))
        );
        let stays = match (c.in_use, c.keep_until_unix) {
            (true, _) => "in use".to_string(),
            (false, None) => "until cleared".to_string(),
            (false, Some(until)) => format!("{} more", human_duration(until.saturating_sub(now))),
        };
        outln!(
            "  {:<14} {:>10} {:>5} {:>6}  {:<10} {:<16} {:<22} {}",
            c.component_type,
            human_bytes(c.bytes),
            c.hits,
            c.dtype,
            ago,
            stays,
            c.users.join(","),
            c.model
        );
    }
}

fn clear(paths: &DaemonPaths, model: Option<String>, json: bool) -> Result<u8, Failure> {
    let connection = Connection::open(paths, false)?;
    match connection.request(
        &ClientMessage::Clear {
            model: model.clone(),
        },
        paths,
    )? {
        ServerMessage::Cleared {
            unloaded,
            bytes_freed,
        } => {
            if json {
                outln!(
                    "{}",
                    json!({"unloaded": unloaded, "bytes_freed": bytes_freed})
                );
            } else if unloaded == 0 {
                outln!(
                    "nothing to unload{}",
                    model.map(|m| format!(" for {m}")).unwrap_or_default()
                );
            } else {
                outln!(
                    "unloaded {unloaded} component(s), freed {}",
                    human_bytes(bytes_freed)
                );
            }
            Ok(EXIT_OK)
        }
        other => Err(unexpected(other)),
    }
}

fn stop(paths: &DaemonPaths) -> Result<u8, Failure> {
    let connection = match Connection::open(paths, false) {
        Ok(connection) => connection,
        Err(f) if f.code == EXIT_UNREACHABLE && !paths.socket.exists() => {
            outln!("dwd is not running ({})", paths.socket.display());
            return Ok(EXIT_OK);
        }
        Err(f) => return Err(f),
    };
    let pid = connection.daemon_pid;
    match connection.request(&ClientMessage::Shutdown, paths)? {
        ServerMessage::ShuttingDown { .. } => {}
        other => return Err(unexpected(other)),
    }
    // Success once that daemon has exited (a fresh one another client starts meanwhile
    // is not the one asked to stop).
    let deadline = Instant::now() + Duration::from_secs(60);
    while process_alive(pid) {
        if Instant::now() > deadline {
            return Err(Failure::new(
                EXIT_FAILED,
                format!("dwd (pid {pid}) did not exit within 60 s"),
            ));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    outln!("dwd (pid {pid}) stopped");
    Ok(EXIT_OK)
}

fn cancel(paths: &DaemonPaths, job_id: Option<u64>) -> Result<u8, Failure> {
    let connection = Connection::open(paths, false)?;
    let request = ClientMessage::Cancel {
        job_id,
        session: Some(run::session_id()),
    };
    match connection.request(&request, paths)? {
        ServerMessage::CancelResult { cancelled, message } if !cancelled.is_empty() => {
            outln!("{message}");
            Ok(EXIT_OK)
        }
        ServerMessage::CancelResult { message, .. } => Err(Failure::new(EXIT_FAILED, message)),
        other => Err(unexpected(other)),
    }
}

/// The daemon's log file: the one the running daemon reports, else the default beside
/// the socket.
fn log_path(paths: &DaemonPaths) -> std::path::PathBuf {
    let reported = Connection::open(paths, false).ok().and_then(|c| {
        match c.request(&ClientMessage::Status, paths) {
            Ok(ServerMessage::Status(report)) => Some(std::path::PathBuf::from(report.log_file)),
            _ => None,
        }
    });
    reported.unwrap_or_else(|| paths.log.clone())
}

/// The last `lines` lines of `file` and where it ends, read backwards in blocks, so a long
/// log is not read whole.
fn tail_lines(file: &mut std::fs::File, lines: usize) -> std::io::Result<(Vec<u8>, u64)> {
    use std::io::{Read, Seek, SeekFrom};
    const BLOCK: u64 = 64 << 10;
    let end = file.seek(SeekFrom::End(0))?;
    let mut start = end;
    let mut tail: Vec<u8> = Vec::new();
    while start > 0 && tail.iter().filter(|&&b| b == b'\n').count() <= lines {
        let from = start.saturating_sub(BLOCK);
        let mut block = vec![0; (start - from) as usize];
        file.seek(SeekFrom::Start(from))?;
        file.read_exact(&mut block)?;
        block.extend_from_slice(&tail);
        tail = block;
        start = from;
    }
    if tail.is_empty() {
        return Ok((tail, end));
    }
    let mut parts: Vec<&[u8]> = tail.split(|&b| b == b'\n').collect();
    if tail.last() == Some(&b'\n') {
        parts.pop();
    }
    if start > 0 && !parts.is_empty() {
        // The first piece began before what was read.
        parts.remove(0);
    }
    let mut out = Vec::new();
    for part in &parts[parts.len().saturating_sub(lines)..] {
        out.extend_from_slice(part);
        out.push(b'\n');
    }
    Ok((out, end))
}

fn logs(paths: &DaemonPaths, follow: bool, lines: usize) -> Result<u8, Failure> {
    use std::io::{Read, Seek, SeekFrom, Write};
    let path = log_path(paths);
    let mut file = std::fs::File::open(&path).map_err(|e| {
        Failure::new(
            EXIT_FAILED,
            format!("cannot open the log {}: {e}", path.display()),
        )
    })?;
    let (tail, end) = tail_lines(&mut file, lines)
        .map_err(|e| Failure::new(EXIT_FAILED, format!("cannot read {}: {e}", path.display())))?;
    let mut out = std::io::stdout().lock();
    if out.write_all(&tail).and_then(|_| out.flush()).is_err() {
        return Ok(EXIT_OK);
    }
    if !follow {
        return Ok(EXIT_OK);
    }
    let mut position = end;
    loop {
        std::thread::sleep(Duration::from_millis(200));
        let len = std::fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
        if len < position {
            // Truncated or replaced: start again from its beginning.
            position = 0;
            file = std::fs::File::open(&path).map_err(|e| {
                Failure::new(
                    EXIT_FAILED,
                    format!("cannot reopen {}: {e}", path.display()),
                )
            })?;
        }
        if len > position {
            let mut added = Vec::new();
            file.seek(SeekFrom::Start(position))
                .and_then(|_| file.read_to_end(&mut added))
                .map_err(|e| {
                    Failure::new(EXIT_FAILED, format!("cannot read {}: {e}", path.display()))
                })?;
            position += added.len() as u64;
            if out.write_all(&added).and_then(|_| out.flush()).is_err() {
                return Ok(EXIT_OK); // the reader went away (e.g. `| head`)
            }
        }
    }
}

fn process_alive(pid: u32) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok()
}

fn ping(paths: &DaemonPaths) -> Result<u8, Failure> {
    let started = Instant::now();
    let connection = Connection::open(paths, false)?;
    match connection.request(&ClientMessage::Ping, paths)? {
        ServerMessage::Pong { pid, uptime_ms } => {
            outln!(
                "pong from dwd (pid {pid}, up {}) in {:.1} ms",
                human_duration(uptime_ms / 1000),
                started.elapsed().as_secs_f64() * 1000.0
            );
            Ok(EXIT_OK)
        }
        other => Err(unexpected(other)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tail_of(text: &str, lines: usize) -> String {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log");
        std::fs::write(&path, text).unwrap();
        let mut file = std::fs::File::open(&path).unwrap();
        String::from_utf8(tail_lines(&mut file, lines).unwrap().0).unwrap()
    }

    #[test]
    fn logs_shows_the_last_lines_reading_only_the_end() {
        let long: String = (0..20_000).map(|i| format!("line {i}\n")).collect();
        assert!(long.len() > 128 << 10);
        assert_eq!(tail_of(&long, 3), "line 19997\nline 19998\nline 19999\n");
        assert_eq!(tail_of("a\nb\nc", 2), "b\nc\n");
        assert_eq!(tail_of("a\nb\n", 5), "a\nb\n");
        assert_eq!(tail_of("a\nb\n", 0), "");
        assert_eq!(tail_of("", 3), "");
    }
}
