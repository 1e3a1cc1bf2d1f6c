//! Live segments: membership kept exact as events arrive (incremental driver) and as time passes
//! (time driver), without recomputing everything.
//!
//! - After each committed batch, only the segments whose rule reads one of the batch's event
//!   names (or traits, for identify calls, or any event, for first/last seen) are re-evaluated,
//!   and only for the profiles the batch touched; then the segments built on the ones that
//!   changed, in dependency order.
//! - Each evaluation yields the next instant its verdict may change by itself; a timer queue
//!   re-evaluates that profile for that segment then.
//! - Enters and exits are logged with their time and the membership is stored, in one batch.
//!
//! The three drivers share one evaluator, so incremental, timed and batch results agree; the
//! property test in `tests.rs` checks it.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};

use roaring::RoaringBitmap;
use rustc_hash::{FxHashMap, FxHashSet};

use super::plan::{self, Plan};
use super::{Change, DictSnapshot, RuleRun, SegmentRecord, to_json, uses_traits};
use crate::engine::{Engine, EngineError};

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// What a committed batch changed, for the live drivers.
#[derive(Debug, Default, Clone)]
pub struct Touched {
    /// Profiles with new events, and the event-name ids they received.
    pub events: FxHashMap<u32, FxHashSet<u16>>,
    /// Profiles that received calls without an event name (identify, alias, group): their
    /// traits or first/last seen may have changed.
    pub traits: FxHashSet<u32>,
    /// Profiles that no longer exist (merged away or removed): they leave every segment.
    pub gone: FxHashSet<u32>,
    /// Profiles to re-evaluate for every segment (merge survivors, unmerged profiles).
    pub all: FxHashSet<u32>,
}

impl Touched {
    pub fn is_empty(&self) -> bool {
        self.events.is_empty()
            && self.traits.is_empty()
            && self.gone.is_empty()
            && self.all.is_empty()
    }
}

struct LiveSegment {
    record: SegmentRecord,
    plan: Plan,
    members: RoaringBitmap,
    uses_traits: bool,
    /// Reads any event (first/last seen).
    any_event: bool,
}

/// The state of the live drivers.
pub struct LiveState {
    /// In dependency order.
    segments: Vec<LiveSegment>,
    timers: BinaryHeap<Reverse<(u32, u32, usize)>>,
    /// The one instant each (segment, profile) is due; heap entries that disagree are stale.
    scheduled: FxHashMap<(usize, u32), u32>,
    dictionary_sizes: (usize, usize),
    /// The computed-traits plan and calibration, when a segment reads computed traits.
    computed: Option<crate::computed::Setup>,
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

impl Engine {
    /// Starts the live drivers: loads every segment in dependency order and brings it up to
    /// date at `now` (catching up on time passed while stopped), arming the timers.
    pub fn start_live_segments(&self, now: i64) -> Result<()> {
        let mut live = self.live.lock();
        *live = Some(self.load_live(now)?);
        Ok(())
    }

    /// Reloads the live drivers after segments were created, edited or deleted.
    pub(crate) fn reload_live_segments(&self, now: i64) -> Result<()> {
        let mut live = self.live.lock();
        if live.is_some() {
            *live = Some(self.load_live(now)?);
        }
        Ok(())
    }

    fn load_live(&self, now: i64) -> Result<LiveState> {
        let list = self.segments()?;
        let dependencies = super::dependencies_of(&list);
        let records: BTreeMap<String, SegmentRecord> =
            list.into_iter().map(|s| (s.name.clone(), s)).collect();
        let order = cible_lang::check::dependency_order(&dependencies).map_err(|cycle| {
            EngineError::Invalid(format!("segment cycle: {}", cycle.join(" -> ")))
        })?;
        self.ensure_columns(records.values().map(|r| &r.ast))?;
        let dictionaries = self.dictionaries();
        let mut state = LiveState {
            segments: Vec::new(),
            timers: BinaryHeap::new(),
            scheduled: FxHashMap::default(),
            dictionary_sizes: (dictionaries.names.len(), dictionaries.keys.len()),
            computed: None,
        };
        for name in order {
            let Some(record) = records.get(&name).cloned() else {
                continue;
            };
            let plan = plan::plan(&record.ast, &dictionaries);
            let members = self.members(&name)?;
            state.segments.push(LiveSegment {
                uses_traits: uses_traits(&plan.root),
                any_event: reads_any_event(&plan.root),
                record,
                plan,
                members,
            });
        }
        let computed =
            self.computed_setup(state.segments.iter().map(|s| &s.plan), &dictionaries, now)?;
        state.computed = computed;
        let everyone: Vec<u32> = self.live_profiles();
        let all: Vec<usize> = (0..state.segments.len()).collect();
        let rounds: Vec<(usize, Vec<u32>)> = all.iter().map(|i| (*i, everyone.clone())).collect();
        self.reevaluate(&mut state, &rounds, &FxHashSet::default(), now)?;
        Ok(state)
    }

