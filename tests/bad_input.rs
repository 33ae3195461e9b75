//! What imgfs does with bad input: unknown names fail fast with one line;
//! a corrupted or truncated blob never mounts; corruption that appears after
//! the index was cached turns into EIO on exactly the reads it affects, never
//! into wrong bytes; a hostile image stays inside its mountpoint.

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs::{self, File};
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::time::Duration;

/// "Fails fast": an error that takes longer than this is a hang in disguise.
const FAST: Duration = Duration::from_secs(30);
const MIB: u64 = 1024 * 1024;
/// Where the corruption goes inside `data/libs.bin` (12 MiB): far from the
/// file's first MiB, which must still read fine.
const CORRUPT_INTO_LIBS: u64 = 6 * MIB;
const CLEAN_PREFIX: usize = MIB as usize;

fn expect_failure(reference: &str, words: &[&str]) -> MountFailure {
    let failure = Mount::try_new(reference, MountOptions::default())
        .err()
        .unwrap_or_else(|| panic!("mounting {reference} must fail"));
    eprintln!(
        "{reference}: failed in {:.1?}: {}",
        failure.elapsed,
        failure.stderr.trim()
    );
    assert!(
        failure.elapsed < FAST,
        "{reference}: failing took {:?}",
        failure.elapsed
    );
    assert_one_line_error(&failure.stderr, words);
    failure
}

#[test]
fn unknown_repository_fails_fast() {
    let reg = Registry::start(RegistryOptions::default());
    expect_failure(
        &reg.reference("no/such-repo:latest"),
        &["no repository", "no/such-repo", "check the name"],
    );
}

#[test]
fn unknown_tag_fails_fast() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "busybox:latest", Compress::Gzip);
    push(&reg, "busybox", "busybox:v2", Compress::Gzip);
    let missing = reference.replace(":latest", ":no-such-tag");
    // The registry's tags are named, so a typo is seen at once.
    expect_failure(&missing, &["no tag no-such-tag", "its tags: latest, v2"]);
}

#[test]
fn unreachable_registry_fails_fast() {
    // A port that was free a moment ago: nothing answers there.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    expect_failure(
        &format!("127.0.0.1:{port}/some/image:1"),
        &[&format!("127.0.0.1:{port}")],
    );
}

/// Offset and size of the data of tar entry `name` in the uncompressed tar
/// at `path`.
fn tar_entry_data(path: &Path, name: &str) -> (u64, u64) {
    let mut archive = tar::Archive::new(File::open(path).expect("open layer blob"));
    for entry in archive.entries().expect("read tar") {
        let entry = entry.expect("tar entry");
        if entry.path_bytes().as_ref() == name.as_bytes() {
            return (entry.raw_file_position(), entry.size());
        }
    }
    panic!("{name} not found in {}", path.display())
}

/// The union image's first layer (the one with `data/libs.bin`) on `reg`.
fn first_layer(reg: &Registry, name: &str) -> (String, u64, PathBuf) {
    let (_, digest, size) = layers(reg, name)
        .into_iter()
        .next()
        .expect("the image has layers");
    let blob = reg.blob_path(&digest);
    (digest, size, blob)
}

#[test]
fn corrupted_blob_fails_the_mount_naming_the_digest() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:tar", Compress::None);
    let (digest, _, blob) = first_layer(&reg, "union:tar");
    let (offset, _) = tar_entry_data(&blob, "data/libs.bin");
    flip_byte(&blob, offset + CORRUPT_INTO_LIBS);
    expect_failure(&reference, &[&digest, "mismatch"]);
}

#[test]
fn corrupted_gzip_blob_fails_the_mount_naming_the_digest() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:gz", Compress::Gzip);
    let (digest, size, blob) = first_layer(&reg, "union:gz");
    flip_byte(&blob, size / 2);
    expect_failure(&reference, &[&digest]);
}

#[test]
fn truncated_blob_fails_the_mount_naming_the_digest() {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:gz", Compress::Gzip);
    let (digest, size, blob) = first_layer(&reg, "union:gz");
    File::options()
        .write(true)
        .open(&blob)
        .and_then(|f| f.set_len(size / 2))
        .expect("truncate blob");
    expect_failure(&reference, &[&digest]);
}

