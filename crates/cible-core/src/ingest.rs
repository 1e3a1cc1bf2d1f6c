//! Ingestion: messages prepared off the writer ([`Incoming`], [`Prepared`]), then, under the
//! writer lock, deduplicated, quarantined or accepted, identities resolved, dictionary ids and
//! anomaly flags assigned, and everything written as one atomic fjall batch (`Tx`). The writer's
//! state ([`State`]) lives here; `engine/ingest.rs` takes its lock, commits the batch and hands
//! the touched profiles to the segment worker once the lock is released.

use std::hash::{BuildHasher, Hasher};

use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::{Result, corrupt};
use crate::hot::{HotStore, NO_KEY, NO_NAME};
use crate::identity::{self, Graph, Plan, Target};
use crate::message::{Message, MessageType, Rejection, is_column_property};
use crate::quality::QualityCounters;
use crate::quality::{self, Reason, flags};
use crate::records::to_json;
use crate::records::{BatchOutcome, MergeRecord, ProfileRecord, QuarantineNote, QuarantineRecord};
use crate::seen::SeenSet;
use crate::store::{EventEntry, HotRecord, Store, event_key, key_of, merged_into_key, profile_key};

/// When a batch counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk (fsync) before `ingest` returns: what an acknowledgement promises.
    Sync,
    /// Handed to the OS; survives a process crash but not a power loss; synced at the end.
    Buffered,
    /// [`Durability::Buffered`], and the events' entries and messageIds are written as sorted
    /// tables after the batch commits, around fjall's journal and memtables (bulk import).
    Bulk,
}

/// A message offered to `Engine::ingest`.
#[derive(Debug, Clone)]
pub struct Incoming {
    pub parsed: std::result::Result<Prepared, Rejection>,
    /// Set when the message is replayed from quarantine: the record to drop once it is accepted.
    pub replay_of: Option<Replay>,
}

impl Incoming {
    /// Wraps a parsed message, preparing it for the writer now: call this on parsing threads,
    /// so that serialization and freeing the parsed JSON happen there, not on the one writer.
    pub fn new(parsed: std::result::Result<Message, Rejection>, replay_of: Option<Replay>) -> Self {
        Self {
            parsed: parsed.map(Prepared::from_message),
            replay_of,
        }
    }
}

/// What the writer needs of an accepted message, and its serialized form.
#[derive(Debug, Clone)]
pub struct Prepared {
    kind: MessageType,
    message_id: String,
    timestamp: i64,
    user_id: Option<String>,
    anonymous_id: Option<String>,
    previous_id: Option<String>,
    email: Option<String>,
    /// The behavioural event name.
    event: Option<String>,
    /// Identify traits (empty for other types).
    traits: serde_json::Map<String, Value>,
    /// Indexes in `KEY_PROPERTIES` of the key properties present, in that order, and their
    /// text when it is text. The first is the hot row's key.
    keys: Vec<(u8, Option<String>)>,
    /// Index in `VALUE_PROPERTIES` of the numeric property, and its number when it reads as one.
    value: Option<(u8, Option<f64>)>,
    long_time_on_page: bool,
    /// What consent reads of the message's context (`context.consent`, `ip`, `userAgent`),
    /// kept only for messages that may carry consent ([`crate::consent::may_carry`]).
    consent: Option<Box<ConsentContext>>,
    /// The message serialized for the store, without anomaly flags: its codec form, or packed.
    body: Vec<u8>,
    /// Whether `body` was offered to the packer already (packed, or kept as a sample).
    offered: bool,
}

/// See [`Prepared::consent`].
#[derive(Debug, Clone)]
struct ConsentContext {
    consent: Option<serde_json::Map<String, Value>>,
    ip: Option<String>,
    user_agent: Option<String>,
}

impl Prepared {
    /// The consent changes the message carries, arrived by `channel`.
    pub(crate) fn consent_changes(
        &self,
        purposes: &crate::consent::Purposes,
        channel: &str,
    ) -> Vec<crate::consent::ConsentChange> {
        let Some(context) = &self.consent else {
            return Vec::new();
        };
        purposes.changes(
            &crate::consent::ConsentInput {
                kind: self.kind,
                event: self.event.as_deref(),
                traits: &self.traits,
                consent: context.consent.as_ref(),
                ip: context.ip.as_deref(),
                user_agent: context.user_agent.as_deref(),
                at: self.timestamp,
                message_id: &self.message_id,
            },
            channel,
        )
    }

