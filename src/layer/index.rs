//! The indexing pass: one streaming, verified read of a layer blob that
//! produces its [`Index`], plus the index's persisted form.
//!
//! Two threads share the work: one reads the blob and hashes it (whole-blob
//! sha256 and per-block digests), the other decompresses and parses the tar
//! stream; compressed chunks flow between them through a bounded channel.
//! Nothing is returned unless the blob had the expected size and digest, and
//! a wrong blob is reported as such even when it also fails to parse.

use crate::digest::{Digest, Hasher};
use crate::layer::tar::{TarError, TarParser};
use crate::layer::zran::{GzipIndexer, ZranError};
use crate::layer::{Access, BLOCK_SIZE, Compression, Entry, INDEX_VERSION, Index, LayerError};
use bincode::Options as _;
use sha2::{Digest as _, Sha256};
use std::io::{self, BufRead, Read, Write};
use std::sync::Arc;
use std::sync::mpsc::{Receiver, SyncSender, sync_channel};

const MIB: u64 = 1024 * 1024;
/// Checkpoint spacing for ordinary layers: ~1.5 % of the stream in raw
/// windows (less once compressed), ~1 MiB inflated on average per cold read.
pub const DEFAULT_CHECKPOINT_SPACING: u64 = 2 * MIB;
/// Spacing for blobs above [`LARGE_BLOB_THRESHOLD`], to keep their index small.
pub const LARGE_CHECKPOINT_SPACING: u64 = 4 * MIB;
pub const LARGE_BLOB_THRESHOLD: u64 = 1024 * MIB;

/// Size of the chunks read from the network side and handed between threads.
const READ_CHUNK: usize = 512 * 1024;
/// Chunks in flight between the reading and the decoding thread.
const PIPELINE_DEPTH: usize = 8;
/// Decompressed bytes handed to the tar parser at a time (zstd path).
const ZSTD_OUT_CHUNK: usize = 512 * 1024;

/// Names the persisted index format; followed by [`INDEX_VERSION`] (u32 LE).
const INDEX_MAGIC: &[u8; 8] = b"IMGFSIDX";
const INDEX_HEADER_LEN: usize = INDEX_MAGIC.len() + std::mem::size_of::<u32>();
const INDEX_ZSTD_LEVEL: i32 = 3;
/// Largest decoded index accepted (a corrupt file must not exhaust memory).
const MAX_DECODED_INDEX: u64 = 1024 * MIB;

#[derive(Debug, Clone, Default)]
pub struct IndexOptions {
    /// Uncompressed bytes between gzip checkpoints; 0 chooses by blob size:
    /// [`DEFAULT_CHECKPOINT_SPACING`], or [`LARGE_CHECKPOINT_SPACING`] above
    /// [`LARGE_BLOB_THRESHOLD`].
    pub checkpoint_spacing: u64,
}

impl IndexOptions {
    /// The spacing used for a blob of `blob_size` bytes.
    pub fn spacing_for(&self, blob_size: u64) -> u64 {
        match self.checkpoint_spacing {
            0 if blob_size > LARGE_BLOB_THRESHOLD => LARGE_CHECKPOINT_SPACING,
            0 => DEFAULT_CHECKPOINT_SPACING,
            spacing => spacing,
        }
    }
}

/// Reads the whole blob from `compressed`, verifies it against `digest` and
/// `expected_size`, and indexes it. For zstd, the decompressed tar stream is
/// written to `spill` (required), which the caller keeps only on success.
///
/// Reading stops one byte past `expected_size` (a longer blob is reported
/// with that count). When parsing fails, the rest of the blob is still read
/// and hashed, so a corrupted download is reported as a digest or size
/// mismatch rather than as a bad archive.
pub fn build_index<R: Read + Send>(
    compressed: R,
    compression: Compression,
    digest: Digest,
    expected_size: u64,
    spill: Option<&mut (dyn Write + Send)>,
    opts: &IndexOptions,
) -> Result<Index, LayerError> {
    if compression == Compression::Zstd && spill.is_none() {
        return Err(LayerError::Unsupported {
            digest,
            what: "zstd layers need a spill file for their decompressed stream".into(),
        });
    }
    let spacing = opts.spacing_for(expected_size);
    let hash_blocks = compression != Compression::Zstd;
    let (tx, rx) = sync_channel(PIPELINE_DEPTH);
    let (decoded, hashed) = std::thread::scope(|scope| {
        let reader = std::thread::Builder::new()
            .name("imgfs-hash".into())
            .spawn_scoped(scope, move || {
                read_and_hash(compressed, expected_size, hash_blocks, tx)
            })
            .map_err(|e| format!("cannot start the hashing thread: {e}"))?;
        let decoded = decode(rx, compression, spacing, spill);
        let hashed = reader
            .join()
            .map_err(|_| "the blob hashing thread panicked".to_string())?;
        Ok::<_, String>((decoded, hashed))
    })
    .map_err(|reason| LayerError::Io {
        digest,
        source: io::Error::other(reason),
    })?;
    if let Some(source) = hashed.error {
        return Err(LayerError::Io { digest, source });
    }
    if hashed.size != expected_size {
        return Err(LayerError::SizeMismatch {
            digest,
            expected: expected_size,
            actual: hashed.size,
        });
    }
    if hashed.digest != digest {
        return Err(LayerError::DigestMismatch {
            digest,
            actual: hashed.digest,
        });
    }
    let decoded = decoded.map_err(|e| e.into_layer_error(digest))?;
    let block_digests = match compression {
        Compression::Zstd => decoded.stream_blocks,
        Compression::None | Compression::Gzip => hashed.blocks,
    };
    Ok(Index {
        version: INDEX_VERSION,
        layer_digest: digest,
        blob_size: hashed.size,
        stream_size: decoded.stream_size,
        entries: decoded.entries,
        block_digests,
        access: decoded.access,
    })
}

