//! Parsers for the JSON documents of an image: index / manifest list,
//! manifest, and config. They take bytes and return plain values, so they are
//! tested on literal documents; fetching and digest checks live in `resolve`.

use super::platform::Platform;
use crate::digest::Digest;
use crate::layer::Compression;
use crate::registry::{BlobLocator, media_type};
use serde::{Deserialize, Serialize};

pub const OCI_CONFIG: &str = "application/vnd.oci.image.config.v1+json";
pub const DOCKER_CONFIG: &str = "application/vnd.docker.container.image.v1+json";
/// Annotation BuildKit puts on attestation manifests in an index.
const REFERENCE_TYPE_ANNOTATION: &str = "vnd.docker.reference.type";
const ATTESTATION: &str = "attestation-manifest";

/// What a fetched manifest document is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Index,
    Manifest,
    Schema1,
}

/// Layer media types imgfs reads: (media type, compression, foreign).
const LAYER_TYPES: &[(&str, Compression, bool)] = &[
    (
        "application/vnd.oci.image.layer.v1.tar",
        Compression::None,
        false,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+gzip",
        Compression::Gzip,
        false,
    ),
    (
        "application/vnd.oci.image.layer.v1.tar+zstd",
        Compression::Zstd,
        false,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar.gzip",
        Compression::Gzip,
        false,
    ),
    (
        "application/vnd.docker.image.rootfs.diff.tar",
        Compression::None,
        false,
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip",
        Compression::Gzip,
        true,
    ),
    (
        "application/vnd.docker.image.rootfs.foreign.diff.tar",
        Compression::None,
        true,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar",
        Compression::None,
        true,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+gzip",
        Compression::Gzip,
        true,
    ),
    (
        "application/vnd.oci.image.layer.nondistributable.v1.tar+zstd",
        Compression::Zstd,
        true,
    ),
];

/// (compression, foreign) of a layer media type; `None` when unknown.
pub fn layer_type(media_type: &str) -> Option<(Compression, bool)> {
    LAYER_TYPES
        .iter()
        .find(|(t, _, _)| *t == media_type)
        .map(|(_, c, f)| (*c, *f))
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Probe {
    #[serde(default)]
    schema_version: Option<u32>,
    #[serde(default)]
    media_type: Option<String>,
    #[serde(default)]
    manifests: Option<serde_json::Value>,
    #[serde(default)]
    layers: Option<serde_json::Value>,
    #[serde(default)]
    fs_layers: Option<serde_json::Value>,
}

/// Classifies a document from its own `mediaType`, else the `Content-Type`
/// the registry sent, else its shape.
pub fn classify(content_type: &str, bytes: &[u8]) -> Result<Kind, String> {
    let probe: Probe =
        serde_json::from_slice(bytes).map_err(|e| format!("not a JSON manifest: {e}"))?;
    if probe.schema_version == Some(1) || probe.fs_layers.is_some() {
        return Ok(Kind::Schema1);
    }
    let declared = probe
        .media_type
        .as_deref()
        .filter(|t| !t.is_empty())
        .unwrap_or(content_type);
    match declared {
        media_type::OCI_INDEX | media_type::DOCKER_LIST => return Ok(Kind::Index),
        media_type::OCI_MANIFEST | media_type::DOCKER_V2 => return Ok(Kind::Manifest),
        media_type::DOCKER_V1 | media_type::DOCKER_V1_SIGNED => return Ok(Kind::Schema1),
        _ => {}
    }
    match (probe.manifests.is_some(), probe.layers.is_some()) {
        (true, false) => Ok(Kind::Index),
        (false, true) => Ok(Kind::Manifest),
        _ => Err(format!("unsupported manifest media type {declared:?}")),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "camelCase")]
struct Descriptor {
    #[serde(default)]
    media_type: String,
    digest: String,
    size: u64,
    #[serde(default)]
    urls: Vec<String>,
    #[serde(default)]
    platform: Option<PlatformJson>,
    #[serde(default)]
    annotations: std::collections::HashMap<String, String>,
}

#[derive(Deserialize)]
struct PlatformJson {
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    os: String,
    #[serde(default, rename = "os.version")]
    os_version: Option<String>,
    #[serde(default)]
    variant: Option<String>,
}

impl PlatformJson {
    fn to_platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone().filter(|v| !v.is_empty()),
            os_version: self.os_version.clone().filter(|v| !v.is_empty()),
        }
    }
}

fn parse_digest(text: &str, what: &str) -> Result<Digest, String> {
    text.parse().map_err(|e| format!("{what}: {e}"))
}

