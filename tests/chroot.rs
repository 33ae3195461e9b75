//! A mounted image used as a root filesystem: programs run from it (exec
//! mmaps them), explicit mmap reads agree with plain reads, permissions are
//! enforced for non-root users, and writes to a `--read-only` mount fail
//! with EROFS.

mod common;

use common::*;
use std::fs;
use std::path::Path;
use std::process::Command;

/// A registry holding the `busybox` image, and a mount of it.
fn busybox() -> (Registry, Mount) {
    busybox_with(&[])
}

fn busybox_with(args: &[&str]) -> (Registry, Mount) {
    let reg = Registry::start(RegistryOptions::default());
    let reference = push(&reg, "busybox", "busybox:latest", Compress::Gzip);
    let opts = MountOptions {
        extra_args: args.iter().map(|a| a.to_string()).collect(),
        ..MountOptions::default()
    };
    let mount = Mount::new(&reference, opts);
    (reg, mount)
}

/// `chroot [--userspec=U] MNT /bin/busybox sh -c SCRIPT`.
fn chroot_sh(mount: &Mount, userspec: Option<&str>, script: &str) -> Output {
    let mut cmd = Command::new("chroot");
    if let Some(spec) = userspec {
        cmd.arg(format!("--userspec={spec}"));
    }
    cmd.arg(mount.path())
        .args(["/bin/busybox", "sh", "-c", script]);
    run(&mut cmd, SHORT)
}

fn host_busybox_sha256() -> String {
    ["/bin/busybox", "/usr/bin/busybox"]
        .iter()
        .find_map(|p| sha256_file(Path::new(p)).ok())
        .expect("busybox-static is installed on the host")
}

#[test]
fn busybox_shell_runs_in_a_chroot() {
    let (_reg, mount) = busybox();
    let out = chroot_sh(
        &mount,
        None,
        "echo hello; id -u; head -n 1 /etc/passwd; readlink /bin/sh; sha256sum /bin/busybox; \
         ls /bin | wc -l; stat -c '%a %u:%g' /tmp /root-only /home/user",
    );
    assert!(
        out.success(),
        "chroot failed ({}):\n{}\n{}",
        out.status,
        out.stdout,
        out.stderr
    );
    let lines: Vec<&str> = out.stdout.lines().map(str::trim).collect();
    let busybox_line = format!("{}  /bin/busybox", host_busybox_sha256());
    let expected = [
        "hello",
        "0",
        "root:x:0:0:root:/root:/bin/sh",
        "busybox",
        busybox_line.as_str(),
        "33", // busybox and its 32 applet links
        "1777 0:0",
        "600 0:0",
        "755 1000:1000",
    ];
    assert_eq!(lines, expected, "stderr:\n{}", out.stderr);

    // The same binary executed straight from the mount, outside any chroot.
    let direct = run(
        Command::new(mount.path().join("bin/busybox")).args(["echo", "direct"]),
        SHORT,
    );
    assert_eq!(direct.stdout.trim(), "direct", "{}", direct.stderr);
    mount.unmount();
}

/// mmap (whole files and at an offset) sees the bytes `read` sees.
#[test]
fn mmap_matches_read() {
    let (_reg, mount) = busybox();
    const PYTHON: &str = "import hashlib, mmap, sys\n\
        path, offset = sys.argv[1], int(sys.argv[2])\n\
        with open(path, 'rb') as f:\n\
        \x20   size = f.seek(0, 2)\n\
        \x20   m = mmap.mmap(f.fileno(), size - offset, prot=mmap.PROT_READ, offset=offset)\n\
        \x20   print(hashlib.sha256(m[:]).hexdigest())\n";
    // A multiple of every page size Linux uses, inside busybox's ~2 MB.
    const OFFSET: usize = 16 * 64 * 1024;
    for (rel, offset) in [
        ("bin/busybox", 0),
        ("bin/busybox", OFFSET),
        ("etc/passwd", 0),
        ("home/user/hello", 0),
    ] {
        let path = mount.path().join(rel);
        let whole = {
            let p = path.clone();
            within("read", SHORT, &mount, move || fs::read(p)).expect("read through the mount")
        };
        let want = sha256_bytes(&whole[offset..]);
        let out = run_ok(
            Command::new("python3")
                .arg("-c")
                .arg(PYTHON)
                .arg(&path)
                .arg(offset.to_string()),
            SHORT,
        );
        assert_eq!(out.stdout.trim(), want, "mmap of {rel} at offset {offset}");
    }
    mount.unmount();
}

