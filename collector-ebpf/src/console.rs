//! Console capture: the bytes tracked VMMs write to their stdout, stderr and console files.
//!
//! Where the kernel allows it, one `fexit` program per followed syscall on its handler
//! (`__x64_sys_write`, ...) does the work at once, with the arguments and the return value
//! ([`on_fexit`]): no task is put on the syscall-tracing slow path. Otherwise two programs do
//! the work, one at syscall entry and one at exit, attached to the per-syscall
//! tracepoints (`syscalls/sys_enter_<name>`, `syscalls/sys_exit_<name>`) of the dozen syscalls
//! that matter, so no other syscall on the host runs them. On a kernel without those
//! tracepoints (no `CONFIG_FTRACE_SYSCALLS`) userspace attaches the same logic as `tp_btf`
//! programs on the raw `sys_enter`/`sys_exit` tracepoints instead, which run for every syscall
//! and filter by number. Both pairs only fetch the number and arguments and call [`on_enter`]
//! and [`on_exit`] (which stash between [`begin`] and [`complete`], what `fexit` calls
//! directly):
//!
//! - At entry, for a tracked process, the arguments are stashed per thread in
//!   [`CONSOLE_PENDING`]. A write is stashed only when its descriptor is a console (see
//!   [`stream_of`]).
//! - At exit, with the return value: a write sends exactly the bytes the kernel accepted (`ret`,
//!   so a partial write or an `EAGAIN` the VMM retries neither loses nor repeats a byte) to
//!   [`CONSOLE_EVENTS`]; an open whose path ends with a console-file rule of the process's
//!   matcher marks the new descriptor; a dup copies the old descriptor's role to the new one.
//!
//! Fairness and losses, per process ([`CONSOLE_PROCS`]): a write first pays its bytes (and its
//! record's overhead) from the process's token bucket ([`ConsoleLimits`]); a process over its
//! budget loses its own excess there, before it can take ring space from others. Every loss
//! (over budget, ring full, no room to stash the syscall) is added to the totals of its stream
//! and its cause; the next record of the stream carries the stream's totals, so userspace puts
//! one gap record exactly where output went missing. A `write` is copied once, from the
//! writer's memory into its ring reservation ([`send_write`]).
//!
//! Descriptors 1 and 2 are stdout and stderr from the exec on, with no map entry, so nothing
//! written before userspace has seen the process is missed; an entry with
//! [`console_stream::NONE`] overrides that after `close(1)` or a `dup2` of another file.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    Global,
    bindings::{BPF_RB_AVAIL_DATA, BPF_RB_FORCE_WAKEUP, BPF_RB_NO_WAKEUP},
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user as probe_read_user,
        generated::{
            bpf_get_smp_processor_id, bpf_ktime_get_boot_ns, bpf_probe_read_user,
            bpf_probe_read_user_str, bpf_ringbuf_output,
        },
    },
    macros::{btf_tracepoint, fexit, map, tracepoint},
    maps::{Array, HashMap, RingBuf},
    programs::{BtfTracePointContext, FExitContext, TracePointContext},
};
use collector_common::{
    CONSOLE_MAX_IOVECS, CONSOLE_MAX_RULES, CONSOLE_MAX_WRITE, CONSOLE_RECORD_OVERHEAD,
    CONSOLE_RULE_LEN, CONSOLE_SLOTS, ConsoleFd, ConsoleFdKey, ConsoleLimits, ConsoleProc,
    ConsoleRecordHeader, ConsoleRule, DEFAULT_MAX_CONSOLE_FDS, DEFAULT_MAX_TRACKED_PROCESSES,
    SYSCALL_NONE, SyscallNumbers, SyscallTpOffsets, console_loss, console_stream, drop_kind,
};

use crate::{
    kernel::read_at,
    maps::{OFFSETS, TRACKED_PROCESSES, count_drop, may_be_tracked, offset, read_offset},
    sched::add,
};

/// Offset in `pt_regs` of syscall argument `n` (0..3).
#[inline(always)]
fn syscall_arg_offset(n: usize) -> u32 {
    read_offset(&OFFSETS.pt_regs_args[n])
}

/// Syscall numbers of the running architecture, set by userspace at load time.
#[unsafe(no_mangle)]
pub(crate) static SYSCALLS: Global<SyscallNumbers> = Global::new(SyscallNumbers {
    write: SYSCALL_NONE,
    pwrite64: SYSCALL_NONE,
    writev: SYSCALL_NONE,
    pwritev: SYSCALL_NONE,
    pwritev2: SYSCALL_NONE,
    open: SYSCALL_NONE,
    creat: SYSCALL_NONE,
    openat: SYSCALL_NONE,
    close: SYSCALL_NONE,
    dup: SYSCALL_NONE,
    dup2: SYSCALL_NONE,
    dup3: SYSCALL_NONE,
    fcntl: SYSCALL_NONE,
    _pad: 0,
});

/// Record layout of the per-syscall tracepoints, set by userspace from tracefs at load time.
#[unsafe(no_mangle)]
pub(crate) static TP_OFFSETS: Global<SyscallTpOffsets> = Global::new(SyscallTpOffsets {
    enter_nr: 0,
    args: [0; 3],
    exit_nr: 0,
    ret: 0,
});

