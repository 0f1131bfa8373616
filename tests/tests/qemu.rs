//! A real hypervisor: QEMU (TCG, no KVM here) boots Debian's kernel with a busybox initramfs
//! whose init prints known lines on the serial console and powers off. The lines must come out
//! as the instance's log stream (API and file), first with the console on stdout, then on a
//! `-serial file:` matched by a console rule; the instance's start and exit must be seen.
//!
//! Outside CI a host without QEMU skips this test (saying so); under `CI=true` nothing skips:
//! `.ci/run` installs `qemu-system-x86`.

use std::{
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use collector_tests::{Collector, config_file, qemu_guest, wait_for};
use serde_json::Value;

const QEMU: &str = "qemu-system-x86_64";

fn random_uuid() -> String {
    let bytes = std::fs::read("/proc/sys/kernel/random/uuid").expect("kernel uuid");
    String::from_utf8(bytes).unwrap().trim().to_owned()
}

fn qemu_present() -> bool {
    Command::new(QEMU)
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// The messages of `stream` must hold `lines` in order, consecutively.
fn assert_in_order(records: &[Value], stream: &str, lines: &[String]) {
    let messages: Vec<&str> = records
        .iter()
        .filter(|r| r["stream"] == stream)
        .map(|r| r["message"].as_str().unwrap())
        .collect();
    let start = messages
        .iter()
        .position(|m| *m == lines[0])
        .unwrap_or_else(|| panic!("{:?} not in {stream}: {messages:#?}", lines[0]));
    assert_eq!(&messages[start..start + lines.len()], lines, "{stream}");
}

#[test]
fn qemu_guest_console_becomes_the_instance_log() {
    if !qemu_present() {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "{QEMU} is missing; .ci/run installs qemu-system-x86"
        );
        eprintln!("SKIPPED: {QEMU} not installed (CI installs it)");
        return;
    }
    let config = config_file("[console.files]\nqemu = [\"*/guest-serial.log\"]\n");
    let collector = Collector::start(&["--config", config.path().to_str().unwrap()]);
    let work = tempfile::tempdir().unwrap();
    for (stream, serial) in [("stdout", None), ("console", Some("guest-serial.log"))] {
        let uuid = random_uuid();
        let lines = qemu_guest::guest_lines(&uuid);
        let prepared = Instant::now();
        let guest = qemu_guest::prepare(&lines, work.path());
        let prepare_s = prepared.elapsed().as_secs_f64();
        let mut cmd = Command::new(QEMU);
        cmd.args(["-accel", "tcg", "-m", "256", "-no-reboot", "-kernel"])
            .arg(&guest.kernel)
            .arg("-initrd")
            .arg(&guest.initramfs)
            .args(["-append", "console=ttyS0 quiet panic=-1 rdinit=/init"])
            .args(["-uuid", &uuid, "-name", "guest=x,debug-threads=on"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        match serial {
            None => cmd.arg("-nographic"),
            Some(name) => cmd
                .args(["-display", "none", "-monitor", "none", "-serial"])
                .arg(format!("file:{}", work.path().join(name).display())),
        };
        let started = Instant::now();
        let mut qemu = cmd.spawn().expect("spawn qemu");
        let instance = wait_for(Duration::from_secs(10), || collector.instance(&uuid))
            .unwrap_or_else(|| panic!("QEMU instance {uuid} not listed:\n{}", collector.stderr()));
        assert_eq!(instance["hypervisor"], "qemu", "{instance}");
        assert_eq!(instance["pid"], qemu.id(), "{instance}");
        let status = wait_for(Duration::from_secs(300), || qemu.try_wait().ok().flatten())
            .unwrap_or_else(|| {
                let _ = qemu.kill();
                panic!("the guest did not power off in 300 s")
            });
        let ran_s = started.elapsed().as_secs_f64();
        assert!(status.success(), "qemu: {status}");
        let gone = wait_for(Duration::from_secs(5), || {
            collector.instance(&uuid).is_none().then_some(())
        });
        assert!(gone.is_some(), "QEMU instance still listed after exit");
        let records = wait_for(Duration::from_secs(5), || {
            let r = collector.logs(&uuid, "");
            r.iter()
                .any(|r| r["message"] == lines[lines.len() - 1].as_str())
                .then_some(r)
        })
        .unwrap_or_else(|| {
            panic!(
                "guest lines missing from {stream}: {:#?}",
                collector.logs(&uuid, "")
            )
        });
        assert_in_order(&records, stream, &lines);
        let on_disk = wait_for(Duration::from_secs(5), || {
            let f = collector.log_file(&uuid);
            (f.len() == records.len()).then_some(f)
        })
        .expect("log file complete");
        assert_in_order(&on_disk, stream, &lines);
        eprintln!(
            "qemu ({stream}): guest prepared in {prepare_s:.1} s, booted, printed and powered \
             off in {ran_s:.1} s; {} records",
            records.len()
        );
    }
}
