//! OTLP export end to end: the real collector with stand-in VMMs exports their console lines
//! and lifecycle events to the in-process receiver (collector_tests::otlp_receiver, decoding
//! with the official protocol types), over OTLP/HTTP and OTLP/gRPC. Every line arrives once,
//! in order per stream, with the fleet's resource attributes; records without identity are not
//! sent and are counted; after each fault (503 with Retry-After, 429, 400, a connection reset,
//! a partial success, the receiver down 10 s, a kill -9 of the collector mid-export) every line
//! arrives, duplicates only with the same `log.record.uid`; past the queue bound, files
//! rotated away unread are counted exactly. Needs root (BPF).

use std::{
    collections::{BTreeMap, BTreeSet},
    time::Duration,
};

use collector_tests::{
    Collector, Standin,
    kube_api::{FakeKube, FakePod},
    new_uuid,
    otlp_receiver::{Fault, OtlpReceiver, Received},
    wait_for,
};

const NODE: &str = "n1";
const PROJECT: &str = "resourcemanager.miloapis.com/project-name";
const UPSTREAM_NS: &str = "meta.datumapis.com/upstream-namespace";
const WITHIN: Duration = Duration::from_secs(20);

/// The `[export.otlp]` table for `receiver`, quick to batch and retry, with `extra` keys.
fn export_config(receiver: &OtlpReceiver, extra: &str) -> String {
    format!(
        r#"
[export.otlp]
endpoint = "{}"
protocol = "{}"
batch_timeout_ms = 50
retry_initial_ms = 50
retry_max_ms = 1000
poll_ms = 50
{extra}
"#,
        receiver.endpoint(),
        receiver.protocol()
    )
}

/// The matcher of this test's stand-ins only (`<tag>-vmm --id <uuid>`, at most 15 bytes: a
/// process name): the built-ins are off, so VMMs of tests running beside it are not this collector's (the counters are exact).
fn matcher(tag: &str) -> String {
    format!(
        r#"
disable_builtin_matchers = ["firecracker", "qemu", "cloud-hypervisor"]
[[matcher]]
name = "{tag}"
executable = "{tag}-vmm"
instance_id = '--id (\S+)'
vcpu_thread = '^fc_vcpu (\d+)$'
[console.files]
"#
    )
}

/// A stand-in VMM of test `tag` for instance `uuid`.
fn vmm(tag: &str, uuid: &str, env: &[(&str, &str)]) -> Standin {
    Standin::spawn(&format!("{tag}-vmm"), &["--id", uuid], env)
}

/// A collector for node n1 following test `tag`'s stand-ins, exporting to `receiver` (with
/// `export` keys added to `[export.otlp]`, and the tables `other`); its Kubernetes source on
/// `kube` if given (then `require_identity` defaults to on), else off (a bare host).
fn start(
    tag: &str,
    receiver: &OtlpReceiver,
    kube: Option<&FakeKube>,
    export: &str,
    other: &str,
    log_dir: tempfile::TempDir,
) -> Collector {
    let path = log_dir.path().join("collector.toml");
    std::fs::write(
        &path,
        format!(
            "{}\n{}\n{other}",
            matcher(tag),
            export_config(receiver, export)
        ),
    )
    .unwrap();
    let kubeconfig = kube.map(FakeKube::kubeconfig);
    let mut env = Vec::new();
    if let Some(k) = &kubeconfig {
        env.push(("KUBECONFIG", k.to_str().unwrap()));
    }
    Collector::start_in_env(
        log_dir,
        &["--config", path.to_str().unwrap(), "--node-name", NODE],
        &env,
    )
}

/// Records of `uuid` received, by signal: console lines (without gap marks) and events.
fn of_instance(receiver: &OtlpReceiver, uuid: &str) -> (Vec<Received>, Vec<Received>) {
    receiver
        .records()
        .into_iter()
        .filter(|r| r.res_str("ukp.instance.uuid") == Some(uuid))
        .filter(|r| r.attr("compute.console.gap").is_none())
        .partition(|r| r.event_name.is_empty())
}

