//! A bounded, in-memory record per key (an instance), with live follow: what the events API
//! and the logs API serve. Each key keeps its newest items up to a cost (a count, or bytes);
//! a key that ended stays readable for a retention, then goes; past a number of keys, the
//! ones that ended longest ago go first.
//!
//! History and a live subscription are taken under one lock, so a follower sees every item
//! exactly once: the history up to now, then each later item. A key's live channel exists only
//! while someone follows it, so an instance nobody follows costs no channel.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use tokio::sync::{Notify, broadcast};

/// What an item costs against its key's bound.
pub(crate) trait Cost {
    fn cost(&self) -> usize;
}

/// Bounds of a [`Journal`].
#[derive(Debug, Clone, Copy)]
pub(crate) struct Limits {
    /// Cost kept per key (oldest items leave first).
    pub(crate) per_key: usize,
    /// Cost kept over all keys together; past it, the items of keys that ended (longest ago
    /// first) leave, then the oldest items of the largest keys.
    pub(crate) total: usize,
    /// Keys kept; past it, those that ended longest ago go.
    pub(crate) keys: usize,
    /// How long an ended key stays readable; `None`: until [`Journal::remove`].
    pub(crate) retention: Option<Duration>,
    /// Items a follower may fall behind before it skips (and is told how many).
    pub(crate) follow_backlog: usize,
}

#[derive(Debug)]
struct Log<T> {
    items: VecDeque<Arc<T>>,
    cost: usize,
    running: bool,
    /// Present while someone follows this key and it runs.
    live: Option<broadcast::Sender<Arc<T>>>,
    ended: Option<Instant>,
}

impl<T> Log<T> {
    fn new() -> Self {
        Self {
            items: VecDeque::new(),
            cost: 0,
            running: true,
            live: None,
            ended: None,
        }
    }
}

#[derive(Debug)]
struct Inner<K, T> {
    logs: HashMap<K, Log<T>>,
    /// Cost of every key's items.
    cost: usize,
    /// Followers of every key, when the journal has a global feed.
    global: Option<broadcast::Sender<Arc<T>>>,
}

#[derive(Debug)]
pub(crate) struct Journal<K, T> {
    limits: Limits,
    inner: Mutex<Inner<K, T>>,
    /// Woken when a key begins (readers waiting for a key that is about to exist).
    begun: Notify,
}

/// What a reader of one key gets: the items kept so far and, if the key runs and the reader
/// follows, the later ones.
#[derive(Debug)]
pub(crate) struct Subscription<T> {
    pub(crate) history: Vec<Arc<T>>,
    pub(crate) live: Option<broadcast::Receiver<Arc<T>>>,
}