/// Removes everything from an imgfs cache but the indexes and manifests
/// (the cache layout of DESIGN.md), so the next mount has to fetch file data
/// from the registry again while it trusts its cached index.
fn drop_cached_data(cache: &Path) {
    for entry in fs::read_dir(cache).expect("read cache dir").flatten() {
        let name = entry.file_name();
        if name == "indexes" || name == "manifests" {
            continue;
        }
        let path = entry.path();
        let _ = if entry.file_type().map(|t| t.is_dir()).unwrap_or(false) {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
    }
}

/// Reads every regular file of `expected` through `mounted`: each is either
/// exactly the expected bytes or fails with EIO. Returns the files that
/// failed with EIO, and every other outcome as an error line.
fn read_all(expected: &Path, mounted: &Path) -> (Vec<String>, Vec<String>) {
    let (mut eio, mut wrong) = (Vec::new(), Vec::new());
    let mut todo = vec![PathBuf::new()];
    while let Some(rel) = todo.pop() {
        for entry in fs::read_dir(expected.join(&rel))
            .expect("read reference dir")
            .flatten()
        {
            let child = rel.join(entry.file_name());
            let ty = entry.file_type().expect("file type");
            if ty.is_dir() {
                todo.push(child);
                continue;
            }
            if !ty.is_file() {
                continue;
            }
            let want = sha256_file(&expected.join(&child)).expect("hash reference file");
            match sha256_file(&mounted.join(&child)) {
                Ok(got) if got == want => {}
                Ok(_) => wrong.push(format!("{}: WRONG BYTES served", child.display())),
                Err(e) if e.raw_os_error() == Some(libc::EIO) => {
                    eio.push(child.display().to_string())
                }
                Err(e) => wrong.push(format!("{}: {e} (expected EIO)", child.display())),
            }
        }
    }
    eio.sort();
    (eio, wrong)
}

fn corruption_after_indexing(compress: Compress) {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "union", "union:latest", compress);
    let expected = reference_unpack(&reg, &reference);
    let cache = tempfile::Builder::new()
        .prefix("imgfs-cache-")
        .tempdir()
        .unwrap();
    let opts = MountOptions {
        cache_dir: Some(cache.path().to_path_buf()),
        ..Default::default()
    };
    Mount::new(&reference, opts.clone()).unmount();
    drop_cached_data(cache.path());

    let (digest, size, blob) = first_layer(&reg, "union:latest");
    let corrupt_at = match compress {
        Compress::None => tar_entry_data(&blob, "data/libs.bin").0 + CORRUPT_INTO_LIBS,
        _ => size / 2, // well inside the compressed data of data/libs.bin
    };
    flip_byte(&blob, corrupt_at);
    eprintln!("{compress:?}: flipped byte {corrupt_at} of {digest} ({size} bytes)");

    let mount = Mount::new(&reference, opts);
    let (want, got) = (expected.path(), mount.path().to_path_buf());
    let (eio, wrong) = within("reading every file", WALK_TIMEOUT, &mount, move || {
        read_all(&want, &got)
    });
    eprintln!("{compress:?}: EIO on {eio:?}");
    assert!(
        wrong.is_empty(),
        "{compress:?}: reads that were neither right nor EIO:\n{}",
        wrong.join("\n")
    );
    assert!(
        eio.iter().any(|f| f == "data/libs.bin"),
        "{compress:?}: corrupted data/libs.bin read without error; EIO on {eio:?}"
    );
    assert!(
        !eio.iter().any(|f| f == "bin/busybox"),
        "{compress:?}: an unaffected file failed too"
    );
    if compress == Compress::None {
        // Blocks are verified one by one: only the corrupted file fails,
        // and its own first MiB, far from the corruption, still reads.
        assert_eq!(
            eio,
            ["data/libs.bin"],
            "uncompressed: only the corrupted file may fail"
        );
        let (want, got) = (
            expected.path().join("data/libs.bin"),
            mount.path().join("data/libs.bin"),
        );
        let prefixes = within(
            "reading the clean start of libs.bin",
            SHORT,
            &mount,
            move || {
                let read_prefix = |p: &Path| -> std::io::Result<Vec<u8>> {
                    let mut buf = vec![0u8; CLEAN_PREFIX];
                    let mut f = File::open(p)?;
                    f.seek(SeekFrom::Start(0))?;
                    f.read_exact(&mut buf)?;
                    Ok(buf)
                };
                (
                    read_prefix(&want).ok(),
                    read_prefix(&got).map_err(|e| e.to_string()),
                )
            },
        );
        assert_eq!(
            prefixes.1.ok(),
            prefixes.0,
            "the first MiB of data/libs.bin, far from the corruption"
        );
    }
    mount.unmount();
}

