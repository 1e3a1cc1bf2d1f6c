//! The segment worker's state: every segment with its plan and membership, the timer queue,
//! and the change feed's writer. All of it sits behind one lock (`Segments::state`, the lowest
//! level of the lock order), so membership changes are decided by one thread at a time and the
//! feed's numbers are gap-free.
//!
//! - After each committed batch (handed over by the writer, see [`super::worker`]), only the
//!   segments whose rule reads one of the batch's event names (or traits, for identify calls,
//!   or any event, for first/last seen) are re-evaluated, and only for the profiles the batch
//!   touched; then the segments built on them, in dependency order.
//! - Each evaluation yields the next instant its verdict may change by itself; a timer queue
//!   re-evaluates that profile for that segment then.
//! - Creating or editing a segment evaluates that segment (and those built on it) alone;
//!   recalibrations and model activations re-evaluate only the segments on computed traits.
//! - Every enter and exit goes to the change feed with its cause, in the same store batch as
//!   the membership.
//!
//! Whole-population passes read the hot store in chunks, so the writer (which needs the hot
//! store's write guard for every batch) waits for one chunk at most.
//!
//! The three drivers share one evaluator, so incremental, timed and batch results agree; the
//! property test in `tests.rs` checks it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use std::time::Instant;

use rayon::prelude::*;
use roaring::RoaringBitmap;
use rustc_hash::{FxHashMap, FxHashSet};

use super::Segmenter;
use super::feed::{Cause, FeedWriter};
use super::plan::{self, Plan};
use super::{BackfillReport, Change, RuleRun, SegmentRecord, to_json, uses_computed, uses_traits};
use crate::error::EngineError;

type Result<T, E = EngineError> = std::result::Result<T, E>;

use crate::hot::READ_CHUNK as CHUNK;

/// Changes past which a pass commits what it has (memberships and feed together, so each
/// commit is consistent): a segment edit over a million profiles never writes one huge batch
/// that the writer's next commit would wait behind. The store holds its journal while it
/// applies a batch to its memtables (about three keys a change) and syncs it, and the writer's
/// commit waits meanwhile: at 4,096 changes that was 3 to 7 ms per commit during a backfill.
const CHANGES_PER_COMMIT: u64 = 512;

/// What a committed batch changed, for the live drivers.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    /// Profiles with new events, and the event-name ids they received.
    pub events: FxHashMap<u32, FxHashSet<u16>>,
    /// Profiles that received calls without an event name (identify, alias, group): their
    /// traits or first/last seen may have changed.
    pub traits: FxHashSet<u32>,
    /// Profiles to re-evaluate for every segment: merge survivors, unmerged profiles, and
    /// profiles merged away or removed (no longer live, they leave every segment they were in).
    pub all: FxHashSet<u32>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty() && self.traits.is_empty() && self.all.is_empty()
    }

    /// Adds a later batch's changes.
    pub fn absorb(&mut self, other: Touched) {
        for (profile, names) in other.events {
            self.events.entry(profile).or_default().extend(names);
        }
        self.traits.extend(other.traits);
        self.all.extend(other.all);
    }

    /// How many profiles it names (an upper bound: one may be named twice).
    pub fn len(&self) -> usize {
        self.events.len() + self.traits.len() + self.all.len()
    }
}

struct LiveSegment {
    /// Stable while the segment exists (positions move when segments are added).
    id: u32,
    record: SegmentRecord,
    plan: Plan,
    members: RoaringBitmap,
    uses_traits: bool,
    uses_computed: bool,
    /// Reads any event (first/last seen).
    any_event: bool,
}

/// The segments as the worker keeps them.
pub struct LiveState {
    /// In dependency order.
    segments: Vec<LiveSegment>,
    next_id: u32,
    /// (due second, profile, segment id); entries that disagree with `scheduled` are stale.
    timers: BinaryHeap<Reverse<(u32, u32, u32)>>,
    /// The one instant each (segment id, profile) is due.
    scheduled: FxHashMap<(u32, u32), u32>,
    dictionary_sizes: (usize, usize),
    /// The event names of those dictionaries (what evaluating full messages needs).
    names: std::sync::Arc<super::DictSnapshot>,
    /// The computed-traits plan and calibration, when a segment reads computed traits.
    computed: Option<crate::scoring::Setup>,
}

