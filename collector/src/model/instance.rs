//! Instances: a VMM process and the instance it runs, as the registry publishes them, and the
//! one place that says which labels name an instance in every output.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::SystemTime,
};

use serde::{Deserialize, Serialize};

use super::{
    identity::{Departed, Identity, IdentityUpdate, PodBacked},
    lifecycle::OomDetails,
    process::ProcessExit,
};

/// How the collector learned of an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum Origin {
    /// Seen exec'ing by the kernel program.
    Exec,
    /// Already running when the collector started (found by the `/proc` scan).
    Discovered,
    /// Found by a `/proc` rescan after the kernel lost exec records (its ring was full).
    Rescan,
}

impl Origin {
    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Exec => "exec",
            Self::Discovered => "discovered",
            Self::Rescan => "rescan",
        }
    }
}

/// vCPUs and memory an instance was configured with; `None` when the configuration does not say.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Allocation {
    pub(crate) vcpus: Option<u32>,
    pub(crate) memory_bytes: Option<u64>,
}

/// One instance: a VMM process and the instance it runs.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct Instance {
    pub(crate) instance_uuid: String,
    pub(crate) hypervisor: String,
    /// Name of the matcher that claimed it.
    pub(crate) matcher: String,
    /// Thread-group id of the VMM.
    pub(crate) pid: u32,
    /// When the VMM exec'd (discovered instances: when the process started).
    pub(crate) start_time: SystemTime,
    /// The same instant on `CLOCK_BOOTTIME`, the clock of kernel timestamps.
    pub(crate) start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` of the exec or of the scan that found it; orders exec events against the
    /// scan.
    pub(crate) seen_boot_ns: u64,
    pub(crate) origin: Origin,
    pub(crate) executable: String,
    /// Per-instance folder (console log, VMM config), when the runtime keeps one.
    pub(crate) instance_dir: Option<String>,
    /// Set when the OOM killer chose this instance; reported with its exit.
    pub(crate) oom: Option<OomDetails>,
    /// vCPUs and memory from the VMM's configuration.
    pub(crate) allocation: Allocation,
    /// Whose it is: set by the registry from the Pod that backs it (kept, as it last was, when
    /// the Pod is deleted before the VMM ends); `None` while no Pod is known for it.
    pub(crate) identity: Option<Identity>,
}

/// Which labels an output wants for an instance.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum LabelSet {
    /// Every per-instance series (usage, console, start time): only the join key, so that the
    /// series never churn when what names the instance changes.
    Series,
    /// `compute_instance_info`: the join key and everything that names the instance.
    Info,
}

/// `hypervisor` of an instance no VMM of which was seen (a Pod scaled to zero): in
/// `compute_instance_info` and in the `create` and `terminate` events and their counter.
pub(crate) const HYPERVISOR_UNKNOWN: &str = "unknown";

/// The labels of an instance, in the order they are exposed: the join key, and for
/// [`LabelSet::Info`] its hypervisor and every identity label known (absent while unknown,
/// never empty). Every encoder takes its instance labels from here, so that a new identity
/// label is added in one place.
pub(crate) fn instance_labels<'a>(
    set: LabelSet,
    instance_uuid: &'a str,
    hypervisor: &'a str,
    identity: Option<&'a Identity>,
) -> Vec<(&'static str, &'a str)> {
    let mut labels = vec![("instance_uuid", instance_uuid)];
    if set == LabelSet::Info {
        labels.push(("hypervisor", hypervisor));
        if let Some(identity) = identity {
            for (name, value) in [
                ("project", &identity.project),
                ("instance_name", &identity.instance_name),
                ("instance_namespace", &identity.instance_namespace),
                ("workload", &identity.workload),
            ] {
                if let Some(value) = value.as_deref().filter(|v| !v.is_empty()) {
                    labels.push((name, value));
                }
            }
        }
    }
    labels
}

impl Instance {
    /// The instance's labels ([`instance_labels`]).
    pub(crate) fn labels(&self, set: LabelSet) -> Vec<(&'static str, &str)> {
        instance_labels(
            set,
            &self.instance_uuid,
            &self.hypervisor,
            self.identity.as_ref(),
        )
    }
}

/// An instance the previous run of the collector listed (its restart state, or the events
/// files it left), as the start-up scan checks it: running still, or ended while the collector
/// was down.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct PreviousInstance {
    pub(crate) instance_uuid: String,
    pub(crate) hypervisor: String,
    pub(crate) pid: u32,
    pub(crate) origin: Origin,
    pub(crate) start_time: SystemTime,
    /// `CLOCK_BOOTTIME` of the start, when it is from this boot.
    pub(crate) start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` at which it was known to run; a process with its pid that started
    /// later is another one. 0: from an earlier boot of the host (nothing of it runs).
    pub(crate) seen_boot_ns: u64,
}

