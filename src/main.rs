//! The `imgfs` command line: argument parsing, daemonizing, progress and
//! exit codes. Everything a test would want to call lives in the library.

use anyhow::{Context, Result, bail};
use clap::{Args, Parser, Subcommand};
use imgfs::cache::Cache;
use imgfs::config::Config;
use imgfs::fuse::{self, FuseOptions};
use imgfs::image::{self, Platform, ResolvedImage};
use imgfs::mount;
use imgfs::overlay::OverlayFs;
use imgfs::record::MountRecord;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use imgfs::store;
use imgfs::upper::Upper;
use indicatif::{MultiProgress, ProgressDrawTarget};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the daemon child prints on stdout once the mount is live.
const READY: &str = "ready";
/// Hidden flag that marks the re-executed daemon child.
const DAEMON_CHILD: &str = "--daemon-child";

#[derive(Parser)]
#[command(
    name = "imgfs",
    version,
    about = "Mount container images straight from a registry, fetching only the bytes that are read",
    long_about = "Mount container images straight from a registry, fetching only the bytes that are read.\n\n\
        References are resolved like `docker pull`: `alpine` is docker.io/library/alpine:latest, \
        `host:port/repo:tag` and `repo@sha256:...` work as expected. The first mount of a layer \
        scans it once (verifying its digest) to build an index kept in the cache; after that, \
        only the byte ranges that are read are fetched, verified and cached.\n\n\
        Examples:\n  imgfs mount alpine /mnt/a\n  ls /mnt/a; chroot /mnt/a /bin/sh\n  imgfs umount /mnt/a\n  \
        imgfs inspect --json 127.0.0.1:5000/team/app:v2",
    after_help = "Credentials come from $DOCKER_CONFIG/config.json or ~/.docker/config.json (docker login). \
        Set RUST_LOG or use -v for logs. Exit codes: 0 success, 1 failure, 2 usage error."
)]
struct Cli {
    /// More logging (-v info, -vv debug, -vvv trace); RUST_LOG overrides
    #[arg(short, long, action = clap::ArgAction::Count, global = true)]
    verbose: u8,
    /// Cache directory [default: /var/cache/imgfs as root, $XDG_CACHE_HOME/imgfs otherwise]
    #[arg(long, global = true, env = "IMGFS_CACHE_DIR", value_name = "DIR")]
    cache_dir: Option<PathBuf>,
    /// Use plain HTTP for this registry (host[:port]); repeatable. Loopback registries always use HTTP
    #[arg(long = "insecure-registry", global = true, value_name = "HOST[:PORT]")]
    insecure_registries: Vec<String>,
    /// Configuration file read after /etc/imgfs/config.toml, instead of ~/.config/imgfs/config.toml
    #[arg(long, global = true, env = "IMGFS_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Mount an image (writable copy-on-write by default); returns once the mount is live
    Mount(MountArgs),
    /// Unmount an imgfs mount
    Umount {
        /// The mountpoint
        mountpoint: PathBuf,
    },
    /// List what a writable mount changed, like `docker diff` (A added, C changed, D deleted)
    #[command(
        after_help = "Examples:\n  imgfs diff /mnt/d\n  imgfs diff --upper ~/work/d-upper debian:bookworm"
    )]
    Diff {
        /// A mountpoint of a writable imgfs mount, or with --upper the image reference
        target: String,
        /// Read the changes from this upper directory (of an unmounted image) instead
        #[arg(long, value_name = "DIR")]
        upper: Option<PathBuf>,
        /// Platform of the image, with --upper
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
    /// List live mounts: mountpoint, image, upper, pid, log, bytes fetched
    Ps {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// List the images in the cache (same as `imgfs cache ls`)
    Images {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Inspect and bound the cache
    #[command(subcommand)]
    Cache(CacheCommand),
    /// Fetch an image fully into the cache, so later mounts read nothing from the network
    Pull {
        /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
        reference: String,
        /// Platform to pull from a multi-arch image, os/arch[/variant] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
    },
    /// Show an image's platforms, manifest, layers and config without mounting it
    Inspect {
        /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
        reference: String,
        /// Platform to describe, os/arch[/variant] [default: this host's]
        #[arg(long)]
        platform: Option<String>,
        /// Print JSON instead of text
        #[arg(long)]
        json: bool,
    },
}

#[derive(Subcommand)]
enum CacheCommand {
    /// Images seen (references, digest, layers, bytes cached vs size, last use, where mounted)
    Ls {
        /// Print JSON instead of a table
        #[arg(long)]
        json: bool,
    },
    /// Remove an image and the layers no other image uses (refused while mounted)
    Rm {
        /// Reference, manifest digest, or a prefix of its hex
        target: String,
        /// Remove the image record even while mounted (its layers stay until the mount ends)
        #[arg(long)]
        force: bool,
    },
    /// Evict cached layer data, least recently used first; layers of live mounts are kept
    #[command(
        after_help = "Without options, removes layers no image uses.\nExamples:\n  imgfs cache prune --max 10G\n  imgfs cache prune --older-than 7d\n  imgfs cache prune --all"
    )]
    Prune {
        /// Everything not mounted, indexes and image records included
        #[arg(long)]
        all: bool,
        /// Layers of images not used for this long (30m, 12h, 7d, 2w)
        #[arg(long, value_name = "DURATION", value_parser = store::parse_duration)]
        older_than: Option<Duration>,
        /// Evict until the cache is at most this big (512M, 10G)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        max: Option<u64>,
    },
}

