//! Field offsets of kernel structs, read from the running kernel's BTF.
//!
//! Rust eBPF emits no CO-RE relocations, so the kernel programs take every offset they need
//! from [`KernelOffsets`], filled here at load time. A field may sit inside an anonymous struct
//! or union (randomized layouts, `mm_struct`'s inner struct): the search descends into those.

use std::path::Path;

use btf_rs::{Btf, Type};
use collector_common::KernelOffsets;

/// Where the kernel publishes its own BTF.
pub const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

#[derive(Debug, thiserror::Error)]
pub enum OffsetError {
    #[error(
        "{VMLINUX_BTF} is missing: this kernel was built without BTF (CONFIG_DEBUG_INFO_BTF), \
         which the collector needs to find kernel struct fields"
    )]
    NoBtf,
    #[error("cannot read kernel BTF from {path}: {source}")]
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
    #[error("kernel BTF: {0}")]
    Btf(#[from] btf_rs::Error),
}

/// Reads the offsets the kernel programs need from the BTF at `path`.
pub fn kernel_offsets(path: &Path) -> Result<KernelOffsets, OffsetError> {
    if !path.exists() {
        return Err(OffsetError::NoBtf);
    }
    let btf = Btf::from_file(path).map_err(|source| OffsetError::Read {
        path: path.display().to_string(),
        source,
    })?;
    let field = |strukt, field| field_offset(&btf, strukt, field);
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
        task_state: task_state.0,
        task_state_size: task_state.1,
        task_sum_exec_runtime: field("task_struct", "se")?
            + field("sched_entity", "sum_exec_runtime")?,
        task_comm: field("task_struct", "comm")?,
        _pad: 0,
    })
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
    let no_field = OffsetError::NoField { strukt, field };
    let found = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| OffsetError::NoStruct(strukt))?
        .into_iter()
        .find_map(|ty| match ty {
            Type::Struct(s) => Some(s),
            _ => None,
        })
        .ok_or(OffsetError::NoStruct(strukt))?;
    let member = found
        .members
        .iter()
        .find(|m| btf.resolve_name(*m).is_ok_and(|n| n == field))
        .ok_or(no_field)?;
    let mut ty = btf.resolve_chained_type(member)?;
    loop {
        ty = match ty {
            Type::Int(int) => return Ok(int.size() as u32),
            Type::Typedef(t) => btf.resolve_chained_type(&t)?,
            Type::Volatile(t) => btf.resolve_chained_type(&t)?,
            Type::Const(t) => btf.resolve_chained_type(&t)?,
            _ => return Err(OffsetError::NoField { strukt, field }),
        };
    }
}

/// Byte offset of `field` in `struct strukt`.
pub fn field_offset(
    btf: &Btf,
    strukt: &'static str,
    field: &'static str,
) -> Result<u32, OffsetError> {
    let candidates = btf
        .resolve_types_by_name(strukt)
        .map_err(|_| OffsetError::NoStruct(strukt))?;
    let found = candidates.iter().find_map(|ty| match ty {
        Type::Struct(s) => Some(s),
        _ => None,
    });
    let Some(found) = found else {
        return Err(OffsetError::NoStruct(strukt));
    };
    let bits =
        find_member_bits(btf, found, field)?.ok_or(OffsetError::NoField { strukt, field })?;
    Ok(bits / 8)
}

/// Bit offset of `field` in `strukt`, looking through anonymous struct and union members.
fn find_member_bits(
    btf: &Btf,
    strukt: &btf_rs::Struct,
    field: &str,
) -> Result<Option<u32>, OffsetError> {
    for member in &strukt.members {
        let name = btf.resolve_name(member).unwrap_or_default();
        if name == field {
            return Ok(Some(member.bit_offset()));
        }
        if name.is_empty() {
            let inner = match btf.resolve_chained_type(member)? {
                Type::Struct(s) | Type::Union(s) => s,
                _ => continue,
            };
            if let Some(bits) = find_member_bits(btf, &inner, field)? {
                return Ok(Some(member.bit_offset() + bits));
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
    }

    #[test]
    fn missing_btf_is_a_clear_error() {
        let err = kernel_offsets(Path::new("/nonexistent/vmlinux")).unwrap_err();
        assert!(err.to_string().contains("CONFIG_DEBUG_INFO_BTF"), "{err}");
    }
}
