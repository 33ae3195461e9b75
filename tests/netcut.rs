//! The link to the registry cut for 30 s under a live mount: the registry
//! runs in its own network namespace, reachable over a veth pair, and the
//! namespace's end of the pair goes down (the host's end loses its carrier,
//! keeps its route, and drops what it sends: a pulled cable; taking the
//! host's end down instead would remove its route, and what imgfs sends
//! would follow the default route, which differs between machines). Processes
//! chrooted into the mount must never hang: cached data and the tree keep
//! answering at once, never-fetched data fails with `EIO` within the read
//! timeout and its retries, and once the link is back the same read returns
//! the right bytes from the same mount and daemon.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use tempfile::TempDir;

/// The veth pair's /30 is one of the 64 in this /24 (`.1` on the host,
/// `.2` in the namespace), chosen by process id so that two test runs at
/// once do not collide. Far from scripts/bench's 10.231.77.0/24.
const NET: &str = "10.201.173";
const SUBNETS: u32 = 64;
const REGISTRY_PORT: u16 = 5000;
/// `--read-timeout` of the mount, seconds.
const READ_TIMEOUT: u64 = 3;
/// How long the link stays down.
const CUT: Duration = Duration::from_secs(30);
/// A read of cached data, or a walk of the tree, while the link is down.
const CACHED_BOUND: Duration = Duration::from_secs(2);
/// A read of never-fetched data while the link is down must fail within
/// this (read timeout, retries, backoff).
const FAIL_BOUND: Duration = Duration::from_secs(25);
/// Once the registry answers again, the never-fetched read must succeed
/// within this.
const RECOVER_BOUND: Duration = Duration::from_secs(5);
/// Hard limit on any one process in the chroot: past it, it hung.
const HANG_LIMIT: Duration = Duration::from_secs(60);
/// The registry must answer within this once started, or the link is up.
const REGISTRY_START: Duration = Duration::from_secs(20);
const POLL: Duration = Duration::from_millis(100);
/// The file read, and the reads: `dd bs=4096 count=1 skip=BLOCK`.
const FILE: &str = "data/libs.bin";
const READ_LEN: usize = 4096;
/// Read before the cut (1 MiB in), during it (8 MiB in) and after (10 MiB).
const WARM_BLOCK: u64 = 256;
const COLD_BLOCK: u64 = 2048;
const AFTER_BLOCK: u64 = 2560;

/// A network namespace with a registry in it, behind a veth pair; all of it
/// removed on drop, panics included.
struct Netns {
    name: String,
    /// The network address's last byte: host `base + 1`, namespace `base + 2`.
    base: u32,
    host_veth: String,
    ns_veth: String,
    registry: Option<Child>,
    dir: TempDir,
}