/// Console output to userspace: a [`ConsoleRecordHeader`] and the bytes. Its own ring, so a
/// chatty guest can never cost a lifecycle event. Size set by config.
#[map]
static CONSOLE_EVENTS: RingBuf = RingBuf::with_byte_size(8 * 1024 * 1024, 0);

/// Descriptors of tracked processes that are consoles (or tombstones over fds 1 and 2).
/// Written here at open/dup/close and by userspace (descriptors found in `/proc/PID/fd`);
/// userspace removes the entries of exited processes.
#[map]
static CONSOLE_FDS: HashMap<ConsoleFdKey, ConsoleFd> =
    HashMap::with_max_entries(DEFAULT_MAX_CONSOLE_FDS, 0);

/// Console-file rules, loaded by userspace; unused slots have `len == 0`.
#[map]
static CONSOLE_RULES: Array<ConsoleRule> = Array::with_max_entries(CONSOLE_MAX_RULES, 0);

/// Syscalls in flight, by `pid_tgid` of the calling thread: entry stashes, exit consumes. A
/// plain hash, not an LRU: an LRU would evict a write in flight without a word when many
/// threads block in writes at once. Here a full map refuses the new entry, and the refused
/// write is counted against its process ([`console_loss::PENDING_FULL`]) and marked in its
/// stream; userspace removes the entries of threads that died inside a syscall. Size set by
/// config (`kernel.console_pending_entries`).
#[map]
static CONSOLE_PENDING: HashMap<u64, Pending> = HashMap::with_max_entries(4096, 0);

/// Console state of each followed process that made a console syscall: budget, descriptor
/// count, losses by stream and cause ([`ConsoleProc`]). Userspace reads and removes them.
#[map]
static CONSOLE_PROCS: HashMap<u32, ConsoleProc> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_PROCESSES, 0);

/// Per-process limits, set by userspace at load (`EbpfLoader::override_global`). A plain
/// static read one field at a time, as [`OFFSETS`].
#[unsafe(no_mangle)]
pub(crate) static CONSOLE_LIMITS: ConsoleLimits = ConsoleLimits {
    rate_bytes_per_sec: 0,
    burst_bytes: 0,
    refill_ns: 0,
    fd_quota: 0,
    wakeup_bytes: 0,
    wakeup_interval_ns: 0,
};

/// Boot time (ns) of the latest record that woke the console reader ([`wakeup_flags`]). Written
/// by every CPU without a lock: a lost update costs at most one wake-up more.
#[map]
static CONSOLE_WAKE: Array<u64> = Array::with_max_entries(1, 0);

/// One record under construction per CPU (indexed by CPU number; userspace sizes it), for a
/// `writev` (and the path compared at `open`, and a new process's console state). A `write` is copied straight into its ring
/// reservation ([`send_write`]); a `writev` is assembled here and copied to the ring with
/// `bpf_ringbuf_output`, because its iovecs land at offsets the verifier cannot bound inside a
/// reservation of the write's own size class. Twice the largest write: the verifier then
/// accepts `data + (offset & mask)` for any offset below the largest write.
#[map]
static CONSOLE_SCRATCH: Array<Scratch> = Array::with_max_entries(1, 0);

const SCRATCH_DATA: usize = 2 * CONSOLE_MAX_WRITE;
/// Bytes of a path compared against the rules (`PATH_MAX`).
const PATH_LEN: usize = 4096;

#[repr(C)]
struct Scratch {
    header: ConsoleRecordHeader,
    data: [u8; SCRATCH_DATA],
    /// The value a new [`CONSOLE_PROCS`] entry is inserted from ([`console_proc`]).
    proc: ConsoleProc,
}

/// What kind of syscall a number is, for this module.
mod kind {
    pub(crate) const WRITE: u32 = 1;
    pub(crate) const WRITEV: u32 = 2;
    /// `open`, `creat`: path in the first argument.
    pub(crate) const OPEN_ARG0: u32 = 3;
    /// `openat`: path in the second argument.
    pub(crate) const OPEN_ARG1: u32 = 4;
    pub(crate) const CLOSE: u32 = 5;
    /// `dup`, `dup2`, `dup3`, `fcntl(F_DUPFD*)`: the new descriptor is the return value.
    pub(crate) const DUP: u32 = 6;
    pub(crate) const FCNTL: u32 = 7;
}

const F_DUPFD: u64 = 0;
const F_DUPFD_CLOEXEC: u64 = 1030;

/// A syscall of a tracked process between entry and exit.
#[repr(C)]
#[derive(Clone, Copy)]
struct Pending {
    nr: u32,
    kind: u32,
    /// The written descriptor, or the old one of a dup.
    fd: u32,
    /// Role of `fd` at entry (writes).
    stream: u32,
    /// Buffer, iovec array or path.
    arg: u64,
    /// Byte count or iovec count.
    count: u64,
    start_boot_ns: u64,
    matcher_id: u32,
    _pad: u32,
}

