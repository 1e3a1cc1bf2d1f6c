//! `/api/audit`: the audit log's records (`?after=SEQ&limit=N`) and its verification
//! (`/api/audit/verify?head=SEQ:HASH`).

use std::sync::Arc;

use axum::extract::State;
use axum::http::{HeaderMap, StatusCode};
use serde::Deserialize;

use crate::server::{ApiQuery, ApiResult, AppState, blocking, check_admin, error};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ListParams {
    #[serde(default)]
    after: Option<u64>,
    #[serde(default)]
    limit: Option<usize>,
}

pub async fn list(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<ListParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let limit = crate::server::page_limit(params.limit, 100, 10_000)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.audit_records(params.after.unwrap_or(0), limit)).await
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VerifyParams {
    #[serde(default)]
    head: Option<String>,
}

pub async fn verify(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(params): ApiQuery<VerifyParams>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let anchor = match params.head.as_deref() {
        Some(text) => Some(cible_core::audit::Head::parse(text).ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("head {text:?}: expected SEQ:HASH, as a verification prints it"),
            )
            .field("head")
        })?),
        None => None,
    };
    let engine = Arc::clone(&state.engine);
    blocking(move || {
        Ok(match engine.verify_audit(anchor.as_ref())? {
            Ok(verified) => {
                serde_json::json!({"ok": true, "records": verified.records, "head": verified.head})
            }
            Err(tamper) => serde_json::json!({"ok": false, "error": tamper.to_string()}),
        })
    })
    .await
}
