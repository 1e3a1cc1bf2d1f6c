//! The engine's side of retention (see [`crate::retention`]): purging expired events a chunk of
//! profiles at a time, each chunk one batch under the writer lock, then handed to the segment
//! worker like any other change, so ingestion goes on between chunks.

use super::Engine;
use crate::error::Result;
use crate::retention::{Retention, RetentionReceipt};
use crate::store::{entry_of, event_key};

/// Profiles per batch of a purge.
#[cfg(not(test))]
const CHUNK: u32 = 4096;
/// Small in tests, so a few hundred generated profiles span several chunks.
#[cfg(test)]
const CHUNK: u32 = 64;

impl Engine {
    /// The retention policy read from `retention.toml` at open.
    pub fn retention(&self) -> Retention {
        self.retention
    }

    /// Purges what the retention policy says is expired at `now`: events dated before the
    /// cutoff (index entries removed, bodies overwritten in the event log, hot rows dropped,
    /// every segment evaluated again for the profiles that lost some, with cause `retention`)
    /// and quarantined messages received before theirs. The messageIds of purged events stay
    /// known, so the same events sent again are duplicates, not new. Audited when it removed
    /// anything.
    pub fn purge_expired(&self, now: i64) -> Result<RetentionReceipt> {
        let started = std::time::Instant::now();
        let mut receipt = RetentionReceipt::default();
        if let Some(cutoff) = self.retention.events_cutoff(now) {
            receipt.events_before = Some(crate::time::format_ms(cutoff));
            let profiles = self.state.lock().profiles.len() as u32;
            let mut start = 0;
            while start < profiles {
                let end = start.saturating_add(CHUNK).min(profiles);
                let (removed, touched) = self.purge_events(start..end, cutoff)?;
                receipt.events_removed += removed;
                receipt.profiles_touched += touched.all.len() as u64;
                if !touched.all.is_empty() {
                    self.hand_off(touched, crate::segment::feed::Cause::Retention, now)?;
                }
                start = end;
            }
        }
        if let Some(cutoff) = self.retention.quarantine_cutoff(now) {
            receipt.quarantine_before = Some(crate::time::format_ms(cutoff));
            receipt.quarantined_removed = self.purge_quarantine(cutoff)?;
        }
        receipt.seconds = started.elapsed().as_secs_f64();
        if receipt.events_removed > 0 || receipt.quarantined_removed > 0 {
            self.audit(crate::audit::Entry {
                action: crate::audit::Action::RetentionPurge,
                actor: crate::audit::actor(),
                subjects: Vec::new(),
                detail: serde_json::json!({
                    "events_before": receipt.events_before,
                    "events": receipt.events_removed,
                    "profiles": receipt.profiles_touched,
                    "quarantine_before": receipt.quarantine_before,
                    "quarantined": receipt.quarantined_removed,
                }),
            })?;
        }
        Ok(receipt)
    }

    fn purge_events(
        &self,
        profiles: std::ops::Range<u32>,
        cutoff: i64,
    ) -> Result<(u64, crate::segment::live::Touched)> {
        self.check_poisoned()?;
        let state = self.state.lock();
        let mut batch = self.store.synced_batch();
        let mut bodies = Vec::new();
        let mut touched = crate::segment::live::Touched::default();
        for profile in profiles {
            if !state
                .profiles
                .get(profile as usize)
                .is_some_and(|meta| meta.alive)
            {
                continue;
            }
            let range = event_key(profile, i64::MIN, 0)..event_key(profile, cutoff, 0);
            for entry in self.store.events.range(range) {
                let (key, value) = entry.into_inner()?;
                bodies.push(entry_of(&value)?.location);
                batch.remove(&self.store.events, key);
                touched.all.insert(profile);
            }
        }
        if bodies.is_empty() {
            return Ok((0, touched));
        }
        self.commit_or_poison(batch)?;
        self.overwrite_bodies(&bodies)?;
        let seconds = crate::computed::ops::seconds(cutoff);
        {
            let mut hot = self.hot.write();
            for profile in &touched.all {
                hot.drop_before(*profile, seconds);
            }
        }
        drop(state);
        Ok((bodies.len() as u64, touched))
    }

    fn purge_quarantine(&self, cutoff: i64) -> Result<u64> {
        self.check_poisoned()?;
        let _writer = self.state.lock();
        let mut batch = self.store.synced_batch();
        let removed = self.remove_quarantined(&mut batch, |kept| kept.received_at < cutoff)?;
        if removed > 0 {
            self.commit_or_poison(batch)?;
        }
        Ok(removed)
    }
}
