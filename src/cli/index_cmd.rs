//! `imgfs index push`: publish an image's layer indexes to its registry.

use crate::{parse_platform, prepare, runtime};
use anyhow::Result;
use imgfs::artifact;
use imgfs::cache::Cache;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use std::path::Path;

pub(crate) fn index_push(
    reference: &str,
    platform: Option<&str>,
    json: bool,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let platform = parse_platform(platform)?;
    let cache = Cache::open(cache_dir)?;
    let client = Client::new(client_options)?;
    let runtime = runtime()?;
    // Indexes come from the cache, or are built now by one pass per layer.
    let prepared = prepare(&runtime, &client, &cache, &reference, platform.as_ref())?;
    let published = runtime.block_on(artifact::publish(
        &client,
        &prepared.image,
        &prepared.indexes,
    ))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&published)?);
    } else {
        println!(
            "published the indexes of {} layer(s) of {}@{} as {} ({} bytes{})",
            published.layers,
            reference.name(),
            prepared.image.manifest_digest,
            published.artifact,
            published.bytes,
            if published.tag_schema {
                ", listed under the sha256-<digest> tag: the registry has no referrers API"
            } else {
                ""
            }
        );
    }
    Ok(())
}
