//! `cible traits`: the computed-traits configuration, calibration and per-profile values.

use clap::Subcommand;

use crate::Global;

#[derive(Debug, Subcommand)]
pub enum TraitsCommand {
    /// Print the effective configuration (traits.toml in the data directory, else the defaults)
    /// as TOML: a starting point for your own file.
    Config,
    /// Recompute the population calibration (engagement percentiles, RFM quintiles, best send
    /// time) and the product model, create the lifecycle segments, re-evaluate segments.
    Refresh {
        /// Print the report as JSON.
        #[arg(long)]
        json: bool,
    },
    /// Every computed trait of one profile.
    Show {
        /// Profile number, userId, anonymousId or e-mail.
        id: String,
    },
}

pub fn run(global: &Global, command: TraitsCommand) -> anyhow::Result<()> {
    match command {
        TraitsCommand::Config => {
            // The file is checked on open: a bad one is reported with its field.
            let engine = global.open_existing()?;
            print!("{}", engine.trait_config().to_toml());
        }
        TraitsCommand::Refresh { json } => {
            let engine = global.open_existing()?;
            let report = engine.refresh_traits(global.now_ms()?)?;
            if json {
                println!("{}", serde_json::to_string_pretty(&report)?);
                return Ok(());
            }
            let c = &report.calibration;
            println!(
                "calibrated {} profiles ({} customers) in {:.2} s",
                c.profiles, c.customers, report.calibration_seconds
            );
            println!(
                "  RFM quintile breakpoints: recency days {:?}, orders {:?}, revenue {:?}",
                c.recency, c.frequency, c.monetary
            );
            println!(
                "  population send time: {:02}:00 UTC, weekday {}",
                c.hour, c.weekday
            );
            println!(
                "product model: {} ranked products in {:.2} s",
                report.products, report.product_model_seconds
            );
            for name in &report.created_segments {
                println!("created segment {name}");
            }
        }
        TraitsCommand::Show { id } => {
            let engine = global.open_existing()?;
            let profile = engine
                .lookup_profile(&id)
                .ok_or_else(|| anyhow::anyhow!("no profile {id:?}"))?
                .profile;
            let traits = engine.computed_traits(profile, global.now_ms()?)?;
            println!("{}", serde_json::to_string_pretty(&traits)?);
        }
    }
    Ok(())
}
