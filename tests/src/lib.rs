//! Helpers for the end-to-end tests: find the built `dwd` and `dwctl`, give each test its
//! own daemon on a private socket, and clean it up afterwards.
//!
//! `cargo test --workspace` builds both binaries before any test runs (their packages have
//! integration tests of their own), next to this test executable's `deps` folder. Set
//! `DW_BIN_DIR` to test other builds.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// The folder holding the `dwd` and `dwctl` binaries under test.
pub fn bin_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("DW_BIN_DIR") {
        return PathBuf::from(dir);
    }
    let exe = std::env::current_exe().expect("current test executable");
    let dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>/deps/..")
        .to_path_buf();
    for name in ["dwd", "dwctl"] {
        assert!(
            dir.join(name).is_file(),
            "{} is missing: build it with `cargo test --workspace` (or `cargo build`), or set DW_BIN_DIR",
            dir.join(name).display()
        );
    }
    dir
}

/// The repository root.
pub fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("tests/ is inside the repository")
        .to_path_buf()
}

/// The bundled example workflow.
pub fn example_workflow() -> PathBuf {
    repo_root().join("examples/tiny-sd.json")
}

/// The text of `examples/NAME` with its `../tests/fixtures` paths made absolute, so a copy
/// written anywhere still finds its model and inputs.
pub fn example_text(name: &str) -> String {
    let fixtures = repo_root().join("tests/fixtures");
    std::fs::read_to_string(repo_root().join("examples").join(name))
        .unwrap_or_else(|e| panic!("examples/{name}: {e}"))
        .replace("../tests/fixtures", fixtures.to_str().expect("utf-8 path"))
}

/// A private daemon for one test: its own socket directory, stopped (or killed) on drop.
pub struct TestDaemon {
    pub dir: tempfile::TempDir,
    pub socket: PathBuf,
}

/// The result of one `dwctl` invocation.
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Run {
    /// What a finished `dwctl` process left: exit code, stdout and stderr.
    pub fn of(output: Output) -> Run {
        Run {
            code: output.status.code().unwrap_or(-1),
            stdout: String::from_utf8_lossy(&output.stdout).into_owned(),
            stderr: String::from_utf8_lossy(&output.stderr).into_owned(),
        }
    }

    /// stdout parsed as one JSON object.
    pub fn json(&self) -> Value {
        serde_json::from_str(self.stdout.trim()).unwrap_or_else(|e| {
            panic!(
                "stdout is not JSON ({e}): {}\nstderr: {}",
                self.stdout, self.stderr
            )
        })
    }

    /// The file names of the outputs a `run --json` wrote, in order.
    pub fn output_names(&self) -> Vec<String> {
        self.json()["outputs"]
            .as_array()
            .expect("outputs")
            .iter()
            .map(|o| {
                Path::new(o["path"].as_str().expect("path"))
                    .file_name()
                    .expect("a file name")
                    .to_string_lossy()
                    .into_owned()
            })
            .collect()
    }

    #[track_caller]
    pub fn assert_code(&self, code: i32) -> &Self {
        assert_eq!(
            self.code, code,
            "exit code\nstdout: {}\nstderr: {}",
            self.stdout, self.stderr
        );
        self
    }
}

impl Default for TestDaemon {
    fn default() -> Self {
        Self::new()
    }
}

impl TestDaemon {
    pub fn new() -> Self {
        let dir = tempfile::Builder::new()
            .prefix("dw-e2e")
            .tempdir()
            .expect("temp dir");
        let socket = dir.path().join("run/dwd.sock");
        TestDaemon { dir, socket }
    }

    pub fn log_file(&self) -> PathBuf {
        self.socket.with_file_name("dwd.log")
    }

    pub fn lock_file(&self) -> PathBuf {
        self.socket.with_file_name("dwd.lock")
    }

    /// A folder for outputs inside this test's directory.
    pub fn output_dir(&self) -> PathBuf {
        self.dir.path().join("out")
    }

