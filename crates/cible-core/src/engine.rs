//! The engine: the one writer of the durable store, owner of the identity graph, the dedup set,
//! the dictionaries and the hot store.
//!
//! **All writes go through [`Engine::ingest`] (or [`Engine::unmerge`]) under one mutex, and each
//! call is one atomic fjall batch.** In-memory state is changed only along with a batch; if a
//! commit fails the engine refuses further writes (the process must restart and reload), so
//! memory never disagrees with disk.
//!
//! Callers parse messages outside the lock (in parallel); the engine then dedups, resolves
//! identities, flags anomalies, and commits. Group commit is the caller's choice of batch size.

use std::collections::BTreeMap;
use std::hash::{BuildHasher, Hasher};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::{Level, OrderedMutex, OrderedRwLock};
use rustc_hash::{FxBuildHasher, FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::hot::{HotStore, NO_KEY, NO_NAME};
use crate::identity::{self, Graph, Plan, Target};
use crate::keys::{KeyKind, KeyRecord, key_hash, new_key};
use crate::message::{
    Message, MessageType, ParseContext, Rejection, is_column_property, parse_message_text,
};
use crate::quality::{self, QualityCounters, Reason, flags};
use crate::seen::SeenSet;
use crate::store::{HotRecord, Store, StoreError, decode_event_key, event_key, profile_key};
use rayon::prelude::*;

/// Errors of the engine. User mistakes (`NotFound`, `Invalid`) are separated from failures of the
/// machine (`Store`, `Poisoned`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store refused a write earlier ({0}); restart cible to recover from disk")]
    Poisoned(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the work was cancelled (its client left, or the server is stopping)")]
    Cancelled,
}

impl From<fjall::Error> for EngineError {
    fn from(error: fjall::Error) -> Self {
        Self::Store(StoreError::Engine(error))
    }
}

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// When a batch counts as done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Durability {
    /// Synced to disk (fsync) before `ingest` returns: what an acknowledgement promises.
    Sync,
    /// Handed to the OS; survives a process crash but not a power loss. Bulk import uses it and
    /// syncs at the end.
    Buffered,
}

/// A message offered to [`Engine::ingest`].
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
    /// The message serialized for the store, without anomaly flags.
    body: Vec<u8>,
}

