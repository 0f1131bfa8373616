//! Start-up after a restart: what the previous run of the collector left (the state file, the
//! events files, the console files), turned into what each stage continues from. The state
//! file is at most a few seconds old after a crash; the files hold what came after, and the
//! newest of both wins.

use std::{
    collections::{BTreeMap, HashMap, HashSet},
    time::{Duration, SystemTime},
};

use tracing::{info, warn};

use crate::{
    config::Config,
    host::{names, proc},
    model::{
        console::Resume,
        identity::{Departed, PodBacked},
        instance::{HYPERVISOR_UNKNOWN, Origin, PreviousInstance},
        lifecycle::{EventKind, REASON_EXEC_RECORD_LOST, Sequenced},
        time,
    },
    sinks::{
        console_logs::tail,
        events::read_back::{self, ReadBack},
        state::{self, DepartedState, InstanceState, PodState, StateError},
    },
};

/// How far a time read back from an events file may be off the boot clock (the wall clock
/// may have been stepped since it was written).
const WALL_CLOCK_SLACK: Duration = Duration::from_secs(2);

/// What the stages continue from.
#[derive(Debug, Default)]
pub(crate) struct Restored {
    /// This boot's id (written into the next state file).
    pub(crate) boot_id: String,
    /// Instances the previous run listed, for the start-up scan to check.
    pub(crate) previous: Vec<PreviousInstance>,
    /// The last event `seq` handed out before.
    pub(crate) last_event_seq: u64,
    /// The `seq` of the last event of each previous instance.
    pub(crate) event_seqs: HashMap<String, u64>,
    /// The events the API served before.
    pub(crate) events: ReadBack,
    /// Where the console streams of previous instances continue.
    pub(crate) resume: Resume,
    /// Instances Pods backed when the previous run stopped (created, not terminated): listed
    /// again, and the seed of the Kubernetes source (not created again; terminated if their Pod
    /// went while the collector was down).
    pub(crate) pods: BTreeMap<String, PodBacked>,
    /// Identities of instances that had gone when it stopped, or whose Pod's `terminate` the
    /// events files hold after the state file.
    pub(crate) departed: BTreeMap<String, Departed>,
}

/// Reads what `config.log_dir` holds of the previous run. Never fails: a missing or corrupt
/// state file is one warning and a fresh start (the events files are still read back).
pub(crate) fn restore(config: &Config) -> Restored {
    let boot_id = proc::boot_id().unwrap_or_default();
    let state = match state::read(&config.log_dir) {
        Ok(state) => Some(state),
        Err(error @ StateError::Missing { .. }) => {
            warn!(%error, "no restart state: starting fresh");
            None
        }
        Err(error) => {
            let cause = std::error::Error::source(&error).map(ToString::to_string);
            warn!(%error, cause, "restart state unusable: starting fresh");
            None
        }
    };
    let same_boot = state
        .as_ref()
        .is_some_and(|s| !boot_id.is_empty() && s.boot_id == boot_id);
    let (state_seq, written_at, listed, pod_states, departed_states) =
        state.map_or((0, None, Vec::new(), Vec::new(), Vec::new()), |s| {
            (
                s.last_event_seq,
                time::parse_rfc3339(&s.written_at),
                s.instances,
                s.pods,
                s.departed,
            )
        });
    let dirs: HashSet<String> = listed
        .iter()
        .map(|i| names::dir_name(&i.instance_uuid))
        .collect();
    let events = read_back::read_back(&config.log_dir, &config.events, &dirs);

    let mut previous = Vec::new();
    let mut event_seqs = HashMap::new();
    let mut state_console: HashMap<String, [u64; 3]> = HashMap::new();
    for instance in &listed {
        let Some((prev, seq)) = from_state(instance, same_boot, &events) else {
            continue;
        };
        state_console.insert(prev.instance_uuid.clone(), instance.console_seq.as_array());
        event_seqs.insert(prev.instance_uuid.clone(), seq);
        previous.push(prev);
    }
    let in_state: HashSet<(String, u32)> = previous
        .iter()
        .map(|p| (p.instance_uuid.clone(), p.pid))
        .collect();
    for (uuid, list) in &events.by_instance {
        // The VMM's events only: a Pod's create or terminate says nothing of a process.
        let Some(last) = list.iter().rev().find(|e| !e.event.event.is_pod()) else {
            continue;
        };
        let Some(pid) = last.event.pid else { continue };
        if last.event.event.ends_instance() || in_state.contains(&(uuid.clone(), pid)) {
            continue;
        }
        // Announced after the last state write: the events file knows it.
        event_seqs.insert(uuid.clone(), last.seq);
        previous.push(from_event(last));
    }

    let mut down_since = written_at;
    let mut later = |t: SystemTime| down_since = Some(down_since.map_or(t, |d| d.max(t)));
    for list in events.by_instance.values() {
        if let Some(last) = list.last() {
            later(last.event.time);
        }
    }
    let mut seqs = HashMap::new();
    for prev in &previous {
        let mut last = state_console
            .get(&prev.instance_uuid)
            .copied()
            .unwrap_or_default();
        // Lines written before the state file are in it.
        let covered = written_at.filter(|_| state_console.contains_key(&prev.instance_uuid));
        for (slot, found) in tail::last_records(&config.log_dir, &prev.instance_uuid, covered)
            .into_iter()
            .enumerate()
        {
            if let Some((seq, ts)) = found {
                last[slot] = last[slot].max(seq);
                later(ts);
            }
        }
        seqs.insert(prev.instance_uuid.clone(), last);
    }
    let last_event_seq = state_seq.max(events.last_seq);
    let mut departed: BTreeMap<String, Departed> = departed_states
        .into_iter()
        .map(DepartedState::departed)
        .collect();
    let pods = pods_of(pod_states, state_seq, &events, &mut departed);
    info!(
        previous_instances = previous.len(),
        last_event_seq, same_boot, "continuing from the previous run"
    );
    Restored {
        boot_id,
        previous,
        last_event_seq,
        event_seqs,
        events,
        resume: Resume { seqs, down_since },
        pods,
        departed,
    }
}

