//! `/api/webhooks`: subscriptions (create, list, show, delete, rotate, enable, disable), dead
//! letters and their replay. Each handler decodes its request into a [`crate::webhook::Op`],
//! the same the CLI runs, and wakes the sender after a change.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use serde::Deserialize;

use crate::server::{
    ApiError, ApiQuery, ApiResult, AppState, check_admin, error, off_thread, read_body,
};
use crate::webhook::{CreateRequest, Op, ReplayRequest, RotateRequest};

fn webhook_id(text: &str) -> Result<u32, ApiError> {
    text.parse().map_err(|_| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("a webhook id is a number, found {text:?}"),
        )
        .field("id")
    })
}

/// A JSON body decoded into `T`, the field at fault named (an empty body is `{}`).
async fn json_body<T: serde::de::DeserializeOwned>(
    headers: &HeaderMap,
    body: Body,
    expected: &str,
) -> Result<T, ApiError> {
    let bytes = read_body(headers, body, 64 * 1024).await?;
    let bytes: &[u8] = if bytes.iter().all(u8::is_ascii_whitespace) {
        b"{}"
    } else {
        &bytes
    };
    let mut decoder = serde_json::Deserializer::from_slice(bytes);
    serde_path_to_error::deserialize(&mut decoder).map_err(|e| {
        let field = e.path().to_string();
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {expected}: {}", e.inner()),
        )
        .field(if field == "." { String::new() } else { field })
    })
}

/// Runs an operation off the async workers, then wakes the sender if it changed anything.
async fn run(state: &AppState, actor: String, op: Op, created: bool) -> ApiResult {
    let wakes = op.changes_deliveries();
    let engine = Arc::clone(&state.engine);
    let now = cible_core::time::wall_clock_ms();
    let answer = off_thread(move || {
        cible_core::audit::with_actor(&actor, || op.run(&engine, now)).map_err(ApiError::from)
    })
    .await?;
    if wakes {
        state.webhooks.wake();
    }
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((status, axum::Json(answer)).into_response())
}

/// `POST /api/webhooks`.
pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let request: CreateRequest = json_body(
        &headers,
        body,
        "{\"url\", \"segment\" | \"all_segments\" | \"lifecycle\", \"on\", \"list_every_secs\", \"purpose\", \"from\"}",
    )
    .await?;
    run(&state, actor, Op::Create(request), true).await
}

/// `GET /api/webhooks`.
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    run(&state, actor, Op::List, false).await
}

/// `GET /api/webhooks/{id}`: the subscription, its queue, and what the sender did since start.
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let id = webhook_id(&id)?;
    let engine = Arc::clone(&state.engine);
    let mut answer = off_thread(move || {
        cible_core::audit::with_actor(&actor, || Op::Show(id).run(&engine, 0))
            .map_err(ApiError::from)
    })
    .await?;
    answer["sender"] =
        serde_json::to_value(state.webhooks.stats(id).unwrap_or_default()).unwrap_or_default();
    Ok(axum::Json(answer).into_response())
}

/// `DELETE /api/webhooks/{id}`.
pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    run(&state, actor, Op::Delete(webhook_id(&id)?), false).await
}

/// `POST /api/webhooks/{id}/rotate` `{"keep_old_secs": N}`: answers the new secret.
pub async fn rotate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let id = webhook_id(&id)?;
    let request: RotateRequest = json_body(&headers, body, "{\"keep_old_secs\"}").await?;
    run(&state, actor, Op::Rotate(id, request), false).await
}

/// `POST /api/webhooks/{id}/enable`.
pub async fn enable(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    run(&state, actor, Op::Enable(webhook_id(&id)?), false).await
}

/// `POST /api/webhooks/{id}/disable`.
pub async fn disable(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    run(&state, actor, Op::Disable(webhook_id(&id)?), false).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeadQuery {
    limit: Option<usize>,
}

/// `GET /api/webhooks/{id}/dead?limit=N`.
pub async fn dead(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    ApiQuery(query): ApiQuery<DeadQuery>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let limit = crate::server::page_limit(query.limit, 100, 10_000)?;
    run(&state, actor, Op::Dead(webhook_id(&id)?, limit), false).await
}

/// `POST /api/webhooks/{id}/replay` `{"seqs": [...]}` (all dead letters when absent).
pub async fn replay(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let id = webhook_id(&id)?;
    let request: ReplayRequest =
        json_body(&headers, body, "{\"seqs\": [sequence numbers]}").await?;
    run(&state, actor, Op::Replay(id, request), false).await
}
