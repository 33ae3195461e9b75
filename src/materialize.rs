//! Image files kept whole, as plain files in the cache, so that the kernel
//! can serve them itself (FUSE passthrough) like any local file.
//!
//! A file becomes a candidate once reads have served as many bytes of it as
//! it has (a `cat`, a copy, a program loaded twice): a background worker
//! then reads it once more through its layer reader — every byte verified
//! against the layer's digests, from the block cache when it is there — into
//! a temporary file, syncs it and renames it into place under
//! `files/<layer>/<stream offset>-<size>`. Only then is it used, so a file in
//! that directory holds verified bytes or is absent (the cache's rule for
//! everything it keeps). Later opens of the file, in this mount or any other
//! of an image with the layer, read it straight from disk.

use crate::digest::Digest;
use crate::layer::{FileData, LayerReader};
use std::collections::HashMap;
use std::fs::File;
use std::hash::{BuildHasher, RandomState};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, SyncSender};
use std::sync::{Arc, Mutex};

/// Largest file kept whole (bigger ones stay in blocks).
pub const MAX_FILE: u64 = 4 << 30;
/// Smallest file worth it: below a page the daemon's answer is as fast.
pub const MIN_FILE: u64 = 4096;
/// Files waiting to be written; more are dropped (they come back later).
const QUEUE: usize = 64;
/// Bytes read per request while writing one out.
const PIECE: usize = 1 << 20;
/// Locks the served-bytes counts are spread over: every read of a file
/// worth keeping counts, from all FUSE threads, so one lock would be a
/// point they all meet at.
const SHARDS: usize = 32;

/// Names one image file: its layer and where its data lies in the layer.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Key {
    pub layer: Digest,
    pub offset: u64,
    pub size: u64,
}

impl Key {
    /// The key of a regular file's data; `None` for sparse files and sizes
    /// not worth keeping.
    pub fn of(layer: Digest, size: u64, data: &FileData) -> Option<Key> {
        match data {
            FileData::Contiguous { offset } if (MIN_FILE..=MAX_FILE).contains(&size) => Some(Key {
                layer,
                offset: *offset,
                size,
            }),
            _ => None,
        }
    }
}

struct Job {
    key: Key,
    data: FileData,
    reader: Arc<LayerReader>,
}

/// See the module doc.
pub struct Materializer {
    root: PathBuf,
    /// Bytes served per file by reads in this mount, until the file is
    /// queued (so the maps hold only files being read now), sharded by key.
    served: [Mutex<HashMap<Key, u64>>; SHARDS],
    shard_of: RandomState,
    jobs: SyncSender<Job>,
    written: Arc<AtomicU64>,
}

impl Materializer {
    /// Keeps files under `root` (`CACHE/files`), with one worker thread.
    pub fn start(root: PathBuf) -> std::io::Result<Materializer> {
        std::fs::create_dir_all(&root)?;
        let (jobs, queue) = mpsc::sync_channel::<Job>(QUEUE);
        let written = Arc::new(AtomicU64::new(0));
        let (dir, count) = (root.clone(), written.clone());
        std::thread::Builder::new()
            .name("imgfs-materialize".into())
            .spawn(move || {
                for job in queue {
                    match write_out(&dir, &job) {
                        Ok(()) => {
                            count.fetch_add(job.key.size, Ordering::Relaxed);
                        }
                        Err(e) => tracing::debug!(error = %e, "keeping a file whole failed"),
                    }
                }
            })?;
        Ok(Materializer {
            root,
            served: std::array::from_fn(|_| Mutex::default()),
            shard_of: RandomState::new(),
            jobs,
            written,
        })
    }

    /// Bytes of files written out so far by this mount.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// The file kept whole for `key`, if there is one.
    pub fn open(&self, key: &Key) -> Option<File> {
        let file = File::open(path(&self.root, key)).ok()?;
        let complete = file.metadata().is_ok_and(|m| m.len() == key.size);
        complete.then_some(file)
    }

    /// Counts `bytes` served of the file; when the count reaches its size,
    /// queues it to be written out (unless it is kept already).
    pub fn served(&self, key: Key, bytes: u64, data: &FileData, reader: &Arc<LayerReader>) {
        let shard = self.shard_of.hash_one(key) as usize % SHARDS;
        let read_whole = {
            let mut served = self.served[shard].lock().unwrap_or_else(|p| p.into_inner());
            let count = served.entry(key).or_default();
            *count = count.saturating_add(bytes);
            let whole = *count >= key.size;
            if whole {
                served.remove(&key);
            }
            whole
        };
        if read_whole && !path(&self.root, &key).exists() {
            let job = Job {
                key,
                data: data.clone(),
                reader: reader.clone(),
            };
            // A full queue drops the job: the file is read again later.
            let _ = self.jobs.try_send(job);
        }
    }
}

fn path(root: &Path, key: &Key) -> PathBuf {
    root.join(key.layer.hex())
        .join(format!("{}-{}", key.offset, key.size))
}

/// Reads the whole file through its (verifying) reader into a temporary
/// file next to its final place, and renames it there.
fn write_out(root: &Path, job: &Job) -> std::io::Result<()> {
    let target = path(root, &job.key);
    if target.exists() {
        return Ok(());
    }
    let dir = target.parent().unwrap_or(root);
    std::fs::create_dir_all(dir)?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir)?;
    let mut offset = 0;
    while offset < job.key.size {
        let bytes = job
            .reader
            .read_file(job.key.size, &job.data, offset, PIECE)
            .map_err(std::io::Error::other)?;
        if bytes.is_empty() {
            return Err(std::io::Error::other("the file ended early"));
        }
        tmp.write_all(&bytes)?;
        offset += bytes.len() as u64;
    }
    tmp.as_file().sync_all()?;
    tmp.persist(&target).map_err(|e| e.error)?;
    Ok(())
}

/// Bytes kept whole for `layer` under `root`, and removing them.
pub fn layer_dir(root: &Path, layer: &Digest) -> PathBuf {
    root.join(layer.hex())
}
