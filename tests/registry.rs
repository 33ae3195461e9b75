//! The registry client and image resolution against Debian's real
//! `docker-registry` (distribution 2.8): blobs and manifests are pushed with
//! curl (an independent client), then fetched with `imgfs::registry::Client`
//! and resolved with `imgfs::image::resolve`. Covers manifests by tag and
//! digest, whole blobs, Range reads, unknown tags/blobs, an OCI index with an
//! attestation entry, and htpasswd Basic auth with good, wrong and missing
//! credentials in a config.json.

mod common;

use common::*;
use futures_util::StreamExt;
use imgfs::digest::Digest;
use imgfs::image::{self, ImageError, Platform};
use imgfs::reference::Reference;
use imgfs::registry::{BlobLocator, Client, ClientOptions, media_type};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

const LAYER_LEN: usize = 200_000;

/// curl with the registry's credentials, if it has any.
fn curl(reg: &Registry) -> Command {
    let mut cmd = Command::new("curl");
    cmd.args(["-s", "-S", "-f", "--max-time", "30"]);
    if let Some((user, password)) = reg.credentials() {
        cmd.arg("-u").arg(format!("{user}:{password}"));
    }
    cmd
}

/// Pushes `bytes` as a blob of `repo` (POST to open an upload, PUT to close it).
fn push_blob(reg: &Registry, repo: &str, bytes: &[u8]) -> Digest {
    let digest = Digest::of(bytes);
    let started = run_ok(
        curl(reg)
            .args(["-D", "-", "-o", "/dev/null", "-X", "POST"])
            .arg(reg.url(&format!("/v2/{repo}/blobs/uploads/"))),
        SHORT,
    );
    let location = started
        .stdout
        .lines()
        .find_map(|l| {
            l.strip_prefix("Location:")
                .or_else(|| l.strip_prefix("location:"))
        })
        .map(str::trim)
        .expect("upload Location header")
        .to_string();
    let location = if location.starts_with('/') {
        reg.url(&location)
    } else {
        location
    };
    let file = tempfile::NamedTempFile::new().expect("temp blob file");
    std::fs::write(file.path(), bytes).expect("write blob");
    let separator = if location.contains('?') { '&' } else { '?' };
    run_ok(
        curl(reg)
            .args([
                "-o",
                "/dev/null",
                "-X",
                "PUT",
                "-H",
                "Content-Type: application/octet-stream",
                "--data-binary",
            ])
            .arg(format!("@{}", file.path().display()))
            .arg(format!("{location}{separator}digest={digest}")),
        SHORT,
    );
    digest
}

fn push_manifest(reg: &Registry, repo: &str, tag: &str, media_type: &str, bytes: &[u8]) -> Digest {
    let file = tempfile::NamedTempFile::new().expect("temp manifest file");
    std::fs::write(file.path(), bytes).expect("write manifest");
    run_ok(
        curl(reg)
            .args(["-o", "/dev/null", "-X", "PUT", "-H"])
            .arg(format!("Content-Type: {media_type}"))
            .arg("--data-binary")
            .arg(format!("@{}", file.path().display()))
            .arg(reg.url(&format!("/v2/{repo}/manifests/{tag}"))),
        SHORT,
    );
    Digest::of(bytes)
}

fn layer_bytes() -> Vec<u8> {
    (0..LAYER_LEN)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 11) as u8)
        .collect()
}

/// What was pushed: one layer, its config, a manifest `v1` and an index `multi`.
struct Pushed {
    layer: Vec<u8>,
    layer_digest: Digest,
    manifest: Vec<u8>,
    manifest_digest: Digest,
    index_digest: Digest,
}

fn push_image(reg: &Registry, repo: &str) -> Pushed {
    let layer = layer_bytes();
    let layer_digest = push_blob(reg, repo, &layer);
    // A layer "diff_id" only has to be well formed for resolution.
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/usr/bin"],"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{}"]}},"history":[{{"created_by":"test"}}]}}"#,
        Digest::of(b"diff")
    );
    let config_digest = push_blob(reg, repo, config.as_bytes());
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{config_digest}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{layer_digest}","size":{}}}]}}"#,
        media_type::OCI_MANIFEST,
        config.len(),
        layer.len()
    )
    .into_bytes();
    let manifest_digest = push_manifest(reg, repo, "v1", media_type::OCI_MANIFEST, &manifest);
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[
          {{"mediaType":"{m}","digest":"{manifest_digest}","size":{len},"platform":{{"architecture":"unknown","os":"unknown"}}}},
          {{"mediaType":"{m}","digest":"{manifest_digest}","size":{len},"platform":{{"architecture":"amd64","os":"linux"}}}}
        ]}}"#,
        media_type::OCI_INDEX,
        m = media_type::OCI_MANIFEST,
        len = manifest.len()
    );
    let index_digest = push_manifest(reg, repo, "multi", media_type::OCI_INDEX, index.as_bytes());
    Pushed {
        layer,
        layer_digest,
        manifest,
        manifest_digest,
        index_digest,
    }
}

