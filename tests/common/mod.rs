//! Shared harness of the integration tests: a real registry per test
//! (`docker-registry` on a free loopback port, its request log parsed to count
//! bytes), test images built by `scripts/make-test-image` and pushed with it,
//! reference unpacks by independent tools (skopeo + umoci, or GNU tar), `imgfs
//! mount` wrapped so that it always unmounts, and a tree comparison that looks
//! at everything `lstat`, `readlink` and `llistxattr` can see.
//!
//! Every external command runs with a hard timeout ([`run`]), and every walk
//! over a mount runs in a thread that is abandoned, and its FUSE connection
//! aborted, after a timeout ([`within`]): a broken imgfs fails a test, it never
//! hangs CI. Tests run in parallel threads: everything here is per test
//! (ports, temp dirs, mountpoints, caches) except the built image layouts,
//! which are shared read-only.

#![allow(dead_code)] // each test binary uses a different part of the harness

pub mod proxy;

use sha2::{Digest as _, Sha256};
use std::collections::{BTreeMap, HashMap};
use std::ffi::OsStr;
use std::fs::{self, File};
use std::io::{Read, Seek, Write};
use std::net::TcpListener;
use std::os::unix::ffi::{OsStrExt, OsStringExt};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex, OnceLock, mpsc};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The `imgfs` binary under test.
pub const IMGFS: &str = env!("CARGO_BIN_EXE_imgfs");
/// Upper bound for quick commands (skopeo on small images, chroot, one read).
pub const SHORT: Duration = Duration::from_secs(30);
/// Upper bound for an unmount.
const UMOUNT_TIMEOUT: Duration = Duration::from_secs(15);
/// Upper bound for a mount, which may index a few hundred MiB first.
pub const MOUNT_TIMEOUT: Duration = Duration::from_secs(120);
/// Upper bound for walking and hashing a whole mounted tree.
pub const WALK_TIMEOUT: Duration = Duration::from_secs(90);
/// How long the registry may take to answer `/v2/` after it is started.
const REGISTRY_START: Duration = Duration::from_secs(20);
const REGISTRY_START_TRIES: usize = 5;
const POLL: Duration = Duration::from_millis(20);
/// Read size for hashing file contents.
const HASH_CHUNK: usize = 1 << 20;
/// Largest xattr list or value Linux allows (XATTR_LIST_MAX, XATTR_SIZE_MAX).
const XATTR_MAX: usize = 64 * 1024;
/// xattrs that differ between any two filesystems and say nothing of the image.
const IGNORED_XATTRS: &[&[u8]] = &[b"security.selinux"];

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn script(name: &str) -> PathBuf {
    repo_root().join("scripts").join(name)
}

/// The tests mount, mknod and chown: they need root. Fails with a clear
/// message instead of a dozen confusing ones.
pub fn require_root() {
    assert!(
        rustix::process::geteuid().is_root(),
        "imgfs integration tests need root (FUSE mounts, device nodes, owners): run `sudo scripts/test`"
    );
}

// ------------------------------------------------------------------ commands

/// What a finished command left behind.
#[derive(Debug)]
pub struct Output {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status.success()
    }
}

/// Runs `cmd` to completion with a hard `timeout` (killed, then a panic).
///
/// Output goes to unnamed temp files rather than pipes: `imgfs mount`
/// daemonizes, and a daemon that inherited a pipe would keep a pipe reader
/// waiting for EOF forever.
pub fn run(cmd: &mut Command, timeout: Duration) -> Output {
    let mut out = tempfile::tempfile().expect("temp file for stdout");
    let mut err = tempfile::tempfile().expect("temp file for stderr");
    cmd.stdin(Stdio::null())
        .stdout(out.try_clone().expect("dup stdout file"))
        .stderr(err.try_clone().expect("dup stderr file"));
    let shown = format!("{cmd:?}");
    let start = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {shown}: {e}"));
    let status = loop {
        if let Some(status) = child.try_wait().expect("wait for child") {
            break status;
        }
        if start.elapsed() > timeout {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = read_back(&mut err);
            panic!("timed out after {timeout:?}: {shown}\nstderr so far:\n{stderr}");
        }
        std::thread::sleep(POLL);
    };
    Output {
        status,
        stdout: read_back(&mut out),
        stderr: read_back(&mut err),
        elapsed: start.elapsed(),
    }
}

fn read_back(f: &mut File) -> String {
    let mut bytes = Vec::new();
    let _ = f.rewind();
    let _ = f.read_to_end(&mut bytes);
    String::from_utf8_lossy(&bytes).into_owned()
}

