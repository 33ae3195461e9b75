//! The cache as a system tool: shared layers fetched once, `imgfs ps`,
//! `cache ls`, `cache rm` refused while mounted, `pull`, `prune` and
//! refetching, a killed mount daemon, two processes on one cold layer.
//! Real registry, real mounts (run as root through scripts/test).

mod common;

use common::*;
use std::collections::HashMap;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

/// The busybox binary the `busybox` test image is built from.
const HOST_BUSYBOX: &str = "/bin/busybox";

fn imgfs(cache: &Path, args: &[&str]) -> Output {
    run_ok(
        Command::new(IMGFS).arg("--cache-dir").arg(cache).args(args),
        MOUNT_TIMEOUT,
    )
}

fn imgfs_fails(cache: &Path, args: &[&str]) -> Output {
    let out = run(
        Command::new(IMGFS).arg("--cache-dir").arg(cache).args(args),
        MOUNT_TIMEOUT,
    );
    assert!(
        !out.success(),
        "imgfs {args:?} should fail:\n{}",
        out.stdout
    );
    out
}

fn json(out: &Output) -> serde_json::Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| panic!("not JSON ({e}):\n{}", out.stdout))
}

fn temp_cache() -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix("imgfs-cache-")
        .tempdir()
        .expect("temp dir")
}

fn with_cache(cache: &Path) -> MountOptions {
    MountOptions {
        cache_dir: Some(cache.to_path_buf()),
        extra_args: vec!["--read-only".into()],
        ..Default::default()
    }
}

/// Blob bytes (whole and Range GETs) served per layer digest since `mark`.
fn range_bytes(
    reg: &Registry,
    mark: usize,
    layers: &[(String, String, u64)],
) -> HashMap<String, u64> {
    let gets = reg.blob_gets_since(mark);
    layers
        .iter()
        .map(|(_, digest, _)| {
            let hex = digest.trim_start_matches("sha256:");
            let bytes = gets
                .iter()
                .filter(|r| r.uri.contains(hex))
                .map(|r| r.written)
                .sum();
            (digest.clone(), bytes)
        })
        .collect()
}

/// Every regular file under `root`, read, by relative path.
fn read_all(root: &Path) -> Vec<(PathBuf, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![root.to_path_buf()];
    while let Some(dir) = stack.pop() {
        for entry in fs::read_dir(&dir).expect("read_dir").flatten() {
            let ty = entry.file_type().expect("file type");
            if ty.is_dir() {
                stack.push(entry.path());
            } else if ty.is_file() {
                let bytes = fs::read(entry.path()).expect("read file");
                let rel = entry
                    .path()
                    .strip_prefix(root)
                    .expect("prefix")
                    .to_path_buf();
                out.push((rel, bytes));
            }
        }
    }
    out.sort();
    out
}

/// The live mount at `mountpoint` as `imgfs ps --json` shows it.
fn ps_entry(mountpoint: &Path) -> Option<serde_json::Value> {
    let out = run_ok(Command::new(IMGFS).args(["ps", "--json"]), SHORT);
    let canonical = mountpoint.canonicalize().ok()?;
    json(&out)
        .as_array()?
        .iter()
        .find(|m| m["mountpoint"].as_str() == canonical.to_str())
        .cloned()
}

/// An image that shares its first layers with `union` (gzip) as pushed to
/// `reg` as `a:latest`: the same blobs, fewer of them, as `b:latest`.
fn push_sharing(reg: &Registry, dir: &Path) -> (String, String, Vec<(String, String, u64)>) {
    let a = push(reg, "union", "a:latest", Compress::Gzip);
    let layers = layers(reg, "a:latest");
    let shared = &layers[..2];
    let layout = dir.join("b-layout");
    let mut build = Command::new(script("make-test-image"));
    build.arg("from-layers").arg(&layout);
    for (_, digest, _) in shared {
        build.arg(reg.blob_path(digest));
    }
    run_ok(&mut build, MOUNT_TIMEOUT);
    let b = push_layout(reg, &layout, "b:latest");
    (a, b, layers)
}

