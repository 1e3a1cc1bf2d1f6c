//! Models over per-profile feature vectors (see [`crate::features`]): k-means and DBSCAN
//! clustering, purchase/open/churn propensity (logistic regression, boosted trees). Trained
//! models are stored and versioned ([`saved`]) and scored as computed traits.

pub mod dbscan;
pub mod gbdt;
pub mod kmeans;
pub mod logistic;
pub mod propensity;
pub mod saved;

use std::time::Instant;

use serde::{Deserialize, Serialize};

use crate::error::EngineError;
use crate::features::FeatureTable;
use saved::{CLUSTER_MODEL, ModelKind, SavedModel};

/// The logistic function: log-odds to a probability.
pub(crate) fn sigmoid(z: f64) -> f64 {
    1.0 / (1.0 + (-z).exp())
}

/// Squared Euclidean distance, with four running sums (independent additions vectorize).
pub(crate) fn distance2(a: &[f64], b: &[f64]) -> f64 {
    let mut sums = [0.0; 4];
    let (a4, b4) = (a.chunks_exact(4), b.chunks_exact(4));
    let rest: f64 = a4
        .remainder()
        .iter()
        .zip(b4.remainder())
        .map(|(x, y)| (x - y) * (x - y))
        .sum();
    for (x, y) in a4.zip(b4) {
        for k in 0..4 {
            let d = x[k] - y[k];
            sums[k] += d * d;
        }
    }
    sums.iter().sum::<f64>() + rest
}

/// One cluster of a segmentation: its size, its centroid in standardized units, and a plain-words
/// description of what sets it apart.
#[derive(Debug, Clone, Serialize)]
pub struct Cluster {
    pub id: usize,
    pub size: usize,
    pub description: String,
    /// Feature name and centroid value (z-score), strongest first.
    pub traits: Vec<(String, f64)>,
}

/// What `cible model cluster` reports.
#[derive(Debug, Clone, Serialize)]
pub struct Clustering {
    pub profiles: usize,
    pub features: Vec<String>,
    pub k: usize,
    pub silhouette: f64,
    /// Sum of squared distances to the nearest centroid, all profiles.
    pub inertia: f64,
    /// Inertia and silhouette for each k tried (the elbow curve).
    pub curve: Vec<kmeans::Candidate>,
    pub clusters: Vec<Cluster>,
}

/// Words for a feature far above (first) or below (second) the population's mean.
fn words(feature: &str) -> (String, String) {
    let pair = |high: &str, low: &str| (high.to_string(), low.to_string());
    match feature {
        "recency_days" => pair("long since the last order", "ordered recently"),
        "frequency" => pair("frequent buyers", "rare buyers"),
        "monetary" => pair("high spend", "low spend"),
        "engagement" => pair("very engaged", "disengaged"),
        "avg_time_on_page_s" => pair("long page visits", "short page visits"),
        "days_since_first_seen" => pair("long-standing", "new"),
        "days_since_last_seen" => pair("inactive lately", "active lately"),
        f if f.starts_with("opens_") => pair("open e-mails", "ignore e-mails"),
        f if f.starts_with("clicks_") => pair("click e-mails", "never click"),
        f if f.starts_with("page_views_") => pair("browse a lot", "rarely browse"),
        f if f.starts_with("cart_adds_") => pair("fill carts", "rarely add to cart"),
        f => match f.strip_prefix("category_") {
            Some(category) => pair(&format!("into {category}"), &format!("not into {category}")),
            None => pair(&format!("high {f}"), &format!("low {f}")),
        },
    }
}

/// "very engaged, frequent buyers, high spend": the strongest departures from the mean (at least
/// half a standard deviation), one phrase per kind of feature.
pub fn describe(features: &[String], centroid: &[f64]) -> (String, Vec<(String, f64)>) {
    let mut ranked: Vec<(String, f64)> = features
        .iter()
        .cloned()
        .zip(centroid.iter().copied())
        .collect();
    ranked.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let mut phrases: Vec<String> = Vec::new();
    for (feature, z) in ranked.iter().filter(|(_, z)| z.abs() >= 0.5) {
        let (high, low) = words(feature);
        let phrase = if *z > 0.0 { high } else { low };
        if !phrases.contains(&phrase) {
            phrases.push(phrase);
        }
        if phrases.len() == 3 {
            break;
        }
    }
    let description = if phrases.is_empty() {
        "close to the average".to_string()
    } else {
        phrases.join(", ")
    };
    (description, ranked.into_iter().take(5).collect())
}

