//! Verified bytes of a layer blob, from the cache or fetched by Range.
//!
//! [`BlockSource`] serves any byte range of a blob in whole
//! [`BLOCK_SIZE`](crate::layer::BLOCK_SIZE) blocks, each checked against the
//! digest the verified indexing pass recorded. Blocks live in one sparse cache
//! file per blob, at their own offsets; a block is trusted after its first
//! successful check in this process (a hole or a torn write fails the check
//! and is simply fetched again). Concurrent readers of the same missing block
//! wait for one fetch; neighbouring missing blocks go out as one Range request.
//! Across processes sharing the cache, a fetch holds an flock on a lock file
//! per stripe of [`MAX_RUN_BLOCKS`] blocks and looks at the cache file again
//! once it has the lock, so two mounts of one cold layer fetch each block once.
//!
//! The same machinery serves a seekable (eStargz, zstd:chunked) layer: its
//! units are the chunks its TOC lists instead of fixed blocks, each fetched as
//! a compressed range, decompressed, checked against the TOC's digest and kept
//! *decompressed* in the cache file at its offset of the layer's chunk stream
//! (see [`crate::layer::Access::Chunked`]). Neighbouring chunks go out in one
//! Range request, and separate runs of one read go out in parallel.
//!
//! [`SpillSource`] does the same checks over a zstd layer's spilled stream.
//!
//! Background prefetching goes through the same path ([`BlockSource::prefetch`]);
//! [`Demand`] tells it when on-demand reads are fetching so it can step aside.

use crate::layer::{BLOCK_SIZE, BlobSource, Chunk, Codec, SourceError};
use sha2::{Digest as _, Sha256};
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Upper bound on one Range request, in blocks (8 MiB): big enough to fill a
/// link, small enough that one reader cannot monopolize it. Runs never cross
/// a multiple of it, so each run falls in one fetch-lock stripe.
const MAX_RUN_BLOCKS: u64 = 64;
/// How long a reader waits for a block another reader is fetching before it
/// gives up with an error (the fetch itself has its own, shorter, timeout).
const WAIT_FOR_OTHERS: Duration = Duration::from_secs(300);
/// Largest compressed run of chunks asked for in one Range request (a
/// single bigger chunk still goes out alone).
const MAX_RUN_BYTES: u64 = 8 << 20;
/// Chunks whose compressed ranges are closer than this are fetched together:
/// the gap (tar headers between files) costs less than a round trip.
const COALESCE_GAP: u64 = 64 << 10;
/// Piece size when hashing or decompressing a unit (bounds memory for
/// multi-GiB single-chunk files).
const IO_PIECE: usize = 1 << 20;

/// Fetches bytes [start, end) of a blob from wherever it lives (the registry,
/// a foreign URL). Implementations bound their own retries and time.
pub trait RangeFetcher: Send + Sync {
    fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, SourceError>;
    /// Names the blob in errors (`registry/repo@digest`).
    fn describe(&self) -> String;
}

/// On-demand fetches in progress and when the last one ended, shared by
/// every source of a mount so background prefetching yields to them.
pub struct Demand {
    active: AtomicUsize,
    /// Milliseconds after `epoch` at which the last on-demand fetch ended.
    last_end_ms: AtomicU64,
    epoch: Instant,
}

impl Default for Demand {
    fn default() -> Self {
        Demand {
            active: AtomicUsize::new(0),
            last_end_ms: AtomicU64::new(0),
            epoch: Instant::now(),
        }
    }
}

impl Demand {
    /// True when no on-demand fetch is running and none ended in `quiet`.
    pub fn quiet_for(&self, quiet: Duration) -> bool {
        if self.active.load(Ordering::Acquire) > 0 {
            return false;
        }
        let last = self.last_end_ms.load(Ordering::Acquire);
        let now = self.now_ms();
        last == 0 || now.saturating_sub(last) >= quiet.as_millis() as u64
    }

    fn now_ms(&self) -> u64 {
        // Never 0, which means "no fetch yet".
        (self.epoch.elapsed().as_millis() as u64).max(1)
    }

    fn begin(self: &Arc<Self>) -> DemandGuard {
        self.active.fetch_add(1, Ordering::AcqRel);
        DemandGuard(self.clone())
    }
}

/// Ends an on-demand fetch when dropped, even on error.
struct DemandGuard(Arc<Demand>);

