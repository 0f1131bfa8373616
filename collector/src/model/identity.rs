//! Whose an instance is: the Kubernetes identity of the Pod that backs it (project, Instance
//! name and namespace, workload, Pod, node), and the changes the Kubernetes source reports.
//!
//! Every field the fleet's Pods or Namespaces may lack is an `Option`: absent while unknown,
//! never an empty string, so an output can leave the label out instead of sending `""`.

use std::time::SystemTime;

use serde::{Deserialize, Serialize};

/// The identity of one instance, from its backing Pod and the Pod's Namespace.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub(crate) struct Identity {
    /// The project owning the Instance: the namespace label
    /// `resourcemanager.miloapis.com/project-name`, else `meta.datumapis.com/upstream-cluster-name`
    /// without its `cluster-` prefix.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) project: Option<String>,
    /// The Instance's name: the Pod label `upstream.instance`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) instance_name: Option<String>,
    /// The Instance's (upstream) namespace: the namespace label
    /// `meta.datumapis.com/upstream-namespace`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) instance_namespace: Option<String>,
    /// The Workload the Instance belongs to: the Pod label `compute.datumapis.com/workload-name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) workload: Option<String>,
    /// The backing Pod's name.
    pub(crate) pod: String,
    /// The backing Pod's namespace (on the edge cluster; `ns-<uuid>` in the fleet): where a
    /// reader's access to the instance's logs is reviewed.
    pub(crate) pod_namespace: String,
    /// The host's node name (the log pipeline's `k8s.node.name`); the Pod's `spec.nodeName`
    /// when the collector was not told its node.
    pub(crate) node: String,
}

/// A change of the instances backed by a Pod on this node, in the order the source saw them.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(tag = "update", rename_all = "snake_case")]
pub(crate) enum IdentityUpdate {
    /// A Pod backing this instance appeared on this node (once per instance, until `Deleted`).
    Created {
        instance_uuid: String,
        identity: Identity,
    },
    /// What names an instance already created changed (a label arrived or changed).
    Changed {
        instance_uuid: String,
        identity: Identity,
    },
    /// The Pod backing this instance is gone, with the identity it had.
    Deleted {
        instance_uuid: String,
        identity: Identity,
    },
    /// The source's view is complete: a full list of this node's Pods was applied, its missing
    /// Pods deleted, and every Pod in it reported (its Namespace read). Sent after every full
    /// list (the first one, and each relist after `410 Gone`).
    Synced,
}

/// An instance a Pod on this node backs: created, not yet terminated. Kept by the registry
/// whether or not its VMM runs (an instance scaled to zero has none).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct PodBacked {
    pub(crate) identity: Identity,
    /// When the collector reported its `create`.
    pub(crate) created: SystemTime,
    /// The hypervisor of the last VMM seen running it; `None` until one was.
    pub(crate) hypervisor: Option<String>,
}

/// The identity of an instance no Pod backs and no VMM runs any more (its tombstone), kept
/// while what it left may still be read (its console history and events, lines not yet
/// exported): the tenant can still be authorised for them and they are still attributed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Departed {
    pub(crate) identity: Identity,
    /// When the last of its Pod and VMMs went.
    pub(crate) since: SystemTime,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_fields_are_absent_on_the_wire_and_read_back() {
        let identity = Identity {
            project: Some("p".into()),
            instance_name: Some("web-0".into()),
            pod: "web-0-abc".into(),
            pod_namespace: "ns-1".into(),
            node: "n1".into(),
            ..Identity::default()
        };
        let update = IdentityUpdate::Created {
            instance_uuid: "u".into(),
            identity: identity.clone(),
        };
        let json = serde_json::to_value(&update).unwrap();
        assert_eq!(
            json,
            serde_json::json!({
                "update": "created",
                "instance_uuid": "u",
                "identity": {"project": "p", "instance_name": "web-0", "pod": "web-0-abc",
                             "pod_namespace": "ns-1", "node": "n1"}
            })
        );
        let back: Identity = serde_json::from_value(json["identity"].clone()).unwrap();
        assert_eq!(back, identity);
    }
}
