//! The writable upper directory of a mount, in kernel overlayfs format.
//!
//! Every change a mount makes lands here: copied-up files, new entries, whiteouts (character
//! device 0/0) and opaque directories (`trusted.overlay.opaque=y` as root, `user.overlay.opaque`
//! otherwise), so kernel overlayfs can mount the same upper over the extracted layers.
//!
//! Confinement is the point of this module. The upper root is opened once; every directory below
//! it is reached with `openat2(RESOLVE_BENEATH | RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)`,
//! and final components are only touched by `*at` calls that never follow symlinks, so a symlink
//! in an image (`-> /etc`, `-> ../../..`) can never steer a write outside the upper.
//!
//! Metadata of an existing entry (mode, xattrs, truncation) is changed through
//! `/proc/self/fd/N` of an `O_PATH | O_NOFOLLOW` descriptor: that reaches a symlink itself (where
//! `f*xattr` cannot), never opens a device or blocks on a fifo, and names exactly the inode that
//! was resolved. `Upper::open` checks that `/proc` is procfs.
//!
//! Nothing appears half-made under a name: entries are built as an `O_TMPFILE` or under a
//! temporary name starting with [`TEMP_PREFIX`] (hidden from listings) and linked or renamed into
//! place. Callers serialize changes to one name; concurrent calls on different names are safe.

use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};
use std::path::Path;
use std::sync::atomic::{AtomicU64, Ordering};

use rustix::fs::{
    self as rfs, AtFlags, FileType, Gid, Mode, OFlags, RenameFlags, ResolveFlags, Stat, Timespec,
    Timestamps, Uid, XattrFlags,
};
use rustix::io::{self as rio, Errno};

/// Copy-up moves file content in pieces of this size.
const COPY_CHUNK: usize = 1 << 20;
/// Bytes of path resolved per `openat2` call, well under `PATH_MAX` (4096).
const WALK_CHUNK: usize = 2048;
/// Temporary entries start with this; listings and `walk` hide them.
pub const TEMP_PREFIX: &[u8] = b".imgfs~tmp~";
/// Mode of the upper root when `open` creates it.
const ROOT_DIR_MODE: u32 = 0o755;
/// Mode of temporary files and directories until their real mode is applied.
const TEMP_MODE: u32 = 0o600;
const TEMP_DIR_MODE: u32 = 0o700;
/// Attempts at a fresh temporary name before giving up with EEXIST.
const TEMP_TRIES: u32 = 64;
/// Attempts at reading an xattr whose size keeps changing under us.
const XATTR_TRIES: usize = 4;
const PERM_BITS: u32 = 0o7777;
const OPAQUE_VALUE: &[u8] = b"y";
/// overlayfs's private xattrs: never copied up, listed, read or set through this API.
const PRIVATE_XATTR_PREFIXES: [&[u8]; 2] = [b"trusted.overlay.", b"user.overlay."];
const USER_XATTR_PREFIX: &[u8] = b"user.";
const DIR_FLAGS: OFlags = OFlags::RDONLY
    .union(OFlags::DIRECTORY)
    .union(OFlags::CLOEXEC);
/// Open flags a caller may pass through `open_file`; creation and resolution flags are ours.
const PASS_FLAGS: OFlags = OFlags::from_bits_retain(
    OFlags::RWMODE.bits()
        | OFlags::APPEND.bits()
        | OFlags::TRUNC.bits()
        | OFlags::SYNC.bits()
        | OFlags::DSYNC.bits()
        | OFlags::DIRECT.bits()
        | OFlags::NOATIME.bits()
        | OFlags::NONBLOCK.bits(),
);

fn resolve_flags() -> ResolveFlags {
    ResolveFlags::BENEATH | ResolveFlags::NO_SYMLINKS | ResolveFlags::NO_MAGICLINKS
}

/// A failed upper operation: what, where (path inside the upper), and the errno to answer.
#[derive(Debug, thiserror::Error)]
#[error("upper dir: {op} `{}`: {errno}", String::from_utf8_lossy(.path))]
pub struct UpperError {
    op: &'static str,
    path: Vec<u8>,
    errno: Errno,
}

impl UpperError {
    fn new(op: &'static str, dir: &[u8], name: &[u8], errno: Errno) -> Self {
        Self {
            op,
            path: join(dir, name),
            errno,
        }
    }
    /// The raw errno, ready for a FUSE reply.
    pub fn errno(&self) -> i32 {
        self.errno.raw_os_error()
    }
    /// The path inside the upper the operation was about.
    pub fn path(&self) -> &[u8] {
        &self.path
    }
}

type Result<T> = std::result::Result<T, UpperError>;

/// Copy-up's source of content: `read(offset, len)` returns up to `len` bytes at `offset`.
pub type ReadFn<'a> = dyn FnMut(u64, usize) -> std::io::Result<Vec<u8>> + 'a;

/// What the upper holds under a name.
#[derive(Debug, Clone, Copy)]
pub enum Found {
    Missing,
    /// A character device 0/0: the name is deleted from the lower layers.
    Whiteout,
    Entry(Stat),
}

/// Full metadata of a copied-up entry (taken from the lower view by the caller).
#[derive(Debug, Clone)]
pub struct Meta {
    /// Permission bits including setuid/setgid/sticky; the file type bits are ignored.
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
    pub atime: Timespec,
    pub mtime: Timespec,
    pub xattrs: Vec<(Vec<u8>, Vec<u8>)>,
}

/// Owner of a newly created entry (the FUSE caller's uid/gid).
#[derive(Debug, Clone, Copy)]
pub struct Owner {
    pub uid: u32,
    pub gid: u32,
}

/// A non-regular, non-directory entry.
#[derive(Debug, Clone)]
pub enum SpecialKind {
    Symlink(Vec<u8>),
    CharDevice {
        major: u32,
        minor: u32,
    },
    BlockDevice {
        major: u32,
        minor: u32,
    },
    Fifo,
    /// A Unix socket's name (what `bind` creates).
    Socket,
}

/// A time for `setattr`.
#[derive(Debug, Clone, Copy)]
pub enum SetTime {
    Now,
    At(Timespec),
}

/// The changes of a FUSE `setattr`; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct SetAttr {
    pub mode: Option<u32>,
    pub uid: Option<u32>,
    pub gid: Option<u32>,
    pub size: Option<u64>,
    pub atime: Option<SetTime>,
    pub mtime: Option<SetTime>,
}

/// The upper directory of one mount. All paths are relative to its root.
pub struct Upper {
    root: OwnedFd,
    root_ns: bool,
    opaque_key: &'static str,
    next_temp: AtomicU64,
}

impl Upper {
    /// Opens (creating it 0755 if missing) the upper directory at `dir`.
    pub fn open(dir: &Path) -> Result<Upper> {
        let fail = |op, e| UpperError::new(op, dir.as_os_str().as_encoded_bytes(), b"", e);
        match rfs::mkdir(dir, Mode::from_raw_mode(ROOT_DIR_MODE)) {
            Ok(()) | Err(Errno::EXIST) => {}
            Err(e) => return Err(fail("create", e)),
        }
        let root = rfs::open(dir, DIR_FLAGS, Mode::empty()).map_err(|e| fail("open", e))?;
        // Metadata changes go through /proc/self/fd; anything else mounted there would be obeyed.
        let proc = rfs::statfs("/proc/self/fd").map_err(|e| fail("statfs /proc/self/fd", e))?;
        if proc.f_type != rfs::PROC_SUPER_MAGIC {
            return Err(fail("check /proc is procfs", Errno::NOTSUP));
        }
        let root_ns = rustix::process::geteuid().is_root();
        let opaque_key = if root_ns {
            "trusted.overlay.opaque"
        } else {
            "user.overlay.opaque"
        };
        Ok(Upper {
            root,
            root_ns,
            opaque_key,
            next_temp: AtomicU64::new(0),
        })
    }

    /// The upper root directory's attributes.
    pub fn stat_root(&self) -> Result<Stat> {
        rfs::fstat(&self.root).map_err(|e| UpperError::new("stat", b"", b"", e))
    }

    /// Gives a new, empty upper root the image root's owner, mode, times and
    /// xattrs (what overlayfs shows for a merged root is the upper's), so a
    /// fresh writable mount shows the image's root as it is. An upper root
    /// that already holds entries keeps its own.
    pub fn adopt_root_meta(&self, meta: &Meta) -> Result<()> {
        let empty = self.list(b"")?.is_empty();
        if !empty {
            return Ok(());
        }
        self.apply_meta(self.root.as_fd(), meta)
            .map_err(|e| UpperError::new("set root attributes", b"", b"", e))
    }

    /// True when overlay xattrs live in `trusted.*` (running as root), false for `user.*`.
    pub fn is_root_namespace(&self) -> bool {
        self.root_ns
    }

    /// An existing directory of the upper (`b""` is the root), opened read-only.
    pub fn dir(&self, path: &[u8]) -> Result<OwnedFd> {
        self.open_dir(path)
            .map_err(|e| UpperError::new("open dir", path, b"", e))
    }

    pub fn find(&self, dir: &[u8], name: &[u8]) -> Result<Found> {
        let fail = |e| UpperError::new("lookup", dir, name, e);
        check_name(name).map_err(fail)?;
        match self.open_dir(dir) {
            Ok(dfd) => found_at(dfd.as_fd(), name).map_err(fail),
            // No upper directory means no upper entry below it.
            Err(Errno::NOENT) => Ok(Found::Missing),
            Err(e) => Err(fail(e)),
        }
    }

