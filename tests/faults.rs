//! Reads through a registry that misbehaves on command (a fault-injecting
//! proxy in front of the real docker-registry, see `common::proxy`), and
//! through a registry that is killed and started again. Each case reads a
//! region of a file that was never fetched, and asserts the exact outcome:
//! the right bytes (the fault was retried away) or `EIO` within a bound,
//! never wrong bytes; then, the fault gone, the same read succeeds.

mod common;

use common::proxy::{Fault, FaultProxy};
use common::*;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// `--read-timeout` of the mounts here, seconds.
const READ_TIMEOUT: u64 = 3;
/// A failed read must come back within this (timeout, retries, backoff).
const FAIL_BOUND: Duration = Duration::from_secs(25);
/// Distance between the regions the cases read (two 128 KiB blocks).
const REGION: u64 = 256 * 1024;
const READ_LEN: usize = 4096;
/// The big file of the `union` image that the cases read.
const FILE: &str = "data/libs.bin";

struct Rig {
    reg: Registry,
    proxy: FaultProxy,
    mount: Mount,
    expected: Vec<u8>,
    next_region: u64,
}

impl Rig {
    fn new() -> Rig {
        let reg = Registry::start(RegistryOptions::default());
        // Uncompressed: a region of the file is a region of the blob, so
        // every case starts on blocks nobody fetched.
        push(&reg, "union", "u:faults", Compress::None);
        let unpacked = reference_unpack(&reg, &reg.reference("u:faults"));
        let expected = std::fs::read(unpacked.path().join(FILE)).expect("reference file");
        let proxy = FaultProxy::start(reg.port);
        let mount = Mount::new(
            &format!("{}/u:faults", proxy.host()),
            MountOptions {
                extra_args: [
                    "--read-only",
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
        Rig {
            reg,
            proxy,
            mount,
            expected,
            next_region: 1,
        }
    }

    fn path(&self) -> PathBuf {
        self.mount.path().join(FILE)
    }

    /// A region no read has touched yet.
    fn fresh_region(&mut self) -> u64 {
        let offset = self.next_region * REGION + 1000;
        self.next_region += 1;
        assert!(
            offset + READ_LEN as u64 <= self.expected.len() as u64,
            "out of regions"
        );
        offset
    }

    /// Reads the region (in a thread: a hang fails the test, not CI) and
    /// checks that whatever came back is right.
    fn read(&self, offset: u64, what: &str) -> (Result<(), String>, Duration) {
        let path = self.path();
        let started = Instant::now();
        let got = within(what, FAIL_BOUND * 2, &self.mount, move || {
            read_at(&path, offset)
        });
        let elapsed = started.elapsed();
        let got = got.map(|bytes| {
            let want = &self.expected[offset as usize..offset as usize + READ_LEN];
            assert!(
                bytes == want,
                "{what}: WRONG BYTES served at offset {offset}"
            );
        });
        (got, elapsed)
    }
}

fn read_at(path: &Path, offset: u64) -> Result<Vec<u8>, String> {
    let file = File::open(path).map_err(|e| e.to_string())?;
    let mut buf = vec![0u8; READ_LEN];
    file.read_exact_at(&mut buf, offset)
        .map_err(|e| e.to_string())?;
    Ok(buf)
}

/// Faults the client must ride out: the read succeeds with the right bytes.
#[test]
fn transient_faults_are_retried() {
    let mut rig = Rig::new();
    for (fault, times) in [
        (Fault::Status(503), 1),
        (Fault::Status(429), 1),
        (Fault::Status(500), 2),
        (Fault::DropMidBody, 1),
        (Fault::Refuse, 1),
        (Fault::IgnoreRange, u32::MAX),
    ] {
        let offset = rig.fresh_region();
        rig.proxy.set(fault, times);
        let (got, elapsed) = rig.read(offset, &format!("{fault:?}"));
        eprintln!(
            "{fault:?} x{times}: {got:?} in {elapsed:.1?}, {} blob GETs",
            rig.proxy.seen()
        );
        assert!(got.is_ok(), "{fault:?} x{times} must be retried: {got:?}");
        rig.proxy.clear();
    }
}

/// Faults that last: EIO within a bound, never wrong bytes; once the fault
/// is gone, the same read succeeds.
#[test]
fn lasting_faults_are_eio_then_recover() {
    let mut rig = Rig::new();
    for fault in [
        Fault::Status(500),
        Fault::Status(404),
        Fault::FlipByte,
        Fault::Truncate,
        Fault::DropMidBody,
        Fault::WrongContentRange,
        Fault::Stall(Duration::from_secs(60)),
        Fault::Refuse,
    ] {
        let offset = rig.fresh_region();
        rig.proxy.set(fault, u32::MAX);
        let (got, elapsed) = rig.read(offset, &format!("{fault:?}"));
        eprintln!(
            "{fault:?}: {got:?} in {elapsed:.1?}, {} blob GETs",
            rig.proxy.seen()
        );
        let err = got.expect_err("a lasting fault cannot give bytes");
        assert!(
            err.contains("Input/output error"),
            "{fault:?}: EIO, got {err}"
        );
        assert!(elapsed < FAIL_BOUND, "{fault:?}: took {elapsed:?}");
        rig.proxy.clear();
        let (again, _) = rig.read(offset, &format!("after {fault:?}"));
        assert!(
            again.is_ok(),
            "after {fault:?} the read must succeed: {again:?}"
        );
    }
}

#[test]
fn a_registry_restart_is_survived() {
    let mut rig = Rig::new();
    let offset = rig.fresh_region();
    rig.reg.stop();
    let (got, elapsed) = rig.read(offset, "registry down");
    eprintln!("registry down: {got:?} in {elapsed:.1?}");
    let err = got.expect_err("no registry, no bytes");
    assert!(err.contains("Input/output error"), "{err}");
    assert!(elapsed < FAIL_BOUND, "took {elapsed:?}");
    rig.reg.start_again();
    let (again, _) = rig.read(offset, "registry back");
    assert!(again.is_ok(), "the mount recovers by itself: {again:?}");
    assert!(rig.mount.is_mounted());
}

/// How long the registry stalls the copy-up's fetch.
const COPY_UP_STALL: Duration = Duration::from_secs(10);

/// A copy-up fetches the file's image bytes before it takes the lock that
/// changes to the tree hold: while the registry stalls that fetch, a lookup
/// of names the kernel never saw answers at once, and the copy-up then
/// completes with the right bytes.
#[test]
fn a_stalled_copy_up_does_not_hold_up_lookups() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "union", "u:copy-up", Compress::None);
    let unpacked = reference_unpack(&reg, &reg.reference("u:copy-up"));
    let mut expected = std::fs::read(unpacked.path().join(FILE)).expect("reference file");
    let proxy = FaultProxy::start(reg.port);
    let timeout = (COPY_UP_STALL * 2).as_secs().to_string();
    let mount = Mount::new(
        &format!("{}/u:copy-up", proxy.host()),
        MountOptions {
            extra_args: ["--prefetch", "none", "--read-timeout", &timeout]
                .map(String::from)
                .to_vec(),
            ..MountOptions::default()
        },
    );
    proxy.set(Fault::Stall(COPY_UP_STALL), 1);
    let path = mount.path().join(FILE);
    let appender = std::thread::spawn(move || {
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .and_then(|mut f| std::io::Write::write_all(&mut f, b"appended"))
    });
    let deadline = Instant::now() + SHORT;
    while proxy.seen() == 0 {
        assert!(Instant::now() < deadline, "the copy-up fetched nothing");
        std::thread::sleep(Duration::from_millis(20));
    }
    let stalled_since = Instant::now();
    let looked_up = std::fs::symlink_metadata(mount.path().join("etc/hostname"));
    let waited = stalled_since.elapsed();
    eprintln!("a lookup during a stalled copy-up took {waited:?}");
    assert!(
        looked_up.is_ok(),
        "lookup during the copy-up: {looked_up:?}"
    );
    assert!(
        waited < COPY_UP_STALL / 2,
        "a lookup waited {waited:?} for a copy-up's fetch (stalled {COPY_UP_STALL:?})"
    );
    let appended = appender.join().expect("appender thread");
    eprintln!("the copy-up took {:?}", stalled_since.elapsed());
    assert!(appended.is_ok(), "the copy-up failed: {appended:?}");
    expected.extend_from_slice(b"appended");
    assert!(
        std::fs::read(mount.path().join(FILE)).expect("read back") == expected,
        "the copied-up file differs from the image's plus the append"
    );
}

/// Opening a cold image file with `O_TRUNC` (`> file` in a shell), or
/// truncating it to 0 by path, copies it up empty: the registry is not
/// asked for bytes the truncation discards, so both work with the registry
/// refusing every blob request.
#[test]
fn a_truncating_open_fetches_nothing() {
    let reg = Registry::start(RegistryOptions::default());
    push(&reg, "union", "u:truncate", Compress::None);
    let proxy = FaultProxy::start(reg.port);
    let mount = Mount::new(
        &format!("{}/u:truncate", proxy.host()),
        MountOptions {
            extra_args: ["--prefetch", "none"].map(String::from).to_vec(),
            ..MountOptions::default()
        },
    );
    proxy.set(Fault::Refuse, u32::MAX);
    let path = mount.path().join(FILE);
    let written = std::fs::OpenOptions::new()
        .write(true)
        .truncate(true)
        .open(&path)
        .and_then(|mut f| std::io::Write::write_all(&mut f, b"replaced"));
    assert!(written.is_ok(), "truncating open: {written:?}");
    assert_eq!(std::fs::read(&path).expect("read back"), b"replaced");
    // truncate(2) by path: a SETATTR of size 0 without an open.
    let busybox = mount.path().join("bin/busybox");
    run_ok(
        std::process::Command::new("python3")
            .args(["-c", "import os, sys; os.truncate(sys.argv[1], 0)"])
            .arg(&busybox),
        SHORT,
    );
    assert_eq!(std::fs::metadata(&busybox).expect("stat").len(), 0);
    assert_eq!(proxy.seen(), 0, "blob requests for truncated files");
}