#[derive(Args)]
struct MountArgs {
    /// Image reference, e.g. alpine, 127.0.0.1:5000/team/app:v2, repo@sha256:...
    reference: String,
    /// Existing directory to mount on
    mountpoint: PathBuf,
    /// Platform to mount from a multi-arch image, os/arch[/variant] [default: this host's]
    #[arg(long)]
    platform: Option<String>,
    /// Stay in the foreground (logs to stderr, Ctrl-C unmounts)
    #[arg(short, long)]
    foreground: bool,
    /// FUSE worker threads
    #[arg(long, default_value_t = fuse::DEFAULT_THREADS)]
    threads: usize,
    /// Keep changes in DIR (created if missing); mount again with the same
    /// --upper to see them. Default: a fresh directory removed at unmount
    #[arg(long, value_name = "DIR", conflicts_with = "read_only")]
    upper: Option<PathBuf>,
    /// Mount read-only (writes fail with EROFS)
    #[arg(long)]
    read_only: bool,
    /// Serve upper files through imgfs instead of FUSE passthrough
    #[arg(long)]
    no_passthrough: bool,
    /// Seconds a read may wait for the registry before failing with EIO
    #[arg(long, default_value_t = 60, value_name = "SECONDS")]
    read_timeout: u64,
    /// Keep the cache under SIZE (512M, 10G) by evicting data of unmounted images, checked every 30 s [default: cache_max of the config file]
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    cache_max: Option<u64>,
    /// What to fetch in the background once mounted: none, landmark (the
    /// files eStargz layers mark as needed at start; nothing until eStargz
    /// is supported) or all (every layer, whole)
    #[arg(long, value_enum, default_value_t = mount::Prefetch::Landmark)]
    prefetch: mount::Prefetch,
    /// Bandwidth cap of background prefetching (10M, 50MiB/s; 0: no cap)
    #[arg(long, value_name = "BYTES/s", default_value = "50MiB/s", value_parser = parse_rate)]
    prefetch_rate: u64,
    #[arg(long = "daemon-child", hide = true)]
    daemon_child: bool,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.verbose);
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("imgfs: {}", one_line(&e));
            ExitCode::FAILURE
        }
    }
}

