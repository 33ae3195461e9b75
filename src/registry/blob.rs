//! Where blob bytes come from, in order: a foreign layer's own URLs (plain
//! GETs, no registry credentials), a recently seen CDN redirect target for
//! this blob (signed URLs expire, so only for [`REDIRECT_REUSE`]), and the
//! registry's `/v2/NAME/blobs/DIGEST`.

use super::error::{ErrorKind, RegistryError};
use super::range::{BodyPlan, plan_body, range_header};
use super::transport::{Auth, Ctx, Inner, Request, backoff, describe, host_of};
use super::{BlobLocator, Repo};
use bytes::{Bytes, BytesMut};
use reqwest::Url;
use reqwest::header::{self, HeaderMap};
use std::time::{Duration, Instant};

/// How long a redirect target (usually a signed URL) is reused.
const REDIRECT_REUSE: Duration = Duration::from_secs(50);

/// One place a blob can be read from.
#[derive(Debug, Clone)]
pub enum Source {
    Registry,
    Foreign(Url),
}

impl Source {
    /// The foreign URLs that parse (http/https), then the registry; only
    /// the registry when `repo` is a mirror (the foreign URLs are tried
    /// when the upstream's turn comes).
    pub fn all(repo: &Repo, blob: &BlobLocator) -> Vec<Source> {
        if repo.mirror {
            return vec![Source::Registry];
        }
        let foreign = blob
            .urls
            .iter()
            .filter_map(|u| Url::parse(u).ok())
            .filter(|u| matches!(u.scheme(), "http" | "https"));
        foreign
            .map(Source::Foreign)
            .chain(std::iter::once(Source::Registry))
            .collect()
    }

    pub fn describe(&self) -> String {
        match self {
            Source::Registry => String::new(),
            Source::Foreign(url) => format!(" from foreign URL on {}", host_of(url)),
        }
    }
}

/// Names a blob request in errors: `blob team/app@sha256:… bytes 0-99`.
pub fn what(repo: &Repo, blob: &BlobLocator, span: Option<(u64, u64)>, source: &Source) -> String {
    let range = match span {
        Some((start, end)) => format!(" bytes {start}-{}", end.saturating_sub(1)),
        None => String::new(),
    };
    format!(
        "blob {}@{}{range}{}",
        repo.repository,
        blob.digest,
        source.describe()
    )
}

fn redirect_key(repo: &Repo, blob: &BlobLocator) -> String {
    format!("{}/{}@{}", repo.registry, repo.repository, blob.digest)
}

impl Inner {
    /// Requests `[start, end)` of the blob from `source` (no Range header when
    /// that is the whole blob) and checks the answer against the span.
    pub async fn open_blob(
        &self,
        ctx: &Ctx<'_>,
        repo: &Repo,
        blob: &BlobLocator,
        source: &Source,
        start: u64,
        end: u64,
    ) -> Result<(reqwest::Response, BodyPlan), RegistryError> {
        let mut headers = HeaderMap::new();
        if !(start == 0 && end == blob.size) {
            headers.insert(header::RANGE, range_header(start, end));
        }
        let check = |resp: reqwest::Response| {
            let status = resp.status().as_u16();
            match plan_body(status, resp.headers(), start, end, blob.size) {
                Ok(plan) => Ok((resp, plan)),
                Err(reason) => Err(ctx.err(ErrorKind::Protocol(reason))),
            }
        };
        let retries = repo.retries(&self.opts);
        let registry_url = match source {
            Source::Foreign(url) => {
                let request = Request::get(url.clone(), headers, Auth::None, retries);
                return check(self.execute(ctx, &request).await?.resp);
            }
            Source::Registry => repo.url("blobs", &blob.digest.to_string())?,
        };
        let key = redirect_key(repo, blob);
        if let Some(cached) = self.cached_redirect(&key) {
            // One try only: on any failure the registry hands out a fresh URL.
            let request = Request::get(cached, headers.clone(), Auth::None, 0);
            match self
                .execute(ctx, &request)
                .await
                .and_then(|r| check(r.resp))
            {
                Ok(opened) => return Ok(opened),
                Err(e) => {
                    tracing::debug!(
                        "cached redirect for {key} failed, asking the registry again: {e}"
                    );
                    self.forget_redirect(&key);
                }
            }
        }
        let auth = Auth::pull(&repo.repository);
        let request = Request::get(registry_url.clone(), headers, auth, retries);
        let response = self.execute(ctx, &request).await?;
        if host_of(&response.final_url) != host_of(&registry_url)
            || response.final_url.scheme() != registry_url.scheme()
        {
            self.remember_redirect(key, response.final_url.clone());
        }
        check(response.resp)
    }

    fn cached_redirect(&self, key: &str) -> Option<Url> {
        let map = self.redirects.lock().unwrap_or_else(|p| p.into_inner());
        map.get(key)
            .filter(|(_, at)| at.elapsed() < REDIRECT_REUSE)
            .map(|(url, _)| url.clone())
    }

