//! Console metrics (`compute_instance_console_*`), read at scrape time from the console
//! counters for the instances in the registry's snapshot: like every `compute_instance_*`
//! series they leave with the instance. Each running instance shows every stream and every
//! `where`, zeros included, so `rate()` works from its first scrape.

use std::collections::BTreeSet;

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeMetric},
    metrics::{MetricType, counter::ConstCounter},
};

use crate::{
    console::{
        Stream,
        stats::{ConsoleStats, Counters, DropWhere},
    },
    registry::SnapshotReceiver,
};

/// Picks a per-stream counter array.
type PerStream = fn(&Counters) -> &[u64; 3];

#[derive(Debug)]
pub struct ConsoleMetrics {
    pub stats: ConsoleStats,
    pub snapshot: SnapshotReceiver,
}

impl Collector for ConsoleMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let snapshot = self.snapshot.borrow().clone();
        let uuids: BTreeSet<&str> = snapshot
            .by_pid
            .values()
            .map(|i| i.instance_uuid.as_str())
            .collect();
        let counters: Vec<(&str, Counters)> =
            uuids.iter().map(|u| (*u, self.stats.get(u))).collect();

        let by_stream: [(&str, &str, PerStream); 2] = [
            (
                "compute_instance_console_bytes",
                "Bytes the instance's hypervisor wrote to its console, by stream.",
                |c| &c.bytes,
            ),
            (
                "compute_instance_console_lines",
                "Console lines (records) of the instance, by stream.",
                |c| &c.lines,
            ),
        ];
        for (name, help, field) in by_stream {
            let mut family = encoder.encode_descriptor(name, help, None, MetricType::Counter)?;
            for (uuid, c) in &counters {
                for stream in Stream::ALL {
                    let labels = [("instance_uuid", *uuid), ("stream", stream.as_str())];
                    ConstCounter::new(field(c)[stream.index()])
                        .encode(family.encode_family(&labels)?)?;
                }
            }
        }

        let mut family = encoder.encode_descriptor(
            "compute_instance_console_dropped_bytes",
            "Console bytes of the instance given up, by where: kernel (ring full, or cut from a \
             write over 64 KiB), queue (log-file queue full), sink (disk cap or write error).",
            None,
            MetricType::Counter,
        )?;
        for (uuid, c) in &counters {
            for at in DropWhere::ALL {
                let labels = [("instance_uuid", *uuid), ("where", at.as_str())];
                ConstCounter::new(c.dropped[at as usize]).encode(family.encode_family(&labels)?)?;
            }
        }

        let family = encoder.encode_descriptor(
            "collector_console_unattributed_bytes",
            "Console bytes of processes that never became an instance (rejected by discovery, \
             or gone before they were named), dropped.",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(self.stats.unattributed_bytes()).encode(family)?;
        Ok(())
    }
}
