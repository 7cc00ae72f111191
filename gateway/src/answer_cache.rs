//! `AnswerCache`: bootstrap answers kept for a short time
//! (`backend.answerReuseSeconds`, off by default), so a reconnect storm of
//! users who connected moments ago costs the backend nothing.
//!
//! Keyed by the exact forwarded request (every header, credentials
//! included), like coalescing: an answer is only ever given to a request
//! the backend would have answered the same way. Bounded in entries and
//! bytes; the oldest entry goes first (the TTL is one for all, so the
//! oldest is also the first to expire). Only connects read it; refreshes
//! always call the backend, and a control message empties it. Time comes
//! in as arguments.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// One kept answer.
struct Entry<V> {
    /// The answer.
    value: V,
    /// Given out until then.
    expires: Instant,
    /// What it counts against the byte budget.
    bytes: usize,
}

/// Answers by request, oldest first.
pub struct AnswerCache<K, V> {
    /// How long an answer is given out.
    ttl: Duration,
    /// Most entries.
    max_entries: usize,
    /// Most bytes (as the caller counts them).
    max_bytes: usize,
    /// Entries by key.
    entries: HashMap<Arc<K>, Entry<V>>,
    /// Keys, oldest first.
    order: VecDeque<Arc<K>>,
    /// Bytes held now.
    bytes: usize,
}

impl<K: Hash + Eq, V: Clone> AnswerCache<K, V> {
    /// An empty cache.
    pub fn new(ttl: Duration, max_entries: usize, max_bytes: usize) -> AnswerCache<K, V> {
        AnswerCache { ttl, max_entries, max_bytes, entries: HashMap::new(), order: VecDeque::new(), bytes: 0 }
    }

    /// The answer kept for `key`, if it has not expired at `now`.
    pub fn get(&mut self, key: &K, now: Instant) -> Option<V> {
        self.expire(now);
        self.entries.get(key).map(|entry| entry.value.clone())
    }

    /// Whether an answer for `key` is kept at `now`.
    pub fn contains(&mut self, key: &K, now: Instant) -> bool {
        self.expire(now);
        self.entries.contains_key(key)
    }

    /// Keeps `value` for `key` from `now`; `bytes` is what it holds. An
    /// answer larger than a quarter of the budget is not kept.
    pub fn insert(&mut self, key: K, value: V, bytes: usize, now: Instant) {
        self.expire(now);
        if self.max_entries == 0 || bytes > self.max_bytes / 4 {
            return;
        }
        let key = Arc::new(key);
        if let Some(old) = self.entries.remove(&key) {
            self.bytes -= old.bytes;
            self.order.retain(|k| k != &key);
        }
        while self.entries.len() >= self.max_entries || self.bytes + bytes > self.max_bytes {
            if !self.evict_oldest() {
                break;
            }
        }
        self.bytes += bytes;
        self.entries.insert(key.clone(), Entry { value, expires: now + self.ttl, bytes });
        self.order.push_back(key);
    }

    /// Forgets every answer.
    pub fn clear(&mut self) {
        self.entries.clear();
        self.order.clear();
        self.bytes = 0;
    }

    /// Entries kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    fn expire(&mut self, now: Instant) {
        while let Some(oldest) = self.order.front() {
            match self.entries.get(oldest) {
                Some(entry) if entry.expires > now => break,
                _ => {
                    self.evict_oldest();
                }
            }
        }
    }

    fn evict_oldest(&mut self) -> bool {
        let Some(oldest) = self.order.pop_front() else { return false };
        if let Some(entry) = self.entries.remove(&oldest) {
            self.bytes -= entry.bytes;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_expire_after_the_ttl() {
        let t0 = Instant::now();
        let mut cache = AnswerCache::new(Duration::from_secs(2), 10, 1000);
        cache.insert("alice", 1, 10, t0);
        assert_eq!(cache.get(&"alice", t0 + Duration::from_millis(1999)), Some(1));
        assert_eq!(cache.get(&"bob", t0), None, "another request never gets it");
        assert_eq!(cache.get(&"alice", t0 + Duration::from_secs(2)), None);
        assert_eq!((cache.len(), cache.bytes()), (0, 0));
    }

    #[test]
    fn bounded_in_entries_and_bytes_oldest_first() {
        let t0 = Instant::now();
        let mut cache = AnswerCache::new(Duration::from_secs(60), 3, 100);
        for (i, key) in ["a", "b", "c", "d"].into_iter().enumerate() {
            cache.insert(key, i, 10, t0 + Duration::from_millis(i as u64));
        }
        assert_eq!(cache.len(), 3);
        assert!(!cache.contains(&"a", t0), "the oldest went first");
        assert!(cache.contains(&"d", t0));
        // 25 bytes is a quarter of the budget: kept; the budget evicts.
        cache.insert("e", 9, 25, t0);
        cache.insert("f", 9, 25, t0);
        cache.insert("g", 9, 25, t0);
        assert!(cache.bytes() <= 100, "{}", cache.bytes());
        assert!(cache.contains(&"g", t0) && !cache.contains(&"b", t0));
        // Larger than a quarter: not kept at all.
        cache.insert("huge", 1, 26, t0);
        assert!(!cache.contains(&"huge", t0));
        // Replacing an entry does not count it twice.
        let before = cache.bytes();
        cache.insert("g", 10, 25, t0);
        assert_eq!((cache.bytes(), cache.get(&"g", t0)), (before, Some(10)));
        cache.clear();
        assert!(cache.is_empty() && cache.bytes() == 0);
    }

    #[test]
    fn zero_entries_keeps_nothing() {
        let mut cache = AnswerCache::new(Duration::from_secs(60), 0, 100);
        cache.insert("a", 1, 1, Instant::now());
        assert!(cache.is_empty());
    }
}