/// [`run`], and a panic with everything it printed unless it succeeded.
pub fn run_ok(cmd: &mut Command, timeout: Duration) -> Output {
    let shown = format!("{cmd:?}");
    let out = run(cmd, timeout);
    assert!(
        out.success(),
        "{shown} failed ({}):\nstdout:\n{}\nstderr:\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    out
}

/// Runs `f` on another thread and gives up after `timeout`. Walking a mount
/// goes through FUSE, where a bug can block a syscall forever; on timeout the
/// mount's connection is aborted, which fails every pending request (so the
/// thread comes back), and the test panics.
pub fn within<T: Send + 'static>(
    what: &str,
    timeout: Duration,
    mount: &Mount,
    f: impl FnOnce() -> T + Send + 'static,
) -> T {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(f());
    });
    match rx.recv_timeout(timeout) {
        Ok(value) => value,
        Err(mpsc::RecvTimeoutError::Timeout) => {
            mount.abort();
            panic!(
                "{what}: no answer within {timeout:?}; FUSE connection of {} aborted",
                mount.path().display()
            );
        }
        Err(mpsc::RecvTimeoutError::Disconnected) => panic!("{what}: the worker thread panicked"),
    }
}

/// Exactly one line on stderr, starting `imgfs: `, containing each of `words`
/// (case-insensitively).
pub fn assert_one_line_error(stderr: &str, words: &[&str]) {
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert!(
        lines.len() == 1 && lines[0].starts_with("imgfs: "),
        "expected one line starting 'imgfs: ', got:\n{stderr}"
    );
    let lower = lines[0].to_lowercase();
    for word in words {
        assert!(
            lower.contains(&word.to_lowercase()),
            "error line does not mention {word:?}: {}",
            lines[0]
        );
    }
}

// ------------------------------------------------------------------ registry

/// How to start a [`Registry`].
#[derive(Default, Clone)]
pub struct RegistryOptions {
    /// Basic auth (htpasswd) with this user and password.
    pub auth: Option<(String, String)>,
    /// Run as a pull-through cache (proxy mode) of the registry at this URL.
    pub proxy: Option<String>,
}

/// One request the registry logged.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub uri: String,
    pub status: u16,
    /// Body bytes written to the client (`http.response.written`).
    pub written: u64,
}

impl Request {
    pub fn is_blob_get(&self) -> bool {
        self.method == "GET" && self.uri.contains("/blobs/sha256:")
    }
}

/// Runs `docker-registry serve CONFIG`, appending its output to `log`.
fn spawn_registry(config: &Path, log: &Path) -> Result<std::process::Child, String> {
    let log_file = fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| e.to_string())?;
    Command::new("/usr/bin/docker-registry")
        .arg("serve")
        .arg(config)
        .stdin(Stdio::null())
        .stdout(log_file.try_clone().map_err(|e| e.to_string())?)
        .stderr(log_file)
        .spawn()
        .map_err(|e| format!("cannot run /usr/bin/docker-registry: {e}"))
}

/// A `docker-registry` on 127.0.0.1:<free port>, storing in a temp dir,
/// killed on drop.
pub struct Registry {
    child: std::process::Child,
    dir: TempDir,
    pub port: u16,
    log: PathBuf,
    docker_config: PathBuf,
}

impl Registry {
    pub fn start(opts: RegistryOptions) -> Registry {
        require_root();
        let mut last = String::new();
        for _ in 0..REGISTRY_START_TRIES {
            match Self::try_start(&opts) {
                Ok(reg) => return reg,
                // Another test may take the port between probing and binding.
                Err(why) => last = why,
            }
        }
        panic!("docker-registry did not start: {last}");
    }

    fn try_start(opts: &RegistryOptions) -> Result<Registry, String> {
        let dir = tempfile::Builder::new()
            .prefix("imgfs-registry-")
            .tempdir()
            .map_err(|e| e.to_string())?;
        let port = free_port();
        let root = dir.path().join("storage");
        let mut config = format!(
            "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  filesystem:\n    \
             rootdirectory: {}\n  delete:\n    enabled: true\nhttp:\n  addr: 127.0.0.1:{port}\n",
            root.display()
        );
        let docker_config = dir.path().join("docker-config");
        fs::create_dir_all(&docker_config).map_err(|e| e.to_string())?;
        if let Some((user, password)) = &opts.auth {
            let htpasswd = dir.path().join("htpasswd");
            run_ok(
                Command::new("htpasswd")
                    .arg("-Bbc")
                    .arg(&htpasswd)
                    .arg(user)
                    .arg(password),
                SHORT,
            );
            config += &format!(
                "auth:\n  htpasswd:\n    realm: imgfs-test\n    path: {}\n",
                htpasswd.display()
            );
            write_docker_config(&docker_config, &format!("127.0.0.1:{port}"), user, password);
        } else {
            fs::write(docker_config.join("config.json"), "{}\n").map_err(|e| e.to_string())?;
        }
        if let Some(remote) = &opts.proxy {
            config += &format!("proxy:\n  remoteurl: {remote}\n");
        }
        let config_path = dir.path().join("config.yml");
        fs::write(&config_path, config).map_err(|e| e.to_string())?;
        let log = dir.path().join("registry.log");
        let child = spawn_registry(&config_path, &log)?;
        let mut reg = Registry {
            child,
            dir,
            port,
            log,
            docker_config,
        };
        reg.wait_until_serving()?;
        Ok(reg)
    }

    /// Kills the registry process (its storage stays): clients see refused
    /// connections until [`Self::start_again`].
    pub fn stop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the registry again on the same port, storage and log.
    pub fn start_again(&mut self) {
        self.child = spawn_registry(&self.dir.path().join("config.yml"), &self.log)
            .unwrap_or_else(|e| panic!("restarting docker-registry: {e}"));
        self.wait_until_serving()
            .unwrap_or_else(|e| panic!("restarting docker-registry: {e}"));
    }

