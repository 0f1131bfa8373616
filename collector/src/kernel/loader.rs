//! Loads the embedded kernel object, fills its settings and attaches each program.
//!
//! A program that cannot attach (a kernel lacking that hook) disables only its own feature: the
//! failure is logged once, shown by `collector_probe_attached{probe}` = 0, and the rest runs.

use std::{
    path::Path,
    sync::{Arc, Mutex},
};

use aya::{
    Btf, Ebpf, EbpfLoader,
    maps::{LpmTrie, Map, MapData, PerCpuArray, RingBuf, lpm_trie::Key},
    programs::{BtfTracePoint, FExit, TracePoint},
};
use collector_common::{
    COMM_LEN, CommKey, ExecMatch, SyscallTpOffsets, VcpuCommKey,
    names::{global, map, program},
    thread_class,
};
use tracing::{info, warn};

use super::{
    btf_offsets::{self, OffsetError, VMLINUX_BTF},
    console::ConsoleKernel,
    console_fds::ConsoleFdSweep,
    sched::{SchedMaps, SharedSched, ThreadFilter},
    syscalls,
    tracefs::{self, ConsoleHooks},
    tracked::TrackedProcesses,
};
use crate::{
    config::{ConsoleHooksMode, KernelConfig},
    host::proc::effective_capabilities,
    matching::KernelPlan,
    model::probe::ProbeState,
};

/// The kernel object built by `build.rs` from `collector-ebpf`.
static EBPF_OBJECT: &[u8] =
    aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/collector-ebpf"));

/// A hook the collector attaches, by its `probe` label value.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ProbeSpec {
    /// Program name in the object (the Rust function's name).
    pub(crate) program: &'static str,
    /// The BTF tracepoint it attaches to.
    pub(crate) tracepoint: &'static str,
    /// What stops working without it.
    pub(crate) feature: &'static str,
}

/// Every probe but console capture's, in attach order (console capture's depend on the kernel,
/// see [`ConsoleHooks`]).
pub(crate) const PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: program::SCHED_PROCESS_EXEC,
        tracepoint: "sched_process_exec",
        feature: "discovery of new hypervisor processes",
    },
    ProbeSpec {
        program: program::SCHED_PROCESS_EXIT,
        tracepoint: "sched_process_exit",
        feature: "instance exit",
    },
    ProbeSpec {
        program: program::MARK_VICTIM,
        tracepoint: "mark_victim",
        feature: "OOM kill attribution (OOM kills then read as stop/killed)",
    },
    ProbeSpec {
        program: program::SCHED_SWITCH,
        tracepoint: "sched_switch",
        feature: "run-queue latency, CPU time and context switches of instances",
    },
    ProbeSpec {
        program: program::SCHED_WAKEUP,
        tracepoint: "sched_wakeup",
        feature: "run-queue latency after a wake-up",
    },
    ProbeSpec {
        program: program::SCHED_WAKEUP_NEW,
        tracepoint: "sched_wakeup_new",
        feature: "following the threads a VMM creates",
    },
    ProbeSpec {
        program: program::TASK_RENAME,
        tracepoint: "task_rename",
        feature: "telling vCPU threads from other VMM threads",
    },
];

/// Console capture's fallback on a kernel without per-syscall tracepoints: the raw syscall
/// tracepoints, which run for every syscall.
const CONSOLE_RAW_PROBES: &[ProbeSpec] = &[
    ProbeSpec {
        program: program::CONSOLE_SYS_ENTER,
        tracepoint: "sys_enter",
        feature: "console capture",
    },
    ProbeSpec {
        program: program::CONSOLE_SYS_EXIT,
        tracepoint: "sys_exit",
        feature: "console capture",
    },
];

