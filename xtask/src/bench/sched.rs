//! `cargo xtask bench sched`: what the scheduling programs cost.
//!
//! A context-switch-heavy load (`hackbench --pipe --threads`) runs in five modes, interleaved
//! round after round so that a noisy machine disturbs them alike: without any probe; with the
//! collector and no instance; with 32 idle-ish stand-in VMMs and no probe; with the collector
//! following those 32; with a bpftrace script that computes the same run-queue histogram for
//! every process. With `--compare-with COLLECTOR`, another collector binary (one built from main,
//! say) runs in two more modes, with 0 and with the instances, in the same rounds. Per-event
//! costs come from the kernel's BPF statistics (run time / run count over the load), the slowdown
//! from hackbench's own time. Root only; installs `rt-tests`, `bpftrace` and `bpftool` if
//! missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use super::{Guard, ensure_debian_packages, is_root, median, metric, start_bpftrace, wait_until};
use crate::{build, toolchain};

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Rounds; each runs every mode once.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// hackbench groups (`-g`).
    #[arg(long, default_value_t = 2)]
    groups: u32,
    /// hackbench loops (`-l`).
    #[arg(long, default_value_t = 1000)]
    loops: u32,
    /// Followed instances in the loaded modes.
    #[arg(long, default_value_t = 32)]
    instances: usize,
    /// Another collector binary (say, one built from main) to run in two more modes, with 0
    /// and with the instances, interleaved with the others: before/after figures from one run.
    #[arg(long, value_name = "COLLECTOR")]
    compare_with: Option<PathBuf>,
}

/// The programs whose per-event cost is reported (bpftrace has the first three).
const PROGRAMS: [&str; 4] = [
    "sched_switch",
    "sched_wakeup",
    "sched_wakeup_new",
    "task_rename",
];

/// bpftrace's version of the collector's histogram, for every process (by name): wake-ups and
/// preemptions start a wait, the switch to the thread ends it. Classic tracepoints, as one
/// writes it in bpftrace; `prev_state` 0 or `TASK_REPORT_MAX` (preempted) is still runnable.
const BPFTRACE_SCRIPT: &str = r"
tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new {
  @qtime[args->pid] = nsecs;
}
tracepoint:sched:sched_switch {
  if ((args->prev_state & 0xff) == 0) { @qtime[args->prev_pid] = nsecs; }
  $t = @qtime[args->next_pid];
  if ($t) {
    @usecs[args->next_comm] = hist((nsecs - $t) / 1000);
    delete(@qtime[args->next_pid]);
  }
}
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Detached,
    Collector,
    /// The `--compare-with` collector.
    Compared,
    DetachedInstances,
    CollectorInstances,
    ComparedInstances,
    Bpftrace,
}

/// The modes of each round, in order.
fn modes(options: &Options) -> Vec<Mode> {
    let compared = options.compare_with.is_some();
    [
        (Mode::Detached, true),
        (Mode::Collector, true),
        (Mode::Compared, compared),
        (Mode::DetachedInstances, true),
        (Mode::CollectorInstances, true),
        (Mode::ComparedInstances, compared),
        (Mode::Bpftrace, true),
    ]
    .into_iter()
    .filter_map(|(mode, on)| on.then_some(mode))
    .collect()
}

impl Mode {
    fn label(self, instances: usize) -> String {
        match self {
            Self::Detached => "no probes".into(),
            Self::Collector => "collector, 0 instances".into(),
            Self::Compared => "compared, 0 instances".into(),
            Self::DetachedInstances => format!("no probes, {instances} stand-ins"),
            Self::CollectorInstances => format!("collector, {instances} instances"),
            Self::ComparedInstances => format!("compared, {instances} instances"),
            Self::Bpftrace => "bpftrace script".into(),
        }
    }

    /// The mode this one's slowdown is measured against.
    fn baseline(self) -> Option<Self> {
        match self {
            Self::Collector | Self::Compared | Self::Bpftrace => Some(Self::Detached),
            Self::CollectorInstances | Self::ComparedInstances => Some(Self::DetachedInstances),
            Self::Detached | Self::DetachedInstances => None,
        }
    }

    fn with_instances(self) -> bool {
        matches!(
            self,
            Self::DetachedInstances | Self::CollectorInstances | Self::ComparedInstances
        )
    }
}

/// One run of the load in one mode.
struct Sample {
    /// hackbench's own time (wall clock).
    load_seconds: f64,
    /// CPU time (user + system) hackbench used: what the probes add to its switches, less
    /// disturbed than wall time by whatever else the machine runs.
    load_cpu_seconds: f64,
    /// ns per run of each of [`PROGRAMS`], NaN when not there.
    ns_per_event: [f64; 4],
    /// Time spent in those programs during the load, as a share of the machine's CPU time:
    /// their direct cost, which the noise of a shared machine does not hide.
    probe_share: f64,
}

