//! Logistic regression with an L2 penalty, fitted by Newton's method (iteratively reweighted
//! least squares), and the metrics propensity models report: AUC, log loss, a calibration table.
//! The loss minimized is `sum(log loss) + l2 / 2 * |w|^2` (the intercept is not penalized),
//! scikit-learn's `LogisticRegression(C = 1 / l2)`.

use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct Logistic {
    pub weights: Vec<f64>,
    pub intercept: f64,
    pub iterations: usize,
}

use super::sigmoid;

impl Logistic {
    pub fn predict(&self, row: &[f64]) -> f64 {
        predict(&self.weights, self.intercept, row)
    }
}

/// The probability a logistic model with these coefficients gives a row.
pub fn predict(weights: &[f64], intercept: f64, row: &[f64]) -> f64 {
    sigmoid(intercept + weights.iter().zip(row).map(|(w, x)| w * x).sum::<f64>())
}

/// Solves `a x = b` (a symmetric positive definite, small) by Gaussian elimination with partial
/// pivoting.
#[allow(
    clippy::needless_range_loop,
    reason = "dense matrix arithmetic reads best with indexes"
)]
fn solve(mut a: Vec<Vec<f64>>, mut b: Vec<f64>) -> Vec<f64> {
    let n = b.len();
    for col in 0..n {
        let pivot = (col..n)
            .max_by(|i, j| a[*i][col].abs().total_cmp(&a[*j][col].abs()))
            .expect("a column");
        a.swap(col, pivot);
        b.swap(col, pivot);
        let diagonal = a[col][col];
        if diagonal.abs() < 1e-300 {
            continue;
        }
        for row in col + 1..n {
            let factor = a[row][col] / diagonal;
            if factor != 0.0 {
                for k in col..n {
                    a[row][k] -= factor * a[col][k];
                }
                b[row] -= factor * b[col];
            }
        }
    }
    let mut x = vec![0.0; n];
    for row in (0..n).rev() {
        let rest: f64 = (row + 1..n).map(|k| a[row][k] * x[k]).sum();
        x[row] = if a[row][row].abs() < 1e-300 {
            0.0
        } else {
            (b[row] - rest) / a[row][row]
        };
    }
    x
}

/// Fits on rows `x` and labels `y`; stops when a Newton step changes no coefficient by more
/// than 1e-10, or after `max_iter` steps.
#[allow(
    clippy::needless_range_loop,
    reason = "dense matrix arithmetic reads best with indexes"
)]
pub fn fit(x: &[Vec<f64>], y: &[bool], l2: f64, max_iter: usize) -> Logistic {
    let d = x.first().map_or(0, Vec::len);
    // Coefficients: intercept first, then the weights.
    let mut beta = vec![0.0; d + 1];
    let mut iterations = 0;
    while iterations < max_iter {
        iterations += 1;
        let mut gradient = vec![0.0; d + 1];
        let mut hessian = vec![vec![0.0; d + 1]; d + 1];
        for (row, label) in x.iter().zip(y) {
            let z = beta[0] + beta[1..].iter().zip(row).map(|(w, v)| w * v).sum::<f64>();
            let p = sigmoid(z);
            let r = p - if *label { 1.0 } else { 0.0 };
            let w = (p * (1.0 - p)).max(1e-12);
            let features = std::iter::once(1.0).chain(row.iter().copied());
            let values: Vec<f64> = features.collect();
            for i in 0..=d {
                gradient[i] += r * values[i];
                for j in 0..=i {
                    hessian[i][j] += w * values[i] * values[j];
                }
            }
        }
        for i in 1..=d {
            gradient[i] += l2 * beta[i];
            hessian[i][i] += l2;
        }
        for i in 0..=d {
            for j in i + 1..=d {
                hessian[i][j] = hessian[j][i];
            }
        }
        let step = solve(hessian, gradient);
        let mut largest: f64 = 0.0;
        for (b, s) in beta.iter_mut().zip(&step) {
            *b -= s;
            largest = largest.max(s.abs());
        }
        if largest < 1e-10 {
            break;
        }
    }
    Logistic {
        intercept: beta[0],
        weights: beta[1..].to_vec(),
        iterations,
    }
}

/// Area under the ROC curve: the probability that a random positive scores above a random
/// negative (ties count half).
#[allow(
    clippy::needless_range_loop,
    reason = "dense matrix arithmetic reads best with indexes"
)]
pub fn auc(scores: &[f64], labels: &[bool]) -> f64 {
    let mut order: Vec<usize> = (0..scores.len()).collect();
    order.sort_by(|a, b| scores[*a].total_cmp(&scores[*b]));
    // Average ranks (1-based) over ties.
    let mut ranks = vec![0.0; scores.len()];
    let mut i = 0;
    while i < order.len() {
        let mut j = i;
        while j + 1 < order.len() && scores[order[j + 1]] == scores[order[i]] {
            j += 1;
        }
        let rank = (i + j) as f64 / 2.0 + 1.0;
        for k in i..=j {
            ranks[order[k]] = rank;
        }
        i = j + 1;
    }
    let positives = labels.iter().filter(|l| **l).count() as f64;
    let negatives = labels.len() as f64 - positives;
    if positives == 0.0 || negatives == 0.0 {
        return 0.5;
    }
    let rank_sum: f64 = ranks
        .iter()
        .zip(labels)
        .filter(|(_, l)| **l)
        .map(|(r, _)| r)
        .sum();
    (rank_sum - positives * (positives + 1.0) / 2.0) / (positives * negatives)
}

