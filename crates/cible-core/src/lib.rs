//! cible-core: the engine behind the `cible` binary.
//!
//! Data flows one way: raw JSON → [`message::parse_message`] (validation, normalization) →
//! [`engine::Engine::ingest`] (dedup, identity, anomaly flags, one atomic durable batch) → the
//! durable [`store`] and the in-memory [`hot`] store. Nothing here knows HTTP or the terminal.

pub mod computed;
pub mod engine;
pub mod features;
pub mod generate;
pub mod hot;
pub mod identity;
pub mod import;
pub mod keys;
pub mod message;
pub mod normalize;
pub mod quality;
pub mod seen;
pub mod segment;
pub mod store;
pub mod time;
pub mod trait_columns;
pub mod view;

pub use engine::{BatchOutcome, Durability, Engine, EngineError, Incoming};
pub use message::{Message, MessageType, ParseContext, Rejection};
