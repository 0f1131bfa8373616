//! The kernel/user ABI of the collector.
//!
//! Every type here crosses the boundary between the kernel programs (`collector-ebpf`) and the
//! daemon (`collector`): as ring-buffer records, map keys and values, or read-only globals set at
//! load time. They are `#[repr(C)]`, `Copy`, and carry no implicit padding (padding is spelled out
//! as `_pad` fields) so that both sides agree byte for byte; the size assertions at the bottom
//! keep them honest.
#![no_std]
// ABI padding is spelled out as `_pad` fields that both sides must set.
#![allow(clippy::pub_underscore_fields)]

/// Names of the maps and programs in the kernel object. The kernel side declares each with
/// exactly this identifier (aya names a map or program after its Rust item); userspace finds
/// them only through these constants, and a privileged test loads the object and checks the
/// two lists against it both ways.
pub mod names {
    /// Maps.
    pub mod map {
        pub const EXEC_MATCHERS: &str = "EXEC_MATCHERS";
        pub const TRACKED_PROCESSES: &str = "TRACKED_PROCESSES";
        pub const TRACKED_FILTER: &str = "TRACKED_FILTER";
        pub const PROCESS_EVENTS: &str = "PROCESS_EVENTS";
        pub const DROPS: &str = "DROPS";
        pub const SCHED_THREADS: &str = "SCHED_THREADS";
        pub const SCHED_STATS: &str = "SCHED_STATS";
        pub const SCHED_VCPU_COMMS: &str = "SCHED_VCPU_COMMS";
        pub const SCHED_THREAD_FILTER: &str = "SCHED_THREAD_FILTER";
        pub const SCHED_ON_CPU: &str = "SCHED_ON_CPU";
        pub const CONSOLE_EVENTS: &str = "CONSOLE_EVENTS";
        pub const CONSOLE_FDS: &str = "CONSOLE_FDS";
        pub const CONSOLE_RULES: &str = "CONSOLE_RULES";
        pub const CONSOLE_PENDING: &str = "CONSOLE_PENDING";
        pub const CONSOLE_SCRATCH: &str = "CONSOLE_SCRATCH";
        pub const CONSOLE_PROCS: &str = "CONSOLE_PROCS";
        pub const CONSOLE_WAKE: &str = "CONSOLE_WAKE";
        /// Every map of the object.
        pub const ALL: &[&str] = &[
            EXEC_MATCHERS,
            TRACKED_PROCESSES,
            TRACKED_FILTER,
            PROCESS_EVENTS,
            DROPS,
            SCHED_THREADS,
            SCHED_STATS,
            SCHED_VCPU_COMMS,
            SCHED_THREAD_FILTER,
            SCHED_ON_CPU,
            CONSOLE_EVENTS,
            CONSOLE_FDS,
            CONSOLE_RULES,
            CONSOLE_PENDING,
            CONSOLE_SCRATCH,
            CONSOLE_PROCS,
            CONSOLE_WAKE,
        ];
    }

    /// Read-only globals set at load.
    pub mod global {
        pub const OFFSETS: &str = "OFFSETS";
        pub const SYSCALLS: &str = "SYSCALLS";
        pub const TP_OFFSETS: &str = "TP_OFFSETS";
        pub const CONSOLE_LIMITS: &str = "CONSOLE_LIMITS";
    }

