//! A streaming tar parser for the indexing pass.
//!
//! Bytes of the uncompressed tar stream are pushed in ([`TarParser::feed`]) in
//! whatever pieces the decompressor produces; file data is skipped by
//! counting, never copied. Every entry becomes a [`layer::Entry`] with the
//! stream offset of its data. Understood: ustar, POSIX PAX (`path`,
//! `linkpath`, `uid`, `gid`, `mtime`, `size`, `SCHILY.xattr.*`, and the
//! Windows records below), GNU long
//! names (`L`/`K`), old GNU sparse files (`S`, with extension headers), PAX
//! sparse formats 0.0, 0.1 and 1.0, star prefixes and base-256 numbers. The
//! reading rules follow Go's `archive/tar`, which is what docker and
//! containerd unpack layers with.
//!
//! Windows layers (written by go-winio's `backuptar`) carry file attributes,
//! security descriptors and creation times in PAX records that no Linux
//! xattr stands for; they are kept as `user.` xattrs, values exactly as in
//! the record (so `getfattr -d` lists them):
//!
//! | PAX record | xattr |
//! |---|---|
//! | `MSWINDOWS.fileattr` (decimal `FILE_ATTRIBUTE_*` bits) | `user.MSWINDOWS.fileattr` |
//! | `MSWINDOWS.rawsd` (base64 security descriptor) | `user.MSWINDOWS.rawsd` |
//! | `LIBARCHIVE.creationtime` (seconds\[.fraction\]) | `user.LIBARCHIVE.creationtime` |
//!
//! The input is untrusted: metadata records are bounded ([`MAX_META_SIZE`],
//! [`MAX_ENTRIES`], [`MAX_SPARSE_SEGMENTS`]) and every problem is an error
//! carrying the stream offset, never a panic.
//!
//! [`layer::Entry`]: crate::layer::Entry

use crate::layer::{Entry, EntryKind, FileData, Segment, normalize_path};

/// Tar's unit: headers are one block, data is padded to whole blocks.
pub const BLOCK: usize = 512;
const BLOCK_U64: u64 = BLOCK as u64;

/// Largest PAX header or GNU long name/link accepted (they are held in memory).
pub const MAX_META_SIZE: u64 = 1 << 20;
/// Most entries one layer may have.
pub const MAX_ENTRIES: usize = 10_000_000;
/// Most data segments one sparse file may have.
pub const MAX_SPARSE_SEGMENTS: usize = 1 << 20;
/// Most digits of a decimal u64.
const MAX_DECIMAL_DIGITS: usize = 20;
/// Go's archive/tar keeps sizes and offsets in an i64.
const MAX_TAR_SIZE: u64 = i64::MAX as u64;

/// Byte ranges of the header fields (POSIX ustar; GNU and star where noted).
mod field {
    use std::ops::Range;
    pub const NAME: Range<usize> = 0..100;
    pub const MODE: Range<usize> = 100..108;
    pub const UID: Range<usize> = 108..116;
    pub const GID: Range<usize> = 116..124;
    pub const SIZE: Range<usize> = 124..136;
    pub const MTIME: Range<usize> = 136..148;
    pub const CHKSUM: Range<usize> = 148..156;
    pub const TYPEFLAG: usize = 156;
    pub const LINKNAME: Range<usize> = 157..257;
    pub const MAGIC: Range<usize> = 257..263;
    pub const VERSION: Range<usize> = 263..265;
    pub const DEVMAJOR: Range<usize> = 329..337;
    pub const DEVMINOR: Range<usize> = 337..345;
    /// ustar/PAX: directory part of long paths.
    pub const PREFIX: Range<usize> = 345..500;
    /// star: a shorter prefix (atime and ctime follow it).
    pub const STAR_PREFIX: Range<usize> = 345..476;
    pub const STAR_TRAILER: Range<usize> = 508..512;
    /// GNU: sparse map (4 entries) inside the header itself.
    pub const GNU_SPARSE: usize = 386;
    pub const GNU_SPARSE_ENTRIES: usize = 4;
    pub const GNU_IS_EXTENDED: usize = 482;
    pub const GNU_REAL_SIZE: Range<usize> = 483..495;
    /// GNU sparse extension header: 21 entries then the is-extended flag.
    pub const EXT_SPARSE_ENTRIES: usize = 21;
    pub const EXT_IS_EXTENDED: usize = 504;
    /// One sparse entry: offset[12] then numbytes[12].
    pub const SPARSE_NUM_LEN: usize = 12;
    pub const SPARSE_ENTRY_LEN: usize = 2 * SPARSE_NUM_LEN;
}

/// Type flags (POSIX, GNU).
mod typeflag {
    pub const REG: u8 = b'0';
    /// Pre-POSIX regular file (a directory when the name ends with `/`).
    pub const REG_OLD: u8 = b'\0';
    pub const LINK: u8 = b'1';
    pub const SYMLINK: u8 = b'2';
    pub const CHAR: u8 = b'3';
    pub const BLOCK: u8 = b'4';
    pub const DIR: u8 = b'5';
    pub const FIFO: u8 = b'6';
    /// Contiguous file: a regular file everywhere that matters.
    pub const CONT: u8 = b'7';
    pub const PAX: u8 = b'x';
    pub const PAX_GLOBAL: u8 = b'g';
    pub const GNU_LONGNAME: u8 = b'L';
    pub const GNU_LONGLINK: u8 = b'K';
    pub const GNU_SPARSE: u8 = b'S';
}

const MAGIC_USTAR: &[u8] = b"ustar\0";
const MAGIC_GNU: &[u8] = b"ustar ";
const VERSION_GNU: &[u8] = b" \0";
const TRAILER_STAR: &[u8] = b"tar\0";
/// The checksum is computed with its own field read as spaces.
const CHKSUM_BLANK: u8 = b' ';
/// First byte of a base-256 number (GNU extension for large values).
const BASE256_FLAG: u8 = 0x80;
const BASE256_NEGATIVE: u8 = 0x40;
const PERMISSION_BITS: u32 = 0o7777;
const NANOS_PER_SEC: u32 = 1_000_000_000;
const NANO_DIGITS: usize = 9;

/// PAX keys imgfs reads.
mod pax {
    pub const PATH: &[u8] = b"path";
    pub const LINKPATH: &[u8] = b"linkpath";
    pub const UID: &[u8] = b"uid";
    pub const GID: &[u8] = b"gid";
    pub const MTIME: &[u8] = b"mtime";
    pub const SIZE: &[u8] = b"size";
    pub const XATTR_PREFIX: &[u8] = b"SCHILY.xattr.";
    /// Windows metadata kept as xattrs named [`WINDOWS_XATTR_PREFIX`] + key.
    pub const WINDOWS_KEYS: &[&[u8]] = &[
        b"MSWINDOWS.fileattr",
        b"MSWINDOWS.rawsd",
        b"LIBARCHIVE.creationtime",
    ];
    pub const WINDOWS_XATTR_PREFIX: &[u8] = b"user.";
    pub const SPARSE_MAJOR: &[u8] = b"GNU.sparse.major";
    pub const SPARSE_MINOR: &[u8] = b"GNU.sparse.minor";
    pub const SPARSE_NAME: &[u8] = b"GNU.sparse.name";
    /// Real size in sparse formats 0.x.
    pub const SPARSE_SIZE: &[u8] = b"GNU.sparse.size";
    /// Real size in sparse format 1.0.
    pub const SPARSE_REALSIZE: &[u8] = b"GNU.sparse.realsize";
    /// Format 0.1: `offset,size,offset,size...`.
    pub const SPARSE_MAP: &[u8] = b"GNU.sparse.map";
    /// Format 0.0: repeated offset/numbytes records.
    pub const SPARSE_OFFSET: &[u8] = b"GNU.sparse.offset";
    pub const SPARSE_NUMBYTES: &[u8] = b"GNU.sparse.numbytes";
}

