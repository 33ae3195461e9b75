//! Pushing to a registry (distribution spec "Pushing blobs", "Pushing
//! manifests"): an existence check, a cross-repository mount, a monolithic
//! blob upload (POST opens a session, one PUT closes it with the whole body)
//! and a manifest PUT.
//!
//! Pushes always go to the registry itself: mirrors are read-only caches.
//! Requests carry push-scoped credentials ([`Access::Push`]). A PUT that fails
//! is not resent to the same session (it may be gone or half written): the
//! whole upload restarts from the POST, after checking that the blob did not
//! land meanwhile.

use super::error::{ErrorKind, RegistryError};
use super::transport::{Access, Auth, Ctx, Inner, Request, Response, backoff, same_origin};
use super::{Client, Repo};
use crate::digest::Digest;
use crate::reference::Reference;
use bytes::Bytes;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Url};

/// The header in which registries state the digest of what they stored.
const CONTENT_DIGEST: &str = "docker-content-digest";
/// `Content-Type` of a blob upload.
const BLOB_CONTENT_TYPE: &str = "application/octet-stream";
/// A mount that succeeded; 202 means the registry opened an upload instead.
const STATUS_CREATED: u16 = 201;

/// How one upload attempt failed.
enum UploadFailure {
    /// Starting again cannot help (refused, unauthorized, bad digest).
    Final(RegistryError),
    /// The session failed (network, 5xx, session unknown): start a new one.
    Restart(RegistryError),
}

impl Client {
    /// Whether the registry has blob `digest` in `r`'s repository (`HEAD`;
    /// 404 is `false`). Never asks a mirror.
    pub async fn blob_exists(&self, r: &Reference, digest: &Digest) -> Result<bool, RegistryError> {
        let repo = self.repo(r)?;
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!("blob {}@{digest}", repo.repository),
        };
        self.inner
            .blob_exists_in(&ctx, &repo, digest, Access::Pull)
            .await
    }

    /// Uploads `bytes` as blob `digest` of `r`'s repository, unless the
    /// registry has it already. The registry checks the bytes against
    /// `digest`. Failed uploads restart (at most `max_retries` times).
    pub async fn push_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        bytes: Bytes,
    ) -> Result<(), RegistryError> {
        let repo = self.repo(r)?;
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!("pushing blob {}@{digest}", repo.repository),
        };
        let retries = self.inner.opts.max_retries;
        let mut restarts = 0u32;
        loop {
            if self
                .inner
                .blob_exists_in(&ctx, &repo, digest, Access::Push)
                .await?
            {
                return Ok(());
            }
            let error = match self.inner.upload(&ctx, &repo, digest, &bytes).await {
                Ok(()) => return Ok(()),
                Err(UploadFailure::Final(error)) => return Err(error),
                Err(UploadFailure::Restart(error)) => error,
            };
            if restarts >= retries {
                return Err(if restarts == 0 {
                    error
                } else {
                    ctx.err(ErrorKind::TooManyRetries {
                        attempts: restarts + 1,
                        last: Box::new(error.kind),
                    })
                });
            }
            let delay = backoff(restarts, None);
            tracing::debug!(registry = ctx.registry, what = %ctx.what, ?delay, "restarting the upload after: {}", error.kind);
            tokio::time::sleep(delay).await;
            restarts += 1;
        }
    }

    /// Asks the registry to link blob `digest` of `from`'s repository into
    /// `r`'s without uploading it. `true` if it did (201); `false` if it
    /// declined (then push the blob), or when `from` is on another registry.
    pub async fn mount_blob(
        &self,
        r: &Reference,
        digest: &Digest,
        from: &Reference,
    ) -> Result<bool, RegistryError> {
        if from.registry != r.registry {
            return Ok(false);
        }
        let repo = self.repo(r)?;
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!(
                "mounting blob {}@{digest} from {}",
                repo.repository, from.repository
            ),
        };
        let mut url = repo.url("blobs", "uploads/")?;
        url.query_pairs_mut()
            .append_pair("mount", &digest.to_string())
            .append_pair("from", &from.repository);
        let access = Access::PushMountFrom(from.repository.clone());
        let mut request = Request::new(
            Method::POST,
            url,
            empty_body_headers(),
            push_auth(&repo, access.clone()),
            self.inner.opts.max_retries,
        );
        request.body = Some(Bytes::new());
        let response = self.inner.execute(&ctx, &request).await?;
        if response.resp.status().as_u16() == STATUS_CREATED {
            check_content_digest(&ctx, response.resp.headers(), digest)?;
            return Ok(true);
        }
        // It opened an upload session instead; nobody will use it.
        if let Ok(location) = upload_location(&ctx, &response) {
            self.inner
                .cancel_upload(&ctx, &repo, location, access)
                .await;
        }
        Ok(false)
    }

    /// Stores manifest `bytes` of type `media_type` in `r`'s repository under
    /// `r`'s digest if it has one, else its tag. Returns the manifest's
    /// digest (sha256 of `bytes`), checked against the one the registry
    /// reports.
    pub async fn push_manifest(
        &self,
        r: &Reference,
        media_type: &str,
        bytes: Bytes,
    ) -> Result<Digest, RegistryError> {
        let repo = self.repo(r)?;
        let reference = r.manifest_ref();
        let separator = if r.digest.is_some() { "@" } else { ":" };
        let ctx = Ctx {
            registry: &repo.registry,
            what: format!("pushing manifest {}{separator}{reference}", repo.repository),
        };
        let digest = Digest::of(&bytes);
        let mut headers = HeaderMap::new();
        let content_type = HeaderValue::from_str(media_type).map_err(|_| {
            ctx.err(ErrorKind::Setup(format!(
                "invalid media type {media_type:?}"
            )))
        })?;
        headers.insert(header::CONTENT_TYPE, content_type);
        let url = repo.url("manifests", &reference)?;
        // A manifest PUT is idempotent: plain retries are fine.
        let mut request = Request::new(
            Method::PUT,
            url,
            headers,
            push_auth(&repo, Access::Push),
            self.inner.opts.max_retries,
        );
        request.body = Some(bytes);
        let response = self.inner.execute(&ctx, &request).await?;
        check_content_digest(&ctx, response.resp.headers(), &digest)?;
        Ok(digest)
    }
}

