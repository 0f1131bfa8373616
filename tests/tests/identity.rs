//! Identity joined to instances: a real collector with stand-in VMMs, and the Pods that back
//! them from the fake Kubernetes API server (collector_tests::kube_api) through the real
//! kube-rs client. Identity on the info series, `/v1/instances`, the events API and the events
//! files within 1 s of the Pod's arrival (both containerID forms); `create` and `terminate`
//! exactly once each, across a watch cut (410 and relist) and a collector crash and restart;
//! an instance scaled to zero listed as created and not running. Needs root (BPF).

use std::time::{Duration, Instant};

use collector_tests::{
    Collector, Standin,
    kube_api::{FakeKube, FakePod},
    ndjson, new_uuid, sample, wait_for,
};
use serde_json::{Value, json};

const NODE: &str = "n1";
const PROJECT: &str = "resourcemanager.miloapis.com/project-name";
const UPSTREAM_NS: &str = "meta.datumapis.com/upstream-namespace";
/// The Pod's arrival to every output: the issue's bound.
const ARRIVAL: Duration = Duration::from_secs(1);
const WITHIN: Duration = Duration::from_secs(10);

/// A collector for node n1, matching executables `<tag>-vmm --id <uuid>` as hypervisor
/// `<tag>`, its Kubernetes source pointed at `fake`.
fn start(fake: &FakeKube, tag: &str, log_dir: tempfile::TempDir) -> Collector {
    launch(fake, tag, log_dir, true, "")
}

/// [`start`], waiting for `/readyz` only when `wait_ready`, with `extra` in its config file.
fn launch(
    fake: &FakeKube,
    tag: &str,
    log_dir: tempfile::TempDir,
    wait_ready: bool,
    extra: &str,
) -> Collector {
    let config = log_dir.path().join("collector.toml");
    std::fs::write(
        &config,
        format!(
            r#"{extra}
[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
"#
        ),
    )
    .unwrap();
    let kubeconfig = fake.kubeconfig();
    let args = [
        "--config",
        config.to_str().unwrap(),
        "--node-name",
        NODE,
        "--log-format",
        "json",
    ];
    let env = [("KUBECONFIG", kubeconfig.to_str().unwrap())];
    if wait_ready {
        Collector::start_in_env(log_dir, &args, &env)
    } else {
        Collector::start_unready(log_dir, &args, &env)
    }
}

/// Waits until the collector's source listed the Pods and watches: a Pod created from now on
/// is added while the collector watches (`create` reason `pod_added`, not `pod_listed`).
fn wait_watching(fake: &FakeKube) {
    wait_for(WITHIN, || {
        (fake.counts().requests("watch pods") >= 1).then_some(())
    })
    .expect("the collector watches Pods");
}

fn pod(name: &str, container_id: &str) -> FakePod {
    FakePod::unikraft(
        "ns-a",
        name,
        &format!("kraftlet-{NODE}"),
        Some(container_id),
    )
}

fn fake_with_namespace() -> FakeKube {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[(PROJECT, "proj-a"), (UPSTREAM_NS, "default")]);
    fake
}

/// The identity object of `pod`'s instance, as every output shows it.
fn identity(pod: &str) -> Value {
    json!({"project": "proj-a", "instance_name": format!("{pod}-instance"),
           "instance_namespace": "default", "workload": "web",
           "pod": pod, "pod_namespace": "ns-a", "node": NODE})
}

/// `compute_instance_info` of `uuid` with its identity labels, exactly as exposed.
fn info_series(uuid: &str, hypervisor: &str, pod: &str) -> String {
    format!(
        "compute_instance_info{{instance_uuid=\"{uuid}\",hypervisor=\"{hypervisor}\",\
         project=\"proj-a\",instance_name=\"{pod}-instance\",instance_namespace=\"default\",\
         workload=\"web\"}}"
    )
}

