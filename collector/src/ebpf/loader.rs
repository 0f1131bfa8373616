//! Loads the embedded kernel object, fills its settings and attaches each program.
//!
//! A program that cannot attach (a kernel lacking that hook) disables only its own feature: the
//! failure is logged once, shown by `collector_probe_attached{probe}` = 0, and the rest runs.

use std::{os::fd::OwnedFd, path::Path};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{HashMap, LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePoint, TracePoint},
};
use collector_common::{
    COMM_LEN, CommKey, ExecMatch, SyscallTpOffsets, TrackedProcess, VcpuCommKey, thread_class,
};
use tracing::{info, warn};

use super::{
    btf_offsets::{self, OffsetError, VMLINUX_BTF},
    sched::{SchedMaps, ThreadFilter},
    tracefs::{self, ConsoleHooks},
};
use crate::{config::KernelConfig, discovery::matchers::Matcher};

/// The kernel object built by `build.rs` from `collector-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector-ebpf"));

/// A hook the collector attaches, by its `probe` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSpec {
    /// Program name in the object (the Rust function's name).
    pub program: &'static str,
    /// The BTF tracepoint it attaches to.
    pub tracepoint: &'static str,
    /// What stops working without it.
    pub feature: &'static str,
}

/// Every probe but console capture's, in attach order (console capture's depend on the kernel,
/// see [`ConsoleHooks`]).
pub const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "sched_process_exec",
        tracepoint: "sched_process_exec",
        feature: "discovery of new hypervisor processes",
    },
    ProbeSpec {
        program: "sched_process_exit",
        tracepoint: "sched_process_exit",
        feature: "instance exit",
    },
    ProbeSpec {
        program: "mark_victim",
        tracepoint: "mark_victim",
        feature: "OOM kill attribution (OOM kills then read as stop/killed)",
    },
    ProbeSpec {
        program: "sched_switch",
        tracepoint: "sched_switch",
        feature: "run-queue latency, CPU time and context switches of instances",
    },
    ProbeSpec {
        program: "sched_wakeup",
        tracepoint: "sched_wakeup",
        feature: "run-queue latency after a wake-up",
    },
    ProbeSpec {
        program: "sched_wakeup_new",
        tracepoint: "sched_wakeup_new",
        feature: "following the threads a VMM creates",
    },
    ProbeSpec {
        program: "task_rename",
        tracepoint: "task_rename",
        feature: "telling vCPU threads from other VMM threads",
    },
];

/// Console capture's fallback on a kernel without per-syscall tracepoints: the raw syscall
/// tracepoints, which run for every syscall.
const CONSOLE_RAW_PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: "console_sys_enter",
        tracepoint: "sys_enter",
        feature: "console capture",
    },
    ProbeSpec {
        program: "console_sys_exit",
        tracepoint: "sys_exit",
        feature: "console capture",
    },
];

/// What became of a probe.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ProbeState {
    pub probe: &'static str,
    pub attached: bool,
    /// Why it is not attached.
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    #[error(
        "the collector needs root, or CAP_BPF and CAP_PERFMON, to load its kernel programs \
         (this process has effective capabilities {0:#x})"
    )]
    NotPrivileged(u64),
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    #[error("cannot read kernel BTF for attaching: {0}")]
    Btf(#[from] aya::BtfError),
    #[error("the kernel refused the collector's programs: {0}")]
    Load(#[source] aya::EbpfError),
    #[error("kernel map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("kernel map {name}: {source}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("kernel map {name}: cannot map it into memory: {source}")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded programs and the maps userspace works with.
pub struct Kernel {
    /// Owns the programs and their links: dropping it detaches everything.
    pub ebpf: Ebpf,
    pub probes: Vec<ProbeState>,
    pub tracked_processes: HashMap<MapData, u32, TrackedProcess>,
    pub process_events: RingBuf<MapData>,
    pub drops: PerCpuArray<MapData, u64>,
    pub sched: SchedMaps,
    /// Keeps the kernel's BPF run-time statistics on (`collector_ebpf_program_*`); `None` when
    /// the kernel refused (logged).
    pub stats_enabled: Option<OwnedFd>,
}

const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

/// Effective capabilities of this process, from `/proc/self/status`.
fn effective_capabilities() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("CapEff:"))
                .and_then(|v| u64::from_str_radix(v.trim(), 16).ok())
        })
        .unwrap_or(0)
}

