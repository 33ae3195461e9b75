//! Tables of contents of seekable layers: eStargz and zstd:chunked.
//!
//! Both formats are ordinary `tar+gzip` / `tar+zstd` layers in which every
//! file's data starts a new gzip member or zstd frame, plus a JSON table of
//! contents (the TOC, CRFS's `stargz.index.json` schema in both) that lists
//! every entry with its metadata and where its compressed data lies. With a
//! TOC, a layer is mounted after fetching the TOC alone; each chunk is then
//! fetched by Range and checked against the digest the TOC gives it.
//!
//! Trust flows from the verified manifest: the layer descriptor's annotation
//! carries the TOC's digest (eStargz: of the uncompressed JSON; zstd:chunked:
//! of the compressed manifest), the TOC carries each chunk's digest. A layer
//! without that annotation has no verifiable TOC and is indexed the legacy
//! way. Everything here works on bytes it is given; fetching is the caller's
//! (see [`load`]).
//!
//! Where the TOC lives:
//! - eStargz: a 51-byte footer (47 for legacy stargz), an empty gzip member
//!   whose extra field holds the TOC offset in hex; the TOC is a gzip member
//!   holding the tar entry `stargz.index.json`.
//! - zstd:chunked: the `manifest-position` annotation
//!   (`offset:length:uncompressed_length:type`) or, without it, the footer: a
//!   zstd skippable frame at the very end (40-byte payload in the first
//!   version, 64 since tar-split was added) ending in the magic `GnUlInUx`.
//!   The manifest is zstd-compressed JSON inside a skippable frame.

use crate::digest::Digest;
use crate::layer::{
    Chunk, Codec, Compression, Entry, EntryKind, FileData, INDEX_VERSION, Index, Segment,
    normalize_path,
};
use base64::Engine as _;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Read;

/// Descriptor annotation holding the digest of an eStargz TOC (the JSON).
pub const ESTARGZ_TOC_DIGEST: &str = "containerd.io/snapshot/stargz/toc.digest";
/// Descriptor annotation with the uncompressed size of an eStargz layer.
pub const ESTARGZ_UNCOMPRESSED_SIZE: &str = "io.containers.estargz.uncompressed-size";
/// zstd:chunked manifest digest annotation, current and pre-2023 names.
pub const ZSTD_CHUNKED_CHECKSUM: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-checksum",
    "io.containers.zstd-chunked.manifest-checksum",
];
/// zstd:chunked manifest position annotation, current and pre-2023 names.
pub const ZSTD_CHUNKED_POSITION: [&str; 2] = [
    "io.github.containers.zstd-chunked.manifest-position",
    "io.containers.zstd-chunked.manifest-position",
];

/// Name of the tar entry holding an eStargz TOC.
pub const TOC_TAR_NAME: &str = "stargz.index.json";
/// eStargz landmark ending the prioritized files.
pub const PREFETCH_LANDMARK: &str = ".prefetch.landmark";
/// eStargz landmark saying no file is prioritized.
pub const NO_PREFETCH_LANDMARK: &str = ".no.prefetch.landmark";
/// The one byte of a landmark file.
pub const LANDMARK_CONTENTS: u8 = 0x0f;

/// eStargz footer: gzip header with a 26-byte extra field, empty stored block.
pub const ESTARGZ_FOOTER_LEN: usize = 51;
/// Original stargz footer: the same without the RFC 1952 subfield header.
pub const LEGACY_FOOTER_LEN: usize = 47;
/// Subfield id of the eStargz footer's extra field.
const ESTARGZ_SUBFIELD: &[u8; 2] = b"SG";
/// Suffix of the footer's extra payload, after 16 hex digits of TOC offset.
const STARGZ_MAGIC: &[u8; 6] = b"STARGZ";
const TOC_OFFSET_HEX_DIGITS: usize = 16;
/// gzip header bytes before XLEN: ID1 ID2 CM FLG MTIME(4) XFL OS.
const GZIP_FIXED_HEADER: usize = 10;
const GZIP_ID: [u8; 3] = [0x1f, 0x8b, 0x08];
const GZIP_FLAG_EXTRA: u8 = 0x04;