#[test]
fn permissions_are_enforced() {
    let (_reg, mount) = busybox();
    let user = Some("1000:1000");
    let denied = chroot_sh(&mount, user, "cat /root-only");
    assert!(
        !denied.success(),
        "uid 1000 read a 0600 root file: {}",
        denied.stdout
    );
    assert!(
        denied.stderr.contains("Permission denied"),
        "stderr: {}",
        denied.stderr
    );
    let listing = chroot_sh(&mount, user, "ls /root");
    assert!(
        !listing.success() && listing.stderr.contains("Permission denied"),
        "uid 1000 listed a 0700 dir: {listing:?}"
    );
    // The coreutils form from the task, without a shell in between.
    let direct = run(
        Command::new("chroot")
            .arg("--userspec=1000:1000")
            .arg(mount.path())
            .args(["/bin/cat", "/root-only"]),
        SHORT,
    );
    assert!(
        !direct.success() && direct.stderr.contains("Permission denied"),
        "{direct:?}"
    );

    // Controls: what is allowed still works.
    let own = chroot_sh(&mount, user, "id -u; cat /home/user/hello");
    assert_eq!(
        own.stdout, "1000\nhello from the image\n",
        "stderr: {}",
        own.stderr
    );
    let root = chroot_sh(&mount, None, "cat /root-only");
    assert!(
        root.success() && root.stdout.starts_with("secret"),
        "{root:?}"
    );
    mount.unmount();
}

#[test]
fn writes_fail_read_only() {
    let (_reg, mount) = busybox_with(&["--read-only"]);
    for script in [
        "touch /tmp/new",
        "echo x > /etc/passwd",
        "echo x >> /home/user/hello",
        "mkdir /newdir",
        "rm /etc/passwd",
        "chmod 777 /etc/passwd",
        "chown 1:1 /etc/group",
        "ln -s target /tmp/link",
        "mv /etc/group /etc/group2",
    ] {
        let out = chroot_sh(&mount, None, script);
        assert!(!out.success(), "{script}: succeeded on a read-only mount");
        assert!(
            out.stderr.contains("Read-only file system"),
            "{script}: {}",
            out.stderr
        );
    }
    let root = mount.path().to_path_buf();
    let errors = within("write attempts", SHORT, &mount, move || {
        let erofs =
            |r: std::io::Result<()>| r.err().and_then(|e| e.raw_os_error()) == Some(libc::EROFS);
        vec![
            ("create", erofs(fs::write(root.join("tmp/x"), b"x"))),
            (
                "open for writing",
                erofs(
                    fs::OpenOptions::new()
                        .write(true)
                        .open(root.join("etc/passwd"))
                        .map(drop),
                ),
            ),
            (
                "truncate",
                erofs(
                    fs::OpenOptions::new()
                        .write(true)
                        .truncate(true)
                        .open(root.join("etc/group"))
                        .map(drop),
                ),
            ),
            ("unlink", erofs(fs::remove_file(root.join("etc/passwd")))),
            ("rmdir", erofs(fs::remove_dir(root.join("tmp")))),
            (
                "rename",
                erofs(fs::rename(root.join("etc/passwd"), root.join("etc/p"))),
            ),
            (
                "setxattr",
                erofs(
                    rustix::fs::lsetxattr(
                        root.join("etc/passwd"),
                        "user.x",
                        b"1",
                        rustix::fs::XattrFlags::empty(),
                    )
                    .map_err(std::io::Error::from),
                ),
            ),
        ]
    });
    for (what, is_erofs) in errors {
        assert!(is_erofs, "{what}: did not fail with EROFS");
    }
    mount.unmount();
}
