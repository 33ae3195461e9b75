//! Load and crash safety: many concurrent readers and writers on one
//! writable mount (every byte checked, no descriptor leak, bounded memory),
//! and `kill -9` of the daemon in the middle of writes and cold reads, then a
//! remount with the same upper and cache.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

const READERS: usize = 64;
const WRITERS: usize = 16;
const FILES_PER_WRITER: usize = 12;
/// Descriptors the daemon may hold after the load beyond those before it
/// (FUSE clone fds, the log, cache files are all opened at mount).
const FD_SLACK: usize = 8;
/// Memory the daemon may gain from the load (caches are bounded).
const RSS_SLACK_KIB: u64 = 96 * 1024;
const LOAD_TIMEOUT: Duration = Duration::from_secs(240);

/// The daemon's log (warnings and errors), for failure messages.
fn daemon_log(cache: &Path) -> String {
    fs::read_dir(cache.join("logs"))
        .into_iter()
        .flatten()
        .filter_map(|e| e.ok())
        .map(|e| fs::read_to_string(e.path()).unwrap_or_default())
        .collect::<Vec<_>>()
        .join("\n")
}

fn fd_count(pid: u32) -> usize {
    fs::read_dir(format!("/proc/{pid}/fd"))
        .map(|d| d.count())
        .unwrap_or(0)
}

/// sha256 of every regular file under `root`, by relative path (any name).
fn file_hashes(root: &Path) -> BTreeMap<PathBuf, String> {
    let mut out = BTreeMap::new();
    let mut dirs = vec![PathBuf::new()];
    while let Some(rel) = dirs.pop() {
        for entry in fs::read_dir(root.join(&rel)).expect("read a reference dir") {
            let entry = entry.expect("dir entry");
            let path = rel.join(entry.file_name());
            let kind = entry.file_type().expect("file type");
            if kind.is_dir() {
                dirs.push(path);
            } else if kind.is_file() {
                let hash = sha256_file(&root.join(&path)).expect("hash a reference file");
                out.insert(path, hash);
            }
        }
    }
    out
}

fn pattern(writer: usize, file: usize, len: usize) -> Vec<u8> {
    (0..len)
        .map(|i| ((i * 31 + writer * 7 + file * 13) % 251) as u8)
        .collect()
}

fn writable(upper: &Path, cache: Option<PathBuf>) -> MountOptions {
    MountOptions {
        cache_dir: cache,
        extra_args: vec![
            "--upper".into(),
            upper.display().to_string(),
            "--prefetch".into(),
            "none".into(),
        ],
        ..MountOptions::default()
    }
}

#[test]
fn many_readers_and_writers_get_the_right_bytes_without_leaks() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "u:load", Compress::Gzip);
    let expected = reference_unpack(&reg, &reference);
    let hashes = Arc::new(file_hashes(&expected.path()));
    let upper = tempfile::tempdir().expect("upper");
    let mount = Mount::new(&reference, writable(&upper.path().join("u"), None));
    let pid = daemon_pid(mount.path());
    let (fds_before, rss_before) = (fd_count(pid), rss_kib(pid));
    let root = mount.path().to_path_buf();
    let failures = within(
        "64 readers and 16 writers",
        LOAD_TIMEOUT,
        &mount,
        move || {
            let failures = Arc::new(Mutex::new(Vec::<String>::new()));
            std::thread::scope(|scope| {
                for r in 0..READERS {
                    let (root, hashes, failures) = (&root, hashes.clone(), failures.clone());
                    scope.spawn(move || {
                        // Twice over a third of the files, overlapping other
                        // readers': cold blocks first, then warm ones.
                        for _pass in 0..2 {
                            for (i, (path, want)) in hashes.iter().enumerate() {
                                if (i + r) % 3 != 0 {
                                    continue;
                                }
                                match sha256_file(&root.join(path)) {
                                    Ok(got) if got == *want => {}
                                    other => failures
                                        .lock()
                                        .expect("lock")
                                        .push(format!("read {}: {other:?}", path.display())),
                                }
                            }
                        }
                    });
                }
                for w in 0..WRITERS {
                    let (root, failures) = (&root, failures.clone());
                    scope.spawn(move || {
                        let dir = root.join(format!("load/w{w}"));
                        if let Err(e) = fs::create_dir_all(&dir) {
                            failures.lock().expect("lock").push(format!("mkdir: {e}"));
                            return;
                        }
                        for f in 0..FILES_PER_WRITER {
                            let data = pattern(w, f, 4096 * (1 + (w * f) % 64));
                            let path = dir.join(format!("f{f}"));
                            let result = fs::File::create(&path)
                                .and_then(|mut file| {
                                    file.write_all(&data).and_then(|_| file.sync_all())
                                })
                                .and_then(|_| fs::read(&path));
                            match result {
                                Ok(back) if back == data => {}
                                other => failures.lock().expect("lock").push(format!(
                                    "write {}: {:?}",
                                    path.display(),
                                    other.map(|b| b.len())
                                )),
                            }
                        }
                    });
                }
            });
            Arc::try_unwrap(failures)
                .map(|m| m.into_inner().unwrap_or_default())
                .unwrap_or_default()
        },
    );
    if !failures.is_empty() {
        let log = daemon_log(&mount.cache_dir);
        panic!(
            "{} failures, first: {:?}\ndaemon log:\n{log}",
            failures.len(),
            &failures[..failures.len().min(5)]
        );
    }
    std::thread::sleep(Duration::from_millis(500));
    let (fds_after, rss_after) = (fd_count(pid), rss_kib(pid));
    eprintln!("daemon {pid}: fds {fds_before} -> {fds_after}, RSS {rss_before} -> {rss_after} KiB");
    assert!(
        fds_after <= fds_before + FD_SLACK,
        "descriptor leak: {fds_before} -> {fds_after}"
    );
    assert!(
        rss_after <= rss_before + RSS_SLACK_KIB,
        "memory grew: {rss_before} -> {rss_after} KiB"
    );
}

