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
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use base64::Engine as _;
use cible_core::engine::BatchOutcome;
use cible_core::keys::KeyKind;
use cible_core::message::{MAX_BATCH_BYTES, MAX_MESSAGE_BYTES, ParseContext, parse_message};
use cible_core::quality::Reason;
use cible_core::view::{TimelineQuery, profile_view};
use cible_core::{Durability, Engine, EngineError, Incoming, MessageType};
use clap::Args;
use serde::Deserialize;
use serde_json::{Value, json};
use tokio::sync::{mpsc, oneshot};

use crate::Global;

#[derive(Debug, Args)]
pub struct ServeArgs {
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
    /// Requests that may wait for the writer before the API answers 503.
    #[arg(long, default_value_t = 64)]
    pub queue: usize,
}

/// A request's messages waiting for the writer.
struct Job {
    items: Vec<Incoming>,
    reply: oneshot::Sender<Result<BatchOutcome, String>>,
}

#[derive(Clone)]
struct AppState {
    engine: Arc<Engine>,
    jobs: mpsc::Sender<Job>,
    pinned_now: Option<i64>,
}

impl AppState {
    fn now(&self) -> i64 {
        self.pinned_now
            .unwrap_or_else(cible_core::time::wall_clock_ms)
    }
}

pub fn run(global: &Global, args: ServeArgs) -> anyhow::Result<()> {
    let engine = Arc::new(global.open()?);
    let pinned_now = global.pinned_now()?;
    let loaded = engine.load_stats();
    tracing::info!(
        events = loaded.events,
        profiles = loaded.profiles,
        "store loaded"
    );
    if args.demo {
        seed_demo(
            &engine,
            &args,
            pinned_now.unwrap_or_else(cible_core::time::wall_clock_ms),
        )?;
    }
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    runtime.block_on(serve(engine, args.listen, args.queue, pinned_now))
}

/// Serves until SIGINT/SIGTERM; then drains the writer so every accepted request is answered.
async fn serve(
    engine: Arc<Engine>,
    listen: SocketAddr,
    queue: usize,
    pinned_now: Option<i64>,
) -> anyhow::Result<()> {
    let (jobs, receiver) = mpsc::channel(queue.max(1));
    let writer_engine = Arc::clone(&engine);
    let writer = std::thread::Builder::new()
        .name("cible-writer".into())
        .spawn(move || writer_loop(&writer_engine, receiver, pinned_now))?;
    let state = AppState {
        engine,
        jobs,
        pinned_now,
    };
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("listening on {listen}"))?;
    println!("cible listening on http://{}", listener.local_addr()?);
    axum::serve(listener, router(state))
        .with_graceful_shutdown(shutdown_signal())
        .await?;
    writer
        .join()
        .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?;
    Ok(())
}

async fn shutdown_signal() {
    let mut terminate = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
        .expect("SIGTERM handler installs");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
    tracing::info!("shutting down");
}

/// Most messages the writer puts in one group commit.
const GROUP_COMMIT_MESSAGES: usize = 100_000;

