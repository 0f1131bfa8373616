//! The command line: `collector run` (the daemon) and the commands that read a running
//! collector's API.

mod check_logs;
mod client;
mod identities;
mod visible;

use std::{io::Write, net::SocketAddr, path::PathBuf, process::ExitCode};

use anyhow::Context;
use clap::{Parser, Subcommand};
use percent_encoding::{AsciiSet, NON_ALPHANUMERIC, utf8_percent_encode};

use crate::{
    api::views::InstanceView,
    config::{Config, DEFAULT_LISTEN},
    model::console::LogRecordView,
    runtime::{
        self,
        logging::{self, LogFormat},
    },
};

/// What a query value keeps unencoded: RFC 3986's unreserved characters.
const QUERY_VALUE: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');

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
        /// Address of the HTTP server for every route (/metrics, /healthz, /readyz, /v1);
        /// loopback unless --allow-unauthenticated-remote-api [default: 127.0.0.1:9478].
        #[arg(long)]
        listen: Option<SocketAddr>,
        /// Address of a server for /metrics, /healthz and /readyz only (/v1 is 404 there).
        #[arg(long)]
        metrics_listen: Option<SocketAddr>,
        /// Unix socket serving every route, /v1 included (mode api_socket_mode, 0600 by
        /// default); the CLI reaches it with --addr unix:PATH.
        #[arg(long)]
        api_socket: Option<PathBuf>,
        /// Let --listen be a non-loopback address although /v1 has no authentication there.
        #[arg(long)]
        allow_unauthenticated_remote_api: bool,
        /// Address of the remote API: /v1 (and /healthz, /readyz) for remote readers, each
        /// request with a bearer token reviewed by the Kubernetes API server (TokenReview,
        /// SubjectAccessReview). Needs the Kubernetes client configuration and the node name.
        #[arg(long)]
        api_listen: Option<SocketAddr>,
        /// PEM certificate chain of --api-listen (TLS, with --api-tls-key-file).
        #[arg(long, requires = "api_tls_key_file")]
        api_tls_cert_file: Option<PathBuf>,
        /// PEM private key of --api-tls-cert-file.
        #[arg(long, requires = "api_tls_cert_file")]
        api_tls_key_file: Option<PathBuf>,
        /// This node's name, for the Kubernetes source and the remote API (default: the
        /// NODE_NAME environment variable).
        #[arg(long)]
        node_name: Option<String>,
        /// Folder of per-instance logs.
        #[arg(long)]
        log_dir: Option<PathBuf>,
        /// Log format: text for a terminal, json in production.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Print an instance's console lines from a running collector (like `kubectl logs`).
    Logs {
        /// The instance's id.
        uuid: String,
        /// Keep printing new lines until the instance exits.
        #[arg(short, long)]
        follow: bool,
        /// Only the last N lines of what the collector kept.
        #[arg(long)]
        tail: Option<usize>,
        /// Only lines from this time on (RFC 3339).
        #[arg(long)]
        since: Option<String>,
        /// Only this stream: stdout, stderr or console.
        #[arg(long)]
        stream: Option<String>,
        /// Print the NDJSON records instead of the text.
        #[arg(long)]
        json: bool,
        /// Print the guest's bytes as they are, control bytes and escape sequences included
        /// (by default they are shown visibly: `^[`, `\x00`).
        #[arg(long)]
        raw: bool,
        /// Address of the running collector: HOST:PORT, or unix:PATH for its API socket.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        addr: String,
    },
    /// Show the instances a running collector follows.
    Instances {
        /// Address of the running collector: HOST:PORT, or unix:PATH for its API socket.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        addr: String,
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
    },
    /// Check JSON log lines against the compute logging convention
    /// (docs/conventions/logging.md); prints each violation with its line number, exits 1 if any.
    CheckLogs {
        /// File of log lines, or `-` for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
    },
    /// Print the identity updates (created, changed, deleted, synced) the Kubernetes source sees
    /// for this node's Pods, one JSON object a line, until interrupted.
    Identities {
        /// TOML config file (its [kubernetes] table).
        #[arg(long)]
        config: Option<PathBuf>,
        /// This node's name (default: the NODE_NAME environment variable).
        #[arg(long)]
        node_name: Option<String>,
        /// Log format (on stderr): text for a terminal, json in production.
        #[arg(long, value_enum, default_value = "text")]
        log_format: LogFormat,
    },
    /// Show instance lifecycle events (start, stop, crash, oom_kill) from a running collector.
    Events {
        /// Address of the running collector: HOST:PORT, or unix:PATH for its API socket.
        #[arg(long, default_value = DEFAULT_LISTEN)]
        addr: String,
        /// Keep running and print new events as they happen.
        #[arg(short, long)]
        follow: bool,
        /// Only this instance's events.
        #[arg(long)]
        instance: Option<String>,
        /// Print the NDJSON records as they come.
        #[arg(long)]
        json: bool,
    },
}

