//! `cargo xtask bench otlp`.
//!
//! Export throughput of the OTLP exporter (OTLP/HTTP, protobuf) on loopback, and the
//! collector's CPU per MB exported. Each round: a fresh release collector with
//! `[export.otlp]` pointed at a sink in this process (a plain HTTP/1.1 server that reads each
//! request and answers 200, as a receiver that keeps up does); once it is ready, `--instances`
//! folders of `--mib-per-instance` MiB of console lines in the collector's own NDJSON form
//! (`--line-bytes` each) are renamed into its log folder at once; the clock and the
//! collector's CPU time (`/proc/PID/stat`) run until `collector_export_records_total`
//! says every line was sent. The figures are the medians over `--rounds`; the machine is
//! shared. Not measured: gRPC (no HTTP/2 server here), a receiver slower than the exporter.

use std::{
    io::{Read, Write},
    net::{TcpListener, TcpStream},
    path::Path,
    process::{Command, Stdio},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use anyhow::{Context, ensure};

use super::{Guard, median};

#[derive(clap::Args)]
pub(crate) struct Args {
    /// Instance folders, each with one console.log.
    #[arg(long, default_value_t = 8)]
    instances: usize,
    /// MiB of lines per instance.
    #[arg(long, default_value_t = 16)]
    mib_per_instance: u64,
    /// Bytes per NDJSON line, newline included.
    #[arg(long, default_value_t = 256)]
    line_bytes: usize,
    /// Rounds (a fresh collector each).
    #[arg(long, default_value_t = 3)]
    rounds: usize,
}

pub(super) fn run(args: &Args) -> anyhow::Result<()> {
    ensure!(args.line_bytes >= 160, "--line-bytes must be at least 160");
    crate::build::build(true)?;
    let root = crate::toolchain::workspace_root();
    let bin = root.join("target/release/collector");
    let work = std::env::temp_dir().join(format!("collector-bench-otlp-{}", std::process::id()));
    std::fs::create_dir_all(&work)?;
    let result = rounds(args, &bin, &work);
    let _ = std::fs::remove_dir_all(&work);
    let (lines, mb, secs, cpu, requests, body_mb) = result?;
    println!(
        "| OTLP/HTTP export, loopback | {} instances x {} MiB, {}-byte lines ({lines} lines, {mb:.0} MB) | {:.1} MB/s, {:.0} lines/s (median of {} rounds: {secs:.2} s) | collector CPU {:.3} s per MB ({:.0} % of a core); {requests} requests, {:.2} MB of protobuf per MB of file |",
        args.instances,
        args.mib_per_instance,
        args.line_bytes,
        mb / secs,
        lines as f64 / secs,
        args.rounds,
        cpu / mb,
        100.0 * cpu / secs,
        body_mb / mb,
    );
    Ok(())
}

type Figures = (u64, f64, f64, f64, u64, f64);

fn rounds(args: &Args, bin: &Path, work: &Path) -> anyhow::Result<Figures> {
    let lines_per = ((args.mib_per_instance << 20) / args.line_bytes as u64) as usize;
    let lines = lines_per as u64 * args.instances as u64;
    let mb = (lines * args.line_bytes as u64) as f64 / 1e6;
    let (mut secs, mut cpu, mut requests, mut body) = (Vec::new(), Vec::new(), 0, 0.0);
    for round in 0..args.rounds {
        eprintln!("bench otlp: round {} of {}", round + 1, args.rounds);
        let staging = work.join(format!("staging-{round}"));
        write_files(&staging, args, lines_per, round)?;
        let sink = Sink::start()?;
        let log_dir = work.join(format!("logs-{round}"));
        std::fs::create_dir_all(&log_dir)?;
        let (collector, addr) = start(bin, &log_dir, sink.port)?;
        let pid = collector.0.id();
        let cpu0 = cpu_seconds(pid)?;
        let t0 = Instant::now();
        for entry in std::fs::read_dir(&staging)? {
            let entry = entry?;
            std::fs::rename(entry.path(), log_dir.join(entry.file_name()))?;
        }
        let series = "collector_export_records_total{signal=\"console\",outcome=\"sent\"}";
        super::wait_until(Duration::from_secs(600), || {
            super::http_get(&addr, "/metrics")
                .ok()
                .and_then(|m| super::metric(&m, series))
                .is_some_and(|sent| sent >= lines as f64)
        })
        .context("waiting for every line to be sent")?;
        secs.push(t0.elapsed().as_secs_f64());
        cpu.push(cpu_seconds(pid)? - cpu0);
        requests = sink.requests.load(Ordering::Relaxed);
        body = sink.bytes.load(Ordering::Relaxed) as f64 / 1e6;
        drop(collector);
        let _ = std::fs::remove_dir_all(&log_dir);
        let _ = std::fs::remove_dir_all(&staging);
    }
    Ok((lines, mb, median(&secs), median(&cpu), requests, body))
}

/// `lines` console lines of `line_bytes` for each instance folder under `dir`.
fn write_files(dir: &Path, args: &Args, lines: usize, round: usize) -> anyhow::Result<()> {
    for i in 0..args.instances {
        let folder = dir.join(format!("bench-otlp-{round}-{i}"));
        std::fs::create_dir_all(&folder)?;
        let uuid = format!("bench-otlp-{round}-{i}");
        let mut out = Vec::with_capacity(lines * args.line_bytes);
        for seq in 1..=lines {
            let head = format!(
                "{{\"ts\":\"2026-12-03T10:00:00.{:09}Z\",\"instance_uuid\":\"{uuid}\",\"stream\":\"stdout\",\"message\":\"",
                seq % 1_000_000_000
            );
            let tail = format!("\",\"seq\":{seq}}}\n");
            let pad = args.line_bytes - head.len() - tail.len();
            out.extend_from_slice(head.as_bytes());
            out.extend(std::iter::repeat_n(b'x', pad));
            out.extend_from_slice(tail.as_bytes());
        }
        std::fs::write(folder.join("console.log"), out)?;
    }
    Ok(())
}

fn start(bin: &Path, log_dir: &Path, sink_port: u16) -> anyhow::Result<(Guard, String)> {
    let port = TcpListener::bind("127.0.0.1:0")?.local_addr()?.port();
    let addr = format!("127.0.0.1:{port}");
    let config = log_dir.join("collector.toml");
    std::fs::write(
        &config,
        format!(
            "[kubernetes]\nenabled = false\n[export.otlp]\nendpoint = \"http://127.0.0.1:{sink_port}\"\n"
        ),
    )?;
    let stderr = std::fs::File::create(log_dir.join("collector.stderr"))?;
    let child = Command::new(bin)
        .args(["run", "--listen", &addr, "--config"])
        .arg(&config)
        .arg("--log-dir")
        .arg(log_dir)
        .stdout(Stdio::null())
        .stderr(stderr)
        .spawn()
        .context("starting the collector")?;
    let guard = Guard(child);
    super::wait_until(Duration::from_secs(60), || {
        super::http_get(&addr, "/readyz").is_ok_and(|b| b.contains("\"ready\":true"))
    })
    .context("collector not ready")?;
    Ok((guard, addr))
}

/// User + system CPU seconds of `pid`.
fn cpu_seconds(pid: u32) -> anyhow::Result<f64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    // After the command name's closing parenthesis: state is field 3, utime 14, stime 15.
    let rest = stat.rsplit_once(')').context("stat")?.1;
    let fields: Vec<&str> = rest.split_whitespace().collect();
    let ticks: f64 = fields[11].parse::<f64>()? + fields[12].parse::<f64>()?;
    // In the kernel's USER_HZ, 100 on every architecture Linux builds for today.
    Ok(ticks / 100.0)
}

