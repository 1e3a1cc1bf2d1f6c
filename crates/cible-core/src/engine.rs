//! The engine: the facade over the components, holding the writer's state
//! ([`crate::ingest::State`]: identity graph, counters, dictionaries, dedup set) and the hot
//! store. Opening (full or light), reads of profiles and merges, unmerge and profile removal live
//! here; the commit of a batch in `engine/ingest.rs` (its transaction in [`crate::ingest`]); the
//! faces of the segments, computed traits and models in `engine/{segments,traits,models}.rs`;
//! shared records in [`crate::records`]; errors in [`crate::error`].
//!
//! **People's data changes only under the writer lock** ([`Engine::ingest`], [`Engine::unmerge`],
//! [`Engine::remove_profile`]), each call one atomic fjall batch. In-memory state is changed only
//! along with a batch; if a commit fails the engine refuses further writes (the process must
//! restart and reload), so memory never disagrees with disk.

mod analysis;
pub use analysis::RetentionQuery;
mod audit;
mod consent;
pub use consent::{CONSENT_EVENT, ConsentRequest};
mod ingest;
mod models;
mod retention;
mod segments;
mod traits;
mod webhooks;
pub use webhooks::{LIST_MAX_CHANGES, NewWebhook};

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use crate::lock::{Level, OrderedMutex, OrderedRwLock};
use rustc_hash::{FxHashMap, FxHashSet};

use crate::hot::{HotEvent, HotStore, OtherKeys};
use crate::identity;
use crate::keys::{KeyKind, KeyRecord, key_hash, new_key};
use crate::message::{Message, MessageType, is_column_property};
use crate::quality::Reason;
use crate::seen::SeenSet;
use crate::store::{
    EventEntry, Store, StoreError, entry_of, event_key, key_of, merged_into_key, profile_key,
};
use rayon::prelude::*;

use crate::error::corrupt;
use crate::error::{EngineError, Result};
use crate::ingest::{
    COUNTERS_KEY, Counters, Dict, NAME_PREFIX, ProfileMeta, State, message_hash, read_profile,
};
use crate::records::to_json;
use crate::records::{
    LoadStats, Lookup, MergeRecord, ProfileRecord, QualityReport, QuarantineRecord, RemovalOutcome,
    StoredEvent, TraitValue, UnmergeOutcome,
};

/// Present when every `hot` row lists its other key properties (stores created since property
/// columns exist); older stores evaluate hidden key properties on full messages.
const HOT_OTHER_KEYS_KEY: &str = "hot_other_keys";
/// The key properties (indexes in `KEY_PROPERTIES`) that have a property column, JSON.
const COLUMNS_KEY: &str = "columns";

/// The engine. Cheap to share behind an `Arc`.
///
/// Its locks are taken in the order of [`crate::lock::Level`] (checked at every acquisition):
/// `segments.state` → `column_build` → `state` (the writer) → `hot` → `liveness` → `trait_columns` → `consents` → `audit` → caches →
/// `segments.work`.
pub struct Engine {
    pub(crate) store: Store,
    pub(crate) state: OrderedMutex<State>,
    /// Held by a rebuild of the hot store's columns ([`Engine::ensure_column_indexes`]).
    column_build: OrderedMutex<()>,
    pub(crate) hot: OrderedRwLock<HotStore>,
    /// Which profiles are live, as of the last committed batch (`State::profiles` decides).
    pub(crate) liveness: OrderedRwLock<crate::liveness::Liveness>,
    /// The number of event names and of key texts, as of the last committed batch.
    pub(crate) dictionary_sizes: [std::sync::atomic::AtomicUsize; 2],
    /// Shared records: a request's key check clones a pointer, not the record.
    api_keys: OrderedRwLock<FxHashMap<String, Arc<KeyRecord>>>,
    pub(crate) poisoned: AtomicBool,
    /// Segments and the change feed: the worker's state, its queue of committed batches.
    pub(crate) segments: crate::segment::Segments,
    /// Counters and histograms for `/metrics`.
    pub metrics: crate::metrics::Metrics,
    /// Whether the `hot` rows list their other key properties (property columns can be built).
    columns_supported: bool,
    /// Opened with [`Engine::open_light`]: read-only, profiles loaded on demand.
    light: bool,
    /// The data directory (the hot store's snapshot is written there on close).
    data_dir: std::path::PathBuf,
    /// Whether this open loaded the hot store from a snapshot (see [`crate::snapshot`]).
    from_snapshot: bool,
    /// What the computed traits keep: the configuration, the calibration and product model (a
    /// component: [`crate::computed::ops::TraitStore`]).
    pub(crate) traits: crate::computed::ops::TraitStore,
    /// The stored models and the active set (a component: [`crate::models::saved::ModelRegistry`]).
    pub(crate) models: crate::models::saved::ModelRegistry,
    /// The traits rules read, by profile ordinal (see [`crate::trait_columns`]).
    pub(crate) trait_columns: OrderedRwLock<crate::trait_columns::TraitColumns>,
    /// The purposes of consent (built-in, and `consent.toml`'s).
    pub(crate) purposes: crate::consent::Purposes,
    /// How long events and quarantined messages are kept (`retention.toml`).
    retention: crate::retention::Retention,
    /// The current consent of every purpose by profile, mirrored after each commit.
    /// Copied on write: passes read a snapshot without holding the lock.
    pub(crate) consents: OrderedRwLock<std::sync::Arc<crate::consent::ConsentIndex>>,
    /// Whether `consents` was read from the store (a light open reads it on first use).
    pub(crate) consents_loaded: AtomicBool,
    /// The audit log's head (see [`crate::audit`]).
    pub(crate) audit: OrderedMutex<audit::AuditState>,
    /// The exports' pseudonym key (see [`crate::pseudonym`]); `None` in a light open of a
    /// store that has none yet.
    pseudonym: OrderedMutex<Option<crate::pseudonym::PseudonymKey>>,
    /// Writes to the `webhooks` keyspace (see [`crate::webhooks`]).
    webhook_lock: OrderedMutex<()>,
}

