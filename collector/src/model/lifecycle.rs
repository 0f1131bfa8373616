//! Lifecycle events of instances and how an exit is classified. Pure: the wait status and the
//! OOM mark in, the event kind and its fields out. docs/lifecycle.md states the same rules.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::{Arc, Mutex},
    time::{Duration, Instant, SystemTime},
};

use serde::{Deserialize, Serialize};

use super::{identity::Identity, process::OomCounters, time};

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub(crate) enum EventKind {
    /// The VMM exec'd while the collector watched.
    Start,
    /// The VMM was already running when the collector started.
    Discovered,
    /// Ended as asked: exit 0, SIGTERM/SIGINT/SIGHUP, or SIGKILL without OOM.
    Stop,
    /// Ended on its own terms but badly: non-zero exit, or a fatal or unexpected signal.
    Crash,
    /// Chosen by the kernel's OOM killer and then killed by it.
    OomKill,
    /// A Pod backing the instance appeared on this node (the Kubernetes source).
    Create,
    /// The Pod backing the instance was deleted (with the identity it had).
    Terminate,
}

impl EventKind {
    /// Every kind, for pre-set metric series.
    pub(crate) const ALL: [Self; 7] = [
        Self::Start,
        Self::Discovered,
        Self::Stop,
        Self::Crash,
        Self::OomKill,
        Self::Create,
        Self::Terminate,
    ];

    /// The kind's place in [`Self::ALL`].
    pub(crate) fn index(self) -> usize {
        Self::ALL
            .iter()
            .position(|k| *k == self)
            .expect("every kind is in ALL")
    }

    /// Kinds about the instance's Pod, not its VMM process (no `pid`).
    pub(crate) const POD: [Self; 2] = [Self::Create, Self::Terminate];

    pub(crate) fn as_str(self) -> &'static str {
        match self {
            Self::Start => "start",
            Self::Discovered => "discovered",
            Self::Stop => "stop",
            Self::Crash => "crash",
            Self::OomKill => "oom_kill",
            Self::Create => "create",
            Self::Terminate => "terminate",
        }
    }
}

/// `reason` of a `start`: the VMM exec'd.
pub(crate) const REASON_EXEC: &str = "exec";
/// `reason` of a `discovered` at start-up.
pub(crate) const REASON_RUNNING_AT_STARTUP: &str = "running_at_startup";
/// `reason` of a `discovered` found by a `/proc` rescan after the kernel lost exec records.
pub(crate) const REASON_EXEC_RECORD_LOST: &str = "exec_record_lost";
/// `reason` of a `stop` whose exit the collector did not see: the kernel lost the exit
/// record, or the instance ended while the collector was down. No exit status: none is known.
pub(crate) const REASON_UNOBSERVED_EXIT: &str = "unobserved_exit";

/// `reason` of a `create`: a Pod backing the instance was added on this node while the
/// collector watched.
pub(crate) const REASON_POD_ADDED: &str = "pod_added";
/// `reason` of a `create`: the Pod was already there when the collector started (its first
/// list), and the previous run did not know it.
pub(crate) const REASON_POD_LISTED: &str = "pod_listed";
/// `reason` of a `terminate`: the Pod was deleted (seen by the watch, missing from a relist, or
/// gone while the collector was down).
pub(crate) const REASON_POD_DELETED: &str = "pod_deleted";

/// Every `reason` an event can carry (read back from the events files as these constants).
pub(crate) const REASONS: [&str; 14] = [
    REASON_EXEC,
    REASON_RUNNING_AT_STARTUP,
    REASON_EXEC_RECORD_LOST,
    REASON_UNOBSERVED_EXIT,
    REASON_POD_ADDED,
    REASON_POD_LISTED,
    REASON_POD_DELETED,
    "exited",
    "terminated",
    "killed",
    "exit_code",
    "fatal_signal",
    "signal",
    "oom_killer",
];

/// `constraint` values of [`OomDetails`].
pub(crate) const OOM_CONSTRAINTS: [&str; 3] = ["memcg", "global", "unknown"];

