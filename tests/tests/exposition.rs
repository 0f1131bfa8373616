//! `/metrics` for every scraper: the Prometheus text format by default and to `text/plain`
//! (clean under `promtool check metrics`), OpenMetrics to a scraper that ranks it first (its
//! structure checked line by line), the same samples in both.

use std::{
    collections::{BTreeMap, BTreeSet},
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use collector_tests::{Collector, Standin, new_uuid, servers::require_binary, wait_for};

/// What Prometheus 2.42 sends.
const PROMETHEUS_ACCEPT: &str = "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1";

fn scrape(collector: &Collector, accept: Option<&str>) -> (String, String) {
    let mut request = ureq::get(collector.url("/metrics"));
    if let Some(accept) = accept {
        request = request.header("Accept", accept);
    }
    let mut response = request.call().expect("GET /metrics");
    let content_type = response
        .headers()
        .get("content-type")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    let body = response.body_mut().read_to_string().expect("body");
    (content_type, body)
}

/// `promtool check metrics` on `exposition`: (success, what it printed).
fn promtool(exposition: &str) -> (bool, String) {
    let mut child = Command::new(require_binary("promtool", "prometheus"))
        .args(["check", "metrics"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("promtool");
    child
        .stdin
        .take()
        .unwrap()
        .write_all(exposition.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    (out.status.success(), text)
}

/// The sample series (name and labels) of an exposition, without values.
fn series(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter(|l| !l.starts_with('#') && !l.is_empty())
        .map(|l| l.rsplit_once(' ').expect("sample value").0.to_owned())
        .collect()
}

/// The problems of an OpenMetrics exposition: every family has one HELP and one TYPE before its
/// samples, every sample belongs to the family before it with a suffix its type allows, no
/// family appears twice, and it ends with `# EOF`.
fn open_metrics_problems(exposition: &str) -> Vec<String> {
    let mut problems = Vec::new();
    let mut seen = BTreeSet::new();
    let mut family: Option<(String, String)> = None;
    let mut help: BTreeMap<String, usize> = BTreeMap::new();
    let lines: Vec<&str> = exposition.lines().collect();
    if lines.last() != Some(&"# EOF") {
        problems.push("does not end with # EOF".to_owned());
    }
    for (n, line) in lines.iter().enumerate() {
        if let Some(rest) = line.strip_prefix("# HELP ") {
            let name = rest.split(' ').next().unwrap_or_default();
            *help.entry(name.to_owned()).or_default() += 1;
        } else if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split(' ');
            let (name, kind) = (parts.next().unwrap(), parts.next().unwrap_or_default());
            if !seen.insert(name.to_owned()) {
                problems.push(format!("line {n}: family {name} twice"));
            }
            if help.get(name) != Some(&1) {
                problems.push(format!(
                    "line {n}: family {name} without one HELP before it"
                ));
            }
            if kind == "counter" && name.ends_with("_total") {
                problems.push(format!("line {n}: counter family {name} named with _total"));
            }
            family = Some((name.to_owned(), kind.to_owned()));
        } else if *line == "# EOF" {
            if n + 1 != lines.len() {
                problems.push(format!("line {n}: # EOF before the end"));
            }
        } else {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let Some((family, kind)) = &family else {
                problems.push(format!("line {n}: sample before any family"));
                continue;
            };
            let suffix = name.strip_prefix(family.as_str());
            let allowed: &[&str] = match kind.as_str() {
                "counter" => &["_total", "_created"],
                "histogram" => &["_bucket", "_sum", "_count", "_created"],
                _ => &[""],
            };
            if !suffix.is_some_and(|s| allowed.contains(&s)) {
                problems.push(format!(
                    "line {n}: sample {name} not of {kind} family {family}"
                ));
            }
        }
    }
    problems
}

#[test]
fn both_formats_for_their_scrapers() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("expo");
    let _vmm = Standin::spawn("firecracker", &["--no-api", "--uuid", &uuid], &[]);
    wait_for(Duration::from_secs(2), || collector.instance(&uuid)).expect("listed");

    let (default_type, default_body) = scrape(&collector, None);
    let (text_type, text) = scrape(&collector, Some("text/plain"));
    let (om_type, open_metrics) = scrape(&collector, Some(PROMETHEUS_ACCEPT));
    assert_eq!(default_type, "text/plain; version=0.0.4; charset=utf-8");
    assert_eq!(text_type, default_type);
    assert_eq!(
        om_type,
        "application/openmetrics-text; version=1.0.0; charset=utf-8"
    );
    assert!(text.contains(&format!("compute_instance_info{{instance_uuid=\"{uuid}\"")));

    for body in [&default_body, &text] {
        let (ok, output) = promtool(body);
        assert!(ok && output.trim().is_empty(), "promtool: {output}");
    }
    assert_eq!(open_metrics_problems(&open_metrics), Vec::<String>::new());
    // The check can fail: the text form, read as OpenMetrics, breaks its rules.
    assert!(!open_metrics_problems(&text).is_empty());
    // Same samples either way (values move between scrapes; series do not, for our instance).
    let ours = |s: &BTreeSet<String>| -> BTreeSet<String> {
        s.iter()
            .filter(|l| l.contains(&uuid) || l.starts_with("collector_probe_attached"))
            .cloned()
            .collect()
    };
    assert_eq!(ours(&series(&text)), ours(&series(&open_metrics)));
}