fn classify(nr: i64, s: &SyscallNumbers) -> Option<u32> {
    if nr < 0 || nr >= i64::from(SYSCALL_NONE) {
        return None;
    }
    let nr = nr as u32;
    if nr == s.write || nr == s.pwrite64 {
        Some(kind::WRITE)
    } else if nr == s.writev || nr == s.pwritev || nr == s.pwritev2 {
        Some(kind::WRITEV)
    } else if nr == s.openat {
        Some(kind::OPEN_ARG1)
    } else if nr == s.open || nr == s.creat {
        Some(kind::OPEN_ARG0)
    } else if nr == s.close {
        Some(kind::CLOSE)
    } else if nr == s.dup || nr == s.dup2 || nr == s.dup3 {
        Some(kind::DUP)
    } else if nr == s.fcntl {
        Some(kind::FCNTL)
    } else {
        None
    }
}

/// The role of descriptor `fd` of process `tgid` (started at `start`).
#[inline(always)]
fn stream_of(tgid: u32, fd: u32, start: u64) -> u32 {
    let key = ConsoleFdKey { tgid, fd };
    if let Some(entry) = CONSOLE_FDS.get_ptr(&key) {
        // SAFETY: pointer from a successful lookup.
        let entry = unsafe { *entry };
        if entry.start_boot_ns == start {
            return entry.stream;
        }
    }
    match fd {
        1 => console_stream::STDOUT,
        2 => console_stream::STDERR,
        _ => console_stream::NONE,
    }
}

/// Gives descriptor `fd` the role `stream` (fds 1 and 2 need a tombstone to stop being
/// stdout/stderr; others just lose their entry). A new entry counts against the process's
/// quota ([`ConsoleLimits::fd_quota`]): one process cannot fill the map for the host.
#[inline(always)]
fn set_stream(tgid: u32, fd: u32, stream: u32, start: u64) {
    let key = ConsoleFdKey { tgid, fd };
    let implicit = match fd {
        1 => console_stream::STDOUT,
        2 => console_stream::STDERR,
        _ => console_stream::NONE,
    };
    if stream == implicit {
        if CONSOLE_FDS.remove(&key).is_ok()
            && let Some(proc) = CONSOLE_PROCS.get_ptr_mut(&tgid)
        {
            // SAFETY: pointer from a successful lookup; the count only moves by atomic adds.
            unsafe {
                if (*proc).start_boot_ns == start && read_volatile(&raw const (*proc).fds) > 0 {
                    add(&raw mut (*proc).fds, u64::MAX);
                }
            }
        }
        return;
    }
    let value = ConsoleFd {
        stream,
        _pad: 0,
        start_boot_ns: start,
    };
    if let Some(entry) = CONSOLE_FDS.get_ptr_mut(&key) {
        // SAFETY: pointer from a successful lookup: the slot exists, and is not counted again.
        unsafe { *entry = value };
        return;
    }
    let Some(proc) = console_proc(tgid, start) else {
        return;
    };
    // SAFETY: pointer from a successful lookup.
    let fds = unsafe { read_volatile(&raw const (*proc).fds) };
    if fds >= read_offset64(&CONSOLE_LIMITS.fd_quota) {
        count_drop(drop_kind::CONSOLE_FD_QUOTA);
        return;
    }
    // Counted before the insert, taken back if it fails: never fewer than there are.
    // SAFETY: as above.
    unsafe { add(&raw mut (*proc).fds, 1) };
    if let Err(err) = CONSOLE_FDS.insert(&key, &value, NOEXIST) {
        // SAFETY: as above.
        unsafe { add(&raw mut (*proc).fds, u64::MAX) };
        if err == ERR_EXIST {
            let _ = CONSOLE_FDS.insert(&key, &value, EXIST);
        } else {
            count_drop(drop_kind::CONSOLE_FD_MAP_FULL);
        }
    }
}

/// `BPF_NOEXIST`
const NOEXIST: u64 = 1;
/// `BPF_EXIST`
const EXIST: u64 = 2;
/// `-EEXIST`, as map helpers return it.
const ERR_EXIST: i32 = -17;

/// A `u64` field of a load-time global (see [`read_offset`]).
#[inline(always)]
fn read_offset64(field: &'static u64) -> u64 {
    // SAFETY: a reference to a field of a static: aligned, initialised.
    unsafe { read_volatile(field) }
}

/// The console state of process `tgid` (started at `start`), created on first use; `None`
/// (counted) when the map is full.
#[inline(always)]
fn console_proc(tgid: u32, start: u64) -> Option<*mut ConsoleProc> {
    if let Some(proc) = CONSOLE_PROCS.get_ptr_mut(&tgid) {
        // SAFETY: pointer from a successful lookup.
        if unsafe { (*proc).start_boot_ns } == start {
            return Some(proc);
        }
    }
    // New, or left by an earlier process with this pid (replaced). Built in this CPU's scratch
    // record, not on the stack: the programs' 512 bytes of stack are shared with the functions
    // they call (`capture`), and a `ConsoleProc` on the stack of both took a write's path over
    // that on kernels before 6.13 (which give tracing programs a private stack).
    let scratch = scratch()?;
    // SAFETY: this CPU's slot (see `send_writev`); `proc` is its own field, used only here.
    let fresh = unsafe {
        let fresh = &raw mut (*scratch).proc;
        fresh.write(ConsoleProc {
            start_boot_ns: start,
            tokens: read_offset64(&CONSOLE_LIMITS.burst_bytes),
            refilled_ns: bpf_ktime_get_boot_ns(),
            ..ConsoleProc::default()
        });
        &*fresh
    };
    if CONSOLE_PROCS.insert(&tgid, fresh, 0).is_err() {
        count_drop(drop_kind::CONSOLE_PROC_MAP_FULL);
        return None;
    }
    CONSOLE_PROCS.get_ptr_mut(&tgid)
}

