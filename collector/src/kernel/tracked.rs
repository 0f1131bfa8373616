//! The kernel's map of followed processes (`TRACKED_PROCESSES`), seen from userspace:
//! discovery keeps the processes it names, inserts the ones a `/proc` scan finds, removes the
//! ones it drops and the entries left behind by processes that are gone.
//!
//! An entry is only ever changed while it is the same process's: a pid the kernel has forgotten
//! (its exit removed the entry) is never brought back, or a later process with that pid would
//! be followed as the old instance, its output written into the old tenant's console log.

use aya::maps::{HashMap, MapData, MapError};
use collector_common::{TRACKED_DISCOVERED, TrackedProcess};

use super::sched::ThreadFilter;

/// `BPF_NOEXIST`: insert only.
const NOEXIST: u64 = 1;
/// `BPF_EXIST`: update only.
const EXIST: u64 = 2;

pub(crate) struct TrackedProcesses {
    map: HashMap<MapData, u32, TrackedProcess>,
    /// `TRACKED_FILTER`: every entry userspace inserts or removes is counted there (by tgid),
    /// or the console programs would not look at the process.
    filter: ThreadFilter,
}

impl std::fmt::Debug for TrackedProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedProcesses").finish_non_exhaustive()
    }
}

/// What became of an attempt to keep a process in the map.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum Kept {
    /// Followed; the entry's `start_boot_ns` (the console descriptors of the process carry it).
    Yes { start_boot_ns: u64 },
    /// The kernel no longer follows that process (it exited, or its pid is another's now).
    Forgotten,
}

fn is_errno(error: &MapError, errno: i32) -> bool {
    matches!(error, MapError::SyscallError(e) if e.io_error.raw_os_error() == Some(errno))
}

impl TrackedProcesses {
    pub(crate) fn new(map: HashMap<MapData, u32, TrackedProcess>, filter: ThreadFilter) -> Self {
        Self { map, filter }
    }

    /// Keeps `pid`, which exec'd at `exec_boot_ns` (the entry's start), as a process of
    /// `matcher_id`. The entry is rewritten only when the matcher differs from the one the
    /// kernel chose by `comm` (a rewrite could lose a flag the kernel sets meanwhile), and then
    /// with `BPF_EXIST`.
    pub(crate) fn keep_exec(
        &mut self,
        pid: u32,
        matcher_id: u32,
        exec_boot_ns: u64,
    ) -> Result<Kept, MapError> {
        let entry = match self.map.get(&pid, 0) {
            Ok(entry) => entry,
            Err(MapError::KeyNotFound) => return Ok(Kept::Forgotten),
            Err(e) => return Err(e),
        };
        if entry.start_boot_ns != exec_boot_ns {
            return Ok(Kept::Forgotten);
        }
        if entry.matcher_id != matcher_id {
            let value = TrackedProcess {
                matcher_id,
                ..entry
            };
            match self.map.insert(&pid, &value, EXIST) {
                Ok(()) => {}
                Err(e) if is_errno(&e, libc::ENOENT) => return Ok(Kept::Forgotten),
                Err(e) => return Err(e),
            }
        }
        Ok(Kept::Yes {
            start_boot_ns: exec_boot_ns,
        })
    }

    /// Follows `pid`, found running by a scan at `seen_boot_ns`, as a process of `matcher_id`.
    /// An entry the kernel already has (the process exec'd after the programs were attached)
    /// is kept as it is, with its start; else one is inserted with `BPF_NOEXIST`. The caller
    /// checks afterwards that the process still runs: one that exited between the scan and the
    /// insert would never remove the entry.
    pub(crate) fn insert_found(
        &mut self,
        pid: u32,
        matcher_id: u32,
        seen_boot_ns: u64,
    ) -> Result<Kept, MapError> {
        let value = TrackedProcess {
            matcher_id,
            flags: TRACKED_DISCOVERED,
            start_boot_ns: seen_boot_ns,
        };
        self.filter.count(pid);
        let inserted = self.map.insert(&pid, &value, NOEXIST);
        if inserted.is_err() {
            self.filter.uncount(pid);
        }
        match inserted {
            Ok(()) => Ok(Kept::Yes {
                start_boot_ns: seen_boot_ns,
            }),
            Err(e) if is_errno(&e, libc::EEXIST) => match self.map.get(&pid, 0) {
                Ok(entry) => self.keep_exec(pid, matcher_id, entry.start_boot_ns),
                Err(MapError::KeyNotFound) => Ok(Kept::Forgotten),
                Err(e) => Err(e),
            },
            Err(e) => Err(e),
        }
    }

    /// Every entry: `(pid, start_boot_ns)`.
    pub(crate) fn entries(&self) -> Vec<(u32, u64)> {
        super::batch::all(&self.map)
            .into_iter()
            .map(|(pid, entry)| (pid, entry.start_boot_ns))
            .collect()
    }

    /// The start of `pid`'s entry, if it has one.
    pub(crate) fn start_of(&self, pid: u32) -> Option<u64> {
        self.map.get(&pid, 0).ok().map(|e| e.start_boot_ns)
    }

    /// Stops following `pid` if its entry is still the one that started at `start_boot_ns`.
    /// True if it was removed.
    pub(crate) fn remove_if_started(&mut self, pid: u32, start_boot_ns: u64) -> bool {
        let same = self
            .map
            .get(&pid, 0)
            .is_ok_and(|e| e.start_boot_ns == start_boot_ns);
        let removed = same && self.map.remove(&pid).is_ok();
        if removed {
            self.filter.uncount(pid);
        }
        removed
    }
}
