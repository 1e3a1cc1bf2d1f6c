//! What the engine measures about itself, for `/metrics`: counters, gauges and latency
//! histograms, all lock-free atomics except the per-segment table. The server renders them in
//! the Prometheus text format; the engine knows nothing of that format.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use rustc_hash::FxHashMap;

use crate::lock::{Level, OrderedMutex};

/// Upper bounds of the latency buckets, in seconds (Prometheus `le`).
pub const BUCKETS: [f64; 14] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
];

/// A latency histogram with the buckets of [`BUCKETS`] (and +Inf).
#[derive(Debug, Default)]
pub struct Histogram {
    counts: [AtomicU64; BUCKETS.len() + 1],
    sum_us: AtomicU64,
    count: AtomicU64,
}

/// A histogram read at one instant.
#[derive(Debug, Clone, Default)]
pub struct HistogramSnapshot {
    /// Cumulative counts per bucket of [`BUCKETS`], then +Inf.
    pub cumulative: Vec<u64>,
    pub sum_seconds: f64,
    pub count: u64,
}

impl Histogram {
    pub fn observe(&self, elapsed: Duration) {
        let seconds = elapsed.as_secs_f64();
        let index = BUCKETS
            .iter()
            .position(|bound| seconds <= *bound)
            .unwrap_or(BUCKETS.len());
        self.counts[index].fetch_add(1, Ordering::Relaxed);
        self.sum_us
            .fetch_add(elapsed.as_micros() as u64, Ordering::Relaxed);
        self.count.fetch_add(1, Ordering::Relaxed);
    }

    pub fn snapshot(&self) -> HistogramSnapshot {
        let mut running = 0;
        let cumulative = self
            .counts
            .iter()
            .map(|c| {
                running += c.load(Ordering::Relaxed);
                running
            })
            .collect();
        HistogramSnapshot {
            cumulative,
            sum_seconds: self.sum_us.load(Ordering::Relaxed) as f64 / 1e6,
            count: self.count.load(Ordering::Relaxed),
        }
    }
}

/// Time spent evaluating one segment, over its life in this process.
#[derive(Debug, Clone, Default)]
pub struct SegmentTiming {
    pub passes: u64,
    pub profiles: u64,
    pub seconds: f64,
}

/// Every measure of the engine.
#[derive(Default)]
pub struct Metrics {
    /// Messages accepted (stored) since start.
    pub events_accepted: AtomicU64,
    /// Messages recognised as duplicates since start.
    pub events_duplicate: AtomicU64,
    /// Messages quarantined since start.
    pub events_quarantined: AtomicU64,
    /// Group commits since start.
    pub batches_committed: AtomicU64,
    /// Time from receiving a tracking request to answering it (measured by the server).
    pub ack_latency: Histogram,
    /// Time from a batch's commit to its changes being in the feed.
    pub batch_to_feed: Histogram,
    /// Admin calls running now (segment edits, previews, refreshes, trainings).
    pub admin_jobs: AtomicU64,
    /// Profiles waiting for the segment worker.
    pub queue_depth: AtomicU64,
    /// 1 once the live segments' first pass (at start) is done: memberships are current.
    pub segments_ready: AtomicU64,
    /// Last sequence number of the change feed.
    pub feed_head: AtomicU64,
    /// Changes written since start.
    pub changes_written: AtomicU64,
    /// Batches handed to the worker since start, and those it has processed.
    pub batches_handed: AtomicU64,
    pub batches_evaluated: AtomicU64,
    segments: Segments,
}

struct Segments(OrderedMutex<FxHashMap<String, SegmentTiming>>);

impl Default for Segments {
    fn default() -> Self {
        Self(OrderedMutex::new(Level::Cache, FxHashMap::default()))
    }
}

impl Metrics {
    pub(crate) fn segment_evaluated(&self, name: &str, profiles: u64, elapsed: Duration) {
        let mut table = self.segments.0.lock();
        // Called for every segment of every batch: allocate a key only the first time.
        if !table.contains_key(name) {
            table.insert(name.to_string(), SegmentTiming::default());
        }
        let timing = table.get_mut(name).expect("just inserted");
        timing.passes += 1;
        timing.profiles += profiles;
        timing.seconds += elapsed.as_secs_f64();
    }

    pub(crate) fn feed_committed(&self, head: u64, written: u64) {
        self.feed_head.store(head, Ordering::Release);
        self.changes_written.fetch_add(written, Ordering::Relaxed);
    }

    pub(crate) fn batch_to_feed(&self, elapsed: Duration, batches: u64) {
        self.batch_to_feed.observe(elapsed);
        self.batches_evaluated.fetch_add(batches, Ordering::Relaxed);
    }

    /// Evaluation time per segment, by name.
    pub fn segment_timings(&self) -> Vec<(String, SegmentTiming)> {
        let mut timings: Vec<_> = self
            .segments
            .0
            .lock()
            .iter()
            .map(|(name, timing)| (name.clone(), timing.clone()))
            .collect();
        timings.sort_by(|a, b| a.0.cmp(&b.0));
        timings
    }
}
