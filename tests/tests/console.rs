//! Console capture end to end: stand-in VMMs write known bytes the moment they exec; every line
//! must arrive once, in order, with gap-free `seq`, in the API and on disk; nothing else may.

use std::{process::Command, time::Duration};

use collector_tests::{
    Collector, Standin, collector_bin, config_file, messages, new_uuid, path_segment, wait_for,
};
use serde_json::Value;

const ARRIVES_WITHIN: Duration = Duration::from_secs(5);

/// Waits until the API holds `n` records of `uuid`.
fn wait_records(collector: &Collector, uuid: &str, n: usize) -> Vec<Value> {
    // Unknown (404) until listed.
    wait_for(ARRIVES_WITHIN, || collector.instance(uuid))
        .unwrap_or_else(|| panic!("{uuid} not listed:\n{}", collector.stderr()));
    let mut last = Vec::new();
    wait_for(ARRIVES_WITHIN, || {
        last = collector.logs(uuid, "");
        (last.len() >= n).then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "{uuid}: {} of {n} records after {ARRIVES_WITHIN:?}:\n{}\n{}",
            last.len(),
            last.iter()
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n"),
            collector.stderr()
        )
    });
    last
}

fn numbered(prefix: &str, n: u32) -> Vec<String> {
    (1..=n).map(|i| format!("{prefix} line {i}")).collect()
}

/// Lines to stdout, stderr and a `vm.log` console file (through write, pwrite64, writev and a
/// dup), written right after exec and right after the open: all there, once, in order, in the
/// API and in the file; the non-console file and the stdout replaced by `dup2` never show.
#[test]
fn every_line_once_in_order_from_exec_on() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("console");
    let work = tempfile::tempdir().unwrap();
    let instance_dir = work.path().join(&uuid);
    std::fs::create_dir(&instance_dir).unwrap();
    let console_file = instance_dir.join("vm.log");
    let other_file = work.path().join("other.log");
    let n = 200;
    let mut vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[
            ("STANDIN_LINES", &n.to_string()),
            ("STANDIN_CONSOLE_FILE", console_file.to_str().unwrap()),
            ("STANDIN_OTHER_FILE", other_file.to_str().unwrap()),
        ],
    );
    let total = 3 * n as usize + 1;
    let records = wait_records(&collector, &uuid, total);
    assert_eq!(records.len(), total, "no more than expected");
    assert_eq!(messages(&records, "stdout"), numbered("stdout", n));
    assert_eq!(messages(&records, "stderr"), numbered("stderr", n));
    let mut console = numbered("console", n);
    console.push("console via dup".into());
    assert_eq!(messages(&records, "console"), console);
    for r in &records {
        assert_eq!(r["instance_uuid"], uuid.as_str());
        assert!(r["ts"].as_str().unwrap().ends_with('Z'), "{r}");
    }
    // Same records on disk, once the file sink caught up.
    let on_disk = wait_for(ARRIVES_WITHIN, || {
        let file = collector.log_file(&uuid);
        (file.len() == total).then_some(file)
    })
    .expect("log file complete");
    assert_eq!(on_disk, records);
    let metrics = collector.get_text("/metrics");
    let sample =
        |family: &str, label: &str| format!("{family}{{instance_uuid=\"{uuid}\",{label}}}");
    let bytes_of = |lines: &[String]| lines.iter().map(|l| l.len() + 1).sum::<usize>();
    for (stream, lines) in [
        ("stdout", numbered("stdout", n)),
        ("stderr", numbered("stderr", n)),
        ("console", console.clone()),
    ] {
        let line = sample(
            "compute_instance_console_lines_total",
            &format!("stream=\"{stream}\""),
        );
        assert!(
            metrics.contains(&format!("{line} {}", lines.len())),
            "{line}:\n{metrics}"
        );
        let bytes = bytes_of(&lines);
        let line = sample(
            "compute_instance_console_bytes_total",
            &format!("stream=\"{stream}\""),
        );
        assert!(
            metrics.contains(&format!("{line} {bytes}")),
            "{line}:\n{metrics}"
        );
    }
    // Nothing dropped: drop series appear with a cause's first byte (docs/metrics.md).
    let dropped = format!("compute_instance_console_dropped_bytes_total{{instance_uuid=\"{uuid}\"");
    assert!(!metrics.contains(&dropped), "{dropped}:\n{metrics}");
    assert!(
        std::fs::read_to_string(&other_file)
            .unwrap()
            .contains("secret")
    );
    vmm.kill();
    // Gone from the instance list, still readable for the retention.
    let gone = wait_for(ARRIVES_WITHIN, || {
        collector.instance(&uuid).is_none().then_some(())
    });
    assert!(gone.is_some());
    assert_eq!(collector.logs(&uuid, "").len(), total);
    let everything =
        std::fs::read_to_string(collector.log_dir.path().join(&uuid).join("console.log")).unwrap();
    assert!(!everything.contains("secret"), "non-console bytes captured");
}

