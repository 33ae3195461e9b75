//! Platforms (`linux/arm64/v8`) and choosing one from an index the way
//! docker/containerd do: names are normalized (`aarch64` → `arm64` with
//! variant `v8`, `armhf` → `arm/v7`, `x86_64` → `amd64`, `i386` → `386`),
//! older ARM variants run on newer ones (`arm/v7` also takes `v6`, `v5`, best
//! first), and for Windows the entry matching the host build wins, else the
//! highest `os.version`.

use super::ImageError;
use serde::Serialize;
use std::cmp::Ordering;
use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize)]
pub struct Platform {
    pub os: String,
    pub architecture: String,
    pub variant: Option<String>,
    /// Windows build (`10.0.17763.1234`).
    pub os_version: Option<String>,
}

/// ARM generations a 32-bit ARM host of a given variant runs, best first.
const ARM_VARIANTS: &[&str] = &["v8", "v7", "v6", "v5"];

impl Platform {
    /// `os/arch[/variant]`, normalized (`linux/aarch64` → `linux/arm64/v8`).
    pub fn parse(s: &str) -> Result<Platform, ImageError> {
        let invalid = |reason: &str| ImageError::InvalidPlatform {
            input: s.to_string(),
            reason: reason.to_string(),
        };
        let parts: Vec<&str> = s.trim().split('/').collect();
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => {
                return Err(invalid(
                    "expected os/arch or os/arch/variant, e.g. linux/arm64 or linux/arm/v7",
                ));
            }
        };
        let ok = |p: &str| {
            !p.is_empty()
                && p.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
        };
        if !ok(os) || !ok(arch) || variant.is_some_and(|v| !ok(v)) {
            return Err(invalid(
                "each part must be a non-empty word of letters, digits, '.', '_' or '-'",
            ));
        }
        let raw = Platform {
            os: os.to_string(),
            architecture: arch.to_string(),
            variant: variant.map(str::to_string),
            os_version: None,
        };
        Ok(raw.normalized())
    }

    /// The platform this process runs on.
    pub fn host() -> Platform {
        let arch = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" if cfg!(target_endian = "little") => "ppc64le",
            "loongarch64" => "loong64",
            "mips64" if cfg!(target_endian = "little") => "mips64le",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: arch.to_string(),
            variant: None,
            os_version: None,
        }
        .normalized()
    }

    /// containerd's normalization, so that spellings compare equal.
    pub fn normalized(&self) -> Platform {
        let os = match self.os.to_ascii_lowercase().as_str() {
            "macos" => "darwin".to_string(),
            other => other.to_string(),
        };
        let variant = self
            .variant
            .as_deref()
            .map(str::to_ascii_lowercase)
            .filter(|v| !v.is_empty());
        let (architecture, variant) = match (
            self.architecture.to_ascii_lowercase().as_str(),
            variant.as_deref(),
        ) {
            ("x86_64" | "x86-64" | "amd64", v) => {
                ("amd64", v.filter(|v| *v != "v1").map(str::to_string))
            }
            ("i386" | "i686" | "386", _) => ("386", None),
            ("aarch64" | "arm64", None | Some("8" | "v8" | "v8.0")) => {
                ("arm64", Some("v8".to_string()))
            }
            ("aarch64" | "arm64", Some("9" | "v9" | "9.0" | "v9.0")) => {
                ("arm64", Some("v9".to_string()))
            }
            ("aarch64" | "arm64", Some(v)) => ("arm64", Some(v.to_string())),
            ("armhf", _) => ("arm", Some("v7".to_string())),
            ("armel", _) => ("arm", Some("v6".to_string())),
            ("arm", None | Some("7")) => ("arm", Some("v7".to_string())),
            ("arm", Some(v @ ("5" | "6" | "8"))) => ("arm", Some(format!("v{v}"))),
            (arch, v) => {
                return Platform {
                    os,
                    architecture: arch.to_string(),
                    variant: v.map(str::to_string),
                    os_version: self.os_version.clone(),
                };
            }
        };
        Platform {
            os,
            architecture: architecture.to_string(),
            variant,
            os_version: self.os_version.clone(),
        }
    }

    /// Build attestations and other non-images are published as `unknown/unknown`.
    pub fn is_unknown(&self) -> bool {
        self.os == "unknown" && self.architecture == "unknown"
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(variant) = &self.variant {
            write!(f, "/{variant}")?;
        }
        Ok(())
    }
}