impl Drop for DemandGuard {
    fn drop(&mut self) {
        let now = self.0.now_ms();
        self.0.last_end_ms.store(now, Ordering::Release);
        self.0.active.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Who asked for a block: a reader waiting on it, or background prefetching.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Why {
    Read,
    Prefetch,
}

/// Block-digest bookkeeping shared by both sources.
struct Blocks {
    digests: Vec<[u8; 32]>,
    size: u64,
}

impl Blocks {
    fn range(&self, offset: u64, len: usize) -> Option<(u64, u64, u64)> {
        let end = offset.saturating_add(len as u64).min(self.size);
        if offset >= end {
            return None;
        }
        let bs = u64::from(BLOCK_SIZE);
        Some((offset / bs, (end - 1) / bs, end))
    }

    fn bounds(&self, block: u64) -> (u64, u64) {
        let bs = u64::from(BLOCK_SIZE);
        let start = block * bs;
        (start, (start + bs).min(self.size))
    }

    fn check(&self, block: u64, bytes: &[u8]) -> bool {
        let Some(want) = usize::try_from(block)
            .ok()
            .and_then(|b| self.digests.get(b))
        else {
            return false;
        };
        crate::digest::Digest::of(bytes).as_bytes() == want
    }

    fn count(&self) -> u64 {
        self.size.div_ceil(u64::from(BLOCK_SIZE))
    }
}

/// What a [`BlockSource`] serves, unit by unit: fixed blocks of the blob
/// itself, or the chunks of a seekable layer.
enum Units {
    Blocks(Blocks),
    Chunks {
        codec: Codec,
        chunks: Vec<Chunk>,
        size: u64,
    },
}

impl Units {
    fn size(&self) -> u64 {
        match self {
            Units::Blocks(b) => b.size,
            Units::Chunks { size, .. } => *size,
        }
    }

    fn count(&self) -> u64 {
        match self {
            Units::Blocks(b) => b.count(),
            Units::Chunks { chunks, .. } => chunks.len() as u64,
        }
    }

    /// First and last unit covering `offset..offset + len`, and the clamped end.
    fn range(&self, offset: u64, len: usize) -> Option<(u64, u64, u64)> {
        let chunks = match self {
            Units::Blocks(b) => return b.range(offset, len),
            Units::Chunks { chunks, .. } => chunks,
        };
        let end = offset.saturating_add(len as u64).min(self.size());
        if offset >= end {
            return None;
        }
        let unit_at = |at: u64| chunks.partition_point(|c| c.stream_offset + c.len <= at) as u64;
        Some((unit_at(offset), unit_at(end - 1), end))
    }

    /// Where the unit lies in the served address space.
    fn bounds(&self, unit: u64) -> (u64, u64) {
        match self {
            Units::Blocks(b) => b.bounds(unit),
            Units::Chunks { chunks, .. } => {
                let c = &chunks[unit as usize];
                (c.stream_offset, c.stream_offset + c.len)
            }
        }
    }

    fn digest(&self, unit: u64) -> Option<&[u8; 32]> {
        let unit = usize::try_from(unit).ok()?;
        match self {
            Units::Blocks(b) => b.digests.get(unit),
            Units::Chunks { chunks, .. } => chunks.get(unit).map(|c| &c.digest),
        }
    }

    /// The bytes to fetch for units `first..=last`.
    fn fetch_range(&self, first: u64, last: u64) -> (u64, u64) {
        match self {
            Units::Blocks(b) => (b.bounds(first).0, b.bounds(last).1),
            Units::Chunks { chunks, .. } => {
                let run = &chunks[first as usize..=last as usize];
                let start = run.iter().map(|c| c.blob_start).min().unwrap_or(0);
                let end = run.iter().map(|c| c.blob_end).max().unwrap_or(0);
                (start, end)
            }
        }
    }

    /// Whether `next` may join a run that starts with unit `first`: it is
    /// the following unit, in the same lock stripe, and (for chunks) close
    /// by in the blob without making the request too large.
    fn joins(&self, first: u64, prev: u64, next: u64) -> bool {
        if next != prev + 1 || next % MAX_RUN_BLOCKS == 0 {
            return false;
        }
        match self {
            Units::Blocks(_) => true,
            Units::Chunks { chunks, .. } => {
                let (p, n) = (&chunks[prev as usize], &chunks[next as usize]);
                let start = chunks[first as usize].blob_start.min(n.blob_start);
                n.blob_start >= p.blob_start
                    && n.blob_start <= p.blob_end.saturating_add(COALESCE_GAP)
                    && n.blob_end.saturating_sub(start) <= MAX_RUN_BYTES
            }
        }
    }

    /// Groups sorted unit numbers into runs fetched by one request each.
    fn runs<'a>(&self, units: &'a [u64]) -> Vec<&'a [u64]> {
        let mut out = Vec::new();
        let mut start = 0;
        for i in 1..=units.len() {
            if i == units.len() || !self.joins(units[start], units[i - 1], units[i]) {
                out.push(&units[start..i]);
                start = i;
            }
        }
        out
    }
}

