//! Windows images end to end: a Docker manifest list of two Windows builds
//! (`scripts/make-test-image build windows`), whose newer base layer is a
//! foreign layer served by its own HTTP server (with Range) and absent from
//! the registry. Checked: the platform choice by `os.version`, the default
//! view (C:\ at the root, the rest under `.windows-layer/`), whiteouts and
//! opaque directories inside `Files/`, hardlinks, the MSWINDOWS PAX records
//! as `user.` xattrs, `--raw-layout`, `imgfs inspect`, `imgfs diff` of a
//! writable mount, and that reading one file moves a small part of the base.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

const NEWER_BUILD: &str = "10.0.20348.2227";
const OLDER_BUILD: &str = "10.0.17763.5458";
/// A DLL deep in System32, read through the mount and compared to the tar.
const DEEP_DLL: &str = "Windows/System32/lib2345.dll";
/// Path in the foreign server's URLs before the digest.
const FOREIGN_PREFIX: &str = "/foreign/";
const REGISTRY_START: Duration = Duration::from_secs(20);
const REGISTRY_TRIES: usize = 3;
/// Longest request head the foreign server reads.
const MAX_HEAD: usize = 16 * 1024;

/// A loopback HTTP server for foreign layers: `GET /foreign/sha256:HEX`
/// answers the blob of that digest from a layout's blobs, honouring a
/// single `Range`; counts the body bytes it sends.
struct ForeignServer {
    port: u16,
    sent: Arc<AtomicU64>,
    requests: Arc<Mutex<Vec<String>>>,
    stop: Arc<AtomicBool>,
}

impl ForeignServer {
    fn start(blobs: PathBuf) -> ForeignServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind the foreign server");
        let port = listener.local_addr().expect("local addr").port();
        let sent = Arc::new(AtomicU64::new(0));
        let requests = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let (s, r, st) = (sent.clone(), requests.clone(), stop.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                if st.load(Ordering::Relaxed) {
                    return;
                }
                let Ok(conn) = conn else { continue };
                let (blobs, s, r) = (blobs.clone(), s.clone(), r.clone());
                std::thread::spawn(move || serve_one(conn, &blobs, &s, &r));
            }
        });
        ForeignServer {
            port,
            sent,
            requests,
            stop,
        }
    }

    fn url(&self) -> String {
        format!(
            "http://127.0.0.1:{}{}",
            self.port,
            FOREIGN_PREFIX.trim_end_matches('/')
        )
    }

    fn sent(&self) -> u64 {
        self.sent.load(Ordering::Relaxed)
    }

    fn requests(&self) -> Vec<String> {
        self.requests
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

impl Drop for ForeignServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        let _ = TcpStream::connect(("127.0.0.1", self.port));
    }
}

