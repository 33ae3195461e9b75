//! Registry mirrors (pull-through caches), like containerd's `hosts.toml`:
//! pulls of a registry that has mirrors try each mirror endpoint in order,
//! then the registry itself. A mirror that answers 404, 429, 5xx, refuses
//! authentication or cannot be reached is skipped for the next one; one
//! that cannot be reached (or is overloaded) is remembered as dead for
//! [`DEAD_MIRROR_PAUSE`], so each Range read does not pay its timeout again.
//! Bytes that do not match their digest are an error, never a reason to ask
//! elsewhere: they are verified whatever their source.
//!
//! A mirror is its own host: requests to it carry the upstream repository
//! name, and run their own challenge flow and credential lookup against the
//! mirror's `host[:port]`.

use super::error::{ErrorKind, RegistryError};
use super::transport::host_of;
use super::{ClientOptions, Repo};
use reqwest::Url;
use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a mirror that could not be reached is left out.
pub const DEAD_MIRROR_PAUSE: Duration = Duration::from_secs(30);
/// Retries of a request to a mirror: the next source is the better retry.
pub const MIRROR_RETRIES: u32 = 0;

/// Mirror endpoints that recently failed, by base URL.
#[derive(Default)]
pub struct DeadMirrors {
    since: Mutex<HashMap<String, Instant>>,
}

impl DeadMirrors {
    pub fn is_dead(&self, base: &Url) -> bool {
        let map = self.since.lock().unwrap_or_else(|p| p.into_inner());
        map.get(base.as_str())
            .is_some_and(|at| at.elapsed() < DEAD_MIRROR_PAUSE)
    }

    pub fn mark_dead(&self, base: &Url) {
        let mut map = self.since.lock().unwrap_or_else(|p| p.into_inner());
        map.retain(|_, at| at.elapsed() < DEAD_MIRROR_PAUSE);
        map.insert(base.as_str().to_string(), Instant::now());
    }
}

/// `/v2/` under the endpoint's path: `http://m:5000` → `http://m:5000/v2/`,
/// `https://m/cache` → `https://m/cache/v2/`, `https://m/v2` stays.
pub fn api_base(endpoint: &Url) -> Url {
    let mut base = endpoint.clone();
    base.set_query(None);
    base.set_fragment(None);
    let path = endpoint.path().trim_end_matches('/');
    let path = if path.ends_with("/v2") {
        format!("{path}/")
    } else {
        format!("{path}/v2/")
    };
    base.set_path(&path);
    base
}

/// The mirrors of `upstream`'s registry, in order, as repositories to ask,
/// without those recently found dead.
pub fn mirror_repos(opts: &ClientOptions, dead: &DeadMirrors, upstream: &Repo) -> Vec<Repo> {
    // Host names are case-insensitive.
    let Some(endpoints) = (opts.mirrors.iter())
        .find(|(registry, _)| registry.eq_ignore_ascii_case(&upstream.registry))
        .map(|(_, endpoints)| endpoints)
    else {
        return Vec::new();
    };
    endpoints
        .iter()
        .map(api_base)
        .filter(|base| {
            let dead = dead.is_dead(base);
            if dead {
                tracing::debug!(
                    "mirror {} of {} skipped: unreachable less than {DEAD_MIRROR_PAUSE:?} ago",
                    host_of(base),
                    upstream.registry
                );
            }
            !dead
        })
        .map(|base| Repo {
            registry: host_of(&base),
            repository: upstream.repository.clone(),
            base,
            mirror: true,
        })
        .collect()
}

/// What a mirror's failure means for the pull.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Ask the next source.
    Next,
    /// Ask the next source, and leave this mirror out for a while.
    NextAndMarkDead,
    /// Report it: asking elsewhere would hide a real problem.
    Fail,
}

pub fn judge(error: &RegistryError) -> Verdict {
    judge_kind(&error.kind)
}

fn judge_kind(kind: &ErrorKind) -> Verdict {
    match kind {
        ErrorKind::NotFound { .. }
        | ErrorKind::Unauthorized { .. }
        | ErrorKind::Denied { .. }
        | ErrorKind::Credentials(_) => Verdict::Next,
        ErrorKind::Status { .. }
        | ErrorKind::Network(_)
        | ErrorKind::Tls(_)
        | ErrorKind::TooManyRetries { .. } => Verdict::NextAndMarkDead,
        ErrorKind::DigestMismatch { .. } | ErrorKind::Protocol(_) | ErrorKind::Setup(_) => {
            Verdict::Fail
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::digest::Digest;
    use crate::registry::error::{ErrorDetail, Status};

    #[test]
    fn api_bases() {
        for (endpoint, base) in [
            ("http://127.0.0.1:5001", "http://127.0.0.1:5001/v2/"),
            ("http://127.0.0.1:5001/", "http://127.0.0.1:5001/v2/"),
            ("https://m.example/cache", "https://m.example/cache/v2/"),
            ("https://m.example/cache/v2", "https://m.example/cache/v2/"),
            ("https://m.example/v2/?x=1", "https://m.example/v2/"),
        ] {
            let url = Url::parse(endpoint).unwrap();
            assert_eq!(api_base(&url).as_str(), base, "{endpoint}");
        }
    }

    #[test]
    fn mirrors_in_order_without_dead_ones() {
        let mut opts = ClientOptions::default();
        opts.mirrors.insert(
            "docker.io".into(),
            vec![
                Url::parse("http://a:1").unwrap(),
                Url::parse("https://b/c").unwrap(),
            ],
        );
        let upstream = Repo {
            registry: "docker.io".into(),
            repository: "library/alpine".into(),
            base: Url::parse("https://registry-1.docker.io/v2/").unwrap(),
            mirror: false,
        };
        let dead = DeadMirrors::default();
        let repos = mirror_repos(&opts, &dead, &upstream);
        let names: Vec<(&str, &str)> = repos
            .iter()
            .map(|r| (r.registry.as_str(), r.base.as_str()))
            .collect();
        assert_eq!(names, [("a:1", "http://a:1/v2/"), ("b", "https://b/c/v2/")]);
        assert!(
            repos
                .iter()
                .all(|r| r.mirror && r.repository == "library/alpine")
        );
        dead.mark_dead(&repos[0].base);
        let left = mirror_repos(&opts, &dead, &upstream);
        assert_eq!(left.len(), 1);
        assert_eq!(left[0].registry, "b");
        let other = Repo {
            registry: "quay.io".into(),
            ..upstream
        };
        assert!(mirror_repos(&opts, &dead, &other).is_empty());
        let shouting = Repo {
            registry: "DOCKER.IO".into(),
            ..other
        };
        assert_eq!(mirror_repos(&opts, &dead, &shouting).len(), 1);
    }

    #[test]
    fn verdicts() {
        let none = ErrorDetail::default;
        assert_eq!(
            judge_kind(&ErrorKind::NotFound { detail: none() }),
            Verdict::Next
        );
        assert_eq!(
            judge_kind(&ErrorKind::Denied { detail: none() }),
            Verdict::Next
        );
        assert_eq!(
            judge_kind(&ErrorKind::Status {
                status: Status(503),
                detail: none()
            }),
            Verdict::NextAndMarkDead
        );
        assert_eq!(
            judge_kind(&ErrorKind::Network("refused".into())),
            Verdict::NextAndMarkDead
        );
        let d = Digest::of(b"x");
        assert_eq!(
            judge_kind(&ErrorKind::DigestMismatch {
                expected: d,
                actual: d
            }),
            Verdict::Fail
        );
    }
}
