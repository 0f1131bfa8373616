//! The collector's configuration file (TOML). Every field is optional; the defaults work on a
//! bare host. Unknown fields are errors, so a typo never silently does nothing.

use std::{
    collections::BTreeMap,
    net::SocketAddr,
    path::{Path, PathBuf},
};

use serde::{Deserialize, Serialize};

/// Default address of the HTTP server (`/metrics`, `/healthz`, `/readyz`, `/v1`).
pub(crate) const DEFAULT_LISTEN: &str = "127.0.0.1:9478";
/// Default permission bits of the API socket: its owner (root) only.
pub(crate) const DEFAULT_API_SOCKET_MODE: u32 = 0o600;
/// Polls of the console ring (`kernel.console_poll_ms`) without a wake-up after which a record
/// that finds the ring read wakes the reader: at most one such wake-up every 0.5 s with the
/// defaults, while the reader polls for twice as long after each.
const CONSOLE_QUIET_POLLS: u64 = 50;

/// Bounds of `console.burst_bytes`: a 64 KiB write and its record must fit; the kernel's
/// refill arithmetic must not overflow.
const BURST_MIN: u64 = 128 * 1024;
const BURST_MAX: u64 = 1 << 32;
/// Default folder of per-instance logs.
pub(crate) const DEFAULT_LOG_DIR: &str = "/var/log/compute-collector";

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct Config {
    /// Address the HTTP server listens on: every route, `/v1` included (unauthenticated, so a
    /// loopback address unless `allow_unauthenticated_remote_api`).
    pub(crate) listen: SocketAddr,
    /// A second address that serves only `/metrics`, `/healthz` and `/readyz` (`/v1` is 404
    /// there): what Prometheus and the kubelet reach on the pod IP.
    pub(crate) metrics_listen: Option<SocketAddr>,
    /// A unix socket that serves every route, `/v1` included, for the CLI (`--addr unix:PATH`)
    /// and node-local readers.
    pub(crate) api_socket: Option<PathBuf>,
    /// Permission bits of `api_socket` (connecting needs write permission).
    pub(crate) api_socket_mode: u32,
    /// Lets `listen` be a non-loopback address although it serves `/v1` without
    /// authentication (logged as a warning at start).
    pub(crate) allow_unauthenticated_remote_api: bool,
    /// The remote API: an address (the pod IP's port) serving `/v1`, `/healthz` and `/readyz`
    /// to remote readers, each `/v1` request only with a bearer token the Kubernetes API
    /// server authenticates (`TokenReview`) and authorises (`SubjectAccessReview`). Needs the
    /// Kubernetes source's client configuration and the node name.
    pub(crate) api_listen: Option<SocketAddr>,
    /// PEM certificate chain of `api_listen` (TLS, with `api_tls_key_file`); without both the
    /// remote API is plain HTTP and its bearer tokens travel in clear (warned at start).
    pub(crate) api_tls_cert_file: Option<PathBuf>,
    /// PEM private key (PKCS#8, PKCS#1 or SEC1) of `api_tls_cert_file`.
    pub(crate) api_tls_key_file: Option<PathBuf>,
    /// Limits of every HTTP server.
    pub(crate) http: HttpConfig,
    /// Folders a matched hypervisor's executable must be in (root-owned, not group- or
    /// world-writable); a process running anything else is not followed.
    pub(crate) trusted_executable_dirs: Vec<PathBuf>,
    /// Folder of per-instance log and event files.
    pub(crate) log_dir: PathBuf,
    /// Names of built-in matchers to turn off (`firecracker`, `qemu`, `cloud-hypervisor`).
    pub(crate) disable_builtin_matchers: Vec<String>,
    /// Extra matchers, tried after the built-ins.
    #[serde(rename = "matcher")]
    pub(crate) matchers: Vec<MatcherConfig>,
    /// Sizes of the kernel side's maps and buffers.
    pub(crate) kernel: KernelConfig,
    /// Retention of lifecycle events.
    pub(crate) events: EventsConfig,
    /// Console capture: which files are consoles, line assembly, log files and their caps.
    pub(crate) console: ConsoleConfig,
    /// The Kubernetes identity source and the remote API's access reviews.
    pub(crate) kubernetes: KubernetesConfig,
    /// Export of console records and lifecycle events to the fleet's log pipeline.
    pub(crate) export: ExportConfig,
}