/// The instances Pods backed: those of the state file, then the `create`s and `terminate`s the
/// events files hold after it (the newest of both wins). A `terminate` there makes its
/// instance one of the `departed` (when no VMM of it was listed, the registry makes it one
/// when that VMM's end is known).
fn pods_of(
    states: Vec<PodState>,
    state_seq: u64,
    events: &ReadBack,
    departed: &mut BTreeMap<String, Departed>,
) -> BTreeMap<String, PodBacked> {
    let mut pods: BTreeMap<String, PodBacked> = states.into_iter().map(PodState::backed).collect();
    let mut after: Vec<&Sequenced> = events
        .by_instance
        .values()
        .flatten()
        .filter(|e| e.seq > state_seq && e.event.event.is_pod())
        .collect();
    after.sort_by_key(|e| e.seq);
    for sequenced in after {
        let event = &sequenced.event;
        match (event.event, &event.identity) {
            (EventKind::Create, Some(identity)) => {
                departed.remove(&event.instance_uuid);
                let hypervisor =
                    (event.hypervisor != HYPERVISOR_UNKNOWN).then(|| event.hypervisor.clone());
                pods.insert(
                    event.instance_uuid.clone(),
                    PodBacked {
                        identity: identity.clone(),
                        created: event.time,
                        hypervisor,
                    },
                );
            }
            (EventKind::Terminate, identity) => {
                let had = pods.remove(&event.instance_uuid).map(|p| p.identity);
                if let Some(identity) = identity.clone().or(had) {
                    departed.insert(
                        event.instance_uuid.clone(),
                        Departed {
                            identity,
                            since: event.time,
                        },
                    );
                }
            }
            _ => {}
        }
    }
    pods
}