#[test]
fn shared_layers_are_fetched_once_and_mounted_images_cannot_be_removed() {
    let reg = Registry::start(RegistryOptions::default());
    let work = tempfile::tempdir().expect("temp dir");
    let (a, b, layers) = push_sharing(&reg, work.path());
    let cache = temp_cache();
    let ma = Mount::new(&a, with_cache(cache.path()));
    let mb = Mount::new(&b, with_cache(cache.path()));
    let mark = reg.requests().len();
    let (pa, pb) = (ma.path().to_path_buf(), mb.path().to_path_buf());
    let ta = std::thread::spawn(move || read_all(&pa));
    let tb = std::thread::spawn(move || read_all(&pb));
    let (files_a, files_b) = (ta.join().expect("reader a"), tb.join().expect("reader b"));
    assert!(!files_a.is_empty() && !files_b.is_empty());
    for (digest, bytes) in range_bytes(&reg, mark, &layers) {
        let size = layers.iter().find(|l| l.1 == digest).map_or(0, |l| l.2);
        assert!(
            bytes <= size,
            "layer {digest} ({size} bytes) moved {bytes} bytes for two mounts: shared blocks fetched twice"
        );
    }

    // Both mounts are listed; the images are in the cache and marked mounted.
    for m in [&ma, &mb] {
        let entry = ps_entry(m.path()).expect("imgfs ps lists the mount");
        assert!(entry["pid"].as_u64().is_some_and(|p| p > 0), "{entry}");
        assert!(entry["log"].as_str().is_some(), "{entry}");
    }
    let ls = json(&imgfs(cache.path(), &["cache", "ls", "--json"]));
    let images = ls.as_array().expect("array");
    assert_eq!(images.len(), 2, "{ls}");
    assert!(
        images
            .iter()
            .all(|i| i["mounted_on"].as_array().is_some_and(|m| m.len() == 1))
    );

    // rm is refused while mounted, works after unmount, and keeps the shared layers.
    let refused = imgfs_fails(cache.path(), &["cache", "rm", &a]);
    assert_one_line_error(&refused.stderr, &["mounted", "unmount"]);
    ma.unmount();
    imgfs(cache.path(), &["cache", "rm", &a]);
    let blobs = cache.path().join("blobs");
    for (i, (_, digest, _)) in layers.iter().enumerate() {
        let hex = digest.trim_start_matches("sha256:");
        assert_eq!(
            blobs.join(hex).exists(),
            i < 2,
            "layer {i} {digest} after rm"
        );
        let stripe_lock = cache.path().join("locks").join(format!("{hex}-fetch.0"));
        assert!(
            i < 2 || !stripe_lock.exists(),
            "fetch lock of removed layer {i} left behind"
        );
    }
    let remaining = read_all(mb.path());
    assert_eq!(
        remaining, files_b,
        "the mount of b still reads the same bytes"
    );
    mb.unmount();
}

#[test]
fn pull_warms_the_cache_and_prune_makes_reads_refetch() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "bb:latest", Compress::Gzip);
    let layers = layers(&reg, "bb:latest");
    let cache = temp_cache();
    let mark = reg.requests().len();
    let pulled = imgfs(cache.path(), &["pull", &reference]);
    let streamed: u64 = range_bytes(&reg, mark, &layers).values().sum();
    let size: u64 = layers.iter().map(|l| l.2).sum();
    assert_eq!(
        streamed, size,
        "pull moved {streamed} bytes of a {size} byte image"
    );
    assert!(pulled.stdout.contains("fetched"), "{}", pulled.stdout);
    assert!(
        pulled.stderr.contains("fetched sha256:") && pulled.stderr.contains("indexed sha256:"),
        "plain lines without a terminal: {}",
        pulled.stderr
    );

    let want = fs::read(HOST_BUSYBOX).expect("host busybox");
    let mark = reg.requests().len();
    let m = Mount::new(&reference, with_cache(cache.path()));
    assert_eq!(fs::read(m.path().join("bin/busybox")).expect("read"), want);
    let moved: u64 = range_bytes(&reg, mark, &layers).values().sum();
    assert_eq!(moved, 0, "a mount after pull fetched {moved} bytes");

    // Pinned while mounted: even --all keeps it.
    imgfs(cache.path(), &["cache", "prune", "--all"]);
    assert_eq!(fs::read(m.path().join("bin/busybox")).expect("read"), want);
    m.unmount();
    let out = imgfs(cache.path(), &["cache", "prune", "--max", "0"]);
    assert!(out.stdout.contains("evicted 1 layers"), "{}", out.stdout);
    let mark = reg.requests().len();
    let m = Mount::new(&reference, with_cache(cache.path()));
    assert_eq!(fs::read(m.path().join("bin/busybox")).expect("read"), want);
    let moved: u64 = range_bytes(&reg, mark, &layers).values().sum();
    assert!(moved > 0, "an evicted layer must be fetched again");
    let entry = ps_entry(m.path()).expect("listed");
    m.unmount();
    assert!(entry["fetched_bytes"].as_u64().is_some(), "{entry}");
}

