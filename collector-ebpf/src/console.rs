//! Console capture: the bytes tracked VMMs write to their stdout, stderr and console files.
//!
//! Two programs do the work, one at syscall entry and one at exit, attached to the per-syscall
//! tracepoints (`syscalls/sys_enter_<name>`, `syscalls/sys_exit_<name>`) of the dozen syscalls
//! that matter, so no other syscall on the host runs them. On a kernel without those
//! tracepoints (no `CONFIG_FTRACE_SYSCALLS`) userspace attaches the same logic as `tp_btf`
//! programs on the raw `sys_enter`/`sys_exit` tracepoints instead, which run for every syscall
//! and filter by number. Both pairs only fetch the number and arguments and call [`on_enter`]
//! and [`on_exit`]:
//!
//! - At entry, for a tracked process, the arguments are stashed per thread in
//!   [`CONSOLE_PENDING`]. A write is stashed only when its descriptor is a console (see
//!   [`stream_of`]).
//! - At exit, with the return value: a write sends exactly the bytes the kernel accepted (`ret`,
//!   so a partial write or an `EAGAIN` the VMM retries neither loses nor repeats a byte) to
//!   [`CONSOLE_EVENTS`]; an open whose path ends with a console-file rule of the process's
//!   matcher marks the new descriptor; a dup copies the old descriptor's role to the new one.
//!
//! Descriptors 1 and 2 are stdout and stderr from the exec on, with no map entry, so nothing
//! written before userspace has seen the process is missed; an entry with
//! [`console_stream::NONE`] overrides that after `close(1)` or a `dup2` of another file.

use core::ptr::{read_volatile, write_volatile};

use aya_ebpf::{
    Global,
    helpers::{
        bpf_get_current_pid_tgid, bpf_probe_read_user as probe_read_user,
        generated::{
            bpf_get_smp_processor_id, bpf_ktime_get_boot_ns, bpf_probe_read_user,
            bpf_probe_read_user_str, bpf_ringbuf_output,
        },
    },
    macros::{btf_tracepoint, map, tracepoint},
    maps::{Array, HashMap, LruHashMap, PerCpuHashMap, RingBuf},
    programs::{BtfTracePointContext, TracePointContext},
};
use collector_common::{
    CONSOLE_MAX_IOVECS, CONSOLE_MAX_RULES, CONSOLE_MAX_WRITE, CONSOLE_RULE_LEN, ConsoleFd,
    ConsoleFdKey, ConsoleKernelDrops, ConsoleRecordHeader, ConsoleRule, DEFAULT_MAX_CONSOLE_FDS,
    DEFAULT_MAX_TRACKED_PROCESSES, SYSCALL_NONE, SyscallNumbers, SyscallTpOffsets, console_stream,
    drop_kind,
};

