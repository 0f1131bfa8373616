//! The OTLP logs exporter (`[export.otlp]`): console records and lifecycle events leave for the
//! fleet's log pipeline (the node's OpenTelemetry Collector, or the gateway), one OTLP Resource
//! per instance. docs/export.md has the mapping and the guarantee.
//!
//! - **Source: the durable files.** The exporter reads `<log-dir>/<instance>/console.log*` and
//!   `events.log*` as a log shipper would ([`tail`]): a checkpoint per file, advanced only over
//!   records the receiver acknowledged (or that were given up and counted), written atomically
//!   to `<log-dir>/.otlp-checkpoints.json`. After a restart or an outage of the receiver export
//!   resumes where it stopped; what was acknowledged but not yet checkpointed (at most the
//!   last half second) is sent again, with the same `log.record.uid`.
//! - **Bound.** Bytes read and not yet resolved stay under `queue_max_bytes`: past it reading
//!   pauses and the files keep the data. A file deleted (rotated away) before it was read has
//!   its lines counted as `outcome="lost"`.
//! - **Identity.** With `require_identity` a record whose instance has no tenant identity
//!   (project, instance name and namespace: on the line, else in the registry's snapshot, else
//!   the last one seen for the instance) is held up to `kubernetes.identity_wait_seconds`, then dropped
//!   and counted (`outcome="no_identity"`), never sent.
//! - **Delivery** ([`transport`]): batches by signal, by count, bytes and time; one request at
//!   a time; retries with exponential backoff and jitter on 429, 502, 503, 504, connection
//!   errors and timeouts, honouring `Retry-After`; other statuses drop the batch (counted);
//!   an OTLP partial success counts its rejected records.
//!
//! Runs on a thread of its own with its own runtime, so reading files and encoding never hold
//! up the collector's workers.

pub(crate) mod mapping;
pub(crate) mod tail;
pub(crate) mod transport;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    path::PathBuf,
    time::{Duration, Instant, SystemTime},
};

use opentelemetry_proto::tonic::{
    collector::logs::v1::ExportLogsServiceRequest,
    common::v1::InstrumentationScope,
    logs::v1::{LogRecord as OtlpRecord, ResourceLogs, ScopeLogs},
};
use ring::rand::SecureRandom;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    mapping::{Mapped, Signal},
    tail::{Line, Tailer},
    transport::{Outcome, Transport},
};
use crate::{
    config::OtlpConfig,
    model::{
        export_stats::ExportStats,
        health::{Pipeline, Pipelines},
        identity::Identity,
        instance::SnapshotReceiver,
    },
};

/// Checkpoints are written at most this often (and at shutdown).
const SAVE_EVERY: Duration = Duration::from_millis(500);
/// Identities remembered for instances that left the snapshot.
const REMEMBERED_IDENTITIES: usize = 65_536;

