//! `collector run`: loads the kernel side, builds each stage with plain handles, runs them
//! until a signal, and shuts down in a fixed order.
//!
//! Data path: kernel programs -> process ring -> discovery -> registry -> event sinks; console
//! ring -> console source (named through the registry's snapshot) -> console sinks; the
//! Prometheus exposition and the API read the handles.
//!
//! Shutdown (SIGTERM or SIGINT), each step bounded so that a stuck disk or reader cannot hold
//! it past the kubelet's grace period:
//! 1. stop intake: the HTTP server stops accepting and every follow stream ends; discovery
//!    stops reading; the console source flushes its partial lines and its subscribers write
//!    what they queued to the console files;
//! 2. drain the registry: the updates already sent are applied, their events handed on;
//! 3. write the events files: the event writer empties its queue;
//! 4. detach the programs.

pub(crate) mod logging;

use std::{future::Future, net::SocketAddr, os::fd::OwnedFd, path::PathBuf, time::Duration};

use anyhow::Context;
use tokio::{net::TcpListener, signal::unix::SignalKind, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    api::{self, ApiState, Readiness},
    config::Config,
    kernel::{
        console::ConsoleReader,
        loader::{self, Kernel, Programs},
        process_ring::ProcessEventReader,
    },
    matching::{Matchers, console_rules},
    model::{console_stats::ConsoleStats, health::Health},
    registry,
    sinks::{
        console_logs::{LogFiles, history::ConsoleHistory},
        events::EventSink,
        prometheus::{Exposition, KernelMetrics},
    },
    sources::{console::ConsoleSource, discovery::Discovery},
};

/// Bound of each shutdown step.
const STEP: Duration = Duration::from_secs(5);

/// Options of `collector run` that override the config file.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) log_dir: Option<PathBuf>,
}

/// Runs the collector until SIGTERM or SIGINT.
pub(crate) async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    if let Some(listen) = overrides.listen {
        config.listen = listen;
    }
    if let Some(log_dir) = overrides.log_dir {
        config.log_dir = log_dir;
    }
    let matchers = Matchers::from_config(&config)?;
    let rules = console_rules::resolve(&config.console.files, &matchers)?;

    // Bind first: a taken address is the cheapest mistake to report.
    let listener = TcpListener::bind(config.listen)
        .await
        .with_context(|| format!("cannot listen on {}", config.listen))?;
    let listen = listener.local_addr()?;

    // The kernel side first: every stage gets its handles ready-made.
    let kernel = loader::load(&config.kernel, &matchers.kernel_plan(&rules))?;
    info!(
        listen = %listen,
        probes_attached = kernel.probes.iter().filter(|p| p.attached).count(),
        probes_total = kernel.probes.len(),
        matchers = matchers.len(),
        "collector running"
    );
    let stages = Stages::start(&config, matchers, rules, kernel)?;
    let stop = stages.intake.clone();
    let mut server = tokio::spawn(
        axum::serve(listener, api::router(stages.api.clone()))
            .with_graceful_shutdown(async move { stop.cancelled().await })
            .into_future(),
    );
    tokio::select! {
        () = shutdown_signal() => {}
        ended = &mut server => {
            return match ended {
                Ok(Ok(())) => Err(anyhow::anyhow!("the HTTP server stopped unexpectedly")),
                Ok(Err(error)) => Err(error).context("HTTP server"),
                Err(error) => Err(error).context("HTTP server task"),
            };
        }
    }
    stages.shutdown(server).await;
    info!("collector stopped; probes detached");
    Ok(())
}

/// The running stages and what shutdown needs of them.
struct Stages {
    api: ApiState,
    /// Cancelled to stop intake: sources and follow streams end.
    intake: CancellationToken,
    sources: TaskTracker,
    registry: JoinHandle<()>,
    event_writer: JoinHandle<()>,
    programs: Programs,
    stats_enabled: Option<OwnedFd>,
}