/// The constant of `vocabulary` equal to `text`, else `"unknown"` (a value from a newer
/// collector): what a field of static text is read back as.
fn static_text(vocabulary: &[&'static str], text: &str) -> &'static str {
    vocabulary
        .iter()
        .find(|known| **known == text)
        .copied()
        .unwrap_or("unknown")
}

/// How an exit reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct ExitClass {
    pub(crate) event: EventKind,
    /// `exited`, `terminated`, `killed`, `exit_code`, `fatal_signal`, `signal`, `oom_killer`.
    pub(crate) reason: &'static str,
    /// The exit code, when the process exited (not signalled).
    pub(crate) exit_code: Option<i32>,
    /// The terminating signal, when signalled.
    pub(crate) signal: Option<u32>,
    pub(crate) core_dumped: bool,
}

const SIGHUP: u32 = 1;
const SIGINT: u32 = 2;
const SIGKILL: u32 = 9;
const SIGTERM: u32 = 15;
/// Signals whose default action is a core dump: the process crashed.
const FATAL_SIGNALS: [u32; 7] = [4, 5, 6, 7, 8, 11, 31]; // ILL TRAP ABRT BUS FPE SEGV SYS

/// Classifies a wait status (`exit_code << 8`, or the signal with 0x80 for a core dump).
pub(crate) fn classify_exit(wait_status: u32, oom_victim: bool) -> ExitClass {
    let signal = wait_status & 0x7f;
    if signal == 0 {
        let code = ((wait_status >> 8) & 0xff) as i32;
        let (event, reason) = if code == 0 {
            (EventKind::Stop, "exited")
        } else {
            (EventKind::Crash, "exit_code")
        };
        return ExitClass {
            event,
            reason,
            exit_code: Some(code),
            signal: None,
            core_dumped: false,
        };
    }
    let core_dumped = wait_status & 0x80 != 0;
    let (event, reason) = match signal {
        SIGKILL if oom_victim => (EventKind::OomKill, "oom_killer"),
        SIGKILL => (EventKind::Stop, "killed"),
        SIGTERM | SIGINT | SIGHUP => (EventKind::Stop, "terminated"),
        s if FATAL_SIGNALS.contains(&s) || core_dumped => (EventKind::Crash, "fatal_signal"),
        _ => (EventKind::Crash, "signal"),
    };
    ExitClass {
        event,
        reason,
        exit_code: None,
        signal: Some(signal),
        core_dumped,
    }
}

/// The usual name of signal `n` on Linux x86_64/arm64.
pub(crate) fn signal_name(n: u32) -> Option<&'static str> {
    const NAMES: [&str; 31] = [
        "SIGHUP",
        "SIGINT",
        "SIGQUIT",
        "SIGILL",
        "SIGTRAP",
        "SIGABRT",
        "SIGBUS",
        "SIGFPE",
        "SIGKILL",
        "SIGUSR1",
        "SIGSEGV",
        "SIGUSR2",
        "SIGPIPE",
        "SIGALRM",
        "SIGTERM",
        "SIGSTKFLT",
        "SIGCHLD",
        "SIGCONT",
        "SIGSTOP",
        "SIGTSTP",
        "SIGTTIN",
        "SIGTTOU",
        "SIGURG",
        "SIGXCPU",
        "SIGXFSZ",
        "SIGVTALRM",
        "SIGPROF",
        "SIGWINCH",
        "SIGIO",
        "SIGPWR",
        "SIGSYS",
    ];
    NAMES.get(n.checked_sub(1)? as usize).copied()
}

/// What the OOM killer left on record about its victim.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub(crate) struct OomDetails {
    /// Thread the kernel named as victim.
    pub(crate) victim_pid: u32,
    /// Counters as the kernel reported them (absent on kernels older than 6.8).
    #[serde(flatten)]
    pub(crate) counters: Option<OomCounters>,
    /// `memcg` when a memory cgroup of the instance hit its limit, `global` when none had one
    /// or hit it, `unknown` when the cgroup could not be read.
    pub(crate) constraint: &'static str,
    /// The memory cgroup that constrained the instance (`memcg`), else the instance's own.
    pub(crate) memcg_path: Option<String>,
    pub(crate) memcg_limit_bytes: Option<u64>,
}

