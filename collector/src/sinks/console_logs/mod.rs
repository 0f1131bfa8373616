//! Console logs: per-instance NDJSON files `<log-dir>/<instance>/console.log` (one record a
//! line), and the in-memory [`history`] the logs API reads.
//!
//! - Written by a thread of its own, fed through a queue bounded in bytes (a quarter of
//!   `console.memory_max_bytes`) and in lines (`console.queue_lines`), of which one instance may
//!   hold at most an eighth once it is half full: when the disk is slow or full, or a guest
//!   floods, lines are dropped and counted (`where="queue"`), the flooding instance's first;
//!   the console source never waits for the disk.
//! - Rotated by size (`console.log.1` ... `.N`), so an instance holds at most
//!   `file_max_bytes * (file_rotations + 1)`. All instances together stay under
//!   `disk_max_bytes`: the oldest rotated files, and the files of instances that are gone, are
//!   deleted first; if nothing is left to delete, lines are dropped (`where="sink"`).
//! - Never follows a symlink below the log folder, and instance ids become names that cannot
//!   escape it (`host::files`).
//! - Each line carries its instance's `identity` when the registry knows it; with the
//!   Kubernetes source on, an unnamed instance's lines wait for it a while ([`naming`]).

pub(crate) mod history;
pub(crate) mod naming;
pub(crate) mod tail;

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::{Arc, Mutex, mpsc},
};

use naming::{IdentityWait, Namer, Naming};

use tracing::warn;

use crate::{
    config::ConsoleConfig,
    host::{
        files::{LogDir, RotatingFile},
        names,
    },
    model::{
        console::{ConsoleSubscriber, DropWhere, LineEnd, LogRecord, NdjsonEncoder},
        console_stats::ConsoleStats,
        health::PipelineGuard,
    },
};

/// Name of the current file in an instance's folder.
pub(crate) const FILE_NAME: &str = "console.log";
/// Bytes of NDJSON gathered before they are written (then the next line's too, at most).
const WRITE_MAX: usize = 256 << 10;
/// Lines the writer takes off the queue at once, about (the batches waiting, joined).
const GATHER_MAX: usize = 8192;
/// How long the writer lets a small batch wait for more (the files, not the API, see it
/// later by this much).
const GATHER_WAIT: std::time::Duration = std::time::Duration::from_millis(4);

#[derive(Debug, thiserror::Error)]
pub(crate) enum SinkError {
    #[error("log folder {path}")]
    Dir {
        path: String,
        #[source]
        source: std::io::Error,
    },
}

enum Message {
    Records(Vec<Arc<LogRecord>>),
    /// The instance is gone: close its file (it becomes deletable under the disk cap).
    Ended(Arc<str>),
}

/// What waits in the queue: lines and bytes (records' real size), in all and per instance.
#[derive(Debug, Default)]
struct Queued {
    lines: usize,
    bytes: usize,
    /// Bytes and lines of each instance.
    per_instance: HashMap<Arc<str>, (usize, usize)>,
}

impl Queued {
    /// Takes a written batch's records off the books (each run of one instance at once).
    fn written(&mut self, batch: &[Arc<LogRecord>]) {
        for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            let uuid = &run[0].instance_uuid;
            let size: usize = run.iter().map(|r| r.size()).sum();
            self.lines -= run.len();
            self.bytes -= size;
            if let Some(held) = self.per_instance.get_mut(uuid) {
                held.0 -= size;
                held.1 -= run.len();
                if held.1 == 0 {
                    self.per_instance.remove(uuid);
                }
            }
        }
    }
}

/// The file queue's bounds, and one instance's share of them.
#[derive(Debug, Clone, Copy)]
struct QueueBounds {
    lines: usize,
    bytes: usize,
}

impl QueueBounds {
    /// Whether a record of `size` bytes of instance `uuid` may join the queue.
    #[cfg(test)]
    fn admits(self, queued: &Queued, uuid: &str, size: usize, is_gap: bool) -> bool {
        let held = queued.per_instance.get(uuid).copied().unwrap_or((0, 0));
        self.admits_held(queued, held, size, is_gap)
    }

