//! The union of a layer stack: OCI whiteouts, opaque directories and
//! hardlinks applied bottom to top into one inode table.
//!
//! Rules (OCI image-spec `layer.md`), and the traps other implementations hit:
//! - A layer's whiteouts (`.wh.NAME`) and opaque markers (`.wh..wh..opq`)
//!   apply to *lower* layers only, so they are applied before any of the
//!   layer's own entries, whatever their order in the tar.
//! - A directory over a directory replaces the attributes and keeps the
//!   children; anything else over an existing path replaces it whole.
//! - A hardlink binds to the inode its target names at that point of the stack
//!   (possibly in an earlier layer), never by a later lookup.
//! - Symlinks are data. A parent component that is a symlink is resolved
//!   inside the image root (as containerd and umoci do when unpacking), so
//!   `lib -> usr/lib` followed by `lib/x` lands in `usr/lib/x`.
//!
//! This module does no I/O: it takes indexes and gives a [`Tree`].

use crate::layer::{Entry, EntryKind, FileData, Index};
use std::collections::BTreeMap;
use std::sync::Arc;

/// FUSE inode number; the root is always [`ROOT`].
pub type Ino = u64;
pub const ROOT: Ino = 1;

const WHITEOUT_PREFIX: &[u8] = b".wh.";
const OPAQUE_MARKER: &[u8] = b".wh..wh..opq";
/// Resolving symlinked parents stops after this many links, like the kernel's
/// `MAXSYMLINKS`; a longer chain leaves the entry where the path names it.
const MAX_SYMLINK_HOPS: u32 = 40;
/// Mode of directories a layer implies but never lists (what `mkdir -p` in
/// containerd's unpacker gives them).
const IMPLIED_DIR_MODE: u32 = 0o755;

/// An extended attribute: name and value, both raw bytes.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// Attributes shared by every kind of node.
#[derive(Debug, Clone, PartialEq)]
pub struct Meta {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: Vec<Xattr>,
}

#[derive(Debug, Clone, PartialEq)]
pub enum NodeKind {
    /// Children sorted by name (binary-searched by lookup, offsets for readdir).
    Dir {
        children: Vec<(Box<[u8]>, Ino)>,
    },
    /// `layer` is the position of the layer in the stack (0 = bottom).
    File {
        size: u64,
        layer: u32,
        data: FileData,
    },
    Symlink {
        target: Box<[u8]>,
    },
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
}

#[derive(Debug, Clone, PartialEq)]
pub struct Node {
    /// The parent directory (for `..`); the root is its own parent. For a
    /// hardlinked file, the directory of its first name.
    pub parent: Ino,
    pub nlink: u32,
    pub meta: Meta,
    pub kind: NodeKind,
}

/// The merged, immutable view of an image.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<Node>,
}

impl Tree {
    /// Applies the layers bottom (`layers[0]`) to top.
    pub fn build(layers: &[Arc<Index>]) -> Tree {
        let mut builder = Builder::new();
        for (position, index) in layers.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            builder.apply_layer(position, &index.entries);
        }
        builder.freeze()
    }

    pub fn get(&self, ino: Ino) -> Option<&Node> {
        let slot = usize::try_from(ino.checked_sub(ROOT)?).ok()?;
        self.nodes.get(slot)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        match &self.get(parent)?.kind {
            NodeKind::Dir { children } => children
                .binary_search_by(|(n, _)| n.as_ref().cmp(name))
                .ok()
                .map(|i| children[i].1),
            _ => None,
        }
    }

    /// Looks a `/`-separated path up from the root without following symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Option<Ino> {
        path.split(|&b| b == b'/')
            .filter(|c| !c.is_empty())
            .try_fold(ROOT, |ino, name| self.lookup(ino, name))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// A node while the stack is being applied: directories keep a map so that
/// inserts are cheap; `freeze` turns them into sorted vectors.
struct BuildNode {
    parent: usize,
    nlink: u32,
    meta: Meta,
    kind: BuildKind,
}

enum BuildKind {
    Dir(BTreeMap<Box<[u8]>, usize>),
    Leaf(NodeKind),
}

struct Builder {
    nodes: Vec<BuildNode>,
}

const ROOT_SLOT: usize = 0;