impl Prepared {
    fn from_message(mut message: Message) -> Self {
        let body = to_json(&message);
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
            body,
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

impl From<std::result::Result<Message, Rejection>> for Incoming {
    fn from(parsed: std::result::Result<Message, Rejection>) -> Self {
        Self::new(parsed, None)
    }
}

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
}

impl ProfileRecord {
    /// Applies an identify call's traits: a trait changes only if the message is not older
    /// than the one that set it.
    fn apply_traits(&mut self, traits: &serde_json::Map<String, Value>, at: i64) {
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

    fn absorb(&mut self, other: ProfileRecord) {
        self.identifiers.extend(other.identifiers);
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

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
struct Counters {
    next_seq: u64,
    next_profile: u32,
    next_merge: u64,
    next_quarantine: u64,
    quality: QualityCounters,
}

#[derive(Debug, Clone, Copy, Default)]
struct ProfileMeta {
    merged_into: Option<u32>,
    has_user: bool,
    /// Holds identifiers (not merged away, not removed).
    alive: bool,
}

/// A text dictionary with dense ids.
#[derive(Debug, Default)]
struct Dict {
    ids: FxHashMap<String, u32>,
    texts: Vec<String>,
}

impl Dict {
    fn insert_loaded(&mut self, text: String, id: u32) {
        let index = id as usize;
        if self.texts.len() <= index {
            self.texts.resize(index + 1, String::new());
        }
        self.texts[index] = text.clone();
        self.ids.insert(text, id);
    }
}

struct State {
    counters: Counters,
    idents: FxHashMap<String, u32>,
    profiles: Vec<ProfileMeta>,
    /// Hashes of every accepted messageId: a fast negative check before the `msgids` lookup.
    seen: SeenSet,
    names: Dict,
    keys: Dict,
}

impl State {
    /// The live profile a (possibly merged-away) ordinal now lives in.
    fn find(&self, mut profile: u32) -> u32 {
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

/// Hash of a messageId for the in-memory dedup set.
pub fn message_hash(message_id: &str) -> u64 {
    let mut hasher = FxBuildHasher.build_hasher();
    hasher.write(message_id.as_bytes());
    hasher.finish()
}

const COUNTERS_KEY: &str = "counters";
/// Present when every `hot` row lists its other key properties (stores created since property
/// columns exist); older stores evaluate hidden key properties on full messages.
const HOT_OTHER_KEYS_KEY: &str = "hot_other_keys";
/// The key properties (indexes in `KEY_PROPERTIES`) that have a property column, JSON.
const COLUMNS_KEY: &str = "columns";
const NAME_PREFIX: u8 = b'n';
const KEY_PREFIX: u8 = b'k';

/// The engine. Cheap to share behind an `Arc`.
///
/// Its locks are taken in the order of [`crate::lock::Level`] (checked at every acquisition):
/// `segments` → `state` (the writer) → `hot` → `trait_columns` → caches → `work`.
pub struct Engine {
    pub(crate) store: Store,
    state: OrderedMutex<State>,
    pub(crate) hot: OrderedRwLock<HotStore>,
    api_keys: OrderedRwLock<FxHashMap<String, KeyRecord>>,
    poisoned: AtomicBool,
    /// The segment worker's state: live segments, timers and the change feed's writer.
    pub(crate) segments: OrderedMutex<crate::segment::live::SegmentsState>,
    /// Committed batches waiting for the segment worker.
    pub(crate) work: crate::segment::worker::WorkQueue,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Profiles evaluated by the segment backfill under way.
    pub(crate) backfill_progress: std::sync::atomic::AtomicU64,
    /// Whether the `hot` rows list their other key properties (property columns can be built).
    columns_supported: bool,
    /// Opened with [`Engine::open_light`]: read-only, profiles loaded on demand.
    light: bool,
    /// Computed traits: the configuration, and the calibration and product model once known.
    pub(crate) trait_config: crate::computed::config::TraitConfig,
    pub(crate) calibration: OrderedRwLock<Option<Arc<crate::computed::calibrate::Calibration>>>,
    pub(crate) product_model: OrderedRwLock<Option<Arc<crate::computed::recommend::ProductModel>>>,
    /// The active trained models, loaded from `meta` on first use.
    pub(crate) models: OrderedRwLock<Option<Arc<crate::models::saved::ModelSet>>>,
    /// The traits rules read, by profile ordinal (see [`crate::trait_columns`]).
    pub(crate) trait_columns: OrderedRwLock<crate::trait_columns::TraitColumns>,
}

/// Sizes of what was loaded at start.
#[derive(Debug, Clone, Default, Serialize)]
pub struct LoadStats {
    pub events: usize,
    pub profiles: usize,
    pub identifiers: usize,
}

impl Engine {
    /// Opens the store in `dir` and rebuilds the in-memory state from it.
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with(dir, false)
    }

    /// Opens the store for reading a few things fast, whatever its size: neither the hot store
    /// nor the identity graph is loaded. Profiles are looked up in the store and their hot rows
    /// loaded one by one ([`Engine::lookup_profile`]); writes are refused. For CLI commands
    /// such as `segment list` and `profile show`.
    pub fn open_light(dir: &Path) -> Result<Self> {
        Self::open_with(dir, true)
    }

    /// Whether this engine was opened with [`Engine::open_light`].
    pub fn is_light(&self) -> bool {
        self.light
    }

    fn open_with(dir: &Path, light: bool) -> Result<Self> {
        let trait_config =
            match std::fs::read_to_string(dir.join(crate::computed::config::FILE_NAME)) {
                Ok(text) => {
                    crate::computed::config::TraitConfig::from_toml(&text).map_err(|reason| {
                        EngineError::Invalid(format!(
                            "{}: {reason}",
                            dir.join(crate::computed::config::FILE_NAME).display()
                        ))
                    })?
                }
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => Default::default(),
                Err(error) => {
                    return Err(EngineError::Invalid(format!(
                        "{}: {error}",
                        dir.join(crate::computed::config::FILE_NAME).display()
                    )));
                }
            };
        let store = Store::open(dir)?;
        check_schema(&store)?;
        let counters: Counters = match store.meta.get(COUNTERS_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt("meta", e))?,
            None => Counters::default(),
        };
        let mut state = State {
            profiles: vec![ProfileMeta::default(); counters.next_profile as usize],
            counters,
            idents: FxHashMap::default(),
            seen: SeenSet::default(),
            names: Dict::default(),
            keys: Dict::default(),
        };
        for entry in store.idents.iter().take(if light { 0 } else { usize::MAX }) {
            let (key, value) = entry.into_inner()?;
            let ident = String::from_utf8_lossy(&key).into_owned();
            let profile = u32::from_be_bytes(
                value
                    .as_ref()
                    .try_into()
                    .map_err(|e| corrupt("idents", e))?,
            );
            if let Some(meta) = state.profiles.get_mut(profile as usize) {
                meta.has_user |= ident.starts_with("u:");
                meta.alive = true;
            }
            state.idents.insert(ident, profile);
        }
        for entry in store.merges.iter().take(if light { 0 } else { usize::MAX }) {
            let (_, value) = entry.into_inner()?;
            let merge: MergeRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("merges", e))?;
            if let Some(meta) = state.profiles.get_mut(merge.from as usize) {
                meta.merged_into = if merge.unmerged_at.is_none() {
                    Some(merge.into)
                } else {
                    None
                };
            }
        }
        for entry in store.dict.iter() {
            let (key, value) = entry.into_inner()?;
            let id = u32::from_be_bytes(value.as_ref().try_into().map_err(|e| corrupt("dict", e))?);
            let text = String::from_utf8_lossy(&key[1..]).into_owned();
            match key.first() {
                Some(&NAME_PREFIX) => state.names.insert_loaded(text, id),
                _ => state.keys.insert_loaded(text, id),
            }
        }
        let columns_supported = if store.meta.contains_key(HOT_OTHER_KEYS_KEY)? {
            true
        } else if state.counters.next_seq == 0 {
            store.meta.insert(HOT_OTHER_KEYS_KEY, b"1")?;
            true
        } else {
            false
        };
        let columns: Vec<u8> = match store.meta.get(COLUMNS_KEY)? {
            Some(bytes) if columns_supported => {
                serde_json::from_slice(&bytes).map_err(|e| corrupt("meta", e))?
            }
            _ => Vec::new(),
        };
        let (hot, hashes) = if light {
            (HotStore::with_columns(&columns), Vec::new())
        } else {
            load_hot(&store, &[(0, state.counters.next_profile)], &columns)?
        };
        state.seen = SeenSet::from_hashes(hashes);
        let mut api_keys = FxHashMap::default();
        for entry in store.keys.iter() {
            let (key, value) = entry.into_inner()?;
            let record: KeyRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("keys", e))?;
            api_keys.insert(String::from_utf8_lossy(&key).into_owned(), record);
        }
        let feed = crate::segment::feed::FeedWriter::open(&store)?;
        let metrics = crate::metrics::Metrics::default();
        metrics.feed_head.store(feed.head(), Ordering::Relaxed);
        Ok(Self {
            store,
            state: OrderedMutex::new(Level::Writer, state),
            hot: OrderedRwLock::new(Level::Hot, hot),
            api_keys: OrderedRwLock::new(Level::Cache, api_keys),
            poisoned: AtomicBool::new(false),
            segments: OrderedMutex::new(
                Level::Segments,
                crate::segment::live::SegmentsState::new(feed),
            ),
            work: crate::segment::worker::WorkQueue::default(),
            metrics,
            backfill_progress: std::sync::atomic::AtomicU64::new(0),
            columns_supported,
            light,
            trait_config,
            calibration: OrderedRwLock::new(Level::Cache, None),
            product_model: OrderedRwLock::new(Level::Cache, None),
            models: OrderedRwLock::new(Level::Cache, None),
            trait_columns: OrderedRwLock::new(Level::TraitColumns, Default::default()),
        })
    }

    /// Keeps in memory the traits with these names, for rule evaluation.
    pub(crate) fn ensure_trait_columns(&self, names: &[String]) -> Result<()> {
        let missing = |columns: &crate::trait_columns::TraitColumns| -> Vec<String> {
            let mut missing: Vec<String> =
                names.iter().filter(|n| !columns.has(n)).cloned().collect();
            missing.sort();
            missing.dedup();
            missing
        };
        if missing(&self.trait_columns.read()).is_empty() {
            return Ok(());
        }
        // The writer lock: no profile record changes while the columns are read.
        let state = self.state.lock();
        let missing = missing(&self.trait_columns.read());
        let n = state.profiles.len();
        let mut values: Vec<Vec<Option<TraitValue>>> = vec![vec![None; n]; missing.len()];
        for entry in self.store.profiles.iter() {
            let (key, value) = entry.into_inner()?;
            let profile = u32::from_be_bytes(
                key.as_ref()
                    .try_into()
                    .map_err(|e| corrupt("profiles", e))?,
            );
            if !state
                .profiles
                .get(profile as usize)
                .is_some_and(|m| m.alive)
            {
                continue;
            }
            let record: ProfileRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("profiles", e))?;
            for (name, column) in missing.iter().zip(values.iter_mut()) {
                column[profile as usize] = record.traits.get(name).cloned();
            }
        }
        let mut columns = self.trait_columns.write();
        for (name, column) in missing.into_iter().zip(values) {
            columns.add(name, column);
        }
        Ok(())
    }