    fn wait_until_serving(&mut self) -> Result<(), String> {
        let reg = self;
        let deadline = Instant::now() + REGISTRY_START;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = reg.child.try_wait() {
                return Err(format!("exited with {status}: {}", reg.log_text()));
            }
            // Any HTTP answer (200, or 401 with auth) means it is serving.
            let probe = run(
                Command::new("curl")
                    .args([
                        "-s",
                        "-o",
                        "/dev/null",
                        "-w",
                        "%{http_code}",
                        "--max-time",
                        "2",
                    ])
                    .arg(reg.url("/v2/")),
                SHORT,
            );
            if matches!(probe.stdout.trim(), "200" | "401") {
                return Ok(());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Err(format!(
            "no answer on /v2/ within {REGISTRY_START:?}: {}",
            reg.log_text()
        ))
    }

    /// `127.0.0.1:PORT`, the registry part of a reference.
    pub fn host(&self) -> String {
        format!("127.0.0.1:{}", self.port)
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// A reference to `name` (`repo:tag`) on this registry.
    pub fn reference(&self, name: &str) -> String {
        format!("{}/{name}", self.host())
    }

    /// Directory holding a `config.json` with this registry's credentials
    /// (an empty one without auth): the `DOCKER_CONFIG` for pushes and mounts.
    pub fn docker_config(&self) -> &Path {
        &self.docker_config
    }

    pub fn credentials(&self) -> Option<(String, String)> {
        let text = fs::read_to_string(self.docker_config.join("config.json")).ok()?;
        let json: serde_json::Value = serde_json::from_str(&text).ok()?;
        let auth = json["auths"][self.host()]["auth"].as_str()?.to_string();
        let decoded = String::from_utf8(base64_decode(&auth)?).ok()?;
        let (user, password) = decoded.split_once(':')?;
        Some((user.to_string(), password.to_string()))
    }

    /// Where the registry keeps the bytes of blob `digest` (`sha256:...`).
    pub fn blob_path(&self, digest: &str) -> PathBuf {
        let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
        self.dir
            .path()
            .join("storage/docker/registry/v2/blobs/sha256")
            .join(&hex[..2])
            .join(hex)
            .join("data")
    }

    pub fn log_text(&self) -> String {
        fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Every request logged so far, in order.
    pub fn requests(&self) -> Vec<Request> {
        self.log_text()
            .lines()
            .filter_map(parse_request_line)
            .collect()
    }

    /// Blob GETs logged after the first `mark` requests (see [`Self::requests`]),
    /// once the log has stopped growing (a response is logged after it ends).
    pub fn blob_gets_since(&self, mark: usize) -> Vec<Request> {
        let mut last = usize::MAX;
        for _ in 0..50 {
            let now = self.requests().len();
            if now == last {
                break;
            }
            last = now;
            std::thread::sleep(Duration::from_millis(100));
        }
        self.requests()
            .into_iter()
            .skip(mark)
            .filter(Request::is_blob_get)
            .collect()
    }

    /// The manifest of `name` (`repo:tag` or `repo@digest`) as JSON, with
    /// its digest.
    pub fn manifest(&self, name: &str) -> (serde_json::Value, String) {
        let (repo, reference) = match name.split_once('@') {
            Some(pair) => pair,
            None => name
                .rsplit_once(':')
                .expect("name is repo:tag or repo@digest"),
        };
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-f", "-D", "-", "--max-time", "30", "-H"])
            .arg(format!(
                "Accept: {}, {}, application/vnd.docker.distribution.manifest.v2+json, \
                 application/vnd.docker.distribution.manifest.list.v2+json",
                "application/vnd.oci.image.manifest.v1+json",
                "application/vnd.oci.image.index.v1+json"
            ))
            .arg(self.url(&format!("/v2/{repo}/manifests/{reference}")));
        if let Some((user, password)) = self.credentials() {
            cmd.arg("-u").arg(format!("{user}:{password}"));
        }
        let out = run_ok(&mut cmd, SHORT);
        let (headers, body) = out
            .stdout
            .split_once("\r\n\r\n")
            .expect("HTTP headers then body");
        let digest = headers
            .lines()
            .find_map(|l| {
                l.to_ascii_lowercase()
                    .strip_prefix("docker-content-digest:")
                    .map(|v| v.trim().to_string())
            })
            .expect("Docker-Content-Digest header");
        (
            serde_json::from_str(body).expect("manifest is JSON"),
            digest,
        )
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port nobody listens on right now (the registry binds it a moment later).
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("probe a free port")
}

/// Parses one `msg="response completed"` line of the registry's log
/// (logrus text format: `key=value` or `key="quoted value"`).
fn parse_request_line(line: &str) -> Option<Request> {
    if !line.contains("msg=\"response completed\"") {
        return None;
    }
    let field = |key: &str| -> Option<String> {
        let start = line.find(&format!(" {key}="))? + key.len() + 2;
        let rest = &line[start..];
        if let Some(quoted) = rest.strip_prefix('"') {
            let mut value = String::new();
            let mut chars = quoted.chars();
            while let Some(c) = chars.next() {
                match c {
                    '\\' => value.extend(chars.next()),
                    '"' => return Some(value),
                    c => value.push(c),
                }
            }
            None
        } else {
            Some(rest.split(' ').next().unwrap_or("").to_string())
        }
    };
    Some(Request {
        method: field("http.request.method")?,
        uri: field("http.request.uri")?,
        status: field("http.response.status")?.parse().ok()?,
        written: field("http.response.written")
            .and_then(|w| w.parse().ok())
            .unwrap_or(0),
    })
}

/// Writes `DIR/config.json` holding `user:password` for `host`, as
/// `docker login` would.
pub fn write_docker_config(dir: &Path, host: &str, user: &str, password: &str) {
    fs::create_dir_all(dir).expect("create docker config dir");
    let auth = base64_encode(format!("{user}:{password}").as_bytes());
    let json = serde_json::json!({ "auths": { host: { "auth": auth } } });
    fs::write(dir.join("config.json"), json.to_string()).expect("write config.json");
}

const BASE64: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";

fn base64_encode(bytes: &[u8]) -> String {
    let mut out = String::new();
    for chunk in bytes.chunks(3) {
        let n = chunk
            .iter()
            .enumerate()
            .fold(0u32, |acc, (i, &b)| acc | (u32::from(b) << (16 - 8 * i)));
        for i in 0..4 {
            if i <= chunk.len() {
                out.push(char::from(BASE64[((n >> (18 - 6 * i)) & 63) as usize]));
            } else {
                out.push('=');
            }
        }
    }
    out
}

fn base64_decode(text: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let (mut acc, mut bits) = (0u32, 0);
    for c in text.bytes().filter(|&c| c != b'=') {
        let value = BASE64.iter().position(|&b| b == c)? as u32;
        acc = (acc << 6) | value;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

// ------------------------------------------------------------------ images

/// How to compress the layers of a pushed image.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Compress {
    None,
    Gzip,
    /// gzip at level 1 (for the big image: fast to make).
    GzipFast,
    Zstd,
}

/// Built layouts, shared by the tests of one process (and between test
/// binaries when `IMGFS_TEST_IMAGES` names a directory, as `scripts/test`
/// does): one lock per image, so two tests never build the same one twice.
fn layouts_dir() -> PathBuf {
    static DIR: OnceLock<(Option<TempDir>, PathBuf)> = OnceLock::new();
    DIR.get_or_init(|| match std::env::var_os("IMGFS_TEST_IMAGES") {
        Some(dir) => {
            fs::create_dir_all(&dir).expect("create $IMGFS_TEST_IMAGES");
            (None, PathBuf::from(dir))
        }
        None => {
            let tmp = tempfile::Builder::new()
                .prefix("imgfs-images-")
                .tempdir()
                .expect("temp dir for images");
            let path = tmp.path().to_path_buf();
            (Some(tmp), path)
        }
    })
    .1
    .clone()
}

/// The OCI layout of test image `name` (see `scripts/make-test-image list`),
/// built on first use.
pub fn layout(name: &str) -> PathBuf {
    static LOCKS: OnceLock<Mutex<HashMap<String, Arc<Mutex<()>>>>> = OnceLock::new();
    let lock = LOCKS
        .get_or_init(Default::default)
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .entry(name.to_string())
        .or_default()
        .clone();
    let _guard = lock.lock().unwrap_or_else(|e| e.into_inner());
    let dir = layouts_dir().join(name);
    if !dir.join("index.json").exists() {
        let started = Instant::now();
        run_ok(
            Command::new(script("make-test-image"))
                .arg("build")
                .arg(name)
                .arg(&dir),
            MOUNT_TIMEOUT,
        );
        eprintln!("built test image {name} in {:.1?}", started.elapsed());
    }
    dir
}

/// Pushes test image `image` to `reg` as `name` (`repo:tag`); returns the
/// reference to mount.
pub fn push(reg: &Registry, image: &str, name: &str, compress: Compress) -> String {
    let layout = layout(image);
    let reference = reg.reference(name);
    let mut cmd = Command::new(script("make-test-image"));
    cmd.arg("push")
        .arg(format!("{}:latest", layout.display()))
        .arg(&reference)
        .env("DOCKER_CONFIG", reg.docker_config());
    let (format, level) = match compress {
        Compress::None => ("none", None),
        Compress::Gzip => ("gzip", None),
        Compress::GzipFast => ("gzip", Some("1")),
        Compress::Zstd => ("zstd", None),
    };
    cmd.args(["--compress", format]);
    if let Some(level) = level {
        cmd.args(["--level", level]);
    }
    run_ok(&mut cmd, MOUNT_TIMEOUT);
    reference
}

/// A tree unpacked by tools other than imgfs, kept until dropped.
pub struct Unpacked {
    dir: TempDir,
}

impl Unpacked {
    /// The root directory of the unpacked image.
    pub fn path(&self) -> PathBuf {
        self.dir.path().join("rootfs")
    }
}

/// The image at `reference` on `reg`, pulled by skopeo and unpacked by umoci
/// (as root, so owners, devices and xattrs are kept): the expected tree.
pub fn reference_unpack(reg: &Registry, reference: &str) -> Unpacked {
    let dir = tempfile::Builder::new()
        .prefix("imgfs-reference-")
        .tempdir()
        .expect("temp dir");
    let oci = dir.path().join("oci");
    let mut copy = Command::new("skopeo");
    // umoci 0.4.7 unpacks tar and tar+gzip only: have skopeo turn every
    // layer (zstd too) into gzip on the way.
    copy.args([
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--dest-compress",
        "--dest-compress-format",
        "gzip",
    ]);
    if let Some((user, password)) = reg.credentials() {
        copy.arg("--src-creds").arg(format!("{user}:{password}"));
    }
    copy.arg(format!("docker://{reference}"))
        .arg(format!("oci:{}:ref", oci.display()));
    run_ok(&mut copy, MOUNT_TIMEOUT);
    let unpacked = Unpacked { dir };
    run_ok(
        Command::new("umoci")
            .args(["--log", "error", "raw", "unpack", "--image"])
            .arg(format!("{}:ref", oci.display()))
            .arg(unpacked.path()),
        MOUNT_TIMEOUT,
    );
    unpacked
}

/// Test image `image` unpacked by GNU tar, layer after layer, for images that
/// umoci cannot unpack (GNU sparse entries) and that hold no whiteouts.
pub fn gnu_tar_unpack(image: &str) -> Unpacked {
    let dir = tempfile::Builder::new()
        .prefix("imgfs-gnutar-")
        .tempdir()
        .expect("temp dir");
    let unpacked = Unpacked { dir };
    run_ok(
        Command::new(script("make-test-image"))
            .arg("gnu-unpack")
            .arg(format!("{}:latest", layout(image).display()))
            .arg(unpacked.path()),
        MOUNT_TIMEOUT,
    );
    unpacked
}

/// The layer descriptors (`mediaType`, `digest`, `size`) of `name` on `reg`.
pub fn layers(reg: &Registry, name: &str) -> Vec<(String, String, u64)> {
    let (manifest, _) = reg.manifest(name);
    manifest["layers"]
        .as_array()
        .expect("manifest has layers")
        .iter()
        .map(|l| {
            (
                l["mediaType"].as_str().unwrap_or_default().to_string(),
                l["digest"].as_str().unwrap_or_default().to_string(),
                l["size"].as_u64().unwrap_or_default(),
            )
        })
        .collect()
}

// ------------------------------------------------------------------ mounts

/// How to run `imgfs mount`.
#[derive(Default, Clone)]
pub struct MountOptions {
    pub platform: Option<String>,
    /// Shared between mounts to test a warm cache; a fresh one otherwise.
    pub cache_dir: Option<PathBuf>,
    /// `DOCKER_CONFIG` for imgfs; an empty one (never the host's) otherwise.
    pub docker_config: Option<PathBuf>,
    pub extra_args: Vec<String>,
}

/// Why `imgfs mount` failed.
#[derive(Debug)]
pub struct MountFailure {
    pub status: ExitStatus,
    pub stderr: String,
    pub elapsed: Duration,
}

/// A live `imgfs mount`, unmounted on drop.
pub struct Mount {
    dir: Option<TempDir>,
    mountpoint: PathBuf,
    cache: Option<TempDir>,
    pub cache_dir: PathBuf,
    /// How long `imgfs mount` took to return.
    pub elapsed: Duration,
    pub stderr: String,
}

impl Mount {
    /// Mounts `reference` or panics with imgfs's stderr.
    pub fn new(reference: &str, opts: MountOptions) -> Mount {
        Self::try_new(reference, opts).unwrap_or_else(|f| {
            panic!(
                "imgfs mount {reference} failed ({}) after {:.1?}:\n{}",
                f.status, f.elapsed, f.stderr
            )
        })
    }

    pub fn try_new(reference: &str, opts: MountOptions) -> Result<Mount, MountFailure> {
        require_root();
        let dir = tempfile::Builder::new()
            .prefix("imgfs-mnt-")
            .tempdir()
            .expect("temp dir");
        let mountpoint = dir.path().join("mnt");
        fs::create_dir(&mountpoint).expect("create mountpoint");
        let (cache, cache_dir) = match opts.cache_dir {
            Some(path) => (None, path),
            None => {
                let tmp = tempfile::Builder::new()
                    .prefix("imgfs-cache-")
                    .tempdir()
                    .expect("temp dir");
                let path = tmp.path().to_path_buf();
                (Some(tmp), path)
            }
        };
        let docker_config = opts.docker_config.unwrap_or_else(|| {
            let empty = dir.path().join("docker-config");
            fs::create_dir_all(&empty).expect("create empty docker config");
            empty
        });
        let mut cmd = Command::new(IMGFS);
        cmd.arg("mount")
            .arg(reference)
            .arg(&mountpoint)
            .arg("--cache-dir")
            .arg(&cache_dir)
            .env("DOCKER_CONFIG", &docker_config);
        if let Some(platform) = &opts.platform {
            cmd.args(["--platform", platform]);
        }
        cmd.args(&opts.extra_args);
        let out = run(&mut cmd, MOUNT_TIMEOUT);
        let mount = Mount {
            dir: Some(dir),
            mountpoint,
            cache,
            cache_dir,
            elapsed: out.elapsed,
            stderr: out.stderr.clone(),
        };
        if !out.success() {
            let mounted = mount.is_mounted();
            drop(mount);
            assert!(
                !mounted,
                "imgfs mount failed ({}) but left a mount behind:\n{}",
                out.status, out.stderr
            );
            return Err(MountFailure {
                status: out.status,
                stderr: out.stderr,
                elapsed: out.elapsed,
            });
        }
        assert!(
            mount.is_mounted(),
            "imgfs mount exited 0 but {} is not a mountpoint:\n{}",
            mount.path().display(),
            out.stderr
        );
        Ok(mount)
    }

    pub fn path(&self) -> &Path {
        &self.mountpoint
    }

    pub fn is_mounted(&self) -> bool {
        is_mountpoint(&self.mountpoint)
    }

    /// Runs `imgfs umount` and checks it worked.
    pub fn unmount(mut self) {
        let out = run(
            Command::new(IMGFS).arg("umount").arg(&self.mountpoint),
            UMOUNT_TIMEOUT,
        );
        let still = self.is_mounted();
        let dir = self.dir.take();
        self.force_unmount();
        drop(dir);
        assert!(
            out.success() && !still,
            "imgfs umount failed ({}), still mounted: {still}:\n{}",
            out.status,
            out.stderr
        );
    }

    /// Fails every pending and future request of this mount (the kernel's
    /// `/sys/fs/fuse/connections/N/abort`), for a mount that stopped answering.
    pub fn abort(&self) {
        if let Some(minor) = fuse_connection(&self.mountpoint) {
            ensure_fusectl();
            let _ = fs::write(format!("/sys/fs/fuse/connections/{minor}/abort"), "1");
        }
        let _ = run(
            Command::new("umount").arg("-l").arg(&self.mountpoint),
            UMOUNT_TIMEOUT,
        );
    }

    fn force_unmount(&mut self) {
        if !self.is_mounted() {
            return;
        }
        if std::thread::panicking() {
            // The test already failed, maybe because this mount hangs: do
            // not wait on it again.
            self.abort();
            return;
        }
        let _ = run(
            Command::new(IMGFS).arg("umount").arg(&self.mountpoint),
            UMOUNT_TIMEOUT,
        );
        if self.is_mounted() {
            let _ = run(
                Command::new("fusermount3")
                    .arg("-u")
                    .arg("-z")
                    .arg(&self.mountpoint),
                UMOUNT_TIMEOUT,
            );
        }
        if self.is_mounted() {
            self.abort();
        }
    }
}

impl Drop for Mount {
    fn drop(&mut self) {
        self.force_unmount();
        if self.is_mounted() {
            // Never let TempDir's cleanup walk into a live mount.
            if let Some(dir) = self.dir.take() {
                let _ = dir.keep();
            }
        }
        drop(self.cache.take());
    }
}

/// Whether `path` is a mountpoint right now (from /proc/self/mountinfo).
pub fn is_mountpoint(path: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else {
        return false;
    };
    let wanted = path.as_os_str().as_bytes();
    info.lines()
        .any(|line| line.split(' ').nth(4).map(unescape_mountinfo).as_deref() == Some(wanted))
}

fn unescape_mountinfo(field: &str) -> Vec<u8> {
    let bytes = field.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'\\'
            && i + 3 < bytes.len()
            && bytes[i + 1..i + 4]
                .iter()
                .all(|b| (b'0'..=b'7').contains(b))
        {
            out.push(u8::from_str_radix(&field[i + 1..i + 4], 8).unwrap_or(b'?'));
            i += 4;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}

/// The FUSE connection number of the filesystem mounted at `path`: the minor
/// of its device number, looked up in mountinfo (a stat would go through FUSE).
fn fuse_connection(path: &Path) -> Option<u32> {
    let info = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let wanted = path.as_os_str().as_bytes();
    info.lines().rev().find_map(|line| {
        let fields: Vec<&str> = line.split(' ').collect();
        if fields.get(4).map(|f| unescape_mountinfo(f)).as_deref() != Some(wanted) {
            return None;
        }
        fields.get(2)?.split_once(':')?.1.parse().ok()
    })
}

fn ensure_fusectl() {
    let conns = Path::new("/sys/fs/fuse/connections");
    if fs::read_dir(conns)
        .map(|mut d| d.next().is_none())
        .unwrap_or(true)
    {
        let _ = run(
            Command::new("mount")
                .args(["-t", "fusectl", "fusectl"])
                .arg(conns),
            SHORT,
        );
    }
}

// ------------------------------------------------------------------ trees

/// Everything compared about one directory entry.
#[derive(Debug, Clone, PartialEq)]
struct Node {
    /// `st_mode`: file type and permission bits, incl. setuid/setgid/sticky.
    mode: u32,
    uid: u32,
    gid: u32,
    /// Not for directories, whose size is the filesystem's business.
    size: Option<u64>,
    nlink: u64,
    mtime: (i64, i64),
    rdev: Option<(u32, u32)>,
    target: Option<Vec<u8>>,
    content: Option<Result<String, String>>,
    xattrs: BTreeMap<Vec<u8>, Result<Vec<u8>, String>>,
    inode: (u64, u64),
}

/// Differences between the trees at `a` and `b`, one line each (empty when
/// they are the same). Compared with `lstat` (symlinks never followed): type,
/// mode, owner, size, content (sha256), symlink target, device numbers,
/// xattrs (not `security.selinux`), hardlink groups, nlink, and mtime to the
/// nanosecond, directories and the root included.
pub fn compare_trees(a: &Path, b: &Path) -> Vec<String> {
    let (tree_a, tree_b) = (scan_tree(a), scan_tree(b));
    let (groups_a, groups_b) = (hardlink_groups(&tree_a), hardlink_groups(&tree_b));
    let mut diffs = Vec::new();
    for (path, node_a) in &tree_a {
        let shown = show_path(path);
        let Some(node_b) = tree_b.get(path) else {
            diffs.push(format!("{shown}: only in {}", a.display()));
            continue;
        };
        compare_nodes(&shown, node_a, node_b, &mut diffs);
        if node_a.mode & libc::S_IFMT != libc::S_IFDIR {
            let (ga, gb) = (&groups_a[&node_a.inode], &groups_b[&node_b.inode]);
            if ga != gb {
                diffs.push(format!(
                    "{shown}: hardlink group {:?} != {:?}",
                    ga.iter().map(|p| show_path(p)).collect::<Vec<_>>(),
                    gb.iter().map(|p| show_path(p)).collect::<Vec<_>>()
                ));
            }
        }
    }
    for path in tree_b.keys().filter(|p| !tree_a.contains_key(*p)) {
        diffs.push(format!("{}: only in {}", show_path(path), b.display()));
    }
    diffs
}

fn compare_nodes(shown: &str, a: &Node, b: &Node, diffs: &mut Vec<String>) {
    let mut check = |what: &str, x: String, y: String| {
        if x != y {
            diffs.push(format!("{shown}: {what} {x} != {y}"));
        }
    };
    check("mode", format!("{:o}", a.mode), format!("{:o}", b.mode));
    if a.mode & libc::S_IFMT != b.mode & libc::S_IFMT {
        return; // the rest would only repeat that the types differ
    }
    check(
        "uid:gid",
        format!("{}:{}", a.uid, a.gid),
        format!("{}:{}", b.uid, b.gid),
    );
    check("size", format!("{:?}", a.size), format!("{:?}", b.size));
    check("nlink", a.nlink.to_string(), b.nlink.to_string());
    check(
        "mtime",
        format!("{}.{:09}", a.mtime.0, a.mtime.1),
        format!("{}.{:09}", b.mtime.0, b.mtime.1),
    );
    check("rdev", format!("{:?}", a.rdev), format!("{:?}", b.rdev));
    check(
        "symlink target",
        format!("{:?}", a.target.as_deref().map(String::from_utf8_lossy)),
        format!("{:?}", b.target.as_deref().map(String::from_utf8_lossy)),
    );
    check(
        "content",
        format!("{:?}", a.content),
        format!("{:?}", b.content),
    );
    let show = |x: &BTreeMap<Vec<u8>, Result<Vec<u8>, String>>| {
        x.iter()
            .map(|(k, v)| {
                format!(
                    "{}={:?}",
                    String::from_utf8_lossy(k),
                    v.as_ref().map(|v| String::from_utf8_lossy(v).into_owned())
                )
            })
            .collect::<Vec<_>>()
            .join(", ")
    };
    check(
        "xattrs",
        format!("{{{}}}", show(&a.xattrs)),
        format!("{{{}}}", show(&b.xattrs)),
    );
}

fn show_path(path: &[u8]) -> String {
    if path.is_empty() {
        "/".to_string()
    } else {
        format!("/{}", String::from_utf8_lossy(path).escape_debug())
    }
}

/// Every entry under `root` (root included as ""), by relative path bytes.
fn scan_tree(root: &Path) -> BTreeMap<Vec<u8>, Node> {
    let mut tree = BTreeMap::new();
    let mut todo = vec![(Vec::new(), root.to_path_buf())];
    while let Some((rel, path)) = todo.pop() {
        let node = scan_node(&path);
        if node.mode & libc::S_IFMT == libc::S_IFDIR {
            let entries =
                fs::read_dir(&path).unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()));
            for entry in entries {
                let entry = entry.unwrap_or_else(|e| panic!("read_dir {}: {e}", path.display()));
                let mut child = rel.clone();
                if !child.is_empty() {
                    child.push(b'/');
                }
                child.extend_from_slice(entry.file_name().as_bytes());
                todo.push((child, entry.path()));
            }
        }
        tree.insert(rel, node);
    }
    tree
}

fn scan_node(path: &Path) -> Node {
    let meta =
        fs::symlink_metadata(path).unwrap_or_else(|e| panic!("lstat {}: {e}", path.display()));
    let kind = meta.mode() & libc::S_IFMT;
    let file_type = meta.file_type();
    Node {
        mode: meta.mode(),
        uid: meta.uid(),
        gid: meta.gid(),
        size: (kind != libc::S_IFDIR).then_some(meta.size()),
        nlink: meta.nlink(),
        mtime: (meta.mtime(), meta.mtime_nsec()),
        rdev: (file_type.is_char_device() || file_type.is_block_device())
            .then(|| (libc::major(meta.rdev()), libc::minor(meta.rdev()))),
        target: file_type.is_symlink().then(|| {
            fs::read_link(path)
                .map(|t| t.into_os_string().into_vec())
                .unwrap_or_else(|e| format!("<{e}>").into_bytes())
        }),
        content: file_type
            .is_file()
            .then(|| sha256_file(path).map_err(|e| e.to_string())),
        xattrs: read_xattrs(path),
        inode: (meta.dev(), meta.ino()),
    }
}

/// sha256 of a file's content, read through the ordinary `read` path.
pub fn sha256_file(path: &Path) -> std::io::Result<String> {
    let mut file = File::open(path)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; HASH_CHUNK];
    loop {
        let n = file.read(&mut buf)?;
        if n == 0 {
            return Ok(hex(&hasher.finalize()));
        }
        hasher.update(&buf[..n]);
    }
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn read_xattrs(path: &Path) -> BTreeMap<Vec<u8>, Result<Vec<u8>, String>> {
    let mut names = vec![0u8; XATTR_MAX];
    let len = match rustix::fs::llistxattr(path, &mut names) {
        Ok(len) => len,
        Err(e) => return BTreeMap::from([(b"<llistxattr>".to_vec(), Err(e.to_string()))]),
    };
    names.truncate(len);
    names
        .split(|&b| b == 0)
        .filter(|name| !name.is_empty() && !IGNORED_XATTRS.contains(name))
        .map(|name| {
            let mut value = vec![0u8; XATTR_MAX];
            let got = rustix::fs::lgetxattr(path, OsStr::from_bytes(name), &mut value).map(|n| {
                value.truncate(n);
                value
            });
            (name.to_vec(), got.map_err(|e| e.to_string()))
        })
        .collect()
}

/// For each inode of a non-directory, the sorted paths that share it.
fn hardlink_groups(tree: &BTreeMap<Vec<u8>, Node>) -> HashMap<(u64, u64), Vec<Vec<u8>>> {
    let mut groups: HashMap<(u64, u64), Vec<Vec<u8>>> = HashMap::new();
    for (path, node) in tree {
        if node.mode & libc::S_IFMT != libc::S_IFDIR {
            groups.entry(node.inode).or_default().push(path.clone());
        }
    }
    groups
}

/// Asserts two trees are the same, listing every difference (at most
/// `MAX_SHOWN` of them) when they are not.
pub fn assert_same_trees(expected: &Path, actual: &Path, what: &str) {
    const MAX_SHOWN: usize = 60;
    let diffs = compare_trees(expected, actual);
    if !diffs.is_empty() {
        let shown: Vec<&str> = diffs.iter().take(MAX_SHOWN).map(String::as_str).collect();
        panic!(
            "{what}: {} difference(s) between {} (expected) and {} (imgfs):\n  {}",
            diffs.len(),
            expected.display(),
            actual.display(),
            shown.join("\n  ")
        );
    }
}

/// Flips one bit of byte `offset` of the file at `path`.
pub fn flip_byte(path: &Path, offset: u64) {
    let mut f = fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .expect("open blob to corrupt");
    let mut byte = [0u8; 1];
    f.seek(std::io::SeekFrom::Start(offset)).expect("seek");
    f.read_exact(&mut byte).expect("read byte");
    byte[0] ^= 0x20;
    f.seek(std::io::SeekFrom::Start(offset)).expect("seek");
    f.write_all(&byte).expect("write byte");
}

/// The pid of the daemon serving `mountpoint`, from `imgfs ps --json`.
pub fn daemon_pid(mountpoint: &Path) -> u32 {
    let out = run_ok(Command::new(IMGFS).args(["ps", "--json"]), SHORT);
    let list: serde_json::Value = serde_json::from_str(&out.stdout).expect("ps JSON");
    let wanted = mountpoint.to_string_lossy();
    list.as_array()
        .into_iter()
        .flatten()
        .find(|m| m["mountpoint"].as_str() == Some(&*wanted))
        .and_then(|m| m["pid"].as_u64())
        .expect("imgfs ps lists the mount") as u32
}

/// Resident memory of process `pid` in KiB (0 if it is gone).
pub fn rss_kib(pid: u32) -> u64 {
    fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// Pushes the OCI layout at `layout` (tag `latest`) to `reg` as `name`,
/// every blob as it is; returns the reference.
pub fn push_layout(reg: &Registry, layout: &Path, name: &str) -> String {
    let reference = reg.reference(name);
    run_ok(
        Command::new(script("make-test-image"))
            .arg("push")
            .arg(format!("{}:latest", layout.display()))
            .arg(&reference)
            .args(["--compress", "keep"]),
        MOUNT_TIMEOUT,
    );
    reference
}
