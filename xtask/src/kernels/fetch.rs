//! The pinned Debian cloud kernels: downloaded once with `apt-get download` from a private
//! sources list (the system's lists and cache are never read or written), unpacked with
//! `dpkg-deb -x`, and kept as `vmlinuz` (and its `config`) under
//! `$CARGO_HOME/collector-tools/kernels/<version>/`.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

use crate::toolchain;

/// One kernel of the matrix.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct KernelSpec {
    /// Upstream version, the name `--kernel` takes (a prefix such as `6.1` selects it too).
    pub(crate) version: &'static str,
    /// Debian's package: the cloud flavour, unsigned (the same image, without the signature).
    pub(crate) package: &'static str,
    pub(crate) deb_version: &'static str,
    /// `debian` or `debian-security`, and the suite there.
    pub(crate) archive: &'static str,
    pub(crate) suite: &'static str,
}

/// The matrix, oldest first. 5.10 comes from bullseye main: bullseye-security lists newer
/// 5.10.0-4x debs that the mirror no longer serves.
pub(crate) const KERNELS: &[KernelSpec] = &[
    KernelSpec {
        version: "5.10.223",
        package: "linux-image-5.10.0-32-cloud-amd64-unsigned",
        deb_version: "5.10.223-1",
        archive: "debian",
        suite: "bullseye",
    },
    KernelSpec {
        version: "6.1.192",
        package: "linux-image-6.1.0-57-cloud-amd64-unsigned",
        deb_version: "6.1.192-3",
        archive: "debian-security",
        suite: "bookworm-security",
    },
    KernelSpec {
        version: "6.12.118",
        package: "linux-image-6.12.118+deb13-cloud-amd64-unsigned",
        deb_version: "6.12.118-1",
        archive: "debian-security",
        suite: "trixie-security",
    },
];

/// The kernels `--kernel` names (each a version or a prefix of one); all without a name.
pub(crate) fn select(names: &[String]) -> anyhow::Result<Vec<KernelSpec>> {
    if names.is_empty() {
        return Ok(KERNELS.to_vec());
    }
    let mut chosen = Vec::new();
    for name in names {
        let found: Vec<&KernelSpec> = KERNELS
            .iter()
            .filter(|k| k.version == name || k.version.starts_with(&format!("{name}.")))
            .collect();
        match found.as_slice() {
            [one] if !chosen.contains(*one) => chosen.push(**one),
            [_] => {}
            _ => bail!(
                "--kernel {name}: not in the matrix (one of {})",
                KERNELS
                    .iter()
                    .map(|k| k.version)
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        }
    }
    Ok(chosen)
}

/// `$CARGO_HOME/collector-tools/kernels`.
pub(crate) fn cache_root() -> PathBuf {
    toolchain::cargo_home()
        .join("collector-tools")
        .join("kernels")
}

/// The cached kernel image of `spec`, downloading it first if missing.
pub(crate) fn vmlinuz(spec: &KernelSpec) -> anyhow::Result<PathBuf> {
    let dir = cache_root().join(spec.version);
    let image = dir.join("vmlinuz");
    if image.exists() {
        return Ok(image);
    }
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let apt = Apt::new(&cache_root().join("apt"), spec)?;
    let started = std::time::Instant::now();
    let work = dir.join("download");
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work)?;
    eprintln!(
        "xtask: downloading {}={} ({} {})",
        spec.package, spec.deb_version, spec.archive, spec.suite
    );
    toolchain::run(
        apt.command()
            .arg("download")
            .arg(format!("{}={}", spec.package, spec.deb_version))
            .current_dir(&work),
    )?;
    let deb = std::fs::read_dir(&work)?
        .flatten()
        .map(|e| e.path())
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .context("apt-get download left no .deb")?;
    let root = work.join("root");
    toolchain::run(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(&root))?;
    let boot = root.join("boot");
    let find = |prefix: &str| -> anyhow::Result<PathBuf> {
        std::fs::read_dir(&boot)?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with(prefix))
            })
            .with_context(|| format!("{prefix}* missing from {}", deb.display()))
    };
    std::fs::rename(find("config-")?, dir.join("config"))?;
    // The image last: its presence says the cache entry is complete.
    std::fs::rename(find("vmlinuz-")?, &image)?;
    std::fs::remove_dir_all(&work)?;
    eprintln!(
        "xtask: {} downloaded and unpacked in {:.1} s",
        spec.version,
        started.elapsed().as_secs_f64()
    );
    Ok(image)
}

/// apt with a sources list, lists and cache of its own, so the system's are left alone.
struct Apt {
    options: Vec<String>,
}

impl Apt {
    /// Writes the sources list for `spec`'s suite and updates its lists.
    fn new(dir: &Path, spec: &KernelSpec) -> anyhow::Result<Self> {
        let state = dir.join(spec.suite);
        let lists = state.join("lists");
        let cache = state.join("cache");
        std::fs::create_dir_all(lists.join("partial"))?;
        std::fs::create_dir_all(cache.join("archives/partial"))?;
        let sources = state.join("sources.list");
        std::fs::write(
            &sources,
            format!(
                "deb [signed-by=/usr/share/keyrings/debian-archive-keyring.gpg] \
                 http://deb.debian.org/{} {} main\n",
                spec.archive, spec.suite
            ),
        )?;
        let path = |p: &Path| p.display().to_string();
        let apt = Self {
            options: vec![
                format!("Dir::Etc::SourceList={}", path(&sources)),
                "Dir::Etc::SourceParts=/dev/null".to_owned(),
                format!("Dir::State::Lists={}", path(&lists)),
                format!("Dir::Cache={}", path(&cache)),
                // apt's sandbox user cannot write into $CARGO_HOME.
                "APT::Sandbox::User=root".to_owned(),
            ],
        };
        toolchain::run(apt.command().args(["update", "-qq"]))?;
        Ok(apt)
    }

    /// `apt-get` with the private options; the caller adds the command.
    fn command(&self) -> Command {
        let mut cmd = Command::new("apt-get");
        for option in &self.options {
            cmd.arg("-o").arg(option);
        }
        cmd
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selects_by_version_or_prefix() {
        let names = |v: &[&str]| v.iter().map(|s| (*s).to_owned()).collect::<Vec<_>>();
        assert_eq!(select(&[]).unwrap().len(), KERNELS.len());
        assert_eq!(select(&names(&["6.1"])).unwrap()[0].version, "6.1.192");
        assert_eq!(
            select(&names(&["6.12.118"])).unwrap()[0].version,
            "6.12.118"
        );
        assert_eq!(select(&names(&["5.10", "5.10.223"])).unwrap().len(), 1);
        assert!(select(&names(&["6"])).is_err(), "ambiguous");
        assert!(select(&names(&["4.19"])).is_err());
    }
}
