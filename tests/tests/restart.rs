//! Restarts of the collector: a crash (SIGKILL) leaves the state file and the events and console
//! files; the next run continues the record from them. Each instance keeps exactly one
//! beginning and one end, event and console `seq` continue, and the downtime is marked in each
//! console stream of a running instance.

use std::time::Duration;

use collector_tests::{Collector, Standin, config_file, messages, new_uuid, wait_for};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(5);
const STATE_FILE: &str = ".collector-state.json";

/// A config matching executables named `<tag>-vmm` with `--id <uuid>` as hypervisor `<tag>`.
fn config_text(tag: &str) -> String {
    format!(
        r#"
[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
"#
    )
}

fn counter(collector: &Collector, tag: &str, event: &str) -> f64 {
    collector.metric(&format!(
        "compute_instance_lifecycle_events_total{{event=\"{event}\",hypervisor=\"{tag}\"}}"
    ))
}

fn kinds(events: &[Value]) -> Vec<(String, String)> {
    events
        .iter()
        .map(|e| {
            (
                e["event"].as_str().unwrap().to_owned(),
                e["reason"].as_str().unwrap().to_owned(),
            )
        })
        .collect()
}

fn pair(event: &str, reason: &str) -> (String, String) {
    (event.to_owned(), reason.to_owned())
}

/// The records of one stream, checking that `seq` runs from 1 without a gap or a repeat.
fn stream<'a>(records: &'a [Value], name: &str) -> Vec<&'a Value> {
    let of: Vec<&Value> = records.iter().filter(|r| r["stream"] == name).collect();
    for (i, r) in of.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "{name}: {r}");
    }
    of
}

fn is_downtime_gap(record: &Value) -> bool {
    record["gap"] == true
        && record["gap_reason"] == "collector_down"
        && record["message"] == ""
        && record["gap_since"]
            .as_str()
            .is_some_and(|s| s.ends_with('Z'))
        && record.get("dropped_bytes").is_none()
}