/// zstd skippable frame magic (RFC 8878 §3.1.2, first of 16 values), LE.
pub const ZSTD_SKIPPABLE_MAGIC: [u8; 4] = [0x50, 0x2a, 0x4d, 0x18];
/// Header of a skippable frame: magic + u32 LE payload size.
pub const ZSTD_SKIPPABLE_HEADER: usize = 8;
/// Last 8 bytes of a zstd:chunked footer.
pub const ZSTD_CHUNKED_MAGIC: &[u8; 8] = b"GnUlInUx";
/// Footer payload: offset, length, uncompressed length, type, magic.
const ZSTD_FOOTER_V1_PAYLOAD: usize = 40;
/// The same plus tar-split offset, length, uncompressed length.
pub const ZSTD_FOOTER_V2_PAYLOAD: usize = 64;
/// The manifest type zstd:chunked defines ("CRFS").
pub const ZSTD_CHUNKED_MANIFEST_TYPE: u64 = 1;

/// Largest TOC accepted, compressed or not: a hostile descriptor or footer
/// must not make a mount allocate without bound.
pub const MAX_TOC_BYTES: u64 = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum TocError {
    #[error("annotation {key}: {reason}")]
    Annotation { key: String, reason: String },
    #[error("footer: {0}")]
    Footer(String),
    #[error("TOC digest mismatch: the annotation says {expected}, the TOC hashes to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("TOC: {0}")]
    Invalid(String),
    #[error("fetching the TOC: {0}")]
    Fetch(String),
}

fn invalid(reason: impl Into<String>) -> TocError {
    TocError::Invalid(reason.into())
}

/// Which seekable format a layer is in.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum TocFormat {
    #[serde(rename = "estargz")]
    Estargz,
    #[serde(rename = "zstd:chunked")]
    ZstdChunked,
}

impl TocFormat {
    pub fn name(self) -> &'static str {
        match self {
            TocFormat::Estargz => "eStargz",
            TocFormat::ZstdChunked => "zstd:chunked",
        }
    }
}

/// Where a zstd:chunked manifest lies in the blob.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Position {
    pub offset: u64,
    pub len: u64,
    pub uncompressed_len: u64,
}

/// What a layer descriptor promises about its TOC, before anything is fetched.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    Estargz {
        toc_digest: Digest,
    },
    ZstdChunked {
        checksum: Digest,
        position: Option<Position>,
    },
}

impl Plan {
    /// The plan for a layer, if its annotations mark it as seekable: `None`
    /// for ordinary layers, an error for a marked layer whose annotations
    /// cannot be used (the caller falls back to indexing).
    pub fn from_annotations(
        annotations: &BTreeMap<String, String>,
        compression: Compression,
    ) -> Option<Result<Plan, TocError>> {
        match compression {
            Compression::Gzip => {
                let value = annotations.get(ESTARGZ_TOC_DIGEST)?;
                Some(
                    annotation_digest(ESTARGZ_TOC_DIGEST, value)
                        .map(|toc_digest| Plan::Estargz { toc_digest }),
                )
            }
            Compression::Zstd => {
                let (key, value) = first_annotation(annotations, &ZSTD_CHUNKED_CHECKSUM)?;
                Some(zstd_plan(annotations, key, value))
            }
            Compression::None => None,
        }
    }

    pub fn format(&self) -> TocFormat {
        match self {
            Plan::Estargz { .. } => TocFormat::Estargz,
            Plan::ZstdChunked { .. } => TocFormat::ZstdChunked,
        }
    }
}

fn first_annotation<'a>(
    annotations: &'a BTreeMap<String, String>,
    keys: &[&'static str],
) -> Option<(&'static str, &'a String)> {
    keys.iter()
        .find_map(|&key| annotations.get(key).map(|value| (key, value)))
}

