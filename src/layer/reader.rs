//! Reading the bytes of a file of an indexed layer.
//!
//! A file's offsets map to offsets of the uncompressed tar stream (through
//! its sparse map, if any); stream bytes come from the [`BlobSource`], either
//! directly (`Tar`, `Spill`) or by inflating the gzip span around them from
//! its zran checkpoint. Inflated spans are kept in a small LRU so a file read
//! in many small pieces is inflated once, and concurrent readers of one span
//! wait for a single inflation instead of repeating it.

use crate::layer::zran::{self, ZranError};
use crate::layer::{
    Access, BlobSource, Checkpoint, FileData, Index, LayerError, Segment, SourceError,
};
use lru::LruCache;
use std::collections::HashSet;
use std::sync::{Arc, Condvar, Mutex, MutexGuard};

const MIB: usize = 1024 * 1024;
/// Bytes of inflated spans kept per layer.
const SPAN_CACHE_BYTES: usize = 32 * MIB;
/// Spans are a checkpoint spacing long plus at most one deflate block, so a
/// longer one comes from a pathological blob: such spans are inflated only
/// as far as a read needs and never cached.
const MAX_CACHED_SPAN: u64 = 64 * MIB as u64;

/// Reads file bytes of one layer; shared by all FUSE worker threads.
pub struct LayerReader {
    index: Arc<Index>,
    source: Arc<dyn BlobSource>,
    spans: Mutex<SpanCache>,
    span_ready: Condvar,
}

struct SpanCache {
    lru: LruCache<usize, Arc<Vec<u8>>>,
    bytes: usize,
    /// Spans some thread is inflating right now.
    inflight: HashSet<usize>,
}

impl LayerReader {
    pub fn new(index: Arc<Index>, source: Arc<dyn BlobSource>) -> Self {
        LayerReader {
            index,
            source,
            spans: Mutex::new(SpanCache {
                lru: LruCache::unbounded(),
                bytes: 0,
                inflight: HashSet::new(),
            }),
            span_ready: Condvar::new(),
        }
    }

    pub fn index(&self) -> &Arc<Index> {
        &self.index
    }

