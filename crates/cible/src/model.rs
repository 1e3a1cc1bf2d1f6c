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
}

pub fn run(global: &Global, command: ModelCommand) -> anyhow::Result<()> {
    match command {
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
