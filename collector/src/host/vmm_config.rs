//! A VMM's configuration file, read from the host.

use std::path::PathBuf;

use crate::matching::allocation::ConfigFile;

/// The path of `file` as seen from the collector, for the VMM with pid `pid`.
pub(crate) fn path(pid: u32, file: &ConfigFile) -> PathBuf {
    match file {
        ConfigFile::Absolute(path) | ConfigFile::InInstanceDir(path) => path.clone(),
        ConfigFile::RelativeToCwd(path) => PathBuf::from(format!("/proc/{pid}/cwd")).join(path),
    }
}

/// The text of the VMM's config file, if it can be read.
pub(crate) fn read(pid: u32, file: &ConfigFile) -> Option<String> {
    std::fs::read_to_string(path(pid, file)).ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_relative_to_the_vmm() {
        let me = std::process::id();
        let text = read(me, &ConfigFile::RelativeToCwd("Cargo.toml".into())).expect("readable");
        assert!(text.contains("[package]"));
        assert_eq!(
            read(me, &ConfigFile::Absolute("/nonexistent/vmm.json".into())),
            None
        );
    }
}
