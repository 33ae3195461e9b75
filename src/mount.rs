//! One mounted image, wired end to end: resolve the reference, make sure
//! every layer has an index (from the cache, or by one verified streaming
//! pass), stack them into a tree, and give `fs` a reader per layer whose
//! bytes come from the block cache or the registry.
//!
//! This is the only module that knows every other one; each step is a
//! function a test can call on its own.

use crate::artifact;
use crate::cache::{Cache, CacheError, Staged};
use crate::digest::Digest;
use crate::fs::ImageFs;
use crate::image::{self, ImageError, LayerDescriptor, Platform, ResolvedImage};
use crate::layer::{
    self, Access, BlobSource, Compression, Index, IndexOptions, LayerError, LayerReader, toc,
};
use crate::materialize::Materializer;
use crate::reference::Reference;
use crate::registry::{BlobLocator, Client, RegistryError};
use crate::source::{BlockSource, Demand, RangeFetcher, SpillSource};
use crate::union::Tree;
use bytes::Bytes;
use futures_util::StreamExt;
use indicatif::{MultiProgress, ProgressBar, ProgressStyle};
use std::collections::HashMap;
use std::io::{self, Read, Write};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};
use tokio::runtime::Handle;
use tokio::sync::mpsc;

/// Layers indexed at the same time: on a small machine the inflate work,
/// not the link, is the limit.
const PARALLEL_INDEXING: usize = 2;
/// Chunks buffered between the network task and the indexing thread.
const PIPE_DEPTH: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum MountError {
    #[error(transparent)]
    Image(#[from] ImageError),
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error(transparent)]
    Cache(#[from] CacheError),
    #[error("layer {digest}: {what}: {source}")]
    Io {
        digest: Digest,
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error(transparent)]
    Source(#[from] layer::SourceError),
    #[error("internal error: {0}")]
    Internal(String),
}

/// An image whose layers are all indexed: everything a mount needs.
pub struct Prepared {
    pub image: ResolvedImage,
    pub indexes: Vec<Arc<Index>>,
}

/// Resolves `reference` and indexes every layer not yet in the cache,
/// showing a progress bar per layer being scanned.
pub async fn prepare(
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    platform: Option<&Platform>,
    progress: &MultiProgress,
) -> Result<Prepared, MountError> {
    prepare_with(client, cache, reference, platform, progress, Blobs::Drop).await
}

/// What indexing does with the blob bytes it streams.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Blobs {
    /// Keep only the index: disk use follows what is read (mounts).
    Drop,
    /// Also keep the whole blob in the block cache once its digest checked
    /// out, so warming it afterwards fetches nothing (`imgfs pull`).
    Keep,
}

/// [`prepare`], choosing what happens to the streamed blobs.
pub async fn prepare_with(
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    platform: Option<&Platform>,
    progress: &MultiProgress,
    blobs: Blobs,
) -> Result<Prepared, MountError> {
    let manifest = image::resolve_manifest(client, reference, platform).await?;
    // The config comes while the layers are indexed (their TOCs fetched):
    // one round trip less before the mount is live. A config that is bad
    // ends the mount as soon as it arrives.
    let config = async { Ok::<_, MountError>(manifest.fetch_config(client).await?) };
    let indexes = index_layers(client, cache, &manifest, progress, blobs);
    let (config, indexes) = futures_util::future::try_join(config, indexes).await?;
    let image = manifest.with_config(config)?;
    Ok(Prepared { image, indexes })
}

/// Every layer's index (see [`layer_index`]), at most
/// [`PARALLEL_INDEXING`] at a time.
async fn index_layers(
    client: &Client,
    cache: &Cache,
    manifest: &image::ResolvedManifest,
    progress: &MultiProgress,
    blobs: Blobs,
) -> Result<Vec<Arc<Index>>, MountError> {
    let reference = &manifest.reference;
    let published = published_indexes(client, cache, manifest).await;
    let limit = Arc::new(tokio::sync::Semaphore::new(PARALLEL_INDEXING));
    let tasks = manifest.layers.iter().map(|layer| {
        let limit = limit.clone();
        let published = published.get(&layer.blob.digest);
        async move {
            let _permit = limit
                .acquire()
                .await
                .map_err(|e| MountError::Internal(e.to_string()))?;
            let found = LayerSources { published };
            layer_index(client, cache, reference, layer, progress, blobs, found).await
        }
    });
    futures_util::future::try_join_all(tasks).await
}

/// Indexes published in the registry for the layers that would otherwise
/// be scanned (not cached, no TOC); asked only when there is such a layer.
async fn published_indexes(
    client: &Client,
    cache: &Cache,
    manifest: &image::ResolvedManifest,
) -> HashMap<Digest, BlobLocator> {
    let needs_scan = manifest.layers.iter().any(|layer| {
        !cache.index_path(&layer.blob.digest).exists()
            && toc::Plan::from_annotations(&layer.annotations, layer.compression).is_none()
    });
    if !needs_scan {
        return HashMap::new();
    }
    artifact::find(client, &manifest.reference, &manifest.manifest_digest).await
}

/// Where a layer's index may come from besides the cache and a scan.
struct LayerSources<'a> {
    /// An index published in the registry (see [`artifact`]).
    published: Option<&'a BlobLocator>,
}

