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
use imgfs::upper::Upper;
use indicatif::{MultiProgress, ProgressDrawTarget};
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, ExitCode, Stdio};
use std::time::Duration;

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
        Command::Mount(args) if args.foreground || args.daemon_child => {
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
        Command::Inspect {
            reference,
            platform,
            json,
        } => inspect(&reference, platform.as_deref(), json, client_options),
    }
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
    let progress = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
    Ok(runtime.block_on(mount::prepare(
        client, cache, reference, platform, &progress,
    ))?)
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
    let prepared = prepare(&runtime, &client, &cache, &reference, platform.as_ref())?;
    let image = mount::filesystem(
        &prepared,
        &client,
        &cache,
        runtime.handle().clone(),
        Duration::from_secs(args.read_timeout),
    )?;
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
    let log = cache.root().join("logs");
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
    };
    let mut record_file = None;
    let served = fuse::serve(fs, &args.mountpoint, &options, |unmounter| {
        unmount_on_signal(&runtime, unmounter);
        match record.save(&state_dir()) {
            Ok(path) => record_file = Some(path),
            Err(e) => tracing::warn!(error = %e, "imgfs diff will not find this mount"),
        }
        tracing::info!(mountpoint = %args.mountpoint.display(), image = %prepared.image.manifest_digest, "mounted");
        if daemon {
            announce_ready(&log);
        }
    });
    if let Some(path) = record_file {
        let _ = std::fs::remove_file(path);
    }
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

/// Tells the waiting parent we are live, then points stdout/stderr at a log
/// file so the mount outlives the terminal.
fn announce_ready(log_dir: &Path) {
    let mut stdout = std::io::stdout();
    let _ = writeln!(stdout, "{READY}").and_then(|()| stdout.flush());
    let log = std::fs::create_dir_all(log_dir).and_then(|()| {
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log_dir.join(format!("mount-{}.log", std::process::id())))
    });
    let target = match log {
        Ok(file) => file,
        Err(_) => match std::fs::OpenOptions::new().write(true).open("/dev/null") {
            Ok(null) => null,
            Err(_) => return,
        },
    };
    let _ = rustix::stdio::dup2_stdout(&target);
    let _ = rustix::stdio::dup2_stderr(&target);
}

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
