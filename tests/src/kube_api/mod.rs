//! An in-process fake Kubernetes API server on loopback, for the real kube-rs client of the
//! collector: it serves over HTTP what the collector uses, the way the API server does.
//!
//! Implemented:
//! - Pods (`/api/v1/pods`, `/api/v1/namespaces/{ns}/pods[/{name}]`) and Namespaces
//!   (`/api/v1/namespaces[/{name}]`), stored as the API's JSON (Pods built with the status a
//!   kubelet reports, each checked against k8s-openapi's `Pod`);
//! - list: a `resourceVersion` per change, `limit`/`continue` pagination over a consistent
//!   snapshot (`410 Expired` for a continue token older than the last compaction), label
//!   selectors (equality, sets, existence) and field selectors (the fields the API server
//!   supports per resource; any other is a 400), `resourceVersion=0` served whole;
//! - watch: events after the given resourceVersion in order, selector-filtered with the API
//!   server's rule for objects moving in or out of a selector (`ADDED` / `DELETED`),
//!   `BOOKMARK`s with `allowWatchBookmarks`, `timeoutSeconds`, and a resourceVersion older
//!   than the last compaction answered as the watch cache does: HTTP 200 with one `ERROR`
//!   event holding a `410 Expired` Status;
//! - metadata-only requests (`Accept: ...;as=PartialObjectMetadata[List];g=meta.k8s.io;v=v1`);
//! - `TokenReview` (authentication.k8s.io/v1) and `SubjectAccessReview`
//!   (authorization.k8s.io/v1), evaluated against the tokens and RBAC grants a test sets up;
//! - authentication of every request (bearer tokens) and RBAC authorisation of it: the
//!   collector's service account has exactly the ClusterRole of deploy/base/rbac.yaml;
//! - outages: `cut` ends every open watch and answers 503 until `restore`; `compact` drops
//!   the change history (resourceVersions before it are gone).
//!
//! Not implemented (the collector does not use them): writes other than the reviews, any
//! other resource, protobuf, Table output, streaming lists (`sendInitialEvents`), `Exact`
//! resourceVersion matching (treated as `NotOlderThan`), TLS, API discovery, admission,
//! audiences bound to tokens, priority and fairness.

mod rbac;
mod selectors;

use std::{
    collections::{BTreeMap, HashMap, VecDeque},
    convert::Infallible,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, SystemTime},
};

use axum::{
    Router,
    body::{Body, Bytes},
    extract::{Query, State},
    http::{HeaderMap, Method, StatusCode, Uri, header},
    response::{IntoResponse, Response},
};
use serde_json::{Value, json};
use tokio::sync::{mpsc, watch};

pub use self::rbac::{Grant, PolicyRule, Subject};
use self::{
    rbac::Attributes,
    selectors::{FieldSelector, LabelSelector},
};
use crate::servers::workspace_root;

/// The collector's service-account token in the kubeconfig the fake writes.
pub const COLLECTOR_TOKEN: &str = "collector-service-account-token";
/// Change history kept; older changes are compacted away (as etcd and the watch cache do).
const MAX_HISTORY: usize = 50_000;
/// Default `timeoutSeconds` of a watch that gives none.
const DEFAULT_WATCH_TIMEOUT: Duration = Duration::from_mins(30);

/// A user as TokenReview reports it.
#[derive(Debug, Clone)]
pub struct User {
    pub username: String,
    pub uid: String,
    pub groups: Vec<String>,
}

/// A Pod to create: what the tests vary; the rest is what a kubelet reports.
#[derive(Debug, Clone)]
pub struct FakePod {
    pub namespace: String,
    pub name: String,
    /// `spec.nodeName`.
    pub node: String,
    pub labels: Vec<(String, String)>,
    /// `status.containerStatuses[0].containerID`; `None`: the container is being created.
    pub container_id: Option<String>,
}

impl FakePod {
    /// A Pod as the fleet's Unikraft runtime makes one: `managed-by=infra-provider-unikraft`,
    /// its Instance named `<name>-instance`, in the workload `web`, on `node`.
    pub fn unikraft(namespace: &str, name: &str, node: &str, container_id: Option<&str>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
            node: node.into(),
            labels: vec![
                ("managed-by".into(), "infra-provider-unikraft".into()),
                ("upstream.instance".into(), format!("{name}-instance")),
                ("compute.datumapis.com/workload-name".into(), "web".into()),
            ],
            container_id: container_id.map(str::to_owned),
        }
    }
}

/// Requests served and objects sent, for tests that assert what crossed the wire.
#[derive(Debug, Clone, Default)]
pub struct Counts {
    /// By `"<verb> <resource>"`: `list pods`, `watch namespaces`, `create tokenreviews`, ...
    pub requests: BTreeMap<String, u64>,
    /// Objects sent by resource: list items and watch event objects (bookmarks not counted).
    pub objects_sent: BTreeMap<String, u64>,
    /// `410 Expired` answers (watch events and lists).
    pub expired: u64,
}