fn annotation_digest(key: &str, value: &str) -> Result<Digest, TocError> {
    value.parse().map_err(|e| TocError::Annotation {
        key: key.to_string(),
        reason: format!("{e}"),
    })
}

fn zstd_plan(
    annotations: &BTreeMap<String, String>,
    key: &str,
    value: &str,
) -> Result<Plan, TocError> {
    let checksum = annotation_digest(key, value)?;
    let position = match first_annotation(annotations, &ZSTD_CHUNKED_POSITION) {
        Some((key, value)) => {
            Some(
                parse_position(value).map_err(|reason| TocError::Annotation {
                    key: key.to_string(),
                    reason,
                })?,
            )
        }
        None => None,
    };
    Ok(Plan::ZstdChunked { checksum, position })
}

/// `offset:length:uncompressed_length:type`, type 1.
pub fn parse_position(value: &str) -> Result<Position, String> {
    let fields: Vec<&str> = value.split(':').collect();
    let [offset, len, uncompressed_len, kind] = fields[..] else {
        return Err(format!(
            "{value:?} is not offset:length:uncompressed_length:type"
        ));
    };
    let num = |s: &str| {
        s.parse::<u64>()
            .map_err(|_| format!("{s:?} in {value:?} is not a number"))
    };
    if num(kind)? != ZSTD_CHUNKED_MANIFEST_TYPE {
        return Err(format!("manifest type {kind} is not the CRFS type 1"));
    }
    Ok(Position {
        offset: num(offset)?,
        len: num(len)?,
        uncompressed_len: num(uncompressed_len)?,
    })
}

/// The TOC offset from the last bytes of an eStargz (or stargz) blob.
/// Returns the offset and the footer's length.
pub fn parse_estargz_footer(tail: &[u8]) -> Result<(u64, usize), TocError> {
    if let Some(footer) = tail
        .len()
        .checked_sub(ESTARGZ_FOOTER_LEN)
        .map(|at| &tail[at..])
    {
        // XLEN (26) then the subfield header: SI1 SI2 LEN(22).
        let extra = &footer[GZIP_FIXED_HEADER + 2..];
        if gzip_with_extra(footer) && &extra[..2] == ESTARGZ_SUBFIELD {
            return Ok((stargz_offset(&extra[4..])?, ESTARGZ_FOOTER_LEN));
        }
    }
    if let Some(footer) = tail
        .len()
        .checked_sub(LEGACY_FOOTER_LEN)
        .map(|at| &tail[at..])
    {
        if gzip_with_extra(footer) {
            return Ok((
                stargz_offset(&footer[GZIP_FIXED_HEADER + 2..])?,
                LEGACY_FOOTER_LEN,
            ));
        }
    }
    Err(TocError::Footer(
        "no eStargz or stargz footer at the end of the blob".into(),
    ))
}

fn gzip_with_extra(footer: &[u8]) -> bool {
    footer.len() > GZIP_FIXED_HEADER + 2
        && footer[..3] == GZIP_ID
        && footer[3] & GZIP_FLAG_EXTRA != 0
}

/// `%016x` + `STARGZ`.
fn stargz_offset(payload: &[u8]) -> Result<u64, TocError> {
    let end = TOC_OFFSET_HEX_DIGITS + STARGZ_MAGIC.len();
    if payload.len() < end || &payload[TOC_OFFSET_HEX_DIGITS..end] != STARGZ_MAGIC {
        return Err(TocError::Footer(
            "the gzip extra field is not %016xSTARGZ".into(),
        ));
    }
    let hex = std::str::from_utf8(&payload[..TOC_OFFSET_HEX_DIGITS])
        .map_err(|_| TocError::Footer("TOC offset is not hex".into()))?;
    u64::from_str_radix(hex, 16)
        .map_err(|_| TocError::Footer(format!("TOC offset {hex:?} is not hex")))
}

