//! The configuration files: `/etc/imgfs/config.toml`, then the user's
//! `~/.config/imgfs/config.toml` (or `$IMGFS_CONFIG` / `--config` instead of
//! that one). A key set in a later file replaces the earlier value (mirrors
//! per registry); command-line flags and their environment variables win
//! over both. Unknown keys and bad values are refused with one line naming
//! the file, the line and the key, so a typo never goes unnoticed.

use reqwest::Url;
use serde::Deserialize;
use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};

/// The system-wide file, read first.
pub const SYSTEM_CONFIG: &str = "/etc/imgfs/config.toml";
/// Replaces the user's file when set.
pub const CONFIG_ENV: &str = "IMGFS_CONFIG";

/// Other names of Docker Hub, which references always call `docker.io`.
const DOCKER_HUB_ALIASES: &[&str] = &["index.docker.io", "registry-1.docker.io"];

/// Multipliers of the size suffixes, lowercased.
const SIZE_UNITS: &[(&str, u64)] = &[
    ("", 1),
    ("b", 1),
    ("k", 1 << 10),
    ("kb", 1000),
    ("kib", 1 << 10),
    ("m", 1 << 20),
    ("mb", 1000 * 1000),
    ("mib", 1 << 20),
    ("g", 1 << 30),
    ("gb", 1000 * 1000 * 1000),
    ("gib", 1 << 30),
    ("t", 1 << 40),
    ("tb", 1000 * 1000 * 1000 * 1000),
    ("tib", 1 << 40),
];

/// A configuration file that could not be used.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("config {path}: {reason}")]
    Read { path: PathBuf, reason: String },
    /// `line` is 1-based; `key` is empty when the error is not about one key.
    #[error("config {path}:{line}: {key}{reason}")]
    Invalid {
        path: PathBuf,
        line: usize,
        key: String,
        reason: String,
    },
}

/// A byte count written like `20GiB`, `500MB`, `1T` or a plain integer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ByteSize(pub u64);

impl ByteSize {
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let text = text.trim();
        let split = text
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let unit = unit.trim().to_ascii_lowercase();
        let bad = || format!("{text:?} is not a size (like 20GiB, 500MB, 1073741824)");
        let multiplier = SIZE_UNITS
            .iter()
            .find(|(name, _)| *name == unit)
            .map(|(_, m)| *m)
            .ok_or_else(bad)?;
        if number.is_empty() {
            return Err(bad());
        }
        let bytes = match number.parse::<u64>() {
            Ok(n) => n.checked_mul(multiplier).ok_or_else(bad)?,
            Err(_) => {
                let value: f64 = number.parse().map_err(|_| bad())?;
                let bytes = (value * multiplier as f64).round();
                if !bytes.is_finite() || bytes < 0.0 || bytes >= u64::MAX as f64 {
                    return Err(bad());
                }
                bytes as u64
            }
        };
        Ok(ByteSize(bytes))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} bytes", self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d) {
            Ok(Raw::Int(n)) => Ok(ByteSize(n)),
            Ok(Raw::Text(text)) => ByteSize::parse(&text).map_err(serde::de::Error::custom),
            Err(_) => Err(serde::de::Error::custom(
                "expected a size like \"20GiB\" or a number of bytes",
            )),
        }
    }
}

/// A mirror endpoint: an `http://` or `https://` URL (a path is kept, `/v2/`
/// is added).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Endpoint(pub Url);

impl<'de> Deserialize<'de> for Endpoint {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        let url = Url::parse(&text).map_err(|e| {
            serde::de::Error::custom(format!(
                "{text:?} is not a URL ({e}); write it like \"https://mirror.example:5000\""
            ))
        })?;
        if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none() {
            return Err(serde::de::Error::custom(format!(
                "{text:?}: a mirror endpoint is an http:// or https:// URL with a host"
            )));
        }
        Ok(Endpoint(url))
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct MirrorEntry {
    registry: String,
    endpoints: Vec<Endpoint>,
}

/// One file as written.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileConfig {
    cache_dir: Option<PathBuf>,
    cache_max: Option<ByteSize>,
    insecure_registries: Option<Vec<String>>,
    mirrors: Option<Vec<MirrorEntry>>,
}

