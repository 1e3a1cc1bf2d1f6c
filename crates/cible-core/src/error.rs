//! The engine's errors, below every component: user mistakes (`NotFound`, `Invalid`) apart from
//! failures of the machine (`Store`, `Poisoned`) and cancelled work. The server maps each to an
//! HTTP status in one table (`crates/cible/src/errors.rs`).

use crate::store::StoreError;

/// A result with an [`EngineError`].
pub type Result<T, E = EngineError> = std::result::Result<T, E>;

/// Errors of the engine. User mistakes (`NotFound`, `Invalid`) are separated from failures of the
/// machine (`Store`, `Poisoned`).
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the store refused a write earlier ({0}); restart cible to recover from disk")]
    Poisoned(String),
    #[error("{0} not found")]
    NotFound(String),
    #[error("{0}")]
    Invalid(String),
    #[error("the work was cancelled (its client left, or the server is stopping)")]
    Cancelled,
}

impl From<fjall::Error> for EngineError {
    fn from(error: fjall::Error) -> Self {
        Self::Store(StoreError::Engine(error))
    }
}

pub(crate) fn corrupt(keyspace: &'static str, detail: impl std::fmt::Display) -> EngineError {
    EngineError::Store(StoreError::Corrupt {
        keyspace,
        detail: detail.to_string(),
    })
}