use crate::{
    kernel::read_at,
    maps::{OFFSETS, TRACKED_PROCESSES, count_drop, offset, read_offset},
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

/// Syscalls in flight, by `pid_tgid` of the calling thread: entry stashes, exit consumes. LRU,
/// so a thread that never returns (killed mid-call) cannot leak an entry.
#[map]
static CONSOLE_PENDING: LruHashMap<u64, Pending> = LruHashMap::with_max_entries(4096, 0);

/// Writes the console ring could not take, by tgid (per CPU: no atomics on the hot path).
/// Userspace sums, reads and removes them.
#[map]
static CONSOLE_DROPS: PerCpuHashMap<u32, ConsoleKernelDrops> =
    PerCpuHashMap::with_max_entries(DEFAULT_MAX_TRACKED_PROCESSES, 0);

/// One record under construction per CPU (indexed by CPU number; userspace sizes it). A
/// record is built here and copied to the ring with `bpf_ringbuf_output`, because a ring
/// reservation must have a constant size and a write's length is not. Twice the largest write:
/// the verifier then accepts `data + (offset & mask)` for any offset below the largest write.
#[map]
static CONSOLE_SCRATCH: Array<Scratch> = Array::with_max_entries(1, 0);

const SCRATCH_DATA: usize = 2 * CONSOLE_MAX_WRITE;
/// Bytes of a path compared against the rules (`PATH_MAX`).
const PATH_LEN: usize = 4096;

#[repr(C)]
struct Scratch {
    header: ConsoleRecordHeader,
    data: [u8; SCRATCH_DATA],
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
/// stdout/stderr; others just lose their entry).
#[inline(always)]
fn set_stream(tgid: u32, fd: u32, stream: u32, start: u64) {
    let key = ConsoleFdKey { tgid, fd };
    let implicit = match fd {
        1 => console_stream::STDOUT,
        2 => console_stream::STDERR,
        _ => console_stream::NONE,
    };
    if stream == implicit {
        let _ = CONSOLE_FDS.remove(&key);
        return;
    }
    let value = ConsoleFd {
        stream,
        _pad: 0,
        start_boot_ns: start,
    };
    if CONSOLE_FDS.insert(&key, &value, 0).is_err() {
        count_drop(drop_kind::CONSOLE_FD_MAP_FULL);
    }
}

/// Entry of one of the followed syscalls (`syscalls/sys_enter_<name>`).
#[tracepoint]
pub(crate) fn console_enter(ctx: TracePointContext) -> u32 {
    let _ = try_enter(&ctx);
    0
}

fn try_enter(ctx: &TracePointContext) -> Result<(), i64> {
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
    let regs: *const u8 = ctx.arg(0);
    let _ = on_enter(ctx.arg(1), |i| read_at::<u64>(regs, syscall_arg_offset(i)));
    0
}

/// Fallback: `sys_exit(struct pt_regs *regs, long ret)`, run for every syscall.
#[btf_tracepoint(function = "sys_exit")]
pub(crate) fn console_sys_exit(ctx: BtfTracePointContext) -> i32 {
    let regs: *const u8 = ctx.arg(0);
    if let Ok(nr) = read_at::<i64>(regs, offset!(pt_regs_syscall_nr)) {
        let _ = on_exit(nr, ctx.arg(1));
    }
    0
}

/// Syscall `nr` enters; `arg(i)` reads its argument `i` (0 to 2). Cheap for an untracked
/// process: a comparison of the number (against a dozen constants) and one hash lookup.
#[inline(always)]
fn on_enter(nr: i64, arg: impl Fn(usize) -> Result<u64, i64>) -> Result<(), i64> {
    let Some(kind) = classify(nr, &SYSCALLS.load()) else {
        return Ok(());
    };
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(tracked) = TRACKED_PROCESSES.get_ptr(&tgid) else {
        return Ok(());
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
                return Ok(());
            }
            pending.arg = arg(1)?;
            pending.count = arg(2)?;
        }
        kind::OPEN_ARG0 => pending.arg = arg0,
        kind::OPEN_ARG1 => pending.arg = arg(1)?,
        kind::CLOSE => {
            // Linux frees the descriptor whatever close returns: forget it now.
            set_stream(tgid, fd, console_stream::NONE, start);
            return Ok(());
        }
        kind::FCNTL => {
            let cmd = arg(1)?;
            if cmd != F_DUPFD && cmd != F_DUPFD_CLOEXEC {
                return Ok(());
            }
        }
        _ => {}
    }
    CONSOLE_PENDING
        .insert(&pid_tgid, &pending, 0)
        .map_err(i64::from)
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
    if i64::from(pending.nr) != nr || ret < 0 {
        return Ok(());
    }
    let tgid = (pid_tgid >> 32) as u32;
    match pending.kind {
        kind::WRITE | kind::WRITEV if ret > 0 => capture(tgid, &pending, ret as u64),
        kind::OPEN_ARG0 | kind::OPEN_ARG1 => {
            let stream = if opened_console(&pending) {
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
    Ok(())
}

fn scratch() -> Option<*mut Scratch> {
    // SAFETY: plain helper call.
    let cpu = unsafe { bpf_get_smp_processor_id() };
    CONSOLE_SCRATCH.get_ptr_mut(cpu)
}

/// Sends the `total` bytes a write accepted (the first [`CONSOLE_MAX_WRITE`] of them).
fn capture(tgid: u32, pending: &Pending, total: u64) {
    let Some(scratch) = scratch() else {
        count_lost(tgid, total);
        return;
    };
    let max = CONSOLE_MAX_WRITE as u64;
    let want = if total > max { max } else { total };
    // SAFETY: `scratch` is this CPU's slot; the programs run with migration off and do not
    // nest on a CPU. Every copy stays inside `data` (offsets masked below the largest write,
    // sizes at most the largest write, `data` twice that).
    let captured = unsafe {
        let data = (*scratch).data.as_mut_ptr();
        if pending.kind == kind::WRITE {
            if bpf_probe_read_user(data.cast(), want as u32, pending.arg as *const _) == 0 {
                want
            } else {
                0
            }
        } else {
            copy_iovecs(scratch, pending.arg, pending.count, want)
        }
    };
    // Re-bounded for the verifier (it cannot follow the sum over iovecs).
    let captured = captured & (2 * max - 1);
    let captured = if captured > max { max } else { captured };
    // SAFETY: as above.
    unsafe {
        (*scratch).header = ConsoleRecordHeader {
            tgid,
            fd: pending.fd,
            stream: pending.stream,
            len: captured as u32,
            total,
            boot_ns: bpf_ktime_get_boot_ns(),
        };
        let size = size_of::<ConsoleRecordHeader>() as u64 + captured;
        let ring = core::ptr::from_ref(&CONSOLE_EVENTS).cast_mut().cast();
        if bpf_ringbuf_output(ring, scratch.cast(), size, 0) != 0 {
            count_lost(tgid, total);
        }
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

/// Counts a write of `bytes` the console ring could not take, against its process.
fn count_lost(tgid: u32, bytes: u64) {
    if CONSOLE_DROPS.get_ptr_mut(&tgid).is_none() {
        let _ = CONSOLE_DROPS.insert(&tgid, &ConsoleKernelDrops::default(), 0);
    }
    if let Some(drops) = CONSOLE_DROPS.get_ptr_mut(&tgid) {
        // SAFETY: this CPU's value, from a successful lookup (see `count_drop`).
        unsafe {
            (*drops).bytes += bytes;
            (*drops).writes += 1;
        }
    }
}
