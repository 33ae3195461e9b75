//! From a reference to the verified list of layers: fetch the manifest (or
//! index, then pick the platform, then its manifest), fetch the config, and
//! check every document against its digest and the config against the
//! manifest (one diff_id per layer). Nothing here reads layer contents.
//!
//! Submodules: [`platform`] (normalization and matching), [`manifest`]
//! (parsers over bytes).

pub mod manifest;
pub mod platform;

pub use manifest::{History, ImageConfig, LayerDescriptor};
pub use platform::Platform;

use crate::digest::Digest;
use crate::reference::Reference;
use crate::registry::{Client, FetchedManifest, RegistryError, media_type};
use manifest::{IndexEntry, Kind};
use serde::Serialize;

/// An index may point at another index; real images nest at most once.
const MAX_INDEX_DEPTH: usize = 2;
/// Configs are small JSON; anything larger is refused rather than buffered.
const CONFIG_MAX_BYTES: u64 = 32 * 1024 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    /// Boxed: registry errors carry several strings and this enum is returned a lot.
    #[error(transparent)]
    Registry(Box<RegistryError>),
    #[error("{reference}: {what}: {reason}")]
    Invalid {
        reference: String,
        what: String,
        reason: String,
    },
    /// The registry has no manifest for the reference; `hint` says what
    /// it does have.
    #[error("{reference}: not found: {hint}")]
    NotFound { reference: String, hint: String },
    #[error(
        "{reference}: unsupported manifest (schema 1, pushed by Docker < 1.10): re-push it with a current docker or skopeo"
    )]
    Schema1 { reference: String },
    #[error(
        "{reference}: no image for platform {wanted} (available: {available}); choose one with --platform"
    )]
    NoMatchingPlatform {
        reference: String,
        wanted: String,
        available: String,
    },
    #[error("{reference}: the image is for {actual}, not the requested {wanted}")]
    PlatformMismatch {
        reference: String,
        wanted: String,
        actual: String,
    },
    #[error(
        "{reference}: config {expected}: digest mismatch: the registry sent bytes hashing to {actual}"
    )]
    ConfigDigestMismatch {
        reference: String,
        expected: Digest,
        actual: Digest,
    },
    #[error("invalid platform {input:?}: {reason}")]
    InvalidPlatform { input: String, reason: String },
}

impl From<RegistryError> for ImageError {
    fn from(e: RegistryError) -> Self {
        ImageError::Registry(Box::new(e))
    }
}

/// Everything known about an image before any layer is read.
#[derive(Debug, Clone, Serialize)]
pub struct ResolvedImage {
    pub reference: Reference,
    /// Digest of the index / manifest list, when the reference named one.
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    pub manifest_media_type: String,
    /// What the index offers (empty for a single manifest), for `inspect`.
    pub platforms: Vec<(Platform, Digest)>,
    /// The platform chosen (from the config for a single manifest).
    pub platform: Platform,
    /// Bottom layer first.
    pub layers: Vec<LayerDescriptor>,
    pub config: ImageConfig,
}

/// Resolves `reference` to one image for `platform` (default: this host).
pub async fn resolve(
    client: &Client,
    reference: &Reference,
    platform: Option<&Platform>,
) -> Result<ResolvedImage, ImageError> {
    let manifest = resolve_manifest(client, reference, platform).await?;
    let config = manifest.fetch_config(client).await?;
    manifest.with_config(config)
}

/// An image resolved down to its manifest: enough to start on the layers
/// while the config is still on its way (a mount saves a round trip).
pub struct ResolvedManifest {
    pub reference: Reference,
    pub index_digest: Option<Digest>,
    pub manifest_digest: Digest,
    manifest_media_type: String,
    platforms: Vec<(Platform, Digest)>,
    /// The index entry's platform; `None` for a single manifest, whose
    /// platform the config says.
    chosen_platform: Option<Platform>,
    /// `--platform`, checked against a single manifest's config.
    requested: Option<Platform>,
    /// Bottom layer first.
    pub layers: Vec<LayerDescriptor>,
    config: crate::registry::BlobLocator,
}

