//! The rules and the dashboards against the real servers, fed by a real collector following
//! stand-in instances, named by the Pods of the fake Kubernetes API server
//! (collector_tests::kube_api) through the collector's own Kubernetes source:
//!
//! - vmalert evaluates deploy/rules/collector.rules.yml against a VictoriaMetrics single node
//!   that vmagent fills by scraping the collector: every rule evaluates without error
//!   (MetricsQL is not PromQL everywhere), and the recording rules produce the fleet's series
//!   with the fleet's labels, the identity's exact values.
//! - Prometheus scrapes the same kind of collector and evaluates the same rule file: every rule
//!   healthy, the fleet's series with the same labels; then every dashboard query and variable
//!   runs without error and returns data.

use std::{path::Path, time::Duration};

use collector_tests::{
    Collector, Standin,
    kube_api::{FakeKube, FakePod},
    new_uuid,
    servers::{Server, null_notifier, require_binary, workspace_root},
    wait_for,
};
use serde_json::Value;

const NODE: &str = "n1";
const PROJECT: &str = "proj-live";
const NAMESPACE: &str = "ns-live";
const INSTANCE_NAMESPACE: &str = "default";

/// The fake API server, with the project's Namespace.
fn fake_kube() -> FakeKube {
    let fake = FakeKube::start();
    fake.create_namespace(
        NAMESPACE,
        &[
            ("resourcemanager.miloapis.com/project-name", PROJECT),
            ("meta.datumapis.com/upstream-namespace", INSTANCE_NAMESPACE),
        ],
    );
    fake
}

/// A collector for node n1 whose Kubernetes source watches `fake`.
fn collector(fake: &FakeKube) -> Collector {
    let kubeconfig = fake.kubeconfig();
    let log_dir = tempfile::tempdir().expect("log dir");
    let config = log_dir.path().join("collector.toml");
    std::fs::write(&config, PROGRAM_STATS_ON).expect("config");
    Collector::start_in_env(
        log_dir,
        &["--node-name", NODE, "--config", config.to_str().unwrap()],
        &[("KUBECONFIG", kubeconfig.to_str().unwrap())],
    )
}

/// The Pod `name` backing `uuid` on this node, its Instance named `<name>-instance`.
fn create_pod(fake: &FakeKube, name: &str, container_id: &str) {
    fake.create_pod(&FakePod::unikraft(
        NAMESPACE,
        name,
        &format!("kraftlet-{NODE}"),
        Some(container_id),
    ));
}

/// The kernel's BPF statistics, off by default, on for the panels and the alert that read them.
const PROGRAM_STATS_ON: &str = "[kernel]\nprogram_stats = \"on\"\n";

/// Instances of two hypervisors with configured vCPUs and memory, ticking vCPUs (run-queue
/// waits) and console output (one with a console loss). Returns the stand-ins (killed when dropped) and their uuids.
fn instances(collector: &Collector, dir: &Path) -> (Vec<Standin>, Vec<String>) {
    std::fs::write(
        dir.join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#,
    )
    .expect("vmm.json");
    let fc = new_uuid("live-fc");
    let qemu = new_uuid("live-qemu");
    let tick = [("STANDIN_TICK_MS", "2"), ("STANDIN_LINES", "20")];
    let standins = vec![
        Standin::spawn_in(
            dir,
            "firecracker",
            &["--uuid", &fc, "--config-file", "vmm.json"],
            &tick,
        ),
        // Its console also holds a write over 64 KiB, which the kernel cuts: console drop
        // series (sparse: they appear with a loss) for the drop panels and alert.
        Standin::spawn(
            "qemu-system-x86_64",
            &["-uuid", &qemu, "-smp", "2", "-m", "128"],
            &[tick[0], tick[1], ("STANDIN_TRICKY", "1")],
        ),
    ];
    for uuid in [&fc, &qemu] {
        wait_for(Duration::from_secs(5), || collector.instance(uuid))
            .unwrap_or_else(|| panic!("instance {uuid} not listed:\n{}", collector.stderr()));
    }
    (standins, vec![fc, qemu])
}

