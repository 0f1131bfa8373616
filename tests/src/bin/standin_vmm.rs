//! A stand-in hypervisor: a real process that tests copy under a VMM's executable name
//! (`firecracker`, `qemu-system-x86_64`, `cloud-hypervisor`) and start with that VMM's command
//! line. It ignores its arguments; what it does comes from `STANDIN_*` variables:
//!
//! - `STANDIN_VCPUS` (default 2): vCPU threads, named as the VMM names them (from argv[0]:
//!   `fc_vcpu N`, `CPU N/TCG`, `vcpuN`), plus one non-vCPU thread.
//! - `STANDIN_RUN_MS`: exit after this long (default: run until killed).
//! - `STANDIN_EXIT_CODE` (default 0): exit status when it ends by itself.
//! - `STANDIN_THREAD_EXIT`: one extra thread that exits right away (a VMM thread ending is not
//!   an instance ending).
//! - `STANDIN_CRASH` (`segv` or `abort`): when `STANDIN_RUN_MS` is up, die by that signal
//!   instead of exiting.
//! - `STANDIN_CORE_DIR`: work in this folder with no core-size limit, so a crash dumps core there.
//! - `STANDIN_CGROUP`: join this cgroup (its folder) first thing.
//! - `STANDIN_BUSY_MS`: each vCPU thread spins on the CPU for this long, then parks.
//! - `STANDIN_BUSY_CPU`: the vCPU threads are pinned to this CPU (`sched_setaffinity`) first, so
//!   that busy ones wait for each other in one run queue.
//! - `STANDIN_TICK_MS`: each vCPU thread wakes up every this many ms (a lightly loaded guest).
//! - `STANDIN_TOUCH_MIB`: the main thread allocates this much memory and writes every page.

use std::{
    env,
    thread::{self, JoinHandle},
    time::{Duration, Instant},
};

fn var<T: std::str::FromStr>(name: &str) -> Option<T> {
    env::var(name).ok().and_then(|v| v.parse().ok())
}

/// The vCPU thread name the VMM called `argv0` gives vCPU `index`.
fn vcpu_thread_name(argv0: &str, index: u32) -> String {
    let exe = argv0.rsplit('/').next().unwrap_or(argv0);
    if exe.starts_with("qemu-system") {
        format!("CPU {index}/TCG")
    } else if exe.starts_with("cloud-hypervisor") {
        format!("vcpu{index}")
    } else {
        format!("fc_vcpu {index}")
    }
}

fn park_forever() -> ! {
    loop {
        thread::park();
    }
}

/// Crash the way `STANDIN_CRASH` says.
fn crash(how: &str) -> ! {
    let signal = match how {
        "abort" => libc::SIGABRT,
        _ => libc::SIGSEGV,
    };
    // SAFETY: restoring the default action (Rust's runtime handles SIGSEGV for its stack
    // guard) and raising a signal whose default action ends the process.
    unsafe {
        libc::signal(signal, libc::SIG_DFL);
        libc::raise(signal);
    }
    unreachable!("signal {signal} did not end the process");
}

fn setup_process() {
    if let Some(dir) = env::var_os("STANDIN_CORE_DIR") {
        env::set_current_dir(&dir).expect("STANDIN_CORE_DIR");
        let unlimited = libc::rlimit {
            rlim_cur: libc::RLIM_INFINITY,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid rlimit pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &unlimited) };
    } else {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid rlimit pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &none) };
    }
    if let Some(cgroup) = env::var_os("STANDIN_CGROUP") {
        let procs = std::path::Path::new(&cgroup).join("cgroup.procs");
        std::fs::write(&procs, "0").expect("join STANDIN_CGROUP");
    }
}

/// Pins the calling thread to `cpu`.
fn pin_to(cpu: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET stays inside it for cpu < 1024.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
        assert_eq!(rc, 0, "sched_setaffinity to CPU {cpu}");
    }
}

/// What a vCPU thread does: optionally pinned, busy for a while or ticking, then parked.
fn vcpu_thread() -> ! {
    if let Some(cpu) = var::<usize>("STANDIN_BUSY_CPU") {
        pin_to(cpu);
    }
    if let Some(ms) = var::<u64>("STANDIN_BUSY_MS") {
        let until = Instant::now() + Duration::from_millis(ms);
        let mut n = 0u64;
        while Instant::now() < until {
            n = std::hint::black_box(n.wrapping_add(1));
        }
    }
    if let Some(ms) = var::<u64>("STANDIN_TICK_MS") {
        loop {
            thread::sleep(Duration::from_millis(ms));
        }
    }
    park_forever()
}

/// Allocates `mib` MiB and writes every page so that it is resident.
fn touch_memory(mib: usize) -> Vec<u8> {
    let mut memory = vec![0u8; mib << 20];
    for page in memory.chunks_mut(4096) {
        page[0] = 1;
    }
    std::hint::black_box(memory)
}

fn main() {
    setup_process();
    let argv0 = env::args().next().unwrap_or_default();
    let vcpus: u32 = var("STANDIN_VCPUS").unwrap_or(2);
    let mut threads: Vec<JoinHandle<()>> = Vec::new();
    for index in 0..vcpus {
        let name = vcpu_thread_name(&argv0, index);
        threads.push(
            thread::Builder::new()
                .name(name)
                .spawn(|| vcpu_thread())
                .expect("spawn vcpu thread"),
        );
    }
    threads.push(
        thread::Builder::new()
            .name("vmm-io".into())
            .spawn(|| park_forever())
            .expect("spawn"),
    );
    if env::var_os("STANDIN_THREAD_EXIT").is_some() {
        thread::Builder::new()
            .name("short".into())
            .spawn(|| {})
            .expect("spawn")
            .join()
            .ok();
    }
    let _memory = var::<usize>("STANDIN_TOUCH_MIB").map(touch_memory);
    match var::<u64>("STANDIN_RUN_MS") {
        Some(ms) => {
            thread::sleep(Duration::from_millis(ms));
            if let Ok(how) = env::var("STANDIN_CRASH") {
                crash(&how);
            }
            std::process::exit(var("STANDIN_EXIT_CODE").unwrap_or(0));
        }
        None => park_forever(),
    }
}
