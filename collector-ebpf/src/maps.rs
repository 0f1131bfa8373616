//! Maps and read-only settings shared by the programs. Userspace finds them by these names.

use aya_ebpf::{
    macros::map,
    maps::{Array, HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use collector_common::{
    CommKey, DEFAULT_MAX_TRACKED_PROCESSES, ExecMatch, KernelOffsets, SCHED_FILTER_SLOTS,
    TrackedProcess, drop_kind, sched_filter_slot,
};

/// Kernel struct offsets from the running kernel's BTF, set by the collector at load time
/// (`EbpfLoader::override_global`). Read one field at a time with [`offset!`]: the hot paths
/// need one or two of its 26 fields, and copying the whole struct costs a load per field per
/// event. A plain static rather than `aya_ebpf::Global`, whose `load()` copies it all, so that
/// a field can be addressed directly.
#[unsafe(no_mangle)]
pub(crate) static OFFSETS: KernelOffsets = KernelOffsets {
    task_pid: 0,
    task_tgid: 0,
    task_exit_code: 0,
    task_signal: 0,
    task_mm: 0,
    signal_live: 0,
    signal_group_exit_code: 0,
    signal_flags: 0,
    mm_arg_start: 0,
    mm_arg_end: 0,
    binprm_filename: 0,
    signal_oom_score_adj: 0,
    mm_total_vm: 0,
    mm_rss_anon: 0,
    mm_rss_file: 0,
    mm_rss_shmem: 0,
    mark_victim_has_task: 0,
    task_cgroups: 0,
    css_set_memory_subsys: 0,
    css_cgroup: 0,
    cgroup_kn: 0,
    kernfs_node_id: 0,
    task_state: 0,
    task_state_size: 0,
    task_sum_exec_runtime: 0,
    task_comm: 0,
    pt_regs_syscall_nr: 0,
    pt_regs_args: [0; 3],
};

/// The field `$field` of [`OFFSETS`], as the loader set it.
///
/// A volatile read, so that the compiler neither folds in the zeros the object was built with
/// nor copies more than the one field. `OFFSETS` lives in `.rodata`, which aya loads as a frozen
/// read-only map: the verifier knows the value as a constant (kernels >= 5.2), so pointer
/// arithmetic with it stays checkable and branches on it are pruned at load.
macro_rules! offset {
    ($field:ident) => {
        $crate::maps::read_offset(&$crate::maps::OFFSETS.$field)
    };
}
pub(crate) use offset;

/// See [`offset!`].
#[inline(always)]
pub(crate) fn read_offset(field: &'static u32) -> u32 {
    // SAFETY: a reference to a field of a static: aligned, initialised.
    unsafe { core::ptr::read_volatile(field) }
}

/// `comm` prefixes of the executables the matchers claim (see [`CommKey`]).
#[map]
pub(crate) static EXEC_MATCHERS: LpmTrie<CommKey, ExecMatch> = LpmTrie::with_max_entries(256, 0);

/// Processes being followed, by thread-group id. Written by the exec program (candidates), by
/// userspace (confirmations, processes found at start-up) and emptied by the exit program.
#[map]
pub(crate) static TRACKED_PROCESSES: HashMap<u32, TrackedProcess> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_PROCESSES, 0);

/// For each slot `tgid % SCHED_FILTER_SLOTS`, how many [`TRACKED_PROCESSES`] entries have their
/// tgid there, never fewer (an insert counts just before it is tried, a removal just after it
/// succeeded; the exec and exit programs here, userspace through its memory map, all with
/// atomic adds). A zero tells the console programs that a process is not followed for the
/// price of an inlined array load, before they read anything else: the untracked path of every
/// write on the host.
#[map]
pub(crate) static TRACKED_FILTER: Array<u64> =
    Array::with_max_entries(SCHED_FILTER_SLOTS, BPF_F_MMAPABLE);

/// `BPF_F_MMAPABLE`
const BPF_F_MMAPABLE: u32 = 1 << 10;

/// Whether `tgid` can be in [`TRACKED_PROCESSES`]: `false` is certain.
#[inline(always)]
pub(crate) fn may_be_tracked(tgid: u32) -> bool {
    // SAFETY: pointer from a successful lookup; an aligned 8-byte load, atomic.
    TRACKED_FILTER
        .get_ptr(sched_filter_slot(tgid))
        .is_some_and(|count| unsafe { *count } != 0)
}

/// Adds `delta` to `tgid`'s slot of [`TRACKED_FILTER`] (`u64::MAX` takes one away).
#[inline(always)]
pub(crate) fn count_tracked(tgid: u32, delta: u64) {
    if let Some(count) = TRACKED_FILTER.get_ptr_mut(sched_filter_slot(tgid)) {
        crate::sched::add(count, delta);
    }
}

/// Lifecycle records to userspace (exec, exit, untrack, OOM). Low volume; never shared with
/// console bytes or other high-volume data so a burst there cannot cost a lifecycle event. Size
/// set by config (default 1 MiB: a burst of 1272 exec records).
#[map]
pub(crate) static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(1024 * 1024, 0);

/// What the kernel side gave up, by [`drop_kind`].
#[map]
pub(crate) static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_kind::COUNT, 0);

/// Counts one drop of `kind`.
#[inline(always)]
pub(crate) fn count_drop(kind: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(kind) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU for these hooks.
        unsafe { *counter += 1 };
    }
}