/// The merged configuration.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Config {
    pub cache_dir: Option<PathBuf>,
    pub cache_max: Option<ByteSize>,
    pub insecure_registries: Vec<String>,
    /// Registry (as references name it: `docker.io`, `host:5000`) → mirror
    /// endpoints, tried in order before the registry itself.
    pub mirrors: HashMap<String, Vec<Url>>,
    /// The files that were read, in order.
    pub files: Vec<PathBuf>,
}

impl Config {
    /// Reads the system file and the user's (or `explicit`, or
    /// `$IMGFS_CONFIG`), skipping those that do not exist — except an
    /// explicitly named one, which must.
    pub fn load(explicit: Option<&Path>) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        config.merge_file(Path::new(SYSTEM_CONFIG), false)?;
        let from_env = std::env::var_os(CONFIG_ENV)
            .filter(|v| !v.is_empty())
            .map(PathBuf::from);
        match explicit.map(Path::to_path_buf).or(from_env) {
            Some(path) => config.merge_file(&path, true)?,
            None => {
                if let Some(path) = user_config_path() {
                    config.merge_file(&path, false)?;
                }
            }
        }
        Ok(config)
    }

    fn merge_file(&mut self, path: &Path, required: bool) -> Result<(), ConfigError> {
        let text = match std::fs::read_to_string(path) {
            Ok(text) => text,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => return Ok(()),
            Err(e) => {
                return Err(ConfigError::Read {
                    path: path.to_path_buf(),
                    reason: e.to_string(),
                });
            }
        };
        self.merge_str(path, &text)?;
        self.files.push(path.to_path_buf());
        Ok(())
    }

    /// Merges one file's text over what is already there; `path` names it in errors.
    pub fn merge_str(&mut self, path: &Path, text: &str) -> Result<(), ConfigError> {
        let file: FileConfig =
            toml::from_str(text).map_err(|e| invalid(path, text, e.span(), e.message()))?;
        if let Some(dir) = file.cache_dir {
            if !dir.is_absolute() {
                let span = text.find("cache_dir").map(|at| at..at);
                let reason = format!("{} is not an absolute path", dir.display());
                return Err(invalid(path, text, span, &reason));
            }
            self.cache_dir = Some(dir);
        }
        if let Some(max) = file.cache_max {
            self.cache_max = Some(max);
        }
        if let Some(list) = file.insecure_registries {
            self.insecure_registries = list;
        }
        for entry in file.mirrors.unwrap_or_default() {
            let registry = entry.registry.trim().to_string();
            if registry.is_empty() || registry.contains('/') {
                let span = text.find(&entry.registry).map(|at| at..at);
                let reason = format!(
                    "registry {:?} must be a registry host[:port] like docker.io",
                    entry.registry
                );
                return Err(invalid(path, text, span, &reason));
            }
            let endpoints = entry.endpoints.into_iter().map(|e| e.0).collect();
            self.mirrors.insert(registry_key(&registry), endpoints);
        }
        Ok(())
    }
}

/// The registry as references name it: Docker Hub is `docker.io` whatever
/// the file calls it; host names are case-insensitive.
fn registry_key(registry: &str) -> String {
    let lower = registry.to_ascii_lowercase();
    if DOCKER_HUB_ALIASES.contains(&lower.as_str()) {
        crate::reference::DOCKER_HUB.to_string()
    } else {
        lower
    }
}

