//! `cargo xtask bench kernel-hooks [--kernel VERSION]...`: what console capture's hooks cost
//! every task of each kernel of the matrix, by how they attach: `fexit` on the syscall
//! handlers (where the kernel allows it) against the per-syscall tracepoints (which put every
//! task on the syscall-tracing slow path), against nothing attached, and against empty programs
//! on the `fexit` collector's hooks (the floor of any program there).
//!
//! Inside each kernel-matrix guest (QEMU, TCG: figures are slow in absolute terms; compare the
//! ratios within one kernel) `syscall-cost` (tests/src/bin/syscall_cost.rs) interleaves the
//! modes round by round: a pipe ping-pong between two threads, a `getppid` loop, and the CPU
//! time of 4 KiB console writes, by a stand-in VMM the collector follows (each write captured)
//! and by one it does not. The collector in the guest is the debug build the matrix uses: for
//! the pipe and `getppid` it follows nothing, so its userspace is idle and what the loads pay
//! is the hooks' cost to a task it does not follow.
//!
//! `--host` (or `--host-only`) runs the same binary on this machine's kernel too, with release
//! builds, first in the tables.

use std::fmt::Write as _;

use anyhow::Context as _;

use super::median;
use crate::kernels::{self, report::KernelRun};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Also on this machine's kernel, with release builds (first in the tables).
    #[arg(long)]
    host: bool,
    /// Only on this machine's kernel (`--host` without the guests).
    #[arg(long, conflicts_with = "kernels")]
    host_only: bool,
    /// A kernel of the matrix, by version or prefix; repeatable. Default: all of them.
    #[arg(long = "kernel", value_name = "VERSION")]
    kernels: Vec<String>,
    /// Rounds; each measures every mode once.
    #[arg(long, default_value_t = 5)]
    rounds: u32,
    /// Round trips of the pipe ping-pong per measurement.
    #[arg(long, default_value_t = 20_000)]
    pipe_loops: u32,
    /// `getppid` calls per measurement.
    #[arg(long, default_value_t = 1_000_000)]
    syscall_loops: u32,
    /// 4 KiB writes per writer per measurement (0.83 MiB/s: 512 take about 2.4 s).
    #[arg(long, default_value_t = 512)]
    writes: u32,
}

/// The modes `syscall-cost` measures, in table order.
const MODES: [&str; 6] = [
    "nothing",
    "syscall_tracepoints",
    "syscall_tracepoints_wake_each",
    "fexit",
    "fexit_wake_each",
    "empty_fexit",
];

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let mut args: Vec<String> = vec!["--modes".to_owned(), MODES.join(",")];
    args.extend(
        [
            ("--rounds", options.rounds),
            ("--pipe-loops", options.pipe_loops),
            ("--syscall-loops", options.syscall_loops),
            ("--writes", options.writes),
        ]
        .iter()
        .flat_map(|(flag, value)| [(*flag).to_owned(), value.to_string()]),
    );
    let mut runs = Vec::new();
    if options.host || options.host_only {
        runs.push(on_this_host(&args)?);
    }
    if !options.host_only {
        runs.extend(kernels::run_in_guests(
            &options.kernels,
            |_| kernels::bench_plan_archive(&args),
            |run| eprintln!("xtask: {}: guest done in {:.0} s", run.version, run.seconds),
        )?);
    }
    println!("\n{}", table(&runs, options));
    println!("\n{}", write_table(&runs, options));
    for run in &runs {
        // The bench runs no tests; anything else that went wrong in the guest is shown.
        for failure in run.failures().iter().filter(|f| *f != "no test ran") {
            eprintln!("xtask: {}: {failure}", run.version);
        }
    }
    Ok(())
}

/// `syscall-cost` on this machine's kernel, with the release collector and stand-in, read as a
/// guest's run is.
fn on_this_host(args: &[String]) -> anyhow::Result<KernelRun> {
    anyhow::ensure!(
        super::is_root(),
        "--host needs root (it loads BPF programs)"
    );
    super::build_release(&["standin-vmm", "syscall-cost"])?;
    let release = crate::toolchain::workspace_root().join("target/release");
    eprintln!("xtask: syscall-cost on this host");
    let output = std::process::Command::new(release.join("syscall-cost"))
        .args(args)
        .env("COLLECTOR_BIN", release.join("collector"))
        .env("STANDIN_VMM_BIN", release.join("standin-vmm"))
        .stderr(std::process::Stdio::inherit())
        .output()
        .context("running syscall-cost")?;
    anyhow::ensure!(output.status.success(), "syscall-cost: {}", output.status);
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    let mut run = KernelRun {
        version: format!("host {}", kernel.trim()),
        ..KernelRun::default()
    };
    for line in String::from_utf8_lossy(&output.stdout).lines() {
        let words: Vec<&str> = line.split(' ').collect();
        if let ["bench", mode, figure, value @ ..] = words.as_slice() {
            run.bench
                .push(((*mode).to_owned(), (*figure).to_owned(), value.join(" ")));
        }
    }
    Ok(run)
}

