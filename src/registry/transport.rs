//! One registry HTTP request, done properly: redirects followed by hand (at
//! most [`MAX_REDIRECTS`], `Authorization` only ever sent to the origin the
//! request started at), registry auth attached and renewed on 401, bounded
//! retries with exponential backoff and jitter on network errors, 429 and
//! 5xx, and a timeout around every await so nothing can hang (an upload's
//! grows with its body, at [`UPLOAD_RATE_FLOOR`]).

use super::ClientOptions;
pub use super::auth::Access;
use super::auth::{AuthCache, Credentials};
use super::error::{ErrorDetail, ErrorKind, RegistryError, Status, is_retryable_status};
use bytes::{Bytes, BytesMut};
use rand::Rng;
use reqwest::header::{self, HeaderMap, HeaderValue};
use reqwest::{Method, Url};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// Hops followed before giving up (registry → CDN → signed URL is 2).
pub const MAX_REDIRECTS: usize = 5;
/// First retry delay; doubles per attempt.
const BACKOFF_BASE: Duration = Duration::from_millis(200);
/// Longest computed backoff between two attempts.
const BACKOFF_MAX: Duration = Duration::from_secs(10);
/// Longest `Retry-After` honoured; a registry asking for more gets this.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(30);
/// Error bodies are read only this far (they are a few hundred bytes).
const ERROR_BODY_MAX: usize = 16 * 1024;
/// Slowest upload (bytes per second) waited for before a request body is
/// given up on: sending it counts against the response-head timeout.
pub const UPLOAD_RATE_FLOOR: u64 = 64 * 1024;

/// Names a request in errors: the registry and what was being fetched.
pub struct Ctx<'a> {
    pub registry: &'a str,
    pub what: String,
}

impl Ctx<'_> {
    pub fn err(&self, kind: ErrorKind) -> RegistryError {
        RegistryError::new(self.registry, self.what.clone(), kind)
    }
}

/// Which credentials a request carries (only to its starting origin).
pub enum Auth {
    None,
    /// The registry's own, per [`super::auth`], for this repository and
    /// what the request does there.
    Registry {
        repository: String,
        access: Access,
    },
    /// Fixed Basic credentials (token endpoints).
    Basic {
        username: String,
        password: String,
    },
}

impl Auth {
    /// The registry's credentials for reading `repository`.
    pub fn pull(repository: &str) -> Auth {
        Auth::Registry {
            repository: repository.to_string(),
            access: Access::Pull,
        }
    }
}

pub struct Request {
    pub method: Method,
    pub url: Url,
    pub headers: HeaderMap,
    /// An `application/x-www-form-urlencoded` body.
    pub form: Option<String>,
    /// Any other body; its `Content-Type` goes in `headers`.
    pub body: Option<Bytes>,
    pub auth: Auth,
    /// Retries after the first attempt.
    pub retries: u32,
}

impl Request {
    pub fn get(url: Url, headers: HeaderMap, auth: Auth, retries: u32) -> Request {
        Request::new(Method::GET, url, headers, auth, retries)
    }

    pub fn new(method: Method, url: Url, headers: HeaderMap, auth: Auth, retries: u32) -> Request {
        Request {
            method,
            url,
            headers,
            form: None,
            body: None,
            auth,
            retries,
        }
    }
}

/// A successful (2xx) response and the URL that finally produced it.
pub struct Response {
    pub resp: reqwest::Response,
    pub final_url: Url,
}

/// Shared state behind a `Client`.
pub struct Inner {
    /// For `http://` URLs: built without loading the system's CA roots,
    /// which costs tens of milliseconds of a cold start (one file per CA).
    pub plain: reqwest::Client,
    /// For `https://` URLs, with the system's roots: built on first use.
    pub tls: OnceLock<reqwest::Client>,
    pub opts: ClientOptions,
    /// `opts.insecure_registries` plus `IMGFS_INSECURE_REGISTRIES`.
    pub insecure: Vec<String>,
    pub config_path: Option<PathBuf>,
    pub auth: AuthCache,
    /// Where blob GETs were last redirected (signed CDN URLs), reused for a
    /// short while so each Range read does not go through the registry again.
    pub redirects: Mutex<HashMap<String, (Url, Instant)>>,
    /// Mirror endpoints left out for a while after failing.
    pub dead_mirrors: super::mirror::DeadMirrors,
}

/// Why one attempt failed, and what to do about it.
enum Failure {
    /// 401 from the registry itself: run the challenge, then try once more.
    Challenge {
        www_authenticate: String,
        generation: Option<u64>,
        detail: ErrorDetail,
    },
    Retry {
        error: RegistryError,
        retry_after: Option<Duration>,
    },
    Fatal(RegistryError),
}

