//! `cargo xtask gen`: the operator package's generated files, from their one source each.
//!
//! - deploy/rules/collector.rules.yml -> deploy/base/prometheusrule.yaml and vmrule.yaml
//!   ([`rules`]): the rule file's groups become the object's `spec`, byte for byte.
//! - the dashboards defined in [`dashboards`] -> deploy/dashboards/*.json and one ConfigMap each
//!   for Grafana's dashboard sidecar, deploy/base/dashboard-*.yaml.
//!
//! `cargo xtask gen --check` writes nothing and fails when a committed file differs from what
//! would be generated; the unit test below does the same, so `cargo xtask test` catches a
//! hand-edited or stale file.

mod dashboards;
mod rules;

use std::path::{Path, PathBuf};

use anyhow::{Context, bail};

use crate::toolchain;

/// Every generated file: path relative to the workspace root, and its content.
pub(crate) fn files(root: &Path) -> anyhow::Result<Vec<(PathBuf, String)>> {
    let source = std::fs::read_to_string(root.join(rules::SOURCE))
        .with_context(|| format!("reading {}", rules::SOURCE))?;
    let mut files = rules::manifests(&source)?;
    files.extend(dashboards::files()?);
    Ok(files)
}

/// Paths (relative to `root`) whose committed content differs from the generated one.
pub(crate) fn stale(root: &Path) -> anyhow::Result<Vec<PathBuf>> {
    Ok(files(root)?
        .into_iter()
        .filter(|(path, content)| {
            std::fs::read_to_string(root.join(path)).ok().as_deref() != Some(content.as_str())
        })
        .map(|(path, _)| path)
        .collect())
}

pub(crate) fn generate(check: bool) -> anyhow::Result<()> {
    let root = toolchain::workspace_root();
    if check {
        let stale = stale(&root)?;
        if !stale.is_empty() {
            bail!("generated files out of date (run `cargo xtask gen`): {stale:?}");
        }
        return Ok(());
    }
    for (path, content) in files(&root)? {
        let full = root.join(&path);
        if std::fs::read_to_string(&full).ok().as_deref() == Some(content.as_str()) {
            continue;
        }
        if let Some(dir) = full.parent() {
            std::fs::create_dir_all(dir)?;
        }
        std::fs::write(&full, content).with_context(|| format!("writing {}", path.display()))?;
        println!("xtask: wrote {}", path.display());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_files_are_current() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let stale = stale(&root).unwrap();
        assert!(
            stale.is_empty(),
            "generated files differ from the committed ones (run `cargo xtask gen`): {stale:?}"
        );
    }
}