/// sha256 of `len` bytes of `file` at `offset`, read in pieces.
fn hash_file_range(file: &File, offset: u64, len: u64) -> std::io::Result<[u8; 32]> {
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; IO_PIECE.min(len as usize)];
    let mut done = 0;
    while done < len {
        let n = IO_PIECE.min((len - done) as usize);
        file.read_exact_at(&mut buf[..n], offset + done)?;
        hasher.update(&buf[..n]);
        done += n as u64;
    }
    Ok(hasher.finalize().into())
}

/// Decompresses a chunk out of its fetched compressed range into `file` at
/// its stream offset, checking its digest; at most `inner + len` bytes are
/// ever inflated, so a lying TOC cannot make this a decompression bomb.
fn land_chunk(file: &File, codec: Codec, chunk: &Chunk, compressed: &[u8]) -> Result<(), String> {
    let mut decoder: Box<dyn Read + '_> = match codec {
        Codec::Gzip => Box::new(flate2::read::GzDecoder::new(compressed)),
        Codec::Zstd => Box::new(
            zstd::stream::read::Decoder::with_buffer(compressed)
                .map_err(|e| format!("zstd: {e}"))?
                .single_frame(),
        ),
    };
    std::io::copy(&mut (&mut decoder).take(chunk.inner), &mut std::io::sink())
        .map_err(|e| format!("decompressing: {e}"))?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; IO_PIECE.min(chunk.len as usize)];
    let mut done = 0u64;
    while done < chunk.len {
        let want = IO_PIECE.min((chunk.len - done) as usize);
        let n = decoder
            .read(&mut buf[..want])
            .map_err(|e| format!("decompressing: {e}"))?;
        if n == 0 {
            return Err(format!("decompresses to {done} of {} bytes", chunk.len));
        }
        hasher.update(&buf[..n]);
        // A failed cache write is caught by the digest check on the next read.
        if let Err(e) = file.write_all_at(&buf[..n], chunk.stream_offset + done) {
            tracing::warn!(error = %e, "could not write a fetched chunk to the cache");
        }
        done += n as u64;
    }
    let actual: [u8; 32] = hasher.finalize().into();
    if actual != chunk.digest {
        return Err("does not match the chunk digest in the verified TOC".into());
    }
    Ok(())
}

#[derive(Default)]
struct State {
    verified: Vec<bool>,
    in_flight: HashSet<u64>,
}

/// See the module doc.
pub struct BlockSource {
    units: Units,
    file: File,
    fetcher: Arc<dyn RangeFetcher>,
    state: Mutex<State>,
    landed: Condvar,
    fetched: AtomicU64,
    /// `PREFIX.<stripe>` lock files shared with other processes, if any.
    fetch_locks: Option<PathBuf>,
    demand: Option<Arc<Demand>>,
}

impl BlockSource {
    /// `cache_file` is created sparse if absent.
    pub fn open(
        cache_file: &Path,
        blob_size: u64,
        digests: Vec<[u8; 32]>,
        fetcher: Arc<dyn RangeFetcher>,
    ) -> std::io::Result<BlockSource> {
        let units = Units::Blocks(Blocks {
            digests,
            size: blob_size,
        });
        Self::with_units(cache_file, units, fetcher)
    }

    /// A source over a seekable layer's chunks: serves the chunk stream, and
    /// keeps verified chunks decompressed in `cache_file`.
    pub fn chunked(
        cache_file: &Path,
        codec: Codec,
        chunks: Vec<Chunk>,
        stream_size: u64,
        fetcher: Arc<dyn RangeFetcher>,
    ) -> std::io::Result<BlockSource> {
        let units = Units::Chunks {
            codec,
            chunks,
            size: stream_size,
        };
        Self::with_units(cache_file, units, fetcher)
    }