pub fn same_origin(a: &Url, b: &Url) -> bool {
    a.scheme() == b.scheme()
        && a.host_str() == b.host_str()
        && a.port_or_known_default() == b.port_or_known_default()
}

/// Whether the handshake failed in rustls (somewhere in the cause chain):
/// the same certificate or protocol fails the same way every time.
fn is_tls_failure(error: &reqwest::Error) -> bool {
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        if cause.is::<rustls::Error>() {
            return true;
        }
        // io::Error's source() skips the error it wraps: step into it.
        source = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io
                .get_ref()
                .map(|inner| inner as &(dyn std::error::Error + 'static)),
            None => cause.source(),
        };
    }
    false
}

/// `reqwest::Error` with its whole cause chain ("error sending request: … connection refused").
pub fn describe(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        let part = cause.to_string();
        if !text.contains(&part) {
            text.push_str(": ");
            text.push_str(&part);
        }
        source = cause.source();
    }
    text
}

/// `Retry-After: <seconds>` (the HTTP-date form is rare for registries and
/// falls back to the computed backoff).
fn retry_after(headers: &HeaderMap) -> Option<Duration> {
    let value = headers.get(header::RETRY_AFTER)?.to_str().ok()?;
    value.trim().parse::<u64>().ok().map(Duration::from_secs)
}

/// Delay before retry number `attempt` (0-based): the server's wish up to a
/// cap, else exponential backoff with "equal jitter" (half fixed, half random).
pub fn backoff(attempt: u32, retry_after: Option<Duration>) -> Duration {
    if let Some(wanted) = retry_after {
        return wanted.min(RETRY_AFTER_CAP);
    }
    let exp = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(attempt).unwrap_or(u32::MAX))
        .min(BACKOFF_MAX);
    let half = exp / 2;
    half + rand::rng().random_range(Duration::ZERO..=half)
}

/// Which CA roots a client trusts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Roots {
    /// None: for plain HTTP only.
    None,
    /// The system's (rustls-platform-verifier).
    System,
}

/// An HTTP client with imgfs's settings (no automatic redirects: they are
/// followed by hand, so credentials stay at the registry).
pub fn http_client(opts: &ClientOptions, roots: Roots) -> Result<reqwest::Client, RegistryError> {
    let mut builder = reqwest::Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .connect_timeout(opts.connect_timeout)
        .read_timeout(opts.read_timeout)
        .tcp_keepalive(super::TCP_KEEPALIVE)
        .user_agent(opts.user_agent.clone());
    if roots == Roots::None {
        builder = builder.tls_certs_only(Vec::new());
    }
    builder.build().map_err(|e| {
        RegistryError::new(
            "-",
            "creating the HTTP client",
            ErrorKind::Setup(describe(&e)),
        )
    })
}

impl Inner {
    /// The client for `url`'s scheme.
    fn http_for(&self, url: &Url) -> Result<&reqwest::Client, ErrorKind> {
        if url.scheme() != "https" {
            return Ok(&self.plain);
        }
        if let Some(client) = self.tls.get() {
            return Ok(client);
        }
        let client = http_client(&self.opts, Roots::System).map_err(|e| e.kind)?;
        Ok(self.tls.get_or_init(|| client))
    }

    /// Connecting plus waiting for the response head.
    fn head_timeout(&self) -> Duration {
        self.opts.connect_timeout + self.opts.read_timeout
    }

    /// Sending `req` (its body included) and waiting for the response head.
    fn send_timeout(&self, req: &Request) -> Duration {
        let body_len = req.body.as_ref().map_or(0, Bytes::len) as u64;
        self.head_timeout() + Duration::from_secs(body_len / UPLOAD_RATE_FLOOR)
    }

    pub fn unauthorized(&self, registry: &str, status: Status, detail: ErrorDetail) -> ErrorKind {
        let config = match &self.config_path {
            Some(path) => path.display().to_string(),
            None => "~/.docker/config.json".to_string(),
        };
        let advice = format!("check credentials in {config} or run `docker login {registry}`");
        ErrorKind::Unauthorized {
            status,
            detail,
            advice,
        }
    }

