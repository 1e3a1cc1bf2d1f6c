//! The engine's face for models: the training data it reads from the population (feature
//! rows, the propensity time split), the training functions of [`crate::models`] called on them,
//! and the stored models, whose change re-evaluates the segments that read them.

use std::collections::BTreeMap;
use std::sync::Arc;

use rayon::prelude::*;

use super::Engine;
use crate::error::{EngineError, Result};
use crate::features::{FEATURES, FeaturePlan, FeatureTable, Scaling, row};
use crate::models::propensity::{PropensityParams, PropensityReport, Split, Target};
use crate::models::saved::{ModelRegistry, ModelSet, SavedModel};
use crate::models::{ClusterParams, Clustering, DensityClustering, Training};

impl Engine {
    /// What [`row`] needs, resolved against the current dictionaries.
    pub fn feature_plan(&self) -> FeaturePlan {
        let dictionaries = self.name_dictionary();
        FeaturePlan::new(
            &|name| dictionaries.names.get(name).copied(),
            self.trait_config().rfm.window_days,
        )
    }

    /// The feature table at `now` (ms) of every live profile that `profiling` may process
    /// (those who objected to it are neither exported as features nor trained on).
    pub fn features(&self, now: i64) -> Result<FeatureTable, EngineError> {
        let profiling = self.consent_check("profiling")?;
        let mut profiles = self.live_profiles();
        profiles.retain(|p| profiling.permits(*p));
        let reader = self.traits_reader(now)?;
        let plan = self.feature_plan();
        let now_s = now.div_euclid(1000).clamp(0, i64::from(u32::MAX)) as u32;
        // By chunks, each under its own read guard: ingestion waits for one chunk at most, not
        // for the whole population (a scheduled retraining runs beside live traffic).
        const CHUNK: usize = crate::hot::READ_CHUNK;
        let mut parts: Vec<([f64; FEATURES.len()], BTreeMap<String, f64>)> =
            Vec::with_capacity(profiles.len());
        for chunk in profiles.chunks(CHUNK) {
            let traits = reader.base_of(chunk);
            let hot = self.hot_chunk(chunk);
            parts.par_extend(chunk.par_iter().zip(traits).map(|(profile, traits)| {
                let (base, _) = row(&hot.timeline(*profile), now_s, &traits, &plan);
                (base, traits.affinity.categories)
            }));
        }
        let mut categories: Vec<String> = parts
            .iter()
            .flat_map(|(_, weights)| weights.keys().cloned())
            .collect();
        categories.sort();
        categories.dedup();
        let rows: Vec<Vec<f64>> = parts
            .into_par_iter()
            .map(|(base, weights)| {
                let mut row = base.to_vec();
                row.extend(
                    categories
                        .iter()
                        .map(|category| weights.get(category).copied().unwrap_or(0.0)),
                );
                row
            })
            .collect();
        let mut names: Vec<String> = FEATURES.iter().map(|f| f.to_string()).collect();
        names.extend(categories.iter().map(|c| format!("category_{c}")));
        Ok(FeatureTable {
            names,
            profiles,
            rows,
        })
    }
    /// Every live profile's features as models use them: log1p (activity counts and spend are
    /// heavy-tailed: compressed, or a handful of heavy users make the only group that stands
    /// out), then z-scores. Returns the center and spread of each column's z-score.
    pub fn model_rows(&self, now: i64) -> Result<(FeatureTable, Vec<(f64, f64)>), EngineError> {
        let mut table = self.features(now)?;
        if table.rows.len() < 3 {
            return Err(EngineError::Invalid(format!(
                "models need at least 3 profiles, found {}",
                table.rows.len()
            )));
        }
        for value in table.rows.iter_mut().flatten() {
            *value = value.max(0.0).ln_1p();
        }
        let scales = table
            .scale(Scaling::ZScore)
            .into_iter()
            .map(|s| (s.center, s.spread))
            .collect();
        Ok((table, scales))
    }

