//! `cible serve`: the Segment-compatible tracking API (`/v1/*`), the admin API (`/api/*`),
//! `/healthz`.
//!
//! Request handlers authenticate, bound and decode the body, validate every message, then hand
//! the batch to the single writer thread through a bounded queue. The writer drains whatever is
//! queued into one atomic batch and one fsync (group commit) and only then answers each request:
//! **a 200 means the events are on disk.** When the queue is full the API answers 503 with
//! `Retry-After` instead of buffering without bound.

use std::io::Read;
use std::net::SocketAddr;
use std::sync::Arc;

use anyhow::Context;
use axum::Router;
use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use cible_core::keys::KeyKind;
use cible_core::message::{
    MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, ParseContext, parse_message, parse_message_text,
};
use cible_core::quality::Reason;
use cible_core::records::BatchOutcome;
use cible_core::view::{TimelineQuery, profile_view};
use cible_core::{Durability, Engine, EngineError, Incoming, MessageType};
use clap::Args;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::Global;

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// Threads for parallel work (recalibration, training, previews, demo import), and as many
    /// for the segment worker's passes (segment edits); by default all cores but one, so that
    /// acknowledgements never wait for a core.
    #[arg(long)]
    pub parallel_threads: Option<usize>,
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:7070")]
    pub listen: SocketAddr,
    /// Load demo data into an empty store and print a write key and an admin key.
    #[arg(long)]
    pub demo: bool,
    /// People in the demo data.
    #[arg(long, default_value_t = 5_000)]
    pub demo_profiles: u64,
    /// Days of demo history.
    #[arg(long, default_value_t = 60)]
    pub demo_days: u32,
    /// Requests that may wait for the writer before the API answers 503; four times as many may
    /// be in flight (read and parsed) at once, which bounds memory.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
    /// Retrain every stored model (same settings) once its active version is this many days
    /// old; 0 never does.
    #[arg(long, default_value_t = 7)]
    pub retrain_days: u32,
    /// Seconds a request's body may take to arrive once its headers have; then 408.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub body_timeout_secs: u64,
    /// Seconds a request's headers may take to arrive, and an idle connection may stay open.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=3600))]
    pub header_timeout_secs: u64,
    /// Open connections at most; more wait to be accepted.
    #[arg(long, default_value_t = 512, value_parser = clap::value_parser!(u64).range(1..=1_000_000))]
    pub max_connections: u64,
    /// Open connections from one client address at most (more are closed at once); 0 for no cap,
    /// e.g. behind a reverse proxy.
    #[arg(long, default_value_t = 128)]
    pub max_connections_per_ip: usize,
    /// Webhook retries: the delay before each retry after the first attempt, comma-separated
    /// (ms, s, m, h); after the last, a dead letter. The default is the Standard Webhooks
    /// schedule.
    #[arg(long, default_value = "5s,5m,30m,2h,5h,10h,10h")]
    pub webhook_retries: String,
    /// How long one webhook attempt may take (connect, send, answer), seconds.
    #[arg(long, default_value_t = 15, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub webhook_timeout_secs: u64,
    /// Webhook attempts in flight per subscription at most.
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=10_000))]
    pub webhook_concurrency: u64,
}

impl ServeArgs {
    /// `--parallel-threads`, or all cores but one (at least one).
    pub fn parallel_threads(&self) -> usize {
        self.parallel_threads.unwrap_or_else(|| {
            std::thread::available_parallelism()
                .map_or(1, |n| n.get())
                .saturating_sub(1)
                .max(1)
        })
    }
}

/// A request's messages waiting for the writer.
struct Job {
    items: Vec<Incoming>,
    reply: oneshot::Sender<Result<BatchOutcome, String>>,
}

#[derive(Clone)]
pub(crate) struct AppState {
    pub(crate) engine: Arc<Engine>,
    /// `None` asks the writer to stop (after answering what is queued).
    jobs: mpsc::Sender<Option<Job>>,
    pinned_now: Option<i64>,
    /// The change feed's head, for streams waiting for new changes.
    pub(crate) feed_head: Arc<tokio::sync::watch::Sender<u64>>,
    /// Becomes true when the server stops: streams end.
    pub(crate) stopping: tokio::sync::watch::Receiver<bool>,
    /// The credential of CLI commands run beside this server (see [`crate::local`]).
    local_token: Arc<String>,
    /// Tracking requests being read, parsed or waiting for the writer. Bounding them bounds
    /// memory: each holds at most one 500 KB body and its messages.
    inflight: Arc<tokio::sync::Semaphore>,
    /// How long a request body may take to arrive (408 after).
    body_timeout: std::time::Duration,
    /// The keys' rate limits (see [`crate::ratelimit`]).
    limiter: Arc<crate::ratelimit::KeyLimiter>,
    /// The webhook sender (see [`crate::webhook_sender`]).
    pub(crate) webhooks: crate::webhook_sender::Sender,
}

impl AppState {
    /// A place for one more tracking request, or 503 when all are taken.
    fn admit(&self) -> Result<tokio::sync::OwnedSemaphorePermit, ApiError> {
        Arc::clone(&self.inflight).try_acquire_owned().map_err(|_| {
            error(
                StatusCode::SERVICE_UNAVAILABLE,
                "overloaded",
                "too many requests in flight; retry after the delay",
            )
            .retry_after(1)
        })
    }
}

impl AppState {
    pub(crate) fn now(&self) -> i64 {
        self.pinned_now
            .unwrap_or_else(cible_core::time::wall_clock_ms)
    }
}

/// How [`serve`] runs (see [`ServeArgs`]).
pub struct ServeOptions {
    pub queue: usize,
    pub pinned_now: Option<i64>,
    pub retrain_days: u32,
    /// Where to write the address and local credential for CLI commands (none in benches).
    pub data_dir: Option<std::path::PathBuf>,
    pub limits: crate::limits::Limits,
    pub webhooks: crate::webhook_sender::SenderOptions,
}