impl Default for Config {
    fn default() -> Self {
        Self {
            listen: DEFAULT_LISTEN.parse().expect("valid default address"),
            metrics_listen: None,
            api_socket: None,
            api_socket_mode: DEFAULT_API_SOCKET_MODE,
            allow_unauthenticated_remote_api: false,
            api_listen: None,
            api_tls_cert_file: None,
            api_tls_key_file: None,
            http: HttpConfig::default(),
            trusted_executable_dirs: DEFAULT_TRUSTED_EXECUTABLE_DIRS
                .iter()
                .map(PathBuf::from)
                .collect(),
            log_dir: PathBuf::from(DEFAULT_LOG_DIR),
            disable_builtin_matchers: Vec::new(),
            matchers: Vec::new(),
            kernel: KernelConfig::default(),
            events: EventsConfig::default(),
            console: ConsoleConfig::default(),
            kubernetes: KubernetesConfig::default(),
            export: ExportConfig::default(),
        }
    }
}

/// Where the built-in matchers accept hypervisor executables from.
pub(crate) const DEFAULT_TRUSTED_EXECUTABLE_DIRS: [&str; 5] = [
    "/usr/bin",
    "/usr/sbin",
    "/usr/local/bin",
    "/usr/libexec",
    "/opt",
];

/// Limits of the HTTP servers, so that no client can hold the collector's descriptors or
/// workers.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct HttpConfig {
    /// Milliseconds a connection may take to send a request's headers, and may stay idle
    /// between requests; then it is closed.
    pub(crate) header_read_timeout_ms: u64,
    /// Most open connections per server; at the limit the oldest connection without a request
    /// in progress is closed to make room.
    pub(crate) max_connections: usize,
    /// Most requests handled at once per server; more wait for a turn.
    pub(crate) max_concurrent_requests: usize,
    /// Milliseconds a non-streaming request may take before it answers 503.
    pub(crate) request_timeout_ms: u64,
}

impl Default for HttpConfig {
    fn default() -> Self {
        Self {
            header_read_timeout_ms: 10_000,
            max_connections: 512,
            max_concurrent_requests: 32,
            request_timeout_ms: 10_000,
        }
    }
}

/// How long and how many lifecycle events stay queryable, and their per-instance files.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct EventsConfig {
    /// Seconds an exited instance's events stay queryable.
    pub(crate) retention_seconds: u64,
    /// Most events kept per instance (oldest dropped first).
    pub(crate) max_per_instance: usize,
    /// Most instances whose events are kept (those that ended longest ago dropped first).
    pub(crate) max_instances: usize,
    /// Size at which `<log_dir>/<instance>/events.log` is rotated.
    pub(crate) file_max_bytes: u64,
    /// Rotated files kept (`events.log.1` ... `events.log.N`).
    pub(crate) file_rotations: u32,
}

impl Default for EventsConfig {
    fn default() -> Self {
        Self {
            retention_seconds: 24 * 3600,
            max_per_instance: 256,
            max_instances: 10_000,
            file_max_bytes: 1 << 20,
            file_rotations: 2,
        }
    }
}

/// A matcher for a hypervisor the built-ins do not know.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct MatcherConfig {
    /// Unique name of the matcher.
    pub(crate) name: String,
    /// Value of the `hypervisor` label (default: the name).
    pub(crate) hypervisor: Option<String>,
    /// Glob over the executable's path (with a `/`) or base name (without). Its base name must
    /// start with a literal prefix: the kernel matches that at exec.
    pub(crate) executable: String,
    /// Regex over the command line (arguments joined by spaces); its first group is the id.
    pub(crate) instance_id: String,
    /// Regex over thread names that picks the vCPU threads; its first group is the vCPU index.
    pub(crate) vcpu_thread: String,
    /// Per-instance folder, with `{id}` for the instance id.
    pub(crate) instance_dir: Option<String>,
    /// Folders this matcher also accepts executables from, besides `trusted_executable_dirs`.
    #[serde(default)]
    pub(crate) trusted_executable_dirs: Vec<PathBuf>,
}

