//! Challenge-driven registry authentication (distribution `docs/spec/auth/token.md`).
//!
//! Requests go out anonymously until a registry answers 401 with a
//! `WWW-Authenticate` challenge. A `Bearer` challenge is answered by fetching
//! a token from its realm (with Basic credentials when config.json has some,
//! or an OAuth2 refresh-token exchange for identity tokens); a `Basic`
//! challenge by sending the credentials themselves. The result is cached per
//! (registry, token scopes) until it expires, and the challenge is kept so an
//! expired token is renewed before the next request instead of after a 401.
//! Scopes follow the operation ([`Access`]): reads ask for `pull`, pushes for
//! `pull,push`, a cross-repository mount also for `pull` on the source, so a
//! pull-only token is never reused for a push nor a push token asked for by
//! a mere read.
//! One refresh runs at a time per key; concurrent requests wait for it.

use super::credentials::{self, Credential};
use super::error::{ErrorDetail, ErrorKind, RegistryError, Status};
use super::transport::{Auth, Ctx, Inner, Request};
use reqwest::{Method, Url, header::HeaderMap};
use serde::Deserialize;
use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// token.md: "When omitted, this defaults to 60 seconds."
const DEFAULT_TOKEN_LIFETIME: Duration = Duration::from_secs(60);
/// Renew this long before expiry so a token does not lapse in flight.
const TOKEN_RENEW_MARGIN: Duration = Duration::from_secs(10);
/// Largest token response accepted (tokens are a few KiB).
const TOKEN_RESPONSE_MAX: usize = 1 << 20;
/// `client_id` sent in OAuth2 refresh-token exchanges.
const OAUTH_CLIENT_ID: &str = "imgfs";

/// One challenge of a `WWW-Authenticate` header.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Challenge {
    /// Lowercased (`bearer`, `basic`).
    pub scheme: String,
    /// Parameter names lowercased; values unquoted.
    pub params: HashMap<String, String>,
}

/// Parses every challenge in a `WWW-Authenticate` value (RFC 7235 §4.1).
/// Quoted values may contain commas and escaped quotes, e.g.
/// `Bearer realm="https://a/token",scope="repository:x:pull,push"`.
pub fn parse_challenges(header: &str) -> Vec<Challenge> {
    let mut out: Vec<Challenge> = Vec::new();
    let mut rest = header;
    loop {
        rest = rest.trim_start_matches(|c: char| c == ',' || c.is_whitespace());
        if rest.is_empty() {
            return out;
        }
        let token_end = rest.find(|c: char| c == '=' || c == ',' || c.is_whitespace());
        let (token, after) = rest.split_at(token_end.unwrap_or(rest.len()));
        let after_ws = after.trim_start();
        if let Some(value_part) = after_ws.strip_prefix('=') {
            let (value, remaining) = parse_value(value_part.trim_start());
            if let Some(current) = out.last_mut() {
                current.params.insert(token.to_ascii_lowercase(), value);
            }
            rest = remaining;
        } else {
            out.push(Challenge {
                scheme: token.to_ascii_lowercase(),
                params: HashMap::new(),
            });
            rest = after;
        }
    }
}

/// A quoted-string (with `\` escapes) or a bare token; returns it and the rest.
fn parse_value(s: &str) -> (String, &str) {
    let Some(quoted) = s.strip_prefix('"') else {
        let end = s
            .find(|c: char| c == ',' || c.is_whitespace())
            .unwrap_or(s.len());
        return (s[..end].to_string(), &s[end..]);
    };
    let mut value = String::new();
    let mut chars = quoted.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, escaped)) = chars.next() {
                    value.push(escaped);
                }
            }
            '"' => return (value, &quoted[i + 1..]),
            _ => value.push(c),
        }
    }
    (value, "") // unterminated: take what there is
}

/// What a request needs the registry to allow, which decides the token scopes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Access {
    Pull,
    Push,
    /// Push here, mounting a blob from another repository of the registry.
    PushMountFrom(String),
}

