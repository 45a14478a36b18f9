//! The daemon's log: a file that tracing writes to and that never stops the daemon. A
//! line that cannot be written (a full disk, a broken stderr) is dropped and counted, and
//! `dwctl status` shows the count; a panic is logged without waiting on the log's lock,
//! so a panic raised while a line is being written cannot deadlock the daemon.

use std::fs::File;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Mutex, OnceLock};

/// The log file, once logging is set up.
static LOG: OnceLock<LogFile> = OnceLock::new();

/// Where log lines go, and how many were lost.
pub struct LogFile {
    file: Mutex<File>,
    dropped: AtomicU64,
}

impl LogFile {
    pub fn new(file: File) -> Self {
        LogFile {
            file: Mutex::new(file),
            dropped: AtomicU64::new(0),
        }
    }

    /// Writes one formatted line; a failure is counted, never returned.
    fn write_line(&self, bytes: &[u8], also_stderr: bool) {
        let written = match self.file.lock() {
            Ok(mut file) => file.write_all(bytes),
            Err(poisoned) => poisoned.into_inner().write_all(bytes),
        };
        if written.is_err() {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
        if also_stderr {
            let _ = io::stderr().write_all(bytes);
        }
    }

    /// Writes `line` only if the lock is free right now (for the panic hook).
    fn try_write_line(&self, line: &str) {
        let written = match self.file.try_lock() {
            Ok(mut file) => file.write_all(line.as_bytes()).is_ok(),
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

/// Opens `path` anew for the log (after a rotation moved the old file away): SIGHUP.
pub fn reopen(path: &std::path::Path) -> io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)?;
    if let Some(log) = LOG.get() {
        match log.file.lock() {
            Ok(mut current) => *current = file,
            Err(poisoned) => *poisoned.into_inner() = file,
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

/// Sets up logging to `file` (and stderr in the foreground) at `filter` (else `$DWD_LOG`,
/// else `info`), and a panic hook that logs without blocking.
pub fn init(file: File, foreground: bool, filter: Option<&str>) {
    let _ = LOG.set(LogFile::new(file));
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