/// The manifest position from the last bytes of a zstd:chunked blob.
pub fn parse_zstd_footer(tail: &[u8]) -> Result<Position, TocError> {
    for payload_len in [ZSTD_FOOTER_V2_PAYLOAD, ZSTD_FOOTER_V1_PAYLOAD] {
        let Some(at) = tail.len().checked_sub(payload_len + ZSTD_SKIPPABLE_HEADER) else {
            continue;
        };
        let frame = &tail[at..];
        let size = u32::from_le_bytes([frame[4], frame[5], frame[6], frame[7]]);
        let payload = &frame[ZSTD_SKIPPABLE_HEADER..];
        if frame[..4] != ZSTD_SKIPPABLE_MAGIC
            || size as usize != payload_len
            || !payload.ends_with(ZSTD_CHUNKED_MAGIC)
        {
            continue;
        }
        let field = |i: usize| {
            let mut raw = [0u8; 8];
            raw.copy_from_slice(&payload[i * 8..i * 8 + 8]);
            u64::from_le_bytes(raw)
        };
        if field(3) != ZSTD_CHUNKED_MANIFEST_TYPE {
            return Err(TocError::Footer(format!(
                "manifest type {} is not the CRFS type 1",
                field(3)
            )));
        }
        return Ok(Position {
            offset: field(0),
            len: field(1),
            uncompressed_len: field(2),
        });
    }
    Err(TocError::Footer(
        "no zstd:chunked footer at the end of the blob".into(),
    ))
}

/// The JSON table of contents, as both formats write it.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Toc {
    pub version: u32,
    /// Go writes an empty layer's list as `null`.
    #[serde(default, deserialize_with = "null_as_empty")]
    pub entries: Vec<TocEntry>,
}

fn null_as_empty<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Vec<TocEntry>, D::Error> {
    Ok(Option::<Vec<TocEntry>>::deserialize(d)?.unwrap_or_default())
}

/// One TOC entry. Fields not listed are ignored.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct TocEntry {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub modtime: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub link_name: String,
    #[serde(default)]
    pub mode: i64,
    #[serde(default)]
    pub uid: u32,
    #[serde(default)]
    pub gid: u32,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_major: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub dev_minor: u64,
    /// Values are base64 (Go's encoding of `[]byte`, and zstd:chunked's own).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub xattrs: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub digest: Option<String>,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub end_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_offset: u64,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub chunk_size: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub chunk_digest: Option<String>,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub chunk_type: String,
    #[serde(default, skip_serializing_if = "is_zero")]
    pub inner_offset: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// zstd:chunked chunk type of a run of zeros, stored but never fetched.
const CHUNK_TYPE_ZEROS: &str = "zeros";

/// Parses and sanity-checks TOC JSON.
pub fn parse_toc(json: &[u8]) -> Result<Toc, TocError> {
    let toc: Toc = serde_json::from_slice(json).map_err(|e| invalid(format!("bad JSON: {e}")))?;
    if toc.version != 1 {
        return Err(invalid(format!(
            "version {} (only 1 is defined)",
            toc.version
        )));
    }
    Ok(toc)
}

/// Fetches `[start, end)` of the layer blob.
pub type FetchFn<'a> = dyn Fn(u64, u64) -> Result<Vec<u8>, String> + 'a;

