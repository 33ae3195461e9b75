//! Layer indexes shared through the registry, as OCI artifacts.
//!
//! The first mount of a legacy layer streams it once to build its index
//! ([`crate::layer::build_index`]). `imgfs index push` publishes those indexes
//! so that other machines skip the pass: one artifact per image manifest,
//! whose `subject` is that manifest and whose layers are the encoded indexes,
//! one per image layer, each annotated with the digest of the layer it
//! describes. Mounts find it through the referrers API, or through the tag
//! schema (`sha256-<hex>`) on registries without that API (OCI distribution
//! 1.1).
//!
//! What is checked before a published index is used: the artifact manifest
//! and the index blob against their digests; that the index names the layer's
//! digest and size and a format the layer has; and a random sample of its
//! block digests against the layer's bytes (first and last block and
//! [`SAMPLED_BLOCKS`] more). Every block read later is still checked against
//! the index, so a wrong digest that the sample missed is an `EIO`, never
//! wrong bytes. What a published index cannot give is the whole-blob digest
//! check of a scan: the entries and block digests are trusted to come from
//! whoever can push to the repository (the trust a tag already needs).

use crate::digest::Digest;
use crate::image::{LayerDescriptor, ResolvedImage};
use crate::layer::{Access, BLOCK_SIZE, Compression, Index, LayerError};
use crate::reference::Reference;
use crate::registry::{BlobLocator, Client, RegistryError, media_type};
use bytes::Bytes;
use rand::Rng;
use serde::Deserialize;
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

/// `artifactType` of the artifacts imgfs publishes.
pub const ARTIFACT_TYPE: &str = "application/vnd.imgfs.layer-index.v1";
/// Media type of one encoded index (zstd-compressed, see `Index::encode`).
pub const INDEX_MEDIA_TYPE: &str = "application/vnd.imgfs.layer-index.v1+zstd";
/// Annotation naming the layer an index blob describes.
pub const LAYER_ANNOTATION: &str = "io.imgfs.layer.digest";
/// The OCI "empty" config an artifact without config data carries.
const EMPTY_MEDIA_TYPE: &str = "application/vnd.oci.empty.v1+json";
const EMPTY_CONFIG: &[u8] = b"{}";
/// Block digests checked against the layer at mount, besides the first and last.
pub const SAMPLED_BLOCKS: usize = 4;
/// Largest index blob fetched (a layer of millions of entries stays far below).
const MAX_INDEX_BLOB: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum ArtifactError {
    #[error(transparent)]
    Registry(#[from] RegistryError),
    #[error(transparent)]
    Layer(#[from] LayerError),
    #[error("published index {index} for layer {layer} rejected: {reason}")]
    Rejected {
        index: Digest,
        layer: Digest,
        reason: String,
    },
    #[error("{0}")]
    Invalid(String),
}

/// What `publish` pushed.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Published {
    pub artifact: Digest,
    /// Layers with a published index (layers with a TOC or zstd need none).
    pub layers: usize,
    /// Bytes of index blobs pushed.
    pub bytes: u64,
    /// Whether the tag-schema index was written (no referrers API).
    pub tag_schema: bool,
}

/// Publishes the indexes of `image`'s layers (bottom first, as `indexes`).
pub async fn publish(
    client: &Client,
    image: &ResolvedImage,
    indexes: &[Arc<Index>],
) -> Result<Published, ArtifactError> {
    let reference = &image.reference;
    let mut layers = Vec::new();
    let mut bytes = 0;
    for (layer, index) in image.layers.iter().zip(indexes) {
        if !matches!(index.access, Access::Tar | Access::Gzip { .. }) {
            continue;
        }
        let encoded = Bytes::from(index.encode()?);
        let digest = Digest::of(&encoded);
        bytes += encoded.len() as u64;
        layers.push(json!({
            "mediaType": INDEX_MEDIA_TYPE,
            "digest": digest.to_string(),
            "size": encoded.len(),
            "annotations": { LAYER_ANNOTATION: layer.blob.digest.to_string() },
        }));
        client.push_blob(reference, &digest, encoded).await?;
    }
    let empty = Digest::of(EMPTY_CONFIG);
    client
        .push_blob(reference, &empty, Bytes::from_static(EMPTY_CONFIG))
        .await?;
    let subject = client
        .manifest(reference, &image.manifest_digest.to_string(), &[])
        .await?;
    let manifest = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_MANIFEST,
        "artifactType": ARTIFACT_TYPE,
        "config": { "mediaType": EMPTY_MEDIA_TYPE, "digest": empty.to_string(), "size": EMPTY_CONFIG.len() },
        "layers": layers,
        "subject": {
            "mediaType": image.manifest_media_type,
            "digest": image.manifest_digest.to_string(),
            "size": subject.bytes.len(),
        },
    });
    let manifest = Bytes::from(serde_json::to_vec(&manifest).map_err(json_err)?);
    let artifact = Digest::of(&manifest);
    client
        .push_manifest(
            &reference.with_digest(artifact),
            media_type::OCI_MANIFEST,
            manifest.clone(),
        )
        .await?;
    let descriptor = json!({
        "mediaType": media_type::OCI_MANIFEST,
        "digest": artifact.to_string(),
        "size": manifest.len(),
        "artifactType": ARTIFACT_TYPE,
    });
    let tag_schema = client
        .referrers(reference, &image.manifest_digest)
        .await?
        .is_none();
    if tag_schema {
        update_tag_schema(client, reference, &image.manifest_digest, descriptor).await?;
    }
    Ok(Published {
        artifact,
        layers: layers.len(),
        bytes,
        tag_schema,
    })
}