/// One lifecycle event, as the API, the events files and the log line show it. Read back from
/// the events files at start-up ([`Sequenced::from_line`]).
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct LifecycleEvent {
    /// RFC 3339, from the kernel's timestamp of the exec or exit.
    pub(crate) ts: String,
    /// `ts` as a time.
    #[serde(skip)]
    pub(crate) time: SystemTime,
    pub(crate) instance_uuid: String,
    /// The VMM's hypervisor; for `create` and `terminate`, that of the instance's last VMM, or
    /// `unknown` when none was seen.
    pub(crate) hypervisor: String,
    pub(crate) event: EventKind,
    pub(crate) reason: &'static str,
    /// The VMM's pid; `None` for `create` and `terminate` (events of the Pod).
    pub(crate) pid: Option<u32>,
    pub(crate) exit_code: Option<i32>,
    pub(crate) signal: Option<u32>,
    pub(crate) signal_name: Option<&'static str>,
    pub(crate) core_dumped: bool,
    /// Seconds from the VMM's start to this event; for `terminate`, from the `create`.
    pub(crate) uptime_seconds: f64,
    pub(crate) oom: Option<OomDetails>,
    /// Whose the instance is, as known at the event; `None` while no Pod is known for it.
    pub(crate) identity: Option<Identity>,
}

impl LifecycleEvent {
    /// An event with no exit fields, at `time`.
    pub(crate) fn new(
        time: SystemTime,
        instance_uuid: &str,
        hypervisor: &str,
        event: EventKind,
        reason: &'static str,
        pid: Option<u32>,
    ) -> Self {
        Self {
            ts: time::rfc3339(time),
            time,
            instance_uuid: instance_uuid.to_owned(),
            hypervisor: hypervisor.to_owned(),
            event,
            reason,
            pid,
            exit_code: None,
            signal: None,
            signal_name: None,
            core_dumped: false,
            uptime_seconds: 0.0,
            oom: None,
            identity: None,
        }
    }

    /// Fills the exit fields from `class`.
    pub(crate) fn with_exit(mut self, class: ExitClass) -> Self {
        self.exit_code = class.exit_code;
        self.signal = class.signal;
        self.signal_name = class.signal.and_then(signal_name);
        self.core_dumped = class.core_dumped;
        self
    }
}

/// An event with its place in the collector's record (gap-free, from 1, continued across
/// restarts), as it leaves the registry for the sinks.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub(crate) struct Sequenced {
    pub(crate) seq: u64,
    #[serde(flatten)]
    pub(crate) event: LifecycleEvent,
}

/// An events-file line, as read back: the static texts owned until they are matched with
/// their constants.
#[derive(Deserialize)]
struct EventLine {
    seq: u64,
    ts: String,
    instance_uuid: String,
    hypervisor: String,
    event: EventKind,
    reason: String,
    pid: Option<u32>,
    exit_code: Option<i32>,
    signal: Option<u32>,
    #[serde(default)]
    core_dumped: bool,
    #[serde(default)]
    uptime_seconds: f64,
    oom: Option<OomLine>,
    #[serde(default)]
    identity: Option<Identity>,
}

#[derive(Deserialize)]
struct OomLine {
    victim_pid: u32,
    #[serde(flatten)]
    counters: Option<OomCounters>,
    constraint: String,
    memcg_path: Option<String>,
    memcg_limit_bytes: Option<u64>,
}

impl Sequenced {
    /// An event as an events file holds it (one JSON line); `None` for anything else.
    pub(crate) fn from_line(line: &[u8]) -> Option<Self> {
        let l: EventLine = serde_json::from_slice(line).ok()?;
        Some(Self {
            seq: l.seq,
            event: LifecycleEvent {
                time: time::parse_rfc3339(&l.ts)?,
                ts: l.ts,
                instance_uuid: l.instance_uuid,
                hypervisor: l.hypervisor,
                event: l.event,
                reason: static_text(&REASONS, &l.reason),
                pid: l.pid,
                exit_code: l.exit_code,
                signal: l.signal,
                signal_name: l.signal.and_then(signal_name),
                core_dumped: l.core_dumped,
                uptime_seconds: l.uptime_seconds,
                oom: l.oom.map(|o| OomDetails {
                    victim_pid: o.victim_pid,
                    counters: o.counters,
                    constraint: static_text(&OOM_CONSTRAINTS, &o.constraint),
                    memcg_path: o.memcg_path,
                    memcg_limit_bytes: o.memcg_limit_bytes,
                }),
                identity: l.identity,
            },
        })
    }
}

/// A consumer of the registry's lifecycle events: called in order, from the registry's task,
/// and must not block it (a subscriber that does I/O queues, bounded, and counts what it
/// drops).
pub(crate) trait EventSubscriber: Send {
    fn event(&mut self, event: &Arc<Sequenced>);
}

impl EventKind {
    /// Whether an event of this kind ends its instance's life.
    pub(crate) fn ends_instance(self) -> bool {
        matches!(self, Self::Stop | Self::Crash | Self::OomKill)
    }

