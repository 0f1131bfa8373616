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

/// Field 3 of `/proc/PID/stat`, the state letter.
fn parse_state(stat: &str) -> Option<char> {
    stat[stat.rfind(')')? + 1..]
        .split_whitespace()
        .next()?
        .chars()
        .next()
}

/// A zombie or dead task: past its exit.
fn is_dead(state: Option<char>) -> bool {
    matches!(state, None | Some('Z' | 'X' | 'x'))
}

/// Whether the process `pid`, known to have been running at `CLOCK_BOOTTIME` `seen_boot_ns`,
/// still runs: its pid is not gone or taken by a later process, and it has not exited. A
/// zombie has exited (its last thread is past `sched_process_exit`), unless only its leader
/// has: then another thread still runs.
pub(crate) fn running_since(pid: u32, seen_boot_ns: u64) -> bool {
    let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return false;
    };
    let Some(ticks) = parse_start_ticks(&stat) else {
        return false;
    };
    // The start time is whole clock ticks, rounded down: never later than the true start.
    if ticks * (1_000_000_000 / time::clock_ticks_per_second()) > seen_boot_ns {
        return false;
    }
    if !is_dead(parse_state(&stat)) {
        return true;
    }
    threads_stat(pid).any(|stat| !is_dead(parse_state(&stat)))
}

/// `/proc/PID/task/*/stat` of each thread still listed.
fn threads_stat(pid: u32) -> impl Iterator<Item = String> {
    fs::read_dir(format!("/proc/{pid}/task"))
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| fs::read_to_string(e.path().join("stat")).ok())
}

/// The whole command line of the process `pid` that exec'd at `CLOCK_BOOTTIME` `exec_boot_ns`,
/// from `/proc/PID/cmdline`, when it still runs that exec: it started before the exec (a
/// reused pid started after), and the line is `total` bytes and starts with the `prefix` the
/// kernel copied at the exec (a process that exec'd again, or rewrote its arguments, does not
/// match). `None` otherwise: then the prefix is all there is.
pub(crate) fn cmdline_of_exec(
    pid: u32,
    exec_boot_ns: u64,
    prefix: &[u8],
    total: usize,
) -> Option<Vec<u8>> {
    let before = start_time(pid)?;
    if before.boot_ns > exec_boot_ns {
        return None;
    }
    let cmdline = fs::read(format!("/proc/{pid}/cmdline")).ok()?;
    // Read the start again: the pid may have been reused while the line was read.
    let same = start_time(pid).is_some_and(|after| after.ticks == before.ticks);
    (same && cmdline.len() == total && cmdline.starts_with(prefix)).then_some(cmdline)
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

/// Resident memory of process `pid` in bytes: `VmRSS` of `/proc/PID/status`. Not `statm`'s
/// resident pages: on 6.18 those are the kernel's per-CPU counters without the deltas not yet
/// folded in, megabytes off for a process that is faulting pages in (a VMM booting), where
/// `VmRSS` sums them.
pub(crate) fn resident_bytes(pid: u32) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let kib: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))?
        .trim()
        .strip_suffix("kB")?
        .trim()
        .parse()
        .ok()?;
    Some(kib * 1024)
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

/// Whether thread `tid` of process `tgid` exists.
pub(crate) fn thread_exists(tgid: u32, tid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{tgid}/task/{tid}")).exists()
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

/// This boot of the host (`/proc/sys/kernel/random/boot_id`): pids and boot-clock times of
/// another boot mean nothing in this one.
pub(crate) fn boot_id() -> Option<String> {
    let id = fs::read_to_string("/proc/sys/kernel/random/boot_id").ok()?;
    Some(id.trim().to_owned()).filter(|id| !id.is_empty())
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
    fn state_letter() {
        let stat = "42 (a) Z) Z 1 42 42 0 -1 4194560 100 0 0 0 1 2 0 0 20 0 3 0 12345 1000 10";
        assert_eq!(parse_state(stat), Some('Z'));
        assert!(is_dead(parse_state(stat)));
        assert!(!is_dead(Some('S')));
    }

    #[test]
    fn running_since_tells_a_later_start_and_an_exit() {
        let me = std::process::id();
        assert!(running_since(me, time::boot_ns_now()));
        let start = start_time(me).unwrap();
        assert!(
            !running_since(me, start.boot_ns.saturating_sub(1_000_000_000)),
            "a process that started after it was seen is another one"
        );
        let mut child = std::process::Command::new("true").spawn().unwrap();
        let pid = child.id();
        // Exited, not reaped yet: a zombie has exited.
        while parse_state(&fs::read_to_string(format!("/proc/{pid}/stat")).unwrap()) != Some('Z') {
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!running_since(pid, time::boot_ns_now()));
        child.wait().unwrap();
        assert!(!running_since(pid, time::boot_ns_now()));
    }

    #[test]
    fn cmdline_of_a_running_exec() {
        let mut child = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let pid = child.id();
        let now = time::boot_ns_now();
        let line = b"sleep\x0030\x00";
        // /proc/PID/cmdline shows the new program only once exec is done.
        let got = (0..500).find_map(|_| {
            std::thread::sleep(std::time::Duration::from_millis(5));
            cmdline_of_exec(pid, now, b"sleep", line.len())
        });
        assert_eq!(got.as_deref(), Some(&line[..]));
        assert_eq!(cmdline_of_exec(pid, now, b"other", line.len()), None);
        assert_eq!(cmdline_of_exec(pid, now, b"sleep", 99), None);
        let start = start_time(pid).unwrap();
        assert_eq!(
            cmdline_of_exec(
                pid,
                start.boot_ns.saturating_sub(1_000_000_000),
                b"sleep",
                9
            ),
            None,
            "an exec before the process started is another process's"
        );
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn own_process_is_running() {
        let me = std::process::id();
        let start = start_time(me).expect("own stat");
        assert!(running_since(me, start.boot_ns));
        assert!(threads(me).iter().any(|(tid, _)| *tid == me));
    }

    #[test]
    fn own_resident_memory() {
        let vm_rss = || -> u64 {
            let status = fs::read_to_string("/proc/self/status").unwrap();
            let kib: u64 = status
                .lines()
                .find_map(|l| l.strip_prefix("VmRSS:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
                .unwrap();
            kib * 1024
        };
        // A test process grows as it runs (its code pages fault in): the reading lies between
        // the figures read just before and just after it.
        let before = vm_rss();
        let rss = resident_bytes(std::process::id()).unwrap();
        let after = vm_rss();
        assert!(
            before / 20 * 19 <= rss && rss <= after / 20 * 21,
            "{before} <= {rss} <= {after}"
        );
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
