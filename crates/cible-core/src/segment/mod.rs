//! Segments: rules stored with their membership (a roaring bitmap of profile ordinals) and a log
//! of every enter and exit with its time. Creating or editing a segment backfills it over every
//! profile in parallel; a segment built on others is evaluated after them and reads their stored
//! membership; cycles are refused with the cycle named.

pub mod eval;
pub mod feed;
pub mod live;
pub mod plan;
pub mod worker;

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Instant;

use cible_lang::Expr;
use rayon::prelude::*;
use roaring::RoaringBitmap;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};

use crate::scoring::{Lazy, Setup};

/// Keys a segment's deletion removes per store batch (see [`Segmenter::clear_segment_keys`]).
const KEYS_PER_BATCH: usize = 2048;
use crate::error::EngineError;
use crate::hot::{HotChunk, HotStore};
use crate::lock::{Level, Ordered, OrderedMutex};
use crate::records::TraitValue;
use crate::store::Store;
use crate::store::profile_key;
use crate::trait_columns::TraitColumns;
use eval::{Context, FullEvent, HotEvents, MessageEvents, evaluate};
use live::SegmentsState;
use parking_lot::RwLockReadGuard;
use plan::{Dictionaries, Plan, ValueNode};
use worker::WorkQueue;

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// A stored segment.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SegmentRecord {
    pub name: String,
    /// The rule as canonical text.
    pub rule: String,
    /// The rule's syntax tree (its JSON form).
    pub ast: Expr,
    pub created_at: i64,
    pub updated_at: i64,
    pub size: u64,
    pub last_backfill: Option<BackfillReport>,
}

/// What a backfill did, shown wherever the segment is shown.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BackfillReport {
    pub at: i64,
    pub duration_ms: u64,
    pub profiles: u64,
    pub members: u64,
    pub entered: u64,
    pub exited: u64,
    /// Profiles evaluated on their full messages (a property the hot rows do not hold).
    pub via_messages: u64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One enter or exit.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Change {
    pub at: i64,
    pub profile: u32,
    pub entered: bool,
    /// Size of the segment right after this change.
    pub size: u64,
}

/// The result of a preview: nothing is saved.
#[derive(Debug, Clone, Serialize)]
pub struct Preview {
    pub count: u64,
    pub sample: Vec<u32>,
    pub profiles: u64,
    pub duration_ms: u64,
}

/// Twenty varied rules over the data `cible generate` writes: the differential test against
/// SQLite and the segment benchmark both use them (a test fixture: feature `fixtures`).
#[cfg(any(test, feature = "fixtures"))]
pub const BATTERY: [&str; 20] = [
    r#"count("Email Opened", 7d) >= 3 and did("Product Viewed" where product_id = "P123", 30d) and not did("Order Completed", 30d)"#,
    r#"count("Email Opened", 7d) >= 1 and did("Product Viewed" where product_id = "P123", 30d) and not did("Order Completed", 30d)"#,
    r#"sum("Order Completed".revenue, 365d) > 500"#,
    r#"did("Product Added", 3d) and not did("Order Completed", 3d)"#,
    r#"days_since("Order Completed") > 60"#,
    r#"count("Page Viewed" where path starts_with "/blog/", 14d) >= 2 or trait.plan = "pro""#,
    r#"count("Product Viewed" where category = "shoes", 30d) >= 2"#,
    r#"avg("Order Completed".revenue, 90d) >= 150 and max("Product Viewed".price, 30d) < 100"#,
    r#""Product Added" then not "Order Completed" within 24h"#,
    r#""Email Link Clicked" then "Order Completed" within 2d"#,
    r#"days_since_last_seen() > 20 and days_since_first_seen() > 40"#,
    r#"trait.country in ("FR", "BE") and not (trait.plan = "free")"#,
    r#"did("Product Viewed" where category in ("bags", "watches") and price >= 100, 14d)"#,
    r#"min("Page Viewed".duration_s, 7d) < 10 and count("Page Viewed", 7d) >= 5"#,
    r#"not did("Email Opened", 14d) and days_since_first("Order Completed") <= 30"#,
    r#"did("Page Viewed" where path != "/", 2d) or count("Email Opened" where campaign_id starts_with "promo", 30d) >= 2"#,
    r#"count("Order Completed", 365d) >= 3 and days_since("Order Completed") <= 30"#,
    r#"did("Email Link Clicked", 30d) and not did("Order Completed", 30d)"#,
    r#"count("Product Viewed" where product_id in ("P012", "P123", "P305"), 90d) >= 1"#,
    r#"sum("Order Completed".revenue, 30d) >= 200 or (did("Checkout Started", 7d) and not did("Order Completed", 7d))"#,
];