fn writer_loop(engine: &Engine, mut receiver: mpsc::Receiver<Job>, pinned_now: Option<i64>) {
    while let Some(first) = receiver.blocking_recv() {
        let mut n_messages = first.items.len();
        let mut jobs = vec![first];
        while n_messages < GROUP_COMMIT_MESSAGES {
            match receiver.try_recv() {
                Ok(job) => {
                    n_messages += job.items.len();
                    jobs.push(job);
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
        .route("/v1/batch", post(batch))
        .route("/v1/import", post(batch))
        .route("/v1/{kind}", post(single))
        .route("/api/quality", get(api_quality))
        .route("/api/quality/quarantine", get(api_quarantine))
        .route("/api/quality/replay", post(api_replay))
        .route("/api/profiles/{id}", get(api_profile))
        .route("/api/merges", get(api_merges))
        .route("/api/merges/{id}/unmerge", post(api_unmerge))
        .route("/api/keys", post(api_create_key).get(api_list_keys))
        .fallback(|| async {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such endpoint".into(),
                None,
            )
        })
        .with_state(state)
}

/// The one JSON error shape: `{"error": {"code", "message", "field"?}}`.
fn error(status: StatusCode, code: &str, message: String, field: Option<&str>) -> Response {
    let mut body = json!({"error": {"code": code, "message": message}});
    if let Some(field) = field {
        body["error"]["field"] = json!(field);
    }
    (status, axum::Json(body)).into_response()
}

fn engine_error(failure: EngineError) -> Response {
    match failure {
        EngineError::NotFound(what) => error_404(what),
        EngineError::Invalid(message) => {
            error(StatusCode::BAD_REQUEST, "invalid_request", message, None)
        }
        other => error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            other.to_string(),
            None,
        ),
    }
}

fn error_404(what: String) -> Response {
    error(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("{what} not found"),
        None,
    )
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

fn check_write_key(state: &AppState, key: Option<&str>) -> Result<(), Response> {
    match key {
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing write key: send it as the HTTP Basic user name, as Segment clients do".into(),
            None,
        )),
        Some(key) if state.engine.key_kind(key).is_some() => Ok(()),
        Some(_) => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown write key".into(),
            None,
        )),
    }
}

fn check_admin(state: &AppState, headers: &HeaderMap) -> Result<(), Response> {
    match presented_key(headers)
        .as_deref()
        .map(|key| state.engine.key_kind(key))
    {
        Some(Some(KeyKind::Admin)) => Ok(()),
        Some(Some(KeyKind::Write)) => Err(error(
            StatusCode::FORBIDDEN,
            "forbidden",
            "this is a write key; the admin API needs an admin key (cible key create --admin)"
                .into(),
            None,
        )),
        Some(None) => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "unknown admin key".into(),
            None,
        )),
        None => Err(error(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "missing admin key: send `Authorization: Bearer <admin key>`".into(),
            None,
        )),
    }
}

/// Reads a body of at most `limit` bytes, gunzipping it when `Content-Encoding: gzip`.
async fn read_body(headers: &HeaderMap, body: Body, limit: usize) -> Result<Vec<u8>, Response> {
    let too_large = |size: String| {
        error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "payload_too_large",
            format!(
                "request body is {size} bytes, the limit is {limit} (Segment's limits: 32 KB a message, 500 KB a batch)"
            ),
            None,
        )
    };
    let raw = axum::body::to_bytes(body, limit)
        .await
        .map_err(|_| too_large(format!("more than {limit}")))?;
    let gzip = headers
        .get(header::CONTENT_ENCODING)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("gzip"));
    if !gzip {
        return Ok(raw.to_vec());
    }
    let mut decoded = Vec::new();
    let mut decoder = flate2::read::GzDecoder::new(raw.as_ref()).take(limit as u64 + 1);
    decoder.read_to_end(&mut decoded).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_gzip",
            format!("the gzip body cannot be decoded: {e}"),
            None,
        )
    })?;
    if decoded.len() > limit {
        return Err(too_large(format!("more than {limit} once decompressed")));
    }
    Ok(decoded)
}

fn parse_json(bytes: &[u8]) -> Result<Value, Response> {
    serde_json::from_slice(bytes).map_err(|e| {
        let message = format!(
            "invalid JSON at line {} column {}: {e}",
            e.line(),
            e.column()
        );
        error(StatusCode::BAD_REQUEST, "invalid_json", message, None)
    })
}

