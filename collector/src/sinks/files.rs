//! Per-instance files under the log folder: safe names and size-rotated append-only files.
//!
//! Instance ids come from command lines, so they are hostile input: an id becomes one path
//! component with every byte outside `[A-Za-z0-9._-]` percent-encoded (so `/` can never appear
//! and `..` cannot be a whole component), and files are opened with `O_NOFOLLOW` under folders
//! that must not be symlinks.

use std::{
    fs::{self, File, OpenOptions},
    io::{self, Write},
    os::unix::fs::OpenOptionsExt,
    path::{Path, PathBuf},
};

/// The folder name for instance `id`: a single, safe path component, distinct for distinct ids.
pub fn instance_dir_name(id: &str) -> String {
    let mut name = String::with_capacity(id.len());
    for byte in id.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' => name.push(byte as char),
            // A dot is kept inside a name but never leads one (no ".", "..", hidden files).
            b'.' if !name.is_empty() => name.push('.'),
            _ => name.push_str(&format!("%{byte:02X}")),
        }
    }
    if name.is_empty() {
        name.push('%');
    }
    name
}

/// `root/<instance_dir_name(id)>`, created if missing; refuses a symlink in its place.
pub fn instance_dir(root: &Path, id: &str) -> io::Result<PathBuf> {
    let dir = root.join(instance_dir_name(id));
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
    fn hostile_ids_stay_one_component() {
        let cases = [
            (
                "7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11",
                "7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11",
            ),
            ("../../etc", "%2E.%2F..%2Fetc"),
            ("..", "%2E."),
            (".", "%2E"),
            ("", "%"),
            ("a/b", "a%2Fb"),
            ("web 1", "web%201"),
            ("vm.log", "vm.log"),
            ("é", "%C3%A9"),
        ];
        for (id, want) in cases {
            let name = instance_dir_name(id);
            assert_eq!(name, want, "{id:?}");
            assert!(!name.contains('/') && name != "." && name != "..");
        }
        // Distinct ids, distinct folders.
        assert_ne!(instance_dir_name("a%2Fb"), instance_dir_name("a/b"));
    }

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
