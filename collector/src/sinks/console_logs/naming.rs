//! Identity on the console files: each line is written with its instance's `identity` (its
//! Pod's, from the registry's snapshot). With the Kubernetes source on, a VMM usually starts
//! before its Pod is seen, so an unnamed instance's lines are held back, in order, until the
//! identity arrives, for at most `kubernetes.identity_wait_seconds`, and within
//! `kubernetes.identity_hold_bytes` for all instances together. Past either they are written
//! without identity and counted, and the instance's later lines go straight out until it is
//! named.

use std::{
    collections::{HashMap, HashSet},
    sync::Arc,
    time::{Duration, Instant},
};

use crate::model::{
    console::{LogRecord, identity_json},
    console_stats::ConsoleStats,
    identity::Identity,
    instance::SnapshotReceiver,
};

/// How often held lines are checked against the snapshot and the wait, at least.
pub(super) const CHECK_EVERY: Duration = Duration::from_millis(100);

/// The wait for identity: given when the Kubernetes source is on.
pub(crate) struct IdentityWait {
    pub(crate) snapshot: SnapshotReceiver,
    pub(crate) wait: Duration,
    pub(crate) max_bytes: usize,
}

/// How a run of an instance's lines goes to its file.
pub(super) enum Naming {
    /// No identity source: as they are.
    Off,
    /// With this identity (its JSON).
    Known(Arc<[u8]>),
    /// Held until named (or the wait runs out).
    Hold,
    /// The wait ran out: without identity, counted.
    Unnamed,
}

/// Lines to write now, with the identity to stamp them with (`None`: unnamed, counted).
pub(super) type Release = (Arc<str>, Vec<Arc<LogRecord>>, Option<Arc<[u8]>>);

struct Held {
    since: Instant,
    records: Vec<Arc<LogRecord>>,
    bytes: usize,
}

pub(super) struct Namer {
    wait: Option<IdentityWait>,
    /// The JSON of each named instance's identity, encoded once.
    known: HashMap<Arc<str>, (Identity, Arc<[u8]>)>,
    held: HashMap<Arc<str>, Held>,
    held_bytes: usize,
    held_lines: usize,
    /// Instances whose wait ran out, unnamed still.
    gave_up: HashSet<Arc<str>>,
    last_check: Instant,
    stats: ConsoleStats,
}

impl Namer {
    pub(super) fn new(wait: Option<IdentityWait>, stats: ConsoleStats) -> Self {
        Self {
            wait,
            known: HashMap::new(),
            held: HashMap::new(),
            held_bytes: 0,
            held_lines: 0,
            gave_up: HashSet::new(),
            last_check: Instant::now(),
            stats,
        }
    }

    /// Something is held: the writer must come back within [`CHECK_EVERY`].
    pub(super) fn holding(&self) -> bool {
        !self.held.is_empty()
    }

    /// The identity of `uuid` now, if any (encoded once per identity).
    fn look_up(&mut self, uuid: &Arc<str>) -> Option<Arc<[u8]>> {
        let wait = self.wait.as_ref()?;
        let snapshot = wait.snapshot.borrow();
        let Some(identity) = snapshot.identity_of(uuid) else {
            self.known.remove(uuid);
            return None;
        };
        if let Some((cached, json)) = self.known.get(uuid)
            && cached == identity
        {
            return Some(json.clone());
        }
        let json: Arc<[u8]> = identity_json(identity).into();
        self.known
            .insert(uuid.clone(), (identity.clone(), json.clone()));
        Some(json)
    }

    /// How the next lines of `uuid` go. When `Known` and lines of it are held, take those
    /// first ([`Self::take_held`]).
    pub(super) fn naming(&mut self, uuid: &Arc<str>) -> Naming {
        if self.wait.is_none() {
            return Naming::Off;
        }
        if let Some(json) = self.look_up(uuid) {
            self.gave_up.remove(uuid);
            return Naming::Known(json);
        }
        if self.gave_up.contains(uuid) {
            Naming::Unnamed
        } else {
            Naming::Hold
        }
    }

    /// Lines of `uuid` held so far, in order (none: empty).
    pub(super) fn take_held(&mut self, uuid: &Arc<str>) -> Vec<Arc<LogRecord>> {
        let Some(held) = self.held.remove(uuid) else {
            return Vec::new();
        };
        self.held_bytes -= held.bytes;
        self.held_lines -= held.records.len();
        self.publish();
        held.records
    }

    /// Holds `run` (lines of `uuid`, unnamed). Returns what the byte bound pushes out: the
    /// lines of the instances waiting longest, to be written unnamed.
    pub(super) fn hold(&mut self, uuid: &Arc<str>, run: &[Arc<LogRecord>]) -> Vec<Release> {
        let bytes: usize = run.iter().map(|r| r.size()).sum();
        let held = self.held.entry(uuid.clone()).or_insert_with(|| Held {
            since: Instant::now(),
            records: Vec::new(),
            bytes: 0,
        });
        held.records.extend(run.iter().cloned());
        held.bytes += bytes;
        self.held_bytes += bytes;
        self.held_lines += run.len();
        let max = self.wait.as_ref().map_or(0, |w| w.max_bytes);
        let mut out = Vec::new();
        while self.held_bytes > max {
            let Some(oldest) = self
                .held
                .iter()
                .min_by_key(|(_, h)| h.since)
                .map(|(u, _)| u.clone())
            else {
                break;
            };
            out.push(self.give_up(&oldest));
        }
        self.publish();
        out
    }

