//! From a line of an instance's files to an OTLP log record, and from an instance's identity to
//! its OTLP Resource. docs/export.md has the table; the names here are the table's.
//!
//! Record attributes override resource attributes downstream (the query labels merge both), so
//! nothing taken from the guest (only the body is) goes under an attribute name, and the
//! collector's own attributes are under `log.*`, `event.name` and `compute.*`, never a resource
//! attribute's name.

use std::time::{SystemTime, UNIX_EPOCH};

use opentelemetry_proto::tonic::{
    common::v1::{AnyValue, KeyValue, any_value},
    logs::v1::LogRecord as OtlpRecord,
    resource::v1::Resource,
};
use serde::Deserialize;

use crate::model::{identity::Identity, time};

/// What a record was read from (the `signal` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub(crate) enum Signal {
    /// `console.log`: console records.
    Console,
    /// `events.log`: lifecycle events.
    Event,
}

impl Signal {
    pub(crate) const ALL: [Self; 2] = [Self::Console, Self::Event];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Console => "console",
            Self::Event => "event",
        }
    }

    pub(crate) fn index(self) -> usize {
        self as usize
    }

    /// The file the signal is read from (and its rotations `.1` ... `.N`): the names the
    /// console-log and events sinks write (docs/console.md, docs/lifecycle.md; a sink does not
    /// import its siblings, and the integration tests read both through this exporter).
    pub(crate) fn base(self) -> &'static str {
        match self {
            Self::Console => "console.log",
            Self::Event => "events.log",
        }
    }
}

/// A console line as the files hold it (docs/console.md); unknown fields are ignored, so a
/// newer writer's additions do not stop the exporter.
#[derive(Debug, Deserialize)]
#[allow(
    clippy::struct_excessive_bools,
    reason = "the NDJSON flags, as the files hold them"
)]
struct ConsoleLine {
    ts: String,
    instance_uuid: String,
    stream: String,
    message: String,
    seq: u64,
    #[serde(default)]
    invalid_utf8: bool,
    #[serde(default)]
    split: bool,
    #[serde(default)]
    partial: bool,
    #[serde(default)]
    cut_bytes: Option<u64>,
    #[serde(default)]
    gap: bool,
    #[serde(default)]
    gap_reason: Option<String>,
    #[serde(default)]
    dropped_bytes: Option<u64>,
    #[serde(default)]
    gap_since: Option<String>,
    #[serde(default)]
    identity: Option<Identity>,
}

/// An events-file line (docs/lifecycle.md#record).
#[derive(Debug, Deserialize)]
struct EventLine {
    seq: u64,
    ts: String,
    instance_uuid: String,
    #[serde(default)]
    hypervisor: Option<String>,
    event: String,
    #[serde(default)]
    reason: Option<String>,
    #[serde(default)]
    pid: Option<u32>,
    #[serde(default)]
    exit_code: Option<i64>,
    #[serde(default)]
    signal: Option<i64>,
    #[serde(default)]
    signal_name: Option<String>,
    #[serde(default)]
    core_dumped: bool,
    #[serde(default)]
    uptime_seconds: Option<f64>,
    #[serde(default)]
    oom: Option<serde_json::Map<String, serde_json::Value>>,
    #[serde(default)]
    identity: Option<Identity>,
}

/// A line made into a record, before it is sent: the instance and identity it carries, the
/// record without its observed time (set when sent).
#[derive(Debug)]
pub(crate) struct Mapped {
    pub(crate) instance_uuid: String,
    pub(crate) identity: Option<Identity>,
    pub(crate) record: OtlpRecord,
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum MapError {
    #[error("not a record: {0}")]
    Json(#[from] serde_json::Error),
    #[error("bad timestamp {0:?}")]
    Time(String),
    #[error("unknown stream {0:?}")]
    Stream(String),
}

fn nanos(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

fn parse_ts(ts: &str) -> Result<u64, MapError> {
    time::parse_rfc3339(ts)
        .map(nanos)
        .ok_or_else(|| MapError::Time(ts.to_owned()))
}

fn string(key: &str, value: impl Into<String>) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::StringValue(value.into())),
        }),
        ..KeyValue::default()
    }
}

