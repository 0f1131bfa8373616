//! The OTLP exporter's counters (`collector_export_*`): written by the exporter, read at scrape
//! time. Label values are closed vocabularies, listed here.

use std::sync::{
    Arc,
    atomic::{AtomicU64, Ordering},
};

use super::metrics::{CounterVec, MetricKind, MetricWriter, Value};

/// The `signal` label: what a record was read from.
pub(crate) const SIGNALS: [&str; 2] = ["console", "event"];

/// The `outcome` label of `collector_export_records_total`.
pub(crate) const OUTCOMES: [&str; 6] = [
    // Acknowledged by the receiver.
    "sent",
    // The receiver accepted the request but rejected these (OTLP partial success).
    "rejected",
    // The receiver refused the request with a status that is not retried (4xx but 429).
    "refused",
    // Held for the instance's identity past the bound, then dropped (never sent).
    "no_identity",
    // Rotated away (deleted) before the exporter read them.
    "lost",
    // A line of the file that is not a record (not JSON of the expected shape).
    "invalid",
];

/// The `reason` label of `collector_export_retries_total`.
pub(crate) const RETRY_REASONS: [&str; 6] = ["429", "502", "503", "504", "connection", "timeout"];

/// Shared counters. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct ExportStats {
    /// Records by `signal` and `outcome`.
    pub(crate) records: CounterVec,
    /// Requests retried, by `reason`.
    pub(crate) retries: CounterVec,
    /// Bytes read from the files and not yet acknowledged (or given up).
    queue_bytes: Arc<AtomicU64>,
    queue_max_bytes: Arc<AtomicU64>,
    /// Records waiting for their instance's identity.
    held: Arc<AtomicU64>,
    /// Bytes of files deleted before they were read to their end.
    pub(crate) lost_bytes: super::metrics::Counter,
}

impl ExportStats {
    /// Sets the queue bound of a running exporter, presetting every series at 0.
    pub(crate) fn enable(&self, queue_max_bytes: u64) {
        self.queue_max_bytes
            .store(queue_max_bytes, Ordering::Relaxed);
        for signal in SIGNALS {
            for outcome in OUTCOMES {
                self.records.preset(&[signal, outcome]);
            }
        }
        for reason in RETRY_REASONS {
            self.retries.preset(&[reason]);
        }
    }

    pub(crate) fn set_queue_bytes(&self, bytes: u64) {
        self.queue_bytes.store(bytes, Ordering::Relaxed);
    }

    pub(crate) fn set_held(&self, records: u64) {
        self.held.store(records, Ordering::Relaxed);
    }

    pub(crate) fn count(&self, signal: &str, outcome: &str, n: u64) {
        if n > 0 {
            self.records.add(&[signal, outcome], n);
        }
    }

    /// The families (served with the exporter off too: every series then reads 0 or is
    /// absent).
    pub(crate) fn write(&self, w: &mut dyn MetricWriter) {
        w.family(
            "collector_export_records",
            "OTLP export: records by signal (console, event) and outcome (sent, rejected by the \
             receiver's partial success, refused by a 4xx, no_identity: held past the identity \
             bound and dropped, lost: rotated away unread, invalid).",
            MetricKind::Counter,
        );
        for (labels, n) in self.records.values() {
            w.sample(
                &[("signal", &labels[0]), ("outcome", &labels[1])],
                Value::Uint(n),
            );
        }
        w.family(
            "collector_export_retries",
            "OTLP export: requests retried, by reason (HTTP or gRPC status mapped to 429, 502, \
             503, 504; connection; timeout).",
            MetricKind::Counter,
        );
        for (labels, n) in self.retries.values() {
            w.sample(&[("reason", &labels[0])], Value::Uint(n));
        }
        w.family(
            "collector_export_queue_bytes",
            "OTLP export: bytes read from the files and not yet acknowledged by the receiver.",
            MetricKind::Gauge,
        );
        w.sample(&[], Value::Uint(self.queue_bytes.load(Ordering::Relaxed)));
        w.family(
            "collector_export_queue_max_bytes",
            "OTLP export: the queue's bound (export.otlp.queue_max_bytes); past it reading pauses.",
            MetricKind::Gauge,
        );
        w.sample(
            &[],
            Value::Uint(self.queue_max_bytes.load(Ordering::Relaxed)),
        );
        w.family(
            "collector_export_held_records",
            "OTLP export: records held back because their instance has no identity yet.",
            MetricKind::Gauge,
        );
        w.sample(&[], Value::Uint(self.held.load(Ordering::Relaxed)));
        w.family(
            "collector_export_lost_bytes",
            "OTLP export: bytes of log files deleted (rotated away) before they were read.",
            MetricKind::Counter,
        );
        w.sample(&[], Value::Uint(self.lost_bytes.get()));
    }
}
