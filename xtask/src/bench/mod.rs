//! `cargo xtask bench <name>`: benchmarks that run the collector against the real kernel and
//! print a table of figures (medians over several rounds, ratios within one run) for
//! docs/benchmarks.md. One module per benchmark. They measure, and fail only when their own
//! bookkeeping does not add up (e.g. console lines captured + dropped != written).

mod console;
mod empty_programs;
mod kernel_hooks;
mod memory;
mod otlp;
mod overhead;
mod sched;

use std::{
    io::{BufRead, BufReader},
    path::Path,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Subcommand;

#[derive(Subcommand)]
pub(crate) enum Bench {
    /// Cost of the scheduling programs under a context-switch-heavy load (hackbench), with 0 and
    /// 32 followed instances, side by side with a bpftrace script computing the same histogram.
    Sched(sched::Options),
    /// Console capture: loss-free throughput, writer slowdown, write-to-API latency, and the
    /// books balancing above capacity (16 stand-in VMMs, 4 KiB writes).
    Console(console::Args),
    /// Memory: RSS, `/metrics` size and scrape time with 0, 200 and 1000 stand-in instances
    /// that printed 16 KiB of console each.
    Memory(memory::Args),
    /// What the collector costs every other task on the host: `perf bench sched pipe`,
    /// `perf bench syscall basic` and hackbench, with nothing attached, the collector, empty
    /// programs on its hooks and a bpftrace script, with 32 stand-in instances running.
    Overhead(overhead::Options),
    /// What console capture's hooks cost every task inside each kernel of the matrix, by how
    /// they attach (`fexit` on the syscall handlers, the per-syscall tracepoints, nothing).
    KernelHooks(kernel_hooks::Options),
    /// OTLP export: throughput and collector CPU per MB exported over OTLP/HTTP on loopback,
    /// from console files of stand-in instances to a sink that keeps up.
    Otlp(otlp::Args),
}

pub(crate) fn bench(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Sched(options) => sched::run(&options),
        Bench::Console(args) => console::run(&args),
        Bench::Memory(args) => memory::run(&args),
        Bench::Overhead(options) => overhead::run(&options),
        Bench::Otlp(args) => otlp::run(&args),
        Bench::KernelHooks(options) => kernel_hooks::run(&options),
    }
}

/// Builds the release collector (its kernel programs with it) and the release binaries `bins`
/// of collector-tests, into `target/release/`.
fn build_release(bins: &[&str]) -> anyhow::Result<()> {
    let linker_dir = crate::build::build(true)?;
    let mut cargo = crate::toolchain::cargo(&linker_dir);
    cargo.args(["build", "--release", "--locked", "-p", "collector-tests"]);
    for bin in bins {
        cargo.args(["--bin", bin]);
    }
    crate::toolchain::run(&mut cargo)
}

/// Installs the Debian `packages` whose `binaries` are missing from PATH.
fn ensure_debian_packages(needs: &[(&str, &str)]) -> anyhow::Result<()> {
    let missing: Vec<&str> = needs
        .iter()
        .filter(|(binary, _)| !on_path(binary))
        .map(|(_, package)| *package)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    eprintln!("xtask: installing {}", missing.join(" "));
    let apt = |args: &[&str]| -> anyhow::Result<()> {
        let status = Command::new("apt-get")
            .args(args)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .status()
            .context("apt-get")?;
        if !status.success() {
            bail!("apt-get {args:?} failed: {status}");
        }
        Ok(())
    };
    apt(&["update", "-qq"])?;
    let mut install = vec!["install", "-y", "-qq", "--no-install-recommends"];
    install.extend(&missing);
    apt(&install)
}

fn on_path(binary: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|dir| dir.join(binary).is_file()))
}

/// A GET of the collector at `addr`; the body of a 200.
fn http_get(addr: &str, path: &str) -> anyhow::Result<String> {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(10)))
        .build()
        .into();
    agent
        .get(format!("http://{addr}{path}"))
        .call()
        .with_context(|| format!("GET {path}"))?
        .body_mut()
        .with_config()
        .limit(256 << 20)
        .read_to_string()
        .with_context(|| format!("GET {path}: reading the body"))
}

/// Median of `values` (NaN when empty).
fn median(values: &[f64]) -> f64 {
    let mut sorted: Vec<f64> = values.iter().copied().filter(|v| v.is_finite()).collect();
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted.sort_by(f64::total_cmp);
    let mid = sorted.len() / 2;
    if sorted.len().is_multiple_of(2) {
        f64::midpoint(sorted[mid - 1], sorted[mid])
    } else {
        sorted[mid]
    }
}

/// A child process killed and reaped when dropped.
pub(super) struct Guard(pub(super) Child);

impl Drop for Guard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

pub(super) fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status").is_ok_and(|s| {
        s.lines()
            .find_map(|l| l.strip_prefix("Uid:"))
            .and_then(|v| v.split_whitespace().nth(1))
            == Some("0")
    })
}

pub(super) fn wait_until(timeout: Duration, mut done: impl FnMut() -> bool) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    while !done() {
        if Instant::now() > deadline {
            bail!("timed out after {timeout:?}");
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(())
}

/// The value of the sample `series` (name and labels as served) in an exposition.
pub(super) fn metric(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

/// Mounts tracefs where the kernel's tracepoint ids are read, if it is not there (bpftrace's
/// classic tracepoints and the empty programs need it).
fn ensure_tracefs() -> anyhow::Result<()> {
    if Path::new("/sys/kernel/tracing/events").exists() {
        return Ok(());
    }
    crate::toolchain::run(Command::new("mount").args([
        "-t",
        "tracefs",
        "nodev",
        "/sys/kernel/tracing",
    ]))
}

/// Starts bpftrace on `script` and waits until its probes are attached ("Attaching N
/// probes..."); its further output is drained so that it never blocks on a full pipe.
pub(super) fn start_bpftrace(script: &Path) -> anyhow::Result<Guard> {
    let mut child = Guard(
        Command::new("bpftrace")
            .arg(script)
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .context("bpftrace")?,
    );
    let stdout = child.0.stdout.take().context("bpftrace stdout")?;
    let mut lines = BufReader::new(stdout).lines();
    match lines.next() {
        Some(Ok(line)) if line.starts_with("Attaching") => {}
        other => bail!("bpftrace did not start: {other:?}"),
    }
    std::thread::spawn(move || lines.for_each(drop));
    Ok(child)
}

#[cfg(test)]
mod tests {
    use super::median;

    #[test]
    fn medians() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
        assert_eq!(median(&[4.0, 1.0, 2.0, 3.0]), 2.5);
        assert!(median(&[]).is_nan());
        assert_eq!(median(&[f64::NAN, 1.0]), 1.0);
    }
}
