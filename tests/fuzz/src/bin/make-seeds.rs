//! Writes a small starting corpus for every fuzz target under
//! `corpus/TARGET/` (scripts/fuzz runs it first): real references, manifest,
//! index and config documents, tar streams of every entry kind the parser
//! knows (built here with the `tar` crate), gzip blobs of them, and a
//! persisted index of one. Generated, never committed.

use flate2::Compression as Level;
use flate2::write::GzEncoder;
use imgfs::digest::Digest;
use imgfs::layer::{Compression, IndexOptions, build_index};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

/// Checkpoint spacing prefix of the gzip seeds (little endian u16 + 1).
const SEED_SPACING: [u8; 2] = [0xff, 0x0f];

fn main() -> std::io::Result<()> {
    let root = PathBuf::from(std::env::args().nth(1).unwrap_or_else(|| "corpus".into()));
    let refs = [
        "alpine",
        "library/alpine:3.20",
        "docker.io/library/busybox:latest",
        "localhost:5000/a/b/c:tag",
        "[::1]:5000/x@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "ghcr.io/owner/image:v1.2.3@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        "Registry.Example.com/UPPER/x",
    ];
    write_all(
        &root.join("reference"),
        refs.iter().map(|r| r.as_bytes().to_vec()),
    )?;
    write_all(&root.join("image"), documents().into_iter())?;

    let tars = tars()?;
    write_all(
        &root.join("tar_stream"),
        tars.iter().map(|t| [&[7u8; 8][..], t].concat()),
    )?;
    let blobs: Vec<Vec<u8>> = tars.iter().map(|t| gzip(t)).collect::<Result<_, _>>()?;
    write_all(
        &root.join("gzip_index"),
        blobs.iter().map(|b| [&SEED_SPACING[..], b].concat()),
    )?;
    let mut indexes = Vec::new();
    for blob in &blobs {
        let options = IndexOptions {
            checkpoint_spacing: 4096,
        };
        let index = build_index(
            &blob[..],
            Compression::Gzip,
            Digest::of(blob),
            blob.len() as u64,
            None,
            &options,
        )
        .map_err(std::io::Error::other)?;
        let file = index.encode().map_err(std::io::Error::other)?;
        let mut body = Vec::new();
        zstd::stream::read::Decoder::new(&file[12..])?.read_to_end(&mut body)?;
        indexes.push([&[1u8][..], &file].concat());
        indexes.push([&[0u8][..], &body].concat());
    }
    write_all(&root.join("index_decode"), indexes.into_iter())?;
    let tocs = tocs();
    write_all(
        &root.join("toc"),
        tocs.iter().flat_map(|t| {
            [
                [&[TOC_ESTARGZ][..], t].concat(),
                [&[TOC_ZSTD][..], t].concat(),
            ]
        }),
    )
}

/// Mode bytes of the toc target: eStargz / zstd:chunked, 512 bytes of data first.
const TOC_ESTARGZ: u8 = 0x02;
const TOC_ZSTD: u8 = 0x03;

/// TOCs as eStargz and zstd:chunked write them: every entry kind, a file
/// in two chunks, xattrs, and an empty layer (Go's `null` list).
fn tocs() -> Vec<Vec<u8>> {
    let d = |c: &str| format!("sha256:{}", c.repeat(64));
    let full = format!(
        r#"{{"version":1,"entries":[{{"name":"bin/","type":"dir","mode":493,"modtime":"2024-01-02T03:04:05Z"}},{{"name":"bin/hello","type":"reg","size":10,"mode":420,"uid":1,"gid":2,"offset":40,"digest":"{a}","chunkDigest":"{a}","xattrs":{{"user.k":"dg=="}}}},{{"name":"bin/link","type":"symlink","linkName":"hello"}},{{"name":"bin/hard","type":"hardlink","linkName":"bin/hello"}},{{"name":"dev/null","type":"char","devMajor":1,"devMinor":3}},{{"name":"fifo","type":"fifo"}},{{"name":"big","type":"reg","size":20,"offset":100,"chunkSize":10,"digest":"{b}","chunkDigest":"{c}"}},{{"name":"big","type":"chunk","offset":200,"chunkOffset":10,"chunkSize":10,"chunkDigest":"{e}"}},{{"name":".prefetch.landmark","type":"reg","size":1,"offset":300,"chunkDigest":"{f}"}}]}}"#,
        a = d("a"),
        b = d("b"),
        c = d("c"),
        e = d("e"),
        f = d("f"),
    );
    let zeros = format!(
        r#"{{"version":1,"entries":[{{"name":"z","type":"reg","size":4096,"offset":0,"endOffset":0,"chunkSize":4096,"chunkType":"zeros","chunkDigest":"{}"}}]}}"#,
        d("0")
    );
    let empty = r#"{"version":1,"entries":null}"#.to_string();
    [full, zeros, empty]
        .into_iter()
        .map(String::into_bytes)
        .collect()
}