impl Engine {
    /// How event bodies are packed (see [`crate::packing`]): callers that prepare messages on
    /// their own threads pack them there ([`crate::Incoming::pack`]).
    pub fn packer(&self) -> &std::sync::Arc<crate::packing::Packer> {
        self.store.log.packer()
    }

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
        let trait_config = read_config(
            dir,
            crate::computed::config::FILE_NAME,
            crate::computed::config::TraitConfig::from_toml,
        )?;
        let retention = read_config(
            dir,
            crate::retention::FILE_NAME,
            crate::retention::Retention::from_toml,
        )?;
        let purposes = read_config(
            dir,
            crate::consent::FILE_NAME,
            crate::consent::Purposes::from_toml,
        )?;
        let store = Store::open(dir)?;
        check_schema(&store)?;
        recover_bulk(&store)?;
        let counters: Counters = match store.meta.get(COUNTERS_KEY)? {
            Some(bytes) => serde_json::from_slice(&bytes).map_err(|e| corrupt("meta", e))?,
            None => Counters::default(),
        };
        let mut state = State {
            profiles: vec![ProfileMeta::default(); counters.next_profile as usize],
            counters,
            idents: FxHashMap::default(),
            seen: SeenSet::default(),
            bulk: Default::default(),
            scratch: Default::default(),
            names: Dict::default(),
            keys: Dict::default(),
            suppressed: Default::default(),
            secret: Vec::new(),
        };
        // A light open looks identifiers and merges up in the store when asked.
        if !light {
            load_identities(&store, &mut state)?;
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
        let mut from_snapshot = false;
        let (hot, hashes) = if light {
            (HotStore::with_columns(&columns), Vec::new())
        } else {
            match crate::snapshot::take(&store, dir, &columns, state.counters.next_profile)? {
                Some(loaded) => {
                    from_snapshot = true;
                    loaded
                }
                None => {
                    let everyone = (state.counters.next_seq, state.counters.next_profile);
                    load_hot(&store, &[(0, everyone.1)], &columns, Some(everyone))?
                }
            }
        };
        state.seen = SeenSet::from_hashes(hashes);
        let mut api_keys = FxHashMap::default();
        for entry in store.keys.iter() {
            let (key, value) = entry.into_inner()?;
            let record: KeyRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("keys", e))?;
            api_keys.insert(String::from_utf8_lossy(&key).into_owned(), Arc::new(record));
        }
        let feed = crate::segment::feed::FeedWriter::open(&store)?;
        let metrics = crate::metrics::Metrics::default();
        metrics.feed_head.store(feed.head(), Ordering::Relaxed);
        let models = crate::models::saved::ModelRegistry::new(store.meta.clone());
        let traits = crate::computed::ops::TraitStore::new(store.meta.clone(), trait_config);
        let audit = audit::AuditState::load(&store, light)?;
        let pseudonym = match store.meta.get(crate::pseudonym::KEY)? {
            Some(bytes) => Some(serde_json::from_slice(&bytes).map_err(|e| corrupt("meta", e))?),
            None if light => None,
            None => {
                let key = crate::pseudonym::PseudonymKey::generate(1, crate::time::wall_clock_ms());
                store.meta.insert(crate::pseudonym::KEY, to_json(&key))?;
                Some(key)
            }
        };
        state.secret = audit.secret.clone();
        for entry in store.suppressed.iter() {
            let key = entry.key()?;
            state
                .suppressed
                .insert(String::from_utf8_lossy(&key).into_owned());
        }
        let engine = Self {
            store,
            liveness: OrderedRwLock::new(
                Level::Liveness,
                crate::liveness::Liveness::from_flags(state.profiles.iter().map(|m| m.alive)),
            ),
            dictionary_sizes: [
                state.names.texts.len().into(),
                state.keys.texts.len().into(),
            ],
            state: OrderedMutex::new(Level::Writer, state),
            column_build: OrderedMutex::new(Level::ColumnBuild, ()),
            hot: OrderedRwLock::new(Level::Hot, hot),
            api_keys: OrderedRwLock::new(Level::Cache, api_keys),
            poisoned: AtomicBool::new(false),
            segments: crate::segment::Segments::new(feed),
            metrics,
            columns_supported,
            light,
            data_dir: dir.to_path_buf(),
            from_snapshot,
            traits,
            models,
            trait_columns: OrderedRwLock::new(Level::TraitColumns, Default::default()),
            purposes,
            retention,
            consents: OrderedRwLock::new(Level::Consents, Default::default()),
            consents_loaded: AtomicBool::new(false),
            audit: OrderedMutex::new(Level::Audit, audit),
            pseudonym: OrderedMutex::new(Level::Pseudonym, pseudonym),
            webhook_lock: OrderedMutex::new(Level::Webhooks, ()),
        };
        engine.load_consents()?;
        Ok(engine)
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
        let _build = self.column_build.lock();
        let mut state = self.state.lock();
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
            let (hot, _) = load_hot(&self.store, &ranges, &columns, None)?;
            *self.hot.write() = hot;
            return Ok(());
        }
        // The scan runs beside the writer (a minute at 1M profiles: acknowledgements must not
        // wait for it). The live hot store notes the profiles whose rows change meanwhile; the
        // writer lock is taken again only to read those back from the store, where every
        // committed batch already is (a batch commits before it touches the hot store).
        self.flush_bulk(&mut state)?;
        self.hot.write().record_changes();
        let everyone = (state.counters.next_seq, state.counters.next_profile);
        drop(state);
        // On the global pool: the writer does not wait for it any more, and the segment
        // worker's own pool stays free for the passes of committed batches.
        let scanned = load_hot(&self.store, &[(0, everyone.1)], &columns, Some(everyone));
        let mut state = self.state.lock();
        let changed = self.hot.write().take_changes();
        let (mut hot, _) = scanned?;
        self.flush_bulk(&mut state)?;
        for profile in changed {
            hot.replace(profile, self.stored_rows(profile)?);
        }
        self.store.meta.insert(COLUMNS_KEY, to_json(&columns))?;
        let old = std::mem::replace(&mut *self.hot.write(), hot);
        drop(state);
        // Freed off the writer lock: at 1M profiles that is a second of work.
        drop(old);
        Ok(())
    }

    /// A profile's hot rows (and their other keys) as the store holds them.
    fn stored_rows(&self, profile: u32) -> Result<Vec<(HotEvent, OtherKeys)>> {
        let mut events = Vec::new();
        for entry in self.store.events.prefix(profile_key(profile)) {
            let (key, value) = entry.into_inner()?;
            let (_, ts, _) = key_of("events", &key)?;
            let record = entry_of(&value)?.record;
            events.push((record.to_hot(ts), record.others));
        }
        Ok(events)
    }

    /// Counts of what is loaded.
    pub fn load_stats(&self) -> LoadStats {
        let state = self.state.lock();
        LoadStats {
            events: self.hot.read().n_events(),
            profiles: live_profiles(&state),
            identifiers: state.idents.len(),
            from_snapshot: self.from_snapshot,
        }
    }

    /// The hot store for one chunk of a whole-population pass (profiles ascending): a copy of
    /// the chunk's timelines when the chunk is dense, so that the read guard is held only for
    /// the copy and the writer never waits for an evaluation; the guard itself for a sparse
    /// chunk (a batch's few profiles), quick to evaluate and costly to copy as a range.
    pub(crate) fn hot_chunk(&self, profiles: &[u32]) -> crate::hot::HotChunk<'_> {
        match (profiles.first(), profiles.last()) {
            (Some(&first), Some(&last))
                if first <= last && (last - first) as usize <= 4 * profiles.len() =>
            {
                crate::hot::HotChunk::Window(self.hot.read().window(first, last))
            }
            _ => crate::hot::HotChunk::Guard(self.hot.read()),
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

    /// Whether a profile ordinal is live (not merged away, not removed), as of the last
    /// committed batch; never waits for the writer.
    pub fn is_alive(&self, profile: u32) -> bool {
        self.liveness.read().get(profile)
    }

    /// Ordinals of every live profile, ascending.
    pub fn live_profiles(&self) -> Vec<u32> {
        self.liveness.read().iter().collect()
    }

    /// Whether each of these profiles is live (without the writer lock: the segment worker
    /// asks for every chunk it evaluates, and must not wait for a commit in progress).
    pub(crate) fn alive_flags(&self, profiles: &[u32]) -> Vec<bool> {
        let liveness = self.liveness.read();
        profiles.iter().map(|p| liveness.get(*p)).collect()
    }

    /// Bytes of the journal (writes not yet flushed to tables).
    pub fn journal_bytes(&self) -> u64 {
        self.store.db.journal_disk_space().unwrap_or(0)
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
        self.flush_bulk(&mut self.state.lock())?;
        self.store.checkpoint()?;
        self.hot.write().shrink_to_fit();
        Ok(())
    }

    pub(crate) fn check_poisoned(&self) -> Result<()> {
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

    /// Runs a write the memory will follow; a failure leaves memory ahead of disk, so writes
    /// (and a snapshot of memory) are refused until a restart.
    pub(crate) fn or_poison<T>(&self, write: impl FnOnce() -> Result<T>) -> Result<T> {
        write().inspect_err(|_| self.poisoned.store(true, Ordering::Release))
    }

    /// Commits a batch the memory will follow (see [`Engine::or_poison`]).
    pub(crate) fn commit_or_poison(&self, batch: fjall::OwnedWriteBatch) -> Result<()> {
        self.or_poison(|| Ok(batch.commit()?))
    }

    /// Overwrites event bodies nothing points at any more in the log, then syncs it (see
    /// [`Engine::or_poison`]).
    pub(crate) fn overwrite_bodies(&self, bodies: &[crate::eventlog::Location]) -> Result<()> {
        self.or_poison(|| {
            for location in bodies {
                self.store.log.erase(*location)?;
            }
            Ok(self.store.log.sync()?)
        })
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
        let events = self.stored_rows(profile)?;
        let state = {
            let mut state = self.state.lock();
            if let Some(meta) = state.profiles.get_mut(profile as usize) {
                meta.alive = true;
            }
            state
        };
        self.hot.write().replace(profile, events);
        let alive = state
            .profiles
            .get(profile as usize)
            .is_some_and(|m| m.alive);
        self.liveness.write().set(profile, alive);
        Ok(())
    }

    /// A profile's record.
    pub fn profile_record(&self, profile: u32) -> Result<ProfileRecord> {
        read_profile(&self.store, profile)?
            .ok_or_else(|| EngineError::NotFound(format!("profile {profile}")))
    }

    /// Merges into `profile` (including ones later undone), oldest first: the survivor's keys
    /// in `merged_into`, then each record by id.
    pub fn merges_into(&self, profile: u32) -> Result<Vec<MergeRecord>> {
        let mut merges = Vec::new();
        for entry in self.store.merged_into.prefix(profile_key(profile)) {
            let key = entry.key()?;
            let id = key
                .get(4..12)
                .and_then(|bytes| bytes.try_into().ok())
                .map(u64::from_be_bytes)
                .ok_or_else(|| corrupt("merged_into", "a key is not survivor · merge id"))?;
            let value = self
                .store
                .merges
                .get(id.to_be_bytes())?
                .ok_or_else(|| corrupt("merged_into", format!("merge {id} has no record")))?;
            merges.push(serde_json::from_slice(&value).map_err(|e| corrupt("merges", e))?);
        }
        Ok(merges)
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
        if limit == 0 {
            return Ok(events);
        }
        let mut skipped = 0;
        for entry in self.store.events.prefix(profile_key(profile)).rev() {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&self.store, &value)?;
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
            let message: Message = message_of(&self.store, &value)?;
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
        let mut batch = self.store.synced_batch();

        // Split the survivor's events by the identifier they were sent under.
        let mut back = Vec::new();
        let mut survivor_events = Vec::new();
        for entry in self.store.events.prefix(profile_key(survivor)) {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&self.store, &value)?;
            let sent_under = match (&message.user_id, &message.anonymous_id) {
                (Some(user), _) => identity::user_ident(user),
                (None, Some(anonymous)) => identity::anonymous_ident(anonymous),
                (None, None) => String::new(),
            };
            let (_, ts, seq) = key_of("events", &key)?;
            let record = entry_of(&value)?.record;
            if moved.contains(&sent_under) {
                batch.remove(&self.store.events, key);
                let new_key = event_key(merge.from, ts, seq);
                batch.insert(&self.store.events, new_key, value);
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
        // Consent changes go with the messages that carried them.
        let back_ids: FxHashSet<&str> = back.iter().map(|(m, _)| m.message_id.as_str()).collect();
        let mut consents = restored.consents.clone();
        consents.absorb(
            survivor_record
                .consents
                .split_off(|id| back_ids.contains(id)),
        );
        restored.consents = consents;
        let consent_rows = vec![
            (
                survivor,
                self.store
                    .write_consents(&mut batch, survivor, &survivor_record.consents)?,
            ),
            (
                merge.from,
                self.store
                    .write_consents(&mut batch, merge.from, &restored.consents)?,
            ),
        ];
        state.profiles[survivor as usize].consent = self.purposes.bits(&survivor_record.consents);
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
            consent: self.purposes.bits(&restored.consents),
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
        let mut chain = self.audit_chain();
        let concerned: Vec<String> = survivor_record
            .identifiers
            .iter()
            .chain(&restored.identifiers)
            .cloned()
            .collect();
        let entry = crate::audit::Entry {
            action: crate::audit::Action::Unmerge,
            actor: crate::audit::actor(),
            subjects: chain.subjects(&concerned),
            detail: serde_json::json!({"merge": merge_id, "restored": merge.from, "survivor": survivor}),
        };
        chain.record(&self.store, &mut batch, vec![entry], now);
        if let Err(error) = batch.commit() {
            self.poisoned.store(true, Ordering::Release);
            return Err(error.into());
        }
        drop(chain);
        {
            let mut columns = self.trait_columns.write();
            columns.update(survivor, &survivor_record.traits);
            columns.update(merge.from, &restored.traits);
        }
        self.mirror_consents(&consent_rows);
        let mut hot = self.hot.write();
        let moved_events = back.len();
        hot.replace(merge.from, back.into_iter().map(|(_, h)| h).collect());
        hot.replace(
            survivor,
            survivor_events.into_iter().map(|(_, h)| h).collect(),
        );
        drop(hot);
        self.liveness.write().set(merge.from, true);
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
        Ok(self.remove(profile, false)?.0)
    }

    /// Erases a person (right to be forgotten): everything [`Engine::remove_profile`] removes,
    /// the quarantined messages that name one of their identifiers, then fjall's journal
    /// sealed and deleted and the keyspaces that held their identifiers compacted, so that no
    /// byte of those identifiers is left in any file of the data directory (event bodies and
    /// redo records are overwritten with zeros in the log). A keyed hash of each identifier is
    /// kept (`suppressed`): a later message or import naming one is quarantined as `erased`,
    /// without its content. Returns the receipt, which the audit log records too.
    pub fn erase_profile(&self, profile: u32) -> Result<crate::records::ErasureReceipt> {
        let started = std::time::Instant::now();
        let ms = |since: std::time::Instant| since.elapsed().as_secs_f64() * 1000.0;
        let (removal, quarantined) = self.remove(profile, true)?;
        let mut timings = crate::records::ErasureTimings {
            removal_ms: ms(started),
            ..Default::default()
        };
        let phase = std::time::Instant::now();
        // Their exits are written (consumers of the feed learn they left), then every earlier
        // entry naming them goes from the feed and the segments' size history.
        self.drain_segments()?;
        let mut gone: rustc_hash::FxHashSet<u32> =
            removal.merged_profiles_removed.iter().copied().collect();
        gone.insert(profile);
        let feed_entries_removed = self.erase_membership_history(&gone)?;
        let webhook_deliveries_removed = self.forget_in_webhooks(&gone)?;
        timings.history_ms = ms(phase);
        let phase = std::time::Instant::now();
        // Every journal that may hold the person's keys or records is flushed and deleted
        // (the writer waits meanwhile: no batch lands in a journal being sealed).
        {
            let _writer = self.state.lock();
            self.store.checkpoint()?;
        }
        timings.journal_ms = ms(phase);
        let phase = std::time::Instant::now();
        let compacted = crate::store::HOLDING_IDENTIFIERS;
        self.store.purge(&compacted)?;
        timings.rewrite_ms = ms(phase);
        let subjects = self.audit_chain().subjects(&removal.identifiers_removed);
        Ok(crate::records::ErasureReceipt {
            profile,
            subjects,
            events_removed: removal.events_removed,
            merged_profiles_removed: removal.merged_profiles_removed,
            quarantined_removed: quarantined,
            feed_entries_removed,
            webhook_deliveries_removed,
            keyspaces_compacted: compacted.into_iter().map(str::to_string).collect(),
            seconds: started.elapsed().as_secs_f64(),
            timings,
        })
    }

    /// Puts in `batch` the removal of every quarantined message `matches` picks (and its dedup
    /// key); returns how many.
    pub(crate) fn remove_quarantined(
        &self,
        batch: &mut fjall::OwnedWriteBatch,
        matches: impl Fn(&QuarantineRecord) -> bool,
    ) -> Result<u64> {
        let mut removed = 0u64;
        for entry in self.store.quarantine.iter() {
            let (key, value) = entry.into_inner()?;
            let kept: QuarantineRecord =
                serde_json::from_slice(&value).map_err(|e| corrupt("quarantine", e))?;
            if matches(&kept) {
                batch.remove(&self.store.quarantine, key);
                batch.remove(&self.store.qkeys, crate::ingest::quarantine_key(&kept.raw));
                removed += 1;
            }
        }
        Ok(removed)
    }

    /// Removes the change feed's and the size history's entries naming these profiles, but
    /// for the exits of their erasure. Returns how many went.
    fn erase_membership_history(&self, profiles: &rustc_hash::FxHashSet<u32>) -> Result<u64> {
        use crate::segment::feed::{Cause, FeedChange};
        let mut batch = self.store.synced_batch();
        let mut removed = 0u64;
        for entry in self.store.changes.iter() {
            let (key, value) = entry.into_inner()?;
            let change: FeedChange =
                serde_json::from_slice(&value).map_err(|e| corrupt("changes", e))?;
            let last_exit = change.cause == Cause::Erasure && !change.entered;
            if profiles.contains(&change.profile) && !last_exit {
                batch.remove(&self.store.changes, key);
                removed += 1;
            }
        }
        for entry in self.store.segment_log.iter() {
            let (key, value) = entry.into_inner()?;
            let change: crate::segment::Change =
                serde_json::from_slice(&value).map_err(|e| corrupt("segment_log", e))?;
            if profiles.contains(&change.profile) {
                batch.remove(&self.store.segment_log, key);
                removed += 1;
            }
        }
        if removed > 0 {
            self.commit_or_poison(batch)?;
        }
        Ok(removed)
    }

    fn remove(&self, profile: u32, erase: bool) -> Result<(RemovalOutcome, u64)> {
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
        let mut batch = self.store.synced_batch();
        let mut removed_hashes = Vec::new();
        let mut bodies = Vec::new();
        for entry in self.store.events.prefix(profile_key(profile)) {
            let (key, value) = entry.into_inner()?;
            let message: Message = message_of(&self.store, &value)?;
            bodies.push(entry_of(&value)?.location);
            batch.remove(&self.store.msgids, message.message_id.as_bytes());
            removed_hashes.push(message_hash(&message.message_id));
            batch.remove(&self.store.events, key);
        }
        for ident in &record.identifiers {
            batch.remove(&self.store.idents, ident.as_bytes());
        }
        batch.remove(&self.store.profiles, profile_key(profile));
        let mut consent_rows = vec![(
            profile,
            self.store
                .write_consents(&mut batch, profile, &Default::default())?,
        )];
        let mut merged_profiles = Vec::new();
        for merge in self.all_merges()? {
            if state.find(merge.into) == profile || merge.from == profile {
                batch.remove(&self.store.merges, merge.id.to_be_bytes());
                batch.remove(
                    &self.store.merged_into,
                    merged_into_key(merge.into, merge.id),
                );
                if merge.unmerged_at.is_none() && merge.from != profile {
                    batch.remove(&self.store.profiles, profile_key(merge.from));
                    consent_rows.push((
                        merge.from,
                        self.store
                            .write_consents(&mut batch, merge.from, &Default::default())?,
                    ));
                    merged_profiles.push(merge.from);
                }
            }
        }
        // An erasure: the quarantined messages naming the person go too, and a keyed hash of
        // each identifier stays, to refuse the person's later messages.
        let mut quarantined = 0u64;
        let mut suppressed = Vec::new();
        if erase {
            let values: Vec<&str> = record
                .identifiers
                .iter()
                .map(|i| i.get(2..).unwrap_or_default())
                .collect();
            quarantined = self.remove_quarantined(&mut batch, |kept| {
                crate::view::names_any(&kept.raw, &values)
            })?;
            for ident in &record.identifiers {
                let hashed = crate::audit::subject(&state.secret, ident);
                batch.insert(&self.store.suppressed, hashed.as_bytes(), []);
                suppressed.push(hashed);
            }
        }
        // Every batch the writer committed is durable once this one is (it syncs fjall's
        // journal, and the writer lock is held): their redo records, which may name the
        // person, can go.
        let committed = self.store.log.committed();
        let mut chain = self.audit_chain();
        let entry = crate::audit::Entry {
            action: if erase {
                crate::audit::Action::Erasure
            } else {
                crate::audit::Action::ProfileRemoval
            },
            actor: crate::audit::actor(),
            subjects: chain.subjects(&record.identifiers),
            detail: serde_json::json!({"profile": profile, "events": removed_hashes.len(),
                "merged_profiles": merged_profiles, "quarantined": quarantined}),
        };
        chain.record(
            &self.store,
            &mut batch,
            vec![entry],
            crate::time::wall_clock_ms(),
        );
        self.commit_or_poison(batch)?;
        drop(chain);
        // Nothing points at the bodies (nor the redo records naming them) any more.
        self.or_poison(|| Ok(self.store.log.retire(committed)?))?;
        self.overwrite_bodies(&bodies)?;
        for ident in &record.identifiers {
            state.idents.remove(ident);
        }
        state.suppressed.extend(suppressed);
        state.seen.remove_all(&removed_hashes);
        state.profiles[profile as usize] = ProfileMeta::default();
        for merged in &merged_profiles {
            // Merged-away ordinals now lead nowhere.
            state.profiles[*merged as usize] = ProfileMeta::default();
        }
        self.hot.write().replace(profile, Vec::new());
        {
            let mut liveness = self.liveness.write();
            for gone in std::iter::once(&profile).chain(&merged_profiles) {
                liveness.set(*gone, false);
            }
        }
        {
            let mut columns = self.trait_columns.write();
            for gone in std::iter::once(&profile).chain(&merged_profiles) {
                columns.update(*gone, &BTreeMap::new());
            }
        }
        self.mirror_consents(&consent_rows);
        drop(state);
        let mut touched = crate::segment::live::Touched::default();
        touched.all.insert(profile);
        touched.all.extend(merged_profiles.iter().copied());
        let cause = if erase {
            crate::segment::feed::Cause::Erasure
        } else {
            crate::segment::feed::Cause::ProfileEdit
        };
        self.hand_off(touched, cause, crate::time::wall_clock_ms())?;
        Ok((
            RemovalOutcome {
                profile,
                events_removed: removed_hashes.len() as u64,
                identifiers_removed: record.identifiers,
                merged_profiles_removed: merged_profiles,
            },
            quarantined,
        ))
    }

    /// Creates an API key with no origin and no rate limit (see [`Engine::create_key_with`]).
    pub fn create_key(&self, kind: KeyKind, name: &str, now: i64) -> Result<String> {
        let spec = crate::keys::KeySpec {
            kind,
            name: name.to_string(),
            ..Default::default()
        };
        self.create_key_with(spec, now)
    }

    /// Creates an API key and returns it in clear text (the only time it is shown).
    pub fn create_key_with(&self, spec: crate::keys::KeySpec, now: i64) -> Result<String> {
        let spec = spec.validated().map_err(EngineError::Invalid)?;
        let (kind, name) = (spec.kind, spec.name.as_str());
        let key = new_key(kind);
        let record = KeyRecord {
            kind,
            name: name.to_string(),
            created_at: now,
            prefix: key[..12].to_string(),
            origins: spec.origins.clone(),
            rate_limit: spec.rate_limit,
        };
        let hash = key_hash(&key);
        let mut batch = self.store.db.batch();
        batch.insert(&self.store.keys, hash.as_bytes(), to_json(&record));
        let entry = crate::audit::Entry {
            action: crate::audit::Action::KeyCreate,
            actor: crate::audit::actor(),
            subjects: Vec::new(),
            detail: serde_json::json!({
                "kind": kind, "name": name, "prefix": record.prefix,
                "origins": record.origins, "rate_limit": record.rate_limit,
            }),
        };
        self.commit_audited(batch, entry, now)?;
        self.api_keys.write().insert(hash, Arc::new(record));
        Ok(key)
    }

    /// Revokes a key, named by itself or by the prefix `cible key list` shows (refused when
    /// several keys share it); returns its record. Its next request is refused.
    pub fn revoke_key(&self, key_or_prefix: &str, now: i64) -> Result<KeyRecord> {
        // As `cible key list` prints it, ellipsis included.
        let key_or_prefix = key_or_prefix.trim().trim_end_matches('…');
        let hash = {
            let keys = self.api_keys.read();
            let exact = key_hash(key_or_prefix);
            if keys.contains_key(&exact) {
                exact
            } else {
                let matching: Vec<&String> = keys
                    .iter()
                    .filter(|(_, record)| record.prefix == key_or_prefix)
                    .map(|(hash, _)| hash)
                    .collect();
                match matching.as_slice() {
                    [hash] => (*hash).clone(),
                    [] => return Err(EngineError::NotFound(format!("key {key_or_prefix:?}"))),
                    several => {
                        return Err(EngineError::Invalid(format!(
                            "{} keys start with {key_or_prefix:?}: give the key itself",
                            several.len()
                        )));
                    }
                }
            }
        };
        let record = KeyRecord::clone(self.api_keys.read().get(&hash).expect("found above"));
        let mut batch = self.store.db.batch();
        batch.remove(&self.store.keys, hash.as_bytes());
        let entry = crate::audit::Entry {
            action: crate::audit::Action::KeyRevoke,
            actor: crate::audit::actor(),
            subjects: Vec::new(),
            detail: serde_json::json!({"kind": record.kind, "name": record.name, "prefix": record.prefix}),
        };
        self.commit_audited(batch, entry, now)?;
        self.api_keys.write().remove(&hash);
        Ok(record)
    }

    /// What a presented key may do, if it is one of ours.
    pub fn key_kind(&self, key: &str) -> Option<KeyKind> {
        self.api_keys
            .read()
            .get(&key_hash(key))
            .map(|record| record.kind)
    }

    /// The pseudonymizer of exports, under the store's current key.
    pub fn pseudonymizer(&self) -> Result<crate::pseudonym::Pseudonymizer> {
        self.pseudonym
            .lock()
            .as_ref()
            .map(crate::pseudonym::PseudonymKey::pseudonymizer)
            .ok_or_else(|| {
                EngineError::Invalid(
                    "this store has no pseudonym key yet: open it once with `cible serve`".into(),
                )
            })
    }

    /// Replaces the pseudonym key by a new version and destroys the old one (audited);
    /// returns the new version. Pseudonyms made before no longer match those made after.
    pub fn rotate_pseudonym_key(&self, now: i64) -> Result<u32> {
        let mut current = self.pseudonym.lock();
        let version = current.as_ref().map_or(1, |key| key.version + 1);
        let key = crate::pseudonym::PseudonymKey::generate(version, now);
        let mut batch = self.store.db.batch();
        batch.insert(&self.store.meta, crate::pseudonym::KEY, to_json(&key));
        let entry = crate::audit::Entry {
            action: crate::audit::Action::PseudonymRotate,
            actor: crate::audit::actor(),
            subjects: Vec::new(),
            detail: serde_json::json!({"version": version}),
        };
        self.commit_audited(batch, entry, now)?;
        *current = Some(key);
        Ok(version)
    }

    /// A presented key's record, if it is one of ours.
    pub fn key_record(&self, key: &str) -> Option<Arc<KeyRecord>> {
        self.api_keys.read().get(&key_hash(key)).cloned()
    }

    /// Whether some write key lets pages of `origin` send events (a CORS preflight carries
    /// no key; the request that follows is checked against its own key's origins).
    pub fn any_key_allows_origin(&self, origin: &str) -> bool {
        self.api_keys
            .read()
            .values()
            .any(|record| record.kind == KeyKind::Write && record.allows_origin(origin))
    }

    /// Every key's record (never the key itself).
    pub fn list_keys(&self) -> Vec<KeyRecord> {
        let mut keys: Vec<KeyRecord> = self
            .api_keys
            .read()
            .values()
            .map(|record| KeyRecord::clone(record))
            .collect();
        keys.sort_by_key(|k| k.created_at);
        keys
    }
}

impl Engine {
    /// On close, once nothing can write any more: the hot store's snapshot and its token (see
    /// [`crate::snapshot`]).
    fn write_snapshot(&mut self) -> Result<()> {
        // The lock order: the writer's state (the dedup hashes), then the hot store.
        let state = self.state.lock();
        let hot = self.hot.read();
        Ok(crate::snapshot::save(
            &self.store,
            &self.data_dir,
            &hot,
            &state.seen.all(),
        )?)
    }
}

impl Drop for Engine {
    /// Leaves no journal to replay: what is still only in memtables is written out to tables, so
    /// the next open (a CLI command after another) does not replay it.
    fn drop(&mut self) {
        if self.poisoned.load(Ordering::Acquire) {
            return;
        }
        if let Err(error) = self.flush_bulk(&mut self.state.lock()) {
            tracing::warn!(error = %error, "writing an import's last entries on close failed; the next open drops its last events");
            return;
        }
        // Before the checkpoint, so that its token goes to a table rather than the journal. Not
        // while panicking: memory may be ahead of or behind the store.
        if !self.light
            && !std::thread::panicking()
            && let Err(error) = self.write_snapshot()
        {
            tracing::warn!(error = %error, "writing the hot store's snapshot failed; the next open scans the store");
        }
        // Also when the memtables are empty: fjall may have flushed them without sealing the
        // journal, which the next open would then read through.
        if let Err(error) = self.store.checkpoint() {
            tracing::warn!(error = %error, "checkpoint on close failed; the next open replays the journal");
        }
    }
}

/// The rows of a range of profiles, in key order, and where each profile's rows end.
#[derive(Default)]
struct Scanned {
    rows: Vec<crate::hot::HotEvent>,
    /// The other keys of the rows that have some (most have none), by row index.
    others: Vec<(usize, crate::hot::OtherKeys)>,
    ends: Vec<(u32, usize)>,
}

/// A configuration file of the data directory read with `parse`, its default when absent; an
/// error names the file and the reason.
fn read_config<T: Default>(
    dir: &Path,
    name: &str,
    parse: impl FnOnce(&str) -> std::result::Result<T, String>,
) -> Result<T> {
    let path = dir.join(name);
    match std::fs::read_to_string(&path) {
        Ok(text) => parse(&text)
            .map_err(|reason| EngineError::Invalid(format!("{}: {reason}", path.display()))),
        Err(error) if error.kind() == std::io::ErrorKind::NotFound => Ok(T::default()),
        Err(error) => Err(EngineError::Invalid(format!("{}: {error}", path.display()))),
    }
}

/// Timelines of a range of profiles and the messageId hashes seen while scanning it.
type ScannedRange = (Scanned, Vec<u64>);

/// Rebuilds the hot store, with property columns for `columns`, and collects the messageId
/// hashes from the hot rows of the `events` entries, scanning ranges of profiles in parallel (timelines of
/// different profiles are disjoint).
/// The hot store of the profiles in `ranges`, and the messageId hashes of their events.
/// `population` (events, profiles), when the ranges cover every profile, sizes the buffers
/// ahead: grown by doubling, they had the kernel zeroing pages for most of an open.
fn load_hot(
    store: &Store,
    ranges: &[(u32, u32)],
    columns: &[u8],
    population: Option<(u64, u32)>,
) -> Result<(HotStore, Vec<u64>)> {
    let expected = |start: u32, end: u32| -> usize {
        population.map_or(0, |(events, profiles)| {
            let share = events as u128 * u128::from(end - start) / u128::from(profiles.max(1));
            // Activity varies between ranges of profiles: a quarter more, then doubling.
            (share + share / 4) as usize
        })
    };
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
            // One vector of rows for the range and each profile's end in it: a vector per
            // profile, grown row by row, had the kernel zeroing fresh pages for two thirds of
            // an open's time.
            let (mut scanned, mut hashes): ScannedRange = (Scanned::default(), Vec::new());
            scanned.rows.reserve(expected(start, end));
            hashes.reserve(expected(start, end));
            for entry in store.events.range(profile_key(start)..profile_key(end)) {
                let (key, value) = entry.into_inner()?;
                let (profile, ts, _) = key_of("events", &key)?;
                let record = entry_of(&value)?.record;
                hashes.push(record.message_hash);
                if scanned.ends.last().is_none_or(|(p, _)| *p != profile) {
                    scanned.ends.push((profile, scanned.rows.len()));
                }
                if !record.others.is_empty() {
                    scanned.others.push((scanned.rows.len(), record.others));
                }
                scanned.rows.push(record.to_hot(ts));
                if let Some(last) = scanned.ends.last_mut() {
                    last.1 = scanned.rows.len();
                }
            }
            Ok((scanned, hashes))
        })
        .collect();
    let mut hot = HotStore::with_columns(columns);
    let mut all_hashes = Vec::with_capacity(population.map_or(0, |(events, _)| events as usize));
    for part in scanned {
        let (scanned, hashes) = part?;
        let (mut start, mut others_start) = (0, 0);
        let mut others: Vec<(usize, crate::hot::OtherKeys)> = Vec::new();
        for (profile, end) in scanned.ends {
            others.clear();
            while let Some((row, keys)) = scanned.others.get(others_start)
                && *row < end
            {
                others.push((row - start, *keys));
                others_start += 1;
            }
            hot.replace_sorted(profile, &scanned.rows[start..end], &others);
            start = end;
        }
        all_hashes.extend(hashes);
    }
    hot.shrink_to_fit();
    Ok((hot, all_hashes))
}

