//! Image references (`alpine`, `host:5000/team/app:v2@sha256:…`), parsed and
//! normalized exactly as Docker does (distribution/reference
//! `ParseNormalizedNamed` + `TagNameOnly`).
//!
//! The grammar is checked by hand instead of with a regex: the reference is
//! split into registry / repository / tag / digest first (none of the later
//! parts can contain `:` or `@`, so the split is unambiguous), then each part
//! is validated on its own, which lets every error say which part is wrong.
//! This module never touches the network.

use crate::digest::{Digest, DigestError};
use serde::{Serialize, Serializer};
use std::fmt;

/// The registry familiar names resolve to.
pub const DOCKER_HUB: &str = "docker.io";
/// The legacy Docker Hub name ("the Docker Index"), normalized to [`DOCKER_HUB`].
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
/// The host that actually serves Docker Hub's registry API.
const DOCKER_HUB_API_HOST: &str = "registry-1.docker.io";
/// Namespace of Docker Hub's official images (`alpine` → `library/alpine`).
const OFFICIAL_NAMESPACE: &str = "library/";
const DEFAULT_TAG: &str = "latest";
const LOCALHOST: &str = "localhost";
/// distribution/reference `NameTotalLengthMax`: registry + `/` + repository.
const NAME_MAX_LEN: usize = 255;
/// A tag is one word character followed by at most 127 more.
const TAG_MAX_LEN: usize = 128;
/// Length of an image ID (a bare sha256 hex string), which Docker refuses as a name.
const IMAGE_ID_HEX_LEN: usize = 64;
/// distribution/reference accepts digests whose encoded part has ≥ 32 hex digits.
const DIGEST_MIN_HEX_LEN: usize = 32;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ReferenceError {
    #[error("invalid reference \"\": the image name is empty")]
    Empty,
    #[error(
        "invalid reference {0:?}: a 64-digit hexadecimal string is an image ID, not a repository name"
    )]
    ImageId(String),
    #[error("invalid reference {input:?}: repository name {repository:?} must be lowercase")]
    Uppercase { input: String, repository: String },
    #[error("invalid reference {input:?}: registry {registry:?} is not a valid host[:port]")]
    InvalidRegistry { input: String, registry: String },
    #[error("invalid reference {input:?}: repository name {repository:?} is invalid: {reason}")]
    InvalidRepository {
        input: String,
        repository: String,
        reason: String,
    },
    #[error(
        "invalid reference {input:?}: the name is {len} characters long, the limit is {NAME_MAX_LEN}"
    )]
    NameTooLong { input: String, len: usize },
    #[error("invalid reference {input:?}: tag {tag:?} is invalid: {reason}")]
    InvalidTag {
        input: String,
        tag: String,
        reason: String,
    },
    #[error("invalid reference {input:?}: digest {digest:?} is invalid: {reason}")]
    InvalidDigest {
        input: String,
        digest: String,
        reason: String,
    },
}

/// A normalized image reference.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    /// `docker.io` for Docker Hub, else `host[:port]` as written.
    pub registry: String,
    /// Path in the registry, e.g. `library/alpine`.
    pub repository: String,
    /// `latest` when neither a tag nor a digest was given; kept for display
    /// when a digest is given too.
    pub tag: Option<String>,
    /// When present, this is what is fetched (it wins over the tag).
    pub digest: Option<Digest>,
}