impl Access {
    /// The token scopes to request for `repository` (token.md "scope").
    pub fn scopes(&self, repository: &str) -> Vec<String> {
        match self {
            Access::Pull => vec![format!("repository:{repository}:pull")],
            Access::Push => vec![format!("repository:{repository}:pull,push")],
            Access::PushMountFrom(from) => vec![
                format!("repository:{repository}:pull,push"),
                format!("repository:{from}:pull"),
            ],
        }
    }
}

/// What to put in `Authorization`.
#[derive(Clone)]
pub enum Credentials {
    Bearer(String),
    Basic { username: String, password: String },
}

#[derive(Clone)]
struct Cached {
    credentials: Credentials,
    /// `None` for Basic, which does not expire.
    expires: Option<Instant>,
}

impl Cached {
    fn is_fresh(&self) -> bool {
        self.expires
            .is_none_or(|at| Instant::now() + TOKEN_RENEW_MARGIN < at)
    }
}

#[derive(Default)]
struct Slot {
    cached: Option<Cached>,
    /// Bumped on every refresh, so a request that got 401 can tell whether
    /// someone else already renewed the credentials it used.
    generation: u64,
    challenge: Option<Challenge>,
}

/// (registry, the requested scopes joined by spaces).
type SlotKey = (String, String);

/// Cached registry credentials, per (registry, scopes).
#[derive(Default)]
pub struct AuthCache {
    slots: Mutex<HashMap<SlotKey, Arc<tokio::sync::Mutex<Slot>>>>,
}

impl AuthCache {
    fn slot(&self, registry: &str, scopes: &[String]) -> Arc<tokio::sync::Mutex<Slot>> {
        let mut slots = self
            .slots
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        slots
            .entry((registry.to_string(), scopes.join(" ")))
            .or_default()
            .clone()
    }
}

#[derive(Deserialize)]
struct TokenResponse {
    #[serde(default)]
    token: Option<String>,
    #[serde(default)]
    access_token: Option<String>,
    #[serde(default)]
    expires_in: Option<u64>,
}

/// The token (`token`, else `access_token`) and how long it lives.
fn parse_token_response(body: &[u8]) -> Result<(String, Duration), String> {
    let parsed: TokenResponse =
        serde_json::from_slice(body).map_err(|e| format!("token response is not JSON: {e}"))?;
    let token = parsed
        .token
        .filter(|t| !t.is_empty())
        .or(parsed.access_token.filter(|t| !t.is_empty()))
        .ok_or("token response has neither \"token\" nor \"access_token\"")?;
    let lifetime = match parsed.expires_in {
        Some(secs) if secs > 0 => Duration::from_secs(secs),
        _ => DEFAULT_TOKEN_LIFETIME,
    };
    Ok((token, lifetime))
}

impl Inner {
    /// The credentials to send for `access` to `repository`, renewing an
    /// expired token first when the challenge that produced it is known.
    /// `None`: go anonymous.
    pub(crate) async fn auth_for(
        &self,
        ctx: &Ctx<'_>,
        repository: &str,
        access: &Access,
    ) -> Result<Option<(Credentials, u64)>, RegistryError> {
        let scopes = access.scopes(repository);
        let slot = self.auth.slot(ctx.registry, &scopes);
        let mut slot = slot.lock().await;
        match (&slot.cached, &slot.challenge) {
            (Some(cached), _) if cached.is_fresh() => {
                Ok(Some((cached.credentials.clone(), slot.generation)))
            }
            (Some(_), Some(challenge)) => {
                let challenge = challenge.clone();
                self.refresh(ctx, &scopes, &mut slot, challenge).await?;
                Ok(slot
                    .cached
                    .as_ref()
                    .map(|c| (c.credentials.clone(), slot.generation)))
            }
            _ => Ok(None),
        }
    }

