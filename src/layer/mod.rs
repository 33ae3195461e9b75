//! Layer indexes: how one layer blob becomes random-access.
//!
//! A layer is indexed by one streaming pass over its compressed bytes
//! ([`build_index`]): the pass verifies the blob's digest and size, records
//! every tar entry with the offset of its data in the *uncompressed tar stream*,
//! the sha256 of every [`BLOCK_SIZE`] block of the blob (so later Range reads
//! are verified block by block), and, per format, what is needed to enter the
//! stream in the middle:
//!
//! | format | [`Access`] | how a stream offset is read |
//! |---|---|---|
//! | tar | `Tar` | stream offset = blob offset |
//! | tar+gzip | `Gzip` | zran checkpoint at or before the offset, inflate the span |
//! | tar+zstd | `Spill` | the decompressed stream was kept in the cache during the pass |
//! | eStargz, zstd:chunked | `Chunked` | no pass: the layer's own table of contents ([`toc`]) |
//!
//! A `Chunked` layer's "stream" is not the tar stream but a virtual one: the
//! verified file chunks the TOC lists, laid end to end in TOC order, each
//! fetched by Range from its own gzip member or zstd frame.
//!
//! This module knows nothing of other layers (see `union`), of FUSE, or of the
//! network: bytes come in through [`std::io::Read`] while indexing and through
//! [`BlobSource`] while reading.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};

pub mod index;
pub mod reader;
pub mod tar;
pub mod toc;
pub mod write;
pub mod zran;

pub use index::{IndexOptions, build_index};
pub use reader::LayerReader;

/// Size of the blob blocks whose sha256 the index records. Every byte fetched
/// by Range is fetched in whole blocks and checked against these.
pub const BLOCK_SIZE: u32 = 128 * 1024;

/// Bumped whenever the persisted form of [`Index`] changes; older indexes are
/// rebuilt, never misread.
pub const INDEX_VERSION: u32 = 1;

/// How a layer blob is compressed (from its media type).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Compression {
    None,
    Gzip,
    Zstd,
}

/// Everything imgfs knows about one layer after its verified scan.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Index {
    pub version: u32,
    /// Digest of the (compressed) blob this index describes.
    pub layer_digest: Digest,
    /// Size of the blob in bytes.
    pub blob_size: u64,
    /// Length of the uncompressed tar stream.
    pub stream_size: u64,
    /// Tar entries in archive order (later entries for the same path win).
    pub entries: Vec<Entry>,
    /// sha256 of each `BLOCK_SIZE` block of the blob; the last one may be short.
    /// For `Access::Spill` these are blocks of the spilled *decompressed* stream.
    pub block_digests: Vec<[u8; 32]>,
    pub access: Access,
}

/// How offsets of the uncompressed tar stream map onto stored bytes.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Access {
    /// Uncompressed tar: stream offsets are blob offsets.
    Tar,
    /// tar+gzip with zran checkpoints, sorted by `out`. The first one is at
    /// `out == 0` (right after the gzip header).
    Gzip { checkpoints: Vec<Checkpoint> },
    /// The decompressed stream is kept in the cache (single-frame zstd).
    Spill,
    /// Seekable layer read through its table of contents: stream offsets are
    /// offsets in the chunks laid end to end, sorted by `stream_offset`.
    Chunked {
        codec: Codec,
        chunks: Vec<Chunk>,
        /// Stream offset where the prioritized files (those before an
        /// eStargz `.prefetch.landmark`) end; 0 when none are marked.
        prefetch_end: u64,
    },
}

impl Index {
    /// Size of the address space a [`BlobSource`] serves for this layer:
    /// the blob itself, or the stream for spilled and chunked layers.
    pub fn source_size(&self) -> u64 {
        match self.access {
            Access::Tar | Access::Gzip { .. } => self.blob_size,
            Access::Spill | Access::Chunked { .. } => self.stream_size,
        }
    }
}

/// How each chunk of a `Chunked` layer is compressed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Codec {
    /// Each chunk starts a gzip member (eStargz).
    Gzip,
    /// Each chunk starts a zstd frame (zstd:chunked).
    Zstd,
}

/// One independently fetched and verified piece of file data.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Chunk {
    /// Where the chunk lies in the layer's virtual stream.
    pub stream_offset: u64,
    /// Uncompressed length.
    pub len: u64,
    /// Compressed bytes to fetch: `[blob_start, blob_end)` starts a gzip
    /// member or zstd frame and decompresses to at least `inner + len` bytes.
    pub blob_start: u64,
    pub blob_end: u64,
    /// Offset of the chunk in what the range decompresses to (eStargz
    /// `innerOffset`: several small files sharing one member).
    pub inner: u64,
    /// sha256 of the chunk's uncompressed bytes, from the verified TOC.
    pub digest: [u8; 32],
}

/// A point where inflation can resume (zlib's `examples/zran.c`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Offset in the uncompressed stream.
    pub out: u64,
    /// Offset in the compressed blob of the first byte *not yet fully consumed*.
    /// When `bits != 0`, the top `bits` bits of the byte at `inp - 1` belong
    /// to the next deflate block and must be primed.
    pub inp: u64,
    pub bits: u8,
    /// The 32 KiB of history before `out`, stored compressed (format is the
    /// zran module's business).
    pub window: Vec<u8>,
}

