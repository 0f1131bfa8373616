//! What one guest reported: its result-port lines, read back, with the console checked for
//! kernel splats; and the per-kernel table made from them.

use std::fmt::Write as _;

use super::fetch::KernelSpec;

/// Console lines that mean the kernel itself went wrong, whatever the tests said.
const SPLATS: &[&str] = &[
    "WARNING:",
    "BUG:",
    "Oops",
    "soft lockup",
    "RCU stall",
    "rcu_sched self-detected stall",
    "Kernel panic",
    "general protection fault",
];

/// One test's outcome inside a guest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct TestOutcome {
    pub(crate) suite: String,
    pub(crate) test: String,
    pub(crate) outcome: String,
}

/// A guest's run, as its result port and console tell it.
#[derive(Debug, Default)]
pub(crate) struct KernelRun {
    pub(crate) version: String,
    pub(crate) release: Option<String>,
    pub(crate) boot_ms: Option<u64>,
    pub(crate) tests: Vec<TestOutcome>,
    /// `(suite, exit code, seconds)`.
    pub(crate) suites: Vec<(String, i32, f64)>,
    pub(crate) readyz: Option<u16>,
    pub(crate) probes: Vec<(String, bool)>,
    pub(crate) verifier: Vec<(String, u64)>,
    pub(crate) errors: Vec<String>,
    /// A bench's `bench MODE FIGURE VALUE` lines (VALUE may have spaces).
    pub(crate) bench: Vec<(String, String, String)>,
    pub(crate) splats: Vec<String>,
    pub(crate) done: bool,
    /// QEMU's exit status: 1 when the init reported success through isa-debug-exit.
    pub(crate) qemu_status: Option<i32>,
    pub(crate) seconds: f64,
}

impl KernelRun {
    /// Reads the result-port lines and the console of `spec`'s guest.
    pub(crate) fn parse(spec: &KernelSpec, results: &str, console: &str) -> Self {
        let mut run = Self {
            version: spec.version.to_owned(),
            ..Self::default()
        };
        for line in results.lines().map(str::trim) {
            let mut words = line.splitn(2, ' ');
            let (key, rest) = (words.next().unwrap_or_default(), words.next().unwrap_or(""));
            let fields: Vec<&str> = rest.split_whitespace().collect();
            match (key, fields.as_slice()) {
                ("kernel", [release]) => run.release = Some((*release).to_owned()),
                ("boot_ms", [ms]) => run.boot_ms = ms.parse().ok(),
                ("test", [suite, test, outcome]) => run.tests.push(TestOutcome {
                    suite: (*suite).to_owned(),
                    test: (*test).to_owned(),
                    outcome: (*outcome).to_owned(),
                }),
                ("suite", [suite, exit, seconds]) => run.suites.push((
                    (*suite).to_owned(),
                    exit.strip_prefix("exit=")
                        .and_then(|c| c.parse().ok())
                        .unwrap_or(-1),
                    seconds
                        .strip_prefix("seconds=")
                        .and_then(|s| s.parse().ok())
                        .unwrap_or(0.0),
                )),
                ("readyz", [status]) => run.readyz = status.parse().ok(),
                ("probe", [probe, attached]) => {
                    run.probes.push(((*probe).to_owned(), *attached == "1"));
                }
                ("verifier", [program, insns]) => {
                    if let Ok(insns) = insns.parse() {
                        run.verifier.push(((*program).to_owned(), insns));
                    }
                }
                ("error", _) => run.errors.push(rest.to_owned()),
                ("bench", [mode, figure, ..]) => {
                    let value = rest.splitn(3, ' ').nth(2).unwrap_or_default();
                    run.bench
                        .push(((*mode).to_owned(), (*figure).to_owned(), value.to_owned()));
                }
                ("done", []) => run.done = true,
                _ => {}
            }
        }
        run.splats = console
            .lines()
            .filter(|line| SPLATS.iter().any(|s| line.contains(s)))
            .map(|line| line.trim().to_owned())
            .collect();
        run
    }