/// The error and its causes on one line, without repeating a cause the
/// message already quotes.
fn one_line(e: &anyhow::Error) -> String {
    let mut out = e.to_string();
    for cause in e.chain().skip(1) {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

fn init_logging(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(format!("imgfs={level},warn")));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn run(cli: Cli) -> Result<()> {
    // Flags (and their environment variables) win over the config files.
    let config = Config::load(cli.config.as_deref())?;
    let cache_dir = (cli.cache_dir.clone())
        .or_else(|| config.cache_dir.clone())
        .unwrap_or_else(Cache::default_root);
    let mut insecure_registries = config.insecure_registries.clone();
    insecure_registries.extend(cli.insecure_registries.iter().cloned());
    let client_options = ClientOptions {
        insecure_registries,
        mirrors: config.mirrors.clone(),
        ..ClientOptions::default()
    };
    match cli.command {
        Command::Mount(mut args) if args.foreground || args.daemon_child => {
            args.cache_max = args.cache_max.or(config.cache_max.map(|b| b.0));
            mount_here(&args, &cache_dir, client_options)
        }
        Command::Mount(args) => spawn_daemon(&args),
        Command::Umount { mountpoint } => umount(&mountpoint),
        Command::Diff {
            target,
            upper,
            platform,
            json,
        } => diff(
            &target,
            upper.as_deref(),
            platform.as_deref(),
            json,
            &cache_dir,
            client_options,
        ),
        Command::Ps { json } => ps(json),
        Command::Images { json } | Command::Cache(CacheCommand::Ls { json }) => {
            cache_ls(&cache_dir, json)
        }
        Command::Cache(CacheCommand::Rm { target, force }) => cache_rm(&cache_dir, &target, force),
        Command::Cache(CacheCommand::Prune {
            all,
            older_than,
            max,
        }) => {
            let options = store::PruneOptions {
                all,
                older_than,
                max_bytes: max,
            };
            cache_prune(&cache_dir, &options)
        }
        Command::Pull {
            reference,
            platform,
        } => pull(&reference, platform.as_deref(), &cache_dir, client_options),
        Command::Inspect {
            reference,
            platform,
            json,
        } => inspect(&reference, platform.as_deref(), json, client_options),
    }
}

/// `--prefetch-rate`: a size per second, the `/s` optional.
fn parse_rate(text: &str) -> Result<u64, String> {
    parse_size(text.trim().trim_end_matches("/s"))
}

/// `--cache-max` and `--max`: sizes as the config file writes them.
fn parse_size(text: &str) -> Result<u64, String> {
    imgfs::config::ByteSize::parse(text).map(|b| b.0)
}

fn parse_platform(platform: Option<&str>) -> Result<Option<Platform>> {
    platform
        .map(Platform::parse)
        .transpose()
        .context("--platform")
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("imgfs-net")
        .build()
        .context("starting the async runtime")
}

/// Resolves the image and indexes its layers, with progress bars on stderr.
fn prepare(
    runtime: &tokio::runtime::Runtime,
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    platform: Option<&Platform>,
) -> Result<mount::Prepared> {
    let progress = progress_target();
    Ok(runtime.block_on(mount::prepare(
        client, cache, reference, platform, &progress,
    ))?)
}

/// Bars on stderr; indicatif hides them when stderr is not a terminal.
fn progress_target() -> MultiProgress {
    MultiProgress::with_draw_target(ProgressDrawTarget::stderr())
}

/// Re-runs this command as a detached child and waits until it says the
/// mount is live, or exits with its error (which it printed on our stderr).
fn spawn_daemon(args: &MountArgs) -> Result<()> {
    check_mountpoint(&args.mountpoint)?;
    let exe = std::env::current_exe().context("locating the imgfs executable")?;
    let mut child_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    child_args.push(DAEMON_CHILD.into());
    let mut child = Process::new(exe)
        .args(child_args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .context("starting the mount daemon")?;
    let stdout = child.stdout.take().context("daemon stdout")?;
    let mut line = String::new();
    BufReader::new(stdout).read_line(&mut line).ok();
    if line.trim() == READY {
        return Ok(());
    }
    let status = child.wait().context("waiting for the mount daemon")?;
    // The child already printed its error; keep our exit code, not a second line.
    std::process::exit(status.code().unwrap_or(1).max(1));
}

fn check_mountpoint(mountpoint: &Path) -> Result<()> {
    let meta = std::fs::metadata(mountpoint).with_context(|| {
        format!(
            "mountpoint {}: create it first (mkdir -p)",
            mountpoint.display()
        )
    })?;
    if !meta.is_dir() {
        bail!("mountpoint {} is not a directory", mountpoint.display());
    }
    Ok(())
}

/// Prepares the image and serves it in this process until unmounted.
fn mount_here(args: &MountArgs, cache_dir: &Path, client_options: ClientOptions) -> Result<()> {
    if args.daemon_child {
        // Leave the caller's session so its terminal closing does not end the mount.
        let _ = rustix::process::setsid();
    }
    check_mountpoint(&args.mountpoint)?;
    let reference: Reference = args.reference.parse()?;
    let platform = parse_platform(args.platform.as_deref())?;
    let cache = Cache::open(cache_dir)?;
    let runtime = runtime()?;
    let client = Client::new(client_options)?;
    let mut prepared = prepare(&runtime, &client, &cache, &reference, platform.as_ref())?;
    note_use(&cache, &prepared);
    let network = mount::Network {
        client,
        runtime: runtime.handle().clone(),
        read_timeout: Duration::from_secs(args.read_timeout),
        fetched: Arc::new(AtomicU64::new(0)),
        demand: Arc::default(),
    };
    let (image, remote) = mount::filesystem(&mut prepared, &cache, &network)?;
    let mut remote = Some(remote);
    let upper_dir = UpperDir::choose(args)?;
    let upper = match &upper_dir {
        Some(dir) => Some(
            Upper::open(dir.path())
                .with_context(|| format!("upper directory {}", dir.path().display()))?,
        ),
        None => None,
    };
    // Modes given by the kernel are already masked by the caller's umask.
    rustix::process::umask(rustix::fs::Mode::empty());
    let fs = OverlayFs::new(image, upper).map_err(|e| {
        anyhow::anyhow!(
            "preparing the upper directory: {}",
            std::io::Error::from_raw_os_error(e.0)
        )
    })?;
    let options = FuseOptions {
        fs_name: reference.to_string(),
        allow_other: rustix::process::geteuid().is_root(),
        threads: args.threads,
        passthrough: !args.no_passthrough,
    };
    let daemon = args.daemon_child;
    let log = cache
        .root()
        .join("logs")
        .join(format!("mount-{}.log", std::process::id()));
    let record = MountRecord {
        mountpoint: args
            .mountpoint
            .canonicalize()
            .unwrap_or_else(|_| args.mountpoint.clone()),
        reference: reference.to_string(),
        manifest_digest: prepared.image.manifest_digest,
        layers: prepared
            .image
            .layers
            .iter()
            .map(|l| l.blob.digest)
            .collect(),
        cache_dir: cache.root().to_path_buf(),
        upper: upper_dir.as_ref().map(|u| u.path().to_path_buf()),
        pid: std::process::id(),
        log: daemon.then(|| log.clone()),
        fetched_bytes: 0,
    };
    let mut housekeeper = None;
    let mut prefetcher = None;
    let served = fuse::serve(fs, &args.mountpoint, &options, |unmounter| {
        unmount_on_signal(&runtime, unmounter);
        if let Err(e) = record.save(&state_dir()) {
            tracing::warn!(error = %e, "imgfs diff and imgfs ps will not find this mount");
        }
        housekeeper = Some(Housekeeper::start(
            record.clone(),
            network.fetched.clone(),
            args.cache_max,
        ));
        prefetcher = remote.take().and_then(|layers| {
            mount::prefetch(
                layers,
                args.prefetch,
                args.prefetch_rate,
                network.demand.clone(),
            )
        });
        tracing::info!(mountpoint = %args.mountpoint.display(), image = %prepared.image.manifest_digest, "mounted");
        if daemon {
            announce_ready(&log);
        }
    });
    drop(prefetcher);
    if let Some(h) = housekeeper {
        h.stop();
    }
    record.remove(&state_dir());
    note_end(&cache, &prepared);
    served.with_context(|| format!("mounting on {}", args.mountpoint.display()))?;
    drop(upper_dir);
    Ok(())
}

/// The upper directory of a writable mount: the user's, kept, or a fresh
/// one under the state directory, removed when the mount ends.
enum UpperDir {
    Kept(PathBuf),
    Temporary(tempfile::TempDir),
}

impl UpperDir {
    fn choose(args: &MountArgs) -> Result<Option<UpperDir>> {
        if args.read_only {
            return Ok(None);
        }
        if let Some(dir) = &args.upper {
            return Ok(Some(UpperDir::Kept(dir.clone())));
        }
        let base = state_dir().join("uppers");
        std::fs::create_dir_all(&base).with_context(|| format!("creating {}", base.display()))?;
        let dir = tempfile::Builder::new()
            .prefix("mount-")
            .tempdir_in(&base)
            .with_context(|| format!("creating a temporary upper in {}", base.display()))?;
        Ok(Some(UpperDir::Temporary(dir)))
    }

    fn path(&self) -> &Path {
        match self {
            UpperDir::Kept(p) => p,
            UpperDir::Temporary(t) => t.path(),
        }
    }
}

/// `/var/lib/imgfs` as root, `$XDG_STATE_HOME/imgfs` (or
/// `~/.local/state/imgfs`) otherwise.
fn state_dir() -> PathBuf {
    imgfs::cache::per_user_dir("/var/lib/imgfs", "XDG_STATE_HOME", ".local/state")
}

/// Tells the waiting parent we are live, then points stdout/stderr at the
/// log file so the mount outlives the terminal.
fn announce_ready(log: &Path) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{READY}").and_then(|()| stdout.flush());
    let file = log
        .parent()
        .map_or(Ok(()), std::fs::create_dir_all)
        .and_then(|()| {
            std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(log)
        });
    let target = match file {
        Ok(file) => file,
        Err(_) => match std::fs::OpenOptions::new().write(true).open("/dev/null") {
            Ok(null) => null,
            Err(_) => return,
        },
    };
    let _ = rustix::stdio::dup2_stdout(&target);
    let _ = rustix::stdio::dup2_stderr(&target);
}

/// Seconds between rewrites of the mount record with the bytes fetched.
const STATS_EVERY: Duration = Duration::from_secs(2);
/// Seconds between checks of `--cache-max`.
const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// The mount's background chores: publish the bytes fetched in the mount
/// record (for `imgfs ps`) and keep the cache under `--cache-max`.
struct Housekeeper {
    stop: Arc<AtomicBool>,
    thread: std::thread::JoinHandle<()>,
}

impl Housekeeper {
    fn start(record: MountRecord, fetched: Arc<AtomicU64>, cache_max: Option<u64>) -> Housekeeper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || housekeep(record, &fetched, cache_max, &flag));
        Housekeeper { stop, thread }
    }

    fn stop(self) {
        self.stop.store(true, Ordering::Relaxed);
        self.thread.thread().unpark();
        let _ = self.thread.join();
    }
}

