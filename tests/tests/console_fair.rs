//! Fair console capture with real stand-in VMMs: a flooding guest loses only its own output,
//! every loss is counted exactly and marked in its stream by gap records, and the kernel's
//! pending-syscall map never loses a write without a count.

use std::time::Duration;

use collector_tests::{Collector, Standin, messages, new_uuid, wait_for};
use serde_json::Value;

/// The two tests flood the machine's CPUs and block threads on purpose: one at a time.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    SERIAL
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// The kernel-side `where`s: bytes written = captured + these.
const KERNEL_WHERES: [&str; 3] = ["kernel_ring", "over_budget", "evicted"];

fn series(family: &str, uuid: &str, label: &str) -> String {
    format!("{family}{{instance_uuid=\"{uuid}\",{label}}}")
}

fn dropped(collector: &Collector, uuid: &str, at: &str) -> u64 {
    collector.metric(&series(
        "compute_instance_console_dropped_bytes_total",
        uuid,
        &format!("where=\"{at}\""),
    )) as u64
}

fn gaps(records: &[Value], stream: &str) -> Vec<Value> {
    records
        .iter()
        .filter(|r| r["stream"] == stream && r["gap"] == true)
        .cloned()
        .collect()
}

/// Four stand-ins flood stdout with `\0\n` at full speed for 10 s while a fifth writes one line
/// every 10 ms: the quiet one keeps every line, in order, without a gap; each flooder's books
/// balance to the byte (written = captured + dropped), its lines too, and everything it lost is
/// marked by gap records in its stream.
#[test]
fn flooders_lose_only_their_own_output_and_every_loss_is_marked() {
    let _serial = serial();
    // A small budget keeps the flooders' admitted output (and the test) small; the quiet
    // writer's 100 lines a second are far below it.
    let collector = Collector::start_with_config(
        "[console]\nrate_bytes_per_sec = 131072\nburst_bytes = 131072\n\
         history_bytes = 67108864\n",
    );
    let work = tempfile::tempdir().unwrap();
    let quiet_uuid = new_uuid("quiet");
    let flooders: Vec<(String, std::path::PathBuf)> = (0..4)
        .map(|i| {
            (
                new_uuid(&format!("flood{i}")),
                work.path().join(format!("flood{i}.report")),
            )
        })
        .collect();
    let mut flooding: Vec<Standin> = flooders
        .iter()
        .map(|(uuid, report)| {
            Standin::spawn(
                "firecracker",
                &["--uuid", uuid],
                &[
                    ("STANDIN_FLOOD_MS", "10000"),
                    ("STANDIN_FLOOD_REPORT", report.to_str().unwrap()),
                ],
            )
        })
        .collect();
    let lines = 1000;
    let _quiet = Standin::spawn(
        "firecracker",
        &["--uuid", &quiet_uuid],
        &[("STANDIN_QUIET_LINES", &lines.to_string())],
    );

    // The quiet one: every line, in order, no gap, in the API and in its file.
    let want: Vec<String> = (1..=lines).map(|i| format!("quiet line {i}")).collect();
    wait_for(Duration::from_secs(10), || collector.instance(&quiet_uuid))
        .unwrap_or_else(|| panic!("quiet one not listed:\n{}", collector.stderr()));
    let quiet = wait_for(Duration::from_secs(40), || {
        let records = collector.logs(&quiet_uuid, "");
        (records.len() >= lines).then_some(records)
    })
    .unwrap_or_else(|| panic!("quiet lines missing:\n{}", collector.stderr()));
    assert!(gaps(&quiet, "stdout").is_empty(), "quiet writer got a gap");
    assert_eq!(messages(&quiet, "stdout"), want);
    let on_disk = wait_for(Duration::from_secs(10), || {
        let file = collector.log_file(&quiet_uuid);
        (file.len() >= lines).then_some(file)
    })
    .unwrap_or_else(|| {
        panic!(
            "quiet file: {} of {lines} records; queue drops {}, sink drops {}",
            collector.log_file(&quiet_uuid).len(),
            dropped(&collector, &quiet_uuid, "queue"),
            dropped(&collector, &quiet_uuid, "sink"),
        )
    });
    assert_eq!(on_disk, quiet);

    // Flooders: done flooding, their counters read (housekeeping folds kernel losses in once
    // a second), while they still run.
    let written: Vec<u64> = flooders
        .iter()
        .map(|(_, report)| {
            wait_for(Duration::from_secs(30), || {
                std::fs::read_to_string(report).ok()?.trim().parse().ok()
            })
            .expect("flood report")
        })
        .collect();
    for ((uuid, _), &written) in flooders.iter().zip(&written) {
        let books = || {
            let captured = collector.metric(&series(
                "compute_instance_console_bytes_total",
                uuid,
                "stream=\"stdout\"",
            )) as u64;
            let lost: u64 = KERNEL_WHERES
                .iter()
                .map(|w| dropped(&collector, uuid, w))
                .sum();
            (captured, lost)
        };
        let balanced = wait_for(Duration::from_secs(10), || {
            let (captured, lost) = books();
            (captured + lost == written).then_some((captured, lost))
        });
        let (captured, lost) = books();
        assert!(
            balanced.is_some(),
            "{uuid}: written {written} != captured {captured} + dropped {lost}"
        );
        assert!(
            lost > 0,
            "{uuid}: a flood at full speed over its budget lost nothing"
        );
        let line_budget = dropped(&collector, uuid, "line_budget");
        let records = collector.metric(&series(
            "compute_instance_console_lines_total",
            uuid,
            "stream=\"stdout\"",
        )) as u64;
        // Every line is 2 bytes, and every loss is of whole lines.
        assert_eq!(
            written / 2,
            records + lost / 2 + line_budget / 2,
            "{uuid}: lines written = lines captured + lines dropped"
        );
        assert_eq!(dropped(&collector, uuid, "cut"), 0);
    }
    let totals: Vec<(u64, u64)> = flooders
        .iter()
        .map(|(uuid, _)| {
            let lost: u64 = KERNEL_WHERES
                .iter()
                .map(|w| dropped(&collector, uuid, w))
                .sum();
            (lost, dropped(&collector, uuid, "line_budget"))
        })
        .collect();
    // At exit the losses after each stream's last record are marked too: then the gap
    // records in the file add up to every byte dropped.
    for standin in &mut flooding {
        standin.kill();
    }
    for ((uuid, _), (kernel_lost, shed)) in flooders.iter().zip(totals) {
        let file = wait_for(Duration::from_secs(15), || {
            let file = collector.log_file(uuid);
            let marked: u64 = gaps(&file, "stdout")
                .iter()
                .map(|g| g["dropped_bytes"].as_u64().unwrap())
                .sum();
            (marked == kernel_lost + shed).then_some(file)
        })
        .unwrap_or_else(|| {
            let file = collector.log_file(uuid);
            panic!(
                "{uuid}: gap records mark {} bytes, dropped {kernel_lost} + {shed}",
                gaps(&file, "stdout")
                    .iter()
                    .map(|g| g["dropped_bytes"].as_u64().unwrap())
                    .sum::<u64>()
            )
        });
        let marks = gaps(&file, "stdout");
        assert!(!marks.is_empty());
        for gap in &marks {
            let reason = gap["gap_reason"].as_str().unwrap();
            assert!(
                ["over_budget", "kernel_ring"].contains(&reason),
                "{uuid}: {gap}"
            );
            assert_eq!(gap["message"], "");
        }
        // No line of a flooder is anything but its own `\0`.
        assert!(
            file.iter()
                .filter(|r| r["gap"] != true)
                .all(|r| r["message"] == "\u{0}"),
            "{uuid}: a line joined across a gap"
        );
    }
}