/// How well a candidate runs on `wanted` (both normalized): `None` when it
/// does not, else lower is better.
fn rank(wanted: &Platform, candidate: &Platform) -> Option<usize> {
    if wanted.os != candidate.os || wanted.architecture != candidate.architecture {
        return None;
    }
    let (want, have) = (wanted.variant.as_deref(), candidate.variant.as_deref());
    match wanted.architecture.as_str() {
        "arm" => {
            let from = ARM_VARIANTS.iter().position(|v| Some(*v) == want)?;
            ARM_VARIANTS[from..].iter().position(|v| Some(*v) == have)
        }
        "arm64" if want == Some("v9") => ["v9", "v8"].iter().position(|v| Some(*v) == have),
        _ => (want == have).then_some(0),
    }
}

/// Numeric comparison of dotted versions (`10.0.20348.2` > `10.0.17763.9`).
fn compare_versions(a: &str, b: &str) -> Ordering {
    let parse = |s: &str| {
        s.split('.')
            .map(|p| p.parse::<u64>().unwrap_or(0))
            .collect::<Vec<_>>()
    };
    parse(a).cmp(&parse(b))
}

/// Build number prefix (`10.0.17763`) that must match for Windows process isolation.
fn windows_build(version: &str) -> String {
    version.split('.').take(3).collect::<Vec<_>>().join(".")
}