impl<K: Eq + Hash + Clone + Ord, T: Cost> Journal<K, T> {
    /// A journal; with `global_feed`, [`Self::follow_all`] streams every key's new items.
    pub(crate) fn new(limits: Limits, global_feed: bool) -> Self {
        Self {
            limits,
            inner: Mutex::new(Inner {
                logs: HashMap::new(),
                cost: 0,
                global: global_feed.then(|| broadcast::channel(limits.follow_backlog).0),
            }),
            begun: Notify::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner<K, T>> {
        self.inner.lock().expect("journal lock")
    }

    /// `key` runs (again, if it ran before): readable, followable.
    pub(crate) fn begin(&self, key: &K) {
        let mut inner = self.lock();
        let log = inner.logs.entry(key.clone()).or_insert_with(Log::new);
        log.running = true;
        log.ended = None;
        drop(inner);
        self.begun.notify_waiters();
    }

    /// Appends `items` to `key`, creating it when `create` (else items of a key not begun are
    /// ignored), and hands them to followers.
    pub(crate) fn push(&self, key: &K, items: &[Arc<T>], create: bool) {
        let mut guard = self.lock();
        let inner = &mut *guard;
        let log = if create {
            Some(inner.logs.entry(key.clone()).or_insert_with(Log::new))
        } else {
            inner.logs.get_mut(key)
        };
        let Some(log) = log else {
            return;
        };
        if log.live.as_ref().is_some_and(|l| l.receiver_count() == 0) {
            log.live = None;
        }
        let before = log.cost;
        for item in items {
            log.cost += item.cost();
            log.items.push_back(item.clone());
            if let Some(live) = &log.live {
                // A follower that left meanwhile is not an error.
                let _ = live.send(item.clone());
            }
            if let Some(global) = &inner.global {
                let _ = global.send(item.clone());
            }
        }
        while log.cost > self.limits.per_key {
            let Some(old) = log.items.pop_front() else {
                break;
            };
            log.cost -= old.cost();
        }
        inner.cost = inner.cost + log.cost - before;
        if inner.cost > self.limits.total {
            self.make_room(inner);
        }
        if create {
            self.trim(inner);
        }
    }

    /// Brings the total cost to 15/16 of its bound (so that this runs once per many pushes):
    /// keys that ended give way first, longest ago first; then the largest keys, oldest items
    /// first, so each running key keeps its share.
    fn make_room(&self, inner: &mut Inner<K, T>) {
        let goal = self.limits.total - self.limits.total / 16;
        while inner.cost > goal {
            let ended = inner
                .logs
                .iter()
                .filter(|(_, log)| log.ended.is_some() && log.cost > 0)
                .min_by_key(|(_, log)| log.ended)
                .map(|(key, _)| key.clone());
            let victim = ended.or_else(|| {
                inner
                    .logs
                    .iter()
                    .max_by_key(|(_, log)| log.cost)
                    .map(|(key, _)| key.clone())
            });
            let Some(log) = victim.and_then(|key| inner.logs.get_mut(&key)) else {
                break;
            };
            // The largest gives way down to the next size step, not all at once.
            let keep = if log.ended.is_some() { 0 } else { log.cost / 2 };
            while log.cost > keep && inner.cost > goal {
                let Some(old) = log.items.pop_front() else {
                    break;
                };
                log.cost -= old.cost();
                inner.cost -= old.cost();
            }
            if log.items.is_empty() && log.cost > 0 {
                inner.cost -= log.cost;
                log.cost = 0;
            }
        }
    }

    /// Drops ended keys past the retention, then, past the key bound, those that ended
    /// longest ago.
    fn trim(&self, inner: &mut Inner<K, T>) {
        if let Some(retention) = self.limits.retention {
            let mut freed = 0;
            inner.logs.retain(|_, log| {
                let keep = log.ended.is_none_or(|t| t.elapsed() < retention);
                if !keep {
                    freed += log.cost;
                }
                keep
            });
            inner.cost -= freed;
        }
        while inner.logs.len() > self.limits.keys {
            let oldest = inner
                .logs
                .iter()
                .filter_map(|(key, log)| Some((log.ended?, key.clone())))
                .min();
            let Some((_, key)) = oldest else { break };
            if let Some(log) = inner.logs.remove(&key) {
                inner.cost -= log.cost;
            }
        }
    }

    /// `key` ended: its followers see the end; its retention starts.
    pub(crate) fn end(&self, key: &K) {
        if let Some(log) = self.lock().logs.get_mut(key) {
            log.running = false;
            log.live = None;
            log.ended = Some(Instant::now());
        }
    }

    /// `key` ended `ago` (read back after a restart): as [`Self::end`], its retention counted
    /// from then.
    pub(crate) fn end_since(&self, key: &K, ago: Duration) {
        if let Some(log) = self.lock().logs.get_mut(key) {
            log.running = false;
            log.live = None;
            let now = Instant::now();
            log.ended = Some(now.checked_sub(ago).unwrap_or(now));
        }
    }

    /// Forgets `key`.
    pub(crate) fn remove(&self, key: &K) {
        let mut inner = self.lock();
        if let Some(log) = inner.logs.remove(key) {
            inner.cost -= log.cost;
        }
    }

    /// Cost of every key's items together.
    #[cfg(test)]
    pub(crate) fn cost(&self) -> usize {
        self.lock().cost
    }

    /// The items of `key` and, when `follow` and the key runs, a subscription to the later
    /// ones; `None` when the journal knows no such key.
    pub(crate) fn subscribe(&self, key: &K, follow: bool) -> Option<Subscription<T>> {
        let mut inner = self.lock();
        let backlog = self.limits.follow_backlog;
        let log = inner.logs.get_mut(key)?;
        let live = (follow && log.running).then(|| {
            log.live
                .get_or_insert_with(|| broadcast::channel(backlog).0)
                .subscribe()
        });
        Some(Subscription {
            history: log.items.iter().cloned().collect(),
            live,
        })
    }

    /// [`Self::subscribe`], waiting up to `wait` for the key to begin if it does not exist yet
    /// (a reader that learnt of an instance a moment before the journal did).
    pub(crate) async fn subscribe_soon(
        &self,
        key: &K,
        follow: bool,
        wait: Duration,
    ) -> Option<Subscription<T>> {
        let deadline = tokio::time::Instant::now() + wait;
        loop {
            let begun = self.begun.notified();
            if let Some(subscription) = self.subscribe(key, follow) {
                return Some(subscription);
            }
            if tokio::time::timeout_at(deadline, begun).await.is_err() {
                return self.subscribe(key, follow);
            }
        }
    }

    /// Items of every key (or of `key` only), ordered by `order`, and a receiver of every later
    /// item (`None` without a global feed), taken together.
    pub(crate) fn follow_all<O: Ord>(
        &self,
        key: Option<&K>,
        order: impl Fn(&T) -> O,
    ) -> (Vec<Arc<T>>, Option<broadcast::Receiver<Arc<T>>>) {
        let inner = self.lock();
        let receiver = inner.global.as_ref().map(broadcast::Sender::subscribe);
        let mut items: Vec<Arc<T>> = inner
            .logs
            .iter()
            .filter(|(k, _)| key.is_none_or(|want| want == *k))
            .flat_map(|(_, log)| log.items.iter().cloned())
            .collect();
        items.sort_by_key(|item| order(item));
        (items, receiver)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::sync::broadcast::error::TryRecvError;

    #[derive(Debug, PartialEq)]
    struct Item(u64, usize);

    impl Cost for Item {
        fn cost(&self) -> usize {
            self.1
        }
    }

    fn limits(per_key: usize, keys: usize) -> Limits {
        Limits {
            per_key,
            total: usize::MAX,
            keys,
            retention: None,
            follow_backlog: 16,
        }
    }

    fn items(range: std::ops::Range<u64>) -> Vec<Arc<Item>> {
        range.map(|n| Arc::new(Item(n, 10))).collect()
    }

    #[test]
    fn history_then_live_then_end() {
        let journal: Journal<String, Item> = Journal::new(limits(1 << 20, 10), false);
        let a = "a".to_owned();
        assert!(journal.subscribe(&a, true).is_none());
        journal.push(&a, &items(0..1), false);
        assert!(journal.subscribe(&a, true).is_none(), "not begun: ignored");
        journal.begin(&a);
        journal.push(&a, &items(1..2), false);
        let mut sub = journal.subscribe(&a, true).unwrap();
        assert_eq!(sub.history.len(), 1);
        journal.push(&a, &items(2..3), false);
        journal.end(&a);
        let live = sub.live.as_mut().unwrap();
        assert_eq!(live.try_recv().unwrap().0, 2);
        assert!(matches!(live.try_recv(), Err(TryRecvError::Closed)));
        let sub = journal.subscribe(&a, true).unwrap();
        assert_eq!(sub.history.len(), 2);
        assert!(sub.live.is_none(), "ended: nothing to follow");
        journal.remove(&a);
        assert!(journal.subscribe(&a, false).is_none());
    }

    #[test]
    fn bounded_per_key_and_in_keys() {
        let journal: Journal<String, Item> = Journal::new(limits(100, 2), true);
        for key in ["a", "b"] {
            journal.push(&key.to_owned(), &items(0..20), true);
        }
        let kept = journal.subscribe(&"a".to_owned(), false).unwrap().history;
        assert_eq!(kept.len(), 10);
        assert_eq!(kept.last().unwrap().0, 19);
        // A third key: the one that ended goes, a running one stays.
        journal.end(&"a".to_owned());
        journal.push(&"c".to_owned(), &items(0..1), true);
        assert!(journal.subscribe(&"a".to_owned(), false).is_none());
        assert!(journal.subscribe(&"b".to_owned(), false).is_some());
        let (all, feed) = journal.follow_all(None, |i| i.0);
        assert_eq!(all.len(), 11);
        assert!(feed.is_some());
    }

    #[test]
    fn total_bound_ended_first_then_the_largest() {
        let journal: Journal<String, Item> = Journal::new(
            Limits {
                total: 1000,
                ..limits(1 << 20, 10)
            },
            false,
        );
        let key = |k: &str| k.to_owned();
        journal.push(&key("ended"), &items(0..30), true);
        journal.end(&key("ended"));
        journal.push(&key("big"), &items(0..60), true);
        journal.push(&key("small"), &items(0..5), true);
        // 950 so far; 70 more: the ended key gives way first.
        journal.push(&key("small"), &items(5..12), true);
        let len = |k: &str| {
            journal
                .subscribe(&key(k), false)
                .map_or(0, |s| s.history.len())
        };
        // Down to 15/16 of the bound (938): 9 of the ended key's items go, no other.
        assert_eq!(len("ended"), 21);
        assert_eq!((len("big"), len("small")), (60, 12));
        // Over again: the largest gives way, its oldest first; the small one keeps its lines.
        journal.push(&key("small"), &items(12..50), true);
        assert!(journal.cost() <= 1000, "{}", journal.cost());
        assert_eq!(len("small"), 50);
        let big = journal.subscribe(&key("big"), false).unwrap().history;
        assert_eq!(big.last().unwrap().0, 59);
        assert!(big.len() < 60);
    }

    #[test]
    fn retention_of_a_key_ended_before() {
        let journal: Journal<String, Item> = Journal::new(
            Limits {
                retention: Some(Duration::from_secs(60)),
                ..limits(1000, 10)
            },
            false,
        );
        let (old, recent) = ("old".to_owned(), "recent".to_owned());
        journal.push(&old, &items(0..1), true);
        journal.end_since(&old, Duration::from_secs(61));
        journal.push(&recent, &items(0..1), true);
        journal.end_since(&recent, Duration::from_secs(1));
        journal.push(&"c".to_owned(), &items(0..1), true);
        assert!(
            journal.subscribe(&old, false).is_none(),
            "past its retention"
        );
        assert!(journal.subscribe(&recent, false).is_some());
    }

    #[test]
    fn no_channel_without_a_follower() {
        let journal: Journal<String, Item> = Journal::new(limits(1000, 2), false);
        let a = "a".to_owned();
        journal.begin(&a);
        journal.push(&a, &items(0..3), false);
        assert!(journal.lock().logs[&a].live.is_none());
        let sub = journal.subscribe(&a, true).unwrap();
        drop(sub);
        journal.push(&a, &items(3..4), false);
        assert!(
            journal.lock().logs[&a].live.is_none(),
            "dropped with its last follower"
        );
    }

    #[tokio::test]
    async fn waits_for_a_key_about_to_begin() {
        let journal: Arc<Journal<String, Item>> = Arc::new(Journal::new(limits(1000, 2), false));
        let a = "a".to_owned();
        let later = journal.clone();
        tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis(20)).await;
            later.begin(&"a".to_owned());
        });
        assert!(
            journal
                .subscribe_soon(&a, true, Duration::from_secs(5))
                .await
                .is_some()
        );
        let b = "b".to_owned();
        assert!(
            journal
                .subscribe_soon(&b, true, Duration::from_millis(10))
                .await
                .is_none()
        );
    }
}