    /// Builds the property columns these rules' filters need: a condition on a key property
    /// that another key hides in some hot rows (`category` behind `product_id`) would otherwise
    /// read full messages. Built once from the `hot` rows, then kept up to date on ingest and
    /// rebuilt at start.
    pub fn ensure_columns<'a>(
        &self,
        exprs: impl IntoIterator<Item = &'a cible_lang::Expr>,
    ) -> Result<()> {
        let mut wanted: Vec<u8> = Vec::new();
        for expr in exprs {
            for filter in cible_lang::check::event_filters(expr) {
                for condition in &filter.conditions {
                    if let Some(index) = crate::message::KEY_PROPERTIES
                        .iter()
                        .position(|p| *p == condition.property)
                    {
                        wanted.push(index as u8);
                    }
                }
            }
        }
        self.ensure_column_indexes(&wanted, false)
    }

    /// Builds the property columns for these key properties (indexes in `KEY_PROPERTIES`) that
    /// have none yet: when another key hides them somewhere, or always with `always` (computed
    /// traits read a column, they cannot fall back to full messages).
    pub fn ensure_column_indexes(&self, properties: &[u8], always: bool) -> Result<()> {
        let missing = |hot: &HotStore| -> Vec<u8> {
            let kept = hot.columns();
            properties
                .iter()
                .copied()
                .filter(|p| {
                    is_column_property(usize::from(*p))
                        && (always || hot.is_hidden_somewhere(usize::from(*p)))
                        && !kept.contains(p)
                })
                .collect()
        };
        if !self.columns_supported || missing(&self.hot.read()).is_empty() {
            return Ok(());
        }
        // The writer lock: no batch commits while the hot store is rebuilt from its rows.
        let state = self.state.lock();
        let wanted = missing(&self.hot.read());
        if wanted.is_empty() {
            return Ok(());
        }
        let mut columns = self.hot.read().columns();
        columns.extend(wanted);
        columns.sort_unstable();
        columns.dedup();
        if self.light {
            // Only the profiles loaded so far, and nothing written.
            let loaded = self.hot.read().loaded_profiles();
            let ranges: Vec<(u32, u32)> = loaded.iter().map(|p| (*p, p + 1)).collect();
            let (hot, _) = load_hot(&self.store, &ranges, &columns)?;
            *self.hot.write() = hot;
            return Ok(());
        }
        let (hot, _) = load_hot(&self.store, &[(0, state.counters.next_profile)], &columns)?;
        self.store.meta.insert(COLUMNS_KEY, to_json(&columns))?;
        *self.hot.write() = hot;
        Ok(())
    }

    /// Counts of what is loaded.
    pub fn load_stats(&self) -> LoadStats {
        let state = self.state.lock();
        LoadStats {
            events: self.hot.read().n_events(),
            profiles: live_profiles(&state),
            identifiers: state.idents.len(),
        }
    }

