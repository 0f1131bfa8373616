//! Scans of `/proc`: hypervisor processes running, as claims.

use super::Claim;
use crate::{host::proc, matching::Identified, model::instance::Origin};

/// A running process a matcher claimed, and when the scan saw it running.
#[derive(Debug)]
pub(super) struct Found {
    pub(super) claim: Claim,
    /// `CLOCK_BOOTTIME` just before its command line was read.
    pub(super) seen: u64,
}

/// Every running process that `identify(executable, args, pid)` claims, as claims of `origin`.
pub(super) fn scan(
    origin: Origin,
    mut identify: impl FnMut(&str, &[String], u32) -> Option<Identified>,
) -> Vec<Found> {
    proc::processes(|_| true)
        .into_iter()
        .filter_map(|p| {
            let found = identify(&p.executable, &p.args, p.pid)?;
            Some(Found {
                claim: Claim {
                    pid: p.pid,
                    matcher: found.matcher,
                    instance_uuid: found.instance_uuid,
                    origin,
                    start_time: p.start.wall,
                    start_boot_ns: p.start.boot_ns,
                    seen_boot_ns: p.seen_boot_ns,
                    executable: p.executable,
                    args: p.args,
                },
                seen: p.seen_boot_ns,
            })
        })
        .collect()
}