/// What the reading thread saw.
struct Hashed {
    size: u64,
    digest: Digest,
    blocks: Vec<[u8; 32]>,
    error: Option<io::Error>,
}

/// sha256 of each `BLOCK_SIZE` block of a stream.
#[derive(Default)]
struct BlockHasher {
    block: Sha256,
    fill: u64,
    digests: Vec<[u8; 32]>,
}

impl BlockHasher {
    fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() {
            let room = u64::from(BLOCK_SIZE) - self.fill;
            let n = usize::try_from(room).map_or(data.len(), |r| r.min(data.len()));
            self.block.update(&data[..n]);
            self.fill += n as u64;
            if self.fill == u64::from(BLOCK_SIZE) {
                self.digests.push(self.block.finalize_reset().into());
                self.fill = 0;
            }
            data = &data[n..];
        }
    }

    fn finish(mut self) -> Vec<[u8; 32]> {
        if self.fill > 0 {
            self.digests.push(self.block.finalize().into());
        }
        self.digests
    }
}

/// The reading thread: reads at most `expected_size + 1` bytes (enough to
/// tell a too-long blob), hands chunks to the decoder while it listens, and
/// hashes everything.
fn read_and_hash<R: Read>(
    compressed: R,
    expected_size: u64,
    hash_blocks: bool,
    tx: SyncSender<Arc<Vec<u8>>>,
) -> Hashed {
    let mut input = compressed.take(expected_size.saturating_add(1));
    let mut sender = Some(tx);
    let mut whole = Hasher::new();
    let mut blocks = BlockHasher::default();
    let mut size = 0u64;
    let mut error = None;
    loop {
        let (chunk, failure) = read_chunk(&mut input);
        // A short chunk means end of stream (or of the `take` limit).
        let last = chunk.len() < READ_CHUNK;
        if !chunk.is_empty() {
            let chunk = Arc::new(chunk);
            if let Some(tx) = &sender {
                if tx.send(Arc::clone(&chunk)).is_err() {
                    sender = None; // the decoder stopped; keep hashing
                }
            }
            whole.update(&chunk);
            if hash_blocks {
                blocks.update(&chunk);
            }
            size += chunk.len() as u64;
        }
        if failure.is_some() {
            error = failure;
            break;
        }
        if last {
            break;
        }
    }
    Hashed {
        size,
        digest: whole.finish(),
        blocks: blocks.finish(),
        error,
    }
}

/// Reads up to `READ_CHUNK` bytes, stopping early only at end of stream or
/// on an error. An empty chunk means end of stream.
fn read_chunk(input: &mut impl Read) -> (Vec<u8>, Option<io::Error>) {
    let mut buf = vec![0u8; READ_CHUNK];
    let mut filled = 0;
    let mut failure = None;
    while filled < buf.len() {
        match input.read(&mut buf[filled..]) {
            Ok(0) => break,
            Ok(n) => filled += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => {
                failure = Some(e);
                break;
            }
        }
    }
    buf.truncate(filled);
    (buf, failure)
}

/// What the decoding thread produced.
struct Decoded {
    entries: Vec<Entry>,
    stream_size: u64,
    access: Access,
    /// Block digests of the decompressed stream (zstd only).
    stream_blocks: Vec<[u8; 32]>,
}

/// Why decoding failed, before the layer digest is attached.
#[derive(Debug)]
enum PassError {
    Tar(TarError),
    Gzip(ZranError),
    Zstd { offset: u64, reason: String },
    Spill(io::Error),
}

impl From<TarError> for PassError {
    fn from(e: TarError) -> Self {
        PassError::Tar(e)
    }
}

impl From<ZranError> for PassError {
    fn from(e: ZranError) -> Self {
        PassError::Gzip(e)
    }
}

impl PassError {
    fn into_layer_error(self, digest: Digest) -> LayerError {
        match self {
            PassError::Tar(TarError::Invalid { offset, reason }) => LayerError::Tar {
                digest,
                offset,
                reason,
            },
            PassError::Tar(TarError::Unsupported { what }) => {
                LayerError::Unsupported { digest, what }
            }
            PassError::Gzip(e) => LayerError::Compression {
                digest,
                format: "gzip",
                offset: e.offset,
                reason: e.reason,
            },
            PassError::Zstd { offset, reason } => LayerError::Compression {
                digest,
                format: "zstd",
                offset,
                reason,
            },
            PassError::Spill(source) => LayerError::Io { digest, source },
        }
    }
}

/// The decoding thread: decompresses and parses everything the reader sends.
fn decode(
    rx: Receiver<Arc<Vec<u8>>>,
    compression: Compression,
    spacing: u64,
    spill: Option<&mut (dyn Write + Send)>,
) -> Result<Decoded, PassError> {
    let mut parser = TarParser::new();
    match compression {
        Compression::None => {
            for chunk in rx {
                parser.feed(&chunk)?;
            }
            let stream_size = parser.position();
            let entries = parser.finish()?;
            Ok(Decoded {
                entries,
                stream_size,
                access: Access::Tar,
                stream_blocks: Vec::new(),
            })
        }
        Compression::Gzip => {
            let mut indexer = GzipIndexer::new(spacing)?;
            for chunk in rx {
                indexer.feed(&chunk, |out| parser.feed(out).map_err(PassError::Tar))?;
            }
            let gzip = indexer.finish()?;
            let entries = parser.finish()?;
            Ok(Decoded {
                entries,
                stream_size: gzip.stream_size,
                access: Access::Gzip {
                    checkpoints: gzip.checkpoints,
                },
                stream_blocks: Vec::new(),
            })
        }
        Compression::Zstd => {
            let Some(spill) = spill else {
                return Err(PassError::Spill(io::Error::other(
                    "no spill file for a zstd layer",
                )));
            };
            decode_zstd(ChunkReader::new(rx), parser, spill)
        }
    }
}

