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
use super::{
    CATEGORY_KEY, ComputedTraits, STAGES, Setup, TraitPlan, compute, raw_with_send_counts,
};
use crate::engine::Engine;
use crate::error::EngineError;
use crate::segment::DictSnapshot;

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

/// See [`Engine::traits_reader`].
pub struct TraitsReader<'e> {
    engine: &'e Engine,
    setup: Setup,
    now: u32,
}

impl TraitsReader<'_> {
    /// The traits of these profiles (the models' outputs included), in parallel, in their
    /// order.
    pub fn of(&self, profiles: &[u32]) -> Vec<ComputedTraits> {
        let hot = self.engine.hot.read();
        profiles
            .par_iter()
            .map(|p| self.setup.traits(&hot.timeline(*p), self.now))
            .collect()
    }

    /// [`Self::of`] without the models' outputs.
    pub fn base_of(&self, profiles: &[u32]) -> Vec<ComputedTraits> {
        let hot = self.engine.hot.read();
        let setup = &self.setup;
        profiles
            .par_iter()
            .map(|p| compute(&hot.timeline(*p), self.now, &setup.plan, &setup.calibration))
            .collect()
    }
}

/// What the computed traits keep, a component of its own: the configuration, and the
/// population's calibration and product model, each stored in `meta` and cached (a load racing
/// a recalibration never puts the old value back: [`crate::lock::Cached`]). It computes
/// nothing: the engine's facade computes over the population and hands the results here.
pub struct TraitStore {
    meta: fjall::Keyspace,
    config: TraitConfig,
    calibration: crate::lock::Cached<Calibration>,
    product_model: crate::lock::Cached<ProductModel>,
}

impl TraitStore {
    pub(crate) fn new(meta: fjall::Keyspace, config: TraitConfig) -> Self {
        Self {
            meta,
            config,
            calibration: crate::lock::Cached::new(crate::lock::Level::Cache),
            product_model: crate::lock::Cached::new(crate::lock::Level::Cache),
        }
    }

    /// The configuration (`traits.toml` in the data directory, or the defaults).
    pub fn config(&self) -> &TraitConfig {
        &self.config
    }

    /// The stored calibration, if there is one.
    pub fn calibration(&self) -> Result<Option<Arc<Calibration>>> {
        self.loaded(&self.calibration, CALIBRATION_KEY)
    }

    /// The calibration if it is in memory already (no store read).
    pub fn cached_calibration(&self) -> Option<Arc<Calibration>> {
        self.calibration.get()
    }

    /// Whether a calibration is stored.
    pub fn has_calibration(&self) -> Result<bool> {
        Ok(self.calibration.get().is_some() || self.meta.contains_key(CALIBRATION_KEY)?)
    }

    /// The stored product model, if there is one.
    pub fn product_model(&self) -> Result<Option<Arc<ProductModel>>> {
        self.loaded(&self.product_model, PRODUCT_MODEL_KEY)
    }

    /// Stores a new calibration and serves it from now on.
    pub(crate) fn keep_calibration(&self, calibration: Calibration) -> Result<Arc<Calibration>> {
        Self::keep(&self.meta, &self.calibration, CALIBRATION_KEY, calibration)
    }

    /// Stores a new product model and serves it from now on.
    pub(crate) fn keep_product_model(&self, model: ProductModel) -> Result<Arc<ProductModel>> {
        Self::keep(&self.meta, &self.product_model, PRODUCT_MODEL_KEY, model)
    }

    /// A derived value: the one in memory, else the stored one (then kept in memory).
    fn loaded<T: serde::de::DeserializeOwned>(
        &self,
        slot: &crate::lock::Cached<T>,
        key: &str,
    ) -> Result<Option<Arc<T>>> {
        slot.get_or_load(|| {
            let Some(bytes) = self.meta.get(key)? else {
                return Ok(None);
            };
            let value = serde_json::from_slice(&bytes)
                .map_err(|e| crate::error::corrupt("meta", format!("stored {key}: {e}")))?;
            Ok(Some(value))
        })
    }

    /// Stores a derived value in `meta`, then keeps it in memory.
    fn keep<T: Serialize>(
        meta: &fjall::Keyspace,
        slot: &crate::lock::Cached<T>,
        key: &str,
        value: T,
    ) -> Result<Arc<T>> {
        slot.store_and_set(Arc::new(value), |value| {
            meta.insert(
                key,
                serde_json::to_vec(value).expect("derived values serialize"),
            )?;
            Ok(())
        })
    }
}

/// The name of the segment that holds the profiles at a lifecycle stage.
pub fn lifecycle_segment(stage: &str) -> String {
    format!("lifecycle-{}", stage.replace('_', "-"))
}

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
                super::compute_from_raw(
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

    fn calibrate_with_raws(&self, now: i64) -> Result<(Arc<Calibration>, Vec<super::RawTraits>)> {
        let at = seconds(now);
        let dictionaries = self.dictionaries();
        let plan = self.trait_plan(&dictionaries);
        let profiles = self.live_profiles();
        type Part = (Vec<super::RawTraits>, [u64; 24], [u64; 7]);
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

    /// The plan and calibration for evaluating `plans`, when one of them reads computed traits
    /// (building the category column they need first).
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
            engine: self,
            setup: self.setup(&self.dictionaries(), now)?,
            now: seconds(now),
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
        super::recommend::ACTIVITY_EVENTS
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_trait_store_under_concurrent_recalibrations_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let traits = Arc::new(TraitStore::new(store.meta.clone(), TraitConfig::default()));
        let (done, finished) = std::sync::mpsc::channel();
        {
            let (traits, done) = (Arc::clone(&traits), done.clone());
            std::thread::spawn(move || {
                for at in 1..=200 {
                    let calibration = Calibration::from_raw(at, &[], &[0; 24], &[0; 7]);
                    assert_eq!(traits.keep_calibration(calibration).unwrap().at, at);
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..3 {
            let (traits, done) = (Arc::clone(&traits), done.clone());
            std::thread::spawn(move || {
                let mut last = 0;
                for _ in 0..2_000 {
                    // What is served never goes back in time.
                    if let Some(calibration) = traits.calibration().unwrap() {
                        assert!(calibration.at >= last, "{} after {last}", calibration.at);
                        last = calibration.at;
                    }
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..4 {
            finished
                .recv_timeout(std::time::Duration::from_secs(60))
                .expect("every thread finished in time (a hang or a panic otherwise)");
        }
        assert_eq!(traits.calibration().unwrap().unwrap().at, 200);
        let reopened = TraitStore::new(store.meta.clone(), TraitConfig::default());
        assert_eq!(reopened.calibration().unwrap().unwrap().at, 200);
    }
}
