//! Test harness: start the real `collector` binary, spawn stand-in hypervisors, query the API.
//!
//! These tests need root (or CAP_BPF + CAP_PERFMON): they load programs into the running kernel.
//! Without that they fail with a clear message; nothing skips.

use std::{
    net::TcpListener,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    sync::OnceLock,
    time::{Duration, Instant},
};

use serde_json::Value;

/// A binary of the workspace: `$<VAR>` if set, else in this test's target folder.
fn workspace_bin(name: &str, var: &str) -> PathBuf {
    if let Some(path) = std::env::var_os(var) {
        return PathBuf::from(path);
    }
    let exe = std::env::current_exe().expect("current exe");
    // target/<profile>/deps/<test>-<hash>
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .expect("target/<profile>");
    let bin = profile_dir.join(name);
    assert!(
        bin.exists(),
        "{} is missing: build it first (`cargo xtask test` does), or set {var}",
        bin.display()
    );
    bin
}

/// The collector binary.
pub fn collector_bin() -> PathBuf {
    workspace_bin("collector", "COLLECTOR_BIN")
}

/// Panics unless this process may load BPF programs.
pub fn require_bpf() {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let caps = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        .unwrap_or(0);
    let sys_admin = caps & (1 << 21) != 0;
    let bpf_perfmon = caps & (1 << 39) != 0 && caps & (1 << 38) != 0;
    assert!(
        sys_admin || bpf_perfmon,
        "these tests load eBPF programs into the running kernel: run them as root \
         (effective capabilities here: {caps:#x})"
    );
}

/// A free TCP port on loopback (bound then released; the collector binds it right after).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// How much slower than the CI host this machine runs the tests: `COLLECTOR_TEST_TIME_SCALE`
/// (a factor, default 1). The kernel matrix sets it inside its emulated (TCG) guests, where
/// everything takes several times longer; every timeout of the harness is stretched by it.
pub fn time_scale() -> f64 {
    static SCALE: OnceLock<f64> = OnceLock::new();
    *SCALE.get_or_init(|| {
        std::env::var("COLLECTOR_TEST_TIME_SCALE")
            .ok()
            .and_then(|v| v.parse::<f64>().ok())
            .filter(|v| v.is_finite() && *v >= 1.0)
            .unwrap_or(1.0)
    })
}

/// `timeout` stretched by [`time_scale`].
pub fn scaled(timeout: Duration) -> Duration {
    timeout.mul_f64(time_scale())
}