impl Builder {
    fn new() -> Self {
        let root = BuildNode {
            parent: ROOT_SLOT,
            nlink: 1,
            meta: implied_dir_meta(),
            kind: BuildKind::Dir(BTreeMap::new()),
        };
        Builder { nodes: vec![root] }
    }

    fn apply_layer(&mut self, position: u32, entries: &[Entry]) {
        // Whiteouts and opaque markers first: they only ever hide lower layers.
        for entry in entries {
            let (dir, name) = split_parent(&entry.path);
            if name == OPAQUE_MARKER {
                if let Some(slot) = self.resolve_dir(dir) {
                    self.clear_children(slot);
                }
            } else if let Some(hidden) = name.strip_prefix(WHITEOUT_PREFIX) {
                if hidden.starts_with(WHITEOUT_PREFIX) || hidden.is_empty() {
                    continue; // other `.wh..wh.` metadata (aufs) and a bare `.wh.`
                }
                if let Some(slot) = self.resolve_dir(dir) {
                    self.remove_child(slot, hidden);
                }
            }
        }
        for entry in entries {
            let (_, name) = split_parent(&entry.path);
            if name.starts_with(WHITEOUT_PREFIX) {
                continue;
            }
            self.apply_entry(position, entry);
        }
    }

    fn apply_entry(&mut self, position: u32, entry: &Entry) {
        if entry.path.is_empty() {
            // `./` describes the root directory itself.
            if matches!(entry.kind, EntryKind::Dir) {
                self.nodes[ROOT_SLOT].meta = meta_of(entry);
            }
            return;
        }
        let (dir, name) = split_parent(&entry.path);
        let parent = self.make_dirs(dir);
        let existing = self.child(parent, name);

        if let EntryKind::Hardlink { target } = &entry.kind {
            self.link(parent, name, existing, target, &entry.path);
            return;
        }
        if let (EntryKind::Dir, Some(slot)) = (&entry.kind, existing) {
            if matches!(self.nodes[slot].kind, BuildKind::Dir(_)) {
                self.nodes[slot].meta = meta_of(entry);
                return;
            }
        }
        if existing.is_some() {
            self.remove_child(parent, name);
        }
        let kind = match &entry.kind {
            EntryKind::Dir => BuildKind::Dir(BTreeMap::new()),
            EntryKind::File { size, data } => BuildKind::Leaf(NodeKind::File {
                size: *size,
                layer: position,
                data: data.clone(),
            }),
            EntryKind::Symlink { target } => BuildKind::Leaf(NodeKind::Symlink {
                target: target.clone().into_boxed_slice(),
            }),
            EntryKind::CharDevice { major, minor } => BuildKind::Leaf(NodeKind::CharDevice {
                major: *major,
                minor: *minor,
            }),
            EntryKind::BlockDevice { major, minor } => BuildKind::Leaf(NodeKind::BlockDevice {
                major: *major,
                minor: *minor,
            }),
            EntryKind::Fifo => BuildKind::Leaf(NodeKind::Fifo),
            EntryKind::Hardlink { .. } => return,
        };
        let slot = self.push(parent, meta_of(entry), kind);
        self.insert_child(parent, name, slot);
    }

    /// A hardlink names the inode its target has *now*; tar extraction fails
    /// on a missing or directory target, so such an entry is skipped.
    fn link(
        &mut self,
        parent: usize,
        name: &[u8],
        existing: Option<usize>,
        target: &[u8],
        path: &[u8],
    ) {
        let Some(target_slot) = self.resolve(target) else {
            tracing::warn!(
                path = %String::from_utf8_lossy(path),
                target = %String::from_utf8_lossy(target),
                "hardlink to a missing entry skipped"
            );
            return;
        };
        if matches!(self.nodes[target_slot].kind, BuildKind::Dir(_)) {
            tracing::warn!(path = %String::from_utf8_lossy(path), "hardlink to a directory skipped");
            return;
        }
        if existing == Some(target_slot) {
            return;
        }
        if existing.is_some() {
            self.remove_child(parent, name);
        }
        self.insert_child(parent, name, target_slot);
    }

    fn push(&mut self, parent: usize, meta: Meta, kind: BuildKind) -> usize {
        self.nodes.push(BuildNode {
            parent,
            nlink: 0,
            meta,
            kind,
        });
        self.nodes.len() - 1
    }

