//! Scheduling and memory of instances against the kernel's own books: the run-queue wait and run
//! time in `/proc/PID/task/TID/schedstat`, the context-switch counts and `VmRSS` in
//! `/proc/PID/status`. Real collector, real kernel, stand-in VMMs that really run.

use std::time::{Duration, Instant};

use collector_tests::{Collector, Standin, new_uuid, sample, wait_for};

/// The tolerance the issue sets for the kernel-side figures.
const WITHIN: f64 = 0.02;

fn wait_listed(collector: &Collector, uuid: &str) {
    wait_for(Duration::from_secs(2), || collector.instance(uuid))
        .unwrap_or_else(|| panic!("{uuid} not listed:\n{}", collector.stderr()));
}

/// `(tid, name)` of the threads of `pid`.
fn threads(pid: u32) -> Vec<(u32, String)> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let tid: u32 = entry.file_name().to_str().unwrap().parse().unwrap();
        let name = std::fs::read_to_string(entry.path().join("comm")).unwrap_or_default();
        out.push((tid, name.trim_end().to_owned()));
    }
    out
}

fn vcpu_tids(pid: u32) -> Vec<u32> {
    threads(pid)
        .into_iter()
        .filter(|(_, name)| name.starts_with("fc_vcpu"))
        .map(|(tid, _)| tid)
        .collect()
}

/// `(run ns, wait ns)` from `/proc/PID/task/TID/schedstat`.
fn schedstat(pid: u32, tid: u32) -> (u64, u64) {
    let text = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/schedstat")).unwrap();
    let mut fields = text.split_whitespace().map(|f| f.parse::<u64>().unwrap());
    (fields.next().unwrap(), fields.next().unwrap())
}

/// A field of `/proc/PID[/task/TID]/status`, as a number (the unit dropped).
fn status_field(path: &str, field: &str) -> u64 {
    let status = std::fs::read_to_string(format!("{path}/status")).unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
        .unwrap_or_else(|| panic!("no {field} in {path}/status"))
}

/// One-letter state of a thread (`R`, `S`, ...), from its stat line.
fn thread_state(pid: u32, tid: u32) -> char {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/task/{tid}/stat")).unwrap();
    let after = &stat[stat.rfind(')').unwrap() + 2..];
    after.chars().next().unwrap()
}

fn relative_error(ours: f64, theirs: f64) -> f64 {
    (ours - theirs).abs() / theirs
}

fn series(name: &str, uuid: &str, label: &str, value: &str) -> String {
    format!("{name}{{instance_uuid=\"{uuid}\",{label}=\"{value}\"}}")
}