    /// Answers a 401: runs the challenge unless a concurrent request already
    /// renewed the credentials since `used_generation`.
    pub(crate) async fn reauthenticate(
        &self,
        ctx: &Ctx<'_>,
        repository: &str,
        access: &Access,
        www_authenticate: &str,
        used_generation: Option<u64>,
    ) -> Result<(), RegistryError> {
        let scopes = access.scopes(repository);
        let slot = self.auth.slot(ctx.registry, &scopes);
        let mut slot = slot.lock().await;
        let renewed_meanwhile = used_generation != Some(slot.generation)
            && slot.cached.as_ref().is_some_and(Cached::is_fresh);
        if renewed_meanwhile {
            return Ok(());
        }
        let challenges = parse_challenges(www_authenticate);
        let chosen = challenges
            .iter()
            .find(|c| c.scheme == "bearer")
            .or_else(|| challenges.iter().find(|c| c.scheme == "basic"))
            .cloned();
        let Some(challenge) = chosen else {
            let reason = if www_authenticate.is_empty() {
                "401 without a WWW-Authenticate challenge".to_string()
            } else {
                format!("401 with an unsupported challenge {www_authenticate:?}")
            };
            return Err(ctx.err(ErrorKind::Protocol(reason)));
        };
        self.refresh(ctx, &scopes, &mut slot, challenge).await
    }

    async fn refresh(
        &self,
        ctx: &Ctx<'_>,
        scopes: &[String],
        slot: &mut Slot,
        challenge: Challenge,
    ) -> Result<(), RegistryError> {
        let credential = match credentials::lookup(self.config_path.as_deref(), ctx.registry).await
        {
            Ok(credential) => credential,
            Err(reason) if challenge.scheme == "bearer" => {
                // An anonymous token may still be enough for a public image.
                tracing::warn!(registry = ctx.registry, "ignoring credentials: {reason}");
                None
            }
            Err(reason) => return Err(ctx.err(ErrorKind::Credentials(reason))),
        };
        let cached = if challenge.scheme == "bearer" {
            let fetch = self.fetch_token(ctx, scopes, &challenge, credential.as_ref());
            let (token, lifetime) = Box::pin(fetch).await?;
            Cached {
                credentials: Credentials::Bearer(token),
                expires: Some(Instant::now() + lifetime),
            }
        } else {
            match credential {
                Some(Credential::UserPass { username, password }) => Cached {
                    credentials: Credentials::Basic { username, password },
                    expires: None,
                },
                _ => {
                    let kind = self.unauthorized(
                        ctx.registry,
                        Status(401),
                        ErrorDetail("the registry wants a username and password".into()),
                    );
                    return Err(ctx.err(kind));
                }
            }
        };
        slot.cached = Some(cached);
        slot.challenge = Some(challenge);
        slot.generation += 1;
        Ok(())
    }

    /// GET realm?service=&scope= (with Basic credentials when known), or the
    /// OAuth2 refresh-token POST when the credential is an identity token.
    async fn fetch_token(
        &self,
        ctx: &Ctx<'_>,
        scopes: &[String],
        challenge: &Challenge,
        credential: Option<&Credential>,
    ) -> Result<(String, Duration), RegistryError> {
        let realm = challenge
            .params
            .get("realm")
            .map(String::as_str)
            .unwrap_or_default();
        let token_ctx = Ctx {
            registry: ctx.registry,
            what: format!("{} (token from {realm:?})", ctx.what),
        };
        let mut url = Url::parse(realm)
            .ok()
            .filter(|u| matches!(u.scheme(), "http" | "https"))
            .ok_or_else(|| {
                token_ctx.err(ErrorKind::Protocol(
                    "the Bearer challenge has no usable realm".into(),
                ))
            })?;
        let service = challenge.params.get("service");
        // The challenge may name what it wants too, several scopes separated
        // by spaces (token.md); ask for those as well.
        let mut scopes = scopes.to_vec();
        let wanted = challenge.params.get("scope").map(String::as_str);
        for scope in wanted.unwrap_or_default().split_whitespace() {
            if !scopes.iter().any(|s| s == scope) {
                scopes.push(scope.to_string());
            }
        }
        let mut request = Request::get(
            url.clone(),
            HeaderMap::new(),
            Auth::None,
            self.opts.max_retries,
        );
        match credential {
            Some(Credential::IdentityToken(refresh_token)) => {
                let mut form = vec![
                    ("grant_type", "refresh_token".to_string()),
                    ("refresh_token", refresh_token.clone()),
                    ("client_id", OAUTH_CLIENT_ID.to_string()),
                    ("scope", scopes.join(" ")),
                ];
                if let Some(service) = service {
                    form.push(("service", service.clone()));
                }
                request.method = Method::POST;
                request.form = Some(form_urlencode(&form));
            }
            other => {
                {
                    let mut query = url.query_pairs_mut();
                    if let Some(service) = service {
                        query.append_pair("service", service);
                    }
                    for scope in &scopes {
                        query.append_pair("scope", scope);
                    }
                    if let Some(Credential::UserPass { username, .. }) = other {
                        query.append_pair("account", username);
                    }
                }
                request.url = url;
                if let Some(Credential::UserPass { username, password }) = other {
                    request.auth = Auth::Basic {
                        username: username.clone(),
                        password: password.clone(),
                    };
                }
            }
        }
        let response = self.execute(&token_ctx, &request).await?;
        let body = self
            .read_all(&token_ctx, response.resp, TOKEN_RESPONSE_MAX)
            .await?;
        parse_token_response(&body).map_err(|reason| token_ctx.err(ErrorKind::Protocol(reason)))
    }
}

