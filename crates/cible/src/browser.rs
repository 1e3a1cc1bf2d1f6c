//! What Segment's browser library (`@segment/analytics-next`) needs to run unchanged against
//! cible: its settings (`GET /v1/projects/{writeKey}/settings`), its short endpoints (`/v1/t`,
//! `/v1/p`, `/v1/i`, `/v1/a`, `/v1/g`, `/v1/s`, and `/v1/b` for batches, routed in
//! [`crate::server`]) and CORS.
//!
//! CORS is per write key: a key lists the origins whose pages may use it
//! (`cible key create --write --origin https://shop.example`). A request carrying an `Origin`
//! is refused unless its own key allows that origin — before anything is ingested, since a
//! browser sends a simple request whatever the answer's headers say. A preflight carries no
//! key, so it is answered for an origin that some write key allows.

use axum::extract::{Path, State};
use axum::http::{HeaderMap, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use serde_json::json;

use crate::server::{ApiError, ApiResult, AppState, error};

/// The message type a short endpoint stands for, as analytics.js posts to `/v1/t` etc.
pub(crate) fn short_endpoint(path: &str) -> Option<&'static str> {
    Some(match path {
        "t" => "track",
        "p" => "page",
        "i" => "identify",
        "a" => "alias",
        "g" => "group",
        "s" => "screen",
        _ => return None,
    })
}

/// The `Origin` a browser sent, if any (`null` included: a sandboxed page is an origin that
/// no allow-list names, so it is refused like any other).
pub(crate) fn origin(headers: &HeaderMap) -> Option<&str> {
    headers.get(header::ORIGIN).and_then(|v| v.to_str().ok())
}

/// Refuses a browser request whose key does not allow its origin.
pub(crate) fn check_origin(
    record: &cible_core::keys::KeyRecord,
    origin: Option<&str>,
) -> Result<(), ApiError> {
    match origin {
        Some(origin) if !record.allows_origin(origin) => {
            let message = if record.origins.is_empty() {
                format!(
                    "this write key allows no browser origin; create one for pages of {origin} with `cible key create --write --origin {origin}`"
                )
            } else {
                format!(
                    "origin {origin} is not among this write key's origins ({})",
                    record.origins.join(", ")
                )
            };
            Err(error(StatusCode::FORBIDDEN, "origin_not_allowed", message).field("Origin"))
        }
        _ => Ok(()),
    }
}

/// Adds CORS headers to every `/v1/*` answer for an origin that some write key allows, and
/// answers preflights (`OPTIONS`) there. Other origins get no CORS header, so their pages
/// cannot read the answers.
pub(crate) async fn cors(
    State(state): State<AppState>,
    request: axum::extract::Request,
    next: axum::middleware::Next,
) -> Response {
    if !request.uri().path().starts_with("/v1/") {
        return next.run(request).await;
    }
    let allowed = origin(request.headers())
        .filter(|origin| state.engine.any_key_allows_origin(origin))
        .and_then(|origin| HeaderValue::from_str(origin).ok());
    if request.method() == Method::OPTIONS {
        let Some(allowed) = allowed else {
            let message = match origin(request.headers()) {
                Some(origin) => format!(
                    "no write key allows origin {origin} (cible key create --write --origin {origin})"
                ),
                None => "a preflight needs an Origin header".into(),
            };
            return error(StatusCode::FORBIDDEN, "origin_not_allowed", message)
                .field("Origin")
                .into_response();
        };
        let mut response = StatusCode::NO_CONTENT.into_response();
        let headers = response.headers_mut();
        add_cors(headers, allowed);
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static("GET, POST, OPTIONS"),
        );
        headers.insert(
            header::ACCESS_CONTROL_ALLOW_HEADERS,
            HeaderValue::from_static(
                "authorization, content-type, content-encoding, x-retry-count",
            ),
        );
        headers.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("600"),
        );
        return response;
    }
    let mut response = next.run(request).await;
    if let Some(allowed) = allowed {
        add_cors(response.headers_mut(), allowed);
    }
    response
}

fn add_cors(headers: &mut HeaderMap, origin: HeaderValue) {
    headers.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
    headers.append(header::VARY, HeaderValue::from_static("Origin"));
    // analytics.js reads Retry-After on a 429 to wait before its next try.
    headers.insert(
        header::ACCESS_CONTROL_EXPOSE_HEADERS,
        HeaderValue::from_static("Retry-After"),
    );
}

/// `GET /v1/projects/{writeKey}/settings`: the settings analytics.js loads from its `cdnURL`.
/// They send everything to this server (`Segment.io`'s `apiHost`, as the request reached it)
/// and nowhere else: no device-mode destination, no remote plugin, no metrics.
pub(crate) async fn settings(
    State(state): State<AppState>,
    Path(write_key): Path<String>,
    headers: HeaderMap,
) -> ApiResult {
    let record = state
        .engine
        .key_record(&write_key)
        .filter(|record| record.kind == cible_core::keys::KeyKind::Write)
        .ok_or_else(|| {
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                "no such write key: the path is /v1/projects/{writeKey}/settings with a write key (cible key create --write)",
            )
            .field("writeKey")
        })?;
    check_origin(&record, origin(&headers))?;
    crate::server::rate_limit(&state, &write_key, &record)?;
    let host = headers
        .get(header::HOST)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            error(
                StatusCode::BAD_REQUEST,
                "invalid_request",
                "a Host header is needed to tell analytics.js where to send events",
            )
            .field("Host")
        })?;
    // Behind a TLS proxy, pages must post over HTTPS.
    let protocol = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|proto| matches!(*proto, "http" | "https"))
        .unwrap_or("http");
    let api_host = format!("{host}/v1");
    let body = json!({
        "integrations": {
            "Segment.io": {
                "apiKey": write_key,
                "apiHost": api_host,
                "protocol": protocol,
                "unbundledIntegrations": [],
                "addBundledMetadata": true,
                "maybeBundledConfigIds": {},
                "versionSettings": {"version": "4.4.7", "componentTypes": ["browser"]},
            }
        },
        "plan": {
            "track": {"__default": {"enabled": true, "integrations": {}}},
            "identify": {"__default": {"enabled": true}},
            "group": {"__default": {"enabled": true}},
        },
        "edgeFunction": {},
        "analyticsNextEnabled": true,
        "middlewareSettings": {},
        "enabledMiddleware": {},
        "metrics": {"sampleRate": 0, "host": api_host},
        "legacyVideoPluginsEnabled": false,
        "remotePlugins": [],
    });
    let mut response = axum::Json(body).into_response();
    response.headers_mut().insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=60"),
    );
    Ok(response)
}
