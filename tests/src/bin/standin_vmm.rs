//! A stand-in hypervisor: a real process that tests copy under a VMM's executable name
//! (`firecracker`, `qemu-system-x86_64`, `cloud-hypervisor`) and start with that VMM's command
//! line. It ignores its arguments; what it does comes from `STANDIN_*` variables:
//!
//! - `STANDIN_VCPUS` (default 2): vCPU threads, named as the VMM names them (from argv[0]:
//!   `fc_vcpu N`, `CPU N/TCG`, `vcpuN`), plus one non-vCPU thread.
//! - `STANDIN_RUN_MS`: exit after this long (default: run until killed), stretched by
//!   `COLLECTOR_TEST_TIME_SCALE` like the harness's timeouts (a slow guest still sees the VMM
//!   run before it ends).
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
//! - `STANDIN_TOUCH_FIRST`: ... before anything else (an OOM kill right after the exec).
//! - `STANDIN_EXIT_WHEN=PATH`: exit (with `STANDIN_EXIT_CODE`) once PATH exists (many stand-ins
//!   ending together).
//! - `STANDIN_MORE_WHEN=PATH`: once PATH exists, write `stdout more I` and `stderr more I`
//!   (I = 1..=N, N from `STANDIN_LINES`) as the first lines were written, then create
//!   `PATH.done`.
//!
//! Console output, written first thing after exec (before any thread), one `write` per line
//! unless said otherwise, through raw syscalls so the test controls each one:
//!
//! - `STANDIN_LINES=N`: `stdout line I` to fd 1 and `stderr line I` to fd 2, I = 1..=N.
//! - `STANDIN_CONSOLE_FILE=PATH`: creates PATH and writes `console line I` (I = 1..=N, N from
//!   `STANDIN_LINES`, default 10) right after the open, cycling through `write`, `pwrite64`
//!   and a two-piece `writev`; then `console via dup` through a `dup` of it.
//! - `STANDIN_OTHER_FILE=PATH`: writes `secret line I` to PATH, a file that is not a console;
//!   then `dup2`s it onto fd 1 and writes `secret via stdout` (fd 1 is no longer stdout).
//! - `STANDIN_DELAY_MS`: opens the files, then waits this long before writing.
//! - `STANDIN_WAIT_FOR=PATH`: opens the files, then waits until PATH exists before writing.
//! - `STANDIN_TAIL=TEXT`: written last to stdout, as is (no newline added).
//! - `STANDIN_TRICKY`: to stdout, in this order: `par`+`tial-`+`line\n` in three writes,
//!   `crlf\r\n`, `cr1\rcr2\n`, invalid UTF-8 `bad \xff\xfe end\n`, `nul\0byte\n`, a
//!   1 MiB line of `x` in 4 KiB writes then `\n`, a single 1 MiB write of `y` without newline
//!   (cut by the kernel after 64 KiB), `after-big\n`.
//! - `STANDIN_BENCH_BYTES=N`: writes N bytes to stdout in 4 KiB writes of whole numbered lines
//!   of `STANDIN_BENCH_LINE` bytes (default 256), at most `STANDIN_BENCH_RATE` lines a second
//!   when set (each line then carries its send time), then writes `lines seconds cpu_seconds`
//!   to `STANDIN_BENCH_REPORT` (CPU: user + system time of the process, which includes the
//!   kernel programs that run in its syscalls).
//! - `STANDIN_WRITE_COST=N`: N writes of one 4 KiB buffer of 16 whole 256-byte lines to stdout,
//!   in bursts of `STANDIN_WRITE_BURST` (default 32) every `STANDIN_WRITE_PAUSE_MS` (default
//!   150: 0.83 MiB/s, inside the default console budget, so every write is captured), then
//!   `writes cpu_ns` to `STANDIN_WRITE_COST_REPORT`: this thread's CPU time inside the bursts
//!   only (`CLOCK_THREAD_CPUTIME_ID`: the writes and the kernel programs they run, not the
//!   pauses and no formatting). `STANDIN_WRITE_SIZE` (default 4096) makes each write that
//!   many bytes of the buffer instead.
//! - `STANDIN_FLOOD_MS=N`: for N ms, writes 4 KiB writes of `\0\n` pairs (2048 lines each) to
//!   stdout at full speed, then the bytes written to `STANDIN_FLOOD_REPORT`.
//! - `STANDIN_QUIET_LINES=N`: writes `quiet line I` (I = 1..=N) to stdout, one every
//!   `STANDIN_QUIET_MS` (default 10) ms.
//! - `STANDIN_BLOCKED_FIFO=PATH` (a console file name): makes PATH a FIFO, fills it with 64-byte
//!   `fill` lines, then starts `STANDIN_BLOCKED_WRITERS` threads that each write one 18-byte
//!   `blocked line IIII` to it and block there; after `STANDIN_BLOCKED_MS` (default 1000) it
//!   drains the FIFO until every writer is done, and writes `fill_lines writers` to
//!   `STANDIN_BLOCKED_REPORT`.
//! - `STANDIN_REOPEN=N` (with `STANDIN_CONSOLE_FILE`): opens the console file N more times
//!   first (a process hoarding console descriptors), then writes as above through the first.

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
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &raw const unlimited) };
    } else {
        let none = libc::rlimit {
            rlim_cur: 0,
            rlim_max: libc::RLIM_INFINITY,
        };
        // SAFETY: valid rlimit pointer.
        unsafe { libc::setrlimit(libc::RLIMIT_CORE, &raw const none) };
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
        let rc = libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &raw const set);
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

