//! The source's view of this node: the Pods that back instances, the labels of their
//! Namespaces, and what it last reported per instance. Pure: watch events in, identity
//! updates out, so each rule is tested without a server.
//!
//! Rules:
//! - an instance is reported `Created` once its Pod is known and the Pod's Namespace has been
//!   read (or found unreadable), so that the first report already carries the project;
//! - `Changed` when what names it changes, `Deleted` (with the identity it had) when its Pod is
//!   gone: by a watch event, or missing from a relist (a deletion missed while the watch was
//!   down);
//! - identities seeded from before a restart are not reported again when their Pod is still
//!   there, and are `Deleted` after the first full list if it is not;
//! - a Namespace is kept only while a Pod of this node is in it; one that is not kept yet is
//!   read once (the caller's fetch), so memory follows this node's Pods, not the cluster;
//! - `Synced` follows a complete list once every Pod in it has been reported.

use std::collections::{BTreeSet, HashMap, HashSet};

use super::objects::{NamespaceLabels, PodKey, PodRecord};
use crate::model::identity::{Identity, IdentityUpdate};

/// Where a kept Namespace's labels stand.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Labels {
    /// Not read yet: its Pods wait (not reported) until it is.
    Reading,
    /// Read from the watch or a fetch.
    Known(NamespaceLabels),
    /// The fetch failed or found nothing: its Pods are reported without the Namespace's
    /// labels; the last known ones are kept when there were some.
    Unavailable(Option<NamespaceLabels>),
}

#[derive(Debug)]
struct KeptNamespace {
    labels: Labels,
    /// Pods of this node in it.
    pods: usize,
}

/// What an instance should be reported as now.
#[derive(Debug)]
enum Desired {
    /// No Pod backs it.
    Absent,
    /// Its Pod's Namespace is being read.
    Waiting,
    Ready(Identity),
}

/// What a namespace fetch found.
#[derive(Debug)]
pub(crate) enum Fetched {
    Found(NamespaceLabels),
    /// 404: deleted, or never there.
    NotFound,
    /// The request failed; the caller retries.
    Failed,
}

#[derive(Debug, Default)]
pub(crate) struct View {
    /// The host's node name, reported as `node`; else the Pod's `spec.nodeName`.
    host_node: Option<String>,
    pods: HashMap<PodKey, PodRecord>,
    /// Pods claiming each instance id: the first backs it (a second is a runtime's mistake).
    backing: HashMap<String, Vec<PodKey>>,
    namespaces: HashMap<String, KeptNamespace>,
    /// What was last reported per instance (seeded from the state file after a restart).
    reported: HashMap<String, Identity>,
    /// Pods seen since a relist began.
    relisting: Option<HashSet<PodKey>>,
    /// A full list has been applied (deletions can be told from not-yet-listed).
    synced: bool,
    /// A list is complete but some of its Pods wait for their Namespace: `Synced` once none do.
    sync_due: bool,
    /// Namespaces to read, for the caller.
    to_fetch: Vec<String>,
}

impl View {
    pub(crate) fn new(
        host_node: Option<String>,
        seed: impl IntoIterator<Item = (String, Identity)>,
    ) -> Self {
        Self {
            host_node,
            reported: seed.into_iter().collect(),
            ..Self::default()
        }
    }

    /// Pods of this node kept.
    pub(crate) fn pods(&self) -> usize {
        self.pods.len()
    }

    /// Instances currently reported.
    pub(crate) fn instances(&self) -> usize {
        self.reported.len()
    }

    /// Namespaces kept (those with a Pod of this node).
    pub(crate) fn namespaces(&self) -> usize {
        self.namespaces.len()
    }

    /// Namespaces the caller should read now (each asked for once).
    pub(crate) fn take_fetches(&mut self) -> Vec<String> {
        std::mem::take(&mut self.to_fetch)
    }

    /// A list of the Pods begins (the first, or a relist after `410 Gone`).
    pub(crate) fn relist_begins(&mut self) {
        self.relisting = Some(HashSet::new());
    }

