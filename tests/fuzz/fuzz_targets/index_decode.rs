//! `Index::decode` on damaged persisted indexes. The first input byte picks
//! the shape: odd, the rest is a whole file as read from the cache; even,
//! the rest is the bincode body, wrapped here in the magic, version and zstd
//! frame the cache writes (so mutations reach the decoder and `validate`).
//! Never panics; an index it accepts re-encodes to itself, and a reader over
//! it serves (or refuses) every file without panicking.
#![no_main]

use imgfs::layer::{BlobSource, INDEX_VERSION, Index, SourceError};
use libfuzzer_sys::fuzz_target;
use std::sync::Arc;

/// The persisted index's leading magic (private in `layer::index`).
const INDEX_MAGIC: &[u8; 8] = b"IMGFSIDX";

fuzz_target!(|data: &[u8]| {
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let Some(file) = (if mode & 1 == 1 {
        Some(rest.to_vec())
    } else {
        wrap(rest)
    }) else {
        return;
    };
    let Ok(index) = Index::decode(&file) else {
        return;
    };
    let encoded = index.encode().expect("a decoded index encodes");
    let again = Index::decode(&encoded).expect("a re-encoded index decodes");
    assert!(
        again.encode().expect("encodes") == encoded,
        "decode/encode is not stable"
    );
    read_some(index);
});

/// The persisted form around a bincode body.
fn wrap(body: &[u8]) -> Option<Vec<u8>> {
    let packed = zstd::bulk::compress(body, 1).ok()?;
    let mut out = INDEX_MAGIC.to_vec();
    out.extend_from_slice(&INDEX_VERSION.to_le_bytes());
    out.extend_from_slice(&packed);
    Some(out)
}

/// A blob of `size` bytes of a fixed pattern (the index's digests will not
/// match it; a reader must report that, not panic).
struct Pattern {
    size: u64,
}

impl BlobSource for Pattern {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let end = offset.saturating_add(len as u64).min(self.size);
        let n = usize::try_from(end.saturating_sub(offset))
            .map_err(|_| SourceError("too long".into()))?;
        Ok((0..n)
            .map(|i| (offset as usize).wrapping_add(i) as u8)
            .collect())
    }
}

fn read_some(index: Index) {
    let size = index.source_size().min(1 << 24);
    imgfs_fuzz::read_some(Arc::new(index), Arc::new(Pattern { size }));
}