    /// Read access to the hot store.
    pub fn hot(&self) -> crate::lock::Ordered<parking_lot::RwLockReadGuard<'_, HotStore>> {
        self.hot.read()
    }

    /// Reads the event-name and key-property dictionaries (text to id, and id to text).
    pub fn with_dictionaries<T>(
        &self,
        read: impl FnOnce(&FxHashMap<String, u32>, &[String]) -> T,
    ) -> T {
        let state = self.state.lock();
        read(&state.names.ids, &state.keys.texts)
    }

    /// Whether a profile ordinal is live (not merged away, not removed).
    pub fn is_alive(&self, profile: u32) -> bool {
        self.state
            .lock()
            .profiles
            .get(profile as usize)
            .is_some_and(|m| m.alive)
    }

    /// Ordinals of every live profile, ascending.
    pub fn live_profiles(&self) -> Vec<u32> {
        let state = self.state.lock();
        (0..state.profiles.len() as u32)
            .filter(|p| state.profiles[*p as usize].alive)
            .collect()
    }

    /// Whether each of these profiles is live, read under one short writer lock (take it
    /// before the hot store: a reader holding `hot` must not ask for the writer).
    pub(crate) fn alive_flags(&self, profiles: &[u32]) -> Vec<bool> {
        let state = self.state.lock();
        profiles
            .iter()
            .map(|p| state.profiles.get(*p as usize).is_some_and(|m| m.alive))
            .collect()
    }

    /// Bytes on disk per keyspace.
    pub fn store_sizes(&self) -> Vec<(&'static str, u64)> {
        self.store.disk_space()
    }

    /// Syncs everything written so far to disk.
    pub fn sync(&self) -> Result<()> {
        self.store.db.persist(fjall::PersistMode::SyncAll)?;
        Ok(())
    }

    /// After a bulk load or before a clean stop: tables written (fast next start) and the hot
    /// store's spare capacity released.
    pub fn checkpoint(&self) -> Result<()> {
        let _writer = self.state.lock();
        self.store.checkpoint()?;
        self.hot.write().shrink_to_fit();
        Ok(())
    }

    fn check_poisoned(&self) -> Result<()> {
        if self.light {
            return Err(EngineError::Invalid(
                "this store was opened read-only (a light open); writes need a full open".into(),
            ));
        }
        if self.poisoned.load(Ordering::Acquire) {
            return Err(EngineError::Poisoned("an earlier commit failed".into()));
        }
        Ok(())
    }

    /// Accepts, deduplicates or quarantines each message, resolves identities, and commits the
    /// whole batch atomically.
    pub fn ingest(
        &self,
        items: Vec<Incoming>,
        source: &str,
        durability: Durability,
        now: i64,
    ) -> Result<BatchOutcome> {
        let mut outcomes = self.ingest_groups(vec![items], source, durability, now)?;
        Ok(outcomes.pop().unwrap_or_default())
    }

    /// Group commit: several requests' messages in one atomic, durable batch (one fsync), with
    /// an outcome per group. Quarantine indexes are relative to each group.
    pub fn ingest_groups(
        &self,
        groups: Vec<Vec<Incoming>>,
        source: &str,
        durability: Durability,
        now: i64,
    ) -> Result<Vec<BatchOutcome>> {
        self.check_poisoned()?;
        let mut state = self.state.lock();
        let hot = self.hot.read();
        // Any failure from here on leaves memory ahead of disk: refuse writes until a restart.
        let prepared = (|| -> Result<_> {
            let mut tx = Tx::new(&self.store, &mut state, &hot, source, now);
            let mut outcomes = Vec::with_capacity(groups.len());
            for items in groups {
                for (index, item) in items.into_iter().enumerate() {
                    tx.offer(index, item)?;
                }
                outcomes.push(std::mem::take(&mut tx.outcome));
            }
            let Tx {
                batch,
                pending,
                hot_merges,
                created,
                dirty,
                ..
            } = tx.finish()?;
            let batch = batch.durability(Some(match durability {
                Durability::Sync => fjall::PersistMode::SyncAll,
                Durability::Buffered => fjall::PersistMode::Buffer,
            }));
            batch.commit()?;
            Ok((outcomes, pending, hot_merges, created, dirty))
        })();
        let (outcomes, pending, hot_merges, created, dirty) = prepared.inspect_err(|_| {
            self.poisoned.store(true, Ordering::Release);
        })?;
        drop(hot);
        {
            let mut columns = self.trait_columns.write();
            if !columns.is_empty() {
                for (profile, record) in &dirty {
                    columns.update(*profile, &record.traits);
                }
            }
        }
        let mut touched = crate::segment::live::Touched::default();
        touched.all.extend(created.iter().map(|p| state.find(*p)));
        let mut hot = self.hot.write();
        for (from, into) in hot_merges {
            hot.merge(from, into);
            touched.gone.insert(from);
            touched.all.insert(state.find(into));
        }
        for event in pending {
            let profile = state.find(event.profile);
            hot.insert(profile, event.record.to_hot(event.ts), &event.record.others);
            if event.record.name != NO_NAME {
                touched
                    .events
                    .entry(profile)
                    .or_default()
                    .insert(event.record.name);
            } else {
                // Identify (traits), alias and group calls: no event name, but they are seen.
                touched.traits.insert(profile);
            }
        }
        drop(hot);
        drop(state);
        for outcome in &outcomes {
            self.metrics
                .events_accepted
                .fetch_add(outcome.accepted, Ordering::Relaxed);
            self.metrics
                .events_duplicate
                .fetch_add(outcome.duplicates, Ordering::Relaxed);
            self.metrics
                .events_quarantined
                .fetch_add(outcome.quarantined.len() as u64, Ordering::Relaxed);
        }
        self.metrics
            .batches_committed
            .fetch_add(1, Ordering::Relaxed);
        let cause = if source == "import" {
            crate::segment::feed::Cause::Import
        } else {
            crate::segment::feed::Cause::Events
        };
        self.hand_off(touched, cause, now)?;
        Ok(outcomes)
    }

    /// Re-offers quarantined messages (all, or those of one reason) under today's rules: a
    /// message accepted now leaves the quarantine, in the same batch.
    pub fn replay_quarantine(&self, reason: Option<Reason>, now: i64) -> Result<BatchOutcome> {
        let records = self.quarantined(reason, usize::MAX)?;
        let mut total = BatchOutcome::default();
        for chunk in records.chunks(10_000) {
            let items = chunk
                .iter()
                .map(|record| {
                    let parsed = parse_message_text(&record.raw, &ParseContext::at(now));
                    let replay = Replay {
                        id: record.id,
                        key: quarantine_key(&record.raw),
                    };
                    Incoming::new(parsed, Some(replay))
                })
                .collect();
            let outcome = self.ingest(items, "replay", Durability::Sync, now)?;
            total.absorb(&outcome);
            total.quarantined.extend(outcome.quarantined);
        }
        Ok(total)
    }

    /// Quarantined messages, oldest first.
    pub fn quarantined(
        &self,
        reason: Option<Reason>,
        limit: usize,
    ) -> Result<Vec<QuarantineRecord>> {
        let mut records = Vec::new();
        for entry in self.store.quarantine.iter() {
            let (_, value) = entry.into_inner()?;
            let record: QuarantineRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("quarantine", e))?;
            if reason.is_none_or(|r| r == record.reason) {
                records.push(record);
                if records.len() >= limit {
                    break;
                }
            }
        }
        Ok(records)
    }

    /// The data-quality report.
    pub fn quality(&self) -> Result<QualityReport> {
        let (counters, profiles, merges) = {
            let state = self.state.lock();
            let merges = state
                .profiles
                .iter()
                .filter(|m| m.merged_into.is_some())
                .count();
            (
                state.counters.quality.clone(),
                live_profiles(&state),
                merges,
            )
        };
        let mut in_quarantine: BTreeMap<Reason, u64> = BTreeMap::new();
        for record in self.quarantined(None, usize::MAX)? {
            *in_quarantine.entry(record.reason).or_default() += 1;
        }
        Ok(QualityReport {
            events: self.hot.read().n_events() as u64,
            profiles: profiles as u64,
            merged_profiles: merges as u64,
            in_quarantine,
            counters,
        })
    }

    /// Finds a live profile by userId, anonymousId, e-mail or, last, profile number (so a
    /// numeric userId wins over a profile number), following merges to the survivor.
    pub fn find_profile(&self, id: &str) -> Option<u32> {
        self.lookup_profile(id).map(|found| found.profile)
    }

    /// [`Engine::find_profile`], saying whether `id` was a profile number merged into another.
    pub fn lookup_profile(&self, id: &str) -> Option<Lookup> {
        if self.light {
            return self.lookup_light(id);
        }
        let state = self.state.lock();
        let email = crate::normalize::normalize_email(id);
        let by_identifier = [identity::user_ident(id), identity::anonymous_ident(id)]
            .into_iter()
            .chain(email.map(|e| identity::email_ident(&e)))
            .find_map(|ident| state.idents.get(&ident).copied());
        if let Some(profile) = by_identifier {
            return Some(Lookup {
                profile,
                merged_from: None,
            });
        }
        let ordinal = id
            .parse::<u32>()
            .ok()
            .filter(|o| *o < state.counters.next_profile)?;
        let live = state.find(ordinal);
        state.profiles[live as usize].alive.then_some(Lookup {
            profile: live,
            merged_from: (live != ordinal).then_some(ordinal),
        })
    }

    /// [`Engine::lookup_profile`] on a light open: identifiers read from the store, merges
    /// followed through the records, and the profile's hot rows loaded.
    fn lookup_light(&self, id: &str) -> Option<Lookup> {
        let email = crate::normalize::normalize_email(id);
        let by_identifier = [identity::user_ident(id), identity::anonymous_ident(id)]
            .into_iter()
            .chain(email.map(|e| identity::email_ident(&e)))
            .find_map(|ident| {
                let value = self.store.idents.get(ident.as_bytes()).ok()??;
                Some(u32::from_be_bytes(value.as_ref().try_into().ok()?))
            });
        let (profile, merged_from) = match by_identifier {
            Some(profile) => (profile, None),
            None => {
                let asked = id.parse::<u32>().ok()?;
                let mut profile = asked;
                // Merge chains are short; a cycle would be corruption: stop after many hops.
                for _ in 0..64 {
                    match read_profile(&self.store, profile).ok()??.merged_into {
                        Some(into) => profile = into,
                        None => break,
                    }
                }
                (profile, (profile != asked).then_some(asked))
            }
        };
        let record = read_profile(&self.store, profile).ok()??;
        if record.identifiers.is_empty() && record.merged_into.is_none() {
            return None;
        }
        self.load_light_profile(profile).ok()?;
        Some(Lookup {
            profile,
            merged_from,
        })
    }

    /// Loads one profile's hot rows into a light engine.
    fn load_light_profile(&self, profile: u32) -> Result<()> {
        let mut events = Vec::new();
        for entry in self.store.hot.prefix(profile_key(profile)) {
            let (key, value) = entry.into_inner()?;
            let (_, ts, _) = key_of("hot", &key)?;
            let record = HotRecord::decode(&value).ok_or_else(|| corrupt("hot", "bad record"))?;
            events.push((record.to_hot(ts), record.others));
        }
        {
            let mut state = self.state.lock();
            if let Some(meta) = state.profiles.get_mut(profile as usize) {
                meta.alive = true;
            }
        }
        self.hot.write().replace(profile, events);
        Ok(())
    }

    /// A profile's record.
    pub fn profile_record(&self, profile: u32) -> Result<ProfileRecord> {
        read_profile(&self.store, profile)?
            .ok_or_else(|| EngineError::NotFound(format!("profile {profile}")))
    }

    /// Merges into `profile` (including ones later undone).
    pub fn merges_into(&self, profile: u32) -> Result<Vec<MergeRecord>> {
        Ok(self
            .all_merges()?
            .into_iter()
            .filter(|m| m.into == profile)
            .collect())
    }

    /// Every merge ever recorded.
    pub fn all_merges(&self) -> Result<Vec<MergeRecord>> {
        let mut merges = Vec::new();
        for entry in self.store.merges.iter() {
            let (_, value) = entry.into_inner()?;
            merges.push(serde_json::from_slice(&value).map_err(|e| corrupt("merges", e))?);
        }
        Ok(merges)
    }

    /// A page of a profile's timeline, newest first, optionally only one message type.
    pub fn timeline(
        &self,
        profile: u32,
        kind: Option<MessageType>,
        offset: usize,
        limit: usize,
    ) -> Result<Vec<StoredEvent>> {
        let mut events = Vec::new();
        let mut skipped = 0;
        for entry in self.store.events.prefix(profile_key(profile)).rev() {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&value)?;
            if kind.is_some_and(|k| k != message.kind) {
                continue;
            }
            if skipped < offset {
                skipped += 1;
                continue;
            }
            let (_, _, seq) = key_of("events", &key)?;
            events.push(StoredEvent {
                profile,
                seq,
                message,
            });
            if events.len() >= limit {
                break;
            }
        }
        Ok(events)
    }

    /// Every stored event, in (profile, time) order.
    pub fn for_each_event(&self, mut visit: impl FnMut(StoredEvent) -> Result<()>) -> Result<()> {
        for entry in self.store.events.iter() {
            let (key, value) = entry.into_inner()?;
            let (profile, _, seq) = key_of("events", &key)?;
            let message: Message = message_of(&value)?;
            visit(StoredEvent {
                profile,
                seq,
                message,
            })?;
        }
        Ok(())
    }

    /// Undoes merge `merge_id`: the absorbed profile comes back with the identifiers it brought
    /// (those still held by the survivor), the events sent under them, and traits recomputed
    /// from each side's identify calls.
    pub fn unmerge(&self, merge_id: u64, now: i64) -> Result<UnmergeOutcome> {
        self.check_poisoned()?;
        let mut state = self.state.lock();
        let merge_key = merge_id.to_be_bytes();
        let mut merge: MergeRecord = match self.store.merges.get(merge_key)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt("merges", e))?,
            None => return Err(EngineError::NotFound(format!("merge {merge_id}"))),
        };
        if merge.unmerged_at.is_some() {
            return Err(EngineError::Invalid(format!(
                "merge {merge_id} was already undone"
            )));
        }
        let survivor = state.find(merge.into);
        let moved: FxHashSet<String> = merge
            .identifiers
            .iter()
            .filter(|ident| state.idents.get(*ident) == Some(&survivor))
            .cloned()
            .collect();
        let mut batch = self
            .store
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));

        // Split the survivor's events by the identifier they were sent under.
        let mut back = Vec::new();
        let mut survivor_events = Vec::new();
        for entry in self.store.events.prefix(profile_key(survivor)) {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&value)?;
            let sent_under = match (&message.user_id, &message.anonymous_id) {
                (Some(user), _) => identity::user_ident(user),
                (None, Some(anonymous)) => identity::anonymous_ident(anonymous),
                (None, None) => String::new(),
            };
            let (_, ts, seq) = key_of("events", &key)?;
            let hot_value = self
                .store
                .hot
                .get(key.as_ref())?
                .ok_or_else(|| corrupt("hot", "missing"))?;
            let record =
                HotRecord::decode(&hot_value).ok_or_else(|| corrupt("hot", "bad record"))?;
            if moved.contains(&sent_under) {
                batch.remove(&self.store.events, key.clone());
                batch.remove(&self.store.hot, key);
                let new_key = event_key(merge.from, ts, seq);
                batch.insert(&self.store.events, new_key, value);
                batch.insert(&self.store.hot, new_key, record.encode());
                back.push((message, (record.to_hot(ts), record.others)));
            } else {
                survivor_events.push((message, (record.to_hot(ts), record.others)));
            }
        }

        let mut survivor_record = read_profile(&self.store, survivor)?.unwrap_or_default();
        let mut restored = read_profile(&self.store, merge.from)?.unwrap_or_default();
        survivor_record
            .identifiers
            .retain(|ident| !moved.contains(ident));
        restored.identifiers = merge
            .identifiers
            .iter()
            .filter(|i| moved.contains(*i))
            .cloned()
            .collect();
        restored.merged_into = None;
        survivor_record.traits = fold_traits(survivor_events.iter().map(|(m, _)| m));
        restored.traits = fold_traits(back.iter().map(|(m, _)| m));
        for ident in &moved {
            state.idents.insert(ident.clone(), merge.from);
            batch.insert(
                &self.store.idents,
                ident.as_bytes(),
                merge.from.to_be_bytes(),
            );
        }
        state.profiles[merge.from as usize] = ProfileMeta {
            merged_into: None,
            has_user: restored.identifiers.iter().any(|i| i.starts_with("u:")),
            alive: true,
        };
        state.profiles[survivor as usize].has_user = survivor_record
            .identifiers
            .iter()
            .any(|i| i.starts_with("u:"));
        batch.insert(
            &self.store.profiles,
            profile_key(survivor),
            to_json(&survivor_record),
        );
        batch.insert(
            &self.store.profiles,
            profile_key(merge.from),
            to_json(&restored),
        );
        merge.unmerged_at = Some(now);
        batch.insert(&self.store.merges, merge_key, to_json(&merge));
        if let Err(error) = batch.commit() {
            self.poisoned.store(true, Ordering::Release);
            return Err(error.into());
        }
        {
            let mut columns = self.trait_columns.write();
            columns.update(survivor, &survivor_record.traits);
            columns.update(merge.from, &restored.traits);
        }
        let mut hot = self.hot.write();
        let moved_events = back.len();
        hot.replace(merge.from, back.into_iter().map(|(_, h)| h).collect());
        hot.replace(
            survivor,
            survivor_events.into_iter().map(|(_, h)| h).collect(),
        );
        drop(hot);
        drop(state);
        let mut touched = crate::segment::live::Touched::default();
        touched.all.extend([merge.from, survivor]);
        self.hand_off(touched, crate::segment::feed::Cause::ProfileEdit, now)?;
        Ok(UnmergeOutcome {
            merge: merge_id,
            restored_profile: merge.from,
            survivor,
            identifiers: restored.identifiers,
            events_moved: moved_events as u64,
        })
    }

    /// Removes everything held on a live profile: its events (with their message ids, so the
    /// same messages could be accepted again), identifiers, traits, the records of profiles merged
    /// into it and the merge records naming it. Erasure builds on this.
    pub fn remove_profile(&self, profile: u32) -> Result<RemovalOutcome> {
        self.check_poisoned()?;
        let mut state = self.state.lock();
        if !state
            .profiles
            .get(profile as usize)
            .is_some_and(|m| m.alive)
        {
            return Err(EngineError::NotFound(format!("profile {profile}")));
        }
        let record = read_profile(&self.store, profile)?.unwrap_or_default();
        let mut batch = self
            .store
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        let mut removed_hashes = Vec::new();
        for entry in self.store.events.prefix(profile_key(profile)) {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&value)?;
            batch.remove(&self.store.msgids, message.message_id.as_bytes());
            removed_hashes.push(message_hash(&message.message_id));
            batch.remove(&self.store.hot, key.clone());
            batch.remove(&self.store.events, key);
        }
        for ident in &record.identifiers {
            batch.remove(&self.store.idents, ident.as_bytes());
        }
        batch.remove(&self.store.profiles, profile_key(profile));
        let mut merged_profiles = Vec::new();
        for merge in self.all_merges()? {
            if state.find(merge.into) == profile || merge.from == profile {
                batch.remove(&self.store.merges, merge.id.to_be_bytes());
                if merge.unmerged_at.is_none() && merge.from != profile {
                    batch.remove(&self.store.profiles, profile_key(merge.from));
                    merged_profiles.push(merge.from);
                }
            }
        }
        batch
            .commit()
            .inspect_err(|_| self.poisoned.store(true, Ordering::Release))?;
        for ident in &record.identifiers {
            state.idents.remove(ident);
        }
        state.seen.remove_all(&removed_hashes);
        state.profiles[profile as usize] = ProfileMeta::default();
        for merged in &merged_profiles {
            // Merged-away ordinals now lead nowhere.
            state.profiles[*merged as usize] = ProfileMeta::default();
        }
        self.hot.write().replace(profile, Vec::new());
        {
            let mut columns = self.trait_columns.write();
            for gone in std::iter::once(&profile).chain(&merged_profiles) {
                columns.update(*gone, &BTreeMap::new());
            }
        }
        drop(state);
        let mut touched = crate::segment::live::Touched::default();
        touched.gone.insert(profile);
        touched.gone.extend(merged_profiles.iter().copied());
        self.hand_off(
            touched,
            crate::segment::feed::Cause::ProfileEdit,
            crate::time::wall_clock_ms(),
        )?;
        Ok(RemovalOutcome {
            profile,
            events_removed: removed_hashes.len() as u64,
            identifiers_removed: record.identifiers,
            merged_profiles_removed: merged_profiles,
        })
    }

    /// Creates an API key and returns it in clear text (the only time it is shown).
    pub fn create_key(&self, kind: KeyKind, name: &str, now: i64) -> Result<String> {
        let key = new_key(kind);
        let record = KeyRecord {
            kind,
            name: name.to_string(),
            created_at: now,
            prefix: key[..12].to_string(),
        };
        let hash = key_hash(&key);
        self.store.keys.insert(hash.as_bytes(), to_json(&record))?;
        self.store.db.persist(fjall::PersistMode::SyncAll)?;
        self.api_keys.write().insert(hash, record);
        Ok(key)
    }

    /// What a presented key may do, if it is one of ours.
    pub fn key_kind(&self, key: &str) -> Option<KeyKind> {
        self.api_keys
            .read()
            .get(&key_hash(key))
            .map(|record| record.kind)
    }

    /// Every key's record (never the key itself).
    pub fn list_keys(&self) -> Vec<KeyRecord> {
        let mut keys: Vec<KeyRecord> = self.api_keys.read().values().cloned().collect();
        keys.sort_by_key(|k| k.created_at);
        keys
    }
}

