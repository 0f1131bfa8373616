//! The kernel side's health and cost, read at scrape time: probe state, what the programs
//! gave up (the `DROPS` counters, one table below), run count and run time of each program
//! (kernel BPF statistics), entries of the scheduling maps.

use collector_common::drop_kind;

use crate::{
    kernel::{
        loader::{KernelDrops, Programs},
        program_stats::ProgramStatsSwitch,
        sched::{SchedReading, SharedSched},
    },
    model::{
        metrics::{MetricKind, MetricWriter, Value},
        probe::ProbeState,
    },
};

/// A family the kernel's drop counters are exported as.
struct DropFamily {
    name: &'static str,
    help: &'static str,
}

const EVENTS_LOST: DropFamily = DropFamily {
    name: "collector_ebpf_events_lost",
    help: "Events the kernel programs could not hand to userspace (ring buffer full).",
};
const TRACKED_MAP_FULL: DropFamily = DropFamily {
    name: "collector_ebpf_tracked_map_full",
    help: "Hypervisor execs the kernel could not follow because its process map was full.",
};
const CONSOLE_FD_MAP_FULL: DropFamily = DropFamily {
    name: "collector_ebpf_console_fd_map_full",
    help: "Console descriptors the kernel could not record because its console-fd map was full.",
};
const THREAD_MAP_FULL: DropFamily = DropFamily {
    name: "collector_ebpf_thread_map_full",
    help: "Threads of followed instances the kernel could not follow: its thread map was full \
           (kernel.max_tracked_threads).",
};

const CONSOLE_FD_QUOTA: DropFamily = DropFamily {
    name: "collector_ebpf_console_fd_quota_refused",
    help: "Console descriptors the kernel refused because their process already had \
           kernel.console_fd_quota of them in the console-fd map; their writes are not captured.",
};
const CONSOLE_PROC_MAP_FULL: DropFamily = DropFamily {
    name: "collector_ebpf_console_proc_map_full",
    help: "Console syscalls of followed processes whose console state (budget, loss counters) \
           could not be created: the console-process map was full.",
};
const CONSOLE_PENDING_FULL: DropFamily = DropFamily {
    name: "collector_ebpf_console_pending_full",
    help: "Opens and dups of followed processes not stashed between entry and exit: the \
           pending-syscall map was full (kernel.console_pending_entries). Writes refused there \
           are counted per instance, where=\"evicted\".",
};

/// A drop kind, the family it is exported in, and its labels there.
type DropSeries = (
    u32,
    &'static DropFamily,
    &'static [(&'static str, &'static str)],
);

/// Every drop kind, at its own index, with the family and labels it is exported as.
const DROPS: [DropSeries; drop_kind::COUNT as usize] = [
    (
        drop_kind::EXEC_EVENT_RESERVE,
        &EVENTS_LOST,
        &[("ring", "process"), ("event", "exec")],
    ),
    (
        drop_kind::EXIT_EVENT_RESERVE,
        &EVENTS_LOST,
        &[("ring", "process"), ("event", "exit")],
    ),
    (drop_kind::TRACKED_MAP_FULL, &TRACKED_MAP_FULL, &[]),
    (
        drop_kind::OOM_EVENT_RESERVE,
        &EVENTS_LOST,
        &[("ring", "process"), ("event", "oom")],
    ),
    (drop_kind::CONSOLE_FD_MAP_FULL, &CONSOLE_FD_MAP_FULL, &[]),
    (drop_kind::SCHED_THREAD_MAP_FULL, &THREAD_MAP_FULL, &[]),
    (drop_kind::CONSOLE_FD_QUOTA, &CONSOLE_FD_QUOTA, &[]),
    (
        drop_kind::CONSOLE_PROC_MAP_FULL,
        &CONSOLE_PROC_MAP_FULL,
        &[],
    ),
    (drop_kind::CONSOLE_PENDING_FULL, &CONSOLE_PENDING_FULL, &[]),
];

// The table holds every kind, in index order (so no kind goes unexported).
const _: () = {
    let mut i = 0;
    while i < DROPS.len() {
        assert!(DROPS[i].0 == i as u32);
        i += 1;
    }
};

