//! Computed traits with the trained models' outputs: what a pass over profiles prepares once
//! ([`Setup`]: the traits' plan and calibration, the active models and their feature plan), what
//! each profile computes on first use in a pass ([`Lazy`]), and reads of many profiles at one
//! instant ([`TraitsReader`]). Above `computed`, `features` and `models`, which know nothing of
//! each other's passes.

use rayon::prelude::*;

use crate::computed::calibrate::Calibration;
use crate::computed::{ComputedTraits, ModelTraits, TraitPlan, compute};
use crate::hot::Timeline;

/// Everything computing traits needs, prepared once per pass: the plan, the calibration, the
/// active models and what their feature rows read.
pub struct Setup {
    pub plan: TraitPlan,
    pub calibration: std::sync::Arc<Calibration>,
    pub models: std::sync::Arc<crate::models::saved::ModelSet>,
    pub features: crate::features::FeaturePlan,
}

impl Setup {
    /// The traits of a profile at `now`, the models' outputs included when there are models
    /// and `profiling` permits them (the profile did not object to profiling: see
    /// `Engine::consent_check`).
    pub fn traits(&self, timeline: &Timeline<'_>, now: u32, profiling: bool) -> ComputedTraits {
        let mut traits = compute(timeline, now, &self.plan, &self.calibration);
        if !self.models.is_empty() && profiling {
            let (models, next) = self.score(timeline, now, &traits);
            traits.models = models;
            traits.next_change = next;
        }
        traits
    }

    /// What the models say of a profile with these traits, and the next instant that may change
    /// (every feature is constant until then: see [`crate::features::row`]).
    pub fn score(
        &self,
        timeline: &Timeline<'_>,
        now: u32,
        traits: &ComputedTraits,
    ) -> (ModelTraits, Option<u32>) {
        let (row, next) = crate::features::row(timeline, now, traits, &self.features);
        (self.models.score(&row, traits), next)
    }
}

/// A profile's computed traits, computed on first use and shared by every rule of a pass; the
/// models' outputs likewise, only when a rule reads them.
pub struct Lazy<'a> {
    /// Whether models may score the profile (it did not object to profiling).
    profiling: bool,
    cell: std::cell::OnceCell<ComputedTraits>,
    scored: std::cell::OnceCell<(ModelTraits, Option<u32>)>,
    timeline: Timeline<'a>,
    now: u32,
    setup: &'a Setup,
}

impl<'a> Lazy<'a> {
    pub fn new(timeline: Timeline<'a>, now: u32, setup: &'a Setup, profiling: bool) -> Self {
        Self {
            profiling,
            cell: std::cell::OnceCell::new(),
            scored: std::cell::OnceCell::new(),
            timeline,
            now,
            setup,
        }
    }

    pub fn get(&self) -> &ComputedTraits {
        self.cell.get_or_init(|| {
            compute(
                &self.timeline,
                self.now,
                &self.setup.plan,
                &self.setup.calibration,
            )
        })
    }

    /// The models' outputs and when they may next change: none for a profile that objected
    /// to profiling.
    pub fn models(&self) -> &(ModelTraits, Option<u32>) {
        self.scored.get_or_init(|| {
            if self.profiling {
                self.setup.score(&self.timeline, self.now, self.get())
            } else {
                (ModelTraits::default(), None)
            }
        })
    }
}

/// Computed traits at one instant for many profiles, read in chunks (exports); made by
/// `Engine::traits_reader`.
pub struct TraitsReader<'e> {
    pub(crate) hot: &'e crate::lock::OrderedRwLock<crate::hot::HotStore>,
    pub(crate) setup: Setup,
    pub(crate) now: u32,
    /// Who may be scored (see [`Setup::traits`]).
    pub(crate) profiling: crate::consent::ConsentCheck,
}

impl TraitsReader<'_> {
    /// The traits of these profiles (the models' outputs included), in parallel, in their
    /// order.
    pub fn of(&self, profiles: &[u32]) -> Vec<ComputedTraits> {
        let hot = self.hot.read();
        profiles
            .par_iter()
            .map(|p| {
                self.setup
                    .traits(&hot.timeline(*p), self.now, self.profiling.permits(*p))
            })
            .collect()
    }

    /// [`Self::of`] without the models' outputs.
    pub fn base_of(&self, profiles: &[u32]) -> Vec<ComputedTraits> {
        let hot = self.hot.read();
        let setup = &self.setup;
        profiles
            .par_iter()
            .map(|p| compute(&hot.timeline(*p), self.now, &setup.plan, &setup.calibration))
            .collect()
    }
}
