//! Lost kernel records are reconciled with `/proc`: a process ring too small for a burst of
//! execs and exits loses records (the kernel counts them), and still every instance gets
//! exactly one beginning and one end, and none is left listed.

use std::{
    collections::{HashMap, HashSet},
    time::{Duration, Instant},
};

use collector_tests::{Collector, Standin, new_uuid, wait_for};
use serde_json::Value;

const INSTANCES: usize = 300;

fn lost(collector: &Collector, event: &str) -> f64 {
    collector.metric(&format!(
        "collector_ebpf_events_lost_total{{ring=\"process\",event=\"{event}\"}}"
    ))
}

/// Our instances still listed.
fn listed(collector: &Collector, ours: &HashSet<String>) -> usize {
    collector
        .get_json("/v1/instances")
        .as_array()
        .expect("array")
        .iter()
        .filter(|i| ours.contains(i["instance_uuid"].as_str().unwrap_or_default()))
        .count()
}

/// 300 stand-ins started together and ended together (half exit 0, half are killed) with a
/// 4 KiB process ring (four exec records): records are lost, and the record is whole anyway.
#[test]
fn a_burst_that_loses_records_is_reconciled() {
    let tag = "rc-burst";
    let collector = Collector::start_with_config(&format!(
        r#"
disable_builtin_matchers = ["firecracker", "qemu", "cloud-hypervisor"]

[kernel]
process_events_ring_bytes = 4096

[console.files]

[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
"#
    ));
    let work = tempfile::tempdir().unwrap();
    let stop = work.path().join("stop");
    let exe = format!("{tag}-vmm");
    let mut uuids = Vec::new();
    let mut vmms: Vec<Standin> = (0..INSTANCES)
        .map(|i| {
            let uuid = new_uuid(tag);
            let mut env = vec![("STANDIN_VCPUS", "1")];
            if i % 2 == 0 {
                env.push(("STANDIN_EXIT_WHEN", stop.to_str().unwrap()));
            }
            let vmm = Standin::spawn(&exe, &["--id", &uuid], &env);
            uuids.push(uuid);
            vmm
        })
        .collect();
    let ours: HashSet<String> = uuids.iter().cloned().collect();
    let all_listed = wait_for(Duration::from_secs(20), || {
        std::thread::sleep(Duration::from_millis(100));
        (listed(&collector, &ours) == INSTANCES).then_some(())
    });
    assert!(
        all_listed.is_some(),
        "{} of {INSTANCES} listed:\n{}",
        listed(&collector, &ours),
        collector.stderr()
    );
    let lost_execs = lost(&collector, "exec");
    assert!(lost_execs > 0.0, "the burst did not fill the ring");

    // End them together: half exit 0, half are killed.
    std::fs::write(&stop, b"").unwrap();
    for vmm in vmms.iter().skip(1).step_by(2) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(vmm.pid() as i32, libc::SIGKILL) };
    }
    for vmm in &mut vmms {
        vmm.wait();
    }
    let last_exit = Instant::now();
    let none_left = wait_for(Duration::from_secs(5), || {
        (listed(&collector, &ours) == 0).then_some(())
    });
    let waited = last_exit.elapsed();
    assert!(
        none_left.is_some(),
        "{} instances still listed 5 s after the last exit",
        listed(&collector, &ours)
    );

    let events: Vec<Value> = collector_tests::ndjson(&collector.get_text("/v1/events"));
    let mut by_instance: HashMap<&str, Vec<&Value>> = HashMap::new();
    for event in &events {
        let uuid = event["instance_uuid"].as_str().unwrap();
        if ours.contains(uuid) {
            by_instance.entry(uuid).or_default().push(event);
        }
    }
    let mut tally: HashMap<String, usize> = HashMap::new();
    for uuid in &uuids {
        let list = by_instance
            .get(uuid.as_str())
            .map_or(&[][..], Vec::as_slice);
        let of = |kinds: &[&str]| {
            list.iter()
                .filter(|e| kinds.contains(&e["event"].as_str().unwrap()))
                .count()
        };
        assert_eq!(of(&["start", "discovered"]), 1, "{uuid}: {list:#?}");
        assert_eq!(of(&["stop", "crash", "oom_kill"]), 1, "{uuid}: {list:#?}");
        assert_eq!(list.len(), 2, "{uuid}: {list:#?}");
        let end = list[1];
        assert_ne!(end["event"], "crash", "{end}");
        if end["reason"] == "unobserved_exit" {
            assert_eq!(end["exit_code"], Value::Null, "{end}");
        }
        for e in list {
            *tally
                .entry(format!(
                    "{}/{}",
                    e["event"].as_str().unwrap(),
                    e["reason"].as_str().unwrap()
                ))
                .or_default() += 1;
        }
    }
    let lost_exits = lost(&collector, "exit");
    let count = |what: &str| tally.get(what).copied().unwrap_or(0) as f64;
    // Each lost exec was made good by a rescan, each lost exit by a check of /proc.
    assert!(
        count("discovered/exec_record_lost") >= lost_execs,
        "{tally:?}"
    );
    assert!(count("stop/unobserved_exit") >= lost_exits, "{tally:?}");
    eprintln!(
        "{INSTANCES} instances, ring of 4096 bytes: {lost_execs} exec and {lost_exits} exit \
         records lost; events {tally:?}; none listed {waited:?} after the last exit"
    );
}

