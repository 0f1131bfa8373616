//! Discovery: which processes are hypervisors, and which instance each runs.
//!
//! Two sources feed it: the kernel's exec and exit events (live) and one scan of `/proc` at
//! start-up (instances already running). For each candidate it matches the executable and command
//! line against the matchers, tells the kernel to keep or drop the process (the kernel's
//! `TRACKED_PROCESSES` map) and sends the registry what changed.

pub mod allocation;
pub mod matchers;
pub mod proc_scan;

use aya::maps::{HashMap, MapData};
use collector_common::{TRACKED_CONFIRMED, TRACKED_DISCOVERED, TrackedProcess};
use tokio::sync::mpsc;
use tracing::{debug, info, warn};

use crate::{
    clock,
    decode::{ProcessEvent, ProcessExec},
    ebpf::sched::SharedSched,
    registry::{Instance, Origin, RegistryUpdate},
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

pub struct Discovery {
    matchers: Vec<Matcher>,
    tracked: HashMap<MapData, u32, TrackedProcess>,
    registry: mpsc::Sender<RegistryUpdate>,
    metrics: SelfMetrics,
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
                    exit_code = exit.exit_code,
                    "tracked process exited"
                );
                // The kernel removed it; a confirmation read after the exit may have put it back.
                let _ = self.tracked.remove(&exit.tgid);
                self.forget_sched(exit.tgid, true);
                self.send(RegistryUpdate::Remove { pid: exit.tgid }).await;
            }
            ProcessEvent::Untrack { tgid, .. } => {
                self.forget_sched(tgid, true);
                self.send(RegistryUpdate::Remove { pid: tgid }).await;
            }
        }
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
            self.send(RegistryUpdate::Remove { pid }).await;
            return;
        };
        self.confirm(pid, index, exec.boot_ns, 0);
        self.follow_threads(pid, index);
        let matcher = &self.matchers[index];
        let instance_dir = existing_dir(matcher.instance_dir_for(&instance_uuid));
        let instance = Instance {
            allocation: allocation::read(
                matcher.builtin_hypervisor(),
                &exec.args,
                pid,
                instance_dir.as_deref(),
            ),
            instance_dir,
            instance_uuid,
            hypervisor: matcher.hypervisor.clone(),
            matcher: matcher.name.clone(),
            pid,
            start_time: clock::boot_ns_to_system_time(exec.boot_ns),
            seen_boot_ns: exec.boot_ns,
            origin: Origin::Exec,
            executable: exec.filename,
        };
        info!(
            instance_uuid = instance.instance_uuid,
            hypervisor = instance.hypervisor,
            pid,
            origin = "exec",
            "instance found"
        );
        self.send(RegistryUpdate::Add(instance)).await;
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
        for process in found {
            let proc_scan::Found {
                pid,
                matcher,
                instance_uuid,
                start_time,
                seen_boot_ns,
                executable,
                args,
            } = process;
            self.confirm(pid, matcher, seen_boot_ns, TRACKED_DISCOVERED);
            self.follow_threads(pid, matcher);
            // The process may have exited between the scan and the insert: then no exit event
            // will ever come for it, so undo.
            if !proc_scan::still_running(pid, start_time) {
                let _ = self.tracked.remove(&pid);
                continue;
            }
            let m = &self.matchers[matcher];
            let instance_dir = existing_dir(m.instance_dir_for(&instance_uuid));
            info!(
                instance_uuid,
                hypervisor = m.hypervisor,
                pid,
                origin = "discovered",
                "instance found"
            );
            let instance = Instance {
                allocation: allocation::read(
                    m.builtin_hypervisor(),
                    &args,
                    pid,
                    instance_dir.as_deref(),
                ),
                instance_dir,
                instance_uuid,
                hypervisor: m.hypervisor.clone(),
                matcher: m.name.clone(),
                pid,
                start_time: start_time.wall,
                seen_boot_ns,
                origin: Origin::Discovered,
                executable,
            };
            self.send(RegistryUpdate::Add(instance)).await;
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
