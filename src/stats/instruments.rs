//! Instruments besides counters: a gauge with its peak, a latency histogram.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// A level that goes up and down (open connections), with the highest it
/// reached since start, so a spike between scrapes is not lost.
#[derive(Debug, Default)]
pub struct Gauge {
    now: AtomicU64,
    peak: AtomicU64,
}

impl Gauge {
    pub fn up(&self) {
        let now = self.now.fetch_add(1, Ordering::Relaxed) + 1;
        self.peak.fetch_max(now, Ordering::Relaxed);
    }

    pub fn down(&self) {
        let _ = self
            .now
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| n.checked_sub(1));
    }

    /// The level is `n` now (a queue's length after a change).
    pub fn set(&self, n: u64) {
        self.now.store(n, Ordering::Relaxed);
        self.peak.fetch_max(n, Ordering::Relaxed);
    }

    pub fn now(&self) -> u64 {
        self.now.load(Ordering::Relaxed)
    }

    pub fn peak(&self) -> u64 {
        self.peak.load(Ordering::Relaxed)
    }
}

/// Upper bounds (seconds) of the latency buckets: APNs answers in tens of
/// milliseconds when healthy, seconds when not.
pub const LATENCY_BOUNDS: [f64; 11] = [
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Upper bounds (seconds) for the waits inside pushbridge: a healthy stage
/// takes tens of microseconds, a queued one milliseconds.
pub const STAGE_BOUNDS: [f64; 16] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0,
];

/// A Prometheus-style histogram of durations: a few relaxed atomic adds per
/// observation, no lock.
#[derive(Debug)]
pub struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; observations above the last bound are
    /// only in `count`.
    buckets: Box<[AtomicU64]>,
    count: AtomicU64,
    sum_micros: AtomicU64,
    max_micros: AtomicU64,
}

impl Default for Histogram {
    fn default() -> Self {
        Histogram::new(&LATENCY_BOUNDS)
    }
}

/// A histogram read at one moment.
#[derive(Debug, Clone, PartialEq)]
pub struct HistogramSnapshot {
    /// (upper bound in seconds, observations at or under it), cumulative.
    pub buckets: Vec<(f64, u64)>,
    pub count: u64,
    pub sum_secs: f64,
    pub max_secs: f64,
}

