//! Talking to the daemon: finding its socket, starting it when needed, the handshake, and
//! one request per connection.

use std::io::Write;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use protocol::fdpass::FdFrameReader;
use protocol::frame::{encode, FrameError};
use protocol::message::{ClientMessage, ServerMessage};
use protocol::paths::{check_peer, check_socket, check_trusted_dir, DaemonPaths};
use protocol::{PROTOCOL_VERSION, TOOL_VERSION};

use crate::exit::{Failure, EXIT_UNREACHABLE};

/// Set by `--quiet`: starting the daemon is then not announced.
static QUIET: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);

/// Announce nothing but errors from here on.
pub fn set_quiet() {
    QUIET.store(true, std::sync::atomic::Ordering::Relaxed);
}

/// How long a daemon this client started may take to answer its hello: a first start on a
/// GPU compiles kernels.
const HANDSHAKE_LIMIT: Duration = Duration::from_secs(120);

/// How long a daemon may send nothing before the client gives up on it: a running job
/// sends a heartbeat every [`protocol::message::HEARTBEAT`], so this means it has stopped
/// (SIGSTOP, a hang), not that a step is slow. `DWCTL_SILENCE_SECS` sets another limit.
pub fn silence_limit() -> Duration {
    std::env::var("DWCTL_SILENCE_SECS")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok())
        .map_or(Duration::from_secs(60), Duration::from_secs)
        .max(protocol::message::HEARTBEAT * 2 + Duration::from_secs(1))
}

/// How long a stopping daemon may take to exit (it gives its running job 30 s).
const STOPPING_LIMIT: Duration = Duration::from_secs(40);

/// How long to wait for a daemon we started to accept connections.
const START_TIMEOUT: Duration = Duration::from_secs(20);

/// Why a handshake did not complete.
enum Greeting {
    /// The daemon closed the connection before answering (it is stopping or died).
    Closed(Failure),
    /// It answered with a refusal, or something else went wrong.
    Refused(Failure),
}

/// An open, greeted connection.
pub struct Connection {
    pub reader: FdFrameReader,
    pub daemon_pid: u32,
    pub daemon_device: String,
}

impl Connection {
    /// Connects to the daemon on `paths.socket`; starts one first when none answers and
    /// `start` is true. A daemon that dies while we connect (its socket still open for a
    /// moment) is treated like no daemon: with `start`, a fresh one is started.
    pub fn open(paths: &DaemonPaths, start: bool) -> Result<Connection, Failure> {
        let mut attempts = 0;
        loop {
            attempts += 1;
            check_socket_path(paths)?;
            let mut fresh = false;
            let stream = match UnixStream::connect(&paths.socket) {
                Ok(stream) => stream,
                Err(e) if is_absent(&e) && start => {
                    fresh = true;
                    start_daemon(paths)?
                }
                Err(e) if is_absent(&e) => {
                    return Err(Failure::new(
                        EXIT_UNREACHABLE,
                        format!("no dwd is running on {} ({e})", paths.socket.display()),
                    ))
                }
                Err(e) => return Err(unreachable(paths, e)),
            };
            // A daemon just started may still be warming a GPU up; one that was running
            // answers a hello at once unless it is stopped.
            let limit = if fresh {
                HANDSHAKE_LIMIT
            } else {
                silence_limit()
            };
            stream
                .set_read_timeout(Some(limit))
                .map_err(|e| unreachable(paths, e))?;
            check_peer(&stream).map_err(|e| {
                Failure::new(EXIT_UNREACHABLE, format!("{}: {e}", paths.socket.display()))
            })?;
            match Connection::greet(stream, paths) {
                Err(Greeting::Closed(_)) if start && attempts < 3 => {
                    std::thread::sleep(Duration::from_millis(100))
                }
                Err(Greeting::Closed(failure) | Greeting::Refused(failure)) => return Err(failure),
                Ok(connection) => return Ok(connection),
            }
        }
    }

