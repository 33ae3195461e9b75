//! Pushing with `imgfs::registry::Client` to Debian's real `docker-registry`
//! (distribution 2.8): a random layer and its config as blobs (a second push
//! is skipped, as the registry's request log shows), a manifest by tag and by
//! digest read back with `Client::manifest` and with curl, the image copied
//! out by skopeo (an independent client checking every digest), a
//! cross-repository mount, and a registry with htpasswd Basic auth with
//! good, wrong and missing credentials in a config.json.

mod common;

use bytes::Bytes;
use common::*;
use futures_util::StreamExt;
use imgfs::digest::Digest;
use imgfs::reference::Reference;
use imgfs::registry::{BlobLocator, Client, ClientOptions, media_type};
use rand::Rng;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// Size of the random file in the test layer.
const FILE_LEN: usize = 300_000;
/// How long the registry may take to log a request after answering it.
const LOG_SETTLE: Duration = Duration::from_secs(5);
const POLL: Duration = Duration::from_millis(50);

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

/// An uncompressed tar layer holding one file of random bytes.
fn random_layer() -> Bytes {
    let mut data = vec![0u8; FILE_LEN];
    rand::rng().fill(&mut data[..]);
    let mut builder = tar::Builder::new(Vec::new());
    let mut header = tar::Header::new_ustar();
    header.set_size(FILE_LEN as u64);
    header.set_mode(0o644);
    header.set_cksum();
    builder
        .append_data(&mut header, "random.bin", &data[..])
        .expect("tar entry");
    Bytes::from(builder.into_inner().expect("tar archive"))
}

/// An image config and OCI manifest for `layer` (uncompressed, so its
/// diff_id is its digest).
fn image_for(layer: &Bytes) -> (Bytes, Bytes) {
    let layer_digest = Digest::of(layer);
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Cmd":["/bin/sh"]}},"rootfs":{{"type":"layers","diff_ids":["{layer_digest}"]}}}}"#
    );
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{}","size":{}}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{layer_digest}","size":{}}}]}}"#,
        media_type::OCI_MANIFEST,
        Digest::of(config.as_bytes()),
        config.len(),
        layer.len()
    );
    (Bytes::from(config), Bytes::from(manifest))
}

/// The registry's logged requests after the first `mark`, once a `HEAD`
/// among them has been logged and the log has stopped growing. GETs are
/// left out: one that ended before `mark` may be logged just after it.
fn requests_after_head(reg: &Registry, mark: usize) -> Vec<Request> {
    let deadline = Instant::now() + LOG_SETTLE;
    let mut seen = 0;
    loop {
        let new: Vec<Request> = reg
            .requests()
            .into_iter()
            .skip(mark)
            .filter(|r| r.method != "GET")
            .collect();
        let settled = new.len() == seen && new.iter().any(|r| r.method == "HEAD");
        if settled || Instant::now() > deadline {
            return new;
        }
        seen = new.len();
        std::thread::sleep(POLL * 4);
    }
}

