//! Metric families, independent of any exposition format. Collectors describe what they hold
//! through a [`MetricWriter`]; an encoder (the Prometheus sink) turns that into text. Counters
//! that several stages increment are plain shared handles ([`Counter`], [`CounterVec`]).

use std::{
    collections::BTreeMap,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
};

/// The type of a metric family.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MetricKind {
    /// Monotonic; exposed with a `_total` suffix.
    Counter,
    Gauge,
    /// Cumulative buckets with `_sum` and `_count`.
    Histogram,
}

/// A sample's value: integers stay exact, fractions are floats.
#[derive(Debug, Clone, Copy, PartialEq)]
pub(crate) enum Value {
    Int(i64),
    Uint(u64),
    Float(f64),
}

/// Where collectors write their families, in order: a family, then its samples.
pub(crate) trait MetricWriter {
    /// Starts the family `name` (counters without `_total`), described by `help` (one
    /// sentence, ending with a full stop).
    fn family(&mut self, name: &str, help: &str, kind: MetricKind);
    /// One sample of the current counter or gauge family.
    fn sample(&mut self, labels: &[(&str, &str)], value: Value);
    /// One histogram of the current histogram family: `(upper bound, count in that bucket)`
    /// per bucket, not cumulative, the last bound `+Inf`; `sum` of the observations.
    fn histogram(&mut self, labels: &[(&str, &str)], buckets: &[(f64, u64)], sum: f64);
}

/// A count shared by handle.
#[derive(Debug, Clone, Default)]
pub(crate) struct Counter(Arc<AtomicU64>);

impl Counter {
    pub(crate) fn inc(&self) {
        self.add(1);
    }

    pub(crate) fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub(crate) fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Counts by label values (closed vocabularies only: reasons, event kinds, configured names).
#[derive(Debug, Clone, Default)]
pub(crate) struct CounterVec {
    values: Arc<Mutex<BTreeMap<Vec<String>, u64>>>,
}

impl CounterVec {
    pub(crate) fn inc(&self, labels: &[&str]) {
        self.add(labels, 1);
    }

    pub(crate) fn add(&self, labels: &[&str], n: u64) {
        let key: Vec<String> = labels.iter().map(|l| (*l).to_owned()).collect();
        *self
            .values
            .lock()
            .expect("counter lock")
            .entry(key)
            .or_default() += n;
    }

    /// Makes the series exist at 0, so that `rate()` over it works before the first count.
    pub(crate) fn preset(&self, labels: &[&str]) {
        self.add(labels, 0);
    }

    /// Every series with its count, ordered by label values.
    pub(crate) fn values(&self) -> Vec<(Vec<String>, u64)> {
        let values = self.values.lock().expect("counter lock");
        values.iter().map(|(k, v)| (k.clone(), *v)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counter_vec_counts_by_labels() {
        let counts = CounterVec::default();
        counts.preset(&["b"]);
        counts.inc(&["a"]);
        counts.add(&["a"], 2);
        assert_eq!(
            counts.values(),
            [(vec!["a".to_owned()], 3), (vec!["b".to_owned()], 0)]
        );
        let shared = counts.clone();
        shared.inc(&["b"]);
        assert_eq!(counts.values()[1].1, 1);
    }
}