/// One tar entry, with its path already normalized (see [`normalize_path`]).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    /// Relative path without leading `/` or `./`, no `.`/`..`/empty components.
    /// Empty means the root directory itself (`./` in a tar).
    pub path: Vec<u8>,
    pub kind: EntryKind,
    /// Permission bits including setuid/setgid/sticky (`mode & 0o7777`).
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    /// Modification time, seconds since the epoch.
    pub mtime: i64,
    /// Sub-second part of the mtime (from PAX `mtime`), 0 when absent.
    pub mtime_nsec: u32,
    /// Extended attributes from PAX `SCHILY.xattr.*` records, in archive order.
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum EntryKind {
    Dir,
    File {
        size: u64,
        data: FileData,
    },
    Symlink {
        target: Vec<u8>,
    },
    /// A hardlink to the entry at `target` (normalized like `Entry::path`).
    Hardlink {
        target: Vec<u8>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[cfg(test)]
impl Entry {
    /// An entry owned by root, mode 0644, mtime 0, no xattrs (for tests).
    pub fn plain(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: Vec::new(),
        }
    }
}

/// Where a regular file's bytes live in the uncompressed tar stream.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub enum FileData {
    /// `size` bytes starting at this stream offset.
    Contiguous { offset: u64 },
    /// A sparse file: listed segments hold data, everything else reads as zeros.
    Sparse { segments: Vec<Segment> },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Segment {
    pub file_offset: u64,
    pub stream_offset: u64,
    pub len: u64,
}

/// Verified bytes of a layer blob (or of its spilled stream), by offset.
/// Implemented by the cache over the registry; tests use in-memory blobs.
pub trait BlobSource: Send + Sync {
    /// Exactly `len` bytes at `offset`, every one checked against the index's
    /// block digests. Short only at the end of the blob.
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError>;

    /// Makes blob bytes `offset..offset + len` local (fetched and verified)
    /// without reading them out. Nothing to do for a source that is local.
    fn prefetch(&self, _offset: u64, _len: u64) -> Result<(), SourceError> {
        Ok(())
    }
}

/// Why a [`BlobSource`] could not deliver (network, digest, timeout...).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct SourceError(pub String);

#[derive(Debug, thiserror::Error)]
pub enum LayerError {
    #[error("layer {digest}: digest mismatch: the registry sent bytes hashing to {actual}")]
    DigestMismatch { digest: Digest, actual: Digest },
    #[error("layer {digest}: size mismatch: expected {expected} bytes, got {actual}")]
    SizeMismatch {
        digest: Digest,
        expected: u64,
        actual: u64,
    },
    #[error("layer {digest}: invalid tar at stream offset {offset}: {reason}")]
    Tar {
        digest: Digest,
        offset: u64,
        reason: String,
    },
    #[error("layer {digest}: invalid {format} data at blob offset {offset}: {reason}")]
    Compression {
        digest: Digest,
        format: &'static str,
        offset: u64,
        reason: String,
    },
    #[error("layer {digest}: unsupported: {what}")]
    Unsupported { digest: Digest, what: String },
    #[error("reading layer {digest}: {source}")]
    Source {
        digest: Digest,
        #[source]
        source: SourceError,
    },
    #[error("reading layer {digest}: {source}")]
    Io {
        digest: Digest,
        #[source]
        source: std::io::Error,
    },
    #[error("layer index: {0}")]
    BadIndex(String),
}

/// Normalizes a tar path the way containerd confines it: the path is cleaned
/// as if joined to `/` (so `../../etc/x` becomes `etc/x`, `/abs` becomes
/// `abs`, `./a//b/.` becomes `a/b`). Returns the path without a leading `/`;
/// the empty result is the root directory.
pub fn normalize_path(raw: &[u8]) -> Vec<u8> {
    let mut parts: Vec<&[u8]> = Vec::new();
    for part in raw.split(|&b| b == b'/') {
        match part {
            b"" | b"." => {}
            b".." => {
                parts.pop();
            }
            name => parts.push(name),
        }
    }
    parts.join(&b'/')
}

#[cfg(test)]
mod tests {
    use super::normalize_path;

    #[test]
    fn normalize_confines_paths() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"./", b""),
            (b".", b""),
            (b"/", b""),
            (b"./etc/passwd", b"etc/passwd"),
            (b"/etc//passwd/", b"etc/passwd"),
            (b"../../etc/shadow", b"etc/shadow"),
            (b"a/../../b", b"b"),
            (b"a/./b/../c", b"a/c"),
            (b"usr/lib/\xff\xfe", b"usr/lib/\xff\xfe"),
        ];
        for (raw, want) in cases {
            assert_eq!(
                normalize_path(raw),
                *want,
                "{:?}",
                String::from_utf8_lossy(raw)
            );
        }
    }
}

/// Test data shared by the layer modules' tests.
#[cfg(test)]
pub(crate) mod test_data {
    /// Bytes no compressor can shrink, the same for a seed.
    pub fn noise(len: usize, seed: u64) -> Vec<u8> {
        let mut bytes = vec![0; len];
        rand::RngCore::fill_bytes(
            &mut <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed),
            &mut bytes,
        );
        bytes
    }
}