impl Netns {
    fn new() -> Netns {
        require_root();
        let pid = std::process::id();
        let base = (pid % SUBNETS) * 4;
        let routes = run_ok(Command::new("ip").args(["-4", "route"]), SHORT).stdout;
        assert!(
            !routes.contains(&format!("{NET}.{base}/")),
            "{NET}.{base}/30 is already routed here; tests/netcut.rs needs it:\n{routes}"
        );
        let ns = Netns {
            name: format!("imgfs-netcut-{pid}"),
            base,
            host_veth: format!("incv{pid}"),
            ns_veth: format!("incp{pid}"),
            registry: None,
            dir: tempfile::Builder::new()
                .prefix("imgfs-netcut-")
                .tempdir()
                .expect("temp dir"),
        };
        ip(&["netns", "add", &ns.name]);
        ip(&[
            "link",
            "add",
            &ns.host_veth,
            "type",
            "veth",
            "peer",
            "name",
            &ns.ns_veth,
        ]);
        ip(&["link", "set", &ns.ns_veth, "netns", &ns.name]);
        let host_addr = format!("{NET}.{}/30", base + 1);
        ip(&["addr", "add", &host_addr, "dev", &ns.host_veth]);
        ip(&["link", "set", &ns.host_veth, "up"]);
        let ns_addr = format!("{NET}.{}/30", base + 2);
        ns.exec_ip(&["addr", "add", &ns_addr, "dev", &ns.ns_veth]);
        ns.exec_ip(&["link", "set", &ns.ns_veth, "up"]);
        ns.exec_ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// `ip ARGS` in the namespace (`ip -n`: no mount namespace either).
    fn exec_ip(&self, args: &[&str]) {
        let mut all = vec!["-n", &self.name];
        all.extend_from_slice(args);
        ip(&all);
    }

    /// `host:port` of the registry, as imgfs sees it.
    fn host(&self) -> String {
        format!("{NET}.{}:{REGISTRY_PORT}", self.base + 2)
    }

    fn start_registry(&mut self) {
        let config = self.dir.path().join("config.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  \
                 filesystem:\n    rootdirectory: {}\nhttp:\n  addr: {}\n",
                self.dir.path().join("storage").display(),
                self.host()
            ),
        )
        .expect("write registry config");
        let log = fs::File::create(self.dir.path().join("registry.log")).expect("registry log");
        // Only the network namespace: `ip netns exec` would also give the
        // registry a copy of the host's mounts, and any FUSE mount in it
        // (other tests', other jobs') would outlive its unmount until the
        // registry exits. nsenter execs: this child is the registry.
        let child = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.name))
            .args(["/usr/bin/docker-registry", "serve"])
            .arg(&config)
            .stdin(Stdio::null())
            .stdout(log.try_clone().expect("dup registry log"))
            .stderr(log)
            .spawn()
            .expect("start docker-registry in the namespace");
        self.registry = Some(child);
        self.wait_reachable();
    }

    /// Waits until the registry answers `/v2/` over the link.
    fn wait_reachable(&self) {
        let deadline = Instant::now() + REGISTRY_START;
        while Instant::now() < deadline {
            let probe = run(
                Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "-w", "%{http_code}"])
                    .args(["--max-time", "2"])
                    .arg(format!("http://{}/v2/", self.host())),
                SHORT,
            );
            if probe.stdout.trim() == "200" {
                return;
            }
            std::thread::sleep(POLL);
        }
        panic!(
            "docker-registry in {} did not answer within {REGISTRY_START:?}:\n{}",
            self.name,
            fs::read_to_string(self.dir.path().join("registry.log")).unwrap_or_default()
        );
    }

    /// Takes the namespace's end of the pair down (`up == false`) or up.
    fn set_link(&self, up: bool) {
        self.exec_ip(&["link", "set", &self.ns_veth, if up { "up" } else { "down" }]);
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        if let Some(mut child) = self.registry.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        // Deleting the namespace deletes its end of the pair, and with it
        // the host's end; the explicit delete covers a half-built pair.
        let _ = run(
            Command::new("ip").args(["netns", "delete", &self.name]),
            SHORT,
        );
        let _ = run(
            Command::new("ip").args(["link", "delete", &self.host_veth]),
            SHORT,
        );
    }
}

fn ip(args: &[&str]) {
    run_ok(Command::new("ip").args(args), SHORT);
}

/// The test image laid out by umoci, independently of imgfs and the registry.
fn reference_tree(image: &str) -> TempDir {
    let dir = tempfile::Builder::new()
        .prefix("imgfs-netcut-ref-")
        .tempdir()
        .expect("temp dir");
    run_ok(
        Command::new("umoci")
            .args(["--log", "error", "raw", "unpack", "--image"])
            .arg(format!("{}:latest", layout(image).display()))
            .arg(dir.path().join("rootfs")),
        MOUNT_TIMEOUT,
    );
    dir
}

/// Every path under `root`, as `/a/b` from the root.
fn tree_paths(root: &Path) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let mut pending = vec![PathBuf::new()];
    while let Some(rel) = pending.pop() {
        let entries = fs::read_dir(root.join(&rel)).expect("read reference dir");
        for entry in entries {
            let entry = entry.expect("reference dir entry");
            let child = rel.join(entry.file_name());
            out.insert(format!("/{}", child.display()));
            if entry.file_type().expect("file type").is_dir() {
                pending.push(child);
            }
        }
    }
    out
}

/// What a process in the chroot did.
struct Ran {
    /// Whether the mount was still there when the process ended.
    mounted: bool,
    ok: bool,
    status: std::process::ExitStatus,
    stdout: Vec<u8>,
    stderr: String,
    elapsed: Duration,
}