/// Mean log loss, probabilities clipped to [1e-15, 1 - 1e-15].
pub fn log_loss(probabilities: &[f64], labels: &[bool]) -> f64 {
    let total: f64 = probabilities
        .iter()
        .zip(labels)
        .map(|(p, l)| {
            let p = p.clamp(1e-15, 1.0 - 1e-15);
            if *l { -p.ln() } else { -(1.0 - p).ln() }
        })
        .sum();
    total / probabilities.len().max(1) as f64
}

/// One bin of a calibration table: predictions in [from, to), their mean, the observed rate.
#[derive(Debug, Clone, Serialize)]
pub struct CalibrationBin {
    pub from: f64,
    pub to: f64,
    pub count: usize,
    pub mean_predicted: f64,
    pub observed_rate: f64,
}

/// Predictions in `bins` equal-width bins over [0, 1].
pub fn calibration_table(
    probabilities: &[f64],
    labels: &[bool],
    bins: usize,
) -> Vec<CalibrationBin> {
    (0..bins)
        .map(|b| {
            let from = b as f64 / bins as f64;
            let to = (b + 1) as f64 / bins as f64;
            let inside: Vec<(f64, bool)> = probabilities
                .iter()
                .zip(labels)
                .filter(|(p, _)| **p >= from && (**p < to || (b + 1 == bins && **p <= to)))
                .map(|(p, l)| (*p, *l))
                .collect();
            let n = inside.len().max(1) as f64;
            CalibrationBin {
                from,
                to,
                count: inside.len(),
                mean_predicted: inside.iter().map(|(p, _)| p).sum::<f64>() / n,
                observed_rate: inside.iter().filter(|(_, l)| *l).count() as f64 / n,
            }
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn recovers_the_generating_weights() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let (true_w, true_b) = ([2.0, -1.0, 0.0], -0.5);
        let x: Vec<Vec<f64>> = (0..4000)
            .map(|_| (0..3).map(|_| rng.random::<f64>() * 2.0 - 1.0).collect())
            .collect();
        let y: Vec<bool> = x
            .iter()
            .map(|r| {
                let z = true_b + r.iter().zip(true_w).map(|(v, w)| v * w).sum::<f64>();
                rng.random::<f64>() < sigmoid(z)
            })
            .collect();
        let model = fit(&x, &y, 1e-6, 50);
        assert!(
            model.iterations < 20,
            "Newton converges fast: {}",
            model.iterations
        );
        for (got, want) in model.weights.iter().zip(true_w) {
            assert!((got - want).abs() < 0.25, "{:?}", model.weights);
        }
        assert!((model.intercept - true_b).abs() < 0.2);
        // At the optimum the penalized gradient is zero.
        let mut gradient = vec![0.0; 3];
        for (row, label) in x.iter().zip(&y) {
            let r = model.predict(row) - if *label { 1.0 } else { 0.0 };
            for (g, v) in gradient.iter_mut().zip(row) {
                *g += r * v;
            }
        }
        for (g, w) in gradient.iter().zip(&model.weights) {
            assert!((g + 1e-6 * w).abs() < 1e-6, "{gradient:?}");
        }
        let scores: Vec<f64> = x.iter().map(|r| model.predict(r)).collect();
        assert!(auc(&scores, &y) > 0.75);
        // A stronger penalty shrinks the weights.
        let shrunk = fit(&x, &y, 1000.0, 50);
        assert!(shrunk.weights[0].abs() < model.weights[0].abs());
    }

    #[test]
    fn metrics_match_hand_computations() {
        assert_eq!(
            auc(&[0.1, 0.4, 0.35, 0.8], &[false, false, true, true]),
            0.75
        );
        assert_eq!(auc(&[0.5, 0.5], &[false, true]), 0.5);
        assert_eq!(auc(&[0.9, 0.1], &[false, true]), 0.0);
        let loss = log_loss(&[0.9, 0.2], &[true, false]);
        assert!((loss - (-(0.9f64.ln()) - 0.8f64.ln()) / 2.0).abs() < 1e-12);
        let table = calibration_table(&[0.05, 0.15, 0.95, 1.0], &[false, true, true, true], 10);
        assert_eq!(table.len(), 10);
        assert_eq!(table[0].count, 1);
        assert_eq!(table[1].observed_rate, 1.0);
        assert_eq!(table[9].count, 2);
    }
}
