//! API keys: write keys for the tracking API, admin keys for `/api/*`. A key is shown once when
//! created; only its SHA-256 is stored.

use rand::RngCore;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// What a key may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum KeyKind {
    /// Send events (`/v1/*`).
    Write,
    /// Everything: the admin API (`/api/*`) and sending events.
    Admin,
    /// The admin API's reads only (`GET /api/*`): dashboards, monitoring.
    Read,
}

/// The stored form of a key.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct KeyRecord {
    pub kind: KeyKind,
    pub name: String,
    pub created_at: i64,
    /// The first characters of the key, to recognise it in a list.
    pub prefix: String,
}

/// Makes a new random key: `cible_w_` or `cible_a_` and 32 hex characters.
pub fn new_key(kind: KeyKind) -> String {
    let mut bytes = [0u8; 16];
    rand::rng().fill_bytes(&mut bytes);
    let tag = match kind {
        KeyKind::Write => "w",
        KeyKind::Admin => "a",
        KeyKind::Read => "r",
    };
    format!("cible_{tag}_{}", hex::encode(bytes))
}

/// The hash under which a key is stored.
pub fn key_hash(key: &str) -> String {
    hex::encode(Sha256::digest(key.as_bytes()))
}
