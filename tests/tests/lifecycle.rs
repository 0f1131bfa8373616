//! Lifecycle events, end to end: real processes end in every way a VMM can, the kernel reports
//! it, and each gives exactly one right event and moves the fleet counter by exactly one.
//!
//! Each test runs its own collector with its own matcher (executable name and `hypervisor`
//! label unique to the test), so counters are not moved by other tests' processes.

use std::time::Duration;

use collector_tests::{Collector, Standin, new_uuid, wait_for};
use serde_json::Value;

const WITHIN: Duration = Duration::from_secs(2);

/// A collector that matches executables named `<tag>-vmm` with `--id <uuid>` as hypervisor
/// `<tag>`.
fn collector_for(tag: &str) -> Collector {
    Collector::start_with_config(&format!(
        r#"
[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
"#
    ))
}

fn counter(collector: &Collector, tag: &str, event: &str) -> f64 {
    collector.metric(&format!(
        "compute_instance_lifecycle_events_total{{event=\"{event}\",hypervisor=\"{tag}\"}}"
    ))
}

/// Waits until `uuid` has an event that ends it, and returns all its events.
fn wait_ended(collector: &Collector, uuid: &str) -> Vec<Value> {
    wait_for(WITHIN, || {
        let events = collector.events_of(uuid)?;
        let last = events.last()?;
        (!matches!(last["event"].as_str(), Some("start" | "discovered"))).then_some(events)
    })
    .unwrap_or_else(|| {
        panic!(
            "no end event for {uuid}: {:?}\n{}",
            collector.events_of(uuid),
            collector.stderr()
        )
    })
}

/// Runs one stand-in to its end (by itself, or by `signal`) and checks its two events.
fn run_case(tag: &str, env: &[(&str, &str)], signal: Option<i32>) -> Value {
    let collector = collector_for(tag);
    let uuid = new_uuid(tag);
    let exe = format!("{tag}-vmm");
    let mut vmm = Standin::spawn(&exe, &["--id", &uuid], env);
    wait_for(WITHIN, || collector.instance(&uuid)).expect("instance listed");
    if let Some(signal) = signal {
        vmm.signal(signal);
    } else {
        vmm.wait();
    }
    let events = wait_ended(&collector, &uuid);
    assert_eq!(events.len(), 2, "exactly start + end: {events:#?}");
    assert_eq!(events[0]["event"], "start");
    assert_eq!(events[0]["reason"], "exec");
    let end = events[1].clone();
    assert_eq!(end["instance_uuid"], uuid.as_str());
    assert_eq!(end["hypervisor"], tag);
    assert_eq!(end["pid"], vmm.pid());
    assert!(end["uptime_seconds"].as_f64().unwrap() > 0.0, "{end}");
    assert!(end["ts"].as_str().unwrap().ends_with('Z'), "{end}");
    let kind = end["event"].as_str().unwrap();
    assert_eq!(counter(&collector, tag, "start"), 1.0);
    assert_eq!(counter(&collector, tag, kind), 1.0, "counter of {kind}");
    assert!(
        collector.instance(&uuid).is_none(),
        "still listed after its end"
    );
    end
}

#[test]
fn exit_zero_is_a_stop() {
    let end = run_case("lc-exit0", &[("STANDIN_RUN_MS", "200")], None);
    assert_eq!(end["event"], "stop");
    assert_eq!(end["reason"], "exited");
    assert_eq!(end["exit_code"], 0);
    assert_eq!(end["signal"], Value::Null);
}

#[test]
fn exit_three_is_a_crash() {
    let end = run_case(
        "lc-exit3",
        &[("STANDIN_RUN_MS", "200"), ("STANDIN_EXIT_CODE", "3")],
        None,
    );
    assert_eq!(end["event"], "crash");
    assert_eq!(end["reason"], "exit_code");
    assert_eq!(end["exit_code"], 3);
}

#[test]
fn sigsegv_is_a_crash_without_core() {
    let end = run_case(
        "lc-segv",
        &[("STANDIN_RUN_MS", "200"), ("STANDIN_CRASH", "segv")],
        None,
    );
    assert_eq!(end["event"], "crash");
    assert_eq!(end["reason"], "fatal_signal");
    assert_eq!(end["signal"], 11);
    assert_eq!(end["signal_name"], "SIGSEGV");
    assert_eq!(end["core_dumped"], false, "RLIMIT_CORE is 0: no dump");
    assert_eq!(end["exit_code"], Value::Null);
}

#[test]
fn sigabrt_with_core_dump() {
    let dir = tempfile::tempdir().unwrap();
    let end = run_case(
        "lc-abrt",
        &[
            ("STANDIN_RUN_MS", "200"),
            ("STANDIN_CRASH", "abort"),
            ("STANDIN_CORE_DIR", dir.path().to_str().unwrap()),
        ],
        None,
    );
    assert_eq!(end["event"], "crash");
    assert_eq!(end["signal_name"], "SIGABRT");
    // The kernel says it dumped core only if the dump was written (core_pattern permitting).
    let dumped = std::fs::read_dir(dir.path()).unwrap().next().is_some();
    assert_eq!(end["core_dumped"], dumped, "{end}");
}

#[test]
fn sigterm_is_a_stop() {
    let end = run_case("lc-term", &[], Some(libc::SIGTERM));
    assert_eq!(end["event"], "stop");
    assert_eq!(end["reason"], "terminated");
    assert_eq!(end["signal_name"], "SIGTERM");
}

#[test]
fn sigkill_without_oom_is_a_stop() {
    let end = run_case("lc-kill", &[], Some(libc::SIGKILL));
    assert_eq!(end["event"], "stop");
    assert_eq!(end["reason"], "killed");
    assert_eq!(end["signal"], 9);
    assert_eq!(end["oom"], Value::Null);
}

/// A VMM in a small v1 memory cgroup allocates past its limit: the kernel's OOM killer picks it,
/// the collector reports `oom_kill` with the kernel's counters and the constraining cgroup.
#[test]
fn oom_kill_in_a_memory_cgroup() {
    let name = format!("collector-test-oom-{}", std::process::id());
    let limit: u64 = 32 << 20;
    let cgroup = memory_cgroup(&name, limit);
    let end = run_case(
        "lc-oom",
        &[
            ("STANDIN_CGROUP", cgroup.to_str().unwrap()),
            ("STANDIN_TOUCH_MIB", "256"),
        ],
        None,
    );
    let _ = std::fs::remove_dir(&cgroup);
    assert_eq!(end["event"], "oom_kill", "{end:#}");
    assert_eq!(end["reason"], "oom_killer");
    assert_eq!(end["signal_name"], "SIGKILL");
    let oom = &end["oom"];
    assert_eq!(oom["constraint"], "memcg", "{oom:#}");
    assert_eq!(oom["memcg_path"], format!("/{name}"));
    assert_eq!(oom["memcg_limit_bytes"], limit);
    let anon = oom["anon_rss_bytes"]
        .as_u64()
        .expect("kernel counters on this kernel");
    assert!(
        anon > limit / 2 && anon <= limit + (4 << 20),
        "anon rss {anon} vs limit {limit}"
    );
    assert!(oom["total_vm_bytes"].as_u64().unwrap() >= anon);
}

/// A collector restarted (SIGTERM, then a new run on the same log folder) is not an event of
/// the instances: one that ran before keeps its `start` (read back from its events file) and
/// gets no `discovered`; the events file carries each event once.
#[test]
fn restart_keeps_the_record_and_files_keep_events() {
    let tag = "lc-restart";
    let collector = collector_for(tag);
    let uuid = new_uuid(tag);
    let mut vmm = Standin::spawn(&format!("{tag}-vmm"), &["--id", &uuid], &[]);
    wait_for(WITHIN, || collector.instance(&uuid)).expect("listed");
    let before = collector.events_of(&uuid).unwrap();
    let log_dir = collector.stop_keep_dir();

    let config = log_dir.path().join("collector.toml");
    let collector = Collector::start_in(log_dir, &["--config", config.to_str().unwrap()]);
    assert!(collector.instance(&uuid).is_some(), "listed again");
    let events = collector.events_of(&uuid).expect("events after restart");
    assert_eq!(events, before, "{events:#?}");
    assert_eq!(events[0]["event"], "start");
    assert_eq!(counter(&collector, tag, "start"), 0.0);
    assert_eq!(counter(&collector, tag, "discovered"), 0.0);

    vmm.signal(libc::SIGTERM);
    let events = wait_ended(&collector, &uuid);
    assert_eq!(events.len(), 2, "{events:#?}");
    assert!(events[1]["seq"].as_u64() > events[0]["seq"].as_u64());
    let file = collector.log_dir.path().join(&uuid).join("events.log");
    // The file writer follows the API by a moment (its own queue).
    let text = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(&file)
            .ok()
            .filter(|t| t.lines().count() >= 2)
    })
    .unwrap_or_else(|| std::fs::read_to_string(&file).expect("events file"));
    let kinds: Vec<String> = text
        .lines()
        .map(|l| {
            serde_json::from_str::<Value>(l).unwrap()["event"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    // The first collector wrote `start`, the second `stop`.
    assert_eq!(kinds, ["start", "stop"], "{text}");
}

/// A memory cgroup `name` limited to `limit` bytes: v1 under `/sys/fs/cgroup/memory` where the
/// kernel has the v1 memory controller (the CI host), else v2 under the cgroup2 root mounted at
/// `/sys/fs/cgroup` (kernels built without `MEMCG_V1`, such as Debian's 6.12). Either way its
/// path in its hierarchy is `/name`.
fn memory_cgroup(name: &str, limit: u64) -> std::path::PathBuf {
    let v1 = std::path::Path::new("/sys/fs/cgroup/memory");
    let v2 = std::path::Path::new("/sys/fs/cgroup");
    let (cgroup, limit_file) = if v1.join("memory.limit_in_bytes").exists() {
        (v1.join(name), "memory.limit_in_bytes")
    } else {
        let controllers = std::fs::read_to_string(v2.join("cgroup.subtree_control"))
            .expect("a v1 memory hierarchy or a cgroup2 root at /sys/fs/cgroup");
        assert!(
            controllers.split_whitespace().any(|c| c == "memory"),
            "the cgroup2 root does not enable memory for its children: {controllers}"
        );
        (v2.join(name), "memory.max")
    };
    std::fs::create_dir_all(&cgroup).expect("create the memory cgroup");
    std::fs::write(cgroup.join(limit_file), limit.to_string()).unwrap();
    cgroup
}

/// An OOM kill right after the exec, racing userspace's handling of the exec record: each VMM
/// joins its memory cgroup before it execs and allocates first thing; whichever way the race
/// goes, each is `oom_kill`.
#[test]
fn oom_kill_right_after_exec() {
    let tag = "lc-oomrace";
    // Run the stand-in once before: the shell below cannot retry an exec that finds the fresh
    // copy busy (see `Standin::spawn_in`).
    Standin::spawn(&format!("{tag}-vmm"), &[], &[("STANDIN_RUN_MS", "0")]).wait();
    let collector = collector_for(tag);
    let limit: u64 = 16 << 20;
    let exe = collector_tests::standin_path(&format!("{tag}-vmm"));
    let runs: Vec<(String, std::path::PathBuf, Standin)> = (0..3)
        .map(|i| {
            let name = format!("collector-test-oomrace-{}-{i}", std::process::id());
            let cgroup = memory_cgroup(&name, limit);
            let uuid = new_uuid(tag);
            // The shell joins the cgroup, then becomes the VMM: in it from its first instruction.
            let child = std::process::Command::new("sh")
                .args([
                    "-c",
                    r#"echo $$ > "$1/cgroup.procs" && exec "$2" --id "$3""#,
                    "sh",
                    cgroup.to_str().unwrap(),
                    exe.to_str().unwrap(),
                    &uuid,
                ])
                .envs([("STANDIN_TOUCH_FIRST", "1"), ("STANDIN_TOUCH_MIB", "256")])
                .stdout(std::process::Stdio::null())
                .stderr(std::process::Stdio::null())
                .spawn()
                .unwrap();
            (uuid, cgroup, Standin { child })
        })
        .collect();
    for (uuid, cgroup, mut vmm) in runs {
        vmm.wait();
        let events = wait_ended(&collector, &uuid);
        let _ = std::fs::remove_dir(&cgroup);
        assert_eq!(events.len(), 2, "{events:#?}");
        assert_eq!(events[0]["event"], "start");
        let end = &events[1];
        assert_eq!(end["event"], "oom_kill", "{end:#}");
        assert_eq!(end["reason"], "oom_killer");
        assert_eq!(end["signal_name"], "SIGKILL");
        assert_eq!(end["oom"]["constraint"], "memcg", "{end:#}");
    }
    assert_eq!(counter(&collector, tag, "oom_kill"), 3.0);
}

/// A VMM thread ending is not the instance ending: no event until the process goes.
#[test]
fn thread_exit_gives_no_event() {
    let tag = "lc-thread";
    let collector = collector_for(tag);
    let uuid = new_uuid(tag);
    let _vmm = Standin::spawn(
        &format!("{tag}-vmm"),
        &["--id", &uuid],
        &[("STANDIN_THREAD_EXIT", "1"), ("STANDIN_VCPUS", "3")],
    );
    wait_for(WITHIN, || collector.instance(&uuid)).expect("listed");
    std::thread::sleep(Duration::from_millis(300));
    let events = collector.events_of(&uuid).unwrap();
    assert_eq!(events.len(), 1, "{events:#?}");
    assert_eq!(counter(&collector, tag, "stop"), 0.0);
    assert_eq!(counter(&collector, tag, "crash"), 0.0);
}

/// `/v1/events?follow=true` streams events as they happen, and `collector events` prints them.
#[test]
fn follow_stream_and_cli() {
    use std::io::{BufRead, BufReader, Write};
    let tag = "lc-follow";
    let collector = collector_for(tag);
    let uuid = new_uuid(tag);
    let mut stream = std::net::TcpStream::connect(&collector.addr).unwrap();
    write!(
        stream,
        "GET /v1/events?follow=true&instance={uuid} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    )
    .unwrap();
    stream
        .set_read_timeout(Some(collector_tests::scaled(Duration::from_secs(5))))
        .unwrap();
    let mut reader = BufReader::new(stream);

    let mut vmm = Standin::spawn(&format!("{tag}-vmm"), &["--id", &uuid], &[]);
    wait_for(WITHIN, || collector.instance(&uuid)).expect("listed");
    vmm.signal(libc::SIGKILL);

    // Chunked encoding: JSON lines among chunk-size lines.
    let mut seen = Vec::new();
    let mut line = String::new();
    while seen.len() < 2 {
        line.clear();
        assert!(
            reader.read_line(&mut line).unwrap() > 0,
            "stream ended early: {seen:?}"
        );
        // Chunk-size lines ("5e") are not JSON objects; event records are.
        if let Ok(event) = serde_json::from_str::<Value>(line.trim())
            && let Some(kind) = event["event"].as_str()
        {
            seen.push(kind.to_owned());
        }
    }
    assert_eq!(seen, ["start", "stop"]);

    let out = std::process::Command::new(collector_tests::collector_bin())
        .args(["events", "--addr", &collector.addr, "--instance", &uuid])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let text = String::from_utf8(out.stdout).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    assert!(
        lines[0].contains(&uuid) && lines[0].contains("start"),
        "{text}"
    );
    assert!(
        lines[1].contains("stop") && lines[1].contains("signal=SIGKILL"),
        "{text}"
    );
}