fn live_profiles(state: &State) -> usize {
    state.profiles.iter().filter(|m| m.alive).count()
}

/// The stored message an `events` entry points at.
pub(crate) fn message_of(store: &Store, value: &[u8]) -> Result<Message> {
    let body = store.log.read(entry_of(value)?.location)?;
    crate::codec::decode(&body).map_err(|e| corrupt("events", e))
}

/// The identity graph (identifiers, merges) from the store into the writer's state.
fn load_identities(store: &Store, state: &mut State) -> Result<()> {
    for entry in store.idents.iter() {
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
    for entry in store.merges.iter() {
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
    Ok(())
}

/// Refuses a store written by a newer cible; brings an older one to this layout (version 1
/// stores only lack the `changes` keyspace, which opens empty; version 2 stores hold event
/// bodies as JSON in `events`, moved into the event log here) and stamps it.
fn check_schema(store: &Store) -> Result<()> {
    use crate::store::{SCHEMA_KEY, SCHEMA_VERSION};
    let found = match store.meta.get(SCHEMA_KEY)? {
        Some(bytes) => std::str::from_utf8(&bytes)
            .ok()
            .and_then(|text| text.parse::<u32>().ok())
            .ok_or_else(|| corrupt("meta", "schema_version is not a number"))?,
        // A store without the key is new (nothing in it) or of version 1.
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
    if found < 3 {
        move_bodies_to_log(store)?;
        members_to_entries(store)?;
    }
    if found < 4 {
        index_merges_by_survivor(store)?;
    }
    if found < SCHEMA_VERSION {
        store
            .meta
            .insert(SCHEMA_KEY, SCHEMA_VERSION.to_string().as_bytes())?;
    }
    Ok(())
}

/// Finishes or undoes a bulk import cut short (see [`crate::ingest::Bulk`]).
fn recover_bulk(store: &Store) -> Result<()> {
    let Some(marker) = store.meta.get(crate::ingest::BULK_KEY)? else {
        return Ok(());
    };
    let from = crate::eventlog::Position::decode(marker.get(..12).unwrap_or_default())
        .ok_or_else(|| corrupt("meta", "bulk marker"))?;
    let records_written = marker.get(12) == Some(&1);
    let probe = marker.get(13..).unwrap_or_default();
    // The index tables are written after the records, in one step each: the probe entry says.
    let written = records_written && (probe.is_empty() || store.events.contains_key(probe)?);
    let records = store.log.records_between(from, store.log.head())?;
    let mut batch = store.synced_batch();
    for (_, body) in &records {
        // A body already zeroed by an earlier attempt had its messageId forgotten then.
        let Some(body) = body else { continue };
        let message = crate::codec::decode(body).map_err(|e| corrupt("event log", e))?;
        if written {
            batch.insert(&store.msgids, message.message_id.as_bytes(), []);
        } else {
            batch.remove(&store.msgids, message.message_id.as_bytes());
        }
    }
    if written && let Some(counters) = store.meta.get(crate::ingest::BULK_COUNTERS_KEY)? {
        batch.insert(&store.meta, COUNTERS_KEY, counters);
    }
    batch.commit()?;
    if !written {
        for (location, _) in &records {
            store.log.erase(*location)?;
        }
        store.log.sync()?;
    }
    let mut batch = store.synced_batch();
    batch.remove(&store.meta, crate::ingest::BULK_KEY);
    batch.remove(&store.meta, crate::ingest::BULK_COUNTERS_KEY);
    batch.commit()?;
    // Kept: the tables were written; otherwise the events are dropped: import the file again.
    tracing::warn!(
        events = records.len(),
        kept = written,
        "an import cut short was recovered"
    );
    Ok(())
}

/// Layout 2 to 3, memberships: a store of layout 2 kept each segment's members as a bitmap in
/// a `members` keyspace, beside one `entries` key per member; layout 3 keeps the entries only.
/// A member missing its entry gets one (entered at 0: unknown), then the keyspace is deleted.
fn members_to_entries(store: &Store) -> Result<()> {
    if !store.db.keyspace_exists("members") {
        return Ok(());
    }
    let members = store
        .db
        .keyspace("members", fjall::KeyspaceCreateOptions::default)?;
    let mut batch = store.synced_batch();
    for entry in members.iter() {
        let (name, bytes) = entry.into_inner()?;
        let name = std::str::from_utf8(&name).map_err(|e| corrupt("members", e))?;
        let bitmap = roaring::RoaringBitmap::deserialize_from(bytes.as_ref())
            .map_err(|e| corrupt("members", e))?;
        for profile in bitmap {
            let key = crate::store::entry_key(name, profile);
            if !store.entries.contains_key(&key)? {
                batch.insert(&store.entries, key, 0i64.to_be_bytes());
            }
        }
    }
    batch.commit()?;
    store.db.delete_keyspace(members)?;
    Ok(())
}

/// Layout 3 to 4: every merge record gets its `merged_into` key (one batch: a store has one
/// merge per absorbed profile at most, 12 bytes each).
fn index_merges_by_survivor(store: &Store) -> Result<()> {
    let mut batch = store.synced_batch();
    for entry in store.merges.iter() {
        let (_, value) = entry.into_inner()?;
        let merge: MergeRecord =
            serde_json::from_slice(&value).map_err(|e| corrupt("merges", e))?;
        batch.insert(
            &store.merged_into,
            merged_into_key(merge.into, merge.id),
            [],
        );
    }
    batch.commit()?;
    Ok(())
}

/// Layout 2 to 3: every JSON body in `events` goes to the event log, and its entry becomes the
/// body's location followed by its hot row (read from the old `hot` keyspace, deleted at the
/// end). Done in chunks, each committed with the log's new end after the log is synced, so an
/// interrupted migration goes on where it stopped at the next open (an entry already moved
/// does not start with `{`, as JSON does).
fn move_bodies_to_log(store: &Store) -> Result<()> {
    const CHUNK: usize = 16_384;
    if !store.db.keyspace_exists("hot") {
        // A new store, or one whose migration finished.
        return Ok(());
    }
    let hot = store
        .db
        .keyspace("hot", fjall::KeyspaceCreateOptions::default)?;
    let started = std::time::Instant::now();
    let mut moved = 0u64;
    type Chunk = Vec<(fjall::Slice, Vec<u8>, crate::store::HotRecord)>;
    let mut chunk: Chunk = Vec::with_capacity(CHUNK);
    let flush = |chunk: &mut Chunk| -> Result<()> {
        if chunk.is_empty() {
            return Ok(());
        }
        let (locations, head) = store
            .log
            .append(chunk.iter().map(|(_, b, _)| b.as_slice()))?;
        store.log.sync()?;
        let mut batch = store.synced_batch();
        for ((key, _, record), location) in chunk.drain(..).zip(locations) {
            batch.insert(&store.events, key, EventEntry { location, record }.encode());
        }
        batch.insert(&store.meta, crate::eventlog::HEAD_KEY, head.encode());
        batch.commit()?;
        Ok(())
    };
    for entry in store.events.iter() {
        let (key, value) = entry.into_inner()?;
        if value.first() != Some(&b'{') {
            continue;
        }
        let message: Message = serde_json::from_slice(&value).map_err(|e| corrupt("events", e))?;
        let record = hot
            .get(&key)?
            .and_then(|v| crate::store::HotRecord::decode(&v))
            .ok_or_else(|| corrupt("hot", "an event without its hot row"))?;
        chunk.push((key, crate::codec::encode(&message), record));
        moved += 1;
        if chunk.len() >= CHUNK {
            flush(&mut chunk)?;
        }
    }
    flush(&mut chunk)?;
    store.db.delete_keyspace(hot)?;
    if moved > 0 {
        tracing::info!(
            events = moved,
            seconds = started.elapsed().as_secs_f64(),
            "moved event bodies into the event log (store layout 3)"
        );
    }
    Ok(())
}

/// Traits as the fold of identify calls, latest message time winning.
fn fold_traits<'a>(messages: impl Iterator<Item = &'a Message>) -> BTreeMap<String, TraitValue> {
    let mut record = ProfileRecord::default();
    for message in messages.filter(|m| m.kind == MessageType::Identify) {
        record.apply_traits(&message.traits, message.timestamp);
    }
    record.traits
}

#[cfg(test)]
mod tests;