/// Once the scraper has seen the running instances: their Pods (`vm-fc`, `vm-qemu`, either
/// containerID form) arrive, so that they are named and created; then a crashing and a
/// stopping instance, their Pods first (scraped before their VMMs start), so that every
/// lifecycle counter moves under the scraper's eyes. Returns the stand-ins and the running
/// instances' `(uuid, Pod name)`.
fn name_and_churn(
    collector: &Collector,
    fake: &FakeKube,
    uuids: &[String],
) -> (Vec<Standin>, Vec<(String, &'static str)>) {
    let (fc, qemu) = (&uuids[0], &uuids[1]);
    create_pod(fake, "vm-fc", &format!("ukp://{fc}"));
    create_pod(fake, "vm-qemu", qemu);
    for uuid in [fc, qemu] {
        wait_for(Duration::from_secs(5), || {
            collector
                .instance(uuid)
                .filter(|i| i["identity"]["project"] == PROJECT)
        })
        .unwrap_or_else(|| panic!("instance {uuid} not named:\n{}", collector.stderr()));
    }
    let (crashing, stopping) = (new_uuid("live-crash"), new_uuid("live-stop"));
    create_pod(fake, "vm-crash", &crashing);
    create_pod(fake, "vm-stop", &stopping);
    for uuid in [&crashing, &stopping] {
        wait_for(Duration::from_secs(5), || collector.instance(uuid))
            .unwrap_or_else(|| panic!("instance {uuid} not created:\n{}", collector.stderr()));
    }
    // Scrapes every second: a few see the created instances before their VMMs run.
    std::thread::sleep(Duration::from_secs(3));
    let mut crash = Standin::spawn(
        "firecracker",
        &["--uuid", &crashing],
        &[("STANDIN_RUN_MS", "300"), ("STANDIN_CRASH", "abort")],
    );
    let mut stop = Standin::spawn(
        "firecracker",
        &["--uuid", &stopping],
        &[("STANDIN_RUN_MS", "300")],
    );
    crash.wait();
    stop.wait();
    (
        vec![crash, stop],
        vec![(fc.clone(), "vm-fc"), (qemu.clone(), "vm-qemu")],
    )
}

/// The fleet's CPU series of `uuid` with every label the rules give it, exact values.
fn fleet_cpu_series(uuid: &str, pod: &str) -> String {
    format!(
        r#"datum_compute_instance_cpu_usage_seconds_total{{instance_uuid="{uuid}", resource_name="{pod}-instance", resource_namespace="{INSTANCE_NAMESPACE}", resourcemanager_datumapis_com_project_name="{PROJECT}", resource_kind="Instance", node="test-node", region="test-region", cluster="test-cluster"}}"#
    )
}

/// The labels of the one series `expr` returns, from `query`.
fn only_labels(result: &[Value], expr: &str) -> Value {
    assert_eq!(result.len(), 1, "{expr}: {result:#?}");
    let mut labels = result[0]["metric"].clone();
    labels.as_object_mut().unwrap().remove("__name__");
    labels
}

/// The fleet series' labels, exactly: the identity's values, node, region, cluster, nothing
/// else of the scrape.
fn expected_fleet_labels(uuid: &str, pod: &str) -> Value {
    serde_json::json!({
        "instance_uuid": uuid, "resource_name": format!("{pod}-instance"),
        "resource_namespace": INSTANCE_NAMESPACE,
        "resourcemanager_datumapis_com_project_name": PROJECT, "resource_kind": "Instance",
        "node": "test-node", "region": "test-region", "cluster": "test-cluster"
    })
}

fn rule_file() -> String {
    workspace_root()
        .join("deploy/rules/collector.rules.yml")
        .display()
        .to_string()
}

/// Every rule of every group in a `/api/v1/rules` answer.
fn all_rules(answer: &Value) -> Vec<Value> {
    answer["data"]["groups"]
        .as_array()
        .unwrap_or_else(|| panic!("no groups: {answer}"))
        .iter()
        .flat_map(|g| g["rules"].as_array().cloned().unwrap_or_default())
        .collect()
}

fn rule_count() -> usize {
    let text = std::fs::read_to_string(rule_file()).expect("rule file");
    text.lines()
        .filter(|l| {
            let l = l.trim_start();
            l.starts_with("- record:") || l.starts_with("- alert:")
        })
        .count()
}

#[test]
fn rules_evaluate_in_vmalert_against_victoriametrics() {
    let vm_bin = require_binary("victoria-metrics", "victoria-metrics");
    let vmagent_bin = require_binary("vmagent", "victoria-metrics");
    let vmalert_bin = require_binary("vmalert", "victoria-metrics");
    let fake = fake_kube();
    let collector = collector(&fake);
    let work = tempfile::tempdir().expect("dir");
    let (_standins, uuids) = instances(&collector, work.path());

    let vm = Server::start("victoria-metrics", &vm_bin, "/health", |addr, dir| {
        vec![
            format!("-httpListenAddr={addr}"),
            format!("-storageDataPath={}", dir.join("data").display()),
            "-retentionPeriod=1d".into(),
            // Answer queries with what was written a second ago (default: 30 s behind).
            "-search.latencyOffset=1s".into(),
            "-loggerLevel=ERROR".into(),
        ]
    });
    let scrape = format!(
        r#"global:
  scrape_interval: 1s
scrape_configs:
  - job_name: compute-collector
    static_configs:
      - targets: ["{target}"]
        labels: {{node: test-node}}
"#,
        target = collector.addr
    );
    let _vmagent = Server::start("vmagent", &vmagent_bin, "/health", |addr, dir| {
        let config = dir.join("scrape.yml");
        std::fs::write(&config, &scrape).expect("scrape config");
        vec![
            format!("-httpListenAddr={addr}"),
            format!("-promscrape.config={}", config.display()),
            format!("-remoteWrite.url={}", vm.url("/api/v1/write")),
            format!("-remoteWrite.tmpDataPath={}", dir.join("buffer").display()),
            // The fleet's external labels.
            "-remoteWrite.label=cluster=test-cluster".into(),
            "-remoteWrite.label=region=test-region".into(),
            "-remoteWrite.flushInterval=1s".into(),
            "-loggerLevel=ERROR".into(),
        ]
    });
    let notifier = null_notifier();
    let vmalert = Server::start("vmalert", &vmalert_bin, "/health", |addr, _| {
        vec![
            format!("-httpListenAddr={addr}"),
            format!("-rule={}", rule_file()),
            format!("-datasource.url={}", vm.url("")),
            format!("-remoteWrite.url={}", vm.url("")),
            format!("-notifier.url={notifier}"),
            "-evaluationInterval=1s".into(),
            "-remoteWrite.flushInterval=1s".into(),
        ]
    });

    // Scraped, still without identity: then the Pods arrive and the instances churn.
    for uuid in &uuids {
        let expr =
            format!(r#"compute_instance_events_total{{instance_uuid="{uuid}", event="start"}}"#);
        wait_for(Duration::from_secs(30), || {
            (!vm.query_ok(&expr).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("{uuid} not scraped:\n{}", vmalert.output()));
    }
    let (_churned, named) = name_and_churn(&collector, &fake, &uuids);

    // The recording rules' output, written back into VictoriaMetrics: the fleet's series with
    // the fleet's labels, the identity's values from the Pods, for each running instance.
    for (uuid, pod) in &named {
        let expr = fleet_cpu_series(uuid, pod);
        let result = wait_for(Duration::from_secs(60), || {
            let result = vm.query_ok(&expr);
            (!result.is_empty()).then_some(result)
        })
        .unwrap_or_else(|| panic!("no recorded series {expr}\nvmalert:\n{}", vmalert.output()));
        assert_eq!(
            only_labels(&result, &expr),
            expected_fleet_labels(uuid, pod)
        );
    }
    let project = format!(r#"resourcemanager_datumapis_com_project_name="{PROJECT}""#);
    for expr in [
        format!(
            r#"datum_compute_instance_vcpus{{resource_name="vm-fc-instance", {project}}} == 2"#
        ),
        format!(
            r#"datum_compute_instance_memory_rss_bytes{{resource_name="vm-qemu-instance", {project}}} > 0"#
        ),
        format!(
            r#"datum_compute_instance_uptime_seconds{{resource_name="vm-fc-instance", {project}}} > 0"#
        ),
        // Exactly ours (only the test's Pods carry the project): the two running and the two
        // whose VMM ended, their Pods still there (created, not running).
        format!("datum_compute_project:instances:count{{{project}}} == 4"),
        format!("datum_compute_project:vcpus:sum{{{project}}} == 4"),
        r"instance:compute_instance_vcpu_steal:ratio_rate5m >= 0".to_owned(),
        r#"node:compute_instance_lifecycle_events:rate5m{event="crash", node="test-node"}"#
            .to_owned(),
        // Per project, the terminated and crashed instances' events included.
        format!(
            r#"datum_compute_project:lifecycle_events:rate5m{{event="create", {project}}} > 0"#
        ),
        format!(r#"datum_compute_project:lifecycle_events:rate5m{{event="start", {project}}} > 0"#),
        format!(r#"datum_compute_project:lifecycle_events:rate5m{{event="crash", {project}}} > 0"#),
        format!(r#"datum_compute_project:lifecycle_events:rate5m{{event="stop", {project}}} > 0"#),
    ] {
        wait_for(Duration::from_secs(30), || {
            (!vm.query_ok(&expr).is_empty()).then_some(())
        })
        .unwrap_or_else(|| {
            let name = expr.split(['{', ' ']).next().unwrap_or(&expr);
            panic!("no data for {expr}: {}", vm.query(name))
        });
    }
    // An instance created and terminated (its Pod gone, no VMM left) still counts for its
    // project after it is gone: its counter lingers, its identity is in the last 10 minutes.
    let gone = new_uuid("live-gone");
    create_pod(&fake, "vm-gone", &gone);
    wait_for(Duration::from_secs(10), || collector.instance(&gone))
        .unwrap_or_else(|| panic!("{gone} not created:\n{}", collector.stderr()));
    // Deleted once its identity is recorded (the rules saw it).
    let recorded = format!(
        r#"datum_compute_instance_identity:info{{instance_uuid="{gone}", resource_name="vm-gone-instance"}}"#
    );
    wait_for(Duration::from_secs(30), || {
        (!vm.query_ok(&recorded).is_empty()).then_some(())
    })
    .unwrap_or_else(|| panic!("no {recorded}:\n{}", vmalert.output()));
    fake.delete_pod(NAMESPACE, "vm-gone");
    wait_for(Duration::from_secs(5), || {
        collector.instance(&gone).is_none().then_some(())
    })
    .expect("terminated");
    let terminated = format!(
        r#"datum_compute_project:lifecycle_events:rate5m{{event="terminate", {project}}} > 0"#
    );
    wait_for(Duration::from_secs(30), || {
        (!vm.query_ok(&terminated).is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no data for {terminated}: {}\n{}",
            vm.query("datum_compute_project:lifecycle_events:rate5m"),
            vm.query(&format!(
                r#"compute_instance_events_total{{instance_uuid="{gone}"}}"#
            ))
        )
    });

    // Every rule evaluated, none with an error.
    let expected = rule_count();
    let rules = wait_for(Duration::from_secs(30), || {
        let rules = all_rules(&vmalert.get_json("/api/v1/rules"));
        let evaluated = rules
            .iter()
            .filter(|r| {
                r["lastEvaluation"]
                    .as_str()
                    .is_some_and(|t| !t.starts_with("0001"))
            })
            .count();
        (rules.len() == expected && evaluated == expected).then_some(rules)
    })
    .unwrap_or_else(|| {
        panic!(
            "vmalert did not evaluate all {expected} rules:\n{}",
            vmalert.get_json("/api/v1/rules")
        )
    });
    for rule in &rules {
        assert!(
            rule["lastError"].is_string(),
            "vmalert's rule has no lastError field: {rule}"
        );
    }
    let failed: Vec<String> = rules
        .iter()
        .filter(|r| r["lastError"].as_str().is_some_and(|e| !e.is_empty()))
        .map(|r| format!("{}: {}", r["name"], r["lastError"]))
        .collect();
    assert!(failed.is_empty(), "rules failing in vmalert: {failed:#?}");
    eprintln!("vmalert: {} rules evaluated without error", rules.len());
}

/// `$variable`s of the dashboards replaced by what "All" sends (`.*`), and Grafana's rate
/// interval by a window that holds several 1 s scrapes.
fn substitute(expr: &str) -> String {
    let mut out = expr.replace("$__rate_interval", "1m");
    for var in ["cluster", "node", "hypervisor", "project", "instance"] {
        out = out.replace(&format!("${var}"), ".*");
    }
    out
}

#[test]
fn dashboards_and_rules_against_prometheus() {
    let prometheus_bin = require_binary("prometheus", "prometheus");
    let fake = fake_kube();
    let collector = collector(&fake);
    let work = tempfile::tempdir().expect("dir");
    let (_standins, uuids) = instances(&collector, work.path());
    let config = format!(
        r#"global:
  scrape_interval: 1s
  evaluation_interval: 1s
rule_files: ["{rules}"]
scrape_configs:
  - job_name: compute-collector
    static_configs:
      - targets: ["{target}"]
        # node from the scrape's relabelling, cluster and region as the fleet's external
        # labels: here on the target, as Prometheus does not show external labels to queries.
        labels: {{node: test-node, cluster: test-cluster, region: test-region}}
"#,
        rules = rule_file(),
        target = collector.addr
    );
    let prometheus = Server::start("prometheus", &prometheus_bin, "/-/ready", |addr, dir| {
        let path = dir.join("prometheus.yml");
        std::fs::write(&path, &config).expect("config");
        vec![
            format!("--config.file={}", path.display()),
            format!("--storage.tsdb.path={}", dir.join("data").display()),
            format!("--web.listen-address={addr}"),
            "--log.level=warn".into(),
        ]
    });
    for uuid in &uuids {
        let expr =
            format!(r#"compute_instance_events_total{{instance_uuid="{uuid}", event="start"}}"#);
        wait_for(Duration::from_secs(30), || {
            (!prometheus.query_ok(&expr).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("{uuid} not scraped:\n{}", prometheus.output()));
    }
    let (_churned, named) = name_and_churn(&collector, &fake, &uuids);
    // Enough scrapes for the rates, and the recording rules evaluated on them.
    wait_for(Duration::from_secs(60), || {
        let steal = prometheus.query_ok("instance:compute_instance_vcpu_steal:ratio_rate5m");
        let scrapes =
            prometheus.query_ok(r#"count_over_time(up{job="compute-collector"}[1m]) >= 5"#);
        // Ours at least: the collector follows every instance on the host.
        let ours = uuids.iter().all(|u| {
            steal
                .iter()
                .any(|s| s["metric"]["instance_uuid"] == u.as_str())
        });
        (ours && !scrapes.is_empty()).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "no recorded steal series for {uuids:?}: {:?}\nvcpus: {:?}\nwaits: {:?}\n{}",
            prometheus.query("instance:compute_instance_vcpu_steal:ratio_rate5m"),
            prometheus.query("compute_instance_vcpus"),
            prometheus.query(r#"compute_instance_runqueue_latency_seconds_sum{thread="vcpu"}"#),
            prometheus.output()
        )
    });

    // The fleet's series with the Pods' identity, as in VictoriaMetrics.
    for (uuid, pod) in &named {
        let expr = fleet_cpu_series(uuid, pod);
        let result = wait_for(Duration::from_secs(30), || {
            let result = prometheus.query_ok(&expr);
            (!result.is_empty()).then_some(result)
        })
        .unwrap_or_else(|| panic!("no recorded series {expr}\n{}", prometheus.output()));
        assert_eq!(
            only_labels(&result, &expr),
            expected_fleet_labels(uuid, pod)
        );
    }

    let rules = all_rules(&prometheus.get_json("/api/v1/rules"));
    assert_eq!(rules.len(), rule_count(), "rules loaded by Prometheus");
    let unhealthy: Vec<String> = rules
        .iter()
        .filter(|r| r["health"] != "ok")
        .map(|r| format!("{}: {} {}", r["name"], r["health"], r["lastError"]))
        .collect();
    assert!(
        unhealthy.is_empty(),
        "rules not healthy in Prometheus: {unhealthy:#?}"
    );

    let mut failures = Vec::new();
    let mut queries = 0;
    for name in ["fleet", "node", "instance"] {
        let path = workspace_root().join(format!("deploy/dashboards/compute-{name}.json"));
        let dashboard: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).expect("dashboard"))
                .expect("JSON");
        for variable in dashboard["templating"]["list"]
            .as_array()
            .expect("variables")
        {
            let Some(definition) = variable["definition"].as_str() else {
                continue;
            };
            // label_values(SELECTOR, LABEL): the label's values among the selector's series.
            let inner = definition
                .strip_prefix("label_values(")
                .and_then(|d| d.strip_suffix(')'))
                .unwrap_or_else(|| panic!("unexpected variable query {definition}"));
            let (selector, label) = inner.rsplit_once(", ").expect("label_values(s, l)");
            let selector = substitute(selector);
            let answer = prometheus.get_json(&format!(
                "/api/v1/label/{label}/values?match[]={}",
                collector_tests::servers::query_encode(&selector)
            ));
            queries += 1;
            let values = answer["data"].as_array().cloned().unwrap_or_default();
            if answer["status"] != "success" {
                failures.push(format!("{name} variable {label}: {answer}"));
            } else if values.is_empty() {
                failures.push(format!("{name} variable {label}: no values"));
            } else if label == "project" && !values.contains(&Value::from(PROJECT)) {
                failures.push(format!("{name} variable project: {values:?}"));
            }
        }
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or_default();
            for target in panel["targets"].as_array().expect("targets") {
                let expr = substitute(target["expr"].as_str().expect("expr"));
                queries += 1;
                let answer = prometheus.query(&expr);
                let result = answer["data"]["result"]
                    .as_array()
                    .cloned()
                    .unwrap_or_default();
                if answer["status"] != "success" {
                    failures.push(format!("{name} / {title}: {expr}: {answer}"));
                } else if result.is_empty() {
                    failures.push(format!("{name} / {title}: no data: {expr}"));
                }
            }
        }
    }
    eprintln!("{queries} dashboard queries ran");
    assert!(failures.is_empty(), "dashboard queries: {failures:#?}");
}
