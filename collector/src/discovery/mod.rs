//! Discovery: which processes are hypervisors, and which instance each runs.
//!
//! Two sources feed it: the kernel's exec and exit events (live) and one scan of `/proc` at
//! start-up (instances already running). For each candidate it matches the executable and command
//! line against the matchers, tells the kernel to keep or drop the process (the kernel's
//! `TRACKED_PROCESSES` map) and sends the registry what changed.

pub mod allocation;
pub mod matchers;
pub mod memcg;
pub mod proc_scan;

use std::collections::HashMap as StdHashMap;

use aya::maps::{HashMap, MapData};
use collector_common::{TRACKED_CONFIRMED, TRACKED_DISCOVERED, TrackedProcess};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    clock,
    decode::{OomVictim, ProcessEvent, ProcessExec},
    ebpf::sched::SharedSched,
    registry::{Instance, Origin, RegistryUpdate, lifecycle::OomDetails},
    telemetry::SelfMetrics,
};
use matchers::Matcher;

/// Longest instance id accepted as is.
pub const MAX_INSTANCE_ID_LEN: usize = 128;

/// Why a matched process got a made-up instance id (a bounded label value).
fn id_problem(id: Option<&str>) -> Option<&'static str> {
    match id {
        None => Some("no_instance_id"),
        Some(id) if id.len() > MAX_INSTANCE_ID_LEN => Some("instance_id_too_long"),
        Some(id) if id.chars().any(char::is_control) => Some("instance_id_control_chars"),
        Some(_) => None,
    }
}

/// `dir`, if it is a folder on this host.
fn existing_dir(dir: Option<String>) -> Option<String> {
    dir.filter(|d| std::path::Path::new(d).is_dir())
}

