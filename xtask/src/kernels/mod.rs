//! `cargo xtask test-kernels [--kernel VERSION]...`: the integration tests inside each kernel
//! the collector claims, under QEMU (TCG: `-accel kvm` aborts on these machines).
//!
//! For every kernel: the pinned Debian cloud kernel (cached, [`fetch`]), an initramfs with the
//! collector, the stand-in VMM and the compiled integration test binaries ([`initramfs`]), and
//! `/init` = `guest-init` (tests/src/bin/guest_init.rs), which runs the suites and reports each
//! test on a second serial port, then leaves through `isa-debug-exit`. A kernel passes when
//! every test passed, every probe attached, `/readyz` answered 200, the success line arrived,
//! and the console shows no kernel splat ([`report`]).

mod fetch;
mod initramfs;
pub(crate) mod report;

use std::{
    collections::BTreeMap,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, bail};
use clap::Args;
use serde_json::json;

use self::{
    fetch::KernelSpec,
    initramfs::{Archive, GUEST_TARGET},
    report::KernelRun,
};
use crate::{build, toolchain};

#[derive(Args, Debug, Default)]
pub(crate) struct Options {
    /// A kernel of the matrix, by version or prefix (`5.10`, `6.1.192`); repeatable. Default:
    /// all of them.
    #[arg(long = "kernel", value_name = "VERSION")]
    kernels: Vec<String>,
    /// Run only this suite (a test file of [`SUITES`], or one of [`FORCED_CONSOLE`]);
    /// repeatable.
    /// Default: all of them.
    #[arg(long = "suite", value_name = "NAME")]
    suites: Vec<String>,
    /// Write the tables of this run into docs/kernels.md.
    #[arg(long)]
    update_docs: bool,
}

/// The integration test files run inside each guest, with `cargo test`'s filter arguments.
/// They cover every hook end to end: discovery (each VMM kind, at exec and already running),
/// exit status and OOM kills (`mark_victim`), scheduling against schedstat, console capture,
/// and `/readyz` with every probe attached.
const SUITES: &[&str] = &["discovery", "lifecycle", "sched", "console"];

/// The console tests once more with one of console capture's other paths forced
/// (`kernel.console_hooks`): `(suite, console_hooks, kernels)`. Every kernel of the matrix
/// allows `fexit`, which `auto` then picks: the per-syscall tracepoints (the path of a kernel
/// that refuses `fexit`, like the CI host's) and the raw-syscall fallback are each forced on
/// some of them.
const FORCED_CONSOLE: &[(&str, &str, &[&str])] = &[
    ("console-raw-syscalls", "raw_syscalls", &["5.10.223"]),
    (
        "console-syscall-tracepoints",
        "syscall_tracepoints",
        &["6.12.118"],
    ),
];

/// How much slower than the host the tests run in a TCG guest (`COLLECTOR_TEST_TIME_SCALE`).
const TIME_SCALE: u32 = 10;

/// The most one guest may take before it is killed (and fails).
const GUEST_TIMEOUT: Duration = Duration::from_mins(30);

pub(crate) fn test_kernels(options: &Options) -> anyhow::Result<()> {
    let started = Instant::now();
    let runs = run_in_guests(
        &options.kernels,
        |spec| plan_archive(spec, &options.suites),
        |run| {
            let failures = run.failures();
            eprintln!(
                "xtask: {}: {} ({}/{} tests, {}/{} probes) in {:.0} s; console in {}",
                run.version,
                if failures.is_empty() { "pass" } else { "FAIL" },
                run.passed_tests(),
                run.counted_tests(),
                run.attached_probes(),
                run.probes.len(),
                run.seconds,
                guest_dir(&run.version).join("console.log").display()
            );
            for failure in &failures {
                eprintln!("xtask:   {failure}");
            }
        },
    )?;
    let out_dir = toolchain::workspace_root().join("target/kernels");

    let summary = report::table(&runs);
    println!("\n{summary}");
    let document = document(&runs);
    std::fs::write(out_dir.join("kernels.md"), &document)?;
    if options.update_docs {
        std::fs::write(
            toolchain::workspace_root().join("docs/kernels.md"),
            &document,
        )?;
    }
    println!(
        "kernel matrix: {} kernels in {:.0} s",
        runs.len(),
        started.elapsed().as_secs_f64()
    );
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.failures().is_empty())
        .map(|r| r.version.as_str())
        .collect();
    if !failed.is_empty() {
        bail!("kernel matrix failed on {}", failed.join(", "));
    }
    Ok(())
}

