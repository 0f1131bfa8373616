//! Resident memory of the instances' VMMs (`compute_instance_memory_rss_bytes`), read from
//! `/proc/PID/statm` in the background every [`REFRESH`], so that a scrape reads none: at 1000
//! instances those reads were the larger part of a scrape. A scrape shows a value at most
//! [`REFRESH`] old; an instance that started since the last refresh is read at the scrape.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
    time::Duration,
};

use tokio_util::sync::CancellationToken;

use crate::{
    host::proc,
    model::instance::{Instance, Snapshot, SnapshotReceiver},
};

/// How often every listed VMM's resident memory is read.
pub(crate) const REFRESH: Duration = Duration::from_secs(5);

/// One VMM: its pid and when it was seen (a reused pid is another process).
type Key = (u32, u64);

/// The last reading of each listed VMM. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct ResidentMemory {
    readings: Arc<Mutex<HashMap<Key, u64>>>,
}

fn key(instance: &Instance) -> Key {
    (instance.pid, instance.start_boot_ns)
}

impl ResidentMemory {
    /// Reads every VMM of `snapshot`; forgets those no longer listed.
    pub(crate) fn refresh(&self, snapshot: &Snapshot) {
        let readings: HashMap<Key, u64> = snapshot
            .by_pid
            .values()
            .filter_map(|i| Some((key(i), proc::resident_bytes(i.pid)?)))
            .collect();
        *self.lock() = readings;
    }

    /// The VMM's resident bytes: the last reading, else read now.
    pub(crate) fn of(&self, instance: &Instance) -> Option<u64> {
        if let Some(bytes) = self.lock().get(&key(instance)) {
            return Some(*bytes);
        }
        proc::resident_bytes(instance.pid)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Key, u64>> {
        self.readings
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Refreshes every [`REFRESH`] (off the async workers) until `stop`.
    pub(crate) async fn run(self, snapshot: SnapshotReceiver, stop: CancellationToken) {
        let mut every = tokio::time::interval(REFRESH);
        every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = every.tick() => {}
            }
            let listed = snapshot.borrow().clone();
            let cache = self.clone();
            // A refresh that failed to run is retried at the next tick.
            let _ = tokio::task::spawn_blocking(move || cache.refresh(&listed)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use std::collections::BTreeMap;

    use super::*;
    use crate::model::instance::{Allocation, Origin};

    fn me(start_boot_ns: u64) -> Instance {
        Instance {
            instance_uuid: "u".into(),
            hypervisor: "qemu".into(),
            matcher: "qemu".into(),
            pid: std::process::id(),
            start_time: std::time::SystemTime::UNIX_EPOCH,
            start_boot_ns,
            seen_boot_ns: start_boot_ns,
            origin: Origin::Exec,
            executable: "/bin/true".into(),
            instance_dir: None,
            oom: None,
            allocation: Allocation::default(),
            identity: None,
        }
    }

    #[test]
    fn readings_are_kept_per_process_and_forgotten_when_unlisted() {
        let cache = ResidentMemory::default();
        let snapshot = Snapshot {
            by_pid: BTreeMap::from([(std::process::id(), me(1))]),
            ..Snapshot::default()
        };
        cache.refresh(&snapshot);
        let kept = cache.lock().get(&key(&me(1))).copied();
        assert!(kept.is_some_and(|b| b > 0));
        assert_eq!(cache.of(&me(1)), kept, "the reading, not a new one");
        // The same pid seen later is another process: read at once, not the old reading.
        assert!(cache.lock().get(&key(&me(2))).is_none());
        assert!(cache.of(&me(2)).is_some());
        cache.refresh(&Snapshot::default());
        assert!(cache.lock().is_empty());
    }
}
