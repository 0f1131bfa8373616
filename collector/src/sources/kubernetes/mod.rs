//! The Kubernetes identity source: which instance each Pod of this node backs, and whose it is.
//!
//! Two watches (kube-rs's watcher: list, then watch from the list's resourceVersion with
//! bookmarks; a relist after `410 Gone`; backoff on errors):
//! - the Pods of this node, selected by the API server (a label selector for the runtime's
//!   Pods, a field selector for the node), so that the collector receives and keeps only this
//!   node's Pods;
//! - Namespace metadata (`PartialObjectMetadata`): the project and the Instance's namespace
//!   are Namespace labels. Every Namespace's changes arrive, but only those with a Pod of this
//!   node are kept; one that is not kept yet is read once with a GET.
//!
//! The join key with the kernel's view is the instance id in
//! `status.containerStatuses[].containerID` (any `scheme://` removed). Out comes a stream of
//! [`IdentityUpdate`]s ([`view`] has the rules). docs/kubernetes.md describes the settings,
//! the RBAC it needs and the Kubernetes versions supported.

pub(crate) mod client;
pub(crate) mod objects;
mod view;

use std::{collections::VecDeque, pin::pin, time::Duration};

use futures_util::{StreamExt, stream::FuturesUnordered};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::{
    Api, Client,
    api::ListParams,
    core::PartialObjectMeta,
    runtime::{WatchStreamExt, watcher},
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use self::{
    objects::{NamespaceLabels, PodKey, PodRecord},
    view::{Fetched, View},
};
use crate::{
    config::{KubernetesConfig, NODE_PLACEHOLDER},
    model::identity::{Identity, IdentityUpdate},
};

/// Namespace reads in flight at once (a start-up with many namespaces does not open a
/// connection per namespace).
const FETCHES_IN_FLIGHT: usize = 4;
/// Bound of one Namespace read.
const FETCH_TIMEOUT: Duration = Duration::from_secs(10);
/// Wait before reading again a Namespace whose read failed.
const FETCH_RETRY: Duration = Duration::from_secs(5);

/// The selectors of this node's Pods, the node name filled in.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Selectors {
    pub(crate) labels: String,
    pub(crate) fields: String,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum SelectorError {
    #[error(
        "kubernetes.pod_field_selector {selector:?} needs the node name: pass --node-name or set NODE_NAME"
    )]
    NodeUnknown { selector: String },
    #[error("node name {0:?} is not a Kubernetes node name")]
    InvalidNode(String),
}

/// A node name as Kubernetes allows it (an RFC 1123 subdomain), so that it cannot change the
/// selector it is put in.
fn valid_node_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 253
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-' || b == b'.')
        && !name.starts_with(['-', '.'])
        && !name.ends_with(['-', '.'])
}

