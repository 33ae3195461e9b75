//! The on-disk cache, shared by every imgfs process of the machine.
//!
//! Layout under the root (content-addressed by layer digest, so an image that
//! shares a layer with another shares its index and its fetched bytes):
//!
//! ```text
//! indexes/<hex>   encoded layer::Index (written once, atomically)
//! blobs/<hex>     sparse file: verified blocks of the blob at their own offsets
//! spill/<hex>     decompressed tar stream of a single-frame zstd layer
//! locks/<hex>     flock held while a layer is being indexed
//! locks/<hex>-fetch.<n>  flock held while fetching stripe n of a blob
//! images/<hex>.json      image records (see `store`)
//! tmp/            staging for atomic writes
//! ```
//!
//! Only verified bytes are written; readers verify again on first use, so a
//! torn or tampered file costs a refetch, never a wrong byte.

use crate::digest::Digest;
use crate::layer::{Index, LayerError};
use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};

const INDEXES: &str = "indexes";
const BLOBS: &str = "blobs";
const SPILL: &str = "spill";
const LOCKS: &str = "locks";
const TMP: &str = "tmp";
const FILES: &str = "files";
/// The system-wide cache when running as root.
const SYSTEM_ROOT: &str = "/var/cache/imgfs";

#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    #[error("cache {path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("cache {path}: {source}")]
    Index {
        path: PathBuf,
        #[source]
        source: LayerError,
    },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_path_buf(),
        source,
    }
}

#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

impl Cache {
    /// Opens (creating if needed) the cache at `root`.
    pub fn open(root: impl Into<PathBuf>) -> Result<Cache, CacheError> {
        let root = root.into();
        for sub in [INDEXES, BLOBS, SPILL, LOCKS, TMP] {
            let dir = root.join(sub);
            fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        }
        Ok(Cache { root })
    }

    /// `/var/cache/imgfs` as root, `$XDG_CACHE_HOME/imgfs` (or
    /// `~/.cache/imgfs`) otherwise.
    pub fn default_root() -> PathBuf {
        per_user_dir(SYSTEM_ROOT, "XDG_CACHE_HOME", ".cache")
    }

    pub fn root(&self) -> &Path {
        &self.root
    }

    pub fn index_path(&self, layer: &Digest) -> PathBuf {
        self.root.join(INDEXES).join(layer.hex())
    }

    pub fn blob_path(&self, layer: &Digest) -> PathBuf {
        self.root.join(BLOBS).join(layer.hex())
    }

    /// Where image files read whole are kept as plain files (`materialize`).
    pub fn files_root(&self) -> PathBuf {
        self.root.join(FILES)
    }

    pub fn spill_path(&self, layer: &Digest) -> PathBuf {
        self.root.join(SPILL).join(layer.hex())
    }

    /// Prefix of the lock files that keep processes from fetching the same
    /// blocks of `layer` at once (see [`crate::source::BlockSource`]).
    pub fn fetch_lock_prefix(&self, layer: &Digest) -> PathBuf {
        self.root.join(LOCKS).join(format!("{}-fetch", layer.hex()))
    }

    /// The persisted index of `layer`, if there is a readable one of this
    /// version. A stale or damaged one is reported and treated as absent, so
    /// it gets rebuilt.
    pub fn load_index(&self, layer: &Digest) -> Result<Option<Index>, CacheError> {
        let path = self.index_path(layer);
        let bytes = match fs::read(&path) {
            Ok(bytes) => bytes,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        };
        match Index::decode(&bytes) {
            Ok(index) if index.layer_digest == *layer => Ok(Some(index)),
            Ok(index) => {
                tracing::warn!(path = %path.display(), found = %index.layer_digest, "index names another layer; rebuilding");
                Ok(None)
            }
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "unreadable index; rebuilding");
                Ok(None)
            }
        }
    }

    pub fn store_index(&self, index: &Index) -> Result<(), CacheError> {
        let path = self.index_path(&index.layer_digest);
        let bytes = index.encode().map_err(|source| CacheError::Index {
            path: path.clone(),
            source,
        })?;
        self.write_atomic(&path, &bytes)
    }

    /// Writes `bytes` to `path` so that readers see all of it or nothing.
    pub fn write_atomic(&self, path: &Path, bytes: &[u8]) -> Result<(), CacheError> {
        let mut staged = self.staging()?;
        staged.write_all(bytes).map_err(io_err(path))?;
        staged.commit(path)
    }

    /// A file in `tmp/` that becomes visible under its final name only when
    /// committed; dropped uncommitted, it disappears.
    pub fn staging(&self) -> Result<Staged, CacheError> {
        let dir = self.root.join(TMP);
        let file = tempfile::NamedTempFile::new_in(&dir).map_err(io_err(&dir))?;
        Ok(Staged { file })
    }

    /// Holds an exclusive lock on `layer` until dropped: two processes
    /// mounting the same new layer index it once.
    pub fn lock_layer(&self, layer: &Digest) -> Result<LayerLock, CacheError> {
        let path = self.root.join(LOCKS).join(layer.hex());
        let file = OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?;
        rustix::fs::flock(&file, rustix::fs::FlockOperation::LockExclusive)
            .map_err(|e| io_err(&path)(e.into()))?;
        Ok(LayerLock { _file: file })
    }
}

/// `system` as root; otherwise `$XDG_VAR/imgfs`, or `~/HOME_RELATIVE/imgfs`
/// when the variable is unset (the XDG base directory rules).
pub fn per_user_dir(system: &str, xdg_var: &str, home_relative: &str) -> PathBuf {
    if rustix::process::geteuid().is_root() {
        return PathBuf::from(system);
    }
    std::env::var_os(xdg_var)
        .filter(|v| !v.is_empty())
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(home_relative)))
        .unwrap_or_else(std::env::temp_dir)
        .join("imgfs")
}

/// A staged cache file (see [`Cache::staging`]).
pub struct Staged {
    file: tempfile::NamedTempFile,
}

impl Staged {
    pub fn file(&mut self) -> &mut File {
        self.file.as_file_mut()
    }

    /// fsyncs and renames into place.
    pub fn commit(self, path: &Path) -> Result<(), CacheError> {
        self.file.as_file().sync_all().map_err(io_err(path))?;
        self.file.persist(path).map_err(|e| io_err(path)(e.error))?;
        Ok(())
    }
}

impl Write for Staged {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.file.write(buf)
    }
    fn flush(&mut self) -> io::Result<()> {
        self.file.flush()
    }
}

/// See [`Cache::lock_layer`]; the flock goes with the file.
pub struct LayerLock {
    _file: File,
}