/// Loads and attaches everything. Errors only for what makes the collector useless (no
/// privileges, no BTF, the object refused); a single probe failing is recorded in
/// [`Kernel::probes`] instead.
pub fn load(config: &KernelConfig, matchers: &[Matcher]) -> Result<Kernel, LoadError> {
    let caps = effective_capabilities();
    let has = |cap: u64| caps & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        return Err(LoadError::NotPrivileged(caps));
    }
    let offsets = btf_offsets::kernel_offsets(Path::new(VMLINUX_BTF))?;
    let btf = Btf::from_sys_fs()?;
    let syscalls = super::console::syscall_numbers();
    let console_hooks = tracefs::console_hooks(&syscalls);
    let tp_offsets = match &console_hooks {
        ConsoleHooks::PerSyscall { offsets, .. } => *offsets,
        ConsoleHooks::Raw(_) => SyscallTpOffsets::default(),
    };

    let mut ebpf = EbpfLoader::new()
        .btf(&btf)
        .override_global("OFFSETS", &offsets, true)
        .map_max_entries("TRACKED_PROCESSES", config.max_tracked_processes)
        .map_max_entries("PROCESS_EVENTS", config.process_events_ring_bytes)
        .map_max_entries("SCHED_THREADS", config.max_tracked_threads)
        .map_max_entries(
            "SCHED_STATS",
            config
                .max_tracked_processes
                .saturating_mul(thread_class::COUNT),
        )
        .override_global("SYSCALLS", &syscalls, true)
        .override_global("TP_OFFSETS", &tp_offsets, true)
        .map_max_entries("CONSOLE_EVENTS", config.console_ring_bytes)
        .map_max_entries("CONSOLE_FDS", config.max_console_fds)
        // One scratch record per possible CPU (the programs index it by CPU number).
        .map_max_entries("CONSOLE_SCRATCH", possible_cpus())
        .load(EBPF_OBJECT)
        .map_err(LoadError::Load)?;

    let mut exec_matchers: LpmTrie<_, CommKey, ExecMatch> = take_map(&mut ebpf, "EXEC_MATCHERS")?;
    for (matcher_id, matcher) in matchers.iter().enumerate() {
        let prefix = matcher
            .comm_prefix()
            .expect("matchers are checked when built");
        let key = Key::new((prefix.len * 8) as u32, prefix.bytes);
        let value = ExecMatch {
            matcher_id: matcher_id as u32,
        };
        exec_matchers
            .insert(&key, &value, 0)
            .map_err(|source| LoadError::Map {
                name: "EXEC_MATCHERS",
                source,
            })?;
    }

    // Kept until the programs are loaded below: they refer to the map by this fd.
    let _vcpu_comms = fill_vcpu_comms(&mut ebpf, matchers)?;
    let stats_enabled = match aya::sys::enable_stats(aya::sys::Stats::RunTime) {
        Ok(fd) => Some(fd),
        Err(error) => {
            warn!(%error, "kernel BPF statistics unavailable; collector_ebpf_program_* stay at 0");
            None
        }
    };

    let mut probes: Vec<ProbeState> = PROBES
        .iter()
        .map(|spec| attach(&mut ebpf, &btf, spec))
        .collect();
    probes.extend(attach_console(&mut ebpf, &btf, console_hooks));
    Ok(Kernel {
        tracked_processes: take_map(&mut ebpf, "TRACKED_PROCESSES")?,
        process_events: take_map(&mut ebpf, "PROCESS_EVENTS")?,
        drops: take_map(&mut ebpf, "DROPS")?,
        sched: SchedMaps::new(
            take_map(&mut ebpf, "SCHED_THREADS")?,
            take_map(&mut ebpf, "SCHED_STATS")?,
            thread_filter(&mut ebpf)?,
        ),
        stats_enabled,
        probes,
        ebpf,
    })
}

/// The literal prefixes of each matcher's vCPU thread names, for the kernel to classify threads
/// when they are named.
fn fill_vcpu_comms(
    ebpf: &mut Ebpf,
    matchers: &[Matcher],
) -> Result<LpmTrie<MapData, VcpuCommKey, u32>, LoadError> {
    let mut trie: LpmTrie<_, VcpuCommKey, u32> = take_map(ebpf, "SCHED_VCPU_COMMS")?;
    for (matcher_id, matcher) in matchers.iter().enumerate() {
        let prefixes = matcher.vcpu_comm_prefixes();
        if prefixes.is_empty() {
            warn!(
                matcher = matcher.name,
                "vcpu_thread pattern has no literal start: threads named after the instance was \
                 found count as vmm"
            );
        }
        for prefix in prefixes {
            let mut comm = [0u8; COMM_LEN];
            comm[..prefix.len()].copy_from_slice(&prefix);
            let key = Key::new(
                ((4 + prefix.len()) * 8) as u32,
                VcpuCommKey {
                    matcher_id: matcher_id as u32,
                    comm,
                },
            );
            trie.insert(&key, &1, 0).map_err(|source| LoadError::Map {
                name: "SCHED_VCPU_COMMS",
                source,
            })?;
        }
    }
    Ok(trie)
}

