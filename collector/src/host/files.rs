//! Files under the log folder: one folder per instance (named by [`dir_name`], so ids cannot
//! escape), append-only files in it rotated by size. Every open is relative to a folder's
//! descriptor with `O_NOFOLLOW`, so a symlink planted below the log folder is never followed.
//! Both the events file and the console log use [`RotatingFile`].

use std::{
    fs::File,
    io::{self, Write},
    os::fd::{AsFd, OwnedFd},
    path::Path,
    time::SystemTime,
};

use rustix::fs::{AtFlags, Dir, FileType, Mode, OFlags};

use super::names::dir_name;

/// The log folder, held open.
#[derive(Debug)]
pub(crate) struct LogDir {
    root: OwnedFd,
}

/// A file of an instance folder, seen on disk (for disk caps).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct OnDisk {
    /// The instance folder's name.
    pub(crate) dir: String,
    pub(crate) file: String,
    pub(crate) size: u64,
    pub(crate) modified: SystemTime,
}

impl LogDir {
    /// Opens the folder at `path`, creating it (and its parents) if missing.
    pub(crate) fn open(path: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(path)?;
        let root = rustix::fs::open(
            path,
            OFlags::RDONLY | OFlags::DIRECTORY | OFlags::CLOEXEC,
            Mode::empty(),
        )?;
        Ok(Self { root })
    }

    /// The folder of instance `id`, created if missing; refuses anything but a folder there.
    pub(crate) fn instance_dir(&self, id: &str) -> io::Result<OwnedFd> {
        let name = dir_name(id);
        match rustix::fs::mkdirat(&self.root, name.as_str(), Mode::from_raw_mode(0o750)) {
            Ok(()) | Err(rustix::io::Errno::EXIST) => {}
            Err(e) => return Err(e.into()),
        }
        open_dir(&self.root, &name)
    }

    /// Every `base` and `base.N` file in the instance folders.
    pub(crate) fn files(&self, base: &str) -> Vec<OnDisk> {
        let mut found = Vec::new();
        let Ok(dirs) = Dir::read_from(&self.root) else {
            return found;
        };
        for entry in dirs.flatten() {
            let Ok(dir_name) = entry.file_name().to_str() else {
                continue;
            };
            if dir_name.starts_with('.') || entry.file_type() != FileType::Directory {
                continue;
            }
            let Ok(dir) = open_dir(&self.root, dir_name) else {
                continue;
            };
            let Ok(files) = Dir::read_from(&dir) else {
                continue;
            };
            for file in files.flatten() {
                let Ok(name) = file.file_name().to_str() else {
                    continue;
                };
                if !is_rotation_of(name, base) {
                    continue;
                }
                let Ok(stat) = rustix::fs::statat(&dir, name, AtFlags::SYMLINK_NOFOLLOW) else {
                    continue;
                };
                if FileType::from_raw_mode(stat.st_mode) != FileType::RegularFile {
                    continue;
                }
                found.push(OnDisk {
                    dir: dir_name.to_owned(),
                    file: name.to_owned(),
                    size: stat.st_size as u64,
                    modified: SystemTime::UNIX_EPOCH
                        + std::time::Duration::new(stat.st_mtime as u64, stat.st_mtime_nsec as u32),
                });
            }
        }
        found
    }