    fn from_message(mut message: Message) -> Self {
        let body = crate::codec::encode(&message);
        let consent = crate::consent::may_carry(&message).then(|| {
            let text = |field: &str| {
                message
                    .context
                    .get(field)
                    .and_then(Value::as_str)
                    .map(str::to_string)
            };
            Box::new(ConsentContext {
                consent: message
                    .context
                    .get("consent")
                    .and_then(Value::as_object)
                    .cloned(),
                ip: text("ip"),
                user_agent: text("userAgent"),
            })
        });
        let traits = if message.kind == MessageType::Identify {
            std::mem::take(&mut message.traits)
        } else {
            serde_json::Map::new()
        };
        Self {
            kind: message.kind,
            event: message.behavioral_name().map(str::to_string),
            keys: message
                .key_properties()
                .map(|(index, text)| (index, text.map(str::to_string)))
                .collect(),
            value: message.numeric_value(),
            long_time_on_page: message.kind.is_behavioral()
                && message
                    .duration_s()
                    .is_some_and(|d| d > quality::LONG_TIME_ON_PAGE_S),
            timestamp: message.timestamp,
            message_id: message.message_id,
            user_id: message.user_id,
            anonymous_id: message.anonymous_id,
            previous_id: message.previous_id,
            email: message.email,
            traits,
            consent,
            body,
            offered: false,
        }
    }
}

/// A quarantine record being replayed.
#[derive(Debug, Clone, Copy)]
pub struct Replay {
    pub id: u64,
    /// Its [`quarantine_key`].
    pub key: [u8; 16],
}

/// The dedup key of a quarantined message: a hash of its raw text, so that sending or importing
/// the same bad message again does not quarantine it twice.
pub fn quarantine_key(raw: &str) -> [u8; 16] {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(raw.as_bytes());
    digest[..16].try_into().expect("16 bytes of 32")
}

impl Incoming {
    /// Packs the stored form of an accepted message (see [`crate::packing`]). The writer packs
    /// what was not, outside its lock; parsing threads that call this spare it that work.
    pub fn pack(&mut self, packer: &crate::packing::Packer) {
        if let Ok(prepared) = &mut self.parsed
            && !prepared.offered
        {
            packer.pack(&mut prepared.body);
            prepared.offered = true;
        }
    }
}

impl From<std::result::Result<Message, Rejection>> for Incoming {
    fn from(parsed: std::result::Result<Message, Rejection>) -> Self {
        Self::new(parsed, None)
    }
}

/// Hash of a messageId for the in-memory dedup set.
pub fn message_hash(message_id: &str) -> u64 {
    let mut hasher = FxBuildHasher.build_hasher();
    hasher.write(message_id.as_bytes());
    hasher.finish()
}

/// Adds `"flags": N` to a serialized message (serialized before its flags were known).
fn with_flags(mut body: Vec<u8>, flags: u8) -> Vec<u8> {
    if let Some(byte) = body.get_mut(crate::codec::FLAGS_OFFSET) {
        *byte = flags;
    }
    body
}

pub(crate) struct PendingEvent {
    pub(crate) profile: u32,
    pub(crate) ts: i64,
    pub(crate) seq: u64,
    pub(crate) record: HotRecord,
    pub(crate) body: Vec<u8>,
    pub(crate) message_id: String,
}

/// One batch in the making.
pub(crate) struct Tx<'a> {
    pub(crate) store: &'a Store,
    pub(crate) state: &'a mut State,
    pub(crate) hot: &'a HotStore,
    pub(crate) source: &'a str,
    pub(crate) purposes: &'a crate::consent::Purposes,
    pub(crate) now: i64,
    pub(crate) batch: fjall::OwnedWriteBatch,
    pub(crate) dirty: FxHashMap<u32, ProfileRecord>,
    /// Profiles whose consents changed (merged-away ones too): their `consents` rows are
    /// rewritten, and the in-memory index after the commit ([`Tx::consents`]).
    pub(crate) consent_touched: FxHashSet<u32>,
    /// Written by `finish`: each touched profile's current consents, for the index.
    pub(crate) consents: Vec<crate::consent::Written>,
    /// What the audit log records of this batch (consent changes, merges): the action, the
    /// identifiers of the people concerned (hashed when recorded), details without them.
    pub(crate) audit: Vec<(crate::audit::Action, Vec<String>, Value)>,
    pub(crate) pending: Vec<PendingEvent>,
    pub(crate) batch_ids: FxHashSet<String>,
    pub(crate) batch_quarantine: FxHashSet<[u8; 16]>,
    /// Recent event times per profile within this batch, for burst detection.
    pub(crate) batch_times: FxHashMap<u32, Vec<u32>>,
    pub(crate) hot_merges: Vec<(u32, u32)>,
    /// Profiles created by this batch: every segment must evaluate them once (a rule such as
    /// `not did(...)` holds for people with no events of its names).
    pub(crate) created: Vec<u32>,
    pub(crate) outcome: BatchOutcome,
    /// Bulk mode (imports): new events' entries and messageIds wait in [`Bulk`] instead of
    /// going through the batch.
    pub(crate) bulk: bool,
    /// Events dated before this are expired under the retention policy: not stored.
    pub(crate) expired_before: Option<i64>,
}

