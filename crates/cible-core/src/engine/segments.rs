//! The engine's face for segments and the change feed: each call goes to the segments
//! component ([`crate::segment::Segments`]) over the population the engine holds, and the
//! engine is that population ([`Population`]: what segments may read of it, and nothing more).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64};

use cible_lang::Expr;
use parking_lot::RwLockReadGuard;
use roaring::RoaringBitmap;

use super::Engine;
use crate::error::Result;
use crate::hot::{HotChunk, HotStore};
use crate::lock::Ordered;
use crate::records::TraitValue;
use crate::scoring::Setup;
use crate::segment::feed::{Cause, FeedChange};
use crate::segment::live::Touched;
use crate::segment::worker::{Deferral, FeedListener};
use crate::segment::{
    Change, DictSnapshot, Explanation, Population, Preview, SegmentRecord, Segmenter,
};
use crate::store::Store;
use crate::trait_columns::TraitColumns;

impl Population for Engine {
    fn store(&self) -> &Store {
        &self.store
    }

    fn metrics(&self) -> &crate::metrics::Metrics {
        &self.metrics
    }

    fn dictionary_snapshot(&self, with_keys: bool) -> DictSnapshot {
        self.with_dictionaries(|names, keys| DictSnapshot {
            names: names
                .iter()
                .filter(|(_, id)| **id < u32::from(u16::MAX))
                .map(|(n, id)| (n.clone(), *id as u16))
                .collect(),
            keys: std::sync::Arc::new(if with_keys { keys.to_vec() } else { Vec::new() }),
        })
    }

    fn dictionary_sizes(&self) -> (usize, usize) {
        Engine::dictionary_sizes(self)
    }

    fn live_profiles(&self) -> Vec<u32> {
        Engine::live_profiles(self)
    }

    fn alive_flags(&self, profiles: &[u32]) -> Vec<bool> {
        Engine::alive_flags(self, profiles)
    }

    fn hot(&self) -> Ordered<RwLockReadGuard<'_, HotStore>> {
        self.hot.read()
    }

    fn hot_chunk(&self, profiles: &[u32]) -> HotChunk<'_> {
        Engine::hot_chunk(self, profiles)
    }

    fn trait_columns(&self) -> Ordered<RwLockReadGuard<'_, TraitColumns>> {
        self.trait_columns.read()
    }

    fn ensure_rule_columns(&self, rules: &[&Expr]) -> Result<()> {
        self.ensure_columns(rules.iter().copied())
    }

    fn ensure_trait_columns(&self, names: &[String]) -> Result<()> {
        Engine::ensure_trait_columns(self, names)
    }

    fn computed(&self, dictionaries: &DictSnapshot, now: i64) -> Result<Setup> {
        self.computed_traits_setup(dictionaries, now)
    }

    fn replan_computed(&self, setup: &mut Setup, dictionaries: &DictSnapshot) {
        setup.plan = self.trait_plan(dictionaries);
        setup.features = self.feature_plan();
    }

    fn profile_traits(&self, profile: u32) -> Result<BTreeMap<String, TraitValue>> {
        Ok(self.profile_record(profile)?.traits)
    }

    fn model_names(&self) -> Result<Vec<String>> {
        Ok(self.model_set()?.models().map(|m| m.name.clone()).collect())
    }

    fn purpose_names(&self) -> Vec<String> {
        self.purposes.names().map(str::to_string).collect()
    }

    fn consents(&self) -> std::sync::Arc<crate::consent::ConsentIndex> {
        self.consent_snapshot()
    }

    fn consent_check(&self, purpose: &str) -> Result<crate::consent::ConsentCheck> {
        Engine::consent_check(self, purpose)
    }
}

