//! `syscall-cost`: what the collector's console hooks cost every task of the machine it runs
//! on, by the way they are attached. Run inside the kernel-matrix guests by
//! `cargo xtask bench kernel-hooks` (each kernel decides which hooks it allows); runs anywhere
//! as root, with the collector the test harness finds (`COLLECTOR_BIN`, which the guests' plan
//! sets).
//!
//! Modes, interleaved round by round: `nothing` (no collector), `syscall_tracepoints` and
//! `fexit` (a collector with `kernel.console_hooks` forced to that value, following nothing:
//! what every task the collector does not follow pays), each also as `<hooks>_wake_each`
//! (`kernel.console_wakeup_bytes = 0`: a reader wake-up for each write it had caught up with,
//! the collector's behaviour before the wake-up mark), and `empty_fexit`: empty programs
//! (`r0 = 0; exit`) on exactly the hooks the `fexit` collector attached, the floor any program
//! there costs (after the first `fexit` measurement, which names them). Each round measures a
//! pipe ping-pong between two threads (a round trip is 2 writes, 2 reads, 2 wake-ups, 2 context
//! switches), a `getppid` loop (a syscall no program follows), and two stand-in VMMs that each
//! make `--writes` 4 KiB writes of whole lines to stdout (`/dev/null`) at 0.83 MiB/s, inside the
//! default console budget: `firecracker`, which a collector follows and captures, and
//! `plain-writer`, which no collector follows. Each reports the CPU time of its writes alone.
//! One line a measurement on stdout:
//!
//! - `bench MODE pipe_us VALUE`, `bench MODE getppid_ns VALUE`
//! - `bench MODE write_us VALUE` (the followed writer, µs of CPU per 4 KiB write),
//!   `bench MODE write_captured PERCENT` (of its bytes, in the collector's
//!   `compute_instance_console_bytes_total`), `bench MODE untracked_write_us VALUE`
//! - `bench MODE hooks N` (console probes attached; for `empty_fexit`, all its programs),
//!   `bench MODE refused TEXT`
//!
//! Nothing here judges the figures: the bench that runs it prints them side by side.

use std::time::{Duration, Instant};

use anyhow::{Context, bail, ensure};
use collector_tests::{Collector, Standin, new_uuid, wait_for};
use serde_json::Value;

// The overhead bench's empty programs, shared with the host bench (std and anyhow only).
#[path = "../../../xtask/src/bench/empty_programs.rs"]
mod empty_programs;

use empty_programs::{EmptyPrograms, Hook};

struct Options {
    rounds: u32,
    pipe_loops: u32,
    syscall_loops: u32,
    writes: u32,
    /// `--modes a,b,...`: the bench that runs this names them (xtask/src/bench/kernel_hooks.rs).
    modes: Vec<String>,
}

fn main() -> anyhow::Result<()> {
    let options = parse_args()?;
    let modes: Vec<&str> = options.modes.iter().map(String::as_str).collect();
    let mut refused: Vec<&str> = Vec::new();
    // The probes the `fexit` collector attached: where `empty_fexit` puts its programs.
    let mut fexit_probes: Vec<String> = Vec::new();
    for round in 0..options.rounds {
        // Rotated each round: no mode always follows the same one.
        for i in 0..modes.len() {
            let mode = modes[(i + round as usize) % modes.len()];
            if refused.contains(&mode) {
                continue;
            }
            let mut empty = None;
            let collector = match mode {
                "nothing" => None,
                "empty_fexit" => {
                    if fexit_probes.is_empty() {
                        // `fexit` was refused (or has not run yet): nothing to mirror.
                        continue;
                    }
                    let hooks: Vec<Hook> = fexit_probes.iter().map(|p| Hook::of_probe(p)).collect();
                    empty = Some(EmptyPrograms::attach(&hooks)?);
                    None
                }
                _ => match start_collector(mode) {
                    Ok((collector, probes)) => {
                        if mode == "fexit" && fexit_probes.is_empty() {
                            println!("bench empty_fexit hooks {}", probes.len());
                            fexit_probes = probes;
                        }
                        Some(collector)
                    }
                    Err(why) => {
                        println!("bench {mode} refused {}", one_line(&why));
                        refused.push(mode);
                        continue;
                    }
                },
            };
            let pipe = pipe_round_trip_us(options.pipe_loops)?;
            let getppid = getppid_ns(options.syscall_loops);
            println!("bench {mode} pipe_us {pipe:.3}");
            println!("bench {mode} getppid_ns {getppid:.1}");
            let followed = timed_writer("firecracker", options.writes)?;
            println!("bench {mode} write_us {:.3}", followed.us_per_write);
            if let Some(collector) = &collector {
                let captured = captured_percent(collector, &followed);
                println!("bench {mode} write_captured {captured:.1}");
            }
            drop(followed);
            let untracked = timed_writer("plain-writer", options.writes)?;
            println!(
                "bench {mode} untracked_write_us {:.3}",
                untracked.us_per_write
            );
            drop(collector);
            drop(empty);
        }
    }
    Ok(())
}