/// Where the files of `version`'s guest go (its initramfs, console, result port).
fn guest_dir(version: &str) -> PathBuf {
    toolchain::workspace_root()
        .join("target/kernels")
        .join(version)
}

/// Builds what the guests run (the kernel object, the debug binaries, the test executables),
/// then boots each kernel of `kernels` (all of the matrix when empty), one after the other,
/// with the plan `plan_for` makes for it, and reads back what each reported (handed to
/// `finished` as each guest ends).
pub(crate) fn run_in_guests(
    kernels: &[String],
    plan_for: impl Fn(&KernelSpec) -> anyhow::Result<Vec<u8>>,
    mut finished: impl FnMut(&KernelRun),
) -> anyhow::Result<Vec<KernelRun>> {
    let kernels = fetch::select(kernels)?;
    let started = Instant::now();
    let linker_dir = build::build(false)?;
    toolchain::run(toolchain::cargo(&linker_dir).args(["build", "--locked", "--bins"]))?;
    let tests = test_binaries(&linker_dir)?;
    let base = base_archive(&tests)?;
    eprintln!(
        "xtask: initramfs of {:.0} MiB built in {:.1} s",
        base.len() as f64 / f64::from(1 << 20),
        started.elapsed().as_secs_f64()
    );
    let mut runs = Vec::new();
    for spec in &kernels {
        let image = fetch::vmlinuz(spec)?;
        let dir = guest_dir(spec.version);
        std::fs::create_dir_all(&dir)?;
        let initrd = dir.join("initramfs.cpio");
        let mut archive = base.clone();
        archive.extend(plan_for(spec)?);
        std::fs::write(&initrd, archive)?;
        eprintln!("xtask: booting {} under QEMU (TCG)", spec.version);
        let run = boot(spec, &image, &initrd, &dir)?;
        finished(&run);
        runs.push(run);
    }
    Ok(runs)
}

/// The integration test executables (`cargo test --no-run`), by test file name.
fn test_binaries(linker_dir: &Path) -> anyhow::Result<BTreeMap<String, PathBuf>> {
    let out = toolchain::cargo(linker_dir)
        .args([
            "test",
            "--locked",
            "--package",
            "collector-tests",
            "--no-run",
            "--message-format=json",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("cargo test --no-run failed: {}", out.status);
    }
    let mut found = BTreeMap::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(message) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let is_test_file = message["target"]["kind"]
            .as_array()
            .is_some_and(|k| k.iter().any(|k| k == "test"));
        if let (true, Some(name), Some(exe)) = (
            is_test_file,
            message["target"]["name"].as_str(),
            message["executable"].as_str(),
        ) {
            found.insert(name.to_owned(), PathBuf::from(exe));
        }
    }
    for suite in SUITES {
        if !found.contains_key(*suite) {
            bail!("test binary {suite} not built");
        }
    }
    Ok(found)
}