/// One `write` of all of `bytes` (retrying what a partial write left).
fn write_fd(fd: i32, mut bytes: &[u8]) {
    while !bytes.is_empty() {
        // SAFETY: valid buffer of that length.
        let n = unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) };
        if n <= 0 {
            return;
        }
        bytes = &bytes[n as usize..];
    }
}

fn open_file(path: &str) -> i32 {
    let c = std::ffi::CString::new(path).expect("path");
    // SAFETY: valid C string.
    let fd = unsafe {
        libc::open(
            c.as_ptr(),
            libc::O_WRONLY | libc::O_CREAT | libc::O_TRUNC | libc::O_CLOEXEC,
            0o644,
        )
    };
    assert!(fd >= 0, "open {path}");
    fd
}

/// `console line I` through write, pwrite64 and writev in turn.
fn write_console(fd: i32, lines: u32) {
    let mut offset = 0i64;
    for i in 1..=lines {
        let line = format!("console line {i}\n");
        let bytes = line.as_bytes();
        // SAFETY (all three): valid buffers of the given lengths.
        let n = match i % 3 {
            // SAFETY: `bytes` outlives the call and its length is passed with it.
            0 => unsafe { libc::write(fd, bytes.as_ptr().cast(), bytes.len()) },
            // SAFETY: as above.
            1 => unsafe { libc::pwrite(fd, bytes.as_ptr().cast(), bytes.len(), offset) },
            _ => {
                let (a, b) = bytes.split_at(5);
                let iov = [
                    libc::iovec {
                        iov_base: a.as_ptr() as *mut _,
                        iov_len: a.len(),
                    },
                    libc::iovec {
                        iov_base: b.as_ptr() as *mut _,
                        iov_len: b.len(),
                    },
                ];
                // SAFETY: both iovecs point into live buffers of their stated lengths.
                unsafe { libc::writev(fd, iov.as_ptr(), 2) }
            }
        };
        assert_eq!(n as usize, bytes.len());
        offset += n as i64;
        // pwrite does not move the offset: keep write and writev after it.
        // SAFETY: plain syscall.
        unsafe { libc::lseek(fd, offset, libc::SEEK_SET) };
    }
    // SAFETY: plain syscall.
    let dup = unsafe { libc::dup(fd) };
    write_fd(dup, b"console via dup\n");
}

