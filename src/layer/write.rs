//! Writers of seekable layers: eStargz and zstd:chunked, from a tar stream.
//!
//! The input is a layer's uncompressed tar stream (a file) with its entries
//! and their raw byte ranges ([`TarParser::finish_with_ends`]). The output
//! keeps the tar byte for byte — only cut into compression members so that
//! every file's data starts a new gzip member or zstd frame — and adds the
//! TOC [`super::toc`] reads:
//!
//! - eStargz: entries may be reordered (prioritized files first, then the
//!   `.prefetch.landmark` entry); the TOC is appended as the tar entry
//!   `stargz.index.json` before the end-of-archive blocks, then the footer.
//!   The uncompressed stream (hence the diff_id) changes.
//! - zstd:chunked: entries keep their order and the tar stream is unchanged
//!   (the diff_id stays); the TOC goes in a skippable frame that
//!   decompressors ignore, followed by the footer.
//!
//! A layer whose entries JSON cannot carry exactly (names that are not
//! UTF-8, or that hold U+FFFD; sparse files) is refused with
//! [`WriteError::Unrepresentable`]: the caller keeps it as it is.
//!
//! [`TarParser::finish_with_ends`]: super::tar::TarParser::finish_with_ends

use super::toc::{self, Toc, TocEntry};
use super::{Entry, EntryKind, FileData};
use crate::digest::Digest;
use base64::Engine as _;
use sha2::{Digest as _, Sha256};
use std::collections::BTreeMap;
use std::fs::File;
use std::io::{self, Write};
use std::os::unix::fs::FileExt;

/// Uncompressed size of each chunk of a large file (stargz-snapshotter's
/// default): the unit of fetching and verification.
pub const CHUNK_SIZE: u64 = 4 << 20;
/// Bytes copied from the input tar at a time.
const COPY_PIECE: usize = 1 << 20;
/// Tar block and end-of-archive length.
const TAR_BLOCK: usize = 512;
const TAR_EOF: usize = 2 * TAR_BLOCK;
/// gzip level for eStargz members (the gzip default).
const GZIP_LEVEL: u32 = 6;
/// Mode of the metadata entries imgfs adds (landmark, TOC).
const META_MODE: u32 = 0o644;

#[derive(Debug, thiserror::Error)]
pub enum WriteError {
    #[error("{0}")]
    Unrepresentable(String),
    #[error("writing the layer: {0}")]
    Io(#[from] io::Error),
}

/// A layer's uncompressed tar, parsed.
pub struct TarInput<'a> {
    pub file: &'a File,
    pub entries: &'a [Entry],
    /// Where each entry's raw bytes end (see the module doc).
    pub ends: &'a [u64],
    /// Length of the whole stream, end-of-archive blocks included.
    pub len: u64,
}

impl TarInput<'_> {
    /// Raw bytes of entry `k`.
    fn span(&self, k: usize) -> (u64, u64) {
        let start = if k == 0 { 0 } else { self.ends[k - 1] };
        (start, self.ends[k])
    }

    /// Where entry `k`'s file data lies, if it has any.
    fn data(&self, k: usize) -> Option<(u64, u64)> {
        match &self.entries[k].kind {
            EntryKind::File {
                size,
                data: FileData::Contiguous { offset },
            } if *size > 0 => Some((*offset, *size)),
            _ => None,
        }
    }
}

/// What was written: the new blob's identity and the descriptor annotations
/// that make it seekable.
#[derive(Debug, Clone)]
pub struct Written {
    pub digest: Digest,
    pub size: u64,
    /// sha256 of the uncompressed stream (the config's `diff_ids` entry).
    pub diff_id: Digest,
    pub annotations: BTreeMap<String, String>,
}

