//! Field offsets of kernel structs, read from the running kernel's BTF.
//!
//! Rust eBPF emits no CO-RE relocations, so the kernel programs take every offset they need
//! from [`KernelOffsets`], filled here at load time. A field may sit inside an anonymous struct
//! or union (randomized layouts, `mm_struct`'s inner struct): the search descends into those.

use std::path::Path;

use btf_rs::{Btf, Type};
use collector_common::KernelOffsets;

/// Where the kernel publishes its own BTF.
pub(crate) const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub(crate) enum OffsetError {
    #[error(
        "{VMLINUX_BTF} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), \
         which the collector needs to find kernel struct fields"
    )]
    NoBtf,
    #[error("cannot read kernel BTF from {path}")]
    Read {
        path: String,
        #[source]
        source: btf_rs::Error,
    },
    #[error("kernel BTF has no struct {0}")]
    NoStruct(&'static str),
    #[error("kernel BTF: struct {strukt} has no field {field}")]
    NoField {
        strukt: &'static str,
        field: &'static str,
    },
    #[error("kernel BTF has no enumerator {0}")]
    NoEnumerator(&'static str),
    #[error("kernel BTF has no tracepoint {0}")]
    NoTracepoint(String),
    #[error("kernel BTF")]
    Btf(#[from] btf_rs::Error),
}

/// Reads the offsets the kernel programs need from the BTF at `path`.
pub(crate) fn kernel_offsets(path: &Path) -> Result<KernelOffsets, OffsetError> {
    if !path.exists() {
        return Err(OffsetError::NoBtf);
    }
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let field = |strukt, field| field_offset(&btf, strukt, field);
    let rss = rss_counter_offsets(&btf)?;
    let task_state = task_state(&btf)?;
    Ok(KernelOffsets {
        task_pid: field("task_struct", "pid")?,
        task_tgid: field("task_struct", "tgid")?,
        task_exit_code: field("task_struct", "exit_code")?,
        task_signal: field("task_struct", "signal")?,
        task_mm: field("task_struct", "mm")?,
        signal_live: field("signal_struct", "live")?,
        signal_group_exit_code: field("signal_struct", "group_exit_code")?,
        signal_flags: field("signal_struct", "flags")?,
        mm_arg_start: field("mm_struct", "arg_start")?,
        mm_arg_end: field("mm_struct", "arg_end")?,
        binprm_filename: field("linux_binprm", "filename")?,
        signal_oom_score_adj: field("signal_struct", "oom_score_adj")?,
        mm_total_vm: field("mm_struct", "total_vm")?,
        mm_rss_anon: rss.anon,
        mm_rss_file: rss.file,
        mm_rss_shmem: rss.shmem,
        mark_victim_has_task: u32::from(tracepoint_arg_is_pointer(&btf, "mark_victim", 0)?),
        task_cgroups: field("task_struct", "cgroups")?,
        // No memory controller (CONFIG_MEMCG off): the OOM event then names no cgroup.
        css_set_memory_subsys: enum_value(&btf, "memory_cgrp_id").map_or(Ok(0), |id| {
            field("css_set", "subsys").map(|subsys| subsys + id * 8)
        })?,
        css_cgroup: field("cgroup_subsys_state", "cgroup")?,
        cgroup_kn: field("cgroup", "kn")?,
        kernfs_node_id: field("kernfs_node", "id")?,
        task_state: task_state.0,
        task_state_size: task_state.1,
        task_sum_exec_runtime: field("task_struct", "se")?
            + field("sched_entity", "sum_exec_runtime")?,
        task_comm: field("task_struct", "comm")?,
        pt_regs_syscall_nr: field("pt_regs", PT_REGS_SYSCALL_NR)?,
        pt_regs_args: pt_regs_args(&btf)?,
    })
}

/// The `pt_regs` member holding the syscall number at syscall exit (the return value has
/// replaced the first argument's register by then on some architectures, never this one).
#[cfg(target_arch = "x86_64")]
const PT_REGS_SYSCALL_NR: &str = "orig_ax";
#[cfg(target_arch = "aarch64")]
const PT_REGS_SYSCALL_NR: &str = "syscallno";

/// Offsets of the first three syscall arguments in `pt_regs` (the raw `sys_enter`/`sys_exit`
/// tracepoints hand over the user registers, not the arguments).
#[cfg(target_arch = "x86_64")]
fn pt_regs_args(btf: &Btf) -> Result<[u32; 3], OffsetError> {
    Ok([
        field_offset(btf, "pt_regs", "di")?,
        field_offset(btf, "pt_regs", "si")?,
        field_offset(btf, "pt_regs", "dx")?,
    ])
}

#[cfg(target_arch = "aarch64")]
fn pt_regs_args(btf: &Btf) -> Result<[u32; 3], OffsetError> {
    // `regs[31]`: x0 is the first argument (`orig_x0` keeps it after exit; the capture only
    // reads arguments at entry).
    let regs = field_offset(btf, "pt_regs", "regs")?;
    Ok([regs, regs + 8, regs + 16])
}

/// Offset and size of the task's run state: `unsigned int __state` since 5.14, `long state`
/// before.
fn task_state(btf: &Btf) -> Result<(u32, u32), OffsetError> {
    let (field, offset) = match field_offset(btf, "task_struct", "__state") {
        Ok(offset) => ("__state", offset),
        Err(OffsetError::NoField { .. }) => ("state", field_offset(btf, "task_struct", "state")?),
        Err(err) => return Err(err),
    };
    Ok((offset, field_size(btf, "task_struct", field)?))
}

/// Size in bytes of the integer `field` of `struct strukt` (through typedefs and qualifiers).
fn field_size(btf: &Btf, strukt: &'static str, field: &'static str) -> Result<u32, OffsetError> {
    let found = find_struct(btf, strukt)?;
    let (_, member) =
        find_member(btf, &found, field)?.ok_or(OffsetError::NoField { strukt, field })?;
    let mut ty = btf.resolve_chained_type(&member)?;
    loop {
        #[allow(clippy::match_same_arms, reason = "each arm binds a different type")]
        let next = match ty {
            Type::Int(int) => return Ok(int.size() as u32),
            Type::Typedef(t) => btf.resolve_chained_type(&t)?,
            Type::Volatile(t) => btf.resolve_chained_type(&t)?,
            Type::Const(t) => btf.resolve_chained_type(&t)?,
            _ => return Err(OffsetError::NoField { strukt, field }),
        };
        ty = next;
    }
}

/// Offsets of the RSS counters' values in `mm_struct`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct RssOffsets {
    pub(crate) anon: u32,
    pub(crate) file: u32,
    pub(crate) shmem: u32,
}

/// `mm_struct.rss_stat` is `struct percpu_counter rss_stat[NR_MM_COUNTERS]` since 6.2 and
/// `struct mm_rss_stat { atomic_long_t count[NR_MM_COUNTERS]; }` before; the counter indexes
/// come from the kernel's own `MM_*PAGES` enum.
fn rss_counter_offsets(btf: &Btf) -> Result<RssOffsets, OffsetError> {
    let mm = find_struct(btf, "mm_struct")?;
    let (member_bits, member) = find_member(btf, &mm, "rss_stat")?.ok_or(OffsetError::NoField {
        strukt: "mm_struct",
        field: "rss_stat",
    })?;
    let base = member_bits / 8;
    // (offset of counter 0's value, distance between counters)
    let (first, stride) = match btf.resolve_chained_type(&member)? {
        Type::Array(array) => {
            let Type::Struct(counter) = btf.resolve_chained_type(&array)? else {
                return Err(OffsetError::NoStruct("percpu_counter"));
            };
            let count = find_member_bits(btf, &counter, "count")?.ok_or(OffsetError::NoField {
                strukt: "percpu_counter",
                field: "count",
            })?;
            (count / 8, counter.size() as u32)
        }
        Type::Struct(stat) => {
            let count = find_member_bits(btf, &stat, "count")?.ok_or(OffsetError::NoField {
                strukt: "mm_rss_stat",
                field: "count",
            })?;
            (count / 8, 8)
        }
        _ => return Err(OffsetError::NoStruct("mm_rss_stat")),
    };
    let index = |name: &'static str| enum_value(btf, name).map(|v| base + first + v * stride);
    Ok(RssOffsets {
        anon: index("MM_ANONPAGES")?,
        file: index("MM_FILEPAGES")?,
        shmem: index("MM_SHMEMPAGES")?,
    })
}

/// The value of the enumerator `name` in any enum of the kernel.
fn enum_value(btf: &Btf, name: &'static str) -> Result<u32, OffsetError> {
    // Type ids are dense from 1; the first id that does not resolve is the end.
    for id in 1.. {
        let Ok(ty) = btf.resolve_type_by_id(id) else {
            break;
        };
        if let Type::Enum(e) = ty {
            for member in &e.members {
                if btf.resolve_name(member).is_ok_and(|n| n == name) {
                    return Ok(member.val());
                }
            }
        }
    }
    Err(OffsetError::NoEnumerator(name))
}

/// Whether argument `index` of the BTF tracepoint `name` is a pointer (its signature changed
/// across kernels for some tracepoints, e.g. `mark_victim` took a pid before 6.8).
pub(crate) fn tracepoint_arg_is_pointer(
    btf: &Btf,
    name: &str,
    index: usize,
) -> Result<bool, OffsetError> {
    let typedef = format!("btf_trace_{name}");
    let ty = btf
        .resolve_types_by_name(&typedef)
        .ok()
        .and_then(|types| types.into_iter().next())
        .ok_or_else(|| OffsetError::NoTracepoint(name.to_owned()))?;
    let Type::Typedef(typedef) = ty else {
        return Err(OffsetError::NoTracepoint(name.to_owned()));
    };
    let Type::Ptr(ptr) = btf.resolve_chained_type(&typedef)? else {
        return Err(OffsetError::NoTracepoint(name.to_owned()));
    };
    let Type::FuncProto(proto) = btf.resolve_chained_type(&ptr)? else {
        return Err(OffsetError::NoTracepoint(name.to_owned()));
    };
    // Parameter 0 is the tracepoint's private data; the tracepoint's own arguments follow.
    let param = proto
        .parameters
        .get(index + 1)
        .ok_or_else(|| OffsetError::NoTracepoint(name.to_owned()))?;
    Ok(matches!(btf.resolve_chained_type(param)?, Type::Ptr(_)))
}

fn find_struct(btf: &Btf, strukt: &'static str) -> Result<btf_rs::Struct, OffsetError> {
    let candidates = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| OffsetError::NoStruct(strukt))?;
    candidates
        .into_iter()
        .find_map(|ty| match ty {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or(OffsetError::NoStruct(strukt))
}

/// Byte offset of `field` in `struct strukt`.
pub(crate) fn field_offset(
    btf: &Btf,
    strukt: &'static str,
    field: &'static str,
) -> Result<u32, OffsetError> {
    let found = find_struct(btf, strukt)?;
    let bits =
        find_member_bits(btf, &found, field)?.ok_or(OffsetError::NoField { strukt, field })?;
    Ok(bits / 8)
}

/// Bit offset of `field` in `strukt`, looking through anonymous struct and union members.
fn find_member_bits(
    btf: &Btf,
    strukt: &btf_rs::Struct,
    field: &str,
) -> Result<Option<u32>, OffsetError> {
    Ok(find_member(btf, strukt, field)?.map(|(bits, _)| bits))
}

/// Bit offset and description of `field` in `strukt`, looking through anonymous struct and
/// union members (randomized layouts, `mm_struct`'s inner struct).
fn find_member(
    btf: &Btf,
    strukt: &btf_rs::Struct,
    field: &str,
) -> Result<Option<(u32, btf_rs::Member)>, OffsetError> {
    for member in &strukt.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == field {
            return Ok(Some((member.bit_offset(), member.clone())));
        }
        if name.is_empty() {
            let (Type::Struct(inner) | Type::Union(inner)) = btf.resolve_chained_type(member)?
            else {
                continue;
            };
            if let Some((bits, found)) = find_member(btf, &inner, field)? {
                return Ok(Some((member.bit_offset() + bits, found)));
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The running kernel's BTF names every field the programs read, at plausible offsets.
    #[test]
    fn offsets_from_running_kernel() {
        let path = Path::new(VMLINUX_BTF);
        assert!(
            path.exists(),
            "{VMLINUX_BTF} must exist on the machines this project runs on"
        );
        let offsets = kernel_offsets(path).expect("offsets");
        assert!(offsets.task_tgid > offsets.task_pid - 1, "{offsets:?}");
        assert_eq!(
            offsets.task_tgid,
            offsets.task_pid + 4,
            "pid and tgid are adjacent"
        );
        assert!(
            offsets.mm_arg_end == offsets.mm_arg_start + 8,
            "{offsets:?}"
        );
        assert!(
            offsets.task_signal > 0 && offsets.task_mm > 0,
            "{offsets:?}"
        );
        // 6.x: `unsigned int __state`, the first field after `thread_info` (when it is inside).
        assert_eq!(offsets.task_state_size, 4, "{offsets:?}");
        assert!(
            offsets.task_sum_exec_runtime > offsets.task_state,
            "{offsets:?}"
        );
        assert!(offsets.task_comm > offsets.task_tgid, "{offsets:?}");
        // x86_64 `pt_regs`: r15 r14 r13 r12 bp bx r11 r10 r9 r8 ax cx dx si di orig_ax ...
        #[cfg(target_arch = "x86_64")]
        assert_eq!(
            offsets.pt_regs_args,
            [14 * 8, 13 * 8, 12 * 8],
            "{offsets:?}"
        );
        #[cfg(target_arch = "x86_64")]
        assert_eq!(offsets.pt_regs_syscall_nr, 15 * 8, "{offsets:?}");
    }

    #[test]
    fn missing_btf_is_a_clear_error() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