fn counter(collector: &Collector, event: &str, hypervisor: &str) -> f64 {
    collector.metric(&format!(
        "compute_instance_lifecycle_events_total{{event=\"{event}\",hypervisor=\"{hypervisor}\"}}"
    ))
}

fn kinds(events: &[Value]) -> Vec<&str> {
    events
        .iter()
        .map(|e| e["event"].as_str().unwrap())
        .collect()
}

/// `uuid`'s events, once `done` holds of them (within 10 s).
fn events_until(collector: &Collector, uuid: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    wait_for(WITHIN, || collector.events_of(uuid).filter(|e| done(e))).unwrap_or_else(|| {
        panic!(
            "events of {uuid}: {:?}\n{}",
            collector.events_of(uuid),
            collector.stderr()
        )
    })
}

/// The events `<log-dir>/<uuid>/events.log` holds.
fn events_file(collector: &Collector, uuid: &str) -> Vec<Value> {
    ndjson(
        &std::fs::read_to_string(collector.log_dir.path().join(uuid).join("events.log"))
            .unwrap_or_default(),
    )
}

#[test]
fn identity_reaches_every_output_within_a_second_of_the_pod_with_either_container_id_form() {
    let tag = "id-join";
    let exe = format!("{tag}-vmm");
    let fake = fake_with_namespace();
    let collector = start(&fake, tag, tempfile::tempdir().unwrap());
    wait_watching(&fake);
    let (u1, u2) = (new_uuid(tag), new_uuid(tag));
    let mut vmm1 = Standin::spawn(&exe, &["--id", &u1], &[]);
    let _vmm2 = Standin::spawn(&exe, &["--id", &u2], &[]);
    for uuid in [&u1, &u2] {
        wait_for(WITHIN, || collector.instance(uuid)).expect("instance listed");
    }
    // No Pod yet: running, identity null, the info series without identity labels.
    let before = collector.instance(&u1).unwrap();
    assert_eq!(
        (&before["state"], &before["identity"]),
        (&json!("running"), &Value::Null)
    );
    let bare = format!("compute_instance_info{{instance_uuid=\"{u1}\",hypervisor=\"{tag}\"}}");
    assert_eq!(sample(&collector.get_text("/metrics"), &bare), Some(1.0));

    // The Pods arrive: with the scheme and without.
    let arrived = Instant::now();
    fake.create_pod(&pod("web-0", &format!("ukp://{u1}")));
    fake.create_pod(&pod("web-1", &u2));
    for (uuid, name) in [(&u1, "web-0"), (&u2, "web-1")] {
        // Both within 1 s of their Pods' arrival, not one after the other.
        let named = wait_for(ARRIVAL.saturating_sub(arrived.elapsed()), || {
            let metrics = collector.get_text("/metrics");
            let instance = collector.instance(uuid)?;
            let events = collector.events_of(uuid)?;
            (instance["identity"] == identity(name)
                && sample(&metrics, &info_series(uuid, tag, name)) == Some(1.0)
                && kinds(&events).contains(&"create"))
            .then_some(events)
        });
        let events = named.unwrap_or_else(|| {
            panic!(
                "{uuid}: identity not on every output within {ARRIVAL:?}: {:?} {:?}\n{}",
                collector.instance(uuid),
                collector.events_of(uuid),
                collector.stderr()
            )
        });
        eprintln!(
            "{name}: identity on the info series, /v1/instances and the events {} ms after the Pod",
            arrived.elapsed().as_millis()
        );
        assert_eq!(kinds(&events), ["start", "create"], "{events:#?}");
        assert_eq!(events[0]["identity"], Value::Null, "started before its Pod");
        let create = &events[1];
        assert_eq!(create["identity"], identity(name));
        assert_eq!(
            (&create["hypervisor"], &create["pid"], &create["reason"]),
            (&json!(tag), &Value::Null, &json!("pod_added"))
        );
        // The file has it too, as the API does.
        let file = wait_for(ARRIVAL, || {
            let file = events_file(&collector, uuid);
            (file.len() == 2).then_some(file)
        })
        .expect("events.log");
        assert_eq!(file[1], *create);
    }
    let metrics = collector.get_text("/metrics");
    // The info series replaced, not doubled; usage series keep only the join key.
    assert_eq!(sample(&metrics, &bare), None);
    assert!(
        metrics.contains(&format!(
            "compute_instance_start_time_seconds{{instance_uuid=\"{u1}\"}} "
        )),
        "{metrics}"
    );

    // The VMM stops: its stop names it; the instance stays, created and not running.
    vmm1.signal(libc::SIGTERM);
    let events = events_until(&collector, &u1, |e| e.len() == 3);
    assert_eq!(kinds(&events), ["start", "create", "stop"]);
    assert_eq!(events[2]["identity"], identity("web-0"));
    let created = wait_for(WITHIN, || {
        collector.instance(&u1).filter(|i| i["state"] == "created")
    })
    .expect("listed as created");
    assert_eq!(
        (
            &created["pid"],
            &created["hypervisor"],
            &created["identity"]
        ),
        (&Value::Null, &json!(tag), &identity("web-0"))
    );
    assert_eq!(
        sample(
            &collector.get_text("/metrics"),
            &info_series(&u1, tag, "web-0")
        ),
        Some(1.0),
        "still on the host, by its Pod"
    );

    // The Pod goes: terminate, once, with the identity it had; the instance is gone.
    fake.delete_pod("ns-a", "web-0");
    let events = events_until(&collector, &u1, |e| e.len() == 4);
    assert_eq!(kinds(&events), ["start", "create", "stop", "terminate"]);
    assert_eq!(events[3]["identity"], identity("web-0"));
    assert_eq!(events[3]["reason"], "pod_deleted");
    wait_for(WITHIN, || collector.instance(&u1).is_none().then_some(())).expect("unlisted");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(collector.events_of(&u1).unwrap().len(), 4, "nothing more");
    assert_eq!(counter(&collector, "create", tag), 2.0);
    assert_eq!(counter(&collector, "terminate", tag), 1.0);
    assert_eq!(counter(&collector, "create", "unknown"), 0.0);
    // Per instance, every kind (the join for per-project rates); kept after it is gone.
    let metrics = collector.get_text("/metrics");
    for (event, count) in [
        ("create", 1.0),
        ("start", 1.0),
        ("stop", 1.0),
        ("terminate", 1.0),
        ("crash", 0.0),
        ("oom_kill", 0.0),
    ] {
        let series =
            format!("compute_instance_events_total{{instance_uuid=\"{u1}\",event=\"{event}\"}}");
        assert_eq!(
            sample(&metrics, &series),
            Some(count),
            "{series}\n{metrics}"
        );
    }
    // The log line of each event names the project with the convention's keys, and the whole
    // log passes the convention's checker.
    let stderr = collector.stderr();
    let terminate: Value = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .find(|l| l["event"] == "terminate" && l["instance_uuid"] == u1.as_str())
        .unwrap_or_else(|| panic!("no terminate log line:\n{stderr}"));
    assert_eq!(
        (
            &terminate["project"],
            &terminate["instance_name"],
            &terminate["instance_namespace"]
        ),
        (
            &json!("proj-a"),
            &json!("web-0-instance"),
            &json!("default")
        )
    );
    let mut check = std::process::Command::new(collector_tests::collector_bin())
        .args(["check-logs", "-"])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(&mut check.stdin.take().unwrap(), stderr.as_bytes()).unwrap();
    let checked = check.wait_with_output().unwrap();
    assert!(
        checked.status.success(),
        "{}",
        String::from_utf8_lossy(&checked.stdout)
    );
}

