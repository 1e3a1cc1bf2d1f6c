//! k-means with k-means++ seeding and restarts, the silhouette coefficient (exact, or on a
//! sample for large populations), and the choice of k by silhouette with the elbow curve.
//! Rows are feature vectors (see [`crate::features`]), usually standardized first.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;
use serde::Serialize;

/// A fitted clustering.
#[derive(Debug, Clone, Serialize)]
pub struct KMeans {
    pub centroids: Vec<Vec<f64>>,
    /// The cluster of each row.
    pub labels: Vec<usize>,
    /// Sum of squared distances of rows to their centroid.
    pub inertia: f64,
    pub iterations: usize,
}

use super::distance2;

/// The nearest centroid of a row and the squared distance to it.
pub(crate) fn nearest(row: &[f64], centroids: &[Vec<f64>]) -> (usize, f64) {
    centroids
        .iter()
        .enumerate()
        .map(|(i, c)| (i, distance2(row, c)))
        .fold(
            (0, f64::INFINITY),
            |best, d| if d.1 < best.1 { d } else { best },
        )
}

/// k-means++: the first centroid uniformly, each next one with probability proportional to the
/// squared distance to the nearest centroid chosen so far.
fn seed_plus_plus(data: &[Vec<f64>], k: usize, rng: &mut ChaCha8Rng) -> Vec<Vec<f64>> {
    let mut centroids = vec![data[rng.random_range(0..data.len())].clone()];
    let mut closest: Vec<f64> = data
        .par_iter()
        .map(|r| distance2(r, &centroids[0]))
        .collect();
    while centroids.len() < k {
        let total: f64 = closest.iter().sum();
        let chosen = if total > 0.0 {
            let mut target = rng.random::<f64>() * total;
            closest
                .iter()
                .position(|d| {
                    target -= d;
                    target <= 0.0
                })
                .unwrap_or(data.len() - 1)
        } else {
            rng.random_range(0..data.len())
        };
        let centroid = data[chosen].clone();
        closest
            .par_iter_mut()
            .zip(data)
            .for_each(|(d, row)| *d = d.min(distance2(row, &centroid)));
        centroids.push(centroid);
    }
    centroids
}

/// Rows side by side, each padded with zeros to a multiple of four values.
struct Flat {
    values: Vec<f64>,
    width: usize,
}

impl Flat {
    fn new(data: &[Vec<f64>]) -> Self {
        let width = data.first().map_or(0, Vec::len).div_ceil(4).max(1) * 4;
        let mut values = vec![0.0; data.len() * width];
        for (row, out) in data.iter().zip(values.chunks_exact_mut(width)) {
            out[..row.len()].copy_from_slice(row);
        }
        Self { values, width }
    }

    /// Each row's nearest centroid by `|c|² - 2 x·c` (the row's own norm does not change the
    /// order): one multiply-add per value and centroid, in four running sums.
    fn nearest(&self, centroids: &[Vec<f64>]) -> Vec<usize> {
        let width = self.width;
        let padded = Self::new(centroids);
        let norms: Vec<f64> = centroids
            .iter()
            .map(|c| c.iter().map(|v| v * v).sum())
            .collect();
        self.values
            .par_chunks(width * 4096)
            .flat_map_iter(|rows| {
                rows.chunks_exact(width).map(|x| {
                    let mut best = (0, f64::INFINITY);
                    for (c, centroid) in padded.values.chunks_exact(width).enumerate() {
                        let mut sums = [0.0; 4];
                        for (a, b) in x.chunks_exact(4).zip(centroid.chunks_exact(4)) {
                            for i in 0..4 {
                                sums[i] += a[i] * b[i];
                            }
                        }
                        let score = norms[c] - 2.0 * sums.iter().sum::<f64>();
                        if score < best.1 {
                            best = (c, score);
                        }
                    }
                    best.0
                })
            })
            .collect()
    }
}

