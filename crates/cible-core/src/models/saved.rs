//! Trained models kept in the store: every version of every model in `meta`
//! (`model/<name>/v<version>`), one active version per name (`model_active/<name>`, the newest
//! unless another was activated). The active models are scored as computed traits:
//! `cluster.id`, `cluster.name` and `predicted.<name>`.

use std::sync::Arc;

use serde::{Deserialize, Serialize};

use super::gbdt::Boosted;
use super::propensity::Target;
use crate::computed::{ClusterTrait, ComputedTraits, ModelTraits};
use crate::error::EngineError;
use crate::features::FEATURES;
use crate::lock::{Cached, Level};

type Result<T, E = EngineError> = std::result::Result<T, E>;

/// The name of the k-means model `cible model cluster` saves.
pub const CLUSTER_MODEL: &str = "cluster";

/// One trained version of a model.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SavedModel {
    pub name: String,
    pub version: u32,
    /// When it was trained, ms.
    pub trained_at: i64,
    pub training_seconds: f64,
    /// The feature columns it reads, in order.
    pub features: Vec<String>,
    /// Per feature, after log1p: center and spread of the z-score it was trained with.
    pub scales: Vec<(f64, f64)>,
    pub kind: ModelKind,
    /// How it was trained, to train it again.
    pub training: super::Training,
    /// What the training reported (metrics, curve, importance).
    pub report: serde_json::Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ModelKind {
    /// Nearest centroid; `names` are the plain-words descriptions.
    KMeans {
        centroids: Vec<Vec<f64>>,
        names: Vec<String>,
    },
    Logistic {
        target: Target,
        horizon_days: u32,
        weights: Vec<f64>,
        intercept: f64,
    },
    Boosted {
        target: Target,
        horizon_days: u32,
        model: Boosted,
    },
}

impl SavedModel {
    /// The model's input from raw feature values (log1p, then the stored z-score).
    pub fn transform(&self, raw: &[f64]) -> Vec<f64> {
        raw.iter()
            .zip(&self.scales)
            .map(|(v, (center, spread))| {
                if *spread > 0.0 {
                    (v.max(0.0).ln_1p() - center) / spread
                } else {
                    0.0
                }
            })
            .collect()
    }

    /// The algorithm, for listings.
    pub fn algorithm(&self) -> &'static str {
        match self.kind {
            ModelKind::KMeans { .. } => "kmeans",
            ModelKind::Logistic { .. } => "logistic",
            ModelKind::Boosted { .. } => "boosted_trees",
        }
    }
}

/// A model version in a listing: what it is, when it was trained, how good.
#[derive(Debug, Clone, Serialize)]
pub struct ModelSummary {
    pub name: String,
    pub version: u32,
    pub algorithm: &'static str,
    pub trained_at: String,
    pub training_seconds: f64,
    pub features: usize,
    /// "AUC 0.759" or "k 4, silhouette 0.231".
    pub quality: String,
    /// The trait segments read it as.
    pub traits: Vec<String>,
    pub active: bool,
}

impl SavedModel {
    pub fn summary(&self, active: bool) -> ModelSummary {
        let number = |key: &str| self.report.get(key).and_then(serde_json::Value::as_f64);
        let quality = match (number("auc"), number("k"), number("silhouette")) {
            (Some(auc), _, _) => format!("AUC {auc:.3}"),
            (None, Some(k), Some(silhouette)) => format!("k {k}, silhouette {silhouette:.3}"),
            _ => String::new(),
        };
        let traits = match self.kind {
            ModelKind::KMeans { .. } => vec!["cluster.id".into(), "cluster.name".into()],
            _ => vec![format!("predicted.{}", self.name)],
        };
        ModelSummary {
            name: self.name.clone(),
            version: self.version,
            algorithm: self.algorithm(),
            trained_at: crate::time::format_ms(self.trained_at),
            training_seconds: self.training_seconds,
            features: self.features.len(),
            quality,
            traits,
            active,
        }
    }
}

/// A model version with how it was trained and what the training reported.
#[derive(Debug, Clone, Serialize)]
pub struct ModelDetail {
    pub model: ModelSummary,
    pub training: super::Training,
    pub report: serde_json::Value,
}

