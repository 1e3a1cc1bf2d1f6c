//! `/api/models`: list the active models, train one (k-means clusters or a propensity model),
//! show a version's report, list versions, retrain, activate another version.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use cible_core::models::propensity::{Algorithm, PropensityParams, Target};
use cible_core::models::{ClusterParams, ParamError};
use serde::Deserialize;

use crate::server::{
    ApiError, ApiQuery, ApiResult, AppState, admin_blocking, blocking, cancellable, check_admin,
    error, read_body,
};

#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum Kind {
    Cluster,
    Propensity,
}

/// What to train: `{"kind": "cluster", "min_k"?...}` or `{"kind": "propensity", "target",
/// "days"?, "algorithm"?}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TrainBody {
    kind: Kind,
    target: Option<Target>,
    days: Option<u32>,
    algorithm: Option<Algorithm>,
    min_k: Option<usize>,
    max_k: Option<usize>,
    restarts: Option<usize>,
    sample: Option<usize>,
    seed: Option<u64>,
}

const FIELDS: [&str; 9] = [
    "kind",
    "target",
    "days",
    "algorithm",
    "min_k",
    "max_k",
    "restarts",
    "sample",
    "seed",
];

/// What a request asks to train, checked field by field.
enum Training {
    Cluster(ClusterParams),
    Propensity(PropensityParams),
}

fn training(bytes: &[u8]) -> Result<Training, ApiError> {
    let mut reader = serde_json::Deserializer::from_slice(bytes);
    let body: TrainBody = serde_path_to_error::deserialize(&mut reader).map_err(|e| {
        let path = e.path().to_string();
        let field = FIELDS.iter().find(|f| **f == path).copied();
        let mut error = error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("{path}: {}", e.inner()),
        );
        if let Some(field) = field {
            error = error.field(field);
        }
        error
    })?;
    let misplaced =
        |fields: &[(&'static str, bool)], kind: &str| match fields.iter().find(|(_, given)| *given)
        {
            Some((field, _)) => Err(invalid(field, format!("{field} does not apply to {kind}"))),
            None => Ok(()),
        };
    match body.kind {
        Kind::Cluster => {
            misplaced(
                &[
                    ("target", body.target.is_some()),
                    ("days", body.days.is_some()),
                    ("algorithm", body.algorithm.is_some()),
                ],
                "clusters",
            )?;
            let params = ClusterParams {
                min_k: body.min_k.unwrap_or(2),
                max_k: body.max_k.unwrap_or(8),
                restarts: body.restarts.unwrap_or(4),
                sample: body.sample.unwrap_or(2000),
                seed: body.seed.unwrap_or(1),
            };
            params.validate().map_err(out_of_bounds)?;
            Ok(Training::Cluster(params))
        }
        Kind::Propensity => {
            misplaced(
                &[
                    ("min_k", body.min_k.is_some()),
                    ("max_k", body.max_k.is_some()),
                    ("restarts", body.restarts.is_some()),
                    ("sample", body.sample.is_some()),
                    ("seed", body.seed.is_some()),
                ],
                "propensity models",
            )?;
            let target = body
                .target
                .ok_or_else(|| invalid("target", "target is required: purchase, open or churn"))?;
            let params = PropensityParams {
                target,
                horizon_days: body.days.unwrap_or(30),
                algorithm: body.algorithm.unwrap_or(Algorithm::BoostedTrees),
            };
            params.validate().map_err(out_of_bounds)?;
            Ok(Training::Propensity(params))
        }
    }
}

/// 400 naming the field and its allowed range (`cible_core::models::bounds`).
fn out_of_bounds(e: ParamError) -> ApiError {
    invalid(e.field, e.message)
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request", message).field(field)
}

/// `GET /api/models`: the active version of every model.
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.models().summaries(None)).await
}

/// `POST /api/models`: trains, stores as the next version and activates; 201 with the report.
pub async fn train(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 64 * 1024).await?;
    let request = training(&bytes)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let answer = cancellable(&state.engine, move || {
        let model = match request {
            Training::Cluster(params) => engine.cluster(now, &params)?.1,
            Training::Propensity(params) => engine.train_propensity(&params, now)?.1,
        };
        let name = model.name.clone();
        let version = cible_core::audit::with_actor(&actor, || engine.save_model(model, now))?;
        engine.models().detail(&name, Some(version))
    })
    .await?;
    Ok((StatusCode::CREATED, answer).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionQuery {
    version: Option<u32>,
}

/// `GET /api/models/{name}?version=`: a version's summary, training settings and report.
pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<VersionQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.models().detail(&name, query.version)).await
}

/// `GET /api/models/{name}/versions`: every stored version, oldest first.
pub async fn versions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.models().summaries(Some(&name))).await
}

/// `POST /api/models/{name}/retrain`: a new version with the same settings; 201.
pub async fn retrain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let answer = cancellable(&state.engine, move || {
        let version = cible_core::audit::with_actor(&actor, || engine.retrain(&name, now))?;
        engine.models().detail(&name, Some(version))
    })
    .await?;
    Ok((StatusCode::CREATED, answer).into_response())
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ActivateBody {
    version: u32,
}

/// `POST /api/models/{name}/activate` `{"version"}`: scores that version from now on.
pub async fn activate(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 4 * 1024).await?;
    let request: ActivateBody = serde_json::from_slice(&bytes)
        .map_err(|e| invalid("version", format!("expected {{\"version\": N}}: {e}")))?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    admin_blocking(&state.engine, move || {
        cible_core::audit::with_actor(&actor, || {
            engine.activate_model(&name, request.version, now)
        })?;
        Ok(engine.models().active_model(&name)?.summary(true))
    })
    .await
}