impl Counts {
    pub fn requests(&self, what: &str) -> u64 {
        self.requests.get(what).copied().unwrap_or(0)
    }

    pub fn sent(&self, resource: &str) -> u64 {
        self.objects_sent.get(resource).copied().unwrap_or(0)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChangeType {
    Added,
    Modified,
    Deleted,
}

#[derive(Debug, Clone)]
struct Change {
    rv: u64,
    resource: &'static str,
    kind: ChangeType,
    object: Value,
    previous: Option<Value>,
}

#[derive(Debug)]
struct Page {
    rv: u64,
    items: Vec<Value>,
}

#[derive(Debug, Default)]
struct Store {
    rv: u64,
    /// ResourceVersions at or below this are compacted: a watch from before it gets 410.
    compacted: u64,
    pods: BTreeMap<(String, String), Value>,
    namespaces: BTreeMap<String, Value>,
    history: VecDeque<Change>,
    tokens: HashMap<String, User>,
    grants: Vec<Grant>,
    pages: HashMap<String, Page>,
    next_page: u64,
    down: bool,
    counts: Counts,
}

struct Shared {
    store: Mutex<Store>,
    /// The latest resourceVersion, for watches waiting for changes.
    changed: watch::Sender<u64>,
    /// Bumped by `cut`: every open watch ends.
    cuts: watch::Sender<u64>,
    bookmark_interval: Duration,
}

impl Shared {
    fn lock(&self) -> MutexGuard<'_, Store> {
        self.store
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

/// The running fake; stopped when dropped.
pub struct FakeKube {
    pub addr: SocketAddr,
    shared: Arc<Shared>,
    runtime: Option<tokio::runtime::Runtime>,
    dir: tempfile::TempDir,
}

/// RFC 3339 UTC of `t`, to the second (as the API server writes timestamps).
fn rfc3339(t: SystemTime) -> String {
    let secs = t
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    let days = secs / 86_400;
    let rem = secs % 86_400;
    // Civil date from days since 1970-01-01 (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + i64::from(month <= 2);
    format!(
        "{year:04}-{month:02}-{day:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

fn labels_of(object: &Value) -> BTreeMap<String, String> {
    serde_json::from_value(object["metadata"]["labels"].clone()).unwrap_or_default()
}

/// A `Status` error body, as the API server sends it.
fn status(code: u16, reason: &str, message: &str) -> Value {
    json!({
        "kind": "Status", "apiVersion": "v1", "metadata": {},
        "status": "Failure", "message": message, "reason": reason, "code": code
    })
}

fn status_response(code: u16, reason: &str, message: &str) -> Response {
    (
        StatusCode::from_u16(code).expect("status code"),
        [(header::CONTENT_TYPE, "application/json")],
        status(code, reason, message).to_string(),
    )
        .into_response()
}

fn json_response(value: &Value) -> Response {
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        value.to_string(),
    )
        .into_response()
}

fn expired() -> Value {
    status(
        410,
        "Expired",
        "The provided continue parameter is too old to display a consistent list result. \
         You can start a new list without the continue parameter.",
    )
}

/// The object as a metadata-only request sees it.
fn partial(object: &Value) -> Value {
    json!({
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": object["metadata"].clone(),
    })
}

fn kind_of(resource: &str) -> &'static str {
    if resource == "pods" {
        "Pod"
    } else {
        "Namespace"
    }
}

/// `object` with its resourceVersion set to `rv`.
fn at_rv(mut object: Value, rv: u64) -> Value {
    object["metadata"]["resourceVersion"] = json!(rv.to_string());
    object
}

/// What one list or watch request selects.
struct Selection {
    resource: &'static str,
    namespace: Option<String>,
    labels: LabelSelector,
    fields: FieldSelector,
    metadata_only: bool,
}

impl Selection {
    fn matches(&self, object: &Value) -> bool {
        self.namespace
            .as_ref()
            .is_none_or(|ns| object["metadata"]["namespace"] == ns.as_str())
            && self.labels.matches(&labels_of(object))
            && self.fields.matches(self.resource, object)
    }

    /// The object as this request receives it.
    fn view(&self, object: &Value) -> Value {
        if self.metadata_only {
            partial(object)
        } else {
            object.clone()
        }
    }

    /// The watch event a change is for this request, if any.
    fn event(&self, change: &Change) -> Option<Value> {
        if change.resource != self.resource {
            return None;
        }
        let now = self.matches(&change.object);
        let before = change.previous.as_ref().is_some_and(|p| self.matches(p));
        let (kind, object) = match (change.kind, before, now) {
            (ChangeType::Deleted, _, true) => ("DELETED", change.object.clone()),
            (ChangeType::Modified, true, true) => ("MODIFIED", change.object.clone()),
            // Added, or moved into the selection.
            (ChangeType::Added | ChangeType::Modified, _, true) => ("ADDED", change.object.clone()),
            // Left the selection: the watch cache sends the old object, at the new version.
            (ChangeType::Modified, true, false) => (
                "DELETED",
                at_rv(change.previous.clone().expect("previous"), change.rv),
            ),
            _ => return None,
        };
        Some(json!({"type": kind, "object": self.view(&object)}))
    }

    fn bookmark(&self, rv: u64) -> Value {
        let (kind, api_version) = if self.metadata_only {
            ("PartialObjectMetadata", "meta.k8s.io/v1")
        } else {
            (kind_of(self.resource), "v1")
        };
        json!({"type": "BOOKMARK", "object": {
            "kind": kind, "apiVersion": api_version,
            "metadata": {"resourceVersion": rv.to_string()}
        }})
    }
}

impl Store {
    fn count_request(&mut self, what: String) {
        *self.counts.requests.entry(what).or_default() += 1;
    }

    fn count_sent(&mut self, resource: &str, n: usize) {
        *self
            .counts
            .objects_sent
            .entry(resource.to_owned())
            .or_default() += n as u64;
    }

    /// Records a change at the next resourceVersion; the object as stored.
    fn change(
        &mut self,
        resource: &'static str,
        kind: ChangeType,
        object: Value,
        previous: Option<Value>,
    ) -> Value {
        self.rv += 1;
        let object = at_rv(object, self.rv);
        self.history.push_back(Change {
            rv: self.rv,
            resource,
            kind,
            object: object.clone(),
            previous,
        });
        while self.history.len() > MAX_HISTORY {
            let oldest = self.history.pop_front().expect("history");
            self.compacted = self.compacted.max(oldest.rv);
        }
        object
    }

    fn objects(&self, resource: &str) -> Vec<&Value> {
        if resource == "pods" {
            self.pods.values().collect()
        } else {
            self.namespaces.values().collect()
        }
    }
}

impl FakeKube {
    /// Starts the fake with bookmarks every second.
    pub fn start() -> Self {
        Self::start_with(Duration::from_secs(1))
    }

    /// Starts the fake, sending a watch bookmark every `bookmark_interval`.
    pub fn start_with(bookmark_interval: Duration) -> Self {
        let runtime = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .expect("fake API server runtime");
        let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind fake API server");
        listener.set_nonblocking(true).expect("nonblocking");
        let addr = listener.local_addr().expect("address");
        let shared = Arc::new(Shared {
            store: Mutex::new(Store::default()),
            changed: watch::Sender::new(0),
            cuts: watch::Sender::new(0),
            bookmark_interval,
        });
        collector_grants(&mut shared.lock());
        let app = Router::new()
            .fallback(handle)
            .with_state(Arc::clone(&shared));
        runtime.spawn(async move {
            let listener = tokio::net::TcpListener::from_std(listener).expect("listener");
            axum::serve(listener, app).await.expect("fake API server");
        });
        let dir = tempfile::tempdir().expect("kubeconfig dir");
        let fake = Self {
            addr,
            shared,
            runtime: Some(runtime),
            dir,
        };
        std::fs::write(fake.kubeconfig(), fake.kubeconfig_text()).expect("write kubeconfig");
        fake
    }

    /// A kubeconfig file pointing at the fake with the collector's token.
    pub fn kubeconfig(&self) -> PathBuf {
        self.dir.path().join("kubeconfig")
    }

    fn kubeconfig_text(&self) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: fake\n  cluster:\n    server: http://{}\n\
             contexts:\n- name: fake\n  context:\n    cluster: fake\n    user: collector\n\
             current-context: fake\nusers:\n- name: collector\n  user:\n    token: {COLLECTOR_TOKEN}\n",
            self.addr
        )
    }

    /// The folder the kubeconfig is in (for other files a test keeps beside it).
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }

