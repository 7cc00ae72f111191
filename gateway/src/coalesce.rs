//! `Coalescer`: concurrent calls with equal keys share one execution. The
//! bootstrap client keys calls by the exact forwarded request (every header
//! sent, credentials included), so one user's tabs reconnecting together
//! make one backend call, and requests with different credentials never
//! share an answer.

use std::collections::HashMap;
use std::future::Future;
use std::hash::Hash;
use std::sync::Mutex;

use tokio::sync::watch;

/// Calls in flight, by key.
#[derive(Debug)]
pub struct Coalescer<K, V> {
    /// The leader's channel of each call in flight.
    calls: Mutex<HashMap<K, watch::Receiver<Option<V>>>>,
}

impl<K, V> Default for Coalescer<K, V> {
    fn default() -> Self {
        Coalescer { calls: Mutex::new(HashMap::new()) }
    }
}

/// Removes the leader's entry however its call ends.
struct Leading<'a, K: Hash + Eq, V> {
    /// Whose table.
    coalescer: &'a Coalescer<K, V>,
    /// The entry.
    key: Option<K>,
}

impl<K: Hash + Eq, V> Drop for Leading<'_, K, V> {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.coalescer.lock().remove(&key);
        }
    }
}

impl<K, V> Coalescer<K, V> {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<K, watch::Receiver<Option<V>>>> {
        // A poisoned lock only means a thread panicked while inserting.
        self.calls.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl<K: Hash + Eq + Clone, V: Clone> Coalescer<K, V> {
    /// Runs `call`, or waits for the call in flight with an equal `key` and
    /// returns its value; `true` when the value was shared. If the leading
    /// call is abandoned (its client left), the waiting ones run their own.
    pub async fn run(&self, key: K, call: impl Future<Output = V>) -> (V, bool) {
        let waiting = {
            let mut calls = self.lock();
            match calls.get(&key) {
                Some(rx) => Err(rx.clone()),
                None => {
                    let (tx, rx) = watch::channel(None);
                    calls.insert(key.clone(), rx);
                    Ok(tx)
                }
            }
        };
        match waiting {
            Ok(tx) => {
                let _leading = Leading { coalescer: self, key: Some(key) };
                let value = call.await;
                let _ = tx.send(Some(value.clone()));
                (value, false)
            }
            Err(mut rx) => {
                if let Ok(shared) = rx.wait_for(Option::is_some).await
                    && let Some(value) = shared.as_ref()
                {
                    return (value.clone(), true);
                }
                (call.await, false)
            }
        }
    }

    /// Whether a call with `key` is in flight.
    pub fn is_in_flight(&self, key: &K) -> bool {
        self.lock().contains_key(key)
    }

    /// Calls in flight now.
    pub fn in_flight(&self) -> usize {
        self.lock().len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[tokio::test(start_paused = true)]
    async fn equal_keys_share_one_call_different_keys_do_not() {
        let c = Arc::new(Coalescer::<&'static str, usize>::default());
        let calls = Arc::new(AtomicUsize::new(0));
        let call = |value: usize| {
            let calls = calls.clone();
            async move {
                calls.fetch_add(1, Ordering::SeqCst);
                tokio::time::sleep(Duration::from_millis(100)).await;
                value
            }
        };
        let (a, b, other) = tokio::join!(c.run("alice", call(1)), c.run("alice", call(2)), c.run("bob", call(3)));
        assert_eq!((a, b, other), ((1, false), (1, true), (3, false)));
        assert_eq!(calls.load(Ordering::SeqCst), 2);
        assert_eq!(c.in_flight(), 0);
        // Not concurrent: not shared.
        assert_eq!(c.run("alice", call(4)).await, (4, false));
    }

    #[tokio::test(start_paused = true)]
    async fn an_abandoned_leader_lets_the_others_call() {
        let c = Arc::new(Coalescer::<&'static str, usize>::default());
        let leader = tokio::spawn({
            let c = c.clone();
            async move { c.run("alice", std::future::pending::<usize>()).await }
        });
        tokio::task::yield_now().await;
        let follower = tokio::spawn({
            let c = c.clone();
            async move { c.run("alice", async { 7 }).await }
        });
        tokio::task::yield_now().await;
        leader.abort();
        assert_eq!(follower.await.expect("follower"), (7, false));
        assert_eq!(c.in_flight(), 0);
    }
}