fn json_err(e: serde_json::Error) -> ArtifactError {
    ArtifactError::Invalid(format!("encoding JSON: {e}"))
}

/// The tag that stands in for the referrers API: `sha256-<hex>`.
fn tag_schema_tag(subject: &Digest) -> String {
    format!("sha256-{}", subject.hex())
}

/// Replaces imgfs's entry in the subject's tag-schema index (other tools'
/// referrers are kept).
async fn update_tag_schema(
    client: &Client,
    reference: &Reference,
    subject: &Digest,
    descriptor: Value,
) -> Result<(), ArtifactError> {
    let tag = tag_schema_tag(subject);
    let mut manifests: Vec<Value> = match client
        .manifest(reference, &tag, &[media_type::OCI_INDEX])
        .await
    {
        Ok(existing) => referrer_list(&existing.bytes)?,
        Err(e) if e.is_not_found() => Vec::new(),
        Err(e) => return Err(e.into()),
    };
    manifests.retain(|m| m["artifactType"] != ARTIFACT_TYPE);
    manifests.push(descriptor);
    let index = json!({
        "schemaVersion": 2,
        "mediaType": media_type::OCI_INDEX,
        "manifests": manifests,
    });
    let bytes = Bytes::from(serde_json::to_vec(&index).map_err(json_err)?);
    let mut tagged = reference.clone();
    tagged.digest = None;
    tagged.tag = Some(tag);
    client
        .push_manifest(&tagged, media_type::OCI_INDEX, bytes)
        .await?;
    Ok(())
}

fn referrer_list(bytes: &[u8]) -> Result<Vec<Value>, ArtifactError> {
    let index: Value = serde_json::from_slice(bytes)
        .map_err(|e| ArtifactError::Invalid(format!("referrers index: {e}")))?;
    Ok(index["manifests"].as_array().cloned().unwrap_or_default())
}

#[derive(Deserialize)]
struct Descriptor {
    #[serde(rename = "mediaType", default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(rename = "artifactType", default)]
    artifact_type: String,
    #[serde(default)]
    annotations: BTreeMap<String, String>,
}

#[derive(Deserialize)]
struct ArtifactManifest {
    #[serde(default)]
    layers: Vec<Descriptor>,
}

/// The published index blobs for `image`'s layers, by layer digest; empty
/// when none were published (or the lookup failed: that only costs a scan).
pub async fn find(
    client: &Client,
    reference: &Reference,
    subject: &Digest,
) -> HashMap<Digest, BlobLocator> {
    match find_inner(client, reference, subject).await {
        Ok(found) => found,
        Err(e) => {
            tracing::warn!("looking for published layer indexes: {e}");
            HashMap::new()
        }
    }
}