fn write_all(dir: &Path, seeds: impl Iterator<Item = Vec<u8>>) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    for (i, seed) in seeds.enumerate() {
        std::fs::write(dir.join(format!("seed-{i}")), seed)?;
    }
    Ok(())
}

fn gzip(data: &[u8]) -> std::io::Result<Vec<u8>> {
    let mut encoder = GzEncoder::new(Vec::new(), Level::new(6));
    encoder.write_all(data)?;
    encoder.finish()
}

/// Tar streams: GNU and PAX long names, every entry kind, xattrs, a
/// multi-block file, and an empty archive.
fn tars() -> std::io::Result<Vec<Vec<u8>>> {
    let mut out = vec![vec![0u8; 1024]];
    for gnu in [true, false] {
        let mut builder = tar::Builder::new(Vec::new());
        add(
            &mut builder,
            gnu,
            tar::EntryType::Directory,
            "dir/",
            b"",
            None,
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Regular,
            "dir/file",
            b"hello\n",
            None,
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Regular,
            &"long/".repeat(40),
            &[9u8; 3000],
            None,
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Symlink,
            "dir/link",
            b"",
            Some(&"t".repeat(150)),
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Link,
            "dir/hard",
            b"",
            Some("dir/file"),
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Fifo,
            "dir/fifo",
            b"",
            None,
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Char,
            "dir/null",
            b"",
            None,
        )?;
        add(
            &mut builder,
            gnu,
            tar::EntryType::Regular,
            "dir/.wh.gone",
            b"",
            None,
        )?;
        if !gnu {
            builder.append_pax_extensions([
                ("SCHILY.xattr.user.k", &b"v"[..]),
                ("mtime", &b"1700000000.5"[..]),
            ])?;
            add(
                &mut builder,
                gnu,
                tar::EntryType::Regular,
                "dir/xattr",
                b"x",
                None,
            )?;
        }
        out.push(builder.into_inner()?);
    }
    Ok(out)
}

/// Appends one entry (a link when `link` is given).
fn add(
    builder: &mut tar::Builder<Vec<u8>>,
    gnu: bool,
    kind: tar::EntryType,
    path: &str,
    data: &[u8],
    link: Option<&str>,
) -> std::io::Result<()> {
    let mut header = if gnu {
        tar::Header::new_gnu()
    } else {
        tar::Header::new_ustar()
    };
    header.set_entry_type(kind);
    header.set_size(data.len() as u64);
    header.set_mode(0o4755);
    header.set_mtime(1_700_000_000);
    match link {
        Some(link) => builder.append_link(&mut header, path, link),
        None => builder.append_data(&mut header, path, data),
    }
}

/// A manifest, an index, a config and a Docker list.
fn documents() -> Vec<Vec<u8>> {
    let digest = format!("sha256:{}", "ab".repeat(32));
    let manifest = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.manifest.v1+json","config":{{"mediaType":"application/vnd.oci.image.config.v1+json","digest":"{digest}","size":7}},"layers":[{{"mediaType":"application/vnd.oci.image.layer.v1.tar+gzip","digest":"{digest}","size":9,"urls":["https://x/y"],"annotations":{{"a":"b"}}}},{{"mediaType":"application/vnd.oci.image.layer.v1.tar+zstd","digest":"{digest}","size":1}}]}}"#
    );
    let index = format!(
        r#"{{"schemaVersion":2,"mediaType":"application/vnd.oci.image.index.v1+json","manifests":[{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":5,"platform":{{"architecture":"arm","os":"linux","variant":"v7"}}}},{{"mediaType":"application/vnd.docker.distribution.manifest.v2+json","digest":"{digest}","size":5,"platform":{{"architecture":"amd64","os":"windows","os.version":"10.0.17763.1"}}}},{{"mediaType":"application/vnd.oci.image.manifest.v1+json","digest":"{digest}","size":5,"platform":{{"architecture":"unknown","os":"unknown"}},"annotations":{{"vnd.docker.reference.type":"attestation-manifest"}}}}]}}"#
    );
    let config = format!(
        r#"{{"architecture":"amd64","os":"linux","config":{{"Env":["PATH=/bin"],"Cmd":["sh"],"WorkingDir":"/"}},"rootfs":{{"type":"layers","diff_ids":["{digest}"]}},"history":[{{"created_by":"x","empty_layer":true}}]}}"#
    );
    let schema1 = r#"{"schemaVersion":1,"fsLayers":[]}"#.to_string();
    [manifest, index, config, schema1, "linux/arm64/v8".into()]
        .into_iter()
        .map(String::into_bytes)
        .collect()
}
