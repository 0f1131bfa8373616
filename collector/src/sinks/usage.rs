//! What each instance uses and was given (`compute_instance_*` CPU, run-queue latency, context
//! switches, memory), read at scrape time: the scheduling aggregates from the kernel's maps, the
//! resident memory from `/proc`, the allocation from the registry. An instance that exited is
//! absent from the next scrape.

use std::{
    collections::HashMap,
    sync::{Arc, OnceLock},
};

use collector_common::{SCHED_LATENCY_BUCKETS, SchedStats};
use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter, exemplar::Exemplar},
};

use super::metrics::encode_instance_gauge;
use crate::{
    ebpf::sched::{ProcessSched, SharedSched},
    registry::SnapshotReceiver,
};

/// The scheduling maps, set once the programs are loaded.
pub type SchedCell = Arc<OnceLock<SharedSched>>;

#[derive(Debug)]
pub struct UsageMetrics {
    pub snapshot: SnapshotReceiver,
    pub sched: SchedCell,
}

const NS_PER_SECOND: f64 = 1e9;

/// Upper bounds of the latency buckets, seconds: 2^i µs, then +Inf.
fn latency_bounds() -> [f64; SCHED_LATENCY_BUCKETS] {
    let mut bounds = [f64::INFINITY; SCHED_LATENCY_BUCKETS];
    for (i, bound) in bounds
        .iter_mut()
        .take(SCHED_LATENCY_BUCKETS - 1)
        .enumerate()
    {
        *bound = 1e-6 * f64::from(1u32 << i);
    }
    bounds
}

/// Resident memory of process `pid` in bytes: `/proc/PID/statm`'s resident pages, the figure
/// `VmRSS` shows in `/proc/PID/status`.
pub fn resident_bytes(pid: u32) -> Option<u64> {
    let statm = std::fs::read_to_string(format!("/proc/{pid}/statm")).ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    // SAFETY: sysconf has no preconditions.
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    Some(pages * u64::try_from(page).ok()?)
}

impl Collector for UsageMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.borrow().clone();
        let instances: Vec<_> = snapshot.by_pid.values().collect();

        if let Some(sched) = self.sched.get() {
            let per_instance: Vec<(&str, ProcessSched)> = {
                let maps = sched.lock().expect("sched lock");
                instances
                    .iter()
                    .map(|i| (i.instance_uuid.as_str(), maps.process(i.pid)))
                    .collect()
            };
            encode_sched(&mut encoder, &per_instance)?;
        }

        encode_instance_gauge(
            &mut encoder,
            "compute_instance_memory_rss_bytes",
            "Resident memory of the instance's VMM process (VmRSS): guest memory the guest has \
             touched plus the VMM's own.",
            instances.iter().copied(),
            |i| resident_bytes(i.pid).map(|b| b as i64),
        )?;
        encode_instance_gauge(
            &mut encoder,
            "compute_instance_memory_allocated_bytes",
            "Memory the instance was configured with (VMM configuration).",
            instances.iter().copied(),
            |i| i.allocation.memory_bytes.map(|b| b as i64),
        )?;
        encode_instance_gauge(
            &mut encoder,
            "compute_instance_vcpus",
            "vCPUs the instance was configured with (VMM configuration).",
            instances.iter().copied(),
            |i| i.allocation.vcpus.map(i64::from),
        )?;
        Ok(())
    }
}

fn encode_sched(
    encoder: &mut DescriptorEncoder,
    per_instance: &[(&str, ProcessSched)],
) -> Result<(), std::fmt::Error> {
    let classes = |p: &ProcessSched| [("vcpu", p.vcpu), ("vmm", p.vmm)];

    let bounds = latency_bounds();
    let mut family = encoder.encode_descriptor(
        "compute_instance_runqueue_latency_seconds",
        "Time the instance's threads waited in a host run queue, from runnable to running.",
        None,
        MetricType::Histogram,
    )?;
    for (uuid, sched) in per_instance {
        for (thread, stats) in classes(sched) {
            let buckets: Vec<(f64, u64)> =
                bounds.iter().copied().zip(stats.latency_buckets).collect();
            let count = stats.latency_buckets.iter().sum();
            family
                .encode_family(&[("instance_uuid", *uuid), ("thread", thread)])?
                .encode_histogram::<Vec<(String, String)>>(
                    stats.latency_sum_ns as f64 / NS_PER_SECOND,
                    count,
                    &buckets,
                    None::<&HashMap<usize, Exemplar<Vec<(String, String)>, f64>>>,
                )?;
        }
    }

    let mut family = encoder.encode_descriptor(
        "compute_instance_cpu_seconds",
        "CPU time of the instance's threads, as the kernel accounts it (sum_exec_runtime).",
        None,
        MetricType::Counter,
    )?;
    for (uuid, sched) in per_instance {
        for (thread, stats) in classes(sched) {
            ConstCounter::new(stats.cpu_ns as f64 / NS_PER_SECOND)
                .encode(family.encode_family(&[("instance_uuid", *uuid), ("thread", thread)])?)?;
        }
    }

    let mut family = encoder.encode_descriptor(
        "compute_instance_context_switches",
        "Context switches of the instance's threads: voluntary (blocked) or involuntary \
         (preempted while runnable).",
        None,
        MetricType::Counter,
    )?;
    for (uuid, sched) in per_instance {
        let sum = |f: fn(&SchedStats) -> u64| f(&sched.vcpu) + f(&sched.vmm);
        for (kind, value) in [
            ("voluntary", sum(|s| s.voluntary)),
            ("involuntary", sum(|s| s.involuntary)),
        ] {
            ConstCounter::new(value)
                .encode(family.encode_family(&[("instance_uuid", *uuid), ("kind", kind)])?)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_match_the_kernel() {
        let bounds = latency_bounds();
        assert_eq!(bounds[0], 1e-6);
        assert_eq!(bounds[20], 1.048576);
        assert!(bounds[21].is_infinite());
        // A wait just inside each bound lands in that bucket.
        for (i, bound) in bounds.iter().enumerate().take(SCHED_LATENCY_BUCKETS - 1) {
            let ns = (bound * 1e9).round() as u64;
            assert_eq!(collector_common::latency_bucket(ns), i);
            assert_eq!(collector_common::latency_bucket(ns + 1), i + 1);
        }
    }

    #[test]
    fn own_resident_memory() {
        let status = std::fs::read_to_string("/proc/self/status").unwrap();
        let vm_rss_kib: u64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap();
        let rss = resident_bytes(std::process::id()).unwrap();
        let diff = rss.abs_diff(vm_rss_kib * 1024);
        assert!(diff * 20 < rss, "statm {rss} vs VmRSS {vm_rss_kib} KiB");
    }
}