/// Checks that every entry can be described exactly by a TOC.
pub fn check_representable(entries: &[Entry]) -> Result<(), WriteError> {
    for entry in entries {
        let name = String::from_utf8_lossy(&entry.path);
        let refuse = |what: &str| {
            Err(WriteError::Unrepresentable(format!(
                "{name:?}: {what}; a TOC (JSON) cannot hold it exactly"
            )))
        };
        if !utf8_exact(&entry.path) {
            return refuse("the name is not UTF-8");
        }
        match &entry.kind {
            EntryKind::File {
                data: FileData::Sparse { .. },
                ..
            } => return refuse("a sparse file"),
            EntryKind::Symlink { target } | EntryKind::Hardlink { target }
                if !utf8_exact(target) =>
            {
                return refuse("the link target is not UTF-8");
            }
            _ => {}
        }
        if entry.xattrs.iter().any(|(k, _)| !utf8_exact(k)) {
            return refuse("an xattr name is not UTF-8");
        }
    }
    Ok(())
}

fn utf8_exact(bytes: &[u8]) -> bool {
    std::str::from_utf8(bytes).is_ok_and(|s| !s.contains(char::REPLACEMENT_CHARACTER))
}

/// Writes `input` as eStargz to `out`. `order` lists entry indexes in output
/// order; its first `prioritized` ones are put before a `.prefetch.landmark`
/// (none: a `.no.prefetch.landmark` goes first).
pub fn write_estargz(
    input: &TarInput,
    order: &[usize],
    prioritized: usize,
    out: &mut File,
) -> Result<Written, WriteError> {
    check_representable(input.entries)?;
    let mut w = Members::new(Codec::Gzip, out);
    let mut toc = Toc {
        version: 1,
        entries: Vec::with_capacity(order.len() + 1),
    };
    if prioritized == 0 {
        add_landmark(&mut w, &mut toc, toc::NO_PREFETCH_LANDMARK)?;
    }
    for (i, &k) in order.iter().enumerate() {
        if i == prioritized && prioritized > 0 {
            add_landmark(&mut w, &mut toc, toc::PREFETCH_LANDMARK)?;
        }
        copy_entry(input, k, &mut w, &mut toc)?;
    }
    if prioritized >= order.len() && prioritized > 0 {
        add_landmark(&mut w, &mut toc, toc::PREFETCH_LANDMARK)?;
    }
    let json = serde_json::to_vec(&toc).map_err(io::Error::other)?;
    let toc_offset = w.cut()?;
    w.write(&tar_header(toc::TOC_TAR_NAME, json.len() as u64)?)?;
    w.write(&json)?;
    w.write(&vec![0u8; padding(json.len() as u64) + TAR_EOF])?;
    let footer_at = w.cut()?;
    w.raw(&estargz_footer(toc_offset))?;
    let (digest, size, diff_id) = w.finish()?;
    debug_assert!(footer_at + toc::ESTARGZ_FOOTER_LEN as u64 == size);
    let annotations = BTreeMap::from([
        (
            toc::ESTARGZ_TOC_DIGEST.to_string(),
            Digest::of(&json).to_string(),
        ),
        (
            toc::ESTARGZ_UNCOMPRESSED_SIZE.to_string(),
            w.uncompressed.to_string(),
        ),
    ]);
    Ok(Written {
        digest,
        size,
        diff_id,
        annotations,
    })
}

/// Writes `input` as zstd:chunked to `out`, entries in their order.
pub fn write_zstd_chunked(
    input: &TarInput,
    level: i32,
    out: &mut File,
) -> Result<Written, WriteError> {
    check_representable(input.entries)?;
    let mut w = Members::new(Codec::Zstd(level), out);
    let mut toc = Toc {
        version: 1,
        entries: Vec::with_capacity(input.entries.len()),
    };
    for k in 0..input.entries.len() {
        copy_entry(input, k, &mut w, &mut toc)?;
    }
    // The end-of-archive blocks and anything after them, unchanged.
    w.copy_from(
        input.file,
        input.ends.last().copied().unwrap_or(0),
        input.len,
    )?;
    let json = serde_json::to_vec(&toc).map_err(io::Error::other)?;
    let manifest = zstd::bulk::compress(&json, level)?;
    let skippable_at = w.cut()?;
    let offset = skippable_at + toc::ZSTD_SKIPPABLE_HEADER as u64;
    w.raw(&skippable_frame(&manifest))?;
    let mut footer = Vec::with_capacity(toc::ZSTD_FOOTER_V2_PAYLOAD);
    for field in [
        offset,
        manifest.len() as u64,
        json.len() as u64,
        toc::ZSTD_CHUNKED_MANIFEST_TYPE,
        0,
        0,
        0,
    ] {
        footer.extend_from_slice(&field.to_le_bytes());
    }
    footer.extend_from_slice(toc::ZSTD_CHUNKED_MAGIC);
    w.raw(&skippable_frame(&footer))?;
    let (digest, size, diff_id) = w.finish()?;
    let position = format!(
        "{offset}:{}:{}:{}",
        manifest.len(),
        json.len(),
        toc::ZSTD_CHUNKED_MANIFEST_TYPE
    );
    let checksum = Digest::of(&manifest).to_string();
    // Both generations of annotation names, for old and new readers.
    let annotations = toc::ZSTD_CHUNKED_CHECKSUM
        .iter()
        .map(|k| (k.to_string(), checksum.clone()))
        .chain(
            toc::ZSTD_CHUNKED_POSITION
                .iter()
                .map(|k| (k.to_string(), position.clone())),
        )
        .collect();
    Ok(Written {
        digest,
        size,
        diff_id,
        annotations,
    })
}

