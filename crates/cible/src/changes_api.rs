//! `/api/changes`: the change feed, as pages of JSON (`?after=SEQ&limit=N`) and as a stream of
//! Server-Sent Events (`/api/changes/stream?after=SEQ`, resumable with `Last-Event-ID`). Every
//! event's id is the change's sequence number, so a client that reconnects with the last id it
//! saw gets every later change once.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use axum::response::sse::{Event, KeepAlive, Sse};
use cible_core::segment::feed::FeedChange;
use serde::Deserialize;
use serde_json::json;

use crate::server::{ApiError, ApiQuery, ApiResult, AppState, blocking, check_admin, error};

/// Most changes in one page.
pub const MAX_PAGE: usize = 10_000;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChangesQuery {
    after: Option<String>,
    limit: Option<String>,
}

fn parse_after(text: Option<&str>, field: &'static str) -> Result<u64, ApiError> {
    match text {
        None => Ok(0),
        Some(text) => text.trim().parse::<u64>().map_err(|_| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("{field} must be a change sequence number (0 or more), found {text:?}"),
            )
            .field(field)
        }),
    }
}

fn parse_limit(text: Option<&str>) -> Result<usize, ApiError> {
    let Some(text) = text else {
        return Ok(1000);
    };
    match text.trim().parse::<usize>() {
        Ok(n) if (1..=MAX_PAGE).contains(&n) => Ok(n),
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("limit must be between 1 and {MAX_PAGE}, found {text:?}"),
        )
        .field("limit")),
    }
}

/// `GET /api/changes?after=SEQ&limit=N`: changes with a sequence number above `after`.
pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let after = parse_after(query.after.as_deref(), "after")?;
    let limit = parse_limit(query.limit.as_deref())?;
    let engine = Arc::clone(&state.engine);
    blocking(move || {
        let changes = engine.changes_after(after, limit)?;
        let next = changes.last().map_or(after, |c| c.seq);
        Ok(json!({"changes": changes, "next_after": next, "head": engine.feed_head()}))
    })
    .await
}

/// What the stream keeps between events.
struct Cursor {
    after: u64,
    buffered: VecDeque<FeedChange>,
    head: tokio::sync::watch::Receiver<u64>,
    stopping: tokio::sync::watch::Receiver<bool>,
    engine: Arc<cible_core::Engine>,
}

/// `GET /api/changes/stream?after=SEQ`: every change after `after` (or after the
/// `Last-Event-ID` header, which wins), then each new one as it is written.
pub async fn stream(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ChangesQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let last_event_id = headers
        .get("last-event-id")
        .map(|v| v.to_str().unwrap_or("invalid").to_string());
    let after = match last_event_id {
        Some(id) => parse_after(Some(&id), "Last-Event-ID")?,
        None => parse_after(query.after.as_deref(), "after")?,
    };
    let cursor = Cursor {
        after,
        buffered: VecDeque::new(),
        head: state.feed_head.subscribe(),
        stopping: state.stopping.clone(),
        engine: Arc::clone(&state.engine),
    };
    let events = futures_util::stream::unfold(cursor, |mut cursor| async move {
        loop {
            if let Some(change) = cursor.buffered.pop_front() {
                cursor.after = change.seq;
                let event = Event::default()
                    .id(change.seq.to_string())
                    .event("change")
                    .json_data(&change)
                    .unwrap_or_else(|_| Event::default().comment("unserializable change"));
                return Some((Ok::<_, Infallible>(event), cursor));
            }
            if cursor.engine.feed_head() > cursor.after {
                let engine = Arc::clone(&cursor.engine);
                let after = cursor.after;
                let read =
                    tokio::task::spawn_blocking(move || engine.changes_after(after, 1000)).await;
                match read {
                    Ok(Ok(changes)) if !changes.is_empty() => {
                        cursor.buffered.extend(changes);
                        continue;
                    }
                    Ok(Ok(_)) => {}
                    // The stream ends; the client reconnects with its Last-Event-ID.
                    _ => return None,
                }
            }
            // Wait for the next commit of changes (or a second, to look again); end when the
            // server stops.
            tokio::select! {
                changed = tokio::time::timeout(Duration::from_secs(1), cursor.head.changed()) => {
                    if matches!(changed, Ok(Err(_))) {
                        return None;
                    }
                }
                _ = cursor.stopping.wait_for(|stopping| *stopping) => return None,
            }
        }
    });
    Ok(Sse::new(events)
        .keep_alive(KeepAlive::new().interval(Duration::from_secs(15)))
        .into_response())
}
