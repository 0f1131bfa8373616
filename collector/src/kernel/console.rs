//! The console capture's kernel maps, seen from userspace: the rules and syscall numbers set at
//! load, the ring reader, and the descriptor set userspace keeps current (descriptors found in
//! `/proc/PID/fd`, entries of exited processes removed).

use std::{
    collections::{HashMap as StdHashMap, HashSet},
    time::Duration,
};

use aya::{
    Ebpf,
    maps::{Array, HashMap, MapData, RingBuf},
};
use collector_common::{
    ConsoleFd, ConsoleFdKey, ConsoleProc, ConsoleRule, console_stream, names::map,
};
use tokio::io::{
    Interest,
    unix::{AsyncFd, AsyncFdReadyMutGuard},
};

use super::loader::{LoadError, take_map};

/// Handles on the console maps.
pub(crate) struct ConsoleKernel {
    /// Held, not read: the programs refer to the map by this descriptor.
    _rules: Array<MapData, ConsoleRule>,
    fds: HashMap<MapData, ConsoleFdKey, ConsoleFd>,
    procs: HashMap<MapData, u32, ConsoleProc>,
    pending: HashMap<MapData, u64, [u8; PENDING_SIZE]>,
}

/// Bytes of a pending-syscall entry (the kernel's `Pending`): read only to find dead threads.
const PENDING_SIZE: usize = 48;

impl ConsoleKernel {
    /// Takes the console maps out of the loaded object and loads the rules. Returns the ring
    /// apart: its reader owns it.
    pub(crate) fn take(
        ebpf: &mut Ebpf,
        rules: &[ConsoleRule],
    ) -> Result<(Self, RingBuf<MapData>), LoadError> {
        let mut kernel_rules: Array<_, ConsoleRule> = take_map(ebpf, map::CONSOLE_RULES)?;
        for (index, rule) in rules.iter().enumerate() {
            kernel_rules
                .set(index as u32, rule, 0)
                .map_err(|source| LoadError::Map {
                    name: map::CONSOLE_RULES,
                    source,
                })?;
        }
        let console = Self {
            _rules: kernel_rules,
            fds: take_map(ebpf, map::CONSOLE_FDS)?,
            procs: take_map(ebpf, map::CONSOLE_PROCS)?,
            pending: take_map(ebpf, map::CONSOLE_PENDING)?,
        };
        Ok((console, take_map(ebpf, map::CONSOLE_EVENTS)?))
    }

    /// Marks descriptor `fd` of `tgid` (whose tracked entry started at `start_boot_ns`) a
    /// console file.
    pub(crate) fn add_console_fd(
        &mut self,
        tgid: u32,
        fd: u32,
        start_boot_ns: u64,
    ) -> Result<(), aya::maps::MapError> {
        let value = ConsoleFd {
            stream: console_stream::CONSOLE,
            _pad: 0,
            start_boot_ns,
        };
        self.fds.insert(&ConsoleFdKey { tgid, fd }, &value, 0)
    }

    /// Removes every descriptor entry of a process for which `gone(tgid)` holds.
    pub(crate) fn forget_fds(&mut self, gone: impl Fn(u32) -> bool) {
        let stale: Vec<ConsoleFdKey> = self.fds.keys().flatten().filter(|k| gone(k.tgid)).collect();
        for key in stale {
            let _ = self.fds.remove(&key);
        }
    }

    /// The console state of every process the kernel keeps one for, by tgid.
    pub(crate) fn procs(&self) -> StdHashMap<u32, ConsoleProc> {
        self.procs.iter().flatten().collect()
    }

    /// The console state of `tgid`, if the kernel keeps one.
    pub(crate) fn proc(&self, tgid: u32) -> Option<ConsoleProc> {
        self.procs.get(&tgid, 0).ok()
    }

    /// Removes the console state of these processes (after their last read).
    pub(crate) fn forget_procs(&mut self, tgids: &HashSet<u32>) {
        for tgid in tgids {
            let _ = self.procs.remove(tgid);
        }
    }

    /// Removes the pending-syscall entries of threads for which `gone(tgid, tid)` holds (they
    /// died inside a syscall: the map is not an LRU and would keep them). Returns how many.
    pub(crate) fn forget_pending(&mut self, gone: impl Fn(u32, u32) -> bool) -> usize {
        let stale: Vec<u64> = self
            .pending
            .keys()
            .flatten()
            .filter(|k| gone((k >> 32) as u32, *k as u32))
            .collect();
        for key in &stale {
            let _ = self.pending.remove(key);
        }
        stale.len()
    }
}

