//! The subcommands of the `imgfs` binary, one module per group; `main.rs`
//! keeps the argument definitions and the helpers they share.

pub mod cache_cmd;
pub mod convert_cmd;
pub mod image_cmd;
pub mod index_cmd;
pub mod mount_cmd;