impl Reference {
    pub fn parse(s: &str) -> Result<Reference, ReferenceError> {
        if s.is_empty() {
            return Err(ReferenceError::Empty);
        }
        if is_image_id(s) {
            return Err(ReferenceError::ImageId(s.to_string()));
        }
        let (registry, remainder) = split_registry(s);
        let (name_and_tag, digest) = match remainder.split_once('@') {
            Some((left, right)) => (left, Some(right)),
            None => (remainder.as_str(), None),
        };
        let (repository, tag) = match name_and_tag.split_once(':') {
            Some((left, right)) => (left, Some(right)),
            None => (name_and_tag, None),
        };
        if repository.to_lowercase() != repository {
            return Err(ReferenceError::Uppercase {
                input: s.to_string(),
                repository: repository.to_string(),
            });
        }
        if !is_valid_registry(&registry) {
            return Err(ReferenceError::InvalidRegistry {
                input: s.to_string(),
                registry,
            });
        }
        check_repository(repository).map_err(|reason| ReferenceError::InvalidRepository {
            input: s.to_string(),
            repository: repository.to_string(),
            reason,
        })?;
        let len = registry.len() + 1 + repository.len();
        if len > NAME_MAX_LEN {
            return Err(ReferenceError::NameTooLong {
                input: s.to_string(),
                len,
            });
        }
        if let Some(tag) = tag {
            check_tag(tag).map_err(|reason| ReferenceError::InvalidTag {
                input: s.to_string(),
                tag: tag.to_string(),
                reason,
            })?;
        }
        let digest = digest
            .map(|d| {
                parse_digest(d).map_err(|reason| ReferenceError::InvalidDigest {
                    input: s.to_string(),
                    digest: d.to_string(),
                    reason,
                })
            })
            .transpose()?;
        let tag = match (tag, &digest) {
            (Some(tag), _) => Some(tag.to_string()),
            (None, Some(_)) => None,
            (None, None) => Some(DEFAULT_TAG.to_string()),
        };
        Ok(Reference {
            registry,
            repository: repository.to_string(),
            tag,
            digest,
        })
    }

    /// The host[:port] that serves the registry API.
    pub fn api_host(&self) -> &str {
        if self.registry == DOCKER_HUB {
            DOCKER_HUB_API_HOST
        } else {
            &self.registry
        }
    }

    /// What to ask the registry for: the digest if present, else the tag.
    pub fn manifest_ref(&self) -> String {
        match (&self.digest, &self.tag) {
            (Some(digest), _) => digest.to_string(),
            (None, Some(tag)) => tag.clone(),
            (None, None) => DEFAULT_TAG.to_string(),
        }
    }

    /// `registry/repository`, without tag or digest.
    pub fn name(&self) -> String {
        format!("{}/{}", self.registry, self.repository)
    }

    /// The same repository pinned to `digest` (tag kept for display).
    pub fn with_digest(&self, digest: Digest) -> Reference {
        Reference {
            digest: Some(digest),
            ..self.clone()
        }
    }
}

impl std::str::FromStr for Reference {
    type Err = ReferenceError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Reference::parse(s)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

impl Serialize for Reference {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_str(self)
    }
}

fn is_image_id(s: &str) -> bool {
    s.len() == IMAGE_ID_HEX_LEN
        && s.bytes()
            .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
}

/// distribution/reference `splitDockerDomain`: the first path element is a
/// registry when it is `localhost`, contains `.` or `:`, or has uppercase
/// letters (which a repository may not); otherwise the name is on Docker Hub,
/// where one-element names live under `library/`.
fn split_registry(s: &str) -> (String, String) {
    let (registry, remainder) = match s.split_once('/') {
        None => (DOCKER_HUB, s),
        Some((first, rest)) => {
            if first == DOCKER_HUB_LEGACY {
                (DOCKER_HUB, rest)
            } else if first == LOCALHOST
                || first.contains(['.', ':'])
                || first.to_lowercase() != first
            {
                (first, rest)
            } else {
                (DOCKER_HUB, s)
            }
        }
    };
    if registry == DOCKER_HUB && !remainder.contains('/') {
        return (
            registry.to_string(),
            format!("{OFFICIAL_NAMESPACE}{remainder}"),
        );
    }
    (registry.to_string(), remainder.to_string())
}

fn is_valid_registry(registry: &str) -> bool {
    let (host, port) = split_host_port(registry);
    let port_ok = port.is_none_or(|p| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()));
    port_ok && (is_valid_domain_name(host) || is_valid_ipv6_literal(host))
}

/// Splits `host[:port]` where host may be a bracketed IPv6 literal.
pub(crate) fn split_host_port(s: &str) -> (&str, Option<&str>) {
    if s.starts_with('[') {
        return match s.find(']') {
            Some(end) => {
                let rest = &s[end + 1..];
                (&s[..=end], rest.strip_prefix(':'))
            }
            None => (s, None),
        };
    }
    match s.rsplit_once(':') {
        Some((host, port)) => (host, Some(port)),
        None => (s, None),
    }
}

