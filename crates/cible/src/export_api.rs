//! `/api/exports`: a segment's members and every profile, streamed as JSON Lines, CSV or
//! Parquet while they are written ([`cible_core::export::write_profiles`], the same as
//! `cible export members|profiles`). The request is checked before the answer starts (unknown
//! segment, purpose or format: a 4xx naming the field); the export runs on an admin thread and
//! stops when the client leaves.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::IntoResponse;
use bytes::Bytes;
use cible_core::export::{ExportSpec, Format};
use serde::Deserialize;

use crate::server::{ApiError, ApiQuery, ApiResult, AppState, check_admin, error, off_thread};

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExportQuery {
    format: Option<String>,
    purpose: Option<String>,
    pseudonymize: Option<bool>,
}

/// `GET /api/exports/members/{name}?format=csv|jsonl|parquet&purpose=email&pseudonymize=false`.
pub async fn members(
    State(state): State<AppState>,
    headers: HeaderMap,
    Path(name): Path<String>,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let purpose = query.purpose.clone().unwrap_or_else(|| "email".into());
    stream(&state, actor, Some(name), purpose, query, Format::Csv).await
}

/// `GET /api/exports/profiles?purpose=P&format=jsonl|csv|parquet&pseudonymize=false`.
pub async fn profiles(
    State(state): State<AppState>,
    headers: HeaderMap,
    ApiQuery(query): ApiQuery<ExportQuery>,
) -> ApiResult {
    let actor = check_admin(&state, &headers)?;
    let Some(purpose) = query.purpose.clone() else {
        return Err(error(
            StatusCode::BAD_REQUEST,
            "invalid_request",
            "purpose: name what the export is for (a consent purpose: analytics, email, ...)",
        )
        .field("purpose"));
    };
    stream(&state, actor, None, purpose, query, Format::Jsonl).await
}

/// Sends what the export writes to the answer's body, 64 KB at a time.
struct ChannelWriter {
    buffer: Vec<u8>,
    sender: tokio::sync::mpsc::Sender<Result<Bytes, std::io::Error>>,
}

impl ChannelWriter {
    fn send(&mut self) -> std::io::Result<()> {
        if self.buffer.is_empty() {
            return Ok(());
        }
        let chunk = Bytes::from(std::mem::take(&mut self.buffer));
        self.sender
            .blocking_send(Ok(chunk))
            .map_err(|_| std::io::Error::new(std::io::ErrorKind::BrokenPipe, "the client left"))
    }
}

impl std::io::Write for ChannelWriter {
    fn write(&mut self, bytes: &[u8]) -> std::io::Result<usize> {
        self.buffer.extend_from_slice(bytes);
        if self.buffer.len() >= 1 << 16 {
            self.send()?;
        }
        Ok(bytes.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        self.send()
    }
}

impl Drop for ChannelWriter {
    fn drop(&mut self) {
        let _ = self.send();
    }
}

async fn stream(
    state: &AppState,
    actor: String,
    segment: Option<String>,
    purpose: String,
    query: ExportQuery,
    default_format: Format,
) -> ApiResult {
    let format = match &query.format {
        Some(text) => Format::parse(text).map_err(|e| ApiError::from(e).field("format"))?,
        None => default_format,
    };
    let spec = ExportSpec {
        segment,
        purpose,
        pseudonymize: query.pseudonymize.unwrap_or(false),
        format,
        now: state.now(),
    };
    // Checked before the answer starts.
    {
        let (engine, spec) = (Arc::clone(&state.engine), spec.clone());
        off_thread(move || {
            engine
                .consent_check(&spec.purpose)
                .map_err(|e| ApiError::from(e).field("purpose"))?;
            if let Some(name) = &spec.segment {
                engine.segment(name).map_err(ApiError::from)?;
            }
            Ok(())
        })
        .await?;
    }
    let (sender, mut receiver) = tokio::sync::mpsc::channel(16);
    let engine = Arc::clone(&state.engine);
    std::thread::Builder::new()
        .name("cible-export".into())
        .spawn(move || {
            crate::priority::lower();
            let failure = sender.clone();
            let writer = ChannelWriter {
                buffer: Vec::with_capacity(1 << 16),
                sender,
            };
            let result = cible_core::audit::with_actor(&actor, || {
                cible_core::export::write_profiles(&engine, &spec, writer)
            });
            if let Err(error) = result {
                tracing::warn!(error = %error, "an export stopped");
                // Cuts the answer short, so that the client sees it did not end well.
                let _ = failure.blocking_send(Err(std::io::Error::other(error.to_string())));
            }
        })
        .map_err(|e| {
            error(
                StatusCode::INTERNAL_SERVER_ERROR,
                "internal",
                format!("starting an export thread: {e}"),
            )
        })?;
    let body = futures_util::stream::poll_fn(move |context| receiver.poll_recv(context));
    let extension = match format {
        Format::Jsonl => "jsonl",
        Format::Csv => "csv",
        Format::Parquet => "parquet",
    };
    Ok((
        [
            (header::CONTENT_TYPE, format.content_type().to_string()),
            (
                header::CONTENT_DISPOSITION,
                format!("attachment; filename=\"export.{extension}\""),
            ),
        ],
        Body::from_stream(body),
    )
        .into_response())
}
