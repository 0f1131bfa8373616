//! Empty BPF programs (`r0 = 0; exit`) on the hooks the collector attaches: the floor of what
//! any program there costs, which the collector's own cost is compared against. Loaded with
//! the raw `bpf()` and `perf_event_open()` system calls, so the bench needs no BPF object and
//! no library:
//! - a BTF tracepoint of the collector (`sched_switch`, ...) gets a raw tracepoint program on
//!   the same tracepoint (both run through `bpf_trace_run*`, without the perf buffer);
//! - a per-syscall tracepoint (`syscalls/sys_enter_write`, ...) gets a tracepoint program
//!   attached through a perf event, as the collector's are: this also puts every task on the
//!   kernel's syscall-tracing slow path, exactly as the collector does;
//! - an `fexit` hook on a syscall handler (`console_fexit_write` on `__x64_sys_write`) gets an
//!   `fexit` program on the same function, found by name in the kernel's BTF.
//!
//! Also compiled into the kernel-matrix guests' `syscall-cost` (tests/src/bin/syscall_cost.rs,
//! by `#[path]`), so it uses nothing but std and anyhow.
//!
//! Everything is detached when the [`EmptyPrograms`] is dropped (its descriptors close).

use std::{
    ffi::{CString, c_int, c_long, c_void},
    os::fd::{FromRawFd, OwnedFd},
    path::Path,
};

use anyhow::{Context, bail};

const SYS_BPF: c_long = 321;
const SYS_PERF_EVENT_OPEN: c_long = 298;
const BPF_PROG_LOAD: c_long = 5;
const BPF_RAW_TRACEPOINT_OPEN: c_long = 17;
const BPF_PROG_TYPE_TRACEPOINT: u32 = 5;
const BPF_PROG_TYPE_RAW_TRACEPOINT: u32 = 17;
const BPF_PROG_TYPE_TRACING: u32 = 26;
const BPF_TRACE_FEXIT: u32 = 25;
/// The running kernel's BTF, where `fexit` targets are looked up.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";
const PERF_TYPE_TRACEPOINT: u32 = 2;
/// The `perf_event_attr` passed: larger than every version, zero beyond the fields set.
const PERF_ATTR_BYTES: usize = 128;
const PERF_FLAG_FD_CLOEXEC: c_long = 8;
/// `_IOW('$', 8, u32)` and `_IO('$', 0)`.
const PERF_EVENT_IOC_SET_BPF: c_long = 0x4004_2408;
const PERF_EVENT_IOC_ENABLE: c_long = 0x2400;

unsafe extern "C" {
    fn syscall(number: c_long, ...) -> c_long;
    fn ioctl(fd: c_int, request: c_long, ...) -> c_int;
    fn setrlimit(resource: c_int, limit: *const [u64; 2]) -> c_int;
}

/// `RLIMIT_MEMLOCK` (x86_64), and `RLIM_INFINITY`.
const RLIMIT_MEMLOCK: c_int = 8;
const RLIM_INFINITY: u64 = u64::MAX;

/// `r0 = 0; exit`: `BPF_ALU64 | BPF_MOV | BPF_K` to r0, then `BPF_JMP | BPF_EXIT`.
const EMPTY: [u64; 2] = [0xb7, 0x95];

/// Where a hook of the collector is, as its probe is named in `collector_probe_attached`.
pub(super) enum Hook {
    /// A BTF/raw tracepoint, by its name (`sched_switch`).
    Raw(String),
    /// A tracefs event, `category/name` (`syscalls/sys_enter_write`).
    Tracepoint(String),
    /// `fexit` on a kernel function, by its name (`__x64_sys_write`).
    Fexit(String),
}

impl Hook {
    /// The hook behind one of the collector's probe names, if it is one this module knows:
    /// `console_fexit_<syscall>` is `fexit` on the syscall's x86_64 handler;
    /// `console_sys_{enter,exit}_<syscall>` are per-syscall tracepoints; the raw syscall
    /// fallback (`console_sys_enter`) and the BTF tracepoints are raw tracepoints.
    pub(super) fn of_probe(probe: &str) -> Self {
        if let Some(syscall) = probe.strip_prefix("console_fexit_") {
            return Self::Fexit(format!("__x64_sys_{syscall}"));
        }
        if let Some(rest) = probe.strip_prefix("console_sys_")
            && let Some((dir, syscall)) = rest.split_once('_')
        {
            return Self::Tracepoint(format!("syscalls/sys_{dir}_{syscall}"));
        }
        match probe {
            "console_sys_enter" => Self::Raw("sys_enter".into()),
            "console_sys_exit" => Self::Raw("sys_exit".into()),
            other => Self::Raw(other.into()),
        }
    }
}

/// The loaded and attached programs; dropping it detaches them.
pub(super) struct EmptyPrograms {
    _fds: Vec<OwnedFd>,
}

