//! Retention: how long events (and quarantined messages) are kept, from `DIR/retention.toml`:
//!
//! ```toml
//! events_days = 395       # events dated more than this long ago are purged
//! quarantine_days = 30    # quarantined messages received more than this long ago are purged
//! ```
//!
//! Both are optional (absent: kept for ever). A purge ([`crate::Engine::purge_expired`]) runs
//! at every start of `cible serve`, then hourly, and on demand (`cible retention run`): the
//! events go from the index, their bodies are overwritten in the event log, the hot store
//! forgets them, and every segment is evaluated again for the profiles that lost some, so
//! memberships, computed traits and model inputs are what they would be had those events never
//! arrived. What a profile is (its identifiers, current traits, consents and their proof) is
//! not an event and stays; removing a person is erasure's job.

use serde::{Deserialize, Serialize};

/// The policy's file in the data directory.
pub const FILE_NAME: &str = "retention.toml";

/// Longest period accepted (100 years).
const MAX_DAYS: u32 = 36_500;

/// The retention policy.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Retention {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_days: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_days: Option<u32>,
}

const DAY_MS: i64 = 86_400_000;

impl Retention {
    /// Reads `retention.toml` text; the error names the field.
    pub fn from_toml(text: &str) -> Result<Self, String> {
        let policy: Self = toml::from_str(text).map_err(|e| e.to_string())?;
        for (field, days) in [
            ("events_days", policy.events_days),
            ("quarantine_days", policy.quarantine_days),
        ] {
            if let Some(days) = days
                && !(1..=MAX_DAYS).contains(&days)
            {
                return Err(format!(
                    "{field}: {days} is out of range (1 to {MAX_DAYS} days)"
                ));
            }
        }
        Ok(policy)
    }

    /// Events dated before this instant (epoch ms, a whole second) are expired at `now`.
    pub fn events_cutoff(&self, now: i64) -> Option<i64> {
        self.events_days
            .map(|days| (now - i64::from(days) * DAY_MS).div_euclid(1000) * 1000)
    }

    /// Quarantined messages received before this instant are expired at `now`.
    pub fn quarantine_cutoff(&self, now: i64) -> Option<i64> {
        self.quarantine_days
            .map(|days| now - i64::from(days) * DAY_MS)
    }
}

/// What a purge removed.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct RetentionReceipt {
    /// Events dated before this (RFC 3339) were purged; absent when events are kept for ever.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub events_before: Option<String>,
    pub events_removed: u64,
    pub profiles_touched: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quarantine_before: Option<String>,
    pub quarantined_removed: u64,
    pub seconds: f64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn policies_are_read_and_bounded_with_the_field_named() {
        let policy = Retention::from_toml("events_days = 30\nquarantine_days = 7\n").unwrap();
        assert_eq!(policy.events_days, Some(30));
        let now = 1_777_550_400_123;
        assert_eq!(
            policy.events_cutoff(now),
            Some(1_777_550_400_000 - 30 * DAY_MS)
        );
        assert_eq!(Retention::from_toml("").unwrap(), Retention::default());
        assert_eq!(Retention::default().events_cutoff(now), None);
        let error = Retention::from_toml("events_days = 0").unwrap_err();
        assert!(
            error.contains("events_days") && error.contains("out of range"),
            "{error}"
        );
        let error = Retention::from_toml("event_days = 3").unwrap_err();
        assert!(error.contains("event_days"), "{error}");
        assert!(Retention::from_toml("quarantine_days = -1").is_err());
    }
}
