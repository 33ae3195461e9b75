//! The filesystem operations over a merged image, independent of FUSE.
//!
//! [`ImageFs`] answers lookups, attributes, directory listings, reads,
//! symlinks and xattrs from the [`union::Tree`](crate::union::Tree), and
//! reads file bytes through one [`LayerReader`] per layer. Every operation
//! returns an [`Errno`] on failure and never panics on a bad inode or offset;
//! `fuse.rs` only translates to and from the kernel protocol, so everything
//! here is tested without a mount.

use crate::layer::LayerReader;
use crate::materialize::{Key, Materializer};
use crate::union::{Ino, Node, NodeKind, ROOT, Tree};
use std::sync::Arc;

/// Block size reported by `stat` and `statfs`.
pub const BLOCK: u32 = 4096;
/// `st_blocks` counts 512-byte units.
const STAT_BLOCK_UNIT: u64 = 512;
/// Longest name `statfs` advertises (tar names may be longer; the kernel
/// never asks for one longer than it allows).
const NAME_MAX: u32 = 255;
/// Readdir offsets of `.` and `..`; children follow from `FIRST_CHILD`.
const DOT_OFFSET: u64 = 1;
const DOTDOT_OFFSET: u64 = 2;
const FIRST_CHILD: u64 = 3;

/// An errno answered to the kernel (positive, as in `libc`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    pub const ENOENT: Errno = Errno(libc::ENOENT);
    pub const EIO: Errno = Errno(libc::EIO);
    pub const EROFS: Errno = Errno(libc::EROFS);
    pub const ENOTDIR: Errno = Errno(libc::ENOTDIR);
    pub const EINVAL: Errno = Errno(libc::EINVAL);
    pub const ENODATA: Errno = Errno(libc::ENODATA);
    pub const ERANGE: Errno = Errno(libc::ERANGE);
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FileKind {
    Dir,
    File,
    Symlink,
    CharDevice,
    BlockDevice,
    Fifo,
    Socket,
}

/// What `stat` shows for an inode.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Attr {
    pub ino: Ino,
    pub kind: FileKind,
    pub perm: u16,
    pub nlink: u32,
    pub uid: u32,
    pub gid: u32,
    pub size: u64,
    pub blocks: u64,
    pub rdev: u32,
    pub mtime: i64,
    pub mtime_nsec: u32,
    pub atime: i64,
    pub atime_nsec: u32,
    pub ctime: i64,
    pub ctime_nsec: u32,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DirEntry<'a> {
    pub ino: Ino,
    /// Offset to pass back to continue after this entry.
    pub next_offset: u64,
    pub kind: FileKind,
    pub name: &'a [u8],
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StatFs {
    pub blocks: u64,
    pub files: u64,
    pub block_size: u32,
    pub name_max: u32,
}

/// See the module doc.
pub struct ImageFs {
    tree: Tree,
    /// One reader per layer, indexed by the layer's position in the stack.
    readers: Vec<Arc<LayerReader>>,
    statfs: StatFs,
    /// Keeps files that are read whole as plain files (see `materialize`).
    materializer: Option<Arc<Materializer>>,
}

impl ImageFs {
    pub fn new(tree: Tree, readers: Vec<LayerReader>) -> ImageFs {
        let bytes: u64 = (ROOT..ROOT + tree.len() as u64)
            .filter_map(|ino| match tree.get(ino)?.kind {
                NodeKind::File { size, .. } => Some(size),
                _ => None,
            })
            .sum();
        let statfs = StatFs {
            blocks: bytes.div_ceil(u64::from(BLOCK)),
            files: tree.len() as u64,
            block_size: BLOCK,
            name_max: NAME_MAX,
        };
        ImageFs {
            tree,
            readers: readers.into_iter().map(Arc::new).collect(),
            statfs,
            materializer: None,
        }
    }

