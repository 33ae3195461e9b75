//! Writable mounts: every mutating operation through a real mount, on image
//! entries, image directories and new entries; the same view after a
//! remount with the same `--upper`; the image cache untouched; kernel
//! overlayfs reading our upper over a reference unpack shows the same tree;
//! a chroot workflow; nothing written outside the upper.

mod common;

use common::*;
use rustix::fs::{CWD, Mode, OFlags, RenameFlags};
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the cache must stay the same to count as settled.
const SETTLE: Duration = Duration::from_millis(500);

fn writable(reference: &str, upper: &Path, cache: &Path) -> Mount {
    Mount::new(
        reference,
        MountOptions {
            cache_dir: Some(cache.to_path_buf()),
            extra_args: vec!["--upper".into(), upper.display().to_string()],
            ..MountOptions::default()
        },
    )
}

/// sha256 of every file of the cache except logs, by relative path.
fn cache_snapshot(cache: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut stack = vec![cache.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read cache dir") {
            let path = entry.expect("entry").path();
            let rel = path.strip_prefix(cache).expect("inside").to_path_buf();
            if rel.starts_with("logs") || rel.starts_with("tmp") || rel.starts_with("locks") {
                continue;
            }
            // Files being written in the background (kept whole) are
            // temporary names until they are renamed into place.
            let temporary = path
                .file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with('.'));
            if path.is_dir() {
                stack.push(path);
            } else if !temporary && let Ok(hash) = sha256_file(&path) {
                out.insert(rel, hash);
            }
        }
    }
    out
}

/// [`cache_snapshot`] once the daemon's background writes (files read whole,
/// kept as plain files) have stopped changing it.
fn settled_cache_snapshot(cache: &Path) -> BTreeMap<PathBuf, String> {
    let deadline = Instant::now() + WALK_TIMEOUT;
    let mut last = cache_snapshot(cache);
    loop {
        std::thread::sleep(SETTLE);
        let now = cache_snapshot(cache);
        if now == last || Instant::now() > deadline {
            return now;
        }
        last = now;
    }
}

/// Reads every regular file so the block cache holds all of the image.
fn read_everything(root: &Path) {
    let out = run_ok(
        Command::new("sh")
            .arg("-c")
            .arg("find . -type f -exec cat {} + > /dev/null")
            .current_dir(root),
        WALK_TIMEOUT,
    );
    drop(out);
}

/// `compare_trees`, except for the link count of merged directories, which
/// kernel overlayfs reports as 1 (it does not count them; imgfs does).
fn differences(expected: &Path, actual: &Path) -> Vec<String> {
    compare_trees(expected, actual)
        .into_iter()
        .filter(|line| {
            let Some((path, what)) = line.trim().split_once(": ") else {
                return true;
            };
            let merged_dir_nlink = what.starts_with("nlink 1 != ")
                && actual.join(path.trim_start_matches('/')).is_dir();
            !merged_dir_nlink
        })
        .collect()
}

fn sh(dir: &Path, script: &str) {
    run_ok(
        Command::new("sh").arg("-ec").arg(script).current_dir(dir),
        WALK_TIMEOUT,
    );
}