/// Picks the best of `candidates` (platform, payload) for `wanted`.
/// Ties keep index order, except Windows, where the host's build and then
/// the highest version win.
pub fn choose<'a, T>(
    wanted: &Platform,
    candidates: &'a [(Platform, T)],
) -> Option<&'a (Platform, T)> {
    let wanted = wanted.normalized();
    let mut ranked: Vec<(usize, usize, &(Platform, T))> = candidates
        .iter()
        .enumerate()
        .filter_map(|(i, c)| rank(&wanted, &c.0.normalized()).map(|r| (r, i, c)))
        .collect();
    ranked.sort_by(|a, b| {
        a.0.cmp(&b.0).then_with(|| {
            if wanted.os != "windows" {
                return a.1.cmp(&b.1);
            }
            let host_build = wanted.os_version.as_deref().map(windows_build);
            let matches_host = |p: &Platform| {
                host_build.is_some() && p.os_version.as_deref().map(windows_build) == host_build
            };
            let (va, vb) = (
                a.2.0.os_version.as_deref().unwrap_or(""),
                b.2.0.os_version.as_deref().unwrap_or(""),
            );
            matches_host(&b.2.0)
                .cmp(&matches_host(&a.2.0))
                .then_with(|| compare_versions(vb, va))
                .then_with(|| a.1.cmp(&b.1))
        })
    });
    ranked.first().map(|(_, _, c)| *c)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Platform {
        let mut parts = s.splitn(2, '@');
        let plat = parts.next().unwrap_or_default();
        let mut out = Platform::parse(plat).unwrap_or_else(|e| panic!("{e}"));
        // Candidates keep their raw spelling; only parse() normalizes.
        let raw: Vec<&str> = plat.split('/').collect();
        out.architecture = raw[1].to_string();
        out.variant = raw.get(2).map(|v| v.to_string());
        out.os_version = parts.next().map(str::to_string);
        out
    }

    #[test]
    fn parse_normalizes() {
        let cases = [
            ("linux/amd64", "linux/amd64"),
            ("linux/x86_64", "linux/amd64"),
            ("linux/x86-64", "linux/amd64"),
            ("Linux/AMD64", "linux/amd64"),
            ("linux/aarch64", "linux/arm64/v8"),
            ("linux/arm64", "linux/arm64/v8"),
            ("linux/arm64/8", "linux/arm64/v8"),
            ("linux/armhf", "linux/arm/v7"),
            ("linux/arm", "linux/arm/v7"),
            ("linux/arm/6", "linux/arm/v6"),
            ("linux/i386", "linux/386"),
            ("linux/riscv64", "linux/riscv64"),
            ("windows/amd64", "windows/amd64"),
        ];
        for (input, want) in cases {
            assert_eq!(Platform::parse(input).unwrap().to_string(), want, "{input}");
        }
        for bad in ["linux", "", "linux/", "/amd64", "a/b/c/d", "linux/am d64"] {
            let e = Platform::parse(bad).unwrap_err().to_string();
            assert!(e.contains(&format!("{bad:?}")), "{e}");
        }
        let host = Platform::host();
        assert!(!host.os.is_empty() && !host.architecture.is_empty());
        if cfg!(all(target_os = "linux", target_arch = "x86_64")) {
            assert_eq!(host.to_string(), "linux/amd64");
        }
    }

    #[test]
    fn matching_table() {
        let index: Vec<(Platform, &str)> = vec![
            (p("linux/amd64"), "amd64"),
            (p("linux/arm/v5"), "armv5"),
            (p("linux/arm/v6"), "armv6"),
            (p("linux/arm64/v8"), "arm64"),
            (p("linux/386"), "386"),
            (p("unknown/unknown"), "attestation"),
        ];
        let only_v6: Vec<(Platform, &str)> =
            vec![(p("linux/arm/v6"), "armv6"), (p("linux/arm/v7"), "armv7")];
        let bare_arm64: Vec<(Platform, &str)> = vec![(p("linux/arm64"), "arm64-bare")];
        type Case<'a> = (&'a str, &'a [(Platform, &'a str)], Option<&'a str>);
        let cases: &[Case] = &[
            ("linux/amd64", &index, Some("amd64")),
            ("linux/x86_64", &index, Some("amd64")),
            ("linux/aarch64", &index, Some("arm64")),
            ("linux/arm64", &bare_arm64, Some("arm64-bare")),
            ("linux/arm/v7", &index, Some("armv6")),
            ("linux/arm/v7", &only_v6, Some("armv7")),
            ("linux/arm/v6", &only_v6, Some("armv6")),
            ("linux/arm/v5", &only_v6, None),
            ("linux/armhf", &index, Some("armv6")),
            ("linux/i386", &index, Some("386")),
            ("linux/s390x", &index, None),
            ("windows/amd64", &index, None),
            ("linux/arm64/v9", &index, Some("arm64")),
        ];
        for (wanted, candidates, expect) in cases {
            let got = choose(&Platform::parse(wanted).unwrap(), candidates).map(|c| c.1);
            assert_eq!(got, *expect, "wanted {wanted}");
        }
    }

    #[test]
    fn windows_prefers_host_build_then_highest() {
        let index: Vec<(Platform, &str)> = vec![
            (p("windows/amd64@10.0.17763.5122"), "1809"),
            (p("windows/amd64@10.0.20348.2113"), "ltsc2022"),
            (p("windows/amd64@10.0.14393.6452"), "1607"),
            (p("linux/amd64"), "linux"),
        ];
        let mut wanted = Platform::parse("windows/amd64").unwrap();
        assert_eq!(choose(&wanted, &index).map(|c| c.1), Some("ltsc2022"));
        wanted.os_version = Some("10.0.17763.1".into());
        assert_eq!(choose(&wanted, &index).map(|c| c.1), Some("1809"));
        assert_eq!(compare_versions("10.0.9", "10.0.10"), Ordering::Less);
    }
}