    /// The live membership of a segment, when the drivers run.
    pub fn live_members(&self, name: &str) -> Option<RoaringBitmap> {
        let live = self.live.lock();
        live.as_ref()?
            .segments
            .iter()
            .find(|s| s.record.name == name)
            .map(|s| s.members.clone())
    }

    /// Incremental driver: called after each committed batch.
    pub(crate) fn live_after_batch(&self, touched: &Touched, now: i64) -> Result<()> {
        if touched.is_empty() {
            return Ok(());
        }
        let mut guard = self.live.lock();
        let Some(state) = guard.as_mut() else {
            return Ok(());
        };
        let sizes = self.dictionary_sizes();
        if sizes != state.dictionary_sizes {
            // New event names or key texts: conditions compiled against the old dictionaries
            // would miss them.
            let dictionaries = self.dictionaries();
            for segment in &mut state.segments {
                segment.plan = plan::plan(&segment.record.ast, &dictionaries);
            }
            if let Some(setup) = &mut state.computed {
                setup.plan = self.trait_plan(&dictionaries);
                setup.features = self.feature_plan();
            }
            state.dictionary_sizes = sizes;
        }
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
            profiles.extend(touched.gone.iter().copied());
            profiles.extend(touched.all.iter().copied());
            changed_profiles.extend(profiles.iter().copied());
            round.push((index, profiles.into_iter().collect()));
        }
        // Segments built on others see every profile of this batch that may have changed.
        for (index, profiles) in round.iter_mut() {
            if !state.segments[*index].plan.segments.is_empty() {
                profiles.extend(changed_profiles.iter().copied());
                profiles.sort_unstable();
                profiles.dedup();
            }
        }
        // One pass, one store batch for every segment of this round.
        round.retain(|(_, profiles)| !profiles.is_empty());
        self.reevaluate(state, &round, &touched.gone, now)?;
        Ok(())
    }

    /// Time driver: re-evaluates every (profile, segment) whose verdict may have changed by
    /// `now`. Returns the next instant at which a timer is due.
    pub fn tick_segments(&self, now: i64) -> Result<Option<i64>> {
        let mut guard = self.live.lock();
        let Some(state) = guard.as_mut() else {
            return Ok(None);
        };
        let now_s = seconds(now);
        let mut due: BTreeMap<usize, Vec<u32>> = BTreeMap::new();
        while let Some(Reverse((at, profile, segment))) = state.timers.peek().copied() {
            if at > now_s {
                break;
            }
            state.timers.pop();
            if state.scheduled.get(&(segment, profile)) != Some(&at) {
                continue; // stale: re-armed at another time, or no longer needed
            }
            state.scheduled.remove(&(segment, profile));
            due.entry(segment).or_default().push(profile);
        }
        for (segment, mut profiles) in due {
            profiles.sort_unstable();
            profiles.dedup();
            // Segments built on this one may change with it: evaluate them for the same people.
            let mut indexes = vec![segment];
            let name = state.segments[segment].record.name.clone();
            indexes.extend(
                (segment + 1..state.segments.len())
                    .filter(|i| state.segments[*i].plan.segments.contains(&name)),
            );
            let rounds: Vec<(usize, Vec<u32>)> =
                indexes.iter().map(|i| (*i, profiles.clone())).collect();
            self.reevaluate(state, &rounds, &FxHashSet::default(), now)?;
        }
        Ok(state
            .timers
            .peek()
            .map(|Reverse((at, _, _))| i64::from(*at) * 1000))
    }

