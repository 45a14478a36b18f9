//! The daemon's log: a file that tracing writes to and that never stops the daemon. A
//! line that cannot be written (a full disk, a broken stderr) is dropped and counted, and
//! `dwctl status` shows the count; a panic is logged without waiting on the log's lock,
//! so a panic raised while a line is being written cannot deadlock the daemon. Once the
//! file reaches its size cap it is renamed `<log>.1` (replacing the one before) and a
//! fresh file starts, so the logs never take more than twice the cap.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The log file, once logging is set up.
static LOG: OnceLock<LogFile> = OnceLock::new();

/// Where log lines go, and how many were lost.
pub struct LogFile {
    file: Mutex<Sink>,
    dropped: AtomicU64,
    /// The file's path and size cap, when it rotates.
    rotation: Option<(PathBuf, u64)>,
}

/// The open file and how much it holds.
struct Sink {
    file: File,
    len: u64,
}

impl Sink {
    fn new(file: File) -> Self {
        let len = file.metadata().map_or(0, |m| m.len());
        Sink { file, len }
    }

    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.len += bytes.len() as u64;
        Ok(())
    }
}

impl LogFile {
    /// A log that grows without bound (for a file the caller manages).
    pub fn new(file: File) -> Self {
        LogFile {
            file: Mutex::new(Sink::new(file)),
            dropped: AtomicU64::new(0),
            rotation: None,
        }
    }

    /// A log at `path` that rotates once it holds `max_bytes`.
    pub fn rotating(file: File, path: PathBuf, max_bytes: u64) -> Self {
        LogFile {
            rotation: Some((path, max_bytes)),
            ..LogFile::new(file)
        }
    }

    /// Writes one formatted line (rotating first when it would pass the cap); a failure is
    /// counted, never returned.
    fn write_line(&self, bytes: &[u8], also_stderr: bool) {
        let mut sink = match self.file.lock() {
            Ok(sink) => sink,
            Err(poisoned) => poisoned.into_inner(),
        };
        if let Some((path, max)) = &self.rotation {
            if sink.len > 0 && sink.len + bytes.len() as u64 > *max {
                // A log that cannot rotate goes on in the file it has.
                if let Ok(fresh) = rotate(path) {
                    *sink = Sink::new(fresh);
                }
            }
        }
        if sink.write(bytes).is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        drop(sink);
        if also_stderr {
            let _ = io::stderr().write_all(bytes);
        }
    }

    /// Writes `line` only if the lock is free right now (for the panic hook).
    fn try_write_line(&self, line: &str) {
        let written = match self.file.try_lock() {
            Ok(mut sink) => sink.write(line.as_bytes()).is_ok(),
            Err(_) => false,
        };
        if !written {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }
}

/// Opens the log file for appending, never through a link.
fn open_append(path: &Path) -> io::Result<File> {
    std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
}

/// Moves the full log to `<log>.1` and opens a fresh one.
fn rotate(path: &Path) -> io::Result<File> {
    let mut old = path.as_os_str().to_owned();
    old.push(".1");
    std::fs::rename(path, &old)?;
    open_append(path)
}

/// Opens `path` anew for the log (after a rotation moved the old file away): SIGHUP.
pub fn reopen(path: &Path) -> io::Result<()> {
    let file = open_append(path)?;
    if let Some(log) = LOG.get() {
        match log.file.lock() {
            Ok(mut current) => *current = Sink::new(file),
            Err(poisoned) => *poisoned.into_inner() = Sink::new(file),
        }
    }
    Ok(())
}

/// How many log lines could not be written since the daemon started.
pub fn dropped_lines() -> u64 {
    LOG.get().map_or(0, LogFile::dropped)
}

/// One event's bytes, written to the log when the event is complete.
pub struct LineWriter {
    buffer: Vec<u8>,
    also_stderr: bool,
}

impl Write for LineWriter {
    fn write(&mut self, bytes: &[u8]) -> io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        Ok(bytes.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for LineWriter {
    fn drop(&mut self) {
        if let Some(log) = LOG.get() {
            log.write_line(&self.buffer, self.also_stderr);
        }
    }
}

/// Hands tracing a [`LineWriter`] per event.
struct MakeLineWriter {
    also_stderr: bool,
}

impl<'a> tracing_subscriber::fmt::MakeWriter<'a> for MakeLineWriter {
    type Writer = LineWriter;

    fn make_writer(&'a self) -> LineWriter {
        LineWriter {
            buffer: Vec::new(),
            also_stderr: self.also_stderr,
        }
    }
}

/// Sets up logging to `log` (and stderr in the foreground) at `filter` (else `$DWD_LOG`,
/// else `info`), and a panic hook that logs without blocking.
pub fn init(log: LogFile, foreground: bool, filter: Option<&str>) {
    let _ = LOG.set(log);
    let filter = filter
        .map(str::to_string)
        .or_else(|| std::env::var("DWD_LOG").ok())
        .unwrap_or_else(|| "info".to_string());
    let filter = tracing_subscriber::EnvFilter::try_new(&filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(false)
        .with_writer(MakeLineWriter {
            also_stderr: foreground,
        })
        .init();
    std::panic::set_hook(Box::new(|info| {
        if let Some(log) = LOG.get() {
            log.try_write_line(&format!("ERROR panic: {info}\n"));
        }
    }));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_disk_drops_and_counts_lines_instead_of_failing() {
        let full = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/full")
            .unwrap();
        let log = LogFile::new(full);
        log.write_line(b"one\n", false);
        log.write_line(b"two\n", false);
        assert_eq!(log.dropped(), 2);
    }

    #[test]
    fn a_full_log_moves_to_dot_one_and_a_fresh_one_starts() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("dwd.log");
        let log = LogFile::rotating(open_append(&path).unwrap(), path.clone(), 100);
        let line = [&[b'x'; 39][..], b"\n"].concat();
        log.write_line(&line, false);
        log.write_line(&line, false);
        log.write_line(b"third line\n", false);
        assert!(
            !dir.path().join("dwd.log.1").exists(),
            "91 bytes fit in 100"
        );
        log.write_line(b"fourth line\n", false);
        log.write_line(b"fifth line\n", false);
        let old = std::fs::read_to_string(dir.path().join("dwd.log.1")).unwrap();
        let new = std::fs::read_to_string(&path).unwrap();
        assert_eq!(old.len(), 91);
        assert!(old.ends_with("third line\n"), "{old}");
        assert_eq!(new, "fourth line\nfifth line\n");
        assert_eq!(log.dropped(), 0);
    }

    #[test]
    fn a_panic_line_while_the_log_is_held_is_dropped_not_waited_for() {
        let dir = tempfile::tempdir().unwrap();
        let log = LogFile::new(File::create(dir.path().join("log")).unwrap());
        let held = log.file.lock().unwrap();
        log.try_write_line("panic\n");
        drop(held);
        assert_eq!(log.dropped(), 1);
        log.try_write_line("panic\n");
        assert_eq!(log.dropped(), 1);
    }
}