/// Counts a write of `bytes` on `stream` given up for `cause`, against its process: the
/// stream's loss totals (which the next record of the stream carries, so userspace marks the
/// gap there) and the cause's.
#[inline(always)]
fn lose(proc: *mut ConsoleProc, stream: u32, cause: u32, bytes: u64) {
    let s = stream as usize & (CONSOLE_SLOTS - 1);
    let c = cause as usize & (CONSOLE_SLOTS - 1);
    // SAFETY: `proc` is a map value from a successful lookup; indexes masked inside the arrays.
    unsafe {
        add(&raw mut (*proc).lost_bytes[s], bytes);
        add(&raw mut (*proc).lost_writes[s], 1);
        add(&raw mut (*proc).cause_bytes[c], bytes);
        add(&raw mut (*proc).cause_writes[c], 1);
        write_volatile(&raw mut (*proc).last_cause[s], cause);
    }
}

/// Takes `cost` bytes from the process's token bucket; false when it has not got them.
///
/// Not atomic: two threads of one process writing at the same instant may both spend the same
/// tokens. The budget is a policy and stays approximate then; what it drops is counted exactly.
#[inline(always)]
fn take_budget(proc: *mut ConsoleProc, cost: u64) -> bool {
    let rate = read_offset64(&CONSOLE_LIMITS.rate_bytes_per_sec);
    if rate == 0 {
        return true;
    }
    let burst = read_offset64(&CONSOLE_LIMITS.burst_bytes);
    let refill_ns = read_offset64(&CONSOLE_LIMITS.refill_ns);
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    // SAFETY: `proc` is a map value from a successful lookup.
    unsafe {
        let elapsed = now.saturating_sub((*proc).refilled_ns);
        let mut tokens = (*proc).tokens;
        if elapsed >= refill_ns {
            tokens = burst;
            (*proc).refilled_ns = now;
        } else {
            // elapsed < burst * 1e9 / rate: the product stays below burst * 1e9.
            let earned = elapsed * rate / 1_000_000_000;
            if earned > 0 {
                tokens = if tokens + earned > burst {
                    burst
                } else {
                    tokens + earned
                };
                (*proc).refilled_ns = now;
            }
        }
        if tokens < cost {
            (*proc).tokens = tokens;
            return false;
        }
        (*proc).tokens = tokens - cost;
    }
    true
}

/// Entry of one of the followed syscalls (`syscalls/sys_enter_<name>`).
#[tracepoint]
pub(crate) fn console_enter(ctx: TracePointContext) -> u32 {
    let _ = try_enter(&ctx);
    0
}

fn try_enter(ctx: &TracePointContext) -> Result<(), i64> {
    // Attached to followed syscalls only: the filter is all an untracked process pays.
    if !may_be_tracked((bpf_get_current_pid_tgid() >> 32) as u32) {
        return Ok(());
    }
    let offsets = TP_OFFSETS.load();
    // SAFETY: offsets of this tracepoint's record, from its format in tracefs.
    let nr = unsafe { ctx.read_at::<i32>(offsets.enter_nr as usize) }?;
    on_enter(i64::from(nr), |i| {
        // SAFETY: as above.
        unsafe { ctx.read_at::<u64>(offsets.args[i] as usize) }.map_err(i64::from)
    })
}

/// Exit of one of the followed syscalls (`syscalls/sys_exit_<name>`).
#[tracepoint]
pub(crate) fn console_exit(ctx: TracePointContext) -> u32 {
    let _ = try_exit(&ctx);
    0
}

fn try_exit(ctx: &TracePointContext) -> Result<(), i64> {
    if !may_be_tracked((bpf_get_current_pid_tgid() >> 32) as u32) {
        return Ok(());
    }
    let offsets = TP_OFFSETS.load();
    // SAFETY: offsets of this tracepoint's record, from its format in tracefs.
    let nr = unsafe { ctx.read_at::<i32>(offsets.exit_nr as usize) }?;
    // SAFETY: as above.
    let ret = unsafe { ctx.read_at::<i64>(offsets.ret as usize) }?;
    on_exit(i64::from(nr), ret)
}

