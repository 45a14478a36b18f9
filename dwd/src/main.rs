//! `dwd`: the daemon. Parses its flags, takes the single-instance lock, binds the socket,
//! daemonizes, then serves until SIGTERM, SIGINT or `dwctl stop`.
//!
//! The order matters: the lock and the socket come before the fork so a second daemon fails
//! loudly and clients can connect as soon as `dwd` returns; the tokio runtime is built after
//! the fork because a runtime does not survive one.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, Write};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::net::UnixListener as StdUnixListener;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use candle_core::Device;
use clap::Parser;
use nix::fcntl::{Flock, FlockArg};
use protocol::paths::{check_socket, ensure_private_dir, DaemonPaths, SocketPath};
use protocol::units::{parse_duration, KeepAlive, SizeLimit};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use dwd::cache::ComponentCache;
use dwd::cache::EXPIRY_CHECK_INTERVAL;
use dwd::engine::{Engine, MemoryPolicy};
use dwd::memory::{device_memory, human_bytes};
use dwd::pipelines::GeneratorSetting;
use dwd::queue::{run_executor, JobQueue};
use dwd::server::{serve, DaemonState};

/// The dw daemon: keeps diffusion pipelines loaded and runs workflows sent by `dwctl`.
///
/// You rarely start it by hand: `dwctl run` starts it when none is running. Start it
/// yourself to choose the device, or with --foreground under systemd or for debugging.
#[derive(Parser, Debug)]
#[command(version, about, long_about)]
struct Args {
    /// Socket to listen on [default: $DWD_SOCKET, else $XDG_RUNTIME_DIR/dwd/dwd.sock,
    /// else /tmp/dwd-$UID/dwd.sock]. The lock and log files sit beside it.
    #[arg(long, value_name = "PATH", env = "DWD_SOCKET")]
    socket: Option<PathBuf>,

    /// Stay attached to the terminal and log to stderr as well as the log file.
    #[arg(long)]
    foreground: bool,

    /// Log file [default: $XDG_STATE_HOME/dw/dwd.log (~/.local/state/dw/dwd.log); beside
    /// the socket when --socket or $DWD_SOCKET chooses one, e.g. a.sock logs to a.log].
    #[arg(long, value_name = "PATH", env = "DWD_LOG_FILE")]
    log_file: Option<PathBuf>,

    /// Rotate the log once it reaches this size: it becomes <log>.1 (replacing the one
    /// before) and a fresh log starts, so the logs take at most twice this.
    #[arg(long, default_value = "16MiB", value_name = "SIZE", value_parser = parse_log_max, env = "DWD_LOG_MAX")]
    log_max: u64,

    /// Where pipelines run: auto (CUDA if built with it and present, else CPU), cpu, or
    /// cuda:N.
    #[arg(
        long,
        default_value = "auto",
        value_name = "DEVICE",
        env = "DWD_DEVICE"
    )]
    device: String,

    /// Log filter, e.g. info, debug, dwd=trace [default: $DWD_LOG, else info].
    #[arg(long, value_name = "FILTER", env = "DWD_LOG")]
    log_level: Option<String>,

    /// How long loaded components stay after the last run that used them: 30m, 1h, 90s,
    /// 0 (unload right after each run), or forever (also any negative value). `dwctl run
    /// --keep-alive` overrides it per run.
    #[arg(long, default_value = "30m", value_name = "DURATION", value_parser = KeepAlive::parse, env = "DWD_KEEP_ALIVE")]
    keep_alive: KeepAlive,

    /// Most memory loaded components may take: bytes (6GiB, 512MiB) or a share of the
    /// device's memory (of RAM on the CPU), like 80%. Idle components are unloaded, least
    /// recently used first, to make room; a run that cannot fit even alone fails before
    /// loading anything.
    #[arg(long, default_value = "90%", value_name = "SIZE", value_parser = SizeLimit::parse, env = "DWD_MEMORY_BUDGET")]
    memory_budget: SizeLimit,

    /// Warn in a run's output when memory after it exceeds what it was right after the
    /// models were loaded by more than this.
    #[arg(long, default_value = "256MiB", value_name = "SIZE", value_parser = SizeLimit::parse, env = "DWD_GROWTH_WARN")]
    growth_warn: SizeLimit,

    /// How long fetching an image named by an http(s) URL may take, from connecting to
    /// the last byte.
    #[arg(long, default_value = "30s", value_name = "DURATION", value_parser = parse_duration, env = "DWD_FETCH_TIMEOUT")]
    fetch_timeout: Duration,

    /// Largest image a URL may deliver; a larger one is refused without being kept.
    #[arg(long, default_value = "64MiB", value_name = "SIZE", value_parser = SizeLimit::parse, env = "DWD_FETCH_LIMIT")]
    fetch_limit: SizeLimit,

    /// Where the cgroup files are read from (a container's memory limit caps the budget).
    #[arg(
        long,
        default_value = "/sys/fs/cgroup",
        value_name = "DIR",
        env = "DWD_CGROUP_ROOT",
        hide = true
    )]
    cgroup_root: PathBuf,

    /// Which of torch's generators seeds draw from, so a seed gives the noise
    /// diffusers-workflow draws: `auto` (the device's: CUDA's Philox on a GPU, the CPU's
    /// Mersenne Twister otherwise, as diffusers-workflow chooses), `cpu`, `cuda` (this
    /// machine's GPU), or `cuda:SMSxTHREADS` for any GPU's noise on any machine (132x2048 an
    /// H100 SXM, 108x2048 an A100, 128x1536 an RTX 4090; large draws depend on it).
    #[arg(long, default_value = "auto", value_name = "GENERATOR", value_parser = GeneratorSetting::parse, env = "DWD_GENERATOR")]
    generator: GeneratorSetting,

    /// Exit once no job has been queued or running for this long (e.g. 10m), so a CI job or
    /// a Makefile leaves no daemon behind [default: never].
    #[arg(long, value_name = "DURATION", value_parser = parse_duration, env = "DWD_IDLE_EXIT")]
    idle_exit: Option<Duration>,
}

