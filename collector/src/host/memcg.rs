//! The memory cgroup of an instance, and whether an OOM kill was that cgroup's doing.
//!
//! The kernel's `mark_victim` does not say whether the OOM was global or confined to a memory
//! cgroup. What can be told afterwards: a cgroup on the instance's path (itself or an ancestor)
//! that has a limit and has hit it (`memory.failcnt` > 0 on cgroup v1, an `oom` count in
//! `memory.events` on v2) confined it.

use std::{fs, path::PathBuf};

/// A process's memory cgroup: its path within the hierarchy and the hierarchy's mount point.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct MemCgroup {
    pub(crate) path: String,
    mount: PathBuf,
    v2: bool,
}

/// What the cgroups say about an OOM kill.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Constraint {
    /// `memcg`, `global` or `unknown`.
    pub(crate) kind: &'static str,
    pub(crate) path: Option<String>,
    pub(crate) limit_bytes: Option<u64>,
}

/// Limits at or above this are "no limit" (v1 reports PAGE_COUNTER_MAX in bytes).
const UNLIMITED: u64 = 1 << 62;

/// The memory cgroup whose folder has inode number `ino` (what the kernel program reads from
/// the OOM victim: `kernfs_node.id`), in the hierarchy that holds the memory controller.
pub(crate) fn by_inode(ino: u64) -> Option<MemCgroup> {
    use std::os::unix::fs::MetadataExt;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (mount, v2) = match mounts(&mountinfo) {
        (Some(v1), _) => (v1, false),
        (None, Some(v2)) => (v2, true),
        (None, None) => return None,
    };
    // Depth-first over the cgroup folders; a node has a few thousand at most.
    let mut stack = vec![mount.clone()];
    while let Some(dir) = stack.pop() {
        if fs::metadata(&dir).is_ok_and(|m| m.ino() == ino) {
            let relative = dir
                .strip_prefix(&mount)
                .ok()?
                .to_string_lossy()
                .into_owned();
            return Some(MemCgroup {
                path: format!("/{relative}"),
                mount,
                v2,
            });
        }
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        stack.extend(
            entries
                .flatten()
                .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                .map(|e| e.path()),
        );
    }
    None
}

/// The memory cgroup of `pid`: its v1 `memory` hierarchy if mounted, else the v2 one.
pub(crate) fn of_process(pid: u32) -> Option<MemCgroup> {
    let cgroups = fs::read_to_string(format!("/proc/{pid}/cgroup")).ok()?;
    let mountinfo = fs::read_to_string("/proc/self/mountinfo").ok()?;
    let (v1_mount, v2_mount) = mounts(&mountinfo);
    let (v1_path, v2_path) = paths(&cgroups);
    match (v1_mount, v1_path, v2_mount, v2_path) {
        (Some(mount), Some(path), _, _) => Some(MemCgroup {
            path,
            mount,
            v2: false,
        }),
        (_, _, Some(mount), Some(path)) => Some(MemCgroup {
            path,
            mount,
            v2: true,
        }),
        _ => None,
    }
}

/// Mount points of the v1 `memory` hierarchy and of cgroup v2, from `/proc/self/mountinfo`.
fn mounts(mountinfo: &str) -> (Option<PathBuf>, Option<PathBuf>) {
    let (mut v1, mut v2) = (None, None);
    for line in mountinfo.lines() {
        // "... mountpoint opts - fstype source superopts"
        let Some((left, right)) = line.split_once(" - ") else {
            continue;
        };
        let Some(mountpoint) = left.split(' ').nth(4) else {
            continue;
        };
        let mut right = right.split(' ');
        let (fstype, superopts) = (right.next(), right.nth(1).unwrap_or(""));
        match fstype {
            Some("cgroup") if superopts.split(',').any(|o| o == "memory") => {
                v1.get_or_insert_with(|| PathBuf::from(mountpoint));
            }
            Some("cgroup2") => {
                v2.get_or_insert_with(|| PathBuf::from(mountpoint));
            }
            _ => {}
        }
    }
    (v1, v2)
}