fn tricky_stdout() {
    for piece in [&b"par"[..], b"tial-", b"line\n"] {
        write_fd(1, piece);
    }
    for text in [
        &b"crlf\r\n"[..],
        b"cr1\rcr2\n",
        b"bad \xff\xfe end\n",
        b"nul\0byte\n",
    ] {
        write_fd(1, text);
    }
    let block = [b'x'; 4096];
    for _ in 0..256 {
        write_fd(1, &block);
    }
    write_fd(1, b"\n");
    write_fd(1, &vec![b'y'; 1 << 20]);
    write_fd(1, b"after-big\n");
}

/// Numbered lines of `line_len` bytes, 4 KiB per write, optionally paced; returns the count.
fn bench(total: u64, line_len: usize, rate: Option<u64>) -> u64 {
    let per_write = (4096 / line_len).max(1);
    let mut buf = Vec::with_capacity(4096);
    let mut lines = 0u64;
    let start = Instant::now();
    while lines * (line_len as u64) < total {
        buf.clear();
        for _ in 0..per_write {
            lines += 1;
            let head = if rate.is_some() {
                let sent = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default()
                    .as_nanos();
                format!("bench {lines} sent {sent} ")
            } else {
                format!("bench {lines} ")
            };
            buf.extend_from_slice(head.as_bytes());
            buf.resize(buf.len() + line_len - head.len() - 1, b'.');
            buf.push(b'\n');
        }
        write_fd(1, &buf);
        if let Some(rate) = rate {
            let due = Duration::from_secs_f64(lines as f64 / rate as f64);
            if let Some(wait) = due.checked_sub(start.elapsed()) {
                thread::sleep(wait);
            }
        }
    }
    lines
}

/// `\0\n` pairs at full speed for `ms`; returns the bytes written.
fn flood(ms: u64) -> u64 {
    let block = b"\0\n".repeat(2048);
    let until = Instant::now() + Duration::from_millis(ms);
    let mut written = 0u64;
    while Instant::now() < until {
        write_fd(1, &block);
        written += block.len() as u64;
    }
    written
}

fn quiet(lines: u32, every: Duration) {
    for i in 1..=lines {
        write_fd(1, format!("quiet line {i}\n").as_bytes());
        thread::sleep(every);
    }
}

fn set_nonblocking(fd: i32, on: bool) {
    // SAFETY: plain fcntl calls on a descriptor we own.
    unsafe {
        let flags = libc::fcntl(fd, libc::F_GETFL);
        let flags = if on {
            flags | libc::O_NONBLOCK
        } else {
            flags & !libc::O_NONBLOCK
        };
        libc::fcntl(fd, libc::F_SETFL, flags);
    }
}

/// Writers blocked in writes to a full FIFO at once; returns the fill lines written.
fn blocked_writers(path: &str, writers: u32, hold: Duration) -> u32 {
    let c = std::ffi::CString::new(path).expect("path");
    // SAFETY: valid C string; the descriptors are ours.
    let (fd, rd) = unsafe {
        assert_eq!(libc::mkfifo(c.as_ptr(), 0o600), 0, "mkfifo {path}");
        let fd = libc::open(c.as_ptr(), libc::O_RDWR);
        let rd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK);
        assert!(fd >= 0 && rd >= 0, "open {path}");
        (fd, rd)
    };
    set_nonblocking(fd, true);
    let mut fill = 0u32;
    loop {
        let line = format!("fill {:058}\n", fill + 1);
        // SAFETY: valid buffer of that length.
        let n = unsafe { libc::write(fd, line.as_ptr().cast(), line.len()) };
        if n < 0 {
            break;
        }
        assert_eq!(n as usize, line.len(), "pipe writes of 64 bytes are atomic");
        fill += 1;
    }
    set_nonblocking(fd, false);
    let handles: Vec<_> = (1..=writers)
        .map(|i| thread::spawn(move || write_fd(fd, format!("blocked line {i:04}\n").as_bytes())))
        .collect();
    thread::sleep(hold);
    let mut buf = vec![0u8; 65536];
    while !handles.iter().all(JoinHandle::is_finished) {
        // SAFETY: valid buffer.
        let n = unsafe { libc::read(rd, buf.as_mut_ptr().cast(), buf.len()) };
        if n <= 0 {
            thread::sleep(Duration::from_millis(5));
        }
    }
    for handle in handles {
        let _ = handle.join();
    }
    fill
}

