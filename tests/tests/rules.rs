//! The rule file: promtool checks and unit tests, the case matrix every alert's tests cover,
//! what every alert carries (severity, `for`, summary, description, runbook and the reason for
//! its threshold), and the runbooks with their links to the dashboards' panels.

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::Command,
};

use collector_tests::servers::{require_binary, workspace_root};
use serde_json::Value;

/// Cases each alert's promtool tests have, as `"<Alert>: <case>"` test names.
const MATRIX: &[&str] = &[
    "firing",
    "not yet",
    "healthy",
    "absent",
    "counter reset",
    "second node",
];

fn yaml(path: &Path) -> Value {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    serde_norway::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

fn rules_path() -> PathBuf {
    workspace_root().join("deploy/rules/collector.rules.yml")
}

/// The alerting rules, by name (an alert may have one rule per severity).
fn alerts() -> BTreeMap<String, Vec<Value>> {
    let mut alerts: BTreeMap<String, Vec<Value>> = BTreeMap::new();
    for group in yaml(&rules_path())["groups"].as_array().expect("groups") {
        for rule in group["rules"].as_array().expect("rules") {
            if let Some(name) = rule["alert"].as_str() {
                alerts
                    .entry(name.to_owned())
                    .or_default()
                    .push(rule.clone());
            }
        }
    }
    alerts
}

fn promtool(args: &[&str]) -> String {
    let out = Command::new(require_binary("promtool", "prometheus"))
        .args(args)
        .current_dir(workspace_root())
        .output()
        .expect("promtool");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "promtool {args:?}:\n{text}");
    text
}

#[test]
fn promtool_checks_the_rule_file_and_its_renderings() {
    let text = promtool(&["check", "rules", "deploy/rules/collector.rules.yml"]);
    assert!(text.contains("SUCCESS"), "{text}");
    // The PrometheusRule's and VMRule's spec is a rule file too: promtool reads it as one.
    let dir = tempfile::tempdir().expect("dir");
    for manifest in ["prometheusrule.yaml", "vmrule.yaml"] {
        let object = yaml(&workspace_root().join("deploy/base").join(manifest));
        assert_eq!(object["spec"], yaml(&rules_path()), "{manifest}'s spec");
        let path = dir.path().join(manifest);
        std::fs::write(&path, serde_norway::to_string(&object["spec"]).unwrap()).unwrap();
        promtool(&["check", "rules", path.to_str().unwrap()]);
    }
}

#[test]
fn promtool_unit_tests_pass() {
    let dir = workspace_root().join("deploy/rules/tests");
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .expect("tests dir")
        .map(|e| e.unwrap().path().display().to_string())
        .filter(|p| p.ends_with(".test.yml"))
        .collect();
    files.sort();
    assert!(files.len() > alerts().len(), "{files:?}");
    let mut args = vec!["test", "rules"];
    args.extend(files.iter().map(String::as_str));
    let text = promtool(&args);
    assert_eq!(text.matches("SUCCESS").count(), files.len(), "{text}");
}

/// (eval_time in minutes, alerts expected) of each evaluation of `alert` in a test group.
fn evaluations(group: &Value, alert: &str) -> Vec<(u64, usize)> {
    group["alert_rule_test"]
        .as_array()
        .map(|tests| {
            tests
                .iter()
                .filter(|t| t["alertname"] == alert)
                .map(|t| {
                    let time = t["eval_time"].as_str().expect("eval_time");
                    let minutes = time.strip_suffix('m').and_then(|m| m.parse().ok());
                    let count = t["exp_alerts"].as_array().map_or(0, Vec::len);
                    (
                        minutes.unwrap_or_else(|| panic!("eval_time {time}: minutes")),
                        count,
                    )
                })
                .collect()
        })
        .unwrap_or_default()
}