pub fn run(global: &Global, args: ServeArgs) -> anyhow::Result<()> {
    let engine = Arc::new(global.open()?);
    // The property column computed traits read, built before listening when the store has
    // none (a store filled before the column was kept at import): built on the first traits
    // read instead, it holds the writer lock for a scan of the whole store (62 s at 99M events).
    // Free on an empty store, and kept up to date by ingestion from then on.
    engine.ensure_column_indexes(&[cible_core::computed::CATEGORY_KEY as u8], true)?;
    let pinned_now = global.pinned_now()?;
    let loaded = engine.load_stats();
    tracing::info!(
        events = loaded.events,
        profiles = loaded.profiles,
        from_snapshot = loaded.from_snapshot,
        "store loaded"
    );
    let demo_keys = args.demo
        && seed_demo(
            &engine,
            &args,
            pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms),
        )?;
    if !demo_keys
        && !engine
            .list_keys()
            .iter()
            .any(|key| key.kind == KeyKind::Admin)
    {
        // A fresh data directory: without a key nobody could use the API.
        let now = pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms);
        let write = engine.create_key(KeyKind::Write, "first write key", now)?;
        let admin = engine.create_key(KeyKind::Admin, "first admin key", now)?;
        println!("no key in this data directory yet; created (shown this once):");
        println!("write key: {write}");
        println!("admin key: {admin}");
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .on_thread_start(|| {
            crate::priority::latency_sensitive();
        })
        .build()?;
    let served = runtime.block_on(async {
        // Installed before the address is printed: a SIGTERM sent as soon as the server
        // listens must stop it cleanly, not kill it with the default action.
        let signal = shutdown_signal()?;
        let listener = tokio::net::TcpListener::bind(args.listen)
            .await
            .with_context(|| format!("listening on {}", args.listen))?;
        let options = ServeOptions {
            queue: args.queue,
            pinned_now,
            retrain_days: args.retrain_days,
            data_dir: Some(global.data.clone()),
            limits: crate::limits::Limits {
                header_timeout: std::time::Duration::from_secs(args.header_timeout_secs),
                body_timeout: std::time::Duration::from_secs(args.body_timeout_secs),
                max_connections: usize::try_from(args.max_connections).unwrap_or(usize::MAX),
                max_connections_per_ip: args.max_connections_per_ip,
            },
            webhooks: crate::webhook_sender::SenderOptions {
                schedule: cible_core::webhooks::parse_schedule(&args.webhook_retries)
                    .map_err(|e| anyhow::anyhow!("--webhook-retries: {e}"))?,
                timeout: std::time::Duration::from_secs(args.webhook_timeout_secs),
                concurrency: args.webhook_concurrency as usize,
            },
        };
        serve(engine, listener, options, signal).await
    });
    // Blocking work an admin call started (a training whose client left) does not hold the
    // process: what was acknowledged is already committed and checkpointed.
    runtime.shutdown_timeout(std::time::Duration::from_secs(1));
    served
}

/// Serves until `shutdown` completes; then drains the writer so every accepted request is
/// answered, lets the segment worker evaluate what was committed, and checkpoints. Connections
/// still open after [`SHUTDOWN_GRACE`] (idle keep-alive, streams) are closed.
pub async fn serve(
    engine: Arc<Engine>,
    listener: tokio::net::TcpListener,
    options: ServeOptions,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> anyhow::Result<()> {
    let ServeOptions {
        queue,
        pinned_now,
        retrain_days,
        data_dir,
        limits,
        webhooks,
    } = options;
    let now = pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms);
    let (feed_head, _) = tokio::sync::watch::channel(engine.feed_head());
    let feed_head = Arc::new(feed_head);
    {
        let feed_head = Arc::clone(&feed_head);
        engine.on_feed(Box::new(move |head| {
            feed_head.send_replace(head);
        }));
    }
    let stop_background = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let timers = {
        let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop_background));
        std::thread::Builder::new()
            .name("cible-jobs".into())
            .spawn(move || jobs_loop(&engine, &stop, pinned_now, retrain_days))?
    };
    // Before the writer exists: no acknowledgement may evaluate segments inline, not even the
    // first ones, while the worker thread starts.
    engine.start_background_worker();
    let stop_worker = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let worker = {
        let (engine, stop) = (Arc::clone(&engine), Arc::clone(&stop_worker));
        std::thread::Builder::new()
            .name("cible-segments".into())
            .spawn(move || {
                crate::priority::latency_sensitive();
                // The API answers meanwhile: batches committed during this first pass wait in
                // the queue and are evaluated right after it.
                if let Err(error) = engine.start_live_segments(now) {
                    tracing::error!(error = %error, "starting the live segments failed");
                }
                let clock = move || pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms);
                engine.run_segment_worker(&stop, &clock)
            })?
    };
    let (jobs, receiver) = mpsc::channel(queue.max(1));
    let writer_engine = Arc::clone(&engine);
    let writer = std::thread::Builder::new()
        .name("cible-writer".into())
        .spawn(move || {
            crate::priority::latency_sensitive();
            writer_loop(&writer_engine, receiver, pinned_now)
        })?;
    let state_engine = Arc::clone(&engine);
    let (stopping_sender, stopping) = tokio::sync::watch::channel(false);
    let local = match &data_dir {
        Some(dir) => Some(crate::local::ServerFile::write(
            dir,
            listener.local_addr()?,
        )?),
        None => None,
    };
    // Said once `server.json` is written: a CLI command run after this line finds the server.
    println!("cible listening on http://{}", listener.local_addr()?);
    std::io::Write::flush(&mut std::io::stdout())?;
    let stop_writer = jobs.clone();
    let webhooks = crate::webhook_sender::start(
        Arc::clone(&engine),
        webhooks,
        feed_head.subscribe(),
        stopping.clone(),
    )?;
    let state = AppState {
        webhooks,
        engine,
        jobs,
        pinned_now,
        feed_head,
        stopping,
        local_token: Arc::new(
            local
                .as_ref()
                .map_or_else(crate::local::new_token, |file| file.token.clone()),
        ),
        inflight: Arc::new(tokio::sync::Semaphore::new(queue.max(1) * 4)),
        limiter: Arc::default(),
        body_timeout: limits.body_timeout,
    };
    let (signalled_sender, signalled) = tokio::sync::oneshot::channel::<()>();
    let passes_engine = Arc::clone(&state.engine);
    let shutdown = async move {
        shutdown.await;
        // Long admin work (a training, a segment edit's pass) stops at its next step.
        cible_core::cancel::stop_all();
        passes_engine.stop_segment_passes();
        let _ = stopping_sender.send(true);
        let _ = signalled_sender.send(());
    };
    let server = crate::limits::serve_connections(listener, router(state), limits, shutdown);
    let deadline = async move {
        let _ = signalled.await;
        tokio::time::sleep(SHUTDOWN_GRACE).await;
    };
    tokio::select! {
        () = server => {}
        _ = deadline => tracing::warn!(grace_s = SHUTDOWN_GRACE.as_secs(), "connections still open at shutdown closed"),
    }
    // Every request handed to the writer is answered; requests still arriving on connections
    // past the grace period are refused (503).
    tracing::info!("connections closed");
    let _ = stop_writer.send(None).await;
    drop(stop_writer);
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    tracing::info!("writer drained");
    stop_worker.store(true, std::sync::atomic::Ordering::Release);
    state_engine.wake_segment_worker();
    worker
        .join()
        .map_err(|_| anyhow::anyhow!("the segment worker panicked"))?;
    tracing::info!("segment worker drained");
    stop_background.store(true, std::sync::atomic::Ordering::Relaxed);
    // A scheduled retraining may be under way: wait a little for it, never for its end.
    let waited = std::time::Instant::now();
    while !timers.is_finished() && waited.elapsed() < std::time::Duration::from_secs(2) {
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    if timers.is_finished() {
        timers
            .join()
            .map_err(|_| anyhow::anyhow!("the jobs thread panicked"))?;
    } else {
        tracing::warn!("a scheduled job was still running at shutdown; it is abandoned");
    }
    tracing::info!("background jobs stopped");
    if let Err(error) = state_engine.checkpoint() {
        tracing::warn!(error = %error, "checkpoint at shutdown failed; the next start replays the journal");
    }
    drop(local);
    Ok(())
}

