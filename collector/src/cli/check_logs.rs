//! `collector check-logs`: JSON log lines checked against the compute logging convention
//! (docs/conventions/logging.md), for the compute controllers' CI and the collector's own
//! `--log-format json` output.
//!
//! Self-contained on purpose (std and serde_json only): [`check`] reads lines and returns every
//! violation with its 1-based line number. Blank lines are ignored.

use std::{fmt, io::BufRead};

use serde_json::{Map, Value};

/// One breach of the convention on one line.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) struct Violation {
    /// 1-based line number.
    pub line: usize,
    /// The key concerned, when there is one.
    pub key: Option<String>,
    pub problem: String,
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.key {
            Some(key) => write!(f, "line {}: {key}: {}", self.line, self.problem),
            None => write!(f, "line {}: {}", self.line, self.problem),
        }
    }
}

/// Levels a production log line may have (zap's CapitalLevelEncoder, tracing's names).
const LEVELS: &[&str] = &["DEBUG", "INFO", "WARN", "ERROR"];

/// Keys controller-runtime adds itself, in its own (camelCase) spelling.
const CONTROLLER_RUNTIME_KEYS: &[&str] = &["controllerKind", "controllerGroup", "reconcileID"];

/// Keys of other spellings of a dictionary key, and the key to use instead.
const SYNONYMS: &[(&str, &str)] = &[
    ("ts", "timestamp"),
    ("time", "timestamp"),
    ("msg", "message"),
    ("severity", "level"),
    ("lvl", "level"),
    ("err", "error"),
    ("instanceUUID", "instance_uuid"),
    ("instanceUuid", "instance_uuid"),
    ("instance_id", "instance_uuid"),
    ("instanceID", "instance_uuid"),
    ("uuid", "instance_uuid"),
    ("vm", "instance_uuid"),
    ("projectName", "project"),
    ("project_name", "project"),
    ("instanceName", "instance_name"),
    ("instanceNamespace", "instance_namespace"),
    ("workloadName", "workload"),
    ("nodeName", "node"),
    ("node_name", "node"),
];

/// Parts of a key that mark a secret: such a key is never logged.
const SECRET_WORDS: &[&str] = &[
    "secret",
    "token",
    "password",
    "passwd",
    "authorization",
    "cookie",
    "credential",
    "credentials",
    "apikey",
];

/// Parts of a key that mark guest console content: never logged (it is the customer's data,
/// served per project through the logs pipeline).
const CONSOLE_WORDS: &[&str] = &["console", "serial", "stdout", "stderr"];

/// Longest message accepted: a sentence, not a dump.
const MAX_MESSAGE_CHARS: usize = 200;

/// Checks every line `reader` yields; see the module documentation.
pub(super) fn check(reader: impl BufRead) -> Vec<Violation> {
    let mut violations = Vec::new();
    for (index, line) in reader.lines().enumerate() {
        let number = index + 1;
        let mut report = |key: Option<&str>, problem: String| {
            violations.push(Violation {
                line: number,
                key: key.map(str::to_owned),
                problem,
            });
        };
        let line = match line {
            Ok(line) => line,
            Err(err) => {
                report(None, format!("unreadable line: {err}"));
                continue;
            }
        };
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Value>(&line) {
            Ok(Value::Object(record)) => check_record(&record, &mut report),
            Ok(_) | Err(_) => report(
                None,
                "not a JSON object (zap's development console encoder? set Development=false and the JSON encoder)".into(),
            ),
        }
    }
    violations
}

fn check_record(record: &Map<String, Value>, report: &mut impl FnMut(Option<&str>, String)) {
    match record.get("timestamp") {
        None => report(Some("timestamp"), "missing".into()),
        Some(Value::String(ts)) if is_rfc3339_utc(ts) => {}
        Some(other) => report(
            Some("timestamp"),
            format!("not an RFC 3339 UTC time (2006-01-02T15:04:05.000Z): {other}"),
        ),
    }
    let level = record.get("level").and_then(Value::as_str);
    match (record.get("level"), level) {
        (None, _) => report(Some("level"), "missing".into()),
        (_, Some(l)) if LEVELS.contains(&l) => {}
        (Some(other), _) => report(
            Some("level"),
            format!("{other} is not one of {}", LEVELS.join(", ")),
        ),
    }
    match record.get("message") {
        None => report(Some("message"), "missing".into()),
        Some(Value::String(m)) => check_message(m, report),
        Some(other) => report(Some("message"), format!("not a string: {other}")),
    }
    if level == Some("ERROR") && !record.contains_key("error") {
        report(Some("error"), "an ERROR line carries the error".into());
    }
    if record.contains_key("stacktrace") && level != Some("ERROR") {
        report(
            Some("stacktrace"),
            "stack trace below ERROR: zap's development mode (set Development=false)".into(),
        );
    }
    for (key, value) in record {
        check_key(key, value, report);
    }
}

