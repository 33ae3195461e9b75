//! `imgfs mount` and `imgfs umount`: the daemon that serves a mount (re-executed
//! detached, ready when the kernel mount exists), its upper directory, its
//! record and housekeeping (stats for `ps`, cache bounding), and signals.

use crate::{MountArgs, parse_platform, prepare, runtime, state_dir};
use anyhow::{Context, Result, bail};
use imgfs::cache::Cache;
use imgfs::fuse::{self, FuseOptions};
use imgfs::mount;
use imgfs::overlay::OverlayFs;
use imgfs::record::MountRecord;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use imgfs::store;
use imgfs::upper::Upper;
use std::ffi::OsString;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Command as Process, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// What the daemon child prints on stdout once the mount is live.
const READY: &str = "ready";

/// glibc's knob for its per-thread allocation arenas.
const MALLOC_ARENA_MAX: &str = "MALLOC_ARENA_MAX";
/// The daemon's FUSE, fetch and runtime threads each get an arena of
/// their own by default, most of it idle: scripts/soak measured 150-180 MB
/// of anonymous memory with the default, 94 MB with two, 65 MB with one;
/// scripts/bench-rss 38 MB (and a baseline that varied by 16 MB from run
/// to run) with two, 22 MB with one. Small allocations do not contend for
/// the one arena: glibc serves them from per-thread caches. A user's own
/// setting wins.
const DAEMON_MALLOC_ARENAS: &str = "1";

/// Hidden flag that marks the re-executed daemon child.
const DAEMON_CHILD: &str = "--daemon-child";

/// Re-runs this command as a detached child and waits until it says the
/// mount is live, or exits with its error (which it printed on our stderr).
pub(crate) fn spawn_daemon(args: &MountArgs) -> Result<()> {
    check_mountpoint(&args.mountpoint)?;
    let exe = std::env::current_exe().context("locating the imgfs executable")?;
    let mut child_args: Vec<OsString> = std::env::args_os().skip(1).collect();
    child_args.push(DAEMON_CHILD.into());
    let mut daemon = Process::new(exe);
    if std::env::var_os(MALLOC_ARENA_MAX).is_none() {
        daemon.env(MALLOC_ARENA_MAX, DAEMON_MALLOC_ARENAS);
    }
    let mut child = daemon
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

pub(crate) fn check_mountpoint(mountpoint: &Path) -> Result<()> {
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
pub(crate) fn mount_here(
    args: &MountArgs,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
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
    let layout = if args.raw_layout {
        imgfs::windows::Layout::Raw
    } else {
        imgfs::windows::Layout::View
    };
    let (image, remote) = mount::filesystem(&mut prepared, &cache, &network, layout)?;
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
    // Started before the kernel mount: the landmark region is on its way
    // while the mount comes up.
    let prefetcher = mount::prefetch(
        remote,
        args.prefetch,
        args.prefetch_rate,
        network.demand.clone(),
    );
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
pub(crate) enum UpperDir {
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

/// Tells the waiting parent we are live, then points stdout/stderr at the
/// log file so the mount outlives the terminal.
pub(crate) fn announce_ready(log: &Path) {
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
pub(crate) const STATS_EVERY: Duration = Duration::from_secs(2);

/// Seconds between checks of `--cache-max`.
pub(crate) const PRUNE_EVERY: Duration = Duration::from_secs(30);

/// The mount's background chores: publish the bytes fetched in the mount
/// record (for `imgfs ps`) and keep the cache under `--cache-max`.
pub(crate) struct Housekeeper {
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

pub(crate) fn housekeep(
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
            let _ = record.refresh(&state_dir());
        }
        let due = last_prune.is_none_or(|t| t.elapsed() >= PRUNE_EVERY);
        if let (Some(max), true) = (cache_max, due) {
            last_prune = Some(Instant::now());
            bound_cache(&record.cache_dir, max);
        }
    }
}

/// Evicts least recently used data of unmounted images while the cache is over `max`.
pub(crate) fn bound_cache(cache_dir: &Path, max: u64) {
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
pub(crate) fn note_use(cache: &Cache, prepared: &mount::Prepared) {
    if let Err(e) = store::record_use(cache, &prepared.image) {
        tracing::warn!(error = %e, "imgfs cache ls will not list this image");
    }
}

pub(crate) fn note_end(cache: &Cache, prepared: &mount::Prepared) {
    if let Err(e) = store::touch(cache, &prepared.image.manifest_digest) {
        tracing::warn!(error = %e, "could not update the image's last use");
    }
}

pub(crate) fn unmount_on_signal(
    runtime: &tokio::runtime::Runtime,
    mut unmounter: fuser::SessionUnmounter,
) {
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

pub(crate) fn umount(mountpoint: &Path) -> Result<()> {
    // The daemon's pid, to wait for its clean-up (upper sync, temporary
    // upper removed, record dropped) before saying the mount is gone.
    let daemon = MountRecord::load(&state_dir(), mountpoint)
        .ok()
        .map(|r| r.pid);
    let status = Process::new("fusermount3")
        .arg("-u")
        .arg("--")
        .arg(mountpoint)
        .stderr(Stdio::null())
        .status();
    if !matches!(status, Ok(s) if s.success()) {
        match rustix::mount::unmount(mountpoint, rustix::mount::UnmountFlags::empty()) {
            Ok(()) => {}
            // Not a mount point: detached already (`umount -l` while files
            // were open) if its daemon still runs; it ends at the last close.
            Err(rustix::io::Errno::INVAL) => match daemon.filter(|&pid| running(pid)) {
                Some(pid) => {
                    eprintln!(
                        "imgfs: {} is already unmounted; its mount process (pid {pid}) ends when the last file open in it is closed",
                        mountpoint.display()
                    );
                    return Ok(());
                }
                None => bail!("{} is not mounted", mountpoint.display()),
            },
            Err(rustix::io::Errno::BUSY) => bail!(
                "unmounting {}: busy (files are open in it); close them, or detach it now with umount -l (the mount then ends at the last close)",
                mountpoint.display()
            ),
            Err(e) => {
                return Err(e).with_context(|| {
                    format!("unmounting {}: is it an imgfs mount?", mountpoint.display())
                });
            }
        }
    }
    if let Some(pid) = daemon {
        wait_for_exit(pid, DAEMON_EXIT_WAIT);
    }
    Ok(())
}

/// How long `imgfs umount` waits for the daemon to finish its clean-up.
const DAEMON_EXIT_WAIT: Duration = Duration::from_secs(10);

fn wait_for_exit(pid: u32, limit: Duration) {
    let deadline = Instant::now() + limit;
    while running(pid) {
        if Instant::now() >= deadline {
            tracing::warn!(pid, "the mount daemon is still finishing its clean-up");
            return;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Whether `pid` runs (a zombie nobody reaped has finished).
fn running(pid: u32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        // The state follows the parenthesized command name: "pid (comm) S ...".
        Ok(stat) => stat
            .rsplit_once(')')
            .and_then(|(_, rest)| rest.trim_start().chars().next())
            .is_some_and(|state| state != 'Z' && state != 'X'),
        Err(_) => false,
    }
}
