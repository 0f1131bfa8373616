//! `collector`: the daemon and its CLI.

use std::{net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use collector::{
    api::{client, views::InstanceView},
    config::{Config, DEFAULT_LISTEN},
    daemon,
    telemetry::logging::{self, LogFormat},
};

#[derive(Parser)]
#[command(
    version,
    about = "Compute telemetry collector: eBPF probes on hypervisor processes"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the collector (needs root or CAP_BPF + CAP_PERFMON).
    Run {
        /// TOML config file (defaults work without one).
        #[arg(long)]
        config: Option<PathBuf>,
        /// Address of the HTTP server (/metrics, /healthz, /readyz, /v1).
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Folder of per-instance logs.
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Log format: text for a terminal, json in production.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Show the instances a running collector follows.
    Instances {
        /// Address of the running collector.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, the causes joined: no backtrace for a user's mistake.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    match cli.command {
        Command::Run {
            config,
            listen,
            log_dir,
            log_format,
        } => {
            let config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            logging::init(log_format);
            runtime.block_on(daemon::run(config, daemon::Overrides { listen, log_dir }))
        }
        Command::Instances { addr, json } => runtime.block_on(async {
            let body = client::get(&addr, "/v1/instances").await?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
                return Ok(());
            }
            let instances: Vec<InstanceView> =
                serde_json::from_slice(&body).context("decoding /v1/instances")?;
            print!("{}", instances_table(&instances));
            Ok(())
        }),
    }
}

fn instances_table(instances: &[InstanceView]) -> String {
    let mut rows = vec![[
        "INSTANCE_UUID".to_owned(),
        "HYPERVISOR".to_owned(),
        "PID".to_owned(),
        "VCPUS".to_owned(),
        "ORIGIN".to_owned(),
        "STARTED".to_owned(),
    ]];
    for i in instances {
        rows.push([
            i.instance_uuid.escape_debug().to_string(),
            i.hypervisor.clone(),
            i.pid.to_string(),
            i.vcpu_threads.len().to_string(),
            i.origin.clone(),
            i.start_time.clone(),
        ]);
    }
    let widths: Vec<usize> = (0..6)
        .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
        .collect();
    let mut out = String::new();
    for row in rows {
        let cells: Vec<String> = row
            .iter()
            .zip(&widths)
            .map(|(cell, w)| format!("{cell:<w$}"))
            .collect();
        out.push_str(cells.join("  ").trim_end());
        out.push('\n');
    }
    if instances.is_empty() {
        out.push_str("(no instances)\n");
    }
    out
}