    fn greet(stream: UnixStream, paths: &DaemonPaths) -> Result<Connection, Greeting> {
        let closed = |e| Greeting::Closed(died(paths, e));
        let mut writer = stream
            .try_clone()
            .map_err(|e| Greeting::Refused(unreachable(paths, e)))?;
        let hello = ClientMessage::Hello {
            protocol_version: PROTOCOL_VERSION,
            client_version: TOOL_VERSION.to_string(),
        };
        // A daemon that refuses us may answer and close before our hello is written, so a
        // failed write still reads the answer it may have left.
        let written = write_message(&mut writer, &hello);
        let mut reader = FdFrameReader::new(stream);
        let answer = match (reader.read_message::<ServerMessage>(), written) {
            (Ok(answer), _) => answer,
            (Err(_), Err(write_error)) => return Err(closed(write_error)),
            (Err(read_error), Ok(())) => return Err(closed(read_error)),
        };
        match answer {
            ServerMessage::Welcome { pid, device, .. } => {
                reader
                    .stream()
                    .set_read_timeout(Some(silence_limit()))
                    .map_err(|e| Greeting::Refused(unreachable(paths, e)))?;
                Ok(Connection {
                    reader,
                    daemon_pid: pid,
                    daemon_device: device,
                })
            }
            ServerMessage::Refused { message } | ServerMessage::Error { message, .. } => {
                Err(Greeting::Refused(Failure::new(
                    EXIT_UNREACHABLE,
                    format!("dwd refused the connection: {message}"),
                )))
            }
            other => Err(Greeting::Refused(Failure::new(
                EXIT_UNREACHABLE,
                format!("unexpected handshake answer from dwd: {other:?}"),
            ))),
        }
    }

    /// Sends one request.
    pub fn send(&mut self, message: &ClientMessage) -> Result<(), FrameError> {
        let mut stream = self.reader.stream();
        write_message(&mut stream, message)
    }

    /// Reads the next message.
    pub fn receive(&mut self) -> Result<ServerMessage, FrameError> {
        self.reader.read_message()
    }

    /// Sends `request` and returns the single answer.
    pub fn request(
        mut self,
        request: &ClientMessage,
        paths: &DaemonPaths,
    ) -> Result<ServerMessage, Failure> {
        self.send(request).map_err(|e| died(paths, e))?;
        self.receive().map_err(|e| died(paths, e))
    }
}

/// Before connecting: the socket's directory and the socket (if there is one yet) must be
/// this user's (or root's), private, and no symbolic links, so no other user can stand in
/// for the daemon.
fn check_socket_path(paths: &DaemonPaths) -> Result<(), Failure> {
    let refuse = |e: std::io::Error| Failure::new(EXIT_UNREACHABLE, e.to_string());
    match std::fs::symlink_metadata(paths.dir()) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
        _ => check_trusted_dir(paths.dir()).map_err(refuse)?,
    }
    check_socket(&paths.socket).map_err(refuse)?;
    Ok(())
}

fn write_message(writer: &mut impl Write, message: &ClientMessage) -> Result<(), FrameError> {
    writer.write_all(&encode(message)?)?;
    Ok(())
}

fn is_absent(e: &std::io::Error) -> bool {
    matches!(
        e.kind(),
        std::io::ErrorKind::NotFound | std::io::ErrorKind::ConnectionRefused
    )
}

fn unreachable(paths: &DaemonPaths, e: impl std::fmt::Display) -> Failure {
    Failure::new(
        EXIT_UNREACHABLE,
        format!("cannot reach dwd on {}: {e}", paths.socket.display()),
    )
}

/// The daemon closed the connection or broke the protocol mid-conversation.
pub fn died(paths: &DaemonPaths, e: FrameError) -> Failure {
    let why = match e {
        FrameError::Closed | FrameError::Truncated { .. } => {
            "the daemon closed the connection (it stopped or died)".to_string()
        }
        FrameError::Io(ref io)
            if io.kind() == std::io::ErrorKind::ConnectionReset
                || io.kind() == std::io::ErrorKind::BrokenPipe =>
        {
            "the daemon closed the connection (it stopped or died)".to_string()
        }
        FrameError::Io(ref io)
            if io.kind() == std::io::ErrorKind::WouldBlock
                || io.kind() == std::io::ErrorKind::TimedOut =>
        {
            format!(
                "the daemon sent nothing for {} s, not even a heartbeat: it is stopped (SIGSTOP) or hung",
                silence_limit().as_secs()
            )
        }
        other => other.to_string(),
    };
    Failure::new(
        EXIT_UNREACHABLE,
        format!("{why}; its log: {}", paths.log.display()),
    )
}

