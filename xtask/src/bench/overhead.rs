//! `cargo xtask bench overhead`: what the collector costs every other task on the host.
//!
//! `--instances` stand-in Firecrackers (2 vCPU threads each, waking every 10 ms) run
//! throughout. Each round runs three loads in every mode, modes interleaved so that a noisy
//! machine disturbs them alike:
//! - `perf bench sched pipe` (each op: 2 context switches, 2 wake-ups, 2 writes, 2 reads);
//! - `perf bench syscall basic` (`getppid`, a syscall no program follows);
//! - `hackbench --pipe --threads`.
//!
//! Modes: nothing attached; the release collector following the stand-ins (kernel BPF
//! statistics off, its default); with `--compare-with`, another collector binary the same
//! way; empty programs on exactly the hooks the collector attaches on this kernel
//! ([`super::empty_programs`]); a bpftrace run-queue script (sched hooks only). Afterwards one
//! more pipe run with the collector's statistics on itemises its cost per program.
//! Root only; installs `linux-perf`, `rt-tests`, `bpftrace` if missing.

use std::{
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::Duration,
};

use anyhow::{Context, bail};

use super::{
    Guard,
    empty_programs::{EmptyPrograms, Hook},
    ensure_debian_packages, is_root, median, metric, start_bpftrace, wait_until,
};
use crate::toolchain;

#[derive(clap::Args)]
pub(crate) struct Options {
    /// Rounds; each runs every load in every mode once.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Stand-in instances running throughout (followed by the collector modes).
    #[arg(long, default_value_t = 32)]
    instances: usize,
    /// `perf bench sched pipe -l`.
    #[arg(long, default_value_t = 20_000)]
    pipe_loops: u32,
    /// `perf bench syscall basic -l`.
    #[arg(long, default_value_t = 2_000_000)]
    syscall_loops: u32,
    /// `hackbench -g`.
    #[arg(long, default_value_t = 2)]
    hackbench_groups: u32,
    /// `hackbench -l`.
    #[arg(long, default_value_t = 500)]
    hackbench_loops: u32,
    /// Another collector binary (say, one built from main) as one more mode: before and after
    /// from one run.
    #[arg(long, value_name = "COLLECTOR")]
    compare_with: Option<PathBuf>,
}

/// The stand-ins' executable name, which only the bench's matcher claims.
const BENCH_VMM: &str = "ovbench";

/// The collector's config in every mode: the bench's matcher instead of the built-ins (with
/// the same vCPU thread names as Firecracker), its folder trusted, no console-file rules (the
/// built-in ones name the built-in matchers; the stand-ins write to stdout).
fn collector_config(work: &Path, extra: &str) -> String {
    format!(
        "disable_builtin_matchers = [\"firecracker\", \"qemu\", \"cloud-hypervisor\"]\n\
         trusted_executable_dirs = [\"{}\"]\n\
         [[matcher]]\nname = \"bench\"\nhypervisor = \"firecracker\"\nexecutable = \"{BENCH_VMM}\"\n\
         instance_id = '--uuid (\\S+)'\nvcpu_thread = '^fc_vcpu ?(\\d+)$'\n\
         [console.files]\n{extra}",
        work.display()
    )
}

/// The run-queue histogram as one writes it in bpftrace (classic tracepoints), as in the
/// sched bench.
const BPFTRACE_SCRIPT: &str = r"
tracepoint:sched:sched_wakeup, tracepoint:sched:sched_wakeup_new { @q[args->pid] = nsecs; }
tracepoint:sched:sched_switch {
  if ((args->prev_state & 0xff) == 0) { @q[args->prev_pid] = nsecs; }
  $t = @q[args->next_pid];
  if ($t) { @usecs[args->next_comm] = hist((nsecs - $t) / 1000); delete(@q[args->next_pid]); }
}
";

#[derive(Clone, Copy, PartialEq, Eq)]
enum Mode {
    Nothing,
    Collector,
    Compared,
    Empty,
    Bpftrace,
}

impl Mode {
    fn label(self) -> &'static str {
        match self {
            Self::Nothing => "nothing attached",
            Self::Collector => "collector",
            Self::Compared => "compared collector",
            Self::Empty => "empty programs on the collector's hooks",
            Self::Bpftrace => "bpftrace runqlat script",
        }
    }
}