/// The nearest centroid (squared Euclidean distance; the lower id on a tie).
/// The same function k-means labels its rows with.
pub fn nearest(centroids: &[Vec<f64>], x: &[f64]) -> usize {
    super::kmeans::nearest(x, centroids).0
}

/// Where a model's input column comes from.
#[derive(Debug, Clone)]
enum Input {
    Feature(usize),
    Category(String),
}

/// The active version of each model, ready to score.
#[derive(Debug, Default)]
pub struct ModelSet {
    models: Vec<(Arc<SavedModel>, Vec<Input>)>,
}

impl ModelSet {
    fn new(models: impl IntoIterator<Item = Arc<SavedModel>>) -> Self {
        let models = models
            .into_iter()
            .map(|model| {
                let inputs = model
                    .features
                    .iter()
                    .map(|name| match FEATURES.iter().position(|f| f == name) {
                        Some(index) => Input::Feature(index),
                        None => Input::Category(
                            name.strip_prefix("category_").unwrap_or(name).to_string(),
                        ),
                    })
                    .collect();
                (model, inputs)
            })
            .collect();
        Self { models }
    }

    pub fn is_empty(&self) -> bool {
        self.models.is_empty()
    }

    pub fn models(&self) -> impl Iterator<Item = &Arc<SavedModel>> {
        self.models.iter().map(|(m, _)| m)
    }

    /// Scores every active model on a profile's feature row and traits.
    pub fn score(&self, row: &[f64; FEATURES.len()], traits: &ComputedTraits) -> ModelTraits {
        let mut out = ModelTraits::default();
        for (model, inputs) in &self.models {
            let raw: Vec<f64> = inputs
                .iter()
                .map(|input| match input {
                    Input::Feature(index) => row[*index],
                    Input::Category(name) => {
                        traits.affinity.categories.get(name).copied().unwrap_or(0.0)
                    }
                })
                .collect();
            let x = model.transform(&raw);
            match &model.kind {
                ModelKind::KMeans { centroids, names } => {
                    let id = nearest(centroids, &x);
                    out.cluster = Some(ClusterTrait {
                        id: id as u32,
                        name: names[id].clone(),
                    });
                }
                ModelKind::Logistic {
                    weights, intercept, ..
                } => {
                    let p = super::logistic::predict(weights, *intercept, &x);
                    out.predicted.insert(model.name.clone(), p);
                }
                ModelKind::Boosted { model: boosted, .. } => {
                    out.predicted
                        .insert(model.name.clone(), boosted.predict(&x));
                }
            }
        }
        out
    }
}

fn version_key(name: &str, version: u32) -> String {
    format!("model/{name}/v{version:08}")
}

/// Active versions live apart from the (large) versions, so that finding them reads little.
const ACTIVE_PREFIX: &str = "model_active/";

fn active_key(name: &str) -> String {
    format!("{ACTIVE_PREFIX}{name}")
}

/// Model names: lower-case letters, digits and `_`.
pub fn check_name(name: &str) -> Result<()> {
    if name.is_empty()
        || name.len() > 64
        || !name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_')
    {
        return Err(EngineError::Invalid(format!(
            "model name {name:?}: use 1 to 64 lower-case letters, digits and _"
        )));
    }
    Ok(())
}

/// The stored models, a component of its own: every version of each in `meta`, which one is
/// active, and the active set, loaded on first use and dropped when it changes. It owns that
/// cache and reads only its own keys; the engine's facade re-evaluates segments after a change.
pub struct ModelRegistry {
    meta: fjall::Keyspace,
    /// The active set once loaded (a load racing an activation used to keep the old set for
    /// good: the concurrency test below found it).
    active: Cached<ModelSet>,
    /// Held while a version number is chosen and written: two saves of a name get two versions.
    saving: crate::lock::OrderedMutex<()>,
}

impl ModelRegistry {
    pub(crate) fn new(meta: fjall::Keyspace) -> Self {
        Self {
            meta,
            active: Cached::new(Level::Cache),
            saving: crate::lock::OrderedMutex::new(Level::ModelWrites, ()),
        }
    }

    /// Stores `model` as the next version of its name and makes it active; returns the version.
    pub fn save(&self, mut model: SavedModel) -> Result<u32> {
        check_name(&model.name)?;
        let _saving = self.saving.lock();
        model.version = self.last_version(&model.name)?.map_or(1, |v| v + 1);
        let bytes = serde_json::to_vec(&model).expect("models serialize");
        self.meta
            .insert(version_key(&model.name, model.version), bytes)?;
        self.activate(&model.name, model.version)?;
        Ok(model.version)
    }