/// What a bulk import (`Durability::Bulk`) writes in large steps instead of per batch: its
/// index entries (as sorted tables, around fjall's journal and memtables) and its profile
/// records, identifier links and merges (in one batch), every [`BULK_EVENTS`] events and at the
/// end (`Engine::flush_bulk`). Per batch, only the bodies (in the log), dictionaries,
/// quarantine records and counters are committed. Dedup, identity resolution and merges read
/// what waits here.
///
/// **Crash safety.** The first bulk batch after a flush commits [`BULK_KEY`] with the log
/// position where the waiting bodies start. A flush then commits, in one batch, the records,
/// the counters with the quality counts of the previous flush (the current ones under
/// [`BULK_COUNTERS_KEY`]) and the marker saying so with the first index entry's key; writes the
/// index tables; and removes the marker. At open, a marker left by a crash is resolved: index
/// written (its first entry is there) → the messageIds are redone and the current counters
/// stored; otherwise the bodies past the position are zeroed and their messageIds forgotten, so
/// that importing the file again adds each message once and counts it once (an import
/// acknowledges at its end). Only `cible import` writes bulk batches, holding the store alone,
/// and any other batch flushes first: the range holds bulk bodies only.
#[derive(Default)]
pub(crate) struct Bulk {
    /// (profile as resolved when written, time, seq, where its `events` value is in
    /// `entries`, its length).
    pub(crate) events: Vec<(u32, i64, u64, u32, u8)>,
    /// The `events` values end to end: one buffer, not an allocation per event (fresh pages
    /// for those were a third of the writer's time).
    pub(crate) entries: Vec<u8>,
    pub(crate) msgids: FxHashSet<String>,
    /// Where the waiting bodies start in the log.
    pub(crate) from: Option<crate::eventlog::Position>,
    /// The quality counters when the waiting entries started: what bulk batches store until
    /// the flush stores the current ones.
    pub(crate) quality: Option<crate::quality::QualityCounters>,
    /// Profile records, identifier links and merge records changed since the last flush, and
    /// the merged-away profiles whose stored entries move to their survivor: written by the
    /// flush, so that an import's journal holds almost nothing.
    pub(crate) profiles: FxHashMap<u32, ProfileRecord>,
    pub(crate) idents: FxHashMap<String, u32>,
    pub(crate) merges: Vec<(u64, u32, Vec<u8>)>,
    pub(crate) moves: Vec<u32>,
    /// Profiles whose `consents` rows the flush rewrites (from their waiting records).
    pub(crate) consent_touched: FxHashSet<u32>,
}

/// A batch's buffers, kept between batches for their capacity: allocated afresh for every
/// batch, they faulted in new pages for a quarter of an import's writer time.
#[derive(Default)]
pub(crate) struct Scratch {
    pub(crate) pending: Vec<PendingEvent>,
    pub(crate) batch_ids: FxHashSet<String>,
}

/// The meta key of a bulk import's entries not yet written (see [`Bulk`]).
pub const BULK_KEY: &str = "bulk_pending";

impl Bulk {
    #[cfg(test)]
    pub(crate) fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.from.is_none()
            && self.quality.is_none()
            && self.profiles.is_empty()
            && self.idents.is_empty()
            && self.merges.is_empty()
            && self.moves.is_empty()
            && self.consent_touched.is_empty()
    }
}

/// Waiting bulk entries beyond this are written out.
pub(crate) const BULK_EVENTS: usize = 2 << 20;

/// The meta key of the counters a flush stores once its tables are written (see [`Bulk`]).
pub const BULK_COUNTERS_KEY: &str = "bulk_counters";

/// [`BULK_KEY`]'s value: the log position; whether the flush committed the records (profiles,
/// identities, merges); and the first index entry's key, whose presence says the index tables
/// were written.
pub(crate) fn bulk_marker(
    from: crate::eventlog::Position,
    records_written: bool,
    probe: Option<&[u8]>,
) -> Vec<u8> {
    let mut out = from.encode().to_vec();
    out.push(u8::from(records_written));
    out.extend_from_slice(probe.unwrap_or_default());
    out
}

