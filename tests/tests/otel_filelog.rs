//! The node collector's component for the collector's files (deploy/otel/compute-collector.yaml),
//! checked without the OpenTelemetry Collector binary (not packaged): against the files a real
//! collector writes (stand-in VMMs, small files so they rotate) and the records its own OTLP
//! exporter sends for the same lines.
//!
//! Checked: the include globs match every console and events file, rotated ones included, and
//! nothing else in the log folder; each file's first 1 KiB (the fingerprint) is unique; every
//! field of every real line is consumed by an operator (nothing leaks under a raw name); the
//! attribute names the operators produce are the exporter's (resource names the issue's); no
//! record attribute takes a resource attribute's name. Not checked (needs the binary): that
//! the stanza operators, expressions and the filter behave as read here, and the receivers'
//! own rotation handling.

use std::{
    collections::BTreeSet,
    path::{Path, PathBuf},
    time::Duration,
};

use collector_tests::{
    Collector, Standin, new_uuid, otlp_receiver::OtlpReceiver, servers::workspace_root, wait_for,
};
use serde_json::Value;

/// Where the manifest mounts the log folder (deploy/base/daemonset.yaml).
const LOG_DIR: &str = "/var/log/compute-collector";

/// The resource attributes of the issue (and the Pod's name and namespace).
const RESOURCE: [&str; 9] = [
    "ukp.instance.uuid",
    "datum.project.name",
    "project_name",
    "datum.instance.name",
    "datum.instance.namespace",
    "datum.workload.name",
    "k8s.node.name",
    "k8s.pod.name",
    "k8s.namespace.name",
];

fn component() -> Value {
    let path = workspace_root().join("deploy/otel/compute-collector.yaml");
    let text = std::fs::read_to_string(&path).expect("deploy/otel/compute-collector.yaml");
    serde_norway::from_str(&text).expect("valid YAML")
}

fn receiver<'a>(component: &'a Value, name: &str) -> &'a Value {
    &component["receivers"][name]
}

/// A field as (`attributes`|`resource`|`body`, key).
type Field = (String, String);

/// `attributes["x.y"]` / `resource["x.y"]` / `attributes.x` as a [`Field`].
fn field(text: &str) -> Field {
    if let Some((scope, rest)) = text.split_once("[\"") {
        return (scope.to_owned(), rest.trim_end_matches("\"]").to_owned());
    }
    match text.split_once('.') {
        Some((scope, key)) => (scope.to_owned(), key.to_owned()),
        None => (text.to_owned(), String::new()),
    }
}

/// The fields the operators read (`from`, a remove's `field`) and write (`to`, an add's
/// `field`).
fn operator_fields(receiver: &Value) -> (Vec<Field>, Vec<Field>) {
    let mut read = Vec::new();
    let mut written = Vec::new();
    for op in receiver["operators"].as_array().expect("operators") {
        let kind = op["type"].as_str().unwrap();
        if let Some(from) = op["from"].as_str() {
            read.push(field(from));
        }
        if let Some(to) = op["to"].as_str() {
            written.push(field(to));
        }
        if let Some(f) = op["field"].as_str() {
            match kind {
                "remove" => read.push(field(f)),
                "add" => written.push(field(f)),
                other => panic!("operator {other} with a field"),
            }
        }
    }
    (read, written)
}

fn patterns(receiver: &Value, log_dir: &Path) -> Vec<glob::Pattern> {
    receiver["include"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| {
            let p = p.as_str().unwrap();
            assert!(
                p.starts_with(LOG_DIR),
                "{p} is outside the manifest's log folder"
            );
            let local = p.replacen(LOG_DIR, log_dir.to_str().unwrap(), 1);
            glob::Pattern::new(&local).unwrap()
        })
        .collect()
}

fn matches(patterns: &[glob::Pattern], path: &Path) -> bool {
    // Go's filepath.Match, which filelog uses: `*` never crosses a `/`.
    let options = glob::MatchOptions {
        require_literal_separator: true,
        ..glob::MatchOptions::default()
    };
    patterns.iter().any(|p| p.matches_path_with(path, options))
}

/// Every file below `dir`, two levels deep (the log folder's layout).
fn files(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir).unwrap().flatten() {
        let path = entry.path();
        if path.is_dir() {
            for inner in std::fs::read_dir(&path).unwrap().flatten() {
                out.push(inner.path());
            }
        } else {
            out.push(path);
        }
    }
    out.sort();
    out
}