fn settings_of(matches: &clap::ArgMatches) -> Vec<protocol::message::Setting> {
    <Args as clap::CommandFactory>::command()
        .get_arguments()
        .filter(|arg| !arg.is_hide_set() && arg.get_long().is_some())
        .filter_map(|arg| {
            let id = arg.get_id().as_str();
            let source = match matches.value_source(id)? {
                clap::parser::ValueSource::CommandLine => "flag",
                clap::parser::ValueSource::EnvVariable => "env",
                _ => "default",
            };
            let value = matches
                .get_raw(id)
                .map(|values| {
                    values
                        .map(|v| v.to_string_lossy().into_owned())
                        .collect::<Vec<_>>()
                        .join(" ")
                })
                .unwrap_or_else(|| "true".to_string());
            Some(protocol::message::Setting {
                name: format!("--{}", arg.get_long()?),
                value,
                source: source.to_string(),
            })
        })
        .collect()
}

fn main() -> ExitCode {
    dwd::memory::tune_allocator();
    let matches = <Args as clap::CommandFactory>::command().get_matches();
    let settings = settings_of(&matches);
    let args = match <Args as clap::FromArgMatches>::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    dwd::server::SETTINGS.get_or_init(|| settings);
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("dwd: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    let mut paths = DaemonPaths::resolve(args.socket.as_deref());
    if let Some(log) = &args.log_file {
        paths.log = log.clone();
    }
    ensure_private_dir(paths.dir()).with_context(|| {
        format!(
            "cannot prepare the socket directory {}",
            paths.dir().display()
        )
    })?;
    // Only parse the choice here: a CUDA context does not survive the fork below, so the
    // device is opened in the daemon process itself.
    let device_choice = DeviceChoice::parse(&args.device)?;
    let lock = take_lock(&paths)?;
    let (listener, socket_inode) = bind_socket(&paths)?;
    let log_file = open_log(&paths)?;
    let log_sink =
        dwd::logging::LogFile::rotating(log_file.try_clone()?, paths.log.clone(), args.log_max);
    if !args.foreground {
        let stderr = log_file.try_clone()?;
        daemonize::Daemonize::new()
            .working_directory("/")
            .umask(0o077)
            .stderr(stderr)
            .start()
            .context("cannot daemonize")?;
    }
    let lock = write_pid(lock)?;
    dwd::logging::init(log_sink, args.foreground, args.log_level.as_deref());
    let device = device_choice
        .open()
        .inspect_err(|e| tracing::error!("{e:#}"))?;
    dwd::memory::register_device(&device);
    warm_up(&device);
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .thread_name("dwd-io")
        .build()
        .context("cannot start the async runtime")?;
    let engine = engine(&args, device).inspect_err(|e| tracing::error!("{e:#}"))?;
    let identity = Identity {
        socket_inode,
        lock_inode: lock.metadata()?.ino(),
    };
    let serving = serve_until_stopped(listener, paths.clone(), engine, args.idle_exit, identity);
    let result = runtime.block_on(serving);
    if std::fs::symlink_metadata(&paths.socket).is_ok_and(|m| m.ino() == socket_inode) {
        let _ = std::fs::remove_file(&paths.socket);
    }
    tracing::info!("dwd stopped");
    // A job that did not stop in time must not keep the process alive: its thread ends
    // with the process.
    runtime.shutdown_timeout(Duration::from_millis(500));
    drop(lock);
    result
}

/// Binds the socket (removing a stale one a crash left: we hold the lock, so no daemon
/// owns it), readable by its owner only; returns it and its inode.
fn bind_socket(paths: &DaemonPaths) -> anyhow::Result<(StdUnixListener, u64)> {
    if check_socket(&paths.socket)? == SocketPath::StaleSocket {
        std::fs::remove_file(&paths.socket).with_context(|| {
            format!("cannot remove the stale socket {}", paths.socket.display())
        })?;
    }
    let listener = StdUnixListener::bind(&paths.socket)
        .with_context(|| format!("cannot bind {}", paths.socket.display()))?;
    std::fs::set_permissions(&paths.socket, std::fs::Permissions::from_mode(0o600))?;
    let socket_inode = std::fs::symlink_metadata(&paths.socket)?.ino();
    Ok((listener, socket_inode))
}

/// The log file, appended to, never through a link, in a private directory of its own
/// when it is not beside the socket.
fn open_log(paths: &DaemonPaths) -> anyhow::Result<File> {
    if let Some(dir) = paths.log.parent().filter(|d| *d != paths.dir()) {
        ensure_private_dir(dir)
            .with_context(|| format!("cannot prepare the log directory {}", dir.display()))?;
    }
    OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&paths.log)
        .with_context(|| format!("cannot open the log file {}", paths.log.display()))
}