    /// Evaluates `profiles` for the segments at `indexes` (in dependency order), records the
    /// enters and exits, arms timers.
    fn reevaluate(
        &self,
        state: &mut LiveState,
        rounds: &[(usize, Vec<u32>)],
        gone: &FxHashSet<u32>,
        now: i64,
    ) -> Result<()> {
        let now_s = seconds(now);
        let dictionaries: DictSnapshot = self.name_dictionary();
        let mut batch = self
            .store
            .db
            .batch()
            .durability(Some(fjall::PersistMode::SyncAll));
        let mut dirty = false;
        // Traits are read once per profile for every segment of this pass that needs them.
        let mut traits: FxHashMap<u32, BTreeMap<String, crate::engine::TraitValue>> =
            FxHashMap::default();
        let mut names = Vec::new();
        for (index, _) in rounds {
            super::trait_names(&state.segments[*index].plan.root, &mut names);
        }
        self.ensure_trait_columns(&names)?;
        {
            // Released before anything takes the writer lock (`is_alive` below): the writer
            // updates these columns while holding it.
            let columns = self.trait_columns.read();
            for (index, profiles) in rounds {
                if state.segments[*index].uses_traits {
                    for &profile in profiles {
                        traits
                            .entry(profile)
                            .or_insert_with(|| columns.traits_of(profile));
                    }
                }
            }
        }
        for (index, profiles) in rounds {
            let (index, profiles) = (*index, profiles.as_slice());
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
            let segment = &state.segments[index];
            let hot = self.hot.read();
            let run = RuleRun {
                plan: &segment.plan,
                hot: &hot,
                dictionaries: &dictionaries,
                now: now_s,
                traits: &traits,
                dependencies: &dependencies,
                computed: state
                    .computed
                    .as_ref()
                    .filter(|_| super::uses_computed(&segment.plan.root)),
            };
            let mut verdicts = Vec::with_capacity(profiles.len());
            for &profile in profiles {
                // Timers may still name a profile merged away or removed since.
                if gone.contains(&profile) || !self.is_alive(profile) {
                    verdicts.push((profile, false, None));
                    continue;
                }
                let (verdict, _) = self.evaluate_profile(&run, profile)?;
                verdicts.push((profile, verdict.member, verdict.next_change));
            }
            drop(hot);
            let segment = &mut state.segments[index];
            let mut changed = false;
            for (profile, member, next) in verdicts {
                match next {
                    Some(at) if state.scheduled.get(&(index, profile)) != Some(&at) => {
                        state.scheduled.insert((index, profile), at);
                        state.timers.push(Reverse((at, profile, index)));
                    }
                    Some(_) => {}
                    None => {
                        state.scheduled.remove(&(index, profile));
                    }
                }
                let was = segment.members.contains(profile);
                if member == was {
                    continue;
                }
                if member {
                    segment.members.insert(profile);
                } else {
                    segment.members.remove(profile);
                }
                let change = Change {
                    at: now,
                    profile,
                    entered: member,
                    size: segment.members.len(),
                };
                self.log_change(&mut batch, &segment.record.name, change);
                changed = true;
            }
            if changed {
                let mut bytes = Vec::with_capacity(segment.members.serialized_size());
                segment
                    .members
                    .serialize_into(&mut bytes)
                    .map_err(|e| EngineError::Invalid(e.to_string()))?;
                batch.insert(&self.store.members, segment.record.name.as_bytes(), bytes);
                segment.record.size = segment.members.len();
                batch.insert(
                    &self.store.segments,
                    segment.record.name.as_bytes(),
                    to_json(&segment.record),
                );
                dirty = true;
            }
        }
        // Stale entries pile up as verdicts are re-armed; rebuild the heap when they dominate.
        if state.timers.len() > 2 * state.scheduled.len() + 1024 {
            state.timers = state
                .scheduled
                .iter()
                .map(|(&(segment, profile), &at)| Reverse((at, profile, segment)))
                .collect();
        }
        if dirty {
            batch.commit()?;
        }
        Ok(())
    }
}
