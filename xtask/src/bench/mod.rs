//! `cargo xtask bench <name>`: benchmarks that run the release collector against the real
//! kernel. One module per benchmark; each prints its figures as a Markdown table for
//! docs/benchmarks.md.

mod console;

use clap::Subcommand;

#[derive(Subcommand)]
pub enum Bench {
    /// Console capture: loss-free throughput, writer slowdown, write-to-API latency, and the
    /// books balancing above capacity (16 stand-in VMMs, 4 KiB writes).
    Console(console::Args),
}

pub fn bench(bench: Bench) -> anyhow::Result<()> {
    match bench {
        Bench::Console(args) => console::run(&args),
    }
}
