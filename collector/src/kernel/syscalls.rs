//! The syscalls console capture follows: one table gives each its name, its two probes, and
//! this architecture's number, from which the kernel's [`SyscallNumbers`] global is filled.

use collector_common::{SYSCALL_NONE, SyscallNumbers};

/// A syscall console capture follows.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Syscall {
    pub(crate) name: &'static str,
    /// `probe` label values of its `sys_enter_<name>` and `sys_exit_<name>` tracepoints.
    pub(crate) enter_probe: &'static str,
    pub(crate) exit_probe: &'static str,
    /// Its `fexit` program on the syscall's handler (and that probe's `probe` label).
    pub(crate) fexit_program: &'static str,
    /// This architecture's number, if it has the syscall.
    pub(crate) number: Option<u32>,
    /// Its slot in the kernel's [`SyscallNumbers`].
    slot: fn(&mut SyscallNumbers) -> &mut u32,
}

/// A syscall's number as the kernel's tables hold it.
#[allow(
    clippy::unnecessary_wraps,
    reason = "absent on some architectures, see below"
)]
const fn nr(n: libc::c_long) -> Option<u32> {
    Some(n as u32)
}

/// `open`, `creat` and `dup2` exist on x86_64 only; newer architectures have only the
/// `*at`/`dup3` forms.
#[cfg(target_arch = "x86_64")]
const LEGACY: [Option<u32>; 3] = [nr(libc::SYS_open), nr(libc::SYS_creat), nr(libc::SYS_dup2)];
#[cfg(not(target_arch = "x86_64"))]
const LEGACY: [Option<u32>; 3] = [None, None, None];

macro_rules! syscalls {
    ($($name:ident = $number:expr),* $(,)?) => {
        &[$(Syscall {
            name: stringify!($name),
            enter_probe: concat!("console_sys_enter_", stringify!($name)),
            exit_probe: concat!("console_sys_exit_", stringify!($name)),
            fexit_program: concat!("console_fexit_", stringify!($name)),
            number: $number,
            slot: |numbers| &mut numbers.$name,
        }),*]
    };
}

/// Every syscall console capture follows.
pub(crate) const SYSCALLS: &[Syscall] = syscalls!(
    write = nr(libc::SYS_write),
    pwrite64 = nr(libc::SYS_pwrite64),
    writev = nr(libc::SYS_writev),
    pwritev = nr(libc::SYS_pwritev),
    pwritev2 = nr(libc::SYS_pwritev2),
    open = LEGACY[0],
    creat = LEGACY[1],
    openat = nr(libc::SYS_openat),
    close = nr(libc::SYS_close),
    dup = nr(libc::SYS_dup),
    dup2 = LEGACY[2],
    dup3 = nr(libc::SYS_dup3),
    fcntl = nr(libc::SYS_fcntl),
);

/// Prefix of the syscall handlers' names (`__x64_sys_write`): the functions the `fexit`
/// programs attach to.
#[cfg(target_arch = "x86_64")]
const HANDLER_PREFIX: &str = "__x64_sys_";
#[cfg(target_arch = "aarch64")]
const HANDLER_PREFIX: &str = "__arm64_sys_";
#[cfg(not(any(target_arch = "x86_64", target_arch = "aarch64")))]
const HANDLER_PREFIX: &str = "sys_";

impl Syscall {
    /// The kernel function that handles the syscall on this architecture.
    pub(crate) fn handler(&self) -> String {
        format!("{HANDLER_PREFIX}{}", self.name)
    }
}

/// The kernel's [`SyscallNumbers`] global, from [`SYSCALLS`].
pub(crate) fn numbers() -> SyscallNumbers {
    let mut numbers = SyscallNumbers {
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
    };
    for syscall in SYSCALLS {
        *(syscall.slot)(&mut numbers) = syscall.number.unwrap_or(SYSCALL_NONE);
    }
    numbers
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_slot_filled_from_the_table() {
        let numbers = numbers();
        assert_eq!(numbers.write, libc::SYS_write as u32);
        assert_eq!(numbers.fcntl, libc::SYS_fcntl as u32);
        // Each slot is set by exactly one entry: no two entries share a slot.
        let mut probe = numbers;
        for syscall in SYSCALLS {
            let slot = (syscall.slot)(&mut probe);
            assert_ne!(*slot, 0xdead_beef, "{} shares a slot", syscall.name);
            *slot = 0xdead_beef;
        }
        assert_eq!(SYSCALLS.len(), 13);
        assert_eq!(SYSCALLS[0].enter_probe, "console_sys_enter_write");
        // Each has its program in the object's contract, in the same order.
        let programs: Vec<&str> = SYSCALLS.iter().map(|s| s.fexit_program).collect();
        assert_eq!(programs, collector_common::names::program::CONSOLE_FEXIT);
    }
}