    /// Keeps files that reads go through whole as plain files in the cache,
    /// for [`Self::kept_whole`].
    pub fn with_materializer(mut self, materializer: Arc<Materializer>) -> ImageFs {
        self.materializer = Some(materializer);
        self
    }

    /// The plain file holding `ino`'s bytes, if it was kept whole.
    pub fn kept_whole(&self, ino: Ino) -> Option<std::fs::File> {
        let materializer = self.materializer.as_ref()?;
        let node = self.node(ino).ok()?;
        let NodeKind::File { size, layer, data } = node.kind else {
            return None;
        };
        let reader = self.readers.get(layer as usize)?;
        materializer.open(&Key::of(reader.index().layer_digest, size, &data)?)
    }

    pub fn tree(&self) -> &Tree {
        &self.tree
    }

    fn node(&self, ino: Ino) -> Result<Node<'_>, Errno> {
        self.tree.get(ino).ok_or(Errno::ENOENT)
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        let dir = self.node(parent)?;
        if !matches!(dir.kind, NodeKind::Dir { .. }) {
            return Err(Errno::ENOTDIR);
        }
        let ino = match name {
            b"." => parent,
            b".." => dir.parent,
            _ => self.tree.lookup(parent, name).ok_or(Errno::ENOENT)?,
        };
        self.getattr(ino)
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let node = self.node(ino)?;
        let (kind, size, rdev) = match &node.kind {
            NodeKind::Dir { children } => (FileKind::Dir, dir_size(children.len()), 0),
            NodeKind::File { size, .. } => (FileKind::File, *size, 0),
            NodeKind::Symlink { target } => (FileKind::Symlink, target.len() as u64, 0),
            NodeKind::CharDevice { major, minor } => {
                (FileKind::CharDevice, 0, makedev(*major, *minor))
            }
            NodeKind::BlockDevice { major, minor } => {
                (FileKind::BlockDevice, 0, makedev(*major, *minor))
            }
            NodeKind::Fifo => (FileKind::Fifo, 0, 0),
        };
        Ok(Attr {
            ino,
            kind,
            perm: (node.meta.mode & 0o7777) as u16,
            nlink: node.nlink,
            uid: node.meta.uid,
            gid: node.meta.gid,
            size,
            blocks: size.div_ceil(STAT_BLOCK_UNIT),
            rdev,
            mtime: node.meta.mtime,
            mtime_nsec: node.meta.mtime_nsec,
            // The image records one time; it is also the access and change time.
            atime: node.meta.mtime,
            atime_nsec: node.meta.mtime_nsec,
            ctime: node.meta.mtime,
            ctime_nsec: node.meta.mtime_nsec,
        })
    }

    /// Entries at and after `offset` (0 = from the start), `.` and `..` first.
    pub fn readdir(
        &self,
        ino: Ino,
        offset: u64,
    ) -> Result<impl Iterator<Item = DirEntry<'_>>, Errno> {
        let node = self.node(ino)?;
        let NodeKind::Dir { children } = node.kind else {
            return Err(Errno::ENOTDIR);
        };
        let dots = [
            (ino, DOT_OFFSET, &b"."[..]),
            (node.parent, DOTDOT_OFFSET, &b".."[..]),
        ]
        .into_iter()
        .filter(move |(_, next, _)| *next > offset)
        .map(|(ino, next_offset, name)| DirEntry {
            ino,
            next_offset,
            kind: FileKind::Dir,
            name,
        });
        let skip = offset.saturating_sub(FIRST_CHILD - 1);
        let skip = usize::try_from(skip).unwrap_or(usize::MAX);
        let children = children
            .skip(skip)
            .iter()
            .enumerate()
            .map(move |(i, (name, child))| DirEntry {
                ino: child,
                next_offset: FIRST_CHILD + (skip + i) as u64,
                kind: self.kind_of(child),
                name,
            });
        Ok(dots.chain(children))
    }

    fn kind_of(&self, ino: Ino) -> FileKind {
        self.getattr(ino).map(|a| a.kind).unwrap_or(FileKind::File)
    }

    /// The mount is read-only: opening for writing is refused here so that
    /// `open(O_WRONLY)` fails before any data moves.
    pub fn open(&self, ino: Ino, write: bool) -> Result<(), Errno> {
        self.node(ino)?;
        if write {
            return Err(Errno::EROFS);
        }
        Ok(())
    }

    pub fn read(&self, ino: Ino, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        let node = self.node(ino)?;
        let NodeKind::File {
            size: file_size,
            layer,
            data,
        } = node.kind
        else {
            return Err(Errno::EINVAL);
        };
        if offset >= file_size || size == 0 {
            return Ok(Vec::new());
        }
        let reader = self.readers.get(layer as usize).ok_or(Errno::EIO)?;
        let bytes = reader
            .read_file(file_size, &data, offset, size as usize)
            .map_err(|e| {
                tracing::error!(ino, offset, size, error = %e, "read failed");
                Errno::EIO
            })?;
        if let Some(materializer) = &self.materializer
            && let Some(key) = Key::of(reader.index().layer_digest, file_size, &data)
        {
            materializer.served(key, bytes.len() as u64, &data, reader);
        }
        Ok(bytes)
    }

    /// Fetches a regular file's bytes into the cache without reading them
    /// out (nothing for other entries).
    pub fn prefetch(&self, ino: Ino) -> Result<(), Errno> {
        let NodeKind::File { size, layer, data } = self.node(ino)?.kind else {
            return Ok(());
        };
        let reader = self.readers.get(layer as usize).ok_or(Errno::EIO)?;
        reader.prefetch_file(size, &data).map_err(|e| {
            tracing::error!(ino, error = %e, "prefetch failed");
            Errno::EIO
        })
    }

    pub fn readlink(&self, ino: Ino) -> Result<&[u8], Errno> {
        match self.node(ino)?.kind {
            NodeKind::Symlink { target } => Ok(target),
            _ => Err(Errno::EINVAL),
        }
    }

    pub fn getxattr(&self, ino: Ino, name: &[u8]) -> Result<&[u8], Errno> {
        self.node(ino)?
            .meta
            .xattrs
            .iter()
            .rev() // a later record of the same name wins, as in extraction
            .find(|(k, _)| k.as_ref() == name)
            .map(|(_, v)| v.as_ref())
            .ok_or(Errno::ENODATA)
    }

    /// Names, each NUL-terminated, as `listxattr(2)` returns them.
    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let mut out: Vec<u8> = Vec::new();
        let mut seen: Vec<&[u8]> = Vec::new();
        for (name, _) in self.node(ino)?.meta.xattrs {
            if !seen.contains(&name.as_ref()) {
                seen.push(name);
                out.extend_from_slice(name);
                out.push(0);
            }
        }
        Ok(out)
    }

    pub fn statfs(&self) -> &StatFs {
        &self.statfs
    }
}

