//! The Kubernetes identity source against the fake API server (collector_tests::kube_api),
//! through the real kube-rs client over HTTP: `collector identities` (the source without the
//! kernel side) prints what the registry will receive. No privileges needed.

use std::{
    io::{BufRead, BufReader, Write},
    process::{Child, Command, Stdio},
    sync::mpsc,
    time::Duration,
};

use collector_tests::{
    collector_bin,
    kube_api::{FakeKube, FakePod},
    new_uuid,
};
use serde_json::{Value, json};

const NODE: &str = "n1";
const MANAGED: (&str, &str) = ("managed-by", "infra-provider-unikraft");
const PROJECT: &str = "resourcemanager.miloapis.com/project-name";
const CLUSTER: &str = "meta.datumapis.com/upstream-cluster-name";
const UPSTREAM_NS: &str = "meta.datumapis.com/upstream-namespace";
const INSTANCE: &str = "upstream.instance";
const WORKLOAD: &str = "compute.datumapis.com/workload-name";
const MIB: f64 = 1024.0 * 1024.0;

/// A namespace's name, labels, and the project they give.
type Case = (
    &'static str,
    Vec<(&'static str, &'static str)>,
    Option<&'static str>,
);

/// `collector identities` for node n1 against `fake`, its output lines as JSON.
struct Identities {
    child: Child,
    lines: mpsc::Receiver<Value>,
    stderr: tempfile::NamedTempFile,
}

impl Identities {
    fn start(fake: &FakeKube) -> Self {
        Self::start_with(fake, &[])
    }

    fn start_with(fake: &FakeKube, extra: &[&str]) -> Self {
        let stderr = tempfile::NamedTempFile::new().unwrap();
        let mut child = Command::new(collector_bin())
            .args(["identities", "--node-name", NODE, "--log-format", "json"])
            .args(extra)
            .env("KUBECONFIG", fake.kubeconfig())
            .env_remove("KUBERNETES_SERVICE_HOST")
            .env_remove("NODE_NAME")
            .stdout(Stdio::piped())
            .stderr(stderr.reopen().unwrap())
            .spawn()
            .expect("spawn collector identities");
        let stdout = child.stdout.take().unwrap();
        let (send, lines) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { return };
                let value = serde_json::from_str(&line).unwrap_or_else(|e| panic!("{e}: {line}"));
                if send.send(value).is_err() {
                    return;
                }
            }
        });
        Self {
            child,
            lines,
            stderr,
        }
    }

    fn stderr(&self) -> String {
        std::fs::read_to_string(self.stderr.path()).unwrap_or_default()
    }

    /// The next update, within `timeout`.
    fn next(&self, timeout: Duration) -> Option<Value> {
        self.lines.recv_timeout(timeout).ok()
    }

    /// Updates until one matches `f` (returned last), within 10 s.
    fn until(&self, what: &str, f: impl Fn(&Value) -> bool) -> Vec<Value> {
        let mut seen = Vec::new();
        loop {
            let Some(update) = self.next(Duration::from_secs(10)) else {
                panic!(
                    "no {what} in 10 s; updates: {seen:#?}\nstderr:\n{}",
                    self.stderr()
                );
            };
            let done = f(&update);
            seen.push(update);
            if done {
                return seen;
            }
        }
    }

    fn until_synced(&self) -> Vec<Value> {
        self.until("synced", |u| u["update"] == "synced")
    }

    /// No update at all for `quiet`.
    fn assert_quiet(&self, quiet: Duration) {
        if let Some(update) = self.next(quiet) {
            panic!("unexpected update: {update}");
        }
    }

    /// Resident set size of the process, from /proc.
    fn rss_bytes(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id())).unwrap();
        let kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .expect("VmRSS");
        kib * 1024
    }
}

impl Drop for Identities {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn pod(namespace: &str, name: &str, node: &str, container_id: Option<&str>) -> FakePod {
    FakePod::unikraft(namespace, name, node, container_id)
}

fn kraftlet(node: &str) -> String {
    format!("kraftlet-{node}")
}

fn of_kind<'a>(updates: &'a [Value], kind: &str) -> Vec<&'a Value> {
    updates.iter().filter(|u| u["update"] == kind).collect()
}

