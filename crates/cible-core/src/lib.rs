//! cible-core: the engine behind the `cible` binary.
//!
//! Data flows one way: raw JSON → [`message::parse_message`] (validation, normalization) →
//! [`engine::Engine::ingest`] (dedup, identity, anomaly flags, one atomic durable batch) → the
//! durable [`store`] and the in-memory [`hot`] store. Nothing here knows HTTP or the terminal.

pub mod analysis;
pub mod audit;
pub mod cancel;
pub mod codec;
pub mod computed;
pub mod consent;
pub mod engine;
pub mod error;
pub mod eventlog;
pub mod export;
pub mod features;
pub mod generate;
pub mod hot;
pub mod identity;
pub mod import;
pub mod ingest;
pub mod keys;
pub mod liveness;
pub mod lock;
pub mod message;
pub mod metrics;
pub mod models;
pub mod normalize;
pub mod packing;
pub mod pseudonym;
pub mod quality;
pub mod records;
pub mod retention;
pub mod scoring;
pub mod seen;
pub mod segment;
pub mod snapshot;
pub mod store;
pub mod threads;
pub mod time;
pub mod trait_columns;
pub mod view;
pub mod webhooks;

pub use engine::Engine;
pub use error::EngineError;
pub use ingest::{Durability, Incoming};
pub use message::{Message, MessageType, ParseContext, Rejection};
pub use records::BatchOutcome;

#[cfg(test)]
pub(crate) mod test_support {
    use std::sync::Arc;

    use crate::Engine;
    use crate::generate::{GenerateOptions, generate};

    /// Trains a two-cluster model on `sample` profiles and makes it active.
    pub fn save_two_clusters(engine: &Engine, sample: usize, now: i64) {
        let params = crate::models::ClusterParams {
            min_k: 2,
            max_k: 2,
            restarts: 1,
            sample,
            seed: 1,
        };
        let (_, model) = engine.cluster(now, &params).unwrap();
        engine.save_model(model, now).unwrap();
    }

    /// A store loaded with generated data ending at `end_ms`.
    pub fn generated_store(
        profiles: u64,
        days: u32,
        seed: u64,
        end_ms: i64,
    ) -> (tempfile::TempDir, Engine) {
        let dir = tempfile::tempdir().unwrap();
        let mut out = Vec::new();
        generate(
            &GenerateOptions {
                profiles,
                days,
                seed,
                end_ms,
            },
            &mut out,
        )
        .unwrap();
        let path = dir.path().join("events.jsonl");
        std::fs::write(&path, out).unwrap();
        let engine = Engine::open(&dir.path().join("data")).unwrap();
        crate::import::import_files(&engine, &[path], end_ms, &Arc::default()).unwrap();
        (dir, engine)
    }
}