/// How long connections may stay open after a stop was asked for.
const SHUTDOWN_GRACE: std::time::Duration = std::time::Duration::from_secs(3);

/// Installs the SIGTERM and SIGINT handlers now; the future ends at the first signal.
fn shutdown_signal() -> anyhow::Result<impl std::future::Future<Output = ()> + Send + 'static> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate =
        signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut interrupt = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    Ok(async move {
        tokio::select! {
            _ = interrupt.recv() => {}
            _ = terminate.recv() => {}
        }
        tracing::info!("shutting down");
    })
}

/// How often the retention policy is applied while the server runs.
const RETENTION_EVERY: std::time::Duration = std::time::Duration::from_secs(3600);

/// Retention purges, daily recalibration and scheduled retraining, checked once a second (the
/// segment worker, not this thread, follows the timers of live segments).
fn jobs_loop(
    engine: &Engine,
    stop: &std::sync::atomic::AtomicBool,
    pinned_now: Option<i64>,
    retrain_days: u32,
) {
    let retention = engine.retention();
    let purging = retention.events_days.is_some() || retention.quarantine_days.is_some();
    let mut last_purge: Option<std::time::Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let now = pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms);
        // Retention: once the live segments have caught up after the start (so that the
        // changes it makes carry cause `retention`), then hourly.
        let ready = engine
            .metrics
            .segments_ready
            .load(std::sync::atomic::Ordering::Acquire)
            == 1;
        if purging && ready && last_purge.is_none_or(|at| at.elapsed() >= RETENTION_EVERY) {
            last_purge = Some(std::time::Instant::now());
            match cible_core::audit::with_actor("retention", || engine.purge_expired(now)) {
                Ok(receipt) if receipt.events_removed + receipt.quarantined_removed > 0 => {
                    tracing::info!(
                        events = receipt.events_removed,
                        profiles = receipt.profiles_touched,
                        quarantined = receipt.quarantined_removed,
                        seconds = receipt.seconds,
                        "expired data purged (retention.toml)"
                    );
                }
                Ok(_) => {}
                Err(error) => tracing::error!(error = %error, "the retention purge failed"),
            }
        }
        // Percentiles, quintiles and the product model follow the population once a day.
        match engine.refresh_traits_if_older(now, cible_core::time::DAY_MS) {
            Ok(true) => tracing::info!("computed traits recalibrated"),
            Ok(false) => {}
            Err(error) => tracing::error!(error = %error, "recalibrating computed traits failed"),
        }
        if retrain_days > 0 {
            let max_age = i64::from(retrain_days) * cible_core::time::DAY_MS;
            match engine.retrain_if_older(now, max_age) {
                Ok(names) if !names.is_empty() => tracing::info!(?names, "models retrained"),
                Ok(_) => {}
                Err(error) => tracing::error!(error = %error, "retraining models failed"),
            }
        }
        for _ in 0..10 {
            if stop.load(std::sync::atomic::Ordering::Relaxed) {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
    }
}

/// Most messages the writer puts in one group commit.
const GROUP_COMMIT_MESSAGES: usize = 100_000;

fn writer_loop(
    engine: &Engine,
    mut receiver: mpsc::Receiver<Option<Job>>,
    pinned_now: Option<i64>,
) {
    let mut stopping = false;
    loop {
        let first = if stopping {
            // Closed: what was queued before the stop is still answered.
            match receiver.try_recv() {
                Ok(message) => message,
                Err(_) => return,
            }
        } else {
            match receiver.blocking_recv() {
                Some(message) => message,
                None => return,
            }
        };
        let Some(first) = first else {
            stopping = true;
            receiver.close();
            continue;
        };
        let mut n_messages = first.items.len();
        let mut jobs = vec![first];
        while n_messages < GROUP_COMMIT_MESSAGES {
            match receiver.try_recv() {
                Ok(Some(job)) => {
                    n_messages += job.items.len();
                    jobs.push(job);
                }
                Ok(None) => {
                    stopping = true;
                    receiver.close();
                }
                Err(_) => break,
            }
        }
        let (groups, replies): (Vec<_>, Vec<_>) =
            jobs.into_iter().map(|job| (job.items, job.reply)).unzip();
        let now = pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms);
        match engine.ingest_groups(groups, "http", Durability::Sync, now) {
            Ok(outcomes) => {
                for (reply, outcome) in replies.into_iter().zip(outcomes) {
                    let _ = reply.send(Ok(outcome));
                }
            }
            Err(error) => {
                tracing::error!(error = %error, "group commit failed");
                for reply in replies {
                    let _ = reply.send(Err(error.to_string()));
                }
            }
        }
    }
}

fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(|| async { "ok" }))
        .route("/metrics", get(crate::metrics_api::metrics))
        .route("/api/changes", get(crate::changes_api::list))
        .route("/api/changes/stream", get(crate::changes_api::stream))
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        // analytics.js posts its batches to `/b`.
        .route("/v1/b", post(batch))
        .route("/v1/{kind}", post(single))
        .route(
            "/v1/projects/{write_key}/settings",
            get(crate::browser::settings),
        )
        .route("/api/quality", get(api_quality))
        .route("/api/quality/quarantine", get(api_quarantine))
        .route("/api/quality/replay", post(api_replay))
        .route(
            "/api/profiles/{id}",
            get(api_profile).delete(api_delete_profile),
        )
        .route(
            "/api/profiles/{id}/recommendations",
            get(api_recommendations),
        )
        .route("/api/profiles/{id}/traits", get(api_computed_traits))
        .route("/api/profiles/{id}/export", get(api_access_export))
        .route("/api/audit", get(crate::audit_api::list))
        .route("/api/audit/verify", get(crate::audit_api::verify))
        .route(
            "/api/profiles/{id}/consents",
            get(crate::consent_api::show).put(crate::consent_api::put),
        )
        .route("/api/traits/config", get(api_trait_config))
        .route("/api/traits/refresh", post(api_trait_refresh))
        .route(
            "/api/models",
            get(crate::model_api::list).post(crate::model_api::train),
        )
        .route("/api/models/{name}", get(crate::model_api::show))
        .route(
            "/api/models/{name}/versions",
            get(crate::model_api::versions),
        )
        .route(
            "/api/models/{name}/retrain",
            post(crate::model_api::retrain),
        )
        .route(
            "/api/models/{name}/activate",
            post(crate::model_api::activate),
        )
        .route("/api/merges", get(api_merges))
        .route("/api/merges/{id}/unmerge", post(api_unmerge))
        .route("/api/keys", post(api_create_key).get(api_list_keys))
        .route(
            "/api/segments",
            get(crate::segment_api::list).post(crate::segment_api::create),
        )
        .route("/api/segments/preview", post(crate::segment_api::preview))
        .route("/api/segments/overlap", get(crate::analysis_api::overlap))
        .route(
            "/api/cohorts/retention",
            get(crate::analysis_api::retention),
        )
        .route(
            "/api/segments/{name}",
            get(crate::segment_api::show)
                .put(crate::segment_api::edit)
                .delete(crate::segment_api::delete),
        )
        .route(
            "/api/segments/{name}/members",
            get(crate::segment_api::members),
        )
        .route(
            "/api/segments/{name}/history",
            get(crate::segment_api::history),
        )
        .route(
            "/api/segments/{name}/explain/{profile}",
            get(crate::segment_api::explain),
        )
        .route("/api/keys/{prefix}", axum::routing::delete(api_revoke_key))
        .route("/api/pseudonym/rotate", post(api_rotate_pseudonym))
        .route("/api/retention", get(api_retention))
        .route("/api/retention/run", post(api_retention_run))
        .route(
            "/api/webhooks",
            get(crate::webhook_api::list).post(crate::webhook_api::create),
        )
        .route(
            "/api/webhooks/{id}",
            get(crate::webhook_api::show).delete(crate::webhook_api::delete),
        )
        .route(
            "/api/webhooks/{id}/rotate",
            post(crate::webhook_api::rotate),
        )
        .route(
            "/api/webhooks/{id}/enable",
            post(crate::webhook_api::enable),
        )
        .route(
            "/api/webhooks/{id}/disable",
            post(crate::webhook_api::disable),
        )
        .route("/api/webhooks/{id}/dead", get(crate::webhook_api::dead))
        .route(
            "/api/webhooks/{id}/replay",
            post(crate::webhook_api::replay),
        )
        .route(
            "/api/exports/members/{name}",
            get(crate::export_api::members),
        )
        .route("/api/exports/profiles", get(crate::export_api::profiles))
        .fallback(|| async { error(StatusCode::NOT_FOUND, "not_found", "no such endpoint") })
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            read_scope,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.clone(),
            crate::browser::cors,
        ))
        .layer(axum::middleware::from_fn_with_state(
            state.body_timeout,
            crate::limits::body_deadline,
        ))
        .with_state(state)
}

/// The one JSON error shape: `{"error": {"code", "message", "field"?}}`, with its HTTP status.
/// Codes are part of the API: never reuse one for another meaning.
#[derive(Debug)]
pub(crate) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    field: Option<String>,
    /// Seconds, for `Retry-After`.
    retry_after: Option<u32>,
    /// Structured detail (e.g. the located diagnostics of a rule).
    pub(crate) details: Option<Value>,
}

pub(crate) fn error(
    status: StatusCode,
    code: &'static str,
    message: impl Into<String>,
) -> ApiError {
    ApiError {
        status,
        code,
        message: message.into(),
        field: None,
        retry_after: None,
        details: None,
    }
}

impl ApiError {
    pub(crate) fn field(mut self, field: impl Into<String>) -> Self {
        self.field = Some(field.into());
        self
    }

    fn retry_after(mut self, seconds: u32) -> Self {
        self.retry_after = Some(seconds);
        self
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let mut body = json!({"error": {"code": self.code, "message": self.message}});
        if let Some(field) = self.field {
            body["error"]["field"] = json!(field);
        }
        if let Some(details) = self.details {
            body["error"]["details"] = details;
        }
        let mut response = (self.status, axum::Json(body)).into_response();
        if let Some(seconds) = self.retry_after {
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from(seconds));
        }
        response
    }
}

impl From<EngineError> for ApiError {
    fn from(failure: EngineError) -> Self {
        let (status, code) = crate::errors::status_of(&failure);
        if status.is_server_error() {
            tracing::error!(error = %failure, code, "request failed on the server's side");
        }
        error(status, code, failure.to_string())
    }
}

pub(crate) type ApiResult = Result<Response, ApiError>;

/// The query string of a request, decoded into `T`; a parameter that does not decode (or is
/// unknown) gets the API's JSON error naming it, not axum's plain text.
pub(crate) struct ApiQuery<T>(pub T);

impl<T, S> axum::extract::FromRequestParts<S> for ApiQuery<T>
where
    T: serde::de::DeserializeOwned,
    S: Send + Sync,
{
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        _state: &S,
    ) -> Result<Self, Self::Rejection> {
        let query = parts.uri.query().unwrap_or_default();
        let deserializer =
            serde_urlencoded::Deserializer::new(form_urlencoded::parse(query.as_bytes()));
        serde_path_to_error::deserialize(deserializer)
            .map(ApiQuery)
            .map_err(|failure| {
                let field = failure.path().to_string();
                let message = format!("query parameter {field}: {}", failure.inner());
                let refusal = error(StatusCode::BAD_REQUEST, "invalid_request", message);
                if field == "." {
                    refusal
                } else {
                    refusal.field(field)
                }
            })
    }
}