    fn with_units(
        cache_file: &Path,
        units: Units,
        fetcher: Arc<dyn RangeFetcher>,
    ) -> std::io::Result<BlockSource> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(cache_file)?;
        let state = State {
            verified: vec![false; usize::try_from(units.count()).unwrap_or(0)],
            in_flight: HashSet::new(),
        };
        Ok(BlockSource {
            units,
            file,
            fetcher,
            state: Mutex::new(state),
            landed: Condvar::new(),
            fetched: AtomicU64::new(0),
            fetch_locks: None,
            demand: None,
        })
    }

    /// Records this source's on-demand fetches in `demand`.
    pub fn with_demand(mut self, demand: Arc<Demand>) -> BlockSource {
        self.demand = Some(demand);
        self
    }

    /// Size of what this source serves: the blob, or a chunked layer's stream.
    pub fn size(&self) -> u64 {
        self.units.size()
    }

    /// Makes the blocks covering `offset..offset + len` verified in the
    /// cache without reading them out, and without counting as demand.
    pub fn prefetch(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        let len = usize::try_from(len).unwrap_or(usize::MAX);
        match self.units.range(offset, len) {
            Some((first, last, _)) => self.ensure(first, last, Why::Prefetch),
            None => Ok(()),
        }
    }

    /// Coordinates fetches with other processes through lock files named
    /// `prefix.<stripe>` (created as needed).
    pub fn with_fetch_locks(mut self, prefix: PathBuf) -> BlockSource {
        self.fetch_locks = Some(prefix);
        self
    }

    /// Bytes fetched from the network by this source so far.
    pub fn fetched_bytes(&self) -> u64 {
        self.fetched.load(Ordering::Relaxed)
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Makes every block in `first..=last` verified on disk.
    fn ensure(&self, first: u64, last: u64, why: Why) -> Result<(), SourceError> {
        let deadline = Instant::now() + WAIT_FOR_OTHERS;
        loop {
            let (claimed, waiting) = self.claim(first, last);
            let result = self.fill(&claimed, why);
            self.release(&claimed, result.is_ok());
            result?;
            if !waiting {
                return Ok(());
            }
            self.wait_for_others(first, last, deadline)?;
        }
    }

    /// Claims the unverified blocks nobody is fetching; tells whether some
    /// are being fetched by another reader.
    fn claim(&self, first: u64, last: u64) -> (Vec<u64>, bool) {
        let mut state = self.lock();
        let mut claimed = Vec::new();
        let mut waiting = false;
        for block in first..=last {
            if state.verified[block as usize] {
                continue;
            }
            if state.in_flight.insert(block) {
                claimed.push(block);
            } else {
                waiting = true;
            }
        }
        (claimed, waiting)
    }

    fn release(&self, claimed: &[u64], ok: bool) {
        let mut state = self.lock();
        for &block in claimed {
            state.in_flight.remove(&block);
            if ok {
                state.verified[block as usize] = true;
            }
        }
        drop(state);
        self.landed.notify_all();
    }

    fn wait_for_others(&self, first: u64, last: u64, deadline: Instant) -> Result<(), SourceError> {
        let mut state = self.lock();
        while (first..=last).any(|b| state.in_flight.contains(&b)) {
            let left = deadline.saturating_duration_since(Instant::now());
            if left.is_zero() {
                return Err(SourceError(format!(
                    "{}: timed out waiting for another reader's fetch",
                    self.fetcher.describe()
                )));
            }
            state = self
                .landed
                .wait_timeout(state, left)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        Ok(())
    }

    /// Checks the claimed units already on disk; fetches the rest in runs,
    /// several runs at once.
    fn fill(&self, claimed: &[u64], why: Why) -> Result<(), SourceError> {
        let missing: Vec<u64> = claimed
            .iter()
            .copied()
            .filter(|&unit| !self.on_disk(unit))
            .collect();
        let runs = self.units.runs(&missing);
        if runs.len() <= 1 {
            return runs.iter().try_for_each(|run| self.fill_run(run, why));
        }
        std::thread::scope(|scope| {
            let jobs: Vec<_> = runs
                .iter()
                .map(|run| scope.spawn(move || self.fill_run(run, why)))
                .collect();
            jobs.into_iter().try_for_each(|job| {
                job.join()
                    .unwrap_or_else(|_| Err(SourceError("a fetching thread panicked".into())))
            })
        })
    }

    /// Fetches one run under its stripe's cross-process lock.
    fn fill_run(&self, run: &[u64], why: Why) -> Result<(), SourceError> {
        let stripe = self.lock_stripe(run[0]);
        // Another process may have fetched these while we waited.
        let still: Vec<u64> = match stripe {
            Some(_) => run.iter().copied().filter(|&u| !self.on_disk(u)).collect(),
            None => run.to_vec(),
        };
        for part in self.units.runs(&still) {
            let _demand = match (&self.demand, why) {
                (Some(demand), Why::Read) => Some(demand.begin()),
                _ => None,
            };
            self.fetch_run(part[0], part[part.len() - 1])?;
        }
        Ok(())
    }

    /// Holds the cross-process lock of `block`'s stripe; `None` when
    /// there are no lock files or the lock cannot be had (then fetching
    /// twice is the only cost).
    fn lock_stripe(&self, block: u64) -> Option<File> {
        let prefix = self.fetch_locks.as_ref()?;
        let mut name = prefix.as_os_str().to_owned();
        name.push(format!(".{}", block / MAX_RUN_BLOCKS));
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(PathBuf::from(name))
            .map_err(|e| tracing::debug!(error = %e, "no fetch lock"))
            .ok()?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| tracing::debug!(error = %e, "no fetch lock"))
            .ok()?;
        Some(file)
    }

    fn on_disk(&self, unit: u64) -> bool {
        let (start, end) = self.units.bounds(unit);
        let hashed = hash_file_range(&self.file, start, end - start);
        matches!((hashed, self.units.digest(unit)), (Ok(h), Some(want)) if h == *want)
    }

    fn fetch_run(&self, first: u64, last: u64) -> Result<(), SourceError> {
        let (start, end) = self.units.fetch_range(first, last);
        let bytes = self.fetcher.fetch(start, end)?;
        if bytes.len() as u64 != end - start {
            return Err(SourceError(format!(
                "{}: bytes {start}-{end}: got {} bytes",
                self.fetcher.describe(),
                bytes.len()
            )));
        }
        self.fetched
            .fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let blocks = match &self.units {
            Units::Blocks(blocks) => blocks,
            Units::Chunks { codec, chunks, .. } => {
                return self.land_chunks(
                    *codec,
                    &chunks[first as usize..=last as usize],
                    start,
                    &bytes,
                );
            }
        };
        for block in first..=last {
            let (b_start, b_end) = blocks.bounds(block);
            let slice = &bytes[(b_start - start) as usize..(b_end - start) as usize];
            if !blocks.check(block, slice) {
                return Err(SourceError(format!(
                    "{}: bytes {b_start}-{b_end} do not match the digest recorded when the layer was indexed",
                    self.fetcher.describe()
                )));
            }
        }
        // Verified as a whole; a failed cache write only costs a refetch.
        if let Err(e) = self.file.write_all_at(&bytes, start) {
            tracing::warn!(error = %e, "could not write fetched blocks to the cache");
        }
        Ok(())
    }
}

