//! `cargo xtask run`: build (release), then run the collector in the foreground.

use std::os::unix::process::CommandExt;

use anyhow::Context;

use crate::{build, toolchain};

pub(crate) fn run(args: &[String]) -> anyhow::Result<()> {
    build::build(true)?;
    let binary = toolchain::workspace_root().join("target/release/collector");
    let mut cmd = std::process::Command::new(&binary);
    cmd.arg("run").args(args);
    // Replace this process so signals (Ctrl-C, SIGTERM) reach the collector directly.
    let err = cmd.exec();
    Err(err).with_context(|| format!("cannot start {}", binary.display()))
}
