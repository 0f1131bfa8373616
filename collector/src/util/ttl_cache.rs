//! A small cache whose entries live a fixed time and whose size is bounded: past the bound the
//! oldest entry leaves first. Every entry has the same time to live, so insertion order is
//! expiry order and both evictions take the front of one queue.

use std::{
    collections::{HashMap, VecDeque},
    hash::Hash,
    time::{Duration, Instant},
};

#[derive(Debug)]
pub(crate) struct TtlCache<K, V> {
    ttl: Duration,
    capacity: usize,
    entries: HashMap<K, (Instant, V)>,
    /// Keys in insertion order with the instant they were inserted at (a key inserted again
    /// leaves a stale pair behind, skipped when it reaches the front).
    order: VecDeque<(K, Instant)>,
}

impl<K: Eq + Hash + Clone, V: Clone> TtlCache<K, V> {
    /// A cache of at most `capacity` (at least 1) entries, each kept `ttl`.
    pub(crate) fn new(ttl: Duration, capacity: usize) -> Self {
        Self {
            ttl,
            capacity: capacity.max(1),
            entries: HashMap::new(),
            order: VecDeque::new(),
        }
    }

    /// The value of `key`, if inserted less than the time to live before `now`.
    pub(crate) fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        let (inserted, value) = self.entries.get(key)?;
        if now.duration_since(*inserted) < self.ttl {
            Some(value.clone())
        } else {
            self.entries.remove(key);
            None
        }
    }

    pub(crate) fn insert(&mut self, key: K, value: V, now: Instant) {
        self.evict_expired(now);
        if !self.entries.contains_key(&key) {
            while self.entries.len() >= self.capacity {
                self.pop_front();
            }
        }
        self.entries.insert(key.clone(), (now, value));
        self.order.push_back((key, now));
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.entries.len()
    }

    fn evict_expired(&mut self, now: Instant) {
        while let Some((_, inserted)) = self.order.front() {
            if now.duration_since(*inserted) < self.ttl {
                break;
            }
            self.pop_front();
        }
    }

    /// Drops the front of the queue, and its entry unless the key was inserted again since.
    fn pop_front(&mut self) {
        if let Some((key, inserted)) = self.order.pop_front()
            && self
                .entries
                .get(&key)
                .is_some_and(|(at, _)| *at == inserted)
        {
            self.entries.remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entries_expire_and_the_oldest_leave_first() {
        let t0 = Instant::now();
        let s = Duration::from_secs;
        let mut cache = TtlCache::new(s(10), 2);
        cache.insert("a", 1, t0);
        cache.insert("b", 2, t0 + s(1));
        assert_eq!(cache.get(&"a", t0 + s(9)), Some(1));
        assert_eq!(cache.get(&"a", t0 + s(10)), None, "expired");
        cache.insert("a", 3, t0 + s(10));
        cache.insert("c", 4, t0 + s(10));
        assert_eq!(cache.len(), 2, "b expired at 11? no: the bound took it");
        assert_eq!(cache.get(&"b", t0 + s(10)), None);
        assert_eq!(cache.get(&"a", t0 + s(10)), Some(3));
        // Inserting a key again refreshes it; its old place in the queue does not evict it.
        cache.insert("a", 5, t0 + s(15));
        cache.insert("d", 6, t0 + s(16));
        assert_eq!(cache.get(&"a", t0 + s(16)), Some(5));
        assert_eq!(cache.get(&"c", t0 + s(16)), None, "the oldest left for d");
        assert!(cache.order.len() <= 3);
    }
}