impl Drop for Engine {
    /// Leaves no journal to replay: what is still only in memtables is written out to tables, so
    /// the next open (a CLI command after another) does not replay it.
    fn drop(&mut self) {
        if self.store.db.write_buffer_size() > 0
            && !self.poisoned.load(Ordering::Acquire)
            && let Err(error) = self.store.checkpoint()
        {
            tracing::warn!(error = %error, "checkpoint on close failed; the next open replays the journal");
        }
    }
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
#[derive(Debug, Clone, Serialize)]
pub struct QualityReport {
    pub events: u64,
    pub profiles: u64,
    pub merged_profiles: u64,
    /// Messages waiting in quarantine now, by reason.
    pub in_quarantine: BTreeMap<Reason, u64>,
    #[serde(flatten)]
    pub counters: QualityCounters,
}

/// Timelines of a range of profiles and the messageId hashes seen while scanning it.
type ScannedRange = (
    Vec<(u32, Vec<(crate::hot::HotEvent, crate::hot::OtherKeys)>)>,
    Vec<u64>,
);

/// Rebuilds the hot store, with property columns for `columns`, and collects the messageId
/// hashes from the `hot` keyspace, scanning ranges of profiles in parallel (timelines of
/// different profiles are disjoint).
fn load_hot(store: &Store, ranges: &[(u32, u32)], columns: &[u8]) -> Result<(HotStore, Vec<u64>)> {
    let n_parts = (rayon::current_num_threads() * 4).max(1) as u32;
    let mut parts: Vec<(u32, u32)> = Vec::new();
    for &(first, end) in ranges {
        let step = (end.saturating_sub(first)).div_ceil(n_parts).max(1);
        parts.extend(
            (0..n_parts)
                .map(|i| {
                    (
                        first.saturating_add(i.saturating_mul(step)).min(end),
                        first.saturating_add((i + 1).saturating_mul(step)).min(end),
                    )
                })
                .filter(|(start, end)| start < end),
        );
    }
    let scanned: Vec<Result<ScannedRange>> = parts
        .into_par_iter()
        .map(|(start, end)| {
            let (mut timelines, mut hashes): ScannedRange = (Vec::new(), Vec::new());
            for entry in store.hot.range(profile_key(start)..profile_key(end)) {
                let (key, value) = entry.into_inner()?;
                let (profile, ts, _) = key_of("hot", &key)?;
                let record =
                    HotRecord::decode(&value).ok_or_else(|| corrupt("hot", "bad record"))?;
                hashes.push(record.message_hash);
                let row = (record.to_hot(ts), record.others);
                match timelines.last_mut() {
                    Some((current, events)) if *current == profile => events.push(row),
                    _ => timelines.push((profile, vec![row])),
                }
            }
            Ok((timelines, hashes))
        })
        .collect();
    let mut hot = HotStore::with_columns(columns);
    let mut all_hashes = Vec::new();
    for part in scanned {
        let (timelines, hashes) = part?;
        for (profile, events) in timelines {
            hot.replace(profile, events);
        }
        all_hashes.extend(hashes);
    }
    hot.shrink_to_fit();
    Ok((hot, all_hashes))
}

fn live_profiles(state: &State) -> usize {
    state.profiles.iter().filter(|m| m.alive).count()
}

/// The (profile, time, seq) of an `events` or `hot` key.
pub(crate) fn key_of(keyspace: &'static str, key: &[u8]) -> Result<(u32, i64, u64)> {
    decode_event_key(key).ok_or_else(|| corrupt(keyspace, "bad key"))
}

/// A stored message.
fn message_of(value: &[u8]) -> Result<Message> {
    serde_json::from_slice(value).map_err(|e| corrupt("events", e))
}

/// Refuses a store written by a newer cible; stamps an older or new one with this layout
/// (version 1 stores only lack the `changes` keyspace, which opens empty).
fn check_schema(store: &Store) -> Result<()> {
    use crate::store::{SCHEMA_KEY, SCHEMA_VERSION};
    let found = match store.meta.get(SCHEMA_KEY)? {
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.parse::<u32>().ok())
            .ok_or_else(|| corrupt("meta", "schema_version is not a number"))?,
        None => 1,
    };
    if found > SCHEMA_VERSION {
        return Err(EngineError::Store(StoreError::Corrupt {
            keyspace: "meta",
            detail: format!(
                "the store has layout version {found}, this cible reads up to {SCHEMA_VERSION}: upgrade cible"
            ),
        }));
    }
    if found < SCHEMA_VERSION {
        store
            .meta
            .insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
    }
    Ok(())
}

