//! The kernel side's health and cost, read at scrape time: probe state, what the programs
//! gave up (the `DROPS` counters, one table below), run count and run time of each program
//! (kernel BPF statistics), entries of the scheduling maps.

use collector_common::drop_kind;

use crate::{
    kernel::{
        loader::{KernelDrops, Programs},
        sched::SharedSched,
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
    pub(crate) sched: SharedSched,
}

impl KernelMetrics {
    pub(crate) fn write(&self, w: &mut dyn MetricWriter) {
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

        let programs = self.programs.stats();
        w.family(
            "collector_ebpf_program_runs",
            "Times each kernel program ran (kernel BPF statistics, on while the collector runs).",
            MetricKind::Counter,
        );
        for p in &programs {
            w.sample(&[("program", p.program.as_str())], Value::Uint(p.runs));
        }
        w.family(
            "collector_ebpf_program_run_seconds",
            "Time spent running each kernel program (kernel BPF statistics).",
            MetricKind::Counter,
        );
        for p in &programs {
            w.sample(
                &[("program", p.program.as_str())],
                Value::Float(p.run_seconds),
            );
        }
        w.family(
            "collector_ebpf_program_verified_instructions",
            "Instructions the kernel's verifier processed to load each program (kernels 5.16 and later).",
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

        let ((threads, stats), filter) = {
            let sched = self.sched.lock().expect("sched lock");
            (sched.entries(), sched.filter_total())
        };
        w.family(
            "collector_ebpf_map_entries",
            "Entries in the kernel's per-thread and per-instance scheduling maps.",
            MetricKind::Gauge,
        );
        for (map, entries) in [
            ("sched_threads", threads as u64),
            ("sched_stats", stats as u64),
            ("sched_thread_filter", filter),
        ] {
            w.sample(&[("map", map)], Value::Uint(entries));
        }
    }
}