/// A change to the set of instances, from discovery to the registry.
#[derive(Debug)]
pub(crate) enum InstanceUpdate {
    /// A VMM started, or was found running.
    Add(Instance),
    /// An instance listed before the collector restarted, found running still: listed again
    /// without an event (a restart of the collector is not an event of the instance).
    Restore(Instance),
    /// The listed instance with this pid, seen running at `seen_boot_ns`, is gone and its exit
    /// record is not coming (the kernel lost it): it ended at an unknown time, status unknown.
    Vanished { pid: u32, seen_boot_ns: u64 },
    /// An instance the previous run listed ended while the collector was down.
    EndedWhileDown(PreviousInstance),
    /// The OOM killer chose the VMM with this pid.
    OomVictim { pid: u32, details: OomDetails },
    /// The last thread of the VMM with this pid exited.
    Exit { pid: u32, exit: ProcessExit },
    /// The VMM with this pid exec'd a program that is not a VMM.
    Untracked { pid: u32, boot_ns: u64 },
    /// Discovery decided this pid is not an instance after all (no event).
    Forget { pid: u32 },
    /// What the Kubernetes source learned of the Pods backing this node's instances.
    Identity(IdentityUpdate),
    /// Answered once every update sent before it is applied and published.
    Barrier(tokio::sync::oneshot::Sender<()>),
}

/// Instances by VMM pid, and the instances Pods back by id, as published by the registry
/// after each change.
#[derive(Debug, Default)]
pub(crate) struct Snapshot {
    pub(crate) by_pid: BTreeMap<u32, Instance>,
    /// Instances a Pod on this node backs (created, not terminated), running or not.
    pub(crate) pods: BTreeMap<String, PodBacked>,
    /// Instances that had an identity and are gone (no Pod, no VMM), for a while.
    pub(crate) departed: BTreeMap<String, Departed>,
}

/// The registry's latest snapshot, for readers that never block the writer.
pub(crate) type SnapshotReceiver = tokio::sync::watch::Receiver<std::sync::Arc<Snapshot>>;

impl Snapshot {
    /// Instances with this id (normally one; a misconfigured runtime may start two).
    pub(crate) fn by_uuid<'a>(&'a self, uuid: &'a str) -> impl Iterator<Item = &'a Instance> + 'a {
        self.by_pid
            .values()
            .filter(move |i| i.instance_uuid == uuid)
    }

    /// Whose `uuid` is: its running VMM's identity, else its Pod's, else the one it had when
    /// it departed (within the registry's retention). `None` while no Pod has named it.
    pub(crate) fn identity_of(&self, uuid: &str) -> Option<&Identity> {
        self.by_pid
            .values()
            .filter(|i| i.instance_uuid == uuid)
            .find_map(|i| i.identity.as_ref())
            .or_else(|| self.pods.get(uuid).map(|p| &p.identity))
            .or_else(|| self.departed.get(uuid).map(|d| &d.identity))
    }

    /// Ids of the instances whose VMM runs.
    pub(crate) fn running(&self) -> BTreeSet<&str> {
        self.by_pid
            .values()
            .map(|i| i.instance_uuid.as_str())
            .collect()
    }

    /// Ids of every instance on the host: its VMM runs, or a Pod backs it.
    pub(crate) fn on_host(&self) -> BTreeSet<&str> {
        let mut ids = self.running();
        ids.extend(self.pods.keys().map(String::as_str));
        ids
    }

    /// Instances a Pod backs and no VMM runs (scaled to zero, or not started yet): created,
    /// not running.
    pub(crate) fn not_running(&self) -> impl Iterator<Item = (&String, &PodBacked)> + '_ {
        let running = self.running();
        self.pods
            .iter()
            .filter(move |(uuid, _)| !running.contains(uuid.as_str()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn series_labels_are_the_join_key_only() {
        let instance = Instance {
            instance_uuid: "u".into(),
            hypervisor: "qemu".into(),
            matcher: "qemu".into(),
            pid: 1,
            start_time: SystemTime::UNIX_EPOCH,
            start_boot_ns: 0,
            seen_boot_ns: 0,
            origin: Origin::Exec,
            executable: "/usr/bin/qemu-system-x86_64".into(),
            instance_dir: None,
            oom: None,
            allocation: Allocation::default(),
            identity: None,
        };
        assert_eq!(instance.labels(LabelSet::Series), [("instance_uuid", "u")]);
        assert_eq!(
            instance.labels(LabelSet::Info),
            [("instance_uuid", "u"), ("hypervisor", "qemu")]
        );
        // Identity: on the info series only, each label absent while unknown (or empty).
        let named = Instance {
            identity: Some(Identity {
                project: Some("p".into()),
                instance_name: Some("web-0".into()),
                instance_namespace: Some(String::new()),
                workload: None,
                pod: "web-0-x".into(),
                pod_namespace: "ns-1".into(),
                node: "n1".into(),
            }),
            ..instance
        };
        assert_eq!(named.labels(LabelSet::Series), [("instance_uuid", "u")]);
        assert_eq!(
            named.labels(LabelSet::Info),
            [
                ("instance_uuid", "u"),
                ("hypervisor", "qemu"),
                ("project", "p"),
                ("instance_name", "web-0")
            ]
        );
    }
}
