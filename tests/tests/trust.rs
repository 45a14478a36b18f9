//! End-to-end: another local user gets nothing. The daemon never changes or follows what
//! it did not create (a shared directory, a link, a file at the socket path), and the
//! client talks only to a socket in a private directory of its own user (or root's),
//! served by a process of that user (SO_PEERCRED).

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;

use dw_tests::{bin_dir, example_workflow, TestDaemon};

fn dwd_on(socket: &Path) -> std::process::Output {
    Command::new(bin_dir().join("dwd"))
        .args(["--foreground", "--idle-exit", "5s", "--socket"])
        .arg(socket)
        .output()
        .unwrap()
}

fn dwctl_run(socket: &Path) -> std::process::Output {
    Command::new(bin_dir().join("dwctl"))
        .arg("--socket")
        .arg(socket)
        .args(["run", example_workflow().to_str().unwrap(), "-o"])
        .arg(socket.parent().unwrap().join("out"))
        .output()
        .unwrap()
}

fn stderr(output: &std::process::Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).unwrap().permissions().mode() & 0o7777
}

#[test]
fn a_directory_others_can_write_is_refused_and_left_as_it_is() {
    let tmp = tempfile::tempdir().unwrap();
    let shared = tmp.path().join("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o1777)).unwrap();
    let socket = shared.join("dwd.sock");

    let daemon = dwd_on(&socket);
    assert!(!daemon.status.success());
    assert!(
        stderr(&daemon).contains("can be written by group or others (mode 1777)"),
        "{}",
        stderr(&daemon)
    );
    assert_eq!(
        mode(&shared),
        0o1777,
        "dwd must not chmod a directory it did not create"
    );

    let client = dwctl_run(&socket);
    assert_eq!(client.status.code(), Some(3), "{}", stderr(&client));
    assert!(
        stderr(&client).contains("can be written by group or others"),
        "{}",
        stderr(&client)
    );
    assert!(!socket.exists());
}

#[test]
fn a_linked_socket_directory_and_a_file_at_the_socket_path_are_not_followed_or_removed() {
    let tmp = tempfile::tempdir().unwrap();
    let real = tmp.path().join("real");
    std::fs::create_dir(&real).unwrap();
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).unwrap();
    let link = tmp.path().join("link");
    std::os::unix::fs::symlink(&real, &link).unwrap();
    let daemon = dwd_on(&link.join("dwd.sock"));
    assert!(!daemon.status.success());
    assert!(
        stderr(&daemon).contains("is a symbolic link"),
        "{}",
        stderr(&daemon)
    );

    let file = real.join("dwd.sock");
    std::fs::write(&file, b"precious").unwrap();
    let daemon = dwd_on(&file);
    assert!(!daemon.status.success());
    assert!(
        stderr(&daemon).contains("exists and is not a socket"),
        "{}",
        stderr(&daemon)
    );
    let client = dwctl_run(&file);
    assert_eq!(client.status.code(), Some(3), "{}", stderr(&client));
    assert_eq!(std::fs::read(&file).unwrap(), b"precious");
}

fn is_root_with_setpriv() -> bool {
    nix::unistd::getuid().is_root()
        && Command::new("setpriv").arg("--version").output().is_ok()
        && Path::new("/usr/bin/python3").exists()
}

/// A folder for the test that the user `nobody` may enter.
fn open_dir() -> (tempfile::TempDir, PathBuf) {
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let dir = tmp.path().join("sockets");
    std::fs::create_dir(&dir).unwrap();
    (tmp, dir)
}

#[test]
fn a_socket_directory_of_another_user_is_refused_before_anything_is_sent() {
    if !is_root_with_setpriv() {
        eprintln!("skipped: needs root, setpriv and /usr/bin/python3 to act as another user");
        return;
    }
    let (_tmp, dir) = open_dir();
    nix::unistd::chown(&dir, Some(65534.into()), Some(65534.into())).unwrap();
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    let client = dwctl_run(&dir.join("dwd.sock"));
    assert_eq!(client.status.code(), Some(3), "{}", stderr(&client));
    assert!(
        stderr(&client).contains("belongs to uid 65534"),
        "{}",
        stderr(&client)
    );
}

#[test]
fn a_socket_served_by_another_user_is_refused_by_its_peer_credentials() {
    if !is_root_with_setpriv() {
        eprintln!("skipped: needs root, setpriv and /usr/bin/python3 to act as another user");
        return;
    }
    let (_tmp, dir) = open_dir();
    nix::unistd::chown(&dir, Some(65534.into()), Some(65534.into())).unwrap();
    let socket = dir.join("dwd.sock");
    // `nobody` listens; then root makes the folder and socket look like ours.
    let mut listener = Command::new("setpriv")
        .args(["--reuid=65534", "--regid=65534", "--clear-groups", "--", "/usr/bin/python3", "-c"])
        .arg("import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.bind(sys.argv[1]); s.listen(); print('ready', flush=True); c,_=s.accept(); time.sleep(2)")
        .arg(&socket)
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut ready = String::new();
    std::io::BufRead::read_line(
        &mut std::io::BufReader::new(listener.stdout.take().unwrap()),
        &mut ready,
    )
    .unwrap();
    for path in [&dir, &socket] {
        nix::unistd::chown(path.as_path(), Some(0.into()), Some(0.into())).unwrap();
    }
    std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o700)).unwrap();
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).unwrap();
    let client = dwctl_run(&socket);
    let _ = listener.kill();
    let _ = listener.wait();
    assert_eq!(client.status.code(), Some(3), "{}", stderr(&client));
    assert!(
        stderr(&client).contains("runs as uid 65534"),
        "{}",
        stderr(&client)
    );
}

#[test]
fn the_default_private_daemon_still_runs() {
    let daemon = TestDaemon::new();
    daemon.run_example(&[]).assert_code(0);
}
