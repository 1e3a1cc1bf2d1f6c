//! The engine's computed-traits operations: configuration, calibration, per-profile traits,
//! lifecycle segments, the product model and recommendations.

use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Instant;

use rayon::prelude::*;
use serde::Serialize;

use super::calibrate::Calibration;
use super::config::TraitConfig;
use super::recommend::{Activity, ModelCounts, ProductModel, Recommendation};
use super::{CATEGORY_KEY, ComputedTraits, STAGES, TraitPlan, compute, hour_and_weekday, raw};
use crate::engine::{Engine, EngineError};
use crate::segment::DictSnapshot;
use crate::segment::plan::Plan;

type Result<T, E = EngineError> = std::result::Result<T, E>;

const CALIBRATION_KEY: &str = "calibration";
const PRODUCT_MODEL_KEY: &str = "product_model";

fn seconds(now: i64) -> u32 {
    now.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32
}

/// What `cible traits refresh` did.
#[derive(Debug, Clone, Serialize)]
pub struct RefreshReport {
    pub calibration: Calibration,
    pub calibration_seconds: f64,
    pub products: u64,
    pub product_model_seconds: f64,
    /// Lifecycle segments created by this refresh.
    pub created_segments: Vec<String>,
}

/// The name of the segment that holds the profiles at a lifecycle stage.
pub fn lifecycle_segment(stage: &str) -> String {
    format!("lifecycle-{}", stage.replace('_', "-"))
}

impl Engine {
    /// The configuration (`traits.toml` in the data directory, or the defaults).
    pub fn trait_config(&self) -> &TraitConfig {
        &self.trait_config
    }

    /// The configuration resolved against the dictionaries.
    pub fn trait_plan(&self, dictionaries: &DictSnapshot) -> TraitPlan {
        TraitPlan::new(
            &self.trait_config,
            &|name| dictionaries.names.get(name).copied(),
            dictionaries.keys.clone(),
        )
    }

    /// The current calibration; computed (and stored) at `now` if there is none yet.
    pub fn calibration(&self, now: i64) -> Result<Arc<Calibration>> {
        if let Some(calibration) = self.calibration.read().clone() {
            return Ok(calibration);
        }
        if let Some(bytes) = self.store.meta.get(CALIBRATION_KEY)? {
            let calibration: Calibration = serde_json::from_slice(&bytes)
                .map_err(|e| EngineError::Invalid(format!("stored calibration: {e}")))?;
            let calibration = Arc::new(calibration);
            *self.calibration.write() = Some(calibration.clone());
            return Ok(calibration);
        }
        self.calibrate(now)
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
        let hot = self.hot.read();
        let traits = profiles
            .par_iter()
            .zip(raws)
            .map(|(profile, raw)| {
                super::compute_from_raw(
                    &hot.timeline(*profile),
                    seconds(now),
                    &plan,
                    &calibration,
                    raw,
                )
            })
            .collect();
        Ok((calibration, traits))
    }

    fn calibrate_with_raws(&self, now: i64) -> Result<(Arc<Calibration>, Vec<super::RawTraits>)> {
        let at = seconds(now);
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let profiles = self.live_profiles();
        let hot = self.hot.read();
        type Part = (Vec<super::RawTraits>, [u64; 24], [u64; 7]);
        let (raws, hours, weekdays) = profiles
            .par_chunks(4096)
            .map(|chunk| {
                let mut part: Part = (Vec::with_capacity(chunk.len()), [0; 24], [0; 7]);
                for &profile in chunk {
                    let timeline = hot.timeline(profile);
                    part.0.push(raw(&timeline, at, at, &plan));
                    for event in timeline.events.iter().filter(|e| e.ts <= at) {
                        if plan.is_send_event(event.name) {
                            let (hour, weekday) = hour_and_weekday(event.ts);
                            part.1[usize::from(hour)] += 1;
                            part.2[usize::from(weekday - 1)] += 1;
                        }
                    }
                }
                part
            })
            .reduce(
                || (Vec::new(), [0; 24], [0; 7]),
                |mut a, b| {
                    a.0.extend(b.0);
                    for (x, y) in a.1.iter_mut().zip(b.1) {
                        *x += y;
                    }
                    for (x, y) in a.2.iter_mut().zip(b.2) {
                        *x += y;
                    }
                    a
                },
            );
        drop(hot);
        let calibration = Arc::new(Calibration::from_raw(at, &raws, &hours, &weekdays));
        self.store.meta.insert(
            CALIBRATION_KEY,
            serde_json::to_vec(&*calibration).expect("calibration serializes"),
        )?;
        *self.calibration.write() = Some(calibration.clone());
        Ok((calibration, raws))
    }

