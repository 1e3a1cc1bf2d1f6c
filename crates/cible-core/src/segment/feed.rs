//! The change feed: every enter and exit of every segment (lifecycle stages are the segments
//! `lifecycle-*`), with a global, gap-free, increasing sequence number and the cause.
//!
//! Only the segment worker writes it, under the `Segments` lock, in the same fjall batch as the
//! memberships the changes lead to: after a crash, either both are on disk or neither, so a
//! change is never lost and never emitted twice. Webhooks, list sync, campaigns and the UI read
//! the feed from a sequence number.

use serde::{Deserialize, Serialize};

use super::Change;
use crate::error::EngineError;
use crate::store::Store;

/// Why a membership changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Cause {
    /// A batch of events (HTTP, quarantine replay) touched the profile.
    Events,
    /// A time window expired or a delay elapsed.
    Timer,
    /// The segment was created or its rule edited (or it was refreshed by hand).
    SegmentEdit,
    /// A bulk import touched the profile.
    Import,
    /// Computed traits were recalibrated.
    Recalibration,
    /// A model version was saved or activated.
    ModelActivation,
    /// A profile was unmerged or removed.
    ProfileEdit,
    /// The person was erased: their last exits (every earlier entry naming them is gone).
    Erasure,
    /// Events of the profile expired under the retention policy and were purged.
    Retention,
    /// The server started and caught up with the time passed and the batches committed while
    /// it was stopped.
    Restart,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::Events => "events",
            Cause::Timer => "timer",
            Cause::SegmentEdit => "segment_edit",
            Cause::Import => "import",
            Cause::Recalibration => "recalibration",
            Cause::ModelActivation => "model_activation",
            Cause::ProfileEdit => "profile_edit",
            Cause::Restart => "restart",
            Cause::Retention => "retention",
            Cause::Erasure => "erasure",
        }
    }
}

/// One entry of the feed.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct FeedChange {
    pub seq: u64,
    /// Evaluation time, epoch ms.
    pub at: i64,
    pub segment: String,
    pub profile: u32,
    pub entered: bool,
    /// Size of the segment right after this change.
    pub size: u64,
    pub cause: Cause,
}

/// The feed's writer: the next sequence number. Lives in the worker's state.
#[derive(Debug)]
pub(crate) struct FeedWriter {
    next_seq: u64,
}

impl FeedWriter {
    /// Continues after the last change on disk.
    pub(crate) fn open(store: &Store) -> Result<Self, EngineError> {
        let next_seq = match store.changes.last_key_value() {
            Some(entry) => {
                let key = entry.key()?;
                decode_seq(&key).ok_or_else(|| crate::error::corrupt("changes", "bad key"))? + 1
            }
            None => 1,
        };
        Ok(Self { next_seq })
    }

    /// The last sequence number written (0 when the feed is empty).
    pub(crate) fn head(&self) -> u64 {
        self.next_seq - 1
    }

    /// Starts writing changes into `batch`; [`FeedBatch::committed`] moves the writer on once
    /// the batch is on disk.
    pub(crate) fn begin(&self) -> FeedBatch {
        FeedBatch {
            next_seq: self.next_seq,
            written: 0,
        }
    }

    /// Moves the writer on once `batch` is on disk; the batch goes on from there, empty.
    pub(crate) fn committed(&mut self, batch: &mut FeedBatch) {
        self.next_seq = batch.next_seq;
        batch.written = 0;
    }
}

/// Changes being written in one store batch.
#[derive(Debug)]
pub(crate) struct FeedBatch {
    next_seq: u64,
    pub(crate) written: u64,
}

impl FeedBatch {
    /// Records a change: the feed entry, the segment's own history and the member's entry time.
    pub(crate) fn record(
        &mut self,
        store: &Store,
        batch: &mut fjall::OwnedWriteBatch,
        segment: &str,
        change: Change,
        cause: Cause,
    ) {
        let seq = self.next_seq;
        self.next_seq += 1;
        self.written += 1;
        let entry = crate::store::entry_key(segment, change.profile);
        if change.entered {
            batch.insert(&store.entries, entry, change.at.to_be_bytes());
        } else {
            batch.remove(&store.entries, entry);
        }
        batch.insert(
            &store.segment_log,
            crate::store::segment_log_key(segment, change.at, seq),
            super::to_json(&change),
        );
        let entry = FeedChange {
            seq,
            at: change.at,
            segment: segment.to_string(),
            profile: change.profile,
            entered: change.entered,
            size: change.size,
            cause,
        };
        batch.insert(&store.changes, seq.to_be_bytes(), super::to_json(&entry));
    }
}

fn decode_seq(key: &[u8]) -> Option<u64> {
    Some(u64::from_be_bytes(key.try_into().ok()?))
}

/// Reads up to `limit` changes with a sequence number above `after` and at most `head`, in order.
pub(crate) fn read_after(
    store: &Store,
    after: u64,
    head: u64,
    limit: usize,
) -> Result<Vec<FeedChange>, EngineError> {
    let mut changes = Vec::new();
    if limit == 0 || after >= head {
        return Ok(changes);
    }
    let start = after.saturating_add(1).to_be_bytes();
    for entry in store.changes.range(start..=head.to_be_bytes()) {
        let (_, value) = entry.into_inner()?;
        changes
            .push(serde_json::from_slice(&value).map_err(|e| crate::error::corrupt("changes", e))?);
        if changes.len() >= limit {
            break;
        }
    }
    Ok(changes)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_read_stops_at_the_published_head() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let mut writer = FeedWriter::open(&store).unwrap();
        let mut changes = writer.begin();
        let mut batch = store.db.batch();
        for profile in 0..3 {
            let change = Change {
                at: 1_000,
                profile,
                entered: true,
                size: u64::from(profile) + 1,
            };
            changes.record(&store, &mut batch, "s", change, Cause::Events);
        }
        batch.commit().unwrap();
        writer.committed(&mut changes);
        assert_eq!(writer.head(), 3);
        let seqs = |after, head, limit| -> Vec<u64> {
            read_after(&store, after, head, limit)
                .unwrap()
                .into_iter()
                .map(|c| c.seq)
                .collect()
        };
        // Committed but not yet published (its sync under way): not readable.
        assert_eq!(seqs(0, 2, 10), [1, 2]);
        assert_eq!(seqs(2, 2, 10), Vec::<u64>::new());
        assert_eq!(seqs(0, 3, 10), [1, 2, 3]);
        assert_eq!(seqs(1, 3, 1), [2]);
        assert_eq!(seqs(0, 3, 0), Vec::<u64>::new());
    }
}
