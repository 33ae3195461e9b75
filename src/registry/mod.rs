//! The registry client: manifests and blobs over the OCI distribution API.
//!
//! It knows HTTP, auth, credentials, redirects, Range and retries — nothing
//! about what the bytes mean. Submodules, one concern each:
//! - [`transport`]: one request with redirects, timeouts, retries, auth header;
//! - [`auth`]: `WWW-Authenticate` challenges, tokens and their cache;
//! - [`credentials`]: docker `config.json` and credential helpers;
//! - [`range`]: Range headers and the checks on partial responses;
//! - [`blob`]: blob sources (foreign URLs, cached CDN redirects, the registry);
//! - [`stream`]: the resumable whole-blob stream;
//! - [`mirror`]: mirror endpoints tried before the registry, and when to skip one;
//! - [`push`]: blob uploads, cross-repository mounts and manifest pushes
//!   (to the registry only, never a mirror).
//!
//! Blob bytes are *not* verified here (the layer indexer hashes them while it
//! reads); manifests are, because they are small and read whole.

mod auth;
mod blob;
mod credentials;
mod error;
mod mirror;
mod push;
mod range;
#[cfg(test)]
mod server_tests;
mod stream;
mod transport;

pub use error::{ErrorDetail, ErrorKind, RegistryError, Status};
pub use stream::BlobStream;

use crate::digest::Digest;
use crate::reference::{Reference, split_host_port};
use bytes::Bytes;
use reqwest::Url;
use reqwest::header::{self, HeaderMap, HeaderValue};
use serde::Serialize;
use std::collections::HashMap;
use std::future::Future;
use std::net::{IpAddr, Ipv6Addr};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use transport::{Auth, Ctx, Inner, Request};

/// Manifest media types, as sent in `Accept` and found in `Content-Type`.
pub mod media_type {
    pub const OCI_INDEX: &str = "application/vnd.oci.image.index.v1+json";
    pub const OCI_MANIFEST: &str = "application/vnd.oci.image.manifest.v1+json";
    pub const DOCKER_LIST: &str = "application/vnd.docker.distribution.manifest.list.v2+json";
    pub const DOCKER_V2: &str = "application/vnd.docker.distribution.manifest.v2+json";
    /// Schema 1 (Docker < 1.10): asked for only so it can be recognized and refused.
    pub const DOCKER_V1_SIGNED: &str = "application/vnd.docker.distribution.manifest.v1+prettyjws";
    pub const DOCKER_V1: &str = "application/vnd.docker.distribution.manifest.v1+json";
    /// Everything [`super::Client::manifest`] asks for when given no list.
    pub const ALL_MANIFESTS: &[&str] = &[
        OCI_INDEX,
        OCI_MANIFEST,
        DOCKER_LIST,
        DOCKER_V2,
        DOCKER_V1_SIGNED,
        DOCKER_V1,
    ];
}

/// The distribution spec's recommended manifest size limit; larger is refused.
pub const MANIFEST_MAX_BYTES: usize = 4 * 1024 * 1024;
/// Environment variable adding registries to talk to over plain HTTP (comma separated).
pub const INSECURE_ENV: &str = "IMGFS_INSECURE_REGISTRIES";

const DEFAULT_MAX_RETRIES: u32 = 4;
const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(15);
const DEFAULT_READ_TIMEOUT: Duration = Duration::from_secs(30);
pub(crate) const TCP_KEEPALIVE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub struct ClientOptions {
    /// `host[:port]` (or bare `host`, any port) reached over plain HTTP.
    /// Loopback registries always are.
    pub insecure_registries: Vec<String>,
    /// Where `config.json` lives; `$DOCKER_CONFIG` or `~/.docker` when `None`.
    pub docker_config_dir: Option<PathBuf>,
    pub user_agent: String,
    /// Retries after the first attempt of a request (and resumes of a stream).
    pub max_retries: u32,
    pub connect_timeout: Duration,
    /// Longest wait for the response head and for each body chunk.
    pub read_timeout: Duration,
    /// Registry (as references name it: `docker.io`, `host:5000`) → mirror
    /// endpoints tried in order before it, for manifests and blobs.
    pub mirrors: HashMap<String, Vec<Url>>,
}