fn housekeep(
    mut record: MountRecord,
    fetched: &AtomicU64,
    cache_max: Option<u64>,
    stop: &AtomicBool,
) {
    let mut last_prune: Option<Instant> = None;
    while !stop.load(Ordering::Relaxed) {
        std::thread::park_timeout(STATS_EVERY);
        let now = fetched.load(Ordering::Relaxed);
        if now != record.fetched_bytes && !stop.load(Ordering::Relaxed) {
            record.fetched_bytes = now;
            let _ = record.save(&state_dir());
        }
        let due = last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        if let (Some(max), true) = (cache_max, due) {
            last_prune = Some(Instant::now());
            bound_cache(&record.cache_dir, max);
        }
    }
}

/// Evicts least recently used data of unmounted images while the cache is over `max`.
fn bound_cache(cache_dir: &Path, max: u64) {
    let Ok(cache) = Cache::open(cache_dir) else {
        return;
    };
    if store::total_usage(&cache) <= max {
        return;
    }
    let mounts = store::mounts_of(&cache, &MountRecord::live(&state_dir()));
    let options = store::PruneOptions {
        max_bytes: Some(max),
        ..store::PruneOptions::default()
    };
    match store::prune(&cache, &options, &mounts) {
        Ok(freed) => tracing::info!(
            bytes = freed.bytes,
            layers = freed.layers.len(),
            "cache over --cache-max: pruned"
        ),
        Err(e) => tracing::warn!(error = %e, "pruning the cache failed"),
    }
}

