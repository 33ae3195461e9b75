//! Hostile images, made byte by byte here and pushed to a real registry:
//! sizes far past the end of a layer, oversized PAX headers, a
//! decompression bomb, indexes nested without end, layer media types nobody
//! defined. Each gets a one-line error naming what and where, in bounded
//! time, or (the bomb, which is a valid image) a mount in bounded time and
//! memory that reads correctly.

mod common;

use common::*;
use std::fs;
use std::io::Write;
use std::process::Command;
use std::time::Duration;

const BLOCK: usize = 512;
/// An error that takes longer than this is a hang in disguise.
const FAST: Duration = Duration::from_secs(30);
/// The bomb: this many zero bytes in one file, about 1 MiB once gzipped.
const BOMB_BYTES: u64 = 1 << 30;
/// The daemon's memory after mounting and reading the bomb.
const BOMB_RSS_KIB: u64 = 128 * 1024;

/// A ustar header (checksum filled in).
fn header(name: &str, size: u64, typeflag: u8) -> [u8; BLOCK] {
    let mut h = [0u8; BLOCK];
    h[..name.len()].copy_from_slice(name.as_bytes());
    h[100..108].copy_from_slice(b"0000644\0");
    h[108..116].copy_from_slice(b"0000000\0");
    h[116..124].copy_from_slice(b"0000000\0");
    // 11 octal digits and a NUL, or all 12 digits for sizes over 8 GiB.
    let octal = format!("{size:011o}\0");
    let octal = if octal.len() == 12 {
        octal
    } else {
        format!("{size:012o}")
    };
    h[124..136].copy_from_slice(octal.as_bytes());
    h[136..148].copy_from_slice(b"14000000000\0");
    h[156] = typeflag;
    h[257..263].copy_from_slice(b"ustar\0");
    h[263..265].copy_from_slice(b"00");
    h[148..156].copy_from_slice(b"        ");
    let sum: u32 = h.iter().map(|&b| u32::from(b)).sum();
    h[148..156].copy_from_slice(format!("{sum:06o}\0 ").as_bytes());
    h
}

fn padded(data: &[u8]) -> Vec<u8> {
    let mut out = data.to_vec();
    out.resize(data.len().div_ceil(BLOCK) * BLOCK, 0);
    out
}

/// Builds a one-layer image from `layer` (tar or gzip bytes) and pushes it.
fn push_layer(reg: &Registry, name: &str, layer: &[u8]) -> String {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("layer");
    fs::write(&file, layer).expect("write layer");
    let layout = dir.path().join("layout");
    run_ok(
        Command::new(script("make-test-image"))
            .arg("from-layers")
            .arg(&layout)
            .arg(&file),
        MOUNT_TIMEOUT,
    );
    push_layout(reg, &layout, name)
}

fn expect_failure(reference: &str, words: &[&str]) {
    let failure = Mount::try_new(reference, MountOptions::default())
        .err()
        .unwrap_or_else(|| panic!("mounting {reference} must fail"));
    eprintln!(
        "{reference}: {:.1?}: {}",
        failure.elapsed,
        failure.stderr.trim()
    );
    assert!(failure.elapsed < FAST, "took {:?}", failure.elapsed);
    assert_one_line_error(&failure.stderr, words);
}

#[test]
fn a_size_far_past_the_layer_is_refused() {
    let reg = Registry::start(RegistryOptions::default());
    // A 10 GB file in a 1.5 KB layer: the stream ends inside the entry.
    let mut tar = header("huge", 10_000_000_000, b'0').to_vec();
    tar.extend_from_slice(&[b'x'; 1000]);
    let reference = push_layer(&reg, "liar:latest", &tar);
    expect_failure(&reference, &["layer", "sha256:", "ends inside an entry"]);
}

#[test]
fn an_oversized_pax_header_is_refused() {
    let reg = Registry::start(RegistryOptions::default());
    let record = format!("{} comment={}\n", 0, "A".repeat(3 << 20));
    let mut tar = header("././@PaxHeader", record.len() as u64, b'x').to_vec();
    tar.extend_from_slice(&padded(record.as_bytes()));
    tar.extend_from_slice(&header("file", 0, b'0'));
    tar.extend_from_slice(&[0u8; 2 * BLOCK]);
    let reference = push_layer(&reg, "pax:latest", &tar);
    expect_failure(&reference, &["layer", "metadata entry", "exceeds"]);
}