/// Size of the random file of [`push_one_big_file`]: big enough that a cold
/// read takes a while even from a loopback registry.
const BIG_FILE: usize = 64 << 20;

/// An image of one gzip layer holding `big.bin` (random); returns the
/// reference, its layers and the file's bytes.
fn push_one_big_file(reg: &Registry, dir: &Path) -> (String, Vec<(String, String, u64)>, Vec<u8>) {
    push_random_file(reg, dir, BIG_FILE)
}

/// [`push_one_big_file`] with `size` random bytes.
fn push_random_file(
    reg: &Registry,
    dir: &Path,
    size: usize,
) -> (String, Vec<(String, String, u64)>, Vec<u8>) {
    let root = dir.join("root");
    fs::create_dir_all(&root).expect("mkdir");
    let mut bytes = vec![0u8; size];
    let mut urandom = fs::File::open("/dev/urandom").expect("urandom");
    std::io::Read::read_exact(&mut urandom, &mut bytes).expect("random bytes");
    fs::write(root.join("big.bin"), &bytes).expect("write big.bin");
    let tar = dir.join("layer.tar");
    run_ok(
        Command::new("tar")
            .arg("-C")
            .arg(&root)
            .arg("-cf")
            .arg(&tar)
            .arg("big.bin"),
        MOUNT_TIMEOUT,
    );
    run_ok(Command::new("gzip").arg("-1").arg(&tar), MOUNT_TIMEOUT);
    let layout = dir.join("layout");
    run_ok(
        Command::new(script("make-test-image"))
            .arg("from-layers")
            .arg(&layout)
            .arg(dir.join("layer.tar.gz")),
        MOUNT_TIMEOUT,
    );
    let reference = push_layout(reg, &layout, "bigfile:latest");
    (reference, layers(reg, "bigfile:latest"), bytes)
}