#[derive(Debug, thiserror::Error)]
pub(crate) enum LoadError {
    #[error(
        "the collector needs root, or CAP_BPF and CAP_PERFMON, to load its kernel programs \
         (this process has effective capabilities {0:#x})"
    )]
    NotPrivileged(u64),
    #[error(transparent)]
    Offsets(#[from] OffsetError),
    #[error("cannot read kernel BTF for attaching")]
    Btf(#[from] aya::BtfError),
    #[error("the kernel refused the collector's programs")]
    Load(#[source] aya::EbpfError),
    #[error("kernel map {0} is missing from the object")]
    MissingMap(&'static str),
    #[error("kernel map {name}")]
    Map {
        name: &'static str,
        #[source]
        source: aya::maps::MapError,
    },
    #[error("kernel map {name}: cannot map it into memory")]
    Mmap {
        name: &'static str,
        #[source]
        source: std::io::Error,
    },
}

/// The loaded programs, shared by the metrics (their statistics) and the runtime (which
/// detaches them at shutdown).
#[derive(Clone)]
pub(crate) struct Programs(Arc<Mutex<Option<Ebpf>>>);

impl std::fmt::Debug for Programs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Programs").finish_non_exhaustive()
    }
}

/// Run count and run time of one program, from the kernel's BPF statistics.
#[derive(Debug, Clone, PartialEq)]
pub(crate) struct ProgramStats {
    pub(crate) program: String,
    pub(crate) runs: u64,
    pub(crate) run_seconds: f64,
    /// Instructions the verifier processed when it loaded the program (`verified_insns`, 5.16+;
    /// `None` on older kernels).
    pub(crate) verified_instructions: Option<u32>,
}

impl Programs {
    /// Every loaded program's statistics, by name; empty once detached.
    pub(crate) fn stats(&self) -> Vec<ProgramStats> {
        let guard = self.0.lock().expect("programs lock");
        let Some(ebpf) = guard.as_ref() else {
            return Vec::new();
        };
        let mut stats: Vec<ProgramStats> = ebpf
            .programs()
            .filter_map(|(name, program)| {
                let info = program.info().ok()?;
                Some(ProgramStats {
                    program: name.to_owned(),
                    runs: info.run_count(),
                    run_seconds: info.run_time().as_secs_f64(),
                    verified_instructions: info.verified_instruction_count(),
                })
            })
            .collect();
        stats.sort_by(|a, b| a.program.cmp(&b.program));
        stats
    }

    /// Detaches and unloads every program.
    pub(crate) fn detach(&self) {
        drop(self.0.lock().expect("programs lock").take());
    }
}

/// The kernel's drop counters (`DROPS`), summed over CPUs on read.
#[derive(Clone)]
pub(crate) struct KernelDrops(Arc<PerCpuArray<MapData, u64>>);

impl std::fmt::Debug for KernelDrops {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("KernelDrops").finish_non_exhaustive()
    }
}

impl KernelDrops {
    /// The count of drop kind `kind` (one of `collector_common::drop_kind`).
    pub(crate) fn get(&self, kind: u32) -> u64 {
        self.0.get(&kind, 0).map_or(0, |v| v.iter().sum())
    }
}

/// The loaded programs and the maps userspace works with.
pub(crate) struct Kernel {
    pub(crate) programs: Programs,
    pub(crate) probes: Vec<ProbeState>,
    pub(crate) tracked: TrackedProcesses,
    pub(crate) process_events: RingBuf<MapData>,
    pub(crate) drops: KernelDrops,
    pub(crate) sched: SharedSched,
    pub(crate) console: ConsoleKernel,
    /// Reconciliation's own handle on the console-descriptor map.
    pub(crate) console_fds: ConsoleFdSweep,
    pub(crate) console_events: RingBuf<MapData>,
}

const CAP_SYS_ADMIN: u64 = 21;
const CAP_PERFMON: u64 = 38;
const CAP_BPF: u64 = 39;