#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KernelConfig {
    /// Bytes of the process lifecycle ring buffer (a power of two, at least one page). The
    /// default (1 MiB) takes a burst of 1272 exec records, or 1000 execs and their exits.
    pub(crate) process_events_ring_bytes: u32,
    /// Most processes the kernel follows at once.
    pub(crate) max_tracked_processes: u32,
    /// Most threads of those processes the kernel follows at once (scheduling metrics).
    pub(crate) max_tracked_threads: u32,
    /// Bytes of the console-output ring buffer (a power of two, at least 128 KiB). When it is
    /// full, writes are counted as dropped (`where="kernel"`), never waited for.
    pub(crate) console_ring_bytes: u32,
    /// Most console descriptors (beyond fds 1 and 2) the kernel follows at once.
    pub(crate) max_console_fds: u32,
    /// Most entries one process may have in the console-descriptor map: one process cannot
    /// fill it for the host. Refusals: `collector_ebpf_console_fd_quota_refused_total`.
    pub(crate) console_fd_quota: u32,
    /// Syscalls of followed processes in flight at once (threads blocked in a console write
    /// each hold one). A write that finds it full is lost, counted (`where="evicted"`) and
    /// marked with a gap record.
    pub(crate) console_pending_entries: u32,
    /// How console capture hooks syscalls: `auto` (`fexit` on the syscall handlers where the
    /// kernel allows it, else the per-syscall tracepoints, else the raw syscall tracepoints),
    /// `fexit` (only those), `syscall_tracepoints` (the per-syscall tracepoints, else the raw
    /// ones) or `raw_syscalls` (always the raw ones). The last three are for testing each path.
    pub(crate) console_hooks: ConsoleHooksMode,
    /// Unread bytes on the console ring at which a write wakes the console reader. A wake-up
    /// costs the writing thread more than its capture (about 2 µs of its CPU on this host's
    /// kernel): below the mark no write wakes the reader, which polls the ring every
    /// `console_poll_ms` instead. 0: a wake-up for every write the reader had caught up with.
    pub(crate) console_wakeup_bytes: u32,
    /// How often the console reader looks at the ring without a wake-up: the longest a line
    /// that did not take the ring to `console_wakeup_bytes` waits to be read. It polls for
    /// 100 polls after each wake-up or find; the kernel wakes it for a record that finds the
    /// ring read only if none did for [`CONSOLE_QUIET_POLLS`] polls.
    pub(crate) console_poll_ms: u64,
    /// The kernel's BPF run-time statistics (`collector_ebpf_program_*`): `off` (the default:
    /// they cost every run of every BPF program on the host two clock reads), `on`, or
    /// `sampled` (on for `program_stats_sample_seconds` every `program_stats_every_seconds`).
    pub(crate) program_stats: ProgramStatsMode,
    /// Length of one sampling window of `program_stats = "sampled"`.
    pub(crate) program_stats_sample_seconds: u64,
    /// Time from the start of one sampling window to the next.
    pub(crate) program_stats_every_seconds: u64,
}

/// See [`KernelConfig::program_stats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ProgramStatsMode {
    #[default]
    Off,
    On,
    Sampled,
}

/// See [`KernelConfig::console_hooks`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum ConsoleHooksMode {
    #[default]
    Auto,
    Fexit,
    SyscallTracepoints,
    RawSyscalls,
}

impl Default for KernelConfig {
    fn default() -> Self {
        Self {
            process_events_ring_bytes: 1024 * 1024,
            max_tracked_processes: collector_common::DEFAULT_MAX_TRACKED_PROCESSES,
            max_tracked_threads: collector_common::DEFAULT_MAX_TRACKED_THREADS,
            console_ring_bytes: 8 * 1024 * 1024,
            max_console_fds: collector_common::DEFAULT_MAX_CONSOLE_FDS,
            console_fd_quota: collector_common::DEFAULT_CONSOLE_FD_QUOTA,
            console_pending_entries: 4096,
            console_hooks: ConsoleHooksMode::Auto,
            console_wakeup_bytes: 256 * 1024,
            console_poll_ms: 10,
            program_stats: ProgramStatsMode::Off,
            program_stats_sample_seconds: 10,
            program_stats_every_seconds: 300,
        }
    }
}

