//! Images named by `http(s)` URLs, as diffusers-workflow accepts them: each URL is fetched
//! once into a cache folder (`$XDG_CACHE_HOME/dw/images`, else `~/.cache/dw/images`), with
//! a time limit and a size limit checked before and while reading, and then read like any
//! image file. A failed fetch says which URL and why; nothing partial is ever cached.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use protocol::workflow::sha256_hex;

use crate::inputs::InputError;

/// How URLs are fetched: where they are kept, and the limits.
#[derive(Debug, Clone)]
pub struct Fetcher {
    pub cache_dir: PathBuf,
    /// For the whole request, from connecting to the last byte.
    pub timeout: Duration,
    pub max_bytes: u64,
}

impl Default for Fetcher {
    fn default() -> Self {
        Fetcher {
            cache_dir: default_cache_dir(),
            timeout: Duration::from_secs(30),
            max_bytes: 64 << 20,
        }
    }
}

/// `$XDG_CACHE_HOME/dw/images`, else `~/.cache/dw/images`.
pub fn default_cache_dir() -> PathBuf {
    let base = std::env::var_os("XDG_CACHE_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(std::env::temp_dir);
    base.join("dw").join("images")
}

/// Whether `location` is a URL dw fetches.
pub fn is_url(location: &str) -> bool {
    location.starts_with("http://") || location.starts_with("https://")
}

impl Fetcher {
    /// The cached copy of `url`, fetching it first if it is not cached yet.
    pub fn fetch(&self, url: &str) -> Result<PathBuf, InputError> {
        let path = self.cache_dir.join(sha256_hex(url.as_bytes()));
        if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_file()) {
            return Ok(path);
        }
        let bytes = self.download(url)?;
        self.store(&path, &bytes).map_err(|e| {
            InputError::new(format!(
                "cannot cache {url} in {}: {e}",
                self.cache_dir.display()
            ))
        })?;
        Ok(path)
    }

    fn download(&self, url: &str) -> Result<Vec<u8>, InputError> {
        let fail = |why: String| InputError::new(format!("cannot fetch {url}: {why}"));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(self.timeout))
            .build()
            .into();
        let mut response = agent.get(url).call().map_err(|e| match e {
            ureq::Error::Timeout(_) => fail(format!("no answer within {:?}", self.timeout)),
            other => fail(other.to_string()),
        })?;
        let announced = response
            .headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().parse::<u64>().ok());
        if let Some(length) = announced.filter(|&n| n > self.max_bytes) {
            return Err(fail(format!(
                "it is {length} bytes; the limit is {}",
                self.max_bytes
            )));
        }
        let mut bytes = Vec::new();
        response
            .body_mut()
            .as_reader()
            .take(self.max_bytes + 1)
            .read_to_end(&mut bytes)
            .map_err(|e| fail(e.to_string()))?;
        if bytes.len() as u64 > self.max_bytes {
            return Err(fail(format!(
                "it is larger than the limit of {} bytes",
                self.max_bytes
            )));
        }
        Ok(bytes)
    }

    /// Writes the bytes under their final name atomically, in a folder only we can read.
    fn store(&self, path: &Path, bytes: &[u8]) -> std::io::Result<()> {
        use std::io::Write;
        use std::os::unix::fs::DirBuilderExt;
        std::fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(&self.cache_dir)?;
        let mut temp = tempfile::NamedTempFile::new_in(&self.cache_dir)?;
        temp.write_all(bytes)?;
        temp.as_file().sync_data()?;
        temp.persist(path).map_err(|e| e.error)?;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{BufRead, BufReader, Write};
    use std::net::TcpListener;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;

    /// A loopback server answering every request with `body` (or never, when `None`),
    /// counting the requests.
    fn serve(body: Option<Vec<u8>>) -> (String, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}/image.png", listener.local_addr().unwrap());
        let hits = Arc::new(AtomicUsize::new(0));
        let counted = hits.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming().take(8) {
                let Ok(mut stream) = stream else { continue };
                counted.fetch_add(1, Ordering::SeqCst);
                let mut reader = BufReader::new(stream.try_clone().unwrap());
                let mut line = String::new();
                while reader.read_line(&mut line).is_ok_and(|n| n > 2) {
                    line.clear();
                }
                match &body {
                    Some(body) => {
                        let head = format!(
                            "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                            body.len()
                        );
                        let _ = stream.write_all(head.as_bytes());
                        let _ = stream.write_all(body);
                    }
                    None => std::thread::sleep(Duration::from_secs(3)),
                }
            }
        });
        (url, hits)
    }

    fn fetcher(dir: &Path) -> Fetcher {
        Fetcher {
            cache_dir: dir.join("images"),
            timeout: Duration::from_millis(500),
            max_bytes: 1000,
        }
    }

    #[test]
    fn a_url_is_fetched_once_and_then_read_from_the_cache() {
        let dir = tempfile::tempdir().unwrap();
        let (url, hits) = serve(Some(b"pixels".to_vec()));
        let fetcher = fetcher(dir.path());
        let first = fetcher.fetch(&url).unwrap();
        let second = fetcher.fetch(&url).unwrap();
        assert_eq!(first, second);
        assert_eq!(std::fs::read(&first).unwrap(), b"pixels");
        assert_eq!(hits.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn a_body_over_the_limit_is_refused_and_nothing_is_cached() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _) = serve(Some(vec![0; 2000]));
        let e = fetcher(dir.path()).fetch(&url).unwrap_err().to_string();
        assert!(
            e.contains(&url) && e.contains("2000 bytes; the limit is 1000"),
            "{e}"
        );
        assert!(
            std::fs::read_dir(dir.path().join("images")).map_or(true, |mut d| d.next().is_none())
        );
    }

    #[test]
    fn a_silent_server_times_out_with_the_url_named() {
        let dir = tempfile::tempdir().unwrap();
        let (url, _) = serve(None);
        let e = fetcher(dir.path()).fetch(&url).unwrap_err().to_string();
        assert!(e.starts_with(&format!("cannot fetch {url}: ")), "{e}");
    }
}