/// The v1 `memory` path and the v2 path in a `/proc/PID/cgroup` file.
fn paths(cgroups: &str) -> (Option<String>, Option<String>) {
    let (mut v1, mut v2) = (None, None);
    for line in cgroups.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(id), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        if id == "0" && controllers.is_empty() {
            v2 = Some(path.to_owned());
        } else if controllers.split(',').any(|c| c == "memory") {
            v1 = Some(path.to_owned());
        }
    }
    (v1, v2)
}

fn read_u64(path: PathBuf) -> Option<u64> {
    let text = fs::read_to_string(path).ok()?;
    let text = text.trim();
    if text == "max" {
        Some(u64::MAX)
    } else {
        text.parse().ok()
    }
}

/// The `key N` value of a flat-keyed cgroup file such as `memory.events`.
fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix(' ')?.trim().parse().ok())
}

impl MemCgroup {
    /// Walks from this cgroup up to the root looking for a limit that was hit.
    pub(crate) fn oom_constraint(&self) -> Constraint {
        let mut path = self.path.clone();
        let mut own_limit = None;
        let mut readable = false;
        loop {
            let dir = self.mount.join(path.trim_start_matches('/'));
            let (limit, hit) = if self.v2 {
                let limit = read_u64(dir.join("memory.max"));
                let events = fs::read_to_string(dir.join("memory.events")).ok();
                (limit, events.and_then(|e| keyed(&e, "oom")).map(|n| n > 0))
            } else {
                (
                    read_u64(dir.join("memory.limit_in_bytes")),
                    read_u64(dir.join("memory.failcnt")).map(|n| n > 0),
                )
            };
            readable |= limit.is_some();
            let limit = limit.filter(|l| *l < UNLIMITED);
            if own_limit.is_none() && path == self.path {
                own_limit = limit;
            }
            if let (Some(limit), Some(true)) = (limit, hit) {
                return Constraint {
                    kind: "memcg",
                    path: Some(path),
                    limit_bytes: Some(limit),
                };
            }
            if path == "/" || path.is_empty() {
                break;
            }
            path = match path.rfind('/') {
                Some(0) | None => "/".to_owned(),
                Some(i) => path[..i].to_owned(),
            };
        }
        Constraint {
            kind: if readable { "global" } else { "unknown" },
            path: Some(self.path.clone()),
            limit_bytes: own_limit,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_hybrid_hierarchy() {
        let cgroups = "12:pids:/a\n4:memory:/ukp/vm-1\n1:name=systemd:/x\n0::/unified/path\n";
        assert_eq!(
            paths(cgroups),
            (Some("/ukp/vm-1".into()), Some("/unified/path".into()))
        );
        let mountinfo = "\
30 25 0:26 / /sys/fs/cgroup/memory rw,relatime shared:9 - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw
32 25 0:28 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu";
        assert_eq!(
            mounts(mountinfo),
            (
                Some("/sys/fs/cgroup/memory".into()),
                Some("/sys/fs/cgroup/unified".into())
            )
        );
    }

    #[test]
    fn keyed_files() {
        let events = "low 0\nhigh 0\nmax 3\noom 1\noom_kill 1\n";
        assert_eq!(keyed(events, "oom"), Some(1));
        assert_eq!(keyed(events, "oom_kill"), Some(1));
        assert_eq!(keyed(events, "missing"), None);
    }

    #[test]
    fn own_process_has_a_memory_cgroup() {
        use std::os::unix::fs::MetadataExt;
        let cg = of_process(std::process::id()).expect("memory cgroup of the test process");
        assert!(cg.path.starts_with('/'), "{cg:?}");
        assert_ne!(cg.oom_constraint().kind, "unknown", "{cg:?}");
        // The same cgroup, found from its folder's inode number as the kernel reports it.
        let ino = fs::metadata(cg.mount.join(cg.path.trim_start_matches('/')))
            .unwrap()
            .ino();
        assert_eq!(by_inode(ino), Some(cg));
        assert_eq!(by_inode(u64::MAX), None);
    }
}
