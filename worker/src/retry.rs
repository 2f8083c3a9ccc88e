//! Retry back-off: exponential with jitter.
//!
//! "Equal jitter": the delay for attempt `n` is drawn from `[d/2, d]` with
//! `d = min(max, base * 2^(n-1))`. Half is random so a burst of failures spreads out;
//! half is fixed so delays never shrink from one attempt to the next.

use std::time::Duration;

use rand::Rng;

/// Back-off settings.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Backoff {
    /// Delay ceiling for the first retry.
    pub base: Duration,
    /// Largest delay.
    pub max: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Self {
            base: Duration::from_secs(1),
            max: Duration::from_secs(3600),
        }
    }
}

impl Backoff {
    /// The un-jittered ceiling after failed attempt `attempt` (1-based).
    pub fn ceiling(&self, attempt: i32) -> Duration {
        let exp = attempt.saturating_sub(1).clamp(0, 30) as u32;
        self.base.saturating_mul(1u32 << exp).min(self.max)
    }

    /// The delay before retrying after failed attempt `attempt`.
    pub fn delay(&self, attempt: i32) -> Duration {
        let d = self.ceiling(attempt);
        let half = d / 2;
        let jitter_ms = rand::rng().random_range(0..=half.as_millis().max(1) as u64);
        (half + Duration::from_millis(jitter_ms)).min(d.max(Duration::from_millis(1)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_and_caps() {
        let b = Backoff {
            base: Duration::from_secs(1),
            max: Duration::from_secs(10),
        };
        assert_eq!(b.ceiling(1), Duration::from_secs(1));
        assert_eq!(b.ceiling(3), Duration::from_secs(4));
        assert_eq!(b.ceiling(10), Duration::from_secs(10));
        assert_eq!(b.ceiling(1000), Duration::from_secs(10));
        for attempt in 1..8 {
            for _ in 0..50 {
                let d = b.delay(attempt);
                assert!(
                    d >= b.ceiling(attempt) / 2 && d <= b.ceiling(attempt),
                    "{attempt}: {d:?}"
                );
                // Never shorter than any possible delay of the previous attempt.
                assert!(d >= b.ceiling(attempt - 1).min(b.ceiling(attempt) / 2));
            }
        }
    }
}