/// The first half of [`resolve`]: index (platform choice) and manifest.
pub async fn resolve_manifest(
    client: &Client,
    reference: &Reference,
    platform: Option<&Platform>,
) -> Result<ResolvedManifest, ImageError> {
    let name = reference.to_string();
    let wanted = platform.cloned().unwrap_or_else(Platform::host);
    let mut fetched = match client
        .manifest(
            reference,
            &reference.manifest_ref(),
            media_type::ALL_MANIFESTS,
        )
        .await
    {
        Ok(fetched) => fetched,
        Err(e) if e.is_not_found() => return Err(explain_not_found(client, reference, e).await),
        Err(e) => return Err(e.into()),
    };
    let mut kind = classify(&name, &fetched)?;
    let mut index_digest = None;
    let mut platforms = Vec::new();
    let mut chosen_platform = None;
    for _depth in 0..MAX_INDEX_DEPTH {
        if kind != Kind::Index {
            break;
        }
        let invalid = |reason| invalid(&name, format!("index {}", fetched.digest), reason);
        let entries = manifest::parse_index(&fetched.bytes).map_err(invalid)?;
        index_digest.get_or_insert(fetched.digest);
        if platforms.is_empty() {
            platforms = entries
                .iter()
                .filter_map(|e| e.platform.clone().map(|p| (p, e.digest)))
                .collect();
        }
        let entry = pick(&name, &wanted, &entries)?;
        chosen_platform = entry.platform.clone();
        fetched = fetch_entry(client, reference, entry).await?;
        kind = classify(&name, &fetched)?;
    }
    if kind != Kind::Manifest {
        let reason = "an index nested deeper than imgfs follows".to_string();
        return Err(invalid(
            &name,
            format!("manifest {}", fetched.digest),
            reason,
        ));
    }
    let parsed = manifest::parse_manifest(&fetched.bytes)
        .map_err(|reason| invalid(&name, format!("manifest {}", fetched.digest), reason))?;
    Ok(ResolvedManifest {
        reference: reference.clone(),
        index_digest,
        manifest_digest: fetched.digest,
        manifest_media_type: manifest_media_type(&fetched),
        platforms,
        chosen_platform,
        requested: platform.cloned(),
        layers: parsed.layers,
        config: parsed.config,
    })
}

impl ResolvedManifest {
    /// The config blob, verified against its digest.
    pub async fn fetch_config(&self, client: &Client) -> Result<ImageConfig, ImageError> {
        fetch_config(client, &self.reference, &self.config).await
    }

    /// The whole image, once the config agrees with the manifest (one
    /// diff_id per layer) and with the platform asked for.
    pub fn with_config(self, config: ImageConfig) -> Result<ResolvedImage, ImageError> {
        let name = self.reference.to_string();
        if config.diff_ids.len() != self.layers.len() {
            let reason = format!(
                "the config lists {} diff_ids but the manifest has {} layers",
                config.diff_ids.len(),
                self.layers.len()
            );
            return Err(invalid(&name, format!("config {}", config.digest), reason));
        }
        let platform = match self.chosen_platform {
            Some(p) => p,
            None => {
                let actual = config.platform();
                check_single_platform(&name, self.requested.as_ref(), &actual)?;
                actual
            }
        };
        Ok(ResolvedImage {
            reference: self.reference,
            index_digest: self.index_digest,
            manifest_digest: self.manifest_digest,
            manifest_media_type: self.manifest_media_type,
            platforms: self.platforms,
            platform,
            layers: self.layers,
            config,
        })
    }
}

fn invalid(reference: &str, what: String, reason: String) -> ImageError {
    ImageError::Invalid {
        reference: reference.to_string(),
        what,
        reason,
    }
}