/// Handles the kernel metrics are read from.
#[derive(Debug, Clone)]
pub(crate) struct KernelMetrics {
    pub(crate) probes: Vec<ProbeState>,
    pub(crate) drops: KernelDrops,
    pub(crate) programs: Programs,
    pub(crate) program_stats: ProgramStatsSwitch,
    pub(crate) sched: SharedSched,
}

impl KernelMetrics {
    /// Everything but the per-instance series; `sched` is the scrape's reading of
    /// [`Self::sched`].
    pub(crate) fn write(&self, w: &mut dyn MetricWriter, sched: &SchedReading) {
        w.family(
            "collector_probe_attached",
            "1 when the kernel probe is attached, 0 when its feature is off.",
            MetricKind::Gauge,
        );
        for probe in &self.probes {
            w.sample(
                &[("probe", probe.probe)],
                Value::Int(i64::from(probe.attached)),
            );
        }

        let mut written: Vec<&str> = Vec::new();
        for (_, family, _) in &DROPS {
            if written.contains(&family.name) {
                continue;
            }
            written.push(family.name);
            w.family(family.name, family.help, MetricKind::Counter);
            for (kind, _, labels) in DROPS.iter().filter(|(_, f, _)| f.name == family.name) {
                w.sample(labels, Value::Uint(self.drops.get(*kind)));
            }
        }

        self.write_programs(w);

        w.family(
            "collector_ebpf_map_entries",
            "Entries in the kernel's per-thread and per-instance scheduling maps.",
            MetricKind::Gauge,
        );
        for (map, entries) in [
            ("sched_threads", sched.threads as u64),
            ("sched_stats", sched.stats_entries() as u64),
            ("sched_thread_filter", sched.filter_total),
        ] {
            w.sample(&[("map", map)], Value::Uint(entries));
        }
    }

    /// Each program's run count and run time, and when the kernel counted them
    /// (`kernel.program_stats`): the counters move only while the statistics are on.
    fn write_programs(&self, w: &mut dyn MetricWriter) {
        let programs = self.programs.stats();
        w.family(
            "collector_ebpf_program_runs",
            "Times each kernel program ran while the kernel's BPF statistics were on.",
            MetricKind::Counter,
        );
        for p in &programs {
            w.sample(&[("program", p.program.as_str())], Value::Uint(p.runs));
        }
        w.family(
            "collector_ebpf_program_run_seconds",
            "Time spent running each kernel program while the kernel's BPF statistics were on.",
            MetricKind::Counter,
        );
        for p in &programs {
            w.sample(
                &[("program", p.program.as_str())],
                Value::Float(p.run_seconds),
            );
        }
        w.family(
            "collector_ebpf_program_stats_seconds",
            "Time the kernel's BPF statistics were on while the collector ran (held by it, or \
             the sysctl set), seen once a second: run_seconds divided by this is the programs' \
             CPU share while counted.",
            MetricKind::Counter,
        );
        w.sample(&[], Value::Float(self.program_stats.counted_seconds()));
        w.family(
            "collector_ebpf_program_verified_instructions",
            "Instructions the kernel's verifier processed to load each program (kernels 5.16 \
             and later).",
            MetricKind::Gauge,
        );
        for p in &programs {
            if let Some(insns) = p.verified_instructions {
                w.sample(
                    &[("program", p.program.as_str())],
                    Value::Uint(u64::from(insns)),
                );
            }
        }
        w.family(
            "collector_ebpf_program_stats_enabled",
            "1 while the kernel's BPF statistics are on: held by the collector \
             (kernel.program_stats), or set with the sysctl kernel.bpf_stats_enabled.",
            MetricKind::Gauge,
        );
        w.sample(
            &[("by", "collector")],
            Value::Int(i64::from(self.program_stats.holding())),
        );
        if let Some(set) = ProgramStatsSwitch::sysctl_set() {
            w.sample(&[("by", "sysctl")], Value::Int(i64::from(set)));
        }
    }
}
