//! A thin adapter from the kernel's FUSE protocol (fuser) to [`OverlayFs`].
//!
//! No filesystem logic lives here: each op converts arguments, calls the
//! matching `OverlayFs` method, and converts the answer. A read-only mount
//! never changes, so the kernel may cache entries, attributes, directory
//! pages and file pages for as long as it likes; image files keep their
//! page cache on a writable mount too.

use crate::fs::{Attr, Errno, FileKind};
use crate::overlay::{Caller, OverlayFs, set_time};
use crate::upper::SetAttr;
use fuser::{
    AccessFlags, BackingId, BsdFileFlags, Config, FileAttr, FileHandle, FileType, Filesystem,
    FopenFlags, Generation, INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenFlags,
    RenameFlags, ReplyAttr, ReplyCreate, ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty,
    ReplyEntry, ReplyOpen, ReplyStatfs, ReplyWrite, ReplyXattr, Request, SessionACL,
    SessionUnmounter, TimeOrNow, WriteFlags,
};
use std::collections::HashMap;
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust an entry, an attribute or an absent name.
/// The image never changes, and a writable mount's upper changes only
/// through this mount (as overlayfs, we do not support editing the upper
/// behind its back): the kernel sees every change as it makes it and drops
/// or updates what it cached (create, unlink, rename, setattr, write). A
/// copy-up keeps the inode number and every name of a hardlink, so nothing
/// it cached goes stale.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Node id 0 in a lookup reply: a negative entry the kernel keeps for the
/// TTL, so a program probing paths that do not exist (the dynamic loader,
/// python's sys.path) asks us once per name.
const NEGATIVE_ENTRY: INodeNo = INodeNo(0);
/// Largest read the kernel sends and readahead it does (bytes).
const MAX_READAHEAD: u32 = 1024 * 1024;
/// How many filesystems may stack under a passthrough file (the kernel's
/// maximum): the upper directory may itself be on an overlayfs.
const PASSTHROUGH_STACK_DEPTH: u32 = 2;
/// Worker threads reading `/dev/fuse`: a cold read blocks only its thread.
pub const DEFAULT_THREADS: usize = 8;

/// Options of one mount.
#[derive(Debug, Clone)]
pub struct FuseOptions {
    /// Shown as the source in `mount` / `/proc/mounts` (the reference).
    pub fs_name: String,
    /// `allow_other` + `default_permissions`: every user sees the image
    /// with its own permissions (needs root or `user_allow_other`).
    pub allow_other: bool,
    pub threads: usize,
    /// Ask for FUSE passthrough of upper files and of image files kept
    /// whole in the cache (root, Linux ≥ 6.9).
    pub passthrough: bool,
}

struct Adapter {
    fs: OverlayFs,
    /// Upper files and kept image files are served by the kernel straight
    /// from the backing file
    /// (FUSE passthrough) when the kernel agreed to it in `init`.
    passthrough: bool,
    backing: Mutex<Backing>,
}

/// Passthrough bookkeeping. The kernel wants one backing file per inode and
/// refuses to mix passthrough and cached opens of one inode, so an inode
/// with cached opens (image files, or an upper file whose backing failed)
/// gets cached opens until they are all closed.
#[derive(Default)]
struct Backing {
    by_handle: HashMap<u64, Arc<BackingId>>,
    by_inode: HashMap<u64, Weak<BackingId>>,
    cached_opens: HashMap<u64, u32>,
}

impl Backing {
    fn cached_open(&mut self, ino: u64) {
        *self.cached_opens.entry(ino).or_default() += 1;
    }

