//! Per-minute, per-hour and per-day counts for `/v1/stats`: fixed rings of
//! buckets indexed by bucket start (UTC).
//!
//! The hot path pays nothing: a sampler reads the counter totals once a
//! second (and `/v1/stats` once more before answering) and adds what grew
//! since the last look to the current bucket of each ring. A count lands in
//! the bucket of the moment it was sampled, at most a second late.

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use tokio_util::sync::CancellationToken;

use super::Stats;

/// Final failures by reason, as `failed` lists them.
pub const FAILURE_REASONS: [&str; 8] = [
    "registry",
    "apns_rejected",
    "apns_retries_exhausted",
    "apns_queue_dropped",
    "apns_no_credentials",
    "apns_too_large",
    "apns_dead_token",
    "mqtt_dropped",
];

/// Accepted, MQTT, APNs, the arrival counts, then one per failure reason.
const FIELDS: usize = FAILED_AT + FAILURE_REASONS.len();
/// Where the failure reasons start in a tally.
const FAILED_AT: usize = 6;

/// Counts of one bucket (or totals): see [`Stats::tally`].
pub type Tally = [u64; FIELDS];

impl Stats {
    /// The totals the series are made of, in `Bucket` order.
    pub fn tally(&self) -> Tally {
        [
            self.pushes_accepted.get() + self.http_pushes.get(),
            self.mqtt_published.get(),
            self.apns_delivered.get(),
            self.mqtt_written.get(),
            self.mqtt_acked.get(),
            self.apns_queued.get(),
            self.pushes_failed_registry.get(),
            self.apns_rejected.get(),
            self.apns_retries_exhausted.get(),
            self.apns_queue_dropped.get(),
            self.apns_no_credentials.get(),
            self.apns_too_large.get(),
            self.apns_dead_tokens.get(),
            self.mqtt_dropped.get(),
        ]
    }
}

/// One bucket as `/v1/stats` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bucket {
    /// Unix seconds, UTC, the bucket's start.
    pub start: u64,
    pub accepted: u64,
    pub mqtt: u64,
    /// Delivered to Apple (answered 200).
    pub apns: u64,
    /// MQTT messages written to devices' sessions (a publish reaching
    /// three devices: three).
    pub mqtt_written: u64,
    /// Of those, acknowledged by the device (QoS 1 PUBACK).
    pub mqtt_acked: u64,
    /// Notifications handed to the APNs sender.
    pub apns_sent: u64,
    /// Per reason of `FAILURE_REASONS`, in that order.
    pub failed: [u64; FAILURE_REASONS.len()],
}

impl Bucket {
    fn new(start: u64, t: &Tally) -> Bucket {
        let mut failed = [0; FAILURE_REASONS.len()];
        failed.copy_from_slice(&t[FAILED_AT..]);
        Bucket {
            start,
            accepted: t[0],
            mqtt: t[1],
            apns: t[2],
            mqtt_written: t[3],
            mqtt_acked: t[4],
            apns_sent: t[5],
            failed,
        }
    }

    /// What arrived of what was sent: (device acknowledgements + Apple's
    /// 200s) / (messages written to sessions + notifications sent to
    /// Apple); `None` when nothing was sent.
    pub fn arrival_rate(&self) -> Option<f64> {
        let sent = self.mqtt_written + self.apns_sent;
        (sent > 0).then(|| (self.mqtt_acked + self.apns) as f64 / sent as f64)
    }
}

/// `len` buckets of `width` seconds; slot `(start / width) % len`.
#[derive(Debug)]
struct Ring {
    width: u64,
    slots: Vec<(u64, Tally)>,
}

impl Ring {
    fn new(width: u64, len: usize) -> Ring {
        // Start u64::MAX: no slot holds a real bucket yet.
        Ring {
            width,
            slots: vec![(u64::MAX, [0; FIELDS]); len],
        }
    }

    fn slot(&self, start: u64) -> usize {
        ((start / self.width) % self.slots.len() as u64) as usize
    }

    fn add(&mut self, now: u64, delta: &Tally) {
        let start = now - now % self.width;
        let i = self.slot(start);
        let slot = &mut self.slots[i];
        if slot.0 != start {
            *slot = (start, [0; FIELDS]);
        }
        for (n, d) in slot.1.iter_mut().zip(delta) {
            *n += d;
        }
    }

    /// Every bucket up to the one holding `now`, oldest first; empty ones as zeros.
    fn buckets(&self, now: u64) -> Vec<Bucket> {
        let current = now - now % self.width;
        let len = self.slots.len() as u64;
        (0..len)
            .filter_map(|back| current.checked_sub((len - 1 - back) * self.width))
            .map(|start| {
                let (at, tally) = &self.slots[self.slot(start)];
                match *at == start {
                    true => Bucket::new(start, tally),
                    false => Bucket::new(start, &[0; FIELDS]),
                }
            })
            .collect()
    }
}

