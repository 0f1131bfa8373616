//! `collector check-logs`: the collector's own `--log-format json` output passes the logging
//! convention (docs/conventions/logging.md), from a file and from standard input; a line that
//! breaks it is reported with its line number and exit status 1.

use std::{
    io::Write,
    process::{Command, Stdio},
    time::Duration,
};

use collector_tests::{Collector, Standin, collector_bin, new_uuid, wait_for};

fn check_logs(input: &str) -> (i32, String) {
    let mut child = Command::new(collector_bin())
        .args(["check-logs", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("collector check-logs");
    child
        .stdin
        .take()
        .expect("stdin")
        .write_all(input.as_bytes())
        .expect("write stdin");
    let out = child.wait_with_output().expect("check-logs output");
    (
        out.status.code().expect("exit code"),
        String::from_utf8_lossy(&out.stdout).into_owned(),
    )
}

#[test]
fn the_collectors_json_logs_pass_the_convention() {
    let mut collector = Collector::start(&["--log-format", "json"]);
    // A start, a crash (an instance lifecycle event at WARN or INFO) and a clean stop.
    let uuid = new_uuid("logconv");
    let mut vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[("STANDIN_RUN_MS", "200"), ("STANDIN_CRASH", "abort")],
    );
    vmm.wait();
    wait_for(Duration::from_secs(2), || {
        collector
            .stderr()
            .contains("instance lifecycle event")
            .then_some(())
    })
    .expect("lifecycle log line");
    assert!(collector.terminate().success());
    let logs = collector.stderr();
    let lines = logs.lines().filter(|l| !l.trim().is_empty()).count();
    assert!(
        lines >= 5,
        "expected start-up, instance and shutdown lines:\n{logs}"
    );

    // From a file.
    let file = collector.log_dir.path().join("collector.stderr");
    let out = Command::new(collector_bin())
        .arg("check-logs")
        .arg(&file)
        .output()
        .expect("check-logs FILE");
    assert!(
        out.status.success(),
        "violations in the collector's own logs:\n{}\n{logs}",
        String::from_utf8_lossy(&out.stdout)
    );
    // From standard input.
    let (code, report) = check_logs(&logs);
    assert_eq!(code, 0, "{report}");
    assert!(report.is_empty(), "{report}");

    // The same lines with one broken in the development style: reported at its line number.
    let first = logs.lines().next().expect("a line");
    let broken = format!("{first}\n2026-12-02T12:00:00.000Z\tINFO\tReconciling\t{{}}\n{first}\n");
    let (code, report) = check_logs(&broken);
    assert_eq!(code, 1, "{report}");
    assert_eq!(
        report.trim(),
        "line 2: not a JSON object (zap's development console encoder? set Development=false and the JSON encoder)"
    );
}
