//! What `/proc` tells about processes: when they started (to tell a reused pid), their
//! executables and command lines, threads, resident memory, open descriptors.

use std::{fs, time::SystemTime};

use crate::{matching::split_cmdline, model::time};

/// When a process started, as `/proc/PID/stat` tells it (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct StartTime {
    pub(crate) ticks: u64,
    /// The same instant on `CLOCK_BOOTTIME`.
    pub(crate) boot_ns: u64,
    pub(crate) wall: SystemTime,
}

/// Field 22 of `/proc/PID/stat` (the command in field 2 may hold spaces and parentheses).
pub(crate) fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

pub(crate) fn start_time(pid: u32) -> Option<StartTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_start_ticks(&stat)?;
    let boot_ns = ticks * (1_000_000_000 / time::clock_ticks_per_second());
    Some(StartTime {
        ticks,
        boot_ns,
        wall: time::boot_ns_to_system_time(boot_ns),
    })
}

/// Is the process `pid` that started at `start` still there (and not a reused pid)?
pub(crate) fn still_running(pid: u32, start: StartTime) -> bool {
    start_time(pid).is_some_and(|now| now.ticks == start.ticks)
}

/// A process found in `/proc`: what identifies it and when it started.
#[derive(Debug, Clone)]
pub(crate) struct RunningProcess {
    pub(crate) pid: u32,
    /// `/proc/PID/exe`, without a ` (deleted)` mark.
    pub(crate) executable: String,
    pub(crate) start: StartTime,
    /// `CLOCK_BOOTTIME` just before the command line was read.
    pub(crate) seen_boot_ns: u64,
    /// The command line, argv[0] first.
    pub(crate) args: Vec<String>,
}

/// Every user process in `/proc` for which `wanted(executable)` holds, with its command line
/// (kernel threads and processes gone since the listing are skipped).
pub(crate) fn processes(mut wanted: impl FnMut(&str) -> bool) -> Vec<RunningProcess> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut found = Vec::new();
    for entry in entries.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        // Kernel threads and processes gone since readdir have no readable exe.
        let Ok(exe) = fs::read_link(format!("/proc/{pid}/exe")) else {
            continue;
        };
        let executable = exe
            .to_string_lossy()
            .trim_end_matches(" (deleted)")
            .to_owned();
        if !wanted(&executable) {
            continue;
        }
        let Some(start) = start_time(pid) else {
            continue;
        };
        let seen_boot_ns = time::boot_ns_now();
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        found.push(RunningProcess {
            pid,
            executable,
            start,
            seen_boot_ns,
            args: split_cmdline(&cmdline),
        });
    }
    found
}

/// Threads of `pid` with their names: `(tid, comm)`.
pub(crate) fn threads(pid: u32) -> Vec<(u32, String)> {
    let Ok(entries) = fs::read_dir(format!("/proc/{pid}/task")) else {
        return Vec::new();
    };
    let mut threads: Vec<_> = entries
        .flatten()
        .filter_map(|e| {
            let tid = e.file_name().to_str()?.parse().ok()?;
            let comm = fs::read_to_string(e.path().join("comm")).ok()?;
            Some((tid, comm.trim_end_matches('\n').to_owned()))
        })
        .collect();
    threads.sort_unstable();
    threads
}

/// Resident memory of process `pid` in bytes: `/proc/PID/statm`'s resident pages, the figure
/// `VmRSS` shows in `/proc/PID/status`.
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * time::page_size())
}

/// Whether thread `tid` of `tgid` exists and has not started exiting (a zombie's or dying
/// thread's last switch may already have passed).
pub(crate) fn thread_alive(tgid: u32, tid: u32) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

/// Whether a process `pid` exists (any process: a reused pid counts).
pub(crate) fn exists(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// Open descriptors of `pid` with what each points to (`/proc/PID/fd`).
pub(crate) fn open_files(pid: u32) -> Vec<(u32, std::path::PathBuf)> {
    let Ok(fds) = fs::read_dir(format!("/proc/{pid}/fd")) else {
        return Vec::new();
    };
    fds.flatten()
        .filter_map(|entry| {
            let fd = entry.file_name().to_str()?.parse::<u32>().ok()?;
            Some((fd, fs::read_link(entry.path()).ok()?))
        })
        .collect()
}

/// Effective capabilities of this process, from `/proc/self/status`.
pub(crate) fn effective_capabilities() -> u64 {
    fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_hostile_comm() {
        let stat = "42 (a) b) (c) S 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 12345 1000 10";
        assert_eq!(parse_start_ticks(stat), Some(12345));
        assert_eq!(parse_start_ticks("garbage"), None);
    }

    #[test]
    fn own_process_is_running() {
        let me = std::process::id();
        let start = start_time(me).expect("own stat");
        assert!(still_running(me, start));
        assert!(!still_running(
            me,
            StartTime {
                ticks: start.ticks + 1,
                ..start
            }
        ));
        assert!(threads(me).iter().any(|(tid, _)| *tid == me));
    }

    #[test]
    fn own_resident_memory() {
        let status = fs::read_to_string("/proc/self/status").unwrap();
        let vm_rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let rss = resident_bytes(std::process::id()).unwrap();
        let diff = rss.abs_diff(vm_rss_kib * 1024);
        assert!(diff * 20 < rss, "statm {rss} vs VmRSS {vm_rss_kib} KiB");
    }

    #[test]
    fn own_process_in_the_listing() {
        let me = std::process::id();
        let exe = std::env::current_exe().unwrap();
        let found = processes(|e| std::path::Path::new(e) == exe);
        let mine = found.iter().find(|p| p.pid == me).expect("listed");
        assert!(!mine.args.is_empty());
        assert!(thread_alive(me, me));
        assert!(
            open_files(me)
                .iter()
                .any(|(fd, _)| *fd == 0 || *fd == 1 || *fd == 2)
        );
    }
}
