//! The cache as a system tool: `imgfs ps`, `images`/`cache ls`, `cache rm`,
//! `cache prune` and `pull`.

use crate::cli::image_cmd::human_bytes;
use crate::cli::mount_cmd::note_use;
use crate::{parse_platform, progress_target, runtime, state_dir};
use anyhow::Result;
use imgfs::cache::Cache;
use imgfs::mount;
use imgfs::record::MountRecord;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use imgfs::store;
use std::io::Write;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

pub(crate) fn ps(json: bool) -> Result<()> {
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

pub(crate) fn mount_json(m: &MountRecord) -> serde_json::Value {
    serde_json::json!({
        "mountpoint": m.mountpoint, "reference": m.reference,
        "manifest_digest": m.manifest_digest.to_string(),
        "layers": m.layers.iter().map(|l| l.to_string()).collect::<Vec<_>>(),
        "cache_dir": m.cache_dir, "upper": m.upper, "pid": m.pid, "log": m.log,
        "fetched_bytes": m.fetched_bytes,
    })
}

/// `sha256:` and the first 12 hex digits, as docker shows image ids.
pub(crate) fn short(digest: &imgfs::digest::Digest) -> String {
    format!("sha256:{}", &digest.hex()[..12])
}

pub(crate) fn cache_ls(cache_dir: &Path, json: bool) -> Result<()> {
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
pub(crate) fn ago(secs: u64) -> String {
    let d = store::now_secs().saturating_sub(secs);
    match d {
        0..60 => format!("{d}s ago"),
        60..3600 => format!("{}m ago", d / 60),
        3600..86_400 => format!("{}h ago", d / 3600),
        _ => format!("{}d ago", d / 86_400),
    }
}

pub(crate) fn cache_rm(cache_dir: &Path, target: &str, force: bool) -> Result<()> {
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

pub(crate) fn cache_prune(cache_dir: &Path, options: &store::PruneOptions) -> Result<()> {
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
pub(crate) fn pull(
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
pub(crate) const PULL_READ_TIMEOUT: u64 = 120;
