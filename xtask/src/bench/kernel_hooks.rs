//! `cargo xtask bench kernel-hooks [--kernel VERSION]...`: what console capture's hooks cost
//! every task of each kernel of the matrix, by how they attach: `fexit` on the syscall
//! handlers (where the kernel allows it) against the per-syscall tracepoints (which put every
//! task on the syscall-tracing slow path), against nothing attached, and against empty programs
//! on the `fexit` collector's hooks (the floor of any program there).
//!
//! Inside each kernel-matrix guest (QEMU, TCG: figures are slow in absolute terms; compare the
//! ratios within one kernel) `syscall-cost` (tests/src/bin/syscall_cost.rs) interleaves the
//! modes round by round: a pipe ping-pong between two threads and a `getppid` loop. The
//! collector in the guest is the debug build the matrix uses, following nothing: its
//! userspace is idle, and what the loads pay is the hooks' cost to a task it does not follow.

use std::fmt::Write as _;

use super::median;
use crate::kernels::{self, report::KernelRun};

#[derive(clap::Args)]
pub(crate) struct Options {
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
}

/// The modes `syscall-cost` measures, in table order.
const MODES: [&str; 4] = ["nothing", "syscall_tracepoints", "fexit", "empty_fexit"];

pub(crate) fn run(options: &Options) -> anyhow::Result<()> {
    let args: Vec<String> = [
        ("--rounds", options.rounds),
        ("--pipe-loops", options.pipe_loops),
        ("--syscall-loops", options.syscall_loops),
    ]
    .iter()
    .flat_map(|(flag, value)| [(*flag).to_owned(), value.to_string()])
    .collect();
    let runs = kernels::run_in_guests(
        &options.kernels,
        |_| kernels::bench_plan_archive(&args),
        |run| eprintln!("xtask: {}: guest done in {:.0} s", run.version, run.seconds),
    )?;
    println!("\n{}", table(&runs, options));
    for run in &runs {
        // The bench runs no tests; anything else that went wrong in the guest is shown.
        for failure in run.failures().iter().filter(|f| *f != "no test ran") {
            eprintln!("xtask: {}: {failure}", run.version);
        }
    }
    Ok(())
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
        let figure = |mode: &str, name: &str| -> Option<f64> {
            let values: Vec<f64> = run
                .bench
                .iter()
                .filter(|(m, f, _)| m == mode && f == name)
                .filter_map(|(_, _, v)| v.parse().ok())
                .collect();
            (!values.is_empty()).then(|| median(&values))
        };
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