    fn remember_redirect(&self, key: String, url: Url) {
        let mut map = self.redirects.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, (_, at)| at.elapsed() < REDIRECT_REUSE);
        map.insert(key, (url, Instant::now()));
    }

    fn forget_redirect(&self, key: &str) {
        self.redirects
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }

    /// Exactly `[start, end)`: foreign URLs first, then the registry; a body
    /// cut short is re-requested (bounded, with backoff).
    pub async fn blob_range(
        &self,
        repo: &Repo,
        blob: &BlobLocator,
        start: u64,
        end: u64,
    ) -> Result<Bytes, RegistryError> {
        if start > end || end > blob.size {
            let ctx = Ctx {
                registry: &repo.registry,
                what: what(repo, blob, Some((start, end)), &Source::Registry),
            };
            let reason = format!("invalid span [{start}, {end}) of a {}-byte blob", blob.size);
            return Err(ctx.err(ErrorKind::Protocol(reason)));
        }
        if start == end {
            return Ok(Bytes::new());
        }
        let sources = Source::all(repo, blob);
        let mut last_error = None;
        for source in &sources {
            let ctx = Ctx {
                registry: &repo.registry,
                what: what(repo, blob, Some((start, end)), source),
            };
            match self.range_from(&ctx, repo, blob, source, start, end).await {
                Ok(bytes) => return Ok(bytes),
                Err(e) if matches!(source, Source::Foreign(_)) => {
                    tracing::warn!("{e}; trying the next source");
                    last_error = Some(e);
                }
                Err(e) => return Err(e),
            }
        }
        Err(last_error.unwrap_or_else(|| {
            RegistryError::new(
                &repo.registry,
                what(repo, blob, None, &Source::Registry),
                ErrorKind::Protocol("no source".into()),
            )
        }))
    }

    async fn range_from(
        &self,
        ctx: &Ctx<'_>,
        repo: &Repo,
        blob: &BlobLocator,
        source: &Source,
        start: u64,
        end: u64,
    ) -> Result<Bytes, RegistryError> {
        let mut drops = 0u32;
        loop {
            let (resp, plan) = self.open_blob(ctx, repo, blob, source, start, end).await?;
            match self.read_span(resp, plan, end - start).await {
                Ok(bytes) => return Ok(bytes),
                Err(Cut::Protocol(reason)) => return Err(ctx.err(ErrorKind::Protocol(reason))),
                Err(Cut::Network(reason)) if drops < self.opts.max_retries => {
                    tracing::debug!("{}: {}: {reason}; retrying", ctx.registry, ctx.what);
                    tokio::time::sleep(backoff(drops, None)).await;
                    drops += 1;
                }
                Err(Cut::Network(reason)) => {
                    let last = Box::new(ErrorKind::Network(reason));
                    return Err(ctx.err(ErrorKind::TooManyRetries {
                        attempts: drops + 1,
                        last,
                    }));
                }
            }
        }
    }

    /// Reads `len` bytes after skipping `plan.skip`; a 206 body must end there.
    async fn read_span(
        &self,
        mut resp: reqwest::Response,
        plan: BodyPlan,
        len: u64,
    ) -> Result<Bytes, Cut> {
        let mut skip = plan.skip;
        let want = usize::try_from(len)
            .map_err(|_| Cut::Protocol(format!("span of {len} bytes is too large")))?;
        let mut out = BytesMut::with_capacity(want);
        while out.len() < want {
            let mut chunk = self.next_chunk(&mut resp).await?.ok_or_else(|| {
                Cut::Network(format!(
                    "the body ended after {} of {want} bytes",
                    out.len()
                ))
            })?;
            if skip > 0 {
                let n = usize::try_from(skip).unwrap_or(usize::MAX).min(chunk.len());
                let _ = chunk.split_to(n);
                skip -= n as u64;
            }
            let room = want - out.len();
            if chunk.len() > room && plan.exact {
                return Err(Cut::Protocol(format!(
                    "sent more than the {want} bytes asked for"
                )));
            }
            out.extend_from_slice(&chunk[..chunk.len().min(room)]);
        }
        if plan.exact
            && self
                .next_chunk(&mut resp)
                .await
                .is_ok_and(|c| c.is_some_and(|c| !c.is_empty()))
        {
            return Err(Cut::Protocol(format!(
                "sent more than the {want} bytes asked for"
            )));
        }
        Ok(out.freeze())
    }

    /// The next body chunk under the read timeout.
    pub async fn next_chunk(&self, resp: &mut reqwest::Response) -> Result<Option<Bytes>, Cut> {
        match tokio::time::timeout(self.opts.read_timeout, resp.chunk()).await {
            Ok(Ok(chunk)) => Ok(chunk),
            Ok(Err(e)) => Err(Cut::Network(describe(&e))),
            Err(_) => Err(Cut::Network(format!(
                "no data for {:?}",
                self.opts.read_timeout
            ))),
        }
    }
}

/// Why a body read stopped early.
#[derive(Debug)]
pub enum Cut {
    /// Worth re-requesting (dropped connection, stall, short body).
    Network(String),
    Protocol(String),
}
