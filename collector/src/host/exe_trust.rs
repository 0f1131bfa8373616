//! Whether a process runs an executable the operator installed: root-owned, not writable by
//! group or others, in one of the trusted folders. Anyone on the node can start a program
//! called `firecracker`; only root can put one in `/usr/bin`.
//!
//! The executable is the process's own (`/proc/PID/exe`: the file it runs, whatever path
//! started it). A process gone before it is checked is judged by the absolute path its exec
//! record names, if that file is trustworthy too.

use std::{
    io,
    os::unix::fs::MetadataExt,
    path::{Path, PathBuf},
};

/// Why an executable is not trusted.
#[derive(Debug, thiserror::Error)]
pub(crate) enum Untrusted {
    #[error("its executable cannot be checked")]
    Unreadable(#[source] io::Error),
    #[error("its executable {path} is owned by uid {uid}, not root")]
    NotRootOwned { path: String, uid: u32 },
    #[error("its executable {path} is writable by group or others (mode {mode:o})")]
    Writable { path: String, mode: u32 },
    #[error("its executable {path} is not in trusted_executable_dirs")]
    OutsideTrustedDirs { path: String },
}

/// Checks the executable of process `pid`; `exec_path` is the path its exec record names (the
/// fallback when the process is already gone).
pub(crate) fn check(pid: u32, exec_path: Option<&str>, dirs: &[PathBuf]) -> Result<(), Untrusted> {
    let link = format!("/proc/{pid}/exe");
    match (std::fs::read_link(&link), std::fs::metadata(&link)) {
        (Ok(path), Ok(meta)) => {
            let path = path.to_string_lossy();
            judge(path.trim_end_matches(" (deleted)"), &meta, dirs)
        }
        (Err(error), _) | (_, Err(error)) => match exec_path {
            Some(path) if Path::new(path).is_absolute() => {
                let meta = std::fs::metadata(path).map_err(Untrusted::Unreadable)?;
                // Its path with symlinks resolved: the folder the file really is in.
                let real = std::fs::canonicalize(path).map_err(Untrusted::Unreadable)?;
                judge(&real.to_string_lossy(), &meta, dirs)
            }
            _ => Err(Untrusted::Unreadable(error)),
        },
    }
}

fn judge(path: &str, meta: &std::fs::Metadata, dirs: &[PathBuf]) -> Result<(), Untrusted> {
    if meta.uid() != 0 {
        return Err(Untrusted::NotRootOwned {
            path: path.to_owned(),
            uid: meta.uid(),
        });
    }
    let mode = meta.mode() & 0o7777;
    if mode & 0o022 != 0 {
        return Err(Untrusted::Writable {
            path: path.to_owned(),
            mode,
        });
    }
    if !dirs.iter().any(|dir| Path::new(path).starts_with(dir)) {
        return Err(Untrusted::OutsideTrustedDirs {
            path: path.to_owned(),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt;

    use super::*;

    #[test]
    fn own_executable_by_folder_owner_and_mode() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let folder = exe.parent().unwrap().to_owned();
        let outside = check(me, None, &[PathBuf::from("/usr/bin")]).unwrap_err();
        assert!(
            matches!(
                outside,
                Untrusted::OutsideTrustedDirs { .. } | Untrusted::NotRootOwned { .. }
            ),
            "{outside}"
        );
        // A folder that only shares a prefix of the name is not the folder.
        let mut sibling = folder.clone().into_os_string();
        sibling.push("x");
        assert!(check(me, None, &[PathBuf::from(sibling)]).is_err());

        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("firecracker");
        std::fs::write(&file, b"#!/bin/sh\n").unwrap();
        let dirs = [dir.path().to_owned()];
        let gone = u32::MAX;
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o755)).unwrap();
        let as_root = std::fs::metadata(&file).unwrap().uid() == 0;
        let judged = check(gone, file.to_str(), &dirs);
        if as_root {
            judged.unwrap();
        } else {
            assert!(matches!(judged, Err(Untrusted::NotRootOwned { .. })));
        }
        std::fs::set_permissions(&file, std::fs::Permissions::from_mode(0o777)).unwrap();
        assert!(check(gone, file.to_str(), &dirs).is_err());
        assert!(matches!(
            check(gone, Some("relative/firecracker"), &dirs),
            Err(Untrusted::Unreadable(_))
        ));
    }
}