#[test]
fn corruption_after_indexing_gives_eio_uncompressed() {
    corruption_after_indexing(Compress::None);
}

#[test]
fn corruption_after_indexing_gives_eio_gzip() {
    corruption_after_indexing(Compress::Gzip);
}

/// Paths and symlinks that try to leave the root: the image mounts, its
/// entries land inside the mountpoint, and nothing of the host shows through.
#[test]
fn hostile_image_stays_inside_the_mount() {
    let host_files = [
        "/escape",
        "/abs/file",
        "/b",
        "/c/e",
        "/etc/hostile-marker",
        "/hostile-marker",
    ];
    let before: BTreeMap<&str, bool> = host_files
        .iter()
        .map(|f| (*f, Path::new(f).exists()))
        .collect();
    let host_passwd = sha256_file(Path::new("/etc/passwd")).expect("hash host /etc/passwd");
    let host_hostname = fs::read("/etc/hostname").ok();

    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "hostile", "hostile:latest", Compress::Gzip);
    let mount = Mount::new(&reference, MountOptions::default());
    let root = mount.path().to_path_buf();
    let seen = within(
        "walking the hostile tree",
        WALK_TIMEOUT,
        &mount,
        move || {
            let read = |rel: &str| fs::read(root.join(rel)).ok();
            let evil = fs::symlink_metadata(root.join("evil")).map(|m| m.file_type());
            let evil_target = fs::read_link(root.join("evil")).ok();
            let evil_passwd = fs::symlink_metadata(root.join("evil"))
                .ok()
                .filter(|m| m.is_dir())
                .and_then(|_| read("evil/passwd"));
            (
                read("escape"),
                read("abs/file"),
                read("b"),
                read("c/e"),
                read("safe"),
                read("leak"),
                evil.map(|t| t.is_symlink()).ok(),
                evil_target,
                evil_passwd,
                read("etc/passwd"),
            )
        },
    );
    let (escape, abs, b, ce, safe, leak, evil_is_symlink, evil_target, evil_passwd, image_passwd) =
        seen;
    assert_eq!(
        escape.as_deref(),
        Some(&b"escaped?\n"[..]),
        "../../escape belongs at /escape of the image"
    );
    assert_eq!(
        abs.as_deref(),
        Some(&b"absolute\n"[..]),
        "/abs/file belongs at /abs/file of the image"
    );
    assert_eq!(
        b.as_deref(),
        Some(&b"dot-dot in the middle\n"[..]),
        "a/../../b belongs at /b of the image"
    );
    assert_eq!(
        ce.as_deref(),
        Some(&b"dots everywhere\n"[..]),
        "./c/./d/../e belongs at /c/e of the image"
    );
    assert_eq!(safe.as_deref(), Some(&b"an ordinary file\n"[..]));
    if let (Some(leak), Some(host)) = (&leak, &host_hostname) {
        assert_ne!(
            leak, host,
            "a hardlink to ../../etc/hostname shows the HOST's /etc/hostname"
        );
    }
    match evil_is_symlink {
        // The symlink was kept: it is data, its target is not followed while
        // building the tree, and the image's /etc/passwd is the image's.
        Some(true) => {
            assert_eq!(evil_target.as_deref(), Some(Path::new("/etc")));
            let passwd = image_passwd.unwrap_or_default();
            assert!(
                passwd.starts_with(b"root:x:0:0:image root") || passwd.starts_with(b"hostile:"),
                "image /etc/passwd: {passwd:?}"
            );
        }
        // Or a directory replaced it, holding the file.
        Some(false) => assert!(
            evil_passwd.is_some_and(|p| p.starts_with(b"hostile:")),
            "evil/ is a directory without passwd"
        ),
        None => panic!("/evil is missing from the mount"),
    }

    mount.unmount();
    let after: BTreeMap<&str, bool> = host_files
        .iter()
        .map(|f| (*f, Path::new(f).exists()))
        .collect();
    assert_eq!(before, after, "host paths appeared or vanished");
    assert_eq!(
        sha256_file(Path::new("/etc/passwd")).ok(),
        Some(host_passwd),
        "the host's /etc/passwd changed"
    );
}
