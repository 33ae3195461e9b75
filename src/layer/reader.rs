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
    /// [`MAX_CACHED_SPAN`]; lowered by tests to exercise the uncached path.
    max_cached_span: u64,
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
            max_cached_span: MAX_CACHED_SPAN,
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

    /// Makes the blob bytes behind a file's data local without inflating
    /// them: a copy-up fetches a cold file this way before it takes the
    /// lock that holds up other changes.
    pub fn prefetch_file(&self, size: u64, data: &FileData) -> Result<(), LayerError> {
        let ranges: Vec<(u64, u64)> = match data {
            FileData::Contiguous { offset } => vec![(*offset, size)],
            FileData::Sparse { segments } => {
                segments.iter().map(|s| (s.stream_offset, s.len)).collect()
            }
        };
        for (start, len) in ranges {
            let (blob_start, blob_len) = self.blob_range(start, len);
            self.source
                .prefetch(blob_start, blob_len)
                .map_err(|e| self.source_error(e))?;
        }
        Ok(())
    }

    /// The blob bytes that hold stream bytes `start..start + len`: for gzip,
    /// from the checkpoint before `start` to one byte past the checkpoint
    /// after the end (as [`Self::inflate_span`] reads them).
    fn blob_range(&self, start: u64, len: u64) -> (u64, u64) {
        let Access::Gzip { checkpoints } = &self.index.access else {
            return (start, len);
        };
        let blob_size = self.index.blob_size;
        let end = start.saturating_add(len);
        let first = checkpoints
            .partition_point(|cp| cp.out <= start)
            .saturating_sub(1);
        let after = checkpoints.partition_point(|cp| cp.out < end);
        let from = checkpoints
            .get(first)
            .map_or(0, |cp| cp.inp.saturating_sub(zran::lead_in(cp)));
        let to = checkpoints
            .get(after)
            .map_or(blob_size, |next| next.inp.saturating_add(1).min(blob_size));
        (from, to.saturating_sub(from))
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
            Access::Tar | Access::Spill | Access::Chunked { .. } => self
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
            let got = if span_end - span_start > self.max_cached_span {
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::index::test_support::{MemSource, index_blob};
    use crate::layer::{Compression, IndexOptions, build_index};
    use flate2::write::GzEncoder;
    use std::io::Write;

    fn busybox_tar() -> (Vec<u8>, Vec<u8>) {
        let data = std::fs::read("/usr/bin/busybox").expect("busybox");
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o755);
        header.set_cksum();
        builder
            .append_data(&mut header, "bin/busybox", &data[..])
            .expect("append");
        (builder.into_inner().expect("tar"), data)
    }

    fn file_of(index: &Index) -> (u64, FileData) {
        match &index.entries[0].kind {
            crate::layer::EntryKind::File { size, data } => (*size, data.clone()),
            other => panic!("{other:?}"),
        }
    }

    /// zlib-rs at level 1 writes one deflate block for megabytes: the spans
    /// are huge, so reads inflate only what they need and nothing is cached.
    #[test]
    fn oversized_spans_are_read_without_caching() {
        let (tarball, data) = busybox_tar();
        let mut enc = GzEncoder::new(Vec::new(), flate2::Compression::new(1));
        enc.write_all(&tarball).expect("gzip");
        let blob = enc.finish().expect("gzip");
        let index = build_index(
            &blob[..],
            Compression::Gzip,
            Digest::of(&blob),
            blob.len() as u64,
            None,
            &IndexOptions {
                checkpoint_spacing: 4096,
            },
        )
        .expect("index");
        let index = Arc::new(index);
        let mut reader = LayerReader::new(Arc::clone(&index), Arc::new(MemSource(blob)));
        reader.max_cached_span = 1024;
        let (size, file) = file_of(&index);
        for (offset, len) in [
            (0u64, 100usize),
            (1_000_000, 131_072),
            (size - 10, 100),
            (12345, 1_500_000),
        ] {
            let got = reader.read_file(size, &file, offset, len).expect("read");
            let end = (offset as usize + len).min(data.len());
            assert!(got == data[offset as usize..end], "offset {offset}");
        }
        assert_eq!(reader.lock_spans().lru.len(), 0);
    }

    #[test]
    fn clamping_and_sparse_holes() {
        let (tarball, data) = busybox_tar();
        let (index, reader) = index_blob(&tarball, Compression::None, 0);
        let (size, file) = file_of(&index);
        assert!(
            reader
                .read_file(size, &file, size, 10)
                .expect("at end")
                .is_empty()
        );
        assert!(
            reader
                .read_file(size, &file, size + 5, 10)
                .expect("past end")
                .is_empty()
        );
        assert!(
            reader
                .read_file(size, &file, 0, 0)
                .expect("empty")
                .is_empty()
        );
        assert_eq!(
            reader.read_file(size, &file, size - 3, 100).expect("tail"),
            &data[data.len() - 3..]
        );

        let FileData::Contiguous { offset: base } = file else {
            panic!()
        };
        let sparse = FileData::Sparse {
            segments: vec![
                Segment {
                    file_offset: 10,
                    stream_offset: base,
                    len: 5,
                },
                Segment {
                    file_offset: 100,
                    stream_offset: base + 5,
                    len: 3,
                },
            ],
        };
        let got = reader.read_file(200, &sparse, 8, 100).expect("sparse");
        let mut want = vec![0u8; 100];
        want[2..7].copy_from_slice(&data[..5]);
        want[92..95].copy_from_slice(&data[5..8]);
        assert_eq!(got, want);
        assert_eq!(
            reader.read_file(200, &sparse, 150, 100).expect("hole tail"),
            vec![0u8; 50]
        );
    }

    /// A source that fails or lies surfaces as an error, never wrong bytes.
    #[test]
    fn failing_sources_are_errors() {
        struct Broken;
        impl BlobSource for Broken {
            fn read_at(&self, _: u64, _: usize) -> Result<Vec<u8>, SourceError> {
                Err(SourceError("registry unreachable".into()))
            }
        }
        struct Garbage;
        impl BlobSource for Garbage {
            fn read_at(&self, _: u64, len: usize) -> Result<Vec<u8>, SourceError> {
                Ok(vec![0xff; len])
            }
        }
        struct Short;
        impl BlobSource for Short {
            fn read_at(&self, _: u64, len: usize) -> Result<Vec<u8>, SourceError> {
                Ok(vec![0; len / 2])
            }
        }
        let (tarball, _) = busybox_tar();
        let gz = crate::layer::index::test_support::gzip(&tarball, 6);
        for compression in [Compression::None, Compression::Gzip] {
            let blob = if compression == Compression::Gzip {
                &gz
            } else {
                &tarball
            };
            let (index, _) = index_blob(blob, compression, 64 * 1024);
            let (size, file) = file_of(&index);
            let sources: [Arc<dyn BlobSource>; 3] =
                [Arc::new(Broken), Arc::new(Garbage), Arc::new(Short)];
            for (n, source) in sources.into_iter().enumerate() {
                let reader = LayerReader::new(Arc::clone(&index), source);
                let result = reader.read_file(size, &file, 500_000, 4096);
                if compression == Compression::None && n == 1 {
                    continue; // an uncompressed source is trusted to verify its bytes
                }
                assert!(result.is_err(), "{compression:?} source {n}: {result:?}");
            }
        }
    }
}
