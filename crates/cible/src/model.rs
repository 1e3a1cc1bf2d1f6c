//! `cible model`: clustering of profiles on their feature vectors.

use clap::Subcommand;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum ModelCommand {
    /// k-means on every profile's standardized features, k chosen by silhouette; prints the
    /// elbow curve and each cluster described in plain words.
    Cluster {
        /// Smallest k tried.
        #[arg(long, default_value_t = 2)]
        min_k: usize,
        /// Largest k tried.
        #[arg(long, default_value_t = 8)]
        max_k: usize,
        /// k-means++ restarts per k (the lowest inertia is kept).
        #[arg(long, default_value_t = 4)]
        restarts: usize,
        /// Rows the silhouette is computed on (all of them when fewer).
        #[arg(long, default_value_t = 2000)]
        sample: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// DBSCAN on the same features; eps is suggested from the k-distance curve unless given.
    Dbscan {
        /// Neighbours (the row included) that make a core row.
        #[arg(long, default_value_t = 10)]
        min_points: usize,
        /// Neighbourhood radius in standardized units; the k-distance knee when absent.
        #[arg(long)]
        eps: Option<f64>,
        /// Rows DBSCAN runs on; the others join the nearest core row's cluster within eps.
        #[arg(long, default_value_t = 5000)]
        sample: usize,
        #[arg(long, default_value_t = 1)]
        seed: u64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Logistic regression predicting purchase, open or churn in the next N days, trained on a
    /// time split; prints AUC, log loss, a calibration table and feature importance.
    Train {
        /// What to predict.
        #[arg(long, value_enum)]
        target: TargetArg,
        /// Horizon in days: features as of now minus this, labels after.
        #[arg(long, default_value_t = 30)]
        days: u32,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
pub enum TargetArg {
    Purchase,
    Open,
    Churn,
}

pub fn run(global: &Global, command: ModelCommand) -> anyhow::Result<()> {
    match command {
        ModelCommand::Train { target, days, json } => {
            anyhow::ensure!(days >= 1, "--days must be at least 1");
            use cible_core::models::propensity::Target;
            let target = match target {
                TargetArg::Purchase => Target::Purchase,
                TargetArg::Open => Target::Open,
                TargetArg::Churn => Target::Churn,
            };
            let engine = global.open_existing()?;
            let report = engine.train_propensity(target, days, global.now_ms()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            println!(
                "{:?} within {} days; features as of {}; {} profiles to train, {} held out",
                report.target,
                report.horizon_days,
                cible_core::time::format_ms(report.cutoff),
                report.train,
                report.test
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
            println!("\nstrongest features (standardized weight)");
            for (name, weight) in report.importance.iter().take(8) {
                println!("  {name:<24} {weight:+.3}");
            }
        }
        ModelCommand::Dbscan {
            min_points,
            eps,
            sample,
            seed,
            json,
        } => {
            anyhow::ensure!(min_points >= 2, "--min-points must be at least 2");
            if let Some(eps) = eps {
                anyhow::ensure!(eps > 0.0, "--eps must be positive, found {eps}");
            }
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
            json,
        } => {
            anyhow::ensure!(
                min_k >= 2 && min_k <= max_k,
                "--min-k must be at least 2 and at most --max-k"
            );
            let engine = global.open_existing()?;
            let clustering =
                engine.cluster(global.now_ms()?, min_k..=max_k, restarts, sample, seed)?;
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