    pub fn stat(&self, dir: &[u8], name: &[u8]) -> Result<Stat> {
        self.at("stat", dir, name, |dfd| {
            rfs::statat(dfd, name, AtFlags::SYMLINK_NOFOLLOW)
        })
    }

    /// The entries of an upper directory (whiteouts included), sorted by name.
    pub fn list(&self, dir: &[u8]) -> Result<Vec<(Vec<u8>, Found)>> {
        let run = || -> rio::Result<Vec<(Vec<u8>, Found)>> {
            let dfd = self.open_dir(dir)?;
            let names = read_names(dfd.as_fd(), false)?;
            let found = |n: Vec<u8>| found_at(dfd.as_fd(), &n).map(|f| (n, f));
            names.into_iter().map(found).collect()
        };
        run().map_err(|e| UpperError::new("list", dir, b"", e))
    }

    pub fn is_opaque(&self, dir: &[u8]) -> Result<bool> {
        let run = || dir_is_opaque(self.open_dir(dir)?.as_fd(), self.opaque_key);
        run().map_err(|e| UpperError::new("read opaque", dir, b"", e))
    }

    pub fn set_opaque(&self, dir: &[u8]) -> Result<()> {
        let run = || {
            let dfd = self.open_dir(dir)?;
            rfs::fsetxattr(dfd, self.opaque_key, OPAQUE_VALUE, XattrFlags::empty())
        };
        run().map_err(|e| UpperError::new("set opaque", dir, b"", e))
    }

    /// Creates the directory chain `path` as needed, each new component built with
    /// `meta(prefix)` under a temporary name and renamed into place; existing upper
    /// directories are kept. The times of directories created here survive the creation of
    /// their children in this call (later changes inside them are the caller's business).
    pub fn ensure_dirs(&self, path: &[u8], meta: &dyn Fn(&[u8]) -> Meta) -> Result<OwnedFd> {
        let fail = |prefix: &[u8], e| UpperError::new("create dir", prefix, b"", e);
        let parts = split_path(path).map_err(|e| fail(path, e))?;
        let mut cur = self.open_dir(b"").map_err(|e| fail(b"", e))?;
        let mut cur_meta: Option<Meta> = None;
        let mut end = 0;
        for part in parts {
            end += part.len() + usize::from(end > 0);
            let prefix = &path[..end];
            let (next, created) = match open_child_dir(cur.as_fd(), part) {
                Ok(fd) => (fd, None),
                Err(Errno::NOENT) => {
                    let m = meta(prefix);
                    let fd = self
                        .create_dir(cur.as_fd(), part, &m)
                        .map_err(|e| fail(prefix, e))?;
                    if let Some(pm) = &cur_meta {
                        set_times(cur.as_fd(), pm.atime, pm.mtime).map_err(|e| fail(prefix, e))?;
                    }
                    (fd, Some(m))
                }
                Err(e) => return Err(fail(prefix, e)),
            };
            cur = next;
            cur_meta = created;
        }
        Ok(cur)
    }

    /// Makes `name` a whiteout, atomically replacing whatever is there (a directory is
    /// exchanged with the whiteout, then removed).
    pub fn whiteout(&self, dir: &[u8], name: &[u8]) -> Result<()> {
        let tmp = self.at("whiteout", dir, name, |dfd| {
            let dev = rfs::makedev(0, 0);
            let mk = |t: &[u8]| rfs::mknodat(dfd, t, FileType::CharacterDevice, Mode::empty(), dev);
            let ((), tmp) = self.with_temp(mk)?;
            match rfs::renameat_with(dfd, &tmp, dfd, name, RenameFlags::NOREPLACE) {
                Ok(()) => Ok(None),
                Err(Errno::EXIST) => {
                    rfs::renameat_with(dfd, &tmp, dfd, name, RenameFlags::EXCHANGE)
                        .map(|()| Some(tmp.clone()))
                }
                Err(e) => Err(e),
            }
            .inspect_err(|_| discard(dfd, &tmp))
        })?;
        // What the whiteout replaced now sits under the temporary name.
        match tmp {
            Some(tmp) => self.remove_all(dir, &tmp),
            None => Ok(()),
        }
    }

    /// Unlinks a file or whiteout, or removes an empty directory.
    pub fn remove(&self, dir: &[u8], name: &[u8]) -> Result<()> {
        self.at("remove", dir, name, |dfd| unlink_any(dfd, name))
    }

    /// Removes `name` and everything below it (e.g. a directory holding only whiteouts).
    /// Iterative, holding no descriptor across levels, so depth and path length are unbounded.
    pub fn remove_all(&self, dir: &[u8], name: &[u8]) -> Result<()> {
        self.dir_for("remove", dir, name)?;
        let mut stack = vec![(join(dir, name), false)];
        while let Some((path, emptied)) = stack.pop() {
            let (parent, last) = split_last(&path);
            let fail = |e| UpperError::new("remove", parent, last, e);
            let pfd = self.open_dir(parent).map_err(fail)?;
            if emptied {
                rfs::unlinkat(&pfd, last, AtFlags::REMOVEDIR).map_err(fail)?;
                continue;
            }
            match rfs::unlinkat(&pfd, last, AtFlags::empty()) {
                Err(Errno::ISDIR) => {}
                r => {
                    r.map_err(fail)?;
                    continue;
                }
            }
            let dfd = open_child_dir(pfd.as_fd(), last).map_err(fail)?;
            stack.push((path.clone(), true));
            for child in read_names(dfd.as_fd(), true).map_err(fail)? {
                match rfs::unlinkat(&dfd, &child, AtFlags::empty()) {
                    Err(Errno::ISDIR) => stack.push((join(&path, &child), false)),
                    r => r.map_err(|e| UpperError::new("remove", &path, &child, e))?,
                }
            }
        }
        Ok(())
    }

    /// Atomic copy-up of a regular file of `size` bytes read through `read(offset, len)`.
    /// The name must be free or a whiteout; all-zero pieces are left as holes.
    pub fn copy_up_file(
        &self,
        dir: &[u8],
        name: &[u8],
        meta: &Meta,
        size: u64,
        read: &mut ReadFn<'_>,
    ) -> Result<()> {
        self.at("copy up", dir, name, |dfd| {
            let tmpfile = OFlags::TMPFILE | OFlags::RDWR | OFlags::CLOEXEC;
            match rfs::openat(dfd, ".", tmpfile, Mode::from_raw_mode(TEMP_MODE)) {
                Ok(fd) => {
                    self.fill(fd.as_fd(), meta, size, read)?;
                    self.link_tmpfile(dfd, fd.as_fd(), name)
                }
                // No O_TMPFILE on this filesystem (old kernels answer EISDIR).
                Err(Errno::OPNOTSUPP | Errno::ISDIR | Errno::INVAL) => {
                    self.copy_up_named(dfd, name, meta, size, read)
                }
                Err(e) => Err(e),
            }
        })
    }

    /// Copy-up of a symlink, device or fifo, with owner, mode, times and xattrs.
    pub fn copy_up_special(
        &self,
        dir: &[u8],
        name: &[u8],
        kind: &SpecialKind,
        meta: &Meta,
    ) -> Result<()> {
        self.at("copy up", dir, name, |dfd| {
            let create = |t: &[u8]| make_special(dfd, t, kind);
            let finish = |t: &[u8], ()| self.apply_meta(open_node(dfd, t)?.as_fd(), meta);
            self.place(dfd, name, true, create, finish).map(drop)
        })
    }

    /// Opens an upper regular file for I/O with `flags` (access mode, append, trunc, sync...).
    /// With `create`, a missing or whited-out name becomes a new file (EEXIST under
    /// `O_EXCL` if a real entry exists). Never follows a symlink, never opens a device.
    pub fn open_file(
        &self,
        dir: &[u8],
        name: &[u8],
        flags: OFlags,
        create: Option<(u32, Owner)>,
    ) -> Result<OwnedFd> {
        let access = (flags & PASS_FLAGS) | OFlags::CLOEXEC;
        self.at("open", dir, name, |dfd| {
            if let Some((mode, owner)) = create {
                match found_at(dfd, name)? {
                    Found::Entry(_) if flags.contains(OFlags::EXCL) => return Err(Errno::EXIST),
                    Found::Entry(_) => {}
                    Found::Missing | Found::Whiteout => {
                        match self.create_file(dfd, name, access, mode, owner) {
                            Err(Errno::EXIST) if !flags.contains(OFlags::EXCL) => {}
                            r => return r,
                        }
                    }
                }
            }
            let node = open_node(dfd, name)?;
            let st = rfs::fstat(&node)?;
            match FileType::from_raw_mode(st.st_mode) {
                FileType::RegularFile => rfs::open(proc_path(node.as_fd()), access, Mode::empty()),
                FileType::Directory => Err(Errno::ISDIR),
                FileType::Symlink => Err(Errno::LOOP),
                _ => Err(Errno::INVAL),
            }
        })
    }

    /// Creates a directory; over a whiteout it is made opaque so lower children stay hidden.
    pub fn mkdir(&self, dir: &[u8], name: &[u8], mode: u32, owner: Owner) -> Result<Stat> {
        self.at("mkdir", dir, name, |dfd| {
            let opaque = matches!(found_at(dfd, name)?, Found::Whiteout);
            let create = |t: &[u8]| rfs::mkdirat(dfd, t, Mode::from_raw_mode(TEMP_DIR_MODE));
            let finish = |t: &[u8], ()| {
                let fd = open_child_dir(dfd, t)?;
                set_owner(fd.as_fd(), owner.uid, owner.gid)?;
                set_mode(fd.as_fd(), mode)?;
                if opaque {
                    rfs::fsetxattr(&fd, self.opaque_key, OPAQUE_VALUE, XattrFlags::empty())?;
                }
                Ok(())
            };
            self.place(dfd, name, true, create, finish)
        })
    }