/// Runs `/bin/busybox ARGS` chrooted into `root`, killed after
/// [`HANG_LIMIT`] (which fails the test: it hung).
fn in_chroot(root: &Path, args: &[&str]) -> Ran {
    let started = Instant::now();
    let out = Command::new("timeout")
        .args(["-s", "KILL", &HANG_LIMIT.as_secs().to_string(), "chroot"])
        .arg(root)
        .arg("/bin/busybox")
        .args(args)
        .stdin(Stdio::null())
        .output()
        .expect("run timeout chroot");
    let elapsed = started.elapsed();
    assert!(
        elapsed < HANG_LIMIT,
        "busybox {args:?} in the chroot hung: killed after {elapsed:.1?}"
    );
    let mounted = is_mountpoint(root);
    Ran {
        mounted,
        ok: out.status.success(),
        status: out.status,
        stdout: out.stdout,
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
        elapsed,
    }
}

/// `dd` of block `block` of [`FILE`] in the chroot.
fn read_block(root: &Path, block: u64) -> Ran {
    in_chroot(
        root,
        &[
            "dd",
            &format!("if=/{FILE}"),
            &format!("bs={READ_LEN}"),
            "count=1",
            &format!("skip={block}"),
        ],
    )
}

/// Asserts that `ran` read the right bytes of block `block`.
fn assert_block(ran: &Ran, expected: &[u8], block: u64, what: &str) {
    assert!(
        ran.ok,
        "{what}: dd failed ({}, after {:.1?}, still mounted: {}): {}",
        ran.status, ran.elapsed, ran.mounted, ran.stderr
    );
    let start = (block as usize) * READ_LEN;
    assert!(
        ran.stdout == expected[start..start + READ_LEN],
        "{what}: WRONG BYTES at block {block} ({} bytes read)",
        ran.stdout.len()
    );
}

/// Clean pages only (no `sync`: it could wait on other tests' mounts), so
/// that the reads below go to the daemon.
fn drop_page_cache() {
    fs::write("/proc/sys/vm/drop_caches", "3").expect("drop caches");
}

