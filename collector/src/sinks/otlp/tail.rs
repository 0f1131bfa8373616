//! Reading the per-instance files as a node log shipper would, with a checkpoint per file.
//!
//! - A file is known by its device and inode and a fingerprint of its first line, so a file
//!   renamed by rotation (`console.log` -> `console.log.1` ...) is the same file, and an inode
//!   the filesystem gave again to a new file is a new one.
//! - Each instance folder holds two chains (`console.log*`, `events.log*`); a chain is read
//!   oldest file first (`.N` ... `.1`, then the current), so records go out in order per
//!   stream, and a renamed file is read to its end before the next one.
//! - A file being read stays open: rotation away (deletion) of a file that still has unread
//!   bytes is seen on the descriptor, and its lines are counted exactly as lost.
//! - What is read is handed out as lines with their place ([`Line::entry`], [`Line::index`]);
//!   a file's checkpoint advances only over lines [`Tailer::resolve`]d, in order, and is
//!   written (atomically) to `<log-dir>/.otlp-checkpoints.json` by [`Tailer::save`].

use std::{
    collections::{HashMap, VecDeque},
    fs::File,
    os::{fd::OwnedFd, unix::fs::FileExt},
    path::Path,
    time::{Duration, Instant},
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};
use serde::{Deserialize, Serialize};
use tracing::{debug, warn};

use super::mapping::Signal;
use crate::host::files::LogDir;

/// The checkpoint file in the log folder (a dot name: never an instance folder).
pub(crate) const CHECKPOINT_FILE: &str = ".otlp-checkpoints.json";
/// Bytes of a file's start its fingerprint covers (up to the first newline).
const FINGERPRINT_BYTES: usize = 1024;
/// Most bytes read from one file at a time.
const CHUNK: u64 = 1 << 20;
/// A current file read to its end and not grown for this long is closed.
const IDLE_CLOSE: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
struct FileKey {
    dev: u64,
    ino: u64,
}

/// A file the tailer follows.
#[derive(Debug)]
struct Entry {
    key: FileKey,
    /// FNV-1a of the first line; `None` while the file has no whole first line.
    fingerprint: Option<u64>,
    /// The instance folder's name.
    dir: String,
    signal: Signal,
    /// 0 for the current file, N for `.N`.
    rank: u32,
    /// Size at the last scan.
    size: u64,
    /// Open while it may have unread bytes.
    file: Option<File>,
    /// Next byte to read.
    read: u64,
    /// Every line before this byte is resolved (sent, or given up and counted).
    acked: u64,
    /// Lines handed out and not yet resolved: (end offset, resolved), oldest first.
    outstanding: VecDeque<(u64, bool)>,
    /// Index of `outstanding[0]`.
    first_index: u64,
    /// The fingerprint was checked against the file at this place.
    verified: bool,
    /// Seen in the latest scan.
    present: bool,
    /// When its size last changed.
    grew: Instant,
}

/// A line read, with its place.
#[derive(Debug)]
pub(crate) struct Line {
    pub(crate) entry: u64,
    pub(crate) index: u64,
    pub(crate) signal: Signal,
    pub(crate) bytes: Vec<u8>,
}

/// What a scan found lost: lines (exact) and bytes of files deleted before they were read.
#[derive(Debug, Default, PartialEq, Eq)]
pub(crate) struct Lost {
    pub(crate) lines: [u64; 2],
    /// Bytes whose lines cannot be counted (a file gone while the collector was down).
    pub(crate) bytes: u64,
}

#[derive(Debug, Serialize, Deserialize)]
struct Saved {
    files: Vec<SavedFile>,
}

#[derive(Debug, Serialize, Deserialize)]
struct SavedFile {
    dev: u64,
    ino: u64,
    fingerprint: Option<u64>,
    dir: String,
    signal: String,
    rank: u32,
    size: u64,
    offset: u64,
}

/// The files under the log folder and how far each was exported.
#[derive(Debug)]
pub(crate) struct Tailer {
    root: LogDir,
    dir_fd: OwnedFd,
    entries: HashMap<u64, Entry>,
    by_key: HashMap<FileKey, u64>,
    next_id: u64,
    /// Chains in a fixed order, read round-robin from `cursor`.
    cursor: usize,
    dirty: bool,
}

