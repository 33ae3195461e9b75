//! Registry credentials the way the docker CLI finds them: `config.json` in
//! the configured directory (`$DOCKER_CONFIG`, else `~/.docker`), its
//! `credHelpers` (per registry) and `credsStore` (default) run as
//! `docker-credential-NAME get`, and its `auths` entries (base64 `auth`,
//! `username`/`password`, or `identitytoken`).
//!
//! Implemented here rather than with the `docker_credential` crate because
//! that crate only reads `$DOCKER_CONFIG`/`$HOME`, runs helpers without a
//! timeout and drops the reason a lookup failed.

use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

/// Key Docker Hub credentials are stored under (the v1 index URL).
const DOCKER_HUB_SERVER: &str = "https://index.docker.io/v1/";
/// Names that all mean Docker Hub in config keys.
const DOCKER_HUB_ALIASES: &[&str] = &["docker.io", "index.docker.io", "registry-1.docker.io"];
/// A helper may unlock a keychain, but must not hang a mount forever.
const HELPER_TIMEOUT: Duration = Duration::from_secs(30);
/// What a helper's `Username` is when `Secret` is an identity (refresh) token.
const HELPER_TOKEN_USERNAME: &str = "<token>";
/// Helper stdout meaning "nothing stored for this server" (docker-credential-helpers).
const HELPER_NOT_FOUND: &str = "credentials not found in native keychain";

/// A credential for one registry. `Debug` never shows the secret.
#[derive(Clone, PartialEq, Eq)]
pub enum Credential {
    UserPass {
        username: String,
        password: String,
    },
    /// An OAuth2 refresh token, exchanged at the token endpoint.
    IdentityToken(String),
}

impl fmt::Debug for Credential {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Credential::UserPass { username, .. } => write!(f, "UserPass({username:?}, ***)"),
            Credential::IdentityToken(_) => write!(f, "IdentityToken(***)"),
        }
    }
}

/// The config.json to read: the explicit directory, else `$DOCKER_CONFIG`,
/// else `$HOME/.docker`.
pub fn config_path(explicit_dir: Option<&Path>) -> Option<PathBuf> {
    let dir = match explicit_dir {
        Some(dir) => dir.to_path_buf(),
        None => std::env::var_os("DOCKER_CONFIG")
            .map(PathBuf::from)
            .or_else(|| std::env::var_os("HOME").map(|h| Path::new(&h).join(".docker")))?,
    };
    Some(dir.join("config.json"))
}

#[derive(Deserialize, Default)]
#[serde(rename_all = "camelCase")]
struct DockerConfig {
    #[serde(default)]
    auths: HashMap<String, AuthEntry>,
    #[serde(default)]
    creds_store: Option<String>,
    #[serde(default)]
    cred_helpers: HashMap<String, String>,
}

#[derive(Deserialize, Default)]
struct AuthEntry {
    #[serde(default)]
    auth: Option<String>,
    #[serde(default)]
    username: Option<String>,
    #[serde(default)]
    password: Option<String>,
    #[serde(default)]
    identitytoken: Option<String>,
}

/// Where a registry's credential comes from, per docker CLI precedence.
#[derive(Debug, PartialEq)]
enum Plan {
    /// Run this helper; when it has nothing, fall back to `auths` (credsStore
    /// only: the native store falls back to the file, a per-registry helper does not).
    Helper {
        name: String,
        fallback: bool,
    },
    File,
}

/// The credential for `registry` (as in a reference: `docker.io`, `host:5000`),
/// or `None` when nothing is configured. Errors say which file or helper failed.
pub async fn lookup(config: Option<&Path>, registry: &str) -> Result<Option<Credential>, String> {
    let Some(path) = config else { return Ok(None) };
    let bytes = match tokio::fs::read(path).await {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(format!("reading {}: {e}", path.display())),
    };
    let config = parse_config(&bytes).map_err(|e| format!("{}: {e}", path.display()))?;
    let server = server_address(registry);
    match plan(&config, registry) {
        Plan::File => from_auths(&config, registry),
        Plan::Helper { name, fallback } => match run_helper(&name, &server).await? {
            Some(credential) => Ok(Some(credential)),
            None if fallback => from_auths(&config, registry),
            None => Ok(None),
        },
    }
}