impl BlockSource {
    /// Decompresses and verifies each chunk of a fetched run into the cache.
    fn land_chunks(
        &self,
        codec: Codec,
        run: &[Chunk],
        start: u64,
        bytes: &[u8],
    ) -> Result<(), SourceError> {
        for chunk in run {
            let compressed =
                &bytes[(chunk.blob_start - start) as usize..(chunk.blob_end - start) as usize];
            land_chunk(&self.file, codec, chunk, compressed).map_err(|reason| {
                SourceError(format!(
                    "{}: chunk at bytes {}-{}: {reason}",
                    self.fetcher.describe(),
                    chunk.blob_start,
                    chunk.blob_end
                ))
            })?;
        }
        Ok(())
    }
}

impl BlobSource for BlockSource {
    fn prefetch(&self, offset: u64, len: u64) -> Result<(), SourceError> {
        BlockSource::prefetch(self, offset, len)
    }

    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let Some((first, last, end)) = self.units.range(offset, len) else {
            return Ok(Vec::new());
        };
        self.ensure(first, last, Why::Read)?;
        let mut out = vec![0u8; (end - offset) as usize];
        self.file
            .read_exact_at(&mut out, offset)
            .map_err(|e| SourceError(format!("{}: cache read: {e}", self.fetcher.describe())))?;
        Ok(out)
    }
}