/// The median of figure `name` of `mode` in `run`.
fn figure(run: &KernelRun, mode: &str, name: &str) -> Option<f64> {
    let values: Vec<f64> = run
        .bench
        .iter()
        .filter(|(m, f, _)| m == mode && f == name)
        .filter_map(|(_, _, v)| v.parse().ok())
        .collect();
    (!values.is_empty()).then(|| median(&values))
}

/// What a 4 KiB console write costs its writer, followed (captured) or not, per kernel and mode.
fn write_table(runs: &[KernelRun], options: &Options) -> String {
    let mut out = format!(
        "{} rounds, medians; µs of the writer's CPU per 4 KiB write ({} writes per \
         measurement); *captured*: the lowest share of the followed writer's bytes the collector \
         counted in any round; *over nothing*: µs more than with nothing attached\n\n\
         | kernel | mode | followed write µs | over nothing | captured | untracked write µs | over nothing |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n",
        options.rounds, options.writes
    );
    for run in runs {
        let base = |name: &str| figure(run, "nothing", name);
        for mode in MODES {
            let cell = |name: &str| {
                let value = figure(run, mode, name);
                let shown = value.map_or_else(|| "-".to_owned(), |v| format!("{v:.2}"));
                let over = match (value, base(name)) {
                    (Some(v), Some(b)) if mode != "nothing" => format!("{:+.2}", v - b),
                    _ => "-".to_owned(),
                };
                (shown, over)
            };
            let (followed, followed_over) = cell("write_us");
            let (untracked, untracked_over) = cell("untracked_write_us");
            let captured = run
                .bench
                .iter()
                .filter(|(m, f, _)| m == mode && f == "write_captured")
                .filter_map(|(_, _, v)| v.parse::<f64>().ok())
                .reduce(f64::min)
                .map_or_else(|| "-".to_owned(), |p| format!("{p:.1}%"));
            let _ = writeln!(
                out,
                "| {} | {mode} | {followed} | {followed_over} | {captured} | {untracked} | {untracked_over} |",
                run.release.as_deref().unwrap_or(&run.version),
            );
        }
    }
    out
}

/// Medians of each figure, per kernel and mode, with the ratio to `nothing`.
fn table(runs: &[KernelRun], options: &Options) -> String {
    let mut out = format!(
        "{} rounds, medians; pipe: µs per round trip ({} per measurement), getppid: ns per call \
         ({} per measurement)\n\n\
         *x empty*: what the mode adds to a pipe round trip over nothing, in multiples of what \
         empty programs on the `fexit` collector's hooks add\n\n\
         | kernel | mode | hooks attached | pipe µs | vs nothing | x empty | getppid ns | vs nothing |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
        options.rounds, options.pipe_loops, options.syscall_loops
    );
    for run in runs {
        let figure = |mode: &str, name: &str| figure(run, mode, name);
        let base_pipe = figure("nothing", "pipe_us");
        let base_getppid = figure("nothing", "getppid_ns");
        let ratio = |value: Option<f64>, base: Option<f64>| match (value, base) {
            (Some(v), Some(b)) if b > 0.0 => format!("{:+.1}%", (v / b - 1.0) * 100.0),
            _ => "-".to_owned(),
        };
        for mode in MODES {
            let note = |name: &str| {
                run.bench
                    .iter()
                    .find(|(m, f, _)| m == mode && f == name)
                    .map(|(_, _, v)| v.clone())
            };
            let hooks = match (mode, note("hooks"), note("refused")) {
                ("nothing", ..) => "-".to_owned(),
                (_, Some(n), _) => n,
                (_, None, Some(why)) => format!("refused: {why}"),
                _ => "?".to_owned(),
            };
            let pipe = figure(mode, "pipe_us");
            let getppid = figure(mode, "getppid_ns");
            let show = |v: Option<f64>, digits: usize| {
                v.map_or_else(|| "-".to_owned(), |v| format!("{v:.digits$}"))
            };
            let empty_cost = figure("empty_fexit", "pipe_us")
                .zip(base_pipe)
                .map(|(e, b)| e - b);
            let times_empty = match (pipe, base_pipe, empty_cost) {
                (Some(p), Some(b), Some(e)) if mode != "nothing" && e > 0.0 => {
                    format!("{:.1}x", (p - b) / e)
                }
                _ => "-".to_owned(),
            };
            let _ = writeln!(
                out,
                "| {} | {mode} | {hooks} | {} | {} | {times_empty} | {} | {} |",
                run.release.as_deref().unwrap_or(&run.version),
                show(pipe, 2),
                if mode == "nothing" {
                    "-".to_owned()
                } else {
                    ratio(pipe, base_pipe)
                },
                show(getppid, 1),
                if mode == "nothing" {
                    "-".to_owned()
                } else {
                    ratio(getppid, base_getppid)
                },
            );
        }
    }
    out
}