#[test]
fn every_alert_is_tested_in_every_case() {
    for alert in alerts().keys() {
        let path = workspace_root().join(format!("deploy/rules/tests/{alert}.test.yml"));
        let tests = yaml(&path);
        assert_eq!(tests["evaluation_interval"], "1m", "{alert}");
        let groups: BTreeMap<String, &Value> = tests["tests"]
            .as_array()
            .expect("tests")
            .iter()
            .map(|g| (g["name"].as_str().expect("name").to_owned(), g))
            .collect();
        for case in MATRIX {
            let name = format!("{alert}: {case}");
            let group = groups
                .get(&name)
                .unwrap_or_else(|| panic!("{path:?}: no test {name:?}"));
            let evals = evaluations(group, alert);
            assert!(!evals.is_empty(), "{name}: evaluates nothing");
            match *case {
                "firing" | "second node" => assert!(
                    evals.iter().any(|&(_, n)| n > 0),
                    "{name}: expects no alert"
                ),
                _ => assert!(
                    evals.iter().all(|&(_, n)| n == 0),
                    "{name}: expects an alert"
                ),
            }
        }
        // "not yet" is exactly one evaluation before the first firing evaluation.
        let firing = evaluations(groups[&format!("{alert}: firing")], alert);
        let first_firing = firing.iter().find(|&&(_, n)| n > 0).unwrap().0;
        let not_yet = evaluations(groups[&format!("{alert}: not yet")], alert);
        assert_eq!(
            not_yet.iter().map(|&(t, _)| t).max(),
            Some(first_firing - 1),
            "{alert}: `not yet` is not one step before `firing`"
        );
    }
}

#[test]
fn every_alert_carries_what_an_operator_needs() {
    let source = std::fs::read_to_string(rules_path()).unwrap();
    let lines: Vec<&str> = source.lines().collect();
    for (alert, rules) in alerts() {
        // The reason for the threshold: a comment right above the rule.
        let at = lines
            .iter()
            .position(|l| l.trim() == format!("- alert: {alert}"))
            .unwrap();
        assert!(
            lines[at - 1].trim_start().starts_with('#'),
            "{alert}: no comment saying why its threshold is what it is"
        );
        for rule in rules {
            let severity = rule["labels"]["severity"].as_str().unwrap_or_default();
            assert!(
                ["warning", "critical"].contains(&severity),
                "{alert}: severity {severity:?}"
            );
            let r#for = rule["for"].as_str().unwrap_or_default();
            assert!(
                r#for.ends_with('m') && r#for != "0m",
                "{alert}: for {for:?}"
            );
            let summary = rule["annotations"]["summary"].as_str().unwrap_or_default();
            assert!(
                !summary.is_empty() && !summary.contains("{{"),
                "{alert}: summary must be static"
            );
            let description = rule["annotations"]["description"]
                .as_str()
                .unwrap_or_default();
            assert!(
                description.contains("{{"),
                "{alert}: description must be templated"
            );
            let url = rule["annotations"]["runbook_url"]
                .as_str()
                .unwrap_or_default();
            assert!(
                url.ends_with(&format!("/docs/runbooks/{alert}.md")),
                "{alert}: runbook_url {url}"
            );
        }
    }
}

/// `(uid, panel id)` of each panel linking to `runbook`'s alert, over all dashboards.
fn panels_linking_to(alert: &str) -> Vec<(String, u64)> {
    let mut found = Vec::new();
    for name in ["fleet", "node", "instance"] {
        let path = workspace_root().join(format!("deploy/dashboards/compute-{name}.json"));
        let d: Value = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
        for p in d["panels"].as_array().unwrap() {
            let links = p["links"].as_array().cloned().unwrap_or_default();
            if links.iter().any(|l| {
                l["url"]
                    .as_str()
                    .is_some_and(|u| u.ends_with(&format!("/{alert}.md")))
            }) {
                found.push((
                    d["uid"].as_str().unwrap().to_owned(),
                    p["id"].as_u64().unwrap(),
                ));
            }
        }
    }
    found
}

#[test]
fn runbooks_have_their_sections_and_link_to_the_alerts_panel() {
    for alert in alerts().keys() {
        let path = workspace_root().join(format!("docs/runbooks/{alert}.md"));
        let text = std::fs::read_to_string(&path).unwrap_or_else(|_| panic!("no {path:?}"));
        assert!(text.starts_with(&format!("# {alert}\n")), "{alert}: title");
        let mut last = 0;
        for section in ["## Meaning", "## Impact", "## Diagnosis", "## Mitigation"] {
            let at = text
                .find(&format!("\n{section}\n"))
                .unwrap_or_else(|| panic!("{alert}: no {section}"));
            assert!(at > last, "{alert}: {section} out of order");
            last = at;
        }
        let panels = panels_linking_to(alert);
        assert_eq!(
            panels.len(),
            1,
            "{alert}: panels linking to its runbook: {panels:?}"
        );
        let (uid, id) = &panels[0];
        let link = format!("/d/{uid}/{uid}?viewPanel={id}");
        assert!(
            text.contains(&link),
            "{alert}: runbook does not link to its panel {link}"
        );
    }
}