fn int(key: &str, value: i64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::IntValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn boolean(key: &str, value: bool) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::BoolValue(value)),
        }),
        ..KeyValue::default()
    }
}

fn double(key: &str, value: f64) -> KeyValue {
    KeyValue {
        key: key.to_owned(),
        value: Some(AnyValue {
            value: Some(any_value::Value::DoubleValue(value)),
        }),
        ..KeyValue::default()
    }
}

/// `log.record.uid`: 32 hex digits of SHA-256 over the instance, the stream, the record's
/// capture time and its `seq`. The same record read again (after a restart, a retry) has the
/// same uid; `seq` alone is not enough, since a stream's numbering starts again at 1 once an
/// instance's retention ran out — the capture time tells those epochs apart.
pub(crate) fn record_uid(instance: &str, stream: &str, ts_nanos: u64, seq: u64) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    for part in [instance.as_bytes(), b"\0", stream.as_bytes(), b"\0"] {
        ctx.update(part);
    }
    ctx.update(&ts_nanos.to_be_bytes());
    ctx.update(&seq.to_be_bytes());
    let digest = ctx.finish();
    let mut out = String::with_capacity(32);
    for b in &digest.as_ref()[..16] {
        out.push_str(&format!("{b:02x}"));
    }
    out
}

/// A console-file line as an OTLP record.
pub(crate) fn console(line: &[u8]) -> Result<Mapped, MapError> {
    let l: ConsoleLine = serde_json::from_slice(line)?;
    if !["stdout", "stderr", "console"].contains(&l.stream.as_str()) {
        return Err(MapError::Stream(l.stream));
    }
    let ts = parse_ts(&l.ts)?;
    let mut attributes = vec![
        string("log.iostream", l.stream.as_str()),
        string(
            "log.record.uid",
            record_uid(&l.instance_uuid, &l.stream, ts, l.seq),
        ),
        int(
            "compute.console.seq",
            i64::try_from(l.seq).unwrap_or(i64::MAX),
        ),
    ];
    if l.split {
        attributes.push(boolean("compute.console.split", true));
    }
    if l.partial {
        attributes.push(boolean("compute.console.partial", true));
    }
    if l.invalid_utf8 {
        attributes.push(boolean("compute.console.invalid_utf8", true));
    }
    if let Some(n) = l.cut_bytes {
        attributes.push(int(
            "compute.console.cut_bytes",
            i64::try_from(n).unwrap_or(i64::MAX),
        ));
    }
    if l.gap {
        attributes.push(boolean("compute.console.gap", true));
        if let Some(reason) = l.gap_reason {
            attributes.push(string("compute.console.gap_reason", reason));
        }
        if let Some(n) = l.dropped_bytes {
            attributes.push(int(
                "compute.console.gap_dropped_bytes",
                i64::try_from(n).unwrap_or(i64::MAX),
            ));
        }
        if let Some(since) = l.gap_since {
            // RFC 3339, as in the file (the node collector's filelog passes it on as is).
            attributes.push(string("compute.console.gap_since", since));
        }
    }
    Ok(Mapped {
        instance_uuid: l.instance_uuid,
        identity: l.identity,
        record: OtlpRecord {
            time_unix_nano: ts,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(l.message)),
            }),
            attributes,
            ..OtlpRecord::default()
        },
    })
}