/// Why a tar stream was refused.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum TarError {
    #[error("at stream offset {offset}: {reason}")]
    Invalid { offset: u64, reason: String },
    #[error("unsupported: {what}")]
    Unsupported { what: String },
}

fn invalid(offset: u64, reason: impl Into<String>) -> TarError {
    TarError::Invalid {
        offset,
        reason: reason.into(),
    }
}

/// Header layouts, as Go's archive/tar tells them apart.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Format {
    V7,
    Ustar,
    Star,
    Gnu,
}

/// What a metadata entry's content is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum MetaKind {
    Pax,
    LongName,
    LongLink,
}

/// Sparse data of PAX records (formats 0.0, 0.1, 1.0).
#[derive(Debug, Default)]
struct PaxSparse {
    major: Option<Vec<u8>>,
    minor: Option<Vec<u8>>,
    name: Option<Vec<u8>>,
    size: Option<u64>,
    realsize: Option<u64>,
    /// Flattened offset, length pairs (formats 0.0 and 0.1).
    map: Option<Vec<u64>>,
}

/// Metadata that applies to the next real entry.
#[derive(Debug, Default)]
struct Pending {
    path: Option<Vec<u8>>,
    linkpath: Option<Vec<u8>>,
    long_name: Option<Vec<u8>>,
    long_link: Option<Vec<u8>>,
    uid: Option<u32>,
    gid: Option<u32>,
    mtime: Option<(i64, u32)>,
    size: Option<u64>,
    xattrs: Vec<(Vec<u8>, Vec<u8>)>,
    sparse: PaxSparse,
}

/// A sparse entry whose map is still being read.
#[derive(Debug)]
struct SparseInProgress {
    entry: Entry,
    real_size: u64,
    /// Bytes of the entry's data area (map included for PAX 1.0).
    stored_size: u64,
    /// Flattened offset, length pairs read so far.
    pairs: Vec<u64>,
}

/// Incremental reader of the PAX 1.0 sparse map: decimal lines at the start
/// of the entry's data, padded to a whole block.
#[derive(Debug, Default)]
struct MapReader {
    /// Numbers expected after the count; `None` until the count is read.
    expected: Option<usize>,
    values: Vec<u64>,
    current: u64,
    digits: usize,
    /// Bytes of map text read so far.
    consumed: u64,
}

#[derive(Debug)]
enum State {
    Header,
    /// One zero block seen: the next must be zero too (or the stream ends).
    ZeroSeen,
    /// After the end-of-archive marker: everything else is ignored.
    End,
    Skip {
        remaining: u64,
    },
    Meta {
        kind: MetaKind,
        remaining: u64,
        pad: u64,
    },
    SparseExt(Box<SparseInProgress>),
    SparseMap(Box<SparseInProgress>, MapReader),
}

/// Push parser over the uncompressed tar stream.
#[derive(Debug)]
pub struct TarParser {
    /// Stream offset of the next byte fed.
    pos: u64,
    state: State,
    /// A header or extension block split across feeds.
    block: Box<[u8; BLOCK]>,
    block_len: usize,
    meta: Vec<u8>,
    pending: Pending,
    entries: Vec<Entry>,
    /// Stream offset where each entry's raw bytes end (after its padded
    /// data); entry `k`'s raw bytes, extension headers included, are
    /// `ends[k-1]..ends[k]`. Kept for layer rewriting.
    ends: Vec<u64>,
}

impl Default for TarParser {
    fn default() -> Self {
        Self::new()
    }
}

impl TarParser {
    pub fn new() -> Self {
        TarParser {
            pos: 0,
            state: State::Header,
            block: Box::new([0; BLOCK]),
            block_len: 0,
            meta: Vec::new(),
            pending: Pending::default(),
            entries: Vec::new(),
            ends: Vec::new(),
        }
    }

    /// Stream offset of the next byte to be fed.
    pub fn position(&self) -> u64 {
        self.pos
    }

    /// Parses the next bytes of the stream.
    pub fn feed(&mut self, mut data: &[u8]) -> Result<(), TarError> {
        while !data.is_empty() {
            let used = self.step(data)?;
            data = &data[used..];
            self.pos += used as u64;
            let between = matches!(self.state, State::Header | State::ZeroSeen | State::End);
            if between && self.block_len == 0 && self.ends.len() < self.entries.len() {
                self.ends.push(self.pos);
            }
        }
        Ok(())
    }

    /// [`Self::finish`], also giving where each entry's raw bytes end.
    pub fn finish_with_ends(mut self) -> Result<(Vec<Entry>, Vec<u64>), TarError> {
        let ends = std::mem::take(&mut self.ends);
        let entries = self.finish()?;
        if ends.len() != entries.len() {
            return Err(invalid(0, "entry boundaries were lost"));
        }
        Ok((entries, ends))
    }

    /// Ends the stream: it must end between entries.
    pub fn finish(self) -> Result<Vec<Entry>, TarError> {
        let clean = match self.state {
            State::Header | State::ZeroSeen => self.block_len == 0,
            State::End => true,
            _ => false,
        };
        if clean {
            Ok(self.entries)
        } else {
            Err(invalid(self.pos, "tar stream ends inside an entry"))
        }
    }

    /// Consumes a prefix of `data` according to the state; returns its length.
    fn step(&mut self, data: &[u8]) -> Result<usize, TarError> {
        match &mut self.state {
            State::End => Ok(data.len()),
            State::Skip { remaining } => {
                let n = clamp(*remaining, data.len());
                *remaining -= n as u64;
                if *remaining == 0 {
                    self.state = State::Header;
                }
                Ok(n)
            }
            State::Meta {
                kind,
                remaining,
                pad,
            } => {
                let (kind, pad) = (*kind, *pad);
                let n = clamp(*remaining, data.len());
                *remaining -= n as u64;
                let done = *remaining == 0;
                self.meta.extend_from_slice(&data[..n]);
                if done {
                    let content = std::mem::take(&mut self.meta);
                    let start = self.pos + n as u64 - content.len() as u64;
                    self.on_meta(kind, &content, start)?;
                    self.skip(pad);
                }
                Ok(n)
            }
            State::SparseMap(sparse, map) => {
                let limit = clamp(sparse.stored_size - map.consumed, data.len());
                let (n, done) = map.feed(&data[..limit]).map_err(|e| invalid(self.pos, e))?;
                if done {
                    self.on_sparse_map_done(n)?;
                } else if map.consumed == sparse.stored_size {
                    return Err(invalid(
                        self.pos,
                        "PAX sparse map runs past the entry's data",
                    ));
                }
                Ok(n)
            }
            State::Header | State::ZeroSeen | State::SparseExt(_) => {
                if self.block_len == 0 && data.len() >= BLOCK {
                    let mut block = [0u8; BLOCK];
                    block.copy_from_slice(&data[..BLOCK]);
                    self.on_block(&block, self.pos)?;
                    return Ok(BLOCK);
                }
                let n = (BLOCK - self.block_len).min(data.len());
                self.block[self.block_len..self.block_len + n].copy_from_slice(&data[..n]);
                self.block_len += n;
                if self.block_len == BLOCK {
                    self.block_len = 0;
                    let block = *self.block;
                    let start = self.pos + n as u64 - BLOCK_U64;
                    self.on_block(&block, start)?;
                }
                Ok(n)
            }
        }
    }

    /// Skips `n` bytes (data and padding) before the next header.
    fn skip(&mut self, n: u64) {
        self.state = if n == 0 {
            State::Header
        } else {
            State::Skip { remaining: n }
        };
    }

    /// A whole block at stream offset `at` in a block-reading state.
    fn on_block(&mut self, block: &[u8; BLOCK], at: u64) -> Result<(), TarError> {
        match std::mem::replace(&mut self.state, State::Header) {
            State::SparseExt(sparse) => self.on_sparse_ext(sparse, block, at),
            State::ZeroSeen => {
                if is_zero(block) {
                    self.state = State::End;
                    Ok(())
                } else {
                    Err(invalid(
                        at,
                        "a zero block followed by a header (corrupt archive)",
                    ))
                }
            }
            _ => self.on_header(block, at),
        }
    }

