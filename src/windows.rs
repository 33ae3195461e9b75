//! The default view of Windows container images.
//!
//! A Windows layer tar does not hold a root filesystem at its top level:
//! `Files/` is the C:\ drive, `Hives/` holds registry hives, Hyper-V
//! images add `UtilityVM/`, and tools may add other metadata. Shown as it
//! is, a mount opens on `Files/ Hives/`; users want to look at C:\.
//!
//! [`WindowsView`] rewrites each layer's entries, bottom layer first, so that:
//!
//! - `Files/x` becomes `x`: the mount's root is C:\ (the `Files` entry
//!   itself gives the root its attributes);
//! - everything else at the top level moves under [`METADATA_DIR`]
//!   (`.windows-layer/Hives/...`, `.windows-layer/UtilityVM/...`); the
//!   layer's own root entry (`./`) becomes that directory;
//! - whiteouts, opaque markers and hardlink targets follow their paths, so
//!   union semantics are those of the raw layout: `Files/a/.wh.b` hides
//!   `a/b`, and the two markers that mean "everything of C:\ below"
//!   (`.wh.Files`, `Files/.wh..wh..opq`) become whiteouts of every top-level
//!   name lower layers showed, except [`METADATA_DIR`] (an opaque root
//!   would also hide the lower layers' hives). A raw root opaque marker
//!   (`./.wh..wh..opq`) hides everything below, as in the raw layout.
//!
//! Only the paths change; data offsets, metadata and xattrs are kept. A C:\
//! entry named `.windows-layer` would share the directory with the metadata
//! (Windows images have none); `imgfs mount --raw-layout` shows the layers
//! as they are.

use crate::layer::{Entry, EntryKind, Index};
use std::collections::BTreeSet;
use std::sync::Arc;

/// Top-level directory of a Windows layer that is the C:\ drive.
pub const FILES_DIR: &[u8] = b"Files";
/// Where everything of a Windows layer outside `Files/` is shown: hidden
/// from a plain `ls` of C:\, and a name Windows layers do not use.
pub const METADATA_DIR: &[u8] = b".windows-layer";
const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";

/// How the layers of a Windows image are shown.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Layout {
    /// C:\ at the root, the rest under [`METADATA_DIR`].
    #[default]
    View,
    /// The layer tars as they are (`Files/`, `Hives/`, ...).
    Raw,
}

/// Whether an image of this `os` (from its platform) is a Windows image.
pub fn is_windows(os: &str) -> bool {
    os.eq_ignore_ascii_case("windows")
}

/// Top-level directory of a Windows base layer holding the registry hives.
const HIVES_DIR: &[u8] = b"Hives";

/// Whether a stack of layers looks like a Windows image in the raw layout:
/// its bottom (base) layer has top-level `Files/` and `Hives/` entries. For
/// callers that no longer know the image's platform (a mount's record).
pub fn has_windows_layout(indexes: &[Arc<Index>]) -> bool {
    let Some(base) = indexes.first() else {
        return false;
    };
    let has = |dir: &[u8]| base.entries.iter().any(|e| top_name(&e.path) == dir);
    has(FILES_DIR) && has(HIVES_DIR)
}

/// The indexes as a mount shows them: in the Windows view when the image's
/// platform `os` is Windows and `layout` is [`Layout::View`], else as they are.
pub fn for_image(indexes: Vec<Arc<Index>>, os: &str, layout: Layout) -> Vec<Arc<Index>> {
    if is_windows(os) && layout == Layout::View {
        WindowsView::indexes(indexes)
    } else {
        indexes
    }
}

/// Rewrites the layers of one image from the raw Windows layout to the
/// default view, bottom layer first (see the module documentation).
#[derive(Debug, Default)]
pub struct WindowsView {
    /// Top-level names of the view that lower layers created: what a
    /// whiteout of all of C:\ must hide.
    lower_top: BTreeSet<Vec<u8>>,
}

