//! `cible-bench`: measures what issue targets name, each beside a baseline measured in the same
//! run on the same data, and prints a Markdown table (the one kept in `docs/benchmarks.md`).
//!
//! | measure | baseline |
//! |---|---|
//! | bulk import of JSON Lines | parsing the same lines into JSON values on the same cores |
//! | HTTP batch ingestion, durable acks | in-process ingestion of the same batches, one fsync each |
//! | hot-store bytes per event | the JSON Lines bytes per event |
//! | restart (open + rebuild) | reading and parsing the JSON Lines file |

use std::sync::Arc;
use std::time::Instant;

use anyhow::Context;
use cible_core::generate::GenerateOptions;
use cible_core::keys::KeyKind;
use cible_core::message::{ParseContext, parse_message_text};
use cible_core::{Durability, Engine, Incoming};
use clap::Args;
use rayon::prelude::*;

use crate::Global;

#[derive(Debug, Args)]
pub struct BenchArgs {
    /// People in the generated data (about 120 messages each over 90 days).
    #[arg(long, default_value_t = 20_000)]
    pub profiles: u64,
    /// Days of generated history.
    #[arg(long, default_value_t = 90)]
    pub days: u32,
    /// Messages sent through HTTP (taken from the generated data).
    #[arg(long, default_value_t = 500_000)]
    http_messages: usize,
    /// Concurrent HTTP clients.
    #[arg(long, default_value_t = 4)]
    clients: usize,
    /// Where to put the temporary stores (a fresh directory inside it).
    #[arg(long, default_value = ".")]
    pub dir: std::path::PathBuf,
    /// What to measure: collect (import, HTTP, memory, restart), segments (batch rebuild
    /// against an SQL engine, event-to-membership latency), traits (recomputing computed
    /// traits against DuckDB, incremental cost), models (k-means, DBSCAN, logistic regression
    /// and boosted trees against scikit-learn and LightGBM), spine (acks with and without admin
    /// work, event to change on the feed's stream, CLI latency alone and beside a server) or
    /// storage (`cible import` beside DuckDB loading the same file: speed, bytes written, size
    /// on disk; commands after the import; restart) or ingest (`cible serve`'s `/v1/batch` with
    /// 20 live segments beside a sink on the same cores: 400 KB and 20-message batches, ack
    /// latency at 50,000 messages/s) or privacy (erasure of one person through the CLI and a
    /// server beside a removal; consent checks on a segment rebuild), webhooks (deliveries
    /// per second to a loopback receiver beside its ceiling; event to webhook received at 10k
    /// changes/s; `--profiles` changes are delivered) or cohort (the weekly cohort retention
    /// table through the CLI against DuckDB computing it in SQL).
    #[arg(long, value_enum, default_value = "collect")]
    suite: Suite,
    /// Events per batch in the latency measurement (at 50k events/s, 100 events is a batch
    /// every 2 ms).
    #[arg(long, default_value_t = 100)]
    pub latency_batch: usize,
    /// The SQL engine the segment rebuild is compared with (Python module: `scripts/bench`
    /// installs DuckDB).
    #[arg(long, value_enum, default_value = "duckdb")]
    pub baseline: Baseline,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Baseline {
    Sqlite,
    Duckdb,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Suite {
    Collect,
    Segments,
    Traits,
    Models,
    Spine,
    Storage,
    Ingest,
    Privacy,
    Webhooks,
    Cohort,
}

pub(crate) struct Row {
    pub measure: &'static str,
    pub value: String,
    pub baseline: String,
    pub ratio: String,
    pub target: &'static str,
}

pub fn run(global: &Global, args: BenchArgs) -> anyhow::Result<()> {
    if args.suite == Suite::Segments {
        return segments(global, &args);
    }
    if args.suite == Suite::Traits {
        return crate::bench_traits::run(global, &args);
    }
    if args.suite == Suite::Models {
        return crate::bench_models::run(global, &args);
    }
    if args.suite == Suite::Spine {
        return crate::bench_spine::run(global, &args);
    }
    if args.suite == Suite::Storage {
        return crate::bench_storage::run(global, &args);
    }
    if args.suite == Suite::Ingest {
        return crate::bench_ingest::run(global, &args);
    }
    if args.suite == Suite::Privacy {
        return crate::bench_privacy::run(global, &args);
    }
    if args.suite == Suite::Webhooks {
        return crate::bench_webhooks::run(global, &args);
    }
    if args.suite == Suite::Cohort {
        return crate::bench_cohort::run(global, &args);
    }
    let now = global.now_ms()?;
    let (work, file, generated, _) = generate_data(global, &args, false)?;
    let text = std::fs::read_to_string(&file)?;
    let lines: Vec<&str> = text.lines().collect();
    let n = lines.len();
    let mut rows = Vec::new();

    // Bulk import vs. parsing alone.
    eprintln!("parsing {n} messages (baseline) ...");
    let started = Instant::now();
    let parsed = lines
        .par_iter()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    let parse_rate = n as f64 / started.elapsed().as_secs_f64();
    anyhow::ensure!(parsed == n, "generated data must be valid JSON");
    eprintln!("importing ...");
    let store = work.path().join("import");
    let (import_rate, events, hot_bytes) = {
        let engine = Engine::open(&store)?;
        let summary = cible_core::import::import_files(
            &engine,
            std::slice::from_ref(&file),
            now,
            &Arc::default(),
        )?;
        let hot = engine.hot();
        (
            summary.messages_per_second,
            hot.n_events(),
            hot.heap_bytes(),
        )
    };
    rows.push(Row {
        measure: "bulk import, JSON Lines (messages/s)",
        value: format!("{import_rate:.0}"),
        baseline: format!("{parse_rate:.0} (JSON parse only)"),
        ratio: format!("{:.2}", import_rate / parse_rate),
        target: ">= 1,000,000",
    });
    let json_bytes_per_event = generated.bytes as f64 / n as f64;
    let hot_per_event = hot_bytes as f64 / events as f64;
    rows.push(Row {
        measure: "hot store (bytes/event)",
        value: format!("{hot_per_event:.1}"),
        baseline: format!("{json_bytes_per_event:.0} (JSON Lines)"),
        ratio: format!("{:.3}", hot_per_event / json_bytes_per_event),
        target: "<= 20",
    });

    // Restart: open and rebuild vs. reading and parsing the source file.
    eprintln!("restarting ...");
    let started = Instant::now();
    let reopened = Engine::open(&store)?;
    let restart = started.elapsed().as_secs_f64();
    let restored = reopened.load_stats().events;
    drop(reopened);
    anyhow::ensure!(
        restored == events,
        "restart restored {restored} of {events} events"
    );
    let started = Instant::now();
    let reread = std::fs::read_to_string(&file)?;
    let reparsed = reread
        .par_lines()
        .filter(|l| serde_json::from_str::<serde_json::Value>(l).is_ok())
        .count();
    let reread_s = started.elapsed().as_secs_f64();
    anyhow::ensure!(reparsed == n);
    rows.push(Row {
        measure: "restart with all events (s)",
        value: format!("{restart:.2} ({events} events)"),
        baseline: format!("{reread_s:.2} (read + parse JSONL)"),
        ratio: format!("{:.2}", restart / reread_s),
        target: "10M events; 100M <= 15 s",
    });

    // HTTP ingestion with durable acks vs. the same batches in-process.
    let take = args.http_messages.min(n);
    let batches = batches_of(&lines[..take], 400 * 1024);
    eprintln!(
        "in-process ingestion of {take} messages in {} batches (baseline) ...",
        batches.len()
    );
    let in_process_rate = {
        let engine = Engine::open(&work.path().join("in-process"))?;
        let ctx = ParseContext::at(now);
        let started = Instant::now();
        for batch in &batches {
            let items: Vec<Incoming> = batch
                .par_iter()
                .map(|l| parse_message_text(l, &ctx).into())
                .collect();
            engine.ingest(items, "bench", Durability::Sync, now)?;
        }
        take as f64 / started.elapsed().as_secs_f64()
    };
    eprintln!("HTTP ingestion with {} clients ...", args.clients);
    let http_rate = http_ingest(&work.path().join("http"), &batches, take, args.clients, now)?;
    rows.push(Row {
        measure: "HTTP /v1/batch, durable acks (messages/s)",
        value: format!("{http_rate:.0}"),
        baseline: format!("{in_process_rate:.0} (in-process, fsync per batch)"),
        ratio: format!("{:.2}", http_rate / in_process_rate),
        target: ">= 200,000",
    });

    println!(
        "cible-bench: {n} messages, {} profiles, {} days, {} cores\n",
        args.profiles,
        args.days,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    println!("| measure | cible | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measure, row.value, row.baseline, row.ratio, row.target
        );
    }
    Ok(())
}

/// Generated data in a fresh directory under `--dir`: the directory, the JSON Lines file, what
/// was written, and the end of the history (midnight UTC of "now").
pub(crate) fn generate_data(
    global: &Global,
    args: &BenchArgs,
    gzip: bool,
) -> anyhow::Result<(
    tempfile::TempDir,
    std::path::PathBuf,
    cible_core::generate::GenerateStats,
    i64,
)> {
    let now = global.now_ms()?;
    let end_ms = now.div_euclid(cible_core::time::DAY_MS) * cible_core::time::DAY_MS;
    let work = tempfile::Builder::new()
        .prefix("cible-bench-")
        .tempdir_in(&args.dir)?;
    let file = work.path().join(if gzip {
        "events.jsonl.gz"
    } else {
        "events.jsonl"
    });
    let options = GenerateOptions {
        profiles: args.profiles,
        days: args.days,
        seed: 1,
        end_ms,
    };
    eprintln!(
        "generating {} profiles over {} days ...",
        args.profiles, args.days
    );
    let generated = cible_core::generate::write_file(&options, &file)?;
    Ok((work, file, generated, end_ms))
}

/// The last `n` lines of a JSON Lines file (gzip-compressed when it ends in `.gz`), streamed.
pub(crate) fn tail_lines(path: &std::path::Path, n: usize) -> anyhow::Result<Vec<String>> {
    use std::io::BufRead;
    let file = std::fs::File::open(path)?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(std::io::BufReader::new(flate2::read::MultiGzDecoder::new(
            file,
        )))
    } else {
        Box::new(std::io::BufReader::new(file))
    };
    let mut tail = std::collections::VecDeque::with_capacity(n + 1);
    for line in reader.lines() {
        tail.push_back(line?);
        if tail.len() > n {
            tail.pop_front();
        }
    }
    Ok(tail.into())
}

/// Segment batches of JSON lines under `limit` bytes each.
fn batches_of(lines: &[&str], limit: usize) -> Vec<Vec<String>> {
    let mut batches = Vec::new();
    let mut current = Vec::new();
    let mut size = 0;
    for line in lines {
        if size + line.len() + 1 > limit && !current.is_empty() {
            batches.push(std::mem::take(&mut current));
            size = 0;
        }
        size += line.len() + 1;
        current.push((*line).to_string());
    }
    if !current.is_empty() {
        batches.push(current);
    }
    batches
}

fn http_ingest(
    dir: &std::path::Path,
    batches: &[Vec<String>],
    n: usize,
    clients: usize,
    now: i64,
) -> anyhow::Result<f64> {
    let key = {
        let engine = Engine::open(dir)?;
        engine.create_key(KeyKind::Write, "bench", now)?
    };
    let (mut server, address) = spawn_server(dir, now)?;
    let bodies: Vec<String> = batches
        .iter()
        .map(|batch| format!("{{\"batch\":[{}]}}", batch.join(",")))
        .collect();
    let next = std::sync::atomic::AtomicUsize::new(0);
    let auth = basic_auth(&key);
    let url = format!("http://{address}/v1/batch");
    let started = Instant::now();
    std::thread::scope(|scope| -> anyhow::Result<()> {
        let workers: Vec<_> = (0..clients)
            .map(|_| {
                scope.spawn(|| -> anyhow::Result<()> {
                    let agent = ureq::AgentBuilder::new().build();
                    loop {
                        let index = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                        let Some(body) = bodies.get(index) else {
                            return Ok(());
                        };
                        loop {
                            match agent
                                .post(&url)
                                .set("Authorization", &auth)
                                .send_string(body)
                            {
                                Ok(_) => break,
                                Err(ureq::Error::Status(503, _)) => {
                                    std::thread::sleep(std::time::Duration::from_millis(5))
                                }
                                Err(error) => return Err(error).context("posting a batch"),
                            }
                        }
                    }
                })
            })
            .collect();
        for worker in workers {
            worker
                .join()
                .map_err(|_| anyhow::anyhow!("client panicked"))??;
        }
        Ok(())
    })?;
    let rate = n as f64 / started.elapsed().as_secs_f64();
    stop_server(&mut server)?;
    anyhow::ensure!(Engine::open(dir)?.load_stats().events > 0);
    Ok(rate)
}

/// The `cible` binary beside this one (`cargo build --release` builds both).
pub(crate) fn cible_exe() -> anyhow::Result<std::path::PathBuf> {
    let exe = std::env::current_exe()?
        .parent()
        .map(|dir| dir.join("cible"))
        .context("the directory of cible-bench")?;
    anyhow::ensure!(
        exe.is_file(),
        "{} not found: build it with `cargo build --release -p cible` (scripts/bench does)",
        exe.display()
    );
    Ok(exe)
}

/// Starts `cible serve` on `data` with "now" pinned, as a user runs it; returns the child and
/// the address it listens on.
pub(crate) fn spawn_server(
    data: &std::path::Path,
    now: i64,
) -> anyhow::Result<(std::process::Child, String)> {
    use std::io::BufRead;
    let mut child = std::process::Command::new(cible_exe()?)
        .arg("--data")
        .arg(data)
        .arg("--now")
        .arg((now / 1000).to_string())
        .args(["serve", "--listen", "127.0.0.1:0", "--retrain-days", "0"])
        .env("CIBLE_LOG", "warn")
        .stdout(std::process::Stdio::piped())
        .spawn()?;
    let stdout = child.stdout.take().context("the server's output")?;
    let mut lines = std::io::BufReader::new(stdout).lines();
    let address = loop {
        let line = lines
            .next()
            .context("the server stopped before listening")??;
        if let Some(address) = line.strip_prefix("cible listening on http://") {
            break address.to_string();
        }
    };
    std::thread::spawn(move || lines.for_each(drop));
    Ok((child, address))
}

/// Median wall time (ms) of a CLI command over 5 runs, process start included, after one run
/// that is not counted (a first open may do one-time work: recovery, a calibration).
pub(crate) fn cli_ms(data: &std::path::Path, now: i64, args: &[&str]) -> anyhow::Result<f64> {
    Ok(cli_first_and_median_ms(data, now, args)?.1)
}

/// The first run's wall time (ms) of a CLI command, and the median of the 5 after it.
pub(crate) fn cli_first_and_median_ms(
    data: &std::path::Path,
    now: i64,
    args: &[&str],
) -> anyhow::Result<(f64, f64)> {
    let exe = cible_exe()?;
    let mut times = Vec::new();
    for _ in 0..6 {
        let started = Instant::now();
        let output = std::process::Command::new(&exe)
            .arg("--data")
            .arg(data)
            .arg("--now")
            .arg((now / 1000).to_string())
            .args(args)
            .env("CIBLE_LOG", "warn")
            .output()?;
        anyhow::ensure!(
            output.status.success(),
            "cible {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&output.stderr)
        );
        times.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let first = times.remove(0);
    times.sort_by(f64::total_cmp);
    Ok((first, times[2]))
}

/// SIGTERM, and a clean exit.
pub(crate) fn stop_server(child: &mut std::process::Child) -> anyhow::Result<()> {
    std::process::Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()?;
    anyhow::ensure!(child.wait()?.success(), "the server stopped cleanly");
    Ok(())
}

/// The `Authorization` header value Segment clients send for a write key.
pub(crate) fn basic_auth(key: &str) -> String {
    use base64::Engine as _;
    format!(
        "Basic {}",
        base64::engine::general_purpose::STANDARD.encode(format!("{key}:"))
    )
}

/// The line above a suite's table: the data measured and the machine.
pub(crate) fn print_header(
    suite: &str,
    generated: &cible_core::generate::GenerateStats,
    events: usize,
    profiles: usize,
    what: &str,
    days: u32,
) {
    println!(
        "cible-bench --suite {suite}: {} messages, {events} events, {profiles} profiles{what}, {days} days, {} cores\n",
        generated.messages,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
}

pub(crate) fn print_table(title: &str, rows: Vec<Row>) {
    println!("{title}\n");
    println!("| measure | cible | baseline (same run) | ratio | target |");
    println!("|---|---|---|---|---|");
    for row in rows {
        println!(
            "| {} | {} | {} | {} | {} |",
            row.measure, row.value, row.baseline, row.ratio, row.target
        );
    }
}

/// Batch rebuild of the 20-rule battery against SQLite running the compiled SQL on the same
/// data, and event-to-membership latency with the live drivers on.
fn segments(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, end_ms, engine) = imported_data(global, args)?;
    let events = engine.load_stats().events;
    let exprs: Vec<cible_lang::Expr> = cible_core::segment::BATTERY
        .iter()
        .map(|r| cible_lang::parse(r).map_err(|d| anyhow::anyhow!(d.message)))
        .collect::<Result<_, _>>()?;

    // Property columns are built once, the first time a rule needs one, then kept up to date
    // and reloaded at start: timed apart from the rebuild.
    eprintln!("building property columns ...");
    let started = Instant::now();
    engine.ensure_columns(&exprs)?;
    let columns_s = started.elapsed().as_secs_f64();
    let column_bytes = engine.hot().column_bytes();
    // Three rebuilds (the store's background compactions after the import add noise): the
    // median is reported, with the spread.
    eprintln!("rebuilding {} segments (3 times) ...", exprs.len());
    let mut times = Vec::new();
    let mut results = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        results = engine.evaluate_rules(&exprs, end_ms, &std::sync::atomic::AtomicU64::new(0))?;
        times.push(started.elapsed().as_secs_f64());
    }
    times.sort_by(f64::total_cmp);
    let rebuild = times[1];
    let members: Vec<u64> = results.iter().map(|(m, _)| m.len()).collect();
    let via_messages: u64 = results.iter().map(|(_, v)| v).sum();

    // The newest 200,000 messages feed the latency measurement; then the source file goes.
    let tail = tail_lines(&file, 200_000)?;
    std::fs::remove_file(&file)?;

    // Baseline: an SQL engine on the documented layout, same rules compiled, same data.
    eprintln!("exporting for the SQL engine ...");
    let (events_file, profiles_file) = export_sql_tables(&engine, work.path(), end_ms)?;
    let (engine_name, dialect) = match args.baseline {
        Baseline::Sqlite => ("sqlite", cible_lang::sql::Dialect::Sqlite),
        Baseline::Duckdb => ("duckdb", cible_lang::sql::Dialect::DuckDb),
    };
    let queries: std::collections::BTreeMap<String, String> = exprs
        .iter()
        .enumerate()
        .map(|(i, e)| {
            (
                format!("r{i:02}"),
                cible_lang::sql::to_sql_for(e, end_ms.div_euclid(1000), dialect),
            )
        })
        .collect();
    eprintln!("running the SQL on {engine_name} ...");
    let answer = run_sql_baseline(
        work.path(),
        engine_name,
        &events_file,
        &profiles_file,
        &queries,
    )?;
    let sql_s = answer["seconds"].as_f64().unwrap_or(f64::NAN);
    for (i, count) in members.iter().enumerate() {
        let theirs = answer["members"][format!("r{i:02}")]
            .as_array()
            .map_or(u64::MAX, |m| m.len() as u64);
        anyhow::ensure!(
            theirs == *count,
            "rule {i}: cible {count} members, {engine_name} {theirs}"
        );
    }

    // Latency: live drivers on the 20 segments, batches arriving at 50k events/s.
    eprintln!("measuring event-to-membership latency ...");
    for (i, expr) in exprs.iter().enumerate() {
        engine.create_segment(&format!("bench-{i:02}"), expr.clone(), "", end_ms)?;
    }
    engine.start_live_segments(end_ms)?;
    let batch_size = args.latency_batch;
    let latencies = ingest_latencies(&engine, &tail, batch_size, end_ms)?;
    let percentile = |p: f64| percentile(&latencies, p);
    let per_batch = latencies.iter().sum::<f64>() / latencies.len() as f64;
    let sustainable = batch_size as f64 / (per_batch / 1000.0);

    print_header(
        "segments",
        &generated,
        events,
        engine.load_stats().profiles,
        "",
        args.days,
    );
    print_table(
        "",
        vec![
            Row {
                measure: "batch rebuild of 20 segments (s)",
                value: format!(
                    "{rebuild:.3} (median of 3: {:.3} to {:.3}; {via_messages} profile evaluations read full messages)",
                    times[0], times[2]
                ),
                baseline: format!("{sql_s:.2} ({engine_name}, compiled SQL, queries only)"),
                ratio: speed_ratio(rebuild, sql_s),
                target: "<= 2 s at 1M profiles / 100M events; >= 5x DuckDB",
            },
            Row {
                measure: "property columns, built once (s)",
                value: format!(
                    "{columns_s:.2} ({:.2} bytes per event in memory)",
                    column_bytes as f64 / events.max(1) as f64
                ),
                baseline: "-".into(),
                ratio: "-".into(),
                target: "-",
            },
            Row {
                measure: "event to membership (ms)",
                value: format!("p50 {:.2}, p99 {:.2}", percentile(0.5), percentile(0.99)),
                baseline: format!("{sustainable:.0} events/s sustained, batches of {batch_size}"),
                ratio: "-".into(),
                target: "p99 <= 5 ms at 50k events/s",
            },
        ],
    );
    Ok(())
}

/// Generated data (gzip-compressed, so that large runs fit on disk beside the store and the SQL
/// engine's copy), imported into a fresh store.
pub(crate) fn imported_data(
    global: &Global,
    args: &BenchArgs,
) -> anyhow::Result<(
    tempfile::TempDir,
    std::path::PathBuf,
    cible_core::generate::GenerateStats,
    i64,
    Engine,
)> {
    let (work, file, generated, end_ms) = generate_data(global, args, true)?;
    let engine = Engine::open(&work.path().join("store"))?;
    eprintln!("importing ...");
    cible_core::import::import_files(
        &engine,
        std::slice::from_ref(&file),
        end_ms,
        &Arc::default(),
    )?;
    Ok((work, file, generated, end_ms, engine))
}

/// The `p` quantile (0 to 1) of sorted values, by rank; NaN when there are none.
pub(crate) fn percentile(sorted: &[f64], p: f64) -> f64 {
    if sorted.is_empty() {
        return f64::NAN;
    }
    sorted[((sorted.len() - 1) as f64 * p) as usize]
}

/// "3.5x faster" or "1.2x slower": a time of ours against a baseline's.
pub(crate) fn speed_ratio(ours: f64, theirs: f64) -> String {
    if theirs >= ours {
        format!("{:.1}x faster", theirs / ours)
    } else {
        format!("{:.1}x slower", ours / theirs)
    }
}

/// Ingests `tail` (newest first, with fresh message ids: the same behaviour arriving again)
/// in batches, one after the other, and returns each batch's time in ms (from the start of
/// `ingest` until memberships are updated), sorted.
pub(crate) fn ingest_latencies(
    engine: &Engine,
    tail: &[String],
    batch_size: usize,
    now: i64,
) -> anyhow::Result<Vec<f64>> {
    let lines: Vec<&str> = tail.iter().rev().map(String::as_str).collect();
    let ctx = cible_core::ParseContext::at(now);
    let mut latencies = Vec::new();
    for (b, batch) in lines.chunks(batch_size.max(1)).enumerate() {
        let items: Vec<cible_core::Incoming> = batch
            .par_iter()
            .map(|line| {
                let mut value: serde_json::Value =
                    serde_json::from_str(line).expect("generated JSON");
                value["messageId"] = serde_json::Value::from(format!(
                    "bench-{b}-{}",
                    value["messageId"].as_str().unwrap_or("")
                ));
                cible_core::message::parse_message(value, None, &ctx).into()
            })
            .collect();
        let started = Instant::now();
        engine.ingest(items, "bench", Durability::Buffered, now)?;
        latencies.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    latencies.sort_by(f64::total_cmp);
    Ok(latencies)
}

/// Starts the live drivers, ingests `tail` in batches of `batch_size` and reports the time per
/// batch until memberships are updated (p50, p99) and per event.
pub(crate) fn incremental_row(
    measure: &'static str,
    engine: &Engine,
    tail: &[String],
    batch_size: usize,
    now: i64,
) -> anyhow::Result<Row> {
    engine.start_live_segments(now)?;
    let latencies = ingest_latencies(engine, tail, batch_size, now)?;
    let percentile = |p: f64| percentile(&latencies, p);
    let per_event_us =
        latencies.iter().sum::<f64>() * 1000.0 / (latencies.len() * batch_size) as f64;
    Ok(Row {
        measure,
        value: format!(
            "p50 {:.2}, p99 {:.2}; {per_event_us:.1} us per event",
            percentile(0.5),
            percentile(0.99)
        ),
        baseline: format!("batches of {batch_size} events"),
        ratio: "-".into(),
        target: "report",
    })
}

/// Exports the store in the SQL table layout of docs/segment-language.md, as CSV files the
/// baseline script loads without conversion: events (profile, ts, event, properties; gzip) and
/// profiles (profile, traits, computed).
pub(crate) fn export_sql_tables(
    engine: &Engine,
    dir: &std::path::Path,
    now: i64,
) -> anyhow::Result<(std::path::PathBuf, std::path::PathBuf)> {
    // Compressed: at 100M events the plain CSV would not fit beside the store on small disks.
    let events_file = dir.join("events.csv.gz");
    let profiles_file = dir.join("profiles.csv");
    let mut out = csv::Writer::from_writer(flate2::write::GzEncoder::new(
        std::io::BufWriter::with_capacity(1 << 20, std::fs::File::create(&events_file)?),
        flate2::Compression::fast(),
    ));
    let mut failed = None;
    engine.for_each_event(|event| {
        let message = &event.message;
        let record = [
            event.profile.to_string(),
            message.timestamp.div_euclid(1000).to_string(),
            message.behavioral_name().unwrap_or("").to_string(),
            serde_json::Value::Object(message.properties.clone()).to_string(),
        ];
        if let Err(error) = out.write_record(&record) {
            failed.get_or_insert(error);
        }
        Ok(())
    })?;
    if let Some(error) = failed {
        return Err(error.into());
    }
    out.into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {e}", events_file.display()))?
        .finish()?
        .into_inner()
        .map_err(|e| anyhow::anyhow!("writing {}: {}", events_file.display(), e.error()))?
        .sync_all()?;
    let mut out = csv::Writer::from_path(&profiles_file)?;
    let profiles = engine.live_profiles();
    let reader = engine.traits_reader(now)?;
    for chunk in profiles.chunks(4096) {
        let computed = reader.of(chunk);
        for (profile, computed) in chunk.iter().zip(computed) {
            let traits: serde_json::Map<String, serde_json::Value> = engine
                .profile_record(*profile)?
                .traits
                .into_iter()
                .map(|(k, t)| (k, t.value))
                .collect();
            out.write_record([
                profile.to_string(),
                serde_json::Value::Object(traits).to_string(),
                serde_json::to_string(&computed)?,
            ])?;
        }
    }
    out.flush()?;
    Ok((events_file, profiles_file))
}

/// Runs named queries on the SQL engine with the baseline script; the answer is
/// `{"seconds": query time, "members": {name: [profile, ...]}}`.
pub(crate) fn run_sql_baseline(
    dir: &std::path::Path,
    engine_name: &str,
    events_file: &std::path::Path,
    profiles_file: &std::path::Path,
    queries: &std::collections::BTreeMap<String, String>,
) -> anyhow::Result<serde_json::Value> {
    let queries_file = dir.join("queries.json");
    std::fs::write(&queries_file, serde_json::to_string(queries)?)?;
    run_python(
        dir,
        ("sql_members.py", SQL_BASELINE),
        &[
            std::ffi::OsStr::new(engine_name),
            events_file.as_os_str(),
            profiles_file.as_os_str(),
            queries_file.as_os_str(),
        ],
        &format!("the {engine_name} baseline"),
    )
}

/// Writes a baseline's Python script into `dir`, runs it with `args` and reads the JSON it
/// prints. `scripts/bench` installs what the scripts import.
pub(crate) fn run_python(
    dir: &std::path::Path,
    (name, text): (&str, &str),
    args: &[&std::ffi::OsStr],
    what: &str,
) -> anyhow::Result<serde_json::Value> {
    let script = dir.join(name);
    std::fs::write(&script, text)?;
    let output = std::process::Command::new("python3")
        .arg(&script)
        .args(args)
        .output()
        .with_context(|| format!("running python3 ({what})"))?;
    anyhow::ensure!(
        output.status.success(),
        "{what} failed (run scripts/bench, which installs it): {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok(serde_json::from_slice(&output.stdout)?)
}

/// The SQL baseline (SQLite or DuckDB): loads the export into the documented layout and times
/// the queries only. The same script serves the differential test.
const SQL_BASELINE: &str = include_str!("../../../tests/sql/sql_members.py");
