//! `collector run`: loads the kernel side, continues from what the previous run left
//! ([`restore`]), builds each stage with plain handles, runs them until a signal, and shuts
//! down in a fixed order.
//!
//! Data path: kernel programs -> process ring -> discovery -> registry -> event sinks; the
//! Kubernetes source (this node's Pods) -> registry, which joins identity to instances by id;
//! console ring -> console source (named through the registry's snapshot) -> console sinks;
//! the Prometheus exposition and the API read the handles. Each long-running task is a
//! [`Pipeline`]: one that ends before shutdown turns `/healthz` to 503.
//!
//! The HTTP servers run on a runtime of their own ([`HttpRuntime`]): a slow client, a burst of
//! requests or a handler reading `/proc` never holds up the workers that read the kernel's
//! rings.
//!
//! Shutdown (SIGTERM or SIGINT), within [`SHUTDOWN_BUDGET`] in all, so that a stuck disk or
//! reader cannot hold it past the kubelet's grace period (30 s):
//! 1. stop intake: the HTTP server stops accepting and every follow stream ends; discovery
//!    reads what is left on the process ring and stops; the console source reads what is left
//!    on the console ring, flushes its partial lines, and its subscribers write what they
//!    queued to the console files;
//! 2. drain the registry: the updates already sent are applied, their events handed on;
//! 3. write the events files: the event writer empties its queue;
//! 4. stop the OTLP exporter (an export in flight is abandoned: it is sent again after the
//!    restart) and write its checkpoints;
//! 5. write the restart state, once more;
//! 6. detach the programs.

mod http;
pub(crate) mod logging;
pub(crate) mod restore;

