//! `cible-bench --suite storage`: the write path as a user meets it, through the binaries.
//!
//! - `cible import` of a generated JSON Lines file, beside DuckDB loading the same file into a
//!   persistent table (`CREATE TABLE ... AS SELECT * FROM read_json(...)`, 2 threads) in the
//!   same run: time, bytes written per byte of input (the processes' own write accounting,
//!   `getrusage` of the children) and the size left on disk;
//! - the first commands after the import (`segment list`, `profile show`), which open the store
//!   as it was left;
//! - a restart: `cible serve` on the imported store, from spawn until it listens.

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use anyhow::Context;

use crate::Global;
use crate::bench::{BenchArgs, Row, cible_exe, generate_data, print_table};

/// Bytes the finished children of this process wrote (their block output, 512-byte units).
#[allow(
    unsafe_code,
    reason = "getrusage fills a plain struct owned by this function"
)]
fn children_written() -> u64 {
    // SAFETY: `usage` is a valid, writable rusage for the call to fill.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut usage) };
    (usage.ru_oublock as u64) * 512
}

/// Runs a command to completion; returns its wall time and the bytes it wrote.
fn measured(command: &mut Command, what: &str) -> anyhow::Result<(f64, u64)> {
    let before = children_written();
    let started = Instant::now();
    let output = command.output().with_context(|| what.to_string())?;
    let seconds = started.elapsed().as_secs_f64();
    anyhow::ensure!(
        output.status.success(),
        "{what} failed: {}",
        String::from_utf8_lossy(&output.stderr)
    );
    Ok((seconds, children_written() - before))
}

/// Bytes allocated on disk under `path` (files the store preallocates count for what they use).
fn disk_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    if path.is_file() {
        return path.metadata().map_or(0, |m| m.blocks() * 512);
    }
    std::fs::read_dir(path)
        .map(|entries| {
            entries
                .flatten()
                .map(|entry| disk_bytes(&entry.path()))
                .sum()
        })
        .unwrap_or(0)
}

const DUCKDB_LOAD: &str = r#"
import sys, duckdb
source, target = sys.argv[1], sys.argv[2]
db = duckdb.connect(target)
db.execute("SET threads = 2")
db.execute("CREATE TABLE events AS SELECT * FROM read_json(?, format = 'newline_delimited', sample_size = -1)", [source])
db.execute("CHECKPOINT")
print(db.execute("SELECT count(*) FROM events").fetchone()[0])
"#;

pub fn run(global: &Global, args: &BenchArgs) -> anyhow::Result<()> {
    let (work, file, generated, now) = generate_data(global, args, false)?;
    let input = file.metadata()?.len();
    let messages = generated.messages;
    let mb = |bytes: u64| bytes as f64 / 1e6;

    eprintln!("DuckDB loading the file ...");
    let duck_file = work.path().join("duck.db");
    let (duck_s, duck_written) = measured(
        Command::new("python3")
            .arg("-c")
            .arg(DUCKDB_LOAD)
            .arg(&file)
            .arg(&duck_file),
        "DuckDB load",
    )?;
    let duck_size = disk_bytes(&duck_file) + disk_bytes(&work.path().join("duck.db.wal"));

    eprintln!("cible import ...");
    let data = work.path().join("cible");
    let (cible_s, cible_written) = measured(
        Command::new(cible_exe()?)
            .arg("--data")
            .arg(&data)
            .arg("--now")
            .arg((now / 1000).to_string())
            .arg("import")
            .arg(&file)
            .env("CIBLE_LOG", "warn"),
        "cible import",
    )?;
    let cible_size = disk_bytes(&data);
    let log_size = disk_bytes(&data.join("events"));

    let rate = messages as f64 / cible_s;
    let duck_rate = messages as f64 / duck_s;
    let mut rows = vec![
        Row {
            measure: "bulk import of JSON Lines (messages/s)",
            value: format!("{rate:.0} ({cible_s:.1} s)"),
            baseline: format!("DuckDB load {duck_rate:.0} ({duck_s:.1} s)"),
            ratio: format!("{:.2}x DuckDB", rate / duck_rate),
            target: ">= 1,000,000 and >= 2x DuckDB",
        },
        Row {
            measure: "bytes written per byte of input",
            value: format!(
                "{:.2} ({:.0} MB)",
                cible_written as f64 / input as f64,
                mb(cible_written)
            ),
            baseline: format!(
                "DuckDB {:.2} ({:.0} MB)",
                duck_written as f64 / input as f64,
                mb(duck_written)
            ),
            ratio: format!(
                "{:.2}x DuckDB",
                cible_written as f64 / duck_written.max(1) as f64
            ),
            target: "<= 1.5",
        },
        Row {
            measure: "store size / input size",
            value: format!(
                "{:.2} ({:.0} MB, event log {:.0} MB)",
                cible_size as f64 / input as f64,
                mb(cible_size),
                mb(log_size)
            ),
            baseline: format!(
                "DuckDB {:.2} ({:.0} MB)",
                duck_size as f64 / input as f64,
                mb(duck_size)
            ),
            ratio: format!("{:.2}x DuckDB", cible_size as f64 / duck_size.max(1) as f64),
            target: "<= 0.5",
        },
    ];

    eprintln!("commands after the import ...");
    for (measure, command) in [
        ("`segment list` after the import", &["segment", "list"][..]),
        (
            "`profile show` after the import",
            &["profile", "show", "user-7"][..],
        ),
    ] {
        let (first, ms) = crate::bench::cli_first_and_median_ms(&data, now, command)?;
        rows.push(Row {
            measure,
            value: format!("{ms:.0} ms (the first run: {first:.0} ms)"),
            baseline: "-".into(),
            ratio: format!("{:.2}x the target", ms / 100.0),
            target: "<= 100 ms",
        });
    }

    eprintln!("restart ...");
    let started = Instant::now();
    let (mut child, _) = crate::bench::spawn_server(&data, now)?;
    let restart = started.elapsed().as_secs_f64();
    crate::bench::stop_server(&mut child)?;
    rows.push(Row {
        measure: "restart after a clean stop: `cible serve` until it listens (s)",
        value: format!("{restart:.2} (the hot store from its snapshot)"),
        baseline: format!("DuckDB load {duck_s:.1} s"),
        ratio: format!("{:.2}x the DuckDB load", restart / duck_s),
        target: "<= 15 s at 100M events",
    });
    // As after a crash: no snapshot, the open scans the store.
    std::fs::remove_file(cible_core::snapshot::path(&data))?;
    let started = Instant::now();
    let (mut child, _) = crate::bench::spawn_server(&data, now)?;
    let scanned = started.elapsed().as_secs_f64();
    crate::bench::stop_server(&mut child)?;
    rows.push(Row {
        measure: "restart after a crash: `cible serve` until it listens (s)",
        value: format!("{scanned:.2} (the hot store from a scan of the store)"),
        baseline: format!("DuckDB load {duck_s:.1} s"),
        ratio: format!("{:.2}x the DuckDB load", scanned / duck_s),
        target: "<= 15 s at 100M events",
    });

    println!(
        "cible-bench --suite storage: {messages} messages, {:.0} MB of JSON Lines, {} profiles, {} days, {} cores\n",
        mb(input),
        args.profiles,
        args.days,
        std::thread::available_parallelism().map_or(0, |p| p.get())
    );
    print_table("The write path, beside DuckDB loading the same file", rows);
    Ok(())
}