impl Stages {
    /// Builds every stage from the loaded kernel and starts the sources.
    fn start(
        config: &Config,
        matchers: Matchers,
        rules: Vec<console_rules::Rule>,
        kernel: Kernel,
    ) -> anyhow::Result<Self> {
        let health = Health::new(&matchers.hypervisors());
        let console_stats = ConsoleStats::default();
        let (event_sink, event_store, event_writer) =
            EventSink::start(&config.events, config.log_dir.clone(), health.clone());
        let (registry, registry_task) = registry::spawn(vec![Box::new(event_sink)]);
        let history = ConsoleHistory::new(config.console.history_bytes);
        let files = LogFiles::start(&config.log_dir, &config.console, console_stats.clone())?;
        let readiness = Readiness::new(kernel.probes.clone());
        let intake = CancellationToken::new();
        let sources = TaskTracker::new();

        let console = ConsoleSource {
            kernel: kernel.console,
            snapshot: registry.snapshot.clone(),
            rules,
            matchers: matchers.clone(),
            subscribers: vec![history.subscriber(), Box::new(files)],
            stats: console_stats.clone(),
            health: health.clone(),
            config: config.console.clone(),
        };
        let console_reader = ConsoleReader::new(kernel.console_events)?;
        sources.spawn(console.run(console_reader, intake.clone()));

        let reader = ProcessEventReader::new(kernel.process_events, health.decode_errors.clone())?;
        let discovery = Discovery::new(
            matchers.clone(),
            kernel.tracked,
            kernel.sched.clone(),
            // Only discovery sends updates: the registry drains and ends once it stops.
            registry.updates,
            health.clone(),
        );
        sources.spawn(discover(
            discovery,
            reader,
            readiness.clone(),
            intake.clone(),
        ));
        sources.close();

        let api = ApiState {
            exposition: Exposition {
                snapshot: registry.snapshot.clone(),
                health,
                kernel: KernelMetrics {
                    probes: kernel.probes,
                    drops: kernel.drops,
                    programs: kernel.programs.clone(),
                    sched: kernel.sched,
                },
                console: console_stats,
            },
            snapshot: registry.snapshot,
            readiness,
            matchers,
            events: event_store,
            logs: history,
            shutdown: intake.clone(),
        };
        Ok(Self {
            api,
            intake,
            sources,
            registry: registry_task,
            event_writer,
            programs: kernel.programs,
            stats_enabled: kernel.stats_enabled,
        })
    }

    /// The shutdown steps of the module's documentation, in order, each bounded.
    async fn shutdown(self, server: JoinHandle<std::io::Result<()>>) {
        // 1. Stop intake.
        self.intake.cancel();
        bounded("HTTP server", server).await;
        bounded("sources", self.sources.wait()).await;
        // 2. Drain the registry (it ends once discovery, its only sender, is gone).
        bounded("registry", self.registry).await;
        // 3. Write the events files (the writer ends once the registry dropped the sink).
        bounded("events files", self.event_writer).await;
        // 4. Detach the programs.
        self.programs.detach();
        drop(self.stats_enabled);
    }
}

/// Discovery: the start-up scan (then the collector is ready), then the kernel's process
/// events until intake stops.
async fn discover(
    mut discovery: Discovery,
    mut reader: ProcessEventReader,
    readiness: Readiness,
    stop: CancellationToken,
) {
    discovery.scan().await;
    readiness.scanned();
    loop {
        tokio::select! {
            () = stop.cancelled() => return,
            batch = reader.next_batch() => match batch {
                Ok(batch) => {
                    for event in batch {
                        discovery.handle_event(event).await;
                    }
                }
                Err(error) => {
                    tracing::error!(%error, "process-event reader failed");
                    return;
                }
            },
        }
    }
}

/// Waits for `step`, at most [`STEP`]; a step that overruns is logged and left behind.
async fn bounded<F: Future>(name: &'static str, step: F) {
    if tokio::time::timeout(STEP, step).await.is_err() {
        warn!(
            step = name,
            bound_s = STEP.as_secs(),
            "shutdown step did not finish in time"
        );
    }
}

async fn shutdown_signal() {
    let mut term = tokio::signal::unix::signal(SignalKind::terminate()).expect("SIGTERM handler");
    let mut int = tokio::signal::unix::signal(SignalKind::interrupt()).expect("SIGINT handler");
    tokio::select! {
        _ = term.recv() => info!(signal = "SIGTERM", "shutting down"),
        _ = int.recv() => info!(signal = "SIGINT", "shutting down"),
    }
}
