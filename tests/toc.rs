//! Seekable layers end to end, against a real registry and real FUSE:
//! `imgfs convert` to eStargz and zstd:chunked and back through a mount and
//! through skopeo + umoci; images converted by the reference tools
//! (stargz-snapshotter's `ctr-remote` on containerd, skopeo's zstd:chunked);
//! the bytes a TOC mount moves, counted at the registry; `--record` and
//! landmark prefetch; and bad TOCs and chunks (fallback, or EIO).

mod common;

use common::*;
use std::fs;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

const FORMATS: [&str; 2] = ["estargz", "zstd:chunked"];
/// Files eStargz adds to the tar itself (unpackers that do not know the
/// format extract them; a TOC mount hides them).
const ESTARGZ_FILES: [&str; 3] = [
    "stargz.index.json",
    ".prefetch.landmark",
    ".no.prefetch.landmark",
];
const ESTARGZ_FOOTER: u64 = 51;
/// What reading a 21-byte file may move: its chunk, compressed, plus the
/// tar padding and next header that share its gzip member or zstd frame.
const SMALL_FILE_BUDGET: u64 = 4096;
const ZSTD_POSITION: &str = "io.github.containers.zstd-chunked.manifest-position";
const ZSTD_POSITION_OLD: &str = "io.containers.zstd-chunked.manifest-position";

/// `imgfs convert SRC DST --format F [extra]` with a fresh cache.
fn convert(reg: &Registry, src: &str, dst: &str, format: &str, extra: &[&str]) -> Output {
    let cache = tempfile::tempdir().expect("tmp");
    run_ok(
        Command::new(IMGFS)
            .arg("--cache-dir")
            .arg(cache.path())
            .args(["convert", "--format", format])
            .args(extra)
            .arg(reg.reference(src))
            .arg(reg.reference(dst))
            .env("DOCKER_CONFIG", reg.docker_config()),
        MOUNT_TIMEOUT,
    )
}

/// The `format` of each layer as `imgfs inspect --json` reports it.
fn layer_formats(reg: &Registry, name: &str) -> Vec<String> {
    let out = run_ok(
        Command::new(IMGFS)
            .args(["inspect", "--json"])
            .arg(reg.reference(name)),
        SHORT,
    );
    let v: serde_json::Value = serde_json::from_str(&out.stdout).expect("inspect JSON");
    v["layers"]
        .as_array()
        .expect("layers")
        .iter()
        .map(|l| l["format"].as_str().unwrap_or_default().to_string())
        .collect()
}

fn read_only(extra: &[&str]) -> MountOptions {
    let mut extra_args = vec!["--read-only".to_string()];
    extra_args.extend(extra.iter().map(|s| s.to_string()));
    MountOptions {
        extra_args,
        ..MountOptions::default()
    }
}

/// Blob bytes the registry served since request `mark`, per blob digest.
fn served_since(reg: &Registry, mark: usize) -> Vec<(String, u64)> {
    reg.blob_gets_since(mark)
        .iter()
        .map(|r| {
            let digest = r.uri.rsplit('/').next().unwrap_or_default().to_string();
            (digest, r.written)
        })
        .collect()
}

fn sum_for(served: &[(String, u64)], digest: &str) -> u64 {
    served
        .iter()
        .filter(|(d, _)| d == digest)
        .map(|(_, n)| n)
        .sum()
}

/// Bytes of a seekable layer a mount must fetch, exactly: eStargz, the TOC
/// and footer (the footer gives the TOC's offset); zstd:chunked, the
/// compressed manifest the position annotation points at.
fn toc_bytes(reg: &Registry, layer: &serde_json::Value) -> u64 {
    let annotations = &layer["annotations"];
    let position = annotations[ZSTD_POSITION]
        .as_str()
        .or(annotations[ZSTD_POSITION_OLD].as_str());
    if let Some(position) = position {
        return position
            .split(':')
            .nth(1)
            .and_then(|n| n.parse().ok())
            .expect("position");
    }
    let digest = layer["digest"].as_str().expect("digest");
    let blob = fs::read(reg.blob_path(digest)).expect("blob on the registry's disk");
    let footer = &blob[blob.len() - ESTARGZ_FOOTER as usize..];
    // gzip header (10) + XLEN (2) + subfield header (4), then 16 hex digits.
    let hex = std::str::from_utf8(&footer[16..32]).expect("hex");
    blob.len() as u64 - u64::from_str_radix(hex, 16).expect("TOC offset")
}