/// One image manifest an index offers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IndexEntry {
    pub media_type: String,
    pub digest: Digest,
    pub size: u64,
    /// `None` when the entry has no platform (it then matches nothing).
    pub platform: Option<Platform>,
}

#[derive(Deserialize)]
struct IndexJson {
    #[serde(default)]
    manifests: Vec<Descriptor>,
}

/// The runnable entries of an index, in order: entries of unknown media
/// types and attestations (`unknown/unknown` or BuildKit's annotation) are
/// skipped, not errors.
pub fn parse_index(bytes: &[u8]) -> Result<Vec<IndexEntry>, String> {
    let index: IndexJson =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid index: {e}"))?;
    let mut out = Vec::new();
    for (i, d) in index.manifests.iter().enumerate() {
        let known = matches!(
            d.media_type.as_str(),
            "" | media_type::OCI_MANIFEST
                | media_type::DOCKER_V2
                | media_type::OCI_INDEX
                | media_type::DOCKER_LIST
        );
        let platform = d.platform.as_ref().map(PlatformJson::to_platform);
        let attestation = d
            .annotations
            .get(REFERENCE_TYPE_ANNOTATION)
            .is_some_and(|t| t == ATTESTATION)
            || platform.as_ref().is_some_and(Platform::is_unknown);
        if !known || attestation {
            tracing::debug!(
                media_type = d.media_type,
                digest = d.digest,
                "skipping index entry {i}"
            );
            continue;
        }
        let digest = parse_digest(&d.digest, &format!("index entry {i}"))?;
        out.push(IndexEntry {
            media_type: d.media_type.clone(),
            digest,
            size: d.size,
            platform,
        });
    }
    Ok(out)
}

/// A layer as the manifest describes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct LayerDescriptor {
    pub media_type: String,
    pub compression: Compression,
    pub blob: BlobLocator,
    /// Foreign / non-distributable layer (Windows base layers): fetched from
    /// `blob.urls` first.
    pub foreign: bool,
    /// Descriptor annotations (eStargz / zstd:chunked TOC positions live here).
    pub annotations: std::collections::BTreeMap<String, String>,
}

/// A parsed image manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub config_media_type: String,
    pub config: BlobLocator,
    pub layers: Vec<LayerDescriptor>,
}

#[derive(Deserialize)]
struct ManifestJson {
    config: Descriptor,
    #[serde(default)]
    layers: Vec<Descriptor>,
}

pub fn parse_manifest(bytes: &[u8]) -> Result<Manifest, String> {
    let m: ManifestJson =
        serde_json::from_slice(bytes).map_err(|e| format!("invalid manifest: {e}"))?;
    if !matches!(
        m.config.media_type.as_str(),
        OCI_CONFIG | DOCKER_CONFIG | ""
    ) {
        return Err(format!(
            "not a container image: its config has media type {:?} (an artifact, not an image)",
            m.config.media_type
        ));
    }
    let config = BlobLocator {
        digest: parse_digest(&m.config.digest, "config")?,
        size: m.config.size,
        urls: Vec::new(),
    };
    let mut layers = Vec::with_capacity(m.layers.len());
    for (i, d) in m.layers.iter().enumerate() {
        let digest = parse_digest(&d.digest, &format!("layer {i}"))?;
        let (compression, foreign) = layer_type(&d.media_type).ok_or_else(|| {
            format!(
                "layer {i} ({digest}) has unsupported media type {:?}",
                d.media_type
            )
        })?;
        layers.push(LayerDescriptor {
            media_type: d.media_type.clone(),
            compression,
            blob: BlobLocator {
                digest,
                size: d.size,
                urls: d.urls.clone(),
            },
            foreign,
            annotations: d
                .annotations
                .iter()
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        });
    }
    Ok(Manifest {
        config_media_type: m.config.media_type.clone(),
        config,
        layers,
    })
}

/// One step of the image's build history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct History {
    #[serde(default)]
    pub created: Option<String>,
    #[serde(default)]
    pub created_by: Option<String>,
    #[serde(default)]
    pub comment: Option<String>,
    #[serde(default)]
    pub empty_layer: bool,
}

/// What imgfs uses of an image config, plus the verified raw bytes.
#[derive(Debug, Clone, Serialize)]
pub struct ImageConfig {
    pub digest: Digest,
    #[serde(skip)]
    pub raw: bytes::Bytes,
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    pub os_version: Option<String>,
    pub env: Vec<String>,
    pub cmd: Option<Vec<String>>,
    pub entrypoint: Option<Vec<String>>,
    pub working_dir: Option<String>,
    pub user: Option<String>,
    /// sha256 of each layer's uncompressed tar, bottom first.
    pub diff_ids: Vec<Digest>,
    pub history: Vec<History>,
}