    /// The list is complete: Pods not in it are gone.
    pub(crate) fn relist_done(&mut self) -> Vec<IdentityUpdate> {
        let seen = self.relisting.take().unwrap_or_default();
        let gone: Vec<PodKey> = self
            .pods
            .keys()
            .filter(|k| !seen.contains(*k))
            .cloned()
            .collect();
        for key in gone {
            self.remove_pod(&key);
        }
        self.synced = true;
        self.sync_due = true;
        let all: BTreeSet<String> = self
            .reported
            .keys()
            .chain(self.backing.keys())
            .cloned()
            .collect();
        let updates = self.reconcile(all);
        self.then_synced(updates)
    }

    /// `updates`, then `Synced` if a list is complete and no Pod waits for its Namespace.
    fn then_synced(&mut self, mut updates: Vec<IdentityUpdate>) -> Vec<IdentityUpdate> {
        if self.sync_due
            && !self
                .namespaces
                .values()
                .any(|n| n.labels == Labels::Reading)
        {
            self.sync_due = false;
            updates.push(IdentityUpdate::Synced);
        }
        updates
    }

    /// A Pod was listed, added or changed.
    pub(crate) fn pod_applied(&mut self, record: PodRecord) -> Vec<IdentityUpdate> {
        if let Some(seen) = &mut self.relisting {
            seen.insert(record.key.clone());
        }
        let mut affected: BTreeSet<String> = record.instance_uuids.iter().cloned().collect();
        let key = record.key.clone();
        match self.pods.get(&key) {
            Some(old) => {
                let dropped: Vec<String> = old
                    .instance_uuids
                    .iter()
                    .filter(|u| !record.instance_uuids.contains(u))
                    .cloned()
                    .collect();
                for uuid in dropped {
                    self.unback(&uuid, &key);
                    affected.insert(uuid);
                }
            }
            None => self.keep_namespace(&key.namespace),
        }
        for uuid in &record.instance_uuids {
            let pods = self.backing.entry(uuid.clone()).or_default();
            if !pods.contains(&key) {
                pods.push(key.clone());
            }
        }
        self.pods.insert(key, record);
        self.reconcile(affected)
    }

    /// A Pod was deleted.
    pub(crate) fn pod_deleted(&mut self, key: &PodKey) -> Vec<IdentityUpdate> {
        let affected = self.remove_pod(key);
        let updates = self.reconcile(affected);
        self.then_synced(updates)
    }

    /// A Namespace was listed, added or changed (the watch: every Namespace of the cluster;
    /// only kept ones matter).
    pub(crate) fn namespace_applied(
        &mut self,
        name: &str,
        labels: NamespaceLabels,
    ) -> Vec<IdentityUpdate> {
        let Some(kept) = self.namespaces.get_mut(name) else {
            return Vec::new();
        };
        if kept.labels == Labels::Known(labels.clone()) {
            return Vec::new();
        }
        kept.labels = Labels::Known(labels);
        let updates = self.reconcile_namespace(name);
        self.then_synced(updates)
    }

    /// A fetch of a Namespace answered. A watch event that came first wins: it is as new.
    pub(crate) fn namespace_fetched(
        &mut self,
        name: &str,
        fetched: Fetched,
    ) -> Vec<IdentityUpdate> {
        let Some(kept) = self.namespaces.get_mut(name) else {
            return Vec::new();
        };
        let last = match &kept.labels {
            Labels::Known(_) => return Vec::new(),
            Labels::Reading => None,
            Labels::Unavailable(last) => last.clone(),
        };
        let labels = match fetched {
            Fetched::Found(labels) => Labels::Known(labels),
            Fetched::NotFound | Fetched::Failed => Labels::Unavailable(last),
        };
        if kept.labels == labels {
            return Vec::new();
        }
        kept.labels = labels;
        let updates = self.reconcile_namespace(name);
        self.then_synced(updates)
    }

    /// Whether a failed fetch of `name` should be retried (it is still kept and unread).
    pub(crate) fn wants_namespace(&self, name: &str) -> bool {
        self.namespaces
            .get(name)
            .is_some_and(|n| !matches!(n.labels, Labels::Known(_)))
    }

    fn keep_namespace(&mut self, name: &str) {
        let kept = self
            .namespaces
            .entry(name.to_owned())
            .or_insert_with(|| KeptNamespace {
                labels: Labels::Reading,
                pods: 0,
            });
        kept.pods += 1;
        if kept.pods == 1 {
            self.to_fetch.push(name.to_owned());
        }
    }

