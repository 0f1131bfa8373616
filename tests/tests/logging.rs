//! `--log-format json`: every log line is one JSON object with stable field names.

use std::time::Duration;

use collector_tests::{Collector, Standin, new_uuid, wait_for};
use serde_json::Value;

#[test]
fn json_logs_have_stable_fields() {
    let collector = Collector::start(&["--log-format", "json"]);
    let uuid = new_uuid("jsonlog");
    let mut vmm = Standin::spawn("firecracker", &["--uuid", &uuid], &[]);
    wait_for(Duration::from_secs(1), || collector.instance(&uuid)).expect("listed");
    vmm.signal(libc::SIGTERM);
    let find = |message: &str| {
        collector
            .stderr()
            .lines()
            .map(|l| {
                serde_json::from_str::<Value>(l).unwrap_or_else(|e| panic!("not JSON ({e}): {l}"))
            })
            .find(|v| v["message"] == message && v["instance_uuid"] == uuid.as_str())
    };
    let found = wait_for(Duration::from_secs(2), || find("instance lifecycle event"))
        .unwrap_or_else(|| panic!("no lifecycle log line:\n{}", collector.stderr()));
    for field in [
        "timestamp",
        "level",
        "event",
        "reason",
        "hypervisor",
        "pid",
        "uptime_seconds",
    ] {
        assert!(!found[field].is_null(), "field {field} missing: {found}");
    }
    let discovered = find("instance found").expect("discovery log line");
    assert_eq!(discovered["hypervisor"], "firecracker");
    assert_eq!(discovered["origin"], "exec");
    assert_eq!(discovered["level"], "INFO");
}