impl WindowsView {
    pub fn new() -> Self {
        Self::default()
    }

    /// The entries of the next layer up, in the view. Entries keep their
    /// order; a marker that whites out all of C:\ becomes one whiteout per
    /// lower top-level name, in its place.
    pub fn layer(&mut self, entries: Vec<Entry>) -> Vec<Entry> {
        let mut out = Vec::with_capacity(entries.len());
        for entry in entries {
            self.map_entry(entry, &mut out);
        }
        for entry in &out {
            let top = top_name(&entry.path);
            if !top.is_empty() && !top.starts_with(WHITEOUT_PREFIX) {
                self.lower_top.insert(top.to_vec());
            }
        }
        out
    }

    /// [`WindowsView::layer`] over indexes: the same indexes with their
    /// entries in the view (copied only where someone else holds them).
    pub fn indexes(indexes: Vec<Arc<Index>>) -> Vec<Arc<Index>> {
        let mut view = WindowsView::new();
        indexes
            .into_iter()
            .map(|index| {
                let mut index = Arc::unwrap_or_clone(index);
                index.entries = view.layer(std::mem::take(&mut index.entries));
                Arc::new(index)
            })
            .collect()
    }

    fn map_entry(&self, mut entry: Entry, out: &mut Vec<Entry>) {
        let raw = std::mem::take(&mut entry.path);
        match raw.as_slice() {
            b"" => entry.path = METADATA_DIR.to_vec(),
            // The root of a layer made opaque: all of both parts hidden.
            OPAQUE_MARKER => entry.path = OPAQUE_MARKER.to_vec(),
            FILES_DIR if matches!(entry.kind, EntryKind::Dir) => entry.path = Vec::new(),
            // A non-directory `Files` replaces all of C:\ in the raw
            // layout; shown beside the metadata, with C:\ whited out.
            FILES_DIR => {
                self.hide_lower_drive(&entry, out);
                entry.path = metadata_path(&raw);
            }
            path if is_drive_wide_marker(path) => {
                self.hide_lower_drive(&entry, out);
                return;
            }
            path => entry.path = view_path(path),
        }
        if let EntryKind::Hardlink { target } = &mut entry.kind {
            *target = view_path(target);
        }
        out.push(entry);
    }

    /// One whiteout per top-level name lower layers showed, except the
    /// metadata directory, modelled on `marker` (owner, times).
    fn hide_lower_drive(&self, marker: &Entry, out: &mut Vec<Entry>) {
        for name in self.lower_top.iter().filter(|n| *n != METADATA_DIR) {
            let mut whiteout = marker.clone();
            whiteout.kind = EntryKind::File {
                size: 0,
                data: crate::layer::FileData::Contiguous { offset: 0 },
            };
            whiteout.xattrs = Vec::new();
            whiteout.path = [WHITEOUT_PREFIX, name].concat();
            out.push(whiteout);
        }
    }
}

/// `.wh.Files` and `Files/.wh..wh..opq`: C:\ as the lower layers had it is gone.
fn is_drive_wide_marker(path: &[u8]) -> bool {
    let whiteout_of_files = path.strip_prefix(WHITEOUT_PREFIX) == Some(FILES_DIR);
    let opaque_files = path
        .strip_prefix(FILES_DIR)
        .and_then(|rest| rest.strip_prefix(b"/"))
        == Some(OPAQUE_MARKER);
    whiteout_of_files || opaque_files
}

/// Where a (normalized) raw path is shown: `Files/x` → `x`, `Files` → the
/// root, anything else under [`METADATA_DIR`].
pub fn view_path(raw: &[u8]) -> Vec<u8> {
    if raw == FILES_DIR {
        return Vec::new();
    }
    match raw
        .strip_prefix(FILES_DIR)
        .and_then(|r| r.strip_prefix(b"/"))
    {
        Some(inside) => inside.to_vec(),
        None => metadata_path(raw),
    }
}