    fn on_header(&mut self, hdr: &[u8; BLOCK], at: u64) -> Result<(), TarError> {
        if is_zero(hdr) {
            self.state = State::ZeroSeen;
            return Ok(());
        }
        verify_checksum(hdr).map_err(|e| invalid(at, e))?;
        let format = detect_format(hdr);
        let num = |range: std::ops::Range<usize>, what: &str| {
            parse_numeric(&hdr[range]).map_err(|e| invalid(at, format!("header {what}: {e}")))
        };
        let header_size = num(field::SIZE, "size")?;
        let header_size = u64::try_from(header_size)
            .map_err(|_| invalid(at, format!("negative entry size {header_size}")))?;
        let flag = hdr[field::TYPEFLAG];
        match flag {
            typeflag::PAX | typeflag::GNU_LONGNAME | typeflag::GNU_LONGLINK => {
                if header_size > MAX_META_SIZE {
                    return Err(invalid(
                        at,
                        format!("metadata entry of {header_size} bytes exceeds {MAX_META_SIZE}"),
                    ));
                }
                let kind = match flag {
                    typeflag::PAX => MetaKind::Pax,
                    typeflag::GNU_LONGNAME => MetaKind::LongName,
                    _ => MetaKind::LongLink,
                };
                self.meta.clear();
                if header_size == 0 {
                    self.on_meta(kind, &[], at + BLOCK_U64)?;
                    self.state = State::Header;
                } else {
                    let pad = padding(header_size);
                    self.state = State::Meta {
                        kind,
                        remaining: header_size,
                        pad,
                    };
                }
                Ok(())
            }
            typeflag::PAX_GLOBAL => {
                // Docker and containerd unpack with Go's archive/tar, which hands
                // global headers over as entries that both then skip; honoring
                // them would show metadata that `docker run` does not.
                tracing::debug!(offset = at, "ignoring PAX global header");
                self.skip(padded(header_size).ok_or_else(|| invalid(at, "absurd entry size"))?);
                Ok(())
            }
            _ => self.on_entry_header(hdr, at, format, header_size),
        }
    }

    /// Content of a PAX header or GNU long name/link, at stream offset `at`.
    fn on_meta(&mut self, kind: MetaKind, content: &[u8], at: u64) -> Result<(), TarError> {
        match kind {
            MetaKind::LongName => self.pending.long_name = Some(c_string(content).to_vec()),
            MetaKind::LongLink => self.pending.long_link = Some(c_string(content).to_vec()),
            MetaKind::Pax => {
                // A later PAX header replaces an earlier one (as in Go), which
                // also keeps the pending metadata bounded by MAX_META_SIZE.
                self.pending = Pending {
                    long_name: self.pending.long_name.take(),
                    long_link: self.pending.long_link.take(),
                    ..Pending::default()
                };
                parse_pax(content, &mut self.pending).map_err(|e| invalid(at, e))?
            }
        }
        Ok(())
    }

    /// A header describing a real entry (not metadata).
    fn on_entry_header(
        &mut self,
        hdr: &[u8; BLOCK],
        at: u64,
        format: Format,
        header_size: u64,
    ) -> Result<(), TarError> {
        if self.entries.len() >= MAX_ENTRIES {
            return Err(invalid(at, format!("more than {MAX_ENTRIES} entries")));
        }
        let pending = std::mem::take(&mut self.pending);
        let stored_size = pending.size.unwrap_or(header_size);
        let padded_size = padded(stored_size).ok_or_else(|| invalid(at, "absurd entry size"))?;
        let (raw_path, raw_link) = entry_names(hdr, format, &pending);
        let fields = Fields { hdr, at };
        let mut flag = hdr[field::TYPEFLAG];
        if flag == typeflag::REG_OLD && raw_path.ends_with(b"/") {
            flag = typeflag::DIR;
        }
        let Some(kind) = fields.kind(flag, raw_link, stored_size)? else {
            tracing::warn!(
                offset = at,
                typeflag = %char::from(flag).escape_default(),
                path = %String::from_utf8_lossy(&raw_path),
                "skipping tar entry of unknown type"
            );
            self.skip(padded_size);
            return Ok(());
        };
        let is_file = matches!(kind, EntryKind::File { .. });
        let (mtime, mtime_nsec) = match pending.mtime {
            Some(t) => t,
            None => (fields.number(field::MTIME, "mtime")?, 0),
        };
        let entry = Entry {
            path: normalize_path(&raw_path),
            kind,
            mode: fields.id(field::MODE, "mode")? & PERMISSION_BITS,
            uid: pending
                .uid
                .map_or_else(|| fields.id(field::UID, "uid"), Ok)?,
            gid: pending
                .gid
                .map_or_else(|| fields.id(field::GID, "gid"), Ok)?,
            mtime,
            mtime_nsec,
            xattrs: pending.xattrs,
        };
        if flag == typeflag::GNU_SPARSE {
            return self.start_gnu_sparse(hdr, at, entry, stored_size);
        }
        if is_file {
            if let Some(version) = pax_sparse_version(&pending.sparse, &raw_path)? {
                return self.start_pax_sparse(version, pending.sparse, at, entry, stored_size);
            }
        }
        self.entries.push(entry);
        // Links, devices, directories and fifos have no data whatever their
        // size field says (as in Go's archive/tar).
        self.skip(if is_file { padded_size } else { 0 });
        Ok(())
    }

    /// Old GNU sparse (`S`): up to 4 map entries in the header, more in
    /// extension blocks; data of the listed segments follows, concatenated.
    fn start_gnu_sparse(
        &mut self,
        hdr: &[u8; BLOCK],
        at: u64,
        entry: Entry,
        stored_size: u64,
    ) -> Result<(), TarError> {
        let real_size = parse_numeric(&hdr[field::GNU_REAL_SIZE])
            .ok()
            .and_then(|v| u64::try_from(v).ok())
            .ok_or_else(|| invalid(at, "GNU sparse header: invalid real size"))?;
        let mut sparse = Box::new(SparseInProgress {
            entry,
            real_size,
            stored_size,
            pairs: Vec::new(),
        });
        let map = &hdr[field::GNU_SPARSE
            ..field::GNU_SPARSE + field::GNU_SPARSE_ENTRIES * field::SPARSE_ENTRY_LEN];
        read_gnu_sparse_entries(map, &mut sparse.pairs).map_err(|e| invalid(at, e))?;
        if hdr[field::GNU_IS_EXTENDED] != 0 {
            self.state = State::SparseExt(sparse);
            Ok(())
        } else {
            self.finish_sparse(*sparse, at + BLOCK_U64, 0, 0)
        }
    }

    fn on_sparse_ext(
        &mut self,
        mut sparse: Box<SparseInProgress>,
        block: &[u8; BLOCK],
        at: u64,
    ) -> Result<(), TarError> {
        let map = &block[..field::EXT_SPARSE_ENTRIES * field::SPARSE_ENTRY_LEN];
        read_gnu_sparse_entries(map, &mut sparse.pairs).map_err(|e| invalid(at, e))?;
        if sparse.pairs.len() / 2 > MAX_SPARSE_SEGMENTS {
            return Err(invalid(
                at,
                format!("more than {MAX_SPARSE_SEGMENTS} sparse segments"),
            ));
        }
        if block[field::EXT_IS_EXTENDED] != 0 {
            self.state = State::SparseExt(sparse);
            Ok(())
        } else {
            self.finish_sparse(*sparse, at + BLOCK_U64, 0, 0)
        }
    }

