//! What the computed traits keep ([`TraitStore`]: configuration, calibration, product model),
//! the refresh's report and the lifecycle segments' names. The engine computes them over the
//! population (`engine/traits.rs`).

use std::sync::Arc;

use serde::Serialize;

use super::calibrate::Calibration;
use super::config::TraitConfig;
use super::recommend::ProductModel;
use crate::error::EngineError;
use crate::records::DictSnapshot;

type Result<T, E = EngineError> = std::result::Result<T, E>;

pub(crate) const CALIBRATION_KEY: &str = "calibration";
pub(crate) const PRODUCT_MODEL_KEY: &str = "product_model";

pub(crate) fn seconds(now: i64) -> u32 {
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

/// Event names indexed by id.
pub(crate) fn names_by_id(dictionaries: &DictSnapshot) -> Vec<String> {
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