/// The key a request presents: HTTP Basic user name (Segment's way) or a Bearer token.
fn presented_key(headers: &HeaderMap) -> Option<String> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?.trim();
    if let Some(token) = value.strip_prefix("Bearer ") {
        return Some(token.trim().to_string());
    }
    let encoded = value.strip_prefix("Basic ")?;
    let decoded = base64::engine::general_purpose::STANDARD
        .decode(encoded.trim())
        .ok()?;
    let text = String::from_utf8(decoded).ok()?;
    Some(
        text.split_once(':')
            .map_or(text.as_str(), |(user, _)| user)
            .to_string(),
    )
}

/// Checks a write key (and, for a browser's request, that it allows the page's origin) and
/// takes one request of its rate limit.
fn check_write_key(
    state: &AppState,
    key: Option<&str>,
    origin: Option<&str>,
) -> Result<(), ApiError> {
    let Some(key) = key else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing write key: send it as the HTTP Basic user name, as Segment clients do, or as `writeKey` in the body",
        ));
    };
    let Some(record) = state.engine.key_record(key) else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key",
        ));
    };
    if record.kind != KeyKind::Write {
        return Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this is an admin key; the tracking API (/v1/*) needs a write key (cible key create --write)",
        ));
    }
    crate::browser::check_origin(&record, origin)?;
    rate_limit(state, key, &record)
}

/// Takes one request of a key's rate limit, or answers 429 with the seconds to wait.
pub(crate) fn rate_limit(
    state: &AppState,
    key: &str,
    record: &cible_core::keys::KeyRecord,
) -> Result<(), ApiError> {
    let Some(rate) = record.rate_limit else {
        return Ok(());
    };
    state
        .limiter
        .take(key, rate, std::time::Instant::now())
        .map_err(|wait| {
            let seconds = crate::ratelimit::retry_after_secs(wait);
            error(
                StatusCode::TOO_MANY_REQUESTS,
                "rate_limited",
                format!(
                    "key {} is limited to {rate} requests a second; retry in {seconds} s",
                    record.prefix
                ),
            )
            .retry_after(u32::try_from(seconds).unwrap_or(u32::MAX))
        })
}

/// Checks the admin key; returns who acts, as the audit log names them: `cli` (a command
/// through the server's local credential) or `api:` and the key's prefix.
pub(crate) fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<String, ApiError> {
    let presented = presented_key(headers);
    if presented
        .as_deref()
        .is_some_and(|key| crate::local::same_token(key, &state.local_token))
    {
        return Ok("cli".into());
    }
    let Some(key) = presented.as_deref() else {
        return Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing admin key: send `Authorization: Bearer <admin key>`",
        ));
    };
    match state.engine.key_record(key) {
        // A read key's requests other than reads were refused before (`read_scope`).
        Some(record) if matches!(record.kind, KeyKind::Admin | KeyKind::Read) => {
            rate_limit(state, key, &record)?;
            Ok(format!("api:{}", key.get(..12).unwrap_or_default()))
        }
        Some(_) => Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this is a write key; the admin API needs an admin key (cible key create --admin)",
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown admin key",
        )),
    }
}

/// Reads a body of at most `limit` bytes, gunzipping it when `Content-Encoding: gzip`.
pub(crate) async fn read_body(
    headers: &HeaderMap,
    body: Body,
    limit: usize,
) -> Result<Vec<u8>, ApiError> {
    let too_large = |size: &str| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "request body is {size} bytes, the limit is {limit} (Segment's limits: 32 KB a message, 500 KB a batch)"
            ),
        )
    };
    let raw = read_bounded(body, limit)
        .await?
        .ok_or_else(|| too_large(&format!("more than {limit}")))?;
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw);
    }
    let mut decoded = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(raw.as_slice()).take(limit as u64 + 1);
    decoder.read_to_end(&mut decoded).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_gzip",
            format!("the gzip body cannot be decoded: {e}"),
        )
    })?;
    if decoded.len() > limit {
        return Err(too_large(&format!("more than {limit} once decompressed")));
    }
    Ok(decoded)
}

/// Most bytes read and thrown away after a body passes its limit, so that the client, still
/// sending, reads the 413 instead of a reset connection.
const DRAIN_LIMIT: usize = 8 << 20;

/// Admits a tracking request, or refuses it with 503 after reading and discarding its body, so
/// that a client still sending reads the 503 instead of a reset connection.
async fn admit_or_drain(
    state: &AppState,
    body: Body,
) -> Result<(tokio::sync::OwnedSemaphorePermit, Body), ApiError> {
    match state.admit() {
        Ok(permit) => Ok((permit, body)),
        Err(refusal) => {
            let _ = read_bounded(body, 0).await;
            Err(refusal)
        }
    }
}

/// The body if it fits in `limit` bytes, `None` if it does not (the rest is drained).
async fn read_bounded(mut body: Body, limit: usize) -> Result<Option<Vec<u8>>, ApiError> {
    use http_body_util::BodyExt;
    let mut bytes = Vec::new();
    let mut seen = 0usize;
    while let Some(frame) = body.frame().await {
        let frame = frame.map_err(|e| match crate::limits::timed_out(&e) {
            // The client is too slow: its place is freed and its connection closed.
            Some(limit) => error(
                StatusCode::REQUEST_TIMEOUT,
                "request_timeout",
                format!(
                    "the request body did not arrive within {} s (serve --body-timeout-secs)",
                    limit.as_secs_f64()
                ),
            ),
            None => error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("reading the body: {e}"),
            ),
        })?;
        let Ok(data) = frame.into_data() else {
            continue;
        };
        seen += data.len();
        if seen <= limit {
            bytes.extend_from_slice(&data);
        } else if seen > DRAIN_LIMIT {
            break;
        }
    }
    Ok((seen <= limit).then_some(bytes))
}

fn parse_json(bytes: &[u8]) -> Result<Value, ApiError> {
    serde_json::from_slice(bytes).map_err(|e| {
        let message = format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        );
        error(StatusCode::BAD_REQUEST, "invalid_json", message)
    })
}

async fn single(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let (_permit, body) = admit_or_drain(&state, body).await?;
    let kind = MessageType::parse(crate::browser::short_endpoint(&kind).unwrap_or(&kind))
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no endpoint /v1/{kind}"),
            )
        })?;
    let key = presented_key(&headers);
    let bytes = read_body(&headers, body, MAX_MESSAGE_BYTES).await?;
    let mut message = parse_json(&bytes)?;
    let object = message.as_object_mut().ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be a JSON object",
        )
    })?;
    let body_key = object
        .remove("writeKey")
        .and_then(|k| k.as_str().map(str::to_string));
    check_write_key(
        &state,
        key.as_deref().or(body_key.as_deref()),
        crate::browser::origin(&headers),
    )?;
    // As in Segment, the endpoint decides the type.
    object.insert(
        "type".into(),
        Value::String(format!("{kind:?}").to_lowercase()),
    );
    let ctx = ParseContext::at(state.now());
    submit(&state, vec![parse_message(message, None, &ctx).into()]).await
}

/// `/v1/batch`: messages are kept as raw slices of the body, so each is parsed once, measured
/// exactly, and quarantined as sent.
#[derive(Deserialize)]
struct BatchBody<'a> {
    #[serde(borrow)]
    batch: Option<Vec<&'a serde_json::value::RawValue>>,
    #[serde(default)]
    context: Option<serde_json::Map<String, Value>>,
    #[serde(default, rename = "writeKey")]
    write_key: Option<String>,
}

async fn batch(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let (_permit, body) = admit_or_drain(&state, body).await?;
    let key = presented_key(&headers);
    let bytes = read_body(&headers, body, MAX_BATCH_BYTES).await?;
    let document: BatchBody = serde_json::from_slice(&bytes).map_err(|e| {
        let message = format!(
            "invalid batch at line {} column {}: {e}",
            e.line(),
            e.column()
        );
        match e.classify() {
            serde_json::error::Category::Data => {
                error(StatusCode::BAD_REQUEST, "invalid_request", message).field("batch")
            }
            _ => error(StatusCode::BAD_REQUEST, "invalid_json", message),
        }
    })?;
    check_write_key(
        &state,
        key.as_deref().or(document.write_key.as_deref()),
        crate::browser::origin(&headers),
    )?;
    let Some(messages) = document.batch else {
        let message = "the body must be {\"batch\": [messages]}";
        return Err(error(StatusCode::BAD_REQUEST, "invalid_request", message).field("batch"));
    };
    for (index, message) in messages.iter().enumerate() {
        let size = message.get().len();
        if size > MAX_MESSAGE_BYTES {
            let message = format!(
                "batch[{index}] is {size} bytes, the limit for one message is {MAX_MESSAGE_BYTES}"
            );
            return Err(
                error(StatusCode::PAYLOAD_TOO_LARGE, "payload_too_large", message).field("batch"),
            );
        }
    }
    let ctx = ParseContext::at(state.now());
    let items = messages
        .into_iter()
        .map(|raw| match &document.context {
            None => parse_message_text(raw.get(), &ctx).into(),
            Some(shared) => {
                // Segment merges a batch-level context into each message's own.
                let mut message: Value =
                    serde_json::from_str(raw.get()).expect("a raw value is valid JSON");
                if let Some(object) = message.as_object_mut() {
                    let context = object.entry("context").or_insert_with(|| json!({}));
                    if let Some(context) = context.as_object_mut() {
                        for (k, v) in shared {
                            context.entry(k.clone()).or_insert_with(|| v.clone());
                        }
                    }
                }
                parse_message(message, Some(raw.get()), &ctx).into()
            }
        })
        .collect();
    submit(&state, items).await
}

/// Queues the messages for the writer and answers once they are durable.
async fn submit(state: &AppState, mut items: Vec<Incoming>) -> ApiResult {
    let received = std::time::Instant::now();
    // Packed here, on the request's thread, not on the one writer.
    let packer = state.engine.packer();
    for item in &mut items {
        item.pack(packer);
    }
    let answer = submit_inner(state, items).await;
    state.engine.metrics.ack_latency.observe(received.elapsed());
    answer
}

async fn submit_inner(state: &AppState, items: Vec<Incoming>) -> ApiResult {
    let (reply, answer) = oneshot::channel();
    if let Err(send_error) = state.jobs.try_send(Some(Job { items, reply })) {
        let message = match send_error {
            mpsc::error::TrySendError::Full(_) => "the writer is saturated; retry after the delay",
            mpsc::error::TrySendError::Closed(_) => "the server is shutting down",
        };
        return Err(error(StatusCode::SERVICE_UNAVAILABLE, "overloaded", message).retry_after(1));
    }
    match answer.await {
        Ok(Ok(outcome)) => {
            let body = json!({
                "success": true,
                "accepted": outcome.accepted,
                "duplicates": outcome.duplicates,
                "quarantined": outcome.quarantined,
            });
            Ok((StatusCode::OK, axum::Json(body)).into_response())
        }
        Ok(Err(message)) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            message,
        )
        .retry_after(5)),
        Err(_) => Err(error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the writer stopped",
        )),
    }
}

/// A `limit` query parameter: `default` when absent, else 1 to `max` (400 naming it).
pub(crate) fn page_limit(
    limit: Option<usize>,
    default: usize,
    max: usize,
) -> Result<usize, ApiError> {
    let limit = limit.unwrap_or(default);
    if (1..=max).contains(&limit) {
        Ok(limit)
    } else {
        Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit must be between 1 and {max}, found {limit}"),
        )
        .field("limit"))
    }
}

/// Runs blocking work (store access) off the async workers.
pub(crate) async fn off_thread<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    tokio::task::spawn_blocking(work).await.map_err(|join| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            join.to_string(),
        )
    })?
}

/// Runs store reads off the async workers and answers JSON.
pub(crate) async fn blocking<T: serde::Serialize + Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> ApiResult {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => Ok(axum::Json(result?).into_response()),
        Err(join) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            join.to_string(),
        )),
    }
}

/// Admin work (segment edits, previews, refreshes, training) on a thread of its own at a lower
/// priority: ingestion keeps its CPU meanwhile.
pub(crate) async fn admin_job<T: Send + 'static>(
    engine: &Arc<Engine>,
    work: impl FnOnce() -> Result<T, ApiError> + Send + 'static,
) -> Result<T, ApiError> {
    let (sender, receiver) = oneshot::channel();
    let engine = Arc::clone(engine);
    std::thread::Builder::new()
        .name("cible-admin".into())
        .spawn(move || {
            crate::priority::lower();
            let running = &engine.metrics.admin_jobs;
            running.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let _ = sender.send(work());
            running.fetch_sub(1, std::sync::atomic::Ordering::Relaxed);
        })
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("starting an admin thread: {e}"),
            )
        })?;
    receiver.await.map_err(|_| {
        error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            "the admin thread panicked",
        )
    })?
}

/// [`admin_job`] answering JSON.
pub(crate) async fn admin_blocking<T: serde::Serialize + Send + 'static>(
    engine: &Arc<Engine>,
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> ApiResult {
    let answer = admin_job(engine, move || work().map_err(ApiError::from)).await?;
    Ok(axum::Json(answer).into_response())
}

/// [`admin_blocking`] for long admin work (training): when the client goes away, or the server
/// stops, the work is cancelled at its next step and nothing it half-made is saved.
pub(crate) async fn cancellable<T: serde::Serialize + Send + 'static>(
    engine: &Arc<Engine>,
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> ApiResult {
    /// Dropped with the request's future: when the client left, or when the answer is sent.
    struct CancelOnDrop(Arc<std::sync::atomic::AtomicBool>);
    impl Drop for CancelOnDrop {
        fn drop(&mut self) {
            self.0.store(true, std::sync::atomic::Ordering::Relaxed);
        }
    }
    let flag = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let _cancel = CancelOnDrop(Arc::clone(&flag));
    admin_blocking(engine, move || cible_core::cancel::scope(flag, work)).await
}

async fn api_quality(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.quality()).await
}

#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    reason: Option<String>,
    limit: Option<usize>,
}

fn parse_reason(text: Option<&str>) -> Result<Option<Reason>, ApiError> {
    text.map(|text| {
        serde_json::from_value(Value::String(text.to_string())).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown reason {text:?}"),
            )
            .field("reason")
        })
    })
    .transpose()
}

async fn api_quarantine(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<QuarantineQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let reason = parse_reason(query.reason.as_deref())?;
    let engine = Arc::clone(&state.engine);
    let limit = query.limit.unwrap_or(100).min(10_000);
    blocking(move || engine.quarantined(reason, limit)).await
}

async fn api_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<QuarantineQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let reason = parse_reason(query.reason.as_deref())?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || engine.replay_quarantine(reason, now)).await
}

#[derive(Debug, Deserialize)]
struct TimelineParams {
    offset: Option<usize>,
    limit: Option<usize>,
    #[serde(rename = "type")]
    kind: Option<String>,
}

async fn api_profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<TimelineParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let kind = params
        .kind
        .as_deref()
        .map(|text| {
            MessageType::parse(text).ok_or_else(|| {
                let message = format!(
                    "unknown type {text:?}; expected track, identify, page, screen, alias or group"
                );
                error(StatusCode::BAD_REQUEST, "invalid_request", message).field("type")
            })
        })
        .transpose()?;
    let query = TimelineQuery {
        kind,
        offset: params.offset.unwrap_or(0),
        limit: params.limit.unwrap_or(50).min(1000),
    };
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || profile_view(&engine, &id, query, now)).await
}

/// `GET /api/profiles/{id}/export`: everything held on the person (right of access).
async fn api_access_export(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        let document = cible_core::view::access_export(&engine, &id, now)?;
        cible_core::audit::with_actor(&actor, || {
            crate::commands::audit_access(&engine, &document)
        })?;
        Ok(document)
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteParams {
    #[serde(default)]
    erase: Option<bool>,
}

/// `DELETE /api/profiles/{id}`: removes the profile; with `?erase=true`, erases the person
/// (nothing of their identifiers left in any file, later messages refused) and answers the
/// receipt.
async fn api_delete_profile(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<DeleteParams>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    if params.erase == Some(true) {
        return admin_blocking(&state.engine, move || {
            let profile = profile_of(&engine, &id)?;
            cible_core::audit::with_actor(&actor, || engine.erase_profile(profile))
        })
        .await;
    }
    blocking(move || {
        let profile = profile_of(&engine, &id)?;
        cible_core::audit::with_actor(&actor, || engine.remove_profile(profile))
    })
    .await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RecommendParams {
    n: Option<usize>,
}

async fn api_recommendations(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiQuery(params): ApiQuery<RecommendParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let n = params.n.unwrap_or(4);
    if !(1..=100).contains(&n) {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("n must be between 1 and 100, found {n}"),
        )
        .field("n"));
    }
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        let profile = profile_of(&engine, &id)?;
        Ok(serde_json::json!({"profile": profile, "items": engine.recommend(profile, n, now)?}))
    })
    .await
}

async fn api_computed_traits(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        let profile = profile_of(&engine, &id)?;
        engine.computed_traits(profile, now)
    })
    .await
}

async fn api_trait_config(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    Ok(axum::Json(state.engine.trait_config().clone()).into_response())
}

async fn api_trait_refresh(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || {
        cible_core::audit::with_actor(&actor, || engine.refresh_traits(now))
    })
    .await
}

/// The profile a path names (number, userId, anonymousId or e-mail), or 404.
pub(crate) fn profile_of(engine: &Engine, id: &str) -> Result<u32, EngineError> {
    engine
        .find_profile(id)
        .ok_or_else(|| EngineError::NotFound(format!("profile {id:?}")))
}

async fn api_merges(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || {
        Ok(engine
            .all_merges()?
            .into_iter()
            .map(cible_core::view::merge_view)
            .collect::<Vec<_>>())
    })
    .await
}

async fn api_unmerge(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || {
        cible_core::audit::with_actor(&actor, || engine.unmerge(id, now))
    })
    .await
}

async fn api_create_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    body: Body,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 4096).await?;
    let mut decoder = serde_json::Deserializer::from_slice(&bytes);
    let request: cible_core::keys::KeySpec = serde_path_to_error::deserialize(&mut decoder)
        .map_err(|e| {
            let field = e.path().to_string();
            let message = format!(
                "expected {{\"kind\": \"write\"|\"admin\"|\"read\", \"name\", \"origins\", \"rate_limit\"}}: {}",
                e.inner()
            );
            error(StatusCode::BAD_REQUEST, "invalid_request", message)
                .field(if field == "." { "kind".into() } else { field })
        })?;
    let kind = request.kind;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let key = off_thread(move || {
        cible_core::audit::with_actor(&actor, || engine.create_key_with(request, now))
            .map_err(ApiError::from)
    })
    .await?;
    Ok((
        StatusCode::CREATED,
        axum::Json(json!({"key": key, "kind": kind})),
    )
        .into_response())
}

/// A read key reads the admin API and changes nothing: its requests other than GET and HEAD
/// are refused with 403 before any handler runs.
async fn read_scope(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    let reading = matches!(
        *request.method(),
        axum::http::Method::GET | axum::http::Method::HEAD
    );
    if !reading
        && request.uri().path().starts_with("/api/")
        && presented_key(request.headers())
            .is_some_and(|key| state.engine.key_kind(&key) == Some(KeyKind::Read))
    {
        return error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this is a read key: it reads the admin API (GET) and changes nothing; use an admin key",
        )
        .into_response();
    }
    next.run(request).await
}

/// `GET /api/retention`: the policy of `retention.toml`.
async fn api_retention(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    Ok(axum::Json(state.engine.retention()).into_response())
}

/// `POST /api/retention/run`: purges what the policy says is expired, now.
async fn api_retention_run(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || {
        cible_core::audit::with_actor(&actor, || engine.purge_expired(now))
    })
    .await
}

/// `POST /api/pseudonym/rotate`: a new pseudonym key, the old one destroyed.
async fn api_rotate_pseudonym(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || {
        cible_core::audit::with_actor(&actor, || engine.rotate_pseudonym_key(now))
            .map(|version| json!({"version": version}))
    })
    .await
}

/// `DELETE /api/keys/{prefix}`: revokes a key (by the prefix `GET /api/keys` shows, or the key).
async fn api_revoke_key(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(prefix): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || cible_core::audit::with_actor(&actor, || engine.revoke_key(&prefix, now)))
        .await
}

async fn api_list_keys(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    Ok(axum::Json(state.engine.list_keys()).into_response())
}

/// Segments the demo starts with (and `likely-buyers`, on the demo's purchase model).
const DEMO_SEGMENTS: [(&str, &str); 6] = [
    (
        "big-spenders",
        r#"sum("Order Completed".revenue, 365d) > 500"#,
    ),
    (
        "cart-abandoners",
        r#""Product Added" then not "Order Completed" within 24h and did("Product Added", 7d)"#,
    ),
    ("lapsed-buyers", r#"days_since("Order Completed") > 30"#),
    (
        "blog-readers-or-pro",
        r#"count("Page Viewed" where path starts_with "/blog/", 14d) >= 2 or trait.plan = "pro""#,
    ),
    (
        "high-intent-engaged",
        r#"intent.level = "high" and score.engagement >= 60"#,
    ),
    (
        "win-back",
        r#"rfm.segment in ("at_risk", "cannot_lose", "hibernating") and score.engagement >= 40"#,
    ),
];

/// The demo's models: behavioural clusters, and purchase within 30 days (boosted trees) or
/// within half the history when it is shorter than 60 days. Returns the purchase model's name.
fn train_demo_models(engine: &Engine, days: u32, now: i64) -> anyhow::Result<String> {
    use cible_core::models::propensity::{Algorithm, PropensityParams, Target};
    let params = cible_core::models::ClusterParams {
        min_k: 2,
        max_k: 6,
        restarts: 2,
        sample: 2000,
        seed: 1,
    };
    let (clustering, model) = engine.cluster(now, &params)?;
    engine.save_model(model, now)?;
    for cluster in &clustering.clusters {
        println!(
            "demo cluster {} ({} profiles): {}",
            cluster.id, cluster.size, cluster.description
        );
    }
    let params = PropensityParams {
        target: Target::Purchase,
        horizon_days: (days / 2).clamp(1, 30),
        algorithm: Algorithm::BoostedTrees,
    };
    let (report, model) = engine.train_propensity(&params, now)?;
    engine.save_model(model, now)?;
    println!(
        "demo model {}: held-out AUC {:.3} (read as predicted.{})",
        report.model, report.auc, report.model
    );
    Ok(report.model)
}

/// `serve --demo`: demo data and segments into an empty store, then fresh keys, printed (once:
/// a later `--demo` start on the same directory names the keys it made and makes no more).
/// Loads the demo into an empty store and prints its keys; returns whether the demo's keys are
/// there (false on a store with data of its own, which gets no demo).
fn seed_demo(engine: &Engine, args: &ServeArgs, now: i64) -> anyhow::Result<bool> {
    let had_demo = engine
        .list_keys()
        .iter()
        .any(|k| k.name.starts_with("demo "));
    if engine.load_stats().events > 0 && !had_demo {
        // Someone's own data: no demo data goes in, and no demo keys are minted.
        println!(
            "--demo: this data directory already holds {} events of its own; no demo data loaded (use an empty --data directory for the demo)",
            engine.load_stats().events
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        return Ok(false);
    }
    if engine.load_stats().events == 0 {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("demo.jsonl");
        let options = cible_core::generate::GenerateOptions {
            profiles: args.demo_profiles,
            days: args.demo_days,
            seed: 42,
            end_ms: now,
        };
        cible_core::generate::write_file(&options, &path)?;
        let progress = Arc::default();
        let summary = cible_core::import::import_files(engine, &[path], now, &progress)?;
        println!(
            "demo data: {} events for {} profiles ({} messages quarantined, {} duplicates) in {:.1}s",
            summary.accepted,
            engine.load_stats().profiles,
            summary.quarantined,
            summary.duplicates,
            summary.seconds
        );
        let report = engine.refresh_traits(now)?;
        for name in &report.created_segments {
            let size = engine.segment(name)?.size;
            println!("lifecycle segment {name}: {size} members");
        }
        let purchase = train_demo_models(engine, args.demo_days, now)?;
        let likely_buyers =
            format!(r#"predicted.{purchase} >= 0.7 and not did("Order Completed", 7d)"#);
        let segments = DEMO_SEGMENTS
            .iter()
            .map(|(name, rule)| (*name, *rule))
            .chain([("likely-buyers", likely_buyers.as_str())]);
        for (name, rule) in segments {
            let expr = cible_lang::parse(rule).map_err(|d| anyhow::anyhow!(d.message))?;
            let record = engine.create_segment(name, expr, rule, now)?;
            println!("demo segment {name}: {} members  ({rule})", record.size);
        }
    }
    let demo_keys: Vec<String> = engine
        .list_keys()
        .into_iter()
        .filter(|k| k.name.starts_with("demo "))
        .map(|k| format!("{} ({}...)", k.name, k.prefix))
        .collect();
    if !demo_keys.is_empty() {
        // Keys are stored hashed: they were shown once, at the first demo start.
        println!(
            "demo data and keys already here: {} (printed at the first start; `cible key create --admin` beside this server makes another)",
            demo_keys.join(", ")
        );
        std::io::Write::flush(&mut std::io::stdout())?;
        return Ok(true);
    }
    let write = engine.create_key(KeyKind::Write, "demo write key", now)?;
    let admin = engine.create_key(KeyKind::Admin, "demo admin key", now)?;
    println!("write key: {write}");
    println!("admin key: {admin}");
    println!(
        "try: curl -s http://{}/api/profiles/user-7 -H 'Authorization: Bearer {admin}'",
        args.listen
    );
    std::io::Write::flush(&mut std::io::stdout())?;
    Ok(true)
}