/// Everything but the plan: `/init`, the binaries and their libraries, `/bin/sh`, `/etc/hosts`.
fn base_archive(tests: &BTreeMap<String, PathBuf>) -> anyhow::Result<Vec<u8>> {
    let debug = toolchain::workspace_root().join("target/debug");
    let mut archive = Archive::default();
    for dir in ["/dev", "/proc", "/sys", "/tmp", "/root", "/etc"] {
        archive.dir(dir);
    }
    // The kernel opens the console for /init before anything is mounted.
    archive.char_device("/dev/console", 0o600, 5, 1);
    archive.file("/etc/hosts", 0o644, b"127.0.0.1 localhost\n");
    let mut binaries: Vec<(String, PathBuf)> = vec![
        ("/init".to_owned(), debug.join("guest-init")),
        (format!("{GUEST_TARGET}/collector"), debug.join("collector")),
        (
            format!("{GUEST_TARGET}/standin-vmm"),
            debug.join("standin-vmm"),
        ),
        (
            format!("{GUEST_TARGET}/syscall-cost"),
            debug.join("syscall-cost"),
        ),
    ];
    for suite in SUITES {
        binaries.push((
            format!("{GUEST_TARGET}/deps/{suite}"),
            tests[*suite].clone(),
        ));
    }
    let sh = std::fs::canonicalize("/bin/sh").context("/bin/sh")?;
    let mut libraries = std::collections::BTreeSet::new();
    for (_, path) in &binaries {
        libraries.extend(initramfs::shared_libraries(path)?);
    }
    libraries.extend(initramfs::shared_libraries(&sh)?);
    for (guest, host) in &binaries {
        archive.host_file(guest, host, true)?;
    }
    archive.host_file("/bin/sh", &sh, false)?;
    for library in &libraries {
        archive.host_file(&library.display().to_string(), library, false)?;
    }
    // The archive's trailer comes with the plan (concatenated archives unpack as one).
    let mut bytes = archive.finish();
    bytes.truncate(bytes.len() - trailer_len());
    Ok(bytes)
}

fn trailer_len() -> usize {
    Archive::default().finish().len()
}

/// `/plan.json` for `spec`: the suites, their environment, the probe collector.
fn plan_archive(spec: &KernelSpec, only: &[String]) -> anyhow::Result<Vec<u8>> {
    let wanted = |name: &str| only.is_empty() || only.iter().any(|o| o == name);
    let mut suites = Vec::new();
    for suite in SUITES.iter().filter(|s| wanted(s)) {
        suites.push(json!({
            "name": suite,
            "binary": format!("{GUEST_TARGET}/deps/{suite}"),
            "args": [],
            "env": {},
            "timeout_seconds": 20 * 60,
        }));
    }
    for (name, hooks, kernels) in FORCED_CONSOLE {
        if kernels.contains(&spec.version) && wanted(name) {
            suites.push(json!({
                "name": name,
                "binary": format!("{GUEST_TARGET}/deps/console"),
                "args": [],
                "env": {"COLLECTOR_TEST_CONSOLE_HOOKS": hooks},
                "timeout_seconds": 20 * 60,
            }));
        }
    }
    plan_json(&suites)
}

/// `/plan.json` for a kernel-hooks bench ([`crate::bench`]): `syscall-cost` with `args` as the
/// one suite.
pub(crate) fn bench_plan_archive(args: &[String]) -> anyhow::Result<Vec<u8>> {
    plan_json(&[json!({
        "name": "syscall-cost",
        "binary": format!("{GUEST_TARGET}/syscall-cost"),
        "args": args,
        // The harness finds them beside test executables in `deps/`, not beside a binary.
        "env": {
            "COLLECTOR_BIN": format!("{GUEST_TARGET}/collector"),
            "STANDIN_VMM_BIN": format!("{GUEST_TARGET}/standin-vmm"),
        },
        "timeout_seconds": 25 * 60,
    })])
}

/// The plan archive: `suites`, the guests' common environment, the probe collector.
fn plan_json(suites: &[serde_json::Value]) -> anyhow::Result<Vec<u8>> {
    let plan = json!({
        "env": {
            "PATH": "/bin:/usr/bin",
            "HOME": "/root",
            "TMPDIR": "/tmp",
            "CI": "true",
            "RUST_BACKTRACE": "1",
            "COLLECTOR_TEST_TIME_SCALE": TIME_SCALE.to_string(),
        },
        "suites": suites,
        "collector": format!("{GUEST_TARGET}/collector"),
        "ready_seconds": 300,
    });
    // A fresh archive numbers its inodes from 1 again: the kernel keys hard links by
    // (ino, nlink > 1), and every entry here has nlink 1, so the overlap is harmless.
    let mut archive = Archive::default();
    archive.file(
        "/plan.json",
        0o644,
        serde_json::to_string_pretty(&plan)?.as_bytes(),
    );
    Ok(archive.finish())
}

