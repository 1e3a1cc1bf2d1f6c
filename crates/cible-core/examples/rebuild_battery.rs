//! Times a rebuild of the segment battery on an existing store, rule by rule and all together:
//! `cargo run --release -p cible-core --example rebuild_battery -- DATA_DIR NOW_MS [all]`.
//! For profiling the evaluator without regenerating data (see docs/benchmarks.md).

use std::sync::atomic::AtomicU64;
use std::time::Instant;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let dir = args
        .next()
        .ok_or("usage: rebuild_battery DATA_DIR NOW_MS")?;
    let now: i64 = args
        .next()
        .ok_or("usage: rebuild_battery DATA_DIR NOW_MS")?
        .parse()?;
    let started = Instant::now();
    let engine = cible_core::Engine::open(std::path::Path::new(&dir))?;
    eprintln!("opened in {:.2} s", started.elapsed().as_secs_f64());
    let exprs: Vec<cible_lang::Expr> = cible_core::segment::BATTERY
        .iter()
        .map(|rule| cible_lang::parse(rule).expect("battery rules parse"))
        .collect();
    // `all` as a third argument: only the one-pass rebuild, five times (for profiling).
    let only_all = args.next().as_deref() == Some("all");
    engine.ensure_columns(&exprs)?;
    for (i, expr) in exprs.iter().enumerate().filter(|_| !only_all) {
        let started = Instant::now();
        let results = engine.evaluate_rules(std::slice::from_ref(expr), now, &AtomicU64::new(0))?;
        println!(
            "r{i:02} {:>8.3} s {:>7} members {:>7} via messages",
            started.elapsed().as_secs_f64(),
            results[0].0.len(),
            results[0].1
        );
    }
    for _ in 0..if only_all { 5 } else { 1 } {
        let started = Instant::now();
        let results = engine.evaluate_rules(&exprs, now, &AtomicU64::new(0))?;
        let via: u64 = results.iter().map(|r| r.1).sum();
        println!(
            "all {:>8.3} s ({via} evaluations via messages)",
            started.elapsed().as_secs_f64()
        );
    }
    Ok(())
}
