//! Instance metrics (`compute_instance_info`, start time) and the collector's instance count,
//! read from the registry's snapshot at scrape time: an instance that exited is absent from
//! the next scrape, with no stale series to expire.

use std::time::{Instant, UNIX_EPOCH};

use crate::model::{
    instance::{HYPERVISOR_UNKNOWN, Instance, LabelSet, Snapshot, instance_labels},
    lifecycle::{EventKind, InstanceEventCounts},
    metrics::{MetricKind, MetricWriter, Value},
};

/// Writes the gauge family `name` with one sample per instance for which `value` has one,
/// labelled as every per-instance series is.
pub(crate) fn instance_gauge<'a>(
    w: &mut dyn MetricWriter,
    name: &str,
    help: &str,
    instances: impl IntoIterator<Item = &'a Instance>,
    value: impl Fn(&Instance) -> Option<Value>,
) {
    w.family(name, help, MetricKind::Gauge);
    for instance in instances {
        if let Some(v) = value(instance) {
            w.sample(&instance.labels(LabelSet::Series), v);
        }
    }
}

pub(crate) fn write(w: &mut dyn MetricWriter, snapshot: &Snapshot, events: &InstanceEventCounts) {
    w.family(
        "compute_instance_info",
        "1 for each instance on this host: its hypervisor process runs, or a Pod backs it.",
        MetricKind::Gauge,
    );
    for instance in snapshot.by_pid.values() {
        w.sample(&instance.labels(LabelSet::Info), Value::Int(1));
    }
    // Created and not running (scaled to zero): named by its Pod; the hypervisor of its last
    // VMM, `unknown` when none was seen.
    for (uuid, pod) in snapshot.not_running() {
        let hypervisor = pod.hypervisor.as_deref().unwrap_or(HYPERVISOR_UNKNOWN);
        let labels = instance_labels(LabelSet::Info, uuid, hypervisor, Some(&pod.identity));
        w.sample(&labels, Value::Int(1));
    }
    w.family(
        "compute_instance_events",
        "Lifecycle events of the instance, by event (kept 10 minutes after the instance is gone).",
        MetricKind::Counter,
    );
    for (uuid, by_kind) in events.expose(Instant::now(), &snapshot.on_host()) {
        let mut labels = instance_labels(LabelSet::Series, &uuid, "", None);
        for (kind, count) in EventKind::ALL.iter().zip(by_kind) {
            // `discovered` is the collector's own restart, not the instance's: the fleet
            // counter has it, the per-instance series (budgeted) do not.
            if *kind == EventKind::Discovered {
                continue;
            }
            labels.truncate(1);
            labels.push(("event", kind.as_str()));
            w.sample(&labels, Value::Uint(count));
        }
    }
    instance_gauge(
        w,
        "compute_instance_start_time_seconds",
        "When the instance's hypervisor process started, in seconds since the Unix epoch.",
        snapshot.by_pid.values(),
        |i| {
            Some(Value::Float(
                i.start_time
                    .duration_since(UNIX_EPOCH)
                    .map_or(0.0, |d| d.as_secs_f64()),
            ))
        },
    );
    w.family(
        "collector_instances",
        "Instances the collector follows on this host.",
        MetricKind::Gauge,
    );
    w.sample(&[], Value::Uint(snapshot.by_pid.len() as u64));
    w.family(
        "collector_build_info",
        "1, labelled with the collector's version.",
        MetricKind::Gauge,
    );
    w.sample(&[("version", env!("CARGO_PKG_VERSION"))], Value::Int(1));
}