    /// Programs.
    pub mod program {
        pub const SCHED_PROCESS_EXEC: &str = "sched_process_exec";
        pub const SCHED_PROCESS_EXIT: &str = "sched_process_exit";
        pub const MARK_VICTIM: &str = "mark_victim";
        pub const SCHED_SWITCH: &str = "sched_switch";
        pub const SCHED_WAKEUP: &str = "sched_wakeup";
        pub const SCHED_WAKEUP_NEW: &str = "sched_wakeup_new";
        pub const TASK_RENAME: &str = "task_rename";
        /// Console capture on the per-syscall tracepoints.
        pub const CONSOLE_ENTER: &str = "console_enter";
        pub const CONSOLE_EXIT: &str = "console_exit";
        /// Console capture's fallback on the raw syscall tracepoints.
        pub const CONSOLE_SYS_ENTER: &str = "console_sys_enter";
        pub const CONSOLE_SYS_EXIT: &str = "console_sys_exit";
        /// Console capture on the syscall handlers (`fexit`), one program per followed
        /// syscall: `console_fexit_<syscall>`.
        pub const CONSOLE_FEXIT: &[&str] = &[
            "console_fexit_write",
            "console_fexit_pwrite64",
            "console_fexit_writev",
            "console_fexit_pwritev",
            "console_fexit_pwritev2",
            "console_fexit_open",
            "console_fexit_creat",
            "console_fexit_openat",
            "console_fexit_close",
            "console_fexit_dup",
            "console_fexit_dup2",
            "console_fexit_dup3",
            "console_fexit_fcntl",
        ];
        /// Every program of the object but [`CONSOLE_FEXIT`].
        pub const ALL: &[&str] = &[
            SCHED_PROCESS_EXEC,
            SCHED_PROCESS_EXIT,
            MARK_VICTIM,
            SCHED_SWITCH,
            SCHED_WAKEUP,
            SCHED_WAKEUP_NEW,
            TASK_RENAME,
            CONSOLE_ENTER,
            CONSOLE_EXIT,
            CONSOLE_SYS_ENTER,
            CONSOLE_SYS_EXIT,
        ];
    }
}

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`), terminating NUL included.
pub const COMM_LEN: usize = 16;
/// Bytes of the executable's path captured at exec.
pub const EXEC_FILENAME_LEN: usize = 256;
/// Bytes of the command line (`argv`, NUL-separated) an exec record carries: a prefix. The
/// whole line is read from `/proc/PID/cmdline` while the process runs; the prefix names a VMM
/// that is gone before userspace reads its record (a Firecracker line of the fleet, about 200
/// bytes, fits whole). Small records are what let the ring take a burst of execs: 816 bytes a
/// record instead of the 4400 a whole 4 KiB line cost (`docs/lifecycle.md`).
pub const EXEC_ARGV_LEN: usize = 512;

/// Offsets of the kernel struct fields the programs read, in bytes, computed by the collector
/// from the running kernel's BTF (`/sys/kernel/btf/vmlinux`) and set as a read-only global at
/// load time. Rust eBPF emits no CO-RE relocations, so this is how one object runs on every
/// kernel: no offset is compiled in.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct KernelOffsets {
    /// `task_struct.pid`
    pub task_pid: u32,
    /// `task_struct.tgid`
    pub task_tgid: u32,
    /// `task_struct.exit_code`
    pub task_exit_code: u32,
    /// `task_struct.signal` (pointer to `signal_struct`)
    pub task_signal: u32,
    /// `task_struct.mm` (pointer to `mm_struct`)
    pub task_mm: u32,
    /// `signal_struct.live` (`atomic_t`: threads of the group still alive)
    pub signal_live: u32,
    /// `signal_struct.group_exit_code`
    pub signal_group_exit_code: u32,
    /// `signal_struct.flags`
    pub signal_flags: u32,
    /// `mm_struct.arg_start`
    pub mm_arg_start: u32,
    /// `mm_struct.arg_end`
    pub mm_arg_end: u32,
    /// `linux_binprm.filename` (pointer to the path given to exec)
    pub binprm_filename: u32,
    /// `signal_struct.oom_score_adj` (`short`)
    pub signal_oom_score_adj: u32,
    /// `mm_struct.total_vm` (pages)
    pub mm_total_vm: u32,
    /// The `count` of `mm_struct.rss_stat[MM_ANONPAGES]` (pages; `percpu_counter.count` since
    /// 6.2, `atomic_long_t` before: both a signed 64-bit value read as the kernel's own
    /// `get_mm_counter()` does, without folding per-CPU deltas).
    pub mm_rss_anon: u32,
    /// The `count` of `mm_struct.rss_stat[MM_FILEPAGES]`
    pub mm_rss_file: u32,
    /// The `count` of `mm_struct.rss_stat[MM_SHMEMPAGES]`
    pub mm_rss_shmem: u32,
    /// 1 when `mark_victim`'s first argument is the victim's `task_struct *` (kernels >= 6.8),
    /// 0 when it is only its pid (older kernels: no memory counters then).
    pub mark_victim_has_task: u32,
    /// `task_struct.cgroups` (pointer to `css_set`)
    pub task_cgroups: u32,
    /// `css_set.subsys[memory_cgrp_id]` (pointer to the memory `cgroup_subsys_state`), or 0
    /// when the kernel has no memory controller.
    pub css_set_memory_subsys: u32,
    /// `cgroup_subsys_state.cgroup`
    pub css_cgroup: u32,
    /// `cgroup.kn` (pointer to `kernfs_node`)
    pub cgroup_kn: u32,
    /// `kernfs_node.id` (the cgroup folder's inode number)
    pub kernfs_node_id: u32,
    /// `task_struct.__state` (`state` before 5.14)
    pub task_state: u32,
    /// Size of that field in bytes: 4 (`unsigned int __state`) or 8 (`long state`)
    pub task_state_size: u32,
    /// `task_struct.se.sum_exec_runtime` (ns of CPU time, as `/proc/PID/schedstat` shows it)
    pub task_sum_exec_runtime: u32,
    /// `task_struct.comm`
    pub task_comm: u32,
    /// `pt_regs` slot of the syscall number at syscall exit (`orig_ax` on x86_64).
    pub pt_regs_syscall_nr: u32,
    /// `pt_regs` slots of the first three syscall arguments (`di`, `si`, `dx` on x86_64).
    pub pt_regs_args: [u32; 3],
}

/// Key of the exec matcher trie: a task's `comm` after exec (the executable's base name, cut to
/// 15 bytes, NUL-terminated). Matchers are stored as prefixes of it: an exact name includes its
/// NUL, a name pattern such as `qemu-system-*` stops before the wildcard.
pub type CommKey = [u8; COMM_LEN];

/// Value of the exec matcher trie.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExecMatch {
    /// Index of the matcher in the collector's configuration.
    pub matcher_id: u32,
}

/// A process the kernel programs follow, keyed by its thread-group id (the user-visible pid).
///
/// The exec program inserts it the moment a candidate VMM execs, before userspace has seen
/// anything; userspace then keeps it (changing only the matcher, when the full command line
/// names another one), or deletes it. Userspace never brings back an entry the kernel removed:
/// it changes an exec'd process's entry with `BPF_EXIST` and only while `start_boot_ns` is the
/// exec's, and inserts the processes a `/proc` scan finds with `BPF_NOEXIST`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct TrackedProcess {
    /// Matcher that claimed the process (see [`ExecMatch`]).
    pub matcher_id: u32,
    /// `TRACKED_*` bits.
    pub flags: u32,
    /// `bpf_ktime_get_boot_ns()` at the exec (or at discovery, for processes found by a scan).
    pub start_boot_ns: u64,
}

/// [`TrackedProcess::flags`]: inserted by userspace for a process a scan of `/proc` found, not
/// seen exec'ing.
pub const TRACKED_DISCOVERED: u32 = 2;
/// [`TrackedProcess::flags`]: the kernel's OOM killer chose this process as its victim.
pub const TRACKED_OOM_VICTIM: u32 = 4;

/// Kinds of record on the process-events ring buffer. Each record starts with a
/// [`ProcessEventHeader`] whose `kind` is one of these.
pub mod process_event_kind {
    /// [`super::ExecEvent`]: a process whose `comm` matched a matcher exec'd.
    pub const EXEC: u32 = 1;
    /// [`super::ExitEvent`]: the last thread of a tracked process exited.
    pub const EXIT: u32 = 2;
    /// [`super::ExitEvent`] (fields other than the header unset): a tracked process exec'd a
    /// program no matcher claims; it is no longer followed.
    pub const UNTRACK: u32 = 3;
    /// [`super::OomEvent`]: the OOM killer chose a tracked process as its victim.
    pub const OOM_VICTIM: u32 = 4;
}

/// Common header of every process event.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ProcessEventHeader {
    /// One of [`process_event_kind`].
    pub kind: u32,
    /// Thread-group id (the pid userspace sees).
    pub tgid: u32,
    /// `bpf_ktime_get_boot_ns()` when it happened.
    pub boot_ns: u64,
}

/// A candidate VMM exec'd. Carries what userspace needs to name the instance: the path, and
/// the command line's first [`EXEC_ARGV_LEN`] bytes, enough for a process that has already
/// exited by the time the record is read; userspace reads the rest from `/proc` while the
/// process runs.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: ProcessEventHeader,
    /// Matcher whose `comm` prefix claimed the process.
    pub matcher_id: u32,
    /// Bytes of the command line present in `argv` (a prefix when `argv_total` is larger).
    pub argv_len: u32,
    /// Bytes of the whole command line (`mm->arg_end - mm->arg_start`).
    pub argv_total: u32,
    /// Thread id of the exec'ing thread (differs from `tgid` only for exec from a thread).
    pub pid: u32,
    /// `comm` after exec.
    pub comm: [u8; COMM_LEN],
    /// The path given to exec, NUL-terminated.
    pub filename: [u8; EXEC_FILENAME_LEN],
    /// The start of the command line as the process sees it: NUL-separated arguments.
    pub argv: [u8; EXEC_ARGV_LEN],
}

/// The last thread of a tracked process exited (`kind` EXIT), or it stopped being followed
/// (`kind` UNTRACK).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ExitEvent {
    pub header: ProcessEventHeader,
    /// `task_struct.exit_code` of the last thread: the wait status (exit code << 8, or the
    /// terminating signal, with 0x80 when it dumped core).
    pub exit_code: u32,
    /// `signal_struct.group_exit_code`: the status of a group exit (`exit_group`, fatal signal).
    pub group_exit_code: u32,
    /// `signal_struct.flags` (tells a group exit from a last-thread exit).
    pub signal_flags: u32,
    /// [`TrackedProcess::flags`] at exit ([`TRACKED_OOM_VICTIM`] tells an OOM kill).
    pub tracked_flags: u32,
}

/// The OOM killer chose a tracked process (`oom:mark_victim`). The counters are what the kernel's
/// own tracepoint and its "Out of memory: Killed process" line report, in pages.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OomEvent {
    pub header: ProcessEventHeader,
    /// Thread id of the victim task (the tracepoint's pid).
    pub pid: u32,
    /// 1 when the counters below were read from the victim (see
    /// [`KernelOffsets::mark_victim_has_task`]).
    pub has_counters: u32,
    pub total_vm_pages: u64,
    pub anon_rss_pages: u64,
    pub file_rss_pages: u64,
    pub shmem_rss_pages: u64,
    /// The victim's `oom_score_adj` (-1000..=1000).
    pub oom_score_adj: i32,
    /// Zero.
    pub _pad: u32,
    /// Inode number of the victim's memory cgroup folder (0 when unknown).
    pub memcg_id: u64,
}

/// Indexes of the kernel's drop counters (`DROPS`, a per-CPU array). Every place where the kernel
/// side gives something up counts it here; userspace exports them.
pub mod drop_kind {
    /// An exec event found the process-events ring buffer full.
    pub const EXEC_EVENT_RESERVE: u32 = 0;
    /// An exit event found the process-events ring buffer full.
    pub const EXIT_EVENT_RESERVE: u32 = 1;
    /// A matching exec could not be followed: the tracked-process map was full.
    pub const TRACKED_MAP_FULL: u32 = 2;
    /// An OOM-victim event found the process-events ring buffer full.
    pub const OOM_EVENT_RESERVE: u32 = 3;
    /// A console descriptor could not be recorded: the console-fd map was full.
    pub const CONSOLE_FD_MAP_FULL: u32 = 4;
    /// A thread of a followed process could not be followed: the thread map was full.
    pub const SCHED_THREAD_MAP_FULL: u32 = 5;
    /// A console descriptor was refused: its process already has
    /// [`super::ConsoleLimits::fd_quota`] entries in the console-fd map.
    pub const CONSOLE_FD_QUOTA: u32 = 6;
    /// A followed process's console state could not be created: the console-process map was
    /// full (its writes are then captured without a budget and its losses counted here).
    pub const CONSOLE_PROC_MAP_FULL: u32 = 7;
    /// An `open` or `dup` of a followed process could not be stashed between entry and exit:
    /// the pending-syscall map was full (the new descriptor's role is not recorded).
    pub const CONSOLE_PENDING_FULL: u32 = 8;
    /// Number of kinds (size of the `DROPS` array). Kinds are dense: every index below it is
    /// one of the kinds above, and userspace exports each (its table checks that it has all).
    pub const COUNT: u32 = 9;
}

/// Default capacity of the tracked-process map (processes, not threads).
pub const DEFAULT_MAX_TRACKED_PROCESSES: u32 = 8192;

#[cfg(feature = "user")]
mod user {
    // Any byte pattern is a valid value of these types (the size assertions below check that
    // there is no implicit padding).
    // SAFETY: `KernelOffsets` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::KernelOffsets {}
    // SAFETY: `ExecMatch` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ExecMatch {}
    // SAFETY: `TrackedProcess` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::TrackedProcess {}
    // SAFETY: `ProcessEventHeader` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ProcessEventHeader {}
    // SAFETY: `ExitEvent` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ExitEvent {}
    // SAFETY: `OomEvent` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::OomEvent {}
}

// No implicit padding: each size is the sum of its fields.
const _: () = assert!(size_of::<KernelOffsets>() == 30 * 4);
const _: () = assert!(size_of::<ExecMatch>() == 4);
const _: () = assert!(size_of::<TrackedProcess>() == 16);
const _: () = assert!(size_of::<ProcessEventHeader>() == 16);
const _: () =
    assert!(size_of::<ExecEvent>() == 16 + 4 * 4 + COMM_LEN + EXEC_FILENAME_LEN + EXEC_ARGV_LEN);
// A ring slot is the record and an 8-byte header: the default ring
// (`kernel.process_events_ring_bytes`, 1 MiB) takes a burst of 1272 execs.
const _: () = assert!(size_of::<ExecEvent>() == 816);
const _: () = assert!(size_of::<ExitEvent>() == 16 + 4 * 4);
const _: () = assert!(size_of::<OomEvent>() == 16 + 2 * 4 + 4 * 8 + 2 * 4 + 8);

// ---------------------------------------------------------------------------------------------
// Scheduling: run-queue latency, CPU time and context switches of the threads of followed
// processes (kernel side: `collector-ebpf/src/sched.rs`; docs/scheduling.md).
// ---------------------------------------------------------------------------------------------

/// Classes of the threads of a VMM, the `thread` label of the scheduling metrics.
pub mod thread_class {
    /// Every thread of the VMM that is not a vCPU (API, I/O, device emulation, main thread).
    pub const VMM: u32 = 0;
    /// A thread whose name matches the matcher's vCPU pattern.
    pub const VCPU: u32 = 1;
    /// Number of classes.
    pub const COUNT: u32 = 2;
}

/// Buckets of the run-queue latency histogram: bucket `i < SCHED_LATENCY_BUCKETS - 1` counts
/// waits of at most 2^i microseconds (1 µs to 1.048576 s); the last one counts longer waits.
pub const SCHED_LATENCY_BUCKETS: usize = 22;

/// The histogram bucket of a run-queue wait of `ns` nanoseconds: the smallest `i` with
/// `ns <= 2^i µs`, or the last bucket. Shared by the kernel (which counts) and userspace (which
/// labels the buckets), so both agree on the bounds.
#[allow(
    clippy::inline_always,
    reason = "called from the kernel programs' hot path: a BPF call costs"
)]
#[inline(always)]
pub fn latency_bucket(ns: u64) -> usize {
    let last = SCHED_LATENCY_BUCKETS - 1;
    // ns <= 2^i µs  <=>  ceil(ns / 1000) <= 2^i
    let us = ns.div_ceil(1000);
    if us <= 1 {
        return 0;
    }
    let ceil_log2 = (64 - (us - 1).leading_zeros()) as usize;
    if ceil_log2 < last { ceil_log2 } else { last }
}

/// Default capacity of the thread map (threads of followed processes, not processes).
pub const DEFAULT_MAX_TRACKED_THREADS: u32 = 65536;

/// Slots of the thread filter (`SCHED_THREAD_FILTER`, an mmap-able array of `u64`): slot
/// `tid % SCHED_FILTER_SLOTS` counts the entries of the thread map whose thread id falls in it,
/// plus any insert under way, never fewer. A zero slot tells the scheduling programs that a
/// thread is not followed without the hash lookup. A power of two (the kernel masks with it);
/// 512 KiB of counters.
pub const SCHED_FILTER_SLOTS: u32 = 1 << 16;

/// The filter slot of thread `tid`.
#[allow(
    clippy::inline_always,
    reason = "called from the kernel programs' hot path: a BPF call costs"
)]
#[inline(always)]
pub fn sched_filter_slot(tid: u32) -> u32 {
    tid & (SCHED_FILTER_SLOTS - 1)
}

/// [`SchedThread::runtime_ns`] before the thread's CPU time has been sampled once.
pub const SCHED_RUNTIME_UNKNOWN: u64 = u64::MAX;

/// A thread of a followed process (`SCHED_THREADS`, keyed by thread id). Its presence is what
/// makes the scheduling programs look at the thread at all.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedThread {
    /// Thread-group id: the process, hence the instance, it belongs to.
    pub tgid: u32,
    /// One of [`thread_class`].
    pub class: u32,
    /// `bpf_ktime_get_ns()` when it entered the run queue; 0 while not waiting for a CPU.
    pub queued_ns: u64,
    /// The task's `se.sum_exec_runtime` when last sampled (switch-out, or switch-in for the
    /// first time); [`SCHED_RUNTIME_UNKNOWN`] before that.
    pub runtime_ns: u64,
}

/// Key of the per-instance scheduling aggregates (`SCHED_STATS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub struct SchedKey {
    pub tgid: u32,
    /// One of [`thread_class`].
    pub class: u32,
}

