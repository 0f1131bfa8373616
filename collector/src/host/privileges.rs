//! What the collector needs from the host, checked once at start: each capability and mount,
//! what is lost without it. The collector runs with what it has; each missing one is said in
//! one log line and in `collector_privilege_missing` (docs/security.md).

use std::path::Path;

use tracing::warn;

use super::proc::effective_capabilities;
use crate::model::health::PrivilegeState;

/// A capability or mount, and what is lost without it.
struct Need {
    privilege: &'static str,
    costs: &'static str,
    present: fn(caps: u64) -> bool,
}

const CAP_DAC_READ_SEARCH: u64 = 2;
const CAP_SYS_PTRACE: u64 = 19;
const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

fn has(caps: u64, cap: u64) -> bool {
    caps & (1 << cap) != 0
}

/// Where tracefs must be mounted (read-only is enough: nothing is written there).
const TRACEFS_EVENTS: &str = "/sys/kernel/tracing/events";
/// The kernel's BTF, for the field offsets and the tracepoint attach types.
const VMLINUX_BTF: &str = "/sys/kernel/btf/vmlinux";

const NEEDS: &[Need] = &[
    Need {
        privilege: "CAP_BPF",
        costs: "the kernel programs cannot be loaded (the collector does not start)",
        present: |caps| has(caps, CAP_BPF) || has(caps, CAP_SYS_ADMIN),
    },
    Need {
        privilege: "CAP_PERFMON",
        costs: "the tracepoints cannot be attached and kernel memory cannot be read (the \
                collector does not start)",
        present: |caps| has(caps, CAP_PERFMON) || has(caps, CAP_SYS_ADMIN),
    },
    Need {
        privilege: "CAP_SYS_PTRACE",
        costs: "/proc/PID/exe, root, cwd and fd of the hypervisors cannot be read: running \
                VMMs are not found at start-up or by rescans, no executable can be trusted, \
                config files and console descriptors are not read",
        present: |caps| has(caps, CAP_SYS_PTRACE),
    },
    Need {
        privilege: "CAP_DAC_READ_SEARCH",
        costs: "files and folders of VMMs running as another user (their config files, \
                instance folders) cannot be read",
        present: |caps| has(caps, CAP_DAC_READ_SEARCH),
    },
    Need {
        privilege: "tracefs",
        costs: "tracefs is not mounted at /sys/kernel/tracing: console capture falls back to \
                the raw syscall tracepoints, which run for every syscall on the host (mount it \
                read-only from the host)",
        present: |_| Path::new(TRACEFS_EVENTS).is_dir(),
    },
    Need {
        privilege: "btf",
        costs: "/sys/kernel/btf/vmlinux is not readable: the kernel programs cannot be placed \
                (the collector does not start; mount it read-only from the host)",
        present: |_| std::fs::File::open(VMLINUX_BTF).is_ok(),
    },
];

/// Checks every need, logging one line for each that is missing.
pub(crate) fn check() -> Vec<PrivilegeState> {
    let caps = effective_capabilities();
    NEEDS
        .iter()
        .map(|need| {
            let missing = !(need.present)(caps);
            if missing {
                warn!(
                    privilege = need.privilege,
                    costs = need.costs,
                    "missing privilege; running without what it gives"
                );
            }
            PrivilegeState {
                privilege: need.privilege,
                missing,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn capabilities_by_bit() {
        let need = |name: &str| NEEDS.iter().find(|n| n.privilege == name).unwrap();
        let bpf = need("CAP_BPF");
        assert!(!(bpf.present)(0));
        assert!((bpf.present)(1 << CAP_BPF));
        assert!(
            (bpf.present)(1 << CAP_SYS_ADMIN),
            "the old way still counts"
        );
        let ptrace = need("CAP_SYS_PTRACE");
        assert!((ptrace.present)(1 << 19));
        assert!(!(ptrace.present)(!(1 << 19)));
        assert_eq!(check().len(), NEEDS.len());
    }
}