#[test]
fn a_decompression_bomb_mounts_in_bounded_memory() {
    let reg = Registry::start(RegistryOptions::default());
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::best());
    gz.write_all(&header("zeros", BOMB_BYTES, b'0'))
        .expect("gzip");
    let zeros = vec![0u8; 1 << 20];
    for _ in 0..BOMB_BYTES / zeros.len() as u64 {
        gz.write_all(&zeros).expect("gzip");
    }
    gz.write_all(&[0u8; 2 * BLOCK]).expect("gzip");
    let layer = gz.finish().expect("gzip");
    eprintln!(
        "bomb: {} GiB of zeros in {} KiB",
        BOMB_BYTES >> 30,
        layer.len() >> 10
    );
    let reference = push_layer(&reg, "bomb:latest", &layer);
    let mount = Mount::new(&reference, MountOptions::default());
    eprintln!("bomb: mounted in {:.1?}", mount.elapsed);
    let file = fs::File::open(mount.path().join("zeros")).expect("open");
    let mut buf = vec![1u8; 4096];
    std::os::unix::fs::FileExt::read_exact_at(&file, &mut buf, BOMB_BYTES / 2 + 12345)
        .expect("read the middle");
    assert!(buf.iter().all(|&b| b == 0));
    let rss = rss_kib(daemon_pid(mount.path()));
    eprintln!("bomb: daemon RSS {rss} KiB");
    assert!(rss < BOMB_RSS_KIB, "daemon RSS {rss} KiB");
}

/// PUTs a manifest or index document and returns its digest.
fn put(
    reg: &Registry,
    repo: &str,
    reference: &str,
    media_type: &str,
    doc: &serde_json::Value,
) -> String {
    let bytes = serde_json::to_vec(doc).expect("json");
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("doc.json");
    fs::write(&file, &bytes).expect("write");
    run_ok(
        Command::new("curl")
            .args(["-fsS", "-X", "PUT", "-H"])
            .arg(format!("Content-Type: {media_type}"))
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(reg.url(&format!("/v2/{repo}/manifests/{reference}"))),
        SHORT,
    );
    format!("sha256:{}", sha256_bytes(&bytes))
}

/// Length of a stored manifest or index, as the registry serves it.
fn raw_len(reg: &Registry, repo: &str, digest: &str, media_type: &str) -> usize {
    let out = Command::new("curl")
        .args(["-fsS", "-H"])
        .arg(format!("Accept: {media_type}"))
        .arg(reg.url(&format!("/v2/{repo}/manifests/{digest}")))
        .output()
        .expect("curl");
    assert!(out.status.success(), "GET {digest}");
    out.stdout.len()
}

const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";

#[test]
fn indexes_nested_without_end_are_refused() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "nest:base", Compress::Gzip);
    let (_, mut digest) = reg.manifest("nest:base");
    let mut media_type = OCI_MANIFEST;
    for level in 0..12 {
        let index = serde_json::json!({
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": [{
                "mediaType": media_type,
                "digest": digest,
                "size": raw_len(&reg, "nest", &digest, media_type),
                "platform": { "os": "linux", "architecture": "amd64" },
            }],
        });
        let tag = if level == 11 {
            "deep".to_string()
        } else {
            format!("level{level}")
        };
        let _ = put(&reg, "nest", &tag, OCI_INDEX, &index);
        digest = reg.manifest(&format!("nest:{tag}")).1;
        media_type = OCI_INDEX;
    }
    expect_failure(&reg.reference("nest:deep"), &["nest", "deeper"]);
}

#[test]
fn a_layer_media_type_nobody_defined_is_refused() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "odd:base", Compress::Gzip);
    let (mut manifest, _) = reg.manifest("odd:base");
    manifest["layers"][0]["mediaType"] = serde_json::json!("application/vnd.example.mystery");
    put(&reg, "odd", "mystery", OCI_MANIFEST, &manifest);
    expect_failure(
        &reg.reference("odd:mystery"),
        &["application/vnd.example.mystery"],
    );
}