/// The decompressed stream of a zstd layer kept in the cache, verified block
/// by block on first use. A block that fails is an error (the layer must be
/// indexed again), never served.
pub struct SpillSource {
    blocks: Blocks,
    file: File,
    verified: Mutex<Vec<bool>>,
    name: String,
}

impl SpillSource {
    pub fn open(
        path: &Path,
        stream_size: u64,
        digests: Vec<[u8; 32]>,
    ) -> std::io::Result<SpillSource> {
        let file = File::open(path)?;
        let blocks = Blocks {
            digests,
            size: stream_size,
        };
        let count = usize::try_from(blocks.count()).unwrap_or(0);
        Ok(SpillSource {
            blocks,
            file,
            verified: Mutex::new(vec![false; count]),
            name: path.display().to_string(),
        })
    }
}

impl BlobSource for SpillSource {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let Some((first, last, end)) = self.blocks.range(offset, len) else {
            return Ok(Vec::new());
        };
        for block in first..=last {
            let done = self.verified.lock().unwrap_or_else(|p| p.into_inner())[block as usize];
            if done {
                continue;
            }
            let (start, b_end) = self.blocks.bounds(block);
            let mut buf = vec![0u8; (b_end - start) as usize];
            let ok =
                self.file.read_exact_at(&mut buf, start).is_ok() && self.blocks.check(block, &buf);
            if !ok {
                return Err(SourceError(format!(
                    "{}: bytes {start}-{b_end} do not match the index; remove the layer from the cache",
                    self.name
                )));
            }
            self.verified.lock().unwrap_or_else(|p| p.into_inner())[block as usize] = true;
        }
        let mut out = vec![0u8; (end - offset) as usize];
        self.file
            .read_exact_at(&mut out, offset)
            .map_err(|e| SourceError(format!("{}: {e}", self.name)))?;
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;

    const FAKE_LATENCY: Duration = Duration::from_millis(30);

    /// A blob held in memory that counts requests and can be told to fail,
    /// standing in for the network in these unit tests of the block logic.
    struct MemoryBlob {
        bytes: Vec<u8>,
        requests: Mutex<Vec<(u64, u64)>>,
        corrupt: bool,
    }

    impl RangeFetcher for MemoryBlob {
        fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, SourceError> {
            self.requests.lock().expect("lock").push((start, end));
            // Long enough for concurrent readers to overlap, as on a network.
            std::thread::sleep(FAKE_LATENCY);
            let mut out = self.bytes[start as usize..end as usize].to_vec();
            if self.corrupt {
                out[0] ^= 1;
            }
            Ok(out)
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    fn digests(bytes: &[u8]) -> Vec<[u8; 32]> {
        bytes
            .chunks(BLOCK_SIZE as usize)
            .map(|c| *Digest::of(c).as_bytes())
            .collect()
    }

    fn setup(corrupt: bool) -> (tempfile::TempDir, Arc<MemoryBlob>, BlockSource) {
        let bytes: Vec<u8> = (0..(BLOCK_SIZE as usize * 5 + 777))
            .map(|i| (i * 7 % 251) as u8)
            .collect();
        let dir = tempfile::tempdir().expect("tempdir");
        let blob = Arc::new(MemoryBlob {
            bytes,
            requests: Mutex::new(vec![]),
            corrupt,
        });
        let source = BlockSource::open(
            &dir.path().join("blob"),
            blob.bytes.len() as u64,
            digests(&blob.bytes),
            blob.clone(),
        )
        .expect("open");
        (dir, blob, source)
    }

    #[test]
    fn reads_fetch_whole_blocks_once_and_coalesce() {
        let (dir, blob, source) = setup(false);
        let bs = BLOCK_SIZE as u64;
        let got = source.read_at(bs - 10, (bs * 2) as usize).expect("read");
        assert_eq!(got, blob.bytes[(bs - 10) as usize..(3 * bs - 10) as usize]);
        assert_eq!(*blob.requests.lock().expect("lock"), vec![(0, 3 * bs)]);
        // Cached now: no new request, and the tail block is short.
        let tail = source.read_at(5 * bs, 10_000).expect("tail");
        assert_eq!(tail, blob.bytes[(5 * bs) as usize..]);
        let again = source.read_at(0, 100).expect("again");
        assert_eq!(again, blob.bytes[..100]);
        assert_eq!(blob.requests.lock().expect("lock").len(), 2);
        // A new source over the same file trusts nothing until checked, and
        // checking the cached blocks needs no fetch.
        let reopened = BlockSource::open(
            &dir.path().join("blob"),
            blob.bytes.len() as u64,
            digests(&blob.bytes),
            blob.clone(),
        )
        .expect("reopen");
        assert_eq!(reopened.read_at(0, 100).expect("read"), blob.bytes[..100]);
        assert_eq!(blob.requests.lock().expect("lock").len(), 2);
    }

    #[test]
    fn corrupted_bytes_are_never_served() {
        let (_dir, _blob, source) = setup(true);
        let err = source.read_at(0, 10).expect_err("must fail");
        assert!(err.0.contains("do not match"), "{err}");
    }

    #[test]
    fn tampered_cache_file_is_refetched() {
        let (dir, blob, source) = setup(false);
        source.read_at(0, 10).expect("read");
        drop(source);
        let path = dir.path().join("blob");
        let file = OpenOptions::new().write(true).open(&path).expect("open");
        file.write_all_at(b"XX", 3).expect("write");
        let fresh = BlockSource::open(
            &path,
            blob.bytes.len() as u64,
            digests(&blob.bytes),
            blob.clone(),
        )
        .expect("reopen");
        assert_eq!(fresh.read_at(0, 10).expect("read"), blob.bytes[..10]);
        assert_eq!(blob.requests.lock().expect("lock").len(), 2);
    }

    #[test]
    fn concurrent_readers_share_one_fetch() {
        let (_dir, blob, source) = setup(false);
        let source = Arc::new(source);
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let source = source.clone();
                std::thread::spawn(move || source.read_at(0, BLOCK_SIZE as usize).expect("read"))
            })
            .collect();
        for t in threads {
            assert_eq!(t.join().expect("join"), blob.bytes[..BLOCK_SIZE as usize]);
        }
        assert_eq!(blob.requests.lock().expect("lock").len(), 1);
    }

