//! Discovery: which processes are hypervisors, and which instance each runs.
//!
//! Two inputs feed it: the kernel's exec and exit events (live) and one scan of `/proc` at
//! start-up (instances already running). For each candidate it matches the executable and
//! command line against the matchers, tells the kernel to keep or drop the process (the
//! kernel's `TRACKED_PROCESSES` map) and sends the registry what changed.

mod scan;

use std::collections::HashMap;

use collector_common::TRACKED_DISCOVERED;
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    host::{memcg, proc, vmm_config},
    kernel::{sched::SharedSched, tracked::TrackedProcesses},
    matching::{
        Identified, Matchers,
        allocation::{self, Allocation, AllocationSource},
    },
    model::{
        health::Health,
        instance::{Instance, InstanceUpdate, Origin},
        lifecycle::OomDetails,
        process::{OomVictim, ProcessEvent, ProcessExec},
        time,
    },
};

/// A process a matcher claimed, about to become an instance.
#[derive(Debug)]
struct Claim {
    pid: u32,
    matcher: usize,
    instance_uuid: String,
    origin: Origin,
    start_time: std::time::SystemTime,
    start_boot_ns: u64,
    /// `CLOCK_BOOTTIME` of the exec, or just before the scan read the command line.
    seen_boot_ns: u64,
    executable: String,
    /// The command line, argv[0] first (the allocation is read from it).
    args: Vec<String>,
}

/// `dir`, if it is a folder on this host.
fn existing_dir(dir: Option<String>) -> Option<String> {
    dir.filter(|d| std::path::Path::new(d).is_dir())
}

pub(crate) struct Discovery {
    matchers: Matchers,
    tracked: TrackedProcesses,
    sched: SharedSched,
    registry: mpsc::Sender<InstanceUpdate>,
    health: Health,
    /// Memory cgroup of each instance, read while it runs (an OOM victim may be gone by the
    /// time its event is read).
    memcg: HashMap<u32, memcg::MemCgroup>,
}

impl Discovery {
    pub(crate) fn new(
        matchers: Matchers,
        tracked: TrackedProcesses,
        sched: SharedSched,
        registry: mpsc::Sender<InstanceUpdate>,
        health: Health,
    ) -> Self {
        Self {
            matchers,
            tracked,
            sched,
            registry,
            health,
            memcg: HashMap::new(),
        }
    }

    /// Names the instance of a process, logging and counting a made-up id.
    fn identify(&self, executable: &str, args: &[String], pid: u32) -> Option<Identified> {
        let found = self.matchers.identify(executable, args, pid)?;
        if let Some((reason, id)) = &found.problem {
            let matcher = self.matchers.get(found.matcher).map(|m| m.name.as_str());
            warn!(
                pid,
                matcher,
                reason,
                instance_id = id,
                "hypervisor process without a usable instance id; naming it by pid"
            );
            self.health.discovery_problems.inc(&[reason]);
        }
        Some(found)
    }

