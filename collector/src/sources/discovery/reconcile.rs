//! Reconciliation: the kernel's records against `/proc`, so that a lost record never leaves an
//! instance without its end or its beginning, or a kernel entry behind.
//!
//! Every [`EVERY`], and as soon as the kernel's drop counters show a lost process record:
//! 1. each known instance is checked in `/proc` (pid, start time, not exited); the ones gone
//!    are noted, and so are the ones still running whose kernel entry went (the kernel stopped
//!    following them: they exec'd something else);
//! 2. the ring is drained: a record that is there is the truth, and wins;
//! 3. an instance still gone gets `stop` / `unobserved_exit` (no exit status: none is known);
//!    one whose kernel entry is gone on two passes in a row gets `stop` / `exec` (one pass could
//!    fall between the exit program's removal of the entry and its record);
//! 4. after lost exec records (or a lost exec of another VMM), `/proc` is scanned again for the
//!    instances they would have announced (`discovered` / `exec_record_lost`);
//! 5. kernel entries of processes that are gone, or whose pid is another's now, are removed:
//!    `TRACKED_PROCESSES`, and (when anything was lost or found, and every [`SWEEP_EVERY`]) the
//!    scheduling and console-descriptor entries of processes the kernel no longer follows.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use collector_common::drop_kind;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info};

use super::Discovery;
use crate::{
    host::proc,
    kernel::{loader::KernelDrops, process_ring::ProcessEventReader},
    model::{
        health::PipelineGuard,
        instance::{InstanceUpdate, Origin},
        time,
    },
};

/// How often known instances are checked against `/proc` when nothing was lost.
const EVERY: Duration = Duration::from_secs(2);
/// How often the drop counters are read (a loss wakes nothing else).
const TICK: Duration = Duration::from_millis(200);
/// Passes after a loss are at least this far apart (a burst of losses, a burst of rescans).
const MIN_GAP: Duration = Duration::from_millis(100);
/// How often the scheduling and console-descriptor maps are swept when nothing was lost.
const SWEEP_EVERY: Duration = Duration::from_secs(30);

/// Drop kinds after which a rescan of `/proc` may find what the kernel did not announce.
const LOST_EXECS: [u32; 2] = [drop_kind::EXEC_EVENT_RESERVE, drop_kind::TRACKED_MAP_FULL];
/// Drop kinds after which known instances may have ended unannounced.
const LOST_ENDS: [u32; 2] = [drop_kind::EXIT_EVENT_RESERVE, drop_kind::OOM_EVENT_RESERVE];

/// Reconciliation's own state.
pub(super) struct State {
    drops: KernelDrops,
    /// The drop counters as last read, by kind.
    seen_drops: HashMap<u32, u64>,
    last: Instant,
    last_sweep: Instant,
    /// Known instances whose kernel entry was gone while they ran, at the last pass.
    suspects: HashSet<(u32, u64)>,
    pending_check: bool,
    pending_rescan: bool,
}

impl State {
    pub(super) fn new(drops: &KernelDrops) -> Self {
        let mut state = Self {
            drops: drops.clone(),
            seen_drops: HashMap::new(),
            last: Instant::now(),
            last_sweep: Instant::now(),
            suspects: HashSet::new(),
            pending_check: false,
            pending_rescan: false,
        };
        state.read_drops();
        state.pending_check = false;
        state.pending_rescan = false;
        state
    }

    /// Reads the drop counters; notes what their moves call for.
    fn read_drops(&mut self) {
        for kind in LOST_EXECS.into_iter().chain(LOST_ENDS) {
            let now = self.drops.get(kind);
            let before = self.seen_drops.insert(kind, now).unwrap_or(0);
            if now != before {
                self.pending_check = true;
                if LOST_EXECS.contains(&kind) {
                    self.pending_rescan = true;
                }
            }
        }
    }
}

impl Discovery {
    /// Discovery's task: the start-up scan (then `on_ready`), then the kernel's records and
    /// reconciliation until `stop`; then the records still on the ring.
    pub(crate) async fn run(
        mut self,
        mut reader: ProcessEventReader,
        on_ready: impl FnOnce(),
        stop: CancellationToken,
        mut guard: PipelineGuard,
    ) {
        self.scan().await;
        self.sweep_kernel();
        on_ready();
        let mut tick = tokio::time::interval(TICK);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        loop {
            tokio::select! {
                () = stop.cancelled() => {
                    for event in reader.drain_now() {
                        self.handle_event(event).await;
                    }
                    return;
                }
                batch = reader.next_batch() => match batch {
                    Ok(batch) => {
                        for event in batch {
                            self.handle_event(event).await;
                        }
                    }
                    Err(error) => {
                        guard.failed(&error);
                        return;
                    }
                },
                _ = tick.tick() => {}
            }
            self.reconciling.read_drops();
            let state = &self.reconciling;
            let due = if state.pending_check {
                state.last.elapsed() >= MIN_GAP
            } else {
                state.last.elapsed() >= EVERY
            };
            if due {
                self.reconcile(&mut reader).await;
            }
        }
    }

