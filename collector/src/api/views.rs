//! JSON shapes of the API, shared by the server and the CLI.

use serde::{Deserialize, Serialize};

/// A vCPU thread of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VcpuThread {
    pub(crate) tid: u32,
    /// vCPU index from the thread's name.
    pub(crate) index: u32,
    pub(crate) name: String,
}

/// An instance, as `/v1/instances` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstanceView {
    pub(crate) instance_uuid: String,
    pub(crate) hypervisor: String,
    pub(crate) pid: u32,
    /// RFC 3339.
    pub(crate) start_time: String,
    /// `exec` (seen starting) or `discovered` (running when the collector started).
    pub(crate) origin: String,
    pub(crate) executable: String,
    pub(crate) vcpu_threads: Vec<VcpuThread>,
    pub(crate) instance_dir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ProbeView {
    pub(crate) probe: String,
    pub(crate) attached: bool,
    pub(crate) error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct ReadinessView {
    pub(crate) ready: bool,
    /// Probes not attached: their features are off, the rest runs.
    pub(crate) degraded: Vec<String>,
    pub(crate) probes: Vec<ProbeView>,
}