/// Console capture. Sizes are per instance unless named otherwise.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ConsoleConfig {
    /// Console files by matcher name: globs of the form `*SUFFIX` over the path the VMM opens
    /// (a `SUFFIX` starting with `/` also matches the bare name). The kernel decides at `open`,
    /// before the first write, so only a literal suffix (at most 63 bytes) can be matched.
    /// Setting this replaces the default (`firecracker = ["*/vm.log"]`).
    pub(crate) files: BTreeMap<String, Vec<String>>,
    /// Longest line, in bytes; a longer one is split and its pieces marked `split`.
    pub(crate) max_line_bytes: usize,
    /// A line without its newline is flushed (marked `partial`) after this much idle time.
    pub(crate) partial_flush_ms: u64,
    /// Seconds the logs of an exited instance stay readable through the API.
    pub(crate) retention_seconds: u64,
    /// Bytes of recent lines kept in memory per instance for the API's `tail`, `since` and
    /// `follow` (records counted at their real size).
    pub(crate) history_bytes: usize,
    /// Memory for console lines, histories and the file queue together, all instances: three
    /// quarters for the histories (past it, ended instances and then the largest histories give
    /// way), a quarter for the file queue (one instance at most an eighth of that). Default:
    /// half the collector's cgroup memory limit when it has one, else 128 MiB.
    pub(crate) memory_max_bytes: Option<usize>,
    /// Lines waiting for the log files; beyond it lines are dropped and counted
    /// (`where="queue"`), so a slow disk never holds up the kernel reader.
    pub(crate) queue_lines: usize,
    /// A log file is rotated (`console.log` -> `console.log.1` ...) when it reaches this size.
    pub(crate) file_max_bytes: u64,
    /// Rotated files kept per instance (the per-instance cap is
    /// `file_max_bytes * (file_rotations + 1)`).
    pub(crate) file_rotations: u32,
    /// Cap on all console log files together; the oldest rotated files (and the files of
    /// instances that are gone) are deleted first, then lines are dropped (`where="sink"`).
    pub(crate) disk_max_bytes: u64,
    /// Each instance's console budget, bytes per second (a token bucket per process in the
    /// kernel; 0: none). An instance over it loses its own excess before it can take ring
    /// space from others (`where="over_budget"`, with a gap record). Userspace gives each
    /// instance twice this, counting 64 bytes a line, when it turns bytes into lines.
    pub(crate) rate_bytes_per_sec: u64,
    /// The bucket's size: what an instance may write at full speed after a quiet spell (a
    /// boot log).
    pub(crate) burst_bytes: u64,
}

impl Default for ConsoleConfig {
    fn default() -> Self {
        Self {
            files: BTreeMap::from([("firecracker".to_owned(), vec!["*/vm.log".to_owned()])]),
            max_line_bytes: 16 * 1024,
            partial_flush_ms: 500,
            retention_seconds: 600,
            history_bytes: 4 * 1024 * 1024,
            memory_max_bytes: None,
            queue_lines: 65536,
            file_max_bytes: 16 * 1024 * 1024,
            file_rotations: 3,
            disk_max_bytes: 1024 * 1024 * 1024,
            rate_bytes_per_sec: 1024 * 1024,
            burst_bytes: 1024 * 1024,
        }
    }
}

/// `console.memory_max_bytes` without a cgroup memory limit.
const DEFAULT_CONSOLE_MEMORY: usize = 128 << 20;

impl ConsoleConfig {
    /// `memory_max_bytes`, or its default from the cgroup limit.
    pub(crate) fn memory_max(&self) -> usize {
        self.memory_max_bytes.unwrap_or_else(|| {
            cgroup_memory_limit().map_or(DEFAULT_CONSOLE_MEMORY, |limit| limit / 2)
        })
    }

    /// The histories' share of [`Self::memory_max`].
    pub(crate) fn history_total_bytes(&self) -> usize {
        self.memory_max() / 4 * 3
    }

    /// The file queue's share of [`Self::memory_max`].
    pub(crate) fn queue_bytes(&self) -> usize {
        self.memory_max() / 4
    }
}

/// The memory limit of this process's cgroup (v2 `memory.max`), if it has one.
fn cgroup_memory_limit() -> Option<usize> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").ok()?;
    // cgroup v2: the line `0::/path`.
    let path = cgroup.lines().find_map(|l| l.strip_prefix("0::"))?;
    let max = std::fs::read_to_string(format!("/sys/fs/cgroup{}/memory.max", path.trim())).ok()?;
    max.trim().parse().ok()
}

/// The Kubernetes identity source: which Pods back this node's instances, and how long the
/// remote API's token and access reviews are cached.
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct KubernetesConfig {
    /// Watch Pods and Namespaces when a client configuration exists (the in-cluster service
    /// account, else `KUBECONFIG`); `false` turns the source off even then.
    pub(crate) enabled: bool,
    /// Label selector of the Pods that back instances (the Unikraft runtime's by default; Kata:
    /// `managed-by=kata-provider`).
    pub(crate) pod_label_selector: String,
    /// Field selector of this node's Pods, `{node}` standing for the node name (the Unikraft
    /// runtime's virtual node by default; Kata: `spec.nodeName={node}`). Empty: every node's.
    pub(crate) pod_field_selector: String,
    /// Seconds a token review or an access review of the remote API is reused.
    pub(crate) auth_cache_seconds: u64,
    /// Most reviews cached (each of the two caches); the oldest leave first.
    pub(crate) auth_cache_entries: usize,
    /// Seconds console lines of an instance whose Pod is not known yet are held back from the
    /// console files, so that they are written with its identity; past it they are written
    /// without (counted).
    pub(crate) identity_wait_seconds: u64,
    /// Bytes of held-back lines, all instances together; past it the instance waiting longest
    /// has its lines written without identity (counted).
    pub(crate) identity_hold_bytes: usize,
}

