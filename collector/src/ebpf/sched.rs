//! The scheduling maps, seen from userspace: discovery adds the threads of processes the kernel
//! did not see start and forgets processes it stops following; the metrics read the aggregates
//! at scrape time.

use std::sync::{Arc, Mutex};

use aya::maps::{HashMap, MapData, MapError};
use collector_common::{SCHED_RUNTIME_UNKNOWN, SchedKey, SchedStats, SchedThread, thread_class};

/// `BPF_NOEXIST`: never overwrite what the kernel programs keep up to date.
const NOEXIST: u64 = 1;

/// Scheduling aggregates of one process, per thread class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ProcessSched {
    pub vcpu: SchedStats,
    pub vmm: SchedStats,
}

pub struct SchedMaps {
    threads: HashMap<MapData, u32, SchedThread>,
    stats: HashMap<MapData, SchedKey, SchedStats>,
}

/// Whether thread `tid` of `tgid` exists and has not started exiting (a zombie's or dying
/// thread's last switch may already have passed).
fn thread_alive(tgid: u32, tid: u32) -> bool {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{tgid}/task/{tid}/stat")) else {
        return false;
    };
    let state = stat
        .rfind(')')
        .and_then(|end| stat[end + 1..].split_whitespace().next());
    !matches!(state, None | Some("Z" | "X" | "x"))
}

impl std::fmt::Debug for SchedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedMaps").finish_non_exhaustive()
    }
}

/// Shared by discovery (writes) and the metrics (reads); every use is a few map calls.
pub type SharedSched = Arc<Mutex<SchedMaps>>;

impl SchedMaps {
    pub fn new(
        threads: HashMap<MapData, u32, SchedThread>,
        stats: HashMap<MapData, SchedKey, SchedStats>,
    ) -> Self {
        Self { threads, stats }
    }

    /// Follows the running threads `(tid, is_vcpu)` of process `tgid`. Threads the kernel
    /// already follows keep their entry (and their class, decided when they were named).
    pub fn follow_threads(&mut self, tgid: u32, threads: &[(u32, bool)]) -> Result<(), MapError> {
        for &(tid, is_vcpu) in threads {
            let thread = SchedThread {
                tgid,
                class: if is_vcpu {
                    thread_class::VCPU
                } else {
                    thread_class::VMM
                },
                queued_ns: 0,
                runtime_ns: SCHED_RUNTIME_UNKNOWN,
            };
            match self.threads.insert(&tid, &thread, NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) => {}
                Err(e) => return Err(e),
            }
            // A thread that ended before the insert would never free its entry: undo.
            if !thread_alive(tgid, tid) {
                let _ = self.threads.remove(&tid);
            }
        }
        Ok(())
    }

    /// Forgets process `tgid`: its aggregates, and with `threads` its thread entries (exited
    /// threads free their own; this catches a thread that ended while userspace added it).
    pub fn forget(&mut self, tgid: u32, threads: bool) {
        for class in [thread_class::VMM, thread_class::VCPU] {
            let _ = self.stats.remove(&SchedKey { tgid, class });
        }
        if threads {
            let stale: Vec<u32> = self
                .threads
                .iter()
                .filter_map(Result::ok)
                .filter(|(_, t)| t.tgid == tgid)
                .map(|(tid, _)| tid)
                .collect();
            for tid in stale {
                let _ = self.threads.remove(&tid);
            }
        }
    }

    /// The aggregates of process `tgid` (zero for a class with no event yet).
    pub fn process(&self, tgid: u32) -> ProcessSched {
        let get = |class| {
            self.stats
                .get(&SchedKey { tgid, class }, 0)
                .unwrap_or_default()
        };
        ProcessSched {
            vcpu: get(thread_class::VCPU),
            vmm: get(thread_class::VMM),
        }
    }

    /// Entries in the thread and aggregate maps (to see that nothing leaks).
    pub fn entries(&self) -> (usize, usize) {
        (self.threads.keys().count(), self.stats.keys().count())
    }
}
