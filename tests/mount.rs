//! `imgfs mount` against a real registry: every union rule over three layer
//! compressions compared with an independent unpack (skopeo + umoci), sparse
//! files against GNU tar, platform choice, Basic auth, laziness on a warm
//! cache (counted in registry bytes), and `imgfs inspect --json`.
//!
//! The first test checks the harness itself: the comparison must find each
//! of a list of deliberate alterations, or an empty diff would prove nothing.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

const MIB: u64 = 1024 * 1024;
/// Blob bytes a warm-cache mount plus one 4 KiB read may move: a gzip
/// checkpoint span and a few verification blocks, far from a whole layer.
const LAZY_READ_BUDGET: u64 = 4 * MIB;

// ------------------------------------------------------------------ harness

type Alteration = fn(&Path);

/// Keeps the mtime of `path`'s parent, so an alteration shows up at `path` only.
fn keeping_parent_mtime(path: &Path, f: impl FnOnce()) {
    let parent = path.parent().expect("altered path has a parent");
    let meta = fs::symlink_metadata(parent).expect("lstat parent");
    f();
    set_mtime(parent, meta_mtime(&meta));
}

fn meta_mtime(meta: &fs::Metadata) -> (i64, i64) {
    use std::os::unix::fs::MetadataExt;
    (meta.mtime(), meta.mtime_nsec())
}

fn set_mtime(path: &Path, (sec, nsec): (i64, i64)) {
    use rustix::fs::{AtFlags, CWD, Timespec, Timestamps, utimensat};
    let t = Timespec {
        tv_sec: sec,
        tv_nsec: nsec as _,
    };
    utimensat(
        CWD,
        path,
        &Timestamps {
            last_access: t,
            last_modification: t,
        },
        AtFlags::SYMLINK_NOFOLLOW,
    )
    .expect("utimensat");
}

fn mtime_of(path: &Path) -> (i64, i64) {
    meta_mtime(&fs::symlink_metadata(path).expect("lstat"))
}

/// Each alteration of a copy of the union reference, and the paths whose
/// differences it must cause (and no others).
fn alterations() -> Vec<(&'static str, Alteration, &'static [&'static str])> {
    vec![
        (
            "chmod",
            |t| {
                fs::set_permissions(t.join("etc/passwd"), fs::Permissions::from_mode(0o600))
                    .unwrap()
            },
            &["/etc/passwd"],
        ),
        (
            "lchown of a symlink",
            |t| std::os::unix::fs::lchown(t.join("symlinks/rel"), Some(1), Some(1)).unwrap(),
            &["/symlinks/rel"],
        ),
        (
            "one byte of content, size and mtime kept",
            |t| {
                let p = t.join("data/text");
                let before = mtime_of(&p);
                flip_byte(&p, 7000);
                set_mtime(&p, before);
            },
            &["/data/text"],
        ),
        (
            "one nanosecond of a directory's mtime",
            |t| {
                let p = t.join("times");
                let (s, ns) = mtime_of(&p);
                set_mtime(&p, (s, ns + 1));
            },
            &["/times"],
        ),
        (
            "symlink target of the same length",
            |t| {
                let p = t.join("symlinks/abs");
                keeping_parent_mtime(&p, || {
                    let before = mtime_of(&p);
                    fs::remove_file(&p).unwrap();
                    std::os::unix::fs::symlink("/etc/passwX", &p).unwrap();
                    set_mtime(&p, before);
                });
            },
            &["/symlinks/abs"],
        ),
        (
            "xattr removed",
            |t| rustix::fs::lremovexattr(t.join("xattr/file"), "user.plain").unwrap(),
            &["/xattr/file"],
        ),
        (
            "xattr value changed on a directory",
            |t| {
                rustix::fs::lsetxattr(
                    t.join("xattr"),
                    "user.dir",
                    b"other",
                    rustix::fs::XattrFlags::empty(),
                )
                .unwrap()
            },
            &["/xattr"],
        ),
        (
            "hardlink split into two files",
            |t| {
                let p = t.join("links/a3");
                keeping_parent_mtime(&p, || {
                    let tmp = t.join("links/a3.tmp");
                    run_ok(Command::new("cp").arg("-p").arg(&p).arg(&tmp), SHORT);
                    fs::rename(&tmp, &p).unwrap();
                });
            },
            &["/links/a", "/links/a3"],
        ),
        (
            "device number",
            |t| {
                let p = t.join("dev/null");
                keeping_parent_mtime(&p, || {
                    let before = mtime_of(&p);
                    fs::remove_file(&p).unwrap();
                    rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &p,
                        rustix::fs::FileType::CharacterDevice,
                        rustix::fs::Mode::from_raw_mode(0o666),
                        rustix::fs::makedev(1, 5),
                    )
                    .unwrap();
                    set_mtime(&p, before);
                });
            },
            &["/dev/null"],
        ),
        (
            "extra file",
            |t| {
                let p = t.join("etc/extra");
                keeping_parent_mtime(&p, || fs::write(&p, b"extra").unwrap());
            },
            &["/etc/extra"],
        ),
        (
            "missing file",
            |t| {
                let p = t.join("wh/keep");
                keeping_parent_mtime(&p, || fs::remove_file(&p).unwrap());
            },
            &["/wh/keep"],
        ),
        (
            "fifo became a regular file",
            |t| {
                let p = t.join("dev/fifo");
                keeping_parent_mtime(&p, || {
                    let before = mtime_of(&p);
                    fs::remove_file(&p).unwrap();
                    fs::write(&p, b"").unwrap();
                    fs::set_permissions(&p, fs::Permissions::from_mode(0o610)).unwrap();
                    set_mtime(&p, before);
                });
            },
            &["/dev/fifo"],
        ),
    ]
}

