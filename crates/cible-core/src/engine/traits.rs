//! The engine's face for computed traits: what it computes over the population (the
//! calibration, every profile's traits, the product model) and hands to the trait store
//! ([`crate::computed::ops::TraitStore`]), and the lifecycle segments a refresh creates.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use rayon::prelude::*;

use super::Engine;
use crate::computed::calibrate::Calibration;
use crate::computed::config::TraitConfig;
use crate::computed::ops::{
    CALIBRATION_KEY, PRODUCT_MODEL_KEY, RefreshReport, TraitStore, lifecycle_segment, names_by_id,
    seconds,
};
use crate::computed::recommend::{Activity, ModelCounts, ProductModel, Recommendation};
use crate::computed::{CATEGORY_KEY, ComputedTraits, STAGES, TraitPlan, raw_with_send_counts};
use crate::error::{EngineError, Result};
use crate::records::DictSnapshot;
use crate::scoring::{Setup, TraitsReader};

impl Engine {
    /// The configuration (`traits.toml` in the data directory, or the defaults).
    pub fn trait_config(&self) -> &TraitConfig {
        self.traits.config()
    }

    /// What the computed traits keep (configuration, calibration, product model).
    pub fn trait_store(&self) -> &TraitStore {
        &self.traits
    }

    /// Refuses to compute a population-wide value on a light open (it sees no population).
    fn population_wide(&self, what: &str) -> Result<()> {
        if self.is_light() {
            return Err(EngineError::Invalid(format!(
                "{what} must be computed over every profile: not on a light open"
            )));
        }
        Ok(())
    }

    /// The configuration resolved against the dictionaries.
    pub fn trait_plan(&self, dictionaries: &DictSnapshot) -> TraitPlan {
        TraitPlan::new(
            self.traits.config(),
            &|name| dictionaries.names.get(name).copied(),
            dictionaries.keys.clone(),
        )
    }

    /// The current calibration; computed (and stored) at `now` if there is none yet.
    pub fn calibration(&self, now: i64) -> Result<Arc<Calibration>> {
        match self.traits.calibration()? {
            Some(calibration) => Ok(calibration),
            None => self.calibrate(now),
        }
    }

    /// Whether a calibration is stored (a light open cannot compute one: it sees no population).
    pub fn has_calibration(&self) -> Result<bool> {
        self.traits.has_calibration()
    }

    /// Computes the population calibration at `now` over every live profile and stores it.
    pub fn calibrate(&self, now: i64) -> Result<Arc<Calibration>> {
        Ok(self.calibrate_with_raws(now)?.0)
    }

    /// Recomputes everything: the calibration at `now`, then every live profile's traits
    /// (reusing the calibration pass's per-profile sums). Returns them in `live_profiles` order.
    pub fn recompute_traits(&self, now: i64) -> Result<(Arc<Calibration>, Vec<ComputedTraits>)> {
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        let (calibration, raws) = self.calibrate_with_raws(now)?;
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let profiles = self.live_profiles();
        let mut traits = Vec::with_capacity(profiles.len());
        let mut raws = raws.into_iter();
        for outer in profiles.chunks(crate::hot::READ_CHUNK) {
            let chunk_raws: Vec<_> = raws.by_ref().take(outer.len()).collect();
            let hot = self.hot_chunk(outer);
            traits.par_extend(outer.par_iter().zip(chunk_raws).map(|(profile, raw)| {
                crate::computed::compute_from_raw(
                    &hot.timeline(*profile),
                    seconds(now),
                    &plan,
                    &calibration,
                    raw,
                )
            }));
        }
        Ok((calibration, traits))
    }

