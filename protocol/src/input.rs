//! Reading the files a workflow names, so that no name can stall or exhaust the reader:
//! only regular files are read (a FIFO, a device or a socket is refused at once: the file
//! is opened non-blocking and checked with `fstat` before any read), and never more bytes
//! than a limit that follows from what the file is.

use std::fs::File;
use std::io::{self, Read};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

/// The most a config, index or tokenizer file may hold.
pub const CONFIG_BYTES: u64 = 64 << 20;
/// The most an input image file may hold.
pub const IMAGE_BYTES: u64 = 256 << 20;
/// The most a latents file may hold.
pub const LATENTS_BYTES: u64 = 1 << 30;

/// Opens `path` for reading if it is a regular file (links are followed); returns it with
/// its length. Opening never blocks, even on a FIFO.
pub fn open_regular(path: &Path) -> io::Result<(File, u64)> {
    let file = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open(path)?;
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            format!(
                "{} is not a regular file (a directory, FIFO, device or socket); dw reads only files",
                path.display()
            ),
        ));
    }
    Ok((file, meta.len()))
}

/// Reads all of the regular file `path`, refusing one larger than `limit` bytes before
/// reading it (and stopping there if it grows while being read).
pub fn read_bounded(path: &Path, limit: u64) -> io::Result<Vec<u8>> {
    let (file, len) = open_regular(path)?;
    let too_large = |size: String| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!(
                "{} is {size} bytes; the limit for it is {limit}",
                path.display()
            ),
        )
    };
    if len > limit {
        return Err(too_large(len.to_string()));
    }
    let mut bytes = Vec::with_capacity(len as usize);
    file.take(limit + 1).read_to_end(&mut bytes)?;
    if bytes.len() as u64 > limit {
        return Err(too_large(format!("more than {limit}")));
    }
    Ok(bytes)
}

/// [`read_bounded`] as UTF-8 text.
pub fn read_text_bounded(path: &Path, limit: u64) -> io::Result<String> {
    String::from_utf8(read_bounded(path, limit)?).map_err(|e| {
        io::Error::new(
            io::ErrorKind::InvalidData,
            format!("{} is not UTF-8 text: {e}", path.display()),
        )
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_fifo_is_refused_at_once_and_a_device_too() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("pipe");
        nix::unistd::mkfifo(&fifo, nix::sys::stat::Mode::from_bits_truncate(0o600)).unwrap();
        let started = std::time::Instant::now();
        let e = read_bounded(&fifo, 10).unwrap_err().to_string();
        assert!(e.contains("is not a regular file"), "{e}");
        assert!(started.elapsed() < std::time::Duration::from_secs(1));
        let e = read_bounded(Path::new("/dev/zero"), 10)
            .unwrap_err()
            .to_string();
        assert!(e.contains("is not a regular file"), "{e}");
    }

    #[test]
    fn a_file_over_its_limit_is_refused_before_it_is_read() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("big");
        std::fs::write(&file, vec![0u8; 100]).unwrap();
        let e = read_bounded(&file, 99).unwrap_err().to_string();
        assert!(e.ends_with("is 100 bytes; the limit for it is 99"), "{e}");
        assert_eq!(read_bounded(&file, 100).unwrap().len(), 100);
    }
}
