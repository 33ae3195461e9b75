//! `imgfs convert`: rewrite an image's layers as eStargz or zstd:chunked and
//! push the result, so that later mounts need no indexing pass.
//!
//! Flow, per platform of the source (every runnable entry of an index, or
//! the one manifest): resolve → per layer: download (digest and size
//! checked) → decompress (diff_id checked against the config) → parse →
//! [`layer::write`] → push the blob → new config (new diff_ids) → new
//! manifest; then a new index when the source was one. Layers that a TOC
//! cannot describe exactly (names that are not UTF-8, sparse files) and
//! foreign layers are kept as they are, with a warning; the image stays
//! valid, those layers are just indexed the legacy way when mounted.

use crate::cache::Cache;
use crate::digest::Digest;
use crate::image::manifest::{self, Kind, LayerDescriptor};
use crate::image::{self, ImageError, Platform, ResolvedImage};
use crate::layer::tar::TarParser;
use crate::layer::write::{self, TarInput, WriteError, Written};
use crate::layer::{Compression, Entry, EntryKind, normalize_path};
use crate::reference::Reference;
use crate::registry::{Client, RegistryError, media_type};
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use serde_json::{Value, json};
use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{self, Read, Write};
use std::path::Path;

const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
const OCI_LAYER_GZIP: &str = "application/vnd.oci.image.layer.v1.tar+gzip";
const OCI_LAYER_ZSTD: &str = "application/vnd.oci.image.layer.v1.tar+zstd";
const DOCKER_LAYER_GZIP: &str = "application/vnd.docker.image.rootfs.diff.tar.gzip";
/// zstd level of zstd:chunked output (what containers/storage uses).
pub const DEFAULT_ZSTD_LEVEL: i32 = 10;
/// Bytes moved between the decompressor, the hasher and the tar parser at once.
const PIECE: usize = 1 << 20;

/// The format layers are rewritten into.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Target {
    /// gzip members with a TOC (stargz-snapshotter, containerd, nerdctl).
    Estargz,
    /// zstd frames with a TOC (podman, buildah, containers/storage).
    #[value(name = "zstd:chunked")]
    ZstdChunked,
}

impl Target {
    pub fn name(self) -> &'static str {
        match self {
            Target::Estargz => "eStargz",
            Target::ZstdChunked => "zstd:chunked",
        }
    }
}

#[derive(Debug, Clone)]
pub struct Options {
    pub target: Target,
    /// Only this platform of an index (and push a manifest, not an index).
    pub platform: Option<Platform>,
    /// Paths (as in the image) to put first, before a `.prefetch.landmark`
    /// (eStargz only), in this order.
    pub prefetch: Vec<Vec<u8>>,
    pub zstd_level: i32,
}

#[derive(Debug, thiserror::Error)]
pub enum ConvertError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error("layer {digest}: {reason}")]
    Layer { digest: Digest, reason: String },
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: io::Error,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What happened to one layer.
#[derive(Debug, Clone, serde::Serialize)]
pub struct LayerReport {
    pub source: Digest,
    pub digest: Digest,
    pub size: u64,
    pub media_type: String,
    /// Why the layer was kept as it was, if it was.
    pub kept: Option<String>,
}

/// What was pushed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Report {
    pub reference: String,
    pub digest: Digest,
    pub media_type: String,
    pub platforms: Vec<(String, Vec<LayerReport>)>,
}