/// Boots `image` with `initrd`, waits for QEMU to end (killing it after [`GUEST_TIMEOUT`]),
/// and reads what the guest reported.
fn boot(spec: &KernelSpec, image: &Path, initrd: &Path, dir: &Path) -> anyhow::Result<KernelRun> {
    let console = dir.join("console.log");
    let results = dir.join("results.txt");
    let _ = std::fs::remove_file(&console);
    let _ = std::fs::remove_file(&results);
    let started = Instant::now();
    let mut qemu = Command::new("qemu-system-x86_64")
        // One TCG thread for both vCPUs: with a thread per vCPU, a jump label patched with
        // int3 (text_poke_bp, e.g. when a tracepoint is enabled) can still be executed as int3
        // by the other vCPU's stale translation, an Oops in the emulator and not the kernel
        // (seen in syscall_trace_enter on 6.12).
        .args(["-accel", "tcg,thread=single", "-cpu", "max"])
        .args(["-smp", "2", "-m", "2048"])
        .args(["-nodefaults", "-display", "none", "-no-reboot"])
        .arg("-serial")
        .arg(format!("file:{}", console.display()))
        .arg("-serial")
        .arg(format!("file:{}", results.display()))
        .args(["-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"])
        .arg("-kernel")
        .arg(image)
        .arg("-initrd")
        .arg(initrd)
        .args([
            "-append",
            "console=ttyS0 panic=-1 rdinit=/init nokaslr mitigations=off",
        ])
        .stdin(Stdio::null())
        .spawn()
        .context("start qemu-system-x86_64 (Debian package qemu-system-x86)")?;
    let status = loop {
        if let Some(status) = qemu.try_wait()? {
            break status;
        }
        if started.elapsed() > GUEST_TIMEOUT {
            let _ = qemu.kill();
            break qemu.wait()?;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    let read = |path: &Path| {
        std::fs::read(path)
            .map(|b| String::from_utf8_lossy(&b).into_owned())
            .unwrap_or_default()
    };
    let mut run = KernelRun::parse(spec, &read(&results), &read(&console));
    run.qemu_status = status.code();
    run.seconds = started.elapsed().as_secs_f64();
    Ok(run)
}

/// The page's first line: when this run was, and whether every kernel of it passed.
fn status(runs: &[KernelRun]) -> String {
    let failed: Vec<&str> = runs
        .iter()
        .filter(|r| !r.failures().is_empty())
        .map(|r| r.version.as_str())
        .collect();
    let verdict = if failed.is_empty() {
        format!("all {} kernels below pass", runs.len())
    } else {
        format!("FAILED on {}", failed.join(", "))
    };
    let days = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() / 86_400);
    format!(
        "**Status ({}):** {verdict}. `cargo xtask test` (CI) runs this matrix after the host's \
         tests; `COLLECTOR_TEST_KERNELS=0` leaves it out of a local run.",
        civil_date(days)
    )
}

/// `YYYY-MM-DD` (UTC) of `days` since 1970-01-01 (H. Hinnant's `civil_from_days`).
fn civil_date(days: u64) -> String {
    let z = days + 719_468;
    let era = z / 146_097;
    let doe = z % 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let day = doy - (153 * mp + 2) / 5 + 1;
    let month = if mp < 10 { mp + 3 } else { mp - 9 };
    let year = yoe + era * 400 + u64::from(month <= 2);
    format!("{year:04}-{month:02}-{day:02}")
}

/// docs/kernels.md: what the matrix is, and this run's tables.
fn document(runs: &[KernelRun]) -> String {
    format!(
        "# Supported kernels\n\n\
         {}\n\n\
         Generated by `cargo xtask test-kernels --update-docs` from its last run; do not edit by \
         hand. A kernel is *supported* when the whole end-to-end suite below passes inside it \
         on every CI run (see the README). Each row is a Debian cloud kernel booted under QEMU \
         (TCG) with the collector, the stand-in VMM and the compiled integration tests in its \
         initramfs; the host's own kernel runs the same tests in `cargo xtask test`.\n\n\
         {}\n\
         *probes attached*: `collector_probe_attached` of a collector started with the defaults \
         after the suites. *verifier insns*: instructions the verifier processed for each \
         program (`verified_insns` of BPF_OBJ_GET_INFO_BY_FD, which kernels before 5.16 do not \
         have; aya 0.16 keeps no verifier log of a successful load, so 5.10 shows n/a).\n\n\
         ## What differs between these kernels, and how the collector handles it\n\n\
         | difference | kernels | how |\n\
         | --- | --- | --- |\n\
         | `mark_victim(int pid)` vs `mark_victim(struct task_struct *, uid_t)` | pid: 5.10; task: \
         6.1.192 (backported, so the version does not predict it), 6.12, 6.18 | the form is read \
         from the BTF of `btf_trace_mark_victim` at load (`mark_victim_has_task`). With a pid \
         only, the victim's memory counters and memory cgroup are read from `current` when the \
         pid names it (a VMM outgrowing its memory cgroup hits the OOM itself); else the event \
         has the pid and no counters |\n\
         | `task_struct.state` (long) became `__state` (unsigned int) | 5.14 | offset and size \
         from BTF; `sched_switch` reads the state from `prev` rather than `prev_state` (which \
         the tracepoint has only from 5.18) |\n\
         | `sched_process_exit` gained `group_dead` and runs before `exit_mm()` | 6.16 | the \
         program takes only the task (from `current`) and reads `signal->live`, exit codes and \
         signal flags, never `mm`, so the order does not matter |\n\
         | BPF memory charged to RLIMIT_MEMLOCK (64 KiB by default) | before 5.11 (5.10) | the \
         collector lifts its RLIMIT_MEMLOCK before loading; the guest's `/init` leaves the \
         default in place so this is tested |\n\
         | no v1 memory controller (`MEMCG_V1` off) | 6.12 | the collector resolves memory \
         cgroups on v1 and v2 alike; the OOM tests use v2 `memory.max` there |\n\
         | `verified_insns` in BPF_OBJ_GET_INFO_BY_FD | 5.16+ | \
         `collector_ebpf_program_verified_instructions` is absent before |\n\
         | a bound learnt by comparing one register is carried over to its copies (spilled \
         ones too) | from 5.11 | the console write path clamps the length to its size class \
         on the very register it passes to `bpf_probe_read_user`, behind a one-instruction \
         `asm!` barrier so LLVM cannot drop the clamp as redundant (`opaque` in \
         collector-ebpf/src/console.rs) |\n\
         | 512 bytes of stack for a program and the functions it calls, together | before 6.13 \
         (tracing programs get a private stack from then on) | `console_exit` and `capture` \
         keep under it together (152 + 112 bytes): a new process's console state is built in \
         the per-CPU scratch record, not on the stack |\n\
         | `fexit` on the syscall handlers (`__x64_sys_write`, ...) | allowed by every kernel \
         here (booted without lockdown); refused by the CI host's 6.18 (lockdown: \
         `BPF_PROG_LOAD` answers `EPERM`) | `kernel.console_hooks = \"auto\"` attaches all \
         13 `console_fexit_*` programs or none, and otherwise falls back to the per-syscall \
         tracepoints (whose cost every task pays: [benchmarks.md](benchmarks.md#kernel-hooks)) |\n\n\
         ## Verifier: instructions processed, per program\n\n{}\n\
         ## Tests, per kernel\n\n\
         `console` runs with the default `kernel.console_hooks = \"auto\"`, which picks `fexit` \
         on the syscall handlers wherever the kernel allows it; `console-syscall-tracepoints` \
         and `console-raw-syscalls` are the console suite again with \
         `kernel.console_hooks = \"syscall_tracepoints\"` and `\"raw_syscalls\"`.\n\n{}",
        status(runs),
        report::table(runs),
        report::verifier_table(runs),
        report::tests_table(runs),
    )
}

#[cfg(test)]
mod tests {
    use super::civil_date;

    #[test]
    fn civil_dates() {
        assert_eq!(civil_date(0), "1970-01-01");
        assert_eq!(civil_date(11_016), "2000-02-29");
        assert_eq!(civil_date(20_790), "2026-12-03");
    }
}