/// Polls `f` every 10 ms until it returns `Some` or `timeout` (stretched by [`time_scale`])
/// passes.
pub fn wait_for<T>(timeout: Duration, mut f: impl FnMut() -> Option<T>) -> Option<T> {
    let deadline = Instant::now() + scaled(timeout);
    loop {
        if let Some(v) = f() {
            return Some(v);
        }
        if Instant::now() >= deadline {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// A running collector, killed when dropped.
pub struct Collector {
    child: Child,
    pub addr: String,
    pub log_dir: tempfile::TempDir,
    stderr_path: PathBuf,
}

impl Collector {
    /// Starts the collector with `extra` arguments and waits until `/readyz` answers 200.
    pub fn start(extra: &[&str]) -> Self {
        Self::start_in(tempfile::tempdir().expect("log dir"), extra)
    }

    /// Starts the collector with the config file `toml` (written into its log folder).
    pub fn start_with_config(toml: &str) -> Self {
        let log_dir = tempfile::tempdir().expect("log dir");
        let config = log_dir.path().join("collector.toml");
        std::fs::write(&config, toml).expect("write config");
        Self::start_in(log_dir, &["--config", config.to_str().unwrap()])
    }

    /// Starts the collector using `log_dir` (kept across restarts by the caller).
    pub fn start_in(log_dir: tempfile::TempDir, extra: &[&str]) -> Self {
        Self::start_in_env(log_dir, extra, &[])
    }

    /// [`Collector::start_in`] with environment variables `env`. Its stderr goes to
    /// `collector.stderr` in the log folder (appended: a restart keeps the earlier run's).
    ///
    /// With `COLLECTOR_TEST_CONSOLE_HOOKS` set (e.g. `raw_syscalls` or `syscall_tracepoints`, as
    /// the kernel matrix runs the console tests again), the collector gets that
    /// `kernel.console_hooks`: added to the test's config file, or in a config file of its own.
    pub fn start_in_env(log_dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::start_wrapped(&[], log_dir, extra, env)
    }

    /// [`Collector::start_in_env`], the collector started by the command `wrapper` (e.g.
    /// `setpriv ... --`) when it is not empty.
    pub fn start_wrapped(
        wrapper: &[String],
        log_dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> Self {
        Self::spawn(wrapper, log_dir, extra, env, true)
    }

    /// [`Collector::start_in_env`] without waiting for `/readyz`: for tests of readiness.
    pub fn start_unready(log_dir: tempfile::TempDir, extra: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn(&[], log_dir, extra, env, false)
    }

    fn spawn(
        wrapper: &[String],
        log_dir: tempfile::TempDir,
        extra: &[&str],
        env: &[(&str, &str)],
        wait: bool,
    ) -> Self {
        require_bpf();
        let forced_config = forced_console_hooks(log_dir.path(), extra);
        let extra: Vec<&str> = match &forced_config {
            Some(args) => args.iter().map(String::as_str).collect(),
            None => extra.to_vec(),
        };
        let addr = format!("127.0.0.1:{}", free_port());
        let stderr_path = log_dir.path().join("collector.stderr");
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&stderr_path)
            .expect("stderr file");
        let extra = with_trusted_standins(log_dir.path(), &extra);
        let mut command = match wrapper.split_first() {
            Some((program, args)) => {
                let mut command = Command::new(program);
                command.args(args).arg(collector_bin());
                command
            }
            None => Command::new(collector_bin()),
        };
        let child = command
            .args(["run", "--listen", &addr, "--log-dir"])
            .arg(log_dir.path())
            .args(&extra)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawn collector");
        let mut collector = Self {
            child,
            addr,
            log_dir,
            stderr_path,
        };
        if !wait {
            return collector;
        }
        let ready = wait_for(Duration::from_secs(30), || {
            if let Ok(Some(status)) = collector.child.try_wait() {
                panic!(
                    "collector exited ({status}) before ready:\n{}",
                    collector.stderr()
                );
            }
            (collector.get_status("/readyz") == Some(200)).then_some(())
        });
        assert!(
            ready.is_some(),
            "collector not ready in 30 s:\n{}",
            collector.stderr()
        );
        if forced_config.is_some() {
            collector.assert_console_hooks_forced();
        }
        collector
    }

    /// With `COLLECTOR_TEST_CONSOLE_HOOKS` set, console capture really is on the hooks it names
    /// (a forced run that silently used others would prove nothing about the path it forces).
    fn assert_console_hooks_forced(&self) {
        let Ok(hooks) = std::env::var("COLLECTOR_TEST_CONSOLE_HOOKS") else {
            return;
        };
        let ready: Value = serde_json::from_str(&self.get_text("/readyz")).expect("readyz JSON");
        let attached = |name: &str| {
            ready["probes"]
                .as_array()
                .into_iter()
                .flatten()
                .any(|p| p["probe"] == name && p["attached"] == true)
        };
        let on_them = match hooks.as_str() {
            "raw_syscalls" => attached("console_sys_enter") && attached("console_sys_exit"),
            "syscall_tracepoints" => {
                attached("console_sys_enter_write") && attached("console_sys_exit_write")
            }
            "fexit" => attached("console_fexit_write") && attached("console_fexit_close"),
            other => panic!("COLLECTOR_TEST_CONSOLE_HOOKS={other}: not a console_hooks value"),
        };
        assert!(on_them, "console_hooks = {hooks} forced, but: {ready:#}");
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.addr)
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(&self.stderr_path).unwrap_or_default()
    }

    pub fn get_status(&self, path: &str) -> Option<u16> {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .timeout_global(Some(scaled(Duration::from_secs(5))))
            .build()
            .new_agent();
        agent
            .get(self.url(path))
            .call()
            .ok()
            .map(|r| r.status().as_u16())
    }

    pub fn get_text(&self, path: &str) -> String {
        ureq::get(self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .body_mut()
            .read_to_string()
            .expect("body")
    }

    /// The body of `GET path`, whatever the status.
    pub fn get_text_any(&self, path: &str) -> String {
        let agent = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .build()
            .new_agent();
        agent
            .get(self.url(path))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .body_mut()
            .read_to_string()
            .expect("body")
    }

    pub fn get_json(&self, path: &str) -> Value {
        serde_json::from_str(&self.get_text(path)).expect("JSON body")
    }

    /// The instance with `uuid` in `/v1/instances`, if listed.
    pub fn instance(&self, uuid: &str) -> Option<Value> {
        let list = self.get_json("/v1/instances");
        list.as_array()?
            .iter()
            .find(|i| i["instance_uuid"] == uuid)
            .cloned()
    }

    /// Sends SIGTERM and waits for the exit status.
    pub fn stop(mut self) -> std::process::ExitStatus {
        self.terminate()
    }

    /// Sends SIGTERM and waits for the exit status, keeping the log folder.
    pub fn terminate(&mut self) -> std::process::ExitStatus {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().expect("wait collector")
    }

    /// Stops the collector (SIGTERM) and hands back its log folder, e.g. for a restart.
    pub fn stop_keep_dir(mut self) -> tempfile::TempDir {
        self.terminate();
        self.take_dir()
    }

    /// Kills the collector with SIGKILL (no shutdown of its own, as a crash or the OOM killer
    /// would) and hands back its log folder.
    pub fn kill_keep_dir(mut self) -> tempfile::TempDir {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.take_dir()
    }

    fn take_dir(&mut self) -> tempfile::TempDir {
        let placeholder = tempfile::tempdir().expect("placeholder dir");
        std::mem::replace(&mut self.log_dir, placeholder)
    }

    /// The collector's pid.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Waits up to `timeout` for the collector to exit by itself.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<std::process::ExitStatus> {
        wait_for(timeout, || self.child.try_wait().ok().flatten())
    }

    /// The lifecycle events of `uuid` (`/v1/instances/{uuid}/events`), if it has any.
    pub fn events_of(&self, uuid: &str) -> Option<Vec<Value>> {
        if self.get_status(&format!("/v1/instances/{uuid}/events")) != Some(200) {
            return None;
        }
        let text = self.get_text(&format!("/v1/instances/{uuid}/events"));
        Some(
            text.lines()
                .map(|l| serde_json::from_str(l).expect("NDJSON line"))
                .collect(),
        )
    }

    /// The value of the sample `series` (name and labels exactly as exposed), 0 if absent.
    pub fn metric(&self, series: &str) -> f64 {
        let metrics = self.get_text("/metrics");
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
            .unwrap_or(0.0)
    }
}

/// `extra` with `kernel.console_hooks = $COLLECTOR_TEST_CONSOLE_HOOKS` in its config file (a copy
/// in `log_dir`, or a new one), or `None` when the variable is not set or the test's config sets
/// the hooks itself.
fn forced_console_hooks(log_dir: &Path, extra: &[&str]) -> Option<Vec<String>> {
    let hooks = std::env::var("COLLECTOR_TEST_CONSOLE_HOOKS").ok()?;
    let mut args: Vec<String> = extra.iter().map(|&a| a.to_owned()).collect();
    let at = args.iter().position(|a| a == "--config");
    let mut config = at
        .and_then(|i| args.get(i + 1))
        .map(|path| std::fs::read_to_string(path).expect("read the test's config file"))
        .unwrap_or_default();
    // A test that sets the hooks itself is about them: its own setting stands.
    if config.contains("console_hooks") {
        return None;
    }
    let setting = format!("console_hooks = \"{hooks}\"\n");
    if let Some(table) = config.find("[kernel]\n") {
        config.insert_str(table + "[kernel]\n".len(), &setting);
    } else {
        config.push_str(&format!("\n[kernel]\n{setting}"));
    }
    let path = log_dir.join("collector-console-hooks.toml");
    std::fs::write(&path, config).expect("write config");
    let path = path.to_str().expect("UTF-8 path").to_owned();
    match at {
        Some(i) if i + 1 < args.len() => args[i + 1] = path,
        _ => args.extend(["--config".to_owned(), path]),
    }
    Some(args)
}

impl Drop for Collector {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The folders the collector trusts by default (`trusted_executable_dirs`).
pub const DEFAULT_TRUSTED_DIRS: [&str; 5] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/libexec",
    "/opt",
];

/// `extra` with the stand-ins' folder trusted (`trusted_executable_dirs`, with the defaults):
/// added to the config file the test gives (`--config PATH`), or as the config when it gives
/// none. A config that sets the key itself is left as it is.
fn with_trusted_standins(log_dir: &Path, extra: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = extra.iter().map(|a| (*a).to_owned()).collect();
    let given = args.iter().position(|a| a == "--config");
    let text = given.map_or_else(String::new, |i| {
        std::fs::read_to_string(&args[i + 1]).expect("read the test's config")
    });
    if text
        .lines()
        .any(|l| l.trim_start().starts_with("trusted_executable_dirs"))
    {
        return args;
    }
    let mut dirs: Vec<String> = DEFAULT_TRUSTED_DIRS
        .iter()
        .map(|d| (*d).to_owned())
        .collect();
    dirs.push(standin_dir().display().to_string());
    let merged = log_dir.join("collector-trusted.toml");
    // Top-level keys come before the first table.
    std::fs::write(
        &merged,
        format!("trusted_executable_dirs = {dirs:?}\n{text}"),
    )
    .expect("write config");
    let merged = merged.display().to_string();
    match given {
        Some(i) => args[i + 1] = merged,
        None => args.extend(["--config".to_owned(), merged]),
    }
    args
}

/// The stand-in hypervisor binary, copied under the executable names tests use.
pub fn standin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("collector-standins-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("standin dir");
        dir
    })
}