    /// [`Self::admits`], given the bytes and lines its instance holds in the queue.
    fn admits_held(self, queued: &Queued, held: (usize, usize), size: usize, is_gap: bool) -> bool {
        if queued.lines >= self.lines || queued.bytes + size > self.bytes {
            return false;
        }
        let contended = queued.lines >= self.lines / 2 || queued.bytes + size > self.bytes / 2;
        if is_gap || !contended {
            return true;
        }
        let (held_bytes, held_lines) = held;
        held_bytes + size <= self.bytes / 8 && held_lines < (self.lines / 8).max(1)
    }
}

/// The sending side: a console subscriber.
pub(crate) struct LogFiles {
    tx: mpsc::Sender<Message>,
    thread: std::thread::JoinHandle<()>,
    queued: Arc<Mutex<Queued>>,
    bounds: QueueBounds,
    stats: ConsoleStats,
}

impl LogFiles {
    /// Opens (creating) the log folder and starts the writer thread, which holds `guard` for
    /// as long as it runs. With `identities` (the Kubernetes source is on), lines are stamped
    /// with their instance's identity, and wait for it.
    pub(crate) fn start(
        dir: &Path,
        config: &ConsoleConfig,
        identities: Option<IdentityWait>,
        stats: ConsoleStats,
        guard: PipelineGuard,
    ) -> Result<Self, SinkError> {
        let dir_error = |source| SinkError::Dir {
            path: dir.display().to_string(),
            source,
        };
        let root = LogDir::open(dir).map_err(dir_error)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(Mutex::new(Queued::default()));
        let mut writer = Writer {
            total: root.files(FILE_NAME).iter().map(|f| f.size).sum(),
            root,
            open: HashMap::new(),
            max_file: config.file_max_bytes,
            rotations: config.file_rotations,
            max_total: config.disk_max_bytes,
            namer: Namer::new(identities, stats.clone()),
            stats: stats.clone(),
            text: Vec::new(),
            encoder: NdjsonEncoder::default(),
        };
        let thread_queued = queued.clone();
        let thread = std::thread::Builder::new()
            .name("console-files".into())
            .spawn(move || {
                let _guard = guard;
                loop {
                    let message = if writer.namer.holding() {
                        match rx.recv_timeout(naming::CHECK_EVERY) {
                            Ok(message) => Some(message),
                            Err(mpsc::RecvTimeoutError::Timeout) => None,
                            Err(mpsc::RecvTimeoutError::Disconnected) => break,
                        }
                    } else {
                        let Ok(message) = rx.recv() else { break };
                        Some(message)
                    };
                    let mut next: Option<Message> = message;
                    while let Some(message) = next.take() {
                        match message {
                            Message::Records(mut batch) => {
                                next = gather(&rx, &mut batch);
                                if next.is_none() && batch.len() < GATHER_MAX / 2 {
                                    // A trickle: let more come before waking for each batch.
                                    std::thread::sleep(GATHER_WAIT);
                                    next = gather(&rx, &mut batch);
                                }
                                writer.write(&batch);
                                thread_queued.lock().expect("queue lock").written(&batch);
                            }
                            Message::Ended(uuid) => {
                                writer.open.remove(&uuid);
                                writer.namer.ended(&uuid);
                            }
                        }
                    }
                    writer.release(false);
                }
                // Shutdown: what still waits goes out, named if it can be.
                writer.release(true);
            })
            .map_err(dir_error)?;
        Ok(Self {
            tx,
            thread,
            queued,
            bounds: QueueBounds {
                lines: config.queue_lines,
                bytes: config.queue_bytes(),
            },
            stats,
        })
    }

