//! Lifecycle events leave the collector here: one structured log line each, a fleet counter
//! without per-instance labels, a bounded in-memory store for the API (kept after the instance
//! exits, for a configurable time and count), a live feed for followers, and a per-instance
//! NDJSON file next to the console log for a node log shipper.

use std::{
    collections::{HashMap, VecDeque},
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use prometheus_client::{
    metrics::{counter::Counter, family::Family},
    registry::Registry,
};
use tokio::sync::{broadcast, mpsc};
use tracing::{info, warn};

use super::files::{RotatingFile, instance_dir};
use crate::{
    config::EventsConfig,
    registry::lifecycle::{EventKind, LifecycleEvent},
};

/// An event with its place in the collector's sequence (gap-free, from 1).
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct Sequenced {
    pub seq: u64,
    #[serde(flatten)]
    pub event: LifecycleEvent,
}

#[derive(Debug, Default)]
struct InstanceEvents {
    events: VecDeque<Arc<Sequenced>>,
    /// When the instance's last event ended it (retention counts from here).
    ended: Option<Instant>,
}

#[derive(Debug, Default)]
struct Store {
    next_seq: u64,
    by_instance: HashMap<String, InstanceEvents>,
}

#[derive(Clone)]
pub struct EventSink {
    config: EventsConfig,
    store: Arc<Mutex<Store>>,
    live: broadcast::Sender<Arc<Sequenced>>,
    files: mpsc::Sender<Arc<Sequenced>>,
    counter: Family<Vec<(&'static str, String)>, Counter>,
    file_drops: Counter,
}

impl std::fmt::Debug for EventSink {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EventSink").finish_non_exhaustive()
    }
}

fn ends_instance(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Stop | EventKind::Crash | EventKind::OomKill
    )
}

impl EventSink {
    /// Creates the sink, registers its metrics and starts the file writer task.
    pub fn start(
        config: EventsConfig,
        log_dir: PathBuf,
        hypervisors: &[String],
        registry: &mut Registry,
    ) -> Self {
        let counter = Family::<Vec<(&'static str, String)>, Counter>::default();
        registry.register(
            "compute_instance_lifecycle_events",
            "Instance lifecycle events on this host, by event and hypervisor",
            counter.clone(),
        );
        for hypervisor in hypervisors {
            for kind in EventKind::ALL {
                let _ = counter.get_or_create(&vec![
                    ("event", kind.as_str().to_owned()),
                    ("hypervisor", hypervisor.clone()),
                ]);
            }
        }
        let file_drops = Counter::default();
        registry.register(
            "collector_event_file_drops",
            "Lifecycle events not written to their instance's events file (queue full or I/O error)",
            file_drops.clone(),
        );
        let (files, rx) = mpsc::channel(1024);
        tokio::spawn(write_files(rx, log_dir, config.clone(), file_drops.clone()));
        let (live, _) = broadcast::channel(1024);
        Self {
            config,
            store: Arc::default(),
            live,
            files,
            counter,
            file_drops,
        }
    }

    /// Records `event` everywhere it goes.
    pub fn record(&self, event: LifecycleEvent) {
        info!(
            event = event.event.as_str(),
            reason = event.reason,
            instance_uuid = event.instance_uuid,
            hypervisor = event.hypervisor,
            pid = event.pid,
            exit_code = event.exit_code,
            signal = event.signal_name,
            core_dumped = event.core_dumped,
            uptime_seconds = event.uptime_seconds,
            oom_constraint = event.oom.as_ref().map(|o| o.constraint),
            "instance lifecycle event"
        );
        self.counter
            .get_or_create(&vec![
                ("event", event.event.as_str().to_owned()),
                ("hypervisor", event.hypervisor.clone()),
            ])
            .inc();
        let sequenced = {
            let mut store = self.store.lock().expect("event store lock");
            store.next_seq += 1;
            let sequenced = Arc::new(Sequenced {
                seq: store.next_seq,
                event,
            });
            self.insert(&mut store, sequenced.clone());
            sequenced
        };
        if self.files.try_send(sequenced.clone()).is_err() {
            self.file_drops.inc();
        }
        // No follower is not an error.
        let _ = self.live.send(sequenced);
    }

    fn insert(&self, store: &mut Store, sequenced: Arc<Sequenced>) {
        let now = Instant::now();
        let retention = Duration::from_secs(self.config.retention_seconds);
        store
            .by_instance
            .retain(|_, i| i.ended.is_none_or(|t| now.duration_since(t) < retention));
        let entry = store
            .by_instance
            .entry(sequenced.event.instance_uuid.clone())
            .or_default();
        entry.ended = ends_instance(sequenced.event.event).then_some(now);
        entry.events.push_back(sequenced);
        while entry.events.len() > self.config.max_per_instance {
            entry.events.pop_front();
        }
        // Past the cap on instances, forget the ones that ended longest ago.
        while store.by_instance.len() > self.config.max_instances {
            let oldest = store
                .by_instance
                .iter()
                .filter_map(|(id, i)| Some((i.ended?, id.clone())))
                .min();
            let Some((_, id)) = oldest else { break };
            store.by_instance.remove(&id);
        }
    }

    /// Retained events of one instance, oldest first; `None` if it has none.
    pub fn of_instance(&self, uuid: &str) -> Option<Vec<Arc<Sequenced>>> {
        let store = self.store.lock().expect("event store lock");
        store
            .by_instance
            .get(uuid)
            .map(|i| i.events.iter().cloned().collect())
    }

    /// Retained events (of one instance when given), oldest first.
    pub fn all(&self, instance: Option<&str>) -> Vec<Arc<Sequenced>> {
        let store = self.store.lock().expect("event store lock");
        let mut events: Vec<_> = store
            .by_instance
            .iter()
            .filter(|(id, _)| instance.is_none_or(|want| want == id.as_str()))
            .flat_map(|(_, i)| i.events.iter().cloned())
            .collect();
        events.sort_by_key(|e| e.seq);
        events
    }

    /// Retained events and a receiver for the ones after them, taken together so a follower
    /// sees every event once.
    pub fn follow(
        &self,
        instance: Option<&str>,
    ) -> (Vec<Arc<Sequenced>>, broadcast::Receiver<Arc<Sequenced>>) {
        let receiver = self.live.subscribe();
        (self.all(instance), receiver)
    }
}

/// Appends each event to `<log_dir>/<instance>/events.log`. Runs apart from the registry so a
/// slow or full disk never holds up the data path.
async fn write_files(
    mut rx: mpsc::Receiver<Arc<Sequenced>>,
    log_dir: PathBuf,
    config: EventsConfig,
    drops: Counter,
) {
    let mut files: HashMap<String, RotatingFile> = HashMap::new();
    while let Some(event) = rx.recv().await {
        let id = &event.event.instance_uuid;
        let result = (|| -> std::io::Result<()> {
            if !files.contains_key(id) {
                let dir = instance_dir(&log_dir, id)?;
                let file = RotatingFile::new(
                    dir.join("events.log"),
                    config.file_max_bytes,
                    config.file_keep,
                );
                files.insert(id.clone(), file);
            }
            let mut line = serde_json::to_vec(&*event).map_err(std::io::Error::other)?;
            line.push(b'\n');
            files.get_mut(id).expect("inserted above").append(&line)
        })();
        if let Err(error) = result {
            drops.inc();
            warn!(instance_uuid = id, %error, "cannot write the instance's events file");
        }
        if ends_instance(event.event.event) {
            files.remove(id);
        }
    }
}