/// Path of the stand-in named `exe` (created on first use).
pub fn standin_path(exe: &str) -> PathBuf {
    // Tests run in parallel threads: one copies while the others wait, so no thread executes a
    // file another is still writing (ETXTBSY).
    static CREATING: std::sync::Mutex<()> = std::sync::Mutex::new(());
    let _guard = CREATING
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let path = standin_dir().join(exe);
    if !path.exists() {
        let tmp = path.with_extension("tmp");
        std::fs::copy(workspace_bin("standin-vmm", "STANDIN_VMM_BIN"), &tmp).expect("copy standin");
        std::fs::rename(&tmp, &path).expect("rename standin");
    }
    path
}

/// A running stand-in hypervisor, killed when dropped.
pub struct Standin {
    pub child: Child,
}

impl Standin {
    /// Sends `signal` to the stand-in and reaps it.
    pub fn signal(&mut self, signal: i32) {
        // SAFETY: signalling our own child.
        unsafe { libc::kill(self.child.id() as i32, signal) };
        let _ = self.child.wait();
    }

    /// Waits for the stand-in to end by itself.
    pub fn wait(&mut self) -> std::process::ExitStatus {
        self.child.wait().expect("wait standin")
    }

    /// Starts the stand-in as `exe` with the VMM's command line `args` and `STANDIN_*` `env`.
    pub fn spawn(exe: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_in(Path::new("."), exe, args, env)
    }

