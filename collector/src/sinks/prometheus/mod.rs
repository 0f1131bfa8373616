//! `/metrics`: every family, read at scrape time from the handles of the stages that hold the
//! data, encoded as OpenMetrics or Prometheus text (see [`encode`]). docs/metrics.md lists each
//! family; a test checks both ways.

mod console;
pub(crate) mod encode;
mod health;
mod instances;
mod kernel;
pub(crate) mod resident;
mod usage;

pub(crate) use encode::Format;
pub(crate) use kernel::KernelMetrics;
use resident::ResidentMemory;

use crate::model::{console_stats::ConsoleStats, health::Health, instance::SnapshotReceiver};

/// What the exposition reads. Cheap to clone.
#[derive(Debug, Clone)]
pub(crate) struct Exposition {
    pub(crate) snapshot: SnapshotReceiver,
    pub(crate) health: Health,
    pub(crate) kernel: KernelMetrics,
    pub(crate) console: ConsoleStats,
    pub(crate) resident: ResidentMemory,
}

impl Exposition {
    /// The whole exposition. May read `/proc` (an instance new since the last refresh of
    /// [`ResidentMemory`]): call it off the async workers.
    pub(crate) fn render(&self, format: Format) -> String {
        let snapshot = self.snapshot.borrow().clone();
        // The scheduling maps read once, for the instances' series and the maps' sizes.
        let sched = self.kernel.sched.lock().expect("sched lock").read();
        let mut w = encode::TextWriter::new(format);
        health::write(&mut w, &self.health);
        self.kernel.write(&mut w, &sched);
        instances::write(&mut w, &snapshot, &self.health.instance_events);
        usage::write(&mut w, &snapshot, &sched, &self.resident);
        console::write(&mut w, &snapshot, &self.console);
        w.finish()
    }
}