/// The layer's index from the cache, its TOC, a published index, or built
/// by one streaming pass, in that order. The per-layer lock makes concurrent
/// first mounts of one layer scan it once.
async fn layer_index(
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    layer: &LayerDescriptor,
    progress: &MultiProgress,
    blobs: Blobs,
    sources: LayerSources<'_>,
) -> Result<Arc<Index>, MountError> {
    let digest = layer.blob.digest;
    if let Some(index) = cache.load_index(&digest)? {
        return Ok(Arc::new(index));
    }
    if let Some(index) = toc_index(client, cache, reference, layer).await? {
        return Ok(Arc::new(index));
    }
    if let Some(locator) = sources.published {
        match artifact::fetch(client, reference, locator, layer).await {
            Ok(index) => {
                cache.store_index(&index)?;
                return Ok(Arc::new(index));
            }
            Err(e) => tracing::warn!("{e}; indexing the whole layer instead"),
        }
    }
    let lock = {
        let cache = cache.clone();
        tokio::task::spawn_blocking(move || cache.lock_layer(&digest))
            .await
            .map_err(|e| MountError::Internal(e.to_string()))??
    };
    if let Some(index) = cache.load_index(&digest)? {
        return Ok(Arc::new(index));
    }
    let bar = progress.add(layer_bar(layer));
    let stream = client.blob(reference, &layer.blob).await?;
    let (tx, rx) = mpsc::channel(PIPE_DEPTH);
    let pump = tokio::spawn(async move {
        let mut stream = stream;
        while let Some(chunk) = stream.next().await {
            let chunk = chunk.map_err(|e| io::Error::other(e.to_string()));
            let failed = chunk.is_err();
            if tx.send(chunk).await.is_err() || failed {
                break;
            }
        }
    });
    let build = {
        let cache = cache.clone();
        let layer = layer.clone();
        let bar = bar.clone();
        tokio::task::spawn_blocking(move || {
            // A zstd layer's bytes live on in its spill already.
            let keep = blobs == Blobs::Keep && layer.compression != Compression::Zstd;
            let copy = keep.then(|| cache.staging()).transpose()?;
            scan(&cache, &layer, ChannelReader::new(rx, bar, copy))
        })
    };
    let result = build
        .await
        .map_err(|e| MountError::Internal(e.to_string()))?;
    pump.abort();
    bar.finish_and_clear();
    if bar.is_hidden() && blobs == Blobs::Keep && result.is_ok() {
        // `imgfs pull` without a terminal: one plain line per layer.
        eprintln!("indexed {digest} ({} bytes)", layer.blob.size);
    }
    drop(lock);
    Ok(Arc::new(result?))
}