fn check_message(message: &str, report: &mut impl FnMut(Option<&str>, String)) {
    let key = Some("message");
    if message.trim().is_empty() {
        report(key, "empty".into());
        return;
    }
    if message.contains('\n') {
        report(key, "more than one line".into());
    }
    if message.chars().count() > MAX_MESSAGE_CHARS {
        report(key, format!("longer than {MAX_MESSAGE_CHARS} characters"));
    }
    let mut chars = message.chars();
    let first = chars.next().unwrap_or(' ');
    let second = chars.next().unwrap_or(' ');
    // "Reconciling instance" is out, "OOM kill seen" (an acronym) is in.
    if first.is_uppercase() && !(second.is_uppercase() || second.is_ascii_digit()) {
        report(
            key,
            "starts with a capital letter: lower-case, like a log line, not a sentence".into(),
        );
    }
    if message.ends_with(['.', '!']) {
        report(key, "ends with punctuation".into());
    }
    if message.contains("%!") {
        report(
            key,
            "holds a Go formatting error (%!): values go into keys".into(),
        );
    }
    if message.split_whitespace().any(|word| {
        word.split_once('=')
            .is_some_and(|(k, v)| is_snake(k) && !v.is_empty())
    }) {
        report(
            key,
            "holds key=value pairs: values go into keys of their own".into(),
        );
    }
}

fn check_key(key: &str, value: &Value, report: &mut impl FnMut(Option<&str>, String)) {
    let k = Some(key);
    if let Some((_, instead)) = SYNONYMS.iter().find(|(s, _)| *s == key) {
        report(k, format!("use `{instead}`"));
        return;
    }
    let words = words(key);
    if words.iter().any(|w| SECRET_WORDS.contains(&w.as_str())) {
        report(k, "secrets and tokens are never logged".into());
        return;
    }
    if words.iter().any(|w| CONSOLE_WORDS.contains(&w.as_str())) {
        report(k, "guest console content is never logged".into());
        return;
    }
    let object_key = key.chars().next().is_some_and(char::is_uppercase)
        && key.chars().all(|c| c.is_ascii_alphanumeric())
        && is_object_reference(value);
    if !(is_snake(key) || CONTROLLER_RUNTIME_KEYS.contains(&key) || object_key) {
        report(
            k,
            "not snake_case (the convention's keys are snake_case)".into(),
        );
    }
    match key {
        "error" | "instance_uuid" | "project" | "instance_name" | "instance_namespace"
        | "workload" | "node" => {
            if value.as_str().is_none_or(str::is_empty) {
                report(k, format!("must be a non-empty string, not {value}"));
            }
        }
        "reason" => {
            if !value.as_str().is_some_and(is_token) {
                report(
                    k,
                    format!(
                        "a reason is one word of a closed vocabulary (free text goes into the message or error): {value}"
                    ),
                );
            }
        }
        "pid" => {
            if !value.is_u64() {
                report(k, format!("must be a number: {value}"));
            }
        }
        _ if (key.ends_with("_seconds") || key.ends_with("_bytes"))
            && !(value.is_number() || value.is_null()) =>
        {
            report(k, format!("a quantity is a number: {value}"));
        }
        _ => {}
    }
    if let Some(text) = value.as_str()
        && looks_like_credential(text)
    {
        report(k, "the value looks like a credential".into());
    }
}

/// The words of a key: snake_case parts, camelCase humps, lower-cased.
fn words(key: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut current = String::new();
    for c in key.chars() {
        if c == '_' || c == '.' || c == '-' {
            words.push(std::mem::take(&mut current));
        } else if c.is_uppercase() && current.chars().last().is_some_and(char::is_lowercase) {
            words.push(std::mem::take(&mut current));
            current.extend(c.to_lowercase());
        } else {
            current.extend(c.to_lowercase());
        }
    }
    words.push(current);
    words.retain(|w| !w.is_empty());
    words
}

fn is_snake(key: &str) -> bool {
    let mut chars = key.chars();
    chars.next().is_some_and(|c| c.is_ascii_lowercase())
        && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
}