/// Scheduling aggregates of one (process, thread class), updated by the kernel with atomic adds.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SchedStats {
    /// Run-queue waits per log2 bucket (see [`SCHED_LATENCY_BUCKETS`]), not cumulative.
    pub latency_buckets: [u64; SCHED_LATENCY_BUCKETS],
    /// Sum of the waits, ns.
    pub latency_sum_ns: u64,
    /// CPU time (`se.sum_exec_runtime` deltas), ns.
    pub cpu_ns: u64,
    /// Switches out of the CPU while blocking.
    pub voluntary: u64,
    /// Switches out while still runnable (preempted, yielded).
    pub involuntary: u64,
}

/// Key of the vCPU thread-name trie (`SCHED_VCPU_COMMS`): a matcher and a thread `comm`.
/// Entries are the literal prefixes of the matcher's vCPU pattern; the prefix length in bits
/// always covers `matcher_id` whole.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct VcpuCommKey {
    pub matcher_id: u32,
    pub comm: CommKey,
}

#[cfg(feature = "user")]
mod sched_user {
    // SAFETY: `SchedThread` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::SchedThread {}
    // SAFETY: `SchedKey` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::SchedKey {}
    // SAFETY: `SchedStats` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::SchedStats {}
    // SAFETY: `VcpuCommKey` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::VcpuCommKey {}
}