/// Fetches, verifies and parses the TOC the plan describes, and builds the
/// layer's index from it. Every failure is an error the caller reports
/// before indexing the layer the legacy way.
pub fn load(
    plan: &Plan,
    layer: Digest,
    blob_size: u64,
    fetch: &FetchFn,
) -> Result<Index, TocError> {
    let get = |start: u64, end: u64| {
        if start > end || end > blob_size {
            return Err(TocError::Footer(format!(
                "bytes {start}-{end} lie outside the {blob_size}-byte blob"
            )));
        }
        if end - start > MAX_TOC_BYTES {
            return Err(invalid(format!("{} bytes is too large", end - start)));
        }
        fetch(start, end).map_err(TocError::Fetch)
    };
    match plan {
        Plan::Estargz { toc_digest } => {
            // Two exact requests (footer, then TOC) rather than a guessed
            // tail: a mount moves no byte of file data.
            let footer_start = blob_size.saturating_sub(ESTARGZ_FOOTER_LEN as u64);
            let (toc_offset, footer_len) = parse_estargz_footer(&get(footer_start, blob_size)?)?;
            let toc_end = blob_size - footer_len as u64;
            if toc_offset >= toc_end {
                return Err(TocError::Footer(format!(
                    "TOC offset {toc_offset} lies past the data ({toc_end} bytes)"
                )));
            }
            let member = get(toc_offset, toc_end)?;
            let json = estargz_toc_json(&member)?;
            let actual = Digest::of(&json);
            if actual != *toc_digest {
                return Err(TocError::DigestMismatch {
                    expected: *toc_digest,
                    actual,
                });
            }
            build(
                &parse_toc(&json)?,
                Codec::Gzip,
                layer,
                blob_size,
                toc_offset,
            )
        }
        Plan::ZstdChunked { checksum, position } => {
            let position = match position {
                Some(p) => *p,
                None => {
                    let footer = (ZSTD_FOOTER_V2_PAYLOAD + ZSTD_SKIPPABLE_HEADER) as u64;
                    parse_zstd_footer(&get(blob_size.saturating_sub(footer), blob_size)?)?
                }
            };
            if position.uncompressed_len > MAX_TOC_BYTES {
                return Err(invalid(format!(
                    "{} bytes uncompressed is too large",
                    position.uncompressed_len
                )));
            }
            let end = position
                .offset
                .checked_add(position.len)
                .ok_or_else(|| TocError::Footer("manifest position overflows".into()))?;
            let compressed = get(position.offset, end)?;
            let actual = Digest::of(&compressed);
            if actual != *checksum {
                return Err(TocError::DigestMismatch {
                    expected: *checksum,
                    actual,
                });
            }
            let json = bounded_zstd(&compressed, position.uncompressed_len)?;
            // The data ends where the manifest's skippable frame begins.
            let data_end = position.offset.saturating_sub(ZSTD_SKIPPABLE_HEADER as u64);
            build(&parse_toc(&json)?, Codec::Zstd, layer, blob_size, data_end)
        }
    }
}

/// The JSON inside an eStargz TOC member (one gzip member holding the tar
/// entry `stargz.index.json`).
fn estargz_toc_json(member: &[u8]) -> Result<Vec<u8>, TocError> {
    let mut tar_bytes = Vec::new();
    flate2::read::GzDecoder::new(member)
        .take(MAX_TOC_BYTES)
        .read_to_end(&mut tar_bytes)
        .map_err(|e| invalid(format!("TOC member does not inflate: {e}")))?;
    let mut archive = tar::Archive::new(&tar_bytes[..]);
    let entries = archive
        .entries()
        .map_err(|e| invalid(format!("TOC member is not a tar: {e}")))?;
    for entry in entries {
        let mut entry = entry.map_err(|e| invalid(format!("TOC member is not a tar: {e}")))?;
        let is_toc = entry
            .path_bytes()
            .as_ref()
            .strip_prefix(b"./")
            .unwrap_or(entry.path_bytes().as_ref())
            == TOC_TAR_NAME.as_bytes();
        if is_toc {
            let mut json = Vec::new();
            entry
                .read_to_end(&mut json)
                .map_err(|e| invalid(format!("reading {TOC_TAR_NAME}: {e}")))?;
            return Ok(json);
        }
    }
    Err(invalid(format!(
        "no {TOC_TAR_NAME} entry at the TOC offset"
    )))
}

fn bounded_zstd(compressed: &[u8], expected: u64) -> Result<Vec<u8>, TocError> {
    let mut out = Vec::new();
    zstd::stream::read::Decoder::new(compressed)
        .map_err(|e| invalid(format!("zstd: {e}")))?
        .take(expected.saturating_add(1))
        .read_to_end(&mut out)
        .map_err(|e| invalid(format!("manifest does not decompress: {e}")))?;
    if out.len() as u64 != expected {
        return Err(invalid(format!(
            "manifest decompresses to {} bytes, the position says {expected}",
            out.len()
        )));
    }
    Ok(out)
}