/// kill -9 the collector; while it is down one instance exits and another starts; the next run
/// ends the first as unobserved, keeps the running one's record as it was, discovers the new
/// one, and continues console `seq` after one gap record per stream.
#[test]
fn crash_restart_continues_the_record() {
    let tag = "rs-crash";
    let exe = format!("{tag}-vmm");
    let log_dir = tempfile::tempdir().unwrap();
    let config = log_dir.path().join("collector.toml");
    std::fs::write(&config, config_text(tag)).unwrap();
    let args = ["--config", config.to_str().unwrap()];
    let collector = Collector::start_in(log_dir, &args);

    let work = tempfile::tempdir().unwrap();
    let more = work.path().join("more");
    let (exits, stays, late) = (new_uuid(tag), new_uuid(tag), new_uuid(tag));
    let mut exiting = Standin::spawn(&exe, &["--id", &exits], &[]);
    let _staying = Standin::spawn(
        &exe,
        &["--id", &stays],
        &[
            ("STANDIN_LINES", "3"),
            ("STANDIN_MORE_WHEN", more.to_str().unwrap()),
        ],
    );
    for uuid in [&exits, &stays] {
        wait_for(WITHIN, || collector.instance(uuid)).expect("listed");
    }
    wait_for(WITHIN, || {
        (collector.log_file(&stays).len() == 6).then_some(())
    })
    .expect("the first lines in console.log");
    // The state file lists both (written within a few seconds of a change).
    let state_path = collector.log_dir.path().join(STATE_FILE);
    wait_for(Duration::from_secs(10), || {
        let text = std::fs::read_to_string(&state_path).ok()?;
        (text.contains(&exits) && text.contains(&stays)).then_some(())
    })
    .expect("the state file lists the instances");
    let before: Vec<Value> = collector_tests::ndjson(&collector.get_text("/v1/events"));
    let last_seq_before = before
        .iter()
        .map(|e| e["seq"].as_u64().unwrap())
        .max()
        .unwrap();
    let start_of_stays = collector.events_of(&stays).unwrap();
    assert_eq!(kinds(&start_of_stays), [pair("start", "exec")]);

    let log_dir = collector.kill_keep_dir();
    exiting.signal(libc::SIGTERM);
    let _late = Standin::spawn(&exe, &["--id", &late], &[]);
    std::thread::sleep(Duration::from_millis(200));
    let collector = Collector::start_in(log_dir, &args);

    let ended = collector
        .events_of(&exits)
        .expect("events of the one that exited");
    assert_eq!(
        kinds(&ended),
        [pair("start", "exec"), pair("stop", "unobserved_exit")],
        "{ended:#?}"
    );
    let stop = &ended[1];
    assert_eq!(stop["exit_code"], Value::Null, "no exit status is made up");
    assert_eq!(stop["signal"], Value::Null);
    assert_eq!(stop["signal_name"], Value::Null);
    assert_eq!(stop["pid"], exiting.pid());
    assert_eq!(
        collector.events_of(&stays).unwrap(),
        start_of_stays,
        "a restart of the collector is not an event of the instance"
    );
    assert!(collector.instance(&stays).is_some());
    let found = collector.events_of(&late).expect("events of the new one");
    assert_eq!(kinds(&found), [pair("discovered", "running_at_startup")]);
    for event in [stop, &found[0]] {
        assert!(
            event["seq"].as_u64().unwrap() > last_seq_before,
            "seq continues: {event} after {last_seq_before}"
        );
    }
    assert_eq!(counter(&collector, tag, "stop"), 1.0);
    assert_eq!(counter(&collector, tag, "discovered"), 1.0);
    assert_eq!(counter(&collector, tag, "start"), 0.0);

    // The running instance writes again: its streams continue after one gap each.
    std::fs::write(&more, b"").unwrap();
    let api = wait_for(WITHIN, || {
        let records = collector.logs(&stays, "");
        (records.len() == 3 + 6).then_some(records)
    })
    .unwrap_or_else(|| panic!("{:#?}", collector.logs(&stays, "")));
    for name in ["stdout", "stderr"] {
        let of: Vec<&Value> = api.iter().filter(|r| r["stream"] == name).collect();
        let seqs: Vec<u64> = of.iter().map(|r| r["seq"].as_u64().unwrap()).collect();
        assert_eq!(seqs, [4, 5, 6, 7], "{name} continues in the API: {of:#?}");
        assert!(is_downtime_gap(of[0]), "{}", of[0]);
        let more: Vec<&str> = of[1..]
            .iter()
            .map(|r| r["message"].as_str().unwrap())
            .collect();
        assert_eq!(more, [1, 2, 3].map(|i| format!("{name} more {i}")));
    }
    let console: Vec<&Value> = api.iter().filter(|r| r["stream"] == "console").collect();
    assert_eq!(console.len(), 1);
    assert!(is_downtime_gap(console[0]) && console[0]["seq"] == 1);

    let file = wait_for(WITHIN, || {
        let file = collector.log_file(&stays);
        (file.len() == 6 + 3 + 6).then_some(file)
    })
    .expect("console.log complete");
    for name in ["stdout", "stderr"] {
        let of = stream(&file, name);
        assert_eq!(of.len(), 7, "{name}: three lines, the gap, three more");
        let gaps: Vec<usize> = (0..of.len()).filter(|i| of[*i]["gap"] == true).collect();
        assert_eq!(gaps, [3], "one gap, where the collector was down");
        assert!(is_downtime_gap(of[3]));
        assert_eq!(of[0]["message"], format!("{name} line 1"));
        assert_eq!(of[6]["message"], format!("{name} more 3"));
    }
    assert_eq!(messages(&file, "console"), [""]);
}

/// A corrupt state file is one warning and a fresh start, never a crash.
#[test]
fn corrupt_state_file_is_a_fresh_start() {
    let tag = "rs-corrupt";
    let log_dir = tempfile::tempdir().unwrap();
    std::fs::write(log_dir.path().join(STATE_FILE), b"{\"version\":1,\"instan").unwrap();
    let config = config_file(&config_text(tag));
    let uuid = new_uuid(tag);
    let _vmm = Standin::spawn(&format!("{tag}-vmm"), &["--id", &uuid], &[]);
    std::thread::sleep(Duration::from_millis(100));
    let collector = Collector::start_in(log_dir, &["--config", config.path().to_str().unwrap()]);
    let events = collector.events_of(&uuid).expect("discovered");
    assert_eq!(kinds(&events), [pair("discovered", "running_at_startup")]);
    let stderr = collector.stderr();
    let warnings: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("WARN") && l.contains("restart state"))
        .collect();
    assert_eq!(warnings.len(), 1, "{stderr}");
    assert!(warnings[0].contains("not valid"), "{}", warnings[0]);
    // The next state file is whole again.
    let state = collector.log_dir.path().join(STATE_FILE);
    let written = wait_for(Duration::from_secs(10), || {
        let file: Value = serde_json::from_slice(&std::fs::read(&state).ok()?).ok()?;
        file["instances"]
            .as_array()?
            .iter()
            .any(|i| i["instance_uuid"] == uuid.as_str())
            .then_some(file)
    })
    .expect("a new state file");
    assert_eq!(written["version"], 1);
}