    fn child(&self, dir: usize, name: &[u8]) -> Option<usize> {
        match &self.nodes[dir].kind {
            BuildKind::Dir(children) => children.get(name).copied(),
            BuildKind::Leaf(_) => None,
        }
    }

    fn insert_child(&mut self, dir: usize, name: &[u8], slot: usize) {
        self.nodes[slot].nlink += 1;
        if let BuildKind::Dir(children) = &mut self.nodes[dir].kind {
            children.insert(name.into(), slot);
        }
    }

    /// Unlinks `name` from `dir`; a directory loses its whole subtree.
    fn remove_child(&mut self, dir: usize, name: &[u8]) {
        let removed = match &mut self.nodes[dir].kind {
            BuildKind::Dir(children) => children.remove(name),
            BuildKind::Leaf(_) => None,
        };
        if let Some(slot) = removed {
            self.nodes[slot].nlink = self.nodes[slot].nlink.saturating_sub(1);
            self.clear_children(slot);
        }
    }

    /// Unlinks everything below `dir`, by a loop (trees can be very deep).
    fn clear_children(&mut self, dir: usize) {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let children = match &mut self.nodes[dir].kind {
                BuildKind::Dir(children) => std::mem::take(children),
                BuildKind::Leaf(_) => continue,
            };
            for (_, slot) in children {
                self.nodes[slot].nlink = self.nodes[slot].nlink.saturating_sub(1);
                pending.push(slot);
            }
        }
    }

    /// The directory at `path` (symlinked components resolved inside the
    /// root), creating missing ones and replacing non-directories on the way,
    /// as an unpacker's `mkdir -p` would.
    fn make_dirs(&mut self, path: &[u8]) -> usize {
        let mut current = ROOT_SLOT;
        for name in components(path) {
            current = match self.child(current, name) {
                Some(slot) => match self.follow(current, slot, 0) {
                    Some(dir) if matches!(self.nodes[dir].kind, BuildKind::Dir(_)) => dir,
                    _ => {
                        self.remove_child(current, name);
                        self.new_dir(current, name)
                    }
                },
                None => self.new_dir(current, name),
            };
        }
        current
    }

    fn new_dir(&mut self, parent: usize, name: &[u8]) -> usize {
        let slot = self.push(parent, implied_dir_meta(), BuildKind::Dir(BTreeMap::new()));
        self.insert_child(parent, name, slot);
        slot
    }

    /// Resolves a path to an existing node, following symlinks in parent
    /// components (not the last one).
    fn resolve(&self, path: &[u8]) -> Option<usize> {
        let (dir, name) = split_parent(path);
        if name.is_empty() {
            return Some(ROOT_SLOT);
        }
        let dir = self.resolve_dir(dir)?;
        self.child(dir, name)
    }

    fn resolve_dir(&self, path: &[u8]) -> Option<usize> {
        self.walk(ROOT_SLOT, path, 0)
    }

    fn walk(&self, start: usize, path: &[u8], hops: u32) -> Option<usize> {
        let mut current = start;
        for name in components(path) {
            let next = match name {
                b"." => current,
                b".." => self.nodes[current].parent,
                _ => self.child(current, name)?,
            };
            current = self.follow(current, next, hops)?;
        }
        Some(current)
    }

    /// If `slot` is a symlink, the node it points to (relative to `dir`,
    /// absolute targets relative to the image root); otherwise `slot`.
    fn follow(&self, dir: usize, slot: usize, hops: u32) -> Option<usize> {
        match &self.nodes[slot].kind {
            BuildKind::Leaf(NodeKind::Symlink { target }) => {
                if hops >= MAX_SYMLINK_HOPS {
                    return None;
                }
                let start = if target.first() == Some(&b'/') {
                    ROOT_SLOT
                } else {
                    dir
                };
                self.walk(start, target, hops + 1)
            }
            _ => Some(slot),
        }
    }

    /// Renumbers reachable nodes depth-first from the root, so inode numbers
    /// are dense and stable for a given image.
    fn freeze(self) -> Tree {
        let mut numbering = vec![0 as Ino; self.nodes.len()];
        let mut order = Vec::with_capacity(self.nodes.len());
        let mut stack = vec![(ROOT_SLOT, ROOT_SLOT)];
        while let Some((slot, parent)) = stack.pop() {
            if numbering[slot] != 0 {
                continue; // a second name of a hardlinked file
            }
            numbering[slot] = ROOT + order.len() as Ino;
            order.push((slot, parent));
            if let BuildKind::Dir(children) = &self.nodes[slot].kind {
                stack.extend(children.values().rev().map(|&child| (child, slot)));
            }
        }
        let mut nodes_in = self.nodes.into_iter().map(Some).collect::<Vec<_>>();
        let mut nodes = Vec::with_capacity(order.len());
        for &(slot, parent) in &order {
            let Some(node) = nodes_in[slot].take() else {
                continue;
            };
            let kind = match node.kind {
                BuildKind::Dir(children) => NodeKind::Dir {
                    children: children
                        .into_iter()
                        .map(|(name, child)| (name, numbering[child]))
                        .collect(),
                },
                BuildKind::Leaf(kind) => kind,
            };
            nodes.push(Node {
                parent: numbering[parent],
                nlink: node.nlink,
                meta: node.meta,
                kind,
            });
        }
        let subdirs: Vec<u32> = nodes
            .iter()
            .map(|node| match &node.kind {
                NodeKind::Dir { children } => children
                    .iter()
                    .filter(|(_, ino)| {
                        let slot = (*ino - ROOT) as usize;
                        matches!(nodes[slot].kind, NodeKind::Dir { .. })
                    })
                    .count() as u32,
                _ => 0,
            })
            .collect();
        for (node, subdirs) in nodes.iter_mut().zip(subdirs) {
            if let NodeKind::Dir { .. } = node.kind {
                node.nlink = 2 + subdirs;
            }
        }
        Tree { nodes }
    }
}