/// The `collector` binary.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // One line, each cause once, joined: no backtrace for a user's mistake. A cause that
            // spans lines (a regex error's caret) is folded onto the line.
            let message = format!("{err:#}");
            let folded: Vec<&str> = message.split_whitespace().collect();
            eprintln!("error: {}", folded.join(" "));
            ExitCode::FAILURE
        }
    }
}

fn run(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run {
            config,
            listen,
            metrics_listen,
            api_socket,
            allow_unauthenticated_remote_api,
            api_listen,
            api_tls_cert_file,
            api_tls_key_file,
            node_name,
            log_dir,
            log_format,
        } => {
            let config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            logging::init(log_format);
            tune_malloc();
            let tokio = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(2)
                .enable_all()
                .build()
                .context("starting the async runtime")?;
            tokio.block_on(runtime::run(
                config,
                runtime::Overrides {
                    listen,
                    metrics_listen,
                    api_socket,
                    allow_unauthenticated_remote_api,
                    api_listen,
                    api_tls_cert_file,
                    api_tls_key_file,
                    log_dir,
                    node_name,
                },
            ))
        }
        Command::Logs {
            uuid,
            follow,
            tail,
            since,
            stream,
            json,
            raw,
            addr,
        } => {
            let mut path = format!(
                "/v1/instances/{}/logs?follow={follow}",
                percent_encode(&uuid)
            );
            if let Some(tail) = tail {
                path.push_str(&format!("&tail={tail}"));
            }
            if let Some(since) = since {
                path.push_str(&format!("&since={}", percent_encode(&since)));
            }
            if let Some(stream) = stream {
                path.push_str(&format!("&stream={}", percent_encode(&stream)));
            }
            client::get_lines(&addr, &path, |line| {
                // A closed pipe (`| head`) ends the output; nothing to report.
                let _ = print_log_line(line, json, raw);
            })
        }
        Command::Instances { addr, json } => {
            let body = client::get(&addr, "/v1/instances")?;
            if json {
                println!("{}", String::from_utf8_lossy(&body));
                return Ok(());
            }
            let instances: Vec<InstanceView> =
                serde_json::from_slice(&body).context("decoding /v1/instances")?;
            print!("{}", instances_table(&instances));
            Ok(())
        }
        Command::CheckLogs { file } => check_logs_command(&file),
        Command::Identities {
            config,
            node_name,
            log_format,
        } => {
            let config = match &config {
                Some(path) => Config::load(path)?,
                None => Config::default(),
            };
            logging::init(log_format);
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .context("tokio runtime")?
                .block_on(identities::run(config, node_name))
        }
        Command::Events {
            addr,
            follow,
            instance,
            json,
        } => {
            let mut path = format!("/v1/events?follow={follow}");
            if let Some(instance) = &instance {
                path.push_str("&instance=");
                path.push_str(&percent_encode(instance));
            }
            let mut stdout = std::io::stdout().lock();
            client::get_lines(&addr, &path, |line| {
                let text = if json {
                    String::from_utf8_lossy(line).into_owned()
                } else {
                    event_line(line)
                };
                // A closed pipe (`| head`) ends the command; nothing to report.
                let _ = writeln!(stdout, "{text}");
                let _ = stdout.flush();
            })
        }
    }
}

/// `collector check-logs FILE|-`: every violation on stdout, an error (exit 1) if any.
fn check_logs_command(file: &std::path::Path) -> anyhow::Result<()> {
    let violations = if file.as_os_str() == "-" {
        check_logs::check(std::io::stdin().lock())
    } else {
        let opened =
            std::fs::File::open(file).with_context(|| format!("cannot open {}", file.display()))?;
        check_logs::check(std::io::BufReader::new(opened))
    };
    for violation in &violations {
        println!("{violation}");
    }
    if !violations.is_empty() {
        anyhow::bail!(
            "{} violations of the logging convention (docs/conventions/logging.md)",
            violations.len()
        );
    }
    Ok(())
}

/// One NDJSON line of the logs API: as is with `--json`, else its text (a piece of a split
/// or partial line without a newline, so the line reads whole), control bytes shown visibly
/// unless `raw`.
fn print_log_line(line: &[u8], json: bool, raw: bool) -> anyhow::Result<()> {
    use std::io::Write;
    let mut out = std::io::stdout().lock();
    if json {
        out.write_all(line)?;
        out.write_all(b"\n")?;
    } else if let Ok(record) = serde_json::from_slice::<LogRecordView>(line)
        && record.gap
    {
        let lost = record
            .dropped_bytes
            .map_or_else(|| "output".to_owned(), |n| format!("{n} bytes"));
        let reason = record.gap_reason.as_deref().unwrap_or("unknown");
        eprintln!(
            "({lost} missing here: {reason}, since {})",
            record.gap_since.unwrap_or_default()
        );
    } else if let Ok(record) = serde_json::from_slice::<LogRecordView>(line) {
        if raw {
            out.write_all(record.message.as_bytes())?;
        } else {
            out.write_all(visible::render(&record.message).as_bytes())?;
        }
        if let Some(cut) = record.cut_bytes {
            write!(out, " [{cut} bytes cut]")?;
        }
        if !(record.split || record.partial) {
            out.write_all(b"\n")?;
        }
    } else if let Ok(notice) = serde_json::from_slice::<serde_json::Value>(line)
        && let Some(missed) = notice.get("lagged")
    {
        eprintln!("(missed {missed} lines: this reader was too slow)");
    } else {
        eprintln!("{}", visible::render(&String::from_utf8_lossy(line)));
    }
    out.flush()?;
    Ok(())
}

