//! The scheduling maps, seen from userspace: discovery adds the threads of processes the kernel
//! did not see start and forgets processes it stops following; the metrics read the aggregates
//! at scrape time.

use std::{
    collections::HashMap as StdHashMap,
    os::fd::{AsFd, AsRawFd},
    ptr::NonNull,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

use aya::maps::{HashMap, MapData, MapError};
use collector_common::{
    SCHED_FILTER_SLOTS, SCHED_RUNTIME_UNKNOWN, SchedKey, SchedStats, SchedThread,
    sched_filter_slot, thread_class,
};

use super::batch;
use crate::host::proc::thread_alive;

/// `BPF_NOEXIST`: never overwrite what the kernel programs keep up to date.
const NOEXIST: u64 = 1;

/// Scheduling aggregates of one process, per thread class.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct ProcessSched {
    pub(crate) vcpu: SchedStats,
    pub(crate) vmm: SchedStats,
}

pub(crate) struct SchedMaps {
    threads: HashMap<MapData, u32, SchedThread>,
    stats: HashMap<MapData, SchedKey, SchedStats>,
    filter: ThreadFilter,
}

/// `SCHED_THREAD_FILTER`, mapped into this process: per slot of thread ids, how many entries of
/// the thread map have an id there (never fewer: an insert counts before it is tried, a removal
/// after it succeeded). The kernel programs skip a thread whose slot is zero without looking it
/// up, so every entry userspace adds or removes is counted here. Counts change with atomic adds
/// on the shared memory, as the kernel's own, so neither side overwrites the other's.
pub(crate) struct ThreadFilter {
    slots: NonNull<AtomicU64>,
    /// Keeps the map alive (the memory map would too).
    _map: MapData,
}

const FILTER_BYTES: usize = SCHED_FILTER_SLOTS as usize * size_of::<u64>();

// SAFETY: the mapping is owned by the value and only touched through atomics.
unsafe impl Send for ThreadFilter {}
// SAFETY: as above.
unsafe impl Sync for ThreadFilter {}

impl ThreadFilter {
    /// Maps `map`, an array of [`SCHED_FILTER_SLOTS`] `u64` made with `BPF_F_MMAPABLE`.
    pub(crate) fn new(map: MapData) -> std::io::Result<Self> {
        let info = map.info().map_err(std::io::Error::other)?;
        if info.max_entries() != SCHED_FILTER_SLOTS || info.value_size() != 8 {
            return Err(std::io::Error::other(format!(
                "expected {SCHED_FILTER_SLOTS} slots of 8 bytes, found {} of {}",
                info.max_entries(),
                info.value_size()
            )));
        }
        // SAFETY: a fresh shared mapping of the map's fd, of the map's size (a whole number of
        // pages), checked for failure; nothing else in this process uses that range.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                FILTER_BYTES,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                map.fd().as_fd().as_raw_fd(),
                0,
            )
        };
        if addr == libc::MAP_FAILED {
            return Err(std::io::Error::last_os_error());
        }
        let slots = NonNull::new(addr.cast()).ok_or_else(std::io::Error::last_os_error)?;
        Ok(Self { slots, _map: map })
    }

    fn slot(&self, tid: u32) -> &AtomicU64 {
        // SAFETY: the slot index is below SCHED_FILTER_SLOTS, inside the mapping, which lives
        // as long as `self`; the kernel only changes it with atomic instructions too.
        unsafe { &*self.slots.as_ptr().add(sched_filter_slot(tid) as usize) }
    }

    /// Counts an entry for `tid` that is about to be inserted.
    pub(crate) fn count(&self, tid: u32) {
        self.slot(tid).fetch_add(1, Ordering::SeqCst);
    }

    /// Takes back a count: an insert that did not add an entry, or a removal that did remove.
    pub(crate) fn uncount(&self, tid: u32) {
        self.slot(tid).fetch_sub(1, Ordering::SeqCst);
    }

    /// Sum of all slots (tests: it must come back to 0).
    pub(crate) fn total(&self) -> u64 {
        (0..SCHED_FILTER_SLOTS)
            .map(|tid| self.slot(tid).load(Ordering::Relaxed))
            .fold(0, u64::wrapping_add)
    }
}

