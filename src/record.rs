//! Records of live mounts, so that later commands (`imgfs diff MNT`) know
//! which image and which upper directory a mountpoint shows without asking
//! the mount process. One small JSON file per mountpoint under the state
//! directory, written when the mount is live and removed when it ends.
//! [`MountRecord::live`] lists them, dropping the records of mounts that
//! died without cleaning up (process gone or mountpoint not mounted).

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::path::{Path, PathBuf};

const MOUNTS: &str = "mounts";

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MountRecord {
    pub mountpoint: PathBuf,
    pub reference: String,
    pub manifest_digest: Digest,
    /// Layer digests, bottom to top; their indexes are in `cache_dir`.
    pub layers: Vec<Digest>,
    pub cache_dir: PathBuf,
    /// `None` for a read-only mount.
    pub upper: Option<PathBuf>,
    pub pid: u32,
    /// Where the background mount process logs (absent in the foreground).
    #[serde(default)]
    pub log: Option<PathBuf>,
    /// Bytes fetched from registries so far; the mount rewrites its record
    /// every few seconds while this grows.
    #[serde(default)]
    pub fetched_bytes: u64,
}

#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error("{}: no imgfs mount is recorded there (is it mounted by imgfs?)", .0.display())]
    NotFound(PathBuf),
    #[error("mount record {}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("mount record {}: {source}", path.display())]
    Json {
        path: PathBuf,
        #[source]
        source: serde_json::Error,
    },
}

/// The record file for `mountpoint` (canonical path) under `state_dir`.
fn record_path(state_dir: &Path, mountpoint: &Path) -> PathBuf {
    let key = Digest::of(mountpoint.as_os_str().as_encoded_bytes()).hex();
    state_dir.join(MOUNTS).join(format!("{}.json", &key[..32]))
}

impl MountRecord {
    /// Writes the record; returns its path (to remove it at unmount).
    pub fn save(&self, state_dir: &Path) -> Result<PathBuf, RecordError> {
        let path = record_path(state_dir, &self.mountpoint);
        let io = |source| RecordError::Io {
            path: path.clone(),
            source,
        };
        if let Some(dir) = path.parent() {
            std::fs::create_dir_all(dir).map_err(io)?;
        }
        let json = serde_json::to_vec_pretty(self).map_err(|source| RecordError::Json {
            path: path.clone(),
            source,
        })?;
        let staged = path.with_extension("tmp");
        std::fs::write(&staged, json).map_err(io)?;
        std::fs::rename(&staged, &path).map_err(io)?;
        Ok(path)
    }

    /// Removes the record (the mount ended), unless it is no longer this
    /// mount's: after a lazy unmount the path may be mounted again while
    /// this mount serves its last open files.
    pub fn remove(&self, state_dir: &Path) {
        if self.is_current(state_dir) {
            let _ = std::fs::remove_file(record_path(state_dir, &self.mountpoint));
        }
    }

    /// Rewrites the record (new statistics) while it is still this mount's:
    /// not once `live` dropped it (lazily unmounted) or another mount of
    /// the same path replaced it.
    pub fn refresh(&self, state_dir: &Path) -> Result<(), RecordError> {
        if self.is_current(state_dir) {
            self.save(state_dir)?;
        }
        Ok(())
    }

    /// Whether the record stored for this mountpoint is this process's.
    fn is_current(&self, state_dir: &Path) -> bool {
        std::fs::read(record_path(state_dir, &self.mountpoint))
            .ok()
            .and_then(|b| serde_json::from_slice::<MountRecord>(&b).ok())
            .is_some_and(|stored| stored.pid == self.pid)
    }

    /// The record of the mount at `mountpoint`.
    pub fn load(state_dir: &Path, mountpoint: &Path) -> Result<MountRecord, RecordError> {
        let canonical = mountpoint
            .canonicalize()
            .map_err(|_| RecordError::NotFound(mountpoint.to_path_buf()))?;
        let path = record_path(state_dir, &canonical);
        let bytes = match std::fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
                return Err(RecordError::NotFound(mountpoint.to_path_buf()));
            }
            Err(source) => return Err(RecordError::Io { path, source }),
        };
        serde_json::from_slice(&bytes).map_err(|source| RecordError::Json { path, source })
    }
}