/// Headers of a body-less POST: some proxies refuse one without a length
/// (411), and the HTTP client leaves an empty body's length out.
fn empty_body_headers() -> HeaderMap {
    let mut headers = HeaderMap::new();
    headers.insert(header::CONTENT_LENGTH, HeaderValue::from_static("0"));
    headers
}

fn push_auth(repo: &Repo, access: Access) -> Auth {
    Auth::Registry {
        repository: repo.repository.clone(),
        access,
    }
}

impl Inner {
    async fn blob_exists_in(
        &self,
        ctx: &Ctx<'_>,
        repo: &Repo,
        digest: &Digest,
        access: Access,
    ) -> Result<bool, RegistryError> {
        let url = repo.url("blobs", &digest.to_string())?;
        let auth = push_auth(repo, access);
        let request = Request::new(
            Method::HEAD,
            url,
            HeaderMap::new(),
            auth,
            self.opts.max_retries,
        );
        match self.execute(ctx, &request).await {
            Ok(_) => Ok(true),
            Err(e) if e.is_not_found() => Ok(false),
            Err(e) => Err(e),
        }
    }

    /// One monolithic upload: POST to open a session, PUT the bytes to it.
    async fn upload(
        &self,
        ctx: &Ctx<'_>,
        repo: &Repo,
        digest: &Digest,
        bytes: &Bytes,
    ) -> Result<(), UploadFailure> {
        let start = repo
            .url("blobs", "uploads/")
            .map_err(UploadFailure::Final)?;
        let mut open = Request::new(
            Method::POST,
            start,
            empty_body_headers(),
            push_auth(repo, Access::Push),
            self.opts.max_retries,
        );
        open.body = Some(Bytes::new());
        // Opening was retried already; what is left is for the caller.
        let opened = self
            .execute(ctx, &open)
            .await
            .map_err(UploadFailure::Final)?;
        let mut location = upload_location(ctx, &opened).map_err(UploadFailure::Final)?;
        location
            .query_pairs_mut()
            .append_pair("digest", &digest.to_string());
        let mut headers = HeaderMap::new();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static(BLOB_CONTENT_TYPE),
        );
        let auth = session_auth(repo, &location, Access::Push);
        // No retries of the PUT itself: a failed session restarts whole.
        let mut put = Request::new(Method::PUT, location, headers, auth, 0);
        put.body = Some(bytes.clone());
        let done = self.execute(ctx, &put).await.map_err(|e| {
            if e.is_transient() || e.is_not_found() {
                UploadFailure::Restart(e)
            } else {
                UploadFailure::Final(e)
            }
        })?;
        check_content_digest(ctx, done.resp.headers(), digest).map_err(UploadFailure::Final)
    }

    /// Best effort: a leftover session is only clutter the registry expires.
    async fn cancel_upload(&self, ctx: &Ctx<'_>, repo: &Repo, location: Url, access: Access) {
        let auth = session_auth(repo, &location, access);
        let request = Request::new(Method::DELETE, location, HeaderMap::new(), auth, 0);
        if let Err(e) = self.execute(ctx, &request).await {
            tracing::debug!("cancelling an unused upload session: {e}");
        }
    }
}

/// Registry credentials go only to the registry's own origin; an upload
/// session elsewhere (a storage service) gets none.
fn session_auth(repo: &Repo, location: &Url, access: Access) -> Auth {
    if same_origin(location, &repo.base) {
        push_auth(repo, access)
    } else {
        Auth::None
    }
}

/// The upload session URL: `Location`, absolute or relative to the request.
fn upload_location(ctx: &Ctx<'_>, response: &Response) -> Result<Url, RegistryError> {
    let status = response.resp.status();
    let location = response
        .resp
        .headers()
        .get(header::LOCATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ctx.err(ErrorKind::Protocol(format!(
                "{status} to an upload request without a Location header"
            )))
        })?;
    response
        .final_url
        .join(location)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
        .ok_or_else(|| {
            ctx.err(ErrorKind::Protocol(format!(
                "unusable upload Location {location:?}"
            )))
        })
}

/// A `Docker-Content-Digest` that is not `expected` means the registry
/// stored something else. Other algorithms than sha256 cannot be compared.
fn check_content_digest(
    ctx: &Ctx<'_>,
    headers: &HeaderMap,
    expected: &Digest,
) -> Result<(), RegistryError> {
    let Some(value) = headers.get(CONTENT_DIGEST) else {
        return Ok(());
    };
    let text = value.to_str().unwrap_or_default().trim();
    if !text.starts_with("sha256:") {
        return Ok(());
    }
    match text.parse::<Digest>() {
        Ok(stated) if stated == *expected => Ok(()),
        _ => Err(ctx.err(ErrorKind::Protocol(format!(
            "the registry reports storing {text:?}, not {expected}"
        )))),
    }
}