/// 64 threads block at once in writes to a full console FIFO while the kernel's pending map
/// holds 16 syscalls: the writes that found no room are counted (`where="evicted"`, at the
/// bytes asked for) and marked by a gap record; with the captured ones they add up to all 64.
#[test]
fn writes_the_pending_map_cannot_hold_are_counted_and_marked() {
    let _serial = serial();
    // The pending map exists on the tracepoint paths only (`fexit` stashes nothing).
    let collector = Collector::start_with_config(
        "[kernel]\nconsole_pending_entries = 16\nconsole_hooks = \"syscall_tracepoints\"\n",
    );
    let uuid = new_uuid("blocked");
    let work = tempfile::tempdir().unwrap();
    let dir = work.path().join(&uuid);
    std::fs::create_dir(&dir).unwrap();
    let report = work.path().join("blocked.report");
    let writers = 64u64;
    let mut vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[
            ("STANDIN_BLOCKED_FIFO", dir.join("vm.log").to_str().unwrap()),
            ("STANDIN_BLOCKED_WRITERS", &writers.to_string()),
            ("STANDIN_BLOCKED_REPORT", report.to_str().unwrap()),
        ],
    );
    let (fill, reported): (u64, u64) = wait_for(Duration::from_secs(30), || {
        let text = std::fs::read_to_string(&report).ok()?;
        let mut it = text.split_whitespace().map(|n| n.parse().unwrap());
        Some((it.next()?, it.next()?))
    })
    .expect("blocked writers report");
    assert_eq!(reported, writers);
    let evicted = wait_for(Duration::from_secs(10), || {
        let n = dropped(&collector, &uuid, "evicted");
        (n > 0).then_some(n)
    })
    .unwrap_or_else(|| panic!("no evicted bytes counted:\n{}", collector.stderr()));
    // Blocked lines are 18 bytes each.
    assert_eq!(evicted % 18, 0, "{evicted}");
    vmm.kill();
    let records = wait_for(Duration::from_secs(10), || {
        let records = collector.log_file(&uuid);
        let captured = records
            .iter()
            .filter(|r| {
                r["message"]
                    .as_str()
                    .is_some_and(|m| m.starts_with("blocked line"))
            })
            .count() as u64;
        (captured + evicted / 18 == writers).then_some(records)
    })
    .unwrap_or_else(|| {
        let records = collector.log_file(&uuid);
        let blocked = records
            .iter()
            .filter(|r| r["message"].as_str().is_some_and(|m| m.starts_with("blocked")))
            .count();
        panic!(
            "blocked lines do not add up: {blocked} captured, {evicted} bytes evicted, {} records, {fill} fill:\n{}",
            records.len(),
            records
                .iter()
                .filter(|r| r["message"].as_str().is_none_or(|m| !m.starts_with("fill")))
                .map(Value::to_string)
                .collect::<Vec<_>>()
                .join("\n")
        )
    });
    let console: Vec<&Value> = records
        .iter()
        .filter(|r| r["stream"] == "console")
        .collect();
    let fills = console
        .iter()
        .filter(|r| r["message"].as_str().is_some_and(|m| m.starts_with("fill")))
        .count() as u64;
    assert_eq!(fills, fill, "every fill line before the blocked ones");
    let marks: Vec<&&Value> = console.iter().filter(|r| r["gap"] == true).collect();
    let marked: u64 = marks
        .iter()
        .map(|g| g["dropped_bytes"].as_u64().unwrap())
        .sum();
    assert_eq!(marked, evicted, "{marks:?}");
    assert!(
        marks.iter().all(|g| g["gap_reason"] == "evicted"),
        "{marks:?}"
    );
}