    /// `uuid`'s held lines, to go out unnamed; later ones follow without waiting.
    fn give_up(&mut self, uuid: &Arc<str>) -> Release {
        let records = self.take_held(uuid);
        self.stats.unnamed(records.len());
        self.gave_up.insert(uuid.clone());
        (uuid.clone(), records, None)
    }

    /// What is due: the held lines of instances named since, and of those whose wait ran out.
    /// Checks at most every [`CHECK_EVERY`], unless `now_or_never` (shutdown: everything goes,
    /// named if it can be).
    pub(super) fn due(&mut self, now_or_never: bool) -> Vec<Release> {
        if self.held.is_empty() || (!now_or_never && self.last_check.elapsed() < CHECK_EVERY) {
            return Vec::new();
        }
        self.last_check = Instant::now();
        let wait = self.wait.as_ref().map_or(Duration::ZERO, |w| w.wait);
        let mut uuids: Vec<(Instant, Arc<str>)> = self
            .held
            .iter()
            .map(|(u, h)| (h.since, u.clone()))
            .collect();
        // The longest waiting first, so that files see lines in the order they were held.
        uuids.sort();
        let mut out = Vec::new();
        for (since, uuid) in uuids {
            if let Some(json) = self.look_up(&uuid) {
                let records = self.take_held(&uuid);
                out.push((uuid, records, Some(json)));
            } else if now_or_never || since.elapsed() >= wait {
                out.push(self.give_up(&uuid));
            }
        }
        out
    }

    /// The instance ended: forget what was cached of it (held lines stay until due).
    pub(super) fn ended(&mut self, uuid: &Arc<str>) {
        self.gave_up.remove(uuid);
        self.known.remove(uuid);
    }

    /// Counts lines written unnamed after the wait.
    pub(super) fn count_unnamed(&self, lines: usize) {
        self.stats.unnamed(lines);
    }

    fn publish(&self) {
        self.stats.identity_held(self.held_lines, self.held_bytes);
    }
}

#[cfg(test)]
mod tests {
    use std::{collections::BTreeMap, sync::Arc};

    use super::*;
    use crate::model::{console::Stream, identity::PodBacked, instance::Snapshot};

    fn identity() -> Identity {
        Identity {
            project: Some("p".into()),
            pod: "web-0".into(),
            pod_namespace: "ns-1".into(),
            node: "n1".into(),
            ..Identity::default()
        }
    }

    fn named(uuid: &str) -> Arc<Snapshot> {
        Arc::new(Snapshot {
            pods: BTreeMap::from([(
                uuid.to_owned(),
                PodBacked {
                    identity: identity(),
                    created: std::time::SystemTime::UNIX_EPOCH,
                    hypervisor: None,
                },
            )]),
            ..Snapshot::default()
        })
    }

    fn lines(uuid: &str, seqs: std::ops::RangeInclusive<u64>) -> Vec<Arc<LogRecord>> {
        seqs.map(|seq| LogRecord::test_line(uuid, Stream::Console, seq, "hello"))
            .collect()
    }

    #[test]
    fn held_until_named_then_in_order() {
        let (tx, snapshot) = crate::registry::snapshot_channel();
        let stats = ConsoleStats::default();
        let wait = IdentityWait {
            snapshot,
            wait: Duration::from_secs(30),
            max_bytes: 1 << 20,
        };
        let mut namer = Namer::new(Some(wait), stats.clone());
        let a: Arc<str> = "a".into();
        assert!(matches!(namer.naming(&a), Naming::Hold));
        assert!(namer.hold(&a, &lines("a", 1..=3)).is_empty());
        assert_eq!(stats.identity_hold().held_lines, 3);
        std::thread::sleep(CHECK_EVERY + Duration::from_millis(10));
        assert!(
            namer.due(false).is_empty(),
            "not named, still within the wait"
        );
        tx.send_replace(named("a"));
        let Naming::Known(json) = namer.naming(&a) else {
            panic!("named")
        };
        assert_eq!(
            serde_json::from_slice::<Identity>(&json).unwrap(),
            identity()
        );
        let held: Vec<u64> = namer.take_held(&a).iter().map(|r| r.seq).collect();
        assert_eq!(held, [1, 2, 3]);
        assert_eq!(stats.identity_hold().held_lines, 0);
        assert_eq!(stats.identity_hold().unnamed_lines, 0);
    }

    #[test]
    fn the_wait_and_the_byte_bound_let_lines_go_unnamed_and_counted() {
        let (_tx, snapshot) = crate::registry::snapshot_channel();
        let stats = ConsoleStats::default();
        let one = lines("x", 1..=1)[0].size();
        let wait = IdentityWait {
            snapshot,
            wait: Duration::from_millis(50),
            max_bytes: 3 * one,
        };
        let mut namer = Namer::new(Some(wait), stats.clone());
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(namer.hold(&a, &lines("a", 1..=2)).is_empty());
        std::thread::sleep(Duration::from_millis(2));
        // Over the bound: the instance waiting longest goes out unnamed.
        let out = namer.hold(&b, &lines("b", 1..=2));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (&*out[0].0, out[0].1.len(), out[0].2.is_none()),
            ("a", 2, true)
        );
        assert!(matches!(namer.naming(&a), Naming::Unnamed));
        // The wait runs out for b.
        std::thread::sleep(Duration::from_millis(120));
        let due = namer.due(false);
        assert_eq!(due.len(), 1);
        assert_eq!((&*due[0].0, due[0].1.len()), ("b", 2));
        assert_eq!(stats.identity_hold().unnamed_lines, 4);
        assert!(!namer.holding());
        // Without an identity source, nothing waits.
        let mut off = Namer::new(None, stats);
        assert!(matches!(off.naming(&a), Naming::Off));
    }
}
