//! `cible-bench`: the benchmarks of `docs/benchmarks.md`, apart from the product binary. Each
//! suite generates data with `cible generate`'s generator, measures a target beside a baseline
//! taken in the same run on the same data, and prints a Markdown table. Suites that measure the
//! server or the CLI run the `cible` binary next to this one, as a user would.
//! `scripts/bench` builds both and installs the Python baselines.

mod bench;
mod bench_cohort;
mod bench_ingest;
mod bench_models;
mod bench_privacy;
mod bench_spine;
mod bench_storage;
mod bench_traits;
mod bench_webhooks;

use clap::Parser;

/// The allocator of the product binary, so that in-process measures match it.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

/// cible's benchmarks against same-run baselines; prints a Markdown table.
#[derive(Debug, Parser)]
#[command(name = "cible-bench", version, about)]
struct Cli {
    /// Pin "now" (RFC 3339 or epoch seconds) for reproducible data.
    #[arg(long, env = "CIBLE_NOW")]
    now: Option<String>,
    #[command(flatten)]
    args: bench::BenchArgs,
}

/// What the suites need of the command line besides their own options.
pub struct Global {
    now: Option<String>,
}

impl Global {
    /// "Now": the pinned time, or the wall clock, in epoch ms.
    pub fn now_ms(&self) -> anyhow::Result<i64> {
        match self.now.as_deref() {
            None => Ok(cible_core::time::wall_clock_ms()),
            Some(text) => {
                let value = match text.parse::<f64>() {
                    Ok(number) => serde_json::json!(number),
                    Err(_) => serde_json::json!(text),
                };
                cible_core::time::parse_timestamp(&value).map_err(|e| anyhow::anyhow!("--now: {e}"))
            }
        }
    }
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let global = Global { now: cli.now };
    match bench::run(&global, cli.args) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
