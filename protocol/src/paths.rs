//! Where the daemon's socket, lock file and log live.
//!
//! The socket is, in order: the `--socket` flag, `$DWD_SOCKET`, then
//! `$XDG_RUNTIME_DIR/dwd/dwd.sock`, then `/tmp/dwd-$UID/dwd.sock`. The lock file sits beside
//! the socket and shares its stem (`dwd.lock`), so every socket has its own daemon. The log
//! of the default daemon is `$XDG_STATE_HOME/dw/dwd.log` (`~/.local/state/dw/dwd.log`): the
//! runtime directory is a small tmpfs that goes at logout. A daemon on a socket of its own
//! choosing keeps its log beside that socket (`a.sock`, `a.log`), so private daemons (tests,
//! side-by-side setups) never share one. `$DWD_LOG_FILE` names the log outright.

use std::ffi::OsString;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

/// Environment variable that selects the socket when no `--socket` flag is given.
pub const SOCKET_ENV: &str = "DWD_SOCKET";

/// Environment variable that names the log file.
pub const LOG_ENV: &str = "DWD_LOG_FILE";

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
        let var = |name: &str| std::env::var_os(name).filter(|v| !v.is_empty());
        let paths = Self::resolve_from(
            flag,
            var(SOCKET_ENV),
            var("XDG_RUNTIME_DIR"),
            nix::unistd::getuid().as_raw(),
        );
        let state_dir = state_dir(var("XDG_STATE_HOME"), var("HOME"));
        paths.with_log(
            var(LOG_ENV).map(PathBuf::from),
            flag.is_some() || var(SOCKET_ENV).is_some(),
            state_dir,
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

    /// Where the log goes: `named` when given; beside a socket the user chose; else in the
    /// state directory (when there is one).
    pub fn with_log(
        self,
        named: Option<PathBuf>,
        chosen_socket: bool,
        state_dir: Option<PathBuf>,
    ) -> Self {
        let log = match (named, state_dir) {
            (Some(named), _) => std::path::absolute(&named).unwrap_or(named),
            (None, Some(dir)) if !chosen_socket => dir.join("dwd.log"),
            (None, _) => self.log,
        };
        DaemonPaths { log, ..self }
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

/// dw's state directory: `$XDG_STATE_HOME/dw`, else `$HOME/.local/state/dw` (relative
/// values are ignored, as the XDG specification asks).
pub fn state_dir(xdg_state_home: Option<OsString>, home: Option<OsString>) -> Option<PathBuf> {
    let absolute = |v: OsString| Some(PathBuf::from(v)).filter(|p| p.is_absolute());
    match xdg_state_home.and_then(absolute) {
        Some(dir) => Some(dir.join("dw")),
        None => home.and_then(absolute).map(|h| h.join(".local/state/dw")),
    }
}

/// Creates `dir` (and its parents) with mode 0700 if missing. An existing one is never
/// changed: it must be trusted (see [`check_trusted_dir`]).
pub fn ensure_private_dir(dir: &Path) -> io::Result<()> {
    match fs::symlink_metadata(dir) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => fs::DirBuilder::new()
            .recursive(true)
            .mode(0o700)
            .create(dir),
        Err(e) => Err(e),
        Ok(_) => check_trusted_dir(dir),
    }
}

/// Whether `uid` may own what this user trusts: this user or root.
fn trusted_owner(uid: u32) -> bool {
    uid == nix::unistd::getuid().as_raw() || uid == 0
}

fn untrusted(path: &Path, why: String) -> io::Error {
    io::Error::new(
        io::ErrorKind::PermissionDenied,
        format!(
            "{} {why}; another user could put a daemon or socket there, so dw will not use it (choose a private socket with --socket or DWD_SOCKET)",
            path.display()
        ),
    )
}

/// The socket directory may be trusted: a real directory (not a symbolic link), owned by
/// this user or root, that neither group nor others can write to.
pub fn check_trusted_dir(dir: &Path) -> io::Result<()> {
    let meta = fs::symlink_metadata(dir)?;
    if meta.file_type().is_symlink() {
        return Err(untrusted(dir, "is a symbolic link".to_string()));
    }
    if !meta.is_dir() {
        return Err(untrusted(dir, "is not a directory".to_string()));
    }
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(dir, format!("belongs to uid {}", meta.uid())));
    }
    let mode = meta.permissions().mode();
    if mode & 0o022 != 0 {
        return Err(untrusted(
            dir,
            format!(
                "can be written by group or others (mode {:o})",
                mode & 0o7777
            ),
        ));
    }
    Ok(())
}

/// What is at the socket path before a daemon binds it.
#[derive(Debug, PartialEq, Eq)]
pub enum SocketPath {
    Free,
    /// A socket of this user's, left by a daemon that is gone.
    StaleSocket,
}