async fn single(
    State(state): State<AppState>,
    Path(kind): Path<String>,
    headers: HeaderMap,
    body: Body,
) -> Response {
    let Some(kind) = MessageType::parse(&kind) else {
        return error(
            StatusCode::NOT_FOUND,
            "not_found",
            format!("no endpoint /v1/{kind}"),
            None,
        );
    };
    let key = presented_key(&headers);
    let bytes = match read_body(&headers, body, MAX_MESSAGE_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let mut message = match parse_json(&bytes) {
        Ok(value) => value,
        Err(response) => return response,
    };
    let Some(object) = message.as_object_mut() else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be a JSON object".into(),
            None,
        );
    };
    let body_key = object
        .remove("writeKey")
        .and_then(|k| k.as_str().map(str::to_string));
    if let Err(response) = check_write_key(&state, key.as_deref().or(body_key.as_deref())) {
        return response;
    }
    // As in Segment, the endpoint decides the type.
    object.insert(
        "type".into(),
        Value::String(format!("{kind:?}").to_lowercase()),
    );
    let ctx = ParseContext::at(state.now());
    submit(&state, vec![parse_message(message, None, &ctx).into()]).await
}

async fn batch(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    let key = presented_key(&headers);
    let bytes = match read_body(&headers, body, MAX_BATCH_BYTES).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let mut document = match parse_json(&bytes) {
        Ok(value) => value,
        Err(response) => return response,
    };
    let body_key = document
        .get("writeKey")
        .and_then(Value::as_str)
        .map(str::to_string);
    if let Err(response) = check_write_key(&state, key.as_deref().or(body_key.as_deref())) {
        return response;
    }
    let shared_context = document.get("context").and_then(Value::as_object).cloned();
    let Some(Value::Array(messages)) = document.get_mut("batch").map(Value::take) else {
        return error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "the body must be {\"batch\": [messages]}".into(),
            Some("batch"),
        );
    };
    for (index, message) in messages.iter().enumerate() {
        let size = serde_json::to_vec(message).map(|v| v.len()).unwrap_or(0);
        if size > MAX_MESSAGE_BYTES {
            return error(
                StatusCode::PAYLOAD_TOO_LARGE,
                "payload_too_large",
                format!(
                    "batch[{index}] is {size} bytes, the limit for one message is {MAX_MESSAGE_BYTES}"
                ),
                Some("batch"),
            );
        }
    }
    let ctx = ParseContext::at(state.now());
    let items = messages
        .into_iter()
        .map(|mut message| {
            if let (Some(shared), Some(object)) = (&shared_context, message.as_object_mut()) {
                let context = object.entry("context").or_insert_with(|| json!({}));
                if let Some(context) = context.as_object_mut() {
                    for (k, v) in shared {
                        context.entry(k.clone()).or_insert_with(|| v.clone());
                    }
                }
            }
            parse_message(message, None, &ctx).into()
        })
        .collect();
    submit(&state, items).await
}

/// Queues the messages for the writer and answers once they are durable.
async fn submit(state: &AppState, items: Vec<Incoming>) -> Response {
    let (reply, answer) = oneshot::channel();
    if let Err(send_error) = state.jobs.try_send(Job { items, reply }) {
        let message = match send_error {
            mpsc::error::TrySendError::Full(_) => "the writer is saturated; retry after the delay",
            mpsc::error::TrySendError::Closed(_) => "the server is shutting down",
        };
        let mut response = error(
            StatusCode::SERVICE_UNAVAILABLE,
            "overloaded",
            message.into(),
            None,
        );
        response
            .headers_mut()
            .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
        return response;
    }
    match answer.await {
        Ok(Ok(outcome)) => {
            let body = json!({
                "success": true,
                "accepted": outcome.accepted,
                "duplicates": outcome.duplicates,
                "quarantined": outcome.quarantined,
            });
            (StatusCode::OK, axum::Json(body)).into_response()
        }
        Ok(Err(message)) => {
            let mut response = error(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                message,
                None,
            );
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static("5"));
            response
        }
        Err(_) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "store_unavailable",
            "the writer stopped".into(),
            None,
        ),
    }
}

async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, EngineError> + Send + 'static,
) -> Result<T, Response> {
    match tokio::task::spawn_blocking(work).await {
        Ok(result) => result.map_err(engine_error),
        Err(join) => Err(error(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            join.to_string(),
            None,
        )),
    }
}

fn ok_json<T: serde::Serialize>(result: Result<T, Response>) -> Response {
    match result {
        Ok(value) => axum::Json(value).into_response(),
        Err(response) => response,
    }
}

