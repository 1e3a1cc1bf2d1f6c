//! `cible-bench --suite cohort`: the weekly cohort retention table over every profile, through
//! the CLI (beside a running server, and on the store alone) and in the engine, against DuckDB
//! computing the same table in SQL (`tests/sql/cohort_retention.py`, the integration test's
//! reference) on the same events in the same run; the two tables must be equal.

use std::io::Write;
use std::time::Instant;

use cible_core::analysis::retention::Period;
use cible_core::engine::RetentionQuery;

use crate::Global;
use crate::bench::{
    BenchArgs, Row, cli_first_and_median_ms, imported_data, print_header, print_table, run_python,
    spawn_server, speed_ratio, stop_server,
};

/// The DuckDB side; the same script checks the CLI's table in the integration test.
const COHORT_SQL: &str = include_str!("../../../tests/sql/cohort_retention.py");

/// The events `cible export events --purpose analytics` would write, in the SQL layout's CSV
/// (profile, ts, event, properties; gzip), without the properties (the query reads none).
fn export_events(engine: &cible_core::Engine, path: &std::path::Path) -> anyhow::Result<u64> {
    let analytics = engine.consent_check("analytics")?;
    let mut out = csv::Writer::from_writer(flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(path)?),
        flate2::Compression::fast(),
    ));
    let mut failed = None;
    let mut written = 0u64;
    engine.for_each_event(|event| {
        if !analytics.permits(event.profile) {
            return Ok(());
        }
        written += 1;
        let message = &event.message;
        let record = [
            event.profile.to_string(),
            message.timestamp.div_euclid(1000).to_string(),
            message.behavioral_name().unwrap_or("").to_string(),
            "{}".to_string(),
        ];
        if let Err(error) = out.write_record(&record) {
            failed.get_or_insert(error);
        }
        Ok(())
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    let mut file = out
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", path.display()))?
        .finish()?;
    file.flush()?;
    Ok(written)
}

/// (start, counts) of every cohort of a table in JSON (cible's or DuckDB's).
fn cells(table: &serde_json::Value) -> Vec<(String, Vec<u64>)> {
    table["cohorts"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|cohort| {
            (
                cohort["start"].as_str().unwrap_or_default().to_string(),
                cohort["counts"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter_map(serde_json::Value::as_u64)
                    .collect(),
            )
        })
        .collect()
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, end_ms, engine) = imported_data(global, args)?;
    std::fs::remove_file(&file)?;
    let events = engine.load_stats().events;
    let profiles = engine.live_profiles().len();
    let weekly = RetentionQuery {
        period: Period::Week,
        active: None,
        segment: None,
    };

    eprintln!("computing the weekly table in the engine (3 times) ...");
    let mut engine_times = Vec::new();
    let mut table = None;
    for _ in 0..3 {
        let started = Instant::now();
        table = Some(engine.cohort_retention(&weekly, end_ms)?);
        engine_times.push(started.elapsed().as_secs_f64());
    }
    engine_times.sort_by(f64::total_cmp);
    let table = serde_json::to_value(table.expect("computed three times"))?;
    let mut other_periods = Vec::new();
    for period in [Period::Day, Period::Month] {
        let started = Instant::now();
        engine.cohort_retention(
            &RetentionQuery {
                period,
                ..weekly.clone()
            },
            end_ms,
        )?;
        other_periods.push(format!(
            "{} {:.3}",
            period.name(),
            started.elapsed().as_secs_f64()
        ));
    }

    eprintln!("exporting the events for DuckDB ...");
    let events_file = work.path().join("events.csv.gz");
    let exported = export_events(&engine, &events_file)?;
    // The CLI opens the store itself: the engine closes (and writes the hot store's snapshot).
    drop(engine);
    let data = work.path().join("store");

    eprintln!("running the weekly table on duckdb ...");
    let now_s = end_ms.div_euclid(1000).to_string();
    let answer = run_python(
        work.path(),
        ("cohort_retention.py", COHORT_SQL),
        &[
            events_file.as_os_str(),
            std::ffi::OsStr::new("week"),
            std::ffi::OsStr::new(&now_s),
        ],
        "the DuckDB cohort table",
    )?;
    let sql_s = answer["seconds"].as_f64().unwrap_or(f64::NAN);
    anyhow::ensure!(
        cells(&answer) == cells(&table),
        "DuckDB's weekly table differs from cible's"
    );
    let n_cohorts = cells(&table).len();

    eprintln!("the CLI on the store alone (6 runs) ...");
    let command = ["cohort", "retention", "--period", "week", "--json"];
    let (alone_first, alone_median) = cli_first_and_median_ms(&data, end_ms, &command)?;
    eprintln!("the CLI beside a running server (6 runs) ...");
    let (mut server, _) = spawn_server(&data, end_ms)?;
    let served = cli_first_and_median_ms(&data, end_ms, &command);
    stop_server(&mut server)?;
    let (served_first, served_median) = served?;
    let served_s = served_median / 1000.0;

    print_header(
        "cohort",
        &generated,
        events,
        profiles,
        &format!(
            " ({exported} events exported for DuckDB, {n_cohorts} weekly cohorts, tables equal)"
        ),
        args.days,
    );
    print_table(
        "",
        vec![
            Row {
                measure: "weekly cohort table, `cible cohort retention --json` beside a running server (s)",
                value: format!(
                    "{served_s:.3} (median of 5 after a first at {:.3}; process start and HTTP included)",
                    served_first / 1000.0
                ),
                baseline: format!(
                    "{sql_s:.2} (DuckDB, the same table in SQL; query only, loading excluded)"
                ),
                ratio: speed_ratio(served_s, sql_s),
                target: ">= 5x faster than DuckDB at 1M profiles / 100M events",
            },
            Row {
                measure: "the same in the engine (s)",
                value: format!(
                    "{:.3} (median of 3: {:.3} to {:.3}); {}",
                    engine_times[1],
                    engine_times[0],
                    engine_times[2],
                    other_periods.join(", ")
                ),
                baseline: format!("{sql_s:.2}"),
                ratio: speed_ratio(engine_times[1], sql_s),
                target: "-",
            },
            Row {
                measure: "the same command on the store alone (s)",
                value: format!(
                    "{:.2} (median of 5 after a first at {:.2}; opening the store and loading the hot store included)",
                    alone_median / 1000.0,
                    alone_first / 1000.0
                ),
                baseline: format!("{sql_s:.2}"),
                ratio: speed_ratio(alone_median / 1000.0, sql_s),
                target: "report",
            },
        ],
    );
    Ok(())
}