/// Partial writes, CRLF and bare CR, invalid UTF-8, NUL bytes, a 1 MiB line in 4 KiB writes,
/// and a single 1 MiB write (cut by the kernel after 64 KiB, marked and counted).
#[test]
fn partial_writes_odd_bytes_and_huge_lines() {
    // 2.1 MiB at full speed, more than the default budget's burst (1 MiB): this test is about
    // line assembly, not the budget.
    let collector = Collector::start_with_config("[console]\nburst_bytes = 8388608\n");
    let uuid = new_uuid("tricky");
    let _vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[("STANDIN_TRICKY", "1")],
    );
    // 6 short lines, 64 pieces of the 1 MiB line, 4 pieces + the cut of the 1 MiB write, then
    // `after-big`.
    let records = wait_records(&collector, &uuid, 6 + 64 + 4 + 1);
    let stdout: Vec<&Value> = records.iter().filter(|r| r["stream"] == "stdout").collect();
    let text: Vec<&str> = stdout
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(
        &text[..6],
        [
            "partial-line",
            "crlf",
            "cr1",
            "cr2",
            "bad \u{fffd}\u{fffd} end",
            "nul\0byte"
        ]
    );
    assert_eq!(stdout[4]["invalid_utf8"], true);
    assert!(stdout[0].get("invalid_utf8").is_none());
    let big = &stdout[6..70];
    assert!(big[..63].iter().all(|r| r["split"] == true));
    assert!(
        big.iter()
            .all(|r| r["message"].as_str().unwrap().len() == 16384)
    );
    assert!(big[63].get("split").is_none(), "last piece ends the line");
    let cut = &stdout[70..74];
    assert!(cut[..3].iter().all(|r| r["split"] == true));
    assert_eq!(cut[3]["cut_bytes"], (1u64 << 20) - 65536);
    let kept: usize = cut
        .iter()
        .map(|r| r["message"].as_str().unwrap().len())
        .sum();
    assert_eq!(kept, 65536);
    assert_eq!(stdout[74]["message"], "after-big");
    messages(&records, "stdout");
    let metrics = collector.get_text("/metrics");
    let dropped = format!(
        "compute_instance_console_dropped_bytes_total{{instance_uuid=\"{uuid}\",where=\"cut\"}} {}",
        (1u64 << 20) - 65536
    );
    assert!(metrics.contains(&dropped), "{dropped}:\n{metrics}");
}

/// An instance id that tries to climb out of the log folder lands in a sanitised folder
/// inside it, and is still served under its real id.
#[test]
fn hostile_instance_id_stays_inside_the_log_dir() {
    let collector = Collector::start(&[]);
    // Hidden if kept, an escaped slash if `%` were kept, a space. (An id with `/` or `..` is
    // not used at all: the instance is named by its pid; tests/tests/safety.rs.)
    let uuid = format!(".{}%2F x", new_uuid("escape"));
    let _vmm = Standin::spawn("firecracker", &["--uuid", &uuid], &[("STANDIN_LINES", "3")]);
    let records = wait_records(&collector, &uuid, 6);
    assert_eq!(messages(&records, "stdout"), numbered("stdout", 3));
    // The sink's naming rule: [A-Za-z0-9_-] and non-leading dots kept, other bytes %XX.
    let expected: String = {
        let mut s = String::new();
        for (i, b) in uuid.bytes().enumerate() {
            if b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || (b == b'.' && i > 0) {
                s.push(b as char);
            } else {
                s.push_str(&format!("%{b:02X}"));
            }
        }
        s
    };
    let found = wait_for(ARRIVES_WITHIN, || {
        (collector.log_file(&expected).len() == 6).then_some(())
    });
    assert!(found.is_some(), "no log file at {expected}");
    let entries: Vec<String> = std::fs::read_dir(collector.log_dir.path())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    // The collector's own restart state is its one dot file (written on its first save, which
    // a slow machine reaches within this test); no instance's folder may start with a dot.
    assert!(
        entries
            .iter()
            .filter(|e| *e != ".collector-state.json")
            .all(|e| !e.contains('/') && !e.starts_with('.')),
        "{entries:?}"
    );
    assert!(
        !entries.contains(&uuid),
        "the id used as a file name: {entries:?}"
    );
    assert_eq!(
        collector.get_status(&format!("/v1/instances/{}/logs", path_segment("nope"))),
        Some(404)
    );
}