/// Percent-encodes a query value or path segment.
fn percent_encode(value: &str) -> String {
    utf8_percent_encode(value, QUERY_VALUE).to_string()
}

/// One readable line for an event record: time, instance, hypervisor, event, then details.
fn event_line(record: &[u8]) -> String {
    let Ok(event) = serde_json::from_slice::<serde_json::Value>(record) else {
        return String::from_utf8_lossy(record).into_owned();
    };
    if let Some(missed) = event.get("lagged") {
        return format!("(missed {missed} events: this reader was too slow)");
    }
    let field = |name: &str| event.get(name).filter(|v| !v.is_null());
    let text = |name: &str| {
        field(name)
            .and_then(|v| v.as_str())
            .unwrap_or("-")
            .to_owned()
    };
    let mut line = format!(
        "{}  {}  {}  {:<10} reason={}",
        text("ts"),
        text("instance_uuid").escape_debug(),
        text("hypervisor"),
        text("event"),
        text("reason"),
    );
    if let Some(code) = field("exit_code") {
        line.push_str(&format!(" exit_code={code}"));
    }
    if let Some(name) = field("signal_name").and_then(|v| v.as_str()) {
        line.push_str(&format!(" signal={name}"));
    }
    if event
        .get("core_dumped")
        .and_then(serde_json::Value::as_bool)
        == Some(true)
    {
        line.push_str(" core_dumped");
    }
    if let Some(uptime) = field("uptime_seconds").and_then(serde_json::Value::as_f64) {
        line.push_str(&format!(" uptime={uptime:.3}s"));
    }
    if let Some(oom) = field("oom") {
        line.push_str(&format!(" oom={oom}"));
    }
    if let Some(identity) = field("identity") {
        for key in ["project", "instance_name", "instance_namespace"] {
            if let Some(value) = identity.get(key).and_then(serde_json::Value::as_str) {
                line.push_str(&format!(" {key}={}", value.escape_debug()));
            }
        }
    }
    line
}

fn instances_table(instances: &[InstanceView]) -> String {
    let mut rows = vec![[
        "INSTANCE_UUID".to_owned(),
        "STATE".to_owned(),
        "HYPERVISOR".to_owned(),
        "PID".to_owned(),
        "VCPUS".to_owned(),
        "ORIGIN".to_owned(),
        "STARTED".to_owned(),
        "PROJECT".to_owned(),
        "INSTANCE".to_owned(),
    ]];
    let or_dash = |v: Option<&str>| v.unwrap_or("-").escape_debug().to_string();
    for i in instances {
        let identity = i.identity.as_ref();
        rows.push([
            i.instance_uuid.escape_debug().to_string(),
            i.state.clone(),
            or_dash(i.hypervisor.as_deref()),
            i.pid.map_or_else(|| "-".to_owned(), |p| p.to_string()),
            i.vcpu_threads.len().to_string(),
            or_dash(i.origin.as_deref()),
            or_dash(i.start_time.as_deref()),
            or_dash(identity.and_then(|id| id.project.as_deref())),
            or_dash(identity.and_then(|id| id.instance_name.as_deref())),
        ]);
    }
    let widths: Vec<usize> = (0..9)
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

/// Bytes from which glibc maps an allocation of its own (and unmaps it when freed), and free
/// bytes at the top of a heap past which it gives them back: glibc's initial values.
#[cfg(target_env = "gnu")]
const MALLOC_MMAP_AND_TRIM_THRESHOLD: i32 = 128 * 1024;

/// Keeps glibc's malloc from holding freed memory in the RSS (measured in docs/benchmarks.md
/// "memory": together about 12 MiB at 1000 instances):
/// - One arena instead of up to eight per core: each thread that allocates would otherwise get
///   an arena of its own (the async workers, the blocking pool, the file writer), and memory
///   freed in one is not reused by the others. The threads are few (two async workers) and
///   each keeps a cache of small chunks, so they seldom wait for the arena's lock.
/// - Fixed mmap and trim thresholds: by default, freeing a large mapped block (a `/metrics`
///   body of some MiB at 1000 instances) raises both up to that size, so later bodies come
///   from the heap and up to twice that stays there once freed.
fn tune_malloc() {
    #[cfg(target_env = "gnu")]
    // SAFETY: mallopt only sets allocator parameters; called before the threads start.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
        libc::mallopt(libc::M_MMAP_THRESHOLD, MALLOC_MMAP_AND_TRIM_THRESHOLD);
        libc::mallopt(libc::M_TRIM_THRESHOLD, MALLOC_MMAP_AND_TRIM_THRESHOLD);
    }
}
