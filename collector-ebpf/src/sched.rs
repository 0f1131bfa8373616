//! Scheduling of the threads of followed processes: run-queue latency, CPU time and context
//! switches, aggregated here per (process, thread class). Nothing goes to userspace per event.
//!
//! Membership: a thread is looked at only if it is in [`SCHED_THREADS`]. Entries are made when a
//! followed process execs (its one thread), when it creates a thread (`sched_wakeup_new`), when
//! one of its threads is renamed (`task_rename`), and by userspace for processes found running;
//! a thread's entry goes with its last switch (`TASK_DEAD`), a process's aggregates with its
//! last thread (`sched_process_exit`).
//!
//! Thread class: the new name at `task_rename` (or the inherited one at creation) is looked up in
//! [`SCHED_VCPU_COMMS`], the literal prefixes of the matcher's vCPU pattern.
//!
//! Cost on the untracked path (every other context switch of the host): one per-CPU array
//! lookup (is the task leaving this CPU followed?), one load of `next->pid` and one array lookup
//! ([`SCHED_THREAD_FILTER`]: are there followed threads with ids like this one?), all three
//! inlined by the verifier on current kernels: no helper call, no hash. The hash lookup is only
//! for threads that pass the filter.

use aya_ebpf::{
    helpers::{
        bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task, bpf_ktime_get_ns},
    },
    macros::{btf_tracepoint, map},
    maps::{Array, HashMap, LpmTrie, PerCpuArray, lpm_trie::Key},
    programs::BtfTracePointContext,
};
use collector_common::{
    COMM_LEN, CommKey, DEFAULT_MAX_TRACKED_PROCESSES, DEFAULT_MAX_TRACKED_THREADS,
    SCHED_FILTER_SLOTS, SCHED_RUNTIME_UNKNOWN, SchedKey, SchedStats, SchedThread, VcpuCommKey,
    drop_kind, latency_bucket, sched_filter_slot, thread_class,
};

use crate::{
    kernel::{load_at, read_at},
    maps::{TRACKED_PROCESSES, count_drop, offset},
};

/// Threads of followed processes, by thread id.
#[map]
pub(crate) static SCHED_THREADS: HashMap<u32, SchedThread> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_THREADS, 0);