/// Records that the image is in use (for `imgfs cache ls` and LRU eviction).
fn note_use(cache: &Cache, prepared: &mount::Prepared) {
    if let Err(e) = store::record_use(cache, &prepared.image) {
        tracing::warn!(error = %e, "imgfs cache ls will not list this image");
    }
}

fn note_end(cache: &Cache, prepared: &mount::Prepared) {
    if let Err(e) = store::touch(cache, &prepared.image.manifest_digest) {
        tracing::warn!(error = %e, "could not update the image's last use");
    }
}

fn ps(json: bool) -> Result<()> {
    let mounts = MountRecord::live(&state_dir());
    if json {
        let rows: Vec<serde_json::Value> = mounts.iter().map(mount_json).collect();
        println!("{}", serde_json::to_string_pretty(&rows)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<28} {:<40} {:<19} {:>8} {:>10}  UPPER / LOG",
        "MOUNTPOINT", "REFERENCE", "DIGEST", "PID", "FETCHED"
    )?;
    for m in &mounts {
        writeln!(
            out,
            "{:<28} {:<40} {:<19} {:>8} {:>10}  {} / {}",
            m.mountpoint.display(),
            m.reference,
            short(&m.manifest_digest),
            m.pid,
            human_bytes(m.fetched_bytes),
            m.upper
                .as_deref()
                .map_or("(read-only)".into(), |u| u.display().to_string()),
            m.log
                .as_deref()
                .map_or("(foreground)".into(), |l| l.display().to_string()),
        )?;
    }
    Ok(())
}

