//! The `cible` binary: command-line parsing and dispatch. The only crate that knows the terminal
//! and HTTP; everything it does with data it asks of `cible-core`.

mod analysis;
mod analysis_api;
mod audit;
mod audit_api;
mod browser;
mod changes;
mod changes_api;
mod commands;
mod consent_api;
mod errors;
mod export_api;
mod limits;
mod local;
mod metrics_api;
mod model;
mod model_api;
mod priority;
mod ratelimit;
mod segment_api;
mod segments;
mod server;
mod traits;
mod webhook;
mod webhook_api;
mod webhook_sender;

use std::path::PathBuf;

use anyhow::Context;

/// mimalloc: ingestion allocates many small JSON maps; glibc malloc spent a quarter of import
/// time in malloc/free (measured with perf, see docs/benchmarks.md).
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;
use clap::{Args, Parser, Subcommand};

/// cible: behavioral segmentation engine for hyper-targeted email campaigns.
#[derive(Debug, Parser)]
#[command(name = "cible", version, about)]
struct Cli {
    #[command(flatten)]
    global: Global,
    #[command(subcommand)]
    command: Command,
}

/// Options every subcommand accepts.
#[derive(Debug, Clone, Args)]
pub struct Global {
    /// Data directory (the embedded store lives here).
    #[arg(
        long,
        global = true,
        env = "CIBLE_DATA",
        default_value = "./cible-data"
    )]
    pub data: PathBuf,
    /// Pin "now" (RFC 3339 or epoch seconds) for reproducible evaluation and tests.
    #[arg(long, global = true, env = "CIBLE_NOW")]
    pub now: Option<String>,
}

impl Global {
    /// The pinned time, if any, in epoch ms.
    pub fn pinned_now(&self) -> anyhow::Result<Option<i64>> {
        self.now
            .as_deref()
            .map(|text| {
                let value = match text.parse::<f64>() {
                    Ok(number) => serde_json::json!(number),
                    Err(_) => serde_json::json!(text),
                };
                cible_core::time::parse_timestamp(&value).map_err(|e| anyhow::anyhow!("--now: {e}"))
            })
            .transpose()
    }

    /// "Now": the pinned time, or the wall clock.
    pub fn now_ms(&self) -> anyhow::Result<i64> {
        Ok(self
            .pinned_now()?
            .unwrap_or_else(cible_core::time::wall_clock_ms))
    }

    /// Opens the engine on an existing data directory (for commands that only read or repair).
    pub fn open_existing(&self) -> anyhow::Result<cible_core::Engine> {
        if !self.data.join("store").is_dir() {
            anyhow::bail!(
                "no cible store in {} (set --data or CIBLE_DATA, or create one with `cible import` or `cible serve`)",
                self.data.display()
            );
        }
        self.open()
    }

    /// Opens an existing store, or finds the server holding it: a running `cible serve` locks the
    /// data directory, and CLI commands then go through its HTTP API (see [`local`]). With
    /// `light`, the store is opened without loading the hot store or the identity graph.
    pub fn open_or_remote(&self, light: bool) -> anyhow::Result<Opened> {
        if !self.data.join("store").is_dir() {
            anyhow::bail!(
                "no cible store in {} (set --data or CIBLE_DATA, or create one with `cible import` or `cible serve`)",
                self.data.display()
            );
        }
        // A live server's file: go through it at once (trying the store's lock first would
        // wait for it). A file left by a killed server does not answer and is ignored.
        if let Some(remote) = self.running_server() {
            return Ok(Opened::Remote(remote));
        }
        let opened = if light {
            cible_core::Engine::open_light(&self.data)
        } else {
            cible_core::Engine::open(&self.data)
        };
        match opened {
            Ok(engine) => Ok(Opened::Local(Box::new(engine))),
            Err(cible_core::EngineError::Store(cible_core::store::StoreError::Locked {
                ..
            })) if local::read(&self.data).is_some() => {
                let info = local::read(&self.data).expect("just read");
                Ok(Opened::Remote(local::Remote::new(info)))
            }
            Err(error) => Err(anyhow::Error::new(error)
                .context(format!("opening the store in {}", self.data.display()))),
        }
    }

    /// The server holding the data directory, when one runs and answers.
    pub fn running_server(&self) -> Option<local::Remote> {
        let remote = local::Remote::new(local::read(&self.data)?);
        remote.is_up().then_some(remote)
    }

    /// Opens (or creates) the engine on the data directory.
    pub fn open(&self) -> anyhow::Result<cible_core::Engine> {
        cible_core::Engine::open(&self.data)
            .with_context(|| format!("opening the store in {}", self.data.display()))
    }
}

/// Prints JSON as the server answers it (a JSON value: keys in the same order), so that a
/// command prints the same on the store alone and through a server.
pub fn print_json(value: &impl serde::Serialize) -> anyhow::Result<()> {
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::to_value(value)?)?
    );
    Ok(())
}

