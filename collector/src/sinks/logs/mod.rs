//! Per-instance console log files: `<log-dir>/<instance>/console.log`, NDJSON, one record a
//! line.
//!
//! - Written by a thread of its own, fed through a queue bounded in lines: when the disk is
//!   slow or full the queue fills and lines are dropped and counted (`where="queue"`); the
//!   kernel reader never waits for the disk.
//! - Rotated by size (`console.log.1` ... `.N`), so an instance holds at most
//!   `file_max_bytes * (file_rotations + 1)`. All instances together stay under
//!   `disk_max_bytes`: the oldest rotated files, and the files of instances that are gone, are
//!   deleted first; if nothing is left to delete, lines are dropped (`where="sink"`).
//! - Never follows a symlink below the log folder: every open is `openat` relative to the
//!   folder's descriptor with `O_NOFOLLOW`, and instance ids become names that cannot escape it
//!   ([`names`]).

pub mod names;

use std::{
    collections::{HashMap, HashSet},
    ffi::CString,
    fs::File,
    io::Write,
    os::fd::{AsRawFd, FromRawFd, OwnedFd},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
        mpsc,
    },
    time::SystemTime,
};

use tracing::warn;

use crate::{
    config::ConsoleConfig,
    console::{
        LogRecord,
        stats::{ConsoleStats, DropWhere},
    },
};

/// Name of the current file in an instance's folder.
pub const FILE_NAME: &str = "console.log";

#[derive(Debug, thiserror::Error)]
pub enum SinkError {
    #[error("log folder {path}: {source}")]
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

/// The sending side.
pub struct LogFiles {
    tx: mpsc::Sender<Message>,
    thread: std::thread::JoinHandle<()>,
    queued: Arc<AtomicUsize>,
    max_queued: usize,
    stats: ConsoleStats,
}

impl LogFiles {
    /// Opens (creating) the log folder and starts the writer thread.
    pub fn start(
        dir: &Path,
        config: &ConsoleConfig,
        stats: ConsoleStats,
    ) -> Result<Self, SinkError> {
        let dir_error = |source| SinkError::Dir {
            path: dir.display().to_string(),
            source,
        };
        std::fs::create_dir_all(dir).map_err(dir_error)?;
        let root = open_dir(libc::AT_FDCWD, &dir.to_string_lossy(), false).map_err(dir_error)?;
        let (tx, rx) = mpsc::channel();
        let queued = Arc::new(AtomicUsize::new(0));
        let mut writer = Writer {
            root,
            open: HashMap::new(),
            total: 0,
            max_file: config.file_max_bytes,
            rotations: config.file_rotations,
            max_total: config.disk_max_bytes,
            stats: stats.clone(),
        };
        writer.total = writer.scan().iter().map(|f| f.size).sum();
        let thread_queued = queued.clone();
        let thread = std::thread::Builder::new()
            .name("console-files".into())
            .spawn(move || {
                while let Ok(message) = rx.recv() {
                    match message {
                        Message::Records(batch) => {
                            let n = batch.len();
                            writer.write(&batch);
                            thread_queued.fetch_sub(n, Ordering::AcqRel);
                        }
                        Message::Ended(uuid) => {
                            writer.open.remove(&uuid);
                        }
                    }
                }
            })
            .map_err(dir_error)?;
        Ok(Self {
            tx,
            thread,
            queued,
            max_queued: config.queue_lines,
            stats,
        })
    }

    /// Queues lines for the files; never blocks. Lines over the queue's bound are dropped and
    /// counted.
    pub fn send(&self, batch: Vec<Arc<LogRecord>>) {
        if batch.is_empty() {
            return;
        }
        let n = batch.len();
        let before = self.queued.fetch_add(n, Ordering::AcqRel);
        if before + n > self.max_queued {
            self.queued.fetch_sub(n, Ordering::AcqRel);
            for record in &batch {
                self.stats.dropped(
                    &record.instance_uuid,
                    DropWhere::Queue,
                    record.message.len() as u64,
                );
            }
            return;
        }
        if let Err(mpsc::SendError(Message::Records(batch))) = self.tx.send(Message::Records(batch))
        {
            self.queued.fetch_sub(batch.len(), Ordering::AcqRel);
        }
    }