/// Console bodies of `stream`, in arrival order, once per `log.record.uid` (a duplicate must
/// carry the body of the first: same uid, same record).
fn bodies(records: &[Received], stream: &str) -> Vec<String> {
    let mut seen: BTreeMap<String, String> = BTreeMap::new();
    let mut out = Vec::new();
    for r in records
        .iter()
        .filter(|r| r.attr_str("log.iostream") == Some(stream))
    {
        let uid = r
            .attr_str("log.record.uid")
            .expect("log.record.uid")
            .to_owned();
        if let Some(body) = seen.get(&uid) {
            assert_eq!(body, &r.body, "uid {uid} reused for another record");
        } else {
            seen.insert(uid, r.body.clone());
            out.push(r.body.clone());
        }
    }
    out
}

fn numbered(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} line {i}")).collect()
}

/// Waits until `uuid`'s stdout and stderr lines (`n` each) all arrived; returns the records.
fn wait_lines(
    receiver: &OtlpReceiver,
    collector: &Collector,
    uuid: &str,
    n: usize,
) -> Vec<Received> {
    let mut last = Vec::new();
    wait_for(WITHIN, || {
        last = of_instance(receiver, uuid).0;
        (bodies(&last, "stdout").len() >= n && bodies(&last, "stderr").len() >= n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{uuid}: {} stdout, {} stderr of {n} after {WITHIN:?}:\n{}",
            bodies(&last, "stdout").len(),
            bodies(&last, "stderr").len(),
            collector.stderr()
        )
    });
    last
}

fn exported(collector: &Collector, signal: &str, outcome: &str) -> f64 {
    collector.metric(&format!(
        "collector_export_records_total{{signal=\"{signal}\",outcome=\"{outcome}\"}}"
    ))
}

fn retries(collector: &Collector, reason: &str) -> f64 {
    collector.metric(&format!(
        "collector_export_retries_total{{reason=\"{reason}\"}}"
    ))
}

fn fake_with_pod(uuid: &str) -> FakeKube {
    let fake = FakeKube::start();
    fake.create_namespace("ns-a", &[(PROJECT, "proj-a"), (UPSTREAM_NS, "default")]);
    fake.create_pod(&FakePod::unikraft(
        "ns-a",
        "web-0",
        &format!("kraftlet-{NODE}"),
        Some(&format!("ukp://{uuid}")),
    ));
    fake
}

/// With the identity source: every line and event once, in order, with the fleet's resource
/// attributes.
fn every_line_with_identity(tag: &str, receiver: &OtlpReceiver) {
    let uuid = new_uuid("otlp");
    let fake = fake_with_pod(&uuid);
    let collector = start(
        tag,
        receiver,
        Some(&fake),
        "",
        "",
        tempfile::tempdir().unwrap(),
    );
    // Ready means the Pods were listed: the identity is known before the VMM starts.
    let n = 200;
    let mut vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    let records = wait_lines(receiver, &collector, &uuid, n);
    assert_eq!(bodies(&records, "stdout"), numbered("stdout", n as u32));
    assert_eq!(bodies(&records, "stderr"), numbered("stderr", n as u32));
    let uids: BTreeSet<_> = records
        .iter()
        .map(|r| r.attr_str("log.record.uid").unwrap().to_owned())
        .collect();
    assert_eq!(uids.len(), records.len(), "each line once");
    for r in &records {
        for (key, want) in [
            ("ukp.instance.uuid", uuid.as_str()),
            ("datum.project.name", "proj-a"),
            ("project_name", "proj-a"),
            ("datum.instance.name", "web-0-instance"),
            ("datum.instance.namespace", "default"),
            ("datum.workload.name", "web"),
            ("k8s.node.name", NODE),
        ] {
            assert_eq!(r.res_str(key), Some(want), "{key} of {r:?}");
        }
        assert!(r.time_unix_nano > 0 && r.observed_time_unix_nano >= r.time_unix_nano);
        assert!(r.attr("compute.console.seq").is_some());
    }
    // The lifecycle events: the Pod's create and the VMM's start.
    let events = wait_for(WITHIN, || {
        let events = of_instance(receiver, &uuid).1;
        let names: BTreeSet<String> = events.iter().map(|e| e.event_name.clone()).collect();
        (names.contains("compute.instance.create") && names.contains("compute.instance.start"))
            .then_some(events)
    })
    .unwrap_or_else(|| panic!("events of {uuid}:\n{}", collector.stderr()));
    for e in &events {
        assert_eq!(e.res_str("datum.project.name"), Some("proj-a"));
        assert_eq!(e.attr_str("event.name"), Some(e.event_name.as_str()));
        assert!(e.attr("compute.instance.event.reason").is_some());
    }
    // The rest of the instance's life: the VMM stops, then its Pod goes. Every event of it
    // arrives once, in the order it happened.
    vmm.signal(libc::SIGTERM);
    vmm.wait();
    fake.delete_pod("ns-a", "web-0");
    let lifecycle = [
        "compute.instance.create",
        "compute.instance.start",
        "compute.instance.stop",
        "compute.instance.terminate",
    ];
    let events = wait_for(WITHIN, || {
        let events = of_instance(receiver, &uuid).1;
        events
            .iter()
            .any(|e| e.event_name == "compute.instance.terminate")
            .then_some(events)
    })
    .unwrap_or_else(|| panic!("no terminate of {uuid}:\n{}", collector.stderr()));
    // Time order, which the exporter keeps (one file, read in order): what the receiver got,
    // as it got it, is the life once.
    let names: Vec<&str> = events.iter().map(|e| e.event_name.as_str()).collect();
    assert_eq!(names, lifecycle, "events of {uuid} as received");
    let times: Vec<u64> = events.iter().map(|e| e.time_unix_nano).collect();
    assert!(times.is_sorted(), "event times {times:?}");
    assert_eq!(exported(&collector, "console", "no_identity"), 0.0);
    assert_eq!(
        collector.metric("collector_pipeline_up{pipeline=\"otlp_export\"}"),
        1.0
    );
}

