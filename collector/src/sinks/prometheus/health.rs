//! The collector's own userspace counters (`collector_*`) and the fleet's lifecycle counter.
//! Label values are closed vocabularies (reasons, event kinds, configured hypervisor names);
//! free-form detail goes into log lines, never into a label.

use crate::model::{
    health::{Health, Pipeline},
    metrics::{CounterVec, MetricKind, MetricWriter, Value},
};

fn counter_vec(
    w: &mut dyn MetricWriter,
    name: &str,
    help: &str,
    labels: &[&str],
    counts: &CounterVec,
) {
    w.family(name, help, MetricKind::Counter);
    for (values, count) in counts.values() {
        let pairs: Vec<(&str, &str)> = labels
            .iter()
            .copied()
            .zip(values.iter().map(String::as_str))
            .collect();
        w.sample(&pairs, Value::Uint(count));
    }
}

pub(crate) fn write(w: &mut dyn MetricWriter, health: &Health) {
    counter_vec(
        w,
        "compute_instance_lifecycle_events",
        "Instance lifecycle events on this host, by event and hypervisor.",
        &["event", "hypervisor"],
        &health.lifecycle_events,
    );
    w.family(
        "collector_event_file_dropped",
        "Lifecycle events not written to their instance's events file (queue full or I/O error).",
        MetricKind::Counter,
    );
    w.sample(&[], Value::Uint(health.event_file_dropped.get()));
    counter_vec(
        w,
        "collector_discovery_problems",
        "Hypervisor processes that discovery could not handle cleanly, by reason.",
        &["reason"],
        &health.discovery_problems,
    );
    counter_vec(
        w,
        "collector_reconciled",
        "What reconciliation with /proc corrected after lost kernel records, by fix.",
        &["fix"],
        &health.reconciled,
    );
    w.family(
        "collector_pipeline_up",
        "1 while the pipeline's task runs, 0 once it ended or panicked (then /healthz fails).",
        MetricKind::Gauge,
    );
    for pipeline in Pipeline::ALL {
        let up = health.pipelines.is_up(pipeline);
        w.sample(
            &[("pipeline", pipeline.as_str())],
            Value::Int(i64::from(up)),
        );
    }
    counter_vec(
        w,
        "collector_http_connections_closed",
        "HTTP connections the collector closed, by server and reason (evicted: idle, closed \
         to make room at the connection limit).",
        &["server", "reason"],
        &health.http_connections_closed,
    );
    counter_vec(
        w,
        "collector_api_auth_decisions",
        "Requests to the remote API's /v1 (--api-listen) by decision: allowed, unauthenticated \
         (401), forbidden (403), unavailable (503: a review could not be made).",
        &["decision"],
        &health.api_auth_decisions,
    );
    counter_vec(
        w,
        "collector_api_reviews",
        "TokenReviews and SubjectAccessReviews the remote API sent to the Kubernetes API \
         server (decisions not cached), by review and outcome (error: failed or timed out).",
        &["review", "outcome"],
        &health.api_reviews,
    );
    w.family(
        "collector_privilege_missing",
        "1 when the collector lacks this capability or mount (what it costs is logged at \
         start), else 0.",
        MetricKind::Gauge,
    );
    for p in health.privileges.iter() {
        w.sample(
            &[("privilege", p.privilege)],
            Value::Int(i64::from(p.missing)),
        );
    }
    counter_vec(
        w,
        "collector_decode_errors",
        "Kernel records that could not be decoded, by ring and reason.",
        &["ring", "reason"],
        &health.decode_errors,
    );
    health.export.write(w);
}
