//! The collector's own health: structured logging set-up and self-metrics (`collector_*`).
//!
//! Label values are closed vocabularies (probe names, reasons from `&'static str`); free-form
//! detail goes into log lines, never into a label.

pub mod ebpf_stats;
pub mod logging;

use std::sync::{Arc, OnceLock, RwLock};

use aya::maps::{MapData, PerCpuArray};
use collector_common::drop_kind;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::Counter, family::Family, gauge::ConstGauge},
    registry::Registry,
};

use crate::ebpf::loader::ProbeState;

type Labels = Vec<(&'static str, &'static str)>;

/// Counters that userspace code increments. Cheap to clone (shared handles).
#[derive(Clone, Debug, Default)]
pub struct SelfMetrics {
    discovery_problems: Family<Labels, Counter>,
    decode_errors: Family<Labels, Counter>,
}

impl SelfMetrics {
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "collector_discovery_problems",
            "Hypervisor processes that discovery could not handle cleanly, by reason",
            self.discovery_problems.clone(),
        );
        registry.register(
            "collector_decode_errors",
            "Kernel records that could not be decoded, by ring and reason",
            self.decode_errors.clone(),
        );
        // Pre-set the series so a rate() over them works before the first error.
        for reason in [
            "no_instance_id",
            "instance_id_too_long",
            "instance_id_control_chars",
        ] {
            let _ = self
                .discovery_problems
                .get_or_create(&vec![("reason", reason)]);
        }
        let _ = self
            .decode_errors
            .get_or_create(&vec![("ring", "process"), ("reason", "short_record")]);
    }

    pub fn discovery_problem(&self, reason: &'static str) {
        self.discovery_problems
            .get_or_create(&vec![("reason", reason)])
            .inc();
    }

    pub fn decode_error(&self, ring: &'static str, reason: &'static str) {
        self.decode_errors
            .get_or_create(&vec![("ring", ring), ("reason", reason)])
            .inc();
    }
}

/// Probe state, as set once the programs are attached.
pub type SharedProbes = Arc<RwLock<Vec<ProbeState>>>;

/// The kernel's drop counters (`DROPS`), set once the programs are loaded.
pub type SharedDrops = Arc<OnceLock<PerCpuArray<MapData, u64>>>;

/// Reads the kernel side's health at scrape time: probe state and the kernel's drop counters.
pub struct KernelHealth {
    pub probes: SharedProbes,
    pub drops: SharedDrops,
}

/// Kernel drop counters exported as `collector_ebpf_events_lost_total{ring, event}`.
const LOST_EVENTS: &[(u32, &str, &str)] = &[
    (drop_kind::EXEC_EVENT_RESERVE, "process", "exec"),
    (drop_kind::EXIT_EVENT_RESERVE, "process", "exit"),
    (drop_kind::OOM_EVENT_RESERVE, "process", "oom"),
];

impl std::fmt::Debug for KernelHealth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelHealth")
            .field("probes", &self.probes)
            .finish_non_exhaustive()
    }
}

/// Kernel counters of entries a full map refused: (drop kind, family, help).
const MAP_FULL: &[(u32, &str, &str)] = &[
    (
        drop_kind::TRACKED_MAP_FULL,
        "collector_ebpf_tracked_map_full",
        "Hypervisor execs the kernel could not follow because its process map was full.",
    ),
    (
        drop_kind::CONSOLE_FD_MAP_FULL,
        "collector_ebpf_console_fd_map_full",
        "Console descriptors the kernel could not record because its console-fd map was full.",
    ),
];

impl Collector for KernelHealth {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let probes = self.probes.read().expect("probe lock");
        let mut family = encoder.encode_descriptor(
            "collector_probe_attached",
            "1 when the kernel probe is attached, 0 when its feature is off.",
            None,
            MetricType::Gauge,
        )?;
        for probe in probes.iter() {
            ConstGauge::new(i64::from(probe.attached))
                .encode(family.encode_family(&vec![("probe", probe.probe)])?)?;
        }

        let Some(drops) = self.drops.get() else {
            return Ok(());
        };
        let sum = |kind: u32| drops.get(&kind, 0).map_or(0, |v| v.iter().sum::<u64>());
        let mut family = encoder.encode_descriptor(
            "collector_ebpf_events_lost",
            "Events the kernel programs could not hand to userspace (ring buffer full).",
            None,
            MetricType::Counter,
        )?;
        for (kind, ring, event) in LOST_EVENTS {
            prometheus_client::metrics::counter::ConstCounter::new(sum(*kind))
                .encode(family.encode_family(&vec![("ring", *ring), ("event", *event)])?)?;
        }
        for (kind, name, help) in MAP_FULL {
            let family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            prometheus_client::metrics::counter::ConstCounter::new(sum(*kind)).encode(family)?;
        }
        Ok(())
    }
}