/// Loads the device's kernels before the first job; only the first run pays if it fails.
fn warm_up(device: &Device) {
    let warming = std::time::Instant::now();
    match dwd::warm_up::warm_up(device) {
        Ok(()) if !device.is_cpu() => tracing::info!(
            ms = warming.elapsed().as_millis() as u64,
            "device warmed up: kernels loaded, cuBLAS ready"
        ),
        Ok(()) => {}
        Err(e) => tracing::warn!("device warm-up failed: {e}"),
    }
}

/// The engine, with the memory budget and policy the flags give.
fn engine(args: &Args, device: Device) -> anyhow::Result<Engine> {
    let limit = match device_memory(&device) {
        Some((_, total)) => dwd::memory::MemoryLimit {
            bytes: total,
            source: "device memory".to_string(),
        },
        None => dwd::memory::host_memory_limit(&args.cgroup_root),
    };
    let total = limit.bytes;
    let budget = args.memory_budget.of(total);
    let budget_source = match args.memory_budget {
        SizeLimit::Bytes(_) => "--memory-budget".to_string(),
        SizeLimit::Percent(p) => format!("{p}% of {} ({})", limit.source, human_bytes(total)),
    };
    let policy = MemoryPolicy {
        keep_alive: args.keep_alive,
        growth_warn_bytes: args.growth_warn.of(total),
    };
    tracing::info!(budget = %human_bytes(budget), keep_alive = ?policy.keep_alive, "memory policy");
    let generator = args
        .generator
        .resolve(&device)
        .map_err(|e| anyhow::anyhow!("--generator: {e}"))?;
    tracing::info!(generator = %generator.describe(), "seeds draw from torch's generator");
    let mut engine = Engine::new(ComponentCache::with_budget(budget), device, policy);
    engine.generator = generator;
    engine.budget_source = budget_source;
    engine.fetcher.timeout = args.fetch_timeout;
    engine.fetcher.max_bytes = args.fetch_limit.of(u64::MAX);
    Ok(engine)
}

/// `--log-max`: a size in bytes (a share of something makes no sense for a log), at least
/// 1 KiB so that a rotation never comes every line.
fn parse_log_max(text: &str) -> Result<u64, String> {
    match SizeLimit::parse(text)? {
        SizeLimit::Bytes(bytes) if bytes >= 1024 => Ok(bytes),
        SizeLimit::Bytes(_) => Err(format!(
            "`{text}` is too small for a log; give at least 1KiB"
        )),
        SizeLimit::Percent(_) => Err(format!(
            "`{text}`: give the log's size in bytes, e.g. 16MiB"
        )),
    }
}

/// Where pipelines run, as chosen on the command line.
#[derive(Debug, Clone, Copy)]
enum DeviceChoice {
    Auto,
    Cpu,
    Cuda(usize),
}