/// The index of a seekable layer (eStargz, zstd:chunked) from its TOC alone,
/// stored in the cache. `None` for other layers and when the TOC cannot be
/// used: then the layer is indexed by a full pass, with a warning saying why.
async fn toc_index(
    client: &Client,
    cache: &Cache,
    reference: &Reference,
    layer: &LayerDescriptor,
) -> Result<Option<Index>, MountError> {
    let digest = layer.blob.digest;
    let plan = match toc::Plan::from_annotations(&layer.annotations, layer.compression) {
        None => return Ok(None),
        Some(Ok(plan)) => plan,
        Some(Err(e)) => {
            tracing::warn!("layer {digest}: {e}; indexing the whole layer instead");
            return Ok(None);
        }
    };
    let (client, reference, blob) = (client.clone(), reference.clone(), layer.blob.clone());
    let runtime = Handle::current();
    let loaded = tokio::task::spawn_blocking(move || {
        let fetch = |start, end| {
            runtime
                .block_on(client.blob_range(&reference, &blob, start, end))
                .map(|bytes| bytes.to_vec())
                .map_err(|e| e.to_string())
        };
        toc::load(&plan, blob.digest, blob.size, &fetch).map_err(|e| (plan.format(), e))
    })
    .await
    .map_err(|e| MountError::Internal(e.to_string()))?;
    match loaded {
        Ok(index) => {
            cache.store_index(&index)?;
            Ok(Some(index))
        }
        Err((format, e)) => {
            tracing::warn!(
                "layer {digest}: {} TOC unusable ({e}); indexing the whole layer instead",
                format.name()
            );
            Ok(None)
        }
    }
}

/// The blocking half of indexing: build, keep the spill for zstd, persist.
fn scan(
    cache: &Cache,
    layer: &LayerDescriptor,
    mut input: ChannelReader,
) -> Result<Index, MountError> {
    let digest = layer.blob.digest;
    let opts = IndexOptions::default();
    let index = if layer.compression == Compression::Zstd {
        let mut spill = cache.staging()?;
        let index = layer::build_index(
            &mut input,
            layer.compression,
            digest,
            layer.blob.size,
            Some(&mut spill),
            &opts,
        )?;
        spill.commit(&cache.spill_path(&digest))?;
        index
    } else {
        layer::build_index(
            &mut input,
            layer.compression,
            digest,
            layer.blob.size,
            None,
            &opts,
        )?
    };
    cache.store_index(&index)?;
    input.keep_copy(cache, layer);
    Ok(index)
}

fn layer_bar(layer: &LayerDescriptor) -> ProgressBar {
    let bar = ProgressBar::new(layer.blob.size);
    let style = ProgressStyle::with_template(
        "{prefix} [{bar:30}] {bytes}/{total_bytes} {bytes_per_sec} {eta}",
    )
    .unwrap_or_else(|_| ProgressStyle::default_bar())
    .progress_chars("=> ");
    bar.set_style(style);
    let hex = layer.blob.digest.hex();
    bar.set_prefix(format!("indexing {}", &hex[..12]));
    bar
}

/// Turns the network task's chunks into a blocking `Read` for the indexer,
/// optionally copying them to a staged cache file.
struct ChannelReader {
    rx: mpsc::Receiver<io::Result<Bytes>>,
    current: Bytes,
    bar: ProgressBar,
    copy: Option<Staged>,
    copied: u64,
}

impl ChannelReader {
    fn new(rx: mpsc::Receiver<io::Result<Bytes>>, bar: ProgressBar, copy: Option<Staged>) -> Self {
        ChannelReader {
            rx,
            current: Bytes::new(),
            bar,
            copy,
            copied: 0,
        }
    }

    fn copy_out(&mut self, bytes: &[u8]) {
        let Some(copy) = self.copy.as_mut() else {
            return;
        };
        match copy.write_all(bytes) {
            Ok(()) => self.copied += bytes.len() as u64,
            Err(e) => {
                tracing::warn!(error = %e, "not keeping the blob in the cache");
                self.copy = None;
            }
        }
    }

    /// Called once the index is built, so the blob's digest checked out:
    /// the copy replaces the cache file by a rename (a process that has the
    /// old one open keeps reading what it verified there).
    fn keep_copy(self, cache: &Cache, layer: &LayerDescriptor) {
        let Some(copy) = self.copy else {
            return;
        };
        if self.copied != layer.blob.size {
            return;
        }
        if let Err(e) = copy.commit(&cache.blob_path(&layer.blob.digest)) {
            tracing::warn!(error = %e, "not keeping the blob in the cache");
        }
    }
}

impl Read for ChannelReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.current.is_empty() {
            match self.rx.blocking_recv() {
                Some(chunk) => self.current = chunk?,
                None => return Ok(0),
            }
        }
        let n = buf.len().min(self.current.len());
        let chunk = self.current.split_to(n);
        buf[..n].copy_from_slice(&chunk);
        self.copy_out(&chunk);
        self.bar.inc(n as u64);
        Ok(n)
    }
}