struct Bench<'a> {
    options: &'a Options,
    collector: PathBuf,
    standin: PathBuf,
    script: PathBuf,
    work: PathBuf,
}

pub(super) fn run(options: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("bench sched loads kernel programs: run it as root");
    }
    ensure_debian_packages(&[
        ("hackbench", "rt-tests"),
        ("bpftrace", "bpftrace"),
        ("bpftool", "bpftool"),
        ("time", "time"),
    ])?;
    // bpftrace's classic tracepoints need tracefs.
    super::ensure_tracefs()?;
    // The debug collector embeds the same kernel object as a release one (always optimised).
    let linker_dir = build::build(false)?;
    toolchain::run(toolchain::cargo(&linker_dir).args([
        "build",
        "--locked",
        "--package",
        "collector-tests",
        "--bin",
        "standin-vmm",
    ]))?;
    let root = toolchain::workspace_root();
    let work = std::env::temp_dir().join(format!("bench-sched-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let standin = work.join("firecracker");
    std::fs::copy(root.join("target/debug/standin-vmm"), &standin)?;
    let script = work.join("runqlat.bt");
    std::fs::write(&script, BPFTRACE_SCRIPT)?;
    let bench = Bench {
        options,
        collector: root.join("target/debug/collector"),
        standin,
        script,
        work: work.clone(),
    };

    // Statistics on for every mode alike (the collector turns them on itself anyway).
    let _stats = BpfStats::enable()?;
    let modes = modes(options);
    let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
    for round in 1..=options.rounds {
        for (i, mode) in modes.iter().enumerate() {
            let sample = bench
                .run_mode(*mode)
                .with_context(|| format!("round {round}: {}", mode.label(options.instances)))?;
            eprintln!(
                "xtask: round {round}/{}: {:<28} {:.3} s, {:.2} s CPU",
                options.rounds,
                mode.label(options.instances),
                sample.load_seconds,
                sample.load_cpu_seconds
            );
            samples[i].push(sample);
        }
    }
    let _ = std::fs::remove_dir_all(&work);
    print_table(options, &modes, &samples);
    Ok(())
}

impl Bench<'_> {
    fn run_mode(&self, mode: Mode) -> anyhow::Result<Sample> {
        let with_instances = mode.with_instances();
        let mut collector = match mode {
            Mode::Collector | Mode::CollectorInstances => {
                Some(self.start_collector(&self.collector)?)
            }
            Mode::Compared | Mode::ComparedInstances => {
                let binary = self
                    .options
                    .compare_with
                    .as_ref()
                    .context("--compare-with")?;
                Some(self.start_collector(binary)?)
            }
            _ => None,
        };
        let mut standins = Vec::new();
        if with_instances {
            for i in 0..self.options.instances {
                standins.push(Guard(
                    Command::new(&self.standin)
                        .args(["--no-api", "--uuid", &format!("bench-{i}")])
                        .env("STANDIN_VCPUS", "2")
                        .env("STANDIN_TICK_MS", "10")
                        .stdout(Stdio::null())
                        .spawn()?,
                ));
            }
        }
        if let Some((_, addr)) = &collector
            && with_instances
        {
            let want = self.options.instances as f64;
            wait_until(Duration::from_secs(10), || {
                metric(
                    &super::http_get(addr, "/metrics").unwrap_or_default(),
                    "collector_instances",
                ) == Some(want)
            })
            .context("the collector did not find the stand-ins")?;
        }
        let mut bpftrace = match mode {
            Mode::Bpftrace => Some(start_bpftrace(&self.script)?),
            _ => None,
        };

        let before = Self::program_stats(collector.as_ref(), bpftrace.as_ref())?;
        let (load_seconds, load_cpu_seconds) = self.load()?;
        let after = Self::program_stats(collector.as_ref(), bpftrace.as_ref())?;
        let mut ns_per_event = [f64::NAN; 4];
        let mut probe_ns = 0.0;
        for (i, ((t0, n0), (t1, n1))) in before.iter().zip(&after).enumerate() {
            if n1 > n0 {
                ns_per_event[i] = (t1 - t0) / (n1 - n0);
            }
            probe_ns += t1 - t0;
        }
        let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get) as f64;
        let probe_share = probe_ns / (load_seconds * 1e9 * cpus);
        drop(standins);
        if let Some(child) = bpftrace.as_mut() {
            let _ = child.0.kill();
        }
        if let Some((child, _)) = collector.as_mut() {
            let _ = child.0.kill();
        }
        Ok(Sample {
            load_seconds,
            load_cpu_seconds,
            ns_per_event,
            probe_share,
        })
    }

    /// Runs hackbench once, under GNU time: its own "Time:" (the load, without process
    /// start-up) and the CPU time it used.
    fn load(&self) -> anyhow::Result<(f64, f64)> {
        let out = Command::new("time")
            .args(["-f", "cpu %U %S", "hackbench", "--pipe", "--threads", "-g"])
            .arg(self.options.groups.to_string())
            .arg("-l")
            .arg(self.options.loops.to_string())
            .output()
            .context("hackbench")?;
        let text = String::from_utf8_lossy(&out.stdout);
        let wall = text
            .lines()
            .find_map(|l| l.strip_prefix("Time:"))
            .and_then(|t| t.trim().parse().ok())
            .with_context(|| format!("no time in hackbench output: {text}"))?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        let cpu = stderr
            .lines()
            .find_map(|l| l.strip_prefix("cpu "))
            .and_then(|t| {
                let (user, system) = t.trim().split_once(' ')?;
                Some(user.parse::<f64>().ok()? + system.parse::<f64>().ok()?)
            })
            .with_context(|| format!("no CPU time from GNU time: {stderr}"))?;
        Ok((wall, cpu))
    }

    fn start_collector(&self, binary: &Path) -> anyhow::Result<(Guard, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        // The stand-ins' folder is the bench's own: trusted, or the collector refuses them.
        let config = self.work.join("collector.toml");
        std::fs::write(
            &config,
            format!("trusted_executable_dirs = [\"{}\"]\n", self.work.display()),
        )?;
        let child = Guard(
            Command::new(binary)
                .args(["run", "--listen", &addr, "--config"])
                .arg(&config)
                .arg("--log-dir")
                .arg(self.work.join("logs"))
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("collector")?,
        );
        wait_until(Duration::from_secs(30), || {
            super::http_get(&addr, "/readyz").is_ok_and(|r| r.contains("\"ready\":true"))
        })
        .context("the collector did not become ready")?;
        Ok((child, addr))
    }

    /// `(run time ns, run count)` of each of [`PROGRAMS`] of the running collector or bpftrace.
    fn program_stats(
        collector: Option<&(Guard, String)>,
        bpftrace: Option<&Guard>,
    ) -> anyhow::Result<[(f64, f64); 4]> {
        let mut stats = [(0.0, 0.0); 4];
        if let Some((_, addr)) = collector {
            let metrics = super::http_get(addr, "/metrics")?;
            for (i, program) in PROGRAMS.iter().enumerate() {
                let label = format!("{{program=\"{program}\"}}");
                let seconds = metric(
                    &metrics,
                    &format!("collector_ebpf_program_run_seconds_total{label}"),
                );
                let runs = metric(
                    &metrics,
                    &format!("collector_ebpf_program_runs_total{label}"),
                );
                stats[i] = (seconds.unwrap_or(0.0) * 1e9, runs.unwrap_or(0.0));
            }
        }
        if let Some(bpftrace) = bpftrace {
            for (name, run_time_ns, run_cnt) in process_programs(bpftrace.0.id())? {
                if let Some(i) = PROGRAMS.iter().position(|p| name == *p) {
                    stats[i] = (run_time_ns, run_cnt);
                }
            }
        }
        Ok(stats)
    }
}