/// Loads and attaches everything. Errors only for what makes the collector useless (no
/// privileges, no BTF, the object refused); a single probe failing is recorded in
/// [`Kernel::probes`] instead.
pub(crate) fn load(config: &KernelConfig, plan: &KernelPlan) -> Result<Kernel, LoadError> {
    let caps = effective_capabilities();
    let has = |cap: u64| caps & (1 << cap) != 0;
    if !(has(CAP_SYS_ADMIN) || (has(CAP_BPF) && has(CAP_PERFMON))) {
        return Err(LoadError::NotPrivileged(caps));
    }
    raise_memlock_limit();
    let offsets = btf_offsets::kernel_offsets(Path::new(VMLINUX_BTF))?;
    let btf = Btf::from_sys_fs()?;
    let syscalls = syscalls::numbers();
    let console_plan = match config.console_hooks {
        ConsoleHooksMode::Auto => ConsolePlan::Fexit {
            fallback: Some(tracefs::console_hooks()),
        },
        ConsoleHooksMode::Fexit => ConsolePlan::Fexit { fallback: None },
        ConsoleHooksMode::SyscallTracepoints => ConsolePlan::Hooks(tracefs::console_hooks()),
        ConsoleHooksMode::RawSyscalls => ConsolePlan::Hooks(ConsoleHooks::Raw(
            "kernel.console_hooks = \"raw_syscalls\"".to_owned(),
        )),
    };
    // Set at load even when `fexit` comes first: the object is loaded once, and the
    // tracepoints are the fallback.
    let tp_offsets = match console_plan.hooks() {
        Some(ConsoleHooks::PerSyscall { offsets, .. }) => *offsets,
        _ => SyscallTpOffsets::default(),
    };

    let mut ebpf = EbpfLoader::new()
        .btf(&btf)
        .override_global(global::OFFSETS, &offsets, true)
        .map_max_entries(map::TRACKED_PROCESSES, config.max_tracked_processes)
        .map_max_entries(map::PROCESS_EVENTS, config.process_events_ring_bytes)
        .map_max_entries(map::SCHED_THREADS, config.max_tracked_threads)
        .map_max_entries(
            map::SCHED_STATS,
            config
                .max_tracked_processes
                .saturating_mul(thread_class::COUNT),
        )
        .override_global(global::SYSCALLS, &syscalls, true)
        .override_global(global::TP_OFFSETS, &tp_offsets, true)
        .map_max_entries(map::CONSOLE_EVENTS, config.console_ring_bytes)
        .map_max_entries(map::CONSOLE_FDS, config.max_console_fds)
        .map_max_entries(map::CONSOLE_PENDING, config.console_pending_entries)
        .map_max_entries(map::CONSOLE_PROCS, config.max_tracked_processes)
        .override_global(global::CONSOLE_LIMITS, &plan.console_limits, true)
        // One scratch record per possible CPU (the programs index it by CPU number).
        .map_max_entries(map::CONSOLE_SCRATCH, possible_cpus())
        .load(EBPF_OBJECT)
        .map_err(LoadError::Load)?;

    let mut exec_matchers: LpmTrie<_, CommKey, ExecMatch> =
        take_map(&mut ebpf, map::EXEC_MATCHERS)?;
    for (matcher_id, bytes, len) in &plan.exec_prefixes {
        let key = Key::new((len * 8) as u32, *bytes);
        let value = ExecMatch {
            matcher_id: *matcher_id,
        };
        exec_matchers
            .insert(&key, &value, 0)
            .map_err(|source| LoadError::Map {
                name: map::EXEC_MATCHERS,
                source,
            })?;
    }

    // Kept until the programs are loaded below: they refer to the map by this fd.
    let _vcpu_comms = fill_vcpu_comms(&mut ebpf, plan)?;
    let console_fds = ConsoleFdSweep::new(second_handle(&ebpf, map::CONSOLE_FDS)?);
    // The console rules are in place before the first program can see an open.
    let (console, console_events) = ConsoleKernel::take(&mut ebpf, &plan.console_rules)?;
    let mut probes: Vec<ProbeState> = PROBES
        .iter()
        .map(|spec| attach(&mut ebpf, &btf, spec))
        .collect();
    probes.extend(attach_console(&mut ebpf, &btf, console_plan));
    Ok(Kernel {
        tracked: TrackedProcesses::new(
            take_map(&mut ebpf, map::TRACKED_PROCESSES)?,
            mmap_filter(&mut ebpf, map::TRACKED_FILTER)?,
        ),
        process_events: take_map(&mut ebpf, map::PROCESS_EVENTS)?,
        drops: KernelDrops(Arc::new(take_map(&mut ebpf, map::DROPS)?)),
        sched: Arc::new(Mutex::new(SchedMaps::new(
            take_map(&mut ebpf, map::SCHED_THREADS)?,
            take_map(&mut ebpf, map::SCHED_STATS)?,
            mmap_filter(&mut ebpf, map::SCHED_THREAD_FILTER)?,
        ))),
        console,
        console_fds,
        console_events,
        probes,
        programs: Programs(Arc::new(Mutex::new(Some(ebpf)))),
    })
}

/// Kernels before 5.11 charge BPF maps and programs to RLIMIT_MEMLOCK (64 KiB by default on
/// 5.10, far below the ring buffers); later ones charge the memory cgroup and ignore it.
fn raise_memlock_limit() {
    let unlimited = libc::rlimit {
        rlim_cur: libc::RLIM_INFINITY,
        rlim_max: libc::RLIM_INFINITY,
    };
    // SAFETY: setrlimit reads the struct it is given.
    if unsafe { libc::setrlimit(libc::RLIMIT_MEMLOCK, &raw const unlimited) } != 0 {
        let error = std::io::Error::last_os_error();
        warn!(%error, "cannot lift RLIMIT_MEMLOCK; on kernels before 5.11 maps may not load");
    }
}