impl DeviceChoice {
    fn parse(name: &str) -> anyhow::Result<Self> {
        match name {
            "auto" => Ok(DeviceChoice::Auto),
            "cpu" => Ok(DeviceChoice::Cpu),
            other => {
                let Some(index) = other
                    .strip_prefix("cuda")
                    .map(|rest| rest.trim_start_matches(':'))
                else {
                    bail!("unknown device `{other}`; use auto, cpu or cuda:N");
                };
                let index = if index.is_empty() {
                    0
                } else {
                    index
                        .parse()
                        .with_context(|| format!("bad CUDA device index in `{other}`"))?
                };
                if !candle_core::utils::cuda_is_available() {
                    bail!("`{other}` asked for, but this dwd was built without CUDA support: rebuild with `--features cuda` (see scripts/build-cuda.sh)");
                }
                Ok(DeviceChoice::Cuda(index))
            }
        }
    }

    fn open(self) -> anyhow::Result<Device> {
        match self {
            DeviceChoice::Cpu => Ok(Device::Cpu),
            DeviceChoice::Auto => {
                if candle_core::utils::cuda_is_available() {
                    match Device::new_cuda(0) {
                        Ok(device) => return Ok(device),
                        Err(e) => tracing::warn!("no usable CUDA device ({e}); running on the CPU"),
                    }
                }
                Ok(Device::Cpu)
            }
            DeviceChoice::Cuda(index) => {
                Device::new_cuda(index).with_context(|| format!("cannot open CUDA device {index}"))
            }
        }
    }
}

/// Takes the single-instance lock, or says which daemon holds it.
fn take_lock(paths: &DaemonPaths) -> anyhow::Result<Flock<File>> {
    let file = OpenOptions::new()
        .create(true)
        .truncate(false)
        .read(true)
        .write(true)
        .mode(0o600)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&paths.lock)
        .with_context(|| format!("cannot open the lock file {}", paths.lock.display()))?;
    match Flock::lock(file, FlockArg::LockExclusiveNonblock) {
        Ok(lock) => Ok(lock),
        Err((mut file, errno)) if errno == nix::errno::Errno::EWOULDBLOCK => {
            let mut pid = String::new();
            let _ = file.read_to_string(&mut pid);
            let pid = pid.trim();
            let pid = if pid.is_empty() {
                "unknown".to_string()
            } else {
                pid.to_string()
            };
            bail!("already running (pid {pid}) on {}", paths.socket.display())
        }
        Err((_, errno)) => {
            Err(errno).with_context(|| format!("cannot lock {}", paths.lock.display()))
        }
    }
}

fn write_pid(mut lock: Flock<File>) -> anyhow::Result<Flock<File>> {
    lock.set_len(0)?;
    lock.rewind()?;
    writeln!(lock, "{}", std::process::id())?;
    Ok(lock)
}

/// The files that make this daemon the one for its socket: if either is replaced or
/// removed, another daemon may start, so this one stops.
#[derive(Debug, Clone, Copy)]
struct Identity {
    socket_inode: u64,
    lock_inode: u64,
}

impl Identity {
    /// What is wrong with the socket or lock file, if anything.
    fn lost(&self, paths: &DaemonPaths) -> Option<String> {
        let inode = |path: &std::path::Path| std::fs::symlink_metadata(path).ok().map(|m| m.ino());
        if inode(&paths.socket) != Some(self.socket_inode) {
            return Some(format!(
                "the socket {} was removed or replaced",
                paths.socket.display()
            ));
        }
        if inode(&paths.lock) != Some(self.lock_inode) {
            return Some(format!(
                "the lock file {} was removed or replaced",
                paths.lock.display()
            ));
        }
        None
    }
}