/// Fallback without per-syscall tracepoints: `sys_enter(struct pt_regs *regs, long id)`, run
/// for every syscall.
#[btf_tracepoint(function = "sys_enter")]
pub(crate) fn console_sys_enter(ctx: BtfTracePointContext) -> i32 {
    if !may_be_tracked((bpf_get_current_pid_tgid() >> 32) as u32) {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    let _ = on_enter(ctx.arg(1), |i| read_at::<u64>(regs, syscall_arg_offset(i)));
    0
}

/// Fallback: `sys_exit(struct pt_regs *regs, long ret)`, run for every syscall.
#[btf_tracepoint(function = "sys_exit")]
pub(crate) fn console_sys_exit(ctx: BtfTracePointContext) -> i32 {
    if !may_be_tracked((bpf_get_current_pid_tgid() >> 32) as u32) {
        return 0;
    }
    let regs: *const u8 = ctx.arg(0);
    if let Ok(nr) = read_at::<i64>(regs, offset!(pt_regs_syscall_nr)) {
        let _ = on_exit(nr, ctx.arg(1));
    }
    0
}

/// Syscall `nr` enters; `arg(i)` reads its argument `i` (0 to 2): what it needs at exit is
/// stashed per thread. Cheap for an untracked process: a comparison of the number (against a
/// dozen constants) and one hash lookup.
#[inline(always)]
fn on_enter(nr: i64, arg: impl Fn(usize) -> Result<u64, i64>) -> Result<(), i64> {
    let Some(kind) = classify(nr, &SYSCALLS.load()) else {
        return Ok(());
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = begin(nr, kind, pid_tgid, arg)? else {
        return Ok(());
    };
    if CONSOLE_PENDING.insert(&pid_tgid, &pending, 0).is_err() {
        let tgid = (pid_tgid >> 32) as u32;
        if pending.kind == kind::WRITE || pending.kind == kind::WRITEV {
            // Lost before it happened: counted at the bytes asked for.
            let bytes = if pending.kind == kind::WRITE {
                pending.count
            } else {
                iovec_bytes(pending.arg, pending.count)
            };
            if let Some(proc) = console_proc(tgid, pending.start_boot_ns) {
                lose(proc, pending.stream, console_loss::PENDING_FULL, bytes);
            }
        } else {
            count_drop(drop_kind::CONSOLE_PENDING_FULL);
        }
    }
    Ok(())
}

/// What syscall `nr` (of [`kind`] `kind`) of thread `pid_tgid` needs done when it returns, if
/// anything: a write to a console, an open, a dup. (A close forgets its descriptor here: Linux
/// frees it whatever close returns.)
#[inline(always)]
fn begin(
    nr: i64,
    kind: u32,
    pid_tgid: u64,
    arg: impl Fn(usize) -> Result<u64, i64>,
) -> Result<Option<Pending>, i64> {
    let tgid = (pid_tgid >> 32) as u32;
    let Some(tracked) = TRACKED_PROCESSES.get_ptr(&tgid) else {
        return Ok(None);
    };
    // SAFETY: pointer from a successful lookup.
    let (matcher_id, start) = unsafe { ((*tracked).matcher_id, (*tracked).start_boot_ns) };
    let arg0 = arg(0)?;
    let fd = arg0 as u32;
    let mut pending = Pending {
        nr: nr as u32,
        kind,
        fd,
        stream: console_stream::NONE,
        arg: 0,
        count: 0,
        start_boot_ns: start,
        matcher_id,
        _pad: 0,
    };
    match kind {
        kind::WRITE | kind::WRITEV => {
            pending.stream = stream_of(tgid, fd, start);
            if pending.stream == console_stream::NONE {
                return Ok(None);
            }
            pending.arg = arg(1)?;
            pending.count = arg(2)?;
        }
        kind::OPEN_ARG0 => pending.arg = arg0,
        kind::OPEN_ARG1 => pending.arg = arg(1)?,
        kind::CLOSE => {
            set_stream(tgid, fd, console_stream::NONE, start);
            return Ok(None);
        }
        kind::FCNTL => {
            let cmd = arg(1)?;
            if cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC {
                return Ok(None);
            }
        }
        _ => {}
    }
    Ok(Some(pending))
}

/// Bytes the iovecs of a `writev` ask to write (the first [`CONSOLE_MAX_IOVECS`] of them).
fn iovec_bytes(iov: u64, count: u64) -> u64 {
    let mut sum = 0u64;
    for i in 0..CONSOLE_MAX_IOVECS {
        if u64::from(i) >= count {
            break;
        }
        // SAFETY: a user pointer, read with the checking helper.
        let Ok(vec) = (unsafe { probe_read_user((iov as *const [u64; 2]).add(i as usize)) }) else {
            break;
        };
        sum = sum.saturating_add(vec[1]);
    }
    sum
}

/// Syscall `nr` returns `ret`. Cheap when nothing is pending: one hash lookup (after a
/// comparison of the number).
#[inline(always)]
fn on_exit(nr: i64, ret: i64) -> Result<(), i64> {
    if classify(nr, &SYSCALLS.load()).is_none() {
        return Ok(());
    }
    let pid_tgid = bpf_get_current_pid_tgid();
    let Some(pending) = CONSOLE_PENDING.get_ptr(&pid_tgid) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup; copied before the entry is removed.
    let pending = unsafe { *pending };
    let _ = CONSOLE_PENDING.remove(&pid_tgid);
    if i64::from(pending.nr) != nr {
        return Ok(());
    }
    complete(pid_tgid, &pending, ret);
    Ok(())
}

/// The syscall `pending` describes returned `ret`: send what a write accepted, give an opened
/// or duplicated descriptor its role.
#[inline(always)]
fn complete(pid_tgid: u64, pending: &Pending, ret: i64) {
    if ret < 0 {
        return;
    }
    let tgid = (pid_tgid >> 32) as u32;
    match pending.kind {
        kind::WRITE | kind::WRITEV if ret > 0 => capture(tgid, pending, ret as u64),
        kind::OPEN_ARG0 | kind::OPEN_ARG1 => {
            let stream = if opened_console(pending) {
                console_stream::CONSOLE
            } else {
                console_stream::NONE
            };
            set_stream(tgid, ret as u32, stream, pending.start_boot_ns);
        }
        kind::DUP | kind::FCNTL => {
            let stream = stream_of(tgid, pending.fd, pending.start_boot_ns);
            set_stream(tgid, ret as u32, stream, pending.start_boot_ns);
        }
        _ => {}
    }
}

/// `fexit` on a syscall's handler, `long __<arch>_sys_<name>(const struct pt_regs *regs)`,
/// where the kernel allows it: one program sees the arguments (in `regs`, as the task entered)
/// and the return value at once, so nothing is stashed per thread, and attaching puts no task
/// on the syscall-tracing slow path (only the handler's own calls pass through its
/// trampoline). `nr` is the syscall's number on this architecture; `kind` is a constant of each
/// program, so each one holds only its own syscall's path (and the verifier walks only that).
#[inline(always)]
fn on_fexit(ctx: &FExitContext, nr: u32, kind: u32) {
    let pid_tgid = bpf_get_current_pid_tgid();
    if !may_be_tracked((pid_tgid >> 32) as u32) || nr == SYSCALL_NONE {
        return;
    }
    let regs: *const u8 = ctx.arg(0);
    // The return value follows the handler's one argument.
    let ret: i64 = ctx.arg(1);
    let read = |i| read_at::<u64>(regs, syscall_arg_offset(i));
    if let Ok(Some(pending)) = begin(i64::from(nr), kind, pid_tgid, read) {
        complete(pid_tgid, &pending, ret);
    }
}

/// One `fexit` program per followed syscall (userspace loads each on its handler, named by
/// the program's suffix: `console_fexit_write` on `__x64_sys_write`).
macro_rules! fexit_programs {
    ($($program:ident => $syscall:ident: $kind:ident),* $(,)?) => {$(
        #[fexit]
        pub(crate) fn $program(ctx: FExitContext) -> i32 {
            on_fexit(&ctx, SYSCALLS.load().$syscall, kind::$kind);
            0
        }
    )*};
}

// The kinds are those `classify` gives each syscall's number.
fexit_programs! {
    console_fexit_write => write: WRITE,
    console_fexit_pwrite64 => pwrite64: WRITE,
    console_fexit_writev => writev: WRITEV,
    console_fexit_pwritev => pwritev: WRITEV,
    console_fexit_pwritev2 => pwritev2: WRITEV,
    console_fexit_open => open: OPEN_ARG0,
    console_fexit_creat => creat: OPEN_ARG0,
    console_fexit_openat => openat: OPEN_ARG1,
    console_fexit_close => close: CLOSE,
    console_fexit_dup => dup: DUP,
    console_fexit_dup2 => dup2: DUP,
    console_fexit_dup3 => dup3: DUP,
    console_fexit_fcntl => fcntl: FCNTL,
}

fn scratch() -> Option<*mut Scratch> {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    CONSOLE_SCRATCH.get_ptr_mut(cpu)
}

/// Sends the `total` bytes a write accepted (the first [`CONSOLE_MAX_WRITE`] of them), or
/// counts them lost: over the process's budget before they take ring space, or the ring full.
fn capture(tgid: u32, pending: &Pending, total: u64) {
    let max = CONSOLE_MAX_WRITE as u64;
    let want = if total > max { max } else { total };
    let proc = console_proc(tgid, pending.start_boot_ns);
    if let Some(proc) = proc
        && !take_budget(proc, want + CONSOLE_RECORD_OVERHEAD)
    {
        lose(proc, pending.stream, console_loss::OVER_BUDGET, total);
        return;
    }
    let mut header = ConsoleRecordHeader {
        tgid,
        fd: pending.fd,
        stream: pending.stream,
        len: 0,
        total,
        boot_ns: 0,
        lost_bytes: 0,
        lost_writes: 0,
        lost_cause: 0,
        _pad: 0,
    };
    let sent = if pending.kind == kind::WRITE {
        send_write(&mut header, proc, pending.arg, want)
    } else {
        send_writev(&mut header, proc, pending, want)
    };
    if !sent {
        match proc {
            Some(proc) => lose(proc, pending.stream, console_loss::RING, total),
            None => count_drop(drop_kind::CONSOLE_PROC_MAP_FULL),
        }
    }
}

/// Completes `header` with the time and the stream's loss totals, read now: the record is
/// about to take its place on the ring, after every loss counted so far.
#[inline(always)]
fn stamp(header: &mut ConsoleRecordHeader, proc: Option<*mut ConsoleProc>) {
    // SAFETY: plain helper call.
    header.boot_ns = unsafe { bpf_ktime_get_boot_ns() };
    if let Some(proc) = proc {
        let s = header.stream as usize & (CONSOLE_SLOTS - 1);
        // SAFETY: a map value from a successful lookup; index masked inside the arrays.
        unsafe {
            header.lost_bytes = read_volatile(&raw const (*proc).lost_bytes[s]);
            header.lost_writes = read_volatile(&raw const (*proc).lost_writes[s]);
            header.lost_cause = read_volatile(&raw const (*proc).last_cause[s]);
        }
    }
}

/// A record of a size class: the header and room for `N` bytes.
#[repr(C)]
struct Record<const N: usize> {
    header: ConsoleRecordHeader,
    data: [u8; N],
}

/// Sends the first `want` bytes at user address `buf` (1 <= want <= [`CONSOLE_MAX_WRITE`]) in
/// one copy: reserved on the ring in the smallest size class that holds them, read from the
/// writer's memory straight into the reservation. False when the ring is full.
#[inline(always)]
fn send_write(
    header: &mut ConsoleRecordHeader,
    proc: Option<*mut ConsoleProc>,
    buf: u64,
    want: u64,
) -> bool {
    macro_rules! classes {
        ($($n:literal)*) => {
            $(if want <= $n {
                return send_class::<$n>(header, proc, buf, want);
            })*
        };
    }
    classes!(64 128 256 512 1024 2048 4096 8192 16384 32768);
    send_class::<65536>(header, proc, buf, want)
}

#[inline(always)]
fn send_class<const N: usize>(
    header: &mut ConsoleRecordHeader,
    proc: Option<*mut ConsoleProc>,
    buf: u64,
    want: u64,
) -> bool {
    let Some(mut entry) = CONSOLE_EVENTS.reserve::<Record<N>>(0) else {
        return false;
    };
    let record = entry.as_mut_ptr();
    // Bounded again where the verifier sees it: at most the class. `want <= N` is known to
    // LLVM from the class choice, so without the barrier it drops this clamp and passes the
    // length as it was spilled before that choice (compared there through another register,
    // `total`). Verifiers from 5.11 carry that comparison over to the spilled copy; 5.10's does
    // not, sees up to CONSOLE_MAX_WRITE bytes into a smaller class, and refuses the program.
    let want = opaque(want);
    let len = if want > N as u64 { N as u64 } else { want };
    stamp(header, proc);
    // SAFETY: `record` is an exclusive reservation of size_of::<Record<N>>() bytes; the copy
    // fills at most `N` bytes of its data; the header is written whole before submit.
    unsafe {
        let copied = bpf_probe_read_user(
            (*record).data.as_mut_ptr().cast(),
            len as u32,
            buf as *const _,
        );
        // A buffer the kernel could not read (paged out): the bytes are cut, and say so.
        header.len = if copied == 0 { len as u32 } else { 0 };
        (*record).header = *header;
    }
    // The reservation is in the ring's unread data already; `stamp` read the clock.
    let unread = CONSOLE_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA));
    let flags = wakeup_flags(
        unread,
        ring_bytes(size_of::<Record<N>>() as u64),
        header.boot_ns,
    );
    entry.submit(flags);
    true
}

