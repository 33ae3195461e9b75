//! The gzip checkpoint index (zran) over arbitrary gzip-ish bytes with a
//! small checkpoint spacing (from the first two input bytes):
//! - `GzipIndexer` never panics, and inflating from each checkpoint it
//!   recorded (`inflate_from`) gives the same bytes the streaming pass did;
//! - `build_index` never panics; when it accepts the blob, the index
//!   survives encode/decode and `LayerReader` reads every file's bytes as
//!   they are in the decompressed stream.
#![no_main]

use imgfs::digest::Digest;
use imgfs::layer::zran::{GzipIndexer, ZranError, inflate_from, lead_in};
use imgfs::layer::{
    Compression, EntryKind, FileData, Index, IndexOptions, LayerReader, build_index,
};
use imgfs_fuzz::Memory;
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// Uncompressed bytes compared after each checkpoint.
const COMPARE_LEN: usize = 64 * 1024;
/// Largest decompressed stream considered (a gzip bomb is not a finding).
const MAX_STREAM: usize = 16 << 20;
/// Bytes per piece fed to the indexer (the network delivers pieces too).
const FEED_PIECE: usize = 4099;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let (head, blob) = data.split_at(2);
    let spacing = u64::from(u16::from_le_bytes([head[0], head[1]])) + 1;
    let Some(stream) = stream_pass(blob, spacing) else {
        return;
    };
    let (checkpoints, inflated) = stream;
    for cp in &checkpoints {
        let start = usize::try_from(cp.inp - lead_in(cp)).expect("in range");
        let out = usize::try_from(cp.out).expect("in range");
        let want = COMPARE_LEN.min(inflated.len() - out);
        let got = inflate_from(cp, &blob[start..], 0, want)
            .unwrap_or_else(|e| panic!("inflating from checkpoint at out {out}: {e}"));
        assert!(
            got == inflated[out..out + want],
            "checkpoint at out {out}, in {}: bytes differ from the streaming pass",
            cp.inp
        );
    }
    index_and_read(blob, spacing, &inflated);
});

/// The whole streaming pass; `None` when the blob is not gzip (or too big).
fn stream_pass(blob: &[u8], spacing: u64) -> Option<(Vec<imgfs::layer::Checkpoint>, Vec<u8>)> {
    let mut indexer = GzipIndexer::new(spacing).ok()?;
    let mut inflated = Vec::new();
    for piece in blob.chunks(FEED_PIECE) {
        indexer
            .feed::<Stop>(piece, |out| {
                if inflated.len() + out.len() > MAX_STREAM {
                    return Err(Stop);
                }
                inflated.extend_from_slice(out);
                Ok(())
            })
            .ok()?;
    }
    let index = indexer.finish().ok()?;
    assert_eq!(index.stream_size, inflated.len() as u64, "stream size");
    Some((index.checkpoints, inflated))
}

/// Why the streaming pass stopped (the reason does not matter here).
struct Stop;

impl From<ZranError> for Stop {
    fn from(_: ZranError) -> Self {
        Stop
    }
}

fn index_and_read(blob: &[u8], spacing: u64, inflated: &[u8]) {
    let options = IndexOptions {
        checkpoint_spacing: spacing,
    };
    let digest = Digest::of(blob);
    let Ok(index) = build_index(
        blob,
        Compression::Gzip,
        digest,
        blob.len() as u64,
        None,
        &options,
    ) else {
        return;
    };
    assert_eq!(
        index.stream_size,
        inflated.len() as u64,
        "index stream size"
    );
    let encoded = index.encode().expect("an index encodes");
    let index = Arc::new(Index::decode(&encoded).expect("a fresh index decodes"));
    let reader = LayerReader::new(index.clone(), Arc::new(Memory(blob.to_vec())));
    for entry in &index.entries {
        let EntryKind::File {
            size,
            data: data @ FileData::Contiguous { offset },
        } = &entry.kind
        else {
            continue;
        };
        let (start, len) = (*offset as usize, *size as usize);
        let got = reader
            .read_file(*size, data, 0, len)
            .unwrap_or_else(|e| panic!("reading {:?}: {e}", entry.path));
        assert!(
            got == inflated[start..start + len],
            "{:?}: bytes differ from the stream",
            String::from_utf8_lossy(&entry.path)
        );
    }
}