/// The operations of issue 3 on image files, image directories and new
/// entries; returns what must hold afterwards.
fn mutate(root: &Path) {
    // Image files: append, truncate, chmod, chown, times, xattrs.
    let file = root.join("bin/busybox");
    let original = fs::read(&file).expect("read image file");
    fs::OpenOptions::new()
        .append(true)
        .open(&file)
        .and_then(|mut f| f.write_all(b"appended"))
        .expect("append to an image file");
    let mut expected = original.clone();
    expected.extend_from_slice(b"appended");
    assert_eq!(fs::read(&file).expect("read back"), expected);
    sh(
        root,
        "truncate -s 3 times/epoch-plus-one; chmod 4711 modes/setgid; chown 4321:8765 bin/busybox; \
         touch -m -d '2001-02-03 04:05:06.123456789' bin/busybox; setfattr -n user.added -v yes bin/busybox; \
         echo more >> links/a; chmod 0600 etc/hostname",
    );
    // New entries of every kind.
    fs::write(root.join("new-file"), b"fresh\n").expect("create a file");
    fs::create_dir_all(root.join("new/deep/dir")).expect("mkdir -p");
    fs::write(root.join("new/deep/dir/inside"), b"deep\n").expect("create deep");
    std::os::unix::fs::symlink("new-file", root.join("new-symlink")).expect("symlink");
    rustix::fs::mknodat(
        CWD,
        root.join("new-fifo"),
        rustix::fs::FileType::Fifo,
        Mode::from_raw_mode(0o640),
        0,
    )
    .expect("mkfifo");
    rustix::fs::mknodat(
        CWD,
        root.join("new-chardev"),
        rustix::fs::FileType::CharacterDevice,
        Mode::from_raw_mode(0o600),
        rustix::fs::makedev(4, 5),
    )
    .expect("mknod char device");
    // Image hardlinks stay one inode after a copy-up through one name, and
    // a new link to an image file joins them.
    fs::hard_link(root.join("links/c"), root.join("c-link")).expect("link to an image file");
    for (x, y) in [("links/a", "links/a3"), ("links/c2", "c-link")] {
        let a = fs::symlink_metadata(root.join(x)).expect("stat");
        let b = fs::symlink_metadata(root.join(y)).expect("stat");
        assert_eq!(
            (a.ino(), a.nlink()),
            (b.ino(), b.nlink()),
            "{x} and {y} are not one inode"
        );
    }
    assert_eq!(
        fs::read(root.join("links/a3")).expect("read"),
        b"group of three\nmore\n"
    );
    assert_eq!(
        fs::symlink_metadata(root.join("links/c"))
            .expect("stat")
            .nlink(),
        3
    );
    // Deletions: an image file, an image directory with children.
    fs::remove_file(root.join("new-symlink")).expect("unlink a new symlink");
    std::os::unix::fs::symlink("/bin/busybox", root.join("new-symlink")).expect("symlink again");
    sh(root, "rm etc/hostname; rm -r wh repl");
    // Renames: image file, image dir (its subtree comes along), across dirs,
    // over an existing file, and the two renameat2 flags.
    fs::rename(root.join("new-file"), root.join("new/renamed-file")).expect("rename a new file");
    fs::rename(root.join("usr"), root.join("usr-moved")).expect("rename an image directory");
    fs::rename(root.join("bin/sh"), root.join("new/sh-moved")).expect("rename an image symlink");
    fs::write(root.join("swap-a"), b"A").expect("create");
    fs::write(root.join("swap-b"), b"B").expect("create");
    rustix::fs::renameat_with(
        CWD,
        root.join("swap-a"),
        CWD,
        root.join("swap-b"),
        RenameFlags::EXCHANGE,
    )
    .expect("RENAME_EXCHANGE");
    assert_eq!(fs::read(root.join("swap-a")).expect("read"), b"B");
    let refused = rustix::fs::renameat_with(
        CWD,
        root.join("swap-a"),
        CWD,
        root.join("swap-b"),
        RenameFlags::NOREPLACE,
    );
    assert_eq!(refused, Err(rustix::io::Errno::EXIST));
    // Recreate a deleted image directory: it must come back empty.
    fs::create_dir(root.join("wh")).expect("mkdir over a deleted image dir");
    assert_eq!(fs::read_dir(root.join("wh")).expect("list").count(), 0);
    // Directory modes and sticky /tmp-like directories.
    fs::set_permissions(root.join("new"), fs::Permissions::from_mode(0o1777)).expect("chmod dir");
    // Data syncs.
    let f = fs::OpenOptions::new()
        .write(true)
        .open(root.join("swap-a"))
        .expect("open");
    f.sync_all().expect("fsync");
    rustix::fs::fallocate(&f, rustix::fs::FallocateFlags::empty(), 0, 1 << 20).expect("fallocate");
    assert_eq!(
        fs::metadata(root.join("swap-a")).expect("stat").len(),
        1 << 20
    );
}

#[test]
fn every_operation_survives_a_remount_and_leaves_the_cache_alone() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:rw", Compress::Gzip);
    let work = tempfile::tempdir().expect("tempdir");
    let upper = work.path().join("upper");
    let cache = work.path().join("cache");

    let mount = writable(&reference, &upper, &cache);
    read_everything(mount.path());
    let before = settled_cache_snapshot(&cache);
    mutate(mount.path());
    let snapshot = work.path().join("snapshot");
    run_ok(
        Command::new("cp")
            .arg("-a")
            .arg(mount.path())
            .arg(&snapshot),
        WALK_TIMEOUT,
    );
    mount.unmount();

    let again = writable(&reference, &upper, &cache);
    let diffs = differences(&snapshot, again.path());
    assert!(
        diffs.is_empty(),
        "remount with the same --upper differs from before:\n{}",
        diffs.join("\n")
    );
    again.unmount();
    assert_eq!(
        before,
        settled_cache_snapshot(&cache),
        "the image cache changed"
    );
}