    /// Whether this is an event of the instance's Pod (`create`, `terminate`), not its VMM.
    pub(crate) fn is_pod(self) -> bool {
        Self::POD.contains(&self)
    }
}

/// How long an instance's per-instance event counts stay exposed once it is gone (no VMM, no
/// Pod): several scrapes, so that its last event (stop, terminate) is scraped and a rule's
/// `rate(...[5m])` sees it.
pub(crate) const INSTANCE_EVENTS_LINGER: Duration = Duration::from_mins(10);
/// Most instances whose counts are kept; past it the longest gone leave first.
pub(crate) const INSTANCE_EVENTS_MAX: usize = 10_000;

#[derive(Debug)]
struct Counts {
    by_kind: [u64; EventKind::ALL.len()],
    /// When a scrape first found the instance gone.
    gone_since: Option<Instant>,
}

/// Lifecycle events by instance and kind (`compute_instance_events_total`): what lets a rule
/// count events per project, joined on `compute_instance_info`. Every kind is exposed for each
/// instance on the host (0 until it happens; so a `rate()` sees the events after its first
/// scrape), and kept [`INSTANCE_EVENTS_LINGER`] after the instance is gone. Cheap to clone.
#[derive(Debug, Clone, Default)]
pub(crate) struct InstanceEventCounts(Arc<Mutex<BTreeMap<String, Counts>>>);

impl InstanceEventCounts {
    pub(crate) fn inc(&self, uuid: &str, kind: EventKind) {
        let mut counts = self.0.lock().expect("event counts lock");
        if !counts.contains_key(uuid) && counts.len() >= INSTANCE_EVENTS_MAX {
            let oldest = counts
                .iter()
                .filter_map(|(u, c)| Some((c.gone_since?, u.clone())))
                .min();
            if let Some((_, uuid)) = oldest {
                counts.remove(&uuid);
            }
        }
        let entry = counts.entry(uuid.to_owned()).or_insert(Counts {
            by_kind: [0; EventKind::ALL.len()],
            gone_since: None,
        });
        entry.by_kind[kind.index()] += 1;
        entry.gone_since = None;
    }

