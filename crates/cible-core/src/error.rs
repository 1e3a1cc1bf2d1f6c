//! The engine's errors, below every component: user mistakes (`NotFound`, `Invalid`) apart from
//! failures of the machine (`Store`, `Poisoned`) and cancelled work. The server maps each to an
//! HTTP status in one table (`crates/cible/src/errors.rs`).

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
    /// The request repeats or contradicts what is stored (a request id already recorded).
    #[error("{0}")]
    Conflict(String),
    #[error("the work was cancelled (its client left, or the server is stopping)")]
    Cancelled,
    /// Writing an export's output failed (a closed pipe, a client gone, a full disk).
    #[error("writing the output: {0}")]
    Output(std::io::Error),
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

/// Errors from the storage engine, with the data directory named.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error(
        "the data directory {dir} is in use by another cible process (a running `cible serve`?); stop it or use its HTTP API"
    )]
    Locked { dir: String },
    #[error("storage error: {0}")]
    Engine(#[from] fjall::Error),
    #[error("corrupt record in keyspace {keyspace}: {detail}")]
    Corrupt {
        keyspace: &'static str,
        detail: String,
    },
    #[error("I/O error on {path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
}

impl StoreError {
    /// An I/O error on `path`.
    pub fn io(path: &std::path::Path, source: std::io::Error) -> Self {
        Self::Io {
            path: path.display().to_string(),
            source,
        }
    }

    /// Damage in the event log (its records, packed bodies or dictionaries).
    pub fn event_log(detail: String) -> Self {
        Self::Corrupt {
            keyspace: "event log",
            detail,
        }
    }
}