    /// Creates a symlink, device or fifo (a whiteout may be replaced). A char device 0/0 is
    /// refused with EINVAL: in the upper it would read as a whiteout.
    pub fn mknod(
        &self,
        dir: &[u8],
        name: &[u8],
        kind: &SpecialKind,
        mode: u32,
        owner: Owner,
    ) -> Result<Stat> {
        self.at("mknod", dir, name, |dfd| {
            let create = |t: &[u8]| make_special(dfd, t, kind);
            let finish = |t: &[u8], ()| {
                let node = open_node(dfd, t)?;
                set_owner(node.as_fd(), owner.uid, owner.gid)?;
                match kind {
                    SpecialKind::Symlink(_) => Ok(()),
                    _ => set_mode(node.as_fd(), mode),
                }
            };
            self.place(dfd, name, true, create, finish)
        })
    }

    pub fn symlink(&self, dir: &[u8], name: &[u8], target: &[u8], owner: Owner) -> Result<Stat> {
        self.mknod(dir, name, &SpecialKind::Symlink(target.to_vec()), 0, owner)
    }

    /// Hard-links `old_dir/old_name` (never following a symlink) as `new_dir/new_name`.
    pub fn link(
        &self,
        old_dir: &[u8],
        old_name: &[u8],
        new_dir: &[u8],
        new_name: &[u8],
    ) -> Result<Stat> {
        let ofd = self.dir_for("link", old_dir, old_name)?;
        self.at("link", new_dir, new_name, |nfd| {
            let create = |t: &[u8]| rfs::linkat(&ofd, old_name, nfd, t, AtFlags::empty());
            self.place(nfd, new_name, true, create, |_, ()| Ok(()))
        })
    }

    /// `renameat2` with `flags` (`NOREPLACE`, `EXCHANGE`, `WHITEOUT`).
    pub fn rename(
        &self,
        old_dir: &[u8],
        old_name: &[u8],
        new_dir: &[u8],
        new_name: &[u8],
        flags: RenameFlags,
    ) -> Result<()> {
        let ofd = self.dir_for("rename", old_dir, old_name)?;
        self.at("rename", new_dir, new_name, |nfd| {
            rfs::renameat_with(&ofd, old_name, nfd, new_name, flags)
        })
    }

    /// Applies a FUSE setattr: size, then owner, then mode (so a requested setuid survives
    /// the chown), then times. Mode is ignored on symlinks.
    pub fn setattr(&self, dir: &[u8], name: &[u8], attr: &SetAttr) -> Result<Stat> {
        self.at("setattr", dir, name, |dfd| {
            let node = open_node(dfd, name)?;
            let kind = FileType::from_raw_mode(rfs::fstat(&node)?.st_mode);
            if let Some(size) = attr.size {
                match kind {
                    FileType::RegularFile => {}
                    FileType::Directory => return Err(Errno::ISDIR),
                    _ => return Err(Errno::INVAL),
                }
                let file = rfs::open(proc_path(node.as_fd()), OFlags::WRONLY, Mode::empty())?;
                rfs::ftruncate(file, size)?;
            }
            if attr.uid.is_some() || attr.gid.is_some() {
                let keep = u32::MAX;
                set_owner(
                    node.as_fd(),
                    attr.uid.unwrap_or(keep),
                    attr.gid.unwrap_or(keep),
                )?;
            }
            if let (Some(mode), false) = (attr.mode, kind == FileType::Symlink) {
                set_mode(node.as_fd(), mode)?;
            }
            if attr.atime.is_some() || attr.mtime.is_some() {
                let times = Timestamps {
                    last_access: set_time(attr.atime),
                    last_modification: set_time(attr.mtime),
                };
                let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
                rfs::utimensat(&node, "", &times, flags)?;
            }
            rfs::fstat(&node)
        })
    }

    /// Reads one xattr; overlayfs's private ones read as absent (ENODATA).
    pub fn get_xattr(&self, dir: &[u8], name: &[u8], key: &[u8]) -> Result<Vec<u8>> {
        self.at("get xattr", dir, name, |dfd| {
            if is_private_xattr(key) {
                return Err(Errno::NODATA);
            }
            get_xattr(&proc_path(open_node(dfd, name)?.as_fd()), key)
        })
    }

    /// Lists xattr names, without overlayfs's private ones.
    pub fn list_xattr(&self, dir: &[u8], name: &[u8]) -> Result<Vec<Vec<u8>>> {
        self.at("list xattrs", dir, name, |dfd| {
            let all = list_xattr(&proc_path(open_node(dfd, name)?.as_fd()))?;
            Ok(all.into_iter().filter(|k| !is_private_xattr(k)).collect())
        })
    }

    /// Sets one xattr; overlayfs's private ones are refused with EPERM.
    pub fn set_xattr(
        &self,
        dir: &[u8],
        name: &[u8],
        key: &[u8],
        value: &[u8],
        flags: XattrFlags,
    ) -> Result<()> {
        self.at("set xattr", dir, name, |dfd| {
            if is_private_xattr(key) {
                return Err(Errno::PERM);
            }
            rfs::setxattr(proc_path(open_node(dfd, name)?.as_fd()), key, value, flags)
        })
    }

    pub fn remove_xattr(&self, dir: &[u8], name: &[u8], key: &[u8]) -> Result<()> {
        self.at("remove xattr", dir, name, |dfd| {
            if is_private_xattr(key) {
                return Err(Errno::PERM);
            }
            rfs::removexattr(proc_path(open_node(dfd, name)?.as_fd()), key)
        })
    }

    /// Every entry of the upper with its path, sorted: files, whiteouts, symlinks, devices
    /// and directories (with their opaque flag; the root itself is not listed). For `imgfs diff`.
    pub fn walk(&self) -> Result<Vec<(Vec<u8>, Found, bool)>> {
        let mut out = Vec::new();
        let mut dirs = vec![Vec::new()];
        while let Some(path) = dirs.pop() {
            let fail = |e| UpperError::new("walk", &path, b"", e);
            let dfd = self.open_dir(&path).map_err(fail)?;
            for child in read_names(dfd.as_fd(), false).map_err(fail)? {
                let child_path = join(&path, &child);
                let fail = |e| UpperError::new("walk", &child_path, b"", e);
                let found = found_at(dfd.as_fd(), &child).map_err(fail)?;
                let is_dir = matches!(found, Found::Entry(st)
                    if FileType::from_raw_mode(st.st_mode) == FileType::Directory);
                let opaque = is_dir
                    && dir_is_opaque(
                        open_child_dir(dfd.as_fd(), &child).map_err(fail)?.as_fd(),
                        self.opaque_key,
                    )
                    .map_err(fail)?;
                if is_dir {
                    dirs.push(child_path.clone());
                }
                out.push((child_path, found, opaque));
            }
        }
        out.sort_by(|a, b| a.0.cmp(&b.0));
        Ok(out)
    }

    // ---- internals ----