/// Turns a verified TOC into an index. `data_end` is where file data ends
/// (the TOC's own start): every chunk must lie before it.
pub fn build(
    toc: &Toc,
    codec: Codec,
    layer: Digest,
    blob_size: u64,
    data_end: u64,
) -> Result<Index, TocError> {
    let mut builder = Builder {
        data_end,
        member_starts: member_starts(toc, data_end),
        entries: Vec::with_capacity(toc.entries.len()),
        chunks: Vec::new(),
        stream: 0,
        prefetch_end: 0,
    };
    let mut i = 0;
    while i < toc.entries.len() {
        let entry = &toc.entries[i];
        let mut next = i + 1;
        if entry.kind == "reg" {
            while toc.entries.get(next).is_some_and(|e| e.kind == "chunk") {
                if toc.entries[next].name != entry.name {
                    return Err(invalid(format!(
                        "chunk of {:?} follows {:?}",
                        toc.entries[next].name, entry.name
                    )));
                }
                next += 1;
            }
        }
        builder.add(&toc.entries[i..next])?;
        i = next;
    }
    let index = Index {
        version: INDEX_VERSION,
        layer_digest: layer,
        blob_size,
        stream_size: builder.stream,
        entries: builder.entries,
        block_digests: Vec::new(),
        access: crate::layer::Access::Chunked {
            codec,
            chunks: builder.chunks,
            prefetch_end: builder.prefetch_end,
        },
    };
    crate::layer::index::validate(&index).map_err(invalid)?;
    Ok(index)
}

/// Where members (gzip) or frames (zstd) holding file data start, sorted:
/// a chunk without an explicit end runs to the next one.
fn member_starts(toc: &Toc, data_end: u64) -> Vec<u64> {
    let mut starts: Vec<u64> = toc
        .entries
        .iter()
        .filter(|e| e.offset > 0)
        .map(|e| e.offset)
        .chain([data_end])
        .collect();
    starts.sort_unstable();
    starts.dedup();
    starts
}

struct Builder {
    data_end: u64,
    member_starts: Vec<u64>,
    entries: Vec<Entry>,
    chunks: Vec<Chunk>,
    stream: u64,
    prefetch_end: u64,
}

impl Builder {
    /// One TOC entry; for a regular file, with the chunk entries after it.
    fn add(&mut self, parts: &[TocEntry]) -> Result<(), TocError> {
        let first = &parts[0];
        lossless(first)?;
        let path = normalize_path(first.name.as_bytes());
        // Landmarks (eStargz's, also in stargz-snapshotter's zstd:chunked)
        // steer prefetching and are not part of the image.
        if first.kind == "reg" {
            if path == PREFETCH_LANDMARK.as_bytes() {
                self.prefetch_end = self.stream;
                return Ok(());
            }
            if path == NO_PREFETCH_LANDMARK.as_bytes() {
                return Ok(());
            }
        }
        let kind = match first.kind.as_str() {
            "dir" => EntryKind::Dir,
            "reg" => EntryKind::File {
                size: first.size,
                data: self.file_data(parts)?,
            },
            "symlink" => EntryKind::Symlink {
                target: first.link_name.as_bytes().to_vec(),
            },
            "hardlink" => EntryKind::Hardlink {
                target: normalize_path(first.link_name.as_bytes()),
            },
            "char" => EntryKind::CharDevice {
                major: device(first.dev_major)?,
                minor: device(first.dev_minor)?,
            },
            "block" => EntryKind::BlockDevice {
                major: device(first.dev_major)?,
                minor: device(first.dev_minor)?,
            },
            "fifo" => EntryKind::Fifo,
            "chunk" => {
                return Err(invalid(format!(
                    "chunk of {:?} without its file",
                    first.name
                )));
            }
            other => {
                return Err(invalid(format!(
                    "{:?} has unknown type {other:?}",
                    first.name
                )));
            }
        };
        let (mtime, mtime_nsec) = modtime(first.modtime.as_deref())?;
        self.entries.push(Entry {
            path,
            kind,
            mode: (first.mode & 0o7777) as u32,
            uid: first.uid,
            gid: first.gid,
            mtime,
            mtime_nsec,
            xattrs: xattrs(first)?,
        });
        Ok(())
    }