impl<'a> Tx<'a> {
    pub(crate) fn new(
        store: &'a Store,
        state: &'a mut State,
        hot: &'a HotStore,
        source: &'a str,
        purposes: &'a crate::consent::Purposes,
        now: i64,
    ) -> Self {
        let Scratch { pending, batch_ids } = std::mem::take(&mut state.scratch);
        Self {
            store,
            state,
            hot,
            source,
            purposes,
            now,
            batch: store.db.batch(),
            dirty: FxHashMap::default(),
            consent_touched: FxHashSet::default(),
            consents: Vec::new(),
            audit: Vec::new(),
            pending,
            batch_ids,
            batch_quarantine: FxHashSet::default(),
            batch_times: FxHashMap::default(),
            hot_merges: Vec::new(),
            created: Vec::new(),
            outcome: BatchOutcome::default(),
            bulk: false,
            expired_before: None,
        }
    }

    pub(crate) fn offer(&mut self, index: usize, item: Incoming) -> Result<()> {
        self.state.counters.quality.received(self.source);
        let message = match item.parsed {
            Ok(message) => message,
            Err(rejection) => {
                self.quarantine(index, rejection, item.replay_of)?;
                return Ok(());
            }
        };
        if self.is_duplicate(&message.message_id)? {
            self.state.counters.quality.duplicate(self.source);
            self.outcome.duplicates += 1;
            self.drop_replayed(item.replay_of);
            return Ok(());
        }
        let name = match &message.event {
            Some(name) => match self.name_id(name) {
                Some(id) => id,
                None => {
                    let detail = "the store already holds 65535 distinct event names".to_string();
                    let raw = (self.store.log.packer().unpack(&message.body).ok())
                        .and_then(|body| crate::codec::decode(&body).ok())
                        .map(|m| String::from_utf8_lossy(&to_json(&m)).into_owned())
                        .unwrap_or_default();
                    let rejection = Rejection {
                        reason: Reason::TooManyEventNames,
                        field: Some("event".into()),
                        detail,
                        raw,
                    };
                    self.quarantine(index, rejection, item.replay_of)?;
                    return Ok(());
                }
            },
            None => NO_NAME,
        };
        let refused = if self.names_erased(&message) {
            Some((
                Reason::Erased,
                None,
                "the message names a person whose data was erased; its content is not kept".into(),
            ))
        } else {
            self.expired_before
                .filter(|cutoff| message.timestamp < *cutoff)
                .map(|cutoff| {
                    let detail = format!(
                        "dated before {}, the retention policy's cutoff (retention.toml); its content is not kept",
                        crate::time::format_ms(cutoff)
                    );
                    (Reason::Expired, Some("timestamp".to_string()), detail)
                })
        };
        if let Some((reason, field, detail)) = refused {
            // Quarantined without its content: only what names the message.
            let raw = serde_json::json!({"messageId": message.message_id, "type": message.kind})
                .to_string();
            let rejection = Rejection {
                reason,
                field,
                detail,
                raw,
            };
            self.quarantine(index, rejection, item.replay_of)?;
            return Ok(());
        }
        let profile = self.resolve(&message)?;
        self.drop_replayed(item.replay_of);
        self.accept(profile, name, message)
    }

    /// Whether one of the message's identifiers belongs to an erased person.
    fn names_erased(&self, message: &Prepared) -> bool {
        if self.state.suppressed.is_empty() {
            return false;
        }
        let secret = &self.state.secret;
        let user = message.user_id.iter().chain(&message.previous_id);
        user.map(|id| identity::user_ident(id))
            .chain(
                message
                    .previous_id
                    .iter()
                    .map(|id| identity::anonymous_ident(id)),
            )
            .chain(
                message
                    .anonymous_id
                    .iter()
                    .map(|id| identity::anonymous_ident(id)),
            )
            .chain(message.email.iter().map(|e| identity::email_ident(e)))
            .any(|ident| {
                self.state
                    .suppressed
                    .contains(&crate::audit::subject(secret, &ident))
            })
    }

    fn drop_replayed(&mut self, replay_of: Option<Replay>) {
        if let Some(replay) = replay_of {
            self.batch
                .remove(&self.store.quarantine, replay.id.to_be_bytes());
            self.batch.remove(&self.store.qkeys, replay.key);
        }
    }

    fn quarantine(
        &mut self,
        index: usize,
        rejection: Rejection,
        replay_of: Option<Replay>,
    ) -> Result<()> {
        self.outcome.quarantined.push(QuarantineNote {
            index,
            reason: rejection.reason,
            field: rejection.field.clone(),
            detail: rejection.detail.clone(),
        });
        if replay_of.is_some() {
            // Still rejected: the original record stays where it is.
            return Ok(());
        }
        // Counted every time it is received (received = accepted + duplicates + quarantined),
        // stored once: the same raw bad message already waiting in quarantine is not kept twice.
        self.state
            .counters
            .quality
            .quarantined(self.source, rejection.reason);
        let key = quarantine_key(&rejection.raw);
        if !self.batch_quarantine.insert(key) || self.store.qkeys.contains_key(key)? {
            return Ok(());
        }
        let id = self.state.counters.next_quarantine;
        self.state.counters.next_quarantine += 1;
        let record = QuarantineRecord {
            id,
            reason: rejection.reason,
            field: rejection.field,
            detail: rejection.detail,
            source: self.source.to_string(),
            received_at: self.now,
            raw: rejection.raw,
        };
        self.batch
            .insert(&self.store.quarantine, id.to_be_bytes(), to_json(&record));
        self.batch.insert(&self.store.qkeys, key, id.to_be_bytes());
        Ok(())
    }