#[derive(Debug, thiserror::Error)]
pub(crate) enum ExportError {
    #[error(transparent)]
    Transport(#[from] transport::TransportError),
    #[error("log folder {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

/// What the exporter is started with.
pub(crate) struct Settings {
    pub(crate) config: OtlpConfig,
    /// `config.require_identity`, resolved (on when the Kubernetes source runs).
    pub(crate) require_identity: bool,
    /// The collector's node name (`k8s.node.name` of instances without identity).
    pub(crate) node: Option<String>,
    /// How long a record waits for its instance's identity (`kubernetes.identity_wait_seconds`).
    pub(crate) identity_wait: Duration,
    pub(crate) log_dir: PathBuf,
}

/// The running exporter.
pub(crate) struct OtlpExporter {
    stop: CancellationToken,
    thread: std::thread::JoinHandle<()>,
}

impl OtlpExporter {
    /// Starts the exporter's thread, which holds the guard of [`Pipeline::OtlpExport`] for as
    /// long as it runs; `None` when no endpoint is configured (the pipeline stays up, idle).
    pub(crate) fn start(
        settings: Settings,
        snapshot: SnapshotReceiver,
        stats: ExportStats,
        pipelines: &Pipelines,
    ) -> Result<Option<Self>, ExportError> {
        if settings.config.endpoint.is_empty() {
            return Ok(None);
        }
        let guard = pipelines.guard(Pipeline::OtlpExport);
        let transport = Transport::new(&settings.config)?;
        let tailer = Tailer::open(&settings.log_dir).map_err(|source| ExportError::Dir {
            path: settings.log_dir.display().to_string(),
            source,
        })?;
        stats.enable(settings.config.queue_max_bytes as u64);
        info!(
            endpoint = settings.config.endpoint,
            protocol = ?settings.config.protocol,
            require_identity = settings.require_identity,
            "OTLP export on"
        );
        let stop = CancellationToken::new();
        let thread = std::thread::Builder::new()
            .name("otlp-export".into())
            .spawn({
                let stop = stop.clone();
                move || {
                    let _guard = guard;
                    let runtime = tokio::runtime::Builder::new_current_thread()
                        .enable_all()
                        .build()
                        .expect("the exporter's runtime");
                    let mut exporter = Exporter {
                        settings,
                        snapshot,
                        stats,
                        tailer,
                        transport,
                        held: BTreeMap::new(),
                        batches: [Batch::default(), Batch::default()],
                        queue_bytes: 0,
                        held_records: 0,
                        remembered: HashMap::new(),
                        looked_up: HashMap::new(),
                        last_save: Instant::now(),
                        random: ring::rand::SystemRandom::new(),
                    };
                    runtime.block_on(exporter.run(stop));
                }
            })
            .map_err(|source| ExportError::Dir {
                path: "otlp-export thread".into(),
                source,
            })?;
        Ok(Some(Self { stop, thread }))
    }

    /// Stops: an export in flight is abandoned (its records go again after the restart), the
    /// checkpoints are written. Waits up to `budget`.
    pub(crate) async fn stop(self, budget: Duration) {
        self.stop.cancel();
        let deadline = Instant::now() + budget;
        while !self.thread.is_finished() && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.thread.is_finished() {
            let _ = self.thread.join();
        } else {
            warn!("the OTLP exporter did not stop in time");
        }
    }
}

/// A record waiting to be sent, with its place in its file.
#[derive(Debug)]
struct Item {
    entry: u64,
    index: u64,
    size: usize,
    instance_uuid: String,
    identity: Option<Identity>,
    record: OtlpRecord,
    /// When it was read (the identity wait starts there).
    read_at: Instant,
}

#[derive(Debug, Default)]
struct Batch {
    items: Vec<Item>,
    bytes: usize,
    since: Option<Instant>,
}

struct Exporter {
    settings: Settings,
    snapshot: SnapshotReceiver,
    stats: ExportStats,
    tailer: Tailer,
    transport: Transport,
    /// Records waiting for their instance's identity, by file (in file order).
    held: BTreeMap<u64, VecDeque<Item>>,
    batches: [Batch; 2],
    /// Bytes read and not yet resolved.
    queue_bytes: usize,
    held_records: usize,
    /// The last identity seen per instance (lines, snapshot): instances that left the
    /// snapshot keep theirs for their last records.
    remembered: HashMap<String, Identity>,
    /// Lookups of this pass (the snapshot is searched by instance once a pass, not a line).
    looked_up: HashMap<String, Option<Identity>>,
    last_save: Instant,
    random: ring::rand::SystemRandom,
}

/// The exporter was told to stop.
struct Stopped;

impl Exporter {
    async fn run(&mut self, stop: CancellationToken) {
        let poll = Duration::from_millis(self.settings.config.poll_ms);
        loop {
            if stop.is_cancelled() {
                break;
            }
            let read = self.read_files();
            self.release_held();
            self.update_gauges();
            if self.send_due(&stop).await.is_err() {
                break;
            }
            if self.last_save.elapsed() >= SAVE_EVERY {
                self.tailer.save();
                self.last_save = Instant::now();
            }
            if read == 0 {
                tokio::select! {
                    () = stop.cancelled() => break,
                    () = tokio::time::sleep(self.idle_wait(poll)) => {}
                }
            }
        }
        self.tailer.save();
        info!("OTLP export stopped; checkpoints written");
    }

    /// How long to sleep with nothing new: a poll, or less when a batch comes due sooner.
    fn idle_wait(&self, poll: Duration) -> Duration {
        let timeout = Duration::from_millis(self.settings.config.batch_timeout_ms);
        self.batches
            .iter()
            .filter_map(|b| b.since)
            .map(|since| timeout.saturating_sub(since.elapsed()))
            .fold(poll, Duration::min)
            .max(Duration::from_millis(1))
    }

    /// Scans and reads the files within the queue's room; returns the lines read.
    fn read_files(&mut self) -> usize {
        self.looked_up.clear();
        self.scan();
        // Within the queue's room, and a few batches a pass: the records parsed from the
        // lines cost more memory than the lines, and a backlog is read as it is sent.
        let c = &self.settings.config;
        let room = c
            .queue_max_bytes
            .saturating_sub(self.queue_bytes)
            .min(4 * c.batch_max_bytes);
        if room == 0 {
            return 0;
        }
        let lines = self.tailer.read(room);
        let n = lines.len();
        for line in &lines {
            self.admit(line);
        }
        n
    }

    /// Follows renames and new files, and counts what was deleted unread (also while an
    /// export waits to be retried: files keep rotating then).
    fn scan(&mut self) {
        let lost = self.tailer.scan();
        for signal in Signal::ALL {
            self.stats
                .count(signal.as_str(), "lost", lost.lines[signal.index()]);
        }
        self.stats.lost_bytes.add(lost.bytes);
    }

    /// A line read: mapped, then to its batch, or held for identity, or counted invalid.
    fn admit(&mut self, line: &Line) {
        let size = line.bytes.len() + 1;
        self.queue_bytes += size;
        let mapped = match line.signal {
            Signal::Console => mapping::console(&line.bytes),
            Signal::Event => mapping::event(&line.bytes),
        };
        let Mapped {
            instance_uuid,
            identity,
            record,
        } = match mapped {
            Ok(m) => m,
            Err(error) => {
                warn!(%error, signal = line.signal.as_str(), "a log file line is not a record; not exported");
                self.stats.count(line.signal.as_str(), "invalid", 1);
                self.resolve_one(line.entry, line.index, size);
                return;
            }
        };
        if let Some(id) = &identity {
            self.remember(&instance_uuid, id);
        }
        let identity = identity
            .filter(mapping::is_complete)
            .or_else(|| self.lookup(&instance_uuid));
        let item = Item {
            entry: line.entry,
            index: line.index,
            size,
            instance_uuid,
            identity,
            record,
            read_at: Instant::now(),
        };
        let needs = self.settings.require_identity
            && !item.identity.as_ref().is_some_and(mapping::is_complete);
        if let Some(queue) = self.held.get_mut(&line.entry) {
            queue.push_back(item);
            self.held_records += 1;
        } else if needs {
            self.held.entry(line.entry).or_default().push_back(item);
            self.held_records += 1;
        } else {
            self.batch(line.signal, item);
        }
    }

    fn batch(&mut self, signal: Signal, item: Item) {
        let batch = &mut self.batches[signal.index()];
        batch.since.get_or_insert_with(Instant::now);
        batch.bytes += item.size;
        batch.items.push(item);
    }

    fn remember(&mut self, uuid: &str, identity: &Identity) {
        if self.remembered.len() >= REMEMBERED_IDENTITIES && !self.remembered.contains_key(uuid) {
            self.remembered.clear();
        }
        if self.remembered.get(uuid) != Some(identity) {
            self.remembered.insert(uuid.to_owned(), identity.clone());
            self.looked_up.remove(uuid);
        }
    }

    /// The instance's identity: the snapshot's (its VMM, else its Pod, else its tombstone once
    /// departed), else the last one seen.
    fn lookup(&mut self, uuid: &str) -> Option<Identity> {
        if let Some(known) = self.looked_up.get(uuid) {
            return known.clone();
        }
        let found = {
            let snapshot = self.snapshot.borrow();
            snapshot.identity_of(uuid).cloned()
        };
        let identity = match found {
            Some(identity) => {
                self.remember(uuid, &identity);
                Some(identity)
            }
            None => self.remembered.get(uuid).cloned(),
        };
        self.looked_up.insert(uuid.to_owned(), identity.clone());
        identity
    }

    /// Held records whose instance now has its identity go to their batch; those held past
    /// the bound are dropped and counted.
    fn release_held(&mut self) {
        let wait = self.settings.identity_wait;
        let entries: Vec<u64> = self.held.keys().copied().collect();
        for entry in entries {
            let uuid = self.held[&entry]
                .front()
                .map(|i| i.instance_uuid.clone())
                .unwrap_or_default();
            let identity = self.lookup(&uuid).filter(mapping::is_complete);
            let mut queue = self.held.remove(&entry).unwrap_or_default();
            if let Some(identity) = identity {
                while let Some(mut item) = queue.pop_front() {
                    self.held_records -= 1;
                    if item
                        .identity
                        .as_ref()
                        .is_none_or(|i| !mapping::is_complete(i))
                    {
                        item.identity = Some(identity.clone());
                    }
                    let signal = Self::signal_of(&item);
                    self.batch(signal, item);
                }
                continue;
            }
            while queue.front().is_some_and(|i| i.read_at.elapsed() >= wait) {
                let item = queue.pop_front().expect("checked");
                self.held_records -= 1;
                let signal = Self::signal_of(&item);
                self.stats.count(signal.as_str(), "no_identity", 1);
                self.resolve_one(item.entry, item.index, item.size);
            }
            if !queue.is_empty() {
                self.held.insert(entry, queue);
            }
        }
    }

    fn signal_of(item: &Item) -> Signal {
        if item.record.event_name.is_empty() {
            Signal::Console
        } else {
            Signal::Event
        }
    }

    fn resolve_one(&mut self, entry: u64, index: u64, size: usize) {
        self.tailer.resolve(entry, index);
        self.queue_bytes -= size;
    }

    fn update_gauges(&self) {
        self.stats.set_queue_bytes(self.queue_bytes as u64);
        self.stats.set_held(self.held_records as u64);
    }

    /// Sends each batch that is full or whose time is up.
    async fn send_due(&mut self, stop: &CancellationToken) -> Result<(), Stopped> {
        let c = &self.settings.config;
        let (max_records, max_bytes) = (c.batch_max_records, c.batch_max_bytes);
        let timeout = Duration::from_millis(c.batch_timeout_ms);
        for signal in Signal::ALL {
            loop {
                let batch = &self.batches[signal.index()];
                let full = batch.items.len() >= max_records || batch.bytes >= max_bytes;
                let due = batch.since.is_some_and(|s| s.elapsed() >= timeout);
                if batch.items.is_empty() || !(full || due) {
                    break;
                }
                let take = batch.items.len().min(max_records);
                let batch = &mut self.batches[signal.index()];
                let items: Vec<Item> = batch.items.drain(..take).collect();
                batch.bytes -= items.iter().map(|i| i.size).sum::<usize>();
                if batch.items.is_empty() {
                    batch.since = None;
                }
                self.export(signal, items, stop).await?;
                self.update_gauges();
            }
        }
        Ok(())
    }

    /// One batch, until it is acknowledged, refused, or the exporter stops.
    async fn export(
        &mut self,
        signal: Signal,
        items: Vec<Item>,
        stop: &CancellationToken,
    ) -> Result<(), Stopped> {
        let request = self.request(&items);
        let c = &self.settings.config;
        let timeout = Duration::from_millis(c.request_timeout_ms);
        let (initial, max) = (
            Duration::from_millis(c.retry_initial_ms),
            Duration::from_millis(c.retry_max_ms),
        );
        let n = items.len() as u64;
        let mut attempt = 0;
        loop {
            let outcome = tokio::select! {
                () = stop.cancelled() => return Err(Stopped),
                outcome = self.transport.send(request.clone(), timeout) => outcome,
            };
            match outcome {
                Outcome::Accepted { rejected, message } => {
                    let rejected = rejected.min(n);
                    if rejected > 0 {
                        warn!(
                            signal = signal.as_str(),
                            rejected,
                            message,
                            "the OTLP receiver rejected records (partial success)"
                        );
                    }
                    self.stats.count(signal.as_str(), "sent", n - rejected);
                    self.stats.count(signal.as_str(), "rejected", rejected);
                    break;
                }
                Outcome::Refused { detail } => {
                    warn!(
                        signal = signal.as_str(),
                        records = n,
                        detail,
                        "the OTLP receiver refused a batch; its records are dropped"
                    );
                    self.stats.count(signal.as_str(), "refused", n);
                    break;
                }
                Outcome::Retry {
                    reason,
                    after,
                    detail,
                } => {
                    self.stats.retries.inc(&[reason]);
                    let mut bytes = [0u8; 4];
                    let _ = self.random.fill(&mut bytes);
                    let delay =
                        transport::backoff(attempt, initial, max, after, u32::from_le_bytes(bytes));
                    warn!(
                        signal = signal.as_str(),
                        records = n,
                        reason,
                        detail,
                        attempt,
                        delay_ms = delay.as_millis() as u64,
                        "OTLP export failed; retrying"
                    );
                    attempt += 1;
                    let poll = Duration::from_millis(self.settings.config.poll_ms);
                    let until = Instant::now() + delay;
                    loop {
                        let left = until.saturating_duration_since(Instant::now());
                        if left.is_zero() {
                            break;
                        }
                        tokio::select! {
                            () = stop.cancelled() => return Err(Stopped),
                            () = tokio::time::sleep(left.min(poll)) => {}
                        }
                        self.scan();
                    }
                }
            }
        }
        for item in items {
            self.resolve_one(item.entry, item.index, item.size);
        }
        Ok(())
    }

    /// The request of `items`: one ResourceLogs per instance (and identity), in the order the
    /// instances first appear, records in file order.
    fn request(&self, items: &[Item]) -> ExportLogsServiceRequest {
        let observed = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        let mut groups: Vec<(&str, Option<&Identity>, Vec<OtlpRecord>)> = Vec::new();
        for item in items {
            let mut record = item.record.clone();
            record.observed_time_unix_nano = observed;
            let key = (item.instance_uuid.as_str(), item.identity.as_ref());
            match groups.iter_mut().find(|g| (g.0, g.1) == key) {
                Some(group) => group.2.push(record),
                None => groups.push((key.0, key.1, vec![record])),
            }
        }
        let node = self.settings.node.as_deref();
        ExportLogsServiceRequest {
            resource_logs: groups
                .into_iter()
                .map(|(uuid, identity, log_records)| ResourceLogs {
                    resource: Some(mapping::resource(uuid, identity, node)),
                    scope_logs: vec![ScopeLogs {
                        scope: Some(InstrumentationScope {
                            name: "compute-collector".into(),
                            version: env!("CARGO_PKG_VERSION").into(),
                            ..InstrumentationScope::default()
                        }),
                        log_records,
                        ..ScopeLogs::default()
                    }],
                    ..ResourceLogs::default()
                })
                .collect(),
        }
    }
}
