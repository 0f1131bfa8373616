//! `cargo xtask <task>`: the project's build, run and test entry points.
//!
//! Every task bootstraps what it needs first (pinned toolchains, bpf-linker), so each works on a
//! fresh machine with nothing installed by hand.

mod bench;
mod build;
mod generate;
mod kernels;
mod layers;
mod run;
mod test;
mod toolchain;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Build, run and test the compute telemetry collector")]
struct Cli {
    #[command(subcommand)]
    task: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install the pinned toolchains and bpf-linker if missing, then build the kernel programs
    /// and the collector that embeds them.
    BuildEbpf {
        /// Build in release mode.
        #[arg(long)]
        release: bool,
    },
    /// Build everything (bootstrap included) and run the collector; arguments after `--` go to
    /// `collector run`.
    Run {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The full test suite, as CI runs it: format, lints, unit and privileged integration tests,
    /// then the kernel matrix (`test-kernels`; skipped when `cargo test` arguments are given).
    Test {
        /// Extra arguments for `cargo test` (e.g. a test name filter).
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
    /// The integration tests inside each kernel of the matrix (Debian's 5.10, 6.1, 6.12 cloud
    /// kernels) under QEMU; prints a per-kernel table. Part of `test`.
    TestKernels(kernels::Options),
    /// Check the collector crate's layers: no import cycle, no upward or sibling import.
    Layers {
        /// Source folder to check (default: collector/src).
        src: Option<std::path::PathBuf>,
    },
    /// Generate the operator package's derived files: the PrometheusRule and VMRule from
    /// deploy/rules/collector.rules.yml, and the Grafana dashboards (JSON and ConfigMaps).
    Gen {
        /// Write nothing; fail if a committed file differs from what would be generated.
        #[arg(long)]
        check: bool,
    },
    /// Benchmarks (root): print a table of figures, assert nothing.
    Bench {
        #[command(subcommand)]
        bench: bench::Bench,
    },
}

fn main() -> std::process::ExitCode {
    let result = match Cli::parse().task {
        Task::BuildEbpf { release } => build::build(release).map(|_| ()),
        Task::Run { args } => run::run(&args),
        Task::Test { args } => test::test(&args),
        Task::TestKernels(options) => kernels::test_kernels(&options),
        Task::Layers { src } => layers::layers(src.as_deref()),
        Task::Gen { check } => generate::generate(check),
        Task::Bench { bench } => bench::bench(bench),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("xtask: error: {err:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
