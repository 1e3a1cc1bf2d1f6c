//! The one table from engine errors to HTTP statuses and API codes. The match is exhaustive (no
//! catch-all arm): a new error variant does not compile until it is placed here. User mistakes
//! are 4xx; a record that fails to decode, a storage failure or a refused write is the
//! server's fault (5xx), never a 400. API codes are part of the API: never reuse one for
//! another meaning.

use axum::http::StatusCode;
use cible_core::EngineError;
use cible_core::store::StoreError;

/// The status and code of an engine error.
pub fn status_of(error: &EngineError) -> (StatusCode, &'static str) {
    match error {
        EngineError::NotFound(_) => (StatusCode::NOT_FOUND, "not_found"),
        EngineError::Invalid(_) => (StatusCode::BAD_REQUEST, "invalid_request"),
        EngineError::Conflict(_) => (StatusCode::CONFLICT, "conflict"),
        EngineError::Poisoned(_) => (StatusCode::SERVICE_UNAVAILABLE, "store_unavailable"),
        EngineError::Cancelled => (StatusCode::SERVICE_UNAVAILABLE, "cancelled"),
        EngineError::Output(_) => (StatusCode::INTERNAL_SERVER_ERROR, "output_error"),
        EngineError::Store(store) => match store {
            StoreError::Locked { .. } => (StatusCode::SERVICE_UNAVAILABLE, "store_locked"),
            StoreError::Engine(_) => (StatusCode::INTERNAL_SERVER_ERROR, "storage_error"),
            StoreError::Corrupt { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "corrupt_record"),
            StoreError::Io { .. } => (StatusCode::INTERNAL_SERVER_ERROR, "io_error"),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn user_mistakes_are_4xx_and_bad_records_are_5xx() {
        let cases = [
            (
                EngineError::NotFound("segment \"x\"".into()),
                404,
                "not_found",
            ),
            (EngineError::Invalid("bad".into()), 400, "invalid_request"),
            (EngineError::Conflict("again".into()), 409, "conflict"),
            (EngineError::Poisoned("x".into()), 503, "store_unavailable"),
            (
                EngineError::Store(StoreError::Corrupt {
                    keyspace: "segments",
                    detail: "expected value".into(),
                }),
                500,
                "corrupt_record",
            ),
        ];
        for (error, status, code) in cases {
            let (got_status, got_code) = status_of(&error);
            assert_eq!((got_status.as_u16(), got_code), (status, code), "{error}");
        }
    }
}