/// `STANDIN_WRITE_COST`: the CPU time (ns) this thread spent in `writes` 4 KiB writes to
/// stdout, made `burst` at a time with `pause` between bursts.
fn write_cost(writes: u32, burst: u32, pause: Duration) -> u64 {
    let mut block = Vec::with_capacity(4096);
    for i in 0..16 {
        let mut line = format!("write-cost line {i:02} ").into_bytes();
        line.resize(255, b'w');
        line.push(b'\n');
        block.extend_from_slice(&line);
    }
    let size: usize = var("STANDIN_WRITE_SIZE").unwrap_or(4096).clamp(1, 4096);
    let mut spent = 0u64;
    let mut left = writes;
    while left > 0 {
        let n = left.min(burst.max(1));
        let started = thread_cpu_ns();
        for _ in 0..n {
            // SAFETY: writing a live buffer to our stdout.
            let wrote = unsafe { libc::write(1, block.as_ptr().cast(), size) };
            assert_eq!(wrote, size as isize, "write to stdout");
        }
        spent += thread_cpu_ns() - started;
        left -= n;
        if left > 0 {
            thread::sleep(pause);
        }
    }
    spent
}

/// CPU time of the calling thread, ns.
fn thread_cpu_ns() -> u64 {
    // SAFETY: zeroed timespec is a valid out-parameter.
    let mut now: libc::timespec = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer; the clock exists on every Linux.
    unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &raw mut now) };
    now.tv_sec as u64 * 1_000_000_000 + now.tv_nsec as u64
}

/// User + system CPU time of this process so far.
fn cpu_seconds() -> f64 {
    // SAFETY: zeroed rusage is a valid out-parameter.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: valid pointer.
    unsafe { libc::getrusage(libc::RUSAGE_SELF, &raw mut usage) };
    let secs = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
    secs(usage.ru_utime) + secs(usage.ru_stime)
}