    fn start_pax_sparse(
        &mut self,
        version: SparseVersion,
        pax: PaxSparse,
        at: u64,
        entry: Entry,
        stored_size: u64,
    ) -> Result<(), TarError> {
        let real_size = match version {
            SparseVersion::V0 => pax.size,
            SparseVersion::V1 => pax.realsize,
        };
        let real_size =
            real_size.ok_or_else(|| invalid(at, "PAX sparse file without its real size"))?;
        let mut sparse = SparseInProgress {
            entry,
            real_size,
            stored_size,
            pairs: Vec::new(),
        };
        match version {
            SparseVersion::V0 => {
                sparse.pairs = pax.map.unwrap_or_default();
                self.finish_sparse(sparse, at + BLOCK_U64, 0, 0)
            }
            SparseVersion::V1 => {
                self.state = State::SparseMap(Box::new(sparse), MapReader::default());
                Ok(())
            }
        }
    }

    /// The PAX 1.0 map text ends `used` bytes after `self.pos`.
    fn on_sparse_map_done(&mut self, used: usize) -> Result<(), TarError> {
        let State::SparseMap(sparse, map) = std::mem::replace(&mut self.state, State::Header)
        else {
            return Ok(());
        };
        let text_end = self.pos + used as u64;
        let area_start = text_end - map.consumed;
        let map_len = padded(map.consumed).ok_or_else(|| invalid(text_end, "absurd sparse map"))?;
        if map_len > sparse.stored_size {
            return Err(invalid(
                text_end,
                "PAX sparse map is longer than the entry's data",
            ));
        }
        let mut sparse = *sparse;
        sparse.pairs = map.values;
        self.finish_sparse(sparse, area_start + map_len, map_len, map.consumed)
    }

    /// Validates the map (as Go's archive/tar does), turns it into segments
    /// whose data starts at stream offset `data_start`, records the entry
    /// and skips its data. `map_len` bytes of the stored size hold an in-data
    /// map, of which `already_read` bytes were consumed.
    fn finish_sparse(
        &mut self,
        sparse: SparseInProgress,
        data_start: u64,
        map_len: u64,
        already_read: u64,
    ) -> Result<(), TarError> {
        let SparseInProgress {
            mut entry,
            real_size,
            stored_size,
            pairs,
        } = sparse;
        let name = String::from_utf8_lossy(&entry.path).into_owned();
        let bad = |reason: &str| invalid(data_start, format!("sparse file {name}: {reason}"));
        if pairs.len() % 2 != 0 {
            return Err(bad("odd number of sparse map values"));
        }
        if pairs.len() / 2 > MAX_SPARSE_SEGMENTS {
            return Err(bad("too many sparse segments"));
        }
        let data_size = stored_size - map_len;
        let mut segments = Vec::with_capacity(pairs.len() / 2);
        let mut prev_end = 0u64;
        let mut stream_offset = data_start;
        for pair in pairs.chunks_exact(2) {
            let (offset, len) = (pair[0], pair[1]);
            let end = offset
                .checked_add(len)
                .ok_or_else(|| bad("segment overflows"))?;
            if end > real_size || offset < prev_end || end > MAX_TAR_SIZE {
                return Err(bad(
                    "segments overlap, are out of order or exceed the file size",
                ));
            }
            prev_end = end;
            if len > 0 {
                segments.push(Segment {
                    file_offset: offset,
                    stream_offset,
                    len,
                });
                stream_offset += len;
            }
        }
        if stream_offset - data_start != data_size {
            return Err(bad(&format!(
                "map lists {} bytes of data but the entry stores {data_size}",
                stream_offset - data_start
            )));
        }
        let total = padded(stored_size).ok_or_else(|| bad("absurd size"))?;
        entry.kind = EntryKind::File {
            size: real_size,
            data: FileData::Sparse { segments },
        };
        self.entries.push(entry);
        self.skip(total - already_read);
        Ok(())
    }
}

/// The entry's path and link target: PAX records win over GNU long
/// names, which win over the header fields.
fn entry_names(hdr: &[u8; BLOCK], format: Format, pending: &Pending) -> (Vec<u8>, Vec<u8>) {
    let path = pending
        .sparse
        .name
        .as_ref()
        .or(pending.path.as_ref())
        .or(pending.long_name.as_ref())
        .cloned()
        .unwrap_or_else(|| header_path(hdr, format));
    let link = pending
        .linkpath
        .as_ref()
        .or(pending.long_link.as_ref())
        .cloned()
        .unwrap_or_else(|| c_string(&hdr[field::LINKNAME]).to_vec());
    (path, link)
}

/// Numeric fields of one header, with errors pointing at it.
struct Fields<'a> {
    hdr: &'a [u8; BLOCK],
    at: u64,
}

impl Fields<'_> {
    fn number(&self, range: std::ops::Range<usize>, what: &str) -> Result<i64, TarError> {
        parse_numeric(&self.hdr[range]).map_err(|e| invalid(self.at, format!("header {what}: {e}")))
    }

    fn id(&self, range: std::ops::Range<usize>, what: &str) -> Result<u32, TarError> {
        let value = self.number(range, what)?;
        u32::try_from(value).map_err(|_| invalid(self.at, format!("{what} {value} out of range")))
    }

    /// The entry kind for `flag`, `None` for types imgfs does not know.
    fn kind(
        &self,
        flag: u8,
        link: Vec<u8>,
        stored_size: u64,
    ) -> Result<Option<EntryKind>, TarError> {
        let kind = match flag {
            typeflag::REG | typeflag::REG_OLD | typeflag::CONT => EntryKind::File {
                size: stored_size,
                data: FileData::Contiguous {
                    offset: self.at + BLOCK_U64,
                },
            },
            // Size and segments are set once the sparse map is read.
            typeflag::GNU_SPARSE => EntryKind::File {
                size: 0,
                data: FileData::Sparse {
                    segments: Vec::new(),
                },
            },
            typeflag::DIR => EntryKind::Dir,
            typeflag::SYMLINK => EntryKind::Symlink { target: link },
            typeflag::LINK => EntryKind::Hardlink {
                target: normalize_path(&link),
            },
            typeflag::CHAR => EntryKind::CharDevice {
                major: self.id(field::DEVMAJOR, "device major")?,
                minor: self.id(field::DEVMINOR, "device minor")?,
            },
            typeflag::BLOCK => EntryKind::BlockDevice {
                major: self.id(field::DEVMAJOR, "device major")?,
                minor: self.id(field::DEVMINOR, "device minor")?,
            },
            typeflag::FIFO => EntryKind::Fifo,
            _ => return Ok(None),
        };
        Ok(Some(kind))
    }
}

/// Which PAX sparse format an entry uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum SparseVersion {
    /// 0.0 and 0.1: the map is in the PAX records.
    V0,
    /// 1.0: the map is at the start of the entry's data.
    V1,
}

/// Identifies the PAX sparse format like Go's archive/tar, except that an
/// unknown version is refused instead of exposing the raw map as file bytes.
fn pax_sparse_version(sparse: &PaxSparse, path: &[u8]) -> Result<Option<SparseVersion>, TarError> {
    let version = match (sparse.major.as_deref(), sparse.minor.as_deref()) {
        (Some(b"0"), Some(b"0" | b"1")) => SparseVersion::V0,
        (Some(b"1"), Some(b"0")) => SparseVersion::V1,
        (None, None) if sparse.map.is_some() || sparse.size.is_some() => SparseVersion::V0,
        (None, None) if sparse.realsize.is_none() => return Ok(None),
        (major, minor) => {
            let text = |v: Option<&[u8]>| String::from_utf8_lossy(v.unwrap_or(b"?")).into_owned();
            return Err(TarError::Unsupported {
                what: format!(
                    "entry {}: GNU PAX sparse format {}.{}",
                    String::from_utf8_lossy(path),
                    text(major),
                    text(minor)
                ),
            });
        }
    };
    Ok(Some(version))
}

