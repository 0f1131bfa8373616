//! `/init` of the kernel-matrix guests (`cargo xtask test-kernels`): prepares the machine the
//! integration tests expect, runs the compiled test binaries named in `/plan.json`, reports
//! every test on the result port (the second serial line, `/dev/ttyS1`), then probes one
//! collector for its attached probes and verifier figures and leaves QEMU through
//! `isa-debug-exit`.
//!
//! Result port lines (one fact each, space separated, names without spaces):
//!
//! - `kernel RELEASE`, `boot_ms N` (kernel start to `/init`)
//! - `test SUITE NAME ok|FAILED|ignored`, `suite SUITE exit=CODE seconds=S`
//! - `readyz STATUS`, `probe PROBE 0|1`, `verifier PROGRAM INSNS`
//! - `bench MODE FIGURE VALUE` from a bench run as a suite (`syscall-cost`)
//! - `error TEXT` for anything that stopped a step, and `done` last.
//!
//! Out of the guest it refuses to run: it mounts, remounts and powers off.

use std::{
    fs::File,
    io::{BufRead, BufReader, Write},
    os::fd::AsRawFd,
    path::Path,
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::Value;

/// The port `-device isa-debug-exit,iobase=0xf4` listens on.
const DEBUG_EXIT_PORT: u16 = 0xf4;

fn main() {
    if std::process::id() != 1 {
        eprintln!("guest-init is the /init of the test-kernels guests; it runs only as pid 1");
        std::process::exit(2);
    }
    let mut port = ResultPort::open();
    let ok = match run(&mut port) {
        Ok(ok) => ok,
        Err(error) => {
            port.line(&format!("error {}", one_line(&format!("{error:#}"))));
            false
        }
    };
    port.line("done");
    port.drain();
    // SAFETY: sync(2) has no preconditions.
    unsafe { libc::sync() };
    leave(u32::from(!ok));
}

/// The result port: `/dev/ttyS1`, or the console if it cannot be opened (the host then reports
/// a missing success line).
struct ResultPort(File);

impl ResultPort {
    fn open() -> Self {
        // devtmpfs is not mounted yet: make the node ourselves (4:65 is ttyS1).
        let _ = std::fs::create_dir_all("/dev");
        let path = c"/dev/ttyS1-results";
        // SAFETY: a NUL-terminated path; mknod creates a node or fails.
        unsafe { libc::mknod(path.as_ptr(), libc::S_IFCHR | 0o600, libc::makedev(4, 65)) };
        let file = File::options()
            .write(true)
            .open("/dev/ttyS1-results")
            .expect("result port /dev/ttyS1");
        // Raw output: no "\n" -> "\r\n" translation, so the file on the host is plain lines.
        // SAFETY: termios calls on an open tty descriptor with a zeroed struct they fill.
        unsafe {
            let mut t: libc::termios = std::mem::zeroed();
            if libc::tcgetattr(file.as_raw_fd(), &raw mut t) == 0 {
                libc::cfmakeraw(&raw mut t);
                libc::tcsetattr(file.as_raw_fd(), libc::TCSANOW, &raw const t);
            }
        }
        Self(file)
    }

    fn line(&mut self, line: &str) {
        println!("guest-init: {line}");
        let _ = writeln!(self.0, "{line}");
    }

    fn drain(&self) {
        // SAFETY: tcdrain on an open tty descriptor.
        unsafe { libc::tcdrain(self.0.as_raw_fd()) };
    }
}

fn one_line(text: &str) -> String {
    text.split_whitespace().collect::<Vec<_>>().join(" ")
}

fn run(port: &mut ResultPort) -> anyhow::Result<bool> {
    let uptime = std::fs::read_to_string("/proc/uptime").ok();
    mount_all()?;
    let uptime = uptime.or_else(|| std::fs::read_to_string("/proc/uptime").ok());
    let release = std::fs::read_to_string("/proc/sys/kernel/osrelease")?;
    port.line(&format!("kernel {}", release.trim()));
    if let Some(secs) = uptime
        .as_deref()
        .and_then(|u| u.split_whitespace().next()?.parse::<f64>().ok())
    {
        port.line(&format!("boot_ms {}", (secs * 1000.0) as u64));
    }
    loopback_up()?;
    raise_limits()?;

    let plan: Value = serde_json::from_str(&std::fs::read_to_string("/plan.json")?)?;
    let env: Vec<(String, String)> = plan["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let mut ok = true;
    for suite in plan["suites"].as_array().into_iter().flatten() {
        ok &= run_suite(port, suite, &env)?;
    }
    ok &= probe_collector(port, &plan, &env)?;
    Ok(ok)
}

fn mount(source: &str, target: &str, fstype: &str, data: &str) -> anyhow::Result<()> {
    std::fs::create_dir_all(target)?;
    let c = |s: &str| std::ffi::CString::new(s).expect("no NUL");
    let (source_c, target_c, fstype_c, data_c) = (c(source), c(target), c(fstype), c(data));
    // SAFETY: NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::mount(
            source_c.as_ptr(),
            target_c.as_ptr(),
            fstype_c.as_ptr(),
            0,
            data_c.as_ptr().cast(),
        )
    };
    if rc != 0 {
        anyhow::bail!(
            "mount {fstype} on {target}: {}",
            std::io::Error::last_os_error()
        );
    }
    Ok(())
}