#[test]
fn kill_9_mid_writes_and_reads_loses_no_acknowledged_write() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "u:crash", Compress::Gzip);
    let expected = reference_unpack(&reg, &reference);
    let hashes = file_hashes(&expected.path());
    let upper_dir = tempfile::tempdir().expect("upper");
    let upper = upper_dir.path().join("u");
    let cache = tempfile::tempdir().expect("cache");
    let mount = Mount::new(
        &reference,
        writable(&upper, Some(cache.path().to_path_buf())),
    );
    let pid = daemon_pid(mount.path());
    let root = mount.path().to_path_buf();
    let acked = Arc::new(Mutex::new(Vec::<(PathBuf, Vec<u8>)>::new()));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = {
        let (root, acked, stop) = (root.clone(), acked.clone(), stop.clone());
        std::thread::spawn(move || {
            let _ = fs::create_dir_all(root.join("crash"));
            for i in 0.. {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let rel = PathBuf::from(format!("crash/f{i}"));
                let data = pattern(i, i, 16 * 1024 + i % 4096);
                let ok = fs::File::create(root.join(&rel))
                    .and_then(|mut f| f.write_all(&data).and_then(|_| f.sync_all()));
                if ok.is_err() {
                    break;
                }
                acked.lock().expect("lock").push((rel, data));
            }
        })
    };
    let reader = {
        let (root, stop) = (root.clone(), stop.clone());
        let paths: Vec<PathBuf> = hashes.keys().cloned().collect();
        std::thread::spawn(move || {
            for path in paths.iter().cycle() {
                if stop.load(Ordering::Relaxed) || fs::read(root.join(path)).is_err() {
                    break;
                }
            }
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    run_ok(Command::new("kill").args(["-9", &pid.to_string()]), SHORT);
    stop.store(true, Ordering::Relaxed);
    writer.join().expect("writer");
    reader.join().expect("reader");
    drop(mount); // the dead mount is detached
    let acked = acked.lock().expect("lock").clone();
    assert!(
        !acked.is_empty(),
        "the writer wrote nothing before the kill"
    );

    let again = Mount::new(
        &reference,
        writable(&upper, Some(cache.path().to_path_buf())),
    );
    for (rel, data) in &acked {
        let got = fs::read(again.path().join(rel)).unwrap_or_default();
        assert!(
            got == *data,
            "{} lost or changed after kill -9",
            rel.display()
        );
    }
    // Nothing half-made is visible: only the files the writer started.
    let names: Vec<String> = fs::read_dir(again.path().join("crash"))
        .expect("crash dir")
        .filter_map(|e| e.ok())
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    assert!(
        names.len() <= acked.len() + 1,
        "unexpected entries: {names:?}"
    );
    assert!(
        names.iter().all(|n| n.starts_with('f')),
        "temporary files visible: {names:?}"
    );
    // The cache serves only verified bytes: every image file still reads right.
    for (path, want) in &hashes {
        let got = sha256_file(&again.path().join(path)).expect("read after crash");
        assert_eq!(&got, want, "{} after kill -9", path.display());
    }
    eprintln!(
        "kill -9 after {} acknowledged writes: all there after remount",
        acked.len()
    );
}