/// Checks what is at `socket`: nothing, or a socket this user owns (which a client may
/// connect to, or a daemon holding the lock may replace). A link, a regular file or
/// another user's socket is refused and never touched.
pub fn check_socket(socket: &Path) -> io::Result<SocketPath> {
    use std::os::unix::fs::FileTypeExt;
    let meta = match fs::symlink_metadata(socket) {
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(SocketPath::Free),
        Err(e) => return Err(e),
        Ok(meta) => meta,
    };
    if !meta.file_type().is_socket() {
        return Err(untrusted(socket, "exists and is not a socket".to_string()));
    }
    if !trusted_owner(meta.uid()) {
        return Err(untrusted(socket, format!("belongs to uid {}", meta.uid())));
    }
    if meta.permissions().mode() & 0o022 != 0 {
        return Err(untrusted(
            socket,
            "can be written by group or others".to_string(),
        ));
    }
    Ok(SocketPath::StaleSocket)
}

/// The peer of a connected socket must be this user or root (SO_PEERCRED).
pub fn check_peer(stream: &impl std::os::fd::AsFd) -> io::Result<()> {
    let credentials =
        nix::sys::socket::getsockopt(stream, nix::sys::socket::sockopt::PeerCredentials)
            .map_err(io::Error::from)?;
    if trusted_owner(credentials.uid()) {
        Ok(())
    } else {
        Err(io::Error::new(
            io::ErrorKind::PermissionDenied,
            format!(
                "the process behind the socket runs as uid {} (pid {}), not as you; dw will not talk to it",
                credentials.uid(),
                credentials.pid()
            ),
        ))
    }
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
    fn the_default_daemon_logs_in_the_state_directory_a_chosen_socket_beside_itself() {
        let state = state_dir(None, Some("/home/u".into()));
        assert_eq!(state, Some(PathBuf::from("/home/u/.local/state/dw")));
        let state = state_dir(Some("/s".into()), Some("/home/u".into()));
        assert_eq!(state, Some(PathBuf::from("/s/dw")));
        assert_eq!(state_dir(Some("rel".into()), None), None);

        let default = DaemonPaths::resolve_from(None, None, Some("/run/user/5".into()), 5);
        let p = default.clone().with_log(None, false, state.clone());
        assert_eq!(p.log, PathBuf::from("/s/dw/dwd.log"));
        assert_eq!(p.socket, PathBuf::from("/run/user/5/dwd/dwd.sock"));
        let p = default.clone().with_log(None, false, None);
        assert_eq!(p.log, PathBuf::from("/run/user/5/dwd/dwd.log"));
        let chosen = DaemonPaths::for_socket(PathBuf::from("/x/a.sock"));
        assert_eq!(
            chosen.with_log(None, true, state.clone()).log,
            PathBuf::from("/x/a.log")
        );
        let named = default.with_log(Some("/logs/mine.log".into()), false, state);
        assert_eq!(named.log, PathBuf::from("/logs/mine.log"));
    }

    #[test]
    fn a_relative_socket_is_made_absolute() {
        let p = DaemonPaths::for_socket(PathBuf::from("rel/d.sock"));
        assert!(p.socket.is_absolute());
        assert!(p.socket.ends_with("rel/d.sock"));
        assert!(p.log.ends_with("rel/d.log"));
    }

    #[test]
    fn a_private_dir_is_created_0700_and_a_loose_one_is_refused_not_changed() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        ensure_private_dir(&dir).unwrap();
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o700
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o777)).unwrap();
        let e = ensure_private_dir(&dir).unwrap_err().to_string();
        assert!(
            e.contains("can be written by group or others (mode 777)"),
            "{e}"
        );
        assert_eq!(
            fs::metadata(&dir).unwrap().permissions().mode() & 0o777,
            0o777,
            "never chmod what dw did not create"
        );
        fs::set_permissions(&dir, fs::Permissions::from_mode(0o755)).unwrap();
        ensure_private_dir(&dir).unwrap();
    }

    #[test]
    fn a_linked_dir_and_a_file_at_the_socket_path_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let real = tmp.path().join("real");
        fs::create_dir(&real).unwrap();
        let link = tmp.path().join("link");
        std::os::unix::fs::symlink(&real, &link).unwrap();
        let e = ensure_private_dir(&link).unwrap_err().to_string();
        assert!(e.contains("is a symbolic link"), "{e}");

        let file = real.join("dwd.sock");
        fs::write(&file, b"precious").unwrap();
        let e = check_socket(&file).unwrap_err().to_string();
        assert!(e.contains("exists and is not a socket"), "{e}");
        assert_eq!(
            check_socket(&real.join("none.sock")).unwrap(),
            SocketPath::Free
        );
        let socket = real.join("s.sock");
        let _listener = std::os::unix::net::UnixListener::bind(&socket).unwrap();
        fs::set_permissions(&socket, fs::Permissions::from_mode(0o600)).unwrap();
        assert_eq!(check_socket(&socket).unwrap(), SocketPath::StaleSocket);
    }

    #[test]
    fn the_peer_of_a_socket_pair_is_this_user() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        check_peer(&a).unwrap();
    }
}