/// Directories report a size that grows with their entries, like ext4 does
/// in whole blocks; tools only use it as a hint.
fn dir_size(entries: usize) -> u64 {
    u64::from(BLOCK) * (1 + entries as u64 / 128)
}

/// Linux's `makedev` for the 32-bit `rdev` FUSE carries.
fn makedev(major: u32, minor: u32) -> u32 {
    ((major & 0xfff) << 8) | (minor & 0xff) | ((minor & !0xff) << 12)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{
        Access, BlobSource, Entry, EntryKind, FileData, INDEX_VERSION, Index, SourceError,
    };
    use std::sync::Arc;

    struct Bytes(Vec<u8>);
    impl BlobSource for Bytes {
        fn read_at(&self, offset: u64, len: usize) -> Result<Vec<u8>, SourceError> {
            let start = (offset as usize).min(self.0.len());
            let end = (start + len).min(self.0.len());
            Ok(self.0[start..end].to_vec())
        }
    }

    fn entry(path: &str, kind: EntryKind) -> Entry {
        Entry {
            path: path.as_bytes().to_vec(),
            kind,
            mode: 0o4755,
            uid: 7,
            gid: 8,
            mtime: 1_700_000_000,
            mtime_nsec: 5,
            xattrs: vec![(b"user.k".to_vec(), b"v".to_vec())],
        }
    }

    /// A one-layer "tar" stream: file data at known offsets.
    fn image() -> ImageFs {
        let stream = b"....hello world....".to_vec();
        let index = Arc::new(Index {
            version: INDEX_VERSION,
            layer_digest: Digest::of(&stream),
            blob_size: stream.len() as u64,
            stream_size: stream.len() as u64,
            entries: vec![
                entry("bin", EntryKind::Dir),
                entry(
                    "bin/hello",
                    EntryKind::File {
                        size: 11,
                        data: FileData::Contiguous { offset: 4 },
                    },
                ),
                entry(
                    "bin/sh",
                    EntryKind::Symlink {
                        target: b"hello".to_vec(),
                    },
                ),
                entry("dev/null", EntryKind::CharDevice { major: 1, minor: 3 }),
            ],
            block_digests: vec![],
            access: Access::Tar,
        });
        let reader = LayerReader::new(index.clone(), Arc::new(Bytes(stream)));
        ImageFs::new(Tree::build(&[index]), vec![reader])
    }

    #[test]
    fn lookup_getattr_read_readlink_xattrs() {
        let fs = image();
        let bin = fs.lookup(ROOT, b"bin").expect("bin");
        assert_eq!((bin.kind, bin.nlink), (FileKind::Dir, 2));
        let hello = fs.lookup(bin.ino, b"hello").expect("hello");
        assert_eq!(
            (hello.kind, hello.size, hello.perm, hello.uid),
            (FileKind::File, 11, 0o4755, 7)
        );
        assert_eq!(fs.read(hello.ino, 0, 100).expect("read"), b"hello world");
        assert_eq!(fs.read(hello.ino, 6, 3).expect("read"), b"wor");
        assert_eq!(fs.read(hello.ino, 11, 3).expect("eof"), b"");
        let sh = fs.lookup(bin.ino, b"sh").expect("sh");
        assert_eq!(fs.readlink(sh.ino).expect("readlink"), b"hello");
        let null = fs
            .lookup(fs.lookup(ROOT, b"dev").expect("dev").ino, b"null")
            .expect("null");
        assert_eq!((null.kind, null.rdev), (FileKind::CharDevice, (1 << 8) | 3));
        assert_eq!(fs.getxattr(hello.ino, b"user.k").expect("xattr"), b"v");
        assert_eq!(fs.getxattr(hello.ino, b"user.none"), Err(Errno::ENODATA));
        assert_eq!(fs.listxattr(hello.ino).expect("list"), b"user.k\0");
        assert_eq!(fs.lookup(ROOT, b"missing"), Err(Errno::ENOENT));
        assert_eq!(fs.lookup(hello.ino, b"x"), Err(Errno::ENOTDIR));
        assert_eq!(fs.open(hello.ino, true), Err(Errno::EROFS));
        assert_eq!(fs.getattr(9999), Err(Errno::ENOENT));
    }

    #[test]
    fn readdir_resumes_at_any_offset() {
        let fs = image();
        let all: Vec<_> = fs
            .readdir(ROOT, 0)
            .expect("readdir")
            .map(|e| (e.name.to_vec(), e.next_offset))
            .collect();
        let names: Vec<&[u8]> = all.iter().map(|(n, _)| n.as_slice()).collect();
        assert_eq!(names, [&b"."[..], b"..", b"bin", b"dev"]);
        for (i, (_, off)) in all.iter().enumerate() {
            let rest: Vec<_> = fs
                .readdir(ROOT, *off)
                .expect("readdir")
                .map(|e| e.name.to_vec())
                .collect();
            let want: Vec<_> = all[i + 1..].iter().map(|(n, _)| n.clone()).collect();
            assert_eq!(rest, want);
        }
    }
}