impl Selectors {
    /// The configured selectors with `{node}` replaced by `node`.
    pub(crate) fn resolve(
        config: &KubernetesConfig,
        node: Option<&str>,
    ) -> Result<Self, SelectorError> {
        if let Some(node) = node
            && !valid_node_name(node)
        {
            return Err(SelectorError::InvalidNode(node.to_owned()));
        }
        let fields = if config.pod_field_selector.contains(NODE_PLACEHOLDER) {
            let node = node.ok_or_else(|| SelectorError::NodeUnknown {
                selector: config.pod_field_selector.clone(),
            })?;
            config.pod_field_selector.replace(NODE_PLACEHOLDER, node)
        } else {
            config.pod_field_selector.clone()
        };
        Ok(Self {
            labels: config.pod_label_selector.clone(),
            fields,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum StartError {
    #[error(transparent)]
    Client(#[from] client::ClientError),
    #[error(transparent)]
    Selector(#[from] SelectorError),
}

/// The node name: `--node-name`, else the `NODE_NAME` environment variable (the DaemonSet sets
/// it from `spec.nodeName`).
pub(crate) fn node_name(flag: Option<String>) -> Option<String> {
    flag.or_else(|| std::env::var("NODE_NAME").ok())
        .filter(|n| !n.is_empty())
}

/// The source, configured from `config`, the node name and the environment; `None` (with one
/// info log line) when it is turned off or there is no client configuration.
pub(crate) async fn configure(
    config: &KubernetesConfig,
    node: Option<String>,
    seed: Vec<(String, Identity)>,
    updates: mpsc::Sender<IdentityUpdate>,
) -> Result<Option<KubernetesSource>, StartError> {
    if !config.enabled {
        info!(reason = "disabled", "kubernetes identity source off");
        return Ok(None);
    }
    let Some((client, origin)) = client::connect().await? else {
        // Not in a cluster and KUBECONFIG unset: a bare host.
        info!(
            reason = "no_client_configuration",
            "kubernetes identity source off"
        );
        return Ok(None);
    };
    let selectors = Selectors::resolve(config, node.as_deref())?;
    info!(
        client = origin.as_str(),
        node = node.as_deref(),
        "kubernetes client configured"
    );
    Ok(Some(KubernetesSource {
        client,
        selectors,
        node,
        seed,
        updates,
    }))
}

/// The source, ready to run.
pub(crate) struct KubernetesSource {
    pub(crate) client: Client,
    pub(crate) selectors: Selectors,
    /// The host's node name (reported as each identity's `node`).
    pub(crate) node: Option<String>,
    /// Identities reported before a restart (the state file), so that they are not reported
    /// again, and are deleted if their Pod went while the collector was down.
    pub(crate) seed: Vec<(String, Identity)>,
    pub(crate) updates: mpsc::Sender<IdentityUpdate>,
}

/// Reads a Namespace's labels: a list selecting it by name, so that `list` on namespaces
/// (which the watch needs anyway) is all the RBAC asks for.
async fn fetch(api: Api<PartialObjectMeta<Namespace>>, name: String) -> (String, Fetched) {
    // A Namespace's name is a DNS label: it cannot change the selector it is put in.
    if !valid_node_name(&name) || name.contains('.') {
        return (name, Fetched::NotFound);
    }
    let params = ListParams::default().fields(&format!("metadata.name={name}"));
    let fetched = match tokio::time::timeout(FETCH_TIMEOUT, api.list(&params)).await {
        Ok(Ok(list)) => match list.items.first() {
            Some(namespace) => Fetched::Found(NamespaceLabels::from_labels(
                namespace.metadata.labels.as_ref(),
            )),
            None => Fetched::NotFound,
        },
        Ok(Err(error)) => {
            warn!(%error, namespace = name.as_str(), "kubernetes namespace read failed");
            Fetched::Failed
        }
        Err(_) => {
            warn!(
                namespace = name.as_str(),
                timeout_seconds = FETCH_TIMEOUT.as_secs(),
                "kubernetes namespace read timed out"
            );
            Fetched::Failed
        }
    };
    (name, fetched)
}

impl KubernetesSource {
    /// Watches until `stop` is cancelled or the receiver of the updates is gone.
    pub(crate) async fn run(self, stop: CancellationToken) {
        let mut pod_config = watcher::Config::default();
        if !self.selectors.labels.is_empty() {
            pod_config = pod_config.labels(&self.selectors.labels);
        }
        if !self.selectors.fields.is_empty() {
            pod_config = pod_config.fields(&self.selectors.fields);
        }
        let namespace_api: Api<PartialObjectMeta<Namespace>> = Api::all(self.client.clone());
        let mut pods =
            pin!(watcher(Api::<Pod>::all(self.client.clone()), pod_config).default_backoff());
        let mut namespaces =
            pin!(watcher(namespace_api.clone(), watcher::Config::default()).default_backoff());
        let mut view = View::new(self.node.clone(), self.seed);
        let mut fetches = FuturesUnordered::new();
        // Reads wait here for a slot; failed ones wait for their retry outside the slots, so
        // that Namespaces that cannot be read never hold back the others.
        let mut queued: VecDeque<String> = VecDeque::new();
        let mut retries = FuturesUnordered::new();
        info!(
            label_selector = self.selectors.labels.as_str(),
            field_selector = self.selectors.fields.as_str(),
            "kubernetes identity source started"
        );
        loop {
            while fetches.len() < FETCHES_IN_FLIGHT
                && let Some(name) = queued.pop_front()
            {
                fetches.push(fetch(namespace_api.clone(), name));
            }
            let updates = tokio::select! {
                () = stop.cancelled() => return,
                Some(event) = pods.next() => match event {
                    Ok(event) => pod_event(&mut view, event),
                    Err(error) => {
                        warn!(%error, resource = "pods", "kubernetes watch failed, retrying");
                        Vec::new()
                    }
                },
                Some(event) = namespaces.next() => match event {
                    Ok(event) => namespace_event(&mut view, event),
                    Err(error) => {
                        warn!(%error, resource = "namespaces", "kubernetes watch failed, retrying");
                        Vec::new()
                    }
                },
                Some((name, fetched)) = fetches.next(), if !fetches.is_empty() => {
                    let failed = matches!(fetched, Fetched::Failed);
                    let updates = view.namespace_fetched(&name, fetched);
                    if failed && view.wants_namespace(&name) {
                        retries.push(async move {
                            tokio::time::sleep(FETCH_RETRY).await;
                            name
                        });
                    }
                    updates
                }
                Some(name) = retries.next(), if !retries.is_empty() => {
                    if view.wants_namespace(&name) {
                        queued.push_back(name);
                    }
                    Vec::new()
                }
            };
            queued.extend(view.take_fetches());
            for update in updates {
                if update == IdentityUpdate::Synced {
                    info!(
                        pods = view.pods(),
                        instances = view.instances(),
                        namespaces = view.namespaces(),
                        "kubernetes pods listed"
                    );
                }
                tokio::select! {
                    () = stop.cancelled() => return,
                    sent = self.updates.send(update) => if sent.is_err() { return },
                }
            }
        }
    }
}

fn pod_event(view: &mut View, event: watcher::Event<Pod>) -> Vec<IdentityUpdate> {
    match event {
        watcher::Event::Init => {
            view.relist_begins();
            Vec::new()
        }
        watcher::Event::InitApply(pod) | watcher::Event::Apply(pod) => {
            PodRecord::from_pod(&pod).map_or_else(Vec::new, |record| view.pod_applied(record))
        }
        watcher::Event::Delete(pod) => match (pod.metadata.namespace, pod.metadata.name) {
            (Some(namespace), Some(name)) => view.pod_deleted(&PodKey { namespace, name }),
            _ => Vec::new(),
        },
        watcher::Event::InitDone => view.relist_done(),
    }
}

fn namespace_event(
    view: &mut View,
    event: watcher::Event<PartialObjectMeta<Namespace>>,
) -> Vec<IdentityUpdate> {
    match event {
        watcher::Event::InitApply(namespace) | watcher::Event::Apply(namespace) => {
            let Some(name) = namespace.metadata.name.as_deref() else {
                return Vec::new();
            };
            view.namespace_applied(
                name,
                NamespaceLabels::from_labels(namespace.metadata.labels.as_ref()),
            )
        }
        // A deleted Namespace's Pods are deleted too; until then they keep the labels they had.
        watcher::Event::Delete(_) | watcher::Event::Init | watcher::Event::InitDone => Vec::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn selectors_fill_in_the_node() {
        let config = KubernetesConfig::default();
        assert_eq!(
            Selectors::resolve(&config, Some("node-1.example")).unwrap(),
            Selectors {
                labels: "managed-by=infra-provider-unikraft".into(),
                fields: "spec.nodeName=kraftlet-node-1.example".into(),
            }
        );
        let err = Selectors::resolve(&config, None).unwrap_err();
        assert!(err.to_string().contains("--node-name"), "{err}");
        for bad in ["", "a,b", "a=b", "Node", "-a", "a b"] {
            assert!(
                matches!(
                    Selectors::resolve(&config, Some(bad)),
                    Err(SelectorError::InvalidNode(_))
                ),
                "{bad:?}"
            );
        }
        let kata = KubernetesConfig {
            pod_label_selector: "managed-by=kata-provider".into(),
            pod_field_selector: "spec.nodeName={node}".into(),
            ..KubernetesConfig::default()
        };
        assert_eq!(
            Selectors::resolve(&kata, Some("n1")).unwrap().fields,
            "spec.nodeName=n1"
        );
        let everywhere = KubernetesConfig {
            pod_field_selector: String::new(),
            ..KubernetesConfig::default()
        };
        assert_eq!(Selectors::resolve(&everywhere, None).unwrap().fields, "");
    }
}