/// Lloyd iterations from given centroids until no label changes, the centroids move less than
/// `tol` (summed squared shifts), or `max_iter`. The labels returned are each row's nearest
/// final centroid.
fn lloyd(
    data: &[Vec<f64>],
    flat: &Flat,
    mut centroids: Vec<Vec<f64>>,
    max_iter: usize,
    tol: f64,
) -> KMeans {
    let dims = data[0].len();
    let k = centroids.len();
    let assign = |centroids: &[Vec<f64>]| flat.nearest(centroids);
    let mut labels = vec![usize::MAX; data.len()];
    let mut iterations = 0;
    loop {
        iterations += 1;
        let assigned = assign(&centroids);
        let changed = assigned != labels;
        labels = assigned;
        if !changed || iterations >= max_iter || crate::cancel::cancelled() {
            break;
        }
        // Sums per cluster by fixed chunks, added in order: the same result on every run.
        const CHUNK: usize = 16_384;
        let parts: Vec<(Vec<f64>, Vec<usize>)> = data
            .par_chunks(CHUNK)
            .zip(labels.par_chunks(CHUNK))
            .map(|(rows, labels)| {
                let mut sums = vec![0.0; k * dims];
                let mut counts = vec![0usize; k];
                for (row, label) in rows.iter().zip(labels) {
                    counts[*label] += 1;
                    for (s, x) in sums[label * dims..][..dims].iter_mut().zip(row) {
                        *s += x;
                    }
                }
                (sums, counts)
            })
            .collect();
        let mut sums = vec![0.0; k * dims];
        let mut counts = vec![0usize; k];
        for (part_sums, part_counts) in parts {
            sums.iter_mut().zip(part_sums).for_each(|(s, p)| *s += p);
            counts
                .iter_mut()
                .zip(part_counts)
                .for_each(|(c, p)| *c += p);
        }
        let mut shift = 0.0;
        for (c, (centroid, count)) in centroids.iter_mut().zip(counts).enumerate() {
            // An empty cluster keeps its centroid.
            if count > 0 {
                let moved: Vec<f64> = sums[c * dims..][..dims]
                    .iter()
                    .map(|s| s / count as f64)
                    .collect();
                shift += distance2(centroid, &moved);
                *centroid = moved;
            }
        }
        if shift <= tol {
            break;
        }
    }
    // The labels by exact distances, as the stored model assigns profiles.
    labels = data.par_iter().map(|r| nearest(r, &centroids).0).collect();
    let inertia = data
        .par_iter()
        .zip(&labels)
        .map(|(r, l)| distance2(r, &centroids[*l]))
        .sum();
    KMeans {
        centroids,
        labels,
        inertia,
        iterations,
    }
}

/// The best of `restarts` k-means++ runs (lowest inertia). Each run stops when no label
/// changes or the centroids move less than 1e-4 of the data's mean variance (summed squared
/// shifts; scikit-learn's rule). Deterministic for a seed.
pub fn kmeans(data: &[Vec<f64>], k: usize, restarts: usize, max_iter: usize, seed: u64) -> KMeans {
    assert!(
        k >= 1 && k <= data.len(),
        "k must be between 1 and the number of rows"
    );
    // scikit-learn's stopping rule: centroids moving less than 1e-4 of the mean variance.
    let dims = data[0].len();
    let n = data.len() as f64;
    let mean_variance = (0..dims)
        .map(|d| {
            let mean = data.iter().map(|r| r[d]).sum::<f64>() / n;
            data.iter().map(|r| (r[d] - mean).powi(2)).sum::<f64>() / n
        })
        .sum::<f64>()
        / dims.max(1) as f64;
    let tol = 1e-4 * mean_variance;
    let flat = Flat::new(data);
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..restarts.max(1))
        // A cancelled training stops after the first restart (its result is discarded).
        .take_while(|restart| *restart == 0 || !crate::cancel::cancelled())
        .map(|_| {
            lloyd(
                data,
                &flat,
                seed_plus_plus(data, k, &mut rng),
                max_iter,
                tol,
            )
        })
        .min_by(|a, b| a.inertia.total_cmp(&b.inertia))
        .expect("at least one run")
}

/// Mean silhouette coefficient of `rows` (indexes into `data`): for each, (b - a) / max(a, b)
/// with a the mean distance to the others of its cluster and b the lowest mean distance to
/// another cluster; 0 for a row alone in its cluster. Distances are computed against every row.
pub fn silhouette_of(data: &[Vec<f64>], labels: &[usize], k: usize, rows: &[usize]) -> f64 {
    if k < 2 || rows.is_empty() {
        return 0.0;
    }
    // A cancelled training skips the rest (its result is discarded).
    let cancel = crate::cancel::current();
    let total: f64 = rows
        .par_iter()
        .map(|&i| {
            if cancel.is_cancelled() {
                return 0.0;
            }
            let mut sums = vec![0.0; k];
            let mut counts = vec![0usize; k];
            for (j, row) in data.iter().enumerate() {
                if j != i {
                    sums[labels[j]] += distance2(&data[i], row).sqrt();
                    counts[labels[j]] += 1;
                }
            }
            let own = labels[i];
            if counts[own] == 0 {
                return 0.0;
            }
            let a = sums[own] / counts[own] as f64;
            let b = (0..k)
                .filter(|c| *c != own && counts[*c] > 0)
                .map(|c| sums[c] / counts[c] as f64)
                .fold(f64::INFINITY, f64::min);
            if !b.is_finite() {
                return 0.0;
            }
            (b - a) / a.max(b)
        })
        .sum();
    total / rows.len() as f64
}

