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
    if let Some(remote) = global.running_server() {
        return run_remote(&remote, command);
    }
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
                crate::print_json(&report)?;
                return Ok(());
            }
            print_refresh(&serde_json::to_value(&report)?);
        }
        TraitsCommand::Show { id } => {
            let engine = global.open_existing()?;
            let profile = engine
                .lookup_profile(&id)
                .ok_or_else(|| anyhow::anyhow!("no profile {id:?}"))?
                .profile;
            let traits = engine.computed_traits(profile, global.now_ms()?)?;
            // As a JSON value, like the server's answer: the same output either way.
            crate::print_json(&traits)?;
        }
    }
    Ok(())
}

/// `traits refresh` as text, from its report's JSON (the same locally and through a server).
fn print_refresh(report: &serde_json::Value) {
    let c = &report["calibration"];
    let list = |value: &serde_json::Value| {
        let items: Vec<String> = value
            .as_array()
            .into_iter()
            .flatten()
            .map(|v| v.to_string())
            .collect();
        format!("[{}]", items.join(", "))
    };
    println!(
        "calibrated {} profiles ({} customers) in {:.2} s",
        c["profiles"],
        c["customers"],
        report["calibration_seconds"].as_f64().unwrap_or_default()
    );
    println!(
        "  RFM quintile breakpoints: recency days {}, orders {}, revenue {}",
        list(&c["recency"]),
        list(&c["frequency"]),
        list(&c["monetary"])
    );
    println!(
        "  population send time: {:02}:00 UTC, weekday {}",
        c["hour"].as_u64().unwrap_or_default(),
        c["weekday"]
    );
    println!(
        "product model: {} ranked products in {:.2} s",
        report["products"],
        report["product_model_seconds"].as_f64().unwrap_or_default()
    );
    for name in report["created_segments"].as_array().into_iter().flatten() {
        println!("created segment {}", name.as_str().unwrap_or_default());
    }
}

/// `cible traits ...` through the running server.
fn run_remote(remote: &crate::local::Remote, command: TraitsCommand) -> anyhow::Result<()> {
    match command {
        TraitsCommand::Config => {
            let config: cible_core::computed::config::TraitConfig =
                serde_json::from_value(remote.call("GET", "/api/traits/config", None)?)?;
            print!("{}", config.to_toml());
        }
        TraitsCommand::Refresh { json } => {
            let report = remote.call("POST", "/api/traits/refresh", None)?;
            if json {
                crate::print_json(&report)?;
            } else {
                print_refresh(&report);
            }
        }
        TraitsCommand::Show { id } => {
            let path = format!("/api/profiles/{}/traits", crate::local::escape(&id));
            crate::print_json(&remote.call("GET", &path, None)?)?;
        }
    }
    Ok(())
}