/// The field selector's stand-in for the node name.
pub(crate) const NODE_PLACEHOLDER: &str = "{node}";

impl Default for KubernetesConfig {
    fn default() -> Self {
        Self {
            enabled: true,
            pod_label_selector: "managed-by=infra-provider-unikraft".to_owned(),
            pod_field_selector: "spec.nodeName=kraftlet-{node}".to_owned(),
            auth_cache_seconds: 10,
            auth_cache_entries: 4096,
            identity_wait_seconds: 30,
            identity_hold_bytes: 8 << 20,
        }
    }
}

/// Exporters of records to other systems.
#[derive(Debug, Clone, Default, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct ExportConfig {
    /// The OTLP logs exporter (off without an endpoint).
    pub(crate) otlp: OtlpConfig,
}

/// The OTLP transport.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
pub(crate) enum OtlpProtocol {
    /// OTLP/HTTP, protobuf bodies, `POST <endpoint>/v1/logs`.
    #[default]
    #[serde(rename = "http/protobuf")]
    HttpProtobuf,
    /// OTLP/gRPC, `opentelemetry.proto.collector.logs.v1.LogsService/Export`.
    #[serde(rename = "grpc")]
    Grpc,
}

/// `[export.otlp]`: console records and lifecycle events, read back from the per-instance
/// files, sent as OTLP logs (docs/export.md).
#[derive(Debug, Clone, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub(crate) struct OtlpConfig {
    /// The receiver, e.g. `http://127.0.0.1:4318` (`http/protobuf`) or `http://127.0.0.1:4317`
    /// (`grpc`). Empty: the exporter is off.
    pub(crate) endpoint: String,
    pub(crate) protocol: OtlpProtocol,
    /// Never send a record without tenant identity (project, instance name and namespace):
    /// hold it up to `kubernetes.identity_wait_seconds` (the one identity bound), then drop
    /// and count it. Default: on exactly when the Kubernetes source runs.
    pub(crate) require_identity: Option<bool>,
    /// Most records in one request.
    pub(crate) batch_max_records: usize,
    /// Most bytes (of file lines) in one request.
    pub(crate) batch_max_bytes: usize,
    /// Longest a record waits for its batch to fill.
    pub(crate) batch_timeout_ms: u64,
    /// Bytes read from the files and not yet acknowledged by the receiver; past it, reading
    /// pauses (the files keep the data).
    pub(crate) queue_max_bytes: usize,
    /// Timeout of one request.
    pub(crate) request_timeout_ms: u64,
    /// First retry delay (doubled each retry, with jitter) and its cap.
    pub(crate) retry_initial_ms: u64,
    pub(crate) retry_max_ms: u64,
    /// How often the files are checked for new lines.
    pub(crate) poll_ms: u64,
}

impl Default for OtlpConfig {
    fn default() -> Self {
        Self {
            endpoint: String::new(),
            protocol: OtlpProtocol::HttpProtobuf,
            require_identity: None,
            batch_max_records: 1024,
            batch_max_bytes: 1 << 20,
            batch_timeout_ms: 200,
            queue_max_bytes: 64 << 20,
            request_timeout_ms: 10_000,
            retry_initial_ms: 250,
            retry_max_ms: 30_000,
            poll_ms: 200,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub(crate) enum ConfigError {
    #[error("config {path}")]
    Read {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("config {path}:{line}:{column}: {message}")]
    Parse {
        path: String,
        line: usize,
        column: usize,
        message: String,
    },
    #[error("config {path}: {message}")]
    Invalid { path: String, message: String },
}

impl Config {
    /// Reads and checks the file at `path`.
    pub(crate) fn load(path: &Path) -> Result<Self, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
            path: path.display().to_string(),
            source,
        })?;
        Self::parse(&text, &path.display().to_string())
    }

    /// Parses and checks `text`, naming `origin` in errors.
    pub(crate) fn parse(text: &str, origin: &str) -> Result<Self, ConfigError> {
        let config: Self = toml::from_str(text).map_err(|err| {
            let offset = err.span().map_or(0, |s| s.start);
            let before = &text[..offset.min(text.len())];
            let line = before.matches('\n').count() + 1;
            let column = before.len() - before.rfind('\n').map_or(0, |i| i + 1) + 1;
            ConfigError::Parse {
                path: origin.to_owned(),
                line,
                column,
                message: err.message().to_owned(),
            }
        })?;
        config.check().map_err(|message| ConfigError::Invalid {
            path: origin.to_owned(),
            message,
        })?;
        Ok(config)
    }