/// Fetches blob ranges from the registry, from a FUSE worker thread.
struct RegistryFetcher {
    client: Client,
    reference: Reference,
    layer: LayerDescriptor,
    runtime: Handle,
    timeout: Duration,
    /// Shared by every layer of the mount, for `imgfs ps`.
    fetched: Arc<AtomicU64>,
}

impl RangeFetcher for RegistryFetcher {
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, layer::SourceError> {
        let request = self
            .client
            .blob_range(&self.reference, &self.layer.blob, start, end);
        // The timer must be created inside the runtime: this is a FUSE thread.
        let timeout = self.timeout;
        match self
            .runtime
            .block_on(async move { tokio::time::timeout(timeout, request).await })
        {
            Ok(Ok(bytes)) => {
                self.fetched
                    .fetch_add(bytes.len() as u64, Ordering::Relaxed);
                Ok(bytes.to_vec())
            }
            Ok(Err(e)) => Err(layer::SourceError(e.to_string())),
            Err(_) => Err(layer::SourceError(format!(
                "{}: bytes {start}-{end}: no answer within {:?}",
                self.describe(),
                self.timeout
            ))),
        }
    }

    fn describe(&self) -> String {
        format!("{}@{}", self.reference.name(), self.layer.blob.digest)
    }
}

/// How the layer readers of one mount reach the registry.
#[derive(Clone)]
pub struct Network {
    pub client: Client,
    pub runtime: Handle,
    /// How long a read may wait for the registry.
    pub read_timeout: Duration,
    /// Bytes fetched by every layer, counted for `imgfs ps`.
    pub fetched: Arc<AtomicU64>,
    /// On-demand fetches of every layer, which background prefetching yields to.
    pub demand: Arc<Demand>,
}

/// The layers of a mount whose bytes come from the network, for prefetching.
pub struct RemoteLayers(Vec<RemoteLayer>);

struct RemoteLayer {
    source: Arc<BlockSource>,
    /// End of the prioritized files (eStargz landmark), 0 when none.
    landmark_end: u64,
}

/// Builds the filesystem for a prepared image: the union tree and one
/// reader per layer over the cache and the registry; also hands back the
/// layers that [`prefetch`] can fetch. Takes the indexes out of `prepared`:
/// once the tree holds the entries, the readers keep only where the bytes
/// are, so a mount does not hold every tar entry twice.
/// A Windows image is shown as `layout` says (see [`crate::windows`]).
pub fn filesystem(
    prepared: &mut Prepared,
    cache: &Cache,
    network: &Network,
    layout: crate::windows::Layout,
) -> Result<(ImageFs, RemoteLayers), MountError> {
    let indexes = std::mem::take(&mut prepared.indexes);
    let indexes = crate::windows::for_image(indexes, &prepared.image.platform.os, layout);
    let tree = Tree::build(&indexes);
    let mut readers = Vec::with_capacity(indexes.len());
    let mut remote = Vec::new();
    for (index, layer) in indexes.into_iter().zip(&prepared.image.layers) {
        let (source, block_source) = layer_source(prepared, cache, network, &index, layer)?;
        let landmark_end = match index.access {
            Access::Chunked { prefetch_end, .. } => prefetch_end,
            _ => 0,
        };
        remote.extend(block_source.map(|source| RemoteLayer {
            source,
            landmark_end,
        }));
        readers.push(LayerReader::new(Arc::new(without_entries(index)), source));
    }
    let mut image = ImageFs::new(tree, readers);
    match Materializer::start(cache.files_root()) {
        Ok(materializer) => image = image.with_materializer(Arc::new(materializer)),
        Err(e) => tracing::warn!(error = %e, "image files will not be kept whole"),
    }
    Ok((image, RemoteLayers(remote)))
}

/// The index without its tar entries, copied only if someone else holds it.
fn without_entries(index: Arc<Index>) -> Index {
    let mut index = Arc::unwrap_or_clone(index);
    index.entries = Vec::new();
    index
}

/// A layer's bytes, and the same source again when it is fetched by Range.
type LayerSource = (Arc<dyn BlobSource>, Option<Arc<BlockSource>>);