/// `domainNameComponent(\.domainNameComponent)*` where a component is
/// `[a-zA-Z0-9]` or `[a-zA-Z0-9][a-zA-Z0-9-]*[a-zA-Z0-9]`.
fn is_valid_domain_name(host: &str) -> bool {
    !host.is_empty()
        && host.split('.').all(|c| {
            !c.is_empty()
                && c.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && !c.starts_with('-')
                && !c.ends_with('-')
        })
}

/// `\[[a-fA-F0-9:]+\]` (no zone identifiers, no embedded IPv4).
fn is_valid_ipv6_literal(host: &str) -> bool {
    host.strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .is_some_and(|inner| {
            !inner.is_empty() && inner.bytes().all(|b| b.is_ascii_hexdigit() || b == b':')
        })
}

/// `pathComponent(/pathComponent)*`, pathComponent = `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`.
fn check_repository(repository: &str) -> Result<(), String> {
    if repository.is_empty() {
        return Err("it is empty".to_string());
    }
    for component in repository.split('/') {
        check_path_component(component)?;
    }
    Ok(())
}

fn check_path_component(component: &str) -> Result<(), String> {
    if component.is_empty() {
        return Err("it has an empty path component (\"//\" or a leading/trailing \"/\")".into());
    }
    let is_alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if let Some(bad) = component
        .chars()
        .find(|&c| !(c.is_ascii() && (is_alnum(c as u8) || "._-".contains(c))))
    {
        return Err(format!(
            "character {bad:?} is not allowed (only a-z, 0-9, '.', '_', '-')"
        ));
    }
    let bytes = component.as_bytes();
    if !bytes.first().copied().is_some_and(is_alnum) || !bytes.last().copied().is_some_and(is_alnum)
    {
        return Err(format!(
            "component {component:?} must start and end with a letter or digit"
        ));
    }
    // Runs of separators between alphanumerics: ".", "_", "__" or any number of "-".
    for run in component
        .split(|c: char| c.is_ascii_alphanumeric())
        .filter(|r| !r.is_empty())
    {
        let ok = run == "." || run == "_" || run == "__" || run.bytes().all(|b| b == b'-');
        if !ok {
            return Err(format!(
                "separator {run:?} in {component:?} is not allowed (use '.', '_', '__' or dashes)"
            ));
        }
    }
    Ok(())
}

/// `[\w][\w.-]{0,127}`.
fn check_tag(tag: &str) -> Result<(), String> {
    let is_word = |c: char| c.is_ascii_alphanumeric() || c == '_';
    let mut chars = tag.chars();
    match chars.next() {
        None => return Err("it is empty".to_string()),
        Some(first) if !is_word(first) => {
            return Err(format!(
                "it must start with a letter, digit or '_', not {first:?}"
            ));
        }
        Some(_) => {}
    }
    if let Some(bad) = chars.find(|&c| !(is_word(c) || c == '.' || c == '-')) {
        return Err(format!(
            "character {bad:?} is not allowed (only A-Z, a-z, 0-9, '_', '.', '-')"
        ));
    }
    if tag.len() > TAG_MAX_LEN {
        return Err(format!(
            "it is {} characters long, the limit is {TAG_MAX_LEN}",
            tag.len()
        ));
    }
    Ok(())
}