/// The answer of `Engine::explain`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Explanation {
    pub segment: String,
    pub profile: u32,
    pub rule: String,
    /// Stored membership.
    pub member: bool,
    /// The rule's verdict at the time asked.
    pub matches_now: bool,
    /// When the verdict may next change by itself.
    pub next_change: Option<String>,
    pub conditions: Vec<eval::Explained>,
}

pub use crate::records::DictSnapshot;

impl Dictionaries for DictSnapshot {
    fn name_id(&self, name: &str) -> Option<u16> {
        self.names.get(name).copied()
    }
    fn keys(&self) -> &[String] {
        &self.keys
    }
}

/// One rule's members within a chunk of profiles, and its full-message evaluations.
type ChunkResult = (Vec<u32>, u64);

/// Everything one evaluation pass over the profiles reads.
pub(crate) struct RuleRun<'a> {
    plan: &'a Plan,
    hot: &'a crate::hot::HotStore,
    dictionaries: &'a DictSnapshot,
    /// Seconds since the epoch.
    now: u32,
    /// Traits of the profiles being evaluated, read once for all segments of a pass (empty
    /// when no segment reads traits).
    traits: &'a FxHashMap<u32, BTreeMap<String, TraitValue>>,
    dependencies: &'a FxHashMap<String, RoaringBitmap>,
    /// The computed-traits plan and calibration, when the rule reads computed traits.
    computed: Option<&'a Setup>,
    consents: &'a crate::consent::ConsentIndex,
    /// Who models may score (see [`crate::scoring::Setup::traits`]).
    profiling: &'a crate::consent::ConsentCheck,
}

/// The segments a rule refers to.
fn references(expr: &Expr) -> Vec<String> {
    cible_lang::check::segment_references(expr)
        .into_iter()
        .map(|(name, _)| name)
        .collect()
}

/// Each segment with the segments its rule refers to.
pub(crate) fn dependencies_of(records: &[SegmentRecord]) -> BTreeMap<String, Vec<String>> {
    records
        .iter()
        .map(|r| (r.name.clone(), references(&r.ast)))
        .collect()
}

/// Segment names: lower-case letters, digits, `_` and `-`, up to 64.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_' || c == '-')
}

pub(crate) use crate::records::to_json;

/// Whether some comparison of a plan reads a value matching `wanted`.
fn any_value(node: &plan::Node, wanted: &dyn Fn(&ValueNode) -> bool) -> bool {
    match node {
        plan::Node::And(args) | plan::Node::Or(args) => args.iter().any(|a| any_value(a, wanted)),
        plan::Node::Not(arg) => any_value(arg, wanted),
        plan::Node::Compare { value, .. } => wanted(value),
        _ => false,
    }
}

/// Whether a plan reads computed traits.
pub(crate) fn uses_computed(node: &plan::Node) -> bool {
    any_value(node, &|v| matches!(v, ValueNode::Computed(_)))
}

/// The trait names (first part of `trait.a.b`) a plan reads.
pub(crate) fn trait_names(node: &plan::Node, out: &mut Vec<String>) {
    match node {
        plan::Node::And(args) | plan::Node::Or(args) => {
            args.iter().for_each(|a| trait_names(a, out));
        }
        plan::Node::Not(arg) => trait_names(arg, out),
        plan::Node::Compare {
            value: ValueNode::Trait(path),
            ..
        } => out.extend(path.first().cloned()),
        _ => {}
    }
}

pub(crate) fn uses_traits(node: &plan::Node) -> bool {
    any_value(node, &|v| matches!(v, ValueNode::Trait(_)))
}