/// The literal prefixes of each matcher's vCPU thread names, for the kernel to classify threads
/// when they are named.
fn fill_vcpu_comms(
    ebpf: &mut Ebpf,
    plan: &KernelPlan,
) -> Result<LpmTrie<MapData, VcpuCommKey, u32>, LoadError> {
    let mut trie: LpmTrie<_, VcpuCommKey, u32> = take_map(ebpf, map::SCHED_VCPU_COMMS)?;
    for matcher in &plan.without_vcpu_prefix {
        warn!(
            matcher,
            "vcpu_thread pattern has no literal start: threads named after the instance was \
             found count as vmm"
        );
    }
    for (matcher_id, prefix) in &plan.vcpu_prefixes {
        let mut comm = [0u8; COMM_LEN];
        comm[..prefix.len()].copy_from_slice(prefix);
        let key = Key::new(
            ((4 + prefix.len()) * 8) as u32,
            VcpuCommKey {
                matcher_id: *matcher_id,
                comm,
            },
        );
        trie.insert(&key, &1, 0).map_err(|source| LoadError::Map {
            name: map::SCHED_VCPU_COMMS,
            source,
        })?;
    }
    Ok(trie)
}

/// A counting filter (`SCHED_THREAD_FILTER`, `TRACKED_FILTER`), mapped into memory.
fn mmap_filter(ebpf: &mut Ebpf, name: &'static str) -> Result<ThreadFilter, LoadError> {
    let Map::Array(data) = ebpf.take_map(name).ok_or(LoadError::MissingMap(name))? else {
        return Err(LoadError::Mmap {
            name,
            source: std::io::Error::other("not an array"),
        });
    };
    ThreadFilter::new(data).map_err(|source| LoadError::Mmap { name, source })
}