    /// One pass of the module's steps.
    async fn reconcile(&mut self, reader: &mut ProcessEventReader) {
        let lost = self.reconciling.pending_check;
        let mut rescan = self.reconciling.pending_rescan;
        self.reconciling.pending_check = false;
        self.reconciling.pending_rescan = false;
        self.reconciling.last = Instant::now();

        // 1. What /proc says of each known instance.
        let mut gone = Vec::new();
        let mut forgotten = Vec::new();
        for (pid, known) in &self.known {
            if !proc::running_since(*pid, known.seen_boot_ns) {
                gone.push((*pid, known.clone()));
            } else if let Some(start) = known.kernel_start
                && self.kernel.tracked.start_of(*pid) != Some(start)
            {
                forgotten.push((*pid, known.clone()));
            }
        }
        // 2. The records there are.
        let drained_at = time::boot_ns_now();
        for event in reader.drain_now() {
            self.handle_event(event).await;
        }
        // 3. Ends nobody reported.
        let mut acted = false;
        for (pid, was) in gone {
            if self.known.get(&pid) != Some(&was) {
                continue;
            }
            info!(
                instance_uuid = was.instance_uuid,
                pid, "instance gone without its exit record; ending it as unobserved"
            );
            self.known.remove(&pid);
            self.forget(pid);
            if let Some(start) = was.kernel_start {
                self.kernel.tracked.remove_if_started(pid, start);
            }
            self.health.reconciled.inc(&["unobserved_exit"]);
            self.send(InstanceUpdate::Vanished {
                pid,
                seen_boot_ns: was.seen_boot_ns,
            })
            .await;
            acted = true;
        }
        let suspects = std::mem::take(&mut self.reconciling.suspects);
        for (pid, was) in forgotten {
            let still = self.known.get(&pid) == Some(&was)
                && was.kernel_start != self.kernel.tracked.start_of(pid);
            if !still {
                continue;
            }
            if !suspects.contains(&(pid, was.seen_boot_ns)) {
                self.reconciling.suspects.insert((pid, was.seen_boot_ns));
                continue;
            }
            info!(
                instance_uuid = was.instance_uuid,
                pid, "instance no longer followed by the kernel without its record; ending it"
            );
            self.known.remove(&pid);
            self.forget(pid);
            self.health.reconciled.inc(&["unobserved_exec"]);
            self.send(InstanceUpdate::Untracked {
                pid,
                boot_ns: time::boot_ns_now(),
            })
            .await;
            // It may have exec'd another VMM, whose record was lost with the untrack.
            rescan = true;
            acted = true;
        }
        // 4. Beginnings nobody reported.
        if rescan {
            debug!("rescanning /proc after lost exec records");
            self.health.reconciled.inc(&["rescan"]);
            self.scan_proc(Origin::Rescan, drained_at).await;
        }
        // 5. Entries of processes that are gone.
        self.sweep_tracked();
        if lost || acted || rescan || self.reconciling.last_sweep.elapsed() >= SWEEP_EVERY {
            self.sweep_kernel();
        }
    }

    /// Removes `TRACKED_PROCESSES` entries of processes that are gone or whose pid is another
    /// process's now (entries a scan inserted for a process that exited just before).
    fn sweep_tracked(&mut self) {
        for (pid, start) in self.kernel.tracked.entries() {
            if !proc::running_since(pid, start) && self.kernel.tracked.remove_if_started(pid, start)
            {
                debug!(pid, "stale kernel entry of a process that is gone removed");
                self.health.reconciled.inc(&["stale_kernel_entry"]);
            }
        }
    }

    /// [`Self::sweep_tracked`], then the scheduling and console-descriptor entries of processes
    /// the kernel no longer follows. Those are read before `TRACKED_PROCESSES`: an entry seen
    /// there was made while its process was followed, so a process missing from the map read
    /// after it is no longer followed.
    fn sweep_kernel(&mut self) {
        self.sweep_tracked();
        self.prune_refused();
        self.reconciling.last_sweep = Instant::now();
        let sched_tgids = self.kernel.sched.lock().expect("sched lock").tgids();
        let fds = self.kernel.console_fds.entries();
        let tracked: HashMap<u32, u64> = self.kernel.tracked.entries().into_iter().collect();
        let mut removed = 0u64;
        for tgid in sched_tgids {
            if !tracked.contains_key(&tgid) {
                self.kernel
                    .sched
                    .lock()
                    .expect("sched lock")
                    .forget(tgid, true);
                removed += 1;
            }
        }
        for (key, start) in fds {
            if tracked.get(&key.tgid) != Some(&start) && self.kernel.console_fds.remove(key) {
                removed += 1;
            }
        }
        if removed > 0 {
            debug!(
                removed,
                "stale scheduling and console entries of processes no longer followed"
            );
            self.health.reconciled.add(&["stale_kernel_entry"], removed);
        }
    }
}