impl Default for ClientOptions {
    fn default() -> Self {
        ClientOptions {
            insecure_registries: Vec::new(),
            docker_config_dir: None,
            user_agent: format!("imgfs/{}", env!("CARGO_PKG_VERSION")),
            max_retries: DEFAULT_MAX_RETRIES,
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            read_timeout: DEFAULT_READ_TIMEOUT,
            mirrors: HashMap::new(),
        }
    }
}

/// Everything needed to fetch one blob.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct BlobLocator {
    pub digest: Digest,
    pub size: u64,
    /// Foreign-layer URLs, tried before the registry.
    pub urls: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct FetchedManifest {
    pub bytes: Bytes,
    /// `Content-Type` without parameters; empty when the registry sent none.
    pub media_type: String,
    /// sha256 of `bytes` (checked against the requested digest when there was one).
    pub digest: Digest,
}

/// A registry client; cheap to clone, shared by every request of a mount.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

/// A repository on a registry, as requests need it.
#[derive(Debug, Clone)]
pub(crate) struct Repo {
    pub registry: String,
    pub repository: String,
    /// `scheme://api_host/v2/`.
    pub base: Url,
    /// A mirror of the registry: `registry` is then the mirror's `host[:port]`.
    pub mirror: bool,
}

impl Repo {
    /// Retries of one request here: a failing mirror is better retried at
    /// the next source.
    fn retries(&self, opts: &ClientOptions) -> u32 {
        if self.mirror {
            mirror::MIRROR_RETRIES
        } else {
            opts.max_retries
        }
    }

    fn url(&self, kind: &str, reference: &str) -> Result<Url, RegistryError> {
        self.base
            .join(&format!("{}/{kind}/{reference}", self.repository))
            .map_err(|e| {
                RegistryError::new(
                    &self.registry,
                    format!("{kind} {reference}"),
                    ErrorKind::Setup(e.to_string()),
                )
            })
    }
}