/// Converts `src` into `dst` (see the module doc).
pub async fn convert(
    client: &Client,
    cache: &Cache,
    src: &Reference,
    dst: &Reference,
    opts: &Options,
    progress: &MultiProgress,
) -> Result<Report, ConvertError> {
    let top = client
        .manifest(src, &src.manifest_ref(), media_type::ALL_MANIFESTS)
        .await?;
    let kind = manifest::classify(&top.media_type, &top.bytes)
        .map_err(|e| ConvertError::Invalid(format!("{src}: {e}")))?;
    let mut converter = Converter {
        client,
        cache,
        src,
        dst,
        opts,
        progress,
        done: HashMap::new(),
    };
    if kind != Kind::Index || opts.platform.is_some() {
        let image = image::resolve(client, src, opts.platform.as_ref()).await?;
        let (pushed, layers) = converter.image(&image).await?;
        let digest = client
            .push_manifest(dst, media_type::OCI_MANIFEST, pushed.clone())
            .await?;
        return Ok(Report {
            reference: dst.to_string(),
            digest,
            media_type: media_type::OCI_MANIFEST.into(),
            platforms: vec![(image.platform.to_string(), layers)],
        });
    }
    let entries = manifest::parse_index(&top.bytes)
        .map_err(|e| ConvertError::Invalid(format!("{src}: {e}")))?;
    let mut manifests = Vec::new();
    let mut platforms = Vec::new();
    for entry in entries {
        let image = image::resolve(client, &src.with_digest(entry.digest), None).await?;
        let (pushed, layers) = converter.image(&image).await?;
        let digest = Digest::of(&pushed);
        client
            .push_manifest(
                &dst.with_digest(digest),
                media_type::OCI_MANIFEST,
                pushed.clone(),
            )
            .await?;
        manifests.push(json!({
            "mediaType": media_type::OCI_MANIFEST,
            "digest": digest.to_string(),
            "size": pushed.len(),
            "platform": platform_json(&image.platform),
        }));
        platforms.push((image.platform.to_string(), layers));
    }
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = Bytes::from(serde_json::to_vec(&index).map_err(invalid_json)?);
    let digest = client
        .push_manifest(dst, media_type::OCI_INDEX, bytes)
        .await?;
    Ok(Report {
        reference: dst.to_string(),
        digest,
        media_type: media_type::OCI_INDEX.into(),
        platforms,
    })
}

fn invalid_json(e: serde_json::Error) -> ConvertError {
    ConvertError::Invalid(format!("encoding JSON: {e}"))
}

fn platform_json(p: &Platform) -> Value {
    let mut v = json!({ "os": p.os, "architecture": p.architecture });
    if let Some(variant) = &p.variant {
        v["variant"] = json!(variant);
    }
    if let Some(os_version) = &p.os_version {
        v["os.version"] = json!(os_version);
    }
    v
}

struct Converter<'a> {
    client: &'a Client,
    cache: &'a Cache,
    src: &'a Reference,
    dst: &'a Reference,
    opts: &'a Options,
    progress: &'a MultiProgress,
    /// Layers already converted in this run (shared between platforms).
    done: HashMap<Digest, (Value, Digest, LayerReport)>,
}