/// `~/.config/imgfs/config.toml` (`$XDG_CONFIG_HOME` when set).
pub fn user_config_path() -> Option<PathBuf> {
    let base = std::env::var_os("XDG_CONFIG_HOME")
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| {
            std::env::var_os("HOME")
                .filter(|v| !v.is_empty())
                .map(|home| PathBuf::from(home).join(".config"))
        })?;
    Some(base.join("imgfs").join("config.toml"))
}

/// One-line error at the line of `span`, naming the key written on that line
/// (or quoted in the parser's message, for unknown keys).
fn invalid(
    path: &Path,
    text: &str,
    span: Option<std::ops::Range<usize>>,
    message: &str,
) -> ConfigError {
    let at = span.map(|s| s.start.min(text.len())).unwrap_or(0);
    let line = text
        .get(..at)
        .map(|before| before.matches('\n').count() + 1)
        .unwrap_or(1);
    let line_text = text.lines().nth(line - 1).unwrap_or_default();
    let key = key_on_line(line_text)
        .map(|k| format!("key {k}: "))
        .unwrap_or_default();
    let reason = message.split_whitespace().collect::<Vec<_>>().join(" ");
    ConfigError::Invalid {
        path: path.to_path_buf(),
        line,
        key,
        reason,
    }
}