    /// Makes a stored version the one scored.
    pub fn activate(&self, name: &str, version: u32) -> Result<()> {
        if self.meta.get(version_key(name, version))?.is_none() {
            return Err(EngineError::NotFound(format!(
                "model {name} version {version}"
            )));
        }
        self.meta.insert(active_key(name), version.to_le_bytes())?;
        self.active.set(None);
        Ok(())
    }

    /// Summaries of the active models, or of every version of one.
    pub fn summaries(&self, name: Option<&str>) -> Result<Vec<ModelSummary>> {
        let set = self.active_set()?;
        let active = |m: &SavedModel| {
            set.models()
                .any(|a| a.name == m.name && a.version == m.version)
        };
        Ok(match name {
            Some(name) => {
                let versions = self.versions(name)?;
                if versions.is_empty() {
                    return Err(EngineError::NotFound(format!("model {name}")));
                }
                versions.iter().map(|m| m.summary(active(m))).collect()
            }
            None => set.models().map(|m| m.summary(true)).collect(),
        })
    }

    /// One stored version of a model (the active one when `version` is `None`).
    pub fn version(&self, name: &str, version: Option<u32>) -> Result<Arc<SavedModel>> {
        match version {
            None => self.active_model(name),
            Some(version) => {
                let Some(bytes) = self.meta.get(version_key(name, version))? else {
                    return Err(EngineError::NotFound(format!(
                        "model {name} version {version}"
                    )));
                };
                Ok(Arc::new(serde_json::from_slice(&bytes).map_err(|e| {
                    crate::error::corrupt("meta", format!("stored model {name}: {e}"))
                })?))
            }
        }
    }

    /// A stored version (the active one when `version` is `None`) with its settings and report.
    pub fn detail(&self, name: &str, version: Option<u32>) -> Result<ModelDetail> {
        let model = self.version(name, version)?;
        let active = self.active_model(name)?.version == model.version;
        Ok(ModelDetail {
            model: model.summary(active),
            training: model.training,
            report: model.report.clone(),
        })
    }

    /// The newest stored version number of a model (read from the key, not the model).
    fn last_version(&self, name: &str) -> Result<Option<u32>> {
        let Some(entry) = self.meta.prefix(format!("model/{name}/v")).next_back() else {
            return Ok(None);
        };
        let (key, _) = entry.into_inner()?;
        let version = String::from_utf8_lossy(&key)
            .rsplit_once("/v")
            .and_then(|(_, v)| v.parse().ok())
            .ok_or_else(|| EngineError::Invalid(format!("stored model key {key:?}")))?;
        Ok(Some(version))
    }

    /// Every stored version of a model, oldest first.
    pub fn versions(&self, name: &str) -> Result<Vec<SavedModel>> {
        let mut versions = Vec::new();
        for entry in self.meta.prefix(format!("model/{name}/v")) {
            let (key, value) = entry.into_inner()?;
            let model: SavedModel = serde_json::from_slice(&value).map_err(|e| {
                EngineError::Invalid(format!("stored {}: {e}", String::from_utf8_lossy(&key)))
            })?;
            versions.push(model);
        }
        Ok(versions)
    }

    /// The active version of a model.
    pub fn active_model(&self, name: &str) -> Result<Arc<SavedModel>> {
        self.active_set()?
            .models()
            .find(|m| m.name == name)
            .cloned()
            .ok_or_else(|| EngineError::NotFound(format!("model {name}")))
    }

