//! A registry that speaks only HTTPS, with a certificate from a CA made
//! here: imgfs trusts it exactly when the system's trust store does
//! (`SSL_CERT_FILE` stands in for installing the CA), mounts through it,
//! and refuses it otherwise with a one-line error that names the cause.
//!
//! Loopback registries are reached over plain HTTP (as docker treats
//! them), so this registry listens on an address of its own: one end of a
//! veth pair on this host, removed when the test ends.

mod common;

use common::*;
use std::fs;
use std::net::TcpListener;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

/// How long the registry may take to answer over TLS.
const REGISTRY_START: Duration = Duration::from_secs(20);

/// A host address on one end of a veth pair (both ends up, no namespace):
/// the host reaches it through its local routes.
struct HostAddress {
    link: String,
    ip: String,
}

impl HostAddress {
    fn add() -> HostAddress {
        let id = std::process::id();
        let link = format!("imgtls{}", id % 100_000);
        let ip = format!("10.233.{}.{}", id % 250, 1 + (id / 250) % 250);
        let ip_cmd = |args: &[&str]| run_ok(Command::new("ip").args(args), SHORT);
        let _ = Command::new("ip").args(["link", "del", &link]).status();
        ip_cmd(&[
            "link",
            "add",
            &link,
            "type",
            "veth",
            "peer",
            "name",
            &format!("{link}p"),
        ]);
        let address = HostAddress { link, ip };
        ip_cmd(&[
            "addr",
            "add",
            &format!("{}/32", address.ip),
            "dev",
            &address.link,
        ]);
        ip_cmd(&["link", "set", &address.link, "up"]);
        ip_cmd(&["link", "set", &format!("{}p", address.link), "up"]);
        address
    }
}

impl Drop for HostAddress {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["link", "del", &self.link])
            .status();
    }
}

/// A CA, and a server certificate it signed for `ip`.
fn make_certificates(dir: &Path, ip: &str) {
    let openssl = |args: &[&str]| {
        run_ok(Command::new("openssl").args(args).current_dir(dir), SHORT);
    };
    openssl(&[
        "req",
        "-x509",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "ca.key",
        "-out",
        "ca.pem",
        "-days",
        "2",
        "-subj",
        "/CN=imgfs test CA",
        "-addext",
        "basicConstraints=critical,CA:TRUE",
        "-addext",
        "keyUsage=critical,keyCertSign",
    ]);
    openssl(&[
        "req",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        "server.key",
        "-out",
        "server.csr",
        "-subj",
        &format!("/CN={ip}"),
    ]);
    fs::write(
        dir.join("server.ext"),
        format!("subjectAltName=IP:{ip}\nbasicConstraints=CA:FALSE\nextendedKeyUsage=serverAuth\n"),
    )
    .expect("write extensions");
    openssl(&[
        "x509",
        "-req",
        "-in",
        "server.csr",
        "-CA",
        "ca.pem",
        "-CAkey",
        "ca.key",
        "-CAcreateserial",
        "-out",
        "server.pem",
        "-days",
        "2",
        "-extfile",
        "server.ext",
    ]);
}

/// docker-registry serving HTTPS only on `ip`; killed when dropped.
struct TlsRegistry {
    child: std::process::Child,
    host: String,
}

impl TlsRegistry {
    fn start(dir: &Path, ip: &str) -> TlsRegistry {
        let port = TcpListener::bind((ip, 0))
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .expect("a free port");
        let host = format!("{ip}:{port}");
        let config = dir.join("registry.yml");
        fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: info\n  accesslog:\n    disabled: true\nstorage:\n  \
                 filesystem:\n    rootdirectory: {storage}\nhttp:\n  addr: {host}\n  tls:\n    \
                 certificate: {dir}/server.pem\n    key: {dir}/server.key\n",
                storage = dir.join("storage").display(),
                dir = dir.display(),
            ),
        )
        .expect("write the registry config");
        let log = fs::File::create(dir.join("registry.log")).expect("registry log");
        let child = Command::new("/usr/bin/docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(log.try_clone().expect("log"))
            .stderr(log)
            .spawn()
            .expect("run docker-registry");
        let registry = TlsRegistry { child, host };
        let deadline = Instant::now() + REGISTRY_START;
        let ca = dir.join("ca.pem");
        loop {
            let probe = Command::new("curl")
                .args(["-sf", "-o", "/dev/null", "--cacert"])
                .arg(&ca)
                .arg(format!("https://{}/v2/", registry.host))
                .status();
            if probe.is_ok_and(|s| s.success()) {
                return registry;
            }
            assert!(
                Instant::now() < deadline,
                "the TLS registry did not answer: {}",
                fs::read_to_string(dir.join("registry.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for TlsRegistry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn imgfs(cache: &Path, ca: Option<&Path>, args: &[&str]) -> Command {
    let mut cmd = Command::new(IMGFS);
    cmd.arg("--cache-dir").arg(cache).args(args);
    // The only trust store rustls-platform-verifier reads on Linux when
    // set; an empty file stands for a system that does not know the CA.
    match ca {
        Some(ca) => cmd.env("SSL_CERT_FILE", ca),
        None => cmd.env("SSL_CERT_FILE", "/dev/null"),
    };
    cmd
}

#[test]
fn an_https_registry_is_mounted_when_its_ca_is_trusted_and_refused_otherwise() {
    require_root();
    let work = tempfile::tempdir().expect("tempdir");
    let dir = work.path();
    let address = HostAddress::add();
    make_certificates(dir, &address.ip);
    let registry = TlsRegistry::start(dir, &address.ip);
    let reference = format!("{}/tls/busybox:latest", registry.host);
    run_ok(
        Command::new("skopeo")
            .args(["copy", "--quiet", "--dest-tls-verify=false"])
            .arg(format!("oci:{}:latest", layout("busybox").display()))
            .arg(format!("docker://{reference}")),
        MOUNT_TIMEOUT,
    );
    let ca = dir.join("ca.pem");
    let cache = dir.join("cache");

    // Not trusted: a clear refusal, no mount.
    let refused = run(&mut imgfs(&cache, None, &["inspect", &reference]), SHORT);
    assert!(!refused.success(), "an untrusted certificate was accepted");
    assert_one_line_error(
        &refused.stderr,
        &[&registry.host, "certificate", "trust store"],
    );
    assert!(
        !refused.stderr.contains("attempts"),
        "a certificate failure was retried: {}",
        refused.stderr
    );

    // Trusted: inspect and a mount that equals the image.
    run_ok(
        &mut imgfs(&cache, Some(&ca), &["inspect", &reference]),
        SHORT,
    );
    let mountpoint = dir.join("mnt");
    fs::create_dir(&mountpoint).expect("mountpoint");
    let mnt = mountpoint.to_str().expect("utf-8 path");
    run_ok(
        &mut imgfs(
            &cache,
            Some(&ca),
            &["mount", "--read-only", &reference, mnt],
        ),
        MOUNT_TIMEOUT,
    );
    let expected = gnu_tar_unpack("busybox");
    let diffs = compare_trees(&expected.path(), &mountpoint);
    run_ok(&mut imgfs(&cache, None, &["umount", mnt]), SHORT);
    assert!(
        diffs.is_empty(),
        "the mount over HTTPS differs from the image:\n{}",
        diffs.join("\n")
    );
}
