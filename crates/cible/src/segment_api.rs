//! `/api/segments`: create, list, show, edit, delete, preview, members (JSON pages or CSV),
//! history (bucketed by `analysis_api.rs` with `every`). Rules come as text (`rule`) or as
//! their JSON form (`rule_json`); parse errors come back located, with the caret rendering.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::server::{
    ApiError, ApiQuery, ApiResult, AppState, admin_job, blocking, check_admin, error, off_thread,
    read_body,
};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RuleBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    rule: Option<String>,
    #[serde(default)]
    rule_json: Option<Value>,
    #[serde(default)]
    sample: Option<usize>,
}

fn invalid_rule(diagnostics: Vec<cible_lang::Diagnostic>, source: &str) -> ApiError {
    let rendered: Vec<String> = diagnostics.iter().map(|d| d.render(source)).collect();
    let mut error =
        error(StatusCode::BAD_REQUEST, "invalid_rule", rendered.join("\n")).field("rule");
    error.details = Some(json!(diagnostics));
    error
}

/// The rule of a request, parsed, with the warnings to return.
fn parse_rule(body: &RuleBody) -> Result<(cible_lang::Expr, String), ApiError> {
    match (&body.rule, &body.rule_json) {
        (Some(source), None) => match cible_lang::parse(source) {
            Ok(expr) => Ok((expr, source.clone())),
            Err(diagnostic) => Err(invalid_rule(vec![diagnostic], source)),
        },
        (None, Some(json)) => match cible_lang::from_json(json) {
            Ok(expr) => Ok((expr, String::new())),
            Err(diagnostic) => Err(invalid_rule(vec![diagnostic], "")),
        },
        _ => Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "give exactly one of `rule` (text) and `rule_json`",
        )
        .field("rule")),
    }
}

async fn rule_body(headers: &HeaderMap, body: Body) -> Result<RuleBody, ApiError> {
    let bytes = read_body(headers, body, 64 * 1024).await?;
    serde_json::from_slice(&bytes).map_err(|e| {
        error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            format!("expected {{\"name\", \"rule\" or \"rule_json\"}}: {e}"),
        )
    })
}

/// Checks the rule against the store; errors refuse it, warnings travel with the answer.
fn checked(
    engine: &cible_core::Engine,
    expr: &cible_lang::Expr,
    source: &str,
    name: Option<&str>,
) -> Result<Vec<cible_lang::Diagnostic>, ApiError> {
    let diagnostics = engine
        .check_rule(expr, source, name)
        .map_err(ApiError::from)?;
    let (errors, warnings): (Vec<_>, Vec<_>) = diagnostics
        .into_iter()
        .partition(|d| d.severity == cible_lang::Severity::Error);
    if errors.is_empty() {
        Ok(warnings)
    } else {
        Err(invalid_rule(errors, source))
    }
}

pub async fn list(State(state): State<AppState>, headers: HeaderMap) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.segments()).await
}

pub async fn show(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    blocking(move || engine.segment(&name)).await
}

async fn save(
    state: AppState,
    headers: HeaderMap,
    body: Body,
    existing: Option<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let request = rule_body(&headers, body).await?;
    let name = match (&existing, &request.name) {
        (Some(name), _) => name.clone(),
        (None, Some(name)) => name.clone(),
        (None, None) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "a segment needs a name",
            )
            .field("name"));
        }
    };
    let (expr, source) = parse_rule(&request)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let created = existing.is_none();
    let outcome = admin_job(&state.engine, move || -> Result<_, ApiError> {
        let warnings = checked(&engine, &expr, &source, Some(&name))?;
        let record = cible_core::audit::with_actor(&actor, || {
            if created {
                engine.create_segment(&name, expr, &source, now)
            } else {
                engine.edit_segment(&name, expr, &source, now)
            }
        })
        .map_err(ApiError::from)?;
        Ok((record, warnings))
    })
    .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut body = serde_json::to_value(&outcome.0).expect("records serialize");
    body["warnings"] = json!(outcome.1);
    Ok((status, axum::Json(body)).into_response())
}

pub async fn create(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    save(state, headers, body, None).await
}

pub async fn edit(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    body: Body,
) -> ApiResult {
    save(state, headers, body, Some(name)).await
}

pub async fn delete(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        cible_core::audit::with_actor(&actor, || engine.delete_segment(&name, now))
            .map(|()| json!({"deleted": name}))
    })
    .await
}