    /// The active version of every model (loaded from `meta` on first use).
    pub fn active_set(&self) -> Result<Arc<ModelSet>> {
        let set = self.active.get_or_load(|| -> Result<_> {
            let mut active = Vec::new();
            for entry in self.meta.prefix(ACTIVE_PREFIX) {
                let (key, version) = entry.into_inner()?;
                let name = String::from_utf8_lossy(&key[ACTIVE_PREFIX.len()..]).into_owned();
                let version = u32::from_le_bytes(version.as_ref().try_into().map_err(|_| {
                    EngineError::Invalid(format!("stored active version of model {name}"))
                })?);
                let Some(bytes) = self.meta.get(version_key(&name, version))? else {
                    continue;
                };
                let model: SavedModel = serde_json::from_slice(&bytes).map_err(|e| {
                    crate::error::corrupt("meta", format!("stored model {name}: {e}"))
                })?;
                active.push(Arc::new(model));
            }
            Ok(Some(ModelSet::new(active)))
        })?;
        Ok(set.expect("the loader always finds a set"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::Engine;

    /// The active version of a model of `engine`.
    fn active_version(engine: &Engine, name: &str) -> u32 {
        engine.models().active_model(name).unwrap().version
    }

    #[test]
    fn nearest_centroid_breaks_ties_by_id() {
        let centroids = vec![vec![0.0, 0.0], vec![2.0, 0.0], vec![0.0, 3.0]];
        assert_eq!(nearest(&centroids, &[1.9, 0.1]), 1);
        assert_eq!(nearest(&centroids, &[1.0, 0.0]), 0);
        assert_eq!(nearest(&centroids, &[0.0, 2.0]), 2);
    }

    fn kmeans(name: &str, tag: f64) -> SavedModel {
        SavedModel {
            name: name.into(),
            version: 0,
            trained_at: 0,
            training_seconds: 0.0,
            features: vec!["a".into()],
            scales: vec![(0.0, 1.0)],
            kind: ModelKind::KMeans {
                centroids: vec![vec![tag]],
                names: vec![format!("c{tag}")],
            },
            training: crate::models::Training::KMeans(crate::models::ClusterParams {
                min_k: 1,
                max_k: 1,
                restarts: 1,
                sample: 10,
                seed: 1,
            }),
            report: serde_json::Value::Null,
        }
    }

    #[test]
    fn the_registry_under_concurrent_saves_activations_and_reads() {
        let dir = tempfile::tempdir().unwrap();
        let store = crate::store::Store::open(dir.path()).unwrap();
        let registry = Arc::new(ModelRegistry::new(store.meta.clone()));
        let (done, finished) = std::sync::mpsc::channel();
        for writer in 0..2 {
            let (registry, done) = (Arc::clone(&registry), done.clone());
            std::thread::spawn(move || {
                let name = format!("m{writer}");
                for round in 0..50 {
                    let version = registry.save(kmeans(&name, f64::from(round))).unwrap();
                    assert_eq!(version, round + 1);
                    registry.activate(&name, 1 + round / 2).unwrap();
                    // Saves of one shared name from both writers: each gets its own version.
                    registry.save(kmeans("shared", f64::from(round))).unwrap();
                }
                done.send(()).unwrap();
            });
        }
        for _ in 0..2 {
            let (registry, done) = (Arc::clone(&registry), done.clone());
            std::thread::spawn(move || {
                for _ in 0..500 {
                    for model in registry.active_set().unwrap().models() {
                        // The active set holds a stored version, whole.
                        let stored = registry.version(&model.name, Some(model.version)).unwrap();
                        assert_eq!(stored.trained_at, model.trained_at);
                        assert_eq!(stored.version, model.version);
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
        for name in ["m0", "m1"] {
            assert_eq!(registry.active_model(name).unwrap().version, 25);
            assert_eq!(registry.versions(name).unwrap().len(), 50);
        }
        assert_eq!(registry.versions("shared").unwrap().len(), 100);
        let set = registry.active_set().unwrap();
        assert_eq!(set.models().count(), 3);
    }

    const NOW: i64 = 1_777_593_600_000; // 2026-05-01T00:00:00Z

    #[test]
    fn stored_models_score_profiles_as_they_were_trained() {
        use crate::models::propensity::{Algorithm, PropensityParams, Target};
        let (dir, engine) = crate::test_support::generated_store(500, 90, 5, NOW);
        assert!(engine.model_set().unwrap().is_empty());

        // Clusters: every profile's cluster trait is its k-means label (sizes agree).
        let params = crate::models::ClusterParams {
            min_k: 3,
            max_k: 3,
            restarts: 2,
            sample: 500,
            seed: 2,
        };
        let (clustering, model) = engine.cluster(NOW, &params).unwrap();
        assert_eq!(engine.save_model(model, NOW).unwrap(), 1);
        let profiles = engine.live_profiles();
        let traits = engine.computed_traits_of(&profiles, NOW).unwrap();
        for cluster in &clustering.clusters {
            let members = traits
                .iter()
                .filter(|t| t.models.cluster.as_ref().map(|c| c.id) == Some(cluster.id as u32))
                .count();
            assert_eq!(members, cluster.size, "cluster {}", cluster.id);
        }

        // Propensity: scored at the cutoff, the trait is the model applied to the training rows.
        let params = PropensityParams {
            target: Target::Purchase,
            horizon_days: 30,
            algorithm: Algorithm::BoostedTrees,
        };
        let (report, model) = engine.train_propensity(&params, NOW).unwrap();
        let ModelKind::Boosted { model: boosted, .. } = &model.kind else {
            panic!("boosted trees")
        };
        let boosted = boosted.clone();
        assert_eq!(engine.save_model(model, NOW).unwrap(), 1);
        let (rows, _) = engine.model_rows(report.cutoff).unwrap();
        let at_cutoff = engine
            .computed_traits_of(&rows.profiles, report.cutoff)
            .unwrap();
        for (row, traits) in rows.rows.iter().zip(&at_cutoff) {
            let p = traits.models.predicted["purchase_30d"];
            assert!((p - boosted.predict(row)).abs() < 1e-9, "{p}");
        }

        // Versions: a retrain adds version 2; activating 1 again scores version 1.
        assert_eq!(engine.retrain("purchase_30d", NOW + 86_400_000).unwrap(), 2);
        assert_eq!(active_version(&engine, "purchase_30d"), 2);
        assert_eq!(
            engine
                .models()
                .summaries(Some("purchase_30d"))
                .unwrap()
                .len(),
            2
        );
        engine.activate_model("purchase_30d", 1, NOW).unwrap();
        assert_eq!(active_version(&engine, "purchase_30d"), 1);
        assert!(engine.activate_model("purchase_30d", 7, NOW).is_err());

        // The schedule retrains what is older than the age given, and only that.
        assert!(engine.retrain_if_older(NOW, 86_400_000).unwrap().is_empty());
        let mut due = engine
            .retrain_if_older(NOW + 8 * 86_400_000, 7 * 86_400_000)
            .unwrap();
        due.sort();
        assert_eq!(due, ["cluster", "purchase_30d"]);
        assert_eq!(active_version(&engine, "cluster"), 2);

        // Reopened, the active versions are read back from the store.
        drop(engine);
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        let versions: Vec<(String, u32)> = engine
            .model_set()
            .unwrap()
            .models()
            .map(|m| (m.name.clone(), m.version))
            .collect();
        assert_eq!(
            versions,
            [("cluster".to_string(), 2), ("purchase_30d".to_string(), 3)]
        );
    }

    #[test]
    fn live_segments_follow_the_active_version() {
        use crate::models::propensity::{Algorithm, PropensityParams, Target};
        let (_dir, engine) = crate::test_support::generated_store(500, 90, 7, NOW);
        for algorithm in [Algorithm::Logistic, Algorithm::BoostedTrees] {
            let params = PropensityParams {
                target: Target::Purchase,
                horizon_days: 30,
                algorithm,
            };
            let (_, model) = engine.train_propensity(&params, NOW).unwrap();
            engine.save_model(model, NOW).unwrap();
        }
        let rule = "predicted.purchase_30d >= 0.5";
        let expr = cible_lang::parse(rule).unwrap();
        engine
            .create_segment("likely", expr.clone(), rule, NOW)
            .unwrap();
        engine.start_live_segments(NOW).unwrap();
        let batch = |engine: &Engine| {
            engine
                .evaluate_rule(&expr, NOW, &Default::default())
                .unwrap()
                .0
        };
        let boosted = batch(&engine);
        assert_eq!(engine.live_members("likely").unwrap(), boosted);
        engine.activate_model("purchase_30d", 1, NOW).unwrap();
        let logistic = batch(&engine);
        assert_ne!(
            logistic, boosted,
            "the two versions should disagree somewhere"
        );
        assert_eq!(engine.live_members("likely").unwrap(), logistic);
    }

    #[test]
    fn names_are_checked() {
        assert!(check_name("purchase_30d").is_ok());
        for bad in ["", "Purchase", "a/b", "x y"] {
            assert!(check_name(bad).is_err(), "{bad:?}");
        }
    }
}