    /// Sends `req`, following redirects, authenticating and retrying as
    /// needed. Returns only 2xx responses; everything else is an error.
    pub async fn execute(&self, ctx: &Ctx<'_>, req: &Request) -> Result<Response, RegistryError> {
        let mut failures = 0u32;
        let mut reauthenticated = false;
        loop {
            let failure = match self.attempt(ctx, req).await {
                Ok(response) => return Ok(response),
                Err(failure) => failure,
            };
            match failure {
                Failure::Challenge {
                    www_authenticate,
                    generation,
                    detail,
                } => {
                    let Auth::Registry { repository, access } = &req.auth else {
                        return Err(ctx.err(self.unauthorized(ctx.registry, Status(401), detail)));
                    };
                    if reauthenticated {
                        return Err(ctx.err(self.unauthorized(ctx.registry, Status(401), detail)));
                    }
                    reauthenticated = true;
                    self.reauthenticate(ctx, repository, access, &www_authenticate, generation)
                        .await?;
                }
                Failure::Fatal(error) => return Err(error),
                Failure::Retry { error, retry_after } => {
                    if failures >= req.retries {
                        return Err(if failures == 0 {
                            error
                        } else {
                            let last = Box::new(error.kind);
                            ctx.err(ErrorKind::TooManyRetries {
                                attempts: failures + 1,
                                last,
                            })
                        });
                    }
                    let delay = backoff(failures, retry_after);
                    tracing::debug!(registry = ctx.registry, what = %ctx.what, ?delay, "retrying after: {}", error.kind);
                    tokio::time::sleep(delay).await;
                    failures += 1;
                }
            }
        }
    }

    async fn attempt(&self, ctx: &Ctx<'_>, req: &Request) -> Result<Response, Failure> {
        let mut url = req.url.clone();
        for _hop in 0..=MAX_REDIRECTS {
            let at_origin = same_origin(&url, &req.url);
            let mut builder = self
                .http_for(&url)
                .map_err(|kind| Failure::Fatal(ctx.err(kind)))?
                .request(req.method.clone(), url.clone())
                .headers(req.headers.clone());
            if let Some(form) = &req.form {
                builder = builder
                    .header(header::CONTENT_TYPE, "application/x-www-form-urlencoded")
                    .body(form.clone());
            }
            if let Some(body) = &req.body {
                builder = builder.body(body.clone());
            }
            let mut generation = None;
            if at_origin {
                match &req.auth {
                    Auth::None => {}
                    Auth::Basic { username, password } => {
                        builder = builder.basic_auth(username, Some(password))
                    }
                    Auth::Registry { repository, access } => {
                        match self
                            .auth_for(ctx, repository, access)
                            .await
                            .map_err(Failure::Fatal)?
                        {
                            Some((Credentials::Bearer(token), g)) => {
                                builder = builder.bearer_auth(token);
                                generation = Some(g);
                            }
                            Some((Credentials::Basic { username, password }, g)) => {
                                builder = builder.basic_auth(username, Some(password));
                                generation = Some(g);
                            }
                            None => {}
                        }
                    }
                }
            }
            let timeout = self.send_timeout(req);
            let resp = match tokio::time::timeout(timeout, builder.send()).await {
                Err(_) => {
                    let reason = format!("no response from {} within {timeout:?}", host_of(&url));
                    return Err(Failure::Retry {
                        error: ctx.err(ErrorKind::Network(reason)),
                        retry_after: None,
                    });
                }
                Ok(Err(e)) if is_tls_failure(&e) => {
                    return Err(Failure::Fatal(ctx.err(ErrorKind::Tls(describe(&e)))));
                }
                Ok(Err(e)) => {
                    let error = ctx.err(ErrorKind::Network(describe(&e)));
                    return Err(Failure::Retry {
                        error,
                        retry_after: None,
                    });
                }
                Ok(Ok(resp)) => resp,
            };
            let status = resp.status();
            if status.is_success() {
                return Ok(Response {
                    resp,
                    final_url: url,
                });
            }
            if status.is_redirection() {
                url = redirect_target(&url, resp.headers()).ok_or_else(|| {
                    Failure::Fatal(ctx.err(ErrorKind::Protocol(format!(
                        "{status} without a usable Location header"
                    ))))
                })?;
                continue;
            }
            let code = status.as_u16();
            let wait = retry_after(resp.headers());
            let www_authenticate = join_header(resp.headers(), header::WWW_AUTHENTICATE);
            let body = self.read_limited(resp, ERROR_BODY_MAX).await;
            let detail = ErrorDetail::from_body(&body);
            if code == 401 && at_origin && matches!(req.auth, Auth::Registry { .. }) {
                return Err(Failure::Challenge {
                    www_authenticate,
                    generation,
                    detail,
                });
            }
            let kind = match code {
                404 => ErrorKind::NotFound { detail },
                // Off-origin (a CDN's expired signature) is not a login problem.
                401 if at_origin => self.unauthorized(ctx.registry, Status(code), detail),
                403 => ErrorKind::Denied { detail },
                _ => ErrorKind::Status {
                    status: Status(code),
                    detail,
                },
            };
            return Err(if is_retryable_status(code) {
                Failure::Retry {
                    error: ctx.err(kind),
                    retry_after: wait,
                }
            } else {
                Failure::Fatal(ctx.err(kind))
            });
        }
        let reason = format!(
            "more than {MAX_REDIRECTS} redirects (last to {})",
            host_of(&url)
        );
        Err(Failure::Fatal(ctx.err(ErrorKind::Protocol(reason))))
    }