impl Converter<'_> {
    /// Converts one platform's image: pushes its layers and config, returns
    /// the new manifest (not yet pushed) and the per-layer outcome.
    async fn image(
        &mut self,
        image: &ResolvedImage,
    ) -> Result<(Bytes, Vec<LayerReport>), ConvertError> {
        let mut descriptors = Vec::new();
        let mut diff_ids = Vec::new();
        let mut reports = Vec::new();
        for (layer, diff_id) in image.layers.iter().zip(&image.config.diff_ids) {
            let (descriptor, new_diff_id, report) = match self.done.get(&layer.blob.digest) {
                Some(done) => done.clone(),
                None => {
                    let done = self.layer(layer, *diff_id).await?;
                    self.done.insert(layer.blob.digest, done.clone());
                    done
                }
            };
            descriptors.push(descriptor);
            diff_ids.push(new_diff_id);
            reports.push(report);
        }
        let config = new_config(&image.config.raw, &diff_ids)?;
        let config_digest = Digest::of(&config);
        self.client
            .push_blob(self.dst, &config_digest, config.clone())
            .await?;
        let manifest = json!({
            "schemaVersion": 2,
            "mediaType": media_type::OCI_MANIFEST,
            "config": {
                "mediaType": OCI_CONFIG,
                "digest": config_digest.to_string(),
                "size": config.len(),
            },
            "layers": descriptors,
        });
        let bytes = Bytes::from(serde_json::to_vec(&manifest).map_err(invalid_json)?);
        Ok((bytes, reports))
    }

    /// Converts (or keeps) one layer and makes sure the result is in `dst`.
    async fn layer(
        &self,
        layer: &LayerDescriptor,
        diff_id: Digest,
    ) -> Result<(Value, Digest, LayerReport), ConvertError> {
        let digest = layer.blob.digest;
        if layer.foreign {
            let why = "a foreign layer: it stays where its URLs point".to_string();
            tracing::warn!("layer {digest}: {why}");
            return Ok((descriptor_of(layer), diff_id, report(layer, Some(why))));
        }
        let work = tempfile::tempdir_in(self.cache.root().join("tmp"))
            .map_err(|e| io_err("a work directory", e))?;
        let blob_path = work.path().join("blob");
        self.download(layer, &blob_path).await?;
        let target = self.opts.target;
        let prefetch = self.opts.prefetch.clone();
        let level = self.opts.zstd_level;
        let compression = layer.compression;
        let dir = work.path().to_path_buf();
        let rewritten = tokio::task::spawn_blocking(move || {
            rewrite(&dir, compression, diff_id, target, &prefetch, level)
        })
        .await
        .map_err(|e| ConvertError::Invalid(e.to_string()))?
        .map_err(|reason| ConvertError::Layer { digest, reason })?;
        match rewritten {
            Ok(written) => {
                let bytes = std::fs::read(work.path().join("out"))
                    .map_err(|e| io_err("reading the converted layer", e))?;
                self.client
                    .push_blob(self.dst, &written.digest, Bytes::from(bytes))
                    .await?;
                let media_type = match target {
                    Target::Estargz => OCI_LAYER_GZIP,
                    Target::ZstdChunked => OCI_LAYER_ZSTD,
                };
                let descriptor = json!({
                    "mediaType": media_type,
                    "digest": written.digest.to_string(),
                    "size": written.size,
                    "annotations": written.annotations,
                });
                let report = LayerReport {
                    source: digest,
                    digest: written.digest,
                    size: written.size,
                    media_type: media_type.into(),
                    kept: None,
                };
                Ok((descriptor, written.diff_id, report))
            }
            Err(why) => {
                tracing::warn!("layer {digest}: kept as it is: {why}");
                if !self.client.blob_exists(self.dst, &digest).await? {
                    let bytes = std::fs::read(&blob_path)
                        .map_err(|e| io_err("reading the downloaded layer", e))?;
                    self.client
                        .push_blob(self.dst, &digest, Bytes::from(bytes))
                        .await?;
                }
                Ok((descriptor_of(layer), diff_id, report(layer, Some(why))))
            }
        }
    }

    /// Downloads the whole blob to `path`, checking its size and digest.
    async fn download(&self, layer: &LayerDescriptor, path: &Path) -> Result<(), ConvertError> {
        let digest = layer.blob.digest;
        let bar = self.progress.add(ProgressBar::new(layer.blob.size));
        bar.set_style(
            ProgressStyle::with_template(
                "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        bar.set_prefix(format!("converting {}", &digest.hex()[..12]));
        let mut stream = self.client.blob(self.src, &layer.blob).await?;
        let mut file = File::create(path).map_err(|e| io_err("a download file", e))?;
        let mut hasher = Sha256::new();
        let mut size = 0u64;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk?;
            size += chunk.len() as u64;
            if size > layer.blob.size {
                break;
            }
            hasher.update(&chunk);
            file.write_all(&chunk)
                .map_err(|e| io_err("writing the download", e))?;
            bar.set_position(size);
        }
        bar.finish_and_clear();
        let actual = Digest::from_bytes(hasher.finalize().into());
        if size != layer.blob.size || actual != digest {
            return Err(ConvertError::Layer {
                digest,
                reason: format!(
                    "the registry sent {size} bytes hashing to {actual}, expected {} bytes",
                    layer.blob.size
                ),
            });
        }
        Ok(())
    }
}

fn io_err(what: &str, source: io::Error) -> ConvertError {
    ConvertError::Io {
        what: what.to_string(),
        source,
    }
}