    /// The counts to expose at `now`, by instance and kind, for the instances `on_host` (at 0
    /// for those without events) and those gone less than the linger ago (the others are
    /// forgotten).
    pub(crate) fn expose(
        &self,
        now: Instant,
        on_host: &BTreeSet<&str>,
    ) -> Vec<(String, [u64; EventKind::ALL.len()])> {
        let mut counts = self.0.lock().expect("event counts lock");
        for uuid in on_host {
            if !counts.contains_key(*uuid) {
                counts.insert(
                    (*uuid).to_owned(),
                    Counts {
                        by_kind: [0; EventKind::ALL.len()],
                        gone_since: None,
                    },
                );
            }
        }
        counts.retain(|uuid, c| {
            if on_host.contains(uuid.as_str()) {
                c.gone_since = None;
                return true;
            }
            let since = *c.gone_since.get_or_insert(now);
            now.duration_since(since) < INSTANCE_EVENTS_LINGER
        });
        counts
            .iter()
            .map(|(uuid, c)| (uuid.clone(), c.by_kind))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn class(
        event: EventKind,
        reason: &'static str,
        exit_code: Option<i32>,
        signal: Option<u32>,
        core_dumped: bool,
    ) -> ExitClass {
        ExitClass {
            event,
            reason,
            exit_code,
            signal,
            core_dumped,
        }
    }

    #[test]
    fn classification_table() {
        use EventKind::{Crash, OomKill, Stop};
        let cases = [
            (0, false, class(Stop, "exited", Some(0), None, false)),
            (
                3 << 8,
                false,
                class(Crash, "exit_code", Some(3), None, false),
            ),
            (
                255 << 8,
                false,
                class(Crash, "exit_code", Some(255), None, false),
            ),
            (15, false, class(Stop, "terminated", None, Some(15), false)),
            (2, false, class(Stop, "terminated", None, Some(2), false)),
            (1, false, class(Stop, "terminated", None, Some(1), false)),
            (9, false, class(Stop, "killed", None, Some(9), false)),
            (9, true, class(OomKill, "oom_killer", None, Some(9), false)),
            (
                11,
                false,
                class(Crash, "fatal_signal", None, Some(11), false),
            ),
            (
                11 | 0x80,
                false,
                class(Crash, "fatal_signal", None, Some(11), true),
            ),
            (
                6 | 0x80,
                true,
                class(Crash, "fatal_signal", None, Some(6), true),
            ),
            (13, false, class(Crash, "signal", None, Some(13), false)),
        ];
        for (status, oom, want) in cases {
            assert_eq!(
                classify_exit(status, oom),
                want,
                "status {status:#x} oom {oom}"
            );
        }
    }

    #[test]
    fn events_read_back_as_written() {
        let oom = OomDetails {
            victim_pid: 8,
            counters: Some(OomCounters {
                total_vm_bytes: 1,
                anon_rss_bytes: 2,
                file_rss_bytes: 3,
                shmem_rss_bytes: 4,
                oom_score_adj: -5,
            }),
            constraint: "memcg",
            memcg_path: Some("/x".into()),
            memcg_limit_bytes: Some(9),
        };
        let t = SystemTime::UNIX_EPOCH + Duration::new(1_800_000_000, 123_456_789);
        let events = [
            LifecycleEvent {
                oom: Some(oom),
                uptime_seconds: 1.5,
                ..LifecycleEvent::new(t, "u", "fc", EventKind::OomKill, "oom_killer", Some(7))
                    .with_exit(classify_exit(9, true))
            },
            LifecycleEvent::new(
                t,
                "u\"2",
                "fc",
                EventKind::Stop,
                REASON_UNOBSERVED_EXIT,
                Some(7),
            ),
            LifecycleEvent::new(t, "u", "fc", EventKind::Start, REASON_EXEC, Some(7)),
            LifecycleEvent {
                identity: Some(Identity {
                    project: Some("p".into()),
                    pod: "web-0".into(),
                    pod_namespace: "ns-1".into(),
                    node: "n1".into(),
                    ..Identity::default()
                }),
                ..LifecycleEvent::new(t, "u", "unknown", EventKind::Create, REASON_POD_ADDED, None)
            },
        ];
        for (seq, event) in events.into_iter().enumerate() {
            let sequenced = Sequenced {
                seq: seq as u64 + 1,
                event,
            };
            let line = serde_json::to_vec(&sequenced).unwrap();
            assert_eq!(Sequenced::from_line(&line), Some(sequenced));
        }
        assert_eq!(Sequenced::from_line(b"{\"seq\":1}"), None);
        assert_eq!(Sequenced::from_line(b"not json"), None);
        let newer = br#"{"seq":3,"ts":"2027-01-15T08:00:00Z","instance_uuid":"u","hypervisor":"h","event":"stop","reason":"from_the_future","pid":1,"exit_code":null,"signal":null,"signal_name":null,"core_dumped":false,"uptime_seconds":0.0,"oom":null,"extra":1}"#;
        assert_eq!(Sequenced::from_line(newer).unwrap().event.reason, "unknown");
    }

    #[test]
    fn signal_names() {
        assert_eq!(signal_name(9), Some("SIGKILL"));
        assert_eq!(signal_name(11), Some("SIGSEGV"));
        assert_eq!(signal_name(31), Some("SIGSYS"));
        assert_eq!(signal_name(0), None);
        assert_eq!(signal_name(64), None);
    }

    #[test]
    fn instance_event_counts_linger_then_go() {
        let counts = InstanceEventCounts::default();
        counts.inc("a", EventKind::Create);
        counts.inc("a", EventKind::Start);
        counts.inc("a", EventKind::Start);
        let t0 = Instant::now();
        let (here, gone) = (BTreeSet::from(["a", "b"]), BTreeSet::new());
        let almost = t0
            + INSTANCE_EVENTS_LINGER
                .checked_sub(Duration::from_secs(1))
                .unwrap();
        let exposed = counts.expose(t0, &here);
        // b is on the host without events: every kind at 0.
        assert_eq!(exposed.len(), 2);
        assert_eq!(exposed[1], ("b".to_owned(), [0; EventKind::ALL.len()]));
        let by_kind = exposed[0].1;
        assert_eq!(by_kind[EventKind::Start.index()], 2);
        assert_eq!(by_kind[EventKind::Create.index()], 1);
        assert_eq!(by_kind[EventKind::Crash.index()], 0, "every kind, at 0");
        // Gone: still exposed within the linger, forgotten after it.
        assert_eq!(counts.expose(t0, &gone).len(), 2);
        assert_eq!(counts.expose(almost, &gone).len(), 2);
        assert!(counts.expose(t0 + INSTANCE_EVENTS_LINGER, &gone).is_empty());
    }
}