fn allocated(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

#[test]
fn a_mount_killed_during_a_cold_read_leaves_a_cache_the_next_mount_reads_right() {
    let reg = Registry::start(RegistryOptions::default());
    let work = tempfile::tempdir().expect("temp dir");
    let (reference, layers, want) = push_one_big_file(&reg, work.path());
    let cache = temp_cache();
    let blob = cache
        .path()
        .join("blobs")
        .join(layers[0].1.trim_start_matches("sha256:"));
    let m = Mount::new(&reference, with_cache(cache.path()));
    let pid = ps_entry(m.path()).expect("listed")["pid"]
        .as_u64()
        .expect("pid");
    let file = m.path().join("big.bin");
    let reader = std::thread::spawn(move || fs::read(file).map(|b| b.len()));
    let started = std::time::Instant::now();
    while allocated(&blob) == 0 && started.elapsed() < SHORT {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let pid = rustix::process::Pid::from_raw(pid as i32).expect("pid");
    rustix::process::kill_process(pid, rustix::process::Signal::KILL).expect("kill -9");
    let partial = allocated(&blob);
    let _ = reader.join();
    eprintln!(
        "killed the mount with {partial} of {} bytes cached",
        layers[0].2
    );
    m.abort();
    drop(m);

    let m = Mount::new(&reference, with_cache(cache.path()));
    let got = fs::read(m.path().join("big.bin")).expect("read after remount");
    assert!(got == want, "big.bin differs after a kill -9 and a remount");
    m.unmount();
}

#[test]
fn two_processes_on_one_cold_layer_read_right_and_fetch_each_block_at_most_twice() {
    let reg = Registry::start(RegistryOptions::default());
    let work = tempfile::tempdir().expect("temp dir");
    let (reference, layers, want) = push_one_big_file(&reg, work.path());
    let cache = temp_cache();
    let (m1, m2) = (
        Mount::new(&reference, with_cache(cache.path())),
        Mount::new(&reference, with_cache(cache.path())),
    );
    let mark = reg.requests().len();
    let want = std::sync::Arc::new(want);
    let chunk = BIG_FILE / 8;
    let readers: Vec<_> = [m1.path(), m2.path()]
        .iter()
        .flat_map(|root| (0..8).map(move |i| (root.join("big.bin"), i)))
        .map(|(path, i)| {
            let want = want.clone();
            std::thread::spawn(move || {
                use std::os::unix::fs::FileExt;
                let file = fs::File::open(&path).expect("open");
                // Each thread starts at its own chunk and wraps around.
                for k in 0..8 {
                    let at = ((i + k) % 8) * chunk;
                    let mut buf = vec![0u8; chunk];
                    file.read_exact_at(&mut buf, at as u64).expect("read");
                    assert!(
                        buf == want[at..at + chunk],
                        "bytes at {at} of {}",
                        path.display()
                    );
                }
            })
        })
        .collect();
    for r in readers {
        r.join().expect("a reader failed");
    }
    let moved = range_bytes(&reg, mark, &layers)[&layers[0].1];
    eprintln!(
        "two processes moved {moved} bytes of a {} byte layer",
        layers[0].2
    );
    assert!(
        moved <= 2 * layers[0].2,
        "two processes moved {moved} bytes of a {} byte layer",
        layers[0].2
    );
    m1.unmount();
    m2.unmount();
}

#[test]
fn a_mount_with_cache_max_evicts_unmounted_images_and_keeps_its_own() {
    let reg = Registry::start(RegistryOptions::default());
    let bb = push(&reg, "busybox", "bb:latest", Compress::Gzip);
    let union = push(&reg, "union", "u:latest", Compress::Gzip);
    let cache = temp_cache();
    let bb_blob = cache
        .path()
        .join("blobs")
        .join(layers(&reg, "bb:latest")[0].1.trim_start_matches("sha256:"));
    let m = Mount::new(&bb, with_cache(cache.path()));
    fs::read(m.path().join("bin/busybox")).expect("read");
    m.unmount();
    assert!(bb_blob.exists());

    let mut opts = with_cache(cache.path());
    opts.extra_args
        .extend(["--cache-max".to_string(), "1".to_string()]);
    let m = Mount::new(&union, opts);
    let before = read_all(m.path());
    let started = std::time::Instant::now();
    while bb_blob.exists() && started.elapsed() < SHORT {
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    assert!(
        !bb_blob.exists(),
        "--cache-max 1 left the unmounted image's data"
    );
    assert_eq!(
        read_all(m.path()),
        before,
        "the mount's own layers were touched"
    );
    for (_, digest, _) in layers(&reg, "u:latest") {
        let index = cache
            .path()
            .join("indexes")
            .join(digest.trim_start_matches("sha256:"));
        assert!(
            index.exists(),
            "index of the mounted layer {digest} was evicted"
        );
    }
    m.unmount();
}

/// Waits until `imgfs ps` shows `want` bytes fetched by the mount at
/// `mountpoint`; fails after `limit`.
fn wait_fetched(mountpoint: &Path, want: u64, limit: Duration) {
    let start = Instant::now();
    loop {
        let entry = ps_entry(mountpoint).expect("imgfs ps lists the mount");
        let fetched = entry["fetched_bytes"].as_u64().unwrap_or(0);
        if fetched == want {
            return;
        }
        assert!(
            fetched < want,
            "fetched {fetched} bytes of a {want} byte image"
        );
        assert!(
            start.elapsed() < limit,
            "after {limit:?} the prefetch fetched {fetched} of {want} bytes"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// Seconds of the day at which the registry logged each blob GET after the
/// first `mark` requests (its `time=` field, RFC 3339).
fn blob_get_times(reg: &Registry, mark: usize) -> Vec<f64> {
    reg.blob_gets_since(mark);
    reg.log_text()
        .lines()
        .filter(|l| l.contains("msg=\"response completed\""))
        .skip(mark)
        .filter(|l| l.contains("http.request.method=GET") && l.contains("/blobs/sha256:"))
        .filter_map(|l| {
            let time = l.split("time=\"").nth(1)?.split('"').next()?;
            let clock = time.split('T').nth(1)?;
            let clock = clock.trim_end_matches('Z');
            let clock = clock.split(['+', '-']).next()?;
            let mut parts = clock.split(':');
            let h: f64 = parts.next()?.parse().ok()?;
            let m: f64 = parts.next()?.parse().ok()?;
            let s: f64 = parts.next()?.parse().ok()?;
            Some(h * 3600.0 + m * 60.0 + s)
        })
        .collect()
}

/// Bandwidth cap given to the prefetch in the rate test, and the size of its image.
const SLOW_RATE: u64 = 2 << 20;
const SLOW_IMAGE: usize = 10 << 20;
/// Bytes fetching may run ahead of the cap: the first chunk goes at once.
const PREFETCH_BURST: u64 = 1 << 20;

#[test]
fn prefetch_all_fetches_every_layer_in_the_background_within_its_rate() {
    let reg = Registry::start(RegistryOptions::default());
    let work = tempfile::tempdir().expect("temp dir");

    // Unlimited: the whole image arrives, and reading it all then moves nothing.
    let reference = push(&reg, "busybox", "bb:latest", Compress::Gzip);
    let layers = layers(&reg, "bb:latest");
    let size: u64 = layers.iter().map(|l| l.2).sum();
    let cache = temp_cache();
    let opts = |rate: &str| MountOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        extra_args: ["--read-only", "--prefetch", "all", "--prefetch-rate", rate]
            .map(String::from)
            .to_vec(),
        ..Default::default()
    };
    let m = Mount::new(&reference, opts("0"));
    wait_fetched(m.path(), size, Duration::from_secs(60));
    let mark = reg.requests().len();
    let files = read_all(m.path());
    assert!(!files.is_empty());
    let moved: u64 = range_bytes(&reg, mark, &layers).values().sum();
    assert_eq!(
        moved, 0,
        "reads after a full prefetch fetched {moved} bytes"
    );
    m.unmount();

    // Capped: the blob requests are spread over at least the time the cap allows.
    let (reference, layers, want) = push_random_file(&reg, work.path(), SLOW_IMAGE);
    let size: u64 = layers.iter().map(|l| l.2).sum();
    let m = Mount::new(&reference, opts(&SLOW_RATE.to_string()));
    // Mounted: the indexing pass is over, what follows is the prefetch.
    let mark = reg.requests().len();
    wait_fetched(m.path(), size, Duration::from_secs(60));
    let times = blob_get_times(&reg, mark);
    assert!(times.len() >= 2, "prefetch blob requests: {times:?}");
    let elapsed = times[times.len() - 1] - times[0];
    let allowed = (size - 2 * PREFETCH_BURST) as f64 / SLOW_RATE as f64;
    assert!(
        elapsed >= allowed * 0.9,
        "{size} bytes in {elapsed:.2}s: faster than {SLOW_RATE} bytes/s allows ({allowed:.2}s)"
    );
    let mark = reg.requests().len();
    assert_eq!(fs::read(m.path().join("big.bin")).expect("read"), want);
    let moved: u64 = range_bytes(&reg, mark, &layers).values().sum();
    assert_eq!(moved, 0, "a read after the prefetch fetched {moved} bytes");
    m.unmount();
}