#[test]
fn this_nodes_pods_become_identities_with_either_container_id_form() {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[(PROJECT, "proj-a"), (UPSTREAM_NS, "default")]);
    let (u1, u2, u3) = (new_uuid("k8s"), new_uuid("k8s"), new_uuid("k8s"));
    fake.create_pod(&pod(
        "ns-a",
        "web-0",
        &kraftlet(NODE),
        Some(&format!("ukp://{u1}")),
    ));
    fake.create_pod(&pod("ns-a", "web-1", &kraftlet(NODE), Some(&u2)));
    // Not this node's, or not the runtime's: never reported, never even sent.
    fake.create_pod(&pod(
        "ns-a",
        "web-2",
        &kraftlet("n2"),
        Some(&new_uuid("other")),
    ));
    let mut kata = pod("ns-a", "kata-0", &kraftlet(NODE), Some(&new_uuid("kata")));
    kata.labels[0].1 = "kata-provider".into();
    fake.create_pod(&kata);
    // Pending: no container ID yet.
    fake.create_pod(&pod("ns-a", "web-3", &kraftlet(NODE), None));

    let identities = Identities::start(&fake);
    let updates = identities.until_synced();
    let created = of_kind(&updates, "created");
    assert_eq!(created.len(), 2, "{updates:#?}");
    let expected = |uuid: &str, pod: &str| {
        json!({"update": "created", "instance_uuid": uuid, "identity": {
            "project": "proj-a", "instance_name": format!("{pod}-instance"),
            "instance_namespace": "default", "workload": "web",
            "pod": pod, "pod_namespace": "ns-a", "node": NODE}})
    };
    assert!(created.contains(&&expected(&u1, "web-0")), "{created:#?}");
    assert!(created.contains(&&expected(&u2, "web-1")), "{created:#?}");

    // The pending Pod's container starts: created then, once.
    fake.start_container("ns-a", "web-3", &format!("ukp://{u3}"));
    let updates = identities.until("web-3 created", |u| u["instance_uuid"] == u3.as_str());
    assert_eq!(updates.last().unwrap(), &expected(&u3, "web-3"));
    // A label of the Pod changes: changed, with the new workload.
    fake.set_pod_labels(
        "ns-a",
        "web-3",
        &[MANAGED, (INSTANCE, "web-3-instance"), (WORKLOAD, "api")],
    );
    let updates = identities.until("web-3 changed", |u| u["update"] == "changed");
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["identity"]["workload"], "api");
    // Deleted: with the identity it had, once.
    fake.delete_pod("ns-a", "web-0");
    let updates = identities.until("web-0 deleted", |u| u["update"] == "deleted");
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["instance_uuid"], u1.as_str());
    assert_eq!(updates[0]["identity"], expected(&u1, "web-0")["identity"]);
    identities.assert_quiet(Duration::from_millis(500));

    // The API server selected: only this node's runtime Pods crossed the wire (3 listed...
    // the pending one included, then its 2 changes and a deletion), and RBAC was the bundle's.
    let counts = fake.counts();
    assert_eq!(counts.requests("list pods"), 1, "{counts:?}");
    assert_eq!(counts.sent("pods"), 3 + 3, "{counts:?}");
    assert_eq!(
        counts.requests("get namespaces"),
        0,
        "namespaces are read with list"
    );
    assert!(counts.requests("watch pods") >= 1 && counts.requests("watch namespaces") >= 1);
}