    /// Bytes [offset, offset+len) of a regular file entry (clamped at `size`;
    /// sparse holes read as zeros).
    pub fn read_file(
        &self,
        size: u64,
        data: &FileData,
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, LayerError> {
        if offset >= size || len == 0 {
            return Ok(Vec::new());
        }
        let n = usize::try_from(size - offset).map_or(len, |rest| rest.min(len));
        match data {
            FileData::Contiguous { offset: start } => {
                let at = start
                    .checked_add(offset)
                    .ok_or_else(|| self.short(u64::MAX, n))?;
                self.read_stream(at, n)
            }
            FileData::Sparse { segments } => self.read_sparse(segments, offset, n),
        }
    }

    fn read_sparse(
        &self,
        segments: &[Segment],
        offset: u64,
        n: usize,
    ) -> Result<Vec<u8>, LayerError> {
        let mut out = vec![0u8; n];
        let end = offset + n as u64;
        let first = segments.partition_point(|s| s.file_offset.saturating_add(s.len) <= offset);
        for segment in segments[first..].iter().take_while(|s| s.file_offset < end) {
            let lo = offset.max(segment.file_offset);
            let hi = end.min(segment.file_offset.saturating_add(segment.len));
            if hi <= lo {
                continue;
            }
            let bytes = self.read_stream(
                segment.stream_offset + (lo - segment.file_offset),
                (hi - lo) as usize,
            )?;
            let at = (lo - offset) as usize;
            out[at..at + bytes.len()].copy_from_slice(&bytes);
        }
        Ok(out)
    }

    /// Exactly `len` bytes of the uncompressed stream at `offset`.
    fn read_stream(&self, offset: u64, len: usize) -> Result<Vec<u8>, LayerError> {
        let bytes = match &self.index.access {
            Access::Tar | Access::Spill => self
                .source
                .read_at(offset, len)
                .map_err(|e| self.source_error(e))?,
            Access::Gzip { checkpoints } => self.read_gzip(checkpoints, offset, len)?,
        };
        if bytes.len() != len {
            return Err(self.short(offset, len));
        }
        Ok(bytes)
    }

    fn read_gzip(
        &self,
        checkpoints: &[Checkpoint],
        offset: u64,
        len: usize,
    ) -> Result<Vec<u8>, LayerError> {
        let mut out = Vec::with_capacity(len);
        let mut pos = offset;
        while out.len() < len {
            let i = checkpoints.partition_point(|cp| cp.out <= pos);
            let Some(i) = i.checked_sub(1) else {
                return Err(self.short(pos, len - out.len()));
            };
            let span_start = checkpoints[i].out;
            let span_end = self.span_end(checkpoints, i);
            if span_end <= pos {
                return Err(self.short(pos, len - out.len()));
            }
            let wanted =
                (len - out.len()).min(usize::try_from(span_end - pos).unwrap_or(usize::MAX));
            let skip = pos - span_start;
            let got = if span_end - span_start > MAX_CACHED_SPAN {
                let bytes = self.inflate_span(checkpoints, i, skip, wanted)?;
                out.extend_from_slice(&bytes);
                bytes.len()
            } else {
                let span = self.cached_span(checkpoints, i)?;
                let from = usize::try_from(skip).unwrap_or(usize::MAX).min(span.len());
                let take = wanted.min(span.len() - from);
                out.extend_from_slice(&span[from..from + take]);
                take
            };
            if got == 0 {
                return Err(self.short(pos, len - out.len()));
            }
            pos += got as u64;
        }
        Ok(out)
    }

    fn span_end(&self, checkpoints: &[Checkpoint], i: usize) -> u64 {
        checkpoints
            .get(i + 1)
            .map_or(self.index.stream_size, |next| next.out)
    }

    /// The whole inflated span `i`, from the LRU or inflated by this thread
    /// (once, even when several threads ask at the same time).
    fn cached_span(
        &self,
        checkpoints: &[Checkpoint],
        i: usize,
    ) -> Result<Arc<Vec<u8>>, LayerError> {
        let mut cache = self.lock_spans();
        loop {
            if let Some(span) = cache.lru.get(&i) {
                return Ok(Arc::clone(span));
            }
            if !cache.inflight.contains(&i) {
                break;
            }
            cache = self
                .span_ready
                .wait(cache)
                .unwrap_or_else(|poisoned| poisoned.into_inner());
        }
        cache.inflight.insert(i);
        drop(cache);
        let claim = InflightClaim {
            reader: self,
            span: i,
        };
        let want = usize::try_from(self.span_end(checkpoints, i) - checkpoints[i].out)
            .unwrap_or(usize::MAX);
        let span = Arc::new(self.inflate_span(checkpoints, i, 0, want)?);
        let mut cache = self.lock_spans();
        cache.bytes += span.len();
        if let Some(old) = cache.lru.put(i, Arc::clone(&span)) {
            cache.bytes -= old.len();
        }
        while cache.bytes > SPAN_CACHE_BYTES && cache.lru.len() > 1 {
            match cache.lru.pop_lru() {
                Some((_, evicted)) => cache.bytes -= evicted.len(),
                None => break,
            }
        }
        drop(cache);
        drop(claim);
        Ok(span)
    }

    /// Fetches the compressed bytes of span `i` and inflates `want` bytes
    /// after skipping `skip`.
    fn inflate_span(
        &self,
        checkpoints: &[Checkpoint],
        i: usize,
        skip: u64,
        want: usize,
    ) -> Result<Vec<u8>, LayerError> {
        let cp = &checkpoints[i];
        let blob_size = self.index.blob_size;
        let start = cp.inp.saturating_sub(zran::lead_in(cp));
        // One byte past the next checkpoint covers the block that ends in it.
        let end = checkpoints
            .get(i + 1)
            .map_or(blob_size, |next| next.inp.saturating_add(1).min(blob_size));
        let span_len = usize::try_from(end.saturating_sub(start)).map_err(|_| {
            self.gzip_error(ZranError {
                offset: start,
                reason: "span too large".into(),
            })
        })?;
        let compressed = self
            .source
            .read_at(start, span_len)
            .map_err(|e| self.source_error(e))?;
        let out =
            zran::inflate_from(cp, &compressed, skip, want).map_err(|e| self.gzip_error(e))?;
        if out.len() < want {
            return Err(self.gzip_error(ZranError {
                offset: start + compressed.len() as u64,
                reason: format!(
                    "span from checkpoint {i} inflated to {} bytes, expected {want}",
                    out.len()
                ),
            }));
        }
        Ok(out)
    }

    fn lock_spans(&self) -> MutexGuard<'_, SpanCache> {
        // The cache holds no invariant a panicking thread could break halfway.
        self.spans
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn source_error(&self, source: SourceError) -> LayerError {
        LayerError::Source {
            digest: self.index.layer_digest,
            source,
        }
    }

    fn gzip_error(&self, e: ZranError) -> LayerError {
        LayerError::Compression {
            digest: self.index.layer_digest,
            format: "gzip",
            offset: e.offset,
            reason: e.reason,
        }
    }

    fn short(&self, offset: u64, len: usize) -> LayerError {
        self.source_error(SourceError(format!(
            "stream offset {offset}: {len} bytes requested beyond the data available"
        )))
    }
}

/// Marks a span as being inflated; releasing it (also on error or panic)
/// wakes the threads waiting for that span.
struct InflightClaim<'a> {
    reader: &'a LayerReader,
    span: usize,
}

impl Drop for InflightClaim<'_> {
    fn drop(&mut self) {
        self.reader.lock_spans().inflight.remove(&self.span);
        self.reader.span_ready.notify_all();
    }
}
