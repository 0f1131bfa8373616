//! Per-instance console counters: bytes and lines by stream, dropped bytes by where they were
//! given up. Written by the console source and the console-log sink, read at scrape time.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex},
};

use super::console::{DROP_WHERES, DropWhere};

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Counters {
    pub(crate) bytes: [u64; 3],
    pub(crate) lines: [u64; 3],
    pub(crate) dropped: [u64; DROP_WHERES],
}

#[derive(Debug, Default)]
struct Inner {
    per_instance: HashMap<Arc<str>, Counters>,
    /// Bytes of processes that never became instances (rejected by discovery, or gone
    /// before they were named).
    unattributed_bytes: u64,
    identity: IdentityHold,
}

/// The console files' wait for identity (with the Kubernetes source on): what is held now, and
/// the lines written without one after the wait.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct IdentityHold {
    pub(crate) held_lines: u64,
    pub(crate) held_bytes: u64,
    /// Lines written without identity: the wait, or its byte bound, ran out first.
    pub(crate) unnamed_lines: u64,
}

/// Shared counters. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct ConsoleStats {
    inner: Arc<Mutex<Inner>>,
}

impl ConsoleStats {
    /// Applies `f` to the counters of `uuid`.
    pub(crate) fn update(&self, uuid: &Arc<str>, f: impl FnOnce(&mut Counters)) {
        let mut inner = self.inner.lock().expect("console stats lock");
        f(inner.per_instance.entry(uuid.clone()).or_default());
    }

    pub(crate) fn dropped(&self, uuid: &Arc<str>, at: DropWhere, bytes: u64) {
        self.update(uuid, |c| c.dropped[at as usize] += bytes);
    }

    pub(crate) fn unattributed(&self, bytes: u64) {
        self.inner
            .lock()
            .expect("console stats lock")
            .unattributed_bytes += bytes;
    }

    pub(crate) fn get(&self, uuid: &str) -> Counters {
        let inner = self.inner.lock().expect("console stats lock");
        inner.per_instance.get(uuid).copied().unwrap_or_default()
    }

    pub(crate) fn unattributed_bytes(&self) -> u64 {
        self.inner
            .lock()
            .expect("console stats lock")
            .unattributed_bytes
    }

    /// What the console files hold back for identity now.
    pub(crate) fn identity_held(&self, lines: usize, bytes: usize) {
        let mut inner = self.inner.lock().expect("console stats lock");
        inner.identity.held_lines = lines as u64;
        inner.identity.held_bytes = bytes as u64;
    }

    /// `lines` went to the console files without identity.
    pub(crate) fn unnamed(&self, lines: usize) {
        self.inner
            .lock()
            .expect("console stats lock")
            .identity
            .unnamed_lines += lines as u64;
    }

    pub(crate) fn identity_hold(&self) -> IdentityHold {
        self.inner.lock().expect("console stats lock").identity
    }

    /// Forgets instances whose logs expired.
    pub(crate) fn forget(&self, uuid: &str) {
        self.inner
            .lock()
            .expect("console stats lock")
            .per_instance
            .remove(uuid);
    }
}
