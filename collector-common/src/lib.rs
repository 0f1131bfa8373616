//! The kernel/user ABI of the collector.
//!
//! Every type here crosses the boundary between the kernel programs (`collector-ebpf`) and the
//! daemon (`collector`): as ring-buffer records, map keys and values, or read-only globals set at
//! load time. They are `#[repr(C)]`, `Copy`, and carry no implicit padding (padding is spelled out
//! as `_pad` fields) so that both sides agree byte for byte; the size assertions at the bottom
//! keep them honest.
#![no_std]

/// Length of a task's `comm` in the kernel (`TASK_COMM_LEN`), terminating NUL included.
pub const COMM_LEN: usize = 16;
/// Bytes of the executable's path captured at exec.
pub const EXEC_FILENAME_LEN: usize = 256;
/// Bytes of the command line (`argv`, NUL-separated) captured at exec. A power of two so the
/// verifier can bound the copy with a mask.
pub const EXEC_ARGV_LEN: usize = 4096;

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
    /// `pt_regs` slot of the syscall number at syscall exit (`orig_ax` on x86_64).
    pub pt_regs_syscall_nr: u32,
    /// `pt_regs` slots of the first three syscall arguments (`di`, `si`, `dx` on x86_64).
    pub pt_regs_args: [u32; 3],
    /// Zero; keeps the size a multiple of 8.
    pub _pad: u32,
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
/// anything; userspace then confirms it (sets [`TRACKED_CONFIRMED`]) or deletes it.
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

/// [`TrackedProcess::flags`]: userspace matched the full command line and named the instance.
pub const TRACKED_CONFIRMED: u32 = 1;
/// [`TrackedProcess::flags`]: found by the start-up scan of `/proc`, not seen exec'ing.
pub const TRACKED_DISCOVERED: u32 = 2;

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

/// A candidate VMM exec'd. Carries what userspace needs to name the instance, so that even a
/// process that has already exited by the time the event is read can be identified.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct ExecEvent {
    pub header: ProcessEventHeader,
    /// Matcher whose `comm` prefix claimed the process.
    pub matcher_id: u32,
    /// Bytes of `argv` present in `argv` (the command line may be longer; see `argv_truncated`).
    pub argv_len: u32,
    /// 1 when the command line was longer than [`EXEC_ARGV_LEN`].
    pub argv_truncated: u32,
    /// Thread id of the exec'ing thread (differs from `tgid` only for exec from a thread).
    pub pid: u32,
    /// `comm` after exec.
    pub comm: [u8; COMM_LEN],
    /// The path given to exec, NUL-terminated.
    pub filename: [u8; EXEC_FILENAME_LEN],
    /// The command line as the process sees it: NUL-separated arguments.
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
    /// Matcher that claimed the process.
    pub matcher_id: u32,
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
    /// A console descriptor could not be recorded: the console-fd map was full.
    pub const CONSOLE_FD_MAP_FULL: u32 = 3;
    /// Number of kinds (size of the `DROPS` array).
    pub const COUNT: u32 = 8;
}

/// Default capacity of the tracked-process map (processes, not threads).
pub const DEFAULT_MAX_TRACKED_PROCESSES: u32 = 8192;

#[cfg(feature = "user")]
mod user {
    // SAFETY (all impls): `#[repr(C)]`, `Copy`, only integer fields, and no implicit padding
    // (checked by the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::KernelOffsets {}
    unsafe impl aya::Pod for super::ExecMatch {}
    unsafe impl aya::Pod for super::TrackedProcess {}
    unsafe impl aya::Pod for super::ProcessEventHeader {}
    unsafe impl aya::Pod for super::ExitEvent {}
}

// No implicit padding: each size is the sum of its fields.
const _: () = assert!(size_of::<KernelOffsets>() == 16 * 4);
const _: () = assert!(size_of::<ExecMatch>() == 4);
const _: () = assert!(size_of::<TrackedProcess>() == 16);
const _: () = assert!(size_of::<ProcessEventHeader>() == 16);
const _: () =
    assert!(size_of::<ExecEvent>() == 16 + 4 * 4 + COMM_LEN + EXEC_FILENAME_LEN + EXEC_ARGV_LEN);
const _: () = assert!(size_of::<ExitEvent>() == 16 + 4 * 4);

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

/// Head of each record on the console ring buffer; `len` bytes of output follow it.
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
}

/// Writes of one process the kernel could not put on the console ring (full), by tgid.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ConsoleKernelDrops {
    pub bytes: u64,
    pub writes: u64,
}

#[cfg(feature = "user")]
mod console_user {
    // SAFETY (all impls): `#[repr(C)]`, `Copy`, only integer fields, and no implicit padding
    // (checked by the size assertions below), so any byte pattern is a valid value.
    unsafe impl aya::Pod for super::ConsoleFdKey {}
    unsafe impl aya::Pod for super::ConsoleFd {}
    unsafe impl aya::Pod for super::ConsoleRule {}
    unsafe impl aya::Pod for super::SyscallNumbers {}
    unsafe impl aya::Pod for super::ConsoleKernelDrops {}
}

const _: () = assert!(size_of::<ConsoleFdKey>() == 8);
const _: () = assert!(size_of::<ConsoleFd>() == 16);
const _: () = assert!(size_of::<ConsoleRule>() == 8 + CONSOLE_RULE_LEN);
const _: () = assert!(size_of::<SyscallNumbers>() == 14 * 4);
const _: () = assert!(size_of::<ConsoleRecordHeader>() == 32);
const _: () = assert!(size_of::<ConsoleKernelDrops>() == 16);
