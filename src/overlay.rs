//! The writable view of a mount: the read-only image ([`ImageFs`]) under a
//! copy-on-write [`Upper`] directory, with overlayfs semantics.
//!
//! - A name is looked up in the upper first: a whiteout hides it, an entry
//!   wins; a directory present in both is merged unless the upper one is
//!   opaque. Otherwise the image answers.
//! - The first change to an image entry copies it up (parents first, with
//!   the image's owner, mode, times and xattrs); a lower file with several
//!   names gets all its names linked to the one copy. Inode numbers stay the
//!   same across copy-up.
//! - Deleting an image entry leaves a whiteout; renaming an image directory
//!   copies its subtree up and marks the result opaque, so `mv` never sees
//!   EXDEV.
//!
//! Without an upper (`--read-only`) every change answers `EROFS`.
//!
//! Locking: one namespace lock. Changes to names and copy-ups take it
//! exclusively; lookups, attributes and listings share it. File data moves
//! through per-open file descriptors without it. A copy-up fetches the
//! file's image bytes before it takes the lock (`fetch_for_copy_up`), so
//! others wait for a local copy, not for the network; a directory renamed
//! with its image subtree is still copied under the lock.

use crate::fs::{Attr, Errno, FileKind, ImageFs, StatFs};
use crate::union::{Ino, Node, NodeKind, ROOT};
use crate::upper::{Found, Meta, Owner, SetAttr, SetTime, SpecialKind, Upper, UpperError};
use rustix::fs::{FileType, OFlags, RenameFlags, Stat, Timespec};
use std::collections::{HashMap, HashSet};
use std::os::unix::fs::FileExt;
use std::sync::{Arc, Mutex, MutexGuard, RwLock, RwLockReadGuard, RwLockWriteGuard};

/// What a copy-up of a regular file copies of its bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Contents {
    Whole,
    /// None: the caller truncates the file to 0 right after (`O_TRUNC`,
    /// `truncate -s 0`), so fetching the image's bytes would be wasted, as
    /// kernel overlayfs also skips them.
    Emptied,
}

/// Bytes a copy-up asks the image for at a time.
const COPY_CHUNK: usize = 1024 * 1024;

impl From<UpperError> for Errno {
    fn from(e: UpperError) -> Errno {
        tracing::debug!(error = %e, "upper operation failed");
        Errno(e.errno())
    }
}

/// The caller of an operation (for ownership of what it creates).
#[derive(Debug, Clone, Copy)]
pub struct Caller {
    pub uid: u32,
    pub gid: u32,
}

/// What an open file handle reads from.
enum Handle {
    /// An upper file, with the inode it was opened as.
    Upper(Ino, Arc<std::fs::File>),
    /// An image file kept whole in the cache (read-only, see `materialize`).
    Kept(Arc<std::fs::File>),
    Dir(Arc<Vec<Listed>>),
}

/// One entry of a directory listing snapshot.
#[derive(Debug, Clone)]
pub struct Listed {
    pub name: Vec<u8>,
    pub ino: Ino,
    pub kind: FileKind,
}

/// What the kernel knows an inode as.
#[derive(Debug, Clone)]
struct Inode {
    /// The names it was looked up by, as (directory, name); the last one is
    /// used to reach it in the upper. Several for hardlinks; none once every
    /// name is gone while the kernel still holds it (an open, unlinked file).
    names: Vec<(Ino, Vec<u8>)>,
    /// For a directory: the image directory merged under it (none when the
    /// upper one is opaque or new). For anything else: the image entry it
    /// comes from (kept after copy-up for handles opened before it; `upper`
    /// says which side answers).
    lower: Option<Ino>,
    /// Present in the upper directory.
    upper: bool,
    kind: FileKind,
}

impl Inode {
    /// The directory of the most recent name (the root is its own parent).
    fn parent(&self) -> Ino {
        self.names.last().map_or(ROOT, |(p, _)| *p)
    }

    fn name(&self) -> &[u8] {
        self.names.last().map_or(&[][..], |(_, n)| n)
    }
}

struct State {
    /// Inodes that cannot be found again from the image tree alone: those
    /// in the upper, image hardlinks (several names), image entries that
    /// lost their name while the kernel still knows them, and the root. Any
    /// other image inode the kernel holds is still at its image path and is
    /// rebuilt from the tree on demand (see `image_inode`), so a writable
    /// mount's memory does not grow with what is looked up.
    inodes: HashMap<Ino, Inode>,
    /// Upper `st_ino` → our inode number (keeps numbers across copy-up and
    /// joins upper hardlinks).
    by_upper: HashMap<u64, Ino>,
    next_ino: Ino,
    handles: HashMap<u64, Handle>,
    next_fh: u64,
}

/// See the module doc.
pub struct OverlayFs {
    lower: ImageFs,
    upper: Option<Upper>,
    namespace: RwLock<()>,
    state: Mutex<State>,
}

/// Where a name of the merged view lives.
enum Located {
    Upper { stat: Box<Stat>, lower: Option<Ino> },
    Lower(Ino),
}

impl OverlayFs {
    pub fn new(lower: ImageFs, upper: Option<Upper>) -> Result<OverlayFs, Errno> {
        if let (Some(upper), Some(root)) = (&upper, lower.tree().get(ROOT)) {
            upper.adopt_root_meta(&meta_of(&root))?;
        }
        let root_lower = match &upper {
            Some(u) if u.is_opaque(b"").unwrap_or(false) => None,
            _ => Some(ROOT),
        };
        let root = Inode {
            names: vec![(ROOT, Vec::new())],
            lower: root_lower,
            upper: upper.is_some(),
            kind: FileKind::Dir,
        };
        let state = State {
            inodes: HashMap::from([(ROOT, root)]),
            by_upper: HashMap::new(),
            next_ino: ROOT + lower.tree().len() as Ino,
            handles: HashMap::new(),
            next_fh: 1,
        };
        Ok(OverlayFs {
            lower,
            upper,
            namespace: RwLock::new(()),
            state: Mutex::new(state),
        })
    }

    pub fn is_writable(&self) -> bool {
        self.upper.is_some()
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn reading(&self) -> RwLockReadGuard<'_, ()> {
        self.namespace.read().unwrap_or_else(|p| p.into_inner())
    }

    fn changing(&self) -> Result<(RwLockWriteGuard<'_, ()>, &Upper), Errno> {
        let upper = self.upper.as_ref().ok_or(Errno::EROFS)?;
        Ok((
            self.namespace.write().unwrap_or_else(|p| p.into_inner()),
            upper,
        ))
    }

