//! Discovery: which processes are hypervisors, and which instance each runs.
//!
//! Inputs: the kernel's exec, exit, untrack and OOM records (live), a scan of `/proc` at
//! start-up (instances already running, and those the previous run of the collector listed),
//! and [`reconcile`] with `/proc` every few seconds and whenever the kernel lost records. For
//! each candidate it matches the executable and command line against the matchers, tells the
//! kernel to keep or drop the process (`TRACKED_PROCESSES`) and sends the registry what
//! changed. It keeps the instances it announced ([`Known`]) to check them against `/proc`.

mod reconcile;
mod scan;

use std::{collections::HashMap, sync::Mutex};

use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    host::{exe_trust, memcg, proc, vmm_config},
    kernel::{
        console_fds::ConsoleFdSweep,
        loader::KernelDrops,
        sched::SharedSched,
        tracked::{Kept, TrackedProcesses},
    },
    matching::{
        Identified, Matchers,
        allocation::{self, Allocation, AllocationSource},
        split_cmdline,
    },
    model::{
        health::Health,
        instance::{Instance, InstanceUpdate, Origin, PreviousInstance},
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
    /// `CLOCK_BOOTTIME` of the exec, or of the kernel entry the scan found, or just before the
    /// scan read the command line.
    seen_boot_ns: u64,
    executable: String,
    /// The command line, argv[0] first (the allocation is read from it).
    args: Vec<String>,
}

/// An instance discovery announced, as reconciliation checks it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Known {
    instance_uuid: String,
    /// The instance's `seen_boot_ns`: it ran then (and names it to the registry).
    seen_boot_ns: u64,
    /// `start_boot_ns` of its kernel entry; `None` when the kernel does not follow it (the
    /// process was gone at its exec record, or the map was full).
    kernel_start: Option<u64>,
}

/// The kernel handles discovery works with.
pub(crate) struct DiscoveryKernel {
    pub(crate) tracked: TrackedProcesses,
    pub(crate) sched: SharedSched,
    pub(crate) console_fds: ConsoleFdSweep,
    pub(crate) drops: KernelDrops,
}

pub(crate) struct Discovery {
    matchers: Matchers,
    kernel: DiscoveryKernel,
    registry: mpsc::Sender<InstanceUpdate>,
    health: Health,
    /// Memory cgroup of each instance, read while it runs (an OOM victim may be gone by the
    /// time its event is read).
    memcg: HashMap<u32, memcg::MemCgroup>,
    /// The instances announced to the registry, by pid.
    known: HashMap<u32, Known>,
    /// Instances the previous run listed, by pid, until the start-up scan has checked them.
    previous: HashMap<u32, PreviousInstance>,
    reconciling: reconcile::State,
    /// Processes refused (untrusted executable, duplicate id), by pid, with their start: each
    /// is logged and counted once, however often a scan meets it.
    refused: Mutex<HashMap<u32, u64>>,
}

impl Discovery {
    pub(crate) fn new(
        matchers: Matchers,
        kernel: DiscoveryKernel,
        registry: mpsc::Sender<InstanceUpdate>,
        health: Health,
        previous: Vec<PreviousInstance>,
    ) -> Self {
        let reconciling = reconcile::State::new(&kernel.drops);
        Self {
            matchers,
            kernel,
            registry,
            health,
            memcg: HashMap::new(),
            known: HashMap::new(),
            previous: previous.into_iter().map(|p| (p.pid, p)).collect(),
            reconciling,
            refused: Mutex::new(HashMap::new()),
        }
    }

    /// Records that process `pid` is refused for `reason` (a discovery problem), logging and
    /// counting it once per process. True the first time.
    fn refuse(&self, pid: u32, reason: &'static str, instance_uuid: &str, why: &str) -> bool {
        let start = proc::start_time(pid).map_or(0, |s| s.boot_ns);
        let mut refused = self.refused.lock().expect("refused lock");
        if refused.get(&pid) == Some(&start) {
            return false;
        }
        refused.insert(pid, start);
        drop(refused);
        warn!(
            pid,
            reason,
            instance_uuid = instance_uuid.escape_debug().to_string(),
            error = why,
            "hypervisor process refused; not followed"
        );
        self.health.discovery_problems.inc(&[reason]);
        true
    }