const _: () = assert!(size_of::<SchedThread>() == 24);
const _: () = assert!(size_of::<SchedKey>() == 8);
const _: () = assert!(size_of::<SchedStats>() == (SCHED_LATENCY_BUCKETS + 4) * 8);
const _: () = assert!(size_of::<VcpuCommKey>() == 4 + COMM_LEN);
const _: () = assert!(SCHED_FILTER_SLOTS.is_power_of_two());

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn latency_buckets_are_powers_of_two_microseconds() {
        let cases = [
            (0, 0),
            (1_000, 0),
            (1_001, 1),
            (2_000, 1),
            (2_001, 2),
            (4_000, 2),
            (1_000_000, 10),
            (1_024_000, 10),
            (1_024_001, 11),
            (1_048_576_000, 20),
            (1_048_576_001, 21),
            (u64::MAX, 21),
        ];
        for (ns, bucket) in cases {
            assert_eq!(latency_bucket(ns), bucket, "{ns} ns");
        }
    }
}

// ---------------------------------------------------------------------------------------------
// Console capture: the bytes tracked VMMs write to their stdout, stderr and console files.
// ---------------------------------------------------------------------------------------------

/// Bytes of one write that reach userspace whole; the rest of a longer write is cut (counted,
/// and marked in the record by `total > len`).
pub const CONSOLE_MAX_WRITE: usize = 64 * 1024;
/// Longest literal tail of a console-file rule the kernel compares at `openat`.
pub const CONSOLE_RULE_LEN: usize = 64;
/// Console-file rules the kernel holds (all matchers together).
pub const CONSOLE_MAX_RULES: u32 = 16;
/// `iovec`s of one `writev` the kernel copies; bytes in later ones are cut.
pub const CONSOLE_MAX_IOVECS: u32 = 64;
/// Default capacity of the console-descriptor map.
pub const DEFAULT_MAX_CONSOLE_FDS: u32 = 16384;