    /// The time split for `target` over `horizon_days` before `now`: features of every profile
    /// seen before the cutoff as of the cutoff, labels from what it did after.
    pub fn propensity_split(
        &self,
        target: Target,
        horizon_days: u32,
        now: i64,
    ) -> Result<Split, EngineError> {
        let cutoff = now - i64::from(horizon_days) * crate::time::DAY_MS;
        let (table, scales) = self.model_rows(cutoff)?;
        let (cutoff_s, now_s) = (cutoff.div_euclid(1000), now.div_euclid(1000));
        let dictionaries = self.name_dictionary();
        let id = |name: &str| dictionaries.names.get(name).copied();
        let (order, open) = (id("Order Completed"), id("Email Opened"));
        let weights = &self.trait_config().engagement.weights;
        let engaging: Vec<u16> = weights
            .iter()
            .filter(|(_, w)| **w > 0.0)
            .filter_map(|(name, _)| id(name))
            .collect();
        let mut train = (Vec::new(), Vec::new());
        let mut test = (Vec::new(), Vec::new());
        // By chunks, each under its own read guard (see `Engine::features`).
        let mut rows = table.rows.into_iter();
        for chunk in table.profiles.chunks(crate::hot::READ_CHUNK) {
            let hot = self.hot_chunk(chunk);
            for (profile, row) in chunk.iter().zip(rows.by_ref()) {
                let events = hot.events(*profile);
                // Only people known at the cutoff.
                if events.first().is_none_or(|e| i64::from(e.ts) > cutoff_s) {
                    continue;
                }
                let after = events
                    .iter()
                    .filter(|e| i64::from(e.ts) > cutoff_s && i64::from(e.ts) <= now_s);
                let label = match target {
                    Target::Purchase => after.clone().any(|e| Some(e.name) == order),
                    Target::Open => after.clone().any(|e| Some(e.name) == open),
                    Target::Churn => !after.clone().any(|e| engaging.contains(&e.name)),
                };
                let side = if crate::models::propensity::held_out(*profile) {
                    &mut test
                } else {
                    &mut train
                };
                side.0.push(row);
                side.1.push(label);
            }
        }
        if train.0.is_empty() || test.0.is_empty() {
            return Err(EngineError::Invalid(format!(
                "no profile was seen before the cutoff {}: shorten --days",
                crate::time::format_ms(cutoff)
            )));
        }
        Ok(Split {
            names: table.names,
            scales,
            cutoff,
            train,
            test,
        })
    }

    /// DBSCAN on every live profile's model rows at `now` (see [`crate::models::density_clusters`]).
    pub fn density_clusters(
        &self,
        now: i64,
        min_points: usize,
        eps: Option<f64>,
        sample: usize,
        seed: u64,
    ) -> Result<DensityClustering> {
        crate::models::density_clusters(|| self.model_rows(now), min_points, eps, sample, seed)
    }

    /// k-means over every live profile's model rows at `now` (see [`crate::models::cluster`]).
    pub fn cluster(&self, now: i64, params: &ClusterParams) -> Result<(Clustering, SavedModel)> {
        crate::models::cluster(|| self.model_rows(now), params, now)
    }

    /// A propensity model trained on the time split before `now` (see
    /// [`crate::models::propensity::train`]).
    pub fn train_propensity(
        &self,
        params: &PropensityParams,
        now: i64,
    ) -> Result<(PropensityReport, SavedModel)> {
        crate::models::propensity::train(
            |target, days| self.propensity_split(target, days, now),
            params,
            now,
        )
    }

    /// Trains a new version of a stored model with the recipe it was trained with, at `now`,
    /// and makes it active; returns the version. A recipe outside [`crate::models::bounds`] is
    /// refused.
    pub fn retrain(&self, name: &str, now: i64) -> Result<u32, EngineError> {
        let training = self.models.active_model(name)?.training;
        training.validate().map_err(|e| {
            EngineError::Invalid(format!(
                "{name} was trained with settings out of bounds ({e}); train it again with new ones"
            ))
        })?;
        let model = match training {
            Training::KMeans(params) => self.cluster(now, &params)?.1,
            Training::Propensity(params) => self.train_propensity(&params, now)?.1,
        };
        self.save_model(model, now)
    }

    /// Retrains every active model trained more than `max_age_ms` before `now`; returns the
    /// names retrained. A model whose recipe is outside [`crate::models::bounds`]
    /// is left as it is.
    pub fn retrain_if_older(&self, now: i64, max_age_ms: i64) -> Result<Vec<String>, EngineError> {
        let due: Vec<String> = self
            .model_set()?
            .models()
            .filter(|m| m.trained_at + max_age_ms <= now && m.training.validate().is_ok())
            .map(|m| m.name.clone())
            .collect();
        for name in &due {
            self.retrain(name, now)?;
        }
        Ok(due)
    }

    /// Stores `model` as the next version of its name and makes it active; returns the version.
    /// The live segments are re-evaluated (a new model may move profiles in or out).
    pub fn save_model(&self, model: SavedModel, now: i64) -> Result<u32> {
        let name = model.name.clone();
        let version = self.models.save(model)?;
        self.audit(self.audit_entry(
            crate::audit::Action::ModelTrain,
            &[],
            serde_json::json!({"model": name, "version": version}),
        ))?;
        self.reevaluate_computed(now, crate::segment::feed::Cause::ModelActivation)?;
        Ok(version)
    }

    /// Makes a stored version the one scored, and re-evaluates the live segments.
    pub fn activate_model(&self, name: &str, version: u32, now: i64) -> Result<()> {
        self.models.activate(name, version)?;
        self.audit(self.audit_entry(
            crate::audit::Action::ModelActivate,
            &[],
            serde_json::json!({"model": name, "version": version}),
        ))?;
        self.reevaluate_computed(now, crate::segment::feed::Cause::ModelActivation)
    }

    /// The stored models.
    pub fn models(&self) -> &ModelRegistry {
        &self.models
    }

    /// The active version of every model.
    pub fn model_set(&self) -> Result<Arc<ModelSet>> {
        self.models.active_set()
    }
}