/// One request per connection (`Connection: close`).
fn serve_one(mut conn: TcpStream, blobs: &Path, sent: &AtomicU64, log: &Mutex<Vec<String>>) {
    let _ = conn.set_read_timeout(Some(SHORT));
    let mut head = Vec::new();
    let mut reader = BufReader::new(&mut conn);
    loop {
        let mut line = String::new();
        match reader.read_line(&mut line) {
            Ok(0) | Err(_) => return,
            Ok(_) if line == "\r\n" => break,
            Ok(_) => head.push(line.trim_end().to_string()),
        }
        if head.iter().map(String::len).sum::<usize>() > MAX_HEAD {
            return;
        }
    }
    let Some(request) = head.first() else { return };
    let mut parts = request.split(' ');
    let (method, path) = (parts.next().unwrap_or(""), parts.next().unwrap_or(""));
    let range = head.iter().find_map(|h| {
        let (name, value) = h.split_once(':')?;
        name.eq_ignore_ascii_case("range")
            .then(|| value.trim().to_string())
    });
    let blob = path
        .strip_prefix(FOREIGN_PREFIX)
        .and_then(|d| d.strip_prefix("sha256:"))
        .filter(|hex| hex.len() == 64 && hex.bytes().all(|b| b.is_ascii_hexdigit()))
        .and_then(|hex| fs::read(blobs.join(hex)).ok());
    let (status, headers, body) = match blob {
        None => ("404 Not Found", String::new(), Vec::new()),
        Some(bytes) => match range.as_deref().map(|r| parse_range(r, bytes.len() as u64)) {
            None => ("200 OK", String::new(), bytes),
            Some(Some((start, end))) => (
                "206 Partial Content",
                format!(
                    "Content-Range: bytes {start}-{}/{}\r\n",
                    end - 1,
                    bytes.len()
                ),
                bytes[start as usize..end as usize].to_vec(),
            ),
            Some(None) => (
                "416 Range Not Satisfiable",
                format!("Content-Range: bytes */{}\r\n", bytes.len()),
                Vec::new(),
            ),
        },
    };
    log.lock().unwrap_or_else(|e| e.into_inner()).push(format!(
        "{method} {path} {} -> {status}",
        range.as_deref().unwrap_or("-")
    ));
    let reply = format!(
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nContent-Type: application/octet-stream\r\n{headers}Connection: close\r\n\r\n",
        body.len()
    );
    if conn.write_all(reply.as_bytes()).is_err() {
        return;
    }
    if method == "GET" && conn.write_all(&body).is_ok() {
        sent.fetch_add(body.len() as u64, Ordering::Relaxed);
    }
}

/// `bytes=A-B` or `bytes=A-` as `[start, end)`; `None` when unsatisfiable.
fn parse_range(value: &str, size: u64) -> Option<(u64, u64)> {
    let (start, end) = value.strip_prefix("bytes=")?.split_once('-')?;
    let start: u64 = start.parse().ok()?;
    let end = match end {
        "" => size,
        end => end.parse::<u64>().ok()?.checked_add(1)?.min(size),
    };
    (start < end).then_some((start, end))
}

/// A docker-registry that accepts manifests whose foreign layers point at
/// loopback URLs (`validation.manifests.urls.allow`), killed on drop.
struct ForeignRegistry {
    child: std::process::Child,
    _dir: tempfile::TempDir,
    port: u16,
    log: PathBuf,
}

