//! `cible cohort retention`, `cible segment overlap` and `cible segment history --every`: the
//! analysis the engine computes (`cible_core::analysis`), printed as tables or as the JSON the
//! API answers (`analysis_api.rs`), on the store or through the server holding it.

use cible_core::analysis::overlap::Overlap;
use cible_core::analysis::retention::{Period, RetentionTable};
use cible_core::analysis::series::{Every, SizeSeries};
use clap::{Args, Subcommand, ValueEnum};

use crate::Global;
use crate::local::escape;

#[derive(Debug, Subcommand)]
pub enum CohortCommand {
    /// Cohort retention: profiles grouped by the period of their first active event, and the
    /// share of each cohort active in every period after (only profiles whose consent permits
    /// `analytics`).
    Retention(RetentionArgs),
}

#[derive(Debug, Args)]
pub struct RetentionArgs {
    /// Period length: UTC days, ISO weeks (starting Monday) or calendar months.
    #[arg(long, value_enum, default_value = "week")]
    period: PeriodArg,
    /// Event names that count as activity, comma-separated (default: every track, page and
    /// screen event; identify, alias and group messages never count).
    #[arg(long, value_delimiter = ',')]
    active: Option<Vec<String>>,
    /// Only the current members of this segment.
    #[arg(long)]
    segment: Option<String>,
    /// Print the JSON the API answers.
    #[arg(long)]
    json: bool,
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum PeriodArg {
    Day,
    Week,
    Month,
}

impl From<PeriodArg> for Period {
    fn from(period: PeriodArg) -> Self {
        match period {
            PeriodArg::Day => Period::Day,
            PeriodArg::Week => Period::Week,
            PeriodArg::Month => Period::Month,
        }
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum EveryArg {
    Hour,
    Day,
}

impl From<EveryArg> for Every {
    fn from(every: EveryArg) -> Self {
        match every {
            EveryArg::Hour => Every::Hour,
            EveryArg::Day => Every::Day,
        }
    }
}

pub fn cohort(global: &Global, command: CohortCommand) -> anyhow::Result<()> {
    let CohortCommand::Retention(args) = command;
    let active = args.active.map(|names| {
        names
            .iter()
            .map(|name| name.trim().to_string())
            .filter(|name| !name.is_empty())
            .collect::<Vec<_>>()
    });
    let period = Period::from(args.period);
    let table: RetentionTable = match global.open_or_remote(false)? {
        crate::Opened::Local(engine) => engine.cohort_retention(
            &cible_core::engine::RetentionQuery {
                period,
                active,
                segment: args.segment,
            },
            global.now_ms()?,
        )?,
        crate::Opened::Remote(remote) => {
            let mut path = format!("/api/cohorts/retention?period={}", period.name());
            if let Some(active) = &active {
                let names: Vec<String> = active.iter().map(|n| escape(n)).collect();
                path.push_str(&format!("&active={}", names.join(",")));
            }
            if let Some(segment) = &args.segment {
                path.push_str(&format!("&segment={}", escape(segment)));
            }
            serde_json::from_value(remote.call("GET", &path, None)?)?
        }
    };
    if args.json {
        return crate::print_json(&table);
    }
    print_retention(&table);
    Ok(())
}

fn print_retention(table: &RetentionTable) {
    let active = match &table.active {
        None => "any event".to_string(),
        Some(names) => names.join(", "),
    };
    let within = table
        .segment
        .as_ref()
        .map_or(String::new(), |s| format!(" of segment {s}"));
    println!(
        "retention by {} (active: {active}) at {}: {} profiles{within} permitted by analytics consent, {} active",
        table.period.name(),
        table.at,
        table.profiles,
        table.active_profiles
    );
    let width = table
        .cohorts
        .iter()
        .map(|c| c.counts.len())
        .max()
        .unwrap_or(0);
    let mut header = format!("{:<10}  {:>8}", "cohort", "size");
    for k in 0..width {
        header.push_str(&format!("  {:>6}", format!("+{k}")));
    }
    println!("{header}");
    for cohort in &table.cohorts {
        let mut line = format!("{:<10}  {:>8}", cohort.start, cohort.size);
        for share in &cohort.shares {
            line.push_str(&format!("  {:>5.1}%", share * 100.0));
        }
        println!("{line}");
    }
}

/// `cible segment overlap A B C`.
pub fn overlap(global: &Global, names: Vec<String>, json: bool) -> anyhow::Result<()> {
    let result: Overlap = match global.open_or_remote(true)? {
        crate::Opened::Local(engine) => engine.segment_overlap(&names)?,
        crate::Opened::Remote(remote) => {
            let names: Vec<String> = names.iter().map(|n| escape(n)).collect();
            let path = format!("/api/segments/overlap?names={}", names.join(","));
            serde_json::from_value(remote.call("GET", &path, None)?)?
        }
    };
    if json {
        return crate::print_json(&result);
    }
    let width = result
        .segments
        .iter()
        .map(|s| s.name.len())
        .max()
        .unwrap_or(0)
        .max(7);
    println!("{:<width$}  {:>9}", "segment", "size");
    for segment in &result.segments {
        println!("{:<width$}  {:>9}", segment.name, segment.size);
    }
    println!();
    println!(
        "{:<width$}  {:<width$}  {:>9}  {:>9}  {:>7}",
        "a", "b", "both", "either", "jaccard"
    );
    for pair in &result.pairs {
        println!(
            "{:<width$}  {:<width$}  {:>9}  {:>9}  {:>7.4}",
            pair.a, pair.b, pair.intersection, pair.union, pair.jaccard
        );
    }
    Ok(())
}

/// `cible segment history NAME --every hour|day`: one point per bucket.
pub fn print_series(series: &SizeSeries, json: bool) -> anyhow::Result<()> {
    if json {
        return crate::print_json(series);
    }
    for point in &series.points {
        println!("{}  {:>9}", point.t, point.size);
    }
    Ok(())
}

/// The bucketed history through the server.
pub fn remote_series(
    remote: &crate::local::Remote,
    name: &str,
    every: Every,
) -> anyhow::Result<SizeSeries> {
    let every = match every {
        Every::Hour => "hour",
        Every::Day => "day",
    };
    let path = format!("/api/segments/{}/history?every={every}", escape(name));
    Ok(serde_json::from_value(remote.call("GET", &path, None)?)?)
}