    fn released(&mut self, ino: u64, fh: u64) {
        if self.by_handle.remove(&fh).is_some() {
            if self
                .by_inode
                .get(&ino)
                .is_some_and(|id| id.strong_count() == 0)
            {
                self.by_inode.remove(&ino);
            }
            return;
        }
        if let Some(count) = self.cached_opens.get_mut(&ino) {
            *count -= 1;
            if *count == 0 {
                self.cached_opens.remove(&ino);
            }
        }
    }
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted.
/// `ready` runs once the kernel mount exists, with a handle that unmounts
/// it (for signal handlers).
pub fn serve(
    fs: OverlayFs,
    mountpoint: &Path,
    opts: &FuseOptions,
    ready: impl FnOnce(SessionUnmounter),
) -> std::io::Result<()> {
    let writable = fs.is_writable();
    let mut mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("imgfs".into()),
        MountOption::NoAtime,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::DefaultPermissions,
    ];
    if !writable {
        mount_options.push(MountOption::RO);
    }
    // fuser turns SessionACL::All into the `allow_other` mount option.
    let acl = if opts.allow_other {
        SessionACL::All
    } else {
        SessionACL::Owner
    };
    let config = {
        let mut c = Config::default();
        c.mount_options = mount_options;
        c.acl = acl;
        c.n_threads = Some(opts.threads.max(1));
        c.clone_fd = true;
        c
    };
    let adapter = Adapter {
        fs,
        passthrough: opts.passthrough,
        backing: Mutex::default(),
    };
    let mut session = fuser::Session::new(adapter, mountpoint, &config)?;
    raise_readahead(mountpoint);
    ready(session.unmount_callable());
    session.run()
}

/// The kernel caps a FUSE mount's readahead at its backing device info's
/// `read_ahead_kb` (128 KiB), whatever `init` asks for; raising it to
/// [`MAX_READAHEAD`] makes sequential reads come in 1 MiB requests (a
/// third fewer round trips through us on a warm read, fewer Range requests
/// on a cold one). Root only; best effort. The device number comes from
/// mountinfo: a `stat` of the mountpoint would ask us, and we are not
/// serving yet.
fn raise_readahead(mountpoint: &Path) {
    let Some(device) = mount_device(mountpoint) else {
        tracing::debug!("mount not found in /proc/self/mountinfo; default readahead");
        return;
    };
    let knob = format!("/sys/class/bdi/{device}/read_ahead_kb");
    if let Err(e) = std::fs::write(&knob, (MAX_READAHEAD / 1024).to_string()) {
        tracing::debug!(error = %e, knob, "default readahead");
    }
}

/// `major:minor` of the newest mount on `mountpoint`.
fn mount_device(mountpoint: &Path) -> Option<String> {
    let path = mountpoint.canonicalize().ok()?;
    let mountinfo = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    mountinfo_device(&mountinfo, &path.to_string_lossy())
}

/// Field 3 of the last mountinfo line whose field 5 (octal-escaped) is
/// `path`.
fn mountinfo_device(mountinfo: &str, path: &str) -> Option<String> {
    let escaped = path
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    mountinfo.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        (fields.get(4) == Some(&escaped.as_str())).then(|| fields.get(2).map(|d| d.to_string()))?
    })
}

fn errno(e: Errno) -> fuser::Errno {
    fuser::Errno::from_i32(e.0)
}

fn file_type(kind: FileKind) -> FileType {
    match kind {
        FileKind::Dir => FileType::Directory,
        FileKind::File => FileType::RegularFile,
        FileKind::Symlink => FileType::Symlink,
        FileKind::CharDevice => FileType::CharDevice,
        FileKind::BlockDevice => FileType::BlockDevice,
        FileKind::Fifo => FileType::NamedPipe,
        FileKind::Socket => FileType::Socket,
    }
}

fn system_time(secs: i64, nsec: u32) -> SystemTime {
    let nanos = Duration::from_nanos(u64::from(nsec));
    if secs >= 0 {
        UNIX_EPOCH + Duration::from_secs(secs as u64) + nanos
    } else {
        UNIX_EPOCH - Duration::from_secs(secs.unsigned_abs()) + nanos
    }
}

fn file_attr(a: &Attr) -> FileAttr {
    let mtime = system_time(a.mtime, a.mtime_nsec);
    let atime = system_time(a.atime, a.atime_nsec);
    let ctime = system_time(a.ctime, a.ctime_nsec);
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime,
        mtime,
        ctime,
        crtime: ctime,
        kind: file_type(a.kind),
        perm: a.perm,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: a.rdev,
        blksize: crate::fs::BLOCK,
        flags: 0,
    }
}