#[test]
fn the_project_in_the_fleets_order_of_precedence() {
    let fake = FakeKube::start();
    let namespaces: [Case; 6] = [
        ("ns-label", vec![(PROJECT, "p1")], Some("p1")),
        (
            "ns-both",
            vec![(PROJECT, "p2"), (CLUSTER, "cluster-other")],
            Some("p2"),
        ),
        ("ns-cluster", vec![(CLUSTER, "cluster-p3")], Some("p3")),
        (
            "ns-empty-label",
            vec![(PROJECT, ""), (CLUSTER, "cluster-p4")],
            Some("p4"),
        ),
        ("ns-unprefixed", vec![(CLUSTER, "p5")], None),
        ("ns-none", vec![], None),
    ];
    let mut uuids = Vec::new();
    for (ns, labels, _) in &namespaces {
        fake.create_namespace(ns, labels);
        let uuid = new_uuid("prec");
        fake.create_pod(&pod(
            ns,
            "web-0",
            &kraftlet(NODE),
            Some(&format!("ukp://{uuid}")),
        ));
        uuids.push(uuid);
    }
    let identities = Identities::start(&fake);
    let updates = identities.until_synced();
    for ((ns, _, project), uuid) in namespaces.iter().zip(&uuids) {
        let created = updates
            .iter()
            .find(|u| u["update"] == "created" && u["instance_uuid"] == uuid.as_str())
            .unwrap_or_else(|| panic!("{ns} not created: {updates:#?}"));
        assert_eq!(created["identity"]["project"].as_str(), *project, "{ns}");
        assert_eq!(created["identity"]["pod_namespace"], *ns);
        if project.is_none() {
            assert!(
                created["identity"].get("project").is_none(),
                "absent, not empty: {created}"
            );
        }
    }
    // The project label arrives later on a namespace that had none: changed, for its instances.
    fake.set_namespace_labels("ns-none", &[(PROJECT, "p6")]);
    let updates = identities.until("changed", |u| u["update"] == "changed");
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["instance_uuid"], uuids[5].as_str());
    assert_eq!(updates[0]["identity"]["project"], "p6");
    // Another namespace of the cluster changing reports nothing.
    fake.create_namespace("ns-elsewhere", &[(PROJECT, "p7")]);
    identities.assert_quiet(Duration::from_millis(500));
}

#[test]
fn a_pod_deleted_while_the_watch_is_cut_is_noticed_after_the_relist() {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[(PROJECT, "proj-a")]);
    let (u1, u2, u3) = (new_uuid("cut"), new_uuid("cut"), new_uuid("cut"));
    for (name, uuid) in [("web-0", &u1), ("web-1", &u2), ("web-2", &u3)] {
        fake.create_pod(&pod("ns-a", name, &kraftlet(NODE), Some(uuid)));
    }
    let identities = Identities::start(&fake);
    assert_eq!(of_kind(&identities.until_synced(), "created").len(), 3);
    let lists = fake.counts().requests("list pods");

    // Cut; web-0 is deleted meanwhile and the history compacted: the watch's resourceVersion
    // is gone (410), the source relists, and the list no longer has web-0.
    fake.cut();
    fake.delete_pod("ns-a", "web-0");
    fake.compact();
    std::thread::sleep(Duration::from_millis(500));
    fake.restore();
    let updates = identities.until("synced after the relist", |u| u["update"] == "synced");
    let deleted = of_kind(&updates, "deleted");
    assert_eq!(deleted.len(), 1, "{updates:#?}");
    assert_eq!(deleted[0]["instance_uuid"], u1.as_str());
    assert_eq!(deleted[0]["identity"]["project"], "proj-a");
    assert!(of_kind(&updates, "created").is_empty(), "{updates:#?}");
    let counts = fake.counts();
    assert!(counts.expired >= 1, "the watch got 410 Gone: {counts:?}");
    assert_eq!(counts.requests("list pods"), lists + 1, "{counts:?}");

    // Cut again without compaction: the watch resumes where it was, the deletion is replayed.
    fake.cut();
    fake.delete_pod("ns-a", "web-1");
    std::thread::sleep(Duration::from_millis(500));
    fake.restore();
    let updates = identities.until("web-1 deleted", |u| u["update"] == "deleted");
    assert_eq!(updates.len(), 1, "{updates:#?}");
    assert_eq!(updates[0]["instance_uuid"], u2.as_str());
    assert_eq!(
        fake.counts().requests("list pods"),
        lists + 1,
        "no relist needed"
    );
    identities.assert_quiet(Duration::from_millis(500));

    // The outages were logged (kube-rs's own lines kept out), by the logging convention.
    let stderr = identities.stderr();
    assert!(
        stderr.contains("kubernetes watch failed, retrying"),
        "{stderr}"
    );
    let mut check = Command::new(collector_bin())
        .args(["check-logs", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    check
        .stdin
        .take()
        .unwrap()
        .write_all(stderr.as_bytes())
        .unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{}\n{stderr}",
        String::from_utf8_lossy(&checked.stdout)
    );
}

