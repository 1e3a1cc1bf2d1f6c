//! `cible-bench --suite models`: cible's k-means, DBSCAN, logistic regression and boosted trees
//! against scikit-learn and LightGBM on the same rows, in the same run. The rows (model inputs:
//! log1p, z-scores) and cible's results are written as raw arrays; `bench_models.py` trains the
//! baselines on them and scores both sides with the same scikit-learn metric functions.

use std::io::Write;
use std::path::Path;
use std::time::Instant;

use cible_core::models::propensity::{Algorithm, PropensityParams, Target};
use cible_core::models::{dbscan, gbdt, kmeans, logistic};
use rand::SeedableRng;

use crate::Global;
use crate::bench::{
    BenchArgs, Row, imported_data, incremental_row, print_header, print_table, run_python,
    speed_ratio, tail_lines,
};

/// Clusters compared: a typical marketing segmentation size.
const K: usize = 4;
const RESTARTS: usize = 4;
const SEED: u64 = 1;
/// Rows of the silhouette sample (both labelings scored on the same rows).
const SILHOUETTE_SAMPLE: usize = 10_000;
/// Rows DBSCAN runs on (cible's neighbourhoods are brute force).
const DBSCAN_SAMPLE: usize = 10_000;
const MIN_POINTS: usize = 10;
const HORIZON_DAYS: u32 = 30;

const SCRIPT: &str = include_str!("bench_models.py");

fn write_rows(path: &Path, rows: &[Vec<f64>]) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for value in rows.iter().flatten() {
        out.write_all(&value.to_le_bytes())?;
    }
    out.flush()?;
    Ok(())
}