fn parse_config(bytes: &[u8]) -> Result<DockerConfig, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(DockerConfig::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("invalid config.json: {e}"))
}

/// What a helper is asked for, and the canonical config key.
fn server_address(registry: &str) -> String {
    if DOCKER_HUB_ALIASES.contains(&registry) {
        DOCKER_HUB_SERVER.to_string()
    } else {
        registry.to_string()
    }
}

/// Reduces a config key (`https://host:5000/v1/`, `host:5000`, `docker.io`)
/// to the registry it names, so keys written in any form match.
fn key_registry(key: &str) -> &str {
    let without_scheme = key
        .strip_prefix("https://")
        .or_else(|| key.strip_prefix("http://"))
        .unwrap_or(key);
    let host = without_scheme.split('/').next().unwrap_or(without_scheme);
    if DOCKER_HUB_ALIASES.contains(&host) {
        "docker.io"
    } else {
        host
    }
}

fn registry_key(registry: &str) -> &str {
    if DOCKER_HUB_ALIASES.contains(&registry) {
        "docker.io"
    } else {
        registry
    }
}

/// Looks `registry` up in a key → value map: exact canonical key first, then
/// any key naming the same registry.
fn find<'a, V>(map: &'a HashMap<String, V>, registry: &str) -> Option<&'a V> {
    let wanted = registry_key(registry);
    map.get(&server_address(registry))
        .or_else(|| map.get(registry))
        .or_else(|| {
            let mut keys: Vec<&String> = map.keys().filter(|k| key_registry(k) == wanted).collect();
            // Deterministic choice when several spellings are present.
            keys.sort();
            keys.first().and_then(|k| map.get(*k))
        })
}

fn plan(config: &DockerConfig, registry: &str) -> Plan {
    if let Some(name) = find(&config.cred_helpers, registry).filter(|n| !n.is_empty()) {
        return Plan::Helper {
            name: name.clone(),
            fallback: false,
        };
    }
    match &config.creds_store {
        Some(name) if !name.is_empty() => Plan::Helper {
            name: name.clone(),
            fallback: true,
        },
        _ => Plan::File,
    }
}

fn from_auths(config: &DockerConfig, registry: &str) -> Result<Option<Credential>, String> {
    let Some(entry) = find(&config.auths, registry) else {
        return Ok(None);
    };
    if let Some(token) = entry.identitytoken.as_ref().filter(|t| !t.is_empty()) {
        return Ok(Some(Credential::IdentityToken(token.clone())));
    }
    if let Some(auth) = entry.auth.as_ref().filter(|a| !a.is_empty()) {
        let decoded = base64_decode(auth.trim())
            .and_then(|raw| String::from_utf8(raw).ok())
            .ok_or_else(|| format!("auths entry for {registry}: \"auth\" is not valid base64"))?;
        let (username, password) = decoded.split_once(':').ok_or_else(|| {
            format!("auths entry for {registry}: \"auth\" must encode \"username:password\"")
        })?;
        return Ok(Some(Credential::UserPass {
            username: username.to_string(),
            password: password.to_string(),
        }));
    }
    match (&entry.username, &entry.password) {
        (Some(username), Some(password)) if !username.is_empty() => {
            Ok(Some(Credential::UserPass {
                username: username.clone(),
                password: password.clone(),
            }))
        }
        _ => Ok(None),
    }
}

#[derive(Deserialize)]
#[serde(rename_all = "PascalCase")]
struct HelperResponse {
    username: String,
    secret: String,
}

