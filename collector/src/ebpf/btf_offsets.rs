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
        pt_regs_syscall_nr: field("pt_regs", PT_REGS_SYSCALL_NR)?,
        pt_regs_args: pt_regs_args(&btf)?,
        _pad: 0,
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
