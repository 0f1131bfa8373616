//! `cargo xtask bench console`.
//!
//! 16 stand-in VMMs (the test stand-in, copied as `firecracker`) write numbered lines of
//! `--line-bytes` to stdout (`/dev/null`) in 4 KiB writes of whole lines. Phases, each with a
//! fresh release collector:
//!
//! 1. baseline: the writers at full speed, no collector: their wall and CPU time;
//! 2. loss-free throughput: the writers held to each of `--paced-mbps` (together) in turn,
//!    until one rate loses lines; the highest loss-free rate, and the rate captured;
//! 3. above capacity: the writers at full speed with the collector (they write far faster
//!    than any capture on this machine): the writers' slowdown (wall, and CPU, which includes
//!    the kernel programs running in their syscalls), and the books: lines counted plus lines
//!    counted dropped (dropped bytes / line size: drops are whole writes of whole lines) must
//!    equal lines written, exactly;
//! 4. latency: `--latency-rate` lines/s per writer, each line stamped with its send time,
//!    followed through `collector logs -f --json`; p50/p99 of arrival minus send.
//!
//! The machine is shared: figures are medians or ratios within one run.

use std::{
    io::{BufRead, BufReader},
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant, SystemTime, UNIX_EPOCH},
};

use anyhow::{Context, ensure};

use crate::toolchain;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Stand-in VMMs writing at once.
    #[arg(long, default_value_t = 16)]
    writers: usize,
    /// MiB each writer writes in the full-speed phases.
    #[arg(long, default_value_t = 32)]
    mib_per_writer: u64,
    /// Bytes per line (a divisor of 4096, so every write holds whole lines).
    #[arg(long, default_value_t = 256)]
    line_bytes: u64,
    /// Aggregate rates of the paced phases, MB/s, tried in order until one loses lines.
    #[arg(long, value_delimiter = ',', default_value = "100,150,200,300")]
    paced_mbps: Vec<u64>,
    /// Lines per second per writer in the latency phase.
    #[arg(long, default_value_t = 500)]
    latency_rate: u64,
    /// Each instance's console budget (`console.rate_bytes_per_sec`); 0, the default, turns it
    /// off so that the phases measure capture capacity, not the budget.
    #[arg(long, default_value_t = 0)]
    rate_bytes_per_sec: u64,
    /// `console.burst_bytes` with `--rate-bytes-per-sec`.
    #[arg(long, default_value_t = 1 << 20)]
    burst_bytes: u64,
    /// The collector binary to bench instead of this tree's release build (e.g. another
    /// commit's, for an A/B comparison in one session).
    #[arg(long)]
    collector: Option<PathBuf>,
}

/// Processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

struct Bench<'a> {
    args: &'a Args,
    work: PathBuf,
    collector_bin: PathBuf,
    standin: PathBuf,
}

/// Counters read from /metrics for the bench's instances.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct Books {
    lines: u64,
    bytes: u64,
    /// Lost before userspace: kernel ring full, over budget, evicted, cut.
    dropped_kernel: u64,
    /// Lines over an instance's share of userspace line handling (whole lines).
    dropped_line_budget: u64,
    dropped_queue: u64,
    dropped_sink: u64,
    unattributed: u64,
}