/// What the tests find on the CI host: proc, sys, dev, tmp, tracefs, bpffs and the memory
/// cgroup (v1 at /sys/fs/cgroup/memory where the kernel has it, else v2 at /sys/fs/cgroup with
/// the memory controller enabled for child groups).
fn mount_all() -> anyhow::Result<()> {
    mount("proc", "/proc", "proc", "")?;
    mount("sysfs", "/sys", "sysfs", "")?;
    mount("devtmpfs", "/dev", "devtmpfs", "")?;
    mount("tmpfs", "/tmp", "tmpfs", "mode=1777")?;
    mount("tmpfs", "/dev/shm", "tmpfs", "mode=1777")?;
    mount("tracefs", "/sys/kernel/tracing", "tracefs", "")?;
    mount("debugfs", "/sys/kernel/debug", "debugfs", "")?;
    mount("bpf", "/sys/fs/bpf", "bpf", "")?;
    mount("tmpfs", "/sys/fs/cgroup", "tmpfs", "mode=755")?;
    if mount("cgroup", "/sys/fs/cgroup/memory", "cgroup", "memory").is_ok() {
        mount("cgroup2", "/sys/fs/cgroup/unified", "cgroup2", "")?;
    } else {
        // SAFETY: a NUL-terminated path; the tmpfs has nothing open.
        unsafe {
            libc::umount2(c"/sys/fs/cgroup/memory".as_ptr(), 0);
            libc::umount2(c"/sys/fs/cgroup".as_ptr(), 0);
        }
        mount("cgroup2", "/sys/fs/cgroup", "cgroup2", "")?;
        std::fs::write("/sys/fs/cgroup/cgroup.subtree_control", "+memory")?;
    }
    // Core dumps of crashing stand-ins land in their working folder, as on a default host.
    std::fs::write("/proc/sys/kernel/core_pattern", "core")?;
    Ok(())
}

/// `ip link set lo up`: the tests talk to the collector over 127.0.0.1.
fn loopback_up() -> anyhow::Result<()> {
    // SAFETY: a plain socket; closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: `ifreq` is plain data; the name fits with its NUL.
    let rc = unsafe {
        let mut req: libc::ifreq = std::mem::zeroed();
        for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
            *dst = *src as libc::c_char;
        }
        req.ifr_ifru.ifru_flags = (libc::IFF_UP | libc::IFF_LOOPBACK | libc::IFF_RUNNING) as i16;
        let rc = libc::ioctl(fd, libc::SIOCSIFFLAGS, &raw mut req);
        libc::close(fd);
        rc
    };
    anyhow::ensure!(rc == 0, "bring lo up: {}", std::io::Error::last_os_error());
    Ok(())
}

