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
        let reader = scope.spawn(move || read_and_hash(compressed, expected_size, hash_blocks, tx));
        let decoded = decode(rx, compression, spacing, spill);
        (decoded, reader.join())
    });
    let hashed = hashed.map_err(|_| LayerError::Io {
        digest,
        source: io::Error::other("the blob hashing thread panicked"),
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

fn bincode_options() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_limit(MAX_DECODED_INDEX)
}

impl Index {
    /// The persisted form: magic, version, then the zstd-compressed bincode.
    pub fn encode(&self) -> Result<Vec<u8>, LayerError> {
        let body = bincode_options().serialize(self).map_err(|e| {
            LayerError::BadIndex(format!("encoding index of {}: {e}", self.layer_digest))
        })?;
        let packed = zstd::bulk::compress(&body, INDEX_ZSTD_LEVEL).map_err(|e| {
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
fn validate(index: &Index) -> Result<(), String> {
    let expected_blocks = match index.access {
        Access::Spill => index.stream_size,
        Access::Tar | Access::Gzip { .. } => index.blob_size,
    }
    .div_ceil(u64::from(BLOCK_SIZE));
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
