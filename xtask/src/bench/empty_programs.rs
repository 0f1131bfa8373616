//! Empty BPF programs (`r0 = 0; exit`) on the hooks the collector attaches: the floor of what
//! any program there costs, which the collector's own cost is compared against. Loaded with
//! the raw `bpf()` and `perf_event_open()` system calls, so the bench needs no BPF object and
//! no library:
//! - a BTF tracepoint of the collector (`sched_switch`, ...) gets a raw tracepoint program on
//!   the same tracepoint (both run through `bpf_trace_run*`, without the perf buffer);
//! - a per-syscall tracepoint (`syscalls/sys_enter_write`, ...) gets a tracepoint program
//!   attached through a perf event, as the collector's are: this also puts every task on the
//!   kernel's syscall-tracing slow path, exactly as the collector does.
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
}

/// `r0 = 0; exit`: `BPF_ALU64 | BPF_MOV | BPF_K` to r0, then `BPF_JMP | BPF_EXIT`.
const EMPTY: [u64; 2] = [0xb7, 0x95];

/// Where a hook of the collector is, as its probe is named in `collector_probe_attached`.
pub(super) enum Hook {
    /// A BTF/raw tracepoint, by its name (`sched_switch`).
    Raw(String),
    /// A tracefs event, `category/name` (`syscalls/sys_enter_write`).
    Tracepoint(String),
}

impl Hook {
    /// The hook behind one of the collector's probe names, if it is one this module knows:
    /// `console_sys_{enter,exit}_<syscall>` are per-syscall tracepoints; the raw syscall
    /// fallback (`console_sys_enter`) and the BTF tracepoints are raw tracepoints.
    pub(super) fn of_probe(probe: &str) -> Self {
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
        let raw = load(BPF_PROG_TYPE_RAW_TRACEPOINT).context("load a raw tracepoint program")?;
        let classic = load(BPF_PROG_TYPE_TRACEPOINT).context("load a tracepoint program")?;
        let mut fds = Vec::new();
        for hook in hooks {
            let fd = match hook {
                Hook::Raw(name) => attach_raw(&raw, name),
                Hook::Tracepoint(event) => attach_tracepoint(&classic, event),
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
    let license = c"GPL";
    // union bpf_attr for BPF_PROG_LOAD: prog_type, insn_cnt, insns, license; the rest zero.
    let mut attr = [0u8; 128];
    attr[0..4].copy_from_slice(&prog_type.to_ne_bytes());
    attr[4..8].copy_from_slice(&(EMPTY.len() as u32).to_ne_bytes());
    attr[8..16].copy_from_slice(&(EMPTY.as_ptr() as u64).to_ne_bytes());
    attr[16..24].copy_from_slice(&(license.as_ptr() as u64).to_ne_bytes());
    attr[48..53].copy_from_slice(b"empty");
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
    use std::os::fd::AsRawFd;
    let name_c = CString::new(name)?;
    // raw_tracepoint: name (pointer), prog_fd.
    let mut attr = [0u8; 128];
    attr[0..8].copy_from_slice(&(name_c.as_ptr() as u64).to_ne_bytes());
    attr[8..12].copy_from_slice(&(program.as_raw_fd() as u32).to_ne_bytes());
    // SAFETY: as in `load`; the name outlives the call.
    let ret = unsafe {
        syscall(
            SYS_BPF,
            BPF_RAW_TRACEPOINT_OPEN,
            attr.as_ptr().cast::<c_void>(),
            attr.len() as u32,
        )
    };
    owned(ret, &format!("raw tracepoint {name}"))
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
    }
}
