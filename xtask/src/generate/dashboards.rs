//! Grafana dashboards as code: fleet -> node -> instance, each a list of panels below.
//!
//! Rendered to deploy/dashboards/<uid>.json (import by hand) and to a ConfigMap per dashboard
//! (deploy/base/dashboard-<name>.yaml, label `grafana_dashboard: "1"` for Grafana's sidecar).
//! Every panel has a unit. A panel that an alert points at carries a link to the alert's
//! runbook, and the runbook links back to the panel (tests/tests/bundle.rs checks both ways).
//! The live test (tests/tests/rules_live.rs) runs every query against a collector with
//! stand-ins and identities: each must return data.

use std::path::PathBuf;

use serde_json::{Value, json};

/// Where the runbooks are published (the same base as the rules' `runbook_url`).
pub(super) const RUNBOOK_BASE: &str =
    "https://github.com/example/compute-collector/blob/main/docs/runbooks/";

const SEL_FLEET: &str = r#"cluster=~"$cluster""#;
const SEL_NODE: &str = r#"cluster=~"$cluster", node=~"$node""#;
const SEL_INSTANCE: &str = r#"cluster=~"$cluster", node=~"$node", instance_uuid=~"$instance""#;

struct Panel {
    title: &'static str,
    kind: &'static str,
    unit: &'static str,
    description: String,
    targets: Vec<(String, &'static str)>,
    width: u32,
    alert: Option<&'static str>,
    /// Data link on each series to the next dashboard down (node or instance).
    drill: Option<&'static str>,
}

fn panel(title: &'static str, kind: &'static str, unit: &'static str, description: &str) -> Panel {
    Panel {
        title,
        kind,
        unit,
        description: description.to_owned(),
        targets: Vec::new(),
        width: 12,
        alert: None,
        drill: None,
    }
}

impl Panel {
    fn q(mut self, expr: impl Into<String>, legend: &'static str) -> Self {
        self.targets.push((expr.into(), legend));
        self
    }
    fn w(mut self, width: u32) -> Self {
        self.width = width;
        self
    }
    fn alert(mut self, alert: &'static str) -> Self {
        self.alert = Some(alert);
        self
    }
    fn drill(mut self, to: &'static str) -> Self {
        self.drill = Some(to);
        self
    }
}

struct Dashboard {
    uid: &'static str,
    file: &'static str,
    title: &'static str,
    description: &'static str,
    variables: &'static [&'static str],
    panels: Vec<Panel>,
}

fn datasource() -> Value {
    json!({"type": "prometheus", "uid": "${datasource}"})
}

fn variable(name: &str) -> Value {
    let (label, query) = match name {
        "cluster" => (
            "Cluster",
            "label_values(collector_build_info, cluster)".to_owned(),
        ),
        "node" => (
            "Node",
            format!("label_values(collector_build_info{{{SEL_FLEET}}}, node)"),
        ),
        "hypervisor" => (
            "Hypervisor",
            format!("label_values(compute_instance_info{{{SEL_NODE}}}, hypervisor)"),
        ),
        "project" => (
            "Project",
            format!("label_values(compute_instance_info{{{SEL_FLEET}}}, project)"),
        ),
        "instance" => (
            "Instance",
            format!(
                r#"label_values(compute_instance_info{{{SEL_NODE}, hypervisor=~"$hypervisor", project=~"$project"}}, instance_uuid)"#
            ),
        ),
        other => unreachable!("no variable {other}"),
    };
    json!({
        "name": name,
        "label": label,
        "type": "query",
        "datasource": datasource(),
        "definition": query,
        "query": {"query": query, "refId": name},
        "refresh": 2,
        "sort": 1,
        "multi": true,
        "includeAll": true,
        // Matches series without the label too (e.g. cluster where no external label is set).
        "allValue": ".*",
        "current": {"text": "All", "value": "$__all"},
    })
}

