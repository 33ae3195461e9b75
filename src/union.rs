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
//! A mount holds its tree for its whole life, so the tree is a few flat
//! tables rather than one allocation per entry: 48-byte nodes (with the
//! mtime), 12-byte directory entries (each directory's children are one
//! sorted run), all names and symlink targets in one byte arena, and the
//! other attributes stored once per distinct value (most of an image shares
//! a handful). [`Node`] is a view over those tables. Building uses tables of
//! its own that are returned to the system when it ends (see `Scratch`).
//!
//! This module does no I/O: it takes indexes and gives a [`Tree`].

use crate::layer::{Entry, EntryKind, FileData, Index};
use memmap2::MmapMut;
use std::borrow::Cow;
use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
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
/// "No node / no link / no name" in the 32-bit tables.
const NONE: u32 = u32::MAX;
/// Nodes, links and arena bytes are addressed by `u32`; the top two values
/// are markers. An image past this (billions of entries or gigabytes of
/// names) is mounted without the entries that do not fit.
const MAX_ITEMS: usize = (u32::MAX - 2) as usize;

/// An extended attribute: name and value, both raw bytes.
pub type Xattr = (Box<[u8]>, Box<[u8]>);

/// Attributes of a node, as a view over the tree.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta<'a> {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub xattrs: &'a [Xattr],
}

/// The attributes most of an image shares, stored once per distinct value
/// (the mtime, which varies more, is in the node).
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
struct Attrs {
    mode: u32,
    uid: u32,
    gid: u32,
    mtime_nsec: u32,
    xattrs: Box<[Xattr]>,
}

/// One inode of the tree, as a view over the tree's tables.
#[derive(Debug, Clone)]
pub struct Node<'a> {
    /// The parent directory (for `..`); the root is its own parent. For a
    /// hardlinked file, the directory of its first name.
    pub parent: Ino,
    pub nlink: u32,
    pub meta: Meta<'a>,
    pub kind: NodeKind<'a>,
}

#[derive(Debug, Clone)]
pub enum NodeKind<'a> {
    Dir {
        children: Children<'a>,
    },
    /// `layer` is the position of the layer in the stack (0 = bottom).
    File {
        size: u64,
        layer: u32,
        data: Cow<'a, FileData>,
    },
    Symlink {
        target: &'a [u8],
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

/// A directory's entries, sorted by name (binary-searched by lookup,
/// positions are readdir offsets).
#[derive(Clone, Copy)]
pub struct Children<'a> {
    names: &'a [u8],
    dirents: &'a [Dirent],
}

impl<'a> Children<'a> {
    pub fn len(&self) -> usize {
        self.dirents.len()
    }

    pub fn is_empty(&self) -> bool {
        self.dirents.is_empty()
    }

    /// (name, inode) in name order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&'a [u8], Ino)> + use<'a> {
        let names = self.names;
        self.dirents.iter().map(move |d| (d.name(names), d.ino()))
    }

    /// The entries from position `start` on (empty past the end).
    pub fn skip(&self, start: usize) -> Children<'a> {
        Children {
            names: self.names,
            dirents: self.dirents.get(start..).unwrap_or(&[]),
        }
    }

    pub fn find(&self, name: &[u8]) -> Option<Ino> {
        let names = self.names;
        self.dirents
            .binary_search_by(|d| d.name(names).cmp(name))
            .ok()
            .map(|i| self.dirents[i].ino())
    }
}

impl std::fmt::Debug for Children<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list()
            .entries(
                self.iter()
                    .map(|(name, ino)| (String::from_utf8_lossy(name), ino)),
            )
            .finish()
    }
}

/// A name in a directory: `len` bytes of the arena at `name`, naming node
/// `node` (a table position: inode number minus [`ROOT`]).
#[derive(Debug, Clone, Copy)]
struct Dirent {
    name: u32,
    len: u32,
    node: u32,
}

impl Dirent {
    fn name<'a>(&self, arena: &'a [u8]) -> &'a [u8] {
        arena_slice(arena, self.name, self.len)
    }

    fn ino(&self) -> Ino {
        Ino::from(self.node) + ROOT
    }
}

fn arena_slice(arena: &[u8], start: u32, len: u32) -> &[u8] {
    let start = start as usize;
    arena.get(start..start + len as usize).unwrap_or(&[])
}