fn decode_zstd(
    input: ChunkReader,
    mut parser: TarParser,
    spill: &mut (dyn Write + Send),
) -> Result<Decoded, PassError> {
    let zstd_error = |offset: u64, e: io::Error| PassError::Zstd {
        offset,
        reason: e.to_string(),
    };
    let mut decoder =
        zstd::stream::read::Decoder::with_buffer(input).map_err(|e| zstd_error(0, e))?;
    let mut blocks = BlockHasher::default();
    let mut buf = vec![0u8; ZSTD_OUT_CHUNK];
    loop {
        let n = match decoder.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(zstd_error(decoder.get_ref().consumed, e)),
        };
        let out = &buf[..n];
        spill.write_all(out).map_err(PassError::Spill)?;
        blocks.update(out);
        parser.feed(out)?;
    }
    spill.flush().map_err(PassError::Spill)?;
    let stream_size = parser.position();
    let entries = parser.finish()?;
    Ok(Decoded {
        entries,
        stream_size,
        access: Access::Spill,
        stream_blocks: blocks.finish(),
    })
}

/// The received chunks as one `BufRead`, without copying them.
struct ChunkReader {
    rx: Receiver<Arc<Vec<u8>>>,
    current: Arc<Vec<u8>>,
    pos: usize,
    /// Compressed bytes handed out so far.
    consumed: u64,
}

impl ChunkReader {
    fn new(rx: Receiver<Arc<Vec<u8>>>) -> Self {
        ChunkReader {
            rx,
            current: Arc::new(Vec::new()),
            pos: 0,
            consumed: 0,
        }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let available = self.fill_buf()?;
        let n = available.len().min(buf.len());
        buf[..n].copy_from_slice(&available[..n]);
        self.consume(n);
        Ok(n)
    }
}

impl BufRead for ChunkReader {
    fn fill_buf(&mut self) -> io::Result<&[u8]> {
        while self.pos == self.current.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    self.current = chunk;
                    self.pos = 0;
                }
                Err(_) => return Ok(&[]), // the reader is done
            }
        }
        Ok(&self.current[self.pos..])
    }

    fn consume(&mut self, amt: usize) {
        let amt = amt.min(self.current.len() - self.pos);
        self.pos += amt;
        self.consumed += amt as u64;
    }
}

/// zstd with its content checksum, so a damaged file never decodes.
fn compress_checksummed(body: &[u8]) -> io::Result<Vec<u8>> {
    let mut encoder = zstd::stream::Encoder::new(Vec::new(), INDEX_ZSTD_LEVEL)?;
    encoder.include_checksum(true)?;
    encoder.write_all(body)?;
    encoder.finish()
}

fn bincode_options() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_limit(MAX_DECODED_INDEX)
}

impl Index {
    /// The persisted form: magic, version, then the zstd-compressed bincode.
    pub fn encode(&self) -> Result<Vec<u8>, LayerError> {
        let body = bincode_options().serialize(self).map_err(|e| {
            LayerError::BadIndex(format!("encoding index of {}: {e}", self.layer_digest))
        })?;
        let packed = compress_checksummed(&body).map_err(|e| {
            LayerError::BadIndex(format!("compressing index of {}: {e}", self.layer_digest))
        })?;
        let mut out = Vec::with_capacity(INDEX_HEADER_LEN + packed.len());
        out.extend_from_slice(INDEX_MAGIC);
        out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
        out.extend_from_slice(&packed);
        Ok(out)
    }

    /// Reads what [`Index::encode`] wrote; anything else (another version,
    /// truncation, corruption) is `BadIndex`, so the caller rebuilds.
    pub fn decode(bytes: &[u8]) -> Result<Index, LayerError> {
        let bad = |reason: String| LayerError::BadIndex(reason);
        if bytes.len() < INDEX_HEADER_LEN || &bytes[..INDEX_MAGIC.len()] != INDEX_MAGIC {
            return Err(bad("not an imgfs index (bad magic)".into()));
        }
        let mut version = [0u8; 4];
        version.copy_from_slice(&bytes[INDEX_MAGIC.len()..INDEX_HEADER_LEN]);
        let version = u32::from_le_bytes(version);
        if version != INDEX_VERSION {
            return Err(bad(format!(
                "index version {version}, expected {INDEX_VERSION}"
            )));
        }
        let mut body = Vec::new();
        zstd::stream::read::Decoder::new(&bytes[INDEX_HEADER_LEN..])
            .and_then(|d| d.take(MAX_DECODED_INDEX + 1).read_to_end(&mut body))
            .map_err(|e| bad(format!("decompressing index: {e}")))?;
        if body.len() as u64 > MAX_DECODED_INDEX {
            return Err(bad("index too large".into()));
        }
        let index: Index = bincode_options()
            .deserialize(&body)
            .map_err(|e| bad(format!("decoding index: {e}")))?;
        if index.version != INDEX_VERSION {
            return Err(bad(format!(
                "index body version {}, expected {INDEX_VERSION}",
                index.version
            )));
        }
        validate(&index).map_err(|e| bad(format!("index of {}: {e}", index.layer_digest)))?;
        Ok(index)
    }
}