fn console_output() {
    let lines: u32 = var("STANDIN_LINES").unwrap_or(0);
    let console = env::var("STANDIN_CONSOLE_FILE").ok().map(|p| open_file(&p));
    if let (Ok(path), Some(n)) = (
        env::var("STANDIN_CONSOLE_FILE"),
        var::<u32>("STANDIN_REOPEN"),
    ) {
        let c = std::ffi::CString::new(path).expect("path");
        for _ in 0..n {
            // SAFETY: valid C string; the descriptors stay open for the process's life.
            let fd = unsafe { libc::open(c.as_ptr(), libc::O_WRONLY | libc::O_APPEND) };
            assert!(fd >= 0, "reopen the console file");
        }
    }
    let other = env::var("STANDIN_OTHER_FILE").ok().map(|p| open_file(&p));
    if let Some(ms) = var::<u64>("STANDIN_DELAY_MS") {
        thread::sleep(Duration::from_millis(ms));
    }
    if let Ok(path) = env::var("STANDIN_WAIT_FOR") {
        while !std::path::Path::new(&path).exists() {
            thread::sleep(Duration::from_millis(10));
        }
    }
    for i in 1..=lines {
        write_fd(1, format!("stdout line {i}\n").as_bytes());
        write_fd(2, format!("stderr line {i}\n").as_bytes());
    }
    if let Some(fd) = console {
        write_console(fd, if lines > 0 { lines } else { 10 });
    }
    if env::var_os("STANDIN_TRICKY").is_some() {
        tricky_stdout();
    }
    if let Some(fd) = other {
        for i in 1..=lines.max(3) {
            write_fd(fd, format!("secret line {i}\n").as_bytes());
        }
        // SAFETY: plain syscall.
        unsafe { libc::dup2(fd, 1) };
        write_fd(1, b"secret via stdout\n");
    }
    if let Ok(tail) = env::var("STANDIN_TAIL") {
        write_fd(1, tail.as_bytes());
    }
    if let Some(ms) = var::<u64>("STANDIN_FLOOD_MS") {
        let written = flood(ms);
        if let Ok(report) = env::var("STANDIN_FLOOD_REPORT") {
            let _ = std::fs::write(report, format!("{written}\n"));
        }
    }
    if let Some(lines) = var::<u32>("STANDIN_QUIET_LINES") {
        quiet(
            lines,
            Duration::from_millis(var("STANDIN_QUIET_MS").unwrap_or(10)),
        );
    }
    if let Ok(path) = env::var("STANDIN_BLOCKED_FIFO") {
        let writers = var("STANDIN_BLOCKED_WRITERS").unwrap_or(64);
        let hold = Duration::from_millis(var("STANDIN_BLOCKED_MS").unwrap_or(1000));
        let fill = blocked_writers(&path, writers, hold);
        if let Ok(report) = env::var("STANDIN_BLOCKED_REPORT") {
            let _ = std::fs::write(report, format!("{fill} {writers}\n"));
        }
    }
    if let Some(writes) = var::<u32>("STANDIN_WRITE_COST") {
        let cpu_ns = write_cost(
            writes,
            var("STANDIN_WRITE_BURST").unwrap_or(32),
            Duration::from_millis(var("STANDIN_WRITE_PAUSE_MS").unwrap_or(150)),
        );
        if let Ok(report) = env::var("STANDIN_WRITE_COST_REPORT") {
            let _ = std::fs::write(report, format!("{writes} {cpu_ns}\n"));
        }
    }
    if let Some(total) = var::<u64>("STANDIN_BENCH_BYTES") {
        let started = Instant::now();
        let lines = bench(
            total,
            var("STANDIN_BENCH_LINE").unwrap_or(256),
            var("STANDIN_BENCH_RATE"),
        );
        if let Ok(report) = env::var("STANDIN_BENCH_REPORT") {
            let seconds = started.elapsed().as_secs_f64();
            let _ = std::fs::write(report, format!("{lines} {seconds} {}\n", cpu_seconds()));
        }
    }
}

/// The files `STANDIN_EXIT_WHEN` and `STANDIN_MORE_WHEN` name, checked every 20 ms.
fn wait_for_files() -> ! {
    let exit_when = env::var_os("STANDIN_EXIT_WHEN");
    let mut more_when = env::var_os("STANDIN_MORE_WHEN");
    let exists = |p: &Option<std::ffi::OsString>| {
        p.as_ref().is_some_and(|p| std::path::Path::new(p).exists())
    };
    loop {
        if exists(&more_when)
            && let Some(path) = more_when.take()
        {
            for i in 1..=var::<u32>("STANDIN_LINES").unwrap_or(0) {
                write_fd(1, format!("stdout more {i}\n").as_bytes());
                write_fd(2, format!("stderr more {i}\n").as_bytes());
            }
            let mut done = path;
            done.push(".done");
            let _ = std::fs::write(done, b"");
        }
        if exists(&exit_when) {
            std::process::exit(var("STANDIN_EXIT_CODE").unwrap_or(0));
        }
        if exit_when.is_none() && more_when.is_none() {
            park_forever();
        }
        thread::sleep(Duration::from_millis(20));
    }
}

fn main() {
    let _first = env::var_os("STANDIN_TOUCH_FIRST")
        .and_then(|_| var::<usize>("STANDIN_TOUCH_MIB"))
        .map(touch_memory);
    console_output();
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
            let scale = var::<f64>("COLLECTOR_TEST_TIME_SCALE").filter(|s| *s >= 1.0);
            thread::sleep(Duration::from_millis(ms).mul_f64(scale.unwrap_or(1.0)));
            if let Ok(how) = env::var("STANDIN_CRASH") {
                crash(&how);
            }
            std::process::exit(var("STANDIN_EXIT_CODE").unwrap_or(0));
        }
        None => wait_for_files(),
    }
}