/// A single word: letters, digits, underscores (`exited`, `fatal_signal`, `Stopped`).
fn is_token(s: &str) -> bool {
    let mut chars = s.chars();
    chars.next().is_some_and(|c| c.is_ascii_alphabetic())
        && chars.all(|c| c.is_ascii_alphanumeric() || c == '_')
}

/// controller-runtime's `"Instance": {"name": ..., "namespace": ...}`.
fn is_object_reference(value: &Value) -> bool {
    value.as_object().is_some_and(|o| {
        !o.is_empty()
            && o.iter()
                .all(|(k, v)| (k == "name" || k == "namespace") && v.is_string())
    })
}

/// `2026-11-28T05:58:26.399591212Z`: date, `T`, time, optional fraction, `Z`.
fn is_rfc3339_utc(ts: &str) -> bool {
    let b = ts.as_bytes();
    let digits = |range: std::ops::Range<usize>| {
        b.get(range.clone())
            .is_some_and(|s| s.len() == range.len() && s.iter().all(u8::is_ascii_digit))
    };
    if b.len() < 20 || !ts.ends_with('Z') {
        return false;
    }
    let fixed = digits(0..4)
        && b[4] == b'-'
        && digits(5..7)
        && b[7] == b'-'
        && digits(8..10)
        && b[10] == b'T'
        && digits(11..13)
        && b[13] == b':'
        && digits(14..16)
        && b[16] == b':'
        && digits(17..19);
    let rest = &b[19..b.len() - 1];
    fixed
        && (rest.is_empty()
            || (rest.len() >= 2 && rest[0] == b'.' && rest[1..].iter().all(u8::is_ascii_digit)))
}

fn looks_like_credential(text: &str) -> bool {
    let jwt = text.starts_with("eyJ")
        && text.split('.').count() == 3
        && text.len() > 30
        && !text.contains(' ');
    text.starts_with("Bearer ") || text.starts_with("Basic ") || text.contains("-----BEGIN") || jwt
}

#[cfg(test)]
mod tests {
    use super::*;

    fn violations(text: &str) -> Vec<String> {
        check(text.as_bytes())
            .into_iter()
            .map(|v| v.to_string())
            .collect()
    }

    const GOOD: &str = r#"{"timestamp":"2026-12-02T12:00:00.123456Z","level":"INFO","message":"instance found","target":"collector::discovery","instance_uuid":"u1","hypervisor":"firecracker","pid":42,"origin":"exec"}"#;

    #[test]
    fn a_conforming_line_passes() {
        assert_eq!(violations(GOOD), Vec::<String>::new());
        // controller-runtime's own keys, with the object reference it adds.
        let reconcile = r#"{"timestamp":"2026-12-02T12:00:00Z","level":"ERROR","message":"reconciler error","logger":"controller","caller":"x.go:1","controller":"instance","controllerGroup":"compute.datumapis.com","controllerKind":"Instance","Instance":{"name":"web-0","namespace":"ns-a"},"namespace":"ns-a","name":"web-0","reconcileID":"8a1b","error":"boom","stacktrace":"..."}"#;
        assert_eq!(violations(reconcile), Vec::<String>::new());
    }

    #[test]
    fn line_numbers_count_every_line() {
        let text = format!(
            "{GOOD}\n\n{}\n",
            GOOD.replace("instance found", "Instance found.")
        );
        let found = check(text.as_bytes());
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(found.iter().all(|v| v.line == 3));
    }

    #[test]
    fn development_mode_output_is_refused() {
        let dev =
            "2026-12-02T12:00:00.000Z\tINFO\tcontroller\tStarting workers\t{\"worker count\": 1}";
        assert_eq!(
            violations(dev),
            [
                "line 1: not a JSON object (zap's development console encoder? set Development=false and the JSON encoder)"
            ]
        );
        let warn_with_stack = GOOD
            .replace("\"INFO\"", "\"WARN\"")
            .replace("\"pid\":42", "\"pid\":42,\"stacktrace\":\"main.go:1\"");
        assert_eq!(
            violations(&warn_with_stack),
            [
                "line 1: stacktrace: stack trace below ERROR: zap's development mode (set Development=false)"
            ]
        );
    }

