//! The instance registry: the one owner of "which instances run on this host".
//!
//! Discovery and the Kubernetes source send [`InstanceUpdate`]s; the registry task applies
//! them in order, derives the lifecycle events they mean (start, discovered, stop, crash,
//! oom_kill from the VMM; create, terminate from its Pod), numbers them, hands them to its event
//! subscribers and publishes an immutable [`Snapshot`] after each change. Readers (metrics at
//! scrape time, the HTTP API, the console source) take the latest snapshot and never block the
//! writer. A VMM leaves the snapshot the moment its process exits, so no output can show it
//! running afterwards; an instance whose Pod remains stays listed as created.
//!
//! Identity is joined here, by instance id: a VMM gets the identity of the Pod backing its
//! instance when either arrives, and keeps it (as it last was) until it exits even if the Pod
//! is deleted first, so that its last events still name whose it was. Once neither its Pod
//! nor a VMM remains, the identity stays a while as the instance's tombstone
//! ([`Snapshot::departed`]): its console lines still in flight, its history and its events are
//! attributed, and its tenant authorised, after it is gone.

use std::{
    collections::BTreeMap,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tokio::sync::{mpsc, watch};

use crate::model::{
    health::PipelineGuard,
    identity::{Departed, Identity, IdentityUpdate, PodBacked},
    instance::{
        HYPERVISOR_UNKNOWN, Instance, InstanceUpdate, Origin, PreviousInstance, Snapshot,
        SnapshotReceiver,
    },
    lifecycle::{
        EventKind, EventSubscriber, LifecycleEvent, REASON_EXEC, REASON_EXEC_RECORD_LOST,
        REASON_POD_ADDED, REASON_POD_DELETED, REASON_POD_LISTED, REASON_RUNNING_AT_STARTUP,
        REASON_UNOBSERVED_EXIT, Sequenced, classify_exit,
    },
    time,
};

/// How long, and for how many instances, the identity of a departed instance is kept.
#[derive(Debug, Clone, Copy)]
pub(crate) struct DepartedLimits {
    /// As long as what the instance left stays readable (its console history, its events).
    pub(crate) retention: Duration,
    /// The oldest tombstones go first past this many.
    pub(crate) max: usize,
}

impl Default for DepartedLimits {
    fn default() -> Self {
        Self {
            retention: Duration::from_hours(24),
            max: 10_000,
        }
    }
}

/// What the registry owns: running VMMs by pid, the instances Pods back by id, and the
/// identities of the instances that departed.
#[derive(Debug, Default)]
pub(crate) struct Instances {
    pub(crate) by_pid: BTreeMap<u32, Instance>,
    pub(crate) pods: BTreeMap<String, PodBacked>,
    pub(crate) departed: BTreeMap<String, Departed>,
    departed_limits: DepartedLimits,
    /// The Kubernetes source completed its first list: a Pod created from now on was added
    /// while the collector watched.
    listed: bool,
}

impl Instances {
    /// Instances Pods backed before a restart (the state file), listed again without an event,
    /// and the identities of those that had departed.
    pub(crate) fn seeded(
        pods: BTreeMap<String, PodBacked>,
        departed: BTreeMap<String, Departed>,
        departed_limits: DepartedLimits,
    ) -> Self {
        let mut instances = Self {
            by_pid: BTreeMap::new(),
            pods,
            departed,
            departed_limits,
            listed: false,
        };
        instances.prune_departed(SystemTime::now());
        instances
    }

    /// `uuid` lost a VMM or its Pod, named `identity` (if it was): when nothing of it remains,
    /// the identity becomes its tombstone.
    fn left(&mut self, uuid: &str, identity: Option<Identity>) {
        let Some(identity) = identity else { return };
        if self.pods.contains_key(uuid) || self.by_pid.values().any(|i| i.instance_uuid == uuid) {
            return;
        }
        let since = SystemTime::now();
        self.departed
            .insert(uuid.to_owned(), Departed { identity, since });
        self.prune_departed(since);
    }

    /// Drops tombstones past the retention, then the oldest past the bound. True if any went.
    fn prune_departed(&mut self, now: SystemTime) -> bool {
        let before = self.departed.len();
        let DepartedLimits { retention, max } = self.departed_limits;
        self.departed
            .retain(|_, d| now.duration_since(d.since).unwrap_or_default() < retention);
        if self.departed.len() > max {
            let mut by_age: Vec<(SystemTime, String)> = self
                .departed
                .iter()
                .map(|(uuid, d)| (d.since, uuid.clone()))
                .collect();
            by_age.sort();
            for (_, uuid) in by_age.into_iter().take(self.departed.len() - max) {
                self.departed.remove(&uuid);
            }
        }
        self.departed.len() != before
    }

    fn identity_of(&self, uuid: &str) -> Option<Identity> {
        self.pods.get(uuid).map(|p| p.identity.clone())
    }

    /// Gives every running VMM of `uuid` this identity.
    fn stamp(&mut self, uuid: &str, identity: &Identity) {
        for instance in self.by_pid.values_mut() {
            if instance.instance_uuid == uuid {
                instance.identity = Some(identity.clone());
            }
        }
    }

    fn snapshot(&self) -> Snapshot {
        Snapshot {
            by_pid: self.by_pid.clone(),
            pods: self.pods.clone(),
            departed: self.departed.clone(),
        }
    }

    /// The hypervisor of `uuid`'s running VMM, else of the last one seen, else `unknown`.
    fn hypervisor_of(&self, uuid: &str) -> String {
        self.by_pid
            .values()
            .find(|i| i.instance_uuid == uuid)
            .map(|i| i.hypervisor.clone())
            .or_else(|| self.pods.get(uuid).and_then(|p| p.hypervisor.clone()))
            .unwrap_or_else(|| HYPERVISOR_UNKNOWN.to_owned())
    }

    /// A VMM joins the list: named by its Pod when one is known, and remembered as the
    /// instance's hypervisor.
    fn insert(&mut self, mut instance: Instance) {
        if let Some(pod) = self.pods.get_mut(&instance.instance_uuid) {
            instance.identity = Some(pod.identity.clone());
            pod.hypervisor = Some(instance.hypervisor.clone());
        }
        self.by_pid.insert(instance.pid, instance);
    }
}

/// Updates queued for the registry before discovery waits.
const QUEUE: usize = 1024;

/// What applying an update did.
#[derive(Debug, Default)]
pub(crate) struct Applied {
    /// The instance set changed (a new snapshot is due).
    pub(crate) changed: bool,
    pub(crate) events: Vec<LifecycleEvent>,
    /// Barriers to answer once the change is published.
    pub(crate) barriers: Vec<tokio::sync::oneshot::Sender<()>>,
}

fn ended(instance: &Instance, boot_ns: u64) -> LifecycleEvent {
    LifecycleEvent {
        uptime_seconds: boot_ns.saturating_sub(instance.start_boot_ns) as f64 / 1e9,
        identity: instance.identity.clone(),
        ..LifecycleEvent::new(
            time::boot_ns_to_system_time(boot_ns),
            &instance.instance_uuid,
            &instance.hypervisor,
            EventKind::Stop,
            REASON_EXEC,
            Some(instance.pid),
        )
    }
}

/// The `stop` of an instance whose exit the collector did not see: now (when it found out),
/// no exit status (none is known; none is made up), uptime up to now.
fn unobserved_exit(
    uuid: &str,
    hypervisor: &str,
    pid: u32,
    start: SystemTime,
    identity: Option<Identity>,
) -> LifecycleEvent {
    let now = SystemTime::now();
    LifecycleEvent {
        uptime_seconds: now.duration_since(start).unwrap_or_default().as_secs_f64(),
        identity,
        ..LifecycleEvent::new(
            now,
            uuid,
            hypervisor,
            EventKind::Stop,
            REASON_UNOBSERVED_EXIT,
            Some(pid),
        )
    }
}

/// A `create` or `terminate` of `uuid`'s Pod, now.
fn pod_event(
    uuid: &str,
    hypervisor: &str,
    (kind, reason): (EventKind, &'static str),
    identity: Identity,
    uptime_seconds: f64,
) -> LifecycleEvent {
    LifecycleEvent {
        uptime_seconds,
        identity: Some(identity),
        ..LifecycleEvent::new(SystemTime::now(), uuid, hypervisor, kind, reason, None)
    }
}

/// Applies what the Kubernetes source reports. The source reports each Pod's instance
/// `Created` once and `Deleted` once (across relists, and across restarts through the state
/// file it is seeded from, as the registry is): each makes one event.
fn apply_identity(instances: &mut Instances, update: IdentityUpdate, applied: &mut Applied) {
    match update {
        IdentityUpdate::Created {
            instance_uuid,
            identity,
        } => {
            let hypervisor = instances.hypervisor_of(&instance_uuid);
            instances.stamp(&instance_uuid, &identity);
            instances.departed.remove(&instance_uuid);
            if let Some(pod) = instances.pods.get_mut(&instance_uuid) {
                // Known already (seeded from before a restart): not created again.
                pod.identity = identity;
            } else {
                let reason = if instances.listed {
                    REASON_POD_ADDED
                } else {
                    REASON_POD_LISTED
                };
                applied.events.push(pod_event(
                    &instance_uuid,
                    &hypervisor,
                    (EventKind::Create, reason),
                    identity.clone(),
                    0.0,
                ));
                let seen = (hypervisor != HYPERVISOR_UNKNOWN).then_some(hypervisor);
                instances.pods.insert(
                    instance_uuid,
                    PodBacked {
                        identity,
                        created: SystemTime::now(),
                        hypervisor: seen,
                    },
                );
            }
            applied.changed = true;
        }
        IdentityUpdate::Changed {
            instance_uuid,
            identity,
        } => {
            instances.stamp(&instance_uuid, &identity);
            if let Some(pod) = instances.pods.get_mut(&instance_uuid) {
                pod.identity = identity;
            }
            applied.changed = true;
        }
        IdentityUpdate::Deleted {
            instance_uuid,
            identity,
        } => {
            let hypervisor = instances.hypervisor_of(&instance_uuid);
            if let Some(pod) = instances.pods.remove(&instance_uuid) {
                // A VMM still running keeps the identity it had, until it ends.
                instances.stamp(&instance_uuid, &identity);
                let lived = SystemTime::now()
                    .duration_since(pod.created)
                    .unwrap_or_default()
                    .as_secs_f64();
                applied.events.push(pod_event(
                    &instance_uuid,
                    &hypervisor,
                    (EventKind::Terminate, REASON_POD_DELETED),
                    identity.clone(),
                    lived,
                ));
                instances.left(&instance_uuid, Some(identity));
                applied.changed = true;
            }
        }
        IdentityUpdate::Synced => instances.listed = true,
    }
}

/// Applies `update` to `instances`.
pub(crate) fn apply(instances: &mut Instances, update: InstanceUpdate) -> Applied {
    let mut applied = Applied::default();
    match update {
        InstanceUpdate::Add(instance) => {
            if let Some(existing) = instances.by_pid.get(&instance.pid) {
                // The scan and the exec program can both report a process that exec'd while the
                // collector was starting: the later report of the same exec is a duplicate.
                if existing.instance_uuid == instance.instance_uuid
                    && instance.seen_boot_ns <= existing.seen_boot_ns
                {
                    return applied;
                }
                // The VMM exec'd another VMM: the first instance ended there.
                applied.events.push(ended(existing, instance.start_boot_ns));
            }
            let running_for =
                time::boot_ns_now().saturating_sub(instance.start_boot_ns) as f64 / 1e9;
            let (kind, reason, uptime) = match instance.origin {
                Origin::Exec => (EventKind::Start, REASON_EXEC, 0.0),
                Origin::Discovered => (
                    EventKind::Discovered,
                    REASON_RUNNING_AT_STARTUP,
                    running_for,
                ),
                Origin::Rescan => (EventKind::Discovered, REASON_EXEC_RECORD_LOST, running_for),
            };
            let time = match instance.origin {
                Origin::Exec => instance.start_time,
                Origin::Discovered | Origin::Rescan => SystemTime::now(),
            };
            applied.events.push(LifecycleEvent {
                uptime_seconds: uptime,
                identity: instances.identity_of(&instance.instance_uuid),
                ..LifecycleEvent::new(
                    time,
                    &instance.instance_uuid,
                    &instance.hypervisor,
                    kind,
                    reason,
                    Some(instance.pid),
                )
            });
            instances.insert(instance);
            applied.changed = true;
        }
        InstanceUpdate::OomVictim { pid, details } => {
            if let Some(instance) = instances.by_pid.get_mut(&pid) {
                instance.oom = Some(details);
            }
        }
        InstanceUpdate::Restore(instance) => {
            if let Some(existing) = instances.by_pid.get(&instance.pid) {
                applied.events.push(ended(existing, time::boot_ns_now()));
            }
            instances.insert(instance);
            applied.changed = true;
        }
        InstanceUpdate::Vanished { pid, seen_boot_ns } => {
            if instances
                .by_pid
                .get(&pid)
                .is_some_and(|i| i.seen_boot_ns == seen_boot_ns)
                && let Some(i) = instances.by_pid.remove(&pid)
            {
                applied.events.push(unobserved_exit(
                    &i.instance_uuid,
                    &i.hypervisor,
                    i.pid,
                    i.start_time,
                    i.identity.clone(),
                ));
                instances.left(&i.instance_uuid, i.identity);
                applied.changed = true;
            }
        }
        InstanceUpdate::EndedWhileDown(PreviousInstance {
            instance_uuid,
            hypervisor,
            pid,
            start_time,
            ..
        }) => {
            let identity = instances.identity_of(&instance_uuid);
            applied.events.push(unobserved_exit(
                &instance_uuid,
                &hypervisor,
                pid,
                start_time,
                identity,
            ));
        }
        InstanceUpdate::Exit { pid, exit } => {
            if let Some(instance) = instances.by_pid.remove(&pid) {
                // The OOM record may have arrived while the kernel's mark on the process was
                // lost (a rewrite of its entry raced the OOM killer): either tells an OOM kill.
                let oom_victim = exit.oom_victim || instance.oom.is_some();
                let class = classify_exit(exit.wait_status(), oom_victim);
                let mut event = LifecycleEvent {
                    event: class.event,
                    reason: class.reason,
                    ..ended(&instance, exit.boot_ns)
                }
                .with_exit(class);
                if class.event == EventKind::OomKill {
                    event.oom = instance.oom;
                }
                applied.events.push(event);
                instances.left(&instance.instance_uuid, instance.identity);
                applied.changed = true;
            }
        }
        InstanceUpdate::Untracked { pid, boot_ns } => {
            if let Some(instance) = instances.by_pid.remove(&pid) {
                applied.events.push(ended(&instance, boot_ns));
                instances.left(&instance.instance_uuid, instance.identity);
                applied.changed = true;
            }
        }
        InstanceUpdate::Forget { pid } => {
            applied.changed = instances.by_pid.remove(&pid).is_some();
        }
        InstanceUpdate::Identity(update) => apply_identity(instances, update, &mut applied),
        InstanceUpdate::Barrier(done) => applied.barriers.push(done),
    }
    applied
}

/// Where the registry publishes its snapshots, made before it so that a subscriber of its
/// events can also read them.
pub(crate) fn snapshot_channel() -> (watch::Sender<Arc<Snapshot>>, SnapshotReceiver) {
    watch::channel(Arc::new(Snapshot::default()))
}

/// The registry's handles: where discovery sends, what readers watch.
pub(crate) struct Registry {
    pub(crate) updates: mpsc::Sender<InstanceUpdate>,
    pub(crate) snapshot: SnapshotReceiver,
}

/// Spawns the registry task, numbering events from `last_seq + 1` (where the previous run
/// stopped), with what the previous run left (`seed`: the instances Pods backed, listed at
/// once, and the departed). It ends,
/// dropping its subscribers, once every update sender is gone and the queued updates are
/// applied.
pub(crate) fn spawn(
    mut subscribers: Vec<Box<dyn EventSubscriber>>,
    last_seq: u64,
    seed: Instances,
    snapshot_tx: watch::Sender<Arc<Snapshot>>,
    guard: PipelineGuard,
) -> (Registry, tokio::task::JoinHandle<()>) {
    let (tx, mut rx) = mpsc::channel::<InstanceUpdate>(QUEUE);
    let snapshot_rx = snapshot_tx.subscribe();
    let mut instances = seed;
    snapshot_tx.send_replace(Arc::new(instances.snapshot()));
    let task = tokio::spawn(async move {
        let _guard = guard;
        let mut next_seq = last_seq;
        while let Some(update) = rx.recv().await {
            let mut changed = false;
            let mut barriers = Vec::new();
            let mut next = Some(update);
            // Apply whatever else is queued before publishing once.
            while let Some(update) = next {
                let applied = apply(&mut instances, update);
                changed |= applied.changed;
                barriers.extend(applied.barriers);
                for event in applied.events {
                    next_seq += 1;
                    let sequenced = Arc::new(Sequenced {
                        seq: next_seq,
                        event,
                    });
                    for subscriber in &mut subscribers {
                        subscriber.event(&sequenced);
                    }
                }
                next = rx.try_recv().ok();
            }
            changed |= instances.prune_departed(SystemTime::now());
            if changed {
                snapshot_tx.send_replace(Arc::new(instances.snapshot()));
            }
            for barrier in barriers {
                // A waiter that gave up is not an error.
                let _ = barrier.send(());
            }
        }
    });
    (
        Registry {
            updates: tx,
            snapshot: snapshot_rx,
        },
        task,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{instance::Allocation, lifecycle::OomDetails, process::ProcessExit};

    fn instance(pid: u32, uuid: &str, seen: u64, origin: Origin) -> Instance {
        Instance {
            instance_uuid: uuid.into(),
            hypervisor: "firecracker".into(),
            matcher: "firecracker".into(),
            pid,
            start_time: SystemTime::UNIX_EPOCH,
            start_boot_ns: seen,
            seen_boot_ns: seen,
            origin,
            executable: "/usr/bin/firecracker".into(),
            instance_dir: None,
            oom: None,
            allocation: Allocation::default(),
            identity: None,
        }
    }

    fn exit(pid: u32, status: u32, oom: bool) -> InstanceUpdate {
        InstanceUpdate::Exit {
            pid,
            exit: ProcessExit {
                tgid: pid,
                boot_ns: 3_000_000_000,
                oom_victim: oom,
                exit_code: status,
                group_exit_code: 0,
                signal_flags: 0,
            },
        }
    }

    fn kinds(applied: &Applied) -> Vec<EventKind> {
        applied.events.iter().map(|e| e.event).collect()
    }

    #[test]
    fn one_event_per_change() {
        let mut m = Instances::default();
        let a = apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "a", 1_000_000_000, Origin::Exec)),
        );
        assert_eq!(kinds(&a), [EventKind::Start]);
        // Same exec seen by the scan first, then by the ring buffer: no second event.
        let dup = apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "a", 5, Origin::Discovered)),
        );
        assert!(!dup.changed && dup.events.is_empty());
        let end = apply(&mut m, exit(1, 3 << 8, false));
        assert_eq!(kinds(&end), [EventKind::Crash]);
        assert_eq!(end.events[0].exit_code, Some(3));
        assert!((end.events[0].uptime_seconds - 2.0).abs() < 1e-9);
        // A second exit report for the same pid changes nothing.
        assert!(apply(&mut m, exit(1, 0, false)).events.is_empty());
        assert!(m.by_pid.is_empty());
    }

    #[test]
    fn discovered_then_oom_killed() {
        let mut m = Instances::default();
        let d = apply(
            &mut m,
            InstanceUpdate::Add(instance(7, "b", 0, Origin::Discovered)),
        );
        assert_eq!(kinds(&d), [EventKind::Discovered]);
        let details = OomDetails {
            victim_pid: 7,
            counters: None,
            constraint: "memcg",
            memcg_path: Some("/x".into()),
            memcg_limit_bytes: Some(1 << 20),
        };
        let oom = apply(
            &mut m,
            InstanceUpdate::OomVictim {
                pid: 7,
                details: details.clone(),
            },
        );
        assert!(oom.events.is_empty(), "the OOM mark alone is not an event");
        let end = apply(&mut m, exit(7, 9, true));
        assert_eq!(kinds(&end), [EventKind::OomKill]);
        assert_eq!(end.events[0].signal_name, Some("SIGKILL"));
        assert_eq!(end.events[0].oom, Some(details));
    }

    fn oom_details() -> OomDetails {
        OomDetails {
            victim_pid: 7,
            counters: None,
            constraint: "memcg",
            memcg_path: None,
            memcg_limit_bytes: None,
        }
    }

    #[test]
    fn the_oom_record_alone_makes_a_sigkill_an_oom_kill() {
        let mut m = Instances::default();
        apply(
            &mut m,
            InstanceUpdate::Add(instance(7, "b", 10, Origin::Exec)),
        );
        apply(
            &mut m,
            InstanceUpdate::OomVictim {
                pid: 7,
                details: oom_details(),
            },
        );
        // The kernel's mark was lost in a race: the exit does not carry it.
        let end = apply(&mut m, exit(7, 9, false));
        assert_eq!(kinds(&end), [EventKind::OomKill]);
        assert_eq!(end.events[0].oom, Some(oom_details()));
        // Without the record, a SIGKILL is a kill; and an OOM record does not make an exit 0
        // anything but a stop.
        apply(
            &mut m,
            InstanceUpdate::Add(instance(8, "c", 10, Origin::Exec)),
        );
        assert_eq!(kinds(&apply(&mut m, exit(8, 9, false))), [EventKind::Stop]);
        apply(
            &mut m,
            InstanceUpdate::Add(instance(9, "d", 10, Origin::Exec)),
        );
        apply(
            &mut m,
            InstanceUpdate::OomVictim {
                pid: 9,
                details: oom_details(),
            },
        );
        let end = apply(&mut m, exit(9, 0, false));
        assert_eq!(
            (kinds(&end)[0], end.events[0].oom.clone()),
            (EventKind::Stop, None)
        );
    }

    #[test]
    fn unobserved_exits_carry_no_status() {
        let mut m = Instances::default();
        apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "a", 10, Origin::Exec)),
        );
        // Another process's pid use (seen at another time) is not this instance's end.
        let other = apply(
            &mut m,
            InstanceUpdate::Vanished {
                pid: 1,
                seen_boot_ns: 11,
            },
        );
        assert!(other.events.is_empty() && !other.changed);
        let gone = apply(
            &mut m,
            InstanceUpdate::Vanished {
                pid: 1,
                seen_boot_ns: 10,
            },
        );
        assert_eq!(kinds(&gone), [EventKind::Stop]);
        let e = &gone.events[0];
        assert_eq!(e.reason, REASON_UNOBSERVED_EXIT);
        assert_eq!((e.exit_code, e.signal, e.signal_name), (None, None, None));
        assert!(m.by_pid.is_empty());
        // Its exit record, had it come late, changes nothing.
        assert!(apply(&mut m, exit(1, 0, false)).events.is_empty());
        let down = apply(
            &mut m,
            InstanceUpdate::EndedWhileDown(PreviousInstance {
                instance_uuid: "p".into(),
                hypervisor: "firecracker".into(),
                pid: 4,
                origin: Origin::Exec,
                start_time: SystemTime::UNIX_EPOCH,
                start_boot_ns: 0,
                seen_boot_ns: 0,
            }),
        );
        assert_eq!(kinds(&down), [EventKind::Stop]);
        assert_eq!(
            (down.events[0].reason, down.events[0].instance_uuid.as_str()),
            (REASON_UNOBSERVED_EXIT, "p")
        );
        assert!(!down.changed, "it was not listed");
    }

    #[test]
    fn restored_and_rescanned_instances() {
        let mut m = Instances::default();
        let restored = apply(
            &mut m,
            InstanceUpdate::Restore(instance(3, "r", 10, Origin::Exec)),
        );
        assert!(restored.changed && restored.events.is_empty());
        let found = apply(
            &mut m,
            InstanceUpdate::Add(instance(5, "s", 10, Origin::Rescan)),
        );
        assert_eq!(kinds(&found), [EventKind::Discovered]);
        assert_eq!(found.events[0].reason, REASON_EXEC_RECORD_LOST);
    }

    #[test]
    fn re_exec_and_untrack_end_the_instance() {
        let mut m = Instances::default();
        apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "a", 10, Origin::Exec)),
        );
        let re = apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "b", 20, Origin::Exec)),
        );
        assert_eq!(kinds(&re), [EventKind::Stop, EventKind::Start]);
        assert_eq!(re.events[0].instance_uuid, "a");
        let gone = apply(
            &mut m,
            InstanceUpdate::Untracked {
                pid: 1,
                boot_ns: 30,
            },
        );
        assert_eq!(kinds(&gone), [EventKind::Stop]);
        assert_eq!(gone.events[0].reason, "exec");
        let forgotten = apply(&mut m, InstanceUpdate::Forget { pid: 1 });
        assert!(!forgotten.changed && forgotten.events.is_empty());
    }

    fn identity(project: &str) -> Identity {
        Identity {
            project: Some(project.into()),
            instance_name: Some("web-0".into()),
            pod: "web-0-pod".into(),
            pod_namespace: "ns-1".into(),
            node: "n1".into(),
            ..Identity::default()
        }
    }

    fn created(uuid: &str, project: &str) -> InstanceUpdate {
        InstanceUpdate::Identity(IdentityUpdate::Created {
            instance_uuid: uuid.into(),
            identity: identity(project),
        })
    }

    fn deleted(uuid: &str, project: &str) -> InstanceUpdate {
        InstanceUpdate::Identity(IdentityUpdate::Deleted {
            instance_uuid: uuid.into(),
            identity: identity(project),
        })
    }

    #[test]
    fn pods_make_create_and_terminate_and_name_their_vmms() {
        let mut m = Instances::default();
        // Listed at start-up: there before the collector.
        let listed = apply(&mut m, created("z", "p"));
        assert_eq!(listed.events[0].reason, REASON_POD_LISTED);
        apply(&mut m, InstanceUpdate::Identity(IdentityUpdate::Synced));
        // The Pod first: created, not running, hypervisor unknown, no pid.
        let c = apply(&mut m, created("a", "p"));
        assert_eq!(kinds(&c), [EventKind::Create]);
        let e = &c.events[0];
        assert_eq!(
            (e.hypervisor.as_str(), e.pid, e.reason),
            (HYPERVISOR_UNKNOWN, None, REASON_POD_ADDED)
        );
        assert_eq!(e.identity, Some(identity("p")));
        assert!(c.changed && m.by_pid.is_empty() && m.pods.contains_key("a"));
        // Its VMM starts: named at once, and its start event carries the identity.
        let s = apply(
            &mut m,
            InstanceUpdate::Add(instance(1, "a", 10, Origin::Exec)),
        );
        assert_eq!(s.events[0].identity, Some(identity("p")));
        assert_eq!(m.by_pid[&1].identity, Some(identity("p")));
        // A label changes: no event, the running VMM renamed.
        let changed = apply(
            &mut m,
            InstanceUpdate::Identity(IdentityUpdate::Changed {
                instance_uuid: "a".into(),
                identity: identity("q"),
            }),
        );
        assert!(changed.events.is_empty() && changed.changed);
        assert_eq!(m.by_pid[&1].identity, Some(identity("q")));
        // The VMM stops (scaled to zero): the Pod stays, the hypervisor is remembered.
        assert_eq!(kinds(&apply(&mut m, exit(1, 0, false))), [EventKind::Stop]);
        assert!(m.by_pid.is_empty() && m.pods.contains_key("a"));
        // The Pod goes: terminate, once, with the identity it had and the last hypervisor.
        let t = apply(&mut m, deleted("a", "q"));
        assert_eq!(kinds(&t), [EventKind::Terminate]);
        assert_eq!(
            (t.events[0].hypervisor.as_str(), t.events[0].reason),
            ("firecracker", REASON_POD_DELETED)
        );
        assert_eq!(t.events[0].identity, Some(identity("q")));
        assert!(apply(&mut m, deleted("a", "q")).events.is_empty());
        assert_eq!(m.pods.keys().collect::<Vec<_>>(), ["z"]);
        // Gone, but its identity stays as its tombstone; a new Pod for it replaces that.
        assert_eq!(
            m.snapshot().identity_of("a"),
            Some(&identity("q")),
            "departed"
        );
        apply(&mut m, created("a", "r"));
        assert!(m.departed.is_empty());
        assert_eq!(m.snapshot().identity_of("a"), Some(&identity("r")));
    }

    #[test]
    fn tombstones_last_the_retention_and_are_bounded() {
        let limits = DepartedLimits {
            retention: Duration::from_millis(300),
            max: 2,
        };
        let mut m = Instances::seeded(BTreeMap::new(), BTreeMap::new(), limits);
        for uuid in ["a", "b", "c"] {
            apply(&mut m, created(uuid, uuid));
            apply(&mut m, deleted(uuid, uuid));
            std::thread::sleep(Duration::from_millis(5));
        }
        // The oldest went past the bound.
        assert_eq!(m.departed.keys().collect::<Vec<_>>(), ["b", "c"]);
        // A VMM without a Pod is not a tombstone; one that had an identity is.
        apply(
            &mut m,
            InstanceUpdate::Add(instance(7, "solo", 10, Origin::Exec)),
        );
        apply(&mut m, exit(7, 0, false));
        assert!(!m.departed.contains_key("solo"));
        std::thread::sleep(Duration::from_millis(350));
        assert!(m.prune_departed(SystemTime::now()));
        assert!(m.departed.is_empty(), "expired");
    }

    #[test]
    fn a_vmm_outliving_its_pod_keeps_the_identity_and_seeds_are_not_created_again() {
        let mut m = Instances::seeded(
            BTreeMap::from([(
                "b".to_owned(),
                PodBacked {
                    identity: identity("p"),
                    created: SystemTime::UNIX_EPOCH,
                    hypervisor: None,
                },
            )]),
            BTreeMap::new(),
            DepartedLimits::default(),
        );
        // Running before the Pod's first report after a restart: named from the seed.
        apply(
            &mut m,
            InstanceUpdate::Add(instance(2, "b", 10, Origin::Discovered)),
        );
        assert_eq!(m.by_pid[&2].identity, Some(identity("p")));
        let again = apply(&mut m, created("b", "p"));
        assert!(again.events.is_empty(), "created before the restart");
        let t = apply(&mut m, deleted("b", "p"));
        assert_eq!(kinds(&t), [EventKind::Terminate]);
        assert_eq!(t.events[0].hypervisor, "firecracker");
        // The VMM still runs: it keeps the identity, and its stop carries it.
        assert_eq!(m.by_pid[&2].identity, Some(identity("p")));
        assert!(m.departed.is_empty(), "its VMM still runs");
        let stop = apply(&mut m, exit(2, 15, false));
        assert_eq!(stop.events[0].identity, Some(identity("p")));
        assert_eq!(
            m.departed["b"].identity,
            identity("p"),
            "gone when its VMM went"
        );
        // A VMM without a Pod has none.
        let other = apply(
            &mut m,
            InstanceUpdate::Add(instance(3, "c", 10, Origin::Exec)),
        );
        assert_eq!(other.events[0].identity, None);
    }
}
