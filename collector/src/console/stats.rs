//! Per-instance console counters: bytes and lines by stream, dropped bytes by where they were
//! given up. Written by the pipeline and the file sink, read at scrape time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

/// Where console bytes were given up (the `where` label).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DropWhere {
    /// The kernel's console ring was full, or a write was over 64 KiB (the cut part).
    Kernel,
    /// The queue to the log files was full.
    Queue,
    /// The log files could not take them (disk cap reached, write error).
    Sink,
}

impl DropWhere {
    pub const ALL: [Self; 3] = [Self::Kernel, Self::Queue, Self::Sink];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::Kernel => "kernel",
            Self::Queue => "queue",
            Self::Sink => "sink",
        }
    }
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Counters {
    pub bytes: [u64; 3],
    pub lines: [u64; 3],
    pub dropped: [u64; 3],
}

#[derive(Debug, Default)]
struct Inner {
    per_instance: HashMap<Arc<str>, Counters>,
    /// Bytes of processes that never became instances (rejected by discovery, or gone
    /// before they were named).
    unattributed_bytes: u64,
}

/// Shared counters. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub struct ConsoleStats {
    inner: Arc<Mutex<Inner>>,
}

impl ConsoleStats {
    /// Applies `f` to the counters of `uuid`.
    pub fn update(&self, uuid: &Arc<str>, f: impl FnOnce(&mut Counters)) {
        let mut inner = self.inner.lock().expect("console stats lock");
        f(inner.per_instance.entry(uuid.clone()).or_default());
    }

    pub fn dropped(&self, uuid: &Arc<str>, at: DropWhere, bytes: u64) {
        self.update(uuid, |c| c.dropped[at as usize] += bytes);
    }

    pub fn unattributed(&self, bytes: u64) {
        self.inner
            .lock()
            .expect("console stats lock")
            .unattributed_bytes += bytes;
    }

    pub fn get(&self, uuid: &str) -> Counters {
        let inner = self.inner.lock().expect("console stats lock");
        inner.per_instance.get(uuid).copied().unwrap_or_default()
    }

    pub fn unattributed_bytes(&self) -> u64 {
        self.inner
            .lock()
            .expect("console stats lock")
            .unattributed_bytes
    }

    /// Forgets instances whose logs expired.
    pub fn forget(&self, uuid: &str) {
        self.inner
            .lock()
            .expect("console stats lock")
            .per_instance
            .remove(uuid);
    }
}