/// Everything behind `Segments::state`.
pub struct SegmentsState {
    pub(crate) feed: FeedWriter,
    /// Loaded on first use; evaluated over everyone when `started`.
    live: Option<LiveState>,
    /// The live drivers run (`cible serve`): timers are kept and followed.
    started: bool,
}

impl SegmentsState {
    pub(crate) fn new(feed: FeedWriter) -> Self {
        Self {
            feed,
            live: None,
            started: false,
        }
    }

    /// Forgets a deleted segment (its timers become stale).
    pub(crate) fn forget(&mut self, name: &str) {
        if let Some(live) = self.live.as_mut()
            && let Some(position) = live.position(name)
        {
            live.segments.remove(position);
        }
    }
}

fn reads_any_event(node: &plan::Node) -> bool {
    match node {
        plan::Node::And(args) | plan::Node::Or(args) => args.iter().any(reads_any_event),
        plan::Node::Not(arg) => reads_any_event(arg),
        // Computed traits read every kind of event.
        plan::Node::Compare {
            value: plan::ValueNode::DaysSinceSeen { .. } | plan::ValueNode::Computed(_),
            ..
        } => true,
        _ => false,
    }
}

fn seconds(now: i64) -> u32 {
    now.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

/// A profile's verdict in a pass: (profile, member, next change, read full messages).
type Verdict = (u32, bool, Option<u32>, bool);

/// What one evaluation pass did, per segment position.
#[derive(Debug, Default, Clone, Copy)]
struct PassStats {
    profiles: u64,
    entered: u64,
    exited: u64,
    via_messages: u64,
}

impl LiveState {
    fn position(&self, name: &str) -> Option<usize> {
        self.segments.iter().position(|s| s.record.name == name)
    }

    fn position_of_id(&self, id: u32) -> Option<usize> {
        self.segments.iter().position(|s| s.id == id)
    }

    /// These positions and those of the segments built (directly or not) on them, ascending:
    /// dependency order.
    fn with_dependants(&self, positions: impl IntoIterator<Item = usize>) -> Vec<usize> {
        let mut chosen = vec![false; self.segments.len()];
        for position in positions {
            chosen[position] = true;
        }
        let mut names: FxHashSet<&str> = FxHashSet::default();
        for (index, segment) in self.segments.iter().enumerate() {
            if chosen[index]
                || segment
                    .plan
                    .segments
                    .iter()
                    .any(|n| names.contains(n.as_str()))
            {
                chosen[index] = true;
                names.insert(&segment.record.name);
            }
        }
        (0..self.segments.len()).filter(|i| chosen[*i]).collect()
    }
}

impl Segmenter<'_> {
    /// Runs `work` on the segment worker's state, loading the segments first if needed (their
    /// stored plans and memberships; nothing is evaluated).
    pub(crate) fn with_segments<T>(
        &self,
        now: i64,
        work: impl FnOnce(&Self, &mut LiveState, &mut FeedWriter) -> Result<T>,
    ) -> Result<T> {
        let mut guard = self.segments.state.lock();
        self.with_loaded(&mut guard, now, work)
    }

    /// [`Segmenter::with_segments`] with the lock already held.
    pub(crate) fn with_loaded<T>(
        &self,
        state: &mut SegmentsState,
        now: i64,
        work: impl FnOnce(&Self, &mut LiveState, &mut FeedWriter) -> Result<T>,
    ) -> Result<T> {
        if state.live.is_none() {
            let mut live = self.load_live(now)?;
            if state.started {
                // The drivers run but lost their state (a failed pass): evaluate everyone again,
                // which also re-arms every timer.
                self.evaluate_everyone(&mut live, &mut state.feed, now)?;
            }
            state.live = Some(live);
        }
        let live = state.live.as_mut().expect("just loaded");
        let outcome = work(self, live, &mut state.feed);
        // A pass stopped by `Engine::stop_segment_passes` committed what it did: memory and
        // disk agree. Any other failure may leave memory ahead of disk: read the segments
        // again next time.
        if outcome.is_err() && !matches!(outcome, Err(EngineError::Cancelled)) {
            state.live = None;
        }
        outcome
    }

    /// Starts the live drivers: loads every segment in dependency order and brings it up to
    /// date at `now` (catching up on time passed and batches committed while stopped), arming
    /// the timers. Changes found are in the feed with cause `restart`.
    pub fn start_live_segments(&self, now: i64) -> Result<()> {
        let mut guard = self.segments.state.lock();
        guard.started = true;
        let state = &mut *guard;
        let mut live = self.load_live(now)?;
        self.evaluate_everyone(&mut live, &mut state.feed, now)?;
        state.live = Some(live);
        self.population
            .metrics()
            .segments_ready
            .store(1, std::sync::atomic::Ordering::Release);
        Ok(())
    }

    /// Every segment over every profile, timers armed; changes have cause `restart`.
    fn evaluate_everyone(
        &self,
        live: &mut LiveState,
        feed: &mut FeedWriter,
        now: i64,
    ) -> Result<()> {
        let positions: Vec<usize> = (0..live.segments.len()).collect();
        self.evaluate_over_everyone(live, feed, positions, now, Cause::Restart)?;
        Ok(())
    }

    /// The segments at these positions, and those built on them, over every live profile.
    fn evaluate_over_everyone(
        &self,
        live: &mut LiveState,
        feed: &mut FeedWriter,
        positions: impl IntoIterator<Item = usize>,
        now: i64,
        cause: Cause,
    ) -> Result<FxHashMap<usize, PassStats>> {
        let everyone = self.population.live_profiles();
        let rounds: Vec<(usize, &[u32])> = live
            .with_dependants(positions)
            .into_iter()
            .map(|i| (i, everyone.as_slice()))
            .collect();
        self.reevaluate(live, feed, &rounds, now, cause)
    }

    fn load_live(&self, now: i64) -> Result<LiveState> {
        let list = self.segments()?;
        let dependencies = super::dependencies_of(&list);
        let records: BTreeMap<String, SegmentRecord> =
            list.into_iter().map(|s| (s.name.clone(), s)).collect();
        let order = cible_lang::check::dependency_order(&dependencies).map_err(|cycle| {
            EngineError::Invalid(format!("segment cycle: {}", cycle.join(" -> ")))
        })?;
        self.population
            .ensure_rule_columns(&records.values().map(|r| &r.ast).collect::<Vec<_>>())?;
        let dictionaries = self.population.dictionary_snapshot(true);
        let mut state = LiveState {
            segments: Vec::new(),
            next_id: 0,
            timers: BinaryHeap::new(),
            scheduled: FxHashMap::default(),
            dictionary_sizes: (dictionaries.names.len(), dictionaries.keys.len()),
            names: std::sync::Arc::new(super::DictSnapshot {
                names: dictionaries.names.clone(),
                keys: Default::default(),
            }),
            computed: None,
        };
        for name in order {
            let Some(record) = records.get(&name).cloned() else {
                continue;
            };
            let plan = plan::plan(&record.ast, &dictionaries);
            let members = self.members(&name)?;
            state.segments.push(LiveSegment {
                id: state.next_id,
                uses_traits: uses_traits(&plan.root),
                uses_computed: uses_computed(&plan.root),
                any_event: reads_any_event(&plan.root),
                record,
                plan,
                members,
            });
            state.next_id += 1;
        }
        state.computed =
            self.computed_setup(state.segments.iter().map(|s| &s.plan), &dictionaries, now)?;
        Ok(state)
    }

    /// The live membership of a segment, when the drivers run.
    pub fn live_members(&self, name: &str) -> Option<RoaringBitmap> {
        let guard = self.segments.state.lock();
        guard
            .live
            .as_ref()?
            .segments
            .iter()
            .find(|s| s.record.name == name)
            .map(|s| s.members.clone())
    }

    /// Stores a created or edited segment and evaluates it, and the segments built on it, over
    /// every profile; the changes enter the feed with cause `segment_edit`.
    pub(crate) fn upsert_live_segment(
        &self,
        record: &SegmentRecord,
        now: i64,
    ) -> Result<SegmentRecord> {
        // A new property column scans every event (a minute at 1M profiles): built before the
        // segments' lock, so that the worker's passes over committed batches go on meanwhile.
        // Evaluation is exact without it (it reads full messages), only slower.
        self.population.ensure_rule_columns(&[&record.ast])?;
        self.with_segments(now, |this, live, feed| {
            let position = live.position(&record.name);
            if position.is_none() {
                // A new segment: keys left under its name by a deletion cut short are not its
                // members. Cleared before its record is stored, so that no stored segment ever
                // sits on them (a crash in between leaves them for the next creation).
                this.clear_segment_keys(&record.name)?;
            }
            this.population
                .store()
                .segments
                .insert(record.name.as_bytes(), to_json(record))?;
            let dictionaries = this.population.dictionary_snapshot(true);
            let plan = plan::plan(&record.ast, &dictionaries);
            let members = match position {
                Some(position) => live.segments.remove(position).members,
                None => RoaringBitmap::new(),
            };
            let segment = LiveSegment {
                id: live.next_id,
                uses_traits: uses_traits(&plan.root),
                uses_computed: uses_computed(&plan.root),
                any_event: reads_any_event(&plan.root),
                record: record.clone(),
                plan,
                members,
            };
            live.next_id += 1;
            live.segments.push(segment);
            // Dependency order again (the new rule may read other segments, others may read it).
            let dependencies: BTreeMap<String, Vec<String>> = live
                .segments
                .iter()
                .map(|s| (s.record.name.clone(), s.plan.segments.clone()))
                .collect();
            let order = cible_lang::check::dependency_order(&dependencies).map_err(|cycle| {
                EngineError::Invalid(format!("segment cycle: {}", cycle.join(" -> ")))
            })?;
            let mut by_name: FxHashMap<String, LiveSegment> = live
                .segments
                .drain(..)
                .map(|s| (s.record.name.clone(), s))
                .collect();
            live.segments = order
                .into_iter()
                .filter_map(|name| by_name.remove(&name))
                .collect();
            if live.computed.is_none() && live.segments.iter().any(|s| s.uses_computed) {
                live.computed =
                    this.computed_setup(live.segments.iter().map(|s| &s.plan), &dictionaries, now)?;
            }
            let position = live.position(&record.name).expect("just inserted");
            let started = Instant::now();
            this.segments
                .backfill_progress
                .store(0, std::sync::atomic::Ordering::Relaxed);
            let stats =
                this.evaluate_over_everyone(live, feed, [position], now, Cause::SegmentEdit)?;
            let stat = stats.get(&position).copied().unwrap_or_default();
            let segment = &mut live.segments[position];
            segment.record.size = segment.members.len();
            segment.record.last_backfill = Some(BackfillReport {
                at: now,
                duration_ms: started.elapsed().as_millis() as u64,
                profiles: stat.profiles,
                members: segment.members.len(),
                entered: stat.entered,
                exited: stat.exited,
                via_messages: stat.via_messages,
                error: None,
            });
            this.population
                .store()
                .segments
                .insert(segment.record.name.as_bytes(), to_json(&segment.record))?;
            Ok(segment.record.clone())
        })
    }

    /// After a recalibration or a model change: new computed-traits setup, and every segment
    /// reading computed traits (and those built on them) evaluated over everyone.
    pub(crate) fn reevaluate_computed(&self, now: i64, cause: Cause) -> Result<()> {
        self.with_segments(now, |this, live, feed| {
            let dictionaries = this.population.dictionary_snapshot(true);
            live.computed =
                this.computed_setup(live.segments.iter().map(|s| &s.plan), &dictionaries, now)?;
            let positions: Vec<usize> = (0..live.segments.len())
                .filter(|i| live.segments[*i].uses_computed)
                .collect();
            this.evaluate_over_everyone(live, feed, positions, now, cause)?;
            Ok(())
        })
    }

    /// Incremental driver: the profiles a committed batch touched, evaluated for the segments
    /// that read what changed.
    pub(crate) fn segments_after_batch(
        &self,
        guard: &mut SegmentsState,
        touched: &Touched,
        now: i64,
        cause: Cause,
    ) -> Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        self.with_loaded(guard, now, |this, state, feed| {
            // Before the selection: a segment's plan must know the event names this batch
            // brought, or a profile sending the first one would not be selected for it.
            this.replan_if_grown(state);
            let mut changed_profiles: FxHashSet<u32> = FxHashSet::default();
            let mut round: Vec<(usize, Vec<u32>)> = Vec::new();
            for (index, segment) in state.segments.iter().enumerate() {
                let mut profiles: FxHashSet<u32> = touched
                    .events
                    .iter()
                    .filter(|(_, names)| {
                        segment.any_event || names.iter().any(|n| segment.plan.names.contains(n))
                    })
                    .map(|(p, _)| *p)
                    .collect();
                if segment.uses_traits || segment.any_event {
                    profiles.extend(touched.traits.iter().copied());
                }
                profiles.extend(touched.all.iter().copied());
                changed_profiles.extend(profiles.iter().copied());
                round.push((index, profiles.into_iter().collect()));
            }
            // Segments built on others see every profile of this batch that may have changed.
            for (index, profiles) in round.iter_mut() {
                if !state.segments[*index].plan.segments.is_empty() {
                    profiles.extend(changed_profiles.iter().copied());
                }
                profiles.sort_unstable();
                profiles.dedup();
            }
            round.retain(|(_, profiles)| !profiles.is_empty());
            let round: Vec<(usize, &[u32])> =
                round.iter().map(|(i, p)| (*i, p.as_slice())).collect();
            this.reevaluate(state, feed, &round, now, cause)?;
            Ok(())
        })
    }

    /// Time driver: re-evaluates every (profile, segment) whose verdict may have changed by
    /// `now`. Returns the next instant at which a timer is due.
    pub fn tick_segments(&self, now: i64) -> Result<Option<i64>> {
        let mut guard = self.segments.state.lock();
        let guard = &mut *guard;
        let Some(state) = guard.live.as_mut() else {
            return Ok(None);
        };
        let now_s = seconds(now);
        let mut due: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        while let Some(Reverse((at, profile, id))) = state.timers.peek().copied() {
            if at > now_s {
                break;
            }
            state.timers.pop();
            if state.scheduled.get(&(id, profile)) != Some(&at) {
                continue; // stale: re-armed at another time, or no longer needed
            }
            state.scheduled.remove(&(id, profile));
            if let Some(position) = state.position_of_id(id) {
                due.entry(position).or_default().push(profile);
            }
        }
        let mut rounds: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        for (position, profiles) in due {
            // Segments built on this one may change with it: evaluate them for the same people.
            for index in state.with_dependants([position]) {
                rounds
                    .entry(index)
                    .or_default()
                    .extend(profiles.iter().copied());
            }
        }
        let rounds: Vec<(usize, Vec<u32>)> = rounds
            .into_iter()
            .map(|(index, mut profiles)| {
                profiles.sort_unstable();
                profiles.dedup();
                (index, profiles)
            })
            .collect();
        let rounds: Vec<(usize, &[u32])> = rounds.iter().map(|(i, p)| (*i, p.as_slice())).collect();
        if !rounds.is_empty() {
            let outcome = self.reevaluate(state, &mut guard.feed, &rounds, now, Cause::Timer);
            if let Err(error) = outcome {
                guard.live = None;
                return Err(error);
            }
        }
        let Some(state) = guard.live.as_ref() else {
            return Ok(None);
        };
        Ok(state
            .timers
            .peek()
            .map(|Reverse((at, _, _))| i64::from(*at) * 1000))
    }

    fn membership_batch(&self) -> fjall::OwnedWriteBatch {
        self.population.store().synced_batch()
    }

    /// Commits a pass's changes with the memberships of the segments they changed, then moves
    /// the feed on and wakes its readers.
    fn commit_pass(
        &self,
        state: &mut LiveState,
        feed: &mut FeedWriter,
        mut batch: fjall::OwnedWriteBatch,
        changes: &mut super::feed::FeedBatch,
        dirty: &mut FxHashSet<usize>,
    ) -> Result<()> {
        if dirty.is_empty() {
            return Ok(());
        }
        for index in dirty.drain() {
            let segment = &mut state.segments[index];
            segment.record.size = segment.members.len();
            batch.insert(
                &self.population.store().meta,
                crate::store::segment_size_key(&segment.record.name),
                segment.record.size.to_be_bytes(),
            );
        }
        // The commit syncs fjall's journal: every batch the writer had committed before it is
        // durable after it, and those batches' redo records can go (see `crate::eventlog`).
        let log = &self.population.store().log;
        let committed = log.committed();
        batch.commit()?;
        let written = changes.written;
        feed.committed(changes);
        self.population
            .metrics()
            .feed_committed(feed.head(), written);
        self.notify_feed(feed.head());
        // After the feed moved on: a failure here must not make the next pass reuse its
        // sequence numbers. The records stay queued for the next retire.
        if let Err(error) = log.retire(committed) {
            tracing::error!(error = %error, "retiring redo records failed");
        }
        Ok(())
    }

    /// Plans every segment again if the dictionaries grew since they were planned (new event
    /// names or key texts: conditions compiled against the old ones would miss them). Costs a
    /// look at two counters when they did not, and never waits for the writer then.
    fn replan_if_grown(&self, state: &mut LiveState) {
        let sizes = self.population.dictionary_sizes();
        if sizes == state.dictionary_sizes {
            return;
        }
        let dictionaries = self.population.dictionary_snapshot(true);
        for segment in &mut state.segments {
            segment.plan = plan::plan(&segment.record.ast, &dictionaries);
        }
        if let Some(setup) = &mut state.computed {
            self.population.replan_computed(setup, &dictionaries);
        }
        state.dictionary_sizes = (dictionaries.names.len(), dictionaries.keys.len());
        state.names = std::sync::Arc::new(super::DictSnapshot {
            names: dictionaries.names,
            keys: Default::default(),
        });
    }

    /// Evaluates `profiles` for the segments at the given positions (in dependency order),
    /// records the enters and exits in the feed, arms timers; one store batch for all.
    fn reevaluate(
        &self,
        state: &mut LiveState,
        feed: &mut FeedWriter,
        rounds: &[(usize, &[u32])],
        now: i64,
        cause: Cause,
    ) -> Result<FxHashMap<usize, PassStats>> {
        let started = Instant::now();
        let now_s = seconds(now);
        self.replan_if_grown(state);
        let dictionaries = std::sync::Arc::clone(&state.names);
        let mut batch = self.membership_batch();
        let mut changes = feed.begin();
        let mut names = Vec::new();
        for (index, _) in rounds {
            super::trait_names(&state.segments[*index].plan.root, &mut names);
        }
        self.population.ensure_trait_columns(&names)?;
        // As of the batches handed off so far (the writer mirrors consents before handing off).
        let consents = self.population.consents();
        let profiling = self.population.consent_check("profiling")?;
        let mut stats: FxHashMap<usize, PassStats> = FxHashMap::default();
        let mut dirty: FxHashSet<usize> = FxHashSet::default();
        for (index, profiles) in rounds {
            let index = *index;
            let segment_started = Instant::now();
            let dependencies: FxHashMap<String, RoaringBitmap> = state.segments[index]
                .plan
                .segments
                .iter()
                .filter_map(|name| {
                    state
                        .segments
                        .iter()
                        .find(|s| &s.record.name == name)
                        .map(|s| (name.clone(), s.members.clone()))
                })
                .collect();
            let stat = stats.entry(index).or_default();
            // Only admin work stops early: every hand-off of a committed batch is evaluated
            // (exits of merged-away and removed profiles come from them alone).
            let stoppable = profiles.len() > CHUNK
                && matches!(
                    cause,
                    Cause::SegmentEdit | Cause::Recalibration | Cause::ModelActivation
                );
            for chunk in profiles.chunks(CHUNK) {
                if stoppable
                    && self
                        .segments
                        .stopping
                        .load(std::sync::atomic::Ordering::Acquire)
                {
                    // Commits what is done (consistent: memberships and feed together).
                    self.commit_pass(state, feed, batch, &mut changes, &mut dirty)?;
                    return Err(EngineError::Cancelled);
                }
                // Liveness and traits first: the writer takes its lock before `hot`, so a
                // reader holding `hot` must not ask for it (the lock order forbids it).
                let alive = self.population.alive_flags(chunk);
                let traits: FxHashMap<u32, BTreeMap<String, crate::records::TraitValue>> =
                    if state.segments[index].uses_traits {
                        let hot_free = self.population.trait_columns();
                        chunk.iter().map(|p| (*p, hot_free.traits_of(*p))).collect()
                    } else {
                        FxHashMap::default()
                    };
                // The guard (or the window) lives only for this block.
                let verdicts: Vec<Result<Verdict>> = {
                    let segment = &state.segments[index];
                    // A copy for a dense chunk: the writer never waits for this evaluation.
                    let hot = self.population.hot_chunk(chunk);
                    let run = RuleRun {
                        plan: &segment.plan,
                        hot: &hot,
                        dictionaries: &dictionaries,
                        now: now_s,
                        traits: &traits,
                        dependencies: &dependencies,
                        computed: state.computed.as_ref().filter(|_| segment.uses_computed),
                        consents: &consents,
                        profiling: &profiling,
                    };
                    let evaluate = |(&profile, &alive): (&u32, &bool)| -> Result<_> {
                        if !alive {
                            return Ok((profile, false, None, false));
                        }
                        let (verdict, via) = self.evaluate_profile(&run, profile)?;
                        Ok((profile, verdict.member, verdict.next_change, via))
                    };
                    if chunk.len() >= 256 {
                        crate::threads::on_segment_pool(|| {
                            chunk
                                .par_iter()
                                .zip(alive.par_iter())
                                .map(evaluate)
                                .collect()
                        })
                    } else {
                        chunk.iter().zip(alive.iter()).map(evaluate).collect()
                    }
                };
                let segment = &mut state.segments[index];
                for verdict in verdicts {
                    let (profile, member, next, via) = verdict?;
                    stat.profiles += 1;
                    stat.via_messages += u64::from(via);
                    let key = (segment.id, profile);
                    match next {
                        Some(at) if state.scheduled.get(&key) != Some(&at) => {
                            state.scheduled.insert(key, at);
                            state.timers.push(Reverse((at, profile, segment.id)));
                        }
                        Some(_) => {}
                        None => {
                            state.scheduled.remove(&key);
                        }
                    }
                    if member == segment.members.contains(profile) {
                        continue;
                    }
                    if member {
                        segment.members.insert(profile);
                        stat.entered += 1;
                    } else {
                        segment.members.remove(profile);
                        stat.exited += 1;
                    }
                    let change = Change {
                        at: now,
                        profile,
                        entered: member,
                        size: segment.members.len(),
                    };
                    changes.record(
                        self.population.store(),
                        &mut batch,
                        &segment.record.name,
                        change,
                        cause,
                    );
                    dirty.insert(index);
                }
                self.segments
                    .backfill_progress
                    .fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                if changes.written >= CHANGES_PER_COMMIT {
                    let full = std::mem::replace(&mut batch, self.membership_batch());
                    self.commit_pass(state, feed, full, &mut changes, &mut dirty)?;
                }
            }
            self.population.metrics().segment_evaluated(
                &state.segments[index].record.name,
                profiles.len() as u64,
                segment_started.elapsed(),
            );
        }
        // Stale entries pile up as verdicts are re-armed; rebuild the heap when they dominate.
        if state.timers.len() > 2 * state.scheduled.len() + 1024 {
            state.timers = state
                .scheduled
                .iter()
                .map(|(&(id, profile), &at)| Reverse((at, profile, id)))
                .collect();
        }
        self.commit_pass(state, feed, batch, &mut changes, &mut dirty)?;
        tracing::debug!(
            cause = cause.as_str(),
            rounds = rounds.len(),
            elapsed_ms = started.elapsed().as_millis() as u64,
            "segments evaluated"
        );
        Ok(stats)
    }
}
