//! Propensity models trained on a time split: features of every profile as of a cutoff
//! (`now - horizon`), labels from what happened after it (up to `now`). One profile in five,
//! chosen by a hash of its ordinal, is held out for the metrics.

use std::time::Instant;

use serde::{Deserialize, Serialize};

use super::logistic::{self, CalibrationBin};
use super::saved::{ModelKind, SavedModel};
use super::{Training, gbdt};
use crate::error::EngineError;

/// What a model predicts, over the `horizon` days after the cutoff.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Target {
    /// An "Order Completed".
    Purchase,
    /// An "Email Opened".
    Open,
    /// No engagement event at all (for profiles seen before the cutoff).
    Churn,
}

/// How a propensity model is fitted.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Algorithm {
    /// L2-penalized logistic regression (C = 1).
    Logistic,
    /// Gradient-boosted trees (100 rounds, 31 leaves, learning rate 0.1).
    BoostedTrees,
}

/// What `cible model train` trains.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct PropensityParams {
    pub target: Target,
    pub horizon_days: u32,
    pub algorithm: Algorithm,
}

impl PropensityParams {
    /// The model's name, and its trait's: `purchase_30d` is read as `predicted.purchase_30d`.
    pub fn name(&self) -> String {
        let target = match self.target {
            Target::Purchase => "purchase",
            Target::Open => "open",
            Target::Churn => "churn",
        };
        format!("{target}_{}d", self.horizon_days)
    }

    /// The horizon within [`super::bounds::HORIZON_DAYS`].
    pub fn validate(&self) -> Result<(), super::ParamError> {
        super::check_range("days", self.horizon_days, &super::bounds::HORIZON_DAYS)
    }
}

/// The report of a training.
#[derive(Debug, Clone, Serialize)]
pub struct PropensityReport {
    pub model: String,
    pub target: Target,
    pub algorithm: Algorithm,
    pub horizon_days: u32,
    /// The cutoff, ms: features before it, labels after.
    pub cutoff: i64,
    pub train: usize,
    pub test: usize,
    /// Share of positives in the training rows.
    pub base_rate: f64,
    pub auc: f64,
    pub log_loss: f64,
    /// Log loss of always predicting the base rate, for comparison.
    pub log_loss_base: f64,
    pub calibration: Vec<CalibrationBin>,
    /// Features by importance: the standardized weight (logistic regression) or the share of
    /// the total split gain (boosted trees).
    pub importance: Vec<(String, f64)>,
    pub training_seconds: f64,
}

/// The rows of a time split: model inputs (log1p, z-scores) with labels, training and held-out.
#[derive(Debug, Clone)]
pub struct Split {
    pub names: Vec<String>,
    pub scales: Vec<(f64, f64)>,
    pub cutoff: i64,
    pub train: (Vec<Vec<f64>>, Vec<bool>),
    pub test: (Vec<Vec<f64>>, Vec<bool>),
}

pub(crate) fn held_out(profile: u32) -> bool {
    // A fixed mix of the ordinal: the same profiles are held out every time.
    (u64::from(profile).wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 60) < 3
}

/// Trains a propensity model and reports its quality on held-out profiles; returns the
/// report and the model to save (the `predicted.<name>` trait).
pub fn train(
    split: impl FnOnce(Target, u32) -> Result<Split, EngineError>,
    params: &PropensityParams,
    now: i64,
) -> Result<(PropensityReport, SavedModel), EngineError> {
    params.validate()?;
    let split = split(params.target, params.horizon_days)?;
    let started = Instant::now();
    let (train, test) = (&split.train, &split.test);
    let (kind, predicted, importance): (ModelKind, Vec<f64>, Vec<f64>) = match params.algorithm {
        Algorithm::Logistic => {
            let model = logistic::fit(&train.0, &train.1, 1.0, 50);
            crate::cancel::check()?;
            let predicted = test.0.iter().map(|r| model.predict(r)).collect();
            let importance = model.weights.clone();
            let kind = ModelKind::Logistic {
                target: params.target,
                horizon_days: params.horizon_days,
                weights: model.weights,
                intercept: model.intercept,
            };
            (kind, predicted, importance)
        }
        Algorithm::BoostedTrees => {
            let model = gbdt::fit(&train.0, &train.1, &gbdt::Params::default());
            crate::cancel::check()?;
            let predicted = test.0.iter().map(|r| model.predict(r)).collect();
            let importance = model.importance.clone();
            let kind = ModelKind::Boosted {
                target: params.target,
                horizon_days: params.horizon_days,
                model,
            };
            (kind, predicted, importance)
        }
    };
    let training_seconds = started.elapsed().as_secs_f64();
    let base_rate = train.1.iter().filter(|l| **l).count() as f64 / train.1.len() as f64;
    let mut importance: Vec<(String, f64)> = split.names.iter().cloned().zip(importance).collect();
    importance.sort_by(|a, b| b.1.abs().total_cmp(&a.1.abs()));
    let report = PropensityReport {
        model: params.name(),
        target: params.target,
        algorithm: params.algorithm,
        horizon_days: params.horizon_days,
        cutoff: split.cutoff,
        train: train.0.len(),
        test: test.0.len(),
        base_rate,
        auc: logistic::auc(&predicted, &test.1),
        log_loss: logistic::log_loss(&predicted, &test.1),
        log_loss_base: logistic::log_loss(&vec![base_rate; test.1.len()], &test.1),
        calibration: logistic::calibration_table(&predicted, &test.1, 10),
        importance,
        training_seconds,
    };
    let model = SavedModel {
        name: params.name(),
        version: 0,
        trained_at: now,
        training_seconds,
        features: split.names,
        scales: split.scales,
        kind,
        training: Training::Propensity(*params),
        report: serde_json::to_value(&report).expect("reports serialize"),
    };
    Ok((report, model))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn purchase_propensity_beats_the_base_rate_on_held_out_profiles() {
        let now = 1_777_593_600_000;
        let (_dir, engine) = crate::test_support::generated_store(1500, 120, 8, now);
        let params = PropensityParams {
            target: Target::Purchase,
            horizon_days: 30,
            algorithm: Algorithm::Logistic,
        };
        let (report, _) = engine.train_propensity(&params, now).unwrap();
        assert!(
            report.train > 4 * report.test / 2 && report.test > 100,
            "{report:?}"
        );
        assert!(report.base_rate > 0.02 && report.base_rate < 0.98);
        assert!(report.auc > 0.6, "AUC {}", report.auc);
        assert!(report.log_loss < report.log_loss_base, "{report:?}");
        assert_eq!(
            report.calibration.iter().map(|b| b.count).sum::<usize>(),
            report.test
        );
    }
}
