//! A real guest for QEMU: Debian's kernel and a busybox initramfs whose init prints known lines
//! on the serial console and powers off.
//!
//! The kernel (`linux-image-amd64`'s dependency) and `busybox-static` are fetched once with
//! `apt-get download` and unpacked with `dpkg -x` into `$CARGO_HOME/collector-tools/qemu-guest/`
//! (outside the repository), so later runs cost nothing.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

/// What the guest prints, in order, one per line.
pub fn guest_lines(tag: &str) -> Vec<String> {
    (1..=5)
        .map(|i| format!("guest line {i} of {tag}"))
        .collect()
}

/// Kernel and initramfs paths.
pub struct Guest {
    pub kernel: PathBuf,
    pub initramfs: PathBuf,
}

fn cache_dir() -> PathBuf {
    let cargo_home = std::env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(std::env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    );
    cargo_home.join("collector-tools").join("qemu-guest")
}

fn run(cmd: &mut Command) -> String {
    let out = cmd
        .output()
        .unwrap_or_else(|e| panic!("cannot run {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Downloads `package` with apt into `dir` (unless a .deb of it is there) and unpacks it into
/// `dir/root`.
fn fetch(dir: &Path, package: &str) {
    let have = std::fs::read_dir(dir).is_ok_and(|d| {
        d.flatten().any(|e| {
            let name = e.file_name().to_string_lossy().into_owned();
            name.starts_with(&format!("{package}_"))
                && Path::new(&name).extension().is_some_and(|e| e == "deb")
        })
    });
    if !have {
        run(Command::new("apt-get")
            .args(["download", package])
            .current_dir(dir));
    }
    for entry in std::fs::read_dir(dir).expect("cache dir").flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.starts_with(&format!("{package}_"))
            && Path::new(&name).extension().is_some_and(|e| e == "deb")
        {
            run(Command::new("dpkg")
                .arg("-x")
                .arg(entry.path())
                .arg(dir.join("root")));
        }
    }
}

/// The kernel package `linux-image-amd64` depends on (`linux-image-<version>-amd64`).
fn kernel_package(dir: &Path) -> String {
    fetch(dir, "linux-image-amd64");
    let deb = std::fs::read_dir(dir)
        .expect("cache dir")
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy().starts_with("linux-image-amd64_"))
        })
        .expect("linux-image-amd64 .deb");
    let depends = run(Command::new("dpkg-deb").arg("-f").arg(&deb).arg("Depends"));
    depends
        .split([',', '|'])
        .map(|d| d.split_whitespace().next().unwrap_or_default().to_owned())
        .find(|d| d.starts_with("linux-image-") && d != "linux-image-amd64")
        .unwrap_or_else(|| panic!("no kernel in Depends: {depends}"))
}

/// Prepares (or finds in the cache) the kernel and an initramfs printing `lines`.
pub fn prepare(lines: &[String], work: &Path) -> Guest {
    let dir = cache_dir();
    std::fs::create_dir_all(&dir).expect("cache dir");
    // apt's sandbox user cannot write here; downloads then run as root, which is fine.
    let package = kernel_package(&dir);
    let version = package.trim_start_matches("linux-image-");
    let kernel = dir.join("root/boot").join(format!("vmlinuz-{version}"));
    if !kernel.exists() {
        fetch(&dir, &package);
    }
    assert!(
        kernel.exists(),
        "{} missing after unpacking",
        kernel.display()
    );
    let busybox = dir.join("root/bin/busybox");
    if !busybox.exists() {
        fetch(&dir, "busybox-static");
    }
    assert!(busybox.exists(), "{} missing", busybox.display());

    // The empty first line ends whatever the firmware left on the serial line.
    let mut init = String::from("#!/bin/busybox sh\n/bin/busybox echo\n");
    for line in lines {
        init.push_str(&format!("/bin/busybox echo '{line}'\n"));
    }
    init.push_str("/bin/busybox poweroff -f\n");
    let busybox_bytes = std::fs::read(&busybox).expect("read busybox");
    let mut archive = Vec::new();
    let entries: [(&str, u32, &[u8]); 4] = [
        ("bin", 0o040_755, b""),
        ("dev", 0o040_755, b""),
        ("bin/busybox", 0o100_755, &busybox_bytes),
        ("init", 0o100_755, init.as_bytes()),
    ];
    for (ino, (name, mode, data)) in entries.iter().enumerate() {
        cpio_entry(&mut archive, ino as u32 + 1, name, *mode, data);
    }
    cpio_entry(&mut archive, 0, "TRAILER!!!", 0, b"");
    let initramfs = work.join("initramfs.cpio");
    std::fs::write(&initramfs, archive).expect("write initramfs");
    Guest { kernel, initramfs }
}

/// One entry of a cpio archive in the "newc" format the kernel unpacks.
fn cpio_entry(out: &mut Vec<u8>, ino: u32, name: &str, mode: u32, data: &[u8]) {
    let pad4 = |out: &mut Vec<u8>| {
        while !out.len().is_multiple_of(4) {
            out.push(0);
        }
    };
    let fields = [
        ino,
        mode,
        0,
        0,
        if mode & 0o040_000 != 0 { 2 } else { 1 },
        0,
        data.len() as u32,
        0,
        0,
        0,
        0,
        name.len() as u32 + 1,
        0,
    ];
    out.extend_from_slice(b"070701");
    for field in fields {
        out.extend_from_slice(format!("{field:08X}").as_bytes());
    }
    out.extend_from_slice(name.as_bytes());
    out.push(0);
    pad4(out);
    out.extend_from_slice(data);
    pad4(out);
}