    /// The file `name` of the log folder itself (not a link).
    pub(crate) fn read(&self, name: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let mut file = File::from(rustix::fs::openat(&self.root, name, flags, Mode::empty())?);
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Replaces the file `name` of the log folder with `bytes`, atomically: a reader (or the
    /// next start after a crash) finds the old file or the new one whole. Written to a
    /// temporary file, flushed to disk, renamed over `name`, and the folder flushed so that the
    /// rename holds too.
    pub(crate) fn replace(&self, name: &str, bytes: &[u8]) -> io::Result<()> {
        let tmp = format!("{name}.tmp");
        let flags =
            OFlags::WRONLY | OFlags::CREATE | OFlags::TRUNC | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        let fd = rustix::fs::openat(&self.root, tmp.as_str(), flags, Mode::from_raw_mode(0o640))?;
        let mut file = File::from(fd);
        file.write_all(bytes)?;
        file.sync_all()?;
        drop(file);
        rustix::fs::renameat(&self.root, tmp.as_str(), &self.root, name)?;
        rustix::fs::fsync(&self.root)?;
        Ok(())
    }

    /// The file `file` of the instance folder `dir` (both as [`Self::files`] names them), open
    /// for reading (not a link).
    pub(crate) fn open_in(&self, dir: &str, file: &str) -> io::Result<File> {
        let dir = open_dir(&self.root, dir)?;
        let flags = OFlags::RDONLY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
        Ok(File::from(rustix::fs::openat(
            &dir,
            file,
            flags,
            Mode::empty(),
        )?))
    }

    /// The whole file `file` of the instance folder `dir`.
    pub(crate) fn read_in(&self, dir: &str, file: &str) -> io::Result<Vec<u8>> {
        use std::io::Read;
        let mut bytes = Vec::new();
        self.open_in(dir, file)?.read_to_end(&mut bytes)?;
        Ok(bytes)
    }

    /// Deletes `file` (found by [`Self::files`]).
    pub(crate) fn remove(&self, file: &OnDisk) -> io::Result<()> {
        let dir = open_dir(&self.root, &file.dir)?;
        rustix::fs::unlinkat(&dir, file.file.as_str(), AtFlags::empty())?;
        Ok(())
    }
}

/// `name` is `base` or `base.N`.
fn is_rotation_of(name: &str, base: &str) -> bool {
    name.strip_prefix(base).is_some_and(|rest| {
        rest.is_empty()
            || rest
                .strip_prefix('.')
                .is_some_and(|n| n.parse::<u32>().is_ok())
    })
}

/// Opens the folder `name` in `parent`, refusing a symlink.
fn open_dir(parent: impl AsFd, name: &str) -> io::Result<OwnedFd> {
    let flags = OFlags::RDONLY | OFlags::DIRECTORY | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    Ok(rustix::fs::openat(parent, name, flags, Mode::empty())?)
}

/// An append-only file rotated by size: `base`, `base.1`, ... `base.<rotations>`; the oldest is
/// deleted. Each append is one `write`, so a reader never sees half a record.
#[derive(Debug)]
pub(crate) struct RotatingFile {
    dir: OwnedFd,
    base: &'static str,
    max_bytes: u64,
    rotations: u32,
    file: File,
    size: u64,
}

impl RotatingFile {
    /// Opens (creating, mode 0640) `base` in the folder `dir` for appending; refuses a symlink
    /// or anything but a regular file.
    pub(crate) fn open(
        dir: OwnedFd,
        base: &'static str,
        max_bytes: u64,
        rotations: u32,
    ) -> io::Result<Self> {
        let (file, size) = open_append(&dir, base)?;
        Ok(Self {
            dir,
            base,
            max_bytes,
            rotations,
            file,
            size,
        })
    }

    pub(crate) fn size(&self) -> u64 {
        self.size
    }

    /// Whether appending `n` more bytes would go over the size (a rotation comes first).
    pub(crate) fn rotates_before(&self, n: u64) -> bool {
        self.size > 0 && self.size + n > self.max_bytes
    }

    /// Rotates now. Returns the bytes of the file that fell off the end (deleted).
    pub(crate) fn rotate(&mut self) -> io::Result<u64> {
        let oldest = if self.rotations == 0 {
            self.base.to_owned()
        } else {
            format!("{}.{}", self.base, self.rotations)
        };
        let freed = rustix::fs::statat(&self.dir, oldest.as_str(), AtFlags::SYMLINK_NOFOLLOW)
            .map_or(0, |s| s.st_size as u64);
        match rustix::fs::unlinkat(&self.dir, oldest.as_str(), AtFlags::empty()) {
            Ok(()) | Err(rustix::io::Errno::NOENT) => {}
            Err(e) => return Err(e.into()),
        }
        for k in (1..self.rotations).rev() {
            let from = format!("{}.{k}", self.base);
            let to = format!("{}.{}", self.base, k + 1);
            match rustix::fs::renameat(&self.dir, from.as_str(), &self.dir, to.as_str()) {
                Ok(()) | Err(rustix::io::Errno::NOENT) => {}
                Err(e) => return Err(e.into()),
            }
        }
        if self.rotations > 0 {
            let to = format!("{}.1", self.base);
            rustix::fs::renameat(&self.dir, self.base, &self.dir, to.as_str())?;
        }
        (self.file, self.size) = open_append(&self.dir, self.base)?;
        Ok(freed)
    }

    /// Writes `bytes` at the end, without rotating.
    pub(crate) fn write(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }

    /// Appends `bytes` (whole records), rotating first if they would overflow the file.
    pub(crate) fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        if self.rotates_before(bytes.len() as u64) {
            self.rotate()?;
        }
        self.write(bytes)
    }
}

/// Opens `name` in `dir` for appending (created 0640), refusing a symlink; with its size.
fn open_append(dir: impl AsFd, name: &str) -> io::Result<(File, u64)> {
    let flags =
        OFlags::WRONLY | OFlags::APPEND | OFlags::CREATE | OFlags::NOFOLLOW | OFlags::CLOEXEC;
    let fd = rustix::fs::openat(dir, name, flags, Mode::from_raw_mode(0o640))?;
    let file = File::from(fd);
    let meta = file.metadata()?;
    if !meta.is_file() {
        return Err(io::Error::other("not a regular file"));
    }
    Ok((file, meta.len()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_refused() {
        let tmp = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink("/etc", tmp.path().join("evil")).unwrap();
        let logs = LogDir::open(tmp.path()).unwrap();
        assert!(logs.instance_dir("evil").is_err());
        let dir = logs.instance_dir("good").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("good/events.log")).unwrap();
        assert!(
            RotatingFile::open(dir, "events.log", 100, 1).is_err(),
            "O_NOFOLLOW must refuse the link"
        );
    }

    #[test]
    fn rotation_keeps_whole_records() {
        let tmp = tempfile::tempdir().unwrap();
        let logs = LogDir::open(tmp.path()).unwrap();
        let mut file =
            RotatingFile::open(logs.instance_dir("a").unwrap(), "events.log", 10, 2).unwrap();
        for record in [b"aaaaaa\n", b"bbbbbb\n", b"cccccc\n", b"dddddd\n"] {
            file.append(record).unwrap();
        }
        let path = tmp.path().join("a/events.log");
        assert_eq!(std::fs::read(&path).unwrap(), b"dddddd\n");
        assert_eq!(
            std::fs::read(path.with_extension("log.1")).unwrap(),
            b"cccccc\n"
        );
        assert_eq!(
            std::fs::read(path.with_extension("log.2")).unwrap(),
            b"bbbbbb\n"
        );
        assert!(!path.with_extension("log.3").exists());
        let mut names: Vec<String> = logs
            .files("events.log")
            .into_iter()
            .map(|f| f.file)
            .collect();
        names.sort();
        assert_eq!(names, ["events.log", "events.log.1", "events.log.2"]);
        assert_eq!(file.rotate().unwrap(), 7, "the oldest falls off");
    }

    #[test]
    fn files_of_the_folder_are_replaced_whole() {
        let tmp = tempfile::tempdir().unwrap();
        let logs = LogDir::open(tmp.path()).unwrap();
        assert_eq!(
            logs.read("state").unwrap_err().kind(),
            io::ErrorKind::NotFound
        );
        logs.replace("state", b"one").unwrap();
        logs.replace("state", b"two").unwrap();
        assert_eq!(logs.read("state").unwrap(), b"two");
        let names: Vec<_> = std::fs::read_dir(tmp.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, ["state"], "no temporary file left");
        std::os::unix::fs::symlink("/etc/passwd", tmp.path().join("link")).unwrap();
        assert!(logs.read("link").is_err(), "O_NOFOLLOW");
        let mut file =
            RotatingFile::open(logs.instance_dir("a").unwrap(), "events.log", 100, 1).unwrap();
        file.append(b"0123456789").unwrap();
        assert_eq!(logs.read_in("a", "events.log").unwrap(), b"0123456789");
        assert!(logs.read_in("a", "missing").is_err());
    }

    #[test]
    fn rotation_names() {
        assert!(is_rotation_of("console.log", "console.log"));
        assert!(is_rotation_of("console.log.3", "console.log"));
        assert!(!is_rotation_of("console.log.x", "console.log"));
        assert!(!is_rotation_of("console.logx", "console.log"));
        assert!(!is_rotation_of("events.log", "console.log"));
    }
}
