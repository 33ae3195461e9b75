//! `mount.imgfs`: lets `mount -t imgfs REF DIR -o opts` and fstab lines run
//! `imgfs mount`. mount(8) calls helpers as `mount.TYPE SOURCE DIR [-sfnv]
//! [-o OPTIONS]`; each imgfs option maps one to one onto a flag, generic
//! mount options (rw, defaults, noauto, user, _netdev...) are accepted
//! and ignored since they do not change an imgfs mount, and anything else is
//! refused so that a typo never mounts something other than what was asked.
//! Install it as /sbin/mount.imgfs next to `imgfs` in $PATH.

use std::ffi::OsString;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Command, ExitCode};

/// mount(8)'s documented exit status for "mount failure".
const MOUNT_FAILURE: u8 = 32;
/// Options mount(8) passes that mean nothing for imgfs.
const IGNORED: &[&str] = &[
    "rw", "defaults", "auto", "noauto", "user", "nouser", "users", "_netdev", "nofail", "relatime",
    "noatime", "dev", "nodev", "suid", "nosuid", "exec", "noexec",
];

fn main() -> ExitCode {
    match run() {
        Ok(never) => match never {},
        Err(message) => {
            eprintln!("mount.imgfs: {message}");
            ExitCode::from(MOUNT_FAILURE)
        }
    }
}

enum Never {}

fn run() -> Result<Never, String> {
    let mut positional: Vec<OsString> = Vec::new();
    let mut flags: Vec<OsString> = Vec::new();
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        match arg.to_str() {
            Some("-o") => {
                let opts = args.next().ok_or("-o needs a value")?;
                let opts = opts.to_str().ok_or("options must be UTF-8")?;
                for opt in opts.split(',').filter(|o| !o.is_empty()) {
                    flags.extend(map_option(opt)?);
                }
            }
            Some("-f") => flags.push("--foreground".into()),
            Some("-v") => flags.push("-v".into()),
            Some("-s" | "-n") => {}
            _ => positional.push(arg),
        }
    }
    let [source, target] = <[OsString; 2]>::try_from(positional)
        .map_err(|_| "usage: mount.imgfs REFERENCE MOUNTPOINT [-o options]".to_string())?;
    let error = Command::new(imgfs_binary())
        .arg("mount")
        .arg(source)
        .arg(target)
        .args(flags)
        .exec();
    Err(format!("running imgfs: {error}"))
}

fn map_option(opt: &str) -> Result<Vec<OsString>, String> {
    if IGNORED.contains(&opt) {
        return Ok(vec![]);
    }
    if opt == "ro" {
        return Ok(vec!["--read-only".into()]);
    }
    if opt == "raw_layout" || opt == "raw-layout" {
        return Ok(vec!["--raw-layout".into()]);
    }
    let (key, value) = opt
        .split_once('=')
        .ok_or_else(|| format!("unknown option {opt:?}"))?;
    let flag = match key {
        "platform" => "--platform",
        "cache" | "cache_dir" => "--cache-dir",
        "insecure-registry" | "insecure_registry" => "--insecure-registry",
        "threads" => "--threads",
        "upper" => "--upper",
        "read-timeout" | "read_timeout" => "--read-timeout",
        "cache-max" | "cache_max" => "--cache-max",
        "prefetch" => "--prefetch",
        "prefetch-rate" | "prefetch_rate" => "--prefetch-rate",
        _ => return Err(format!("unknown option {opt:?}")),
    };
    Ok(vec![flag.into(), value.into()])
}

/// `imgfs` beside this helper if it is there, else from $PATH.
fn imgfs_binary() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|me| Some(me.parent()?.join("imgfs")))
        .filter(|p| p.is_file())
        .unwrap_or_else(|| PathBuf::from("imgfs"))
}

#[cfg(test)]
mod tests {
    use super::map_option;

    #[test]
    fn options_map_one_to_one() {
        assert_eq!(map_option("rw").unwrap(), Vec::<std::ffi::OsString>::new());
        assert_eq!(
            map_option("ro").unwrap(),
            vec![std::ffi::OsString::from("--read-only")]
        );
        assert_eq!(
            map_option("platform=linux/arm64").unwrap(),
            vec!["--platform".into(), "linux/arm64".into()] as Vec<std::ffi::OsString>
        );
        for (opt, flag, value) in [
            ("cache_max=10G", "--cache-max", "10G"),
            ("cache-max=512M", "--cache-max", "512M"),
            ("prefetch=all", "--prefetch", "all"),
            ("prefetch_rate=2MiB/s", "--prefetch-rate", "2MiB/s"),
            ("prefetch-rate=0", "--prefetch-rate", "0"),
        ] {
            assert_eq!(
                map_option(opt).unwrap(),
                vec![flag.into(), value.into()] as Vec<std::ffi::OsString>,
                "{opt}"
            );
        }
        for opt in ["raw_layout", "raw-layout"] {
            assert_eq!(
                map_option(opt).unwrap(),
                vec![std::ffi::OsString::from("--raw-layout")]
            );
        }
        assert!(map_option("prefetch").is_err(), "a value is required");
        assert!(map_option("bogus").is_err());
        assert!(map_option("bogus=1").is_err());
    }
}
