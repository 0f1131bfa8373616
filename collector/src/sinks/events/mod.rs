//! Lifecycle events leave the collector here: one structured log line each, a fleet counter
//! without per-instance labels, a bounded in-memory record for the API (kept after the instance
//! exits, for a configurable time and count) with a live feed for followers, and a per-instance
//! NDJSON file next to the console log for a node log shipper. At start-up the files are read
//! back ([`read_back`]), so the API answers after a restart as it did before.

pub(crate) mod read_back;

use std::{path::PathBuf, sync::Arc, time::Duration};

use tokio::{
    sync::{broadcast, mpsc},
    task::JoinHandle,
};
use tracing::{info, warn};

use crate::{
    config::EventsConfig,
    host::files::{LogDir, RotatingFile},
    model::{
        health::{Health, PipelineGuard},
        lifecycle::{EventKind, EventSubscriber, Sequenced},
    },
    util::journal::{Cost, Journal, Limits},
};

/// Name of the events file in an instance's folder.
pub(crate) const FILE_NAME: &str = "events.log";
/// Events queued for the files before they are dropped and counted.
const FILE_QUEUE: usize = 1024;

impl Cost for Sequenced {
    fn cost(&self) -> usize {
        1
    }
}

/// The retained events, for the API. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct EventStore {
    journal: Arc<Journal<String, Sequenced>>,
}

impl EventStore {
    /// An empty store with `config`'s bounds.
    pub(crate) fn new(config: &EventsConfig) -> Self {
        Self {
            journal: Arc::new(Journal::new(
                Limits {
                    per_key: config.max_per_instance,
                    total: usize::MAX,
                    keys: config.max_instances,
                    retention: Some(Duration::from_secs(config.retention_seconds)),
                    follow_backlog: 1024,
                },
                true,
            )),
        }
    }

    /// Retained events of one instance, oldest first; `None` if it has none.
    pub(crate) fn of_instance(&self, uuid: &str) -> Option<Vec<Arc<Sequenced>>> {
        self.journal
            .subscribe(&uuid.to_owned(), false)
            .map(|s| s.history)
    }

    /// Retained events (of one instance when given), oldest first, and a receiver for the ones
    /// after them, taken together so a follower sees every event once.
    pub(crate) fn follow(
        &self,
        instance: Option<&str>,
    ) -> (Vec<Arc<Sequenced>>, broadcast::Receiver<Arc<Sequenced>>) {
        let instance = instance.map(str::to_owned);
        let (events, receiver) = self.journal.follow_all(instance.as_ref(), |e| e.seq);
        (
            events,
            receiver.expect("the event journal has a global feed"),
        )
    }
}

/// The registry's subscriber: log line, counter, store, file queue.
pub(crate) struct EventSink {
    store: EventStore,
    files: mpsc::Sender<Arc<Sequenced>>,
    health: Health,
}

impl EventSink {
    /// Creates the sink over `store` and starts its file writer; the writer ends (after
    /// writing what is queued) once the sink is dropped.
    pub(crate) fn start(
        config: &EventsConfig,
        log_dir: PathBuf,
        store: EventStore,
        health: Health,
        guard: PipelineGuard,
    ) -> (Self, JoinHandle<()>) {
        let (files, rx) = mpsc::channel(FILE_QUEUE);
        let writer = tokio::task::spawn_blocking({
            let config = config.clone();
            let dropped = health.event_file_dropped.clone();
            move || {
                let _guard = guard;
                write_files(rx, &log_dir, &config, &dropped);
            }
        });
        let sink = Self {
            store,
            files,
            health,
        };
        (sink, writer)
    }
}

impl EventSubscriber for EventSink {
    fn event(&mut self, sequenced: &Arc<Sequenced>) {
        let event = &sequenced.event;
        let identity = event.identity.as_ref();
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
            project = identity.and_then(|i| i.project.as_deref()),
            instance_name = identity.and_then(|i| i.instance_name.as_deref()),
            instance_namespace = identity.and_then(|i| i.instance_namespace.as_deref()),
            "instance lifecycle event"
        );
        self.health
            .lifecycle_events
            .inc(&[event.event.as_str(), &event.hypervisor]);
        self.health
            .instance_events
            .inc(&event.instance_uuid, event.event);
        let key = &event.instance_uuid;
        // A deleted Pod ends the instance for the platform: its retention starts (a VMM that
        // outlives it still adds its stop).
        if event.event.ends_instance() || event.event == EventKind::Terminate {
            self.store
                .journal
                .push(key, std::slice::from_ref(sequenced), true);
            self.store.journal.end(key);
        } else {
            self.store.journal.begin(key);
            self.store
                .journal
                .push(key, std::slice::from_ref(sequenced), true);
        }
        if self.files.try_send(sequenced.clone()).is_err() {
            self.health.event_file_dropped.inc();
        }
    }
}

/// Appends each event to `<log_dir>/<instance>/events.log`. Runs apart from the registry so a
/// slow or full disk never holds up the data path.
fn write_files(
    mut rx: mpsc::Receiver<Arc<Sequenced>>,
    log_dir: &std::path::Path,
    config: &EventsConfig,
    dropped: &crate::model::metrics::Counter,
) {
    let root = match LogDir::open(log_dir) {
        Ok(root) => Some(root),
        Err(error) => {
            warn!(dir = %log_dir.display(), %error, "cannot open the log folder; events files off");
            None
        }
    };
    let mut files: std::collections::HashMap<String, RotatingFile> =
        std::collections::HashMap::new();
    while let Some(event) = rx.blocking_recv() {
        let id = &event.event.instance_uuid;
        let result = (|| -> std::io::Result<()> {
            let root = root
                .as_ref()
                .ok_or_else(|| std::io::Error::other("no log folder"))?;
            if !files.contains_key(id) {
                let dir = root.instance_dir(id)?;
                let file = RotatingFile::open(
                    dir,
                    FILE_NAME,
                    config.file_max_bytes,
                    config.file_rotations,
                )?;
                files.insert(id.clone(), file);
            }
            let mut line = serde_json::to_vec(&*event).map_err(std::io::Error::other)?;
            line.push(b'\n');
            files.get_mut(id).expect("inserted above").append(&line)
        })();
        if let Err(error) = result {
            dropped.inc();
            warn!(instance_uuid = id, %error, "cannot write the instance's events file");
        }
        if event.event.event.ends_instance() {
            files.remove(id);
        }
    }
}