impl Drop for ThreadFilter {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, not used after this.
        unsafe { libc::munmap(self.slots.as_ptr().cast(), FILTER_BYTES) };
    }
}

impl std::fmt::Debug for SchedMaps {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SchedMaps").finish_non_exhaustive()
    }
}

/// Shared by discovery (writes) and the metrics (reads); every use is a few map calls.
pub(crate) type SharedSched = Arc<Mutex<SchedMaps>>;

impl SchedMaps {
    pub(crate) fn new(
        threads: HashMap<MapData, u32, SchedThread>,
        stats: HashMap<MapData, SchedKey, SchedStats>,
        filter: ThreadFilter,
    ) -> Self {
        Self {
            threads,
            stats,
            filter,
        }
    }

    /// Follows the running threads `(tid, is_vcpu)` of process `tgid`. Threads the kernel
    /// already follows keep their entry (and their class, decided when they were named).
    pub(crate) fn follow_threads(
        &mut self,
        tgid: u32,
        threads: &[(u32, bool)],
    ) -> Result<(), MapError> {
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
            self.filter.count(tid);
            match self.threads.insert(&tid, &thread, NOEXIST) {
                Ok(()) => {}
                Err(MapError::SyscallError(e))
                    if e.io_error.raw_os_error() == Some(libc::EEXIST) =>
                {
                    self.filter.uncount(tid);
                }
                Err(e) => {
                    self.filter.uncount(tid);
                    return Err(e);
                }
            }
            // A thread that ended before the insert would never free its entry: undo.
            if !thread_alive(tgid, tid) {
                self.remove_thread(tid);
            }
        }
        Ok(())
    }

    /// Forgets process `tgid`: its aggregates, and with `threads` its thread entries (exited
    /// threads free their own; this catches a thread that ended while userspace added it).
    pub(crate) fn forget(&mut self, tgid: u32, threads: bool) {
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
                self.remove_thread(tid);
            }
        }
    }

    fn remove_thread(&mut self, tid: u32) {
        if self.threads.remove(&tid).is_ok() {
            self.filter.uncount(tid);
        }
    }

    /// The maps as they are now, read at once (a scrape's view), in a few batches
    /// ([`super::batch`]).
    pub(crate) fn read(&self) -> SchedReading {
        SchedReading {
            stats: batch::all(&self.stats)
                .into_iter()
                .map(|(key, stats)| ((key.tgid, key.class), stats))
                .collect(),
            threads: batch::all(&self.threads).len(),
            filter_total: self.filter.total(),
        }
    }

    /// The processes the thread and aggregate maps hold entries of (reconciliation removes
    /// those of processes the kernel no longer follows).
    pub(crate) fn tgids(&self) -> std::collections::HashSet<u32> {
        let threads = batch::all(&self.threads).into_iter().map(|(_, t)| t.tgid);
        let stats = batch::all(&self.stats).into_iter().map(|(k, _)| k.tgid);
        threads.chain(stats).collect()
    }
}

/// The scheduling maps at one moment ([`SchedMaps::read`]): what a scrape serves.
pub(crate) struct SchedReading {
    /// The aggregates, by `(tgid, class)`.
    stats: StdHashMap<(u32, u32), SchedStats>,
    /// Entries in the thread map.
    pub(crate) threads: usize,
    /// The thread filter's counts, summed: the thread map's entries, once no insert is under
    /// way (to see that the two agree).
    pub(crate) filter_total: u64,
}

impl SchedReading {
    /// The aggregates of process `tgid` (zero for a class with no event yet).
    pub(crate) fn process(&self, tgid: u32) -> ProcessSched {
        let get = |class| self.stats.get(&(tgid, class)).copied().unwrap_or_default();
        ProcessSched {
            vcpu: get(thread_class::VCPU),
            vmm: get(thread_class::VMM),
        }
    }

    /// Entries in the aggregate map.
    pub(crate) fn stats_entries(&self) -> usize {
        self.stats.len()
    }
}