/// The converted image unpacked by skopeo + umoci, without the files the
/// eStargz format itself adds to the tar.
fn tool_unpack(reg: &Registry, name: &str) -> Unpacked {
    let unpacked = reference_unpack(reg, &reg.reference(name));
    let root = unpacked.path();
    let mtime = fs::metadata(&root)
        .and_then(|m| m.modified())
        .expect("root mtime");
    for file in ESTARGZ_FILES {
        let _ = fs::remove_file(root.join(file));
    }
    // Removing them touched the root; the image said otherwise.
    fs::File::open(&root)
        .and_then(|dir| dir.set_modified(mtime))
        .expect("restore the root's mtime");
    unpacked
}

#[test]
fn converted_images_mount_and_unpack_like_the_source() {
    let reg = Registry::start(RegistryOptions::default());
    for image in ["busybox", "union"] {
        push(&reg, image, &format!("{image}:src"), Compress::Gzip);
        let expected = reference_unpack(&reg, &reg.reference(&format!("{image}:src")));
        for format in FORMATS {
            let dst = format!("{image}:{}", format.replace(':', "-"));
            convert(&reg, &format!("{image}:src"), &dst, format, &[]);
            let formats = layer_formats(&reg, &dst);
            let wanted = if format == "estargz" {
                "eStargz"
            } else {
                "zstd:chunked"
            };
            // union's base layer has a name that is not UTF-8: kept as gzip.
            let converted = formats.iter().filter(|f| *f == wanted).count();
            assert!(
                converted >= formats.len() - 1 && converted > 0,
                "{dst}: layer formats {formats:?}"
            );
            let mount = Mount::new(&reg.reference(&dst), read_only(&["--prefetch", "none"]));
            assert!(
                !mount.stderr.contains("TOC unusable"),
                "{dst}: every TOC must be used:\n{}",
                mount.stderr
            );
            assert_same_trees(&expected.path(), mount.path(), &format!("mount of {dst}"));
            drop(mount);
            let unpacked = tool_unpack(&reg, &dst);
            assert_same_trees(
                &expected.path(),
                &unpacked.path(),
                &format!("skopeo+umoci of {dst}"),
            );
        }
    }
}

#[test]
fn toc_mounts_move_only_tocs_then_what_is_read() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "bb:src", Compress::Gzip);
    for format in FORMATS {
        let dst = format!("bb:{}", format.replace(':', "-"));
        convert(&reg, "bb:src", &dst, format, &[]);
        let (manifest, _) = reg.manifest(&dst);
        let layer = &manifest["layers"][0];
        let digest = layer["digest"].as_str().expect("digest").to_string();
        let size = layer["size"].as_u64().expect("size");
        let toc_bytes = toc_bytes(&reg, layer);

        let mark = reg.requests().len();
        let mount = Mount::new(&reg.reference(&dst), read_only(&["--prefetch", "none"]));
        let listed = within(&format!("find+stat over {dst}"), WALK_TIMEOUT, &mount, {
            let root = mount.path().to_path_buf();
            move || {
                run_ok(
                    Command::new("find")
                        .arg(&root)
                        .args(["-exec", "stat", "{}", "+"]),
                    WALK_TIMEOUT,
                )
            }
        });
        assert!(listed.stdout.contains("busybox"));
        let served = served_since(&reg, mark);
        let layer_moved = sum_for(&served, &digest);
        let all_moved: u64 = served.iter().map(|(_, n)| n).sum();
        eprintln!(
            "{format}: mount + find + stat moved {all_moved} blob bytes ({layer_moved} of the {size}-byte layer, TOC {toc_bytes}) = {:.2}% of the layer",
            100.0 * layer_moved as f64 / size as f64
        );
        assert_eq!(
            layer_moved, toc_bytes,
            "{format}: only the footer and TOC of the layer: {served:?}"
        );

        let mark = reg.requests().len();
        run_ok(
            Command::new("chroot")
                .arg(mount.path())
                .args(["/bin/busybox", "true"]),
            SHORT,
        );
        let ran = sum_for(&served_since(&reg, mark), &digest);
        let busybox = fs::metadata("/usr/bin/busybox").expect("busybox").len();
        eprintln!(
            "{format}: running /bin/busybox true moved {ran} bytes (busybox is {busybox} bytes uncompressed)"
        );
        let mark = reg.requests().len();
        let hello = fs::read(mount.path().join("home/user/hello")).expect("read");
        let small = sum_for(&served_since(&reg, mark), &digest);
        eprintln!(
            "{format}: reading a {}-byte file moved {small} bytes",
            hello.len()
        );
        assert!(
            small > 0 && small < SMALL_FILE_BUDGET,
            "{format}: a small file's chunk (and the tar header beside it) only: {small}"
        );
        assert!(
            ran > 0 && ran < size - toc_bytes,
            "{format}: the program's chunks only, not the whole layer ({ran} of {size})"
        );
    }
}