/// What a console descriptor carries ([`ConsoleFd::stream`], [`ConsoleRecordHeader::stream`]).
pub mod console_stream {
    /// Not a console: a tombstone that overrides the implicit stdout/stderr of fds 1 and 2
    /// (after `close(1)`, or a `dup2` of another file onto it).
    pub const NONE: u32 = 0;
    /// fd 1, unless overridden.
    pub const STDOUT: u32 = 1;
    /// fd 2, unless overridden.
    pub const STDERR: u32 = 2;
    /// A file whose path matched a console-file rule.
    pub const CONSOLE: u32 = 3;
}

/// Key of the console-descriptor map.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct ConsoleFdKey {
    pub tgid: u32,
    pub fd: u32,
}

/// A descriptor of a tracked process whose writes are (or, for a tombstone, are not) console
/// output.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleFd {
    /// One of [`console_stream`].
    pub stream: u32,
    pub _pad: u32,
    /// [`TrackedProcess::start_boot_ns`] of the process it belongs to: an entry left behind by
    /// an exited process never applies to a later one that reuses the pid.
    pub start_boot_ns: u64,
}

/// A console-file rule: a path (as the VMM passes it to `open`/`openat`) that ends with
/// `suffix[..len]` is a console file of processes claimed by `matcher_id`. A suffix starting
/// with `/` also matches the bare name after it (a relative `vm.log`). `len == 0`: unused slot.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConsoleRule {
    pub matcher_id: u32,
    pub len: u32,
    pub suffix: [u8; CONSOLE_RULE_LEN],
}

