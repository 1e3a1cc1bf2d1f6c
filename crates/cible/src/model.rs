//! `cible model`: clustering and propensity models on profiles' feature vectors, stored and
//! versioned; the active version of each is scored as a computed trait.

use clap::Subcommand;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// k-means on every profile's standardized features, k chosen by silhouette; prints the
    /// elbow curve and each cluster described in plain words.
    Cluster {
        /// Smallest k tried (2 to 50).
        #[arg(long, default_value_t = 2)]
        min_k: usize,
        /// Largest k tried (2 to 50).
        #[arg(long, default_value_t = 8)]
        max_k: usize,
        /// k-means++ restarts per k, 1 to 20 (the lowest inertia is kept).
        #[arg(long, default_value_t = 4)]
        restarts: usize,
        /// Rows the silhouette is computed on (all of them when fewer), 1 to 100000.
        #[arg(long, default_value_t = 2000)]
        sample: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Report only: do not store the model (the `cluster` traits stay as they are).
        #[arg(long)]
        no_save: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// DBSCAN on the same features; eps is suggested from the k-distance curve unless given.
    Dbscan {
        /// Neighbours (the row included) that make a core row, 2 to 1000.
        #[arg(long, default_value_t = 10)]
        min_points: usize,
        /// Neighbourhood radius in standardized units (above 0, at most 100); the k-distance knee
        /// when absent.
        #[arg(long)]
        eps: Option<f64>,
        /// Rows DBSCAN runs on, 1 to 10000; the others join the nearest core row's cluster
        /// within eps.
        #[arg(long, default_value_t = 5000)]
        sample: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Predicts purchase, open or churn in the next N days, trained on a time split; prints AUC,
    /// log loss, a calibration table and feature importance, and stores the model as the next
    /// version of `<target>_<N>d` (the trait `predicted.<target>_<N>d`).
    Train {
        /// What to predict.
        #[arg(long, value_enum)]
        target: TargetArg,
        /// Horizon in days, 1 to 365: features as of now minus this, labels after.
        #[arg(long, default_value_t = 30)]
        days: u32,
        #[arg(long, value_enum, default_value = "boosted-trees")]
        algorithm: AlgorithmArg,
        /// Report only: do not store the model.
        #[arg(long)]
        no_save: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Stored models: each name with its active version, or every version of one model.
    List {
        name: Option<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// A stored model's training report (the active version unless --version).
    Report {
        name: String,
        #[arg(long)]
        version: Option<u32>,
    },
    /// Trains a new version of stored models with the settings they were trained with.
    Retrain {
        /// The models to retrain; all of them when none is named.
        names: Vec<String>,
    },
    /// Makes a stored version the one scored (to roll back).
    Activate { name: String, version: u32 },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum AlgorithmArg {
    Logistic,
    BoostedTrees,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TargetArg {
    Purchase,
    Open,
    Churn,
}

pub fn run(global: &Global, command: ModelCommand) -> anyhow::Result<()> {
    use cible_core::models::propensity::{Algorithm, PropensityParams, Target};
    if let Some(remote) = global.running_server()
        && matches!(
            command,
            ModelCommand::List { .. }
                | ModelCommand::Report { .. }
                | ModelCommand::Retrain { .. }
                | ModelCommand::Activate { .. }
        )
    {
        return run_remote(&remote, command);
    }
    match command {
        ModelCommand::Train {
            target,
            days,
            algorithm,
            no_save,
            json,
        } => {
            let params = PropensityParams {
                target: match target {
                    TargetArg::Purchase => Target::Purchase,
                    TargetArg::Open => Target::Open,
                    TargetArg::Churn => Target::Churn,
                },
                horizon_days: days,
                algorithm: match algorithm {
                    AlgorithmArg::Logistic => Algorithm::Logistic,
                    AlgorithmArg::BoostedTrees => Algorithm::BoostedTrees,
                },
            };
            params
                .validate()
                .map_err(|e| anyhow::anyhow!(e.for_cli()))?;
            let engine = global.open_existing()?;
            let now = global.now_ms()?;
            let (report, model) = engine.train_propensity(&params, now)?;
            let version = if no_save {
                None
            } else {
                Some(engine.save_model(model, now)?)
            };
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
            } else {
                print_propensity(&report);
            }
            if let Some(version) = version {
                eprintln!(
                    "stored as {} version {version}: segments read it as predicted.{}",
                    report.model, report.model
                );
            }
        }
        ModelCommand::List { name, json } => {
            let engine = global.open_existing()?;
            let rows = engine.models().summaries(name.as_deref())?;
            print_summaries(&serde_json::to_value(&rows)?, json)?;
        }
        ModelCommand::Report { name, version } => {
            let engine = global.open_existing()?;
            let detail = engine.models().detail(&name, version)?;
            crate::print_json(&detail)?;
        }
        ModelCommand::Retrain { names } => {
            let engine = global.open_existing()?;
            let now = global.now_ms()?;
            let names = if names.is_empty() {
                engine
                    .model_set()?
                    .models()
                    .map(|m| m.name.clone())
                    .collect()
            } else {
                names
            };
            anyhow::ensure!(!names.is_empty(), "no models to retrain");
            for name in names {
                engine.retrain(&name, now)?;
                let summary = engine.models().active_model(&name)?.summary(true);
                print_retrained(&serde_json::to_value(&summary)?);
            }
        }
        ModelCommand::Activate { name, version } => {
            let engine = global.open_existing()?;
            engine.activate_model(&name, version, global.now_ms()?)?;
            println!("{name}: version {version} is active");
        }
        ModelCommand::Dbscan {
            min_points,
            eps,
            sample,
            seed,
            json,
        } => {
            cible_core::models::validate_dbscan(min_points, eps, sample)
                .map_err(|e| anyhow::anyhow!(e.for_cli()))?;
            let engine = global.open_existing()?;
            let found = engine.density_clusters(global.now_ms()?, min_points, eps, sample, seed)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&found)?);
                return Ok(());
            }
            println!(
                "{} profiles; eps {:.3} (k-distance knee {:.3}, k = {}), DBSCAN on {} of them",
                found.profiles, found.eps, found.suggested_eps, found.min_points, found.sample
            );
            for cluster in &found.clusters {
                println!(
                    "cluster {} ({} profiles): {}",
                    cluster.id, cluster.size, cluster.description
                );
            }
            println!("noise: {} profiles", found.noise);
        }
        ModelCommand::Cluster {
            min_k,
            max_k,
            restarts,
            sample,
            seed,
            no_save,
            json,
        } => {
            let params = cible_core::models::ClusterParams {
                min_k,
                max_k,
                restarts,
                sample,
                seed,
            };
            params
                .validate()
                .map_err(|e| anyhow::anyhow!(e.for_cli()))?;
            let engine = global.open_existing()?;
            let now = global.now_ms()?;
            let (clustering, model) = engine.cluster(now, &params)?;
            if !no_save {
                let version = engine.save_model(model, now)?;
                eprintln!(
                    "stored as cluster version {version}: segments read cluster.id and cluster.name"
                );
            }
            if json {
                println!("{}", serde_json::to_string_pretty(&clustering)?);
                return Ok(());
            }
            println!(
                "{} profiles, {} features (log1p, then z-scores); k = {} by silhouette ({:.3})",
                clustering.profiles,
                clustering.features.len(),
                clustering.k,
                clustering.silhouette
            );
            println!("\n  k  inertia        silhouette");
            for c in &clustering.curve {
                println!("  {:<2} {:<14.1} {:.3}", c.k, c.inertia, c.silhouette);
            }
            println!();
            for cluster in &clustering.clusters {
                println!(
                    "cluster {} ({} profiles): {}",
                    cluster.id, cluster.size, cluster.description
                );
            }
        }
    }
    Ok(())
}

fn print_propensity(report: &cible_core::models::propensity::PropensityReport) {
    println!(
        "{} ({:?}, {:?} within {} days); features as of {}; {} profiles to train, {} held out; {:.2} s",
        report.model,
        report.algorithm,
        report.target,
        report.horizon_days,
        cible_core::time::format_ms(report.cutoff),
        report.train,
        report.test,
        report.training_seconds
    );
    println!(
        "AUC {:.3}; log loss {:.4} (base rate {:.3} alone: {:.4})",
        report.auc, report.log_loss, report.base_rate, report.log_loss_base
    );
    println!("\ncalibration (held out)\n  predicted     n       mean    observed");
    for bin in report.calibration.iter().filter(|b| b.count > 0) {
        println!(
            "  {:.1}-{:.1}  {:>7}  {:.3}   {:.3}",
            bin.from, bin.to, bin.count, bin.mean_predicted, bin.observed_rate
        );
    }
    println!("\nstrongest features");
    for (name, weight) in report.importance.iter().take(8) {
        println!("  {name:<24} {weight:+.3}");
    }
}

fn print_summaries(rows: &serde_json::Value, json: bool) -> anyhow::Result<()> {
    if json {
        crate::print_json(rows)?;
        return Ok(());
    }
    let rows = rows.as_array().cloned().unwrap_or_default();
    if rows.is_empty() {
        println!("no models yet: try `cible model cluster` or `cible model train`");
    }
    let text = |value: &serde_json::Value| value.as_str().unwrap_or_default().to_string();
    for row in rows {
        let traits: Vec<String> = row["traits"]
            .as_array()
            .into_iter()
            .flatten()
            .map(text)
            .collect();
        println!(
            "{:<16} v{:<3} {:<14} trained {}  {:<28} {}{}",
            text(&row["name"]),
            row["version"].to_string(),
            text(&row["algorithm"]),
            text(&row["trained_at"]),
            text(&row["quality"]),
            traits.join(", "),
            if row["active"] == true {
                "  (active)"
            } else {
                ""
            },
        );
    }
    Ok(())
}

fn print_retrained(summary: &serde_json::Value) {
    println!(
        "{}: version {}, {}, trained in {:.1} s",
        summary["name"].as_str().unwrap_or_default(),
        summary["version"],
        summary["quality"].as_str().unwrap_or_default(),
        summary["training_seconds"].as_f64().unwrap_or_default()
    );
}

/// `cible model list|report|retrain|activate` through the running server (training and
/// clustering, long and with reports of their own, run through `POST /api/models`).
fn run_remote(remote: &crate::local::Remote, command: ModelCommand) -> anyhow::Result<()> {
    let escape = crate::local::escape;
    match command {
        ModelCommand::List { name, json } => {
            let path = match &name {
                Some(name) => format!("/api/models/{}/versions", escape(name)),
                None => "/api/models".to_string(),
            };
            print_summaries(&remote.call("GET", &path, None)?, json)?;
        }
        ModelCommand::Report { name, version } => {
            let mut path = format!("/api/models/{}", escape(&name));
            if let Some(version) = version {
                path.push_str(&format!("?version={version}"));
            }
            crate::print_json(&remote.call("GET", &path, None)?)?;
        }
        ModelCommand::Retrain { names } => {
            let names: Vec<String> = if names.is_empty() {
                remote
                    .call("GET", "/api/models", None)?
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(|m| m["name"].as_str().map(str::to_string))
                    .collect()
            } else {
                names
            };
            anyhow::ensure!(!names.is_empty(), "no models to retrain");
            for name in names {
                let path = format!("/api/models/{}/retrain", escape(&name));
                print_retrained(&remote.call("POST", &path, None)?["model"]);
            }
        }
        ModelCommand::Activate { name, version } => {
            let path = format!("/api/models/{}/activate", escape(&name));
            remote.call(
                "POST",
                &path,
                Some(&serde_json::json!({"version": version})),
            )?;
            println!("{name}: version {version} is active");
        }
        _ => anyhow::bail!(
            "a server holds this data directory ({}): train through POST /api/models, or stop it",
            remote.info.address
        ),
    }
    Ok(())
}
