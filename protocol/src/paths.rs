//! Where the daemon's socket, lock file and log live.
//!
//! The socket is, in order: the `--socket` flag, `$DWD_SOCKET`, then
//! `$XDG_RUNTIME_DIR/dwd/dwd.sock`, then `/tmp/dwd-$UID/dwd.sock`. The lock and log files sit
//! beside the socket and share its stem (`dwd.lock`, `dwd.log`), so every socket has its own
//! daemon, lock and log: tests and users can run private daemons side by side.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that selects the socket when no `--socket` flag is given.
pub const SOCKET_ENV: &str = "DWD_SOCKET";

/// The files that belong to one daemon.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DaemonPaths {
    pub socket: PathBuf,
    pub lock: PathBuf,
    pub log: PathBuf,
}

impl DaemonPaths {
    /// Resolves the paths from an explicit flag value, else the environment.
    pub fn resolve(flag: Option<&Path>) -> Self {
        let env_socket = std::env::var_os(SOCKET_ENV).filter(|v| !v.is_empty());
        let runtime_dir = std::env::var_os("XDG_RUNTIME_DIR").filter(|v| !v.is_empty());
        Self::resolve_from(
            flag,
            env_socket,
            runtime_dir,
            nix::unistd::getuid().as_raw(),
        )
    }

    /// The resolution rule, with its inputs passed in (testable without touching the process).
    pub fn resolve_from(
        flag: Option<&Path>,
        env_socket: Option<OsString>,
        runtime_dir: Option<OsString>,
        uid: u32,
    ) -> Self {
        let socket = if let Some(path) = flag {
            path.to_path_buf()
        } else if let Some(path) = env_socket {
            PathBuf::from(path)
        } else if let Some(dir) = runtime_dir {
            PathBuf::from(dir).join("dwd").join("dwd.sock")
        } else {
            PathBuf::from(format!("/tmp/dwd-{uid}")).join("dwd.sock")
        };
        Self::for_socket(socket)
    }

    /// The lock and log files that go with `socket`. A relative socket path is made
    /// absolute, since the daemon changes to `/` once it daemonizes.
    pub fn for_socket(socket: PathBuf) -> Self {
        let socket = std::path::absolute(&socket).unwrap_or(socket);
        let stem = socket
            .file_stem()
            .map(|s| s.to_string_lossy().into_owned())
            .unwrap_or_else(|| "dwd".to_string());
        let dir = socket.parent().map(Path::to_path_buf).unwrap_or_default();
        DaemonPaths {
            lock: dir.join(format!("{stem}.lock")),
            log: dir.join(format!("{stem}.log")),
            socket,
        }
    }

    /// The directory that holds the socket.
    pub fn dir(&self) -> &Path {
        self.socket.parent().unwrap_or(Path::new("."))
    }
}

/// Creates `dir` (and its parents) with mode 0700 if missing. An existing directory must be
/// owned by the current user; if it is, group and other access is removed from it.
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    if !dir.exists() {
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir)?;
    }
    let meta = fs::metadata(dir)?;
    let uid = nix::unistd::getuid().as_raw();
    if meta.uid() != uid {
        return Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "{} belongs to uid {}, not to you (uid {uid}); choose another socket with --socket or DWD_SOCKET",
                dir.display(),
                meta.uid()
            ),
        ));
    }
    if meta.permissions().mode() & 0o077 != 0 {
        fs::set_permissions(dir, fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_flag_wins_over_everything() {
        let p = DaemonPaths::resolve_from(
            Some(Path::new("/x/a.sock")),
            Some("/env/b.sock".into()),
            Some("/run/user/5".into()),
            5,
        );
        assert_eq!(p.socket, PathBuf::from("/x/a.sock"));
        assert_eq!(p.lock, PathBuf::from("/x/a.lock"));
        assert_eq!(p.log, PathBuf::from("/x/a.log"));
    }

    #[test]
    fn the_environment_comes_next() {
        let p = DaemonPaths::resolve_from(None, Some("/env/b.sock".into()), Some("/run".into()), 5);
        assert_eq!(p.socket, PathBuf::from("/env/b.sock"));
    }

    #[test]
    fn then_the_runtime_dir_then_tmp_with_the_uid() {
        let p = DaemonPaths::resolve_from(None, None, Some("/run/user/5".into()), 5);
        assert_eq!(p.socket, PathBuf::from("/run/user/5/dwd/dwd.sock"));
        assert_eq!(p.log, PathBuf::from("/run/user/5/dwd/dwd.log"));
        let p = DaemonPaths::resolve_from(None, None, None, 1234);
        assert_eq!(p.socket, PathBuf::from("/tmp/dwd-1234/dwd.sock"));
        assert_eq!(p.lock, PathBuf::from("/tmp/dwd-1234/dwd.lock"));
    }

    #[test]
    fn a_relative_socket_is_made_absolute() {
        let p = DaemonPaths::for_socket(PathBuf::from("rel/d.sock"));
        assert!(p.socket.is_absolute());
        assert!(p.socket.ends_with("rel/d.sock"));
        assert!(p.log.ends_with("rel/d.log"));
    }

    #[test]
    fn a_private_dir_is_created_0700_and_tightened_if_loose() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
    }
}
