//! docs/metrics.md lists exactly the metric families a live collector serves.

use std::collections::BTreeSet;

use collector_tests::{Collector, Standin, new_uuid, wait_for};

/// Family names in an exposition (from `# TYPE` lines; an OpenMetrics counter family is named
/// without its `_total`, a Prometheus text one with it).
fn served_families(exposition: &str) -> BTreeSet<String> {
    exposition
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split_whitespace();
            let name = parts.next().unwrap();
            match parts.next() {
                Some("counter") if !name.ends_with("_total") => format!("{name}_total"),
                _ => name.to_owned(),
            }
        })
        .collect()
}

/// Family names in the first column of docs/metrics.md's table.
fn documented_families() -> BTreeSet<String> {
    let doc = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../docs/metrics.md"))
        .expect("docs/metrics.md");
    doc.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .map(str::to_owned)
        .collect()
}

#[test]
fn every_served_metric_is_documented_and_back() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("doc");
    let _vmm = Standin::spawn("firecracker", &["--uuid", &uuid], &[]);
    wait_for(std::time::Duration::from_secs(1), || {
        collector.instance(&uuid)
    })
    .expect("instance");
    let served = served_families(&collector.get_text("/metrics"));
    let documented = documented_families();
    let undocumented: Vec<_> = served.difference(&documented).collect();
    let missing: Vec<_> = documented.difference(&served).collect();
    assert!(
        undocumented.is_empty(),
        "served but not in docs/metrics.md: {undocumented:?}"
    );
    assert!(
        missing.is_empty(),
        "in docs/metrics.md but not served: {missing:?}"
    );
}
