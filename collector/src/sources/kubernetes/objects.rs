//! What the source keeps of a Pod and of a Namespace: the few fields identity needs, taken from
//! the API's objects at once, so that memory is a small record per Pod of this node, not the
//! objects themselves. The label keys are the fleet's (docs/kubernetes.md).

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Pod;

/// Pod label: the Instance's name.
pub(crate) const LABEL_INSTANCE_NAME: &str = "upstream.instance";
/// Pod label: the Workload's name.
pub(crate) const LABEL_WORKLOAD: &str = "compute.datumapis.com/workload-name";
/// Namespace label: the project (first choice).
pub(crate) const LABEL_PROJECT: &str = "resourcemanager.miloapis.com/project-name";
/// Namespace label: the upstream cluster, `cluster-<project>` (second choice for the project).
pub(crate) const LABEL_UPSTREAM_CLUSTER: &str = "meta.datumapis.com/upstream-cluster-name";
/// Namespace label: the Instance's (upstream) namespace.
pub(crate) const LABEL_UPSTREAM_NAMESPACE: &str = "meta.datumapis.com/upstream-namespace";
/// The prefix of [`LABEL_UPSTREAM_CLUSTER`]'s value before the project.
const CLUSTER_PREFIX: &str = "cluster-";
/// Longest instance id taken from a container ID (discovery's bound on ids).
const MAX_ID_BYTES: usize = 128;

/// A Pod's namespace and name.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) struct PodKey {
    pub(crate) namespace: String,
    pub(crate) name: String,
}

/// What identity needs of a Pod.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodRecord {
    pub(crate) key: PodKey,
    /// `spec.nodeName` (the virtual node `kraftlet-<node>` for the Unikraft runtime).
    pub(crate) node_name: String,
    pub(crate) instance_name: Option<String>,
    pub(crate) workload: Option<String>,
    /// Instance ids from `status.containerStatuses[].containerID`, in order, without repeats.
    pub(crate) instance_uuids: Vec<String>,
}

/// What identity needs of a Namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct NamespaceLabels {
    pub(crate) project: Option<String>,
    pub(crate) instance_namespace: Option<String>,
}

/// A label's value; an empty one counts as absent.
fn label(labels: Option<&BTreeMap<String, String>>, key: &str) -> Option<String> {
    labels
        .and_then(|l| l.get(key))
        .filter(|v| !v.is_empty())
        .cloned()
}

/// The instance id a container ID carries: the ID without any `scheme://` (`ukp://<uuid>`,
/// `containerd://<id>`), if what remains is a usable id (ASCII letters, digits, `-`, `_`,
/// `.`, not starting with `.`, at most 128 bytes), so that it is safe wherever ids go (paths,
/// labels).
pub(crate) fn instance_uuid(container_id: &str) -> Option<&str> {
    let id = container_id
        .split_once("://")
        .map_or(container_id, |(_, rest)| rest);
    let usable = !id.is_empty()
        && id.len() <= MAX_ID_BYTES
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'));
    usable.then_some(id)
}

impl PodRecord {
    /// The record of `pod`; `None` for an object without a name or namespace (the API never
    /// sends one).
    pub(crate) fn from_pod(pod: &Pod) -> Option<Self> {
        let meta = &pod.metadata;
        let key = PodKey {
            namespace: meta.namespace.clone()?,
            name: meta.name.clone()?,
        };
        let labels = meta.labels.as_ref();
        let mut instance_uuids: Vec<String> = Vec::new();
        let statuses = pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_deref())
            .unwrap_or_default();
        for status in statuses {
            if let Some(id) = status.container_id.as_deref().and_then(instance_uuid)
                && !instance_uuids.iter().any(|u| u == id)
            {
                instance_uuids.push(id.to_owned());
            }
        }
        Some(Self {
            key,
            node_name: pod
                .spec
                .as_ref()
                .and_then(|s| s.node_name.clone())
                .unwrap_or_default(),
            instance_name: label(labels, LABEL_INSTANCE_NAME),
            workload: label(labels, LABEL_WORKLOAD),
            instance_uuids,
        })
    }
}

