//! The start-up scan: hypervisor processes already running, as claims.

use super::Claim;
use crate::{
    host::proc::{self, StartTime},
    matching::Identified,
    model::instance::Origin,
};

/// A running process a matcher claimed, and when it started (to tell a reused pid).
#[derive(Debug)]
pub(super) struct Found {
    pub(super) claim: Claim,
    pub(super) start: StartTime,
}

/// Every running process that `identify(executable, args, pid)` claims.
pub(super) fn scan(
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
                    origin: Origin::Discovered,
                    start_time: p.start.wall,
                    start_boot_ns: p.start.boot_ns,
                    seen_boot_ns: p.seen_boot_ns,
                    executable: p.executable,
                    args: p.args,
                },
                start: p.start,
            })
        })
        .collect()
}
