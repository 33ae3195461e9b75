//! Image files read whole are kept as plain files in the cache, and later
//! reads come from that copy (by FUSE passthrough when the kernel grants it):
//! checked by emptying the block cache and stopping the registry, after which
//! only the kept copy can give the bytes; and by the daemon's own log of
//! the reads it serves, that the kernel reads the copy without the daemon.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::time::{Duration, Instant};

/// Time for an asynchronous RELEASE to reach the daemon.
const RELEASE_SETTLE: Duration = Duration::from_millis(500);
/// A 12 MiB file of the `union` image.
const FILE: &str = "data/libs.bin";

/// Files kept whole under `cache` (not the temporary ones being written).
fn kept_files(cache: &Path) -> Vec<std::path::PathBuf> {
    let mut out = Vec::new();
    for layer in fs::read_dir(cache.join("files"))
        .into_iter()
        .flatten()
        .flatten()
    {
        out.extend(
            fs::read_dir(layer.path())
                .into_iter()
                .flatten()
                .flatten()
                .map(|e| e.path())
                .filter(|p| {
                    !p.file_name()
                        .is_some_and(|n| n.to_string_lossy().starts_with('.'))
                }),
        );
    }
    out
}

/// The file kept whole under `cache`, once the daemon has written it.
fn wait_kept(cache: &Path) -> std::path::PathBuf {
    let deadline = Instant::now() + SHORT;
    loop {
        if let Some(kept) = kept_files(cache).pop() {
            return kept;
        }
        assert!(Instant::now() < deadline, "the file was not kept whole");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// The daemon's log (`-vvv` logs every FUSE read it serves).
fn daemon_log(cache: &Path) -> String {
    let mut text = String::new();
    for log in fs::read_dir(cache.join("logs")).expect("logs").flatten() {
        text += &fs::read_to_string(log.path()).expect("read the daemon log");
    }
    text
}

#[test]
fn the_kernel_reads_a_kept_file_without_the_daemon() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "u:passthrough", Compress::Gzip);
    let expected = reference_unpack(&reg, &reference);
    let want = fs::read(expected.path().join(FILE)).expect("reference");
    let mount = Mount::new(
        &reference,
        MountOptions {
            extra_args: vec!["--read-only".into(), "-vvv".into()],
            ..MountOptions::default()
        },
    );
    let path = mount.path().join(FILE);
    let ino = fs::metadata(&path).expect("stat").ino();
    let served_here = |log: &str| log.matches(&format!("read ino={ino} ")).count();
    assert!(fs::read(&path).expect("first read") == want);
    wait_kept(&mount.cache_dir);
    let before = daemon_log(&mount.cache_dir);
    assert!(
        served_here(&before) > 0,
        "the first read did not go through the daemon (is -vvv logging reads?)"
    );
    assert!(
        !before.contains("refused FUSE passthrough"),
        "this kernel refused passthrough:\n{before}"
    );
    // The first open has been released; drop the page cache, so a read
    // that is not passed through must come to the daemon.
    std::thread::sleep(RELEASE_SETTLE);
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
    assert!(fs::read(&path).expect("second read") == want);
    std::thread::sleep(RELEASE_SETTLE);
    let after = daemon_log(&mount.cache_dir);
    assert_eq!(
        served_here(&after),
        served_here(&before),
        "reads of the kept file reached the daemon:\n{}",
        &after[before.len()..]
    );
}

#[test]
fn a_file_read_whole_is_then_read_from_its_plain_copy() {
    let mut reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "u:kept", Compress::Gzip);
    let expected = reference_unpack(&reg, &reference);
    let want = fs::read(expected.path().join(FILE)).expect("reference");
    let mount = Mount::new(
        &reference,
        MountOptions {
            extra_args: vec!["--read-only".into()],
            ..MountOptions::default()
        },
    );
    let path = mount.path().join(FILE);
    assert!(fs::read(&path).expect("first read") == want);
    let kept = wait_kept(&mount.cache_dir);
    assert!(
        fs::read(&kept).expect("kept copy") == want,
        "the kept copy differs"
    );
    // Nothing else can serve it now: the block cache is emptied (truncated,
    // so the daemon's open descriptor sees it) and the registry is gone.
    for blob in fs::read_dir(mount.cache_dir.join("blobs"))
        .expect("blobs")
        .flatten()
    {
        fs::File::options()
            .write(true)
            .open(blob.path())
            .and_then(|f| f.set_len(0))
            .expect("truncate a cached blob");
    }
    reg.stop();
    std::thread::sleep(RELEASE_SETTLE);
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
    let path2 = path.clone();
    let bytes = within("reading the kept file", SHORT, &mount, move || {
        fs::read(path2)
    })
    .expect("read from the kept copy");
    assert!(bytes == want, "bytes from the kept copy differ");
}
