//! Tunables of delivery (queue size, backoff) and the backoff schedule.

use std::time::Duration;

/// How hooks queue and retry. [`Default`] suits production; tests shorten the
/// backoff.
#[derive(Debug, Clone, PartialEq)]
pub struct HookOptions {
    /// Events waiting per sink; when a sink's queue is full, new events for it
    /// are dropped (and logged) so that `emit` never waits.
    pub queue_capacity: usize,
    /// Delay before the first retry; it doubles with each further retry.
    pub backoff_base: Duration,
    /// Longest delay between two attempts (also caps a server's `Retry-After`).
    pub backoff_cap: Duration,
    /// Field path of the hook list in error messages: `hooks` in a job spec,
    /// the serve config's own path there.
    pub field_prefix: String,
}

impl Default for HookOptions {
    fn default() -> HookOptions {
        HookOptions {
            queue_capacity: 1024,
            backoff_base: Duration::from_millis(500),
            backoff_cap: Duration::from_secs(60),
            field_prefix: "hooks".to_string(),
        }
    }
}

impl HookOptions {
    /// The delay before retry number `retry` (0 for the first retry):
    /// `min(cap, base * 2^retry)`, then "equal jitter": a uniformly random
    /// point in its upper half, so that many processes that failed together do
    /// not retry together, while the delay still grows.
    pub(crate) fn backoff(&self, retry: u32) -> Duration {
        let exponential = self
            .backoff_base
            .saturating_mul(1u32 << retry.min(31))
            .min(self.backoff_cap);
        let half = exponential / 2;
        let jitter_nanos =
            fastrand::u64(0..=(exponential - half).as_nanos().min(u64::MAX as u128) as u64);
        half + Duration::from_nanos(jitter_nanos)
    }

    /// The delay before retry `retry` when the receiver asked for at least
    /// `retry_after`: the larger of the two, within the cap.
    pub(crate) fn delay(&self, retry: u32, retry_after: Option<Duration>) -> Duration {
        let backoff = self.backoff(retry);
        match retry_after {
            Some(asked) => backoff.max(asked.min(self.backoff_cap)),
            None => backoff,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_within_jitter_and_stops_at_the_cap() {
        let options = HookOptions {
            backoff_base: Duration::from_millis(100),
            backoff_cap: Duration::from_secs(1),
            ..HookOptions::default()
        };
        for _ in 0..200 {
            for (retry, full_ms) in [
                (0, 100),
                (1, 200),
                (2, 400),
                (3, 800),
                (4, 1000),
                (40, 1000),
            ] {
                let delay = options.backoff(retry);
                let full = Duration::from_millis(full_ms);
                assert!(
                    delay >= full / 2 && delay <= full,
                    "retry {retry}: {delay:?}"
                );
            }
        }
        // Jitter: 200 draws of the first delay are not all the same.
        let draws: std::collections::HashSet<Duration> =
            (0..200).map(|_| options.backoff(0)).collect();
        assert!(draws.len() > 1);
    }

    #[test]
    fn retry_after_raises_the_delay_up_to_the_cap() {
        let options = HookOptions {
            backoff_base: Duration::from_millis(10),
            backoff_cap: Duration::from_secs(2),
            ..HookOptions::default()
        };
        assert_eq!(
            options.delay(0, Some(Duration::from_secs(1))),
            Duration::from_secs(1)
        );
        assert_eq!(
            options.delay(0, Some(Duration::from_secs(3600))),
            Duration::from_secs(2)
        );
        assert!(options.delay(0, None) <= Duration::from_millis(10));
    }

    #[test]
    fn zero_base_means_immediate_retries() {
        let options = HookOptions {
            backoff_base: Duration::ZERO,
            ..HookOptions::default()
        };
        assert_eq!(options.backoff(3), Duration::ZERO);
    }
}