#[test]
fn bad_tocs_fall_back_and_bad_chunks_are_eio() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "bb:src", Compress::Gzip);
    convert(&reg, "bb:src", "bb:esgz", "estargz", &[]);

    // A TOC digest that does not match: the layer is indexed the old way.
    let (mut manifest, _) = reg.manifest("bb:esgz");
    manifest["layers"][0]["annotations"]["containerd.io/snapshot/stargz/toc.digest"] =
        serde_json::json!(format!("sha256:{}", "0".repeat(64)));
    put_manifest(&reg, "bb", "badtoc", &manifest);
    let mount = Mount::new(&reg.reference("bb:badtoc"), read_only(&[]));
    assert!(
        mount.stderr.contains("TOC unusable") && mount.stderr.contains("digest mismatch"),
        "a warning names the fallback:\n{}",
        mount.stderr
    );
    // Indexed from its tar, the layer shows what any unpacker extracts,
    // the eStargz files included.
    let unpacked = reference_unpack(&reg, &reg.reference("bb:esgz"));
    assert_same_trees(&unpacked.path(), mount.path(), "fallback mount");
    drop(mount);

    // A byte flipped inside busybox's data: that file is EIO, others read.
    let (manifest, _) = reg.manifest("bb:esgz");
    let digest = manifest["layers"][0]["digest"].as_str().expect("digest");
    let blob = reg.blob_path(digest);
    let len = fs::metadata(&blob).expect("blob").len();
    flip_byte(&blob, len / 3);
    let mount = Mount::new(
        &reg.reference("bb:esgz"),
        read_only(&["--prefetch", "none"]),
    );
    let cat = run(
        Command::new("cat")
            .arg(mount.path().join("bin/busybox"))
            .stdout(Stdio::null()),
        SHORT,
    );
    assert!(
        !cat.success() && cat.stderr.contains("Input/output error"),
        "corrupt chunk: {}",
        cat.stderr
    );
    let hello = fs::read(mount.path().join("home/user/hello")).expect("an intact file reads");
    assert_eq!(hello, b"hello from the image\n");
}

/// PUTs `manifest` as `repo:tag` (OCI media type) with curl.
fn put_manifest(reg: &Registry, repo: &str, tag: &str, manifest: &serde_json::Value) {
    let dir = tempfile::tempdir().expect("tmp");
    let file = dir.path().join("manifest.json");
    fs::write(&file, serde_json::to_vec(manifest).expect("json")).expect("write");
    run_ok(
        Command::new("curl")
            .args(["-fsS", "-X", "PUT", "-H"])
            .arg("Content-Type: application/vnd.oci.image.manifest.v1+json")
            .arg("--data-binary")
            .arg(format!("@{}", file.display()))
            .arg(reg.url(&format!("/v2/{repo}/manifests/{tag}"))),
        SHORT,
    );
}

/// A containerd on a socket of its own, killed on drop.
struct Containerd {
    child: Child,
    dir: tempfile::TempDir,
}

impl Containerd {
    fn start() -> Containerd {
        let dir = tempfile::tempdir().expect("tmp");
        let config = dir.path().join("config.toml");
        fs::write(
            &config,
            format!(
                "version = 2\nroot = \"{0}/root\"\nstate = \"{0}/state\"\n[grpc]\n  address = \"{0}/sock\"\n\
                 [plugins.\"io.containerd.grpc.v1.cri\"]\n  disable_tcp_service = true\n",
                dir.path().display()
            ),
        )
        .expect("config");
        let child = Command::new("containerd")
            .arg("--config")
            .arg(&config)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("containerd (apt-get install containerd)");
        let ctr = Containerd { child, dir };
        let deadline = Instant::now() + SHORT;
        while !ctr.socket().exists() {
            assert!(Instant::now() < deadline, "containerd did not start");
            std::thread::sleep(Duration::from_millis(50));
        }
        ctr
    }

