//! `imgfs convert`: rewrite an image as eStargz or zstd:chunked and push it;
//! with `--record`, first learn which files a command reads at start.

use crate::{parse_platform, progress_target, runtime};
use anyhow::{Context, Result, bail};
use imgfs::cache::Cache;
use imgfs::convert::{self, Options, Target};
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use std::collections::HashSet;
use std::os::unix::ffi::OsStrExt;
use std::path::{Component, Path, PathBuf};
use std::process::Command;

/// Symlinks followed while resolving one recorded path (the kernel's limit).
const MAX_SYMLINK_HOPS: usize = 40;

pub(crate) struct ConvertArgs<'a> {
    pub source: &'a str,
    pub destination: &'a str,
    pub format: Target,
    pub platform: Option<&'a str>,
    pub prefetch_list: Option<&'a Path>,
    pub record: Option<&'a str>,
    pub zstd_level: i32,
    pub json: bool,
}

pub(crate) fn convert(
    args: &ConvertArgs,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
    let src: Reference = args.source.parse().context("source")?;
    let dst: Reference = args.destination.parse().context("destination")?;
    let platform = parse_platform(args.platform)?;
    let mut prefetch = match args.prefetch_list {
        Some(file) => read_list(file)?,
        None => Vec::new(),
    };
    if let Some(command) = args.record {
        prefetch.extend(record(args.source, args.platform, command, cache_dir)?);
    }
    if !prefetch.is_empty() && args.format != Target::Estargz {
        bail!("--prefetch-list and --record order files for eStargz; zstd:chunked has no landmark");
    }
    let cache = Cache::open(cache_dir)?;
    let client = Client::new(client_options)?;
    let options = Options {
        target: args.format,
        platform,
        prefetch,
        zstd_level: args.zstd_level,
    };
    let progress = progress_target();
    let report = runtime()?.block_on(convert::convert(
        &client, &cache, &src, &dst, &options, &progress,
    ))?;
    if args.json {
        println!("{}", serde_json::to_string_pretty(&report)?);
        return Ok(());
    }
    for (platform, layers) in &report.platforms {
        println!("{platform}:");
        for l in layers {
            match &l.kept {
                None => println!("  {} -> {} ({})", l.source, l.digest, args.format.name()),
                Some(why) => println!("  {} kept: {why}", l.source),
            }
        }
    }
    println!("pushed {}@{}", report.reference, report.digest);
    Ok(())
}

/// One path per line, as in the image (`/usr/bin/python3`); blank lines and
/// `#` comments skipped.
fn read_list(file: &Path) -> Result<Vec<Vec<u8>>> {
    let text = std::fs::read(file).with_context(|| format!("reading {}", file.display()))?;
    Ok(text
        .split(|&b| b == b'\n')
        .map(|line| line.trim_ascii())
        .filter(|line| !line.is_empty() && !line.starts_with(b"#"))
        .map(<[u8]>::to_vec)
        .collect())
}

/// Mounts `source`, runs `command` with `sh -c` in a chroot under strace,
/// and returns the files it opened or executed, in first-use order, with
/// the symlinks on the way resolved inside the image.
fn record(
    source: &str,
    platform: Option<&str>,
    command: &str,
    cache_dir: &Path,
) -> Result<Vec<Vec<u8>>> {
    let work = tempfile::tempdir().context("a temporary mountpoint")?;
    let mnt = work.path().join("root");
    std::fs::create_dir(&mnt)?;
    let exe = std::env::current_exe().context("finding the imgfs binary")?;
    let mut mount = Command::new(&exe);
    mount.arg("--cache-dir").arg(cache_dir).arg("mount");
    if let Some(p) = platform {
        mount.args(["--platform", p]);
    }
    let status = mount
        .args(["--prefetch", "none", source])
        .arg(&mnt)
        .status()?;
    if !status.success() {
        bail!("--record: mounting {source} failed");
    }
    let log = work.path().join("strace.log");
    let traced = Command::new("strace")
        .args(["-f", "-qq", "-e", "trace=execve,open,openat,openat2", "-o"])
        .arg(&log)
        .arg("chroot")
        .arg(&mnt)
        .args(["/bin/sh", "-c", command])
        .status();
    // Resolved while the image is still mounted: symlinks are read from it.
    let files = std::fs::read_to_string(&log).map(|text| {
        let mut seen = HashSet::new();
        opened_paths(&text)
            .iter()
            .flat_map(|path| resolve_in_root(&mnt, path))
            .filter(|path| seen.insert(path.clone()))
            .collect::<Vec<_>>()
    });
    let unmounted = Command::new(&exe).arg("umount").arg(&mnt).status();
    let traced = traced.context("--record needs strace (apt-get install strace)")?;
    if !unmounted.is_ok_and(|s| s.success()) {
        tracing::warn!("--record: unmounting {} failed", mnt.display());
    }
    if !traced.success() {
        tracing::warn!("--record: `{command}` exited with {traced}; using what it opened");
    }
    let files = files.context("reading the strace log")?;
    tracing::info!("--record: {} files opened", files.len());
    Ok(files)
}