    fn is_duplicate(&mut self, message_id: &str) -> Result<bool> {
        if self.batch_ids.contains(message_id) {
            return Ok(true);
        }
        let seen = self.state.seen.contains(message_hash(message_id))
            && (self.state.bulk.msgids.contains(message_id)
                || self.store.msgids.contains_key(message_id.as_bytes())?);
        Ok(seen)
    }

    fn name_id(&mut self, name: &str) -> Option<u16> {
        if let Some(id) = self.state.names.ids.get(name) {
            return Some(*id as u16);
        }
        let id = self.state.names.texts.len();
        if id >= usize::from(NO_NAME) {
            return None;
        }
        self.add_dict_entry(NAME_PREFIX, name, id as u32);
        Some(id as u16)
    }

    fn key_id(&mut self, text: &str) -> u32 {
        if let Some(id) = self.state.keys.ids.get(text) {
            return *id;
        }
        let id = self.state.keys.texts.len() as u32;
        self.add_dict_entry(KEY_PREFIX, text, id);
        id
    }

    fn add_dict_entry(&mut self, prefix: u8, text: &str, id: u32) {
        let dict = if prefix == NAME_PREFIX {
            &mut self.state.names
        } else {
            &mut self.state.keys
        };
        dict.insert_loaded(text.to_string(), id);
        let mut key = Vec::with_capacity(text.len() + 1);
        key.push(prefix);
        key.extend_from_slice(text.as_bytes());
        self.batch.insert(&self.store.dict, key, id.to_be_bytes());
    }

    fn record(&mut self, profile: u32) -> Result<&mut ProfileRecord> {
        if !self.dirty.contains_key(&profile) {
            // A bulk import's newest records wait in memory until the flush.
            let waiting = self.state.bulk.profiles.remove(&profile);
            let record = match waiting {
                Some(record) => record,
                None => read_profile(self.store, profile)?.ok_or_else(|| {
                    corrupt("profiles", format!("profile {profile} has no record"))
                })?,
            };
            self.dirty.insert(profile, record);
        }
        Ok(self.dirty.get_mut(&profile).expect("just inserted"))
    }

    /// Plans and carries out identity resolution; returns the message's profile.
    fn resolve(&mut self, message: &Prepared) -> Result<u32> {
        let plan = match (message.kind, &message.previous_id, &message.user_id) {
            (MessageType::Alias, Some(previous), Some(user)) => {
                identity::plan_alias(self.state, previous, user)
            }
            _ => identity::plan_message(
                self.state,
                message.user_id.as_deref(),
                message.anonymous_id.as_deref(),
                message.email.as_deref(),
            ),
        };
        let Plan {
            target,
            merges,
            attach,
            conflicts,
        } = plan;
        self.outcome.identity_conflicts += conflicts.len() as u64;
        self.state.counters.quality.identity_conflicts += conflicts.len() as u64;
        for conflict in &conflicts {
            tracing::debug!(conflict = conflict.as_str(), "identity link refused");
        }
        for merge in merges {
            self.merge(merge.from, merge.into, merge.cause)?;
        }
        let profile = match target {
            Target::Existing(profile) => self.state.find(profile),
            Target::New => self.create_profile(),
        };
        for ident in attach {
            self.state.idents.insert(ident.clone(), profile);
            self.state.profiles[profile as usize].has_user |= ident.starts_with("u:");
            self.link(&ident, profile);
            self.record(profile)?.identifiers.push(ident);
        }
        if message.kind == MessageType::Identify && !message.traits.is_empty() {
            self.record(profile)?
                .apply_traits(&message.traits, message.timestamp);
        }
        let changes = message.consent_changes(self.purposes, self.source);
        if !changes.is_empty() {
            self.apply_consents(profile, changes)?;
        }
        Ok(profile)
    }