/// The silhouette over every row, or over `sample` rows drawn with `seed` when there are more.
pub fn silhouette(data: &[Vec<f64>], labels: &[usize], k: usize, sample: usize, seed: u64) -> f64 {
    let rows: Vec<usize> = if data.len() <= sample {
        (0..data.len()).collect()
    } else {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rand::seq::index::sample(&mut rng, data.len(), sample).into_vec()
    };
    silhouette_of(data, labels, k, &rows)
}

/// One k tried.
#[derive(Debug, Clone, Serialize)]
pub struct Candidate {
    pub k: usize,
    pub inertia: f64,
    pub silhouette: f64,
}

/// Fits every k in `ks` and keeps the one with the highest silhouette; returns it with the
/// curve (inertia per k is the elbow curve).
pub fn choose_k(
    data: &[Vec<f64>],
    ks: std::ops::RangeInclusive<usize>,
    restarts: usize,
    sample: usize,
    seed: u64,
) -> (KMeans, Vec<Candidate>) {
    let mut best: Option<(f64, KMeans)> = None;
    let mut curve = Vec::new();
    for k in ks.filter(|k| *k >= 2 && *k <= data.len()) {
        if best.is_some() && crate::cancel::cancelled() {
            break;
        }
        let fit = kmeans(data, k, restarts, 300, seed);
        let score = silhouette(data, &fit.labels, k, sample, seed);
        curve.push(Candidate {
            k,
            inertia: fit.inertia,
            silhouette: score,
        });
        if best.as_ref().is_none_or(|(s, _)| score > *s) {
            best = Some((score, fit));
        }
    }
    let (_, fit) = best.expect("at least one k between 2 and the number of rows");
    (fit, curve)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Points around `centers`, `n` each, with a spread of `noise`.
    fn blobs(centers: &[[f64; 2]], n: usize, noise: f64, seed: u64) -> Vec<Vec<f64>> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        centers
            .iter()
            .flat_map(|c| {
                (0..n)
                    .map(|_| {
                        vec![
                            c[0] + (rng.random::<f64>() - 0.5) * noise,
                            c[1] + (rng.random::<f64>() - 0.5) * noise,
                        ]
                    })
                    .collect::<Vec<_>>()
            })
            .collect()
    }

    #[test]
    fn finds_the_blobs_and_their_number() {
        let centers = [[0.0, 0.0], [10.0, 0.0], [0.0, 10.0], [10.0, 10.0]];
        let data = blobs(&centers, 60, 2.0, 1);
        let (fit, curve) = choose_k(&data, 2..=7, 4, 10_000, 7);
        assert_eq!(fit.centroids.len(), 4, "{curve:?}");
        for center in centers {
            let (_, d) = nearest(&center, &fit.centroids);
            assert!(d < 0.1, "no centroid near {center:?}: {:?}", fit.centroids);
        }
        // Every row of a blob shares its label.
        for blob in data.chunks(60) {
            let first = nearest(&blob[0], &fit.centroids).0;
            assert!(blob.iter().all(|r| nearest(r, &fit.centroids).0 == first));
        }
        // The elbow: inertia never rises with k, and drops most up to the true k.
        assert!(
            curve
                .windows(2)
                .all(|w| w[1].inertia <= w[0].inertia * 1.0001)
        );
        let best = curve
            .iter()
            .max_by(|a, b| a.silhouette.total_cmp(&b.silhouette))
            .unwrap();
        assert_eq!(best.k, 4);
        assert!(best.silhouette > 0.8);
    }

    #[test]
    fn silhouette_matches_a_hand_computation() {
        // Two clusters on a line: {0, 1} and {4}.
        let data = vec![vec![0.0], vec![1.0], vec![4.0]];
        let labels = [0, 0, 1];
        // Row 0: a = 1, b = 4 -> 0.75; row 1: a = 1, b = 3 -> 2/3; row 2: alone -> 0.
        let expected = (0.75 + 2.0 / 3.0 + 0.0) / 3.0;
        assert!((silhouette(&data, &labels, 2, 100, 0) - expected).abs() < 1e-12);
        // A sample of one row gives that row's value.
        assert!((silhouette_of(&data, &labels, 2, &[0]) - 0.75).abs() < 1e-12);
    }

    #[test]
    fn the_same_seed_gives_the_same_clustering() {
        let data = blobs(&[[0.0, 0.0], [5.0, 5.0], [9.0, 0.0]], 40, 3.0, 2);
        let a = kmeans(&data, 3, 3, 100, 11);
        let b = kmeans(&data, 3, 3, 100, 11);
        assert_eq!(a.labels, b.labels);
        assert_eq!(a.inertia, b.inertia);
        // More restarts never do worse.
        assert!(kmeans(&data, 3, 10, 100, 11).inertia <= kmeans(&data, 3, 1, 100, 11).inertia);
    }
}