/// What a negative lookup reply carries: only the node id (0) is read.
fn negative_entry() -> FileAttr {
    FileAttr {
        ino: NEGATIVE_ENTRY,
        size: 0,
        blocks: 0,
        atime: UNIX_EPOCH,
        mtime: UNIX_EPOCH,
        ctime: UNIX_EPOCH,
        crtime: UNIX_EPOCH,
        kind: FileType::RegularFile,
        perm: 0,
        nlink: 0,
        uid: 0,
        gid: 0,
        rdev: 0,
        blksize: crate::fs::BLOCK,
        flags: 0,
    }
}

/// Answers an xattr request: the size when asked for 0 bytes, ERANGE when
/// the caller's buffer is too small.
fn reply_xattr(reply: ReplyXattr, size: u32, value: Result<&[u8], Errno>) {
    match value {
        Err(e) => reply.error(errno(e)),
        Ok(v) if size == 0 => reply.size(v.len() as u32),
        Ok(v) if v.len() > size as usize => reply.error(errno(Errno::ERANGE)),
        Ok(v) => reply.data(v),
    }
}

fn caller(req: &Request) -> Caller {
    Caller {
        uid: req.uid(),
        gid: req.gid(),
    }
}

fn time_arg(t: Option<TimeOrNow>) -> Option<crate::upper::SetTime> {
    t.map(|t| match t {
        TimeOrNow::Now => set_time(true, 0, 0),
        TimeOrNow::SpecificTime(at) => {
            let (secs, nsec) = match at.duration_since(UNIX_EPOCH) {
                Ok(d) => (d.as_secs() as i64, d.subsec_nanos()),
                Err(e) => {
                    let d = e.duration();
                    // Before the epoch: whole seconds down, nanoseconds up.
                    let nsec = d.subsec_nanos();
                    let secs = -(d.as_secs() as i64) - i64::from(nsec > 0);
                    (secs, if nsec > 0 { 1_000_000_000 - nsec } else { 0 })
                }
            };
            set_time(false, secs, nsec)
        }
    })
}

impl Adapter {
    fn backing(&self) -> std::sync::MutexGuard<'_, Backing> {
        self.backing.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The backing id for an upper file's open, if passthrough may be used
    /// for it; `open_backing` is `ReplyOpen::open_backing` or its create twin.
    fn passthrough_id(
        &self,
        ino: u64,
        fh: u64,
        open_backing: impl FnOnce(&std::fs::File) -> std::io::Result<BackingId>,
    ) -> Option<Arc<BackingId>> {
        if !self.passthrough || fh == 0 {
            return None;
        }
        let mut backing = self.backing();
        if backing.cached_opens.contains_key(&ino) {
            return None;
        }
        let id = match backing.by_inode.get(&ino).and_then(Weak::upgrade) {
            Some(id) => id,
            None => {
                let file = self.fs.file(fh).ok()?;
                match open_backing(&file) {
                    Ok(id) => {
                        let id = Arc::new(id);
                        backing.by_inode.insert(ino, Arc::downgrade(&id));
                        id
                    }
                    Err(e) => {
                        tracing::debug!(error = %e, ino, "passthrough refused; serving through imgfs");
                        return None;
                    }
                }
            }
        };
        backing.by_handle.insert(fh, id.clone());
        Some(id)
    }