    fn calibrate_with_raws(
        &self,
        now: i64,
    ) -> Result<(Arc<Calibration>, Vec<crate::computed::RawTraits>)> {
        let at = seconds(now);
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let profiles = self.live_profiles();
        type Part = (Vec<crate::computed::RawTraits>, [u64; 24], [u64; 7]);
        let mut raws = Vec::with_capacity(profiles.len());
        let (mut hours, mut weekdays) = ([0u64; 24], [0u64; 7]);
        // The hot store's read guard is held for one outer chunk at a time: the writer waits
        // for one chunk at most while the whole population is read.
        for outer in profiles.chunks(crate::hot::READ_CHUNK) {
            let hot = self.hot_chunk(outer);
            let parts: Vec<Part> = outer
                .par_chunks(4096)
                .map(|chunk| {
                    let mut part: Part = (Vec::with_capacity(chunk.len()), [0; 24], [0; 7]);
                    for &profile in chunk {
                        let (raw, (hours, weekdays)) =
                            raw_with_send_counts(&hot.timeline(profile), at, at, &plan);
                        part.0.push(raw);
                        for (x, y) in part.1.iter_mut().zip(hours) {
                            *x += u64::from(y);
                        }
                        for (x, y) in part.2.iter_mut().zip(weekdays) {
                            *x += u64::from(y);
                        }
                    }
                    part
                })
                .collect();
            drop(hot);
            for part in parts {
                raws.extend(part.0);
                for (x, y) in hours.iter_mut().zip(part.1) {
                    *x += y;
                }
                for (x, y) in weekdays.iter_mut().zip(part.2) {
                    *x += y;
                }
            }
        }
        let calibration = Calibration::from_raw(at, &raws, &hours, &weekdays);
        self.population_wide(CALIBRATION_KEY)?;
        Ok((self.traits.keep_calibration(calibration)?, raws))
    }

    /// What a rule on computed traits reads (see [`crate::segment::Population::computed`]): the
    /// category column they need, their plan, calibration and models.
    pub(crate) fn computed_traits_setup(
        &self,
        dictionaries: &DictSnapshot,
        now: i64,
    ) -> Result<Setup> {
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        self.setup(dictionaries, now)
    }

    fn setup(&self, dictionaries: &DictSnapshot, now: i64) -> Result<Setup> {
        Ok(Setup {
            plan: self.trait_plan(dictionaries),
            calibration: self.calibration(now)?,
            models: self.model_set()?,
            features: self.feature_plan(),
        })
    }

    /// Every computed trait of one profile at `now`.
    pub fn computed_traits(&self, profile: u32, now: i64) -> Result<ComputedTraits> {
        Ok(self.traits_reader(now)?.of(&[profile]).remove(0))
    }

    /// Computed traits of many profiles at once, sharing one plan.
    pub fn computed_traits_of(&self, profiles: &[u32], now: i64) -> Result<Vec<ComputedTraits>> {
        Ok(self.traits_reader(now)?.of(profiles))
    }