fn components(path: &[u8]) -> impl Iterator<Item = &[u8]> {
    path.split(|&b| b == b'/').filter(|c| !c.is_empty())
}

/// Splits a normalized path into its directory and last component.
fn split_parent(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn meta_of(entry: &Entry) -> Meta {
    Meta {
        mode: entry.mode & 0o7777,
        uid: entry.uid,
        gid: entry.gid,
        mtime: entry.mtime,
        mtime_nsec: entry.mtime_nsec,
        xattrs: entry
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone().into_boxed_slice(), v.clone().into_boxed_slice()))
            .collect(),
    }
}

fn implied_dir_meta() -> Meta {
    Meta {
        mode: IMPLIED_DIR_MODE,
        uid: 0,
        gid: 0,
        mtime: 0,
        mtime_nsec: 0,
        xattrs: Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{Access, INDEX_VERSION, Index};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o644,
            uid: 0,
            gid: 0,
            mtime: 0,
            mtime_nsec: 0,
            xattrs: vec![],
        }
    }
    fn dir(path: &str) -> Entry {
        Entry {
            mode: 0o755,
            ..entry(path, EntryKind::Dir)
        }
    }
    fn file(path: &str, size: u64) -> Entry {
        entry(
            path,
            EntryKind::File {
                size,
                data: FileData::Contiguous { offset: 0 },
            },
        )
    }
    fn link(path: &str, target: &str) -> Entry {
        entry(
            path,
            EntryKind::Hardlink {
                target: target.as_bytes().to_vec(),
            },
        )
    }
    fn symlink(path: &str, target: &str) -> Entry {
        entry(
            path,
            EntryKind::Symlink {
                target: target.as_bytes().to_vec(),
            },
        )
    }
    fn layer(entries: Vec<Entry>) -> Arc<Index> {
        Arc::new(Index {
            version: INDEX_VERSION,
            layer_digest: Digest::of(b"test"),
            blob_size: 0,
            stream_size: 0,
            entries,
            block_digests: vec![],
            access: Access::Tar,
        })
    }
    fn size_of(tree: &Tree, path: &str) -> Option<u64> {
        match tree.get(tree.lookup_path(path.as_bytes())?)?.kind {
            NodeKind::File { size, .. } => Some(size),
            _ => None,
        }
    }
    fn names(tree: &Tree, path: &str) -> Vec<String> {
        let ino = tree.lookup_path(path.as_bytes()).expect("dir exists");
        match &tree.get(ino).expect("node").kind {
            NodeKind::Dir { children } => children
                .iter()
                .map(|(n, _)| String::from_utf8_lossy(n).into_owned())
                .collect(),
            other => panic!("{path} is not a dir: {other:?}"),
        }
    }

    #[test]
    fn whiteouts_apply_to_lower_layers_only() {
        let tree = Tree::build(&[
            layer(vec![dir("a"), file("a/x", 1), file("a/y", 2), file("b", 3)]),
            // The whiteout comes after a same-layer file of the same name: the
            // layer's own file must survive.
            layer(vec![
                file("b", 30),
                entry("a/.wh.x", EntryKind::Fifo),
                entry(".wh.b", EntryKind::Fifo),
            ]),
        ]);
        assert_eq!(names(&tree, "a"), ["y"]);
        assert_eq!(size_of(&tree, "b"), Some(30));
    }

    #[test]
    fn opaque_dir_hides_lower_children_whatever_the_tar_order() {
        let tree = Tree::build(&[
            layer(vec![
                dir("d"),
                file("d/old", 1),
                dir("d/sub"),
                file("d/sub/deep", 1),
            ]),
            layer(vec![dir("d"), file("d/new", 2), file("d/.wh..wh..opq", 0)]),
        ]);
        assert_eq!(names(&tree, "d"), ["new"]);
        assert_eq!(tree.lookup_path(b"d/sub/deep"), None);
    }

    #[test]
    fn replacement_rules() {
        let mut newer = dir("keep");
        newer.mode = 0o700;
        newer.uid = 1234;
        let tree = Tree::build(&[
            layer(vec![
                dir("d2f"),
                file("d2f/child", 1),
                file("f2d", 1),
                dir("keep"),
                file("keep/c", 1),
            ]),
            layer(vec![
                file("d2f", 9),
                dir("f2d"),
                file("f2d/inside", 2),
                newer,
            ]),
        ]);
        assert_eq!(size_of(&tree, "d2f"), Some(9));
        assert_eq!(names(&tree, "f2d"), ["inside"]);
        assert_eq!(names(&tree, "keep"), ["c"]);
        let keep = tree
            .get(tree.lookup_path(b"keep").expect("keep"))
            .expect("node");
        assert_eq!((keep.meta.mode, keep.meta.uid), (0o700, 1234));
    }

    #[test]
    fn hardlinks_bind_to_the_inode_at_that_point_of_the_stack() {
        let tree = Tree::build(&[
            layer(vec![file("bin/a", 5), link("bin/b", "bin/a")]),
            // A later layer links to a lower file, then replaces the original name.
            layer(vec![link("bin/c", "bin/a"), file("bin/a", 7)]),
        ]);
        let b = tree.lookup_path(b"bin/b").expect("b");
        let c = tree.lookup_path(b"bin/c").expect("c");
        let a = tree.lookup_path(b"bin/a").expect("a");
        assert_eq!(b, c);
        assert_ne!(a, b);
        assert_eq!(tree.get(b).expect("node").nlink, 2);
        assert_eq!(tree.get(a).expect("node").nlink, 1);
        assert_eq!(size_of(&tree, "bin/c"), Some(5));
    }

    #[test]
    fn symlinked_parents_resolve_inside_the_root() {
        let tree = Tree::build(&[
            layer(vec![
                dir("usr"),
                dir("usr/lib"),
                symlink("lib", "usr/lib"),
                symlink("abs", "/../usr"),
            ]),
            layer(vec![file("lib/x", 1), file("abs/lib/y", 2)]),
        ]);
        assert_eq!(names(&tree, "usr/lib"), ["x", "y"]);
        assert!(matches!(
            tree.get(tree.lookup_path(b"lib").expect("lib"))
                .expect("node")
                .kind,
            NodeKind::Symlink { .. }
        ));
    }

    #[test]
    fn directory_link_counts_and_implied_parents() {
        let tree = Tree::build(&[layer(vec![file("a/b/c", 1), dir("a/d"), dir("")])]);
        let a = tree.get(tree.lookup_path(b"a").expect("a")).expect("node");
        assert_eq!(a.nlink, 4);
        assert_eq!(a.meta.mode, IMPLIED_DIR_MODE);
        assert_eq!(tree.get(ROOT).expect("root").nlink, 3);
        assert_eq!(tree.get(ROOT).expect("root").parent, ROOT);
    }
}
