//! Safe on a shared node (docs/security.md): what the collector exposes where, the capability
//! set the manifest grants, and what hostile local processes get. Real collectors, real
//! processes, exact outcomes; every process a test starts has an id or path of its own, so
//! that other collectors and stand-ins on the host do not change what it counts.

use std::{
    io::Write,
    net::TcpStream,
    os::unix::fs::{MetadataExt, PermissionsExt},
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use collector_tests::{
    Collector, Standin, collector_bin, free_port, new_uuid, path_segment, standin_dir,
    standin_path, wait_for,
};
use k8s_openapi::api::apps::v1::DaemonSet;
use serde_json::Value;

/// The JSON log lines of `collector` (started with `--log-format json`).
fn log_lines(collector: &Collector) -> Vec<Value> {
    collector
        .stderr()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The log lines saying process `pid` was refused for `reason`.
fn refusals(collector: &Collector, pid: u32, reason: &str) -> Vec<Value> {
    log_lines(collector)
        .into_iter()
        .filter(|l| {
            l["message"] == "hypervisor process refused; not followed"
                && l["pid"] == pid
                && l["reason"] == reason
        })
        .collect()
}

/// Resident memory of process `pid`, in bytes.
fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .expect("VmRSS")
        * 1024
}

/// A copy of the stand-in at `path` (mode `mode`, owned by root unless `uid`).
fn standin_copy(path: &Path, mode: u32, uid: Option<u32>) {
    let tmp = path.with_extension("tmp");
    std::fs::copy(standin_path("firecracker"), &tmp).expect("copy stand-in");
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode)).expect("chmod");
    if let Some(uid) = uid {
        std::os::unix::fs::chown(&tmp, Some(uid), Some(uid)).expect("chown");
    }
    std::fs::rename(&tmp, path).expect("rename");
}

fn series(collector: &Collector, name: &str) -> Option<f64> {
    let text = collector.get_text("/metrics");
    collector_tests::sample(&text, name)
}

#[test]
fn v1_is_only_on_the_api_listener_and_socket() {
    let dir = tempfile::tempdir().unwrap();
    let socket = dir.path().join("run/api.sock");
    let metrics = format!("127.0.0.1:{}", free_port());
    let collector = Collector::start(&[
        "--metrics-listen",
        &metrics,
        "--api-socket",
        socket.to_str().unwrap(),
    ]);
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .build()
        .into();
    let status = |base: &str, path: &str| {
        agent
            .get(format!("http://{base}{path}"))
            .call()
            .unwrap()
            .status()
            .as_u16()
    };
    for path in ["/metrics", "/healthz", "/readyz"] {
        assert_eq!(
            status(&metrics, path),
            200,
            "{path} on the metrics listener"
        );
    }
    for path in [
        "/v1/instances",
        "/v1/events",
        "/v1/instances/x",
        "/v1/instances/x/logs",
    ] {
        assert_eq!(
            status(&metrics, path),
            404,
            "{path} on the metrics listener"
        );
    }
    assert_eq!(status(&collector.addr, "/v1/instances"), 200);

    // The socket: root only, /v1 through the CLI.
    let meta = std::fs::symlink_metadata(&socket).expect("socket");
    assert_eq!(meta.mode() & 0o777, 0o600);
    let uuid = new_uuid("sock");
    // (An environment variable cannot hold a NUL: the unit tests show `\x00`.)
    // (A CR ends a line, as a newline does.)
    let tail = "title \u{1b}]0;owned\u{7} \u{1b}[2J del\u{7f} end\n";
    let _vmm = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[("STANDIN_TAIL", tail), ("STANDIN_LINES", "1")],
    );
    let addr = format!("unix:{}", socket.display());
    let cli = |args: &[&str]| {
        let out = Command::new(collector_bin())
            .args(args)
            .args(["--addr", &addr])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    };
    let listed = wait_for(Duration::from_secs(5), || {
        let body = cli(&["instances", "--json"]);
        let list: Vec<Value> = serde_json::from_slice(&body).expect("JSON from the socket");
        list.iter()
            .any(|i| i["instance_uuid"] == uuid)
            .then_some(())
    });
    assert!(listed.is_some(), "listed through the socket");
    wait_for(Duration::from_secs(5), || {
        (collector.logs(&uuid, "stream=stdout").len() == 2).then_some(())
    })
    .expect("both stdout records");

    // `collector logs`: control bytes visible, unless --raw.
    let shown = String::from_utf8(cli(&["logs", &uuid, "--stream", "stdout"])).unwrap();
    assert_eq!(
        shown, "stdout line 1\ntitle ^[]0;owned^G ^[[2J del^? end\n",
        "{shown:?}"
    );
    let raw = cli(&["logs", &uuid, "--stream", "stdout", "--raw"]);
    assert_eq!(raw, format!("stdout line 1\n{tail}").as_bytes());
}