/// The `dwd` binary: beside this executable first, then on PATH.
pub fn daemon_binary() -> PathBuf {
    let beside = std::env::current_exe()
        .ok()
        .and_then(|exe| exe.parent().map(|dir| dir.join("dwd")));
    match beside {
        Some(path) if path.is_file() => path,
        _ => PathBuf::from("dwd"),
    }
}

/// Starts `dwd` for `paths.socket` and waits until it accepts a connection. Several
/// clients may do this at once: the daemon's lock lets one win and the others exit saying
/// so, and every client connects to the winner.
fn start_daemon(paths: &DaemonPaths) -> Result<UnixStream, Failure> {
    let binary = daemon_binary();
    if !QUIET.load(std::sync::atomic::Ordering::Relaxed) {
        eprintln!(
            "dwctl: starting dwd ({}) on {}",
            binary.display(),
            paths.socket.display()
        );
    }
    for _ in 0..3 {
        let output = Command::new(&binary)
            .arg("--socket")
            .arg(&paths.socket)
            .arg("--log-file")
            .arg(&paths.log)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .map_err(|e| {
                Failure::new(
                    EXIT_UNREACHABLE,
                    format!("cannot start {}: {e}", binary.display()),
                )
            })?;
        // A dwd that could not take the lock found another daemon (starting, running or
        // stopping); any other failure is reported as it is.
        if !output.status.success() && !lock_is_held(paths) {
            let stderr = String::from_utf8_lossy(&output.stderr).trim().to_string();
            return Err(Failure::new(
                EXIT_UNREACHABLE,
                format!("dwd failed to start: {stderr}"),
            ));
        }
        // Started, or another client's dwd is starting: its socket appears shortly. A
        // daemon that holds the lock with no socket is stopping: wait until it is gone,
        // then start a fresh one.
        if output.status.success() || !wait_while_stopping(paths) {
            return wait_for_daemon(paths);
        }
    }
    wait_for_daemon(paths)
}

/// Whether a daemon was stopping on `paths` (its lock held, its socket gone); waits until
/// it has exited.
fn wait_while_stopping(paths: &DaemonPaths) -> bool {
    let deadline = Instant::now() + STOPPING_LIMIT;
    let mut waited = false;
    while Instant::now() < deadline {
        if std::fs::symlink_metadata(&paths.socket).is_ok() || !lock_is_held(paths) {
            return waited;
        }
        waited = true;
        std::thread::sleep(Duration::from_millis(100));
    }
    waited
}

/// Waits until the daemon on `paths` has exited (its lock released), for as long as a
/// stopping daemon may take; whether it did.
pub fn wait_for_exit(paths: &DaemonPaths) -> bool {
    let deadline = Instant::now() + STOPPING_LIMIT;
    while lock_is_held(paths) {
        if Instant::now() >= deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    true
}

/// Whether a process holds the daemon's lock file.
fn lock_is_held(paths: &DaemonPaths) -> bool {
    let Ok(file) = std::fs::File::open(&paths.lock) else {
        return false;
    };
    match nix::fcntl::Flock::lock(file, nix::fcntl::FlockArg::LockSharedNonblock) {
        Ok(_released_on_drop) => false,
        Err(_) => true,
    }
}

fn wait_for_daemon(paths: &DaemonPaths) -> Result<UnixStream, Failure> {
    wait_for_socket(&paths.socket, START_TIMEOUT).map_err(|e| {
        Failure::new(
            EXIT_UNREACHABLE,
            format!(
                "dwd did not start listening on {} within {} s ({e}); see {}",
                paths.socket.display(),
                START_TIMEOUT.as_secs(),
                paths.log.display()
            ),
        )
    })
}

fn wait_for_socket(socket: &Path, timeout: Duration) -> std::io::Result<UnixStream> {
    let deadline = Instant::now() + timeout;
    loop {
        match UnixStream::connect(socket) {
            Ok(stream) => return Ok(stream),
            Err(e) if is_absent(&e) && Instant::now() < deadline => {
                std::thread::sleep(Duration::from_millis(20))
            }
            Err(e) => return Err(e),
        }
    }
}
