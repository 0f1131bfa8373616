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
//! - `STANDIN_ALLOC_MB`: then allocate and touch this many MiB, one page at a time.

use std::{
    env,
    thread::{self, JoinHandle},
    time::Duration,
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
    if let Some(mb) = var::<usize>("STANDIN_ALLOC_MB") {
        let mut pages: Vec<Vec<u8>> = Vec::new();
        for _ in 0..mb * 256 {
            pages.push(vec![1u8; 4096]);
        }
        std::mem::forget(pages);
    }
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
                .spawn(|| park_forever())
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