fn render_panel(id: u32, x: u32, y: u32, p: &Panel) -> Value {
    let refs = ["A", "B", "C", "D", "E"];
    let heatmap = p.kind == "heatmap";
    let targets: Vec<Value> = p
        .targets
        .iter()
        .zip(refs)
        .map(|((expr, legend), ref_id)| {
            let mut t = json!({
                "refId": ref_id,
                "datasource": datasource(),
                "expr": expr,
                "legendFormat": legend,
                "range": p.kind != "table",
                "instant": p.kind == "table",
            });
            if heatmap {
                t["format"] = json!("heatmap");
            } else if p.kind == "table" {
                t["format"] = json!("table");
            }
            t
        })
        .collect();
    let mut defaults = json!({"unit": p.unit});
    if let Some(to) = p.drill {
        let (title, url) = match to {
            "node" => (
                "Node ${__field.labels.node}",
                "/d/compute-node/compute-node?var-cluster=${__field.labels.cluster}&var-node=${__field.labels.node}&${__url_time_range}",
            ),
            _ => (
                "Instance ${__field.labels.instance_uuid}",
                "/d/compute-instance/compute-instance?var-cluster=${__field.labels.cluster}&var-node=${__field.labels.node}&var-instance=${__field.labels.instance_uuid}&${__url_time_range}",
            ),
        };
        defaults["links"] = json!([{"title": title, "url": url}]);
    }
    let mut panel = json!({
        "id": id,
        "type": p.kind,
        "title": p.title,
        "description": p.description,
        "datasource": datasource(),
        "gridPos": {"h": 8, "w": p.width, "x": x, "y": y},
        "fieldConfig": {"defaults": defaults, "overrides": []},
        "targets": targets,
    });
    if heatmap {
        panel["options"] = json!({
            "calculate": false,
            "yAxis": {"unit": p.unit},
            "cellGap": 1,
            "color": {"mode": "scheme", "scheme": "Oranges", "exponent": 0.5},
            "tooltip": {"show": true, "yHistogram": true},
        });
    }
    if let Some(alert) = p.alert {
        panel["links"] = json!([{
            "title": format!("Runbook: {alert}"),
            "url": format!("{RUNBOOK_BASE}{alert}.md"),
            "targetBlank": true,
        }]);
    }
    panel
}

fn render(d: &Dashboard) -> Value {
    let mut list = vec![json!({
        "name": "datasource",
        "label": "Data source",
        "type": "datasource",
        "query": "prometheus",
        "current": {},
    })];
    list.extend(d.variables.iter().map(|v| variable(v)));
    let (mut x, mut y) = (0, 0);
    let panels: Vec<Value> = d
        .panels
        .iter()
        .enumerate()
        .map(|(i, p)| {
            if x + p.width > 24 {
                x = 0;
                y += 8;
            }
            let rendered = render_panel(i as u32 + 1, x, y, p);
            x += p.width;
            rendered
        })
        .collect();
    json!({
        "uid": d.uid,
        "title": d.title,
        "description": d.description,
        "tags": ["compute", "compute-collector"],
        "timezone": "utc",
        "editable": false,
        "graphTooltip": 1,
        "refresh": "1m",
        "schemaVersion": 39,
        "version": 1,
        "time": {"from": "now-6h", "to": "now"},
        "links": [{
            "type": "dashboards",
            "title": "Compute",
            "tags": ["compute-collector"],
            "asDropdown": true,
            "includeVars": true,
            "keepTime": true,
        }],
        "annotations": {"list": []},
        "templating": {"list": list},
        "panels": panels,
    })
}

