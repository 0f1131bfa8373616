//! The collector's own counters that more than one stage writes or that a sink other than the
//! writer exposes. Created once by the runtime and handed to each stage as a handle.

use super::metrics::{Counter, CounterVec};

#[derive(Debug, Clone, Default)]
pub(crate) struct Health {
    /// Hypervisor processes discovery handled imperfectly, by `reason`.
    pub(crate) discovery_problems: CounterVec,
    /// Kernel records userspace could not decode, by `ring` and `reason`.
    pub(crate) decode_errors: CounterVec,
    /// Lifecycle events by `event` and `hypervisor` (fleet counter, no instance label).
    pub(crate) lifecycle_events: CounterVec,
    /// Lifecycle events not written to their instance's `events.log`.
    pub(crate) event_file_dropped: Counter,
}

/// Discovery problems pre-set at 0.
pub(crate) const DISCOVERY_PROBLEMS: [&str; 3] = [
    "no_instance_id",
    "instance_id_too_long",
    "instance_id_control_chars",
];

impl Health {
    /// New counters with the series that must exist from the first scrape.
    pub(crate) fn new(hypervisors: &[String]) -> Self {
        let health = Self::default();
        for reason in DISCOVERY_PROBLEMS {
            health.discovery_problems.preset(&[reason]);
        }
        health.decode_errors.preset(&["process", "short_record"]);
        for hypervisor in hypervisors {
            for kind in super::lifecycle::EventKind::ALL {
                health.lifecycle_events.preset(&[kind.as_str(), hypervisor]);
            }
        }
        health
    }
}
