//! Process lifecycle hooks: which processes are VMMs, from their exec to their last thread's
//! exit.
//!
//! `sched_process_exec` claims a process the moment it execs an executable whose `comm` matches a
//! matcher, before userspace has seen it, so nothing the VMM does in its first microseconds is
//! missed; the event carries the path and the start of the command line so userspace can name
//! the instance even if the process is already gone (the rest of a long line is read from
//! `/proc` while it runs). `sched_process_exit` forgets the process when its last thread
//! exits and reports the exit status.
//!
//! The untracked path (every other exec and exit on the host) is one map lookup.

use aya_ebpf::{
    helpers::{
        bpf_get_current_comm, bpf_get_current_pid_tgid, bpf_probe_read_kernel_str_bytes,
        generated::{bpf_get_current_task, bpf_ktime_get_boot_ns, bpf_probe_read_user},
    },
    macros::btf_tracepoint,
    maps::lpm_trie::Key,
    programs::BtfTracePointContext,
};
use collector_common::{
    COMM_LEN, EXEC_ARGV_LEN, ExecEvent, ExitEvent, OomEvent, ProcessEventHeader,
    TRACKED_OOM_VICTIM, TrackedProcess, drop_kind, process_event_kind,
};

use crate::{
    kernel::read_at,
    maps::{EXEC_MATCHERS, PROCESS_EVENTS, TRACKED_PROCESSES, count_drop, count_tracked, offset},
};

/// `BPF_NOEXIST`
const NOEXIST: u64 = 1;
/// `BPF_EXIST`
const EXIST: u64 = 2;
/// `-EEXIST`, as map helpers return it.
const ERR_EXIST: i32 = -17;

/// `sched_process_exec(struct task_struct *p, pid_t old_pid, struct linux_binprm *bprm)`
#[btf_tracepoint(function = "sched_process_exec")]
pub(crate) fn sched_process_exec(ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_process_exec(&ctx);
    0
}

fn try_sched_process_exec(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let comm = bpf_get_current_comm().map_err(i64::from)?;
    let key = Key::new((COMM_LEN * 8) as u32, comm);
    let Some(matched) = EXEC_MATCHERS.get(&key) else {
        // A followed process that execs something no matcher claims is no longer a VMM.
        if TRACKED_PROCESSES.get_ptr(&tgid).is_some() {
            if TRACKED_PROCESSES.remove(&tgid).is_ok() {
                count_tracked(tgid, u64::MAX);
            }
            crate::sched::forget_process(tgid);
            send_untrack(tgid);
        }
        return Ok(());
    };
    let matcher_id = matched.matcher_id;
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_boot_ns() };
    let tracked = TrackedProcess {
        matcher_id,
        flags: 0,
        start_boot_ns: now,
    };
    // Counted in the filter before it exists; a re-exec of a followed process replaces its
    // entry, counted once.
    count_tracked(tgid, 1);
    if let Err(err) = TRACKED_PROCESSES.insert(&tgid, &tracked, NOEXIST) {
        count_tracked(tgid, u64::MAX);
        if err != ERR_EXIST || TRACKED_PROCESSES.insert(&tgid, &tracked, EXIST).is_err() {
            count_drop(drop_kind::TRACKED_MAP_FULL);
            return Ok(());
        }
    }
    crate::sched::follow_exec(tgid, pid_tgid as u32, matcher_id, comm);

    let Some(mut entry) = PROCESS_EVENTS.reserve::<ExecEvent>(0) else {
        count_drop(drop_kind::EXEC_EVENT_RESERVE);
        return Ok(());
    };
    let event = entry.as_mut_ptr();
    // SAFETY: `event` points at an exclusive reservation of size_of::<ExecEvent>() bytes; every
    // field is written before submit (the byte arrays through helpers that fill or zero them).
    unsafe {
        (*event).header = ProcessEventHeader {
            kind: process_event_kind::EXEC,
            tgid,
            boot_ns: now,
        };
        (*event).matcher_id = matcher_id;
        (*event).pid = pid_tgid as u32;
        (*event).comm = comm;
        (*event).argv_len = 0;
        (*event).argv_total = 0;
        (*event).filename[0] = 0;

        let bprm: *const u8 = ctx.arg(2);
        if let Ok(filename) = read_at::<*const u8>(bprm, offset!(binprm_filename)) {
            let _ = bpf_probe_read_kernel_str_bytes(filename, &mut (*event).filename);
        }

        let task = bpf_get_current_task() as *const u8;
        if let Ok(mm) = read_at::<*const u8>(task, offset!(task_mm)) {
            let start = read_at::<u64>(mm, offset!(mm_arg_start)).unwrap_or(0);
            let end = read_at::<u64>(mm, offset!(mm_arg_end)).unwrap_or(0);
            let total = end.saturating_sub(start);
            (*event).argv_total = total.min(u64::from(u32::MAX)) as u32;
            // A prefix only: userspace reads the rest from /proc while the process runs.
            let len = total.min(EXEC_ARGV_LEN as u64);
            if len > 0
                && bpf_probe_read_user(
                    (*event).argv.as_mut_ptr().cast(),
                    len as u32,
                    start as *const _,
                ) == 0
            {
                (*event).argv_len = len as u32;
            }
        }
    }
    entry.submit(0);
    Ok(())
}