/// Runs `docker-credential-NAME get` with the server address on stdin.
async fn run_helper(name: &str, server: &str) -> Result<Option<Credential>, String> {
    let program = format!("docker-credential-{name}");
    let mut child = Command::new(&program)
        .arg("get")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running {program}: {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        // A few dozen bytes into an empty pipe: this cannot block.
        stdin
            .write_all(server.as_bytes())
            .map_err(|e| format!("writing to {program}: {e}"))?;
    }
    let pid = rustix::process::Pid::from_child(&child);
    let waiting = tokio::task::spawn_blocking(move || child.wait_with_output());
    let output = match tokio::time::timeout(HELPER_TIMEOUT, waiting).await {
        Ok(Ok(Ok(output))) => output,
        Ok(Ok(Err(e))) => return Err(format!("waiting for {program}: {e}")),
        Ok(Err(e)) => return Err(format!("waiting for {program}: {e}")),
        Err(_) => {
            // The child is ours; the blocking wait reaps it once killed.
            let _ = rustix::process::kill_process(pid, rustix::process::Signal::KILL);
            return Err(format!(
                "{program} did not answer within {}s",
                HELPER_TIMEOUT.as_secs()
            ));
        }
    };
    let stdout = String::from_utf8_lossy(&output.stdout);
    if !output.status.success() {
        if stdout.contains(HELPER_NOT_FOUND) {
            return Ok(None);
        }
        let stderr = String::from_utf8_lossy(&output.stderr);
        let why = if stderr.trim().is_empty() {
            stdout.trim()
        } else {
            stderr.trim()
        };
        return Err(format!("{program} get {server}: {}: {why}", output.status));
    }
    let response: HelperResponse = serde_json::from_slice(&output.stdout)
        .map_err(|e| format!("{program} get {server}: unreadable answer: {e}"))?;
    if response.username == HELPER_TOKEN_USERNAME {
        return Ok(Some(Credential::IdentityToken(response.secret)));
    }
    Ok(Some(Credential::UserPass {
        username: response.username,
        password: response.secret,
    }))
}