    fn socket(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    fn ctr_remote(&self, args: &[&str]) -> Output {
        run_ok(
            Command::new("ctr-remote")
                .arg("-a")
                .arg(self.socket())
                .args(args),
            MOUNT_TIMEOUT,
        )
    }
}

impl Drop for Containerd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

#[test]
fn images_from_the_reference_tools_mount_lazily() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "bb:src", Compress::Gzip);
    let expected = reference_unpack(&reg, &reg.reference("bb:src"));
    let src = reg.reference("bb:src");
    let ctr = Containerd::start();
    ctr.ctr_remote(&["images", "pull", "--plain-http", &src]);
    let mut made = Vec::new();
    for (flag, tag, format) in [
        ("--estargz", "ctr-esgz", "eStargz"),
        ("--zstdchunked", "ctr-zc", "zstd:chunked"),
    ] {
        let dst = reg.reference(&format!("bb:{tag}"));
        ctr.ctr_remote(&["images", "convert", "--oci", flag, &src, &dst]);
        ctr.ctr_remote(&["images", "push", "--plain-http", &dst]);
        made.push((format!("bb:{tag}"), format));
    }
    drop(ctr);
    // skopeo's zstd:chunked (containers/image, as podman 4.3 writes it).
    let layout = tempfile::tempdir().expect("tmp");
    let oci = layout.path().join("oci");
    run_ok(
        Command::new("skopeo")
            .args([
                "copy",
                "--quiet",
                "--dest-compress",
                "--dest-compress-format",
                "zstd:chunked",
            ])
            .arg(format!(
                "oci:{}:latest",
                common::layout("busybox").display()
            ))
            .arg(format!("oci:{}:latest", oci.display())),
        MOUNT_TIMEOUT,
    );
    push_layout(&reg, &oci, "bb:skopeo-zc");
    made.push(("bb:skopeo-zc".to_string(), "zstd:chunked"));
    for (name, format) in made {
        assert_eq!(layer_formats(&reg, &name), [format], "{name}");
        let (manifest, _) = reg.manifest(&name);
        let layer = &manifest["layers"][0];
        let digest = layer["digest"].as_str().expect("digest").to_string();
        let mark = reg.requests().len();
        let mount = Mount::new(&reg.reference(&name), read_only(&["--prefetch", "none"]));
        assert!(
            !mount.stderr.contains("TOC unusable"),
            "{name}:\n{}",
            mount.stderr
        );
        let moved = sum_for(&served_since(&reg, mark), &digest);
        assert_eq!(moved, toc_bytes(&reg, layer), "{name}: the TOC only");
        assert_same_trees(&expected.path(), mount.path(), &name);
    }
}

#[test]
fn record_puts_what_a_program_opens_first_and_mounts_prefetch_it() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "busybox", "bb:src", Compress::Gzip);
    convert(
        &reg,
        "bb:src",
        "bb:rec",
        "estargz",
        &["--record", "cat /etc/passwd"],
    );
    // The tar order: what `sh -c 'cat /etc/passwd'` opened, then the landmark.
    let (manifest, _) = reg.manifest("bb:rec");
    let digest = manifest["layers"][0]["digest"]
        .as_str()
        .expect("digest")
        .to_string();
    let listing = run_ok(
        Command::new("tar").arg("-tzf").arg(reg.blob_path(&digest)),
        SHORT,
    );
    let names: Vec<&str> = listing.stdout.lines().collect();
    let landmark = names
        .iter()
        .position(|n| *n == ".prefetch.landmark")
        .expect("a landmark");
    let first = &names[..landmark];
    for wanted in ["bin/sh", "bin/busybox", "bin/cat", "etc/passwd"] {
        assert!(
            first.contains(&wanted),
            "{wanted} before the landmark: {first:?}"
        );
    }
    assert!(!first.contains(&"home/user/hello"), "{first:?}");

    // The default prefetch fetches those files with no read at all.
    let mark = reg.requests().len();
    let mount = Mount::new(&reg.reference("bb:rec"), read_only(&[]));
    let busybox = fs::metadata("/usr/bin/busybox").expect("busybox").len();
    let deadline = Instant::now() + SHORT;
    loop {
        let moved = sum_for(&served_since(&reg, mark), &digest);
        if moved > busybox / 3 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "landmark prefetch moved only {moved} bytes"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let mark = reg.requests().len();
    run_ok(
        Command::new("chroot")
            .arg(mount.path())
            .args(["/bin/sh", "-c", "cat /etc/passwd"]),
        SHORT,
    );
    assert_eq!(
        sum_for(&served_since(&reg, mark), &digest),
        0,
        "all prefetched"
    );
}