fn layer_source(
    prepared: &Prepared,
    cache: &Cache,
    network: &Network,
    index: &Index,
    layer: &LayerDescriptor,
) -> Result<LayerSource, MountError> {
    let digest = layer.blob.digest;
    let io_err = |what| {
        move |source| MountError::Io {
            digest,
            what,
            source,
        }
    };
    Ok(match index.access {
        Access::Spill => {
            let spill = SpillSource::open(
                &cache.spill_path(&digest),
                index.stream_size,
                index.block_digests.clone(),
            )
            .map_err(io_err("opening the decompressed layer in the cache"))?;
            (Arc::new(spill), None)
        }
        Access::Tar | Access::Gzip { .. } | Access::Chunked { .. } => {
            let fetcher = Arc::new(RegistryFetcher {
                client: network.client.clone(),
                reference: prepared.image.reference.clone(),
                layer: layer.clone(),
                runtime: network.runtime.clone(),
                timeout: network.read_timeout,
                fetched: network.fetched.clone(),
            });
            // A chunked layer's cache file holds its verified chunks
            // decompressed; the name is still the layer's, for pruning.
            let path = cache.blob_path(&digest);
            let source = match &index.access {
                Access::Chunked { codec, chunks, .. } => {
                    BlockSource::chunked(&path, *codec, chunks.clone(), index.stream_size, fetcher)
                }
                _ => {
                    BlockSource::open(&path, index.blob_size, index.block_digests.clone(), fetcher)
                }
            }
            .map_err(io_err("opening the block cache"))?
            .with_fetch_locks(cache.fetch_lock_prefix(&digest))
            .with_demand(network.demand.clone());
            let source = Arc::new(source);
            (source.clone(), Some(source))
        }
    })
}

/// Bytes read at once when warming a layer: one maximal Range request.
const WARM_CHUNK: u64 = 8 << 20;

/// `imgfs pull`: makes every block of every layer present and verified in
/// the cache, a bar per layer (bytes, rate, ETA). Zstd layers are complete
/// once indexed (their stream is spilled). Call from outside the runtime.
pub fn warm(
    prepared: &Prepared,
    cache: &Cache,
    network: &Network,
    progress: &MultiProgress,
) -> Result<(), MountError> {
    let layers: Vec<_> = prepared
        .indexes
        .iter()
        .zip(&prepared.image.layers)
        .collect();
    for group in layers.chunks(PARALLEL_INDEXING) {
        std::thread::scope(|scope| {
            let jobs: Vec<_> = group
                .iter()
                .map(|(index, layer)| {
                    let bar = progress.add(warm_bar(layer));
                    scope.spawn(move || {
                        let result = warm_layer(prepared, cache, network, index, layer, &bar);
                        bar.finish();
                        result
                    })
                })
                .collect();
            jobs.into_iter().try_for_each(|job| {
                job.join()
                    .map_err(|_| MountError::Internal("a warming thread panicked".into()))?
            })
        })?;
    }
    Ok(())
}

fn warm_layer(
    prepared: &Prepared,
    cache: &Cache,
    network: &Network,
    index: &Index,
    layer: &LayerDescriptor,
    bar: &ProgressBar,
) -> Result<(), MountError> {
    if matches!(index.access, Access::Spill) {
        bar.set_position(bar.length().unwrap_or(0));
        return Ok(());
    }
    let (source, _) = layer_source(prepared, cache, network, index, layer)?;
    let size = index.source_size();
    bar.set_length(size);
    let mut offset = 0;
    while offset < size {
        let len = WARM_CHUNK.min(size - offset);
        source.read_at(offset, len as usize)?;
        offset += len;
        bar.set_position(offset);
    }
    if bar.is_hidden() {
        // No terminal: one plain line per layer instead of a bar.
        eprintln!("fetched {} ({size} bytes)", layer.blob.digest);
    }
    Ok(())
}

fn warm_bar(layer: &LayerDescriptor) -> ProgressBar {
    let bar = layer_bar(layer);
    bar.set_prefix(format!("fetching {}", &layer.blob.digest.hex()[..12]));
    bar
}

/// What a mount fetches in the background once it is live.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, clap::ValueEnum)]
pub enum Prefetch {
    /// Only what is read.
    None,
    /// The files an eStargz layer marks as needed at start (those before its
    /// `.prefetch.landmark`); nothing for other layers.
    #[default]
    Landmark,
    /// Every block of every layer.
    All,
}

/// How long on-demand reads must have left the network alone before
/// prefetching goes on.
const DEMAND_QUIET: Duration = Duration::from_millis(200);
/// Bytes asked for at once by prefetching: small, so a read that arrives
/// waits for little, and the rate stays smooth.
const PREFETCH_CHUNK: u64 = 1 << 20;
/// Niceness of the prefetching thread (its hashing competes with reads').
const PREFETCH_NICE: i32 = 10;
/// Longest single sleep, so a stop request is seen soon.
const PREFETCH_TICK: Duration = Duration::from_millis(50);