#[test]
fn the_filelog_component_fits_the_real_files_and_the_exporters_names() {
    let component = component();
    let console = receiver(&component, "filelog/compute-console");
    let events = receiver(&component, "filelog/compute-events");
    assert_eq!(console["fingerprint_size"], "1kb");
    let pipeline = &component["service"]["pipelines"]["logs/compute-collector"];
    assert_eq!(
        pipeline["receivers"],
        serde_json::json!(["filelog/compute-console", "filelog/compute-events"])
    );

    // A real collector writing small console files (they rotate), exporting the same lines.
    let otlp = OtlpReceiver::http();
    let tag = "ofilelog";
    let log_dir = tempfile::tempdir().unwrap();
    let config = log_dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            r#"
disable_builtin_matchers = ["firecracker", "qemu", "cloud-hypervisor"]
[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
[console]
file_max_bytes = 4096
file_rotations = 2
[console.files]
[export.otlp]
endpoint = "{}"
batch_timeout_ms = 50
poll_ms = 50
"#,
            otlp.endpoint()
        ),
    )
    .unwrap();
    let collector = Collector::start_in(
        log_dir,
        &["--config", config.to_str().unwrap(), "--node-name", "n1"],
    );
    let uuid = new_uuid("filelog");
    let n = 60;
    let mut vmm = Standin::spawn(
        &format!("{tag}-vmm"),
        &["--id", &uuid],
        &[("STANDIN_LINES", &n.to_string()), ("STANDIN_RUN_MS", "300")],
    );
    vmm.wait();
    // The exporter read what is left in the files (the rotation cap dropped the oldest).
    let sent = wait_for(Duration::from_secs(20), || {
        let records = otlp.records();
        let events = records.iter().filter(|r| !r.event_name.is_empty()).count();
        (events >= 2 && records.len() > events + 10).then_some(records)
    })
    .unwrap_or_else(|| panic!("nothing exported:\n{}", collector.stderr()));
    let dir = collector.log_dir.path();
    let all = files(dir);

    // The globs: every console and events file, rotated included; nothing else.
    let (console_globs, events_globs) = (patterns(console, dir), patterns(events, dir));
    let rotated = all
        .iter()
        .filter(|p| p.to_string_lossy().ends_with("console.log.1"))
        .count();
    assert!(rotated > 0, "no rotated file to check: {all:?}");
    for path in &all {
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        let is_console = name == "console.log" || name.starts_with("console.log.");
        let is_events = name == "events.log" || name.starts_with("events.log.");
        assert_eq!(
            matches(&console_globs, path),
            is_console,
            "{}",
            path.display()
        );
        assert_eq!(
            matches(&events_globs, path),
            is_events,
            "{}",
            path.display()
        );
    }
    // Rotated events files by name (the test writes too few events to rotate them).
    let events_rotated = dir.join(&uuid).join("events.log.2");
    assert!(matches(&events_globs, &events_rotated));
    assert!(!matches(
        &console_globs,
        &dir.join(&uuid).join("console.log.tmp")
    ));

    // Fingerprints: each file's first 1 KiB is its own.
    let mut heads = BTreeSet::new();
    for path in all
        .iter()
        .filter(|p| matches(&console_globs, p) || matches(&events_globs, p))
    {
        let bytes = std::fs::read(path).unwrap();
        assert!(
            bytes.ends_with(b"\n"),
            "{}: whole lines only",
            path.display()
        );
        let head = bytes[..bytes.len().min(1024)].to_vec();
        assert!(
            heads.insert(head),
            "{}: first KiB not unique",
            path.display()
        );
    }

    // Every field of every real line is consumed by an operator of its receiver.
    for (globs, receiver) in [(&console_globs, console), (&events_globs, events)] {
        let (read, _) = operator_fields(receiver);
        let consumed: BTreeSet<String> = read
            .iter()
            .filter(|(scope, _)| scope == "attributes")
            .map(|(_, key)| key.split(['.', '?']).next().unwrap().to_owned())
            .collect();
        for path in all.iter().filter(|p| matches(globs, p)) {
            for line in std::fs::read_to_string(path).unwrap().lines() {
                let value: Value = serde_json::from_str(line).expect("a JSON line");
                for key in value.as_object().unwrap().keys() {
                    assert!(
                        consumed.contains(key),
                        "{}: field {key} is left to leak as an attribute",
                        path.display()
                    );
                }
            }
        }
    }

    // Names: the operators write the exporter's names.
    let resource: BTreeSet<&str> = RESOURCE.into_iter().collect();
    let mut written_record = BTreeSet::new();
    for receiver in [console, events] {
        for (scope, key) in operator_fields(receiver).1 {
            match scope.as_str() {
                "resource" => assert!(resource.contains(key.as_str()), "resource {key}"),
                "attributes" => {
                    assert!(!resource.contains(key.as_str()), "{key} is a resource name");
                    written_record.insert(key);
                }
                "body" => {}
                other => panic!("writes to {other}"),
            }
        }
    }
    for record in &sent {
        for key in record.resource.keys() {
            assert!(resource.contains(key.as_str()), "exporter resource {key}");
        }
        for key in record.attributes.keys() {
            // The uid is the exporter's own (SHA-256): the filelog path has (uuid, stream,
            // seq, time) for that.
            if key != "log.record.uid" {
                assert!(
                    written_record.contains(key),
                    "the component never writes {key}"
                );
            }
        }
    }
}
