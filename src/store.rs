//! What the cache holds, image by image, and how it is bounded.
//!
//! Every mount or pull writes a small image record (`images/<hex>.json`:
//! references, manifest digest, layers with their sizes, last use) beside the
//! content-addressed layer files of [`Cache`]. Listing, `cache rm` and
//! `cache prune` work from these records.
//!
//! Eviction removes a layer's files by unlinking them, never by punching
//! holes: a process that still has a blob or spill file open keeps reading
//! the bytes it verified, and the next process starts from an empty file and
//! refetches (and verifies) what it needs. Layers of live mounts are pinned
//! and never evicted (the `docker rmi` rule).

use crate::cache::{Cache, CacheError};
use crate::digest::Digest;
use crate::image::ResolvedImage;
use crate::record::MountRecord;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

const IMAGES: &str = "images";
/// Seconds within which a use is not recorded again.
const LAST_USE_RESOLUTION: u64 = 60;
/// Seconds a layer no image names is left alone by a plain prune: a mount
/// may be indexing it and not have written its image record yet.
const ORPHAN_GRACE: u64 = 600;
/// `st_blocks` counts 512-byte units whatever the filesystem's block size.
const STAT_BLOCK: u64 = 512;

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("image record {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
    #[error("no image in the cache matches {0} (see imgfs cache ls)")]
    NoMatch(String),
    #[error("{target} matches {count} images: give more of the digest")]
    Ambiguous { target: String, count: usize },
    #[error(
        "image {digest} is mounted on {mountpoint}: unmount it first, or use --force (its layers stay until the mount ends)"
    )]
    InUse { digest: Digest, mountpoint: PathBuf },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> StoreError + '_ {
    move |source| {
        StoreError::Cache(CacheError::Io {
            path: path.to_path_buf(),
            source,
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct LayerRecord {
    #[serde(with = "digest_text")]
    pub digest: Digest,
    pub size: u64,
}

/// One image seen by a mount or a pull.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ImageRecord {
    /// Every reference this manifest was reached by.
    pub references: Vec<String>,
    #[serde(with = "digest_text")]
    pub manifest_digest: Digest,
    /// Bottom layer first.
    pub layers: Vec<LayerRecord>,
    /// Seconds since the Unix epoch.
    pub last_used: u64,
}

/// Digests as `sha256:<hex>` in the records, so they read like everywhere else.
mod digest_text {
    use crate::digest::Digest;
    use serde::{Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(digest: &Digest, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(digest)
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Digest, D::Error> {
        let text = String::deserialize(d)?;
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// Disk space one layer takes in the cache.
#[derive(Debug, Clone, Copy, Default, Serialize)]
pub struct LayerUsage {
    /// Allocated bytes of the sparse blob file and of the layer's files kept
    /// whole (`files` of them).
    #[serde(rename = "cached_data")]
    pub data: u64,
    #[serde(skip)]
    pub files: u64,
    pub spill: u64,
    pub index: u64,
}

impl LayerUsage {
    pub fn total(&self) -> u64 {
        self.data + self.spill + self.index
    }
}

/// What `prune` removes; see [`prune`].
#[derive(Debug, Clone, Default)]
pub struct PruneOptions {
    /// Every unpinned layer, with its index, and the records of images not mounted.
    pub all: bool,
    /// Layers whose images were all last used longer ago than this.
    pub older_than: Option<Duration>,
    /// Least recently used layers until the cache is at most this big.
    pub max_bytes: Option<u64>,
}

/// What a prune or rm freed.
#[derive(Debug, Clone, Default, Serialize)]
pub struct Freed {
    pub layers: Vec<Digest>,
    pub bytes: u64,
}

pub fn now_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn images_dir(cache: &Cache) -> PathBuf {
    cache.root().join(IMAGES)
}

fn record_path(cache: &Cache, manifest: &Digest) -> PathBuf {
    images_dir(cache).join(format!("{}.json", manifest.hex()))
}

/// Records that `image` was just used (mounted or pulled) by `reference`.
pub fn record_use(cache: &Cache, image: &ResolvedImage) -> Result<ImageRecord, StoreError> {
    let dir = images_dir(cache);
    fs::create_dir_all(&dir).map_err(io_err(&dir))?;
    let mut record = load(cache, &image.manifest_digest)?.unwrap_or_else(|| ImageRecord {
        references: Vec::new(),
        manifest_digest: image.manifest_digest,
        layers: image
            .layers
            .iter()
            .map(|l| LayerRecord {
                digest: l.blob.digest,
                size: l.blob.size,
            })
            .collect(),
        last_used: 0,
    });
    let reference = image.reference.to_string();
    let new_reference = !record.references.contains(&reference);
    if new_reference {
        record.references.push(reference);
    }
    if refresh(&mut record) || new_reference {
        save(cache, &record)?;
    }
    Ok(record)
}

/// Marks the image of `manifest` as used now (a mount ending).
pub fn touch(cache: &Cache, manifest: &Digest) -> Result<(), StoreError> {
    let Some(mut record) = load(cache, manifest)? else {
        return Ok(());
    };
    if refresh(&mut record) {
        save(cache, &record)?;
    }
    Ok(())
}

/// Sets the last use to now unless it is already that recent; tells
/// whether it changed. LRU needs no finer clock, and a quick remount then
/// leaves the cache directory as it was.
fn refresh(record: &mut ImageRecord) -> bool {
    let now = now_secs();
    if now.saturating_sub(record.last_used) < LAST_USE_RESOLUTION {
        return false;
    }
    record.last_used = now;
    true
}

fn load(cache: &Cache, manifest: &Digest) -> Result<Option<ImageRecord>, StoreError> {
    let path = record_path(cache, manifest);
    match fs::read(&path) {
        Ok(bytes) => serde_json::from_slice(&bytes)
            .map(Some)
            .map_err(|source| StoreError::Json { path, source }),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(io_err(&path)(e)),
    }
}

fn save(cache: &Cache, record: &ImageRecord) -> Result<(), StoreError> {
    let path = record_path(cache, &record.manifest_digest);
    let json = serde_json::to_vec_pretty(record).map_err(|source| StoreError::Json {
        path: path.clone(),
        source,
    })?;
    Ok(cache.write_atomic(&path, &json)?)
}

/// Every image record, most recently used first. Unreadable records are
/// skipped with a warning.
pub fn images(cache: &Cache) -> Vec<ImageRecord> {
    let Ok(entries) = fs::read_dir(images_dir(cache)) else {
        return Vec::new();
    };
    let mut out: Vec<ImageRecord> = entries
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| {
            let bytes = fs::read(e.path()).ok()?;
            serde_json::from_slice(&bytes)
                .map_err(|err| tracing::warn!(path = %e.path().display(), error = %err, "skipping image record"))
                .ok()
        })
        .collect();
    out.sort_by_key(|i| std::cmp::Reverse(i.last_used));
    out
}

/// An image as `imgfs cache ls` shows it.
#[derive(Debug, Clone, Serialize)]
pub struct ImageSummary {
    pub references: Vec<String>,
    #[serde(with = "digest_text")]
    pub manifest_digest: Digest,
    /// Sum of the layer blob sizes.
    pub size: u64,
    /// Disk space of its layers (blob blocks, spills, indexes).
    pub cached_bytes: u64,
    pub last_used: u64,
    pub layers: Vec<LayerSummary>,
    pub mounted_on: Vec<PathBuf>,
}

#[derive(Debug, Clone, Serialize)]
pub struct LayerSummary {
    #[serde(with = "digest_text")]
    pub digest: Digest,
    pub size: u64,
    #[serde(flatten)]
    pub usage: LayerUsage,
}

/// Every image of the cache with its disk use and live mounts, most
/// recently used first.
pub fn summaries(cache: &Cache, mounts: &[MountRecord]) -> Vec<ImageSummary> {
    images(cache)
        .into_iter()
        .map(|image| {
            let layers: Vec<LayerSummary> = image
                .layers
                .iter()
                .map(|l| LayerSummary {
                    digest: l.digest,
                    size: l.size,
                    usage: layer_usage(cache, &l.digest),
                })
                .collect();
            ImageSummary {
                size: layers.iter().map(|l| l.size).sum(),
                cached_bytes: layers.iter().map(|l| l.usage.total()).sum(),
                mounted_on: mounts
                    .iter()
                    .filter(|m| m.manifest_digest == image.manifest_digest)
                    .map(|m| m.mountpoint.clone())
                    .collect(),
                references: image.references,
                manifest_digest: image.manifest_digest,
                last_used: image.last_used,
                layers,
            }
        })
        .collect()
}

fn allocated(path: &Path) -> u64 {
    fs::metadata(path)
        .map(|m| m.blocks() * STAT_BLOCK)
        .unwrap_or(0)
}

/// Disk space of the files directly in `dir`.
fn allocated_tree(dir: &Path) -> u64 {
    fs::read_dir(dir)
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| allocated(&e.path()))
        .sum()
}

/// Disk space `layer` takes now.
pub fn layer_usage(cache: &Cache, layer: &Digest) -> LayerUsage {
    let files = allocated_tree(&crate::materialize::layer_dir(&cache.files_root(), layer));
    LayerUsage {
        data: allocated(&cache.blob_path(layer)) + files,
        files,
        spill: allocated(&cache.spill_path(layer)),
        index: allocated(&cache.index_path(layer)),
    }
}

/// Every layer with files in the cache (from `indexes/` and `blobs/`).
fn layers_on_disk(cache: &Cache) -> HashSet<Digest> {
    let dirs = [
        cache.index_path(&Digest::of(b"")),
        cache.blob_path(&Digest::of(b"")),
        cache.spill_path(&Digest::of(b"")),
    ];
    dirs.iter()
        .filter_map(|p| p.parent())
        .filter_map(|d| fs::read_dir(d).ok())
        .flat_map(|entries| entries.flatten())
        .filter_map(|e| {
            format!("sha256:{}", e.file_name().to_string_lossy())
                .parse()
                .ok()
        })
        .collect()
}

/// Live mounts that use this cache.
pub fn mounts_of(cache: &Cache, mounts: &[MountRecord]) -> Vec<MountRecord> {
    let root = fs::canonicalize(cache.root()).unwrap_or_else(|_| cache.root().to_path_buf());
    mounts
        .iter()
        .filter(|m| fs::canonicalize(&m.cache_dir).unwrap_or_else(|_| m.cache_dir.clone()) == root)
        .cloned()
        .collect()
}

/// Layers no eviction may touch: those of `mounts` (live mounts of this cache).
pub fn pinned(mounts: &[MountRecord]) -> HashSet<Digest> {
    mounts
        .iter()
        .flat_map(|m| m.layers.iter().copied())
        .collect()
}

/// Removes a layer's files; a layer being indexed is waited for.
fn evict(cache: &Cache, layer: &Digest, with_index: bool) -> u64 {
    let Ok(_lock) = cache.lock_layer(layer) else {
        return 0;
    };
    let usage = layer_usage(cache, layer);
    let mut freed = 0;
    let _ = fs::remove_file(cache.blob_path(layer)).map(|()| freed += usage.data - usage.files);
    let kept = crate::materialize::layer_dir(&cache.files_root(), layer);
    let _ = fs::remove_dir_all(kept).map(|()| freed += usage.files);
    if usage.spill > 0 || with_index {
        // An index that points at a spill is useless without it.
        let _ = fs::remove_file(cache.spill_path(layer)).map(|()| freed += usage.spill);
        let _ = fs::remove_file(cache.index_path(layer)).map(|()| freed += usage.index);
    }
    remove_fetch_locks(cache, layer);
    freed
}

/// The stripe lock files of an evicted layer. A process still fetching
/// holds its lock on the unlinked file; one that comes after it makes a new
/// file, so at worst a stripe is fetched twice.
fn remove_fetch_locks(cache: &Cache, layer: &Digest) {
    let prefix = cache.fetch_lock_prefix(layer);
    let (Some(dir), Some(name)) = (prefix.parent(), prefix.file_name()) else {
        return;
    };
    let mut name = name.to_os_string();
    name.push(".");
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for entry in entries.flatten() {
        if entry
            .file_name()
            .as_encoded_bytes()
            .starts_with(name.as_encoded_bytes())
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The images `target` names: a reference (as given or normalized), a
/// full digest, or a hex prefix of a manifest digest.
pub fn find(cache: &Cache, target: &str) -> Result<Vec<ImageRecord>, StoreError> {
    let normalized = target
        .parse::<crate::reference::Reference>()
        .map(|r| r.to_string())
        .ok();
    let hex = target.strip_prefix("sha256:").unwrap_or(target);
    let all = images(cache);
    let by_ref: Vec<ImageRecord> = all
        .iter()
        .filter(|i| {
            i.references
                .iter()
                .any(|r| names(r, target) || Some(r) == normalized.as_ref())
        })
        .cloned()
        .collect();
    if !by_ref.is_empty() {
        return Ok(by_ref);
    }
    let by_digest: Vec<ImageRecord> = all
        .into_iter()
        .filter(|i| hex.len() >= 4 && i.manifest_digest.hex().starts_with(hex))
        .collect();
    match by_digest.len() {
        0 => Err(StoreError::NoMatch(target.to_string())),
        1 => Ok(by_digest),
        count => Err(StoreError::Ambiguous {
            target: target.to_string(),
            count,
        }),
    }
}

/// Whether `target` names `reference` as given, or as its repository path
/// without the registry (`demo/app` for `host:5000/demo/app:latest`).
fn names(reference: &str, target: &str) -> bool {
    let with_tag = if target.contains(':') || target.contains('@') {
        target.to_string()
    } else {
        format!("{target}:latest")
    };
    reference == target || reference.ends_with(&format!("/{with_tag}"))
}

/// `imgfs cache rm`: forgets the images `target` names and removes their
/// layers that no other image uses. Refused for a mounted image unless
/// `force`; a forced removal still leaves the layers of live mounts.
pub fn remove(
    cache: &Cache,
    target: &str,
    mounts: &[MountRecord],
    force: bool,
) -> Result<Freed, StoreError> {
    let chosen = find(cache, target)?;
    if !force {
        for image in &chosen {
            if let Some(m) = mounts
                .iter()
                .find(|m| m.manifest_digest == image.manifest_digest)
            {
                return Err(StoreError::InUse {
                    digest: image.manifest_digest,
                    mountpoint: m.mountpoint.clone(),
                });
            }
        }
    }
    for image in &chosen {
        let path = record_path(cache, &image.manifest_digest);
        fs::remove_file(&path).map_err(io_err(&path))?;
    }
    let mut keep = pinned(mounts);
    keep.extend(
        images(cache)
            .iter()
            .flat_map(|i| i.layers.iter().map(|l| l.digest)),
    );
    let mut freed = Freed::default();
    for layer in chosen
        .iter()
        .flat_map(|i| i.layers.iter().map(|l| l.digest))
    {
        if keep.insert(layer) {
            freed.bytes += evict(cache, &layer, true);
            freed.layers.push(layer);
        }
    }
    Ok(freed)
}

/// Total disk space of the layers in the cache.
pub fn total_usage(cache: &Cache) -> u64 {
    layers_on_disk(cache)
        .iter()
        .map(|l| layer_usage(cache, l).total())
        .sum()
}

/// When a layer was last used, as far as the cache can tell.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
struct LastUse {
    secs: u64,
    /// No image record names it: the time is its index's modification.
    orphan: bool,
}

/// Last use of every layer: the latest of its images, or for a layer no
/// image record names (an interrupted mount, a removed record) the time its
/// index was written, so a mount still preparing does not lose it.
fn layer_last_use(cache: &Cache) -> HashMap<Digest, LastUse> {
    let mut out: HashMap<Digest, LastUse> = layers_on_disk(cache)
        .into_iter()
        .map(|l| {
            (
                l,
                LastUse {
                    secs: written_at(cache, &l),
                    orphan: true,
                },
            )
        })
        .collect();
    for image in images(cache) {
        for layer in &image.layers {
            let use_ = out.entry(layer.digest).or_insert(LastUse {
                secs: 0,
                orphan: false,
            });
            if use_.orphan {
                *use_ = LastUse {
                    secs: 0,
                    orphan: false,
                };
            }
            use_.secs = use_.secs.max(image.last_used);
        }
    }
    out
}

fn written_at(cache: &Cache, layer: &Digest) -> u64 {
    [cache.index_path(layer), cache.blob_path(layer)]
        .iter()
        .filter_map(|p| fs::metadata(p).ok()?.modified().ok())
        .filter_map(|t| t.duration_since(UNIX_EPOCH).ok())
        .map(|d| d.as_secs())
        .max()
        .unwrap_or(0)
}

/// `imgfs cache prune`. Without options, removes the files of layers no
/// image record names (after a grace period). Data of unpinned layers goes first in least recently
/// used order; indexes stay (they are small and make the next mount fast)
/// except with `all`, or for zstd layers whose index needs the spill.
pub fn prune(
    cache: &Cache,
    options: &PruneOptions,
    mounts: &[MountRecord],
) -> Result<Freed, StoreError> {
    let pins = pinned(mounts);
    let mut candidates: Vec<(LastUse, Digest)> = layer_last_use(cache)
        .into_iter()
        .filter(|(l, _)| !pins.contains(l))
        .map(|(l, t)| (t, l))
        .collect();
    candidates.sort_by_key(|(t, _)| t.secs);
    let now = now_secs();
    let cutoff = options.older_than.map(|d| now.saturating_sub(d.as_secs()));
    let mut total = options.max_bytes.map(|_| total_usage(cache));
    let mut freed = Freed::default();
    for (last_use, layer) in candidates {
        let over = matches!((total, options.max_bytes), (Some(t), Some(max)) if t > max);
        let old = cutoff.is_some_and(|c| last_use.secs < c);
        let orphan = last_use.orphan && now.saturating_sub(last_use.secs) > ORPHAN_GRACE;
        if !(options.all || over || old || orphan) {
            continue;
        }
        let bytes = evict(cache, &layer, options.all || orphan);
        if bytes > 0 {
            freed.bytes += bytes;
            freed.layers.push(layer);
        }
        if let Some(t) = total.as_mut() {
            *t = t.saturating_sub(bytes);
        }
    }
    if options.all {
        forget_unmounted(cache, mounts)?;
    }
    Ok(freed)
}

fn forget_unmounted(cache: &Cache, mounts: &[MountRecord]) -> Result<(), StoreError> {
    let mounted: HashSet<Digest> = mounts.iter().map(|m| m.manifest_digest).collect();
    for image in images(cache) {
        if !mounted.contains(&image.manifest_digest) {
            let path = record_path(cache, &image.manifest_digest);
            fs::remove_file(&path).map_err(io_err(&path))?;
        }
    }
    Ok(())
}

/// Parses `30s`, `10m`, `12h`, `7d`, `2w`.
pub fn parse_duration(text: &str) -> Result<Duration, String> {
    let t = text.trim();
    let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
    let (number, unit) = t.split_at(split);
    let n: u64 = number
        .parse()
        .map_err(|_| format!("duration {text:?}: expected e.g. 30m, 12h, 7d"))?;
    let seconds = match unit {
        "s" | "" => 1,
        "m" => 60,
        "h" => 3600,
        "d" => 86_400,
        "w" => 604_800,
        _ => {
            return Err(format!(
                "duration {text:?}: unknown unit {unit:?}, use s, m, h, d or w"
            ));
        }
    };
    Ok(Duration::from_secs(n.saturating_mul(seconds)))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write_layer(cache: &Cache, layer: &Digest, bytes: usize) {
        fs::write(cache.blob_path(layer), vec![1u8; bytes]).expect("blob");
        fs::write(cache.index_path(layer), b"index").expect("index");
    }

    fn image(cache: &Cache, name: &str, layers: &[Digest], last_used: u64) -> ImageRecord {
        let record = ImageRecord {
            references: vec![name.to_string()],
            manifest_digest: Digest::of(name.as_bytes()),
            layers: layers
                .iter()
                .map(|d| LayerRecord {
                    digest: *d,
                    size: 1,
                })
                .collect(),
            last_used,
        };
        fs::create_dir_all(images_dir(cache)).expect("dir");
        save(cache, &record).expect("save");
        record
    }

    fn mount_of(record: &ImageRecord, cache: &Cache) -> MountRecord {
        MountRecord {
            mountpoint: PathBuf::from("/mnt/x"),
            reference: record.references[0].clone(),
            manifest_digest: record.manifest_digest,
            layers: record.layers.iter().map(|l| l.digest).collect(),
            cache_dir: cache.root().to_path_buf(),
            upper: None,
            pid: 1,
            log: None,
            fetched_bytes: 0,
        }
    }

    #[test]
    fn rm_keeps_shared_layers_and_refuses_mounted_images() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let (shared, own) = (Digest::of(b"shared"), Digest::of(b"own"));
        write_layer(&cache, &shared, 10_000);
        write_layer(&cache, &own, 10_000);
        let a = image(&cache, "a", &[shared, own], 5);
        image(&cache, "b", &[shared], 6);
        let mounts = vec![mount_of(&a, &cache)];
        let err = remove(&cache, "a", &mounts, false).expect_err("mounted");
        assert!(err.to_string().contains("unmount it first"), "{err}");
        let freed = remove(&cache, "a", &[], false).expect("rm");
        assert_eq!(freed.layers, vec![own]);
        assert!(cache.blob_path(&shared).exists());
        assert!(!cache.blob_path(&own).exists());
        assert_eq!(images(&cache).len(), 1);
        let text = fs::read_to_string(record_path(&cache, &Digest::of(b"b"))).expect("record");
        assert!(text.contains(&shared.to_string()), "{text}");
    }

    #[test]
    fn prune_evicts_least_recently_used_unpinned_data() {
        let dir = tempfile::tempdir().expect("tempdir");
        let cache = Cache::open(dir.path()).expect("cache");
        let layers: Vec<Digest> = (0..3u8).map(|i| Digest::of(&[i])).collect();
        for l in &layers {
            write_layer(&cache, l, 100_000);
        }
        let old = image(&cache, "old", &layers[..1], 10);
        image(&cache, "mid", &layers[1..2], 20);
        image(&cache, "new", &layers[2..], 30);
        let per_layer = layer_usage(&cache, &layers[0]).total();
        // Room for two layers and the indexes; the oldest is mounted, so "mid" goes.
        let options = PruneOptions {
            max_bytes: Some(per_layer * 2 + per_layer / 2),
            ..PruneOptions::default()
        };
        let freed = prune(&cache, &options, &[mount_of(&old, &cache)]).expect("prune");
        assert_eq!(freed.layers, vec![layers[1]]);
        assert!(cache.blob_path(&layers[0]).exists());
        assert!(cache.index_path(&layers[1]).exists(), "indexes stay");
        let all = PruneOptions {
            all: true,
            ..PruneOptions::default()
        };
        prune(&cache, &all, &[]).expect("prune all");
        assert_eq!(total_usage(&cache), 0);
        assert!(images(&cache).is_empty());
    }

    #[test]
    fn durations_parse() {
        assert_eq!(parse_duration("7d"), Ok(Duration::from_secs(7 * 86_400)));
        assert!(parse_duration("7y").is_err());
    }
}