fn report(layer: &LayerDescriptor, kept: Option<String>) -> LayerReport {
    LayerReport {
        source: layer.blob.digest,
        digest: layer.blob.digest,
        size: layer.blob.size,
        media_type: layer.media_type.clone(),
        kept,
    }
}

/// The descriptor of a layer kept as it is (Docker's gzip type becomes the
/// OCI one, which an OCI manifest must use).
fn descriptor_of(layer: &LayerDescriptor) -> Value {
    let media_type = match layer.media_type.as_str() {
        DOCKER_LAYER_GZIP => OCI_LAYER_GZIP,
        other => other,
    };
    let mut v = json!({
        "mediaType": media_type,
        "digest": layer.blob.digest.to_string(),
        "size": layer.blob.size,
    });
    if !layer.blob.urls.is_empty() {
        v["urls"] = json!(layer.blob.urls);
    }
    if !layer.annotations.is_empty() {
        v["annotations"] = json!(layer.annotations);
    }
    v
}

/// The source config with the new diff_ids (everything else as it was).
fn new_config(raw: &[u8], diff_ids: &[Digest]) -> Result<Bytes, ConvertError> {
    let mut config: Value = serde_json::from_slice(raw)
        .map_err(|e| ConvertError::Invalid(format!("the source config is not JSON: {e}")))?;
    let ids: Vec<String> = diff_ids.iter().map(Digest::to_string).collect();
    config["rootfs"] = json!({ "type": "layers", "diff_ids": ids });
    Ok(Bytes::from(
        serde_json::to_vec(&config).map_err(invalid_json)?,
    ))
}

/// The blocking part of converting one layer, in `dir` (which holds the
/// downloaded `blob`): decompress to `tar`, check the diff_id, parse, and
/// write `out`. `Ok(Err(why))` when the layer must be kept as it is.
fn rewrite(
    dir: &Path,
    compression: Compression,
    diff_id: Digest,
    target: Target,
    prefetch: &[Vec<u8>],
    zstd_level: i32,
) -> Result<Result<Written, String>, String> {
    let blob = File::open(dir.join("blob")).map_err(|e| format!("reopening the download: {e}"))?;
    let tar_path = dir.join("tar");
    let (entries, ends, len) = unpack(blob, compression, &tar_path, diff_id)?;
    let tar = File::open(&tar_path).map_err(|e| format!("reopening the tar: {e}"))?;
    let input = TarInput {
        file: &tar,
        entries: &entries,
        ends: &ends,
        len,
    };
    let mut out = File::options()
        .read(true)
        .write(true)
        .create_new(true)
        .open(dir.join("out"))
        .map_err(|e| format!("creating the output: {e}"))?;
    let written = match target {
        Target::Estargz => {
            let (order, prioritized) = prioritized_order(&entries, prefetch);
            write::write_estargz(&input, &order, prioritized, &mut out)
        }
        Target::ZstdChunked => write::write_zstd_chunked(&input, zstd_level, &mut out),
    };
    match written {
        Ok(written) => Ok(Ok(written)),
        Err(WriteError::Unrepresentable(why)) => Ok(Err(why)),
        Err(WriteError::Io(e)) => Err(format!("writing the converted layer: {e}")),
    }
}

