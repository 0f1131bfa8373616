//! The kernel's map of followed processes (`TRACKED_PROCESSES`), seen from userspace:
//! discovery confirms the processes it names and removes the ones it drops.

use aya::maps::{HashMap, MapData, MapError};
use collector_common::{TRACKED_CONFIRMED, TrackedProcess};

pub(crate) struct TrackedProcesses {
    map: HashMap<MapData, u32, TrackedProcess>,
}

impl std::fmt::Debug for TrackedProcesses {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TrackedProcesses").finish_non_exhaustive()
    }
}

impl TrackedProcesses {
    pub(crate) fn new(map: HashMap<MapData, u32, TrackedProcess>) -> Self {
        Self { map }
    }

    /// Marks `pid` confirmed (inserting it for processes found by the scan), with `extra_flags`.
    pub(crate) fn confirm(
        &mut self,
        pid: u32,
        matcher_id: u32,
        start_boot_ns: u64,
        extra_flags: u32,
    ) -> Result<(), MapError> {
        let value = TrackedProcess {
            matcher_id,
            flags: TRACKED_CONFIRMED | extra_flags,
            start_boot_ns,
        };
        self.map.insert(&pid, &value, 0)
    }

    /// Stops following `pid` (a missing entry is not an error).
    pub(crate) fn remove(&mut self, pid: u32) {
        let _ = self.map.remove(&pid);
    }
}
