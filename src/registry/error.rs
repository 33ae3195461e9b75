//! Registry errors: always "registry HOST: WHAT: WHY", where WHAT names the
//! request (`manifest team/app:v2`, `blob team/app@sha256:… bytes 0-99`) and
//! WHY carries the HTTP status and the registry's own error codes when it sent
//! the distribution-spec error JSON.

use crate::digest::Digest;
use serde::Deserialize;
use std::fmt;

/// Longest raw (non-JSON) error body quoted in a message.
const RAW_BODY_QUOTE_MAX: usize = 200;

/// A failed registry request. `Display` reads like
/// `registry 127.0.0.1:5000: manifest team/app:v2: 404 not found (MANIFEST_UNKNOWN: manifest unknown)`.
#[derive(Debug, thiserror::Error)]
#[error("registry {registry}: {what}: {kind}")]
pub struct RegistryError {
    /// The registry as the user named it (`docker.io`, `host:5000`).
    pub registry: String,
    /// What was being fetched.
    pub what: String,
    pub kind: ErrorKind,
}

#[derive(Debug, thiserror::Error)]
pub enum ErrorKind {
    #[error("404 not found{detail}")]
    NotFound { detail: ErrorDetail },
    /// `advice` says where credentials were looked for and how to add them.
    #[error("{status}{detail}: {advice}")]
    Unauthorized {
        status: Status,
        detail: ErrorDetail,
        advice: String,
    },
    #[error("403 denied{detail}")]
    Denied { detail: ErrorDetail },
    /// Any other unexpected HTTP status (also 429/5xx once retries are exhausted).
    #[error("{status}{detail}")]
    Status { status: Status, detail: ErrorDetail },
    /// Connection failures, timeouts, dropped bodies.
    #[error("{0}")]
    Network(String),
    /// The server answered, but not in a way the protocol allows.
    #[error("{0}")]
    Protocol(String),
    #[error("digest mismatch: expected {expected}, the registry sent bytes hashing to {actual}")]
    DigestMismatch { expected: Digest, actual: Digest },
    #[error("gave up after {attempts} attempts; last error: {last}")]
    TooManyRetries { attempts: u32, last: Box<ErrorKind> },
    #[error("credentials: {0}")]
    Credentials(String),
    /// The TLS handshake failed: a certificate not trusted, or a registry
    /// that speaks plain HTTP. Retrying cannot help; the message names the
    /// fixes.
    #[error(
        "{0}; a registry with a certificate from a private CA needs that CA in the system trust store \
         (update-ca-certificates, or SSL_CERT_FILE), one that serves plain HTTP needs --insecure-registry"
    )]
    Tls(String),
    /// The client could not be built (TLS setup, bad options).
    #[error("{0}")]
    Setup(String),
}

impl RegistryError {
    pub fn new(registry: &str, what: impl Into<String>, kind: ErrorKind) -> Self {
        RegistryError {
            registry: registry.to_string(),
            what: what.into(),
            kind,
        }
    }

    pub fn is_not_found(&self) -> bool {
        matches!(self.kind, ErrorKind::NotFound { .. })
    }

    pub fn is_unauthorized(&self) -> bool {
        matches!(self.kind, ErrorKind::Unauthorized { .. })
    }

    pub fn is_denied(&self) -> bool {
        matches!(self.kind, ErrorKind::Denied { .. })
    }

    /// True when trying again later might succeed (network trouble, 429, 5xx).
    pub fn is_transient(&self) -> bool {
        self.kind.is_transient()
    }
}

impl ErrorKind {
    pub(crate) fn is_transient(&self) -> bool {
        match self {
            ErrorKind::Network(_) => true,
            ErrorKind::Status { status, .. } => is_retryable_status(status.0),
            ErrorKind::TooManyRetries { .. } => true,
            _ => false,
        }
    }
}

/// Statuses worth retrying: rate limiting and the gateway/overload family.
pub(crate) fn is_retryable_status(code: u16) -> bool {
    matches!(code, 429 | 500 | 502 | 503 | 504)
}

/// An HTTP status shown as `503 service unavailable`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status(pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let reason = reqwest::StatusCode::from_u16(self.0)
            .ok()
            .and_then(|s| s.canonical_reason())
            .unwrap_or("unknown status");
        write!(f, "{} {}", self.0, reason.to_lowercase())
    }
}

/// The registry's explanation, displayed as ` (CODE: message; CODE: message)`
/// or nothing when it gave none.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ErrorDetail(pub String);

impl fmt::Display for ErrorDetail {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if self.0.is_empty() {
            Ok(())
        } else {
            write!(f, " ({})", self.0)
        }
    }
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    errors: Vec<ErrorEntry>,
}

#[derive(Deserialize)]
struct ErrorEntry {
    #[serde(default)]
    code: String,
    #[serde(default)]
    message: String,
}

impl ErrorDetail {
    /// Reads the distribution-spec error body (`{"errors":[{"code","message"}]}`);
    /// a short plain-text body is quoted as is, anything else (HTML) is dropped.
    pub fn from_body(body: &[u8]) -> ErrorDetail {
        if let Ok(parsed) = serde_json::from_slice::<ErrorBody>(body) {
            let parts: Vec<String> = parsed
                .errors
                .iter()
                .map(|e| match (e.code.is_empty(), e.message.is_empty()) {
                    (false, false) => format!("{}: {}", e.code, e.message),
                    (false, true) => e.code.clone(),
                    _ => e.message.clone(),
                })
                .filter(|s| !s.is_empty())
                .collect();
            return ErrorDetail(parts.join("; "));
        }
        let text = String::from_utf8_lossy(body);
        let text = text.trim();
        let plain = !text.is_empty()
            && text.len() <= RAW_BODY_QUOTE_MAX
            && !text.starts_with('<')
            && !text.contains('\n');
        ErrorDetail(if plain {
            text.to_string()
        } else {
            String::new()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_distribution_error_bodies() {
        let body = br#"{"errors":[{"code":"MANIFEST_UNKNOWN","message":"manifest unknown","detail":{"Tag":"v2"}}]}"#;
        let e = RegistryError::new(
            "127.0.0.1:5000",
            "manifest team/app:v2",
            ErrorKind::NotFound {
                detail: ErrorDetail::from_body(body),
            },
        );
        assert_eq!(
            e.to_string(),
            "registry 127.0.0.1:5000: manifest team/app:v2: 404 not found (MANIFEST_UNKNOWN: manifest unknown)"
        );
        assert!(e.is_not_found() && !e.is_transient());
        let two = br#"{"errors":[{"code":"DENIED","message":"no"},{"code":"X","message":""}]}"#;
        assert_eq!(ErrorDetail::from_body(two).0, "DENIED: no; X");
        assert_eq!(
            ErrorDetail::from_body(b"<html>\n<body>bad gateway</body>").0,
            ""
        );
        assert_eq!(
            ErrorDetail::from_body(b"upstream timed out\n").0,
            "upstream timed out"
        );
        assert_eq!(Status(503).to_string(), "503 service unavailable");
    }
}