    fn inode(&self, ino: Ino) -> Result<Inode, Errno> {
        if let Some(inode) = self.state().inodes.get(&ino) {
            return Ok(inode.clone());
        }
        self.image_inode(ino)
    }

    /// An image inode that is not recorded: its inode number is its tree
    /// position and it is where the image has it (see `State::inodes`).
    fn image_inode(&self, ino: Ino) -> Result<Inode, Errno> {
        let node = self.lower_node(ino)?;
        let names = match self.lower.tree().first_name(ino) {
            Some((parent, name)) => vec![(parent, name.to_vec())],
            None => vec![(node.parent, Vec::new())],
        };
        let kind = match node.kind {
            NodeKind::Dir { .. } => FileKind::Dir,
            NodeKind::File { .. } => FileKind::File,
            NodeKind::Symlink { .. } => FileKind::Symlink,
            NodeKind::CharDevice { .. } => FileKind::CharDevice,
            NodeKind::BlockDevice { .. } => FileKind::BlockDevice,
            NodeKind::Fifo => FileKind::Fifo,
        };
        Ok(Inode {
            names,
            lower: Some(ino),
            upper: false,
            kind,
        })
    }

    /// Records an image inode before something about it changes that the
    /// tree does not know (its names, or that it is in the upper).
    fn materialize(&self, state: &mut State, ino: Ino) {
        if let std::collections::hash_map::Entry::Vacant(slot) = state.inodes.entry(ino) {
            if let Ok(inode) = self.image_inode(ino) {
                slot.insert(inode);
            }
        }
    }

    /// The inode's path in the merged view ("" for the root).
    fn path(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let state = self.state();
        let tree = self.lower.tree();
        let mut parts: Vec<&[u8]> = Vec::new();
        let mut current = ino;
        while current != ROOT {
            let (parent, name) = match state.inodes.get(&current) {
                Some(inode) => {
                    let (parent, name) = inode.names.last().ok_or(Errno::ENOENT)?;
                    (*parent, name.as_slice())
                }
                None => tree.first_name(current).ok_or(Errno::ENOENT)?,
            };
            parts.push(name);
            current = parent;
        }
        parts.reverse();
        Ok(parts.join(&b'/'))
    }

    /// Records that `ino` is known as `name` in `parent` (most recent last).
    fn add_name(state: &mut State, ino: Ino, fresh: Inode, parent: Ino, name: &[u8]) {
        let inode = state.inodes.entry(ino).or_insert(fresh.clone());
        // A copied-up file keeps its image origin for handles opened before.
        if fresh.kind == FileKind::Dir || fresh.lower.is_some() {
            inode.lower = fresh.lower;
        }
        inode.upper = fresh.upper;
        inode.kind = fresh.kind;
        inode.names.retain(|(p, n)| !(*p == parent && n == name));
        inode.names.push((parent, name.to_vec()));
    }

    /// Forgets one name of `ino` (unlinked, or replaced by a rename).
    fn drop_name(&self, ino: Ino, parent: Ino, name: &[u8]) {
        let mut state = self.state();
        self.materialize(&mut state, ino);
        if let Some(inode) = state.inodes.get_mut(&ino) {
            inode.names.retain(|(p, n)| !(*p == parent && n == name));
        }
    }