/// Decompresses the layer into `tar_path`, parsing it on the way; the
/// stream must hash to `diff_id`. Returns entries, their raw ends and the
/// stream length.
fn unpack(
    blob: File,
    compression: Compression,
    tar_path: &Path,
    diff_id: Digest,
) -> Result<(Vec<Entry>, Vec<u64>, u64), String> {
    let mut input: Box<dyn Read> = match compression {
        Compression::None => Box::new(blob),
        Compression::Gzip => Box::new(flate2::read::MultiGzDecoder::new(io::BufReader::new(blob))),
        Compression::Zstd => {
            Box::new(zstd::stream::read::Decoder::new(blob).map_err(|e| format!("zstd: {e}"))?)
        }
    };
    let mut out =
        io::BufWriter::new(File::create(tar_path).map_err(|e| format!("creating the tar: {e}"))?);
    let mut parser = TarParser::new();
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; PIECE];
    let mut len = 0u64;
    loop {
        let n = input
            .read(&mut buf)
            .map_err(|e| format!("decompressing at stream offset {len}: {e}"))?;
        if n == 0 {
            break;
        }
        parser
            .feed(&buf[..n])
            .map_err(|e| format!("invalid tar: {e}"))?;
        hasher.update(&buf[..n]);
        out.write_all(&buf[..n])
            .map_err(|e| format!("writing the tar: {e}"))?;
        len += n as u64;
    }
    out.flush().map_err(|e| format!("writing the tar: {e}"))?;
    let actual = Digest::from_bytes(hasher.finalize().into());
    if actual != diff_id {
        return Err(format!(
            "its uncompressed stream hashes to {actual}, the config's diff_id is {diff_id}"
        ));
    }
    let (entries, ends) = parser
        .finish_with_ends()
        .map_err(|e| format!("invalid tar: {e}"))?;
    Ok((entries, ends, len))
}

/// Entry order for eStargz: the listed paths first (in list order), each
/// after the directories above it and, for a hardlink, after its target;
/// then everything else in archive order. Returns the order and how many
/// come first.
pub fn prioritized_order(entries: &[Entry], prefetch: &[Vec<u8>]) -> (Vec<usize>, usize) {
    let mut by_path: BTreeMap<&[u8], Vec<usize>> = BTreeMap::new();
    for (k, e) in entries.iter().enumerate() {
        by_path.entry(&e.path).or_default().push(k);
    }
    let mut order = Vec::new();
    let mut taken = HashSet::new();
    for wanted in prefetch {
        take_with_deps(
            &normalize_path(wanted),
            entries,
            &by_path,
            &mut order,
            &mut taken,
        );
    }
    let prioritized = order.len();
    order.extend((0..entries.len()).filter(|k| !taken.contains(k)));
    (order, prioritized)
}

/// Moves every entry named `path` (all of them, so the last still wins)
/// into `order`, after the directories above it and a hardlink's target.
fn take_with_deps(
    path: &[u8],
    entries: &[Entry],
    by_path: &BTreeMap<&[u8], Vec<usize>>,
    order: &mut Vec<usize>,
    taken: &mut HashSet<usize>,
) {
    let Some(all) = by_path.get(path) else {
        return;
    };
    if all.iter().all(|k| taken.contains(k)) {
        return;
    }
    for (i, b) in path.iter().enumerate() {
        if *b == b'/' {
            take_with_deps(&path[..i], entries, by_path, order, taken);
        }
    }
    for &k in all {
        if let EntryKind::Hardlink { target } = &entries[k].kind {
            if target[..] != *path {
                take_with_deps(target, entries, by_path, order, taken);
            }
        }
        if taken.insert(k) {
            order.push(k);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry::plain(path, kind)
    }

    #[test]
    fn prioritized_files_come_after_their_parents_targets_and_earlier_copies() {
        let file = || EntryKind::File {
            size: 1,
            data: crate::layer::FileData::Contiguous { offset: 0 },
        };
        let entries = vec![
            entry("usr", EntryKind::Dir),     // 0
            entry("usr/bin", EntryKind::Dir), // 1
            entry("usr/bin/a", file()),       // 2
            entry("etc", EntryKind::Dir),     // 3
            entry("etc/conf", file()),        // 4
            entry(
                "usr/bin/b",
                EntryKind::Hardlink {
                    target: b"usr/bin/a".to_vec(),
                },
            ), // 5
            entry("etc/conf", file()),        // 6: a later copy wins
        ];
        let wanted = [
            b"/etc/conf".to_vec(),
            b"usr/bin/b".to_vec(),
            b"missing".to_vec(),
        ];
        let (order, first) = prioritized_order(&entries, &wanted);
        assert_eq!(order, [3, 4, 6, 0, 1, 2, 5]);
        assert_eq!(first, 7);
        let (order, first) = prioritized_order(&entries, &[]);
        assert_eq!((order, first), ((0..7).collect(), 0));
    }
}
