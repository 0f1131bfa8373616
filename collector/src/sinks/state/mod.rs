//! The restart state: `<log-dir>/.collector-state.json`, what the next run of the collector
//! needs to continue where this one stopped (docs/lifecycle.md, "Restarts").
//!
//! - Per listed instance: its id, hypervisor, pid, origin, start (wall clock and
//!   `CLOCK_BOOTTIME`), when it was known to run, the `seq` of its last lifecycle event and the
//!   last console `seq` of each stream; for the whole: the last event `seq`, the host's boot id
//!   (pids and boot-clock times mean nothing after a reboot) and when the file was written.
//! - JSON with a `version`: fields are added without a new version (readers ignore what they
//!   do not know, and default what is missing); the version changes only when a field changes
//!   meaning, and a reader refuses a version it does not know (a fresh start).
//! - Written by a task of its own, at most every [`EVERY`] while something changed, and once
//!   more at shutdown after every queue is drained; replaced atomically
//!   ([`LogDir::replace`]), so a crash leaves the last whole file.
//! - Not the only record: the events and console files hold what happened after the last
//!   write, and the start-up takes the newest of both.
//! - Per instance a Pod backs (created, not terminated): its identity, when its `create` was
//!   reported and the hypervisor of its last VMM; so that after a restart a deleted Pod's
//!   instance is still attributed (its `terminate` carries the identity), and a Pod still there
//!   is not created again.

use std::{
    collections::HashMap,
    path::{Path, PathBuf},
    sync::{Arc, Mutex},
    time::{Duration, SystemTime},
};

use serde::{Deserialize, Serialize};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::warn;

use crate::{
    host::files::LogDir,
    model::{
        console::{ConsoleSubscriber, LogRecord, Resume, Stream},
        health::PipelineGuard,
        identity::{Departed, Identity, PodBacked},
        instance::{Origin, SnapshotReceiver},
        lifecycle::{EventSubscriber, Sequenced},
        time,
    },
};

/// Name of the state file in the log folder (hidden: no instance folder can be named so).
pub(crate) const FILE_NAME: &str = ".collector-state.json";
/// The format's version.
pub(crate) const VERSION: u32 = 1;
/// Writes are at most this often.
const EVERY: Duration = Duration::from_secs(2);

/// The file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct StateFile {
    pub(crate) version: u32,
    /// `/proc/sys/kernel/random/boot_id` when written.
    #[serde(default)]
    pub(crate) boot_id: String,
    /// RFC 3339.
    #[serde(default)]
    pub(crate) written_at: String,
    /// `seq` of the last lifecycle event handed out.
    #[serde(default)]
    pub(crate) last_event_seq: u64,
    #[serde(default)]
    pub(crate) instances: Vec<InstanceState>,
    /// Instances a Pod backs (created, not terminated), running or not.
    #[serde(default)]
    pub(crate) pods: Vec<PodState>,
    /// Identities of instances that are gone (no Pod, no VMM), kept while what they left may
    /// still be read.
    #[serde(default)]
    pub(crate) departed: Vec<DepartedState>,
}

/// A departed instance's identity, in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct DepartedState {
    pub(crate) instance_uuid: String,
    pub(crate) identity: Identity,
    /// RFC 3339: when it departed.
    pub(crate) since: String,
}

impl DepartedState {
    /// The registry's record of it (a `since` that does not read is now).
    pub(crate) fn departed(self) -> (String, Departed) {
        let since = time::parse_rfc3339(&self.since).unwrap_or_else(SystemTime::now);
        (
            self.instance_uuid,
            Departed {
                identity: self.identity,
                since,
            },
        )
    }
}

/// An instance a Pod backs, in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct PodState {
    pub(crate) instance_uuid: String,
    pub(crate) identity: Identity,
    /// RFC 3339: when its `create` was reported.
    pub(crate) created: String,
    #[serde(default)]
    pub(crate) hypervisor: Option<String>,
}

impl PodState {
    fn new(uuid: &str, pod: &PodBacked) -> Self {
        Self {
            instance_uuid: uuid.to_owned(),
            identity: pod.identity.clone(),
            created: time::rfc3339(pod.created),
            hypervisor: pod.hypervisor.clone(),
        }
    }

    /// The registry's record of it (a `created` that does not read is now).
    pub(crate) fn backed(self) -> (String, PodBacked) {
        let created = time::parse_rfc3339(&self.created).unwrap_or_else(SystemTime::now);
        (
            self.instance_uuid,
            PodBacked {
                identity: self.identity,
                created,
                hypervisor: self.hypervisor,
            },
        )
    }
}