#[test]
fn http_every_line_once_in_order_with_the_fleets_attributes() {
    every_line_with_identity("ohttp", &OtlpReceiver::http());
}

#[test]
fn grpc_every_line_once_in_order_with_the_fleets_attributes() {
    every_line_with_identity("ogrpc", &OtlpReceiver::grpc());
}

/// The Kubernetes source on, no Pod for the instance: its records are held for the bound, then
/// dropped and counted; none is sent.
#[test]
fn records_without_identity_are_not_sent_and_counted() {
    let receiver = OtlpReceiver::http();
    let fake = FakeKube::start();
    let tag = "onoid";
    let collector = start(
        tag,
        &receiver,
        Some(&fake),
        "",
        "[kubernetes]\nidentity_wait_seconds = 1\n",
        tempfile::tempdir().unwrap(),
    );
    let uuid = new_uuid("otlp-noid");
    let n = 5;
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    wait_for(WITHIN, || {
        (exported(&collector, "console", "no_identity") >= 2.0 * f64::from(n)
            && exported(&collector, "event", "no_identity") >= 1.0)
            .then_some(())
    })
    .unwrap_or_else(|| panic!("not counted:\n{}", collector.stderr()));
    assert_eq!(
        exported(&collector, "console", "no_identity"),
        2.0 * f64::from(n)
    );
    let (console, events) = of_instance(&receiver, &uuid);
    assert!(
        console.is_empty() && events.is_empty(),
        "sent without identity"
    );
    assert_eq!(exported(&collector, "console", "sent"), 0.0);
}

/// Runs `n` lines per stream through `faults` (queued before the first request) on a bare host
/// (no identity required); returns the records and the collector.
fn through_faults(
    tag: &str,
    receiver: &OtlpReceiver,
    faults: Vec<Fault>,
    n: u32,
) -> (Vec<Received>, Collector, String) {
    receiver.fail_next(faults);
    let collector = start(tag, receiver, None, "", "", tempfile::tempdir().unwrap());
    let uuid = new_uuid("otlp-fault");
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    let records = wait_lines(receiver, &collector, &uuid, n as usize);
    assert_eq!(receiver.faults_left(), 0);
    (records, collector, uuid)
}

fn assert_all_once(records: &[Received], n: u32) {
    assert_eq!(bodies(records, "stdout"), numbered("stdout", n));
    assert_eq!(bodies(records, "stderr"), numbered("stderr", n));
}

#[test]
fn a_503_with_retry_after_then_recovery() {
    let receiver = OtlpReceiver::http();
    let (records, collector, uuid) = through_faults(
        "o503",
        &receiver,
        vec![Fault::Status(503, Some(1)), Fault::Status(503, Some(1))],
        50,
    );
    assert_all_once(&records, 50);
    assert_eq!(retries(&collector, "503"), 2.0);
    // Bare host: the uuid and the node name, no tenant attributes.
    assert_eq!(records[0].res_str("ukp.instance.uuid"), Some(uuid.as_str()));
    assert_eq!(records[0].res_str("k8s.node.name"), Some(NODE));
    assert!(records[0].res_str("datum.project.name").is_none());
}