impl MapReader {
    /// Reads map text; returns the bytes used and whether the map is complete.
    fn feed(&mut self, data: &[u8]) -> Result<(usize, bool), String> {
        for (i, &b) in data.iter().enumerate() {
            match b {
                b'0'..=b'9' => {
                    self.digits += 1;
                    self.current = self
                        .current
                        .checked_mul(10)
                        .and_then(|v| v.checked_add(u64::from(b - b'0')))
                        .filter(|_| self.digits <= MAX_DECIMAL_DIGITS)
                        .ok_or("PAX sparse map: number too large")?;
                }
                b'\n' if self.digits > 0 => {
                    let value = std::mem::take(&mut self.current);
                    self.digits = 0;
                    match self.expected {
                        None => {
                            let count = usize::try_from(value)
                                .ok()
                                .filter(|&c| c <= MAX_SPARSE_SEGMENTS)
                                .ok_or("PAX sparse map: too many segments")?;
                            self.expected = Some(2 * count);
                        }
                        Some(_) => self.values.push(value),
                    }
                    if self.expected == Some(self.values.len()) {
                        self.consumed += i as u64 + 1;
                        return Ok((i + 1, true));
                    }
                }
                _ => return Err("PAX sparse map: malformed line".into()),
            }
        }
        self.consumed += data.len() as u64;
        Ok((data.len(), false))
    }
}

/// Appends the (offset, length) pairs of GNU sparse map entries; an entry
/// starting with NUL ends the list.
fn read_gnu_sparse_entries(map: &[u8], pairs: &mut Vec<u64>) -> Result<(), String> {
    for entry in map.chunks_exact(field::SPARSE_ENTRY_LEN) {
        if entry[0] == 0 {
            break;
        }
        let (offset, len) = entry.split_at(field::SPARSE_NUM_LEN);
        for number in [offset, len] {
            let value = parse_numeric(number).map_err(|e| format!("GNU sparse map: {e}"))?;
            let value = u64::try_from(value).map_err(|_| "GNU sparse map: negative value")?;
            pairs.push(value);
        }
    }
    Ok(())
}

/// Applies one PAX record to the pending metadata.
fn apply_pax(key: &[u8], value: &[u8], p: &mut Pending) -> Result<(), String> {
    let owned = || (!value.is_empty()).then(|| value.to_vec());
    let number = |what: &str| parse_decimal(value).map_err(|e| format!("PAX {what}: {e}"));
    let id = |what: &str| {
        number(what)
            .and_then(|v| u32::try_from(v).map_err(|_| format!("PAX {what} {v} out of range")))
    };
    match key {
        pax::PATH => p.path = owned(),
        pax::LINKPATH => p.linkpath = owned(),
        pax::UID => p.uid = Some(id("uid")?),
        pax::GID => p.gid = Some(id("gid")?),
        pax::MTIME => p.mtime = Some(parse_pax_time(value)?),
        pax::SIZE => {
            let size = number("size")?;
            if size > MAX_TAR_SIZE {
                return Err(format!("PAX size {size} out of range"));
            }
            p.size = Some(size);
        }
        pax::SPARSE_MAJOR => p.sparse.major = Some(value.to_vec()),
        pax::SPARSE_MINOR => p.sparse.minor = Some(value.to_vec()),
        pax::SPARSE_NAME => p.sparse.name = owned(),
        pax::SPARSE_SIZE => p.sparse.size = Some(number("GNU.sparse.size")?),
        pax::SPARSE_REALSIZE => p.sparse.realsize = Some(number("GNU.sparse.realsize")?),
        pax::SPARSE_MAP => {
            let mut values = Vec::new();
            if !value.is_empty() {
                for part in value.split(|&b| b == b',') {
                    if values.len() >= 2 * MAX_SPARSE_SEGMENTS {
                        return Err("GNU.sparse.map: too many segments".into());
                    }
                    values.push(parse_decimal(part).map_err(|e| format!("GNU.sparse.map: {e}"))?);
                }
            }
            p.sparse.map = Some(values);
        }
        pax::SPARSE_OFFSET | pax::SPARSE_NUMBYTES => {
            let map = p.sparse.map.get_or_insert_with(Vec::new);
            let wants_offset = map.len() % 2 == 0;
            if wants_offset != (key == pax::SPARSE_OFFSET) || map.len() >= 2 * MAX_SPARSE_SEGMENTS {
                return Err("GNU.sparse.offset/numbytes records out of order".into());
            }
            map.push(parse_decimal(value).map_err(|e| format!("GNU sparse 0.0 map: {e}"))?);
        }
        _ => {
            if let Some(name) = key
                .strip_prefix(pax::XATTR_PREFIX)
                .filter(|n| !n.is_empty())
            {
                set_xattr(p, name.to_vec(), value);
            } else if pax::WINDOWS_KEYS.contains(&key) {
                set_xattr(p, [pax::WINDOWS_XATTR_PREFIX, key].concat(), value);
            }
        }
    }
    Ok(())
}

/// A later record for the same xattr replaces the earlier one.
fn set_xattr(p: &mut Pending, name: Vec<u8>, value: &[u8]) {
    p.xattrs.retain(|(n, _)| *n != name);
    p.xattrs.push((name, value.to_vec()));
}

/// Parses PAX records (`"%d %s=%s\n"`, the length counting the whole record).
fn parse_pax(mut rest: &[u8], pending: &mut Pending) -> Result<(), String> {
    while !rest.is_empty() {
        if rest.iter().all(|&b| b == 0) {
            break; // some writers pad the record block with NULs
        }
        let space = rest
            .iter()
            .take(MAX_DECIMAL_DIGITS + 1)
            .position(|&b| b == b' ')
            .ok_or("PAX record without a length")?;
        let len = parse_decimal(&rest[..space]).map_err(|e| format!("PAX record length: {e}"))?;
        let len = usize::try_from(len)
            .ok()
            .filter(|&l| l > space + 1 && l <= rest.len())
            .ok_or("PAX record length out of range")?;
        let record = &rest[space + 1..len];
        let body = record
            .strip_suffix(b"\n")
            .ok_or("PAX record does not end with a newline")?;
        let eq = body
            .iter()
            .position(|&b| b == b'=')
            .ok_or("PAX record without '='")?;
        apply_pax(&body[..eq], &body[eq + 1..], pending)?;
        rest = &rest[len..];
    }
    Ok(())
}

/// PAX time: decimal seconds, optionally negative, with up to nanosecond
/// (extra digits are truncated) fraction.
fn parse_pax_time(value: &[u8]) -> Result<(i64, u32), String> {
    let bad = || format!("PAX mtime {:?} is invalid", String::from_utf8_lossy(value));
    let (negative, unsigned) = match value.strip_prefix(b"-") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    let (secs, frac) = match unsigned.iter().position(|&b| b == b'.') {
        Some(dot) => (&unsigned[..dot], &unsigned[dot + 1..]),
        None => (unsigned, &[][..]),
    };
    let secs = i64::try_from(parse_decimal(secs).map_err(|_| bad())?).map_err(|_| bad())?;
    if !frac.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let mut nanos = 0u32;
    for i in 0..NANO_DIGITS {
        nanos = nanos * 10 + frac.get(i).map_or(0, |d| u32::from(d - b'0'));
    }
    if !negative {
        return Ok((secs, nanos));
    }
    if nanos == 0 {
        Ok((-secs, 0))
    } else {
        Ok((-secs - 1, NANOS_PER_SEC - nanos))
    }
}

fn parse_decimal(text: &[u8]) -> Result<u64, String> {
    if text.is_empty() || text.len() > MAX_DECIMAL_DIGITS || !text.iter().all(u8::is_ascii_digit) {
        return Err(format!(
            "{:?} is not a decimal number",
            String::from_utf8_lossy(text)
        ));
    }
    text.iter()
        .try_fold(0u64, |acc, d| {
            acc.checked_mul(10)?.checked_add(u64::from(d - b'0'))
        })
        .ok_or_else(|| "number too large".to_string())
}

