//! The push tar parser (`layer::tar::TarParser`) fed arbitrary bytes in
//! arbitrary pieces: never panics, the split points never change the
//! result, and every file it accepts lies inside the stream it was fed
//! (what `Index::decode` checks: an index failing that is rebuilt forever).
#![no_main]

use imgfs::layer::tar::{TarError, TarParser};
use imgfs::layer::{Entry, EntryKind, FileData};
use libfuzzer_sys::fuzz_target;

/// Bytes at the front of the input that choose the split points.
const SPLIT_SEED: usize = 8;
/// Largest piece fed at once when splitting.
const MAX_PIECE: u64 = 1500;

fuzz_target!(|data: &[u8]| {
    if data.len() < SPLIT_SEED {
        return;
    }
    let (seed, stream) = data.split_at(SPLIT_SEED);
    let mut seed = u64::from_le_bytes(seed.try_into().unwrap_or_default());

    let whole = parse(std::iter::once(stream));
    let pieces = split(stream, &mut seed);
    let split = parse(pieces.iter().copied());
    match (&whole, &split) {
        (Ok(a), Ok(b)) => assert!(a == b, "split points changed the entries"),
        (Err(a), Err(b)) => assert_eq!(a, b, "split points changed the error"),
        _ => panic!("split points changed the outcome: {whole:?} vs {split:?}"),
    }
    if let Ok(entries) = whole {
        for entry in &entries {
            check_inside(entry, stream.len() as u64);
        }
    }
});

fn parse<'a>(pieces: impl Iterator<Item = &'a [u8]>) -> Result<Vec<Entry>, TarError> {
    let mut parser = TarParser::new();
    for piece in pieces {
        parser.feed(piece)?;
    }
    parser.finish()
}

/// Cuts `stream` into pieces of 0..MAX_PIECE bytes chosen by a xorshift.
fn split<'a>(stream: &'a [u8], seed: &mut u64) -> Vec<&'a [u8]> {
    let mut pieces = Vec::new();
    let mut rest = stream;
    *seed |= 1;
    while !rest.is_empty() {
        *seed ^= *seed << 13;
        *seed ^= *seed >> 7;
        *seed ^= *seed << 17;
        let n = usize::try_from(*seed % MAX_PIECE)
            .unwrap_or(1)
            .min(rest.len());
        let (piece, tail) = rest.split_at(n);
        pieces.push(piece);
        rest = tail;
    }
    pieces
}

/// A file's bytes lie within the stream the parser saw.
fn check_inside(entry: &Entry, stream_len: u64) {
    let EntryKind::File { size, data } = &entry.kind else {
        return;
    };
    match data {
        FileData::Contiguous { offset } => {
            let end = offset.checked_add(*size);
            assert!(
                end.is_some_and(|end| end <= stream_len),
                "file {:?}: {size} bytes at {offset} pass the stream's end {stream_len}",
                String::from_utf8_lossy(&entry.path)
            );
        }
        FileData::Sparse { segments } => {
            let mut prev_end = 0u64;
            for s in segments {
                let in_stream = s.stream_offset.checked_add(s.len);
                let in_file = s.file_offset.checked_add(s.len);
                assert!(
                    s.file_offset >= prev_end
                        && in_stream.is_some_and(|end| end <= stream_len)
                        && in_file.is_some_and(|end| end <= *size),
                    "sparse file {:?}: segment {s:?} out of order, or outside the stream ({stream_len}) or the file ({size})",
                    String::from_utf8_lossy(&entry.path)
                );
                prev_end = s.file_offset.saturating_add(s.len);
            }
        }
    }
}