#[test]
fn v1_on_a_non_loopback_address_needs_the_operator_to_say_so() {
    let out = Command::new(collector_bin())
        .args(["run", "--listen", "0.0.0.0:0"])
        .output()
        .unwrap();
    assert!(!out.status.success());
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains("without authentication on a non-loopback address")
            && stderr.contains("--allow-unauthenticated-remote-api"),
        "{stderr}"
    );
}

/// The capabilities the DaemonSet adds, as `setpriv` names them (`bpf`, `sys_ptrace`, ...).
fn manifest_capabilities() -> Vec<String> {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../deploy/base/daemonset.yaml");
    let text = std::fs::read_to_string(path).expect("daemonset.yaml");
    let daemonset: DaemonSet = serde_norway::from_str(&text).expect("a DaemonSet");
    let spec = daemonset
        .spec
        .expect("spec")
        .template
        .spec
        .expect("pod spec");
    let security = spec.containers[0]
        .security_context
        .clone()
        .expect("securityContext");
    assert_ne!(security.privileged, Some(true), "not privileged");
    let capabilities = security.capabilities.expect("capabilities");
    assert_eq!(capabilities.drop, Some(vec!["ALL".to_owned()]));
    capabilities
        .add
        .expect("capabilities added")
        .iter()
        .map(|c| c.trim_start_matches("CAP_").to_lowercase())
        .collect()
}

/// Capability numbers (linux/capability.h) of the names the manifest may use.
fn capability_bit(name: &str) -> u32 {
    match name {
        "dac_read_search" => 2,
        "sys_ptrace" => 19,
        "sys_admin" => 21,
        "sys_resource" => 24,
        "perfmon" => 38,
        "bpf" => 39,
        other => panic!("capability {other} has no number here yet"),
    }
}

#[test]
fn the_manifests_capabilities_are_enough() {
    let caps = manifest_capabilities();
    let set = format!(
        "-all,{}",
        caps.iter()
            .map(|c| format!("+{c}"))
            .collect::<Vec<_>>()
            .join(",")
    );
    let wrapper: Vec<String> = [
        "setpriv",
        "--inh-caps",
        &set,
        "--ambient-caps",
        &set,
        "--bounding-set",
        &set,
        "--",
    ]
    .iter()
    .map(|s| (*s).to_owned())
    .collect();
    // One VMM runs before the collector starts (found by the /proc scan, its console
    // descriptor read from /proc/PID/fd), one starts after (found at exec).
    let work = tempfile::tempdir().unwrap();
    let go = work.path().join("go");
    let before = new_uuid("caps-before");
    let vmm_json = r#"{"machine-config": {"vcpu_count": 3, "mem_size_mib": 64}}"#;
    std::fs::write(work.path().join("vmm.json"), vmm_json).unwrap();
    let console = work.path().join("before/vm.log");
    std::fs::create_dir_all(console.parent().unwrap()).unwrap();
    let _early = Standin::spawn_in(
        work.path(),
        "firecracker",
        &["--uuid", &before, "--config-file", "vmm.json"],
        &[
            ("STANDIN_LINES", "2"),
            ("STANDIN_CONSOLE_FILE", console.to_str().unwrap()),
            ("STANDIN_WAIT_FOR", go.to_str().unwrap()),
        ],
    );
    std::thread::sleep(Duration::from_millis(200));
    let collector = Collector::start_wrapped(
        &wrapper,
        tempfile::tempdir().unwrap(),
        &["--log-format", "json"],
        &[],
    );
    // It runs with exactly the manifest's capabilities.
    let status = std::fs::read_to_string(format!("/proc/{}/status", collector.pid())).unwrap();
    let effective = status
        .lines()
        .find_map(|l| l.strip_prefix("CapEff:"))
        .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
        .unwrap();
    let want: u64 = caps.iter().map(|c| 1u64 << capability_bit(c)).sum();
    assert_eq!(effective, want, "{caps:?}");

    // Every probe attached, console capture on per-syscall hooks.
    let ready = collector.get_json("/readyz");
    assert_eq!(ready["ready"], true, "{ready}");
    assert_eq!(ready["degraded"], serde_json::json!([]), "{ready}");
    let probes: Vec<&str> = ready["probes"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["probe"].as_str().unwrap())
        .collect();
    // Console capture per syscall: fexit on the handlers where the kernel allows it, else the
    // per-syscall tracepoints.
    assert!(
        probes.contains(&"console_fexit_write") || probes.contains(&"console_sys_enter_write"),
        "{probes:?}"
    );
    // The raw syscall fallback's probes are not there.
    assert!(
        !probes.contains(&"console_sys_enter") && !probes.contains(&"console_sys_exit"),
        "{probes:?}"
    );
    let text = collector.get_text("/metrics");
    let missing: Vec<&str> = text
        .lines()
        .filter(|l| l.starts_with("collector_privilege_missing{") && l.ends_with(" 1"))
        .collect();
    assert!(missing.is_empty(), "{missing:?}");

    std::fs::write(&go, b"").unwrap();
    let after = new_uuid("caps-after");
    let _late = Standin::spawn_in(
        work.path(),
        "firecracker",
        &["--uuid", &after, "--config-file", "vmm.json"],
        &[("STANDIN_LINES", "2")],
    );
    for uuid in [&before, &after] {
        wait_for(Duration::from_secs(5), || {
            (collector.logs(uuid, "stream=stdout").len() == 2).then_some(())
        })
        .unwrap_or_else(|| panic!("{uuid}: console not captured:\n{}", collector.stderr()));
        let vcpus = format!("compute_instance_vcpus{{instance_uuid=\"{uuid}\"}}");
        assert_eq!(
            series(&collector, &vcpus),
            Some(3.0),
            "{uuid}: vmm.json read"
        );
    }
    assert_eq!(
        collector.logs(&before, "stream=console").len(),
        3,
        "the console file opened before the collector started (2 lines and the dup)"
    );
}