#[test]
fn kernel_overlayfs_over_a_reference_unpack_shows_the_same_tree() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:ovl", Compress::None);
    let work = tempfile::tempdir().expect("tempdir");
    let upper = work.path().join("upper");
    let cache = work.path().join("cache");
    let lower = reference_unpack(&reg, &reference);
    let mount = writable(&reference, &upper, &cache);
    // The kernel caches entries, attributes and absent names for a day on
    // writable mounts too; fill those caches before the changes (every
    // entry, and the names mutate() creates), so what they hold afterwards
    // is checked against the truth.
    compare_trees(&lower.path(), mount.path());
    for name in [
        "new-file",
        "new",
        "c-link",
        "swap-a",
        "swap-b",
        "usr-moved",
        "new-symlink",
    ] {
        assert!(fs::symlink_metadata(mount.path().join(name)).is_err());
    }
    mutate(mount.path());
    // The live mount, against overlayfs over a copy of its upper.
    let live_upper = work.path().join("live-upper");
    run_ok(
        Command::new("cp").arg("-a").arg(&upper).arg(&live_upper),
        SHORT,
    );
    let live = overlay_differences(
        &lower.path(),
        &live_upper,
        work.path(),
        mount.path(),
        "live",
    );
    mount.unmount();
    assert!(
        live.is_empty(),
        "kernel overlayfs and the live imgfs mount differ:\n{}",
        live.join("\n")
    );

    let imgfs = writable(&reference, &upper, &cache);
    let diffs = overlay_differences(&lower.path(), &upper, work.path(), imgfs.path(), "remount");
    assert!(
        diffs.is_empty(),
        "kernel overlayfs and imgfs differ:\n{}",
        diffs.join("\n")
    );
}

/// Mounts kernel overlayfs of `lower` and `upper` (in a directory of `work`
/// named after `tag`) and lists how `imgfs` differs from it.
fn overlay_differences(
    lower: &Path,
    upper: &Path,
    work: &Path,
    imgfs: &Path,
    tag: &str,
) -> Vec<String> {
    let ovl = work.join(format!("ovl-{tag}"));
    let workdir = work.join(format!("ovl-work-{tag}"));
    fs::create_dir_all(&ovl).expect("mkdir");
    fs::create_dir_all(&workdir).expect("mkdir");
    run_ok(
        Command::new("mount")
            .args(["-t", "overlay", "overlay", "-o"])
            .arg(format!(
                "lowerdir={},upperdir={},workdir={}",
                lower.display(),
                upper.display(),
                workdir.display()
            ))
            .arg(&ovl),
        SHORT,
    );
    let diffs = differences(&ovl, imgfs);
    let _ = Command::new("umount").arg(&ovl).status();
    diffs
}

#[test]
fn chroot_workflow_edits_renames_and_deletes_across_the_tree() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "busybox:rw", Compress::Gzip);
    let work = tempfile::tempdir().expect("tempdir");
    let upper = work.path().join("upper");
    let mount = writable(&reference, &upper, &work.path().join("cache"));
    let script = "set -e
        echo 'welcome' > /etc/motd
        sed -i 's/^root:x:0:0:root:/root:x:0:0:the admin:/' /etc/passwd
        mkdir -p /srv/app/data && cd /srv/app
        for i in 1 2 3 4 5; do echo $i > data/f$i; done
        busybox tar -cf /tmp/app.tar data && rm -r data && busybox tar -xf /tmp/app.tar
        mv data/f1 data/first && ln data/first data/also-first && ln -s first data/sym
        rm /tmp/app.tar && rm -f /bin/ls && mv /home /home2
        chmod 0700 /srv/app && chown 1000:1000 /srv/app/data/f2
        cat data/also-first data/sym; ls /srv/app/data | busybox tr '\\n' ' '; grep 'the admin' /etc/passwd";
    let out = run(
        Command::new("chroot")
            .arg(mount.path())
            .args(["/bin/busybox", "sh", "-c", script]),
        WALK_TIMEOUT,
    );
    assert!(
        out.success(),
        "chroot script failed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
    assert!(out.stdout.contains("1\n1\n"), "{}", out.stdout);
    assert!(
        out.stdout.contains("also-first f2 f3 f4 f5 first sym"),
        "{}",
        out.stdout
    );
    assert!(!mount.path().join("bin/ls").exists());
    assert!(mount.path().join("home2").is_dir() && !mount.path().join("home").exists());
    // Permissions of what was written hold for other users.
    let denied = run(
        Command::new("chroot")
            .arg("--userspec=1000:1000")
            .arg(mount.path())
            .args(["/bin/busybox", "sh", "-c", "ls /srv/app"]),
        SHORT,
    );
    assert!(
        !denied.success(),
        "a 0700 root directory was readable by uid 1000"
    );
    // The changes are in the upper, in overlayfs format.
    let whiteout = fs::symlink_metadata(upper.join("bin/ls")).expect("whiteout for /bin/ls");
    assert_eq!(
        (whiteout.mode() & libc_ifmt(), whiteout.rdev()),
        (0o020000, 0)
    );
    assert_eq!(
        fs::read_to_string(upper.join("etc/motd")).expect("motd"),
        "welcome\n"
    );
}