#[test]
fn scaled_to_zero_is_created_and_a_pod_deleted_during_a_watch_cut_terminates_after_relist() {
    let tag = "id-zero";
    let fake = fake_with_namespace();
    // There before the collector: created at its first list, as such.
    let before = new_uuid(tag);
    fake.create_pod(&pod("web-9", &before));
    let collector = start(&fake, tag, tempfile::tempdir().unwrap());
    wait_watching(&fake);
    let listed = events_until(&collector, &before, |e| !e.is_empty());
    assert_eq!(
        (kinds(&listed), &listed[0]["reason"]),
        (vec!["create"], &json!("pod_listed"))
    );
    let (u1, u2) = (new_uuid(tag), new_uuid(tag));
    // Pods, and no VMM at all.
    fake.create_pod(&pod("web-0", &format!("ukp://{u1}")));
    fake.create_pod(&pod("web-1", &u2));
    let listed = wait_for(WITHIN, || collector.instance(&u1)).expect("listed");
    assert_eq!(
        listed,
        json!({"instance_uuid": u1, "state": "created", "hypervisor": null, "pid": null,
               "start_time": null, "origin": null, "executable": null, "vcpu_threads": [],
               "instance_dir": null, "identity": identity("web-0")})
    );
    let metrics = collector.get_text("/metrics");
    assert_eq!(
        sample(&metrics, &info_series(&u1, "unknown", "web-0")),
        Some(1.0),
        "{metrics}"
    );
    assert!(!metrics.contains(&format!(
        "compute_instance_start_time_seconds{{instance_uuid=\"{u1}\"}}"
    )));
    let events = events_until(&collector, &u1, |e| !e.is_empty());
    assert_eq!(kinds(&events), ["create"]);
    assert_eq!(
        (&events[0]["hypervisor"], &events[0]["pid"]),
        (&json!("unknown"), &Value::Null)
    );
    wait_for(WITHIN, || collector.events_of(&u2)).expect("u2 created");
    assert_eq!(
        counter(&collector, "create", "unknown"),
        3.0,
        "web-0, web-1, web-9"
    );

    // The watch is cut; web-0 is deleted meanwhile and the history compacted (410 Gone): the
    // relist finds it missing, and it terminates once.
    let lists = fake.counts().requests("list pods");
    fake.cut();
    fake.delete_pod("ns-a", "web-0");
    fake.compact();
    std::thread::sleep(Duration::from_millis(500));
    fake.restore();
    let events = events_until(&collector, &u1, |e| e.len() == 2);
    assert_eq!(kinds(&events), ["create", "terminate"]);
    assert_eq!(events[1]["identity"], identity("web-0"));
    assert!(fake.counts().expired >= 1, "the watch got 410 Gone");
    assert_eq!(fake.counts().requests("list pods"), lists + 1);
    wait_for(WITHIN, || collector.instance(&u1).is_none().then_some(())).expect("unlisted");
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(
        kinds(&collector.events_of(&u1).unwrap()),
        ["create", "terminate"]
    );
    assert_eq!(
        kinds(&collector.events_of(&u2).unwrap()),
        ["create"],
        "the relist did not create web-1 again"
    );
    assert_eq!(counter(&collector, "terminate", "unknown"), 1.0);
    // A VMM of the created instance starts: running, named, no second create.
    let _vmm = Standin::spawn(&format!("{tag}-vmm"), &["--id", &u2], &[]);
    let running = wait_for(WITHIN, || {
        collector.instance(&u2).filter(|i| i["state"] == "running")
    })
    .expect("running");
    assert_eq!(running["identity"], identity("web-1"));
    let events = events_until(&collector, &u2, |e| e.len() == 2);
    assert_eq!(kinds(&events), ["create", "start"]);
    assert_eq!(events[1]["identity"], identity("web-1"));
    // Its workload label changes: renamed on the info series and the API within 1 s, no event;
    // its hypervisor is now the VMM's.
    fake.set_pod_labels(
        "ns-a",
        "web-1",
        &[
            ("managed-by", "infra-provider-unikraft"),
            ("upstream.instance", "web-1-instance"),
            ("compute.datumapis.com/workload-name", "api"),
        ],
    );
    let renamed = info_series(&u2, tag, "web-1").replace("workload=\"web\"", "workload=\"api\"");
    wait_for(ARRIVAL, || {
        (sample(&collector.get_text("/metrics"), &renamed) == Some(1.0)
            && collector.instance(&u2)?["identity"]["workload"] == "api")
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not renamed: {}", collector.get_text("/metrics")));
    let metrics = collector.get_text("/metrics");
    let info: Vec<&str> = metrics
        .lines()
        .filter(|l| l.starts_with("compute_instance_info{") && l.contains(&u2))
        .collect();
    assert_eq!(info.len(), 1, "one info series: {info:#?}");
    assert_eq!(
        collector.events_of(&u2).unwrap().len(),
        2,
        "a rename is no event"
    );
}

#[test]
fn a_restart_keeps_identity_attributes_a_pod_deleted_while_down_and_does_not_create_again() {
    let tag = "id-restart";
    let fake = fake_with_namespace();
    let collector = start(&fake, tag, tempfile::tempdir().unwrap());
    wait_watching(&fake);
    let (running, idle) = (new_uuid(tag), new_uuid(tag));
    let _vmm = Standin::spawn(&format!("{tag}-vmm"), &["--id", &running], &[]);
    fake.create_pod(&pod("web-0", &running));
    fake.create_pod(&pod("web-1", &format!("ukp://{idle}")));
    events_until(&collector, &running, |e| kinds(e) == ["start", "create"]);
    events_until(&collector, &idle, |e| kinds(e) == ["create"]);
    for (uuid, written) in [(&running, 2), (&idle, 1)] {
        wait_for(WITHIN, || {
            (events_file(&collector, uuid).len() == written).then_some(())
        })
        .expect("events files written");
    }

    // A crash (no shutdown of its own): the events files have the creates even if the state
    // file was not written since. web-1 is deleted while the collector is down.
    let log_dir = collector.kill_keep_dir();
    fake.delete_pod("ns-a", "web-1");
    let collector = start(&fake, tag, log_dir);

    // The running instance is named at once (from the state), before the source's first list.
    let named = collector.instance(&running).expect("listed");
    assert_eq!(named["identity"], identity("web-0"), "{named}");
    // web-1's Pod went while down: terminated, once, attributed with the identity it had.
    let events = events_until(&collector, &idle, |e| e.len() == 2);
    assert_eq!(kinds(&events), ["create", "terminate"]);
    assert_eq!(events[1]["identity"], identity("web-1"));
    assert_eq!(events[1]["hypervisor"], "unknown");
    wait_for(WITHIN, || collector.instance(&idle).is_none().then_some(())).expect("unlisted");
    // Neither is created again, in this run or on record.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(counter(&collector, "create", tag), 0.0);
    assert_eq!(counter(&collector, "create", "unknown"), 0.0);
    assert_eq!(counter(&collector, "terminate", "unknown"), 1.0);
    assert_eq!(
        kinds(&collector.events_of(&running).unwrap()),
        ["start", "create"]
    );
    let file = events_file(&collector, &running);
    assert_eq!(kinds(&file), ["start", "create"], "{file:#?}");
    assert_eq!(
        sample(
            &collector.get_text("/metrics"),
            &info_series(&running, tag, "web-0")
        ),
        Some(1.0)
    );

    // A clean restart: the state file alone (written at shutdown) carries it the same way.
    let log_dir = collector.stop_keep_dir();
    let state: Value = serde_json::from_str(
        &std::fs::read_to_string(log_dir.path().join(".collector-state.json")).unwrap(),
    )
    .unwrap();
    let pods = state["pods"].as_array().unwrap();
    assert_eq!(pods.len(), 1, "{state:#}");
    assert_eq!(pods[0]["instance_uuid"], running.as_str());
    assert_eq!(pods[0]["identity"], identity("web-0"));
    let collector = start(&fake, tag, log_dir);
    assert_eq!(
        collector.instance(&running).expect("listed")["identity"],
        identity("web-0")
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(counter(&collector, "create", tag), 0.0);
    assert_eq!(
        kinds(&collector.events_of(&running).unwrap()),
        ["start", "create"]
    );
}

#[test]
fn not_ready_until_the_first_list_of_this_nodes_pods_is_in() {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[]);
    fake.create_pod(&pod("web-0", &format!("ukp://{}", new_uuid("ready"))));
    // The API server is down when the collector starts: it runs, but is not ready.
    fake.cut();
    let collector = launch(&fake, "ready-vmm", tempfile::tempdir().unwrap(), false, "");
    let unready = wait_for(WITHIN, || {
        collector.get_status("/readyz")?;
        let ready: Value = serde_json::from_str(&collector.get_text_any("/readyz")).ok()?;
        (ready["identities_synced"] == false).then_some(ready)
    })
    .expect("/readyz says the list is missing");
    assert_eq!(unready["ready"], false, "{unready}");
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(
        collector.get_status("/readyz"),
        Some(503),
        "held while down"
    );
    fake.restore();
    wait_for(WITHIN, || {
        (collector.get_status("/readyz") == Some(200)).then_some(())
    })
    .expect("ready once the list is in");
    let ready: Value = serde_json::from_str(&collector.get_text("/readyz")).unwrap();
    assert_eq!(ready["identities_synced"], true, "{ready}");
    assert_eq!(ready["ready"], true, "{ready}");
}

/// Whether every record carries `want` as its identity.
fn all_named(records: &[Value], want: &Value) -> bool {
    !records.is_empty() && records.iter().all(|r| r["identity"] == *want)
}

/// `(stream, seq)` of each record, in order.
fn numbering(records: &[Value]) -> Vec<(String, u64)> {
    records
        .iter()
        .map(|r| {
            (
                r["stream"].as_str().unwrap().to_owned(),
                r["seq"].as_u64().unwrap(),
            )
        })
        .collect()
}

#[test]
fn console_lines_wait_for_identity_and_keep_it_once_the_pod_and_vmm_are_gone() {
    let tag = "id-console";
    let exe = format!("{tag}-vmm");
    let fake = fake_with_namespace();
    let collector = start(&fake, tag, tempfile::tempdir().unwrap());
    wait_watching(&fake);
    let uuid = new_uuid(tag);
    let more = collector.log_dir.path().join("more");
    let mut vmm = Standin::spawn(
        &exe,
        &["--id", &uuid],
        &[
            ("STANDIN_LINES", "3"),
            ("STANDIN_MORE_WHEN", more.to_str().unwrap()),
        ],
    );
    wait_for(WITHIN, || collector.instance(&uuid)).expect("instance listed");
    // Captured before the Pod is known: the API serves them (unnamed); the file holds them back.
    let served = wait_for(WITHIN, || {
        let lines = collector.logs(&uuid, "");
        (lines.len() == 6).then_some(lines)
    })
    .unwrap_or_else(|| panic!("lines: {:?}", collector.logs(&uuid, "")));
    assert!(
        served.iter().all(|r| r.get("identity").is_none()),
        "{served:#?}"
    );
    wait_for(WITHIN, || {
        let metrics = collector.get_text("/metrics");
        (sample(&metrics, "collector_console_identity_held_lines") == Some(6.0)).then_some(())
    })
    .expect("six lines held for identity");
    assert!(collector.metric("collector_console_identity_held_bytes") > 0.0);
    assert!(collector.log_file(&uuid).is_empty(), "written before named");

    // The Pod arrives: within 1 s every line, held or served, carries its identity.
    let arrived = Instant::now();
    fake.create_pod(&pod("web-0", &format!("ukp://{uuid}")));
    let want = identity("web-0");
    let (api, file) = wait_for(ARRIVAL, || {
        let (api, file) = (collector.logs(&uuid, ""), collector.log_file(&uuid));
        (api.len() == 6 && all_named(&api, &want) && file.len() == 6 && all_named(&file, &want))
            .then_some((api, file))
    })
    .unwrap_or_else(|| {
        panic!(
            "not named within {ARRIVAL:?}: api {:?}\nfile {:?}\n{}",
            collector.logs(&uuid, ""),
            collector.log_file(&uuid),
            collector.stderr()
        )
    });
    eprintln!(
        "held lines written with identity {} ms after the Pod",
        arrived.elapsed().as_millis()
    );
    // The file has them in the order captured, as the API does.
    assert_eq!(numbering(&file), numbering(&api));
    assert_eq!(
        collector.metric("collector_console_identity_held_lines"),
        0.0
    );
    // Later lines go out named at once.
    std::fs::write(&more, b"").unwrap();
    let file = wait_for(WITHIN, || {
        let file = collector.log_file(&uuid);
        (file.len() == 12).then_some(file)
    })
    .expect("twelve lines in the file");
    assert!(all_named(&file, &want), "{file:#?}");
    assert!(file[6..].iter().any(|r| r["message"] == "stdout more 3"));
    assert_eq!(
        collector.metric("collector_console_lines_without_identity_total"),
        0.0
    );

    // The Pod goes, then the VMM: the instance is gone, its lines still read with its identity.
    fake.delete_pod("ns-a", "web-0");
    events_until(&collector, &uuid, |e| kinds(e).contains(&"terminate"));
    vmm.signal(libc::SIGTERM);
    events_until(&collector, &uuid, |e| kinds(e).contains(&"stop"));
    wait_for(WITHIN, || collector.instance(&uuid).is_none().then_some(())).expect("unlisted");
    let after = collector.logs(&uuid, "");
    assert_eq!(after.len(), 12);
    assert!(all_named(&after, &want), "{after:#?}");

    // Across a restart the identity stays: the state file keeps the departed instance's.
    let dir = collector.stop_keep_dir();
    let departed = |dir: &std::path::Path| -> Option<Value> {
        let text = std::fs::read_to_string(dir.join(".collector-state.json")).ok()?;
        let state: Value = serde_json::from_str(&text).ok()?;
        state["departed"]
            .as_array()?
            .iter()
            .find(|d| d["instance_uuid"] == uuid.as_str())
            .map(|d| d["identity"].clone())
    };
    assert_eq!(departed(dir.path()), Some(want.clone()));
    std::fs::remove_file(dir.path().join(".collector-state.json")).unwrap();
    let collector = start(&fake, tag, dir);
    // Rewritten by the new run from what it restored (the events files hold the terminate too).
    let kept = wait_for(WITHIN, || departed(collector.log_dir.path()));
    assert_eq!(kept, Some(want), "{}", collector.stderr());
}

#[test]
fn lines_no_pod_names_in_time_are_written_without_identity_and_counted() {
    let tag = "id-unnamed";
    let fake = fake_with_namespace();
    let collector = launch(
        &fake,
        tag,
        tempfile::tempdir().unwrap(),
        true,
        "[kubernetes]\nidentity_wait_seconds = 3\n",
    );
    wait_watching(&fake);
    let uuid = new_uuid(tag);
    let _vmm = Standin::spawn(
        &format!("{tag}-vmm"),
        &["--id", &uuid],
        &[("STANDIN_LINES", "4")],
    );
    wait_for(WITHIN, || collector.instance(&uuid)).expect("instance listed");
    wait_for(WITHIN, || {
        (collector.logs(&uuid, "").len() == 8).then_some(())
    })
    .expect("eight lines captured");
    assert!(collector.log_file(&uuid).is_empty(), "held within the wait");
    let file = wait_for(WITHIN, || {
        let file = collector.log_file(&uuid);
        (file.len() == 8).then_some(file)
    })
    .expect("written after the wait");
    assert!(
        file.iter().all(|r| r.get("identity").is_none()),
        "{file:#?}"
    );
    assert_eq!(
        collector.metric("collector_console_lines_without_identity_total"),
        8.0
    );
    assert_eq!(
        collector.metric("collector_console_identity_held_lines"),
        0.0
    );
}