/// The comparison finds nothing between two independent unpacks of the same
/// image, nor between one and an exact copy, and finds each alteration of the
/// copy at exactly the altered paths. Needs no imgfs.
#[test]
fn harness_compare_trees_catches_every_alteration() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:latest", Compress::None);
    let a = reference_unpack(&reg, &reference);
    let b = reference_unpack(&reg, &reference);
    let diffs = compare_trees(&a.path(), &b.path());
    assert!(
        diffs.is_empty(),
        "two unpacks of one image differ:\n{}",
        diffs.join("\n")
    );

    for (what, alter, paths) in alterations() {
        let tmp = tempfile::tempdir().unwrap();
        let copy = tmp.path().join("copy");
        run_ok(Command::new("cp").arg("-a").arg(a.path()).arg(&copy), SHORT);
        let diffs = compare_trees(&a.path(), &copy);
        assert!(
            diffs.is_empty(),
            "cp -a is not exact:\n{}",
            diffs.join("\n")
        );
        alter(&copy);
        let diffs = compare_trees(&a.path(), &copy);
        let seen: BTreeSet<&str> = diffs
            .iter()
            .map(|d| d.split(": ").next().unwrap_or(""))
            .collect();
        let wanted: BTreeSet<&str> = paths.iter().copied().collect();
        assert_eq!(
            seen,
            wanted,
            "{what}: differences reported:\n{}",
            diffs.join("\n")
        );
    }
}

// ------------------------------------------------------------------ union

/// `args` picks the mount mode: both the read-only view and a writable
/// mount with an empty upper must equal the reference unpack.
fn union_matches_reference(compress: Compress, args: &[&str]) {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:latest", compress);
    for (media_type, digest, size) in layers(&reg, "union:latest") {
        eprintln!("{compress:?}: layer {digest} {media_type} {size} bytes");
    }
    let expected = reference_unpack(&reg, &reference);
    let opts = MountOptions {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..MountOptions::default()
    };
    let mount = Mount::new(&reference, opts);
    eprintln!("{compress:?}: imgfs mount took {:.1?}", mount.elapsed);
    let (want, got) = (expected.path(), mount.path().to_path_buf());
    let diffs = within(
        "comparing the union tree",
        WALK_TIMEOUT,
        &mount,
        move || compare_trees(&want, &got),
    );
    assert!(
        diffs.is_empty(),
        "{compress:?}: {} difference(s), expected (umoci) != imgfs:\n  {}",
        diffs.len(),
        diffs.join("\n  ")
    );

    // The same files again, read by several threads at once (warm and cold
    // parts of the cache interleaved), must still hash the same.
    let (want, got) = (expected.path(), mount.path().to_path_buf());
    let mismatches = within("parallel reads", WALK_TIMEOUT, &mount, move || {
        parallel_read_mismatches(&want, &got)
    });
    assert!(
        mismatches.is_empty(),
        "{compress:?}: parallel reads differ:\n{}",
        mismatches.join("\n")
    );
    mount.unmount();
}