/// Bytes a record of `size` bytes takes on the ring: its 8-byte header, rounded up to 8.
#[inline(always)]
const fn ring_bytes(size: u64) -> u64 {
    (size + 8).next_multiple_of(8)
}

/// Whether a record that brings the ring's unread data to `unread` bytes (`own` of them its
/// own), stamped at boot time `now`, wakes the reader when committed. A wake-up (an
/// irq_work on this CPU, then the reader's wake-up) costs the writing thread more than the copy
/// of its bytes, and the kernel's own rule wakes the reader for every record it had caught up
/// with: at a modest rate, nearly every write. Here a record wakes it when
///
/// - it takes the unread data across [`ConsoleLimits::wakeup_bytes`] (a burst: read it now), or
/// - it finds the ring read to the end and no record woke the reader for
///   [`ConsoleLimits::wakeup_interval_ns`] (the first output after a quiet spell is read at once).
///
/// The reader polls the ring for twice that interval after each wake-up, so the records in
/// between are read by one of its polls. Two CPUs' records that race across the mark may each
/// see the other's bytes below it; the polls read them too.
#[inline(always)]
fn wakeup_flags(unread: u64, own: u64, now: u64) -> u64 {
    let mark = read_offset64(&CONSOLE_LIMITS.wakeup_bytes);
    if mark == 0 {
        return 0;
    }
    let before = unread.saturating_sub(own);
    let crossing = unread >= mark && before < mark;
    let Some(last) = CONSOLE_WAKE.get_ptr_mut(0) else {
        return 0;
    };
    // SAFETY: the map's one slot; a racing write from another CPU is at worst one more wake-up.
    let quiet = before == 0
        && now.saturating_sub(unsafe { read_volatile(last) })
            >= read_offset64(&CONSOLE_LIMITS.wakeup_interval_ns);
    if crossing || quiet {
        // SAFETY: as above.
        unsafe { write_volatile(last, now) };
        u64::from(BPF_RB_FORCE_WAKEUP)
    } else {
        u64::from(BPF_RB_NO_WAKEUP)
    }
}