#[test]
fn a_429_and_a_connection_reset_are_retried() {
    let receiver = OtlpReceiver::http();
    let (records, collector, _) = through_faults(
        "o429",
        &receiver,
        vec![Fault::Status(429, None), Fault::Reset],
        50,
    );
    assert_all_once(&records, 50);
    assert_eq!(retries(&collector, "429"), 1.0);
    assert!(retries(&collector, "connection") >= 1.0);
}

/// A 400 drops its batch, counted; the rest arrives; what is missing is what was counted.
#[test]
fn a_400_drops_its_batch_and_counts_it() {
    let receiver = OtlpReceiver::http();
    receiver.fail_next([Fault::Status(400, None)]);
    let tag = "o400";
    let collector = start(tag, &receiver, None, "", "", tempfile::tempdir().unwrap());
    let uuid = new_uuid("otlp-400");
    let n = 50;
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    let total = 2 * n;
    // The refused batch may be the first events' (then no console line is missing).
    let done = wait_for(WITHIN, || {
        let got = of_instance(&receiver, &uuid).0.len() as f64;
        let refused = exported(&collector, "console", "refused");
        let any = refused + exported(&collector, "event", "refused");
        (any > 0.0 && got + refused >= f64::from(total)).then_some((got, refused))
    });
    let (got, refused) = done.unwrap_or_else(|| panic!("{}", collector.stderr()));
    assert_eq!(
        got + refused,
        f64::from(total),
        "every line sent or counted, none twice"
    );
    assert_eq!(retries(&collector, "503") + retries(&collector, "429"), 0.0);
}

/// An OTLP partial success: the rejected records are counted.
#[test]
fn a_partial_success_counts_the_rejected() {
    let receiver = OtlpReceiver::grpc();
    receiver.fail_next([Fault::Reject(3)]);
    let tag = "opart";
    let collector = start(tag, &receiver, None, "", "", tempfile::tempdir().unwrap());
    let uuid = new_uuid("otlp-partial");
    let n = 20;
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    let total = f64::from(2 * n);
    wait_for(WITHIN, || {
        let got = of_instance(&receiver, &uuid).0.len() as f64;
        (got + exported(&collector, "console", "rejected") >= total).then_some(())
    })
    .unwrap_or_else(|| panic!("{}", collector.stderr()));
    // The first request may have been an event's: then no console record was rejected.
    let rejected =
        exported(&collector, "console", "rejected") + exported(&collector, "event", "rejected");
    assert_eq!(rejected, 3.0);
}

/// The receiver down for 10 s, over gRPC and HTTP: everything arrives once it is back.
fn receiver_down_ten_seconds(tag: &str, mut receiver: OtlpReceiver) {
    let collector = start(tag, &receiver, None, "", "", tempfile::tempdir().unwrap());
    receiver.down();
    let uuid = new_uuid("otlp-down");
    let n = 100;
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    std::thread::sleep(Duration::from_secs(10));
    assert!(of_instance(&receiver, &uuid).0.is_empty());
    receiver.up();
    let records = wait_lines(&receiver, &collector, &uuid, n);
    assert_all_once(&records, n as u32);
    assert!(retries(&collector, "connection") + retries(&collector, "503") >= 1.0);
}

#[test]
fn http_receiver_down_ten_seconds_then_back() {
    receiver_down_ten_seconds("odownh", OtlpReceiver::http());
}

#[test]
fn grpc_receiver_down_ten_seconds_then_back() {
    receiver_down_ten_seconds("odowng", OtlpReceiver::grpc());
}