/// What a node is, in at most 24 bytes; offsets point into the tree's
/// arena and tables.
#[derive(Debug, Clone, Copy)]
enum Packed {
    /// `count` dirents from `first`.
    Dir {
        first: u32,
        count: u32,
    },
    /// A file whose bytes are contiguous in its layer's stream (nearly all).
    File {
        layer: u32,
        size: u64,
        offset: u64,
    },
    /// Any other layout, kept whole in the tree's `file_data` table.
    OtherFile {
        layer: u32,
        data: u32,
        size: u64,
    },
    Symlink {
        target: u32,
        len: u32,
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

#[derive(Debug, Clone, Copy)]
struct PackedNode {
    /// Table position of the parent directory.
    parent: u32,
    nlink: u32,
    /// Position in the tree's `attrs`.
    attrs: u32,
    /// The dirent of the first name ([`NONE`] for the root).
    name: u32,
    mtime: i64,
    kind: Packed,
}

/// Bytes per node in the final tree (checked at compile time: the node table
/// is most of a mount's memory).
const PACKED_NODE_SIZE: usize = 48;
const _: () = assert!(std::mem::size_of::<PackedNode>() <= PACKED_NODE_SIZE);

/// The merged, immutable view of an image.
#[derive(Debug)]
pub struct Tree {
    nodes: Vec<PackedNode>,
    dirents: Vec<Dirent>,
    /// Names of dirents and symlink targets, end to end.
    arena: Vec<u8>,
    attrs: Vec<Attrs>,
    file_data: Vec<FileData>,
}

impl Tree {
    /// Applies the layers bottom (`layers[0]`) to top.
    pub fn build(layers: &[Arc<Index>]) -> Tree {
        let mut builder = Builder::new(layers);
        for (position, index) in layers.iter().enumerate() {
            let position = u32::try_from(position).unwrap_or(u32::MAX);
            builder.apply_layer(position, &index.entries);
        }
        builder.freeze()
    }

    fn packed(&self, ino: Ino) -> Option<&PackedNode> {
        let slot = usize::try_from(ino.checked_sub(ROOT)?).ok()?;
        self.nodes.get(slot)
    }

    pub fn get(&self, ino: Ino) -> Option<Node<'_>> {
        let node = self.packed(ino)?;
        let kind = match node.kind {
            Packed::Dir { first, count } => NodeKind::Dir {
                children: self.children(first, count),
            },
            Packed::File {
                layer,
                size,
                offset,
            } => NodeKind::File {
                size,
                layer,
                data: Cow::Owned(FileData::Contiguous { offset }),
            },
            Packed::OtherFile { layer, data, size } => NodeKind::File {
                size,
                layer,
                data: Cow::Borrowed(self.file_data.get(data as usize)?),
            },
            Packed::Symlink { target, len } => NodeKind::Symlink {
                target: arena_slice(&self.arena, target, len),
            },
            Packed::CharDevice { major, minor } => NodeKind::CharDevice { major, minor },
            Packed::BlockDevice { major, minor } => NodeKind::BlockDevice { major, minor },
            Packed::Fifo => NodeKind::Fifo,
        };
        Some(Node {
            parent: Ino::from(node.parent) + ROOT,
            nlink: node.nlink,
            meta: {
                let attrs = self.attrs.get(node.attrs as usize)?;
                Meta {
                    mode: attrs.mode,
                    uid: attrs.uid,
                    gid: attrs.gid,
                    mtime: node.mtime,
                    mtime_nsec: attrs.mtime_nsec,
                    xattrs: &attrs.xattrs,
                }
            },
            kind,
        })
    }

    fn children(&self, first: u32, count: u32) -> Children<'_> {
        let first = first as usize;
        Children {
            names: &self.arena,
            dirents: self
                .dirents
                .get(first..first + count as usize)
                .unwrap_or(&[]),
        }
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Option<Ino> {
        match self.packed(parent)?.kind {
            Packed::Dir { first, count } => self.children(first, count).find(name),
            _ => None,
        }
    }

    /// Looks a `/`-separated path up from the root without following symlinks.
    pub fn lookup_path(&self, path: &[u8]) -> Option<Ino> {
        components(path).try_fold(ROOT, |ino, name| self.lookup(ino, name))
    }

    pub fn is_dir(&self, ino: Ino) -> bool {
        matches!(self.packed(ino).map(|n| n.kind), Some(Packed::Dir { .. }))
    }

    /// The directory and name `ino` was first found under (depth first, by
    /// name); `None` for the root and unknown inodes.
    pub fn first_name(&self, ino: Ino) -> Option<(Ino, &[u8])> {
        let node = self.packed(ino)?;
        let dirent = self.dirents.get(node.name as usize)?;
        Some((Ino::from(node.parent) + ROOT, dirent.name(&self.arena)))
    }

    pub fn len(&self) -> usize {
        self.nodes.len()
    }

    pub fn is_empty(&self) -> bool {
        self.nodes.is_empty()
    }
}

/// The stack did not fit the 32-bit tables (see [`MAX_ITEMS`]).
#[derive(Debug)]
struct Full;

fn index_of(len: usize) -> Result<u32, Full> {
    if len < MAX_ITEMS {
        u32::try_from(len).map_err(|_| Full)
    } else {
        Err(Full)
    }
}

/// A name of a node in a directory while the stack is applied. Removed
/// links stay in the table with `node == NONE`.
#[derive(Debug, Clone, Copy)]
struct Link {
    dir: u32,
    node: u32,
    name: u32,
    len: u32,
    /// The directory's next link (a directory's links form a list).
    next: u32,
}

/// Tables smaller than this stay on the heap (a mapping per tiny table
/// would cost more than it gives back).
const SCRATCH_MAP_MIN: usize = 64 * 1024;
const U32_BYTES: usize = std::mem::size_of::<u32>();

/// A growable table of `u32` used only while building. Once large it is
/// its own anonymous mapping: the mount daemon lives long and freed heap
/// memory stays resident in it, while a mapping goes back to the system
/// when dropped. Values are stored inverted, so fresh zeroed memory (not
/// even resident until written) reads as [`NONE`].
struct Scratch {
    bytes: ScratchBytes,
    /// Values in use (the rest of `bytes` is room to grow).
    len: usize,
}

enum ScratchBytes {
    Map(MmapMut),
    Heap(Vec<u8>),
}

impl Scratch {
    /// `len` values of [`NONE`], with room for `capacity`.
    fn new(len: usize, capacity: usize) -> Scratch {
        let size = capacity.max(len).saturating_mul(U32_BYTES);
        let bytes = match size {
            size if size >= SCRATCH_MAP_MIN => MmapMut::map_anon(size)
                .map(ScratchBytes::Map)
                .unwrap_or_else(|_| ScratchBytes::Heap(vec![0; size])),
            size => ScratchBytes::Heap(vec![0; size]),
        };
        Scratch { bytes, len }
    }