fn libc_ifmt() -> u32 {
    0o170000
}

#[test]
fn image_symlinks_and_a_tampered_upper_never_lead_outside() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "hostile", "hostile:rw", Compress::None);
    let work = tempfile::tempdir().expect("tempdir");
    let upper = work.path().join("upper");
    let outside = work.path().join("outside");
    fs::create_dir_all(&outside).expect("mkdir");
    let mount = writable(&reference, &upper, &work.path().join("cache"));
    // Writes through image symlinks resolve inside the chroot, so they land
    // in the upper, never on the host.
    let busybox = ["/bin/busybox", "/usr/bin/busybox"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .expect("busybox-static");
    fs::copy(busybox, mount.path().join("busybox")).expect("copy busybox in");
    fs::set_permissions(
        mount.path().join("busybox"),
        fs::Permissions::from_mode(0o755),
    )
    .expect("chmod");
    let out = run(
        Command::new("chroot").arg(mount.path()).args([
            "/busybox",
            "sh",
            "-c",
            "mkdir -p /etc && echo pwned > /evil/imgfs-pwned && echo pwned > /evil-rel/imgfs-pwned-rel",
        ]),
        SHORT,
    );
    assert!(out.success(), "{}\n{}", out.stdout, out.stderr);
    assert!(!Path::new("/etc/imgfs-pwned").exists() && !Path::new("/etc/imgfs-pwned-rel").exists());
    assert!(upper.join("etc/imgfs-pwned").exists());
    // Someone swaps a directory of the upper for a symlink while mounted.
    // Through a descriptor of the directory (so the kernel asks imgfs about
    // the inode it knows, not the new symlink), imgfs must refuse to follow.
    fs::create_dir_all(mount.path().join("victim")).expect("mkdir");
    fs::write(mount.path().join("victim/before"), b"x").expect("write");
    let dir = fs::File::open(mount.path().join("victim")).expect("open dir");
    fs::rename(upper.join("victim"), work.path().join("victim-moved")).expect("move away");
    std::os::unix::fs::symlink(&outside, upper.join("victim")).expect("plant symlink");
    let create = OFlags::CREATE | OFlags::WRONLY;
    assert!(rustix::fs::openat(&dir, "after", create, Mode::from_raw_mode(0o644)).is_err());
    assert!(rustix::fs::mkdirat(&dir, "dir", Mode::from_raw_mode(0o755)).is_err());
    assert!(rustix::fs::symlinkat("x", &dir, "link").is_err());
    assert_eq!(
        fs::read_dir(&outside).expect("list outside").count(),
        0,
        "imgfs wrote outside its upper"
    );
}