pub(crate) fn corrupt(keyspace: &'static str, detail: impl std::fmt::Display) -> EngineError {
    EngineError::Store(StoreError::Corrupt {
        keyspace,
        detail: detail.to_string(),
    })
}

fn to_json<T: Serialize>(value: &T) -> Vec<u8> {
    serde_json::to_vec(value).expect("records serialize")
}

/// Adds `"flags": N` to a serialized message (serialized before its flags were known).
fn with_flags(mut body: Vec<u8>, flags: u8) -> Vec<u8> {
    if flags != 0 && body.last() == Some(&b'}') {
        body.pop();
        body.extend_from_slice(format!(",\"flags\":{flags}}}").as_bytes());
    }
    body
}

fn read_profile(store: &Store, profile: u32) -> Result<Option<ProfileRecord>> {
    match store.profiles.get(profile_key(profile))? {
        Some(bytes) => Ok(Some(
            serde_json::from_slice(&bytes).map_err(|e| corrupt("profiles", e))?,
        )),
        None => Ok(None),
    }
}

/// Traits as the fold of identify calls, latest message time winning.
fn fold_traits<'a>(messages: impl Iterator<Item = &'a Message>) -> BTreeMap<String, TraitValue> {
    let mut record = ProfileRecord::default();
    for message in messages.filter(|m| m.kind == MessageType::Identify) {
        record.apply_traits(&message.traits, message.timestamp);
    }
    record.traits
}

