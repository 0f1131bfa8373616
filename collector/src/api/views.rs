//! JSON shapes of the API, shared by the server and the CLI.

use serde::{Deserialize, Serialize};

/// A vCPU thread of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct VcpuThread {
    pub tid: u32,
    /// vCPU index from the thread's name.
    pub index: u32,
    pub name: String,
}

/// An instance, as `/v1/instances` shows it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub struct InstanceView {
    pub instance_uuid: String,
    pub hypervisor: String,
    pub pid: u32,
    /// RFC 3339.
    pub start_time: String,
    /// `exec` (seen starting) or `discovered` (running when the collector started).
    pub origin: String,
    pub executable: String,
    pub vcpu_threads: Vec<VcpuThread>,
    pub instance_dir: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProbeView {
    pub probe: String,
    pub attached: bool,
    pub error: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Readiness {
    pub ready: bool,
    pub probes: Vec<ProbeView>,
}