fn client(config_dir: &Path) -> Client {
    Client::new(ClientOptions {
        docker_config_dir: Some(config_dir.to_path_buf()),
        max_retries: 1,
        connect_timeout: Duration::from_secs(5),
        read_timeout: Duration::from_secs(10),
        ..ClientOptions::default()
    })
    .expect("client")
}

fn reference(reg: &Registry, name: &str) -> Reference {
    Reference::parse(&reg.reference(name)).expect("reference")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn manifests_blobs_ranges_and_resolution() {
    let reg = Registry::start(RegistryOptions::default());
    let p = push_image(&reg, "team/app");
    let c = client(reg.docker_config());
    let r = reference(&reg, "team/app:v1");

    let m = c.manifest(&r, "v1", &[]).await.expect("manifest by tag");
    assert_eq!(&m.bytes[..], &p.manifest[..]);
    assert_eq!(
        (m.media_type.as_str(), m.digest),
        (media_type::OCI_MANIFEST, p.manifest_digest)
    );
    let by_digest = c
        .manifest(&r, &p.manifest_digest.to_string(), &[])
        .await
        .expect("manifest by digest");
    assert_eq!(by_digest.digest, p.manifest_digest);

    let blob = BlobLocator {
        digest: p.layer_digest,
        size: p.layer.len() as u64,
        urls: vec![],
    };
    let mut stream = c.blob(&r, &blob).await.expect("blob");
    let mut whole = Vec::new();
    while let Some(chunk) = stream.next().await {
        whole.extend_from_slice(&chunk.expect("chunk"));
    }
    assert!(whole == p.layer, "blob bytes differ");
    let part = c.blob_range(&r, &blob, 1000, 5000).await.expect("range");
    assert!(part[..] == p.layer[1000..5000]);
    let last = c
        .blob_range(&r, &blob, blob.size - 1, blob.size)
        .await
        .expect("last byte");
    assert_eq!(last[..], p.layer[LAYER_LEN - 1..]);

    let e = c.manifest(&r, "nope", &[]).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");
    let text = e.to_string();
    assert!(
        text.starts_with(&format!(
            "registry {}: manifest team/app:nope: 404 not found",
            reg.host()
        )),
        "{text}"
    );
    assert!(text.contains("MANIFEST_UNKNOWN"), "{text}");
    let missing = BlobLocator {
        digest: Digest::of(b"absent"),
        size: 6,
        urls: vec![],
    };
    let e = c.blob_range(&r, &missing, 0, 6).await.unwrap_err();
    assert!(e.is_not_found(), "{e}");

    let amd64 = Platform::parse("linux/amd64").expect("platform");
    let multi = reference(&reg, "team/app:multi");
    let img = image::resolve(&c, &multi, Some(&amd64))
        .await
        .expect("resolve index");
    assert_eq!(img.index_digest, Some(p.index_digest));
    assert_eq!(img.manifest_digest, p.manifest_digest);
    assert_eq!(
        img.platforms.len(),
        1,
        "the unknown/unknown entry is skipped"
    );
    assert_eq!(img.layers.len(), 1);
    assert_eq!(img.layers[0].blob, blob);
    assert_eq!(img.config.env, ["PATH=/usr/bin"]);
    let single = image::resolve(&c, &r, None)
        .await
        .expect("resolve single manifest");
    assert_eq!(single.platform.to_string(), "linux/amd64");
    assert_eq!(single.index_digest, None);
    let s390x = Platform::parse("linux/s390x").expect("platform");
    match image::resolve(&c, &multi, Some(&s390x)).await {
        Err(e @ ImageError::NoMatchingPlatform { .. }) => {
            let text = e.to_string();
            assert!(
                text.contains("linux/amd64") && text.contains("--platform"),
                "{text}"
            );
        }
        other => panic!("expected NoMatchingPlatform, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_good_wrong_and_missing_credentials() {
    let reg = Registry::start(RegistryOptions {
        auth: Some(("alice".into(), "s3cret".into())),
        ..RegistryOptions::default()
    });
    let p = push_image(&reg, "private/app");
    let r = reference(&reg, "private/app:v1");

    let good = client(reg.docker_config());
    let m = good
        .manifest(&r, "v1", &[])
        .await
        .expect("with the right password");
    assert_eq!(m.digest, p.manifest_digest);
    let blob = BlobLocator {
        digest: p.layer_digest,
        size: p.layer.len() as u64,
        urls: vec![],
    };
    let part = good
        .blob_range(&r, &blob, 10, 20)
        .await
        .expect("range with Basic auth");
    assert!(part[..] == p.layer[10..20]);

    let wrong_dir = tempfile::tempdir().expect("temp dir");
    write_docker_config(wrong_dir.path(), &reg.host(), "alice", "wrong");
    let e = client(wrong_dir.path())
        .manifest(&r, "v1", &[])
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    let text = e.to_string();
    assert!(
        text.contains("401") && text.contains(&format!("docker login {}", reg.host())),
        "{text}"
    );
    assert!(
        text.contains(&wrong_dir.path().display().to_string()),
        "names the config it read: {text}"
    );

    let empty_dir = tempfile::tempdir().expect("temp dir");
    let e = client(empty_dir.path())
        .manifest(&r, "v1", &[])
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert!(e.to_string().contains("username and password"), "{e}");
}