/// Paths of successful `open*`/`execve` calls in an strace log, first use
/// first, each once. Relative paths are taken from `/` (where chroot starts).
fn opened_paths(log: &str) -> Vec<Vec<u8>> {
    let mut seen = HashSet::new();
    let mut out = Vec::new();
    for line in log.lines() {
        let succeeded = line
            .rsplit_once(" = ")
            .is_some_and(|(_, ret)| !ret.trim_start().starts_with('-'));
        let Some(start) = line.find('"') else {
            continue;
        };
        let Some(len) = line[start + 1..].find('"') else {
            continue;
        };
        if !succeeded {
            continue;
        }
        let path = &line[start + 1..start + 1 + len];
        let path = format!("/{}", path.trim_start_matches('/'));
        if seen.insert(path.clone()) {
            out.push(path.into_bytes());
        }
    }
    out
}

/// Every image path that `path` goes through when resolved inside `root`:
/// the symlinks followed and the final file.
pub(crate) fn resolve_in_root(root: &Path, path: &[u8]) -> Vec<Vec<u8>> {
    let mut touched = Vec::new();
    let mut pending: Vec<PathBuf> = vec![PathBuf::from(std::ffi::OsStr::from_bytes(path))];
    let mut current = PathBuf::new();
    let mut hops = 0;
    while let Some(next) = pending.pop() {
        for component in next.components() {
            match component {
                Component::RootDir => current = PathBuf::new(),
                Component::ParentDir => {
                    current.pop();
                }
                Component::Normal(name) => {
                    current.push(name);
                    let on_disk = root.join(&current);
                    if let Ok(target) = std::fs::read_link(&on_disk) {
                        hops += 1;
                        if hops > MAX_SYMLINK_HOPS {
                            return touched;
                        }
                        touched.push(current.as_os_str().as_bytes().to_vec());
                        current.pop();
                        // The rest of this path comes after the link's target.
                        let rest: PathBuf = next
                            .components()
                            .skip_while(|c| *c != component)
                            .skip(1)
                            .collect();
                        pending.push(rest);
                        pending.push(target);
                        break;
                    }
                }
                Component::CurDir | Component::Prefix(_) => {}
            }
        }
    }
    touched.push(current.as_os_str().as_bytes().to_vec());
    touched
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn strace_lines_give_successful_paths_once() {
        let log = r#"12 execve("/bin/sh", ["/bin/sh", "-c", "true"], 0x7ff /* 3 vars */) = 0
12 openat(AT_FDCWD, "/etc/ld.so.cache", O_RDONLY|O_CLOEXEC) = -1 ENOENT (No such file or directory)
12 openat(AT_FDCWD, "lib/x.so", O_RDONLY|O_CLOEXEC) = 3
12 openat(AT_FDCWD, "/lib/x.so", O_RDONLY|O_CLOEXEC) = 3
12 +++ exited with 0 +++"#;
        let paths: Vec<String> = opened_paths(log)
            .into_iter()
            .map(|p| String::from_utf8(p).expect("utf8"))
            .collect();
        assert_eq!(paths, ["/bin/sh", "/lib/x.so"]);
    }

    #[test]
    fn symlinks_resolve_inside_the_root() {
        let dir = tempfile::tempdir().expect("tmp");
        let root = dir.path();
        std::fs::create_dir_all(root.join("usr/bin")).expect("mkdir");
        std::fs::write(root.join("usr/bin/busybox"), b"x").expect("write");
        std::os::unix::fs::symlink("usr/bin", root.join("bin")).expect("link");
        std::os::unix::fs::symlink("/usr/bin/busybox", root.join("usr/bin/sh")).expect("link");
        std::os::unix::fs::symlink("../../../../etc/passwd", root.join("escape")).expect("link");
        let got: Vec<String> = resolve_in_root(root, b"/bin/sh")
            .into_iter()
            .map(|p| String::from_utf8(p).expect("utf8"))
            .collect();
        assert_eq!(got, ["bin", "usr/bin/sh", "usr/bin/busybox"]);
        let got = resolve_in_root(root, b"/escape");
        assert_eq!(got.last().map(Vec::as_slice), Some(&b"etc/passwd"[..]));
    }
}