/// `(name, run time ns, run count)` of the BPF programs process `pid` holds, from
/// `/proc/PID/fdinfo` (the kernel's statistics) and bpftool (names; bpftool cuts them to 15
/// bytes as the kernel stores them).
fn process_programs(pid: u32) -> anyhow::Result<Vec<(String, f64, f64)>> {
    let mut programs = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/fd"))?.flatten() {
        let is_prog = std::fs::read_link(entry.path())
            .is_ok_and(|l| l.to_string_lossy() == "anon_inode:bpf-prog");
        if !is_prog {
            continue;
        }
        let info = std::fs::read_to_string(format!(
            "/proc/{pid}/fdinfo/{}",
            entry.file_name().to_string_lossy()
        ))?;
        let field = |name: &str| -> Option<f64> {
            info.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(':'))
                .and_then(|v| v.trim().parse().ok())
        };
        let (Some(id), Some(time), Some(count)) =
            (field("prog_id"), field("run_time_ns"), field("run_cnt"))
        else {
            continue;
        };
        let out = Command::new("bpftool")
            .args(["prog", "show", "id", &id.to_string(), "--json"])
            .output()
            .context("bpftool")?;
        let json = String::from_utf8_lossy(&out.stdout);
        let name = json
            .split("\"name\":\"")
            .nth(1)
            .and_then(|rest| rest.split('"').next())
            .unwrap_or_default()
            .to_owned();
        programs.push((name, time, count));
    }
    Ok(programs)
}