async fn find_inner(
    client: &Client,
    reference: &Reference,
    subject: &Digest,
) -> Result<HashMap<Digest, BlobLocator>, ArtifactError> {
    let listing = match client.referrers(reference, subject).await? {
        Some(index) => index.bytes,
        None => match client
            .manifest(
                reference,
                &tag_schema_tag(subject),
                &[media_type::OCI_INDEX],
            )
            .await
        {
            Ok(index) => index.bytes,
            Err(e) if e.is_not_found() => return Ok(HashMap::new()),
            Err(e) => return Err(e.into()),
        },
    };
    let referrers: Vec<Descriptor> = referrer_list(&listing)?
        .into_iter()
        .filter_map(|v| serde_json::from_value(v).ok())
        .filter(|d: &Descriptor| d.artifact_type == ARTIFACT_TYPE)
        .collect();
    // The last one listed is the newest (publish replaces, registries append).
    let Some(newest) = referrers.last() else {
        return Ok(HashMap::new());
    };
    let digest: Digest = newest
        .digest
        .parse()
        .map_err(|e| ArtifactError::Invalid(format!("referrer digest: {e}")))?;
    let artifact = client.manifest(reference, &digest.to_string(), &[]).await?;
    let manifest: ArtifactManifest = serde_json::from_slice(&artifact.bytes)
        .map_err(|e| ArtifactError::Invalid(format!("artifact {digest}: {e}")))?;
    let mut found = HashMap::new();
    for layer in manifest.layers {
        if layer.media_type != INDEX_MEDIA_TYPE {
            continue;
        }
        let (Some(Ok(for_layer)), Ok(blob)) = (
            layer
                .annotations
                .get(LAYER_ANNOTATION)
                .map(|d| d.parse::<Digest>()),
            layer.digest.parse::<Digest>(),
        ) else {
            continue;
        };
        found.insert(
            for_layer,
            BlobLocator {
                digest: blob,
                size: layer.size,
                urls: Vec::new(),
            },
        );
    }
    Ok(found)
}

/// Fetches a published index for `layer` and checks it (see the module doc).
pub async fn fetch(
    client: &Client,
    reference: &Reference,
    locator: &BlobLocator,
    layer: &LayerDescriptor,
) -> Result<Index, ArtifactError> {
    let reject = |reason: String| ArtifactError::Rejected {
        index: locator.digest,
        layer: layer.blob.digest,
        reason,
    };
    if locator.size > MAX_INDEX_BLOB {
        return Err(reject(format!("{} bytes is too large", locator.size)));
    }
    let bytes = client
        .blob_range(reference, locator, 0, locator.size)
        .await?;
    if Digest::of(&bytes) != locator.digest {
        return Err(reject("the blob does not match its digest".into()));
    }
    let index = Index::decode(&bytes)?;
    if index.layer_digest != layer.blob.digest || index.blob_size != layer.blob.size {
        return Err(reject(format!(
            "it describes {} ({} bytes)",
            index.layer_digest, index.blob_size
        )));
    }
    let fits = matches!(
        (&index.access, layer.compression),
        (Access::Tar, Compression::None) | (Access::Gzip { .. }, Compression::Gzip)
    );
    if !fits {
        return Err(reject("its format is not the layer's".into()));
    }
    let blocks = sample(index.block_digests.len());
    let checks = blocks.iter().map(|&block| {
        let start = block as u64 * u64::from(BLOCK_SIZE);
        let end = (start + u64::from(BLOCK_SIZE)).min(index.blob_size);
        async move {
            let bytes = client
                .blob_range(reference, &layer.blob, start, end)
                .await?;
            Ok::<_, RegistryError>((block, start, end, Digest::of(&bytes)))
        }
    });
    for (block, start, end, actual) in futures_util::future::try_join_all(checks).await? {
        if actual.as_bytes() != &index.block_digests[block] {
            return Err(reject(format!(
                "block {block} (bytes {start}-{end}) does not match the layer"
            )));
        }
    }
    Ok(index)
}

/// First, last, and [`SAMPLED_BLOCKS`] random blocks of `count`.
fn sample(count: usize) -> Vec<usize> {
    if count == 0 {
        return Vec::new();
    }
    let mut rng = rand::rng();
    let mut blocks: Vec<usize> = [0, count - 1]
        .into_iter()
        .chain((0..SAMPLED_BLOCKS).map(|_| rng.random_range(0..count)))
        .collect();
    blocks.sort_unstable();
    blocks.dedup();
    blocks
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn samples_cover_both_ends_without_repeats() {
        assert!(sample(0).is_empty());
        assert_eq!(sample(1), [0]);
        for _ in 0..100 {
            let s = sample(50);
            assert_eq!((s[0], *s.last().expect("last")), (0, 49));
            assert!(s.windows(2).all(|w| w[0] < w[1]) && s.len() <= SAMPLED_BLOCKS + 2);
        }
        assert_eq!(tag_schema_tag(&Digest::of(b"")).len(), "sha256-".len() + 64);
    }
}