/// Checks the invariants readers rely on, so a damaged index is rebuilt
/// rather than read wrongly.
pub(crate) fn validate(index: &Index) -> Result<(), String> {
    let expected_blocks = match index.access {
        Access::Chunked { .. } => 0,
        Access::Spill | Access::Tar | Access::Gzip { .. } => {
            index.source_size().div_ceil(u64::from(BLOCK_SIZE))
        }
    };
    if index.block_digests.len() as u64 != expected_blocks {
        return Err("block digest count does not match the size".into());
    }
    if let Access::Gzip { checkpoints } = &index.access {
        if checkpoints.first().is_none_or(|cp| cp.out != 0) {
            return Err("the first checkpoint is not at offset 0".into());
        }
        let ordered = checkpoints
            .windows(2)
            .all(|w| w[0].out < w[1].out && w[0].inp < w[1].inp);
        let sane = checkpoints
            .iter()
            .all(|cp| cp.bits < 8 && cp.inp <= index.blob_size);
        if !ordered || !sane {
            return Err("checkpoints out of order or out of range".into());
        }
    }
    if let Access::Chunked {
        chunks,
        prefetch_end,
        ..
    } = &index.access
    {
        validate_chunks(chunks, index.stream_size, index.blob_size)?;
        if *prefetch_end > index.stream_size {
            return Err("the prefetch landmark lies outside the stream".into());
        }
    }
    for entry in &index.entries {
        if let crate::layer::EntryKind::File { size, data } = &entry.kind {
            if !file_data_in_range(*size, data, index.stream_size) {
                return Err(format!(
                    "entry {} lies outside the stream",
                    String::from_utf8_lossy(&entry.path)
                ));
            }
        }
    }
    Ok(())
}

/// Chunks tile the stream in order, and each one's compressed range lies
/// inside the blob.
fn validate_chunks(
    chunks: &[crate::layer::Chunk],
    stream_size: u64,
    blob_size: u64,
) -> Result<(), String> {
    let mut next = 0u64;
    for chunk in chunks {
        let in_blob = chunk.blob_start < chunk.blob_end && chunk.blob_end <= blob_size;
        if chunk.stream_offset != next || chunk.len == 0 || !in_blob {
            return Err(format!(
                "chunk at stream offset {} is out of order or out of range",
                chunk.stream_offset
            ));
        }
        next = next
            .checked_add(chunk.len)
            .ok_or("chunk lengths overflow")?;
    }
    if next != stream_size {
        return Err("chunks do not add up to the stream size".into());
    }
    Ok(())
}

fn file_data_in_range(size: u64, data: &crate::layer::FileData, stream_size: u64) -> bool {
    use crate::layer::FileData;
    match data {
        FileData::Contiguous { offset } => offset
            .checked_add(size)
            .is_some_and(|end| end <= stream_size),
        FileData::Sparse { segments } => {
            let mut prev_end = 0;
            segments.iter().all(|s| {
                let ok = s.file_offset >= prev_end
                    && s.file_offset
                        .checked_add(s.len)
                        .is_some_and(|end| end <= size)
                    && s.stream_offset
                        .checked_add(s.len)
                        .is_some_and(|end| end <= stream_size);
                prev_end = s.file_offset.saturating_add(s.len);
                ok
            })
        }
    }
}

/// Helpers shared by the layer tests: in-memory sources, GNU tar/gzip runs.
#[cfg(test)]
pub(crate) mod test_support {
    use crate::digest::Digest;
    use crate::layer::{BlobSource, Compression, EntryKind, Index, LayerReader, SourceError};
    use std::io::Write;
    use std::path::Path;
    use std::process::{Command, Stdio};
    use std::sync::Arc;

    /// A blob in memory; short reads only at its end, like the real source.
    pub struct MemSource(pub Vec<u8>);

