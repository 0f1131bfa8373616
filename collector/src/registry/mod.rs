//! The instance registry: the one owner of "which instances run on this host".
//!
//! Discovery sends [`RegistryUpdate`]s; the registry task applies them in order, derives the
//! lifecycle events they mean (start, discovered, stop, crash, oom_kill) and publishes an
//! immutable [`Snapshot`] after each change. Readers (metrics at scrape time, the HTTP API) take
//! the latest snapshot and never block the writer. An instance leaves the snapshot the moment its
//! process exits, so no output can show it afterwards.

pub mod lifecycle;

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::discovery::allocation::Allocation;
use crate::{clock, decode::ProcessExit, sinks::events::EventSink};
use lifecycle::{EventKind, LifecycleEvent, OomDetails, classify_exit};

/// How the collector learned of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Seen exec'ing by the kernel program.
    Exec,
    /// Already running when the collector started (found by the `/proc` scan).
    Discovered,
}

impl Origin {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Discovered => "discovered",
        }
    }
}

/// One instance: a VMM process and the instance it runs.
#[derive(Debug, Clone, PartialEq)]
pub struct Instance {
    pub instance_uuid: String,
    pub hypervisor: String,
    /// Name of the matcher that claimed it.
    pub matcher: String,
    /// Thread-group id of the VMM.
    pub pid: u32,
    /// When the VMM exec'd (discovered instances: when the process started).
    pub start_time: SystemTime,
    /// The same instant on `CLOCK_BOOTTIME`, the clock of kernel timestamps.
    pub start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` of the exec or of the scan that found it; orders exec events against the
    /// scan.
    pub seen_boot_ns: u64,
    pub origin: Origin,
    pub executable: String,
    /// Per-instance folder (console log, VMM config), when the runtime keeps one.
    pub instance_dir: Option<String>,
    /// Set when the OOM killer chose this instance; reported with its exit.
    pub oom: Option<OomDetails>,
    /// vCPUs and memory from the VMM's configuration.
    pub allocation: Allocation,
}

/// A change to the registry.
#[derive(Debug, Clone)]
pub enum RegistryUpdate {
    /// A VMM started, or was found running.
    Add(Instance),
    /// The OOM killer chose the VMM with this pid.
    OomVictim { pid: u32, details: OomDetails },
    /// The last thread of the VMM with this pid exited.
    Exit { pid: u32, exit: ProcessExit },
    /// The VMM with this pid exec'd a program that is not a VMM.
    Untracked { pid: u32, boot_ns: u64 },
    /// Discovery decided this pid is not an instance after all (no event).
    Forget { pid: u32 },
}

/// Instances by VMM pid.
#[derive(Debug, Default)]
pub struct Snapshot {
    pub by_pid: BTreeMap<u32, Instance>,
}

impl Snapshot {
    /// Instances with this id (normally one; a misconfigured runtime may start two).
    pub fn by_uuid<'a>(&'a self, uuid: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.by_pid
            .values()
            .filter(move |i| i.instance_uuid == uuid)
    }
}

pub type SnapshotReceiver = watch::Receiver<Arc<Snapshot>>;

/// What applying an update did.
#[derive(Debug, Default)]
pub struct Applied {
    /// The instance set changed (a new snapshot is due).
    pub changed: bool,
    pub events: Vec<LifecycleEvent>,
}

fn ended(instance: &Instance, boot_ns: u64) -> LifecycleEvent {
    LifecycleEvent {
        uptime_seconds: boot_ns.saturating_sub(instance.start_boot_ns) as f64 / 1e9,
        ..LifecycleEvent::new(
            clock::boot_ns_to_system_time(boot_ns),
            &instance.instance_uuid,
            &instance.hypervisor,
            EventKind::Stop,
            "exec",
            instance.pid,
        )
    }
}

/// Applies `update` to `instances`.
pub fn apply(instances: &mut BTreeMap<u32, Instance>, update: RegistryUpdate) -> Applied {
    let mut applied = Applied::default();
    match update {
        RegistryUpdate::Add(instance) => {
            if let Some(existing) = instances.get(&instance.pid) {
                // The scan and the exec program can both report a process that exec'd while the
                // collector was starting: the later report of the same exec is a duplicate.
                if existing.instance_uuid == instance.instance_uuid
                    && instance.seen_boot_ns <= existing.seen_boot_ns
                {
                    return applied;
                }
                // The VMM exec'd another VMM: the first instance ended there.
                applied.events.push(ended(existing, instance.start_boot_ns));
            }
            let (kind, reason, uptime) = match instance.origin {
                Origin::Exec => (EventKind::Start, "exec", 0.0),
                Origin::Discovered => (
                    EventKind::Discovered,
                    "running_at_startup",
                    clock::boot_ns_now().saturating_sub(instance.start_boot_ns) as f64 / 1e9,
                ),
            };
            let time = match instance.origin {
                Origin::Exec => instance.start_time,
                Origin::Discovered => SystemTime::now(),
            };
            applied.events.push(LifecycleEvent {
                uptime_seconds: uptime,
                ..LifecycleEvent::new(
                    time,
                    &instance.instance_uuid,
                    &instance.hypervisor,
                    kind,
                    reason,
                    instance.pid,
                )
            });
            instances.insert(instance.pid, instance);
            applied.changed = true;
        }
        RegistryUpdate::OomVictim { pid, details } => {
            if let Some(instance) = instances.get_mut(&pid) {
                instance.oom = Some(details);
            }
        }
        RegistryUpdate::Exit { pid, exit } => {
            if let Some(instance) = instances.remove(&pid) {
                let class = classify_exit(exit.wait_status(), exit.oom_victim());
                let mut event = LifecycleEvent {
                    event: class.event,
                    reason: class.reason,
                    ..ended(&instance, exit.boot_ns)
                }
                .with_exit(class);
                if exit.oom_victim() {
                    event.oom = instance.oom;
                }
                applied.events.push(event);
                applied.changed = true;
            }
        }
        RegistryUpdate::Untracked { pid, boot_ns } => {
            if let Some(instance) = instances.remove(&pid) {
                applied.events.push(ended(&instance, boot_ns));
                applied.changed = true;
            }
        }
        RegistryUpdate::Forget { pid } => applied.changed = instances.remove(&pid).is_some(),
    }
    applied
}

/// Spawns the registry task. Returns the update sender and the snapshot receiver.
pub fn spawn(events: EventSink) -> (mpsc::Sender<RegistryUpdate>, SnapshotReceiver) {
    let (tx, mut rx) = mpsc::channel::<RegistryUpdate>(1024);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        let mut instances = BTreeMap::new();
        while let Some(update) = rx.recv().await {
            let mut changed = false;
            let mut next = Some(update);
            // Apply whatever else is queued before publishing once.
            while let Some(update) = next {
                let applied = apply(&mut instances, update);
                changed |= applied.changed;
                for event in applied.events {
                    events.record(event);
                }
                next = rx.try_recv().ok();
            }
            if changed {
                let snapshot = Arc::new(Snapshot {
                    by_pid: instances.clone(),
                });
                snapshot_tx.send_replace(snapshot);
            }
        }
    });
    (tx, snapshot_rx)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn instance(pid: u32, uuid: &str, seen: u64, origin: Origin) -> Instance {
        Instance {
            instance_uuid: uuid.into(),
            hypervisor: "firecracker".into(),
            matcher: "firecracker".into(),
            pid,
            start_time: SystemTime::UNIX_EPOCH,
            start_boot_ns: seen,
            seen_boot_ns: seen,
            origin,
            executable: "/usr/bin/firecracker".into(),
            instance_dir: None,
            oom: None,
            allocation: Allocation::default(),
        }
    }

    fn exit(pid: u32, status: u32, oom: bool) -> RegistryUpdate {
        RegistryUpdate::Exit {
            pid,
            exit: ProcessExit {
                tgid: pid,
                boot_ns: 3_000_000_000,
                tracked_flags: if oom {
                    collector_common::TRACKED_OOM_VICTIM
                } else {
                    0
                },
                exit_code: status,
                group_exit_code: 0,
                signal_flags: 0,
            },
        }
    }

    fn kinds(applied: &Applied) -> Vec<EventKind> {
        applied.events.iter().map(|e| e.event).collect()
    }

    #[test]
    fn one_event_per_change() {
        let mut m = BTreeMap::new();
        let a = apply(
            &mut m,
            RegistryUpdate::Add(instance(1, "a", 1_000_000_000, Origin::Exec)),
        );
        assert_eq!(kinds(&a), [EventKind::Start]);
        // Same exec seen by the scan first, then by the ring buffer: no second event.
        let dup = apply(
            &mut m,
            RegistryUpdate::Add(instance(1, "a", 5, Origin::Discovered)),
        );
        assert!(!dup.changed && dup.events.is_empty());
        let end = apply(&mut m, exit(1, 3 << 8, false));
        assert_eq!(kinds(&end), [EventKind::Crash]);
        assert_eq!(end.events[0].exit_code, Some(3));
        assert!((end.events[0].uptime_seconds - 2.0).abs() < 1e-9);
        // A second exit report for the same pid changes nothing.
        assert!(apply(&mut m, exit(1, 0, false)).events.is_empty());
        assert!(m.is_empty());
    }

    #[test]
    fn discovered_then_oom_killed() {
        let mut m = BTreeMap::new();
        let d = apply(
            &mut m,
            RegistryUpdate::Add(instance(7, "b", 0, Origin::Discovered)),
        );
        assert_eq!(kinds(&d), [EventKind::Discovered]);
        let details = OomDetails {
            victim_pid: 7,
            counters: None,
            constraint: "memcg",
            memcg_path: Some("/x".into()),
            memcg_limit_bytes: Some(1 << 20),
        };
        let oom = apply(
            &mut m,
            RegistryUpdate::OomVictim {
                pid: 7,
                details: details.clone(),
            },
        );
        assert!(oom.events.is_empty(), "the OOM mark alone is not an event");
        let end = apply(&mut m, exit(7, 9, true));
        assert_eq!(kinds(&end), [EventKind::OomKill]);
        assert_eq!(end.events[0].signal_name, Some("SIGKILL"));
        assert_eq!(end.events[0].oom, Some(details));
    }

    #[test]
    fn re_exec_and_untrack_end_the_instance() {
        let mut m = BTreeMap::new();
        apply(
            &mut m,
            RegistryUpdate::Add(instance(1, "a", 10, Origin::Exec)),
        );
        let re = apply(
            &mut m,
            RegistryUpdate::Add(instance(1, "b", 20, Origin::Exec)),
        );
        assert_eq!(kinds(&re), [EventKind::Stop, EventKind::Start]);
        assert_eq!(re.events[0].instance_uuid, "a");
        let gone = apply(
            &mut m,
            RegistryUpdate::Untracked {
                pid: 1,
                boot_ns: 30,
            },
        );
        assert_eq!(kinds(&gone), [EventKind::Stop]);
        assert_eq!(gone.events[0].reason, "exec");
        let forgotten = apply(&mut m, RegistryUpdate::Forget { pid: 1 });
        assert!(!forgotten.changed && forgotten.events.is_empty());
    }
}