/// A numeric header field: octal text (padded with spaces or NULs), or
/// GNU base-256 two's complement when the first byte has its top bit set.
fn parse_numeric(field: &[u8]) -> Result<i64, String> {
    if let Some(&first) = field.first().filter(|&&b| b & BASE256_FLAG != 0) {
        let invert = if first & BASE256_NEGATIVE != 0 {
            0xff
        } else {
            0
        };
        let mut value: u64 = 0;
        for (i, &byte) in field.iter().enumerate() {
            let mut byte = byte ^ invert;
            if i == 0 {
                byte &= !BASE256_FLAG;
            }
            if value >> 56 != 0 {
                return Err("base-256 number overflows".into());
            }
            value = value << 8 | u64::from(byte);
        }
        let value = i64::try_from(value).map_err(|_| "base-256 number overflows".to_string())?;
        return Ok(if invert != 0 { !value } else { value });
    }
    let trimmed = trim(field);
    if trimmed.is_empty() {
        return Ok(0);
    }
    let mut value: i64 = 0;
    for &d in trimmed {
        if !(b'0'..=b'7').contains(&d) {
            return Err(format!(
                "{:?} is not an octal number",
                String::from_utf8_lossy(field)
            ));
        }
        value = value
            .checked_mul(8)
            .and_then(|v| v.checked_add(i64::from(d - b'0')))
            .ok_or("octal number overflows")?;
    }
    Ok(value)
}

/// Strips leading and trailing spaces and NULs.
fn trim(field: &[u8]) -> &[u8] {
    let pad = |b: &u8| *b == b' ' || *b == 0;
    let start = field.iter().position(|b| !pad(b)).unwrap_or(field.len());
    let end = field.iter().rposition(|b| !pad(b)).map_or(start, |e| e + 1);
    &field[start..end]
}

/// The bytes before the first NUL.
fn c_string(field: &[u8]) -> &[u8] {
    let end = field.iter().position(|&b| b == 0).unwrap_or(field.len());
    &field[..end]
}

fn is_zero(block: &[u8; BLOCK]) -> bool {
    block.iter().all(|&b| b == 0)
}

/// Accepts the unsigned sum (POSIX) or the signed one (some old tars).
fn verify_checksum(hdr: &[u8; BLOCK]) -> Result<(), String> {
    let stored = parse_numeric(&hdr[field::CHKSUM]).map_err(|e| format!("header checksum: {e}"))?;
    let (mut unsigned, mut signed) = (0i64, 0i64);
    for (i, &b) in hdr.iter().enumerate() {
        let b = if field::CHKSUM.contains(&i) {
            CHKSUM_BLANK
        } else {
            b
        };
        unsigned += i64::from(b);
        signed += i64::from(b as i8);
    }
    if stored == unsigned || stored == signed {
        Ok(())
    } else {
        Err(format!(
            "header checksum mismatch (stored {stored}, computed {unsigned})"
        ))
    }
}

fn detect_format(hdr: &[u8; BLOCK]) -> Format {
    let magic = &hdr[field::MAGIC];
    let version = &hdr[field::VERSION];
    if magic == MAGIC_USTAR && &hdr[field::STAR_TRAILER] == TRAILER_STAR {
        Format::Star
    } else if magic == MAGIC_USTAR {
        Format::Ustar
    } else if magic == MAGIC_GNU && version == VERSION_GNU {
        Format::Gnu
    } else {
        Format::V7
    }
}

/// The entry name from the header fields alone (prefix + name).
fn header_path(hdr: &[u8; BLOCK], format: Format) -> Vec<u8> {
    let name = c_string(&hdr[field::NAME]);
    let prefix = match format {
        Format::Ustar => c_string(&hdr[field::PREFIX]),
        Format::Star => c_string(&hdr[field::STAR_PREFIX]),
        Format::Gnu | Format::V7 => &[],
    };
    if prefix.is_empty() {
        return name.to_vec();
    }
    let mut path = Vec::with_capacity(prefix.len() + 1 + name.len());
    path.extend_from_slice(prefix);
    path.push(b'/');
    path.extend_from_slice(name);
    path
}

/// Zero bytes after `size` bytes of data, up to the next block.
fn padding(size: u64) -> u64 {
    (BLOCK_U64 - size % BLOCK_U64) % BLOCK_U64
}

/// `size` rounded up to whole blocks, `None` when that overflows.
fn padded(size: u64) -> Option<u64> {
    size.checked_add(padding(size))
}