async fn read_blob(c: &Client, r: &Reference, digest: Digest, size: usize) -> Vec<u8> {
    let locator = BlobLocator {
        digest,
        size: size as u64,
        urls: vec![],
    };
    let mut stream = c.blob(r, &locator).await.expect("blob stream");
    let mut out = Vec::new();
    while let Some(chunk) = stream.next().await {
        out.extend_from_slice(&chunk.expect("blob chunk"));
    }
    out
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn blobs_manifests_and_mounts() {
    let reg = Registry::start(RegistryOptions::default());
    let c = client(reg.docker_config());
    let r = reference(&reg, "team/app:v1");
    let layer = random_layer();
    let layer_digest = Digest::of(&layer);
    let (config, manifest) = image_for(&layer);
    let config_digest = Digest::of(&config);

    assert!(!c.blob_exists(&r, &layer_digest).await.expect("HEAD"));
    c.push_blob(&r, &layer_digest, layer.clone())
        .await
        .expect("push layer");
    assert!(c.blob_exists(&r, &layer_digest).await.expect("HEAD"));
    assert!(read_blob(&c, &r, layer_digest, layer.len()).await == layer[..]);
    let stored = std::fs::read(reg.blob_path(&layer_digest.to_string())).expect("stored blob");
    assert!(stored == layer[..], "the registry stored other bytes");

    let mark = reg.requests().len();
    c.push_blob(&r, &layer_digest, layer.clone())
        .await
        .expect("second push");
    let again = requests_after_head(&reg, mark);
    let methods: Vec<&str> = again.iter().map(|q| q.method.as_str()).collect();
    assert_eq!(methods, ["HEAD"], "an existing blob is not uploaded again");

    c.push_blob(&r, &config_digest, config.clone())
        .await
        .expect("push config");
    let got = c
        .push_manifest(&r, media_type::OCI_MANIFEST, manifest.clone())
        .await
        .expect("push manifest by tag");
    assert_eq!(got, Digest::of(&manifest));
    let read = c.manifest(&r, "v1", &[]).await.expect("read back by tag");
    assert!(read.bytes == manifest);
    assert_eq!(read.media_type, media_type::OCI_MANIFEST);
    assert_eq!(read.digest, got);
    let (json, digest) = reg.manifest("team/app:v1");
    assert_eq!(digest, got.to_string(), "curl sees the same digest");
    assert_eq!(json["layers"][0]["digest"], layer_digest.to_string());

    // By digest only: an untagged manifest (here a one-entry index).
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[{{"mediaType":"{}","digest":"{got}","size":{},"platform":{{"architecture":"amd64","os":"linux"}}}}]}}"#,
        media_type::OCI_INDEX,
        media_type::OCI_MANIFEST,
        manifest.len()
    );
    let index_digest = Digest::of(index.as_bytes());
    let pinned = reference(&reg, "team/app").with_digest(index_digest);
    let pushed = c
        .push_manifest(&pinned, media_type::OCI_INDEX, Bytes::from(index.clone()))
        .await
        .expect("push index by digest");
    assert_eq!(pushed, index_digest);
    let read = c
        .manifest(&r, &index_digest.to_string(), &[])
        .await
        .expect("read back by digest");
    assert!(read.bytes == index.as_bytes());
    assert_eq!(read.media_type, media_type::OCI_INDEX);

    // An independent client copies the image out, checking every digest.
    let out = tempfile::tempdir().expect("temp dir");
    let copy = out.path().join("dir");
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--src-tls-verify=false"])
            .arg(format!("docker://{}", reg.reference("team/app:v1")))
            .arg(format!("dir:{}", copy.display())),
        SHORT,
    );
    let copied = copy.join(layer_digest.hex());
    assert!(std::fs::read(copied).expect("skopeo's copy") == layer[..]);

    // Cross-repository mount: linked, not uploaded.
    let other = reference(&reg, "team/other:v1");
    let mark = reg.requests().len();
    assert!(
        c.mount_blob(&other, &layer_digest, &r)
            .await
            .expect("mount")
    );
    assert!(c.blob_exists(&other, &layer_digest).await.expect("HEAD"));
    let after = requests_after_head(&reg, mark);
    assert!(
        after.iter().all(|q| q.method != "PUT"),
        "a mount uploads nothing: {after:?}"
    );
    assert!(read_blob(&c, &other, layer_digest, layer.len()).await == layer[..]);
    let absent = Digest::of(b"never pushed");
    assert!(
        !c.mount_blob(&other, &absent, &r)
            .await
            .expect("declined mount")
    );
    assert!(!c.blob_exists(&other, &absent).await.expect("HEAD"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn basic_auth_with_good_wrong_and_missing_credentials() {
    let reg = Registry::start(RegistryOptions {
        auth: Some(("alice".into(), "s3cret".into())),
        ..RegistryOptions::default()
    });
    let r = reference(&reg, "private/app:v1");
    let layer = random_layer();
    let layer_digest = Digest::of(&layer);
    let (config, manifest) = image_for(&layer);

    let good = client(reg.docker_config());
    good.push_blob(&r, &layer_digest, layer.clone())
        .await
        .expect("push with the right password");
    good.push_blob(&r, &Digest::of(&config), config)
        .await
        .expect("push config");
    let digest = good
        .push_manifest(&r, media_type::OCI_MANIFEST, manifest.clone())
        .await
        .expect("push manifest");
    assert!(good.blob_exists(&r, &layer_digest).await.expect("HEAD"));
    let read = good.manifest(&r, "v1", &[]).await.expect("read back");
    assert_eq!(read.digest, digest);
    let other = reference(&reg, "private/other:v1");
    assert!(
        good.mount_blob(&other, &layer_digest, &r)
            .await
            .expect("mount")
    );

    let wrong_dir = tempfile::tempdir().expect("temp dir");
    write_docker_config(wrong_dir.path(), &reg.host(), "alice", "wrong");
    let wrong = client(wrong_dir.path());
    let fresh = Bytes::from_static(b"not yet there");
    let e = wrong
        .push_blob(&r, &Digest::of(&fresh), fresh.clone())
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    let text = e.to_string();
    assert_eq!(text.lines().count(), 1, "{text}");
    assert!(
        text.starts_with(&format!(
            "registry {}: pushing blob private/app@{}: 401 unauthorized",
            reg.host(),
            Digest::of(&fresh)
        )),
        "{text}"
    );
    assert!(
        text.contains(&format!("docker login {}", reg.host()))
            && text.contains(&wrong_dir.path().display().to_string()),
        "{text}"
    );
    let e = wrong
        .push_manifest(&r, media_type::OCI_MANIFEST, manifest)
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert!(
        e.to_string()
            .contains("pushing manifest private/app:v1: 401 unauthorized"),
        "{e}"
    );

    let empty_dir = tempfile::tempdir().expect("temp dir");
    let e = client(empty_dir.path())
        .push_blob(&r, &Digest::of(&fresh), fresh)
        .await
        .unwrap_err();
    assert!(e.is_unauthorized(), "{e}");
    assert!(e.to_string().contains("username and password"), "{e}");
}