    /// Validates `name`, opens `dir`, runs `f` on it, and labels any error with the location.
    fn at<T>(
        &self,
        op: &'static str,
        dir: &[u8],
        name: &[u8],
        f: impl FnOnce(BorrowedFd<'_>) -> rio::Result<T>,
    ) -> Result<T> {
        let dfd = self.dir_for(op, dir, name)?;
        f(dfd.as_fd()).map_err(|e| UpperError::new(op, dir, name, e))
    }

    /// Validates `name` and opens `dir`, the start of every (dir, name) operation.
    fn dir_for(&self, op: &'static str, dir: &[u8], name: &[u8]) -> Result<OwnedFd> {
        check_name(name)
            .and_then(|()| self.open_dir(dir))
            .map_err(|e| UpperError::new(op, dir, name, e))
    }

    /// Resolves a directory path in chunks below `PATH_MAX`, each confined beneath the last.
    fn open_dir(&self, path: &[u8]) -> rio::Result<OwnedFd> {
        let parts = split_path(path)?;
        let mut cur: Option<OwnedFd> = None;
        for chunk in chunk_parts(&parts) {
            let base = cur.as_ref().map_or(self.root.as_fd(), |fd| fd.as_fd());
            cur = Some(open_child_dir(base, &chunk)?);
        }
        match cur {
            Some(fd) => Ok(fd),
            None => open_child_dir(self.root.as_fd(), b"."),
        }
    }

    /// Runs `create` under fresh temporary names until one is free.
    fn with_temp<T>(
        &self,
        mut create: impl FnMut(&[u8]) -> rio::Result<T>,
    ) -> rio::Result<(T, Vec<u8>)> {
        for _ in 0..TEMP_TRIES {
            let n = self.next_temp.fetch_add(1, Ordering::Relaxed);
            let mut name = TEMP_PREFIX.to_vec();
            name.extend_from_slice(format!("{}.{n}", std::process::id()).as_bytes());
            match create(&name) {
                Err(Errno::EXIST) => continue,
                r => return r.map(|t| (t, name)),
            }
        }
        Err(Errno::EXIST)
    }

    /// Builds an entry under a temporary name with `create`, completes it with `finish`,
    /// then moves it to `name` (replacing only a whiteout when `over_whiteout`).
    fn place<T>(
        &self,
        dfd: BorrowedFd<'_>,
        name: &[u8],
        over_whiteout: bool,
        create: impl FnMut(&[u8]) -> rio::Result<T>,
        finish: impl FnOnce(&[u8], T) -> rio::Result<()>,
    ) -> rio::Result<Stat> {
        let (made, tmp) = self.with_temp(create)?;
        finish(&tmp, made)
            .and_then(|()| install(dfd, &tmp, name, over_whiteout))
            .inspect_err(|_| discard(dfd, &tmp))?;
        rfs::statat(dfd, name, AtFlags::SYMLINK_NOFOLLOW)
    }

    /// Copy-up without `O_TMPFILE`: the content goes to a hidden temporary name first.
    fn copy_up_named(
        &self,
        dfd: BorrowedFd<'_>,
        name: &[u8],
        meta: &Meta,
        size: u64,
        read: &mut ReadFn<'_>,
    ) -> rio::Result<()> {
        let create = |t: &[u8]| create_excl(dfd, t, OFlags::RDWR);
        let fill = |_: &[u8], fd: OwnedFd| self.fill(fd.as_fd(), meta, size, read);
        self.place(dfd, name, true, create, fill).map(drop)
    }

    fn create_dir(&self, dfd: BorrowedFd<'_>, name: &[u8], meta: &Meta) -> rio::Result<OwnedFd> {
        let create = |t: &[u8]| rfs::mkdirat(dfd, t, Mode::from_raw_mode(TEMP_DIR_MODE));
        let ((), tmp) = self.with_temp(create)?;
        let built = open_child_dir(dfd, &tmp).and_then(|fd| {
            self.apply_meta(fd.as_fd(), meta)?;
            install(dfd, &tmp, name, false).map(|()| fd)
        });
        match built {
            Ok(fd) => Ok(fd),
            // Another thread created it first: use theirs.
            Err(Errno::EXIST) => {
                discard(dfd, &tmp);
                open_child_dir(dfd, name)
            }
            Err(e) => {
                discard(dfd, &tmp);
                Err(e)
            }
        }
    }

    fn create_file(
        &self,
        dfd: BorrowedFd<'_>,
        name: &[u8],
        access: OFlags,
        mode: u32,
        owner: Owner,
    ) -> rio::Result<OwnedFd> {
        let mut file = None;
        let create = |t: &[u8]| create_excl(dfd, t, access);
        self.place(dfd, name, true, create, |_, fd| {
            set_owner(fd.as_fd(), owner.uid, owner.gid)?;
            set_mode(fd.as_fd(), mode)?;
            file = Some(fd);
            Ok(())
        })?;
        file.ok_or(Errno::IO)
    }

    /// Writes the content, then metadata, then fsyncs: all before the file gets a name.
    fn fill(
        &self,
        fd: BorrowedFd<'_>,
        meta: &Meta,
        size: u64,
        read: &mut ReadFn<'_>,
    ) -> rio::Result<()> {
        rfs::ftruncate(fd, size)?;
        let mut off = 0;
        while off < size {
            let want = usize::try_from(size - off).map_or(COPY_CHUNK, |n| n.min(COPY_CHUNK));
            let data =
                read(off, want).map_err(|e| Errno::from_io_error(&e).unwrap_or(Errno::IO))?;
            if data.is_empty() || data.len() > want {
                return Err(Errno::IO);
            }
            if data.iter().any(|&b| b != 0) {
                write_all_at(fd, &data, off)?;
            }
            off += data.len() as u64;
        }
        self.apply_meta(fd, meta)?;
        rfs::fsync(fd)
    }

    /// Gives an `O_TMPFILE` its name; if the name is taken (by a whiteout), links it under a
    /// temporary name first and renames that over.
    fn link_tmpfile(
        &self,
        dfd: BorrowedFd<'_>,
        fd: BorrowedFd<'_>,
        name: &[u8],
    ) -> rio::Result<()> {
        match link_fd(fd, dfd, name) {
            Err(Errno::EXIST) => {}
            r => return r,
        }
        let ((), tmp) = self.with_temp(|t| link_fd(fd, dfd, t))?;
        install(dfd, &tmp, name, true).inspect_err(|_| discard(dfd, &tmp))
    }

    /// Owner, then mode (chown clears setuid), then xattrs (chown clears
    /// security.capability), then times (everything before changes ctime/mtime).
    fn apply_meta(&self, fd: BorrowedFd<'_>, meta: &Meta) -> rio::Result<()> {
        let kind = FileType::from_raw_mode(rfs::fstat(fd)?.st_mode);
        let symlink = kind == FileType::Symlink;
        let user_ok = matches!(kind, FileType::RegularFile | FileType::Directory);
        match set_owner(fd, meta.uid, meta.gid) {
            // Without root, files keep our uid rather than failing every copy-up.
            Err(Errno::PERM) if !self.root_ns => {}
            r => r?,
        }
        if !symlink {
            set_mode(fd, meta.mode)?;
        }
        let path = proc_path(fd);
        for (key, value) in &meta.xattrs {
            // The kernel allows user.* only on files and directories; overlay's own xattrs
            // are never copied.
            if is_private_xattr(key) || (!user_ok && key.starts_with(USER_XATTR_PREFIX)) {
                continue;
            }
            rfs::setxattr(&path, &key[..], value, XattrFlags::empty())?;
        }
        set_times(fd, meta.atime, meta.mtime)
    }
}

// ---- free helpers: each takes a directory fd and one validated name ----

fn check_name(name: &[u8]) -> rio::Result<()> {
    let bad = name.is_empty() || name == b"." || name == b".." || name.contains(&b'/');
    if bad || name.contains(&0) {
        Err(Errno::INVAL)
    } else {
        Ok(())
    }
}

/// Splits a relative, normalized directory path; `b""` is the root.
fn split_path(path: &[u8]) -> rio::Result<Vec<&[u8]>> {
    if path.is_empty() {
        return Ok(Vec::new());
    }
    path.split(|&b| b == b'/')
        .map(|c| check_name(c).map(|()| c))
        .collect()
}

/// Groups components into '/'-joined chunks of at most `WALK_CHUNK` bytes (or one component).
fn chunk_parts(parts: &[&[u8]]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut cur: Vec<u8> = Vec::new();
    for part in parts {
        if !cur.is_empty() && cur.len() + 1 + part.len() > WALK_CHUNK {
            out.push(std::mem::take(&mut cur));
        }
        if !cur.is_empty() {
            cur.push(b'/');
        }
        cur.extend_from_slice(part);
    }
    if !cur.is_empty() {
        out.push(cur);
    }
    out
}

fn join(dir: &[u8], name: &[u8]) -> Vec<u8> {
    match (dir.is_empty(), name.is_empty()) {
        (true, _) => name.to_vec(),
        (_, true) => dir.to_vec(),
        _ => [dir, b"/", name].concat(),
    }
}

fn split_last(path: &[u8]) -> (&[u8], &[u8]) {
    match path.iter().rposition(|&b| b == b'/') {
        Some(i) => (&path[..i], &path[i + 1..]),
        None => (b"", path),
    }
}

fn is_whiteout(st: &Stat) -> bool {
    FileType::from_raw_mode(st.st_mode) == FileType::CharacterDevice && st.st_rdev == 0
}

fn is_private_xattr(key: &[u8]) -> bool {
    PRIVATE_XATTR_PREFIXES.iter().any(|p| key.starts_with(p))
}

fn found_at(dfd: BorrowedFd<'_>, name: &[u8]) -> rio::Result<Found> {
    match rfs::statat(dfd, name, AtFlags::SYMLINK_NOFOLLOW) {
        Ok(st) if is_whiteout(&st) => Ok(Found::Whiteout),
        Ok(st) => Ok(Found::Entry(st)),
        Err(Errno::NOENT) => Ok(Found::Missing),
        Err(e) => Err(e),
    }
}

/// Opens a directory below `dfd`: one name, or a '/'-joined chain that may not leave `dfd`.
fn open_child_dir(dfd: BorrowedFd<'_>, name: &[u8]) -> rio::Result<OwnedFd> {
    let flags = DIR_FLAGS | OFlags::NOFOLLOW;
    rfs::openat2(dfd, name, flags, Mode::empty(), resolve_flags())
}

/// An `O_PATH` handle on the entry itself, symlinks included.
fn open_node(dfd: BorrowedFd<'_>, name: &[u8]) -> rio::Result<OwnedFd> {
    let flags = OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rfs::openat2(dfd, name, flags, Mode::empty(), resolve_flags())
}

/// A regular file under a fresh name (`O_EXCL` never follows a symlink).
fn create_excl(dfd: BorrowedFd<'_>, name: &[u8], access: OFlags) -> rio::Result<OwnedFd> {
    let flags = access | OFlags::CREATE | OFlags::EXCL | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    rfs::openat(dfd, name, flags, Mode::from_raw_mode(TEMP_MODE))
}

fn make_special(dfd: BorrowedFd<'_>, name: &[u8], kind: &SpecialKind) -> rio::Result<()> {
    let (ftype, dev) = match *kind {
        SpecialKind::Symlink(ref target) => return rfs::symlinkat(&target[..], dfd, name),
        SpecialKind::CharDevice { major: 0, minor: 0 } => return Err(Errno::INVAL),
        SpecialKind::CharDevice { major, minor } => {
            (FileType::CharacterDevice, rfs::makedev(major, minor))
        }
        SpecialKind::BlockDevice { major, minor } => {
            (FileType::BlockDevice, rfs::makedev(major, minor))
        }
        SpecialKind::Fifo => (FileType::Fifo, 0),
        SpecialKind::Socket => (FileType::Socket, 0),
    };
    rfs::mknodat(dfd, name, ftype, Mode::from_raw_mode(TEMP_MODE), dev)
}

/// Moves `tmp` to `name` if free; over a whiteout (when allowed) by exchanging the two,
/// which works for directories too, then dropping the whiteout.
fn install(dfd: BorrowedFd<'_>, tmp: &[u8], name: &[u8], over_whiteout: bool) -> rio::Result<()> {
    match rfs::renameat_with(dfd, tmp, dfd, name, RenameFlags::NOREPLACE) {
        Err(Errno::EXIST) if over_whiteout && matches!(found_at(dfd, name)?, Found::Whiteout) => {
            rfs::renameat_with(dfd, tmp, dfd, name, RenameFlags::EXCHANGE)?;
            // The whiteout now carries the temporary name, which listings hide anyway.
            let _ = rfs::unlinkat(dfd, tmp, AtFlags::empty());
            Ok(())
        }
        r => r,
    }
}

/// Best-effort removal of a temporary entry after a failure (the original error matters more).
fn discard(dfd: BorrowedFd<'_>, tmp: &[u8]) {
    let _ = unlink_any(dfd, tmp);
}

fn unlink_any(dfd: BorrowedFd<'_>, name: &[u8]) -> rio::Result<()> {
    match rfs::unlinkat(dfd, name, AtFlags::empty()) {
        Err(Errno::ISDIR) => rfs::unlinkat(dfd, name, AtFlags::REMOVEDIR),
        r => r,
    }
}

/// Links an open (`O_TMPFILE`) file under `name`. `AT_EMPTY_PATH` needs CAP_DAC_READ_SEARCH on
/// older kernels; the `/proc` magic link is the unprivileged way to the same inode.
fn link_fd(fd: BorrowedFd<'_>, dfd: BorrowedFd<'_>, name: &[u8]) -> rio::Result<()> {
    match rfs::linkat(fd, "", dfd, name, AtFlags::EMPTY_PATH) {
        Err(Errno::NOENT | Errno::PERM) => {
            rfs::linkat(rfs::CWD, proc_path(fd), dfd, name, AtFlags::SYMLINK_FOLLOW)
        }
        r => r,
    }
}

fn read_names(dfd: BorrowedFd<'_>, with_temp: bool) -> rio::Result<Vec<Vec<u8>>> {
    let mut dir = rfs::Dir::read_from(dfd)?;
    let mut names = Vec::new();
    while let Some(entry) = dir.read() {
        let entry = entry?;
        let name = entry.file_name().to_bytes();
        let temp = !with_temp && name.starts_with(TEMP_PREFIX);
        if name != b"." && name != b".." && !temp {
            names.push(name.to_vec());
        }
    }
    names.sort();
    Ok(names)
}

fn dir_is_opaque(dfd: BorrowedFd<'_>, key: &str) -> rio::Result<bool> {
    let mut buf = [0u8; OPAQUE_VALUE.len()];
    match rfs::fgetxattr(dfd, key, &mut buf[..]) {
        Ok(n) => Ok(&buf[..n] == OPAQUE_VALUE),
        Err(Errno::NODATA | Errno::RANGE | Errno::NOTSUP) => Ok(false),
        Err(e) => Err(e),
    }
}

/// The magic link naming exactly the inode behind `fd`.
fn proc_path(fd: BorrowedFd<'_>) -> String {
    format!("/proc/self/fd/{}", fd.as_raw_fd())
}

/// `u32::MAX` is chown's "leave alone", not a user.
fn uid(raw: u32) -> Option<Uid> {
    (raw != u32::MAX).then(|| Uid::from_raw(raw))
}

fn gid(raw: u32) -> Option<Gid> {
    (raw != u32::MAX).then(|| Gid::from_raw(raw))
}

fn set_owner(fd: BorrowedFd<'_>, u: u32, g: u32) -> rio::Result<()> {
    let flags = AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW;
    rfs::chownat(fd, "", uid(u), gid(g), flags)
}

/// chmod through the magic link: `fchmod` refuses `O_PATH` fds, and nothing is opened.
fn set_mode(fd: BorrowedFd<'_>, mode: u32) -> rio::Result<()> {
    rfs::chmod(proc_path(fd), Mode::from_raw_mode(mode & PERM_BITS))
}

fn set_times(fd: BorrowedFd<'_>, atime: Timespec, mtime: Timespec) -> rio::Result<()> {
    let times = Timestamps {
        last_access: atime,
        last_modification: mtime,
    };
    rfs::utimensat(
        fd,
        "",
        &times,
        AtFlags::EMPTY_PATH | AtFlags::SYMLINK_NOFOLLOW,
    )
}

fn set_time(t: Option<SetTime>) -> Timespec {
    match t {
        None => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_OMIT,
        },
        Some(SetTime::Now) => Timespec {
            tv_sec: 0,
            tv_nsec: rfs::UTIME_NOW,
        },
        Some(SetTime::At(ts)) => ts,
    }
}