fn print_table(options: &Options, modes: &[Mode], samples: &[Vec<Sample>]) {
    let n = options.instances;
    let stat = |i: usize, f: &dyn Fn(&Sample) -> f64| {
        median(&samples[i].iter().map(f).collect::<Vec<_>>())
    };
    let load = |i: usize| stat(i, &|s| s.load_seconds);
    let load_cpu = |i: usize| stat(i, &|s| s.load_cpu_seconds);
    let cost = |i: usize, p: usize| stat(i, &|s| s.ns_per_event[p]);
    let index = |mode: Mode| modes.iter().position(|m| *m == mode);
    let slowdown = |mode: Mode| {
        mode.baseline()
            .zip(index(mode))
            .and_then(|(base, i)| Some((load(i) / load(index(base)?) - 1.0) * 100.0))
    };
    let cpu_slowdown = |mode: Mode| {
        mode.baseline()
            .zip(index(mode))
            .and_then(|(base, i)| Some((load_cpu(i) / load_cpu(index(base)?) - 1.0) * 100.0))
    };
    println!(
        "\nbench sched: hackbench --pipe --threads -g {} -l {}, {} rounds, medians; \
         ns per run from the kernel's BPF statistics",
        options.groups, options.loops, options.rounds
    );
    println!(
        "| mode | load s | slowdown | load CPU s | CPU slowdown | probe CPU | {} |",
        PROGRAMS.map(|p| format!("{p} ns")).join(" | ")
    );
    println!(
        "| --- | --- | --- | --- | --- | --- |{}",
        " --- |".repeat(PROGRAMS.len())
    );
    for (i, mode) in modes.iter().enumerate() {
        let slow = slowdown(*mode).map_or("-".to_owned(), |s| format!("{s:+.1}%"));
        let cpu_slow = cpu_slowdown(*mode).map_or("-".to_owned(), |s| format!("{s:+.1}%"));
        let costs: Vec<String> = (0..PROGRAMS.len())
            .map(|p| {
                let c = cost(i, p);
                if c.is_nan() {
                    "-".into()
                } else {
                    format!("{c:.0}")
                }
            })
            .collect();
        let share = stat(i, &|s| s.probe_share);
        let share = if mode.baseline().is_some() {
            format!("{:.2}%", share * 100.0)
        } else {
            "-".into()
        };
        println!(
            "| {} | {:.3} | {slow} | {:.2} | {cpu_slow} | {share} | {} |",
            mode.label(n),
            load(i),
            load_cpu(i),
            costs.join(" | ")
        );
    }
    let measured = [
        Mode::Collector,
        Mode::CollectorInstances,
        Mode::Compared,
        Mode::ComparedInstances,
    ];
    let measured = measured.iter().copied().filter(|m| modes.contains(m));
    let bpftrace_switch = index(Mode::Bpftrace).map_or(f64::NAN, |i| cost(i, 0));
    for mode in measured.clone() {
        let ratio = index(mode).map_or(f64::NAN, |i| cost(i, 0)) / bpftrace_switch;
        println!(
            "{}: sched_switch costs {ratio:.2}x bpftrace's per event (target <= 0.5: {})",
            mode.label(n),
            verdict(ratio <= 0.5)
        );
    }
    for mode in measured {
        let slow = slowdown(mode).unwrap_or(f64::NAN);
        let cpu_slow = cpu_slowdown(mode).unwrap_or(f64::NAN);
        println!(
            "{}: load slowed by {slow:+.1}% wall, {cpu_slow:+.1}% CPU vs {} (target <= 2%: {} \
             / {})",
            mode.label(n),
            mode.baseline().map_or(String::new(), |b| b.label(n)),
            verdict(slow <= 2.0),
            verdict(cpu_slow <= 2.0)
        );
    }
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}

/// Turns `kernel.bpf_stats_enabled` on, and back to what it was when dropped.
struct BpfStats(String);

const BPF_STATS_SYSCTL: &str = "/proc/sys/kernel/bpf_stats_enabled";

impl BpfStats {
    fn enable() -> anyhow::Result<Self> {
        let old = std::fs::read_to_string(BPF_STATS_SYSCTL).context(BPF_STATS_SYSCTL)?;
        std::fs::write(BPF_STATS_SYSCTL, "1").context(BPF_STATS_SYSCTL)?;
        Ok(Self(old.trim().to_owned()))
    }
}

impl Drop for BpfStats {
    fn drop(&mut self) {
        let _ = std::fs::write(BPF_STATS_SYSCTL, &self.0);
    }
}
