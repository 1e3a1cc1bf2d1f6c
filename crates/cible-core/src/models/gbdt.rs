//! Gradient-boosted decision trees for binary labels (log loss), grown the way LightGBM grows
//! them: feature values bucketed into at most 255 bins once, per-leaf gradient histograms (the
//! larger child's as the parent's minus the smaller's), and leaf-wise growth (always split the
//! leaf whose best split gains most) up to `max_leaves`. The defaults are LightGBM's.

use rayon::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct Params {
    pub rounds: usize,
    pub learning_rate: f64,
    pub max_leaves: usize,
    /// Fewest rows in a leaf.
    pub min_leaf_rows: usize,
    /// Smallest hessian sum in a leaf.
    pub min_leaf_hessian: f64,
    /// L2 penalty on leaf values.
    pub l2: f64,
    pub max_bins: usize,
}

impl Default for Params {
    fn default() -> Self {
        Self {
            rounds: 100,
            learning_rate: 0.1,
            max_leaves: 31,
            min_leaf_rows: 20,
            min_leaf_hessian: 1e-3,
            l2: 0.0,
            max_bins: 255,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub enum Node {
    /// Rows with `value <= threshold` go left.
    Split {
        feature: usize,
        threshold: f64,
        left: usize,
        right: usize,
    },
    Leaf(f64),
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Tree {
    pub nodes: Vec<Node>,
}

impl Tree {
    fn value(&self, row: &[f64]) -> f64 {
        let mut at = 0;
        loop {
            match &self.nodes[at] {
                Node::Leaf(value) => return *value,
                Node::Split {
                    feature,
                    threshold,
                    left,
                    right,
                } => {
                    at = if row[*feature] <= *threshold {
                        *left
                    } else {
                        *right
                    }
                }
            }
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Boosted {
    /// Log-odds every prediction starts from (the base rate's).
    pub init: f64,
    pub trees: Vec<Tree>,
    /// Total split gain per feature, summing to 1.
    pub importance: Vec<f64>,
}

use super::sigmoid;

impl Boosted {
    pub fn predict(&self, row: &[f64]) -> f64 {
        sigmoid(self.init + self.trees.iter().map(|t| t.value(row)).sum::<f64>())
    }
}

/// Per feature: the upper bound of each bin, ascending (the last is the largest value).
fn bin_bounds(x: &[Vec<f64>], feature: usize, max_bins: usize) -> Vec<f64> {
    let mut values: Vec<f64> = x.iter().map(|row| row[feature]).collect();
    values.sort_by(f64::total_cmp);
    let mut distinct: Vec<(f64, usize)> = Vec::new();
    for v in values {
        match distinct.last_mut() {
            Some((last, count)) if *last == v => *count += 1,
            _ => distinct.push((v, 1)),
        }
    }
    if distinct.len() <= max_bins {
        // A bin per value, split halfway between neighbours.
        let mut bounds: Vec<f64> = distinct
            .windows(2)
            .map(|w| (w[0].0 + w[1].0) / 2.0)
            .collect();
        bounds.push(f64::INFINITY);
        return bounds;
    }
    // Equal-count bins over the distinct values, a heavy value closing its own bin.
    let per_bin = x.len().div_ceil(max_bins);
    let mut bounds = Vec::new();
    let mut filled = 0;
    for (i, (value, count)) in distinct.iter().enumerate() {
        filled += count;
        if filled >= per_bin && i + 1 < distinct.len() && bounds.len() + 1 < max_bins {
            bounds.push((value + distinct[i + 1].0) / 2.0);
            filled = 0;
        }
    }
    bounds.push(f64::INFINITY);
    bounds
}

/// Gradient, hessian and row count per (feature, bin): feature `f`'s bins start at `f * 256`.
type Histogram = Vec<(f64, f64, u32)>;

const BINS: usize = 256;

struct Leaf {
    node: usize,
    rows: Vec<u32>,
    histogram: Histogram,
    gradient: f64,
    hessian: f64,
    best: Option<Split>,
}

#[derive(Debug, Clone, Copy)]
struct Split {
    gain: f64,
    feature: usize,
    /// Bins `<= bin` go left.
    bin: usize,
}

struct Grower<'a> {
    /// Column-major: feature `f`'s bins are `bins[f * rows..][..rows]` (to split a leaf's rows,
    /// which are in ascending order, reading one feature's bytes nearly in sequence).
    bins: &'a [u8],
    rows: usize,
    /// Per row, the histogram slots (`feature * 256 + bin`) of its values that are not their
    /// feature's most frequent bin: row `r`'s are `slots[offsets[r]..offsets[r + 1]]`. A
    /// histogram adds only these; each most frequent bin is the leaf's total minus the rest
    /// (LightGBM's trick: sparse features cost next to nothing).
    slots: &'a [u32],
    offsets: &'a [u32],
    /// Each feature's most frequent bin.
    modes: &'a [u8],
    features: usize,
    bounds: &'a [Vec<f64>],
    params: &'a Params,
}

impl Grower<'_> {
    fn histogram(&self, rows: &[u32], gh: &[(f64, f64)]) -> Histogram {
        let features = self.features;
        let fill = |rows: &[u32]| {
            // One extra slot at the end holds the rows' total.
            let mut histogram = vec![(0.0, 0.0, 0u32); features * BINS + 1];
            let mut total = (0.0, 0.0, 0u32);
            for (at, &row) in rows.iter().enumerate() {
                // A leaf's rows are scattered: load a later row's first slot and gradient now,
                // so that their cache lines are there when that row comes (a prefetch).
                if let Some(ahead) = rows.get(at + 16) {
                    let ahead = *ahead as usize;
                    let start = self.offsets[ahead] as usize;
                    std::hint::black_box((self.slots.get(start).copied(), gh[ahead].0));
                }
                let (g, h) = gh[row as usize];
                total.0 += g;
                total.1 += h;
                total.2 += 1;
                let row = row as usize;
                for slot in &self.slots[self.offsets[row] as usize..self.offsets[row + 1] as usize]
                {
                    let slot = &mut histogram[*slot as usize];
                    slot.0 += g;
                    slot.1 += h;
                    slot.2 += 1;
                }
            }
            histogram[features * BINS] = total;
            histogram
        };
        // Small leaves in one piece; large ones in chunks summed afterwards.
        const CHUNK: usize = 8192;
        let mut histogram = if rows.len() <= CHUNK {
            fill(rows)
        } else {
            self.sum_chunks(rows.par_chunks(CHUNK).map(fill).collect())
        };
        let total = histogram.pop().expect("the total slot");
        for (feature, mode) in self.modes.iter().enumerate() {
            let bins = &mut histogram[feature * BINS..][..BINS];
            let rest = bins
                .iter()
                .fold((0.0, 0.0, 0u32), |a, b| (a.0 + b.0, a.1 + b.1, a.2 + b.2));
            bins[usize::from(*mode)] = (total.0 - rest.0, total.1 - rest.1, total.2 - rest.2);
        }
        histogram
    }

    /// Chunk histograms added in order: the same sums on every run.
    fn sum_chunks(&self, parts: Vec<Histogram>) -> Histogram {
        let mut parts = parts.into_iter();
        let mut total = parts.next().unwrap_or_default();
        for part in parts {
            for (x, y) in total.iter_mut().zip(part) {
                x.0 += y.0;
                x.1 += y.1;
                x.2 += y.2;
            }
        }
        total
    }

    fn score(&self, gradient: f64, hessian: f64) -> f64 {
        gradient * gradient / (hessian + self.params.l2)
    }

    fn best_split(&self, leaf: &Leaf) -> Option<Split> {
        let p = self.params;
        let parent = self.score(leaf.gradient, leaf.hessian);
        let total = leaf.rows.len() as u32;
        let mut best: Option<Split> = None;
        for (feature, bounds) in self.bounds.iter().enumerate() {
            let histogram = &leaf.histogram[feature * BINS..][..bounds.len()];
            let (mut gl, mut hl, mut nl) = (0.0, 0.0, 0u32);
            for (bin, (g, h, n)) in histogram.iter().enumerate().take(bounds.len() - 1) {
                gl += g;
                hl += h;
                nl += n;
                let (gr, hr, nr) = (leaf.gradient - gl, leaf.hessian - hl, total - nl);
                if (nl as usize) < p.min_leaf_rows || hl < p.min_leaf_hessian {
                    continue;
                }
                if (nr as usize) < p.min_leaf_rows || hr < p.min_leaf_hessian {
                    break;
                }
                let gain = self.score(gl, hl) + self.score(gr, hr) - parent;
                if gain > best.map_or(1e-12, |b| b.gain) {
                    best = Some(Split { gain, feature, bin });
                }
            }
        }
        best
    }

    fn leaf(&self, node: usize, rows: Vec<u32>, histogram: Histogram) -> Leaf {
        let (gradient, hessian) = histogram[..BINS]
            .iter()
            .fold((0.0, 0.0), |a, b| (a.0 + b.0, a.1 + b.1));
        let mut leaf = Leaf {
            node,
            rows,
            histogram,
            gradient,
            hessian,
            best: None,
        };
        leaf.best = self.best_split(&leaf);
        leaf
    }

    /// One tree fitted to gradients and hessians `gh`; adds its gain to `importance` and each
    /// leaf's value to the scores of its rows.
    fn grow(&self, gh: &[(f64, f64)], importance: &mut [f64], scores: &mut [f64]) -> Tree {
        let rows: Vec<u32> = (0..gh.len() as u32).collect();
        let histogram = self.histogram(&rows, gh);
        let mut nodes = vec![Node::Leaf(0.0)];
        let mut leaves = vec![self.leaf(0, rows, histogram)];
        while leaves.len() < self.params.max_leaves {
            let Some((index, split)) = leaves
                .iter()
                .enumerate()
                .filter_map(|(i, l)| l.best.map(|b| (i, b)))
                .max_by(|a, b| a.1.gain.total_cmp(&b.1.gain))
            else {
                break;
            };
            let parent = leaves.swap_remove(index);
            importance[split.feature] += split.gain;
            let column = &self.bins[split.feature * self.rows..][..self.rows];
            let (left, right) = partition(&parent.rows, column, split.bin as u8);
            let (left_node, right_node) = (nodes.len(), nodes.len() + 1);
            nodes[parent.node] = Node::Split {
                feature: split.feature,
                threshold: self.bounds[split.feature][split.bin],
                left: left_node,
                right: right_node,
            };
            nodes.push(Node::Leaf(0.0));
            nodes.push(Node::Leaf(0.0));
            // The smaller child's histogram is built; the larger's is the difference.
            let left_is_small = left.len() <= right.len();
            let small = self.histogram(if left_is_small { &left } else { &right }, gh);
            let mut large = parent.histogram;
            for (w, p) in large.iter_mut().zip(&small) {
                w.0 -= p.0;
                w.1 -= p.1;
                w.2 -= p.2;
            }
            let (left_h, right_h) = if left_is_small {
                (small, large)
            } else {
                (large, small)
            };
            leaves.push(self.leaf(left_node, left, left_h));
            leaves.push(self.leaf(right_node, right, right_h));
        }
        for leaf in leaves {
            let value =
                -leaf.gradient / (leaf.hessian + self.params.l2) * self.params.learning_rate;
            nodes[leaf.node] = Node::Leaf(value);
            for row in leaf.rows {
                scores[row as usize] += value;
            }
        }
        Tree { nodes }
    }
}

/// Splits ascending rows into those whose bin is at most `bin` and the others, both still
/// ascending. Without branches (which way a row goes is a coin toss), in parallel pieces.
fn partition(rows: &[u32], column: &[u8], bin: u8) -> (Vec<u32>, Vec<u32>) {
    let split = |rows: &[u32]| {
        let (mut left, mut right) = (vec![0; rows.len()], vec![0; rows.len()]);
        let (mut l, mut r) = (0, 0);
        for &row in rows {
            let goes_left = usize::from(column[row as usize] <= bin);
            left[l] = row;
            right[r] = row;
            l += goes_left;
            r += 1 - goes_left;
        }
        left.truncate(l);
        right.truncate(r);
        (left, right)
    };
    const PIECE: usize = 32_768;
    if rows.len() <= PIECE {
        return split(rows);
    }
    let pieces: Vec<(Vec<u32>, Vec<u32>)> = rows.par_chunks(PIECE).map(split).collect();
    let mut left = Vec::with_capacity(rows.len());
    let mut right = Vec::with_capacity(rows.len());
    for (l, r) in pieces {
        left.extend(l);
        right.extend(r);
    }
    (left, right)
}

/// Fits `params.rounds` trees on rows `x` and labels `y`.
pub fn fit(x: &[Vec<f64>], y: &[bool], params: &Params) -> Boosted {
    let features = x.first().map_or(0, Vec::len);
    let max_bins = params.max_bins.clamp(2, 255);
    let bounds: Vec<Vec<f64>> = (0..features)
        .into_par_iter()
        .map(|f| bin_bounds(x, f, max_bins))
        .collect();
    let bins: Vec<u8> = x
        .par_iter()
        .flat_map_iter(|row| {
            row.iter()
                .zip(&bounds)
                .map(|(v, bounds)| bounds.partition_point(|b| *b < *v) as u8)
        })
        .collect();
    let modes: Vec<u8> = (0..features)
        .into_par_iter()
        .map(|f| {
            let mut counts = [0usize; BINS];
            for row in bins.chunks(features) {
                counts[usize::from(row[f])] += 1;
            }
            (0..BINS)
                .max_by_key(|b| (counts[*b], std::cmp::Reverse(*b)))
                .unwrap_or(0) as u8
        })
        .collect();
    let mut offsets = Vec::with_capacity(x.len() + 1);
    let mut slots: Vec<u32> = Vec::new();
    offsets.push(0u32);
    for row in bins.chunks(features.max(1)) {
        for (f, (bin, mode)) in row.iter().zip(&modes).enumerate() {
            if bin != mode {
                slots.push((f * BINS + usize::from(*bin)) as u32);
            }
        }
        offsets.push(slots.len() as u32);
    }
    let positives = y.iter().filter(|l| **l).count() as f64;
    let rate = (positives / y.len().max(1) as f64).clamp(1e-6, 1.0 - 1e-6);
    let init = (rate / (1.0 - rate)).ln();
    let mut scores = vec![init; x.len()];
    // Column-major copy for splitting.
    let by_feature: Vec<u8> = (0..features)
        .flat_map(|f| bins.iter().skip(f).step_by(features.max(1)).copied())
        .collect();
    let grower = Grower {
        bins: &by_feature,
        rows: x.len(),
        slots: &slots,
        offsets: &offsets,
        modes: &modes,
        features,
        bounds: &bounds,
        params,
    };
    let mut importance = vec![0.0; features];
    let mut trees = Vec::with_capacity(params.rounds);
    let mut gh = vec![(0.0, 0.0); x.len()];
    for _ in 0..params.rounds {
        if crate::cancel::cancelled() {
            break;
        }
        gh.par_iter_mut()
            .zip(&scores)
            .zip(y)
            .for_each(|((slot, score), label)| {
                let p = sigmoid(*score);
                *slot = (
                    p - if *label { 1.0 } else { 0.0 },
                    (p * (1.0 - p)).max(1e-16),
                );
            });
        let tree = grower.grow(&gh, &mut importance, &mut scores);
        if tree.nodes.len() == 1 {
            break; // No split gains anything any more.
        }
        trees.push(tree);
    }
    let total: f64 = importance.iter().sum();
    if total > 0.0 {
        importance.iter_mut().for_each(|v| *v /= total);
    }
    Boosted {
        init,
        trees,
        importance,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::models::logistic::{auc, log_loss};
    use rand::{Rng, SeedableRng};

    #[test]
    fn bins_split_between_values_and_cap_their_number() {
        let x: Vec<Vec<f64>> = [3.0, 1.0, 2.0, 2.0].iter().map(|v| vec![*v]).collect();
        assert_eq!(bin_bounds(&x, 0, 255), vec![1.5, 2.5, f64::INFINITY]);
        let many: Vec<Vec<f64>> = (0..10_000).map(|v| vec![f64::from(v)]).collect();
        let bounds = bin_bounds(&many, 0, 16);
        assert_eq!(bounds.len(), 16);
        assert!(bounds.windows(2).all(|w| w[0] < w[1]));
    }

    #[test]
    fn partitions_keep_rows_in_order_in_pieces_too() {
        let column: Vec<u8> = (0..100_000u32).map(|r| (r * 7 % 11) as u8).collect();
        for rows in [
            (0..100_000u32).filter(|r| r % 3 != 1).collect::<Vec<_>>(),
            (0..1000).collect(),
        ] {
            let (left, right) = partition(&rows, &column, 4);
            let (l, r): (Vec<u32>, Vec<u32>) = rows.iter().partition(|r| column[**r as usize] <= 4);
            assert_eq!((left, right), (l, r));
        }
    }

    #[test]
    fn sparse_histograms_equal_a_plain_count() {
        // Mostly zeros, a few values: the most frequent bin comes from the total.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        let x: Vec<Vec<f64>> = (0..20_000)
            .map(|_| {
                (0..3)
                    .map(|_| {
                        if rng.random_bool(0.8) {
                            0.0
                        } else {
                            f64::from(rng.random_range(1..6))
                        }
                    })
                    .collect()
            })
            .collect();
        let y: Vec<bool> = x.iter().map(|r| r[0] + r[1] > 3.0).collect();
        let params = Params {
            rounds: 3,
            ..Params::default()
        };
        let model = fit(&x, &y, &params);
        let p: Vec<f64> = x.iter().map(|r| model.predict(r)).collect();
        assert!(auc(&p, &y) > 0.99, "{}", auc(&p, &y));
        // A leaf's histogram (in chunks, and in one piece) equals a plain count per bin.
        let bounds: Vec<Vec<f64>> = (0..3).map(|f| bin_bounds(&x, f, 255)).collect();
        let bins: Vec<u8> = x
            .iter()
            .flat_map(|r| {
                r.iter()
                    .zip(&bounds)
                    .map(|(v, b)| b.partition_point(|t| *t < *v) as u8)
            })
            .collect();
        let modes = vec![0u8; 3];
        let mut offsets = vec![0u32];
        let mut slots = Vec::new();
        for row in bins.chunks(3) {
            for (f, bin) in row.iter().enumerate() {
                if *bin != 0 {
                    slots.push((f * BINS + usize::from(*bin)) as u32);
                }
            }
            offsets.push(slots.len() as u32);
        }
        let grower = Grower {
            bins: &bins,
            rows: x.len(),
            slots: &slots,
            offsets: &offsets,
            modes: &modes,
            features: 3,
            bounds: &bounds,
            params: &params,
        };
        let gh: Vec<(f64, f64)> = (0..x.len())
            .map(|i| (i as f64 * 0.01 - 7.0, 0.25))
            .collect();
        let rows: Vec<u32> = (0..x.len() as u32).filter(|r| r % 3 != 0).collect();
        for leaf in [&rows[..], &rows[..500]] {
            let histogram = grower.histogram(leaf, &gh);
            for f in 0..3 {
                for bin in 0..BINS {
                    let expected = leaf
                        .iter()
                        .filter(|r| usize::from(bins[**r as usize * 3 + f]) == bin)
                        .fold((0.0, 0.0, 0u32), |a, r| {
                            let (g, h) = gh[*r as usize];
                            (a.0 + g, a.1 + h, a.2 + 1)
                        });
                    let got = histogram[f * BINS + bin];
                    assert_eq!(got.2, expected.2, "feature {f} bin {bin}");
                    assert!((got.0 - expected.0).abs() < 1e-6 && (got.1 - expected.1).abs() < 1e-6);
                }
            }
        }
    }

    #[test]
    fn a_single_split_finds_the_threshold_and_the_leaf_means() {
        // Label is x > 5 for x in 0..10, 100 rows each: one split, pure leaves.
        let x: Vec<Vec<f64>> = (0..1000).map(|i| vec![f64::from(i % 10)]).collect();
        let y: Vec<bool> = x.iter().map(|r| r[0] > 5.0).collect();
        let params = Params {
            rounds: 1,
            max_leaves: 2,
            learning_rate: 1.0,
            ..Params::default()
        };
        let model = fit(&x, &y, &params);
        let Node::Split { threshold, .. } = model.trees[0].nodes[0] else {
            panic!("a split")
        };
        assert_eq!(threshold, 5.5);
        // Newton step from the base rate 0.4: each left row has g = 0.4, h = 0.24.
        let value = model.trees[0].value(&[0.0]);
        assert!((value - (-0.4 / 0.24)).abs() < 1e-9, "{value}");
        assert!(model.predict(&[9.0]) > 0.5 && model.predict(&[0.0]) < 0.5);
    }

    #[test]
    fn boosting_learns_an_interaction_a_linear_model_cannot() {
        // XOR of two signs, plus noise: trees reach a high AUC, logistic regression ~0.5.
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
        let x: Vec<Vec<f64>> = (0..4000)
            .map(|_| vec![rng.random_range(-1.0..1.0), rng.random_range(-1.0..1.0)])
            .collect();
        let y: Vec<bool> = x
            .iter()
            .map(|r| (r[0] > 0.0) != (r[1] > 0.0) || rng.random_bool(0.05))
            .collect();
        let (train, test) = x.split_at(3000);
        let (ytrain, ytest) = y.split_at(3000);
        let model = fit(train, ytrain, &Params::default());
        let p: Vec<f64> = test.iter().map(|r| model.predict(r)).collect();
        assert!(auc(&p, ytest) > 0.95, "AUC {}", auc(&p, ytest));
        let linear = crate::models::logistic::fit(train, ytrain, 1.0, 50);
        let q: Vec<f64> = test.iter().map(|r| linear.predict(r)).collect();
        assert!(auc(&q, ytest) < 0.65);
        assert!(log_loss(&p, ytest) < log_loss(&q, ytest));
        assert!((model.importance.iter().sum::<f64>() - 1.0).abs() < 1e-9);
    }
}