/// What `cible model dbscan` reports.
#[derive(Debug, Clone, Serialize)]
pub struct DensityClustering {
    pub profiles: usize,
    pub min_points: usize,
    /// The knee of the k-distance curve (k = min_points) on the sample.
    pub suggested_eps: f64,
    pub eps: f64,
    /// Rows DBSCAN ran on (the others join the nearest core row's cluster within eps).
    pub sample: usize,
    pub noise: usize,
    pub clusters: Vec<Cluster>,
}

/// DBSCAN on the model rows; eps is the k-distance knee unless given. The parameters are
/// checked against [`bounds`] before `rows` (what reads the population) is called.
pub fn density_clusters(
    rows: impl FnOnce() -> Result<(FeatureTable, Vec<(f64, f64)>), EngineError>,
    min_points: usize,
    eps: Option<f64>,
    sample: usize,
    seed: u64,
) -> Result<DensityClustering, EngineError> {
    validate_dbscan(min_points, eps, sample)?;
    let (table, _) = rows()?;
    let sampled: Vec<Vec<f64>> = if table.rows.len() <= sample {
        table.rows.clone()
    } else {
        use rand::SeedableRng;
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rand::seq::index::sample(&mut rng, table.rows.len(), sample)
            .into_iter()
            .map(|i| table.rows[i].clone())
            .collect()
    };
    let suggested_eps = dbscan::knee(&dbscan::k_distances(&sampled, min_points));
    let eps = eps.unwrap_or(suggested_eps);
    let labels = dbscan::dbscan_sampled(&table.rows, eps, min_points, sample, seed);
    crate::cancel::check()?;
    let n_clusters = labels.iter().flatten().max().map_or(0, |m| m + 1);
    let clusters = (0..n_clusters)
        .map(|id| {
            let members: Vec<&Vec<f64>> = table
                .rows
                .iter()
                .zip(&labels)
                .filter(|(_, l)| **l == Some(id))
                .map(|(r, _)| r)
                .collect();
            let mut mean = vec![0.0; table.names.len()];
            for row in &members {
                for (m, v) in mean.iter_mut().zip(row.iter()) {
                    *m += v / members.len().max(1) as f64;
                }
            }
            let (description, traits) = describe(&table.names, &mean);
            Cluster {
                id,
                size: members.len(),
                description,
                traits,
            }
        })
        .filter(|c| c.size > 0)
        .collect();
    Ok(DensityClustering {
        profiles: table.rows.len(),
        min_points,
        suggested_eps,
        eps,
        sample: sampled.len(),
        noise: labels.iter().filter(|l| l.is_none()).count(),
        clusters,
    })
}

/// Clusters the model rows (every live profile's features, log1p then z-scores, from the
/// engine) with k-means, k chosen by
/// silhouette; returns the report and the model to save (the `cluster` traits). The
/// parameters are checked against [`bounds`] before `rows` is called.
pub fn cluster(
    rows: impl FnOnce() -> Result<(FeatureTable, Vec<(f64, f64)>), EngineError>,
    params: &ClusterParams,
    now: i64,
) -> Result<(Clustering, SavedModel), EngineError> {
    params.validate()?;
    let started = Instant::now();
    let (table, scales) = rows()?;
    let (fit, curve) = kmeans::choose_k(
        &table.rows,
        params.min_k..=params.max_k,
        params.restarts,
        params.sample,
        params.seed,
    );
    crate::cancel::check()?;
    let silhouette = curve
        .iter()
        .find(|c| c.k == fit.centroids.len())
        .map_or(0.0, |c| c.silhouette);
    let clusters = fit
        .centroids
        .iter()
        .enumerate()
        .map(|(id, centroid)| {
            let (description, traits) = describe(&table.names, centroid);
            Cluster {
                id,
                size: fit.labels.iter().filter(|l| **l == id).count(),
                description,
                traits,
            }
        })
        .collect();
    let clustering = Clustering {
        profiles: table.rows.len(),
        features: table.names.clone(),
        k: fit.centroids.len(),
        silhouette,
        inertia: fit.inertia,
        curve,
        clusters,
    };
    let model = SavedModel {
        name: CLUSTER_MODEL.to_string(),
        version: 0,
        trained_at: now,
        training_seconds: started.elapsed().as_secs_f64(),
        features: table.names,
        scales,
        kind: ModelKind::KMeans {
            names: unique_names(clustering.clusters.iter().map(|c| &c.description)),
            centroids: fit.centroids,
        },
        training: Training::KMeans(*params),
        report: serde_json::to_value(&clustering).expect("reports serialize"),
    };
    Ok((clustering, model))
}