fn clamp(remaining: u64, available: usize) -> usize {
    usize::try_from(remaining).map_or(available, |r| r.min(available))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn octal(field: &mut [u8], value: u64) {
        let text = format!("{value:0width$o}", width = field.len() - 1);
        field[..text.len()].copy_from_slice(text.as_bytes());
        field[text.len()..].fill(0);
    }

    fn set_checksum(hdr: &mut [u8; BLOCK]) {
        hdr[field::CHKSUM].fill(b' ');
        let sum: u64 = hdr.iter().map(|&b| u64::from(b)).sum();
        let text = format!("{sum:06o}\0 ");
        hdr[field::CHKSUM].copy_from_slice(text.as_bytes());
    }

    /// A ustar header with the given fields; `tweak` edits it before the checksum.
    fn header(
        name: &[u8],
        flag: u8,
        size: u64,
        tweak: impl FnOnce(&mut [u8; BLOCK]),
    ) -> [u8; BLOCK] {
        let mut hdr = [0u8; BLOCK];
        hdr[..name.len()].copy_from_slice(name);
        octal(&mut hdr[field::MODE], 0o644);
        octal(&mut hdr[field::UID], 1000);
        octal(&mut hdr[field::GID], 100);
        octal(&mut hdr[field::SIZE], size);
        octal(&mut hdr[field::MTIME], 1_700_000_000);
        hdr[field::TYPEFLAG] = flag;
        hdr[field::MAGIC].copy_from_slice(MAGIC_USTAR);
        hdr[field::VERSION].copy_from_slice(b"00");
        tweak(&mut hdr);
        set_checksum(&mut hdr);
        hdr
    }

    /// Appends a header and its data, padded.
    fn push(out: &mut Vec<u8>, hdr: [u8; BLOCK], data: &[u8]) {
        out.extend_from_slice(&hdr);
        out.extend_from_slice(data);
        out.resize(out.len() + padding(data.len() as u64) as usize, 0);
    }

    fn pax_records(records: &[(&[u8], &[u8])]) -> Vec<u8> {
        let mut out = Vec::new();
        for (key, value) in records {
            let body_len = key.len() + value.len() + 3; // ' ', '=', '\n'
            let mut len = body_len + 1;
            while len != body_len + len.to_string().len() {
                len = body_len + len.to_string().len();
            }
            out.extend_from_slice(format!("{len} ").as_bytes());
            out.extend_from_slice(key);
            out.push(b'=');
            out.extend_from_slice(value);
            out.push(b'\n');
        }
        out
    }

    fn end(out: &mut Vec<u8>) {
        out.extend_from_slice(&[0u8; 2 * BLOCK]);
    }

    fn parse(bytes: &[u8]) -> Result<Vec<Entry>, TarError> {
        let mut parser = TarParser::new();
        parser.feed(bytes)?;
        parser.finish()
    }

    /// Parses in 1-byte and odd-sized pieces too; all must agree.
    fn parse_all_ways(bytes: &[u8]) -> Result<Vec<Entry>, TarError> {
        let whole = parse(bytes);
        for piece in [1, 7, 511, 513] {
            let mut parser = TarParser::new();
            let split = bytes
                .chunks(piece)
                .try_for_each(|c| parser.feed(c))
                .and_then(|()| parser.finish());
            assert_eq!(split, whole, "piece size {piece}");
        }
        whole
    }

    #[test]
    fn tar_crate_archive_with_long_names_and_pax() {
        let mut builder = tar::Builder::new(Vec::new());
        let long = format!("{}/{}", "dir".repeat(40), "file".repeat(30));
        let mut h = tar::Header::new_gnu();
        h.set_size(3);
        h.set_mode(0o100755);
        h.set_mtime(1_600_000_000);
        builder.append_data(&mut h, &long, &b"abc"[..]).unwrap();
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        builder
            .append_link(&mut h, "short-link", "target/".repeat(30))
            .unwrap();
        builder
            .append_pax_extensions([
                ("SCHILY.xattr.user.bin", &b"a\nb\0c"[..]),
                ("SCHILY.xattr.security.capability", &b"\x01\x00\x00\x02"[..]),
                ("mtime", &b"1600000000.123456789"[..]),
                ("uid", &b"4000000000"[..]),
                ("path", &b"pax/named"[..]),
            ])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(2);
        h.set_mode(0o6755);
        builder
            .append_data(&mut h, "ignored-name", &b"hi"[..])
            .unwrap();
        let bytes = builder.into_inner().unwrap();

        let entries = parse_all_ways(&bytes).unwrap();
        assert_eq!(entries.len(), 3);
        assert_eq!(entries[0].path, long.as_bytes());
        assert_eq!(entries[0].mode, 0o755);
        assert_eq!(entries[0].mtime, 1_600_000_000);
        let EntryKind::File {
            size: 3,
            data: FileData::Contiguous { offset },
        } = entries[0].kind
        else {
            panic!("{:?}", entries[0].kind)
        };
        assert_eq!(&bytes[offset as usize..offset as usize + 3], b"abc");
        assert_eq!(
            entries[1].kind,
            EntryKind::Symlink {
                target: "target/".repeat(30).into_bytes()
            }
        );
        let e = &entries[2];
        assert_eq!(e.path, b"pax/named");
        assert_eq!(
            (e.mtime, e.mtime_nsec, e.uid, e.mode),
            (1_600_000_000, 123_456_789, 4_000_000_000, 0o6755)
        );
        assert_eq!(
            e.xattrs,
            vec![
                (b"user.bin".to_vec(), b"a\nb\0c".to_vec()),
                (
                    b"security.capability".to_vec(),
                    b"\x01\x00\x00\x02".to_vec()
                )
            ]
        );
    }

    #[test]
    fn windows_pax_records_become_user_xattrs() {
        let rawsd = "AQAEgBQAAAAkAAAAAAAAADAAAAABAgAAAAAABSAAAAAgAgAA";
        let mut builder = tar::Builder::new(Vec::new());
        builder
            .append_pax_extensions([
                ("MSWINDOWS.fileattr", &b"32"[..]),
                ("MSWINDOWS.rawsd", rawsd.as_bytes()),
                ("LIBARCHIVE.creationtime", &b"1600000000.5"[..]),
                ("SCHILY.xattr.user.other", &b"v"[..]),
                ("MSWINDOWS.unknown", &b"ignored"[..]),
            ])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_size(3);
        h.set_mode(0o644);
        builder
            .append_data(&mut h, "Files/Windows/System32/kernel32.dll", &b"DLL"[..])
            .unwrap();
        builder
            .append_pax_extensions([("MSWINDOWS.fileattr", &b"16"[..])])
            .unwrap();
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Directory);
        h.set_size(0);
        builder
            .append_data(&mut h, "Files/Windows/", &b""[..])
            .unwrap();
        let bytes = builder.into_inner().unwrap();

        let entries = parse_all_ways(&bytes).unwrap();
        let xattrs = |e: &Entry| {
            e.xattrs
                .iter()
                .map(|(n, v)| (String::from_utf8_lossy(n).into_owned(), v.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(
            xattrs(&entries[0]),
            [
                ("user.MSWINDOWS.fileattr".to_string(), b"32".to_vec()),
                (
                    "user.MSWINDOWS.rawsd".to_string(),
                    rawsd.as_bytes().to_vec()
                ),
                (
                    "user.LIBARCHIVE.creationtime".to_string(),
                    b"1600000000.5".to_vec()
                ),
                ("user.other".to_string(), b"v".to_vec()),
            ]
        );
        // PAX records apply to the next entry only.
        assert_eq!(
            xattrs(&entries[1]),
            [("user.MSWINDOWS.fileattr".to_string(), b"16".to_vec())]
        );
    }

    #[test]
    fn hand_made_headers() {
        let mut t = Vec::new();
        push(
            &mut t,
            header(b"../../etc/passwd", typeflag::REG, 4, |_| {}),
            b"root",
        );
        push(&mut t, header(b"/abs/dir/", typeflag::DIR, 0, |_| {}), b"");
        push(
            &mut t,
            header(b"old-style-dir/", typeflag::REG_OLD, 0, |_| {}),
            b"",
        );
        push(
            &mut t,
            header(b"contiguous", typeflag::CONT, 1, |_| {}),
            b"c",
        );
        push(
            &mut t,
            header(b"hard", typeflag::LINK, 0, |h| {
                h[field::LINKNAME][..8].copy_from_slice(b"../x/./y")
            }),
            b"",
        );
        push(
            &mut t,
            header(b"dev", typeflag::BLOCK, 0, |h| {
                octal(&mut h[field::DEVMAJOR], 8);
                octal(&mut h[field::DEVMINOR], 17);
            }),
            b"",
        );
        // Base-256 uid (GNU) and a negative base-256 mtime.
        push(
            &mut t,
            header(b"big-ids", typeflag::FIFO, 0, |h| {
                h[field::UID].copy_from_slice(&[0x80, 0, 0, 0, 0xfe, 0xdc, 0xba, 0x98]);
                h[field::MTIME].fill(0xff);
            }),
            b"",
        );
        // ustar prefix, then a star prefix.
        push(
            &mut t,
            header(b"name", typeflag::REG, 0, |h| {
                h[field::PREFIX][..6].copy_from_slice(b"prefix")
            }),
            b"",
        );
        push(
            &mut t,
            header(b"name", typeflag::REG, 0, |h| {
                h[field::STAR_PREFIX][..4].copy_from_slice(b"star");
                h[field::STAR_TRAILER].copy_from_slice(TRAILER_STAR);
            }),
            b"",
        );
        // Unknown type and a global header are skipped with their data.
        push(&mut t, header(b"volume", b'V', 600, |_| {}), &[7u8; 600]);
        let global = pax_records(&[(b"path", b"global-path"), (b"mtime", b"5")]);
        push(
            &mut t,
            header(b"global", typeflag::PAX_GLOBAL, global.len() as u64, |_| {}),
            &global,
        );
        // PAX size overrides the header's; negative fractional mtime.
        let pax = pax_records(&[
            (b"size", b"5"),
            (b"mtime", b"-1.25"),
            (b"linkpath", b"unused"),
        ]);
        push(
            &mut t,
            header(b"pax", typeflag::PAX, pax.len() as u64, |_| {}),
            &pax,
        );
        push(
            &mut t,
            header(b"sized-by-pax", typeflag::REG, 0, |_| {}),
            b"12345",
        );
        end(&mut t);
        t.extend_from_slice(&[0u8; 3000]); // padding after the end marker

        let entries = parse_all_ways(&t).unwrap();
        let paths: Vec<&[u8]> = entries.iter().map(|e| e.path.as_slice()).collect();
        assert_eq!(
            paths,
            [
                &b"etc/passwd"[..],
                b"abs/dir",
                b"old-style-dir",
                b"contiguous",
                b"hard",
                b"dev",
                b"big-ids",
                b"prefix/name",
                b"star/name",
                b"sized-by-pax"
            ]
        );
        assert!(matches!(entries[0].kind, EntryKind::File { size: 4, .. }));
        assert_eq!(entries[2].kind, EntryKind::Dir);
        assert!(matches!(entries[3].kind, EntryKind::File { size: 1, .. }));
        assert_eq!(
            entries[4].kind,
            EntryKind::Hardlink {
                target: b"x/y".to_vec()
            }
        );
        assert_eq!(
            entries[5].kind,
            EntryKind::BlockDevice {
                major: 8,
                minor: 17
            }
        );
        assert_eq!((entries[6].uid, entries[6].mtime), (0xfedc_ba98, -1));
        let last = &entries[9];
        assert_eq!((last.mtime, last.mtime_nsec), (-2, 750_000_000));
        let EntryKind::File {
            size: 5,
            data: FileData::Contiguous { offset },
        } = last.kind
        else {
            panic!()
        };
        assert_eq!(&t[offset as usize..offset as usize + 5], b"12345");
        assert_eq!(entries[1].uid, 1000);
        assert_eq!(entries[1].gid, 100);
    }

    fn expect_invalid(bytes: &[u8], what: &str) {
        match parse(bytes) {
            Err(TarError::Invalid { .. }) => {}
            other => panic!("{what}: {other:?}"),
        }
    }

    #[test]
    fn malformed_archives_are_errors() {
        let good = {
            let mut t = Vec::new();
            push(&mut t, header(b"f", typeflag::REG, 3, |_| {}), b"abc");
            end(&mut t);
            t
        };
        assert_eq!(parse(&good).unwrap().len(), 1);

        let mut bad_sum = good.clone();
        bad_sum[0] = b'g';
        match parse(&bad_sum) {
            Err(TarError::Invalid { offset: 0, reason }) => assert!(reason.contains("checksum")),
            other => panic!("{other:?}"),
        }
        expect_invalid(&good[..300], "truncated header");
        expect_invalid(&good[..BLOCK + 2], "truncated data");
        let mut zero_then_header = vec![0u8; BLOCK];
        zero_then_header.extend_from_slice(&good);
        expect_invalid(&zero_then_header, "zero block then a header");

        let mut huge_pax = Vec::new();
        huge_pax.extend_from_slice(&header(b"pax", typeflag::PAX, MAX_META_SIZE + 1, |_| {}));
        expect_invalid(&huge_pax, "pax header too large");
        let mut huge_name = Vec::new();
        huge_name.extend_from_slice(&header(
            b"././@LongLink",
            typeflag::GNU_LONGNAME,
            0o777_7777_7777,
            |_| {},
        ));
        expect_invalid(&huge_name, "long name too large");

        for (records, what) in [
            (b"99 path=x\n".to_vec(), "length past the end"),
            (b"5 path=x\n".to_vec(), "length too short"),
            (b"x path=y\n".to_vec(), "length not a number"),
            (b"10 pathxx\n".to_vec(), "no ="),
            (b"10 path=xx".to_vec(), "no newline"),
            (pax_records(&[(b"uid", b"-5")]), "negative uid"),
            (pax_records(&[(b"uid", b"99999999999")]), "uid out of range"),
            (pax_records(&[(b"mtime", b"12x")]), "bad mtime"),
            (
                pax_records(&[(b"size", b"99999999999999999999999")]),
                "size overflow",
            ),
        ] {
            let mut t = Vec::new();
            push(
                &mut t,
                header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
                &records,
            );
            push(&mut t, header(b"f", typeflag::REG, 0, |_| {}), b"");
            end(&mut t);
            expect_invalid(&t, what);
        }

        // Sizes that cannot be: negative (base-256) and beyond the stream.
        let mut negative = Vec::new();
        negative.extend_from_slice(&header(b"f", typeflag::REG, 0, |h| {
            h[field::SIZE].fill(0xff)
        }));
        expect_invalid(&negative, "negative size");
        let mut absurd = Vec::new();
        absurd.extend_from_slice(&header(b"f", typeflag::REG, 0, |h| {
            h[field::SIZE].copy_from_slice(&[
                0x80, 0, 0, 0, 0x7f, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
            ]);
        }));
        expect_invalid(&absurd, "size beyond the stream");
        let mut bad_octal = Vec::new();
        bad_octal.extend_from_slice(&header(b"f", typeflag::REG, 0, |h| {
            h[field::MODE][..3].copy_from_slice(b"9x9")
        }));
        expect_invalid(&bad_octal, "mode not octal");
    }

    #[test]
    fn pax_sparse_flavors() {
        // 0.1: map in a record; data of the segments follows directly.
        let records = pax_records(&[
            (b"GNU.sparse.major", b"0"),
            (b"GNU.sparse.minor", b"1"),
            (b"GNU.sparse.name", b"real/name"),
            (b"GNU.sparse.size", b"10000"),
            (b"GNU.sparse.map", b"100,3,5000,2"),
        ]);
        let mut t = Vec::new();
        push(
            &mut t,
            header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
            &records,
        );
        push(
            &mut t,
            header(b"GNUSparseFile.1/name", typeflag::REG, 5, |_| {}),
            b"abcde",
        );
        end(&mut t);
        let entries = parse_all_ways(&t).unwrap();
        assert_eq!(entries[0].path, b"real/name");
        let EntryKind::File {
            size: 10000,
            data: FileData::Sparse { segments },
        } = &entries[0].kind
        else {
            panic!("{:?}", entries[0].kind)
        };
        let data_at = 3 * BLOCK as u64;
        assert_eq!(
            segments,
            &[
                Segment {
                    file_offset: 100,
                    stream_offset: data_at,
                    len: 3
                },
                Segment {
                    file_offset: 5000,
                    stream_offset: data_at + 3,
                    len: 2
                }
            ]
        );

        // 1.0: map at the start of the data, padded to a block.
        let records = pax_records(&[
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.name", b"one"),
            (b"GNU.sparse.realsize", b"4096"),
        ]);
        let mut data = b"2\n0\n2\n4000\n3\n".to_vec();
        data.resize(BLOCK, 0);
        data.extend_from_slice(b"xyzzz");
        let mut t = Vec::new();
        push(
            &mut t,
            header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
            &records,
        );
        push(
            &mut t,
            header(
                b"GNUSparseFile.1/one",
                typeflag::REG,
                data.len() as u64,
                |_| {},
            ),
            &data,
        );
        end(&mut t);
        let entries = parse_all_ways(&t).unwrap();
        let EntryKind::File {
            size: 4096,
            data: FileData::Sparse { segments },
        } = &entries[0].kind
        else {
            panic!()
        };
        let data_at = 4 * BLOCK as u64;
        assert_eq!(
            segments[0],
            Segment {
                file_offset: 0,
                stream_offset: data_at,
                len: 2
            }
        );
        assert_eq!(
            segments[1],
            Segment {
                file_offset: 4000,
                stream_offset: data_at + 2,
                len: 3
            }
        );

        // Unknown versions are refused by name; inconsistent maps are invalid.
        let records = pax_records(&[(b"GNU.sparse.major", b"2"), (b"GNU.sparse.minor", b"0")]);
        let mut t = Vec::new();
        push(
            &mut t,
            header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
            &records,
        );
        push(&mut t, header(b"odd", typeflag::REG, 0, |_| {}), b"");
        end(&mut t);
        match parse(&t) {
            Err(TarError::Unsupported { what }) => {
                assert!(what.contains("odd") && what.contains("2.0"))
            }
            other => panic!("{other:?}"),
        }
        for map in [
            &b"100,3,50,2"[..],
            b"100,3,5000",
            b"9999,3",
            b"100,4,5000,2",
        ] {
            let records = pax_records(&[(b"GNU.sparse.size", b"10000"), (b"GNU.sparse.map", map)]);
            let mut t = Vec::new();
            push(
                &mut t,
                header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
                &records,
            );
            push(&mut t, header(b"s", typeflag::REG, 5, |_| {}), b"abcde");
            end(&mut t);
            expect_invalid(&t, &String::from_utf8_lossy(map));
        }
        let mut t = Vec::new();
        let records = pax_records(&[
            (b"GNU.sparse.major", b"1"),
            (b"GNU.sparse.minor", b"0"),
            (b"GNU.sparse.realsize", b"9"),
        ]);
        push(
            &mut t,
            header(b"pax", typeflag::PAX, records.len() as u64, |_| {}),
            &records,
        );
        push(&mut t, header(b"s", typeflag::REG, 4, |_| {}), b"1\n0\n");
        end(&mut t);
        expect_invalid(&t, "1.0 map running past the data");
    }
}