    /// What computing traits at `now` needs (the category column, the plan, the calibration),
    /// prepared once for reading many profiles in chunks (exports).
    pub fn traits_reader(&self, now: i64) -> Result<TraitsReader<'_>> {
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        Ok(TraitsReader {
            hot: &self.hot,
            setup: self.setup(&self.dictionaries(), now)?,
            now: seconds(now),
            profiling: self.consent_check("profiling")?,
        })
    }

    /// Recomputes the calibration and the product model, creates the lifecycle segments if
    /// missing, and re-evaluates the live segments that read computed traits.
    pub fn refresh_traits(&self, now: i64) -> Result<RefreshReport> {
        let started = Instant::now();
        let calibration = self.calibrate(now)?;
        let calibration_seconds = started.elapsed().as_secs_f64();
        let started = Instant::now();
        let model = self.build_product_model(now)?;
        let product_model_seconds = started.elapsed().as_secs_f64();
        let created_segments = self.ensure_lifecycle_segments(now)?;
        self.audit(self.audit_entry(
            crate::audit::Action::TraitsRefresh,
            &[],
            serde_json::json!({"profiles": calibration.profiles}),
        ))?;
        self.reevaluate_computed(now, crate::segment::feed::Cause::Recalibration)?;
        Ok(RefreshReport {
            calibration: (*calibration).clone(),
            calibration_seconds,
            products: model.top.values().map(|v| v.len() as u64).sum(),
            product_model_seconds,
            created_segments,
        })
    }

    /// Recalibrates (and rebuilds the product model) when the calibration is older than
    /// `max_age_ms`; returns whether it did. Nothing happens before a first calibration.
    pub fn refresh_traits_if_older(&self, now: i64, max_age_ms: i64) -> Result<bool> {
        let Some(calibration) = self.traits.cached_calibration() else {
            return Ok(false);
        };
        if i64::from(calibration.at) * 1000 + max_age_ms > now {
            return Ok(false);
        }
        self.calibrate(now)?;
        self.build_product_model(now)?;
        self.reevaluate_computed(now, crate::segment::feed::Cause::Recalibration)?;
        Ok(true)
    }

    /// Creates the segments `lifecycle-new`, `lifecycle-engaged`, ... (rule `lifecycle = "..."`)
    /// that are missing: their enter/exit log is the history of stage changes. Returns the
    /// names created.
    pub fn ensure_lifecycle_segments(&self, now: i64) -> Result<Vec<String>> {
        let existing: Vec<String> = self.segments()?.into_iter().map(|s| s.name).collect();
        let mut created = Vec::new();
        for stage in STAGES {
            let name = lifecycle_segment(stage);
            if existing.contains(&name) {
                continue;
            }
            let rule = format!("lifecycle = \"{stage}\"");
            let expr = cible_lang::parse(&rule).expect("lifecycle rules parse");
            self.create_segment(&name, expr, &rule, now)?;
            created.push(name);
        }
        Ok(created)
    }

    /// The product model; built at `now` if there is none yet.
    pub fn product_model(&self, now: i64) -> Result<Arc<ProductModel>> {
        match self.traits.product_model()? {
            Some(model) => Ok(model),
            None => self.build_product_model(now),
        }
    }

    /// Rebuilds the product model from every live profile's full messages.
    pub fn build_product_model(&self, now: i64) -> Result<Arc<ProductModel>> {
        let dictionaries = self.name_dictionary();
        let names = names_by_id(&dictionaries);
        let only = Self::activity_names(&dictionaries);
        let profiles = self.live_profiles();
        let progress = AtomicU64::new(0);
        let counts = profiles
            .par_chunks(1024)
            .map(|chunk| -> Result<ModelCounts> {
                let mut counts = ModelCounts::default();
                for &profile in chunk {
                    counts.add(&self.activity(profile, &dictionaries, &names, &only)?);
                }
                progress.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(counts)
            })
            .try_reduce(ModelCounts::default, |a, b| Ok(a.merge(b)))?;
        self.population_wide(PRODUCT_MODEL_KEY)?;
        self.traits.keep_product_model(counts.finish(now))
    }

    /// The event names [`Engine::activity`] reads: ids of `dictionaries`, found once per pass.
    fn activity_names(dictionaries: &DictSnapshot) -> Vec<u16> {
        crate::computed::recommend::ACTIVITY_EVENTS
            .iter()
            .filter_map(|name| dictionaries.names.get(*name).copied())
            .collect()
    }

    fn activity(
        &self,
        profile: u32,
        dictionaries: &DictSnapshot,
        names: &[String],
        only: &[u16],
    ) -> Result<Activity> {
        let mut activity = Activity::default();
        for event in crate::segment::full_events(&self.store, profile, dictionaries, Some(only))? {
            if let Some(name) = names.get(usize::from(event.name)) {
                activity.add(name, i64::from(event.ts) * 1000, &event.properties);
            }
        }
        Ok(activity)
    }

    /// Up to `n` product recommendations for a profile at `now`.
    pub fn recommend(&self, profile: u32, n: usize, now: i64) -> Result<Vec<Recommendation>> {
        if !self.is_alive(profile) {
            return Err(EngineError::NotFound(format!("profile {profile}")));
        }
        let model = self.product_model(now)?;
        let dictionaries = self.name_dictionary();
        let activity = self.activity(
            profile,
            &dictionaries,
            &names_by_id(&dictionaries),
            &Self::activity_names(&dictionaries),
        )?;
        Ok(crate::computed::recommend::recommend(
            &activity, &model, now, n,
        ))
    }
}
