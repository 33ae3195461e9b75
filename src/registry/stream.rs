//! A whole blob as one continuous stream of chunks that survives dropped
//! connections: when a body stops early, the rest is re-requested with
//! `Range: bytes=POS-` from the same source, and a server that ignores the
//! range is skipped forward while streaming. The consumer sees exactly
//! `size` bytes, or an error as the last item.

use super::blob::{Cut, Source, what};
use super::error::{ErrorKind, RegistryError};
use super::transport::{Ctx, Inner, backoff};
use super::{BlobLocator, Repo};
use bytes::Bytes;
use futures_util::Stream;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

/// Progress that earns a stream its resume budget back: a long download on a
/// flaky link may drop many times, as long as each connection gets somewhere.
const RESUME_BUDGET_RESET_BYTES: u64 = 8 * 1024 * 1024;

/// The chunks of one blob; `Send + Unpin`, ends after exactly `size()` bytes
/// or after yielding an error.
pub struct BlobStream {
    inner: Pin<Box<dyn Stream<Item = Result<Bytes, RegistryError>> + Send>>,
    size: u64,
}

impl BlobStream {
    pub fn size(&self) -> u64 {
        self.size
    }
}

impl Stream for BlobStream {
    type Item = Result<Bytes, RegistryError>;
    fn poll_next(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Self::Item>> {
        self.inner.as_mut().poll_next(cx)
    }
}

struct Reader {
    inner: Arc<Inner>,
    repo: Repo,
    blob: BlobLocator,
    source: Source,
    resp: Option<reqwest::Response>,
    /// Bytes of the current body still to discard (range ignored on resume).
    skip: u64,
    /// Bytes delivered to the consumer so far.
    pos: u64,
    resumes: u32,
    progress_since_resume: u64,
    finished: bool,
}

/// Opens the blob (foreign URLs first, then the registry) and returns the
/// stream; errors of the first request are returned here, not in the stream.
pub async fn open(
    inner: Arc<Inner>,
    repo: Repo,
    blob: BlobLocator,
) -> Result<BlobStream, RegistryError> {
    let size = blob.size;
    let mut opened = None;
    if size > 0 {
        let mut last_error = None;
        for source in Source::all(&repo, &blob) {
            let ctx = Ctx {
                registry: &repo.registry,
                what: what(&repo, &blob, None, &source),
            };
            match inner.open_blob(&ctx, &repo, &blob, &source, 0, size).await {
                Ok((resp, plan)) => {
                    opened = Some((source, resp, plan.skip));
                    break;
                }
                Err(e) => {
                    if matches!(source, Source::Registry) {
                        return Err(e);
                    }
                    tracing::warn!("{e}; trying the next source");
                    last_error = Some(e);
                }
            }
        }
        if opened.is_none() {
            if let Some(e) = last_error {
                return Err(e);
            }
        }
    }
    let (source, resp, skip) = match opened {
        Some((source, resp, skip)) => (source, Some(resp), skip),
        None => (Source::Registry, None, 0),
    };
    let reader = Reader {
        inner,
        repo,
        blob,
        source,
        resp,
        skip,
        pos: 0,
        resumes: 0,
        progress_since_resume: 0,
        finished: size == 0,
    };
    let stream = futures_util::stream::unfold(reader, |mut reader| async move {
        let item = reader.next().await?;
        Some((item, reader))
    });
    Ok(BlobStream {
        inner: Box::pin(stream),
        size,
    })
}

impl Reader {
    fn ctx(&self) -> Ctx<'_> {
        Ctx {
            registry: &self.repo.registry,
            what: what(&self.repo, &self.blob, None, &self.source),
        }
    }

    fn fail(&mut self, kind: ErrorKind) -> Option<Result<Bytes, RegistryError>> {
        self.finished = true;
        self.resp = None;
        Some(Err(self.ctx().err(kind)))
    }

    async fn next(&mut self) -> Option<Result<Bytes, RegistryError>> {
        let size = self.blob.size;
        loop {
            if self.finished || self.pos == size {
                self.finished = true;
                self.resp = None;
                return None;
            }
            let Some(resp) = self.resp.as_mut() else {
                if let Err(e) = self.reopen().await {
                    self.finished = true;
                    return Some(Err(e));
                }
                continue;
            };
            let reason = match self.inner.next_chunk(resp).await {
                Ok(Some(mut chunk)) => {
                    if self.skip > 0 {
                        let n = usize::try_from(self.skip)
                            .unwrap_or(usize::MAX)
                            .min(chunk.len());
                        let _ = chunk.split_to(n);
                        self.skip -= n as u64;
                    }
                    if chunk.is_empty() {
                        continue;
                    }
                    let len = chunk.len() as u64;
                    if len > size - self.pos {
                        let reason = format!("sent more than the blob's {size} bytes");
                        return self.fail(ErrorKind::Protocol(reason));
                    }
                    self.pos += len;
                    self.progress_since_resume += len;
                    return Some(Ok(chunk));
                }
                Ok(None) => format!("the connection closed after {} of {size} bytes", self.pos),
                Err(Cut::Network(reason) | Cut::Protocol(reason)) => reason,
            };
            self.resp = None;
            if self.progress_since_resume >= RESUME_BUDGET_RESET_BYTES {
                self.resumes = 0;
            }
            self.progress_since_resume = 0;
            if self.resumes >= self.inner.opts.max_retries {
                let attempts = self.resumes + 1;
                let last = Box::new(ErrorKind::Network(reason));
                return self.fail(ErrorKind::TooManyRetries { attempts, last });
            }
            tracing::debug!(
                "{}: {}: {reason}; resuming at byte {}",
                self.repo.registry,
                self.ctx().what,
                self.pos
            );
            tokio::time::sleep(backoff(self.resumes, None)).await;
            self.resumes += 1;
        }
    }

    /// Requests the rest of the blob from the current source.
    async fn reopen(&mut self) -> Result<(), RegistryError> {
        let ctx = self.ctx();
        let (resp, plan) = self
            .inner
            .open_blob(
                &ctx,
                &self.repo,
                &self.blob,
                &self.source,
                self.pos,
                self.blob.size,
            )
            .await?;
        self.resp = Some(resp);
        self.skip = plan.skip;
        Ok(())
    }
}
