//! Caps per-notification log lines, so an APNs outage cannot flood the log
//! (a 9-minute soak against a dead APNs wrote a million warnings).

use std::sync::Mutex;
use std::time::{Duration, Instant};

/// At most `per_window` lines a window; the rest are counted and reported by
/// the next line that gets through.
pub(super) struct LogBudget {
    per_window: u32,
    window: Duration,
    state: Mutex<State>,
}

struct State {
    start: Instant,
    used: u32,
    skipped: u64,
}

impl LogBudget {
    pub fn new(per_window: u32, window: Duration) -> Self {
        Self {
            per_window,
            window,
            state: Mutex::new(State {
                start: Instant::now(),
                used: 0,
                skipped: 0,
            }),
        }
    }

    /// `Some(lines skipped since the last one logged)` if this line may be
    /// logged at `now`; `None` if it must be dropped (it is counted).
    pub fn take(&self, now: Instant) -> Option<u64> {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        if now.duration_since(s.start) >= self.window {
            s.start = now;
            s.used = 0;
        }
        if s.used >= self.per_window {
            s.skipped += 1;
            return None;
        }
        s.used += 1;
        Some(std::mem::take(&mut s.skipped))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn caps_a_window_and_reports_what_it_dropped() {
        let budget = LogBudget::new(2, Duration::from_secs(1));
        let t0 = Instant::now();
        assert_eq!(budget.take(t0), Some(0));
        assert_eq!(budget.take(t0), Some(0));
        assert_eq!(budget.take(t0), None);
        assert_eq!(budget.take(t0 + Duration::from_millis(999)), None);
        let t1 = t0 + Duration::from_secs(1);
        assert_eq!(budget.take(t1), Some(2));
        assert_eq!(budget.take(t1), Some(0));
        assert_eq!(budget.take(t1), None);
    }
}