async fn api_quality(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let engine = Arc::clone(&state.engine);
    ok_json(blocking(move || engine.quality()).await)
}

#[derive(Debug, Deserialize)]
struct QuarantineQuery {
    reason: Option<String>,
    limit: Option<usize>,
}

fn parse_reason(text: Option<&str>) -> Result<Option<Reason>, Response> {
    text.map(|text| {
        serde_json::from_value(Value::String(text.to_string())).map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("unknown reason {text:?}"),
                Some("reason"),
            )
        })
    })
    .transpose()
}

async fn api_quarantine(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<QuarantineQuery>,
) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let reason = match parse_reason(query.reason.as_deref()) {
        Ok(reason) => reason,
        Err(response) => return response,
    };
    let engine = Arc::clone(&state.engine);
    let limit = query.limit.unwrap_or(100).min(10_000);
    ok_json(blocking(move || engine.quarantined(reason, limit)).await)
}

async fn api_replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    Query(query): Query<QuarantineQuery>,
) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let reason = match parse_reason(query.reason.as_deref()) {
        Ok(reason) => reason,
        Err(response) => return response,
    };
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    ok_json(blocking(move || engine.replay_quarantine(reason, now)).await)
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
    Query(params): Query<TimelineParams>,
) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let kind = match params
        .kind
        .as_deref()
        .map(|k| MessageType::parse(k).ok_or(k))
        .transpose()
    {
        Ok(kind) => kind,
        Err(text) => {
            let message = format!(
                "unknown type {text:?}; expected track, identify, page, screen, alias or group"
            );
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                message,
                Some("type"),
            );
        }
    };
    let query = TimelineQuery {
        kind,
        offset: params.offset.unwrap_or(0),
        limit: params.limit.unwrap_or(50).min(1000),
    };
    let engine = Arc::clone(&state.engine);
    ok_json(blocking(move || profile_view(&engine, &id, query)).await)
}

async fn api_merges(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let engine = Arc::clone(&state.engine);
    ok_json(
        blocking(move || {
            Ok(engine
                .all_merges()?
                .into_iter()
                .map(cible_core::view::merge_view)
                .collect::<Vec<_>>())
        })
        .await,
    )
}

async fn api_unmerge(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<u64>,
) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    ok_json(blocking(move || engine.unmerge(id, now)).await)
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct CreateKey {
    kind: KeyKind,
    #[serde(default)]
    name: String,
}

async fn api_create_key(State(state): State<AppState>, headers: HeaderMap, body: Body) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    let bytes = match read_body(&headers, body, 4096).await {
        Ok(bytes) => bytes,
        Err(response) => return response,
    };
    let request: CreateKey = match serde_json::from_slice(&bytes) {
        Ok(request) => request,
        Err(e) => {
            let message =
                format!("expected {{\"kind\": \"write\"|\"admin\", \"name\": \"...\"}}: {e}");
            return error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                message,
                Some("kind"),
            );
        }
    };
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    match blocking(move || engine.create_key(request.kind, &request.name, now)).await {
        Ok(key) => (
            StatusCode::CREATED,
            axum::Json(json!({"key": key, "kind": request.kind})),
        )
            .into_response(),
        Err(response) => response,
    }
}

async fn api_list_keys(State(state): State<AppState>, headers: HeaderMap) -> Response {
    if let Err(response) = check_admin(&state, &headers) {
        return response;
    }
    axum::Json(state.engine.list_keys()).into_response()
}

/// `serve --demo`: demo data into an empty store, then fresh keys, printed.
fn seed_demo(engine: &Engine, args: &ServeArgs, now: i64) -> anyhow::Result<()> {
    if engine.load_stats().events == 0 {
        let dir = tempfile::tempdir()?;
        let path = dir.path().join("demo.jsonl");
        let options = cible_core::generate::GenerateOptions {
            profiles: args.demo_profiles,
            days: args.demo_days,
            seed: 42,
            end_ms: now,
        };
        crate::commands::write_generated(&options, &path)?;
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
    Ok(())
}