/// An events-file line as an OTLP record (an event: `event.name` set).
pub(crate) fn event(line: &[u8]) -> Result<Mapped, MapError> {
    let l: EventLine = serde_json::from_slice(line)?;
    let ts = parse_ts(&l.ts)?;
    let name = format!("compute.instance.{}", l.event);
    let mut attributes = vec![
        string("event.name", name.clone()),
        string(
            "log.record.uid",
            record_uid(&l.instance_uuid, "event", ts, l.seq),
        ),
        int(
            "compute.instance.event.seq",
            i64::try_from(l.seq).unwrap_or(i64::MAX),
        ),
    ];
    if let Some(reason) = &l.reason {
        attributes.push(string("compute.instance.event.reason", reason.as_str()));
    }
    if let Some(h) = &l.hypervisor {
        attributes.push(string("compute.instance.hypervisor", h.as_str()));
    }
    if let Some(pid) = l.pid {
        attributes.push(int("compute.instance.pid", i64::from(pid)));
    }
    if let Some(code) = l.exit_code {
        attributes.push(int("compute.instance.exit_code", code));
    }
    if let Some(signal) = l.signal {
        attributes.push(int("compute.instance.signal", signal));
    }
    if let Some(name) = &l.signal_name {
        attributes.push(string("compute.instance.signal_name", name.as_str()));
    }
    if l.core_dumped {
        attributes.push(boolean("compute.instance.core_dumped", true));
    }
    if let Some(up) = l.uptime_seconds {
        attributes.push(double("compute.instance.uptime_seconds", up));
    }
    for (key, value) in l.oom.iter().flatten() {
        let key = format!("compute.instance.oom.{key}");
        match value {
            serde_json::Value::String(s) => attributes.push(string(&key, s.as_str())),
            serde_json::Value::Bool(b) => attributes.push(boolean(&key, *b)),
            serde_json::Value::Number(n) => match n.as_i64() {
                Some(i) => attributes.push(int(&key, i)),
                None => attributes.push(double(&key, n.as_f64().unwrap_or_default())),
            },
            _ => {}
        }
    }
    let body = match &l.reason {
        Some(reason) => format!("{} ({reason})", l.event),
        None => l.event.clone(),
    };
    Ok(Mapped {
        instance_uuid: l.instance_uuid,
        identity: l.identity,
        record: OtlpRecord {
            time_unix_nano: ts,
            event_name: name,
            body: Some(AnyValue {
                value: Some(any_value::Value::StringValue(body)),
            }),
            attributes,
            ..OtlpRecord::default()
        },
    })
}

/// Whether `identity` names the tenant: project, instance name and namespace (the fleet's
/// filter drops a record that lacks any of them).
pub(crate) fn is_complete(identity: &Identity) -> bool {
    [
        &identity.project,
        &identity.instance_name,
        &identity.instance_namespace,
    ]
    .iter()
    .all(|f| f.as_deref().is_some_and(|s| !s.is_empty()))
}