/// A listed instance of the state file, unless the events files show it ended after the file
/// was written; with the `seq` of its last event.
fn from_state(
    instance: &InstanceState,
    same_boot: bool,
    events: &ReadBack,
) -> Option<(PreviousInstance, u64)> {
    let list: &[Sequenced] = events
        .by_instance
        .get(&instance.instance_uuid)
        .map_or(&[], Vec::as_slice);
    let began = list
        .iter()
        .filter(|e| e.event.pid == Some(instance.pid) && !e.event.event.ends_instance())
        .map(|e| e.seq)
        .max()
        .unwrap_or(0);
    let anchor = instance.last_event_seq.max(began);
    if anchor > 0
        && list
            .iter()
            .any(|e| e.seq > anchor && e.event.event.ends_instance())
    {
        return None;
    }
    let start_time = time::parse_rfc3339(&instance.start_time).unwrap_or(SystemTime::UNIX_EPOCH);
    Some((
        PreviousInstance {
            instance_uuid: instance.instance_uuid.clone(),
            hypervisor: instance.hypervisor.clone(),
            pid: instance.pid,
            origin: instance.origin,
            start_time,
            start_boot_ns: if same_boot { instance.start_boot_ns } else { 0 },
            seen_boot_ns: if same_boot { instance.seen_boot_ns } else { 0 },
        },
        anchor,
    ))
}