#[test]
fn a_30s_link_cut_is_survived() {
    let mut ns = Netns::new();
    ns.start_registry();
    let reference = format!("{}/u:netcut", ns.host());
    let empty_config = ns.dir.path().join("docker-config");
    fs::create_dir_all(&empty_config).expect("docker config dir");
    fs::write(empty_config.join("config.json"), "{}\n").expect("docker config");
    // Uncompressed: a region of the file is a region of the blob, so the
    // cold read asks for blocks nobody fetched.
    run_ok(
        Command::new(script("make-test-image"))
            .arg("push")
            .arg(format!("{}:latest", layout("union").display()))
            .arg(&reference)
            .args(["--compress", "none"])
            .env("DOCKER_CONFIG", &empty_config),
        MOUNT_TIMEOUT,
    );
    let unpacked = reference_tree("union");
    let rootfs = unpacked.path().join("rootfs");
    let expected = fs::read(rootfs.join(FILE)).expect("reference file");
    let expected_paths = tree_paths(&rootfs);

    let mount = Mount::new(
        &reference,
        MountOptions {
            docker_config: Some(empty_config),
            extra_args: [
                "--insecure-registry",
                &ns.host(),
                "--prefetch",
                "none",
                "--read-timeout",
                &READ_TIMEOUT.to_string(),
            ]
            .map(String::from)
            .to_vec(),
            ..MountOptions::default()
        },
    );
    let root = mount.path().to_path_buf();
    let pid = daemon_pid(&root);

    // Warm: all of busybox (a page of it never fetched would be SIGBUS in
    // the chroot once the link is down), one block of the big file.
    let busybox = in_chroot(&root, &["cat", "/bin/busybox"]);
    assert!(busybox.ok, "cat /bin/busybox: {}", busybox.stderr);
    assert_eq!(
        busybox.stdout,
        fs::read(rootfs.join("bin/busybox")).expect("reference busybox"),
        "/bin/busybox"
    );
    let warm = read_block(&root, WARM_BLOCK);
    assert_block(&warm, &expected, WARM_BLOCK, "warm-up read");

    ns.set_link(false);
    let cut_at = Instant::now();
    drop_page_cache();

    // The cold read starts first and stays pending while the others run:
    // a fetch that waits on a dead link must not hold up the rest.
    let cold_root = root.clone();
    let cold = std::thread::spawn(move || read_block(&cold_root, COLD_BLOCK));
    std::thread::sleep(Duration::from_millis(200));

    let cached = read_block(&root, WARM_BLOCK);
    eprintln!("link down: cached read in {:.2?}", cached.elapsed);
    assert_block(&cached, &expected, WARM_BLOCK, "cached read, link down");
    assert!(
        cached.elapsed < CACHED_BOUND,
        "cached read took {:.1?} with the link down",
        cached.elapsed
    );

    let find = in_chroot(&root, &["find", "/", "-print0"]);
    eprintln!("link down: find / in {:.2?}", find.elapsed);
    assert!(find.ok, "find / with the link down: {}", find.stderr);
    assert!(
        find.elapsed < CACHED_BOUND,
        "find took {:.1?}",
        find.elapsed
    );
    let found: BTreeSet<String> = find
        .stdout
        .split(|b| *b == 0)
        .filter(|p| !p.is_empty() && *p != b"/")
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect();
    assert_eq!(found, expected_paths, "find / with the link down");

    let ls = in_chroot(&root, &["ls", "-lRn", "/"]);
    eprintln!("link down: ls -lR / in {:.2?}", ls.elapsed);
    assert!(ls.ok, "ls -lR / with the link down: {}", ls.stderr);
    assert!(ls.elapsed < CACHED_BOUND, "ls -lR took {:.1?}", ls.elapsed);

    let write = in_chroot(
        &root,
        &[
            "sh",
            "-c",
            "echo cut > /netcut && /bin/busybox sync /netcut && /bin/busybox cat /netcut",
        ],
    );
    assert!(
        write.ok,
        "a write to the upper, link down: {} after {:.1?}: {}",
        write.status, write.elapsed, write.stderr
    );
    assert_eq!(write.stdout, b"cut\n", "the upper, link down");
    eprintln!("link down: write, sync, read back in {:.2?}", write.elapsed);

    let cold = cold.join().expect("cold read thread");
    eprintln!(
        "link down: never-fetched read: ok={} in {:.2?}: {}",
        cold.ok,
        cold.elapsed,
        cold.stderr.trim()
    );
    assert!(
        !cold.ok && cold.stderr.contains("Input/output error"),
        "a never-fetched read with the link down must fail with EIO; ok={} stdout {} bytes, stderr: {}",
        cold.ok,
        cold.stdout.len(),
        cold.stderr
    );
    assert!(
        cold.elapsed < FAIL_BOUND,
        "the failing read took {:.1?}",
        cold.elapsed
    );

    // Again, still cut: the failure is not a one-off.
    let again = read_block(&root, COLD_BLOCK);
    eprintln!(
        "link down: the same read again: ok={} in {:.2?}",
        again.ok, again.elapsed
    );
    assert!(
        !again.ok && again.stderr.contains("Input/output error"),
        "second read with the link down: {}",
        again.stderr
    );
    assert!(again.elapsed < FAIL_BOUND, "took {:.1?}", again.elapsed);

    if let Some(rest) = CUT.checked_sub(cut_at.elapsed()) {
        std::thread::sleep(rest);
    }
    ns.set_link(true);
    let up_at = Instant::now();
    // A link coming up takes the kernel up to a second or two (carrier,
    // qdisc, ARP; a SYN lost meanwhile is resent after 1 s, then 3 s):
    // imgfs is judged from the moment the registry answers again.
    ns.wait_reachable();
    let reachable = up_at.elapsed();

    let back = read_block(&root, COLD_BLOCK);
    eprintln!(
        "link up: registry reachable after {reachable:.2?}; the failed read again: ok={} in {:.2?}",
        back.ok, back.elapsed
    );
    assert_block(&back, &expected, COLD_BLOCK, "after the cut");
    assert!(
        back.elapsed < RECOVER_BOUND,
        "the read took {:.1?} once the registry was reachable again",
        back.elapsed
    );
    let after = read_block(&root, AFTER_BLOCK);
    assert_block(&after, &expected, AFTER_BLOCK, "a new block after the cut");

    assert!(mount.is_mounted(), "the mount did not survive the cut");
    assert!(
        Path::new(&format!("/proc/{pid}")).exists(),
        "daemon {pid} died during the cut"
    );
    assert_eq!(daemon_pid(&root), pid, "the same daemon serves the mount");
    mount.unmount();
}