    pub(crate) fn passed_tests(&self) -> usize {
        self.tests.iter().filter(|t| t.outcome == "ok").count()
    }

    pub(crate) fn counted_tests(&self) -> usize {
        self.tests.iter().filter(|t| t.outcome != "ignored").count()
    }

    pub(crate) fn attached_probes(&self) -> usize {
        self.probes.iter().filter(|(_, a)| *a).count()
    }

    /// Why this kernel's run failed; empty when it passed.
    pub(crate) fn failures(&self) -> Vec<String> {
        let mut why = Vec::new();
        if !self.done {
            why.push("no success line (`done`) on the result port".to_owned());
        }
        if self.qemu_status != Some(1) {
            why.push(format!(
                "QEMU exit status {:?}, not 1 (isa-debug-exit with 0)",
                self.qemu_status
            ));
        }
        for t in self.tests.iter().filter(|t| t.outcome == "FAILED") {
            why.push(format!("test {} {} FAILED", t.suite, t.test));
        }
        for (suite, code, _) in self.suites.iter().filter(|(_, c, _)| *c != 0) {
            why.push(format!("suite {suite} exited {code}"));
        }
        if self.tests.is_empty() {
            why.push("no test ran".to_owned());
        }
        if self.readyz != Some(200) {
            why.push(format!("/readyz answered {:?}", self.readyz));
        }
        if self.probes.is_empty() {
            why.push("no probe reported".to_owned());
        }
        for (probe, _) in self.probes.iter().filter(|(_, a)| !a) {
            why.push(format!("probe {probe} not attached"));
        }
        why.extend(self.errors.iter().map(|e| format!("guest: {e}")));
        why.extend(self.splats.iter().map(|s| format!("kernel splat: {s}")));
        why
    }

    fn verifier_total(&self) -> Option<u64> {
        (!self.verifier.is_empty()).then(|| self.verifier.iter().map(|(_, n)| n).sum())
    }
}

/// The per-kernel summary table (Markdown; it reads as plain text in a terminal too).
pub(crate) fn table(runs: &[KernelRun]) -> String {
    let mut out = String::from(
        "| kernel | release | boot to /init | probes attached | tests passed | verifier insns (all programs) | run | result |\n\
         | --- | --- | --- | --- | --- | --- | --- | --- |\n",
    );
    for run in runs {
        let failures = run.failures();
        let _ = writeln!(
            out,
            "| {} | {} | {} | {}/{} | {}/{} | {} | {:.0} s | {} |",
            run.version,
            run.release.as_deref().unwrap_or("?"),
            run.boot_ms.map_or_else(
                || "?".to_owned(),
                |ms| format!("{:.1} s", ms as f64 / 1000.0)
            ),
            run.attached_probes(),
            run.probes.len(),
            run.passed_tests(),
            run.counted_tests(),
            run.verifier_total()
                .map_or_else(|| "n/a (< 5.16)".to_owned(), |n| n.to_string()),
            run.seconds,
            if failures.is_empty() { "pass" } else { "FAIL" },
        );
    }
    out
}