    /// Adds consent changes to a profile's history; those that repeat its current state are
    /// dropped without reading its record.
    fn apply_consents(
        &mut self,
        profile: u32,
        changes: Vec<crate::consent::ConsentChange>,
    ) -> Result<()> {
        let bits = self.state.profiles[profile as usize].consent;
        let purposes = self.purposes;
        let news: Vec<_> = changes
            .into_iter()
            .filter(|c| {
                !purposes
                    .index(&c.purpose)
                    .is_some_and(|i| bits.repeats(i, c))
            })
            .collect();
        if news.is_empty() {
            return Ok(());
        }
        let bulk = self.bulk;
        let record = self.record(profile)?;
        if !bulk {
            let detail = serde_json::json!({
                "profile": profile,
                "changes": news.iter().map(|c| serde_json::json!({"purpose": c.purpose,
                    "granted": c.granted, "basis": c.basis, "source": c.source, "at": c.at}))
                    .collect::<Vec<_>>(),
            });
            let identifiers = record.identifiers.clone();
            self.audit
                .push((crate::audit::Action::ConsentChange, identifiers, detail));
        }
        let record = self.record(profile)?;
        for change in news {
            record.consents.apply(change);
        }
        let bits = purposes.bits(&record.consents);
        self.state.profiles[profile as usize].consent = bits;
        self.consent_touched.insert(profile);
        Ok(())
    }

    /// Records that `ident` leads to `profile` (in the batch, or for a bulk import's flush).
    fn link(&mut self, ident: &str, profile: u32) {
        if self.bulk {
            self.state.bulk.idents.insert(ident.to_string(), profile);
        } else {
            self.batch
                .insert(&self.store.idents, ident.as_bytes(), profile.to_be_bytes());
        }
    }

    fn create_profile(&mut self) -> u32 {
        let profile = self.state.counters.next_profile;
        self.state.counters.next_profile += 1;
        self.state.profiles.push(ProfileMeta {
            alive: true,
            ..ProfileMeta::default()
        });
        self.dirty.insert(
            profile,
            ProfileRecord {
                id: profile,
                created_at: self.now,
                ..Default::default()
            },
        );
        self.outcome.profiles_created += 1;
        self.created.push(profile);
        profile
    }

    fn merge(&mut self, from: u32, into: u32, cause: String) -> Result<()> {
        let absorbed = std::mem::take(self.record(from)?);
        let identifiers = absorbed.identifiers.clone();
        for ident in &identifiers {
            self.state.idents.insert(ident.clone(), into);
            self.link(ident, into);
        }
        let from_has_user = self.state.profiles[from as usize].has_user;
        self.state.profiles[from as usize].merged_into = Some(into);
        self.state.profiles[from as usize].alive = false;
        self.state.profiles[into as usize].has_user |= from_has_user;
        let restored_id = absorbed.id;
        let created_at = absorbed.created_at;
        let had_consents = !absorbed.consents.is_empty();
        self.record(into)?.absorb(absorbed);
        if had_consents {
            let bits = self.purposes.bits(&self.record(into)?.consents);
            self.state.profiles[into as usize].consent = bits;
            self.state.profiles[from as usize].consent = Default::default();
            self.consent_touched.extend([from, into]);
        }
        *self.record(from)? = ProfileRecord {
            id: restored_id,
            created_at,
            merged_into: Some(into),
            ..Default::default()
        };
        let id = self.state.counters.next_merge;
        self.state.counters.next_merge += 1;
        let record = MergeRecord {
            id,
            from,
            into,
            cause,
            at: self.now,
            identifiers,
            unmerged_at: None,
        };
        if self.bulk {
            self.state.bulk.merges.push((id, into, to_json(&record)));
        } else {
            self.batch
                .insert(&self.store.merges, id.to_be_bytes(), to_json(&record));
            self.batch
                .insert(&self.store.merged_into, merged_into_key(into, id), []);
        }
        if !self.bulk {
            // The survivor's identifiers, the absorbed ones among them.
            let concerned = self.record(into)?.identifiers.clone();
            self.audit.push((
                crate::audit::Action::Merge,
                concerned,
                serde_json::json!({"from": from, "into": into, "merge": id}),
            ));
        }
        self.hot_merges.push((from, into));
        if let Some(times) = self.batch_times.remove(&from) {
            self.batch_times.entry(into).or_default().extend(times);
        }
        self.outcome.profiles_merged += 1;
        Ok(())
    }