impl ImageConfig {
    pub fn platform(&self) -> Platform {
        Platform {
            os: self.os.clone(),
            architecture: self.architecture.clone(),
            variant: self.variant.clone(),
            os_version: self.os_version.clone(),
        }
    }
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "PascalCase")]
struct RunConfig {
    #[serde(default)]
    env: Option<Vec<String>>,
    #[serde(default)]
    cmd: Option<Vec<String>>,
    #[serde(default)]
    entrypoint: Option<Vec<String>>,
    #[serde(default)]
    working_dir: Option<String>,
    #[serde(default)]
    user: Option<String>,
}

#[derive(Deserialize, Default)]
struct RootFs {
    #[serde(default)]
    diff_ids: Vec<String>,
}

#[derive(Deserialize)]
struct ConfigJson {
    #[serde(default)]
    os: String,
    #[serde(default)]
    architecture: String,
    #[serde(default)]
    variant: Option<String>,
    #[serde(default, rename = "os.version")]
    os_version: Option<String>,
    #[serde(default)]
    config: Option<RunConfig>,
    #[serde(default)]
    rootfs: Option<RootFs>,
    #[serde(default)]
    history: Option<Vec<History>>,
}

/// Parses a config whose bytes were already verified against `digest`.
pub fn parse_config(digest: Digest, raw: bytes::Bytes) -> Result<ImageConfig, String> {
    let c: ConfigJson =
        serde_json::from_slice(&raw).map_err(|e| format!("invalid image config: {e}"))?;
    let run = c.config.unwrap_or_default();
    let diff_ids = c
        .rootfs
        .unwrap_or_default()
        .diff_ids
        .iter()
        .enumerate()
        .map(|(i, d)| parse_digest(d, &format!("rootfs.diff_ids[{i}]")))
        .collect::<Result<Vec<_>, _>>()?;
    Ok(ImageConfig {
        digest,
        os: c.os,
        architecture: c.architecture,
        variant: c.variant.filter(|v| !v.is_empty()),
        os_version: c.os_version.filter(|v| !v.is_empty()),
        env: run.env.unwrap_or_default(),
        cmd: run.cmd,
        entrypoint: run.entrypoint,
        working_dir: run.working_dir,
        user: run.user,
        diff_ids,
        history: c.history.unwrap_or_default(),
        raw,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D1: &str = "sha256:1111111111111111111111111111111111111111111111111111111111111111";
    const D2: &str = "sha256:2222222222222222222222222222222222222222222222222222222222222222";
    const D3: &str = "sha256:3333333333333333333333333333333333333333333333333333333333333333";

    #[test]
    fn classifies_documents() {
        let index = format!(
            r#"{{"schemaVersion":2,"mediaType":"{}","manifests":[]}}"#,
            media_type::OCI_INDEX
        );
        assert_eq!(classify("", index.as_bytes()), Ok(Kind::Index));
        let list = br#"{"schemaVersion":2,"manifests":[]}"#;
        assert_eq!(classify(media_type::DOCKER_LIST, list), Ok(Kind::Index));
        assert_eq!(
            classify("application/json", list),
            Ok(Kind::Index),
            "shape decides"
        );
        let manifest = br#"{"schemaVersion":2,"config":{},"layers":[]}"#;
        assert_eq!(
            classify(media_type::DOCKER_V2, manifest),
            Ok(Kind::Manifest)
        );
        let schema1 = br#"{"schemaVersion":1,"name":"x","tag":"y","fsLayers":[{"blobSum":"sha256:00"}],"signatures":[]}"#;
        assert_eq!(
            classify(media_type::DOCKER_V1_SIGNED, schema1),
            Ok(Kind::Schema1)
        );
        assert_eq!(classify("", schema1), Ok(Kind::Schema1));
        let weird = br#"{"schemaVersion":2,"mediaType":"application/vnd.example+json"}"#;
        assert!(
            classify("", weird)
                .unwrap_err()
                .contains("application/vnd.example+json")
        );
        assert!(classify("", b"<html>").unwrap_err().contains("not a JSON"));
    }

    #[test]
    fn index_skips_attestations_and_unknown_types() {
        let doc = format!(
            r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D1}","size":10,"platform":{{"architecture":"amd64","os":"linux"}}}},
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D2}","size":20,"platform":{{"architecture":"unknown","os":"unknown"}}}},
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D2}","size":20,"platform":{{"architecture":"arm64","os":"linux"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}},
              {{"mediaType":"application/vnd.example.signature+json","digest":"sha512:zz","size":1}},
              {{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{D3}","size":30,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},
              {{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{D1}","size":40,"platform":{{"architecture":"amd64","os":"windows","os.version":"10.0.20348.1"}}}}
            ]}}"#
        );
        let entries = parse_index(doc.as_bytes()).unwrap();
        let shown: Vec<String> = entries
            .iter()
            .map(|e| e.platform.as_ref().unwrap().to_string())
            .collect();
        assert_eq!(shown, ["linux/amd64", "linux/arm/v7", "windows/amd64"]);
        assert_eq!(
            entries[2].platform.as_ref().unwrap().os_version.as_deref(),
            Some("10.0.20348.1")
        );
        assert_eq!(entries[1].size, 30);
        let bad = format!(
            r#"{{"manifests":[{{"mediaType":"{}","digest":"md5:00","size":1}}]}}"#,
            media_type::OCI_MANIFEST
        );
        assert!(
            parse_index(bad.as_bytes())
                .unwrap_err()
                .contains("index entry 0")
        );
    }

    #[test]
    fn manifest_layers_and_media_types() {
        let doc = format!(
            r#"{{"schemaVersion":2,"config":{{"mediaType":"{OCI_CONFIG}","digest":"{D1}","size":5}},"layers":[
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{D2}","size":100}},
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{D3}","size":200,"annotations":{{"k":"v"}}}},
              {{"mediaType":"application/vnd.oci.image.layer.v1.tar","digest":"{D1}","size":300}},
              {{"mediaType":"application/vnd.docker.image.rootfs.foreign.diff.tar.gzip","digest":"{D2}","size":400,"urls":["https://mcr.example/layer"]}}
            ]}}"#
        );
        let m = parse_manifest(doc.as_bytes()).unwrap();
        assert_eq!(m.config.size, 5);
        let kinds: Vec<(Compression, bool)> = m
            .layers
            .iter()
            .map(|l| (l.compression, l.foreign))
            .collect();
        assert_eq!(
            kinds,
            [
                (Compression::Gzip, false),
                (Compression::Zstd, false),
                (Compression::None, false),
                (Compression::Gzip, true)
            ]
        );
        assert_eq!(m.layers[3].blob.urls, ["https://mcr.example/layer"]);
        assert_eq!(
            m.layers[1].annotations.get("k").map(String::as_str),
            Some("v")
        );

        let unknown = doc.replace(
            "application/vnd.oci.image.layer.v1.tar+zstd",
            "application/vnd.example.layer",
        );
        let e = parse_manifest(unknown.as_bytes()).unwrap_err();
        assert!(
            e.contains("layer 1") && e.contains("application/vnd.example.layer"),
            "{e}"
        );
        let helm = doc.replace(OCI_CONFIG, "application/vnd.cncf.helm.config.v1+json");
        assert!(
            parse_manifest(helm.as_bytes())
                .unwrap_err()
                .contains("not a container image")
        );
        assert_eq!(
            layer_type("application/vnd.oci.image.layer.nondistributable.v1.tar+gzip"),
            Some((Compression::Gzip, true))
        );
    }

    #[test]
    fn config_fields() {
        let raw = format!(
            r#"{{"architecture":"arm64","variant":"v8","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["/bin/sh"],"WorkingDir":"/w","User":"1000"}},
               "rootfs":{{"type":"layers","diff_ids":["{D1}","{D2}"]}},
               "history":[{{"created":"2024-01-01T00:00:00Z","created_by":"ADD x /"}},{{"created_by":"ENV a=b","empty_layer":true}}]}}"#
        );
        let c = parse_config(Digest::of(raw.as_bytes()), raw.clone().into()).unwrap();
        assert_eq!(c.platform().to_string(), "linux/arm64/v8");
        assert_eq!(c.env, ["PATH=/bin"]);
        assert_eq!(c.cmd.as_deref(), Some(&["/bin/sh".to_string()][..]));
        assert_eq!(c.entrypoint, None);
        assert_eq!(
            (c.working_dir.as_deref(), c.user.as_deref()),
            (Some("/w"), Some("1000"))
        );
        assert_eq!(c.diff_ids.len(), 2);
        assert!(c.history[1].empty_layer && !c.history[0].empty_layer);
        let minimal =
            br#"{"os":"linux","architecture":"amd64","config":null,"rootfs":{"diff_ids":[]}}"#;
        let c = parse_config(Digest::of(minimal), bytes::Bytes::from_static(minimal)).unwrap();
        assert!(c.env.is_empty() && c.cmd.is_none());
    }
}
