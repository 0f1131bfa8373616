//! `collector run`: wires the data path together and runs it until a signal.
//!
//! kernel programs -> process-event reader -> discovery -> registry -> sinks (metrics) -> HTTP;
//! console ring -> console pipeline (named through the registry) -> log files and the logs API.

use std::{
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex, RwLock,
        atomic::{AtomicBool, Ordering},
    },
};

use anyhow::Context;
use prometheus_client::registry::Registry;
use tokio::{net::TcpListener, signal::unix::SignalKind};
use tracing::{error, info, warn};

use crate::{
    api::{
        logs::{self, LogsState},
        server::{self, AppState},
    },
    config::Config,
    console::{self, pipeline::Pipeline, stats::ConsoleStats, store::LiveStore},
    discovery::{Discovery, matchers::Matcher},
    ebpf::{
        console::{ConsoleKernel, ConsoleReader},
        loader,
        process_events::ProcessEventReader,
    },
    registry,
    sinks::{
        console_metrics::ConsoleMetrics,
        events::EventSink,
        logs::LogFiles,
        metrics::InstanceMetrics,
        usage::{SchedCell, UsageMetrics},
    },
    telemetry::{
        self, KernelHealth, SelfMetrics,
        ebpf_stats::{EbpfStats, SharedEbpf},
    },
};

/// How long shutdown waits for the console pipeline to write what it holds.
const CONSOLE_DRAIN: std::time::Duration = std::time::Duration::from_secs(5);

/// Options of `collector run` that override the config file.
#[derive(Debug, Default)]
pub struct Overrides {
    pub listen: Option<SocketAddr>,
    pub log_dir: Option<PathBuf>,
}

/// The matchers in force: built-ins not turned off, then the config file's.
pub fn matchers(config: &Config) -> anyhow::Result<Vec<Matcher>> {
    let mut matchers: Vec<Matcher> = Matcher::builtins()
        .into_iter()
        .filter(|m| !config.disable_builtin_matchers.contains(&m.name))
        .collect();
    for custom in &config.matchers {
        matchers.push(Matcher::from_config(custom)?);
    }
    Ok(matchers)
}

pub async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    if let Some(listen) = overrides.listen {
        config.listen = listen;
    }
    if let Some(log_dir) = overrides.log_dir {
        config.log_dir = log_dir;
    }
    let matchers = Arc::new(matchers(&config)?);
    let console_rules = console::rules::resolve(&config.console.files, &matchers)?;

    // Bind first: a taken address is the cheapest mistake to report.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let listen = listener.local_addr()?;

    let self_metrics = SelfMetrics::default();
    let probes = Arc::new(RwLock::new(Vec::new()));
    let drops = telemetry::SharedDrops::default();
    let mut metrics = Registry::default();
    let hypervisors: Vec<String> = matchers.iter().map(|m| m.hypervisor.clone()).collect();
    let events = EventSink::start(
        config.events.clone(),
        config.log_dir.clone(),
        &hypervisors,
        &mut metrics,
    );
    let (registry_tx, snapshot) = registry::spawn(events.clone());
    self_metrics.register(&mut metrics);
    metrics.register_collector(Box::new(KernelHealth {
        probes: probes.clone(),
        drops: drops.clone(),
    }));
    metrics.register_collector(Box::new(InstanceMetrics {
        snapshot: snapshot.clone(),
    }));
    let sched = SchedCell::default();
    let ebpf = SharedEbpf::default();
    metrics.register_collector(Box::new(UsageMetrics {
        snapshot: snapshot.clone(),
        sched: sched.clone(),
    }));
    metrics.register_collector(Box::new(EbpfStats {
        ebpf: ebpf.clone(),
        drops: drops.clone(),
        sched: sched.clone(),
    }));
    let console_stats = ConsoleStats::default();
    metrics.register_collector(Box::new(ConsoleMetrics {
        stats: console_stats.clone(),
        snapshot: snapshot.clone(),
    }));
    let console_store = Arc::new(LiveStore::new(config.console.history_bytes));
    let logs_state = LogsState {
        store: console_store.clone(),
        snapshot: snapshot.clone(),
    };

    let started = Arc::new(AtomicBool::new(false));
    let console_snapshot = snapshot.clone();
    let state = AppState {
        metrics: Arc::new(metrics),
        snapshot,
        probes: probes.clone(),
        started: started.clone(),
        matchers: matchers.clone(),
        events,
    };

    let mut kernel = loader::load(&config.kernel, &matchers)?;
    let (console_kernel, console_ring) = ConsoleKernel::take(&mut kernel.ebpf, &console_rules)?;
    *probes.write().expect("probe lock") = kernel.probes.clone();
    let _ = drops.set(kernel.drops);
    let attached = kernel.probes.iter().filter(|p| p.attached).count();
    let probes_total = kernel.probes.len();
    // Keeps the programs attached until the end of `run`, and the BPF statistics on.
    *ebpf.lock().expect("ebpf lock") = Some(kernel.ebpf);
    let stats_enabled = kernel.stats_enabled;
    let kernel_sched = Arc::new(Mutex::new(kernel.sched));
    let _ = sched.set(kernel_sched.clone());

    let console_pipeline = Pipeline {
        kernel: console_kernel,
        snapshot: console_snapshot,
        rules: console_rules,
        matchers: matchers.clone(),
        store: console_store,
        files: LogFiles::start(&config.log_dir, &config.console, console_stats.clone())?,
        stats: console_stats,
        metrics: self_metrics.clone(),
        config: config.console.clone(),
    };
    let (console_stop, console_stopped) = tokio::sync::oneshot::channel();
    let console_task =
        tokio::spawn(console_pipeline.run(ConsoleReader::new(console_ring)?, console_stopped));

    let mut reader = ProcessEventReader::new(kernel.process_events, self_metrics.clone())?;
    let mut discovery = Discovery::new(
        matchers.to_vec(),
        kernel.tracked_processes,
        registry_tx,
        self_metrics,
    )
    .with_sched(kernel_sched);
    let discovery_task = tokio::spawn(async move {
        discovery.scan().await;
        started.store(true, Ordering::Release);
        loop {
            match reader.next_batch().await {
                Ok(batch) => {
                    for event in batch {
                        discovery.handle_event(event).await;
                    }
                }
                Err(err) => {
                    error!(error = %err, "process-event reader failed");
                    return;
                }
            }
        }
    });

    info!(
        listen = %listen,
        probes_attached = attached,
        probes_total,
        matchers = matchers.len(),
        "collector running"
    );
    axum::serve(
        listener,
        server::router(state).merge(logs::router(logs_state)),
    )
    .with_graceful_shutdown(shutdown_signal())
    .await
    .context("HTTP server")?;
    discovery_task.abort();
    // Partial lines flushed, queued lines written: bounded, so a stuck disk cannot hold the
    // shutdown.
    let _ = console_stop.send(());
    if tokio::time::timeout(CONSOLE_DRAIN, console_task)
        .await
        .is_err()
    {
        warn!(
            grace_s = CONSOLE_DRAIN.as_secs(),
            "console logs not all written at shutdown"
        );
    }
    drop(ebpf.lock().expect("ebpf lock").take());
    drop(stats_enabled);
    info!("collector stopped; probes detached");
    Ok(())
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
    }
}