/// Four busy vCPU threads share one CPU for 3 s: the wait the histogram sums and the CPU time
/// the counter shows match what the kernel accounted for the same threads.
#[test]
fn busy_vcpus_match_the_kernels_schedstat() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("busy");
    let cpu =
        (std::thread::available_parallelism().map_or(1, std::num::NonZero::get) - 1).to_string();
    let busy_ms = 3000;
    let started = Instant::now();
    let vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[
            ("STANDIN_VCPUS", "4"),
            ("STANDIN_BUSY_MS", &busy_ms.to_string()),
            ("STANDIN_BUSY_CPU", &cpu),
        ],
    );
    let pid = vmm.pid();
    wait_listed(&collector, &uuid);
    // The spinning is over once every vCPU thread sleeps (parked).
    std::thread::sleep(Duration::from_millis(busy_ms));
    let tids = wait_for(Duration::from_secs(30), || {
        let tids = vcpu_tids(pid);
        (tids.len() == 4 && tids.iter().all(|t| thread_state(pid, *t) == 'S')).then_some(tids)
    })
    .expect("vCPU threads never went to sleep");
    let elapsed = started.elapsed();

    let (run_ns, wait_ns) = tids
        .iter()
        .map(|t| schedstat(pid, *t))
        .fold((0, 0), |(r, w), (r2, w2)| (r + r2, w + w2));
    let metrics = collector.get_text("/metrics");
    let hist = "compute_instance_runqueue_latency_seconds";
    let wait_sum = sample(
        &metrics,
        &series(&format!("{hist}_sum"), &uuid, "thread", "vcpu"),
    )
    .unwrap_or_else(|| panic!("no vcpu latency sum:\n{metrics}"));
    let wait_count = sample(
        &metrics,
        &series(&format!("{hist}_count"), &uuid, "thread", "vcpu"),
    )
    .unwrap();
    let cpu_seconds = sample(
        &metrics,
        &series(
            "compute_instance_cpu_seconds_total",
            &uuid,
            "thread",
            "vcpu",
        ),
    )
    .unwrap();
    let kernel_wait = wait_ns as f64 / 1e9;
    let kernel_run = run_ns as f64 / 1e9;
    let wait_error = relative_error(wait_sum, kernel_wait);
    let run_error = relative_error(cpu_seconds, kernel_run);
    eprintln!(
        "busy vCPUs ({elapsed:.1?}): wait sum {wait_sum:.6} s over {wait_count} samples vs \
         schedstat {kernel_wait:.6} s ({:.3}%); cpu {cpu_seconds:.6} s vs schedstat \
         {kernel_run:.6} s ({:.3}%)",
        wait_error * 100.0,
        run_error * 100.0
    );
    // Four threads on one CPU for 3 s: most of the time each one waits (the CPU is shared
    // with whatever else runs on the machine, so only a floor).
    assert!(
        kernel_wait > 1.0 && kernel_run > 0.5,
        "the load did not happen: {kernel_wait} s wait, {kernel_run} s run"
    );
    assert!(wait_error <= WITHIN, "run-queue wait off by {wait_error}");
    assert!(run_error <= WITHIN, "CPU time off by {run_error}");

    // Context switches of the whole process against the kernel's per-thread counts.
    let (mut voluntary, mut involuntary) = (0, 0);
    for (tid, _) in threads(pid) {
        let path = format!("/proc/{pid}/task/{tid}");
        voluntary += status_field(&path, "voluntary_ctxt_switches");
        involuntary += status_field(&path, "nonvoluntary_ctxt_switches");
    }
    let switches = |kind| {
        sample(
            &metrics,
            &series(
                "compute_instance_context_switches_total",
                &uuid,
                "kind",
                kind,
            ),
        )
        .unwrap()
    };
    let (our_vol, our_invol) = (switches("voluntary"), switches("involuntary"));
    eprintln!(
        "context switches: voluntary {our_vol} vs {voluntary}, involuntary {our_invol} vs \
         {involuntary}"
    );
    // The kernel's counts include the few switches between fork and exec, which the collector
    // cannot see (it follows the process from its exec).
    for (ours, kernel) in [(our_vol, voluntary), (our_invol, involuntary)] {
        let kernel = kernel as f64;
        assert!(
            (ours - kernel).abs() <= kernel * WITHIN + 10.0,
            "context switches: {ours} vs kernel {kernel}"
        );
    }
    assert!(
        our_invol > 100.0,
        "busy threads sharing a CPU are preempted"
    );
}

/// An idle instance: its vCPU threads sleep, so no run-queue samples beyond the wake-ups of
/// their start, and none while it stays idle.
#[test]
fn idle_instance_has_only_its_start_up_samples() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("idle");
    let vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[("STANDIN_VCPUS", "2")],
    );
    wait_listed(&collector, &uuid);
    let pid = vmm.pid();
    let count = |collector: &Collector| {
        let metrics = collector.get_text("/metrics");
        sample(
            &metrics,
            &series(
                "compute_instance_runqueue_latency_seconds_count",
                &uuid,
                "thread",
                "vcpu",
            ),
        )
        .unwrap_or_else(|| panic!("no vcpu latency count:\n{metrics}"))
    };
    std::thread::sleep(Duration::from_millis(300));
    let before = count(&collector);
    std::thread::sleep(Duration::from_secs(1));
    let after = count(&collector);
    // Each run-queue wait of a vCPU thread on its way to parking starts with its creation, a
    // wake-up after it slept (a voluntary switch: the handshakes of thread start-up, or a lock
    // it waited for on a loaded or emulated machine) or a preemption: the kernel's own counts
    // of those bound the samples.
    let tids = vcpu_tids(pid);
    let switches = |field: &str| -> u64 {
        tids.iter()
            .map(|tid| status_field(&format!("/proc/{pid}/task/{tid}"), field))
            .sum()
    };
    let (voluntary, preempted) = (
        switches("voluntary_ctxt_switches"),
        switches("nonvoluntary_ctxt_switches"),
    );
    let bound = tids.len() as u64 + voluntary + preempted;
    eprintln!(
        "idle instance: {before} vCPU run-queue samples ({voluntary} voluntary switches, \
         {preempted} preemptions), {after} one second later"
    );
    assert_eq!(tids.len(), 2, "vCPU threads");
    assert!(
        before <= bound as f64,
        "2 parked vCPU threads, {voluntary} voluntary switches, preempted {preempted} times: \
         {before} samples"
    );
    assert_eq!(after, before, "samples while idle");
}