#[test]
fn hostile_config_files_cost_nothing() {
    let collector = Collector::start(&["--log-format", "json"]);
    let work = tempfile::tempdir().unwrap();
    let fifo = work.path().join("vmm.fifo");
    let status = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(status.success());
    let big = work.path().join("big.json");
    std::fs::write(&big, vec![b' '; (1 << 20) + 1]).unwrap();
    // Settle, then measure.
    std::thread::sleep(Duration::from_millis(500));
    let rss_before = rss_bytes(collector.pid());
    let refused_before = series(
        &collector,
        "collector_discovery_problems_total{reason=\"vmm_config_refused\"}",
    )
    .unwrap();
    let mut hostile = Vec::new();
    for file in [Path::new("/dev/zero"), fifo.as_path(), big.as_path()] {
        let uuid = new_uuid("hostile-config");
        let vmm = Standin::spawn(
            "firecracker",
            &["--uuid", &uuid, "--config-file", file.to_str().unwrap()],
            &[],
        );
        hostile.push((uuid, vmm));
    }
    // A well-formed instance started after them is listed within 1 s.
    let uuid = new_uuid("after-hostile");
    let started = Instant::now();
    let _good = Standin::spawn("firecracker", &["--uuid", &uuid], &[]);
    let listed = wait_for(Duration::from_secs(1), || collector.instance(&uuid));
    assert!(
        listed.is_some(),
        "not listed within 1 s ({:?}):\n{}",
        started.elapsed(),
        collector.stderr()
    );
    // The hostile ones are listed too, without an allocation; each refusal said once.
    for (uuid, vmm) in &hostile {
        assert!(collector.instance(uuid).is_some(), "{uuid} listed");
        let vcpus = format!("compute_instance_vcpus{{instance_uuid=\"{uuid}\"}}");
        assert_eq!(series(&collector, &vcpus), None);
        let lines: Vec<Value> = log_lines(&collector)
            .into_iter()
            .filter(|l| {
                l["message"] == "VMM config file refused; the instance's allocation is unknown"
                    && l["pid"] == vmm.pid()
            })
            .collect();
        assert_eq!(lines.len(), 1, "{uuid}: {lines:?}");
    }
    let refused = series(
        &collector,
        "collector_discovery_problems_total{reason=\"vmm_config_refused\"}",
    )
    .unwrap();
    assert_eq!(refused - refused_before, 3.0);
    assert_eq!(collector.get_status("/healthz"), Some(200));
    let grew = rss_bytes(collector.pid()).saturating_sub(rss_before);
    assert!(grew < 8 << 20, "RSS grew by {grew} bytes");
}

