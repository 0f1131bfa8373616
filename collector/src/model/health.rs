//! The collector's own counters that more than one stage writes or that a sink other than the
//! writer exposes, and whether each pipeline still runs. Created once by the runtime and
//! handed to each stage as a handle.

use std::sync::{
    Arc,
    atomic::{AtomicBool, Ordering},
};

use super::metrics::{Counter, CounterVec};

#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    /// Hypervisor processes discovery handled imperfectly, by `reason`.
    pub(crate) discovery_problems: CounterVec,
    /// Kernel records userspace could not decode, by `ring` and `reason`.
    pub(crate) decode_errors: CounterVec,
    /// Lifecycle events by `event` and `hypervisor` (fleet counter, no instance label).
    pub(crate) lifecycle_events: CounterVec,
    /// Lifecycle events by instance and kind.
    pub(crate) instance_events: super::lifecycle::InstanceEventCounts,
    /// Lifecycle events not written to their instance's `events.log`.
    pub(crate) event_file_dropped: Counter,
    /// What reconciliation with `/proc` corrected, by `fix`.
    pub(crate) reconciled: CounterVec,
    /// Which pipelines run.
    pub(crate) pipelines: Pipelines,
    /// HTTP connections the servers closed, by `server` and `reason`.
    pub(crate) http_connections_closed: CounterVec,
    /// The remote API's decisions on requests, by `decision`.
    pub(crate) api_auth_decisions: CounterVec,
    /// Token and access reviews the remote API sent to the API server, by `review` and
    /// `outcome`.
    pub(crate) api_reviews: CounterVec,
    /// The capabilities and mounts the collector checked at start, and which are missing.
    pub(crate) privileges: Arc<Vec<PrivilegeState>>,
    /// The OTLP exporter's counters.
    pub(crate) export: super::export_stats::ExportStats,
}

/// A capability or mount the collector needs, and whether it has it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PrivilegeState {
    /// `CAP_BPF`, ..., `tracefs`, `btf`: the `privilege` label.
    pub(crate) privilege: &'static str,
    pub(crate) missing: bool,
}

/// Discovery problems pre-set at 0.
pub(crate) const DISCOVERY_PROBLEMS: [&str; 8] = [
    "no_instance_id",
    "instance_id_too_long",
    "instance_id_control_chars",
    // An id with `/`, `..` or NUL: never used in a path, the instance named by its pid.
    "instance_id_unsafe",
    "command_line_prefix_only",
    // A matched process whose executable is not root-owned, is group- or world-writable, or
    // is outside `trusted_executable_dirs`: not followed.
    "untrusted_executable",
    // A second live process claiming the id of a running instance: not followed.
    "duplicate_instance_id",
    // A VMM config file refused: not a regular file, over 1 MiB, or not read in time.
    "vmm_config_refused",
];

/// What reconciliation corrects (the `fix` label of `collector_reconciled_total`), pre-set at 0.
pub(crate) const RECONCILE_FIXES: [&str; 5] = [
    // A listed instance was gone without its exit record: `stop`, `unobserved_exit`.
    "unobserved_exit",
    // A listed instance stopped being followed without its untrack record: `stop`, `exec`.
    "unobserved_exec",
    // A rescan found an instance whose exec record was lost: `discovered`, `exec_record_lost`.
    "exec_record_lost",
    // A kernel map entry of a process that is gone (or whose pid is another's) was removed.
    "stale_kernel_entry",
    // A full `/proc` rescan ran (after the kernel lost exec records).
    "rescan",
];

impl Health {
    /// New counters with the series that must exist from the first scrape.
    pub(crate) fn new(hypervisors: &[String]) -> Self {
        let health = Self::default();
        for reason in DISCOVERY_PROBLEMS {
            health.discovery_problems.preset(&[reason]);
        }
        for fix in RECONCILE_FIXES {
            health.reconciled.preset(&[fix]);
        }
        health.decode_errors.preset(&["process", "short_record"]);
        for hypervisor in hypervisors {
            for kind in super::lifecycle::EventKind::ALL {
                health.lifecycle_events.preset(&[kind.as_str(), hypervisor]);
            }
        }
        // A Pod's create or terminate before any VMM of its instance was seen.
        for kind in super::lifecycle::EventKind::POD {
            health
                .lifecycle_events
                .preset(&[kind.as_str(), super::instance::HYPERVISOR_UNKNOWN]);
        }
        health
    }
}

