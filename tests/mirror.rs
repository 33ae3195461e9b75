//! Registry mirrors from the configuration file, against real registries: a
//! Debian `docker-registry` in proxy mode as the pull-through cache of the
//! test registry. A first "machine" (its own cache dir) fills the mirror; a
//! second one then gets every blob byte from the mirror and none from the
//! upstream (counted in the upstream's request log). A dead mirror and a
//! mirror that answers 404 to everything fall back to the upstream; a
//! configuration with an unknown key stops `imgfs mount` with one line.

mod common;

use common::*;
use std::fs::{self};
use std::io::{BufRead, BufReader, Write};
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

/// How long the proxy may take to store the blobs it served (it copies
/// them from the upstream in the background).
const MIRROR_FILL: Duration = Duration::from_secs(60);
const POLL: Duration = Duration::from_millis(100);
/// The file read on each machine.
const PROBE_FILE: &str = "bin/busybox";

/// A `docker-registry` in proxy mode in front of `upstream`.
fn start_mirror(upstream: &Registry) -> Registry {
    Registry::start(RegistryOptions {
        proxy: Some(upstream.url("")),
        ..RegistryOptions::default()
    })
}

/// Blob requests `mirror` answered.
fn blob_responses(mirror: &Registry) -> usize {
    mirror.requests().iter().filter(|r| r.is_blob_get()).count()
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("probe a free port")
}

/// An HTTP server answering 404 to every request, counting them.
fn not_found_server() -> (String, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let url = format!("http://{}", listener.local_addr().expect("local addr"));
    let count = Arc::new(AtomicUsize::new(0));
    let seen = count.clone();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let seen = seen.clone();
            std::thread::spawn(move || {
                let mut reader = BufReader::new(&stream);
                let mut line = String::new();
                // The request head ends with an empty line (GETs carry no body).
                while reader.read_line(&mut line).is_ok_and(|n| n > 0) {
                    if line == "\r\n" {
                        seen.fetch_add(1, Ordering::SeqCst);
                        let answer = "HTTP/1.1 404 Not Found\r\nContent-Type: application/json\r\n\
                                      Content-Length: 2\r\n\r\n{}";
                        if (&stream).write_all(answer.as_bytes()).is_err() {
                            return;
                        }
                    }
                    line.clear();
                }
            });
        }
    });
    (url, count)
}

/// A config file mirroring `registry` through `endpoints`.
fn write_config(dir: &Path, registry: &str, endpoints: &[String]) -> PathBuf {
    let list: Vec<String> = endpoints.iter().map(|e| format!("{e:?}")).collect();
    let path = dir.join("config.toml");
    fs::write(
        &path,
        format!(
            "[[mirrors]]\nregistry = \"{registry}\"\nendpoints = [{}]\n",
            list.join(", ")
        ),
    )
    .expect("write config.toml");
    path
}

/// Mounts `reference` with `config` and a fresh cache, and returns the sha256
/// of [`PROBE_FILE`] read through the mount.
fn mount_and_read(reference: &str, config: &Path) -> String {
    let mount = Mount::new(
        reference,
        MountOptions {
            extra_args: vec!["--config".into(), config.display().to_string()],
            ..Default::default()
        },
    );
    let file = mount.path().join(PROBE_FILE);
    let hash = within("reading the probe file", SHORT, &mount, move || {
        sha256_file(&file)
    })
    .expect("probe file readable");
    mount.unmount();
    hash
}

fn blob_bytes(requests: &[Request]) -> u64 {
    requests.iter().map(|r| r.written).sum()
}

#[test]
fn second_machine_gets_every_blob_from_the_pull_through_mirror() {
    let upstream = Registry::start(RegistryOptions::default());
    let reference = push(&upstream, "busybox", "fleet/busybox:1", Compress::Gzip);
    let mirror = start_mirror(&upstream);
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream.host(), &[mirror.url("")]);

    let mark = upstream.requests().len();
    let first = mount_and_read(&reference, &config);
    assert!(
        blob_responses(&mirror) > 0,
        "machine A never asked the mirror: {}",
        mirror.log_text()
    );
    assert!(
        !upstream.blob_gets_since(mark).is_empty(),
        "the mirror filled itself from the upstream"
    );

    let (manifest, _) = upstream.manifest("fleet/busybox:1");
    let mut digests: Vec<String> = layers(&upstream, "fleet/busybox:1")
        .into_iter()
        .map(|(_, digest, _)| digest)
        .collect();
    digests.extend(manifest["config"]["digest"].as_str().map(String::from));
    let deadline = Instant::now() + MIRROR_FILL;
    while !digests.iter().all(|d| mirror.blob_path(d).is_file()) {
        assert!(
            Instant::now() < deadline,
            "the mirror did not store {digests:?} within {MIRROR_FILL:?}"
        );
        std::thread::sleep(POLL);
    }

    let mirror_before = blob_responses(&mirror);
    let mark = upstream.requests().len();
    let second = mount_and_read(&reference, &config);
    assert_eq!(first, second, "both machines read the same bytes");
    let upstream_gets = upstream.blob_gets_since(mark);
    assert_eq!(
        blob_bytes(&upstream_gets),
        0,
        "machine B took blob bytes from the upstream: {upstream_gets:?}"
    );
    assert!(
        blob_responses(&mirror) > mirror_before,
        "machine B never asked the mirror"
    );
}

#[test]
fn dead_and_empty_mirrors_fall_back_to_the_upstream() {
    let upstream = Registry::start(RegistryOptions::default());
    let reference = push(&upstream, "busybox", "fleet/busybox:1", Compress::Gzip);
    let dead = format!("http://127.0.0.1:{}", free_port());
    let (empty, asked) = not_found_server();
    let dir = tempfile::tempdir().expect("temp dir");
    let config = write_config(dir.path(), &upstream.host(), &[dead, empty]);

    let mark = upstream.requests().len();
    let hash = mount_and_read(&reference, &config);
    assert_eq!(hash.len(), 64);
    assert!(
        asked.load(Ordering::SeqCst) > 0,
        "the 404 mirror was never asked"
    );
    assert!(
        blob_bytes(&upstream.blob_gets_since(mark)) > 0,
        "the upstream served the blobs"
    );
}

#[test]
fn unknown_config_key_fails_the_mount_with_one_line() {
    let upstream = Registry::start(RegistryOptions::default());
    let reference = upstream.reference("fleet/none:1");
    let dir = tempfile::tempdir().expect("temp dir");
    let config = dir.path().join("config.toml");
    fs::write(
        &config,
        "[[mirrors]]\nregistry = \"docker.io\"\nendpoints = []\nendpoint_timeout = 3\n",
    )
    .expect("write config.toml");
    let mountpoint = dir.path().join("mnt");
    fs::create_dir(&mountpoint).expect("mkdir");
    let out = run(
        Command::new(IMGFS)
            .arg("mount")
            .arg(&reference)
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(dir.path().join("cache"))
            .env("IMGFS_CONFIG", &config)
            .env("DOCKER_CONFIG", upstream.docker_config()),
        SHORT,
    );
    assert!(!out.success(), "mount with a bad config succeeded");
    assert!(!is_mountpoint(&mountpoint));
    let file = config.display().to_string();
    assert_one_line_error(&out.stderr, &[&file, ":4:", "endpoint_timeout"]);
}
