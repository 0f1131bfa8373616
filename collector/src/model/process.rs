//! What the kernel reports about followed processes: exec, exit, untrack and OOM-victim
//! events, decoded (by `kernel::process_decode`) into plain values.

/// A process event, decoded.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum ProcessEvent {
    Exec(ProcessExec),
    Exit(ProcessExit),
    /// A followed process exec'd something no matcher claims.
    Untrack {
        tgid: u32,
        boot_ns: u64,
    },
    OomVictim(OomVictim),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProcessExec {
    pub(crate) tgid: u32,
    pub(crate) boot_ns: u64,
    pub(crate) matcher_id: u32,
    pub(crate) comm: String,
    /// Path given to exec.
    pub(crate) filename: String,
    /// Arguments, argv[0] first: those the kernel's prefix of the command line holds whole.
    pub(crate) args: Vec<String>,
    /// The command line's bytes as the kernel copied them (a prefix when `args_total` is
    /// larger).
    pub(crate) args_prefix: Vec<u8>,
    /// Bytes of the whole command line.
    pub(crate) args_total: usize,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProcessExit {
    pub(crate) tgid: u32,
    pub(crate) boot_ns: u64,
    /// The OOM killer had chosen this process (the kernel map's flag at exit).
    pub(crate) oom_victim: bool,
    /// `task_struct.exit_code` of the group's last thread (a wait status).
    pub(crate) exit_code: u32,
    /// `signal_struct.group_exit_code`.
    pub(crate) group_exit_code: u32,
    /// `signal_struct.flags`.
    pub(crate) signal_flags: u32,
}

/// `SIGNAL_GROUP_EXIT` in `signal_struct.flags` (include/linux/sched/signal.h, stable since 2.6).
pub(crate) const SIGNAL_GROUP_EXIT: u32 = 0x4;

impl ProcessExit {
    /// The wait status a parent would see: the group's exit status after `exit_group()` or a
    /// fatal signal, else the last thread's own.
    pub(crate) fn wait_status(&self) -> u32 {
        if self.signal_flags & SIGNAL_GROUP_EXIT != 0 {
            self.group_exit_code
        } else {
            self.exit_code
        }
    }
}

/// The OOM killer chose a tracked process.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct OomVictim {
    pub(crate) tgid: u32,
    pub(crate) pid: u32,
    pub(crate) boot_ns: u64,
    /// Inode number of the victim's memory cgroup folder, 0 when unknown.
    pub(crate) memcg_id: u64,
    /// Memory counters, in bytes, when the kernel passes the victim to the tracepoint.
    pub(crate) counters: Option<OomCounters>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub(crate) struct OomCounters {
    pub(crate) total_vm_bytes: u64,
    pub(crate) anon_rss_bytes: u64,
    pub(crate) file_rss_bytes: u64,
    pub(crate) shmem_rss_bytes: u64,
    pub(crate) oom_score_adj: i32,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn wait_status_prefers_the_group_exit() {
        let exit = |exit_code, group_exit_code, signal_flags| ProcessExit {
            tgid: 1,
            boot_ns: 0,
            oom_victim: false,
            exit_code,
            group_exit_code,
            signal_flags,
        };
        assert_eq!(exit(3 << 8, 0, 0).wait_status(), 3 << 8);
        assert_eq!(
            exit(9, 11 | 0x80, SIGNAL_GROUP_EXIT).wait_status(),
            11 | 0x80
        );
    }
}