/// What segments read of the rest of the engine, implemented by `Engine`: the one seam through
/// which this module sees profiles, their events and their traits. Segments depend on it and on
/// the modules below the engine (store, hot store, computed traits, trait columns), never on the
/// engine itself.
pub(crate) trait Population: Sync {
    fn store(&self) -> &Store;
    fn metrics(&self) -> &crate::metrics::Metrics;
    /// The event-name dictionary, and the key texts too when `with_keys`.
    fn dictionary_snapshot(&self, with_keys: bool) -> DictSnapshot;
    /// Sizes of the two dictionaries as of the last committed batch (never waits for the writer).
    fn dictionary_sizes(&self) -> (usize, usize);
    /// Ordinals of every live profile, ascending.
    fn live_profiles(&self) -> Vec<u32>;
    /// Whether each of these profiles is live (never waits for the writer).
    fn alive_flags(&self, profiles: &[u32]) -> Vec<bool>;
    fn hot(&self) -> Ordered<RwLockReadGuard<'_, HotStore>>;
    /// The hot store for one chunk of a pass (a copy when the chunk is dense).
    fn hot_chunk(&self, profiles: &[u32]) -> HotChunk<'_>;
    fn trait_columns(&self) -> Ordered<RwLockReadGuard<'_, TraitColumns>>;
    /// Builds the property columns these rules' filters need.
    fn ensure_rule_columns(&self, rules: &[&Expr]) -> Result<()>;
    /// Keeps in memory the traits with these names.
    fn ensure_trait_columns(&self, names: &[String]) -> Result<()>;
    /// What a rule on computed traits reads: their plan, calibration and models.
    fn computed(&self, dictionaries: &DictSnapshot, now: i64) -> Result<Setup>;
    /// Plans the computed traits again, for grown dictionaries.
    fn replan_computed(&self, setup: &mut Setup, dictionaries: &DictSnapshot);
    /// A profile's stored traits.
    fn profile_traits(&self, profile: u32) -> Result<BTreeMap<String, TraitValue>>;
    /// Names of the stored models (a rule may read their scores).
    fn model_names(&self) -> Result<Vec<String>>;
    /// The consent purposes (a rule may read `consent.<purpose>`).
    fn purpose_names(&self) -> Vec<String>;
    /// Every profile's current consents, as of the last commit.
    fn consents(&self) -> std::sync::Arc<crate::consent::ConsentIndex>;
    /// What a processing for `purpose` may touch (`Engine::consent_check`).
    fn consent_check(&self, purpose: &str) -> Result<crate::consent::ConsentCheck>;
}

/// The segments component: the worker's state (every live segment, the timers, the feed's
/// writer) behind the lowest lock of the order, the queue of committed batches, and the running
/// backfill's progress. It owns them; its behaviour runs on a [`Segmenter`], which borrows it
/// together with the population it reads.
pub(crate) struct Segments {
    pub(crate) state: OrderedMutex<SegmentsState>,
    pub(crate) work: WorkQueue,
    backfill_progress: AtomicU64,
    /// Set when the process stops: a pass over more than one chunk of profiles ends at its next
    /// chunk (what it committed stays; the next start evaluates every profile anyway).
    pub(crate) stopping: std::sync::atomic::AtomicBool,
}

impl Segments {
    pub(crate) fn new(feed: feed::FeedWriter) -> Self {
        Self {
            state: OrderedMutex::new(Level::Segments, SegmentsState::new(feed)),
            work: WorkQueue::default(),
            backfill_progress: AtomicU64::new(0),
            stopping: std::sync::atomic::AtomicBool::new(false),
        }
    }
}

/// [`Segments`] at work over a [`Population`].
#[derive(Clone, Copy)]
pub(crate) struct Segmenter<'a> {
    pub(crate) segments: &'a Segments,
    pub(crate) population: &'a dyn Population,
}

impl Segmenter<'_> {
    /// The computed-traits setup when one of these plans reads computed traits.
    pub(crate) fn computed_setup<'p>(
        &self,
        plans: impl IntoIterator<Item = &'p Plan>,
        dictionaries: &DictSnapshot,
        now: i64,
    ) -> Result<Option<Setup>> {
        if !plans.into_iter().any(|p| uses_computed(&p.root)) {
            return Ok(None);
        }
        Ok(Some(self.population.computed(dictionaries, now)?))
    }
}