    fn accept(&mut self, profile: u32, name: u16, message: Prepared) -> Result<()> {
        let ts_s = message
            .timestamp
            .div_euclid(1000)
            .clamp(0, i64::from(u32::MAX)) as u32;
        let mut flag_bits = 0;
        if message.kind.is_behavioral() {
            if message.long_time_on_page {
                flag_bits |= flags::LONG_TIME_ON_PAGE;
            }
            let window_start = ts_s.saturating_sub(quality::BURST_WINDOW_S);
            let times = self.batch_times.entry(profile).or_default();
            let in_batch = times
                .iter()
                .filter(|t| (window_start..=ts_s).contains(*t))
                .count();
            times.push(ts_s);
            if times.len() > 4 * quality::BURST_EVENTS {
                times.drain(..times.len() - 2 * quality::BURST_EVENTS);
            }
            let stored = self.hot.count_between(profile, window_start, ts_s);
            if stored + in_batch >= quality::BURST_EVENTS {
                flag_bits |= flags::BURST;
            }
        }
        let mut keys = message
            .keys
            .iter()
            .enumerate()
            .filter_map(|(i, (index, text))| {
                // The first is the hot row's key; others only when a column may want them.
                if i > 0 && !is_column_property(usize::from(*index)) {
                    return None;
                }
                let id = text.as_deref().map_or(NO_KEY, |text| self.key_id(text));
                Some((*index, id))
            });
        let (key_index, key) = keys.next().unwrap_or((crate::hot::NO_PROPERTY, NO_KEY));
        let mut others = crate::hot::OtherKeys::default();
        for (index, id) in keys {
            others.push(
                index,
                if id == NO_KEY {
                    crate::hot::NOT_TEXT
                } else {
                    id
                },
            );
        }
        let (value_index, value) = match message.value {
            Some((index, number)) => (index, number.map_or(f32::NAN, |v| v as f32)),
            None => (crate::hot::NO_PROPERTY, f32::NAN),
        };
        let record = HotRecord {
            name,
            flags: crate::hot::pack_flags(flag_bits, value_index),
            kind: crate::hot::pack_kind(message.kind.code(), key_index),
            key,
            value,
            message_hash: message_hash(&message.message_id),
            others,
        };
        let seq = self.state.counters.next_seq;
        self.state.counters.next_seq += 1;
        self.state.counters.quality.accepted(self.source, flag_bits);
        self.state.seen.insert(record.message_hash);
        self.batch_ids.insert(message.message_id.clone());
        self.outcome.accepted += 1;
        self.pending.push(PendingEvent {
            profile,
            ts: message.timestamp,
            seq,
            record,
            body: with_flags(message.body, flag_bits),
            message_id: message.message_id,
        });
        Ok(())
    }

    /// Writes everything into the batch: committed events of merged-away profiles move under
    /// their survivor, new events go under their final profile.
    pub(crate) fn finish(mut self) -> Result<Self> {
        let mut moved = FxHashSet::default();
        for &(from, _) in &self.hot_merges {
            if !moved.insert(from) {
                continue;
            }
            if self.bulk {
                self.state.bulk.moves.push(from);
                continue;
            }
            let survivor = self.state.find(from);
            for entry in self.store.events.prefix(profile_key(from)) {
                let (key, value) = entry.into_inner()?;
                let (_, ts, seq) = key_of("events", &key)?;
                let new_key = event_key(survivor, ts, seq);
                self.batch.remove(&self.store.events, key.clone());
                self.batch.insert(&self.store.events, new_key, value);
            }
        }
        // Bodies go to the event log once; the index entries point at them.
        if self.bulk
            && self.state.bulk.from.is_none()
            && !(self.pending.is_empty() && self.dirty.is_empty() && self.hot_merges.is_empty())
        {
            let from = self.store.log.head();
            let bulk = &mut self.state.bulk;
            bulk.from = Some(from);
            // Sized once per import: growing these by doubling faulted in fresh pages for a
            // fifth of the writer's time.
            bulk.events.reserve(BULK_EVENTS);
            bulk.entries.reserve(BULK_EVENTS * 40);
            bulk.msgids.reserve(BULK_EVENTS);
            self.batch
                .insert(&self.store.meta, BULK_KEY, bulk_marker(from, false, None));
        }
        let (locations, head) = self
            .store
            .log
            .append(self.pending.iter().map(|e| e.body.as_slice()))?;
        // A bulk batch commits the log's end now; any other batch after its redo record, which
        // the engine appends when the batch is complete.
        if self.bulk && !self.pending.is_empty() {
            self.store.commit_log_end(&mut self.batch, head);
        }
        if !self.pending.is_empty()
            && let Some(count) = self.store.log.packer().to_record()
        {
            self.batch
                .insert(&self.store.meta, crate::eventlog::DICTIONARIES_KEY, [count]);
        }
        for (event, location) in self.pending.iter_mut().zip(locations) {
            event.profile = self.state.find(event.profile);
            event.body = Vec::new();
            let key = event_key(event.profile, event.ts, event.seq);
            let entry = EventEntry {
                location,
                record: event.record,
            };
            if self.bulk {
                let bulk = &mut self.state.bulk;
                let at = bulk.entries.len();
                entry.encode_into(&mut bulk.entries);
                let len = (bulk.entries.len() - at) as u8;
                bulk.events
                    .push((event.profile, event.ts, event.seq, at as u32, len));
                bulk.msgids.insert(std::mem::take(&mut event.message_id));
            } else {
                self.batch.insert(&self.store.events, key, entry.encode());
                self.batch
                    .insert(&self.store.msgids, event.message_id.as_bytes(), []);
            }
        }
        if self.bulk {
            self.state
                .bulk
                .consent_touched
                .extend(self.consent_touched.drain());
        }
        for profile in std::mem::take(&mut self.consent_touched) {
            let consents = self
                .dirty
                .get(&profile)
                .map(|r| &r.consents)
                .ok_or_else(|| corrupt("profiles", format!("profile {profile} not rewritten")))?;
            let states = self
                .store
                .write_consents(&mut self.batch, profile, consents)?;
            self.consents.push((profile, states));
        }
        for (profile, record) in &self.dirty {
            if self.bulk {
                self.state.bulk.profiles.insert(*profile, record.clone());
            } else {
                self.batch
                    .insert(&self.store.profiles, profile_key(*profile), to_json(record));
            }
        }
        let counters = match &self.state.bulk.quality {
            // The quality counts as of the last flush: an import cut short before the next
            // one drops its events and must not leave them counted as accepted.
            Some(quality) => to_json(&Counters {
                quality: quality.clone(),
                ..self.state.counters.clone()
            }),
            None => to_json(&self.state.counters),
        };
        self.batch.insert(&self.store.meta, COUNTERS_KEY, counters);
        Ok(self)
    }
}