fn classify(name: &str, fetched: &FetchedManifest) -> Result<Kind, ImageError> {
    match manifest::classify(&fetched.media_type, &fetched.bytes) {
        Ok(Kind::Schema1) => Err(ImageError::Schema1 {
            reference: name.to_string(),
        }),
        Ok(kind) => Ok(kind),
        Err(reason) => Err(invalid(
            name,
            format!("manifest {}", fetched.digest),
            reason,
        )),
    }
}

/// The media type the document declares, else the one the registry sent.
fn manifest_media_type(fetched: &FetchedManifest) -> String {
    #[derive(serde::Deserialize)]
    struct Declared {
        #[serde(default, rename = "mediaType")]
        media_type: String,
    }
    serde_json::from_slice::<Declared>(&fetched.bytes)
        .ok()
        .map(|d| d.media_type)
        .filter(|t| !t.is_empty())
        .unwrap_or_else(|| fetched.media_type.clone())
}

fn pick<'a>(
    name: &str,
    wanted: &Platform,
    entries: &'a [IndexEntry],
) -> Result<&'a IndexEntry, ImageError> {
    let candidates: Vec<(Platform, &IndexEntry)> = entries
        .iter()
        .filter_map(|e| e.platform.clone().map(|p| (p, e)))
        .collect();
    match platform::choose(wanted, &candidates) {
        Some((_, entry)) => Ok(entry),
        None => {
            let available: Vec<String> = candidates.iter().map(|(p, _)| p.to_string()).collect();
            Err(ImageError::NoMatchingPlatform {
                reference: name.to_string(),
                wanted: wanted.to_string(),
                available: if available.is_empty() {
                    "none".to_string()
                } else {
                    available.join(", ")
                },
            })
        }
    }
}

/// Fetches an index entry by digest (the registry client verifies it) and
/// checks the size the index promised.
async fn fetch_entry(
    client: &Client,
    reference: &Reference,
    entry: &IndexEntry,
) -> Result<FetchedManifest, ImageError> {
    let fetched = client
        .manifest(
            reference,
            &entry.digest.to_string(),
            media_type::ALL_MANIFESTS,
        )
        .await?;
    if fetched.bytes.len() as u64 != entry.size {
        let reason = format!(
            "the index says {} bytes, the registry sent {}",
            entry.size,
            fetched.bytes.len()
        );
        return Err(invalid(
            &reference.to_string(),
            format!("manifest {}", entry.digest),
            reason,
        ));
    }
    Ok(fetched)
}

async fn fetch_config(
    client: &Client,
    reference: &Reference,
    locator: &crate::registry::BlobLocator,
) -> Result<ImageConfig, ImageError> {
    let name = reference.to_string();
    let what = format!("config {}", locator.digest);
    if locator.size > CONFIG_MAX_BYTES {
        let reason = format!(
            "{} bytes is over the {CONFIG_MAX_BYTES}-byte limit for a config",
            locator.size
        );
        return Err(invalid(&name, what, reason));
    }
    let raw = client
        .blob_range(reference, locator, 0, locator.size)
        .await?;
    let actual = Digest::of(&raw);
    if actual != locator.digest {
        return Err(ImageError::ConfigDigestMismatch {
            reference: name,
            expected: locator.digest,
            actual,
        });
    }
    manifest::parse_config(locator.digest, raw).map_err(|reason| invalid(&name, what, reason))
}

/// A single-platform image is taken as is, unless a platform was asked for
/// explicitly and this is not it.
fn check_single_platform(
    name: &str,
    requested: Option<&Platform>,
    actual: &Platform,
) -> Result<(), ImageError> {
    let Some(requested) = requested else {
        return Ok(());
    };
    let candidates = [(actual.clone(), ())];
    if platform::choose(requested, &candidates).is_some() {
        return Ok(());
    }
    Err(ImageError::PlatformMismatch {
        reference: name.to_string(),
        wanted: requested.to_string(),
        actual: actual.normalized().to_string(),
    })
}