fn mount_json(m: &MountRecord) -> serde_json::Value {
    serde_json::json!({
        "mountpoint": m.mountpoint, "reference": m.reference,
        "manifest_digest": m.manifest_digest.to_string(),
        "layers": m.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        "cache_dir": m.cache_dir, "upper": m.upper, "pid": m.pid, "log": m.log,
        "fetched_bytes": m.fetched_bytes,
    })
}

/// `sha256:` and the first 12 hex digits, as docker shows image ids.
fn short(digest: &imgfs::digest::Digest) -> String {
    format!("sha256:{}", &digest.hex()[..12])
}

fn cache_ls(cache_dir: &Path, json: bool) -> Result<()> {
    let cache = Cache::open(cache_dir)?;
    let mounts = store::mounts_of(&cache, &MountRecord::live(&state_dir()));
    let images = store::summaries(&cache, &mounts);
    if json {
        println!("{}", serde_json::to_string_pretty(&images)?);
        return Ok(());
    }
    let mut out = std::io::stdout().lock();
    writeln!(
        out,
        "{:<48} {:<19} {:>6} {:>10} {:>10} {:>10}  MOUNTED ON",
        "REFERENCE", "DIGEST", "LAYERS", "CACHED", "SIZE", "LAST USED"
    )?;
    for image in &images {
        let mounted: Vec<String> = image
            .mounted_on
            .iter()
            .map(|m| m.display().to_string())
            .collect();
        writeln!(
            out,
            "{:<48} {:<19} {:>6} {:>10} {:>10} {:>10}  {}",
            image.references.join(","),
            short(&image.manifest_digest),
            image.layers.len(),
            human_bytes(image.cached_bytes),
            human_bytes(image.size),
            ago(image.last_used),
            mounted.join(","),
        )?;
    }
    Ok(())
}