#[test]
fn untrusted_executables_are_not_followed() {
    let collector = Collector::start(&["--log-format", "json"]);
    // A world-writable folder outside the trusted ones; in the trusted stand-in folder, a
    // world-writable copy and one owned by another user.
    let open_dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(open_dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
    let untrusted_folder = open_dir.path().join("firecracker");
    standin_copy(&untrusted_folder, 0o755, None);
    let tag = std::process::id();
    let writable = standin_dir().join(format!("writable-{tag}/firecracker"));
    let foreign = standin_dir().join(format!("foreign-{tag}/firecracker"));
    for path in [&writable, &foreign] {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    }
    standin_copy(&writable, 0o777, None);
    standin_copy(&foreign, 0o755, Some(65534));
    let cases = [
        (&untrusted_folder, "is not in trusted_executable_dirs"),
        (&writable, "is writable by group or others"),
        (&foreign, "is owned by uid 65534, not root"),
    ];
    let mut vmms = Vec::new();
    for (exe, why) in cases {
        let uuid = new_uuid("untrusted");
        let vmm = Standin::spawn_path(
            exe,
            Path::new("/"),
            &["--uuid", &uuid],
            &[("STANDIN_LINES", "3")],
        );
        vmms.push((uuid, vmm, why));
    }
    // A trusted one after them: once it is listed, the others were handled.
    let control = new_uuid("trusted");
    let _trusted = Standin::spawn("firecracker", &["--uuid", &control], &[]);
    wait_for(Duration::from_secs(5), || collector.instance(&control)).expect("trusted listed");
    for (uuid, vmm, why) in &vmms {
        assert!(collector.instance(uuid).is_none(), "{uuid} listed");
        let lines = refusals(&collector, vmm.pid(), "untrusted_executable");
        assert_eq!(lines.len(), 1, "{uuid}: {lines:?}\n{}", collector.stderr());
        let error = lines[0]["error"].as_str().unwrap();
        assert!(error.contains(why), "{error}");
        // Dropped from the kernel: nothing of its output is kept.
        assert_eq!(
            collector.get_status(&format!("/v1/instances/{}/logs", path_segment(uuid))),
            Some(404)
        );
    }
    assert!(
        series(
            &collector,
            "collector_discovery_problems_total{reason=\"untrusted_executable\"}"
        )
        .unwrap()
            >= 3.0
    );
    for path in [&writable, &foreign] {
        let _ = std::fs::remove_dir_all(path.parent().unwrap());
    }
}

#[test]
fn a_second_process_cannot_take_a_running_id() {
    let collector = Collector::start(&["--log-format", "json"]);
    let uuid = new_uuid("dup");
    let first = Standin::spawn("firecracker", &["--uuid", &uuid], &[]);
    wait_for(Duration::from_secs(5), || collector.instance(&uuid)).expect("first listed");
    // The impostor writes lines at once and dies by a signal: neither its lines nor a crash
    // may reach the first one's stream and events.
    let mut impostor = Standin::spawn(
        "firecracker",
        &["--uuid", &uuid],
        &[
            ("STANDIN_LINES", "3"),
            ("STANDIN_RUN_MS", "300"),
            ("STANDIN_CRASH", "abort"),
        ],
    );
    let refused = wait_for(Duration::from_secs(5), || {
        let lines = refusals(&collector, impostor.pid(), "duplicate_instance_id");
        (!lines.is_empty()).then_some(lines)
    })
    .unwrap_or_else(|| panic!("no refusal:\n{}", collector.stderr()));
    assert_eq!(refused.len(), 1);
    impostor.wait();
    // Settle past the impostor's end.
    std::thread::sleep(Duration::from_millis(500));
    let listed: Vec<Value> = collector
        .get_json("/v1/instances")
        .as_array()
        .unwrap()
        .iter()
        .filter(|i| i["instance_uuid"] == uuid.as_str())
        .cloned()
        .collect();
    assert_eq!(listed.len(), 1);
    assert_eq!(listed[0]["pid"], first.pid());
    assert!(
        collector.logs(&uuid, "").is_empty(),
        "the impostor's lines reached the instance"
    );
    let events: Vec<String> = collector
        .events_of(&uuid)
        .unwrap()
        .iter()
        .map(|e| e["event"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(events, ["start"]);
    let info =
        format!("compute_instance_info{{instance_uuid=\"{uuid}\",hypervisor=\"firecracker\"}}");
    assert_eq!(series(&collector, &info), Some(1.0));
    assert!(
        series(
            &collector,
            "collector_discovery_problems_total{reason=\"duplicate_instance_id\"}"
        )
        .unwrap()
            >= 1.0
    );
}

/// The stand-in in a root of its own (`chroot`), with the shared libraries it needs.
fn chroot_with_standin(root: &Path) {
    let exe = standin_path("firecracker");
    std::fs::copy(&exe, root.join("firecracker")).unwrap();
    let ldd = Command::new("ldd").arg(&exe).output().unwrap();
    for lib in String::from_utf8_lossy(&ldd.stdout)
        .split_whitespace()
        .filter(|w| w.starts_with('/'))
    {
        let inside = root.join(lib.trim_start_matches('/'));
        std::fs::create_dir_all(inside.parent().unwrap()).unwrap();
        std::fs::copy(lib, &inside).unwrap();
    }
}

#[test]
fn path_traversal_reaches_nothing_outside() {
    // The VMM runs in a root of its own; outside it, a config file that must never be read.
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    chroot_with_standin(root.path());
    let outside = tempfile::tempdir().unwrap();
    let secret = outside.path().join("outside.json");
    std::fs::write(&secret, r#"{"machine-config": {"vcpu_count": 9}}"#).unwrap();
    std::fs::write(
        root.path().join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 2}}"#,
    )
    .unwrap();
    std::os::unix::fs::symlink(&secret, root.path().join("link.json")).unwrap();
    std::fs::create_dir(root.path().join("sub")).unwrap();
    std::os::unix::fs::symlink(outside.path(), root.path().join("sub/out")).unwrap();
    let config = format!(
        "trusted_executable_dirs = [{:?}, {:?}]\n",
        root.path().display().to_string(),
        standin_dir().display().to_string()
    );
    let config = collector_tests::config_file(&config);
    let collector = Collector::start(&[
        "--config",
        config.path().to_str().unwrap(),
        "--log-format",
        "json",
    ]);
    let chrooted = |uuid: &str, config_file: &str| {
        let mut command = Command::new("chroot");
        command
            .arg(root.path())
            .args(["/firecracker", "--uuid", uuid, "--config-file", config_file])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        Standin {
            child: command.spawn().expect("chroot"),
        }
    };
    let escapes = [
        format!("/../../../..{}", secret.display()),
        "/link.json".to_owned(),
        format!("/sub/out/{}", secret.file_name().unwrap().to_str().unwrap()),
        format!("../../../../../..{}", secret.display()),
    ];
    let mut vmms = Vec::new();
    for file in &escapes {
        let uuid = new_uuid("escape");
        vmms.push((uuid.clone(), chrooted(&uuid, file)));
    }
    let inside = new_uuid("inside");
    let _inside = chrooted(&inside, "/vmm.json");
    wait_for(Duration::from_secs(5), || collector.instance(&inside)).expect("chrooted listed");
    let vcpus = |uuid: &str| {
        series(
            &collector,
            &format!("compute_instance_vcpus{{instance_uuid=\"{uuid}\"}}"),
        )
    };
    wait_for(Duration::from_secs(2), || vcpus(&inside)).expect("read inside its root");
    assert_eq!(vcpus(&inside), Some(2.0));
    for (uuid, _) in &vmms {
        wait_for(Duration::from_secs(5), || collector.instance(uuid)).expect("listed");
        assert_eq!(vcpus(uuid), None, "{uuid}: read outside the VMM's root");
    }

    // An id that would steer the built-in per-instance folder out of it.
    let target = outside.path().join("d");
    std::fs::create_dir(&target).unwrap();
    std::fs::write(
        target.join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 5}}"#,
    )
    .unwrap();
    let id = format!("../../../../../..{}", target.display());
    let before_outside: Vec<PathBuf> = list(outside.path());
    let steer = Standin::spawn("firecracker", &["--uuid", &id], &[("STANDIN_LINES", "2")]);
    let named = format!("unidentified-pid-{}", steer.pid());
    let listed =
        wait_for(Duration::from_secs(5), || collector.instance(&named)).expect("named by pid");
    assert_eq!(listed["instance_dir"], Value::Null);
    wait_for(Duration::from_secs(5), || {
        (collector.logs(&named, "stream=stdout").len() == 2).then_some(())
    })
    .expect("its lines, under the made-up name");
    assert_eq!(vcpus(&named), None);
    let problem = log_lines(&collector)
        .into_iter()
        .any(|l| l["reason"] == "instance_id_unsafe" && l["pid"] == steer.pid());
    assert!(problem, "{}", collector.stderr());
    // Written only inside the log folder, under the made-up name; nothing where the id
    // pointed.
    assert_eq!(list(outside.path()), before_outside);
    let written = list(&collector.log_dir.path().join(&named));
    assert!(
        !written.is_empty(),
        "its console log, under the made-up name"
    );
}