/// `application/x-www-form-urlencoded`, built with the URL crate's encoder.
fn form_urlencode(pairs: &[(&str, String)]) -> String {
    let mut scratch = Url::parse("http://form.invalid/").expect("constant URL parses");
    scratch
        .query_pairs_mut()
        .extend_pairs(pairs.iter().map(|(k, v)| (*k, v.as_str())));
    scratch.query().unwrap_or_default().to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn param<'a>(c: &'a Challenge, k: &str) -> &'a str {
        c.params.get(k).map(String::as_str).unwrap_or("<missing>")
    }

    #[test]
    fn bearer_challenge_with_quoted_commas() {
        let h = r#"Bearer realm="https://auth.docker.io/token",service="registry.docker.io",scope="repository:samalba/my-app:pull,push""#;
        let cs = parse_challenges(h);
        assert_eq!(cs.len(), 1);
        assert_eq!(cs[0].scheme, "bearer");
        assert_eq!(param(&cs[0], "realm"), "https://auth.docker.io/token");
        assert_eq!(param(&cs[0], "service"), "registry.docker.io");
        assert_eq!(
            param(&cs[0], "scope"),
            "repository:samalba/my-app:pull,push"
        );
    }

    #[test]
    fn several_challenges_spacing_escapes_and_bare_tokens() {
        let h = r#"Basic realm="Registry Realm", Bearer  Realm = "https://r/t?x=1" , error=insufficient_scope, scope="a\"b""#;
        let cs = parse_challenges(h);
        assert_eq!(cs.len(), 2, "{cs:?}");
        assert_eq!(
            (cs[0].scheme.as_str(), param(&cs[0], "realm")),
            ("basic", "Registry Realm")
        );
        assert_eq!(cs[1].scheme, "bearer");
        assert_eq!(param(&cs[1], "realm"), "https://r/t?x=1");
        assert_eq!(param(&cs[1], "error"), "insufficient_scope");
        assert_eq!(param(&cs[1], "scope"), "a\"b");
        assert!(parse_challenges("").is_empty());
        let unterminated = parse_challenges(r#"Bearer realm="https://x"#);
        assert_eq!(param(&unterminated[0], "realm"), "https://x");
    }

    #[test]
    fn token_responses() {
        let (t, life) = parse_token_response(br#"{"token":"abc","expires_in":300}"#).unwrap();
        assert_eq!((t.as_str(), life), ("abc", Duration::from_secs(300)));
        let (t, life) = parse_token_response(br#"{"access_token":"xyz"}"#).unwrap();
        assert_eq!((t.as_str(), life), ("xyz", DEFAULT_TOKEN_LIFETIME));
        let (t, _) = parse_token_response(br#"{"token":"","access_token":"a2"}"#).unwrap();
        assert_eq!(t, "a2");
        assert!(
            parse_token_response(br#"{"expires_in":5}"#)
                .unwrap_err()
                .contains("neither")
        );
        assert!(
            parse_token_response(b"<html>")
                .unwrap_err()
                .contains("not JSON")
        );
    }

    #[test]
    fn form_encoding() {
        let body = form_urlencode(&[
            ("scope", "repository:a/b:pull x".into()),
            ("k", "a&b=c".into()),
        ]);
        assert_eq!(body, "scope=repository%3Aa%2Fb%3Apull+x&k=a%26b%3Dc");
    }
}