/// The threads of an instance already running when the collector starts are entered in the
/// kernel's thread map by userspace (the start-up scan), not by the kernel programs: they are
/// measured all the same, which needs userspace to count them in the thread filter too.
#[test]
fn threads_found_running_are_measured() {
    let uuid = new_uuid("early");
    let _vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[("STANDIN_VCPUS", "2"), ("STANDIN_TICK_MS", "10")],
    );
    // Started and its vCPU threads named before the collector looks.
    std::thread::sleep(Duration::from_millis(200));
    let collector = Collector::start(&[]);
    wait_listed(&collector, &uuid);
    let waits = |metrics: &str| {
        sample(
            metrics,
            &series(
                "compute_instance_runqueue_latency_seconds_count",
                &uuid,
                "thread",
                "vcpu",
            ),
        )
        .unwrap_or(0.0)
    };
    let before = waits(&collector.get_text("/metrics"));
    std::thread::sleep(Duration::from_secs(1));
    let metrics = collector.get_text("/metrics");
    let after = waits(&metrics);
    eprintln!(
        "instance found running: {} vCPU waits in 1 s",
        after - before
    );
    // Two vCPU threads waking every 10 ms: about 200 waits.
    assert!(
        after - before >= 50.0,
        "{before} -> {after} waits:\n{metrics}"
    );
    // Once no thread is being added, the filter's counts add up to the thread map's entries.
    let entries = |metrics: &str, map: &str| {
        sample(
            metrics,
            &format!("collector_ebpf_map_entries{{map=\"{map}\"}}"),
        )
        .unwrap()
    };
    wait_for(Duration::from_secs(5), || {
        let metrics = collector.get_text("/metrics");
        ((entries(&metrics, "sched_thread_filter") - entries(&metrics, "sched_threads")).abs()
            < 0.5)
            .then_some(())
    })
    .unwrap_or_else(|| {
        panic!(
            "filter and thread map disagree:\n{}",
            collector.get_text("/metrics")
        )
    });
}

/// Resident memory is the VMM's VmRSS.
#[test]
fn resident_memory_is_the_vmms_rss() {
    let collector = Collector::start(&[]);
    let uuid = new_uuid("rss");
    let vmm = Standin::spawn(
        "firecracker",
        &["--no-api", "--uuid", &uuid],
        &[("STANDIN_TOUCH_MIB", "64")],
    );
    let path = format!("/proc/{}", vmm.pid());
    wait_for(Duration::from_secs(5), || {
        (status_field(&path, "VmRSS") > 64 * 1024).then_some(())
    })
    .expect("stand-in never touched its memory");
    wait_listed(&collector, &uuid);
    let metrics = collector.get_text("/metrics");
    let vm_rss = status_field(&path, "VmRSS") as f64 * 1024.0;
    let rss = sample(
        &metrics,
        &format!("compute_instance_memory_rss_bytes{{instance_uuid=\"{uuid}\"}}"),
    )
    .unwrap_or_else(|| panic!("no rss series:\n{metrics}"));
    let error = relative_error(rss, vm_rss);
    eprintln!("rss {rss} vs VmRSS {vm_rss} ({:.3}%)", error * 100.0);
    assert!(error <= 0.05, "rss off by {error}");
}

/// vCPUs and memory from each VMM's configuration; nothing when the configuration is absent.
#[test]
fn allocation_from_the_vmm_configuration() {
    let collector = Collector::start(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("vmm.json"),
        r#"{"machine-config": {"vcpu_count": 2, "mem_size_mib": 256}}"#,
    )
    .unwrap();
    let fc = new_uuid("alloc-fc");
    let qemu = new_uuid("alloc-qemu");
    let ch = new_uuid("alloc-ch");
    let bare = new_uuid("alloc-bare");
    let ch_socket = format!("/run/vc/vm/{ch}/clh-api.sock");
    let _vmms = [
        // ukp's command line: the config file relative to the VMM's working directory.
        Standin::spawn_in(
            dir.path(),
            "firecracker",
            &["--no-api", "--uuid", &fc, "--config-file", "vmm.json"],
            &[],
        ),
        Standin::spawn(
            "qemu-system-x86_64",
            &[
                "-uuid",
                &qemu,
                "-m",
                "size=2G,slots=2,maxmem=8G",
                "-smp",
                "4",
            ],
            &[],
        ),
        Standin::spawn(
            "cloud-hypervisor",
            &[
                "--api-socket",
                &ch_socket,
                "--cpus",
                "boot=3,max=8",
                "--memory",
                "size=512M",
            ],
            &[],
        ),
        Standin::spawn("firecracker", &["--no-api", "--uuid", &bare], &[]),
    ];
    for uuid in [&fc, &qemu, &ch, &bare] {
        wait_listed(&collector, uuid);
    }
    let metrics = collector.get_text("/metrics");
    let get =
        |name: &str, uuid: &str| sample(&metrics, &format!("{name}{{instance_uuid=\"{uuid}\"}}"));
    let vcpus = "compute_instance_vcpus";
    let memory = "compute_instance_memory_allocated_bytes";
    assert_eq!(get(vcpus, &fc), Some(2.0), "{metrics}");
    assert_eq!(get(memory, &fc), Some(256.0 * 1_048_576.0));
    assert_eq!(get(vcpus, &qemu), Some(4.0));
    assert_eq!(get(memory, &qemu), Some(2048.0 * 1_048_576.0));
    assert_eq!(get(vcpus, &ch), Some(3.0));
    assert_eq!(get(memory, &ch), Some(512.0 * 1_048_576.0));
    assert_eq!(get(vcpus, &bare), None);
    assert_eq!(get(memory, &bare), None);
}