impl Segmenter<'_> {
    /// Profiles evaluated so far by the running (or last) segment creation or edit, for a
    /// progress bar.
    pub fn backfill_progress(&self) -> u64 {
        self.segments.backfill_progress.load(Ordering::Relaxed)
    }

    /// Every stored segment, by name.
    pub fn segments(&self) -> Result<Vec<SegmentRecord>> {
        let mut segments = Vec::new();
        for entry in self.population.store().segments.iter() {
            let (key, value) = entry.into_inner()?;
            match serde_json::from_slice::<SegmentRecord>(&value) {
                Ok(record) => segments.push(self.with_size(record)?),
                // One unreadable rule must not take every segment down: it is skipped (and
                // can be deleted by name).
                Err(error) => tracing::error!(
                    segment = %String::from_utf8_lossy(&key),
                    error = %error,
                    "segment record unreadable, skipped"
                ),
            }
        }
        Ok(segments)
    }

    pub fn segment(&self, name: &str) -> Result<SegmentRecord> {
        match self.population.store().segments.get(name.as_bytes())? {
            Some(bytes) => self.with_size(serde_json::from_slice(&bytes).map_err(|e| {
                crate::error::corrupt(
                    "segments",
                    format!("segment {name:?} is unreadable ({e}); `cible segment delete {name}` removes it"),
                )
            })?),
            None => Err(EngineError::NotFound(format!("segment {name:?}"))),
        }
    }

    /// A stored record with its current size (kept apart from the record, see
    /// [`crate::store::segment_size_key`]).
    fn with_size(&self, mut record: SegmentRecord) -> Result<SegmentRecord> {
        if let Some(bytes) = self
            .population
            .store()
            .meta
            .get(crate::store::segment_size_key(&record.name))?
        {
            let bytes: [u8; 8] = bytes
                .as_ref()
                .try_into()
                .map_err(|_| crate::error::corrupt("meta", "segment size"))?;
            record.size = u64::from_be_bytes(bytes);
        }
        Ok(record)
    }

    /// When a member last entered a segment (`None` for non-members).
    pub fn entered_at(&self, segment: &str, profile: u32) -> Result<Option<i64>> {
        Ok(self
            .population
            .store()
            .entries
            .get(crate::store::entry_key(segment, profile))?
            .and_then(|v| v.as_ref().try_into().ok().map(i64::from_be_bytes)))
    }

    /// The stored membership of a segment: its `entries`, one per member (each change writes
    /// its own entry; no commit rewrites a whole membership).
    pub fn members(&self, name: &str) -> Result<RoaringBitmap> {
        let prefix = crate::store::segment_prefix(name);
        let mut members = Vec::new();
        for entry in self.population.store().entries.prefix(&prefix) {
            let key = entry.key()?;
            let profile = key
                .get(prefix.len()..)
                .and_then(|b| <[u8; 4]>::try_from(b).ok())
                .ok_or_else(|| crate::error::corrupt("entries", "bad key"))?;
            members.push(u32::from_be_bytes(profile));
        }
        // Keys are in profile order.
        RoaringBitmap::from_sorted_iter(members).map_err(|e| crate::error::corrupt("entries", e))
    }

    /// Every enter and exit of a segment, oldest first.
    pub fn segment_changes(&self, name: &str) -> Result<Vec<Change>> {
        let mut changes = Vec::new();
        for entry in self
            .population
            .store()
            .segment_log
            .prefix(crate::store::segment_prefix(name))
        {
            let (_, value) = entry.into_inner()?;
            changes.push(
                serde_json::from_slice(&value)
                    .map_err(|e| crate::error::corrupt("segment_log", e))?,
            );
        }
        Ok(changes)
    }

    /// Event names received so far (for the language's checks).
    pub fn event_names(&self) -> Vec<String> {
        self.population
            .dictionary_snapshot(false)
            .names
            .into_keys()
            .collect()
    }

    /// Checks a rule against the store: unknown events (warnings), unknown segments and cycles
    /// (errors). `name` is the segment being created or edited, if any.
    pub fn check_rule(
        &self,
        expr: &Expr,
        source: &str,
        name: Option<&str>,
    ) -> Result<Vec<cible_lang::Diagnostic>> {
        let records = self.segments()?;
        let events = self.event_names();
        let mut catalog_segments: Vec<String> = records.iter().map(|s| s.name.clone()).collect();
        if let Some(name) = name {
            catalog_segments.push(name.to_string());
        }
        let models = self.population.model_names()?;
        let purposes = self.population.purpose_names();
        let catalog = cible_lang::check::Catalog {
            event_names: &events,
            segments: &catalog_segments,
            models: &models,
            purposes: &purposes,
        };
        let mut diagnostics = cible_lang::check::check(expr, &catalog, source);
        if let Some(name) = name {
            let mut dependencies = dependencies_of(&records);
            dependencies.insert(name.to_string(), references(expr));
            if let Err(cycle) = cible_lang::check::dependency_order(&dependencies) {
                // Point at the reference that closes the cycle.
                let span = cible_lang::check::segment_references(expr)
                    .into_iter()
                    .find(|(n, _)| cycle.get(1) == Some(n))
                    .map(|(_, span)| span)
                    .unwrap_or_default();
                let message = format!(
                    "segments would depend on each other in a cycle: {}",
                    cycle.join(" -> ")
                );
                diagnostics.push(
                    cible_lang::Diagnostic::error(cible_lang::Code::SegmentCycle, span, message)
                        .locate(source),
                );
            }
        }
        Ok(diagnostics)
    }

    fn reject_errors(&self, expr: &Expr, source: &str, name: Option<&str>) -> Result<()> {
        let errors: Vec<String> = self
            .check_rule(expr, source, name)?
            .into_iter()
            .filter(|d| d.severity == cible_lang::Severity::Error)
            .map(|d| {
                if source.is_empty() {
                    d.message
                } else {
                    d.render(source)
                }
            })
            .collect();
        if errors.is_empty() {
            Ok(())
        } else {
            Err(EngineError::Invalid(errors.join("\n")))
        }
    }

    /// Creates a segment and backfills it.
    pub fn create_segment(
        &self,
        name: &str,
        expr: Expr,
        source: &str,
        now: i64,
    ) -> Result<SegmentRecord> {
        if !valid_name(name) {
            return Err(EngineError::Invalid(format!(
                "segment name {name:?}: use 1 to 64 lower-case letters, digits, `_` or `-`"
            )));
        }
        if self
            .population
            .store()
            .segments
            .contains_key(name.as_bytes())?
        {
            return Err(EngineError::Invalid(format!(
                "a segment named {name:?} already exists; edit it instead"
            )));
        }
        self.reject_errors(&expr, source, Some(name))?;
        let record = SegmentRecord {
            name: name.to_string(),
            rule: expr.to_string(),
            ast: expr,
            created_at: now,
            updated_at: now,
            size: 0,
            last_backfill: None,
        };
        self.save_and_backfill(&record, now)
    }

    /// Stores a segment's rule and, on the segment worker, evaluates it (and the segments built
    /// on it) over every profile; the changes enter the feed with cause `segment_edit`. Batches
    /// are acknowledged meanwhile: only their evaluation waits.
    fn save_and_backfill(&self, record: &SegmentRecord, now: i64) -> Result<SegmentRecord> {
        self.upsert_live_segment(record, now)
    }

    /// Replaces a segment's rule and backfills it; members who no longer match exit.
    pub fn edit_segment(
        &self,
        name: &str,
        expr: Expr,
        source: &str,
        now: i64,
    ) -> Result<SegmentRecord> {
        let mut record = self.segment(name)?;
        self.reject_errors(&expr, source, Some(name))?;
        record.rule = expr.to_string();
        record.ast = expr;
        record.updated_at = now;
        self.save_and_backfill(&record, now)
    }

    /// Deletes a segment, its membership and its log; refused while other segments use it.
    /// A record that no longer reads (written by a faulty version) can still be deleted.
    pub fn delete_segment(&self, name: &str, _now: i64) -> Result<()> {
        if !self
            .population
            .store()
            .segments
            .contains_key(name.as_bytes())?
        {
            return Err(EngineError::NotFound(format!("segment {name:?}")));
        }
        let users: Vec<String> = self
            .segments()?
            .into_iter()
            .filter(|s| {
                cible_lang::check::segment_references(&s.ast)
                    .iter()
                    .any(|(n, _)| n == name)
            })
            .map(|s| s.name)
            .collect();
        if !users.is_empty() {
            return Err(EngineError::Invalid(format!(
                "segment {name:?} is used by {}",
                users.join(", ")
            )));
        }
        // Under the worker's lock, and forgotten by it in the same critical section: no
        // evaluation can write this segment back.
        let mut worker = self.segments.state.lock();
        // The record first, in a batch of its own: the segment is gone for everyone at once.
        let mut batch = self.population.store().synced_batch();
        batch.remove(&self.population.store().segments, name.as_bytes());
        batch.remove(
            &self.population.store().meta,
            crate::store::segment_size_key(name),
        );
        batch.commit()?;
        worker.forget(name);
        // Then its memberships and history, a bounded batch at a time. A crash in between
        // leaves keys no segment reads; creating a segment of that name clears them first.
        self.clear_segment_keys(name)
    }

    /// Removes every membership and history key under a segment's name that no stored segment
    /// owns, in batches of [`KEYS_PER_BATCH`]: the store holds its journal while it applies a
    /// batch, and one batch for the tens of thousands of keys of a large segment held the
    /// writer's next commit (an acknowledgement) behind it. The caller holds the worker's lock.
    pub(crate) fn clear_segment_keys(&self, name: &str) -> Result<()> {
        let prefix = crate::store::segment_prefix(name);
        for keyspace in [
            &self.population.store().segment_log,
            &self.population.store().entries,
        ] {
            // Each round starts after the last key removed, not at the prefix again: the
            // tombstones of earlier rounds are not walked over again (quadratic otherwise).
            let mut from = prefix.clone();
            loop {
                let keys = keyspace
                    .range(from.clone()..)
                    .take(KEYS_PER_BATCH)
                    .map(|entry| entry.key())
                    .take_while(|key| key.as_ref().map_or(true, |k| k.starts_with(&prefix)))
                    .collect::<Result<Vec<_>, _>>()?;
                let Some(last) = keys.last() else {
                    break;
                };
                from = last.to_vec();
                from.push(0); // the smallest key after `last`
                let mut batch = self.population.store().synced_batch();
                for key in keys {
                    batch.remove(keyspace, key);
                }
                batch.commit()?;
            }
        }
        Ok(())
    }

    /// Evaluates a rule over every live profile at `now` (seconds resolution); returns the
    /// members and how many profiles needed their full messages.
    pub fn evaluate_rule(
        &self,
        expr: &Expr,
        now: i64,
        progress: &AtomicU64,
    ) -> Result<(RoaringBitmap, u64, u64)> {
        let mut results = self.evaluate_rules(std::slice::from_ref(expr), now, progress)?;
        let (members, via) = results.pop().expect("one rule, one result");
        Ok((members, self.population.live_profiles().len() as u64, via))
    }

    /// Evaluates several rules in one pass over the profiles: each profile's traits and, when
    /// a rule needs them, its full messages are read once for all rules. Returns each rule's
    /// members and how many profile evaluations read full messages.
    pub fn evaluate_rules(
        &self,
        exprs: &[Expr],
        now: i64,
        progress: &AtomicU64,
    ) -> Result<Vec<(RoaringBitmap, u64)>> {
        self.population
            .ensure_rule_columns(&exprs.iter().collect::<Vec<_>>())?;
        let dictionaries = self.population.dictionary_snapshot(true);
        let plans: Vec<Plan> = exprs.iter().map(|e| plan::plan(e, &dictionaries)).collect();
        let mut dependencies = FxHashMap::default();
        for plan in &plans {
            for segment in &plan.segments {
                if !dependencies.contains_key(segment) {
                    dependencies.insert(segment.clone(), self.members(segment)?);
                }
            }
        }
        let needs_traits = plans.iter().any(|p| uses_traits(&p.root));
        let mut names = Vec::new();
        plans.iter().for_each(|p| trait_names(&p.root, &mut names));
        self.population.ensure_trait_columns(&names)?;
        let computed = self.computed_setup(&plans, &dictionaries, now)?;
        // The consents as of the pass's start, once for every chunk.
        let consents = (
            self.population.consents(),
            self.population.consent_check("profiling")?,
        );
        let profiles = self.population.live_profiles();
        let now_s = (now.div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32;
        // The hot store's read guard is held for one outer chunk at a time, so the writer (which
        // needs its write guard for every batch) waits for one chunk at most. The trait columns
        // come after `hot` in the lock order.
        let mut chunks: Vec<Result<Vec<ChunkResult>>> = Vec::new();
        for outer in profiles.chunks(crate::hot::READ_CHUNK) {
            let hot = self.population.hot_chunk(outer);
            let trait_columns = self.population.trait_columns();
            chunks.extend(self.evaluate_chunk(
                outer,
                &plans,
                &hot,
                &trait_columns,
                needs_traits,
                &dependencies,
                computed.as_ref(),
                (&consents.0, &consents.1),
                &dictionaries,
                now_s,
                progress,
            ));
        }
        let mut results: Vec<(RoaringBitmap, u64)> = vec![(RoaringBitmap::new(), 0); plans.len()];
        for chunk in chunks {
            for ((members, via), (found, found_via)) in results.iter_mut().zip(chunk?) {
                members.extend(found);
                *via += found_via;
            }
        }
        Ok(results)
    }

    /// One outer chunk of [`Segmenter::evaluate_rules`], in parallel pieces.
    #[allow(
        clippy::too_many_arguments,
        reason = "the pass's shared inputs, borrowed once"
    )]
    fn evaluate_chunk(
        &self,
        profiles: &[u32],
        plans: &[Plan],
        hot: &crate::hot::HotStore,
        trait_columns: &crate::trait_columns::TraitColumns,
        needs_traits: bool,
        dependencies: &FxHashMap<String, RoaringBitmap>,
        computed: Option<&Setup>,
        (consents, profiling): (&crate::consent::ConsentIndex, &crate::consent::ConsentCheck),
        dictionaries: &DictSnapshot,
        now_s: u32,
        progress: &AtomicU64,
    ) -> Vec<Result<Vec<ChunkResult>>> {
        profiles
            .par_chunks(2048)
            .map(|chunk| {
                let mut found: Vec<ChunkResult> = vec![(Vec::new(), 0); plans.len()];
                // With several rules, grouping a timeline by name once pays for itself.
                let mut by_name = eval::NameIndex::default();
                let use_index = plans.len() >= 4;
                for &profile in chunk {
                    let timeline = hot.timeline(profile);
                    if use_index {
                        by_name.rebuild(timeline.events);
                    }
                    let hot_events = HotEvents(timeline, use_index.then_some(&by_name));
                    let traits: BTreeMap<String, TraitValue> = if needs_traits {
                        trait_columns.traits_of(profile)
                    } else {
                        BTreeMap::new()
                    };
                    let in_segment = |name: &str| {
                        dependencies
                            .get(name)
                            .is_some_and(|m: &RoaringBitmap| m.contains(profile))
                    };
                    let lazy = computed
                        .as_ref()
                        .map(|setup| Lazy::new(timeline, now_s, setup, profiling.permits(profile)));
                    let of = consents.of(profile);
                    let consented = |purpose: &str| of.granted(purpose);
                    let ctx = Context {
                        now: now_s,
                        traits: &traits,
                        in_segment: &in_segment,
                        consented: &consented,
                        computed: lazy.as_ref(),
                    };
                    let mut full: Option<MessageEvents> = None;
                    for (plan, (members, via)) in plans.iter().zip(found.iter_mut()) {
                        let hot_verdict = if plan.needs_messages {
                            None
                        } else {
                            evaluate(plan, &hot_events, &ctx).ok()
                        };
                        let verdict = match hot_verdict {
                            Some(verdict) => verdict,
                            None => {
                                if full.is_none() {
                                    full = Some(MessageEvents(full_events(
                                        self.population.store(),
                                        profile,
                                        dictionaries,
                                        None,
                                    )?));
                                }
                                *via += 1;
                                let events = full.as_ref().expect("just loaded");
                                evaluate(plan, events, &ctx)
                                    .expect("full messages answer every condition")
                            }
                        };
                        if verdict.member {
                            members.push(profile);
                        }
                    }
                }
                progress.fetch_add(chunk.len() as u64, Ordering::Relaxed);
                Ok(found)
            })
            .collect()
    }

    pub(crate) fn evaluate_profile(
        &self,
        run: &RuleRun<'_>,
        profile: u32,
    ) -> Result<(eval::Verdict, bool)> {
        let no_traits = BTreeMap::new();
        let traits = run.traits.get(&profile).unwrap_or(&no_traits);
        let in_segment = |name: &str| {
            run.dependencies
                .get(name)
                .is_some_and(|m| m.contains(profile))
        };
        let lazy = run.computed.map(|setup| {
            let profiling = run.profiling.permits(profile);
            Lazy::new(run.hot.timeline(profile), run.now, setup, profiling)
        });
        let consents = run.consents.of(profile);
        let consented = |purpose: &str| consents.granted(purpose);
        let ctx = Context {
            now: run.now,
            traits,
            in_segment: &in_segment,
            consented: &consented,
            computed: lazy.as_ref(),
        };
        if !run.plan.needs_messages
            && let Ok(verdict) =
                evaluate(run.plan, &HotEvents(run.hot.timeline(profile), None), &ctx)
        {
            return Ok((verdict, false));
        }
        let events = full_events(self.population.store(), profile, run.dictionaries, None)?;
        let verdict = evaluate(run.plan, &MessageEvents(events), &ctx)
            .expect("full messages answer every condition");
        Ok((verdict, true))
    }

    /// "Why is this profile in (or out)?": each condition of the segment's rule with the value it
    /// saw for the profile at `now`, and the stored membership.
    pub fn explain(&self, name: &str, profile: u32, now: i64) -> Result<Explanation> {
        let record = self.segment(name)?;
        let dictionaries = self.population.dictionary_snapshot(true);
        let plan = plan::plan(&record.ast, &dictionaries);
        let mut dependencies = FxHashMap::default();
        for segment in &plan.segments {
            dependencies.insert(segment.clone(), self.members(segment)?);
        }
        let traits = self.population.profile_traits(profile)?;
        let in_segment = |segment: &str| {
            dependencies
                .get(segment)
                .is_some_and(|m: &RoaringBitmap| m.contains(profile))
        };
        let now_s = (now.div_euclid(1000)).clamp(0, i64::from(u32::MAX)) as u32;
        let computed = self.computed_setup(std::slice::from_ref(&plan), &dictionaries, now)?;
        let profiling = self.population.consent_check("profiling")?;
        let hot = self.population.hot();
        let lazy = computed.as_ref().map(|setup| {
            Lazy::new(
                hot.timeline(profile),
                now_s,
                setup,
                profiling.permits(profile),
            )
        });
        let consents = self.population.consents();
        let consented = |purpose: &str| consents.granted(purpose, profile);
        let ctx = Context {
            now: now_s,
            traits: &traits,
            in_segment: &in_segment,
            consented: &consented,
            computed: lazy.as_ref(),
        };
        let hot_events = HotEvents(hot.timeline(profile), None);
        let (verdict, conditions) = match (
            evaluate(&plan, &hot_events, &ctx),
            eval::explain(&plan, &record.ast, &hot_events, &ctx),
        ) {
            (Ok(verdict), Ok(conditions)) if !plan.needs_messages => (verdict, conditions),
            _ => {
                let events = MessageEvents(full_events(
                    self.population.store(),
                    profile,
                    &dictionaries,
                    None,
                )?);
                let verdict =
                    evaluate(&plan, &events, &ctx).expect("full messages answer every condition");
                let conditions = eval::explain(&plan, &record.ast, &events, &ctx)
                    .expect("full messages answer every condition");
                (verdict, conditions)
            }
        };
        Ok(Explanation {
            segment: record.name,
            profile,
            rule: record.rule,
            member: self.members(name)?.contains(profile),
            matches_now: verdict.member,
            next_change: verdict
                .next_change
                .map(|s| crate::time::format_ms(i64::from(s) * 1000)),
            conditions,
        })
    }

    /// Count and a sample of a rule's members now; nothing is saved.
    pub fn preview(&self, expr: &Expr, now: i64, sample: usize) -> Result<Preview> {
        let started = Instant::now();
        let (members, profiles, _) = self.evaluate_rule(expr, now, &AtomicU64::new(0))?;
        Ok(Preview {
            count: members.len(),
            sample: members.iter().take(sample).collect(),
            profiles,
            duration_ms: started.elapsed().as_millis() as u64,
        })
    }

    /// Recomputes a segment, and the segments built on it, over every profile (`segment
    /// refresh`): who entered and exited goes to the feed with cause `segment_edit`.
    pub fn backfill(&self, name: &str, now: i64) -> Result<SegmentRecord> {
        let record = self.segment(name)?;
        self.upsert_live_segment(&record, now)
    }
}