/// `value`, unknown to LLVM afterwards (an `asm!` move of its register onto itself): a bound
/// checked on the result stays in the code, on the register that carries it on, so the
/// verifier sees the check on the value it is about to pass. One instruction: an empty `asm!`
/// would do for LLVM, but its line-info entry would share the next instruction's offset, which
/// the kernel refuses ("Invalid line_info[..].insn_off").
#[inline(always)]
fn opaque(mut value: u64) -> u64 {
    // SAFETY: `rN = rN`: reads and writes only `value`'s register.
    unsafe { core::arch::asm!("{0} = {0}", inout(reg) value, options(nomem, nostack)) };
    value
}

/// Sends the first `want` bytes of a `writev`'s iovecs, assembled in this CPU's scratch record.
fn send_writev(
    header: &mut ConsoleRecordHeader,
    proc: Option<*mut ConsoleProc>,
    pending: &Pending,
    want: u64,
) -> bool {
    let Some(scratch) = scratch() else {
        return false;
    };
    let max = CONSOLE_MAX_WRITE as u64;
    // SAFETY: `scratch` is this CPU's slot; the programs run with migration off and do not
    // nest on a CPU.
    let captured = unsafe { copy_iovecs(scratch, pending.arg, pending.count, want) };
    // Re-bounded for the verifier (it cannot follow the sum over iovecs).
    let captured = captured & (2 * max - 1);
    let captured = if captured > max { max } else { captured };
    header.len = captured as u32;
    stamp(header, proc);
    // SAFETY: as above; the record is the header and `captured` bytes of `data`.
    unsafe {
        (*scratch).header = *header;
        let size = size_of::<ConsoleRecordHeader>() as u64 + captured;
        let own = ring_bytes(size);
        // Not reserved yet: the unread data as it will be once this record is in.
        let unread = CONSOLE_EVENTS.query(u64::from(BPF_RB_AVAIL_DATA)) + own;
        let flags = wakeup_flags(unread, own, header.boot_ns);
        let ring = core::ptr::from_ref(&CONSOLE_EVENTS).cast_mut().cast();
        bpf_ringbuf_output(ring, scratch.cast(), size, flags) == 0
    }
}