/// Where a command runs: on the store itself, or through the server holding it.
pub enum Opened {
    Local(Box<cible_core::Engine>),
    Remote(local::Remote),
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Run the HTTP server: Segment-compatible ingestion (/v1/*), admin API (/api/*).
    Serve(server::ServeArgs),
    /// Import Segment messages from JSON Lines or CSV (optionally .gz), or Parquet files.
    Import(commands::ImportArgs),
    /// Write realistic synthetic Segment messages as JSON Lines.
    Generate(commands::GenerateArgs),
    /// Manage API keys.
    #[command(subcommand)]
    Key(commands::KeyCommand),
    /// How long events and quarantined messages are kept (`DIR/retention.toml`).
    #[command(subcommand)]
    Retention(commands::RetentionCommand),
    /// The key that pseudonymizes exports (`export --pseudonymize`).
    #[command(subcommand)]
    Pseudonym(commands::PseudonymCommand),
    /// Look at and repair profiles.
    #[command(subcommand)]
    Profile(commands::ProfileCommand),
    /// Data-quality report, quarantine listing and replay.
    Quality(commands::QualityArgs),
    /// Webhooks: signed deliveries of segment changes (and list syncs) to URLs.
    #[command(subcommand)]
    Webhook(webhook::WebhookCommand),
    /// Export data.
    #[command(subcommand)]
    Export(commands::ExportCommand),
    /// Define segments with rules and look at their members.
    #[command(subcommand)]
    Segment(segments::SegmentCommand),
    /// Computed traits: configuration, calibration, values of a profile.
    #[command(subcommand)]
    Traits(traits::TraitsCommand),
    /// The change feed: every segment enter and exit, with its sequence number and cause.
    Changes(changes::ChangesArgs),
    /// Cohort analysis over events: retention tables.
    #[command(subcommand)]
    Cohort(analysis::CohortCommand),
    /// Models on profile features: clustering, propensity.
    #[command(subcommand)]
    Model(model::ModelCommand),
    /// The audit log: hash-chained records of consent changes, merges, removals, exports, keys
    /// and admin actions; verification.
    #[command(subcommand)]
    Audit(audit::AuditCommand),
}

/// Restores the default SIGPIPE action so `cible ... | head` ends quietly like other Unix tools
/// instead of panicking on a closed pipe (Rust ignores SIGPIPE by default).
#[allow(
    unsafe_code,
    reason = "one libc call at start-up, before any thread exists"
)]
fn restore_sigpipe() {
    // SAFETY: `signal` with SIG_DFL is async-signal-safe and runs before other threads start.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("CIBLE_LOG")
                .unwrap_or_else(|_| "info,fjall=warn,lsm_tree=warn".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let cli = Cli::parse();
    // Before any store is loaded, for every command: the server's writer zeroed fresh 2 MiB
    // pages for 15 to 60 ms at a time, and a short command's allocations paid for zeroing whole
    // pages of which they touched a few bytes (see `priority::no_transparent_huge_pages`).
    priority::no_transparent_huge_pages();
    // A command whose output goes to `head` ends quietly when the pipe closes. Not the server:
    // with the default action, a write to a socket its client had closed (hyper writes with
    // writev, which cannot ask for no signal) killed the whole process without a word.
    if !matches!(cli.command, Command::Serve(_)) {
        restore_sigpipe();
    }
    // Named threads make profiles readable (the writer is the main thread during imports). A
    // server keeps a core free of parallel work (segment edits, recalibration, training): the
    // writer and the HTTP handlers answer on it while admin work runs (`--parallel-threads`).
    let threads = match &cli.command {
        Command::Serve(args) => args.parallel_threads(),
        _ => 0,
    };
    let serving = threads > 0;
    let _ = rayon::ThreadPoolBuilder::new()
        .num_threads(threads)
        .thread_name(|i| format!("cible-cpu-{i}"))
        .start_handler(move |_| {
            if serving {
                priority::lower();
            }
        })
        .build_global();
    // The segment worker's passes get a pool of their own, never queued behind admin work on
    // the global one (`cible_core::threads`).
    if serving {
        cible_core::threads::configure_segment_pool(threads, priority::lower);
    }
    let result = match cli.command {
        Command::Serve(args) => server::run(&cli.global, args),
        Command::Import(args) => commands::import(&cli.global, args),
        Command::Generate(args) => commands::generate(&cli.global, args),
        Command::Key(command) => commands::key(&cli.global, command),
        Command::Pseudonym(command) => commands::pseudonym(&cli.global, command),
        Command::Retention(command) => commands::retention(&cli.global, command),
        Command::Profile(command) => commands::profile(&cli.global, command),
        Command::Quality(args) => commands::quality(&cli.global, args),
        Command::Export(command) => commands::export(&cli.global, command),
        Command::Webhook(command) => webhook::run(&cli.global, command),
        Command::Segment(command) => segments::run(&cli.global, command),
        Command::Traits(command) => traits::run(&cli.global, command),
        Command::Audit(command) => audit::run(&cli.global, command),
        Command::Model(command) => model::run(&cli.global, command),
        Command::Changes(args) => changes::run(&cli.global, args),
        Command::Cohort(command) => analysis::cohort(&cli.global, command),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            let text = format!("{error:#}");
            // Rule diagnostics carry their own `error[E...]` heading.
            if text.starts_with("error[") {
                eprintln!("{text}");
            } else {
                eprintln!("error: {text}");
            }
            std::process::ExitCode::FAILURE
        }
    }
}