    fn bytes(&self) -> &[u8] {
        match &self.bytes {
            ScratchBytes::Map(map) => map,
            ScratchBytes::Heap(vec) => vec,
        }
    }

    fn bytes_mut(&mut self) -> &mut [u8] {
        match &mut self.bytes {
            ScratchBytes::Map(map) => map,
            ScratchBytes::Heap(vec) => vec,
        }
    }

    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, i: usize) -> u32 {
        let at = i * U32_BYTES;
        let mut word = [0; U32_BYTES];
        word.copy_from_slice(&self.bytes()[at..at + U32_BYTES]);
        !u32::from_ne_bytes(word)
    }

    fn set(&mut self, i: usize, value: u32) {
        let at = i * U32_BYTES;
        self.bytes_mut()[at..at + U32_BYTES].copy_from_slice(&(!value).to_ne_bytes());
    }

    fn push(&mut self, value: u32) {
        if (self.len + 1) * U32_BYTES > self.bytes().len() {
            let mut bigger = Scratch::new(self.len, (self.len * 2).max(MIN_SCRATCH_GROWTH));
            let used = self.len * U32_BYTES;
            bigger.bytes_mut()[..used].copy_from_slice(&self.bytes()[..used]);
            *self = bigger;
        }
        self.len += 1;
        self.set(self.len - 1, value);
    }

    fn pop(&mut self) -> Option<u32> {
        let last = self.len.checked_sub(1)?;
        let value = self.get(last);
        self.len = last;
        Some(value)
    }

    fn swap(&mut self, a: usize, b: usize) {
        let (x, y) = (self.get(a), self.get(b));
        self.set(a, y);
        self.set(b, x);
    }
}

/// Values a growing [`Scratch`] makes room for at least.
const MIN_SCRATCH_GROWTH: usize = 16;

/// The builder's links, [`LINK_FIELDS`] values each in a [`Scratch`].
struct Links(Scratch);

const LINK_FIELDS: usize = 5;

impl Links {
    fn with_capacity(links: usize) -> Links {
        Links(Scratch::new(0, links.saturating_mul(LINK_FIELDS)))
    }

    fn len(&self) -> usize {
        self.0.len() / LINK_FIELDS
    }

    fn get(&self, l: u32) -> Link {
        let at = l as usize * LINK_FIELDS;
        Link {
            dir: self.0.get(at),
            node: self.0.get(at + 1),
            name: self.0.get(at + 2),
            len: self.0.get(at + 3),
            next: self.0.get(at + 4),
        }
    }

    fn push(&mut self, link: Link) {
        for value in [link.dir, link.node, link.name, link.len, link.next] {
            self.0.push(value);
        }
    }

    fn set_node(&mut self, l: u32, node: u32) {
        self.0.set(l as usize * LINK_FIELDS + 1, node);
    }
}

/// Free and deleted slots of the builder's name table.
const EMPTY: u32 = u32::MAX;
const TOMBSTONE: u32 = u32::MAX - 1;
const MIN_TABLE_SIZE: usize = 1024;