    /// Handles one event of the process-events ring.
    pub(crate) async fn handle_event(&mut self, event: ProcessEvent) {
        match event {
            ProcessEvent::Exec(exec) => self.on_exec(exec).await,
            ProcessEvent::Exit(exit) => {
                debug!(
                    pid = exit.tgid,
                    wait_status = exit.wait_status(),
                    "tracked process exited"
                );
                // The kernel removed it; a confirmation read after the exit may have put it back.
                self.tracked.remove(exit.tgid);
                self.forget(exit.tgid);
                self.send(InstanceUpdate::Exit {
                    pid: exit.tgid,
                    exit,
                })
                .await;
            }
            ProcessEvent::Untrack { tgid, boot_ns } => {
                self.forget(tgid);
                self.send(InstanceUpdate::Untracked { pid: tgid, boot_ns })
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
        self.send(InstanceUpdate::OomVictim {
            pid: oom.tgid,
            details,
        })
        .await;
    }

    async fn on_exec(&mut self, exec: ProcessExec) {
        let pid = exec.tgid;
        let Some(found) = self.identify(&exec.filename, &exec.args, pid) else {
            // The kernel's comm prefix matched but the full executable does not: let it go.
            debug!(
                pid,
                executable = exec.filename,
                "exec claimed by comm prefix only; dropped"
            );
            self.tracked.remove(pid);
            self.forget(pid);
            self.send(InstanceUpdate::Forget { pid }).await;
            return;
        };
        self.confirm(pid, found.matcher, exec.boot_ns, 0);
        self.follow_threads(pid, found.matcher);
        self.add(Claim {
            pid,
            matcher: found.matcher,
            instance_uuid: found.instance_uuid,
            origin: Origin::Exec,
            start_time: time::boot_ns_to_system_time(exec.boot_ns),
            start_boot_ns: exec.boot_ns,
            seen_boot_ns: exec.boot_ns,
            executable: exec.filename,
            args: exec.args,
        })
        .await;
    }

    /// Makes a claimed process an instance: remembers its cgroup, logs it, tells the registry.
    async fn add(&mut self, claim: Claim) {
        let Some(matcher) = self.matchers.get(claim.matcher) else {
            return;
        };
        info!(
            instance_uuid = claim.instance_uuid,
            hypervisor = matcher.hypervisor,
            pid = claim.pid,
            origin = claim.origin.as_str(),
            "instance found"
        );
        let instance_dir = existing_dir(matcher.instance_dir_for(&claim.instance_uuid));
        let allocation = match allocation::source(
            matcher.builtin_hypervisor(),
            &claim.args,
            instance_dir.as_deref(),
        ) {
            AllocationSource::CommandLine(allocation) => allocation,
            AllocationSource::FirecrackerFile(file) => vmm_config::read(claim.pid, &file)
                .map(|json| allocation::firecracker(&json))
                .unwrap_or_default(),
            AllocationSource::Unknown => Allocation::default(),
        };
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
        if let Some(cg) = memcg::of_process(claim.pid) {
            self.memcg.insert(claim.pid, cg);
        }
        self.send(InstanceUpdate::Add(instance)).await;
    }

    /// Marks `pid` confirmed in the kernel map (inserting it for processes found by the scan).
    fn confirm(&mut self, pid: u32, matcher: usize, start_boot_ns: u64, extra_flags: u32) {
        if let Err(error) = self
            .tracked
            .confirm(pid, matcher as u32, start_boot_ns, extra_flags)
        {
            warn!(pid, %error, "cannot record tracked process in the kernel map");
            self.health.discovery_problems.inc(&["tracked_map_insert"]);
        }
    }

    /// Scans `/proc` once for hypervisors already running.
    pub(crate) async fn scan(&mut self) {
        let found = scan::scan(|exe, args, pid| self.identify(exe, args, pid));
        for scan::Found { claim, start } in found {
            let pid = claim.pid;
            self.confirm(pid, claim.matcher, claim.seen_boot_ns, TRACKED_DISCOVERED);
            self.follow_threads(pid, claim.matcher);
            // The process may have exited between the scan and the insert: then no exit event
            // will ever come for it, so undo.
            if !proc::still_running(pid, start) {
                self.tracked.remove(pid);
                continue;
            }
            self.add(claim).await;
        }
        // Ready means listed: wait until the registry has published what the scan found.
        let (done, published) = tokio::sync::oneshot::channel();
        self.send(InstanceUpdate::Barrier(done)).await;
        let _ = published.await;
    }

    /// Follows the running threads of `pid` in the kernel's scheduling maps, classified by the
    /// matcher's full vCPU pattern (the kernel classifies threads named later).
    fn follow_threads(&self, pid: u32, matcher: usize) {
        let Some(m) = self.matchers.get(matcher) else {
            return;
        };
        let threads: Vec<(u32, bool)> = proc::threads(pid)
            .into_iter()
            .map(|(tid, name)| (tid, m.is_vcpu_thread(&name)))
            .collect();
        if let Err(error) = self
            .sched
            .lock()
            .expect("sched lock")
            .follow_threads(pid, &threads)
        {
            warn!(pid, %error, "cannot follow the threads of an instance in the kernel");
            self.health.discovery_problems.inc(&["thread_map_insert"]);
        }
    }

    /// Forgets what is kept for `pid`: its scheduling entries and its memory cgroup.
    fn forget(&mut self, pid: u32) {
        self.sched.lock().expect("sched lock").forget(pid, true);
        self.memcg.remove(&pid);
    }

    async fn send(&self, update: InstanceUpdate) {
        // The registry lives as long as the daemon; a closed channel means shutdown.
        let _ = self.registry.send(update).await;
    }
}