    /// [`Standin::spawn`] with `dir` as the working directory.
    pub fn spawn_in(dir: &Path, exe: &str, args: &[&str], env: &[(&str, &str)]) -> Self {
        Self::spawn_path(&standin_path(exe), dir, args, env)
    }

    /// [`Standin::spawn_in`] from a copy of the stand-in at `path` (any folder).
    pub fn spawn_path(path: &Path, dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Self {
        // A freshly copied stand-in is busy (ETXTBSY) while a process forked by another test
        // thread during the copy still holds the copy's descriptor: retry until it has exec'd.
        for _ in 0..200 {
            match Command::new(path)
                .current_dir(dir)
                .args(args)
                .envs(env.iter().copied())
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
            {
                Ok(child) => return Self { child },
                Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                    std::thread::sleep(Duration::from_millis(10));
                }
                Err(e) => panic!("spawn {}: {e}", path.display()),
            }
        }
        panic!("spawn standin: {} stays busy", path.display());
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Standin {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A fresh instance id, unique within and across test runs.
pub fn new_uuid(tag: &str) -> String {
    static COUNTER: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .subsec_nanos();
    format!("{tag}-{}-{n}-{nanos:08x}", std::process::id())
}

/// The value of the sample `series` (name and labels exactly as served, e.g.
/// `compute_instance_vcpus{instance_uuid="x"}`) in an OpenMetrics exposition.
pub fn sample(exposition: &str, series: &str) -> Option<f64> {
    exposition
        .lines()
        .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

// ---------------------------------------------------------------------------------------------
// Console logs.
// ---------------------------------------------------------------------------------------------

pub mod kube_api;
pub mod otlp_receiver;
pub mod qemu_guest;
pub mod servers;

/// `s` as one URL path segment: every byte but the unreserved ones percent-encoded.
pub fn path_segment(s: &str) -> String {
    s.bytes()
        .map(|b| {
            if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
                (b as char).to_string()
            } else {
                format!("%{b:02X}")
            }
        })
        .collect()
}

/// A config file holding `text`, deleted when dropped.
pub fn config_file(text: &str) -> tempfile::NamedTempFile {
    let file = tempfile::NamedTempFile::new().expect("config file");
    std::fs::write(file.path(), text).expect("write config");
    file
}

/// Parses NDJSON.
pub fn ndjson(text: &str) -> Vec<Value> {
    text.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

/// The `message`s of the records of `stream`, in order, checking that their `seq` run from 1
/// without a gap.
pub fn messages(records: &[Value], stream: &str) -> Vec<String> {
    let of_stream: Vec<&Value> = records.iter().filter(|r| r["stream"] == stream).collect();
    for (i, r) in of_stream.iter().enumerate() {
        assert_eq!(r["seq"], i as u64 + 1, "seq gap in {stream}: {r}");
    }
    of_stream
        .iter()
        .map(|r| r["message"].as_str().expect("message").to_owned())
        .collect()
}

impl Collector {
    /// `GET /v1/instances/{uuid}/logs?{query}` as records.
    pub fn logs(&self, uuid: &str, query: &str) -> Vec<Value> {
        ndjson(&self.get_text(&format!(
            "/v1/instances/{}/logs?{query}",
            path_segment(uuid)
        )))
    }

    /// The records in `<log-dir>/<dir>/console.log`.
    pub fn log_file(&self, dir: &str) -> Vec<Value> {
        let path = self.log_dir.path().join(dir).join("console.log");
        ndjson(&std::fs::read_to_string(&path).unwrap_or_default())
    }
}