/// A process a matcher claimed, about to become an instance.
#[derive(Debug)]
pub struct Claim {
    pub pid: u32,
    pub matcher: usize,
    pub instance_uuid: String,
    pub origin: Origin,
    pub start_time: std::time::SystemTime,
    pub start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` of the exec, or just before the scan read the command line.
    pub seen_boot_ns: u64,
    pub executable: String,
    /// The command line, argv[0] first (the allocation is read from it).
    pub args: Vec<String>,
}

pub struct Discovery {
    matchers: Vec<Matcher>,
    tracked: HashMap<MapData, u32, TrackedProcess>,
    registry: mpsc::Sender<RegistryUpdate>,
    metrics: SelfMetrics,
    /// Memory cgroup of each instance, read while it runs (an OOM victim may be gone by the time
    /// its event is read).
    memcg: StdHashMap<u32, memcg::MemCgroup>,
    /// The kernel's scheduling maps, when the programs are loaded.
    sched: Option<SharedSched>,
}

impl Discovery {
    pub fn new(
        matchers: Vec<Matcher>,
        tracked: HashMap<MapData, u32, TrackedProcess>,
        registry: mpsc::Sender<RegistryUpdate>,
        metrics: SelfMetrics,
    ) -> Self {
        Self {
            matchers,
            tracked,
            registry,
            metrics,
            memcg: StdHashMap::new(),
            sched: None,
        }
    }

    /// Keeps the kernel's scheduling maps in step with the instances found and lost.
    #[must_use]
    pub fn with_sched(mut self, sched: SharedSched) -> Self {
        self.sched = Some(sched);
        self
    }

    /// Names the instance of a process running `executable` with `args`, if a matcher claims it.
    pub fn identify(&self, executable: &str, args: &[String], pid: u32) -> Option<(usize, String)> {
        let (index, matcher) = self
            .matchers
            .iter()
            .enumerate()
            .find(|(_, m)| m.matches_executable(executable))?;
        let id = matcher.instance_id(args);
        let id = match id_problem(id.as_deref()) {
            None => id.expect("checked"),
            Some(reason) => {
                warn!(
                    pid,
                    matcher = matcher.name,
                    reason,
                    instance_id = id.as_deref().map(|s| s.escape_debug().to_string()),
                    "hypervisor process without a usable instance id; naming it by pid"
                );
                self.metrics.discovery_problem(reason);
                format!("unidentified-pid-{pid}")
            }
        };
        Some((index, id))
    }

    /// Handles one event of the process-events ring.
    pub async fn handle_event(&mut self, event: ProcessEvent) {
        match event {
            ProcessEvent::Exec(exec) => self.on_exec(exec).await,
            ProcessEvent::Exit(exit) => {
                debug!(
                    pid = exit.tgid,
                    wait_status = exit.wait_status(),
                    "tracked process exited"
                );
                // The kernel removed it; a confirmation read after the exit may have put it back.
                let _ = self.tracked.remove(&exit.tgid);
                self.forget_sched(exit.tgid, true);
                self.memcg.remove(&exit.tgid);
                self.send(RegistryUpdate::Exit {
                    pid: exit.tgid,
                    exit,
                })
                .await;
            }
            ProcessEvent::Untrack { tgid, boot_ns } => {
                self.forget_sched(tgid, true);
                self.memcg.remove(&tgid);
                self.send(RegistryUpdate::Untracked { pid: tgid, boot_ns })
                    .await;
            }
            ProcessEvent::OomVictim(oom) => self.on_oom_victim(oom).await,
        }
    }

    async fn on_oom_victim(&mut self, oom: OomVictim) {
        // The kernel read the victim's memory cgroup at the OOM; what was read from /proc while
        // the VMM ran is the fallback (kernels without the victim's task in the tracepoint).
        let from_kernel = (oom.memcg_id != 0)
            .then(|| memcg::by_inode(oom.memcg_id))
            .flatten();
        let constraint = match from_kernel.as_ref().or(self.memcg.get(&oom.tgid)) {
            Some(cg) => cg.oom_constraint(),
            None => memcg::Constraint {
                kind: "unknown",
                path: None,
                limit_bytes: None,
            },
        };
        warn!(
            pid = oom.tgid,
            victim_pid = oom.pid,
            constraint = constraint.kind,
            memcg = constraint.path,
            "the kernel's OOM killer chose a hypervisor process"
        );
        let details = OomDetails {
            victim_pid: oom.pid,
            counters: oom.counters,
            constraint: constraint.kind,
            memcg_path: constraint.path,
            memcg_limit_bytes: constraint.limit_bytes,
        };
        self.send(RegistryUpdate::OomVictim {
            pid: oom.tgid,
            details,
        })
        .await;
    }

    async fn on_exec(&mut self, exec: ProcessExec) {
        let pid = exec.tgid;
        let Some((index, instance_uuid)) = self.identify(&exec.filename, &exec.args, pid) else {
            // The kernel's comm prefix matched but the full executable does not: let it go.
            debug!(
                pid,
                executable = exec.filename,
                "exec claimed by comm prefix only; dropped"
            );
            let _ = self.tracked.remove(&pid);
            self.forget_sched(pid, true);
            self.memcg.remove(&pid);
            self.send(RegistryUpdate::Forget { pid }).await;
            return;
        };
        self.confirm(pid, index, exec.boot_ns, 0);
        self.follow_threads(pid, index);
        self.add(Claim {
            pid,
            matcher: index,
            instance_uuid,
            origin: Origin::Exec,
            start_time: clock::boot_ns_to_system_time(exec.boot_ns),
            start_boot_ns: exec.boot_ns,
            seen_boot_ns: exec.boot_ns,
            executable: exec.filename,
            args: exec.args,
        })
        .await;
    }

    /// Makes a claimed process an instance: remembers its cgroup, logs it, tells the registry.
    async fn add(&mut self, claim: Claim) {
        let matcher = &self.matchers[claim.matcher];
        info!(
            instance_uuid = claim.instance_uuid,
            hypervisor = matcher.hypervisor,
            pid = claim.pid,
            origin = claim.origin.as_str(),
            "instance found"
        );
        let instance_dir = existing_dir(matcher.instance_dir_for(&claim.instance_uuid));
        let allocation = allocation::read(
            matcher.builtin_hypervisor(),
            &claim.args,
            claim.pid,
            instance_dir.as_deref(),
        );
        let instance = Instance {
            allocation,
            instance_dir,
            instance_uuid: claim.instance_uuid,
            hypervisor: matcher.hypervisor.clone(),
            matcher: matcher.name.clone(),
            pid: claim.pid,
            start_time: claim.start_time,
            start_boot_ns: claim.start_boot_ns,
            seen_boot_ns: claim.seen_boot_ns,
            origin: claim.origin,
            executable: claim.executable,
            oom: None,
        };
        self.remember_memcg(claim.pid);
        self.send(RegistryUpdate::Add(instance)).await;
    }

    fn remember_memcg(&mut self, pid: u32) {
        if let Some(cg) = memcg::of_process(pid) {
            self.memcg.insert(pid, cg);
        }
    }

    /// Marks `pid` confirmed in the kernel map (inserting it for processes found by the scan).
    fn confirm(&mut self, pid: u32, matcher_id: usize, start_boot_ns: u64, extra_flags: u32) {
        let value = TrackedProcess {
            matcher_id: matcher_id as u32,
            flags: TRACKED_CONFIRMED | extra_flags,
            start_boot_ns,
        };
        if let Err(error) = self.tracked.insert(&pid, &value, 0) {
            warn!(pid, %error, "cannot record tracked process in the kernel map");
            self.metrics.discovery_problem("tracked_map_insert");
        }
    }

    /// Scans `/proc` once for hypervisors already running.
    pub async fn scan(&mut self) {
        let found = proc_scan::scan(|exe, args, pid| self.identify(exe, args, pid));
        for proc_scan::Found { claim, start } in found {
            let pid = claim.pid;
            self.confirm(pid, claim.matcher, claim.seen_boot_ns, TRACKED_DISCOVERED);
            self.follow_threads(pid, claim.matcher);
            // The process may have exited between the scan and the insert: then no exit event
            // will ever come for it, so undo.
            if !proc_scan::still_running(pid, start) {
                let _ = self.tracked.remove(&pid);
                continue;
            }
            self.add(claim).await;
        }
    }

    /// Follows the running threads of `pid` in the kernel's scheduling maps, classified by the
    /// matcher's full vCPU pattern (the kernel classifies threads named later).
    fn follow_threads(&self, pid: u32, matcher: usize) {
        let Some(sched) = &self.sched else {
            return;
        };
        let m = &self.matchers[matcher];
        let threads: Vec<(u32, bool)> = proc_scan::threads(pid)
            .into_iter()
            .map(|(tid, name)| (tid, m.is_vcpu_thread(&name)))
            .collect();
        if let Err(error) = sched
            .lock()
            .expect("sched lock")
            .follow_threads(pid, &threads)
        {
            warn!(pid, %error, "cannot follow the threads of an instance in the kernel");
            self.metrics.discovery_problem("thread_map_insert");
        }
    }

    fn forget_sched(&self, pid: u32, threads: bool) {
        if let Some(sched) = &self.sched {
            sched.lock().expect("sched lock").forget(pid, threads);
        }
    }

    async fn send(&self, update: RegistryUpdate) {
        // The registry lives as long as the daemon; a closed channel means shutdown.
        let _ = self.registry.send(update).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn odd_ids() {
        assert_eq!(
            id_problem(Some("7d2b1a38-8f5c-4a4e-9d7e-2f0b6c1d9e11")),
            None
        );
        assert_eq!(
            id_problem(Some("../../etc")),
            None,
            "paths are sanitised by the sinks"
        );
        assert_eq!(id_problem(None), Some("no_instance_id"));
        assert_eq!(
            id_problem(Some(&"x".repeat(200))),
            Some("instance_id_too_long")
        );
        assert_eq!(id_problem(Some("a\nb")), Some("instance_id_control_chars"));
    }
}