impl Histogram {
    pub fn new(bounds: &'static [f64]) -> Histogram {
        Histogram {
            bounds,
            buckets: bounds.iter().map(|_| AtomicU64::new(0)).collect(),
            count: AtomicU64::new(0),
            sum_micros: AtomicU64::new(0),
            max_micros: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, d: Duration) {
        let secs = d.as_secs_f64();
        if let Some(i) = self.bounds.iter().position(|le| secs <= *le) {
            self.buckets[i].fetch_add(1, Ordering::Relaxed);
        }
        self.count.fetch_add(1, Ordering::Relaxed);
        let micros = u64::try_from(d.as_micros()).unwrap_or(u64::MAX);
        self.sum_micros.fetch_add(micros, Ordering::Relaxed);
        self.max_micros.fetch_max(micros, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut total = 0;
        let buckets = self
            .bounds
            .iter()
            .zip(&self.buckets)
            .map(|(le, n)| {
                total += n.load(Ordering::Relaxed);
                (*le, total)
            })
            .collect();
        HistogramSnapshot {
            buckets,
            count: self.count.load(Ordering::Relaxed),
            sum_secs: self.sum_micros.load(Ordering::Relaxed) as f64 / 1e6,
            max_secs: self.max_micros.load(Ordering::Relaxed) as f64 / 1e6,
        }
    }
}

/// Where a push waits on its way through, one histogram per stage, so a
/// regression in latency shows which queue grew (`/metrics`, the benchmark).
#[derive(Debug)]
pub struct Stages {
    /// A backend connection held back by the intake's time bound -> let
    /// read again (every read, so its quantiles say how often it waited).
    /// Pushes wait there in the backend's socket, unread.
    pub admission: Histogram,
    /// Proxy accepted it -> the dispatcher took it off the intake queue.
    pub intake: Histogram,
    /// The dispatcher took a batch -> the whole batch was routed.
    pub route: Histogram,
    /// Queued in a session -> written to the device's socket (the oldest
    /// message of each write).
    pub session: Histogram,
    /// Written -> the device's PUBACK (one QoS 1 message in 8).
    pub ack: Histogram,
}

impl Default for Stages {
    fn default() -> Self {
        Stages {
            admission: Histogram::new(&STAGE_BOUNDS),
            intake: Histogram::new(&STAGE_BOUNDS),
            route: Histogram::new(&STAGE_BOUNDS),
            session: Histogram::new(&STAGE_BOUNDS),
            ack: Histogram::new(&STAGE_BOUNDS),
        }
    }
}

impl Stages {
    /// Each stage's name (the `stage` label) and histogram.
    pub fn all(&self) -> [(&'static str, &Histogram); 5] {
        [
            ("admission", &self.admission),
            ("intake", &self.intake),
            ("route", &self.route),
            ("session", &self.session),
            ("ack", &self.ack),
        ]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn gauge_keeps_its_peak() {
        let g = Gauge::default();
        g.up();
        g.up();
        g.down();
        g.up();
        g.down();
        g.down();
        g.down();
        assert_eq!((g.now(), g.peak()), (0, 2));
    }

    #[test]
    fn histogram_buckets_are_cumulative() {
        let h = Histogram::default();
        for ms in [1, 5, 30, 700, 20_000] {
            h.observe(Duration::from_millis(ms));
        }
        let s = h.snapshot();
        assert_eq!(s.count, 5);
        assert!((s.sum_secs - 20.736).abs() < 1e-9, "{}", s.sum_secs);
        assert_eq!(s.max_secs, 20.0);
        let at = |le: f64| s.buckets.iter().find(|b| b.0 == le).unwrap().1;
        assert_eq!(
            (at(0.005), at(0.01), at(0.05), at(1.0), at(10.0)),
            (2, 2, 3, 4, 4)
        );
    }
}

/// Which listeners are serving, for `/readyz`: each is marked up when its
/// task is spawned and down when the task ends, by dropping its [`Up`].
#[derive(Debug, Default)]
pub struct Listeners(Arc<Mutex<Vec<(&'static str, bool)>>>);

/// Marks a listener down when dropped.
#[derive(Debug)]
pub struct Up {
    all: Arc<Mutex<Vec<(&'static str, bool)>>>,
    name: &'static str,
}

fn set(all: &Mutex<Vec<(&'static str, bool)>>, name: &'static str, up: bool) {
    let mut all = all.lock().unwrap_or_else(|e| e.into_inner());
    match all.iter_mut().find(|(n, _)| *n == name) {
        Some(entry) => entry.1 = up,
        None => all.push((name, up)),
    }
}

impl Listeners {
    /// Marks `name` (a settings key such as `proxy.listen`) up until the guard drops.
    pub fn up(&self, name: &'static str) -> Up {
        set(&self.0, name, true);
        Up {
            all: Arc::clone(&self.0),
            name,
        }
    }

    /// Lists `name` as down until an `up` (a link not yet connected).
    pub fn down(&self, name: &'static str) {
        set(&self.0, name, false);
    }

    /// Every listener ever marked, in order, and whether it is up.
    pub fn states(&self) -> Vec<(&'static str, bool)> {
        self.0.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }
}

impl Drop for Up {
    fn drop(&mut self) {
        set(&self.all, self.name, false);
    }
}

#[cfg(test)]
mod listener_tests {
    use super::*;

    #[test]
    fn listeners_go_down_with_their_guard() {
        let l = Listeners::default();
        let proxy = l.up("proxy.listen");
        let mqtt = l.up("mqtt.listen");
        drop(mqtt);
        assert_eq!(l.states(), [("proxy.listen", true), ("mqtt.listen", false)]);
        drop(proxy);
        assert_eq!(
            l.states(),
            [("proxy.listen", false), ("mqtt.listen", false)]
        );
    }
}