fn fnv1a(bytes: &[u8]) -> u64 {
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for &b in bytes {
        h ^= u64::from(b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    h
}

/// The fingerprint of `file`: its first line (at most [`FINGERPRINT_BYTES`]); `None` while it
/// has none.
fn fingerprint(file: &File) -> Option<u64> {
    let mut buf = vec![0; FINGERPRINT_BYTES];
    let n = file.read_at(&mut buf, 0).ok()?;
    let head = &buf[..n];
    match memchr::memchr(b'\n', head) {
        Some(end) => Some(fnv1a(&head[..=end])),
        None if n == FINGERPRINT_BYTES => Some(fnv1a(head)),
        None => None,
    }
}

/// The rank of `name` in the chain of `base`: 0 for `base`, N for `base.N`.
fn rank_of(name: &str, base: &str) -> Option<u32> {
    let rest = name.strip_prefix(base)?;
    if rest.is_empty() {
        return Some(0);
    }
    rest.strip_prefix('.')?.parse().ok().filter(|&n| n > 0)
}

fn open_at(dir: &OwnedFd, name: &str, flags: OFlags) -> std::io::Result<OwnedFd> {
    Ok(rustix::fs::openat(
        dir,
        name,
        flags | OFlags::NOFOLLOW | OFlags::CLOEXEC,
        Mode::empty(),
    )?)
}

impl Tailer {
    /// Opens the log folder and the checkpoints the previous run left.
    pub(crate) fn open(log_dir: &Path) -> std::io::Result<Self> {
        let root = LogDir::open(log_dir)?;
        let dir_fd = rustix::fs::open(
            log_dir,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        let mut tailer = Self {
            root,
            dir_fd,
            entries: HashMap::new(),
            by_key: HashMap::new(),
            next_id: 0,
            cursor: 0,
            dirty: false,
        };
        match tailer.root.read(CHECKPOINT_FILE) {
            Ok(bytes) => match serde_json::from_slice::<Saved>(&bytes) {
                Ok(saved) => {
                    for f in saved.files {
                        let signal = match f.signal.as_str() {
                            "console" => Signal::Console,
                            "event" => Signal::Event,
                            _ => continue,
                        };
                        let key = FileKey {
                            dev: f.dev,
                            ino: f.ino,
                        };
                        tailer.insert(Entry {
                            key,
                            fingerprint: f.fingerprint,
                            dir: f.dir,
                            signal,
                            rank: f.rank,
                            size: f.size,
                            file: None,
                            read: f.offset,
                            acked: f.offset,
                            outstanding: VecDeque::new(),
                            first_index: 0,
                            verified: false,
                            present: false,
                            grew: Instant::now(),
                        });
                    }
                }
                Err(error) => {
                    warn!(file = CHECKPOINT_FILE, %error, "OTLP checkpoints unreadable; exporting every file from its start");
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(error) => {
                warn!(file = CHECKPOINT_FILE, %error, "OTLP checkpoints unreadable; exporting every file from its start");
            }
        }
        Ok(tailer)
    }

    fn insert(&mut self, entry: Entry) -> u64 {
        let id = self.next_id;
        self.next_id += 1;
        self.by_key.insert(entry.key, id);
        self.entries.insert(id, entry);
        id
    }

    /// Lists the files, follows renames, and gives up (counting) what was deleted unread.
    pub(crate) fn scan(&mut self) -> Lost {
        let mut lost = Lost::default();
        for e in self.entries.values_mut() {
            e.present = false;
        }
        let Ok(dirs) = Dir::read_from(&self.dir_fd) else {
            return lost;
        };
        for entry in dirs.flatten() {
            let Ok(dir_name) = entry.file_name().to_str() else {
                continue;
            };
            if dir_name.starts_with('.') || entry.file_type() != FileType::Directory {
                continue;
            }
            let dir_name = dir_name.to_owned();
            let Ok(dir) = open_at(&self.dir_fd, &dir_name, OFlags::RDONLY | OFlags::DIRECTORY)
            else {
                continue;
            };
            let Ok(files) = Dir::read_from(&dir) else {
                continue;
            };
            for file in files.flatten() {
                let Ok(name) = file.file_name().to_str() else {
                    continue;
                };
                let Some((signal, rank)) = Signal::ALL
                    .iter()
                    .find_map(|s| Some((*s, rank_of(name, s.base())?)))
                else {
                    continue;
                };
                let Ok(stat) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                    continue;
                }
                let key = FileKey {
                    dev: stat.st_dev,
                    ino: stat.st_ino,
                };
                let size = stat.st_size as u64;
                self.seen(&dir, name, &dir_name, signal, rank, key, size, &mut lost);
            }
        }
        // Gone from every name: deleted (rotated off the end, or the disk cap).
        let gone: Vec<u64> = self
            .entries
            .iter()
            .filter(|(_, e)| !e.present)
            .map(|(id, _)| *id)
            .collect();
        for id in gone {
            let e = self.entries.get_mut(&id).expect("listed");
            give_up_unread(e, &mut lost);
            if e.outstanding.is_empty() {
                let key = e.key;
                self.entries.remove(&id);
                if self.by_key.get(&key) == Some(&id) {
                    self.by_key.remove(&key);
                }
                self.dirty = true;
            }
        }
        lost
    }

    #[allow(clippy::too_many_arguments, reason = "one file's listing, taken apart")]
    fn seen(
        &mut self,
        dir: &OwnedFd,
        name: &str,
        dir_name: &str,
        signal: Signal,
        rank: u32,
        key: FileKey,
        size: u64,
        lost: &mut Lost,
    ) {
        let open = || -> Option<File> { open_at(dir, name, OFlags::RDONLY).ok().map(File::from) };
        if let Some(&id) = self.by_key.get(&key) {
            let e = self.entries.get_mut(&id).expect("indexed");
            // An entry without its file open may be a deleted file's inode given again: check
            // the fingerprint when anything about it changed (and once after a restart).
            let check = !e.verified
                || (e.file.is_none() && (e.rank != rank || e.size != size))
                || size < e.read
                || e.fingerprint.is_none();
            let mut same = true;
            if check {
                let file = open();
                let found = file.as_ref().and_then(fingerprint);
                same = match (e.fingerprint, found) {
                    (Some(a), Some(b)) => a == b,
                    (None, _) => true,
                    (Some(_), None) => false,
                } && size >= e.read;
                if same {
                    e.fingerprint = e.fingerprint.or(found);
                    e.verified = true;
                    if e.file.is_none() && e.read < size {
                        e.file = file;
                    }
                }
            }
            if same {
                e.present = true;
                if e.size != size {
                    e.grew = Instant::now();
                }
                if e.rank != rank || e.size != size {
                    e.rank = rank;
                    e.size = size;
                    self.dirty = true;
                }
                e.dir.clear();
                e.dir.push_str(dir_name);
                return;
            }
            // Another file under a reused inode: the old one is gone.
            debug!(dir = dir_name, file = name, "inode reused: a new file");
            give_up_unread(e, lost);
            e.present = false;
            self.by_key.remove(&key);
        }
        let file = open();
        let fingerprint = file.as_ref().and_then(fingerprint);
        self.insert(Entry {
            key,
            fingerprint,
            dir: dir_name.to_owned(),
            signal,
            rank,
            size,
            file: if size > 0 { file } else { None },
            read: 0,
            acked: 0,
            outstanding: VecDeque::new(),
            first_index: 0,
            verified: true,
            present: true,
            grew: Instant::now(),
        });
        self.dirty = true;
    }

    /// Reads whole lines, at most `budget` bytes in all, each chain oldest file first.
    pub(crate) fn read(&mut self, budget: usize) -> Vec<Line> {
        let mut lines = Vec::new();
        let mut chains: Vec<(&str, Signal, u32, u64)> = self
            .entries
            .iter()
            .filter(|(_, e)| e.present)
            .map(|(id, e)| (e.dir.as_str(), e.signal, e.rank, *id))
            .collect();
        // By chain, oldest (highest rank) first.
        chains.sort_by(|a, b| (a.0, a.1).cmp(&(b.0, b.1)).then(b.2.cmp(&a.2)));
        let mut groups: Vec<Vec<u64>> = Vec::new();
        let mut last: Option<(String, Signal)> = None;
        for (dir, signal, _, id) in chains {
            if last.as_ref().is_none_or(|(d, s)| d != dir || *s != signal) {
                groups.push(Vec::new());
                last = Some((dir.to_owned(), signal));
            }
            groups.last_mut().expect("pushed").push(id);
        }
        if groups.is_empty() {
            return lines;
        }
        let mut budget = budget;
        let start = self.cursor % groups.len();
        self.cursor = self.cursor.wrapping_add(1);
        for g in 0..groups.len() {
            if budget == 0 {
                break;
            }
            for &id in &groups[(start + g) % groups.len()] {
                let e = self.entries.get_mut(&id).expect("listed");
                read_entry(id, e, &mut budget, &mut lines);
                let finished = e.read >= e.size;
                if finished && e.rank > 0 {
                    // A rotated file does not grow: read to its end, it can be let go of.
                    e.file = None;
                    continue;
                }
                if finished && e.grew.elapsed() >= IDLE_CLOSE {
                    // An idle current file (an instance that ended, or a quiet one) holds no
                    // descriptor: it is opened again, its fingerprint checked, once it grows.
                    e.file = None;
                }
                // The current file, or one not finished: the newer files wait for it.
                break;
            }
        }
        lines
    }

    /// Line `index` of entry `entry` is resolved: its file's checkpoint may advance.
    pub(crate) fn resolve(&mut self, entry: u64, index: u64) {
        let Some(e) = self.entries.get_mut(&entry) else {
            return;
        };
        let Some(slot) = index
            .checked_sub(e.first_index)
            .and_then(|i| e.outstanding.get_mut(i as usize))
        else {
            return;
        };
        slot.1 = true;
        while let Some(&(end, true)) = e.outstanding.front() {
            e.acked = end;
            e.outstanding.pop_front();
            e.first_index += 1;
            self.dirty = true;
        }
        if e.outstanding.is_empty() && !e.present {
            let key = e.key;
            self.entries.remove(&entry);
            if self.by_key.get(&key) == Some(&entry) {
                self.by_key.remove(&key);
            }
        }
    }

    /// Writes the checkpoints if they changed (atomically: the next run finds the old file or
    /// the new one whole).
    pub(crate) fn save(&mut self) {
        if !self.dirty {
            return;
        }
        let files = self
            .entries
            .values()
            .filter(|e| e.present)
            .map(|e| SavedFile {
                dev: e.key.dev,
                ino: e.key.ino,
                fingerprint: e.fingerprint,
                dir: e.dir.clone(),
                signal: e.signal.as_str().to_owned(),
                rank: e.rank,
                size: e.size,
                offset: e.acked,
            })
            .collect();
        let bytes = serde_json::to_vec(&Saved { files }).expect("checkpoints serialize");
        match self.root.replace(CHECKPOINT_FILE, &bytes) {
            Ok(()) => self.dirty = false,
            Err(error) => {
                warn!(file = CHECKPOINT_FILE, %error, "cannot write the OTLP checkpoints");
            }
        }
    }

    /// The checkpoint (acknowledged offset) of each file, by (folder, file signal, rank): for
    /// tests.
    #[cfg(test)]
    fn offsets(&self) -> Vec<(String, Signal, u32, u64)> {
        let mut v: Vec<_> = self
            .entries
            .values()
            .filter(|e| e.present)
            .map(|e| (e.dir.clone(), e.signal, e.rank, e.acked))
            .collect();
        v.sort();
        v
    }
}

/// Reads whole lines of `e` from its read offset, within `budget`.
fn read_entry(id: u64, e: &mut Entry, budget: &mut usize, lines: &mut Vec<Line>) {
    while e.read < e.size && *budget > 0 {
        let Some(file) = e.file.as_ref() else {
            return;
        };
        let want = (e.size - e.read).min(CHUNK).min(*budget as u64 + 1);
        let mut buf = vec![0; want as usize];
        let n = match file.read_at(&mut buf, e.read) {
            Ok(0) => return,
            Ok(n) => n,
            Err(error) => {
                warn!(dir = e.dir, %error, "cannot read a log file for OTLP export");
                return;
            }
        };
        buf.truncate(n);
        let mut used = 0;
        while let Some(nl) = memchr::memchr(b'\n', &buf[used..]) {
            let end = used + nl + 1;
            if used > 0 && end - used > *budget {
                break;
            }
            let bytes = buf[used..end - 1].to_vec();
            *budget = budget.saturating_sub(end - used);
            used = end;
            let at = e.read + used as u64;
            e.outstanding.push_back((at, false));
            lines.push(Line {
                entry: id,
                index: e.first_index + e.outstanding.len() as u64 - 1,
                signal: e.signal,
                bytes,
            });
            if *budget == 0 {
                break;
            }
        }
        if used == 0 {
            // No line end in a whole chunk, or an unterminated tail in a file that no longer
            // grows: hand it out as a line (it will not parse, and is counted).
            let at_end = e.read + n as u64 >= e.size;
            if n as u64 >= CHUNK || (at_end && e.rank > 0) {
                let end = n;
                e.outstanding.push_back((e.read + end as u64, false));
                lines.push(Line {
                    entry: id,
                    index: e.first_index + e.outstanding.len() as u64 - 1,
                    signal: e.signal,
                    bytes: buf,
                });
                e.read += end as u64;
                *budget = budget.saturating_sub(end);
                continue;
            }
            return;
        }
        e.read += used as u64;
    }
}

/// The unread rest of a file that is gone: counted (lines exactly while its descriptor is
/// held, else bytes), never read again.
fn give_up_unread(e: &mut Entry, lost: &mut Lost) {
    if let Some(file) = e.file.take() {
        let mut at = e.read;
        let mut buf = vec![0; 1 << 16];
        let mut tail = false;
        loop {
            match file.read_at(&mut buf, at) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let count = memchr::memchr_iter(b'\n', &buf[..n]).count() as u64;
                    lost.lines[e.signal.index()] += count;
                    tail = buf[n - 1] != b'\n';
                    at += n as u64;
                }
            }
        }
        lost.lines[e.signal.index()] += u64::from(tail);
        if at > e.read {
            warn!(
                dir = e.dir,
                signal = e.signal.as_str(),
                bytes = at - e.read,
                "a log file was deleted before the OTLP exporter read it"
            );
        }
        e.read = at;
        e.size = at;
    } else if e.read < e.size {
        lost.bytes += e.size - e.read;
        warn!(
            dir = e.dir,
            signal = e.signal.as_str(),
            bytes = e.size - e.read,
            "a log file was deleted before the OTLP exporter read it (lines not counted: it \
             was never open)"
        );
        e.read = e.size;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn write(path: &Path, text: &str) {
        use std::io::Write;
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    fn texts(lines: &[Line]) -> Vec<String> {
        lines
            .iter()
            .map(|l| String::from_utf8_lossy(&l.bytes).into_owned())
            .collect()
    }

    fn resolve_all(t: &mut Tailer, lines: &[Line]) {
        for l in lines {
            t.resolve(l.entry, l.index);
        }
    }

    #[test]
    fn follows_rotation_by_rename_and_resumes_from_the_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let inst = dir.path().join("i-1");
        std::fs::create_dir(&inst).unwrap();
        let current = inst.join("console.log");
        write(&current, "a1\na2\npart");
        let mut t = Tailer::open(dir.path()).unwrap();
        assert_eq!(t.scan(), Lost::default());
        let lines = t.read(1 << 20);
        assert_eq!(texts(&lines), ["a1", "a2"], "a partial line waits");
        // Only the first is acknowledged.
        t.resolve(lines[0].entry, lines[0].index);
        write(&current, "ial\n");
        // Rotation: renamed, a new current file.
        std::fs::rename(&current, inst.join("console.log.1")).unwrap();
        write(&current, "b1\n");
        t.scan();
        let more = t.read(1 << 20);
        assert_eq!(
            texts(&more),
            ["partial", "b1"],
            "the renamed file first, to its end"
        );
        t.save();
        drop(t);
        // A restart: back from the checkpoint ("a1" acknowledged only).
        let mut t = Tailer::open(dir.path()).unwrap();
        t.scan();
        let again = t.read(1 << 20);
        assert_eq!(texts(&again), ["a2", "partial", "b1"]);
        resolve_all(&mut t, &again);
        t.save();
        let offsets = t.offsets();
        assert_eq!(
            offsets,
            [
                ("i-1".into(), Signal::Console, 0, 3),
                ("i-1".into(), Signal::Console, 1, 14)
            ]
        );
        drop(t);
        let mut t = Tailer::open(dir.path()).unwrap();
        t.scan();
        assert!(t.read(1 << 20).is_empty(), "all acknowledged");
    }

    #[test]
    fn a_file_deleted_unread_is_counted_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let inst = dir.path().join("i-2");
        std::fs::create_dir(&inst).unwrap();
        let current = inst.join("events.log");
        write(&current, "e1\ne2\ne3\n");
        let mut t = Tailer::open(dir.path()).unwrap();
        t.scan();
        // Room for one line only (the queue is full).
        let lines = t.read(3);
        assert_eq!(texts(&lines), ["e1"]);
        std::fs::remove_file(&current).unwrap();
        let lost = t.scan();
        assert_eq!(lost.lines, [0, 2]);
        assert!(t.read(1 << 20).is_empty());
        resolve_all(&mut t, &lines);
        assert!(t.offsets().is_empty());
    }

    #[test]
    fn a_reused_inode_with_another_first_line_is_a_new_file() {
        let dir = tempfile::tempdir().unwrap();
        let inst = dir.path().join("i-3");
        std::fs::create_dir(&inst).unwrap();
        let current = inst.join("console.log");
        write(&current, "old1\nold2\n");
        let mut t = Tailer::open(dir.path()).unwrap();
        t.scan();
        let lines = t.read(1 << 20);
        resolve_all(&mut t, &lines);
        t.save();
        drop(t);
        // Replaced by a file of the same size while the exporter was down (the inode may or
        // may not be the same; the fingerprint decides).
        std::fs::remove_file(&current).unwrap();
        write(&current, "new1\nnew2\n");
        let mut t = Tailer::open(dir.path()).unwrap();
        t.scan();
        assert_eq!(texts(&t.read(1 << 20)), ["new1", "new2"]);
    }
}
