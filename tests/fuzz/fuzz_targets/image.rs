//! The JSON documents a registry sends: `classify`, `parse_manifest`,
//! `parse_index` (then platform choice over its entries), `parse_config`,
//! and `Platform::parse` on the same bytes. None may panic.
#![no_main]

use imgfs::digest::Digest;
use imgfs::image::Platform;
use imgfs::image::manifest::{classify, layer_type, parse_config, parse_index, parse_manifest};
use imgfs::image::platform::choose;
use libfuzzer_sys::fuzz_target;

/// Content types a registry may announce, to steer `classify`.
const CONTENT_TYPES: &[&str] = &[
    "",
    "application/vnd.oci.image.manifest.v1+json",
    "application/vnd.oci.image.index.v1+json",
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.list.v2+json",
    "application/json",
];

fuzz_target!(|data: &[u8]| {
    for content_type in CONTENT_TYPES {
        let _ = classify(content_type, data);
    }
    if let Ok(manifest) = parse_manifest(data) {
        for layer in &manifest.layers {
            let _ = layer_type(&layer.media_type);
        }
    }
    if let Ok(entries) = parse_index(data) {
        let candidates: Vec<(Platform, usize)> = entries
            .iter()
            .enumerate()
            .filter_map(|(i, e)| e.platform.clone().map(|p| (p, i)))
            .collect();
        for wanted in [Platform::host(), windows()] {
            let _ = choose(&wanted, &candidates);
        }
    }
    if let Ok(config) = parse_config(Digest::of(data), bytes::Bytes::copy_from_slice(data)) {
        let _ = config.platform();
    }
    if let Ok(platform) = std::str::from_utf8(data)
        .map_err(|_| ())
        .and_then(|text| Platform::parse(text).map_err(|_| ()))
    {
        let _ = (platform.normalized(), platform.is_unknown());
    }
});

/// A Windows host, which ranks candidates by build number.
fn windows() -> Platform {
    Platform {
        os: "windows".into(),
        architecture: "amd64".into(),
        variant: None,
        os_version: Some("10.0.20348.2340".into()),
    }
}