/// An instance whose last event in its events file is its beginning.
fn from_event(last: &Sequenced) -> PreviousInstance {
    let event = &last.event;
    let origin = match (event.event, event.reason) {
        (EventKind::Start, _) => Origin::Exec,
        (_, REASON_EXEC_RECORD_LOST) => Origin::Rescan,
        _ => Origin::Discovered,
    };
    let start_time = match origin {
        Origin::Exec => event.time,
        _ => event
            .time
            .checked_sub(Duration::from_secs_f64(event.uptime_seconds.max(0.0)))
            .unwrap_or(event.time),
    };
    // Seen running at the event, on this boot's clock; not at all if before this boot.
    let seen = time::system_time_to_boot_ns(event.time);
    PreviousInstance {
        instance_uuid: event.instance_uuid.clone(),
        hypervisor: event.hypervisor.clone(),
        pid: event.pid.unwrap_or(0),
        origin,
        start_time,
        start_boot_ns: time::system_time_to_boot_ns(start_time),
        seen_boot_ns: if seen == 0 {
            0
        } else {
            seen + u64::try_from(WALL_CLOCK_SLACK.as_nanos()).unwrap_or(0)
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{
        model::lifecycle::LifecycleEvent,
        sinks::state::{ConsoleSeqs, StateFile, VERSION},
    };

    fn event(seq: u64, uuid: &str, pid: u32, kind: EventKind) -> Sequenced {
        Sequenced {
            seq,
            event: LifecycleEvent::new(SystemTime::now(), uuid, "fc", kind, "exec", Some(pid)),
        }
    }

    fn listed(uuid: &str, pid: u32, last_event_seq: u64) -> InstanceState {
        InstanceState {
            instance_uuid: uuid.into(),
            hypervisor: "fc".into(),
            pid,
            origin: Origin::Exec,
            start_time: "2027-01-15T07:00:00Z".into(),
            start_boot_ns: 5,
            seen_boot_ns: 6,
            last_event_seq,
            console_seq: ConsoleSeqs::default(),
        }
    }

    #[test]
    fn state_and_files_together() {
        let back = ReadBack {
            by_instance: HashMap::from([
                // Ended after the state was written: not previous any more.
                (
                    "a".to_owned(),
                    vec![
                        event(1, "a", 10, EventKind::Start),
                        event(4, "a", 10, EventKind::Stop),
                    ],
                ),
                // An earlier life ended; this pid's beginning is later.
                (
                    "b".to_owned(),
                    vec![
                        event(2, "b", 11, EventKind::Start),
                        event(3, "b", 11, EventKind::Crash),
                        event(5, "b", 12, EventKind::Start),
                    ],
                ),
            ]),
            last_seq: 5,
        };
        assert!(from_state(&listed("a", 10, 1), true, &back).is_none());
        let (b, seq) = from_state(&listed("b", 12, 0), true, &back).unwrap();
        assert_eq!((b.pid, b.seen_boot_ns, seq), (12, 6, 5));
        let (other_boot, _) = from_state(&listed("b", 12, 5), false, &back).unwrap();
        assert_eq!(other_boot.seen_boot_ns, 0, "a pid of another boot");
        // Nothing in the files: the state is trusted.
        assert!(from_state(&listed("c", 13, 0), true, &back).is_some());

        let started = from_event(&event(9, "d", 14, EventKind::Start));
        assert_eq!((started.origin, started.pid), (Origin::Exec, 14));
        assert!(started.seen_boot_ns > time::boot_ns_now());
        let mut old = event(9, "d", 14, EventKind::Discovered);
        old.event.time = SystemTime::UNIX_EPOCH;
        assert_eq!(from_event(&old).seen_boot_ns, 0, "before this boot");
    }

    #[test]
    fn corrupt_state_is_a_fresh_start() {
        let tmp = tempfile::tempdir().unwrap();
        let config = Config {
            log_dir: tmp.path().to_owned(),
            ..Config::default()
        };
        std::fs::write(tmp.path().join(state::FILE_NAME), b"{not json").unwrap();
        let restored = restore(&config);
        assert!(restored.previous.is_empty());
        assert_eq!(restored.last_event_seq, 0);
        let file = StateFile {
            version: VERSION,
            boot_id: restored.boot_id.clone(),
            written_at: time::rfc3339(SystemTime::now()),
            last_event_seq: 12,
            instances: vec![listed("e", 15, 12)],
            pods: Vec::new(),
            departed: Vec::new(),
        };
        std::fs::write(
            tmp.path().join(state::FILE_NAME),
            serde_json::to_vec(&file).unwrap(),
        )
        .unwrap();
        let restored = restore(&config);
        assert_eq!(restored.last_event_seq, 12);
        assert_eq!(restored.previous.len(), 1);
        assert_eq!(restored.previous[0].seen_boot_ns, 6);
        assert_eq!(restored.resume.seqs["e"], [0, 0, 0]);
        assert!(restored.resume.down_since.is_some());
    }

    #[test]
    fn pods_from_the_state_then_the_newer_pod_events() {
        use crate::model::{
            identity::Identity,
            lifecycle::{REASON_POD_ADDED, REASON_POD_DELETED},
        };
        let identity = |project: &str| Identity {
            project: Some(project.into()),
            pod: "p".into(),
            pod_namespace: "ns".into(),
            node: "n1".into(),
            ..Identity::default()
        };
        let pod_event = |seq: u64, uuid: &str, kind: EventKind, project: &str| Sequenced {
            seq,
            event: LifecycleEvent {
                identity: Some(identity(project)),
                ..LifecycleEvent::new(
                    SystemTime::now(),
                    uuid,
                    "unknown",
                    kind,
                    if kind == EventKind::Create {
                        REASON_POD_ADDED
                    } else {
                        REASON_POD_DELETED
                    },
                    None,
                )
            },
        };
        let state = |uuid: &str| PodState {
            instance_uuid: uuid.into(),
            identity: identity("state"),
            created: "2027-01-15T06:59:00Z".into(),
            hypervisor: Some("fc".into()),
        };
        let back = ReadBack {
            by_instance: HashMap::from([
                // Created before the state was written (in it), terminated after: gone.
                (
                    "a".to_owned(),
                    vec![
                        pod_event(1, "a", EventKind::Create, "a"),
                        pod_event(7, "a", EventKind::Terminate, "a"),
                    ],
                ),
                // Created after the state was written: from the events file.
                (
                    "b".to_owned(),
                    vec![pod_event(8, "b", EventKind::Create, "b")],
                ),
                // Terminated before the state was written, created again after.
                (
                    "c".to_owned(),
                    vec![
                        pod_event(2, "c", EventKind::Terminate, "old"),
                        pod_event(9, "c", EventKind::Create, "new"),
                    ],
                ),
                // In the state, nothing newer: the state's.
                (
                    "d".to_owned(),
                    vec![pod_event(3, "d", EventKind::Create, "old")],
                ),
            ]),
            last_seq: 9,
        };
        let mut departed = BTreeMap::new();
        let pods = pods_of(vec![state("a"), state("d")], 5, &back, &mut departed);
        let projects: Vec<(&str, Option<&str>)> = pods
            .iter()
            .map(|(u, p)| (u.as_str(), p.identity.project.as_deref()))
            .collect();
        assert_eq!(
            projects,
            [("b", Some("b")), ("c", Some("new")), ("d", Some("state"))]
        );
        assert_eq!(pods["d"].hypervisor.as_deref(), Some("fc"));
        assert_eq!(pods["b"].hypervisor, None, "no VMM seen");
        // Terminated after the state was written: departed, with the identity it had.
        assert_eq!(departed.keys().collect::<Vec<_>>(), ["a"]);
        assert_eq!(departed["a"].identity, identity("a"));
    }
}
