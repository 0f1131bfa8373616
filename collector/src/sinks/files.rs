//! Per-instance files under the log folder besides the console log (the lifecycle events file):
//! size-rotated, append-only, opened with `O_NOFOLLOW` under folders that must not be symlinks.
//! Folder names come from [`dir_name`], the same as the console logs', so an instance's files
//! sit together.

use super::logs::names::dir_name;
use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// `root/<dir_name(id)>` (the folder the console log of `id` is in), created if missing;
/// refuses a symlink in its place.
pub fn instance_dir(root: &Path, id: &str) -> io::Result<PathBuf> {
    let dir = root.join(dir_name(id));
    match fs::symlink_metadata(&dir) {
        Ok(meta) if meta.file_type().is_dir() => Ok(dir),
        Ok(_) => Err(io::Error::other(format!(
            "{} exists and is not a folder",
            dir.display()
        ))),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            fs::create_dir_all(&dir)?;
            Ok(dir)
        }
        Err(e) => Err(e),
    }
}

/// An append-only file rotated by size: `name`, `name.1`, ... `name.<keep>`.
#[derive(Debug)]
pub struct RotatingFile {
    path: PathBuf,
    max_bytes: u64,
    keep: u32,
    file: Option<File>,
    size: u64,
}

impl RotatingFile {
    pub fn new(path: PathBuf, max_bytes: u64, keep: u32) -> Self {
        Self {
            path,
            max_bytes,
            keep,
            file: None,
            size: 0,
        }
    }

    fn open(&mut self) -> io::Result<&mut File> {
        if self.file.is_none() {
            let file = OpenOptions::new()
                .create(true)
                .append(true)
                .custom_flags(libc::O_NOFOLLOW | libc::O_CLOEXEC)
                .open(&self.path)?;
            self.size = file.metadata()?.len();
            self.file = Some(file);
        }
        Ok(self.file.as_mut().expect("opened above"))
    }

    fn rotate(&mut self) -> io::Result<()> {
        self.file = None;
        for n in (1..self.keep).rev() {
            let from = self.path.with_extension(format!("log.{n}"));
            if from.exists() {
                fs::rename(&from, self.path.with_extension(format!("log.{}", n + 1)))?;
            }
        }
        if self.keep == 0 {
            fs::remove_file(&self.path)?;
        } else {
            fs::rename(&self.path, self.path.with_extension("log.1"))?;
        }
        Ok(())
    }

    /// Appends `bytes` (one whole record), rotating first if it would overflow the file.
    pub fn append(&mut self, bytes: &[u8]) -> io::Result<()> {
        self.open()?;
        if self.size > 0 && self.size + bytes.len() as u64 > self.max_bytes {
            self.rotate()?;
            self.open()?;
        }
        let file = self.file.as_mut().expect("opened above");
        file.write_all(bytes)?;
        self.size += bytes.len() as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn symlinks_are_refused() {
        let root = tempfile_dir();
        std::os::unix::fs::symlink("/etc", root.join("evil")).unwrap();
        assert!(instance_dir(&root, "evil").is_err());
        let dir = instance_dir(&root, "good").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", dir.join("events.log")).unwrap();
        let mut file = RotatingFile::new(dir.join("events.log"), 100, 1);
        assert!(
            file.append(b"x\n").is_err(),
            "O_NOFOLLOW must refuse the link"
        );
        fs::remove_dir_all(root).unwrap();
    }

    #[test]
    fn rotation_keeps_whole_records() {
        let root = tempfile_dir();
        let path = root.join("events.log");
        let mut file = RotatingFile::new(path.clone(), 10, 2);
        for record in [b"aaaaaa\n", b"bbbbbb\n", b"cccccc\n", b"dddddd\n"] {
            file.append(record).unwrap();
        }
        assert_eq!(fs::read(&path).unwrap(), b"dddddd\n");
        assert_eq!(fs::read(path.with_extension("log.1")).unwrap(), b"cccccc\n");
        assert_eq!(fs::read(path.with_extension("log.2")).unwrap(), b"bbbbbb\n");
        assert!(!path.with_extension("log.3").exists());
        fs::remove_dir_all(root).unwrap();
    }

    fn tempfile_dir() -> PathBuf {
        static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let n = N.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("files-test-{}-{n}", std::process::id()));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).unwrap();
        dir
    }
}