fn metadata_path(raw: &[u8]) -> Vec<u8> {
    if raw.is_empty() {
        return METADATA_DIR.to_vec();
    }
    [METADATA_DIR, b"/", raw].concat()
}

fn top_name(path: &[u8]) -> &[u8] {
    path.split(|&b| b == b'/').next().unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layer::{Access, FileData};
    use crate::union::{NodeKind, Tree};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o755,
            uid: 0,
            gid: 0,
            mtime: 1,
            mtime_nsec: 0,
            xattrs: vec![(b"user.MSWINDOWS.fileattr".to_vec(), b"16".to_vec())],
        }
    }

    fn dir(path: &str) -> Entry {
        entry(path, EntryKind::Dir)
    }

    fn file(path: &str, offset: u64) -> Entry {
        entry(
            path,
            EntryKind::File {
                size: 1,
                data: FileData::Contiguous { offset },
            },
        )
    }

    fn paths(entries: &[Entry]) -> Vec<String> {
        entries
            .iter()
            .map(|e| String::from_utf8_lossy(&e.path).into_owned())
            .collect()
    }

    fn index(entries: Vec<Entry>) -> Arc<Index> {
        Arc::new(Index {
            version: crate::layer::INDEX_VERSION,
            layer_digest: crate::digest::Digest::of(b"layer"),
            blob_size: 0,
            stream_size: 0,
            entries,
            block_digests: Vec::new(),
            access: Access::Tar,
        })
    }

    /// Every path of the union, sorted, with "/" after directories.
    fn union(layers: Vec<Vec<Entry>>) -> Vec<String> {
        let indexes = WindowsView::indexes(layers.into_iter().map(index).collect());
        let tree = Tree::build(&indexes);
        let mut out = Vec::new();
        walk(&tree, crate::union::ROOT, String::new(), &mut out);
        out.sort();
        out
    }

    fn walk(tree: &Tree, ino: u64, prefix: String, out: &mut Vec<String>) {
        let Some(node) = tree.get(ino) else { return };
        if let NodeKind::Dir { children } = node.kind {
            for (name, child) in children.iter() {
                let path = format!("{prefix}{}", String::from_utf8_lossy(name));
                let is_dir = tree.is_dir(child);
                out.push(if is_dir {
                    format!("{path}/")
                } else {
                    path.clone()
                });
                if is_dir {
                    walk(tree, child, format!("{path}/"), out);
                }
            }
        }
    }

    #[test]
    fn files_is_the_root_and_the_rest_moves_under_the_metadata_dir() {
        let raw = vec![
            dir(""),
            dir("Files"),
            dir("Files/Windows"),
            file("Files/Windows/win.ini", 10),
            dir("Hives"),
            file("Hives/SOFTWARE_BASE", 20),
            dir("UtilityVM"),
            dir("UtilityVM/Files"),
            file("UtilityVM/Files/EFI", 30),
            file("layerchain.json", 40),
            entry(
                "Files/Windows/notepad.exe",
                EntryKind::Hardlink {
                    target: b"Files/Windows/win.ini".to_vec(),
                },
            ),
        ];
        let view = WindowsView::new().layer(raw.clone());
        assert_eq!(
            paths(&view),
            [
                ".windows-layer",
                "",
                "Windows",
                "Windows/win.ini",
                ".windows-layer/Hives",
                ".windows-layer/Hives/SOFTWARE_BASE",
                ".windows-layer/UtilityVM",
                ".windows-layer/UtilityVM/Files",
                ".windows-layer/UtilityVM/Files/EFI",
                ".windows-layer/layerchain.json",
                "Windows/notepad.exe",
            ]
        );
        assert_eq!(
            view[10].kind,
            EntryKind::Hardlink {
                target: b"Windows/win.ini".to_vec()
            }
        );
        // Only paths change.
        for (before, after) in raw.iter().zip(&view) {
            assert_eq!(before.xattrs, after.xattrs);
            assert_eq!((before.mode, before.mtime), (after.mode, after.mtime));
        }
        assert_eq!(view[3].kind, raw[3].kind);
    }

    #[test]
    fn whiteouts_inside_files_hide_the_right_paths() {
        let base = vec![
            dir("Files"),
            dir("Files/Windows"),
            file("Files/Windows/a.dll", 1),
            file("Files/Windows/b.dll", 2),
            dir("Files/Users"),
            file("Files/Users/x", 3),
            dir("Hives"),
            file("Hives/SYSTEM", 4),
            file("Hives/SAM", 5),
        ];
        let change = vec![
            file("Files/Windows/.wh.a.dll", 0),
            file("Files/Users/.wh..wh..opq", 0),
            file("Files/Users/y", 6),
            file("Hives/.wh.SAM", 0),
        ];
        assert_eq!(
            union(vec![base, change]),
            [
                ".windows-layer/",
                ".windows-layer/Hives/",
                ".windows-layer/Hives/SYSTEM",
                "Users/",
                "Users/y",
                "Windows/",
                "Windows/b.dll",
            ]
        );
    }

    #[test]
    fn a_whiteout_of_files_empties_the_drive_but_keeps_the_metadata() {
        let base = vec![
            dir("Files"),
            dir("Files/Windows"),
            file("Files/Windows/a.dll", 1),
            file("Files/pagefile", 2),
            file("Hives/SYSTEM", 4),
        ];
        let middle = vec![file("Files/ProgramData/z", 7)];
        let whiteout = vec![file(".wh.Files", 0), file("Files/new", 8)];
        assert_eq!(
            union(vec![base.clone(), middle.clone(), whiteout]),
            [
                ".windows-layer/",
                ".windows-layer/Hives/",
                ".windows-layer/Hives/SYSTEM",
                "new",
            ]
        );
        let opaque = vec![file("Files/.wh..wh..opq", 0), file("Files/new", 8)];
        assert_eq!(
            union(vec![base.clone(), middle, opaque]),
            [
                ".windows-layer/",
                ".windows-layer/Hives/",
                ".windows-layer/Hives/SYSTEM",
                "new",
            ]
        );
        // A raw root made opaque hides both parts below.
        let root_opaque = vec![file(".wh..wh..opq", 0), file("Hives/NEW", 9)];
        assert_eq!(
            union(vec![base, root_opaque]),
            [
                ".windows-layer/",
                ".windows-layer/Hives/",
                ".windows-layer/Hives/NEW"
            ]
        );
    }

    #[test]
    fn whiteouts_of_metadata_and_a_files_that_is_not_a_directory() {
        let base = vec![
            file("Files/a", 1),
            dir("UtilityVM"),
            file("UtilityVM/Files/x", 2),
        ];
        let change = vec![
            file(".wh.UtilityVM", 0),
            entry(
                "Files",
                EntryKind::Symlink {
                    target: b"elsewhere".to_vec(),
                },
            ),
        ];
        assert_eq!(
            union(vec![base, change]),
            [".windows-layer/", ".windows-layer/Files"]
        );
    }

    #[test]
    fn a_windows_base_layer_is_recognized() {
        let windows = index(vec![dir("Files"), file("Hives/SYSTEM", 1)]);
        let linux = index(vec![dir("etc"), file("Files/x", 1)]);
        assert!(has_windows_layout(&[windows.clone(), linux.clone()]));
        assert!(!has_windows_layout(&[linux, windows]));
        assert!(!has_windows_layout(&[]));
    }

    #[test]
    fn view_paths() {
        assert_eq!(view_path(b"Files"), b"");
        assert_eq!(view_path(b"Files/a/b"), b"a/b");
        assert_eq!(view_path(b"FilesX/a"), b".windows-layer/FilesX/a");
        assert_eq!(view_path(b"Hives"), b".windows-layer/Hives");
        assert_eq!(view_path(b""), b".windows-layer");
        assert!(is_windows("windows") && is_windows("Windows") && !is_windows("linux"));
    }
}