/// Standard base64 (RFC 4648 §4), padding optional. Small enough not to need a crate.
fn base64_decode(text: &str) -> Option<Vec<u8>> {
    fn value(c: u8) -> Option<u32> {
        match c {
            b'A'..=b'Z' => Some(u32::from(c - b'A')),
            b'a'..=b'z' => Some(u32::from(c - b'a') + 26),
            b'0'..=b'9' => Some(u32::from(c - b'0') + 52),
            b'+' => Some(62),
            b'/' => Some(63),
            _ => None,
        }
    }
    let trimmed = text.trim_end_matches('=');
    if text.len() - trimmed.len() > 2 || trimmed.len() % 4 == 1 {
        return None;
    }
    let mut out = Vec::with_capacity(trimmed.len() * 3 / 4);
    for chunk in trimmed.as_bytes().chunks(4) {
        let mut acc = 0u32;
        for (i, &c) in chunk.iter().enumerate() {
            acc |= value(c)? << (18 - 6 * i);
        }
        let bytes = acc.to_be_bytes();
        out.extend_from_slice(&bytes[1..chunk.len()]);
    }
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn creds(json: &str, registry: &str) -> Result<Option<Credential>, String> {
        let config = parse_config(json.as_bytes())?;
        assert_eq!(
            plan(&config, registry),
            Plan::File,
            "no helper configured in {json}"
        );
        from_auths(&config, registry)
    }

    fn user(u: &str, p: &str) -> Option<Credential> {
        Some(Credential::UserPass {
            username: u.into(),
            password: p.into(),
        })
    }

    #[test]
    fn base64_round_trips() {
        assert_eq!(
            base64_decode("dXNlcjpwYXNz").as_deref(),
            Some(&b"user:pass"[..])
        );
        assert_eq!(base64_decode("YTpi").as_deref(), Some(&b"a:b"[..]));
        assert_eq!(base64_decode("YTpiYw==").as_deref(), Some(&b"a:bc"[..]));
        assert_eq!(base64_decode("YTpiYw").as_deref(), Some(&b"a:bc"[..]));
        assert_eq!(base64_decode("").as_deref(), Some(&b""[..]));
        assert_eq!(base64_decode("a"), None);
        assert_eq!(base64_decode("YT!i"), None);
    }

    #[test]
    fn auths_forms_and_docker_hub_key() {
        let hub = r#"{"auths":{"https://index.docker.io/v1/":{"auth":"dXNlcjpwYXNz"}}}"#;
        assert_eq!(creds(hub, "docker.io"), Ok(user("user", "pass")));
        assert_eq!(creds(hub, "quay.io"), Ok(None));

        let hub_short = r#"{"auths":{"docker.io":{"username":"u","password":"p:w"}}}"#;
        assert_eq!(creds(hub_short, "docker.io"), Ok(user("u", "p:w")));

        let port = r#"{"auths":{"localhost:5000":{"auth":"YTpiOmM="}}}"#;
        assert_eq!(creds(port, "localhost:5000"), Ok(user("a", "b:c")));
        assert_eq!(creds(port, "localhost:5001"), Ok(None));

        let scheme = r#"{"auths":{"https://registry.example.com/v2/":{"auth":"YTpi"}}}"#;
        assert_eq!(creds(scheme, "registry.example.com"), Ok(user("a", "b")));

        let token = r#"{"auths":{"r.io":{"username":"u","identitytoken":"rt"}}}"#;
        assert_eq!(
            creds(token, "r.io"),
            Ok(Some(Credential::IdentityToken("rt".into())))
        );

        let empty = r#"{"auths":{"r.io":{}}}"#;
        assert_eq!(creds(empty, "r.io"), Ok(None));
        assert_eq!(creds("", "r.io"), Ok(None));

        let bad = r#"{"auths":{"r.io":{"auth":"%%%"}}}"#;
        assert!(creds(bad, "r.io").unwrap_err().contains("base64"));
        let no_colon = r#"{"auths":{"r.io":{"auth":"YWJj"}}}"#;
        assert!(
            creds(no_colon, "r.io")
                .unwrap_err()
                .contains("username:password")
        );
        assert!(
            parse_config(b"{not json")
                .err()
                .unwrap_or_default()
                .contains("invalid config.json")
        );
    }

    #[test]
    fn helpers_take_precedence() {
        let cfg = parse_config(
            br#"{"credsStore":"desktop","credHelpers":{"gcr.io":"gcloud","https://index.docker.io/v1/":"hub"}}"#,
        )
        .unwrap();
        assert_eq!(
            plan(&cfg, "gcr.io"),
            Plan::Helper {
                name: "gcloud".into(),
                fallback: false
            }
        );
        assert_eq!(
            plan(&cfg, "docker.io"),
            Plan::Helper {
                name: "hub".into(),
                fallback: false
            }
        );
        assert_eq!(
            plan(&cfg, "quay.io"),
            Plan::Helper {
                name: "desktop".into(),
                fallback: true
            }
        );
        assert_eq!(server_address("docker.io"), "https://index.docker.io/v1/");
        assert_eq!(server_address("host:5000"), "host:5000");
    }

    #[tokio::test]
    async fn missing_helper_and_files_are_reported() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("config.json");
        assert_eq!(
            lookup(Some(&path), "r.io").await,
            Ok(None),
            "no file, no credentials"
        );
        std::fs::write(&path, r#"{"credsStore":"imgfs-test-no-such-helper"}"#).unwrap();
        let err = lookup(Some(&path), "r.io").await.unwrap_err();
        assert!(
            err.contains("docker-credential-imgfs-test-no-such-helper"),
            "{err}"
        );
    }
}