/// Stops background prefetching when dropped (the thread finishes the
/// chunk it is fetching and ends).
pub struct Prefetcher {
    stop: Arc<AtomicBool>,
}

impl Drop for Prefetcher {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Starts fetching `layers` in the background as `mode` says. `None` when
/// there is nothing to do.
///
/// The landmark region of each layer is what the image's first program
/// reads at once, so it is fetched now, every layer at the same time, each
/// in as few requests as the run limit allows, at full speed: a program
/// that reads those files meanwhile waits on the fetch in flight instead
/// of issuing one request per file, one round trip after another. `all`
/// is background work: at most `rate` bytes per second (0: no limit), in
/// small steps, stepping aside while on-demand reads fetch.
pub fn prefetch(
    layers: RemoteLayers,
    mode: Prefetch,
    rate: u64,
    demand: Arc<Demand>,
) -> Option<Prefetcher> {
    let work: Vec<(Arc<BlockSource>, u64)> = layers
        .0
        .into_iter()
        .filter_map(|layer| {
            let end = match mode {
                Prefetch::None => 0,
                Prefetch::Landmark => layer.landmark_end,
                Prefetch::All => layer.source.size(),
            };
            (end > 0).then_some((layer.source, end))
        })
        .collect();
    if work.is_empty() {
        return None;
    }
    let stop = Arc::new(AtomicBool::new(false));
    if mode == Prefetch::Landmark {
        for (layer, end) in work {
            spawn_prefetch(move || match layer.prefetch(0, end) {
                Ok(()) => tracing::info!(bytes = end, "landmark region prefetched"),
                Err(e) => tracing::warn!(error = %e, "landmark prefetch failed; reads fetch it"),
            });
        }
        return Some(Prefetcher { stop });
    }
    let flag = stop.clone();
    spawn_prefetch(move || {
        lower_priority();
        let mut bucket = TokenBucket::new(rate);
        for (layer, end) in &work {
            if let Err(e) = prefetch_layer(layer, *end, &mut bucket, &demand, &flag) {
                tracing::warn!(error = %e, "background prefetch stopped");
                return;
            }
        }
        tracing::info!("background prefetch done");
    });
    Some(Prefetcher { stop })
}

fn spawn_prefetch(work: impl FnOnce() + Send + 'static) {
    let spawned = std::thread::Builder::new()
        .name("imgfs-prefetch".into())
        .spawn(work);
    if let Err(e) = spawned {
        tracing::warn!(error = %e, "no background prefetch");
    }
}

/// Prefetches `layer` from its start to `end`.
fn prefetch_layer(
    layer: &BlockSource,
    end: u64,
    bucket: &mut TokenBucket,
    demand: &Demand,
    stop: &AtomicBool,
) -> Result<(), layer::SourceError> {
    let mut offset = 0;
    while offset < end {
        loop {
            if stop.load(Ordering::Relaxed) {
                return Ok(());
            }
            let wait = bucket.wait_needed();
            if wait.is_zero() && demand.quiet_for(DEMAND_QUIET) {
                break;
            }
            std::thread::sleep(wait.clamp(Duration::from_millis(1), PREFETCH_TICK));
        }
        let len = PREFETCH_CHUNK.min(end - offset);
        let before = layer.fetched_bytes();
        layer.prefetch(offset, len)?;
        // Blocks already cached cost nothing.
        bucket.spend(layer.fetched_bytes() - before);
        offset += len;
    }
    Ok(())
}

/// Best effort: this thread only (Linux nice values are per thread).
fn lower_priority() {
    let tid = std::fs::read_link("/proc/thread-self")
        .ok()
        .and_then(|p| p.file_name()?.to_str()?.parse::<i32>().ok())
        .and_then(rustix::process::Pid::from_raw);
    if let Some(tid) = tid
        && let Err(e) = rustix::process::setpriority_process(Some(tid), PREFETCH_NICE)
    {
        tracing::debug!(error = %e, "prefetch runs at normal priority");
    }
}

/// Bytes per second, paid after the fact: a fetch may overdraw, and the
/// next one waits until the debt is paid. Holds at most one chunk of
/// credit, so an idle spell does not allow a burst.
struct TokenBucket {
    rate: u64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    fn new(rate: u64) -> Self {
        TokenBucket {
            rate,
            tokens: 0.0,
            last: Instant::now(),
        }
    }