/// Most tags named in a "no such tag" error.
const TAGS_SHOWN: usize = 10;

/// A 404 for the image's manifest, with what the registry does hold: the
/// repository's tags, or that there is no such repository. The registry's
/// own error stands when the tag list cannot be had (denied, offline).
async fn explain_not_found(client: &Client, reference: &Reference, e: RegistryError) -> ImageError {
    let repository = format!("{}/{}", reference.registry, reference.repository);
    let hint = match client.tags(reference).await {
        Ok(None) => format!("no repository {repository}: check the name"),
        Ok(Some(tags)) if tags.is_empty() => format!("{repository} has no tags"),
        Ok(Some(tags)) => {
            let mut shown = tags
                .iter()
                .take(TAGS_SHOWN)
                .cloned()
                .collect::<Vec<_>>()
                .join(", ");
            if tags.len() > TAGS_SHOWN {
                shown += &format!(", … ({} in all)", tags.len());
            }
            let missing = match (&reference.digest, &reference.tag) {
                (Some(digest), _) => format!("no manifest {digest}"),
                (None, Some(tag)) => format!("no tag {tag}"),
                (None, None) => "no such manifest".to_string(),
            };
            format!("{missing} in {repository}; its tags: {shown}")
        }
        Err(_) => return e.into(),
    };
    ImageError::NotFound {
        reference: reference.to_string(),
        hint,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(platform: &str, n: u8) -> IndexEntry {
        let (plat, variant) = match platform.matches('/').count() {
            2 => {
                let (a, v) = platform.rsplit_once('/').unwrap_or_default();
                (a, Some(v.to_string()))
            }
            _ => (platform, None),
        };
        let (os, arch) = plat.split_once('/').unwrap_or_default();
        IndexEntry {
            media_type: media_type::OCI_MANIFEST.to_string(),
            digest: Digest::from_bytes([n; 32]),
            size: 1,
            platform: Some(Platform {
                os: os.into(),
                architecture: arch.into(),
                variant,
                os_version: None,
            }),
        }
    }

    #[test]
    fn no_match_lists_platforms_and_suggests_flag() {
        let entries = [entry("linux/amd64", 1), entry("linux/arm/v7", 2)];
        let wanted = Platform::parse("linux/s390x").unwrap();
        let e = pick("docker.io/library/x:latest", &wanted, &entries)
            .unwrap_err()
            .to_string();
        assert_eq!(
            e,
            "docker.io/library/x:latest: no image for platform linux/s390x (available: linux/amd64, linux/arm/v7); choose one with --platform"
        );
        let arm = pick("x", &Platform::parse("linux/armhf").unwrap(), &entries).unwrap();
        assert_eq!(arm.digest, Digest::from_bytes([2; 32]));
    }

    #[test]
    fn schema1_is_refused_with_advice() {
        let fetched = FetchedManifest {
            bytes: bytes::Bytes::from_static(
                br#"{"schemaVersion":1,"fsLayers":[],"signatures":[]}"#,
            ),
            media_type: media_type::DOCKER_V1_SIGNED.to_string(),
            digest: Digest::from_bytes([0; 32]),
        };
        let e = classify("r.io/a:old", &fetched).unwrap_err().to_string();
        assert!(e.contains("schema 1") && e.contains("re-push"), "{e}");
    }

    #[test]
    fn single_platform_checks() {
        let amd = Platform {
            os: "linux".into(),
            architecture: "amd64".into(),
            variant: None,
            os_version: None,
        };
        assert!(check_single_platform("x", None, &amd).is_ok());
        assert!(
            check_single_platform("x", Some(&Platform::parse("linux/x86_64").unwrap()), &amd)
                .is_ok()
        );
        let e = check_single_platform("x", Some(&Platform::parse("linux/arm64").unwrap()), &amd)
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "x: the image is for linux/amd64, not the requested linux/arm64/v8"
        );
    }
}
