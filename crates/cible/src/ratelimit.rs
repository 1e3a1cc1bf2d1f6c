//! Rate limits per API key: a token bucket per key holding `rate_limit` requests, refilled at
//! `rate_limit` a second (a burst of one second's worth, then a steady rate). A request over
//! the limit is answered 429 with `Retry-After`, the whole seconds until a token is back.
//!
//! Locking: the buckets' mutex is a leaf, held for arithmetic only; nothing is called and no
//! other lock is taken while it is held.

use std::time::{Duration, Instant};

use parking_lot::Mutex;
use rustc_hash::FxHashMap;

#[derive(Default)]
pub(crate) struct KeyLimiter {
    buckets: Mutex<FxHashMap<String, Bucket>>,
}

struct Bucket {
    tokens: f64,
    at: Instant,
}

impl KeyLimiter {
    /// Takes one token of `key`'s bucket, or tells how long until one is back.
    pub(crate) fn take(&self, key: &str, rate: u32, now: Instant) -> Result<(), Duration> {
        let rate = f64::from(rate.max(1));
        let mut buckets = self.buckets.lock();
        // A key's first request makes its bucket; the others find it without allocating.
        if !buckets.contains_key(key) {
            buckets.insert(
                key.to_string(),
                Bucket {
                    tokens: rate,
                    at: now,
                },
            );
        }
        let bucket = buckets.get_mut(key).expect("inserted above");
        let elapsed = now.saturating_duration_since(bucket.at).as_secs_f64();
        bucket.tokens = (bucket.tokens + elapsed * rate).min(rate);
        bucket.at = now;
        if bucket.tokens >= 1.0 {
            bucket.tokens -= 1.0;
            Ok(())
        } else {
            Err(Duration::from_secs_f64((1.0 - bucket.tokens) / rate))
        }
    }
}

/// `Retry-After` for a wait: whole seconds, at least one.
pub(crate) fn retry_after_secs(wait: Duration) -> u64 {
    wait.as_secs() + u64::from(wait.subsec_nanos() > 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_bucket_allows_its_rate_then_refills_at_it() {
        let limiter = KeyLimiter::default();
        let start = Instant::now();
        for _ in 0..3 {
            assert!(limiter.take("k", 3, start).is_ok());
        }
        let wait = limiter.take("k", 3, start).unwrap_err();
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(334));
        assert_eq!(retry_after_secs(wait), 1);
        // Another key has its own bucket.
        assert!(limiter.take("other", 3, start).is_ok());
        // A third of a second later, one token is back, not more.
        let later = start + Duration::from_millis(340);
        assert!(limiter.take("k", 3, later).is_ok());
        assert!(limiter.take("k", 3, later).is_err());
        // A long pause refills to the burst, never beyond.
        let much_later = start + Duration::from_secs(60);
        for _ in 0..3 {
            assert!(limiter.take("k", 3, much_later).is_ok());
        }
        assert!(limiter.take("k", 3, much_later).is_err());
    }

    #[test]
    fn many_threads_together_take_no_more_than_the_burst() {
        let limiter = std::sync::Arc::new(KeyLimiter::default());
        let now = Instant::now();
        let (done, finished) = std::sync::mpsc::channel();
        for _ in 0..8 {
            let limiter = std::sync::Arc::clone(&limiter);
            let done = done.clone();
            std::thread::spawn(move || {
                let taken = (0..100)
                    .filter(|_| limiter.take("shared", 50, now).is_ok())
                    .count();
                done.send(taken).unwrap();
            });
        }
        let total: usize = (0..8)
            .map(|_| {
                finished
                    .recv_timeout(Duration::from_secs(10))
                    .expect("no hang")
            })
            .sum();
        assert_eq!(total, 50);
    }
}