/// `sched_process_exit(struct task_struct *p[, bool group_dead])`: runs in the exiting task.
#[btf_tracepoint(function = "sched_process_exit")]
pub(crate) fn sched_process_exit(_ctx: BtfTracePointContext) -> i32 {
    let _ = try_sched_process_exit();
    0
}

fn try_sched_process_exit() -> Result<(), i64> {
    let pid_tgid = bpf_get_current_pid_tgid();
    let tgid = (pid_tgid >> 32) as u32;
    let Some(tracked) = TRACKED_PROCESSES.get_ptr(&tgid) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup.
    let tracked_flags = unsafe { (*tracked).flags };
    crate::sched::follow_exit(pid_tgid as u32);
    // SAFETY: plain helper call; the current task is valid while it runs.
    let task = unsafe { bpf_get_current_task() } as *const u8;
    let signal = read_at::<*const u8>(task, offset!(task_signal))?;
    // `live` was decremented earlier in do_exit(): zero means this is the group's last thread.
    let live = read_at::<i32>(signal, offset!(signal_live))?;
    if live != 0 {
        return Ok(());
    }
    if TRACKED_PROCESSES.remove(&tgid).is_ok() {
        count_tracked(tgid, u64::MAX);
    }
    crate::sched::forget_process(tgid);

    let event = ExitEvent {
        header: ProcessEventHeader {
            kind: process_event_kind::EXIT,
            tgid,
            // SAFETY: plain helper call.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        exit_code: read_at::<u32>(task, offset!(task_exit_code)).unwrap_or(0),
        group_exit_code: read_at::<u32>(signal, offset!(signal_group_exit_code)).unwrap_or(0),
        signal_flags: read_at::<u32>(signal, offset!(signal_flags)).unwrap_or(0),
        tracked_flags,
    };
    if PROCESS_EVENTS.output(&event, 0).is_err() {
        count_drop(drop_kind::EXIT_EVENT_RESERVE);
    }
    Ok(())
}

fn send_untrack(tgid: u32) {
    let event = ExitEvent {
        header: ProcessEventHeader {
            kind: process_event_kind::UNTRACK,
            tgid,
            // SAFETY: plain helper call.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        ..ExitEvent::default()
    };
    if PROCESS_EVENTS.output(&event, 0).is_err() {
        count_drop(drop_kind::EXIT_EVENT_RESERVE);
    }
}

/// `mark_victim(struct task_struct *task, uid_t uid)` (6.8, and backported: Debian's 6.1.192 has
/// it) or `mark_victim(int pid)` (5.10): the OOM killer chose its victim and has sent it
/// SIGKILL. Runs in the task that hit the OOM, so the victim comes from the argument; "current"
/// stands in only when the pid form names it.
#[btf_tracepoint(function = "mark_victim")]
pub(crate) fn mark_victim(ctx: BtfTracePointContext) -> i32 {
    let _ = try_mark_victim(&ctx);
    0
}

fn try_mark_victim(ctx: &BtfTracePointContext) -> Result<(), i64> {
    let (task, pid, tgid) = if offset!(mark_victim_has_task) != 0 {
        let task: *const u8 = ctx.arg(0);
        // The tgid is the key; the victim's thread id is a detail (the tgid stands in).
        let tgid = read_at::<u32>(task, offset!(task_tgid))?;
        (
            task,
            read_at::<u32>(task, offset!(task_pid)).unwrap_or(tgid),
            tgid,
        )
    } else {
        // Older kernels (5.10) pass the victim's pid only. The OOM killer picks processes by
        // their leader, so pid is the tgid unless the leader had already released its memory.
        let pid = ctx.arg::<i32>(0) as u32;
        // The victim is usually the task that hit the limit (a VMM outgrowing its memory
        // cgroup): then it is "current", and its counters and cgroup are read from there.
        // Otherwise the record carries the pid only (userspace says so: no counters).
        let current_tgid = bpf_get_current_pid_tgid();
        if current_tgid as u32 == pid || (current_tgid >> 32) as u32 == pid {
            // SAFETY: plain helper call; the current task is valid while it runs.
            let task = unsafe { bpf_get_current_task() } as *const u8;
            (task, pid, (current_tgid >> 32) as u32)
        } else {
            (core::ptr::null(), pid, pid)
        }
    };
    let Some(tracked) = TRACKED_PROCESSES.get_ptr_mut(&tgid) else {
        return Ok(());
    };
    // SAFETY: pointer from a successful lookup. Userspace rewrites an exec'd process's entry
    // only to change its matcher; a racing rewrite at worst loses this bit, and the OOM record
    // below still carries the news (userspace classifies on either).
    unsafe { (*tracked).flags |= TRACKED_OOM_VICTIM };

    let mut event = OomEvent {
        header: ProcessEventHeader {
            kind: process_event_kind::OOM_VICTIM,
            tgid,
            // SAFETY: plain helper call.
            boot_ns: unsafe { bpf_ktime_get_boot_ns() },
        },
        pid,
        ..OomEvent::default()
    };
    if !task.is_null()
        && let Ok(mm) = read_at::<*const u8>(task, offset!(task_mm))
        && !mm.is_null()
    {
        let pages = |offset: u32| read_at::<i64>(mm, offset).map_or(0, |v| v.max(0) as u64);
        event.has_counters = 1;
        event.total_vm_pages = read_at::<u64>(mm, offset!(mm_total_vm)).unwrap_or(0);
        event.anon_rss_pages = pages(offset!(mm_rss_anon));
        event.file_rss_pages = pages(offset!(mm_rss_file));
        event.shmem_rss_pages = pages(offset!(mm_rss_shmem));
        event.memcg_id = memcg_id(task).unwrap_or(0);
        // Every read above and here is optional: a failed one leaves its field zero, never
        // costs the record.
        if let Ok(signal) = read_at::<*const u8>(task, offset!(task_signal)) {
            event.oom_score_adj =
                i32::from(read_at::<i16>(signal, offset!(signal_oom_score_adj)).unwrap_or(0));
        }
    }
    if PROCESS_EVENTS.output(&event, 0).is_err() {
        count_drop(drop_kind::OOM_EVENT_RESERVE);
    }
    Ok(())
}

/// Inode number of `task`'s memory cgroup: task->cgroups->subsys[memory]->cgroup->kn->id.
fn memcg_id(task: *const u8) -> Result<u64, i64> {
    if offset!(css_set_memory_subsys) == 0 {
        return Ok(0);
    }
    let css_set = read_at::<*const u8>(task, offset!(task_cgroups))?;
    let css = read_at::<*const u8>(css_set, offset!(css_set_memory_subsys))?;
    let cgroup = read_at::<*const u8>(css, offset!(css_cgroup))?;
    let kn = read_at::<*const u8>(cgroup, offset!(cgroup_kn))?;
    read_at::<u64>(kn, offset!(kernfs_node_id))
}
