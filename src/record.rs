//! Records of live mounts, so that later commands (`imgfs diff MNT`) know
//! which image and which upper directory a mountpoint shows without asking
//! the mount process. One small JSON file per mountpoint under the state
//! directory, written when the mount is live and removed when it ends.

use crate::digest::Digest;
use serde::{Deserialize, Serialize};
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