impl NamespaceLabels {
    /// The identity labels of a namespace, the project in the fleet's order of precedence.
    pub(crate) fn from_labels(labels: Option<&BTreeMap<String, String>>) -> Self {
        let project = label(labels, LABEL_PROJECT).or_else(|| {
            label(labels, LABEL_UPSTREAM_CLUSTER).and_then(|cluster| {
                cluster
                    .strip_prefix(CLUSTER_PREFIX)
                    .filter(|p| !p.is_empty())
                    .map(str::to_owned)
            })
        });
        Self {
            project,
            instance_namespace: label(labels, LABEL_UPSTREAM_NAMESPACE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn container_ids_with_or_without_a_scheme() {
        let uuid = "3f0c6a52-0d3e-4c4e-9d0a-7c1e8f1b2a10";
        assert_eq!(instance_uuid(&format!("ukp://{uuid}")), Some(uuid));
        assert_eq!(instance_uuid(uuid), Some(uuid));
        assert_eq!(instance_uuid("containerd://abc123"), Some("abc123"));
        assert_eq!(instance_uuid("ukp://"), None);
        assert_eq!(instance_uuid(""), None);
        assert_eq!(instance_uuid("ukp://../etc"), None);
        assert_eq!(instance_uuid("ukp://a/b"), None);
        assert_eq!(instance_uuid("a b"), None);
        assert_eq!(instance_uuid(&"x".repeat(129)), None);
        assert_eq!(instance_uuid(&"x".repeat(128)).map(str::len), Some(128));
    }

    #[test]
    fn project_precedence() {
        type Case = (
            &'static [(&'static str, &'static str)],
            Option<&'static str>,
        );
        let cases: [Case; 7] = [
            (&[(LABEL_PROJECT, "p1")], Some("p1")),
            (
                &[
                    (LABEL_PROJECT, "p1"),
                    (LABEL_UPSTREAM_CLUSTER, "cluster-p2"),
                ],
                Some("p1"),
            ),
            (&[(LABEL_UPSTREAM_CLUSTER, "cluster-p2")], Some("p2")),
            (
                &[(LABEL_PROJECT, ""), (LABEL_UPSTREAM_CLUSTER, "cluster-p2")],
                Some("p2"),
            ),
            (&[(LABEL_UPSTREAM_CLUSTER, "p2")], None),
            (&[(LABEL_UPSTREAM_CLUSTER, "cluster-")], None),
            (&[], None),
        ];
        for (pairs, project) in cases {
            let l = labels(pairs);
            assert_eq!(
                NamespaceLabels::from_labels(Some(&l)).project.as_deref(),
                project,
                "{pairs:?}"
            );
        }
        let l = labels(&[(LABEL_UPSTREAM_NAMESPACE, "default")]);
        assert_eq!(
            NamespaceLabels::from_labels(Some(&l))
                .instance_namespace
                .as_deref(),
            Some("default")
        );
        assert_eq!(
            NamespaceLabels::from_labels(None),
            NamespaceLabels::default()
        );
    }

    #[test]
    fn pod_record_from_real_status_json() {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": "web-0-x", "namespace": "ns-1", "labels": {
                LABEL_INSTANCE_NAME: "web-0", LABEL_WORKLOAD: "web", "managed-by": "x"}},
            "spec": {"nodeName": "kraftlet-n1", "containers": [{"name": "vm", "image": "i"}]},
            "status": {"phase": "Running", "containerStatuses": [
                {"name": "vm", "image": "i", "imageID": "", "ready": true, "restartCount": 0,
                 "containerID": "ukp://u-1", "state": {"running": {"startedAt": "2026-01-01T00:00:00Z"}}},
                {"name": "side", "image": "i", "imageID": "", "ready": false, "restartCount": 0,
                 "containerID": "u-1"},
                {"name": "new", "image": "i", "imageID": "", "ready": false, "restartCount": 0}
            ]}
        }))
        .unwrap();
        let record = PodRecord::from_pod(&pod).unwrap();
        assert_eq!(
            record,
            PodRecord {
                key: PodKey {
                    namespace: "ns-1".into(),
                    name: "web-0-x".into()
                },
                node_name: "kraftlet-n1".into(),
                instance_name: Some("web-0".into()),
                workload: Some("web".into()),
                instance_uuids: vec!["u-1".into()],
            }
        );
    }
}