    fn notify(&self, rv: u64) {
        self.shared.changed.send_replace(rv);
    }

    /// Creates a Namespace with `labels`.
    pub fn create_namespace(&self, name: &str, labels: &[(&str, &str)]) {
        let mut store = self.shared.lock();
        assert!(
            !store.namespaces.contains_key(name),
            "namespace {name} exists"
        );
        let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
        all.insert("kubernetes.io/metadata.name", name);
        let object = json!({
            "apiVersion": "v1", "kind": "Namespace",
            "metadata": {"name": name, "uid": uid(store.rv), "labels": all,
                         "creationTimestamp": rfc3339(SystemTime::now())},
            "spec": {"finalizers": ["kubernetes"]},
            "status": {"phase": "Active"}
        });
        let stored = store.change("namespaces", ChangeType::Added, object, None);
        store.namespaces.insert(name.to_owned(), stored);
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Replaces a Namespace's labels (keeping `kubernetes.io/metadata.name`).
    pub fn set_namespace_labels(&self, name: &str, labels: &[(&str, &str)]) {
        let mut store = self.shared.lock();
        let previous = store.namespaces[name].clone();
        let mut all: BTreeMap<&str, &str> = labels.iter().copied().collect();
        all.insert("kubernetes.io/metadata.name", name);
        let mut object = previous.clone();
        object["metadata"]["labels"] = json!(all);
        let stored = store.change("namespaces", ChangeType::Modified, object, Some(previous));
        store.namespaces.insert(name.to_owned(), stored);
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Creates a Pod as a kubelet would report it.
    pub fn create_pod(&self, pod: &FakePod) {
        let mut store = self.shared.lock();
        let key = (pod.namespace.clone(), pod.name.clone());
        assert!(!store.pods.contains_key(&key), "pod {key:?} exists");
        let object = pod_json(pod, &uid(store.rv));
        let stored = store.change("pods", ChangeType::Added, object, None);
        store.pods.insert(key, stored);
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Creates many Pods under one lock (a cluster's worth, quickly).
    pub fn create_pods(&self, pods: impl IntoIterator<Item = FakePod>) {
        let mut store = self.shared.lock();
        for pod in pods {
            let key = (pod.namespace.clone(), pod.name.clone());
            let object = pod_json(&pod, &uid(store.rv));
            let stored = store.change("pods", ChangeType::Added, object, None);
            store.pods.insert(key, stored);
        }
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Changes a Pod as a kubelet would when its container starts with `container_id`.
    pub fn start_container(&self, namespace: &str, name: &str, container_id: &str) {
        self.update_pod(namespace, name, |pod| {
            pod.container_id = Some(container_id.to_owned());
        });
    }

    /// Replaces a Pod's labels.
    pub fn set_pod_labels(&self, namespace: &str, name: &str, labels: &[(&str, &str)]) {
        self.update_pod(namespace, name, |pod| {
            pod.labels = labels
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect();
        });
    }

    fn update_pod(&self, namespace: &str, name: &str, f: impl FnOnce(&mut FakePod)) {
        let mut store = self.shared.lock();
        let key = (namespace.to_owned(), name.to_owned());
        let previous = store.pods[&key].clone();
        let mut pod = FakePod {
            namespace: namespace.to_owned(),
            name: name.to_owned(),
            node: previous["spec"]["nodeName"]
                .as_str()
                .unwrap_or("")
                .to_owned(),
            labels: labels_of(&previous).into_iter().collect(),
            container_id: previous
                .pointer("/status/containerStatuses/0/containerID")
                .and_then(Value::as_str)
                .map(str::to_owned),
        };
        f(&mut pod);
        let mut object = pod_json(&pod, previous["metadata"]["uid"].as_str().unwrap_or(""));
        object["metadata"]["creationTimestamp"] = previous["metadata"]["creationTimestamp"].clone();
        let stored = store.change("pods", ChangeType::Modified, object, Some(previous));
        store.pods.insert(key, stored);
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Deletes a Pod (its finalizers done: the `DELETED` event).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let mut store = self.shared.lock();
        let object = store
            .pods
            .remove(&(namespace.to_owned(), name.to_owned()))
            .unwrap_or_else(|| panic!("no pod {namespace}/{name}"));
        store.change("pods", ChangeType::Deleted, object, None);
        let rv = store.rv;
        drop(store);
        self.notify(rv);
    }

    /// Drops the change history: a watch or continue token from before now gets 410.
    pub fn compact(&self) {
        let mut store = self.shared.lock();
        store.compacted = store.rv;
        store.history.clear();
    }

    /// An outage: every open watch ends and every request is answered 503 until `restore`.
    pub fn cut(&self) {
        self.shared.lock().down = true;
        self.shared.cuts.send_modify(|n| *n += 1);
    }

    pub fn restore(&self) {
        self.shared.lock().down = false;
    }

    /// A bearer token TokenReview accepts, for `username` in `groups`.
    pub fn add_token(&self, token: &str, username: &str, groups: &[&str]) {
        let mut groups: Vec<String> = groups.iter().map(|g| (*g).to_owned()).collect();
        groups.push("system:authenticated".to_owned());
        let mut store = self.shared.lock();
        let uid = uid(store.tokens.len() as u64 + 1000);
        store.tokens.insert(
            token.to_owned(),
            User {
                username: username.to_owned(),
                uid,
                groups,
            },
        );
    }

    /// Grants rules (a RoleBinding with `namespace`, else a ClusterRoleBinding).
    pub fn grant(&self, grant: Grant) {
        self.shared.lock().grants.push(grant);
    }

    /// Takes back every grant of `subject` (its bindings are deleted).
    pub fn revoke(&self, subject: &Subject) {
        self.shared.lock().grants.retain(|g| g.subject != *subject);
    }

    pub fn counts(&self) -> Counts {
        self.shared.lock().counts.clone()
    }

    pub fn resource_version(&self) -> u64 {
        self.shared.lock().rv
    }
}

impl Drop for FakeKube {
    fn drop(&mut self) {
        if let Some(runtime) = self.runtime.take() {
            runtime.shutdown_background();
        }
    }
}

fn uid(seed: u64) -> String {
    let nanos = SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.subsec_nanos());
    format!(
        "{:08x}-{:04x}-4000-8000-{seed:012x}",
        nanos,
        std::process::id() & 0xffff
    )
}

/// A Pod's JSON as the API server holds it once a kubelet reported its status.
fn pod_json(pod: &FakePod, uid: &str) -> Value {
    let now = rfc3339(SystemTime::now());
    let labels: BTreeMap<&str, &str> = pod
        .labels
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    let image = "ghcr.io/example/unikernel:1.0";
    let (phase, container_status, ready) = match &pod.container_id {
        Some(id) => (
            "Running",
            json!({
                "name": "instance", "state": {"running": {"startedAt": now}}, "lastState": {},
                "ready": true, "restartCount": 0, "image": image,
                "imageID": format!("{image}@sha256:{}", "0".repeat(64)),
                "containerID": id, "started": true
            }),
            "True",
        ),
        None => (
            "Pending",
            json!({
                "name": "instance", "state": {"waiting": {"reason": "ContainerCreating"}},
                "lastState": {}, "ready": false, "restartCount": 0, "image": image,
                "imageID": "", "started": false
            }),
            "False",
        ),
    };
    let condition = |kind: &str, status: &str| json!({"type": kind, "status": status, "lastProbeTime": null, "lastTransitionTime": now});
    let object = json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {
            "name": pod.name, "namespace": pod.namespace, "uid": uid,
            "creationTimestamp": now, "labels": labels,
            "annotations": {"compute.datumapis.com/instance-index": "0"},
            "managedFields": [{"manager": "infra-provider-unikraft", "operation": "Update",
                               "apiVersion": "v1", "time": now, "fieldsType": "FieldsV1",
                               "fieldsV1": {"f:metadata": {"f:labels": {}}}}]
        },
        "spec": {
            "nodeName": pod.node,
            "containers": [{
                "name": "instance", "image": image, "resources": {},
                "terminationMessagePath": "/dev/termination-log",
                "terminationMessagePolicy": "File", "imagePullPolicy": "IfNotPresent"
            }],
            "restartPolicy": "Always", "terminationGracePeriodSeconds": 30,
            "dnsPolicy": "ClusterFirst", "serviceAccountName": "default",
            "serviceAccount": "default", "schedulerName": "default-scheduler",
            "tolerations": [{"key": "virtual-kubelet.io/provider", "operator": "Equal",
                             "value": "unikraft", "effect": "NoSchedule"}],
            "priority": 0, "enableServiceLinks": true,
            "preemptionPolicy": "PreemptLowerPriority"
        },
        "status": {
            "phase": phase,
            "conditions": [
                condition("PodReadyToStartContainers", ready),
                condition("Initialized", "True"),
                condition("Ready", ready),
                condition("ContainersReady", ready),
                condition("PodScheduled", "True"),
            ],
            "hostIP": "10.0.0.5", "hostIPs": [{"ip": "10.0.0.5"}],
            "podIP": "10.1.2.3", "podIPs": [{"ip": "10.1.2.3"}],
            "startTime": now,
            "containerStatuses": [container_status],
            "qosClass": "BestEffort"
        }
    });
    // The fake holds only what the API's own type accepts.
    let typed: k8s_openapi::api::core::v1::Pod =
        serde_json::from_value(object.clone()).expect("a valid Pod");
    assert_eq!(typed.metadata.name.as_deref(), Some(pod.name.as_str()));
    object
}

/// The collector's service account gets the ClusterRole of deploy/base/rbac.yaml, through the
/// ClusterRoleBinding there.
fn collector_grants(store: &mut Store) {
    let text = std::fs::read_to_string(workspace_root().join("deploy/base/rbac.yaml"))
        .expect("deploy/base/rbac.yaml");
    let docs: Vec<Value> = text
        .split("\n---\n")
        .map(|d| serde_norway::from_str(d).expect("rbac.yaml document"))
        .collect();
    let role = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRole")
        .expect("a ClusterRole");
    let binding = docs
        .iter()
        .find(|d| d["kind"] == "ClusterRoleBinding")
        .expect("a ClusterRoleBinding");
    assert_eq!(binding["roleRef"]["name"], role["metadata"]["name"]);
    let rules: Vec<PolicyRule> = role["rules"]
        .as_array()
        .expect("rules")
        .iter()
        .map(PolicyRule::from_json)
        .collect();
    let subject = &binding["subjects"][0];
    assert_eq!(subject["kind"], "ServiceAccount");
    let username = format!(
        "system:serviceaccount:{}:{}",
        subject["namespace"].as_str().expect("namespace"),
        subject["name"].as_str().expect("name")
    );
    store.tokens.insert(
        COLLECTOR_TOKEN.to_owned(),
        User {
            username: username.clone(),
            uid: uid(1),
            groups: vec![
                "system:serviceaccounts".to_owned(),
                "system:authenticated".to_owned(),
            ],
        },
    );
    store.grants.push(Grant {
        subject: Subject::User(username),
        namespace: None,
        rules,
    });
}

/// What a request is, from its method and path.
enum Route {
    List(Selection),
    Watch(Selection),
    Get {
        resource: &'static str,
        namespace: Option<String>,
        name: String,
    },
    TokenReview,
    AccessReview,
}

impl Route {
    fn attributes(&self) -> Attributes {
        let (verb, group, resource, namespace, name) = match self {
            Self::List(s) => ("list", "", s.resource, s.namespace.clone(), String::new()),
            Self::Watch(s) => ("watch", "", s.resource, s.namespace.clone(), String::new()),
            Self::Get {
                resource,
                namespace,
                name,
            } => ("get", "", *resource, namespace.clone(), name.clone()),
            Self::TokenReview => (
                "create",
                "authentication.k8s.io",
                "tokenreviews",
                None,
                String::new(),
            ),
            Self::AccessReview => (
                "create",
                "authorization.k8s.io",
                "subjectaccessreviews",
                None,
                String::new(),
            ),
        };
        Attributes {
            verb: verb.to_owned(),
            group: group.to_owned(),
            resource: resource.to_owned(),
            subresource: String::new(),
            namespace: namespace.unwrap_or_default(),
            name,
        }
    }
}

/// A refused request: code, reason, message (answered as a `Status`).
type Refusal = (u16, &'static str, String);

fn route(
    method: &Method,
    path: &str,
    params: &HashMap<String, String>,
    headers: &HeaderMap,
) -> Result<Route, Refusal> {
    let segments: Vec<&str> = path.trim_matches('/').split('/').collect();
    let collection = |resource: &'static str, namespace: Option<&str>| -> Result<Route, Refusal> {
        let bad = |m: String| (400, "BadRequest", m);
        let labels = LabelSelector::parse(params.get("labelSelector").map_or("", String::as_str))
            .map_err(|m| bad(format!("unable to parse requirement: {m}")))?;
        let fields = FieldSelector::parse(
            resource,
            params.get("fieldSelector").map_or("", String::as_str),
        )
        .map_err(bad)?;
        let accept = headers
            .get(header::ACCEPT)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        let selection = Selection {
            resource,
            namespace: namespace.map(str::to_owned),
            labels,
            fields,
            metadata_only: accept.contains("as=PartialObjectMetadata"),
        };
        let watch = params.get("watch").is_some_and(|w| w == "true" || w == "1");
        Ok(if watch {
            Route::Watch(selection)
        } else {
            Route::List(selection)
        })
    };
    match (method.as_str(), segments.as_slice()) {
        ("GET", ["api", "v1", "pods"]) => collection("pods", None),
        ("GET", ["api", "v1", "namespaces", ns, "pods"]) => collection("pods", Some(ns)),
        ("GET", ["api", "v1", "namespaces", ns, "pods", name]) => Ok(Route::Get {
            resource: "pods",
            namespace: Some((*ns).to_owned()),
            name: (*name).to_owned(),
        }),
        ("GET", ["api", "v1", "namespaces"]) => collection("namespaces", None),
        ("GET", ["api", "v1", "namespaces", name]) => Ok(Route::Get {
            resource: "namespaces",
            namespace: None,
            name: (*name).to_owned(),
        }),
        ("POST", ["apis", "authentication.k8s.io", "v1", "tokenreviews"]) => Ok(Route::TokenReview),
        ("POST", ["apis", "authorization.k8s.io", "v1", "subjectaccessreviews"]) => {
            Ok(Route::AccessReview)
        }
        _ => Err((
            404,
            "NotFound",
            "the server could not find the requested resource".to_owned(),
        )),
    }
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    Query(params): Query<HashMap<String, String>>,
    body: Bytes,
) -> Response {
    let route = match route(&method, uri.path(), &params, &headers) {
        Ok(route) => route,
        Err((code, reason, message)) => return status_response(code, reason, &message),
    };
    let mut store = shared.lock();
    if store.down {
        return status_response(
            503,
            "ServiceUnavailable",
            "the server is currently unable to handle the request",
        );
    }
    let token = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "));
    let Some(user) = token.and_then(|t| store.tokens.get(t)).cloned() else {
        return status_response(401, "Unauthorized", "Unauthorized");
    };
    let attributes = route.attributes();
    if !rbac::allowed(&store.grants, &user.username, &user.groups, &attributes) {
        let scope = if attributes.namespace.is_empty() {
            "at the cluster scope".to_owned()
        } else {
            format!("in the namespace \"{}\"", attributes.namespace)
        };
        return status_response(
            403,
            "Forbidden",
            &format!(
                "{} is forbidden: User \"{}\" cannot {} resource \"{}\" in API group \"{}\" {scope}",
                attributes.resource,
                user.username,
                attributes.verb,
                attributes.resource,
                attributes.group
            ),
        );
    }
    store.count_request(format!("{} {}", attributes.verb, attributes.resource));
    match route {
        Route::List(selection) => list(&mut store, &selection, &params),
        Route::Watch(selection) => {
            drop(store);
            watch(&shared, selection, &params)
        }
        Route::Get {
            resource,
            namespace,
            name,
        } => {
            let object = match (resource, namespace) {
                ("pods", Some(ns)) => store.pods.get(&(ns, name.clone())),
                _ => store.namespaces.get(&name),
            };
            match object {
                Some(object) => {
                    let accept = headers
                        .get(header::ACCEPT)
                        .and_then(|v| v.to_str().ok())
                        .unwrap_or("");
                    let body = if accept.contains("as=PartialObjectMetadata") {
                        partial(object)
                    } else {
                        object.clone()
                    };
                    store.count_sent(resource, 1);
                    json_response(&body)
                }
                None => {
                    status_response(404, "NotFound", &format!("{resource} \"{name}\" not found"))
                }
            }
        }
        Route::TokenReview => token_review(&store, &body),
        Route::AccessReview => access_review(&store, &body),
    }
}

fn list(store: &mut Store, selection: &Selection, params: &HashMap<String, String>) -> Response {
    let kind = kind_of(selection.resource);
    let (rv, items) = if let Some(token) = params.get("continue").filter(|t| !t.is_empty()) {
        match store.pages.remove(token) {
            Some(page) if page.rv >= store.compacted => (page.rv, page.items),
            _ => {
                store.counts.expired += 1;
                return (
                    StatusCode::GONE,
                    [(header::CONTENT_TYPE, "application/json")],
                    expired().to_string(),
                )
                    .into_response();
            }
        }
    } else {
        let items: Vec<Value> = store
            .objects(selection.resource)
            .into_iter()
            .filter(|o| selection.matches(o))
            .map(|o| {
                let mut item = selection.view(o);
                if !selection.metadata_only {
                    // Items of a typed list carry no kind or apiVersion of their own.
                    let map = item.as_object_mut().expect("object");
                    map.remove("kind");
                    map.remove("apiVersion");
                }
                item
            })
            .collect();
        (store.rv, items)
    };
    // resourceVersion=0 is served from the cache, whole.
    let limit = if params.get("resourceVersion").is_some_and(|v| v == "0") {
        None
    } else {
        params
            .get("limit")
            .and_then(|l| l.parse::<usize>().ok())
            .filter(|l| *l > 0)
    };
    let mut items = items;
    let mut metadata = json!({"resourceVersion": rv.to_string()});
    if let Some(limit) = limit
        && items.len() > limit
    {
        let rest = items.split_off(limit);
        store.next_page += 1;
        let token = format!("page-{}-{}", rv, store.next_page);
        metadata["continue"] = json!(token);
        metadata["remainingItemCount"] = json!(rest.len());
        store.pages.insert(token, Page { rv, items: rest });
    }
    store.count_sent(selection.resource, items.len());
    let (list_kind, api_version) = if selection.metadata_only {
        ("PartialObjectMetadataList".to_owned(), "meta.k8s.io/v1")
    } else {
        (format!("{kind}List"), "v1")
    };
    json_response(&json!({
        "kind": list_kind, "apiVersion": api_version, "metadata": metadata, "items": items
    }))
}

fn watch(shared: &Arc<Shared>, selection: Selection, params: &HashMap<String, String>) -> Response {
    let from = params.get("resourceVersion").cloned().unwrap_or_default();
    let timeout = params
        .get("timeoutSeconds")
        .and_then(|t| t.parse().ok())
        .map_or(DEFAULT_WATCH_TIMEOUT, Duration::from_secs);
    let bookmarks = params
        .get("allowWatchBookmarks")
        .is_some_and(|b| b == "true");
    if params.contains_key("sendInitialEvents") {
        return status_response(
            400,
            "BadRequest",
            "sendInitialEvents is not supported by this server",
        );
    }
    let (sender, mut receiver) = mpsc::channel::<Bytes>(256);
    let shared = Arc::clone(shared);
    tokio::spawn(async move {
        let mut changed = shared.changed.subscribe();
        let mut cuts = shared.cuts.subscribe();
        let deadline = tokio::time::Instant::now() + timeout;
        let mut ticks = tokio::time::interval(shared.bookmark_interval);
        ticks.tick().await;
        // Where this watch stands; `None`: send the current state as ADDED first.
        let mut cursor = from.parse::<u64>().ok().filter(|rv| *rv > 0);
        let mut bookmark_due = false;
        loop {
            let (lines, end) = {
                let mut store = shared.lock();
                let mut lines = Vec::new();
                let mut end = false;
                match cursor {
                    None => {
                        for object in store.objects(selection.resource) {
                            if selection.matches(object) {
                                lines.push(
                                    json!({"type": "ADDED", "object": selection.view(object)}),
                                );
                            }
                        }
                    }
                    Some(rv) if rv < store.compacted => {
                        lines.push(json!({"type": "ERROR", "object": status(
                            410, "Expired",
                            &format!("too old resource version: {rv} ({})", store.compacted + 1),
                        )}));
                        store.counts.expired += 1;
                        end = true;
                    }
                    Some(rv) => {
                        for change in store.history.iter().filter(|c| c.rv > rv) {
                            if let Some(event) = selection.event(change) {
                                lines.push(event);
                            }
                        }
                    }
                }
                let sent = lines.iter().filter(|l| l["type"] != "ERROR").count();
                store.count_sent(selection.resource, sent);
                cursor = Some(store.rv);
                if bookmark_due && !end {
                    lines.push(selection.bookmark(store.rv));
                    bookmark_due = false;
                }
                (lines, end)
            };
            for line in lines {
                let mut bytes = line.to_string().into_bytes();
                bytes.push(b'\n');
                if sender.send(Bytes::from(bytes)).await.is_err() {
                    return;
                }
            }
            if end {
                return;
            }
            tokio::select! {
                _ = changed.changed() => {}
                _ = cuts.changed() => return,
                () = tokio::time::sleep_until(deadline) => return,
                _ = ticks.tick(), if bookmarks => bookmark_due = true,
            }
        }
    });
    let stream = futures_util::stream::poll_fn(move |cx| {
        receiver
            .poll_recv(cx)
            .map(|item| item.map(Ok::<Bytes, Infallible>))
    });
    (
        StatusCode::OK,
        [(header::CONTENT_TYPE, "application/json")],
        Body::from_stream(stream),
    )
        .into_response()
}

fn token_review(store: &Store, body: &[u8]) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return status_response(400, "BadRequest", "the request body is not a TokenReview");
    };
    if review["kind"] != "TokenReview" || review["apiVersion"] != "authentication.k8s.io/v1" {
        return status_response(400, "BadRequest", "the request body is not a TokenReview");
    }
    let token = review["spec"]["token"].as_str().unwrap_or("");
    review["status"] = match store.tokens.get(token) {
        Some(user) => json!({
            "authenticated": true,
            "user": {"username": user.username, "uid": user.uid, "groups": user.groups},
            "audiences": review["spec"]["audiences"].clone(),
        }),
        None => json!({"authenticated": false, "error": "invalid bearer token"}),
    };
    review["metadata"] = json!({"creationTimestamp": null});
    // The response must be what the API's type accepts.
    let _: k8s_openapi::api::authentication::v1::TokenReview =
        serde_json::from_value(review.clone()).expect("a valid TokenReview");
    json_response(&review)
}