pub(super) fn run(args: &Args) -> anyhow::Result<()> {
    ensure!(
        4096 % args.line_bytes == 0 && args.line_bytes >= 64,
        "--line-bytes must divide 4096 and be at least 64"
    );
    super::build_release(&["standin-vmm"])?;
    let root = toolchain::workspace_root();
    let work = std::env::temp_dir().join(format!("collector-bench-console-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let standin = work.join("firecracker");
    std::fs::copy(root.join("target/release/standin-vmm"), &standin)?;
    let bench = Bench {
        args,
        work: work.clone(),
        collector_bin: args
            .collector
            .clone()
            .unwrap_or_else(|| root.join("target/release/collector")),
        standin,
    };
    let result = bench.all();
    let _ = std::fs::remove_dir_all(&work);
    let table = result?;
    println!("{table}");
    Ok(())
}

impl Bench<'_> {
    fn all(&self) -> anyhow::Result<String> {
        let a = self.args;
        let total_bytes = (a.writers as u64 * a.mib_per_writer) << 20;
        let total_mb = total_bytes as f64 / 1e6;
        let lines_written = total_bytes / a.line_bytes;
        let mut rows = Vec::new();

        eprintln!("bench: baseline, {} writers, no collector", a.writers);
        let baseline = self.writers("base", a.mib_per_writer << 20, None)?;
        let (base_wall, base_cpu) = (median(&baseline.wall), median(&baseline.cpu));
        rows.push(format!(
            "| baseline, no collector, full speed | {} x {} MiB | writers: median {:.2} s wall, {:.2} s CPU each; {:.0} MB/s together | — |",
            a.writers, a.mib_per_writer, base_wall, base_cpu, total_mb / baseline.wall_s
        ));

        for (step, mbps) in a.paced_mbps.iter().enumerate() {
            eprintln!("bench: paced at {mbps} MB/s");
            let tag = format!("pace{step}");
            let (collector, addr) = self.collector(&tag, 8 << 20)?;
            let cpu_before = cpu_seconds(&collector);
            let per_writer_lines_s = *mbps as f64 * 1e6 / a.line_bytes as f64 / a.writers as f64;
            let run = self.writers(
                &tag,
                a.mib_per_writer << 20,
                Some(per_writer_lines_s as u64),
            )?;
            let (books, captured_s) = self.settle(&addr, &tag, lines_written, run.started)?;
            let collector_cpu = cpu_seconds(&collector) - cpu_before;
            drop(run.procs);
            drop(collector);
            let lost_lines = books.lost_lines(a.line_bytes);
            // Loss-free only when the API and the files both hold every line.
            let loss_free = lost_lines == 0 && books.dropped_queue == 0 && books.dropped_sink == 0;
            rows.push(format!(
                "| paced {mbps} MB/s ({:.0} klines/s) | {} x {} MiB | captured {:.0} MB/s, {:.0} klines/s; lost {lost_lines} lines; file queue dropped {:.1} MB; writers median {:.2} s CPU; collector {collector_cpu:.2} s CPU, {:.2} µs per line | {} |",
                *mbps as f64 * 1e3 / a.line_bytes as f64,
                a.writers,
                a.mib_per_writer,
                books.bytes as f64 / 1e6 / captured_s,
                books.lines as f64 / 1e3 / captured_s,
                books.dropped_queue as f64 / 1e6,
                median(&run.cpu),
                collector_cpu * 1e6 / books.lines.max(1) as f64,
                if loss_free { "loss-free" } else { "LOSSY" }
            ));
            if !loss_free {
                break;
            }
        }

        eprintln!("bench: full speed with the collector (above capacity)");
        let (collector, addr) = self.collector("full", 8 << 20)?;
        let run = self.writers("full", a.mib_per_writer << 20, None)?;
        let (books, _) = self.settle(&addr, "full", lines_written, run.started)?;
        drop(run.procs);
        drop(collector);
        let (wall, cpu) = (median(&run.wall), median(&run.cpu));
        let dropped = books.lost_lines(a.line_bytes);
        let counted = books.lines + dropped;
        rows.push(format!(
            "| full speed with the collector | {lines_written} lines written | {} captured + {dropped} counted dropped = {counted}; writers median {wall:.2} s wall ({:+.0}%), {cpu:.2} s CPU ({:+.0}%, {:.2} µs more per 4 KiB write) | {} |",
            books.lines,
            (wall / base_wall - 1.0) * 100.0,
            (cpu / base_cpu - 1.0) * 100.0,
            (cpu - base_cpu) * 1e6 / ((a.mib_per_writer << 20) / 4096) as f64,
            if counted == lines_written { "balanced" } else { "UNBALANCED" }
        ));
        ensure!(
            counted == lines_written,
            "books do not balance: {books:?}, {lines_written} lines written"
        );

        eprintln!("bench: latency at {} lines/s per writer", a.latency_rate);
        let (collector, addr) = self.collector("lat", 8 << 20)?;
        let latencies = self.latency(&addr)?;
        drop(collector);
        rows.push(format!(
            "| latency, {} writers x {} lines/s | {} lines followed | write-to-API p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms | — |",
            a.writers,
            a.latency_rate,
            latencies.len(),
            percentile(&latencies, 0.50),
            percentile(&latencies, 0.99),
            percentile(&latencies, 1.0),
        ));

        Ok(format!(
            "| phase | load | result | verdict |\n| --- | --- | --- | --- |\n{}",
            rows.join("\n")
        ))
    }

    /// Starts a release collector with a console ring of `ring` bytes; returns it and its
    /// address once ready.
    fn collector(&self, tag: &str, ring: u32) -> anyhow::Result<(Procs, String)> {
        let port = std::net::TcpListener::bind("127.0.0.1:0")?
            .local_addr()?
            .port();
        let addr = format!("127.0.0.1:{port}");
        let dir = self.work.join(format!("{tag}-logs"));
        let config = self.work.join(format!("{tag}.toml"));
        std::fs::write(
            &config,
            format!(
                "trusted_executable_dirs = [\"{}\"]\n[kernel]\nconsole_ring_bytes = {ring}\n\n[console]\nfile_max_bytes = 268435456\n\
                 disk_max_bytes = 17179869184\nrate_bytes_per_sec = {}\nburst_bytes = {}\n",
                self.work.display(),
                self.args.rate_bytes_per_sec,
                self.args.burst_bytes,
            ),
        )?;
        let stderr = std::fs::File::create(self.work.join(format!("{tag}.stderr")))?;
        let child = Command::new(&self.collector_bin)
            .args(["run", "--listen", &addr, "--config"])
            .arg(&config)
            .arg("--log-dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting the collector")?;
        let procs = Procs(vec![child]);
        let deadline = Instant::now() + Duration::from_secs(60);
        while !super::http_get(&addr, "/readyz").is_ok_and(|b| b.contains("\"ready\":true")) {
            ensure!(Instant::now() < deadline, "collector not ready in 60 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok((procs, addr))
    }

    /// Starts the writers (instance ids `bench-<tag>-<i>`), each writing `bytes`, paced at
    /// `rate` lines/s when given; waits for their reports. They stay alive (their series with
    /// them) until the returned processes are dropped.
    fn writers(&self, tag: &str, bytes: u64, rate: Option<u64>) -> anyhow::Result<Run> {
        let started = Instant::now();
        let mut procs = Procs(Vec::new());
        let mut reports = Vec::new();
        for i in 0..self.args.writers {
            let report = self.work.join(format!("{tag}-{i}.report"));
            let mut cmd = Command::new(&self.standin);
            cmd.args(["--no-api", "--uuid", &format!("bench-{tag}-{i}")])
                .env("STANDIN_BENCH_BYTES", bytes.to_string())
                .env("STANDIN_BENCH_LINE", self.args.line_bytes.to_string())
                .env("STANDIN_BENCH_REPORT", &report)
                .env("STANDIN_VCPUS", "1")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null());
            if let Some(rate) = rate {
                cmd.env("STANDIN_BENCH_RATE", rate.to_string());
            }
            procs.0.push(cmd.spawn().context("starting a writer")?);
            reports.push(report);
        }
        let (mut wall, mut cpu) = (Vec::new(), Vec::new());
        let deadline = Instant::now() + Duration::from_secs(600);
        for report in &reports {
            loop {
                if let Ok(text) = std::fs::read_to_string(report)
                    && let [_, w, c] = text.split_whitespace().collect::<Vec<_>>()[..]
                {
                    wall.push(w.parse::<f64>()?);
                    cpu.push(c.parse::<f64>()?);
                    break;
                }
                ensure!(Instant::now() < deadline, "writers did not finish in 600 s");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
        Ok(Run {
            procs,
            wall,
            cpu,
            wall_s: started.elapsed().as_secs_f64(),
            started,
        })
    }

    /// Polls /metrics until every written line is accounted for, or the counters stop moving
    /// for 2 s. Returns the books and the seconds from `started` to the last change.
    fn settle(
        &self,
        addr: &str,
        tag: &str,
        lines_written: u64,
        started: Instant,
    ) -> anyhow::Result<(Books, f64)> {
        let mut last = Books::default();
        let mut last_change = Instant::now();
        let mut at = 0.0;
        loop {
            let books = books(&super::http_get(addr, "/metrics")?, tag);
            if books != last {
                last = books;
                last_change = Instant::now();
                at = started.elapsed().as_secs_f64();
            }
            let accounted = books.lines + books.lost_lines(self.args.line_bytes);
            if accounted >= lines_written || last_change.elapsed() > Duration::from_secs(2) {
                return Ok((books, at));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Write-to-API latencies in ms, over the lines of 4 of the writers followed through the
    /// CLI.
    fn latency(&self, addr: &str) -> anyhow::Result<Vec<f64>> {
        let a = self.args;
        let seconds = 6;
        let bytes = a.latency_rate * seconds * a.line_bytes;
        let run = self.writers_async("lat", bytes, a.latency_rate)?;
        let mut followers = Vec::new();
        for i in 0..4.min(a.writers) {
            let uuid = format!("bench-lat-{i}");
            // Follow from the start: the instance is there as soon as it exec'd.
            let deadline = Instant::now() + Duration::from_secs(10);
            while !super::http_get(addr, "/v1/instances").is_ok_and(|b| b.contains(&uuid)) {
                ensure!(Instant::now() < deadline, "{uuid} not listed");
                std::thread::sleep(Duration::from_millis(5));
            }
            let child = Command::new(&self.collector_bin)
                .args(["logs", &uuid, "-f", "--json", "--addr", addr])
                .stdout(Stdio::piped())
                .spawn()?;
            followers.push(child);
        }
        // Lines sent before the followers were surely attached arrive as history, not live.
        let skip_before = now_ns() + 1_000_000_000;
        let mut threads = Vec::new();
        for child in &mut followers {
            let stdout = child.stdout.take().context("follower stdout")?;
            threads.push(std::thread::spawn(move || {
                let mut out = Vec::new();
                for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                    let now = now_ns();
                    if let Some(sent) = line
                        .split(" sent ")
                        .nth(1)
                        .and_then(|s| s.split(' ').next())
                        .and_then(|s| s.parse::<u128>().ok())
                        .filter(|sent| *sent >= skip_before)
                    {
                        out.push(now.saturating_sub(sent) as f64 / 1e6);
                    }
                }
                out
            }));
        }
        // The writers end after `seconds`; the follows end when they exit.
        drop(run);
        let mut all = Vec::new();
        for t in threads {
            all.extend(t.join().map_err(|_| anyhow::anyhow!("follower thread"))?);
        }
        for mut child in followers {
            let _ = child.wait();
        }
        ensure!(!all.is_empty(), "no line followed");
        all.sort_by(f64::total_cmp);
        Ok(all)
    }

    /// Writers that exit by themselves once done (`STANDIN_RUN_MS`).
    fn writers_async(&self, tag: &str, bytes: u64, rate: u64) -> anyhow::Result<WaitAll> {
        let mut children = Vec::new();
        for i in 0..self.args.writers {
            children.push(
                Command::new(&self.standin)
                    .args(["--no-api", "--uuid", &format!("bench-{tag}-{i}")])
                    .env("STANDIN_BENCH_BYTES", bytes.to_string())
                    .env("STANDIN_BENCH_LINE", self.args.line_bytes.to_string())
                    .env("STANDIN_BENCH_RATE", rate.to_string())
                    .env("STANDIN_RUN_MS", "1")
                    .env("STANDIN_VCPUS", "1")
                    .stdin(Stdio::null())
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .spawn()?,
            );
        }
        Ok(WaitAll(children))
    }
}

struct Run {
    procs: Procs,
    /// Each writer's wall and CPU seconds.
    wall: Vec<f64>,
    cpu: Vec<f64>,
    wall_s: f64,
    started: Instant,
}

/// Children waited for (not killed) when dropped.
struct WaitAll(Vec<Child>);

impl Drop for WaitAll {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

/// User and system CPU seconds of the collector so far, all its threads (0 if unreadable).
fn cpu_seconds(procs: &Procs) -> f64 {
    // `/proc/PID/stat` counts in USER_HZ ticks, 100 a second on Linux.
    const TICKS_PER_S: f64 = 100.0;
    let Some(child) = procs.0.first() else {
        return 0.0;
    };
    let stat = std::fs::read_to_string(format!("/proc/{}/stat", child.id())).unwrap_or_default();
    // Fields after the command (which may hold spaces), from the state on: utime is the 12th.
    let fields: Vec<&str> = stat
        .rsplit_once(')')
        .map_or("", |(_, rest)| rest)
        .split_whitespace()
        .collect();
    let ticks = |i: usize| {
        fields
            .get(i)
            .and_then(|v| v.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    (ticks(11) + ticks(12)) / TICKS_PER_S
}

fn now_ns() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_nanos()
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

/// `q`-quantile of sorted `values`.
fn percentile(values: &[f64], q: f64) -> f64 {
    let index = ((values.len() - 1) as f64 * q).round() as usize;
    values[index]
}

impl Books {
    /// Lines that never became records: lost in the kernel, over the line budget, or of
    /// processes never named (drops are whole writes of whole lines, or whole lines).
    fn lost_lines(&self, line_bytes: u64) -> u64 {
        (self.dropped_kernel + self.dropped_line_budget + self.unattributed) / line_bytes
    }
}

/// Sums the console counters of instances `bench-<tag>-*`.
fn books(metrics: &str, tag: &str) -> Books {
    let mine = format!("instance_uuid=\"bench-{tag}-");
    let mut b = Books::default();
    for line in metrics.lines() {
        let value = || -> u64 {
            line.rsplit(' ')
                .next()
                .and_then(|v| v.parse::<f64>().ok())
                .unwrap_or(0.0) as u64
        };
        if line.starts_with("collector_console_unattributed_bytes_total ") {
            b.unattributed = value();
        }
        if !line.contains(&mine) {
            continue;
        }
        if line.starts_with("compute_instance_console_lines_total{") {
            b.lines += value();
        } else if line.starts_with("compute_instance_console_bytes_total{") {
            b.bytes += value();
        } else if line.starts_with("compute_instance_console_dropped_bytes_total{") {
            if ["kernel_ring", "over_budget", "evicted", "cut"]
                .iter()
                .any(|w| line.contains(&format!("where=\"{w}\"")))
            {
                b.dropped_kernel += value();
            } else if line.contains("where=\"line_budget\"") {
                b.dropped_line_budget += value();
            } else if line.contains("where=\"queue\"") {
                b.dropped_queue += value();
            } else {
                b.dropped_sink += value();
            }
        }
    }
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn books_from_exposition() {
        let text = "\
compute_instance_console_lines_total{instance_uuid=\"bench-a-1\",stream=\"stdout\"} 10
compute_instance_console_lines_total{instance_uuid=\"bench-a-2\",stream=\"stdout\"} 5
compute_instance_console_lines_total{instance_uuid=\"other\",stream=\"stdout\"} 99
compute_instance_console_dropped_bytes_total{instance_uuid=\"bench-a-1\",where=\"kernel_ring\"} 4096
compute_instance_console_dropped_bytes_total{instance_uuid=\"bench-a-1\",where=\"over_budget\"} 4096
compute_instance_console_dropped_bytes_total{instance_uuid=\"bench-a-2\",where=\"line_budget\"} 256
compute_instance_console_dropped_bytes_total{instance_uuid=\"bench-a-2\",where=\"queue\"} 512
collector_console_unattributed_bytes_total 256
";
        let b = books(text, "a");
        assert_eq!(b.lines, 15);
        assert_eq!(b.dropped_kernel, 8192);
        assert_eq!((b.dropped_line_budget, b.dropped_queue), (256, 512));
        assert_eq!(b.unattributed, 256);
        assert_eq!(percentile(&[1.0, 2.0, 3.0], 0.5), 2.0);
        assert_eq!(median(&[3.0, 1.0, 2.0]), 2.0);
    }
}