#[derive(Debug)]
struct Rings {
    last: Tally,
    minutes: Ring,
    hours: Ring,
    days: Ring,
}

/// The three series; one lock, taken by the sampler and by readers.
#[derive(Debug)]
pub struct Series(Mutex<Rings>);

impl Default for Series {
    fn default() -> Self {
        Series(Mutex::new(Rings {
            last: [0; FIELDS],
            minutes: Ring::new(60, 60),
            hours: Ring::new(3600, 48),
            days: Ring::new(86400, 30),
        }))
    }
}

/// The series read at one moment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SeriesSnapshot {
    pub per_minute: Vec<Bucket>,
    pub per_hour: Vec<Bucket>,
    pub per_day: Vec<Bucket>,
}

impl Series {
    fn lock(&self) -> MutexGuard<'_, Rings> {
        self.0.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Adds what `totals` grew by since the last call to the buckets of `now`
    /// (Unix seconds).
    pub fn observe(&self, now: u64, totals: Tally) {
        let mut r = self.lock();
        let mut delta = [0; FIELDS];
        for ((d, t), l) in delta.iter_mut().zip(&totals).zip(&r.last) {
            *d = t.saturating_sub(*l);
        }
        if delta.iter().all(|d| *d == 0) {
            return;
        }
        r.last = totals;
        r.minutes.add(now, &delta);
        r.hours.add(now, &delta);
        r.days.add(now, &delta);
    }

    /// Every bucket of each ring up to the ones holding `now`.
    pub fn snapshot(&self, now: u64) -> SeriesSnapshot {
        let r = self.lock();
        SeriesSnapshot {
            per_minute: r.minutes.buckets(now),
            per_hour: r.hours.buckets(now),
            per_day: r.days.buckets(now),
        }
    }
}

/// Feeds `stats.series` from the counters once a second until `stop`.
pub async fn sample(stats: std::sync::Arc<Stats>, stop: CancellationToken) {
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => stats.series.observe(crate::utc::now(), stats.tally()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tally(accepted: u64, registry: u64) -> Tally {
        let mut t = [0; FIELDS];
        t[0] = accepted;
        t[FAILED_AT] = registry;
        t
    }

    /// 2026-11-25T00:00:00Z: a day, hour and minute boundary.
    const DAY: u64 = 1_795_564_800;

    #[test]
    fn deltas_land_in_the_bucket_of_their_sample() {
        let s = Series::default();
        s.observe(DAY + 5, tally(3, 0));
        s.observe(DAY + 59, tally(4, 1));
        s.observe(DAY + 60, tally(10, 1));
        s.observe(DAY + 3600 + 1, tally(11, 1));
        let snap = s.snapshot(DAY + 3600 + 30);

        assert_eq!(snap.per_minute.len(), 60);
        let last = snap.per_minute.last().unwrap();
        assert_eq!((last.start, last.accepted), (DAY + 3600, 1));
        // The minute buckets reach back 59 minutes: DAY+60 is the oldest.
        let first = &snap.per_minute[0];
        assert_eq!((first.start, first.accepted), (DAY + 60, 6));
        assert!(snap.per_minute[1..59].iter().all(|b| b.accepted == 0));

        assert_eq!(snap.per_hour.len(), 48);
        let hours: Vec<_> = snap.per_hour[46..]
            .iter()
            .map(|b| (b.start, b.accepted))
            .collect();
        assert_eq!(hours, [(DAY, 10), (DAY + 3600, 1)]);
        assert_eq!(snap.per_hour[46].failed[0], 1, "registry failures");

        assert_eq!(snap.per_day.len(), 30);
        let today = snap.per_day.last().unwrap();
        assert_eq!((today.start, today.accepted, today.failed[0]), (DAY, 11, 1));
        assert_eq!(snap.per_day[0].start, DAY - 29 * 86400);
    }

    #[test]
    fn stale_slots_read_as_zero_and_are_reused() {
        let s = Series::default();
        s.observe(DAY + 10, tally(5, 0));
        // 60 minutes later the same slot index holds a new minute.
        s.observe(DAY + 3600 + 10, tally(7, 0));
        let snap = s.snapshot(DAY + 3600 + 10);
        assert_eq!(snap.per_minute.last().unwrap().accepted, 2);
        assert_eq!(snap.per_minute.iter().map(|b| b.accepted).sum::<u64>(), 2);
        // Read much later: everything has aged out of the minute and hour rings.
        let later = s.snapshot(DAY + 40 * 86400);
        assert!(later.per_minute.iter().all(|b| b.accepted == 0));
        assert!(later.per_hour.iter().all(|b| b.accepted == 0));
        assert!(later.per_day.iter().all(|b| b.accepted == 0));
        // Starts are consecutive, oldest first.
        for w in later.per_hour.windows(2) {
            assert_eq!(w[1].start - w[0].start, 3600);
        }
    }
}