    #[test]
    fn required_keys_and_their_forms() {
        assert_eq!(
            violations(r#"{"ts":1733140800.5,"msg":"x","lvl":"info"}"#),
            [
                "line 1: timestamp: missing",
                "line 1: level: missing",
                "line 1: message: missing",
                "line 1: lvl: use `level`",
                "line 1: msg: use `message`",
                "line 1: ts: use `timestamp`",
            ]
        );
        let bad = r#"{"timestamp":"2026-12-02 12:00:00","level":"info","message":"x"}"#;
        assert_eq!(
            violations(bad),
            [
                "line 1: timestamp: not an RFC 3339 UTC time (2006-01-02T15:04:05.000Z): \"2026-12-02 12:00:00\"",
                "line 1: level: \"info\" is not one of DEBUG, INFO, WARN, ERROR",
            ]
        );
        assert!(is_rfc3339_utc("2026-12-02T12:00:00Z"));
        assert!(!is_rfc3339_utc("2026-12-02T12:00:00+01:00"));
        assert!(!is_rfc3339_utc("2026-12-02T12:00:00.Z"));
    }

    #[test]
    fn message_style() {
        let with = |m: &str| violations(&GOOD.replace("instance found", m));
        assert_eq!(with("OOM kill seen"), Vec::<String>::new());
        assert_eq!(
            with("Reconciling instance"),
            [
                "line 1: message: starts with a capital letter: lower-case, like a log line, not a sentence"
            ]
        );
        assert_eq!(with("done."), ["line 1: message: ends with punctuation"]);
        assert_eq!(
            with("reconciling name=web-0"),
            ["line 1: message: holds key=value pairs: values go into keys of their own"]
        );
        assert_eq!(
            with("bad %!s(MISSING)"),
            ["line 1: message: holds a Go formatting error (%!): values go into keys"]
        );
        assert_eq!(with(""), ["line 1: message: empty"]);
    }

    #[test]
    fn key_style_and_synonyms() {
        let with = |extra: &str| violations(&GOOD.replace("\"pid\":42", extra));
        assert_eq!(
            with(r#""pid":42,"instanceUUID":"u1""#),
            ["line 1: instanceUUID: use `instance_uuid`"]
        );
        assert_eq!(
            with(r#""pid":42,"err":"boom""#),
            ["line 1: err: use `error`"]
        );
        assert_eq!(
            with(r#""pid":42,"workerCount":1"#),
            ["line 1: workerCount: not snake_case (the convention's keys are snake_case)"]
        );
        assert_eq!(
            with(r#""pid":"42""#),
            ["line 1: pid: must be a number: \"42\""]
        );
        assert_eq!(
            with(r#""pid":42,"reason":"the VMM exited""#),
            [
                "line 1: reason: a reason is one word of a closed vocabulary (free text goes into the message or error): \"the VMM exited\""
            ]
        );
        assert_eq!(with(r#""pid":42,"reason":"Stopped""#), Vec::<String>::new());
        assert_eq!(
            with(r#""pid":42,"uptime_seconds":"3s""#),
            ["line 1: uptime_seconds: a quantity is a number: \"3s\""]
        );
        assert_eq!(
            with(r#""pid":42,"k8s.node.name":"n1""#),
            ["line 1: k8s.node.name: not snake_case (the convention's keys are snake_case)"]
        );
    }

    #[test]
    fn secrets_and_console_content_are_refused() {
        let with = |extra: &str| violations(&GOOD.replace("\"pid\":42", extra));
        for key in [
            "token",
            "bearerToken",
            "client_secret",
            "password",
            "Authorization",
        ] {
            assert_eq!(
                with(&format!(r#""pid":42,"{key}":"x""#)),
                [format!(
                    "line 1: {key}: secrets and tokens are never logged"
                )]
            );
        }
        for key in ["console_line", "guestConsole", "stdout"] {
            assert_eq!(
                with(&format!(r#""pid":42,"{key}":"x""#)),
                [format!(
                    "line 1: {key}: guest console content is never logged"
                )]
            );
        }
        assert_eq!(
            with(r#""pid":42,"header":"Bearer abc""#),
            ["line 1: header: the value looks like a credential"]
        );
        assert_eq!(
            with(r#""pid":42,"value":"eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiJ4In0.c2lnbmF0dXJl""#),
            ["line 1: value: the value looks like a credential"]
        );
    }

    #[test]
    fn error_lines_carry_the_error() {
        let line = GOOD.replace("\"INFO\"", "\"ERROR\"");
        assert_eq!(
            violations(&line),
            ["line 1: error: an ERROR line carries the error"]
        );
        let with_error = line.replace("\"pid\":42", "\"pid\":42,\"error\":\"boom\"");
        assert_eq!(violations(&with_error), Vec::<String>::new());
    }
}