/// An HTTP/1.1 server that reads each request and answers `200` with an empty body.
struct Sink {
    port: u16,
    requests: Arc<AtomicU64>,
    bytes: Arc<AtomicU64>,
}

impl Sink {
    fn start() -> anyhow::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let requests = Arc::new(AtomicU64::new(0));
        let bytes = Arc::new(AtomicU64::new(0));
        let (r, b) = (requests.clone(), bytes.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming().flatten() {
                let (r, b) = (r.clone(), b.clone());
                std::thread::spawn(move || serve(stream, &r, &b));
            }
        });
        Ok(Self {
            port,
            requests,
            bytes,
        })
    }
}

fn serve(mut stream: TcpStream, requests: &AtomicU64, bytes: &AtomicU64) {
    let mut buf: Vec<u8> = Vec::new();
    let mut chunk = vec![0u8; 1 << 16];
    loop {
        let head_end = loop {
            if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        };
        let head = String::from_utf8_lossy(&buf[..head_end]).to_ascii_lowercase();
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + length {
            match stream.read(&mut chunk) {
                Ok(0) | Err(_) => return,
                Ok(n) => buf.extend_from_slice(&chunk[..n]),
            }
        }
        buf.drain(..head_end + length);
        requests.fetch_add(1, Ordering::Relaxed);
        bytes.fetch_add(length as u64, Ordering::Relaxed);
        if stream
            .write_all(b"HTTP/1.1 200 OK\r\ncontent-type: application/x-protobuf\r\ncontent-length: 0\r\n\r\n")
            .is_err()
        {
            return;
        }
    }
}