    fn unback(&mut self, uuid: &str, key: &PodKey) {
        if let Some(pods) = self.backing.get_mut(uuid) {
            pods.retain(|k| k != key);
            if pods.is_empty() {
                self.backing.remove(uuid);
            }
        }
    }

    /// Forgets a Pod; the instances it backed.
    fn remove_pod(&mut self, key: &PodKey) -> BTreeSet<String> {
        let Some(record) = self.pods.remove(key) else {
            return BTreeSet::new();
        };
        for uuid in &record.instance_uuids {
            self.unback(uuid, key);
        }
        if let Some(kept) = self.namespaces.get_mut(&key.namespace) {
            kept.pods -= 1;
            if kept.pods == 0 {
                self.namespaces.remove(&key.namespace);
            }
        }
        record.instance_uuids.into_iter().collect()
    }

    fn reconcile_namespace(&mut self, name: &str) -> Vec<IdentityUpdate> {
        let affected: BTreeSet<String> = self
            .pods
            .values()
            .filter(|p| p.key.namespace == name)
            .flat_map(|p| p.instance_uuids.iter().cloned())
            .collect();
        self.reconcile(affected)
    }

    /// The identity `uuid` should have now.
    fn desired(&self, uuid: &str) -> Desired {
        let Some(key) = self.backing.get(uuid).and_then(|pods| pods.first()) else {
            return Desired::Absent;
        };
        let pod = &self.pods[key];
        let namespace = match self.namespaces.get(&key.namespace).map(|n| &n.labels) {
            Some(Labels::Reading) => return Desired::Waiting,
            Some(Labels::Known(labels) | Labels::Unavailable(Some(labels))) => labels.clone(),
            Some(Labels::Unavailable(None)) | None => NamespaceLabels::default(),
        };
        Desired::Ready(Identity {
            project: namespace.project,
            instance_name: pod.instance_name.clone(),
            instance_namespace: namespace.instance_namespace,
            workload: pod.workload.clone(),
            pod: key.name.clone(),
            pod_namespace: key.namespace.clone(),
            node: self
                .host_node
                .clone()
                .unwrap_or_else(|| pod.node_name.clone()),
        })
    }