/// Syscall numbers of this architecture, set by userspace (the kernel object is built once for
/// every architecture). [`SYSCALL_NONE`] marks one the architecture lacks.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SyscallNumbers {
    pub write: u32,
    pub pwrite64: u32,
    pub writev: u32,
    pub pwritev: u32,
    pub pwritev2: u32,
    pub open: u32,
    pub creat: u32,
    pub openat: u32,
    pub close: u32,
    pub dup: u32,
    pub dup2: u32,
    pub dup3: u32,
    pub fcntl: u32,
    pub _pad: u32,
}

/// [`SyscallNumbers`]: the architecture has no such syscall.
pub const SYSCALL_NONE: u32 = u32::MAX;

/// Field offsets in the records of the per-syscall tracepoints (`syscalls/sys_enter_<name>`,
/// `syscalls/sys_exit_<name>`), read by userspace from each event's `format` file in tracefs.
/// One set for all the events the capture attaches to: an event whose layout differs is not
/// attached.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SyscallTpOffsets {
    /// `int __syscall_nr` of an entry record.
    pub enter_nr: u32,
    /// The first three arguments (8 bytes each) of an entry record, by position.
    pub args: [u32; 3],
    /// `int __syscall_nr` of an exit record.
    pub exit_nr: u32,
    /// `long ret` of an exit record.
    pub ret: u32,
}

