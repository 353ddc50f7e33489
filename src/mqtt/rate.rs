//! Token bucket for new connections, so a reconnect storm (or a flood) is
//! admitted at a steady pace instead of all handshakes at once.

use std::time::Duration;

use tokio::time::Instant;

pub(super) struct Bucket {
    per_sec: f64,
    burst: f64,
    tokens: f64,
    last: Instant,
}

impl Bucket {
    pub(super) fn new(per_sec: u32, burst: u32, now: Instant) -> Bucket {
        Bucket {
            per_sec: f64::from(per_sec.max(1)),
            burst: f64::from(burst.max(1)),
            tokens: f64::from(burst.max(1)),
            last: now,
        }
    }

    /// Takes a token, or says how long until one is there (nothing taken).
    pub(super) fn take(&mut self, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.per_sec).min(self.burst);
        self.last = now;
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            return None;
        }
        Some(Duration::from_secs_f64((1.0 - self.tokens) / self.per_sec))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn burst_then_rate() {
        let t0 = Instant::now();
        let mut b = Bucket::new(10, 3, t0);
        assert_eq!((b.take(t0), b.take(t0), b.take(t0)), (None, None, None));
        let wait = b.take(t0).expect("bucket empty");
        assert!(wait > Duration::ZERO && wait <= Duration::from_millis(100));
        assert_eq!(b.take(t0 + Duration::from_millis(100)), None);
        assert!(b.take(t0 + Duration::from_millis(100)).is_some());
        // A long pause refills only up to the burst.
        let later = t0 + Duration::from_secs(60);
        assert_eq!(
            (b.take(later), b.take(later), b.take(later)),
            (None, None, None)
        );
        assert!(b.take(later).is_some());
    }
}