/// Reader of the console ring. Records are handed out in place (no copy) while the reader
/// holds them.
///
/// A wake-up costs the writer more than its capture (and a reader woken in the middle of a
/// burst reads the ring while it is written), so the kernel wakes the reader only for a burst
/// (`kernel.console_wakeup_bytes`) or for the first record after a `quiet` interval without a
/// wake-up; the records in between wake nobody. So after each wake-up, and as long as it finds
/// records, the reader looks at the ring every `poll` on its own, for twice the quiet interval;
/// after that many empty polls in a row it waits for the kernel alone, which costs an idle
/// host nothing.
pub(crate) struct ConsoleReader {
    ring: AsyncFd<RingBuf<MapData>>,
    poll: Duration,
    linger: Linger,
}

/// The reader's polling after a wake-up or a find.
pub(crate) struct Linger {
    /// Empty polls in a row after which the reader stops polling.
    polls: u32,
    /// Polls left before the reader waits for a wake-up alone.
    left: u32,
}

impl Linger {
    /// After a poll that found `n` records: a find keeps the reader polling, an empty poll
    /// counts down.
    fn polled(&mut self, n: usize) {
        self.left = if n > 0 {
            self.polls
        } else {
            self.left.saturating_sub(1)
        };
    }
}

/// Records ready on the ring: after a wake-up, or a poll.
pub(crate) enum Ready<'a> {
    Woken(AsyncFdReadyMutGuard<'a, RingBuf<MapData>>),
    /// The ring, and the reader's polling (see [`ConsoleReader`]).
    Polled(&'a mut RingBuf<MapData>, &'a mut Linger),
}

impl ConsoleReader {
    pub(crate) fn new(
        ring: RingBuf<MapData>,
        poll: Duration,
        quiet: Duration,
    ) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as
        // it is inside the AsyncFd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
        // Twice the quiet interval: a record that woke nobody came within it of a wake-up the
        // reader saw, so one of these polls finds it.
        let polls = (2 * quiet.as_nanos() / poll.as_nanos().max(1)).clamp(2, 10_000) as u32;
        Ok(Self {
            ring,
            poll,
            linger: Linger { polls, left: 0 },
        })
    }

    /// Passes the records on the ring now to `each`, at most `max`, without waiting
    /// (shutdown's last read: bounded, as a VMM may keep writing).
    pub(crate) fn drain_now(&mut self, max: usize, each: impl FnMut(&[u8])) {
        drain_ring(self.ring.get_mut(), max, each);
    }

    /// Waits until the kernel has woken the reader, or for the next poll while it lingers.
    pub(crate) async fn ready(&mut self) -> std::io::Result<Ready<'_>> {
        // Decided before the borrow that the ready value keeps. Nothing changes until a wait
        // completes: the caller may drop this future for another event at any point.
        let woken = self.linger.left == 0
            || tokio::time::timeout(self.poll, self.ring.readable_mut())
                .await
                .is_ok();
        if woken {
            // At once if the timeout saw readiness: it stays set until a drain clears it.
            let guard = self.ring.readable_mut().await?;
            self.linger.left = self.linger.polls;
            return Ok(Ready::Woken(guard));
        }
        Ok(Ready::Polled(self.ring.get_mut(), &mut self.linger))
    }
}

impl Ready<'_> {
    /// Passes up to `max` records to `each`, in order; returns how many.
    pub(crate) fn drain(self, max: usize, each: impl FnMut(&[u8])) -> usize {
        match self {
            Ready::Woken(mut guard) => {
                let n = drain_ring(guard.get_inner_mut(), max, each);
                if n < max {
                    // Drained: wait for the next wake-up (or poll).
                    guard.clear_ready();
                }
                n
            }
            Ready::Polled(ring, linger) => {
                let n = drain_ring(ring, max, each);
                linger.polled(n);
                n
            }
        }
    }
}

fn drain_ring(ring: &mut RingBuf<MapData>, max: usize, mut each: impl FnMut(&[u8])) -> usize {
    let mut n = 0;
    while n < max {
        let Some(record) = ring.next() else { break };
        each(&record);
        n += 1;
    }
    n
}
