//! Shutdown and supervision: SIGTERM with followers attached ends within the grace period with
//! every line written before it in the files; a pipeline that stops makes the collector
//! unhealthy.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use collector_tests::{Collector, Standin, collector_bin, messages, new_uuid, sample, wait_for};

const LINES: u32 = 5000;

/// SIGTERM while `collector logs -f` and `collector events -f` are attached, right after the
/// VMM wrote a burst of lines: the collector exits within 10 s, the followers see a clean end,
/// and every line written before the signal is in console.log.
#[test]
fn sigterm_with_followers_attached() {
    // 20000 writes of about 80 budget bytes each (the line and 64 per write) is over the
    // default 1 MiB burst when the machine runs them fast: the end of the burst would be a
    // marked `over_budget` gap, not the shutdown loss this test looks for.
    let mut collector = Collector::start_with_config(
        "[console]\nrate_bytes_per_sec = 67108864\nburst_bytes = 67108864\n",
    );
    let uuid = new_uuid("sd-term");
    let work = tempfile::tempdir().unwrap();
    let more = work.path().join("more");
    let _vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[
            ("STANDIN_LINES", &LINES.to_string()),
            ("STANDIN_MORE_WHEN", more.to_str().unwrap()),
        ],
    );
    wait_for(Duration::from_secs(5), || collector.instance(&uuid)).expect("listed");
    let follow = |args: &[&str]| {
        Command::new(collector_bin())
            .args(args)
            .args(["--addr", &collector.addr])
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn follower")
    };
    let logs = follow(&["logs", &uuid, "-f", "--json"]);
    let events = follow(&["events", "-f", "--instance", &uuid, "--json"]);
    // Both followers are attached once the first lines reached them.
    wait_for(Duration::from_secs(10), || {
        (collector.logs(&uuid, "").len() == 2 * LINES as usize).then_some(())
    })
    .expect("the first lines");
    std::thread::sleep(Duration::from_millis(300));

    // A burst, then the signal the moment the VMM has written it all.
    std::fs::write(&more, b"").unwrap();
    let done = work.path().join("more.done");
    wait_for(Duration::from_secs(10), || done.exists().then_some(())).expect("burst written");
    // SAFETY: signalling our own child.
    unsafe { libc::kill(collector.pid() as i32, libc::SIGTERM) };
    let signalled = Instant::now();
    let status = collector
        .wait_exit(Duration::from_secs(10))
        .unwrap_or_else(|| panic!("still running 10 s after SIGTERM:\n{}", collector.stderr()));
    let took = signalled.elapsed();
    assert!(status.success(), "{status}\n{}", collector.stderr());

    for (name, follower) in [("logs -f", logs), ("events -f", events)] {
        let out = follower.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "{name}: {}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(!out.stdout.is_empty(), "{name} printed nothing");
    }
    let file = collector.log_file(&uuid);
    for stream in ["stdout", "stderr"] {
        let mut want: Vec<String> = (1..=LINES).map(|i| format!("{stream} line {i}")).collect();
        want.extend((1..=LINES).map(|i| format!("{stream} more {i}")));
        assert_eq!(messages(&file, stream), want, "{stream} in console.log");
    }
    eprintln!("exited {took:?} after SIGTERM with two followers attached");
}

/// A pipeline ended on purpose (the test hook): `/healthz` turns 503 within 1 s, its
/// `collector_pipeline_up` is 0, the others' 1, and one error line names it.
#[test]
fn an_ended_pipeline_makes_the_collector_unhealthy() {
    let healthy = Collector::start(&[]);
    assert_eq!(healthy.get_status("/healthz"), Some(200));
    let metrics = healthy.get_text("/metrics");
    for pipeline in [
        "discovery",
        "console",
        "registry",
        "events_files",
        "console_files",
        "state_file",
        "otlp_export",
    ] {
        let series = format!("collector_pipeline_up{{pipeline=\"{pipeline}\"}}");
        assert_eq!(sample(&metrics, &series), Some(1.0), "{series}");
    }

    let collector = Collector::start_in_env(
        tempfile::tempdir().unwrap(),
        &["--log-format", "json"],
        &[("COLLECTOR_TEST_END_PIPELINE", "discovery")],
    );
    let ready = Instant::now();
    wait_for(Duration::from_secs(1), || {
        (collector.get_status("/healthz") == Some(503)).then_some(())
    })
    .unwrap_or_else(|| panic!("/healthz not 503 within 1 s:\n{}", collector.stderr()));
    eprintln!("503 {:?} after ready", ready.elapsed());
    assert!(collector.get_text_any("/healthz").contains("discovery"));
    let metrics = collector.get_text("/metrics");
    assert_eq!(
        sample(&metrics, "collector_pipeline_up{pipeline=\"discovery\"}"),
        Some(0.0)
    );
    assert_eq!(
        sample(&metrics, "collector_pipeline_up{pipeline=\"console\"}"),
        Some(1.0)
    );
    let stderr = collector.stderr();
    let errors: Vec<serde_json::Value> = stderr
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|l| l["level"] == "ERROR")
        .collect();
    assert_eq!(errors.len(), 1, "{stderr}");
    assert_eq!(errors[0]["pipeline"], "discovery", "{}", errors[0]);
    assert!(
        errors[0]["message"]
            .as_str()
            .unwrap()
            .starts_with("pipeline stopped"),
        "{}",
        errors[0]
    );
    assert!(errors[0]["error"].is_string(), "{}", errors[0]);
    // The lines keep the logging convention (docs/conventions/logging.md).
    let out = Command::new(collector_bin())
        .arg("check-logs")
        .arg(collector.log_dir.path().join("collector.stderr"))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stdout)
    );
}

/// The hook refuses a value that names no pipeline it can end: it is never half-armed.
#[test]
fn the_test_hook_refuses_what_it_cannot_do() {
    let out = Command::new(collector_bin())
        .args(["run", "--listen", "127.0.0.1:0"])
        .env("COLLECTOR_TEST_END_PIPELINE", "everything")
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("COLLECTOR_TEST_END_PIPELINE"), "{stderr}");
}