/// Copies entry `k` (headers, data cut into chunks, padding) and lists it.
fn copy_entry(
    input: &TarInput,
    k: usize,
    w: &mut Members,
    toc: &mut Toc,
) -> Result<(), WriteError> {
    let (start, end) = input.span(k);
    let mut entry = toc_entry(&input.entries[k]);
    let Some((data, size)) = input.data(k) else {
        w.copy_from(input.file, start, end)?;
        toc.entries.push(entry);
        return Ok(());
    };
    w.copy_from(input.file, start, data)?;
    let mut whole = Sha256::new();
    let mut chunks = Vec::new();
    let mut done = 0;
    while done < size {
        let len = CHUNK_SIZE.min(size - done);
        let offset = w.cut()?;
        let digest = w.copy_hashed(input.file, data + done, data + done + len, &mut whole)?;
        chunks.push((offset, done, len, digest));
        done += len;
    }
    // zstd:chunked records where the file's last frame ends.
    let end_offset = w.cut()?;
    entry.digest = Some(Digest::from_bytes(whole.finalize().into()).to_string());
    entry.end_offset = if w.codec.is_zstd() { end_offset } else { 0 };
    let many = chunks.len() > 1;
    for (i, (offset, chunk_offset, len, digest)) in chunks.into_iter().enumerate() {
        let mut part = if i == 0 {
            std::mem::take(&mut entry)
        } else {
            TocEntry {
                name: entry_name(&input.entries[k]),
                kind: "chunk".into(),
                ..TocEntry::default()
            }
        };
        part.offset = offset;
        part.chunk_offset = chunk_offset;
        // eStargz: the last chunk says 0 ("the rest"); both readers accept either.
        part.chunk_size = if many { len } else { 0 };
        part.chunk_digest = Some(digest.to_string());
        toc.entries.push(part);
    }
    w.copy_from(input.file, data + size, end)?;
    Ok(())
}

fn entry_name(entry: &Entry) -> String {
    if entry.path.is_empty() {
        "./".into()
    } else {
        String::from_utf8_lossy(&entry.path).into_owned()
    }
}

/// The TOC entry of a tar entry (offsets and digests filled in by the caller).
fn toc_entry(entry: &Entry) -> TocEntry {
    let text = |b: &[u8]| String::from_utf8_lossy(b).into_owned();
    let (kind, size, link_name, dev) = match &entry.kind {
        EntryKind::Dir => ("dir", 0, String::new(), (0, 0)),
        EntryKind::File { size, .. } => ("reg", *size, String::new(), (0, 0)),
        EntryKind::Symlink { target } => ("symlink", 0, text(target), (0, 0)),
        EntryKind::Hardlink { target } => ("hardlink", 0, text(target), (0, 0)),
        EntryKind::CharDevice { major, minor } => ("char", 0, String::new(), (*major, *minor)),
        EntryKind::BlockDevice { major, minor } => ("block", 0, String::new(), (*major, *minor)),
        EntryKind::Fifo => ("fifo", 0, String::new(), (0, 0)),
    };
    let base64 = base64::engine::general_purpose::STANDARD;
    TocEntry {
        name: entry_name(entry),
        kind: kind.into(),
        size,
        modtime: toc::format_modtime(entry.mtime, entry.mtime_nsec),
        link_name,
        mode: i64::from(entry.mode),
        uid: entry.uid,
        gid: entry.gid,
        dev_major: u64::from(dev.0),
        dev_minor: u64::from(dev.1),
        xattrs: entry
            .xattrs
            .iter()
            .map(|(k, v)| (text(k), base64.encode(v)))
            .collect(),
        ..TocEntry::default()
    }
}