impl Client {
    pub fn new(opts: ClientOptions) -> Result<Client, RegistryError> {
        let plain = transport::http_client(&opts, transport::Roots::None)?;
        let mut insecure = opts.insecure_registries.clone();
        if let Ok(extra) = std::env::var(INSECURE_ENV) {
            insecure.extend(
                extra
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from),
            );
        }
        let config_path = credentials::config_path(opts.docker_config_dir.as_deref());
        let inner = Inner {
            plain,
            tls: Default::default(),
            opts,
            insecure,
            config_path,
            auth: auth::AuthCache::default(),
            redirects: Mutex::new(Default::default()),
            dead_mirrors: mirror::DeadMirrors::default(),
        };
        Ok(Client {
            inner: Arc::new(inner),
        })
    }

    pub fn options(&self) -> &ClientOptions {
        &self.inner.opts
    }

    fn repo(&self, r: &Reference) -> Result<Repo, RegistryError> {
        let scheme = if use_plain_http(&r.registry, &self.inner.insecure) {
            "http"
        } else {
            "https"
        };
        let base = Url::parse(&format!("{scheme}://{}/v2/", r.api_host())).map_err(|e| {
            RegistryError::new(
                &r.registry,
                format!("repository {}", r.repository),
                ErrorKind::Setup(e.to_string()),
            )
        })?;
        Ok(Repo {
            registry: r.registry.clone(),
            repository: r.repository.clone(),
            base,
            mirror: false,
        })
    }

    /// Runs `op` against each mirror of `r`'s registry in order, then
    /// against the registry, until one answers; see [`mirror`] for which
    /// failures move on to the next source.
    async fn with_mirrors<T, F, Fut>(&self, r: &Reference, mut op: F) -> Result<T, RegistryError>
    where
        F: FnMut(Repo) -> Fut,
        Fut: Future<Output = Result<T, RegistryError>>,
    {
        let upstream = self.repo(r)?;
        for repo in mirror::mirror_repos(&self.inner.opts, &self.inner.dead_mirrors, &upstream) {
            let base = repo.base.clone();
            let error = match op(repo).await {
                Ok(value) => return Ok(value),
                Err(error) => error,
            };
            match mirror::judge(&error) {
                mirror::Verdict::Fail => return Err(error),
                mirror::Verdict::Next => {
                    tracing::info!("mirror of {}: {error}; trying the next source", r.registry);
                }
                mirror::Verdict::NextAndMarkDead => {
                    tracing::info!(
                        "mirror of {}: {error}; left out for {:?}, trying the next source",
                        r.registry,
                        mirror::DEAD_MIRROR_PAUSE
                    );
                    self.inner.dead_mirrors.mark_dead(&base);
                }
            }
        }
        op(upstream).await
    }

    /// Fetches the manifest `reference` (a tag or a digest) of `r`'s
    /// repository. `accept` lists media types (empty: [`media_type::ALL_MANIFESTS`]).
    /// When `reference` is a digest, the bytes are verified against it.
    pub async fn manifest(
        &self,
        r: &Reference,
        reference: &str,
        accept: &[&str],
    ) -> Result<FetchedManifest, RegistryError> {
        self.with_mirrors(r, |repo| {
            self.document_from(repo, "manifests", reference, accept)
        })
        .await
    }

    /// The referrers of manifest `subject` (the OCI distribution 1.1
    /// referrers API), an OCI index; `None` when the registry does not offer
    /// the API (404) — then the tag schema (`sha256-<hex>`) stands in for
    /// it. Asked of the registry itself: mirrors need not hold artifacts.
    pub async fn referrers(
        &self,
        r: &Reference,
        subject: &Digest,
    ) -> Result<Option<FetchedManifest>, RegistryError> {
        let repo = self.repo(r)?;
        let accept = [media_type::OCI_INDEX];
        match self
            .document_from(repo, "referrers", &subject.to_string(), &accept)
            .await
        {
            Ok(index) => Ok(Some(index)),
            Err(e) if e.is_not_found() => Ok(None),
            Err(e) => Err(e),
        }
    }

    /// The repository's tags (the first page of `/v2/<repo>/tags/list`);
    /// `None` when the registry does not know the repository. Asked only to
    /// explain a manifest that was not found.
    pub async fn tags(&self, r: &Reference) -> Result<Option<Vec<String>>, RegistryError> {
        #[derive(serde::Deserialize)]
        struct TagList {
            tags: Option<Vec<String>>,
        }
        let repo = self.repo(r)?;
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!("tags of {}", repo.repository),
        };
        let url = repo.url("tags", "list")?;
        let auth = Auth::pull(&repo.repository);
        let request = Request::get(url, HeaderMap::new(), auth, repo.retries(&self.inner.opts));
        let response = match self.inner.execute(&ctx, &request).await {
            Ok(response) => response,
            Err(e) if e.is_not_found() => return Ok(None),
            Err(e) => return Err(e),
        };
        let bytes = self
            .inner
            .read_all(&ctx, response.resp, MANIFEST_MAX_BYTES)
            .await?;
        let list: TagList = serde_json::from_slice(&bytes)
            .map_err(|e| ctx.err(ErrorKind::Protocol(format!("tag list: {e}"))))?;
        Ok(Some(list.tags.unwrap_or_default()))
    }

    /// GETs `/v2/<repo>/<kind>/<reference>` (a manifest, or a referrers
    /// index), verifying it when `reference` is a digest of it.
    async fn document_from(
        &self,
        repo: Repo,
        kind: &str,
        reference: &str,
        accept: &[&str],
    ) -> Result<FetchedManifest, RegistryError> {
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!(
                "{} {}{}{reference}",
                kind.trim_end_matches('s'),
                repo.repository,
                if reference.contains(':') { "@" } else { ":" }
            ),
        };
        let accept = if accept.is_empty() {
            media_type::ALL_MANIFESTS
        } else {
            accept
        };
        let mut headers = HeaderMap::new();
        let accept_value = HeaderValue::from_str(&accept.join(", "))
            .map_err(|_| ctx.err(ErrorKind::Setup(format!("invalid Accept list {accept:?}"))))?;
        headers.insert(header::ACCEPT, accept_value);
        let url = repo.url(kind, reference)?;
        let auth = Auth::pull(&repo.repository);
        let retries = repo.retries(&self.inner.opts);
        let request = Request::get(url, headers, auth, retries);
        let response = self.inner.execute(&ctx, &request).await?;
        let media_type = response
            .resp
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(';').next().unwrap_or_default().trim().to_string())
            .unwrap_or_default();
        let bytes = self
            .inner
            .read_all(&ctx, response.resp, MANIFEST_MAX_BYTES)
            .await?;
        let actual = Digest::of(&bytes);
        // A referrers index changes as artifacts are added: not addressed by content.
        let addressed = kind == "manifests";
        match reference.parse::<Digest>() {
            Ok(expected) if addressed && expected != actual => {
                Err(ctx.err(ErrorKind::DigestMismatch { expected, actual }))
            }
            _ => Ok(FetchedManifest {
                bytes,
                media_type,
                digest: actual,
            }),
        }
    }

    /// The whole blob as a stream of chunks, exactly `blob.size` bytes long or
    /// ending in an error. A dropped connection is resumed with a Range
    /// request (at most `max_retries` times without progress). The bytes are
    /// not verified here: the consumer hashes them.
    pub async fn blob(
        &self,
        r: &Reference,
        blob: &BlobLocator,
    ) -> Result<BlobStream, RegistryError> {
        self.with_mirrors(r, |repo| {
            stream::open(self.inner.clone(), repo, blob.clone())
        })
        .await
    }

    /// Exactly bytes `[start, end)` of the blob (`end <= blob.size`).
    pub async fn blob_range(
        &self,
        r: &Reference,
        blob: &BlobLocator,
        start: u64,
        end: u64,
    ) -> Result<Bytes, RegistryError> {
        self.with_mirrors(r, |repo| async move {
            self.inner.blob_range(&repo, blob, start, end).await
        })
        .await
    }
}