    fn entry(&self, reply: ReplyEntry, result: Result<Attr, Errno>) {
        match result {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn empty(reply: ReplyEmpty, result: Result<(), Errno>) {
        match result {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
            // O_TRUNC reaches `open` (not a separate SETATTR after it), so
            // a truncating open of an image file copies it up empty.
            InitFlags::FUSE_ATOMIC_O_TRUNC,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        let _ = config.set_max_readahead(MAX_READAHEAD);
        // Upper files, and image files kept whole in the cache.
        if self.passthrough {
            // Depth 2: the upper may itself live on an overlayfs.
            let granted = config.add_capabilities(InitFlags::FUSE_PASSTHROUGH).is_ok()
                && config.set_max_stack_depth(PASSTHROUGH_STACK_DEPTH).is_ok();
            if !granted {
                tracing::info!("kernel refused FUSE passthrough; every read goes through imgfs");
            }
            self.passthrough = granted;
        } else {
            self.passthrough = false;
        }
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Err(Errno::ENOENT) => reply.entry(&TTL, &negative_entry(), Generation(0)),
            result => self.entry(reply, result),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn setattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        mode: Option<u32>,
        uid: Option<u32>,
        gid: Option<u32>,
        size: Option<u64>,
        atime: Option<TimeOrNow>,
        mtime: Option<TimeOrNow>,
        _ctime: Option<SystemTime>,
        _fh: Option<FileHandle>,
        _crtime: Option<SystemTime>,
        _chgtime: Option<SystemTime>,
        _bkuptime: Option<SystemTime>,
        _flags: Option<BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let change = SetAttr {
            mode: mode.map(|m| m & 0o7777),
            uid,
            gid,
            size,
            atime: time_arg(atime),
            mtime: time_arg(mtime),
        };
        match self.fs.setattr(ino.0, &change) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(&target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn mknod(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        rdev: u32,
        reply: ReplyEntry,
    ) {
        let result = self
            .fs
            .mknod(parent.0, name.as_bytes(), mode, rdev, caller(req));
        self.entry(reply, result);
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let result = self.fs.mkdir(parent.0, name.as_bytes(), mode, caller(req));
        self.entry(reply, result);
    }

    fn unlink(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.unlink(parent.0, name.as_bytes()));
    }

    fn rmdir(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.rmdir(parent.0, name.as_bytes()));
    }

    fn symlink(
        &self,
        req: &Request,
        parent: INodeNo,
        link_name: &OsStr,
        target: &Path,
        reply: ReplyEntry,
    ) {
        let result = self.fs.symlink(
            parent.0,
            link_name.as_bytes(),
            target.as_os_str().as_bytes(),
            caller(req),
        );
        self.entry(reply, result);
    }

    fn rename(
        &self,
        _req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        let result = self.fs.rename(
            parent.0,
            name.as_bytes(),
            newparent.0,
            newname.as_bytes(),
            flags.bits(),
        );
        Self::empty(reply, result);
    }

    fn link(
        &self,
        _req: &Request,
        ino: INodeNo,
        newparent: INodeNo,
        newname: &OsStr,
        reply: ReplyEntry,
    ) {
        self.entry(reply, self.fs.link(ino.0, newparent.0, newname.as_bytes()));
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let (fh, keep_cache) = match self.fs.open(ino.0, flags.0) {
            Ok(opened) => opened,
            Err(e) => return reply.error(errno(e)),
        };
        if let Some(id) = self.passthrough_id(ino.0, fh, |f| reply.open_backing(f)) {
            return reply.opened_passthrough(FileHandle(fh), FopenFlags::empty(), &id);
        }
        self.backing().cached_open(ino.0);
        let flags = if keep_cache {
            FopenFlags::FOPEN_KEEP_CACHE
        } else {
            FopenFlags::empty()
        };
        reply.opened(FileHandle(fh), flags);
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        // tests/passthrough.rs counts these to prove the kernel serves
        // passthrough files without us.
        tracing::trace!(ino = ino.0, offset, size, "read");
        match self.fs.read(ino.0, fh.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn write(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        match self.fs.write(fh.0, offset, data) {
            Ok(n) => reply.written(n),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn flush(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn release(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        self.backing().released(ino.0, fh.0);
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsync(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        datasync: bool,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fsync(fh.0, datasync));
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        // The kernel keeps a listing across opens and drops it when the
        // directory changes through the mount (its version and mtime move
        // on create, unlink and rename), the only way a writable mount's
        // directories change.
        match self.fs.opendir(ino.0) {
            Ok(fh) => reply.opened(
                FileHandle(fh),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.listing(fh.0) {
            Ok(listing) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, e) in listing.iter().enumerate().skip(start) {
                    let next = i as u64 + 1;
                    if reply.add(
                        INodeNo(e.ino),
                        next,
                        file_type(e.kind),
                        OsStr::from_bytes(&e.name),
                    ) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdirplus(
        &self,
        _req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.fs.listing(fh.0) {
            Ok(listing) => {
                let start = usize::try_from(offset).unwrap_or(usize::MAX);
                for (i, e) in listing.iter().enumerate().skip(start) {
                    // Each entry is a lookup for the kernel: register it as one.
                    let attr = match e.name.as_slice() {
                        b"." => self.fs.getattr(ino.0),
                        b".." => self.fs.lookup(ino.0, b".."),
                        name => self.fs.lookup(ino.0, name),
                    };
                    let Ok(attr) = attr else { continue };
                    let full = reply.add(
                        INodeNo(attr.ino),
                        i as u64 + 1,
                        OsStr::from_bytes(&e.name),
                        &TTL,
                        &file_attr(&attr),
                        Generation(0),
                    );
                    if full {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.release(fh.0);
        reply.ok();
    }

    fn fsyncdir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        reply.ok();
    }

    fn statfs(&self, _req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        let s = self.fs.statfs();
        reply.statfs(
            s.blocks,
            0,
            0,
            s.files,
            0,
            s.block_size,
            s.name_max,
            s.block_size,
        );
    }

    fn setxattr(
        &self,
        _req: &Request,
        ino: INodeNo,
        name: &OsStr,
        value: &[u8],
        flags: i32,
        _position: u32,
        reply: ReplyEmpty,
    ) {
        Self::empty(
            reply,
            self.fs.setxattr(ino.0, name.as_bytes(), value, flags),
        );
    }

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        let value = self.fs.getxattr(ino.0, name.as_bytes());
        reply_xattr(reply, size, value.as_deref().map_err(|e| *e));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        let names = self.fs.listxattr(ino.0);
        reply_xattr(reply, size, names.as_deref().map_err(|e| *e));
    }

    fn removexattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        Self::empty(reply, self.fs.removexattr(ino.0, name.as_bytes()));
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without default_permissions, which imgfs always sets.
        let result = match self.fs.getattr(ino.0) {
            Ok(_) if mask.contains(AccessFlags::W_OK) && !self.fs.is_writable() => {
                Err(Errno::EROFS)
            }
            Ok(_) => Ok(()),
            Err(e) => Err(e),
        };
        Self::empty(reply, result);
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        match self
            .fs
            .create(parent.0, name.as_bytes(), mode, flags, caller(req))
        {
            Ok((attr, fh)) => {
                // Like open: the kernel fails an open with EIO if one inode
                // mixes passthrough and cached opens, and the create's handle
                // is still open (its RELEASE is asynchronous) when the file
                // is opened again, so it must be counted either way.
                let entry = file_attr(&attr);
                if let Some(id) = self.passthrough_id(attr.ino, fh, |f| reply.open_backing(f)) {
                    return reply.created_passthrough(
                        &TTL,
                        &entry,
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                        &id,
                    );
                }
                self.backing().cached_open(attr.ino);
                reply.created(
                    &TTL,
                    &entry,
                    Generation(0),
                    FileHandle(fh),
                    FopenFlags::empty(),
                );
            }
            Err(e) => reply.error(errno(e)),
        }
    }

    fn fallocate(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        length: u64,
        mode: i32,
        reply: ReplyEmpty,
    ) {
        Self::empty(reply, self.fs.fallocate(fh.0, offset, length, mode));
    }
}

#[cfg(test)]
mod tests {
    use super::mountinfo_device;

    #[test]
    fn the_newest_mount_on_an_escaped_path_names_the_device() {
        let mountinfo = "\
22 1 254:0 / / rw,relatime shared:1 - ext4 /dev/vda rw
97 22 0:41 / /tmp/a\\040b rw,nosuid shared:50 - fuse.imgfs img rw
98 97 0:42 / /tmp/a\\040b rw,nosuid shared:51 - fuse.imgfs img rw
99 22 0:43 / /tmp/a rw,nosuid shared:52 - fuse.imgfs img rw
";
        assert_eq!(
            mountinfo_device(mountinfo, "/tmp/a b").as_deref(),
            Some("0:42")
        );
        assert_eq!(
            mountinfo_device(mountinfo, "/tmp/a").as_deref(),
            Some("0:43")
        );
        assert_eq!(mountinfo_device(mountinfo, "/tmp/c"), None);
    }
}