fn parse_args() -> anyhow::Result<Options> {
    let mut options = Options {
        rounds: 3,
        pipe_loops: 20_000,
        syscall_loops: 1_000_000,
        writes: 512,
        modes: Vec::new(),
    };
    let mut args = std::env::args().skip(1);
    while let Some(flag) = args.next() {
        let value = args
            .next()
            .with_context(|| format!("{flag} needs a value"))?;
        let number = || {
            value
                .parse::<u32>()
                .with_context(|| format!("{flag} {value}"))
        };
        match flag.as_str() {
            "--rounds" => options.rounds = number()?,
            "--pipe-loops" => options.pipe_loops = number()?,
            "--syscall-loops" => options.syscall_loops = number()?,
            "--writes" => options.writes = number()?,
            "--modes" => options.modes = value.split(',').map(str::to_owned).collect(),
            _ => bail!(
                "unknown flag {flag} (--modes A,B,.. --rounds N, --pipe-loops N, \
                 --syscall-loops N, --writes N)"
            ),
        }
    }
    ensure!(
        !options.modes.is_empty(),
        "--modes is required: nothing, empty_fexit, or a console_hooks value, with or without \
         _wake_each"
    );
    Ok(options)
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

/// A collector with `kernel.console_hooks = mode`, ready (the harness's: it is killed when
/// dropped, however the bench ends), and every probe it attached; `Err` when its console probes
/// did not attach in that mode (the kernel refused them), with the reason.
fn start_collector(mode: &str) -> Result<(Collector, Vec<String>), String> {
    // `_wake_each`: the kernel's own wake-up rule, a wake-up for each write the reader had
    // caught up with (the collector before `kernel.console_wakeup_bytes`).
    let (hooks, wakeup) = match mode.strip_suffix("_wake_each") {
        Some(hooks) => (hooks, "console_wakeup_bytes = 0\n"),
        None => (mode, ""),
    };
    let collector =
        Collector::start_with_config(&format!("[kernel]\nconsole_hooks = \"{hooks}\"\n{wakeup}"));
    let ready = collector.get_json("/readyz");
    let prefix = if hooks == "fexit" {
        "console_fexit_"
    } else {
        "console_sys_"
    };
    let console: Vec<&Value> = ready["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["probe"].as_str().is_some_and(|n| n.starts_with(prefix)))
        .collect();
    let attached = console.iter().filter(|p| p["attached"] == true).count();
    if attached == 0 || attached < console.len() {
        let why = console
            .iter()
            .find(|p| p["attached"] != true)
            .and_then(|p| p["error"].as_str())
            .unwrap_or("no console probe attached")
            .to_owned();
        return Err(why);
    }
    println!("bench {mode} hooks {attached}");
    let probes = ready["probes"]
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["attached"] == true)
        .filter_map(|p| p["probe"].as_str().map(str::to_owned))
        .collect();
    Ok((collector, probes))
}

/// A stand-in VMM that made its writes and stays alive (its instance with it) until dropped.
struct Writer {
    _standin: Standin,
    uuid: String,
    bytes: u64,
    us_per_write: f64,
}

/// Runs the stand-in VMM as `exe` (`STANDIN_WRITE_COST`), and waits for its report: µs of its
/// thread's CPU per 4 KiB write.
fn timed_writer(exe: &str, writes: u32) -> anyhow::Result<Writer> {
    let uuid = new_uuid("write-cost");
    let report = std::env::temp_dir().join(format!("{uuid}.report"));
    let report_text = report.display().to_string();
    let writes_text = writes.to_string();
    let standin = Standin::spawn(
        exe,
        &["--no-api", "--uuid", &uuid],
        &[
            ("STANDIN_VCPUS", "0"),
            ("STANDIN_WRITE_COST", &writes_text),
            ("STANDIN_WRITE_COST_REPORT", &report_text),
        ],
    );
    // 0.83 MiB/s: 512 writes take about 2.4 s.
    // `wait_for` stretches it by the guests' time scale.
    let timeout = Duration::from_secs(60) + Duration::from_millis(5 * u64::from(writes));
    // Whole once it ends with its newline (the stand-in may be writing it).
    let text = wait_for(timeout, || {
        std::fs::read_to_string(&report)
            .ok()
            .filter(|t| t.ends_with('\n'))
    })
    .with_context(|| format!("{exe}: no write-cost report in {timeout:?}"))?;
    let _ = std::fs::remove_file(&report);
    let [done, cpu_ns] = text.split_whitespace().collect::<Vec<_>>()[..] else {
        bail!("{exe}: write-cost report {text:?}");
    };
    let done: u32 = done.parse()?;
    let cpu_ns: f64 = cpu_ns.parse()?;
    ensure!(
        done == writes && done > 0,
        "{exe}: {done} of {writes} writes"
    );
    Ok(Writer {
        _standin: standin,
        uuid,
        bytes: u64::from(writes) * 4096,
        us_per_write: cpu_ns / 1e3 / f64::from(writes),
    })
}

/// What share of the writer's bytes the collector captured: as soon as its count reaches them,
/// else after 5 s (time-scaled).
fn captured_percent(collector: &Collector, writer: &Writer) -> f64 {
    let series = format!(
        "compute_instance_console_bytes_total{{instance_uuid=\"{}\"",
        writer.uuid
    );
    let captured = || -> u64 {
        collector
            .get_text("/metrics")
            .lines()
            .filter(|l| l.starts_with(&series))
            .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .sum::<f64>() as u64
    };
    let _ = wait_for(Duration::from_secs(5), || {
        (captured() >= writer.bytes).then_some(())
    });
    captured() as f64 * 100.0 / writer.bytes as f64
}

/// µs per round trip of one byte between two threads over two pipes.
fn pipe_round_trip_us(loops: u32) -> anyhow::Result<f64> {
    let (ping_read, ping_write) = pipe()?;
    let (pong_read, pong_write) = pipe()?;
    let echo = std::thread::spawn(move || {
        let mut byte = 0u8;
        for _ in 0..loops {
            if !transfer(ping_read, pong_write, &mut byte) {
                break;
            }
        }
    });
    let started = Instant::now();
    let mut byte = 1u8;
    for _ in 0..loops {
        // SAFETY: one byte from a live local into a pipe we own.
        let wrote = unsafe { libc::write(ping_write, (&raw const byte).cast(), 1) };
        // SAFETY: one byte into a live local.
        let read = unsafe { libc::read(pong_read, (&raw mut byte).cast(), 1) };
        if wrote != 1 || read != 1 {
            bail!("pipe ping-pong broke: {}", std::io::Error::last_os_error());
        }
    }
    let elapsed = started.elapsed();
    let _ = echo.join();
    for fd in [ping_read, ping_write, pong_read, pong_write] {
        // SAFETY: closing descriptors we own, once.
        unsafe { libc::close(fd) };
    }
    Ok(elapsed.as_secs_f64() * 1e6 / f64::from(loops))
}

/// Reads one byte from `from` and writes it to `to`; false when either fails.
fn transfer(from: i32, to: i32, byte: &mut u8) -> bool {
    // SAFETY: one byte into / out of a live local, on descriptors the caller owns.
    unsafe {
        libc::read(from, std::ptr::from_mut(byte).cast(), 1) == 1
            && libc::write(to, std::ptr::from_ref(byte).cast(), 1) == 1
    }
}

fn pipe() -> anyhow::Result<(i32, i32)> {
    let mut fds = [0i32; 2];
    // SAFETY: a two-element array for pipe(2) to fill.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        bail!("pipe: {}", std::io::Error::last_os_error());
    }
    Ok((fds[0], fds[1]))
}

/// ns per `getppid`.
fn getppid_ns(loops: u32) -> f64 {
    let started = Instant::now();
    for _ in 0..loops {
        // SAFETY: getppid has no preconditions.
        std::hint::black_box(unsafe { libc::getppid() });
    }
    started.elapsed().as_secs_f64() * 1e9 / f64::from(loops)
}
