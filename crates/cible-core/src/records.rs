//! Records shared by the components: profiles, traits, merges, quarantine records and the
//! answers of writes and reads. They live below the engine and the components that use them
//! (segments, traits, models, views), so none of those reaches into the engine's module for
//! them. Their serde form is what the store keeps (profiles, merges, quarantine) and, for some,
//! what the API returns.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::message::Message;
use crate::quality::{QualityCounters, Reason};

/// A quarantined message in a batch answer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QuarantineNote {
    /// Position of the message in the batch.
    pub index: usize,
    pub reason: Reason,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub detail: String,
}

/// What a batch did.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct BatchOutcome {
    pub accepted: u64,
    pub duplicates: u64,
    pub quarantined: Vec<QuarantineNote>,
    pub profiles_created: u64,
    pub profiles_merged: u64,
    pub identity_conflicts: u64,
}

impl BatchOutcome {
    /// Adds another batch's counts (the notes are not kept).
    pub fn absorb(&mut self, other: &BatchOutcome) {
        self.accepted += other.accepted;
        self.duplicates += other.duplicates;
        self.profiles_created += other.profiles_created;
        self.profiles_merged += other.profiles_merged;
        self.identity_conflicts += other.identity_conflicts;
    }
}

/// A trait value and the time of the message that set it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TraitValue {
    pub value: Value,
    /// Message time (epoch ms) of the identify call that set it: the latest one wins.
    pub at: i64,
}

/// A profile as stored.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ProfileRecord {
    pub id: u32,
    pub created_at: i64,
    /// `u:`, `a:` and `e:` identifiers.
    pub identifiers: Vec<String>,
    pub traits: BTreeMap<String, TraitValue>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub merged_into: Option<u32>,
    /// Every consent change, oldest first (see [`crate::consent`]).
    #[serde(default, skip_serializing_if = "crate::consent::Consents::is_empty")]
    pub consents: crate::consent::Consents,
}

impl ProfileRecord {
    /// Applies an identify call's traits: a trait changes only if the message is not older
    /// than the one that set it.
    pub(crate) fn apply_traits(&mut self, traits: &serde_json::Map<String, Value>, at: i64) {
        for (name, value) in traits {
            let newer = self.traits.get(name).is_none_or(|current| current.at <= at);
            if newer {
                self.traits.insert(
                    name.clone(),
                    TraitValue {
                        value: value.clone(),
                        at,
                    },
                );
            }
        }
    }

    pub(crate) fn absorb(&mut self, other: ProfileRecord) {
        self.identifiers.extend(other.identifiers);
        self.consents.absorb(other.consents);
        for (name, incoming) in other.traits {
            let newer = self
                .traits
                .get(&name)
                .is_none_or(|current| current.at <= incoming.at);
            if newer {
                self.traits.insert(name, incoming);
            }
        }
    }
}

/// A merge, kept forever (unmerge marks it, never deletes it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct MergeRecord {
    pub id: u64,
    pub from: u32,
    pub into: u32,
    pub cause: String,
    pub at: i64,
    /// The identifiers `from` held when it was merged.
    pub identifiers: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub unmerged_at: Option<i64>,
}

/// A quarantined message, kept whole.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QuarantineRecord {
    pub id: u64,
    pub reason: Reason,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub detail: String,
    pub source: String,
    pub received_at: i64,
    pub raw: String,
}

/// Sizes of what was loaded at start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadStats {
    pub events: usize,
    pub profiles: usize,
    pub identifiers: usize,
    /// Whether the hot store came from the snapshot of a clean close ([`crate::snapshot`]),
    /// not from a scan of the store.
    pub from_snapshot: bool,
}

/// The result of [`Engine::lookup_profile`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lookup {
    pub profile: u32,
    /// The profile number asked for, when it was merged into `profile`.
    pub merged_from: Option<u32>,
}

/// The result of [`Engine::remove_profile`].
#[derive(Debug, Clone, Serialize)]
pub struct RemovalOutcome {
    pub profile: u32,
    pub events_removed: u64,
    pub identifiers_removed: Vec<String>,
    pub merged_profiles_removed: Vec<u32>,
}

/// The receipt of an erasure ([`crate::Engine::erase_profile`]): what was removed, with the
/// person named only by keyed hashes of their identifiers (as the audit log names them).
#[derive(Debug, Clone, Serialize)]
pub struct ErasureReceipt {
    pub profile: u32,
    pub subjects: Vec<String>,
    pub events_removed: u64,
    pub merged_profiles_removed: Vec<u32>,
    pub quarantined_removed: u64,
    /// Entries of the change feed and of the segments' size history that named them (the
    /// exits the erasure itself caused stay, with cause `erasure`, naming only the ordinal).
    #[serde(default)]
    pub feed_entries_removed: u64,
    /// Webhook deliveries still queued (or dead) for changes that named them.
    #[serde(default)]
    pub webhook_deliveries_removed: u64,
    /// Rewritten so that no earlier version of their records is left in any file.
    pub keyspaces_compacted: Vec<String>,
    pub seconds: f64,
    /// Where the time went.
    #[serde(default)]
    pub timings: ErasureTimings,
}

/// The phases of an erasure, in milliseconds.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ErasureTimings {
    /// Removing the person's records, links, events and quarantined messages (one batch).
    pub removal_ms: f64,
    /// Their exits evaluated, then the feed and size-history entries naming them removed.
    pub history_ms: f64,
    /// fjall's journal sealed and deleted (the writer waits).
    pub journal_ms: f64,
    /// The keyspaces holding identifiers rewritten.
    pub rewrite_ms: f64,
}

/// The result of [`Engine::unmerge`].
#[derive(Debug, Clone, Serialize)]
pub struct UnmergeOutcome {
    pub merge: u64,
    pub restored_profile: u32,
    pub survivor: u32,
    pub identifiers: Vec<String>,
    pub events_moved: u64,
}

/// An event as read back from the store.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StoredEvent {
    pub profile: u32,
    pub seq: u64,
    pub message: Message,
}

/// `GET /api/quality` and `cible quality`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct QualityReport {
    pub events: u64,
    pub profiles: u64,
    pub merged_profiles: u64,
    /// Messages waiting in quarantine now, by reason.
    pub in_quarantine: BTreeMap<Reason, u64>,
    #[serde(flatten)]
    pub counters: QualityCounters,
}

/// A snapshot of the engine's dictionaries: event-name ids, and the key-property texts by id
/// (empty when only names were asked for). Rules and computed traits are planned against it.
pub struct DictSnapshot {
    pub names: rustc_hash::FxHashMap<String, u16>,
    pub keys: std::sync::Arc<Vec<String>>,
}

/// A record as stored (JSON).
pub(crate) fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}