/// A process that opens its console file 200 times holds at most 64 entries of the kernel's
/// console-descriptor map: the rest are refused and counted, and its first descriptor (opened
/// before the hoarding) and a neighbour's console are still captured.
#[test]
fn one_process_cannot_fill_the_console_descriptor_map() {
    let _serial = serial();
    let collector = Collector::start(&[]);
    let refused = "collector_ebpf_console_fd_quota_refused_total";
    assert_eq!(collector.metric(refused) as u64, 0);
    let work = tempfile::tempdir().unwrap();
    let spawn = |tag: &str, reopen: &str| {
        let uuid = new_uuid(tag);
        let dir = work.path().join(&uuid);
        std::fs::create_dir(&dir).unwrap();
        let file = dir.join("vm.log");
        let vmm = Standin::spawn(
            "firecracker",
            &["--uuid", &uuid],
            &[
                ("STANDIN_CONSOLE_FILE", file.to_str().unwrap()),
                ("STANDIN_REOPEN", reopen),
                ("STANDIN_LINES", "5"),
            ],
        );
        (uuid, vmm)
    };
    let (hoarder, _h) = spawn("hoarder", "200");
    let (neighbour, _n) = spawn("neighbour", "0");
    // The first open and 63 of the 200 more fill the quota of 64: 137 are refused, and so is
    // the hoarder's later `dup` of its console (its line is not captured).
    let counted = wait_for(Duration::from_secs(10), || {
        (collector.metric(refused) as u64 == 138).then_some(())
    });
    assert!(
        counted.is_some(),
        "refused: {} (want 138)",
        collector.metric(refused)
    );
    let lines: Vec<String> = (1..=5).map(|i| format!("console line {i}")).collect();
    let mut with_dup = lines.clone();
    with_dup.push("console via dup".into());
    for (uuid, want) in [(&hoarder, lines), (&neighbour, with_dup)] {
        wait_for(Duration::from_secs(10), || collector.instance(uuid))
            .unwrap_or_else(|| panic!("{uuid} not listed"));
        let records = wait_for(Duration::from_secs(10), || {
            let records = collector.logs(uuid, "");
            (messages(&records, "console").len() >= want.len()).then_some(records)
        })
        .unwrap_or_else(|| panic!("{uuid}: console lines missing"));
        assert_eq!(messages(&records, "console"), want, "{uuid}");
    }
    assert_eq!(
        collector.metric("collector_ebpf_console_fd_map_full_total"),
        0.0
    );
}
