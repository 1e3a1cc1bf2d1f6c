//! `GET /api/cohorts/retention` and `GET /api/segments/overlap`, and the bucketed form of
//! `GET /api/segments/{name}/history?every=hour|day`: the analysis of `cible_core::analysis`.
//! Retention reads every timeline, so it runs as admin work (a thread of its own at a lower
//! priority); the overlap and the series read stored records.

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;

use cible_core::analysis::retention::Period;
use cible_core::analysis::series::Every;

use crate::server::{
    ApiError, ApiQuery, ApiResult, AppState, admin_blocking, blocking, check_admin, error,
};

/// A comma-separated list, each item trimmed.
fn list(text: &str) -> Vec<String> {
    text.split(',')
        .map(|item| item.trim().to_string())
        .filter(|item| !item.is_empty())
        .collect()
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RetentionParams {
    period: Option<String>,
    active: Option<String>,
    segment: Option<String>,
}

/// `GET /api/cohorts/retention?period=day|week|month&active=A,B&segment=NAME`.
pub async fn retention(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<RetentionParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let period = match params.period.as_deref() {
        None => Period::Week,
        Some(text) => Period::parse(text).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("period {text:?}: use day, week or month"),
            )
            .field("period")
        })?,
    };
    let query = cible_core::engine::RetentionQuery {
        period,
        active: params.active.as_deref().map(list),
        segment: params.segment,
    };
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || engine.cohort_retention(&query, now)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct OverlapParams {
    names: Option<String>,
}

/// `GET /api/segments/overlap?names=A,B,C`.
pub async fn overlap(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<OverlapParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let names = params.names.as_deref().map(list).unwrap_or_default();
    cible_core::analysis::overlap::check_names(&names).map_err(|message| {
        error(StatusCode::BAD_REQUEST, "invalid_request", message).field("names")
    })?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.segment_overlap(&names)).await
}

/// The `every` parameter of the history: `hour` or `day`.
pub fn every(text: &str) -> Result<Every, ApiError> {
    Every::parse(text).ok_or_else(|| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("every {text:?}: use hour or day"),
        )
        .field("every")
    })
}

/// `GET /api/segments/{name}/history?every=hour|day`: one point per bucket.
pub async fn series(state: &AppState, name: String, every: Every) -> ApiResult {
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || engine.size_series(&name, every, now)).await
}