fn write_values<T: Copy>(
    path: &Path,
    values: &[T],
    bytes: impl Fn(T) -> Vec<u8>,
) -> anyhow::Result<()> {
    let mut out = std::io::BufWriter::new(std::fs::File::create(path)?);
    for value in values {
        out.write_all(&bytes(*value))?;
    }
    out.flush()?;
    Ok(())
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, end_ms, engine) = imported_data(global, args)?;
    let tail = tail_lines(&file, 200_000)?;
    std::fs::remove_file(&file)?;
    let dir = work.path();
    let events = engine.load_stats().events;

    eprintln!("feature rows ...");
    let started = Instant::now();
    let (table, _) = engine.model_rows(end_ms)?;
    let features_s = started.elapsed().as_secs_f64();
    let rows = &table.rows;
    let n = rows.len();

    eprintln!("k-means (k = {K}, {RESTARTS} restarts) ...");
    let started = Instant::now();
    let fit = kmeans::kmeans(rows, K, RESTARTS, 300, SEED);
    let kmeans_s = started.elapsed().as_secs_f64();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(SEED);
    let sample: Vec<usize> = if n <= SILHOUETTE_SAMPLE {
        (0..n).collect()
    } else {
        rand::seq::index::sample(&mut rng, n, SILHOUETTE_SAMPLE).into_vec()
    };
    write_rows(&dir.join("cluster_x.f64"), rows)?;
    write_values(&dir.join("kmeans_labels.u32"), &fit.labels, |l| {
        (l as u32).to_le_bytes().to_vec()
    })?;
    write_values(&dir.join("silhouette_sample.u32"), &sample, |i| {
        (i as u32).to_le_bytes().to_vec()
    })?;

    eprintln!("DBSCAN on {DBSCAN_SAMPLE} rows ...");
    let chosen: Vec<Vec<f64>> = if n <= DBSCAN_SAMPLE {
        rows.clone()
    } else {
        rand::seq::index::sample(&mut rng, n, DBSCAN_SAMPLE)
            .into_iter()
            .map(|i| rows[i].clone())
            .collect()
    };
    let eps = dbscan::knee(&dbscan::k_distances(&chosen, MIN_POINTS));
    let started = Instant::now();
    let density = dbscan::dbscan(&chosen, eps, MIN_POINTS);
    let dbscan_s = started.elapsed().as_secs_f64();
    let density_clusters = density.iter().flatten().max().map_or(0, |m| m + 1);
    let density_noise = density.iter().filter(|l| l.is_none()).count();
    write_rows(&dir.join("dbscan_x.f64"), &chosen)?;
    write_values(&dir.join("dbscan_labels.i32"), &density, |l| {
        l.map_or(-1, |l| l as i32).to_le_bytes().to_vec()
    })?;

    eprintln!("purchase within {HORIZON_DAYS} days: logistic regression, boosted trees ...");
    let split = engine.propensity_split(Target::Purchase, HORIZON_DAYS, end_ms)?;
    let (train, test) = (&split.train, &split.test);
    let started = Instant::now();
    let linear = logistic::fit(&train.0, &train.1, 1.0, 50);
    let logistic_s = started.elapsed().as_secs_f64();
    let started = Instant::now();
    let boosted = gbdt::fit(&train.0, &train.1, &gbdt::Params::default());
    let boosted_s = started.elapsed().as_secs_f64();
    let linear_p: Vec<f64> = test.0.iter().map(|r| linear.predict(r)).collect();
    let boosted_p: Vec<f64> = test.0.iter().map(|r| boosted.predict(r)).collect();
    // Scoring: the boosted model stored, then a segment on its prediction rebuilt over every
    // profile (features from the timelines, then 100 trees each).
    let params = PropensityParams {
        target: Target::Purchase,
        horizon_days: HORIZON_DAYS,
        algorithm: Algorithm::BoostedTrees,
    };
    let (_, model) = engine.train_propensity(&params, end_ms)?;
    let name = model.name.clone();
    engine.save_model(model, end_ms)?;
    let rule = cible_lang::parse(&format!("predicted.{name} >= 0.5"))
        .map_err(|d| anyhow::anyhow!(d.message))?;
    let started = Instant::now();
    let (likely, _, _) = engine.evaluate_rule(&rule, end_ms, &Default::default())?;
    let scoring_s = started.elapsed().as_secs_f64();
    eprintln!("measuring the incremental cost of live segments on the prediction ...");
    for (segment, rule) in [
        ("bench-likely", format!("predicted.{name} >= 0.5")),
        (
            "bench-likely-browsing",
            format!(r#"predicted.{name} >= 0.8 and did("Page Viewed", 7d)"#),
        ),
    ] {
        let expr = cible_lang::parse(&rule).map_err(|d| anyhow::anyhow!(d.message))?;
        engine.create_segment(segment, expr, &rule, end_ms)?;
    }
    let incremental = incremental_row(
        "incremental: ingest + 2 live segments on the prediction (ms per batch)",
        &engine,
        &tail,
        args.latency_batch,
        end_ms,
    )?;
    write_rows(&dir.join("train_x.f64"), &train.0)?;
    write_rows(&dir.join("test_x.f64"), &test.0)?;
    write_values(&dir.join("train_y.u8"), &train.1, |y| vec![u8::from(y)])?;
    write_values(&dir.join("test_y.u8"), &test.1, |y| vec![u8::from(y)])?;
    write_values(&dir.join("logistic_test.f64"), &linear_p, |p| {
        p.to_le_bytes().to_vec()
    })?;
    write_values(&dir.join("boosted_test.f64"), &boosted_p, |p| {
        p.to_le_bytes().to_vec()
    })?;

    std::fs::write(
        dir.join("spec.json"),
        serde_json::json!({
            "features": table.names.len(),
            "features_propensity": split.names.len(),
            "k": K,
            "restarts": RESTARTS,
            "seed": SEED,
            "eps": eps,
            "min_points": MIN_POINTS,
        })
        .to_string(),
    )?;
    eprintln!("scikit-learn and LightGBM on the same rows ...");
    let theirs = run_python(
        dir,
        ("bench_models.py", SCRIPT),
        &[dir.as_os_str()],
        "the scikit-learn/LightGBM baseline",
    )?;
    let f = |v: &serde_json::Value| v.as_f64().unwrap_or(f64::NAN);
    let km = &theirs["kmeans"];
    let db = &theirs["dbscan"];
    let (lr, gbm) = (&theirs["logistic"], &theirs["lightgbm"]);
    let (our_lr_auc, our_gbm_auc) = (
        f(&theirs["ours_auc"]["logistic"]),
        f(&theirs["ours_auc"]["boosted"]),
    );
    let relative = |ours: f64, baseline: f64| format!("{:+.2}%", (ours / baseline - 1.0) * 100.0);

    let features = format!(", {} features", table.names.len());
    print_header("models", &generated, events, n, &features, args.days);
    print_table(
        "",
        vec![
            Row {
                measure: "k-means training (s)",
                value: format!(
                    "{kmeans_s:.2} (k = {K}, {RESTARTS} k-means++ restarts, {} iterations in the best)",
                    fit.iterations
                ),
                baseline: format!(
                    "{:.2} (scikit-learn KMeans, lloyd, n_init = {RESTARTS})",
                    f(&km["seconds"])
                ),
                ratio: speed_ratio(kmeans_s, f(&km["seconds"])),
                target: "at least as fast",
            },
            Row {
                measure: "k-means inertia (lower is better)",
                value: format!("{:.1}", f(&km["ours_inertia"])),
                baseline: format!("{:.1}", f(&km["inertia"])),
                ratio: relative(f(&km["ours_inertia"]), f(&km["inertia"])),
                target: "within 1%",
            },
            Row {
                measure: "k-means silhouette (same sample, scikit-learn's function)",
                value: format!("{:.4}", f(&km["ours_silhouette"])),
                baseline: format!("{:.4}", f(&km["silhouette"])),
                ratio: relative(f(&km["ours_silhouette"]), f(&km["silhouette"])),
                target: "within 1%",
            },
            Row {
                measure: "DBSCAN (s)",
                value: format!(
                    "{dbscan_s:.2} ({} rows, eps {eps:.3} from the k-distance knee, min_points {MIN_POINTS}: {density_clusters} clusters, {density_noise} noise)",
                    chosen.len()
                ),
                baseline: format!(
                    "{:.2} (scikit-learn DBSCAN: {} clusters, {} noise)",
                    f(&db["seconds"]),
                    db["clusters"],
                    db["noise"]
                ),
                ratio: speed_ratio(dbscan_s, f(&db["seconds"])),
                target: "at least as fast",
            },
            Row {
                measure: "DBSCAN agreement (adjusted Rand index)",
                value: format!("{:.4}", f(&db["agreement_ari"])),
                baseline: "1 = the same partition".into(),
                ratio: "-".into(),
                target: "1.0",
            },
            Row {
                measure: "logistic regression training (s)",
                value: format!(
                    "{logistic_s:.2} ({} rows, {} features, {} Newton steps)",
                    train.0.len(),
                    split.names.len(),
                    linear.iterations
                ),
                baseline: format!(
                    "{:.2} (scikit-learn LogisticRegression, C = 1, lbfgs)",
                    f(&lr["seconds"])
                ),
                ratio: speed_ratio(logistic_s, f(&lr["seconds"])),
                target: "at least as fast",
            },
            Row {
                measure: "logistic regression held-out AUC",
                value: format!("{our_lr_auc:.4}"),
                baseline: format!("{:.4}", f(&lr["auc"])),
                ratio: format!("{:+.4}", our_lr_auc - f(&lr["auc"])),
                target: ">= baseline - 0.01",
            },
            Row {
                measure: "boosted trees training (s)",
                value: format!(
                    "{boosted_s:.2} (100 rounds, 31 leaves, 255 bins; {} trees)",
                    boosted.trees.len()
                ),
                baseline: format!(
                    "{:.2} (LightGBM, same settings, {} threads)",
                    f(&gbm["seconds"]),
                    theirs["threads"]
                ),
                ratio: speed_ratio(boosted_s, f(&gbm["seconds"])),
                target: "at least as fast",
            },
            Row {
                measure: "boosted trees held-out AUC",
                value: format!("{our_gbm_auc:.4}"),
                baseline: format!("{:.4}", f(&gbm["auc"])),
                ratio: format!("{:+.4}", our_gbm_auc - f(&gbm["auc"])),
                target: ">= baseline - 0.01",
            },
            Row {
                measure: "segment on the boosted model's prediction, rebuilt over every profile (s)",
                value: format!(
                    "{scoring_s:.2} (features from the timelines, then the trees; {} members)",
                    likely.len()
                ),
                baseline: format!(
                    "{:.2} (LightGBM predict_proba on {n} ready feature rows)",
                    f(&gbm["predict_seconds"])
                ),
                ratio: speed_ratio(scoring_s, f(&gbm["predict_seconds"])),
                target: "report",
            },
            incremental,
            Row {
                measure: "feature rows of every profile (s)",
                value: format!("{features_s:.2}"),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "report",
            },
        ],
    );
    Ok(())
}