pub async fn preview(State(state): State<AppState>, headers: HeaderMap, body: Body) -> ApiResult {
    check_admin(&state, &headers)?;
    let request = rule_body(&headers, body).await?;
    let (expr, source) = parse_rule(&request)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    let sample = request.sample.unwrap_or(10).min(1000);
    let outcome = admin_job(&state.engine, move || -> Result<_, ApiError> {
        let warnings = checked(&engine, &expr, &source, None)?;
        let preview = engine.preview(&expr, now, sample).map_err(ApiError::from)?;
        let sample: Vec<Value> = preview
            .sample
            .iter()
            .map(|p| {
                let (primary_id, email) = cible_core::view::contact(&engine, *p);
                json!({"profile": p, "primary_id": primary_id, "email": email})
            })
            .collect();
        Ok(json!({"count": preview.count, "profiles": preview.profiles, "duration_ms": preview.duration_ms,
            "sample": sample, "warnings": warnings}))
    })
    .await?;
    Ok(axum::Json(outcome).into_response())
}

#[derive(Debug, Deserialize)]
pub struct MembersQuery {
    offset: Option<usize>,
    limit: Option<usize>,
    format: Option<String>,
}

pub async fn members(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<MembersQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let csv = match query.format.as_deref() {
        None | Some("json") => false,
        Some("csv") => true,
        Some(other) => {
            return Err(error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                format!("format {other:?}: use json or csv"),
            )
            .field("format"));
        }
    };
    let engine = Arc::clone(&state.engine);
    let offset = query.offset.unwrap_or(0);
    if csv {
        // Streamed: pages of members are formatted off the async workers and sent as they come.
        let checked = Arc::clone(&engine);
        let segment = name.clone();
        off_thread(move || checked.segment(&segment).map(drop).map_err(ApiError::from)).await?;
        let (sender, receiver) = tokio::sync::mpsc::channel::<String>(4);
        tokio::task::spawn_blocking(move || stream_members_csv(&engine, &name, &sender));
        let stream = futures_util::stream::unfold(receiver, |mut receiver| async move {
            receiver
                .recv()
                .await
                .map(|chunk| (Ok::<_, std::convert::Infallible>(chunk), receiver))
        });
        return Ok((
            [(header::CONTENT_TYPE, "text/csv; charset=utf-8")],
            Body::from_stream(stream),
        )
            .into_response());
    }
    let limit = query.limit.unwrap_or(100).min(10_000);
    let (total, page) = off_thread(move || {
        cible_core::view::members_page(&engine, &name, offset, limit).map_err(ApiError::from)
    })
    .await?;
    Ok(
        axum::Json(json!({"total": total, "offset": offset, "limit": limit, "members": page}))
            .into_response(),
    )
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryQuery {
    every: Option<String>,
}

/// The size after each change; with `every=hour|day`, one point per bucket instead.
pub async fn history(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<HistoryQuery>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    if let Some(every) = query.every.as_deref() {
        let every = crate::analysis_api::every(every)?;
        return crate::analysis_api::series(&state, name, every).await;
    }
    let engine = Arc::clone(&state.engine);
    blocking(move || cible_core::view::size_history(&engine, &name)).await
}

pub async fn explain(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path((name, profile)): Path<(String, String)>,
) -> ApiResult {
    check_admin(&state, &headers)?;
    let engine = Arc::clone(&state.engine);
    let now = state.now();
    blocking(move || {
        let ordinal = engine
            .find_profile(&profile)
            .ok_or_else(|| cible_core::EngineError::NotFound(format!("profile {profile:?}")))?;
        engine.explain(&name, ordinal, now)
    })
    .await
}

/// Writes a segment's members as CSV into `sender`, a page at a time; stops when the client goes.
fn stream_members_csv(
    engine: &cible_core::Engine,
    name: &str,
    sender: &tokio::sync::mpsc::Sender<String>,
) {
    const PAGE: usize = 5_000;
    let field = |s: &str| {
        if s.contains([',', '"', '\n']) {
            format!("\"{}\"", s.replace('"', "\"\""))
        } else {
            s.to_string()
        }
    };
    if sender
        .blocking_send("profile,primary_id,email,entered_at\n".into())
        .is_err()
    {
        return;
    }
    let Ok(members) = engine.members(name) else {
        return;
    };
    let profiles: Vec<u32> = members.iter().collect();
    for page in profiles.chunks(PAGE) {
        let mut chunk = String::new();
        for &profile in page {
            let Ok(member) = cible_core::view::member(engine, name, profile) else {
                return;
            };
            chunk.push_str(&format!(
                "{},{},{},{}\n",
                member.profile,
                field(&member.primary_id),
                field(&member.email),
                member.entered_at.unwrap_or_default()
            ));
        }
        if sender.blocking_send(chunk).is_err() {
            return;
        }
    }
}
