//! Label and field selectors as the API server parses and applies them.
//!
//! Labels: equality (`k=v`, `k==v`, `k!=v`), sets (`k in (a,b)`, `k notin (a,b)`) and
//! existence (`k`, `!k`), joined by commas (AND). Fields: `=`, `==`, `!=` on the fields the
//! API server supports for the resource; any other field is a 400, as on a real server.

use std::collections::BTreeMap;

use serde_json::Value;

#[derive(Debug, Clone, PartialEq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

/// A parsed label selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct LabelSelector(Vec<Requirement>);

/// Splits at commas outside parentheses.
fn split_top(text: &str) -> Vec<&str> {
    let mut parts = Vec::new();
    let mut depth = 0usize;
    let mut start = 0;
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                parts.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    parts.push(&text[start..]);
    parts
}

fn valid_key(key: &str) -> bool {
    !key.is_empty()
        && key.len() <= 317
        && key
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_./".contains(&b))
}

fn valid_value(value: &str) -> bool {
    value.len() <= 63
        && value
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
}

fn set_values(rest: &str) -> Result<Vec<String>, String> {
    let inner = rest
        .trim()
        .strip_prefix('(')
        .and_then(|r| r.strip_suffix(')'))
        .ok_or_else(|| format!("expected (values) in {rest:?}"))?;
    let values: Vec<String> = inner.split(',').map(|v| v.trim().to_owned()).collect();
    if values.iter().any(|v| !valid_value(v)) {
        return Err(format!("invalid value in {rest:?}"));
    }
    Ok(values)
}

impl LabelSelector {
    pub(super) fn parse(text: &str) -> Result<Self, String> {
        let mut requirements = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(requirements));
        }
        for part in split_top(text) {
            let part = part.trim();
            let requirement = if let Some(key) = part.strip_prefix('!') {
                Requirement::NotExists(key.trim().to_owned())
            } else if let Some((key, value)) = part.split_once("!=") {
                Requirement::NotEquals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = part.split_once("==") {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, value)) = part.split_once('=') {
                Requirement::Equals(key.trim().to_owned(), value.trim().to_owned())
            } else if let Some((key, rest)) = part.split_once(" notin ") {
                Requirement::NotIn(key.trim().to_owned(), set_values(rest)?)
            } else if let Some((key, rest)) = part.split_once(" in ") {
                Requirement::In(key.trim().to_owned(), set_values(rest)?)
            } else {
                Requirement::Exists(part.to_owned())
            };
            let (Requirement::Equals(key, _)
            | Requirement::NotEquals(key, _)
            | Requirement::In(key, _)
            | Requirement::NotIn(key, _)
            | Requirement::Exists(key)
            | Requirement::NotExists(key)) = &requirement;
            if !valid_key(key) {
                return Err(format!("invalid label key {key:?}"));
            }
            if let Requirement::Equals(_, v) | Requirement::NotEquals(_, v) = &requirement
                && !valid_value(v)
            {
                return Err(format!("invalid label value {v:?}"));
            }
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    pub(super) fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// A parsed field selector; empty matches everything.
#[derive(Debug, Clone, Default, PartialEq)]
pub(super) struct FieldSelector(Vec<(String, bool, String)>);

/// The JSON pointer of each field the API server can select on, per resource.
fn field_path(resource: &str, field: &str) -> Option<&'static str> {
    match (resource, field) {
        (_, "metadata.name") => Some("/metadata/name"),
        ("pods", "metadata.namespace") => Some("/metadata/namespace"),
        ("pods", "spec.nodeName") => Some("/spec/nodeName"),
        ("pods", "spec.restartPolicy") => Some("/spec/restartPolicy"),
        ("pods", "spec.schedulerName") => Some("/spec/schedulerName"),
        ("pods", "spec.serviceAccountName") => Some("/spec/serviceAccountName"),
        ("pods" | "namespaces", "status.phase") => Some("/status/phase"),
        ("pods", "status.podIP") => Some("/status/podIP"),
        _ => None,
    }
}

impl FieldSelector {
    pub(super) fn parse(resource: &str, text: &str) -> Result<Self, String> {
        let mut terms = Vec::new();
        if text.trim().is_empty() {
            return Ok(Self(terms));
        }
        for part in text.split(',') {
            let (field, equal, value) = if let Some((f, v)) = part.split_once("!=") {
                (f, false, v)
            } else if let Some((f, v)) = part.split_once("==") {
                (f, true, v)
            } else if let Some((f, v)) = part.split_once('=') {
                (f, true, v)
            } else {
                return Err(format!("invalid selector: {part:?}; can't understand it"));
            };
            let field = field.trim();
            if field_path(resource, field).is_none() {
                return Err(format!("field label not supported: {field}"));
            }
            terms.push((field.to_owned(), equal, value.trim().to_owned()));
        }
        Ok(Self(terms))
    }

    pub(super) fn matches(&self, resource: &str, object: &Value) -> bool {
        self.0.iter().all(|(field, equal, value)| {
            let actual = field_path(resource, field)
                .and_then(|p| object.pointer(p))
                .and_then(Value::as_str)
                .unwrap_or("");
            (actual == value) == *equal
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    #[test]
    fn label_selectors() {
        let l = labels(&[("managed-by", "infra-provider-unikraft"), ("tier", "a")]);
        for (selector, expected) in [
            ("", true),
            ("managed-by=infra-provider-unikraft", true),
            ("managed-by==infra-provider-unikraft", true),
            ("managed-by!=infra-provider-unikraft", false),
            ("managed-by=kata-provider", false),
            ("tier in (a, b)", true),
            ("tier notin (a,b)", false),
            ("tier,managed-by", true),
            ("!tier", false),
            ("!other", true),
            ("managed-by=infra-provider-unikraft,tier in (b)", false),
        ] {
            assert_eq!(
                LabelSelector::parse(selector).unwrap().matches(&l),
                expected,
                "{selector}"
            );
        }
        assert!(LabelSelector::parse("a=(b").is_err());
        assert!(LabelSelector::parse("a in b").is_err());
    }

    #[test]
    fn field_selectors() {
        let pod = serde_json::json!({"metadata": {"name": "p", "namespace": "n"},
                                     "spec": {"nodeName": "kraftlet-n1"}});
        let s = FieldSelector::parse("pods", "spec.nodeName=kraftlet-n1").unwrap();
        assert!(s.matches("pods", &pod));
        let s = FieldSelector::parse("pods", "spec.nodeName!=kraftlet-n1").unwrap();
        assert!(!s.matches("pods", &pod));
        assert!(FieldSelector::parse("pods", "metadata.labels=x").is_err());
        assert!(FieldSelector::parse("namespaces", "spec.nodeName=x").is_err());
    }
}
