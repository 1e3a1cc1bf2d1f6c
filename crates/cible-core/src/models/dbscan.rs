//! DBSCAN with an eps suggested from the k-distance curve. Neighbourhoods are found by brute
//! force, so large populations are clustered on a sample; every other row then joins the
//! cluster of its nearest core row when that row is within eps, else it is noise.

use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rayon::prelude::*;

use super::distance2;

fn distance(a: &[f64], b: &[f64]) -> f64 {
    distance2(a, b).sqrt()
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

/// Each row's neighbours within eps (itself included), in index order. Every pair is
/// compared once, four rows against each later row at a time, by `|a|² + |b|² - 2 a·b` (dot
/// products vectorize, and each later row is read once for four); pairs near the limit are
/// measured again directly.
fn neighbourhoods(data: &[Vec<f64>], eps: f64) -> Vec<Vec<u32>> {
    const BLOCK: usize = 8;
    let n = data.len();
    let dims = data.first().map_or(0, Vec::len);
    let width = dims.div_ceil(4) * 4;
    // f32 products, twice as many per instruction; pairs the rounding could misjudge are
    // measured again in f64.
    let mut flat = vec![0.0f32; n * width];
    for (row, out) in data.iter().zip(flat.chunks_mut(width.max(1))) {
        for (o, v) in out.iter_mut().zip(row) {
            *o = *v as f32;
        }
    }
    let norms: Vec<f64> = data
        .iter()
        .map(|r| r.iter().map(|v| v * v).sum::<f64>())
        .collect();
    let limit = eps * eps;
    let row = |i: usize| &flat[i * width..][..width];
    let pairs: Vec<Vec<(u32, u32)>> = (0..n.div_ceil(BLOCK))
        .into_par_iter()
        .map(|block| {
            let first = block * BLOCK;
            let count = BLOCK.min(n - first);
            // A short last block repeats its first row (and skips the repeats).
            let queries: [&[f32]; BLOCK] =
                std::array::from_fn(|q| row(first + if q < count { q } else { 0 }));
            let mut found = Vec::new();
            for j in first..n {
                let other = row(j);
                let mut dots = [[0.0f32; 4]; BLOCK];
                for (c, chunk) in other.chunks_exact(4).enumerate() {
                    for (dot, query) in dots.iter_mut().zip(&queries) {
                        let query = &query[c * 4..][..4];
                        for k in 0..4 {
                            dot[k] += query[k] * chunk[k];
                        }
                    }
                }
                for (q, dot) in dots.iter().enumerate().take(count) {
                    let i = first + q;
                    if i > j {
                        continue;
                    }
                    let d2 = norms[i] + norms[j] - 2.0 * f64::from(dot.iter().sum::<f32>());
                    // f32 rounding and cancellation blur the trick by far less than this.
                    let blur = 1e-4 * (norms[i] + norms[j]) + 1e-6;
                    let near = if (d2 - limit).abs() <= blur {
                        distance2(&data[i], &data[j]) <= limit
                    } else {
                        d2 <= limit
                    };
                    if near {
                        found.push((i as u32, j as u32));
                    }
                }
            }
            found
        })
        .collect();
    let mut neighbours: Vec<Vec<u32>> = vec![Vec::new(); n];
    for (i, j) in pairs.into_iter().flatten() {
        neighbours[i as usize].push(j);
        if i != j {
            neighbours[j as usize].push(i);
        }
    }
    neighbours.par_iter_mut().for_each(|n| n.sort_unstable());
    neighbours
}

/// Cluster of each row (`None`: noise). Clusters are numbered in order of discovery.
pub fn dbscan(data: &[Vec<f64>], eps: f64, min_points: usize) -> Vec<Option<usize>> {
    clusters(data, eps, min_points).0
}

/// [`dbscan`]'s labels, and whether each row is a core row.
fn clusters(data: &[Vec<f64>], eps: f64, min_points: usize) -> (Vec<Option<usize>>, Vec<bool>) {
    let neighbours = neighbourhoods(data, eps);
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
                let other = other as usize;
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
    (labels, core)
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
    let (labels, is_core) = clusters(&rows, eps, min_points);
    let core: Vec<usize> = (0..rows.len()).filter(|i| is_core[*i]).collect();
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