impl ForeignRegistry {
    fn start() -> ForeignRegistry {
        let mut last = String::new();
        for _ in 0..REGISTRY_TRIES {
            match Self::try_start() {
                Ok(reg) => return reg,
                Err(why) => last = why,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    fn try_start() -> Result<ForeignRegistry, String> {
        let dir = tempfile::Builder::new()
            .prefix("imgfs-win-registry-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map_err(|e| e.to_string())?
            .port();
        let config = format!(
            "version: 0.1\nlog:\n  level: info\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
             http:\n  addr: 127.0.0.1:{port}\nvalidation:\n  manifests:\n    urls:\n      allow:\n        \
             - '^http://127\\.0\\.0\\.1:[0-9]+/'\n",
            dir.path().join("storage").display()
        );
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = dir.path().join("registry.log");
        let out = fs::File::create(&log).map_err(|e| e.to_string())?;
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config_path)
            .stdin(Stdio::null())
            .stdout(out.try_clone().map_err(|e| e.to_string())?)
            .stderr(out)
            .spawn()
            .map_err(|e| format!("cannot run /usr/bin/docker-registry: {e}"))?;
        let mut reg = ForeignRegistry {
            child,
            _dir: dir,
            port,
            log,
        };
        let deadline = Instant::now() + REGISTRY_START;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = reg.child.try_wait() {
                return Err(format!("exited with {status}: {}", reg.log_text()));
            }
            if http_status(port, "/v2/") == Some(200) {
                return Ok(reg);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!("no answer within {REGISTRY_START:?}"))
    }

    fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for ForeignRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn http_status(port: u16, path: &str) -> Option<u16> {
    let mut conn = TcpStream::connect(("127.0.0.1", port)).ok()?;
    conn.set_read_timeout(Some(Duration::from_secs(2))).ok()?;
    write!(
        conn,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut line = String::new();
    BufReader::new(conn).read_line(&mut line).ok()?;
    line.split(' ').nth(1)?.parse().ok()
}

/// The image built with its base served by `server`, pushed to `reg`.
struct Pushed {
    dir: tempfile::TempDir,
    layout: PathBuf,
    reference: String,
    /// Digest and size of the foreign base layer.
    foreign: (String, u64),
}

fn build_and_push(reg: &ForeignRegistry, dir: tempfile::TempDir, server: &ForeignServer) -> Pushed {
    let layout = dir.path().join("layout");
    run_ok(
        Command::new(script("make-test-image"))
            .args(["build", "windows"])
            .arg(&layout)
            .args(["--foreign-url", &server.url()]),
        MOUNT_TIMEOUT,
    );
    let reference = format!("127.0.0.1:{}/windows/servercore:ltsc2022", reg.port);
    run_ok(
        Command::new(script("make-test-image"))
            .arg("push")
            .arg(format!("{}:latest", layout.display()))
            .arg(&reference)
            .args(["--compress", "keep"])
            .env("DOCKER_CONFIG", dir.path()),
        MOUNT_TIMEOUT,
    );
    let foreign = foreign_layer(&layout);
    Pushed {
        dir,
        layout,
        reference,
        foreign,
    }
}

fn read_json(layout: &Path, digest: &str) -> serde_json::Value {
    let hex = digest.trim_start_matches("sha256:");
    let bytes = fs::read(layout.join("blobs/sha256").join(hex)).expect("blob in the layout");
    serde_json::from_slice(&bytes).expect("JSON blob")
}

/// The newer build's manifest in the layout.
fn newer_manifest(layout: &Path) -> serde_json::Value {
    let index: serde_json::Value =
        serde_json::from_slice(&fs::read(layout.join("index.json")).expect("index.json"))
            .expect("index.json is JSON");
    let list = read_json(
        layout,
        index["manifests"][0]["digest"].as_str().expect("digest"),
    );
    let entries = list["manifests"].as_array().expect("a manifest list");
    let builds: Vec<&str> = entries
        .iter()
        .filter_map(|m| m["platform"]["os.version"].as_str())
        .collect();
    assert_eq!(builds, [OLDER_BUILD, NEWER_BUILD], "the older build first");
    let newer = entries
        .iter()
        .find(|m| m["platform"]["os.version"] == NEWER_BUILD)
        .expect("the newer build");
    read_json(layout, newer["digest"].as_str().expect("digest"))
}

fn foreign_layer(layout: &Path) -> (String, u64) {
    let manifest = newer_manifest(layout);
    let base = &manifest["layers"][0];
    assert_eq!(
        base["mediaType"],
        "application/vnd.docker.image.rootfs.foreign.diff.tar.gzip"
    );
    (
        base["digest"].as_str().expect("digest").to_string(),
        base["size"].as_u64().expect("size"),
    )
}

/// The bytes of `path` in the gzip layer blob `digest` of the layout.
fn from_layer(layout: &Path, digest: &str, path: &str) -> Vec<u8> {
    let hex = digest.trim_start_matches("sha256:");
    let blob = fs::File::open(layout.join("blobs/sha256").join(hex)).expect("layer blob");
    let mut archive = tar::Archive::new(flate2::read::GzDecoder::new(blob));
    for entry in archive.entries().expect("tar entries") {
        let mut entry = entry.expect("tar entry");
        if entry.path().expect("entry path").as_os_str() == path {
            let mut out = Vec::new();
            entry.read_to_end(&mut out).expect("entry data");
            return out;
        }
    }
    panic!("{path} not in layer {digest}");
}

fn names(dir: &Path) -> BTreeSet<String> {
    fs::read_dir(dir)
        .unwrap_or_else(|e| panic!("listing {}: {e}", dir.display()))
        .map(|e| {
            e.expect("dir entry")
                .file_name()
                .to_string_lossy()
                .into_owned()
        })
        .collect()
}

fn set(items: &[&str]) -> BTreeSet<String> {
    items.iter().map(|s| s.to_string()).collect()
}

fn xattr(path: &Path, name: &str) -> Option<Vec<u8>> {
    let mut buf = vec![0u8; 4096];
    let n = rustix::fs::getxattr(path, name, &mut buf[..]).ok()?;
    buf.truncate(n);
    Some(buf)
}

fn windows_mount(pushed: &Pushed, cache: &Path, extra: &[&str]) -> Mount {
    Mount::new(
        &pushed.reference,
        MountOptions {
            platform: Some("windows/amd64".into()),
            cache_dir: Some(cache.to_path_buf()),
            extra_args: extra.iter().map(|s| s.to_string()).collect(),
            ..MountOptions::default()
        },
    )
}

#[test]
fn windows_image_with_a_foreign_base() {
    require_root();
    let dir = tempfile::Builder::new()
        .prefix("imgfs-windows-")
        .tempdir()
        .expect("temp dir");
    let server = ForeignServer::start(dir.path().join("layout/blobs/sha256"));
    let reg = ForeignRegistry::start();
    let cache = dir.path().join("cache");
    let pushed = build_and_push(&reg, dir, &server);
    let (foreign_digest, foreign_size) = pushed.foreign.clone();
    assert!(
        !reg.log_text().contains(&format!("blobs/{foreign_digest}")),
        "the foreign layer must not be pushed"
    );

    // inspect: the build chosen by os.version, and the foreign layer's URL.
    let docker_config = pushed.dir.path().join("docker-config");
    fs::create_dir_all(&docker_config).expect("docker config dir");
    let inspect = run_ok(
        Command::new(IMGFS)
            .args(["inspect", "--platform", "windows/amd64", &pushed.reference])
            .env("DOCKER_CONFIG", &docker_config),
        SHORT,
    );
    assert!(
        inspect
            .stdout
            .contains(&format!("Platform:   windows/amd64 ({NEWER_BUILD})")),
        "{}",
        inspect.stdout
    );
    assert!(inspect.stdout.contains(OLDER_BUILD), "{}", inspect.stdout);
    let url = format!("{}/{foreign_digest}", server.url());
    assert!(inspect.stdout.contains(&url), "{}", inspect.stdout);
    assert!(inspect.stdout.contains("foreign"), "{}", inspect.stdout);

    // The default view: C:\ at the root.
    let mount = windows_mount(&pushed, &cache, &["--read-only"]);
    let root = mount.path();
    assert_eq!(
        names(root),
        set(&[".windows-layer", "Temp", "Users", "Windows", "which-build"])
    );
    assert_eq!(
        fs::read_to_string(root.join("which-build")).expect("which-build"),
        format!("{NEWER_BUILD}\n"),
        "the highest os.version is chosen, not the first entry"
    );
    assert_eq!(
        names(&root.join(".windows-layer")),
        set(&["Hives", "UtilityVM"])
    );
    assert_eq!(
        fs::read(root.join(".windows-layer/Hives/Software_Delta")).expect("hive"),
        b"regf Software_Delta changed\n",
        "the second layer's hive wins"
    );
    assert!(
        root.join(".windows-layer/UtilityVM/Files/bootmgr")
            .is_file()
    );

    // Union rules inside Files/.
    let system32 = names(&root.join("Windows/System32"));
    assert_eq!(
        system32.len(),
        3000 - 1 + 2,
        "3000 DLLs, one whited out, kernel32, drivers"
    );
    assert!(!system32.contains("lib0007.dll"), "whiteout inside Files/");
    assert!(system32.contains("lib0008.dll"));
    assert_eq!(
        names(&root.join("Temp")),
        set(&["new.tmp"]),
        "opaque inside Files/"
    );
    assert_eq!(
        fs::read(root.join("Windows/System32/drivers/etc/hosts")).expect("hosts"),
        b"127.0.0.1 localhost\n10.0.0.1 db\n"
    );
    assert_eq!(
        fs::read(root.join("Users/ContainerUser/hello.txt")).expect("hello"),
        b"hello from Windows\n"
    );
    use std::os::unix::fs::MetadataExt;
    let (k, l) = (
        fs::metadata(root.join("Windows/System32/kernel32.dll")).expect("kernel32"),
        fs::metadata(root.join("Windows/System32/lib0042.dll")).expect("lib0042"),
    );
    assert_eq!((k.ino(), k.nlink()), (l.ino(), 2), "hardlink inside Files/");

    // Reading one file moves a small part of the base layer.
    let before = server.sent();
    assert!(
        before >= foreign_size,
        "the indexing pass streams the base once from its URL: {before} < {foreign_size}"
    );
    let dll = fs::read(root.join(DEEP_DLL)).expect("a DLL deep in System32");
    let moved = server.sent() - before;
    assert_eq!(
        dll,
        from_layer(
            &pushed.layout,
            &foreign_digest,
            &format!("Files/{DEEP_DLL}")
        ),
        "the DLL as the layer holds it"
    );
    assert!(
        moved > 0 && moved < foreign_size / 4,
        "reading one DLL moved {moved} of the base's {foreign_size} bytes: {:?}",
        server.requests()
    );
    assert!(
        server.requests().iter().any(|r| r.contains("bytes=")),
        "reads use Range on the foreign URL: {:?}",
        server.requests()
    );
    assert!(
        !reg.log_text().contains(&format!("blobs/{foreign_digest}")),
        "the registry is never asked for the foreign layer"
    );

    // The Windows PAX records, as user. xattrs.
    let file = root.join(DEEP_DLL);
    assert_eq!(
        xattr(&file, "user.MSWINDOWS.fileattr").as_deref(),
        Some(&b"32"[..])
    );
    assert_eq!(
        xattr(&root.join("Windows"), "user.MSWINDOWS.fileattr").as_deref(),
        Some(&b"16"[..])
    );
    let rawsd = xattr(&file, "user.MSWINDOWS.rawsd").expect("user.MSWINDOWS.rawsd");
    assert!(rawsd.starts_with(b"AQAEgB"), "{rawsd:?}");
    assert_eq!(
        xattr(&file, "user.LIBARCHIVE.creationtime").as_deref(),
        Some(&b"1600000000.1234567"[..])
    );
    mount.unmount();

    // --raw-layout: the layers as they are.
    let raw = windows_mount(&pushed, &cache, &["--read-only", "--raw-layout"]);
    assert_eq!(names(raw.path()), set(&["Files", "Hives", "UtilityVM"]));
    assert_eq!(
        fs::read_to_string(raw.path().join("Files/which-build")).expect("which-build"),
        format!("{NEWER_BUILD}\n")
    );
    assert!(
        !raw.path()
            .join("Files/Windows/System32/lib0007.dll")
            .exists()
    );
    assert_eq!(names(&raw.path().join("Files/Temp")), set(&["new.tmp"]));
    raw.unmount();

    // A writable mount: imgfs diff compares the upper with the same view.
    let rw = windows_mount(&pushed, &cache, &[]);
    fs::write(
        rw.path().join("Windows/System32/drivers/etc/hosts"),
        "edited\n",
    )
    .expect("edit hosts");
    fs::remove_file(rw.path().join("Windows/System32/lib0100.dll")).expect("remove a DLL");
    let diff = run_ok(Command::new(IMGFS).arg("diff").arg(rw.path()), SHORT);
    let lines: BTreeSet<&str> = diff.stdout.lines().collect();
    for want in [
        "C /Windows/System32/drivers/etc/hosts",
        "D /Windows/System32/lib0100.dll",
    ] {
        assert!(lines.contains(want), "{want:?} not in:\n{}", diff.stdout);
    }
    assert!(
        !diff.stdout.contains("A /Windows"),
        "paths of the image are changes, not additions:\n{}",
        diff.stdout
    );
    rw.unmount();
}