    #[test]
    fn sources_sharing_a_cache_file_fetch_each_block_once() {
        let (dir, blob, first) = setup(false);
        let locks = dir.path().join("blob-fetch");
        let first = Arc::new(first.with_fetch_locks(locks.clone()));
        // A second "process": its own descriptor, its own in-flight set.
        let second = Arc::new(
            BlockSource::open(
                &dir.path().join("blob"),
                blob.bytes.len() as u64,
                digests(&blob.bytes),
                blob.clone(),
            )
            .expect("open")
            .with_fetch_locks(locks),
        );
        let threads: Vec<_> = [first, second]
            .into_iter()
            .map(|source| std::thread::spawn(move || source.read_at(0, 3 * BLOCK_SIZE as usize)))
            .collect();
        for t in threads {
            let got = t.join().expect("join").expect("read");
            assert_eq!(got, blob.bytes[..3 * BLOCK_SIZE as usize]);
        }
        assert_eq!(blob.requests.lock().expect("lock").len(), 1);
    }

    #[test]
    fn reads_count_as_demand_and_prefetching_does_not() {
        let (_dir, blob, source) = setup(false);
        let demand = Arc::new(Demand::default());
        let source = source.with_demand(demand.clone());
        let quiet = Duration::from_secs(60);
        source.prefetch(0, 2 * BLOCK_SIZE as u64).expect("prefetch");
        assert!(demand.quiet_for(quiet), "prefetching is not demand");
        // Already there: no fetch, still quiet.
        source.read_at(0, 10).expect("cached read");
        assert!(demand.quiet_for(quiet));
        source
            .read_at(3 * BLOCK_SIZE as u64, 10)
            .expect("cold read");
        assert!(!demand.quiet_for(quiet), "a cold read is demand");
        assert!(demand.quiet_for(Duration::ZERO));
        assert_eq!(blob.requests.lock().expect("lock").len(), 2);
    }

    #[test]
    fn runs_split_on_gaps_and_length() {
        let blocks: Vec<u64> = (0..70).chain([100, 101, 103]).collect();
        let units = Units::Blocks(Blocks {
            digests: Vec::new(),
            size: 0,
        });
        let lens: Vec<usize> = units.runs(&blocks).iter().map(|r| r.len()).collect();
        assert_eq!(lens, [64, 6, 2, 1]);
        // Runs stop at stripe boundaries, wherever they start.
        let blocks: Vec<u64> = (60..200).collect();
        let lens: Vec<usize> = units.runs(&blocks).iter().map(|r| r.len()).collect();
        assert_eq!(lens, [4, 64, 64, 8]);
    }
}
