//! A thin adapter from the kernel's FUSE protocol (fuser) to [`ImageFs`].
//!
//! No filesystem logic lives here: each op converts arguments, calls the
//! matching `ImageFs` method, and converts the answer. The lower view is
//! immutable, so the kernel may cache entries, attributes, directory pages
//! and file pages for as long as it likes.

use crate::fs::{Attr, Errno, FileKind, ImageFs};
use fuser::{
    AccessFlags, Config, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation,
    INodeNo, InitFlags, KernelConfig, LockOwner, MountOption, OpenAccMode, OpenFlags, ReplyAttr,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyXattr, Request, SessionACL, SessionUnmounter,
};
use std::ffi::OsStr;
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// How long the kernel may trust what we told it: the image never changes.
const TTL: Duration = Duration::from_secs(24 * 60 * 60);
/// Largest read the kernel sends and readahead it does (bytes).
const MAX_READAHEAD: u32 = 1024 * 1024;
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
}

struct Adapter {
    fs: ImageFs,
}

/// Mounts `fs` at `mountpoint` and serves it until it is unmounted.
/// `ready` runs once the kernel mount exists, with a handle that unmounts
/// it (for signal handlers).
pub fn serve(
    fs: ImageFs,
    mountpoint: &Path,
    opts: &FuseOptions,
    ready: impl FnOnce(SessionUnmounter),
) -> std::io::Result<()> {
    let mount_options = vec![
        MountOption::FSName(opts.fs_name.clone()),
        MountOption::Subtype("imgfs".into()),
        MountOption::RO,
        MountOption::NoAtime,
        MountOption::Dev,
        MountOption::Suid,
        MountOption::DefaultPermissions,
    ];
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
    let mut session = fuser::Session::new(Adapter { fs }, mountpoint, &config)?;
    ready(session.unmount_callable());
    session.run()
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
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.blocks,
        atime: mtime,
        mtime,
        ctime: mtime,
        crtime: mtime,
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

impl Filesystem for Adapter {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> std::io::Result<()> {
        for flag in [
            InitFlags::FUSE_DO_READDIRPLUS,
            InitFlags::FUSE_READDIRPLUS_AUTO,
            InitFlags::FUSE_PARALLEL_DIROPS,
            InitFlags::FUSE_CACHE_SYMLINKS,
            InitFlags::FUSE_MAX_PAGES,
        ] {
            if config.add_capabilities(flag).is_err() {
                tracing::debug!(?flag, "kernel lacks FUSE capability");
            }
        }
        let _ = config.set_max_readahead(MAX_READAHEAD);
        Ok(())
    }

    fn lookup(&self, _req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        match self.fs.lookup(parent.0, name.as_bytes()) {
            Ok(attr) => reply.entry(&TTL, &file_attr(&attr), Generation(0)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn getattr(&self, _req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        match self.fs.getattr(ino.0) {
            Ok(attr) => reply.attr(&TTL, &file_attr(&attr)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readlink(&self, _req: &Request, ino: INodeNo, reply: ReplyData) {
        match self.fs.readlink(ino.0) {
            Ok(target) => reply.data(target),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn open(&self, _req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY);
        match self.fs.open(ino.0, write) {
            Ok(()) => reply.opened(FileHandle(0), FopenFlags::FOPEN_KEEP_CACHE),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn read(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        match self.fs.read(ino.0, offset, size) {
            Ok(data) => reply.data(&data),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn opendir(&self, _req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        match self.fs.getattr(ino.0) {
            Ok(a) if a.kind == FileKind::Dir => reply.opened(
                FileHandle(0),
                FopenFlags::FOPEN_CACHE_DIR | FopenFlags::FOPEN_KEEP_CACHE,
            ),
            Ok(_) => reply.error(errno(Errno::ENOTDIR)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn readdir(
        &self,
        _req: &Request,
        ino: INodeNo,
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    if reply.add(
                        INodeNo(e.ino),
                        e.next_offset,
                        file_type(e.kind),
                        OsStr::from_bytes(e.name),
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
        _fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.fs.readdir(ino.0, offset) {
            Ok(entries) => {
                for e in entries {
                    let Ok(attr) = self.fs.getattr(e.ino) else {
                        continue;
                    };
                    let full = reply.add(
                        INodeNo(e.ino),
                        e.next_offset,
                        OsStr::from_bytes(e.name),
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

    fn getxattr(&self, _req: &Request, ino: INodeNo, name: &OsStr, size: u32, reply: ReplyXattr) {
        reply_xattr(reply, size, self.fs.getxattr(ino.0, name.as_bytes()));
    }

    fn listxattr(&self, _req: &Request, ino: INodeNo, size: u32, reply: ReplyXattr) {
        match self.fs.listxattr(ino.0) {
            Ok(names) => reply_xattr(reply, size, Ok(&names)),
            Err(e) => reply.error(errno(e)),
        }
    }

    fn access(&self, _req: &Request, ino: INodeNo, mask: AccessFlags, reply: ReplyEmpty) {
        // Only called without default_permissions; writes are never allowed.
        let write = mask.contains(AccessFlags::W_OK);
        match self.fs.open(ino.0, write) {
            Ok(()) => reply.ok(),
            Err(e) => reply.error(errno(e)),
        }
    }
}
