//! JSON shapes of the API, shared by the server and the CLI.

use serde::{Deserialize, Serialize};

use crate::model::identity::Identity;

/// A vCPU thread of an instance.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct VcpuThread {
    pub(crate) tid: u32,
    /// vCPU index from the thread's name.
    pub(crate) index: u32,
    pub(crate) name: String,
}

/// `state` of an instance whose VMM runs.
pub(crate) const STATE_RUNNING: &str = "running";
/// `state` of an instance a Pod backs and no VMM runs (scaled to zero, or not started yet).
pub(crate) const STATE_CREATED: &str = "created";

/// An instance, as `/v1/instances` shows it. The VMM's fields are `null` for an instance that
/// is created and not running.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Eq)]
pub(crate) struct InstanceView {
    pub(crate) instance_uuid: String,
    /// `running` (its VMM runs) or `created` (a Pod backs it, no VMM runs).
    pub(crate) state: String,
    /// The running VMM's; for a created instance, that of its last VMM, if one was seen.
    pub(crate) hypervisor: Option<String>,
    pub(crate) pid: Option<u32>,
    /// RFC 3339.
    pub(crate) start_time: Option<String>,
    /// `exec` (seen starting) or `discovered` (running when the collector started).
    pub(crate) origin: Option<String>,
    pub(crate) executable: Option<String>,
    pub(crate) vcpu_threads: Vec<VcpuThread>,
    pub(crate) instance_dir: Option<String>,
    /// Whose it is (the Pod backing it); `null` while no Pod is known for it.
    pub(crate) identity: Option<Identity>,
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
    /// With the Kubernetes source on: whether its first full list of this node's Pods is in
    /// (readiness waits for it). Absent with the source off.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) identities_synced: Option<bool>,
}