/// kill -9 of the collector while it exports (requests slowed by refusals), then a restart on
/// the same folder: every line arrives; a line sent twice carries the same uid.
#[test]
fn kill_9_mid_export_then_restart() {
    let receiver = OtlpReceiver::http();
    let tag = "okill";
    let collector = start(tag, &receiver, None, "", "", tempfile::tempdir().unwrap());
    let uuid = new_uuid("otlp-kill");
    let n = 500;
    // The first requests are refused with 503: export is slow and under way when the kill
    // comes.
    receiver.fail_next((0..6).map(|_| Fault::Status(503, None)));
    let _vmm = vmm(tag, &uuid, &[("STANDIN_LINES", &n.to_string())]);
    wait_for(WITHIN, || (receiver.requests() >= 3).then_some(())).expect("export under way");
    let log_dir = collector.kill_keep_dir();
    let collector = start(tag, &receiver, None, "", "", log_dir);
    let records = wait_lines(&receiver, &collector, &uuid, n);
    assert_all_once(&records, n as u32);
}

/// Past the queue bound (receiver down, small files rotating away): lines of files deleted
/// unread are counted exactly; received + lost is every line, none twice.
#[test]
fn past_the_bound_rotated_away_lines_are_counted_exactly() {
    let mut receiver = OtlpReceiver::http();
    let tag = "obound";
    let collector = start(
        tag,
        &receiver,
        None,
        "queue_max_bytes = 2048\nbatch_max_bytes = 1024",
        "[console]\nfile_max_bytes = 4096\nfile_rotations = 1\n",
        tempfile::tempdir().unwrap(),
    );
    receiver.down();
    let uuid = new_uuid("otlp-bound");
    let n = 300;
    let mut vmm = vmm(
        tag,
        &uuid,
        &[
            ("STANDIN_QUIET_LINES", &n.to_string()),
            ("STANDIN_QUIET_MS", "10"),
            ("STANDIN_RUN_MS", "4000"),
        ],
    );
    vmm.wait();
    std::thread::sleep(Duration::from_secs(1));
    receiver.up();
    let total = f64::from(n);
    let (got, lost) = wait_for(WITHIN, || {
        let got = bodies(&of_instance(&receiver, &uuid).0, "stdout").len() as f64;
        let lost = exported(&collector, "console", "lost");
        (got + lost >= total).then_some((got, lost))
    })
    .unwrap_or_else(|| panic!("{}", collector.stderr()));
    assert!(
        lost > 0.0,
        "the bound was not exceeded: make the files smaller"
    );
    assert_eq!(got + lost, total, "received {got} + lost {lost}");
    // What arrived is in order.
    let mut last = 0;
    for body in bodies(&of_instance(&receiver, &uuid).0, "stdout") {
        let i: u32 = body.rsplit(' ').next().unwrap().parse().unwrap();
        assert!(i > last, "{body} after {last}");
        last = i;
    }
}

/// SIGTERM writes the checkpoints: after a restart on the same folder nothing acknowledged is
/// sent again (every uid once), and lines written while it was down arrive.
#[test]
fn sigterm_then_restart_sends_nothing_twice() {
    let receiver = OtlpReceiver::http();
    let tag = "oterm";
    let collector = start(tag, &receiver, None, "", "", tempfile::tempdir().unwrap());
    let uuid = new_uuid("otlp-term");
    let n = 100;
    let work = tempfile::tempdir().unwrap();
    let more = work.path().join("more");
    let _vmm = vmm(
        tag,
        &uuid,
        &[
            ("STANDIN_LINES", &n.to_string()),
            ("STANDIN_MORE_WHEN", more.to_str().unwrap()),
        ],
    );
    wait_lines(&receiver, &collector, &uuid, n);
    let log_dir = collector.stop_keep_dir();
    assert!(log_dir.path().join(".otlp-checkpoints.json").exists());
    let collector = start(tag, &receiver, None, "", "", log_dir);
    // More lines from the same VMM after the restart.
    std::fs::write(&more, "").unwrap();
    let mut records = Vec::new();
    wait_for(WITHIN, || {
        records = of_instance(&receiver, &uuid).0;
        (records.len() >= 4 * n).then_some(())
    })
    .unwrap_or_else(|| panic!("{} of {}:\n{}", records.len(), 4 * n, collector.stderr()));
    let uids: BTreeSet<&str> = records
        .iter()
        .map(|r| r.attr_str("log.record.uid").unwrap())
        .collect();
    assert_eq!(uids.len(), records.len(), "a record sent twice");
    let mut stdout = numbered("stdout", n as u32);
    stdout.extend((1..=n).map(|i| format!("stdout more {i}")));
    assert_eq!(bodies(&records, "stdout"), stdout);
}
