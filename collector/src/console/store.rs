//! Recent console lines of each instance, in memory, for the API: `tail`, `since` and
//! `follow`. Bounded in bytes per instance (oldest lines leave first); an instance's lines stay
//! for `console.retention_secs` after it exited, then go.
//!
//! History and the live subscription are taken under one lock, so a follower sees every line
//! exactly once: the history up to now, then each later line.

use std::{
    collections::{HashMap, VecDeque},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::broadcast;

use super::LogRecord;

/// Lines a follower may fall behind before it skips (and is told how many).
const FOLLOW_BACKLOG: usize = 8192;

#[derive(Debug)]
struct InstanceLog {
    records: VecDeque<Arc<LogRecord>>,
    bytes: usize,
    /// Present while the instance runs; dropping it ends every follow.
    live: Option<broadcast::Sender<Arc<LogRecord>>>,
    ended_at: Option<Instant>,
}

#[derive(Debug)]
pub struct LiveStore {
    history_bytes: usize,
    logs: Mutex<HashMap<Arc<str>, InstanceLog>>,
}

/// What a reader gets: the lines kept so far and, for a running instance, the later ones.
pub struct Subscription {
    pub history: Vec<Arc<LogRecord>>,
    pub live: Option<broadcast::Receiver<Arc<LogRecord>>>,
}

impl LiveStore {
    pub fn new(history_bytes: usize) -> Self {
        Self {
            history_bytes,
            logs: Mutex::new(HashMap::new()),
        }
    }

    /// An instance is running: make its log readable (again, if it ran before).
    pub fn begin(&self, uuid: &Arc<str>) {
        let mut logs = self.logs.lock().expect("store lock");
        let log = logs.entry(uuid.clone()).or_insert_with(|| InstanceLog {
            records: VecDeque::new(),
            bytes: 0,
            live: None,
            ended_at: None,
        });
        log.ended_at = None;
        if log.live.is_none() {
            log.live = Some(broadcast::channel(FOLLOW_BACKLOG).0);
        }
    }

    /// Appends lines (of instances already begun) and hands them to followers.
    pub fn push(&self, records: &[Arc<LogRecord>]) {
        let mut logs = self.logs.lock().expect("store lock");
        // Records come in runs of one instance: look each run up once.
        for run in records.chunk_by(|a, b| Arc::ptr_eq(&a.instance_uuid, &b.instance_uuid)) {
            let Some(log) = logs.get_mut(&run[0].instance_uuid) else {
                continue;
            };
            let live = log.live.as_ref().filter(|l| l.receiver_count() > 0);
            for record in run {
                log.bytes += record.size();
                log.records.push_back(record.clone());
                if let Some(live) = live {
                    // A follower that left meanwhile is not an error.
                    let _ = live.send(record.clone());
                }
            }
            while log.bytes > self.history_bytes {
                let Some(old) = log.records.pop_front() else {
                    break;
                };
                log.bytes -= old.size();
            }
        }
    }

    /// The instance exited and its last lines are in: end the follows, start the retention.
    pub fn end(&self, uuid: &str) {
        if let Some(log) = self.logs.lock().expect("store lock").get_mut(uuid) {
            log.live = None;
            log.ended_at = Some(Instant::now());
        }
    }

    /// Drops the logs of instances that ended more than `retention` ago; returns their ids.
    pub fn expire(&self, retention: Duration) -> Vec<Arc<str>> {
        let mut logs = self.logs.lock().expect("store lock");
        let expired: Vec<Arc<str>> = logs
            .iter()
            .filter(|(_, log)| log.ended_at.is_some_and(|t| t.elapsed() >= retention))
            .map(|(uuid, _)| uuid.clone())
            .collect();
        for uuid in &expired {
            logs.remove(uuid);
        }
        expired
    }

    /// The kept lines of `uuid` and, when `follow`, a subscription to the later ones. `None`
    /// when the store knows no such instance.
    pub fn subscribe(&self, uuid: &str, follow: bool) -> Option<Subscription> {
        let logs = self.logs.lock().expect("store lock");
        let log = logs.get(uuid)?;
        Some(Subscription {
            history: log.records.iter().cloned().collect(),
            live: if follow {
                log.live.as_ref().map(broadcast::Sender::subscribe)
            } else {
                None
            },
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::console::Stream;

    fn record(uuid: &str, seq: u64, message: &str) -> Arc<LogRecord> {
        LogRecord::test_line(uuid, Stream::Stdout, seq, message)
    }

    #[test]
    fn history_then_live_then_end() {
        let store = LiveStore::new(1 << 20);
        let uuid: Arc<str> = "a".into();
        assert!(store.subscribe("a", true).is_none());
        store.begin(&uuid);
        store.push(&[record("a", 1, "one"), record("b", 1, "not begun")]);
        let mut sub = store.subscribe("a", true).unwrap();
        assert_eq!(sub.history.len(), 1);
        store.push(&[record("a", 2, "two")]);
        store.end("a");
        let live = sub.live.as_mut().unwrap();
        assert_eq!(live.try_recv().unwrap().seq, 2);
        assert!(matches!(
            live.try_recv(),
            Err(broadcast::error::TryRecvError::Closed)
        ));
        // Ended: readable, no live part; expired after the retention.
        let sub = store.subscribe("a", true).unwrap();
        assert_eq!(sub.history.len(), 2);
        assert!(sub.live.is_none());
        assert!(store.expire(Duration::from_secs(60)).is_empty());
        assert_eq!(store.expire(Duration::ZERO), vec![uuid]);
        assert!(store.subscribe("a", false).is_none());
    }

    #[test]
    fn bounded_in_bytes() {
        let store = LiveStore::new(1000);
        store.begin(&"a".into());
        for seq in 0..100 {
            store.push(&[record("a", seq, "0123456789")]);
        }
        let sub = store.subscribe("a", false).unwrap();
        let kept: usize = sub.history.iter().map(|r| r.size()).sum();
        assert!(kept <= 1000, "{kept}");
        assert_eq!(sub.history.last().unwrap().seq, 99);
    }
}