/// A profile's behavioural events with all their properties, oldest first; only of the event
/// names `only` (ids of `dictionaries`) when given: the others' bodies are not read (each
/// `events` entry names its event).
pub(crate) fn full_events(
    store: &crate::store::Store,
    profile: u32,
    dictionaries: &DictSnapshot,
    only: Option<&[u16]>,
) -> Result<Vec<FullEvent>> {
    let names = &dictionaries.names;
    let mut events = Vec::new();
    for entry in store.events.prefix(profile_key(profile)) {
        let (key, value) = entry.into_inner()?;
        let stored = crate::store::entry_of(&value)?;
        if only.is_some_and(|only| !only.contains(&stored.record.name)) {
            continue;
        }
        let body = store.log.read(stored.location)?;
        let message =
            crate::codec::decode(&body).map_err(|e| crate::error::corrupt("events", e))?;
        let (_, ts_ms, _) = crate::store::key_of("events", &key)?;
        let name = message
            .event
            .filter(|_| message.kind.is_behavioral())
            .and_then(|n| names.get(&n).copied())
            .unwrap_or(crate::hot::NO_NAME);
        let ts = ts_ms.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32;
        events.push(FullEvent {
            ts,
            name,
            properties: message.properties,
        });
    }
    events.sort_by_key(|e| e.ts);
    Ok(events)
}

#[cfg(test)]
mod tests;