/// A handle of its own on the hash map `name`, which stays in `ebpf` for its owner to take.
fn second_handle<M>(ebpf: &Ebpf, name: &'static str) -> Result<M, LoadError>
where
    M: TryFrom<Map, Error = aya::maps::MapError>,
{
    use std::os::fd::AsFd;
    let Some(Map::HashMap(data)) = ebpf.map(name) else {
        return Err(LoadError::MissingMap(name));
    };
    let map_error = |source| LoadError::Map { name, source };
    let fd = data.fd().as_fd().try_clone_to_owned().map_err(|source| {
        map_error(aya::maps::MapError::SyscallError(aya::sys::SyscallError {
            call: "dup",
            io_error: source,
        }))
    })?;
    let data = MapData::from_fd(fd).map_err(map_error)?;
    M::try_from(Map::HashMap(data)).map_err(map_error)
}

pub(crate) fn take_map<M>(ebpf: &mut Ebpf, name: &'static str) -> Result<M, LoadError>
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

/// Which console hooks to attach, in the order to try them (from `kernel.console_hooks`).
enum ConsolePlan {
    /// `fexit` on the followed syscalls' handlers; if the kernel refuses it, `fallback` (none
    /// when `fexit` is forced).
    Fexit { fallback: Option<ConsoleHooks> },
    /// These hooks, without trying `fexit`.
    Hooks(ConsoleHooks),
}

impl ConsolePlan {
    /// The tracepoint hooks the plan may attach.
    fn hooks(&self) -> Option<&ConsoleHooks> {
        match self {
            Self::Fexit { fallback } => fallback.as_ref(),
            Self::Hooks(hooks) => Some(hooks),
        }
    }
}

/// Console capture's programs, by `plan`: `fexit` on the followed syscalls' handlers where the
/// kernel allows all of them (no task then pays the syscall-tracing slow path), else on every
/// per-syscall tracepoint of the followed syscalls (one probe each: a missing tracepoint loses
/// only its syscall), or on the raw syscall tracepoints.
fn attach_console(ebpf: &mut Ebpf, btf: &Btf, plan: ConsolePlan) -> Vec<ProbeState> {
    let hooks = match plan {
        ConsolePlan::Hooks(hooks) => hooks,
        ConsolePlan::Fexit { fallback } => match (attach_console_fexit(ebpf, btf), fallback) {
            (Ok(probes), _) => {
                info!(
                    hooks = "fexit",
                    "console capture on fexit programs on the syscall handlers"
                );
                return probes;
            }
            (Err(refused), None) => {
                return vec![probe_state(
                    refused.program,
                    &refused.handler,
                    "console capture (kernel.console_hooks = \"fexit\")",
                    Err(refused.error),
                )];
            }
            (Err(refused), Some(fallback)) => {
                info!(
                    program = refused.program,
                    handler = %refused.handler,
                    error = %refused.error,
                    "fexit on the syscall handlers refused by this kernel: console capture falls \
                     back to the syscall tracepoints (every task then takes the syscall-tracing \
                     slow path)"
                );
                fallback
            }
        },
    };
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
    let loaded = [load(program::CONSOLE_ENTER), load(program::CONSOLE_EXIT)];
    events
        .into_iter()
        .map(|event| {
            let (program, loaded) = if event.enter {
                (program::CONSOLE_ENTER, &loaded[0])
            } else {
                (program::CONSOLE_EXIT, &loaded[1])
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

/// The first `fexit` program the kernel refused, and why.
struct FexitRefused {
    program: &'static str,
    handler: String,
    error: String,
}

/// Loads and attaches one `fexit` program on each followed syscall's handler, all or none: at
/// the first refusal the ones attached are unloaded again (capture then falls back whole to
/// the tracepoints, rather than missing a syscall).
fn attach_console_fexit(ebpf: &mut Ebpf, btf: &Btf) -> Result<Vec<ProbeState>, FexitRefused> {
    let mut attached: Vec<(&'static str, String)> = Vec::new();
    for syscall in syscalls::SYSCALLS.iter().filter(|s| s.number.is_some()) {
        let handler = syscall.handler();
        if let Err(error) = attach_fexit(ebpf, btf, syscall.fexit_program, &handler) {
            // All or none: the attached ones go, and whatever the refused one's load kept.
            let loaded = attached.iter().map(|(program, _)| *program);
            for program in loaded.chain([syscall.fexit_program]) {
                if let Some(program) = ebpf
                    .program_mut(program)
                    .and_then(|p| <&mut FExit>::try_from(p).ok())
                {
                    let _ = program.unload();
                }
            }
            return Err(FexitRefused {
                program: syscall.fexit_program,
                handler,
                error,
            });
        }
        attached.push((syscall.fexit_program, handler));
    }
    Ok(attached
        .into_iter()
        .map(|(program, handler)| {
            probe_state(
                program,
                &handler,
                "console capture through its syscall",
                Ok(()),
            )
        })
        .collect())
}

/// Loads the `fexit` program `name` on kernel function `function` and attaches it.
fn attach_fexit(ebpf: &mut Ebpf, btf: &Btf, name: &str, function: &str) -> Result<(), String> {
    let program: &mut FExit = ebpf
        .program_mut(name)
        .ok_or("program missing from the object")?
        .try_into()
        .map_err(|e| format!("{e}"))?;
    program
        .load(function, btf)
        .map_err(|e| format!("load: {e}"))?;
    program.attach().map_err(|e| format!("attach: {e}"))?;
    Ok(())
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

#[cfg(test)]
mod tests {
    use super::*;

    /// The object's maps and programs are exactly the ones `collector_common::names` lists:
    /// userspace never looks one up by a name the kernel side does not declare, and nothing
    /// the kernel side declares is unknown here.
    #[test]
    fn object_names_match_the_contract() {
        let ebpf = EbpfLoader::new()
            .load(EBPF_OBJECT)
            .expect("the object loads (maps created; programs are verified only when attached)");
        let mut maps: Vec<&str> = ebpf
            .maps()
            .map(|(name, _)| name)
            .filter(|name| !name.starts_with('.'))
            .collect();
        maps.sort_unstable();
        let mut want: Vec<&str> = map::ALL.to_vec();
        want.sort_unstable();
        assert_eq!(maps, want);
        let mut programs: Vec<&str> = ebpf.programs().map(|(name, _)| name).collect();
        programs.sort_unstable();
        let mut want: Vec<&str> = program::ALL.to_vec();
        want.extend(program::CONSOLE_FEXIT);
        want.sort_unstable();
        assert_eq!(programs, want);
        for spec in PROBES.iter().chain(CONSOLE_RAW_PROBES) {
            assert!(program::ALL.contains(&spec.program), "{}", spec.program);
        }
    }
}
