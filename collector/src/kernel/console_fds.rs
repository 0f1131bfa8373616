//! A second handle on the console-descriptor map (`CONSOLE_FDS`), for reconciliation: it
//! removes the entries of processes the kernel no longer follows. (The console source holds
//! the first, to add the descriptors a process already had open.)

use aya::maps::{HashMap, MapData};
use collector_common::{ConsoleFd, ConsoleFdKey};

pub(crate) struct ConsoleFdSweep {
    fds: HashMap<MapData, ConsoleFdKey, ConsoleFd>,
}

impl std::fmt::Debug for ConsoleFdSweep {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ConsoleFdSweep").finish_non_exhaustive()
    }
}

impl ConsoleFdSweep {
    pub(crate) fn new(fds: HashMap<MapData, ConsoleFdKey, ConsoleFd>) -> Self {
        Self { fds }
    }

    /// Every entry: its key and the start (`TrackedProcess::start_boot_ns`) of the process it
    /// was made for.
    pub(crate) fn entries(&self) -> Vec<(ConsoleFdKey, u64)> {
        super::batch::all(&self.fds)
            .into_iter()
            .map(|(key, fd)| (key, fd.start_boot_ns))
            .collect()
    }

    /// Removes `key`; true if it was there.
    pub(crate) fn remove(&mut self, key: ConsoleFdKey) -> bool {
        self.fds.remove(&key).is_ok()
    }
}

impl ConsoleFdSweep {
    /// Removes every entry of process `tgid` (one the collector refused to follow); returns
    /// how many there were.
    pub(crate) fn remove_process(&mut self, tgid: u32) -> u64 {
        let keys: Vec<ConsoleFdKey> = self
            .entries()
            .into_iter()
            .filter(|(key, _)| key.tgid == tgid)
            .map(|(key, _)| key)
            .collect();
        keys.into_iter().filter(|key| self.remove(*key)).count() as u64
    }
}