    /// Starts this test's daemon by hand with extra flags (e.g. `--keep-alive 1s`); it
    /// daemonizes and is listening when this returns.
    pub fn start(&self, flags: &[&str]) {
        let output = Command::new(bin_dir().join("dwd"))
            .arg("--socket")
            .arg(&self.socket)
            .args(flags)
            .stdin(Stdio::null())
            .output()
            .expect("run dwd");
        assert!(
            output.status.success(),
            "dwd {flags:?} failed: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }

    /// A `dwctl` command aimed at this daemon, run from the test directory.
    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(bin_dir().join("dwctl"));
        command
            .args(args)
            .env("DWD_SOCKET", &self.socket)
            .env_remove("NO_COLOR")
            .current_dir(self.dir.path())
            .stdin(Stdio::null());
        command
    }

    /// `dwctl run WORKFLOW -o <output dir> EXTRA...`, to add environment to, spawn or wait
    /// for.
    pub fn run_command(&self, workflow: &Path, extra: &[&str]) -> Command {
        let out = self.output_dir();
        let mut args = vec![
            "run",
            workflow.to_str().expect("utf-8 path"),
            "-o",
            out.to_str().expect("utf-8 path"),
        ];
        args.extend_from_slice(extra);
        self.command(&args)
    }

    /// `dwctl run WORKFLOW -o <output dir> --json EXTRA...`.
    pub fn run_json(&self, workflow: &Path, extra: &[&str]) -> Run {
        let mut command = self.run_command(workflow, &["--json"]);
        command.args(extra);
        Run::of(command.output().expect("run dwctl"))
    }

    /// Runs `dwctl` to completion.
    pub fn dwctl(&self, args: &[&str]) -> Run {
        Run::of(self.command(args).output().expect("run dwctl"))
    }

    /// Starts `dwctl` without waiting, with stdout and stderr piped.
    pub fn spawn(&self, args: &[&str]) -> Child {
        self.command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn dwctl")
    }

    /// `dwctl run` of `examples/NAME` (its fixture paths made absolute by `example_text`)
    /// as `edit` leaves it, written into this test's folder, outputs there, as JSON.
    pub fn run_edited_example(&self, name: &str, edit: impl Fn(String) -> String) -> Run {
        let workflow = self.dir.path().join(name);
        std::fs::write(&workflow, edit(example_text(name))).expect("write the workflow");
        self.run_json(&workflow, &[])
    }

    /// `dwctl run` of the example with outputs in this test's folder, as JSON.
    pub fn run_example(&self, extra: &[&str]) -> Run {
        self.run_json(&example_workflow(), extra)
    }

    /// A `dwctl run` of the example (outputs in this test's folder, plain progress) to
    /// add environment to, spawn or wait for.
    pub fn example_command(&self, extra: &[&str]) -> Command {
        self.run_command(&example_workflow(), extra)
    }

    /// Sends `signal` to this test's daemon.
    pub fn signal(&self, signal: nix::sys::signal::Signal) {
        let pid = self.pid().expect("a running daemon");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), signal).expect("kill");
    }

    /// The daemon's pid from its lock file, if it is running.
    pub fn pid(&self) -> Option<i32> {
        let text = std::fs::read_to_string(self.lock_file()).ok()?;
        let pid: i32 = text.trim().parse().ok()?;
        process_alive(pid).then_some(pid)
    }

    /// `dwctl status --json`.
    pub fn status(&self) -> Value {
        let run = self.dwctl(&["status", "--json"]);
        run.assert_code(0);
        run.json()
    }

    /// The daemon's log, for failure messages.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_file()).unwrap_or_default()
    }
}

impl Drop for TestDaemon {
    fn drop(&mut self) {
        let pid = self.pid();
        let _ = self.dwctl(&["stop"]);
        if let Some(pid) = pid {
            if process_alive(pid) {
                let _ = nix::sys::signal::kill(
                    nix::unistd::Pid::from_raw(pid),
                    nix::sys::signal::Signal::SIGKILL,
                );
            }
        }
    }
}