    /// Queues lines for the files; never blocks. A line over the queue's bounds is dropped and
    /// counted; so is one over its instance's share (an eighth of the bytes and of the lines)
    /// once the queue is half full. One instance's burst may use the queue while it is calm (a
    /// burst drained at shutdown, a VMM's boot log), and a flood still leaves its neighbours
    /// at least half of it.
    pub(crate) fn send(&self, batch: &[Arc<LogRecord>]) {
        if batch.is_empty() {
            return;
        }
        let mut admitted = Vec::with_capacity(batch.len());
        let mut queued = self.queued.lock().expect("queue lock");
        // Records come in runs of one instance: its share is looked up, and its drops
        // counted, once a run.
        for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            let uuid = &run[0].instance_uuid;
            let before = queued.per_instance.get(uuid).copied().unwrap_or((0, 0));
            let mut held = before;
            let (mut dropped, mut any_dropped) = (0, false);
            for record in run {
                let size = record.size();
                // A gap record is the mark of a loss: only the queue's own bounds refuse it,
                // never its instance's share (a flooding instance's marks are what its readers
                // need).
                let is_gap = matches!(record.end, LineEnd::Gap(_));
                if !self.bounds.admits_held(&queued, held, size, is_gap) {
                    dropped += record.message.len() as u64;
                    any_dropped = true;
                    continue;
                }
                queued.lines += 1;
                queued.bytes += size;
                held.0 += size;
                held.1 += 1;
                admitted.push(record.clone());
            }
            if held != before {
                *queued.per_instance.entry(uuid.clone()).or_default() = held;
            }
            if any_dropped {
                self.stats.dropped(uuid, DropWhere::Queue, dropped);
            }
        }
        drop(queued);
        if admitted.is_empty() {
            return;
        }
        if let Err(mpsc::SendError(Message::Records(batch))) =
            self.tx.send(Message::Records(admitted))
        {
            self.queued.lock().expect("queue lock").written(&batch);
        }
    }
}

/// Joins the batches waiting in `rx` to `batch`, up to [`GATHER_MAX`] lines: larger writes,
/// fewer of them. Returns the end of an instance met on the way (it follows these lines).
fn gather(rx: &mpsc::Receiver<Message>, batch: &mut Vec<Arc<LogRecord>>) -> Option<Message> {
    while batch.len() < GATHER_MAX {
        match rx.try_recv() {
            Ok(Message::Records(mut more)) => batch.append(&mut more),
            Ok(ended @ Message::Ended(_)) => return Some(ended),
            Err(_) => break,
        }
    }
    None
}

impl ConsoleSubscriber for LogFiles {
    fn begin(&mut self, _uuid: &Arc<str>) {}

    fn records(&mut self, batch: &[Arc<LogRecord>]) {
        self.send(batch);
    }

    fn end(&mut self, uuid: &Arc<str>) {
        let _ = self.tx.send(Message::Ended(uuid.clone()));
    }

    fn expire(&mut self, _uuid: &Arc<str>) {}

    /// Writes what is queued, then stops the writer thread (blocks until it has).
    fn close(self: Box<Self>) {
        let Self { tx, thread, .. } = *self;
        drop(tx);
        let _ = thread.join();
    }
}

struct Writer {
    root: LogDir,
    /// Files of running instances; `None` when the folder or file could not be opened (its
    /// lines are dropped, counted, without retrying on every line).
    open: HashMap<Arc<str>, Option<RotatingFile>>,
    total: u64,
    max_file: u64,
    rotations: u32,
    max_total: u64,
    /// Stamps identity, and holds lines back until it is known.
    namer: Namer,
    stats: ConsoleStats,
    /// The NDJSON of the lines being written, kept from one run to the next.
    text: Vec<u8>,
    encoder: NdjsonEncoder,
}