/// One round of one mode: pipe µs/op, syscall µs/op, hackbench seconds.
#[derive(Clone, Copy)]
struct Sample {
    pipe_us: f64,
    syscall_us: f64,
    hackbench_s: f64,
}

struct Bench<'a> {
    options: &'a Options,
    collector: PathBuf,
    work: PathBuf,
    script: PathBuf,
    hooks: Vec<String>,
}

pub(super) fn run(options: &Options) -> anyhow::Result<()> {
    if !is_root() {
        bail!("bench overhead loads kernel programs: run it as root");
    }
    ensure_debian_packages(&[
        ("perf", "linux-perf"),
        ("hackbench", "rt-tests"),
        ("bpftrace", "bpftrace"),
    ])?;
    super::ensure_tracefs()?;
    let linker_dir = crate::build::build(true)?;
    toolchain::run(toolchain::cargo(&linker_dir).args([
        "build",
        "--release",
        "--locked",
        "--package",
        "collector-tests",
        "--bin",
        "standin-vmm",
    ]))?;
    let root = toolchain::workspace_root();
    let work = std::env::temp_dir().join(format!("bench-overhead-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    // A name of the bench's own (and a matcher for it): the collector follows these stand-ins
    // and nothing else another user runs on a shared machine.
    let standin = work.join(BENCH_VMM);
    std::fs::copy(root.join("target/release/standin-vmm"), &standin)?;
    let script = work.join("runqlat.bt");
    std::fs::write(&script, BPFTRACE_SCRIPT)?;
    let mut bench = Bench {
        options,
        collector: root.join("target/release/collector"),
        work: work.clone(),
        script,
        hooks: Vec::new(),
    };
    let result = bench.all(&standin);
    let _ = std::fs::remove_dir_all(&work);
    result
}

impl Bench<'_> {
    fn all(&mut self, standin: &Path) -> anyhow::Result<()> {
        let o = self.options;
        let _standins: Vec<Guard> = (0..o.instances)
            .map(|i| {
                Command::new(standin)
                    .args(["--no-api", "--uuid", &format!("overhead-{i}")])
                    .env("STANDIN_VCPUS", "2")
                    .env("STANDIN_TICK_MS", "10")
                    .stdout(Stdio::null())
                    .spawn()
                    .map(Guard)
                    .context("stand-in")
            })
            .collect::<anyhow::Result<_>>()?;
        self.hooks = self.attached_probes()?;
        eprintln!(
            "xtask: the collector attaches {} hooks here: {}",
            self.hooks.len(),
            self.hooks.join(" ")
        );
        let mut modes = vec![Mode::Nothing, Mode::Collector];
        if o.compare_with.is_some() {
            modes.push(Mode::Compared);
        }
        modes.extend([Mode::Empty, Mode::Bpftrace]);
        let mut samples: Vec<Vec<Sample>> = modes.iter().map(|_| Vec::new()).collect();
        for round in 1..=o.rounds {
            for (i, mode) in modes.iter().enumerate() {
                let sample = self
                    .round(*mode)
                    .with_context(|| format!("round {round}: {}", mode.label()))?;
                eprintln!(
                    "xtask: round {round}/{}: {:<40} pipe {:.3} µs/op, getppid {:.4} µs/op, \
                     hackbench {:.3} s",
                    o.rounds,
                    mode.label(),
                    sample.pipe_us,
                    sample.syscall_us,
                    sample.hackbench_s
                );
                samples[i].push(sample);
            }
        }
        print_table(o, &modes, &samples);
        self.itemise()
    }

    /// The probes the collector attaches on this kernel, from its own `/metrics`.
    fn attached_probes(&self) -> anyhow::Result<Vec<String>> {
        let (_collector, addr) = self.start_collector(&self.collector, "")?;
        let metrics = super::http_get(&addr, "/metrics")?;
        let probes: Vec<String> = metrics
            .lines()
            .filter_map(|l| l.strip_prefix("collector_probe_attached{probe=\""))
            .filter_map(|l| l.strip_suffix("\"} 1"))
            .map(str::to_owned)
            .collect();
        if probes.is_empty() {
            bail!("the collector attached no probe");
        }
        Ok(probes)
    }

    fn round(&self, mode: Mode) -> anyhow::Result<Sample> {
        let _attached: Box<dyn std::any::Any> = match mode {
            Mode::Nothing => Box::new(()),
            Mode::Collector => Box::new(self.start_collector(&self.collector, "")?),
            Mode::Compared => {
                let binary = self
                    .options
                    .compare_with
                    .as_ref()
                    .context("--compare-with")?;
                Box::new(self.start_collector(binary, "")?)
            }
            Mode::Empty => {
                let hooks: Vec<Hook> = self.hooks.iter().map(|p| Hook::of_probe(p)).collect();
                Box::new(EmptyPrograms::attach(&hooks)?)
            }
            Mode::Bpftrace => Box::new(start_bpftrace(&self.script)?),
        };
        let o = self.options;
        Ok(Sample {
            pipe_us: perf_bench(&["sched", "pipe", "-l", &o.pipe_loops.to_string()])?,
            syscall_us: perf_bench(&["syscall", "basic", "-l", &o.syscall_loops.to_string()])?,
            hackbench_s: hackbench(o.hackbench_groups, o.hackbench_loops)?,
        })
    }

    /// Starts `binary` with the bench's config and `toml`, waits until it follows every
    /// stand-in.
    fn start_collector(&self, binary: &Path, toml: &str) -> anyhow::Result<(Guard, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let config = self.work.join("collector.toml");
        std::fs::write(&config, collector_config(&self.work, toml))?;
        let child = Guard(
            Command::new(binary)
                .args(["run", "--listen", &addr, "--config"])
                .arg(&config)
                .arg("--log-dir")
                .arg(self.work.join("logs"))
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(self.work.join("collector.log"))?)
                .spawn()
                .context("collector")?,
        );
        let want = self.options.instances as f64;
        wait_until(Duration::from_secs(60), || {
            super::http_get(&addr, "/metrics")
                .is_ok_and(|m| metric(&m, "collector_instances") == Some(want))
        })
        .with_context(|| {
            let log = std::fs::read_to_string(self.work.join("collector.log")).unwrap_or_default();
            let tail: Vec<&str> = log.lines().rev().take(5).collect();
            format!(
                "the collector did not become ready with every stand-in; its last lines: {tail:?}"
            )
        })?;
        Ok((child, addr))
    }

    /// One pipe run with the collector's statistics on: each program's runs per pipe op and
    /// ns per run (the statistics' own clock reads, about 80 ns a run, are in these figures;
    /// they are not in the table above).
    fn itemise(&self) -> anyhow::Result<()> {
        let (_collector, addr) =
            self.start_collector(&self.collector, "[kernel]\nprogram_stats = \"on\"\n")?;
        let stats = |m: &str| -> Vec<(String, f64, f64)> {
            m.lines()
                .filter_map(|l| l.strip_prefix("collector_ebpf_program_runs_total{program=\""))
                .filter_map(|l| {
                    let (program, runs) = l.split_once("\"} ")?;
                    let seconds = metric(
                        m,
                        &format!(
                            "collector_ebpf_program_run_seconds_total{{program=\"{program}\"}}"
                        ),
                    )?;
                    Some((program.to_owned(), runs.trim().parse().ok()?, seconds))
                })
                .collect()
        };
        let before = stats(&super::http_get(&addr, "/metrics")?);
        let loops = self.options.pipe_loops;
        let us = perf_bench(&["sched", "pipe", "-l", &loops.to_string()])?;
        let after = stats(&super::http_get(&addr, "/metrics")?);
        println!(
            "\nitemised (one pipe run of {loops} ops, {us:.3} µs/op, the collector's BPF \
             statistics on):"
        );
        println!("| program | runs per op | ns per run | ns per op |");
        println!("| --- | --- | --- | --- |");
        let mut total = 0.0;
        for (program, runs1, secs1) in &after {
            let Some((_, runs0, secs0)) = before.iter().find(|(p, _, _)| p == program) else {
                continue;
            };
            let runs = runs1 - runs0;
            if runs <= 0.0 {
                continue;
            }
            let ns = (secs1 - secs0) * 1e9;
            let per_op = ns / f64::from(loops);
            total += per_op;
            println!(
                "| {program} | {:.2} | {:.0} | {per_op:.0} |",
                runs / f64::from(loops),
                ns / runs
            );
        }
        println!("| all programs | | | {total:.0} |");
        Ok(())
    }
}