impl Engine {
    /// The segments component at work over this engine.
    pub(crate) fn segmenter(&self) -> Segmenter<'_> {
        Segmenter {
            segments: &self.segments,
            population: self,
        }
    }

    /// Event names only (what evaluating full messages needs); cheap, unlike the keys.
    pub fn name_dictionary(&self) -> DictSnapshot {
        self.dictionary_snapshot(false)
    }

    /// A snapshot of the event-name and key dictionaries, for planning.
    pub fn dictionaries(&self) -> DictSnapshot {
        self.dictionary_snapshot(true)
    }

    /// Sizes of the event-name and key dictionaries (they only grow), as of the last committed
    /// batch: read without the writer lock, so the segment worker learns whether to plan again
    /// without waiting for a commit in progress.
    pub fn dictionary_sizes(&self) -> (usize, usize) {
        let [names, keys] = &self.dictionary_sizes;
        (
            names.load(std::sync::atomic::Ordering::Acquire),
            keys.load(std::sync::atomic::Ordering::Acquire),
        )
    }

    /// Profiles evaluated so far by the running (or last) segment creation or edit.
    pub fn backfill_progress(&self) -> u64 {
        self.segmenter().backfill_progress()
    }

    /// Every stored segment, by name.
    pub fn segments(&self) -> Result<Vec<SegmentRecord>> {
        self.segmenter().segments()
    }

    /// A stored segment, with its current size.
    pub fn segment(&self, name: &str) -> Result<SegmentRecord> {
        self.segmenter().segment(name)
    }

    /// When a member last entered a segment (`None` for non-members).
    pub fn entered_at(&self, segment: &str, profile: u32) -> Result<Option<i64>> {
        self.segmenter().entered_at(segment, profile)
    }

    /// The stored membership of a segment.
    pub fn members(&self, name: &str) -> Result<RoaringBitmap> {
        self.segmenter().members(name)
    }

    /// Every enter and exit of a segment, oldest first.
    pub fn segment_changes(&self, name: &str) -> Result<Vec<Change>> {
        self.segmenter().segment_changes(name)
    }

    /// Checks a rule against the store: unknown events (warnings), unknown segments and cycles
    /// (errors). `name` is the segment being created or edited, if any.
    pub fn check_rule(
        &self,
        expr: &Expr,
        source: &str,
        name: Option<&str>,
    ) -> Result<Vec<cible_lang::Diagnostic>> {
        self.segmenter().check_rule(expr, source, name)
    }

    /// Creates a segment and backfills it (on the worker's lock; acknowledgements go on).
    pub fn create_segment(
        &self,
        name: &str,
        expr: Expr,
        source: &str,
        now: i64,
    ) -> Result<SegmentRecord> {
        let record = self.segmenter().create_segment(name, expr, source, now)?;
        self.audit_admin(crate::audit::Action::SegmentCreate, &record)?;
        Ok(record)
    }

    /// Records an admin action on a segment (its name and rule: no personal data).
    fn audit_admin(&self, action: crate::audit::Action, record: &SegmentRecord) -> Result<()> {
        self.audit(self.audit_entry(
            action,
            &[],
            serde_json::json!({"segment": record.name, "rule": record.rule}),
        ))
    }

    /// Replaces a segment's rule and backfills it; members who no longer match exit.
    pub fn edit_segment(
        &self,
        name: &str,
        expr: Expr,
        source: &str,
        now: i64,
    ) -> Result<SegmentRecord> {
        let record = self.segmenter().edit_segment(name, expr, source, now)?;
        self.audit_admin(crate::audit::Action::SegmentEdit, &record)?;
        Ok(record)
    }

    /// Deletes a segment, its membership and its log; refused while other segments use it.
    pub fn delete_segment(&self, name: &str, now: i64) -> Result<()> {
        self.segmenter().delete_segment(name, now)?;
        self.audit(self.audit_entry(
            crate::audit::Action::SegmentDelete,
            &[],
            serde_json::json!({"segment": name}),
        ))
    }

    /// Evaluates a rule over every live profile at `now`: the members, how many profiles were
    /// evaluated, and how many needed their full messages.
    pub fn evaluate_rule(
        &self,
        expr: &Expr,
        now: i64,
        progress: &AtomicU64,
    ) -> Result<(RoaringBitmap, u64, u64)> {
        self.segmenter().evaluate_rule(expr, now, progress)
    }

    /// Evaluates several rules in one pass over the profiles.
    pub fn evaluate_rules(
        &self,
        exprs: &[Expr],
        now: i64,
        progress: &AtomicU64,
    ) -> Result<Vec<(RoaringBitmap, u64)>> {
        self.segmenter().evaluate_rules(exprs, now, progress)
    }

    /// "Why is this profile in (or out)?"
    pub fn explain(&self, name: &str, profile: u32, now: i64) -> Result<Explanation> {
        self.segmenter().explain(name, profile, now)
    }

    /// Count and a sample of a rule's members now; nothing is saved.
    pub fn preview(&self, expr: &Expr, now: i64, sample: usize) -> Result<Preview> {
        self.segmenter().preview(expr, now, sample)
    }

    /// Recomputes a segment, and the segments built on it, over every profile.
    pub fn backfill(&self, name: &str, now: i64) -> Result<SegmentRecord> {
        self.segmenter().backfill(name, now)
    }

    /// Starts the live drivers (see [`crate::segment::live`]).
    pub fn start_live_segments(&self, now: i64) -> Result<()> {
        self.segmenter().start_live_segments(now)
    }

    /// The live membership of a segment, when the drivers run.
    pub fn live_members(&self, name: &str) -> Option<RoaringBitmap> {
        self.segmenter().live_members(name)
    }

    /// Time driver: re-evaluates what is due by `now`; returns when the next timer is due.
    pub fn tick_segments(&self, now: i64) -> Result<Option<i64>> {
        self.segmenter().tick_segments(now)
    }

    /// After a recalibration or a model change: the segments reading computed traits again.
    pub(crate) fn reevaluate_computed(&self, now: i64, cause: Cause) -> Result<()> {
        self.segmenter().reevaluate_computed(now, cause)
    }

    /// Hands a committed batch's touched profiles to the segment worker.
    pub(crate) fn hand_off(&self, touched: Touched, cause: Cause, now: i64) -> Result<()> {
        self.segmenter().hand_off(touched, cause, now)
    }

    /// Until the guard is dropped, committed batches wait in the queue (bulk import).
    pub fn defer_segments(&self) -> Deferral<'_> {
        self.segmenter().defer_segments()
    }

    /// Evaluates everything waiting in the queue; returns the number of batches processed.
    pub fn drain_segments(&self) -> Result<u64> {
        self.segmenter().drain_segments()
    }

    /// The segment worker of `cible serve`, until `stop`.
    pub fn run_segment_worker(&self, stop: &AtomicBool, clock: &(dyn Fn() -> i64 + Sync)) {
        self.segmenter().run_segment_worker(stop, clock)
    }

    /// From now on a worker thread drains the queue: committing threads only hand off.
    pub fn start_background_worker(&self) {
        self.segmenter().start_background_worker()
    }

    /// Wakes the worker (to see `stop`).
    pub fn wake_segment_worker(&self) {
        self.segmenter().wake_segment_worker()
    }

    /// Ends the passes of admin work over many profiles (segment edits and refreshes,
    /// recalibrations, model activations) at their next chunk of 512, for good: the process is
    /// stopping. What they did is committed; their caller gets [`crate::EngineError::Cancelled`]. The
    /// segment stays stored with its new rule, and the next start evaluates every live profile
    /// (those changes then have cause `restart`). Hand-offs of committed batches and timers
    /// still run in full.
    pub fn stop_segment_passes(&self) {
        self.segments
            .stopping
            .store(true, std::sync::atomic::Ordering::Release);
    }

    /// Calls `listener` with the feed's head after every commit of changes.
    pub fn on_feed(&self, listener: FeedListener) {
        self.segmenter().on_feed(listener)
    }

    /// Up to `limit` changes after sequence number `after`, oldest first (durable ones only).
    pub fn changes_after(&self, after: u64, limit: usize) -> Result<Vec<FeedChange>> {
        self.segmenter().changes_after(after, limit)
    }

    /// The sequence number of the last change written (0 when none).
    pub fn feed_head(&self) -> u64 {
        self.segmenter().feed_head()
    }
}
