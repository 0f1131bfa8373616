//! The start-up scan of `/proc` for hypervisor processes that are already running.

use std::{fs, time::SystemTime};

use super::{Claim, matchers::split_cmdline};
use crate::{clock, registry::Origin};

/// When a process started, as `/proc/PID/stat` tells it (clock ticks since boot).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct StartTime {
    pub ticks: u64,
    /// The same instant on `CLOCK_BOOTTIME`.
    pub boot_ns: u64,
    pub wall: SystemTime,
}

/// A running process a matcher claimed, and when it started (to tell a reused pid).
#[derive(Debug)]
pub struct Found {
    pub claim: Claim,
    pub start: StartTime,
}

/// Field 22 of `/proc/PID/stat` (the command in field 2 may hold spaces and parentheses).
pub fn parse_start_ticks(stat: &str) -> Option<u64> {
    let after_comm = &stat[stat.rfind(')')? + 1..];
    after_comm.split_whitespace().nth(19)?.parse().ok()
}

pub fn start_time(pid: u32) -> Option<StartTime> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_start_ticks(&stat)?;
    let boot_ns = ticks * (1_000_000_000 / clock::clock_ticks_per_second());
    Some(StartTime {
        ticks,
        boot_ns,
        wall: clock::boot_ns_to_system_time(boot_ns),
    })
}

/// Is the process `pid` that started at `start` still there (and not a reused pid)?
pub fn still_running(pid: u32, start: StartTime) -> bool {
    start_time(pid).is_some_and(|now| now.ticks == start.ticks)
}

/// Every process in `/proc` that `identify(executable, args, pid)` claims.
pub fn scan(
    mut identify: impl FnMut(&str, &[String], u32) -> Option<(usize, String)>,
) -> Vec<Found> {
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
        let Some(start_time) = start_time(pid) else {
            continue;
        };
        let seen_boot_ns = clock::boot_ns_now();
        let Ok(cmdline) = fs::read(format!("/proc/{pid}/cmdline")) else {
            continue;
        };
        let args = split_cmdline(&cmdline);
        if let Some((matcher, instance_uuid)) = identify(&executable, &args, pid) {
            let claim = Claim {
                pid,
                matcher,
                instance_uuid,
                origin: Origin::Discovered,
                start_time: start_time.wall,
                start_boot_ns: start_time.boot_ns,
                seen_boot_ns,
                executable,
                args,
            };
            found.push(Found {
                claim,
                start: start_time,
            });
        }
    }
    found
}

/// Threads of `pid` with their names: `(tid, comm)`.
pub fn threads(pid: u32) -> Vec<(u32, String)> {
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
}