impl Writer {
    fn write(&mut self, batch: &[Arc<LogRecord>]) {
        // The batch interleaves instances a kernel write at a time: each instance's runs go
        // out together, in order (one write to its file, not one per run).
        let mut runs: Vec<&[Arc<LogRecord>]> = batch
            .chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid))
            .collect();
        runs.sort_by(|a, b| a[0].instance_uuid.cmp(&b[0].instance_uuid));
        let mut pending: Vec<&[Arc<LogRecord>]> = Vec::new();
        for instance in runs.chunk_by(|a, b| a[0].instance_uuid == b[0].instance_uuid) {
            let uuid = &instance[0][0].instance_uuid;
            // Runs that go out with the same identity (none, or this one), gathered.
            let mut identity: Option<Arc<[u8]>> = None;
            for &run in instance {
                match self.namer.naming(uuid) {
                    Naming::Off => pending.push(run),
                    Naming::Known(known) => {
                        if identity.as_ref().is_none_or(|i| !Arc::ptr_eq(i, &known)) {
                            self.write_runs(&mut pending, identity.as_deref());
                            identity = Some(known);
                        }
                        let held = self.namer.take_held(uuid);
                        if !held.is_empty() {
                            self.write_runs(&mut pending, identity.as_deref());
                            self.write_runs(&mut vec![&held[..]], identity.as_deref());
                        }
                        pending.push(run);
                    }
                    Naming::Hold => {
                        self.write_runs(&mut pending, identity.as_deref());
                        for (uuid, records, _) in self.namer.hold(uuid, run) {
                            if !records.is_empty() {
                                debug_assert!(Arc::ptr_eq(&uuid, &records[0].instance_uuid));
                                self.write_runs(&mut vec![&records[..]], None);
                            }
                        }
                    }
                    Naming::Unnamed => {
                        if identity.is_some() {
                            self.write_runs(&mut pending, identity.as_deref());
                            identity = None;
                        }
                        self.namer.count_unnamed(run.len());
                        pending.push(run);
                    }
                }
            }
            self.write_runs(&mut pending, identity.as_deref());
        }
    }

    /// Writes the held lines that are due (named since, or past the wait); all of them when
    /// `all` (shutdown).
    fn release(&mut self, all: bool) {
        for (_, records, identity) in self.namer.due(all) {
            if !records.is_empty() {
                self.write_runs(&mut vec![&records[..]], identity.as_deref());
            }
        }
    }

    /// Lines of one instance, in runs (taken out of `runs`): one write (of at most
    /// [`WRITE_MAX`] and a line), split where a rotation falls; every line checked against the
    /// disk cap.
    fn write_runs(&mut self, runs: &mut Vec<&[Arc<LogRecord>]>, identity: Option<&[u8]>) {
        let Some(uuid) = runs
            .first()
            .and_then(|r| r.first())
            .map(|r| r.instance_uuid.clone())
        else {
            runs.clear();
            return;
        };
        let uuid = &uuid;
        if !self.open.contains_key(uuid) {
            let file = self.open_log(uuid);
            self.open.insert(uuid.clone(), file);
        }
        let mut text = std::mem::take(&mut self.text);
        text.clear();
        let mut message_bytes = 0;
        for record in runs.drain(..).flatten() {
            if text.len() >= WRITE_MAX {
                self.flush(uuid, &text, message_bytes);
                text.clear();
                message_bytes = 0;
            }
            let Some(Some(file)) = self.open.get(uuid) else {
                self.stats
                    .dropped(uuid, DropWhere::Sink, record.message.len() as u64);
                continue;
            };
            let start = text.len();
            self.encoder.write(record, &mut text, identity);
            let n = (text.len() - start) as u64;
            let pending = file.size() + start as u64;
            if pending + n > self.max_file && pending > 0 {
                self.flush(uuid, &text[..start], message_bytes);
                self.rotate(uuid);
                text.drain(..start);
                message_bytes = 0;
            }
            let mut room = true;
            while self.total + n > self.max_total {
                if !self.evict_oldest() {
                    room = false;
                    break;
                }
            }
            if room {
                self.total += n;
                message_bytes += record.message.len() as u64;
            } else {
                text.truncate(text.len() - n as usize);
                self.stats
                    .dropped(uuid, DropWhere::Sink, record.message.len() as u64);
            }
        }
        self.flush(uuid, &text, message_bytes);
        // Kept for the next run, within bounds (a long line may have grown it).
        text.shrink_to(2 * WRITE_MAX);
        self.text = text;
    }

    /// Appends `text` (holding `message_bytes` of console output) to the file of `uuid`.
    fn flush(&mut self, uuid: &Arc<str>, text: &[u8], message_bytes: u64) {
        if text.is_empty() {
            return;
        }
        let Some(Some(file)) = self.open.get_mut(uuid) else {
            return;
        };
        if let Err(error) = file.write(text) {
            warn!(instance_uuid = %uuid.escape_debug(), %error, "cannot write console log");
            self.total = self.total.saturating_sub(text.len() as u64);
            self.stats.dropped(uuid, DropWhere::Sink, message_bytes);
        }
    }

    /// `console.log` -> `.1` -> ... -> `.N`; the oldest is deleted.
    fn rotate(&mut self, uuid: &Arc<str>) {
        let Some(Some(file)) = self.open.get_mut(uuid) else {
            return;
        };
        match file.rotate() {
            Ok(freed) => self.total = self.total.saturating_sub(freed),
            Err(error) => {
                warn!(instance_uuid = %uuid.escape_debug(), %error, "cannot rotate console log");
                self.open.insert(uuid.clone(), None);
            }
        }
    }

    /// Deletes the oldest file that is not an open instance's current one. False if none.
    fn evict_oldest(&mut self) -> bool {
        let open: HashSet<String> = self.open.keys().map(|u| names::dir_name(u)).collect();
        let Some(victim) = self
            .root
            .files(FILE_NAME)
            .into_iter()
            .filter(|f| f.file != FILE_NAME || !open.contains(&f.dir))
            .min_by_key(|f| f.modified)
        else {
            return false;
        };
        if self.root.remove(&victim).is_err() {
            return false;
        }
        self.total = self.total.saturating_sub(victim.size);
        true
    }

    /// Opens (creating) the file of instance `uuid`; `None`, logged, when that fails.
    fn open_log(&self, uuid: &str) -> Option<RotatingFile> {
        let opened = self
            .root
            .instance_dir(uuid)
            .and_then(|dir| RotatingFile::open(dir, FILE_NAME, self.max_file, self.rotations));
        match opened {
            Ok(file) => Some(file),
            Err(error) => {
                warn!(instance_uuid = %uuid.escape_debug(), dir = names::dir_name(uuid), %error,
                    "cannot open console log; its lines are dropped");
                None
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::model::console::Stream;

    fn record(uuid: &str, seq: u64, message: &str) -> Arc<LogRecord> {
        LogRecord::test_line(uuid, Stream::Console, seq, message)
    }

    /// The queue's books after `lines` records of `size` bytes of `uuid`.
    fn holding(queued: &mut Queued, uuid: &str, lines: usize, size: usize) {
        queued.lines += lines;
        queued.bytes += lines * size;
        let held = queued.per_instance.entry(uuid.into()).or_default();
        held.0 += lines * size;
        held.1 += lines;
    }

    #[test]
    fn the_share_binds_only_once_the_queue_is_half_full() {
        let bounds = QueueBounds {
            lines: 800,
            bytes: 1 << 20,
        };
        let mut queued = Queued::default();
        // Alone, a burst of one instance takes the queue up to half, past its eighth.
        holding(&mut queued, "burst", 399, 100);
        assert!(bounds.admits(&queued, "burst", 100, false));
        holding(&mut queued, "burst", 1, 100);
        // Half full: over its share it is refused (its gap marks are not); a neighbour within
        // its share is still taken, up to the share.
        assert!(!bounds.admits(&queued, "burst", 100, false));
        assert!(bounds.admits(&queued, "burst", 100, true));
        assert!(bounds.admits(&queued, "quiet", 100, false));
        holding(&mut queued, "quiet", 100, 100);
        assert!(!bounds.admits(&queued, "quiet", 100, false));
        // Full: nothing more, not even a gap mark.
        holding(&mut queued, "others", 300, 100);
        assert!(!bounds.admits(&queued, "fresh", 100, true));
        // Half full in bytes counts as contended too.
        let mut big = Queued::default();
        holding(&mut big, "burst", 10, 1 << 16);
        assert!(!bounds.admits(&big, "burst", 1 << 16, false));
        assert!(bounds.admits(&big, "quiet", 1 << 16, false));
    }

    fn guard() -> PipelineGuard {
        crate::model::health::Pipelines::default()
            .guard(crate::model::health::Pipeline::ConsoleFiles)
    }

    fn config(file_max_bytes: u64, rotations: u32, disk_max_bytes: u64) -> ConsoleConfig {
        ConsoleConfig {
            file_max_bytes,
            file_rotations: rotations,
            disk_max_bytes,
            ..ConsoleConfig::default()
        }
    }

    fn wait_until(f: impl Fn() -> bool) {
        for _ in 0..500 {
            if f() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        panic!("condition not reached");
    }

    #[test]
    fn hostile_id_stays_inside_and_symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        let root = tmp.path().join("logs");
        std::fs::create_dir(&root).unwrap();
        // A planted symlink where an instance folder would go.
        std::os::unix::fs::symlink(tmp.path(), root.join("evil")).unwrap();
        let stats = ConsoleStats::default();
        let files = LogFiles::start(
            &root,
            &config(1 << 20, 1, 1 << 30),
            None,
            stats.clone(),
            guard(),
        )
        .unwrap();
        files.send(&[
            record("../../escape", 1, "x"),
            record("evil", 1, "y"),
            record("ok", 1, "z"),
        ]);
        let ok = root.join("ok").join(FILE_NAME);
        wait_until(|| ok.exists() && std::fs::metadata(&ok).unwrap().len() > 0);
        assert!(root.join("%2E.%2F..%2Fescape").join(FILE_NAME).exists());
        assert!(!tmp.path().join(FILE_NAME).exists(), "followed the symlink");
        assert!(!tmp.path().join("escape").exists());
        wait_until(|| stats.get("evil").dropped[DropWhere::Sink as usize] == 1);
    }

    #[test]
    fn rotation_and_total_cap() {
        let tmp = tempfile::tempdir().unwrap();
        let stats = ConsoleStats::default();
        // Lines of ~150 bytes of JSON; files rotate at 1 KiB, 2 rotations kept per instance,
        // 5 KiB for everything.
        let files = LogFiles::start(
            tmp.path(),
            &config(1024, 2, 5 * 1024),
            None,
            stats.clone(),
            guard(),
        )
        .unwrap();
        let text = "m".repeat(60);
        for seq in 1..=40 {
            files.send(&[record("a", seq, &text)]);
        }
        let dir = tmp.path().join("a");
        wait_until(|| {
            std::fs::read_to_string(dir.join(FILE_NAME)).is_ok_and(|s| s.contains("\"seq\":40"))
        });
        let mut names: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        assert_eq!(names, ["console.log", "console.log.1", "console.log.2"]);
        for name in &names {
            assert!(
                std::fs::metadata(dir.join(name)).unwrap().len() <= 1024,
                "{name}"
            );
        }
        // A second instance pushes the total over 5 KiB: the oldest rotated files go first.
        for seq in 1..=30 {
            files.send(&[record("b", seq, &text)]);
        }
        let b = tmp.path().join("b").join(FILE_NAME);
        wait_until(|| std::fs::read_to_string(&b).is_ok_and(|s| s.contains("\"seq\":30")));
        let total: u64 = walk(tmp.path());
        assert!(total <= 5 * 1024, "{total}");
        assert_eq!(
            stats.get("b").dropped,
            [0; crate::model::console::DROP_WHERES]
        );
    }

    fn walk(dir: &Path) -> u64 {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .map(|e| {
                let meta = e.metadata().unwrap();
                if meta.is_dir() {
                    walk(&e.path())
                } else {
                    meta.len()
                }
            })
            .sum()
    }
}
