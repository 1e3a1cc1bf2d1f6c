//! `/api/profiles/{id}/consents`: a profile's consent per purpose with its history (GET), and a
//! change recorded with its lawful basis and proof (PUT).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use serde::Deserialize;

use crate::server::{ApiResult, AppState, blocking, check_admin, error, read_body};

/// The body of a PUT: `{"purposes": {"email": true, "profiling": false}, "basis": "consent"}`,
/// with optional proof (the person's `ip` and `user_agent`, the caller's `request_id`).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConsentBody {
    purposes: BTreeMap<String, bool>,
    #[serde(default)]
    basis: Option<String>,
    #[serde(default)]
    ip: Option<String>,
    #[serde(default)]
    user_agent: Option<String>,
    #[serde(default)]
    request_id: Option<String>,
}

pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || {
        let profile = crate::server::profile_of(&engine, &id)?;
        let consents = engine.consents_of(profile)?;
        Ok(cible_core::view::consents_view(
            engine.purposes(),
            profile,
            consents,
        ))
    })
    .await
}

pub async fn put(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(id): Path<String>,
    body: Body,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let bytes = read_body(&headers, body, 64 * 1024).await?;
    let body: ConsentBody = serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!(
                "expected {{\"purposes\": {{\"email\": true, ...}}, \"basis\"?, \"ip\"?, \"user_agent\"?, \"request_id\"?}}: {e}"
            ),
        )
    })?;
    // Without a proof in the body, the request's own: the first forwarded address, the agent.
    let header = |name: &str| {
        headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .map(|v| v.split(',').next().unwrap_or(v).trim().to_string())
    };
    let request = cible_core::engine::ConsentRequest {
        purposes: body.purposes,
        basis: body.basis,
        ip: body.ip.or_else(|| header("x-forwarded-for")),
        user_agent: body
            .user_agent
            .or_else(|| header(header::USER_AGENT.as_str())),
        request_id: body.request_id.or_else(|| header("x-request-id")),
    };
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        let profile = crate::server::profile_of(&engine, &id)?;
        let consents =
            cible_core::audit::with_actor(&actor, || engine.set_consents(profile, &request, now))?;
        let profile = engine.find_profile(&id).unwrap_or(profile);
        Ok(cible_core::view::consents_view(
            engine.purposes(),
            profile,
            consents,
        ))
    })
    .await
}