fn write_all_at(fd: BorrowedFd<'_>, mut data: &[u8], mut off: u64) -> rio::Result<()> {
    while !data.is_empty() {
        match rio::pwrite(fd, data, off) {
            Ok(0) => return Err(Errno::IO),
            Ok(n) => {
                data = &data[n..];
                off += n as u64;
            }
            Err(Errno::INTR) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(())
}

/// Reads an xattr through `path`, retrying if it grows between the size query and the read.
fn get_xattr(path: &str, key: &[u8]) -> rio::Result<Vec<u8>> {
    for _ in 0..XATTR_TRIES {
        let mut buf = vec![0u8; rfs::getxattr_query(path, key)?];
        match rfs::getxattr(path, key, &mut buf[..]) {
            Ok(n) => {
                buf.truncate(n);
                return Ok(buf);
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

fn list_xattr(path: &str) -> rio::Result<Vec<Vec<u8>>> {
    for _ in 0..XATTR_TRIES {
        let mut buf = vec![0u8; rfs::listxattr_query(path)?];
        match rfs::listxattr(path, &mut buf[..]) {
            Ok(n) => {
                let names = buf[..n].split(|&b| b == 0).filter(|k| !k.is_empty());
                return Ok(names.map(<[u8]>::to_vec).collect());
            }
            Err(Errno::RANGE) => continue,
            Err(e) => return Err(e),
        }
    }
    Err(Errno::RANGE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{FileTypeExt, MetadataExt, PermissionsExt};
    use std::path::PathBuf;

    const KIB: usize = 1024;

    fn ts(sec: i64, nsec: i64) -> Timespec {
        Timespec {
            tv_sec: sec,
            tv_nsec: nsec,
        }
    }

    fn meta(mode: u32) -> Meta {
        Meta {
            mode,
            uid: 1234,
            gid: 5678,
            atime: ts(1_600_000_000, 111_111_111),
            mtime: ts(1_500_000_000, 123_456_789),
            xattrs: vec![(b"user.color".to_vec(), b"blue".to_vec())],
        }
    }

    fn owner() -> Owner {
        Owner {
            uid: 1234,
            gid: 5678,
        }
    }

    fn new_upper() -> (tempfile::TempDir, PathBuf, Upper) {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("upper");
        let upper = Upper::open(&root).unwrap();
        (tmp, root, upper)
    }

    fn errno(r: Result<impl std::fmt::Debug>) -> Errno {
        Errno::from_raw_os_error(r.unwrap_err().errno())
    }

    fn disk_xattr(path: &Path, key: &str) -> Option<Vec<u8>> {
        let mut buf = vec![0u8; 256];
        let n = rfs::lgetxattr(path, key, &mut buf[..]).ok()?;
        Some(buf[..n].to_vec())
    }

    /// A 2.5 MiB source with a hole in the middle, served like the lower view would.
    fn content() -> Vec<u8> {
        let mut data: Vec<u8> = (0..2560 * KIB).map(|i| (i % 251) as u8).collect();
        data[KIB * KIB..2 * KIB * KIB].fill(0);
        data
    }

    #[test]
    fn upper_is_send_and_sync() {
        fn check<T: Send + Sync>() {}
        check::<Upper>();
    }

    #[test]
    fn copy_up_file_is_atomic_and_keeps_metadata() {
        let (_t, root, upper) = new_upper();
        upper.ensure_dirs(b"etc", &|_| meta(0o755)).unwrap();
        let data = content();
        let mut m = meta(0o4755);
        m.xattrs
            .push((b"trusted.origin".to_vec(), b"lower".to_vec()));
        m.xattrs
            .push((b"trusted.overlay.opaque".to_vec(), b"y".to_vec()));
        let mut calls = 0;
        let mut read = |off: u64, len: usize| {
            calls += 1;
            // Nothing may be visible under the target name while content is still coming.
            assert!(matches!(
                upper.find(b"etc", b"app").unwrap(),
                Found::Missing
            ));
            assert!(upper.list(b"etc").unwrap().is_empty());
            let off = off as usize;
            Ok(data[off..off + len].to_vec())
        };
        upper
            .copy_up_file(b"etc", b"app", &m, data.len() as u64, &mut read)
            .unwrap();
        assert_eq!(calls, 3);
        let path = root.join("etc/app");
        let md = std::fs::metadata(&path).unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), data);
        assert_eq!(md.mode() & PERM_BITS, 0o4755);
        assert_eq!((md.uid(), md.gid()), (1234, 5678));
        assert_eq!((md.mtime(), md.mtime_nsec()), (1_500_000_000, 123_456_789));
        assert_eq!((md.atime(), md.atime_nsec()), (1_600_000_000, 111_111_111));
        assert_eq!(disk_xattr(&path, "user.color").unwrap(), b"blue");
        assert_eq!(disk_xattr(&path, "trusted.origin").unwrap(), b"lower");
        assert_eq!(disk_xattr(&path, "trusted.overlay.opaque"), None);
        assert_eq!(
            upper.get_xattr(b"etc", b"app", b"user.color").unwrap(),
            b"blue"
        );
        // A second copy-up must not clobber the real file.
        let mut read = |_: u64, len: usize| Ok(vec![1u8; len]);
        let r = upper.copy_up_file(b"etc", b"app", &m, 4, &mut read);
        assert_eq!(errno(r), Errno::EXIST);
        assert_eq!(std::fs::read(&path).unwrap().len(), data.len());
    }

    #[test]
    fn copy_up_replaces_a_whiteout_and_reports_read_errors() {
        let (_t, root, upper) = new_upper();
        upper.whiteout(b"", b"f").unwrap();
        let mut read = |_: u64, len: usize| Ok(vec![7u8; len]);
        upper
            .copy_up_file(b"", b"f", &meta(0o644), 10, &mut read)
            .unwrap();
        assert_eq!(std::fs::read(root.join("f")).unwrap(), vec![7u8; 10]);
        let mut failing = |_: u64, _: usize| Err(std::io::Error::from_raw_os_error(libc::EIO));
        let r = upper.copy_up_file(b"", b"g", &meta(0o644), 10, &mut failing);
        assert_eq!(errno(r), Errno::IO);
        let mut short = |_: u64, _: usize| Ok(Vec::new());
        let r = upper.copy_up_file(b"", b"g", &meta(0o644), 10, &mut short);
        assert_eq!(errno(r), Errno::IO);
        assert!(matches!(upper.find(b"", b"g").unwrap(), Found::Missing));
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            1,
            "no temporary left"
        );
    }

    #[test]
    fn copy_up_without_tmpfile_hides_the_partial_file() {
        let (_t, root, upper) = new_upper();
        upper.whiteout(b"", b"f").unwrap();
        let dfd = upper.dir(b"").unwrap();
        let mut read = |off: u64, len: usize| {
            assert!(matches!(upper.find(b"", b"f").unwrap(), Found::Whiteout));
            assert_eq!(upper.list(b"").unwrap().len(), 1, "the temporary is hidden");
            Ok(vec![off as u8 + 1; len])
        };
        let size = COPY_CHUNK as u64 + 1;
        upper
            .copy_up_named(dfd.as_fd(), b"f", &meta(0o2711), size, &mut read)
            .unwrap();
        let md = std::fs::metadata(root.join("f")).unwrap();
        assert_eq!(
            (md.len(), md.mode() & PERM_BITS, md.uid()),
            (size, 0o2711, 1234)
        );
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
    }

    #[test]
    fn copy_up_special_entries() {
        let (_t, root, upper) = new_upper();
        let mut m = meta(0o640);
        m.xattrs
            .push((b"trusted.origin".to_vec(), b"lower".to_vec()));
        let link = SpecialKind::Symlink(b"/etc/passwd".to_vec());
        upper.copy_up_special(b"", b"link", &link, &m).unwrap();
        let md = std::fs::symlink_metadata(root.join("link")).unwrap();
        assert!(md.file_type().is_symlink());
        assert_eq!(
            std::fs::read_link(root.join("link")).unwrap(),
            Path::new("/etc/passwd")
        );
        assert_eq!(
            (md.uid(), md.gid(), md.mtime_nsec()),
            (1234, 5678, 123_456_789)
        );
        assert_eq!(
            disk_xattr(&root.join("link"), "trusted.origin").unwrap(),
            b"lower"
        );
        let null = SpecialKind::CharDevice { major: 1, minor: 3 };
        upper
            .copy_up_special(b"", b"null", &null, &meta(0o4640))
            .unwrap();
        let md = std::fs::symlink_metadata(root.join("null")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(
            (md.rdev(), md.mode() & PERM_BITS),
            (rfs::makedev(1, 3), 0o4640)
        );
        upper
            .copy_up_special(b"", b"fifo", &SpecialKind::Fifo, &meta(0o600))
            .unwrap();
        assert!(
            std::fs::symlink_metadata(root.join("fifo"))
                .unwrap()
                .file_type()
                .is_fifo()
        );
        let blk = SpecialKind::BlockDevice { major: 7, minor: 0 };
        upper
            .copy_up_special(b"", b"loop", &blk, &meta(0o660))
            .unwrap();
        let zero = SpecialKind::CharDevice { major: 0, minor: 0 };
        let r = upper.copy_up_special(b"", b"wh", &zero, &meta(0o600));
        assert_eq!(errno(r), Errno::INVAL);
    }

    #[test]
    fn whiteouts_and_opaque_dirs_use_overlayfs_format() {
        let (_t, root, upper) = new_upper();
        upper.whiteout(b"", b"gone").unwrap();
        let md = std::fs::symlink_metadata(root.join("gone")).unwrap();
        assert!(md.file_type().is_char_device());
        assert_eq!(md.rdev(), 0);
        assert!(matches!(upper.find(b"", b"gone").unwrap(), Found::Whiteout));
        // Over a file and over a full directory, atomically.
        std::fs::write(root.join("file"), b"x").unwrap();
        upper.whiteout(b"", b"file").unwrap();
        std::fs::create_dir_all(root.join("d/e/f")).unwrap();
        std::fs::write(root.join("d/e/f/x"), b"x").unwrap();
        upper.whiteout(b"", b"d").unwrap();
        assert!(matches!(upper.find(b"", b"d").unwrap(), Found::Whiteout));
        assert_eq!(
            std::fs::read_dir(&root).unwrap().count(),
            3,
            "no temporary left"
        );
        upper.mkdir(b"", b"o", 0o755, owner()).unwrap();
        assert!(!upper.is_opaque(b"o").unwrap());
        upper.set_opaque(b"o").unwrap();
        assert!(upper.is_opaque(b"o").unwrap());
        let key = if upper.is_root_namespace() {
            "trusted"
        } else {
            "user"
        };
        let key = format!("{key}.overlay.opaque");
        assert_eq!(disk_xattr(&root.join("o"), &key).unwrap(), b"y");
        // overlayfs's own xattrs are invisible and untouchable through the API.
        assert!(upper.list_xattr(b"", b"o").unwrap().is_empty());
        assert_eq!(
            errno(upper.get_xattr(b"", b"o", key.as_bytes())),
            Errno::NODATA
        );
        assert_eq!(
            errno(upper.remove_xattr(b"", b"o", key.as_bytes())),
            Errno::PERM
        );
        let r = upper.set_xattr(b"", b"o", b"trusted.overlay.x", b"1", XattrFlags::empty());
        assert_eq!(errno(r), Errno::PERM);
        // mkdir over a whiteout hides lower children.
        upper.mkdir(b"", b"gone", 0o700, owner()).unwrap();
        assert!(upper.is_opaque(b"gone").unwrap());
    }

    #[test]
    fn remove_and_remove_all() {
        let (_t, root, upper) = new_upper();
        upper.mkdir(b"", b"d", 0o755, owner()).unwrap();
        upper.mkdir(b"d", b"sub", 0o755, owner()).unwrap();
        for name in [&b"a"[..], b"b", b"c"] {
            upper.whiteout(b"d", name).unwrap();
            upper.whiteout(b"d/sub", name).unwrap();
        }
        assert_eq!(errno(upper.remove(b"", b"d")), Errno::NOTEMPTY);
        upper.remove(b"d/sub", b"a").unwrap();
        upper.remove_all(b"", b"d").unwrap();
        assert!(!root.join("d").exists());
        upper.mkdir(b"", b"empty", 0o755, owner()).unwrap();
        upper.remove(b"", b"empty").unwrap();
        assert_eq!(errno(upper.remove(b"", b"empty")), Errno::NOENT);
    }

    #[test]
    fn mkdir_open_file_setattr_link_rename() {
        let (_t, root, upper) = new_upper();
        let st = upper.mkdir(b"", b"d", 0o2775, owner()).unwrap();
        assert_eq!(
            (st.st_mode & PERM_BITS, st.st_uid, st.st_gid),
            (0o2775, 1234, 5678)
        );
        let rw = OFlags::RDWR;
        let create = Some((0o4750, owner()));
        let fd = upper
            .open_file(b"d", b"f", rw | OFlags::EXCL, create)
            .unwrap();
        rio::write(&fd, b"hello").unwrap();
        let md = std::fs::metadata(root.join("d/f")).unwrap();
        assert_eq!(
            (md.mode() & PERM_BITS, md.uid(), md.len()),
            (0o4750, 1234, 5)
        );
        let r = upper.open_file(b"d", b"f", rw | OFlags::EXCL, create);
        assert_eq!(errno(r), Errno::EXIST);
        let fd = upper.open_file(b"d", b"f", OFlags::RDONLY, None).unwrap();
        assert_eq!(
            rio::write(&fd, b"x").unwrap_err(),
            Errno::BADF,
            "read-only as asked"
        );
        let fd = upper
            .open_file(b"d", b"f", OFlags::WRONLY | OFlags::APPEND, None)
            .unwrap();
        rio::write(&fd, b"!").unwrap();
        assert_eq!(std::fs::read(root.join("d/f")).unwrap(), b"hello!");
        upper.whiteout(b"d", b"w").unwrap();
        upper.open_file(b"d", b"w", rw, create).unwrap();
        assert!(matches!(upper.find(b"d", b"w").unwrap(), Found::Entry(_)));
        assert_eq!(errno(upper.open_file(b"", b"d", rw, None)), Errno::ISDIR);
        assert_eq!(
            errno(upper.open_file(b"d", b"none", rw, None)),
            Errno::NOENT
        );
        upper
            .mknod(b"d", b"p", &SpecialKind::Fifo, 0o644, owner())
            .unwrap();
        assert_eq!(errno(upper.open_file(b"d", b"p", rw, None)), Errno::INVAL);

        let attr = SetAttr {
            uid: Some(42),
            gid: Some(43),
            mode: Some(0o6755),
            size: Some(2),
            atime: Some(SetTime::Now),
            mtime: Some(SetTime::At(ts(1_000_000_000, 5))),
        };
        let st = upper.setattr(b"d", b"f", &attr).unwrap();
        assert_eq!(
            (st.st_uid, st.st_gid, st.st_mode & PERM_BITS),
            (42, 43, 0o6755)
        );
        assert_eq!(
            (st.st_size, st.st_mtime, st.st_mtime_nsec),
            (2, 1_000_000_000, 5)
        );
        let dir_size = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(errno(upper.setattr(b"", b"d", &dir_size)), Errno::ISDIR);

        let st = upper.link(b"d", b"f", b"", b"hard").unwrap();
        assert_eq!(st.st_nlink, 2);
        upper.whiteout(b"", b"hw").unwrap();
        upper.link(b"d", b"f", b"", b"hw").unwrap();
        assert_eq!(errno(upper.link(b"d", b"f", b"", b"hard")), Errno::EXIST);

        std::fs::write(root.join("a"), b"A").unwrap();
        std::fs::write(root.join("b"), b"B").unwrap();
        let r = upper.rename(b"", b"a", b"", b"b", RenameFlags::NOREPLACE);
        assert_eq!(errno(r), Errno::EXIST);
        upper
            .rename(b"", b"a", b"d", b"b", RenameFlags::EXCHANGE)
            .unwrap_err();
        upper
            .rename(b"", b"a", b"", b"b", RenameFlags::EXCHANGE)
            .unwrap();
        assert_eq!(std::fs::read(root.join("a")).unwrap(), b"B");
        assert_eq!(std::fs::read(root.join("b")).unwrap(), b"A");
        upper
            .rename(b"", b"a", b"d", b"moved", RenameFlags::NOREPLACE)
            .unwrap();
        assert_eq!(std::fs::read(root.join("d/moved")).unwrap(), b"B");
    }

    #[test]
    fn symlinks_are_changed_themselves() {
        let (_t, root, upper) = new_upper();
        std::fs::write(root.join("target"), b"t").unwrap();
        std::fs::set_permissions(root.join("target"), PermissionsExt::from_mode(0o600)).unwrap();
        upper.symlink(b"", b"l", b"target", owner()).unwrap();
        let attr = SetAttr {
            uid: Some(7),
            mode: Some(0o777),
            mtime: Some(SetTime::At(ts(5, 6))),
            ..SetAttr::default()
        };
        upper.setattr(b"", b"l", &attr).unwrap();
        let md = std::fs::symlink_metadata(root.join("l")).unwrap();
        assert_eq!((md.uid(), md.mtime(), md.mtime_nsec()), (7, 5, 6));
        let tmd = std::fs::metadata(root.join("target")).unwrap();
        assert_eq!((tmd.uid(), tmd.mode() & PERM_BITS), (0, 0o600));
        upper
            .set_xattr(b"", b"l", b"trusted.t", b"1", XattrFlags::empty())
            .unwrap();
        assert_eq!(
            upper.list_xattr(b"", b"l").unwrap(),
            vec![b"trusted.t".to_vec()]
        );
        assert!(upper.list_xattr(b"", b"target").unwrap().is_empty());
        let r = upper.set_xattr(b"", b"l", b"user.t", b"1", XattrFlags::empty());
        assert_eq!(errno(r), Errno::PERM);
        assert_eq!(
            errno(upper.open_file(b"", b"l", OFlags::RDONLY, None)),
            Errno::LOOP
        );
        let trunc = SetAttr {
            size: Some(0),
            ..SetAttr::default()
        };
        assert_eq!(errno(upper.setattr(b"", b"l", &trunc)), Errno::INVAL);
        assert_eq!(std::fs::read(root.join("target")).unwrap(), b"t");
    }

    #[test]
    fn ensure_dirs_builds_chains_with_lower_metadata() {
        let (_t, root, upper) = new_upper();
        upper.mkdir(b"", b"usr", 0o700, owner()).unwrap();
        let asked = std::sync::Mutex::new(Vec::new());
        let meta_of = |p: &[u8]| {
            asked.lock().unwrap().push(p.to_vec());
            meta(0o751)
        };
        let fd = upper.ensure_dirs(b"usr/local/bin", &meta_of).unwrap();
        assert_eq!(
            *asked.lock().unwrap(),
            vec![b"usr/local".to_vec(), b"usr/local/bin".to_vec()]
        );
        let st = rfs::fstat(&fd).unwrap();
        assert_eq!(st.st_mode & PERM_BITS, 0o751);
        let local = std::fs::metadata(root.join("usr/local")).unwrap();
        assert_eq!((local.mode() & PERM_BITS, local.uid()), (0o751, 1234));
        assert_eq!(
            (local.mtime(), local.mtime_nsec()),
            (1_500_000_000, 123_456_789)
        );
        assert_eq!(
            disk_xattr(&root.join("usr/local"), "user.color").unwrap(),
            b"blue"
        );
        let usr = std::fs::metadata(root.join("usr")).unwrap();
        assert_eq!(usr.mode() & PERM_BITS, 0o700, "existing dirs are kept");
        upper
            .ensure_dirs(b"usr/local/bin", &|_| panic!("all exist"))
            .unwrap();
        upper.whiteout(b"", b"w").unwrap();
        assert_eq!(
            errno(upper.ensure_dirs(b"w/x", &|_| meta(0o755))),
            Errno::NOTDIR
        );
    }

    #[test]
    fn concurrent_copy_ups_and_dir_chains() {
        let (_t, root, upper) = new_upper();
        std::thread::scope(|s| {
            for i in 0..8u8 {
                let upper = &upper;
                s.spawn(move || {
                    upper.ensure_dirs(b"a/b/c", &|_| meta(0o755)).unwrap();
                    let mut read = |_: u64, len: usize| Ok(vec![i; len]);
                    let name = [b'f', b'0' + i];
                    upper
                        .copy_up_file(b"a/b/c", &name, &meta(0o644), 3, &mut read)
                        .unwrap();
                });
            }
        });
        let names = upper.list(b"a/b/c").unwrap();
        assert_eq!(names.len(), 8);
        assert_eq!(std::fs::read(root.join("a/b/c/f5")).unwrap(), vec![5u8; 3]);
        assert_eq!(std::fs::read_dir(root.join("a/b")).unwrap().count(), 1);
    }

    #[test]
    fn long_paths_are_walked_in_confined_pieces() {
        let (_t, root, upper) = new_upper();
        let part = [b'd'; 200];
        let parts: Vec<&[u8]> = (0..30).map(|_| &part[..]).collect();
        let deep = parts.join(&b'/');
        assert!(deep.len() > 6000);
        upper.ensure_dirs(&deep, &|_| meta(0o755)).unwrap();
        let mut read = |_: u64, len: usize| Ok(vec![1u8; len]);
        upper
            .copy_up_file(&deep, b"file", &meta(0o644), 5, &mut read)
            .unwrap();
        assert_eq!(upper.stat(&deep, b"file").unwrap().st_size, 5);
        upper.whiteout(&deep, b"wh").unwrap();
        let walked = upper.walk().unwrap();
        assert_eq!(walked.len(), 32);
        assert!(matches!(walked.last().unwrap().1, Found::Whiteout));
        upper.remove_all(b"", &part).unwrap();
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 0);
    }

    #[test]
    fn walk_lists_everything_with_opaque_flags() {
        let (_t, _root, upper) = new_upper();
        upper.mkdir(b"", b"o", 0o755, owner()).unwrap();
        upper.set_opaque(b"o").unwrap();
        upper.whiteout(b"o", b"gone").unwrap();
        upper.symlink(b"", b"l", b"o", owner()).unwrap();
        let walked = upper.walk().unwrap();
        let names: Vec<_> = walked.iter().map(|(p, f, o)| (p.clone(), f, *o)).collect();
        assert_eq!(names.len(), 3);
        assert_eq!((&names[0].0[..], names[0].2), (&b"l"[..], false));
        assert_eq!((&names[1].0[..], names[1].2), (&b"o"[..], true));
        assert!(matches!(
            (&names[2].0[..], names[2].1),
            (b"o/gone", Found::Whiteout)
        ));
    }

    type Op<'a> = (&'static str, Box<dyn Fn(&[u8]) -> Result<()> + 'a>);

    /// Every API call, aimed at `dir`/pwn (or dir/marker where an existing name is needed).
    fn all_ops(upper: &Upper) -> Vec<Op<'_>> {
        let u = upper;
        let m = || meta(0o644);
        let ok = |r: Result<Stat>| r.map(drop);
        let attr = SetAttr {
            mode: Some(0o777),
            size: Some(0),
            ..SetAttr::default()
        };
        let fifo = SpecialKind::Fifo;
        vec![
            ("dir", Box::new(move |d| u.dir(d).map(drop))),
            ("find", Box::new(move |d| u.find(d, b"marker").map(drop))),
            ("stat", Box::new(move |d| ok(u.stat(d, b"marker")))),
            ("list", Box::new(move |d| u.list(d).map(drop))),
            ("is_opaque", Box::new(move |d| u.is_opaque(d).map(drop))),
            ("set_opaque", Box::new(move |d| u.set_opaque(d))),
            (
                "ensure_dirs",
                Box::new(move |d| u.ensure_dirs(&join(d, b"pwn"), &|_| m()).map(drop)),
            ),
            ("whiteout", Box::new(move |d| u.whiteout(d, b"marker"))),
            ("remove", Box::new(move |d| u.remove(d, b"marker"))),
            ("remove_all", Box::new(move |d| u.remove_all(d, b"marker"))),
            (
                "copy_up_file",
                Box::new(move |d| {
                    u.copy_up_file(d, b"pwn", &m(), 3, &mut |_, n| Ok(vec![b'!'; n]))
                }),
            ),
            (
                "copy_up_special",
                Box::new(move |d| u.copy_up_special(d, b"pwn", &fifo, &m())),
            ),
            (
                "open_file",
                Box::new(move |d| {
                    u.open_file(d, b"marker", OFlags::RDWR | OFlags::TRUNC, None)
                        .map(drop)
                }),
            ),
            (
                "create",
                Box::new(move |d| {
                    u.open_file(d, b"pwn", OFlags::RDWR, Some((0o644, owner())))
                        .map(drop)
                }),
            ),
            (
                "mkdir",
                Box::new(move |d| ok(u.mkdir(d, b"pwn", 0o755, owner()))),
            ),
            (
                "symlink",
                Box::new(move |d| ok(u.symlink(d, b"pwn", b"/", owner()))),
            ),
            (
                "link from",
                Box::new(move |d| ok(u.link(d, b"marker", b"", b"pwn"))),
            ),
            (
                "link to",
                Box::new(move |d| ok(u.link(b"", b"inside", d, b"pwn"))),
            ),
            (
                "rename from",
                Box::new(move |d| u.rename(d, b"marker", b"", b"pwn", RenameFlags::empty())),
            ),
            (
                "rename to",
                Box::new(move |d| u.rename(b"", b"inside", d, b"marker", RenameFlags::empty())),
            ),
            (
                "setattr",
                Box::new(move |d| ok(u.setattr(d, b"marker", &attr))),
            ),
            (
                "set_xattr",
                Box::new(move |d| {
                    u.set_xattr(d, b"marker", b"user.pwn", b"1", XattrFlags::empty())
                }),
            ),
            (
                "get_xattr",
                Box::new(move |d| u.get_xattr(d, b"marker", b"user.a").map(drop)),
            ),
            (
                "list_xattr",
                Box::new(move |d| u.list_xattr(d, b"marker").map(drop)),
            ),
            (
                "remove_xattr",
                Box::new(move |d| u.remove_xattr(d, b"marker", b"user.a")),
            ),
        ]
    }

    fn snapshot(dir: &Path) -> Vec<(String, Vec<u8>, u32, i64, i64)> {
        let mut out: Vec<_> = std::fs::read_dir(dir)
            .unwrap()
            .map(|e| {
                let p = e.unwrap().path();
                let md = std::fs::symlink_metadata(&p).unwrap();
                let data = if md.is_file() {
                    std::fs::read(&p).unwrap()
                } else {
                    Vec::new()
                };
                let xattrs = rfs::llistxattr_query(&p).unwrap() as i64;
                (
                    p.display().to_string(),
                    data,
                    md.mode(),
                    md.mtime_nsec(),
                    xattrs,
                )
            })
            .collect();
        out.sort();
        out
    }

    #[test]
    fn symlinks_in_the_upper_never_lead_outside() {
        let (t, root, upper) = new_upper();
        let outside = t.path().join("OUTSIDE");
        std::fs::create_dir_all(outside.join("sub")).unwrap();
        std::fs::write(outside.join("marker"), b"keep").unwrap();
        std::fs::write(outside.join("sub/marker"), b"keep").unwrap();
        std::fs::write(root.join("inside"), b"in").unwrap();
        std::fs::create_dir(root.join("d")).unwrap();
        let links = [
            ("evil", PathBuf::from("/etc")),
            ("up", PathBuf::from("../../..")),
            ("abs", outside.clone()),
            ("rel", PathBuf::from("../OUTSIDE")),
            ("d/back", PathBuf::from("../../OUTSIDE")),
        ];
        for (name, target) in &links {
            std::os::unix::fs::symlink(target, root.join(name)).unwrap();
        }
        let before = (snapshot(&outside), snapshot(&outside.join("sub")));
        let escapes: [&[u8]; 8] = [
            b"evil", b"up/x", b"up", b"abs", b"abs/sub", b"rel", b"rel/sub", b"d/back",
        ];
        let refused = [Errno::LOOP, Errno::XDEV, Errno::NOTDIR];
        for (op, run) in all_ops(&upper) {
            for dir in escapes {
                let e = run(dir).err().map(|e| Errno::from_raw_os_error(e.errno()));
                let what = String::from_utf8_lossy(dir);
                assert!(
                    e.is_some_and(|e| refused.contains(&e)),
                    "{op} via {what}: {e:?}"
                );
            }
        }
        assert_eq!(before, (snapshot(&outside), snapshot(&outside.join("sub"))));
        assert!(!Path::new("/etc/pwn").exists());
        // Symlinks as final names are replaced or removed themselves, never their targets.
        upper.whiteout(b"", b"rel").unwrap();
        upper.remove_all(b"", b"abs").unwrap();
        upper.remove(b"d", b"back").unwrap();
        assert_eq!(before, (snapshot(&outside), snapshot(&outside.join("sub"))));
        assert!(
            std::fs::read_link(root.join("evil")).is_ok(),
            "untouched link stays"
        );
    }

    #[test]
    fn bad_names_and_paths_are_rejected() {
        let (_t, root, upper) = new_upper();
        std::fs::create_dir(root.join("a")).unwrap();
        let bad_names: [&[u8]; 6] = [b"", b".", b"..", b"a/b", b"a\0b", b"/a"];
        let bad_dirs: [&[u8]; 7] = [b"/a", b"../a", b"a/..", b"./a", b"a//a", b"a/", b"a\0"];
        for name in bad_names {
            let what = String::from_utf8_lossy(name);
            assert_eq!(errno(upper.find(b"a", name)), Errno::INVAL, "{what}");
            assert_eq!(errno(upper.whiteout(b"a", name)), Errno::INVAL, "{what}");
            assert_eq!(
                errno(upper.mkdir(b"a", name, 0o755, owner())),
                Errno::INVAL,
                "{what}"
            );
            let r = upper.copy_up_file(b"a", name, &meta(0o644), 1, &mut |_, n| Ok(vec![1; n]));
            assert_eq!(errno(r), Errno::INVAL, "{what}");
        }
        for (op, run) in all_ops(&upper) {
            for dir in bad_dirs {
                let e = Errno::from_raw_os_error(run(dir).unwrap_err().errno());
                assert_eq!(e, Errno::INVAL, "{op} {}", String::from_utf8_lossy(dir));
            }
        }
        assert_eq!(std::fs::read_dir(&root).unwrap().count(), 1);
    }

    /// Unmounts on drop, so a failed assertion leaves no mount behind.
    struct MountGuard(PathBuf);

    impl Drop for MountGuard {
        fn drop(&mut self) {
            let _ = rustix::mount::unmount(&self.0, rustix::mount::UnmountFlags::DETACH);
        }
    }

    #[test]
    fn kernel_overlayfs_reads_this_upper() {
        let (t, root, upper) = new_upper();
        let (lower, work, merged) = (
            t.path().join("lower"),
            t.path().join("w"),
            t.path().join("m"),
        );
        for d in [&lower.join("d"), &work, &merged] {
            std::fs::create_dir_all(d).unwrap();
        }
        for f in ["a", "b", "d/x", "d/y"] {
            std::fs::write(lower.join(f), b"lower").unwrap();
        }
        upper.whiteout(b"", b"a").unwrap();
        upper
            .copy_up_file(b"", b"b", &meta(0o644), 3, &mut |_, n| Ok(vec![b'u'; n]))
            .unwrap();
        upper.ensure_dirs(b"d", &|_| meta(0o755)).unwrap();
        upper.set_opaque(b"d").unwrap();
        upper
            .copy_up_file(b"d", b"z", &meta(0o644), 1, &mut |_, n| Ok(vec![b'z'; n]))
            .unwrap();
        let ns = if upper.is_root_namespace() {
            ""
        } else {
            ",userxattr"
        };
        let opts = format!(
            "lowerdir={},upperdir={},workdir={}{ns}",
            lower.display(),
            root.display(),
            work.display()
        );
        let opts = std::ffi::CString::new(opts).unwrap();
        let flags = rustix::mount::MountFlags::empty();
        if let Err(e) = rustix::mount::mount("overlay", &merged, "overlay", flags, &*opts) {
            eprintln!("skipping: cannot mount overlayfs here: {e}");
            return;
        }
        let _guard = MountGuard(merged.clone());
        assert!(!merged.join("a").exists(), "whiteout hides the lower file");
        assert_eq!(std::fs::read(merged.join("b")).unwrap(), b"uuu");
        let mut names: Vec<_> = std::fs::read_dir(merged.join("d"))
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        names.sort();
        assert_eq!(names, ["z"], "the opaque dir hides lower children");
    }
}
