//! What the kernel programs cost and hold, read at scrape time: run count and run time of each
//! program from the kernel's BPF statistics (turned on by the loader for as long as the collector
//! runs), entries of the scheduling maps, and threads the kernel could not follow.

use std::sync::{Arc, Mutex};

use aya::Ebpf;
use collector_common::DROP_SCHED_THREAD_MAP_FULL;
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, gauge::ConstGauge},
};

use super::SharedDrops;
use crate::sinks::usage::SchedCell;

/// The loaded programs, set once loaded; the daemon takes them out to detach them at shutdown.
pub type SharedEbpf = Arc<Mutex<Option<Ebpf>>>;

pub struct EbpfStats {
    pub ebpf: SharedEbpf,
    pub drops: SharedDrops,
    pub sched: SchedCell,
}

impl std::fmt::Debug for EbpfStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EbpfStats").finish_non_exhaustive()
    }
}

/// `(program, run count, run time in seconds)` of every loaded program.
fn program_stats(ebpf: &Ebpf) -> Vec<(String, u64, f64)> {
    let mut stats: Vec<_> = ebpf
        .programs()
        .filter_map(|(name, program)| {
            let info = program.info().ok()?;
            Some((
                name.to_owned(),
                info.run_count(),
                info.run_time().as_secs_f64(),
            ))
        })
        .collect();
    stats.sort_by(|a, b| a.0.cmp(&b.0));
    stats
}

impl Collector for EbpfStats {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let programs = self
            .ebpf
            .lock()
            .expect("ebpf lock")
            .as_ref()
            .map(program_stats)
            .unwrap_or_default();
        let mut family = encoder.encode_descriptor(
            "collector_ebpf_program_runs",
            "Times each kernel program ran (kernel BPF statistics, on while the collector runs).",
            None,
            MetricType::Counter,
        )?;
        for (program, runs, _) in &programs {
            ConstCounter::new(*runs)
                .encode(family.encode_family(&[("program", program.as_str())])?)?;
        }
        let mut family = encoder.encode_descriptor(
            "collector_ebpf_program_run_seconds",
            "Time spent running each kernel program (kernel BPF statistics).",
            None,
            MetricType::Counter,
        )?;
        for (program, _, seconds) in &programs {
            ConstCounter::new(*seconds)
                .encode(family.encode_family(&[("program", program.as_str())])?)?;
        }

        if let Some(sched) = self.sched.get() {
            let ((threads, stats), filter) = {
                let sched = sched.lock().expect("sched lock");
                (sched.entries(), sched.filter_total())
            };
            let mut family = encoder.encode_descriptor(
                "collector_ebpf_map_entries",
                "Entries in the kernel's per-thread and per-instance scheduling maps.",
                None,
                MetricType::Gauge,
            )?;
            for (map, entries) in [
                ("sched_threads", threads as i64),
                ("sched_stats", stats as i64),
                ("sched_thread_filter", filter as i64),
            ] {
                ConstGauge::new(entries).encode(family.encode_family(&[("map", map)])?)?;
            }
        }

        if let Some(drops) = self.drops.get() {
            let full = drops
                .get(&DROP_SCHED_THREAD_MAP_FULL, 0)
                .map_or(0, |v| v.iter().sum::<u64>());
            let family = encoder.encode_descriptor(
                "collector_ebpf_thread_map_full",
                "Threads of followed instances the kernel could not follow: its thread map was \
                 full (kernel.max_tracked_threads).",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(full).encode(family)?;
        }
        Ok(())
    }
}