    fn lower_node(&self, ino: Ino) -> Result<Node<'_>, Errno> {
        self.lower.tree().get(ino).ok_or(Errno::ENOENT)
    }

    // ----- finding names ------------------------------------------------

    fn locate(
        &self,
        parent: &Inode,
        parent_path: &[u8],
        name: &[u8],
    ) -> Result<Option<Located>, Errno> {
        if name.contains(&b'/') || name == b"." || name == b".." {
            return Err(Errno::EINVAL);
        }
        let lower_child = parent.lower.and_then(|l| self.lower.tree().lookup(l, name));
        if let Some(upper) = &self.upper {
            match upper.find(parent_path, name)? {
                Found::Whiteout => return Ok(None),
                Found::Entry(stat) => {
                    let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
                    let lower = if is_dir {
                        let path = join(parent_path, name);
                        let opaque = upper.is_opaque(&path)?;
                        lower_child.filter(|&l| !opaque && self.lower_is_dir(l))
                    } else {
                        None
                    };
                    return Ok(Some(Located::Upper {
                        stat: Box::new(stat),
                        lower,
                    }));
                }
                Found::Missing => {}
            }
        }
        Ok(lower_child.map(Located::Lower))
    }

    fn lower_is_dir(&self, ino: Ino) -> bool {
        self.lower.tree().is_dir(ino)
    }

    /// Registers `name` in `parent` with the kernel and returns its attributes.
    fn remember(&self, parent: Ino, name: &[u8], located: Located) -> Result<Attr, Errno> {
        match located {
            Located::Lower(l) => {
                let attr = self.lower.getattr(l)?;
                if self.upper.is_none() {
                    return Ok(attr); // read-only: the tree is all there is
                }
                // An image entry with one name is found again from the tree
                // (`image_inode`); only a hardlink's names need recording.
                let hardlink = attr.kind != FileKind::Dir && attr.nlink > 1;
                let mut state = self.state();
                if hardlink || state.inodes.contains_key(&l) {
                    let inode = Inode {
                        names: Vec::new(),
                        lower: Some(l),
                        upper: false,
                        kind: attr.kind,
                    };
                    Self::add_name(&mut state, l, inode, parent, name);
                }
                Ok(attr)
            }
            Located::Upper { stat, lower } => {
                let kind = kind_of(&stat);
                let mut state = self.state();
                let ino = match state.by_upper.get(&stat.st_ino) {
                    Some(&ino) => ino,
                    None => {
                        let ino = lower.unwrap_or_else(|| {
                            state.next_ino += 1;
                            state.next_ino
                        });
                        state.by_upper.insert(stat.st_ino, ino);
                        ino
                    }
                };
                let inode = Inode {
                    names: Vec::new(),
                    lower,
                    upper: true,
                    kind,
                };
                Self::add_name(&mut state, ino, inode, parent, name);
                drop(state);
                let mut attr = attr_of(ino, &stat);
                if let (FileKind::Dir, Some(l)) = (kind, lower) {
                    attr.nlink = self.merged_nlink(&join(&self.path(parent)?, name), l)?;
                }
                Ok(attr)
            }
        }
    }

    /// Link count of a merged directory: 2 + its subdirectories in the
    /// merged view. Only the upper side is listed (usually small); the image
    /// side comes from the tree.
    fn merged_nlink(&self, path: &[u8], lower: Ino) -> Result<u32, Errno> {
        let Some(upper) = &self.upper else {
            return Ok(self.lower.getattr(lower)?.nlink);
        };
        let mut subdirs = i64::from(self.lower.getattr(lower)?.nlink) - 2;
        for (name, found) in upper.list(path)? {
            if self
                .lower
                .tree()
                .lookup(lower, &name)
                .is_some_and(|l| self.lower_is_dir(l))
            {
                subdirs -= 1;
            }
            if matches!(found, Found::Entry(st) if kind_of(&st) == FileKind::Dir) {
                subdirs += 1;
            }
        }
        Ok(u32::try_from(subdirs.max(0) + 2).unwrap_or(u32::MAX))
    }

    pub fn lookup(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        let _ns = self.reading();
        self.lookup_locked(parent, name)
    }

    fn lookup_locked(&self, parent: Ino, name: &[u8]) -> Result<Attr, Errno> {
        let dir = self.inode(parent)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        if name == b"." {
            return self.getattr_locked(parent);
        }
        if name == b".." {
            return self.getattr_locked(dir.parent());
        }
        // Only the upper is reached by path (read-only mounts record no names).
        let path = match self.upper {
            Some(_) => self.path(parent)?,
            None => Vec::new(),
        };
        match self.locate(&dir, &path, name)? {
            Some(located) => self.remember(parent, name, located),
            None => Err(Errno::ENOENT),
        }
    }

    pub fn getattr(&self, ino: Ino) -> Result<Attr, Errno> {
        let _ns = self.reading();
        self.getattr_locked(ino)
    }

    fn getattr_locked(&self, ino: Ino) -> Result<Attr, Errno> {
        if self.upper.is_none() {
            // Read-only: inode numbers are the tree's own (see `inode`).
            return self.lower.getattr(ino);
        }
        let inode = self.inode(ino)?;
        if inode.upper && inode.names.is_empty() {
            return self.getattr_unlinked(ino);
        }
        let Some(upper) = self.upper.as_ref().filter(|_| inode.upper) else {
            let mut attr = self.lower.getattr(inode.lower.unwrap_or(ROOT))?;
            attr.ino = ino;
            return Ok(attr);
        };
        let stat = if ino == ROOT {
            upper.stat_root()?
        } else {
            let (dir, name) = self.parent_and_name(ino)?;
            upper.stat(&dir, &name)?
        };
        let mut attr = attr_of(ino, &stat);
        if let (FileKind::Dir, Some(l)) = (attr.kind, inode.lower) {
            let path = if ino == ROOT {
                Vec::new()
            } else {
                self.path(ino)?
            };
            attr.nlink = self.merged_nlink(&path, l)?;
        }
        Ok(attr)
    }

    /// `fstat` of a file that lost all its names while open: the kernel
    /// does not say which open file it means, and any of them will do.
    fn getattr_unlinked(&self, ino: Ino) -> Result<Attr, Errno> {
        let file = self
            .state()
            .handles
            .values()
            .find_map(|h| match h {
                Handle::Upper(i, file) if *i == ino => Some(file.clone()),
                _ => None,
            })
            .ok_or(Errno::ENOENT)?;
        let stat = rustix::fs::fstat(&*file).map_err(|e| Errno(e.raw_os_error()))?;
        Ok(attr_of(ino, &stat))
    }

    fn parent_and_name(&self, ino: Ino) -> Result<(Vec<u8>, Vec<u8>), Errno> {
        let inode = self.inode(ino)?;
        let (parent, name) = inode.names.last().ok_or(Errno::ENOENT)?;
        Ok((self.path(*parent)?, name.clone()))
    }

    pub fn readlink(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let _ns = self.reading();
        let inode = self.inode(ino)?;
        match (&self.upper, inode.upper) {
            (Some(upper), true) => {
                let (dir, name) = self.parent_and_name(ino)?;
                let dfd = upper.dir(&dir)?;
                rustix::fs::readlinkat(&dfd, name.as_slice(), Vec::new())
                    .map(|t| t.into_bytes())
                    .map_err(|e| Errno(e.raw_os_error()))
            }
            _ => self
                .lower
                .readlink(inode.lower.ok_or(Errno::EINVAL)?)
                .map(<[u8]>::to_vec),
        }
    }

    // ----- directories --------------------------------------------------

    /// Snapshots the merged listing, so offsets stay valid while it is read.
    pub fn opendir(&self, ino: Ino) -> Result<u64, Errno> {
        let _ns = self.reading();
        let dir = self.inode(ino)?;
        if dir.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let listing = self.merged_listing(ino, &dir)?;
        Ok(self.add_handle(Handle::Dir(Arc::new(listing))))
    }

    fn merged_listing(&self, ino: Ino, dir: &Inode) -> Result<Vec<Listed>, Errno> {
        let mut out: Vec<Listed> = Vec::new();
        let mut hidden: HashSet<Vec<u8>> = HashSet::new();
        if let Some(upper) = &self.upper {
            let path = self.path(ino)?;
            let entries = match upper.list(&path) {
                Ok(entries) => entries,
                Err(e) if e.errno() == libc::ENOENT => Vec::new(),
                Err(e) => return Err(e.into()),
            };
            for (name, found) in entries {
                match found {
                    Found::Whiteout => {
                        hidden.insert(name);
                    }
                    Found::Entry(stat) => {
                        let ino = self.upper_ino_hint(&stat, dir.lower, &name);
                        hidden.insert(name.clone());
                        out.push(Listed {
                            name,
                            ino,
                            kind: kind_of(&stat),
                        });
                    }
                    Found::Missing => {}
                }
            }
        }
        if let Some(lower_dir) = dir.lower {
            for entry in self.lower.readdir(lower_dir, 0)? {
                if entry.name == b"."
                    || entry.name == b".."
                    || hidden.iter().any(|h| h == entry.name)
                {
                    continue;
                }
                out.push(Listed {
                    name: entry.name.to_vec(),
                    ino: entry.ino,
                    kind: entry.kind,
                });
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        let parent = dir.parent();
        let mut all = vec![
            Listed {
                name: b".".to_vec(),
                ino,
                kind: FileKind::Dir,
            },
            Listed {
                name: b"..".to_vec(),
                ino: parent,
                kind: FileKind::Dir,
            },
        ];
        all.extend(out);
        Ok(all)
    }

    /// The inode number an upper entry has or will get at lookup (readdir's
    /// `d_ino` should agree with `stat`).
    fn upper_ino_hint(&self, stat: &Stat, lower_dir: Option<Ino>, name: &[u8]) -> Ino {
        if let Some(&ino) = self.state().by_upper.get(&stat.st_ino) {
            return ino;
        }
        lower_dir
            .and_then(|l| self.lower.tree().lookup(l, name))
            .unwrap_or(stat.st_ino)
    }

    /// The snapshot taken by `opendir`; entry `i` has offset `i + 1`.
    pub fn listing(&self, fh: u64) -> Result<Arc<Vec<Listed>>, Errno> {
        match self.state().handles.get(&fh) {
            Some(Handle::Dir(listing)) => Ok(listing.clone()),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    pub fn release(&self, fh: u64) {
        self.state().handles.remove(&fh);
    }

    fn add_handle(&self, handle: Handle) -> u64 {
        let mut state = self.state();
        let fh = state.next_fh;
        state.next_fh += 1;
        state.handles.insert(fh, handle);
        fh
    }

    // ----- files ----------------------------------------------------------

    /// Opens a file; writing (or truncating) copies it up first. Returns the
    /// handle (0 = read from the image) and whether the kernel may keep its
    /// page cache (only for image files, which never change).
    pub fn open(&self, ino: Ino, flags: i32) -> Result<(u64, bool), Errno> {
        let write = flags & libc::O_ACCMODE != libc::O_RDONLY || flags & libc::O_TRUNC != 0;
        if write {
            let contents = if flags & libc::O_TRUNC != 0 {
                Contents::Emptied
            } else {
                Contents::Whole
            };
            self.fetch_for_copy_up(ino, contents);
            let (_ns, upper) = self.changing()?;
            self.copy_up_as(ino, contents)?;
            return self.open_upper(upper, ino, flags);
        }
        let _ns = self.reading();
        let inode = self.inode(ino)?;
        match (&self.upper, inode.upper) {
            (Some(upper), true) => self.open_upper(upper, ino, flags),
            _ => {
                let lower = inode.lower.ok_or(Errno::ENOENT)?;
                self.lower.open(lower, false)?;
                // A file kept whole is read from disk (by the kernel itself
                // when passthrough is on); others through the layer reader.
                match self.lower.kept_whole(lower) {
                    Some(file) => Ok((self.add_handle(Handle::Kept(Arc::new(file))), true)),
                    None => Ok((0, true)),
                }
            }
        }
    }

    fn open_upper(&self, upper: &Upper, ino: Ino, flags: i32) -> Result<(u64, bool), Errno> {
        let (dir, name) = self.parent_and_name(ino)?;
        let fd = upper.open_file(&dir, &name, open_flags(flags), None)?;
        Ok((
            self.add_handle(Handle::Upper(ino, Arc::new(fd.into()))),
            false,
        ))
    }

    pub fn create(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        flags: i32,
        caller: Caller,
    ) -> Result<(Attr, u64), Errno> {
        let (_ns, upper) = self.changing()?;
        let dir = self.prepare_dir(parent)?;
        let owner = self.owner_in(parent, caller)?;
        let fd = upper.open_file(
            &dir,
            name,
            open_flags(flags) | OFlags::CREATE,
            Some((mode & 0o7777, owner)),
        )?;
        let attr = self.lookup_locked(parent, name)?;
        let fh = self.add_handle(Handle::Upper(attr.ino, Arc::new(fd.into())));
        Ok((attr, fh))
    }

    /// The plain file behind an open handle (for FUSE passthrough): an
    /// upper file, or an image file kept whole.
    pub fn file(&self, fh: u64) -> Result<Arc<std::fs::File>, Errno> {
        match self.state().handles.get(&fh) {
            Some(Handle::Upper(_, file) | Handle::Kept(file)) => Ok(file.clone()),
            _ => Err(Errno(libc::EBADF)),
        }
    }

    pub fn read(&self, ino: Ino, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, Errno> {
        if fh == 0 {
            // Read-only inode numbers are the tree's own; no record to consult.
            let lower = match self.upper {
                None => ino,
                Some(_) => self.inode(ino)?.lower.ok_or(Errno::EIO)?,
            };
            return self.lower.read(lower, offset, size);
        }
        let file = self.file(fh)?;
        let mut buf = vec![0u8; size as usize];
        let mut filled = 0;
        while filled < buf.len() {
            match file.read_at(&mut buf[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => return Err(Errno(e.raw_os_error().unwrap_or(libc::EIO))),
            }
        }
        buf.truncate(filled);
        Ok(buf)
    }

    pub fn write(&self, fh: u64, offset: u64, data: &[u8]) -> Result<u32, Errno> {
        let file = self.file(fh)?;
        file.write_all_at(data, offset)
            .map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))?;
        Ok(data.len() as u32)
    }

    pub fn fsync(&self, fh: u64, datasync: bool) -> Result<(), Errno> {
        if fh == 0 {
            return Ok(());
        }
        let file = self.file(fh)?;
        let result = if datasync {
            file.sync_data()
        } else {
            file.sync_all()
        };
        result.map_err(|e| Errno(e.raw_os_error().unwrap_or(libc::EIO)))
    }

    pub fn fallocate(&self, fh: u64, offset: u64, length: u64, mode: i32) -> Result<(), Errno> {
        let file = self.file(fh)?;
        let mode = rustix::fs::FallocateFlags::from_bits_retain(mode as u32);
        rustix::fs::fallocate(&*file, mode, offset, length).map_err(|e| Errno(e.raw_os_error()))
    }

    // ----- changes ----------------------------------------------------------

    /// Fetches the image bytes a copy-up of `ino` will copy, before the
    /// namespace lock is taken: the copy then reads the local cache, and
    /// lookups and other changes wait for a local copy, not for the network.
    /// A failure here shows again, as EIO, in the copy-up itself.
    fn fetch_for_copy_up(&self, ino: Ino, contents: Contents) {
        if contents == Contents::Emptied {
            return;
        }
        let inode = {
            let _ns = self.reading();
            self.inode(ino)
        };
        if let Ok(inode) = inode
            && !inode.upper
            && inode.kind == FileKind::File
            && let Some(lower) = inode.lower
        {
            let _ = self.lower.prefetch(lower);
        }
    }

    /// Makes sure `ino` exists in the upper: parents first, then the entry
    /// with the image's metadata; every name of an image hardlink is linked.
    fn copy_up(&self, ino: Ino) -> Result<(), Errno> {
        self.copy_up_as(ino, Contents::Whole)
    }

    /// [`Self::copy_up`], copying `contents` of `ino`'s bytes if it is a
    /// regular file.
    fn copy_up_as(&self, ino: Ino, contents: Contents) -> Result<(), Errno> {
        // Ancestors first, so each directory's inode knows it is in the upper;
        // by a loop, not recursion: an image path can be thousands of levels deep.
        let mut chain = Vec::new();
        let mut current = ino;
        loop {
            let inode = self.inode(current)?;
            if inode.upper {
                break;
            }
            chain.push(current);
            if current == ROOT {
                break;
            }
            current = inode.parent();
        }
        for current in chain.into_iter().rev() {
            // Ancestors are directories: `contents` only concerns `ino`.
            self.copy_up_one(current, contents)?;
        }
        Ok(())
    }

    /// Copies `ino` up; its parent is in the upper already.
    fn copy_up_one(&self, ino: Ino, contents: Contents) -> Result<(), Errno> {
        let inode = self.inode(ino)?;
        let upper = self.upper.as_ref().ok_or(Errno::EROFS)?;
        let lower = inode.lower.ok_or(Errno::EIO)?;
        if inode.kind == FileKind::Dir {
            let path = self.path(ino)?;
            upper.ensure_dirs(&path, &|prefix| self.meta_at(prefix))?;
        } else {
            let dir = self.prepare_dir(inode.parent())?;
            self.copy_up_entry(upper, &dir, inode.name(), lower, contents)?;
        }
        let (dir, name) = self.parent_and_name(ino)?;
        let stat = if ino == ROOT {
            None
        } else {
            Some(upper.stat(&dir, &name)?)
        };
        let mut state = self.state();
        if let Some(stat) = stat {
            state.by_upper.insert(stat.st_ino, ino);
        }
        // `lower` stays: a file opened from the image before the copy-up
        // goes on reading the image's bytes, as with kernel overlayfs.
        state.inodes.entry(ino).or_insert(inode.clone()).upper = true;
        drop(state);
        if inode.kind != FileKind::Dir && self.lower_node(lower)?.nlink > 1 {
            self.link_other_names(upper, lower, &join(&dir, &name))?;
        }
        Ok(())
    }

    fn copy_up_entry(
        &self,
        upper: &Upper,
        dir: &[u8],
        name: &[u8],
        lower: Ino,
        contents: Contents,
    ) -> Result<(), Errno> {
        let node = self.lower_node(lower)?;
        let meta = meta_of(&node);
        let special = match &node.kind {
            NodeKind::File { size, .. } => {
                let size = match contents {
                    Contents::Whole => *size,
                    Contents::Emptied => 0,
                };
                let mut read = |offset: u64, len: usize| {
                    let len = len.min(COPY_CHUNK) as u32;
                    self.lower
                        .read(lower, offset, len)
                        .map_err(|e| std::io::Error::from_raw_os_error(e.0))
                };
                upper.copy_up_file(dir, name, &meta, size, &mut read)?;
                return Ok(());
            }
            NodeKind::Symlink { target } => SpecialKind::Symlink(target.to_vec()),
            NodeKind::CharDevice { major, minor } => SpecialKind::CharDevice {
                major: *major,
                minor: *minor,
            },
            NodeKind::BlockDevice { major, minor } => SpecialKind::BlockDevice {
                major: *major,
                minor: *minor,
            },
            NodeKind::Fifo => SpecialKind::Fifo,
            NodeKind::Dir { .. } => return Err(Errno(libc::EISDIR)),
        };
        upper.copy_up_special(dir, name, &special, &meta)?;
        Ok(())
    }

    /// Links every other image name of a hardlinked file to its copy, so the
    /// names stay one inode (where the name still shows the image file).
    fn link_other_names(&self, upper: &Upper, lower: Ino, copied: &[u8]) -> Result<(), Errno> {
        let (copied_dir, copied_name) = split(copied);
        for path in self.lower_paths(lower) {
            if path == copied {
                continue;
            }
            let (dir, name) = split(&path);
            if !self.merged_shows(&path, lower)? {
                continue;
            }
            upper.ensure_dirs(dir, &|prefix| self.meta_at(prefix))?;
            upper.link(copied_dir, copied_name, dir, name)?;
        }
        Ok(())
    }

    /// Every path of the image naming `lower` (a hardlinked file).
    fn lower_paths(&self, lower: Ino) -> Vec<Vec<u8>> {
        let tree = self.lower.tree();
        let mut out = Vec::new();
        let mut stack: Vec<(Ino, Vec<u8>)> = vec![(ROOT, Vec::new())];
        while let Some((dir, path)) = stack.pop() {
            let Some(NodeKind::Dir { children }) = tree.get(dir).map(|n| n.kind) else {
                continue;
            };
            for (name, child) in children.iter() {
                let child_path = join(&path, name);
                if child == lower {
                    out.push(child_path.clone());
                }
                if self.lower_is_dir(child) {
                    stack.push((child, child_path));
                }
            }
        }
        out
    }

    /// Whether the merged view still shows image entry `lower` at `path`.
    fn merged_shows(&self, path: &[u8], lower: Ino) -> Result<bool, Errno> {
        let Some(upper) = &self.upper else {
            return Ok(true);
        };
        let mut dir = Vec::new();
        let parts: Vec<&[u8]> = path.split(|&b| b == b'/').collect();
        for (i, part) in parts.iter().enumerate() {
            if upper.dir(&dir).is_ok() {
                match upper.find(&dir, part)? {
                    Found::Missing => {}
                    Found::Whiteout => return Ok(false),
                    Found::Entry(stat) => {
                        let last = i + 1 == parts.len();
                        let is_dir = FileType::from_raw_mode(stat.st_mode) == FileType::Directory;
                        if last || !is_dir || upper.is_opaque(&join(&dir, part))? {
                            return Ok(false);
                        }
                    }
                }
            }
            dir = join(&dir, part);
        }
        Ok(self.lower.tree().lookup_path(path) == Some(lower))
    }

    /// Image metadata of the directory at `path`, for directories created in
    /// the upper on the way to a copy-up.
    fn meta_at(&self, path: &[u8]) -> Meta {
        let tree = self.lower.tree();
        match tree.lookup_path(path).and_then(|ino| tree.get(ino)) {
            Some(node) => meta_of(&node),
            None => Meta {
                mode: 0o755,
                uid: 0,
                gid: 0,
                atime: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                mtime: Timespec {
                    tv_sec: 0,
                    tv_nsec: 0,
                },
                xattrs: Vec::new(),
            },
        }
    }

    /// Copies the directory `ino` up (not its children) and returns its path.
    fn prepare_dir(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let inode = self.inode(ino)?;
        if inode.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        self.copy_up(ino)?;
        self.path(ino)
    }

    /// Owner of a new entry: the caller, with the group of a setgid parent.
    fn owner_in(&self, parent: Ino, caller: Caller) -> Result<Owner, Errno> {
        let dir = self.getattr_locked(parent)?;
        let gid = if u32::from(dir.perm) & libc::S_ISGID != 0 {
            dir.gid
        } else {
            caller.gid
        };
        Ok(Owner {
            uid: caller.uid,
            gid,
        })
    }

    pub fn mkdir(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        caller: Caller,
    ) -> Result<Attr, Errno> {
        let (_ns, upper) = self.changing()?;
        let dir = self.prepare_dir(parent)?;
        let owner = self.owner_in(parent, caller)?;
        let parent_attr = self.getattr_locked(parent)?;
        let mut mode = mode & 0o7777;
        if u32::from(parent_attr.perm) & libc::S_ISGID != 0 {
            mode |= libc::S_ISGID;
        }
        upper.mkdir(&dir, name, mode, owner)?;
        self.lookup_locked(parent, name)
    }

    pub fn mknod(
        &self,
        parent: Ino,
        name: &[u8],
        mode: u32,
        rdev: u32,
        caller: Caller,
    ) -> Result<Attr, Errno> {
        let kind = match mode & libc::S_IFMT {
            libc::S_IFREG => {
                let (attr, fh) =
                    self.create(parent, name, mode, libc::O_WRONLY | libc::O_EXCL, caller)?;
                self.release(fh);
                return Ok(attr);
            }
            libc::S_IFIFO => SpecialKind::Fifo,
            libc::S_IFSOCK => SpecialKind::Socket,
            libc::S_IFCHR => SpecialKind::CharDevice {
                major: rustix::fs::major(u64::from(rdev)),
                minor: rustix::fs::minor(u64::from(rdev)),
            },
            libc::S_IFBLK => SpecialKind::BlockDevice {
                major: rustix::fs::major(u64::from(rdev)),
                minor: rustix::fs::minor(u64::from(rdev)),
            },
            _ => return Err(Errno::EINVAL),
        };
        let (_ns, upper) = self.changing()?;
        let dir = self.prepare_dir(parent)?;
        let owner = self.owner_in(parent, caller)?;
        upper.mknod(&dir, name, &kind, mode & 0o7777, owner)?;
        self.lookup_locked(parent, name)
    }

    pub fn symlink(
        &self,
        parent: Ino,
        name: &[u8],
        target: &[u8],
        caller: Caller,
    ) -> Result<Attr, Errno> {
        let (_ns, upper) = self.changing()?;
        let dir = self.prepare_dir(parent)?;
        let owner = self.owner_in(parent, caller)?;
        upper.symlink(&dir, name, target, owner)?;
        self.lookup_locked(parent, name)
    }

    pub fn link(&self, ino: Ino, new_parent: Ino, new_name: &[u8]) -> Result<Attr, Errno> {
        self.fetch_for_copy_up(ino, Contents::Whole);
        let (_ns, upper) = self.changing()?;
        self.copy_up(ino)?;
        let (dir, name) = self.parent_and_name(ino)?;
        let new_dir = self.prepare_dir(new_parent)?;
        upper.link(&dir, &name, &new_dir, new_name)?;
        self.lookup_locked(new_parent, new_name)
    }

    pub fn unlink(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        let (_ns, upper) = self.changing()?;
        let attr = self.lookup_locked(parent, name)?;
        if attr.kind == FileKind::Dir {
            return Err(Errno(libc::EISDIR));
        }
        self.remove_name(upper, parent, name)?;
        self.drop_name(attr.ino, parent, name);
        Ok(())
    }

    pub fn rmdir(&self, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        let (_ns, upper) = self.changing()?;
        let attr = self.lookup_locked(parent, name)?;
        if attr.kind != FileKind::Dir {
            return Err(Errno::ENOTDIR);
        }
        let dir = self.inode(attr.ino)?;
        if self.merged_listing(attr.ino, &dir)?.len() > 2 {
            return Err(Errno(libc::ENOTEMPTY));
        }
        self.remove_name(upper, parent, name)?;
        self.drop_name(attr.ino, parent, name);
        Ok(())
    }

    /// Removes a name of the merged view: a whiteout when the image has it
    /// (replacing any upper entry), a plain removal otherwise.
    fn remove_name(&self, upper: &Upper, parent: Ino, name: &[u8]) -> Result<(), Errno> {
        let dir_inode = self.inode(parent)?;
        let in_image = dir_inode
            .lower
            .and_then(|l| self.lower.tree().lookup(l, name))
            .is_some();
        let dir = self.prepare_dir(parent)?;
        if in_image {
            upper.whiteout(&dir, name)?;
        } else {
            match upper.find(&dir, name)? {
                Found::Entry(stat) if kind_of(&stat) == FileKind::Dir => {
                    upper.remove_all(&dir, name)?
                }
                Found::Entry(_) => upper.remove(&dir, name)?,
                Found::Missing | Found::Whiteout => {}
            }
        }
        Ok(())
    }

    pub fn rename(
        &self,
        parent: Ino,
        name: &[u8],
        new_parent: Ino,
        new_name: &[u8],
        flags: u32,
    ) -> Result<(), Errno> {
        let (_ns, upper) = self.changing()?;
        let flags = RenameFlags::from_bits_retain(flags);
        let exchange = flags.contains(RenameFlags::EXCHANGE);
        let source = self.lookup_locked(parent, name)?;
        let target = self.lookup_locked(new_parent, new_name).ok();
        if let Some(t) = &target {
            if flags.contains(RenameFlags::NOREPLACE) {
                return Err(Errno(libc::EEXIST));
            }
            if t.ino == source.ino {
                return Ok(());
            }
            if !exchange {
                self.check_replace(&source, t)?;
            }
        } else if exchange {
            return Err(Errno::ENOENT);
        }
        // The upper can only rename what it holds in full.
        self.copy_up_tree(source.ino)?;
        if let (true, Some(t)) = (exchange, &target) {
            self.copy_up_tree(t.ino)?;
        }
        let old_name_shows_image = self
            .inode(parent)?
            .lower
            .and_then(|l| self.lower.tree().lookup(l, name))
            .is_some();
        let from = self.prepare_dir(parent)?;
        let to = self.prepare_dir(new_parent)?;
        if !exchange {
            // Clear the way: a whiteout, or an (empty in the merged view)
            // upper directory holding only whiteouts.
            match upper.find(&to, new_name)? {
                Found::Whiteout => upper.remove(&to, new_name)?,
                Found::Entry(stat) if kind_of(&stat) == FileKind::Dir => {
                    upper.remove_all(&to, new_name)?
                }
                _ => {}
            }
        }
        let how = if exchange {
            RenameFlags::EXCHANGE
        } else {
            RenameFlags::empty()
        };
        upper.rename(&from, name, &to, new_name, how)?;
        // A moved directory must not merge with image entries at its new place.
        if source.kind == FileKind::Dir {
            upper.set_opaque(&join(&to, new_name))?;
        }
        match &target {
            Some(t) if exchange => {
                if t.kind == FileKind::Dir {
                    upper.set_opaque(&join(&from, name))?;
                }
                self.moved(t.ino, (new_parent, new_name), (parent, name));
            }
            Some(t) => self.drop_name(t.ino, new_parent, new_name),
            None => {}
        }
        if !exchange && old_name_shows_image {
            upper.whiteout(&from, name)?;
        }
        self.moved(source.ino, (parent, name), (new_parent, new_name));
        Ok(())
    }

    /// rename(2)'s rules for replacing an existing name.
    fn check_replace(&self, source: &Attr, target: &Attr) -> Result<(), Errno> {
        match (source.kind == FileKind::Dir, target.kind == FileKind::Dir) {
            (true, false) => Err(Errno::ENOTDIR),
            (false, true) => Err(Errno(libc::EISDIR)),
            (true, true) => {
                let dir = self.inode(target.ino)?;
                if self.merged_listing(target.ino, &dir)?.len() > 2 {
                    Err(Errno(libc::ENOTEMPTY))
                } else {
                    Ok(())
                }
            }
            (false, false) => Ok(()),
        }
    }

    /// `ino`'s name `from` became `to`.
    fn moved(&self, ino: Ino, from: (Ino, &[u8]), to: (Ino, &[u8])) {
        let mut state = self.state();
        if let Some(inode) = state.inodes.get_mut(&ino) {
            inode.names.retain(|(p, n)| !(*p == from.0 && n == from.1));
            inode.names.push((to.0, to.1.to_vec()));
            if inode.kind == FileKind::Dir {
                inode.lower = None; // opaque from now on
            }
        }
    }

    /// Copies an entry up with everything below it (for renaming image
    /// directories, which the upper can only do on a full copy).
    fn copy_up_tree(&self, ino: Ino) -> Result<(), Errno> {
        let mut pending = vec![ino];
        while let Some(ino) = pending.pop() {
            self.copy_up(ino)?;
            let inode = self.inode(ino)?;
            if inode.kind != FileKind::Dir {
                continue;
            }
            for child in self.merged_listing(ino, &inode)?.into_iter().skip(2) {
                pending.push(self.lookup_locked(ino, &child.name)?.ino);
            }
        }
        Ok(())
    }

    pub fn setattr(&self, ino: Ino, change: &SetAttr) -> Result<Attr, Errno> {
        let contents = if change.size == Some(0) {
            Contents::Emptied
        } else {
            Contents::Whole
        };
        self.fetch_for_copy_up(ino, contents);
        let (_ns, upper) = self.changing()?;
        if ino == ROOT {
            return Err(Errno(libc::EPERM));
        }
        self.copy_up_as(ino, contents)?;
        let (dir, name) = self.parent_and_name(ino)?;
        let stat = upper.setattr(&dir, &name, change)?;
        Ok(attr_of(ino, &stat))
    }

    // ----- xattrs ------------------------------------------------------------

    pub fn getxattr(&self, ino: Ino, key: &[u8]) -> Result<Vec<u8>, Errno> {
        let _ns = self.reading();
        let inode = self.inode(ino)?;
        match (&self.upper, inode.upper && ino != ROOT) {
            (Some(upper), true) => {
                let (dir, name) = self.parent_and_name(ino)?;
                Ok(upper.get_xattr(&dir, &name, key)?)
            }
            _ => self
                .lower
                .getxattr(inode.lower.unwrap_or(ROOT), key)
                .map(<[u8]>::to_vec),
        }
    }

    pub fn listxattr(&self, ino: Ino) -> Result<Vec<u8>, Errno> {
        let _ns = self.reading();
        let inode = self.inode(ino)?;
        match (&self.upper, inode.upper && ino != ROOT) {
            (Some(upper), true) => {
                let (dir, name) = self.parent_and_name(ino)?;
                let mut out = Vec::new();
                for key in upper.list_xattr(&dir, &name)? {
                    out.extend_from_slice(&key);
                    out.push(0);
                }
                Ok(out)
            }
            _ => self.lower.listxattr(inode.lower.unwrap_or(ROOT)),
        }
    }

    pub fn setxattr(&self, ino: Ino, key: &[u8], value: &[u8], flags: i32) -> Result<(), Errno> {
        self.fetch_for_copy_up(ino, Contents::Whole);
        let (_ns, upper) = self.changing()?;
        if ino == ROOT {
            return Err(Errno(libc::EPERM));
        }
        self.copy_up(ino)?;
        let (dir, name) = self.parent_and_name(ino)?;
        let flags = rustix::fs::XattrFlags::from_bits_retain(flags as u32);
        Ok(upper.set_xattr(&dir, &name, key, value, flags)?)
    }

    pub fn removexattr(&self, ino: Ino, key: &[u8]) -> Result<(), Errno> {
        self.fetch_for_copy_up(ino, Contents::Whole);
        let (_ns, upper) = self.changing()?;
        if ino == ROOT {
            return Err(Errno(libc::EPERM));
        }
        self.copy_up(ino)?;
        let (dir, name) = self.parent_and_name(ino)?;
        Ok(upper.remove_xattr(&dir, &name, key)?)
    }

    pub fn statfs(&self) -> StatFs {
        self.lower.statfs().clone()
    }
}

/// The flags of a FUSE open that make sense on the upper file.
fn open_flags(flags: i32) -> OFlags {
    OFlags::from_bits_retain(flags as u32) & !(OFlags::CREATE | OFlags::EXCL | OFlags::NOCTTY)
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    if dir.is_empty() {
        return name.to_vec();
    }
    let mut out = Vec::with_capacity(dir.len() + 1 + name.len());
    out.extend_from_slice(dir);
    out.push(b'/');
    out.extend_from_slice(name);
    out
}

fn split(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (&[], path),
    }
}

fn meta_of(node: &Node) -> Meta {
    let time = Timespec {
        tv_sec: node.meta.mtime,
        tv_nsec: i64::from(node.meta.mtime_nsec),
    };
    Meta {
        mode: node.meta.mode,
        uid: node.meta.uid,
        gid: node.meta.gid,
        atime: time,
        mtime: time,
        xattrs: node
            .meta
            .xattrs
            .iter()
            .map(|(k, v)| (k.to_vec(), v.to_vec()))
            .collect(),
    }
}

fn kind_of(stat: &Stat) -> FileKind {
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::Directory => FileKind::Dir,
        FileType::Symlink => FileKind::Symlink,
        FileType::CharacterDevice => FileKind::CharDevice,
        FileType::BlockDevice => FileKind::BlockDevice,
        FileType::Fifo => FileKind::Fifo,
        FileType::Socket => FileKind::Socket,
        _ => FileKind::File,
    }
}

fn attr_of(ino: Ino, stat: &Stat) -> Attr {
    Attr {
        ino,
        kind: kind_of(stat),
        perm: (stat.st_mode & 0o7777) as u16,
        nlink: stat.st_nlink as u32,
        uid: stat.st_uid,
        gid: stat.st_gid,
        size: stat.st_size as u64,
        blocks: stat.st_blocks as u64,
        rdev: stat.st_rdev as u32,
        mtime: stat.st_mtime,
        mtime_nsec: stat.st_mtime_nsec as u32,
        atime: stat.st_atime,
        atime_nsec: stat.st_atime_nsec as u32,
        ctime: stat.st_ctime,
        ctime_nsec: stat.st_ctime_nsec as u32,
    }
}

/// `SetTime` from a FUSE time argument.
pub fn set_time(now: bool, secs: i64, nsec: u32) -> SetTime {
    if now {
        SetTime::Now
    } else {
        SetTime::At(Timespec {
            tv_sec: secs,
            tv_nsec: i64::from(nsec),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::layer::{
        Access, BlobSource, Entry, EntryKind, FileData, INDEX_VERSION, Index, LayerReader,
        SourceError,
    };
    use crate::union::Tree;

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
            mtime: 1_700_000_000,
            ..Entry::plain(path, kind)
        }
    }

    fn file(path: &str, offset: u64, size: u64) -> Entry {
        entry(
            path,
            EntryKind::File {
                size,
                data: FileData::Contiguous { offset },
            },
        )
    }

    /// `d/a` and `d/b` are one file; `d/sub/c`, `f` and `g` plain files.
    fn overlay(upper: &std::path::Path) -> OverlayFs {
        let stream = b"hello world".to_vec();
        let index = Arc::new(Index {
            version: INDEX_VERSION,
            layer_digest: Digest::of(&stream),
            blob_size: stream.len() as u64,
            stream_size: stream.len() as u64,
            entries: vec![
                entry("d", EntryKind::Dir),
                file("d/a", 0, 5),
                entry(
                    "d/b",
                    EntryKind::Hardlink {
                        target: b"d/a".to_vec(),
                    },
                ),
                file("d/sub/c", 6, 5),
                file("f", 0, 5),
                file("g", 6, 5),
            ],
            block_digests: vec![],
            access: Access::Tar,
        });
        let reader = LayerReader::new(index.clone(), Arc::new(Bytes(stream)));
        let image = ImageFs::new(Tree::build(&[index]), vec![reader]);
        let upper = Upper::open(upper).expect("upper");
        OverlayFs::new(image, Some(upper)).expect("overlay")
    }

    fn records(fs: &OverlayFs) -> usize {
        fs.state().inodes.len()
    }

    #[test]
    fn image_lookups_are_not_recorded_until_something_changes() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = overlay(&dir.path().join("upper"));
        let d = fs.lookup(ROOT, b"d").expect("d");
        let sub = fs.lookup(d.ino, b"sub").expect("sub");
        let c = fs.lookup(sub.ino, b"c").expect("c");
        assert_eq!(fs.lookup(ROOT, b"f").expect("f").size, 5);
        assert_eq!(records(&fs), 1, "only the root");
        // A hardlink's names are recorded, so a copy-up knows them all.
        let a = fs.lookup(d.ino, b"a").expect("a");
        assert_eq!(fs.lookup(d.ino, b"b").expect("b").ino, a.ino);
        assert_eq!(records(&fs), 2);

        // Writing deep in the image copies the chain up under the same numbers.
        let (fh, _) = fs.open(c.ino, libc::O_WRONLY).expect("open c");
        fs.write(fh, 0, b"HE").expect("write");
        fs.release(fh);
        assert_eq!(fs.lookup(sub.ino, b"c").expect("c again").ino, c.ino);
        assert_eq!(fs.lookup(d.ino, b"sub").expect("sub again").ino, sub.ino);
        let (fh, _) = fs.open(c.ino, libc::O_RDONLY).expect("reopen c");
        assert_eq!(fs.read(c.ino, fh, 0, 100).expect("read"), b"HErld");
        fs.release(fh);

        // The copy of a hardlinked file is linked under its other name.
        let (fh, _) = fs.open(a.ino, libc::O_WRONLY).expect("open a");
        fs.write(fh, 0, b"J").expect("write a");
        fs.release(fh);
        let b = fs.lookup(d.ino, b"b").expect("b after");
        let (fh, _) = fs.open(b.ino, libc::O_RDONLY).expect("open b");
        assert_eq!(fs.read(b.ino, fh, 0, 100).expect("read b"), b"Jello");
        fs.release(fh);
    }

    #[test]
    fn an_unlinked_image_entry_stays_gone_for_whoever_still_holds_it() {
        let dir = tempfile::tempdir().expect("tempdir");
        let fs = overlay(&dir.path().join("upper"));
        let g = fs.lookup(ROOT, b"g").expect("g");
        fs.unlink(ROOT, b"g").expect("unlink");
        assert_eq!(fs.lookup(ROOT, b"g"), Err(Errno::ENOENT));
        // The kernel may still hold the inode (an open file): it keeps its
        // image attributes and data...
        assert_eq!(fs.getattr(g.ino).expect("getattr").size, 5);
        assert_eq!(fs.read(g.ino, 0, 0, 100).expect("read"), b"world");
        // ...and a change through it must not bring the name back.
        let chmod = SetAttr {
            mode: Some(0o600),
            uid: None,
            gid: None,
            size: None,
            atime: None,
            mtime: None,
        };
        let _ = fs.setattr(g.ino, &chmod);
        assert_eq!(fs.lookup(ROOT, b"g"), Err(Errno::ENOENT));
        let names: Vec<Vec<u8>> = fs
            .merged_listing(ROOT, &fs.inode(ROOT).expect("root"))
            .expect("listing")
            .into_iter()
            .map(|l| l.name)
            .collect();
        assert_eq!(names, [&b"."[..], b"..", b"d", b"f"]);
    }
}