    pub fn ended(&self, uuid: Arc<str>) {
        let _ = self.tx.send(Message::Ended(uuid));
    }

    /// Writes what is queued, then stops the writer thread (blocks until it has).
    pub fn close(self) {
        let Self { tx, thread, .. } = self;
        drop(tx);
        let _ = thread.join();
    }
}

struct OpenLog {
    dir: OwnedFd,
    file: File,
    size: u64,
}

/// A console log file on disk, for the disk cap.
struct OnDisk {
    dir: String,
    file: String,
    size: u64,
    modified: SystemTime,
}

struct Writer {
    root: OwnedFd,
    /// Files of running instances; `None` when the folder or file could not be opened (its
    /// lines are dropped, counted, without retrying on every line).
    open: HashMap<Arc<str>, Option<OpenLog>>,
    total: u64,
    max_file: u64,
    rotations: u32,
    max_total: u64,
    stats: ConsoleStats,
}

impl Writer {
    fn write(&mut self, batch: &[Arc<LogRecord>]) {
        for run in batch.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            self.write_run(run);
        }
    }

    /// Lines of one instance: one write, split where a rotation falls; every line checked
    /// against the disk cap.
    fn write_run(&mut self, run: &[Arc<LogRecord>]) {
        let uuid = &run[0].instance_uuid;
        if !self.open.contains_key(uuid) {
            let log = open_log(&self.root, uuid);
            self.open.insert(uuid.clone(), log);
        }
        let mut text = Vec::with_capacity(run.iter().map(|r| r.message.len() + 128).sum());
        let mut message_bytes = 0;
        let mut size = self.file_size(uuid);
        for record in run {
            let Some(file_size) = size else {
                self.stats
                    .dropped(uuid, DropWhere::Sink, record.message.len() as u64);
                continue;
            };
            let start = text.len();
            record.write_ndjson(&mut text);
            let n = (text.len() - start) as u64;
            if file_size + start as u64 + n > self.max_file && file_size + start as u64 > 0 {
                let line = text.split_off(start);
                self.flush(uuid, &text, message_bytes);
                self.rotate(uuid);
                (text, message_bytes) = (line, 0);
                size = self.file_size(uuid);
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
    }

    /// Size of the open file of `uuid`; `None` when it could not be opened.
    fn file_size(&self, uuid: &Arc<str>) -> Option<u64> {
        self.open.get(uuid)?.as_ref().map(|log| log.size)
    }

    /// Appends `text` (holding `message_bytes` of console output) to the file of `uuid`.
    fn flush(&mut self, uuid: &Arc<str>, text: &[u8], message_bytes: u64) {
        if text.is_empty() {
            return;
        }
        let Some(Some(log)) = self.open.get_mut(uuid) else {
            return;
        };
        match log.file.write_all(text) {
            Ok(()) => log.size += text.len() as u64,
            Err(error) => {
                warn!(instance_uuid = %uuid.escape_debug(), %error, "cannot write console log");
                self.total = self.total.saturating_sub(text.len() as u64);
                self.stats.dropped(uuid, DropWhere::Sink, message_bytes);
            }
        }
    }

    /// `console.log` -> `.1` -> ... -> `.N`; the oldest is deleted.
    fn rotate(&mut self, uuid: &Arc<str>) {
        let Some(Some(log)) = self.open.get_mut(uuid) else {
            return;
        };
        let dir = log.dir.as_raw_fd();
        let oldest = format!("{FILE_NAME}.{}", self.rotations);
        if self.rotations == 0 {
            self.total = self.total.saturating_sub(log.size);
            let _ = unlink_at(dir, FILE_NAME);
        } else {
            if let Ok(size) = size_at(dir, &oldest) {
                self.total = self.total.saturating_sub(size);
            }
            let _ = unlink_at(dir, &oldest);
            for k in (1..self.rotations).rev() {
                let _ = rename_at(
                    dir,
                    &format!("{FILE_NAME}.{k}"),
                    &format!("{FILE_NAME}.{}", k + 1),
                );
            }
            let _ = rename_at(dir, FILE_NAME, &format!("{FILE_NAME}.1"));
        }
        match open_append(&log.dir, FILE_NAME) {
            Ok((file, size)) => {
                log.file = file;
                log.size = size;
            }
            Err(error) => {
                warn!(instance_uuid = %uuid.escape_debug(), %error, "cannot reopen console log");
                self.open.insert(uuid.clone(), None);
            }
        }
    }

    /// Deletes the oldest file that is not an open instance's current one. False if none.
    fn evict_oldest(&mut self) -> bool {
        let open: HashSet<String> = self.open.keys().map(|u| names::dir_name(u)).collect();
        let Some(victim) = self
            .scan()
            .into_iter()
            .filter(|f| f.file != FILE_NAME || !open.contains(&f.dir))
            .min_by_key(|f| f.modified)
        else {
            return false;
        };
        let Ok(dir) = open_dir(self.root.as_raw_fd(), &victim.dir, true) else {
            return false;
        };
        if unlink_at(dir.as_raw_fd(), &victim.file).is_err() {
            return false;
        }
        self.total = self.total.saturating_sub(victim.size);
        true
    }

    /// Every console log file under the folder (not following symlinks).
    fn scan(&self) -> Vec<OnDisk> {
        let mut found = Vec::new();
        let Ok(entries) = std::fs::read_dir(format!("/proc/self/fd/{}", self.root.as_raw_fd()))
        else {
            return found;
        };
        for entry in entries.flatten() {
            let Some(dir_name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let Ok(dir) = open_dir(self.root.as_raw_fd(), &dir_name, true) else {
                continue;
            };
            let Ok(files) = std::fs::read_dir(format!("/proc/self/fd/{}", dir.as_raw_fd())) else {
                continue;
            };
            for file in files.flatten() {
                let Some(name) = file.file_name().to_str().map(str::to_owned) else {
                    continue;
                };
                if name != FILE_NAME && !name.starts_with(&format!("{FILE_NAME}.")) {
                    continue;
                }
                let Ok(meta) = file.metadata() else { continue };
                if !meta.is_file() {
                    continue;
                }
                found.push(OnDisk {
                    dir: dir_name.clone(),
                    file: name,
                    size: meta.len(),
                    modified: meta.modified().unwrap_or(SystemTime::UNIX_EPOCH),
                });
            }
        }
        found
    }
}

/// Opens (creating) the file of instance `uuid`; `None`, logged, when that fails.
fn open_log(root: &OwnedFd, uuid: &str) -> Option<OpenLog> {
    let name = names::dir_name(uuid);
    let opened = make_dir(root, &name)
        .and_then(|dir| open_append(&dir, FILE_NAME).map(|(file, size)| (dir, file, size)));
    match opened {
        Ok((dir, file, size)) => Some(OpenLog { dir, file, size }),
        Err(error) => {
            warn!(instance_uuid = %uuid.escape_debug(), dir = name, %error,
                "cannot open console log; its lines are dropped");
            None
        }
    }
}

fn c_name(name: &str) -> std::io::Result<CString> {
    CString::new(name).map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))
}

fn check(ret: libc::c_int) -> std::io::Result<libc::c_int> {
    if ret < 0 {
        Err(std::io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Opens the folder `name` under `dir`; with `nofollow`, refuses a symlink.
fn open_dir(dir: libc::c_int, name: &str, nofollow: bool) -> std::io::Result<OwnedFd> {
    let name = c_name(name)?;
    let mut flags = libc::O_RDONLY | libc::O_DIRECTORY | libc::O_CLOEXEC;
    if nofollow {
        flags |= libc::O_NOFOLLOW;
    }
    // SAFETY: valid C string; the returned descriptor is owned by the OwnedFd.
    let fd = check(unsafe { libc::openat(dir, name.as_ptr(), flags) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Creates (if needed) and opens the instance folder `name` under the log folder.
fn make_dir(root: &OwnedFd, name: &str) -> std::io::Result<OwnedFd> {
    let c = c_name(name)?;
    // SAFETY: valid C string.
    if unsafe { libc::mkdirat(root.as_raw_fd(), c.as_ptr(), 0o750) } < 0 {
        let error = std::io::Error::last_os_error();
        if error.kind() != std::io::ErrorKind::AlreadyExists {
            return Err(error);
        }
    }
    open_dir(root.as_raw_fd(), name, true)
}

/// Opens `name` under `dir` for appending (created 0640), refusing a symlink; with its size.
fn open_append(dir: &OwnedFd, name: &str) -> std::io::Result<(File, u64)> {
    let c = c_name(name)?;
    let flags =
        libc::O_WRONLY | libc::O_APPEND | libc::O_CREAT | libc::O_NOFOLLOW | libc::O_CLOEXEC;
    // SAFETY: valid C string; the descriptor is owned by the File.
    let fd = check(unsafe { libc::openat(dir.as_raw_fd(), c.as_ptr(), flags, 0o640) })?;
    // SAFETY: `fd` was just opened and is owned by nobody else.
    let file = unsafe { File::from_raw_fd(fd) };
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(std::io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

fn unlink_at(dir: libc::c_int, name: &str) -> std::io::Result<()> {
    let c = c_name(name)?;
    // SAFETY: valid C string.
    check(unsafe { libc::unlinkat(dir, c.as_ptr(), 0) }).map(|_| ())
}

fn rename_at(dir: libc::c_int, from: &str, to: &str) -> std::io::Result<()> {
    let (from, to) = (c_name(from)?, c_name(to)?);
    // SAFETY: valid C strings; both names are relative to `dir`.
    check(unsafe { libc::renameat(dir, from.as_ptr(), dir, to.as_ptr()) }).map(|_| ())
}

fn size_at(dir: libc::c_int, name: &str) -> std::io::Result<u64> {
    let c = c_name(name)?;
    // SAFETY: zeroed stat is a valid out-parameter; valid C string.
    let mut st: libc::stat = unsafe { std::mem::zeroed() };
    check(unsafe { libc::fstatat(dir, c.as_ptr(), &mut st, libc::AT_SYMLINK_NOFOLLOW) })?;
    Ok(st.st_size as u64)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;
    use crate::console::Stream;

    fn record(uuid: &str, seq: u64, message: &str) -> Arc<LogRecord> {
        LogRecord::test_line(uuid, Stream::Console, seq, message)
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
        let files = LogFiles::start(&root, &config(1 << 20, 1, 1 << 30), stats.clone()).unwrap();
        files.send(vec![
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
        let files = LogFiles::start(tmp.path(), &config(1024, 2, 5 * 1024), stats.clone()).unwrap();
        let text = "m".repeat(60);
        for seq in 1..=40 {
            files.send(vec![record("a", seq, &text)]);
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
            files.send(vec![record("b", seq, &text)]);
        }
        let b = tmp.path().join("b").join(FILE_NAME);
        wait_until(|| std::fs::read_to_string(&b).is_ok_and(|s| s.contains("\"seq\":30")));
        let total: u64 = walk(tmp.path());
        assert!(total <= 5 * 1024, "{total}");
        assert_eq!(stats.get("b").dropped, [0, 0, 0]);
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