/// Reads every regular file of `got` from four threads, each in another
/// order, and lists files whose content is not that of `want`.
fn parallel_read_mismatches(want: &Path, got: &Path) -> Vec<String> {
    const THREADS: usize = 4;
    let files: Vec<PathBuf> = regular_files(want);
    let threads: Vec<_> = (0..THREADS)
        .map(|t| {
            let mut order = files.clone();
            order.rotate_left(t * files.len() / THREADS);
            if t % 2 == 1 {
                order.reverse();
            }
            let (want, got) = (want.to_path_buf(), got.to_path_buf());
            std::thread::spawn(move || {
                order
                    .iter()
                    .filter_map(|rel| {
                        let expected = sha256_file(&want.join(rel)).map_err(|e| e.to_string());
                        let actual = sha256_file(&got.join(rel)).map_err(|e| e.to_string());
                        (expected != actual).then(|| {
                            format!("{}: expected {expected:?}, got {actual:?}", rel.display())
                        })
                    })
                    .collect::<Vec<_>>()
            })
        })
        .collect();
    threads
        .into_iter()
        .flat_map(|t| {
            t.join()
                .unwrap_or_else(|_| vec!["a reader thread panicked".into()])
        })
        .collect()
}

fn regular_files(root: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for entry in fs::read_dir(root.join(&rel)).unwrap().flatten() {
            let ty = entry.file_type().unwrap();
            let child = rel.join(entry.file_name());
            if ty.is_dir() {
                todo.push(child);
            } else if ty.is_file() {
                out.push(child);
            }
        }
    }
    out.sort();
    out
}

#[test]
fn union_uncompressed_matches_reference() {
    union_matches_reference(Compress::None, &["--read-only"]);
}

#[test]
fn union_gzip_matches_reference() {
    union_matches_reference(Compress::Gzip, &[]);
}

#[test]
fn union_zstd_matches_reference() {
    union_matches_reference(Compress::Zstd, &["--read-only"]);
}

/// GNU tar's sparse entries (old GNU format and PAX 1.0) read back as
/// GNU tar itself unpacks them.
#[test]
fn sparse_files_match_gnu_tar() {
    let reg = Registry::start(RegistryOptions::default());
    let expected = gnu_tar_unpack("sparse");
    for (compress, name) in [
        (Compress::None, "sparse:plain"),
        (Compress::Gzip, "sparse:gzip"),
    ] {
        let reference = push(&reg, "sparse", name, compress);
        let mount = Mount::new(&reference, MountOptions::default());
        let (want, got) = (expected.path(), mount.path().to_path_buf());
        let diffs = within("comparing sparse files", WALK_TIMEOUT, &mount, move || {
            compare_trees(&want, &got)
        });
        assert!(
            diffs.is_empty(),
            "{compress:?}: GNU tar != imgfs:\n  {}",
            diffs.join("\n  ")
        );
        mount.unmount();
    }
}

// ------------------------------------------------------------------ platforms

fn host_arch() -> &'static str {
    match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        other => other,
    }
}

#[test]
fn multiarch_platform_picks_the_right_image() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "multiarch", "multi:latest", Compress::Gzip);
    let cases = [
        (Some("linux/amd64"), "amd64"),
        (Some("linux/arm64/v8"), "arm64"),
        (Some("linux/arm64"), "arm64"), // variant v8 is arm64's default
        (None, host_arch()), // the attestation entry comes first in the index and must be skipped
    ];
    for (platform, arch) in cases {
        let mount = Mount::new(
            &reference,
            MountOptions {
                platform: platform.map(String::from),
                ..Default::default()
            },
        );
        let root = mount.path().to_path_buf();
        let (arch_file, ls) = within("reading /etc/arch", SHORT, &mount, move || {
            let names: BTreeSet<String> = fs::read_dir(&root)
                .unwrap()
                .flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect();
            (fs::read_to_string(root.join("etc/arch")), names)
        });
        assert_eq!(
            arch_file.ok().as_deref(),
            Some(format!("{arch}\n").as_str()),
            "--platform {platform:?}"
        );
        let other = if arch == "amd64" { "arm64" } else { "amd64" };
        assert!(
            ls.contains(&format!("only-on-{arch}")) && !ls.contains(&format!("only-on-{other}")),
            "--platform {platform:?}: {ls:?}"
        );
        mount.unmount();
    }
    let failure = Mount::try_new(
        &reference,
        MountOptions {
            platform: Some("linux/s390x".into()),
            ..Default::default()
        },
    )
    .err()
    .expect("mounting a platform the index does not have must fail");
    assert_one_line_error(&failure.stderr, &["s390x"]);
}