/// A listed instance, in the state file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct InstanceState {
    pub(crate) instance_uuid: String,
    pub(crate) hypervisor: String,
    pub(crate) pid: u32,
    pub(crate) origin: Origin,
    /// RFC 3339.
    pub(crate) start_time: String,
    pub(crate) start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` at which it ran: a process with its pid that started later is another.
    pub(crate) seen_boot_ns: u64,
    /// `seq` of its last lifecycle event.
    #[serde(default)]
    pub(crate) last_event_seq: u64,
    #[serde(default)]
    pub(crate) console_seq: ConsoleSeqs,
}

/// The last console `seq` of each stream of an instance.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default)]
pub(crate) struct ConsoleSeqs {
    pub(crate) stdout: u64,
    pub(crate) stderr: u64,
    pub(crate) console: u64,
}

impl ConsoleSeqs {
    pub(crate) fn as_array(self) -> [u64; 3] {
        [self.stdout, self.stderr, self.console]
    }

    fn from_array(seqs: [u64; 3]) -> Self {
        Self {
            stdout: seqs[Stream::Stdout.index()],
            stderr: seqs[Stream::Stderr.index()],
            console: seqs[Stream::Console.index()],
        }
    }
}

/// Why there is no state to continue from.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StateError {
    #[error("no state file {path}")]
    Missing { path: String },
    #[error("cannot read the state file {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("the state file {path} is not valid")]
    Corrupt {
        path: String,
        #[source]
        source: serde_json::Error,
    },
    #[error("the state file {path} has version {found}; this collector reads version {VERSION}")]
    Version { path: String, found: u32 },
}

/// The state file in `log_dir`, as the previous run left it.
pub(crate) fn read(log_dir: &Path) -> Result<StateFile, StateError> {
    let path = log_dir.join(FILE_NAME).display().to_string();
    let bytes = LogDir::open(log_dir)
        .and_then(|dir| dir.read(FILE_NAME))
        .map_err(|source| {
            if source.kind() == std::io::ErrorKind::NotFound {
                StateError::Missing { path: path.clone() }
            } else {
                StateError::Read {
                    path: path.clone(),
                    source,
                }
            }
        })?;
    parse(&bytes, &path)
}

fn parse(bytes: &[u8], path: &str) -> Result<StateFile, StateError> {
    #[derive(Deserialize)]
    struct Versioned {
        version: u32,
    }
    let corrupt = |source| StateError::Corrupt {
        path: path.to_owned(),
        source,
    };
    let Versioned { version } = serde_json::from_slice(bytes).map_err(corrupt)?;
    if version != VERSION {
        return Err(StateError::Version {
            path: path.to_owned(),
            found: version,
        });
    }
    serde_json::from_slice(bytes).map_err(corrupt)
}

/// What the writer keeps between writes.
#[derive(Debug, Default)]
struct Seqs {
    last_event_seq: u64,
    instance_event_seq: HashMap<String, u64>,
    console: HashMap<Arc<str>, [u64; 3]>,
    dirty: bool,
}

type Shared = Arc<Mutex<Seqs>>;

fn lock(shared: &Shared) -> std::sync::MutexGuard<'_, Seqs> {
    shared.lock().expect("state lock")
}

/// The registry's subscriber half.
pub(crate) struct StateEvents(Shared);

/// The console source's subscriber half.
pub(crate) struct StateConsole(Shared);

/// The writer task and what it needs.
pub(crate) struct StateSink {
    pub(crate) events: StateEvents,
    pub(crate) console: StateConsole,
    /// Ends after one last write once `done` is cancelled.
    pub(crate) writer: JoinHandle<()>,
}

impl StateSink {
    /// Starts the writer: every instance `snapshot` lists, the events and console records its
    /// halves see, from `last_event_seq`, the instances' `event_seqs` and the console `seq`s
    /// of `resume` on.
    #[allow(
        clippy::too_many_arguments,
        reason = "each is one thing the writer starts from"
    )]
    pub(crate) fn start(
        log_dir: PathBuf,
        snapshot: SnapshotReceiver,
        boot_id: String,
        last_event_seq: u64,
        event_seqs: &HashMap<String, u64>,
        resume: &Resume,
        guard: PipelineGuard,
        done: CancellationToken,
    ) -> Self {
        let shared: Shared = Arc::new(Mutex::new(Seqs {
            last_event_seq,
            instance_event_seq: event_seqs.clone(),
            console: resume
                .seqs
                .iter()
                .map(|(uuid, seqs)| (Arc::from(uuid.as_str()), *seqs))
                .collect(),
            ..Seqs::default()
        }));
        let writer = tokio::spawn(write_loop(
            log_dir,
            snapshot,
            boot_id,
            shared.clone(),
            guard,
            done,
        ));
        Self {
            events: StateEvents(shared.clone()),
            console: StateConsole(shared),
            writer,
        }
    }
}

async fn write_loop(
    log_dir: PathBuf,
    mut snapshot: SnapshotReceiver,
    boot_id: String,
    shared: Shared,
    _guard: PipelineGuard,
    done: CancellationToken,
) {
    let root = match LogDir::open(&log_dir) {
        Ok(root) => Arc::new(root),
        Err(error) => {
            warn!(dir = %log_dir.display(), %error, "cannot open the log folder; no restart state");
            done.cancelled().await;
            return;
        }
    };
    let mut failing = false;
    loop {
        let last = tokio::select! {
            () = done.cancelled() => true,
            () = tokio::time::sleep(EVERY) => false,
        };
        if snapshot.has_changed().unwrap_or(false) {
            snapshot.borrow_and_update();
            lock(&shared).dirty = true;
        }
        if !std::mem::take(&mut lock(&shared).dirty) && !last {
            continue;
        }
        let bytes = render(&snapshot, &boot_id, &shared);
        let root = root.clone();
        let written = tokio::task::spawn_blocking(move || root.replace(FILE_NAME, &bytes)).await;
        match written {
            Ok(Ok(())) => failing = false,
            Ok(Err(error)) if !failing => {
                failing = true;
                warn!(file = FILE_NAME, %error, "cannot write the restart state; retrying");
            }
            _ => {}
        }
        if last {
            return;
        }
    }
}

/// The file's bytes, from the listed instances and the kept numbers.
fn render(snapshot: &SnapshotReceiver, boot_id: &str, shared: &Shared) -> Vec<u8> {
    let listed = snapshot.borrow().clone();
    let seqs = lock(shared);
    let mut instances: Vec<InstanceState> = listed
        .by_pid
        .values()
        .map(|i| InstanceState {
            instance_uuid: i.instance_uuid.clone(),
            hypervisor: i.hypervisor.clone(),
            pid: i.pid,
            origin: i.origin,
            start_time: time::rfc3339(i.start_time),
            start_boot_ns: i.start_boot_ns,
            seen_boot_ns: i.seen_boot_ns,
            last_event_seq: seqs
                .instance_event_seq
                .get(&i.instance_uuid)
                .copied()
                .unwrap_or(0),
            console_seq: ConsoleSeqs::from_array(
                seqs.console
                    .get(i.instance_uuid.as_str())
                    .copied()
                    .unwrap_or_default(),
            ),
        })
        .collect();
    instances.sort_by(|a, b| {
        a.instance_uuid
            .cmp(&b.instance_uuid)
            .then(a.pid.cmp(&b.pid))
    });
    let file = StateFile {
        version: VERSION,
        boot_id: boot_id.to_owned(),
        written_at: time::rfc3339(SystemTime::now()),
        last_event_seq: seqs.last_event_seq,
        instances,
        pods: listed
            .pods
            .iter()
            .map(|(uuid, pod)| PodState::new(uuid, pod))
            .collect(),
        departed: listed
            .departed
            .iter()
            .map(|(uuid, d)| DepartedState {
                instance_uuid: uuid.clone(),
                identity: d.identity.clone(),
                since: time::rfc3339(d.since),
            })
            .collect(),
    };
    let mut bytes = serde_json::to_vec_pretty(&file).unwrap_or_default();
    bytes.push(b'\n');
    bytes
}

impl EventSubscriber for StateEvents {
    fn event(&mut self, event: &Arc<Sequenced>) {
        let mut seqs = lock(&self.0);
        seqs.last_event_seq = seqs.last_event_seq.max(event.seq);
        seqs.dirty = true;
        let uuid = &event.event.instance_uuid;
        if event.event.event.is_pod() {
            // The Pods are in the snapshot; an instance's seq anchors its VMM's events only.
            return;
        }
        if event.event.event.ends_instance() {
            seqs.instance_event_seq.remove(uuid);
        } else {
            seqs.instance_event_seq.insert(uuid.clone(), event.seq);
        }
    }
}

impl ConsoleSubscriber for StateConsole {
    fn begin(&mut self, _uuid: &Arc<str>) {}

    fn records(&mut self, batch: &[Arc<LogRecord>]) {
        let mut seqs = lock(&self.0);
        for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            let last = seqs
                .console
                .entry(run[0].instance_uuid.clone())
                .or_default();
            for record in run {
                let slot = &mut last[record.stream.index()];
                *slot = (*slot).max(record.seq);
            }
        }
        seqs.dirty = true;
    }

    fn end(&mut self, _uuid: &Arc<str>) {}

    fn expire(&mut self, uuid: &Arc<str>) {
        lock(&self.0).console.remove(uuid);
    }

    fn close(self: Box<Self>) {}
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file() -> StateFile {
        StateFile {
            version: VERSION,
            boot_id: "b".into(),
            written_at: "2027-01-15T08:00:00Z".into(),
            last_event_seq: 41,
            instances: vec![InstanceState {
                instance_uuid: "u".into(),
                hypervisor: "firecracker".into(),
                pid: 7,
                origin: Origin::Exec,
                start_time: "2027-01-15T07:00:00Z".into(),
                start_boot_ns: 5,
                seen_boot_ns: 6,
                last_event_seq: 40,
                console_seq: ConsoleSeqs {
                    stdout: 3,
                    stderr: 0,
                    console: 9,
                },
            }],
            pods: vec![PodState {
                instance_uuid: "u".into(),
                identity: Identity {
                    project: Some("p".into()),
                    pod: "web-0".into(),
                    pod_namespace: "ns-1".into(),
                    node: "n1".into(),
                    ..Identity::default()
                },
                created: "2027-01-15T06:59:00Z".into(),
                hypervisor: None,
            }],
            departed: vec![DepartedState {
                instance_uuid: "gone".into(),
                identity: Identity {
                    project: Some("q".into()),
                    pod: "db-0".into(),
                    pod_namespace: "ns-2".into(),
                    node: "n1".into(),
                    ..Identity::default()
                },
                since: "2027-01-15T07:30:00Z".into(),
            }],
        }
    }

    #[test]
    fn round_trip_and_extension() {
        let bytes = serde_json::to_vec(&file()).unwrap();
        assert_eq!(parse(&bytes, "p").unwrap(), file());
        // A later collector's fields are ignored; missing optional ones default.
        let mut value: serde_json::Value = serde_json::from_slice(&bytes).unwrap();
        value["instances"][0]["kubernetes"] = serde_json::json!({"pod": "x"});
        value["instances"][0]
            .as_object_mut()
            .unwrap()
            .remove("console_seq");
        let back = parse(&serde_json::to_vec(&value).unwrap(), "p").unwrap();
        assert_eq!(back.instances[0].console_seq, ConsoleSeqs::default());
        assert_eq!(back.instances[0].pid, 7);
        // A file of a collector from before identity reads with no Pods.
        value.as_object_mut().unwrap().remove("pods");
        let older = parse(&serde_json::to_vec(&value).unwrap(), "p").unwrap();
        assert!(older.pods.is_empty());
        let (uuid, backed) = file().pods[0].clone().backed();
        assert_eq!(
            (uuid.as_str(), backed.identity.project),
            ("u", Some("p".into()))
        );
    }

    #[test]
    fn corrupt_and_unknown_versions_are_refused() {
        for (bytes, what) in [
            (
                &b"{\"version\":1,\"instances\":[{\"pid\":\"x\"}]}"[..],
                "corrupt",
            ),
            (b"{\"versi", "corrupt"),
            (b"", "corrupt"),
            (b"{\"version\":2}", "version"),
        ] {
            let error = parse(bytes, "p").unwrap_err();
            let got = match error {
                StateError::Corrupt { .. } => "corrupt",
                StateError::Version { .. } => "version",
                _ => "other",
            };
            assert_eq!(got, what, "{}", String::from_utf8_lossy(bytes));
        }
        let tmp = tempfile::tempdir().unwrap();
        assert!(matches!(read(tmp.path()), Err(StateError::Missing { .. })));
    }

    #[tokio::test]
    async fn written_atomically_with_what_the_subscribers_saw() {
        use crate::model::{
            health::{Pipeline, Pipelines},
            instance::Snapshot,
        };
        let tmp = tempfile::tempdir().unwrap();
        let (_tx, snapshot) = tokio::sync::watch::channel(Arc::new(Snapshot::default()));
        let done = CancellationToken::new();
        let resume = Resume {
            seqs: HashMap::from([("r".to_owned(), [1, 2, 3])]),
            down_since: None,
        };
        let mut sink = StateSink::start(
            tmp.path().to_owned(),
            snapshot,
            "boot".into(),
            10,
            &HashMap::new(),
            &resume,
            Pipelines::default().guard(Pipeline::StateFile),
            done.clone(),
        );
        sink.console
            .records(&[LogRecord::test_line("r", Stream::Stderr, 7, "x")]);
        done.cancel();
        sink.writer.await.unwrap();
        let file = read(tmp.path()).unwrap();
        assert_eq!((file.version, file.last_event_seq), (VERSION, 10));
        assert_eq!(file.boot_id, "boot");
        assert!(file.instances.is_empty(), "nothing listed");
        assert_eq!(lock(&sink.events.0).console[&Arc::from("r")], [1, 7, 3]);
    }
}
