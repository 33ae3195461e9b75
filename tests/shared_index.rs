//! Layer indexes shared through the registry (`imgfs index push`), against
//! the real docker-registry (which has no referrers API, so the tag schema
//! is what carries the artifact): a mount with an empty cache streams no
//! layer, and tampered artifacts are rejected with a warning and the layer
//! scanned instead.

mod common;

use common::*;
use imgfs::digest::Digest;
use imgfs::layer::Index;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions, media_type};
use std::process::Command;

/// What a mount may fetch of a layer whose index was published: the sampled
/// blocks (first, last and `SAMPLED_BLOCKS` more, 128 KiB each).
const SAMPLE_BUDGET: u64 = (imgfs::artifact::SAMPLED_BLOCKS as u64 + 2) * 128 * 1024;

fn index_push(reg: &Registry, name: &str) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    run_ok(
        Command::new(IMGFS)
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["index", "push"])
            .arg(reg.reference(name)),
        MOUNT_TIMEOUT,
    )
}

/// Per layer of `name`: (digest, size, bytes the registry served since `mark`).
fn layer_traffic(reg: &Registry, name: &str, mark: usize) -> Vec<(String, u64, u64)> {
    let gets = reg.blob_gets_since(mark);
    layers(reg, name)
        .into_iter()
        .map(|(_, digest, size)| {
            let moved = gets
                .iter()
                .filter(|r| r.uri.ends_with(&digest))
                .map(|r| r.written)
                .sum();
            (digest, size, moved)
        })
        .collect()
}

fn get_json(reg: &Registry, path: &str, accept: &str) -> serde_json::Value {
    let out = run_ok(
        Command::new("curl")
            .args(["-fsS", "-H"])
            .arg(format!("Accept: {accept}"))
            .arg(reg.url(path)),
        SHORT,
    );
    serde_json::from_str(&out.stdout).expect("JSON")
}

fn get_bytes(reg: &Registry, path: &str) -> Vec<u8> {
    let out = Command::new("curl")
        .args(["-fsS"])
        .arg(reg.url(path))
        .output()
        .expect("curl");
    assert!(out.status.success());
    out.stdout
}

/// Changes a published index.
type Tamper = dyn Fn(&mut Index);

/// Re-publishes `name`'s artifact with its first index blob changed by `tamper`.
fn republish_tampered(reg: &Registry, name: &str, tamper: &Tamper) {
    let (_, digest) = reg.manifest(name);
    let repo = name.split(':').next().expect("repo");
    let tag = format!("sha256-{}", digest.trim_start_matches("sha256:"));
    let listing = get_json(
        reg,
        &format!("/v2/{repo}/manifests/{tag}"),
        media_type::OCI_INDEX,
    );
    let artifact_digest = listing["manifests"][0]["digest"]
        .as_str()
        .expect("artifact")
        .to_string();
    let mut artifact = get_json(
        reg,
        &format!("/v2/{repo}/manifests/{artifact_digest}"),
        media_type::OCI_MANIFEST,
    );
    let layer = &mut artifact["layers"][0];
    let blob = get_bytes(
        reg,
        &format!("/v2/{repo}/blobs/{}", layer["digest"].as_str().expect("d")),
    );
    let mut index = Index::decode(&blob).expect("decodes");
    tamper(&mut index);
    let encoded = index.encode().expect("encode");
    let new_digest = Digest::of(&encoded);
    layer["digest"] = serde_json::json!(new_digest.to_string());
    layer["size"] = serde_json::json!(encoded.len());
    let artifact_bytes = serde_json::to_vec(&artifact).expect("json");
    let artifact_digest = Digest::of(&artifact_bytes);
    let mut listing = listing;
    listing["manifests"][0]["digest"] = serde_json::json!(artifact_digest.to_string());
    listing["manifests"][0]["size"] = serde_json::json!(artifact_bytes.len());
    let reference = Reference::parse(&reg.reference(name)).expect("reference");
    let client = Client::new(ClientOptions::default()).expect("client");
    let runtime = tokio::runtime::Runtime::new().expect("runtime");
    runtime.block_on(async {
        client
            .push_blob(&reference, &new_digest, encoded.into())
            .await
            .expect("blob");
        client
            .push_manifest(
                &reference.with_digest(artifact_digest),
                media_type::OCI_MANIFEST,
                artifact_bytes.into(),
            )
            .await
            .expect("artifact");
        let mut tagged = reference.clone();
        tagged.tag = Some(tag.clone());
        client
            .push_manifest(
                &tagged,
                media_type::OCI_INDEX,
                serde_json::to_vec(&listing).expect("json").into(),
            )
            .await
            .expect("listing");
    });
}

#[test]
fn published_indexes_spare_every_other_machine_the_scan() {
    let reg = Registry::start(RegistryOptions::default());
    let name = "union:shared";
    push(&reg, "union", name, Compress::Gzip);
    let expected = reference_unpack(&reg, &reg.reference(name));
    let out = index_push(&reg, name);
    assert!(
        out.stdout.contains("published the indexes of 5 layer(s)"),
        "{}",
        out.stdout
    );

    let mark = reg.requests().len();
    let mount = Mount::new(
        &reg.reference(name),
        MountOptions {
            extra_args: vec!["--read-only".into(), "--prefetch".into(), "none".into()],
            ..MountOptions::default()
        },
    );
    let traffic = layer_traffic(&reg, name, mark);
    let (moved, total): (u64, u64) = traffic.iter().fold((0, 0), |(m, t), l| (m + l.2, t + l.1));
    eprintln!(
        "mount with a published index and an empty cache moved {moved} of {total} layer bytes: {traffic:?}"
    );
    for (digest, size, moved) in &traffic {
        assert!(
            *moved <= SAMPLE_BUDGET.min(*size),
            "layer {digest} ({size} bytes) was streamed: {moved} bytes moved"
        );
    }
    assert!(
        !mount.stderr.contains("indexing the whole layer"),
        "{}",
        mount.stderr
    );
    assert_same_trees(
        &expected.path(),
        mount.path(),
        "mount from a published index",
    );
}

#[test]
fn tampered_index_artifacts_are_rejected_and_the_layer_scanned() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "bb:a", Compress::Gzip);
    let expected = reference_unpack(&reg, &reg.reference("bb:a"));
    index_push(&reg, "bb:a");
    let cases: [(&str, &Tamper); 2] = [
        ("does not match the layer", &|index: &mut Index| {
            // The first block is always sampled.
            index.block_digests[0][0] ^= 1;
        }),
        ("describes", &|index: &mut Index| {
            index.layer_digest = Digest::of(b"another layer");
        }),
    ];
    for (why, tamper) in cases {
        republish_tampered(&reg, "bb:a", tamper);
        let mount = Mount::new(
            &reg.reference("bb:a"),
            MountOptions {
                extra_args: vec!["--read-only".into()],
                ..MountOptions::default()
            },
        );
        assert!(
            mount.stderr.contains("rejected") && mount.stderr.contains(why),
            "a warning says the published index was rejected ({why}):\n{}",
            mount.stderr
        );
        assert!(
            mount.stderr.contains("indexing the whole layer"),
            "{}",
            mount.stderr
        );
        assert_same_trees(&expected.path(), mount.path(), why);
    }
}
