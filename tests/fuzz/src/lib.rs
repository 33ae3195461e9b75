//! What several fuzz targets share: a blob held in memory, and reads of a
//! few files through an index a target built or decoded.

use imgfs::layer::{BlobSource, EntryKind, Index, LayerReader, SourceError};
use std::sync::Arc;

/// Files [`read_some`] reads, at most.
const READ_FILES: usize = 8;
/// Bytes per read.
const READ_LEN: usize = 4096;

/// The blob in memory.
pub struct Memory(pub Vec<u8>);

impl BlobSource for Memory {
    fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
        let start = usize::try_from(offset)
            .map_err(|_| SourceError("offset".into()))?
            .min(self.0.len());
        let end = start.saturating_add(len).min(self.0.len());
        Ok(self.0[start..end].to_vec())
    }
}

/// Reads the start, middle and last byte of the first files of `index`
/// from `source`: a reader must serve or refuse them, never panic.
pub fn read_some(index: Arc<Index>, source: Arc<dyn BlobSource>) {
    let reader = LayerReader::new(index.clone(), source);
    let files = index.entries.iter().filter_map(|e| match &e.kind {
        EntryKind::File { size, data } => Some((*size, data)),
        _ => None,
    });
    for (size, data) in files.take(READ_FILES) {
        for offset in [0, size / 2, size.saturating_sub(1)] {
            let _ = reader.read_file(size, data, offset, READ_LEN);
        }
    }
}