/// What pjdfstest found: names of hardlinks, open unlinked files, sockets,
/// and access/change times.
#[test]
fn posix_details_found_by_pjdfstest() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "busybox:posix", Compress::None);
    let work = tempfile::tempdir().expect("tempdir");
    let mount = writable(
        &reference,
        &work.path().join("upper"),
        &work.path().join("cache"),
    );
    let root = mount.path();

    // Unlinking the name an inode was first found by leaves the others working.
    fs::write(root.join("a"), b"data").expect("create");
    fs::hard_link(root.join("a"), root.join("b")).expect("link");
    fs::remove_file(root.join("a")).expect("unlink");
    assert_eq!(
        fs::symlink_metadata(root.join("b"))
            .expect("stat b")
            .nlink(),
        1
    );
    fs::hard_link(root.join("b"), root.join("c")).expect("link from the surviving name");
    assert_eq!(fs::read(root.join("c")).expect("read c"), b"data");

    // An open file keeps answering fstat after its last name is gone.
    let mut open = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(root.join("c"))
        .expect("open");
    fs::remove_file(root.join("b")).expect("unlink b");
    fs::remove_file(root.join("c")).expect("unlink c");
    open.write_all(b"++").expect("write after unlink");
    assert_eq!(open.metadata().expect("fstat after unlink").len(), 4);

    // Unix sockets can be bound in the mount.
    let socket = root.join("sock");
    let listener = std::os::unix::net::UnixListener::bind(&socket).expect("bind a unix socket");
    assert!(std::os::unix::fs::FileTypeExt::is_socket(
        &fs::symlink_metadata(&socket).expect("stat").file_type()
    ));
    drop(listener);

    // chmod moves ctime; an explicit atime reads back.
    let before = fs::symlink_metadata(root.join("etc/passwd")).expect("stat");
    std::thread::sleep(std::time::Duration::from_millis(20));
    fs::set_permissions(root.join("etc/passwd"), fs::Permissions::from_mode(0o600)).expect("chmod");
    let after = fs::symlink_metadata(root.join("etc/passwd")).expect("stat");
    assert!(
        (after.ctime(), after.ctime_nsec()) > (before.ctime(), before.ctime_nsec()),
        "ctime did not move with chmod"
    );
    sh(root, "touch -a -d '2003-04-05 06:07:08' etc/passwd");
    assert_eq!(
        fs::symlink_metadata(root.join("etc/passwd"))
            .expect("stat")
            .atime(),
        1_049_522_828
    );
}

/// A 1,500-level directory chain (hostile or not): whiteouts of it, copy-up
/// through it and renaming it work without exhausting a thread's stack.
#[test]
fn deep_directory_chains_do_not_recurse_per_level() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "deep", "deep:latest", Compress::Gzip);
    let work = tempfile::tempdir().expect("tempdir");
    let upper = work.path().join("upper");
    let mount = writable(&reference, &upper, &work.path().join("cache"));
    let levels = 1500;
    let bottom_dir = format!("top{}", "/d".repeat(levels));
    assert!(
        !mount.path().join("gone/x").exists(),
        "the whited-out chain is still visible"
    );
    // The kernel takes at most PATH_MAX per call: walk down in pieces.
    let mut dir = fs::File::open(mount.path()).expect("open root");
    for piece in bottom_dir.as_bytes().chunks(2000) {
        let piece = std::str::from_utf8(piece).expect("ascii").trim_matches('/');
        let fd = rustix::fs::openat(
            &dir,
            piece,
            OFlags::DIRECTORY | OFlags::RDONLY,
            Mode::empty(),
        )
        .expect("walk down the chain");
        dir = fs::File::from(fd);
    }
    let fd = rustix::fs::openat(
        &dir,
        "bottom",
        OFlags::WRONLY | OFlags::APPEND,
        Mode::empty(),
    )
    .expect("open the bottom file for writing (copy-up of 1,500 parents)");
    let mut file = fs::File::from(fd);
    file.write_all(b"more\n").expect("append");
    drop(file);
    fs::rename(mount.path().join("top"), mount.path().join("moved"))
        .expect("rename the chain (copy-up of the whole subtree)");
    assert!(!mount.path().join("top").exists());
    let out = run_ok(
        Command::new("find")
            .arg(mount.path().join("moved"))
            .args(["-name", "bottom", "-exec", "cat", "{}", ";"]),
        WALK_TIMEOUT,
    );
    assert_eq!(out.stdout, "at the bottom\nmore\n");
}

/// A file opened from the image before another open copies it up keeps
/// reading the image's bytes (as with kernel overlayfs), never EIO.
#[test]
fn a_handle_opened_before_copy_up_keeps_reading_the_image() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "busybox:handles", Compress::None);
    let work = tempfile::tempdir().expect("tempdir");
    let mount = writable(
        &reference,
        &work.path().join("upper"),
        &work.path().join("cache"),
    );
    let path = mount.path().join("etc/passwd");
    let before = fs::read(&path).expect("read");
    let reader = fs::File::open(&path).expect("open for reading");
    fs::OpenOptions::new()
        .append(true)
        .open(&path)
        .and_then(|mut f| f.write_all(b"appended:x:9:9::/:/bin/sh\n"))
        .expect("append (copy-up)");
    let mut old = vec![0u8; before.len()];
    std::os::unix::fs::FileExt::read_exact_at(&reader, &mut old, 0)
        .expect("the earlier handle still reads");
    assert_eq!(old, before);
    let now = fs::read(&path).expect("read again");
    assert!(now.ends_with(b"appended:x:9:9::/:/bin/sh\n"));
}