use std::{
    future::Future,
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context;
use tokio::{signal::unix::SignalKind, sync::mpsc, task::JoinHandle};
use tokio_util::{sync::CancellationToken, task::TaskTracker};
use tracing::{info, warn};

use crate::{
    api::{ApiState, Exposure, Readiness},
    config::Config,
    host::privileges,
    kernel::{
        console::ConsoleReader,
        loader::{self, Kernel, Programs},
        process_ring::ProcessEventReader,
        program_stats::ProgramStatsSwitch,
    },
    matching::{Matchers, console_rules},
    model::{
        console_stats::ConsoleStats,
        health::{Health, Pipeline, PrivilegeState},
        identity::IdentityUpdate,
        instance::InstanceUpdate,
    },
    registry,
    sinks::{
        console_logs::{LogFiles, history::ConsoleHistory, naming::IdentityWait},
        events::{EventSink, EventStore},
        otlp::{self, OtlpExporter},
        prometheus::{Exposition, KernelMetrics, resident::ResidentMemory},
        state::StateSink,
    },
    sources::{
        console::ConsoleSource,
        discovery::{Discovery, DiscoveryKernel},
        kubernetes::{self, KubernetesSource},
    },
};

/// Identity updates queued between the Kubernetes source and the registry.
const IDENTITY_QUEUE: usize = 1024;

/// Bound of all of shutdown (the kubelet's grace period is 30 s).
const SHUTDOWN_BUDGET: Duration = Duration::from_secs(15);

/// The test hook: the name of a pipeline whose task is ended, on purpose, once the collector is
/// ready (to see supervision work). Tests only: the collector warns at start when it is set, and
/// refuses to start when it names no pipeline this hook can end.
const TEST_END_PIPELINE: &str = "COLLECTOR_TEST_END_PIPELINE";

/// Options of `collector run` that override the config file.
#[derive(Debug, Default)]
pub(crate) struct Overrides {
    pub(crate) listen: Option<SocketAddr>,
    pub(crate) metrics_listen: Option<SocketAddr>,
    pub(crate) api_socket: Option<PathBuf>,
    pub(crate) allow_unauthenticated_remote_api: bool,
    pub(crate) api_listen: Option<SocketAddr>,
    pub(crate) api_tls_cert_file: Option<PathBuf>,
    pub(crate) api_tls_key_file: Option<PathBuf>,
    pub(crate) log_dir: Option<PathBuf>,
    /// This node's name (else `NODE_NAME`): the Kubernetes source's node.
    pub(crate) node_name: Option<String>,
}

/// Runs the collector until SIGTERM or SIGINT.
pub(crate) async fn run(mut config: Config, overrides: Overrides) -> anyhow::Result<()> {
    if let Some(listen) = overrides.listen {
        config.listen = listen;
    }
    if let Some(addr) = overrides.metrics_listen {
        config.metrics_listen = Some(addr);
    }
    if let Some(path) = overrides.api_socket {
        config.api_socket = Some(path);
    }
    config.allow_unauthenticated_remote_api |= overrides.allow_unauthenticated_remote_api;
    if let Some(addr) = overrides.api_listen {
        config.api_listen = Some(addr);
    }
    if overrides.api_tls_cert_file.is_some() || overrides.api_tls_key_file.is_some() {
        config.api_tls_cert_file = overrides.api_tls_cert_file;
        config.api_tls_key_file = overrides.api_tls_key_file;
        if config.api_tls_cert_file.is_some() != config.api_tls_key_file.is_some() {
            anyhow::bail!("--api-tls-cert-file and --api-tls-key-file go together");
        }
    }
    if let Some(log_dir) = overrides.log_dir {
        config.log_dir = log_dir;
    }
    http::check_exposure(&config)?;
    let end_on_purpose = test_hook()?;
    let matchers = Matchers::from_config(&config)?;
    let rules = console_rules::resolve(&config.console.files, &matchers)?;

    // The Kubernetes source's configuration next: a bad selector or node name is the user's
    // mistake to report before the kernel side loads.
    let (identity_tx, identity_rx) = mpsc::channel(IDENTITY_QUEUE);
    let node = kubernetes::node_name(overrides.node_name);
    let kube = kubernetes::configure(&config.kubernetes, node.clone(), Vec::new(), identity_tx)
        .await
        .context("kubernetes identity source")?;
    // The remote API's settings (its Kubernetes client, node, TLS files) likewise.
    let remote = http::remote_api(&config, kube.as_ref())?;

    // Bind first: a taken address is the cheapest mistake to report.
    let http = http::HttpRuntime::start()?;
    let bound = http::bind(&http, &config, remote.as_ref()).await?;
    let listen = bound[0]
        .listener
        .local_addr()
        .expect("the first listener is --listen (TCP)");
    let local = |exposure: Exposure| {
        bound
            .iter()
            .find(|b| b.exposure == exposure)
            .and_then(|b| b.listener.local_addr())
    };
    let metrics_listen = local(Exposure::Metrics);
    let api_listen = local(Exposure::Remote);

    // Each missing capability or mount is said once, before the load that may need it.
    let privileges = privileges::check();
    // The kernel side first: every stage gets its handles ready-made.
    let mut plan = matchers.kernel_plan(&rules);
    plan.console_limits = config.console_limits();
    let kernel = loader::load(&config.kernel, &plan)?;
    release_load_memory();
    info!(
        listen = %listen,
        metrics_listen = metrics_listen.map(|a| a.to_string()),
        api_listen = api_listen.map(|a| a.to_string()),
        api_socket = config.api_socket.as_ref().map(|p| p.display().to_string()),
        probes_attached = kernel.probes.iter().filter(|p| p.attached).count(),
        probes_total = kernel.probes.len(),
        matchers = matchers.len(),
        "collector running"
    );
    let stages = Stages::start(
        &config,
        matchers,
        rules,
        kernel,
        privileges,
        Identities {
            source: kube,
            updates: identity_rx,
            node,
        },
    )?;
    if let Some(pipeline) = end_on_purpose {
        stages.end_when_ready(pipeline);
    }
    let mut server = http::serve(
        &http,
        &config,
        bound,
        remote,
        &stages.api,
        &stages.health.http_connections_closed,
        &stages.intake,
    );
    tokio::select! {
        () = shutdown_signal() => {}
        ended = &mut server => {
            return match ended {
                Ok(()) => Err(anyhow::anyhow!("the HTTP server stopped unexpectedly")),
                Err(error) => Err(error).context("HTTP server task"),
            };
        }
    }
    stages.shutdown(server).await;
    drop(http);
    info!("collector stopped; probes detached");
    Ok(())
}

/// The Kubernetes source (when configured) and the updates it sends.
struct Identities {
    source: Option<KubernetesSource>,
    updates: mpsc::Receiver<IdentityUpdate>,
    /// This node's name, if known.
    node: Option<String>,
}

/// The running stages and what shutdown needs of them.
struct Stages {
    api: ApiState,
    health: Health,
    /// Cancelled to stop intake: sources and follow streams end.
    intake: CancellationToken,
    sources: TaskTracker,
    discovery: tokio::task::AbortHandle,
    console: tokio::task::AbortHandle,
    registry: JoinHandle<()>,
    /// Held until the sources have ended, so that the registry ends only at shutdown (not when
    /// discovery, its one sender, stops early: the other pipelines keep running then).
    registry_updates: mpsc::Sender<InstanceUpdate>,
    event_writer: JoinHandle<()>,
    /// The OTLP exporter, when an endpoint is configured.
    exporter: Option<OtlpExporter>,
    /// Cancelled for the state file's last write.
    state_done: CancellationToken,
    state_writer: JoinHandle<()>,
    programs: Programs,
    /// Ends with the kernel's BPF statistics let go of.
    program_stats: JoinHandle<()>,
}

impl Stages {
    /// Builds every stage from the loaded kernel and what the previous run left, and starts
    /// the sources.
    fn start(
        config: &Config,
        matchers: Matchers,
        rules: Vec<console_rules::Rule>,
        kernel: Kernel,
        privileges: Vec<PrivilegeState>,
        identities: Identities,
    ) -> anyhow::Result<Self> {
        let mut health = Health::new(&matchers.hypervisors());
        health.privileges = Arc::new(privileges);
        let pipelines = health.pipelines.clone();
        let restored = restore::restore(config);
        let console_stats = ConsoleStats::default();
        let event_store = EventStore::new(&config.events);
        event_store.restore(
            restored.events,
            Duration::from_secs(config.events.retention_seconds),
        );
        let (event_sink, event_writer) = EventSink::start(
            &config.events,
            config.log_dir.clone(),
            event_store.clone(),
            health.clone(),
            pipelines.guard(Pipeline::EventsFiles),
        );
        let (snapshot_tx, snapshot) = registry::snapshot_channel();
        let state_done = CancellationToken::new();
        let state = StateSink::start(
            config.log_dir.clone(),
            snapshot,
            restored.boot_id,
            restored.last_event_seq,
            &restored.event_seqs,
            &restored.resume,
            pipelines.guard(Pipeline::StateFile),
            state_done.clone(),
        );
        // Without the source nothing could terminate them: the Pods of a previous run are
        // forgotten (not terminated: whether they are gone is not known).
        let pods = if identities.source.is_some() {
            restored.pods
        } else {
            if !restored.pods.is_empty() {
                info!(
                    instances = restored.pods.len(),
                    "kubernetes identity source off: the previous run's Pods are forgotten"
                );
            }
            std::collections::BTreeMap::new()
        };
        let seed: Vec<_> = pods
            .iter()
            .map(|(uuid, pod)| (uuid.clone(), pod.identity.clone()))
            .collect();
        let registry_seed = registry::Instances::seeded(
            pods,
            restored.departed,
            registry::DepartedLimits {
                retention: Duration::from_secs(
                    config
                        .console
                        .retention_seconds
                        .max(config.events.retention_seconds),
                ),
                max: config.events.max_instances,
            },
        );
        let (registry, registry_task) = registry::spawn(
            vec![Box::new(event_sink), Box::new(state.events)],
            restored.last_event_seq,
            registry_seed,
            snapshot_tx,
            pipelines.guard(Pipeline::Registry),
        );
        let history = ConsoleHistory::new(
            config.console.history_bytes,
            config.console.history_total_bytes(),
        );
        // With the Kubernetes source on, the files wait for each instance's identity.
        let identity_wait = identities.source.is_some().then(|| IdentityWait {
            snapshot: registry.snapshot.clone(),
            wait: Duration::from_secs(config.kubernetes.identity_wait_seconds),
            max_bytes: config.kubernetes.identity_hold_bytes,
        });
        let files = LogFiles::start(
            &config.log_dir,
            &config.console,
            identity_wait,
            console_stats.clone(),
            pipelines.guard(Pipeline::ConsoleFiles),
        )?;
        // The OTLP exporter reads the files the sinks above write; a record without identity
        // is held back by default exactly when the Kubernetes source runs.
        let exporter = OtlpExporter::start(
            otlp::Settings {
                config: config.export.otlp.clone(),
                require_identity: config
                    .export
                    .otlp
                    .require_identity
                    .unwrap_or(identities.source.is_some()),
                node: identities.node.clone(),
                identity_wait: Duration::from_secs(config.kubernetes.identity_wait_seconds),
                log_dir: config.log_dir.clone(),
            },
            registry.snapshot.clone(),
            health.export.clone(),
            &pipelines,
        )
        .context("OTLP exporter")?;
        let mut readiness = Readiness::new(kernel.probes.clone());
        if identities.source.is_some() {
            readiness.wait_for_identities();
        }
        let intake = CancellationToken::new();
        let sources = TaskTracker::new();
        // The VMMs' resident memory, read in the background for the scrapes.
        let resident = ResidentMemory::default();
        tokio::spawn(
            resident
                .clone()
                .run(registry.snapshot.clone(), intake.clone()),
        );

        let console = ConsoleSource {
            kernel: kernel.console,
            snapshot: registry.snapshot.clone(),
            rules,
            matchers: matchers.clone(),
            subscribers: vec![
                history.subscriber(),
                Box::new(files),
                Box::new(state.console),
            ],
            stats: console_stats.clone(),
            health: health.clone(),
            config: config.console.clone(),
            resume: restored.resume,
        };
        let console_reader = ConsoleReader::new(
            kernel.console_events,
            Duration::from_millis(config.kernel.console_poll_ms),
            config.console_quiet(),
        )?;
        let console = sources.spawn({
            let stop = intake.clone();
            let mut guard = pipelines.guard(Pipeline::Console);
            async move {
                if let Err(error) = console.run(console_reader, stop).await {
                    guard.failed(&error);
                }
            }
        });

        let reader = ProcessEventReader::new(kernel.process_events, health.decode_errors.clone())?;
        let discovery = Discovery::new(
            matchers.clone(),
            DiscoveryKernel {
                tracked: kernel.tracked,
                sched: kernel.sched.clone(),
                console_fds: kernel.console_fds,
                drops: kernel.drops.clone(),
            },
            // Only discovery sends updates: the registry drains and ends once it stops (and
            // shutdown let go of its own handle).
            registry.updates.clone(),
            health.clone(),
            restored.previous,
        );
        let discovery = sources.spawn({
            let readiness = readiness.clone();
            discovery.run(
                reader,
                move || readiness.scanned(),
                intake.clone(),
                pipelines.guard(Pipeline::Discovery),
            )
        });
        if let Some(mut source) = identities.source {
            // Seeded as the registry is: what was reported before is not reported again.
            source.seed = seed;
            sources.spawn(source.run(intake.clone()));
            sources.spawn(forward_identities(
                identities.updates,
                registry.updates.clone(),
                readiness.clone(),
            ));
        }
        sources.close();
        let stats = ProgramStatsSwitch::default();
        let program_stats = tokio::spawn(stats.clone().run(config.kernel.clone(), intake.clone()));

        let api = ApiState {
            exposition: Exposition {
                snapshot: registry.snapshot.clone(),
                health: health.clone(),
                kernel: KernelMetrics {
                    probes: kernel.probes,
                    drops: kernel.drops,
                    programs: kernel.programs.clone(),
                    program_stats: stats,
                    sched: kernel.sched,
                },
                console: console_stats,
                resident: resident.clone(),
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
            health,
            intake,
            sources,
            discovery: discovery.abort_handle(),
            console: console.abort_handle(),
            registry: registry_task,
            registry_updates: registry.updates,
            event_writer,
            exporter,
            state_done,
            state_writer: state.writer,
            programs: kernel.programs,
            program_stats,
        })
    }

    /// The test hook: ends `pipeline`'s task once the collector is ready.
    fn end_when_ready(&self, pipeline: Pipeline) {
        let task = match pipeline {
            Pipeline::Discovery => self.discovery.clone(),
            Pipeline::Console => self.console.clone(),
            Pipeline::Registry => self.registry.abort_handle(),
            Pipeline::StateFile => self.state_writer.abort_handle(),
            Pipeline::EventsFiles | Pipeline::ConsoleFiles | Pipeline::OtlpExport => return,
        };
        let readiness = self.api.readiness.clone();
        tokio::spawn(async move {
            while !readiness.is_ready() {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            warn!(
                pipeline = pipeline.as_str(),
                hook = TEST_END_PIPELINE,
                "test hook: ending the pipeline on purpose"
            );
            task.abort();
        });
    }

    /// The shutdown steps of the module's documentation, in order, within the budget.
    async fn shutdown(self, server: JoinHandle<()>) {
        let deadline = Instant::now() + SHUTDOWN_BUDGET;
        // Pipelines end from here on as asked.
        self.health.pipelines.stopping();
        // 1. Stop intake.
        self.intake.cancel();
        bounded("HTTP server", server, deadline).await;
        bounded("sources", self.sources.wait(), deadline).await;
        // 2. Drain the registry (it ends once discovery, its only sender, is gone).
        drop(self.registry_updates);
        bounded("registry", self.registry, deadline).await;
        // 3. Write the events files (the writer ends once the registry dropped the sink).
        bounded("events files", self.event_writer, deadline).await;
        // 4. The OTLP exporter's checkpoints.
        if let Some(exporter) = self.exporter {
            let left = deadline.saturating_duration_since(Instant::now());
            exporter.stop(left.min(Duration::from_secs(2))).await;
        }
        // 5. The restart state, with everything above in it.
        self.state_done.cancel();
        bounded("state file", self.state_writer, deadline).await;
        // 6. Detach the programs.
        self.programs.detach();
        bounded("program statistics", self.program_stats, deadline).await;
    }
}

/// Hands the Kubernetes source's updates to the registry, in order, until the source ends.
async fn forward_identities(
    mut updates: mpsc::Receiver<IdentityUpdate>,
    registry: mpsc::Sender<InstanceUpdate>,
    readiness: Readiness,
) {
    while let Some(update) = updates.recv().await {
        let synced = matches!(update, IdentityUpdate::Synced);
        if registry
            .send(InstanceUpdate::Identity(update))
            .await
            .is_err()
        {
            return;
        }
        // After the list's updates are queued to the registry, in order before this mark.
        if synced {
            readiness.identities_synced();
        }
    }
}

/// The pipeline the test hook names, if it is set (see [`TEST_END_PIPELINE`]).
fn test_hook() -> anyhow::Result<Option<Pipeline>> {
    let Some(value) = std::env::var_os(TEST_END_PIPELINE) else {
        return Ok(None);
    };
    let value = value.to_string_lossy();
    let pipeline = Pipeline::from_name(&value).filter(|p| {
        !matches!(
            p,
            Pipeline::EventsFiles | Pipeline::ConsoleFiles | Pipeline::OtlpExport
        )
    });
    let Some(pipeline) = pipeline else {
        anyhow::bail!(
            "{TEST_END_PIPELINE}={value:?}: not a pipeline the test hook can end \
             (discovery, console, registry, state_file); unset it outside tests"
        );
    };
    warn!(
        hook = TEST_END_PIPELINE,
        pipeline = pipeline.as_str(),
        "test hook set: the pipeline will be ended on purpose once ready; never set it in \
         production"
    );
    Ok(Some(pipeline))
}

/// Waits for `step` until `deadline`; a step that overruns is logged and left behind (the
/// steps after it still run, each as far as the budget lets it).
async fn bounded<F: Future>(name: &'static str, step: F, deadline: Instant) {
    let left = deadline.saturating_duration_since(Instant::now());
    if tokio::time::timeout(left, step).await.is_err() {
        warn!(
            step = name,
            budget_s = SHUTDOWN_BUDGET.as_secs(),
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

/// Hands back to the system the heap the load used once (the kernel's BTF, parsed into several
/// MiB of tables, and the object's relocation data): glibc keeps freed memory mapped otherwise,
/// and it would count in the collector's RSS for as long as it runs.
fn release_load_memory() {
    #[cfg(target_env = "gnu")]
    // SAFETY: malloc_trim only returns free heap memory to the system; no pointer is affected.
    unsafe {
        libc::malloc_trim(0);
    }
}