fn access_review(store: &Store, body: &[u8]) -> Response {
    let Ok(mut review) = serde_json::from_slice::<Value>(body) else {
        return status_response(
            400,
            "BadRequest",
            "the request body is not a SubjectAccessReview",
        );
    };
    if review["kind"] != "SubjectAccessReview" || review["apiVersion"] != "authorization.k8s.io/v1"
    {
        return status_response(
            400,
            "BadRequest",
            "the request body is not a SubjectAccessReview",
        );
    }
    let spec = &review["spec"];
    let user = spec["user"].as_str().unwrap_or("");
    let groups: Vec<String> = serde_json::from_value(spec["groups"].clone()).unwrap_or_default();
    let resource = &spec["resourceAttributes"];
    let non_resource = &spec["nonResourceAttributes"];
    if user.is_empty() && groups.is_empty() {
        return status_response(
            422,
            "Invalid",
            "SubjectAccessReview.authorization.k8s.io is invalid: spec.user: Invalid value: \"\": at least one of user or group must be specified",
        );
    }
    if resource.is_null() == non_resource.is_null() {
        return status_response(
            422,
            "Invalid",
            "SubjectAccessReview.authorization.k8s.io is invalid: spec.resourceAttributes: Invalid value: exactly one of nonResourceAttributes or resourceAttributes must be specified",
        );
    }
    let text = |v: &Value| v.as_str().unwrap_or("").to_owned();
    let allowed = !resource.is_null()
        && rbac::allowed(
            &store.grants,
            user,
            &groups,
            &Attributes {
                verb: text(&resource["verb"]),
                group: text(&resource["group"]),
                resource: text(&resource["resource"]),
                subresource: text(&resource["subresource"]),
                namespace: text(&resource["namespace"]),
                name: text(&resource["name"]),
            },
        );
    review["status"] = if allowed {
        json!({"allowed": true, "reason": "RBAC: allowed by a binding of the fake"})
    } else {
        json!({"allowed": false})
    };
    review["metadata"] = json!({"creationTimestamp": null});
    let _: k8s_openapi::api::authorization::v1::SubjectAccessReview =
        serde_json::from_value(review.clone()).expect("a valid SubjectAccessReview");
    json_response(&review)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timestamps_are_rfc3339() {
        assert_eq!(rfc3339(SystemTime::UNIX_EPOCH), "1970-01-01T00:00:00Z");
        assert_eq!(
            rfc3339(SystemTime::UNIX_EPOCH + Duration::from_secs(1_772_323_200 + 3661)),
            "2026-03-01T01:01:01Z"
        );
    }
}