/// Descriptions made unique: a repeated one gets " (2)", " (3)"...
fn unique_names<'a>(descriptions: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut names: Vec<String> = Vec::new();
    for description in descriptions {
        let mut name = description.clone();
        let mut n = 1;
        while names.contains(&name) {
            n += 1;
            name = format!("{description} ({n})");
        }
        names.push(name);
    }
    names
}

/// The allowed range of every training parameter, shared by the CLI and the admin API and
/// checked again by the engine before any training (a retrain included). Each bound keeps one
/// parameter from making a training run for hours; the time still grows with the population.
pub mod bounds {
    use std::ops::RangeInclusive;

    /// k tried by k-means (`min_k` to `max_k`): every k is fitted `restarts` times.
    pub const K: RangeInclusive<usize> = 2..=50;
    /// k-means++ restarts per k.
    pub const RESTARTS: RangeInclusive<usize> = 1..=20;
    /// Rows the silhouette is computed on; each is compared with every profile, for every k.
    pub const SILHOUETTE_SAMPLE: RangeInclusive<usize> = 1..=100_000;
    /// Rows DBSCAN runs on: neighbourhoods are brute force, time and memory quadratic in it.
    pub const DBSCAN_SAMPLE: RangeInclusive<usize> = 1..=10_000;
    /// DBSCAN's neighbours (the row included) that make a core row.
    pub const MIN_POINTS: RangeInclusive<usize> = 2..=1_000;
    /// DBSCAN's radius, in standardized units: above 0, at most this.
    pub const MAX_EPS: f64 = 100.0;
    /// A propensity model's horizon in days.
    pub const HORIZON_DAYS: RangeInclusive<u32> = 1..=365;
}

/// A training parameter out of [`bounds`]: the field (as the admin API names it; the CLI's flag
/// is `--` and the same words with dashes) and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParamError {
    pub field: &'static str,
    /// Names fields in backticks: "`max_k` must be between 2 and 50, found 100000".
    pub message: String,
}

impl ParamError {
    /// The message naming command-line flags: "--max-k must be between 2 and 50, found 100000".
    pub fn for_cli(&self) -> String {
        let mut text = self.message.clone();
        for field in [
            "min_k",
            "max_k",
            "restarts",
            "sample",
            "days",
            "min_points",
            "eps",
        ] {
            text = text.replace(
                &format!("`{field}`"),
                &format!("--{}", field.replace('_', "-")),
            );
        }
        text
    }
}

impl std::fmt::Display for ParamError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for ParamError {}

impl From<ParamError> for EngineError {
    fn from(error: ParamError) -> Self {
        EngineError::Invalid(error.message)
    }
}

/// `value` within `range`, or the error naming `field`.
pub fn check_range<T: PartialOrd + std::fmt::Display + Copy>(
    field: &'static str,
    value: T,
    range: &std::ops::RangeInclusive<T>,
) -> Result<(), ParamError> {
    if range.contains(&value) {
        return Ok(());
    }
    Err(ParamError {
        field,
        message: format!(
            "`{field}` must be between {} and {}, found {value}",
            range.start(),
            range.end()
        ),
    })
}

/// DBSCAN's settings within [`bounds`].
pub fn validate_dbscan(
    min_points: usize,
    eps: Option<f64>,
    sample: usize,
) -> Result<(), ParamError> {
    check_range("min_points", min_points, &bounds::MIN_POINTS)?;
    if let Some(eps) = eps
        && !(eps > 0.0 && eps <= bounds::MAX_EPS)
    {
        return Err(ParamError {
            field: "eps",
            message: format!(
                "`eps` must be above 0 and at most {}, found {eps}",
                bounds::MAX_EPS
            ),
        });
    }
    check_range("sample", sample, &bounds::DBSCAN_SAMPLE)
}

