//! Maps and read-only settings shared by the programs. Userspace finds them by these names.

use aya_ebpf::{
    Global,
    macros::map,
    maps::{HashMap, LpmTrie, PerCpuArray, RingBuf},
};
use collector_common::{
    CommKey, DEFAULT_MAX_TRACKED_PROCESSES, ExecMatch, KernelOffsets, TrackedProcess, drop_kind,
};

/// Kernel struct offsets from the running kernel's BTF, set by the collector at load time.
#[unsafe(no_mangle)]
pub static OFFSETS: Global<KernelOffsets> = Global::new(KernelOffsets {
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
});

/// `comm` prefixes of the executables the matchers claim (see [`CommKey`]).
#[map]
pub static EXEC_MATCHERS: LpmTrie<CommKey, ExecMatch> = LpmTrie::with_max_entries(256, 0);

/// Processes being followed, by thread-group id. Written by the exec program (candidates), by
/// userspace (confirmations, processes found at start-up) and emptied by the exit program.
#[map]
pub static TRACKED_PROCESSES: HashMap<u32, TrackedProcess> =
    HashMap::with_max_entries(DEFAULT_MAX_TRACKED_PROCESSES, 0);

/// Lifecycle records to userspace (exec, exit). Low volume; never shared with console bytes or
/// other high-volume data so a burst there cannot cost a lifecycle event. Size set by config.
#[map]
pub static PROCESS_EVENTS: RingBuf = RingBuf::with_byte_size(256 * 1024, 0);

/// What the kernel side gave up, by [`drop_kind`].
#[map]
pub static DROPS: PerCpuArray<u64> = PerCpuArray::with_max_entries(drop_kind::COUNT, 0);

/// Counts one drop of `kind`.
#[inline(always)]
pub fn count_drop(kind: u32) {
    if let Some(counter) = DROPS.get_ptr_mut(kind) {
        // SAFETY: per-CPU slot; programs do not preempt each other on one CPU for these hooks.
        unsafe { *counter += 1 };
    }
}