/// Head of each record on the console ring buffer; `len` bytes of output follow it (a record
/// may be longer: a write is reserved in a size class, see [`CONSOLE_SIZE_CLASSES`]).
///
/// `lost_bytes` and `lost_writes` number the losses of the record's (process, stream): the
/// totals lost so far ([`ConsoleProc::lost_bytes`]), read when the record took its place on
/// the ring. A record whose totals are higher than those of the previous record of its stream
/// comes right after a loss: userspace puts one gap record before it. Totals rather than
/// deltas, because kernels before 5.12 have no atomic fetch-and-add: two CPUs can read one
/// total at once and both be right, where taking a delta could not be.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleRecordHeader {
    pub tgid: u32,
    pub fd: u32,
    /// One of [`console_stream`].
    pub stream: u32,
    /// Bytes that follow (at most [`CONSOLE_MAX_WRITE`]).
    pub len: u32,
    /// Bytes the syscall wrote (its return value); `total - len` were cut.
    pub total: u64,
    /// `bpf_ktime_get_boot_ns()` when the write returned.
    pub boot_ns: u64,
    /// Bytes of this stream the kernel gave up so far (every cause).
    pub lost_bytes: u64,
    /// Writes of this stream the kernel gave up so far.
    pub lost_writes: u64,
    /// The [`console_loss`] cause of the stream's latest loss.
    pub lost_cause: u32,
    pub _pad: u32,
}

/// Why the kernel gave up a console write ([`ConsoleProc::cause_bytes`]).
pub mod console_loss {
    /// The console ring was full.
    pub const RING: u32 = 0;
    /// The process was over its budget ([`super::ConsoleLimits`]).
    pub const OVER_BUDGET: u32 = 1;
    /// The write could not be stashed between entry and exit: the pending-syscall map was full
    /// (bytes counted as requested, not as accepted).
    pub const PENDING_FULL: u32 = 2;
    /// Number of causes.
    pub const COUNT: u32 = 3;
}

/// Slots of the per-stream arrays of [`ConsoleProc`], indexed by the [`console_stream`] value
/// (slot 0 unused), and of its per-cause arrays: a power of two, so an index is masked.
pub const CONSOLE_SLOTS: usize = 4;