fn fleet() -> Dashboard {
    let events = |selector: &str| {
        format!(
            "compute_instance_lifecycle_events_total{{{SEL_FLEET}, hypervisor=~\"$hypervisor\"{selector}}}"
        )
    };
    let project = r#"resourcemanager_datumapis_com_project_name=~"$project""#;
    Dashboard {
        uid: "compute-fleet",
        file: "fleet",
        title: "Compute / Fleet",
        description: "Instances and collectors across the fleet, and per project. Node and instance dashboards below.",
        variables: &["cluster", "hypervisor", "project"],
        panels: vec![
            panel("Nodes scraped", "stat", "short", "Collectors scraped successfully right now.")
                .q(format!(r#"sum(up{{job="compute-collector", {SEL_FLEET}}})"#), "nodes")
                .w(6),
            panel(
                "Nodes not scraped (ran instances in 6h)",
                "stat",
                "short",
                "Nodes that reported instances in the last 6 hours and have no successful scrape now: the alert's expression.",
            )
            .q(
                format!(
                    r#"count((max by (cluster, region, node) (max_over_time(collector_instances{{{SEL_FLEET}}}[6h])) > 0) unless on (cluster, region, node) (max by (cluster, region, node) (up{{job="compute-collector"}}) == 1)) or vector(0)"#
                ),
                "nodes",
            )
            .w(6)
            .alert("ComputeCollectorDown"),
            panel("Instances running", "stat", "short", "Instances followed by the collectors.")
                .q(format!("sum(collector_instances{{{SEL_FLEET}}})"), "instances")
                .w(6),
            panel("Collector versions", "stat", "short", "Collectors per version.")
                .q(format!("count by (version) (collector_build_info{{{SEL_FLEET}}})"), "{{version}}")
                .w(6),
            panel("Instances by hypervisor", "timeseries", "short", "Running instances, by hypervisor.")
                .q(
                    format!(r#"sum by (hypervisor) (compute_instance_info{{{SEL_FLEET}, hypervisor=~"$hypervisor"}})"#),
                    "{{hypervisor}}",
                ),
            panel("Lifecycle events", "timeseries", "cps", "Lifecycle events a second, by event (create, start, discovered, stop, crash, oom_kill, terminate).")
                .q(format!("sum by (event) (rate({}[$__rate_interval]))", events("")), "{{event}}"),
            panel(
                "Crash share of exits (30m)",
                "timeseries",
                "percentunit",
                "Crashes among instance exits (stop, crash, oom_kill) over 30 minutes, fleet-wide per hypervisor. Warning above 20% for 15m, critical above 50% for 10m.",
            )
            .q(
                format!(
                    r"sum by (hypervisor) (increase({}[30m])) / sum by (hypervisor) (increase({}[30m]))",
                    events(r#", event="crash""#),
                    events(r#", event=~"stop|crash|oom_kill""#)
                ),
                "{{hypervisor}}",
            )
            .alert("ComputeInstanceCrashRateHigh"),
            panel("OOM kills by node (10m)", "timeseries", "short", "Instances the OOM killer chose, per node, over 10 minutes.")
                .q(
                    format!("sum by (cluster, node) (increase({}[10m]))", events(r#", event="oom_kill""#)),
                    "{{node}}",
                )
                .drill("node"),
            panel("Kernel program CPU by node", "timeseries", "suffix: CPU", "CPU the collector's eBPF programs use on each node while the kernel's BPF statistics time them (kernel.program_stats; 30m windows, as the alert).")
                .q(
                    format!("sum by (cluster, node) (rate(collector_ebpf_program_run_seconds_total{{{SEL_FLEET}}}[30m])) / on (cluster, node) (sum by (cluster, node) (rate(collector_ebpf_program_stats_seconds_total{{{SEL_FLEET}}}[30m])) > 0)"),
                    "{{node}}",
                )
                .drill("node"),
            panel("vCPU steal, top 10 instances", "timeseries", "percentunit", "Share of each vCPU's time spent waiting for a host CPU (instance:compute_instance_vcpu_steal:ratio_rate5m).")
                .q(
                    format!("topk(10, instance:compute_instance_vcpu_steal:ratio_rate5m{{{SEL_FLEET}}})"),
                    "{{node}} {{instance_uuid}}",
                )
                .drill("instance"),
            panel("Instances per project", "timeseries", "short", "Instances per project, running or created and not running (datum_compute_project:instances:count).")
                .q(format!("datum_compute_project:instances:count{{{SEL_FLEET}, {project}}}"), "{{resourcemanager_datumapis_com_project_name}}"),
            panel("vCPUs allocated per project", "timeseries", "short", "vCPUs of the running instances, per project.")
                .q(format!("datum_compute_project:vcpus:sum{{{SEL_FLEET}, {project}}}"), "{{resourcemanager_datumapis_com_project_name}}"),
            panel("Memory allocated per project", "timeseries", "bytes", "Memory of the running instances, per project.")
                .q(format!("datum_compute_project:memory_allocated_bytes:sum{{{SEL_FLEET}, {project}}}"), "{{resourcemanager_datumapis_com_project_name}}"),
            panel("Lifecycle events per project", "timeseries", "cps", "Lifecycle events a second per project and event (datum_compute_project:lifecycle_events:rate5m): create, start, stop, crash, oom_kill, terminate.")
                .q(format!("datum_compute_project:lifecycle_events:rate5m{{{SEL_FLEET}, {project}}}"), "{{resourcemanager_datumapis_com_project_name}} {{event}}"),
            panel("CPU used per project", "timeseries", "suffix: CPU", "CPU the project's instances use (rate of datum_compute_instance_cpu_usage_seconds_total).")
                .q(format!("datum_compute_project:cpu_usage_seconds:rate5m{{{SEL_FLEET}, {project}}}"), "{{resourcemanager_datumapis_com_project_name}}"),
        ],
    }
}

fn node() -> Dashboard {
    let events = |selector: &str| {
        format!(
            "compute_instance_lifecycle_events_total{{{SEL_NODE}, hypervisor=~\"$hypervisor\"{selector}}}"
        )
    };
    Dashboard {
        uid: "compute-node",
        file: "node",
        title: "Compute / Node",
        description: "One node's collector: probes, kernel-side losses, pipelines, program cost, and its instances.",
        variables: &["cluster", "node", "hypervisor"],
        panels: vec![
            panel("Collector up", "stat", "bool_yes_no", "Whether the collector's last scrape succeeded.")
                .q(format!(r#"max by (node) (up{{job="compute-collector", {SEL_NODE}}})"#), "{{node}}")
                .w(6),
            panel("Instances", "stat", "short", "Instances the collector follows on the node.")
                .q(format!("sum(collector_instances{{{SEL_NODE}}})"), "instances")
                .w(6),
            panel("Core probes attached", "stat", "bool_yes_no", "sched_process_exec (discovery) and sched_process_exit (exits): both must be 1.")
                .q(
                    format!(r#"min by (node, probe) (collector_probe_attached{{{SEL_NODE}, probe=~"sched_process_exec|sched_process_exit"}})"#),
                    "{{probe}}",
                )
                .w(12)
                .alert("ComputeCollectorCoreProbeDetached"),
            panel("Probes not attached", "table", "short", "Every probe whose value is 0 (its feature is off).")
                .q(format!("collector_probe_attached{{{SEL_NODE}}} == 0 or on() vector(0)"), "{{probe}}"),
            panel("Kernel events lost (10m)", "timeseries", "short", "Lifecycle records the kernel could not put on its ring buffer, over 10 minutes.")
                .q(
                    format!("sum by (node, ring, event) (increase(collector_ebpf_events_lost_total{{{SEL_NODE}}}[10m]))"),
                    "{{ring}} {{event}}",
                )
                .alert("ComputeCollectorKernelEventsLost"),
            panel("Kernel maps full (10m)", "timeseries", "short", "Entries the kernel's maps refused, over 10 minutes: tracked processes, threads, console descriptors.")
                .q(format!("sum by (node) (increase(collector_ebpf_tracked_map_full_total{{{SEL_NODE}}}[10m]))"), "tracked")
                .q(format!("sum by (node) (increase(collector_ebpf_thread_map_full_total{{{SEL_NODE}}}[10m]))"), "thread")
                .q(format!("sum by (node) (increase(collector_ebpf_console_fd_map_full_total{{{SEL_NODE}}}[10m]))"), "console_fd")
                .alert("ComputeCollectorKernelMapFull"),
            panel("Kernel map entries", "timeseries", "short", "Entries in the scheduling maps.")
                .q(format!("sum by (map) (collector_ebpf_map_entries{{{SEL_NODE}}})"), "{{map}}"),
            panel("Console bytes dropped (10m)", "timeseries", "bytes", "Guest console bytes given up, by where (kernel, queue, sink), over 10 minutes.")
                .q(
                    format!("sum by (node, where) (increase(compute_instance_console_dropped_bytes_total{{{SEL_NODE}}}[10m]))"),
                    "{{where}}",
                )
                .alert("ComputeConsoleBytesDropped"),
            panel("Console throughput", "timeseries", "Bps", "Bytes the node's VMMs write to their consoles, by stream.")
                .q(
                    format!("sum by (stream) (rate(compute_instance_console_bytes_total{{{SEL_NODE}}}[$__rate_interval]))"),
                    "{{stream}}",
                ),
            panel("Pipelines up", "timeseries", "bool_yes_no", "Each output pipeline of the collector: 1 up, 0 down.")
                .q(format!("max by (node, pipeline) (collector_pipeline_up{{{SEL_NODE}}})"), "{{pipeline}}")
                .alert("ComputeCollectorPipelineDown"),
            panel("Kernel program CPU", "timeseries", "suffix: CPU", "CPU the collector's eBPF programs use, by program, while the kernel's BPF statistics time them (kernel.program_stats). Warning above 0.1 CPU over 30m for 15m.")
                .q(
                    format!("sum by (program) (rate(collector_ebpf_program_run_seconds_total{{{SEL_NODE}}}[30m])) / on () group_left () (sum (rate(collector_ebpf_program_stats_seconds_total{{{SEL_NODE}}}[30m])) > 0)"),
                    "{{program}}",
                )
                .alert("ComputeCollectorProbeCpuHigh"),
            panel("Kernel program cost per run", "timeseries", "s", "Mean time of one run of each program while the kernel's BPF statistics time them (kernel.program_stats; about 80 ns of it is the statistics' own timing).")
                .q(
                    format!(
                        "sum by (program) (rate(collector_ebpf_program_run_seconds_total{{{SEL_NODE}}}[$__rate_interval])) / sum by (program) (rate(collector_ebpf_program_runs_total{{{SEL_NODE}}}[$__rate_interval]))"
                    ),
                    "{{program}}",
                ),
            panel("Lifecycle events", "timeseries", "cps", "Lifecycle events a second on the node, by event.")
                .q(format!("sum by (event) (rate({}[$__rate_interval]))", events("")), "{{event}}"),
            panel("OOM kills (10m)", "timeseries", "short", "Instances the OOM killer chose on the node, over 10 minutes.")
                .q(format!("sum by (node, hypervisor) (increase({}[10m]))", events(r#", event="oom_kill""#)), "{{hypervisor}}")
                .alert("ComputeInstanceOOMKilled"),
            panel("Failures vs starts (15m)", "timeseries", "short", "Crashes and OOM kills against starts over 15 minutes: failures at least half the starts (and 3 or more) is a crash loop.")
                .q(format!("sum by (node, hypervisor) (increase({}[15m]))", events(r#", event=~"crash|oom_kill""#)), "failed {{hypervisor}}")
                .q(format!("sum by (node, hypervisor) (increase({}[15m]))", events(r#", event="start""#)), "started {{hypervisor}}")
                .alert("ComputeInstancesFailingAfterStart"),
            panel("vCPU steal by instance", "timeseries", "percentunit", "Share of each vCPU's time spent waiting for a host CPU, per instance. Warning above 10% for 10m.")
                .q(format!("instance:compute_instance_vcpu_steal:ratio_rate5m{{{SEL_NODE}}}"), "{{instance_uuid}}")
                .alert("ComputeInstanceVcpuStealHigh")
                .drill("instance"),
            panel("vCPU run-queue latency", "heatmap", "s", "How long the node's vCPU threads waited in a host run queue, per wait (log2 buckets from 1 us).")
                .q(
                    format!(r#"sum by (le) (rate(compute_instance_runqueue_latency_seconds_bucket{{{SEL_NODE}, thread="vcpu"}}[$__rate_interval]))"#),
                    "{{le}}",
                ),
            panel("Discovery problems and decode errors (1h)", "timeseries", "short", "Matched processes handled imperfectly, and kernel records userspace could not decode, over an hour.")
                .q(format!("sum by (reason) (increase(collector_discovery_problems_total{{{SEL_NODE}}}[1h]))"), "discovery {{reason}}")
                .q(format!("sum by (reason) (increase(collector_decode_errors_total{{{SEL_NODE}}}[1h]))"), "decode {{reason}}"),
            panel("Instances on the node", "table", "short", "Running instances and their hypervisors.")
                .q(format!(r#"compute_instance_info{{{SEL_NODE}, hypervisor=~"$hypervisor"}}"#), "{{instance_uuid}}")
                .drill("instance"),
        ],
    }
}

fn instance() -> Dashboard {
    let sel = SEL_INSTANCE;
    Dashboard {
        uid: "compute-instance",
        file: "instance",
        title: "Compute / Instance",
        description: "One instance (or a few): allocation, CPU, steal and run-queue latency, memory, console.",
        variables: &["cluster", "node", "hypervisor", "project", "instance"],
        panels: vec![
            panel("Identity", "table", "short", "Whose the instance is (compute_instance_info's labels: project, Instance name and namespace, workload), from its Pod.")
                .q(format!(r#"max by (instance_uuid, project, instance_name, instance_namespace, workload) (compute_instance_info{{{sel}, project=~"$project"}})"#), "{{instance_name}}"),
            panel("Lifecycle events", "timeseries", "short", "The instance's lifecycle events in the window, by event (create, start, stop, crash, oom_kill, terminate).")
                .q(format!("sum by (instance_uuid, event) (increase(compute_instance_events_total{{{sel}}}[$__rate_interval]))"), "{{instance_uuid}} {{event}}"),
            panel("Uptime", "stat", "s", "Seconds since the instance's VMM started.")
                .q(format!("time() - compute_instance_start_time_seconds{{{sel}}}"), "{{instance_uuid}}")
                .w(6),
            panel("vCPUs", "stat", "short", "vCPUs the instance was configured with.")
                .q(format!("compute_instance_vcpus{{{sel}}}"), "{{instance_uuid}}")
                .w(6),
            panel("Memory allocated", "stat", "bytes", "Memory the instance was configured with.")
                .q(format!("compute_instance_memory_allocated_bytes{{{sel}}}"), "{{instance_uuid}}")
                .w(6),
            panel("Resident memory (VmRSS)", "stat", "bytes", "Resident memory of the VMM process: guest memory touched plus the VMM's own (not a cgroup working set).")
                .q(format!("compute_instance_memory_rss_bytes{{{sel}}}"), "{{instance_uuid}}")
                .w(6),
            panel("CPU by thread class", "timeseries", "suffix: CPU", "CPU the instance's threads use: vcpu (the guest) and vmm (the VMM's own threads).")
                .q(
                    format!("sum by (instance_uuid, thread) (rate(compute_instance_cpu_seconds_total{{{sel}}}[$__rate_interval]))"),
                    "{{instance_uuid}} {{thread}}",
                ),
            panel("vCPU steal", "timeseries", "percentunit", "Share of each vCPU's time spent runnable but waiting for a host CPU: the guest's steal time.")
                .q(
                    format!(
                        r#"sum by (node, instance_uuid) (rate(compute_instance_runqueue_latency_seconds_sum{{{sel}, thread="vcpu"}}[$__rate_interval])) / on (node, instance_uuid) max by (node, instance_uuid) (compute_instance_vcpus{{{sel}}})"#
                    ),
                    "{{instance_uuid}}",
                ),
            panel("vCPU run-queue latency", "heatmap", "s", "How long the instance's vCPU threads waited in a host run queue, per wait (log2 buckets from 1 us).")
                .q(
                    format!(r#"sum by (le) (rate(compute_instance_runqueue_latency_seconds_bucket{{{sel}, thread="vcpu"}}[$__rate_interval]))"#),
                    "{{le}}",
                ),
            panel("vCPU run-queue latency p50 and p99", "timeseries", "s", "Median and 99th percentile of the vCPU threads' waits (interpolated within buckets of 4x: 4 µs, 16 µs, ..., 262 ms).")
                .q(
                    format!(r#"histogram_quantile(0.5, sum by (le) (rate(compute_instance_runqueue_latency_seconds_bucket{{{sel}, thread="vcpu"}}[$__rate_interval])))"#),
                    "p50",
                )
                .q(
                    format!(r#"histogram_quantile(0.99, sum by (le) (rate(compute_instance_runqueue_latency_seconds_bucket{{{sel}, thread="vcpu"}}[$__rate_interval])))"#),
                    "p99",
                ),
            panel("Context switches", "timeseries", "cps", "Switches of the instance's threads off a CPU: voluntary (blocked) and involuntary (preempted).")
                .q(
                    format!("sum by (kind) (rate(compute_instance_context_switches_total{{{sel}}}[$__rate_interval]))"),
                    "{{kind}}",
                ),
            panel("Resident memory", "timeseries", "bytes", "VmRSS of the VMM against the memory configured.")
                .q(format!("compute_instance_memory_rss_bytes{{{sel}}}"), "rss {{instance_uuid}}")
                .q(format!("compute_instance_memory_allocated_bytes{{{sel}}}"), "allocated {{instance_uuid}}"),
            panel("Console output", "timeseries", "Bps", "Bytes the VMM writes to the instance's console, by stream.")
                .q(
                    format!("sum by (stream) (rate(compute_instance_console_bytes_total{{{sel}}}[$__rate_interval]))"),
                    "{{stream}}",
                ),
            panel("Console bytes dropped", "timeseries", "Bps", "Console bytes given up, by where.")
                .q(
                    format!("sum by (where) (rate(compute_instance_console_dropped_bytes_total{{{sel}}}[$__rate_interval]))"),
                    "{{where}}",
                ),
            panel("Usage as the fleet records it", "timeseries", "suffix: CPU", "datum_compute_instance_cpu_usage_seconds_total (the fleet's series, with its labels) as a rate.")
                .q(
                    format!("sum by (resource_namespace, resource_name) (rate(datum_compute_instance_cpu_usage_seconds_total{{{sel}}}[$__rate_interval]))"),
                    "{{resource_namespace}}/{{resource_name}}",
                ),
        ],
    }
}

/// The three dashboards, in order fleet -> node -> instance.
fn dashboards() -> Vec<Dashboard> {
    vec![fleet(), node(), instance()]
}

pub(super) fn files() -> anyhow::Result<Vec<(PathBuf, String)>> {
    let mut files = Vec::new();
    for d in dashboards() {
        let json = serde_json::to_string_pretty(&render(&d))? + "\n";
        let mut configmap = format!(
            "# Generated by `cargo xtask gen` (xtask/src/generate/dashboards.rs): edit that, not this.\n\
             apiVersion: v1\n\
             kind: ConfigMap\n\
             metadata:\n  \
               name: compute-dashboard-{file}\n  \
               namespace: compute-telemetry\n  \
               labels:\n    \
                 app.kubernetes.io/name: compute-collector\n    \
                 app.kubernetes.io/part-of: compute-telemetry\n    \
                 grafana_dashboard: \"1\"\n  \
               annotations:\n    \
                 grafana_folder: Compute\n\
             data:\n  \
               compute-{file}.json: |\n",
            file = d.file
        );
        for line in json.lines() {
            configmap.push_str("    ");
            configmap.push_str(line);
            configmap.push('\n');
        }
        files.push((
            PathBuf::from(format!("deploy/dashboards/compute-{}.json", d.file)),
            json,
        ));
        files.push((
            PathBuf::from(format!("deploy/base/dashboard-{}.yaml", d.file)),
            configmap,
        ));
    }
    Ok(files)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_panel_has_a_unit_a_query_and_a_unique_id() {
        for d in dashboards() {
            let v = render(&d);
            let panels = v["panels"].as_array().unwrap();
            let mut ids: Vec<u64> = panels.iter().map(|p| p["id"].as_u64().unwrap()).collect();
            ids.dedup();
            assert_eq!(ids.len(), panels.len(), "{}", d.uid);
            for p in panels {
                let unit = p["fieldConfig"]["defaults"]["unit"].as_str().unwrap();
                assert!(!unit.is_empty(), "{}: {}", d.uid, p["title"]);
                assert!(
                    !p["targets"].as_array().unwrap().is_empty(),
                    "{}",
                    p["title"]
                );
            }
        }
    }

    #[test]
    fn layout_stays_within_the_grid() {
        for d in dashboards() {
            for p in render(&d)["panels"].as_array().unwrap() {
                let pos = &p["gridPos"];
                assert!(pos["x"].as_u64().unwrap() + pos["w"].as_u64().unwrap() <= 24);
            }
        }
    }
}
