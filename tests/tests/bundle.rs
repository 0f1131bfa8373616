//! The deploy bundle (deploy/base): every object is valid against the Kubernetes API's types,
//! with no field the API does not know, the operators' objects have the structure their CRDs
//! define for the fields used, the objects fit together (names, labels, ports), and the
//! kustomization lists exactly the bundle's files.
//!
//! Core objects are deserialised into k8s-openapi's types (API 1.33) and serialised back: a
//! field the type does not have, or a value of the wrong type, makes the two differ. The CRDs
//! (VMRule, VMServiceScrape, ServiceMonitor, PrometheusRule) are checked by hand-written
//! structure below (no CRD schema is vendored): known keys only, their types, required keys,
//! durations and relabel actions. Not covered for them: the CRDs' other fields, their
//! validation patterns beyond those, and the operators' admission webhooks.

use std::collections::{BTreeMap, BTreeSet};

use collector_tests::servers::workspace_root;
use k8s_openapi::{
    Resource,
    api::{
        apps::v1::DaemonSet,
        core::v1::{ConfigMap, Namespace, Service, ServiceAccount},
        networking::v1::NetworkPolicy,
        rbac::v1::{ClusterRole, ClusterRoleBinding},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
    serde::{Serialize, de::DeserializeOwned},
};
use serde_json::Value;

/// Every document of every YAML file in deploy/base but the kustomization, with its file.
fn objects() -> Vec<(String, Value)> {
    let dir = workspace_root().join("deploy/base");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("deploy/base")
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    files.sort();
    let mut objects = Vec::new();
    for file in files {
        let text = std::fs::read_to_string(dir.join(&file)).unwrap();
        for doc in text.split("\n---\n") {
            let value: Value =
                serde_norway::from_str(doc).unwrap_or_else(|e| panic!("{file}: {e}"));
            if !value.is_null() {
                objects.push((file.clone(), value));
            }
        }
    }
    objects
}

/// Paths where `a` and `b` differ.
fn diff(a: &Value, b: &Value, path: &str, out: &mut Vec<String>) {
    match (a, b) {
        (Value::Object(x), Value::Object(y)) => {
            for key in x.keys().chain(y.keys()).collect::<BTreeSet<_>>() {
                let p = format!("{path}.{key}");
                match (x.get(key), y.get(key)) {
                    (Some(u), Some(v)) => diff(u, v, &p, out),
                    (Some(_), None) => out.push(format!("{p}: not a field of the API type")),
                    (None, Some(_)) => out.push(format!("{p}: added by the API type")),
                    (None, None) => {}
                }
            }
        }
        (Value::Array(x), Value::Array(y)) if x.len() == y.len() => {
            for (i, (u, v)) in x.iter().zip(y).enumerate() {
                diff(u, v, &format!("{path}[{i}]"), out);
            }
        }
        _ if a != b => out.push(format!("{path}: {a} became {b}")),
        _ => {}
    }
}

/// `value` as a `T`, checked by a round trip; the typed object.
fn typed<T: Resource + DeserializeOwned + Serialize>(file: &str, value: &Value) -> T {
    assert_eq!(value["apiVersion"], T::API_VERSION, "{file}");
    assert_eq!(value["kind"], T::KIND, "{file}");
    let object: T = serde_json::from_value(value.clone())
        .unwrap_or_else(|e| panic!("{file}: not a valid {}: {e}", T::KIND));
    let back = serde_json::to_value(&object).unwrap();
    let mut differences = Vec::new();
    diff(value, &back, "", &mut differences);
    assert!(
        differences.is_empty(),
        "{file} ({}): {differences:#?}",
        T::KIND
    );
    object
}

/// Structure of the operators' objects, for the fields the bundle uses.
enum S {
    Str,
    Duration,
    StrList,
    StrMap,
    OneOf(&'static [&'static str]),
    List(Box<S>),
    /// (key, structure, required)
    Obj(Vec<(&'static str, S, bool)>),
}

fn check(value: &Value, schema: &S, path: &str, errors: &mut Vec<String>) {
    let mut fail = |what: &str| errors.push(format!("{path}: {what}, got {value}"));
    match schema {
        S::Str => {
            if value.as_str().is_none_or(str::is_empty) {
                fail("a non-empty string");
            }
        }
        S::Duration => {
            let ok = value.as_str().is_some_and(|s| {
                let digits = s.trim_end_matches(['s', 'm', 'h', 'd']);
                !digits.is_empty()
                    && digits.len() < s.len()
                    && digits.bytes().all(|b| b.is_ascii_digit())
            });
            if !ok {
                fail("a duration like 30s or 5m");
            }
        }
        S::StrList => {
            if !value
                .as_array()
                .is_some_and(|a| a.iter().all(Value::is_string))
            {
                fail("a list of strings");
            }
        }
        S::StrMap => {
            if !value
                .as_object()
                .is_some_and(|o| o.values().all(Value::is_string))
            {
                fail("a map of strings");
            }
        }
        S::OneOf(values) => {
            if !value.as_str().is_some_and(|s| values.contains(&s)) {
                fail(&format!("one of {values:?}"));
            }
        }
        S::List(item) => match value.as_array() {
            Some(items) if !items.is_empty() => {
                for (i, v) in items.iter().enumerate() {
                    check(v, item, &format!("{path}[{i}]"), errors);
                }
            }
            _ => fail("a non-empty list"),
        },
        S::Obj(fields) => {
            let Some(object) = value.as_object() else {
                return fail("an object");
            };
            for key in object.keys() {
                if !fields.iter().any(|(k, _, _)| k == key) {
                    errors.push(format!(
                        "{path}.{key}: not a field of the CRD (as checked here)"
                    ));
                }
            }
            for (key, schema, required) in fields {
                match object.get(*key) {
                    Some(v) => check(v, schema, &format!("{path}.{key}"), errors),
                    None if *required => errors.push(format!("{path}.{key}: required")),
                    None => {}
                }
            }
        }
    }
}

fn scrape_spec(relabel_key: &'static str) -> S {
    let relabel = S::Obj(vec![
        ("sourceLabels", S::StrList, false),
        ("targetLabel", S::Str, false),
        ("regex", S::Str, false),
        ("replacement", S::Str, false),
        (
            "action",
            S::OneOf(&[
                "replace",
                "keep",
                "drop",
                "labelmap",
                "labeldrop",
                "labelkeep",
                "hashmod",
            ]),
            false,
        ),
    ]);
    S::Obj(vec![
        ("jobLabel", S::Str, false),
        (
            "selector",
            S::Obj(vec![("matchLabels", S::StrMap, true)]),
            true,
        ),
        (
            "namespaceSelector",
            S::Obj(vec![("matchNames", S::StrList, true)]),
            false,
        ),
        (
            "endpoints",
            S::List(Box::new(S::Obj(vec![
                ("port", S::Str, true),
                ("path", S::Str, false),
                ("interval", S::Duration, false),
                ("scrapeTimeout", S::Duration, false),
                (relabel_key, S::List(Box::new(relabel)), false),
            ]))),
            true,
        ),
    ])
}

fn rules_spec() -> S {
    S::Obj(vec![(
        "groups",
        S::List(Box::new(S::Obj(vec![
            ("name", S::Str, true),
            ("interval", S::Duration, false),
            (
                "rules",
                S::List(Box::new(S::Obj(vec![
                    ("record", S::Str, false),
                    ("alert", S::Str, false),
                    ("expr", S::Str, true),
                    ("for", S::Duration, false),
                    ("labels", S::StrMap, false),
                    ("annotations", S::StrMap, false),
                ]))),
                true,
            ),
        ]))),
        true,
    )])
}

/// An operator object: apiVersion, kind, metadata (as the API's ObjectMeta), spec as `schema`.
fn custom(file: &str, value: &Value, api_version: &str, schema: &S) {
    assert_eq!(value["apiVersion"], api_version, "{file}");
    let top: BTreeSet<&str> = value
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        top,
        BTreeSet::from(["apiVersion", "kind", "metadata", "spec"]),
        "{file}: top-level keys"
    );
    let meta: ObjectMeta = serde_json::from_value(value["metadata"].clone()).unwrap();
    let mut differences = Vec::new();
    diff(
        &value["metadata"],
        &serde_json::to_value(&meta).unwrap(),
        ".metadata",
        &mut differences,
    );
    let mut errors = Vec::new();
    check(&value["spec"], schema, ".spec", &mut errors);
    errors.extend(differences);
    assert!(errors.is_empty(), "{file} ({}): {errors:#?}", value["kind"]);
}

fn labels_match(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

#[test]
fn every_object_is_valid_and_they_fit_together() {
    let mut daemonset = None;
    let mut service = None;
    let mut service_account = None;
    let mut role = None;
    let mut binding = None;
    let mut policy = None;
    let mut scrapes = Vec::new();
    let mut dashboards = Vec::new();
    let mut kinds = BTreeSet::new();
    for (file, value) in objects() {
        let kind = value["kind"].as_str().unwrap_or_default().to_owned();
        kinds.insert(kind.clone());
        match kind.as_str() {
            "Namespace" => {
                let ns: Namespace = typed(&file, &value);
                assert_eq!(ns.metadata.name.as_deref(), Some("compute-telemetry"));
            }
            "ServiceAccount" => service_account = Some(typed::<ServiceAccount>(&file, &value)),
            "ClusterRole" => role = Some(typed::<ClusterRole>(&file, &value)),
            "ClusterRoleBinding" => binding = Some(typed::<ClusterRoleBinding>(&file, &value)),
            "DaemonSet" => daemonset = Some(typed::<DaemonSet>(&file, &value)),
            "Service" => service = Some(typed::<Service>(&file, &value)),
            "NetworkPolicy" => policy = Some(typed::<NetworkPolicy>(&file, &value)),
            "ConfigMap" => dashboards.push(typed::<ConfigMap>(&file, &value)),
            "ServiceMonitor" => {
                custom(
                    &file,
                    &value,
                    "monitoring.coreos.com/v1",
                    &scrape_spec("relabelings"),
                );
                scrapes.push(value.clone());
            }
            "VMServiceScrape" => {
                custom(
                    &file,
                    &value,
                    "operator.victoriametrics.com/v1beta1",
                    &scrape_spec("relabelConfigs"),
                );
                scrapes.push(value.clone());
            }
            "PrometheusRule" => custom(&file, &value, "monitoring.coreos.com/v1", &rules_spec()),
            "VMRule" => custom(
                &file,
                &value,
                "operator.victoriametrics.com/v1beta1",
                &rules_spec(),
            ),
            other => panic!("{file}: unexpected kind {other}"),
        }
        if kind != "ClusterRole" && kind != "ClusterRoleBinding" && kind != "Namespace" {
            assert_eq!(
                value["metadata"]["namespace"], "compute-telemetry",
                "{file}: namespace"
            );
        }
    }
    assert_eq!(kinds.len(), 12, "kinds in the bundle: {kinds:?}");

    // The pods run as the service account the binding grants the role to.
    let ds = daemonset.expect("DaemonSet");
    let pod = ds.spec.as_ref().unwrap().template.spec.as_ref().unwrap();
    let sa = service_account
        .expect("ServiceAccount")
        .metadata
        .name
        .unwrap();
    assert_eq!(pod.service_account_name.as_deref(), Some(sa.as_str()));
    let binding = binding.expect("ClusterRoleBinding");
    let role = role.expect("ClusterRole");
    assert_eq!(binding.role_ref.name, role.metadata.name.clone().unwrap());
    let subject = &binding.subjects.as_ref().unwrap()[0];
    assert_eq!(
        (subject.kind.as_str(), subject.name.as_str()),
        ("ServiceAccount", sa.as_str())
    );
    // What the identity change needs, and nothing more.
    let mut grants = BTreeSet::new();
    for rule in &role.rules.unwrap() {
        for resource in rule.resources.as_deref().unwrap_or_default() {
            for verb in &rule.verbs {
                grants.insert(format!("{resource}:{verb}"));
            }
        }
    }
    assert_eq!(
        grants,
        BTreeSet::from(
            [
                "pods:list",
                "pods:watch",
                "namespaces:list",
                "namespaces:watch",
                "tokenreviews:create",
                "subjectaccessreviews:create"
            ]
            .map(str::to_owned)
        )
    );

    // The Service selects the pods and names their metrics port.
    let pod_labels = ds
        .spec
        .as_ref()
        .unwrap()
        .template
        .metadata
        .as_ref()
        .unwrap()
        .labels
        .clone()
        .unwrap();
    let service = service.expect("Service");
    let service_spec = service.spec.as_ref().unwrap();
    assert!(labels_match(
        service_spec.selector.as_ref().unwrap(),
        &pod_labels
    ));
    let container = &pod.containers[0];
    let port = &service_spec.ports.as_ref().unwrap()[0];
    let container_port = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| {
            serde_json::to_value(port.target_port.as_ref().unwrap()).unwrap()
                == p.name.clone().unwrap()
        })
        .expect("the Service's targetPort names a container port");
    assert_eq!(container_port.container_port, 9478);
    let port_name = port.name.clone().unwrap();

    // Both scrape objects select the Service and scrape its named port, adding `node`.
    let service_labels = service.metadata.labels.clone().unwrap();
    for scrape in &scrapes {
        let selector: BTreeMap<String, String> =
            serde_json::from_value(scrape["spec"]["selector"]["matchLabels"].clone()).unwrap();
        assert!(
            labels_match(&selector, &service_labels),
            "{}",
            scrape["kind"]
        );
        let job_label = scrape["spec"]["jobLabel"].as_str().unwrap();
        assert_eq!(
            service_labels[job_label], "compute-collector",
            "job label value"
        );
        let endpoint = &scrape["spec"]["endpoints"][0];
        assert_eq!(endpoint["port"], port_name.as_str());
        let relabel = endpoint
            .get("relabelings")
            .or_else(|| endpoint.get("relabelConfigs"))
            .unwrap();
        assert_eq!(relabel[0]["targetLabel"], "node");
        assert_eq!(
            relabel[0]["sourceLabels"][0],
            "__meta_kubernetes_pod_node_name"
        );
    }
    assert_eq!(scrapes.len(), 2);

    // The NetworkPolicy admits the monitoring namespace to the metrics port only, and the query
    // layer's namespace to the remote API's port only.
    let policy = policy.expect("NetworkPolicy").spec.unwrap();
    assert!(labels_match(
        policy
            .pod_selector
            .as_ref()
            .unwrap()
            .match_labels
            .as_ref()
            .unwrap(),
        &pod_labels
    ));
    let ingress = policy.ingress.unwrap();
    assert_eq!(ingress.len(), 2);
    for (rule, namespace, port) in [
        (&ingress[0], "monitoring", 9478),
        (&ingress[1], "compute-query", 9479),
    ] {
        let peers = rule.from.as_ref().unwrap();
        assert_eq!(peers.len(), 1);
        let ns = peers[0]
            .namespace_selector
            .as_ref()
            .unwrap()
            .match_labels
            .clone()
            .unwrap();
        assert_eq!(
            ns,
            BTreeMap::from([(
                "kubernetes.io/metadata.name".to_owned(),
                namespace.to_owned()
            )])
        );
        assert!(peers[0].pod_selector.is_none() && peers[0].ip_block.is_none());
        let ports = rule.ports.as_ref().unwrap();
        assert_eq!(ports.len(), 1);
        assert_eq!(
            serde_json::to_value(ports[0].port.as_ref().unwrap()).unwrap(),
            port
        );
    }

    // The remote API listens on the pod IP's port the policy admits, with TLS from the
    // mounted Secret's files.
    let args = container.args.clone().unwrap_or_default();
    assert!(
        args.contains(&"--api-listen=$(POD_IP):9479".to_owned()),
        "{args:?}"
    );
    let api_port = container
        .ports
        .as_ref()
        .unwrap()
        .iter()
        .find(|p| p.name.as_deref() == Some("api"))
        .expect("an api container port");
    assert_eq!(api_port.container_port, 9479);
    let mount = container
        .volume_mounts
        .as_ref()
        .unwrap()
        .iter()
        .find(|m| m.name == "api-tls")
        .expect("the TLS Secret mounted");
    for (flag, file) in [
        ("--api-tls-cert-file", "tls.crt"),
        ("--api-tls-key-file", "tls.key"),
    ] {
        let expected = format!("{flag}={}/{file}", mount.mount_path);
        assert!(args.contains(&expected), "{expected} in {args:?}");
    }
    let volume = pod
        .volumes
        .as_ref()
        .unwrap()
        .iter()
        .find(|v| v.name == "api-tls")
        .unwrap();
    let secret = volume.secret.as_ref().expect("a Secret volume");
    assert_eq!(
        secret.secret_name.as_deref(),
        Some("compute-collector-api-tls")
    );
    assert_eq!(secret.default_mode, Some(0o400));

    // The dashboards: one ConfigMap each for Grafana's sidecar, holding the committed JSON.
    assert_eq!(dashboards.len(), 3);
    for cm in dashboards {
        let labels = cm.metadata.labels.clone().unwrap();
        assert_eq!(labels["grafana_dashboard"], "1");
        let data = cm.data.unwrap();
        assert_eq!(data.len(), 1);
        let (key, json) = data.iter().next().unwrap();
        let committed =
            std::fs::read_to_string(workspace_root().join("deploy/dashboards").join(key)).unwrap();
        assert_eq!(json, &committed, "{key}");
        let dashboard: Value = serde_json::from_str(json).unwrap();
        assert!(dashboard["uid"].is_string());
    }
}

#[test]
fn the_kustomization_lists_exactly_the_bundles_files() {
    let dir = workspace_root().join("deploy/base");
    let kustomization: Value =
        serde_norway::from_str(&std::fs::read_to_string(dir.join("kustomization.yaml")).unwrap())
            .unwrap();
    assert_eq!(kustomization["kind"], "Kustomization");
    assert_eq!(kustomization["namespace"], "compute-telemetry");
    let listed: Vec<String> = kustomization["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| r.as_str().unwrap().to_owned())
        .collect();
    let unique: BTreeSet<String> = listed.iter().cloned().collect();
    assert_eq!(unique.len(), listed.len(), "listed twice: {listed:?}");
    let on_disk: BTreeSet<String> = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .filter(|n| n.ends_with(".yaml") && n != "kustomization.yaml")
        .collect();
    assert_eq!(
        unique, on_disk,
        "kustomization resources vs files in deploy/base"
    );
}

#[test]
fn a_field_the_api_does_not_know_is_caught() {
    // The round trip is what rejects unknown fields: show that it does.
    let mut value = objects()
        .into_iter()
        .find(|(_, v)| v["kind"] == "Service")
        .unwrap()
        .1;
    value["spec"]["clusterIp"] = Value::String("None".into());
    let result = std::panic::catch_unwind(|| typed::<Service>("service.yaml", &value));
    assert!(result.is_err(), "a misspelt field passed");
    let mut errors = Vec::new();
    let mut scrape = objects()
        .into_iter()
        .find(|(_, v)| v["kind"] == "VMServiceScrape")
        .unwrap()
        .1;
    scrape["spec"]["endpoints"][0]["relabelings"] = Value::Array(vec![]);
    check(
        &scrape["spec"],
        &scrape_spec("relabelConfigs"),
        ".spec",
        &mut errors,
    );
    assert_eq!(errors.len(), 1, "{errors:?}");
}
