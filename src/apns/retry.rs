//! When to send a notification again: exponential backoff with jitter,
//! bounded in attempts and in total time, so a struggling Apple is not
//! hammered and a notification does not linger for ever.

use std::time::Duration;

use crate::settings::ApnsSettings;

/// The longest single wait, however many attempts are allowed.
const MAX_DELAY: Duration = Duration::from_secs(30);

#[derive(Debug, Clone)]
pub(crate) struct RetryPolicy {
    attempts: u32,
    base: Duration,
    max_total: Duration,
}

impl RetryPolicy {
    pub fn new(settings: &ApnsSettings) -> Self {
        RetryPolicy {
            attempts: settings.retry_attempts.max(1),
            base: Duration::from_millis(settings.retry_base_ms),
            max_total: Duration::from_secs(settings.retry_max_secs),
        }
    }

    /// The wait before attempt `next` (2 is the first retry), `elapsed` after
    /// the first attempt began; `None` when no attempt is left or it would
    /// start after the total time allowed.
    pub fn delay(&self, next: u32, elapsed: Duration) -> Option<Duration> {
        if next < 2 || next > self.attempts {
            return None;
        }
        let full = self
            .base
            .saturating_mul(1 << (next - 2).min(16))
            .min(MAX_DELAY);
        // Half fixed, half random: spreads a burst of failures apart.
        let half = full / 2;
        let jitter = rand::random_range(0..=half.as_micros() as u64);
        let wait = half + Duration::from_micros(jitter);
        (elapsed + wait <= self.max_total).then_some(wait)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(attempts: u32, base_ms: u64, max_secs: u64) -> RetryPolicy {
        RetryPolicy::new(&ApnsSettings {
            retry_attempts: attempts,
            retry_base_ms: base_ms,
            retry_max_secs: max_secs,
            ..ApnsSettings::default()
        })
    }

    #[test]
    fn doubles_with_jitter_within_bounds() {
        let p = policy(5, 100, 60);
        for (next, full) in [(2, 100), (3, 200), (4, 400), (5, 800)] {
            let d = p.delay(next, Duration::ZERO).unwrap();
            let full = Duration::from_millis(full);
            assert!(d >= full / 2 && d <= full, "attempt {next}: {d:?}");
        }
        assert_eq!(p.delay(6, Duration::ZERO), None, "attempts are bounded");
        assert_eq!(p.delay(1, Duration::ZERO), None);
    }

    #[test]
    fn total_time_and_single_wait_are_bounded() {
        let p = policy(5, 100, 1);
        assert_eq!(p.delay(2, Duration::from_secs(1)), None);
        let p = policy(40, 1000, 3600);
        assert!(p.delay(30, Duration::ZERO).unwrap() <= MAX_DELAY);
    }
}