/// `perf bench <args>`'s "usecs/op".
fn perf_bench(args: &[&str]) -> anyhow::Result<f64> {
    let out = Command::new("perf")
        .arg("bench")
        .args(args)
        .output()
        .context("perf bench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.trim().strip_suffix("usecs/op"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no usecs/op from perf bench {args:?}: {text}"))
}

/// hackbench's own "Time:", seconds.
fn hackbench(groups: u32, loops: u32) -> anyhow::Result<f64> {
    let out = Command::new("hackbench")
        .args(["--pipe", "--threads", "-g", &groups.to_string()])
        .args(["-l", &loops.to_string()])
        .output()
        .context("hackbench")?;
    let text = String::from_utf8_lossy(&out.stdout);
    text.lines()
        .find_map(|l| l.strip_prefix("Time:"))
        .and_then(|t| t.trim().parse().ok())
        .with_context(|| format!("no time in hackbench output: {text}"))
}

/// A load's column name, and its figure in a sample.
type Load = (&'static str, fn(&Sample) -> f64);

fn print_table(options: &Options, modes: &[Mode], samples: &[Vec<Sample>]) {
    let med =
        |i: usize, f: fn(&Sample) -> f64| median(&samples[i].iter().map(f).collect::<Vec<_>>());
    let loads: [Load; 3] = [
        ("pipe µs/op", |s| s.pipe_us),
        ("getppid µs/op", |s| s.syscall_us),
        ("hackbench s", |s| s.hackbench_s),
    ];
    println!(
        "\nbench overhead: {} stand-in instances running throughout; perf bench sched pipe -l {}, \
         perf bench syscall basic -l {}, hackbench --pipe --threads -g {} -l {}; {} rounds, \
         medians",
        options.instances,
        options.pipe_loops,
        options.syscall_loops,
        options.hackbench_groups,
        options.hackbench_loops,
        options.rounds
    );
    let header: Vec<String> = loads
        .iter()
        .map(|(name, _)| format!("{name} | vs nothing"))
        .collect();
    println!("| mode | {} |", header.join(" | "));
    println!("| --- |{}", " --- | --- |".repeat(loads.len()));
    for (i, mode) in modes.iter().enumerate() {
        let cells: Vec<String> = loads
            .iter()
            .map(|(_, f)| {
                let (v, base) = (med(i, *f), med(0, *f));
                let vs = if i == 0 {
                    "-".to_owned()
                } else {
                    format!("{:+.1}%", (v / base - 1.0) * 100.0)
                };
                format!("{v:.4} | {vs}")
            })
            .collect();
        println!("| {} | {} |", mode.label(), cells.join(" | "));
    }
    let index = |mode: Mode| modes.iter().position(|m| *m == mode);
    let (Some(collector), Some(empty)) = (index(Mode::Collector), index(Mode::Empty)) else {
        return;
    };
    for (name, f) in &loads[..2] {
        let base = med(0, *f);
        let added = (med(collector, *f) - base) * 1000.0;
        let floor = (med(empty, *f) - base) * 1000.0;
        println!(
            "{name}: the collector adds {added:.0} ns per op, empty programs on its hooks \
             {floor:.0} ns: {:.1}x (target <= 3x: {})",
            added / floor,
            verdict(added <= 3.0 * floor.max(0.0))
        );
    }
    let pipe = (med(collector, loads[0].1) / med(0, loads[0].1) - 1.0) * 100.0;
    println!(
        "pipe with the collector following {}: {pipe:+.1}% (target <= +5%: {})",
        options.instances,
        verdict(pipe <= 5.0)
    );
}

fn verdict(met: bool) -> &'static str {
    if met { "met" } else { "missed" }
}
