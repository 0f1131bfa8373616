//! A VMM's configuration file and instance folder, read from the host as the VMM sees them.
//!
//! The command line names the file, so whoever starts the process chooses it: it is hostile
//! until proven otherwise. Paths are resolved inside the VMM's root (`/proc/PID/root`, with
//! `RESOLVE_IN_ROOT`: `..` and symlinks cannot leave it), a path relative to its working
//! folder beneath that folder (`RESOLVE_BENEATH`), never through a magic link
//! (`/proc/*/fd/*`), never through a symlink at the last step. The file is first opened
//! `O_PATH` (opening a device or a FIFO has effects of its own) and read only if it is a
//! regular file of at most [`MAX_CONFIG_BYTES`]; the read runs off the async workers and is
//! given up after [`READ_TIMEOUT`].

use std::{
    fs::File,
    io::{self, Read},
    os::fd::{AsRawFd, OwnedFd},
    path::Path,
    time::Duration,
};

use rustix::fs::{FileType, Mode, OFlags, ResolveFlags};

use crate::matching::allocation::ConfigFile;

/// Largest config file read (Firecracker's are a few KiB).
pub(crate) const MAX_CONFIG_BYTES: u64 = 1 << 20;
/// Longest a read may take (a file on a hung network or FUSE mount).
pub(crate) const READ_TIMEOUT: Duration = Duration::from_secs(1);

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigReadError {
    #[error("cannot open it")]
    Open(#[source] io::Error),
    #[error("it resolves outside the VMM's root or through a symlink")]
    Escapes(#[source] io::Error),
    #[error("not a regular file ({0})")]
    NotRegular(&'static str),
    #[error("larger than {MAX_CONFIG_BYTES} bytes")]
    TooLarge,
    #[error("cannot read it")]
    Read(#[source] io::Error),
    #[error("not read within {READ_TIMEOUT:?}")]
    TimedOut,
}

impl ConfigReadError {
    /// A file refused for what it is (a missing file is not a refusal).
    pub(crate) fn is_refusal(&self) -> bool {
        !matches!(self, Self::Open(_) | Self::Read(_))
    }
}

/// The text of the VMM's config file, read off the async workers within [`READ_TIMEOUT`].
pub(crate) async fn read(pid: u32, file: ConfigFile) -> Result<String, ConfigReadError> {
    let reading = tokio::task::spawn_blocking(move || read_blocking(pid, &file));
    match tokio::time::timeout(READ_TIMEOUT, reading).await {
        Ok(Ok(result)) => result,
        Ok(Err(join)) => Err(ConfigReadError::Read(io::Error::other(join))),
        Err(_) => Err(ConfigReadError::TimedOut),
    }
}

/// Whether `dir` is a folder in the root of the VMM with pid `pid` (looked up off the async
/// workers, within [`READ_TIMEOUT`]).
pub(crate) async fn dir_exists(pid: u32, dir: String) -> bool {
    let looking = tokio::task::spawn_blocking(move || dir_exists_blocking(pid, &dir));
    matches!(
        tokio::time::timeout(READ_TIMEOUT, looking).await,
        Ok(Ok(true))
    )
}

fn dir_exists_blocking(pid: u32, dir: &str) -> bool {
    let Ok(root) = open_base(&format!("/proc/{pid}/root")) else {
        return false;
    };
    rustix::fs::openat2(
        &root,
        dir,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
        ResolveFlags::IN_ROOT | ResolveFlags::NO_MAGICLINKS,
    )
    .is_ok()
}

fn open_base(path: &str) -> io::Result<OwnedFd> {
    Ok(rustix::fs::open(
        path,
        OFlags::PATH | OFlags::DIRECTORY | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

fn read_blocking(pid: u32, file: &ConfigFile) -> Result<String, ConfigReadError> {
    let (base, path, resolve) = match file {
        ConfigFile::Absolute(path) | ConfigFile::InInstanceDir(path) => {
            (format!("/proc/{pid}/root"), path, ResolveFlags::IN_ROOT)
        }
        ConfigFile::RelativeToCwd(path) => {
            (format!("/proc/{pid}/cwd"), path, ResolveFlags::BENEATH)
        }
    };
    let base = open_base(&base).map_err(ConfigReadError::Open)?;
    let found = open_path(&base, path, resolve)?;
    let stat = rustix::fs::fstat(&found).map_err(|e| ConfigReadError::Open(e.into()))?;
    match FileType::from_raw_mode(stat.st_mode) {
        FileType::RegularFile => {}
        FileType::Fifo => return Err(ConfigReadError::NotRegular("a FIFO")),
        FileType::CharacterDevice => return Err(ConfigReadError::NotRegular("a device")),
        FileType::BlockDevice => return Err(ConfigReadError::NotRegular("a block device")),
        FileType::Socket => return Err(ConfigReadError::NotRegular("a socket")),
        FileType::Directory => return Err(ConfigReadError::NotRegular("a folder")),
        // O_PATH with O_NOFOLLOW opens a symlink at the last step itself.
        FileType::Symlink => return Err(ConfigReadError::NotRegular("a symlink")),
        FileType::Unknown => return Err(ConfigReadError::NotRegular("not a file")),
    }
    if stat.st_size as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigReadError::TooLarge);
    }
    // The inode checked above, opened for reading through this process's own descriptor.
    let readable = rustix::fs::open(
        format!("/proc/self/fd/{}", found.as_raw_fd()),
        OFlags::RDONLY | OFlags::NONBLOCK | OFlags::NOCTTY | OFlags::CLOEXEC,
        Mode::empty(),
    )
    .map_err(|e| ConfigReadError::Open(e.into()))?;
    let mut bytes = Vec::new();
    File::from(readable)
        .take(MAX_CONFIG_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(ConfigReadError::Read)?;
    // It may have grown since the stat.
    if bytes.len() as u64 > MAX_CONFIG_BYTES {
        return Err(ConfigReadError::TooLarge);
    }
    Ok(String::from_utf8_lossy(&bytes).into_owned())
}

/// `path` under `base` as `resolve` allows, opened `O_PATH` (no effect on what it is).
fn open_path(
    base: &OwnedFd,
    path: &Path,
    resolve: ResolveFlags,
) -> Result<OwnedFd, ConfigReadError> {
    rustix::fs::openat2(
        base,
        path,
        OFlags::PATH | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
        resolve | ResolveFlags::NO_MAGICLINKS,
    )
    .map_err(|errno| {
        let error = io::Error::from(errno);
        // ELOOP: a symlink at the last step or a magic link; EXDEV: out of the folder.
        if errno == rustix::io::Errno::LOOP || errno == rustix::io::Errno::XDEV {
            ConfigReadError::Escapes(error)
        } else {
            ConfigReadError::Open(error)
        }
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn me() -> u32 {
        std::process::id()
    }

    #[tokio::test]
    async fn reads_relative_to_the_vmm() {
        let text = read(me(), ConfigFile::RelativeToCwd("Cargo.toml".into()))
            .await
            .expect("readable");
        assert!(text.contains("[package]"));
        let missing = read(me(), ConfigFile::Absolute("/nonexistent/vmm.json".into())).await;
        assert!(
            matches!(missing, Err(ConfigReadError::Open(_))),
            "{missing:?}"
        );
        assert!(!missing.unwrap_err().is_refusal());
    }

    #[tokio::test]
    async fn hostile_files_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let fifo = dir.path().join("fifo");
        rustix::fs::mknodat(
            rustix::fs::CWD,
            &fifo,
            FileType::Fifo,
            Mode::from_raw_mode(0o600),
            0,
        )
        .unwrap();
        let big = dir.path().join("big.json");
        std::fs::write(&big, vec![b' '; MAX_CONFIG_BYTES as usize + 1]).unwrap();
        let link = dir.path().join("link.json");
        std::os::unix::fs::symlink("/etc/hostname", &link).unwrap();
        let cases = [
            (ConfigFile::Absolute("/dev/zero".into()), "device"),
            (ConfigFile::Absolute(fifo), "FIFO"),
            (ConfigFile::Absolute(big), "larger"),
            (ConfigFile::Absolute(link), "symlink"),
            (ConfigFile::Absolute(dir.path().into()), "folder"),
            (
                ConfigFile::RelativeToCwd("../../../../../../etc/hostname".into()),
                "outside",
            ),
            (ConfigFile::Absolute("/proc/self/exe".into()), "symlink"),
        ];
        for (file, want) in cases {
            let got = read(me(), file.clone()).await.unwrap_err();
            assert!(got.is_refusal(), "{file:?}: {got:?}");
            assert!(got.to_string().contains(want), "{file:?}: {got}");
        }
        // Exactly the limit is fine.
        let edge = dir.path().join("edge.json");
        std::fs::write(&edge, vec![b' '; MAX_CONFIG_BYTES as usize]).unwrap();
        assert_eq!(
            read(me(), ConfigFile::Absolute(edge)).await.unwrap().len(),
            MAX_CONFIG_BYTES as usize
        );
    }

    #[tokio::test]
    async fn folders_in_the_vmm_root() {
        assert!(dir_exists(me(), "/proc".into()).await);
        assert!(!dir_exists(me(), "/nonexistent".into()).await);
        assert!(!dir_exists(me(), "/etc/hostname".into()).await);
    }
}