/// Every path under `dir`, sorted.
fn list(dir: &Path) -> Vec<PathBuf> {
    let mut found = Vec::new();
    let mut stack = vec![dir.to_owned()];
    while let Some(d) = stack.pop() {
        let Ok(entries) = std::fs::read_dir(&d) else {
            continue;
        };
        for entry in entries.flatten() {
            let path = entry.path();
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                stack.push(path.clone());
            }
            found.push(path);
        }
    }
    found.sort();
    found
}

fn fd_count(pid: u32) -> usize {
    std::fs::read_dir(format!("/proc/{pid}/fd"))
        .unwrap()
        .count()
}

#[test]
fn idle_connections_cannot_lock_out_the_scraper() {
    const IDLE: usize = 2000;
    // Room for the held connections in this process.
    let limit = libc::rlimit {
        rlim_cur: 8192,
        rlim_max: 8192,
    };
    // SAFETY: setrlimit with a valid struct.
    let raised = unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &raw const limit) };
    assert_eq!(raised, 0);
    let metrics = format!("127.0.0.1:{}", free_port());
    let collector = Collector::start(&["--metrics-listen", &metrics]);
    let fds_before = fd_count(collector.pid());
    let mut held = Vec::with_capacity(IDLE);
    for _ in 0..IDLE {
        let mut stream = TcpStream::connect(&metrics).expect("connect");
        // Half a request line: the connection is taken and idle.
        let _ = stream.write_all(b"GET /met");
        held.push(stream);
    }
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .timeout_global(Some(Duration::from_secs(1)))
        .build()
        .into();
    let started = Instant::now();
    let answer = agent.get(format!("http://{metrics}/metrics")).call();
    assert!(
        answer.is_ok_and(|r| r.status() == 200),
        "no answer within 1 s ({:?})",
        started.elapsed()
    );
    // The default connection limit (512) and the collector's own descriptors. Slack for what
    // the collector opens meanwhile: the other tests of this file start instances beside it,
    // whose console and event files it opens (bounded by their number, not the clients').
    // Connections over the limit are closed as the accept loop gets to them, which on a
    // loaded machine lags the clients' connects: the bound is checked once that settles.
    let bound = fds_before + 512 + 128;
    let mut fds = 0;
    let settled = wait_for(Duration::from_secs(5), || {
        fds = fd_count(collector.pid());
        (fds <= bound).then_some(())
    });
    assert!(
        settled.is_some(),
        "{fds} descriptors 5 s after the connects (before: {fds_before}, bound {bound})"
    );
    let evicted = series(
        &collector,
        "collector_http_connections_closed_total{server=\"metrics_listen\",reason=\"evicted\"}",
    )
    .unwrap();
    assert!(evicted >= (IDLE - 512) as f64, "{evicted}");
    drop(held);
}

#[test]
fn a_client_slow_with_its_headers_is_cut_off() {
    let config = collector_tests::config_file("[http]\nheader_read_timeout_ms = 300\n");
    let collector = Collector::start(&["--config", config.path().to_str().unwrap()]);
    let mut slow = TcpStream::connect(&collector.addr).expect("connect");
    // Headers begun, never finished.
    slow.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
        .unwrap();
    slow.set_read_timeout(Some(Duration::from_secs(10)))
        .unwrap();
    let started = Instant::now();
    let mut buffer = [0u8; 512];
    let read = std::io::Read::read(&mut slow, &mut buffer);
    let waited = started.elapsed();
    // Closed by the collector (no answer to a request it never got), not by our timeout.
    assert!(
        matches!(read, Ok(0))
            || read
                .as_ref()
                .is_err_and(|e| e.kind() == std::io::ErrorKind::ConnectionReset),
        "{read:?}"
    );
    // At the configured timeout, not before.
    assert!(
        waited >= Duration::from_millis(250) && waited < Duration::from_secs(10),
        "{waited:?}"
    );
    // A prompt client is served as before.
    assert_eq!(collector.get_status("/healthz"), Some(200));
}