impl MountRecord {
    /// Every live mount recorded under `state_dir`, by mountpoint. Records
    /// of dead mounts are removed (best effort: another user's may stay).
    pub fn live(state_dir: &Path) -> Vec<MountRecord> {
        let Ok(entries) = std::fs::read_dir(state_dir.join(MOUNTS)) else {
            return Vec::new();
        };
        let mounted = mounted_paths();
        let mut out = Vec::new();
        for entry in entries.flatten() {
            let path = entry.path();
            if path.extension().is_none_or(|e| e != "json") {
                continue;
            }
            let record: Option<MountRecord> = std::fs::read(&path)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok());
            match record {
                Some(r) if r.is_alive(&mounted) => out.push(r),
                _ => {
                    let _ = std::fs::remove_file(&path);
                }
            }
        }
        out.sort_by(|a, b| a.mountpoint.cmp(&b.mountpoint));
        out
    }

    fn is_alive(&self, mounted: &HashSet<PathBuf>) -> bool {
        let pid = rustix::process::Pid::from_raw(self.pid as i32);
        let running = pid.is_some_and(|pid| match rustix::process::test_kill_process(pid) {
            Ok(()) => true,
            // Alive, owned by someone else.
            Err(e) => e == rustix::io::Errno::PERM,
        });
        running && mounted.contains(&self.mountpoint)
    }
}

/// Mount points of this mount namespace, from /proc/self/mountinfo.
fn mounted_paths() -> HashSet<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    text.lines()
        .filter_map(|line| line.split(' ').nth(MOUNTINFO_MOUNT_POINT))
        .map(|field| PathBuf::from(unescape_octal(field)))
        .collect()
}

/// Field of a mountinfo line that holds the mount point.
const MOUNTINFO_MOUNT_POINT: usize = 4;

/// Undoes the kernel's `\040`-style escaping of spaces, tabs, newlines and
/// backslashes in mountinfo paths.
fn unescape_octal(field: &str) -> String {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let code = bytes
            .get(i + 1..i + 4)
            .filter(|_| bytes[i] == b'\\')
            .and_then(|d| std::str::from_utf8(d).ok())
            .and_then(|d| u8::from_str_radix(d, 8).ok());
        match code {
            Some(c) => {
                out.push(c);
                i += 4;
            }
            None => {
                out.push(bytes[i]);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mountinfo_paths_are_unescaped() {
        assert_eq!(unescape_octal("/mnt/a\\040b"), "/mnt/a b");
        assert_eq!(unescape_octal("/plain"), "/plain");
        assert_eq!(unescape_octal("/x\\"), "/x\\");
    }

    #[test]
    fn records_of_dead_mounts_are_dropped() {
        let state = tempfile::tempdir().expect("tempdir");
        let record = MountRecord {
            mountpoint: PathBuf::from("/"),
            reference: "r".into(),
            manifest_digest: Digest::of(b"m"),
            layers: vec![],
            cache_dir: PathBuf::from("/c"),
            upper: None,
            // pid_max is at most 2^22: this pid cannot exist.
            pid: u32::MAX >> 1,
            log: None,
            fetched_bytes: 0,
        };
        let path = record.save(state.path()).expect("save");
        assert!(MountRecord::live(state.path()).is_empty());
        assert!(!path.exists());
        let alive = MountRecord {
            pid: std::process::id(),
            ..record
        };
        alive.save(state.path()).expect("save");
        assert_eq!(MountRecord::live(state.path()).len(), 1);
    }

    #[test]
    fn a_mount_leaves_the_record_of_a_later_mount_on_its_path_alone() {
        let state = tempfile::tempdir().expect("tempdir");
        let old = MountRecord {
            mountpoint: PathBuf::from("/mnt/x"),
            reference: "r".into(),
            manifest_digest: Digest::of(b"m"),
            layers: vec![],
            cache_dir: PathBuf::from("/c"),
            upper: None,
            pid: 100,
            log: None,
            fetched_bytes: 0,
        };
        let path = old.save(state.path()).expect("save");
        let new = MountRecord {
            pid: 200,
            ..old.clone()
        };
        new.save(state.path()).expect("save");
        let stale = MountRecord {
            fetched_bytes: 5,
            ..old.clone()
        };
        stale.refresh(state.path()).expect("refresh");
        old.remove(state.path());
        let stored: MountRecord =
            serde_json::from_slice(&std::fs::read(&path).expect("record kept")).expect("json");
        assert_eq!((stored.pid, stored.fetched_bytes), (200, 0));
        new.remove(state.path());
        assert!(!path.exists());
        new.refresh(state.path()).expect("refresh");
        assert!(!path.exists(), "refresh recreated a dropped record");
    }
}
