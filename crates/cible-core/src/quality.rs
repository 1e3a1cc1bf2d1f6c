//! Data quality: the machine-readable reasons a message is quarantined, the anomaly flags an
//! accepted event can carry, and the counters behind `cible quality` and `GET /api/quality`.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// Why a message was quarantined. The snake_case names are part of the API: never reuse one.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Reason {
    /// The text is not JSON.
    InvalidJson,
    /// The JSON is not an object.
    NotAnObject,
    /// `type` is missing or not one of Segment's six.
    UnknownType,
    /// Neither `userId` nor `anonymousId` (or an alias without `userId`).
    MissingIdentity,
    /// A track call without `event`.
    MissingEvent,
    /// An alias call without `previousId`.
    MissingPreviousId,
    /// A group call without `groupId`.
    MissingGroupId,
    /// A field of the wrong JSON kind or too long.
    InvalidField,
    /// A timestamp that cannot be read.
    InvalidTimestamp,
    /// A timestamp too far after the time the message was received.
    FutureTimestamp,
    /// Over Segment's 32 KB message limit.
    MessageTooLarge,
    /// The store already holds 65,535 distinct event names.
    TooManyEventNames,
    /// A CSV row with another number of fields than the header.
    MalformedRow,
    /// For a person whose data was erased: kept without its content (only its messageId and
    /// type), so the person is not brought back.
    Erased,
    /// Dated before the retention policy's cutoff (`retention.toml`): kept without its content,
    /// as the purge would have removed it.
    Expired,
}

impl Reason {
    /// The snake_case code, as in the API.
    pub fn code(self) -> &'static str {
        match self {
            Self::InvalidJson => "invalid_json",
            Self::NotAnObject => "not_an_object",
            Self::UnknownType => "unknown_type",
            Self::MissingIdentity => "missing_identity",
            Self::MissingEvent => "missing_event",
            Self::MissingPreviousId => "missing_previous_id",
            Self::MissingGroupId => "missing_group_id",
            Self::InvalidField => "invalid_field",
            Self::InvalidTimestamp => "invalid_timestamp",
            Self::FutureTimestamp => "future_timestamp",
            Self::MessageTooLarge => "message_too_large",
            Self::TooManyEventNames => "too_many_event_names",
            Self::MalformedRow => "malformed_row",
            Self::Erased => "erased",
            Self::Expired => "expired",
        }
    }
}

/// Anomaly flags kept on accepted events (one bit each). Flagged events stay in the store and the
/// timeline; scores exclude them by default.
pub mod flags {
    /// Time on page over [`super::LONG_TIME_ON_PAGE_S`].
    pub const LONG_TIME_ON_PAGE: u8 = 1;
    /// Part of a burst: more than [`super::BURST_EVENTS`] events of one profile within
    /// [`super::BURST_WINDOW_S`] seconds.
    pub const BURST: u8 = 2;

    /// Every flag with its API name.
    pub const ALL: [(u8, &str); 2] = [(LONG_TIME_ON_PAGE, "long_time_on_page"), (BURST, "burst")];

    /// The API names of the flags set in `bits`.
    pub fn names(bits: u8) -> Vec<&'static str> {
        ALL.iter()
            .filter(|(bit, _)| bits & bit != 0)
            .map(|(_, name)| *name)
            .collect()
    }
}

/// Time on page above which an event is flagged: four hours.
pub const LONG_TIME_ON_PAGE_S: f64 = 4.0 * 3600.0;
/// A profile sending more than this many events ...
pub const BURST_EVENTS: usize = 60;
/// ... within this many seconds is bursting (a bot, a replay loop, a broken client).
pub const BURST_WINDOW_S: u32 = 60;

/// Counters for one source (`http`, `import`, `replay`).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct SourceCounters {
    pub received: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub quarantined: u64,
}

/// Everything counted since the store was created. Persisted with every batch.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct QualityCounters {
    pub received: u64,
    pub accepted: u64,
    pub duplicates: u64,
    /// Every message ever quarantined, by reason (replayed ones included).
    pub quarantined_by_reason: BTreeMap<Reason, u64>,
    /// Accepted events carrying each anomaly flag.
    pub anomalies_by_flag: BTreeMap<String, u64>,
    /// Implicit merges refused because both profiles carry a different userId.
    pub identity_conflicts: u64,
    pub by_source: BTreeMap<String, SourceCounters>,
}

impl QualityCounters {
    /// Counts one received message from `source`.
    pub fn received(&mut self, source: &str) {
        self.received += 1;
        self.source(source).received += 1;
    }

    pub fn accepted(&mut self, source: &str, flag_bits: u8) {
        self.accepted += 1;
        self.source(source).accepted += 1;
        for name in flags::names(flag_bits) {
            *self.anomalies_by_flag.entry(name.to_string()).or_default() += 1;
        }
    }

    pub fn duplicate(&mut self, source: &str) {
        self.duplicates += 1;
        self.source(source).duplicates += 1;
    }

    pub fn quarantined(&mut self, source: &str, reason: Reason) {
        *self.quarantined_by_reason.entry(reason).or_default() += 1;
        self.source(source).quarantined += 1;
    }

    fn source(&mut self, source: &str) -> &mut SourceCounters {
        // Looked up first: this runs several times per message, `entry` would allocate each time.
        if !self.by_source.contains_key(source) {
            self.by_source
                .insert(source.to_string(), SourceCounters::default());
        }
        self.by_source.get_mut(source).expect("just inserted")
    }
}