/// Whether a process still exists. A killed multi-threaded process can show its main
/// thread as a zombie while other threads are still exiting and holding its files (the
/// socket among them), so it counts as gone only once no thread of it is left running.
pub fn process_alive(pid: i32) -> bool {
    let Ok(tasks) = std::fs::read_dir(format!("/proc/{pid}/task")) else {
        return false;
    };
    tasks.filter_map(Result::ok).any(|task| {
        let stat = std::fs::read_to_string(task.path().join("stat")).unwrap_or_default();
        let state = stat
            .rsplit(')')
            .next()
            .map(str::trim_start)
            .and_then(|rest| rest.chars().next());
        matches!(state, Some(s) if s != 'Z' && s != 'X')
    })
}

/// Waits until `condition` holds, or panics with `what` after `timeout`.
#[track_caller]
pub fn wait_until(what: &str, timeout: Duration, mut condition: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !condition() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// The text chunks of a PNG file, keyword to text.
pub fn png_text_chunks(path: &Path) -> Vec<(String, String)> {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let reader = decoder.read_info().expect("a valid PNG");
    let info = reader.info();
    let mut chunks: Vec<(String, String)> = info
        .uncompressed_latin1_text
        .iter()
        .map(|c| (c.keyword.clone(), c.text.clone()))
        .collect();
    chunks.extend(
        info.utf8_text
            .iter()
            .map(|c| (c.keyword.clone(), c.get_text().unwrap_or_default())),
    );
    chunks
}

/// Decoded RGB pixels and size of a PNG file.
/// The largest difference between two 8-bit images of one size, in levels.
pub fn max_level_difference(a: &[u8], b: &[u8]) -> u8 {
    assert_eq!(a.len(), b.len(), "image sizes differ");
    a.iter()
        .zip(b)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}

/// Writes 8-bit RGB pixels (row-major) as a PNG.
pub fn write_png(path: &Path, width: u32, height: u32, rgb: &[u8]) {
    let file =
        std::fs::File::create(path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
    let mut encoder = png::Encoder::new(std::io::BufWriter::new(file), width, height);
    encoder.set_color(png::ColorType::Rgb);
    encoder.set_depth(png::BitDepth::Eight);
    let mut writer = encoder.write_header().expect("a PNG header");
    writer.write_image_data(rgb).expect("the PNG's pixels");
}

pub fn png_pixels(path: &Path) -> (u32, u32, Vec<u8>) {
    let file = std::fs::File::open(path).unwrap_or_else(|e| panic!("open {}: {e}", path.display()));
    let decoder = png::Decoder::new(std::io::BufReader::new(file));
    let mut reader = decoder.read_info().expect("a valid PNG");
    let mut buf = vec![0; reader.output_buffer_size().expect("size")];
    let info = reader.next_frame(&mut buf).expect("a frame");
    buf.truncate(info.buffer_size());
    (info.width, info.height, buf)
}

/// Pids of running `dwd` processes serving `socket`.
pub fn daemons_on(socket: &Path) -> Vec<i32> {
    let wanted = socket.as_os_str().as_encoded_bytes().to_vec();
    let Ok(entries) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .filter_map(Result::ok)
        .filter_map(|e| e.file_name().to_str()?.parse::<i32>().ok())
        .filter(|pid| {
            let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else {
                return false;
            };
            let args: Vec<&[u8]> = cmdline.split(|b| *b == 0).collect();
            args.first().is_some_and(|a| a.ends_with(b"dwd"))
                && args.contains(&wanted.as_slice())
                && process_alive(*pid)
        })
        .collect()
}

/// Copies a folder and everything under it (a model fixture to change in a test).
pub fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let entry = entry.unwrap();
        let target = to.join(entry.file_name());
        if entry.file_type().unwrap().is_dir() {
            copy_dir(&entry.path(), &target);
        } else {
            std::fs::copy(entry.path(), target).unwrap();
        }
    }
}

/// The placements (offload) a daemon logged, in order: `(placed?, component)`.
pub fn placements(log: &str) -> Vec<(bool, String)> {
    log.lines()
        .filter_map(|line| {
            let (_, rest) = line.split_once("dwd::placement")?;
            let placed = rest.contains("placed ");
            let word = if placed { "placed " } else { "released " };
            let name = rest.split_once(word)?.1.split_whitespace().next()?;
            Some((placed, name.to_string()))
        })
        .collect()
}