/// The bare key of a `key = value` line, if it is one.
fn key_on_line(line: &str) -> Option<&str> {
    let (key, _) = line.split_once('=')?;
    let key = key.trim();
    let bare = !key.is_empty()
        && key
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.' | '"'));
    bare.then_some(key)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(text: &str) -> Result<Config, ConfigError> {
        let mut config = Config::default();
        config.merge_str(Path::new("/etc/imgfs/config.toml"), text)?;
        Ok(config)
    }

    fn error_line(text: &str) -> String {
        let e = parse(text).unwrap_err().to_string();
        assert!(!e.contains('\n'), "one line: {e}");
        e
    }

    #[test]
    fn full_file() {
        let c = parse(
            r#"
cache_dir = "/srv/imgfs"
cache_max = "20GiB"
insecure_registries = ["reg.lan:5000"]

[[mirrors]]
registry = "docker.io"
endpoints = ["http://127.0.0.1:5001", "https://mirror.example/cache"]

[[mirrors]]
registry = "ghcr.io"
endpoints = []
"#,
        )
        .unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/srv/imgfs")));
        assert_eq!(c.cache_max, Some(ByteSize(20 << 30)));
        assert_eq!(c.insecure_registries, vec!["reg.lan:5000".to_string()]);
        let hub: Vec<&str> = c.mirrors["docker.io"].iter().map(Url::as_str).collect();
        assert_eq!(
            hub,
            ["http://127.0.0.1:5001/", "https://mirror.example/cache"]
        );
        assert!(c.mirrors["ghcr.io"].is_empty());
        assert_eq!(parse("").unwrap(), Config::default());
    }

    #[test]
    fn later_files_override_earlier_ones() {
        let mut c = Config::default();
        let first = r#"cache_dir = "/a"
cache_max = "1GiB"
insecure_registries = ["x"]
[[mirrors]]
registry = "docker.io"
endpoints = ["http://one"]
[[mirrors]]
registry = "quay.io"
endpoints = ["http://q"]
"#;
        let second = r#"cache_max = "2G"
[[mirrors]]
registry = "docker.io"
endpoints = ["http://two"]
"#;
        c.merge_str(Path::new("/etc/imgfs/config.toml"), first)
            .unwrap();
        c.merge_str(Path::new("/root/.config/imgfs/config.toml"), second)
            .unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/a")));
        assert_eq!(c.cache_max, Some(ByteSize(2 << 30)));
        assert_eq!(c.insecure_registries, ["x"]);
        assert_eq!(c.mirrors["docker.io"][0].as_str(), "http://two/");
        assert_eq!(c.mirrors["quay.io"][0].as_str(), "http://q/");
        let third = "[[mirrors]]\nregistry = \"Index.Docker.io\"\nendpoints = []\n";
        c.merge_str(Path::new("/x.toml"), third).unwrap();
        assert!(
            c.mirrors["docker.io"].is_empty(),
            "an alias names Docker Hub"
        );
    }

    #[test]
    fn unknown_keys_name_file_line_and_key() {
        let e = error_line("cache_dir = \"/a\"\ncache_size = \"1G\"\n");
        assert!(e.starts_with("config /etc/imgfs/config.toml:2: "), "{e}");
        assert!(e.contains("cache_size"), "{e}");
        let e = error_line("[[mirrors]]\nregistry = \"docker.io\"\nendpoint = [\"http://m\"]\n");
        assert!(e.contains(":3: ") && e.contains("endpoint"), "{e}");
        let e = error_line("[mirror]\nregistry = \"x\"\n");
        assert!(e.contains(":1: ") && e.contains("mirror"), "{e}");
    }

    #[test]
    fn bad_values_name_file_line_and_key() {
        let e = error_line("\ncache_max = \"20 parsecs\"\n");
        assert!(
            e.contains(":2: key cache_max: ") && e.contains("parsecs"),
            "{e}"
        );
        let e = error_line("cache_max = true\n");
        assert!(e.contains(":1: key cache_max: "), "{e}");
        let e = error_line("insecure_registries = \"reg.lan\"\n");
        assert!(e.contains(":1: key insecure_registries: "), "{e}");
        let e = error_line("[[mirrors]]\nregistry = \"docker.io\"\nendpoints = [\"ftp://m\"]\n");
        assert!(
            e.contains(":3: key endpoints: ") && e.contains("ftp://m"),
            "{e}"
        );
        let e =
            error_line("[[mirrors]]\nregistry = \"docker.io\"\nendpoints = [\"127.0.0.1:5000\"]\n");
        assert!(e.contains(":3: key endpoints: "), "{e}");
        let e = error_line("[[mirrors]]\nregistry = \"docker.io/library\"\nendpoints = []\n");
        assert!(e.contains(":2: ") && e.contains("docker.io/library"), "{e}");
        let e = error_line("[[mirrors]]\nendpoints = []\n");
        assert!(e.contains("registry"), "{e}");
        let e = error_line("\n\ncache_dir = \"cache\"\n");
        assert!(
            e.contains(":3: key cache_dir: ") && e.contains("absolute"),
            "{e}"
        );
        let e = error_line("cache_dir = \n");
        assert!(e.contains(":1: "), "{e}");
    }

    #[test]
    fn sizes() {
        for (text, bytes) in [
            ("20GiB", 20u64 << 30),
            ("20 GiB", 20 << 30),
            ("500MB", 500_000_000),
            ("1t", 1 << 40),
            ("1.5G", 3 << 29),
            ("4096", 4096),
            ("10k", 10 << 10),
        ] {
            assert_eq!(ByteSize::parse(text), Ok(ByteSize(bytes)), "{text}");
        }
        for bad in [
            "",
            "G",
            "-1G",
            "1.2.3G",
            "20 parsecs",
            "99999999999999999999T",
        ] {
            assert!(ByteSize::parse(bad).is_err(), "{bad}");
        }
        assert_eq!(
            parse("cache_max = 1024").unwrap().cache_max,
            Some(ByteSize(1024))
        );
    }

    #[test]
    fn missing_files_are_skipped_unless_named() {
        let dir = tempfile::tempdir().unwrap();
        let mut c = Config::default();
        c.merge_file(&dir.path().join("none.toml"), false).unwrap();
        assert!(c.files.is_empty());
        let e = c
            .merge_file(&dir.path().join("none.toml"), true)
            .unwrap_err();
        assert!(e.to_string().contains("none.toml"), "{e}");
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "cache_dir = \"/x\"\n").unwrap();
        let c = Config::load(Some(&path)).unwrap();
        assert_eq!(c.cache_dir, Some(PathBuf::from("/x")));
        assert_eq!(c.files.last(), Some(&path));
    }
}