    impl BlobSource for MemSource {
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
            let start = usize::try_from(offset).map_err(|e| SourceError(e.to_string()))?;
            if start > self.0.len() {
                return Err(SourceError(format!("offset {offset} past the end")));
            }
            let end = self.0.len().min(start.saturating_add(len));
            Ok(self.0[start..end].to_vec())
        }
    }

    /// Runs a command with `input` on stdin and returns its stdout.
    pub fn pipe(cmd: &str, args: &[&str], input: &[u8]) -> Vec<u8> {
        let mut child = Command::new(cmd)
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("running {cmd}: {e}"));
        let mut stdin = child.stdin.take().expect("stdin");
        let input = input.to_vec();
        let feeder = std::thread::spawn(move || stdin.write_all(&input));
        let out = child.wait_with_output().expect("wait");
        feeder.join().expect("feeder").expect("write stdin");
        assert!(out.status.success(), "{cmd} {args:?} failed");
        out.stdout
    }

    pub fn run(cmd: &str, args: &[&str], dir: &Path) {
        let status = Command::new(cmd)
            .args(args)
            .current_dir(dir)
            .status()
            .expect("spawn");
        assert!(status.success(), "{cmd} {args:?} failed");
    }

    pub fn gzip(data: &[u8], level: u32) -> Vec<u8> {
        pipe("gzip", &[&format!("-{level}"), "-c"], data)
    }

    /// Indexes `blob`, returning the index and a reader over the right source.
    pub fn index_blob(
        blob: &[u8],
        compression: Compression,
        spacing: u64,
    ) -> (Arc<Index>, LayerReader) {
        let mut spill = Vec::new();
        let opts = super::IndexOptions {
            checkpoint_spacing: spacing,
        };
        let spill_arg: Option<&mut (dyn Write + Send)> = if compression == Compression::Zstd {
            Some(&mut spill)
        } else {
            None
        };
        let index = super::build_index(
            blob,
            compression,
            Digest::of(blob),
            blob.len() as u64,
            spill_arg,
            &opts,
        )
        .unwrap_or_else(|e| panic!("indexing: {e}"));
        let source = if compression == Compression::Zstd {
            spill
        } else {
            blob.to_vec()
        };
        let index = Arc::new(index);
        let reader = LayerReader::new(Arc::clone(&index), Arc::new(MemSource(source)));
        (index, reader)
    }

    /// The whole content of regular file entry `path` (the last entry of that path).
    pub fn read_whole(index: &Index, reader: &LayerReader, path: &[u8], piece: usize) -> Vec<u8> {
        let entry = index
            .entries
            .iter()
            .rev()
            .find(|e| e.path == path)
            .expect("entry exists");
        let EntryKind::File { size, data } = &entry.kind else {
            panic!("not a file")
        };
        let mut out = Vec::new();
        while (out.len() as u64) < *size {
            let got = reader
                .read_file(*size, data, out.len() as u64, piece)
                .expect("read");
            assert!(!got.is_empty());
            out.extend(got);
        }
        assert!(
            reader
                .read_file(*size, data, *size, piece)
                .expect("read at end")
                .is_empty()
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::test_support::*;
    use super::*;
    use crate::layer::{EntryKind, FileData, LayerReader};
    use std::collections::BTreeMap;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};
    use std::path::Path;

    /// A directory with every kind of entry, long names and sparse files.
    fn populate(root: &Path) {
        let write = |rel: &str, data: &[u8]| {
            let p = root.join(rel);
            std::fs::create_dir_all(p.parent().unwrap()).unwrap();
            std::fs::write(p, data).unwrap();
        };
        let busybox = std::fs::read("/usr/bin/busybox").unwrap();
        write("bin/busybox", &busybox);
        for name in ["Apache-2.0", "GPL-3", "BSD"] {
            write(
                &format!("licenses/{name}"),
                &std::fs::read(format!("/usr/share/common-licenses/{name}")).unwrap(),
            );
        }
        write("empty", b"");
        let long_dir = "d".repeat(90) + "/" + &"e".repeat(90) + "/" + &"f".repeat(90);
        write(
            &format!("{long_dir}/{}", "long-file-name-".repeat(8)),
            b"long named content\n",
        );
        std::fs::set_permissions(
            root.join("bin/busybox"),
            std::fs::Permissions::from_mode(0o4755),
        )
        .unwrap();
        run("ln", &["-s", "../licenses/BSD", "bin/link-to-bsd"], root);
        run("ln", &["-s", &"t".repeat(150), "long-symlink"], root);
        run("ln", &["licenses/GPL-3", "hardlink-to-gpl"], root);
        run("mkfifo", &["fifo"], root);
        run("mknod", &["chardev", "c", "1", "3"], root);
        run("mknod", &["blockdev", "b", "7", "200"], root);
        // Sparse: a trailing byte after a 10 MiB hole; and many data islands
        // (more than GNU's 4 in-header map entries, so extension headers are used).
        run("truncate", &["-s", "10M", "sparse-tail"], root);
        std::fs::OpenOptions::new()
            .append(true)
            .open(root.join("sparse-tail"))
            .unwrap()
            .write_all(b"x\n")
            .unwrap();
        let islands = root.join("sparse-islands");
        let file = std::fs::File::create(&islands).unwrap();
        for i in 0..40u64 {
            use std::os::unix::fs::FileExt;
            file.write_all_at(
                &busybox[(i as usize) * 1000..(i as usize) * 1000 + 5000],
                i * 256 * 1024 + 777,
            )
            .unwrap();
        }
        file.set_len(41 * 256 * 1024).unwrap();
    }

    /// GNU tar of `root` with `--sparse` and the given options.
    fn tar_with(root: &Path, options: &[&str]) -> Vec<u8> {
        let out = std::process::Command::new("tar")
            .arg("--sparse")
            .args(options)
            .args(["-cf", "-", "-C"])
            .arg(root)
            .arg(".")
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "tar failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    fn tar_of(root: &Path, format: &str) -> Vec<u8> {
        tar_with(root, &[&format!("--format={format}")])
    }

    /// Checks every entry of `index` against the tree GNU tar extracted.
    fn check_against_extraction(
        index: &Index,
        reader: &LayerReader,
        extracted: &Path,
        label: &str,
    ) {
        let mut files = 0;
        let mut last: BTreeMap<&[u8], &crate::layer::Entry> = BTreeMap::new();
        for e in &index.entries {
            last.insert(&e.path, e);
        }
        for (path, entry) in last {
            let disk = extracted.join(std::str::from_utf8(path).unwrap());
            let meta = std::fs::symlink_metadata(&disk)
                .unwrap_or_else(|e| panic!("{label} {disk:?}: {e}"));
            assert_eq!(entry.mode, meta.mode() & 0o7777, "{label} mode of {disk:?}");
            assert_eq!(entry.mtime, meta.mtime(), "{label} mtime of {disk:?}");
            match &entry.kind {
                EntryKind::File { size, .. } => {
                    files += 1;
                    let want = std::fs::read(&disk).unwrap();
                    assert_eq!(*size, want.len() as u64, "{label} size of {disk:?}");
                    for piece in [128 * 1024, 100_003] {
                        assert!(
                            read_whole(index, reader, path, piece) == want,
                            "{label} content of {disk:?}"
                        );
                    }
                }
                EntryKind::Dir => assert!(meta.is_dir()),
                EntryKind::Symlink { target } => {
                    assert_eq!(
                        std::fs::read_link(&disk)
                            .unwrap()
                            .as_os_str()
                            .as_encoded_bytes(),
                        target.as_slice()
                    )
                }
                EntryKind::Hardlink { target } => {
                    let other =
                        std::fs::metadata(extracted.join(std::str::from_utf8(target).unwrap()))
                            .unwrap();
                    assert_eq!(other.ino(), meta.ino(), "{label} hardlink {disk:?}");
                }
                EntryKind::CharDevice { major, minor }
                | EntryKind::BlockDevice { major, minor } => {
                    let rdev = meta.rdev();
                    assert_eq!(
                        (*major, *minor),
                        (libc_major(rdev), libc_minor(rdev)),
                        "{label} {disk:?}"
                    );
                }
                EntryKind::Fifo => {}
            }
        }
        assert!(files >= 8, "{label}: only {files} files");
    }

    fn libc_major(rdev: u64) -> u32 {
        (((rdev >> 32) & 0xffff_f000) | ((rdev >> 8) & 0xfff)) as u32
    }

    fn libc_minor(rdev: u64) -> u32 {
        (((rdev >> 12) & 0xffff_ff00) | (rdev & 0xff)) as u32
    }

    #[test]
    fn gnu_tar_round_trip_every_kind_and_compression() {
        let src = tempfile::tempdir().unwrap();
        populate(src.path());
        let flavors: [(&str, &[&str]); 4] = [
            ("gnu", &["--format=gnu"]),
            ("pax", &["--format=pax"]),
            ("pax-sparse-0.0", &["--format=pax", "--sparse-version=0.0"]),
            ("pax-sparse-0.1", &["--format=pax", "--sparse-version=0.1"]),
        ];
        for (format, options) in flavors {
            let tarball = tar_with(src.path(), options);
            let out = tempfile::tempdir().unwrap();
            pipe(
                "tar",
                &["-xf", "-", "-C", out.path().to_str().unwrap()],
                &tarball,
            );
            let sparse = |index: &Index| {
                index
                    .entries
                    .iter()
                    .filter(|e| {
                        matches!(
                            &e.kind,
                            EntryKind::File {
                                data: FileData::Sparse { .. },
                                ..
                            }
                        )
                    })
                    .count()
            };
            let (index, reader) = index_blob(&tarball, Compression::None, 0);
            assert_eq!(sparse(&index), 2, "{format}: sparse entries");
            assert!(matches!(index.access, Access::Tar));
            check_against_extraction(&index, &reader, out.path(), &format!("{format}/tar"));
            let kinds: Vec<_> = index
                .entries
                .iter()
                .map(|e| std::mem::discriminant(&e.kind))
                .collect();
            for kind in [
                EntryKind::Fifo,
                EntryKind::CharDevice { major: 0, minor: 0 },
                EntryKind::BlockDevice { major: 0, minor: 0 },
                EntryKind::Symlink { target: vec![] },
                EntryKind::Hardlink { target: vec![] },
                EntryKind::Dir,
            ] {
                assert!(
                    kinds.contains(&std::mem::discriminant(&kind)),
                    "{format}: missing {kind:?}"
                );
            }
            if format.starts_with("pax") {
                assert!(
                    index.entries.iter().any(|e| e.mtime_nsec != 0),
                    "pax mtime fractions"
                );
            }

            let gz = gzip(&tarball, 6);
            let (index, reader) = index_blob(&gz, Compression::Gzip, 128 * 1024);
            let Access::Gzip { checkpoints } = &index.access else {
                panic!("gzip access")
            };
            assert!(checkpoints.len() > 10);
            assert_eq!(index.stream_size, tarball.len() as u64);
            check_against_extraction(&index, &reader, out.path(), &format!("{format}/gzip"));

            let zst = zstd::encode_all(&tarball[..], 3).unwrap();
            let (index, reader) = index_blob(&zst, Compression::Zstd, 0);
            assert!(matches!(index.access, Access::Spill));
            assert_eq!(
                index.block_digests.len() as u64,
                (tarball.len() as u64).div_ceil(u64::from(BLOCK_SIZE))
            );
            assert_eq!(
                index.block_digests[0],
                *Digest::of(&tarball[..BLOCK_SIZE as usize]).as_bytes()
            );
            check_against_extraction(&index, &reader, out.path(), &format!("{format}/zstd"));
        }
    }

    /// Random reads of the stream through a `Contiguous` view of all of it.
    #[test]
    fn gzip_random_reads_match_the_stream() {
        let src = tempfile::tempdir().unwrap();
        populate(src.path());
        let tarball = tar_of(src.path(), "gnu");
        let stream_size = tarball.len() as u64;
        let whole = FileData::Contiguous { offset: 0 };
        for level in [1, 9] {
            let gz = gzip(&tarball, level);
            let (index, reader) = index_blob(&gz, Compression::Gzip, 64 * 1024);
            let Access::Gzip { checkpoints } = &index.access else {
                panic!()
            };
            assert_eq!(checkpoints[0].out, 0);
            let mut offsets = vec![0, stream_size - 1, stream_size - 100];
            for cp in checkpoints.iter().skip(1) {
                offsets.extend([cp.out - 1, cp.out, cp.out + 1, cp.out - 5000]);
            }
            let mut x = 88172645463325252u64;
            for _ in 0..200 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                offsets.push(x % stream_size);
            }
            for (n, &off) in offsets.iter().enumerate() {
                let len = [1, 4096, 128 * 1024, 700_000][n % 4];
                let got = reader.read_file(stream_size, &whole, off, len).unwrap();
                let end = (off as usize + len).min(tarball.len());
                assert!(
                    got == tarball[off as usize..end],
                    "level {level} offset {off} len {len}"
                );
            }
        }
    }

    #[test]
    fn concurrent_readers_share_spans() {
        let data: Vec<u8> = std::fs::read("/usr/bin/busybox").unwrap();
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_gnu();
        header.set_size(data.len() as u64);
        header.set_mode(0o644);
        header.set_cksum();
        builder
            .append_data(&mut header, "busybox", &data[..])
            .unwrap();
        let tarball = builder.into_inner().unwrap();
        let gz = gzip(&tarball, 6);
        let (index, reader) = index_blob(&gz, Compression::Gzip, 64 * 1024);
        let reader = Arc::new(reader);
        let threads: Vec<_> = (0..4)
            .map(|t| {
                let (index, reader, data) = (Arc::clone(&index), Arc::clone(&reader), data.clone());
                std::thread::spawn(move || {
                    for round in 0..3 {
                        let piece = 128 * 1024 + t * 1000 + round;
                        assert!(read_whole(&index, &reader, b"busybox", piece) == data);
                    }
                })
            })
            .collect();
        for t in threads {
            t.join().unwrap();
        }
    }

    #[test]
    fn multi_member_gzip_with_padding() {
        let src = tempfile::tempdir().unwrap();
        populate(src.path());
        let tarball = tar_of(src.path(), "pax");
        let cut = tarball.len() / 3 + 777;
        let mut blob = gzip(&tarball[..cut], 9);
        blob.extend(gzip(&tarball[cut..2 * cut], 1));
        blob.extend(gzip(&tarball[2 * cut..], 6));
        blob.extend([0u8; 4096]);
        let (index, reader) = index_blob(&blob, Compression::Gzip, 128 * 1024);
        assert_eq!(index.stream_size, tarball.len() as u64);
        let out = tempfile::tempdir().unwrap();
        pipe(
            "tar",
            &["-xf", "-", "-C", out.path().to_str().unwrap()],
            &tarball,
        );
        check_against_extraction(&index, &reader, out.path(), "multi-member");
    }

    fn small_tar() -> Vec<u8> {
        let mut builder = tar::Builder::new(Vec::new());
        let mut header = tar::Header::new_ustar();
        header.set_size(5);
        header.set_mode(0o600);
        header.set_cksum();
        builder
            .append_data(&mut header, "a/hello", &b"hello"[..])
            .unwrap();
        builder.into_inner().unwrap()
    }

    fn build(
        blob: &[u8],
        compression: Compression,
        digest: Digest,
        size: u64,
    ) -> Result<Index, LayerError> {
        let mut spill = Vec::new();
        let spill_arg: Option<&mut (dyn Write + Send)> = if compression == Compression::Zstd {
            Some(&mut spill)
        } else {
            None
        };
        build_index(
            blob,
            compression,
            digest,
            size,
            spill_arg,
            &IndexOptions::default(),
        )
    }

    #[test]
    fn wrong_blobs_are_refused() {
        let tarball = small_tar();
        let gz = gzip(&tarball, 6);
        let d = Digest::of(&gz);
        let n = gz.len() as u64;
        assert!(build(&gz, Compression::Gzip, d, n).is_ok());
        assert!(matches!(
            build(&gz, Compression::Gzip, Digest::of(b"other"), n),
            Err(LayerError::DigestMismatch { .. })
        ));
        assert!(matches!(
            build(&gz[..gz.len() - 3], Compression::Gzip, d, n),
            Err(LayerError::SizeMismatch { actual, .. }) if actual == n - 3
        ));
        let mut longer = gz.clone();
        longer.extend([1, 2, 3]);
        assert!(matches!(
            build(&longer, Compression::Gzip, d, n),
            Err(LayerError::SizeMismatch { actual, .. }) if actual == n + 1
        ));
        // Right size and digest, but not what the media type says.
        let truncated = &gz[..gz.len() / 2];
        let r = build(
            truncated,
            Compression::Gzip,
            Digest::of(truncated),
            truncated.len() as u64,
        );
        assert!(
            matches!(r, Err(LayerError::Compression { format: "gzip", .. })),
            "{r:?}"
        );
        let garbage = b"this is no gzip data, nor a tar".repeat(100);
        for c in [Compression::Gzip, Compression::Zstd, Compression::None] {
            let r = build(&garbage, c, Digest::of(&garbage), garbage.len() as u64);
            assert!(
                matches!(
                    r,
                    Err(LayerError::Compression { .. } | LayerError::Tar { .. })
                ),
                "{c:?}: {r:?}"
            );
        }
        let cut_tar = &tarball[..700];
        let r = build(cut_tar, Compression::None, Digest::of(cut_tar), 700);
        assert!(matches!(r, Err(LayerError::Tar { .. })), "{r:?}");
        let r = build_index(
            &tarball[..],
            Compression::Zstd,
            d,
            n,
            None,
            &IndexOptions::default(),
        );
        assert!(matches!(r, Err(LayerError::Unsupported { .. })));
        // A registry that breaks the connection.
        struct Failing;
        impl Read for Failing {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::Error::new(io::ErrorKind::ConnectionReset, "reset"))
            }
        }
        let r = build_index(
            Failing,
            Compression::Gzip,
            d,
            n,
            None,
            &IndexOptions::default(),
        );
        assert!(matches!(r, Err(LayerError::Io { .. })));
    }

    #[test]
    fn empty_and_padded_layers() {
        // An empty tar (just the end marker), then one with extra zero padding.
        let mut tarball = small_tar();
        let (index, _) = index_blob(&tarball, Compression::None, 0);
        assert_eq!(index.entries.len(), 1);
        tarball.extend([0u8; 10240]);
        let (index, _) = index_blob(&gzip(&tarball, 6), Compression::Gzip, 0);
        assert_eq!(index.entries.len(), 1);
        assert_eq!(index.stream_size, tarball.len() as u64);
        let (index, _) = index_blob(&[0u8; 1024], Compression::None, 0);
        assert!(index.entries.is_empty());
    }

    #[test]
    fn encode_decode_round_trip_and_rejection() {
        let src = tempfile::tempdir().unwrap();
        populate(src.path());
        let tarball = tar_of(src.path(), "pax");
        let (index, _) = index_blob(&gzip(&tarball, 6), Compression::Gzip, 64 * 1024);
        let bytes = index.encode().unwrap();
        let back = Index::decode(&bytes).unwrap();
        assert_eq!(back.entries, index.entries);
        assert_eq!(back.block_digests, index.block_digests);
        assert_eq!(format!("{:?}", back.access), format!("{:?}", index.access));
        assert_eq!(
            (back.blob_size, back.stream_size),
            (index.blob_size, index.stream_size)
        );

        let bad = |b: &[u8]| matches!(Index::decode(b), Err(LayerError::BadIndex(_)));
        assert!(bad(b""));
        assert!(bad(b"IMGFSID"));
        assert!(bad(&bytes[..bytes.len() / 2]));
        let mut other_version = bytes.clone();
        other_version[8] = other_version[8].wrapping_add(1);
        assert!(bad(&other_version));
        let mut wrong_magic = bytes.clone();
        wrong_magic[0] = b'X';
        assert!(bad(&wrong_magic));
        let mut garbage = bytes[..INDEX_HEADER_LEN].to_vec();
        garbage.extend(b"garbage garbage garbage");
        assert!(bad(&garbage));
        let mut flipped = bytes.clone();
        let mid = flipped.len() / 2;
        flipped[mid] ^= 0xff;
        assert!(bad(&flipped));
        // A well-formed body that breaks the invariants is refused too.
        let mut broken = (*index).clone();
        broken.block_digests.pop();
        assert!(bad(&broken.encode().unwrap()));
    }

    /// Prints the index size and indexing throughput for a tar of a real tree
    /// (`IMGFS_BENCH_DIR`, default /usr/lib), gzip -6, or for a ready
    /// `IMGFS_BENCH_GZ` file (`IMGFS_BENCH_SPACING` overrides the spacing).
    /// Run in release mode:
    /// `cargo test --release --lib index_size_and_throughput -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn index_size_and_throughput() {
        let work = tempfile::tempdir().unwrap();
        let gz_path = match std::env::var("IMGFS_BENCH_GZ") {
            Ok(path) => std::path::PathBuf::from(path),
            Err(_) => {
                let dir = std::env::var("IMGFS_BENCH_DIR").unwrap_or_else(|_| "/usr/lib".into());
                let gz_path = work.path().join("layer.tar.gz");
                let script = format!(
                    "tar -C '{dir}' -cf - . 2>/dev/null | gzip -6 > '{}'",
                    gz_path.display()
                );
                let status = std::process::Command::new("sh")
                    .arg("-c")
                    .arg(script)
                    .status()
                    .unwrap();
                assert!(status.success() || gz_path.exists());
                gz_path
            }
        };
        let blob = std::fs::read(&gz_path).unwrap();
        let digest = Digest::of(&blob);
        let started = std::time::Instant::now();
        let spacing = std::env::var("IMGFS_BENCH_SPACING")
            .ok()
            .and_then(|s| s.parse().ok());
        let opts = IndexOptions {
            checkpoint_spacing: spacing.unwrap_or(0),
        };
        let index = build_index(
            &blob[..],
            Compression::Gzip,
            digest,
            blob.len() as u64,
            None,
            &opts,
        )
        .unwrap();
        let secs = started.elapsed().as_secs_f64();
        let encoded = index.encode().unwrap();
        let Access::Gzip { checkpoints } = &index.access else {
            panic!()
        };
        eprintln!(
            "{}: blob {} B, stream {} B, {} entries, {} checkpoints; index {} B = {:.3} % of the stream; \
             indexing {:.1} s = {:.0} MB/s compressed, {:.0} MB/s uncompressed",
            gz_path.display(),
            blob.len(),
            index.stream_size,
            index.entries.len(),
            checkpoints.len(),
            encoded.len(),
            100.0 * encoded.len() as f64 / index.stream_size as f64,
            secs,
            blob.len() as f64 / secs / 1e6,
            index.stream_size as f64 / secs / 1e6,
        );
        let started = std::time::Instant::now();
        let status = std::process::Command::new("sh")
            .arg("-c")
            .arg(format!(
                "gzip -dc '{}' | tar -tf - > /dev/null",
                gz_path.display()
            ))
            .status()
            .unwrap();
        assert!(status.success());
        eprintln!(
            "gzip -dc | tar -t: {:.1} s",
            started.elapsed().as_secs_f64()
        );
    }
}