async fn serve_until_stopped(
    listener: StdUnixListener,
    paths: DaemonPaths,
    engine: Engine,
    idle_exit: Option<Duration>,
    identity: Identity,
) -> anyhow::Result<()> {
    listener.set_nonblocking(true)?;
    let listener = tokio::net::UnixListener::from_std(listener)?;
    let (shutdown, _) = watch::channel(false);
    let queue = JobQueue::default();
    let engine = Arc::new(engine);
    let state = Arc::new(DaemonState {
        queue: queue.clone(),
        engine: engine.clone(),
        paths,
        device_name: engine.device_name.clone(),
        started: Instant::now(),
        uid: nix::unistd::getuid().as_raw(),
        shutdown,
    });
    tracing::info!(pid = std::process::id(), version = protocol::TOOL_VERSION, device = %state.device_name,
        socket = %state.paths.socket.display(), "dwd started");
    let executor = spawn_executor(queue.clone(), engine.clone())?;
    // The signal handlers are installed before the daemon says it is ready: a SIGTERM or
    // SIGHUP that came before a spawned task got to install them would kill the process
    // by the default action, leaving its socket behind.
    let mut tasks = vec![
        expire_components(&engine),
        handle_signals(&state)?,
        watch_identity(&state, identity),
    ];
    tasks.extend(idle_exit.map(|limit| exit_when_idle(&state, limit)));
    // Under systemd (Type=notify, --foreground): ready once connections are served.
    if let Err(e) = sd_notify::notify(&[sd_notify::NotifyState::Ready]) {
        tracing::warn!("cannot tell systemd the daemon is ready: {e}");
    }
    serve(listener, state.clone()).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    tasks.iter().for_each(tokio::task::JoinHandle::abort);
    tracing::info!("shutting down: no new connections; cancelling jobs");
    if identity.lost(&state.paths).is_none() {
        let _ = std::fs::remove_file(&state.paths.socket);
    }
    queue.close();
    let joined = tokio::task::spawn_blocking(move || executor.join());
    if tokio::time::timeout(Duration::from_secs(30), joined)
        .await
        .is_err()
    {
        tracing::warn!("the running job did not stop within 30 s; exiting anyway");
    }
    // Let connection tasks deliver the jobs' final frames.
    tokio::time::sleep(Duration::from_millis(100)).await;
    Ok(())
}

/// The thread that runs jobs one at a time.
fn spawn_executor(
    queue: JobQueue,
    engine: Arc<Engine>,
) -> anyhow::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("dwd-executor".into())
        .spawn(move || {
            run_executor(queue, |job| {
                job.summarize(engine.run(&job.workflow, job.keep_alive(), job))
            })
        })
        .context("cannot start the executor thread")
}

/// Unloads components whose keep-alive ran out.
fn expire_components(engine: &Engine) -> JoinHandle<()> {
    let cache = engine.cache.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(EXPIRY_CHECK_INTERVAL);
        loop {
            tick.tick().await;
            let cleared = cache.expire(Instant::now());
            if cleared.unloaded > 0 {
                tracing::info!(
                    unloaded = cleared.unloaded,
                    bytes_freed = cleared.bytes_freed,
                    "keep-alive ran out"
                );
            }
        }
    })
}

/// SIGTERM and SIGINT stop the daemon; SIGHUP reopens its log.
fn handle_signals(state: &Arc<DaemonState>) -> anyhow::Result<JoinHandle<()>> {
    use tokio::signal::unix::{signal, SignalKind};
    let (mut term, mut int, mut hup) = (
        signal(SignalKind::terminate()).context("cannot handle SIGTERM")?,
        signal(SignalKind::interrupt()).context("cannot handle SIGINT")?,
        signal(SignalKind::hangup()).context("cannot handle SIGHUP")?,
    );
    let state = state.clone();
    Ok(tokio::spawn(async move {
        loop {
            tokio::select! {
                _ = term.recv() => tracing::info!("SIGTERM received"),
                _ = int.recv() => tracing::info!("SIGINT received"),
                _ = hup.recv() => {
                    match dwd::logging::reopen(&state.paths.log) {
                        Ok(()) => tracing::info!("SIGHUP: log reopened"),
                        Err(e) => tracing::warn!("SIGHUP: cannot reopen the log: {e}"),
                    }
                    continue;
                }
            }
            state.stop();
            break;
        }
    }))
}

/// One daemon per socket: if the socket or the lock file is removed or replaced, another
/// daemon may start on it, so this one stops.
fn watch_identity(state: &Arc<DaemonState>, identity: Identity) -> JoinHandle<()> {
    let paths = state.paths.clone();
    stop_when(state, Duration::from_secs(1), move || {
        identity
            .lost(&paths)
            .map(|why| format!("{why}; stopping so that one daemon serves the socket"))
    })
}

/// With --idle-exit, stops once nothing has run for `limit`.
fn exit_when_idle(state: &Arc<DaemonState>, limit: Duration) -> JoinHandle<()> {
    let queue = state.queue.clone();
    stop_when(state, Duration::from_millis(250), move || {
        let idle = queue.idle_for().is_some_and(|idle| idle >= limit);
        idle.then(|| format!("idle for {limit:?} (--idle-exit); stopping"))
    })
}

/// Checks `why_stop` every `period`; once it gives a reason, logs it and stops the daemon.
fn stop_when(
    state: &Arc<DaemonState>,
    period: Duration,
    mut why_stop: impl FnMut() -> Option<String> + Send + 'static,
) -> JoinHandle<()> {
    let state = state.clone();
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(period);
        loop {
            tick.tick().await;
            if let Some(why) = why_stop() {
                tracing::info!("{why}");
                state.stop();
                break;
            }
        }
    })
}
