//! What each instance uses and was given (`compute_instance_*` CPU, run-queue latency, context
//! switches, memory), read at scrape time: the scheduling aggregates from the kernel's maps, the
//! resident memory from `/proc` (read in the background, [`super::resident`]), the allocation
//! from the registry. An instance that exited is
//! absent from the next scrape.

use collector_common::{SCHED_LATENCY_BUCKETS, SchedStats};

use super::{instances::instance_gauge, resident::ResidentMemory};
use crate::{
    kernel::sched::{ProcessSched, SchedReading},
    model::{
        instance::{LabelSet, Snapshot},
        metrics::{MetricKind, MetricWriter, Value},
    },
};

const NS_PER_SECOND: f64 = 1e9;

/// The kernel's buckets served for vCPU threads: every other one from 4 µs (4^i · 4 µs, up
/// to 262 ms), then +Inf. Ten buckets per vCPU class instead of the kernel's 22 keep an
/// instance's series within its budget (docs/metrics.md) while p50 and p99 between 4 µs and
/// 100 ms stay within a bucket of 4x.
const VCPU_BUCKETS: [usize; 9] = [2, 4, 6, 8, 10, 12, 14, 16, 18];

/// The served `(le, count)` buckets from the kernel's per-bucket counts, per bucket (not
/// cumulative: [`MetricWriter::histogram`] adds them up): `le` = 2^i µs of each kernel bucket
/// `i` in `served`, holding the kernel's buckets since the previous served one, then +Inf with
/// the rest.
fn served_buckets(kernel: &[u64; SCHED_LATENCY_BUCKETS], served: &[usize]) -> Vec<(f64, u64)> {
    let mut out = Vec::with_capacity(served.len() + 1);
    let mut next = 0usize;
    for &i in served {
        out.push((
            1e-6 * f64::from(1u32 << i),
            kernel[next..=i].iter().sum::<u64>(),
        ));
        next = i + 1;
    }
    out.push((f64::INFINITY, kernel[next..].iter().sum()));
    out
}

pub(crate) fn write(
    w: &mut dyn MetricWriter,
    snapshot: &Snapshot,
    sched: &SchedReading,
    resident: &ResidentMemory,
) {
    let instances: Vec<_> = snapshot.by_pid.values().collect();
    let per_instance: Vec<(Vec<(&'static str, &str)>, ProcessSched)> = instances
        .iter()
        .map(|i| (i.labels(LabelSet::Series), sched.process(i.pid)))
        .collect();
    write_sched(w, &per_instance);
    instance_gauge(
        w,
        "compute_instance_memory_rss_bytes",
        "Resident memory of the instance's VMM process (VmRSS): guest memory the guest has \
         touched plus the VMM's own.",
        instances.iter().copied(),
        |i| resident.of(i).map(Value::Uint),
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

    w.family(
        "compute_instance_runqueue_latency_seconds",
        "Time the instance's threads waited in a host run queue, from runnable to running.",
        MetricKind::Histogram,
    );
    for (labels, sched) in per_instance {
        for (thread, stats) in classes(sched) {
            // The VMM's own threads: sum and count only (their waits are not the guest's).
            let served: &[usize] = if thread == "vcpu" { &VCPU_BUCKETS } else { &[] };
            let buckets = served_buckets(&stats.latency_buckets, served);
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
    fn served_buckets_add_up_the_kernels() {
        let mut kernel = [0u64; SCHED_LATENCY_BUCKETS];
        // One wait in each kernel bucket: 1 µs, 2 µs, ..., 1.05 s, beyond.
        for (i, n) in kernel.iter_mut().enumerate() {
            *n = 1 + i as u64;
        }
        let total: u64 = kernel.iter().sum();
        let served = served_buckets(&kernel, &VCPU_BUCKETS);
        assert_eq!(served.len(), 10);
        // le = 4 µs holds the kernel's 1, 2 and 4 µs buckets; le = 16 µs its 8 and 16 µs ones.
        assert_eq!(served[0], (4e-6, 1 + 2 + 3));
        assert!((served[1].0 - 16e-6).abs() < 1e-15);
        assert_eq!(served[1].1, 4 + 5);
        assert!((served[8].0 - 0.262_144).abs() < 1e-12);
        assert_eq!(served[8].1, 18 + 19);
        assert_eq!(served[9], (f64::INFINITY, (20..=22).sum::<u64>()));
        assert_eq!(served.iter().map(|b| b.1).sum::<u64>(), total);
        // As exposed: cumulative, the +Inf bucket and the count every sample, once.
        let mut w = crate::sinks::prometheus::encode::TextWriter::new(
            crate::sinks::prometheus::Format::Text,
        );
        w.family("h_seconds", "H.", MetricKind::Histogram);
        w.histogram(&[], &served, 0.0);
        let text = w.finish();
        assert!(
            text.contains("h_seconds_bucket{le=\"0.000004\"} 6\n"),
            "{text}"
        );
        assert!(
            text.contains("h_seconds_bucket{le=\"0.000016\"} 15\n"),
            "{text}"
        );
        assert!(
            text.contains(&format!("h_seconds_bucket{{le=\"+Inf\"}} {total}\n")),
            "{text}"
        );
        assert!(
            text.contains(&format!("h_seconds_count {total}\n")),
            "{text}"
        );
        // Each served bound is the upper bound of its kernel bucket.
        for &i in &VCPU_BUCKETS {
            let ns = (1e3 * f64::from(1u32 << i)).round() as u64;
            assert_eq!(collector_common::latency_bucket(ns), i);
        }
        assert_eq!(served_buckets(&kernel, &[]), vec![(f64::INFINITY, total)]);
    }
}