/// An eStargz landmark: a one-byte regular file with its own member.
fn add_landmark(w: &mut Members, toc: &mut Toc, name: &str) -> Result<(), WriteError> {
    let contents = [toc::LANDMARK_CONTENTS];
    w.write(&tar_header(name, 1)?)?;
    let offset = w.cut()?;
    w.write(&contents)?;
    w.write(&[0u8; TAR_BLOCK - 1])?;
    let digest = Digest::of(&contents).to_string();
    toc.entries.push(TocEntry {
        name: name.into(),
        kind: "reg".into(),
        size: 1,
        mode: i64::from(META_MODE),
        offset,
        digest: Some(digest.clone()),
        chunk_digest: Some(digest),
        ..TocEntry::default()
    });
    Ok(())
}

/// A ustar header for a regular file `name` of `size` bytes, owned by root.
fn tar_header(name: &str, size: u64) -> io::Result<[u8; TAR_BLOCK]> {
    let mut header = tar::Header::new_ustar();
    header.set_path(name)?;
    header.set_size(size);
    header.set_mode(META_MODE);
    header.set_entry_type(tar::EntryType::Regular);
    header.set_mtime(0);
    header.set_cksum();
    Ok(*header.as_bytes())
}

fn padding(len: u64) -> usize {
    ((TAR_BLOCK as u64 - len % TAR_BLOCK as u64) % TAR_BLOCK as u64) as usize
}

/// The eStargz footer: an empty gzip member whose extra field names the TOC.
fn estargz_footer(toc_offset: u64) -> Vec<u8> {
    let mut payload = format!("{toc_offset:016x}").into_bytes();
    payload.extend_from_slice(b"STARGZ");
    let mut extra = b"SG".to_vec();
    extra.extend_from_slice(&(payload.len() as u16).to_le_bytes());
    extra.extend_from_slice(&payload);
    let member = flate2::GzBuilder::new()
        .extra(extra)
        .write(Vec::new(), flate2::Compression::none());
    // Nothing written: the member is the header, one empty final stored
    // block, crc and size 0.
    member.finish().unwrap_or_default()
}

fn skippable_frame(payload: &[u8]) -> Vec<u8> {
    let mut frame = toc::ZSTD_SKIPPABLE_MAGIC.to_vec();
    frame.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    frame.extend_from_slice(payload);
    frame
}

#[derive(Clone, Copy)]
enum Codec {
    Gzip,
    Zstd(i32),
}

impl Codec {
    fn is_zstd(self) -> bool {
        matches!(self, Codec::Zstd(_))
    }
}

enum Encoder {
    Gzip(flate2::write::GzEncoder<Vec<u8>>),
    Zstd(zstd::stream::write::Encoder<'static, Vec<u8>>),
}

/// The output blob as a sequence of compression members: bytes written go
/// into the open member; [`Members::cut`] closes it, and the next write
/// opens a new one. Tracks the blob's digest and size and the uncompressed
/// stream's digest.
struct Members<'a> {
    codec: Codec,
    out: &'a mut File,
    open: Option<Encoder>,
    written: u64,
    blob: Sha256,
    diff: Sha256,
    uncompressed: u64,
}

impl<'a> Members<'a> {
    fn new(codec: Codec, out: &'a mut File) -> Self {
        Members {
            codec,
            out,
            open: None,
            written: 0,
            blob: Sha256::new(),
            diff: Sha256::new(),
            uncompressed: 0,
        }
    }