struct PendingEvent {
    profile: u32,
    ts: i64,
    seq: u64,
    record: HotRecord,
    body: Vec<u8>,
    message_id: String,
}

/// One batch in the making.
struct Tx<'a> {
    store: &'a Store,
    state: &'a mut State,
    hot: &'a HotStore,
    source: &'a str,
    now: i64,
    batch: fjall::OwnedWriteBatch,
    dirty: FxHashMap<u32, ProfileRecord>,
    pending: Vec<PendingEvent>,
    batch_ids: FxHashSet<String>,
    batch_quarantine: FxHashSet<[u8; 16]>,
    /// Recent event times per profile within this batch, for burst detection.
    batch_times: FxHashMap<u32, Vec<u32>>,
    hot_merges: Vec<(u32, u32)>,
    /// Profiles created by this batch: every segment must evaluate them once (a rule such as
    /// `not did(...)` holds for people with no events of its names).
    created: Vec<u32>,
    outcome: BatchOutcome,
}

impl<'a> Tx<'a> {
    fn new(
        store: &'a Store,
        state: &'a mut State,
        hot: &'a HotStore,
        source: &'a str,
        now: i64,
    ) -> Self {
        Self {
            store,
            state,
            hot,
            source,
            now,
            batch: store.db.batch(),
            dirty: FxHashMap::default(),
            pending: Vec::new(),
            batch_ids: FxHashSet::default(),
            batch_quarantine: FxHashSet::default(),
            batch_times: FxHashMap::default(),
            hot_merges: Vec::new(),
            created: Vec::new(),
            outcome: BatchOutcome::default(),
        }
    }