// ------------------------------------------------------------------ auth

#[test]
fn basic_auth_credentials_come_from_docker_config() {
    let (user, password) = ("tester", "s3cret:with colon");
    let reg = Registry::start(RegistryOptions {
        auth: Some((user.into(), password.into())),
        ..RegistryOptions::default()
    });
    let reference = push(&reg, "busybox", "private/busybox:1", Compress::Gzip);

    let mount = Mount::new(
        &reference,
        MountOptions {
            docker_config: Some(reg.docker_config().to_path_buf()),
            ..Default::default()
        },
    );
    let root = mount.path().to_path_buf();
    let passwd = within("reading /etc/passwd", SHORT, &mount, move || {
        fs::read_to_string(root.join("etc/passwd"))
    });
    assert!(
        passwd
            .map(|p| p.starts_with("root:x:0:0:"))
            .unwrap_or(false),
        "good credentials: /etc/passwd unreadable"
    );
    mount.unmount();

    let wrong = tempfile::tempdir().unwrap();
    write_docker_config(wrong.path(), &reg.host(), user, "wrong password");
    let none = tempfile::tempdir().unwrap();
    for (what, config) in [
        ("wrong password", wrong.path()),
        ("no credentials", none.path()),
    ] {
        let failure = Mount::try_new(
            &reference,
            MountOptions {
                docker_config: Some(config.to_path_buf()),
                ..Default::default()
            },
        )
        .err()
        .unwrap_or_else(|| panic!("{what}: the mount must fail"));
        assert!(
            failure.elapsed < SHORT,
            "{what}: took {:?}",
            failure.elapsed
        );
        assert_one_line_error(&failure.stderr, &[]);
        let lower = failure.stderr.to_lowercase();
        assert!(
            [
                "401",
                "unauthorized",
                "authentication",
                "credentials",
                "denied"
            ]
            .iter()
            .any(|w| lower.contains(w)),
            "{what}: the error should say authentication failed: {}",
            failure.stderr
        );
    }
}

// ------------------------------------------------------------------ laziness

/// The 4 KiB text file of the `big` image (as scripts/make-test-image writes it).
fn big_4k_text() -> Vec<u8> {
    let mut text: Vec<u8> = (0..113)
        .flat_map(|i| format!("line {i:04} of a 4 KiB text file....\n").into_bytes())
        .collect();
    text.truncate(4096);
    text.resize(4096, b'.');
    text
}