/// What `pods` Pods on `nodes` other nodes cost the watch of this node: its RSS before and
/// after they are created (and half of them changed), both after a marker Pod of this node
/// created after them was reported (so the watch has seen everything before it).
fn rss_growth(
    fake: &FakeKube,
    identities: &Identities,
    node_of: impl Fn(usize) -> String,
    tag: &str,
) -> (u64, u64) {
    let before = identities.rss_bytes();
    let pods = 5000;
    fake.create_pods((0..pods).map(|i| {
        pod(
            &format!("ns-{tag}-{}", i % 50),
            &format!("{tag}-{i}"),
            &node_of(i),
            Some(&format!("ukp://{tag}-{i}")),
        )
    }));
    for i in (0..pods).step_by(2) {
        fake.set_pod_labels(
            &format!("ns-{tag}-{}", i % 50),
            &format!("{tag}-{i}"),
            &[MANAGED, (INSTANCE, "renamed")],
        );
    }
    let marker = new_uuid("marker");
    fake.create_pod(&pod(
        "ns-a",
        &format!("marker-{tag}"),
        &kraftlet(NODE),
        Some(&marker),
    ));
    identities.until("the marker", |u| u["instance_uuid"] == marker.as_str());
    std::thread::sleep(Duration::from_millis(500));
    (before, identities.rss_bytes())
}

#[test]
fn the_watch_does_not_grow_with_pods_on_other_nodes() {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[(PROJECT, "proj-a")]);
    for i in 0..20 {
        fake.create_pod(&pod(
            "ns-a",
            &format!("web-{i}"),
            &kraftlet(NODE),
            Some(&new_uuid("mem")),
        ));
    }
    for ns in 0..50 {
        fake.create_namespace(&format!("ns-other-{ns}"), &[(PROJECT, "elsewhere")]);
    }
    let identities = Identities::start(&fake);
    identities.until_synced();
    std::thread::sleep(Duration::from_secs(1));
    let sent_before = fake.counts().sent("pods");

    let (before, after) = rss_growth(
        &fake,
        &identities,
        |i| kraftlet(&format!("n{}", 2 + i % 49)),
        "other",
    );
    let grown = after.saturating_sub(before);
    eprintln!(
        "watch RSS: {:.1} MiB before, {:.1} MiB after 5000 Pods on other nodes (+{} KiB)",
        before as f64 / MIB,
        after as f64 / MIB,
        grown / 1024
    );
    // Selected by the API server: of the 7500 Pod changes, only the marker reached the watch.
    assert_eq!(fake.counts().sent("pods"), sent_before + 1);
    assert!(
        grown < 1024 * 1024,
        "the watch grew by {grown} bytes with Pods of other nodes"
    );

    // The same 5000 on this node: kept, so the memory is theirs (the measure can see it).
    let (before, after) = rss_growth(&fake, &identities, |_| kraftlet(NODE), "mine");
    eprintln!(
        "watch RSS: {:.1} MiB before, {:.1} MiB after 5000 Pods on this node (+{} KiB)",
        before as f64 / MIB,
        after as f64 / MIB,
        after.saturating_sub(before) / 1024
    );
    assert!(
        after > before + 2 * grown.max(512 * 1024),
        "{before} -> {after}"
    );
}

#[test]
fn off_without_a_client_configuration() {
    let stderr = tempfile::NamedTempFile::new().unwrap();
    let status = Command::new(collector_bin())
        .args(["identities", "--node-name", NODE, "--log-format", "json"])
        .env_remove("KUBECONFIG")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .stdout(Stdio::null())
        .stderr(stderr.reopen().unwrap())
        .status()
        .unwrap();
    assert!(!status.success());
    let text = std::fs::read_to_string(stderr.path()).unwrap();
    let info: Vec<&str> = text
        .lines()
        .filter(|l| l.contains("kubernetes identity source off"))
        .collect();
    assert_eq!(info.len(), 1, "{text}");
    let line: Value = serde_json::from_str(info[0]).unwrap();
    assert_eq!(line["level"], "INFO");
    assert_eq!(line["reason"], "no_client_configuration");
}

#[test]
fn a_node_name_is_needed_for_the_default_selector() {
    let fake = FakeKube::start();
    let output = Command::new(collector_bin())
        .args(["identities"])
        .env("KUBECONFIG", fake.kubeconfig())
        .env_remove("NODE_NAME")
        .env_remove("KUBERNETES_SERVICE_HOST")
        .output()
        .unwrap();
    assert!(!output.status.success());
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("--node-name or set NODE_NAME"), "{stderr}");
}