/// `collector logs -f` prints the lines as they come and returns when the instance exits;
/// `tail` and `since` narrow the history.
#[test]
fn follow_with_the_cli_until_exit_then_tail_and_since() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("follow");
    let _vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[
            ("STANDIN_LINES", "20"),
            ("STANDIN_DELAY_MS", "700"),
            ("STANDIN_RUN_MS", "1200"),
        ],
    );
    wait_for(ARRIVES_WITHIN, || collector.instance(&uuid)).expect("listed");
    let out = Command::new(collector_bin())
        .args([
            "logs",
            &uuid,
            "-f",
            "--stream",
            "stdout",
            "--addr",
            &collector.addr,
        ])
        .output()
        .expect("collector logs -f");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let printed: Vec<String> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    assert_eq!(
        printed,
        numbered("stdout", 20),
        "follow ended early or repeated"
    );
    assert!(
        collector.instance(&uuid).is_none(),
        "follow returns after the exit"
    );

    let tail = collector.logs(&uuid, "tail=3&stream=stderr");
    let text: Vec<&str> = tail
        .iter()
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    assert_eq!(text, ["stderr line 18", "stderr line 19", "stderr line 20"]);
    let all = collector.logs(&uuid, "");
    let tenth = all[10]["ts"].as_str().unwrap();
    let since = collector.logs(&uuid, &format!("since={}", path_segment(tenth)));
    assert!(
        since.len() >= all.len() - 10 && since.len() < all.len(),
        "{}",
        since.len()
    );
    assert_eq!(
        collector.get_status(&format!(
            "/v1/instances/{}/logs?since=yesterday",
            path_segment(&uuid)
        )),
        Some(400)
    );

    let out = Command::new(collector_bin())
        .args([
            "logs",
            &uuid,
            "--tail",
            "1",
            "--json",
            "--addr",
            &collector.addr,
        ])
        .output()
        .unwrap();
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(record["seq"], 20);
}

/// A VMM that opened its console file before the collector started: the descriptor is found in
/// `/proc/PID/fd` and its later writes are captured.
#[test]
fn console_file_opened_before_the_collector_started() {
    let uuid = new_uuid("early-console");
    let work = tempfile::tempdir().unwrap();
    let console_file = work.path().join("serial.out");
    let go = work.path().join("go");
    let _vmm = Standin::spawn(
        "qemu-system-x86_64",
        &["-uuid", &uuid],
        &[
            ("STANDIN_CONSOLE_FILE", console_file.to_str().unwrap()),
            ("STANDIN_WAIT_FOR", go.to_str().unwrap()),
        ],
    );
    // The file is open before the collector starts; the writes come once it is running.
    wait_for(ARRIVES_WITHIN, || console_file.exists().then_some(())).expect("file opened");
    let config = config_file("[console.files]\nqemu = [\"*/serial.out\"]\n");
    let collector = Collector::start(&["--config", config.path().to_str().unwrap()]);
    wait_for(ARRIVES_WITHIN, || collector.instance(&uuid)).expect("discovered");
    // Give the console pipeline the snapshot with the new instance before the first write.
    std::thread::sleep(Duration::from_millis(300));
    std::fs::write(&go, "").unwrap();
    let records = wait_for(Duration::from_secs(8), || {
        let r = collector.logs(&uuid, "");
        (r.len() >= 11).then_some(r)
    })
    .unwrap_or_else(|| panic!("console lines missing:\n{}", collector.stderr()));
    let mut want = numbered("console", 10);
    want.push("console via dup".into());
    assert_eq!(messages(&records, "console"), want);
}

/// SIGTERM: the partial line still held is flushed to the file before the collector exits.
#[test]
fn shutdown_flushes_partial_lines_to_disk() {
    let config = config_file("[console]\npartial_flush_ms = 600000\n");
    let mut collector = Collector::start(&["--config", config.path().to_str().unwrap()]);
    let uuid = new_uuid("shutdown");
    let _vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[("STANDIN_LINES", "2"), ("STANDIN_TAIL", "no newline yet")],
    );
    wait_records(&collector, &uuid, 4);
    assert!(collector.terminate().success());
    let records = collector.log_file(&uuid);
    let last = records.last().expect("records on disk");
    assert_eq!(last["message"], "no newline yet", "{records:?}");
    assert_eq!(last["partial"], true);
    assert_eq!(messages(&records, "stdout").len(), 3);
}

/// A console rule the kernel could not apply is refused at start, in one line.
#[test]
fn bad_console_rule_is_refused_at_start() {
    let config = config_file("[console.files]\nqemu = [\"serial.log\"]\n");
    let out = Command::new(collector_bin())
        .args(["run", "--listen", "127.0.0.1:0", "--config"])
        .arg(config.path())
        .output()
        .expect("run collector");
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.starts_with("error: console.files: \"serial.log\" must be `*` followed by"),
        "{stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
}