/// The tree while the stack is applied: the final tree's node and arena
/// tables (nodes in creation order, a directory's `first` the head of its
/// list of links), plus an open-addressing hash table from (directory,
/// name) to live link, so that no name is its own allocation even while
/// building. [`Builder::freeze`] reorders the nodes in place.
struct Builder {
    nodes: Vec<PackedNode>,
    links: Links,
    arena: Vec<u8>,
    /// Link positions, [`EMPTY`] or [`TOMBSTONE`]; a power of two long.
    table: Scratch,
    /// Slots that are not `EMPTY` (live and tombstones).
    table_used: usize,
    hasher: RandomState,
    attrs: HashMap<Attrs, u32>,
    file_data: Vec<FileData>,
    /// Set once the first entry that did not fit was skipped (warned once).
    full: bool,
}

const ROOT_SLOT: u32 = 0;

/// Room for a few directories the layers imply without listing them, so
/// that the tables sized from the entries rarely grow (growing doubles).
const IMPLIED_DIRS_ROOM: usize = 64;
/// Bytes of names reserved for those implied directories.
const IMPLIED_NAMES_ROOM: usize = 1024;

impl Builder {
    /// A builder whose tables are sized for `layers` up front: every node
    /// and link comes from an entry, and a mount keeps what the build
    /// touched (freed heap memory stays resident), so growth is waste.
    fn new(layers: &[Arc<Index>]) -> Self {
        let entries: usize = layers.iter().map(|l| l.entries.len()).sum();
        let name_bytes: usize = layers
            .iter()
            .flat_map(|l| &l.entries)
            .map(|e| {
                let target = match &e.kind {
                    EntryKind::Symlink { target } => target.len(),
                    _ => 0,
                };
                split_parent(&e.path).1.len() + target
            })
            .sum();
        let items = entries + IMPLIED_DIRS_ROOM;
        let table = (items * 2).max(MIN_TABLE_SIZE).next_power_of_two();
        let mut builder = Builder {
            nodes: Vec::with_capacity(items),
            links: Links::with_capacity(items),
            arena: Vec::with_capacity(name_bytes + IMPLIED_NAMES_ROOM),
            table: Scratch::new(table, table),
            table_used: 0,
            hasher: RandomState::new(),
            attrs: HashMap::new(),
            file_data: Vec::new(),
            full: false,
        };
        builder.attrs.insert(implied_dir_attrs(), IMPLIED_DIR_ATTRS);
        builder.nodes.push(PackedNode {
            parent: ROOT_SLOT,
            nlink: 1,
            attrs: IMPLIED_DIR_ATTRS,
            name: NONE,
            mtime: 0,
            kind: EMPTY_DIR,
        });
        builder
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
            if self.apply_entry(position, entry).is_err() && !self.full {
                self.full = true;
                tracing::warn!(
                    path = %String::from_utf8_lossy(&entry.path),
                    "image too large for one tree: this and later entries are left out"
                );
            }
        }
    }

    fn apply_entry(&mut self, position: u32, entry: &Entry) -> Result<(), Full> {
        if entry.path.is_empty() {
            // `./` describes the root directory itself.
            if matches!(entry.kind, EntryKind::Dir) {
                self.set_attrs(ROOT_SLOT, entry)?;
            }
            return Ok(());
        }
        let (dir, name) = split_parent(&entry.path);
        let parent = self.make_dirs(dir)?;
        let existing = self.child(parent, name);

        if let EntryKind::Hardlink { target } = &entry.kind {
            return self.link(parent, name, existing, target, &entry.path);
        }
        if let (EntryKind::Dir, Some(slot)) = (&entry.kind, existing) {
            if self.is_dir(slot) {
                self.set_attrs(slot, entry)?;
                return Ok(());
            }
        }
        if existing.is_some() {
            self.remove_child(parent, name);
        }
        let kind = match &entry.kind {
            EntryKind::Dir => EMPTY_DIR,
            EntryKind::File { size, data } => match data {
                FileData::Contiguous { offset } => Packed::File {
                    layer: position,
                    size: *size,
                    offset: *offset,
                },
                other => {
                    let data = index_of(self.file_data.len())?;
                    self.file_data.push(other.clone());
                    Packed::OtherFile {
                        layer: position,
                        data,
                        size: *size,
                    }
                }
            },
            EntryKind::Symlink { target } => {
                let (target, len) = self.intern(target)?;
                Packed::Symlink { target, len }
            }
            EntryKind::CharDevice { major, minor } => Packed::CharDevice {
                major: *major,
                minor: *minor,
            },
            EntryKind::BlockDevice { major, minor } => Packed::BlockDevice {
                major: *major,
                minor: *minor,
            },
            EntryKind::Fifo => Packed::Fifo,
            EntryKind::Hardlink { .. } => return Ok(()),
        };
        let attrs = self.attrs_id(entry)?;
        let slot = self.push(parent, attrs, entry.mtime, kind)?;
        self.insert_child(parent, name, slot)
    }

    /// A hardlink names the inode its target has *now*; tar extraction fails
    /// on a missing or directory target, so such an entry is skipped.
    fn link(
        &mut self,
        parent: u32,
        name: &[u8],
        existing: Option<u32>,
        target: &[u8],
        path: &[u8],
    ) -> Result<(), Full> {
        let Some(target_slot) = self.resolve(target) else {
            tracing::warn!(
                path = %String::from_utf8_lossy(path),
                target = %String::from_utf8_lossy(target),
                "hardlink to a missing entry skipped"
            );
            return Ok(());
        };
        if self.is_dir(target_slot) {
            tracing::warn!(path = %String::from_utf8_lossy(path), "hardlink to a directory skipped");
            return Ok(());
        }
        if existing == Some(target_slot) {
            return Ok(());
        }
        if existing.is_some() {
            self.remove_child(parent, name);
        }
        self.insert_child(parent, name, target_slot)
    }

    /// The shared attributes of `entry`, stored once per distinct value.
    fn attrs_id(&mut self, entry: &Entry) -> Result<u32, Full> {
        let attrs = attrs_of(entry);
        if let Some(&id) = self.attrs.get(&attrs) {
            return Ok(id);
        }
        let id = index_of(self.attrs.len())?;
        self.attrs.insert(attrs, id);
        Ok(id)
    }

    fn intern(&mut self, bytes: &[u8]) -> Result<(u32, u32), Full> {
        let start = index_of(self.arena.len())?;
        index_of(self.arena.len() + bytes.len())?;
        self.arena.extend_from_slice(bytes);
        Ok((start, bytes.len() as u32))
    }

    /// Gives an existing node the attributes of `entry`.
    fn set_attrs(&mut self, slot: u32, entry: &Entry) -> Result<(), Full> {
        let attrs = self.attrs_id(entry)?;
        let node = &mut self.nodes[slot as usize];
        node.attrs = attrs;
        node.mtime = entry.mtime;
        Ok(())
    }

    fn push(&mut self, parent: u32, attrs: u32, mtime: i64, kind: Packed) -> Result<u32, Full> {
        let slot = index_of(self.nodes.len())?;
        self.nodes.push(PackedNode {
            parent,
            nlink: 0,
            attrs,
            name: NONE,
            mtime,
            kind,
        });
        Ok(slot)
    }

    fn is_dir(&self, slot: u32) -> bool {
        matches!(self.nodes[slot as usize].kind, Packed::Dir { .. })
    }

    fn link_name(&self, link: &Link) -> &[u8] {
        arena_slice(&self.arena, link.name, link.len)
    }

    fn hash(&self, dir: u32, name: &[u8]) -> usize {
        self.hasher.hash_one((dir, name)) as usize
    }

    /// The table slot holding the live link `name` in `dir`.
    fn find_slot(&self, dir: u32, name: &[u8]) -> Option<usize> {
        let mask = self.table.len() - 1;
        let mut i = self.hash(dir, name) & mask;
        loop {
            match self.table.get(i) {
                EMPTY => return None,
                TOMBSTONE => {}
                l => {
                    let link = self.links.get(l);
                    if link.dir == dir && self.link_name(&link) == name {
                        return Some(i);
                    }
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// Adds link `l`, whose name is not in its directory yet.
    fn table_insert(&mut self, l: u32) {
        if (self.table_used + 1) * 2 > self.table.len() {
            self.rehash();
        }
        let link = self.links.get(l);
        let mask = self.table.len() - 1;
        let mut i = self.hash(link.dir, self.link_name(&link)) & mask;
        while !matches!(self.table.get(i), EMPTY | TOMBSTONE) {
            i = (i + 1) & mask;
        }
        if self.table.get(i) == EMPTY {
            self.table_used += 1;
        }
        self.table.set(i, l);
    }

    /// Rebuilds the table without tombstones, at least four slots per live
    /// link so it stays at most half full until the next rebuild.
    fn rehash(&mut self) {
        let live_link = |l: u32| !matches!(l, EMPTY | TOMBSTONE);
        let live = (0..self.table.len())
            .filter(|&i| live_link(self.table.get(i)))
            .count();
        let size = (live * 4).max(MIN_TABLE_SIZE).next_power_of_two();
        let old = std::mem::replace(&mut self.table, Scratch::new(size, size));
        self.table_used = 0;
        for i in 0..old.len() {
            let l = old.get(i);
            if live_link(l) {
                self.table_insert(l);
            }
        }
    }

    fn child(&self, dir: u32, name: &[u8]) -> Option<u32> {
        if !self.is_dir(dir) {
            return None;
        }
        let slot = self.find_slot(dir, name)?;
        Some(self.links.get(self.table.get(slot)).node)
    }

    fn insert_child(&mut self, dir: u32, name: &[u8], node: u32) -> Result<(), Full> {
        let Packed::Dir { first, .. } = self.nodes[dir as usize].kind else {
            return Ok(());
        };
        let l = index_of(self.links.len())?;
        let (name, len) = self.intern(name)?;
        self.links.push(Link {
            dir,
            node,
            name,
            len,
            next: first,
        });
        self.nodes[dir as usize].kind = Packed::Dir { first: l, count: 0 };
        let child = &mut self.nodes[node as usize];
        child.nlink = child.nlink.saturating_add(1);
        self.table_insert(l);
        Ok(())
    }

    /// Unlinks the live link in table slot `slot`; returns its node.
    fn unlink_slot(&mut self, slot: usize) -> u32 {
        let l = self.table.get(slot);
        self.table.set(slot, TOMBSTONE);
        let node = self.links.get(l).node;
        self.links.set_node(l, NONE);
        let child = &mut self.nodes[node as usize];
        child.nlink = child.nlink.saturating_sub(1);
        node
    }

    /// Unlinks `name` from `dir`; a directory loses its whole subtree.
    fn remove_child(&mut self, dir: u32, name: &[u8]) {
        if !self.is_dir(dir) {
            return;
        }
        if let Some(slot) = self.find_slot(dir, name) {
            let node = self.unlink_slot(slot);
            self.clear_children(node);
        }
    }

    /// Unlinks everything below `dir`, by a loop (trees can be very deep).
    fn clear_children(&mut self, dir: u32) {
        let mut pending = vec![dir];
        while let Some(dir) = pending.pop() {
            let Packed::Dir { first, .. } = self.nodes[dir as usize].kind else {
                continue;
            };
            self.nodes[dir as usize].kind = EMPTY_DIR;
            let mut l = first;
            while l != NONE {
                let link = self.links.get(l);
                if link.node != NONE {
                    if let Some(slot) = self.find_slot(dir, self.link_name(&link)) {
                        pending.push(self.unlink_slot(slot));
                    }
                }
                l = link.next;
            }
        }
    }

    /// The directory at `path` (symlinked components resolved inside the
    /// root), creating missing ones and replacing non-directories on the way,
    /// as an unpacker's `mkdir -p` would.
    fn make_dirs(&mut self, path: &[u8]) -> Result<u32, Full> {
        let mut current = ROOT_SLOT;
        for name in components(path) {
            current = match self.child(current, name) {
                Some(slot) => match self.follow(current, slot, 0) {
                    Some(dir) if self.is_dir(dir) => dir,
                    _ => {
                        self.remove_child(current, name);
                        self.new_dir(current, name)?
                    }
                },
                None => self.new_dir(current, name)?,
            };
        }
        Ok(current)
    }

    fn new_dir(&mut self, parent: u32, name: &[u8]) -> Result<u32, Full> {
        let slot = self.push(parent, IMPLIED_DIR_ATTRS, 0, EMPTY_DIR)?;
        self.insert_child(parent, name, slot)?;
        Ok(slot)
    }

    /// Resolves a path to an existing node, following symlinks in parent
    /// components (not the last one).
    fn resolve(&self, path: &[u8]) -> Option<u32> {
        let (dir, name) = split_parent(path);
        if name.is_empty() {
            return Some(ROOT_SLOT);
        }
        let dir = self.resolve_dir(dir)?;
        self.child(dir, name)
    }

    fn resolve_dir(&self, path: &[u8]) -> Option<u32> {
        self.walk(ROOT_SLOT, path, 0)
    }

    fn walk(&self, start: u32, path: &[u8], hops: u32) -> Option<u32> {
        let mut current = start;
        for name in components(path) {
            let next = match name {
                b"." => current,
                b".." => self.nodes[current as usize].parent,
                _ => self.child(current, name)?,
            };
            current = self.follow(current, next, hops)?;
        }
        Some(current)
    }

    /// If `slot` is a symlink, the node it points to (relative to `dir`,
    /// absolute targets relative to the image root); otherwise `slot`.
    fn follow(&self, dir: u32, slot: u32, hops: u32) -> Option<u32> {
        match self.nodes[slot as usize].kind {
            Packed::Symlink { target, len } => {
                if hops >= MAX_SYMLINK_HOPS {
                    return None;
                }
                let target = arena_slice(&self.arena, target, len);
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

    /// Numbers reachable nodes depth-first from the root, children in name
    /// order, so inode numbers are dense and stable for a given image; then
    /// puts the nodes in that order, in place.
    fn freeze(self) -> Tree {
        let Builder {
            mut nodes,
            links,
            mut arena,
            table,
            attrs,
            mut file_data,
            ..
        } = self;
        drop(table);
        let (mut number, dirent_links) = number_nodes(&mut nodes, &links, &arena);
        let dirents: Vec<Dirent> = (0..dirent_links.len())
            .map(|i| {
                let link = links.get(dirent_links.get(i));
                Dirent {
                    name: link.name,
                    len: link.len,
                    node: number.get(link.node as usize),
                }
            })
            .collect();
        drop(dirent_links);
        drop(links);
        permute(&mut nodes, &mut number);
        drop(number);

        let mut attrs_by_id: Vec<Option<Attrs>> = vec![None; attrs.len()];
        for (value, id) in attrs {
            attrs_by_id[id as usize] = Some(value);
        }
        // Only the attributes some reachable node has, numbered anew.
        let mut attrs_number = vec![NONE; attrs_by_id.len()];
        let mut out_attrs = Vec::new();
        for node in &mut nodes {
            let Some(number) = attrs_number.get_mut(node.attrs as usize) else {
                continue;
            };
            if *number == NONE {
                *number = out_attrs.len() as u32;
                out_attrs.push(
                    attrs_by_id[node.attrs as usize]
                        .take()
                        .unwrap_or_else(implied_dir_attrs),
                );
            }
            node.attrs = *number;
        }
        nodes.shrink_to_fit();
        arena.shrink_to_fit();
        file_data.shrink_to_fit();
        Tree {
            nodes,
            dirents,
            arena,
            attrs: out_attrs,
            file_data,
        }
    }
}

/// An empty directory while building (`first` is the head of its links).
const EMPTY_DIR: Packed = Packed::Dir {
    first: NONE,
    count: 0,
};

/// Walks the tree depth first from the root, children in name order, and
/// gives every reachable node its final position (the result's first part,
/// by creation slot; [`NONE`] when unreachable) and its final fields:
/// parent and first name as final positions, a directory's children as a
/// run of the result's second part (the final dirents, as links).
fn number_nodes(nodes: &mut [PackedNode], links: &Links, arena: &[u8]) -> (Scratch, Scratch) {
    let mut number = Scratch::new(nodes.len(), nodes.len());
    let mut dirents = Scratch::new(0, links.len());
    let name = |l: u32| {
        let link = links.get(l);
        arena_slice(arena, link.name, link.len)
    };
    // One directory's live links at a time, to sort them.
    let mut children: Vec<u32> = Vec::new();
    let mut next = 0u32;
    // Frames of (slot, parent position, dirent).
    let mut stack = Scratch::new(0, 0);
    for value in [ROOT_SLOT, ROOT_SLOT, NONE] {
        stack.push(value);
    }
    while let (Some(dirent), Some(parent), Some(slot)) = (stack.pop(), stack.pop(), stack.pop()) {
        if number.get(slot as usize) != NONE {
            continue; // a second name of a hardlinked file
        }
        let position = next;
        next += 1;
        number.set(slot as usize, position);
        nodes[slot as usize].parent = parent;
        nodes[slot as usize].name = dirent;
        let Packed::Dir { first, .. } = nodes[slot as usize].kind else {
            continue;
        };
        children.clear();
        let mut l = first;
        while l != NONE {
            let link = links.get(l);
            if link.node != NONE {
                children.push(l);
            }
            l = link.next;
        }
        children.sort_unstable_by(|&a, &b| name(a).cmp(name(b)));
        let start = dirents.len();
        let mut subdirs = 0u32;
        for &l in &children {
            dirents.push(l);
            let child = links.get(l).node;
            if matches!(nodes[child as usize].kind, Packed::Dir { .. }) {
                subdirs += 1;
            }
        }
        let node = &mut nodes[slot as usize];
        node.kind = Packed::Dir {
            first: start as u32,
            count: children.len() as u32,
        };
        node.nlink = 2u32.saturating_add(subdirs);
        for (at, &l) in children.iter().enumerate().rev() {
            for value in [links.get(l).node, position, (start + at) as u32] {
                stack.push(value);
            }
        }
    }
    (number, dirents)
}

/// Moves every node to its final position (`number`, consumed) and drops
/// the unreachable ones, without a second table.
fn permute(nodes: &mut Vec<PackedNode>, number: &mut Scratch) {
    let reachable = (0..number.len()).filter(|&i| number.get(i) != NONE).count();
    for i in 0..nodes.len() {
        // Each swap puts one node in its place; an unreachable one is left
        // at `i` until a later node claims `i`.
        loop {
            let target = number.get(i);
            if target == NONE || target as usize == i {
                break;
            }
            nodes.swap(i, target as usize);
            number.swap(i, target as usize);
        }
    }
    nodes.truncate(reachable);
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

fn attrs_of(entry: &Entry) -> Attrs {
    Attrs {
        mode: entry.mode & 0o7777,
        uid: entry.uid,
        gid: entry.gid,
        mtime_nsec: entry.mtime_nsec,
        xattrs: entry
            .xattrs
            .iter()
            .map(|(k, v)| (k.clone().into_boxed_slice(), v.clone().into_boxed_slice()))
            .collect(),
    }
}

/// Id of [`implied_dir_attrs`] while building.
const IMPLIED_DIR_ATTRS: u32 = 0;

fn implied_dir_attrs() -> Attrs {
    Attrs {
        mode: IMPLIED_DIR_MODE,
        uid: 0,
        gid: 0,
        mtime_nsec: 0,
        xattrs: Box::new([]),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{Access, INDEX_VERSION, Index};

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry::plain(path, kind)
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

    #[test]
    fn large_directories_survive_whiteouts_and_replacements() {
        const FILES: usize = 3000;
        let paths: Vec<String> = (0..FILES).map(|i| format!("d/f{i:05}")).collect();
        let lower = layer(paths.iter().map(|n| file(n, 1)).collect());
        let upper = layer(
            (0..FILES)
                .filter(|i| i % 3 == 0)
                .map(|i| entry(&format!("d/.wh.f{i:05}"), EntryKind::Fifo))
                .chain(
                    (0..FILES)
                        .filter(|i| i % 3 == 1)
                        .map(|i| file(&paths[i], 2)),
                )
                .collect(),
        );
        let tree = Tree::build(&[lower, upper]);
        let listed = names(&tree, "d");
        let want: Vec<String> = (0..FILES)
            .filter(|i| i % 3 != 0)
            .map(|i| format!("f{i:05}"))
            .collect();
        assert_eq!(listed, want);
        for (i, path) in paths.iter().enumerate() {
            let size = size_of(&tree, path);
            assert_eq!(size, [None, Some(2), Some(1)][i % 3], "{path}");
        }
        assert_eq!(tree.len(), 2 + want.len());
    }

    #[test]
    fn sparse_layouts_and_attributes_are_kept() {
        let segments = vec![crate::layer::Segment {
            file_offset: 10,
            stream_offset: 512,
            len: 3,
        }];
        let mut sparse = entry(
            "s",
            EntryKind::File {
                size: 100,
                data: FileData::Sparse {
                    segments: segments.clone(),
                },
            },
        );
        sparse.xattrs = vec![(b"user.a".to_vec(), b"1".to_vec())];
        let tree = Tree::build(&[layer(vec![
            file("a", 1),
            file("b", 2),
            file("c", 3),
            sparse,
        ])]);
        let node = tree.get(tree.lookup_path(b"s").expect("s")).expect("node");
        match node.kind {
            NodeKind::File { size, data, .. } => {
                assert_eq!(size, 100);
                assert_eq!(*data, FileData::Sparse { segments });
            }
            other => panic!("not a file: {other:?}"),
        }
        assert_eq!(node.meta.xattrs.len(), 1);
        // The root's implied attributes, the three plain files', the sparse one's.
        assert_eq!(tree.attrs.len(), 3);
    }

    #[test]
    fn first_name_is_where_the_walk_first_meets_a_node() {
        let tree = Tree::build(&[layer(vec![
            file("z/a", 1),
            link("b/a", "z/a"),
            link("b/c", "z/a"),
        ])]);
        let ino = tree.lookup_path(b"z/a").expect("a");
        let (dir, name) = tree.first_name(ino).expect("name");
        assert_eq!((dir, name), (tree.lookup_path(b"b").expect("b"), &b"a"[..]));
        assert_eq!(tree.get(ino).expect("node").parent, dir);
        assert_eq!(tree.first_name(ROOT), None);
        assert!(tree.is_dir(dir) && !tree.is_dir(ino));
    }

    #[test]
    fn mtimes_are_per_node_and_other_attributes_shared() {
        let entries: Vec<Entry> = (0..100)
            .map(|i| Entry {
                mtime: 1_600_000_000 + i,
                ..file(&format!("f{i:03}"), 1)
            })
            .collect();
        let tree = Tree::build(&[layer(entries)]);
        for i in 0..100 {
            let ino = tree.lookup_path(format!("f{i:03}").as_bytes()).expect("f");
            let meta = tree.get(ino).expect("node").meta;
            assert_eq!((meta.mtime, meta.mode), (1_600_000_000 + i, 0o644));
        }
        assert_eq!(tree.attrs.len(), 2, "the root's and the files'");
    }

    #[test]
    fn scratch_tables_grow_from_heap_to_mapping_and_start_as_none() {
        const VALUES: u32 = 100_000;
        let mut table = Scratch::new(3, 0);
        assert_eq!((table.get(0), table.get(2)), (NONE, NONE));
        for v in 0..VALUES {
            table.push(v);
        }
        assert!(matches!(table.bytes, ScratchBytes::Map(_)));
        assert_eq!(table.len(), 3 + VALUES as usize);
        assert_eq!((table.get(2), table.get(3), table.get(4)), (NONE, 0, 1));
        table.swap(3, 4);
        assert_eq!((table.get(3), table.get(4)), (1, 0));
        assert_eq!(table.pop(), Some(VALUES - 1));
        let big = Scratch::new(VALUES as usize, VALUES as usize);
        assert!((0..VALUES as usize).all(|i| big.get(i) == NONE));
    }
}
