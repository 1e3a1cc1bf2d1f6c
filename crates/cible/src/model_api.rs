//! `/api/models`: list the active models, train one (k-means clusters or a propensity model),
//! show a version's report, list versions, retrain, activate another version.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::IntoResponse;
use cible_core::models::ClusterParams;
use cible_core::models::propensity::{Algorithm, PropensityParams, Target};
use serde::Deserialize;

use crate::server::{ApiError, ApiResult, AppState, blocking, check_admin, error, read_body};

/// What to train: `{"kind": "cluster", ...}` or `{"kind": "propensity", "target", ...}`.
#[derive(Debug, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case", deny_unknown_fields)]
enum TrainBody {
    Cluster {
        #[serde(default = "two")]
        min_k: usize,
        #[serde(default = "eight")]
        max_k: usize,
        #[serde(default = "four")]
        restarts: usize,
        #[serde(default = "sample")]
        sample: usize,
        #[serde(default = "one")]
        seed: u64,
    },
    Propensity {
        target: Target,
        #[serde(default = "thirty")]
        days: u32,
        #[serde(default = "boosted")]
        algorithm: Algorithm,
    },
}

fn one() -> u64 {
    1
}
fn two() -> usize {
    2
}
fn four() -> usize {
    4
}
fn eight() -> usize {
    8
}
fn sample() -> usize {
    2000
}
fn thirty() -> u32 {
    30
}
fn boosted() -> Algorithm {
    Algorithm::BoostedTrees
}

fn invalid(field: &'static str, message: impl Into<String>) -> ApiError {
    error(StatusCode::BAD_REQUEST, "invalid_request", message).field(field)
}

/// `GET /api/models`: the active version of every model.
pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.model_summaries(None)).await
}

/// `POST /api/models`: trains, stores as the next version and activates; 201 with the report.
pub async fn train(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 64 * 1024).await?;
    let request: TrainBody = serde_json::from_slice(&bytes).map_err(|e| {
        invalid(
            "kind",
            format!(
                "expected {{\"kind\": \"cluster\", \"min_k\"?, \"max_k\"?, \"restarts\"?, \"sample\"?, \"seed\"?}} or {{\"kind\": \"propensity\", \"target\": \"purchase|open|churn\", \"days\"?, \"algorithm\"?: \"logistic|boosted_trees\"}}: {e}"
            ),
        )
    })?;
    match &request {
        TrainBody::Cluster {
            min_k,
            max_k,
            restarts,
            ..
        } => {
            if *min_k < 2 || min_k > max_k {
                return Err(invalid(
                    "min_k",
                    "min_k must be at least 2 and at most max_k",
                ));
            }
            if *restarts == 0 {
                return Err(invalid("restarts", "restarts must be at least 1"));
            }
        }
        TrainBody::Propensity { days, .. } => {
            if *days == 0 {
                return Err(invalid("days", "days must be at least 1"));
            }
        }
    }
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let answer = blocking(move || {
        let model = match request {
            TrainBody::Cluster {
                min_k,
                max_k,
                restarts,
                sample,
                seed,
            } => {
                let params = ClusterParams {
                    min_k,
                    max_k,
                    restarts,
                    sample,
                    seed,
                };
                engine.cluster(now, &params)?.1
            }
            TrainBody::Propensity {
                target,
                days,
                algorithm,
            } => {
                let params = PropensityParams {
                    target,
                    horizon_days: days,
                    algorithm,
                };
                engine.train_propensity(&params, now)?.1
            }
        };
        let name = model.name.clone();
        let version = engine.save_model(model, now)?;
        engine.model_detail(&name, Some(version))
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
    Query(query): Query<VersionQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.model_detail(&name, query.version)).await
}

/// `GET /api/models/{name}/versions`: every stored version, oldest first.
pub async fn versions(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.model_summaries(Some(&name))).await
}

/// `POST /api/models/{name}/retrain`: a new version with the same settings; 201.
pub async fn retrain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let answer = blocking(move || {
        let version = engine.retrain(&name, now)?;
        engine.model_detail(&name, Some(version))
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
    check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 4 * 1024).await?;
    let request: ActivateBody = serde_json::from_slice(&bytes)
        .map_err(|e| invalid("version", format!("expected {{\"version\": N}}: {e}")))?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        engine.activate_model(&name, request.version, now)?;
        Ok(engine.model(&name)?.summary(true))
    })
    .await
}