/// The default process ring takes a burst of 1000 execs (and their exits) with nobody reading:
/// the collector is stopped (SIGSTOP) while 1000 stand-ins exec and exit, then resumed; nothing
/// was lost, and each has its `start` and its `stop` with the exit status. Each was gone before
/// its exec record was read: none of their pids is brought back into the kernel's map (the next
/// pass of reconciliation finds no stale entry to remove).
#[test]
fn the_default_ring_takes_a_burst_of_a_thousand_execs() {
    const BURST: usize = 1000;
    let tag = "rc-ring";
    let collector = Collector::start_with_config(&format!(
        r#"
disable_builtin_matchers = ["firecracker", "qemu", "cloud-hypervisor"]

[console.files]

[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
"#
    ));
    let exe = format!("{tag}-vmm");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGSTOP) };
    let uuids: Vec<String> = (0..BURST)
        .map(|_| {
            let uuid = new_uuid(tag);
            let mut vmm = Standin::spawn(
                &exe,
                &["--id", &uuid],
                &[("STANDIN_VCPUS", "0"), ("STANDIN_RUN_MS", "0")],
            );
            vmm.wait();
            uuid
        })
        .collect();
    // SAFETY: as above.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGCONT) };
    let ours: HashSet<&str> = uuids.iter().map(String::as_str).collect();
    let events = wait_for(Duration::from_secs(30), || {
        let events: Vec<Value> = collector_tests::ndjson(&collector.get_text("/v1/events"))
            .into_iter()
            .filter(|e| ours.contains(e["instance_uuid"].as_str().unwrap_or_default()))
            .collect();
        (events.len() >= 2 * BURST).then_some(events)
    })
    .unwrap_or_else(|| panic!("not every event arrived:\n{}", collector.stderr()));
    assert_eq!(lost(&collector, "exec"), 0.0);
    assert_eq!(lost(&collector, "exit"), 0.0);
    let mut by_instance: HashMap<&str, Vec<(&str, &str)>> = HashMap::new();
    for e in &events {
        by_instance
            .entry(e["instance_uuid"].as_str().unwrap())
            .or_default()
            .push((e["event"].as_str().unwrap(), e["reason"].as_str().unwrap()));
    }
    for uuid in &uuids {
        assert_eq!(
            by_instance[uuid.as_str()],
            [("start", "exec"), ("stop", "exited")],
            "{uuid}"
        );
    }
    // A pass of reconciliation (every 2 s) sweeps the kernel's process map.
    std::thread::sleep(Duration::from_millis(2500));
    assert_eq!(
        collector.metric("collector_reconciled_total{fix=\"stale_kernel_entry\"}"),
        0.0,
        "an exited process's pid was put back into the kernel's map"
    );
}