/// `3m ago`, `2h ago`, `5d ago`.
fn ago(secs: u64) -> String {
    let d = store::now_secs().saturating_sub(secs);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86_400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

fn cache_rm(cache_dir: &Path, target: &str, force: bool) -> Result<()> {
    let cache = Cache::open(cache_dir)?;
    let mounts = store::mounts_of(&cache, &MountRecord::live(&state_dir()));
    let freed = store::remove(&cache, target, &mounts, force)?;
    println!(
        "removed {target}: {} layers, {} freed",
        freed.layers.len(),
        human_bytes(freed.bytes)
    );
    Ok(())
}

fn cache_prune(cache_dir: &Path, options: &store::PruneOptions) -> Result<()> {
    let cache = Cache::open(cache_dir)?;
    let mounts = store::mounts_of(&cache, &MountRecord::live(&state_dir()));
    let freed = store::prune(&cache, options, &mounts)?;
    println!(
        "evicted {} layers, {} freed; cache now {}",
        freed.layers.len(),
        human_bytes(freed.bytes),
        human_bytes(store::total_usage(&cache))
    );
    Ok(())
}

/// Resolves, indexes and fetches every layer, then says how much moved.
fn pull(
    reference: &str,
    platform: Option<&str>,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let platform = parse_platform(platform)?;
    let cache = Cache::open(cache_dir)?;
    let runtime = runtime()?;
    let client = Client::new(client_options)?;
    let started = Instant::now();
    let progress = progress_target();
    let prepared = runtime.block_on(mount::prepare_with(
        &client,
        &cache,
        &reference,
        platform.as_ref(),
        &progress,
        mount::Blobs::Keep,
    ))?;
    note_use(&cache, &prepared);
    let network = mount::Network {
        client,
        runtime: runtime.handle().clone(),
        read_timeout: Duration::from_secs(PULL_READ_TIMEOUT),
        fetched: Arc::new(AtomicU64::new(0)),
        demand: Arc::default(),
    };
    mount::warm(&prepared, &cache, &network, &progress)?;
    println!(
        "{}: {} layers, {} fetched after indexing, in {:.1}s; digest {}",
        prepared.image.reference,
        prepared.image.layers.len(),
        human_bytes(network.fetched.load(Ordering::Relaxed)),
        started.elapsed().as_secs_f64(),
        prepared.image.manifest_digest
    );
    Ok(())
}

/// Seconds one Range request of a pull may take.
const PULL_READ_TIMEOUT: u64 = 120;

fn unmount_on_signal(runtime: &tokio::runtime::Runtime, mut unmounter: fuser::SessionUnmounter) {
    runtime.spawn(async move {
        use tokio::signal::unix::{SignalKind, signal};
        let (Ok(mut term), Ok(mut int)) = (
            signal(SignalKind::terminate()),
            signal(SignalKind::interrupt()),
        ) else {
            return;
        };
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        if let Err(e) = unmounter.unmount() {
            tracing::error!(error = %e, "unmount on signal failed");
        }
    });
}

fn umount(mountpoint: &Path) -> Result<()> {
    let status = Process::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
    if matches!(status, Ok(s) if s.success()) {
        return Ok(());
    }
    rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty())
        .with_context(|| format!("unmounting {}: is it an imgfs mount?", mountpoint.display()))
}

fn diff(
    target: &str,
    upper_dir: Option<&Path>,
    platform: Option<&str>,
    json: bool,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
    let (upper_path, indexes) = match upper_dir {
        Some(dir) => {
            let reference: Reference = target.parse()?;
            let platform = parse_platform(platform)?;
            let cache = Cache::open(cache_dir)?;
            let client = Client::new(client_options)?;
            let prepared = prepare(&runtime()?, &client, &cache, &reference, platform.as_ref())?;
            (dir.to_path_buf(), prepared.indexes)
        }
        None => {
            let record = MountRecord::load(&state_dir(), Path::new(target))?;
            let upper = record
                .upper
                .with_context(|| format!("{target} is mounted read-only: it has no changes"))?;
            let cache = Cache::open(&record.cache_dir)?;
            let mut indexes = Vec::new();
            for layer in &record.layers {
                let index = cache.load_index(layer)?.with_context(|| {
                    format!(
                        "layer {layer} is no longer in the cache {}",
                        record.cache_dir.display()
                    )
                })?;
                indexes.push(std::sync::Arc::new(index));
            }
            (upper, indexes)
        }
    };
    if !upper_path.is_dir() {
        bail!("upper directory {} does not exist", upper_path.display());
    }
    let upper = Upper::open(&upper_path)
        .with_context(|| format!("upper directory {}", upper_path.display()))?;
    let tree = imgfs::union::Tree::build(&indexes);
    let changes = imgfs::diff::changes(&upper, &tree)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
    } else {
        let mut out = std::io::stdout().lock();
        for c in &changes {
            writeln!(
                out,
                "{} {}",
                c.kind.letter(),
                String::from_utf8_lossy(&c.path)
            )?;
        }
    }
    Ok(())
}