/// Every scheduling program is attached and, with `kernel.program_stats = "on"`, its BPF
/// statistics count, and the time they were on is served beside them.
#[test]
fn program_statistics_are_served() {
    let collector = Collector::start_with_config("[kernel]\nprogram_stats = \"on\"\n");
    let uuid = new_uuid("stats");
    let _vmm = Standin::spawn("firecracker", &["--no-api", "--uuid", &uuid], &[]);
    wait_listed(&collector, &uuid);
    let metrics = collector.get_text("/metrics");
    for program in [
        "sched_switch",
        "sched_wakeup",
        "sched_wakeup_new",
        "task_rename",
        "sched_process_exec",
    ] {
        assert!(
            metrics.contains(&format!(
                "collector_probe_attached{{probe=\"{program}\"}} 1"
            )),
            "{program} not attached:\n{metrics}"
        );
        let runs = sample(
            &metrics,
            &format!("collector_ebpf_program_runs_total{{program=\"{program}\"}}"),
        )
        .unwrap_or_else(|| panic!("no run count for {program}:\n{metrics}"));
        let seconds = sample(
            &metrics,
            &format!("collector_ebpf_program_run_seconds_total{{program=\"{program}\"}}"),
        )
        .unwrap();
        assert!(
            runs >= 1.0 && seconds > 0.0,
            "{program}: {runs} runs, {seconds} s"
        );
    }
    let held = sample(&metrics, "collector_ebpf_program_stats_seconds_total").unwrap();
    assert!(held > 0.0, "statistics on, yet held for {held} s");
    assert_eq!(
        sample(
            &metrics,
            "collector_ebpf_program_stats_enabled{by=\"collector\"}"
        ),
        Some(1.0)
    );
}

/// By default the collector never turns the kernel's BPF statistics on (they cost every BPF
/// program on the host); sampled, it holds them for its windows only, and counts that time.
/// (Other collectors on a shared host may hold descriptors of their own, so the kernel's
/// counters are not asserted still; the sysctl is what this collector would count.)
#[test]
fn program_statistics_are_off_by_default_and_sampled_on_request() {
    let off = Collector::start(&[]);
    std::thread::sleep(Duration::from_secs(2));
    let metrics = off.get_text("/metrics");
    assert_eq!(
        sample(
            &metrics,
            "collector_ebpf_program_stats_enabled{by=\"collector\"}"
        ),
        Some(0.0)
    );
    if sample(
        &metrics,
        "collector_ebpf_program_stats_enabled{by=\"sysctl\"}",
    ) == Some(0.0)
    {
        assert_eq!(
            sample(&metrics, "collector_ebpf_program_stats_seconds_total"),
            Some(0.0)
        );
    }

    let sampled = Collector::start_with_config(
        "[kernel]\nprogram_stats = \"sampled\"\nprogram_stats_sample_seconds = 1\n\
         program_stats_every_seconds = 3\n",
    );
    let held = || {
        sample(
            &sampled.get_text("/metrics"),
            "collector_ebpf_program_stats_seconds_total",
        )
        .unwrap()
    };
    // A 9 s span holds three 1-second windows of a 3 s period (counted once a second: give
    // or take one at the span's ends); always on would count 9.
    let before = held();
    std::thread::sleep(Duration::from_secs(9));
    let during = held() - before;
    assert!(
        (2.0..=4.0).contains(&during),
        "sampled 1 s in every 3 s, yet counted {during} s of 9 s"
    );
}
