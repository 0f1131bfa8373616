//! What became of each kernel probe at start-up.

/// A probe and whether it is attached.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct ProbeState {
    pub(crate) probe: &'static str,
    pub(crate) attached: bool,
    /// Why it is not attached.
    pub(crate) error: Option<String>,
}

/// Probes without which the collector does nothing useful: readiness waits for them, and only
/// for them (any other probe that cannot attach turns its own feature off).
pub(crate) const CORE_PROBES: [&str; 2] = ["sched_process_exec", "sched_process_exit"];
