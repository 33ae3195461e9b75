//! imgfs: mount container images straight from a registry, lazily.
//!
//! Data flows one way; each box is a module with one job:
//!
//! ```text
//!  "alpine" ── reference ──► docker.io/library/alpine:latest
//!                 │
//!  registry::Client ──► image (index → platform → manifest → config, all verified)
//!                 │ one descriptor per layer
//!  layer::build_index (one verified streaming pass; persisted by `cache`)
//!                 │ stacked bottom → top
//!  union::Tree (whiteouts, opaque dirs, hardlinks; one inode table)
//!                 │
//!  fs::ImageFs (the filesystem operations) ◄── fuse (thin fuser adapter)
//!                 │ read(inode, offset, len)
//!  layer::LayerReader ──► source::BlockSource (verified blocks in `cache`) ──► registry Range
//! ```
//!
//! `mount` wires the boxes together for one mounted image; `main.rs` is only
//! the command line around it.

pub mod artifact;
pub mod cache;
pub mod config;
pub mod convert;
pub mod diff;
pub mod digest;
pub mod fs;
pub mod fuse;
pub mod image;
pub mod layer;
pub mod materialize;
pub mod mount;
pub mod overlay;
pub mod record;
pub mod reference;
pub mod registry;
pub mod source;
pub mod store;
pub mod union;
pub mod upper;
pub mod windows;
