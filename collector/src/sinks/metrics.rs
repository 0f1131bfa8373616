//! Instance metrics (`compute_instance_*`), read from the registry's snapshot at scrape time: an
//! instance that exited is absent from the next scrape, with no stale series to expire.

use std::time::UNIX_EPOCH;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::registry::SnapshotReceiver;

#[derive(Debug)]
pub struct InstanceMetrics {
    pub snapshot: SnapshotReceiver,
}

impl Collector for InstanceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.borrow().clone();

        let mut family = encoder.encode_descriptor(
            "compute_instance_info",
            "1 for each instance whose hypervisor process runs on this host.",
            None,
            MetricType::Gauge,
        )?;
        for i in snapshot.by_pid.values() {
            let labels = [
                ("instance_uuid", i.instance_uuid.as_str()),
                ("hypervisor", i.hypervisor.as_str()),
            ];
            ConstGauge::new(1).encode(family.encode_family(&labels)?)?;
        }

        let mut family = encoder.encode_descriptor(
            "compute_instance_start_time_seconds",
            "When the instance's hypervisor process started, in seconds since the Unix epoch.",
            None,
            MetricType::Gauge,
        )?;
        for i in snapshot.by_pid.values() {
            let seconds = i
                .start_time
                .duration_since(UNIX_EPOCH)
                .map_or(0.0, |d| d.as_secs_f64());
            ConstGauge::new(seconds)
                .encode(family.encode_family(&[("instance_uuid", i.instance_uuid.as_str())])?)?;
        }

        let family = encoder.encode_descriptor(
            "collector_instances",
            "Instances the collector follows on this host.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(snapshot.by_pid.len() as i64).encode(family)?;

        let mut family = encoder.encode_descriptor(
            "collector_build_info",
            "1, labelled with the collector's version.",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(1)
            .encode(family.encode_family(&[("version", env!("CARGO_PKG_VERSION"))])?)?;
        Ok(())
    }
}