impl EmptyPrograms {
    pub(super) fn attach(hooks: &[Hook]) -> anyhow::Result<Self> {
        // Kernels before 5.11 charge BPF memory to the user's locked memory, against this
        // process's limit: a collector that just stopped may still hold the default's worth.
        let unlimited = [RLIM_INFINITY, RLIM_INFINITY];
        // SAFETY: setrlimit reads a valid `struct rlimit` (two u64s).
        if unsafe { setrlimit(RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
            return Err(last_error("lift RLIMIT_MEMLOCK"));
        }
        let raw = load(BPF_PROG_TYPE_RAW_TRACEPOINT).context("load a raw tracepoint program")?;
        let classic = load(BPF_PROG_TYPE_TRACEPOINT).context("load a tracepoint program")?;
        let mut fds = Vec::new();
        let mut btf = None;
        for hook in hooks {
            let fd = match hook {
                Hook::Raw(name) => attach_raw(&raw, name),
                Hook::Tracepoint(event) => attach_tracepoint(&classic, event),
                Hook::Fexit(function) => {
                    if btf.is_none() {
                        btf = Some(std::fs::read(VMLINUX_BTF).context(VMLINUX_BTF)?);
                    }
                    let id = btf_func_id(btf.as_deref().unwrap_or_default(), function)?;
                    // One program per target: the kernel binds a tracing program to its
                    // function at load.
                    let program = load_tracing(BPF_TRACE_FEXIT, id)
                        .with_context(|| format!("load an fexit program on {function}"))?;
                    let link = attach_traced(&program, function);
                    fds.push(program);
                    link
                }
            };
            fds.push(fd?);
        }
        fds.push(raw);
        fds.push(classic);
        Ok(Self { _fds: fds })
    }
}

fn last_error(what: &str) -> anyhow::Error {
    anyhow::anyhow!("{what}: {}", std::io::Error::last_os_error())
}

/// A descriptor the kernel returned (`ret >= 0`), owned from here on.
fn owned(ret: c_long, what: &str) -> anyhow::Result<OwnedFd> {
    if ret < 0 {
        return Err(last_error(what));
    }
    let fd = c_int::try_from(ret).context("descriptor out of range")?;
    // SAFETY: the kernel just returned this descriptor to us; nothing else owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn load(prog_type: u32) -> anyhow::Result<OwnedFd> {
    load_program(prog_type, 0, 0)
}

/// A tracing program of `attach_type` bound to the kernel's BTF type `btf_id`.
fn load_tracing(attach_type: u32, btf_id: u32) -> anyhow::Result<OwnedFd> {
    load_program(BPF_PROG_TYPE_TRACING, attach_type, btf_id)
}

fn load_program(prog_type: u32, attach_type: u32, btf_id: u32) -> anyhow::Result<OwnedFd> {
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(EMPTY.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(EMPTY.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..53].copy_from_slice(b"empty");
    // expected_attach_type and attach_btf_id (0 for the types that take none).
    attr[68..72].copy_from_slice(&attach_type.to_ne_bytes());
    attr[108..112].copy_from_slice(&btf_id.to_ne_bytes());
    // SAFETY: attr is a valid bpf_attr of the size passed; the pointers in it (instructions,
    // license) outlive the call.
    let ret = unsafe {
        syscall(
            SYS_BPF,
            BPF_PROG_LOAD,
            attr.as_ptr().cast::<c_void>(),
            attr.len() as u32,
        )
    };
    owned(ret, "BPF_PROG_LOAD")
}

fn attach_raw(program: &OwnedFd, name: &str) -> anyhow::Result<OwnedFd> {
    let name_c = CString::new(name)?;
    raw_tracepoint_open(program, Some(&name_c)).with_context(|| format!("raw tracepoint {name}"))
}

/// Attaches a tracing program where its load bound it.
fn attach_traced(program: &OwnedFd, function: &str) -> anyhow::Result<OwnedFd> {
    raw_tracepoint_open(program, None).with_context(|| format!("attach fexit on {function}"))
}

/// `BPF_RAW_TRACEPOINT_OPEN`: on the raw tracepoint `name`, or without one for a tracing
/// program (which its load bound to its target).
fn raw_tracepoint_open(program: &OwnedFd, name: Option<&CString>) -> anyhow::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    // raw_tracepoint: name (pointer, or 0), prog_fd.
    let mut attr = [0u8; 128];
    let name_ptr = name.map_or(0, |n| n.as_ptr() as u64);
    attr[0..8].copy_from_slice(&name_ptr.to_ne_bytes());
    attr[8..12].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as in `load_program`; the name outlives the call.
    let ret = unsafe {
        syscall(
            SYS_BPF,
            BPF_RAW_TRACEPOINT_OPEN,
            attr.as_ptr().cast::<c_void>(),
            attr.len() as u32,
        )
    };
    owned(ret, "BPF_RAW_TRACEPOINT_OPEN")
}

/// The id of function `name` (a `BTF_KIND_FUNC`) in the raw BTF `btf` (types numbered from 1,
/// in order).
fn btf_func_id(btf: &[u8], name: &str) -> anyhow::Result<u32> {
    let u32_at = |at: usize| -> anyhow::Result<u32> {
        let bytes = btf.get(at..at + 4).context("BTF cut short")?;
        Ok(u32::from_ne_bytes(bytes.try_into()?))
    };
    if btf.get(0..2) != Some(&0xeb9f_u16.to_ne_bytes()[..]) {
        bail!("not BTF (bad magic)");
    }
    let header = u32_at(4)? as usize;
    let (type_off, type_len) = (u32_at(8)? as usize, u32_at(12)? as usize);
    let str_off = u32_at(16)? as usize;
    let (types, strings) = (header + type_off, header + str_off);
    let name_at = |off: usize| -> &[u8] {
        let rest = btf.get(strings + off..).unwrap_or_default();
        &rest[..rest.iter().position(|&b| b == 0).unwrap_or(rest.len())]
    };
    let mut at = types;
    let mut id = 1;
    while at < types + type_len {
        let (name_off, info) = (u32_at(at)? as usize, u32_at(at + 4)?);
        let (kind, vlen) = ((info >> 24) & 0x1f, (info & 0xffff) as usize);
        if kind == 12 && name_at(name_off) == name.as_bytes() {
            return Ok(id);
        }
        // What follows the 12-byte common part, by kind (include/uapi/linux/btf.h).
        at += 12
            + match kind {
                1 | 14 | 17 => 4,             // INT, VAR, DECL_TAG
                3 => 12,                      // ARRAY
                4 | 5 | 15 | 19 => 12 * vlen, // STRUCT, UNION, DATASEC, ENUM64
                6 | 13 => 8 * vlen,           // ENUM, FUNC_PROTO
                _ => 0,
            };
        id += 1;
    }
    bail!("no function {name} in the kernel's BTF")
}

fn attach_tracepoint(program: &OwnedFd, event: &str) -> anyhow::Result<OwnedFd> {
    use std::os::fd::AsRawFd;
    let id_file = Path::new("/sys/kernel/tracing/events")
        .join(event)
        .join("id");
    let id: u64 = std::fs::read_to_string(&id_file)
        .with_context(|| id_file.display().to_string())?
        .trim()
        .parse()
        .context("tracepoint id")?;
    // perf_event_attr: type, size, config (the tracepoint id), sample_period 1; the rest zero.
    let mut attr = [0u8; PERF_ATTR_BYTES];
    attr[0..4].copy_from_slice(&PERF_TYPE_TRACEPOINT.to_ne_bytes());
    attr[4..8].copy_from_slice(&(PERF_ATTR_BYTES as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&id.to_ne_bytes());
    attr[16..24].copy_from_slice(&1u64.to_ne_bytes());
    // One event (any pid, CPU 0), as libbpf attaches: a tracepoint's programs run on every CPU.
    // SAFETY: attr is a valid perf_event_attr of the size it states.
    let ret = unsafe {
        syscall(
            SYS_PERF_EVENT_OPEN,
            attr.as_ptr().cast::<c_void>(),
            -1 as c_int,
            0 as c_int,
            -1 as c_int,
            PERF_FLAG_FD_CLOEXEC,
        )
    };
    let event_fd = owned(ret, &format!("perf_event_open {event}"))?;
    // SAFETY: both are open descriptors of the right kinds; the requests take an int argument.
    let set = unsafe {
        ioctl(
            event_fd.as_raw_fd(),
            PERF_EVENT_IOC_SET_BPF,
            program.as_raw_fd(),
        )
    };
    if set < 0 {
        return Err(last_error(&format!("attach to {event}")));
    }
    // SAFETY: as above.
    if unsafe { ioctl(event_fd.as_raw_fd(), PERF_EVENT_IOC_ENABLE, 0 as c_int) } < 0 {
        bail!("enable {event}: {}", std::io::Error::last_os_error());
    }
    Ok(event_fd)
}

#[cfg(test)]
mod tests {
    use super::Hook;

    #[test]
    fn probe_names_map_to_their_hooks() {
        assert!(
            matches!(Hook::of_probe("console_sys_enter_write"), Hook::Tracepoint(t) if t == "syscalls/sys_enter_write")
        );
        assert!(
            matches!(Hook::of_probe("console_sys_exit_pwritev2"), Hook::Tracepoint(t) if t == "syscalls/sys_exit_pwritev2")
        );
        assert!(matches!(Hook::of_probe("console_sys_enter"), Hook::Raw(r) if r == "sys_enter"));
        assert!(matches!(Hook::of_probe("sched_switch"), Hook::Raw(r) if r == "sched_switch"));
        assert!(
            matches!(Hook::of_probe("console_fexit_write"), Hook::Fexit(f) if f == "__x64_sys_write")
        );
    }

    /// The running kernel's own BTF: a function every kernel has is found, a made-up one is a
    /// clear error.
    #[test]
    fn functions_are_found_in_the_kernels_btf() {
        let btf = std::fs::read(super::VMLINUX_BTF).expect("this host has BTF");
        let id = super::btf_func_id(&btf, "__x64_sys_write").expect("found");
        assert!(id > 0);
        let missing = super::btf_func_id(&btf, "no_such_function_here").unwrap_err();
        assert!(
            missing.to_string().contains("no_such_function_here"),
            "{missing}"
        );
    }
}