    /// Forgets the refusals of processes that are gone.
    fn prune_refused(&self) {
        self.refused
            .lock()
            .expect("refused lock")
            .retain(|pid, start| proc::start_time(*pid).is_some_and(|s| s.boot_ns == *start));
    }

    /// Names the instance of a process, logging and counting a made-up id; `None` when no
    /// matcher claims it or its executable is not trusted (see [`exe_trust`]). `exec_path`
    /// is the path its exec record names, if any.
    fn identify(
        &self,
        executable: &str,
        args: &[String],
        pid: u32,
        exec_path: Option<&str>,
    ) -> Option<Identified> {
        let found = self.matchers.identify(executable, args, pid)?;
        let dirs = &self.matchers.get(found.matcher)?.trusted_executable_dirs;
        if let Err(why) = exe_trust::check(pid, exec_path, dirs) {
            self.refuse(
                pid,
                "untrusted_executable",
                &found.instance_uuid,
                &why.to_string(),
            );
            return None;
        }
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
                // The kernel removed its entry; nothing puts it back.
                self.known.remove(&exit.tgid);
                self.forget(exit.tgid);
                self.send(InstanceUpdate::Exit {
                    pid: exit.tgid,
                    exit,
                })
                .await;
            }
            ProcessEvent::Untrack { tgid, boot_ns } => {
                self.known.remove(&tgid);
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

    /// The command line of an exec: whole from `/proc` while the process runs that exec, else
    /// what the kernel's prefix holds whole (`true`: only a cut prefix was there).
    fn exec_args(exec: &ProcessExec) -> (Vec<String>, bool) {
        if exec.args_total <= exec.args_prefix.len() {
            return (exec.args.clone(), false);
        }
        match proc::cmdline_of_exec(exec.tgid, exec.boot_ns, &exec.args_prefix, exec.args_total) {
            Some(line) => (split_cmdline(&line), false),
            None => (exec.args.clone(), true),
        }
    }

    async fn on_exec(&mut self, exec: ProcessExec) {
        let pid = exec.tgid;
        // A scan that ran after this exec already announced the process.
        if self
            .known
            .get(&pid)
            .is_some_and(|k| exec.boot_ns <= k.seen_boot_ns)
        {
            return;
        }
        let (args, prefix_only) = Self::exec_args(&exec);
        let Some(found) = self.identify(&exec.filename, &args, pid, Some(&exec.filename)) else {
            // The kernel's comm prefix matched but the full executable does not, or it is not
            // trusted: let it go.
            debug!(
                pid,
                executable = exec.filename,
                "exec claimed by comm prefix only, or refused; dropped"
            );
            self.drop_process(pid, exec.boot_ns).await;
            return;
        };
        if prefix_only {
            debug!(
                pid,
                instance_uuid = found.instance_uuid,
                "process gone before its long command line was read; named from its start"
            );
            self.health
                .discovery_problems
                .inc(&["command_line_prefix_only"]);
        }
        let kernel_start =
            match self
                .kernel
                .tracked
                .keep_exec(pid, found.matcher as u32, exec.boot_ns)
            {
                Ok(Kept::Yes { start_boot_ns }) => {
                    self.follow_threads(pid, found.matcher);
                    Some(start_boot_ns)
                }
                // Gone already (its exit record follows, or reconciliation finds it gone): its
                // entry is not brought back, its threads not followed.
                Ok(Kept::Forgotten) => None,
                Err(error) => {
                    warn!(pid, %error, "cannot update tracked process in the kernel map");
                    self.health.discovery_problems.inc(&["tracked_map_insert"]);
                    None
                }
            };
        self.add(
            Claim {
                pid,
                matcher: found.matcher,
                instance_uuid: found.instance_uuid,
                origin: Origin::Exec,
                start_time: time::boot_ns_to_system_time(exec.boot_ns),
                start_boot_ns: exec.boot_ns,
                seen_boot_ns: exec.boot_ns,
                executable: exec.filename,
                args,
            },
            kernel_start,
            None,
        )
        .await;
    }

    /// Stops following process `pid` (exec'd at `boot_ns`) at once: its kernel entries go, and
    /// an instance it was ends.
    async fn drop_process(&mut self, pid: u32, boot_ns: u64) {
        self.kernel.tracked.remove_if_started(pid, boot_ns);
        self.forget(pid);
        if self
            .refused
            .lock()
            .expect("refused lock")
            .contains_key(&pid)
        {
            let removed = self.kernel.console_fds.remove_process(pid);
            if removed > 0 {
                debug!(
                    pid,
                    removed, "console descriptors of a refused process removed"
                );
            }
        }
        let update = if self.known.remove(&pid).is_some() {
            // A VMM that exec'd a program no matcher claims: that instance ended there.
            InstanceUpdate::Untracked { pid, boot_ns }
        } else {
            InstanceUpdate::Forget { pid }
        };
        self.send(update).await;
    }

    /// A live instance other than `pid` with `instance_uuid`, if there is one.
    fn live_holder_of(&self, pid: u32, instance_uuid: &str) -> Option<u32> {
        self.known
            .iter()
            .find(|(other, known)| {
                **other != pid
                    && known.instance_uuid == instance_uuid
                    && proc::running_since(**other, known.seen_boot_ns)
            })
            .map(|(other, _)| *other)
    }

    /// Makes a claimed process an instance: remembers its cgroup, logs it, tells the registry.
    /// With `previous` (the same instance, listed by the previous run), it is restored: no
    /// event, and its start as the previous run knew it.
    async fn add(
        &mut self,
        claim: Claim,
        kernel_start: Option<u64>,
        previous: Option<PreviousInstance>,
    ) {
        let Some(matcher) = self.matchers.get(claim.matcher) else {
            return;
        };
        // One live process per instance id: a second one never shares the first's console,
        // events or series.
        if let Some(holder) = self.live_holder_of(claim.pid, &claim.instance_uuid) {
            let why = format!("instance id already held by running pid {holder}");
            self.refuse(
                claim.pid,
                "duplicate_instance_id",
                &claim.instance_uuid,
                &why,
            );
            let start = kernel_start.unwrap_or(claim.start_boot_ns);
            self.drop_process(claim.pid, start).await;
            return;
        }
        let origin = previous.as_ref().map_or(claim.origin, |p| p.origin);
        info!(
            instance_uuid = claim.instance_uuid,
            hypervisor = matcher.hypervisor,
            pid = claim.pid,
            origin = origin.as_str(),
            restored = previous.is_some(),
            "instance found"
        );
        // What is read through /proc/PID is read only while it is this process's (a VMM gone
        // before its exec record was read may have left its pid to another).
        let running = proc::running_since(claim.pid, claim.seen_boot_ns);
        // The folder as the VMM sees it, in its root.
        let instance_dir = match matcher.instance_dir_for(&claim.instance_uuid) {
            Some(dir) if running && vmm_config::dir_exists(claim.pid, dir.clone()).await => {
                Some(dir)
            }
            _ => None,
        };
        let allocation = match allocation::source(
            matcher.builtin_hypervisor(),
            &claim.args,
            instance_dir.as_deref(),
        ) {
            AllocationSource::CommandLine(allocation) => allocation,
            AllocationSource::FirecrackerFile(file) if running => {
                match vmm_config::read(claim.pid, file).await {
                    Ok(json) => allocation::firecracker(&json),
                    Err(error) => {
                        if error.is_refusal() {
                            warn!(
                                pid = claim.pid,
                                instance_uuid = claim.instance_uuid,
                                error = %error,
                                "VMM config file refused; the instance's allocation is unknown"
                            );
                            self.health.discovery_problems.inc(&["vmm_config_refused"]);
                        } else {
                            debug!(
                                pid = claim.pid,
                                instance_uuid = claim.instance_uuid,
                                error = %error,
                                "VMM config file not read"
                            );
                        }
                        Allocation::default()
                    }
                }
            }
            AllocationSource::FirecrackerFile(_) | AllocationSource::Unknown => {
                Allocation::default()
            }
        };
        let (start_time, start_boot_ns) = previous
            .as_ref()
            .map_or((claim.start_time, claim.start_boot_ns), |p| {
                (p.start_time, p.start_boot_ns)
            });
        let instance = Instance {
            allocation,
            instance_dir,
            instance_uuid: claim.instance_uuid,
            hypervisor: matcher.hypervisor.clone(),
            matcher: matcher.name.clone(),
            pid: claim.pid,
            start_time,
            start_boot_ns,
            seen_boot_ns: claim.seen_boot_ns,
            origin,
            executable: claim.executable,
            oom: None,
        };
        if running && let Some(cg) = memcg::of_process(claim.pid) {
            self.memcg.insert(claim.pid, cg);
        }
        self.known.insert(
            claim.pid,
            Known {
                instance_uuid: instance.instance_uuid.clone(),
                seen_boot_ns: instance.seen_boot_ns,
                kernel_start,
            },
        );
        let update = if previous.is_some() {
            InstanceUpdate::Restore(instance)
        } else {
            InstanceUpdate::Add(instance)
        };
        self.send(update).await;
    }

    /// Scans `/proc` once, at start-up, for hypervisors already running: those the previous run
    /// listed are restored, the others discovered; previous instances not found ended while the
    /// collector was down. Returns once the registry has published what it found.
    pub(crate) async fn scan(&mut self) {
        // Every kernel entry there is now was made by an exec since the programs were attached:
        // its record is on the ring, to be read next (or lost, and found by a rescan).
        self.scan_proc(Origin::Discovered, 0).await;
        let mut ended: Vec<PreviousInstance> = self.previous.drain().map(|(_, p)| p).collect();
        ended.sort_by(|a, b| a.instance_uuid.cmp(&b.instance_uuid));
        for previous in ended {
            info!(
                instance_uuid = previous.instance_uuid,
                pid = previous.pid,
                "instance listed before the restart is gone"
            );
            self.health.reconciled.inc(&["unobserved_exit"]);
            self.send(InstanceUpdate::EndedWhileDown(previous)).await;
        }
        // Ready means listed: wait until the registry has published what the scan found.
        let (done, published) = tokio::sync::oneshot::channel();
        self.send(InstanceUpdate::Barrier(done)).await;
        let _ = published.await;
    }

    /// Every running hypervisor process discovery does not know yet, announced with `origin`;
    /// but not one whose kernel entry was made at or after `CLOCK_BOOTTIME` `read_until`: its
    /// exec record has not been read yet (it is on the ring, or lost and the next rescan finds
    /// the process).
    async fn scan_proc(&mut self, origin: Origin, read_until: u64) {
        let known = &self.known;
        let found = scan::scan(origin, |exe, args, pid| {
            (!known.contains_key(&pid))
                .then(|| self.identify(exe, args, pid, Some(exe)))
                .flatten()
        });
        for scan::Found { mut claim, seen } in found {
            let pid = claim.pid;
            if self
                .kernel
                .tracked
                .start_of(pid)
                .is_some_and(|start| start >= read_until)
            {
                continue;
            }
            let kernel_start = match self.kernel.tracked.insert_found(
                pid,
                claim.matcher as u32,
                claim.seen_boot_ns,
            ) {
                // An entry the exec program made keeps its start: the process's console
                // descriptors carry it.
                Ok(Kept::Yes { start_boot_ns }) => Some(start_boot_ns),
                Ok(Kept::Forgotten) => continue,
                Err(error) => {
                    warn!(pid, %error, "cannot record tracked process in the kernel map");
                    self.health.discovery_problems.inc(&["tracked_map_insert"]);
                    None
                }
            };
            if let Some(start) = kernel_start {
                claim.seen_boot_ns = start;
            }
            self.follow_threads(pid, claim.matcher);
            // The process may have exited between the scan and the insert: then no exit record
            // will ever come for it, so undo. (One that exits right after this check has
            // passed its exit with the entry in place, and its record comes.)
            if !proc::running_since(pid, seen) {
                if let Some(start) = kernel_start {
                    self.kernel.tracked.remove_if_started(pid, start);
                }
                self.forget(pid);
                continue;
            }
            // The instance the previous run listed with this pid, if this is its process: the
            // same id, and a process that started before the previous run last saw it running
            // (a reused pid starts later). Any other stays listed as ended.
            let same = self.previous.get(&pid).is_some_and(|p| {
                p.instance_uuid == claim.instance_uuid
                    && p.seen_boot_ns != 0
                    && claim.start_boot_ns <= p.seen_boot_ns
            });
            let previous = if same {
                self.previous.remove(&pid)
            } else {
                None
            };
            if origin == Origin::Rescan {
                self.health.reconciled.inc(&["exec_record_lost"]);
            }
            self.add(claim, kernel_start, previous).await;
        }
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
            .kernel
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
        self.kernel
            .sched
            .lock()
            .expect("sched lock")
            .forget(pid, true);
        self.memcg.remove(&pid);
    }

    async fn send(&self, update: InstanceUpdate) {
        // The registry lives as long as the daemon; a closed channel means shutdown.
        let _ = self.registry.send(update).await;
    }
}