/// Copies the first `want` bytes of a `writev`'s iovecs into the scratch record's data;
/// returns how many.
///
/// The running offset lives in the scratch record (`header.total`), not in a register: loaded
/// back from memory it is an unknown scalar to the verifier, bounded again by one comparison,
/// so every iteration looks alike and the verifier's states converge instead of multiplying.
///
/// # Safety
/// `scratch` must point at this CPU's scratch slot.
#[inline(always)]
unsafe fn copy_iovecs(scratch: *mut Scratch, iov: u64, count: u64, want: u64) -> u64 {
    let max = CONSOLE_MAX_WRITE as u64;
    // SAFETY: `scratch` is valid (the caller's contract); every copy starts below
    // `CONSOLE_MAX_WRITE` in `data` and is at most `CONSOLE_MAX_WRITE` long, and `data` is twice
    // that.
    unsafe {
        let done_at = &raw mut (*scratch).header.total;
        write_volatile(done_at, 0);
        for i in 0..CONSOLE_MAX_IOVECS {
            let done = read_volatile(done_at);
            if u64::from(i) >= count || done >= want || done >= max {
                break;
            }
            let Ok(vec) = probe_read_user((iov as *const [u64; 2]).add(i as usize)) else {
                break;
            };
            let left = want - done;
            let mut len = if vec[1] > left { left } else { vec[1] };
            if len > max {
                len = max;
            }
            let dst = (*scratch)
                .data
                .as_mut_ptr()
                .add((done & (max - 1)) as usize);
            if bpf_probe_read_user(dst.cast(), len as u32, vec[0] as *const _) != 0 {
                break;
            }
            write_volatile(done_at, done + len);
        }
        read_volatile(done_at)
    }
}

/// Does the path the pending open named end with a console-file rule of its matcher?
fn opened_console(pending: &Pending) -> bool {
    let Some(scratch) = scratch() else {
        return false;
    };
    // SAFETY: this CPU's slot (see `capture`); the path fills at most PATH_LEN bytes of it.
    let read = unsafe {
        bpf_probe_read_user_str(
            (*scratch).data.as_mut_ptr().cast(),
            PATH_LEN as u32,
            pending.arg as *const _,
        )
    };
    if read <= 1 {
        return false;
    }
    // Length without the NUL.
    let len = (read - 1) as u64 & (PATH_LEN as u64 - 1);
    for index in 0..CONSOLE_MAX_RULES {
        let Some(rule) = CONSOLE_RULES.get_ptr(index) else {
            return false;
        };
        // SAFETY: pointer from a successful lookup.
        let rule = unsafe { &*rule };
        if rule.len == 0 {
            return false;
        }
        // SAFETY: `scratch` as above.
        if rule.matcher_id == pending.matcher_id && unsafe { ends_with(scratch, len, rule) } {
            return true;
        }
    }
    false
}

/// Whether the path of `len` bytes in `scratch` ends with `rule`'s suffix (or, for a suffix
/// starting with `/`, is the name after that slash).
///
/// # Safety
/// `scratch` must point at this CPU's scratch slot.
#[inline(always)]
unsafe fn ends_with(scratch: *mut Scratch, len: u64, rule: &ConsoleRule) -> bool {
    let suffix_len = u64::from(rule.len) & (CONSOLE_RULE_LEN as u64 - 1);
    let skip = if len >= suffix_len {
        0
    } else if len + 1 == suffix_len && rule.suffix[0] == b'/' {
        1
    } else {
        return false;
    };
    // Path index of suffix byte j: len - suffix_len + j (j >= skip).
    let base = len + skip;
    for j in 0..CONSOLE_RULE_LEN as u64 {
        if j >= suffix_len {
            return true;
        }
        if j < skip {
            continue;
        }
        let at = (base + j - suffix_len) & (PATH_LEN as u64 - 1);
        // SAFETY: `at` is masked inside the first PATH_LEN bytes of `data`.
        let byte = unsafe { *(*scratch).data.as_ptr().add(at as usize) };
        if byte != rule.suffix[j as usize] {
            return false;
        }
    }
    true
}