/// The Resource of one instance: the fleet's attributes (those known), `k8s.node.name` from the
/// identity, else `node` (the collector's own).
pub(crate) fn resource(uuid: &str, identity: Option<&Identity>, node: Option<&str>) -> Resource {
    let mut attributes = vec![string("ukp.instance.uuid", uuid)];
    if let Some(id) = identity {
        if let Some(project) = &id.project {
            attributes.push(string("datum.project.name", project.as_str()));
            attributes.push(string("project_name", project.as_str()));
        }
        if let Some(name) = &id.instance_name {
            attributes.push(string("datum.instance.name", name.as_str()));
        }
        if let Some(ns) = &id.instance_namespace {
            attributes.push(string("datum.instance.namespace", ns.as_str()));
        }
        if let Some(workload) = &id.workload {
            attributes.push(string("datum.workload.name", workload.as_str()));
        }
        attributes.push(string("k8s.pod.name", id.pod.as_str()));
        attributes.push(string("k8s.namespace.name", id.pod_namespace.as_str()));
    }
    let node = identity
        .map(|i| i.node.as_str())
        .filter(|n| !n.is_empty())
        .or(node);
    if let Some(node) = node {
        attributes.push(string("k8s.node.name", node));
    }
    Resource {
        attributes,
        ..Resource::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn attr<'a>(record: &'a OtlpRecord, key: &str) -> Option<&'a any_value::Value> {
        record
            .attributes
            .iter()
            .find(|kv| kv.key == key)
            .and_then(|kv| kv.value.as_ref()?.value.as_ref())
    }

    #[test]
    fn console_line_maps_with_flags_and_a_stable_uid() {
        let line = br#"{"ts":"2026-11-28T05:50:42.260170791Z","instance_uuid":"i-1","stream":"console","message":"hi","seq":3,"partial":true,"identity":{"project":"p","instance_name":"web-0","instance_namespace":"default","pod":"web-0-x","pod_namespace":"ns-1","node":"n1"}}"#;
        let m = console(line).unwrap();
        assert_eq!(m.instance_uuid, "i-1");
        assert!(is_complete(m.identity.as_ref().unwrap()));
        assert_eq!(m.record.time_unix_nano, 1_795_845_042_260_170_791);
        assert_eq!(
            attr(&m.record, "log.iostream"),
            Some(&any_value::Value::StringValue("console".into()))
        );
        assert_eq!(
            attr(&m.record, "compute.console.partial"),
            Some(&any_value::Value::BoolValue(true))
        );
        assert!(attr(&m.record, "compute.console.split").is_none());
        let again = console(line).unwrap();
        assert_eq!(
            attr(&m.record, "log.record.uid"),
            attr(&again.record, "log.record.uid")
        );
        let other = console(
            &String::from_utf8_lossy(line)
                .replace("\"seq\":3", "\"seq\":4")
                .into_bytes(),
        )
        .unwrap();
        assert_ne!(
            attr(&m.record, "log.record.uid"),
            attr(&other.record, "log.record.uid")
        );
    }

    #[test]
    fn event_line_maps_to_an_event() {
        let line = br#"{"seq":7,"ts":"2026-11-28T05:58:26.399591212Z","instance_uuid":"abrt","hypervisor":"firecracker","event":"oom_kill","reason":"oom_killer","pid":24351,"exit_code":null,"signal":9,"signal_name":"SIGKILL","core_dumped":false,"uptime_seconds":0.1,"oom":{"victim_pid":24351,"constraint":"memcg","memcg_limit_bytes":1048576},"identity":null}"#;
        let m = event(line).unwrap();
        assert_eq!(m.record.event_name, "compute.instance.oom_kill");
        assert_eq!(
            attr(&m.record, "compute.instance.oom.constraint"),
            Some(&any_value::Value::StringValue("memcg".into()))
        );
        assert_eq!(
            attr(&m.record, "compute.instance.signal"),
            Some(&any_value::Value::IntValue(9))
        );
        assert!(attr(&m.record, "compute.instance.exit_code").is_none());
        assert!(m.identity.is_none());
    }

    #[test]
    fn no_record_attribute_takes_a_resource_name() {
        let id = Identity {
            project: Some("p".into()),
            instance_name: Some("n".into()),
            instance_namespace: Some("ns".into()),
            workload: Some("w".into()),
            pod: "pod".into(),
            pod_namespace: "ns-1".into(),
            node: "node".into(),
        };
        let resource = resource("u", Some(&id), None);
        let names: Vec<&str> = resource
            .attributes
            .iter()
            .map(|kv| kv.key.as_str())
            .collect();
        for key in [
            "ukp.instance.uuid",
            "datum.project.name",
            "project_name",
            "datum.instance.name",
            "datum.instance.namespace",
            "datum.workload.name",
            "k8s.node.name",
        ] {
            assert!(names.contains(&key), "{key} missing: {names:?}");
        }
        let c = console(br#"{"ts":"2026-11-28T05:50:42Z","instance_uuid":"u","stream":"stdout","message":"x","seq":1,"split":true,"invalid_utf8":true,"gap":true,"gap_reason":"kernel_ring","dropped_bytes":5,"gap_since":"2026-11-28T05:50:41Z","cut_bytes":2}"#).unwrap();
        let e = event(br#"{"seq":1,"ts":"2026-11-28T05:50:42Z","instance_uuid":"u","event":"crash","reason":"exit_code","exit_code":1,"oom":{"victim_pid":1}}"#).unwrap();
        for kv in c.record.attributes.iter().chain(&e.record.attributes) {
            assert!(
                !names.contains(&kv.key.as_str()),
                "{} is a resource name",
                kv.key
            );
        }
    }

    #[test]
    fn bad_lines_are_errors() {
        assert!(console(b"{}").is_err());
        assert!(
            console(br#"{"ts":"x","instance_uuid":"u","stream":"stdout","message":"","seq":1}"#)
                .is_err()
        );
        assert!(console(br#"{"ts":"2026-11-28T05:50:42Z","instance_uuid":"u","stream":"tty","message":"","seq":1}"#).is_err());
        assert!(event(b"not json").is_err());
    }
}