/// How `cible model cluster` trains.
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct ClusterParams {
    pub min_k: usize,
    pub max_k: usize,
    /// k-means++ restarts per k.
    pub restarts: usize,
    /// Rows the silhouette is computed on.
    pub sample: usize,
    pub seed: u64,
}

impl ClusterParams {
    /// Every parameter within [`bounds`]; the error names the first one that is not.
    pub fn validate(&self) -> Result<(), ParamError> {
        check_range("min_k", self.min_k, &bounds::K)?;
        check_range("max_k", self.max_k, &bounds::K)?;
        if self.min_k > self.max_k {
            return Err(ParamError {
                field: "min_k",
                message: format!(
                    "`min_k` must be at most `max_k`, found {} > {}",
                    self.min_k, self.max_k
                ),
            });
        }
        check_range("restarts", self.restarts, &bounds::RESTARTS)?;
        check_range("sample", self.sample, &bounds::SILHOUETTE_SAMPLE)
    }
}

/// What a model was trained with, to train it again (`cible model retrain`, the schedule).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Training {
    KMeans(ClusterParams),
    Propensity(propensity::PropensityParams),
}

impl Training {
    /// The recipe within [`bounds`] (a model stored before the bounds may be outside them).
    pub fn validate(&self) -> Result<(), ParamError> {
        match self {
            Self::KMeans(params) => params.validate(),
            Self::Propensity(params) => params.validate(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn descriptions_name_the_strongest_departures() {
        let features: Vec<String> = [
            "engagement",
            "frequency",
            "monetary",
            "opens_7d",
            "opens_30d",
        ]
        .iter()
        .map(|s| s.to_string())
        .collect();
        let (text, _) = describe(&features, &[1.8, 1.2, 0.9, -0.7, -0.6]);
        assert_eq!(text, "very engaged, frequent buyers, high spend");
        let (text, _) = describe(&features, &[0.1, -0.2, 0.0, 0.3, 0.0]);
        assert_eq!(text, "close to the average");
        // Two opens features make one phrase.
        let (text, _) = describe(&features, &[0.0, 0.0, 0.0, -2.0, -1.5]);
        assert_eq!(text, "ignore e-mails");
    }

    #[test]
    fn repeated_descriptions_get_numbered() {
        let descriptions: Vec<String> = ["engaged", "new", "engaged", "engaged"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        assert_eq!(
            unique_names(descriptions.iter()),
            ["engaged", "new", "engaged (2)", "engaged (3)"]
        );
    }

    #[test]
    fn profiles_cluster_into_described_groups() {
        let (_dir, engine) = crate::test_support::generated_store(600, 90, 4, 1_777_593_600_000);
        let params = ClusterParams {
            min_k: 2,
            max_k: 5,
            restarts: 2,
            sample: 400,
            seed: 1,
        };
        let (clustering, _) = engine.cluster(1_777_593_600_000, &params).unwrap();
        assert!((2..=5).contains(&clustering.k));
        assert_eq!(clustering.curve.len(), 4);
        assert_eq!(
            clustering.clusters.iter().map(|c| c.size).sum::<usize>(),
            clustering.profiles
        );
        assert!(clustering.silhouette > 0.0);
        assert!(
            clustering
                .clusters
                .iter()
                .all(|c| !c.description.is_empty())
        );
    }

    #[test]
    fn every_training_parameter_is_bounded_and_the_error_names_it() {
        let fine = ClusterParams {
            min_k: 2,
            max_k: 8,
            restarts: 4,
            sample: 2000,
            seed: 1,
        };
        assert_eq!(fine.validate(), Ok(()));
        let widest = ClusterParams {
            min_k: 2,
            max_k: 50,
            restarts: 20,
            sample: 100_000,
            seed: u64::MAX,
        };
        assert_eq!(widest.validate(), Ok(()));
        let refused = |params: ClusterParams| params.validate().unwrap_err();
        let error = refused(ClusterParams {
            max_k: 100_000,
            ..fine
        });
        assert_eq!(error.field, "max_k");
        assert_eq!(
            error.message,
            "`max_k` must be between 2 and 50, found 100000"
        );
        assert_eq!(
            error.for_cli(),
            "--max-k must be between 2 and 50, found 100000"
        );
        for (params, field) in [
            (ClusterParams { min_k: 1, ..fine }, "min_k"),
            (ClusterParams { min_k: 9, ..fine }, "min_k"),
            (
                ClusterParams {
                    restarts: 0,
                    ..fine
                },
                "restarts",
            ),
            (
                ClusterParams {
                    restarts: 21,
                    ..fine
                },
                "restarts",
            ),
            (ClusterParams { sample: 0, ..fine }, "sample"),
            (
                ClusterParams {
                    sample: 100_001,
                    ..fine
                },
                "sample",
            ),
        ] {
            assert_eq!(refused(params).field, field, "{params:?}");
        }
        let days = |horizon_days| propensity::PropensityParams {
            target: propensity::Target::Purchase,
            horizon_days,
            algorithm: propensity::Algorithm::Logistic,
        };
        assert_eq!(days(365).validate(), Ok(()));
        for bad in [0, 366, u32::MAX] {
            let error = days(bad).validate().unwrap_err();
            assert_eq!(error.field, "days");
            assert!(error.message.contains("between 1 and 365"), "{error}");
        }
        assert_eq!(validate_dbscan(10, None, 5000), Ok(()));
        assert_eq!(validate_dbscan(10, Some(2.5), 10_000), Ok(()));
        for (min_points, eps, sample, field) in [
            (1, None, 5000, "min_points"),
            (1001, None, 5000, "min_points"),
            (10, Some(0.0), 5000, "eps"),
            (10, Some(f64::NAN), 5000, "eps"),
            (10, Some(f64::INFINITY), 5000, "eps"),
            (10, None, 0, "sample"),
            (10, None, 10_001, "sample"),
        ] {
            let error = validate_dbscan(min_points, eps, sample).unwrap_err();
            assert_eq!(error.field, field, "{error}");
        }
        assert!(
            validate_dbscan(10, Some(-1.0), 5000)
                .unwrap_err()
                .for_cli()
                .starts_with("--eps must be above 0")
        );
    }

    #[test]
    fn the_engine_refuses_out_of_bound_trainings_at_once() {
        let (_dir, engine) = crate::test_support::generated_store(60, 30, 4, 1_777_593_600_000);
        let now = 1_777_593_600_000;
        let started = Instant::now();
        let huge = ClusterParams {
            min_k: 2,
            max_k: 100_000,
            restarts: 1,
            sample: 10,
            seed: 1,
        };
        let error = engine.cluster(now, &huge).unwrap_err();
        assert!(
            matches!(&error, EngineError::Invalid(m) if m.contains("`max_k`")),
            "{error}"
        );
        let error = engine
            .density_clusters(now, 10, None, 1_000_000, 1)
            .unwrap_err();
        assert!(matches!(&error, EngineError::Invalid(m) if m.contains("`sample`")));
        let params = propensity::PropensityParams {
            target: propensity::Target::Purchase,
            horizon_days: 100_000,
            algorithm: propensity::Algorithm::Logistic,
        };
        let error = engine.train_propensity(&params, now).unwrap_err();
        assert!(matches!(&error, EngineError::Invalid(m) if m.contains("`days`")));
        assert!(started.elapsed().as_secs() < 5);
        // A model stored before the bounds with a recipe outside them is not retrained: by
        // hand it is refused, by the schedule it is left as it is.
        let fine = ClusterParams { max_k: 3, ..huge };
        let (_, mut model) = engine.cluster(now, &fine).unwrap();
        model.training = Training::KMeans(huge);
        engine.save_model(model, now).unwrap();
        let error = engine.retrain(CLUSTER_MODEL, now).unwrap_err();
        assert!(
            matches!(&error, EngineError::Invalid(m) if m.contains("out of bounds") && m.contains("`max_k`")),
            "{error}"
        );
        assert!(
            engine
                .retrain_if_older(now + 30 * crate::time::DAY_MS, 0)
                .unwrap()
                .is_empty()
        );
    }

    #[test]
    fn density_clusters_cover_every_profile_once() {
        let (_dir, engine) = crate::test_support::generated_store(500, 90, 6, 1_777_593_600_000);
        let found = engine
            .density_clusters(1_777_593_600_000, 8, None, 300, 1)
            .unwrap();
        assert!(found.suggested_eps > 0.0 && found.eps == found.suggested_eps);
        assert_eq!(found.sample, 300);
        assert_eq!(
            found.clusters.iter().map(|c| c.size).sum::<usize>() + found.noise,
            found.profiles
        );
        assert!(!found.clusters.is_empty());
    }
}
