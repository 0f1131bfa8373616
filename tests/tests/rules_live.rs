//! The rules and the dashboards against the real servers, fed by a real collector following
//! stand-in instances:
//!
//! - vmalert evaluates deploy/rules/collector.rules.yml against a VictoriaMetrics single node
//!   that vmagent fills by scraping the collector: every rule evaluates without error
//!   (MetricsQL is not PromQL everywhere), and the recording rules produce the fleet's series.
//!   vmagent adds the identity labels the identity change will put on compute_instance_info
//!   (metric relabelling, with exactly those names), so the joins run on real data.
//! - Prometheus scrapes the same kind of collector (no identity labels: the collector as it is
//!   today) and evaluates the same rule file: every rule healthy; then every dashboard query
//!   and variable runs without error, and returns data unless its panel says what it still
//!   needs.

use std::{path::Path, time::Duration};

use collector_tests::{
    Collector, Standin, new_uuid,
    servers::{Server, null_notifier, require_binary, workspace_root},
    wait_for,
};
use serde_json::Value;

/// The kernel's BPF statistics, off by default, on for the panels and the alert that read them.
const PROGRAM_STATS_ON: &str = "[kernel]\nprogram_stats = \"on\"\n";

/// Instances of two hypervisors with configured vCPUs and memory, ticking vCPUs (run-queue
/// waits) and console output; one that crashes and one that stops, so that the lifecycle
/// counters move. Returns the stand-ins (killed when dropped) and the running ones' uuids.
fn instances(collector: &Collector, dir: &Path) -> (Vec<Standin>, Vec<String>) {
    std::fs::write(
        dir.join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#,
    )
    .expect("vmm.json");
    let fc = new_uuid("live-fc");
    let qemu = new_uuid("live-qemu");
    let tick = [("STANDIN_TICK_MS", "2"), ("STANDIN_LINES", "20")];
    let mut standins = vec![
        Standin::spawn_in(
            dir,
            "firecracker",
            &["--uuid", &fc, "--config-file", "vmm.json"],
            &tick,
        ),
        Standin::spawn(
            "qemu-system-x86_64",
            &["-uuid", &qemu, "-smp", "2", "-m", "128"],
            &tick,
        ),
    ];
    for uuid in [&fc, &qemu] {
        wait_for(Duration::from_secs(5), || collector.instance(uuid))
            .unwrap_or_else(|| panic!("instance {uuid} not listed:\n{}", collector.stderr()));
    }
    // Short-lived ones: a crash (SIGABRT) and a clean stop.
    let mut crash = Standin::spawn(
        "firecracker",
        &["--uuid", &new_uuid("live-crash")],
        &[("STANDIN_RUN_MS", "300"), ("STANDIN_CRASH", "abort")],
    );
    let mut stop = Standin::spawn(
        "firecracker",
        &["--uuid", &new_uuid("live-stop")],
        &[("STANDIN_RUN_MS", "300")],
    );
    crash.wait();
    stop.wait();
    standins.extend([crash, stop]);
    (standins, vec![fc, qemu])
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
    let collector = Collector::start_with_config(PROGRAM_STATS_ON);
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
    metric_relabel_configs:
      # What the identity change adds to compute_instance_info (same label names).
      - source_labels: [__name__]
        regex: compute_instance_info
        target_label: project
        replacement: test-project
      - source_labels: [__name__, instance_uuid]
        regex: compute_instance_info;(.+)
        target_label: instance_name
        replacement: vm-$1
      - source_labels: [__name__]
        regex: compute_instance_info
        target_label: instance_namespace
        replacement: ns-test
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

    // The recording rules' output, written back into VictoriaMetrics: the fleet's series with
    // the fleet's labels, for each running instance.
    for uuid in &uuids {
        let expr = format!(
            r#"datum_compute_instance_cpu_usage_seconds_total{{instance_uuid="{uuid}", resource_name="vm-{uuid}", resource_namespace="ns-test", resourcemanager_datumapis_com_project_name="test-project", resource_kind="Instance", node="test-node", region="test-region", cluster="test-cluster"}}"#
        );
        wait_for(Duration::from_secs(60), || {
            (!vm.query_ok(&expr).is_empty()).then_some(())
        })
        .unwrap_or_else(|| panic!("no recorded series {expr}\nvmalert:\n{}", vmalert.output()));
    }
    for expr in [
        r#"datum_compute_instance_vcpus{resource_kind="Instance"} == 2"#,
        r#"datum_compute_instance_memory_rss_bytes{resource_kind="Instance"} > 0"#,
        r#"datum_compute_instance_uptime_seconds{resource_kind="Instance"} > 0"#,
        // At least ours: a collector sees every instance on the host, other tests' too.
        r#"datum_compute_project:instances:count{resourcemanager_datumapis_com_project_name="test-project"} >= 2"#,
        r"instance:compute_instance_vcpu_steal:ratio_rate5m >= 0",
        r#"node:compute_instance_lifecycle_events:rate5m{event="crash", node="test-node"}"#,
    ] {
        wait_for(Duration::from_secs(30), || {
            (!vm.query_ok(expr).is_empty()).then_some(())
        })
        .unwrap_or_else(|| {
            let name = expr.split(['{', ' ']).next().unwrap_or(expr);
            panic!("no data for {expr}: {}", vm.query(name))
        });
    }

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
    let collector = Collector::start_with_config(PROGRAM_STATS_ON);
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
    let mut empty_as_declared = Vec::new();
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
            } else if values.is_empty() && label != "project" {
                failures.push(format!("{name} variable {label}: no values"));
            } else if values.is_empty() {
                empty_as_declared.push(format!("{name} variable {label}"));
            }
        }
        for panel in dashboard["panels"].as_array().expect("panels") {
            let title = panel["title"].as_str().unwrap_or_default();
            let description = panel["description"].as_str().unwrap_or_default();
            let may_be_empty = description.contains("Empty until");
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
                } else if result.is_empty() && !may_be_empty {
                    failures.push(format!("{name} / {title}: no data: {expr}"));
                } else if result.is_empty() {
                    empty_as_declared.push(format!("{name} / {title}"));
                }
            }
        }
    }
    eprintln!(
        "{queries} dashboard queries ran; empty as their panels say (identity labels not \
         served yet): {empty_as_declared:#?}"
    );
    assert!(failures.is_empty(), "dashboard queries: {failures:#?}");
}
