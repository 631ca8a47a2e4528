//! Rate limits on what clients send: a token bucket per WebSocket connection (held by
//! its session), and one per user for the client commands over plain HTTP, so that
//! either way a client gets the same `limits.messages_per_second` and
//! `limits.message_burst`. Pure bookkeeping: no I/O, no timers.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Instant;

/// Client frames per second with a burst allowance.
pub(crate) struct TokenBucket {
    rate: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl TokenBucket {
    pub(crate) fn new(rate: u32, burst: u32) -> TokenBucket {
        TokenBucket::new_at(rate, burst, Instant::now())
    }

    fn new_at(rate: u32, burst: u32, now: Instant) -> TokenBucket {
        TokenBucket {
            rate: rate as f64,
            burst: burst as f64,
            tokens: burst as f64,
            last: now,
        }
    }

    /// Whether it would hold its whole burst at `now`.
    fn is_full_at(&self, now: Instant) -> bool {
        self.tokens + now.saturating_duration_since(self.last).as_secs_f64() * self.rate
            >= self.burst
    }

    pub(crate) fn take(&mut self) -> bool {
        self.take_at(Instant::now())
    }

    fn take_at(&mut self, now: Instant) -> bool {
        self.tokens = (self.tokens
            + now.saturating_duration_since(self.last).as_secs_f64() * self.rate)
            .min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }
}

/// Token buckets by user, for requests that have no connection to hold one.
pub(crate) struct UserBuckets {
    rate: u32,
    burst: u32,
    buckets: Mutex<HashMap<Arc<str>, TokenBucket>>,
}

/// Users tracked before full buckets are forgotten (a full bucket is the same as none).
const PRUNE_AT: usize = 4096;

impl UserBuckets {
    pub(crate) fn new(rate: u32, burst: u32) -> UserBuckets {
        UserBuckets {
            rate,
            burst,
            buckets: Mutex::new(HashMap::new()),
        }
    }

    /// Takes a token of `user`'s bucket; false when it is empty.
    pub(crate) fn take(&self, user: &Arc<str>) -> bool {
        self.take_at(user, Instant::now())
    }

    fn take_at(&self, user: &Arc<str>, now: Instant) -> bool {
        let mut buckets = self.buckets.lock().expect("buckets lock");
        if buckets.len() >= PRUNE_AT && !buckets.contains_key(user) {
            buckets.retain(|_, b| !b.is_full_at(now));
        }
        let (rate, burst) = (self.rate, self.burst);
        buckets
            .entry(user.clone())
            .or_insert_with(|| TokenBucket::new_at(rate, burst, now))
            .take_at(now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn a_bucket_allows_its_burst_then_its_rate() {
        let t0 = Instant::now();
        let mut b = TokenBucket::new_at(2, 3, t0);
        assert!(b.take_at(t0) && b.take_at(t0) && b.take_at(t0));
        assert!(!b.take_at(t0));
        // Two tokens a second: one more after half a second, not before.
        assert!(!b.take_at(t0 + Duration::from_millis(400)));
        assert!(b.take_at(t0 + Duration::from_millis(500)));
        // Never more than the burst, however long it rested.
        let later = t0 + Duration::from_secs(3600);
        assert!((0..3).all(|_| b.take_at(later)));
        assert!(!b.take_at(later));
    }

    #[test]
    fn users_have_their_own_buckets_and_full_ones_are_forgotten() {
        let t0 = Instant::now();
        let users = UserBuckets::new(1, 2);
        let (a, b): (Arc<str>, Arc<str>) = ("a".into(), "b".into());
        assert!(users.take_at(&a, t0) && users.take_at(&a, t0));
        assert!(!users.take_at(&a, t0));
        assert!(users.take_at(&b, t0), "another user is not limited by a");
        for i in 0..PRUNE_AT {
            users.take_at(&Arc::from(format!("u{i}")), t0);
        }
        // Long after: every bucket is full again, and a new user prunes them.
        let later = t0 + Duration::from_secs(60);
        assert!(users.take_at(&Arc::from("new"), later));
        assert!(users.buckets.lock().unwrap().len() < 10);
    }
}