/// distribution/reference's digest grammar, then imgfs's own rule (sha256 only).
fn parse_digest(s: &str) -> Result<Digest, String> {
    let Some((algorithm, encoded)) = s.split_once(':') else {
        return Err("expected ALGORITHM:HEX, e.g. sha256:<64 hex digits>".to_string());
    };
    let algorithm_ok = !algorithm.is_empty()
        && algorithm.split(['-', '_', '+', '.']).all(|part| {
            part.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
                && part.chars().all(|c| c.is_ascii_alphanumeric())
        });
    if !algorithm_ok {
        return Err(format!("{algorithm:?} is not a digest algorithm name"));
    }
    if encoded.len() < DIGEST_MIN_HEX_LEN || !encoded.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(format!(
            "the part after ':' must be at least {DIGEST_MIN_HEX_LEN} hex digits"
        ));
    }
    s.parse::<Digest>().map_err(|e| match e {
        DigestError::Unsupported(algo) => {
            format!("algorithm {algo:?} is not supported (imgfs verifies sha256 only)")
        }
        DigestError::Invalid(_) => {
            "sha256 digests have exactly 64 lowercase hex digits".to_string()
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const D: &str = "sha256:dbcc1c35ac38df41fd2f5e4130b32ffdb93ebae8b3dbe638c23575912276fc9c";

    /// What a case must produce: the normalized form, or the error variant's name.
    enum Want {
        Ok(&'static str),
        Err(&'static str),
    }
    use Want::{Err as E, Ok as O};

    fn variant(e: &ReferenceError) -> &'static str {
        match e {
            ReferenceError::Empty => "Empty",
            ReferenceError::ImageId(_) => "ImageId",
            ReferenceError::Uppercase { .. } => "Uppercase",
            ReferenceError::InvalidRegistry { .. } => "InvalidRegistry",
            ReferenceError::InvalidRepository { .. } => "InvalidRepository",
            ReferenceError::NameTooLong { .. } => "NameTooLong",
            ReferenceError::InvalidTag { .. } => "InvalidTag",
            ReferenceError::InvalidDigest { .. } => "InvalidDigest",
        }
    }

    #[test]
    fn normalization_table() {
        let with_digest = |s: &str| s.replace("{D}", D);
        let long_tag = format!("a:{}", "t".repeat(129));
        let max_tag = format!("a:{}", "t".repeat(128));
        let long_name = format!("{}/x", "a".repeat(250));
        let cases: Vec<(String, Want)> = vec![
            ("alpine".into(), O("docker.io/library/alpine:latest")),
            ("alpine:3.19".into(), O("docker.io/library/alpine:3.19")),
            ("user/app".into(), O("docker.io/user/app:latest")),
            (
                "docker.io/alpine".into(),
                O("docker.io/library/alpine:latest"),
            ),
            (
                "docker.io/library/alpine:edge".into(),
                O("docker.io/library/alpine:edge"),
            ),
            (
                "index.docker.io/library/debian".into(),
                O("docker.io/library/debian:latest"),
            ),
            (
                "index.docker.io/debian".into(),
                O("docker.io/library/debian:latest"),
            ),
            (
                "docker.io/library/foo/bar".into(),
                O("docker.io/library/foo/bar:latest"),
            ),
            ("host:5000/a/b:tag".into(), O("host:5000/a/b:tag")),
            ("localhost/x".into(), O("localhost/x:latest")),
            ("localhost:5000/x".into(), O("localhost:5000/x:latest")),
            ("localhost".into(), O("docker.io/library/localhost:latest")),
            (
                "127.0.0.1:5000/team/app:v2".into(),
                O("127.0.0.1:5000/team/app:v2"),
            ),
            (
                "[fc00::1]:5000/docker".into(),
                O("[fc00::1]:5000/docker:latest"),
            ),
            ("[::1]/x".into(), O("[::1]/x:latest")),
            (
                "xn--n3h.com:18080/foo".into(),
                O("xn--n3h.com:18080/foo:latest"),
            ),
            ("test_com/foo".into(), O("docker.io/test_com/foo:latest")),
            ("Foo/bar".into(), O("Foo/bar:latest")),
            (
                "192.168.0.1:80".into(),
                O("docker.io/library/192.168.0.1:80"),
            ),
            (
                "docker---rules/do__cker".into(),
                O("docker.io/docker---rules/do__cker:latest"),
            ),
            (with_digest("alpine@{D}"), O("docker.io/library/alpine@{D}")),
            (
                with_digest("busybox:latest@{D}"),
                O("docker.io/library/busybox:latest@{D}"),
            ),
            (with_digest("host:5000/a/b@{D}"), O("host:5000/a/b@{D}")),
            (
                "gcr.io/distroless/static:nonroot-amd64".into(),
                O("gcr.io/distroless/static:nonroot-amd64"),
            ),
            (max_tag, O("docker.io/library/a:TTT")),
            ("".into(), E("Empty")),
            (
                "1a3f5e7d9c1b3a5f7e9d1c3b5a7f9e1d3c5b7a9f1e3d5d7c9b1a3f5e7d9c1b3a".into(),
                E("ImageId"),
            ),
            ("docker/Docker".into(), E("Uppercase")),
            ("Alpine".into(), E("Uppercase")),
            ("docker.io/docker/Docker:v1".into(), E("Uppercase")),
            (
                "https://github.com/docker/docker".into(),
                E("InvalidRegistry"),
            ),
            ("fc00::1:5000/debian".into(), E("InvalidRegistry")),
            ("[fe80::1%eth0]:5000/debian".into(), E("InvalidRegistry")),
            ("-docker.io/docker/docker".into(), E("InvalidRegistry")),
            ("-docker".into(), E("InvalidRepository")),
            ("docker-/docker".into(), E("InvalidRepository")),
            ("docker///docker".into(), E("InvalidRepository")),
            ("dock..er/docker".into(), E("InvalidRegistry")),
            ("dock_.er/docker".into(), E("InvalidRegistry")),
            ("____/____".into(), E("InvalidRepository")),
            ("docker/".into(), E("InvalidRepository")),
            ("[fc00::1]".into(), E("InvalidRepository")),
            ("host:5000/".into(), E("InvalidRepository")),
            (long_name, E("NameTooLong")),
            ("alpine:".into(), E("InvalidTag")),
            ("alpine:-dev".into(), E("InvalidTag")),
            ("alpine:a:b".into(), E("InvalidTag")),
            ("alpine:v1+build".into(), E("InvalidTag")),
            (long_tag, E("InvalidTag")),
            ("alpine@sha256:abc".into(), E("InvalidDigest")),
            ("alpine@".into(), E("InvalidDigest")),
            (
                with_digest("alpine@{D}")
                    .to_uppercase()
                    .replace("ALPINE@SHA256", "alpine@sha256"),
                E("InvalidDigest"),
            ),
            (
                format!("alpine@sha512:{}", "a".repeat(128)),
                E("InvalidDigest"),
            ),
            (with_digest("alpine@{D}@{D}"), E("InvalidDigest")),
        ];
        assert!(cases.len() >= 25);
        for (input, want) in &cases {
            let got = Reference::parse(input);
            match (want, &got) {
                (Want::Ok(display), Ok(r)) => {
                    let display = with_digest(display).replace("TTT", &"t".repeat(128));
                    assert_eq!(r.to_string(), display, "input {input:?}");
                    assert_eq!(
                        Reference::parse(&r.to_string()).as_ref(),
                        Ok(r),
                        "round trip {input:?}"
                    );
                }
                (Want::Err(name), Err(e)) => {
                    assert_eq!(variant(e), *name, "input {input:?}: {e}");
                    if !input.is_empty() {
                        assert!(
                            e.to_string().contains(&format!("{input:?}")),
                            "{e} quotes the input"
                        );
                    }
                }
                _ => panic!("input {input:?}: got {got:?}"),
            }
        }
    }

    #[test]
    fn parts_api_host_and_manifest_ref() {
        let r = Reference::parse("alpine").unwrap();
        assert_eq!(
            (r.registry.as_str(), r.repository.as_str()),
            ("docker.io", "library/alpine")
        );
        assert_eq!(r.tag.as_deref(), Some("latest"));
        assert_eq!(r.api_host(), "registry-1.docker.io");
        assert_eq!(r.manifest_ref(), "latest");
        assert_eq!(r.name(), "docker.io/library/alpine");

        let r = Reference::parse(&format!("localhost:5000/team/app:v2@{D}")).unwrap();
        assert_eq!(r.api_host(), "localhost:5000");
        assert_eq!(r.tag.as_deref(), Some("v2"));
        assert_eq!(r.manifest_ref(), D, "the digest wins for fetching");
        assert_eq!(r.digest.map(|d| d.to_string()).as_deref(), Some(D));
    }

    #[test]
    fn error_messages_say_what_is_wrong() {
        let e = Reference::parse("docker/Docker").unwrap_err().to_string();
        assert!(
            e.contains("\"docker/Docker\"") && e.contains("lowercase"),
            "{e}"
        );
        let e = Reference::parse("alpine:v1+x").unwrap_err().to_string();
        assert!(e.contains("'+'"), "{e}");
        let e = Reference::parse("a@sha512:".to_string().as_str())
            .unwrap_err()
            .to_string();
        assert!(e.contains("hex digits"), "{e}");
        let e = Reference::parse(&format!("a@sha512:{}", "0".repeat(128)))
            .unwrap_err()
            .to_string();
        assert!(e.contains("sha256 only"), "{e}");
    }
}