/// Instructions the verifier processed per program (rows) and kernel (columns).
pub(crate) fn verifier_table(runs: &[KernelRun]) -> String {
    let mut programs: Vec<&str> = runs
        .iter()
        .flat_map(|r| r.verifier.iter().map(|(p, _)| p.as_str()))
        .collect();
    programs.sort_unstable();
    programs.dedup();
    let mut out = String::from("| program |");
    for run in runs {
        let _ = write!(out, " {} |", run.version);
    }
    out.push_str("\n| --- |");
    out.push_str(&" ---: |".repeat(runs.len()));
    out.push('\n');
    for program in programs {
        let _ = write!(out, "| `{program}` |");
        for run in runs {
            let cell = run
                .verifier
                .iter()
                .find(|(p, _)| p == program)
                .map_or_else(|| "n/a".to_owned(), |(_, n)| n.to_string());
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

/// Every test and its outcome per kernel.
pub(crate) fn tests_table(runs: &[KernelRun]) -> String {
    let mut names: Vec<(String, String)> = runs
        .iter()
        .flat_map(|r| r.tests.iter().map(|t| (t.suite.clone(), t.test.clone())))
        .collect();
    names.sort();
    names.dedup();
    let mut out = String::from("| suite | test |");
    for run in runs {
        let _ = write!(out, " {} |", run.version);
    }
    out.push_str("\n| --- | --- |");
    out.push_str(&" --- |".repeat(runs.len()));
    out.push('\n');
    for (suite, test) in names {
        let _ = write!(out, "| {suite} | `{test}` |");
        for run in runs {
            let cell = run
                .tests
                .iter()
                .find(|t| t.suite == suite && t.test == test)
                .map_or("-", |t| t.outcome.as_str());
            let _ = write!(out, " {cell} |");
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kernels::fetch::KERNELS;

    const RESULTS: &str = "kernel 5.10.0-32-cloud-amd64\nboot_ms 2500\n\
        test lifecycle oom_kill_in_a_memory_cgroup ok\ntest lifecycle exit_zero_is_a_stop ok\n\
        suite lifecycle exit=0 seconds=12.5\nreadyz 200\nprobe sched_switch 1\n\
        verifier sched_switch 812\ndone\n";

    fn run(results: &str, console: &str) -> KernelRun {
        let mut run = KernelRun::parse(&KERNELS[0], results, console);
        run.qemu_status = Some(1);
        run
    }

    #[test]
    fn a_clean_run_passes() {
        let run = run(RESULTS, "[    0.000000] Linux version 5.10.0\n");
        assert_eq!(run.failures(), Vec::<String>::new());
        assert_eq!(run.release.as_deref(), Some("5.10.0-32-cloud-amd64"));
        assert_eq!((run.passed_tests(), run.counted_tests()), (2, 2));
        assert_eq!(run.verifier, [("sched_switch".to_owned(), 812)]);
        assert!(
            table(&[run])
                .contains("| 5.10.223 | 5.10.0-32-cloud-amd64 | 2.5 s | 1/1 | 2/2 | 812 |")
        );
    }

    #[test]
    fn a_splat_fails_the_run() {
        let console = "[   12.1] WARNING: CPU: 0 PID: 1 at kernel/bpf/verifier.c:1 foo\n";
        let failures = run(RESULTS, console).failures();
        assert_eq!(failures.len(), 1, "{failures:?}");
        assert!(
            failures[0].contains("kernel splat: [   12.1] WARNING:"),
            "{failures:?}"
        );
        assert_eq!(
            run(RESULTS, "[ 3.0] watchdog: BUG: soft lockup - CPU#1\n")
                .failures()
                .len(),
            1
        );
    }

    #[test]
    fn a_missing_success_line_fails_the_run() {
        let cut = RESULTS.replace("done\n", "");
        let failures = run(&cut, "").failures();
        assert!(
            failures.iter().any(|f| f.contains("no success line")),
            "{failures:?}"
        );
        let mut poweroff = run(RESULTS, "");
        poweroff.qemu_status = Some(0);
        assert_eq!(poweroff.failures().len(), 1, "a poweroff or panic exits 0");
    }

    #[test]
    fn failed_tests_and_detached_probes_fail_the_run() {
        let bad = RESULTS
            .replace("exit_zero_is_a_stop ok", "exit_zero_is_a_stop FAILED")
            .replace("exit=0", "exit=101")
            .replace("probe sched_switch 1", "probe sched_switch 0");
        let failures = run(&bad, "").failures();
        assert_eq!(failures.len(), 3, "{failures:?}");
    }
}
