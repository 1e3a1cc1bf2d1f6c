//! `cible-bench --suite traits`: recomputing every computed trait of every profile, against
//! DuckDB computing the engagement score and RFM in SQL on the same data in the same run, and
//! the incremental cost of keeping computed-trait segments exact as events arrive.

use std::time::Instant;

use crate::Global;
use crate::bench::{
    BenchArgs, Row, export_sql_tables, imported_data, incremental_row, print_header, print_table,
    run_sql_baseline, speed_ratio, tail_lines,
};

/// Engagement (weighted decayed sum, percentile) and RFM (recency, frequency, monetary,
/// quintiles) in SQL, with the default configuration: the two population traits a SQL engine
/// would compute. Every column is used by the filter so that none is pruned.
fn traits_sql(config: &cible_core::computed::config::TraitConfig, now_s: i64) -> String {
    let weights: Vec<String> = config
        .engagement
        .weights
        .iter()
        .map(|(name, w)| format!("('{}', {w})", name.replace('\'', "''")))
        .collect();
    let half_life = config.engagement.half_life_days * 86_400.0;
    let window = i64::from(config.rfm.window_days) * 86_400;
    format!(
        "WITH w(event, weight) AS (VALUES {weights}),
         eng AS (SELECT e.profile, SUM(w.weight * pow(2, (e.ts - {now_s}) / {half_life})) AS engagement
                 FROM events e JOIN w ON e.event = w.event WHERE e.ts <= {now_s} GROUP BY e.profile),
         rfm AS (SELECT profile, ({now_s} - MAX(ts)) / 86400.0 AS recency, COUNT(*) AS frequency,
                        SUM(COALESCE(TRY_CAST(json_extract_string(properties, '$.revenue') AS DOUBLE), 0)) AS monetary
                 FROM events WHERE event = '{order}' AND ts > {now_s} - {window} AND ts <= {now_s}
                 GROUP BY profile),
         scored AS (SELECT p.profile,
                           ntile(100) OVER (ORDER BY eng.engagement) AS engagement_pct,
                           6 - ntile(5) OVER (ORDER BY rfm.recency) AS r,
                           ntile(5) OVER (ORDER BY rfm.frequency) AS f,
                           ntile(5) OVER (ORDER BY rfm.monetary) AS m
                    FROM profiles p LEFT JOIN eng ON eng.profile = p.profile
                    LEFT JOIN rfm ON rfm.profile = p.profile)
         SELECT profile FROM scored
         WHERE engagement_pct >= 0 OR r >= 1 OR f >= 1 OR m >= 1 OR profile >= 0",
        weights = weights.join(", "),
        order = config.rfm.order_event.replace('\'', "''"),
    )
}

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, end_ms, engine) = imported_data(global, args)?;
    let tail = tail_lines(&file, 200_000)?;
    std::fs::remove_file(&file)?;
    let events = engine.load_stats().events;
    let profiles = engine.live_profiles();

    eprintln!("calibrating ...");
    // The category column is built on first use; timed apart (it is kept afterwards).
    let started = Instant::now();
    engine.ensure_column_indexes(&[cible_core::computed::CATEGORY_KEY as u8], true)?;
    let setup_s = started.elapsed().as_secs_f64();
    eprintln!("recomputing every trait of every profile (3 times) ...");
    let mut times = Vec::new();
    let mut lifecycle_count = 0;
    for _ in 0..3 {
        let started = Instant::now();
        let (_, all) = engine.recompute_traits(end_ms)?;
        times.push(started.elapsed().as_secs_f64());
        lifecycle_count = all.iter().filter(|t| t.lifecycle.is_some()).count();
    }
    times.sort_by(f64::total_cmp);
    let recompute = times[1];
    // The traits alone, against the stored calibration (what a profile view or export does).
    let started = Instant::now();
    engine.computed_traits_of(&profiles, end_ms)?;
    let traits_only_s = started.elapsed().as_secs_f64();

    eprintln!("building the product model ...");
    let started = Instant::now();
    let model = engine.build_product_model(end_ms)?;
    let model_s = started.elapsed().as_secs_f64();

    eprintln!("exporting for DuckDB ...");
    let (events_file, profiles_file) = export_sql_tables(&engine, work.path(), end_ms)?;
    let queries = std::collections::BTreeMap::from([(
        "traits".to_string(),
        traits_sql(engine.trait_config(), end_ms.div_euclid(1000)),
    )]);
    eprintln!("running the SQL on duckdb ...");
    let answer = run_sql_baseline(
        work.path(),
        "duckdb",
        &events_file,
        &profiles_file,
        &queries,
    )?;
    let sql_s = answer["seconds"].as_f64().unwrap_or(f64::NAN);
    let sql_rows = answer["members"]["traits"].as_array().map_or(0, Vec::len);
    anyhow::ensure!(
        sql_rows == profiles.len(),
        "DuckDB scored {sql_rows} profiles, cible {}",
        profiles.len()
    );

    eprintln!("measuring the incremental cost ...");
    // Live segments on computed traits: the seven lifecycle stages and two mixed rules.
    engine.ensure_lifecycle_segments(end_ms)?;
    for (name, rule) in [
        (
            "bench-intent",
            r#"intent.level = "high" and score.engagement >= 60"#,
        ),
        (
            "bench-rfm",
            r#"rfm.segment in ("champions", "loyal") and affinity.category = "shoes""#,
        ),
    ] {
        let expr = cible_lang::parse(rule).map_err(|d| anyhow::anyhow!(d.message))?;
        engine.create_segment(name, expr, rule, end_ms)?;
    }
    let incremental = incremental_row(
        "incremental: ingest + 9 computed-trait segments (ms per batch)",
        &engine,
        &tail,
        args.latency_batch,
        end_ms,
    )?;

    print_header("traits", &generated, events, profiles.len(), "", args.days);
    print_table(
        "",
        vec![
            Row {
                measure: "recompute every computed trait of every profile (s)",
                value: format!(
                    "{recompute:.3} (calibration and traits in one pass, median of 3: {:.3} to {:.3}; traits alone {traits_only_s:.3}; {lifecycle_count} profiles with a stage)",
                    times[0], times[2]
                ),
                baseline: format!(
                    "{sql_s:.2} (DuckDB: engagement percentile and RFM quintiles only, queries only)"
                ),
                ratio: speed_ratio(recompute, sql_s),
                target: "<= 3 s at 1M profiles / 100M events",
            },
            incremental,
            Row {
                measure: "category column, built once (s)",
                value: format!("{setup_s:.2}"),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "-",
            },
            Row {
                measure: "product model from full messages (s)",
                value: format!(
                    "{model_s:.2} ({} categories, {} viewed products)",
                    model.top.len(),
                    model.also_bought.len()
                ),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "report",
            },
        ],
    );
    Ok(())
}