    fn refill(&mut self) {
        let now = Instant::now();
        let earned = now.duration_since(self.last).as_secs_f64() * self.rate as f64;
        self.tokens = (self.tokens + earned).min(PREFETCH_CHUNK as f64);
        self.last = now;
    }

    /// How long until the next fetch may start.
    fn wait_needed(&mut self) -> Duration {
        if self.rate == 0 {
            return Duration::ZERO;
        }
        self.refill();
        if self.tokens >= 0.0 {
            return Duration::ZERO;
        }
        Duration::from_secs_f64(-self.tokens / self.rate as f64)
    }

    fn spend(&mut self, bytes: u64) {
        if self.rate != 0 {
            self.tokens -= bytes as f64;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_bucket_makes_fetches_wait_for_their_bytes() {
        let mut bucket = TokenBucket::new(1 << 20);
        assert_eq!(bucket.wait_needed(), Duration::ZERO);
        bucket.spend(2 << 20);
        let wait = bucket.wait_needed();
        assert!(
            wait > Duration::from_millis(1900) && wait <= Duration::from_secs(2),
            "{wait:?}"
        );
        let mut unlimited = TokenBucket::new(0);
        unlimited.spend(u64::MAX);
        assert_eq!(unlimited.wait_needed(), Duration::ZERO);
    }

    /// How long the on-demand fetch of the test below takes.
    const SLOW_READ: Duration = Duration::from_millis(300);

    /// An in-memory blob whose first block is slow, logging when each
    /// request started and ended.
    struct SlowStart {
        bytes: Vec<u8>,
        log: std::sync::Mutex<Vec<(u64, Instant, Instant)>>,
    }

    impl RangeFetcher for SlowStart {
        fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, layer::SourceError> {
            let began = Instant::now();
            if start == 0 {
                std::thread::sleep(SLOW_READ);
            }
            let out = self.bytes[start as usize..end as usize].to_vec();
            let mut log = self.log.lock().unwrap_or_else(|p| p.into_inner());
            log.push((start, began, Instant::now()));
            Ok(out)
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    #[test]
    fn prefetching_waits_while_reads_fetch_and_fetches_everything() {
        let block = u64::from(layer::BLOCK_SIZE);
        let size = PREFETCH_CHUNK * 3 + 123;
        let bytes: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
        let digests = bytes
            .chunks(block as usize)
            .map(|c| *Digest::of(c).as_bytes())
            .collect();
        let blob = Arc::new(SlowStart {
            bytes,
            log: std::sync::Mutex::new(Vec::new()),
        });
        let dir = tempfile::tempdir().expect("temp dir");
        let demand = Arc::new(Demand::default());
        let source = Arc::new(
            BlockSource::open(&dir.path().join("blob"), size, digests, blob.clone())
                .expect("open")
                .with_demand(demand.clone()),
        );
        let reader = {
            let source = source.clone();
            std::thread::spawn(move || source.read_at(0, 10))
        };
        // Let the read's fetch begin before prefetching does (by the demand
        // it registers, not by a sleep: this must hold on a loaded machine).
        let deadline = Instant::now() + Duration::from_secs(10);
        while demand.quiet_for(Duration::ZERO) {
            assert!(Instant::now() < deadline, "the read never started fetching");
            std::thread::sleep(Duration::from_millis(1));
        }
        let mut bucket = TokenBucket::new(0);
        prefetch_layer(
            &source,
            source.size(),
            &mut bucket,
            &demand,
            &AtomicBool::new(false),
        )
        .expect("prefetch");
        reader.join().expect("reader").expect("read");
        let log = blob.log.lock().expect("log").clone();
        let (_, _, read_end) = log.iter().find(|r| r.0 == 0).copied().expect("the read");
        for &(start, began, _) in log.iter().filter(|r| r.0 != 0) {
            assert!(
                // Demand keeps whole milliseconds: allow one of rounding.
                began + Duration::from_millis(1) >= read_end + DEMAND_QUIET,
                "prefetch of {start} began {:?} after the read ended",
                began.saturating_duration_since(read_end)
            );
        }
        assert_eq!(source.fetched_bytes(), size, "every byte fetched once");
    }
}