    /// The plan and calibration for evaluating `plans`, when one of them reads computed traits
    /// (building the category column they need first).
    pub(crate) fn computed_setup(
        &self,
        plans: &[Plan],
        dictionaries: &DictSnapshot,
        now: i64,
    ) -> Result<Option<(TraitPlan, Arc<Calibration>)>> {
        if !plans.iter().any(|p| crate::segment::uses_computed(&p.root)) {
            return Ok(None);
        }
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        Ok(Some((
            self.trait_plan(dictionaries),
            self.calibration(now)?,
        )))
    }

    /// Every computed trait of one profile at `now`.
    pub fn computed_traits(&self, profile: u32, now: i64) -> Result<ComputedTraits> {
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let calibration = self.calibration(now)?;
        let hot = self.hot.read();
        Ok(compute(
            &hot.timeline(profile),
            seconds(now),
            &plan,
            &calibration,
        ))
    }

    /// Computed traits of many profiles at once (exports), sharing one plan.
    pub fn computed_traits_of(&self, profiles: &[u32], now: i64) -> Result<Vec<ComputedTraits>> {
        self.ensure_column_indexes(&[CATEGORY_KEY as u8], true)?;
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let calibration = self.calibration(now)?;
        let hot = self.hot.read();
        Ok(profiles
            .par_iter()
            .map(|p| compute(&hot.timeline(*p), seconds(now), &plan, &calibration))
            .collect())
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
        self.reload_live_segments(now)?;
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
        let Some(calibration) = self.calibration.read().clone() else {
            return Ok(false);
        };
        if i64::from(calibration.at) * 1000 + max_age_ms > now {
            return Ok(false);
        }
        self.calibrate(now)?;
        self.build_product_model(now)?;
        self.reload_live_segments(now)?;
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
        if let Some(model) = self.product_model.read().clone() {
            return Ok(model);
        }
        if let Some(bytes) = self.store.meta.get(PRODUCT_MODEL_KEY)? {
            let model: ProductModel = serde_json::from_slice(&bytes)
                .map_err(|e| EngineError::Invalid(format!("stored product model: {e}")))?;
            let model = Arc::new(model);
            *self.product_model.write() = Some(model.clone());
            return Ok(model);
        }
        self.build_product_model(now)
    }

    /// Rebuilds the product model from every live profile's full messages.
    pub fn build_product_model(&self, now: i64) -> Result<Arc<ProductModel>> {
        let dictionaries = self.name_dictionary();
        let names = names_by_id(&dictionaries);
        let profiles = self.live_profiles();
        let progress = AtomicU64::new(0);
        let counts = profiles
            .par_chunks(1024)
            .map(|chunk| -> Result<ModelCounts> {
                let mut counts = ModelCounts::default();
                for &profile in chunk {
                    counts.add(&self.activity(profile, &dictionaries, &names)?);
                }
                progress.fetch_add(chunk.len() as u64, std::sync::atomic::Ordering::Relaxed);
                Ok(counts)
            })
            .try_reduce(ModelCounts::default, |a, b| Ok(a.merge(b)))?;
        let model = Arc::new(counts.finish(now));
        self.store.meta.insert(
            PRODUCT_MODEL_KEY,
            serde_json::to_vec(&*model).expect("product model serializes"),
        )?;
        *self.product_model.write() = Some(model.clone());
        Ok(model)
    }

    fn activity(
        &self,
        profile: u32,
        dictionaries: &DictSnapshot,
        names: &[String],
    ) -> Result<Activity> {
        let mut activity = Activity::default();
        for event in self.full_events(profile, dictionaries)? {
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
        let activity = self.activity(profile, &dictionaries, &names_by_id(&dictionaries))?;
        Ok(super::recommend::recommend(&activity, &model, now, n))
    }
}

/// Event names indexed by id.
fn names_by_id(dictionaries: &DictSnapshot) -> Vec<String> {
    let mut names = vec![String::new(); dictionaries.names.len() + 1];
    for (name, id) in &dictionaries.names {
        let id = usize::from(*id);
        if id >= names.len() {
            names.resize(id + 1, String::new());
        }
        names[id] = name.clone();
    }
    names
}