    /// How long after a console-reader wake-up the kernel wakes it again for a record that
    /// finds the ring read (see `kernel::console::ConsoleReader`): [`CONSOLE_QUIET_POLLS`] polls.
    pub(crate) fn console_quiet(&self) -> std::time::Duration {
        std::time::Duration::from_millis(self.kernel.console_poll_ms * CONSOLE_QUIET_POLLS)
    }

    /// The per-process console limits the kernel programs are loaded with.
    pub(crate) fn console_limits(&self) -> collector_common::ConsoleLimits {
        let (rate, burst) = (self.console.rate_bytes_per_sec, self.console.burst_bytes);
        collector_common::ConsoleLimits {
            rate_bytes_per_sec: rate,
            burst_bytes: burst,
            refill_ns: if rate == 0 {
                0
            } else {
                (u128::from(burst) * 1_000_000_000 / u128::from(rate)) as u64
            },
            fd_quota: u64::from(self.kernel.console_fd_quota),
            wakeup_bytes: u64::from(self.kernel.console_wakeup_bytes),
            wakeup_interval_ns: self.console_quiet().as_nanos() as u64,
        }
    }

    fn check(&self) -> Result<(), String> {
        let ring = self.kernel.process_events_ring_bytes;
        if !ring.is_power_of_two() || ring < 4096 {
            return Err(format!(
                "kernel.process_events_ring_bytes = {ring}: must be a power of two of at least 4096"
            ));
        }
        let ring = self.kernel.console_ring_bytes;
        if !ring.is_power_of_two() || ring < 128 * 1024 {
            return Err(format!(
                "kernel.console_ring_bytes = {ring}: must be a power of two of at least 131072"
            ));
        }
        let wakeup = self.kernel.console_wakeup_bytes;
        if wakeup > ring / 2 {
            return Err(format!(
                "kernel.console_wakeup_bytes = {wakeup}: must be at most half of \
                 kernel.console_ring_bytes ({ring}), so that the reader is woken well before \
                 the ring is full"
            ));
        }
        if !(1..=1000).contains(&self.kernel.console_poll_ms) {
            return Err(format!(
                "kernel.console_poll_ms = {}: must be between 1 and 1000",
                self.kernel.console_poll_ms
            ));
        }
        if self.kernel.max_console_fds == 0 {
            return Err("kernel.max_console_fds must be at least 1".into());
        }
        if self.kernel.console_fd_quota == 0 || self.kernel.console_pending_entries == 0 {
            return Err(
                "kernel.console_fd_quota and kernel.console_pending_entries must be at least 1"
                    .into(),
            );
        }
        let burst = self.console.burst_bytes;
        if self.console.rate_bytes_per_sec > 0 && !(BURST_MIN..=BURST_MAX).contains(&burst) {
            return Err(format!(
                "console.burst_bytes = {burst}: must be between {BURST_MIN} (a whole 64 KiB \
                 write) and {BURST_MAX}"
            ));
        }
        let c = &self.console;
        if c.max_line_bytes < 16 || c.history_bytes == 0 || c.queue_lines == 0 {
            return Err(
                "console.max_line_bytes must be at least 16, history_bytes and queue_lines \
                 at least 1"
                    .into(),
            );
        }
        if c.file_max_bytes < 4096 || c.disk_max_bytes < c.file_max_bytes {
            return Err(
                "console.file_max_bytes must be at least 4096 and disk_max_bytes at least \
                 file_max_bytes"
                    .into(),
            );
        }
        if self.events.max_per_instance == 0 || self.events.max_instances == 0 {
            return Err(
                "events.max_per_instance and events.max_instances must be at least 1".into(),
            );
        }
        if self.kernel.max_tracked_processes == 0 {
            return Err("kernel.max_tracked_processes must be at least 1".into());
        }
        if self.kernel.max_tracked_threads == 0 {
            return Err("kernel.max_tracked_threads must be at least 1".into());
        }
        let (sample, every) = (
            self.kernel.program_stats_sample_seconds,
            self.kernel.program_stats_every_seconds,
        );
        if sample == 0 || every <= sample {
            return Err(format!(
                "kernel.program_stats_sample_seconds = {sample}, program_stats_every_seconds = \
                 {every}: the window must be at least 1 s and shorter than the period"
            ));
        }
        let h = &self.http;
        if h.header_read_timeout_ms == 0
            || h.max_connections == 0
            || h.max_concurrent_requests == 0
            || h.request_timeout_ms == 0
        {
            return Err("http: every limit must be at least 1".into());
        }
        if self.api_socket_mode & !0o777 != 0 {
            return Err(format!(
                "api_socket_mode = {:#o}: only permission bits (0o777) are allowed",
                self.api_socket_mode
            ));
        }
        let relative = self
            .trusted_executable_dirs
            .iter()
            .chain(
                self.matchers
                    .iter()
                    .flat_map(|m| &m.trusted_executable_dirs),
            )
            .find(|d| !d.is_absolute());
        if let Some(dir) = relative {
            return Err(format!(
                "trusted_executable_dirs: {} is not an absolute path",
                dir.display()
            ));
        }
        if self.api_tls_cert_file.is_some() != self.api_tls_key_file.is_some() {
            return Err(
                "api_tls_cert_file and api_tls_key_file go together: set both (TLS) or neither"
                    .into(),
            );
        }
        let k = &self.kubernetes;
        if k.auth_cache_entries == 0 {
            return Err("kubernetes.auth_cache_entries must be at least 1".into());
        }
        let o = &self.export.otlp;
        if !o.endpoint.is_empty() {
            let ok = o
                .endpoint
                .strip_prefix("http://")
                .is_some_and(|rest| !rest.is_empty() && !rest.contains(['?', '#']));
            if !ok {
                return Err(format!(
                    "export.otlp.endpoint = {:?}: must be http://HOST:PORT[/PATH] (TLS is not \
                     supported: the node collector listens on localhost)",
                    o.endpoint
                ));
            }
        }
        if o.batch_max_records == 0
            || o.batch_max_bytes == 0
            || o.queue_max_bytes < o.batch_max_bytes
            || o.request_timeout_ms == 0
            || o.poll_ms == 0
            || o.retry_initial_ms == 0
            || o.retry_max_ms < o.retry_initial_ms
        {
            return Err(
                "export.otlp: batch_max_records, batch_max_bytes, request_timeout_ms, poll_ms \
                 and retry_initial_ms must be at least 1, queue_max_bytes at least \
                 batch_max_bytes, retry_max_ms at least retry_initial_ms"
                    .into(),
            );
        }
        for name in &self.disable_builtin_matchers {
            if !["firecracker", "qemu", "cloud-hypervisor"].contains(&name.as_str()) {
                return Err(format!(
                    "disable_builtin_matchers: no built-in matcher named {name:?}"
                ));
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The default ring takes a burst of 1000 execs and their exits (a ring slot is the record
    /// and an 8-byte header).
    #[test]
    fn default_ring_takes_a_burst_of_a_thousand_execs() {
        let slot = |record: usize| (record + 8).next_multiple_of(8);
        let exec = slot(size_of::<collector_common::ExecEvent>());
        let exit = slot(size_of::<collector_common::ExitEvent>());
        let ring = KernelConfig::default().process_events_ring_bytes as usize;
        assert_eq!((exec, ring / exec), (824, 1272));
        assert!(1000 * (exec + exit) <= ring);
    }

    #[test]
    fn the_console_wakeup_mark_and_poll_are_bounded() {
        let limits = Config::parse("", "t.toml").unwrap().console_limits();
        assert_eq!(limits.wakeup_bytes, 256 * 1024);
        let parsed = |text: &str| Config::parse(text, "t.toml").map(|c| c.console_limits());
        let zero = parsed("[kernel]\nconsole_wakeup_bytes = 0\n").unwrap();
        assert_eq!(zero.wakeup_bytes, 0, "0 keeps the kernel's own rule");
        let half = "[kernel]\nconsole_ring_bytes = 131072\nconsole_wakeup_bytes = 65537\n";
        let err = parsed(half).unwrap_err().to_string();
        assert!(
            err.contains("console_wakeup_bytes = 65537: must be at most half"),
            "{err}"
        );
        for poll in [0, 1001] {
            let err = parsed(&format!("[kernel]\nconsole_poll_ms = {poll}\n")).unwrap_err();
            assert!(err.to_string().contains("console_poll_ms"), "{err}");
        }
    }

    #[test]
    fn empty_file_gives_defaults() {
        let c = Config::parse("", "t.toml").unwrap();
        assert_eq!(c.listen.to_string(), DEFAULT_LISTEN);
        assert!(c.api_listen.is_none());
        let err = Config::parse("api_tls_cert_file = \"/c\"", "t.toml").unwrap_err();
        assert!(err.to_string().contains("go together"), "{err}");
        assert!(c.matchers.is_empty());
    }

    #[test]
    fn full_file() {
        let c = Config::parse(
            r#"
listen = "0.0.0.0:9999"
log_dir = "/tmp/logs"
disable_builtin_matchers = ["qemu"]

[kernel]
process_events_ring_bytes = 1048576

[console]
max_line_bytes = 1024
retention_seconds = 60

[console.files]
qemu = ["*/serial.log"]

[[matcher]]
name = "crosvm"
executable = "crosvm"
instance_id = '--name (\S+)'
vcpu_thread = '^crosvm_vcpu(\d+)$'
"#,
            "t.toml",
        )
        .unwrap();
        assert_eq!(c.listen.port(), 9999);
        assert_eq!(c.matchers[0].name, "crosvm");
        assert_eq!(c.kernel.process_events_ring_bytes, 1 << 20);
        assert_eq!(c.console.max_line_bytes, 1024);
        assert_eq!(c.console.files["qemu"], ["*/serial.log"]);
        assert!(
            !c.console.files.contains_key("firecracker"),
            "setting files replaces the default"
        );
        assert_eq!(
            c.console.history_bytes,
            ConsoleConfig::default().history_bytes
        );
    }

    #[test]
    fn errors_name_file_and_line() {
        let err = Config::parse("\nlisten = \"x\"\n", "/etc/c.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config /etc/c.toml:2:10: invalid"),
            "{err}"
        );
        let err = Config::parse("\n\nbogus = 1\n", "/etc/c.toml").unwrap_err();
        assert!(
            err.to_string()
                .starts_with("config /etc/c.toml:3:1: unknown field"),
            "{err}"
        );
        let err = Config::parse("[kernel]\nprocess_events_ring_bytes = 1000\n", "c").unwrap_err();
        assert!(err.to_string().contains("power of two"), "{err}");
    }

    /// The TOML block of docs/config.md.
    fn documented_example() -> &'static str {
        let doc = include_str!("../../docs/config.md");
        let start = doc
            .find("```toml\n")
            .expect("a toml block in docs/config.md")
            + 8;
        let len = doc[start..].find("```").expect("the block ends");
        &doc[start..start + len]
    }

    /// Every key path of `value` (tables walked, arrays of tables by their first element).
    fn key_paths(value: &toml::Value, prefix: &str, out: &mut Vec<String>) {
        match value {
            toml::Value::Table(table) => {
                for (key, value) in table {
                    let path = if prefix.is_empty() {
                        key.clone()
                    } else {
                        format!("{prefix}.{key}")
                    };
                    out.push(path.clone());
                    key_paths(value, &path, out);
                }
            }
            toml::Value::Array(items) if items.first().is_some_and(toml::Value::is_table) => {
                key_paths(&items[0], prefix, out);
            }
            _ => {}
        }
    }

    /// docs/config.md's example is a valid config that names every key the code has.
    #[test]
    fn documented_example_is_complete_and_valid() {
        let text = documented_example();
        let parsed = Config::parse(text, "docs/config.md").expect("the documented example parses");
        assert_eq!(parsed.kernel.console_ring_bytes, 8 * 1024 * 1024);
        assert_eq!(parsed.matchers[0].name, "crosvm");
        let documented: toml::Value = toml::from_str(text).unwrap();
        let mut documented_keys = Vec::new();
        key_paths(&documented, "", &mut documented_keys);
        let mut full = Config {
            matchers: parsed.matchers.clone(),
            ..Config::default()
        };
        full.matchers[0].hypervisor = Some("h".into());
        full.matchers[0].instance_dir = Some("d".into());
        full.metrics_listen = Some("0.0.0.0:9479".parse().unwrap());
        full.api_socket = Some("/run/s.sock".into());
        full.api_listen = Some("0.0.0.0:9480".parse().unwrap());
        full.api_tls_cert_file = Some("/c".into());
        full.api_tls_key_file = Some("/k".into());
        full.export.otlp.require_identity = Some(true);
        let mut code_keys = Vec::new();
        key_paths(&toml::Value::try_from(&full).unwrap(), "", &mut code_keys);
        let missing: Vec<&String> = code_keys
            .iter()
            .filter(|k| !k.starts_with("console.files.") && !documented_keys.contains(k))
            .collect();
        assert!(
            missing.is_empty(),
            "keys missing from docs/config.md: {missing:?}"
        );
    }
}