/// The long-running tasks every output depends on (the `pipeline` label of
/// `collector_pipeline_up`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Pipeline {
    /// The process-events ring, the `/proc` scans and reconciliation.
    Discovery,
    /// The console ring: line assembly for every console output.
    Console,
    /// The instance registry: the snapshot and the lifecycle events.
    Registry,
    /// The writer of `<log-dir>/<instance>/events.log`.
    EventsFiles,
    /// The writer of `<log-dir>/<instance>/console.log`.
    ConsoleFiles,
    /// The writer of the restart state file.
    StateFile,
    /// The OTLP exporter (`[export.otlp]`; up, and idle, when it is off).
    OtlpExport,
}

impl Pipeline {
    pub(crate) const ALL: [Self; 7] = [
        Self::Discovery,
        Self::Console,
        Self::Registry,
        Self::EventsFiles,
        Self::ConsoleFiles,
        Self::StateFile,
        Self::OtlpExport,
    ];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Discovery => "discovery",
            Self::Console => "console",
            Self::Registry => "registry",
            Self::EventsFiles => "events_files",
            Self::ConsoleFiles => "console_files",
            Self::StateFile => "state_file",
            Self::OtlpExport => "otlp_export",
        }
    }

    pub(crate) fn from_name(name: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|p| p.as_str() == name)
    }
}

/// Whether each [`Pipeline`] runs. Cheap to clone. A pipeline is up from the start; it goes
/// down for good when its task ends or panics before shutdown (the kubelet then restarts the
/// pod: `/healthz` answers 503).
#[derive(Debug, Clone)]
pub(crate) struct Pipelines {
    up: Arc<[AtomicBool; Pipeline::ALL.len()]>,
    stopping: Arc<AtomicBool>,
}

impl Default for Pipelines {
    fn default() -> Self {
        Self {
            up: Arc::new(std::array::from_fn(|_| AtomicBool::new(true))),
            stopping: Arc::new(AtomicBool::new(false)),
        }
    }
}

impl Pipelines {
    /// Held by the task of `pipeline` for as long as it runs; dropping it (the task returned,
    /// panicked or was cancelled) before [`Self::stopping`] marks the pipeline down.
    pub(crate) fn guard(&self, pipeline: Pipeline) -> PipelineGuard {
        PipelineGuard {
            pipelines: self.clone(),
            pipeline,
            cause: None,
        }
    }

    pub(crate) fn is_up(&self, pipeline: Pipeline) -> bool {
        self.up[pipeline as usize].load(Ordering::Acquire)
    }

    /// The pipelines that are down.
    pub(crate) fn down(&self) -> Vec<Pipeline> {
        Pipeline::ALL
            .into_iter()
            .filter(|p| !self.is_up(*p))
            .collect()
    }

    /// Shutdown has begun: pipelines that end from now on end as asked.
    pub(crate) fn stopping(&self) {
        self.stopping.store(true, Ordering::Release);
    }
}

/// See [`Pipelines::guard`].
#[derive(Debug)]
pub(crate) struct PipelineGuard {
    pipelines: Pipelines,
    pipeline: Pipeline,
    cause: Option<String>,
}

impl PipelineGuard {
    /// Why the pipeline is about to end, for its log line.
    pub(crate) fn failed(&mut self, cause: &dyn std::error::Error) {
        let mut text = cause.to_string();
        let mut source = cause.source();
        while let Some(s) = source {
            text.push_str(": ");
            text.push_str(&s.to_string());
            source = s.source();
        }
        self.cause = Some(text);
    }
}

impl Drop for PipelineGuard {
    fn drop(&mut self) {
        if self.pipelines.stopping.load(Ordering::Acquire) {
            return;
        }
        self.pipelines.up[self.pipeline as usize].store(false, Ordering::Release);
        let how = if std::thread::panicking() {
            "its task panicked"
        } else {
            "its task ended"
        };
        tracing::error!(
            pipeline = self.pipeline.as_str(),
            error = self.cause.as_deref().unwrap_or(how),
            "pipeline stopped; the collector reports itself unhealthy until restarted"
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_pipeline_that_ends_before_shutdown_is_down() {
        let pipelines = Pipelines::default();
        assert!(pipelines.down().is_empty());
        drop(pipelines.guard(Pipeline::Console));
        assert_eq!(pipelines.down(), [Pipeline::Console]);
        let guard = pipelines.guard(Pipeline::Registry);
        let panicked = std::thread::spawn(move || {
            let _guard = guard;
            panic!("on purpose");
        })
        .join();
        assert!(panicked.is_err());
        assert_eq!(pipelines.down(), [Pipeline::Console, Pipeline::Registry]);
        pipelines.stopping();
        drop(pipelines.guard(Pipeline::Discovery));
        assert!(pipelines.is_up(Pipeline::Discovery), "ended as asked");
        for p in Pipeline::ALL {
            assert_eq!(Pipeline::from_name(p.as_str()), Some(p));
        }
    }
}
