//! Console metrics (`compute_instance_console_*`), read at scrape time from the console
//! counters for the instances in the registry's snapshot: like every `compute_instance_*`
//! series they leave with the instance. Sparse, to keep an instance within its series budget
//! (docs/metrics.md): a stream's series appear with its first byte, a `where` with its first
//! dropped byte (VictoriaMetrics counts a new series' first value as an increase; Prometheus'
//! `increase()` misses it).

use std::collections::BTreeMap;

use crate::model::{
    console::{DropWhere, Stream},
    console_stats::{ConsoleStats, Counters},
    instance::{LabelSet, Snapshot},
    metrics::{MetricKind, MetricWriter, Value},
};

/// Picks a per-stream counter array.
type PerStream = fn(&Counters) -> &[u64; 3];

pub(crate) fn write(w: &mut dyn MetricWriter, snapshot: &Snapshot, stats: &ConsoleStats) {
    // One series set per instance id, even if two processes claim it.
    let instances: BTreeMap<&str, _> = snapshot
        .by_pid
        .values()
        .map(|i| (i.instance_uuid.as_str(), i))
        .collect();
    let counters: Vec<_> = instances
        .values()
        .map(|i| (i.labels(LabelSet::Series), stats.get(&i.instance_uuid)))
        .collect();

    let by_stream: [(&str, &str, PerStream); 2] = [
        (
            "compute_instance_console_bytes",
            "Bytes the instance's hypervisor wrote to its console, by stream.",
            |c| &c.bytes,
        ),
        (
            "compute_instance_console_lines",
            "Console lines (records) of the instance, by stream.",
            |c| &c.lines,
        ),
    ];
    for (name, help, field) in by_stream {
        w.family(name, help, MetricKind::Counter);
        for (labels, c) in &counters {
            for stream in Stream::ALL {
                if c.bytes[stream.index()] == 0 && c.lines[stream.index()] == 0 {
                    continue;
                }
                let mut labels = labels.clone();
                labels.push(("stream", stream.as_str()));
                w.sample(&labels, Value::Uint(field(c)[stream.index()]));
            }
        }
    }

    w.family(
        "compute_instance_console_dropped_bytes",
        "Console bytes of the instance given up, by where: kernel_ring (console ring full), \
         over_budget (over its budget in the kernel), evicted (pending-syscall map full), cut \
         (the part of a write over 64 KiB), line_budget (lines over its share of userspace line \
         handling), queue (log-file queue full), sink (disk cap or write error).",
        MetricKind::Counter,
    );
    for (labels, c) in &counters {
        for at in DropWhere::ALL {
            if c.dropped[at as usize] == 0 {
                continue;
            }
            let mut labels = labels.clone();
            labels.push(("where", at.as_str()));
            w.sample(&labels, Value::Uint(c.dropped[at as usize]));
        }
    }

    w.family(
        "collector_console_unattributed_bytes",
        "Console bytes of processes that never became an instance (rejected by discovery, or \
         gone before they were named), dropped.",
        MetricKind::Counter,
    );
    w.sample(&[], Value::Uint(stats.unattributed_bytes()));

    let hold = stats.identity_hold();
    w.family(
        "collector_console_identity_held_lines",
        "Console lines the console files hold back until their instance's identity is known \
         (Kubernetes source on; at most kubernetes.identity_wait_seconds).",
        MetricKind::Gauge,
    );
    w.sample(&[], Value::Uint(hold.held_lines));
    w.family(
        "collector_console_identity_held_bytes",
        "Bytes of the console lines held back for identity (bounded by \
         kubernetes.identity_hold_bytes).",
        MetricKind::Gauge,
    );
    w.sample(&[], Value::Uint(hold.held_bytes));
    w.family(
        "collector_console_lines_without_identity",
        "Console lines written to the console files without identity: the Kubernetes source \
         is on and the wait for their instance's identity, or its byte bound, ran out first.",
        MetricKind::Counter,
    );
    w.sample(&[], Value::Uint(hold.unnamed_lines));
}