/// The writer's counters, stored under [`COUNTERS_KEY`].
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub(crate) struct Counters {
    pub(crate) next_seq: u64,
    pub(crate) next_profile: u32,
    pub(crate) next_merge: u64,
    pub(crate) next_quarantine: u64,
    pub(crate) quality: QualityCounters,
}

#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct ProfileMeta {
    pub(crate) merged_into: Option<u32>,
    pub(crate) has_user: bool,
    /// Holds identifiers (not merged away, not removed).
    pub(crate) alive: bool,
    /// Its current consents, compact (the history is in its record).
    pub(crate) consent: crate::consent::Bits,
}

/// A text dictionary with dense ids.
#[derive(Debug, Default)]
pub(crate) struct Dict {
    pub(crate) ids: FxHashMap<String, u32>,
    pub(crate) texts: Vec<String>,
}

impl Dict {
    pub(crate) fn insert_loaded(&mut self, text: String, id: u32) {
        let index = id as usize;
        if self.texts.len() <= index {
            self.texts.resize(index + 1, String::new());
        }
        self.texts[index] = text.clone();
        self.ids.insert(text, id);
    }
}

/// The writer's state, behind the writer lock: counters, the identity graph, profiles' liveness
/// and merges, the dedup set, the dictionaries, and a bulk import's waiting entries.
pub(crate) struct State {
    pub(crate) counters: Counters,
    pub(crate) idents: FxHashMap<String, u32>,
    pub(crate) profiles: Vec<ProfileMeta>,
    /// Hashes of every accepted messageId: a fast negative check before the `msgids` lookup.
    pub(crate) seen: SeenSet,
    /// A bulk import's index entries not yet written.
    pub(crate) bulk: Bulk,
    /// Buffers of the last batch, for the next one.
    pub(crate) scratch: Scratch,
    pub(crate) names: Dict,
    pub(crate) keys: Dict,
    /// Keyed hashes ([`crate::audit::subject`]) of the identifiers of erased people: a message
    /// naming one is quarantined as `erased`, without its content.
    pub(crate) suppressed: FxHashSet<String>,
    /// The key of those hashes (the audit log's secret).
    pub(crate) secret: Vec<u8>,
}

impl State {
    /// The live profile a (possibly merged-away) ordinal now lives in.
    pub(crate) fn find(&self, mut profile: u32) -> u32 {
        while let Some(into) = self
            .profiles
            .get(profile as usize)
            .and_then(|m| m.merged_into)
        {
            profile = into;
        }
        profile
    }
}

impl Graph for State {
    fn lookup(&self, ident: &str) -> Option<u32> {
        self.idents.get(ident).copied()
    }
    fn has_user(&self, profile: u32) -> bool {
        self.profiles
            .get(profile as usize)
            .is_some_and(|m| m.has_user)
    }
}

pub(crate) const COUNTERS_KEY: &str = "counters";
pub(crate) const NAME_PREFIX: u8 = b'n';
pub(crate) const KEY_PREFIX: u8 = b'k';

pub(crate) fn read_profile(store: &Store, profile: u32) -> Result<Option<ProfileRecord>> {
    match store.profiles.get(profile_key(profile))? {
        Some(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| corrupt("profiles", e))?,
        )),
        None => Ok(None),
    }
}