/// Loopback registries and those listed as insecure are spoken to over plain HTTP.
fn use_plain_http(registry: &str, insecure: &[String]) -> bool {
    is_loopback(registry)
        || insecure
            .iter()
            .any(|entry| insecure_matches(entry, registry))
}

/// `localhost`, `127.0.0.0/8` or `[::1]`, with any port.
pub fn is_loopback(registry: &str) -> bool {
    let (host, _port) = split_host_port(registry);
    if host.eq_ignore_ascii_case("localhost") {
        return true;
    }
    let bare = host.strip_prefix('[').and_then(|h| h.strip_suffix(']'));
    match bare {
        Some(v6) => v6.parse::<Ipv6Addr>().is_ok_and(|ip| ip.is_loopback()),
        None => host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback()),
    }
}

/// An entry names the registry exactly, or names its host without a port
/// (then any port matches). A scheme prefix is tolerated.
fn insecure_matches(entry: &str, registry: &str) -> bool {
    let entry = entry
        .trim()
        .trim_start_matches("http://")
        .trim_start_matches("https://")
        .trim_end_matches('/');
    if entry == registry {
        return true;
    }
    let (entry_host, entry_port) = split_host_port(entry);
    entry_port.is_none() && split_host_port(registry).0 == entry_host
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn loopback_detection() {
        for yes in [
            "localhost",
            "localhost:5000",
            "LOCALHOST:1",
            "127.0.0.1",
            "127.0.0.1:5000",
            "127.255.0.9:80",
            "[::1]",
            "[::1]:5000",
        ] {
            assert!(is_loopback(yes), "{yes}");
        }
        for no in [
            "docker.io",
            "128.0.0.1:5000",
            "10.0.0.1",
            "[::2]:5000",
            "localhost.example.com",
            "[fc00::1]:5000",
            "localhostx:5000",
        ] {
            assert!(!is_loopback(no), "{no}");
        }
    }

    #[test]
    fn insecure_registry_matching() {
        let list = vec!["reg.lan:5000".to_string(), "http://other.lan".to_string()];
        assert!(use_plain_http("reg.lan:5000", &list));
        assert!(!use_plain_http("reg.lan:5001", &list));
        assert!(!use_plain_http("reg.lan", &list));
        assert!(use_plain_http("other.lan", &list));
        assert!(use_plain_http("other.lan:8080", &list));
        assert!(!use_plain_http("docker.io", &list));
        assert!(use_plain_http("127.0.0.1:5000", &[]));
    }

    #[test]
    fn urls_and_schemes() {
        let client = Client::new(ClientOptions::default()).unwrap();
        let hub = client.repo(&Reference::parse("alpine").unwrap()).unwrap();
        assert_eq!(
            hub.url("manifests", "latest").unwrap().as_str(),
            "https://registry-1.docker.io/v2/library/alpine/manifests/latest"
        );
        let local = client
            .repo(&Reference::parse("localhost:5000/a/b:t").unwrap())
            .unwrap();
        assert_eq!(
            local.url("blobs", "sha256:00").unwrap().as_str(),
            "http://localhost:5000/v2/a/b/blobs/sha256:00"
        );
        let v6 = client
            .repo(&Reference::parse("[::1]:5000/x").unwrap())
            .unwrap();
        assert_eq!(v6.base.as_str(), "http://[::1]:5000/v2/");
    }
}
