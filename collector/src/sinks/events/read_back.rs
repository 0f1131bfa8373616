//! The events files read back at start-up: what the events API served before a restart, and
//! where the event numbering stopped.

use std::{
    collections::{HashMap, HashSet},
    path::Path,
    sync::Arc,
    time::{Duration, SystemTime},
};

use tracing::debug;

use super::{EventStore, FILE_NAME};
use crate::{
    config::EventsConfig,
    host::files::LogDir,
    model::lifecycle::{EventKind, Sequenced},
};

/// What the events files hold.
#[derive(Debug, Default)]
pub(crate) struct ReadBack {
    /// Each instance's newest events (at most `events.max_per_instance`), oldest first.
    pub(crate) by_instance: HashMap<String, Vec<Sequenced>>,
    /// The highest `seq` found.
    pub(crate) last_seq: u64,
}

/// Reads the events files in `log_dir`: those written within the retention, and those of the
/// instance folders in `also` (instances listed before the restart, however old their last
/// event).
pub(crate) fn read_back(log_dir: &Path, config: &EventsConfig, also: &HashSet<String>) -> ReadBack {
    let mut back = ReadBack::default();
    let Ok(root) = LogDir::open(log_dir) else {
        return back;
    };
    let retention = Duration::from_secs(config.retention_seconds);
    let now = SystemTime::now();
    let mut files: HashMap<String, Vec<(u32, String)>> = HashMap::new();
    for file in root.files(FILE_NAME) {
        let recent = now
            .duration_since(file.modified)
            .is_ok_and(|age| age < retention);
        if !recent && !also.contains(&file.dir) {
            continue;
        }
        // `events.log` is 0, `events.log.N` is N: older files have higher numbers.
        let rotation = file
            .file
            .strip_prefix(FILE_NAME)
            .and_then(|rest| rest.strip_prefix('.'))
            .and_then(|n| n.parse().ok())
            .unwrap_or(0);
        files
            .entry(file.dir)
            .or_default()
            .push((rotation, file.file));
    }
    for (dir, mut names) in files {
        names.sort_unstable();
        let mut events: Vec<Sequenced> = Vec::new();
        // Newest file first, until the instance has its share.
        for (_, name) in names {
            let Ok(bytes) = root.read_in(&dir, &name) else {
                continue;
            };
            let mut older: Vec<Sequenced> = bytes
                .split(|b| *b == b'\n')
                .filter(|line| !line.is_empty())
                .filter_map(Sequenced::from_line)
                .collect();
            older.append(&mut events);
            events = older;
            if events.len() >= config.max_per_instance {
                break;
            }
        }
        debug!(dir, events = events.len(), "events read back");
        for event in events {
            back.last_seq = back.last_seq.max(event.seq);
            back.by_instance
                .entry(event.event.instance_uuid.clone())
                .or_default()
                .push(event);
        }
    }
    for events in back.by_instance.values_mut() {
        events.sort_by_key(|e| e.seq);
        let extra = events.len().saturating_sub(config.max_per_instance);
        events.drain(..extra);
    }
    back
}

impl EventStore {
    /// Serves `back` as the API did before the restart: each instance's events, an ended one's
    /// for the rest of its retention (counted from its end).
    pub(crate) fn restore(&self, back: ReadBack, retention: Duration) {
        let mut instances: Vec<(String, Vec<Sequenced>)> = back.by_instance.into_iter().collect();
        // Oldest ends first: the journal drops the longest-ended past its bound.
        instances.sort_by_key(|(_, events)| events.last().map(|e| e.event.time));
        for (uuid, events) in instances {
            let Some(last) = events.last() else {
                continue;
            };
            let ended =
                last.event.event.ends_instance() || last.event.event == EventKind::Terminate;
            let ago = SystemTime::now()
                .duration_since(last.event.time)
                .unwrap_or_default();
            if ended && ago >= retention {
                continue;
            }
            let events: Vec<Arc<Sequenced>> = events.into_iter().map(Arc::new).collect();
            if !ended {
                self.journal.begin(&uuid);
            }
            self.journal.push(&uuid, &events, true);
            if ended {
                self.journal.end_since(&uuid, ago);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{host::files::RotatingFile, model::lifecycle::LifecycleEvent};

    fn event(seq: u64, uuid: &str, kind: EventKind, ago: Duration) -> Sequenced {
        Sequenced {
            seq,
            event: LifecycleEvent::new(SystemTime::now() - ago, uuid, "fc", kind, "exec", Some(1)),
        }
    }

    #[test]
    fn files_read_back_into_the_store() {
        let tmp = tempfile::tempdir().unwrap();
        let root = LogDir::open(tmp.path()).unwrap();
        let write = |uuid: &str, events: &[Sequenced], rotate_after: usize| {
            let mut file =
                RotatingFile::open(root.instance_dir(uuid).unwrap(), FILE_NAME, 1 << 20, 2)
                    .unwrap();
            for (i, e) in events.iter().enumerate() {
                let mut line = serde_json::to_vec(e).unwrap();
                line.push(b'\n');
                file.append(&line).unwrap();
                if i + 1 == rotate_after {
                    file.rotate().unwrap();
                }
            }
        };
        let hour = Duration::from_secs(3600);
        write(
            "running",
            &[
                event(1, "running", EventKind::Start, hour),
                event(5, "running", EventKind::Stop, hour),
                event(6, "running", EventKind::Start, hour),
            ],
            2,
        );
        write(
            "ended",
            &[
                event(2, "ended", EventKind::Start, hour),
                event(3, "ended", EventKind::Crash, hour),
            ],
            0,
        );
        write(
            "expired",
            &[
                event(4, "expired", EventKind::Start, 3 * hour),
                event(7, "expired", EventKind::Stop, 2 * hour),
            ],
            0,
        );
        std::fs::write(tmp.path().join("running/events.log"), {
            let mut text = std::fs::read(tmp.path().join("running/events.log")).unwrap();
            text.extend_from_slice(b"{\"torn\":\n");
            text
        })
        .unwrap();
        let config = EventsConfig {
            retention_seconds: 90 * 60,
            ..EventsConfig::default()
        };
        let back = read_back(tmp.path(), &config, &HashSet::new());
        assert_eq!(back.last_seq, 7);
        let seqs =
            |uuid: &str| -> Vec<u64> { back.by_instance[uuid].iter().map(|e| e.seq).collect() };
        assert_eq!(
            seqs("running"),
            [1, 5, 6],
            "rotated file read too, torn line skipped"
        );
        assert_eq!(
            back.by_instance["ended"].last().unwrap().event.event,
            EventKind::Crash
        );

        let store = EventStore::new(&config);
        store.restore(back, Duration::from_secs(config.retention_seconds));
        assert_eq!(store.of_instance("running").unwrap().len(), 3);
        assert_eq!(store.of_instance("ended").unwrap().len(), 2);
        assert!(
            store.of_instance("expired").is_none(),
            "ended two hours ago, retention 90 minutes"
        );
        let (all, _) = store.follow(None);
        let order: Vec<u64> = all.iter().map(|e| e.seq).collect();
        assert_eq!(order, [1, 2, 3, 5, 6]);
    }
}
