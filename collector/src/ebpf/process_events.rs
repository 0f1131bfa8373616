//! Reader of the process-events ring buffer: wakes when the kernel has written and drains every
//! record. It never makes the kernel wait: when the ring is full the kernel drops and counts.

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use crate::{
    decode::{self, ProcessEvent},
    telemetry::SelfMetrics,
};

pub struct ProcessEventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    metrics: SelfMetrics,
}

impl ProcessEventReader {
    pub fn new(ring: RingBuf<MapData>, metrics: SelfMetrics) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as it
        // is inside the AsyncFd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
        Ok(Self { ring, metrics })
    }

    /// Waits for records and returns all that are there, decoded, in order.
    pub async fn next_batch(&mut self) -> std::io::Result<Vec<ProcessEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let ring = guard.get_inner_mut();
            let mut batch = Vec::new();
            while let Some(record) = ring.next() {
                match decode::process_event(&record) {
                    Ok(event) => batch.push(event),
                    Err(error) => {
                        tracing::warn!(%error, ring = "process", "undecodable kernel record");
                        self.metrics.decode_error("process", error.reason());
                    }
                }
            }
            guard.clear_ready();
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }
}
