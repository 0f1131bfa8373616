//! `cargo xtask build-ebpf`: bootstrap, then build the kernel programs and the collector.

use std::{path::PathBuf, time::Instant};

use crate::toolchain;

/// Bootstraps and builds; returns the folder holding bpf-linker (for later cargo calls).
pub(crate) fn build(release: bool) -> anyhow::Result<PathBuf> {
    let started = Instant::now();
    toolchain::ensure_toolchains()?;
    let linker_dir = toolchain::ensure_bpf_linker()?;
    let mut cargo = toolchain::cargo(&linker_dir);
    cargo.args(["build", "--locked", "--package", "collector"]);
    if release {
        cargo.arg("--release");
    }
    toolchain::run(&mut cargo)?;
    eprintln!(
        "xtask: build-ebpf done in {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(linker_dir)
}