fn inspect(
    reference: &str,
    platform: Option<&str>,
    json: bool,
    client_options: ClientOptions,
) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let platform = parse_platform(platform)?;
    let client = Client::new(client_options)?;
    let image = runtime()?.block_on(image::resolve(&client, &reference, platform.as_ref()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inspect_json(&image))?);
    } else {
        print_inspect(&image);
    }
    Ok(())
}

fn platform_text(p: &Platform) -> String {
    let mut s = format!("{}/{}", p.os, p.architecture);
    if let Some(v) = &p.variant {
        s.push('/');
        s.push_str(v);
    }
    if let Some(v) = &p.os_version {
        s.push_str(&format!(" ({v})"));
    }
    s
}

fn inspect_json(image: &ResolvedImage) -> serde_json::Value {
    let c = &image.config;
    serde_json::json!({
        "reference": image.reference.to_string(),
        "index_digest": image.index_digest.map(|d| d.to_string()),
        "platforms": image.platforms.iter().map(|(p, d)| serde_json::json!({
            "platform": platform_text(p), "digest": d.to_string(),
        })).collect::<Vec<_>>(),
        "platform": platform_text(&image.platform),
        "manifest_digest": image.manifest_digest.to_string(),
        "manifest_media_type": image.manifest_media_type,
        "layers": image.layers.iter().map(|l| serde_json::json!({
            "digest": l.blob.digest.to_string(),
            "size": l.blob.size,
            "media_type": l.media_type,
            "urls": l.blob.urls,
        })).collect::<Vec<_>>(),
        "config": {
            "digest": c.digest.to_string(),
            "env": c.env, "cmd": c.cmd, "entrypoint": c.entrypoint,
            "working_dir": c.working_dir, "user": c.user,
            "history": c.history,
        },
    })
}

fn print_inspect(image: &ResolvedImage) {
    println!("Reference:  {}", image.reference);
    if let Some(index) = image.index_digest {
        println!("Index:      {index}");
        for (p, d) in &image.platforms {
            let chosen = if *d == image.manifest_digest {
                "  (chosen)"
            } else {
                ""
            };
            println!("  {:<24} {d}{chosen}", platform_text(p));
        }
    }
    println!(
        "Manifest:   {} ({})",
        image.manifest_digest, image.manifest_media_type
    );
    println!("Platform:   {}", platform_text(&image.platform));
    let c = &image.config;
    println!("Config:     {}", c.digest);
    for env in &c.env {
        println!("  Env:        {env}");
    }
    if let Some(ep) = &c.entrypoint {
        println!("  Entrypoint: {ep:?}");
    }
    if let Some(cmd) = &c.cmd {
        println!("  Cmd:        {cmd:?}");
    }
    if let Some(wd) = c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        println!("  WorkingDir: {wd}");
    }
    if let Some(user) = c.user.as_deref().filter(|u| !u.is_empty()) {
        println!("  User:       {user}");
    }
    println!("Layers:");
    for (i, l) in image.layers.iter().enumerate() {
        println!(
            "  {:>2}  {}  {:>12}  {}",
            i + 1,
            l.blob.digest,
            human_bytes(l.blob.size),
            l.media_type
        );
    }
    if !c.history.is_empty() {
        println!("History:");
        for h in &c.history {
            let created = h.created.as_deref().unwrap_or("");
            let by = h.created_by.as_deref().unwrap_or("");
            println!("  {created:<25} {by}");
        }
    }
}

fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
