//! imgfs as a system tool: `mount -t imgfs` through the `mount.imgfs`
//! helper, an fstab line with `mount -a -T FILE`, `imgfs ps` listing both,
//! and umount(8) ending them. Installs the helper as /sbin/mount.imgfs for
//! the test (a symlink to the built one, so it finds `imgfs` beside itself)
//! and removes it afterwards.

mod common;

use common::*;
use std::fs::{self, File};
use std::path::{Path, PathBuf};
use std::process::Command;

/// Where mount(8) looks for the helper of type `imgfs`.
const HELPER: &str = "/sbin/mount.imgfs";
/// Held while the helper is installed, so two test runs do not remove it
/// under each other.
const HELPER_LOCK: &str = "/run/imgfs-test-mount-helper.lock";
/// The busybox binary the `busybox` test image is built from.
const HOST_BUSYBOX: &str = "/bin/busybox";

/// The helper built by `cargo test --workspace`, beside the imgfs binary.
fn built_helper() -> PathBuf {
    let dir = Path::new(IMGFS).parent().expect("imgfs has a directory");
    let helper = dir.join("mount-imgfs");
    assert!(
        helper.is_file(),
        "{} is missing: build the workspace (cargo build --workspace, as scripts/test does)",
        helper.display()
    );
    helper
}

/// /sbin/mount.imgfs for the life of the value.
struct InstalledHelper {
    _lock: File,
}

impl InstalledHelper {
    fn install() -> InstalledHelper {
        let lock = File::create(HELPER_LOCK).expect("helper lock file");
        rustix::fs::flock(&lock, rustix::fs::FlockOperation::LockExclusive).expect("flock");
        let staged = PathBuf::from(format!("{HELPER}.test-{}", std::process::id()));
        let _ = fs::remove_file(&staged);
        std::os::unix::fs::symlink(built_helper(), &staged).expect("symlink the helper");
        fs::rename(&staged, HELPER).expect("install the helper");
        InstalledHelper { _lock: lock }
    }
}

impl Drop for InstalledHelper {
    fn drop(&mut self) {
        let _ = fs::remove_file(HELPER);
    }
}

fn ps_mountpoints() -> Vec<String> {
    let out = run_ok(Command::new(IMGFS).args(["ps", "--json"]), SHORT);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("ps --json is JSON");
    list.as_array()
        .expect("a list")
        .iter()
        .filter_map(|m| m["mountpoint"].as_str().map(String::from))
        .collect()
}

/// Unmounts whatever the test left mounted when it fails.
struct Unmounter(Vec<PathBuf>);

impl Drop for Unmounter {
    fn drop(&mut self) {
        for dir in &self.0 {
            if is_mountpoint(dir) {
                let _ = Command::new("umount").arg("-l").arg(dir).status();
            }
        }
    }
}

fn umount(dir: &Path) {
    run_ok(Command::new("umount").arg(dir), MOUNT_TIMEOUT);
    assert!(!is_mountpoint(dir), "{} still mounted", dir.display());
}

#[test]
fn mount_t_imgfs_and_fstab_lines_work_and_imgfs_ps_lists_them() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "sys/bb:latest", Compress::Gzip);
    let _helper = InstalledHelper::install();
    let work = tempfile::Builder::new()
        .prefix("imgfs-mnt-")
        .tempdir()
        .expect("temp dir");
    let cache = work.path().join("cache");
    let (by_mount, by_fstab) = (work.path().join("a"), work.path().join("b"));
    fs::create_dir(&by_mount).expect("mkdir");
    fs::create_dir(&by_fstab).expect("mkdir");
    let want = fs::read(HOST_BUSYBOX).expect("host busybox");
    let _cleanup = Unmounter(vec![by_mount.clone(), by_fstab.clone()]);

    run_ok(
        Command::new("mount")
            .args(["-t", "imgfs", &reference])
            .arg(&by_mount)
            .arg("-o")
            .arg(format!("cache={},ro", cache.display())),
        MOUNT_TIMEOUT,
    );
    assert!(is_mountpoint(&by_mount), "mount -t imgfs did not mount");
    assert_eq!(fs::read(by_mount.join("bin/busybox")).expect("read"), want);
    let write = fs::write(by_mount.join("new"), b"x").expect_err("ro mount");
    assert_eq!(write.raw_os_error(), Some(libc_erofs()), "{write}");

    let fstab = work.path().join("fstab");
    fs::write(
        &fstab,
        format!(
            "# imgfs test\n{reference} {} imgfs cache={},ro,{FSTAB_EXTRA} 0 0\n",
            by_fstab.display(),
            cache.display()
        ),
    )
    .expect("write fstab");
    run_ok(
        Command::new("mount").arg("-a").arg("-T").arg(&fstab),
        MOUNT_TIMEOUT,
    );
    assert!(
        is_mountpoint(&by_fstab),
        "mount -a did not mount the fstab line"
    );
    assert_eq!(fs::read(by_fstab.join("bin/busybox")).expect("read"), want);

    let listed = ps_mountpoints();
    for dir in [&by_mount, &by_fstab] {
        let dir = dir.canonicalize().expect("canonical").display().to_string();
        assert!(
            listed.contains(&dir),
            "imgfs ps does not list {dir}: {listed:?}"
        );
    }
    // The fstab options reached the daemon as the flags they stand for.
    let args = daemon_args(&by_fstab);
    for flag in [
        ["--cache-max", "10G"],
        ["--prefetch", "all"],
        ["--prefetch-rate", "0"],
    ] {
        assert!(
            args.windows(2).any(|w| w == flag),
            "{flag:?} not in the daemon's arguments {args:?}"
        );
    }
    umount(&by_mount);
    umount(&by_fstab);
}

/// Options of the fstab line beyond cache= and ro, checked in the daemon's arguments.
const FSTAB_EXTRA: &str = "cache_max=10G,prefetch=all,prefetch_rate=0";

/// The command line of the mount daemon serving `mountpoint` (from `imgfs ps`).
fn daemon_args(mountpoint: &std::path::Path) -> Vec<String> {
    let out = run_ok(Command::new(IMGFS).args(["ps", "--json"]), SHORT);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("ps --json is JSON");
    let canonical = mountpoint.canonicalize().expect("canonical");
    let pid = list
        .as_array()
        .expect("a list")
        .iter()
        .find(|m| m["mountpoint"].as_str() == canonical.to_str())
        .and_then(|m| m["pid"].as_u64())
        .expect("imgfs ps lists the mount with its pid");
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).expect("daemon cmdline");
    cmdline
        .split(|&b| b == 0)
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect()
}

/// EROFS, without a libc dependency in the tests.
fn libc_erofs() -> i32 {
    rustix::io::Errno::ROFS.raw_os_error()
}