#[test]
fn big_image_warm_cache_mount_reads_lazily() {
    let reg = Registry::start(RegistryOptions::default());
    let started = Instant::now();
    let reference = push(&reg, "big", "big:latest", Compress::GzipFast);
    let layers = layers(&reg, "big:latest");
    let layer_bytes: u64 = layers.iter().map(|l| l.2).sum();
    eprintln!(
        "big: {} layers, {} MiB compressed, pushed in {:.1?}",
        layers.len(),
        layer_bytes / MIB,
        started.elapsed()
    );
    let cache = tempfile::Builder::new()
        .prefix("imgfs-cache-")
        .tempdir()
        .unwrap();
    let opts = MountOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };

    let mark = reg.requests().len();
    let first = Mount::new(&reference, opts.clone());
    let fetched: u64 = reg.blob_gets_since(mark).iter().map(|r| r.written).sum();
    eprintln!(
        "big: cold mount (indexing) took {:.1?} and moved {} MiB of blobs",
        first.elapsed,
        fetched / MIB
    );
    assert!(
        fetched >= layer_bytes,
        "a cold mount of gzip layers reads them all, yet the registry log counts only {fetched} of {layer_bytes} bytes: the byte counter is broken"
    );
    first.unmount();
    let index_bytes = run_ok(Command::new("du").arg("-sb").arg(cache.path()), SHORT).stdout;
    eprintln!("big: cache after the first mount: {}", index_bytes.trim());

    let mark = reg.requests().len();
    let second = Mount::new(&reference, opts);
    let root = second.path().to_path_buf();
    let text = within("reading small/4k.txt", SHORT, &second, move || {
        fs::read(root.join("small/4k.txt"))
    });
    let gets = reg.blob_gets_since(mark);
    let moved: u64 = gets.iter().map(|r| r.written).sum();
    eprintln!(
        "big: warm mount took {:.1?}; mount + 4 KiB read moved {moved} bytes in {} blob GETs: {:?}",
        second.elapsed,
        gets.len(),
        gets.iter()
            .map(|r| (r.status, r.written))
            .collect::<Vec<_>>()
    );
    assert_eq!(text.ok(), Some(big_4k_text()), "small/4k.txt content");
    assert!(
        moved < LAZY_READ_BUDGET,
        "mount + one 4 KiB read moved {moved} bytes (budget {LAZY_READ_BUDGET})"
    );
    for (_, digest, size) in &layers {
        let hex = digest.trim_start_matches("sha256:");
        assert!(
            !gets
                .iter()
                .any(|r| r.uri.contains(hex) && r.written >= *size),
            "layer {digest} was streamed whole again"
        );
    }
    second.unmount();
}

// ------------------------------------------------------------------ inspect

/// Every string and number anywhere in a JSON document.
fn json_leaves(value: &serde_json::Value, out: &mut BTreeSet<String>) {
    match value {
        serde_json::Value::String(s) => {
            out.insert(s.clone());
        }
        serde_json::Value::Number(n) => {
            out.insert(n.to_string());
        }
        serde_json::Value::Array(items) => items.iter().for_each(|v| json_leaves(v, out)),
        serde_json::Value::Object(map) => map.values().for_each(|v| json_leaves(v, out)),
        _ => {}
    }
}

fn inspect(reg: &Registry, reference: &str, extra: &[&str]) -> Output {
    run_ok(
        Command::new(IMGFS)
            .arg("inspect")
            .arg(reference)
            .args(extra)
            .env("DOCKER_CONFIG", reg.docker_config()),
        SHORT,
    )
}

#[test]
fn inspect_json_names_the_manifest_and_its_layers() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:gz", Compress::Gzip);
    let (_, manifest_digest) = reg.manifest("union:gz");
    let out = inspect(&reg, &reference, &["--json"]);
    eprintln!("imgfs inspect --json:\n{}", out.stdout);
    let json: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("inspect --json prints one JSON document");
    let mut leaves = BTreeSet::new();
    json_leaves(&json, &mut leaves);
    assert!(
        leaves.contains(&manifest_digest),
        "manifest digest {manifest_digest} missing"
    );
    for (media_type, digest, size) in layers(&reg, "union:gz") {
        assert!(leaves.contains(&digest), "layer {digest} missing");
        assert!(
            leaves.contains(&size.to_string()),
            "size {size} of layer {digest} missing"
        );
        assert!(
            leaves.contains(&media_type),
            "media type {media_type} missing"
        );
    }
    let plain = inspect(&reg, &reference, &[]);
    assert!(
        !plain.stdout.trim().is_empty(),
        "inspect without --json printed nothing"
    );

    let multi = push(&reg, "multiarch", "multi:latest", Compress::None);
    let (index, _) = reg.manifest("multi:latest");
    let arm64 = index["manifests"]
        .as_array()
        .unwrap()
        .iter()
        .find(|m| m["platform"]["architecture"] == "arm64")
        .and_then(|m| m["digest"].as_str())
        .unwrap()
        .to_string();
    let out = inspect(&reg, &multi, &["--platform", "linux/arm64/v8", "--json"]);
    let json: serde_json::Value =
        serde_json::from_str(&out.stdout).expect("inspect --json prints JSON");
    let mut leaves = BTreeSet::new();
    json_leaves(&json, &mut leaves);
    assert!(
        leaves.contains(&arm64),
        "--platform linux/arm64/v8: arm64 manifest {arm64} missing:\n{}",
        out.stdout
    );
    assert!(
        leaves.iter().any(|l| l.contains("arm64")),
        "the arm64 platform is not reported"
    );
}