/// Console state of one followed process (`CONSOLE_PROCS`, by tgid): its budget, its
/// descriptor count and what it lost. Created by the kernel at the process's first console
/// syscall; removed by userspace after its last read.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleProc {
    /// [`TrackedProcess::start_boot_ns`]: an entry of an earlier process with this pid is
    /// replaced, never inherited.
    pub start_boot_ns: u64,
    /// Token bucket: bytes the process may still put on the ring.
    pub tokens: u64,
    /// When `tokens` was last refilled (`bpf_ktime_get_boot_ns()`).
    pub refilled_ns: u64,
    /// Entries of this process in the console-fd map that the kernel made.
    pub fds: u64,
    /// Bytes lost, by stream, all causes (see [`ConsoleRecordHeader::lost_bytes`]).
    pub lost_bytes: [u64; CONSOLE_SLOTS],
    /// Writes lost, by stream.
    pub lost_writes: [u64; CONSOLE_SLOTS],
    /// Bytes lost, by [`console_loss`] cause, all streams.
    pub cause_bytes: [u64; CONSOLE_SLOTS],
    /// Writes lost, by cause.
    pub cause_writes: [u64; CONSOLE_SLOTS],
    /// Cause of each stream's latest loss.
    pub last_cause: [u32; CONSOLE_SLOTS],
}

/// Per-process limits of console capture, set by userspace at load (`CONSOLE_LIMITS`).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleLimits {
    /// Token-bucket refill, bytes per second (0: no budget).
    pub rate_bytes_per_sec: u64,
    /// Token-bucket size, bytes.
    pub burst_bytes: u64,
    /// Nanoseconds in which an empty bucket fills (`burst * 1e9 / rate`): a longer idle time
    /// fills it without a multiplication that could overflow.
    pub refill_ns: u64,
    /// Console-fd map entries one process may have.
    pub fd_quota: u64,
    /// Unread bytes on the console ring at which a record wakes the reader. 0: the kernel's
    /// own rule, a wake-up for each record the reader had caught up with.
    pub wakeup_bytes: u64,
    /// Below `wakeup_bytes`, a record that finds the ring read to the end wakes the reader
    /// only if no record did for this long; the reader polls the ring for longer than that
    /// after each wake-up, so it finds the records that did not wake it.
    pub wakeup_interval_ns: u64,
}

/// Bytes a write costs against its process's budget besides its own: the ring's share of a
/// record (its header and the ring's 8-byte header), so that one-byte writes cannot flood the
/// ring with headers.
pub const CONSOLE_RECORD_OVERHEAD: u64 = size_of::<ConsoleRecordHeader>() as u64 + 8;

/// Sizes in which a `write` is reserved on the ring and copied there straight from the
/// writer's memory (a reservation must have a size the verifier knows): the smallest that
/// holds the write. Powers of two, so a record wastes less than half of its slot.
pub const CONSOLE_SIZE_CLASSES: [usize; 11] = [
    64, 128, 256, 512, 1024, 2048, 4096, 8192, 16384, 32768, 65536,
];

/// Default per-process console-descriptor quota.
pub const DEFAULT_CONSOLE_FD_QUOTA: u32 = 64;

#[cfg(feature = "user")]
mod console_user {
    // Any byte pattern is a valid value of these types (the size assertions below check that
    // there is no implicit padding).
    // SAFETY: `ConsoleFdKey` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ConsoleFdKey {}
    // SAFETY: `ConsoleFd` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ConsoleFd {}
    // SAFETY: `ConsoleRule` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ConsoleRule {}
    // SAFETY: `SyscallNumbers` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::SyscallNumbers {}
    // SAFETY: `SyscallTpOffsets` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::SyscallTpOffsets {}
    // SAFETY: `ConsoleProc` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ConsoleProc {}
    // SAFETY: `ConsoleLimits` is `#[repr(C)]`, `Copy`, integers only, without implicit padding.
    unsafe impl aya::Pod for super::ConsoleLimits {}
}

const _: () = assert!(size_of::<ConsoleFdKey>() == 8);
const _: () = assert!(size_of::<ConsoleFd>() == 16);
const _: () = assert!(size_of::<ConsoleRule>() == 8 + CONSOLE_RULE_LEN);
const _: () = assert!(size_of::<SyscallNumbers>() == 14 * 4);
const _: () = assert!(size_of::<SyscallTpOffsets>() == 6 * 4);
const _: () = assert!(size_of::<ConsoleRecordHeader>() == 56);
const _: () =
    assert!(size_of::<ConsoleProc>() == 4 * 8 + 4 * CONSOLE_SLOTS * 8 + 4 * CONSOLE_SLOTS);
const _: () = assert!(size_of::<ConsoleLimits>() == 6 * 8);
const _: () = assert!(CONSOLE_SIZE_CLASSES[CONSOLE_SIZE_CLASSES.len() - 1] == CONSOLE_MAX_WRITE);
const _: () = assert!((console_loss::COUNT as usize) < CONSOLE_SLOTS);
