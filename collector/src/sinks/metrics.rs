//! Instance metrics (`compute_instance_*`), read from the registry's snapshot at scrape time: an
//! instance that exited is absent from the next scrape, with no stale series to expire.

use std::time::UNIX_EPOCH;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeGaugeValue, EncodeMetric},
    metrics::{MetricType, gauge::ConstGauge},
};

use crate::registry::{Instance, SnapshotReceiver};

/// Encodes the gauge family `name` with one `{instance_uuid}` sample per instance for which
/// `value` has one.
pub fn encode_instance_gauge<'a, N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    instances: impl IntoIterator<Item = &'a Instance>,
    value: impl Fn(&Instance) -> Option<N>,
) -> Result<(), std::fmt::Error>
where
    N: EncodeGaugeValue + Send + Sync + std::fmt::Debug + 'static,
{
    let mut family = encoder.encode_descriptor(name, help, None, MetricType::Gauge)?;
    for instance in instances {
        if let Some(v) = value(instance) {
            let labels = [("instance_uuid", instance.instance_uuid.as_str())];
            ConstGauge::new(v).encode(family.encode_family(&labels)?)?;
        }
    }
    Ok(())
}

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

        encode_instance_gauge(
            &mut encoder,
            "compute_instance_start_time_seconds",
            "When the instance's hypervisor process started, in seconds since the Unix epoch.",
            snapshot.by_pid.values(),
            |i| {
                Some(
                    i.start_time
                        .duration_since(UNIX_EPOCH)
                        .map_or(0.0, |d| d.as_secs_f64()),
                )
            },
        )?;

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
