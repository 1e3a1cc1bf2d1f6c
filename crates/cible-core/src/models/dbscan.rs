//! DBSCAN with an eps suggested from the k-distance curve. Neighbourhoods are found by brute
//! force, so large populations are clustered on a sample; every other row then joins the
//! cluster of its nearest core row when that row is within eps, else it is noise.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

fn distance(a: &[f64], b: &[f64]) -> f64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x - y) * (x - y))
        .sum::<f64>()
        .sqrt()
}

/// Each row's distance to its k-th nearest other row, sorted ascending: the k-distance curve.
pub fn k_distances(data: &[Vec<f64>], k: usize) -> Vec<f64> {
    let mut curve: Vec<f64> = data
        .par_iter()
        .enumerate()
        .map(|(i, row)| {
            let mut distances: Vec<f64> = data
                .iter()
                .enumerate()
                .filter(|(j, _)| *j != i)
                .map(|(_, other)| distance(row, other))
                .collect();
            let k = k.clamp(1, distances.len().max(1));
            if distances.is_empty() {
                return 0.0;
            }
            let (_, kth, _) = distances.select_nth_unstable_by(k - 1, f64::total_cmp);
            *kth
        })
        .collect();
    curve.sort_by(f64::total_cmp);
    curve
}

/// The knee of a rising curve: the point farthest from the straight line joining its ends.
pub fn knee(curve: &[f64]) -> f64 {
    let (Some(first), Some(last)) = (curve.first(), curve.last()) else {
        return 0.0;
    };
    let n = (curve.len() - 1).max(1) as f64;
    curve
        .iter()
        .enumerate()
        .map(|(i, y)| {
            let line = first + (last - first) * i as f64 / n;
            (line - y, *y)
        })
        .fold((f64::NEG_INFINITY, *first), |best, c| {
            if c.0 > best.0 { c } else { best }
        })
        .1
}

/// Cluster of each row (`None`: noise). Clusters are numbered in order of discovery.
pub fn dbscan(data: &[Vec<f64>], eps: f64, min_points: usize) -> Vec<Option<usize>> {
    let neighbours: Vec<Vec<usize>> = data
        .par_iter()
        .map(|row| {
            data.iter()
                .enumerate()
                .filter(|(_, other)| distance(row, other) <= eps)
                .map(|(j, _)| j)
                .collect()
        })
        .collect();
    let core: Vec<bool> = neighbours.iter().map(|n| n.len() >= min_points).collect();
    let mut labels: Vec<Option<usize>> = vec![None; data.len()];
    let mut next = 0;
    for start in 0..data.len() {
        if !core[start] || labels[start].is_some() {
            continue;
        }
        labels[start] = Some(next);
        let mut stack = vec![start];
        while let Some(point) = stack.pop() {
            for &other in &neighbours[point] {
                if labels[other].is_none() {
                    labels[other] = Some(next);
                    if core[other] {
                        stack.push(other);
                    }
                }
            }
        }
        next += 1;
    }
    labels
}

/// DBSCAN over at most `sample` rows (drawn with `seed`), the others assigned to the cluster of
/// their nearest core row of the sample when within eps. Returns every row's cluster.
pub fn dbscan_sampled(
    data: &[Vec<f64>],
    eps: f64,
    min_points: usize,
    sample: usize,
    seed: u64,
) -> Vec<Option<usize>> {
    if data.len() <= sample {
        return dbscan(data, eps, min_points);
    }
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let chosen = rand::seq::index::sample(&mut rng, data.len(), sample).into_vec();
    let rows: Vec<Vec<f64>> = chosen.iter().map(|i| data[*i].clone()).collect();
    let labels = dbscan(&rows, eps, min_points);
    let core: Vec<usize> = (0..rows.len())
        .filter(|i| {
            labels[*i].is_some()
                && rows
                    .iter()
                    .filter(|o| distance(&rows[*i], o) <= eps)
                    .count()
                    >= min_points
        })
        .collect();
    data.par_iter()
        .map(|row| {
            core.iter()
                .map(|i| (distance(row, &rows[*i]), labels[*i]))
                .filter(|(d, _)| *d <= eps)
                .min_by(|a, b| a.0.total_cmp(&b.0))
                .and_then(|(_, label)| label)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::Rng;

    #[test]
    fn two_dense_groups_and_scattered_noise() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut data = Vec::new();
        for center in [0.0, 20.0] {
            for _ in 0..100 {
                data.push(vec![
                    center + rng.random::<f64>(),
                    center + rng.random::<f64>(),
                ]);
            }
        }
        let outliers = [vec![10.0, -10.0], vec![-15.0, 30.0], vec![40.0, 5.0]];
        data.extend(outliers.iter().cloned());
        let curve = k_distances(&data, 5);
        assert_eq!(curve.len(), data.len());
        assert!(curve.windows(2).all(|w| w[0] <= w[1]));
        let eps = knee(&curve);
        assert!(eps > 0.05 && eps < 5.0, "eps {eps}");
        let labels = dbscan(&data, eps, 5);
        assert!(
            labels[..100].iter().all(|l| *l == Some(0)),
            "{:?}",
            &labels[..100]
        );
        assert!(labels[100..200].iter().all(|l| *l == Some(1)));
        assert!(
            labels[200..].iter().all(Option::is_none),
            "outliers are noise"
        );
        // On a sample, the same groups come back for every row.
        let sampled = dbscan_sampled(&data, eps, 3, 120, 1);
        assert!(
            sampled[..100]
                .iter()
                .all(|l| *l == sampled[0] && l.is_some())
        );
        assert!(
            sampled[100..200]
                .iter()
                .all(|l| *l == sampled[100] && l.is_some())
        );
        assert_ne!(sampled[0], sampled[100]);
        assert!(sampled[200..].iter().all(Option::is_none));
    }

    #[test]
    fn the_knee_is_where_the_curve_bends() {
        let curve: Vec<f64> = (0..100)
            .map(|i| {
                if i < 80 {
                    1.0 + i as f64 * 0.01
                } else {
                    2.0 + (i - 80) as f64
                }
            })
            .collect();
        let eps = knee(&curve);
        assert!((1.7..=2.1).contains(&eps), "{eps}");
    }
}