/// Descriptors enough for the tests' collectors. RLIMIT_MEMLOCK stays at the kernel's default
/// (64 KiB on 5.10, where BPF memory is charged to it): the collector lifts it itself.
fn raise_limits() -> anyhow::Result<()> {
    let files = libc::rlimit {
        rlim_cur: 65536,
        rlim_max: 65536,
    };
    // SAFETY: setrlimit with a valid struct.
    let ok = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const files) == 0 };
    anyhow::ensure!(ok, "setrlimit: {}", std::io::Error::last_os_error());
    let mut memlock = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit fills the struct.
    unsafe { libc::getrlimit(libc::RLIMIT_MEMLOCK, &raw mut memlock) };
    println!(
        "guest-init: RLIMIT_MEMLOCK {} bytes (left as the kernel set it)",
        memlock.rlim_cur
    );
    Ok(())
}

/// Runs one test binary, forwarding its output to the console and each test's outcome to the
/// port. As pid 1 it also reaps every orphan the tests leave while it waits.
fn run_suite(
    port: &mut ResultPort,
    suite: &Value,
    env: &[(String, String)],
) -> anyhow::Result<bool> {
    let name = suite["name"].as_str().unwrap_or("?").to_owned();
    let binary = suite["binary"].as_str().unwrap_or_default();
    let args: Vec<&str> = suite["args"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(Value::as_str)
        .collect();
    let suite_env: Vec<(String, String)> = suite["env"]
        .as_object()
        .map(|m| {
            m.iter()
                .map(|(k, v)| (k.clone(), v.as_str().unwrap_or_default().to_owned()))
                .collect()
        })
        .unwrap_or_default();
    let timeout = Duration::from_secs(suite["timeout_seconds"].as_u64().unwrap_or(1800));
    println!("guest-init: suite {name}: {binary} {}", args.join(" "));
    let started = Instant::now();
    let mut child = Command::new(binary)
        .args(&args)
        .env_clear()
        .envs(env.iter().chain(&suite_env).map(|(k, v)| (k, v)))
        .current_dir("/tmp")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .spawn()?;
    let pid = child.id() as i32;
    let stdout = child.stdout.take().expect("piped");
    let (tx, rx) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            println!("{line}");
            if tx.send(line).is_err() {
                break;
            }
        }
    });
    let status = loop {
        while let Ok(line) = rx.try_recv() {
            report_test_line(port, &name, &line);
        }
        let mut status = 0;
        // SAFETY: waitpid on any child, non-blocking.
        let reaped = unsafe { libc::waitpid(-1, &raw mut status, libc::WNOHANG) };
        if reaped == pid {
            break status;
        }
        if reaped <= 0 {
            if started.elapsed() > timeout {
                port.line(&format!("error suite {name} timed out after {timeout:?}"));
                // SAFETY: killing our own child.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let _ = reader.join();
    while let Ok(line) = rx.try_recv() {
        report_test_line(port, &name, &line);
    }
    let code = if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else {
        128 + libc::WTERMSIG(status)
    };
    port.line(&format!(
        "suite {name} exit={code} seconds={:.1}",
        started.elapsed().as_secs_f64()
    ));
    Ok(code == 0)
}

/// libtest's `test NAME ... ok` (or `FAILED`, `ignored`) as a port line; a bench's
/// `bench ...` lines (`syscall-cost`) as they are.
fn report_test_line(port: &mut ResultPort, suite: &str, line: &str) {
    if line.starts_with("bench ") {
        port.line(line);
        return;
    }
    let Some(rest) = line.strip_prefix("test ") else {
        return;
    };
    let Some((test, outcome)) = rest.split_once(" ... ") else {
        return;
    };
    let outcome = outcome.split_whitespace().next().unwrap_or_default();
    if matches!(outcome, "ok" | "FAILED" | "ignored") {
        port.line(&format!("test {suite} {test} {outcome}"));
    }
}

/// Starts one collector with the defaults, waits for `/readyz`, and reports its probes and each
/// program's verifier figure from `/metrics`.
fn probe_collector(
    port: &mut ResultPort,
    plan: &Value,
    env: &[(String, String)],
) -> anyhow::Result<bool> {
    let collector = plan["collector"].as_str().unwrap_or("/t/collector");
    let log_dir = Path::new("/tmp/probe-collector");
    std::fs::create_dir_all(log_dir)?;
    let addr = "127.0.0.1:9478";
    let mut child = Command::new(collector)
        .args(["run", "--listen", addr, "--log-dir"])
        .arg(log_dir)
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .stdout(Stdio::null())
        .stderr(File::create(log_dir.join("collector.stderr"))?)
        .spawn()?;
    let agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .new_agent();
    let get = |path: &str| -> Option<(u16, String)> {
        let mut response = agent.get(format!("http://{addr}{path}")).call().ok()?;
        let status = response.status().as_u16();
        Some((status, response.body_mut().read_to_string().ok()?))
    };
    let deadline =
        Instant::now() + Duration::from_secs(plan["ready_seconds"].as_u64().unwrap_or(300));
    let mut ready = None;
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            break;
        }
        match get("/readyz") {
            Some((200, _)) => {
                ready = Some(200);
                break;
            }
            Some((status, _)) => ready = Some(status),
            None => {}
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    port.line(&format!("readyz {}", ready.unwrap_or(0)));
    let mut ok = ready == Some(200);
    if let Some((200, metrics)) = get("/metrics") {
        let mut probes = 0;
        for (labels, value) in samples(&metrics, "collector_probe_attached") {
            let probe = label(labels, "probe").unwrap_or("?");
            port.line(&format!("probe {probe} {value}"));
            ok &= value == "1";
            probes += 1;
        }
        ok &= probes > 0;
        for (labels, value) in samples(&metrics, "collector_ebpf_program_verified_instructions") {
            let program = label(labels, "program").unwrap_or("?");
            port.line(&format!("verifier {program} {value}"));
        }
    } else {
        port.line("error GET /metrics failed");
        ok = false;
    }
    // SAFETY: signalling our own child.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let _ = child.wait();
    if !ok {
        let stderr = std::fs::read_to_string(log_dir.join("collector.stderr")).unwrap_or_default();
        println!("guest-init: probe collector stderr:\n{stderr}");
    }
    Ok(ok)
}

/// `(labels, value)` of every sample of `family` in a Prometheus text exposition.
fn samples<'a>(text: &'a str, family: &str) -> Vec<(&'a str, &'a str)> {
    text.lines()
        .filter_map(|line| {
            let rest = line.strip_prefix(family)?;
            let (labels, value) = match rest.strip_prefix('{') {
                Some(rest) => rest.split_once("} ")?,
                None => ("", rest.strip_prefix(' ')?),
            };
            Some((labels, value.split_whitespace().next()?))
        })
        .collect()
}

fn label<'a>(labels: &'a str, name: &str) -> Option<&'a str> {
    labels.split(',').find_map(|pair| {
        pair.strip_prefix(name)?
            .strip_prefix("=\"")?
            .strip_suffix('"')
    })
}

/// Ends QEMU with status `(code << 1) | 1` through isa-debug-exit; powers off if the port is
/// not there.
fn leave(code: u32) -> ! {
    // SAFETY: ioperm grants this process the four ports; the `out` writes the exit code to the
    // device QEMU maps there.
    unsafe {
        #[cfg(target_arch = "x86_64")]
        if libc::ioperm(u64::from(DEBUG_EXIT_PORT), 4, 1) == 0 {
            std::arch::asm!("out dx, eax", in("dx") DEBUG_EXIT_PORT, in("eax") code);
        }
        libc::reboot(libc::RB_POWER_OFF);
    }
    loop {
        std::thread::sleep(Duration::from_secs(1));
    }
}
