//! `cargo xtask bench memory`: what the collector holds with 0, 200 and 1000 instances.
//!
//! For each count, a fresh collector with a log folder of its own; that many stand-in VMMs (the
//! test stand-in, copied as `firecracker`, one vCPU-less process each) write 16 KiB of console
//! each (64 lines of 256 bytes) and stay alive. Once every line is counted and the collector
//! has settled, it reads the collector's RSS (`/proc/PID/status`: `VmRSS`, split into
//! anonymous and file/shared), the size of `/metrics` and its series count, and the median
//! time of 5 scrapes. With `--compare-with COLLECTOR` (a binary built from main, say) the same
//! for that binary, in the same run. The machine is shared: RSS is stable, scrape times are
//! medians.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};

use super::median;
use crate::toolchain;

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance counts, in order.
    #[arg(long, value_delimiter = ',', default_value = "0,200,1000")]
    instances: Vec<usize>,
    /// Console bytes each instance writes (in 256-byte lines).
    #[arg(long, default_value_t = 16384)]
    console_bytes: u64,
    /// Another collector binary to measure the same way, in the same run.
    #[arg(long, value_name = "COLLECTOR")]
    compare_with: Option<PathBuf>,
    /// Measure the debug build (`target/debug/collector`) instead of building a release one.
    #[arg(long)]
    debug: bool,
}

/// Processes killed when dropped.
struct Procs(Vec<Child>);

impl Drop for Procs {
    fn drop(&mut self) {
        for child in &mut self.0 {
            let _ = child.kill();
        }
        for child in &mut self.0 {
            let _ = child.wait();
        }
    }
}

struct Figures {
    rss_kib: u64,
    anon_kib: u64,
    file_kib: u64,
    metrics_bytes: usize,
    series: usize,
    scrape_ms: f64,
}

pub(super) fn run(args: &Args) -> anyhow::Result<()> {
    let profile = if args.debug { "debug" } else { "release" };
    let linker_dir = crate::build::build(!args.debug)?;
    let mut standin_build = toolchain::cargo(&linker_dir);
    standin_build.args([
        "build",
        "--locked",
        "-p",
        "collector-tests",
        "--bin",
        "standin-vmm",
    ]);
    if !args.debug {
        standin_build.arg("--release");
    }
    toolchain::run(&mut standin_build)?;
    let root = toolchain::workspace_root();
    let work = std::env::temp_dir().join(format!("collector-bench-memory-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let standin = work.join("firecracker");
    std::fs::copy(root.join(format!("target/{profile}/standin-vmm")), &standin)?;
    let mut binaries = vec![(
        "this branch",
        root.join(format!("target/{profile}/collector")),
    )];
    if let Some(other) = &args.compare_with {
        binaries.push(("compared", other.clone()));
    }
    let mut rows = Vec::new();
    let result = (|| -> anyhow::Result<()> {
        let mut run = 0;
        for &n in &args.instances {
            for (name, binary) in &binaries {
                eprintln!("bench: {name}, {n} instances");
                run += 1;
                let f = measure(binary, &standin, &work, run, n, args.console_bytes)?;
                rows.push(format!(
                    "| {name} | {n} | {:.1} MiB | {:.1} MiB | {:.1} MiB | {:.0} KiB, {} series | {:.1} ms |",
                    f.rss_kib as f64 / 1024.0,
                    f.anon_kib as f64 / 1024.0,
                    f.file_kib as f64 / 1024.0,
                    f.metrics_bytes as f64 / 1024.0,
                    f.series,
                    f.scrape_ms,
                ));
            }
        }
        Ok(())
    })();
    let _ = std::fs::remove_dir_all(&work);
    result?;
    println!(
        "| collector | instances | RSS | anonymous | file and shared | /metrics | scrape (median of 5) |\n\
         | --- | --- | --- | --- | --- | --- | --- |\n{}",
        rows.join("\n")
    );
    Ok(())
}

fn measure(
    binary: &Path,
    standin: &Path,
    work: &Path,
    run: usize,
    instances: usize,
    console_bytes: u64,
) -> anyhow::Result<Figures> {
    let port = std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port();
    let addr = format!("127.0.0.1:{port}");
    // Each measurement's own log folder and instance ids: a folder a run before wrote to would
    // be read back (the streams resumed, the instances that departed remembered).
    let tag = format!("mem{instances}-{}-{run}", std::process::id());
    let dir = work.join(format!("{tag}-logs"));
    let stderr = std::fs::File::create(work.join(format!("{tag}.stderr")))?;
    // The stand-ins' folder is the bench's own: trusted, or the collector refuses them.
    let config = work.join(format!("{tag}.toml"));
    std::fs::write(
        &config,
        format!("trusted_executable_dirs = [\"{}\"]\n", work.display()),
    )?;
    let collector = Procs(vec![
        Command::new(binary)
            .args(["run", "--listen", &addr, "--config"])
            .arg(&config)
            .arg("--log-dir")
            .arg(&dir)
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .context("starting the collector")?,
    ]);
    let pid = collector.0[0].id();
    let deadline = Instant::now() + Duration::from_secs(60);
    while !super::http_get(&addr, "/readyz").is_ok_and(|b| b.contains("\"ready\":true")) {
        ensure!(Instant::now() < deadline, "collector not ready in 60 s");
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut standins = Procs(Vec::new());
    for i in 0..instances {
        standins.0.push(
            Command::new(standin)
                .args(["--no-api", "--uuid", &format!("bench-{tag}-{i}")])
                .env("STANDIN_BENCH_BYTES", console_bytes.to_string())
                .env("STANDIN_BENCH_LINE", "256")
                .env("STANDIN_VCPUS", "0")
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .context("starting a stand-in")?,
        );
    }
    let want_lines = instances as u64 * console_bytes / 256;
    let mine = format!("instance_uuid=\"bench-{tag}-");
    let deadline = Instant::now() + Duration::from_secs(120);
    loop {
        let metrics = super::http_get(&addr, "/metrics")?;
        let lines: u64 = metrics
            .lines()
            .filter(|l| l.starts_with("compute_instance_console_lines_total{") && l.contains(&mine))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .map(|v| v as u64)
            .sum();
        let listed = metrics
            .lines()
            .filter(|l| l.starts_with("compute_instance_info{") && l.contains(&mine))
            .count();
        if lines >= want_lines && listed == instances {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "{listed} of {instances} instances, {lines} of {want_lines} lines in 120 s"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    // Let housekeeping and allocator settle.
    std::thread::sleep(Duration::from_secs(3));
    let mut times = Vec::new();
    let mut metrics = String::new();
    for _ in 0..5 {
        let started = Instant::now();
        metrics = super::http_get(&addr, "/metrics")?;
        times.push(started.elapsed().as_secs_f64() * 1e3);
    }
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> u64 {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    let figures = Figures {
        rss_kib: field("VmRSS:"),
        anon_kib: field("RssAnon:"),
        file_kib: field("RssFile:") + field("RssShmem:"),
        metrics_bytes: metrics.len(),
        series: metrics
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
            .count(),
        scrape_ms: median(&times),
    };
    drop(standins);
    drop(collector);
    Ok(figures)
}
