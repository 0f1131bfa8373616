//! The pinned toolchains and bpf-linker, installed on demand.
//!
//! - Host: stable [`HOST_TOOLCHAIN`] (aya 0.16 needs rustc >= 1.98).
//! - Kernel programs: [`EBPF_TOOLCHAIN`] with `rust-src` (they are built with `-Z build-std=core`
//!   for `bpfel-unknown-none`) and clippy (they are linted for that target too).
//! - [`BPF_LINKER_VERSION`] of bpf-linker, built from crates.io against the nightly's *own*
//!   libLLVM, so the linker and rustc agree on LLVM bitcode. It is kept per nightly under
//!   `$CARGO_HOME/collector-tools/`.
//!
//! Moving a pin: change the constant here (and `EBPF_TOOLCHAIN` in `collector/build.rs`), run
//! `cargo xtask test`. docs/toolchains.md says more.

use std::{
    env,
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context, bail};

pub(crate) const HOST_TOOLCHAIN: &str = "1.99.1";
pub(crate) const EBPF_TOOLCHAIN: &str = "nightly-2026-10-30";
pub(crate) const BPF_LINKER_VERSION: &str = "0.13.0";

/// Runs `cmd`, failing with its description when it does not succeed.
pub(crate) fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let status = cmd
        .status()
        .with_context(|| format!("cannot start {cmd:?}"))?;
    if !status.success() {
        bail!("{cmd:?} failed: {status}");
    }
    Ok(())
}

/// Output of `cmd`, if it ran and succeeded.
fn output(cmd: &mut Command) -> Option<String> {
    let out = cmd.output().ok()?;
    out.status
        .success()
        .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
}

pub(crate) fn cargo_home() -> PathBuf {
    env::var_os("CARGO_HOME").map_or_else(
        || PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo"),
        PathBuf::from,
    )
}

fn sysroot(toolchain: &str) -> Option<PathBuf> {
    let out = output(
        Command::new("rustc")
            .arg(format!("+{toolchain}"))
            .args(["--print", "sysroot"]),
    )?;
    Some(PathBuf::from(out.trim()))
}

/// Installs `toolchain` (with `components`) unless it is already there.
fn ensure_toolchain(
    toolchain: &str,
    components: &[&str],
    present: impl Fn(&Path) -> bool,
) -> anyhow::Result<()> {
    if sysroot(toolchain).is_some_and(|root| present(&root)) {
        return Ok(());
    }
    eprintln!("xtask: installing Rust toolchain {toolchain}");
    let mut cmd = Command::new("rustup");
    cmd.args([
        "toolchain",
        "install",
        toolchain,
        "--profile",
        "minimal",
        "--no-self-update",
    ]);
    for component in components {
        cmd.args(["--component", component]);
    }
    run(&mut cmd)
}

/// The pinned toolchains, installed if missing.
pub(crate) fn ensure_toolchains() -> anyhow::Result<()> {
    ensure_toolchain(HOST_TOOLCHAIN, &["clippy", "rustfmt"], |root| {
        root.join("bin/cargo-clippy").exists() && root.join("bin/rustfmt").exists()
    })?;
    ensure_toolchain(EBPF_TOOLCHAIN, &["rust-src", "clippy"], |root| {
        root.join("lib/rustlib/src/rust/library/core").exists()
            && root.join("bin/cargo-clippy").exists()
    })
}

/// LLVM major version of the eBPF nightly, from `rustc -vV`.
fn llvm_major() -> anyhow::Result<u32> {
    let version = output(
        Command::new("rustc")
            .arg(format!("+{EBPF_TOOLCHAIN}"))
            .arg("-vV"),
    )
    .context("rustc -vV")?;
    let llvm = version
        .lines()
        .find_map(|l| l.strip_prefix("LLVM version: "))
        .context("no LLVM version in rustc -vV")?;
    llvm.split('.')
        .next()
        .and_then(|m| m.trim().parse().ok())
        .context("bad LLVM version")
}

/// Installs bpf-linker (built against the eBPF nightly's libLLVM) if missing; returns the
/// folder to put first on PATH.
pub(crate) fn ensure_bpf_linker() -> anyhow::Result<PathBuf> {
    let root = cargo_home()
        .join("collector-tools")
        .join(format!("bpf-linker-{BPF_LINKER_VERSION}-{EBPF_TOOLCHAIN}"));
    let bin_dir = root.join("bin");
    let linker = bin_dir.join("bpf-linker");
    if output(Command::new(&linker).arg("--version"))
        .is_some_and(|v| v.contains(BPF_LINKER_VERSION))
    {
        return Ok(bin_dir);
    }
    let major = llvm_major()?;
    let sysroot = sysroot(EBPF_TOOLCHAIN).context("eBPF toolchain sysroot")?;
    // bpf-linker's build looks for `lib/libLLVM.so` under LLVM_PREFIX; the nightly ships
    // `lib/libLLVM.so.<ver>-rust-<ver>`. Point both names at it.
    let shipped = std::fs::read_dir(sysroot.join("lib"))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("libLLVM.so.") && n.contains("-rust-"))
        })
        .context("the eBPF nightly ships no libLLVM.so.*-rust-*")?;
    let prefix = root.join("llvm");
    let lib = prefix.join("lib");
    std::fs::create_dir_all(&lib)?;
    for name in [
        "libLLVM.so".to_owned(),
        shipped.file_name().unwrap().to_string_lossy().into_owned(),
    ] {
        let link = lib.join(name);
        let _ = std::fs::remove_file(&link);
        std::os::unix::fs::symlink(&shipped, &link)
            .with_context(|| format!("linking {}", link.display()))?;
    }
    eprintln!(
        "xtask: building bpf-linker {BPF_LINKER_VERSION} against LLVM {major} of {EBPF_TOOLCHAIN}"
    );
    run(Command::new("cargo")
        .arg(format!("+{EBPF_TOOLCHAIN}"))
        .args([
            "install",
            &format!("bpf-linker@{BPF_LINKER_VERSION}"),
            "--locked",
            "--force",
        ])
        .args([
            "--no-default-features",
            "--features",
            &format!("llvm-{major}"),
        ])
        .arg("--root")
        .arg(&root)
        .env("LLVM_PREFIX", &prefix))?;
    Ok(bin_dir)
}

/// PATH with `dir` first.
pub(crate) fn path_with(dir: &Path) -> std::ffi::OsString {
    let mut paths = vec![dir.to_path_buf()];
    paths.extend(env::split_paths(&env::var_os("PATH").unwrap_or_default()));
    env::join_paths(paths).expect("PATH entries are valid")
}

/// A `cargo +<host toolchain>` command with bpf-linker on PATH, run from the workspace root.
pub(crate) fn cargo(linker_dir: &Path) -> Command {
    cargo_with(HOST_TOOLCHAIN, linker_dir)
}

/// A `cargo +<toolchain>` command with bpf-linker on PATH, run from the workspace root.
pub(crate) fn cargo_with(toolchain: &str, linker_dir: &Path) -> Command {
    let mut cmd = Command::new("cargo");
    cmd.arg(format!("+{toolchain}"))
        .env("PATH", path_with(linker_dir))
        .current_dir(workspace_root());
    cmd
}

pub(crate) fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("workspace root")
        .to_path_buf()
}
