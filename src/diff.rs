//! What a writable mount changed against its image, as `docker diff` shows
//! it: `A` added, `C` changed, `D` deleted, one path a line.
//!
//! Everything is read from the upper directory (overlayfs format) and the
//! image's union tree; nothing is mounted. A whiteout is a deletion; an
//! upper entry whose path exists in the image is a change (directories that
//! only hold changes are listed as changed, as docker does); anything else is
//! an addition.

use crate::union::Tree;
use crate::upper::{Found, Upper, UpperError};
use serde::Serialize;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kind {
    #[serde(rename = "A")]
    Added,
    #[serde(rename = "C")]
    Changed,
    #[serde(rename = "D")]
    Deleted,
}

impl Kind {
    pub fn letter(self) -> char {
        match self {
            Kind::Added => 'A',
            Kind::Changed => 'C',
            Kind::Deleted => 'D',
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Change {
    pub kind: Kind,
    /// Absolute path in the image, e.g. `/etc/motd`.
    #[serde(serialize_with = "lossy")]
    pub path: Vec<u8>,
}

fn lossy<S: serde::Serializer>(path: &[u8], s: S) -> Result<S::Ok, S::Error> {
    s.serialize_str(&String::from_utf8_lossy(path))
}

/// The changes in `upper` over `image`, sorted by path.
pub fn changes(upper: &Upper, image: &Tree) -> Result<Vec<Change>, UpperError> {
    let mut out = Vec::new();
    for (path, found, _opaque) in upper.walk()? {
        let in_image = image.lookup_path(&path).is_some();
        let kind = match found {
            Found::Whiteout if in_image => Kind::Deleted,
            Found::Whiteout | Found::Missing => continue,
            Found::Entry(_) if in_image => Kind::Changed,
            Found::Entry(_) => Kind::Added,
        };
        let mut absolute = Vec::with_capacity(path.len() + 1);
        absolute.push(b'/');
        absolute.extend_from_slice(&path);
        out.push(Change {
            kind,
            path: absolute,
        });
    }
    out.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{Access, Entry, EntryKind, FileData, INDEX_VERSION, Index};
    use crate::upper::{Owner, SpecialKind};
    use std::sync::Arc;

    #[test]
    fn whiteouts_changes_and_additions() {
        let entry = |path: &str, kind| Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        };
        let file = EntryKind::File {
            size: 0,
            data: FileData::Contiguous { offset: 0 },
        };
        let index = Arc::new(Index {
            version: INDEX_VERSION,
            layer_digest: Digest::of(b"x"),
            blob_size: 0,
            stream_size: 0,
            entries: vec![
                entry("etc", EntryKind::Dir),
                entry("etc/passwd", file.clone()),
                entry("etc/group", file),
            ],
            block_digests: vec![],
            access: Access::Tar,
        });
        let tree = Tree::build(&[index]);
        let dir = tempfile::tempdir().expect("tempdir");
        let upper = Upper::open(dir.path()).expect("upper");
        let root = Owner { uid: 0, gid: 0 };
        upper.mkdir(b"", b"etc", 0o755, root).expect("mkdir");
        upper.whiteout(b"etc", b"group").expect("whiteout");
        upper
            .mknod(b"etc", b"passwd", &SpecialKind::Fifo, 0o644, root)
            .expect("replace passwd");
        upper.mkdir(b"", b"srv", 0o755, root).expect("mkdir");
        let got: Vec<String> = changes(&upper, &tree)
            .expect("changes")
            .iter()
            .map(|c| format!("{} {}", c.kind.letter(), String::from_utf8_lossy(&c.path)))
            .collect();
        assert_eq!(got, ["C /etc", "D /etc/group", "C /etc/passwd", "A /srv"]);
    }
}
