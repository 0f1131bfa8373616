//! The instance registry: the one owner of "which instances run on this host".
//!
//! Discovery sends [`RegistryUpdate`]s; the registry task applies them in order and publishes an
//! immutable [`Snapshot`] after each change. Readers (metrics at scrape time, the HTTP API) take
//! the latest snapshot and never block the writer. An instance leaves the snapshot the moment its
//! process exits, so no output can show it afterwards.

use std::{collections::BTreeMap, sync::Arc, time::SystemTime};

use serde::Serialize;
use tokio::sync::{mpsc, watch};

use crate::discovery::allocation::Allocation;

/// How the collector learned of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Origin {
    /// Seen exec'ing by the kernel program.
    Exec,
    /// Already running when the collector started (found by the `/proc` scan).
    Discovered,
}

/// One instance: a VMM process and the instance it runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Instance {
    pub instance_uuid: String,
    pub hypervisor: String,
    /// Name of the matcher that claimed it.
    pub matcher: String,
    /// Thread-group id of the VMM.
    pub pid: u32,
    /// When the VMM exec'd (discovered instances: when the process started).
    pub start_time: SystemTime,
    /// `CLOCK_BOOTTIME` of the exec or of the scan that found it; orders exec events against the
    /// scan.
    pub seen_boot_ns: u64,
    pub origin: Origin,
    pub executable: String,
    /// Per-instance folder (console log, VMM config), when the runtime keeps one.
    pub instance_dir: Option<String>,
    /// vCPUs and memory from the VMM's configuration.
    pub allocation: Allocation,
}

/// A change to the registry.
#[derive(Debug, Clone)]
pub enum RegistryUpdate {
    /// A VMM started, or was found running.
    Add(Instance),
    /// The VMM with this pid exited, or stopped being a VMM.
    Remove { pid: u32 },
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

/// Applies `update` to `instances`; returns whether anything changed.
pub fn apply(instances: &mut BTreeMap<u32, Instance>, update: RegistryUpdate) -> bool {
    match update {
        RegistryUpdate::Add(instance) => {
            if let Some(existing) = instances.get(&instance.pid) {
                // The scan and the exec program can both report a process that exec'd while the
                // collector was starting: the later report of the same exec is a duplicate.
                if existing.instance_uuid == instance.instance_uuid
                    && instance.seen_boot_ns <= existing.seen_boot_ns
                {
                    return false;
                }
            }
            instances.insert(instance.pid, instance);
            true
        }
        RegistryUpdate::Remove { pid } => instances.remove(&pid).is_some(),
    }
}

/// Spawns the registry task. Returns the update sender and the snapshot receiver.
pub fn spawn() -> (mpsc::Sender<RegistryUpdate>, SnapshotReceiver) {
    let (tx, mut rx) = mpsc::channel::<RegistryUpdate>(1024);
    let (snapshot_tx, snapshot_rx) = watch::channel(Arc::new(Snapshot::default()));
    tokio::spawn(async move {
        let mut instances = BTreeMap::new();
        while let Some(update) = rx.recv().await {
            let mut changed = apply(&mut instances, update);
            // Apply whatever else is queued before publishing once.
            while let Ok(update) = rx.try_recv() {
                changed |= apply(&mut instances, update);
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

    fn instance(pid: u32, uuid: &str, seen: u64) -> Instance {
        Instance {
            instance_uuid: uuid.into(),
            hypervisor: "firecracker".into(),
            matcher: "firecracker".into(),
            pid,
            start_time: SystemTime::UNIX_EPOCH,
            seen_boot_ns: seen,
            origin: Origin::Exec,
            executable: "/usr/bin/firecracker".into(),
            instance_dir: None,
            allocation: Allocation::default(),
        }
    }

    #[test]
    fn add_remove_and_duplicates() {
        let mut m = BTreeMap::new();
        assert!(apply(&mut m, RegistryUpdate::Add(instance(1, "a", 10))));
        // Same exec seen by the scan first, then by the ring buffer: ignored.
        assert!(!apply(&mut m, RegistryUpdate::Add(instance(1, "a", 5))));
        // A re-exec later with another id replaces it.
        assert!(apply(&mut m, RegistryUpdate::Add(instance(1, "b", 20))));
        assert_eq!(m[&1].instance_uuid, "b");
        assert!(apply(&mut m, RegistryUpdate::Remove { pid: 1 }));
        assert!(!apply(&mut m, RegistryUpdate::Remove { pid: 1 }));
        assert!(m.is_empty());
    }
}
