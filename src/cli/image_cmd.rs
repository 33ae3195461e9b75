//! Looking at images without mounting them: `imgfs inspect` and `imgfs diff`.

use crate::{parse_platform, prepare, runtime, state_dir};
use anyhow::{Context, Result, bail};
use imgfs::cache::Cache;
use imgfs::image::{self, Platform, ResolvedImage};
use imgfs::layer::toc::LayerFormat;
use imgfs::record::MountRecord;
use imgfs::reference::Reference;
use imgfs::registry::{Client, ClientOptions};
use imgfs::upper::Upper;
use imgfs::windows;
use std::io::Write;
use std::path::Path;

pub(crate) fn diff(
    target: &str,
    upper_dir: Option<&Path>,
    platform: Option<&str>,
    json: bool,
    cache_dir: &Path,
    client_options: ClientOptions,
) -> Result<()> {
    let (upper_path, indexes) = match upper_dir {
        Some(dir) => {
            let reference: Reference = target.parse()?;
            let platform = parse_platform(platform)?;
            let cache = Cache::open(cache_dir)?;
            let client = Client::new(client_options)?;
            let prepared = prepare(&runtime()?, &client, &cache, &reference, platform.as_ref())?;
            let os = &prepared.image.platform.os;
            let indexes = windows::for_image(prepared.indexes, os, windows::Layout::View);
            (dir.to_path_buf(), indexes)
        }
        None => {
            let record = MountRecord::load(&state_dir(), Path::new(target))?;
            let upper = record
                .upper
                .with_context(|| format!("{target} is mounted read-only: it has no changes"))?;
            let cache = Cache::open(&record.cache_dir)?;
            let mut indexes = Vec::new();
            for layer in &record.layers {
                let index = cache.load_index(layer)?.with_context(|| {
                    format!(
                        "layer {layer} is no longer in the cache {}",
                        record.cache_dir.display()
                    )
                })?;
                indexes.push(std::sync::Arc::new(index));
            }
            // The record does not say the platform: a Windows base layer
            // means the mount showed the Windows view (unless --raw-layout).
            if windows::has_windows_layout(&indexes) {
                indexes = windows::WindowsView::indexes(indexes);
            }
            (upper, indexes)
        }
    };
    if !upper_path.is_dir() {
        bail!("upper directory {} does not exist", upper_path.display());
    }
    let upper = Upper::open(&upper_path)
        .with_context(|| format!("upper directory {}", upper_path.display()))?;
    let tree = imgfs::union::Tree::build(&indexes);
    let changes = imgfs::diff::changes(&upper, &tree)?;
    if json {
        println!("{}", serde_json::to_string_pretty(&changes)?);
    } else {
        let mut out = std::io::stdout().lock();
        for c in &changes {
            writeln!(
                out,
                "{} {}",
                c.kind.letter(),
                String::from_utf8_lossy(&c.path)
            )?;
        }
    }
    Ok(())
}

pub(crate) fn inspect(
    reference: &str,
    platform: Option<&str>,
    json: bool,
    client_options: ClientOptions,
) -> Result<()> {
    let reference: Reference = reference.parse()?;
    let platform = parse_platform(platform)?;
    let client = Client::new(client_options)?;
    let image = runtime()?.block_on(image::resolve(&client, &reference, platform.as_ref()))?;
    if json {
        println!("{}", serde_json::to_string_pretty(&inspect_json(&image))?);
    } else {
        print_inspect(&image);
    }
    Ok(())
}

pub(crate) fn platform_text(p: &Platform) -> String {
    let mut s = format!("{}/{}", p.os, p.architecture);
    if let Some(v) = &p.variant {
        s.push('/');
        s.push_str(v);
    }
    if let Some(v) = &p.os_version {
        s.push_str(&format!(" ({v})"));
    }
    s
}

pub(crate) fn inspect_json(image: &ResolvedImage) -> serde_json::Value {
    let c = &image.config;
    serde_json::json!({
        "reference": image.reference.to_string(),
        "index_digest": image.index_digest.map(|d| d.to_string()),
        "platforms": image.platforms.iter().map(|(p, d)| serde_json::json!({
            "platform": platform_text(p), "digest": d.to_string(),
        })).collect::<Vec<_>>(),
        "platform": platform_text(&image.platform),
        "manifest_digest": image.manifest_digest.to_string(),
        "manifest_media_type": image.manifest_media_type,
        "layers": image.layers.iter().map(|l| {
            let format = layer_format(l);
            serde_json::json!({
                "digest": l.blob.digest.to_string(),
                "size": l.blob.size,
                "media_type": l.media_type,
                "format": format.name(),
                "foreign": l.foreign,
                "lazy": format.laziness(),
                "urls": l.blob.urls,
            })
        }).collect::<Vec<_>>(),
        "config": {
            "digest": c.digest.to_string(),
            "env": c.env, "cmd": c.cmd, "entrypoint": c.entrypoint,
            "working_dir": c.working_dir, "user": c.user,
            "history": c.history,
        },
    })
}

pub(crate) fn print_inspect(image: &ResolvedImage) {
    println!("Reference:  {}", image.reference);
    if let Some(index) = image.index_digest {
        println!("Index:      {index}");
        for (p, d) in &image.platforms {
            let chosen = if *d == image.manifest_digest {
                "  (chosen)"
            } else {
                ""
            };
            println!("  {:<24} {d}{chosen}", platform_text(p));
        }
    }
    println!(
        "Manifest:   {} ({})",
        image.manifest_digest, image.manifest_media_type
    );
    println!("Platform:   {}", platform_text(&image.platform));
    let c = &image.config;
    println!("Config:     {}", c.digest);
    for env in &c.env {
        println!("  Env:        {env}");
    }
    if let Some(ep) = &c.entrypoint {
        println!("  Entrypoint: {ep:?}");
    }
    if let Some(cmd) = &c.cmd {
        println!("  Cmd:        {cmd:?}");
    }
    if let Some(wd) = c.working_dir.as_deref().filter(|w| !w.is_empty()) {
        println!("  WorkingDir: {wd}");
    }
    if let Some(user) = c.user.as_deref().filter(|u| !u.is_empty()) {
        println!("  User:       {user}");
    }
    println!("Layers:");
    for (i, l) in image.layers.iter().enumerate() {
        let format = layer_format(l);
        let foreign = if l.foreign { " foreign" } else { "" };
        println!(
            "  {:>2}  {}  {:>12}  {:<12}{foreign}  {}",
            i + 1,
            l.blob.digest,
            human_bytes(l.blob.size),
            format.name(),
            format.laziness()
        );
        for url in &l.blob.urls {
            println!("        url: {url}");
        }
    }
    if !c.history.is_empty() {
        println!("History:");
        for h in &c.history {
            let created = h.created.as_deref().unwrap_or("");
            let by = h.created_by.as_deref().unwrap_or("");
            println!("  {created:<25} {by}");
        }
    }
}

fn layer_format(l: &imgfs::image::manifest::LayerDescriptor) -> LayerFormat {
    LayerFormat::of(&l.annotations, l.compression)
}

pub(crate) fn human_bytes(n: u64) -> String {
    indicatif::HumanBytes(n).to_string()
}