    /// Lays the file's data chunks out in the stream; zero chunks become holes.
    fn file_data(&mut self, parts: &[TocEntry]) -> Result<FileData, TocError> {
        let file = &parts[0];
        let size = file.size;
        let start = self.stream;
        if size == 0 {
            if parts.len() > 1 {
                return Err(invalid(format!("{:?}: chunks of an empty file", file.name)));
            }
            return Ok(FileData::Contiguous { offset: start });
        }
        let mut segments: Vec<Segment> = Vec::new();
        let mut holes = false;
        for (k, part) in parts.iter().enumerate() {
            let from = if k == 0 { 0 } else { part.chunk_offset };
            let to = parts.get(k + 1).map_or(size, |next| next.chunk_offset);
            if to <= from || (k == 0 && part.chunk_offset != 0) {
                return Err(invalid(format!(
                    "{:?}: chunk offsets do not tile the file",
                    file.name
                )));
            }
            let len = to - from;
            if part.chunk_size != 0 && part.chunk_size != len {
                return Err(invalid(format!(
                    "{:?}: chunk at {from} says {} bytes, the offsets say {len}",
                    file.name, part.chunk_size
                )));
            }
            if part.chunk_type == CHUNK_TYPE_ZEROS {
                holes = true;
                continue;
            }
            let chunk = self.chunk(parts, k, len)?;
            match segments.last_mut() {
                Some(last) if last.file_offset + last.len == from => last.len += len,
                _ => segments.push(Segment {
                    file_offset: from,
                    stream_offset: chunk.stream_offset,
                    len,
                }),
            }
            self.stream = self
                .stream
                .checked_add(len)
                .ok_or_else(|| invalid("file sizes overflow"))?;
            self.chunks.push(chunk);
        }
        Ok(if holes {
            FileData::Sparse { segments }
        } else {
            FileData::Contiguous { offset: start }
        })
    }

    fn chunk(&self, parts: &[TocEntry], k: usize, len: u64) -> Result<Chunk, TocError> {
        let part = &parts[k];
        let file = &parts[0];
        let digest_text = match (&part.chunk_digest, parts.len()) {
            (Some(d), _) if !d.is_empty() => d,
            (_, 1) => file
                .digest
                .as_ref()
                .ok_or_else(|| invalid(format!("{:?} has no digest", file.name)))?,
            _ => return Err(invalid(format!("{:?}: a chunk has no digest", file.name))),
        };
        let digest: Digest = digest_text
            .parse()
            .map_err(|e| invalid(format!("{:?}: {e}", file.name)))?;
        let blob_start = part.offset;
        // containers/storage gives where a file's frames end (the next
        // chunk's offset, or the file's endOffset); eStargz, and
        // stargz-snapshotter's zstd:chunked, leave it to the next member.
        let explicit = match parts[k + 1..].iter().find(|p| p.offset > blob_start) {
            Some(next) => next.offset,
            None => file.end_offset,
        };
        let blob_end = if explicit > blob_start {
            explicit
        } else {
            let at = self.member_starts.partition_point(|&s| s <= blob_start);
            self.member_starts.get(at).copied().unwrap_or(0)
        };
        if blob_start == 0 || blob_start >= blob_end || blob_end > self.data_end {
            return Err(invalid(format!(
                "{:?}: chunk bytes {blob_start}-{blob_end} lie outside the layer's data",
                file.name
            )));
        }
        Ok(Chunk {
            stream_offset: self.stream,
            len,
            blob_start,
            blob_end,
            inner: part.inner_offset,
            digest: *digest.as_bytes(),
        })
    }
}