    /// Uncompressed bytes into the open member.
    fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        self.diff.update(bytes);
        self.uncompressed += bytes.len() as u64;
        let encoder = match self.open.take() {
            Some(encoder) => encoder,
            None => match self.codec {
                Codec::Gzip => Encoder::Gzip(flate2::write::GzEncoder::new(
                    Vec::new(),
                    flate2::Compression::new(GZIP_LEVEL),
                )),
                Codec::Zstd(level) => {
                    Encoder::Zstd(zstd::stream::write::Encoder::new(Vec::new(), level)?)
                }
            },
        };
        let encoder = self.open.insert(encoder);
        match encoder {
            Encoder::Gzip(e) => e.write_all(bytes),
            Encoder::Zstd(e) => e.write_all(bytes),
        }
    }

    /// Closes the open member; returns the blob offset the next one starts at.
    fn cut(&mut self) -> io::Result<u64> {
        if let Some(encoder) = self.open.take() {
            let bytes = match encoder {
                Encoder::Gzip(e) => e.finish()?,
                Encoder::Zstd(e) => e.finish()?,
            };
            self.raw(&bytes)?;
        }
        Ok(self.written)
    }

    /// Bytes straight into the blob, outside any member.
    fn raw(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.out.write_all(bytes)?;
        self.blob.update(bytes);
        self.written += bytes.len() as u64;
        Ok(())
    }

    /// Copies `[start, end)` of `file` into the open member.
    fn copy_from(&mut self, file: &File, start: u64, end: u64) -> io::Result<()> {
        self.copy_hashed(file, start, end, &mut Sha256::new())
            .map(|_| ())
    }

    /// The same, also feeding `whole`; returns the digest of just these bytes.
    fn copy_hashed(
        &mut self,
        file: &File,
        start: u64,
        end: u64,
        whole: &mut Sha256,
    ) -> io::Result<Digest> {
        let mut part = Sha256::new();
        let mut buf = vec![0u8; COPY_PIECE.min(end.saturating_sub(start) as usize)];
        let mut at = start;
        while at < end {
            let n = COPY_PIECE.min((end - at) as usize);
            file.read_exact_at(&mut buf[..n], at)?;
            part.update(&buf[..n]);
            whole.update(&buf[..n]);
            self.write(&buf[..n])?;
            at += n as u64;
        }
        Ok(Digest::from_bytes(part.finalize().into()))
    }

    /// Closes the last member and syncs; blob digest, size, and diff_id.
    fn finish(&mut self) -> io::Result<(Digest, u64, Digest)> {
        self.cut()?;
        self.out.flush()?;
        self.out.sync_all()?;
        let blob = std::mem::take(&mut self.blob).finalize();
        let diff = std::mem::take(&mut self.diff).finalize();
        Ok((
            Digest::from_bytes(blob.into()),
            self.written,
            Digest::from_bytes(diff.into()),
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::index::test_support::run;
    use crate::layer::tar::TarParser;
    use crate::layer::test_data::noise;
    use crate::layer::toc::{Plan, load};
    use crate::layer::{Access, Compression, Index};
    use crate::layer::{BlobSource, SourceError};
    use crate::source::{BlockSource, RangeFetcher};
    use std::io::Read;
    use std::path::Path;
    use std::sync::{Arc, Mutex};

    /// A blob in memory that records the ranges asked for.
    struct Blob {
        bytes: Vec<u8>,
        asked: Mutex<Vec<(u64, u64)>>,
    }

    impl RangeFetcher for Blob {
        fn fetch(&self, start: u64, end: u64) -> Result<Vec<u8>, SourceError> {
            self.asked.lock().expect("lock").push((start, end));
            Ok(self.bytes[start as usize..end as usize].to_vec())
        }
        fn describe(&self) -> String {
            "memory".into()
        }
    }

    fn populate(root: &Path) {
        let write = |p: &str, b: &[u8]| {
            let path = root.join(p);
            std::fs::create_dir_all(path.parent().expect("parent")).expect("mkdir");
            std::fs::write(path, b).expect("write");
        };
        write(
            "bin/busybox",
            &std::fs::read("/usr/bin/busybox").expect("busybox-static"),
        );
        write("data/big", &noise(9 * 1024 * 1024 + 123, 7));
        write("data/small", b"small file\n");
        write("data/empty", b"");
        write(
            &format!("deep/{}/name", "long-dir-name-".repeat(12)),
            b"long\n",
        );
        run("ln", &["-s", "../bin/busybox", "data/link"], root);
        run("ln", &["data/small", "data/hard"], root);
        run("mkfifo", &["data/fifo"], root);
        run(
            "setfattr",
            &["-n", "user.note", "-v", "hello", "data/small"],
            root,
        );
    }

    fn tar_of(root: &Path) -> Vec<u8> {
        let out = std::process::Command::new("tar")
            .args([
                "--format=pax",
                "--xattrs",
                "--xattrs-include=user.*",
                "-cf",
                "-",
                "-C",
            ])
            .arg(root)
            .arg(".")
            .output()
            .expect("tar");
        assert!(out.status.success());
        out.stdout
    }

    struct Converted {
        blob: Vec<u8>,
        written: Written,
        entries: Vec<Entry>,
    }

    fn parse(tar: &[u8]) -> (Vec<Entry>, Vec<u64>) {
        let mut parser = TarParser::new();
        parser.feed(tar).expect("parse");
        parser.finish_with_ends().expect("finish")
    }

    fn convert(tar: &[u8], estargz_priority: Option<&[&str]>) -> Converted {
        let dir = tempfile::tempdir().expect("tmp");
        let input_path = dir.path().join("in.tar");
        std::fs::write(&input_path, tar).expect("write");
        let file = File::open(&input_path).expect("open");
        let (entries, ends) = parse(tar);
        let input = TarInput {
            file: &file,
            entries: &entries,
            ends: &ends,
            len: tar.len() as u64,
        };
        let mut out = File::options()
            .read(true)
            .write(true)
            .create(true)
            .truncate(true)
            .open(dir.path().join("out"))
            .expect("out");
        let written = match estargz_priority {
            Some(first) => {
                let wanted: Vec<usize> = first
                    .iter()
                    .map(|p| {
                        entries
                            .iter()
                            .position(|e| e.path == p.as_bytes())
                            .expect("listed")
                    })
                    .collect();
                let rest = (0..entries.len()).filter(|k| !wanted.contains(k));
                let order: Vec<usize> = wanted.iter().copied().chain(rest).collect();
                write_estargz(&input, &order, wanted.len(), &mut out).expect("estargz")
            }
            None => write_zstd_chunked(&input, 3, &mut out).expect("zstd:chunked"),
        };
        let mut blob = Vec::new();
        File::open(dir.path().join("out"))
            .expect("reopen")
            .read_to_end(&mut blob)
            .expect("read");
        assert_eq!(written.size, blob.len() as u64);
        assert_eq!(written.digest, Digest::of(&blob));
        Converted {
            blob,
            written,
            entries,
        }
    }

    fn mounted(
        c: &Converted,
        compression: Compression,
    ) -> (Index, Arc<Blob>, BlockSource, tempfile::TempDir) {
        let plan = Plan::from_annotations(&c.written.annotations, compression)
            .expect("seekable")
            .expect("plan");
        let blob = Arc::new(Blob {
            bytes: c.blob.clone(),
            asked: Mutex::new(Vec::new()),
        });
        let fetch = |s: u64, e: u64| blob.fetch(s, e).map_err(|e| e.0);
        let index = load(&plan, c.written.digest, c.written.size, &fetch).expect("TOC loads");
        let Access::Chunked { codec, chunks, .. } = &index.access else {
            panic!("not chunked")
        };
        let dir = tempfile::tempdir().expect("tmp");
        let source = BlockSource::chunked(
            &dir.path().join("cache"),
            *codec,
            chunks.clone(),
            index.stream_size,
            blob.clone(),
        )
        .expect("source");
        (index, blob, source, dir)
    }

    /// Every entry of the original tar is in the index with the same
    /// metadata, and every file reads back its bytes through the chunks.
    fn assert_same(original: &[Entry], index: &Index, source: &BlockSource, tar: &[u8]) {
        for entry in original {
            let got = index
                .entries
                .iter()
                .find(|e| e.path == entry.path)
                .unwrap_or_else(|| panic!("{:?} missing", String::from_utf8_lossy(&entry.path)));
            let mut want_x = entry.xattrs.clone();
            want_x.sort();
            assert_eq!(
                (
                    got.mode,
                    got.uid,
                    got.gid,
                    got.mtime,
                    got.mtime_nsec,
                    &got.xattrs
                ),
                (
                    entry.mode,
                    entry.uid,
                    entry.gid,
                    entry.mtime,
                    entry.mtime_nsec,
                    &want_x
                ),
                "{:?}",
                String::from_utf8_lossy(&entry.path)
            );
            match (&entry.kind, &got.kind) {
                (
                    EntryKind::File {
                        size,
                        data: FileData::Contiguous { offset },
                    },
                    EntryKind::File {
                        size: got_size,
                        data: FileData::Contiguous { offset: at },
                    },
                ) => {
                    assert_eq!(size, got_size);
                    let want = &tar[*offset as usize..(*offset + *size) as usize];
                    let bytes = source.read_at(*at, *size as usize).expect("read");
                    assert!(
                        bytes == want,
                        "{:?} differs",
                        String::from_utf8_lossy(&entry.path)
                    );
                }
                (want, got) => assert_eq!(want, got),
            }
        }
    }

    #[test]
    fn zstd_chunked_round_trip_keeps_the_tar() {
        let dir = tempfile::tempdir().expect("tmp");
        populate(dir.path());
        let tar = tar_of(dir.path());
        let c = convert(&tar, None);
        let plain = zstd::stream::decode_all(&c.blob[..]).expect("decodes as plain zstd");
        assert!(plain == tar, "the tar stream must be unchanged");
        assert_eq!(c.written.diff_id, Digest::of(&tar));
        let (index, blob, source, _dir) = mounted(&c, Compression::Zstd);
        assert_same(&c.entries, &index, &source, &tar);
        // The 9 MiB file came in three chunks; one 4 KiB read fetches one.
        let Access::Chunked { chunks, .. } = &index.access else {
            unreachable!()
        };
        assert!(chunks.iter().filter(|c| c.len == CHUNK_SIZE).count() >= 2);
        let fresh_dir = tempfile::tempdir().expect("tmp");
        let fresh = BlockSource::chunked(
            &fresh_dir.path().join("c"),
            crate::layer::Codec::Zstd,
            chunks.clone(),
            index.stream_size,
            blob.clone(),
        )
        .expect("source");
        let before = blob.asked.lock().expect("lock").len();
        let big = index
            .entries
            .iter()
            .find(|e| e.path == b"data/big")
            .expect("big");
        let EntryKind::File {
            data: FileData::Contiguous { offset },
            ..
        } = big.kind
        else {
            panic!()
        };
        fresh.read_at(offset + CHUNK_SIZE + 10, 4096).expect("read");
        let asked = blob.asked.lock().expect("lock")[before..].to_vec();
        assert_eq!(asked.len(), 1, "{asked:?}");
        assert!(
            asked[0].1 - asked[0].0 < CHUNK_SIZE + 4096,
            "one chunk: {asked:?}"
        );
    }

    #[test]
    fn estargz_round_trip_with_prioritized_files() {
        let dir = tempfile::tempdir().expect("tmp");
        populate(dir.path());
        let tar = tar_of(dir.path());
        let c = convert(&tar, Some(&["data/small", "bin/busybox"]));
        // Still one valid tar.gz, with the landmark and TOC entries added.
        let mut plain = Vec::new();
        flate2::read::MultiGzDecoder::new(&c.blob[..])
            .read_to_end(&mut plain)
            .expect("decodes as plain gzip");
        assert_eq!(c.written.diff_id, Digest::of(&plain));
        let (entries, _) = parse(&plain);
        let names: Vec<String> = entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect();
        assert_eq!(
            names[..3],
            ["data/small", "bin/busybox", ".prefetch.landmark"]
        );
        assert_eq!(names.last().map(String::as_str), Some("stargz.index.json"));
        assert_eq!(names.len(), c.entries.len() + 2);
        let (index, _blob, source, _dir) = mounted(&c, Compression::Gzip);
        assert_same(&c.entries, &index, &source, &tar);
        assert!(
            !index
                .entries
                .iter()
                .any(|e| e.path == b".prefetch.landmark")
        );
        let Access::Chunked { prefetch_end, .. } = index.access else {
            unreachable!()
        };
        let busybox = std::fs::metadata("/usr/bin/busybox")
            .expect("busybox")
            .len();
        assert_eq!(prefetch_end, busybox + "small file\n".len() as u64);
    }

    #[test]
    fn bad_bytes_and_bad_tocs_are_refused() {
        let dir = tempfile::tempdir().expect("tmp");
        populate(dir.path());
        let tar = tar_of(dir.path());
        let mut c = convert(&tar, Some(&[]));
        // A flipped byte inside busybox's data: that chunk fails, others read.
        let (index, _, _, _) = mounted(&c, Compression::Gzip);
        let Access::Chunked { chunks, .. } = &index.access else {
            unreachable!()
        };
        let victim = chunks[chunks.len() / 2].clone();
        c.blob[((victim.blob_start + victim.blob_end) / 2) as usize] ^= 0x40;
        let (index, _, source, _dir) = mounted(&c, Compression::Gzip);
        let err = source
            .read_at(victim.stream_offset, 10)
            .expect_err("corrupt chunk");
        assert!(err.0.contains("chunk"), "{err}");
        let other = chunks
            .iter()
            .find(|ch| ch.blob_end <= victim.blob_start)
            .expect("earlier chunk");
        source
            .read_at(other.stream_offset, 10)
            .expect("other chunks still read");
        drop(index);
        // A TOC digest that does not match.
        let mut wrong = c.written.annotations.clone();
        wrong.insert(toc::ESTARGZ_TOC_DIGEST.into(), Digest::of(b"x").to_string());
        let plan = Plan::from_annotations(&wrong, Compression::Gzip)
            .expect("some")
            .expect("plan");
        let fetch = |s: u64, e: u64| Ok(c.blob[s as usize..e as usize].to_vec());
        let err = load(&plan, c.written.digest, c.written.size, &fetch).expect_err("mismatch");
        assert!(matches!(err, toc::TocError::DigestMismatch { .. }), "{err}");
        // A footer pointing past the blob.
        let mut past = c.blob.clone();
        let at = past.len() - toc::ESTARGZ_FOOTER_LEN;
        past[at..].copy_from_slice(&estargz_footer(u64::MAX / 2));
        let fetch = |s: u64, e: u64| Ok(past[s as usize..e as usize].to_vec());
        let err = load(&plan, c.written.digest, c.written.size, &fetch).expect_err("past");
        assert!(matches!(err, toc::TocError::Footer(_)), "{err}");
    }

    #[test]
    fn toc_names_are_confined_and_lossy_names_refused() {
        let entry = |name: &str| TocEntry {
            name: name.into(),
            kind: "dir".into(),
            mode: 0o755,
            ..TocEntry::default()
        };
        let toc = Toc {
            version: 1,
            entries: vec![entry("../../etc"), entry("/abs/dir"), entry("a/../../b")],
        };
        let index =
            toc::build(&toc, crate::layer::Codec::Zstd, Digest::of(b""), 100, 50).expect("index");
        let paths: Vec<&[u8]> = index.entries.iter().map(|e| &e.path[..]).collect();
        assert_eq!(paths, [&b"etc"[..], b"abs/dir", b"b"]);
        let lossy = Toc {
            version: 1,
            entries: vec![entry("caf\u{fffd}")],
        };
        assert!(toc::build(&lossy, crate::layer::Codec::Zstd, Digest::of(b""), 100, 50).is_err());
    }

    #[test]
    fn the_footer_is_what_estargz_specifies() {
        let footer = estargz_footer(0x1234);
        assert_eq!(footer.len(), toc::ESTARGZ_FOOTER_LEN);
        assert_eq!(
            toc::parse_estargz_footer(&footer).expect("parses").0,
            0x1234
        );
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(&footer[..])
            .read_to_end(&mut out)
            .expect("valid gzip");
        assert!(out.is_empty());
    }
}
