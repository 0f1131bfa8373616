//! The guests' initramfs: a "newc" cpio archive (the format the kernel unpacks) holding
//! `/init`, the collector, the stand-in VMM, the integration test binaries, `/bin/sh` and the
//! shared libraries all of them load (from `ldd`), at the paths the host has them.
//!
//! Binaries go in without their debug sections (`strip --strip-debug` on a copy): the archive is
//! unpacked into the guest's memory, and debug info would make it several times larger.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

/// Where the workspace's binaries sit in the guest: the test harness finds `collector` and
/// `standin-vmm` next to `deps/`, as in `target/debug/`.
pub(crate) const GUEST_TARGET: &str = "/t";

/// An archive being built: entries in order, directories created on first use.
#[derive(Default)]
pub(crate) struct Archive {
    bytes: Vec<u8>,
    dirs: BTreeSet<String>,
    next_ino: u32,
}

const DIR: u32 = 0o040_000;
const FILE: u32 = 0o100_000;
const CHAR_DEV: u32 = 0o020_000;

impl Archive {
    /// `data` as the file `path` (absolute) with permission bits `perm`.
    pub(crate) fn file(&mut self, path: &str, perm: u32, data: &[u8]) {
        self.parents(path);
        self.entry(path, FILE | perm, data, (0, 0));
    }

    /// The host file `source` as `path`, stripped of debug info if `strip`.
    pub(crate) fn host_file(
        &mut self,
        path: &str,
        source: &Path,
        strip: bool,
    ) -> anyhow::Result<()> {
        let data = if strip {
            stripped(source)?
        } else {
            std::fs::read(source).with_context(|| format!("read {}", source.display()))?
        };
        self.file(path, 0o755, &data);
        Ok(())
    }

    pub(crate) fn char_device(&mut self, path: &str, perm: u32, major: u32, minor: u32) {
        self.parents(path);
        self.entry(path, CHAR_DEV | perm, b"", (major, minor));
    }

    pub(crate) fn dir(&mut self, path: &str) {
        self.parents(path);
        let name = path.trim_start_matches('/').to_owned();
        if self.dirs.insert(name) {
            self.entry(path, DIR | 0o755, b"", (0, 0));
        }
    }

    /// The archive with its trailer.
    pub(crate) fn finish(mut self) -> Vec<u8> {
        self.next_ino = 0;
        self.entry("TRAILER!!!", 0, b"", (0, 0));
        self.bytes
    }

    fn parents(&mut self, path: &str) {
        let path = path.trim_start_matches('/');
        let mut at = 0;
        while let Some(slash) = path[at..].find('/') {
            let dir = &path[..at + slash];
            if self.dirs.insert(dir.to_owned()) {
                self.entry(dir, DIR | 0o755, b"", (0, 0));
            }
            at += slash + 1;
        }
    }

    fn entry(&mut self, path: &str, mode: u32, data: &[u8], rdev: (u32, u32)) {
        let name = path.trim_start_matches('/');
        self.next_ino += 1;
        let fields = [
            self.next_ino,
            mode,
            0, // uid
            0, // gid
            if mode & DIR != 0 { 2 } else { 1 },
            0, // mtime
            data.len() as u32,
            0, // dev major
            0, // dev minor
            rdev.0,
            rdev.1,
            name.len() as u32 + 1,
            0, // check
        ];
        self.bytes.extend_from_slice(b"070701");
        for field in fields {
            self.bytes
                .extend_from_slice(format!("{field:08X}").as_bytes());
        }
        self.bytes.extend_from_slice(name.as_bytes());
        self.bytes.push(0);
        self.pad();
        self.bytes.extend_from_slice(data);
        self.pad();
    }

    fn pad(&mut self) {
        while !self.bytes.len().is_multiple_of(4) {
            self.bytes.push(0);
        }
    }
}

fn stripped(source: &Path) -> anyhow::Result<Vec<u8>> {
    let out = tempfile_path(source);
    let status = Command::new("strip")
        .arg("--strip-debug")
        .arg("-o")
        .arg(&out)
        .arg(source)
        .status()
        .context("run strip (binutils)")?;
    if !status.success() {
        bail!("strip --strip-debug {} failed: {status}", source.display());
    }
    let data = std::fs::read(&out)?;
    std::fs::remove_file(&out)?;
    Ok(data)
}

fn tempfile_path(source: &Path) -> PathBuf {
    let name = source.file_name().unwrap_or_default().to_string_lossy();
    std::env::temp_dir().join(format!("xtask-strip-{}-{name}", std::process::id()))
}

/// The shared libraries (and the dynamic loader) `binary` loads, as `ldd` resolves them.
pub(crate) fn shared_libraries(binary: &Path) -> anyhow::Result<Vec<PathBuf>> {
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .context("run ldd")?;
    let text = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        // A static binary: "not a dynamic executable".
        return Ok(Vec::new());
    }
    Ok(parse_ldd(&text))
}

/// Paths in `ldd` output: `libc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x...)` and
/// `/lib64/ld-linux-x86-64.so.2 (0x...)`; the vDSO has no file.
fn parse_ldd(text: &str) -> Vec<PathBuf> {
    text.lines()
        .filter_map(|line| {
            let line = line.trim();
            let path = match line.split_once(" => ") {
                Some((_, rest)) => rest.split_whitespace().next()?,
                None => line.split_whitespace().next()?,
            };
            path.starts_with('/').then(|| PathBuf::from(path))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ldd_output_gives_library_paths() {
        let text = "\tlinux-vdso.so.1 (0x00007ffd1b5f2000)\n\
                    \tlibgcc_s.so.1 => /lib/x86_64-linux-gnu/libgcc_s.so.1 (0x00007f0)\n\
                    \tlibc.so.6 => /lib/x86_64-linux-gnu/libc.so.6 (0x00007f1)\n\
                    \t/lib64/ld-linux-x86-64.so.2 (0x00007f2)\n";
        assert_eq!(
            parse_ldd(text),
            [
                "/lib/x86_64-linux-gnu/libgcc_s.so.1",
                "/lib/x86_64-linux-gnu/libc.so.6",
                "/lib64/ld-linux-x86-64.so.2"
            ]
            .map(PathBuf::from)
        );
    }

    /// The newc layout the kernel's unpacker reads: magic, 13 hex fields, the name with its NUL,
    /// padding to 4 bytes, the data, padding; parents come before their children.
    #[test]
    fn newc_entries_are_aligned_and_parents_first() {
        let mut archive = Archive::default();
        archive.file("/a/b/c", 0o644, b"hello");
        let bytes = archive.finish();
        let text = String::from_utf8_lossy(&bytes);
        let a = text.find("a\0").unwrap();
        let ab = text.find("a/b\0").unwrap();
        let abc = text.find("a/b/c\0").unwrap();
        assert!(a < ab && ab < abc, "{text}");
        assert_eq!(bytes.len() % 4, 0);
        assert!(bytes.starts_with(b"070701"));
        assert_eq!(text.matches("070701").count(), 4, "a, a/b, a/b/c, trailer");
        assert!(text.contains("TRAILER!!!"));
        // c's header: size field (7th) is 5.
        let header = &text[abc - 110..abc];
        assert_eq!(&header[6 + 6 * 8..6 + 7 * 8], "00000005");
    }
}
