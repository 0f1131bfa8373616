//! What each instance uses and was given (`compute_instance_*` CPU, run-queue latency, context
//! switches, memory), read at scrape time: the scheduling aggregates from the kernel's maps, the
//! resident memory from `/proc`, the allocation from the registry. An instance that exited is
//! absent from the next scrape.

use collector_common::{SCHED_LATENCY_BUCKETS, SchedStats};

use super::instances::instance_gauge;
use crate::{
    host::proc,
    kernel::sched::{ProcessSched, SharedSched},
    model::{
        instance::{LabelSet, Snapshot},
        metrics::{MetricKind, MetricWriter, Value},
    },
};

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

pub(crate) fn write(w: &mut dyn MetricWriter, snapshot: &Snapshot, sched: &SharedSched) {
    let instances: Vec<_> = snapshot.by_pid.values().collect();
    let per_instance: Vec<(Vec<(&'static str, &str)>, ProcessSched)> = {
        let maps = sched.lock().expect("sched lock");
        instances
            .iter()
            .map(|i| (i.labels(LabelSet::Series), maps.process(i.pid)))
            .collect()
    };
    write_sched(w, &per_instance);
    instance_gauge(
        w,
        "compute_instance_memory_rss_bytes",
        "Resident memory of the instance's VMM process (VmRSS): guest memory the guest has \
         touched plus the VMM's own.",
        instances.iter().copied(),
        |i| proc::resident_bytes(i.pid).map(Value::Uint),
    );
    instance_gauge(
        w,
        "compute_instance_memory_allocated_bytes",
        "Memory the instance was configured with (VMM configuration).",
        instances.iter().copied(),
        |i| i.allocation.memory_bytes.map(Value::Uint),
    );
    instance_gauge(
        w,
        "compute_instance_vcpus",
        "vCPUs the instance was configured with (VMM configuration).",
        instances.iter().copied(),
        |i| i.allocation.vcpus.map(|v| Value::Uint(u64::from(v))),
    );
}

/// The label sets of one instance's scheduling series, with the class label added.
fn with<'a>(
    labels: &[(&'static str, &'a str)],
    extra: (&'static str, &'a str),
) -> Vec<(&'static str, &'a str)> {
    let mut all = labels.to_vec();
    all.push(extra);
    all
}

fn write_sched(
    w: &mut dyn MetricWriter,
    per_instance: &[(Vec<(&'static str, &str)>, ProcessSched)],
) {
    let classes = |p: &ProcessSched| [("vcpu", p.vcpu), ("vmm", p.vmm)];

    let bounds = latency_bounds();
    w.family(
        "compute_instance_runqueue_latency_seconds",
        "Time the instance's threads waited in a host run queue, from runnable to running.",
        MetricKind::Histogram,
    );
    for (labels, sched) in per_instance {
        for (thread, stats) in classes(sched) {
            let buckets: Vec<(f64, u64)> =
                bounds.iter().copied().zip(stats.latency_buckets).collect();
            w.histogram(
                &with(labels, ("thread", thread)),
                &buckets,
                stats.latency_sum_ns as f64 / NS_PER_SECOND,
            );
        }
    }

    w.family(
        "compute_instance_cpu_seconds",
        "CPU time of the instance's threads, as the kernel accounts it (sum_exec_runtime).",
        MetricKind::Counter,
    );
    for (labels, sched) in per_instance {
        for (thread, stats) in classes(sched) {
            w.sample(
                &with(labels, ("thread", thread)),
                Value::Float(stats.cpu_ns as f64 / NS_PER_SECOND),
            );
        }
    }

    w.family(
        "compute_instance_context_switches",
        "Context switches of the instance's threads: voluntary (blocked) or involuntary \
         (preempted while runnable).",
        MetricKind::Counter,
    );
    for (labels, sched) in per_instance {
        let sum = |f: fn(&SchedStats) -> u64| f(&sched.vcpu) + f(&sched.vmm);
        for (kind, value) in [
            ("voluntary", sum(|s| s.voluntary)),
            ("involuntary", sum(|s| s.involuntary)),
        ] {
            w.sample(&with(labels, ("kind", kind)), Value::Uint(value));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bucket_bounds_match_the_kernel() {
        let bounds = latency_bounds();
        assert_eq!(bounds[0], 1e-6);
        assert!((bounds[20] - 1.048_576).abs() < 1e-12);
        assert!(bounds[21].is_infinite());
        // A wait just inside each bound lands in that bucket.
        for (i, bound) in bounds.iter().enumerate().take(SCHED_LATENCY_BUCKETS - 1) {
            let ns = (bound * 1e9).round() as u64;
            assert_eq!(collector_common::latency_bucket(ns), i);
            assert_eq!(collector_common::latency_bucket(ns + 1), i + 1);
        }
    }
}
