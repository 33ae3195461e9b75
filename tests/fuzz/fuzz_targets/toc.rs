//! Seekable-layer tables of contents (`layer::toc`), the metadata an
//! eStargz or zstd:chunked layer brings along. The input (after a mode
//! byte) goes to the footer and position parsers and to `parse_toc`, and,
//! as the TOC JSON, is wrapped into a blob of the format the mode byte
//! names (eStargz: a gzip member of a tar holding `stargz.index.json`, then
//! the footer; zstd:chunked: a zstd frame at a known position) so `load`
//! verifies it and builds an index. Never panics; an index `load` builds
//! passes `Index::decode`'s checks (else it would be rebuilt on every
//! mount) and a reader over it serves or refuses reads without panicking.
#![no_main]

use flate2::write::GzEncoder;
use imgfs::digest::Digest;
use imgfs::layer::Index;
use imgfs::layer::toc::{
    Plan, Position, TOC_TAR_NAME, load, parse_estargz_footer, parse_position, parse_toc,
    parse_zstd_footer,
};
use imgfs_fuzz::{Memory, read_some};
use libfuzzer_sys::fuzz_target;
use std::io::Write;
use std::sync::Arc;

/// Filler before the TOC, in units of this many bytes (chosen by the mode byte).
const FILLER_UNIT: usize = 512;
/// zstd skippable frame header before a zstd:chunked manifest.
const SKIPPABLE_HEADER: usize = 8;

fuzz_target!(|data: &[u8]| {
    let Some((&mode, json)) = data.split_first() else {
        return;
    };
    let _ = parse_toc(json);
    let _ = parse_estargz_footer(json);
    let _ = parse_zstd_footer(json);
    if let Ok(text) = std::str::from_utf8(json) {
        let _ = parse_position(text);
    }
    let filler = usize::from(mode >> 1) * FILLER_UNIT;
    let built = if mode & 1 == 0 {
        estargz(json, filler)
    } else {
        zstd_chunked(json, filler + SKIPPABLE_HEADER)
    };
    let Some((plan, blob)) = built else {
        return;
    };
    let fetch = |start: u64, end: u64| -> Result<Vec<u8>, String> {
        let range = usize::try_from(start).ok().zip(usize::try_from(end).ok());
        range
            .and_then(|(s, e)| blob.get(s..e))
            .map(<[u8]>::to_vec)
            .ok_or_else(|| format!("bytes {start}-{end} outside the blob"))
    };
    let Ok(index) = load(&plan, Digest::of(&blob), blob.len() as u64, &fetch) else {
        return;
    };
    let encoded = index.encode().expect("a TOC index encodes");
    if let Err(e) = Index::decode(&encoded) {
        panic!("an index built from a TOC fails the persisted index's checks: {e}");
    }
    read_some(Arc::new(index), Arc::new(Memory(blob)));
});

/// `filler` zero bytes, the TOC member, the footer pointing at it.
fn estargz(json: &[u8], filler: usize) -> Option<(Plan, Vec<u8>)> {
    let mut tar = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(json.len() as u64);
    header.set_mode(0o644);
    tar.append_data(&mut header, TOC_TAR_NAME, json).ok()?;
    let mut member = GzEncoder::new(Vec::new(), flate2::Compression::fast());
    member.write_all(&tar.into_inner().ok()?).ok()?;
    let mut blob = vec![0u8; filler];
    blob.extend_from_slice(&member.finish().ok()?);
    blob.extend_from_slice(&estargz_footer(filler as u64));
    let toc_digest = Digest::of(json);
    Some((Plan::Estargz { toc_digest }, blob))
}

/// The 51-byte eStargz footer: an empty gzip member whose extra field (subfield
/// `SG`) holds `%016xSTARGZ` with the TOC offset.
fn estargz_footer(toc_offset: u64) -> Vec<u8> {
    let payload = format!("{toc_offset:016x}STARGZ");
    let mut out = vec![0x1f, 0x8b, 0x08, 0x04, 0, 0, 0, 0, 0, 0xff];
    out.extend_from_slice(&26u16.to_le_bytes());
    out.extend_from_slice(b"SG");
    out.extend_from_slice(&22u16.to_le_bytes());
    out.extend_from_slice(payload.as_bytes());
    // An empty stored block, then CRC32 and ISIZE of nothing.
    out.extend_from_slice(&[0x01, 0x00, 0x00, 0xff, 0xff]);
    out.extend_from_slice(&[0; 8]);
    out
}

/// `offset` zero bytes, then the zstd-compressed manifest.
fn zstd_chunked(json: &[u8], offset: usize) -> Option<(Plan, Vec<u8>)> {
    let compressed = zstd::bulk::compress(json, 1).ok()?;
    let mut blob = vec![0u8; offset];
    blob.extend_from_slice(&compressed);
    let plan = Plan::ZstdChunked {
        checksum: Digest::of(&compressed),
        position: Some(Position {
            offset: offset as u64,
            len: compressed.len() as u64,
            uncompressed_len: json.len() as u64,
        }),
    };
    Some((plan, blob))
}