/// The console probes of a collector's `/readyz`: `(probe, attached, error)`.
fn console_probes(collector: &Collector) -> Vec<(String, bool, String)> {
    let ready = collector.get_json("/readyz");
    ready["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|p| {
            let name = p["probe"].as_str()?;
            name.starts_with("console_").then(|| {
                (
                    name.to_owned(),
                    p["attached"] == true,
                    p["error"].as_str().unwrap_or_default().to_owned(),
                )
            })
        })
        .collect()
}

/// `kernel.console_hooks`: `fexit` forced either attaches on every followed syscall's handler
/// (the matrix's kernels) or, where the kernel refuses it (this CI host's lockdown), shows the
/// refusal as one unattached probe in `/readyz`'s `degraded`, with the kernel's error. `auto`
/// then has console capture on `fexit` where it was allowed and on the per-syscall tracepoints
/// where it was not, never both, and captures.
#[test]
fn fexit_where_the_kernel_allows_it_and_the_tracepoints_where_it_does_not() {
    let forced = Collector::start_with_config("[kernel]\nconsole_hooks = \"fexit\"\n");
    let probes = console_probes(&forced);
    let allowed = probes.iter().all(|(_, attached, _)| *attached);
    if allowed {
        // The followed syscalls of x86_64: 13 handlers.
        assert_eq!(probes.len(), 13, "{probes:?}");
        assert!(probes.iter().all(|(n, ..)| n.starts_with("console_fexit_")));
    } else {
        assert_eq!(probes.len(), 1, "all or none: {probes:?}");
        let (name, _, error) = &probes[0];
        assert!(
            name.starts_with("console_fexit_") && !error.is_empty(),
            "{probes:?}"
        );
        let degraded = forced.get_json("/readyz")["degraded"].clone();
        assert_eq!(degraded, serde_json::json!([name]), "{degraded}");
    }
    drop(forced);

    let auto = Collector::start_with_config("[kernel]\nconsole_hooks = \"auto\"\n");
    let probes = console_probes(&auto);
    assert!(
        probes.iter().all(|(_, attached, _)| *attached),
        "{probes:?}"
    );
    let on_fexit = probes
        .iter()
        .filter(|(n, ..)| n.starts_with("console_fexit_"))
        .count();
    let on_tracepoints = probes
        .iter()
        .filter(|(n, ..)| n.starts_with("console_sys_"))
        .count();
    if allowed {
        assert_eq!((on_fexit, on_tracepoints), (13, 0), "{probes:?}");
    } else {
        // Each followed syscall's enter and exit tracepoints.
        assert_eq!((on_fexit, on_tracepoints), (0, 26), "{probes:?}");
        assert!(
            auto.stderr()
                .contains("fexit on the syscall handlers refused by this kernel"),
            "the fallback is logged:\n{}",
            auto.stderr()
        );
    }
    let uuid = new_uuid("hooks");
    let _vmm = Standin::spawn("firecracker", &["--uuid", &uuid], &[("STANDIN_LINES", "5")]);
    let records = wait_records(&auto, &uuid, 10);
    assert_eq!(messages(&records, "stdout"), numbered("stdout", 5));
    assert_eq!(messages(&records, "stderr"), numbered("stderr", 5));
    eprintln!(
        "console hooks: {}",
        if allowed {
            "fexit"
        } else {
            "per-syscall tracepoints (fexit refused)"
        }
    );
}

/// The kernel wakes the console reader only for a burst or for the first record after a quiet
/// spell, and the reader polls on its own only for a while after each wake-up (1 s): a line
/// written after the reader stopped polling must still be read, with no later write to push
/// it. The stand-in writes its first line at exec and its second and last 3 s later.
#[test]
fn a_line_after_a_quiet_spell_is_read_without_a_later_write() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("quiet");
    let gap = Duration::from_secs(3);
    let _vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[
            ("STANDIN_QUIET_LINES", "2"),
            ("STANDIN_QUIET_MS", &gap.as_millis().to_string()),
        ],
    );
    wait_for(ARRIVES_WITHIN, || collector.instance(&uuid))
        .unwrap_or_else(|| panic!("{uuid} not listed:\n{}", collector.stderr()));
    let mut seen = Vec::new();
    wait_for(ARRIVES_WITHIN + gap, || {
        seen = messages(&collector.logs(&uuid, ""), "stdout");
        (seen.len() >= 2).then_some(())
    })
    .unwrap_or_else(|| panic!("lines not read: {seen:?}\n{}", collector.stderr()));
    assert_eq!(seen, ["quiet line 1", "quiet line 2"]);
}