    /// Up to `limit` bytes of a body, best effort (for error messages).
    async fn read_limited(&self, mut resp: reqwest::Response, limit: usize) -> Vec<u8> {
        let mut out = Vec::new();
        while out.len() < limit {
            match tokio::time::timeout(self.opts.read_timeout, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => out.extend_from_slice(&chunk),
                _ => break,
            }
        }
        out.truncate(limit);
        out
    }

    /// A whole (small) body, each chunk under the read timeout; more than
    /// `limit` bytes is a protocol error.
    pub async fn read_all(
        &self,
        ctx: &Ctx<'_>,
        mut resp: reqwest::Response,
        limit: usize,
    ) -> Result<Bytes, RegistryError> {
        if resp.content_length().is_some_and(|len| len > limit as u64) {
            return Err(ctx.err(ErrorKind::Protocol(format!(
                "response larger than the {limit}-byte limit"
            ))));
        }
        let mut out = BytesMut::new();
        loop {
            match tokio::time::timeout(self.opts.read_timeout, resp.chunk()).await {
                Ok(Ok(Some(chunk))) => {
                    if out.len() + chunk.len() > limit {
                        return Err(ctx.err(ErrorKind::Protocol(format!(
                            "response larger than the {limit}-byte limit"
                        ))));
                    }
                    out.extend_from_slice(&chunk);
                }
                Ok(Ok(None)) => return Ok(out.freeze()),
                Ok(Err(e)) => {
                    return Err(ctx.err(ErrorKind::Network(format!(
                        "reading the response: {}",
                        describe(&e)
                    ))));
                }
                Err(_) => {
                    let reason = format!(
                        "no data for {:?} while reading the response",
                        self.opts.read_timeout
                    );
                    return Err(ctx.err(ErrorKind::Network(reason)));
                }
            }
        }
    }
}

/// All values of a header joined with ", " (challenges may come in several).
fn join_header(headers: &HeaderMap, name: header::HeaderName) -> String {
    headers
        .get_all(name)
        .iter()
        .filter_map(|v: &HeaderValue| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(", ")
}

fn redirect_target(from: &Url, headers: &HeaderMap) -> Option<Url> {
    let location = headers.get(header::LOCATION)?.to_str().ok()?;
    from.join(location)
        .ok()
        .filter(|u| matches!(u.scheme(), "http" | "https"))
}

/// `host[:port]` of a URL, for messages (never the path: signed URLs carry secrets).
pub fn host_of(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{host}:{port}"),
        (Some(host), None) => host.to_string(),
        _ => url.scheme().to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_with_jitter_and_honours_retry_after() {
        for attempt in 0..6 {
            let full = BACKOFF_BASE.saturating_mul(1 << attempt).min(BACKOFF_MAX);
            let d = backoff(attempt, None);
            assert!(d >= full / 2 && d <= full, "attempt {attempt}: {d:?}");
        }
        assert!(backoff(40, None) <= BACKOFF_MAX);
        assert_eq!(
            backoff(0, Some(Duration::from_secs(3))),
            Duration::from_secs(3)
        );
        assert_eq!(backoff(0, Some(Duration::from_secs(3600))), RETRY_AFTER_CAP);
    }

    #[test]
    fn redirects_and_origins() {
        let base = Url::parse("https://reg.example:443/v2/a/blobs/x").unwrap();
        let mut h = HeaderMap::new();
        h.insert(header::LOCATION, HeaderValue::from_static("/other?sig=1"));
        let t = redirect_target(&base, &h).unwrap();
        assert_eq!(t.as_str(), "https://reg.example/other?sig=1");
        assert!(same_origin(&base, &t));
        h.insert(
            header::LOCATION,
            HeaderValue::from_static("https://cdn.example/b"),
        );
        assert!(!same_origin(&base, &redirect_target(&base, &h).unwrap()));
        h.insert(header::LOCATION, HeaderValue::from_static("ftp://x/y"));
        assert!(redirect_target(&base, &h).is_none());
        let plain = Url::parse("http://reg.example/v2/").unwrap();
        assert!(!same_origin(&base, &plain), "scheme is part of the origin");
        assert_eq!(
            host_of(&Url::parse("http://127.0.0.1:5000/v2/?sig=secret").unwrap()),
            "127.0.0.1:5000"
        );
    }
}