/// Go's JSON encoder turns bytes that are not UTF-8 into U+FFFD, so a TOC
/// holding it most likely names a file the tar names otherwise: such a TOC
/// cannot give the exact tree and the layer is indexed from its tar instead.
fn lossless(entry: &TocEntry) -> Result<(), TocError> {
    let texts = [&entry.name, &entry.link_name]
        .into_iter()
        .chain(entry.xattrs.keys());
    for text in texts {
        if text.contains(char::REPLACEMENT_CHARACTER) {
            return Err(invalid(format!(
                "{text:?}: a name that was not UTF-8 in the tar was lost in the JSON"
            )));
        }
    }
    Ok(())
}

fn device(n: u64) -> Result<u32, TocError> {
    u32::try_from(n).map_err(|_| invalid(format!("device number {n} out of range")))
}

/// RFC 3339 (with or without fractional seconds) to seconds + nanoseconds.
fn modtime(text: Option<&str>) -> Result<(i64, u32), TocError> {
    let Some(text) = text.filter(|t| !t.is_empty()) else {
        return Ok((0, 0));
    };
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|e| invalid(format!("modtime {text:?}: {e}")))?;
    Ok((time.unix_timestamp(), time.nanosecond()))
}

/// Formats a modification time the way [`modtime`] reads it back (and Go's
/// `time.RFC3339Nano` writes it).
pub fn format_modtime(secs: i64, nsec: u32) -> Option<String> {
    let time = time::OffsetDateTime::from_unix_timestamp(secs)
        .ok()?
        .replace_nanosecond(nsec)
        .ok()?;
    time.format(&time::format_description::well_known::Rfc3339)
        .ok()
}

/// Extended attributes as [`Entry::xattrs`] holds them.
type XattrList = Vec<(Vec<u8>, Vec<u8>)>;

fn xattrs(entry: &TocEntry) -> Result<XattrList, TocError> {
    entry
        .xattrs
        .iter()
        .map(|(name, value)| {
            let value = base64::engine::general_purpose::STANDARD
                .decode(value)
                .map_err(|e| invalid(format!("{:?}: xattr {name:?}: {e}", entry.name)))?;
            Ok((name.as_bytes().to_vec(), value))
        })
        .collect()
}

/// What an image's layer is, for `imgfs inspect`: its format and how it is
/// served lazily.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "kebab-case")]
pub enum LayerFormat {
    Tar,
    Gzip,
    Zstd,
    Estargz,
    #[serde(rename = "zstd:chunked")]
    ZstdChunked,
}

impl LayerFormat {
    pub fn of(annotations: &BTreeMap<String, String>, compression: Compression) -> LayerFormat {
        match (
            Plan::from_annotations(annotations, compression),
            compression,
        ) {
            (Some(Ok(plan)), _) => match plan.format() {
                TocFormat::Estargz => LayerFormat::Estargz,
                TocFormat::ZstdChunked => LayerFormat::ZstdChunked,
            },
            (_, Compression::None) => LayerFormat::Tar,
            (_, Compression::Gzip) => LayerFormat::Gzip,
            (_, Compression::Zstd) => LayerFormat::Zstd,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            LayerFormat::Tar => "tar",
            LayerFormat::Gzip => "gzip",
            LayerFormat::Zstd => "zstd",
            LayerFormat::Estargz => "eStargz",
            LayerFormat::ZstdChunked => "zstd:chunked",
        }
    }

    /// How a mount reaches the layer's bytes.
    pub fn laziness(self) -> &'static str {
        match self {
            LayerFormat::Estargz | LayerFormat::ZstdChunked => "lazy: TOC, no scan",
            LayerFormat::Tar | LayerFormat::Gzip => "lazy after one indexing pass",
            LayerFormat::Zstd => "one pass, stream kept on disk",
        }
    }
}
