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

/// An instance's series and bytes stay within the budget docs/metrics.md states: 30 series
/// whatever it does (allocation known, vCPUs ticking), and 2 more per console stream it
/// writes; at most 4 KB in all for a Firecracker-like instance with one stream.
#[test]
fn an_instance_stays_within_its_series_budget() {
    let collector = Collector::start(&[]);
    let dir = tempfile::tempdir().expect("dir");
    std::fs::write(
        dir.path().join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#,
    )
    .expect("vmm.json");
    let uuid = "7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11"
        .replace("7d2b", &format!("{:04x}", std::process::id() % 0x10000));
    let _vmm = Standin::spawn_in(
        dir.path(),
        "firecracker",
        &["--no-api", "--uuid", &uuid, "--config-file", "vmm.json"],
        &[
            ("STANDIN_VCPUS", "2"),
            ("STANDIN_TICK_MS", "10"),
            ("STANDIN_LINES", "5"),
        ],
    );
    let ours = |text: &str| -> Vec<String> {
        text.lines()
            .filter(|l| !l.starts_with('#') && l.contains(&format!("instance_uuid=\"{uuid}\"")))
            .map(str::to_owned)
            .collect()
    };
    // Listed, allocation read, both streams captured.
    let lines = wait_for(Duration::from_secs(5), || {
        let lines = ours(&collector.get_text("/metrics"));
        let ready = lines
            .iter()
            .any(|l| l.starts_with("compute_instance_vcpus"))
            && lines
                .iter()
                .filter(|l| l.starts_with("compute_instance_console_lines_total"))
                .count()
                == 2;
        ready.then_some(lines)
    })
    .expect("instance with its allocation and two console streams");
    let console = lines
        .iter()
        .filter(|l| l.starts_with("compute_instance_console_"))
        .count();
    assert_eq!(
        console,
        4,
        "stdout and stderr, bytes and lines:\n{}",
        lines.join("\n")
    );
    let rest: Vec<&String> = lines
        .iter()
        .filter(|l| !l.starts_with("compute_instance_console_"))
        .collect();
    assert!(
        rest.len() <= 30,
        "{} series besides the console:\n{}",
        rest.len(),
        lines.join("\n")
    );
    // One stream (its 2 series) more or less: within 4 KB with one.
    let one_stream: usize = rest.iter().map(|l| l.len() + 1).sum::<usize>()
        + lines
            .iter()
            .filter(|l| l.contains("stream=\"stdout\""))
            .map(|l| l.len() + 1)
            .sum::<usize>();
    eprintln!(
        "{} series, {} bytes; with one stream {} bytes",
        lines.len(),
        lines.iter().map(|l| l.len() + 1).sum::<usize>(),
        one_stream
    );
    assert!(
        one_stream <= 4096,
        "{one_stream} bytes:\n{}",
        lines.join("\n")
    );
}
