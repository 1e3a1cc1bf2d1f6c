//! The population part of computed traits: engagement percentiles, RFM quintile breakpoints and
//! the population's best send time, computed in one pass over every profile and stored in the
//! `meta` keyspace. Recalibrating moves scores; between calibrations they move only with each
//! profile's own events.

use serde::{Deserialize, Serialize};

use super::RawTraits;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Calibration {
    /// When it was computed, seconds: the reference instant of engagement sums.
    pub at: u32,
    /// The 1st to 100th percentiles (nearest rank) of positive engagement sums.
    pub engagement: Vec<f64>,
    /// Quintile breakpoints (20th to 80th percentiles) of customers' recency in days, order
    /// count and revenue over the RFM window.
    pub recency: [f64; 4],
    pub frequency: [f64; 4],
    pub monetary: [f64; 4],
    /// The population's best hour (UTC) and ISO weekday to send, from every open and click.
    pub hour: u8,
    pub weekday: u8,
    pub profiles: u64,
    pub customers: u64,
}

/// Nearest-rank percentile `k` (0 < k <= 100) of sorted values.
fn nearest_rank(sorted: &[f64], k: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let rank = ((k / 100.0) * sorted.len() as f64).ceil() as usize;
    sorted[rank.clamp(1, sorted.len()) - 1]
}

fn quintiles(mut values: Vec<f64>) -> [f64; 4] {
    values.sort_by(f64::total_cmp);
    [20.0, 40.0, 60.0, 80.0].map(|k| nearest_rank(&values, k))
}

impl Calibration {
    /// From every profile's raw traits at `at`, with the population's open/click hours and
    /// weekdays counted by the caller.
    pub fn from_raw(at: u32, raws: &[RawTraits], hours: &[u64; 24], weekdays: &[u64; 7]) -> Self {
        let mut engagement: Vec<f64> = raws
            .iter()
            .map(|r| r.engagement)
            .filter(|e| *e > 0.0)
            .collect();
        engagement.sort_by(f64::total_cmp);
        let customers: Vec<&super::RawRfm> = raws.iter().filter_map(|r| r.rfm.as_ref()).collect();
        let best = |counts: &[u64]| {
            (0..counts.len()).fold(0, |best, i| if counts[i] > counts[best] { i } else { best })
        };
        Self {
            at,
            engagement: if engagement.is_empty() {
                Vec::new()
            } else {
                (1..=100)
                    .map(|k| nearest_rank(&engagement, f64::from(k)))
                    .collect()
            },
            recency: quintiles(customers.iter().map(|c| c.recency_days).collect()),
            frequency: quintiles(customers.iter().map(|c| f64::from(c.frequency)).collect()),
            monetary: quintiles(customers.iter().map(|c| c.monetary).collect()),
            hour: best(hours) as u8,
            weekday: best(weekdays) as u8 + 1,
            profiles: raws.len() as u64,
            customers: customers.len() as u64,
        }
    }

    /// The percentile (0 to 100) of an engagement sum: how many of the 100 percentile points it
    /// reaches; 0 for no engagement.
    pub fn engagement_percentile(&self, sum: f64) -> u8 {
        if sum <= 0.0 || self.engagement.is_empty() {
            return 0;
        }
        self.engagement.partition_point(|p| *p <= sum) as u8
    }
}