/// `SCHED_THREAD_FILTER`, mapped into memory.
fn thread_filter(ebpf: &mut Ebpf) -> Result<ThreadFilter, LoadError> {
    const NAME: &str = "SCHED_THREAD_FILTER";
    let Map::Array(data) = ebpf.take_map(NAME).ok_or(LoadError::MissingMap(NAME))? else {
        return Err(LoadError::Mmap {
            name: NAME,
            source: std::io::Error::other("not an array"),
        });
    };
    ThreadFilter::new(data).map_err(|source| LoadError::Mmap { name: NAME, source })
}

pub(super) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    let map = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))?;
    M::try_from(map).map_err(|source| LoadError::Map { name, source })
}

fn possible_cpus() -> u32 {
    aya::util::nr_cpus().map_or(1024, std::num::NonZeroU32::get)
}

fn attach(ebpf: &mut Ebpf, btf: &Btf, spec: &ProbeSpec) -> ProbeState {
    let result = (|| -> Result<(), String> {
        let program: &mut BtfTracePoint = ebpf
            .program_mut(spec.program)
            .ok_or("program missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        program
            .load(spec.tracepoint, btf)
            .map_err(|e| format!("load: {e}"))?;
        program.attach().map_err(|e| format!("attach: {e}"))?;
        Ok(())
    })();
    probe_state(spec.program, spec.tracepoint, spec.feature, result)
}

/// Console capture's programs: on every per-syscall tracepoint of the followed syscalls (one
/// probe each: a missing tracepoint loses only its syscall), or on the raw syscall tracepoints.
fn attach_console(ebpf: &mut Ebpf, btf: &Btf, hooks: ConsoleHooks) -> Vec<ProbeState> {
    let events = match hooks {
        ConsoleHooks::Raw(reason) => {
            info!(
                %reason,
                "console capture on the raw sys_enter/sys_exit tracepoints: they run for every \
                 syscall on the host"
            );
            return CONSOLE_RAW_PROBES
                .iter()
                .map(|spec| attach(ebpf, btf, spec))
                .collect();
        }
        ConsoleHooks::PerSyscall { events, .. } => events,
    };
    let mut load = |name: &str| -> Result<(), String> {
        let program: &mut TracePoint = ebpf
            .program_mut(name)
            .ok_or("program missing from the object")?
            .try_into()
            .map_err(|e| format!("{e}"))?;
        program.load().map_err(|e| format!("load: {e}"))
    };
    let loaded = [load("console_enter"), load("console_exit")];
    events
        .into_iter()
        .map(|event| {
            let (program, loaded) = if event.enter {
                ("console_enter", &loaded[0])
            } else {
                ("console_exit", &loaded[1])
            };
            let result = loaded.clone().and_then(|()| {
                if let Some(why) = event.unusable {
                    return Err(why);
                }
                let program: &mut TracePoint = ebpf
                    .program_mut(program)
                    .and_then(|p| p.try_into().ok())
                    .ok_or("program missing from the object")?;
                program
                    .attach("syscalls", &event.name)
                    .map(drop)
                    .map_err(|e| format!("attach: {e}"))
            });
            let feature = format!("console capture through {}", event.syscall);
            probe_state(event.probe, &event.name, &feature, result)
        })
        .collect()
}

/// Logs what became of a probe.
fn probe_state(
    probe: &'static str,
    tracepoint: &str,
    feature: &str,
    result: Result<(), String>,
) -> ProbeState {
    match result {
        Ok(()) => {
            info!(probe, tracepoint, "probe attached");
            ProbeState {
                probe,
                attached: true,
                error: None,
            }
        }
        Err(error) => {
            warn!(
                probe,
                tracepoint,
                disabled = feature,
                %error,
                "probe not attached; its feature is off, the rest keeps running"
            );
            ProbeState {
                probe,
                attached: false,
                error: Some(error),
            }
        }
    }
}