/// For each slot `tid % SCHED_FILTER_SLOTS`, how many [`SCHED_THREADS`] entries have their
/// thread id there, counting an insert from just before it is tried and a removal from just
/// after it succeeded: never fewer than there are. A zero means "not followed" for sure, for the
/// price of an inlined array load instead of a hash lookup; a non-zero slot (another followed
/// thread with the same low bits) only costs that lookup. Whoever inserts or removes an entry
/// counts it, with an atomic add: the programs here, and userspace through its memory map of the
/// array (`BPF_F_MMAPABLE`, kernels >= 5.5), so the two never overwrite each other's counts.
#[map]
pub(crate) static SCHED_THREAD_FILTER: Array<u64> =
    Array::with_max_entries(SCHED_FILTER_SLOTS, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE`
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Aggregates per (process, thread class). Two per followed process; sized by userspace.
#[map]
pub(crate) static SCHED_STATS: HashMap<SchedKey, SchedStats> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_PROCESSES * thread_class::COUNT, 0);

/// Literal prefixes of each matcher's vCPU thread-name pattern, set by userspace at load.
#[map]
pub(crate) static SCHED_VCPU_COMMS: LpmTrie<VcpuCommKey, u32> = LpmTrie::with_max_entries(256, 0);

/// The followed thread running on this CPU, if any: the `prev` of this CPU's next switch.
#[repr(C)]
#[derive(Clone, Copy)]
pub(crate) struct OnCpu {
    /// `task_struct` address; 0 when the running task is not followed.
    task: u64,
    tid: u32,
    _pad: u32,
}

#[map]
static SCHED_ON_CPU: PerCpuArray<OnCpu> = PerCpuArray::with_max_entries(1, 0);

/// `TASK_RUNNING`: still runnable when it leaves the CPU (preempted or yielding).
const TASK_RUNNING: u64 = 0;
/// `TASK_DEAD`: the last switch of an exiting thread.
const TASK_DEAD: u64 = 0x80;
/// `BPF_NOEXIST`
const NOEXIST: u64 = 1;
/// `BPF_EXIST`
const EXIST: u64 = 2;
/// `-EEXIST`, as map helpers return it.
const ERR_EXIST: i32 = -17;

/// `sched_switch(bool preempt, struct task_struct *prev, struct task_struct *next[, ...])`.
/// Only the first three arguments exist on every kernel since 5.10; prev's state is read from
/// the task.
#[btf_tracepoint(function = "sched_switch")]
pub(crate) fn sched_switch(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_switch(&ctx);
    0
}

fn try_sched_switch(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let on_cpu = SCHED_ON_CPU.get_ptr_mut(0).ok_or(0)?;
    let prev: *const u8 = ctx.arg(1);
    let next: *const u8 = ctx.arg(2);
    // SAFETY: per-CPU slot, only touched by this program on this CPU with preemption off.
    let (was_task, was_tid) = unsafe { ((*on_cpu).task, (*on_cpu).tid) };
    if was_task != 0 {
        // SAFETY: as above.
        unsafe { (*on_cpu).task = 0 };
        if was_task == prev as u64 {
            let preempt: u64 = ctx.arg(0);
            let _ = switch_out(prev, was_tid, preempt != 0);
        }
    }
    // SAFETY: `next` is the tracepoint's `struct task_struct *`, `task_pid` its `pid`.
    let tid: u32 = unsafe { load_at(next, offset!(task_pid)) };
    if !may_be_followed(tid) {
        return Ok(());
    }
    let Some(thread) = SCHED_THREADS.get_ptr_mut(&tid) else {
        return Ok(());
    };
    switch_in(next, thread);
    // SAFETY: as above.
    unsafe {
        (*on_cpu).task = next as u64;
        (*on_cpu).tid = tid;
    }
    Ok(())
}

/// A followed thread leaves the CPU: account its CPU time, count the switch, and start its wait
/// if it is still runnable (as the kernel's own `sched_info` does).
fn switch_out(prev: *const u8, tid: u32, preempt: bool) -> Result<(), i64> {
    let thread = SCHED_THREADS.get_ptr_mut(&tid).ok_or(0)?;
    // SAFETY: `prev` is the tracepoint's `struct task_struct *`; `task_state` is its
    // `__state` (4 bytes) or `state` (8 bytes, before 5.14), as `task_state_size` says (a
    // constant to the verifier, which drops the other branch).
    let state = unsafe {
        if offset!(task_state_size) == 8 {
            load_at::<u64>(prev, offset!(task_state))
        } else {
            u64::from(load_at::<u32>(prev, offset!(task_state)))
        }
    };
    // SAFETY: as above; `task_sum_exec_runtime` is its `se.sum_exec_runtime`.
    let runtime: u64 = unsafe { load_at(prev, offset!(task_sum_exec_runtime)) };
    // SAFETY: pointer from a successful lookup; only the thread's own switches and wakeups write
    // it, and the kernel serialises those through the run queue lock.
    let (key, cpu_ns) = unsafe {
        let t = &mut *thread;
        let cpu_ns = if t.runtime_ns == SCHED_RUNTIME_UNKNOWN {
            0
        } else {
            runtime.saturating_sub(t.runtime_ns)
        };
        t.runtime_ns = runtime;
        t.queued_ns = if state == TASK_RUNNING {
            // SAFETY: plain helper call.
            bpf_ktime_get_ns()
        } else {
            0
        };
        (
            SchedKey {
                tgid: t.tgid,
                class: t.class,
            },
            cpu_ns,
        )
    };
    let dead = state & TASK_DEAD != 0;
    if let Some(stats) = stats_for(&key) {
        // SAFETY: pointer from a successful lookup; fields updated with atomic adds.
        unsafe {
            add(&raw mut (*stats).cpu_ns, cpu_ns);
            // A thread's last switch is its end, not a context switch.
            if !dead {
                let counter = if preempt || state == TASK_RUNNING {
                    &raw mut (*stats).involuntary
                } else {
                    &raw mut (*stats).voluntary
                };
                add(counter, 1);
            }
        }
    }
    if dead && SCHED_THREADS.remove(&tid).is_ok() {
        count_in_filter(tid, u64::MAX);
    }
    Ok(())
}

/// A followed thread gets the CPU: its wait, if it was waiting, ends now.
fn switch_in(next: *const u8, thread: *mut SchedThread) {
    // SAFETY: pointer from a successful lookup (see `switch_out`).
    let t = unsafe { &mut *thread };
    if t.queued_ns != 0 {
        // SAFETY: plain helper call.
        let wait = unsafe { bpf_ktime_get_ns() }.saturating_sub(t.queued_ns);
        t.queued_ns = 0;
        let key = SchedKey {
            tgid: t.tgid,
            class: t.class,
        };
        if let Some(stats) = stats_for(&key) {
            let bucket = latency_bucket(wait);
            // SAFETY: pointer from a successful lookup; atomic adds.
            unsafe {
                if let Some(slot) = (*stats).latency_buckets.get_mut(bucket) {
                    add(slot, 1);
                }
                add(&raw mut (*stats).latency_sum_ns, wait);
            }
        }
    }
    if t.runtime_ns == SCHED_RUNTIME_UNKNOWN {
        // SAFETY: `next` is the tracepoint's task, the offset its `se.sum_exec_runtime`.
        t.runtime_ns = unsafe { load_at(next, offset!(task_sum_exec_runtime)) };
    }
}

/// `sched_wakeup(struct task_struct *p)`: `p` is on a run queue now.
#[btf_tracepoint(function = "sched_wakeup")]
pub(crate) fn sched_wakeup(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_wakeup(&ctx);
    0
}

fn try_sched_wakeup(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: *const u8 = ctx.arg(0);
    // SAFETY: `task` is the tracepoint's `struct task_struct *`, `task_pid` its `pid`.
    let tid: u32 = unsafe { load_at(task, offset!(task_pid)) };
    if !may_be_followed(tid) {
        return Ok(());
    }
    let Some(thread) = SCHED_THREADS.get_ptr_mut(&tid) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup. A wait already running (preempted, then woken)
    // keeps its start, as in the kernel's `sched_info_enqueue`.
    unsafe {
        if (*thread).queued_ns == 0 {
            (*thread).queued_ns = bpf_ktime_get_ns();
        }
    }
    Ok(())
}

/// `sched_wakeup_new(struct task_struct *p)`: a new thread or process is runnable for the first
/// time. A new thread of a followed process is followed from here.
#[btf_tracepoint(function = "sched_wakeup_new")]
pub(crate) fn sched_wakeup_new(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_wakeup_new(&ctx);
    0
}

/// A task of a followed process: (tgid, tid, matcher id), or `None` for any other task.
///
/// `task` must be a `struct task_struct *` argument of the tracepoint (see [`load_at`]).
#[inline(always)]
fn followed_task(task: *const u8) -> Option<(u32, u32, u32)> {
    // SAFETY: `task` is the tracepoint's `struct task_struct *`, `task_tgid` its `tgid`.
    let tgid: u32 = unsafe { load_at(task, offset!(task_tgid)) };
    let tracked = TRACKED_PROCESSES.get_ptr(&tgid)?;
    // SAFETY: pointer from a successful lookup.
    let matcher_id = unsafe { (*tracked).matcher_id };
    // SAFETY: as above, `task_pid` is its `pid`.
    let tid: u32 = unsafe { load_at(task, offset!(task_pid)) };
    Some((tgid, tid, matcher_id))
}

fn try_sched_wakeup_new(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: *const u8 = ctx.arg(0);
    let Some((tgid, tid, matcher_id)) = followed_task(task) else {
        return Ok(());
    };
    let comm = read_at::<CommKey>(task, offset!(task_comm)).unwrap_or([0; COMM_LEN]);
    let thread = SchedThread {
        tgid,
        class: classify(matcher_id, comm),
        // SAFETY: plain helper call.
        queued_ns: unsafe { bpf_ktime_get_ns() },
        // A new task starts with no CPU time.
        runtime_ns: 0,
    };
    insert_thread(tid, &thread);
    Ok(())
}

/// `task_rename(struct task_struct *task, const char *comm)`: a thread got its name (vCPU
/// threads are named right after they start).
#[btf_tracepoint(function = "task_rename")]
pub(crate) fn task_rename(ctx: BtfTracePointContext) -> i32 {
    let _ = try_task_rename(&ctx);
    0
}

fn try_task_rename(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let task: *const u8 = ctx.arg(0);
    let Some((tgid, tid, matcher_id)) = followed_task(task) else {
        return Ok(());
    };
    let new_name: *const u8 = ctx.arg(1);
    let mut comm = [0u8; COMM_LEN];
    // SAFETY: the helper checks the address and bounds the copy by the buffer.
    unsafe { bpf_probe_read_kernel_str_bytes(new_name, &mut comm) }.map_err(i64::from)?;
    let class = classify(matcher_id, comm);
    // SAFETY: plain helper call.
    if task as u64 == unsafe { bpf_get_current_task() } {
        mark_on_cpu(tid);
    }
    match SCHED_THREADS.get_ptr_mut(&tid) {
        // SAFETY: pointer from a successful lookup.
        Some(thread) => unsafe { (*thread).class = class },
        None => insert_thread(
            tid,
            &SchedThread {
                tgid,
                class,
                queued_ns: 0,
                runtime_ns: SCHED_RUNTIME_UNKNOWN,
            },
        ),
    }
    Ok(())
}

/// Called by the exec program once it follows the current task's process: the exec'ing thread
/// (now the only one) is followed from here, and is the task running on this CPU.
#[inline(always)]
pub(crate) fn follow_exec(tgid: u32, tid: u32, matcher_id: u32, comm: CommKey) {
    // SAFETY: plain helper call; the current task is valid while it runs.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let runtime =
        read_at::<u64>(task, offset!(task_sum_exec_runtime)).unwrap_or(SCHED_RUNTIME_UNKNOWN);
    let thread = SchedThread {
        tgid,
        class: classify(matcher_id, comm),
        queued_ns: 0,
        runtime_ns: runtime,
    };
    insert_thread(tid, &thread);
    mark_on_cpu(tid);
}

/// Called by the exit program for each exiting thread of a followed process: its final switch
/// (`TASK_DEAD`), the next one on this CPU, must be seen to free its entry, even if the thread
/// started being followed while it ran.
#[inline(always)]
pub(crate) fn follow_exit(tid: u32) {
    if SCHED_THREADS.get_ptr(&tid).is_some() {
        mark_on_cpu(tid);
    }
}

/// Records that the current task, followed as `tid`, runs on this CPU.
#[inline(always)]
fn mark_on_cpu(tid: u32) {
    if let Some(on_cpu) = SCHED_ON_CPU.get_ptr_mut(0) {
        // SAFETY: per-CPU slot; programs run with preemption off. Plain helper call.
        unsafe {
            (*on_cpu).task = bpf_get_current_task();
            (*on_cpu).tid = tid;
        }
    }
}

/// Called when a process stops being followed (its last thread exits, or it exec'd something
/// that is not a VMM): its aggregates go. Userspace removes what is left of its threads.
#[inline(always)]
pub(crate) fn forget_process(tgid: u32) {
    for class in [thread_class::VMM, thread_class::VCPU] {
        let _ = SCHED_STATS.remove(&SchedKey { tgid, class });
    }
}

/// Follows `tid`, or updates its entry. A new entry is counted in [`SCHED_THREAD_FILTER`]
/// before it exists.
fn insert_thread(tid: u32, thread: &SchedThread) {
    count_in_filter(tid, 1);
    match SCHED_THREADS.insert(&tid, thread, NOEXIST) {
        Ok(()) => {}
        Err(err) => {
            count_in_filter(tid, u64::MAX);
            if err == ERR_EXIST {
                // Already followed (and counted): update. Not if it went meanwhile.
                let _ = SCHED_THREADS.insert(&tid, thread, EXIST);
            } else {
                count_drop(drop_kind::SCHED_THREAD_MAP_FULL);
            }
        }
    }
}

/// Whether `tid` can be in [`SCHED_THREADS`]: `false` is certain.
#[inline(always)]
fn may_be_followed(tid: u32) -> bool {
    // SAFETY: pointer from a successful lookup; an aligned 8-byte load, atomic.
    SCHED_THREAD_FILTER
        .get_ptr(sched_filter_slot(tid))
        .is_some_and(|count| unsafe { *count } != 0)
}

/// Adds `delta` to `tid`'s slot of [`SCHED_THREAD_FILTER`] (`u64::MAX` takes one away).
#[inline(always)]
fn count_in_filter(tid: u32, delta: u64) {
    if let Some(count) = SCHED_THREAD_FILTER.get_ptr_mut(sched_filter_slot(tid)) {
        add(count, delta);
    }
}

/// vCPU if `comm` starts with one of the matcher's vCPU name prefixes.
#[inline(always)]
fn classify(matcher_id: u32, comm: CommKey) -> u32 {
    let key = Key::new(
        ((4 + COMM_LEN) * 8) as u32,
        VcpuCommKey { matcher_id, comm },
    );
    if SCHED_VCPU_COMMS.get(&key).is_some() {
        thread_class::VCPU
    } else {
        thread_class::VMM
    }
}

/// The aggregates of `key`, created on first use while the process is followed (so that a late
/// event of an exiting process cannot bring back what its exit removed).
#[inline(always)]
fn stats_for(key: &SchedKey) -> Option<*mut SchedStats> {
    if let Some(stats) = SCHED_STATS.get_ptr_mut(key) {
        return Some(stats);
    }
    TRACKED_PROCESSES.get_ptr(&key.tgid)?;
    let zero = SchedStats::default();
    let _ = SCHED_STATS.insert(key, &zero, NOEXIST);
    SCHED_STATS.get_ptr_mut(key)
}

/// `*counter += value`, atomically: other CPUs update the same aggregates. Written as the BPF
/// instruction itself (`BPF_ATOMIC | BPF_ADD`, the old `XADD` every kernel has): core's atomics
/// have no read-modify-write on the BPF target.
#[inline(always)]
pub(crate) fn add(counter: *mut u64, value: u64) {
    // SAFETY: `counter` points into a map value, 8-byte aligned, checked by the verifier.
    unsafe {
        core::arch::asm!(
            "lock *(u64 *)({0} + 0) += {1}",
            in(reg) counter,
            in(reg) value,
            options(nostack),
        );
    }
}
