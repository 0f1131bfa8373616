//! Reader of the process-events ring buffer: wakes when the kernel has written and drains every
//! record. It never makes the kernel wait: when the ring is full the kernel drops and counts.

use aya::maps::{MapData, RingBuf};
use tokio::io::{Interest, unix::AsyncFd};

use super::process_decode;
use crate::model::{metrics::CounterVec, process::ProcessEvent};

pub(crate) struct ProcessEventReader {
    ring: AsyncFd<RingBuf<MapData>>,
    decode_errors: CounterVec,
}

impl ProcessEventReader {
    pub(crate) fn new(ring: RingBuf<MapData>, decode_errors: CounterVec) -> std::io::Result<Self> {
        // SAFETY: the ring buffer owns its map fd and keeps it open, unchanged, for as long as it
        // is inside the AsyncFd.
        let ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE)? };
        Ok(Self {
            ring,
            decode_errors,
        })
    }

    /// Waits for records and returns all that are there, decoded, in order.
    pub(crate) async fn next_batch(&mut self) -> std::io::Result<Vec<ProcessEvent>> {
        loop {
            let mut guard = self.ring.readable_mut().await?;
            let batch = drain(guard.get_inner_mut(), &self.decode_errors);
            if batch.len() < MAX_BATCH {
                // Drained: wait for the next wake-up.
                guard.clear_ready();
            }
            if !batch.is_empty() {
                return Ok(batch);
            }
        }
    }

    /// The records there are now, without waiting: what reconciliation reads before it trusts
    /// `/proc`, and shutdown before it stops.
    pub(crate) fn drain_now(&mut self) -> Vec<ProcessEvent> {
        drain(self.ring.get_mut(), &self.decode_errors)
    }
}

/// Records taken in one go, at most (more than a full default ring holds; a flood of execs
/// cannot keep the reader from the rest of its work).
const MAX_BATCH: usize = 1 << 16;

fn drain(ring: &mut RingBuf<MapData>, decode_errors: &CounterVec) -> Vec<ProcessEvent> {
    let mut batch = Vec::new();
    while batch.len() < MAX_BATCH
        && let Some(record) = ring.next()
    {
        match process_decode::process_event(&record) {
            Ok(event) => batch.push(event),
            Err(error) => {
                tracing::warn!(%error, ring = "process", "undecodable kernel record");
                decode_errors.inc(&["process", error.reason()]);
            }
        }
    }
    batch
}