    fn offer(&mut self, index: usize, item: Incoming) -> Result<()> {
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
                    let raw = String::from_utf8_lossy(&message.body).into_owned();
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
        let profile = self.resolve(&message)?;
        self.drop_replayed(item.replay_of);
        self.accept(profile, name, message)
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
            && self.store.msgids.contains_key(message_id.as_bytes())?;
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
            let record = read_profile(self.store, profile)?
                .ok_or_else(|| corrupt("profiles", format!("profile {profile} has no record")))?;
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
            self.batch
                .insert(&self.store.idents, ident.as_bytes(), profile.to_be_bytes());
            self.record(profile)?.identifiers.push(ident);
        }
        if message.kind == MessageType::Identify && !message.traits.is_empty() {
            self.record(profile)?
                .apply_traits(&message.traits, message.timestamp);
        }
        Ok(profile)
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
            self.batch
                .insert(&self.store.idents, ident.as_bytes(), into.to_be_bytes());
        }
        let from_has_user = self.state.profiles[from as usize].has_user;
        self.state.profiles[from as usize].merged_into = Some(into);
        self.state.profiles[from as usize].alive = false;
        self.state.profiles[into as usize].has_user |= from_has_user;
        let restored_id = absorbed.id;
        let created_at = absorbed.created_at;
        self.record(into)?.absorb(absorbed);
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
        self.batch
            .insert(&self.store.merges, id.to_be_bytes(), to_json(&record));
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
    fn finish(mut self) -> Result<Self> {
        let mut moved = FxHashSet::default();
        for &(from, _) in &self.hot_merges {
            if !moved.insert(from) {
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
            for entry in self.store.hot.prefix(profile_key(from)) {
                let (key, value) = entry.into_inner()?;
                let (_, ts, seq) = key_of("hot", &key)?;
                self.batch.remove(&self.store.hot, key.clone());
                self.batch
                    .insert(&self.store.hot, event_key(survivor, ts, seq), value);
            }
        }
        for event in &mut self.pending {
            event.profile = self.state.find(event.profile);
            let key = event_key(event.profile, event.ts, event.seq);
            self.batch
                .insert(&self.store.events, key, std::mem::take(&mut event.body));
            self.batch
                .insert(&self.store.hot, key, event.record.encode());
            self.batch
                .insert(&self.store.msgids, event.message_id.as_bytes(), []);
        }
        for (profile, record) in &self.dirty {
            self.batch
                .insert(&self.store.profiles, profile_key(*profile), to_json(record));
        }
        self.batch.insert(
            &self.store.meta,
            COUNTERS_KEY,
            to_json(&self.state.counters),
        );
        Ok(self)
    }
}

#[cfg(test)]
mod tests;