    /// The updates that bring `reported` to what the Pods say, for `uuids`.
    fn reconcile(&mut self, uuids: BTreeSet<String>) -> Vec<IdentityUpdate> {
        let mut updates = Vec::new();
        for instance_uuid in uuids {
            match (
                self.desired(&instance_uuid),
                self.reported.get(&instance_uuid),
            ) {
                (Desired::Ready(identity), None) => {
                    self.reported
                        .insert(instance_uuid.clone(), identity.clone());
                    updates.push(IdentityUpdate::Created {
                        instance_uuid,
                        identity,
                    });
                }
                (Desired::Ready(identity), Some(old)) if *old != identity => {
                    self.reported
                        .insert(instance_uuid.clone(), identity.clone());
                    updates.push(IdentityUpdate::Changed {
                        instance_uuid,
                        identity,
                    });
                }
                // Before the first full list, an instance not listed yet may still be there.
                (Desired::Absent, Some(_)) if self.synced => {
                    let identity = self.reported.remove(&instance_uuid).expect("reported");
                    updates.push(IdentityUpdate::Deleted {
                        instance_uuid,
                        identity,
                    });
                }
                _ => {}
            }
        }
        updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pod(ns: &str, name: &str, uuids: &[&str]) -> PodRecord {
        PodRecord {
            key: key(ns, name),
            node_name: "kraftlet-n1".into(),
            instance_name: Some(format!("{name}-instance")),
            workload: Some("web".into()),
            instance_uuids: uuids.iter().map(|u| (*u).to_owned()).collect(),
        }
    }

    fn key(ns: &str, name: &str) -> PodKey {
        PodKey {
            namespace: ns.into(),
            name: name.into(),
        }
    }

    fn project(p: &str) -> NamespaceLabels {
        NamespaceLabels {
            project: Some(p.into()),
            instance_namespace: Some("default".into()),
        }
    }

    /// (kind, uuid, project) of each update.
    fn summary(updates: &[IdentityUpdate]) -> Vec<(&'static str, String, Option<String>)> {
        updates
            .iter()
            .map(|u| match u {
                IdentityUpdate::Created {
                    instance_uuid,
                    identity,
                } => ("created", instance_uuid.clone(), identity.project.clone()),
                IdentityUpdate::Changed {
                    instance_uuid,
                    identity,
                } => ("changed", instance_uuid.clone(), identity.project.clone()),
                IdentityUpdate::Deleted {
                    instance_uuid,
                    identity,
                } => ("deleted", instance_uuid.clone(), identity.project.clone()),
                IdentityUpdate::Synced => ("synced", String::new(), None),
            })
            .collect()
    }

    fn s(
        kind: &'static str,
        uuid: &str,
        project: Option<&str>,
    ) -> (&'static str, String, Option<String>) {
        (kind, uuid.to_owned(), project.map(str::to_owned))
    }

    #[test]
    fn a_pod_is_reported_once_its_namespace_is_read() {
        let mut view = View::new(Some("n1".into()), []);
        view.relist_begins();
        assert!(view.pod_applied(pod("ns-a", "p1", &["u1"])).is_empty());
        assert_eq!(view.take_fetches(), ["ns-a"]);
        assert!(
            view.relist_done().is_empty(),
            "synced once the namespace is read"
        );
        let updates = view.namespace_fetched("ns-a", Fetched::Found(project("pa")));
        assert_eq!(
            summary(&updates),
            [s("created", "u1", Some("pa")), s("synced", "", None)]
        );
        let IdentityUpdate::Created { identity, .. } = &updates[0] else {
            unreachable!()
        };
        assert_eq!(identity.node, "n1");
        assert_eq!(identity.pod, "p1");
        assert_eq!(identity.pod_namespace, "ns-a");
        assert_eq!(identity.instance_name.as_deref(), Some("p1-instance"));
        // A second Pod in the same namespace needs no fetch and is reported at once.
        assert_eq!(
            summary(&view.pod_applied(pod("ns-a", "p2", &["u2"]))),
            [s("created", "u2", Some("pa"))]
        );
        assert!(view.take_fetches().is_empty());
        // The same Pod again changes nothing.
        assert!(view.pod_applied(pod("ns-a", "p2", &["u2"])).is_empty());
    }

    #[test]
    fn namespace_changes_reach_every_instance_in_it_and_only_kept_ones_count() {
        let mut view = View::new(None, []);
        view.relist_begins();
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        view.pod_applied(pod("ns-a", "p2", &["u2"]));
        view.relist_done();
        assert!(view.namespace_applied("ns-other", project("x")).is_empty());
        assert_eq!(view.namespaces(), 1);
        assert_eq!(
            summary(&view.namespace_applied("ns-a", project("pa"))),
            [
                s("created", "u1", Some("pa")),
                s("created", "u2", Some("pa")),
                s("synced", "", None)
            ]
        );
        // The fetch answering after the watch is older news: ignored.
        assert!(
            view.namespace_fetched("ns-a", Fetched::Found(project("old")))
                .is_empty()
        );
        assert_eq!(
            summary(&view.namespace_applied("ns-a", project("pb"))),
            [
                s("changed", "u1", Some("pb")),
                s("changed", "u2", Some("pb"))
            ]
        );
        // Without a host node name, the Pod's node.
        let IdentityUpdate::Changed { identity, .. } =
            &view.namespace_applied("ns-a", project("pc"))[0]
        else {
            unreachable!()
        };
        assert_eq!(identity.node, "kraftlet-n1");
    }

    #[test]
    fn an_unreadable_namespace_does_not_hold_its_pods_back() {
        let mut view = View::new(None, []);
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        assert_eq!(
            summary(&view.namespace_fetched("ns-a", Fetched::Failed)),
            [s("created", "u1", None)]
        );
        assert!(view.wants_namespace("ns-a"));
        assert_eq!(
            summary(&view.namespace_fetched("ns-a", Fetched::Found(project("pa")))),
            [s("changed", "u1", Some("pa"))]
        );
        assert!(!view.wants_namespace("ns-a"));
    }

    #[test]
    fn deletions_by_event_and_by_relist() {
        let mut view = View::new(None, []);
        view.relist_begins();
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        view.pod_applied(pod("ns-a", "p2", &["u2"]));
        view.namespace_applied("ns-a", project("pa"));
        view.relist_done();
        assert_eq!(
            summary(&view.pod_deleted(&key("ns-a", "p1"))),
            [s("deleted", "u1", Some("pa"))]
        );
        // p2 is deleted while the watch is down: the relist does not list it.
        view.relist_begins();
        assert_eq!(
            summary(&view.relist_done()),
            [s("deleted", "u2", Some("pa")), s("synced", "", None)]
        );
        assert_eq!(
            (view.pods(), view.namespaces(), view.instances()),
            (0, 0, 0)
        );
        // Deleting what is gone does nothing.
        assert!(view.pod_deleted(&key("ns-a", "p2")).is_empty());
    }

    #[test]
    fn a_relist_keeps_what_is_still_there_without_new_reports() {
        let mut view = View::new(None, []);
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        view.namespace_applied("ns-a", project("pa"));
        view.relist_begins();
        assert!(view.pod_applied(pod("ns-a", "p1", &["u1"])).is_empty());
        assert_eq!(summary(&view.relist_done()), [s("synced", "", None)]);
    }

    #[test]
    fn seeded_identities_survive_a_restart_or_are_deleted_after_the_first_list() {
        let identity = |pod: &str| Identity {
            project: Some("pa".into()),
            instance_name: Some(format!("{pod}-instance")),
            instance_namespace: Some("default".into()),
            workload: Some("web".into()),
            pod: pod.into(),
            pod_namespace: "ns-a".into(),
            node: "kraftlet-n1".into(),
        };
        let seed = [
            ("u1".to_owned(), identity("p1")),
            ("u2".to_owned(), identity("p2")),
        ];
        let mut view = View::new(None, seed);
        // Only u2's Pod is still there; u1's was deleted while the collector was down.
        view.relist_begins();
        assert!(view.pod_applied(pod("ns-a", "p2", &["u2"])).is_empty());
        assert!(
            view.namespace_fetched("ns-a", Fetched::Found(project("pa")))
                .is_empty(),
            "u2 is as it was reported before; u1 is not deleted before the list is complete"
        );
        assert_eq!(
            summary(&view.relist_done()),
            [s("deleted", "u1", Some("pa")), s("synced", "", None)]
        );
        assert_eq!(view.instances(), 1);
    }

    #[test]
    fn a_new_container_id_is_a_new_instance_and_a_duplicate_waits_its_turn() {
        let mut view = View::new(None, []);
        view.relist_begins();
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        view.namespace_applied("ns-a", project("pa"));
        view.relist_done();
        assert_eq!(
            summary(&view.pod_applied(pod("ns-a", "p1", &["u9"]))),
            [
                s("deleted", "u1", Some("pa")),
                s("created", "u9", Some("pa"))
            ]
        );
        // A second Pod claiming u9: the first keeps it; when it goes, the second backs it.
        assert!(view.pod_applied(pod("ns-a", "p2", &["u9"])).is_empty());
        let updates = view.pod_deleted(&key("ns-a", "p1"));
        assert_eq!(summary(&updates), [s("changed", "u9", Some("pa"))]);
        let IdentityUpdate::Changed { identity, .. } = &updates[0] else {
            unreachable!()
        };
        assert_eq!(identity.pod, "p2");
    }

    #[test]
    fn a_pod_leaving_its_namespace_empty_lets_the_namespace_go() {
        let mut view = View::new(None, []);
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        assert_eq!(view.take_fetches(), ["ns-a"]);
        view.namespace_applied("ns-a", project("pa"));
        view.pod_deleted(&key("ns-a", "p1"));
        assert_eq!(view.namespaces(), 0);
        assert!(
            view.namespace_fetched("ns-a", Fetched::Found(project("late")))
                .is_empty()
        );
        // Back again: read again.
        view.pod_applied(pod("ns-a", "p1", &["u1"]));
        assert_eq!(view.take_fetches(), ["ns-a"]);
    }
}
